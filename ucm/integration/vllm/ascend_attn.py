"""vllm-ascend's attention (`AscendAttentionBackend`) with ucm's decode sparsity.

Written against vllm-ascend 0.23.0.post1 (see version.py). Import this module only on the
vllm-ascend platform: it imports vllm_ascend and, through it, torch_npu.

What differs from the CPU wrapper (cpu_attn.py), and why:

* vllm-ascend writes the KV cache inside `forward` (its backend keeps vLLM's default
  `forward_includes_kv_cache_update`), in `reshape_and_cache`, then runs attention in
  `forward_impl`. The wrapper hooks those two: keys go to the runtime right after the cache write,
  and the decode rows' selection is made just before the kernel, as on the CPU.
  `do_kv_cache_update` (called directly by some vllm-ascend patches) is hooked as well.
* The NPU kernels read the block table `block_tables` and the KV lengths from `seq_lens`
  (paged attention, a host tensor) and `seq_lens_list` (fused infer attention); all three are
  rewritten in a copy of the shared metadata. There is no per-length scheduler metadata to rebuild.
* The metadata's `seq_lens` lives on the host while `block_tables` is on the NPU; the runtime
  gets a device copy of the lengths (made once per step and metadata object).
* The platform picks backends by class path without consulting vLLM's registry, so the plugin
  maps the stock class path to this module's backend (`plugin.install_ascend`) instead of
  calling `register_backend`; this module is imported, by that path, only when vLLM builds the
  attention layers.
"""

from __future__ import annotations

import dataclasses
import logging

try:
    from vllm_ascend.attention.attention_v1 import AscendAttentionBackend, AscendAttentionBackendImpl
except ImportError as exc:  # vllm_ascend or torch_npu missing (or broken)
    from ucm.integration.vllm.version import ASCEND_SUPPORTED_RANGE, _span

    raise ImportError(
        "ucm.integration.vllm.ascend_attn is the vllm-ascend attention wrapper: it needs an Ascend host with "
        f"torch_npu and vllm-ascend {_span(ASCEND_SUPPORTED_RANGE)} installed (import failed: {exc}). "
        "On other platforms ucm's plugin does not load it."
    ) from exc

import torch
from vllm.config import get_current_vllm_config_or_none

from ucm.integration.vllm.plugin import ucm_sparse_requested
from ucm.integration.vllm.wrapper_core import KVWriteHook, decoder_runtime, kv_written, notify_decode, rewrite_rows

logger = logging.getLogger("vllm.ucm")


def _refuse_unsupported(vllm_config, impl: AscendAttentionBackendImpl) -> None:
    """Engine start fails, naming the setting, where ucm's per-step Python selection would be
    bypassed or contradicted. Called only when a ucm sparse config is present."""
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    if mode is not None and mode.has_full_cudagraphs():
        raise ValueError(
            f"ucm sparse attention on vllm-ascend: cudagraph_mode {mode.name} replays decode attention from full "
            "ACL graphs, which skip ucm's per-step block selection. Run with --enforce-eager (or "
            "compilation_config cudagraph_mode PIECEWISE)."
        )
    if ((vllm_config.additional_config or {}).get("xlite_graph_config") or {}).get("enabled"):
        raise ValueError(
            "ucm sparse attention on vllm-ascend: additional_config xlite_graph_config runs the model "
            "outside vLLM's attention layers; disable it to use ucm"
        )
    if impl.enable_hamming_sparse:
        raise ValueError(
            "ucm sparse attention on vllm-ascend: additional_config enable_hamming_sparse (vllm-ascend's "
            "own sparse decode) also rewrites the decode block table; enable one of the two"
        )


