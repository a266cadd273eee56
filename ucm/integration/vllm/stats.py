"""ucm's counters in vLLM's own stats: a `KVConnectorStats` for UCMConnector.

Where the numbers go (vLLM 0.32): after every forward pass the model runner asks the worker's
connector for `get_kv_connector_stats()`; under tensor parallelism the executor combines the
ranks' objects with `aggregate`; the scheduler ships `to_dict()` in its `SchedulerStats`; in the
front-end process vLLM rebuilds the object with `UCMConnector.build_kv_connector_stats(data)`,
`aggregate`s the steps of a logging interval and logs `reduce()` as the line
`KV Transfer metrics: ucm sparse requests=..., ucm blocks read %=..., ...` next to its
throughput line (every `VLLM_LOG_STATS_INTERVAL` seconds when stats logging is on: the server's
default, `LLM(..., disable_log_stats=False)` offline).

Payload (`data`, plain JSON-like values so it crosses process boundaries as msgpack):

    {"ranks": {"<tp rank>": {"method": "ESA", "sparse_steps": int, "sparse_rows": int,
                             "kept": [int per layer], "total": [int per layer],
                             "store": {"loaded_blocks": int, "dumped_blocks": int, "failed_loads": int,
                                       "failed_dumps": int, "offload_loaded_blocks": int}}},  # with a store
     "requests": [request ids with a sparse decode row]}

Tensor parallelism: every rank selects the same blocks (block scores are summed over the ranks
before top-k) and dumps/loads its own slice of the same blocks, so summing the ranks would
count each step, row and block once per rank. `aggregate` therefore keeps one entry per rank
(summing only within a rank, i.e. over steps) and `reduce` reports the lowest rank's sparsity
and store traffic; store *failures* are summed over the ranks (a rank whose slice failed is a
failure whoever else succeeded). Request ids are a union.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

STORE_COUNTERS = ("loaded_blocks", "dumped_blocks", "failed_loads", "failed_dumps", "offload_loaded_blocks")
_SCALARS = ("sparse_steps", "sparse_rows")


def _add_lists(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip_longest(a, b, fillvalue=0)]


def _merge_rank(mine: dict[str, Any], other: dict[str, Any]) -> None:
    """Add one rank's counters of another interval (or step) into `mine`, in place."""
    if not mine.get("method"):
        mine["method"] = other.get("method")
    for key in _SCALARS:
        mine[key] = mine.get(key, 0) + other.get(key, 0)
    for key in ("kept", "total"):
        mine[key] = _add_lists(mine.get(key, []), other.get(key, []))
    if "store" in other:
        store = mine.setdefault("store", dict.fromkeys(STORE_COUNTERS, 0))
        for key in STORE_COUNTERS:
            store[key] = store.get(key, 0) + other["store"].get(key, 0)


def _rank_is_empty(r: dict[str, Any]) -> bool:
    return (
        not any(r.get(k, 0) for k in _SCALARS)
        and not any(r.get("total", []))
        and not any((r.get("store") or {}).values())
    )


