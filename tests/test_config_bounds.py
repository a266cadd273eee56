"""Numeric config keys are bounded (#18 item 3): every value that loads runs a decode step, and
every value that cannot ends in a ConfigError naming the file and the key, at load time, at
engine start (`check_against_model`, the connector) or in `ucm configs check`, never at the
first decode step of a served engine."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import annotated_types
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.paged import make_paged
from ucm.cli import main as cli_main
from ucm.config.bounds import check_against_model
from ucm.config.errors import ConfigError
from ucm.config.loader import SPARSE_KEY, load_model_config, parse_sparse_config
from ucm.config.model import GSAOnDeviceModelConfig
from ucm.config.sparse import MAX_BLOCKS, METHODS, GSAOnDeviceConfig
from ucm.methods import method_names
from ucm.ops import TorchReferenceOps
from ucm.sparse.base import ModelShapes, SparseMethod
from ucm.sparse.factory import build_sparse_method

OPS = TorchReferenceOps()
BS = 8  # KV block size of the tiny model
LAYERS = 2
MAX_LEN = 96  # max_model_len of the tiny deployment: 12 blocks
SEQ_LENS = [MAX_LEN - 3, 3 * BS + 1]  # one request near the longest, one short
WINDOWED = method_names(windowed=True)
NEAR_2_63 = [2**63 - 1, 2**63, 2**64]


def gqa_shapes(num_blocks: int) -> ModelShapes:
    return ModelShapes(LAYERS, 4, 2, 32, BS, num_blocks)


def mla_shapes(num_blocks: int) -> ModelShapes:
    return ModelShapes(LAYERS, 4, 1, 32, BS, num_blocks, kv_lora_rank=24, qk_rope_head_dim=8)


def model_json(mla: bool = False, **over: Any) -> dict[str, Any]:
    """A valid per-model config of the tiny model: chunks of two blocks, two sparse layers."""
    cfg: dict[str, Any] = {
        "model_name": "test/tiny",
        "is_mla": mla,
        "hash_weight_type": "random",
        "num_hidden_layers": LAYERS,
        "gpu_seq_len_threshold": 0,
        "gpu_concurrency_threshold": 0,
        "npu_seq_len_threshold": 0,
        "npu_concurrency_threshold": 0,
        "chunk_size": 2 * BS,
        "chunk_repre_method": "max",
        "head_dim": 32,
        "hash_bits": 64,
        "top_k_ratio_per_layer": [0.5, 0.25],
        "top_k_index_reuse": [-1, -1],
        "must_select_blocks": [0, -1],
        "hash_weight": None,
        "kv_lora_rank": None,
        "qk_rope_head_dim": None,
        "hash_bits_kv_lora": None,
        "hash_bits_qk_rope": None,
        "hash_weight_kv_lora": None,
        "hash_weight_qk_rope": None,
        "copy_layers": None,
    }
    if mla:
        cfg.update(kv_lora_rank=24, qk_rope_head_dim=8, hash_bits_kv_lora=48, hash_bits_qk_rope=16)
    cfg.update(over)
    return cfg


def decode_steps(method: SparseMethod, mla: bool = False, steps: int = 2) -> None:
    """Prefill the tiny cache, then `steps` decode steps through every layer (what an engine
    does first); any exception here is what the bounds exist to prevent."""
    g = torch.Generator().manual_seed(0)
    hkv, hq = (1, 4) if mla else (2, 4)
    batch = make_paged(SEQ_LENS, BS, hkv, 32, g)
    try:
        for layer in range(LAYERS):
            for r in range(len(SEQ_LENS)):
                method.on_kv_written(layer, batch.keys(r), batch.slots(r))
        for _ in range(steps):
            plan = method.begin_step(["a", "b"], batch.seq_lens, batch.block_table)
            q = torch.randn(len(SEQ_LENS), hq, 32, generator=g)
            for layer in range(LAYERS):
                sel = method.select(layer, q, plan)
                assert bool((sel.blocks_kept <= sel.blocks_total).all())
            method.end_step(plan)
    finally:
        method.close()


def num_blocks() -> int:
    return make_paged(SEQ_LENS, BS, 2, 32, torch.Generator().manual_seed(0)).k_cache.shape[0]


def write(dir_: Path, name: str, text: str) -> Path:
    path = dir_ / name
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- the issue's values
@pytest.mark.parametrize("value", NEAR_2_63)
@pytest.mark.parametrize(
    ("method", "key"),
    [
        *[(m, k) for m in WINDOWED for k in ("min_blocks", "init_window_sz", "local_window_sz")],
        *[(m, "retrieval_stride") for m in method_names(strided=True)],
    ],
)
def test_issue_values_are_rejected_when_the_file_loads(tmp_path: Path, method: str, key: str, value: int) -> None:
    path = write(tmp_path, "sparse.json", json.dumps({SPARSE_KEY: {method: {key: value}}}))
    with pytest.raises(ConfigError) as err:
        parse_sparse_config(path)
    assert err.value.source == str(path) and err.value.key == f"{SPARSE_KEY}.{method}.{key}"
    assert str(err.value).startswith(f"{path}: key '{SPARSE_KEY}.{method}.{key}': ")


@pytest.mark.parametrize("value", NEAR_2_63)
@pytest.mark.parametrize(
    ("method", "key"),
    [
        *[(m, k) for m in WINDOWED for k in ("min_blocks", "init_window_sz", "local_window_sz")],
        *[(m, "retrieval_stride") for m in method_names(strided=True)],
    ],
)
def test_issue_values_never_reach_decode(method: str, key: str, value: int) -> None:
    """Built the way an engine builds it: the config fails, not the first decode step."""
    shapes = gqa_shapes(num_blocks())
    with pytest.raises(ConfigError, match=re.escape(f"'{method}.{key}'")):
        decode_steps(build_sparse_method({method: {key: value}}, shapes, OPS, host_ops=OPS))


@pytest.mark.parametrize("chunk_size", [BS * 2**40, 2**63 - BS, 2**62])
def test_gsa_on_device_huge_chunk_size_is_rejected(tmp_path: Path, chunk_size: int) -> None:
    path = write(tmp_path, "tiny.json", json.dumps(model_json(chunk_size=chunk_size)))
    with pytest.raises(ConfigError) as err:
        load_model_config(path)
    assert (err.value.source, err.value.key) == (str(path), "chunk_size")
    shapes = gqa_shapes(num_blocks())
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'chunk_size'")):
        decode_steps(build_sparse_method({"GSAOnDevice": {"config_file": str(path)}}, shapes, OPS))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("gpu_seq_len_threshold", 2**64),
        ("gpu_concurrency_threshold", 2**63),
        ("num_hidden_layers", 2**40),
        ("hash_bits", 8 * 2**40),
        ("head_dim", 2**63),
        ("must_select_blocks", [0, 2**63]),
        ("top_k_index_reuse", [-1, 2**63]),
    ],
)
def test_gsa_on_device_huge_keys_are_rejected(tmp_path: Path, key: str, value: Any) -> None:
    path = write(tmp_path, "tiny.json", json.dumps(model_json(**{key: value})))
    with pytest.raises(ConfigError) as err:
        load_model_config(path)
    assert err.value.source == str(path) and err.value.key.startswith(key)


def test_every_numeric_key_has_an_upper_bound() -> None:
    unbounded = [
        f"{cls.__name__}.{name}"
        for cls in (*METHODS.values(), GSAOnDeviceModelConfig)
        for name, field in cls.model_fields.items()
        if _is_numeric(field.annotation) and _limits(field)[1] is None
    ]
    assert not unbounded


# ----------------------------------------------------------------------------- huge integers
@pytest.mark.parametrize("digits", [4300, 4301, 20_000])
def test_integers_past_python_digit_limit_are_named_by_key(tmp_path: Path, digits: int) -> None:
    sparse = write(tmp_path, "s.json", '{"' + SPARSE_KEY + '": {"ESA": {"min_blocks": 1' + "0" * digits + "}}}")
    with pytest.raises(ConfigError) as err:
        parse_sparse_config(sparse)
    assert (err.value.source, err.value.key) == (str(sparse), f"{SPARSE_KEY}.ESA.min_blocks")
    assert len(str(err.value)) < 300  # the value is described, not printed
    text = json.dumps(model_json()).replace(
        '"must_select_blocks": [0, -1]', '"must_select_blocks": [0, -9%s]' % ("9" * digits)
    )
    model = write(tmp_path, "m.json", text)
    with pytest.raises(ConfigError) as err:
        load_model_config(model)
    assert (err.value.source, err.value.key) == (str(model), "must_select_blocks[1]")


def test_inline_python_integers_of_any_size_are_named_by_key() -> None:
    huge = 10**5000  # repr() of it raises ValueError: the message must not try
    with pytest.raises(ConfigError, match=r"key 'ESA\.local_window_sz'.*about 5001 digits"):
        parse_sparse_config({"ESA": {"local_window_sz": huge}})
    with pytest.raises(ConfigError, match=r"key 'ESA\.dense_layers\[1\]'"):
        parse_sparse_config({"ESA": {"dense_layers": [0, huge]}})
    with pytest.raises(ConfigError, match=r"key 'KVStarMultiStep\.sparse_ratio'"):
        parse_sparse_config({"KVStarMultiStep": {"sparse_ratio": huge}})
    with pytest.raises(ConfigError, match=r"inline: key 'chunk_size'"):
        load_model_config(model_json(chunk_size=huge))


def test_cross_field_checks_name_their_key() -> None:
    with pytest.raises(ConfigError) as err:
        parse_sparse_config({SPARSE_KEY: {"GSA": {"offload_margin_blocks": 5}}})
    assert err.value.key == f"{SPARSE_KEY}.GSA.offload_margin_blocks"
    with pytest.raises(ConfigError) as err:
        parse_sparse_config({"ESA": {"dense_layers": [3, 3]}})
    assert err.value.key == "ESA.dense_layers"


# ----------------------------------------------------------------------------- model-derived bounds
@pytest.mark.parametrize("method", WINDOWED)
@pytest.mark.parametrize("key", ["init_window_sz", "local_window_sz", "min_blocks"])
def test_a_window_longer_than_the_longest_request_is_an_error(tmp_path: Path, method: str, key: str) -> None:
    blocks = MAX_LEN // BS  # 12
    fits = parse_sparse_config({SPARSE_KEY: {method: {key: blocks}}})
    check_against_model(fits, max_model_len=MAX_LEN, block_size=BS, num_layers=LAYERS)
    decode_steps(build_sparse_method(fits, gqa_shapes(num_blocks()), OPS, host_ops=OPS))
    path = write(tmp_path, "s.json", json.dumps({SPARSE_KEY: {method: {key: blocks + 1}}}))
    cfg = parse_sparse_config(path)  # statically fine: the bound depends on the deployment
    with pytest.raises(ConfigError) as err:
        check_against_model(cfg, max_model_len=MAX_LEN, block_size=BS, source=str(path), prefix=SPARSE_KEY)
    assert (err.value.source, err.value.key) == (str(path), f"{SPARSE_KEY}.{method}.{key}")
    assert "13 blocks is more than the 12 blocks" in str(err.value)
    check_against_model(cfg, max_model_len=MAX_LEN + 1, block_size=BS)  # a 13th, partial block


def test_offload_margin_is_bounded_only_with_offload() -> None:
    cfg = parse_sparse_config({"ESA": {"offload": True, "offload_margin_blocks": 13}})
    with pytest.raises(ConfigError, match=r"key 'ESA\.offload_margin_blocks'"):
        check_against_model(cfg, max_model_len=MAX_LEN, block_size=BS)


@pytest.mark.parametrize(
    ("over", "key", "why"),
    [
        ({"dense_layers": [1, 2]}, "ESA.dense_layers[1]", "layer 2 does not exist"),
        ({"layer_sparse_ratio": {"1": 0.5, "5": 0.5}}, "ESA.layer_sparse_ratio[5]", "layer 5 does not exist"),
        ({"layer_repre_inner_token_merge": {"7": 2}}, "ESA.layer_repre_inner_token_merge[7]", "layer 7 does not exist"),
    ],
)
def test_layers_are_checked_against_the_model(over: dict, key: str, why: str) -> None:
    cfg = parse_sparse_config({"ESA": over})
    with pytest.raises(ConfigError, match=re.escape(f"key '{key}': {why}")):
        check_against_model(cfg, num_layers=LAYERS)


def test_kvstar_merge_must_divide_the_block_size() -> None:
    cfg = parse_sparse_config({"KVStarMultiStep": {"blk_repre_inner_token_merge": 3}})
    with pytest.raises(ConfigError, match=r"key 'KVStarMultiStep\.blk_repre_inner_token_merge'"):
        check_against_model(cfg, block_size=BS)


def test_a_layers_group_size_must_divide_the_block_size() -> None:
    cfg = parse_sparse_config({"ESA": {"layer_repre_inner_token_merge": {"1": 2, "0": 3}}})
    with pytest.raises(ConfigError, match=r"key 'ESA\.layer_repre_inner_token_merge\[0\]': 3 must divide"):
        check_against_model(cfg, block_size=BS)


@pytest.mark.parametrize(
    ("over", "key", "why"),
    [
        ({"chunk_size": 12}, "chunk_size", "not a multiple of the KV block size 8"),
        ({"chunk_size": 128}, "chunk_size", "longer than max_model_len 96"),
        ({"must_select_blocks": [0, 6]}, "must_select_blocks[1]", "outside the 6 chunks"),
        ({"must_select_blocks": [-7]}, "must_select_blocks[0]", "outside the 6 chunks"),
        (
            {"num_hidden_layers": 3, "top_k_ratio_per_layer": [1, 1, 1], "top_k_index_reuse": [-1, -1, -1]},
            "num_hidden_layers",
            "3 but the model has 2 layers",
        ),
        ({"head_dim": 64}, "head_dim", "64 but the model's head dim is 32"),
    ],
)
def test_model_config_is_checked_against_the_model(tmp_path: Path, over: dict, key: str, why: str) -> None:
    path = write(tmp_path, "tiny.json", json.dumps(model_json(**over)))
    loaded = load_model_config(path)
    with pytest.raises(ConfigError) as err:
        check_against_model(
            GSAOnDeviceConfig(config_file=str(path)),
            max_model_len=MAX_LEN,
            block_size=BS,
            num_layers=LAYERS,
            head_dim=32,
            model_config=loaded,
        )
    assert (err.value.source, err.value.key) == (str(path), key) and why in str(err.value)


def test_shipped_model_configs_fit_a_common_deployment() -> None:
    from ucm.config.loader import list_model_configs

    for loaded in list_model_configs():
        check_against_model(
            None, max_model_len=4096, block_size=16, model_config=loaded, num_layers=loaded.config.num_hidden_layers
        )


# ----------------------------------------------------------------------------- CLI and engine start
def test_configs_check_takes_the_deployment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "s.json", json.dumps({SPARSE_KEY: {"ESA": {"min_blocks": 13}}}))
    assert cli_main(["configs", "check", str(path)]) == 0
    assert cli_main(["configs", "check", "--max-model-len", str(MAX_LEN + 8), "--block-size", str(BS), str(path)]) == 0
    capsys.readouterr()
    assert cli_main(["configs", "check", "--max-model-len", str(MAX_LEN), "--block-size", str(BS), str(path)]) == 1
    assert f"{path}: key '{SPARSE_KEY}.ESA.min_blocks': 13 blocks is more than" in capsys.readouterr().err
    model = write(tmp_path, "tiny.json", json.dumps(model_json()))
    assert cli_main(["configs", "check", "--block-size", "32", str(model)]) == 1
    assert f"{model}: key 'chunk_size'" in capsys.readouterr().err
    assert cli_main(["configs", "check", "--num-layers", "3", str(model)]) == 1
    assert f"{model}: key 'num_hidden_layers'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["configs", "check", "--max-model-len", "0", str(path)])


def _fake_vllm_config(extra: dict, max_model_len: int = MAX_LEN, block_size: int = BS) -> SimpleNamespace:
    return SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config=extra, kv_load_failure_policy="recompute"),
        cache_config=SimpleNamespace(block_size=block_size),
        model_config=SimpleNamespace(
            max_model_len=max_model_len, model="test/tiny", get_total_num_hidden_layers=lambda: LAYERS
        ),
        parallel_config=None,
    )


@pytest.mark.parametrize(
    ("sparse", "key"),
    [
        ({"ESA": {"local_window_sz": 13}}, "ucm_sparse_config.ESA.local_window_sz"),
        ({"KVStarMultiStep": {"min_blocks": 2**63}}, "ucm_sparse_config.KVStarMultiStep.min_blocks"),
        ({"GSA": {"dense_layers": [2]}}, "ucm_sparse_config.GSA.dense_layers[0]"),
    ],
)
def test_the_connector_refuses_at_engine_start(sparse: dict, key: str) -> None:
    pytest.importorskip("vllm")
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from ucm.integration.vllm.connector import UCMConnector

    with pytest.raises(ConfigError) as err:
        UCMConnector(_fake_vllm_config({SPARSE_KEY: sparse}), KVConnectorRole.SCHEDULER, None)
    assert (err.value.source, err.value.key) == ("kv_connector_extra_config", key)


# ----------------------------------------------------------------------------- fuzzing
def _is_numeric(annotation: Any) -> bool:
    if typing.get_origin(annotation) is typing.Literal:  # a choice of names ("float32", ...), not a number
        return False
    text = str(annotation)
    return "int" in text or "float" in text


def _limits(field: Any) -> tuple[float | None, float | None]:
    """(lowest, highest) allowed value of a numeric field or of its list's elements."""
    lo = hi = None
    stack = [*field.metadata, field.annotation]
    while stack:
        item = stack.pop()
        if isinstance(item, (annotated_types.Ge, annotated_types.Gt)):
            lo = getattr(item, "ge", getattr(item, "gt", None))
        elif isinstance(item, (annotated_types.Le, annotated_types.Lt)):
            hi = getattr(item, "le", getattr(item, "lt", None))
        else:
            stack.extend(getattr(item, "__metadata__", ()))
            stack.extend(typing.get_args(item))
            stack.extend(getattr(item, "metadata", ()))
    return lo, hi


