"""The op contract, its pure-torch reference, and the lazy backend registry."""

from ucm.ops.contract import SparseOps
from ucm.ops.reference import TorchReferenceOps
from ucm.ops.registry import (
    ENV_VAR,
    BackendSpec,
    BackendUnavailableError,
    ProbeResult,
    get_ops,
    probe,
    probe_all,
    select_backend_name,
)

__all__ = [
    "ENV_VAR",
    "BackendSpec",
    "BackendUnavailableError",
    "ProbeResult",
    "SparseOps",
    "TorchReferenceOps",
    "get_ops",
    "probe",
    "probe_all",
    "select_backend_name",
]
