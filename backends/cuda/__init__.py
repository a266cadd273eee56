"""CUDA backend: Triton kernels for NVIDIA GPUs."""
