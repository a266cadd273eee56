"""Offload mode's core bookkeeping (ucm/sparse/offload.py), against plain-Python references:
budgets from the windows and ratio, slot residency with LRU reuse, loads of missing blocks
only, failed loads left out, and representations that outlive their device blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ucm.config.loader import parse_sparse_config
from ucm.methods import method_names
from ucm.ops import get_ops
from ucm.sparse.base import ModelShapes
from ucm.sparse.factory import build_sparse_method
from ucm.sparse.offload import TAIL_SLACK, OffloadedRequest, OffloadPolicy, Residency, VirtualBlocks


def policy(**kw) -> OffloadPolicy:
    args = dict(block_size=32, init_blocks=1, local_blocks=2, ratio=0.3, min_blocks=4, margin_blocks=2)
    args.update(kw)
    return OffloadPolicy(**args)


def test_budget_covers_the_largest_selection_and_stays_small() -> None:
    p = policy()
    for tokens in (2000, 8000, 32768):
        n = math.ceil(tokens / 32)
        k = max(math.ceil(0.3 * n), 4)
        # a layer keeps init + local windows and picks the rest of its k blocks from the middle
        assert p.slots(tokens) == k - 1 - 2 + 2
        assert p.budget(tokens) == 1 + p.slots(tokens) + 2 + 1 + TAIL_SLACK
    assert 32768 / 32 / p.budget(32768) > 3.0  # the concurrency a 32K request gains at ratio 0.3


def test_middle_end_keeps_the_local_window_and_the_block_in_flight() -> None:
    p = policy()
    # 100 committed tokens: blocks 0..2 full, block 3 partial; local window = 2 blocks before it
    assert p.middle_end(100) == 100 // 32 - 2 - 1
    assert p.middle_end(32 * 40) == 37


def test_config_key_builds_the_policy() -> None:
    cfg = parse_sparse_config(
        {
            "ucm_sparse_config": {
                "GSA": {"offload": True, "offload_margin_blocks": 5, "sparse_ratio": 0.25, "local_window_sz": 3}
            }
        }
    )
    p = OffloadPolicy.from_config(cfg, 64)
    assert (p.block_size, p.ratio, p.local_blocks, p.margin_blocks) == (64, 0.25, 3, 5)


def test_the_greediest_layer_sizes_the_slots() -> None:
    def build(**keys) -> OffloadPolicy:
        body = {"offload": True, "sparse_ratio": 0.25, "init_window_sz": 1, "local_window_sz": 2, **keys}
        return OffloadPolicy.from_config(parse_sparse_config({"ucm_sparse_config": {"GSA": body}}), 64)

    assert build(layer_sparse_ratio={"3": 0.1}).ratio == 0.25  # a leaner layer changes nothing
    greedy = build(layer_sparse_ratio={"3": 0.1, "7": 0.5})
    assert greedy.ratio == 0.5
    # 100 blocks: the greedy layer selects 50, of which 1 + 2 are windows; margin 0
    assert greedy.slots(64 * 100) == 50 - 1 - 2 + greedy.margin_blocks


def test_virtual_blocks_are_handed_out_once() -> None:
    v = VirtualBlocks(100, 5)
    a = v.take(3)
    assert a == [100, 101, 102] and v.in_use == 3
    v.give_back(a[:2])
    b = v.take(4)
    assert sorted(set(b)) == sorted(b) and not set(b) & {102}
    with pytest.raises(RuntimeError):
        v.take(1)


class RecordingLoader:
    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.calls: list[tuple[int, list[str], list[int]]] = []
        self.fail = fail

    def __call__(self, layer, ids, phys):
        self.calls.append((layer, list(ids), list(phys)))
        return [i not in self.fail for i in ids]


def residency(layers=2) -> tuple[Residency, OffloadedRequest]:
    # virtual ids from 200; init 1 block; slots at logical 1, 2, 3 held in physical 51, 52, 53; middle 1..9
    res = Residency(layers, 1, VirtualBlocks(200, 40), 100)
    res.extend("r", [f"id{1 + i}" for i in range(9)], [1, 2, 3], [51, 52, 53])
    return res, res.requests["r"]


def select(req: OffloadedRequest, logical: list[int], physical_row=None) -> np.ndarray:
    """The table a selection of these logical blocks yields: the scoring row's ids at them."""
    row = torch.arange(50, 62) if physical_row is None else physical_row.clone()
    req.scoring_row(row)
    return row[logical].numpy()[None, :]


def resolve_one(res, req, layer, logical, load):
    table = select(req, logical)
    out, kept = res.resolve(layer, table, np.array([table.shape[1]]), [req], load)
    return out[0, : kept[0]]


def test_scoring_row_points_the_middle_at_virtual_ids() -> None:
    res, req = residency()
    row = torch.arange(50, 62, dtype=torch.int32)  # physical ids of logical 0..11
    req.scoring_row(row)
    assert row.tolist() == [50] + [200 + i for i in range(9)] + [60, 61]


