"""ucm.metrics against independent NumPy computations, plus the properties that define them."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from ucm.metrics import (
    attention_mass_recall,
    dense_block_mass,
    head_mass_recall,
    oracle_normalised_recall,
    oracle_recall,
    relative_output_error,
    selection_mask,
    topk_overlap,
    worst_head_normalised_recall,
)
from ucm.ops import TorchReferenceOps


# ------------------------------------------------------------------------- NumPy oracle
def np_block_mass(q, k_cache, table, seq_lens, scale) -> np.ndarray:
    """[B, Hq, M] dense softmax mass per logical block, token by token in float64."""
    b, hq, _ = q.shape
    _, bs, hkv, _ = k_cache.shape
    m = table.shape[1]
    g = hq // hkv
    out = np.zeros((b, hq, m))
    for r in range(b):
        n = int(seq_lens[r])
        if n == 0:
            continue
        for h in range(hq):
            logits, owner = [], []
            for t in range(n):
                blk, off = divmod(t, bs)
                key = k_cache[table[r, blk], off, h // g].astype(np.float64)
                logits.append(float(q[r, h].astype(np.float64) @ key) * scale)
                owner.append(blk)
            p = np.exp(np.array(logits) - max(logits))
            p /= p.sum()
            for blk, w in zip(owner, p, strict=True):
                out[r, h, blk] += w
    return out


def np_recall(mass, ids, counts) -> np.ndarray:
    rec = np.zeros(mass.shape[0])
    for r in range(mass.shape[0]):
        chosen = {int(i) for i in ids[r, : counts[r]] if i >= 0}
        rec[r] = np.mean([sum(mass[r, h, j] for j in chosen) for h in range(mass.shape[1])])
    return rec


def np_oracle_bruteforce(mass, counts) -> np.ndarray:
    """Best head-mean recall over every subset of counts[b] blocks (small M only)."""
    best = np.zeros(mass.shape[0])
    m = mass.shape[2]
    for r in range(mass.shape[0]):
        k = min(int(counts[r]), m)
        best[r] = max(mass[r, :, list(c)].sum(0).mean() if c else 0.0 for c in itertools.combinations(range(m), k))
    return best


def random_case(seed: int, b: int = 3, hkv: int = 2, g: int = 2, d: int = 8, bs: int = 4, m: int = 5):
    gen = torch.Generator().manual_seed(seed)
    nb = b * m + 2
    k_cache = torch.randn(nb, bs, hkv, d, generator=gen)
    q = torch.randn(b, hkv * g, d, generator=gen) * 2.0  # peakier softmax, more varied masses
    table = torch.randperm(nb, generator=gen)[: b * m].view(b, m).to(torch.int32)
    seq_lens = torch.randint(1, m * bs + 1, (b,), generator=gen)
    return q, k_cache, table, seq_lens, 1.0 / math.sqrt(d)


def random_selection(gen: torch.Generator, seq_lens: torch.Tensor, bs: int, m: int):
    """Random ascending ids of valid blocks, -1 padded, as block_topk returns them."""
    b = seq_lens.shape[0]
    ids = torch.full((b, m), -1, dtype=torch.int32)
    counts = torch.zeros(b, dtype=torch.int32)
    for r in range(b):
        n = (int(seq_lens[r]) + bs - 1) // bs
        k = int(torch.randint(0, n + 1, (), generator=gen))
        chosen = torch.sort(torch.randperm(n, generator=gen)[:k]).values
        ids[r, :k] = chosen.to(torch.int32)
        counts[r] = k
    return ids, counts


# --------------------------------------------------------------------- vs NumPy oracle
@pytest.mark.parametrize("seed", range(8))
def test_dense_block_mass_matches_numpy(seed: int) -> None:
    q, k, table, seq_lens, scale = random_case(seed, g=1 + seed % 3)
    got = dense_block_mass(q, k, table, seq_lens, scale)
    ref = np_block_mass(q.numpy(), k.numpy(), table.numpy(), seq_lens.numpy(), scale)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_recall_and_oracle_match_numpy(seed: int) -> None:
    q, k, table, seq_lens, scale = random_case(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    ids, counts = random_selection(gen, seq_lens, 4, table.shape[1])
    mass = np_block_mass(q.numpy(), k.numpy(), table.numpy(), seq_lens.numpy(), scale)
    rec = attention_mass_recall(q, k, table, seq_lens, ids, counts, scale)
    orc = oracle_recall(q, k, table, seq_lens, counts, scale)
    norm = oracle_normalised_recall(q, k, table, seq_lens, ids, counts, scale)
    assert rec.shape == orc.shape == norm.shape == (q.shape[0],)
    assert rec.dtype == orc.dtype == norm.dtype == torch.float32
    np_rec = np_recall(mass, ids.numpy(), counts.numpy())
    np_orc = np_oracle_bruteforce(mass, counts.numpy())
    np.testing.assert_allclose(rec.numpy(), np_rec, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(orc.numpy(), np_orc, rtol=1e-5, atol=1e-6)
    np_norm = np.where(np_orc > 0, np_rec / np.where(np_orc > 0, np_orc, 1.0), 1.0)
    np.testing.assert_allclose(norm.numpy(), np_norm, rtol=1e-5, atol=1e-6)


def test_topk_overlap_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(9)
    b, m = 6, 12
    seq_lens = torch.randint(1, m * 4 + 1, (b,), generator=gen)
    a_ids, a_counts = random_selection(gen, seq_lens, 4, m)
    r_ids, r_counts = random_selection(gen, seq_lens, 4, m)
    got = topk_overlap(a_ids, a_counts, r_ids, r_counts)
    for r in range(b):
        a = {int(i) for i in a_ids[r, : a_counts[r]]}
        ref = {int(i) for i in r_ids[r, : r_counts[r]]}
        expected = len(a & ref) / len(ref) if ref else 1.0
        assert got[r].item() == pytest.approx(expected)


def test_relative_output_error_matches_numpy() -> None:
    gen = torch.Generator().manual_seed(10)
    dense = torch.randn(4, 3, 5, generator=gen)
    sparse = dense + 0.1 * torch.randn(4, 3, 5, generator=gen)
    got = relative_output_error(sparse.to(torch.bfloat16), dense)
    a = sparse.to(torch.bfloat16).to(torch.float32).numpy().reshape(4, -1).astype(np.float64)
    bb = dense.numpy().reshape(4, -1).astype(np.float64)
    expected = np.linalg.norm(a - bb, axis=1) / np.linalg.norm(bb, axis=1)
    assert got.shape == (4,) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


# ------------------------------------------------------------------------- properties
@pytest.mark.parametrize("seed", range(6))
def test_selecting_every_block_recalls_everything(seed: int) -> None:
    q, k, table, seq_lens, scale = random_case(seed, m=6)
    n = (seq_lens + 3) // 4
    m = table.shape[1]
    ids = torch.where(torch.arange(m)[None] < n[:, None], torch.arange(m)[None], -1).to(torch.int32)
    rec = attention_mass_recall(q, k, table, seq_lens, ids, n, scale)
    torch.testing.assert_close(rec, torch.ones_like(rec))
    norm = oracle_normalised_recall(q, k, table, seq_lens, ids, n, scale)
    torch.testing.assert_close(norm, torch.ones_like(norm))
    # the whole table width (blocks past the end hold no mass) is the same
    full = torch.arange(m, dtype=torch.int32).expand(len(n), m).contiguous()
    rec_full = attention_mass_recall(q, k, table, seq_lens, full, torch.full_like(n, m), scale)
    torch.testing.assert_close(rec_full, torch.ones_like(rec_full))


@pytest.mark.parametrize("seed", range(6))
def test_oracle_bounds_every_selection_of_its_size(seed: int) -> None:
    q, k, table, seq_lens, scale = random_case(seed, b=2, m=5)
    m = table.shape[1]
    for size in range(m + 1):
        counts = torch.full((2,), size, dtype=torch.int32)
        orc = oracle_recall(q, k, table, seq_lens, counts, scale)
        for combo in itertools.combinations(range(m), size):
            ids = torch.full((2, m), -1, dtype=torch.int32)
            ids[:, :size] = torch.tensor(combo, dtype=torch.int32)
            rec = attention_mass_recall(q, k, table, seq_lens, ids, counts, scale)
            assert bool((rec <= orc + 1e-6).all())
            norm = oracle_normalised_recall(q, k, table, seq_lens, ids, counts, scale)
            assert bool(((norm >= 0) & (norm <= 1.0)).all())


def test_oracle_is_the_reference_topk_of_block_mass() -> None:
    """The oracle selection is block_topk over the head-mean dense mass: normalised recall 1."""
    q, k, table, seq_lens, scale = random_case(3, b=4, m=8)
    mass = dense_block_mass(q, k, table, seq_lens, scale).mean(1)
    n = (seq_lens + 3) // 4
    budget = torch.full_like(n, 3)
    ids, counts = TorchReferenceOps().block_topk(mass, budget, torch.zeros_like(mass, dtype=torch.bool), n)
    norm = oracle_normalised_recall(q, k, table, seq_lens, ids, counts, scale)
    torch.testing.assert_close(norm, torch.ones_like(norm))


def test_planted_mass_on_one_block() -> None:
    """Keys of one block align with the query, the rest oppose it: that block holds ~all mass."""
    b, hkv, g, d, bs, m = 2, 2, 2, 16, 4, 6
    q = torch.zeros(b, hkv * g, d)
    q[..., 0] = 1.0
    k = torch.zeros(b * m, bs, hkv, d)
    k[..., 0] = -1.0
    table = torch.arange(b * m, dtype=torch.int32).view(b, m)
    hot = [2, 4]
    for r, j in enumerate(hot):
        k[table[r, j], :, :, 0] = 1.0
    seq_lens = torch.tensor([m * bs, m * bs - 1])
    scale = 20.0  # logits +-20: the hot block gets all but ~e-40 of the mass
    one = torch.ones(b, dtype=torch.int32)
    hit = torch.tensor([[2, -1], [4, -1]], dtype=torch.int32)
    miss = torch.tensor([[0, -1], [5, -1]], dtype=torch.int32)
    torch.testing.assert_close(attention_mass_recall(q, k, table, seq_lens, hit, one, scale), torch.ones(b))
    torch.testing.assert_close(attention_mass_recall(q, k, table, seq_lens, miss, one, scale), torch.zeros(b))
    torch.testing.assert_close(oracle_recall(q, k, table, seq_lens, one, scale), torch.ones(b))
    torch.testing.assert_close(oracle_normalised_recall(q, k, table, seq_lens, miss, one, scale), torch.zeros(b))
    mass = dense_block_mass(q, k, table, seq_lens, scale)
    assert mass.argmax(-1).tolist() == [[2] * 4, [4] * 4]


@pytest.mark.parametrize("seed", range(4))
def test_per_head_recall_and_worst_head_match_numpy(seed: int) -> None:
    """Per head: recall vs the NumPy mass, and each head's own optimum by brute force over subsets."""
    q, k, table, seq_lens, scale = random_case(seed, b=2, m=5)
    gen = torch.Generator().manual_seed(100 + seed)
    ids, counts = random_selection(gen, seq_lens, k.shape[1], table.shape[1])
    mass = np_block_mass(q.numpy(), k.numpy(), table.numpy(), seq_lens.numpy(), scale)
    per_head = head_mass_recall(q, k, table, seq_lens, ids, counts, scale)
    worst = worst_head_normalised_recall(q, k, table, seq_lens, ids, counts, scale)
    for r in range(mass.shape[0]):
        chosen = [int(i) for i in ids[r, : counts[r]] if i >= 0]
        ratios = []
        for h in range(mass.shape[1]):
            got = sum(mass[r, h, j] for j in chosen)
            assert per_head[r, h].item() == pytest.approx(got, abs=1e-5)
            best = max(
                (
                    sum(mass[r, h, j] for j in sub)
                    for sub in itertools.combinations(range(mass.shape[2]), int(counts[r]))
                ),
                default=0.0,
            )
            ratios.append(min(got / best, 1.0) if best > 0 else 1.0)
        assert worst[r].item() == pytest.approx(min(ratios), abs=1e-5)
    torch.testing.assert_close(per_head.mean(-1), attention_mass_recall(q, k, table, seq_lens, ids, counts, scale))