def _numeric_fields(cls: type) -> dict[str, Any]:
    return {k: f for k, f in cls.model_fields.items() if _is_numeric(f.annotation)}


SPARSE_FIELDS = {m: _numeric_fields(METHODS[m]) for m in WINDOWED}
MODEL_FIELDS = _numeric_fields(GSAOnDeviceModelConfig)
LIST_KEYS = {"dense_layers", "top_k_ratio_per_layer", "top_k_index_reuse", "must_select_blocks", "copy_layers"}
DICT_KEYS = {"layer_sparse_ratio", "layer_repre_inner_token_merge"}


def test_the_fuzzed_keys_are_every_numeric_key() -> None:
    assert set(SPARSE_FIELDS["KVStarMultiStep"]) == {
        "init_window_sz",
        "local_window_sz",
        "sparse_ratio",
        "min_blocks",
        "retrieval_stride",
        "offload_margin_blocks",
        "dense_layers",
        "layer_sparse_ratio",
        "concurrency_threshold",
        "blk_repre_dim_prune_ratio",
        "blk_repre_inner_token_merge",
        "sticky_steps",
        "sticky_top",
        "bound_guard_top",
        "copy_layer_boost",
    }
    assert set(MODEL_FIELDS) == {
        "num_hidden_layers",
        "gpu_seq_len_threshold",
        "gpu_concurrency_threshold",
        "npu_seq_len_threshold",
        "npu_concurrency_threshold",
        "chunk_size",
        "head_dim",
        "hash_bits",
        "top_k_ratio_per_layer",
        "top_k_index_reuse",
        "must_select_blocks",
        "kv_lora_rank",
        "qk_rope_head_dim",
        "hash_bits_kv_lora",
        "hash_bits_qk_rope",
        "copy_layers",
    }


