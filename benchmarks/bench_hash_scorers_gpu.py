"""GSA on device's two token scorers side by side on one GPU: Hamming (summed distances) and
norm_cosine (norm-weighted SimHash estimate, `ucm.ops.hash_cosine`), each with the query hash
fused as the engine calls them (`hash_hamming_block_scores`, `hash_cosine_block_scores`), and
the key-side writes of one decode step (`hash_write` vs `hash_norm_write`).

Qwen3-4B's shape (32 query / 8 KV heads, head dim 128, 128-bit codes, block 128), 32K and 128K
tokens a row; every call captured in a CUDA graph over input sets larger than L2
(`bench_cuda_decode._graph_time`). Per cell: microseconds, bytes read (codes, and norms for the
cosine scorer) and the fraction of the measured HBM read bandwidth that is.
Usage: python benchmarks/bench_hash_scorers_gpu.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cuda_decode import _graph_time, _sets_for, hbm_read_bandwidth  # noqa: E402

HQ, HKV, D, BITS, BS = 32, 8, 128, 128, 128


def cells(ops, ctx: int, batch: int, bw: float, gen: torch.Generator) -> list[dict]:
    nb_row = ctx // BS
    code_bytes = batch * ctx * HKV * BITS // 8
    norm_bytes = batch * ctx * HKV * 2
    n_sets = _sets_for(code_bytes + norm_bytes)
    dev = torch.device("cuda")
    sets = []
    for _ in range(n_sets):
        nb = batch * nb_row
        sets.append(
            {
                "q": torch.randn(batch, HQ, D, generator=gen).to(dev, torch.bfloat16),
                "w": torch.randn(D, BITS, generator=gen).to(dev),
                "codes": torch.randint(0, 256, (nb, BS, HKV, BITS // 8), generator=gen, dtype=torch.uint8).to(dev),
                "norms": (torch.rand(nb, BS, HKV, generator=gen) * 20).to(dev, torch.bfloat16),
                "table": torch.randperm(nb, generator=gen).view(batch, nb_row).to(dev, torch.int32),
                "lens": torch.full((batch,), ctx, dtype=torch.int32, device=dev),
                "keys": torch.randn(batch, HKV, D, generator=gen).to(dev, torch.bfloat16),
                "center": torch.randn(HKV, D, generator=gen).to(dev),
                "slots": (torch.arange(batch) * ctx + ctx - 1).to(dev, torch.int64),
            }
        )

    def hamming(i):
        s = sets[i]
        ops.hash_hamming_block_scores(s["q"], s["w"], s["codes"], s["table"], s["lens"], "min")

    def cosine(i):
        s = sets[i]
        ops.hash_cosine_block_scores(s["q"], s["w"], s["codes"], s["norms"], s["table"], s["lens"], "min")

    def write(i):
        s = sets[i]
        ops.hash_write(s["codes"], s["keys"], s["w"], s["slots"])

    def norm_write(i):
        s = sets[i]
        ops.hash_norm_write(s["codes"], s["norms"], s["keys"], s["w"], s["center"], s["slots"])

    out = []
    for name, fn, nbytes in (
        ("hamming", hamming, code_bytes),
        ("norm_cosine", cosine, code_bytes + norm_bytes),
        ("hash_write", write, None),
        ("hash_norm_write", norm_write, None),
    ):
        us = _graph_time(fn, n_sets)
        row = {"op": name, "context": ctx, "batch": batch, "us": round(us, 2)}
        if nbytes:
            row.update(bytes_read=nbytes, fraction_of_bound=round(nbytes / (us * 1e-6) / bw, 3))
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from ucm.ops import get_ops

    ops = get_ops("cuda")
    bw = hbm_read_bandwidth()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for ctx, batch in ((32768, 8), (131072, 4)):
        rows += cells(ops, ctx, batch, bw, gen)
    os.makedirs(args.out, exist_ok=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "hbm_read_bytes_per_s": bw,
        "shape": {"hq": HQ, "hkv": HKV, "head_dim": D, "bits": BITS, "block_size": BS},
        "cells": rows,
    }
    with open(os.path.join(args.out, "hash_scorers_gpu.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