@dataclass
class UCMKVConnectorStats(KVConnectorStats):
    """Counters of one interval: sparse decode steps and rows, distinct requests sparsed, blocks
    kept/total per layer, and the KV store's block traffic when a store is attached."""

    def __post_init__(self) -> None:
        if "ranks" not in self.data:
            self.reset()
        self.data.setdefault("requests", [])

    def reset(self) -> None:
        self.data = {"ranks": {}, "requests": []}

    @property
    def ranks(self) -> dict[str, dict[str, Any]]:
        return self.data["ranks"]

    def aggregate(self, other: KVConnectorStats) -> UCMKVConnectorStats:
        """Sum over steps and intervals within a rank (per-layer lists elementwise), keep ranks
        apart, union the request ids. Mutates and returns self (as vLLM's accumulators expect);
        never aliases `other`'s lists."""
        if not isinstance(other, UCMKVConnectorStats):
            raise TypeError(f"cannot aggregate UCMKVConnectorStats with {type(other).__name__}")
        for rank, counters in other.ranks.items():
            if rank in self.ranks:
                _merge_rank(self.ranks[rank], counters)
            else:
                self.ranks[rank] = copy.deepcopy(counters)
        if other.data["requests"]:
            self.data["requests"] = sorted(set(self.data["requests"]) | set(other.data["requests"]))
        return self

    def is_empty(self) -> bool:
        return not self.data["requests"] and all(_rank_is_empty(r) for r in self.ranks.values())

    def reduce(self) -> dict[str, int | float]:
        """A few readable numbers for the interval (the lowest rank's, see the module doc):
        sparse decode steps and rows, distinct requests, blocks read as a % of the blocks held
        (all layers, then the least and most read layer), and the store's traffic."""
        if not self.ranks:
            return {"ucm sparse requests": len(self.data["requests"])}
        first = self.ranks[min(self.ranks, key=int)]
        kept, total = first.get("kept", []), first.get("total", [])
        out: dict[str, int | float] = {
            "ucm sparse decode steps": first.get("sparse_steps", 0),
            "ucm sparse rows": first.get("sparse_rows", 0),
            "ucm sparse requests": len(self.data["requests"]),
        }
        if sum(total):
            per_layer = [100.0 * k / t for k, t in zip(kept, total, strict=True) if t]
            out["ucm blocks read %"] = round(100.0 * sum(kept) / sum(total), 1)
            out["ucm min layer read %"] = round(min(per_layer), 1)
            out["ucm max layer read %"] = round(max(per_layer), 1)
        stores = [r["store"] for r in self.ranks.values() if "store" in r]
        if stores:
            mine = first.get("store", {})
            out["ucm store loaded blocks"] = mine.get("loaded_blocks", 0)
            out["ucm store dumped blocks"] = mine.get("dumped_blocks", 0)
            out["ucm store failed loads"] = sum(s.get("failed_loads", 0) for s in stores)
            out["ucm store failed dumps"] = sum(s.get("failed_dumps", 0) for s in stores)
            if any(s.get("offload_loaded_blocks") for s in stores):
                out["ucm offload loaded blocks"] = mine.get("offload_loaded_blocks", 0)
        if len(self.ranks) > 1:
            out["ucm tp ranks"] = len(self.ranks)
        return out


class StatsCursor:
    """The worker side: turns the runtime's and the store's cumulative counters into the delta
    since the previous call (one call per step, from `UCMConnector.get_kv_connector_stats`)."""

    def __init__(self, rank: int = 0) -> None:
        self.rank = rank
        self._runtime_prev: dict[str, Any] = {"sparse_steps": 0, "sparse_rows": 0, "kept": [], "total": []}
        self._store_prev: dict[str, int] = dict.fromkeys(STORE_COUNTERS, 0)

    def take(self, runtime=None, store=None) -> UCMKVConnectorStats | None:
        """The counters since the last call, or None when nothing happened (vLLM then ships no
        connector stats for the step)."""
        counters: dict[str, Any] = {}
        requests: list[str] = []
        if runtime is not None:
            now = runtime.counters()
            prev = self._runtime_prev
            counters["method"] = runtime.method.name if runtime.method is not None else None
            for key in _SCALARS:
                counters[key] = now[key] - prev[key]
            for key in ("kept", "total"):
                counters[key] = [a - b for a, b in zip_longest(now[key], prev[key], fillvalue=0)]
            self._runtime_prev = {k: now[k] for k in (*_SCALARS, "kept", "total")}
            requests = sorted(runtime.take_interval_requests())
        if store is not None:
            snap = store.snapshot()
            counters["store"] = {k: int(snap[k]) - self._store_prev[k] for k in STORE_COUNTERS}
            self._store_prev = {k: int(snap[k]) for k in STORE_COUNTERS}
        if not requests and _rank_is_empty(counters):
            return None
        return UCMKVConnectorStats(data={"ranks": {str(self.rank): counters}, "requests": requests})
