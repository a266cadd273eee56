"""Backend probing and selection: order, the UCM_BACKEND override, and clear errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ucm.ops import BackendSpec, BackendUnavailableError, TorchReferenceOps, get_ops, probe, probe_all
from ucm.ops.registry import ENV_VAR, select_backend_name


def test_probe_order_and_reasons_here() -> None:
    results = {r.name: r for r in probe_all()}
    assert [r.name for r in probe_all()][:3] == ["cuda", "ascend", "cpu"]
    assert results["cpu"].available and results["reference"].available
    if not results["cuda"].available:
        assert "cuda" in results["cuda"].reason.lower() or "triton" in results["cuda"].reason.lower()


def test_default_picks_first_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    first = next(r.name for r in probe_all() if r.available)
    assert select_backend_name() == first
    assert get_ops().name == first


@pytest.mark.parametrize("name", ["cpu", "reference", " CPU "])
def test_env_var_forces_a_backend(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(ENV_VAR, name)
    assert get_ops().name == name.strip().lower()


def test_argument_beats_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "cpu")
    assert get_ops("reference").name == "reference"


def test_forcing_an_unavailable_backend_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    if probe("cuda").available:
        pytest.skip("this machine has CUDA; the error path needs a machine without it")
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(
        BackendUnavailableError, match=r"'cuda' \(from the environment variable UCM_BACKEND\) is unavailable: .*"
    ):
        get_ops()


def test_unknown_backend_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="valid names: ascend, cpu, cuda, reference"):
        get_ops("tpu")


def test_extra_backends_register_by_class_path() -> None:
    extra = {"mine": BackendSpec("mine", "ucm.ops.reference:TorchReferenceOps", None, "test")}
    assert isinstance(get_ops("mine", extra), TorchReferenceOps)
    broken = {"broken": BackendSpec("broken", "ucm.ops.reference:TorchReferenceOps", "no.such.module:probe")}
    result = probe("broken", broken)
    assert not result.available and "probe failed: ModuleNotFoundError" in result.reason


def test_registry_imports_no_backend_until_selected() -> None:
    code = (
        "import sys, ucm.ops; ucm.ops.probe_all(); "
        "print(sorted(m for m in sys.modules if m.startswith('ucm_backends') and not m.endswith('probe')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() in ("[]", "['ucm_backends', 'ucm_backends.ascend', 'ucm_backends.cpu', 'ucm_backends.cuda']")
    assert "ops" not in out and "kernels" not in out
