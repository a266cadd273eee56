"""The windowed methods default to the served model's measured copying layers
(`ucm.config.copy_layer_defaults`), checked against the shipped per-model JSONs: ESA's and GSA's
representations (groups of 2 tokens there) and GSA's and KVStar's budgets (a larger share there,
the blocks read unchanged), each applied where the config leaves its keys unset and the model's
JSON measured them, never over a key the user set, a dense layer, another model's layer count, or
a method that takes neither; each case says what it ran in the engine's log line."""

from __future__ import annotations

import json

import pytest

from ucm.config.copy_layer_defaults import REPRESENTATION_KEYS, with_model_copy_layers
from ucm.config.errors import ConfigError
from ucm.config.loader import find_model_config, load_model_config, model_config_data, parse_sparse_config
from ucm.methods import COPY_GROUP_TOKENS, COPY_RATIO_BOOST, DemoRequest, get_method

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
    config = parse_sparse_config({"ESA": keys})
    chosen = with_model_copy_layers(config, QWEN, 24, 32)
    assert chosen.config == config
    assert "as configured" in chosen.note
    gsa = with_model_copy_layers(parse_sparse_config({"GSA": keys}), QWEN, 24, 32)  # its budgets still apply
    assert gsa.config.blk_repre_inner_token_merge == keys.get("blk_repre_inner_token_merge", 4)
    assert gsa.config.layer_sparse_ratio and "as configured" in gsa.note and "budgets" in gsa.note


def _budgets(config, layers: int, dense: list[int], copy: list[int]) -> None:
    """Every sparse layer has its ratio; the copying ones (not dense) keep the boost's share, the
    rest less, and the mean over the sparse layers is still `sparse_ratio`."""
    ratios = config.layer_sparse_ratio
    sparse = [layer for layer in range(layers) if layer not in dense]
    assert sorted(ratios) == sparse
    boosted = [layer for layer in copy if layer not in dense]
    assert {ratios[layer] for layer in boosted} == {round(config.sparse_ratio * COPY_RATIO_BOOST, 6)}
    assert max(ratios[layer] for layer in sparse if layer not in boosted) < config.sparse_ratio
    assert sum(ratios.values()) / len(sparse) == pytest.approx(config.sparse_ratio)


@pytest.mark.parametrize("method", ["GSA", "KVStarMultiStep"])
@pytest.mark.parametrize("dense", [[], [0, 3, 7], [0, 9]])
def test_budgets_give_the_copying_layers_a_larger_share_of_the_same_blocks(method: str, dense: list[int]) -> None:
    config = parse_sparse_config({method: {"sparse_ratio": 0.3, "dense_layers": dense}})
    chosen = with_model_copy_layers(config, QWEN, 24, 32)
    _budgets(chosen.config, 24, dense, _measured())
    assert chosen.config.dense_layers == dense and chosen.config.copy_layer_boost == COPY_RATIO_BOOST
    boosted = sorted(set(_measured()) - set(dense))
    assert f"budgets: the copying layers {boosted}" in chosen.note and "keep 0.5" in chosen.note
    if method == "KVStarMultiStep":  # budgets only: its merged rows stay as configured
        assert chosen.config.blk_repre_inner_token_merge == config.blk_repre_inner_token_merge == 2


@pytest.mark.parametrize(
    "keys",
    [
        {"layer_sparse_ratio": {"9": 0.4}},
        {"copy_layer_boost": 1},
        {"copy_layer_boost": 1.0},
        {"offload": True},  # offload keeps what the greediest layer reads on the device: one ratio
    ],
)
def test_a_budget_key_the_user_sets_wins(keys: dict) -> None:
    config = parse_sparse_config({"KVStarMultiStep": keys})
    chosen = with_model_copy_layers(config, QWEN, 24, 32)
    assert chosen.config == config and chosen.note == ""


@pytest.mark.parametrize("method", ["ESA", "Quest"])
def test_methods_whose_boost_is_one_keep_one_ratio(method: str) -> None:
    """ESA (its groups of 2 already hold the needle there) and Quest lost a sample with the
    budgets (docs/accuracy.md, session 25): their default boost is 1; a user may set another."""
    config = parse_sparse_config({method: {}})
    assert not with_model_copy_layers(config, QWEN, 24, 32).config.layer_sparse_ratio
    asked = parse_sparse_config({method: {"copy_layer_boost": 2.0}})
    chosen = with_model_copy_layers(asked, QWEN, 24, 32).config
    assert {chosen.layer_sparse_ratio[layer] for layer in _measured()} == {0.6}


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
    if block != 1:  # KVStar's budgets do not depend on the block size: with blocks of 1 they apply
        kvstar = parse_sparse_config({"KVStarMultiStep": {}})
        chosen = with_model_copy_layers(kvstar, served, layers, block)
        assert chosen.config == kvstar
        assert "budgets: 0.25 in every sparse layer" in chosen.note and why in chosen.note


