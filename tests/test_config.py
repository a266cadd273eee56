"""Config loading: the shipped per-model files load, every class of bad config is rejected with a
ConfigError naming the key and the file, and fuzzing finds no other exception."""

from __future__ import annotations

import json
import os
import re
import string
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ucm.config.errors import ConfigError
from ucm.config.loader import (
    SPARSE_KEY,
    builtin_config_dir,
    find_model_config,
    list_model_configs,
    load_model_config,
    parse_sparse_config,
)
from ucm.config.model import GSAOnDeviceModelConfig
from ucm.config.sparse import METHODS, PER_LAYER_KEYS, ESAConfig, GSAConfig, GSAOnDeviceConfig, KVStarConfig
from ucm.methods import get_method

SHIPPED = {
    "qwen3_4b.json": ("Qwen/Qwen3-4B", 36, False),
    "qwen3_32b.json": ("Qwen/Qwen3-32B", 64, False),
    "qwq_32b.json": ("Qwen/QwQ-32B", 64, False),
    "qwen3_coder_30b_a3b.json": ("Qwen/Qwen3-Coder-30B-A3B-Instruct", 48, False),
    "deepseek_v2_lite.json": ("deepseek-ai/DeepSeek-V2-Lite-Chat", 27, True),
    "deepseek_r1.json": ("deepseek-ai/DeepSeek-R1", 61, True),
}
# the demo's small real model (block size 32 on the CPU, so chunks of 32 tokens)
DEMO = {"smollm2_135m.json": ("HuggingFaceTB/SmolLM2-135M-Instruct", 30, False)}
# written by `ucm configure` for the second packaged model (benchmarks/results/accuracy/fallback/configured/)
MEASURED = {"qwen2_5_coder_0_5b_instruct.json": ("Qwen2.5-Coder-0.5B-Instruct", 24, False)}
MLA_KEYS = ("kv_lora_rank", "qk_rope_head_dim", "hash_bits_kv_lora", "hash_bits_qk_rope")
# UCM_FUZZ_EXAMPLES=3000 for a longer hunt; the default keeps the file at a few seconds.
FAST = settings(
    max_examples=int(os.environ.get("UCM_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# ----------------------------------------------------------------------------- helpers
def gqa(n: int = 6, **over: Any) -> dict[str, Any]:
    """A small valid GQA config; tests change one thing so the error is about that thing."""
    cfg: dict[str, Any] = {
        "model_name": "test/gqa",
        "is_mla": False,
        "hash_weight_type": "random",
        "num_hidden_layers": n,
        "gpu_seq_len_threshold": 2048,
        "gpu_concurrency_threshold": 1,
        "npu_seq_len_threshold": 2048,
        "npu_concurrency_threshold": 1,
        "chunk_size": 128,
        "chunk_repre_method": "max",
        "head_dim": 128,
        "hash_bits": 128,
        "top_k_ratio_per_layer": [1] * 2 + [0.3] * (n - 3) + [1],
        "top_k_index_reuse": [-1] * n,
        "must_select_blocks": [0, -2, -1],
        "hash_weight": None,
        "kv_lora_rank": None,
        "qk_rope_head_dim": None,
        "hash_bits_kv_lora": None,
        "hash_bits_qk_rope": None,
        "hash_weight_kv_lora": None,
        "hash_weight_qk_rope": None,
    }
    cfg.update(over)
    return cfg


def mla(n: int = 6, **over: Any) -> dict[str, Any]:
    """A small valid MLA config (DeepSeek widths)."""
    cfg = gqa(
        n,
        model_name="test/mla",
        is_mla=True,
        head_dim=576,
        hash_bits=576,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        hash_bits_kv_lora=512,
        hash_bits_qk_rope=64,
    )
    cfg.update(over)
    return cfg


def write(dir_: Path, name: str, data: Any) -> Path:
    path = dir_ / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def rejected(load: Callable[[Path], Any], path: Path, key: str) -> ConfigError:
    """Loading `path` must fail with a ConfigError whose message names `key` and the file."""
    with pytest.raises(ConfigError) as info:
        load(path)
    msg = str(info.value)
    assert f"'{key}" in msg, msg
    assert info.value.key.startswith(key), (info.value.key, key)
    assert path.name in msg and info.value.source == str(path), msg
    return info.value


def model_rejected(tmp_path: Path, data: Any, key: str, name: str = "bad_model.json") -> ConfigError:
    return rejected(load_model_config, write(tmp_path, name, data), key)


def sparse_rejected(tmp_path: Path, data: Any, key: str, name: str = "bad_sparse.json") -> ConfigError:
    return rejected(parse_sparse_config, write(tmp_path, name, data), key)


# ----------------------------------------------------------------------------- shipped files
def test_shipped_files_are_exactly_the_six_models_the_demo_model_and_the_measured_one() -> None:
    assert sorted(p.name for p in builtin_config_dir().glob("*.json")) == sorted({**SHIPPED, **DEMO, **MEASURED})


def test_measured_config_loads_with_its_trained_weights() -> None:
    from ucm.sparse.hashing import hash_projections

    for file, (name, layers, is_mla) in MEASURED.items():
        loaded = load_model_config(builtin_config_dir() / file)
        cfg = loaded.config
        assert (cfg.model_name, cfg.num_hidden_layers, cfg.is_mla) == (name, layers, is_mla)
        assert cfg.hash_weight_type == "trained" and load_model_config(name).path.name == file
        weights = hash_projections(loaded)
        assert len(weights) == layers and tuple(weights[0][0].shape) == (cfg.head_dim, cfg.hash_bits)


def test_demo_model_ships_its_trained_hash_projections() -> None:
    """The SmolLM2 JSON loads `ucm calibrate`'s W from beside it (packaged with it), one finite
    [64, 128] projection per layer, trained away from the random orthogonal start."""

    from ucm.sparse.hashing import load_trained_hash, random_orthogonal_hash

    f = load_model_config("SmolLM2-135M-Instruct")
    assert f.config.hash_weight_type == "trained"
    path = f.config.weight_paths(f.path.parent)["hash_weight"]
    assert path.parent == builtin_config_dir() and path.is_file()
    w = load_trained_hash(path, 30, 64, 128, "hash_weight")
    for layer in (0, 12, 29):
        start = random_orthogonal_hash(64, 128, layer * 7)  # calibrate's initial W for the layer (seed 0)
        assert 0 < (w[layer] - start).norm() < start.norm()  # moved, but from that start


def test_demo_model_config() -> None:
    c = load_model_config("SmolLM2-135M-Instruct").config
    assert (c.num_hidden_layers, c.head_dim, c.hash_bits, c.chunk_size) == (30, 64, 128, 32)
    assert [i for i, r in enumerate(c.top_k_ratio_per_layer) if r == 1] == [7, 17, 18, 23]  # see docs/accuracy.md


def test_list_model_configs_loads_every_shipped_file() -> None:
    loaded = [f for f in list_model_configs() if f.path.name in SHIPPED]
    assert len(loaded) == len(SHIPPED)
    for f in loaded:
        name, layers, is_mla = SHIPPED[f.path.name]
        c = f.config
        assert (c.model_name, c.num_hidden_layers, c.is_mla) == (name, layers, is_mla)
        assert c.hash_weight_type == "random" and c.chunk_size == 128 and c.chunk_repre_method == "max"
        assert (c.gpu_seq_len_threshold, c.npu_seq_len_threshold) == (2048, 2048)
        # GQA models on the GPU: one decoding row stays dense (measured on an H200 with Qwen3-4B's
        # shape: one 32K row sparse was 0.95x of plain vLLM, kept dense 0.99-1.00x at 32K and 128K)
        gpu = 1 if c.is_mla else 2
        assert (c.gpu_concurrency_threshold, c.npu_concurrency_threshold) == (gpu, 1)
        dense = [i for i, r in enumerate(c.top_k_ratio_per_layer) if r == 1]
        assert dense == [0, 1, layers - 1]
        assert set(c.top_k_ratio_per_layer) == {1, 0.3}
        assert c.top_k_index_reuse == [-1] * layers
        assert c.must_select_blocks == [0, -2, -1]
        assert f.config.weight_paths(f.path.parent) == {}
        if is_mla:
            assert (c.head_dim, c.hash_bits, c.kv_lora_rank, c.qk_rope_head_dim) == (576, 576, 512, 64)
            assert (c.hash_bits_kv_lora, c.hash_bits_qk_rope) == (512, 64)
        else:
            assert (c.head_dim, c.hash_bits) == (128, 128)
            assert all(getattr(c, k) is None for k in MLA_KEYS)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_file_writes_every_key(name: str) -> None:
    """Every key is spelled out in the file, so a reader never has to know a default."""
    data = json.loads((builtin_config_dir() / name).read_text())
    assert list(data) == list(GSAOnDeviceModelConfig.model_fields)


@pytest.mark.parametrize(
    ("ref", "file"),
    [
        ("Qwen/Qwen3-4B", "qwen3_4b.json"),
        ("qwen3-4b", "qwen3_4b.json"),
        ("Qwen3-4B", "qwen3_4b.json"),
        ("qwen3_4b", "qwen3_4b.json"),
        ("qwen3_4b.json", "qwen3_4b.json"),
        ("Qwen/Qwen3-32B", "qwen3_32b.json"),
        ("Qwen/QwQ-32B", "qwq_32b.json"),
        ("Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen3_coder_30b_a3b.json"),
        ("qwen3-coder-30b-a3b", "qwen3_coder_30b_a3b.json"),
        ("deepseek-ai/DeepSeek-V2-Lite-Chat", "deepseek_v2_lite.json"),
        ("deepseek-v2-lite", "deepseek_v2_lite.json"),
        ("deepseek-r1", "deepseek_r1.json"),
        ("deepseek-ai/DeepSeek-R1", "deepseek_r1.json"),
    ],
)
def test_lookup_by_name(ref: str, file: str) -> None:
    loaded = load_model_config(ref)
    assert loaded.path.name == file
    assert ref.endswith(".json") or find_model_config(ref).name == file


def test_lookup_of_an_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="known: .*qwen3_4b") as info:
        load_model_config("meta-llama/Llama-3-8B")
    assert "Llama-3-8B" in str(info.value)


def test_load_by_path_and_inline_dict() -> None:
    path = builtin_config_dir() / "qwen3_4b.json"
    by_path = load_model_config(path)
    assert by_path.path == path and by_path.source == str(path)
    inline = load_model_config(json.loads(path.read_text()))
    assert inline.path is None and inline.source == "inline" and inline.config == by_path.config


# ----------------------------------------------------------------------------- model rejections
def test_unknown_key(tmp_path: Path) -> None:
    err = model_rejected(tmp_path, gqa(hash_bitz=128), "hash_bitz")
    assert "unknown key" in str(err)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_hidden_layers", "6"),  # string for int
        ("chunk_size", True),  # bool for int
        ("head_dim", 128.0),  # float for int
        ("gpu_seq_len_threshold", 2048.5),
        ("is_mla", 0),  # int for bool
        ("model_name", 7),
        ("must_select_blocks", "0,-1"),
        ("top_k_ratio_per_layer", 0.3),
    ],
)
def test_wrong_type(tmp_path: Path, key: str, value: Any) -> None:
    model_rejected(tmp_path, gqa(**{key: value}), key)


