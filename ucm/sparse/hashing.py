"""Hash projections for GSA on device (HATA): random orthogonal, or trained and loaded."""

from __future__ import annotations

from pathlib import Path

import torch


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
