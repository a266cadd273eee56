"""Backend registry: which implementation of the op contract runs here.

Backends are named by class path and imported only when selected, so a user without Triton or
torch_npu never imports them. Each backend package has a cheap `probe` module that says whether
it can run on this machine (and why not), without importing the heavy implementation.

Selection order: an explicit name, else the `UCM_BACKEND` environment variable, else the first
available of cuda -> ascend -> cpu.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ucm.ops.contract import SparseOps

ENV_VAR = "UCM_BACKEND"


@dataclass(frozen=True)
class BackendSpec:
    """Where a backend lives: `module:Class` for the ops, `module:function` for its probe.

    The probe returns None when the backend can run here, else a one-line reason.
    """

    name: str
    ops_path: str
    probe_path: str | None = None
    description: str = ""


@dataclass(frozen=True)
class ProbeResult:
    name: str
    available: bool
    reason: str  # "" when available


BUILTIN_BACKENDS: Mapping[str, BackendSpec] = MappingProxyType(
    {
        "cuda": BackendSpec(
            "cuda", "ucm_backends.cuda.ops:CudaOps", "ucm_backends.cuda.probe:probe", "Triton kernels on NVIDIA GPUs"
        ),
        "ascend": BackendSpec(
            "ascend", "ucm_backends.ascend.ops:AscendOps", "ucm_backends.ascend.probe:probe", "torch_npu on Ascend NPUs"
        ),
        "cpu": BackendSpec(
            "cpu", "ucm_backends.cpu.ops:CpuOps", "ucm_backends.cpu.probe:probe", "C++/OpenMP kernels for x86-64 AVX2"
        ),
        "reference": BackendSpec(
            "reference", "ucm.ops.reference:TorchReferenceOps", None, "pure torch, any device (the test oracle)"
        ),
    }
)
PROBE_ORDER: tuple[str, ...] = ("cuda", "ascend", "cpu")


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run on this machine."""


def _resolve(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _specs(extra: Mapping[str, BackendSpec] | None) -> dict[str, BackendSpec]:
    specs = dict(BUILTIN_BACKENDS)
    if extra:
        specs.update(extra)
    return specs


def probe(name: str, extra: Mapping[str, BackendSpec] | None = None) -> ProbeResult:
    """Can backend `name` run here? Never raises for a known name."""
    specs = _specs(extra)
    if name not in specs:
        raise KeyError(f"unknown ucm backend {name!r}; valid names: {', '.join(sorted(specs))}")
    spec = specs[name]
    if spec.probe_path is None:
        return ProbeResult(name, True, "")
    try:
        reason = _resolve(spec.probe_path)()
    except Exception as exc:  # a broken probe must not take probing down with it
        reason = f"probe failed: {type(exc).__name__}: {exc}"
    return ProbeResult(name, reason is None, reason or "")


def probe_all(extra: Mapping[str, BackendSpec] | None = None) -> list[ProbeResult]:
    """Probe results of every known backend, in probing order then the rest."""
    specs = _specs(extra)
    order = [n for n in PROBE_ORDER if n in specs] + sorted(n for n in specs if n not in PROBE_ORDER)
    return [probe(n, extra) for n in order]


def select_backend_name(name: str | None = None, extra: Mapping[str, BackendSpec] | None = None) -> str:
    """The backend that `get_ops(name)` would build, with the reason when a forced one can't run."""
    forced = name or os.environ.get(ENV_VAR) or None
    if forced:
        forced = forced.strip().lower()
        result = probe(forced, extra)
        if not result.available:
            source = "argument" if name else f"environment variable {ENV_VAR}"
            raise BackendUnavailableError(f"ucm backend {forced!r} (from the {source}) is unavailable: {result.reason}")
        return forced
    reasons = []
    for candidate in PROBE_ORDER:
        result = probe(candidate, extra)
        if result.available:
            return candidate
        reasons.append(f"{candidate}: {result.reason}")
    raise BackendUnavailableError("no ucm backend is available: " + "; ".join(reasons))


def get_ops(name: str | None = None, extra: Mapping[str, BackendSpec] | None = None) -> SparseOps:
    """Build the op implementation for `name` (or the probed default). Imports it lazily."""
    chosen = select_backend_name(name, extra)
    cls = _resolve(_specs(extra)[chosen].ops_path)
    ops = cls()
    if not isinstance(ops, SparseOps):
        raise TypeError(f"backend {chosen!r} built {type(ops).__name__}, which does not implement SparseOps")
    return ops