def test_wrong_type_inside_a_list_names_the_index(tmp_path: Path) -> None:
    ratios = gqa()["top_k_ratio_per_layer"]
    ratios[3] = "0.3"
    err = model_rejected(tmp_path, gqa(top_k_ratio_per_layer=ratios), "top_k_ratio_per_layer[3]")
    assert "'0.3'" in str(err)


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1])
def test_ratio_outside_zero_one(tmp_path: Path, bad: float) -> None:
    ratios = gqa()["top_k_ratio_per_layer"]
    ratios[2] = bad
    model_rejected(tmp_path, gqa(top_k_ratio_per_layer=ratios), "top_k_ratio_per_layer[2]")


@pytest.mark.parametrize(
    "key", ["gpu_seq_len_threshold", "gpu_concurrency_threshold", "npu_seq_len_threshold", "npu_concurrency_threshold"]
)
def test_negative_threshold(tmp_path: Path, key: str) -> None:
    model_rejected(tmp_path, gqa(**{key: -1}), key)


@pytest.mark.parametrize(("key", "value"), [("num_hidden_layers", 0), ("chunk_size", 0), ("head_dim", -128)])
def test_non_positive_size(tmp_path: Path, key: str, value: int) -> None:
    model_rejected(tmp_path, gqa(**{key: value}), key)