def test_worst_head_sees_a_starved_retrieval_head_the_mean_hides() -> None:
    """One head of four puts ~all its mass on block 3, the others spread theirs evenly: dropping
    block 3 keeps head-mean recall high while the worst-head figure falls to ~0."""
    hkv, g, d, bs, m = 1, 4, 8, 4, 8
    q = torch.zeros(1, hkv * g, d)
    q[0, 0, 0] = 1.0  # head 0: the retrieval head; heads 1-3 have a zero query (uniform softmax)
    k = torch.zeros(m, bs, hkv, d)
    k[3, :, :, 0] = 1.0
    table = torch.arange(m, dtype=torch.int32)[None]
    seq_lens = torch.tensor([m * bs])
    scale = 30.0
    keep = torch.tensor([[0, 1, 2, 4, 5, 6, 7]], dtype=torch.int32)  # all but block 3
    n = torch.tensor([7], dtype=torch.int32)
    assert attention_mass_recall(q, k, table, seq_lens, keep, n, scale).item() > 0.65
    assert worst_head_normalised_recall(q, k, table, seq_lens, keep, n, scale).item() < 1e-6
    hit = torch.tensor([[0, 1, 2, 3, 4, 5, 6]], dtype=torch.int32)
    assert worst_head_normalised_recall(q, k, table, seq_lens, hit, n, scale).item() == pytest.approx(1.0, abs=1e-6)