def _own_json(tmp_path, copy_layers: list[int], layers: int = 24) -> str:
    """A per-model JSON as `ucm configure` writes one, for a model ucm ships none for: Qwen's shipped
    settings with random projections, `copy_layers` measured."""
    data = model_config_data(find_model_config(QWEN), random_hash=True)
    data.update(model_name="my-org/my-model", copy_layers=copy_layers)
    if layers != data["num_hidden_layers"]:
        data.update(
            num_hidden_layers=layers,
            top_k_ratio_per_layer=[0.3] * layers,
            top_k_index_reuse=[-1] * layers,
        )
    path = tmp_path / "my_model.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("method", ["ESA", "GSA", "KVStarMultiStep"])
def test_config_file_names_the_json_whose_copying_layers_run(method: str, tmp_path) -> None:
    own = _own_json(tmp_path, [5, 12, 20])
    config = parse_sparse_config({method: {"config_file": own}})
    # a served model ucm knows nothing about: the named file decides, not the model's name
    chosen = with_model_copy_layers(config, "/models/my-model", 24, 32)
    assert f"copying layers [5, 12, 20] measured in {own}" in chosen.note, chosen.note
    if get_method(method).takes_copy_groups:
        assert chosen.config.layer_repre_inner_token_merge == dict.fromkeys([5, 12, 20], COPY_GROUP_TOKENS)
    if get_method(method).copy_layer_boost > 1:
        ratios = chosen.config.layer_sparse_ratio
        assert [ratios[layer] for layer in (5, 12, 20)] == pytest.approx([config.sparse_ratio * COPY_RATIO_BOOST] * 3)
    # a built-in model's name works too, whatever the served model is called
    named = with_model_copy_layers(parse_sparse_config({method: {"config_file": QWEN}}), "/models/x", 24, 32)
    assert f"copying layers {sorted(_measured())}" in named.note


def test_a_config_file_that_cannot_be_used_is_an_error(tmp_path) -> None:
    missing = parse_sparse_config({"ESA": {"config_file": str(tmp_path / "nope.json")}})
    with pytest.raises(ConfigError):
        with_model_copy_layers(missing, "/models/x", 24, 32)
    other = parse_sparse_config({"GSA": {"config_file": _own_json(tmp_path, [3], layers=28)}})
    with pytest.raises(ConfigError, match="num_hidden_layers.*28 but the served model has 24"):
        with_model_copy_layers(other, "/models/x", 24, 32)
    # keys under which the method would never read it: said at start, not ignored
    own = _own_json(tmp_path, [5])
    unread = (("Quest", {}), ("ESA", {"blk_repre_inner_token_merge": 4}), ("KVStarMultiStep", {"offload": True}))
    for method, keys in unread:
        config = parse_sparse_config({method: {"config_file": own, **keys}})
        with pytest.raises(ConfigError, match=f"{method}.config_file.*has no effect"):
            with_model_copy_layers(config, "/models/x", 24, 32, source="kv_connector_extra_config")


@pytest.mark.parametrize("method", ["Quest", "GSAOnDevice"])
def test_methods_that_take_neither_are_untouched(method: str) -> None:
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
    parsed = parse_sparse_config({method: copy[method]})
    assert parsed.layer_repre_inner_token_merge == {11: COPY_GROUP_TOKENS}
    if method == "GSA":  # and its budgets, over the evaluated model's (SmolLM2's) 30 layers
        _budgets(parsed, 30, [9], [11])
    else:
        assert not parsed.layer_sparse_ratio
    demo = get_method(method).demo_config(DemoRequest(0.3))
    assert not REPRESENTATION_KEYS & set(demo) and "layer_sparse_ratio" not in demo


def test_eval_states_one_ratio_and_gives_copy_runs_their_budgets(tmp_path) -> None:
    """KVStar in `ucm eval`: without "+copy" its config states boost 1 (an engine serving a model with
    measured copying layers would otherwise move the budget); "+copy" sends the budgets itself."""
    from ucm.eval.runner import Setting

    plain = Setting("KVStarMultiStep", 0.3, dense_layers=(7,))
    body = plain.extra_config(tmp_path)["ucm_sparse_config"]["KVStarMultiStep"]
    assert body["copy_layer_boost"] == 1.0 and plain.name == "KVStarMultiStep+dense"
    assert with_model_copy_layers(parse_sparse_config({"KVStarMultiStep": body}), QWEN, 24, 32).note == ""
    copy = Setting("KVStarMultiStep", 0.3, dense_layers=(7,), copy_layers=(7, 20))
    body = copy.extra_config(tmp_path)["ucm_sparse_config"]["KVStarMultiStep"]
    _budgets(parse_sparse_config({"KVStarMultiStep": body}), 30, [7], [20])
    assert copy.name == "KVStarMultiStep+dense+copy"
    with pytest.raises(ValueError, match="layer count"):
        get_method("KVStarMultiStep").demo_config(DemoRequest(0.3, copy_layers=(20,)))


@pytest.mark.parametrize("bad", [0.5, 0, 11, "2"])
def test_a_boost_below_one_or_not_a_number_is_an_error(bad) -> None:
    from ucm.config.errors import ConfigError

    with pytest.raises(ConfigError, match="copy_layer_boost"):
        parse_sparse_config({"GSA": {"copy_layer_boost": bad}})