class UCMAscendAttentionBackendImpl(KVWriteHook, AscendAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ucm_layer_name: str | None = None
        if ucm_sparse_requested(self.vllm_config):
            _refuse_unsupported(self.vllm_config, self)

    def _runtime(self, kv_cache, device: torch.device):
        if self.sliding_window is not None:
            return None  # sliding-window layers stay dense: their window counts tokens of the kept blocks
        if kv_cache is None or len(kv_cache) < 2 or kv_cache[0].numel() == 0:
            return None
        num_blocks, block_size = kv_cache[0].shape[:2]  # key cache [NB, bs, Hkv, D]
        return decoder_runtime(
            self,
            num_blocks,
            block_size,
            device,
            manager_block_size=self.vllm_config.cache_config.block_size,
            platform="vllm-ascend",
            splits="vllm-ascend splits blocks",
        )

    # ------------------------------------------------------------ cache writes
    def forward(
        self, layer, query, key, value, kv_cache, attn_metadata, output=None, output_scale=None, output_block_scale=None
    ):
        self._ucm_layer_name = layer.layer_name  # reshape_and_cache / forward_impl are not given the layer
        return super().forward(
            layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale
        )

    def reshape_and_cache(self, query, key, value, kv_cache, attn_metadata, output):
        out = super().reshape_and_cache(query, key, value, kv_cache, attn_metadata, output)
        rt = self._runtime(kv_cache, key.device)
        if rt is not None:
            n = attn_metadata.num_actual_tokens
            kv_written(rt, self._ucm_layer_name, key[:n], value[:n], attn_metadata.slot_mapping[:n])
        return out

    # ------------------------------------------------------------ attention
    def forward_impl(self, query, key, value, kv_cache, attn_metadata, output):
        rt = self._runtime(kv_cache, query.device) if attn_metadata is not None else None
        picked = None
        if rt is not None:
            block_size = kv_cache[0].shape[1]
            seq_lens = _device_seq_lens(rt, attn_metadata)
            picked = rt.decode_selection(
                self._ucm_layer_name,
                query,
                attn_metadata.query_start_loc,
                seq_lens,
                attn_metadata.block_tables,
                block_size,
            )
            if picked is not None:
                attn_metadata = _sparse_metadata(attn_metadata, *picked, rt=rt)
        out = super().forward_impl(query, key, value, kv_cache, attn_metadata, output)
        if picked is not None:
            notify_decode(rt, self._ucm_layer_name, picked, query, attn_metadata.query_start_loc, out)
        return out


def _device_seq_lens(rt, md) -> torch.Tensor:
    """`md.seq_lens` (host) on the block table's device, one copy per step and metadata object
    (the runtime recognises a step's batch by these tensors' storage)."""
    cache = rt.step_cache()
    key = ("ascend_seq_lens", id(md))
    hit = cache.get(key)
    if hit is None or hit[0] is not md:
        hit = (md, md.seq_lens.to(md.block_tables.device, non_blocking=True))
        cache[key] = hit
    return hit[1]


def _sparse_metadata(md, rows: torch.Tensor, sel, rt):
    """A copy of `md` whose decode rows read only the selected blocks: `block_tables` and the
    three views of the KV lengths the NPU kernels read. Pure-decode steps use the selection's
    own (fresh) table when it has the batch's shape, as on the CPU."""
    block_tables, _ = rewrite_rows(rt.decode_rows_cover_batch(), rows, sel, md.block_tables)
    lens = list(md.seq_lens_list)
    for r, n in zip(rows.tolist(), sel.seq_lens.tolist(), strict=True):
        lens[r] = n
    cache = rt.step_cache()
    key = ("ascend_lens", tuple(lens))
    seq_lens = cache.get(key)
    if seq_lens is None:
        seq_lens = cache[key] = torch.tensor(lens, dtype=md.seq_lens.dtype, device=md.seq_lens.device)
    return dataclasses.replace(
        md, block_tables=block_tables, seq_lens=seq_lens, seq_lens_cpu=seq_lens, seq_lens_list=lens
    )


class UCMAscendAttentionBackend(AscendAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[AscendAttentionBackendImpl]:
        impl = AscendAttentionBackend.get_impl_cls()
        if impl is AscendAttentionBackendImpl:
            return UCMAscendAttentionBackendImpl
        # context parallelism swaps in another impl with its own decode metadata (not wrapped)
        if ucm_sparse_requested(get_current_vllm_config_or_none()):
            raise NotImplementedError(
                f"ucm sparse attention on vllm-ascend does not wrap {impl.__name__} "
                "(prefill/decode context parallelism); run without it to use ucm"
            )
        return impl
