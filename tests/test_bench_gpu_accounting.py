"""`bench_vllm_gpu.py`'s bookkeeping: joining device runs (`--merge`) and the side-cache bytes
its bandwidth bound counts per block."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (the cuda_ops fixture)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_vllm_gpu import (  # noqa: E402  (benchmarks is no package)
    QWEN3_4B,
    dense_baseline,
    merge_runs,
    short_label,
    side_bytes_per_block,
    step_ms_from_timestamps,
)

from ucm.methods import split_method_setting as split_setting  # noqa: E402

HEAD = {"device": "H200", "vllm": "0.26.0", "torch": "2.11", "model": "m", "cudagraph_mode": "FULL"}


def cell(method, ratio, ms, context=32768, batch=8):
    return {"method": method, "context": context, "batch": batch, "ratio": ratio, "decode_ms": ms}


def write(tmp_path, name, cells, **extra):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**HEAD, "command": name, "cells": cells, **extra}))
    return path


def test_a_cell_measured_twice_keeps_the_first_runs_and_says_which(tmp_path) -> None:
    new = write(tmp_path, "new", [cell("dense", 1.0, 20.0), cell("ESA", 0.1, 6.5)])
    old = write(tmp_path, "old", [cell("dense", 1.0, 21.0), cell("ESA", 0.1, 7.0), cell("ESA", 0.3, 10.0)])
    merged = merge_runs([new, old])
    got = {(c["method"], c["ratio"]): (c["decode_ms"], c["run"]) for c in merged["cells"]}
    assert got == {("dense", 1.0): (20.0, 0), ("ESA", 0.1): (6.5, 0), ("ESA", 0.3): (10.0, 1)}
    assert [r["command"] for r in merged["runs"]] == ["new", "old"]


def test_two_dense_engines_give_the_mean_baseline_and_their_spread() -> None:
    first = {"cells": [{**cell("dense", 1.0, 10.0), "first_tokens": [1, 2]}, cell("dense", 1.0, 5.0, batch=1)]}
    again = {"cells": [{**cell("dense", 1.0, 10.5), "first_tokens": [9]}, cell("dense", 1.0, 5.2, batch=1)]}
    base = dense_baseline([first, again])
    eight, one = base[(32768, 8)], base[(32768, 1)]
    assert eight["decode_ms"] == pytest.approx(10.25) and eight["runs_ms"] == [10.0, 10.5]
    assert eight["spread"] == pytest.approx(0.5 / 10.25)
    assert eight["first_tokens"] == [1, 2]  # the first engine's
    assert one["decode_ms"] == pytest.approx(5.1) and one["spread"] == pytest.approx(0.2 / 5.1)
    alone = dense_baseline([first])[(32768, 8)]
    assert alone["decode_ms"] == 10.0 and alone["spread"] is None


def test_runs_of_different_builds_are_refused(tmp_path) -> None:
    a = write(tmp_path, "a", [cell("dense", 1.0, 20.0)])
    b = tmp_path / "b.json"
    b.write_text(json.dumps({**HEAD, "vllm": "0.32.0", "command": "b", "cells": []}))
    with pytest.raises(ValueError, match="vllm"):
        merge_runs([a, b])


def test_side_bytes_are_the_cuda_layouts_group_sums_also_off_the_gpu(tmp_path) -> None:
    # ESA scores each block by the mean key of each group of 4 tokens (the default), which the CUDA
    # backend keeps as float8 sums: 128 / 4 groups x Hkv x D bytes per block of 128 tokens and
    # layer; whole blocks (one group of 128) stay float32. Counted with the CUDA backend's layouts
    # here too (TRITON_INTERPRET=1), as `--from-log` counts them off the GPU
    heads = QWEN3_4B["num_key_value_heads"] * QWEN3_4B["head_dim"]
    assert side_bytes_per_block("ESA:0.3", QWEN3_4B, tmp_path) == 32 * heads * 1
    assert side_bytes_per_block("ESA:0.3:blk_repre_inner_token_merge=128", QWEN3_4B, tmp_path) == heads * 4
    assert side_bytes_per_block("ESA:0.3:blk_repre_dtype=float32", QWEN3_4B, tmp_path) == 32 * heads * 4
    assert side_bytes_per_block("dense", QWEN3_4B, tmp_path) == 0


def test_kvstar_counts_only_the_channels_its_kernel_reads(cuda_ops) -> None:
    from ucm.sparse.base import ModelShapes
    from ucm.sparse.factory import build_sparse_method

    shapes = ModelShapes(2, 32, 8, 128, 128, 4, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = {"KVStarMultiStep": {"sparse_ratio": 0.3, "blk_repre_dim_prune_ratio": 0.5, "blk_repre_inner_token_merge": 4}}
    method = build_sparse_method(cfg, shapes, cuda_ops, host_scoring=False)
    try:
        # per KV head: 128 float32 |K| sums, then 64 kept channels x 32 merged keys in bfloat16
        assert method.scorer.read_bytes_per_block() == 8 * (128 * 4 + 64 * 32 * 2)
        # the side cache it holds is larger: every channel of the representations
        assert method.scorer.memory_bytes() / (2 * 4) > method.scorer.read_bytes_per_block()
    finally:
        method.close()


def engine_result(spec: dict, ms, stamps: bool = False, **fields) -> dict:
    """What `run_child` returns for `spec` (each engine needs a CUDA GPU and vLLM's CUDA build):
    every cell at `ms(batch)` ms a step (with `stamps`, 0.1 ms more by token timestamps), `fields`."""
    cells = [
        {
            "context": c,
            "batch": b,
            "decode_ms": ms(b),
            **({"decode_ms_timestamps": ms(b) + 0.1} if stamps else {}),
            "prefill_s": 1.0,
            "first_tokens": [7],
            **fields,
        }
        for c, b in spec["cells"]
    ]
    return {"setting": spec["setting"], "engine_start_s": 60.0, "hbm_bytes_per_s": 4.3e12, "cells": cells}


def test_a_run_with_dense_again_assembles_cells_against_the_mean(tmp_path, monkeypatch) -> None:
    """The run's bookkeeping end to end with the engines replaced by their results (each engine
    needs a CUDA GPU and vLLM's CUDA build): dense twice, ESA once, two cells."""
    import bench_vllm_gpu as bench

    steps = {"dense": {8: 12.0, 1: 5.0}, "ESA:0.3": {8: 8.0, 1: 5.1}, "dense (again)": {8: 12.6, 1: 5.3}}
    started = []

    def fake_engine(spec, log):
        label = "dense (again)" if spec["setting"] == "dense" and "dense" in started else spec["setting"]
        started.append(label)
        sparse = {"blocks_read": 0.31, "sparse_steps": 40} if label == "ESA:0.3" else {}
        return engine_result(spec, steps[label].__getitem__, stamps=True, **sparse)

    monkeypatch.setattr(bench, "run_child", fake_engine)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test device")
    argv = ["bench", "--contexts", "32768", "--batches", "1", "8", "--settings", "dense", "ESA:0.3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--dense-again", "--out", str(tmp_path), "--name", "run"])
    bench.main()
    assert started == ["dense", "ESA:0.3", "dense (again)"]
    result = json.loads((tmp_path / "run.json").read_text())
    cells = {(c["method"], c["batch"]): c for c in result["cells"]}
    assert set(cells) == {("dense", 1), ("dense", 8), ("ESA", 1), ("ESA", 8)}  # the second dense is no row
    esa8 = cells[("ESA", 8)]
    assert esa8["dense_ms"] == pytest.approx(12.3) and esa8["dense_ms_runs"] == [12.0, 12.6]
    assert esa8["engine_speedup"] == pytest.approx(12.3 / 8.0, abs=1e-3)
    assert esa8["dense_spread"] == pytest.approx(0.6 / 12.3)
    # the token-timestamp timing rides along: dense's mean over both engines, the method's own
    assert esa8["dense_ms_timestamps"] == pytest.approx(12.4) and esa8["decode_ms_timestamps"] == pytest.approx(8.1)
    assert esa8["engine_speedup_timestamps"] == pytest.approx(12.4 / 8.1, abs=1e-3)
    assert cells[("dense", 8)]["decode_ms"] == pytest.approx(12.3) and cells[("dense", 8)]["engine_speedup"] == 1.0
    assert cells[("ESA", 1)]["engine_speedup"] == pytest.approx(5.15 / 5.1, abs=1e-3)
    assert (tmp_path / "run.png").exists()


