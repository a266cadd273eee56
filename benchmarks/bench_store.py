"""KV store throughput against the raw device and against memcpy, side by side in one run.

POSIX stage: dump/load of Qwen3-4B-like blocks (36 layers; a shard is one layer of a 128-token
block: K and V x 8 KV heads x 128 dims x bf16 = 512 KiB; a block is 18 MiB), layer by layer
as the vLLM connector will do it, against `dd` with direct I/O (bs = one shard) writing and
reading the same number of bytes on the same file system. DRAM stage: dump/load through
DramStore against one plain torch `copy_` of the same bytes.

    python benchmarks/bench_store.py [--dir DIR] [--gib 1] [--workers 4] [--reps 3]
Writes benchmarks/results/store.json and store.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ucm.store import BlockLayout, DramStore, PosixStore, host_buffer, prefix_block_hashes

RESULTS = Path(__file__).parent / "results"
LAYERS, BLOCK_TOKENS, KV_HEADS, HEAD_DIM = 36, 128, 8, 128


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fs_of(path: Path) -> str:
    out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True, check=False).stdout.splitlines()
    return " ".join(out[-1].split()[:2]) if len(out) > 1 else "unknown"


def dd(args: list[str]) -> tuple[float, str]:
    """Seconds dd itself reports (its start-up is not counted), and its last line."""
    proc = subprocess.run(["dd", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip())
    last = proc.stderr.strip().splitlines()[-1]
    m = re.search(r"copied, ([0-9.eE+-]+) s", last)
    if not m:
        raise RuntimeError(f"cannot parse dd output: {last}")
    return float(m.group(1)), last


class DD:
    """dd with O_DIRECT, or plain dd (+fsync on write) with a note if the file system refuses it."""

    def __init__(self, work: Path, nbytes: int, bs: int) -> None:
        self.path, self.nbytes, self.bs = work / f"dd{bs}.bin", nbytes, bs
        self.direct, self.mode = True, "oflag=direct / iflag=direct"
        self.write_gbps: list[float] = []
        self.read_gbps: list[float] = []

    def write(self) -> None:
        self.path.unlink(missing_ok=True)
        args = ["if=/dev/zero", f"of={self.path}", f"bs={self.bs}", f"count={self.nbytes // self.bs}"]
        try:
            t, _ = dd(args + (["oflag=direct"] if self.direct else ["conv=fsync"]))
        except RuntimeError as exc:
            if not self.direct:
                raise
            self.direct, self.mode = False, f"the file system refused O_DIRECT ({exc}); plain dd with conv=fsync"
            t, _ = dd(args + ["conv=fsync"])
        self.write_gbps.append(self.nbytes / t / 1e9)

    def read(self) -> None:
        t, _ = dd([f"if={self.path}", "of=/dev/null", f"bs={self.bs}"] + (["iflag=direct"] if self.direct else []))
        self.read_gbps.append(self.nbytes / t / 1e9)
        self.path.unlink(missing_ok=True)

    def summary(self) -> dict:
        return {"write_gbps": self.write_gbps, "read_gbps": self.read_gbps, "mode": self.mode, "bs": self.bs}


class PosixBench:
    """Dump then load every layer's shards of n_blocks blocks: one call per layer (as the connector
    will: `dump(ids, layer, cache.index_select(0, ids))`), all waited at the end. Buffers are 4 KiB-aligned
    host buffers (`host_buffer`), so O_DIRECT reads and writes them in place."""

    def __init__(self, work: Path, layout: BlockLayout, n_blocks: int, workers: int, direct: bool) -> None:
        self.work, self.layout, self.n_blocks, self.workers, self.direct = work, layout, n_blocks, workers, direct
        self.src = host_buffer((LAYERS, n_blocks, *layout.shard_shape), layout.dtype)
        self.src.copy_(torch.randn(self.src.shape).to(layout.dtype))
        self.dst = host_buffer(self.src.shape, layout.dtype)
        self.dst.zero_()
        self.nbytes = self.src.numel() * self.src.element_size()
        self.dump_gbps: list[float] = []
        self.load_gbps: list[float] = []
        self.load_block_major_gbps: list[float] = []
        self.used_direct: bool | None = None
        self._store: PosixStore | None = None
        self._ids: list[str] = []

    def dump(self, rep: int) -> None:
        self._store = store = PosixStore(
            self.work / f"store{rep}", self.layout, workers=self.workers, use_direct=self.direct
        )
        self.used_direct = store.direct
        self._ids = prefix_block_hashes(
            range(self.n_blocks * BLOCK_TOKENS), BLOCK_TOKENS, namespace=f"{rep}{time.time()}"
        )
        t0 = time.perf_counter()
        for task in [store.dump(self._ids, layer, self.src[layer]) for layer in range(LAYERS)]:
            store.wait(task)
        self.dump_gbps.append(self.nbytes / (time.perf_counter() - t0) / 1e9)

    def load(self) -> None:
        store = self._store
        assert store is not None
        t0 = time.perf_counter()
        for task in [store.load(self._ids, layer, self.dst[layer]) for layer in range(LAYERS)]:
            store.wait(task)
        self.load_gbps.append(self.nbytes / (time.perf_counter() - t0) / 1e9)
        assert torch.equal(self.src.view(torch.int16), self.dst.view(torch.int16)), "store returned different bytes"
        self.dst.zero_()
        # the same bytes as one call, block by block (each file read front to back: a prefix-cache hit)
        ids = [i for i in self._ids for _ in range(LAYERS)]
        shards = [layer for _ in self._ids for layer in range(LAYERS)]
        dsts = [self.dst[layer, b] for b in range(self.n_blocks) for layer in range(LAYERS)]
        t0 = time.perf_counter()
        store.wait(store.load(ids, shards, dsts))
        self.load_block_major_gbps.append(self.nbytes / (time.perf_counter() - t0) / 1e9)
        assert torch.equal(self.src.view(torch.int16), self.dst.view(torch.int16)), "store returned different bytes"
        self.dst.zero_()
        store.close()
        shutil.rmtree(store.roots[0])

    def summary(self) -> dict:
        return {
            "dump_gbps": self.dump_gbps,
            "load_gbps": self.load_gbps,
            "load_block_major_gbps": self.load_block_major_gbps,
            "o_direct": self.used_direct,
            "workers": self.workers,
        }


def bench_dram(layout: BlockLayout, n_blocks: int, workers: int, reps: int) -> dict:
    src = torch.randn(LAYERS, n_blocks, *layout.shard_shape).to(layout.dtype)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages is not part of any measurement
    nbytes = src.numel() * src.element_size()
    memcpy, npcopy, pieces, dumps, loads = [], [], [], [], []
    for rep in range(reps):
        dst.zero_()
        t0 = time.perf_counter()
        dst.copy_(src)
        memcpy.append(nbytes / (time.perf_counter() - t0) / 1e9)
        dst.zero_()
        t0 = time.perf_counter()
        np.copyto(dst.view(torch.int16).numpy(), src.view(torch.int16).numpy())
        npcopy.append(nbytes / (time.perf_counter() - t0) / 1e9)
        dst.zero_()
        flat_s, flat_d = src.view(torch.uint8).reshape(-1).numpy(), dst.view(torch.uint8).reshape(-1).numpy()
        piece = layout.shard_nbytes
        t0 = time.perf_counter()
        for i in range(0, nbytes, piece):  # the same copy as 512 KiB pieces: the store's unit
            np.copyto(flat_d[i : i + piece], flat_s[i : i + piece])
        pieces.append(nbytes / (time.perf_counter() - t0) / 1e9)
        dst.zero_()
        cache = DramStore(layout, n_blocks * layout.block_nbytes, workers=workers)
        warm = prefix_block_hashes(range(n_blocks * BLOCK_TOKENS), BLOCK_TOKENS, namespace=f"warm{rep}")
        for task in [cache.dump(warm, layer, src[layer]) for layer in range(LAYERS)]:
            cache.wait(task)  # steady state: the cache is full, the timed dumps evict and reuse its buffers
        ids = prefix_block_hashes(range(n_blocks * BLOCK_TOKENS), BLOCK_TOKENS, namespace=f"dram{rep}")
        t0 = time.perf_counter()
        for task in [cache.dump(ids, layer, src[layer]) for layer in range(LAYERS)]:
            cache.wait(task)
        t1 = time.perf_counter()
        for task in [cache.load(ids, layer, dst[layer]) for layer in range(LAYERS)]:
            cache.wait(task)
        t2 = time.perf_counter()
        assert torch.equal(src.view(torch.int16), dst.view(torch.int16))
        dumps.append(nbytes / (t1 - t0) / 1e9)
        loads.append(nbytes / (t2 - t1) / 1e9)
        cache.close()
        del cache
    return {
        "torch_copy_gbps": memcpy,
        "numpy_copyto_gbps": npcopy,
        "numpy_512k_pieces_gbps": pieces,
        "dump_gbps": dumps,
        "load_gbps": loads,
        "workers": workers,
        "pinned": torch.cuda.is_available(),
    }


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="directory on the disk under test (default: a temp dir in /var/tmp)")
    ap.add_argument("--gib", type=float, default=1.0, help="bytes moved per measurement, GiB")
    ap.add_argument("--workers", type=int, default=4, help="transferStreamNumber")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "store.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from an existing --out JSON")
    args = ap.parse_args()
    if args.replot:
        result = json.loads(Path(args.out).read_text())
        plot(result["median_gbps"], result, Path(args.out).with_suffix(".png"))
        return

    layout = BlockLayout(LAYERS, (2, BLOCK_TOKENS, KV_HEADS, HEAD_DIM), torch.bfloat16)
    n_blocks = max(1, int(args.gib * (1 << 30)) // layout.block_nbytes)
    nbytes = n_blocks * layout.block_nbytes
    work = Path(tempfile.mkdtemp(prefix="ucm-bench-store-", dir=args.dir or "/var/tmp"))
    load_before = loadavg()
    try:
        raw, raw_big = DD(work, nbytes, layout.shard_nbytes), DD(work, nbytes, 4 << 20)
        posix = PosixBench(work, layout, n_blocks, args.workers, True)
        buffered = PosixBench(work, layout, n_blocks, args.workers, False)
        for rep in range(args.reps):  # interleaved, so that the disk's mood is shared
            raw.write()
            posix.dump(rep)
            raw_big.write()
            raw.read()
            posix.load()
            raw_big.read()
            buffered.dump(rep)
            buffered.load()
        dram = bench_dram(layout, n_blocks, args.workers, args.reps)
    finally:
        fs = fs_of(work)
        shutil.rmtree(work, ignore_errors=True)
    load_after = loadavg()

    rows = {
        "dd write (direct, bs=512K)": med(raw.write_gbps),
        "PosixStore dump (O_DIRECT)": med(posix.dump_gbps),
        "dd read (direct, bs=512K)": med(raw.read_gbps),
        "PosixStore load (O_DIRECT)": med(posix.load_gbps),
        "PosixStore load (O_DIRECT, block-major)": med(posix.load_block_major_gbps),
        "dd write (direct, bs=4M)": med(raw_big.write_gbps),
        "dd read (direct, bs=4M)": med(raw_big.read_gbps),
        "PosixStore dump (buffered: page cache)": med(buffered.dump_gbps),
        "PosixStore load (buffered: page cache)": med(buffered.load_gbps),
        "torch copy_": med(dram["torch_copy_gbps"]),
        "numpy copyto (1 thread)": med(dram["numpy_copyto_gbps"]),
        "numpy copyto, 512 KiB pieces": med(dram["numpy_512k_pieces_gbps"]),
        "DramStore dump": med(dram["dump_gbps"]),
        "DramStore load": med(dram["load_gbps"]),
    }
    best_copy = max(rows["torch copy_"], rows["numpy copyto (1 thread)"])
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": {"cpu": cpu_name(), "cores": os.cpu_count(), "filesystem": fs, "torch": torch.__version__},
        "loadavg_1_5_15": {"before": load_before, "after": load_after},
        "layout": {
            "shards(layers)": LAYERS,
            "shard_shape": list(layout.shard_shape),
            "dtype": "bfloat16",
            "shard_bytes": layout.shard_nbytes,
            "block_bytes": layout.block_nbytes,
        },
        "bytes_per_measurement": nbytes,
        "blocks": n_blocks,
        "reps": args.reps,
        "median_gbps": rows,
        "ratios": {
            "dump / dd write (goal >= 0.9)": round(
                rows["PosixStore dump (O_DIRECT)"] / rows["dd write (direct, bs=512K)"], 3
            ),
            "load / dd read (goal >= 0.9)": round(
                rows["PosixStore load (O_DIRECT)"] / rows["dd read (direct, bs=512K)"], 3
            ),
            "load block-major / dd read (goal >= 0.9)": round(
                rows["PosixStore load (O_DIRECT, block-major)"] / rows["dd read (direct, bs=512K)"], 3
            ),
            "dram dump / best copy (goal >= 0.8)": round(rows["DramStore dump"] / best_copy, 3),
            "dram load / best copy (goal >= 0.8)": round(rows["DramStore load"] / best_copy, 3),
            "dram dump / torch copy_": round(rows["DramStore dump"] / rows["torch copy_"], 3),
            "dram load / torch copy_": round(rows["DramStore load"] / rows["torch copy_"], 3),
        },
        "dd_bs512K": raw.summary(),
        "dd_bs4M": raw_big.summary(),
        "posix_direct": posix.summary(),
        "posix_buffered_page_cache": buffered.summary(),
        "dram": dram,
        "notes": "GB/s = 1e9 B/s; medians of the reps, dd and store runs interleaved in each rep. dd times are "
        "dd's own; store times run from the first dump/load call to the last wait (36 calls, one per "
        "layer; 'block-major' = one call reading each block file front to back). Buffered POSIX "
        "numbers mostly measure the page cache and are not compared with direct dd. DRAM: the cache "
        "is full before timing (steady state, buffers reused); its 512 KiB copies go below glibc's "
        "non-temporal-store threshold, which a single bulk copy does not (see docs/store.md).",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                "median_gbps": rows,
                "ratios": result["ratios"],
                "loadavg": result["loadavg_1_5_15"],
                "o_direct": posix.used_direct,
                "dd": raw.mode,
            },
            indent=2,
        )
    )
    plot(rows, result, out.with_suffix(".png"))


def plot(rows: dict[str, float], result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    disk = list(rows)[:7]  # the buffered rows measure the page cache: in the JSON, not on the plot
    mem = list(rows)[9:]
    for ax, names, title in (
        (axes[0], disk, f"disk ({result['device']['filesystem']})"),
        (axes[1], mem, "host memory"),
    ):
        names = names[::-1]
        vals = [rows[n] for n in names]
        colors = ["#999999" if n.startswith(("dd", "torch", "numpy")) else "#3b75af" for n in names]
        bars = ax.barh(range(len(names)), vals, color=colors)
        ax.bar_label(bars, fmt="%.2f", padding=2)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xlabel("GB/s (median; grey = baseline)")
        ax.set_xlim(0, max(vals) * 1.18)
        ax.set_title(title)
    la = result["loadavg_1_5_15"]["before"]
    fig.suptitle(
        f"ucm.store, 512 KiB shards x 36 layers, {result['bytes_per_measurement'] / 2**30:.2f} GiB "
        f"per run; {result['device']['cores']} cores, load {la[0]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
