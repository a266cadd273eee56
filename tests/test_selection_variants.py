"""`kv_head_combine`: "sum" (the scorer's sum over KV heads) or "rank" (each KV head scored alone,
a block ranked by its best rank in any head). Issue #20's trace found the retrieval KV head of a
layer outvoted by the others under the sum; the planted case below is that situation in small."""

from __future__ import annotations

import math

import pytest
import torch

from tests.paged import make_paged
from ucm.config.errors import ConfigError
from ucm.methods import method_names
from ucm.ops import TorchReferenceOps
from ucm.ops.subblocks import block_max, sub_block_table
from ucm.sparse.base import ModelShapes, combine_kv_head_ranks
from ucm.sparse.factory import build_sparse_method

OPS = TorchReferenceOps()
BS = 8
INF = math.inf


def test_combine_ranks_by_best_head_rank_then_mean_rank() -> None:
    s = torch.tensor([[[5.0, 4, 3, 2, 1, -INF], [0.1, 0.2, 0.9, 0.3, 0.0, -INF]]])
    c = combine_kv_head_ranks(s)[0]
    # ranks: head 0 -> 0 1 2 3 4 (5), head 1 -> 3 2 0 1 4 (5); best ranks 0 1 0 1 4, means 1.5 1.5 1 2 4
    order = torch.argsort(c, descending=True)[:5].tolist()
    assert order == [2, 0, 1, 3, 4]
    assert c[5] == -INF
    # one head: the combined order is that head's order
    one = torch.tensor([[[0.3, -1.0, 7.0, 2.0]]])
    assert torch.argsort(combine_kv_head_ranks(one)[0], descending=True).tolist() == [2, 3, 0, 1]


def _additive_methods() -> list[str]:
    """The registered windowed methods whose scorer adds up KV heads (those "rank" applies to)."""
    shapes = ModelShapes(1, 4, 2, 8, BS, 4)
    names = []
    for name in method_names(windowed=True):
        m = build_sparse_method({name: {"sparse_ratio": 0.3}}, shapes, OPS, host_ops=OPS)
        if m.scorer.kv_heads_additive:
            names.append(name)
        m.close()
    return names


ADDITIVE = _additive_methods()


