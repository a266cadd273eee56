"""Prompt KV in a `ucm.store`: dumped as blocks fill, loaded instead of recomputed.

Scheduler side (`PrefixPlanner`): a request's full prompt blocks get content ids (a hash
chain over the token ids, `ucm.store.prefix_block_hashes`), so a later request with the same
prefix finds them. `get_num_new_matched_tokens` reports the leading blocks every rank holds;
the step's metadata then lists the blocks to load (the external hit) and the prompt blocks
that became full (to dump).

Worker side (`PrefixStoreWorker`): loads run before the forward (all layers, synchronously),
then the sparse runtime is shown the loaded keys exactly as if the attention layer had written
them. Dumps copy the blocks to host memory at the end of the step and write them on the
store's threads, so vLLM may reuse the blocks at once; a failed dump is logged and costs only
a future miss. A block that fails to load (evicted or corrupt after the lookup) is reported to
vLLM, which recomputes it when `kv_load_failure_policy` is "recompute". Every wait on a store
task is bounded by ``UCM_WAIT_TIMEOUT_S`` (`ucm.timeouts`): a store that stops answering fails
the step with a `WaitTimeout` naming the layer and the blocks, instead of hanging the worker.

Every tensor-parallel rank stores its own heads under its own scoped ids (`scoped_id`), and a
block is a hit only when every rank has it.

A block's id covers everything that determines its KV, as vLLM's own prefix-cache hash does:
the engine's namespace (model, dtype, layout, block size, TP), the parent block, the tokens,
and vLLM's extra keys for the block (`generate_block_hash_extra_keys`: the LoRA's name and
path, multimodal inputs, `cache_salt`, prompt embeddings), plus a digest of the LoRA adapter's
files (a name re-pointed at other weights, or weights rewritten in place, change every id).
A request whose identity cannot be established (no prompt token ids, an unreadable adapter, a
vLLM without that function) is neither stored nor loaded, and the log says so once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ucm.store import (
    BlockLayout,
    KVStore,
    PosixStore,
    StoreError,
    StoreSpec,
    TaskFailed,
    block_hash,
    build_store,
    host_buffer,
    root_hash,
    scoped_id,
)
from ucm.store.staging import BlockStager
from ucm.timeouts import WAIT_TIMEOUT_ENV, WaitTimeout, wait_timeout_s

logger = logging.getLogger("vllm.ucm")


@dataclass(frozen=True)
class StoreIdentity:
    """What makes two engines' blocks interchangeable: everything that changes the bytes."""

    model: str
    dtype: str
    block_size: int
    page_bytes: int
    num_layers: int
    layout: str
    tp_size: int

    @property
    def namespace(self) -> str:
        return (
            f"{self.model}|{self.dtype}|{self.layout}|block={self.block_size}|page={self.page_bytes}"
            f"|layers={self.num_layers}|tp={self.tp_size}"
        )

    def scope(self, rank: int) -> str:
        return f"tp{rank}/{self.tp_size}"

    def block_layout(self) -> BlockLayout:
        """One shard per layer: the layer's block as raw bytes (layout-independent round trip)."""
        return BlockLayout(self.num_layers, (self.page_bytes,), torch.uint8)


@dataclass
class LoadSpec:
    req_id: str
    block_ids: list[int]  # physical blocks to fill, in prompt order
    store_ids: list[str]  # rank-neutral content ids, same order


@dataclass
class SaveSpec:
    block_ids: list[int]
    store_ids: list[str]


@dataclass
class StorePlan:
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _Prompt:
    ids: list[str]  # content ids of the full prompt blocks
    saved: int = 0  # leading prompt blocks known to be in the store (loaded, or dumped by us)
    first: int = 0  # first block of the last external hit reported (after the local hit)
    load: tuple[int, int] | None = None  # (first block, count) to load when scheduled


