"""The KV store API: content-addressed block ids, per-layer shards, asynchronous tasks.

A *block* is the KV of `block_size` consecutive tokens for every layer of a model; its id is a
hash chain over the token ids (see `block_hash`), so the same prefix gives the same ids in every
request and every process. A block is split into `num_shards` equal *shards* (typically one per
layer, or one per layer and K/V), each a tensor of `BlockLayout.shard_shape` / `dtype`. Shards are
dumped and loaded independently (the vLLM connector dumps a layer's blocks as soon as the layer is
written), and a block becomes visible to `lookup` only once all of its shards have been dumped.

Tensors crossing the API are host (CPU) tensors. `load`/`dump` take, for n items,
    ids    n block ids                        (an item is one shard of one block)
    shards n shard indices, or one int for all
    dst/src a batched contiguous tensor [n, *shard_shape] or a list of n contiguous tensors of
           shard_shape (any layout with the same numel is accepted; bytes are copied as-is).
A layer's blocks are therefore one call: `dump(ids, layer, cache.index_select(0, block_ids))` and
`cache.index_copy_(0, block_ids, buf)` after `wait(load(ids, layer, buf))` (`BlockStager` does
both for a device cache, on its own stream).

Tasks run on a thread pool (`workers` threads, UCM's `transferStreamNumber`); the tensors must stay
alive and untouched until the task is done (the Task keeps a reference). `wait` raises `TaskFailed`
listing every failed id; its `missing` ids are blocks the caller can simply recompute (absent,
corrupt, evicted, or of another layout).
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from functools import cached_property
from math import prod
from typing import TypeVar

import numpy as np
import torch

BlockId = str  # 32 lowercase hex characters (a 128-bit blake2b digest)

_ID_BYTES = 16
_PERSON = b"ucm-kv-block"  # blake2b personalisation: these digests mean nothing else
# one task splits into chunks of about this many bytes, so per-item overhead stays small
_CHUNK_BYTES = 8 << 20


# ---------------------------------------------------------------------------------- errors
class StoreError(RuntimeError):
    """Any failure of the store (I/O, capacity, a bad block). Messages name the path."""


class BlockMissing(StoreError):
    """The block (or the shard's block) is not in the store: the caller recomputes it."""


class BlockCorrupt(BlockMissing):
    """The stored bytes failed a check (magic, header, size, checksum); the file was dropped."""


class StoreFull(StoreError):
    """Nothing more can be evicted to make room (every block is being read, or one is too big)."""


class TaskFailed(StoreError):
    """Some items of a task failed. `failures` maps block id -> its first error."""

    def __init__(self, kind: str, failures: dict[BlockId, BaseException]) -> None:
        self.kind = kind
        self.failures = failures
        first_id, first = next(iter(failures.items()))
        super().__init__(f"{kind} failed for {len(failures)} block(s); first {first_id}: {first}")

    @property
    def ids(self) -> list[BlockId]:
        return list(self.failures)

    @property
    def missing(self) -> list[BlockId]:
        """Ids that are safe to recompute (absent or corrupt), as opposed to I/O errors."""
        return [i for i, e in self.failures.items() if isinstance(e, BlockMissing)]


# ---------------------------------------------------------------------------------- hashing
def root_hash(namespace: str = "") -> BlockId:
    """Parent of a sequence's first block. Put model, dtype, block size and TP rank into the
    namespace so that two layouts never share ids."""
    h = hashlib.blake2b(b"root\0" + namespace.encode(), digest_size=_ID_BYTES, person=_PERSON)
    return h.hexdigest()


def block_hash(
    parent: BlockId | None, token_ids: Sequence[int] | np.ndarray | torch.Tensor, extra: bytes = b""
) -> BlockId:
    """Id of a block: blake2b-128(parent id || token ids as little-endian int64 [|| extra]).

    The parent is fixed-length, so the encoding is unambiguous; a change in any earlier token
    changes the parent and therefore this id and every later one. `extra` is whatever else
    determines the block's KV besides its tokens (an adapter, multimodal inputs, a salt): it is
    appended after a separator and its length, so no token sequence can produce it.
    """
    parent = parent if parent is not None else root_hash()
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    tokens = np.ascontiguousarray(np.asarray(token_ids, dtype="<i8"))
    h = hashlib.blake2b(bytes.fromhex(parent), digest_size=_ID_BYTES, person=_PERSON)
    h.update(tokens.tobytes())
    if extra:
        h.update(b"\0extra\0" + len(extra).to_bytes(8, "little") + extra)
    return h.hexdigest()


def prefix_block_hashes(
    token_ids: Sequence[int] | np.ndarray | torch.Tensor, block_size: int, namespace: str = ""
) -> list[BlockId]:
    """Ids of the full blocks of a token sequence (a trailing partial block has no id)."""
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    tokens = np.asarray(token_ids, dtype="<i8")
    parent = root_hash(namespace)
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start : start + block_size])
        out.append(parent)
    return out


