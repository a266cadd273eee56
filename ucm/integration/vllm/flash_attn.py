"""vLLM's FlashAttention backend (GPU) with ucm's decode sparsity. NOT RUN: see docs/vllm.md.

Written against vLLM 0.32's `vllm/v1/attention/backends/flash_attn.py`; the plugin registers it
as `FLASH_ATTN` on the CUDA platform (`register_backend`, the override registry the CUDA
platform resolves backends through). It mirrors the CPU wrapper:

* The backend writes the KV cache outside `forward` (`forward_includes_kv_cache_update` is
  False): `do_kv_cache_update` calls the stock write, then hands the keys and slots to the
  runtime.
* `forward` asks for the decode rows' selection and runs the stock kernel on a copy of the
  shared `FlashAttentionMetadata` (`sparse_flash_metadata`) whose `block_table` and `seq_lens`
  (the kernel's `seqused_k`) read only the kept blocks. `max_seq_len` stays the batch's: it
  bounds every rewritten length (selection only shortens), and computing the exact maximum
  would cost a device sync per layer. FA3's ahead-of-time `scheduler_metadata` was planned for
  the old lengths and is dropped (FA3 then schedules from `seqused_k` itself). The DCP fields
  are untouched (decode context parallelism is refused below).
* Stays the stock impl, byte for byte, without an active ucm runtime; for prefill rows; for
  encoder / cross attention; for sliding-window, ALiBi and KV-sharing layers (the window and the
  bias count positions, which the compacted table moves; a KV-sharing layer never writes keys
  for the method to score); and for R-SWA or multimodal prefix-LM batches (their masks read
  absolute positions).

Engine start fails, naming the setting, where the per-step Python selection would be skipped
or contradicted: full CUDA graphs (UCMConnector asks vLLM to downgrade them to PIECEWISE),
breakable CUDA graphs, piecewise graphs that capture the attention or the KV-cache write op,
decode context parallelism, or a kernel block size that differs from the KV manager's.

Importing this module needs only vLLM (its flash_attn module imports on a CPU build); running
the kernel needs vLLM's CUDA build with its flash-attn kernels.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadata

from ucm.integration.vllm.plugin import ucm_sparse_requested
from ucm.integration.vllm.wrapper_core import KVWriteHook, decoder_runtime, notify_decode, rewrite_rows

# custom ops that must stay outside captured piecewise graphs: ucm's Python runs inside them
EAGER_OPS = ("vllm::unified_attention_with_output", "vllm::unified_kv_cache_update")
BLOCK_SPLIT = "vLLM splits each KV-manager block into kernel blocks"


def sparse_flash_metadata(md: FlashAttentionMetadata, rows: torch.Tensor, sel, covers_batch: bool,
                          max_seq_len: int | None = None) -> FlashAttentionMetadata:
    """A copy of `md` whose decode `rows` read only `sel`'s blocks (`md` is shared by every
    layer of the step and is never written).

    Rewritten: `block_table`, `seq_lens` (the selection's, in the batch's dtype), `max_seq_len`
    (`max_seq_len` when given, else the batch's, an upper bound of every new length), and
    `scheduler_metadata` (dropped: FA3's plan for the old lengths). Everything else (query
    layout, slots, causal flags, split count) is shared with `md`.
    """
    block_table, seq_lens = rewrite_rows(covers_batch, rows, sel, md.block_table, md.seq_lens)
    return dataclasses.replace(md, block_table=block_table, seq_lens=seq_lens,
                               max_seq_len=md.max_seq_len if max_seq_len is None else int(max_seq_len),
                               scheduler_metadata=None)


def refuse_unsupported(vllm_config, dcp_world_size: int = 1) -> None:
    """Engine start fails, naming the setting, where ucm's per-step selection would be bypassed.
    Called only when a ucm sparse config is present."""
    from vllm.config import CompilationMode

    cc = vllm_config.compilation_config
    mode = cc.cudagraph_mode
    if mode is not None and mode.has_full_cudagraphs():
        raise ValueError(
            f"ucm sparse attention: cudagraph_mode {mode.name} replays decode attention from full CUDA graphs, which "
            "skip ucm's per-step block selection (UCMConnector asks vLLM for PIECEWISE; something overrode it). Use "
            "compilation_config cudagraph_mode PIECEWISE or NONE, or --enforce-eager."
        )
    if mode:
        from vllm import envs

        if envs.VLLM_USE_BREAKABLE_CUDAGRAPH:
            raise ValueError("ucm sparse attention: VLLM_USE_BREAKABLE_CUDAGRAPH=1 captures the KV-cache write into "
                             "the graph segments, which skips ucm's key hook; set VLLM_USE_BREAKABLE_CUDAGRAPH=0")
        if cc.mode == CompilationMode.VLLM_COMPILE and mode.has_piecewise_cudagraphs():
            missing = [op for op in EAGER_OPS if op not in (cc.splitting_ops or [])]
            if missing:
                raise ValueError(
                    f"ucm sparse attention: piecewise CUDA graphs capture {', '.join(missing)} (not in "
                    "compilation_config splitting_ops), so ucm's per-step Python would not run on replay; keep "
                    "vLLM's default splitting_ops (without use_inductor_graph_partition), add them, or use "
                    "--enforce-eager"
                )
    if dcp_world_size > 1:
        raise NotImplementedError("ucm sparse attention does not support decode context parallelism (DCP shards "
                                  "each request's tokens over ranks); run without it to use ucm")


class UCMFlashAttentionImpl(KVWriteHook, FlashAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config_or_none()
        self._ucm_manager_block_size = vllm_config.cache_config.block_size if vllm_config is not None else None
        # layers whose positions matter beyond the block table: always stock
        self._ucm_dense_layer = (tuple(self.sliding_window) != (-1, -1) or self.alibi_slopes is not None
                                 or self.kv_sharing_target_layer_name is not None)
        if vllm_config is not None and ucm_sparse_requested(vllm_config):
            refuse_unsupported(vllm_config, self.dcp_world_size)

    def _runtime(self, kv_cache: torch.Tensor, device: torch.device):
        if self._ucm_dense_layer or kv_cache is None or kv_cache.numel() == 0:
            return None
        num_blocks, _, block_size, _ = kv_cache.shape  # [NB, Hkv, bs, 2 * D]
        return decoder_runtime(self, num_blocks, block_size, device, manager_block_size=self._ucm_manager_block_size,
                               platform="FlashAttention", splits=BLOCK_SPLIT)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        rt = None
        if (attn_metadata is not None and attn_metadata.rswa_prefix_lens is None
                and attn_metadata.mm_prefix_query_range_tensor is None):
            rt = self._runtime(kv_cache, query.device)
        picked = None
        if rt is not None:
            picked = rt.decode_selection(layer.layer_name, query, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                                         attn_metadata.block_table, kv_cache.shape[2])
            if picked is not None:
                attn_metadata = sparse_flash_metadata(attn_metadata, *picked, covers_batch=rt.decode_rows_cover_batch())
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                              output_block_scale)
        if picked is not None:
            notify_decode(rt, layer.layer_name, picked, query, attn_metadata.query_start_loc, output)
        return out


class UCMFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[FlashAttentionImpl]:
        return UCMFlashAttentionImpl
