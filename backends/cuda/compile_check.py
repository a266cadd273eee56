"""Compile every Triton kernel of `CudaOps` for a GPU target, on a machine without a GPU.

Triton's interpreter (TRITON_INTERPRET=1) checks what the kernels compute, but it runs them as
Python: a kernel it accepts can still be refused by Triton's compiler (a loop-carried value that
changes type, a scalar where a block is needed, ...), and on the GPU that is an engine that fails
at its first sparse step. This module drives each op of `CudaOps` with the launch shapes of the
GPU engine (decode batches of 1 and 8, prefill chunks on both write paths, 32K and 128K block
tables of a Qwen3-4B-shaped model, an MLA-shaped and an MHA-shaped model) on CPU tensors, and
turns every launch into a compile for the target (`JITFunction.warmup` under a driver that names
the target): no kernel runs and nothing is computed, so the ops' outputs are meaningless here.

Triton's CUDA compiler (its bundled ptxas) is all it needs. It must run in a process without
TRITON_INTERPRET: the interpreter replaces triton.language's own jit functions at import.

    python -m ucm_backends.cuda.compile_check [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch


@dataclass
class CompileReport:
    """What a compile pass saw: each (kernel, constexpr values) compiled once, and the failures."""

    arch: int
    compiled: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: label -> ptxas's (registers a thread, bytes spilled); None: not asked for (`compile_all`'s usage)
    usage: dict[str, tuple[int, int]] | None = None


class _TargetDriver:
    """The part of Triton's driver interface `JITFunction.run` reads, naming a fixed target."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


