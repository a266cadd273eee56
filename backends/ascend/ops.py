"""Ascend backend: the op contract on Huawei NPUs through torch_npu.

Only the hash bit packing has a dedicated NPU op (`torch_npu.npu_sign_bits_pack`); every other
op is the pure-torch reference, which torch_npu runs on the `npu` device. This module imports
torch_npu at import time on purpose: the registry imports it only when the Ascend backend is
selected, so machines without torch_npu never reach this line.

Documented semantics of the two torch_npu ops used here (what `tests/test_ascend_semantics.py`
models in NumPy):
    npu_sign_bits_pack(x, size):     x 1-D float16/float32 of length n -> uint8 [size, ceil(n/8)/size];
                                     bit = 1 iff x >= 0, bit i of byte j is element 8*j + i,
                                     the tail padded with -1.0 (a 0 bit). ceil(n/8) % size == 0.
    npu_sign_bits_unpack(x, size, dtype): x 1-D uint8 of length c -> [size, 8*c/size] of +-1.0.
"""

from __future__ import annotations

import torch
import torch_npu  # noqa: F401  (registers the npu device and the torch_npu.npu_* ops)

from ucm.ops.reference import TorchReferenceOps

#: float dtypes the torch_npu sign-bit ops take and produce
_PACK_DTYPES = (torch.float16, torch.float32)


def _pack_input(x: torch.Tensor) -> torch.Tensor:
    """x as +-1.0 float16, with the contract's sign decided in x's own dtype.

    Deciding the sign before any dtype conversion keeps it exact (a tiny negative float64 would
    flush to -0.0 in float32 and flip its bit) and makes NaN a 0 bit, as the contract's
    `x >= 0` says; torch_npu's documented NumPy model (sign(x) + 1 cast to bool) would give 1
    for NaN, so we do not leave that case to the hardware. float16 is the one input dtype every
    Ascend SoC accepts (Atlas 200/300/500 inference cards take nothing else), and it halves the
    bytes the pack kernel reads. One elementwise pass, no host synchronisation.
    """
    one = torch.ones((), dtype=torch.float16, device=x.device)
    return torch.where(x >= 0, one, -one)


def npu_pack_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., n] float -> [..., ceil(n/8)] uint8 with one call of torch_npu.npu_sign_bits_pack.

    The NPU op is 1-D and pads only the end of the whole tensor, so a row whose length is not a
    multiple of 8 would share its last byte with the next row. Each row is therefore padded to a
    whole number of bytes with -1.0 (a 0 bit, as the contract requires) before flattening; the
    op's `size` argument (first output dim) is the number of rows, which always divides the
    byte count because every row owns the same number of bytes.
    """
    lead = x.shape[:-1]
    n = x.shape[-1]
    nbytes = (n + 7) // 8
    rows = 1
    for d in lead:
        rows *= d
    if rows == 0 or nbytes == 0:  # the op rejects size == 0; nothing to pack anyway
        return torch.empty(*lead, nbytes, dtype=torch.uint8, device=x.device)
    v = _pack_input(x).reshape(rows, n)
    pad = nbytes * 8 - n
    if pad:
        v = torch.nn.functional.pad(v, (0, pad), value=-1.0)
    packed = torch_npu.npu_sign_bits_pack(v.contiguous().view(-1), rows)  # [rows, nbytes]
    return packed.reshape(*lead, nbytes)


def npu_unpack_rows(codes: torch.Tensor, n: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., C] uint8 -> [..., n] of +-1.0 (1.0 where the bit is set): the inverse of the pack.

    Useful to check codes on the device and to compare them with the float projections they
    came from. n defaults to 8*C; a smaller n drops the padding bits.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if dtype not in _PACK_DTYPES:
        raise TypeError(f"npu_sign_bits_unpack produces float16 or float32, not {dtype}")
    lead = codes.shape[:-1]
    c = codes.shape[-1]
    n = 8 * c if n is None else n
    if not 0 <= n <= 8 * c:
        raise ValueError(f"n={n} must be in [0, {8 * c}] for {c} code bytes")
    rows = 1
    for d in lead:
        rows *= d
    if rows == 0 or c == 0:
        return torch.empty(*lead, n, dtype=dtype, device=codes.device)
    # argument order (x, size, dtype) is the torch_npu 2.1+ signature; older releases took (x, dtype, size)
    bits = torch_npu.npu_sign_bits_unpack(codes.contiguous().view(-1), rows, dtype)  # [rows, 8*c]
    return bits.reshape(*lead, 8 * c)[..., :n]


class AscendOps(TorchReferenceOps):
    """The contract on an Ascend NPU: NPU bit packing, reference torch ops for the rest."""

    name = "ascend"

    def sign_bits_pack(self, x: torch.Tensor) -> torch.Tensor:
        return npu_pack_rows(x)

    def hash_encode(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        proj = torch.matmul(x.to(torch.float32), weight.to(device=x.device, dtype=torch.float32))
        return npu_pack_rows(proj)

    def sign_bits_unpack(
        self, codes: torch.Tensor, n: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Backend extra (not in the contract): codes back to +-1.0, see `npu_unpack_rows`."""
        return npu_unpack_rows(codes, n, dtype)
