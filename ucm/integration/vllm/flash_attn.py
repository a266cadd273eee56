"""vLLM's FlashAttention backend (GPU) with ucm's decode sparsity, CUDA-graph safe.

Registered by the plugin as `FLASH_ATTN` on the CUDA platform (`register_backend`, the override
registry the CUDA platform resolves backends through). Written against vLLM 0.26 (the release
the GPU machine runs) and 0.32; the metadata fields that differ between them are read by name
(`getattr`), never by version.

* Without a ucm sparse config in the engine's config this is the stock impl: `forward` and
  `do_kv_cache_update` go straight to FlashAttentionImpl's.
* With one, the runtime selects in batch mode (`ucm.sparse.batch_selection`): per step one plan
  on the device, per layer score -> top-k -> rewritten table -> the stock FlashAttention kernel
  on a copy of the step's `FlashAttentionMetadata` whose `block_table` and `seq_lens` (the
  kernel's `seqused_k`) read only the kept blocks. Nothing reads the device from the host, so
  vLLM's FULL (decode) CUDA graphs capture the whole sparse step and replay it; piecewise and
  eager modes run the same kernels. `max_seq_len` becomes a host bound of the kept lengths
  (`BatchSelector.max_len`, from the layer's policy and the batch's own bound). FA3's
  ahead-of-time `scheduler_metadata` was planned for the old lengths: where vLLM planned one,
  the wrapper plans one for the new lengths with FA3's own `get_scheduler_metadata`, once per
  step and layer policy (every layer of a policy reads the same lengths:
  `BatchSelector._budgets`), instead of FA3 planning inside every layer's call.
* The key hook: after the stock cache write, the written keys update the method's block
  representations / hash codes (device kernels, captured with the write).
* Stock for: encoder / cross attention; sliding-window, ALiBi and KV-sharing layers (positions
  matter beyond the table); cascade, R-SWA and multimodal prefix-LM batches, and per-row causal
  flags (their masks read absolute positions or a shared prefix).

Engine start fails, naming the setting, for decode context parallelism and for a kernel block
size that differs from the KV manager's.
"""

from __future__ import annotations

import dataclasses

import torch
from vllm.config import get_current_vllm_config_or_none
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadata

from ucm.integration.vllm.plugin import ucm_sparse_requested
from ucm.integration.vllm.wrapper_core import KVWriteHook, decoder_runtime

BLOCK_SPLIT = "vLLM splits each KV-manager block into kernel blocks"
# metadata fields (by vLLM release) whose masks read absolute positions or a shared prefix
_POSITIONAL = ("rswa_prefix_lens", "mm_prefix_range_tensor", "mm_prefix_query_range_tensor")


def plain_batch(md: FlashAttentionMetadata) -> bool:
    """Whether the step's attention is plain causal paged attention (a rewritten table means
    the same thing): no cascade prefix, no positional masks, one causal flag for the batch."""
    if getattr(md, "use_cascade", False) or not isinstance(md.causal, bool):
        return False
    return all(getattr(md, name, None) is None for name in _POSITIONAL)


def sparse_flash_metadata(
    md: FlashAttentionMetadata,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scheduler_metadata: torch.Tensor | None = None,
    max_seq_len: int | None = None,
) -> FlashAttentionMetadata:
    """A copy of `md` (shared by every layer of the step, never written) that reads
    `block_table` / `seq_lens`; FA3's ahead-of-time plan for the old lengths is replaced by
    `scheduler_metadata` (one for the new lengths, or None: FA3 plans in the call), and
    `max_seq_len` by a bound of the new lengths where one is given."""
    return dataclasses.replace(
        md,
        block_table=block_table,
        seq_lens=seq_lens,
        scheduler_metadata=scheduler_metadata,
        max_seq_len=md.max_seq_len if max_seq_len is None else max_seq_len,
    )


def plan_ahead_possible(vllm_config) -> bool:
    """Whether a sparse layer may plan FA3's schedule for its new lengths as vLLM's builder does:
    no sliding window anywhere in the model (the builder plans with the model's one window) and
    an unquantized KV cache (the plan's dtype is then the cache's own)."""
    from vllm.utils.torch_utils import is_quantized_kv_cache

    if vllm_config is None or getattr(vllm_config, "model_config", None) is None:
        return False
    return vllm_config.model_config.get_sliding_window() is None and not is_quantized_kv_cache(
        vllm_config.cache_config.cache_dtype
    )