def _canonical(extra: Any) -> bytes:
    """A stable byte encoding of vLLM's extra keys (tuples of str / int / bytes)."""

    def enc(x):
        if isinstance(x, (bytes, bytearray)):
            return {"bytes": bytes(x).hex()}
        if isinstance(x, (list, tuple)):
            return [enc(v) for v in x]
        if x is None or isinstance(x, (str, int, float, bool)):
            return x
        raise TypeError(f"unsupported block hash extra key {type(x).__name__}")

    return json.dumps(enc(extra), separators=(",", ":")).encode()


def adapter_digest(path: str, cache: dict) -> str | None:
    """blake2b of a LoRA adapter's files (relative names and contents), cached by their sizes and
    modification times; None when the adapter cannot be read."""
    try:
        root = Path(path)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        stamp = (path, tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
        if stamp in cache:
            return cache[stamp]
        h = hashlib.blake2b(digest_size=16)
        for f in files:
            h.update(os.path.relpath(f, root if root.is_dir() else root.parent).encode() + b"\0")
            h.update(f.read_bytes())
        cache[stamp] = h.hexdigest()
        return cache[stamp]
    except OSError:
        return None


def request_block_ids(request, block_size: int, namespace: str, digests: dict) -> tuple[list[str] | None, str]:
    """(content ids of the request's full prompt blocks, "") or (None, why not)."""
    tokens = request.prompt_token_ids
    if tokens is None:
        return None, "it has no prompt token ids (prompt embeddings only)"
    try:
        from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys
    except ImportError:
        return None, "this vLLM has no generate_block_hash_extra_keys"
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        digest = adapter_digest(str(lora.lora_path), digests)
        if digest is None:
            return None, f"its LoRA adapter {lora.lora_path!r} cannot be read"
        namespace = f"{namespace}|lora={digest}"
    parent, mm_idx, out = root_hash(namespace), 0, []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        extra, mm_idx = generate_block_hash_extra_keys(request, start, start + block_size, mm_idx)
        parent = block_hash(parent, tokens[start : start + block_size], _canonical(extra) if extra else b"")
        out.append(parent)
    return out, ""


class PrefixPlanner:
    """Scheduler-side bookkeeping; `lookup_store` is None when no stage is visible to it."""

    def __init__(self, identity: StoreIdentity, lookup_store: KVStore | None) -> None:
        self.identity = identity
        self.lookup_store = lookup_store
        self._prompts: dict[str, _Prompt] = {}
        self._digests: dict = {}  # LoRA adapter digests, by their files' sizes and times
        self._said_unidentified = False
        self.hit_tokens = 0
        self.queried_tokens = 0

    def register(self, request) -> _Prompt | None:
        """The request's prompt ids, computed once from the vLLM `Request` (the scheduler hands
        it to `get_num_new_matched_tokens` before it schedules the request)."""
        p = self._prompts.get(request.request_id)
        if p is None:
            ids, why = request_block_ids(request, self.identity.block_size, self.identity.namespace, self._digests)
            if ids is None:
                if not self._said_unidentified:
                    self._said_unidentified = True
                    logger.warning(
                        "ucm store: request %s is neither stored nor loaded: %s (said once)", request.request_id, why
                    )
                return None
            p = self._prompts[request.request_id] = _Prompt(ids)
        return p

    @property
    def root(self) -> str:
        """Parent id of every sequence's first block in this engine's namespace."""
        return root_hash(self.identity.namespace)

    def prompt_ids(self, req_id: str) -> list[str] | None:
        """Content ids of the request's full prompt blocks (None: identity not established)."""
        p = self._prompts.get(req_id)
        return p.ids if p is not None else None

    def saved_blocks(self, req_id: str) -> int:
        """Leading prompt blocks known to be in the store (dumps issued, or loaded from it)."""
        p = self._prompts.get(req_id)
        return p.saved if p is not None else 0

    def matched_tokens(self, request, num_computed_tokens: int) -> int:
        """Tokens beyond `num_computed_tokens` (block-aligned) that the store can supply."""
        p = self.register(request)
        if p is None:
            return 0
        prompt_token_ids = request.prompt_token_ids
        p.load = None
        if self.lookup_store is None or not p.ids:
            return 0
        bs = self.identity.block_size
        # the last prompt token is always computed (vLLM needs its logits): load whole blocks before it
        loadable = (len(prompt_token_ids) - 1) // bs
        first = p.first = num_computed_tokens // bs
        if loadable <= first:
            return 0
        self.queried_tokens += (loadable - first) * bs
        hits = loadable
        for rank in range(self.identity.tp_size):
            scope = self.identity.scope(rank)
            present = self.lookup_store.lookup([scoped_id(i, scope) for i in p.ids[first:loadable]])
            lead = next((k for k, ok in enumerate(present) if not ok), len(present))
            hits = min(hits, first + lead)
        if hits <= first:
            return 0
        self.hit_tokens += (hits - first) * bs
        return (hits - first) * bs

    def after_alloc(self, req_id: str, num_external_tokens: int) -> None:
        """The scheduler took the hit reported last for this request: load it when it is scheduled."""
        p = self._prompts.get(req_id)
        if p is None or num_external_tokens <= 0:
            return
        p.load = (p.first, num_external_tokens // self.identity.block_size)

    def plan_request(
        self, req_id: str, prompt_len: int, blocks: list[int], computed: int, scheduled: int, new: bool, plan: StorePlan
    ) -> None:
        """Add this request's loads (when newly scheduled with a hit) and newly full prompt blocks;
        nothing for a request whose identity was not established."""
        p = self._prompts.get(req_id)
        if p is None:
            return
        bs = self.identity.block_size
        if new:
            if p.load is not None:
                first, n = p.load
                if first + n <= len(blocks):
                    plan.loads.append(LoadSpec(req_id, blocks[first : first + n], p.ids[first : first + n]))
                p.saved = first + n
                p.load = None
            else:
                p.saved = max(p.saved, computed // bs)  # a local prefix-cache hit was dumped by whoever computed it
        full = min(computed + scheduled, prompt_len) // bs
        full = min(full, len(p.ids), len(blocks))
        if full > p.saved:
            plan.saves.append(SaveSpec(blocks[p.saved : full], p.ids[p.saved : full]))
            p.saved = full

    def forget(self, req_id: str) -> None:
        self._prompts.pop(req_id, None)


def lookup_store_for(spec: StoreSpec, identity: StoreIdentity) -> KVStore | None:
    """The stage the scheduler can see (the POSIX directory); None for memory-only pipelines."""
    if "Posix" not in spec.pipeline.split("|"):
        return None
    return PosixStore(spec.storage_backends, identity.block_layout(), workers=1)


class PrefixStoreWorker:
    """Worker-side loads and dumps for one rank."""

    def __init__(self, spec: StoreSpec, identity: StoreIdentity, rank: int, recompute_failures: bool = True) -> None:
        """`recompute_failures`: vLLM's `kv_load_failure_policy` is "recompute" (a block that
        fails to load is recomputed) rather than "fail" (its request fails)."""
        self.identity = identity
        self.recompute_failures = recompute_failures
        self.rank = rank
        self.scope = identity.scope(rank)
        self.wait_timeout_s = wait_timeout_s()  # bound on every wait for a store task (None: unbounded)
        self.store = build_store(spec, identity.block_layout())
        self.kv_caches: dict[int, torch.Tensor] = {}  # layer index -> that layer's cache
        self.stager: BlockStager | None = None  # set by register(): copies on the cache's device
        self._dumps: list = []
        self._lock = threading.Lock()
        self._load_errors: set[int] = set()
        self._warned: set[str] = set()
        self.loaded_blocks = 0
        self.dumped_blocks = 0
        self.failed_loads = 0
        self.failed_dumps = 0
        self.load_seconds = 0.0
        self.offload_loaded_blocks = 0
        self.offload_load_seconds = 0.0

    def register(self, kv_caches: dict[int, torch.Tensor]) -> None:
        for layer, kv in kv_caches.items():
            page = kv[0].numel() * kv.element_size()
            if page != self.identity.page_bytes:
                raise StoreError(
                    f"layer {layer}: a KV block is {page} B but the store was set up for {self.identity.page_bytes} B"
                )
            if not kv.is_contiguous():
                raise StoreError(f"layer {layer}: the KV cache is not contiguous; blocks cannot be moved as bytes")
        self.kv_caches = dict(kv_caches)
        devices = {kv.device for kv in self.kv_caches.values()}
        self.stager = BlockStager(next(iter(devices))) if devices else None

    def _rows(self, layer: int) -> torch.Tensor:
        kv = self.kv_caches[layer]
        return kv.view(kv.shape[0], -1).view(torch.uint8)

    # ------------------------------------------------------------------ load
    def load(self, loads: list[LoadSpec], on_loaded: Callable[[int, torch.Tensor], None] | None = None) -> None:
        """Fill the listed blocks from the store (every layer), then call `on_loaded(layer, block_ids)`
        for the blocks that arrived intact. Failed blocks are remembered for vLLM to recompute."""
        if not loads or not self.kv_caches:
            return
        t0 = time.perf_counter()
        phys = [b for spec in loads for b in spec.block_ids]
        ids = [scoped_id(i, self.scope) for spec in loads for i in spec.store_ids]
        n = len(ids)
        bufs, tasks = {}, {}
        for layer in self.kv_caches:
            bufs[layer] = host_buffer([n, self.identity.page_bytes], torch.uint8)
            tasks[layer] = self.store.load(ids, layer, bufs[layer])
        bad: set[str] = set()
        for layer, task in tasks.items():
            try:
                self._wait(task, f"the load of {n} prefix block(s) into layer {layer}")
            except TaskFailed as exc:
                bad.update(exc.ids)
                fate = (
                    "will be recomputed"
                    if self.recompute_failures
                    else "fail their requests (kv_load_failure_policy 'fail'; 'recompute' recomputes them instead)"
                )
                self._warn_once("load", f"ucm store: {len(exc.ids)} block(s) failed to load and {fate} (first: {exc})")
        good = [k for k, i in enumerate(ids) if i not in bad]
        if bad:
            failed = {phys[k] for k, i in enumerate(ids) if i in bad}
            self.failed_loads += len(failed)
            with self._lock:
                self._load_errors |= failed
        if good:
            dst = [phys[k] for k in good]
            for layer, buf in bufs.items():
                self._scatter_arrived(layer, phys, buf, good)
                if on_loaded is not None:
                    on_loaded(layer, torch.tensor(dst, dtype=torch.int64, device=self.kv_caches[layer].device))
        self.loaded_blocks += len(good)
        self.load_seconds += time.perf_counter() - t0

    def load_layer(self, layer: int, store_ids: list[str], block_ids: list[int]) -> list[bool]:
        """Fill device blocks `block_ids` of one layer from the store (offload mode); which arrived.

        A host cache is read into in place (each destination is an exclusive slot block that no
        attention reads this step, so a failed read leaves nothing anyone looks at); a device
        cache goes through one host buffer. A dump still in flight of one of these blocks is waited
        for first (a block freed on the device may have been dumped a step ago)."""
        ids = [scoped_id(i, self.scope) for i in store_ids]
        if self._dumps:
            self._reap(wait_for=set(ids), why=f"before layer {layer} loads them back (offload)")
        t0 = time.perf_counter()
        rows = self._rows(layer)
        if rows.device.type == "cpu":
            failures = self.store.read_now(ids, layer, [rows[b] for b in block_ids])
        else:
            buf = host_buffer([len(ids), self.identity.page_bytes], torch.uint8)
            failures = self.store.read_now(ids, layer, buf)
            good = [k for k, i in enumerate(ids) if i not in failures]
            if good:
                self._scatter_arrived(layer, block_ids, buf, good)
        if failures:
            first = next(iter(failures.values()))
            self._warn_once(
                "offload",
                f"ucm offload: {len(failures)} block(s) failed to load from the store and are "
                f"left out of attention (first: {first}); size the store to hold the offloaded KV",
            )
        ok = [i not in failures for i in ids]
        self.offload_loaded_blocks += sum(ok)
        dt = time.perf_counter() - t0
        self.load_seconds += dt
        self.offload_load_seconds += dt
        return ok

    def _scatter_arrived(self, layer: int, block_ids: list[int], buf: torch.Tensor, good: list[int]) -> None:
        """Blocks `block_ids[k]` of one layer from host rows `buf[k]`, for the k in `good` (those that arrived)."""
        src = buf if len(good) == len(block_ids) else buf.index_select(0, torch.tensor(good, dtype=torch.int64))
        self.stager.scatter(self._rows(layer), [block_ids[k] for k in good], src)

    def take_load_errors(self) -> set[int]:
        with self._lock:
            out, self._load_errors = self._load_errors, set()
        return out

    # ------------------------------------------------------------------ dump
    def save(self, saves: list[SaveSpec]) -> None:
        """Copy the blocks to host memory now (vLLM may reuse them next step) and dump them in the background."""
        self._reap()
        if not saves or not self.kv_caches:
            return
        phys = [b for s in saves for b in s.block_ids]
        ids = [scoped_id(i, self.scope) for s in saves for i in s.store_ids]
        staged = [(layer, *self.stager.gather(self._rows(layer), phys)) for layer in self.kv_caches]
        for k, (layer, buf, ready) in enumerate(staged):
            if ready is not None:
                ready.synchronize()  # the device-to-host copy ran on the copy stream; the store reads host bytes
            try:
                task = self.store.dump(ids, layer, buf)
            except StoreError as exc:
                self.failed_dumps += len(ids)
                self._warn_once("dump", f"ucm store: dump refused ({exc}); serving goes on without storing")
                return
            # blocks counted once, not per layer
            self._dumps.append((task, len(ids) if k == 0 else 0, frozenset(ids), layer))

    def _reap(self, wait: bool = False, wait_for: set[str] | None = None, why: str = "") -> None:
        """Collect finished dumps; `wait` waits for all, `wait_for` for those holding any of these ids
        (`why`: for the message of a wait that times out)."""
        keep = []
        for k, (task, n, ids, layer) in enumerate(self._dumps):
            must = wait or (wait_for is not None and not ids.isdisjoint(wait_for))
            if not must and not self.store.check(task):
                keep.append((task, n, ids, layer))
                continue
            try:
                self._wait(task, f"the dump of {len(ids)} block(s) of layer {layer} {why}".rstrip())
                self.dumped_blocks += n
            except WaitTimeout:
                self._dumps = keep + self._dumps[k:]
                raise
            except (TaskFailed, StoreError) as exc:
                self.failed_dumps += len(exc.ids) if isinstance(exc, TaskFailed) else n
                self._warn_once("dump", f"ucm store: dump failed ({exc}); those blocks will be recomputed when needed")
        self._dumps = keep

    def flush(self) -> None:
        """Wait for every dump started so far (a later lookup then sees them)."""
        self._reap(wait=True, why="(flush)")

    def close(self) -> None:
        if self.stager is not None:
            self.stager.synchronize()
        try:
            self.flush()
        except WaitTimeout as exc:  # closing the store would wait for the stuck dump without a bound
            logger.error("%s; the store is left open", exc)
            return
        self.store.close()

    def _wait(self, task, what: str) -> None:
        """`store.wait(task)` for at most `wait_timeout_s`; past it a `WaitTimeout` names `what` it waited for."""
        try:
            self.store.wait(task, self.wait_timeout_s)
        except TimeoutError as exc:  # the task is still running (its own failures come as TaskFailed)
            raise WaitTimeout(
                f"ucm store (TP rank {self.rank}): {what} did not finish within "
                f"{self.wait_timeout_s:g} s ({WAIT_TIMEOUT_ENV}); the store's threads are still at it "
                f"({type(self.store).__name__})"
            ) from exc

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning(message)

    def snapshot(self) -> dict:
        return {
            "loaded_blocks": self.loaded_blocks,
            "dumped_blocks": self.dumped_blocks,
            "failed_loads": self.failed_loads,
            "failed_dumps": self.failed_dumps,
            "load_seconds": self.load_seconds,
            "offload_loaded_blocks": self.offload_loaded_blocks,
            "offload_load_seconds": self.offload_load_seconds,
        }
