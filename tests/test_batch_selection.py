"""The CUDA-graph decode path's selection (`BatchSelector`) against the per-request engine.

For the same written keys and queries, every decoding row of a mixed batch must keep exactly
the blocks (and read exactly the length) that `SparseMethod.select` gives it, for every method,
on the torch reference and on the CUDA backend's kernels (Triton's interpreter on a CPU);
prefill rows, rows under the length threshold and padding rows keep their own table. Shapes
stay static and the counters count what was kept.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (see test_cuda_kernels)

from tests.test_algorithms import hata_model
from ucm.methods import DemoRequest, get_method, method_names
from ucm.ops.reference import TorchReferenceOps
from ucm.sparse.base import ModelShapes
from ucm.sparse.batch_selection import BATCH_MIN_ROWS, BatchSelector
from ucm.sparse.factory import build_sparse_method

BS, LAYERS, HQ, HKV, D, NB = 4, 3, 4, 2, 32, 96
WINDOWED = {"init_window_sz": 1, "local_window_sz": 1, "sparse_ratio": 0.3, "min_blocks": 2, "retrieval_stride": 1}


def method_config(name: str, **keys) -> dict:
    """`name` with its demo settings (`MethodSpec.demo_config`) and small windows (and `keys`); a
    windowed method keeps layer 1 dense (a per-model JSON method: its JSON's, `hata_model` below)."""
    spec = get_method(name)
    if spec.model_json:
        return {name: {}}
    body = spec.demo_config(DemoRequest(0.3, dense_layers=(1,), retrieval_stride=1))
    return {name: {**body, **WINDOWED, **keys}}


def backends():
    out = [pytest.param(TorchReferenceOps(), id="reference")]
    if importlib.util.find_spec("triton") is not None:
        from ucm_backends.cuda.ops import CudaOps

        out.append(pytest.param(CudaOps(interpret=not torch.cuda.is_available()), id="cuda"))
    return out


def build(name: str, ops, shapes: ModelShapes, host_scoring: bool, **keys):
    model = hata_model(LAYERS, [0.3, 1.0, 0.3], head_dim=D, chunk_size=BS) if get_method(name).model_json else None
    return build_sparse_method(
        {"ucm_sparse_config": method_config(name, **keys)},
        shapes,
        ops,
        host_ops=TorchReferenceOps(),
        model_config=model,
        host_scoring=host_scoring,
    )


@pytest.mark.parametrize("ops", backends())
@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("uniform", [False, True])
def test_batch_selection_equals_the_per_request_engine(ops, name, uniform) -> None:
    check_batch_equals_engine(ops, name, uniform)


@pytest.mark.parametrize("ops", backends())
@pytest.mark.parametrize("name", ["ESA", "GSA", "Quest"])
def test_sub_block_batch_selection_equals_the_per_request_engine(ops, name) -> None:
    """The same with blocks scored by groups of 2 tokens (at this block size of 4 the default
    group of 4 is the whole block)."""
    check_batch_equals_engine(ops, name, False, blk_repre_inner_token_merge=2)


def check_batch_equals_engine(ops, name: str, uniform: bool, **keys) -> None:
    dev = torch.device("cpu")
    shapes = ModelShapes(LAYERS, HQ, HKV, D, BS, NB, dev)
    g = torch.Generator().manual_seed(7)
    # rows: decode, decode, decode (short: under every budget), prefill (4 tokens), padding
    lens = torch.tensor([37, 50, 6, 23, 0])
    qlens = torch.tensor([1, 1, 1, 1, 0]) if uniform else torch.tensor([1, 1, 1, 4, 0])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), qlens.cumsum(0)]).to(torch.int32)
    m = 14
    table = torch.randperm(NB, generator=g)[: 5 * m].view(5, m).to(torch.int32)
    if name in ("ESA", "GSA"):  # both paths keep the batch backend's group sums (CUDA: float8 / bf16)
        merge = keys.get("blk_repre_inner_token_merge", 4)
        keys = {**keys, "blk_repre_dtype": str(ops.group_sums_dtype(dev, merge)).removeprefix("torch.")}
    batch_method = build(name, ops, shapes, host_scoring=False, **keys)
    engine = build(name, TorchReferenceOps(), shapes, host_scoring=True, **keys)  # the per-request path, reference ops
    for layer in range(LAYERS):
        for r in range(4):
            n = int(lens[r])
            slots = table[r, torch.arange(n) // BS].long() * BS + torch.arange(n) % BS
            keys = torch.randn(n, HKV, D, generator=g)
            for method in (batch_method, engine):
                method.on_kv_written(layer, keys, slots)
    query = torch.randn(int(qsl[-1]) + 2, HQ, D, generator=g)  # + padding tokens, as vLLM pads
    sel = BatchSelector(batch_method)
    plan = sel.plan(qsl, lens.to(torch.int32), table, max_query_len=1 if uniform else int(qlens.max()))
    decode = [0, 1, 2] + ([3] if uniform else [])
    q_rows = (qsl[1:] - 1).long()[decode]
    step = engine.begin_step([f"r{r}" for r in decode], lens[decode], table[decode])
    for layer in range(LAYERS):
        if not sel.layer_selects(layer):
            continue
        got_table, got_lens = sel.select(layer, query, plan)
        assert got_table.shape == table.shape and got_lens.shape == lens.shape
        bound = sel.max_len(layer, int(lens.max()), 1 if uniform else int(qlens.max()))
        assert int(got_lens.max()) <= bound <= int(lens.max())
        want = engine.select(layer, query[q_rows], step)
        for i, r in enumerate(decode):
            n = int(want.blocks_kept[i])
            assert got_table[r, :n].tolist() == want.block_table[i, :n].tolist(), (name, layer, r)
            assert int(got_lens[r]) == int(want.seq_lens[i])
        assert int(got_lens[0]) < int(lens[0]) and int(got_lens[1]) < int(lens[1])  # long rows are cut
        for r in ([] if uniform else [3]) + [2]:  # prefill and short rows: their own table and length
            nb = (int(lens[r]) + BS - 1) // BS
            assert got_table[r, :nb].tolist() == table[r, :nb].tolist() and int(got_lens[r]) == int(lens[r])
        assert int(got_lens[4]) == 0
    counters = sel.counters_to_host()
    rows = len(decode)
    assert counters["sparse_steps"] == 1 and counters["sparse_rows"] == rows
    held = int(((lens[decode] + BS - 1) // BS).sum())
    assert counters["total"] == [held] * LAYERS
    assert all(0 < k <= held for k in counters["kept"]) and min(counters["kept"]) < held


@settings(max_examples=60, deadline=None)
@given(
    ratio=st.sampled_from([0.05, 0.1, 0.3, 0.5, 0.999]),
    init=st.integers(0, 3),
    local=st.integers(0, 3),
    min_blocks=st.integers(0, 6),
    threshold=st.sampled_from([0, 9, 33]),
    lens=st.lists(st.integers(0, 14 * BS), min_size=1, max_size=6),
)
def test_max_len_bounds_every_length_a_decode_step_reads(ratio, init, local, min_blocks, threshold, lens) -> None:
    """The host bound FA3 sizes its work by is never below a length the selection gives, whatever
    the rows' lengths, and it is below the batch's own bound once rows are long."""
    shapes = ModelShapes(LAYERS, HQ, HKV, D, BS, NB)
    body = {
        "init_window_sz": init,
        "local_window_sz": local,
        "sparse_ratio": ratio,
        "min_blocks": min_blocks,
        "retrieval_stride": 1,
        "dense_layers": [1],
        "concurrency_threshold": 1,
    }
    method = build_sparse_method({"ucm_sparse_config": {"ESA": body}}, shapes, TorchReferenceOps())
    method.seq_len_threshold = threshold
    sel = BatchSelector(method)
    b, m = len(lens), 14
    seq = torch.tensor(lens, dtype=torch.int32)
    table = torch.arange(b * m, dtype=torch.int32).view(b, m) % NB
    qsl = torch.arange(b + 1, dtype=torch.int32)
    plan = sel.plan(qsl, seq, table, max_query_len=1)
    query = torch.randn(b, HQ, D)
    longest = max(lens)
    for layer in (0, 2):
        _, got = sel.select(layer, query, plan)
        bound = sel.max_len(layer, longest, 1)
        assert int(got.max()) <= bound <= longest
        if longest == m * BS and ratio <= 0.3 and init + local + 1 + min_blocks < 0.3 * m and threshold < BS * m // 2:
            assert bound < longest
        assert sel.max_len(layer, longest, 4) == longest  # mixed steps: prefill rows keep their length


def test_small_batches_stay_dense_unless_the_method_says_otherwise() -> None:
    shapes = ModelShapes(LAYERS, HQ, HKV, D, BS, NB)
    default = BatchSelector(build("ESA", TorchReferenceOps(), shapes, host_scoring=False))
    assert [default.batch_selects(n) for n in range(1, 4)] == [n >= BATCH_MIN_ROWS for n in range(1, 4)]
    cfg = {"ucm_sparse_config": {"ESA": {**WINDOWED, "concurrency_threshold": 1}}}
    one = BatchSelector(build_sparse_method(cfg, shapes, TorchReferenceOps()))
    assert one.batch_selects(1)
    assert not default.layer_selects(1) and default.layer_selects(0)  # ESA's dense layer


def test_host_scoring_gsa_cannot_run_in_a_batch() -> None:
    shapes = ModelShapes(LAYERS, HQ, HKV, D, BS, NB)
    with pytest.raises(ValueError, match="cannot score a batch without host reads"):
        BatchSelector(build("GSA", TorchReferenceOps(), shapes, host_scoring=True))


def expected_blocks(scores: torch.Tensor, k: int, must: torch.Tensor, n: int) -> list[int]:
    """Logical blocks a row keeps: its forced blocks, then the best others up to k (ties and -inf:
    lower index first), in ascending order (`SparseOps.block_topk`'s contract, in plain Python)."""
    forced = [j for j in range(n) if bool(must[j])]
    others = sorted((j for j in range(n) if not bool(must[j])), key=lambda j: (-float(scores[j]), j))
    return sorted(forced + others[: max(k - len(forced), 0)])


@pytest.mark.parametrize("ops", backends())
def test_retrieval_stride_keeps_a_rows_scores_until_it_is_due(ops) -> None:
    """With a stride of 3 a decode row is scored on its steps 0, 3, 6 and in between keeps the
    blocks those scores rank best, its forced blocks and budget taken at its current length (the
    table of the step before when its block count did not change, else ranked again); the scorer
    is told which rows keep their scores; a row whose request changes (rows swapped, a new
    request in the row) is scored at once."""
    dev = torch.device("cpu")
    shapes = ModelShapes(LAYERS, HQ, HKV, D, BS, NB, dev)
    g = torch.Generator().manual_seed(11)
    keys = {"blk_repre_dtype": str(ops.group_sums_dtype(dev, BS)).removeprefix("torch."), "retrieval_stride": 3}
    method = build("ESA", ops, shapes, host_scoring=False, **keys)
    sel = BatchSelector(method, max_rows=8)
    assert sel.stride == 3 and BatchSelector(method).stride == 1  # no max_rows: every step scores
    calls: list[torch.Tensor] = []
    scorer_scores, scores_into = method.scorer.batch_scores, method.scorer.batch_scores_into

    def spy(layer, q, table, lens, out, keep_rows):  # the real scorer; records the rows it may skip
        calls.append(keep_rows.clone())
        return scores_into(layer, q, table, lens, out, keep_rows)

    method.scorer.batch_scores_into = spy
    m, rows = 16, 3
    table = torch.randperm(NB, generator=g)[: rows * m].view(rows, m).to(torch.int32)
    lens = torch.tensor([37, 50, 45])
    written = torch.zeros(rows, dtype=torch.long)

    def write_up_to(n: torch.Tensor) -> None:
        for r in range(rows):
            pos = torch.arange(int(written[r]), int(n[r]))
            slots = table[r, pos // BS].long() * BS + pos % BS
            for layer in range(LAYERS):
                method.on_kv_written(layer, torch.randn(len(pos), HKV, D, generator=g), slots)
            written[r] = n[r]

    scored_at: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # row -> (query, table, full lens)
    for step in range(8):
        if step == 4:  # rows 0 and 1 swap (another request in each row): both are scored again
            table, lens, written = table[[1, 0, 2]], lens[[1, 0, 2]], written[[1, 0, 2]]
            scored_at = {0: scored_at[1], 1: scored_at[0], 2: scored_at[2]}
        write_up_to(lens)
        query = torch.randn(rows, HQ, D, generator=g)
        qsl = torch.arange(rows + 1, dtype=torch.int32)
        plan = sel.plan(qsl, lens.to(torch.int32), table, max_query_len=1)
        due = [(step - 4) % 3 == 0 if r < 2 and step >= 4 else step % 3 == 0 for r in range(rows)]
        assert plan.reuse.tolist() == [not d for d in due], step
        # a row that keeps its scores and its block count keeps last step's tables (no ranking)
        same = [not due[r] and step > 0 and (lens[r] - 1) // BS == (lens[r] - 2) // BS for r in range(rows)]
        assert plan.same_table.tolist() == same, step
        full = (lens // BS) * BS
        for r in range(rows):
            if due[r]:
                scored_at[r] = (query[r], table[r].clone(), full[r].clone())
        calls.clear()
        for layer in (0, 2):  # ESA's sparse layers (1 is dense)
            got_table, got_lens = sel.select(layer, query, plan)
            assert calls[-1].tolist() == [not d for d in due]  # the kernel reads nothing for these
            k, must, want_lens = sel._budgets(sel.policies[layer], plan)
            for r in range(rows):
                q0, t0, n0 = scored_at[r]
                scores = scorer_scores(layer, q0[None], t0[None], n0[None])[0]
                n = int((lens[r] + BS - 1) // BS)
                want = expected_blocks(scores, int(k[r]), must[r], n)
                assert got_table[r, : len(want)].tolist() == table[r, want].tolist(), (step, layer, r)
                assert int(got_lens[r]) == int(want_lens[r])
        lens = lens + 1
    fresh = table.clone()
    fresh[2] = torch.randperm(NB, generator=g)[:m].to(torch.int32)  # a new request in row 2, same length
    plan = sel.plan(torch.arange(rows + 1, dtype=torch.int32), lens.to(torch.int32), fresh, max_query_len=1)
    assert plan.reuse.tolist() == [True, True, False]
