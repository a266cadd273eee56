"""Whether the CUDA backend can run here, without importing Triton kernels."""

import importlib.util


def probe() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no NVIDIA GPU or a CPU-only torch build)"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    return None
