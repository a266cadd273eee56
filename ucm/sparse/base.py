"""The lifecycle every sparse method shares, and the driver that runs it.

A method is a `BlockScorer` (how blocks are represented and scored) driven by `SparseMethod`
(when to retrieve, asynchronously or not, and the shared `BlockSelector`). An engine
integration calls, per step:

    plan = method.begin_step(req_ids, seq_lens, block_table, sparse_rows)
    for each layer:
        method.on_kv_written(layer, new_keys, slot_mapping)   # prefill and decode, as K is written
        sel = method.select(layer, q, plan)                          # decode rows only
        attention(q, k_cache, v_cache, sel.block_table, sel.seq_lens)
    method.end_step(plan)
    method.finish(req_id) when a request leaves
"""

from __future__ import annotations

import logging
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from functools import partial

import torch

from ucm.ops.contract import SparseOps, byte_view, rows_into
from ucm.ops.subblocks import block_max, sub_block_table
from ucm.sparse.selection import BlockSelector, Selection, StepPlan, _max_or_zero
from ucm.timeouts import WAIT_TIMEOUT_ENV, WaitTimeout, wait_timeout_s

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShapes:
    """What a method needs to know of the model and of its paged cache."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    device: torch.device = torch.device("cpu")
    kv_lora_rank: int | None = None  # MLA: K is [kv_lora | rope] with one KV head
    qk_rope_head_dim: int | None = None
    key_dtype: torch.dtype | None = None  # the dtype of the keys the method is shown (None: not known)

    def __post_init__(self) -> None:
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads {self.num_q_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if (self.kv_lora_rank is None) != (self.qk_rope_head_dim is None):
            raise ValueError("MLA needs both kv_lora_rank and qk_rope_head_dim")
        if self.is_mla and self.kv_lora_rank + self.qk_rope_head_dim != self.head_dim:
            raise ValueError(f"MLA head_dim {self.head_dim} != kv_lora_rank + qk_rope_head_dim")

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None


class BlockScorer(ABC):
    """How a method represents blocks and scores them against the query (larger = better)."""

    #: scoring runs on the host (query copied off the accelerator), so retrieval is async
    host_scoring: bool = False
    #: how per-block scores combine into a selection unit (chunk) of several blocks
    unit_reduce: str = "max"
    #: `batch_scores` runs with static shapes and no host read (the CUDA graph decode path)
    batch_safe: bool = False
    #: whether `batch_scores` ranks larger first (False: raw distances, smaller = closer)
    batch_largest: bool = True
    #: `batch_scores` is given the tokens of full blocks only (the partial last block has no
    #: representation yet; it is always kept)
    batch_full_blocks: bool = False
    #: `batch_scores` depend on the current query alone, so the batch path may keep a row's scores
    #: for `retrieval_stride` steps as the per-request path does (`ucm.sparse.batch_selection`)
    batch_reuses_scores: bool = True
    #: `score` is a sum over KV heads of a term that is 0 when that head's query heads are all 0
    #: (ESA, GSA, Quest): `score` with one GQA group's queries kept and the rest zeroed is that KV
    #: head's own score, which `kv_head_combine="rank"` needs
    kv_heads_additive: bool = False
    #: representations per block (`ucm.ops.subblocks`): `score` is the max over a block's groups
    #: of `sub_scores`, each a sum over KV heads (so tensor-parallel ranks sum `sub_scores`, then
    #: take the max: what one rank holding every head would score)
    groups: int = 1

    def __init__(self, shapes: ModelShapes, ops: SparseOps) -> None:
        self.shapes = shapes
        self.ops = ops

    def groups_of(self, layer: int) -> int:
        """Representations per block in `layer` (`groups` unless a layer keeps its own)."""
        return self.groups

    @abstractmethod
    def on_kv_written(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """New K rows [T, Hkv, D] were written at slot_mapping: update representations.

        Scorers work from the written keys only and never read the engine's KV cache, so they
        do not depend on its layout (vLLM's CPU, FlashAttention and Ascend layouts differ).
        """

    @abstractmethod
    def score(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, req_ids: Sequence[str]
    ) -> torch.Tensor:
        """Block scores [b, M] for the given rows (larger = better; -inf for padding).

        q is what `prepare_query` returned, restricted to these rows.
        """

    def sub_scores(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, req_ids: Sequence[str]
    ) -> torch.Tensor:
        """Scores [b, M * groups] of every group of every block (`score` is their max per block;
        with one group, `score` itself)."""
        return self.score(layer, q, block_table, seq_lens, req_ids)

    def batch_scores(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
    ) -> torch.Tensor:
        """Block scores [B, M] of every row from its current query q [B, Hq, D] alone (no
        per-request state), with static shapes and no host read; order as `batch_largest`."""
        raise NotImplementedError(f"{type(self).__name__} cannot score a batch without per-request state")

    def batch_scores_into(
        self,
        layer: int,
        q: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        out: torch.Tensor,
        keep_rows: torch.Tensor,
    ) -> torch.Tensor:
        """`batch_scores` written into `out` [B, M], except the rows `keep_rows` [B] marks, which
        keep what `out` holds and read no representation (scored with length 0 here; a scorer
        whose op writes in place skips them altogether)."""
        fresh = self.batch_scores(layer, q, block_table, torch.where(keep_rows, 0, seq_lens))
        return rows_into(out, keep_rows, fresh)

    #: `write_from_caches` works (the representations live where the key caches do)
    writes_from_caches: bool = False

    def write_from_caches(
        self, layers: Sequence[int], k_caches: Sequence[torch.Tensor], slot_mapping: torch.Tensor
    ) -> None:
        """`on_kv_written` for several layers at once, their keys read from their paged key
        caches [NB, bs, Hkv, D] (already written at slot_mapping): one `reps_write_layers` op.
        Only where `writes_from_caches`."""
        raise NotImplementedError(f"{type(self).__name__} writes layer by layer")

    def prepare_query(self, layer: int, q: torch.Tensor, req_ids: Sequence[str]) -> torch.Tensor:
        """Called with every decode query [B, Hq, D]; returns what `score` receives for it.

        Runs on the caller's thread, so whatever it returns is a consistent snapshot for an
        asynchronous retrieval (KVStar returns a window of recent queries).
        """
        return q

    def finish(self, req_id: str) -> None:  # noqa: B027 (an optional hook: stateless scorers keep the no-op)
        """Drop per-request state."""

    def memory_bytes(self) -> int:
        """Bytes of side caches (representations, codes) this scorer holds."""
        return 0

    def read_bytes_per_block(self) -> float:
        """Bytes `batch_scores` reads per block and layer (what a bandwidth bound counts): by
        default the whole side cache of a block."""
        return self.memory_bytes() / (self.shapes.num_layers * self.shapes.num_blocks)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the per-block state of blocks `src` to ids `dst` (every layer), so a block's
        representation outlives its device block (offload mode scores middle blocks there)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no copyable per-block state; it cannot offload")


class GroupedScorer(BlockScorer):
    """A scorer of `groups` representations per block, kept on `repr_device`: a block scores as
    its best group (`ucm.ops.subblocks`). Subclasses give their representations of a layer
    (`group_reps`, each [NB, R, Hkv, D]) and the contract op that scores them (`score_reps`);
    `score`, `sub_scores`, `batch_sub_scores` and `batch_scores` follow from those. Block scores
    come from one op on the whole representations (a backend's kernel takes each block's best
    group itself); the groups' own scores only where tensor-parallel ranks must sum them."""

    repr_device: torch.device

    @abstractmethod
    def group_reps(self, layer: int) -> tuple[torch.Tensor, ...]:
        """The layer's representations, each [NB, R, Hkv, D] on `repr_device`."""

    @abstractmethod
    def score_reps(
        self,
        q: torch.Tensor,
        reps: tuple[torch.Tensor, ...],
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
    ) -> torch.Tensor:
        """The contract's scoring op on representations shaped as `group_reps` gives them (or
        flattened to [NB * R, Hkv, D] sub-blocks), all tensors on `repr_device`."""

    def groups_of(self, layer: int) -> int:
        return self.group_reps(layer)[0].shape[1]

    def _lens(self, seq_lens: torch.Tensor) -> torch.Tensor:
        # a partial last block has no representation yet where only full blocks are scored (it is always kept)
        bs = self.shapes.block_size
        return (seq_lens // bs) * bs if self.batch_full_blocks else seq_lens

    def batch_sub_scores(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
    ) -> torch.Tensor:
        """Scores [B, M * groups] of every group of every block, all tensors on `repr_device`
        (`seq_lens` counts full blocks' tokens where `batch_full_blocks`)."""
        reps = self.group_reps(layer)
        groups = reps[0].shape[1]
        table = sub_block_table(block_table, groups)
        return self.score_reps(
            q, tuple(r.flatten(0, 1) for r in reps), table, seq_lens, self.shapes.block_size // groups
        )

    def batch_reps(self, layer: int) -> tuple[torch.Tensor, ...]:
        """The layer's representations as the batch path's one op takes them: [NB, R, Hkv, D],
        or [NB, Hkv, D] for one group a block."""
        reps = self.group_reps(layer)
        return tuple(r[:, 0] for r in reps) if reps[0].shape[1] == 1 else reps

    def batch_scores(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
    ) -> torch.Tensor:
        """`score` with static shapes, no per-request state (the CUDA graph decode path): one op."""
        return self.score_reps(q, self.batch_reps(layer), block_table, seq_lens, self.shapes.block_size)

    def sub_scores(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, req_ids: Sequence[str]
    ) -> torch.Tensor:
        dev = self.repr_device
        lens = self._lens(seq_lens)
        return self.batch_sub_scores(layer, q.to(dev), block_table.to(dev), lens.to(dev)).to(q.device)

    def score(
        self, layer: int, q: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, req_ids: Sequence[str]
    ) -> torch.Tensor:
        dev = self.repr_device
        lens = self._lens(seq_lens)
        return self.batch_scores(layer, q.to(dev), block_table.to(dev), lens.to(dev)).to(q.device)


class BlockAccumulator:
    """Running per-block sums of written keys, in groups of `merge` tokens (merge = block size:
    one group). A block's sums restart when its first slot is written (blocks are recycled).
    `ops` (default: the torch reference) is the backend of the device the sums live on.

    sums [NB, R, Hkv, D] (R = block_size // merge) in `dtype` (default: the backend's
    `group_sums_dtype`; float32 with `absolute`); with `absolute`, also float32 sums of |K| per block [NB, Hkv, D]
    (KVStar's channel importance).
    """

    def __init__(
        self,
        shapes: ModelShapes,
        merge: int,
        device: torch.device,
        absolute: bool = False,
        ops: SparseOps | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        bs = shapes.block_size
        if merge < 1 or bs % merge:
            raise ValueError(f"merge={merge} must divide the block size {bs}")
        self.block_size, self.merge, self.groups = bs, merge, bs // merge
        self.device = device
        if ops is None:
            from ucm.ops.reference import TorchReferenceOps

            ops = TorchReferenceOps()
        self.ops = ops
        n, h, d = shapes.num_blocks, shapes.num_kv_heads, shapes.head_dim
        if absolute:
            dtype = torch.float32
        elif dtype is None:
            dtype = ops.group_sums_dtype(device, merge)
        self.sums = torch.zeros(n, self.groups, h, d, dtype=dtype, device=device)
        self.abs_sums = torch.zeros(n, h, d, device=device) if absolute else None

    def add(self, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Accumulate keys [T, Hkv, D] written at slot_mapping [T] (the op contract's
        `block_sums_add`: one native call per layer and step on the CPU backend)."""
        self.ops.block_sums_add(self.sums, self.abs_sums, key, slot_mapping, self.block_size, self.merge)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Sums of blocks `src` into blocks `dst`."""
        src, dst = src.to(self.device, torch.int64), dst.to(self.device, torch.int64)
        byte_view(self.sums).index_copy_(0, dst, byte_view(self.sums).index_select(0, src))
        if self.abs_sums is not None:
            self.abs_sums.index_copy_(0, dst, self.abs_sums.index_select(0, src))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sums, self.abs_sums) if t is not None)


@dataclass
class _RequestState:
    decode_steps: int = 0
    scores: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [U] unit scores
    pending: dict[int, _RowFuture] = field(default_factory=dict)
    # layer -> the top units of this layer's last `sticky_steps` + 1 fresh retrievals (oldest first)
    sticky: dict[int, list[torch.Tensor]] = field(default_factory=dict)


RetrievalListener = Callable[[str, int, torch.Tensor], None]


class SparseMethod:
    """Runs a scorer through the shared selection engine with UCM's retrieval schedule.

    Retrieval (scoring) is due on a request's decode steps 0, s, 2s, ... (s = retrieval_stride).
    Step 0 retrieves synchronously. Later retrievals run asynchronously when s > 1 or the
    scorer scores on the host: started at step t with that step's query, consumed at step
    t + 1; in between, the last consumed scores are reused, with the windows recomputed at the
    current length so new blocks are covered by the local window. A step waits for such a
    retrieval at most `wait_timeout_s` seconds (``UCM_WAIT_TIMEOUT_S``, None: unbounded), then
    raises `WaitTimeout` naming the request and the layer.
    """

    def __init__(
        self,
        name: str,
        scorer: BlockScorer,
        selector: BlockSelector,
        retrieval_stride: int = 1,
        executor: ThreadPoolExecutor | None = None,
        seq_len_threshold: int = 0,
        concurrency_threshold: int | None = None,
        kv_head_combine: str = "sum",
        sticky_steps: int = 0,
        sticky_top: int = 2,
        bound_guard: BlockScorer | None = None,
        bound_guard_top: int = 0,
    ) -> None:
        """Rows shorter than `seq_len_threshold` tokens, and whole steps with fewer than
        `concurrency_threshold` decoding rows, stay dense (None: the engine path's default, 0 here).
        `kv_head_combine`: "sum" ranks blocks by the scorer's score (summed over KV heads); "rank"
        scores every KV head on its own and ranks a block by its best rank in any head
        (`combine_kv_head_ranks`), so a retrieval head's blocks are not outvoted by the other heads
        (scorers with `kv_heads_additive` only; costs one scoring per KV head). `sticky_steps` > 0:
        a layer also keeps (within its budget) the `sticky_top` best units of each of its previous
        `sticky_steps` retrievals, so a block the method ranked first a few steps ago is not lost
        to one step whose query points elsewhere (a long verbatim copy, issue #20). `bound_guard`
        (a scorer fed the same keys, Quest's bound) with `bound_guard_top` > 0: every step, each
        sparse row also keeps (within its budget) the guard's `bound_guard_top` best units for the
        current query."""
        if retrieval_stride < 1:
            raise ValueError(f"retrieval_stride must be >= 1, got {retrieval_stride}")
        if kv_head_combine not in ("sum", "rank"):
            raise ValueError(f"unknown kv_head_combine {kv_head_combine!r}; valid: sum, rank")
        if kv_head_combine != "sum" and not scorer.kv_heads_additive:
            raise ValueError(f"{name}: kv_head_combine={kv_head_combine!r} needs a scorer whose score adds up KV heads")
        self.kv_head_combine = kv_head_combine
        if sticky_steps < 0 or sticky_top < 1:
            raise ValueError(f"sticky_steps ({sticky_steps}) must be >= 0 and sticky_top ({sticky_top}) >= 1")
        self.sticky_steps = sticky_steps
        self.sticky_top = sticky_top
        if bound_guard_top < 0 or (bound_guard_top > 0) != (bound_guard is not None):
            raise ValueError(f"bound_guard_top={bound_guard_top} needs a guard scorer exactly when it is > 0")
        self.bound_guard = bound_guard
        self.bound_guard_top = bound_guard_top
        self.name = name
        self.scorer = scorer
        self.selector = selector
        self.retrieval_stride = retrieval_stride
        self.seq_len_threshold = seq_len_threshold
        self.concurrency_threshold = concurrency_threshold
        self.async_retrieval = retrieval_stride > 1 or scorer.host_scoring
        self._executor = executor
        self._owns_executor = executor is None
        self._executor_threads: list[threading.Thread] = []
        self.wait_timeout_s = wait_timeout_s()
        self._requests: dict[str, _RequestState] = {}
        self._lock = threading.Lock()
        self.retrieval_listeners: list[RetrievalListener] = []
        self.stats = SparsityStats(selector.num_layers)
        # Combines block scores [b, M] across tensor-parallel ranks (each rank scores over its
        # own KV heads; summing makes every rank select what one rank would). Called on the
        # caller's thread, in the same order on every rank.
        self.score_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def shapes(self) -> ModelShapes:
        return self.scorer.shapes

    @property
    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix=self.thread_name, initializer=self._start_thread
            )
        return self._executor

    @property
    def thread_name(self) -> str:
        """Name prefix of the background retrieval thread (it shows in stack dumps)."""
        return f"ucm-{self.name}-retrieval"

    def _start_thread(self) -> None:
        self._executor_threads.append(threading.current_thread())
        self.scorer.ops.prepare_background_thread()

    def close(self) -> None:
        """Cancel pending retrievals and stop the retrieval thread: a running retrieval is waited
        for at most `wait_timeout_s` (then logged and left to finish on its own)."""
        for state in self._requests.values():
            for fut in state.pending.values():
                fut.cancel()
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
            for thread in self._executor_threads:
                thread.join(self.wait_timeout_s)
                if thread.is_alive():
                    log.error(
                        "ucm %s: the retrieval thread %s is still running after %s s (%s); left behind",
                        self.name,
                        thread.name,
                        self.wait_timeout_s,
                        WAIT_TIMEOUT_ENV,
                    )
            self._executor_threads = []

    # --------------------------------------------------------------- lifecycle
    def begin_step(
        self,
        req_ids: Sequence[str],
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        sparse_rows: torch.Tensor | None = None,
    ) -> StepPlan:
        """Plan a decode step for these rows (one row per decoding request)."""
        if len(req_ids) != int(seq_lens.shape[0]) or block_table.shape[0] != len(req_ids):
            raise ValueError(f"{len(req_ids)} req_ids, {seq_lens.shape[0]} seq_lens, {block_table.shape[0]} table rows")
        eligible = seq_lens.to(torch.int64) >= self.seq_len_threshold
        if len(req_ids) < (self.concurrency_threshold or 0):
            eligible = torch.zeros_like(eligible)
        if sparse_rows is not None:
            eligible &= sparse_rows.to(eligible.device, torch.bool)
        plan = self.selector.plan(seq_lens, block_table, eligible)
        plan.req_ids = list(req_ids)
        for rid in req_ids:
            self._requests.setdefault(rid, _RequestState())
        return plan

    def on_kv_written(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        self.scorer.on_kv_written(layer, key, slot_mapping)
        if self.bound_guard is not None:
            self.bound_guard.on_kv_written(layer, key, slot_mapping)

    @property
    def writes_from_caches(self) -> bool:
        """Whether `write_from_caches` can stand for `on_kv_written` of several layers."""
        return self.scorer.writes_from_caches and self.bound_guard is None

    def write_from_caches(
        self, layers: Sequence[int], k_caches: Sequence[torch.Tensor], slot_mapping: torch.Tensor
    ) -> None:
        """`on_kv_written` of `layers`, their keys read from their key caches (`BlockScorer.
        write_from_caches`; no tokens: the op only prepares)."""
        self.scorer.write_from_caches(layers, k_caches, slot_mapping)

    def end_step(self, plan: StepPlan) -> None:
        for rid in plan.req_ids:
            self._requests[rid].decode_steps += 1
        self.stats.record(plan)

    def finish(self, req_id: str) -> None:
        state = self._requests.pop(req_id, None)
        if state:
            for fut in state.pending.values():
                fut.cancel()
        self.scorer.finish(req_id)

    # ------------------------------------------------------------------ select
    def select(self, layer: int, q: torch.Tensor, plan: StepPlan) -> Selection:
        """The blocks layer `layer` reads this step for every row of the plan."""
        if not self.selector.needs_scores(layer):
            return self.selector.select(layer, plan, None)
        prepared = self.scorer.prepare_query(layer, q, plan.req_ids)
        if any(plan.sparse_list):
            scores = self._unit_scores(layer, prepared, plan)
            if self.bound_guard_top:
                scores = self._guard(layer, q, plan, scores)
        else:  # every row is below the thresholds: the budgets already keep all units
            scores = torch.zeros(plan.batch, _max_or_zero(plan.n_units), device=q.device)
        return self.selector.select(layer, plan, scores)

    def _reduces_groups(self, layer: int) -> bool:
        """Ranks exchange the scores of a block's groups (then take each block's best group), not
        the best groups' scores: a block's best group may differ between the ranks' heads."""
        return self.score_reduce is not None and self.scorer.groups_of(layer) > 1 and self.kv_head_combine == "sum"

    def _rank_scores(
        self, layer: int, q: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, rids: Sequence[str]
    ) -> torch.Tensor:
        """What this rank contributes to the ranks' sum (`score_reduce`): its groups' scores where
        `_reduces_groups`, else its block scores."""
        if self._reduces_groups(layer):
            return self.scorer.sub_scores(layer, q, table, lens, rids)
        return self._block_scores(layer, q, table, lens, rids)

    def _reduced(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """The ranks' sum of `_rank_scores` [b, ...] as block scores [b, M]."""
        scores = self.score_reduce(scores)
        return block_max(scores, self.scorer.groups_of(layer)) if self._reduces_groups(layer) else scores

    def _block_scores(
        self, layer: int, q: torch.Tensor, table: torch.Tensor, lens: torch.Tensor, rids: Sequence[str]
    ) -> torch.Tensor:
        """The scorer's block scores [b, M], or with `kv_head_combine="rank"` each KV head's scores
        (its GQA group's queries alone) combined by rank."""
        if self.kv_head_combine == "sum":
            return self.scorer.score(layer, q, table, lens, rids)
        hkv = self.shapes.num_kv_heads
        g = q.shape[1] // hkv
        per_head = []
        for h in range(hkv):
            qh = torch.zeros_like(q)
            qh[:, h * g : (h + 1) * g] = q[:, h * g : (h + 1) * g]
            per_head.append(self.scorer.score(layer, qh, table, lens, rids))
        return combine_kv_head_ranks(torch.stack(per_head, 1))

    @staticmethod
    def _rows(
        q: torch.Tensor, plan: StepPlan, rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Sequence[str]]:
        """(block_table, seq_lens, q, req_ids) of these rows of the plan (no copies for all rows)."""
        if len(rows) == plan.batch:  # every row, in order: no gathering
            return plan.block_table, plan.seq_lens, q, plan.req_ids
        idx = torch.tensor(rows, dtype=torch.long, device=plan.seq_lens.device)
        table = plan.block_table.index_select(0, idx.to(plan.block_table.device))
        qr = q.index_select(0, idx.to(q.device))
        return table, plan.seq_lens.index_select(0, idx), qr, [plan.req_ids[r] for r in rows]

    def _score_rows(self, layer: int, q: torch.Tensor, plan: StepPlan, rows: list[int]) -> torch.Tensor:
        table, lens, qr, rids = self._rows(q, plan, rows)
        if self.score_reduce is not None:
            block_scores = self._reduced(layer, self._rank_scores(layer, qr, table, lens, rids))
        else:
            block_scores = self._block_scores(layer, qr, table, lens, rids)
        return self.selector.unit_scores(block_scores, self.scorer.unit_reduce)

    def _start_async(self, layer: int, q: torch.Tensor, plan: StepPlan, rows: list[int]) -> None:
        idx = torch.tensor(rows, dtype=torch.long)
        q_snap = q.index_select(0, idx.to(q.device)).clone()
        table = plan.block_table.index_select(0, idx.to(plan.block_table.device)).clone()
        lens = plan.seq_lens.index_select(0, idx.to(plan.seq_lens.device)).clone()
        rids = [plan.req_ids[r] for r in rows]

        def work() -> torch.Tensor:
            try:
                if self.score_reduce is not None:  # reduced across ranks when consumed (see _unit_scores)
                    return self._rank_scores(layer, q_snap, table, lens, rids)
                block_scores = self._block_scores(layer, q_snap, table, lens, rids)
                unit = self.selector.unit_scores(block_scores, self.scorer.unit_reduce)
                for i, rid in enumerate(rids):
                    self._notify(rid, layer, unit[i])
                return unit
            except BaseException:
                # logged where it happens: the step that consumes the future re-raises it, but a
                # process that stops first (another rank's failure) would otherwise say nothing
                log.exception("ucm %s: background retrieval failed (layer %d, requests %s)", self.name, layer, rids)
                raise

        fut = self.executor.submit(work)
        holders = [len(rids)]
        for i, rid in enumerate(rids):
            state = self._requests[rid]
            state.pending[layer] = _RowFuture(fut, i, holders, state.decode_steps)

    def _notify(self, rid: str, layer: int, unit_scores: torch.Tensor) -> None:
        for fn in self.retrieval_listeners:
            fn(rid, layer, unit_scores)

    def _late_retrieval(self, rid: str, layer: int, pending: _RowFuture) -> str:
        state = self._requests.get(rid)
        now = state.decode_steps if state is not None else "?"
        return (
            f"ucm {self.name}: request {rid!r}, layer {layer}: its background retrieval (started at its decode "
            f"step {pending.started_step}, waited for at step {now}) did not finish within "
            f"{self.wait_timeout_s:g} s ({WAIT_TIMEOUT_ENV}); it is still running on thread {self.thread_name}"
        )

    def _unit_scores(self, layer: int, q: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        sparse = plan.sparse_list
        sync_rows, async_rows = [], []
        requests = self._requests
        for r, rid in enumerate(plan.req_ids):
            if not sparse[r]:
                continue
            state = requests[rid]
            pending = state.pending.pop(layer, None)
            if pending is not None:
                got = pending.result(self.wait_timeout_s, partial(self._late_retrieval, rid, layer, pending))
                if self.score_reduce is not None:
                    got = self.selector.unit_scores(self._reduced(layer, got[None]), self.scorer.unit_reduce)[0]
                    if self.retrieval_listeners:
                        self._notify(rid, layer, got)
                state.scores[layer] = got
            due = state.decode_steps % self.retrieval_stride == 0
            if layer not in state.scores:
                sync_rows.append(r)
            elif due and self.async_retrieval:
                async_rows.append(r)
            elif due:
                sync_rows.append(r)
        width = _max_or_zero(plan.n_units)
        fresh = None
        if sync_rows:
            fresh = self._score_rows(layer, q, plan, sync_rows)
            for i, r in enumerate(sync_rows):
                rid = plan.req_ids[r]
                requests[rid].scores[layer] = fresh[i]
                if self.retrieval_listeners:
                    self._notify(rid, layer, fresh[i])
        if async_rows:
            self._start_async(layer, q, plan, async_rows)
        if fresh is not None and len(sync_rows) == plan.batch and fresh.shape[1] >= width:
            # every row was scored just now: the scores are the output (no per-row copies)
            out = fresh[:, :width] if fresh.shape[1] > width else fresh
            out = out.to(q.device, torch.float32)
            return self._stick(layer, plan, out.clone(), sync_rows) if self.sticky_steps else out
        out = torch.full((plan.batch, width), -math.inf, device=q.device)
        for r, rid in enumerate(plan.req_ids):
            if not sparse[r]:
                continue
            s = requests[rid].scores[layer]
            n = min(int(s.shape[0]), width)
            out[r, :n] = s[:n]
        return self._stick(layer, plan, out, sync_rows) if self.sticky_steps else out

    def _guard(self, layer: int, q: torch.Tensor, plan: StepPlan, scores: torch.Tensor) -> torch.Tensor:
        """`scores` [B, U] (a copy) with each sparse row's `bound_guard_top` best units by the guard
        scorer, for this step's query q [B, Hq, D], raised to +inf (they take budget slots first)."""
        rows = [r for r, sparse in enumerate(plan.sparse_list) if sparse]
        table, lens, qr, rids = self._rows(q, plan, rows)
        block_scores = self.bound_guard.score(layer, qr, table, lens, rids)
        if self.score_reduce is not None:
            block_scores = self.score_reduce(block_scores)
        units = self.selector.unit_scores(block_scores, self.bound_guard.unit_reduce).to(scores.device)
        out = scores.clone()
        width = out.shape[1]
        for i, r in enumerate(rows):
            row = units[i, :width]
            n = min(self.bound_guard_top, int(torch.isfinite(row).sum()))
            if n:
                top = torch.topk(row, n).indices
                out[r, top] = torch.where(torch.isfinite(out[r, top]), math.inf, out[r, top])
        return out

    def _stick(self, layer: int, plan: StepPlan, out: torch.Tensor, fresh_rows: list[int]) -> torch.Tensor:
        """Raise to +inf, in `out` [B, U] (this step's unit scores, a copy), the units each sparse row
        ranked in its `sticky_top` in any of its previous `sticky_steps` retrievals of this layer; then
        remember this step's top units of the freshly scored rows (from their own scores)."""
        fresh = set(fresh_rows)
        for r, rid in enumerate(plan.req_ids):
            if not plan.sparse_list[r]:
                continue
            hist = self._requests[rid].sticky.setdefault(layer, [])
            if r in fresh:
                row = out[r]
                n = min(self.sticky_top, int(torch.isfinite(row).sum()))
                top = torch.topk(row, n).indices if n else row.new_zeros(0, dtype=torch.long)
                hist.append(top)
                del hist[: -(self.sticky_steps + 1)]  # this step and the `sticky_steps` before it
            for ids in hist[:-1] if r in fresh else hist:  # this step's own top units win by score already
                keep = ids[ids < out.shape[1]]
                out[r, keep] = torch.where(torch.isfinite(out[r, keep]), math.inf, out[r, keep])
        return out


def combine_kv_head_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Per-KV-head block scores [b, H, M] (-inf: not a block) -> one score per block [b, M].

    Each head ranks the blocks (0 = its best); a block's combined score orders by its best rank
    in any head, ties by its mean rank: the top-k then takes the heads' top blocks in turn, so
    every head keeps its own best blocks however its score scale compares with the others'.
    Blocks that are -inf in every head stay -inf."""
    b, h, m = scores.shape
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(m, device=scores.device).expand(b, h, m))
    ranks = ranks.to(torch.float32)
    combined = -(ranks.amin(1) + ranks.mean(1) / (m + 1))
    return torch.where(torch.isfinite(scores).any(1), combined, -math.inf)


class _RowFuture:
    """One row's share of a batched async retrieval.

    The rows of a batch share one future: a finished request gives up its share, and the
    retrieval itself is cancelled only once no row is left waiting for it.
    """

    def __init__(self, fut: Future, row: int, holders: list[int], started_step: int = 0) -> None:
        self._fut, self._row, self._holders = fut, row, holders
        self.started_step = started_step
        self._released = False

    def result(self, timeout: float | None = None, describe: Callable[[], str] | None = None) -> torch.Tensor:
        """This row's scores, waiting at most `timeout` seconds (None: unbounded); then
        `WaitTimeout` with the message `describe()` gives."""
        if timeout is not None and not self._fut.done():
            wait_futures([self._fut], timeout)
            if not self._fut.done():
                raise WaitTimeout(describe() if describe is not None else f"retrieval not done after {timeout:g} s")
        return self._fut.result()[self._row]

    def cancel(self) -> None:
        if self._released:
            return
        self._released = True
        self._holders[0] -= 1
        if self._holders[0] == 0:
            self._fut.cancel()


class SparsityStats:
    """Blocks read vs blocks held, per layer, accumulated over steps (for logs and demos)."""

    def __init__(self, num_layers: int) -> None:
        self.steps = 0
        self.kept = [0] * num_layers
        self.total = [0] * num_layers

    def record(self, plan: StepPlan) -> None:
        self.steps += 1
        for layer, sel in plan.selections.items():
            self.kept[layer] += int(sel.blocks_kept.sum())
            self.total[layer] += int(sel.blocks_total.sum())

    @property
    def fraction_read(self) -> float:
        t = sum(self.total)
        return sum(self.kept) / t if t else 1.0

    def reset(self) -> None:
        self.__init__(len(self.kept))
