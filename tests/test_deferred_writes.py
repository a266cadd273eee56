"""`DeferredWrites`: in batch (CUDA graph) mode a step's representation writes wait for its last
layer and go in one `write_from_caches` call, reading the keys from the layers' key caches. After
every step the representations (hash codes for GSA on device) equal those of a scorer written
layer by layer with the keys themselves (prefill, decode, a recycled block, a cache allocated again mid-run)."""

from __future__ import annotations

import pytest
import torch

from ucm.integration.vllm.deferred_writes import DeferredWrites
from ucm.ops.reference import TorchReferenceOps
from ucm.sparse.base import ModelShapes
from ucm.sparse.esa import ESAScorer
from ucm.sparse.gsa_on_device import HashScorer
from ucm.sparse.kvstar import KVStarScorer
from ucm.sparse.quest import QuestScorer

REF = TorchReferenceOps()
LAYERS, NB, BS, H, D = 3, 10, 8, 2, 4
SHAPES = ModelShapes(LAYERS, 2 * H, H, D, BS, NB)


def scorers():
    return {
        "ESA": lambda: ESAScorer(SHAPES, REF),
        "ESA, groups per layer": lambda: ESAScorer(SHAPES, REF, merge=4, layer_merge={0: 1, 2: 2}),
        "Quest": lambda: QuestScorer(SHAPES, REF),
        "KVStar": lambda: KVStarScorer(SHAPES, REF, 0.5, 2, window=1),
        "GSAOnDevice": lambda: HashScorer(
            SHAPES, REF, [[torch.randn(D, 16, generator=torch.Generator().manual_seed(i))] for i in range(LAYERS)]
        ),
        "GSAOnDevice, norm_cosine": lambda: HashScorer(
            SHAPES,
            REF,
            [[torch.randn(D, 16, generator=torch.Generator().manual_seed(i))] for i in range(LAYERS)],
            score_method="norm_cosine",
            key_center=torch.randn(LAYERS, H, D, generator=torch.Generator().manual_seed(9)),
        ),
    }


def state(scorer) -> list[torch.Tensor]:
    if isinstance(scorer, QuestScorer):
        return [t for s in scorer.stats for t in (s.mins, s.maxs)]
    if isinstance(scorer, HashScorer):
        return [*scorer.codes, *scorer.norms]
    return [t for a in scorer.acc for t in (a.sums, a.abs_sums) if t is not None]


def steps() -> list[torch.Tensor]:
    """Slot mappings: a 20-token prefill over blocks 2-4, decode steps of two rows (one of them
    padding at times), then block 2 recycled by a new request."""
    out = [torch.arange(2 * BS, 2 * BS + 20)]
    a, b = 2 * BS + 20, 7 * BS
    for i in range(14):
        out.append(torch.tensor([a + i, b + i if i % 5 else -1]))
    out.append(torch.tensor([2 * BS, 2 * BS + 1, 2 * BS + 2, 7 * BS + 14]))
    return out


def write_step(layer_order, caches, slots, g, direct, deferred, dw):
    """Each layer writes its keys into its cache, then its hook runs both ways."""
    for layer in layer_order:
        keys = torch.randn(len(slots), H, D, generator=g)
        at = slots.clamp(min=0)
        ok = slots >= 0
        caches[layer][at[ok] // BS, at[ok] % BS] = keys[ok]
        direct.on_kv_written(layer, keys, slots)
        if not dw.defer(layer, caches[layer], slots):
            deferred.on_kv_written(layer, keys, slots)


def new_caches() -> list[torch.Tensor]:
    # vLLM 0.26's FlashAttention layout [NB, Hkv, bs, 2D], seen as [NB, bs, Hkv, D]
    return [torch.zeros(NB, H, BS, 2 * D).transpose(1, 2)[..., :D] for _ in range(LAYERS)]


@pytest.mark.parametrize("name", list(scorers()))
def test_one_write_per_step_equals_layer_by_layer(name: str) -> None:
    direct, deferred = scorers()[name](), scorers()[name]()
    assert deferred.writes_from_caches
    dw = DeferredWrites(deferred.write_from_caches, LAYERS - 1)
    caches = new_caches()
    g = torch.Generator().manual_seed(3)
    for i, slots in enumerate(steps()):
        if i == 6:  # vLLM allocated layer 1's cache again: the step goes on layer by layer
            fresh = new_caches()[1]
            fresh.copy_(caches[1])
            caches[1] = fresh
        write_step(range(LAYERS), caches, slots, g, direct, deferred, dw)
        assert dw.ready
        for want, got in zip(state(direct), state(deferred), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # step 0 recorded the caches and armed at its last layer; step 6 met the moved cache
    assert dw.batched_steps == len(steps()) - 2


def test_a_step_without_its_last_layer_fails_loudly() -> None:
    direct, deferred = ESAScorer(SHAPES, REF), ESAScorer(SHAPES, REF)
    dw = DeferredWrites(deferred.write_from_caches, LAYERS - 1)
    caches, g = new_caches(), torch.Generator().manual_seed(0)
    slots = torch.tensor([0, BS])
    write_step(range(LAYERS), caches, slots, g, direct, deferred, dw)  # records, arms
    write_step(range(LAYERS - 1), caches, slots + 1, g, direct, deferred, dw)  # the last layer never runs
    with pytest.raises(RuntimeError, match=r"deferred by layers \[0, 1\]"):
        write_step(range(1), caches, slots + 2, g, direct, deferred, dw)


def test_arms_at_the_next_step_when_the_hint_layer_never_writes() -> None:
    """A model whose last layer has no hook (a sliding-window layer stays stock): the recorded
    set arms at the next step's first hook instead, and writes at its own last layer."""
    direct, deferred = ESAScorer(SHAPES, REF), ESAScorer(SHAPES, REF)
    dw = DeferredWrites(deferred.write_from_caches, LAYERS - 1)
    caches, g = new_caches(), torch.Generator().manual_seed(1)
    for i in range(3):
        write_step(range(LAYERS - 1), caches, torch.tensor([3 + i, BS + 3 + i]), g, direct, deferred, dw)
        for want, got in zip(state(direct), state(deferred), strict=True):
            torch.testing.assert_close(got, want)
    assert dw.last_layer == LAYERS - 2 and dw.batched_steps == 2


def test_layers_with_another_slot_mapping_are_written_with_their_own() -> None:
    """Two KV cache groups in one step (layers 0-1 with one slot mapping, layer 2 with another):
    each group's deferred writes use its own slots."""
    direct, deferred = ESAScorer(SHAPES, REF), ESAScorer(SHAPES, REF)
    dw = DeferredWrites(deferred.write_from_caches, LAYERS - 1)
    caches, g = new_caches(), torch.Generator().manual_seed(2)
    for i in range(4):
        for layer in range(LAYERS):
            slots = torch.tensor([5 + i, BS + 5 + i]) if layer < 2 else torch.tensor([6 * BS + i, -1])
            keys = torch.randn(2, H, D, generator=g)
            ok = slots >= 0
            caches[layer][slots[ok] // BS, slots[ok] % BS] = keys[ok]
            direct.on_kv_written(layer, keys, slots)
            if not dw.defer(layer, caches[layer], slots):
                deferred.on_kv_written(layer, keys, slots)
        for want, got in zip(state(direct), state(deferred), strict=True):
            torch.testing.assert_close(got, want)
    assert dw.batched_steps == 3