def _int(v: int) -> tuple[str, Any]:
    return str(v), v


# (JSON text, the same value in Python) pairs: the JSON text can hold integers Python's str()
# and int() refuse (past 4300 digits), so both are built from the digit count
_ints = (
    st.integers(-3, 20)
    | st.integers(-MAX_BLOCKS - 2, MAX_BLOCKS + 2)
    | st.integers(-(2**200), 2**200)
    | st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1])
).map(_int)
_huge = st.integers(1, 4400).map(lambda n: ("1" + "0" * n, 10**n)) | st.integers(1, 4400).map(
    lambda n: ("-" + "9" * n, -(10**n - 1))
)
_floats = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([5e-324, 1e-300, 0.5, 1.0, 1.0000000000000002, 0.0, -0.0, 1e308])
).map(lambda f: (json.dumps(f), f)) | st.sampled_from([("1e400", float("inf")), ("-1e999", float("-inf"))])
_bools = st.booleans().map(lambda b: (json.dumps(b), b))


def _edges(field: Any) -> st.SearchStrategy[tuple[str, Any]]:
    """Each bound of the key, and one past it."""
    values = set()
    for bound in _limits(field):
        if bound is not None:
            values |= {bound - 1, bound, bound + 1} if isinstance(bound, int) else {bound}
    return st.sampled_from(sorted(values)).map(lambda v: (json.dumps(v), v))


