"""The Ascend backend's extra (`sign_bits_unpack`) on a real NPU. Every contract op runs on the
NPU against the reference in tests/test_ops_conformance.py (backend "ascend"), skipped with the
probe's reason wherever the backend cannot run; tests/test_ascend_semantics.py models torch_npu.

UCM_ASCEND_TEST_DEVICE overrides the device (default "npu"); it exists to dry-run this file's
logic elsewhere with a stand-in torch_npu, never as a way to claim NPU coverage.
"""

from __future__ import annotations

import os

import pytest
import torch

from ucm.ops import TorchReferenceOps, get_ops, probe

_PROBE = probe("ascend")
DEVICE = os.environ.get("UCM_ASCEND_TEST_DEVICE", "npu")

pytestmark = [
    pytest.mark.npu,
    pytest.mark.skipif(not _PROBE.available, reason=f"needs an Ascend NPU with torch_npu: {_PROBE.reason}"),
]

SEEDS = list(range(6))
REF = TorchReferenceOps()


@pytest.fixture(scope="module")
def ops():
    backend = get_ops("ascend")
    assert backend.name == "ascend"
    return backend


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def test_sign_bits_unpack_round_trip(ops) -> None:
    if not hasattr(ops, "sign_bits_unpack"):
        pytest.skip("backend has no unpack helper")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 37, generator=gen)
    signs = cpu(ops.sign_bits_unpack(ops.sign_bits_pack(dev(x)), 37, torch.float32))
    assert torch.equal(signs, torch.where(x >= 0, 1.0, -1.0))
