"""The top-k + table rewrite (`CudaOps.select_and_rewrite`, the op the engine calls per sparse
layer) of this checkout against the top-k kernel of another commit, side by side in one run:
the same inputs, 36 calls per CUDA graph as a 36-layer model replays them, every launch setting
of each, and whether both rewrite the same tables. This checkout runs twice: "now" without the
histogram passes' early stop (`CudaOps.topk_early_exit`, on by default since session 29) and
"now_early_exit" with it.

The baseline is a kernels file, because the GPU machine's copy of the checkout has no reliable
git history; write it here before the run call (it travels as an untracked file):

    git show fcaab27:backends/cuda/kernels.py > .baseline_kernels.py
    python benchmarks/topk_compare_gpu.py --baseline .baseline_kernels.py --out DIR
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tune_selection_gpu import LAYERS, graph_us  # noqa: E402
from ucm_backends.cuda.ops import CudaOps  # noqa: E402

#: (batch, table columns, kept fraction): 128K x 4 as the bench's engine has it (1025 columns)
#: and as max_model_len 131072 gives it (1024), every row dense, 32K, 64K, 256K, wide batches
CELLS = [(4, 1025, 0.3), (4, 1025, 0.1), (4, 1025, 1.0), (4, 1024, 0.3), (1, 1025, 0.3), (16, 1025, 0.3)]
CELLS += [(8, 257, 0.3), (8, 512, 0.3), (8, 513, 0.3), (2, 2049, 0.3)]


def ops_with_topk_of(path: str) -> CudaOps:
    """CudaOps whose top-k kernel is the one in the kernels file `path`."""
    spec = importlib.util.spec_from_file_location("ucm_baseline_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ops = CudaOps()
    ops._k = type(ops._k)(**vars(ops._k))
    ops._k.topk_kernel = _TakesKnownArgs(mod.get_kernels(False).topk_kernel)
    return ops


class _TakesKnownArgs:
    """A kernel launcher that drops the keyword arguments an older kernel does not declare."""

    def __init__(self, kernel) -> None:
        self.kernel, self.names = kernel, set(kernel.arg_names)

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kw: launch(*args, **{k: v for k, v in kw.items() if k in self.names})


def case(b: int, m: int, ratio: float, seed: int = 0):
    """Random scores, the first and last blocks forced, a partly filled last block."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(seed)
    table = torch.randperm(b * m + 8, device=dev, generator=g)[: b * m].view(b, m).to(torch.int32)
    lens = torch.full((b,), (m - 1) * 128 + 1, dtype=torch.int32, device=dev)
    scores = torch.randn(b, m, device=dev, generator=g)
    k = torch.full((b,), max(1, math.ceil(m * ratio)), dtype=torch.int64, device=dev)
    must = torch.zeros(b, m, dtype=torch.bool, device=dev)
    must[:, [0, m - 1]] = True
    return scores, k, must, table, lens


def launches(m: int) -> list[tuple[str, int | None, int | None, bool | None]]:
    """(label, warps, radix bits, sort): the default, then each setting the defaults choose from."""
    out = [("default", None, None, None)]
    if m > 512:
        return out + [("histogram", w, 8, False) for w in (4, 8, 16)]
    return out + [("histogram", w, 8, False) for w in (4, 8)] + [("sort", 16, None, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, help="a backends/cuda/kernels.py of another commit")
    ap.add_argument("--baseline-name", default="baseline")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cells", nargs="*", help="BATCH:COLUMNS:RATIO cells (default: CELLS)")
    ap.add_argument("--default-launch-only", action="store_true", help="time each cell's default launch only")
    args = ap.parse_args()
    cells = [(int(b), int(m), float(r)) for b, m, r in (c.split(":") for c in args.cells)] if args.cells else CELLS
    plain, early = CudaOps(), CudaOps()
    plain.topk_early_exit, early.topk_early_exit = False, True
    every = [(args.baseline_name, ops_with_topk_of(args.baseline)), ("now", plain), ("now_early_exit", early)]
    rows = []
    for b, m, ratio in cells:
        inputs = case(b, m, ratio)
        want = every[0][1].select_and_rewrite(*inputs, 128)
        same = all(
            all(torch.equal(x, y) for x, y in zip(want, ops.select_and_rewrite(*inputs, 128), strict=True))
            for _, ops in every[1:]
        )
        for label, warps, bits, sort in launches(m)[: 1 if args.default_launch_only else None]:
            row = {"batch": b, "blocks": m, "ratio": ratio, "launch": label, "same_tables": same}
            for name, ops in every:
                ops.topk_warps, ops.topk_radix_bits, ops.topk_sort = warps, bits, sort
                us = graph_us(lambda ops=ops, a=inputs: [ops.select_and_rewrite(*a, 128) for _ in range(LAYERS)])
                row[f"{name}_us"] = round(us / LAYERS, 2)
            row["warps_bits_sort"] = every[1][1].topk_launch(1 << max(4, (m - 1).bit_length()))
            row["baseline_over_now"] = round(row[f"{args.baseline_name}_us"] / row["now_us"], 3)
            row["baseline_over_now_early_exit"] = round(row[f"{args.baseline_name}_us"] / row["now_early_exit_us"], 3)
            rows.append(row)
            print(row, flush=True)
        for _, ops in every:
            ops.topk_warps = ops.topk_radix_bits = ops.topk_sort = None
    one = torch.zeros(1, device="cuda")
    floor = graph_us(lambda: [one.add_(1) for _ in range(LAYERS)]) / LAYERS
    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "calls_per_graph": LAYERS,
        "launch_floor_us": round(floor, 2),
        "rows": rows,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "topk_compare_gpu.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
