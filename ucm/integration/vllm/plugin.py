"""vLLM general plugin (entry point `vllm.general_plugins: ucm`): runs in every vLLM process.

It swaps vLLM's CPU attention backend for ucm's wrapper, which behaves exactly like the stock
one unless a UCMConnector with a sparse config is active. Nothing else in vLLM is patched.
"""

from __future__ import annotations

import logging

from ucm.integration.vllm.version import check_vllm_version

logger = logging.getLogger("vllm.ucm")

WRAPPERS = {"CPU_ATTN": "ucm.integration.vllm.cpu_attn.UCMCPUAttentionBackend"}


def register() -> None:
    try:
        version = check_vllm_version()
    except RuntimeError as exc:
        logger.warning("ucm: attention wrappers not registered: %s", exc)
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    for name, path in WRAPPERS.items():
        register_backend(AttentionBackendEnum[name], path)
    logger.debug("ucm: registered attention wrappers for vLLM %s: %s", version, ", ".join(WRAPPERS))