class _CompileOnly:
    """`kernel[grid](*args, **kwargs)` that compiles for the target instead of launching."""

    def __init__(self, name: str, fn, report: CompileReport) -> None:
        self.name, self.fn, self.report = name, fn, report

    def __getitem__(self, grid) -> Callable[..., None]:
        def compile_only(*args, **kwargs) -> None:
            # every call compiles (Triton's own cache skips repeats): integer arguments equal to 1
            # or divisible by 16 are specialised too, so one set of constexprs can be two variants
            label = f"{self.name}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"
            try:
                kernel = self.fn.warmup(*args, grid=grid, **kwargs)
            except Exception as exc:  # noqa: BLE001  (every failure is reported, the pass goes on)
                first = str(exc).strip().splitlines()
                failure = f"{label}: {type(exc).__name__}: {first[-1] if first else ''}"
                if failure not in self.report.failures:
                    self.report.failures.append(failure)
            else:
                if label not in self.report.compiled:
                    self.report.compiled.append(label)
                    if self.report.usage is not None:
                        self.report.usage[label] = ptxas_usage(kernel.asm["ptx"], self.report.arch)

        return compile_only


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers a thread, bytes of spill stores) ptxas reports for one kernel's PTX: what
    bounds how many programs share an SM, read without a GPU."""
    from triton.backends.nvidia.compiler import get_ptxas

    tool = get_ptxas(arch)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        cmd = [getattr(tool, "path", tool), "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    if regs is None:
        raise RuntimeError(f"no register count in ptxas's output: {log[-400:]}")
    return int(regs.group(1)), int(spill.group(1)) if spill else 0


def _compile_only_ops(report: CompileReport):
    """A `CudaOps` that takes CPU tensors and whose kernel launches compile for the target."""
    import triton

    from . import kernels
    from .ops import CudaOps

    class CompileOnlyOps(CudaOps):
        def _can_run(self, *tensors: torch.Tensor) -> bool:
            return all(t.device.type == "cpu" for t in tensors)

        def _sm_count(self, device: torch.device) -> int:
            return 132

    ops = CompileOnlyOps(interpret=False)
    ops.use_tuned = False  # no GPU to name: the heuristics, and the tuned shapes below by hand
    ops._k = SimpleNamespace(
        **{
            fn.__name__.lstrip("_"): _CompileOnly(fn.__name__, triton.runtime.jit.JITFunction(fn), report)
            for fn in kernels._KERNELS
        }
    )
    return ops


def _exercise(ops) -> None:
    """Every op with the launch shapes the engine gives it (values are irrelevant: nothing runs)."""
    from .tuned import GroupedLaunch

    bf16 = torch.bfloat16
    hq, hkv, d, bs, nb = 32, 8, 128, 128, 1100
    for batch, m, dtype in ((1, 257, bf16), (8, 257, bf16), (4, 1025, bf16), (8, 257, torch.float16)):
        q = torch.randn(batch, hq, d, dtype=dtype)
        table = torch.randint(0, nb, (batch, m), dtype=torch.int32)
        lens = torch.full((batch,), (m - 1) * bs + 5, dtype=torch.int32)
        for reduce in ("mean", "max"):
            ops.block_scores_dot(q, torch.zeros(nb, hkv, d), table, lens, bs, reduce)
            ops.block_scores_minmax(q, torch.zeros(nb, hkv, d), torch.zeros(nb, hkv, d), table, lens, bs, reduce)
            # groups of 4 and 16 tokens: bf16 / float8 / float32 sums (the tensor-core and the
            # CUDA-core paths); Quest's bounds in float32 and in the keys' dtype
            for groups, sums_dtype in ((32, dtype), (32, torch.float8_e4m3fn), (8, torch.float32)):
                ops.block_scores_dot(q, torch.zeros(nb, groups, hkv, d, dtype=sums_dtype), table, lens, bs, reduce)
            # the batch path with a retrieval stride: into kept scores, rows that keep theirs skipped
            kept, rows = torch.zeros(batch, m), torch.zeros(batch, dtype=torch.bool)
            sums = torch.zeros(nb, 32, hkv, d, dtype=torch.float8_e4m3fn)
            ops.block_scores_dot(q, sums, table, lens, bs, reduce, out=kept, keep_rows=rows)
            # what a tuned file may ask for: several block columns a program, float8 widened to float16
            ops.override_grouped(GroupedLaunch(block_m=4, block_r=32, stages=2, warps=4, widen="float16"))
            for sums_dtype in (dtype, torch.float8_e4m3fn):
                ops.block_scores_dot(q, torch.zeros(nb, 32, hkv, d, dtype=sums_dtype), table, lens, bs, reduce)
            ops.override_grouped(None)
            for bounds_dtype in (torch.float32, dtype):
                mm = torch.zeros(nb, 32, hkv, d, dtype=bounds_dtype)
                ops.block_scores_minmax(q, mm, mm, table, lens, bs, reduce)
                ops.block_scores_minmax(q, mm[:, 0], mm[:, 0], table, lens, bs, reduce)
        scores = torch.randn(batch, m)
        keep = torch.zeros(batch, m, dtype=torch.bool)
        budget = torch.full((batch,), m // 3, dtype=torch.int32)
        for largest in (True, False):
            ops.select_and_rewrite(scores, budget, keep, table, lens, bs, largest)
        out = torch.zeros_like(table)
        ops.select_and_rewrite(
            scores, budget, keep, table, lens, bs, out=out, keep_rows=torch.zeros(batch, dtype=torch.bool)
        )
        ops.topk_early_exit = False  # the histogram passes without their early stop
        ops.select_and_rewrite(scores, budget, keep, table, lens, bs)
        ops.topk_early_exit = True
        ops.block_topk(scores, budget, keep, torch.full((batch,), m, dtype=torch.int32))
        # the batch path's step plan: a policy's budgets (a ratio, a fixed token budget) and counters
        elig = torch.ones(batch, dtype=torch.bool)
        ops.window_budgets(lens, elig, m, bs, 1, 0.3, None, 2, 1, 2, (0, -2, -1))
        ops.window_budgets(lens, elig, m, bs, 2, 1.0, 16, 0, 1, 1, ())
        counts = (torch.zeros(36, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
        ops.add_kept_counts(*counts, lens[None], torch.zeros(36, dtype=torch.int64), lens.long(), elig, bs)
        weight = torch.randn(d, 128)
        codes = torch.zeros(nb, bs, hkv, 16, dtype=torch.uint8)
        for reduce in ("min", "mean", "max"):
            ops.hash_hamming_block_scores(q, weight, codes, table, lens, reduce)
        ops.hamming_block_scores(torch.zeros(batch, hq, 16, dtype=torch.uint8), codes, table, lens, "min")
        # the norm-weighted SimHash scorer: fused query hash + norms, then bf16 / float32 key norms
        for norm_dtype in (bf16, torch.float32):
            k_norms = torch.zeros(nb, bs, hkv, dtype=norm_dtype)
            for reduce in ("min", "mean", "max"):
                ops.hash_cosine_block_scores(q, weight, codes, k_norms, table, lens, reduce)
        q_codes, q_norms = torch.zeros(batch, hq, 16, dtype=torch.uint8), torch.zeros(batch, hq)
        ops.hamming_cosine_block_scores(q_codes, q_norms, codes, k_norms, table, lens, "min")
        reps = torch.zeros(nb, hkv, d, bs // 2, dtype=bf16)
        ops.kvstar_block_mass(q[:, None], reps, torch.zeros(nb, hkv, d), table, lens, bs, 32, 0.088)
        k_cache = torch.zeros(nb, bs, hkv, d, dtype=dtype)
        ops.paged_decode_attention(q, k_cache, k_cache, table, lens, 0.088)
    # representation writes: decode batches (the in-kernel scan), a prefill chunk, a long one (sort)
    for t in (1, 8, 300, 5000):
        key = torch.randn(t, hkv, d, dtype=bf16)
        slots = torch.arange(t, dtype=torch.int64)
        ops.block_sums_add(torch.zeros(nb, 1, hkv, d), None, key, slots, bs, bs)
        ops.block_sums_add(torch.zeros(nb, bs // 2, hkv, d), torch.zeros(nb, hkv, d), key, slots, bs, 2)
        for sums_dtype in (bf16, torch.float8_e4m3fn):  # half-precision group sums of 4 keys
            ops.block_sums_add(torch.zeros(nb, bs // 4, hkv, d, dtype=sums_dtype), None, key, slots, bs, 4)
        for bounds_dtype in (torch.float32, bf16):  # Quest's bounds: float32 or the keys' own dtype
            bounds = [torch.zeros(nb, hkv, d, dtype=bounds_dtype) for _ in range(2)]
            ops.block_minmax_update(*bounds, key, slots, bs)
        ops.kvstar_reps_add(torch.zeros(nb, hkv, d, bs // 2, dtype=bf16), torch.zeros(nb, hkv, d), key, slots, bs, 2)
        ops.hash_write(torch.zeros(nb, bs, hkv, 16, dtype=torch.uint8), key, torch.randn(d, 128), slots)
        for center, norm_dtype in ((torch.zeros(hkv, d), bf16), (None, torch.float32)):
            codes, norms = torch.zeros(nb, bs, hkv, 16, dtype=torch.uint8), torch.zeros(nb, bs, hkv, dtype=norm_dtype)
            ops.hash_norm_write(codes, norms, key, torch.randn(d, 128), center, slots)
    # a decode step's writes of every layer in one launch, keys read from vLLM 0.26's cache layout
    caches = [torch.zeros(nb, hkv, bs, 2 * d, dtype=bf16).transpose(1, 2)[..., :d] for _ in range(2)]
    for t in (1, 8):
        slots = torch.arange(t, dtype=torch.int64)
        for sums_dtype in (torch.float32, bf16, torch.float8_e4m3fn):
            sums = [torch.zeros(nb, bs // 4, hkv, d, dtype=sums_dtype) for _ in caches]
            ops.reps_write_layers("sums", sums, [None, None], caches, slots, bs, 4)
        for bounds_dtype, merge in ((torch.float32, bs), (bf16, bs), (bf16, 4)):  # Quest: per block or group
            bounds = [[torch.zeros(nb * bs // merge, hkv, d, dtype=bounds_dtype) for _ in caches] for _ in range(2)]
            ops.reps_write_layers("minmax", *bounds, caches, slots, bs, merge)
        reps = [torch.zeros(nb, hkv, d, bs // 2, dtype=bf16) for _ in caches]
        ops.reps_write_layers("kvstar", reps, [torch.zeros(nb, hkv, d) for _ in caches], caches, slots, bs, 2)
        codes = [torch.zeros(nb, bs, hkv, 16, dtype=torch.uint8) for _ in caches]
        ops.hash_write_layers(codes, caches, [torch.randn(d, 128) for _ in caches], slots)
        for norm_dtype in (bf16, torch.float32):  # a layer with a center and one without
            norms = [torch.zeros(nb, bs, hkv, dtype=norm_dtype) for _ in caches]
            weights = [torch.randn(d, 128) for _ in caches]
            ops.hash_norm_write_layers(codes, norms, caches, weights, [torch.zeros(hkv, d), None], slots)
    ops.sign_bits_pack(torch.randn(8, hkv, 128))
    ops.hash_encode(torch.randn(8, hkv, d, dtype=bf16), torch.randn(d, 128))
    # MLA-shaped (one latent head of 576, 128 query heads) and MHA-shaped (G = 1) models
    for hq_, hkv_, d_, bits in ((128, 1, 576, 576), (16, 16, 64, 64)):
        q = torch.randn(8, hq_, d_, dtype=bf16)
        table = torch.randint(0, nb, (8, 257), dtype=torch.int32)
        lens = torch.full((8,), 256 * bs + 5, dtype=torch.int32)
        ops.block_scores_dot(q, torch.zeros(nb, hkv_, d_), table, lens, bs, "mean")
        ops.block_scores_minmax(q, torch.zeros(nb, hkv_, d_), torch.zeros(nb, hkv_, d_), table, lens, bs, "max")
        codes = torch.zeros(nb, bs, hkv_, bits // 8, dtype=torch.uint8)
        ops.hash_hamming_block_scores(q, torch.randn(d_, bits), codes, table, lens, "min")
        k_norms = torch.zeros(nb, bs, hkv_, dtype=bf16)
        ops.hash_cosine_block_scores(q, torch.randn(d_, bits), codes, k_norms, table, lens, "min")
        key = torch.randn(8, hkv_, d_, dtype=bf16)
        ops.hash_write(codes, key, torch.randn(d_, bits), torch.arange(8))
        ops.block_sums_add(torch.zeros(nb, 1, hkv_, d_), None, key, torch.arange(8), bs, bs)
        norms = torch.zeros(nb, bs, hkv_, dtype=bf16)
        ops.hash_norm_write(codes, norms, key, torch.randn(d_, bits), torch.zeros(hkv_, d_), torch.arange(8))
    # codes whose width is no multiple of 4 bytes: the scorer on bytes
    codes = torch.zeros(nb, bs, hkv, 6, dtype=torch.uint8)
    table = torch.randint(0, nb, (8, 257), dtype=torch.int32)
    lens = torch.full((8,), 256 * bs + 5, dtype=torch.int32)
    k_norms = torch.zeros(nb, bs, hkv, dtype=bf16)
    ops.hash_cosine_block_scores(torch.randn(8, hq, d, dtype=bf16), torch.randn(d, 48), codes, k_norms, table, lens)


def compile_all(arch: int = 90, usage: bool = False) -> CompileReport:
    """Compile every kernel launch of the exercised ops for sm_`arch`; the report lists both
    (`usage`: and each variant's registers and spills, one more ptxas run each)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs a process without TRITON_INTERPRET=1")
    from triton.runtime.driver import driver

    report = CompileReport(arch, usage={} if usage else None)
    previous = driver._active  # None until a real driver was asked for (none exists without a GPU)
    driver.set_active(_TargetDriver(arch))
    try:
        _exercise(_compile_only_ops(report))
    finally:
        driver.set_active(previous)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    ap.add_argument("--usage", action="store_true", help="also print each variant's registers and spills")
    args = ap.parse_args(argv)
    report = compile_all(args.arch, args.usage)
    for line in report.compiled:
        if report.usage and line in report.usage:
            regs, spill = report.usage[line]
            line = f"{line}  [{regs} registers, {spill} bytes spilled]"
        print("ok  ", line)
    for line in report.failures:
        print("FAIL", line)
    print(f"sm_{report.arch}: {len(report.compiled)} kernel variants compiled, {len(report.failures)} failed")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
