"""A decode step's representation writes for every layer in one op, at the step's last layer
(block representations: ESA, GSA, Quest, KVStar; hash codes: GSA on device).

In batch (CUDA graph) mode each attention layer's cache-write hook would update its layer's
block representations with one kernel launch: 36 launches a step for a 36-layer model, each a
few microseconds of mostly latency, and at batch 1 (rows stay dense) the only work ucm adds to
a step. `DeferredWrites` instead lets each layer's hook only record that its keys are in its
key cache; the step's last layer then folds every layer's keys in with one
`SparseMethod.write_from_caches` call (the op contract's `reps_write_layers`, one launch on the
GPU), reading them from the caches where the step wrote them.

What the delay changes: during a step, a layer's representations hold the keys of the steps
before it. The only block that misses a key is the one holding the step's newest token, a
row's last block, which every method keeps whatever its score; so ESA, GSA and Quest select
the same blocks. KVStar's softmax normalises per query head over every full block, so at the
one step in `block_size` where the newest token completes its block, that block's term in the
normaliser comes from the block's other keys. The last layer writes before any layer of the
next step scores.

Layers whose hooks bring another slot mapping (another KV cache group) close the pending group:
its layers are written with their own slots, and a new group starts.

The first step records each layer's key cache and writes layer by layer; at its last layer
(`last_layer_hint`, the model's last layer; else the next step's first hook) the recorded set is
armed: `write_all` with no tokens lets the op prepare (the GPU op's address table is made there,
eagerly, before vLLM captures its CUDA graphs), and from the next step on every hook defers. A
layer whose cache is not the one recorded (vLLM allocated its caches again) writes what was
deferred so far, is recorded anew, and the step goes on layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

WriteAll = Callable[[Sequence[int], Sequence[torch.Tensor], torch.Tensor], None]


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype


class DeferredWrites:
    def __init__(self, write_all: WriteAll, last_layer_hint: int) -> None:
        """`write_all(layers, key_caches, slot_mapping)`: the representation writes of `layers`
        from their key caches (`SparseMethod.write_from_caches`); `last_layer_hint`: the index of
        the model's last attention layer."""
        self._write_all = write_all
        self._hint = last_layer_hint
        self.caches: dict[int, torch.Tensor] = {}  # layer -> its key cache [NB, bs, Hkv, D]
        self.ready = False  # every layer's cache recorded: hooks defer
        self.last_layer = -1
        self._prev = -1  # the layer of the previous hook (a lower or equal one starts a step)
        self._pending: list[int] = []  # layers of the step in flight whose writes wait
        self._slots: torch.Tensor | None = None  # their slot mapping
        self.batched_steps = 0  # steps written in one op (tests and logs)

    def defer(self, layer: int, key_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
        """Called by layer `layer`'s hook after its keys went to `key_cache` at `slot_mapping`:
        True when its representation write is taken care of (deferred, or done with every
        pending layer's at the step's last layer), False when the caller writes it now."""
        if layer <= self._prev:  # a new step
            if self._pending:
                raise RuntimeError(
                    f"ucm: a step ended before its last attention layer ({self.last_layer}) wrote the "
                    f"representations deferred by layers {self._pending}"
                )
            if not self.ready and self.caches:
                self._arm(slot_mapping)
        self._prev = layer
        known = self.caches.get(layer)
        if self.ready and known is not None and same_view(known, key_cache):
            if self._pending and not same_view(self._slots, slot_mapping):  # another KV cache group
                self._flush()
            if not self._pending:
                self._slots = slot_mapping
            self._pending.append(layer)
            if layer == self.last_layer:
                self._flush()
                self.batched_steps += 1
            return True
        if self.ready:  # a cache moved: write what waits, record it, go on layer by layer
            self._flush()
            self.ready = False
        self.caches[layer] = key_cache
        if layer >= self._hint:
            self._arm(slot_mapping)
        return False

    def _arm(self, slot_mapping: torch.Tensor) -> None:
        self.ready, self.last_layer = True, max(self.caches)
        layers = sorted(self.caches)
        self._write_all(layers, [self.caches[i] for i in layers], slot_mapping[:0])  # prepare only

    def _flush(self) -> None:
        if self._pending:
            layers, self._pending = self._pending, []
            self._write_all(layers, [self.caches[i] for i in layers], self._slots)
