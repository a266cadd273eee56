"""What the examples run: one long needle prompt through real vLLM with a ucm sparse config,
printing the answer and the blocks each layer read (vLLM in one process, so the worker's
counters can be read back)."""

from __future__ import annotations

import gc
import os
import time
from typing import Any


def connector_config(extra: dict[str, Any], kv_load_failure_policy: str = "recompute"):
    """vLLM's KVTransferConfig for UCMConnector with UCM's extra config (sparse and/or store)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector="UCMConnector", kv_connector_module_path="ucm.integration.vllm.connector",
                            kv_role="kv_both", kv_connector_extra_config=extra,
                            kv_load_failure_policy=kv_load_failure_policy)


class RequestFailed(RuntimeError):
    """A request the engine finished with an error instead of tokens."""


def checked(outputs: list) -> list:
    """`outputs` of `LLM.generate`, once none of their requests failed. vLLM finishes a request
    it cannot serve (e.g. stored KV that fails to load under `kv_load_failure_policy` "fail")
    with finish_reason "error" and no tokens, and raises nothing: ucm's own callers raise here
    rather than print or score an empty answer."""
    failed = [o.request_id for o in outputs if any(c.finish_reason == "error" for c in o.outputs)]
    if failed:
        raise RequestFailed(f"{len(failed)} of {len(outputs)} request(s) failed in the engine (finish_reason "
                            f"'error', first: {failed[0]}); with a ucm store, a block that failed to load fails "
                            "its request under kv_load_failure_policy 'fail' ('recompute' recomputes it)")
    return outputs


def posix_store(path) -> dict:
    """The `ucm_connectors` part of an extra config for a POSIX store at `path` (prefix reuse)."""
    return {"ucm_connectors": [{"ucm_connector_name": "UcmNfsStore",
                                "ucm_connector_config": {"storage_backends": str(path)}}]}


def close_engine(llm=None) -> None:
    """Free an in-process engine so the next one can start (vLLM keeps process-wide state).

    The caller must drop its own references first (`del llm`): an engine collected later, while
    the next one runs, tears down the next one's process groups.
    """
    from vllm.distributed import cleanup_dist_env_and_memory

    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def find_connector():
    """This process's worker-side UCMConnector (one-process engines), or None."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    from ucm.integration.vllm.connector import UCMConnector

    if not has_kv_transfer_group():
        return None
    c = get_kv_transfer_group()
    return c if isinstance(c, UCMConnector) else None


def run_offline(sparse_config: dict | None, tokens: int = 3000, max_tokens: int = 12, block_size: int = 32,
                store_dir: str | None = None) -> dict:
    """Generate once; returns {"answer", "correct", "kept", "total", "seconds"} (and "offload"
    with the device blocks held when the config offloads; `store_dir` is then the store)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM, SamplingParams

    from ucm.demo import needle_prompt
    from ucm.integration.vllm.connector import find_runtime
    from ucm.models import fetch_model

    path = str(fetch_model("smollm2"))
    extra = {"ucm_sparse_config": sparse_config} if sparse_config is not None else None
    if extra is not None and store_dir is not None:
        extra.update(posix_store(store_dir))
    ktc = connector_config(extra) if extra is not None else None
    llm = LLM(model=path, dtype="float32", block_size=block_size, max_model_len=max(4096, tokens + 512),
              enforce_eager=True, distributed_executor_backend="uni", kv_transfer_config=ktc)
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
        print("per layer (kept/total, summed over steps): " + " ".join(f"{k}/{t}" for k, t in zip(snap["kept"], snap["total"])))
    result = {"answer": answer, "correct": secret in answer, "kept": snap["kept"], "total": snap["total"],
              "seconds": seconds}
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # None with vLLM's engine-core process
    connector = getattr(getattr(core, "scheduler", None), "connector", None)
    planner = getattr(connector, "offload_planner", None)
    if planner is not None:
        snap = planner.snapshot()
        held = next(iter(snap["held"].values()), None)
        blocks = -(-(len(ids) + max_tokens) // block_size)
        if held is not None:
            print(f"offload: the request held at most {held[0]} device blocks (budget {held[1]}) of its {blocks}; "
                  f"{snap['freed_blocks']} blocks went back to vLLM's pool and were read from the store when selected")
        result["offload"] = snap
    return result
