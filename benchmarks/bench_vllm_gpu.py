"""Decode speed of plain vLLM vs each ucm method inside real vLLM on the GPU, CUDA graphs on.

What it measures: one engine per setting (plain vLLM, then each method at each ratio), all in
one run on one GPU, each in its own process so memory is clean; a Qwen3-4B-shaped model
(`--model qwen3-32b`: Qwen3-32B's shape, 32K x 1 / 4 and 128K x 1 by default) with
dummy weights (`load_format="dummy"`: speed depends on shapes, not on weights), bf16, block 128,
prefix caching on, vLLM's FULL decode CUDA graphs (`cudagraph_mode` FULL_DECODE_ONLY, no
torch.compile, the same for every engine). For every cell (context, batch) the engine first
computes the prompts once (`max_tokens=1`), then times a 1-token and an (N+1)-token generate on
the now-cached prompts: their difference over N is the decode step (best of `--repeats`); vLLM's
per-request token timestamps give the same steps a second way (`decode_ms_timestamps`).

Per cell: decode ms/step, `engine_speedup` = plain vLLM's ms / the method's ms (same run),
blocks read (ucm's own counters over the decode steps: kept / held blocks, dense layers
included), and `fraction_of_bound`: the fewest bytes a decode step must move (KV of the blocks
read + the weights + the method's block representations or hash codes) at the HBM read
bandwidth measured in the same process, over the measured step.

    python benchmarks/bench_vllm_gpu.py                        # the issue's matrix
    python benchmarks/bench_vllm_gpu.py --contexts 32768 --batches 8 --settings dense ESA:0.3
    python benchmarks/bench_vllm_gpu.py --model qwen3-32b --name vllm_gpu_decode_qwen3_32b
Two engines doing the same work differ by a few percent within one run (session 11: up to ~4%
at batch 1): `--dense-again` runs plain vLLM once more after the methods, divides by the two
engines' mean and reports their spread per cell (`dense_ms_runs`, `dense_spread`).
Writes benchmarks/results/vllm_gpu_decode.json (+ .png); `--out DIR` writes there instead.
The 32K and 128K matrices fit one device call each; `--merge A.json B.json` joins such runs
(cells of each run keep their own run's dense baseline) into NAME.json + .png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# Qwen3-4B's shape (config.json of Qwen/Qwen3-4B), positions widened for 128K contexts
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 135168,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "use_cache": True,
}
# Qwen3-32B's shape (config.json of Qwen/Qwen3-32B), positions widened as above: 65.5 GB of bf16
# weights, 256 KB of KV a token, so on one H200 (0.8 of its memory) 32K x 4 and 128K x 1 fit
QWEN3_32B = {
    **QWEN3_4B,
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_hidden_layers": 64,
    "num_attention_heads": 64,
    "tie_word_embeddings": False,
}
# --model: (model folder name, shape, default batches at <= 32K, default batches above)
MODELS = {
    "qwen3-4b": ("Qwen3-4B", QWEN3_4B, [1, 8], [1, 4]),
    "qwen3-32b": ("Qwen3-32B", QWEN3_32B, [1, 4], [1]),
}
BLOCK = 128


def model_dir(shape: dict, root: Path, name: str = "Qwen3-4B") -> Path:
    """A model folder vLLM can load with dummy weights: config.json only. Its name matches
    ucm's built-in GSA-on-device config for that model."""
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(shape))
    return path


def weight_bytes(shape: dict, dtype_bytes: int = 2) -> int:
    """Bytes of weights a decode step reads: every layer's projections and MLP, the norms, the
    LM head (the embedding table when tied); the embedding lookup itself reads a few rows."""
    h, i, hd = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + 2 * hd
    return dtype_bytes * (shape["num_hidden_layers"] * per_layer + shape["vocab_size"] * h + h)