def _retrieval_head_case(hq=6, hkv=3, d=16, seed=0):
    """KV head 2 has one block (17) of keys along its queries, at a small scale; KV heads 0 and 1
    have large keys along their queries in other blocks. Summed, the big heads outvote block 7."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = 20
    batch = make_paged([n_blocks * BS], BS, hkv, d, g)
    batch.k_cache.mul_(0.01)
    q = torch.randn(1, hq, d, generator=g)
    grp = hq // hkv
    target = q[0].view(hkv, grp, d).mean(1)  # [Hkv, D]
    for j in range(2, 16):  # heads 0 and 1: many strong blocks
        phys = int(batch.block_table[0, j])
        batch.k_cache[phys, :, 0] = 2.0 * target[0]
        batch.k_cache[phys, :, 1] = 2.0 * target[1]
    phys = int(batch.block_table[0, 17])
    batch.k_cache[phys, :, 2] = 0.5 * target[2]  # the retrieval head's needle, small scale
    return batch, q, ModelShapes(1, hq, hkv, d, BS, batch.k_cache.shape[0])


@pytest.mark.parametrize("name", ADDITIVE)
def test_rank_keeps_the_retrieval_heads_block_that_the_sum_drops(name: str) -> None:
    batch, q, shapes = _retrieval_head_case()
    kept = {}
    for combine in ("sum", "rank"):
        cfg = {
            name: {
                "sparse_ratio": 0.3,
                "init_window_sz": 1,
                "local_window_sz": 1,
                "min_blocks": 1,
                "retrieval_stride": 1,
                "kv_head_combine": combine,
            }
        }
        m = build_sparse_method(cfg, shapes, OPS, host_ops=OPS)
        m.on_kv_written(0, batch.keys(0), batch.slots(0))
        plan = m.begin_step(["a"], batch.seq_lens, batch.block_table)
        sel = m.select(0, q, plan)
        kept[combine] = sel.logical_blocks(0)
        m.end_step(plan)
        m.close()
    assert len(kept["sum"]) == len(kept["rank"]) == math.ceil(0.3 * 20)  # same budget
    assert 17 not in kept["sum"], kept
    assert 17 in kept["rank"], kept


@pytest.mark.parametrize("merge", [None, 2])
@pytest.mark.parametrize("name", ADDITIVE)
def test_per_head_scores_are_each_heads_own(name: str, merge: int | None) -> None:
    """What "rank" combines: the scorer's score with one GQA group's queries kept and the rest
    zeroed is the score of that KV head alone (the op on that head's slice of queries and
    representations, each block its best group's with sub-blocks), and the heads' scores add up
    to the "sum" score (whole blocks) or bound it from above (sub-blocks: the max over a block's
    groups of a sum over heads is at most the sum over heads of each head's best group)."""
    batch, q, shapes = _retrieval_head_case(seed=3)
    cfg = {"sparse_ratio": 0.3, "retrieval_stride": 1, "blk_repre_inner_token_merge": merge}
    m = build_sparse_method({name: cfg}, shapes, OPS, host_ops=OPS)
    m.on_kv_written(0, batch.keys(0), batch.slots(0))
    sc, table, lens = m.scorer, batch.block_table, batch.seq_lens
    groups, size = (1, BS) if merge is None else (BS // merge, merge)
    sub = sub_block_table(table, groups)
    full = sc.score(0, q, table, lens, ["a"])
    g = shapes.num_q_heads // shapes.num_kv_heads
    total = torch.zeros_like(full)
    for h in range(shapes.num_kv_heads):
        qh = torch.zeros_like(q)
        qh[:, h * g : (h + 1) * g] = q[:, h * g : (h + 1) * g]
        mine = sc.score(0, qh, table, lens, ["a"])
        one = q[:, h * g : (h + 1) * g].contiguous()
        if name == "Quest":
            st = sc.stats[0]
            lo, hi = st.mins[:, h : h + 1].contiguous(), st.maxs[:, h : h + 1].contiguous()
            ref = OPS.block_scores_minmax(one, lo, hi, sub, lens, size, "max")
        else:
            sums = sc.acc[0].sums  # [NB, R, Hkv, D]
            reprs = sums[:, :, h : h + 1].reshape(-1, 1, sums.shape[-1]).contiguous()
            ref = OPS.block_scores_dot(one, reprs, sub, (lens // BS) * BS, size, sc.group_reduce)
        torch.testing.assert_close(mine, block_max(ref, groups))
        total += torch.where(torch.isfinite(mine), mine, 0.0)
    finite = torch.isfinite(full)
    if merge is None:
        torch.testing.assert_close(total[finite], full[finite], rtol=1e-4, atol=1e-4)
    else:
        assert (total[finite] >= full[finite] - 1e-4).all()
        assert (total[finite] > full[finite] + 1e-3).any()  # the groups the heads like best differ
    m.close()


def test_rank_is_refused_for_scorers_that_do_not_add_up_heads() -> None:
    shapes = ModelShapes(2, 8, 2, 32, BS, 64)
    with pytest.raises(ConfigError, match="kv_head_combine"):
        build_sparse_method({"KVStarMultiStep": {"kv_head_combine": "rank"}}, shapes, OPS)
    with pytest.raises(ValueError, match="kv_head_combine"):
        build_sparse_method({"ESA": {"kv_head_combine": "max"}}, shapes, OPS)


# methods that score on the host apply a retrieval a step later: the steps below assume it is at once
@pytest.mark.parametrize("name", method_names(windowed=True, host_scoring=False))
def test_sticky_keeps_the_blocks_ranked_first_in_recent_steps(name: str) -> None:
    """Step 0's query points at block 5, steps 1-3 the opposite way, at block 11: with sticky_steps=2 block 5 is
    still read at steps 1 and 2 (it was a top block of a retrieval at most 2 retrievals ago) and
    dropped at step 3; without it, block 5 is dropped at step 1. The budget never grows."""
    g = torch.Generator().manual_seed(5)
    hq, hkv, d, n_blocks = 4, 2, 16, 24
    batch = make_paged([n_blocks * BS], BS, hkv, d, g)
    batch.k_cache.mul_(0.02)
    q0 = torch.randn(1, hq, d, generator=g)
    q1 = -q0  # block 5 (along q0) scores lowest of all under q1
    for q, j in ((q0, 5), (q1, 11)):
        target = q[0].view(hkv, hq // hkv, d).mean(1)
        batch.k_cache[int(batch.block_table[0, j])] = 3.0 * target[None]
    shapes = ModelShapes(1, hq, hkv, d, BS, batch.k_cache.shape[0])
    kept = {}
    for sticky in (0, 2):
        body = {"sparse_ratio": 0.25, "init_window_sz": 1, "local_window_sz": 1, "min_blocks": 1}
        body.update(retrieval_stride=1, sticky_steps=sticky, sticky_top=1)
        m = build_sparse_method({name: body}, shapes, OPS, host_ops=OPS)
        m.on_kv_written(0, batch.keys(0), batch.slots(0))
        kept[sticky] = []
        for q in (q0, q1, q1, q1):
            plan = m.begin_step(["a"], batch.seq_lens, batch.block_table)
            kept[sticky].append(m.select(0, q, plan).logical_blocks(0))
            m.end_step(plan)
        m.finish("a")
        m.close()
    k = math.ceil(0.25 * n_blocks)
    assert all(len(s) == k for s in kept[0] + kept[2])
    assert 5 in kept[0][0] and 5 not in kept[0][1]
    assert [5 in s for s in kept[2]] == [True, True, True, False], kept[2]
    assert all(11 in s for s in kept[0][1:] + kept[2][1:])


def test_the_batch_path_refuses_the_variants() -> None:
    from ucm.sparse.batch_selection import BatchSelector

    shapes = ModelShapes(2, 8, 2, 32, BS, 64)
    BatchSelector(build_sparse_method({"ESA": {}}, shapes, OPS))  # the default runs there
    for body in ({"kv_head_combine": "rank"}, {"sticky_steps": 4}, {"bound_guard_top": 2}):
        with pytest.raises(ValueError, match="per-request path only"):
            BatchSelector(build_sparse_method({"Quest": body}, shapes, OPS))


def _spike_case(hq=4, hkv=2, d=16, n_blocks=24, seed=7):
    """Block 9 holds one key along the query among small noise; blocks 2..8 hold every key at a
    third of that along the query: their mean of K beats block 9's (diluted by the block size),
    while block 9's min / max box bounds q . k by its one big key."""
    g = torch.Generator().manual_seed(seed)
    batch = make_paged([n_blocks * BS], BS, hkv, d, g)
    batch.k_cache.mul_(0.01)
    q = torch.randn(1, hkv, d, generator=g).repeat_interleave(hq // hkv, dim=1)
    along = q[0, :: hq // hkv] / q[0, :: hq // hkv].norm(dim=-1, keepdim=True)  # [Hkv, D]
    for j in range(2, 9):
        batch.k_cache[int(batch.block_table[0, j])] = 1.0 * along[None]
    batch.k_cache[int(batch.block_table[0, 9]), 3] = 3.0 * along
    return batch, q, ModelShapes(1, hq, hkv, d, BS, batch.k_cache.shape[0])


@pytest.mark.parametrize("name", method_names(windowed=True, host_scoring=False))
def test_bound_guard_keeps_the_one_key_block_the_mean_drops(name: str) -> None:
    batch, q, shapes = _spike_case()
    kept = {}
    for top in (0, 1):
        body = {"sparse_ratio": 0.25, "init_window_sz": 1, "local_window_sz": 1, "min_blocks": 1}
        body.update(retrieval_stride=1, bound_guard_top=top)
        m = build_sparse_method({name: body}, shapes, OPS, host_ops=OPS)
        m.on_kv_written(0, batch.keys(0), batch.slots(0))
        plan = m.begin_step(["a"], batch.seq_lens, batch.block_table)
        kept[top] = m.select(0, q, plan).logical_blocks(0)
        m.end_step(plan)
        m.close()
    assert len(kept[0]) == len(kept[1]) == math.ceil(0.25 * 24)  # the guard spends the same budget
    assert 9 in kept[1], kept
    if name == "ESA":  # the mean of K alone drops it: what the guard is for
        assert 9 not in kept[0], kept


def test_bound_guard_is_refused_with_offload_and_out_of_range() -> None:
    shapes = ModelShapes(2, 8, 2, 32, BS, 64)
    with pytest.raises(ConfigError, match="bound_guard_top"):
        build_sparse_method({"ESA": {"bound_guard_top": 2, "offload": True}}, shapes, OPS)
    with pytest.raises(ConfigError, match="bound_guard_top"):
        build_sparse_method({"ESA": {"bound_guard_top": 65}}, shapes, OPS)
