"""Quest's two ops (`block_minmax_update`, `block_scores_minmax`): the torch reference against
loop-by-loop NumPy oracles written from the contract's definitions, properties of the bound
(hypothesis), and the CPU kernels' own validation, NaN handling and threaded paths. Every
backend against the reference: tests/test_ops_conformance.py.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (see test_cuda_kernels)

from ucm.ops.reference import TorchReferenceOps

REF = TorchReferenceOps()
HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = HAS_TRITON and torch.cuda.is_available()
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ NumPy oracles
def np_minmax_update(mins: np.ndarray, maxs: np.ndarray, key: np.ndarray, slots: np.ndarray, bs: int) -> None:
    """The contract read literally: restart every block whose offset 0 is in the call, then take
    the call's keys in one by one, channel by channel."""
    for t in range(len(slots)):
        s = int(slots[t])
        if s >= 0 and s % bs == 0:
            mins[s // bs] = np.inf
            maxs[s // bs] = -np.inf
    for t in range(len(slots)):
        s = int(slots[t])
        if s < 0:
            continue
        blk = s // bs
        for h in range(key.shape[1]):
            for c in range(key.shape[2]):
                v = float(key[t, h, c])
                mins[blk, h, c] = min(float(mins[blk, h, c]), v)
                maxs[blk, h, c] = max(float(maxs[blk, h, c]), v)


def np_scores_minmax(
    q: np.ndarray, mins: np.ndarray, maxs: np.ndarray, table: np.ndarray, lens: np.ndarray, bs: int, group_reduce: str
) -> np.ndarray:
    b, hq, d = q.shape
    hkv = mins.shape[1]
    g = hq // hkv
    out = np.full(table.shape, -np.inf)
    for r in range(b):
        n_b = -(-int(lens[r]) // bs)
        for j in range(min(n_b, table.shape[1])):
            p = int(table[r, j])
            total = 0.0
            for h in range(hkv):
                bounds = []
                for gi in range(g):
                    qv = q[r, h * g + gi].astype(np.float64)
                    bound = 0.0
                    for c in range(d):
                        bound += max(qv[c] * float(mins[p, h, c]), qv[c] * float(maxs[p, h, c]))
                    bounds.append(bound)
                total += max(bounds) if group_reduce == "max" else sum(bounds) / g
            out[r, j] = total
    return out


UPDATE_CALLS = [
    torch.cat([torch.arange(0, 21), torch.tensor([-1, -1])]),  # a prefill: blocks 0, 1, part of 2
    torch.tensor([21, 22, -1, 40]),  # decode: block 2 grows, block 5 starts
    torch.tensor([9, 8, 10]),  # block 1 recycled: its offset 0 written after offset 1 of the same call
    torch.tensor([23, 23]),  # one slot written twice in one call
]


def test_minmax_update_matches_the_numpy_oracle() -> None:
    g = gen(1)
    nb, bs, h, d = 7, 8, 2, 5
    mins, maxs = torch.zeros(nb, h, d), torch.zeros(nb, h, d)
    nmin, nmax = np.zeros((nb, h, d)), np.zeros((nb, h, d))
    for slots in UPDATE_CALLS:
        key = torch.randn(len(slots), h, d, generator=g)
        REF.block_minmax_update(mins, maxs, key, slots, bs)
        np_minmax_update(nmin, nmax, key.numpy(), slots.numpy(), bs)
        np.testing.assert_array_equal(mins.numpy(), nmin.astype(np.float32))
        np.testing.assert_array_equal(maxs.numpy(), nmax.astype(np.float32))
    assert not torch.isinf(mins).any() and not torch.isinf(maxs).any()  # every restarted block got a key
    assert (mins[3] == 0).all() and (maxs[6] == 0).all()  # never written: as allocated


@pytest.mark.parametrize("group_reduce", ["mean", "max"])
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 16), (8, 2, 16), (16, 2, 8), (4, 1, 72)])
def test_scores_minmax_match_the_numpy_oracle(group_reduce: str, hq: int, hkv: int, d: int) -> None:
    g = gen(hq * 7 + d)
    bs, nb = 4, 10
    lo = torch.randn(nb, hkv, d, generator=g)
    hi = lo + torch.rand(nb, hkv, d, generator=g)
    # row 0 ends mid-block, row 1 on a block boundary with stale / -1 entries after it, row 2 empty
    table = torch.tensor([[3, 1, 7, 0], [9, 2, -1, 99], [5, 5, 5, 5]])
    lens = torch.tensor([13, 8, 0])
    q = torch.randn(3, hq, d, generator=g)
    got = REF.block_scores_minmax(q, lo, hi, table, lens, bs, group_reduce)
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    want = np_scores_minmax(q.numpy(), lo.numpy(), hi.numpy(), table.numpy(), lens.numpy(), bs, group_reduce)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-4)
    assert got[1, 2:].eq(-math.inf).all() and got[2].eq(-math.inf).all()


