"""Worker-side sparse state inside vLLM: one `SparseMethod` per worker, driven per step.

vLLM's attention impl calls in here (through the worker's UCMConnector, never a global):
  * `on_kv_written` from `do_kv_cache_update`, with the keys and slots it is writing;
  * `decode_selection` from `forward`, once per layer, for the batch's decode rows.
The scheduler side tells each step which rows decode for which request: the block that holds a
request's newest token is being written this step, so it belongs to that request alone and
identifies its row in the worker's block table, whatever order the batch is in.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field

import torch

from ucm.config.sparse import MethodConfig
from ucm.integration.vllm.deferred_writes import DeferredWrites
from ucm.ops.contract import SparseOps
from ucm.sparse.base import ModelShapes, SparseMethod
from ucm.sparse.batch_selection import BatchSelector, counters_dict
from ucm.sparse.selection import Selection, StepPlan

logger = logging.getLogger("vllm.ucm")


@dataclass
class StepInfo:
    """What the scheduler says about one step: decoding requests by their newest block."""

    decode_by_last_block: dict[int, str] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    offload_updates: list = field(default_factory=list)  # OffloadUpdate, offload mode only


@dataclass
class DecodeRows:
    rows: torch.Tensor  # [n] batch rows that decode sparsely this step
    plan: StepPlan
    q_index: torch.Tensor | None = None  # [n] int64 token index of each row's query
    covers_batch: bool = False  # rows == 0..B-1: the step decodes every row of the batch
    offloaded: bool = False  # some rows score their middle through virtual ids (offload mode)


@functools.lru_cache(maxsize=4096)
def layer_index(layer_name: str) -> int:
    """'model.layers.12.self_attn.attn' -> 12 (cached: called per layer per step)."""
    nums = [int(p) for p in layer_name.split(".") if p.isdigit()]
    if len(nums) != 1:
        raise ValueError(f"cannot tell the layer index of attention layer {layer_name!r}")
    return nums[0]


def _eligible_requests(plan: StepPlan) -> list[str]:
    return [rid for rid, sparse in zip(plan.req_ids, plan.sparse_list, strict=True) if sparse]


def _tensor_parallel_sum():
    """Sum over the tensor-parallel group (None with one rank): block scores are sums over KV
    heads, and each rank holds a slice of the heads."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_reduce

    try:
        if get_tensor_model_parallel_world_size() == 1:
            return None
    except AssertionError:  # no tensor-parallel group: built outside a vLLM worker, one rank
        return None
    return lambda scores: tensor_model_parallel_all_reduce(scores.contiguous())