def test_padding_and_counts_are_respected() -> None:
    q, k, table, seq_lens, scale = random_case(4, b=2, m=5)
    seq_lens = torch.tensor([20, 20])
    ids = torch.tensor([[0, 1, 2, -1, -1], [0, 1, 2, 3, 4]], dtype=torch.int32)
    counts = torch.tensor([3, 2], dtype=torch.int32)  # row 1: only the first 2 entries count
    rec = attention_mass_recall(q, k, table, seq_lens, ids, counts, scale)
    mass = dense_block_mass(q, k, table, seq_lens, scale).mean(1)
    torch.testing.assert_close(rec, torch.stack([mass[0, :3].sum(), mass[1, :2].sum()]))
    mask = selection_mask(ids, counts, 5)
    assert mask.tolist() == [[True, True, True, False, False], [True, True, False, False, False]]
    with pytest.raises(ValueError):
        selection_mask(torch.tensor([[5]]), torch.tensor([1]), 5)


def test_empty_rows_and_empty_selections() -> None:
    q, k, table, seq_lens, scale = random_case(5, b=2, m=3)
    seq_lens = torch.tensor([0, 7])
    ids = torch.full((2, 3), -1, dtype=torch.int32)
    counts = torch.zeros(2, dtype=torch.int32)
    assert attention_mass_recall(q, k, table, seq_lens, ids, counts, scale).tolist() == [0.0, 0.0]
    assert oracle_recall(q, k, table, seq_lens, counts, scale).tolist() == [0.0, 0.0]
    assert oracle_normalised_recall(q, k, table, seq_lens, ids, counts, scale).tolist() == [1.0, 1.0]


