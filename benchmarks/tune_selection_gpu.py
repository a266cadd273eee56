"""Per-layer cost of ucm's decode selection on the GPU, and the launch settings that set it.

The engine's decode step runs, per sparse layer, the method's representation / code write for
the new keys, then `BatchSelector.select` (score every block, top-k, rewritten table) before
FlashAttention. This times exactly that sequence, through the product's own objects
(`build_sparse_method` + `BatchSelector` on `CudaOps`), for every layer of a Qwen3-4B-shaped
model inside one CUDA graph, as vLLM's FULL decode graphs replay it: microseconds per layer
include the gaps between kernels. Then it sweeps the launch settings of the two kernels that
dominate (the dot scorer's blocks per program, the top-k's warps and radix width) one op at a
time, so the defaults in `CudaOps` can be chosen from numbers; KVStar's fused scorer
(`kvstar_block_mass`) the same way, next to its bandwidth bound at 4.3 TB/s.

    python benchmarks/tune_selection_gpu.py --out DIR    # writes DIR/tune_selection_gpu.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

LAYERS, HQ, HKV, D, BS = 36, 32, 8, 128, 128


def graph_us(fn, reps: int = 20) -> float:
    """Median microseconds of one replay of a CUDA graph capturing `fn()`."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.cuda.graph(g, stream=s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return sorted(times)[len(times) // 2]


def build(name: str, ratio: float, ops, shapes):
    from ucm.config.loader import find_model_config
    from ucm.methods import get_method
    from ucm.sparse.factory import build_sparse_method

    if get_method(name).model_json:
        data = json.loads(Path(find_model_config("Qwen3-4B")).read_text())
        # every layer selects: the cost per selecting layer
        data.update(num_hidden_layers=LAYERS, top_k_ratio_per_layer=[ratio] * LAYERS, top_k_index_reuse=[-1] * LAYERS)
        return build_sparse_method(
            {"ucm_sparse_config": {name: {}}}, shapes, ops, model_config=data, host_scoring=False
        )
    cfg = {name: {"sparse_ratio": ratio, "retrieval_stride": 1}}
    return build_sparse_method({"ucm_sparse_config": cfg}, shapes, ops, host_scoring=False)