class SparseRuntime:
    def __init__(
        self,
        config: MethodConfig,
        num_layers: int,
        model_name: str | None,
        ops_factory,
        device_kind: str = "gpu",
        log_interval_s: float = 10.0,
        model_config_file=None,
        batch_mode: bool = False,
        max_rows: int | None = None,
    ) -> None:
        """`ops_factory()` returns the op backend (resolved lazily, in the worker process).

        `batch_mode`: the attention wrapper selects through `batch_selection` (static shapes, no
        host reads, every step: the path that runs inside CUDA graphs) instead of the
        per-request `decode_selection`. `max_rows` (the engine's most rows a step): lets that path
        keep a row's block scores for the method's `retrieval_stride` steps."""
        self.config = config
        self.num_layers = num_layers
        self.model_name = model_name
        self._ops_factory = ops_factory
        self.device_kind = device_kind
        self.model_config_file = model_config_file
        self.method: SparseMethod | None = None
        self.batch_mode = batch_mode
        self.max_rows = max_rows
        self.batch: BatchSelector | None = None
        self.deferred: DeferredWrites | None = None  # batch mode: one representation write per step
        self._batch_host: LaggedRead | None = None
        self.ops: SparseOps | None = None
        self.offload = None  # OffloadWorker when the config offloads (set by the connector)
        self._step: StepInfo | None = None
        self._rows: DecodeRows | None = None
        self._rows_key: tuple | None = None
        self._step_cache: dict = {}
        self.steps = 0
        self.sparse_steps = 0  # steps whose decode rows went through the sparse method
        self.sparse_rows = 0  # rows of those steps eligible for sparsity (past the method's thresholds)
        self._interval_requests: set[str] = set()  # requests with an eligible row since take_interval_requests()
        self._step_requests_taken = False  # the step in flight already gave its requests to the interval
        self.log_interval_s = log_interval_s
        self._last_log = time.monotonic()
        # test and debugging instruments: objects with on_kv(layer_name, key, value, slots) and
        # on_decode(layer_name, rows, selection, query, output); called only when present
        self.observers: list = []

    # ---------------------------------------------------------------- setup
    def ensure_method(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        num_blocks: int,
        device: torch.device,
        key_dtype: torch.dtype | None = None,
    ) -> SparseMethod:
        if self.method is None:
            from ucm.sparse.factory import build_sparse_method

            self.ops = self._ops_factory()
            if self.offload is not None:  # middle blocks are scored through virtual ids past the device's
                num_blocks += self.offload.extra_blocks(num_blocks)
            shapes = ModelShapes(
                self.num_layers,
                num_q_heads,
                num_kv_heads,
                head_dim,
                block_size,
                num_blocks,
                device,
                key_dtype=key_dtype,
            )
            try:
                self.method = build_sparse_method(
                    self.config,
                    shapes,
                    self.ops,
                    model_name=self.model_name,
                    device_kind=self.device_kind,
                    model_config=self.model_config_file,
                    host_scoring=not self.batch_mode,
                )
            except torch.OutOfMemoryError as e:
                raise RuntimeError(
                    f"ucm: the sparse method's side caches (block representations for {num_blocks} KV blocks x "
                    f"{self.num_layers} layers) do not fit in the memory vLLM left free on {device}: lower "
                    "gpu_memory_utilization, or set blk_repre_inner_token_merge higher (fewer representations "
                    "per block; unset: one per block)"
                ) from e
            self.method.score_reduce = _tensor_parallel_sum()
            if self.batch_mode:
                if self.method.score_reduce is not None:
                    raise NotImplementedError(
                        "ucm's CUDA graph decode path runs on one tensor-parallel rank so far "
                        "(block scores are not summed over ranks there); run with TP=1"
                    )
                self.batch = BatchSelector(self.method, self.max_rows)
                if self.method.writes_from_caches:
                    self.deferred = DeferredWrites(self.method.write_from_caches, self.num_layers - 1)
                if getattr(self.config, "retrieval_stride", 1) > 1:
                    logger.info(
                        "ucm %s: the CUDA graph path scores a row %s",
                        self.method.name,
                        f"every {self.batch.stride} steps (retrieval_stride)"
                        if self.batch.stride > 1
                        else "every step (its scores use a window of queries on the per-request path)",
                    )
            logger.info(
                "ucm %s active: %d layers, %d q / %d kv heads per rank, block %d, %d blocks; side caches %.1f MiB",
                self.method.name,
                self.num_layers,
                num_q_heads,
                num_kv_heads,
                block_size,
                num_blocks,
                self.method.scorer.memory_bytes() / 2**20,
            )
        return self.method

    # ---------------------------------------------------------------- steps
    def begin_step(self, info: StepInfo) -> None:
        if self.method is not None:
            for rid in info.finished:
                self.method.finish(rid)
        if self.offload is not None:
            for rid in info.finished:
                self.offload.drop(rid)
            if info.offload_updates:
                if self.method is None:
                    raise RuntimeError("ucm offload: blocks left the device before the sparse method was built")
                self.offload.apply(info.offload_updates, self.method.scorer.copy_blocks)
        self._step, self._rows, self._rows_key = info, None, None
        self._step_cache = {}
        self._step_requests_taken = False

    def end_step(self) -> None:
        if self._step is None:
            return
        self.steps += 1
        if self._rows is not None and self.method is not None:
            plan = self._rows.plan
            self.method.end_step(plan)
            self.sparse_steps += 1
            self.sparse_rows += sum(plan.sparse_list)
            if not self._step_requests_taken:
                self._interval_requests.update(_eligible_requests(plan))
            self._maybe_log()
        self._step, self._rows, self._rows_key = None, None, None
        self._step_cache = {}

    @property
    def active(self) -> bool:
        return self._step is not None

    def step_cache(self) -> dict:
        """Scratch space that lives for one step (attention wrappers keep per-step derived
        metadata here, e.g. the kernel's scheduler metadata for a length vector)."""
        return self._step_cache

    def decode_rows_cover_batch(self) -> bool:
        """True when this step's sparse rows are the whole batch, in order (pure decode)."""
        return self._rows is not None and self._rows.covers_batch

    # ---------------------------------------------------------------- layers
    def on_kv_written(
        self, layer_name: str, key: torch.Tensor, slot_mapping: torch.Tensor, key_cache: torch.Tensor | None = None
    ) -> None:
        """`key_cache`: the layer's paged key cache [NB, bs, Hkv, D] the keys were just written
        to (where the wrapper can give it): in batch mode the step's writes then wait for its
        last layer and go in one op (`DeferredWrites`)."""
        if self.method is None or (self._step is None and not self.batch_mode):
            return
        layer = layer_index(layer_name)
        if self.deferred is not None and key_cache is not None and self.deferred.defer(layer, key_cache, slot_mapping):
            return
        n = slot_mapping.shape[0]
        self.method.on_kv_written(layer, key[:n], slot_mapping)

    def on_kv_loaded(self, layer: int, key: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Keys of blocks that came from a KV store rather than from the attention layer."""
        if self.method is not None:
            self.method.on_kv_written(layer, key, slot_mapping)

    def batch_selection(
        self,
        layer_name: str,
        query: torch.Tensor,
        attn_metadata,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(block_table, seq_lens) this layer's kernel reads for the whole batch, or None (stock).

        Device work only (safe to capture in a CUDA graph): the step's plan is made at its first
        selecting layer and kept on `attn_metadata`, the object vLLM shares between the layers
        of a step."""
        sel = self.batch
        if sel is None:
            return None
        layer = layer_index(layer_name)
        if not sel.layer_selects(layer) or not sel.batch_selects(int(seq_lens.shape[0])):
            return None
        plan = attn_metadata.__dict__.get("_ucm_plan")
        if plan is None:
            plan = attn_metadata._ucm_plan = sel.plan(
                query_start_loc, seq_lens, block_table, getattr(attn_metadata, "max_query_len", None)
            )
        return sel.select(layer, query, plan)

    def batch_max_len(self, layer_name: str, max_seq_len: int, max_query_len: int | None) -> int:
        """A host upper bound of the lengths `batch_selection` gives this layer in a step whose
        longest row has `max_seq_len` tokens (`BatchSelector.max_len`)."""
        return self.batch.max_len(layer_index(layer_name), max_seq_len, max_query_len)

    def decode_selection(
        self,
        layer_name: str,
        query: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        block_size: int,
    ) -> tuple[torch.Tensor, Selection] | None:
        """(decode rows, their selection) for this layer, or None when the step stays dense."""
        if self._step is None or self.method is None:
            return None
        rows = self._decode_rows(query_start_loc, seq_lens, block_table, block_size)
        if rows is None:
            return None
        q = query.index_select(0, self._rows.q_index)  # a copy: scorers may keep it past this step
        layer = layer_index(layer_name)
        sel = self.method.select(layer, q, self._rows.plan)
        if self._rows.offloaded:
            plan = self._rows.plan
            sel = self.offload.resolve(layer, plan.req_ids, sel, plan.seq_lens, block_size)
        return rows, sel

    def _decode_rows(self, query_start_loc, seq_lens, block_table, block_size) -> torch.Tensor | None:
        key = (query_start_loc.data_ptr(), seq_lens.data_ptr(), block_table.data_ptr(), int(seq_lens.shape[0]))
        if self._rows_key == key:
            return self._rows.rows if self._rows is not None else None
        self._rows_key, self._rows = key, None
        info = self._step
        if not info.decode_by_last_block:
            return None
        qlens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
        lens = seq_lens.tolist()
        rows, rids = [], []
        for r, (ql, n) in enumerate(zip(qlens, lens, strict=True)):
            if ql != 1 or n <= 0:
                continue
            rid = info.decode_by_last_block.get(int(block_table[r, (n - 1) // block_size]))
            if rid is not None:
                rows.append(r)
                rids.append(rid)
        if not rows:
            return None
        idx = torch.tensor(rows, dtype=torch.int64, device=seq_lens.device)
        table = block_table.index_select(0, idx)
        offloaded = False
        if self.offload is not None and self.offload.requests:
            for r, rid in enumerate(rids):
                req = self.offload.requests.get(rid)
                if req is not None:
                    req.scoring_row(table[r])
                    offloaded = True
        plan = self.method.begin_step(rids, seq_lens.index_select(0, idx), table)
        q_index = query_start_loc.index_select(0, idx).to(torch.int64)
        self._rows = DecodeRows(idx, plan, q_index, covers_batch=rows == list(range(len(lens))), offloaded=offloaded)
        return idx

    def notify_kv(self, layer_name: str, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]
        for ob in self.observers:
            ob.on_kv(layer_name, key[:n], value[:n], slot_mapping)

    def notify_decode(
        self,
        layer_name: str,
        rows: torch.Tensor,
        sel: Selection,
        query: torch.Tensor,
        query_start_loc: torch.Tensor,
        output: torch.Tensor,
    ) -> None:
        at = query_start_loc.index_select(0, rows).to(torch.int64)
        for ob in self.observers:
            ob.on_decode(layer_name, rows, sel, query.index_select(0, at), output.index_select(0, at))

    # ---------------------------------------------------------------- stats
    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._last_log < self.log_interval_s:
            return
        self._last_log = now
        st = self.method.stats
        per_layer = " ".join(f"{k}/{t}" for k, t in zip(st.kept, st.total, strict=True) if t)
        logger.info(
            "ucm %s: %d sparse decode steps; blocks read %.1f%% of held; kept/total per layer: %s",
            self.method.name,
            st.steps,
            100 * st.fraction_read,
            per_layer,
        )

    def counters(self) -> dict:
        """Cumulative counters, the step in flight included as far as it has run (its layers
        selected so far): steps, sparse_steps, sparse_rows, kept/total blocks per layer.

        vLLM asks the connector for its stats after the forward pass and before the step ends;
        counting the step in flight there (without ending it) lets every step be reported in
        the step that ran it. Differences of two calls never count a step twice: a step counted
        in flight is part of both later totals.
        """
        if self.batch is not None:
            return self._batch_counters()
        st = self.method.stats if self.method is not None else None
        kept = list(st.kept) if st else []
        total = list(st.total) if st else []
        steps, sparse_steps, sparse_rows = self.steps, self.sparse_steps, self.sparse_rows
        if self._step is not None:
            steps += 1
        if self._step is not None and self._rows is not None and self.method is not None:
            plan = self._rows.plan
            sparse_steps += 1
            sparse_rows += sum(plan.sparse_list)
            layers = list(plan.selections)
            if layers:  # one host read for all layers
                sums = torch.stack(
                    [
                        torch.stack([plan.selections[i].blocks_kept.sum(), plan.selections[i].blocks_total.sum()])
                        for i in layers
                    ]
                ).tolist()
                for i, (k, t) in zip(layers, sums, strict=True):
                    kept[i] += int(k)
                    total[i] += int(t)
        return {"steps": steps, "sparse_steps": sparse_steps, "sparse_rows": sparse_rows, "kept": kept, "total": total}

    def _batch_counters(self) -> dict:
        """The batch path's device counters, read without waiting for the device (see
        `LaggedRead`): a step is reported one call late, never twice."""
        if self._batch_host is None:
            self._batch_host = LaggedRead([self.batch.blocks, self.batch.rows])
        return {"steps": self.steps + (self._step is not None), **counters_dict(*self._batch_host.read())}

    def take_interval_requests(self) -> set[str]:
        """Ids of the requests that had an eligible (sparse) decode row since the last call, the
        step in flight included; each step's requests go to exactly one call."""
        out, self._interval_requests = self._interval_requests, set()
        if self._step is not None and self._rows is not None and not self._step_requests_taken:
            out.update(_eligible_requests(self._rows.plan))
            self._step_requests_taken = True
        return out

    def snapshot(self) -> dict:
        """Counters for tests and metrics: steps, blocks kept/total per layer."""
        if self.batch is not None:
            got = self.batch.counters_to_host()
            return {"method": self.method.name, "steps": self.steps, **got}
        st = self.method.stats if self.method is not None else None
        return {
            "method": self.method.name if self.method else None,
            "steps": self.steps,
            "sparse_steps": self.sparse_steps,
            "sparse_rows": self.sparse_rows,
            "kept": list(st.kept) if st else [],
            "total": list(st.total) if st else [],
        }


class LaggedRead:
    """Device tensors read on the host without a synchronisation: each `read` starts an
    asynchronous copy into pinned memory and returns the newest copy that has landed (zeros
    before the first). Host tensors are read directly."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.on_device = tensors[0].device.type == "cuda"
        self.last = [torch.zeros_like(t, device="cpu").tolist() for t in tensors]
        if self.on_device:
            self.host = [torch.empty_like(t, device="cpu").pin_memory() for t in tensors]
            self.event = None

    def read(self) -> list:
        if not self.on_device:
            return [t.tolist() for t in self.tensors]
        if self.event is None or self.event.query():
            if self.event is not None:
                self.last = [h.tolist() for h in self.host]
            for h, t in zip(self.host, self.tensors, strict=True):
                h.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        return self.last
