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


def _load_hash_file(path: Path, key: str):
    """A trained hash file's contents (torch.load, weights_only: no code runs); ValueError naming
    `key` and the file where it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{key}: cannot load hash weights from {path}: {exc}") from exc


def load_trained_hash(path: Path, num_layers: int, dim: int, bits: int, key: str) -> list[torch.Tensor]:
    """Per-layer [dim, bits] projections from a file written by `save_trained_hash`.

    The file holds a float tensor [num_layers, dim, bits] (torch.save, loaded weights_only).
    """
    w = _load_hash_file(path, key)
    if isinstance(w, dict):
        w = w.get("weight")
    want = (num_layers, dim, bits)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != want:
        got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{key}: {path} holds {got}, expected a tensor of shape {want}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{key}: {path} contains non-finite values")
    return [w[i].to(torch.float32).contiguous() for i in range(num_layers)]


def load_key_center(path: Path, num_layers: int, dim: int, key: str) -> torch.Tensor | None:
    """The mean key per layer and KV head [num_layers, Hkv, dim] a trained file holds beside its
    projections (`save_trained_hash`), or None for a file without one (written before it)."""
    data = _load_hash_file(path, key)
    center = data.get("key_center") if isinstance(data, dict) else None
    if center is None:
        return None
    if (
        not isinstance(center, torch.Tensor)
        or center.dim() != 3
        or (center.shape[0], center.shape[2])
        != (
            num_layers,
            dim,
        )
    ):
        got = tuple(center.shape) if isinstance(center, torch.Tensor) else type(center).__name__
        raise ValueError(f"{key}: {path} holds a key_center of {got}, expected [{num_layers}, KV heads, {dim}]")
    if not torch.isfinite(center).all():
        raise ValueError(f"{key}: {path} holds a key_center with non-finite values")
    return center.to(torch.float32)


def save_trained_hash(path: Path, weights: list[torch.Tensor], key_center: torch.Tensor | None = None) -> None:
    """Write per-layer projections (and the mean key [L, Hkv, D] where measured) in the format
    `load_trained_hash` and `load_key_center` read."""
    data = {"weight": torch.stack([w.to(torch.float32).cpu() for w in weights])}
    if key_center is not None:
        data["key_center"] = key_center.to(torch.float32).cpu()
    torch.save(data, path)


def key_centers(loaded: ModelConfigFile) -> torch.Tensor | None:
    """The mean keys [L, Hkv, D] the per-model config's `norm_cosine` scorer centres keys on:
    its trained file's `key_center`; None for Hamming scoring, random projections or a file
    without one. A bad one is a ConfigError naming the file and key."""
    m = loaded.config
    if m.hash_score_method != "norm_cosine" or m.hash_weight_type != "trained" or m.is_mla:
        return None
    path = m.weight_paths(loaded.path.parent if loaded.path else None)["hash_weight"]
    try:
        return load_key_center(path, m.num_hidden_layers, m.head_dim, "hash_weight")
    except ValueError as exc:
        raise ConfigError(loaded.source, "hash_weight", str(exc)) from None


def hash_projections(loaded: ModelConfigFile, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per layer, the hash projections of a per-model config: one [D, bits] (GQA) or two (MLA:
    kv_lora, rope). Trained files are loaded and checked (readable, shape, finite values); a bad
    one is a ConfigError naming the file and key (`ucm configs check` runs this and `key_centers`
    too)."""
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