def side_bytes_per_block(
    setting: str, shape: dict, tmp: Path, block: int = BLOCK, model_name: str = "Qwen3-4B"
) -> float:
    """Bytes of block representations / codes the method reads per block and layer when it scores
    in the CUDA graph path (`BlockScorer.read_bytes_per_block`), from its scorer built for one
    block with the CUDA backend (its layouts: float8 group sums, KVStar's bfloat16 channel-major
    representations, Quest's bfloat16 bounds): on the GPU, or off it under `TRITON_INTERPRET=1` (the same layouts, as
    `--from-log` runs it); else with the reference backend."""
    extra = sparse_extra(setting, tmp, shape, model_name)
    if extra is None:
        return 0
    import torch

    from ucm.ops import get_ops
    from ucm.sparse.base import ModelShapes
    from ucm.sparse.factory import build_sparse_method

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    layers = shape["num_hidden_layers"]
    shapes = ModelShapes(
        layers,
        shape["num_attention_heads"],
        shape["num_key_value_heads"],
        shape["head_dim"],
        block,
        1,
        device,
        key_dtype=torch.bfloat16,  # the engines' KV cache (Quest's bounds are kept in it)
    )
    if on_gpu:
        ops = get_ops("cuda")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        from ucm_backends.cuda.ops import CudaOps

        ops = CudaOps()
    else:
        ops = get_ops("reference")
    method = build_sparse_method(extra, shapes, ops, host_ops=get_ops("reference"), host_scoring=False)
    try:
        return method.scorer.read_bytes_per_block()
    finally:
        method.close()


def sparse_extra(setting: str, tmp: Path, shape: dict = QWEN3_4B, model_name: str = "Qwen3-4B") -> dict | None:
    """The connector's extra config for a setting "dense" | "METHOD:RATIO"; methods with a model
    JSON (GSA on device) take the shipped one of `model_name`."""
    from ucm.methods import get_method, method_key_values, split_method_setting

    if setting == "dense":
        return None
    method, ratio, *overrides = split_method_setting(setting)  # METHOD:RATIO[:key=value...]
    ratio = float(ratio)
    keys = method_key_values(overrides)
    if get_method(method).model_json:  # the model's shipped JSON with its sparse layers at `ratio`
        from ucm.config.loader import find_model_config
        from ucm.sparse.gsa_on_device import ratios_with_mean

        data = json.loads(Path(find_model_config(model_name)).read_text())
        layers = shape["num_hidden_layers"]
        if layers != data["num_hidden_layers"]:  # another depth: its first and last layers dense
            data.update(
                num_hidden_layers=layers,
                head_dim=shape["head_dim"],
                top_k_index_reuse=[-1] * layers,
                top_k_ratio_per_layer=[1 if i in (0, layers - 1) else ratio for i in range(layers)],
            )
        data["top_k_ratio_per_layer"] = ratios_with_mean(data["top_k_ratio_per_layer"], None, ratio)
        if "concurrency_threshold" in keys:
            data["gpu_concurrency_threshold"] = keys["concurrency_threshold"]
        path = tmp / f"{method.lower()}_{layers}_{ratio}_{data['gpu_concurrency_threshold']}.json"
        path.write_text(json.dumps(data))
        return {"ucm_sparse_config": {method: {"config_file": str(path)}}}
    return {"ucm_sparse_config": {method: {"sparse_ratio": ratio, "retrieval_stride": 1, **keys}}}


def engine_kwargs(
    model: Path,
    extra: dict | None,
    max_model_len: int,
    max_batch: int,
    *,
    graphs: bool = True,
    capture_sizes: list[int] | None = None,
    mem: float = 0.80,
) -> dict:
    kw = dict(
        model=str(model),
        load_format="dummy",
        skip_tokenizer_init=True,
        dtype="bfloat16",
        block_size=BLOCK,
        max_model_len=max_model_len,
        max_num_seqs=max(max_batch, 1),
        max_num_batched_tokens=32768,
        enable_prefix_caching=True,
        gpu_memory_utilization=mem,
        seed=0,
        disable_log_stats=False,  # per-request stats: the token timestamps `step_ms_from_timestamps` reads
    )
    if graphs:
        kw["compilation_config"] = {
            "mode": 0,
            "cudagraph_mode": "FULL_DECODE_ONLY",
            "cudagraph_capture_sizes": capture_sizes or sorted({1, 2, 4, 8, max_batch}),
        }
    else:
        kw["enforce_eager"] = True
    if extra is not None:
        from vllm.config import KVTransferConfig

        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="UCMConnector",
            kv_connector_module_path="ucm.integration.vllm.connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    return kw


