"""Run ucm's selection kernels once each at the engine's shapes, for Nsight Compute to read.

The shapes are those of the engine cells whose per-layer selection costs what the
in-engine profiles show (Qwen3-4B shape, block 128): the top-k + table rewrite over 1025 and
257 table columns (128K x 4, 32K x 8), the dot scorer at 128K x 4, and KVStar's four scorer
kernels at 32K x 8. Every op runs once to compile, then once between
`torch.cuda.profiler.start()` / `stop()`, so that

    ncu --profile-from-start off --clock-control none --set full -o report \\
        python benchmarks/kernel_counters_gpu.py

profiles exactly one launch of each kernel (warmed, inputs as the tuner's). Without ncu it prints
each op's microseconds per call in a CUDA graph of 36 calls (one per layer), as the tuner does.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from tune_selection_gpu import BS, HKV, HQ, LAYERS, D, graph_us


def _inputs(b: int, ctx: int, seed: int = 0):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    m = math.ceil((ctx + 1) / BS)
    nb = b * m + 8
    table = torch.randperm(nb, device=dev, generator=g)[: b * m].view(b, m).to(torch.int32)
    lens = torch.full((b,), ctx + 1, dtype=torch.int32, device=dev)
    q = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
    return g, m, nb, table, lens, q


def ops_at_engine_shapes(ops) -> list[tuple[str, object]]:
    """(name, zero-argument call) per op, inputs allocated once."""
    calls = []
    for b, ctx, ratio in ((4, 131072, 0.1), (8, 32768, 0.3)):
        g, m, nb, table, lens, q = _inputs(b, ctx)
        scores = torch.randn(b, m, device=q.device, generator=g)
        k = torch.full((b,), math.ceil(m * ratio), dtype=torch.int64, device=q.device)
        kd = torch.full_like(k, m)
        must = torch.zeros(b, m, dtype=torch.bool, device=q.device)
        must[:, [0, m - 2, m - 1]] = True
        for label, budget in ((f"k={ratio}", k), ("dense rows", kd)):
            args = (scores, budget, must, table, lens, BS)
            calls.append((f"select_and_rewrite {b}x{m} {label}", lambda a=args: ops.select_and_rewrite(*a)))
        reps = torch.randn(nb, HKV, D, device=q.device, generator=g)
        args = (q, reps, table, lens, BS)
        calls.append((f"block_scores_dot {b}x{m}", lambda a=args: ops.block_scores_dot(*a)))
    g, m, nb, table, lens, q = _inputs(8, 32768)
    reps = torch.randn(nb, HKV, D, BS // 2, device=q.device, generator=g).to(torch.bfloat16)
    abs_sums = torch.rand(nb, HKV, D, device=q.device, generator=g)
    q4 = q[:, None]
    calls.append(
        (f"kvstar_block_mass 8x{m}", lambda: ops.kvstar_block_mass(q4, reps, abs_sums, table, lens, BS, 32, 0.0625))
    )
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", action="store_true", help="also time each op in a graph of 36 calls")
    ap.add_argument(
        "--kvstar-grid", action="store_true", help="time KVStar's scorer over warps x tiles per program x stages"
    )
    args = ap.parse_args()
    from ucm_backends.cuda.ops import CudaOps

    ops = CudaOps()
    calls = ops_at_engine_shapes(ops)
    for _, fn in calls:  # compile and warm
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _, fn in calls:
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    if args.time:
        for name, fn in calls:
            us = graph_us(lambda f=fn: [f() for _ in range(LAYERS)]) / LAYERS
            print(json.dumps({"op": name, "us_per_call_in_graph": round(us, 2)}), flush=True)
    if args.kvstar_grid:
        name, fn = calls[-1]
        for w in (4, 8):
            for tpp in (2, 4, 8, 16, 32):
                for stages in (1, 2, 3, 4, 5):
                    ops.kvstar_warps, ops.kvstar_tiles_per_prog, ops.kvstar_stages = w, tpp, stages
                    us = graph_us(lambda: [fn() for _ in range(LAYERS)]) / LAYERS
                    row = {"op": name, "warps": w, "tiles_per_prog": tpp, "stages": stages, "us": round(us, 2)}
                    print(json.dumps(row), flush=True)
        ops.kvstar_warps = ops.kvstar_tiles_per_prog = ops.kvstar_stages = None


if __name__ == "__main__":
    main()