def test_topk_overlap_properties() -> None:
    ids = torch.tensor([[0, 3, 5, -1], [1, 2, -1, -1], [-1, -1, -1, -1]], dtype=torch.int32)
    counts = torch.tensor([3, 2, 0], dtype=torch.int32)
    assert topk_overlap(ids, counts, ids, counts).tolist() == [1.0, 1.0, 1.0]  # self / empty ref
    ref = torch.tensor([[3, 4, -1, -1], [0, -1, -1, -1], [2, -1, -1, -1]], dtype=torch.int32)
    ref_counts = torch.tensor([2, 1, 1], dtype=torch.int32)
    assert topk_overlap(ids, counts, ref, ref_counts).tolist() == [0.5, 0.0, 0.0]
    # superset selection covers the reference fully; overlap is not symmetric
    assert topk_overlap(ref[:1], ref_counts[:1], ids[:1], counts[:1]).tolist() == pytest.approx([1 / 3])


def test_relative_output_error_properties() -> None:
    x = torch.randn(3, 4, 8)
    assert relative_output_error(x, x).tolist() == [0.0, 0.0, 0.0]
    err = relative_output_error(2 * x, x)
    torch.testing.assert_close(err, torch.ones(3))
    z = torch.zeros(2, 4)
    assert relative_output_error(z, z).tolist() == [0.0, 0.0]
    assert relative_output_error(torch.ones(2, 4), z).tolist() == [math.inf, math.inf]
    with pytest.raises(ValueError):
        relative_output_error(torch.zeros(2, 3), torch.zeros(3, 2))


def test_sparse_attention_error_shrinks_as_recall_grows() -> None:
    """Tie to the ops: attending over the best blocks drives the output error towards 0."""
    ops = TorchReferenceOps()
    q, k, table, seq_lens, scale = random_case(6, b=2, m=6)
    seq_lens = torch.tensor([24, 24])
    v = torch.randn_like(k)
    dense, _ = ops.paged_decode_attention(q, k, v, table, seq_lens, scale)
    mass = dense_block_mass(q, k, table, seq_lens, scale).mean(1)
    n = torch.tensor([6, 6])
    errs, recs = [], []
    for budget in (1, 3, 6):
        ids, counts = ops.block_topk(mass, torch.full_like(n, budget), torch.zeros_like(mass, dtype=torch.bool), n)
        sub_table = torch.gather(table, 1, ids.clamp(min=0).to(torch.int64)).to(torch.int32)
        out, _ = ops.paged_decode_attention(q, k, v, sub_table, counts * 4, scale)
        errs.append(relative_output_error(out, dense))
        recs.append(attention_mass_recall(q, k, table, seq_lens, ids, counts, scale))
    assert bool((recs[0] <= recs[1] + 1e-6).all() and (recs[1] <= recs[2] + 1e-6).all())
    torch.testing.assert_close(recs[2], torch.ones(2))
    torch.testing.assert_close(errs[2], torch.zeros(2), atol=1e-5, rtol=0)
