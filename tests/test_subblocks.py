"""Sub-block representations (`blk_repre_inner_token_merge` on ESA, GSA and Quest): a block's
score is its best group of `merge` tokens, checked against NumPy references computed from the
written keys themselves (mean of each group dotted with the query; min / max box of each group),
on the torch reference, the CPU backend and the CUDA backend's kernels (Triton's interpreter on
a CPU); recycled blocks and copies (offload) keep their groups; and the reason for the key: one
key along the query among loud noise, which a whole-block mean dilutes away, is selected.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (see test_cuda_kernels)

from tests.paged import make_paged
from ucm.config.errors import ConfigError
from ucm.ops import TorchReferenceOps
from ucm.ops.subblocks import block_max, sub_block_ids, sub_block_table
from ucm.sparse.base import ModelShapes
from ucm.sparse.esa import ESAScorer
from ucm.sparse.factory import build_sparse_method
from ucm.sparse.gsa import GSAScorer
from ucm.sparse.quest import QuestScorer

BS = 8
NEEDLE = 1.0  # the planted key's length, in sqrt(head_dim)


def backends():
    from ucm_backends.cpu.ops import CpuOps

    out = [pytest.param(TorchReferenceOps(), id="reference"), pytest.param(CpuOps(), id="cpu")]
    if importlib.util.find_spec("triton") is not None:
        from ucm_backends.cuda.ops import CudaOps

        out.append(pytest.param(CudaOps(interpret=not torch.cuda.is_available()), id="cuda"))
    return out


def test_sub_block_ids_and_block_max() -> None:
    table = torch.tensor([[3, 0], [1, 5]], dtype=torch.int32)
    assert sub_block_table(table, 4).tolist() == [[12, 13, 14, 15, 0, 1, 2, 3], [4, 5, 6, 7, 20, 21, 22, 23]]
    assert sub_block_table(table, 4).dtype == torch.int32 and sub_block_table(table, 1) is table
    assert sub_block_ids(torch.tensor([2, 0]), 2).tolist() == [4, 5, 0, 1]
    s = torch.tensor([[1.0, 5.0, -math.inf, -math.inf], [-2.0, -math.inf, 0.5, 0.25]])
    assert block_max(s, 2).tolist() == [[5.0, -math.inf], [-2.0, 0.5]]


def _group_keys(keys: np.ndarray, n: int, merge: int) -> list[np.ndarray]:
    """The groups of `merge` consecutive keys [merge', Hkv, D] of a row's first n tokens."""
    return [keys[s : min(s + merge, n)] for s in range(0, n, merge)]


@pytest.mark.parametrize("ops", backends())
@pytest.mark.parametrize("merge", [1, 2, 4, BS])
@pytest.mark.parametrize("scorer_cls", [ESAScorer, GSAScorer])
@pytest.mark.parametrize("dtype", ["auto", "float8_e4m3fn"])
def test_mean_scores_are_the_best_groups_dot_product(ops, merge: int, scorer_cls, dtype: str) -> None:
    """ESA (group-mean query) and GSA (max over the group's query heads), each summed over KV
    heads, against the sums of each group's keys (a group's mean up to the common factor
    merge), in the backend's dtype or float8 (`blk_repre_dtype`); full blocks only, the partial
    last block and padding are -inf."""
    check_best_group_scores(ops, scorer_cls, dtype, merge, merge, {})


@pytest.mark.parametrize("ops", backends())
@pytest.mark.parametrize("merge", [1, 2])
@pytest.mark.parametrize("scorer_cls", [ESAScorer, GSAScorer])
def test_a_layer_keeps_its_own_group_size(ops, merge: int, scorer_cls) -> None:
    """`layer_repre_inner_token_merge`: layer 1 scores by its own groups, the other layer by the
    default (whole blocks here)."""
    sc = check_best_group_scores(ops, scorer_cls, "auto", BS, merge, {1: merge})
    assert sc.groups_of(0) == 1 and sc.acc[0].sums.shape[1] == 1


def check_best_group_scores(ops, scorer_cls, dtype: str, default: int, merge: int, layer_merge: dict):
    """Layer 1's scores (groups of `merge` tokens) against NumPy; returns the scorer."""
    hq, hkv, d = 6, 2, 16
    g = torch.Generator().manual_seed(5)
    seq_lens = [5 * BS + 3, 3 * BS, 2]
    batch = make_paged(seq_lens, BS, hkv, d, g)
    shapes = ModelShapes(2, hq, hkv, d, BS, batch.k_cache.shape[0])
    sc = scorer_cls(shapes, ops, merge=default, dtype=dtype, layer_merge=layer_merge)
    assert sc.groups_of(1) == BS // merge and sc.acc[1].merge == merge
    for layer in range(2):
        for r in range(len(seq_lens)):
            sc.on_kv_written(layer, batch.keys(r) * (1 + layer), batch.slots(r))
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    got = sc.score(1, q, batch.block_table, batch.seq_lens, ["a", "b", "c"]).numpy()
    assert torch.equal(torch.from_numpy(got), sc.batch_scores(1, q, batch.block_table, (batch.seq_lens // BS) * BS)), (
        "batch_scores (given full blocks' tokens) == score"
    )
    grp = hq // hkv
    # float32, or the backend's half-precision group sums: each rounded once (one write per row)
    stored = sc.acc[1].sums.dtype
    assert stored == (ops.group_sums_dtype(shapes.device, merge) if dtype == "auto" else torch.float8_e4m3fn)
    for r, n in enumerate(seq_lens):
        keys = 2 * batch.keys(r).numpy()
        qr = q[r].numpy().reshape(hkv, grp, d)
        for j in range(batch.block_table.shape[1]):
            if (j + 1) * BS > n:
                assert got[r, j] == -math.inf, (r, j)
                continue
            best = -math.inf
            for group in _group_keys(keys[j * BS : (j + 1) * BS], BS, merge):
                s = torch.from_numpy(group.sum(0)).float()  # [Hkv, D], saturated where float8 stores it
                if stored == torch.float8_e4m3fn:
                    s = s.clamp(-448, 448)
                s = s.to(stored).double().numpy()
                dots = np.einsum("hgd,hd->hg", qr, s)
                val = (dots.mean(1) if scorer_cls is ESAScorer else dots.max(1)).sum()
                best = max(best, float(val))
            np.testing.assert_allclose(got[r, j], best, rtol=2e-4, atol=2e-4)
    return sc


def _bound(q: np.ndarray, keys: np.ndarray, grp: int) -> float:
    """Quest's bound of one group of keys [m, Hkv, D] for query q [Hq, D], max over the GQA group."""
    lo, hi = keys.min(0), keys.max(0)  # [Hkv, D]
    hkv = lo.shape[0]
    qg = q.reshape(hkv, grp, -1)
    bound = np.maximum(qg * lo[:, None], qg * hi[:, None]).sum(-1)  # [Hkv, G]
    return float(bound.max(1).sum())


@pytest.mark.parametrize("ops", backends())
@pytest.mark.parametrize("merge", [1, 2, 4, BS])
def test_quest_scores_are_the_best_groups_bound(ops, merge: int) -> None:
    """Every block, the partial last one included (its groups so far), scores the max over its
    groups of Quest's bound of that group's keys, and no key of the block beats it; a recycled
    block restarts its groups; copied blocks score as their sources."""
    hq, hkv, d = 4, 2, 16
    g = torch.Generator().manual_seed(9)
    seq_lens = [4 * BS + 5, 2 * BS + 1]
    batch = make_paged(seq_lens, BS, hkv, d, g, extra_blocks=4)
    nb = batch.k_cache.shape[0]
    shapes = ModelShapes(1, hq, hkv, d, BS, nb)
    sc = QuestScorer(shapes, ops, "max", merge=merge)
    stale = torch.randn(BS, hkv, d, generator=g) * 50  # an earlier request's keys in row 0's block 1
    phys = int(batch.block_table[0, 1])
    sc.on_kv_written(0, stale, phys * BS + torch.arange(BS))
    for r in range(len(seq_lens)):
        sc.on_kv_written(0, batch.keys(r), batch.slots(r))
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    got = sc.score(0, q, batch.block_table, batch.seq_lens, ["a", "b"]).numpy()
    assert torch.equal(torch.from_numpy(got), sc.batch_scores(0, q, batch.block_table, batch.seq_lens))
    for r, n in enumerate(seq_lens):
        keys = batch.keys(r).numpy()
        for j in range(batch.block_table.shape[1]):
            if j * BS >= n:
                assert got[r, j] == -math.inf
                continue
            blk = keys[j * BS : min((j + 1) * BS, n)]
            want = max(_bound(q[r].numpy(), grp, hq // hkv) for grp in _group_keys(blk, len(blk), merge))
            np.testing.assert_allclose(got[r, j], want, rtol=2e-4, atol=2e-4)
            best_key = np.einsum("hgd,thd->thg", q[r].numpy().reshape(hkv, -1, d), blk).max(-1).sum(-1).max()
            assert got[r, j] >= best_key - 1e-4  # still an upper bound of q . k over the block
    free = [b for b in range(nb) if b not in batch.block_table.flatten().tolist()][:2]
    sc.copy_blocks(batch.block_table[0, :2].long(), torch.tensor(free))
    moved = sc.score(0, q[:1], torch.tensor([free]), torch.tensor([2 * BS]), ["a"])
    np.testing.assert_array_equal(moved.numpy()[0], got[0, :2])


@pytest.mark.parametrize("method", ["ESA", "GSA", "Quest"])
def test_one_needle_key_is_selected_with_sub_blocks(method: str) -> None:
    """Each planted block holds one key along the query among loud noise. Scored by groups of
    two tokens every layer keeps every planted block; by groups of four (the default) fewer are
    missed than scored as whole blocks, where the key is diluted by the block's other 31 keys
    (ESA, GSA: 0 vs 4 and 12 of 40; Quest, whose box of iid noise widens with every key: 8 vs
    20). Issue #20 traced this: the block a copying head reads, ranked outside the budget."""
    bs, hq, hkv, d = 32, 8, 2, 64
    seq_lens = [40 * bs, 36 * bs]
    plant = [[7, 19, 30], [5, 22]]
    g = torch.Generator().manual_seed(1)
    batch = make_paged(seq_lens, bs, hkv, d, g)
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    for r, blocks in enumerate(plant):
        target = q[r].view(hkv, hq // hkv, d).mean(1)
        for j in blocks:
            off = int(torch.randint(0, bs, (1,), generator=g))
            unit = target / target.norm(dim=-1, keepdim=True)
            batch.k_cache[int(batch.block_table[r, j]), off] = NEEDLE * math.sqrt(d) * unit
    shapes = ModelShapes(4, hq, hkv, d, bs, batch.k_cache.shape[0])
    windows = {"init_window_sz": 1, "local_window_sz": 1, "sparse_ratio": 0.15, "min_blocks": 1, "retrieval_stride": 1}

    def missed(merge: int | None) -> int:
        body = dict(windows, **({} if merge is None else {"blk_repre_inner_token_merge": merge}))  # None: default
        m = build_sparse_method({method: body}, shapes, TorchReferenceOps(), host_ops=TorchReferenceOps())
        for layer in range(4):
            for r in range(len(seq_lens)):
                m.on_kv_written(layer, batch.keys(r), batch.slots(r))
        plan = m.begin_step(["a", "b"], batch.seq_lens, batch.block_table)
        out = 0
        for layer in range(4):
            sel = m.select(layer, q, plan)
            out += sum(len(set(blocks) - set(sel.logical_blocks(r))) for r, blocks in enumerate(plant))
        m.end_step(plan)
        m.close()
        return out

    pairs, default, whole = missed(2), missed(None), missed(bs)  # None: the default, groups of 4 tokens
    assert pairs == 0 and default < whole, (pairs, default, whole)


def test_merge_must_divide_the_block_size() -> None:
    shapes = ModelShapes(1, 4, 2, 16, BS, 8)
    with pytest.raises(ConfigError, match="blk_repre_inner_token_merge"):
        build_sparse_method({"Quest": {"blk_repre_inner_token_merge": 3}}, shapes, TorchReferenceOps())
    with pytest.raises(ConfigError, match="blk_repre_inner_token_merge"):
        build_sparse_method({"ESA": {"blk_repre_inner_token_merge": 16}}, shapes, TorchReferenceOps())


class _AllReduce:
    """Two in-process "ranks" (threads) summing a tensor, as `torch.distributed.all_reduce` does:
    each call waits for the other rank's call of the same order."""

    def __init__(self) -> None:
        import threading

        self.barrier = threading.Barrier(2)
        self.slots: list[torch.Tensor | None] = [None, None]

    def for_rank(self, rank: int):
        def reduce(x: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = x.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()  # both have read the slots before either writes the next call's
            return total

        return reduce


@pytest.mark.parametrize(("method", "stride"), [("ESA", 1), ("ESA", 2), ("GSA", 1), ("Quest", 1)])
def test_two_ranks_select_what_one_rank_with_every_head_selects(method: str, stride: int) -> None:
    """Tensor parallelism splits the KV heads over ranks and sums their block scores before the
    top-k. With groups a block's score is the max over its groups of a sum over heads, so the
    ranks sum each group's partial scores and then take the max (`SparseMethod._reduced`): both
    ranks keep exactly the blocks one rank holding every head keeps, step after step (stride 2:
    the retrieval started at one step is reduced when the next consumes it)."""
    import threading

    hq, hkv, d = 8, 2, 32
    g = torch.Generator().manual_seed(4)
    seq_lens = [14 * BS + 3, 11 * BS]
    batch = make_paged(seq_lens, BS, hkv, d, g)
    nb = batch.k_cache.shape[0]
    cfg = {
        method: {
            "init_window_sz": 1,
            "local_window_sz": 1,
            "sparse_ratio": 0.3,
            "min_blocks": 1,
            "retrieval_stride": stride,
            "blk_repre_inner_token_merge": 2,
        }
    }
    ops = TorchReferenceOps()

    def make(heads: int, kv: int):
        return build_sparse_method(cfg, ModelShapes(2, heads, kv, d, BS, nb), ops, host_scoring=False)

    one, ranks = make(hq, hkv), [make(hq // 2, 1), make(hq // 2, 1)]
    reducer = _AllReduce()
    for r, m in enumerate(ranks):
        m.score_reduce = reducer.for_rank(r)
    for layer in range(2):
        for row in range(len(seq_lens)):
            keys, slots = batch.keys(row), batch.slots(row)
            one.on_kv_written(layer, keys, slots)
            for r, m in enumerate(ranks):
                m.on_kv_written(layer, keys[:, r : r + 1].contiguous(), slots)
    rids = ["a", "b"]
    for _step in range(4):
        q = torch.randn(len(seq_lens), hq, d, generator=g)
        plan = one.begin_step(rids, batch.seq_lens, batch.block_table)
        want = [[one.select(layer, q, plan).logical_blocks(row) for row in range(2)] for layer in range(2)]
        one.end_step(plan)
        got: list = [None, None]

        def run(r: int, q=q, got=got) -> None:
            m = ranks[r]
            p = m.begin_step(rids, batch.seq_lens, batch.block_table)
            qr = q[:, r * hq // 2 : (r + 1) * hq // 2].contiguous()
            got[r] = [[m.select(layer, qr, p).logical_blocks(row) for row in range(2)] for layer in range(2)]
            m.end_step(p)

        threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got[0] == got[1] == want, (got, want)
    for m in (one, *ranks):
        m.close()