def prompts_for(context: int, batch: int, seed: int, vocab: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [
        {"prompt_token_ids": torch.randint(100, vocab - 100, (context,), generator=g).tolist()} for _ in range(batch)
    ]


def hbm_read_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy (bytes read + bytes written), median of 5."""
    import torch

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n / sorted(times[1:])[2]


def ucm_counters() -> dict | None:
    from ucm.integration.vllm.connector import find_runtime

    rt = find_runtime()
    return rt.snapshot() if rt is not None and rt.method is not None else None


def step_ms_from_timestamps(outputs) -> float | None:
    """Decode ms per step from vLLM's own per-request stats: (last - first token's engine-core
    timestamp) / (tokens - 1), the median over the requests of one generate call. It counts decode
    steps only (the first token's prefill is before the first timestamp), without the difference
    of two timed calls. None where the engine kept no stats."""
    per = []
    for o in outputs:
        m = getattr(o, "metrics", None)
        n = len(o.outputs[0].token_ids)
        if m is None or n < 2 or not getattr(m, "last_token_ts", 0.0):
            continue
        per.append((m.last_token_ts - m.first_token_ts) / (n - 1))
    return 1e3 * statistics.median(per) if per else None


def engine_async_scheduling(llm) -> bool | None:
    """Whether the engine overlaps scheduling with the GPU step (vLLM decides at start)."""
    config = getattr(getattr(llm, "llm_engine", None), "vllm_config", None)
    return None if config is None else bool(config.scheduler_config.async_scheduling)


def run_engine(spec: dict) -> dict:
    """One engine, every cell of `spec`: decode ms per cell and ucm's blocks read (in-process)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    tmp = Path(spec["tmp"])
    shape = spec["shape"]
    extra = sparse_extra(spec["setting"], tmp, shape, spec["model_name"])
    max_batch = max(b for _, b in spec["cells"])
    max_len = max(c for c, _ in spec["cells"]) + spec["new_tokens"] + 2 * BLOCK
    t0 = time.perf_counter()
    mem = spec.get("gpu_memory_utilization", 0.80)
    llm = LLM(**engine_kwargs(Path(spec["model"]), extra, max_len, max_batch, mem=mem))
    start_s = time.perf_counter() - t0
    bw = hbm_read_bandwidth()
    n = spec["new_tokens"]
    out = {
        "setting": spec["setting"],
        "engine_start_s": round(start_s, 1),
        "hbm_bytes_per_s": bw,
        "cells": [],
        "async_scheduling": engine_async_scheduling(llm),
    }

    def gen(prompts, tokens):
        sp = SamplingParams(max_tokens=tokens, min_tokens=tokens, ignore_eos=True, temperature=0.0, detokenize=False)
        t = time.perf_counter()
        res = llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t, res

    for context, batch in spec["cells"]:
        # the cells of one context share prompts (a smaller batch takes the first ones, cached)
        prompts = prompts_for(context, max_batch, seed=context, vocab=shape["vocab_size"])[:batch]
        t_fill, _ = gen(prompts, 1)  # computes the prompts into the prefix cache
        gen(prompts, 1)  # a first call on cached prompts compiles its own kernels: not timed
        best1 = min(gen(prompts, 1)[0] for _ in range(spec["repeats"]))
        before = ucm_counters()
        runs = [gen(prompts, n + 1) for _ in range(spec["repeats"])]
        after = ucm_counters()
        bestn = min(t for t, _ in runs)
        tokens = [list(o.outputs[0].token_ids) for o in runs[0][1]]
        cell = {
            "context": context,
            "batch": batch,
            "prefill_s": round(t_fill, 2),
            "decode_ms": round((bestn - best1) / n * 1e3, 3),
            # the same steps from the engine's token timestamps (best of the repeats), a check on
            # the difference of two calls' wall times above
            "decode_ms_timestamps": min(
                (round(ms, 3) for ms in map(step_ms_from_timestamps, (res for _, res in runs)) if ms is not None),
                default=None,
            ),
            "first_tokens": [t[:8] for t in tokens],
        }
        if before is not None and after is not None:
            kept = sum(after["kept"]) - sum(before["kept"])
            total = sum(after["total"]) - sum(before["total"])
            cell["blocks_read"] = round(kept / total, 4) if total else None
            cell["sparse_steps"] = after["sparse_steps"] - before["sparse_steps"]
        out["cells"].append(cell)
        print(
            f"[{spec['setting']}] {context}x{batch}: {cell['decode_ms']} ms/step "
            f"({cell['decode_ms_timestamps']} by token timestamps) "
            f"blocks read {cell.get('blocks_read', 1.0)}",
            flush=True,
        )
    if spec.get("profile"):
        out["profile"] = profile_decode(gen, prompts, spec["profile"], Path(spec["profile_out"]))
    return out


def kernel_times(gen, prompts, tokens: int) -> dict[str, tuple[float, int]]:
    """Device time (us) and launches per kernel of one `gen(prompts, tokens)` call (kernels inside
    CUDA graphs included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        gen(prompts, tokens)
    return {e.key: (e.self_device_time_total, e.count) for e in prof.key_averages() if e.self_device_time_total > 0}


def profile_decode(gen, prompts, steps: int, path: Path) -> dict:
    """Device time per kernel and decode step over `steps` decode steps of the last cell: the
    profile of a call of `steps` + 1 tokens minus that of a 1-token call (the prefill of the
    prompts' uncached last block, which writes whole blocks through the prefill paths), so each
    line is decode work only. The table goes to `path`, the per-step totals come back."""
    gen(prompts, 1)
    prefill = kernel_times(gen, prompts, 1)
    full = kernel_times(gen, prompts, steps + 1)
    rows = []
    for key, (us, count) in full.items():
        p_us, p_count = prefill.get(key, (0.0, 0))
        if us - p_us > 0:
            rows.append((key, (us - p_us) / steps, (count - p_count) / steps))
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    lines = [f"{'us/step':>9} {'calls/step':>10} {'share':>6}  kernel"]
    for key, us, calls in rows[:40]:
        lines.append(f"{us:9.1f} {calls:10.1f} {us / total:6.1%}  {key[:150]}")
    import cProfile
    import io
    import pstats

    host = cProfile.Profile()
    t0 = time.perf_counter()
    host.enable()
    gen(prompts, steps + 1)
    host.disable()
    wall = time.perf_counter() - t0
    text = io.StringIO()
    stats = pstats.Stats(host, stream=text)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats("ucm", 25)
    path.write_text(
        "\n".join(lines) + f"\ntotal device time per decode step: {total / 1e3:.3f} ms "
        f"(a 1-token call's kernels subtracted: decode steps only)\n"
        f"host, under cProfile: {wall / steps * 1e3:.3f} ms per step\n" + text.getvalue()
    )
    return {
        "device_ms_per_step": round(total / 1e3, 3),
        "kernels_per_step": round(sum(r[2] for r in rows), 1),
    }


def run_child(spec: dict, log: Path) -> dict:
    """`run_engine` in a fresh process (clean GPU memory between engines)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    with open(log, "a") as lf:
        lf.write(f"\n===== {spec['setting']} =====\n")
        lf.flush()
        proc = subprocess.run(
            [sys.executable, __file__, "--child", f.name],
            stdout=subprocess.PIPE,
            stderr=lf,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    lines = proc.stdout.strip().splitlines()
    for line in lines[:-1]:
        print(line, flush=True)
    if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"engine {spec['setting']} failed (exit {proc.returncode}); log tail:\n{tail}")
    return json.loads(lines[-1])


def dense_baseline(runs: list[dict]) -> dict[tuple[int, int], dict]:
    """Per cell (context, batch), plain vLLM's step from one or more dense engines of the run:
    the mean of their decode ms (the baseline every speedup divides), each engine's ms, and the
    spread (max - min) / mean, which is how far two engines doing the same work differ in this
    run. First tokens are the first engine's."""
    out: dict[tuple[int, int], dict] = {}
    for run in runs:
        for c in run["cells"]:
            key = (c["context"], c["batch"])
            cell = out.setdefault(key, {**c, "runs_ms": [], "runs_ms_timestamps": []})
            cell["runs_ms"].append(c["decode_ms"])
            if c.get("decode_ms_timestamps") is not None:
                cell["runs_ms_timestamps"].append(c["decode_ms_timestamps"])
    for cell in out.values():
        ms, ts = cell["runs_ms"], cell["runs_ms_timestamps"]
        cell["decode_ms"] = sum(ms) / len(ms)
        cell["spread"] = (max(ms) - min(ms)) / cell["decode_ms"] if len(ms) > 1 else None
        cell["decode_ms_timestamps"] = sum(ts) / len(ts) if len(ts) == len(ms) else None
    return out


def bound_ms(
    setting: str, shape: dict, context: int, batch: int, blocks_read: float, bw: float, tmp: Path, model_name: str
) -> float:
    layers, hkv, hd = shape["num_hidden_layers"], shape["num_key_value_heads"], shape["head_dim"]
    kv_dense = batch * context * layers * 2 * hkv * hd * 2
    blocks = batch * layers * math.ceil(context / BLOCK)
    side = side_bytes_per_block(setting, shape, tmp, model_name=model_name)
    nbytes = kv_dense * blocks_read + weight_bytes(shape) + blocks * side
    return nbytes / bw * 1e3


def short_label(method: str) -> str:
    """A legend label: `blk_repre_inner_token_merge=null` as "whole block", a per-layer group
    map as "N layers in groups of G" (its layer list is in the JSON)."""

    def layers(m: re.Match) -> str:
        sizes = json.loads(m.group(1)).values()
        return f"{len(sizes)} layers in groups of {'/'.join(str(g) for g in sorted(set(sizes)))}"

    label = method.replace("blk_repre_inner_token_merge=null", "whole block")
    return re.sub(r"layer_repre_inner_token_merge=(\{[^}]*\})", layers, label)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if c["method"] != "dense"]
    keys = sorted({(c["context"], c["batch"]) for c in cells})
    series = sorted({(c["method"], c["ratio"]) for c in cells})
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(keys)) + 4, 4.2))
    width = 0.8 / max(len(series), 1)
    # one colour per series (tab20 before repeating; past 20, hatched)
    colours = plt.get_cmap("tab20").colors
    for i, (m, r) in enumerate(series):
        xs, ys = [], []
        for j, key in enumerate(keys):
            got = [c for c in cells if (c["context"], c["batch"]) == key and (c["method"], c["ratio"]) == (m, r)]
            if got:
                xs.append(j + (i - (len(series) - 1) / 2) * width)
                ys.append(got[0]["engine_speedup"])
        hatch = "//" if i >= len(colours) else None
        ax.bar(xs, ys, width, label=f"{short_label(m)} {r}", color=colours[i % len(colours)], hatch=hatch)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(keys)), [f"{c // 1024}K x{b}" for c, b in keys])
    ax.set_ylabel("decode speedup vs plain vLLM (same run)")
    ax.set_title(f"ucm inside vLLM {result['vllm']} on {result['device']}, CUDA graphs")
    if series:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