def test_decode_step_from_token_timestamps_of_a_real_engine(model_path) -> None:
    """vLLM's per-request stats (kept with `disable_log_stats=False`, as the benchmark's engines
    run) give each request's first and last token time; their gap over the tokens after the
    first is one decode step, shorter than the whole call per token and longer than zero."""
    import time

    from vllm import SamplingParams

    from tests.vllm_engine import make_llm, shutdown

    llm = make_llm(model_path, None, disable_log_stats=False)
    try:
        prompts = [{"prompt_token_ids": list(range(100 + i, 400 + i))} for i in range(3)]
        sp = SamplingParams(max_tokens=9, min_tokens=9, ignore_eos=True, temperature=0.0)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall_ms = (time.perf_counter() - t) * 1e3
        for o in outs:
            m = o.metrics
            assert m is not None and m.last_token_ts > m.first_token_ts > 0
        step = step_ms_from_timestamps(outs)
        assert step is not None and 0 < step < wall_ms / 8
        assert step_ms_from_timestamps(outs[:1]) == pytest.approx(
            (outs[0].metrics.last_token_ts - outs[0].metrics.first_token_ts) / 8 * 1e3
        )
    finally:
        shutdown(llm)
    quiet = make_llm(model_path, None, disable_log_stats=True)
    try:
        outs = quiet.generate(prompts, sp, use_tqdm=False)
        assert step_ms_from_timestamps(outs) is None  # no stats kept: no number made up
    finally:
        shutdown(quiet)


