"""GSA on device (HATA): hash codes of keys cached per token, of the query per head; a
block's distance is the reduction of its tokens' XOR-popcount distances; the closest blocks
win. MLA hashes the kv_lora part and the rope part with separate projections."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ucm.ops.contract import SparseOps
from ucm.sparse.base import BlockScorer, ModelShapes

# chunk_repre_method names a reduction of *similarity*; the op reduces *distance*
_DISTANCE_REDUCE = {"max": "min", "min": "max", "mean": "mean"}


class HashScorer(BlockScorer):
    """Per-layer hash projections; codes in a paged side cache shaped like the KV blocks."""

    def __init__(
        self,
        shapes: ModelShapes,
        ops: SparseOps,
        weights: Sequence[Sequence[torch.Tensor]],
        chunk_repre_method: str = "max",
    ) -> None:
        """`weights[layer]` is one projection [D, bits] (GQA), or two (MLA: kv_lora, rope)."""
        super().__init__(shapes, ops)
        if chunk_repre_method not in _DISTANCE_REDUCE:
            raise ValueError(f"chunk_repre_method must be one of {sorted(_DISTANCE_REDUCE)}, got {chunk_repre_method!r}")
        if len(weights) != shapes.num_layers:
            raise ValueError(f"{len(weights)} hash weights for {shapes.num_layers} layers")
        self.reduce = _DISTANCE_REDUCE[chunk_repre_method]
        self.unit_reduce = chunk_repre_method
        self.splits = [shapes.kv_lora_rank, shapes.qk_rope_head_dim] if shapes.is_mla else [shapes.head_dim]
        self.weights = []
        for layer, ws in enumerate(weights):
            if len(ws) != len(self.splits):
                raise ValueError(f"layer {layer}: {len(ws)} projections, expected {len(self.splits)}")
            for w, d in zip(ws, self.splits):
                if w.shape[0] != d or w.shape[1] % 8:
                    raise ValueError(f"layer {layer}: projection {tuple(w.shape)} must be [{d}, multiple of 8]")
            self.weights.append([w.to(shapes.device, torch.float32) for w in ws])
        self.code_bytes = sum(w.shape[1] for w in self.weights[0]) // 8
        self.codes = [
            torch.zeros(shapes.num_blocks, shapes.block_size, shapes.num_kv_heads, self.code_bytes,
                        dtype=torch.uint8, device=shapes.device)
            for _ in range(shapes.num_layers)
        ]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Codes of keys or queries [..., D] -> [..., code_bytes] (parts concatenated for MLA)."""
        parts = torch.split(x, self.splits, dim=-1)
        return torch.cat([self.ops.hash_encode(p, w) for p, w in zip(parts, self.weights[layer])], dim=-1)

    def on_kv_written(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if len(self.splits) == 1:  # one projection: hash, pack and scatter in one op
            self.ops.hash_write(self.codes[layer], key, self.weights[layer][0], slot_mapping)
        else:
            self.ops.paged_write(self.codes[layer], self.encode(layer, key), slot_mapping)

    def score(self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
              req_ids: Sequence[str]) -> torch.Tensor:
        dist = self.ops.hamming_block_scores(self.encode(layer, q), self.codes[layer], block_table, seq_lens, self.reduce)
        return -dist

    batch_safe = True
    batch_largest = False

    def batch_scores(self, layer: int, q: torch.Tensor, block_table: torch.Tensor,
                     seq_lens: torch.Tensor) -> torch.Tensor:
        """Raw block distances (smaller = closer); the query hash is fused into the scorer where
        the backend can (one projection)."""
        if len(self.splits) == 1:
            return self.ops.hash_hamming_block_scores(q, self.weights[layer][0], self.codes[layer], block_table,
                                                      seq_lens, self.reduce)
        return self.ops.hamming_block_scores(self.encode(layer, q), self.codes[layer], block_table, seq_lens,
                                             self.reduce)

    def memory_bytes(self) -> int:
        return sum(c.numel() for c in self.codes)