def _in_range(field: Any) -> st.SearchStrategy[tuple[str, Any]]:
    """Values the schema accepts (half of these still fail the tiny deployment's bounds)."""
    lo, hi = _limits(field)
    if "float" in str(field.annotation):
        return st.floats(min_value=lo or 0.0, max_value=hi or 1.0).map(lambda f: (json.dumps(f), f))
    lo, hi = int(lo if lo is not None else -16), int(hi if hi is not None else 16)
    return (st.integers(max(lo, -16), min(hi, 16)) | st.integers(lo, hi)).map(_int)


def _values(field: Any) -> st.SearchStrategy[tuple[str, Any]]:
    return _in_range(field) | _in_range(field) | _edges(field) | _ints | _huge | _floats | _bools


@st.composite
def _keys(draw: st.DrawFn, fields: dict[str, Any]) -> list[str]:
    """One to three distinct keys (a permutation's prefix: no draws thrown away as duplicates)."""
    return draw(st.permutations(sorted(fields)))[: draw(st.integers(1, 3))]


@st.composite
def _edit(draw: st.DrawFn, key: str, field: Any, base: Any) -> tuple[str, Any]:
    """A new value for `key`: a number of any kind; for a list, one element or a whole list."""
    if key in DICT_KEYS:  # {layer: value}: any numbers as its layers (JSON keys: strings) and values
        pairs = draw(st.lists(st.tuples(_ints | _edges(field), _floats | _ints | _bools), max_size=4))
        return _obj_text({t: v for (t, _), (v, _) in pairs}), {str(k): v for (_, k), (_, v) in pairs}
    if key not in LIST_KEYS:
        return draw(_values(field))
    items = [(json.dumps(v), v) for v in base] if isinstance(base, list) else []
    if items and draw(st.booleans()):
        items[draw(st.integers(0, len(items) - 1))] = draw(_values(field))
    else:
        items = draw(st.lists(_values(field), max_size=4))
    return "[" + ", ".join(t for t, _ in items) + "]", [v for _, v in items]


