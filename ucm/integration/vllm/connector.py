"""UCMConnector: ucm's KV connector for vLLM V1.

    kv_transfer_config = {"kv_connector": "UCMConnector",
                          "kv_connector_module_path": "ucm.integration.vllm.connector",
                          "kv_role": "kv_both",
                          "kv_connector_extra_config": {"ucm_sparse_config": {"ESA": {...}}}}

The config is validated in the constructor, so a bad key fails the engine at start. The
scheduler-side instance tells the workers, every step, which request decodes in which row
(by the block holding its newest token); the worker-side instance owns the `SparseRuntime`
that ucm's attention wrappers drive. Storing and loading KV (the "KV store" issue) is not part
of this connector yet: store settings are validated and otherwise ignored, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from ucm.config.errors import ConfigError
from ucm.config.sparse import GSAOnDeviceConfig
from ucm.integration.vllm.extra_config import parse_extra_config
from ucm.sparse.factory import resolve_model_config
from ucm.integration.vllm.runtime import SparseRuntime, StepInfo
from ucm.integration.vllm.version import check_vllm_version

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


@dataclass
class _Tracked:
    blocks: list[int]
    prompt_len: int


def _device_kind() -> str:
    try:
        from vllm.platforms import current_platform

        return "npu" if current_platform.device_type == "npu" else "gpu"
    except Exception:  # a platform without device_type: the gpu_* thresholds apply
        return "gpu"


class UCMConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        check_vllm_version()
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self.ucm_config = parse_extra_config(extra)
        if self.ucm_config.stores and role == KVConnectorRole.SCHEDULER:
            logger.warning("ucm: KV store connectors are validated but not active yet (no offload/prefix store)")
        self.block_size = vllm_config.cache_config.block_size
        self.model_config_file = None
        if isinstance(self.ucm_config.sparse, GSAOnDeviceConfig):  # resolve its model JSON now, not mid-forward
            self.model_config_file = resolve_model_config(self.ucm_config.sparse, str(vllm_config.model_config.model))
            layers = vllm_config.model_config.get_total_num_hidden_layers()
            if self.model_config_file.config.num_hidden_layers != layers:
                raise ConfigError(self.model_config_file.source, "num_hidden_layers",
                                  f"{self.model_config_file.config.num_hidden_layers} but the served model has {layers}")
        self._tracked: dict[str, _Tracked] = {}
        self.runtime: SparseRuntime | None = None
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
            )

    # ---------------------------------------------------------------- worker
    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.runtime is not None and isinstance(connector_metadata, UCMConnectorMetadata):
            self.runtime.begin_step(StepInfo(connector_metadata.decode_by_last_block, connector_metadata.finished))

    def clear_connector_metadata(self) -> None:
        if self.runtime is not None:
            self.runtime.end_step()
        super().clear_connector_metadata()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    # ------------------------------------------------------------- scheduler
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = UCMConnectorMetadata(finished=sorted(scheduler_output.finished_req_ids))
        for rid in scheduler_output.finished_req_ids:
            self._tracked.pop(rid, None)
        if self.ucm_config.sparse is None:
            return meta
        computed: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            prompt = len(new.prompt_token_ids) if new.prompt_token_ids is not None else 0
            self._tracked[new.req_id] = _Tracked(list(new.block_ids[0]), prompt)
            computed[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            tracked = self._tracked.get(rid)
            if tracked is None:
                continue
            new_ids = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                tracked.blocks = list(new_ids[0]) if new_ids is not None else []
            elif new_ids is not None:
                tracked.blocks.extend(new_ids[0])
            computed[rid] = cached.num_computed_tokens[i]
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
        return False, None


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