def test_scores_minmax_rejects_an_unknown_group_reduce() -> None:
    q, lo = torch.zeros(1, 2, 4), torch.zeros(3, 1, 4)
    with pytest.raises(ValueError, match="group reduce"):
        REF.block_scores_minmax(q, lo, lo, torch.zeros(1, 2, dtype=torch.long), torch.tensor([4]), 4, "sum")


def test_minmax_update_rejects_slots_past_the_cache() -> None:
    mins = torch.zeros(2, 1, 4)
    with pytest.raises(ValueError, match="past"):
        REF.block_minmax_update(mins, mins.clone(), torch.zeros(1, 1, 4), torch.tensor([8]), 4)


# ------------------------------------------------------------------------------ properties
@HYP
@given(
    hkv=st.sampled_from([1, 2]),
    g=st.sampled_from([1, 3]),
    n=st.integers(1, 6),
    splits=st.lists(st.integers(0, 6), max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_bound_is_an_upper_bound_and_tight_on_one_key(hkv, g, n, splits, seed) -> None:
    """Whatever calls the keys of a block arrive in (in order, offset 0 first), the statistics are
    the min / max of the block's keys, and each head's bound is >= q . k of every key; the
    "max" score of a block holding one key is exactly q . k (for G = 1)."""
    r = gen(seed)
    bs, d = 8, 6
    key = torch.randn(n, hkv, d, generator=r)
    slots = torch.arange(bs, bs + n)  # block 1, from offset 0
    mins, maxs = torch.zeros(3, hkv, d), torch.zeros(3, hkv, d)
    cuts = sorted({min(c, n) for c in splits} | {0, n})
    for a, b in zip(cuts, cuts[1:], strict=False):
        REF.block_minmax_update(mins, maxs, key[a:b], slots[a:b], bs)
    assert torch.equal(mins[1], key.amin(0)) and torch.equal(maxs[1], key.amax(0))
    q = torch.randn(1, hkv * g, d, generator=r)
    table, lens = torch.tensor([[1]]), torch.tensor([n])
    score = REF.block_scores_minmax(q, mins, maxs, table, lens, bs, "max")
    qk = torch.einsum("hgd,thd->thg", q[0].view(hkv, g, d), key)  # [n, Hkv, G]
    best = qk.amax(0).amax(-1).sum()  # per head the best key, summed over KV heads
    assert float(score[0, 0]) >= float(best) - 1e-4 * (1 + abs(float(best)))
    if n == 1 and g == 1:
        assert float(score[0, 0]) == pytest.approx(float(qk.sum()), rel=1e-5, abs=1e-5)


@HYP
@given(g=st.sampled_from([1, 2, 4]), scale=st.floats(0.1, 10.0), seed=st.integers(0, 2**31 - 1))
def test_mean_is_the_group_sum_over_g_and_max_dominates_it(g, scale, seed) -> None:
    r = gen(seed)
    hkv, d, bs = 2, 8, 4
    lo = torch.randn(5, hkv, d, generator=r)
    hi = lo + torch.rand(5, hkv, d, generator=r)
    q = scale * torch.randn(2, hkv * g, d, generator=r)
    table, lens = torch.tensor([[0, 1, 2], [3, 4, 0]]), torch.tensor([12, 5])
    mean = REF.block_scores_minmax(q, lo, hi, table, lens, bs, "mean")
    mx = REF.block_scores_minmax(q, lo, hi, table, lens, bs, "max")
    valid = torch.isfinite(mean)
    assert torch.equal(valid, torch.isfinite(mx))
    assert (mx[valid] >= mean[valid] - 1e-4 * (1 + mean[valid].abs())).all()
    # a scaled query scales the bound (max(q*a, q*b) is positively homogeneous in q)
    twice = REF.block_scores_minmax(2 * q, lo, hi, table, lens, bs, "mean")
    torch.testing.assert_close(twice[valid], 2 * mean[valid], rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------ the CPU kernels
@pytest.fixture(scope="module")
def cpu():
    from ucm_backends.cpu import ops as cpu_module

    ops = cpu_module.CpuOps()
    if cpu_module.find_compiler() is not None:
        assert ops.native_error is None, ops.native_error
    return ops


def test_cpu_kernels_are_the_native_ones(cpu) -> None:
    if not cpu.native_loaded:
        pytest.skip("no native CPU kernels here")
    ns = torch.ops.ucm_cpu
    assert callable(ns.block_minmax_update) and callable(ns.block_scores_minmax)


def test_cpu_validation(cpu) -> None:
    mins = torch.zeros(2, 2, 4)
    with pytest.raises(ValueError, match="past"):
        cpu.block_minmax_update(mins, mins.clone(), torch.zeros(1, 2, 4), torch.tensor([8]), 4)
    with pytest.raises(ValueError):
        cpu.block_minmax_update(mins, mins.clone(), torch.zeros(1, 3, 4), torch.tensor([0]), 4)  # heads differ
    q = torch.zeros(1, 4, 4)
    table, lens = torch.zeros(1, 2, dtype=torch.long), torch.tensor([5])
    with pytest.raises(ValueError, match="group reduce"):
        cpu.block_scores_minmax(q, mins, mins, table, lens, 4, "sum")
    with pytest.raises(ValueError, match="multiple"):
        cpu.block_scores_minmax(torch.zeros(1, 3, 4), mins, mins, table, lens, 4)
    with pytest.raises(ValueError, match="head dims"):
        cpu.block_scores_minmax(torch.zeros(1, 4, 8), mins, mins, table, lens, 4)
    with pytest.raises(ValueError):
        cpu.block_scores_minmax(q, mins, torch.zeros(3, 2, 4), table, lens, 4)  # mins and maxs differ
    with pytest.raises(IndexError):
        cpu.block_scores_minmax(q, mins, mins, torch.tensor([[0, 7]]), lens, 4)  # block 7 of 2


def test_cpu_nan_keys_propagate_like_the_reference(cpu) -> None:
    mins, maxs = torch.zeros(2, 1, 3), torch.zeros(2, 1, 3)
    ref = (mins.clone(), maxs.clone())
    key = torch.tensor([[[1.0, float("nan"), -2.0]], [[3.0, 0.5, float("nan")]]])
    cpu.block_minmax_update(mins, maxs, key, torch.tensor([0, 1]), 4)
    REF.block_minmax_update(*ref, key, torch.tensor([0, 1]), 4)
    torch.testing.assert_close(mins, ref[0], equal_nan=True)
    torch.testing.assert_close(maxs, ref[1], equal_nan=True)


def test_cpu_large_prefill_runs_threaded_and_matches(cpu) -> None:
    """Big enough for the kernels' OpenMP paths (channel slices for the update, (row, block)
    pairs for the scores)."""
    g = gen(9)
    nb, bs, h, d = 40, 16, 8, 128
    slots = torch.arange(0, 37 * bs + 5)
    key = torch.randn(len(slots), h, d, generator=g)
    ref = (torch.zeros(nb, h, d), torch.zeros(nb, h, d))
    got = (torch.zeros(nb, h, d), torch.zeros(nb, h, d))
    REF.block_minmax_update(*ref, key, slots, bs)
    cpu.block_minmax_update(*got, key, slots, bs)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    table = torch.stack([torch.randperm(nb, generator=g)[:38] for _ in range(4)])
    lens = torch.tensor([38 * bs, 37 * bs + 5, 100, 1])
    q = torch.randn(4, 32, d, generator=g)
    for mode in ("mean", "max"):
        torch.testing.assert_close(
            cpu.block_scores_minmax(q, *got, table, lens, bs, mode),
            REF.block_scores_minmax(q, *ref, table, lens, bs, mode),
            rtol=1e-4,
            atol=1e-2,
        )
