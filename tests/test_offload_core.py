"""Offload mode's core bookkeeping (ucm/sparse/offload.py), against plain-Python references:
budgets from the windows and ratio, slot residency with LRU reuse, loads of missing blocks
only, failed loads left out, and representations that outlive their device blocks."""

from __future__ import annotations

import math

import pytest
import torch

from ucm.config.loader import parse_sparse_config
from ucm.ops import get_ops
from ucm.sparse.base import ModelShapes
from ucm.sparse.factory import build_sparse_method
from ucm.sparse.offload import TAIL_SLACK, OffloadPolicy, RequestResidency, VirtualBlocks


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
    cfg = parse_sparse_config({"ucm_sparse_config": {"GSA": {"offload": True, "offload_margin_blocks": 5,
                                                             "sparse_ratio": 0.25, "local_window_sz": 3}}})
    p = OffloadPolicy.from_config(cfg, 64)
    assert (p.block_size, p.ratio, p.local_blocks, p.margin_blocks) == (64, 0.25, 3, 5)


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


def residency(layers=2) -> RequestResidency:
    # init 1 block; slots at logical 1, 2, 3 held in physical 51, 52, 53; middle 1..9
    res = RequestResidency(layers, 1, [1, 2, 3], [51, 52, 53])
    res.extend_middle([200 + i for i in range(9)], [f"id{1 + i}" for i in range(9)])
    return res


def test_scoring_row_points_the_middle_at_virtual_ids() -> None:
    res = residency()
    row = torch.arange(50, 62, dtype=torch.int32)  # physical ids of logical 0..11
    res.scoring_row(row)
    assert row.tolist() == [50] + [200 + i for i in range(9)] + [60, 61]


def test_resolve_reads_held_blocks_in_place_and_loads_only_the_missing() -> None:
    res, load = residency(), RecordingLoader()
    physical = torch.arange(50, 62)
    # logical 0 (init), 2 (held by slot 1), 7 (missing), 11 (tail)
    out = res.resolve(0, torch.tensor([0, 2, 7, 11]), physical, load)
    assert len(load.calls) == 1 and load.calls[0][0] == 0 and load.calls[0][1] == ["id7"]
    slot_phys = load.calls[0][2][0]
    assert slot_phys in (51, 53)  # a slot this step does not read (not 52, which holds block 2)
    assert out.tolist() == [50, 52, slot_phys, 61]
    # the same selection again reads everything in place; the other layer is independent
    assert res.resolve(0, torch.tensor([0, 2, 7, 11]), physical, load).tolist() == out.tolist()
    assert len(load.calls) == 1
    res.resolve(1, torch.tensor([0, 2, 7, 11]), physical, load)
    assert len(load.calls) == 2 and load.calls[1][0] == 1


def test_least_recently_used_slot_is_reused_first() -> None:
    res, load = residency(layers=1), RecordingLoader()
    physical = torch.arange(50, 62)
    res.resolve(0, torch.tensor([0, 1, 11]), physical, load)  # touches slot 0 (block 1)
    res.resolve(0, torch.tensor([0, 3, 11]), physical, load)  # touches slot 2 (block 3)
    res.resolve(0, torch.tensor([0, 8, 11]), physical, load)  # block 8 must evict slot 1 (block 2, never read)
    assert load.calls[-1][1:] == (["id8"], [52])
    assert res.holder[0].tolist() == [1, 8, 3]


def test_failed_load_is_left_out_and_the_slot_forgotten() -> None:
    res, load = residency(layers=1), RecordingLoader(fail={"id6"})
    out = res.resolve(0, torch.tensor([0, 5, 6, 11]), torch.arange(50, 62), load)
    assert len(out) == 3 and out[0] == 50 and out[-1] == 61
    assert res.failed_loads == 1 and -1 in res.holder[0].tolist()


def test_more_misses_than_slots_is_an_error() -> None:
    res = residency(layers=1)
    with pytest.raises(RuntimeError, match="slots"):
        res.resolve(0, torch.tensor([4, 5, 6, 7]), torch.arange(50, 62), RecordingLoader())


@pytest.mark.parametrize("name", ["ESA", "GSA", "KVStarMultiStep"])
def test_representation_copied_to_a_virtual_id_scores_the_same(name) -> None:
    torch.manual_seed(0)
    shapes = ModelShapes(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=8, num_blocks=24)
    method = build_sparse_method({"ucm_sparse_config": {name: {}}}, shapes, get_ops("reference"), host_ops=get_ops("reference"))
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
    for b, a, o in zip(before, scores(virtual), scores(original)):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(o, b)
