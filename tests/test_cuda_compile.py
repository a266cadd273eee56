"""Every CUDA kernel compiles for Hopper (sm_90), checked on machines without a GPU.

The interpreter tests run the kernels as Python, which accepts code Triton's compiler refuses
(a loop-carried value changing type passed them all in session 12 and would have failed the
GPU engine's first sparse step). `ucm_backends.cuda.compile_check` compiles each launch the ops
make, with the engine's shapes, through Triton's own CUDA compiler (its bundled ptxas), in a
process of its own: the interpreter's import-time switch must be off there."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ptxas() -> Path | None:
    spec = importlib.util.find_spec("triton")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


@pytest.mark.skipif(_ptxas() is None, reason="needs triton with its CUDA compiler (ptxas): pip install triton")
def test_every_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "ucm_backends.cuda.compile_check", "--arch", "90", "--usage"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    compiled = [line for line in out.splitlines() if line.startswith("ok ")]
    # each kernel of the backend is among the compiled ones
    from ucm_backends.cuda import kernels

    for fn in kernels._KERNELS:
        assert any(line.split()[1].startswith(fn.__name__ + "(") for line in compiled), fn.__name__
    assert "0 failed" in out.splitlines()[-1]
    # ptxas's registers: the norm_cosine scorer at Qwen3-4B's shape (8 KV heads, 128-bit codes as 4
    # words) stays as light as the Hamming scorer beside it (72); its first version, with
    # [token, KV head, group member] tiles, took 246 a thread and ran at 0.18 of the H100's bound
    cosine = [line for line in compiled if "_hamming_cosine_kernel(W=4," in line and "BLOCK_H=8," in line]
    assert cosine, compiled
    for line in cosine:
        regs, spilled = (int(x) for x in re.search(r"\[(\d+) registers, (\d+) bytes spilled\]", line).groups())
        assert regs <= 96 and spilled == 0, line
