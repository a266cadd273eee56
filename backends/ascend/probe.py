"""Whether the Ascend backend can run here, importing torch_npu only if it is installed."""

import importlib.util


def probe() -> str | None:
    if importlib.util.find_spec("torch_npu") is None:
        return "torch_npu is not installed (pip install torch-npu on an Ascend host with CANN)"
    import torch
    import torch_npu  # noqa: F401  (registers torch.npu)

    if not torch.npu.is_available():
        return "torch_npu is installed but torch.npu.is_available() is False (no NPU or driver)"
    return None