#: what `run_engine` prints per cell (and the run's log keeps): `--from-log` reads it back
CELL_LINE = re.compile(
    r"^\[(?P<setting>[^\]]+)\] (?P<context>\d+)x(?P<batch>\d+): (?P<ms>[\d.]+) ms/step "
    r"\((?P<ts>[\d.]+|None) by token timestamps\) blocks read (?P<read>[\d.]+|None)$"
)


def engines_from_log(text: str, bandwidth: float) -> dict[str, dict]:
    """The engines of a run that was cut before it wrote its JSON (a device call's time limit),
    rebuilt from the cell lines its output kept; what those lines do not carry (prefill time,
    first tokens, sparse steps) stays None, and every engine gets `bandwidth` (bytes/s: measured
    by another run on the same machine) for the bound. A setting seen twice is `dense (again)`."""
    engines: dict[str, dict] = {}
    seen_cells: dict[str, set] = {}
    for line in text.splitlines():
        m = CELL_LINE.match(line.strip())
        if m is None:
            continue
        setting, key = m["setting"], (int(m["context"]), int(m["batch"]))
        label = setting if key not in seen_cells.get(setting, set()) else f"{setting} (again)"
        seen_cells.setdefault(label, set()).add(key)
        eng = engines.setdefault(label, {"cells": [], "hbm_bytes_per_s": bandwidth, "engine_start_s": None})
        eng["cells"].append(
            {
                "context": key[0],
                "batch": key[1],
                "decode_ms": float(m["ms"]),
                "decode_ms_timestamps": None if m["ts"] == "None" else float(m["ts"]),
                "blocks_read": None if m["read"] == "None" else float(m["read"]),
                "prefill_s": None,
                "first_tokens": None,
                "sparse_steps": None,
            }
        )
    if not any(label.split(" ")[0] == "dense" for label in engines):
        raise ValueError("the log has no plain vLLM (dense) cell lines: nothing to compare against")
    return engines