def scoped_id(block_id: BlockId, scope: str) -> BlockId:
    """The id of `scope`'s part of a block (e.g. one tensor-parallel rank's heads).

    The scheduler hashes tokens once; every rank stores its own shards under its own scoped
    ids, so ranks never collide and a block counts as present only when every scope has it.
    """
    h = hashlib.blake2b(b"scope\0" + scope.encode() + b"\0", digest_size=_ID_BYTES, person=_PERSON)
    h.update(bytes.fromhex(block_id))
    return h.hexdigest()


_CANONICAL_ID = re.compile(rf"[0-9a-f]{{{2 * _ID_BYTES}}}")


def check_id(block_id: BlockId) -> None:
    """Ids are canonical: exactly 2 * _ID_BYTES lowercase hex digits (what `hexdigest` gives).
    Anything else (upper case, `0x`, `_`, spaces, a sign, other Unicode digits) is refused
    here, before a file is named after it, so one block never has two spellings."""
    if not (isinstance(block_id, str) and _CANONICAL_ID.fullmatch(block_id)):
        raise ValueError(f"block id must be {2 * _ID_BYTES} lowercase hex digits, got {block_id!r}")


# ---------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class BlockLayout:
    """What one block holds: `num_shards` shards of `shard_shape` / `dtype` each."""

    num_shards: int
    shard_shape: tuple[int, ...]
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        object.__setattr__(self, "shard_shape", tuple(int(s) for s in self.shard_shape))
        if not self.shard_shape or any(s < 1 for s in self.shard_shape):
            raise ValueError(f"shard_shape must be non-empty and positive, got {self.shard_shape}")

    @cached_property  # read per shard on every I/O path: computed once
    def shard_numel(self) -> int:
        return prod(self.shard_shape)

    @cached_property
    def shard_nbytes(self) -> int:
        return self.shard_numel * self.dtype.itemsize

    @cached_property
    def block_nbytes(self) -> int:
        return self.num_shards * self.shard_nbytes