@pytest.mark.parametrize("key", ["hash_weight_type", "chunk_repre_method"])
def test_value_outside_the_choices(tmp_path: Path, key: str) -> None:
    model_rejected(tmp_path, gqa(**{key: "median"}), key)


@pytest.mark.parametrize("key", ["top_k_ratio_per_layer", "top_k_index_reuse"])
@pytest.mark.parametrize("length", [5, 7, 0])
def test_list_length_differs_from_layer_count(tmp_path: Path, key: str, length: int) -> None:
    value = ([0.3] if key == "top_k_ratio_per_layer" else [-1]) * length
    err = model_rejected(tmp_path, gqa(**{key: value}), key)
    assert f"has {length} entries but num_hidden_layers is 6" in str(err)


@pytest.mark.parametrize(
    ("layer", "target", "why"),
    [
        (3, 4, "earlier layer"),  # a later layer
        (3, 3, "earlier layer"),  # itself
        (3, 1, "dense"),  # a dense layer
        (3, -2, "greater than or equal to -1"),
    ],
)
def test_index_reuse_of_a_layer_it_cannot_reuse(tmp_path: Path, layer: int, target: int, why: str) -> None:
    reuse = [-1] * 6
    reuse[layer] = target
    err = model_rejected(tmp_path, gqa(top_k_index_reuse=reuse), f"top_k_index_reuse[{layer}]")
    assert why in str(err)


def test_index_reuse_of_a_layer_that_itself_reuses(tmp_path: Path) -> None:
    reuse = [-1, -1, -1, 2, 3, -1]
    err = model_rejected(tmp_path, gqa(top_k_index_reuse=reuse), "top_k_index_reuse[4]")
    assert "itself reuses" in str(err)


def test_dense_layer_with_reuse(tmp_path: Path) -> None:
    reuse = [-1, -1, -1, -1, -1, 2]  # layer 5 is dense (ratio 1)
    err = model_rejected(tmp_path, gqa(top_k_index_reuse=reuse), "top_k_index_reuse[5]")
    assert "layer 5 is dense" in str(err)


def test_valid_index_reuse_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "reuse.json", gqa(top_k_index_reuse=[-1, -1, -1, 2, 2, -1]))
    assert load_model_config(path).config.top_k_index_reuse[3:5] == [2, 2]


def test_duplicated_must_select_blocks(tmp_path: Path) -> None:
    err = model_rejected(tmp_path, gqa(must_select_blocks=[0, -1, -1]), "must_select_blocks")
    assert "duplicates" in str(err)
    assert "(got" not in str(err)  # a cross-field check does not dump the whole object


def test_empty_and_non_string_keys_are_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_model_config({"": 1, **gqa()})
    assert info.value.key == '""' and "unknown key" in str(info.value)
    with pytest.raises(ConfigError, match="keys must be strings") as info:
        load_model_config({1: 2, **gqa()})
    assert info.value.key == "[1]"
    with pytest.raises(ConfigError, match="unknown sparse method") as info:
        parse_sparse_config({SPARSE_KEY: {"": {}}})
    assert info.value.key == f'{SPARSE_KEY}.""'