def test_a_qwen3_32b_run_uses_its_shape_json_and_cells(tmp_path, monkeypatch) -> None:
    """`--model qwen3-32b`: the engines get Qwen3-32B's shape in a folder named for it, GSA on
    device its shipped 64-layer JSON (layers 0, 1 and 63 dense there), the cells that fit one
    H200 by default, and the bound counts its 64 layers and untied LM head."""
    import bench_vllm_gpu as bench

    specs = []

    def fake_engine(spec, log):
        specs.append(spec)
        extra = bench.sparse_extra(spec["setting"], Path(spec["tmp"]), spec["shape"], spec["model_name"])
        if extra is not None:
            data = json.loads(Path(extra["ucm_sparse_config"]["GSAOnDevice"]["config_file"]).read_text())
            assert data["num_hidden_layers"] == 64 and data["model_name"] == "Qwen/Qwen3-32B"
            assert [i for i, r in enumerate(data["top_k_ratio_per_layer"]) if r >= 1] == [0, 1, 63]
        sparse = {"blocks_read": 0.33} if extra else {}
        return engine_result(spec, lambda b: 40.0 if extra is None else 25.0, **sparse)

    monkeypatch.setattr(bench, "run_child", fake_engine)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test device")
    argv = ["bench", "--model", "qwen3-32b", "--settings", "dense", "GSAOnDevice:0.3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path), "--name", "run32b"])
    bench.main()
    assert specs[0]["cells"] == [(32768, 1), (32768, 4), (131072, 1)]
    config = json.loads((Path(specs[0]["model"]) / "config.json").read_text())
    assert Path(specs[0]["model"]).name == "Qwen3-32B" and config["num_hidden_layers"] == 64
    result = json.loads((tmp_path / "run32b.json").read_text())
    assert result["model"].startswith("Qwen3-32B shape")
    dense4 = next(c for c in result["cells"] if c["method"] == "dense" and c["batch"] == 4)
    # 64 layers x 2 (K, V) x 8 KV heads x 128 x 2 bytes a token, and the ~64 GB of weights a step
    # reads (65.5 GB held: the untied embedding table is looked up, not read)
    kv = 4 * 32768 * 64 * 2 * 8 * 128 * 2
    assert dense4["bound_ms"] == pytest.approx((kv + bench.weight_bytes(bench.QWEN3_32B)) / 4.3e12 * 1e3, rel=1e-3)
    assert 63.5e9 < bench.weight_bytes(bench.QWEN3_32B) < 64.5e9


def test_cpu_bench_settings_carry_their_config_keys(tmp_path) -> None:
    """`bench_vllm_decode.py --methods ESA:blk_repre_inner_token_merge=null` runs whole-block ESA
    beside the default: the key reaches the connector config, parsed as JSON; a plain name keeps
    the method's demo settings."""
    from bench_vllm_decode import sparse_extra  # noqa: E402

    plain = sparse_extra("ESA", 0.3, tmp_path)["ucm_sparse_config"]["ESA"]
    whole = sparse_extra("ESA:blk_repre_inner_token_merge=null:min_blocks=2", 0.3, tmp_path)["ucm_sparse_config"]
    assert "blk_repre_inner_token_merge" not in plain and plain["sparse_ratio"] == 0.3
    assert whole["ESA"] == {**plain, "blk_repre_inner_token_merge": None, "min_blocks": 2}


def test_a_setting_splits_at_colons_outside_a_json_object() -> None:
    groups = 'layer_repre_inner_token_merge={"9":2,"12":2}'
    assert split_setting(f"ESA:0.3:blk_repre_inner_token_merge=null:{groups}") == [
        "ESA",
        "0.3",
        "blk_repre_inner_token_merge=null",
        groups,
    ]
    assert split_setting("GSA:0.1") == ["GSA", "0.1"]


def test_legend_labels_name_whole_blocks_and_count_the_finer_layers() -> None:
    label = short_label('ESA[blk_repre_inner_token_merge=null,layer_repre_inner_token_merge={"9": 2, "12": 1}]')
    assert label == "ESA[whole block,2 layers in groups of 1/2]"
    assert short_label("KVStarMultiStep") == "KVStarMultiStep"


def test_a_run_cut_short_keeps_the_engines_it_finished(tmp_path, monkeypatch) -> None:
    """The run's JSON is written after every engine: a device call's time limit that stops the
    third engine leaves the first two engines' cells on disk."""
    import bench_vllm_gpu as bench

    def fake_engine(spec, log):
        if spec["setting"] == "ESA:0.1":
            raise KeyboardInterrupt  # what the call's SIGTERM / timeout does to the run
        return engine_result(spec, lambda b: 12.0 if spec["setting"] == "dense" else 7.5, blocks_read=0.3)

    monkeypatch.setattr(bench, "run_child", fake_engine)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "test device")
    argv = ["bench", "--contexts", "32768", "--batches", "8", "--settings", "dense", "ESA:0.3", "ESA:0.1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path), "--name", "cut"])
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    result = json.loads((tmp_path / "cut.json").read_text())
    assert {(c["method"], c["ratio"]): c["engine_speedup"] for c in result["cells"]} == {
        ("dense", 1.0): 1.0,
        ("ESA", 0.3): pytest.approx(12.0 / 7.5, abs=1e-3),
    }
    assert (tmp_path / "cut.png").exists()


S24 = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "gpu_runs" / "2026-12-06_s24"


def test_a_runs_printed_cells_rebuild_its_json(tmp_path) -> None:
    """`--from-log`: a real H200 run's printed output (session 24, 32K x 8, six engines and plain
    vLLM again) rebuilds the JSON that run wrote: the same speedups, blocks read and bandwidth
    bounds (side bytes counted with the CUDA layouts off the GPU)."""
    import bench_vllm_gpu as bench

    run = S24 / "32k"
    written = json.loads((run / "vllm_gpu_32k.json").read_text())
    engines = bench.engines_from_log((run / "bench.log").read_text(), written["hbm_bytes_per_s"])
    assert list(engines) == [
        "dense",
        "ESA:0.3",
        "GSAOnDevice:0.3",
        "GSA:0.3",
        "KVStarMultiStep:0.3",
        "ESA:0.999",
        "dense (again)",
    ]
    header = {k: written[k] for k in ("device", "vllm", "torch", "model")}
    header.update(command="rebuilt", shape=QWEN3_4B, tmp=str(tmp_path), model_name="Qwen3-4B")
    rebuilt = bench.assemble_run(header, engines, {}, False)
    keys = ("method", "ratio", "batch", "dense_ms", "decode_ms", "engine_speedup", "blocks_read", "bound_ms")
    assert [[c[k] for k in keys] for c in rebuilt["cells"]] == [[c[k] for k in keys] for c in written["cells"]]
    assert all(c["same_first_tokens_as_dense"] is None and c["prefill_s"] is None for c in rebuilt["cells"])
    with pytest.raises(ValueError, match="no plain vLLM"):
        bench.engines_from_log("[ESA:0.3] 32768x8: 7.6 ms/step (7.6 by token timestamps) blocks read 0.3", 4e12)


def test_merging_a_merged_result_keeps_its_runs(tmp_path) -> None:
    new = write(tmp_path, "new", [cell("ESA", 0.3, 7.0)], commit="abc")
    old_a = write(tmp_path, "old_a", [cell("ESA", 0.3, 8.0), cell("ESA", 0.1, 6.0)])
    old_b = write(tmp_path, "old_b", [cell("Quest", 0.3, 9.0)])
    merged_old = tmp_path / "merged_old.json"
    merged_old.write_text(json.dumps(merge_runs([old_a, old_b])))
    merged = merge_runs([new, merged_old])
    assert [(r["command"], r["commit"]) for r in merged["runs"]] == [("new", "abc"), ("old_a", None), ("old_b", None)]
    got = {(c["method"], c["ratio"]): (c["decode_ms"], c["run"]) for c in merged["cells"]}
    assert got == {("ESA", 0.3): (7.0, 0), ("ESA", 0.1): (6.0, 1), ("Quest", 0.3): (9.0, 2)}