def host_buffer(shape: Sequence[int], dtype: torch.dtype, pin_memory: bool | None = None) -> torch.Tensor:
    """An empty host tensor whose start is 4 KiB-aligned: rows of shard_nbytes (a multiple of 4 KiB)
    are then O_DIRECT-able in place, with no bounce copy. Pinned when CUDA is available."""
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    nbytes = prod(shape) * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(nbytes + 4096, dtype=torch.uint8, pin_memory=pin)
    off = (-raw.data_ptr()) % 4096
    return raw[off : off + nbytes].view(dtype).view(tuple(shape))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous host tensor (no copy), for byte-exact I/O of any dtype."""
    if t.dtype == torch.uint8 and t.dim() == 1:  # already one (offload passes cache rows): no new views
        return t
    return t.reshape(-1).view(torch.uint8)


# ---------------------------------------------------------------------------------- tasks
class Task:
    """A running load or dump. Poll with `KVStore.check`, finish with `KVStore.wait`."""

    _ids = itertools.count()

    def __init__(self, kind: str, n_items: int, futures: list[Future], keep: object) -> None:
        self.id = next(Task._ids)
        self.kind = kind
        self.n_items = n_items
        self._futures = futures
        self._keep = keep  # the tensors must outlive the I/O

    def done(self) -> bool:
        return all(f.done() for f in self._futures)

    def _failures(self, timeout: float | None) -> dict[BlockId, BaseException]:
        _, pending = wait_futures(self._futures, timeout=timeout)
        if pending:
            raise TimeoutError(f"{self.kind} task {self.id} not done after {timeout} s")
        failures: dict[BlockId, BaseException] = {}
        for f in self._futures:
            for block_id, exc in f.result():
                failures.setdefault(block_id, exc)
        return failures

    def __repr__(self) -> str:
        return f"Task({self.id}, {self.kind}, items={self.n_items}, done={self.done()})"


_S = TypeVar("_S", bound="KVStore")
Item = tuple[BlockId, int, torch.Tensor]  # (block id, shard index, flat uint8 view)


class KVStore(ABC):
    """Base of every store: argument checks, chunking and the worker pool.

    Subclasses implement `lookup` and the synchronous per-shard `_read` / `_write`; the base
    turns them into tasks. `_read` must raise `BlockMissing` (or a subclass) for a block it
    cannot return, and must never leave unchecked bytes in `dst` presented as success.
    """

    def __init__(self, layout: BlockLayout, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.layout = layout
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # ---- to implement
    @abstractmethod
    def lookup(self, ids: Sequence[BlockId]) -> list[bool]:
        """Whether each block is complete in the store (cheap; may still fail a later load)."""

    @abstractmethod
    def _read(self, block_id: BlockId, shard: int, dst: torch.Tensor) -> None:
        """Copy one stored shard into dst (flat uint8 of shard_nbytes)."""

    @abstractmethod
    def _write(self, block_id: BlockId, shard: int, src: torch.Tensor) -> None:
        """Store one shard (flat uint8 of shard_nbytes); publish the block when it is complete."""

    def _read_run(self, block_id: BlockId, first: int, dsts: list[torch.Tensor]) -> None:
        """Shards first, first+1, ... of one block; stores that can do it in one request override this."""
        for k, dst in enumerate(dsts):
            self._read(block_id, first + k, dst)

    def _write_run(self, block_id: BlockId, first: int, srcs: list[torch.Tensor]) -> None:
        for k, src in enumerate(srcs):
            self._write(block_id, first + k, src)

    def _read_items(self, chunk: list[Item]) -> list[tuple[BlockId, BaseException]]:
        """One chunk of a load task, on a worker; returns (id, error) for each failed block.
        Stores that move a chunk at once (the DRAM cache) override this."""
        return _run_chunk(self._read_run, chunk)

    def _write_items(self, chunk: list[Item]) -> list[tuple[BlockId, BaseException]]:
        return _run_chunk(self._write_run, chunk)

    def _begin_load(self, ids: Sequence[BlockId]) -> None:  # noqa: B027  (an optional hook)
        """Hook: a load of these ids is starting (the POSIX store protects them from eviction)."""

    def _end_load(self, ids: Sequence[BlockId]) -> None:  # noqa: B027  (an optional hook)
        """Hook: the load started by `_begin_load` is over."""

    # ---- public API
    def load(
        self, ids: Sequence[BlockId], shards: int | Sequence[int], dst: torch.Tensor | Sequence[torch.Tensor]
    ) -> Task:
        """Start reading shards into dst; returns at once."""
        items = self._items(ids, shards, dst, "dst")
        uniq = list(dict.fromkeys(ids))
        self._begin_load(uniq)
        try:
            task = self._submit("load", items, self._read_items, dst)
        except BaseException:
            self._end_load(uniq)
            raise
        remaining = [len(task._futures)]
        lock = threading.Lock()

        def _done(_: Future) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self._end_load(uniq)

        for f in task._futures:
            f.add_done_callback(_done)
        return task

    def read_now(
        self, ids: Sequence[BlockId], shards: int | Sequence[int], dst: torch.Tensor | Sequence[torch.Tensor]
    ) -> dict[BlockId, BaseException]:
        """`load` + `wait` on the calling thread, without the pool: for a caller that would wait
        at once anyway (offload's loads in the forward pass), where a hop to a store thread only
        adds a wake-up and competes with the engine's own busy threads. Returns the failures."""
        items = self._items(ids, shards, dst, "dst")
        uniq = list(dict.fromkeys(ids))
        self._begin_load(uniq)
        try:
            failures: dict[BlockId, BaseException] = {}
            for block_id, exc in self._read_items(items):
                failures.setdefault(block_id, exc)
            return failures
        finally:
            self._end_load(uniq)

    def dump(
        self, ids: Sequence[BlockId], shards: int | Sequence[int], src: torch.Tensor | Sequence[torch.Tensor]
    ) -> Task:
        """Start writing shards from src; returns at once. Blocks already stored are skipped."""
        return self._submit("dump", self._items(ids, shards, src, "src"), self._write_items, src)

    def check(self, task: Task) -> bool:
        """True when the task has finished (successfully or not); never blocks or raises."""
        return task.done()

    def wait(self, task: Task, timeout: float | None = None) -> None:
        """Block until the task is done; raises TaskFailed naming every failed block."""
        failures = task._failures(timeout)
        if failures:
            raise TaskFailed(task.kind, failures)

    def close(self) -> None:
        """Finish running tasks and stop the workers."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self: _S) -> _S:  # noqa: PYI019 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers
    def _items(self, ids: Sequence[BlockId], shards: int | Sequence[int], tensors: object, what: str) -> list[Item]:
        ids = list(ids)
        n = len(ids)
        for block_id in ids:
            check_id(block_id)
        shard_list = [int(shards)] * n if isinstance(shards, int) else [int(s) for s in shards]
        if len(shard_list) != n:
            raise ValueError(f"{n} ids but {len(shard_list)} shards")
        for s in shard_list:
            if not 0 <= s < self.layout.num_shards:
                raise ValueError(f"shard {s} out of range [0, {self.layout.num_shards})")
        lay = self.layout
        if isinstance(tensors, torch.Tensor):
            t = tensors
            if t.dim() == 0 or t.shape[0] != n:
                raise ValueError(f"{what} must be [{n}, *{lay.shard_shape}], got {tuple(t.shape)}")
            rows = list(t.unbind(0)) if n else []
        else:
            rows = list(tensors)  # type: ignore[arg-type]
            if len(rows) != n:
                raise ValueError(f"{n} ids but {len(rows)} {what} tensors")
        out: list[Item] = []
        for block_id, s, r in zip(ids, shard_list, rows, strict=True):
            if r.dtype != lay.dtype or r.numel() != lay.shard_numel:
                raise ValueError(
                    f"{what} tensors must hold {lay.shard_shape} {lay.dtype}, got {tuple(r.shape)} {r.dtype}"
                )
            if r.device.type != "cpu":
                raise ValueError(
                    f"{what} tensors must be host tensors (got {r.device}); stage device data in pinned memory"
                )
            if not r.is_contiguous():
                raise ValueError(f"{what} tensors must be contiguous")
            out.append((block_id, s, as_bytes(r)))
        return out

    def _submit(self, kind: str, items: list[Item], fn, keep: object) -> Task:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"ucm-store-{type(self).__name__}")
            pool = self._pool
        if not items:
            return Task(kind, 0, [], keep)
        per_chunk = max(1, _CHUNK_BYTES // max(1, self.layout.shard_nbytes))
        per_chunk = min(per_chunk, -(-len(items) // self.workers))  # at least one chunk per worker
        chunks = [items[i : i + per_chunk] for i in range(0, len(items), per_chunk)]
        return Task(kind, len(items), [pool.submit(fn, c) for c in chunks], keep)


def _run_chunk(fn, chunk: list[Item]) -> list[tuple[BlockId, BaseException]]:
    """Run every run of items; one failed block does not stop the others.

    Consecutive items of one block with consecutive shards form a run, which a store may move in
    one request (`_read_run` / `_write_run`): a prefix hit loads a block front to back.
    """
    failures = []
    i = 0
    while i < len(chunk):
        block_id, first, _ = chunk[i]
        j = i + 1
        while j < len(chunk) and chunk[j][0] == block_id and chunk[j][1] == first + (j - i):
            j += 1
        try:
            fn(block_id, first, [t for _, _, t in chunk[i:j]])
        except Exception as exc:  # noqa: BLE001 - reported through wait(), never lost
            failures.append((block_id, exc))
        i = j
    return failures
