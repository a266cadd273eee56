"""What every ucm attention wrapper does the same way, whatever the platform.

The wrappers (cpu_attn.py, flash_attn.py, ascend_attn.py) subclass a stock attention impl and
differ only in where the platform writes the KV cache, how its cache is laid out and which
metadata fields its kernel reads. The rest is here:

* `decoder_runtime`: the guard in front of both hooks: decoder self-attention only, an active
  ucm runtime (a UCMConnector with a sparse config, inside a step), then the method built for
  this layer's shapes (`ensure_method`, a no-op after the first layer);
* `kv_written`: the write hook: the keys just written, with their slots, to the method (and to
  the test observers);
* `rewrite_rows`: the row patch: the block table and lengths the kernel reads, with the decode
  rows replaced by their selection;
* `notify_decode`: the test observers' view of a decode layer's output.

This module imports no vLLM attention backend (the wrappers do), so every platform can use it.
"""

from __future__ import annotations

import torch

from ucm.integration.vllm.connector import find_runtime
from ucm.integration.vllm.runtime import SparseRuntime

# vLLM's AttentionType.DECODER; AttentionType is a str enum, so its members compare equal to
# their values (and the module that defines it differs between vLLM releases)
DECODER = "decoder"


def decoder_runtime(
    impl,
    num_blocks: int,
    block_size: int,
    device: torch.device,
    *,
    manager_block_size: int | None = None,
    platform: str = "",
    splits: str = "",
    key_dtype: torch.dtype | None = None,
) -> SparseRuntime | None:
    """The active runtime, with its method ready for `impl`'s heads, or None (stay stock).

    `impl` is the stock attention impl (num_heads, num_kv_heads, head_size, attn_type);
    `num_blocks` / `block_size` describe the layer's KV cache as the kernel sees it. With
    `manager_block_size`, a kernel block size that differs from the KV manager's fails (see
    `check_block_size`) instead of selecting through block ids that do not address the cache.
    `key_dtype`: the dtype of the keys the layer writes (what the method's bounds may be kept in).
    """
    if impl.attn_type != DECODER:
        return None
    rt = find_runtime()
    if rt is None or not (rt.active or rt.batch_mode):  # batch mode is driven by the attention metadata alone
        return None
    if manager_block_size is not None:
        check_block_size(block_size, manager_block_size, platform, splits)
    rt.ensure_method(impl.num_heads, impl.num_kv_heads, impl.head_size, block_size, num_blocks, device, key_dtype)
    return rt


def check_block_size(block_size: int, manager_block_size: int, platform: str, splits: str) -> None:
    """The scheduler's block ids (which tell the runtime which row is which request) address
    the KV manager's blocks; where the platform splits them into smaller kernel blocks they do
    not address the kernel's cache."""
    if block_size != manager_block_size:
        raise ValueError(
            f"ucm on {platform}: the attention kernel's block size {block_size} differs from the KV manager's "
            f"{manager_block_size} ({splits}), so the scheduler's block ids do not address this cache; run with "
            f"--block-size {block_size}"
        )


def kv_written(
    rt: SparseRuntime,
    layer_name: str,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_cache: torch.Tensor | None = None,
) -> None:
    """After the platform wrote `key`/`value` at `slot_mapping`: the keys go to the method
    (hash codes / block representations are built from the keys, not from the cache layout;
    `key_cache`, the layer's cache as [NB, bs, Hkv, D] where the wrapper gives it, lets the
    batch path write every layer's representations at the step's last layer)."""
    rt.on_kv_written(layer_name, key, slot_mapping, key_cache)
    if rt.observers:
        rt.notify_kv(layer_name, key, value, slot_mapping)


def rewrite_rows(
    covers_batch: bool, rows: torch.Tensor, sel, block_table: torch.Tensor, seq_lens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(block_table, seq_lens)` for the kernel, the decode `rows` reading only `sel`'s blocks.

    When the step decodes every row of the batch in order (`covers_batch`) and the selection's
    table has the batch table's shape and dtype, the selection's own table and lengths (fresh
    tensors, never written by a kernel) are used as they are; otherwise the batch's tensors are
    cloned and the rows patched (prefill and non-sparse rows keep their own). The shared inputs
    are never written. Without `seq_lens` only the table is rewritten (the second item is None).
    """
    table = sel.block_table
    if covers_batch and table.shape == block_table.shape and table.dtype == block_table.dtype:
        if seq_lens is None:
            return table, None
        lens = sel.seq_lens if sel.seq_lens.dtype == seq_lens.dtype else sel.seq_lens.to(seq_lens.dtype)
        return table, lens
    out_table = block_table.clone()
    out_table[rows, : table.shape[1]] = table.to(out_table.dtype)
    if seq_lens is None:
        return out_table, None
    out_lens = seq_lens.clone()
    out_lens[rows] = sel.seq_lens.to(out_lens.dtype)
    return out_table, out_lens


class KVWriteHook:
    """Mixin before a stock attention impl: after the stock cache write, the written keys go to
    the runtime. The wrapper provides `_runtime(kv_cache, device)` (its layout's guard) and may
    provide `_key_cache(kv_cache)` (its layout's keys as [NB, bs, Hkv, D], or None)."""

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        rt = self._runtime(kv_cache, key.device)
        if rt is not None:
            key_cache = self._key_cache(kv_cache) if rt.deferred is not None else None
            kv_written(rt, layer.layer_name, key, value, slot_mapping, key_cache)

    def _key_cache(self, kv_cache: torch.Tensor) -> torch.Tensor | None:
        return None


def notify_decode(
    rt: SparseRuntime, layer_name: str, picked, query: torch.Tensor, query_start_loc: torch.Tensor, output: torch.Tensor
) -> None:
    """Test observers see each decode row's query and output (only when some are attached)."""
    if picked is not None and rt.observers:
        rt.notify_decode(layer_name, picked[0], picked[1], query, query_start_loc, output)