def test_long_values_are_cut_short_in_the_message(tmp_path: Path) -> None:
    err = model_rejected(tmp_path, gqa(model_name=["x" * 50] * 20), "model_name")
    assert len(str(err)) < 300 and "..." in str(err)


@pytest.mark.parametrize("key", [*MLA_KEYS, "hash_weight_kv_lora", "hash_weight_qk_rope"])
def test_mla_key_on_a_gqa_model(tmp_path: Path, key: str) -> None:
    value = "w.bin" if key.startswith("hash_weight") else 64
    err = model_rejected(tmp_path, gqa(**{key: value}), key)
    assert "MLA models only" in str(err)


@pytest.mark.parametrize("key", MLA_KEYS)
def test_missing_mla_key(tmp_path: Path, key: str) -> None:
    err = model_rejected(tmp_path, mla(**{key: None}), key)
    assert "required when is_mla" in str(err)


def test_mla_key_left_out_of_the_file(tmp_path: Path) -> None:
    data = mla()
    del data["kv_lora_rank"]
    model_rejected(tmp_path, data, "kv_lora_rank")


def test_mla_head_dim_is_not_the_sum(tmp_path: Path) -> None:
    err = model_rejected(tmp_path, mla(head_dim=512), "head_dim")
    assert "kv_lora_rank + qk_rope_head_dim = 576" in str(err)


def test_mla_hash_bits_is_not_the_sum(tmp_path: Path) -> None:
    err = model_rejected(tmp_path, mla(hash_bits=512), "hash_bits")
    assert "hash_bits_kv_lora + hash_bits_qk_rope = 576" in str(err)


def test_mla_with_the_gqa_weight_key(tmp_path: Path) -> None:
    model_rejected(
        tmp_path,
        mla(hash_weight_type="trained", hash_weight="w.bin", hash_weight_kv_lora="a", hash_weight_qk_rope="b"),
        "hash_weight",
    )


@pytest.mark.parametrize(("make", "key"), [(gqa, "hash_bits"), (mla, "hash_bits_kv_lora"), (mla, "hash_bits_qk_rope")])
@pytest.mark.parametrize("bits", [100, 4, 0])
def test_hash_bits_not_a_multiple_of_eight(tmp_path: Path, make: Callable[..., dict], key: str, bits: int) -> None:
    model_rejected(tmp_path, make(**{key: bits}), key)


@pytest.mark.parametrize(("make", "key"), [(gqa, "hash_weight"), (mla, "hash_weight_kv_lora")])
def test_trained_without_a_weight_path(tmp_path: Path, make: Callable[..., dict], key: str) -> None:
    extra = {"hash_weight_qk_rope": "r.bin"} if key == "hash_weight_kv_lora" else {}
    err = model_rejected(tmp_path, make(hash_weight_type="trained", **extra), key)
    assert "required when hash_weight_type is 'trained'" in str(err)


@pytest.mark.parametrize(("make", "key"), [(gqa, "hash_weight"), (mla, "hash_weight_qk_rope")])
def test_random_with_a_weight_path(tmp_path: Path, make: Callable[..., dict], key: str) -> None:
    err = model_rejected(tmp_path, make(**{key: "w.bin"}), key)
    assert "must be null when hash_weight_type is 'random'" in str(err)


def test_trained_with_a_missing_weight_file(tmp_path: Path) -> None:
    err = model_rejected(tmp_path, gqa(hash_weight_type="trained", hash_weight="weights/hash.bin"), "hash_weight")
    assert str(tmp_path / "weights" / "hash.bin") in str(err)


def test_weight_path_of_an_unknown_home_directory(tmp_path: Path) -> None:
    """'~user/...' with no such user is a missing file, not a RuntimeError from expanduser."""
    model_rejected(tmp_path, gqa(hash_weight_type="trained", hash_weight="~no_such_user_ucm/w.bin"), "hash_weight")


def test_unreadable_paths_are_config_errors() -> None:
    for load in (load_model_config, parse_sparse_config):
        with pytest.raises(ConfigError, match="cannot read"):
            load("bad\0name.json")
        with pytest.raises(ConfigError, match="cannot read"):
            load("~no_such_user_ucm/x.json")


def test_trained_mla_with_one_weight_file_missing(tmp_path: Path) -> None:
    (tmp_path / "kv.bin").write_bytes(b"\0")
    data = mla(hash_weight_type="trained", hash_weight_kv_lora="kv.bin", hash_weight_qk_rope="rope.bin")
    model_rejected(tmp_path, data, "hash_weight_qk_rope")


def test_trained_with_weight_files_next_to_the_json_loads(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "hash.bin").write_bytes(b"\0")
    (tmp_path / "kv.bin").write_bytes(b"\0")
    (tmp_path / "rope.bin").write_bytes(b"\0")
    g = load_model_config(write(tmp_path, "g.json", gqa(hash_weight_type="trained", hash_weight="weights/hash.bin")))
    assert g.config.weight_paths(g.path.parent) == {"hash_weight": tmp_path / "weights" / "hash.bin"}
    m = load_model_config(
        write(
            tmp_path,
            "m.json",
            mla(
                hash_weight_type="trained", hash_weight_kv_lora="kv.bin", hash_weight_qk_rope=str(tmp_path / "rope.bin")
            ),
        )
    )
    assert m.config.weight_paths(m.path.parent) == {
        "hash_weight_kv_lora": tmp_path / "kv.bin",
        "hash_weight_qk_rope": tmp_path / "rope.bin",
    }