def plan_ahead(
    md: FlashAttentionMetadata,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    num_heads: int,
    num_kv_heads: int,
    head_size: int,
    kv_cache: torch.Tensor,
) -> torch.Tensor | None:
    """FA3's scheduler metadata for the batch reading `seq_lens` (at most `max_seq_len` tokens a
    row), made with the arguments vLLM's FlashAttention builder uses, once per step and lengths
    tensor (cached on `md`, which every layer of the step shares). None where vLLM planned
    nothing ahead (FA2, eager builds)."""
    if md.scheduler_metadata is None:
        return None
    plans = md.__dict__.setdefault("_ucm_schedules", {})
    key = (seq_lens.data_ptr(), max_seq_len)
    if key not in plans:
        from vllm.v1.attention.backends.fa_utils import get_scheduler_metadata

        plans[key] = get_scheduler_metadata(
            batch_size=seq_lens.shape[0],
            max_seqlen_q=md.max_query_len,
            max_seqlen_k=max_seq_len,
            num_heads_q=num_heads,
            num_heads_kv=num_kv_heads,
            headdim=head_size,
            cache_seqlens=seq_lens,
            qkv_dtype=kv_cache.dtype,
            cu_seqlens_q=md.query_start_loc,
            page_size=kv_cache.shape[2],
            causal=md.causal,
            window_size=(-1, -1),
            num_splits=md.max_num_splits,
        )
    return plans[key]


def refuse_unsupported(dcp_world_size: int = 1) -> None:
    """Engine start fails, naming the setting, where ucm's selection cannot run. Called only
    when a ucm sparse config is present."""
    if dcp_world_size > 1:
        raise NotImplementedError(
            "ucm sparse attention does not support decode context parallelism (DCP shards "
            "each request's tokens over ranks); run without it to use ucm"
        )


class UCMFlashAttentionImpl(KVWriteHook, FlashAttentionImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config_or_none()
        self._ucm_sparse = vllm_config is not None and ucm_sparse_requested(vllm_config)
        self._ucm_manager_block_size = vllm_config.cache_config.block_size if vllm_config is not None else None
        self._ucm_plan_ahead = self._ucm_sparse and plan_ahead_possible(vllm_config)
        # layers whose positions matter beyond the block table: always stock
        window = getattr(self, "sliding_window", None)
        self._ucm_dense_layer = (
            (window is not None and tuple(window) != (-1, -1))
            or self.alibi_slopes is not None
            or self.kv_sharing_target_layer_name is not None
        )
        if self._ucm_sparse:
            refuse_unsupported(getattr(self, "dcp_world_size", 1))

    def _runtime(self, kv_cache: torch.Tensor, device: torch.device):
        if not self._ucm_sparse or self._ucm_dense_layer or kv_cache is None or kv_cache.numel() == 0:
            return None
        num_blocks, _, block_size, _ = kv_cache.shape  # [NB, Hkv, bs, 2 * D]
        return decoder_runtime(
            self,
            num_blocks,
            block_size,
            device,
            manager_block_size=self._ucm_manager_block_size,
            platform="FlashAttention",
            splits=BLOCK_SPLIT,
            key_dtype=kv_cache.dtype,  # the keys of an unquantized cache (Quest's exact bounds)
        )

    def _key_cache(self, kv_cache: torch.Tensor) -> torch.Tensor | None:
        """The keys of the cache as [NB, bs, Hkv, D] (a view): vLLM 0.26 packs K and V into the
        last dimension of [NB, Hkv, bs, 2 * D]; a layout of [2, NB, bs, Hkv, D] has K first.
        None for a quantized cache (its values are not the keys)."""
        d = self.head_size
        if not kv_cache.dtype.is_floating_point or kv_cache.dtype.itemsize < 2:
            return None
        if kv_cache.dim() == 4 and kv_cache.shape[-1] == 2 * d:
            return kv_cache.transpose(1, 2)[..., :d]
        if kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and kv_cache.shape[-1] == d:
            return kv_cache[0]
        return None

    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None
    ):
        if self._ucm_sparse and attn_metadata is not None and plain_batch(attn_metadata):
            rt = self._runtime(kv_cache, query.device)
            if rt is not None:
                md = attn_metadata
                got = rt.batch_selection(layer.layer_name, query, md, md.query_start_loc, md.seq_lens, md.block_table)
                if got is not None:
                    table, lens = got
                    # FA3 sizes its splits by max_seq_len (in FULL graphs the captured one, vLLM's
                    # max_model_len): give it the bound of the kept lengths, not of every block
                    max_len = rt.batch_max_len(layer.layer_name, md.max_seq_len, md.max_query_len)
                    schedule = None
                    if self._ucm_plan_ahead:
                        schedule = plan_ahead(
                            md, lens, max_len, self.num_heads, self.num_kv_heads, self.head_size, kv_cache
                        )
                    attn_metadata = sparse_flash_metadata(md, table, lens, schedule, max_len)
        return super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )


class UCMFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[FlashAttentionImpl]:
        return UCMFlashAttentionImpl