def test_resolve_reads_held_blocks_in_place_and_loads_only_the_missing() -> None:
    res, req = residency()
    load = RecordingLoader()
    # logical 0 (init), 2 (held by slot 1), 7 (missing), 11 (tail)
    out = resolve_one(res, req, 0, [0, 2, 7, 11], load)
    assert len(load.calls) == 1 and load.calls[0][0] == 0 and load.calls[0][1] == ["id7"]
    slot_phys = load.calls[0][2][0]
    assert slot_phys in (51, 53)  # a slot this step does not read (not 52, which holds block 2)
    assert out.tolist() == [50, 52, slot_phys, 61]
    # the same selection again reads everything in place; the other layer is independent
    assert resolve_one(res, req, 0, [0, 2, 7, 11], load).tolist() == out.tolist()
    assert len(load.calls) == 1
    resolve_one(res, req, 1, [0, 2, 7, 11], load)
    assert len(load.calls) == 2 and load.calls[1][0] == 1


def test_least_recently_used_slot_is_reused_first() -> None:
    res, req = residency(layers=1)
    load = RecordingLoader()
    resolve_one(res, req, 0, [0, 1, 11], load)  # touches slot 0 (block 1)
    resolve_one(res, req, 0, [0, 3, 11], load)  # touches slot 2 (block 3)
    resolve_one(res, req, 0, [0, 8, 11], load)  # block 8 must evict slot 1 (block 2, never read)
    assert load.calls[-1][1:] == (["id8"], [52])
    held = [int(res.holder[0, p]) for p in (51, 52, 53)]
    assert [req.virtual.index(res.virtual.first + v) + 1 for v in held] == [1, 8, 3]


def test_failed_load_is_left_out_and_the_slot_forgotten() -> None:
    res, req = residency(layers=1)
    out = resolve_one(res, req, 0, [0, 5, 6, 11], RecordingLoader(fail={"id6"}))
    assert len(out) == 3 and out[0] == 50 and out[-1] == 61
    assert req.failed_loads == 1 and -1 in res.holder[0, [51, 52, 53]].tolist()


def test_more_misses_than_slots_is_an_error() -> None:
    res, req = residency(layers=1)
    with pytest.raises(RuntimeError, match="slots"):
        resolve_one(res, req, 0, [4, 5, 6, 7], RecordingLoader())


def test_rows_of_one_layer_load_in_one_call_and_resident_rows_pass_through() -> None:
    res, a = residency(layers=1)
    res.extend("b", ["b1", "b2", "b3", "b4"], [1], [70])
    b = res.requests["b"]
    rows = [select(a, [0, 4, 11])[0], torch.tensor([80, 81, 82]).numpy(), select(b, [0, 3, 11])[0]]
    table = np.stack(rows)
    load = RecordingLoader()
    out, kept = res.resolve(0, table, np.array([3, 3, 3]), [a, None, b], load)
    assert len(load.calls) == 1 and load.calls[0][1] == ["id4", "b3"]
    assert out[1].tolist() == [80, 81, 82] and out[2, 1] == 70 and out[0, 1] in (51, 52, 53)
    assert kept.tolist() == [3, 3, 3]


def test_drop_returns_virtual_ids_and_clears_slots() -> None:
    res, req = residency(layers=2)
    resolve_one(res, req, 0, [0, 6, 11], RecordingLoader())
    in_use = res.virtual.in_use
    assert res.drop("r") is req and res.virtual.in_use == in_use - 9
    assert (res.holder[:, [51, 52, 53]] == -1).all() and (res.slot_of == -1).all()
    res.extend("s", ["s1", "s2"], [1], [51])  # the ids and the slot can serve another request
    assert res.holder[0, 51] == res.requests["s"].virtual[0] - res.virtual.first


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_read_finds_the_block_it_selected(seed) -> None:
    """A random walk of selections over 2 requests and 3 layers against a model of the device:
    each (layer, device block) holds the store id last loaded into it. Whatever the sequence,
    every entry attention reads holds the block the selection named, and no block is loaded
    that a slot already held."""
    rng = np.random.default_rng(seed)
    layers, res = 3, Residency(3, 1, VirtualBlocks(1000, 200), 500)
    reqs, device = {}, {}
    for name, base, slots in (("a", 0, [10, 11, 12, 13, 14]), ("b", 100, [110, 111, 112, 113])):
        n_mid = 30
        ids = [f"{name}{i}" for i in range(1, n_mid + 1)]
        positions = list(range(1, len(slots) + 1))
        res.extend(name, ids, positions, slots)
        reqs[name] = (res.requests[name], base, n_mid)
        for layer in range(layers):
            for pos, phys in zip(positions, slots, strict=True):
                device[layer, phys] = f"{name}{pos}"

    calls = []

    def loader(layer, ids, phys):
        ok = [bool(rng.random() > 0.1) for _ in ids]
        calls.append((layer, list(ids), ok))
        for i, p, good in zip(ids, phys, ok, strict=True):
            device[layer, p] = i if good else "garbage"
        return ok

    loaded = 0
    for _ in range(60):
        layer = int(rng.integers(layers))
        tables, owners, want = [], [], []
        for name in ("a", "b"):
            req, base, n_mid = reqs[name]
            k = len(req.slot_physical) - int(rng.integers(0, 2))
            mid = sorted(rng.choice(np.arange(1, n_mid + 1), size=k, replace=False).tolist())
            tables.append(select(req, [0] + mid + [n_mid + 1], torch.arange(base, base + n_mid + 2))[0])
            owners.append(req)
            want.append([f"{name}{b}" for b in mid])
        held_before = {(name, device.get((layer, p))) for name in reqs for p in reqs[name][0].slot_physical.tolist()}
        calls.clear()
        width = max(len(t) for t in tables)
        table = np.stack([np.pad(t, (0, width - len(t))) for t in tables])  # padded rows, as selections are
        out, kept = res.resolve(layer, table, np.array([len(t) for t in tables]), owners, loader)
        failed = {i for _, ids, ok in calls for i, good in zip(ids, ok, strict=True) if not good}
        assert len(calls) <= 1  # one store call per layer, whatever the rows
        for _, ids, _ in calls:
            loaded += len(ids)
            assert not {(i[0], i) for i in ids} & held_before  # never reloads what a slot holds
        for r, name in enumerate(("a", "b")):
            base, n_mid = reqs[name][1], reqs[name][2]
            row = out[r, : kept[r]].tolist()
            assert row[0] == base and row[-1] == base + n_mid + 1  # windows read in place
            assert [device[layer, p] for p in row[1:-1]] == [w for w in want[r] if w not in failed]
    assert loaded > 0


