"""Hash projections for GSA on device (HATA): random orthogonal, or trained and loaded."""

from __future__ import annotations

from pathlib import Path

import torch

from ucm.config.errors import ConfigError
from ucm.config.loader import ModelConfigFile


def random_orthogonal_hash(dim: int, bits: int, seed: int) -> torch.Tensor:
    """[dim, bits] with orthonormal columns (in groups of `dim` when bits > dim).

    Gaussian -> QR -> sign fix (columns multiplied by sign(diag R)), so the result is a
    deterministic function of the seed, uniformly distributed over orthogonal frames.
    """
    if dim <= 0 or bits <= 0:
        raise ValueError(f"dim and bits must be positive, got {dim}, {bits}")
    gen = torch.Generator().manual_seed(seed)
    cols = []
    remaining = bits
    while remaining > 0:
        take = min(dim, remaining)
        g = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(1, dtype=torch.float64))
        cols.append(q[:, :take])
        remaining -= take
    return torch.cat(cols, dim=1).to(torch.float32).contiguous()


def load_trained_hash(path: Path, num_layers: int, dim: int, bits: int, key: str) -> list[torch.Tensor]:
    """Per-layer [dim, bits] projections from a file written by `save_trained_hash`.

    The file holds a float tensor [num_layers, dim, bits] (torch.save, loaded weights_only).
    """
    try:
        w = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{key}: cannot load hash weights from {path}: {exc}") from exc
    if isinstance(w, dict):
        w = w.get("weight")
    want = (num_layers, dim, bits)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != want:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{key}: {path} holds {got}, expected a tensor of shape {want}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{key}: {path} contains non-finite values")
    return [w[i].to(torch.float32).contiguous() for i in range(num_layers)]


def save_trained_hash(path: Path, weights: list[torch.Tensor]) -> None:
    """Write per-layer projections in the format `load_trained_hash` reads."""
    torch.save({"weight": torch.stack([w.to(torch.float32).cpu() for w in weights])}, path)


def hash_projections(loaded: ModelConfigFile, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per layer, the hash projections of a per-model config: one [D, bits] (GQA) or two (MLA:
    kv_lora, rope). Trained files are loaded and checked (readable, shape, finite values); a bad
    one is a ConfigError naming the file and key (`ucm configs check` runs this too)."""
    m, src = loaded.config, loaded.source
    splits = (
        [
            (m.kv_lora_rank, m.hash_bits_kv_lora, "hash_weight_kv_lora"),
            (m.qk_rope_head_dim, m.hash_bits_qk_rope, "hash_weight_qk_rope"),
        ]
        if m.is_mla
        else [(m.head_dim, m.hash_bits, "hash_weight")]
    )
    paths = m.weight_paths(loaded.path.parent if loaded.path else None)
    per_part = []
    for part, (dim, bits, key) in enumerate(splits):
        if m.hash_weight_type == "trained":
            try:
                per_part.append(load_trained_hash(paths[key], m.num_hidden_layers, dim, bits, key))
            except ValueError as exc:
                raise ConfigError(src, key, str(exc)) from None
        else:
            per_part.append(
                [
                    random_orthogonal_hash(dim, bits, seed * 1_000_003 + layer * 7 + part)
                    for layer in range(m.num_hidden_layers)
                ]
            )
    return [[part[layer] for part in per_part] for layer in range(m.num_hidden_layers)]