@pytest.mark.parametrize("text", ["{", '{"model_name": }', "", "not json", '{"a": 1,}'])
def test_invalid_json_file(tmp_path: Path, text: str) -> None:
    err = model_rejected(tmp_path, text, "<file>")
    assert "not valid JSON" in str(err)


def test_not_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.json"
    path.write_bytes(b"\xff\xfe\x00{")
    rejected(load_model_config, path, "<file>")


def test_missing_file(tmp_path: Path) -> None:
    err = rejected(load_model_config, tmp_path / "absent.json", "<file>")
    assert "cannot read" in str(err)


def test_repeated_key_in_the_file(tmp_path: Path) -> None:
    text = json.dumps(gqa())[:-1] + ', "chunk_size": 64}'
    err = model_rejected(tmp_path, text, "chunk_size")
    assert "more than once" in str(err)


@pytest.mark.parametrize("value", [[gqa()], "qwen3", 3, None, True])
def test_non_object_json(tmp_path: Path, value: Any) -> None:
    err = model_rejected(tmp_path, json.dumps(value), "<root>")
    assert "must be a JSON object" in str(err)


# ----------------------------------------------------------------------------- sparse method configs
def test_sparse_defaults_and_forms(tmp_path: Path) -> None:
    """The wrapped form, the bare form, a JSON string and a file all give the same config."""
    body = {"init_window_sz": 1, "local_window_sz": 2, "sparse_ratio": 0.3, "retrieval_stride": 5}
    want = ESAConfig(**body)
    assert parse_sparse_config({SPARSE_KEY: {"ESA": body}}) == want
    assert parse_sparse_config({"ESA": body}) == want
    assert parse_sparse_config(json.dumps({SPARSE_KEY: {"ESA": body}})) == want
    assert parse_sparse_config(write(tmp_path, "esa.json", {SPARSE_KEY: {"ESA": body}})) == want
    assert parse_sparse_config(str(tmp_path / "esa.json")) == want
    assert isinstance(parse_sparse_config({"GSA": {}}), GSAConfig)
    assert isinstance(parse_sparse_config({"KVStarMultiStep": {}}), KVStarConfig)
    on_device = parse_sparse_config({"GSAOnDevice": {"config_file": "qwen3-4b"}})
    assert on_device == GSAOnDeviceConfig(config_file="qwen3-4b")


def test_sparse_config_ignores_sibling_connector_keys() -> None:
    """UCM's kv_connector_extra_config holds other keys beside ucm_sparse_config."""
    data = {"ucm_connectors": [{"ucm_connector_name": "UcmNfsStore"}], SPARSE_KEY: {"GSA": {}}}
    assert parse_sparse_config(data) == GSAConfig()


def test_unknown_method_lists_the_valid_ones(tmp_path: Path) -> None:
    err = sparse_rejected(tmp_path, {SPARSE_KEY: {"NoSuchMethod": {}}}, f"{SPARSE_KEY}.NoSuchMethod")
    for method in METHODS:
        assert method in str(err)


def test_two_methods_at_once(tmp_path: Path) -> None:
    err = sparse_rejected(tmp_path, {SPARSE_KEY: dict.fromkeys(list(METHODS)[:2], {})}, SPARSE_KEY)
    assert "exactly one" in str(err)


def test_no_method(tmp_path: Path) -> None:
    sparse_rejected(tmp_path, {SPARSE_KEY: {}}, SPARSE_KEY)


@pytest.mark.parametrize("value", [[], "ESA", None, 1])
def test_sparse_config_not_an_object(tmp_path: Path, value: Any) -> None:
    sparse_rejected(tmp_path, {SPARSE_KEY: value}, SPARSE_KEY)


def test_method_settings_not_an_object(tmp_path: Path) -> None:
    sparse_rejected(tmp_path, {SPARSE_KEY: {"GSA": [1]}}, f"{SPARSE_KEY}.GSA")


def test_invalid_sparse_json_file(tmp_path: Path) -> None:
    sparse_rejected(tmp_path, '{"ucm_sparse_config": {"ESA": {', "<file>")


@pytest.mark.parametrize(
    ("method", "key", "value"),
    [
        ("ESA", "init_window_sz", -1),  # negative window
        ("ESA", "local_window_sz", -2),
        ("ESA", "sparse_ratio", 0),
        ("ESA", "sparse_ratio", 1.5),
        ("ESA", "sparse_ratio", -0.1),
        ("ESA", "retrieval_stride", 0),
        ("ESA", "min_blocks", "4"),
        ("ESA", "init_window_sz", True),
        ("ESA", "local_window_sz", 2.0),
        ("ESA", "blk_repre_dim_prune_ratio", 0.5),  # a KVStar key on ESA: unknown
        ("ESA", "blk_repre_inner_token_merge", 0),
        ("Quest", "blk_repre_inner_token_merge", -4),
        ("GSA", "local_window_sz", -1),
        ("GSA", "sparse_ratio", 2),
        ("GSA", "min_blocks", -1),
        ("GSA", "retrieval_stride", 0),
        ("GSA", "top_k", 8),  # unknown
        ("KVStarMultiStep", "blk_repre_inner_token_merge", 0),
        ("KVStarMultiStep", "blk_repre_dim_prune_ratio", 0),
        ("KVStarMultiStep", "blk_repre_dim_prune_ratio", 1.01),
        ("KVStarMultiStep", "retrieval_stride", 0),
        ("KVStarMultiStep", "sparse_ratio", "0.25"),
        ("GSAOnDevice", "config_file", ""),
        ("GSAOnDevice", "config_file", "   "),
        ("GSAOnDevice", "config_file", 3),
        ("GSAOnDevice", "hash_bits", 128),  # a per-model key belongs in the model JSON
    ],
)
def test_method_key_rejected(tmp_path: Path, method: str, key: str, value: Any) -> None:
    want = (
        f"{SPARSE_KEY}.{method}.{key}"
        if method != "GSAOnDevice" or key != "config_file" or value == 3
        else f"{SPARSE_KEY}.{method}"
    )
    err = sparse_rejected(tmp_path, {SPARSE_KEY: {method: {key: value}}}, want)
    if want.endswith(method):  # a cross-field check: the message still says which setting
        assert key in str(err)