def assemble_run(header: dict, engines: dict[str, dict], failed: dict[str, str], profile: bool) -> dict:
    """The run's JSON from the engines done so far (written after every engine, so a run cut
    short keeps what it measured). `header`: device, vllm, torch, command, model, commit,
    gpu_memory_utilization, new_tokens, cuda_tuned, and shape / tmp / model_name (for the bound,
    not written)."""
    from ucm.methods import split_method_setting

    shape, tmp, name = header["shape"], Path(header["tmp"]), header["model_name"]
    dense = dense_baseline([e for s, e in engines.items() if s.split(" ")[0] == "dense"])
    bw = sorted(e["hbm_bytes_per_s"] for e in engines.values())[len(engines) // 2]
    result = {
        **{k: v for k, v in header.items() if k not in ("shape", "tmp", "model_name")},
        "hbm_bytes_per_s": round(bw),
        "cudagraph_mode": "FULL_DECODE_ONLY",
        "engine_start_s": {s: e["engine_start_s"] for s, e in engines.items()},
        "async_scheduling": {s: e.get("async_scheduling") for s, e in engines.items()},
        "failed": failed,
        "cells": [],
    }
    if profile:
        result["profile"] = {s: e.get("profile") for s, e in engines.items()}
    for setting, eng in engines.items():
        if setting.endswith(" (again)"):
            continue  # its steps are in the dense cells' `dense_ms_runs`
        parts = split_method_setting(setting)
        method, ratio = (setting, 1.0) if setting == "dense" else (parts[0], float(parts[1]))
        if len(parts) > 2:
            method += "[" + ",".join(parts[2:]) + "]"
        for c in eng["cells"]:
            d = dense.get((c["context"], c["batch"]))
            if d is None:
                continue  # plain vLLM did not reach this cell
            read = c.get("blocks_read") if method != "dense" else 1.0
            read = 1.0 if read is None else read
            ms = d["decode_ms"] if method == "dense" else c["decode_ms"]
            ts = d["decode_ms_timestamps"] if method == "dense" else c.get("decode_ms_timestamps")
            dts = d["decode_ms_timestamps"]
            bound = bound_ms(setting, shape, c["context"], c["batch"], read, bw, tmp, name)
            tokens = c["first_tokens"], d["first_tokens"]
            same = None if None in tokens else tokens[0] == tokens[1]
            result["cells"].append(
                {
                    "method": method,
                    "context": c["context"],
                    "batch": c["batch"],
                    "ratio": ratio,
                    "cuda_graphs": True,
                    "dense_ms": d["decode_ms"],
                    "dense_ms_runs": d["runs_ms"],
                    "dense_spread": d["spread"],
                    "decode_ms": ms,
                    "engine_speedup": round(d["decode_ms"] / ms, 3),
                    # the same steps timed from vLLM's per-request token timestamps (a check)
                    "dense_ms_timestamps": dts,
                    "decode_ms_timestamps": ts,
                    "engine_speedup_timestamps": round(dts / ts, 3) if ts and dts else None,
                    "blocks_read": read,
                    "fraction_of_bound": round(bound / ms, 3),
                    "bound_ms": round(bound, 3),
                    "sparse_steps": c.get("sparse_steps"),
                    "prefill_s": c["prefill_s"],
                    "same_first_tokens_as_dense": same,
                }
            )
    return result


def checkout_commit(where: Path = HERE) -> str | None:
    """The commit of the checkout the run measures (None outside a git checkout). `UCM_COMMIT`
    overrides it: the device machine's copy of a checkout may carry older git metadata than its
    files (seen in session 31: the files of the session's last commit, HEAD at its first)."""
    if os.environ.get("UCM_COMMIT"):
        return os.environ["UCM_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def write_run(result: dict, out_dir: Path, name: str) -> Path:
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out_dir / f"{name}.png")
    return path


def merge_runs(paths: list[Path]) -> dict:
    """One result from several runs of this script on the same device and builds; each cell's
    speedup stays the one measured against the dense engine of its own run, and a cell that
    several runs measured is the first run's (list the newest run first). An input that is itself
    a merge contributes its own runs, its cells still pointing at theirs."""
    inputs = [json.loads(Path(p).read_text()) for p in paths]
    first = inputs[0]
    for r in inputs[1:]:
        for key in ("device", "vllm", "torch", "model", "cudagraph_mode"):
            if r.get(key) != first.get(key):
                raise ValueError(f"cannot merge runs with different {key}: {first.get(key)!r} vs {r.get(key)!r}")
    merged = {
        k: v for k, v in first.items() if k not in ("cells", "command", "engine_start_s", "async_scheduling", "runs")
    }
    runs: list[dict] = []
    cells, seen = [], set()  # a cell measured by several runs keeps the first run's; `run` indexes `runs`
    for r in inputs:
        offset = len(runs)
        runs.extend(
            r["runs"]
            if "runs" in r
            else [
                {
                    "command": r["command"],
                    "commit": r.get("commit"),
                    "hbm_bytes_per_s": r.get("hbm_bytes_per_s"),
                    "new_tokens": r.get("new_tokens"),
                    "engine_start_s": r.get("engine_start_s"),
                    "async_scheduling": r.get("async_scheduling"),
                }
            ]
        )
        for c in r["cells"]:
            key = (c["method"], c["context"], c["batch"], c["ratio"])
            if key not in seen:
                seen.add(key)
                cells.append({**c, "run": offset + c.get("run", 0)})
    merged["command"] = " && ".join(run["command"] for run in runs)
    merged["runs"] = runs
    merged["cells"] = cells
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child")
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen3-4b", help="the model shape (dummy weights)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=None,
        help="default: 1 and 8 at 32K, 1 and 4 at 128K (qwen3-32b: 1 and 4 at 32K, 1 at 128K)",
    )
    ap.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help="dense | METHOD:RATIO[:key=value...] (default: dense, then every registered method at 0.3 and 0.1)",
    )
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="vllm_gpu_decode")
    ap.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile STEPS decode steps of the last cell per engine: kernel table to "
        "OUT/NAME_profile_SETTING.txt",
    )
    ap.add_argument("--merge", nargs="+", metavar="RUN_JSON", help="join earlier runs' JSON into OUT/NAME.json")
    ap.add_argument(
        "--from-log",
        metavar="LOG",
        help="rebuild OUT/NAME.json from the cell lines of a run cut before it wrote its JSON (its printed "
        "output, e.g. gpu_session.sh's bench.log); needs --like",
    )
    ap.add_argument(
        "--like",
        metavar="RUN_JSON",
        help="with --from-log: a run of the same machine whose device, versions and measured bandwidth apply",
    )
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.80,
        help="vLLM's share of GPU memory (the rest holds ucm's side caches: sub-block representations need "
        "more than whole blocks, docs/vllm.md)",
    )
    ap.add_argument(
        "--dense-again",
        action="store_true",
        help="run plain vLLM a second time after the methods: the baseline is the two engines' mean, "
        "and each cell reports how far they differ (engine-to-engine noise of this run)",
    )
    args = ap.parse_args()
    if args.merge:
        merged = merge_runs([Path(p) for p in args.merge])
        out = Path(args.out) / f"{args.name}.json"
        out.write_text(json.dumps(merged, indent=1) + "\n")
        plot(merged, out.with_suffix(".png"))
        print(f"wrote {out}")
        return
    if args.from_log:
        if not args.like:
            ap.error("--from-log needs --like RUN_JSON (a run of the same machine)")
        os.environ["TRITON_INTERPRET"] = "1"  # the CUDA backend's side-cache layouts, off the GPU
        like = json.loads(Path(args.like).read_text())
        name, shape = MODELS[args.model][:2]
        tmp = Path(tempfile.mkdtemp(prefix="ucm-bench-gpu-"))
        header = {k: like[k] for k in ("device", "vllm", "torch", "model", "cuda_tuned") if k in like}
        commit_file = Path(args.from_log).with_name("commit.txt")  # gpu_session.sh writes it beside the log
        header["commit"] = commit_file.read_text().strip() if commit_file.exists() else None
        header.update(
            command=f"rebuilt from the cell lines of {Path(args.from_log).name} (the run was cut before writing "
            f"its JSON); bandwidth, device and versions: {Path(args.like).name}",
            gpu_memory_utilization=None,
            new_tokens=None,
            shape=shape,
            tmp=str(tmp),
            model_name=name,
        )
        engines = engines_from_log(Path(args.from_log).read_text(), like["hbm_bytes_per_s"])
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_run(assemble_run(header, engines, {}, False), out_dir, args.name)}")
        return
    if args.child:
        print(json.dumps(run_engine(json.loads(Path(args.child).read_text()))), flush=True)
        return
    import torch
    import vllm

    from ucm.methods import method_names

    settings = args.settings or ["dense", *(f"{m}:{r}" for m in method_names() for r in (0.3, 0.1))]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ucm-bench-gpu-"))
    name, shape, short_batches, long_batches = MODELS[args.model]
    model = model_dir(shape, tmp, name)
    cells = [(c, b) for c in args.contexts for b in (args.batches or (short_batches if c <= 32768 else long_batches))]
    log = out_dir / f"{args.name}.log"
    log.write_text("")
    engines = {}
    failed: dict[str, str] = {}  # setting -> why its engine did not run
    from ucm_backends.cuda.tuned import load_tuned

    device = torch.cuda.get_device_name()
    tuned = load_tuned(device)  # the grouped scorer's launch settings the engines run with
    header = {
        "device": device,
        "vllm": vllm.__version__,
        "torch": torch.__version__,
        "command": "python benchmarks/bench_vllm_gpu.py " + " ".join(sys.argv[1:]),
        "model": f"{name} shape, dummy weights, bf16, block 128",
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "new_tokens": args.new_tokens,
        "cuda_tuned": tuned.model_dump() if tuned is not None else None,
        "commit": checkout_commit(),
        "shape": shape,
        "tmp": str(tmp),
        "model_name": name,
    }
    dense_again = ["dense"] if args.dense_again else []
    for setting in [*settings, *dense_again]:
        label = setting if setting not in engines else f"{setting} (again)"
        spec = {
            "setting": setting,
            "tmp": str(tmp),
            "model": str(model),
            "shape": shape,
            "model_name": name,
            "cells": cells,
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "profile": args.profile,
            "gpu_memory_utilization": args.gpu_memory_utilization,
            "profile_out": str(out_dir / f"{args.name}_profile_{re.sub(r'[^A-Za-z0-9_.-]', '_', setting)}.txt"),
        }
        if label != setting:
            spec["profile"] = 0
        try:
            engines[label] = run_child(spec, log)
        except RuntimeError as e:  # one engine that cannot start (e.g. its side caches do not fit) ends no run
            if label.split(" ")[0] == "dense":
                raise
            failed[label] = str(e).splitlines()[-1][-500:]
            print(f"[{label}] failed: {failed[label]}", flush=True)
        if any(s.split(" ")[0] == "dense" for s in engines):
            result = assemble_run(header, engines, failed, bool(args.profile))
            path = write_run(result, out_dir, args.name)
    print(
        f"{'method':<16}{'ratio':>6}{'ctx':>8}{'batch':>6}{'dense ms':>10}{'ms':>9}{'speedup':>9}{'read':>7}"
        f"{'of bound':>9}"
    )
    for c in result["cells"]:
        print(
            f"{c['method']:<16}{c['ratio']:>6}{c['context']:>8}{c['batch']:>6}{c['dense_ms']:>10.2f}"
            f"{c['decode_ms']:>9.2f}{c['engine_speedup']:>9.2f}{c['blocks_read']:>7.3f}"
            f"{c['fraction_of_bound']:>9.2f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
