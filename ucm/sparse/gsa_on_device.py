"""GSA on device (HATA): hash codes of keys cached per token, of the query per head; a
block's distance is the reduction of its tokens' XOR-popcount distances; the closest blocks
win. MLA hashes the kv_lora part and the rope part with separate projections."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ucm.config.loader import ModelConfigFile, load_model_config, model_config_data
from ucm.config.sparse import GSAOnDeviceConfig
from ucm.methods import DemoRequest
from ucm.ops.contract import SparseOps
from ucm.sparse.base import BlockScorer, ModelShapes, SparseMethod
from ucm.sparse.factory import BuildContext, DeviceKind, check
from ucm.sparse.hashing import hash_projections, key_centers
from ucm.sparse.selection import BlockSelector, LayerPolicy

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
        score_method: str = "hamming",
        key_center: torch.Tensor | None = None,
    ) -> None:
        """`weights[layer]` is one projection [D, bits] (GQA), or two (MLA: kv_lora, rope).
        `score_method` "norm_cosine" scores tokens by the norm-weighted SimHash estimate of
        q . k (`SparseOps.hamming_cosine_block_scores`, a norm cache beside the codes), keys
        centred on `key_center` [L, Hkv, D] (None: uncentred); "hamming" by summed distances."""
        super().__init__(shapes, ops)
        if score_method not in ("hamming", "norm_cosine"):
            raise ValueError(f"score_method must be 'hamming' or 'norm_cosine', got {score_method!r}")
        if score_method == "norm_cosine" and shapes.is_mla:
            raise ValueError("score_method 'norm_cosine' needs one projection per layer (not MLA)")
        want = (shapes.num_layers, shapes.num_kv_heads, shapes.head_dim)
        if key_center is not None and tuple(key_center.shape) != want:
            raise ValueError(f"key_center is {tuple(key_center.shape)}, the model needs {want} (layers, KV heads, dim)")
        if chunk_repre_method not in _DISTANCE_REDUCE:
            raise ValueError(
                f"chunk_repre_method must be one of {sorted(_DISTANCE_REDUCE)}, got {chunk_repre_method!r}"
            )
        if len(weights) != shapes.num_layers:
            raise ValueError(f"{len(weights)} hash weights for {shapes.num_layers} layers")
        self.reduce = _DISTANCE_REDUCE[chunk_repre_method]
        self.unit_reduce = chunk_repre_method
        self.splits = [shapes.kv_lora_rank, shapes.qk_rope_head_dim] if shapes.is_mla else [shapes.head_dim]
        self.weights = []
        for layer, ws in enumerate(weights):
            if len(ws) != len(self.splits):
                raise ValueError(f"layer {layer}: {len(ws)} projections, expected {len(self.splits)}")
            for w, d in zip(ws, self.splits, strict=True):
                if w.shape[0] != d or w.shape[1] % 8:
                    raise ValueError(f"layer {layer}: projection {tuple(w.shape)} must be [{d}, multiple of 8]")
            self.weights.append([w.to(shapes.device, torch.float32) for w in ws])
        self.code_bytes = sum(w.shape[1] for w in self.weights[0]) // 8
        self.codes = [
            torch.zeros(
                shapes.num_blocks,
                shapes.block_size,
                shapes.num_kv_heads,
                self.code_bytes,
                dtype=torch.uint8,
                device=shapes.device,
            )
            for _ in range(shapes.num_layers)
        ]
        self.cosine = score_method == "norm_cosine"
        self.centers: list[torch.Tensor | None] = [
            None if key_center is None else key_center[i].to(shapes.device, torch.float32).contiguous()
            for i in range(shapes.num_layers)
        ]
        # |k - center| per token and KV head: the estimate's key norm (norm_cosine only)
        self.norms = [
            torch.zeros(
                shapes.num_blocks, shapes.block_size, shapes.num_kv_heads, dtype=torch.bfloat16, device=shapes.device
            )
            for _ in range(shapes.num_layers if self.cosine else 0)
        ]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Codes of keys or queries [..., D] -> [..., code_bytes] (parts concatenated for MLA)."""
        parts = torch.split(x, self.splits, dim=-1)
        return torch.cat([self.ops.hash_encode(p, w) for p, w in zip(parts, self.weights[layer], strict=True)], dim=-1)

    def on_kv_written(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if self.cosine:
            w = self.weights[layer][0]
            self.ops.hash_norm_write(self.codes[layer], self.norms[layer], key, w, self.centers[layer], slot_mapping)
        elif len(self.splits) == 1:  # one projection: hash, pack and scatter in one op
            self.ops.hash_write(self.codes[layer], key, self.weights[layer][0], slot_mapping)
        else:
            self.ops.paged_write(self.codes[layer], self.encode(layer, key), slot_mapping)

    @property
    def writes_from_caches(self) -> bool:
        return len(self.splits) == 1  # MLA's two projections write layer by layer

    def write_from_caches(self, layers, k_caches, slot_mapping) -> None:
        if self.cosine:
            self.ops.hash_norm_write_layers(
                [self.codes[i] for i in layers],
                [self.norms[i] for i in layers],
                k_caches,
                [self.weights[i][0] for i in layers],
                [self.centers[i] for i in layers],
                slot_mapping,
            )
            return
        self.ops.hash_write_layers(
            [self.codes[i] for i in layers], k_caches, [self.weights[i][0] for i in layers], slot_mapping
        )

    def score(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, req_ids: Sequence[str]
    ) -> torch.Tensor:
        return -self.batch_scores(layer, q, block_table, seq_lens)

    batch_safe = True
    batch_largest = False

    def batch_scores(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
    ) -> torch.Tensor:
        """Raw block distances (smaller = closer); the query hash is fused into the scorer where
        the backend can (one projection)."""
        if self.cosine:
            return self.ops.hash_cosine_block_scores(
                q, self.weights[layer][0], self.codes[layer], self.norms[layer], block_table, seq_lens, self.reduce
            )
        if len(self.splits) == 1:
            return self.ops.hash_hamming_block_scores(
                q, self.weights[layer][0], self.codes[layer], block_table, seq_lens, self.reduce
            )
        return self.ops.hamming_block_scores(
            self.encode(layer, q), self.codes[layer], block_table, seq_lens, self.reduce
        )

    def memory_bytes(self) -> int:
        return sum(c.numel() for c in self.codes) + sum(n.numel() * n.element_size() for n in self.norms)


# ----------------------------------------------------------------------------- building
def build(config: GSAOnDeviceConfig, shapes: ModelShapes, ctx: BuildContext) -> SparseMethod:
    """GSA on device's builder (registered in `ucm.config.sparse`): everything but the per-model
    JSON's name comes from that JSON."""
    return build_from_model_config(ctx.model_json(config), shapes, ctx.ops, ctx.device_kind, ctx.seed)


def build_from_model_config(
    loaded: ModelConfigFile | dict | str | Path,
    shapes: ModelShapes,
    ops: SparseOps,
    device_kind: DeviceKind = "gpu",
    seed: int = 0,
) -> SparseMethod:
    """GSA on device from a per-model config (loaded, its dict, a path or a model name), checked
    against the model's shapes; `seed` seeds random projections."""
    if not isinstance(loaded, ModelConfigFile):
        loaded = load_model_config(loaded)
    m, src = loaded.config, loaded.source
    check(
        src,
        "num_hidden_layers",
        m.num_hidden_layers == shapes.num_layers,
        f"{m.num_hidden_layers} but the model has {shapes.num_layers} layers",
    )
    check(src, "head_dim", m.head_dim == shapes.head_dim, f"{m.head_dim} but the model's head dim is {shapes.head_dim}")
    check(
        src, "is_mla", m.is_mla == shapes.is_mla, f"{m.is_mla} but the model {'is' if shapes.is_mla else 'is not'} MLA"
    )
    if m.is_mla:
        check(
            src,
            "kv_lora_rank",
            m.kv_lora_rank == shapes.kv_lora_rank,
            f"{m.kv_lora_rank} but the model's is {shapes.kv_lora_rank}",
        )
    check(
        src,
        "chunk_size",
        m.chunk_size % shapes.block_size == 0,
        f"{m.chunk_size} is not a multiple of the KV block size {shapes.block_size}",
    )

    weights = hash_projections(loaded, seed)

    policies = [
        LayerPolicy(ratio=ratio, must_select=tuple(m.must_select_blocks), reuse_from=reuse)
        for ratio, reuse in zip(m.top_k_ratio_per_layer, m.top_k_index_reuse, strict=True)
    ]
    selector = BlockSelector(policies, shapes.block_size, ops, unit_blocks=m.chunk_size // shapes.block_size)
    center = key_centers(loaded)
    if center is not None:
        check(
            src,
            "hash_weight",
            center.shape[1] == shapes.num_kv_heads,
            f"its key_center has {center.shape[1]} KV heads, the model {shapes.num_kv_heads}",
        )
    scorer = HashScorer(shapes, ops, weights, m.chunk_repre_method, m.hash_score_method, center)
    seq_thr, conc_thr = (
        (m.npu_seq_len_threshold, m.npu_concurrency_threshold)
        if device_kind == "npu"
        else (m.gpu_seq_len_threshold, m.gpu_concurrency_threshold)
    )
    return SparseMethod(
        GSAOnDeviceConfig.method, scorer, selector, 1, seq_len_threshold=seq_thr, concurrency_threshold=conc_thr
    )


# ----------------------------------------------------------------------------- demo, eval, profile
def ratios_with_mean(ratios: Sequence[float], keep: set[int] | None, ratio: float) -> list[float]:
    """A per-model JSON's `top_k_ratio_per_layer` run at another ratio: 1 in the `keep` layers
    (None: the layers the JSON keeps dense), the others scaled together so they average `ratio`,
    so a JSON's shape across its sparse layers (e.g. the copying layers' larger share,
    `ucm.methods.copy_layer_ratios`) is kept.
    A layer the scaling would take past 1 stays at 1, the rest sharing what it could not take; a
    layer the JSON keeps dense but `keep` does not (a layer ablation) takes the mean share."""
    if keep is None:
        keep = {i for i, r in enumerate(ratios) if r >= 1}
    sparse = [i for i in range(len(ratios)) if i not in keep]
    out = [1.0] * len(ratios)
    own = [r for r in ratios if r < 1]
    mean = sum(own) / len(own) if own else 1.0
    shares = {i: (ratios[i] if ratios[i] < 1 else mean) for i in sparse}
    budget = ratio * len(sparse)
    while shares:
        scale = budget / sum(shares.values())
        full = {i for i, r in shares.items() if r * scale >= 1}
        if not full:
            for i, r in shares.items():
                out[i] = round(r * scale, 6)
            break
        budget -= len(full)  # these read every block
        shares = {i: r for i, r in shares.items() if i not in full}
    return out


def demo_config(config_class: type[GSAOnDeviceConfig], request: DemoRequest) -> dict:
    """The config the demo, eval and profile run GSA on device with (registered in
    `ucm.config.sparse`). Its ratios live in a per-model JSON: without `request.workdir` that is
    the shipped JSON of `request.model` (its own per-layer ratios); with it, a copy written there
    with its sparse layers averaging `request.ratio` (`ratios_with_mean`) and no length threshold,
    so all methods can be compared at one ratio. `request.model_config` (a path, a name or the JSON's data) replaces
    the shipped JSON, e.g. with the one `ucm calibrate` writes, or random projections
    (`ucm.config.loader.model_config_data(..., random_hash=True)`); `request.dense_layers`, when
    given, replace its dense layers in the copy (layer ablations)."""
    given = request.model_config
    source = given if isinstance(given, dict) else str(given) if given is not None else request.model
    if not source:
        raise ValueError(f"{config_class.method} needs a per-model JSON: DemoRequest.model or .model_config")
    if request.workdir is None:
        if isinstance(source, dict):
            raise ValueError(f"{config_class.method} with an inline model config needs a workdir to write it to")
        return {"config_file": source}
    workdir = Path(request.workdir)
    data = model_config_data(source)  # the copy lives elsewhere: weight paths made absolute ...
    for key in load_model_config(data).config.weight_paths(None):  # ... then relative to the copy,
        data[key] = os.path.relpath(data[key], workdir.resolve())  # so results name no machine's paths
    keep = set(request.dense_layers) if request.dense_layers else None
    data["top_k_ratio_per_layer"] = ratios_with_mean(data["top_k_ratio_per_layer"], keep, request.ratio)
    data["gpu_seq_len_threshold"] = 0
    stem = "".join(ch if ch.isalnum() else "_" for ch in data["model_name"].rsplit("/", 1)[-1].lower())
    tag = "" if given is None else f"_{data['hash_weight_type']}"
    path = workdir / f"{stem}_{config_class.method.lower()}{tag}_{request.ratio:g}.json"
    path.write_text(json.dumps(data))
    return {"config_file": str(path)}
