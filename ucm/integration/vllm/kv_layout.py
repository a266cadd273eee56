"""How one attention backend lays out its paged KV cache: the only module that knows it.

The store moves a layer's block as opaque bytes (any layout round-trips), but the sparse
scorers need the *keys* of blocks that arrive from the store instead of being written by the
attention layer, so reading keys back is layout-specific. Each adapter is checked against the
backend's own cache-write op in tests (tests/test_vllm_store.py).
"""

from __future__ import annotations

import torch


class CpuKVLayout:
    """vLLM-CPU (`CPU_ATTN`): per layer `[num_blocks, kv_heads, block_size, 2 * head_dim]`.

    Inside one block and head the first `block_size * head_dim` elements are K and the rest V.
    For the `vec`/`vec16` kernels K is stored dim-major (`[head_dim, block_size]`, so the
    kernel reads one dimension across tokens contiguously) and V token-major. Other ISAs
    (AMX, NEON, ...) use other packings that have not been checked, so they are refused.
    """

    VERIFIED_ISAS = ("vec", "vec16")

    def __init__(self, isa: str) -> None:
        if isa not in self.VERIFIED_ISAS:
            raise NotImplementedError(
                f"reading keys back from vLLM-CPU's {isa!r} KV layout is not implemented "
                f"(verified: {', '.join(self.VERIFIED_ISAS)}); sparse decode cannot use blocks loaded from a store here"
            )
        self.isa = isa

    @staticmethod
    def block_bytes(kv_cache: torch.Tensor) -> torch.Tensor:
        """A `[num_blocks, page_bytes]` uint8 view of one layer's cache (no copy)."""
        if not kv_cache.is_contiguous():
            raise ValueError("the KV cache of a layer must be contiguous to move whole blocks")
        return kv_cache.view(kv_cache.shape[0], -1).view(torch.uint8)

    @staticmethod
    def keys(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """The keys of whole blocks, `[len(block_ids) * block_size, kv_heads, head_dim]`, token order."""
        _, heads, block_size, two_d = kv_cache.shape
        head_dim = two_d // 2
        n = block_ids.numel()
        blocks = kv_cache.index_select(0, block_ids).view(n, heads, 2 * block_size * head_dim)
        k = blocks[:, :, : block_size * head_dim].reshape(n, heads, head_dim, block_size)
        return k.permute(0, 3, 1, 2).reshape(n * block_size, heads, head_dim)