@pytest.mark.parametrize("name", method_names(windowed=True))
def test_representation_copied_to_a_virtual_id_scores_the_same(name) -> None:
    torch.manual_seed(0)
    shapes = ModelShapes(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=8, num_blocks=24)
    method = build_sparse_method(
        {"ucm_sparse_config": {name: {}}}, shapes, get_ops("reference"), host_ops=get_ops("reference")
    )
    keys = torch.randn(8 * 6, 2, 16)
    slots = torch.arange(8 * 6)  # blocks 0..5
    for layer in range(2):
        method.on_kv_written(layer, keys, slots)
    q = torch.randn(1, 4, 16)
    lens = torch.tensor([8 * 6])
    original = torch.tensor([[0, 1, 2, 3, 4, 5]])
    virtual = torch.tensor([[0, 1, 20, 21, 4, 5]])

    prepared = [method.scorer.prepare_query(layer, q, ["r"]) for layer in range(2)]  # once: KVStar keeps a window

    def scores(table):
        return [method.scorer.score(layer, prepared[layer], table, lens, ["r"]) for layer in range(2)]

    before = scores(original)
    method.scorer.copy_blocks(torch.tensor([2, 3]), torch.tensor([20, 21]))
    # blocks 2 and 3 recycled by another request: their device state changes, the copies must not
    for layer in range(2):
        method.on_kv_written(layer, torch.randn(16, 2, 16), torch.arange(16, 32))
    for b, a, o in zip(before, scores(virtual), scores(original), strict=True):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(o, b)


def test_worker_shortens_a_row_whose_load_failed() -> None:
    """The vLLM worker's step: a failed load drops the block from the row and the row's length
    shrinks by one block (its partial last block stays), other rows untouched."""
    from ucm.integration.vllm.offload import OffloadUpdate, OffloadWorker
    from ucm.sparse.selection import Selection

    worker = OffloadWorker(policy(), num_layers=1)
    worker.extra_blocks(100)  # virtual ids from 100
    worker.apply(
        [OffloadUpdate("r", [5, 6, 7, 8], ["id1", "id2", "id3", "id4"], [1, 2], [5, 6])], lambda src, dst: None
    )
    worker.loader = RecordingLoader(fail={"id4"})
    v = worker.requests["r"].virtual  # virtual ids of logical 1..4
    table = torch.tensor([[50, v[0], v[3], 60], [70, 71, 72, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([32 * 9 + 5, 32 * 2 + 1])
    kept = torch.tensor([4, 3])
    sel = Selection(
        unit_ids=table.clone(),
        unit_counts=kept.to(torch.int32),
        block_table=table,
        seq_lens=torch.tensor([32 * 3 + 5, 32 * 2 + 1], dtype=torch.int32),
        blocks_kept=kept,
        blocks_total=torch.tensor([10, 3]),
    )
    out = worker.resolve(0, ["r", "other"], sel, seq_lens, 32)
    assert out.block_table[0, :3].tolist() == [50, 5, 60] and out.blocks_kept.tolist() == [3, 3]
    assert out.seq_lens.tolist() == [32 * 2 + 5, 32 * 2 + 1] and out.seq_lens.dtype == torch.int32
    assert out.block_table[1].tolist() == [70, 71, 72, 0]
