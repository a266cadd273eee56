"""Helpers for in-process vLLM engines that run ucm's connector: the KVTransferConfig, a POSIX
store section, failed-request checks, closing an engine, finding the worker's connector.

The eval runner, the demo (`ucm.demo_vllm`), the tests and the benchmarks use them. They
know vLLM and the connector and nothing above the plugin: no demo prompt, no model fetching
(docs/architecture.md, "Layers").
"""

from __future__ import annotations

import gc
from typing import Any


def connector_config(extra: dict[str, Any], kv_load_failure_policy: str = "recompute"):
    """vLLM's KVTransferConfig for UCMConnector with UCM's extra config (sparse and/or store)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="UCMConnector",
        kv_connector_module_path="ucm.integration.vllm.connector",
        kv_role="kv_both",
        kv_connector_extra_config=extra,
        kv_load_failure_policy=kv_load_failure_policy,
    )


class RequestFailed(RuntimeError):
    """A request the engine finished with an error instead of tokens."""


def checked(outputs: list) -> list:
    """`outputs` of `LLM.generate`, once none of their requests failed. vLLM finishes a request
    it cannot serve (e.g. stored KV that fails to load under `kv_load_failure_policy` "fail")
    with finish_reason "error" and no tokens, and raises nothing: ucm's own callers raise here
    rather than print or score an empty answer."""
    failed = [o.request_id for o in outputs if any(c.finish_reason == "error" for c in o.outputs)]
    if failed:
        raise RequestFailed(
            f"{len(failed)} of {len(outputs)} request(s) failed in the engine (finish_reason "
            f"'error', first: {failed[0]}); with a ucm store, a block that failed to load fails "
            "its request under kv_load_failure_policy 'fail' ('recompute' recomputes it)"
        )
    return outputs


def posix_store(path) -> dict:
    """The `ucm_connectors` part of an extra config for a POSIX store at `path` (prefix reuse)."""
    return {
        "ucm_connectors": [
            {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(path)}}
        ]
    }


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
