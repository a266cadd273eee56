"""Quest as a sparse method: its config, its builder, its scorer's running statistics, the
selection on planted data (whole planted blocks, and blocks holding one needle key among
noise), ratio 1.0 against dense attention, the CUDA-graph batch path against the per-request
engine, and oracle-normalised attention-mass recall against mean-of-K (ESA's representation) on
random-but-structured queries and keys.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch
from pydantic import ValidationError

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (see test_cuda_kernels)

from tests.paged import PagedBatch, make_paged
from ucm.config.errors import ConfigError
from ucm.config.quest import QuestConfig
from ucm.metrics import oracle_normalised_recall
from ucm.ops import TorchReferenceOps
from ucm.sparse.base import ModelShapes, SparseMethod
from ucm.sparse.batch_selection import BatchSelector
from ucm.sparse.esa import ESAScorer
from ucm.sparse.quest import QuestScorer, build_quest

OPS = TorchReferenceOps()
BS = 8
WINDOWS = {"init_window_sz": 1, "local_window_sz": 1, "sparse_ratio": 0.25, "min_blocks": 1}


def write_prefill(method: SparseMethod, batch: PagedBatch, layers: int) -> None:
    for layer in range(layers):
        for r in range(batch.block_table.shape[0]):
            method.on_kv_written(layer, batch.keys(r), batch.slots(r))


# ------------------------------------------------------------------------------ config, builder
def test_config_defaults_and_checks() -> None:
    cfg = QuestConfig()
    assert cfg.method == "Quest" and cfg.group_reduce == "max" and cfg.retrieval_stride == 1
    assert cfg.sparse_ratio == 0.3 and cfg.init_window_sz == 1 and cfg.local_window_sz == 2
    assert QuestConfig.model_validate({"group_reduce": "mean", "dense_layers": [0]}).group_reduce == "mean"
    for bad in (
        {"group_reduce": "sum"},
        {"group_reduce": 1},
        {"sparse_ratio": 0.0},
        {"unknown": 1},
        {"retrieval_stride": 0},
    ):
        with pytest.raises(ValidationError):
            QuestConfig.model_validate(bad)


def test_build_quest_takes_every_config_and_backend_form() -> None:
    shapes = ModelShapes(3, 8, 2, 16, BS, 32)

    class Ctx:  # the registry's build context carries the backend as `.ops`
        ops = OPS

    forms = [QuestConfig(group_reduce="mean"), {"Quest": {"group_reduce": "mean"}}, {"group_reduce": "mean"}]
    for cfg in forms:
        for kw in ({"ctx": OPS}, {"ctx": Ctx()}, {"ops": OPS}):
            m = build_quest(cfg, shapes, **kw)
            assert m.name == "Quest" and isinstance(m.scorer, QuestScorer) and m.scorer.ops is OPS
            assert m.scorer.group_reduce == "mean" and m.scorer.batch_safe and m.scorer.batch_largest
            assert not m.scorer.batch_full_blocks and not m.async_retrieval
            m.close()
    m = build_quest({"retrieval_stride": 3, "dense_layers": [1], "concurrency_threshold": 4}, shapes, OPS)
    assert m.retrieval_stride == 3 and m.async_retrieval and m.concurrency_threshold == 4
    assert [p.dense for p in m.selector.policies] == [False, True, False]
    # layers x (min, max) x NB x groups of 4 tokens (the default) x Hkv x D x 4 bytes
    assert m.scorer.memory_bytes() == 3 * 2 * 32 * (BS // 4) * 2 * 16 * 4
    m.close()
    with pytest.raises(ConfigError, match="dense_layers"):
        build_quest({"dense_layers": [3]}, shapes, OPS)
    with pytest.raises(ValidationError):
        build_quest({"Quest": {"group_reduce": "sum"}}, shapes, OPS)
    probed = build_quest({}, shapes)  # no backend given: the probed one
    assert probed.scorer.ops.name in ("cpu", "cuda", "ascend", "reference")
    probed.close()


# ------------------------------------------------------------------------------ the scorer
def test_scorer_keeps_the_min_and_max_of_each_blocks_keys() -> None:
    """Prefill, decode steps, a recycled block: the statistics are the min / max of the keys
    written to each block since its offset 0; `score` and `batch_scores` agree; copying blocks
    copies their statistics (offload mode)."""
    g = torch.Generator().manual_seed(3)
    hkv, d, nb = 2, 16, 12
    shapes = ModelShapes(2, 4, hkv, d, BS, nb)
    sc = QuestScorer(shapes, OPS, "max")
    written: dict[int, list[np.ndarray]] = {}

    def write(layer: int, slots: list[int]) -> None:
        key = torch.randn(len(slots), hkv, d, generator=g)
        sc.on_kv_written(layer, key, torch.tensor(slots))
        if layer == 1:
            for s in slots:
                if s >= 0 and s % BS == 0:
                    written[s // BS] = []
            for s, k in zip(slots, key.numpy(), strict=True):
                if s >= 0:
                    written[s // BS].append(k)

    write(1, list(range(3 * BS, 3 * BS + 19)))  # blocks 3, 4 full, 5 partial
    write(1, [3 * BS + 19, -1, 7 * BS])  # decode: block 5 grows, block 7 starts
    write(1, [4 * BS + 1, 4 * BS])  # block 4 recycled
    write(0, list(range(0, 5)))  # another layer: its own statistics
    st = sc.stats[1]
    for blk, keys in written.items():
        np.testing.assert_array_equal(st.mins[blk].numpy(), np.min(keys, axis=0))
        np.testing.assert_array_equal(st.maxs[blk].numpy(), np.max(keys, axis=0))
    assert (st.mins[0] == 0).all() and (sc.stats[0].mins[0] != 0).any()
    table = torch.tensor([[3, 4, 5, 7], [7, 3, 0, 0]])
    lens = torch.tensor([3 * BS + 4, BS + 1])
    q = torch.randn(2, 4, d, generator=g)
    s = sc.score(1, q, table, lens, ["a", "b"])
    assert torch.equal(s, OPS.block_scores_minmax(q, st.mins, st.maxs, table, lens, BS, "max"))
    assert torch.isfinite(s[0]).all() and torch.isfinite(s[1, :2]).all() and s[1, 2:].eq(-math.inf).all()
    assert torch.equal(sc.batch_scores(1, q, table, lens), s)
    sc.copy_blocks(torch.tensor([3, 5]), torch.tensor([10, 11]))
    same_q = q[:1].expand(2, -1, -1)
    moved = sc.score(1, same_q, torch.tensor([[10, 11], [3, 5]]), torch.tensor([2 * BS, 2 * BS]), ["a", "b"])
    assert torch.equal(moved[0], moved[1])
    for layer in range(2):
        assert torch.equal(sc.stats[layer].maxs[10], sc.stats[layer].maxs[3])


def planted(seq_lens, hq, hkv, d, planted_blocks, needle: bool, seed=0):
    """Planted blocks point along each row's query. Whole blocks (needle=False: every key, over
    small noise), or one key among loud noise (needle=True: mean-of-K dilutes it by the block
    size; the box keeps it: about twice the noise's extremes in every channel)."""
    g = torch.Generator().manual_seed(seed)
    batch = make_paged(seq_lens, BS, hkv, d, g)
    batch.k_cache.mul_(0.5 if needle else 0.05)
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    grp = hq // hkv
    for r, blocks in enumerate(planted_blocks):
        target = q[r].view(hkv, grp, d).mean(1)  # [Hkv, D]
        for j in blocks:
            phys = int(batch.block_table[r, j])
            if needle:
                off = int(torch.randint(0, BS, (1,), generator=g))
                batch.k_cache[phys, off] = 2.0 * math.sqrt(d) * target / target.norm(dim=-1, keepdim=True)
            else:
                batch.k_cache[phys] = 3.0 * target[None] + 0.01 * torch.randn(BS, hkv, d, generator=g)
    return batch, q


@pytest.mark.parametrize("needle", [False, True])
@pytest.mark.parametrize("group_reduce", ["mean", "max"])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_selects_planted_blocks(needle: bool, group_reduce: str, hq: int, hkv: int) -> None:
    seq_lens = [16 * BS + 3, 12 * BS]
    plant = [[5, 9], [7]]
    batch, q = planted(seq_lens, hq, hkv, 32, plant, needle)
    shapes = ModelShapes(2, hq, hkv, 32, BS, batch.k_cache.shape[0])
    m = build_quest({**WINDOWS, "group_reduce": group_reduce}, shapes, OPS)
    write_prefill(m, batch, 2)
    plan = m.begin_step(["a", "b"], batch.seq_lens, batch.block_table)
    for layer in range(2):
        sel = m.select(layer, q, plan)
        for r, blocks in enumerate(plant):
            kept = sel.logical_blocks(r)
            n_b = -(-seq_lens[r] // BS)
            assert set(blocks) <= set(kept), (needle, group_reduce, layer, r, kept)
            assert 0 in kept and n_b - 1 in kept and kept == sorted(kept)
            assert len(kept) == max(math.ceil(0.25 * n_b), 2)
    m.end_step(plan)
    m.close()


def _backends():
    out = [pytest.param(TorchReferenceOps(), id="reference")]
    if importlib.util.find_spec("triton") is not None:
        from ucm_backends.cuda.ops import CudaOps

        out.append(pytest.param(CudaOps(interpret=not torch.cuda.is_available()), id="cuda"))
    return out


@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ops", _backends())
def test_batch_path_equals_the_per_request_engine(ops, key_dtype) -> None:
    """The CUDA-graph decode path (`BatchSelector`: static shapes, partial blocks scored from
    their keys so far) keeps exactly what `SparseMethod.select` keeps, on the reference and on
    the CUDA backend's kernels; prefill and padding rows keep their own table. With bf16 keys
    the CUDA backend keeps its bounds in bf16 (`group_bounds_dtype`), the per-request engine in
    float32: the same blocks."""
    layers, hq, hkv, d, nb = 2, 4, 2, 32, 96
    shapes = ModelShapes(layers, hq, hkv, d, BS, nb, key_dtype=key_dtype)
    g = torch.Generator().manual_seed(11)
    lens = torch.tensor([87, 100, 30, 0])
    qlens = torch.tensor([1, 1, 4, 0])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), qlens.cumsum(0)]).to(torch.int32)
    m = 14
    table = torch.randperm(nb, generator=g)[: 4 * m].view(4, m).to(torch.int32)
    cfg = {"init_window_sz": 1, "local_window_sz": 1, "sparse_ratio": 0.3, "min_blocks": 2, "concurrency_threshold": 1}
    batch_method, engine = build_quest(cfg, shapes, ops), build_quest(cfg, shapes, TorchReferenceOps())
    stats = batch_method.scorer.stats[0].mins
    half = key_dtype == torch.bfloat16 and type(ops) is not TorchReferenceOps  # the CUDA backend
    assert stats.dtype == (torch.bfloat16 if half else torch.float32)
    assert engine.scorer.stats[0].mins.dtype == torch.float32
    for layer in range(layers):
        for r in range(3):
            n = int(lens[r])
            slots = table[r, torch.arange(n) // BS].long() * BS + torch.arange(n) % BS
            keys = torch.randn(n, hkv, d, generator=g).to(key_dtype)
            for method in (batch_method, engine):
                method.on_kv_written(layer, keys, slots)
    query = torch.randn(int(qsl[-1]) + 2, hq, d, generator=g)
    sel = BatchSelector(batch_method)
    plan = sel.plan(qsl, lens.to(torch.int32), table, max_query_len=int(qlens.max()))
    decode = [0, 1]
    step = engine.begin_step([f"r{r}" for r in decode], lens[decode], table[decode])
    for layer in range(layers):
        got_table, got_lens = sel.select(layer, query, plan)
        want = engine.select(layer, query[(qsl[1:] - 1).long()[decode]], step)
        for i, r in enumerate(decode):
            n = int(want.blocks_kept[i])
            assert got_table[r, :n].tolist() == want.block_table[i, :n].tolist(), (layer, r)
            assert int(got_lens[r]) == int(want.seq_lens[i]) < int(lens[r])
        nb2 = (int(lens[2]) + BS - 1) // BS
        assert got_table[2, :nb2].tolist() == table[2, :nb2].tolist() and int(got_lens[2]) == int(lens[2])
        assert int(got_lens[3]) == 0
    batch_method.close()
    engine.close()


def test_cpu_backend_selects_what_the_reference_selects() -> None:
    from ucm_backends.cpu.ops import CpuOps

    batch, q = planted([20 * BS + 5, 9 * BS, 3], 8, 2, 64, [[4, 11], [2], []], needle=True, seed=4)
    shapes = ModelShapes(2, 8, 2, 64, BS, batch.k_cache.shape[0])
    picks = []
    for ops in (OPS, CpuOps()):
        m = build_quest({**WINDOWS, "sparse_ratio": 0.3}, shapes, ops)
        write_prefill(m, batch, 2)
        plan = m.begin_step(["a", "b", "c"], batch.seq_lens, batch.block_table)
        picks.append([m.select(layer, q, plan).logical_blocks(r) for layer in range(2) for r in range(3)])
        m.end_step(plan)
        m.close()
    assert picks[0] == picks[1]


def test_strided_retrieval_reuses_the_last_scores() -> None:
    batch, q = planted([16 * BS], 4, 2, 32, [[6]], needle=False, seed=2)
    shapes = ModelShapes(1, 4, 2, 32, BS, batch.k_cache.shape[0])
    m = build_quest({**WINDOWS, "retrieval_stride": 2}, shapes, OPS)
    write_prefill(m, batch, 1)
    for _ in range(3):
        plan = m.begin_step(["a"], batch.seq_lens, batch.block_table)
        assert 6 in m.select(0, q, plan).logical_blocks(0)
        m.end_step(plan)
    m.close()


# ------------------------------------------------------------------------------ recall
def structured(seed: int, hq: int, hkv: int, d: int = 64, lens=(640, 517, 800), hot: float = 0.04):
    """Keys: noise around a shared per-channel bias (real keys have one). Queries: a component
    shared by the GQA group plus a per-head one. A few percent of the tokens are hot: a key
    pushed along one head's query by a random amount, scattered over the blocks one by one, as
    the tokens real heads attend to are."""
    g = torch.Generator().manual_seed(seed)
    batch = make_paged(list(lens), 16, hkv, d, g)
    batch.k_cache.add_(1.5 * torch.randn(hkv, d, generator=g))
    grp = hq // hkv
    q = torch.randn(len(lens), hkv, 1, d, generator=g) + 0.7 * torch.randn(len(lens), hkv, grp, d, generator=g)
    q = q.reshape(len(lens), hq, d)
    flat = batch.k_cache.view(-1, hkv, d)
    for r, n in enumerate(lens):
        slots = batch.slots(r)
        for p in torch.randperm(n, generator=g)[: max(1, int(hot * n))].tolist():
            h = int(torch.randint(0, hkv, (1,), generator=g))
            qd = q[r, h * grp + int(torch.randint(0, grp, (1,), generator=g))]
            flat[int(slots[p]), h] += 2.5 * math.sqrt(d) * float(torch.rand(1, generator=g)) * qd / qd.norm()
    return batch, q


def selection_recall(scorer, batch: PagedBatch, q: torch.Tensor, ratio: float) -> float:
    """Oracle-normalised attention-mass recall of the top ceil(ratio * n_b) blocks by the
    scorer's scores (the last, partial block kept for every scorer alike)."""
    bs = batch.block_size
    for r in range(q.shape[0]):
        scorer.on_kv_written(0, batch.keys(r), batch.slots(r))
    s = scorer.score(0, q, batch.block_table, batch.seq_lens, [])
    n_b = (batch.seq_lens.long() + bs - 1) // bs
    last = torch.arange(s.shape[1])[None, :] == (n_b - 1)[:, None]
    ids, counts = OPS.block_topk(s, torch.ceil(n_b * ratio).long(), last, n_b)
    recall = oracle_normalised_recall(
        q, batch.k_cache, batch.block_table, batch.seq_lens, ids, counts, q.shape[-1] ** -0.5
    )
    return float(recall.mean())


@pytest.mark.parametrize("hq,hkv", [(8, 2), (9, 3)])
def test_quest_recalls_at_least_the_mass_mean_k_recalls(hq: int, hkv: int) -> None:
    """At ratio 0.3, Quest's oracle-normalised attention-mass recall is at least mean-of-K's
    (ESA's representation and scoring) on every seed, and by a margin on average; both GQA
    reductions. (Measured here, mean over the seeds: Quest 0.98-0.99, mean-of-K 0.96 with G = 4
    and 0.82 with G = 3.)"""
    d = 64
    recalls: dict[str, list[float]] = {"meanK": [], "quest-max": [], "quest-mean": []}
    for seed in range(3):
        batch, q = structured(seed, hq, hkv, d)
        shapes = ModelShapes(1, hq, hkv, d, 16, batch.k_cache.shape[0])
        recalls["meanK"].append(selection_recall(ESAScorer(shapes, OPS), batch, q, 0.3))
        for mode in ("max", "mean"):
            recalls[f"quest-{mode}"].append(selection_recall(QuestScorer(shapes, OPS, mode), batch, q, 0.3))
    mean = {k: sum(v) / len(v) for k, v in recalls.items()}
    for mode in ("max", "mean"):
        assert mean[f"quest-{mode}"] >= mean["meanK"] + 0.02, mean
        assert all(a >= b for a, b in zip(recalls[f"quest-{mode}"], recalls["meanK"], strict=True)), recalls
        assert mean[f"quest-{mode}"] >= 0.95, mean