# ----------------------------------------------------------------------------- fuzzing
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(list(GSAOnDeviceModelConfig.model_fields))
method_keys = st.sampled_from(sorted({k for cls in METHODS.values() for k in cls.model_fields} | {"x"}))


@st.composite
def near_valid_model_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A valid config with a few keys replaced, added or dropped: deep enough to reach every check."""
    data = draw(st.sampled_from([gqa(), mla(), gqa(3), mla(4)]))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "drop"]))
        key = draw(field_names | st.text(max_size=6))
        if action == "drop":
            data.pop(key, None)
        else:
            data[key] = draw(json_values | st.lists(st.integers(-3, 8), max_size=8))
    return data


@st.composite
def near_valid_sparse(draw: st.DrawFn) -> Any:
    method = draw(st.sampled_from([*METHODS, "Nope"]))
    body = draw(st.dictionaries(method_keys, json_values, max_size=4) | json_values)
    several = st.dictionaries(st.sampled_from(list(METHODS)), json_values)
    inner = {method: body} if draw(st.booleans()) else draw(several)
    return {SPARSE_KEY: inner} if draw(st.booleans()) else inner


def _only_config_errors(fn: Callable[[Any], Any], value: Any) -> None:
    try:
        fn(value)
    except ConfigError as exc:
        assert exc.key and exc.source and str(exc).startswith(f"{exc.source}: key ")


@FAST
@given(value=json_values | near_valid_model_dicts() | near_valid_sparse())
def test_fuzz_inline_values_raise_only_config_errors(value: Any) -> None:
    _only_config_errors(load_model_config, value)
    _only_config_errors(parse_sparse_config, value)


@pytest.mark.parametrize("ref", ["x" * 300, "x" * 300 + ".json", "a/" * 4 + "z" * 300])
def test_a_name_too_long_for_the_os_is_a_config_error(ref: str) -> None:
    for load in (load_model_config, parse_sparse_config):
        with pytest.raises(ConfigError):
            load(ref)


@FAST
@given(
    text=st.text(max_size=40) | json_values.map(json.dumps) | near_valid_model_dicts().map(json.dumps),
    raw=st.binary(max_size=16),
)
def test_fuzz_files_raise_only_config_errors(tmp_path_factory: pytest.TempPathFactory, text: str, raw: bytes) -> None:
    dir_ = tmp_path_factory.mktemp("fuzz", numbered=True)
    _only_config_errors(load_model_config, write(dir_, "t.json", text))
    _only_config_errors(parse_sparse_config, write(dir_, "s.json", text))
    (dir_ / "b.json").write_bytes(raw)
    _only_config_errors(load_model_config, dir_ / "b.json")
    _only_config_errors(parse_sparse_config, str(dir_ / "b.json"))
    if "{" not in text:  # a string that is not JSON is taken as a path or a model name
        _only_config_errors(parse_sparse_config, text)
        _only_config_errors(load_model_config, text)


bits = st.integers(1, 96).map(lambda b: 8 * b)


@st.composite
def valid_model_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Any config the schema allows: random layer plans, reuse chains, MLA widths, trained or not."""
    n = draw(st.integers(1, 12))
    ratios = draw(st.lists(st.just(1) | st.floats(0, 1, exclude_min=True), min_size=n, max_size=n))
    reuse = [-1] * n
    for i in range(n):
        sources = [j for j in range(i) if ratios[j] < 1 and reuse[j] == -1]
        if ratios[i] < 1 and sources and draw(st.booleans()):
            reuse[i] = draw(st.sampled_from(sources))
    is_mla = draw(st.booleans())
    trained = draw(st.booleans())
    data = gqa(
        n,
        model_name=draw(st.text(min_size=1, max_size=20)),
        hash_weight_type="trained" if trained else "random",
        gpu_seq_len_threshold=draw(st.integers(0, 1 << 20)),
        gpu_concurrency_threshold=draw(st.integers(0, 512)),
        npu_seq_len_threshold=draw(st.integers(0, 1 << 20)),
        npu_concurrency_threshold=draw(st.integers(0, 512)),
        chunk_size=draw(st.sampled_from([16, 64, 128, 256])),
        chunk_repre_method=draw(st.sampled_from(["max", "min", "mean"])),
        head_dim=draw(st.sampled_from([64, 128, 256])),
        hash_bits=draw(bits),
        hash_score_method=draw(st.sampled_from(["hamming", "norm_cosine"])),
        top_k_ratio_per_layer=ratios,
        top_k_index_reuse=reuse,
        must_select_blocks=draw(st.lists(st.integers(-16, 16), unique=True, max_size=5)),
        hash_weight="w.bin" if trained else None,
    )
    data["copy_layers"] = draw(st.none() | st.lists(st.sampled_from(range(len(ratios))), unique=True))
    if is_mla:
        kv, rope, hkv, hrope = draw(st.integers(1, 1024)), draw(st.integers(1, 128)), draw(bits), draw(bits)
        data.update(
            is_mla=True,
            head_dim=kv + rope,
            hash_bits=hkv + hrope,
            hash_score_method="hamming",  # MLA: two projections a token, Hamming only
            kv_lora_rank=kv,
            qk_rope_head_dim=rope,
            hash_bits_kv_lora=hkv,
            hash_bits_qk_rope=hrope,
            hash_weight=None,
        )
        if trained:
            data.update(hash_weight_kv_lora="kv.bin", hash_weight_qk_rope=draw(st.sampled_from(["rope.bin", "kv.bin"])))
    return data


