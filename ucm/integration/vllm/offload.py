"""Offload mode inside vLLM: long requests hold a fixed budget of device blocks.

The design (docs/store.md, "Offload mode") uses only the connector API, no scheduler subclass:

* **Scheduler side** (`OffloadPlanner`, inside UCMConnector's scheduler instance): vLLM hands
  every connector its KV cache manager (`bind_kv_cache_manager`). Each step, in
  `build_connector_meta` (after this step's allocation, so what is freed is reused from the
  next step on), a decoding request's full, committed blocks outside its windows are dumped to
  the store (decode blocks: the prompt's were dumped while prefilling) and, once the step that
  dumped them has been processed (the request's committed tokens passed it), replaced by vLLM's null block and
  returned to the block pool - the mechanism vLLM's own sliding-window manager uses. `S` slot
  blocks of the middle stay; they leave the prefix cache because their contents will change.
* **Worker side** (`OffloadWorker`, driven by the `SparseRuntime`): before the step's forward,
  the representations of the blocks that joined the middle are copied to virtual ids (their
  device blocks may be rewritten by other requests from the next step on); selection scores the
  middle through those ids; a selected block no slot holds is loaded into a free slot of that
  layer (`ucm.sparse.offload.Residency`) and the kernel reads physical ids only.

A request whose slots cannot be exclusive (shared prefix blocks) or that would exceed the
virtual-id capacity simply stays resident; nothing is freed that is not in the store.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ucm.sparse.offload import OffloadedRequest, OffloadPolicy, Residency, VirtualBlocks
from ucm.sparse.selection import kept_seq_lens
from ucm.store import block_hash

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

    from ucm.integration.vllm.prefix_store import PrefixPlanner, SaveSpec

logger = logging.getLogger("vllm.ucm")


@dataclass
class OffloadUpdate:
    """Scheduler -> workers: blocks of one request that joined the middle this step."""

    req_id: str
    middle_physical: list[int]  # their device blocks (representations are copied from there)
    middle_store_ids: list[str]
    slot_positions: list[int] | None = None  # set on the request's first update
    slot_physical: list[int] | None = None


@dataclass
class _Request:
    request: Request
    eligible: bool | None = None
    ids: list[str] = field(default_factory=list)  # store ids of the full blocks, in order
    saved_when: list[int] = field(default_factory=list)  # processed tokens once each full block's dump ran
    slots: list[int] | None = None
    middle_end: int = 0
    max_held: int = 0  # most device blocks held since it was offloaded


class OffloadPlanner:
    """Scheduler-side: which blocks of which request to dump and free, and what to tell workers."""

    def __init__(
        self, policy: OffloadPolicy, prefix: PrefixPlanner, num_device_blocks: int, max_model_len: int
    ) -> None:
        self.policy = policy
        self.prefix = prefix
        self.max_model_len = max_model_len
        self.virtual_capacity = policy.virtual_capacity(num_device_blocks)
        self.virtual_in_use = 0
        self._manager: KVCacheManager | None = None
        self._requests: dict[str, _Request] = {}
        # counters (tests, stats)
        self.offloaded_requests = 0
        self.freed_blocks = 0
        self.over_budget = 0  # requests seen holding more device blocks than their budget
        # (most device blocks held, budget) of each offloaded request, kept after it leaves
        self.held: dict[str, tuple[int, int]] = {}

    def bind(self, manager: KVCacheManager) -> None:
        coordinator = manager.coordinator
        if len(coordinator.single_type_managers) != 1:
            raise RuntimeError("offload needs a model with one KV cache group")
        self._manager = manager

    # ------------------------------------------------------------ lifecycle
    def track(self, request: Request) -> None:
        self._requests.setdefault(request.request_id, _Request(request))

    def forget(self, req_id: str) -> None:
        r = self._requests.pop(req_id, None)
        if r is not None and r.slots is not None:
            self.virtual_in_use -= r.middle_end - self.policy.init_blocks

    def reset(self, req_id: str) -> bool:
        """The request was preempted (vLLM freed its blocks) and is scheduled again: it starts
        over as a new one. True when it had been offloaded (the workers must drop its state)."""
        r = self._requests.get(req_id)
        if r is None:
            return False
        self.forget(req_id)
        self._requests[req_id] = _Request(r.request)
        return r.slots is not None

    def max_tokens(self, request: Request) -> int:
        return min(request.num_prompt_tokens + request.max_tokens, self.max_model_len)

    def _blocks(self, req_id: str) -> list:
        return self._manager.coordinator.single_type_managers[0].req_to_blocks.get(req_id, [])

    # ------------------------------------------------------------ each step
    def plan(self, scheduler_output: SchedulerOutput, saves: list[SaveSpec]) -> list[OffloadUpdate]:
        """Dumps (appended to `saves`) and frees for the requests scheduled this step."""
        from ucm.integration.vllm.prefix_store import SaveSpec

        updates: list[OffloadUpdate] = []
        if self._manager is None:
            return updates
        for rid in scheduler_output.num_scheduled_tokens:
            r = self._requests.get(rid)
            if r is None:
                continue
            req = r.request
            processed = req.num_computed_tokens - getattr(req, "num_in_flight_tokens", 0)
            if processed < req.num_prompt_tokens:
                continue  # still prefilling
            if r.eligible is None:
                r.eligible = self._eligible(r)
            if not r.eligible:
                continue
            blocks = self._blocks(rid)
            after_step = req.num_computed_tokens + scheduler_output.num_scheduled_tokens[rid]
            new_saves = self._extend_ids(r, processed, blocks, after_step)
            if new_saves:
                saves.append(SaveSpec([blocks[i].block_id for i in new_saves], [r.ids[i] for i in new_saves]))
            update = self._advance(r, rid, processed, blocks)
            if update is not None:
                updates.append(update)
            held = sum(1 for b in blocks if not b.is_null)
            if r.slots is not None:
                budget = self.policy.budget(self.max_tokens(req))
                r.max_held = max(r.max_held, held)
                self.held[rid] = (r.max_held, budget)
                if len(self.held) > 4096:
                    self.held.pop(next(iter(self.held)))
                if held > budget:
                    self.over_budget += 1
        return updates

    def _eligible(self, r: _Request) -> bool:
        """Offload only requests whose middle can outgrow their slots."""
        p = self.policy
        n_max = self.max_tokens(r.request)
        if p.middle_end(n_max) - p.init_blocks <= p.slots(n_max):
            return False
        prompt_ids = self.prefix.prompt_ids(r.request.request_id)
        if prompt_ids is None:
            return False  # not in the store under a known identity: it cannot come back from there
        if self.prefix.saved_blocks(r.request.request_id) < len(prompt_ids):
            return False  # some prompt blocks were never dumped (e.g. a local hit on another engine's blocks)
        r.ids = list(prompt_ids)
        r.saved_when = [0] * len(prompt_ids)  # dumped while prefilling, by steps that have been processed
        return True

    def _extend_ids(self, r: _Request, processed: int, blocks: list, after_step: int) -> list[int]:
        """Content ids for the decode blocks that are now full and committed; returns the indices to dump."""
        bs = self.policy.block_size
        full = min(processed // bs, len(blocks))
        start = len(r.ids)
        if full <= start:
            return []
        tokens = r.request.all_token_ids
        for i in range(start, full):
            r.ids.append(block_hash(r.ids[-1] if r.ids else self.prefix.root, tokens[i * bs : (i + 1) * bs]))
            r.saved_when.append(after_step)  # this step dumps it
        return list(range(start, full))

    def _advance(self, r: _Request, rid: str, processed: int, blocks: list) -> OffloadUpdate | None:
        p = self.policy
        target = min(p.middle_end(processed), len(r.ids))
        # only blocks whose dump has run (its step was processed) may leave the device
        while target > p.init_blocks and r.saved_when[target - 1] > processed:
            target -= 1
        first_update = r.slots is None
        start = p.init_blocks if first_update else r.middle_end
        n_slots = p.slots(self.max_tokens(r.request))
        if first_update and target - p.init_blocks <= n_slots:
            return None  # nothing to free yet
        room = self.virtual_capacity - self.virtual_in_use
        target = min(target, start + room)
        if target <= start:
            return None
        update = OffloadUpdate(rid, [blocks[i].block_id for i in range(start, target)], r.ids[start:target])
        pool = self._manager.block_pool
        if first_update:
            exclusive = [i for i in range(p.init_blocks, target) if blocks[i].ref_cnt == 1 and not blocks[i].is_null]
            if len(exclusive) < n_slots:
                return None  # shared prefix blocks cannot be rewritten in place: stay resident
            r.slots = exclusive[:n_slots]
            update.slot_positions = list(r.slots)
            update.slot_physical = [blocks[i].block_id for i in r.slots]
            pool.evict_blocks({blocks[i].block_id for i in r.slots})  # their contents will change
            self.offloaded_requests += 1
            if self.offloaded_requests == 1:
                logger.info(
                    "ucm offload active: request %s keeps %d of its %d blocks on the device after this step "
                    "(budget %d)",
                    rid,
                    len(blocks) - (target - start - n_slots),
                    len(blocks),
                    p.budget(self.max_tokens(r.request)),
                )
        slot_set = set(r.slots)
        freed = []
        null = pool.null_block
        for i in range(target - 1, start - 1, -1):  # tail first, as vLLM frees
            if i in slot_set or blocks[i].is_null:
                continue
            freed.append(blocks[i])
            blocks[i] = null
        if freed:
            pool.free_blocks(freed)
            self.freed_blocks += len(freed)
        self.virtual_in_use += target - start
        r.middle_end = target
        return update

    def snapshot(self) -> dict:
        return {
            "offloaded_requests": self.offloaded_requests,
            "freed_blocks": self.freed_blocks,
            "over_budget": self.over_budget,
            "virtual_in_use": self.virtual_in_use,
            "virtual_capacity": self.virtual_capacity,
            "held": dict(self.held),
        }


class OffloadWorker:
    """Worker-side: residency of each offloaded request and loads from the store."""

    def __init__(self, policy: OffloadPolicy, num_layers: int) -> None:
        self.policy = policy
        self.num_layers = num_layers
        self.residency: Residency | None = None
        self.loader: Callable[[int, list[str], list[int]], list[bool]] | None = None
        self.loaded_blocks = 0
        self.failed_loads = 0

    @property
    def requests(self) -> dict[str, OffloadedRequest]:
        return self.residency.requests if self.residency is not None else {}

    def extra_blocks(self, num_device_blocks: int) -> int:
        """Virtual ids to add to the scorer's side caches (after the device's block ids)."""
        count = self.policy.virtual_capacity(num_device_blocks)
        self.residency = Residency(
            self.num_layers, self.policy.init_blocks, VirtualBlocks(num_device_blocks, count), num_device_blocks
        )
        return count

    def apply(self, updates: list[OffloadUpdate], copy_blocks: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Before the forward: record this step's middle blocks and copy their representations."""
        for u in updates:
            if self.residency is None:
                raise RuntimeError("offload update before the sparse method was built")
            ids = self.residency.extend(u.req_id, u.middle_store_ids, u.slot_positions, u.slot_physical)
            copy_blocks(torch.tensor(u.middle_physical, dtype=torch.int64), torch.tensor(ids, dtype=torch.int64))

    def drop(self, req_id: str) -> None:
        req = self.residency.drop(req_id) if self.residency is not None else None
        if req is not None:
            self.loaded_blocks += req.loads - req.failed_loads
            self.failed_loads += req.failed_loads

    def resolve(self, layer: int, req_ids: list[str], sel, seq_lens: torch.Tensor, block_size: int):
        """`sel` with the offloaded rows' virtual block ids made physical: held blocks are read in
        place, the missing ones of every row are loaded in one store call for the layer."""
        owners = [self.requests.get(rid) for rid in req_ids]
        if not any(o is not None for o in owners):
            return sel
        table = sel.block_table.cpu().numpy()
        kept = sel.blocks_kept.cpu().numpy()
        out, kept_out = self.residency.resolve(layer, table, kept, owners, self.loader)
        if out is table:
            return sel
        changes = {"block_table": torch.from_numpy(out.astype(table.dtype, copy=False)).to(sel.block_table.device)}
        if kept_out is not kept:  # failed loads shortened rows
            kept_t = torch.from_numpy(kept_out).to(sel.blocks_kept.device, sel.blocks_kept.dtype)
            lens = kept_seq_lens(seq_lens.to(torch.int64), kept_t.to(seq_lens.device, torch.int64), block_size)
            changes["seq_lens"] = lens.to(sel.seq_lens.device, sel.seq_lens.dtype)
            changes["blocks_kept"] = kept_t
        return dataclasses.replace(sel, **changes)

    def snapshot(self) -> dict:
        live = list(self.requests.values())
        return {
            "offloaded_requests": len(live),
            "loaded_blocks": self.loaded_blocks + sum(r.loads - r.failed_loads for r in live),
            "failed_loads": self.failed_loads + sum(r.failed_loads for r in live),
            "virtual_in_use": self.residency.virtual.in_use if self.residency else 0,
        }
