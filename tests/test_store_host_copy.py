"""The DRAM store's byte mover (`ucm.store.dram.copy_host_bytes`): byte-exact at every size and
alignment, all pairs checked before the first byte moves. (It was the op contract's `host_copy` /
`host_copy_many`; host copies now belong to the store.)"""

from __future__ import annotations

import pytest
import torch

from ucm.store.dram import copy_host_bytes


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("nbytes", [0, 1, 4097, 128 * 1024 - 1, 128 * 1024, 512 * 1024 + 77, 3 << 20])
@pytest.mark.parametrize("offsets", [(0, 0), (1, 0), (0, 7), (5, 31)])
def test_copy_is_byte_exact_at_every_size_and_alignment(nbytes: int, offsets: tuple[int, int]) -> None:
    """Unaligned starts and odd lengths; nothing outside the destination is touched."""
    g = gen(nbytes + offsets[0])
    src_raw = torch.randint(0, 256, (nbytes + 64,), dtype=torch.uint8, generator=g)
    dst_raw = torch.zeros(nbytes + 64, dtype=torch.uint8)
    src = src_raw[offsets[0] : offsets[0] + nbytes]
    dst = dst_raw[offsets[1] : offsets[1] + nbytes]
    copy_host_bytes([dst], [src])
    assert torch.equal(dst, src)
    assert not dst_raw[: offsets[1]].any() and not dst_raw[offsets[1] + nbytes :].any()


def test_copy_rejects_mismatched_buffers() -> None:
    with pytest.raises(ValueError, match="one size"):
        copy_host_bytes([torch.zeros(8, dtype=torch.uint8)], [torch.zeros(9, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        copy_host_bytes([torch.zeros(8, dtype=torch.float32)], [torch.zeros(8, dtype=torch.float32)])
    with pytest.raises(ValueError, match="destinations"):
        copy_host_bytes([torch.zeros(8, dtype=torch.uint8)], [])
    meta = torch.empty(8, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="host tensors"):
        copy_host_bytes([meta], [torch.zeros(8, dtype=torch.uint8)])


def test_copy_moves_every_pair_or_none() -> None:
    g = gen(99)
    sizes = [0, 300, 200 * 1024 + 3, 64]
    srcs = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
    dsts = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    copy_host_bytes(dsts, srcs)
    assert all(torch.equal(d, s) for d, s in zip(dsts, srcs, strict=True))
    fresh = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    with pytest.raises(ValueError, match="one size"):  # the last pair is short: nothing is copied
        copy_host_bytes(fresh, srcs[:-1] + [torch.zeros(63, dtype=torch.uint8)])
    assert not any(d.any() for d in fresh)