@pytest.fixture(scope="module")
def weight_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dir_ = tmp_path_factory.mktemp("weights")
    for name in ("w.bin", "kv.bin", "rope.bin"):
        (dir_ / name).write_bytes(b"\0")
    return dir_


@FAST
@given(data=valid_model_dicts())
def test_fuzz_valid_configs_load_and_round_trip(weight_dir: Path, data: dict[str, Any]) -> None:
    first = load_model_config(write(weight_dir, "cfg.json", data))
    assert first.config.model_dump() == data
    again = load_model_config(write(weight_dir, "again.json", first.config.model_dump()))
    assert again.config == first.config
    if data["hash_weight_type"] == "random":
        assert load_model_config(first.config.model_dump()).config == first.config


@st.composite
def valid_sparse(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    method = draw(st.sampled_from(list(METHODS)))
    config_file = st.none() | st.text(alphabet=string.ascii_letters, min_size=1, max_size=12)
    if get_method(method).model_json:  # its keys name the per-model JSON, or measure one
        body = {"config_file": draw(config_file), "measure_at_start": draw(st.booleans())}
    else:
        keys = list(METHODS[method].model_fields)
        ratio = st.floats(0, 1, exclude_min=True)
        positive = ("retrieval_stride", "blk_repre_inner_token_merge", "sticky_top")
        values = {k: ratio if "ratio" in k else st.integers(1 if k in positive else 0, 64) for k in keys}
        for k, field in METHODS[method].model_fields.items():  # a method's choice keys: one of their values
            if typing.get_origin(field.annotation) is typing.Literal:
                values[k] = st.sampled_from(typing.get_args(field.annotation))
        values["offload"] = values["measure_at_start"] = st.booleans()
        values["copy_layer_boost"] = st.floats(1, 10)
        values["config_file"] = config_file
        values["dense_layers"] = st.lists(st.integers(0, 63), unique=True, max_size=6)
        # JSON object keys are strings: layers 64-127, apart from the dense layers above
        values["layer_sparse_ratio"] = st.dictionaries(st.integers(64, 127).map(str), ratio, max_size=6)
        values["layer_repre_inner_token_merge"] = st.dictionaries(
            st.integers(0, 127).map(str), st.integers(1, 64), max_size=6
        )
        chosen = draw(st.lists(st.sampled_from(keys), unique=True))
        body = {k: draw(values[k]) for k in chosen}
        if "offload_margin_blocks" in body:  # the margin is only valid with offload on
            body["offload"] = True
        if body.get("offload"):  # dense layers would keep every block on the device
            body.pop("dense_layers", None)
            body.pop("bound_guard_top", None)  # the bound guard does not run with offload
            if "layer_sparse_ratio" in body:  # and so would a layer at ratio 1
                body["layer_sparse_ratio"] = {k: min(r, 0.5) for k, r in body["layer_sparse_ratio"].items()}
    return method, body


@FAST
@given(spec=valid_sparse())
def test_fuzz_valid_sparse_configs_round_trip(spec: tuple[str, dict[str, Any]]) -> None:
    method, body = spec
    cfg = parse_sparse_config({SPARSE_KEY: {method: body}})
    assert cfg.method == method and type(cfg) is METHODS[method]
    expected = {k: {int(a): b for a, b in v.items()} if k in PER_LAYER_KEYS else v for k, v in body.items()}
    assert all(getattr(cfg, k) == expected[k] for k in body)
    assert parse_sparse_config(json.dumps({SPARSE_KEY: {method: cfg.model_dump()}})) == cfg


def _kind(key: str) -> str:
    annotation = str(GSAOnDeviceModelConfig.model_fields[key].annotation)
    for kind in ("list", "bool", "int", "str"):
        if kind in annotation or (kind == "str" and "Literal" in annotation):
            return kind
    raise AssertionError(f"no wrong-type strategy for {key}: {annotation}")


_others = st.integers() | st.floats() | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
WRONG = {
    "str": st.booleans() | st.lists(st.text(max_size=3), max_size=2) | _others,
    "bool": st.integers() | st.text(max_size=5) | st.floats() | st.lists(st.booleans(), max_size=2) | st.none(),
    "int": st.text(max_size=5) | st.booleans() | st.floats() | st.lists(st.integers(), max_size=2) | st.none(),
    "list": st.text(max_size=5)
    | _others
    | st.booleans()
    | st.none()
    | st.lists(st.text(max_size=3) | st.none() | st.lists(st.integers(), max_size=1), min_size=1, max_size=3),
}


@FAST
@given(file=st.sampled_from(sorted(SHIPPED)), key=field_names, data=st.data())
def test_fuzz_one_wrong_typed_key_is_named(
    tmp_path_factory: pytest.TempPathFactory, file: str, key: str, data: st.DataObject
) -> None:
    base = json.loads((builtin_config_dir() / file).read_text())
    value = data.draw(WRONG[_kind(key)], label="value")
    if value is None and GSAOnDeviceModelConfig.model_fields[key].default is None:
        if not base["is_mla"] or key == "copy_layers":  # (an MLA file needs its MLA keys)
            value = 7  # null is the right value for an unused optional key; any int is the wrong type
    base[key] = value
    path = write(tmp_path_factory.mktemp("wrong"), file, base)
    rejected(load_model_config, path, key)


def test_layer_repre_inner_token_merge_is_keyed_by_layer() -> None:
    cfg = parse_sparse_config({SPARSE_KEY: {"GSA": {"layer_repre_inner_token_merge": {"9": 1, "3": 2}}}})
    assert cfg.layer_repre_inner_token_merge == {9: 1, 3: 2}
    for bad in ({"x": 2}, {"2": 0}, {"2": 1.5}):
        with pytest.raises(ConfigError, match="GSA.layer_repre_inner_token_merge"):
            parse_sparse_config({SPARSE_KEY: {"GSA": {"layer_repre_inner_token_merge": bad}}})


def test_layer_sparse_ratio_is_keyed_by_layer_and_exclusive_of_dense_layers() -> None:
    cfg = parse_sparse_config({SPARSE_KEY: {"ESA": {"layer_sparse_ratio": {"9": 0.6, "3": 1.0}}}})
    assert cfg.layer_sparse_ratio == {9: 0.6, 3: 1.0}
    for bad, key in (({"x": 0.5}, "layer_sparse_ratio.x"), ({"2": 1.5}, "layer_sparse_ratio.2"), ({"2": 0}, "")):
        with pytest.raises(ConfigError, match=re.escape(f"ESA.{key}")):
            parse_sparse_config({SPARSE_KEY: {"ESA": {"layer_sparse_ratio": bad}}})
    with pytest.raises(ConfigError, match="layers \\[2\\] are also in dense_layers"):
        parse_sparse_config({SPARSE_KEY: {"ESA": {"layer_sparse_ratio": {"2": 0.5}, "dense_layers": [2]}}})
    with pytest.raises(ConfigError, match="cannot be combined with offload"):
        parse_sparse_config({SPARSE_KEY: {"GSA": {"layer_sparse_ratio": {"1": 1.0}, "offload": True}}})


def test_dense_layers_are_unique_and_exclude_offload() -> None:
    assert parse_sparse_config({SPARSE_KEY: {"KVStarMultiStep": {"dense_layers": [7, 2]}}}).dense_layers == [7, 2]
    with pytest.raises(ConfigError, match="lists a layer twice"):
        parse_sparse_config({SPARSE_KEY: {"ESA": {"dense_layers": [3, 3]}}})
    with pytest.raises(ConfigError, match=r"ESA.dense_layers\[0\]"):
        parse_sparse_config({SPARSE_KEY: {"ESA": {"dense_layers": [-1]}}})
    with pytest.raises(ConfigError, match="cannot be combined with offload"):
        parse_sparse_config({SPARSE_KEY: {"GSA": {"dense_layers": [1], "offload": True}}})


def test_offload_margin_needs_offload() -> None:
    ok = parse_sparse_config({SPARSE_KEY: {"GSA": {"offload": True, "offload_margin_blocks": 6}}})
    assert ok.offload and ok.offload_margin_blocks == 6
    with pytest.raises(ConfigError, match="offload_margin_blocks has no effect without offload"):
        parse_sparse_config({SPARSE_KEY: {"ESA": {"offload_margin_blocks": 6}}})
    with pytest.raises(ConfigError, match="offload"):
        parse_sparse_config({SPARSE_KEY: {"ESA": {"offload": 1}}})  # strict: a bool, not a number
    with pytest.raises(ConfigError, match="offload"):
        parse_sparse_config({SPARSE_KEY: {"GSAOnDevice": {"offload": True}}})  # ESA/GSA/KVStar only


def test_a_model_folder_of_the_same_name_does_not_shadow_the_builtin_config(tmp_path, monkeypatch) -> None:
    """`config_file: "Qwen3-4B"` names a model: a folder of that name in the working directory
    (a downloaded model) is not read as the file (which would fail with "Is a directory")."""
    from ucm.config.loader import load_model_config

    (tmp_path / "Qwen3-4B").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_model_config("Qwen3-4B").config.model_name == "Qwen/Qwen3-4B"


def test_a_huge_json_integer_is_a_config_error(tmp_path) -> None:
    from ucm.config.errors import ConfigError
    from ucm.config.loader import load_model_config

    bad = tmp_path / "huge.json"
    bad.write_text('{"num_hidden_layers": ' + "9" * 5000 + "}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model_config(bad)
