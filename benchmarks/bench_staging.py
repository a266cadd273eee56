"""Blocks between a device KV cache and the store's host memory: the staging path vs plain copies.

Why: on a GPU every store load ends in a host-to-device copy and every dump starts with a
device-to-host one; `BlockStager` does them on a copy stream of its own with pinned buffers,
gathering/scattering whole blocks by id. Measured side by side in one process, same bytes:

    scatter   DramStore load into a pinned buffer, then BlockStager.scatter into the cache
              (what an offload or prefix load does), vs one pinned -> device copy of the bytes
    gather    BlockStager.gather of the blocks into a pinned buffer, vs one device -> pinned copy

The block is one layer of a Qwen3-32B-like block (128 tokens x 8 KV heads x 128 dims, K and V,
bf16: 512 KiB), the cache holds 2x the moved blocks, the ids are a random permutation.

    python benchmarks/bench_staging.py [--gib 1] [--reps 5] [--out benchmarks/results/staging.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from ucm.store import BlockLayout, DramStore, host_buffer, prefix_block_hashes
from ucm.store.staging import BlockStager

PAGE = 128 * 8 * 128 * 2 * 2  # bytes of one layer's block


def timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "staging.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    n = int(args.gib * (1 << 30)) // PAGE
    nbytes = n * PAGE
    cache = torch.zeros(2 * n, PAGE, dtype=torch.uint8, device=dev)
    ids = torch.randperm(2 * n)[:n].tolist()
    src = host_buffer([n, PAGE], torch.uint8)
    src.copy_(torch.randint(0, 256, (n, PAGE), dtype=torch.uint8))
    dense_dev = torch.empty(n, PAGE, dtype=torch.uint8, device=dev)
    dst = host_buffer([n, PAGE], torch.uint8)
    stager = BlockStager(dev)
    store = DramStore(BlockLayout(1, (PAGE,), torch.uint8), nbytes, workers=4)
    block_ids = prefix_block_hashes(range(n), 1)
    store.wait(store.dump(block_ids, 0, src))
    staged = host_buffer([n, PAGE], torch.uint8)
    rows: dict[str, list[float]] = {
        k: [] for k in ("h2d copy", "scatter", "store load + scatter", "d2h copy", "gather")
    }
    for _ in range(args.reps):
        rows["h2d copy"].append(nbytes / timed(lambda: dense_dev.copy_(src, non_blocking=True), sync) / 1e9)
        rows["scatter"].append(nbytes / timed(lambda: stager.scatter(cache, ids, src), sync) / 1e9)

        def load_and_scatter() -> None:
            store.wait(store.load(block_ids, 0, staged))
            stager.scatter(cache, ids, staged)

        rows["store load + scatter"].append(nbytes / timed(load_and_scatter, sync) / 1e9)
        assert torch.equal(cache[ids].cpu(), src), "scatter moved the wrong bytes"
        rows["d2h copy"].append(nbytes / timed(lambda: dst.copy_(dense_dev, non_blocking=True), sync) / 1e9)

        def gather() -> None:
            out, ready = stager.gather(cache, ids)
            if ready is not None:
                ready.synchronize()
            rows.setdefault("_last", []).append(out)

        rows["gather"].append(nbytes / timed(gather, sync) / 1e9)
        assert torch.equal(rows.pop("_last")[-1], src), "gather returned the wrong bytes"
    med = {k: round(statistics.median(v), 2) for k, v in rows.items()}
    result = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "bytes": nbytes,
        "block_bytes": PAGE,
        "blocks": n,
        "reps": args.reps,
        "median_gbps": med,
        "ratios": {
            "scatter / h2d copy": round(med["scatter"] / med["h2d copy"], 3),
            "store load + scatter / h2d copy": round(med["store load + scatter"] / med["h2d copy"], 3),
            "gather / d2h copy": round(med["gather"] / med["d2h copy"], 3),
        },
        "gbps": rows,
        "notes": "GB/s = 1e9 B/s, medians of the reps; plain copies move one contiguous pinned buffer, "
        "the staging path gathers/scatters the same bytes as 512 KiB blocks at random cache ids "
        "on its own stream (pinned host buffers, events).",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("device", "median_gbps", "ratios")}, indent=1))
    store.close()


if __name__ == "__main__":
    main()
