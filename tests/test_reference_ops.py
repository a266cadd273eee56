"""The pure-torch reference against independent, loop-by-loop NumPy oracles.

The reference is the oracle for every backend, so it is itself checked here against code that
shares nothing with it: per-token Python/NumPy loops straight from the contract's definitions.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.paged import make_paged
from ucm.ops import TorchReferenceOps

OPS = TorchReferenceOps()
CASES = [
    # (seq_lens, block_size, Hq, Hkv, D)
    ([37, 5, 64], 8, 4, 4, 16),  # GQA 1, lengths not multiples of the block
    ([3], 8, 8, 2, 32),  # shorter than one block, GQA 4
    ([40, 17, 1], 4, 16, 2, 8),  # GQA 8, a one-token row
    ([24, 33], 8, 4, 1, 72),  # MLA-like: one KV head, wide
]


def np_pack(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    out = np.zeros((*x.shape[:-1], (n + 7) // 8), dtype=np.uint8)
    for idx in np.ndindex(*x.shape[:-1]):
        for i in range(n):
            if x[idx + (i,)] >= 0:
                out[idx + (i // 8,)] |= np.uint8(1 << (i % 8))
    return out


def np_popcount(x: np.ndarray) -> int:
    return int(sum(bin(int(v)).count("1") for v in x.ravel()))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 64])
def test_sign_bits_pack_matches_bitwise_definition(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, generator=g)
    x[0, 0, 0] = 0.0  # zero packs as 1
    x[0, 1, 0] = -0.0  # so does negative zero (-0.0 >= 0)
    got = OPS.sign_bits_pack(x)
    assert got.dtype == torch.uint8 and got.shape == (3, 2, (n + 7) // 8)
    np.testing.assert_array_equal(got.numpy(), np_pack(x.numpy()))


def test_sign_bits_pack_documented_example() -> None:
    x = torch.tensor([5, 4, 3, 2, 0, -1, -2, 4, 3, 2, 1, 0, -1, -2], dtype=torch.float32)
    assert OPS.sign_bits_pack(x).tolist() == [159, 15]


@pytest.mark.parametrize("seq_lens,bs,hq,hkv,d", CASES)
@pytest.mark.parametrize("reduce", ["min", "mean", "max"])
def test_hamming_block_scores(seq_lens, bs, hq, hkv, d, reduce) -> None:
    g = torch.Generator().manual_seed(1)
    batch = make_paged(seq_lens, bs, hkv, d, g)
    w = torch.randn(d, 24, generator=g)
    k_codes = OPS.hash_encode(batch.k_cache, w)  # [NB, bs, Hkv, 3]
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    q_codes = OPS.hash_encode(q, w)
    got = OPS.hamming_block_scores(q_codes, k_codes, batch.block_table, batch.seq_lens, reduce).numpy()
    grp = hq // hkv
    kc, qc = k_codes.numpy(), q_codes.numpy()
    for r, n in enumerate(seq_lens):
        for j in range(batch.block_table.shape[1]):
            toks = [t for t in range(j * bs, min((j + 1) * bs, n))]
            if not toks:
                assert got[r, j] == math.inf
                continue
            phys = int(batch.block_table[r, j])
            dists = [sum(np_popcount(qc[r, h] ^ kc[phys, t - j * bs, h // grp]) for h in range(hq)) for t in toks]
            want = {"min": min, "max": max, "mean": lambda v: sum(v) / len(v)}[reduce](dists)
            assert got[r, j] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("group_reduce", ["mean", "max"])
def test_block_scores_dot(group_reduce: str) -> None:
    g = torch.Generator().manual_seed(3)
    hq, hkv, d, bs = 8, 2, 16, 4
    reps = torch.randn(10, hkv, d, generator=g)
    table = torch.tensor([[3, 1, 7, 0], [9, 2, 0, 0]])
    lens = torch.tensor([13, 8])
    q = torch.randn(2, hq, d, generator=g)
    got = OPS.block_scores_dot(q, reps, table, lens, bs, group_reduce).numpy()
    qn, rn = q.numpy().reshape(2, hkv, hq // hkv, d), reps.numpy()
    for r in range(2):
        n_b = -(-int(lens[r]) // bs)
        for j in range(4):
            if j >= n_b:
                assert got[r, j] == -math.inf
                continue
            rep = rn[int(table[r, j])]
            if group_reduce == "mean":
                want = sum(qn[r, h].mean(0) @ rep[h] for h in range(hkv))
            else:
                want = sum(max(qn[r, h, i] @ rep[h] for i in range(hq // hkv)) for h in range(hkv))
            assert got[r, j] == pytest.approx(float(want), rel=1e-5, abs=1e-5)


def np_topk(scores, k, must, n):
    out = []
    for r in range(scores.shape[0]):
        valid = list(range(n[r]))
        forced = [j for j in valid if must[r, j]]
        rest = sorted(
            (j for j in valid if not must[r, j]),
            key=lambda j: (-(scores[r, j] if not np.isnan(scores[r, j]) else -np.inf), j),
        )
        count = min(n[r], max(k[r], len(forced)))
        out.append(sorted(forced + rest[: count - len(forced)]))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_block_topk_matches_definition(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    b, m = 5, 12
    scores = torch.randint(0, 4, (b, m), generator=g).to(torch.float32)  # many ties
    scores[0, 3] = float("nan")
    k = torch.tensor([0, 3, 12, 20, 5])
    must = torch.rand(b, m, generator=g) < 0.2
    n = torch.tensor([12, 7, 12, 3, 0])
    ids, counts = OPS.block_topk(scores, k, must, n)
    want = np_topk(scores.numpy(), k.tolist(), must.numpy(), n.tolist())
    for r in range(b):
        assert counts[r] == len(want[r])
        assert ids[r, : counts[r]].tolist() == want[r]
        assert (ids[r, counts[r] :] == -1).all()


@pytest.mark.parametrize("seq_lens,bs,hq,hkv,d", CASES)
def test_paged_decode_attention_matches_sdpa(seq_lens, bs, hq, hkv, d) -> None:
    g = torch.Generator().manual_seed(5)
    batch = make_paged(seq_lens, bs, hkv, d, g)
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    out, lse = OPS.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens, 0.3)
    for r in range(len(seq_lens)):
        k = batch.keys(r).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, n, D]
        v = batch.values(r).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q[r][:, None], k, v, scale=0.3)[:, 0]
        torch.testing.assert_close(out[r], want, rtol=1e-5, atol=1e-5)
        logits = torch.einsum("hd,hnd->hn", q[r], k) * 0.3
        torch.testing.assert_close(lse[r], torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)


def test_paged_write() -> None:
    cache = torch.zeros(4, 2, 3)
    vals = torch.arange(12, dtype=torch.float32).view(4, 3)
    OPS.paged_write(cache, vals, torch.tensor([7, -1, 0, 3]))
    flat = cache.view(8, 3)
    assert flat[7].tolist() == [0, 1, 2] and flat[0].tolist() == [6, 7, 8] and flat[3].tolist() == [9, 10, 11]
    assert flat[[1, 2, 4, 5, 6]].abs().sum() == 0  # the -1 slot wrote nothing


def test_block_topk_forced_beats_infinite_scores_and_counts_fit_the_table() -> None:
    ids, counts = OPS.block_topk(
        torch.tensor([[math.inf, 0.0, 1.0]]), torch.tensor([1]), torch.tensor([[False, False, True]]), torch.tensor([3])
    )
    assert ids.tolist() == [[2, -1, -1]] and counts.tolist() == [1]
    ids, counts = OPS.block_topk(
        torch.zeros(1, 2), torch.tensor([5]), torch.zeros(1, 2, dtype=torch.bool), torch.tensor([9])
    )
    assert ids.tolist() == [[0, 1]] and counts.tolist() == [2]


def test_stale_table_entries_past_a_rows_end_are_ignored() -> None:
    g = torch.Generator().manual_seed(6)
    batch = make_paged([10], 8, 2, 16, g)
    table = torch.cat([batch.block_table, torch.tensor([[10_000, -7]], dtype=torch.int32)], 1)
    q = torch.randn(1, 4, 16, generator=g)
    out, _ = OPS.paged_decode_attention(q, batch.k_cache, batch.v_cache, table, batch.seq_lens, 0.25)
    ref, _ = OPS.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens, 0.25)
    torch.testing.assert_close(out, ref)
    w = torch.randn(16, 16, generator=g)
    s = OPS.hamming_block_scores(OPS.hash_encode(q, w), OPS.hash_encode(batch.k_cache, w), table, batch.seq_lens)
    assert torch.isinf(s[0, 2:]).all()


def test_mode_codes_name_every_literal_once() -> None:
    """`reduce_code` / `group_reduce_code` map exactly the contract's Literal names to distinct
    codes, and reject anything else with the valid names."""
    from typing import get_args

    from ucm.ops.contract import BlockReduce, GroupReduce, group_reduce_code, reduce_code

    assert sorted(c.name.lower() for c in {reduce_code(n) for n in get_args(BlockReduce)}) == sorted(
        get_args(BlockReduce)
    )
    assert sorted(c.name.lower() for c in {group_reduce_code(n) for n in get_args(GroupReduce)}) == sorted(
        get_args(GroupReduce)
    )
    for bad in ("sum", "MIN", "", None):
        with pytest.raises(ValueError, match="valid: mean, max, min"):
            reduce_code(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid: mean, max"):
        group_reduce_code("min")
