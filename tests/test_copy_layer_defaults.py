"""ESA's and GSA's representations default to the served model's measured copying layers
(`ucm.config.copy_layer_defaults`), checked against the shipped per-model JSONs: applied where the
config leaves the representation keys unset and the model's JSON measured them, never over a
key the user set, a dense layer, another model's layer count, or a method without per-layer
groups; each case says what it ran in the engine's log line."""

from __future__ import annotations

import pytest

from ucm.config.copy_layer_defaults import REPRESENTATION_KEYS, with_model_copy_layers
from ucm.config.loader import find_model_config, load_model_config, parse_sparse_config
from ucm.methods import COPY_GROUP_TOKENS, DemoRequest, get_method

QWEN = "Qwen/Qwen2.5-Coder-0.5B-Instruct"


def _measured() -> list[int]:
    layers = load_model_config(find_model_config(QWEN)).config.copy_layers
    assert layers, "the shipped Qwen2.5-Coder JSON names its measured copying layers (session 22)"
    return layers


@pytest.mark.parametrize("method", ["ESA", "GSA"])
@pytest.mark.parametrize("served", [QWEN, "/models/Qwen2.5-Coder-0.5B-Instruct/"])
def test_unset_representations_take_the_measured_copying_layers(method: str, served: str) -> None:
    config = parse_sparse_config({method: {"sparse_ratio": 0.3}})
    chosen = with_model_copy_layers(config, served, 24, 32)
    assert chosen.config.blk_repre_inner_token_merge is None  # one representation per block elsewhere
    assert chosen.config.layer_repre_inner_token_merge == dict.fromkeys(_measured(), COPY_GROUP_TOKENS)
    assert chosen.config.sparse_ratio == 0.3 and type(chosen.config) is type(config)
    assert f"copying layers {sorted(_measured())}" in chosen.note and "qwen2_5_coder_0_5b_instruct.json" in chosen.note


def test_dense_layers_are_left_out() -> None:
    dense = _measured()[:2]
    config = parse_sparse_config({"ESA": {"dense_layers": dense}})
    chosen = with_model_copy_layers(config, QWEN, 24, 32)
    assert set(chosen.config.layer_repre_inner_token_merge) == set(_measured()) - set(dense)
    assert chosen.config.dense_layers == dense


@pytest.mark.parametrize(
    "keys",
    [
        {"blk_repre_inner_token_merge": 4},
        {"blk_repre_inner_token_merge": None},
        {"layer_repre_inner_token_merge": {"3": 8}},
    ],
)
def test_a_representation_key_the_user_sets_wins(keys: dict) -> None:
    config = parse_sparse_config({"GSA": keys})
    chosen = with_model_copy_layers(config, QWEN, 24, 32)
    assert chosen.config == config
    assert "as configured" in chosen.note


@pytest.mark.parametrize(
    ("served", "layers", "block", "why"),
    [
        ("/models/tiny-llama", 24, 32, "no per-model config for /models/tiny-llama"),
        ("Qwen/Qwen3-4B", 36, 128, "qwen3_4b.json has no measured copying layers"),  # shipped, not measured
        (QWEN, 28, 32, "the served model has 28 layers"),  # a name that matches another model's JSON
        (QWEN, 24, 1, "blocks of 1"),  # groups of 2 tokens do not divide the block
    ],
)
def test_otherwise_the_config_default_runs_and_the_note_says_why(served, layers, block, why) -> None:
    config = parse_sparse_config({"ESA": {}})
    chosen = with_model_copy_layers(config, served, layers, block)
    assert chosen.config == config and chosen.config.blk_repre_inner_token_merge == 4
    assert "groups of 4 tokens in every layer" in chosen.note and why in chosen.note


@pytest.mark.parametrize("method", ["KVStarMultiStep", "Quest", "GSAOnDevice"])
def test_methods_without_per_layer_groups_are_untouched(method: str) -> None:
    config = parse_sparse_config({method: {}})
    chosen = with_model_copy_layers(config, QWEN, 24, 32)
    assert chosen.config is config and chosen.note == ""


@pytest.mark.parametrize("method", ["ESA", "GSA"])
def test_eval_states_its_groups_and_the_demo_leaves_them_to_the_engine(method: str, tmp_path) -> None:
    """`ucm eval --copy-layers none` compares against groups of 4 everywhere: its config states
    them, so an engine serving a model with measured copying layers runs what was asked. The demo
    and the benchmarks send what a user would, no representation key: the engine's default."""
    from ucm.eval.runner import Setting

    plain = Setting(method, 0.3, dense_layers=(7,)).extra_config(tmp_path)["ucm_sparse_config"]
    config = parse_sparse_config({method: plain[method]})
    assert config.blk_repre_inner_token_merge == 4 and REPRESENTATION_KEYS & config.model_fields_set
    assert with_model_copy_layers(config, QWEN, 24, 32).config == config
    copy = Setting(method, 0.3, dense_layers=(9,), copy_layers=(9, 11)).extra_config(tmp_path)["ucm_sparse_config"]
    assert parse_sparse_config({method: copy[method]}).layer_repre_inner_token_merge == {11: COPY_GROUP_TOKENS}
    demo = get_method(method).demo_config(DemoRequest(0.3))
    assert not REPRESENTATION_KEYS & set(demo)
