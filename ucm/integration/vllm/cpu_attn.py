"""vLLM's CPU attention with ucm's decode sparsity.

For decode rows, the block table and lengths are rewritten to the selected blocks (a copy:
vLLM shares one metadata object across layers), the CPU kernel's scheduler metadata is
recomputed for the new lengths, and the stock kernel runs. Without an active ucm runtime the
wrapper is exactly the stock backend.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm import _custom_ops as vllm_ops
from vllm import envs
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from ucm.integration.vllm.connector import find_runtime
from ucm.integration.vllm.wrapper_core import KVWriteHook, decoder_runtime, notify_decode, rewrite_rows


class UCMCPUAttentionBackendImpl(KVWriteHook, CPUAttentionBackendImpl):
    def _runtime(self, kv_cache: torch.Tensor, device: torch.device):
        if kv_cache.numel() == 0:
            return None
        num_blocks, _, block_size, _ = kv_cache.shape  # [NB, Hkv, bs, 2 * D]
        return decoder_runtime(self, num_blocks, block_size, device)

    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
    ):
        rt = self._runtime(kv_cache, query.device) if attn_metadata is not None else None
        picked = None
        if rt is not None:
            block_size = kv_cache.shape[2]
            picked = rt.decode_selection(
                layer.layer_name,
                query,
                attn_metadata.query_start_loc,
                attn_metadata.seq_lens,
                attn_metadata.block_table,
                block_size,
            )
            if picked is not None:
                attn_metadata = self._sparse_metadata(layer, query, attn_metadata, *picked, rt=rt)
        out = super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )
        if picked is not None:
            notify_decode(rt, layer.layer_name, picked, query, attn_metadata.query_start_loc, output)
        return out

    def _sparse_metadata(self, layer, query, md, rows, sel, rt=None):
        """A copy of `md` whose decode rows read only the selected blocks.

        When the decode rows are the whole batch in order (a pure decode step), the selection's
        own table and lengths (fresh tensors, never written by the kernel) are used as they are
        instead of patching a clone. The kernel's scheduler metadata depends only on the lengths
        (and per-step constants), and sparse layers of one step mostly share their lengths, so it
        is computed once per distinct length vector per step.
        """
        rt = rt if rt is not None else find_runtime()
        covers = rt is not None and rt.decode_rows_cover_batch()
        block_table, seq_lens = rewrite_rows(covers, rows, sel, md.block_table, md.seq_lens)
        lens = tuple(seq_lens.tolist())
        cache = rt.step_cache() if rt is not None else {}
        key = ("cpu_sched", id(md), lens)
        scheduler_metadata = cache.get(key)
        if scheduler_metadata is None:
            scheduler_metadata = vllm_ops.cpu_attn_get_scheduler_metadata(
                num_reqs=int(seq_lens.shape[0]),
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_size,
                seq_lens=seq_lens,
                dtype=query.dtype,
                query_start_loc=md.query_start_loc,
                causal=md.causal,
                sliding_window_size=self.sliding_window,
                isa=layer.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                dynamic_causal=md.dynamic_causal,
                kv_cache_dtype=self.kv_cache_dtype,
            )
            cache[key] = scheduler_metadata
        return dataclasses.replace(
            md,
            block_table=block_table,
            seq_lens=seq_lens,
            scheduler_metadata=scheduler_metadata,
            max_seq_len=max(lens, default=0),
        )


class UCMCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[UCMCPUAttentionBackendImpl]:
        return UCMCPUAttentionBackendImpl
