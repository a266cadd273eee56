"""What the issue-#20 selection variants cost: time of one layer's selection (`SparseMethod.select`:
scoring, top-k, block-table rewrite) for ESA and Quest with the default (groups of 4 tokens,
`kv_head_combine="sum"`, no sticky keep), whole-block and other group sizes
(`blk_repre_inner_token_merge`), `kv_head_combine="rank"`, `sticky_steps=8, sticky_top=2` and
`bound_guard_top=8` (the guard's own key writes are not timed: they run as keys are written), on
one backend, at a few context lengths, batch 1 and 4, ratio 0.3, with each setting's side-cache
bytes per block and layer. Blocks read are the same for all of them (the variants work inside
the budget); the script checks that too.

    OMP_NUM_THREADS=1 python benchmarks/bench_selection_variants.py --out benchmarks/results/selection_variants.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ucm.ops import get_ops
from ucm.sparse.base import ModelShapes
from ucm.sparse.factory import build_sparse_method

VARIANTS = {
    "default": {},
    "blk_repre_inner_token_merge=32 (whole block)": {"blk_repre_inner_token_merge": None},
    "blk_repre_inner_token_merge=2": {"blk_repre_inner_token_merge": 2},
    "blk_repre_inner_token_merge=8": {"blk_repre_inner_token_merge": 8},
    "kv_head_combine=rank": {"kv_head_combine": "rank"},
    "sticky_steps=8,sticky_top=2": {"sticky_steps": 8, "sticky_top": 2},
    "bound_guard_top=8": {"bound_guard_top": 8},
}


def bench(method: str, variant: dict, tokens: int, batch: int, shapes_kw: dict, ops, repeats: int) -> dict:
    bs = 32
    n_blocks = tokens // bs
    shapes = ModelShapes(num_layers=1, block_size=bs, num_blocks=n_blocks * batch + 1, **shapes_kw)
    cfg = {method: {"sparse_ratio": 0.3, "retrieval_stride": 1, **variant}}
    m = build_sparse_method(cfg, shapes, ops, host_ops=ops)
    g = torch.Generator().manual_seed(0)
    table = torch.arange(n_blocks * batch, dtype=torch.int32).view(batch, n_blocks)
    lens = torch.full((batch,), tokens, dtype=torch.int32)
    hkv, d = shapes_kw["num_kv_heads"], shapes_kw["head_dim"]
    keys = torch.randn(n_blocks * batch * bs, hkv, d, generator=g)
    m.on_kv_written(0, keys, torch.arange(keys.shape[0]))
    rids = [f"r{i}" for i in range(batch)]
    times, kept = [], []
    for _ in range(repeats + 3):
        q = torch.randn(batch, shapes_kw["num_q_heads"], d, generator=g)
        plan = m.begin_step(rids, lens, table)
        t0 = time.perf_counter()
        sel = m.select(0, q, plan)
        times.append(time.perf_counter() - t0)
        kept.append(int(sel.blocks_kept.sum()))
        m.end_step(plan)
    side = m.scorer.memory_bytes() + (m.bound_guard.memory_bytes() if m.bound_guard is not None else 0)
    m.close()
    t = sorted(times[3:])
    return {
        "median_ms": 1e3 * statistics.median(t),
        "p10_ms": 1e3 * t[len(t) // 10],
        "blocks_read": kept[-1],
        "side_cache_bytes_per_block": side / shapes.num_blocks,  # one layer
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="cpu")
    p.add_argument("--tokens", nargs="+", type=int, default=[4096, 32768])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared machine)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ops = get_ops(a.backend)
    shapes_kw = {"num_q_heads": 14, "num_kv_heads": 2, "head_dim": 64}  # Qwen2.5-0.5B's attention
    rows = []
    for method in ("ESA", "Quest"):
        for tokens in a.tokens:
            for batch in a.batch:
                base = None
                for name, variant in VARIANTS.items():
                    r = bench(method, variant, tokens, batch, shapes_kw, ops, a.repeats)
                    base = base or r
                    assert r["blocks_read"] == base["blocks_read"], (method, name, r, base)
                    rows.append(
                        {
                            "method": method,
                            "variant": name,
                            "tokens": tokens,
                            "batch": batch,
                            **r,
                            "vs_default": r["median_ms"] / base["median_ms"],
                        }
                    )
                    print(
                        f"{method:6} {name:46} {tokens:6} x{batch}  {r['median_ms']:7.3f} ms  "
                        f"x{rows[-1]['vs_default']:.2f}  blocks read {r['blocks_read']}  "
                        f"side cache {r['side_cache_bytes_per_block']:.0f} B/block"
                    )
    result = {
        "what": "one layer's SparseMethod.select (score + top-k + rewrite), ratio 0.3, block 32, "
        "14 query / 2 KV heads, head dim 64; median of the timed repeats; side-cache bytes per block and "
        "layer (the block's K and V in float32: 32768 B)",
        "backend": ops.name,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
        "command": "python " + " ".join(sys.argv),
        "rows": rows,
    }
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
