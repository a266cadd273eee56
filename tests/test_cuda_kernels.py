"""The CUDA backend's own wiring: registry name and the reference fallback for inputs the kernels
do not take. Every op's kernels are checked against the reference (on a GPU, else under Triton's
CPU interpreter) in tests/test_ops_conformance.py, with both top-k strategies and split attention.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before triton is first imported (its reductions are
    # jit functions built at import time); on a CPU-only machine nothing else here needs it off.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ucm.ops.reference import TorchReferenceOps

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = HAS_TRITON and torch.cuda.is_available()

pytestmark = pytest.mark.skipif(
    not HAS_TRITON,
    reason="the CUDA backend's kernels need triton (on a GPU, or its CPU interpreter): pip install triton",
)

DEV = "cuda" if ON_GPU else "cpu"
BIG = ON_GPU  # full shapes on a GPU, tiny ones in the interpreter
REF = TorchReferenceOps()


@pytest.fixture(scope="module")
def ops(cuda_ops):
    return cuda_ops


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


# ------------------------------------------------------------------------------------- wiring
def test_registry_and_fallbacks(ops):
    assert ops.name == "cuda"
    # CPU float64 scores are outside the kernels: the reference answers
    scores = torch.randn(2, 5, dtype=torch.float64, device=DEV)
    k = torch.tensor([2, 3], device=DEV)
    keep = torch.zeros(2, 5, dtype=torch.bool, device=DEV)
    nbk = torch.tensor([5, 4], device=DEV)
    got = ops.block_topk(scores, k, keep, nbk)
    want = REF.block_topk(scores, k, keep, nbk)
    assert torch.equal(got[0], want[0])
    if ON_GPU:
        from ucm.ops.registry import get_ops

        assert get_ops("cuda").name == "cuda"