def _obj_text(pairs: dict[str, str]) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {t}" for k, t in pairs.items()) + "}"


def _names(exc: ConfigError, keys: list[str]) -> bool:
    text = str(exc)
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(k)}(?![A-Za-z_])", text) for k in keys)


FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(method=st.sampled_from(WINDOWED), data=st.data(), inline=st.booleans())
def test_fuzz_method_config_numbers(
    tmp_path_factory: pytest.TempPathFactory, method: str, data: st.DataObject, inline: bool
) -> None:
    """Any numbers in any numeric keys of ESA/GSA/KVStar: a ConfigError naming the source and a
    changed key, or a method that runs its first decode steps."""
    fields = SPARSE_FIELDS[method]
    keys = data.draw(_keys(fields), label="keys")
    texts: dict[str, str] = {}
    values: dict[str, Any] = {}
    if "offload_margin_blocks" in keys and data.draw(st.booleans(), label="offload"):
        texts["offload"], values["offload"] = "true", True
    for key in keys:
        texts[key], values[key] = data.draw(_edit(key, fields[key], None), label=key)
    if inline:
        source, ref = "inline", {SPARSE_KEY: {method: values}}
    else:
        path = write(
            tmp_path_factory.mktemp("fuzz"),
            "sparse.json",
            '{"' + SPARSE_KEY + '": {"' + method + '": ' + _obj_text(texts) + "}}",
        )
        source, ref = str(path), path
    try:
        cfg = parse_sparse_config(ref)
        check_against_model(
            cfg, max_model_len=MAX_LEN, block_size=BS, num_layers=LAYERS, source=source, prefix=SPARSE_KEY
        )
        built = build_sparse_method(cfg, gqa_shapes(num_blocks()), OPS, host_ops=OPS)
    except ConfigError as exc:
        assert exc.source == source, exc
        assert exc.key.startswith(f"{SPARSE_KEY}.{method}"), exc
        assert _names(exc, keys), exc
        event("rejected")
        return
    event("loads and decodes")
    decode_steps(built)