def layer_path(ops, name: str, ratio: float, b: int, ctx: int) -> dict:
    """Microseconds per layer of write + select over LAYERS layers in one graph."""
    from ucm.sparse.base import ModelShapes
    from ucm.sparse.batch_selection import BatchSelector

    dev = torch.device("cuda")
    m = math.ceil((ctx + 1) / BS)
    nb = b * m + 8
    shapes = ModelShapes(LAYERS, HQ, HKV, D, BS, nb, dev)
    method = build(name, ratio, ops, shapes)
    g = torch.Generator(device=dev).manual_seed(0)
    table = torch.randperm(nb, device=dev, generator=g)[: b * m].view(b, m).to(torch.int32)
    lens = torch.full((b,), ctx + 1, dtype=torch.int32, device=dev)
    qsl = torch.arange(b + 1, dtype=torch.int32, device=dev)
    # fill every layer's representations / codes with the prompt's keys (outside the timing)
    pos = torch.arange(ctx, device=dev)
    for layer in range(LAYERS):
        for r in range(b):
            slots = table[r, pos // BS].long() * BS + pos % BS
            method.on_kv_written(layer, torch.randn(ctx, HKV, D, device=dev, dtype=torch.bfloat16, generator=g), slots)
    sel = BatchSelector(method)
    new_pos = torch.full((b,), ctx, device=dev)
    new_slots = table.gather(1, (new_pos // BS)[:, None].to(torch.int64))[:, 0].long() * BS + new_pos % BS
    keys = torch.randn(b, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
    query = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)

    def write_only():
        for layer in range(LAYERS):
            method.on_kv_written(layer, keys, new_slots)

    def step():
        plan = sel.plan(qsl, lens, table, max_query_len=1)
        for layer in range(LAYERS):
            method.on_kv_written(layer, keys, new_slots)
            if sel.layer_selects(layer):
                sel.select(layer, query, plan)

    total = graph_us(step)
    write = graph_us(write_only)
    return {
        "method": name,
        "ratio": ratio,
        "batch": b,
        "context": ctx,
        "blocks": m,
        "us_per_layer": round(total / LAYERS, 2),
        "write_us_per_layer": round(write / LAYERS, 2),
    }


def sweep_ops(ops, b: int, ctx: int, kvstar: bool = True) -> list[dict]:
    """One op at a time, 36 calls per graph (as many as layers), each launch setting. Each sweep
    allocates its own inputs beside the shared table, so they are freed before the next one."""
    dev = torch.device("cuda")
    m = math.ceil((ctx + 1) / BS)
    nb = b * m + 8
    table = torch.randperm(nb, device=dev)[: b * m].view(b, m).to(torch.int32)
    lens = torch.full((b,), ctx + 1, dtype=torch.int32, device=dev)
    q = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16)
    out = _sweep_dot_and_topk(ops, q, table, lens, nb)
    if kvstar:
        out += _sweep_kvstar(ops, q, table, lens, nb)
    one = torch.zeros(1, device=dev)
    us = graph_us(lambda: [one.add_(1) for _ in range(LAYERS)])
    out.append({"op": "an empty torch kernel (launch floor)", "us": round(us / LAYERS, 2)})
    return out


def _sweep_dot_and_topk(ops, q: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, nb: int) -> list[dict]:
    """The dot scorer's blocks per program and warps; the top-k's strategy and warps."""
    dev = table.device
    b, m = table.shape
    reps = torch.randn(nb, HKV, D, device=dev)
    scores = torch.randn(b, m, device=dev)
    k = torch.full((b,), math.ceil(m * 0.3), dtype=torch.int64, device=dev)
    must = torch.zeros(b, m, dtype=torch.bool, device=dev)
    must[:, [0, m - 1]] = True
    out = []
    for bm in (2, 4, 8, 16):  # 32 and 64 were slower on every warp count (docs/history.md)
        for w in (1, 2):
            ops.scores_block_m, ops.scores_warps = bm, w
            us = graph_us(lambda: [ops.block_scores_dot(q, reps, table, lens, BS) for _ in range(LAYERS)]) / LAYERS
            out.append(
                {"op": "block_scores_dot", "batch": b, "blocks": m, "block_m": bm, "warps": w, "us": round(us, 2)}
            )
    ops.scores_block_m = ops.scores_warps = None
    us = graph_us(lambda: [ops.block_scores_dot(q, reps, table, lens, BS) for _ in range(LAYERS)]) / LAYERS
    out.append({"op": "block_scores_dot", "batch": b, "blocks": m, "default": True, "us": round(us, 2)})
    # compare-radix 1 and 8 were slower everywhere (s10); "radix 8" is now the histogram passes
    early_exit = ops.topk_early_exit
    for strategy in ("radix 8", "radix 8 early exit", "radix 2", "radix 4", "sort"):
        for w in (1, 2, 4, 8, 16):
            ops.topk_warps, ops.topk_sort = w, strategy == "sort"
            ops.topk_radix_bits = int(strategy.split()[1]) if strategy != "sort" else None
            ops.topk_early_exit = strategy.endswith("early exit")
            us = graph_us(lambda: [ops.select_and_rewrite(scores, k, must, table, lens, BS) for _ in range(LAYERS)])
            out.append(
                {
                    "op": "select_and_rewrite",
                    "batch": b,
                    "blocks": m,
                    "strategy": strategy,
                    "warps": w,
                    "us": round(us / LAYERS, 2),
                }
            )
    ops.topk_warps = ops.topk_radix_bits = ops.topk_sort = None
    ops.topk_early_exit = early_exit
    kd = torch.full_like(k, m)
    us = graph_us(lambda: [ops.select_and_rewrite(scores, kd, must, table, lens, BS) for _ in range(LAYERS)])
    out.append({"op": "select_and_rewrite(k=n, dense rows)", "batch": b, "blocks": m, "us": round(us / LAYERS, 2)})
    return out


GROUPED_MODES = ("mean", "max")  # ESA's and GSA's reduction over a GQA group


def sweep_grouped(ops, b: int, ctx: int, merge: int = 4, only: dict | None = None) -> list[dict]:
    """Block scores from groups of `merge` tokens (ESA "mean", GSA "max"), bf16 and float8 sums,
    36 calls per graph, on the tensor-core path the engine takes, beside the bandwidth bound of
    the bytes read at 4.3 TB/s. Without `only`: the built-in setting, then a two-stage search
    (block columns a program x groups a tile at 3 stages and 4 warps, then stages x warps around
    the two best; float8: widened to the query's bfloat16 and to float16). With `only`
    ({"<sums>/<mode>": launch}): those settings and the built-in one (another cell, same kernels)."""
    from ucm_backends.cuda.tuned import GroupedLaunch, grouped_key

    dev = torch.device("cuda")
    m = math.ceil((ctx + 1) / BS)
    nb = b * m + 8
    groups = BS // merge
    table = torch.randperm(nb, device=dev)[: b * m].view(b, m).to(torch.int32)
    lens = torch.full((b,), (ctx // BS) * BS, dtype=torch.int32, device=dev)  # full blocks, as ESA scores
    q = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16)
    out = []
    ops.use_tuned = False  # every timing below is of the setting it names

    def timed(reps, mode, launch) -> float | str:
        ops.override_grouped(launch)
        try:
            us = graph_us(lambda: [ops.block_scores_dot(q, reps, table, lens, BS, mode) for _ in range(LAYERS)])
            return round(us / LAYERS, 2)
        except Exception as e:  # a launch setting Triton cannot compile (e.g. out of shared memory)
            return f"failed: {type(e).__name__}: {str(e)[:200]}"
        finally:
            ops.override_grouped(None)

    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        sums = str(dtype).removeprefix("torch.")
        reps = torch.randn(nb, groups, HKV, D, device=dev).to(dtype)
        read = b * (ctx // BS) * groups * HKV * D * reps.element_size()
        base = {"op": "grouped block scores", "batch": b, "blocks": m, "merge": merge, "sums": sums}
        base["bound_us"] = round(read / 4.3e6, 2)
        widens = ("query", "float16") if dtype.itemsize == 1 else ("query",)
        for mode in GROUPED_MODES:
            key = grouped_key(sums, mode)
            row = {**base, "mode": mode, "path": "fused"}
            us = graph_us(
                lambda mode=mode, reps=reps: [
                    ops.block_scores_dot(q, reps, table, lens, BS, mode) for _ in range(LAYERS)
                ]
            )
            out.append({**row, "default": True, "us": round(us / LAYERS, 2)})
            print(out[-1], flush=True)  # each row as it is measured: a run cut off still says what it found

            def measure(lc, row=row, reps=reps, mode=mode) -> dict:
                r = {**row, **lc.model_dump(), "us": timed(reps, mode, lc)}
                print(r, flush=True)
                return r

            if only is not None:
                if key in only:
                    out.append(measure(GroupedLaunch.model_validate(only[key])))
                continue
            first = [GroupedLaunch(block_m=1, block_r=16, stages=2, warps=4)]  # the built-in one, by name
            first += [
                GroupedLaunch(block_m=bm, block_r=br, stages=3, warps=4, widen=w)
                for w in widens
                for bm in (1, 2, 4, 8)
                for br in (16, 32)
            ]
            rows = [measure(lc) for lc in first]
            ok = sorted((r for r in rows if isinstance(r["us"], float)), key=lambda r: r["us"])
            second = [
                GroupedLaunch.model_validate(
                    {**{k: r[k] for k in ("block_m", "block_r", "widen")}, "stages": st, "warps": w}
                )
                for r in ok[:2]
                for st in (2, 3, 4)
                for w in (4, 8)
                if (st, w) != (3, 4)
            ]
            rows += [measure(lc) for lc in second]
            out.extend(rows)
        del reps
    ops.use_tuned = True
    return out


def best_grouped(rows: list[dict]) -> dict[str, dict]:
    """The fastest timed launch per (sums, mode) among `sweep_grouped`'s rows of one cell."""
    from ucm_backends.cuda.tuned import GroupedLaunch, grouped_key

    best: dict[str, dict] = {}
    for r in rows:
        if r.get("default") or not isinstance(r.get("us"), float):
            continue
        key = grouped_key(r["sums"], r["mode"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    return {
        k: GroupedLaunch.model_validate({f: r[f] for f in GroupedLaunch.model_fields}).model_dump()
        for k, r in best.items()
    }


def _sweep_kvstar(ops, q: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, nb: int) -> list[dict]:
    """KVStar's fused scorer (bf16 channel-major reps, merge 2 -> R = 64, 32 of 128 channels kept):
    its tile width (blocks x representations per program), channel chunk and warps. Its tensors
    are freed on return."""
    dev = table.device
    b, m = table.shape
    out = []
    reps = torch.randn(nb, HKV, D, BS // 2, device=dev).to(torch.bfloat16)
    abs_sums = torch.rand(nb, HKV, D, device=dev)
    q4 = q[:, None]
    kv_bytes = b * (m - 1) * HKV * (32 * (BS // 2) * 2 + D * 4)  # kept reps + abs_sums of the full blocks
    for bn in (128, 256, 512):
        for bk in (16, 32):
            for w in (4, 8):
                for tpp in (1, 2, 4, 8):
                    ops.kvstar_block_n, ops.kvstar_block_k, ops.kvstar_warps = bn, bk, w
                    ops.kvstar_tiles_per_prog = tpp
                    us = (
                        graph_us(
                            lambda: [
                                ops.kvstar_block_mass(q4, reps, abs_sums, table, lens, BS, 32, 0.0625)
                                for _ in range(LAYERS)
                            ]
                        )
                        / LAYERS
                    )
                    out.append(
                        {
                            "op": "kvstar_block_mass",
                            "batch": b,
                            "blocks": m,
                            "block_n": bn,
                            "block_k": bk,
                            "warps": w,
                            "tiles_per_prog": tpp,
                            "us": round(us, 2),
                            "bound_us": round(kv_bytes / 4.3e6, 2),
                        }
                    )
    ops.kvstar_block_n = ops.kvstar_block_k = ops.kvstar_warps = ops.kvstar_tiles_per_prog = None
    us = (
        graph_us(
            lambda: [ops.kvstar_block_mass(q4, reps, abs_sums, table, lens, BS, 32, 0.0625) for _ in range(LAYERS)]
        )
        / LAYERS
    )
    out.append(
        {
            "op": "kvstar_block_mass",
            "batch": b,
            "blocks": m,
            "default": True,
            "us": round(us, 2),
            "bound_us": round(kv_bytes / 4.3e6, 2),
        }
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-kvstar-sweep", action="store_true", help="sweep the scorer and top-k only")
    ap.add_argument("--methods", nargs="*", help="time the layer path of these methods only (default: all)")
    ap.add_argument("--grouped-only", action="store_true", help="only the grouped scorer's sweep (fast)")
    ap.add_argument(
        "--write-tuned", metavar="DIR", help="write the grouped scorer's fastest settings to DIR/<GPU>.json (tuned.py)"
    )
    args = ap.parse_args()
    from ucm_backends.cuda.ops import CudaOps

    ops = CudaOps()
    cells = [(8, 32768), (4, 131072), (1, 32768)]
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "layers": LAYERS,
        "model": "Qwen3-4B shape (32 q heads, 8 KV heads, head dim 128), block 128",
        "paths": [],
        "ops": [],
    }
    from ucm.methods import method_names

    if args.grouped_only:
        cells, args.skip_sweep, args.methods = cells[:2], True, []
    (b0, ctx0), (b1, ctx1) = cells[:2]
    rows = sweep_grouped(ops, b0, ctx0)  # the search, at 32K x 8
    chosen = best_grouped(rows)
    print("chosen at 32K x 8:", chosen, flush=True)
    rows += sweep_grouped(ops, b1, ctx1, only=chosen)  # its choice and the built-in one at 128K x 4
    result["ops"].extend(rows)
    result["grouped_chosen"] = chosen
    if args.write_tuned:
        from ucm_backends.cuda.tuned import TunedFile, write_tuned

        tuned = TunedFile(
            device=torch.cuda.get_device_name(),
            command=f"benchmarks/tune_selection_gpu.py --grouped-only (the fastest at {ctx0 // 1024}K x {b0})",
            grouped_scores=chosen,
        )
        print("tuned settings written to", write_tuned(Path(args.write_tuned), tuned), flush=True)
    for b, ctx in cells:
        # every registered method at 0.3, the strided ones at 0.1 too
        settings = [(m, 0.3) for m in method_names()] + [(m, 0.1) for m in method_names(strided=True)]
        settings = [(m, r) for m, r in settings if args.methods is None or m in args.methods]
        for name, ratio in settings:
            try:
                row = layer_path(ops, name, ratio, b, ctx)
            except torch.cuda.OutOfMemoryError:  # e.g. KVStar's merged sums at 128K x 4 (~38 GB)
                row = {"method": name, "ratio": ratio, "batch": b, "context": ctx, "skipped": "out of GPU memory"}
            result["paths"].append(row)
            print(row, flush=True)
            torch.cuda.empty_cache()
    if not args.skip_sweep:
        for b, ctx in cells[:2]:
            for row in sweep_ops(ops, b, ctx, kvstar=not args.skip_kvstar_sweep):
                result["ops"].append(row)
                print(row, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune_selection_gpu.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
