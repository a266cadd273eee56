"""vLLM general plugin (entry point `vllm.general_plugins: ucm`): runs in every vLLM process.

It swaps the current platform's attention backend for ucm's wrapper, which behaves exactly like
the stock one unless a UCMConnector with a sparse config is active:

* vLLM-CPU: `register_backend(CPU_ATTN, ...)`, vLLM's own override registry (the CPU platform
  resolves its backend through it). Nothing else in vLLM is patched.
* vLLM on NVIDIA GPUs (the CUDA platform, not ROCm): `register_backend(FLASH_ATTN, ...)` the same
  way (the CUDA platform resolves backends through that registry too). Not run: see docs/vllm.md.
  Only a class path is registered; `flash_attn.py` is imported when vLLM builds the layers.
* vllm-ascend: its platform returns backend class paths itself and never reads that registry,
  so `install_ascend` wraps the platform's `get_attn_backend_cls` to map the one stock path ucm
  wraps to ucm's subclass (see docs/ascend.md). Nothing here imports vllm_ascend; vLLM imports
  ucm's `ascend_attn` module by its path when it builds the attention layers.
* any other platform: nothing is registered, and the log says so.
"""

from __future__ import annotations

import logging

from ucm.integration.vllm.version import check_vllm_version

logger = logging.getLogger("vllm.ucm")

# platform kind -> {vLLM backend enum name -> ucm's subclass}, registered with register_backend
WRAPPERS = {
    "cpu": {"CPU_ATTN": "ucm.integration.vllm.cpu_attn.UCMCPUAttentionBackend"},
    "cuda": {"FLASH_ATTN": "ucm.integration.vllm.flash_attn.UCMFlashAttentionBackend"},
}
# vllm-ascend's stock backend class path -> ucm's subclass of it
ASCEND_WRAPPERS = {
    "vllm_ascend.attention.attention_v1.AscendAttentionBackend": (
        "ucm.integration.vllm.ascend_attn.UCMAscendAttentionBackend"
    ),
}
CONNECTOR_MODULE = "ucm.integration.vllm.connector"


def platform_kind(platform=None) -> str:
    """'cpu', 'cuda' (NVIDIA), 'rocm', 'ascend' (vllm-ascend's NPU platform), or another
    platform's device type.

    Reads vLLM's resolved platform (`current_platform` unless one is given): vLLM imports
    vllm_ascend itself only where it is installed, and this never imports it.
    """
    if platform is None:
        from vllm.platforms import current_platform as platform
    if platform.is_cpu():
        return "cpu"
    if platform.is_cuda():
        return "cuda"
    if platform.is_rocm():  # its device_type is "cuda" too, but its backends are not the ones wrapped
        return "rocm"
    device_type = str(getattr(platform, "device_type", "") or "")
    if device_type == "npu" and type(platform).__module__.split(".")[0] == "vllm_ascend":
        return "ascend"
    return device_type or type(platform).__name__


def register(platform=None) -> None:
    try:
        version = check_vllm_version()
    except RuntimeError as exc:
        logger.warning("ucm: attention wrappers not registered: %s", exc)
        return
    kind = platform_kind(platform)
    if kind in WRAPPERS:
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        for name, path in WRAPPERS[kind].items():
            register_backend(AttentionBackendEnum[name], path)
        logger.debug(
            "ucm: registered attention wrappers for vLLM %s on %s: %s", version, kind, ", ".join(WRAPPERS[kind])
        )
    elif kind == "ascend":
        platform_cls = install_ascend(ASCEND_WRAPPERS, platform)
        logger.debug(
            "ucm: %s.get_attn_backend_cls maps %s (vLLM %s)",
            platform_cls.__name__,
            ", ".join(f"{k} -> {v}" for k, v in ASCEND_WRAPPERS.items()),
            version,
        )
    else:
        logger.info(
            "ucm: no attention wrapper for the %r platform (ucm wraps vLLM-CPU, vLLM-CUDA FlashAttention "
            "and vllm-ascend); "
            "ucm's sparse attention stays off here",
            kind,
        )


def install_ascend(wrappers: dict[str, str], platform=None) -> type:
    """Make vllm-ascend's platform return ucm's subclass wherever it would return a wrapped
    stock backend.

    Its `get_attn_backend_cls` picks class paths from a table of its own; the replacement calls
    it and maps only the paths in `wrappers`, so MLA/SFA/DSA/310P/FA3 choices pass through
    unchanged. Installing twice is a no-op. Returns the platform class.
    """
    if platform is None:
        from vllm.platforms import current_platform as platform
    cls = type(platform)
    stock = cls.get_attn_backend_cls.__func__
    if getattr(stock, "_ucm_wrappers", None) is not None:
        return cls

    def get_attn_backend_cls(klass, *args, **kwargs):
        path = stock(klass, *args, **kwargs)
        if path in wrappers:
            return wrappers[path]
        from vllm.config import get_current_vllm_config_or_none

        if ucm_sparse_requested(get_current_vllm_config_or_none()):
            logger.warning(
                "ucm: vllm-ascend chose %s, which ucm does not wrap (only %s): these layers decode densely",
                path,
                ", ".join(wrappers),
            )
        return path

    get_attn_backend_cls._ucm_wrappers = wrappers  # type: ignore[attr-defined]
    cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    return cls


def ucm_sparse_requested(vllm_config) -> bool:
    """Whether ucm's connector (top level or inside a MultiConnector) carries a sparse config."""
    from ucm.config.loader import SPARSE_KEY

    ktc = getattr(vllm_config, "kv_transfer_config", None)
    if ktc is None:
        return False
    extra = ktc.kv_connector_extra_config or {}
    entries = [{"kv_connector_module_path": ktc.kv_connector_module_path, "kv_connector_extra_config": extra}]
    entries += [c for c in extra.get("connectors", []) if isinstance(c, dict)]
    return any(
        e.get("kv_connector_module_path") == CONNECTOR_MODULE
        and (e.get("kv_connector_extra_config") or {}).get(SPARSE_KEY)
        for e in entries
    )