@FUZZ
@given(mla=st.booleans(), data=st.data(), inline=st.booleans())
def test_fuzz_model_config_numbers(
    tmp_path_factory: pytest.TempPathFactory, mla: bool, data: st.DataObject, inline: bool
) -> None:
    """Any numbers in any numeric keys of a GSA-on-device model JSON (and its per-layer lists):
    a ConfigError naming the file and a changed key, or a method that runs its first decode steps."""
    base = model_json(mla=mla)
    keys = data.draw(_keys(MODEL_FIELDS), label="keys")
    texts = {k: json.dumps(v) for k, v in base.items()}
    values = dict(base)
    for key in keys:
        texts[key], values[key] = data.draw(_edit(key, MODEL_FIELDS[key], base[key]), label=key)
    if inline:
        source, ref = "inline", values
    else:
        path = write(tmp_path_factory.mktemp("fuzz"), "tiny.json", _obj_text(texts))
        source, ref = str(path), path
    shapes = (mla_shapes if mla else gqa_shapes)(num_blocks())
    try:
        loaded = load_model_config(ref)
        check_against_model(
            GSAOnDeviceConfig(),
            max_model_len=MAX_LEN,
            block_size=BS,
            num_layers=LAYERS,
            head_dim=32,
            model_config=loaded,
        )
        built = build_sparse_method({"GSAOnDevice": {}}, shapes, OPS, model_config=loaded)
    except ConfigError as exc:
        assert exc.source == source, exc
        assert _names(exc, keys), exc
        event("rejected")
        return
    event("loads and decodes")
    decode_steps(built, mla=mla)
