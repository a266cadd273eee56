"""The four methods on planted data, at ratio 1.0 against dense attention, and the shared
selection engine's rules (windows, budgets, reuse, dense layers, thresholds, strides)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.paged import make_paged
from ucm.config.errors import ConfigError
from ucm.methods import DemoRequest, get_method, method_names
from ucm.ops import TorchReferenceOps
from ucm.sparse.base import ModelShapes, SparseMethod
from ucm.sparse.factory import build_sparse_method

OPS = TorchReferenceOps()
BS = 8


def hata_model(layers: int, ratios=None, reuse=None, **over) -> dict:
    cfg = {
        "model_name": "test/tiny",
        "is_mla": False,
        "hash_weight_type": "random",
        "num_hidden_layers": layers,
        "gpu_seq_len_threshold": 0,
        "gpu_concurrency_threshold": 0,
        "npu_seq_len_threshold": 0,
        "npu_concurrency_threshold": 0,
        "chunk_size": BS,
        "chunk_repre_method": "max",
        "head_dim": 32,
        "hash_bits": 128,
        "top_k_ratio_per_layer": ratios or [0.25] * layers,
        "top_k_index_reuse": reuse or [-1] * layers,
        "must_select_blocks": [0, -1],
    }
    cfg.update(over)
    return cfg


def method_config(name: str, ratio: float = 0.25) -> dict:
    """`name`'s config for these tests: its demo settings (`MethodSpec.demo_config`) with the
    smallest windows, retrieving every step; a per-model JSON method's JSON is passed apart."""
    spec = get_method(name)
    if spec.model_json:
        return {name: {}}
    body = spec.demo_config(DemoRequest(ratio, retrieval_stride=1))
    body.update(init_window_sz=1, local_window_sz=1, min_blocks=1)
    return {name: body}


def build(name: str, shapes: ModelShapes, ratio: float | None = None, **model_over) -> SparseMethod:
    cfg = method_config(name, 0.25 if ratio is None else ratio)
    if get_method(name).model_json:
        ratios = [ratio or 0.25] * shapes.num_layers
        return build_sparse_method(cfg, shapes, OPS, model_config=hata_model(shapes.num_layers, ratios, **model_over))
    return build_sparse_method(cfg, shapes, OPS, host_ops=OPS)


def write_prefill(method: SparseMethod, batch, layers: int) -> None:
    for layer in range(layers):
        for r in range(batch.block_table.shape[0]):
            method.on_kv_written(layer, batch.keys(r), batch.slots(r))


def planted(seq_lens, hq, hkv, d, planted_blocks, seed=0):
    """Keys of the planted blocks point along each row's query; the rest is small noise."""
    g = torch.Generator().manual_seed(seed)
    batch = make_paged(seq_lens, BS, hkv, d, g)
    batch.k_cache.mul_(0.05)
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    grp = hq // hkv
    for r, blocks in enumerate(planted_blocks):
        target = q[r].view(hkv, grp, d).mean(1)  # [Hkv, D]
        for j in blocks:
            phys = int(batch.block_table[r, j])
            batch.k_cache[phys] = 3.0 * target[None] + 0.01 * torch.randn(BS, hkv, d, generator=g)
    return batch, q


@pytest.mark.parametrize("name", method_names())
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (8, 1)])
def test_selects_planted_blocks(name: str, hq: int, hkv: int) -> None:
    seq_lens = [16 * BS + 3, 12 * BS]
    plant = [[5, 9], [7]]
    batch, q = planted(seq_lens, hq, hkv, 32, plant)
    shapes = ModelShapes(2, hq, hkv, 32, BS, batch.k_cache.shape[0])
    m = build(name, shapes)
    write_prefill(m, batch, 2)
    plan = m.begin_step(["a", "b"], batch.seq_lens, batch.block_table)
    for layer in range(2):
        sel = m.select(layer, q, plan)
        for r, blocks in enumerate(plant):
            kept = sel.logical_blocks(r)
            n_b = -(-seq_lens[r] // BS)
            assert set(blocks) <= set(kept), (name, layer, r, kept)
            assert 0 in kept and n_b - 1 in kept  # init window / must-select and the last block
            assert kept == sorted(kept)
            assert len(kept) == max(math.ceil(0.25 * n_b), 2)
    m.end_step(plan)
    m.close()


@pytest.mark.parametrize("name", method_names())
def test_ratio_one_equals_dense(name: str) -> None:
    g = torch.Generator().manual_seed(7)
    seq_lens = [45, 8, 3 * BS + 1]
    batch = make_paged(seq_lens, BS, 2, 32, g)
    shapes = ModelShapes(2, 8, 2, 32, BS, batch.k_cache.shape[0])
    m = build(name, shapes, ratio=1.0)
    write_prefill(m, batch, 2)
    plan = m.begin_step(["a", "b", "c"], batch.seq_lens, batch.block_table)
    q = torch.randn(3, 8, 32, generator=g)
    dense, _ = OPS.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens, 0.2)
    for layer in range(2):
        sel = m.select(layer, q, plan)
        out, _ = OPS.paged_decode_attention(q, batch.k_cache, batch.v_cache, sel.block_table, sel.seq_lens, 0.2)
        torch.testing.assert_close(out, dense)
        assert torch.equal(sel.blocks_kept, sel.blocks_total)
    m.close()


@pytest.mark.parametrize("name", method_names())
def test_sparse_output_is_attention_over_the_selected_blocks(name: str) -> None:
    """The rewritten table + lengths attend to exactly the kept logical blocks."""
    g = torch.Generator().manual_seed(8)
    seq_lens = [20 * BS + 5]
    batch = make_paged(seq_lens, BS, 2, 32, g)
    shapes = ModelShapes(1, 8, 2, 32, BS, batch.k_cache.shape[0])
    m = build(name, shapes, ratio=0.3)
    write_prefill(m, batch, 1)
    plan = m.begin_step(["a"], batch.seq_lens, batch.block_table)
    q = torch.randn(1, 8, 32, generator=g)
    sel = m.select(0, q, plan)
    out, _ = OPS.paged_decode_attention(q, batch.k_cache, batch.v_cache, sel.block_table, sel.seq_lens, 0.2)
    kept = sel.logical_blocks(0)
    toks = torch.cat([torch.arange(j * BS, min((j + 1) * BS, seq_lens[0])) for j in kept])
    k = batch.keys(0)[toks].repeat_interleave(4, 1).transpose(0, 1)
    v = batch.values(0)[toks].repeat_interleave(4, 1).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q[0][:, None], k, v, scale=0.2)[:, 0]
    torch.testing.assert_close(out[0], want, rtol=1e-5, atol=1e-5)
    assert len(kept) < 21
    m.close()


def test_attention_sink_kept_by_init_window() -> None:
    """A block the query ignores is still read when it is in the init window."""
    batch, q = planted([16 * BS], 4, 4, 32, [[9]])
    shapes = ModelShapes(1, 4, 4, 32, BS, batch.k_cache.shape[0])
    cfg = {
        "ESA": {"init_window_sz": 2, "local_window_sz": 1, "sparse_ratio": 0.25, "min_blocks": 1, "retrieval_stride": 1}
    }
    m = build_sparse_method(cfg, shapes, OPS)
    write_prefill(m, batch, 1)
    sel = m.select(0, q, m.begin_step(["a"], batch.seq_lens, batch.block_table))
    assert sel.logical_blocks(0) == [0, 1, 9, 15]


def test_short_rows_and_thresholds_stay_dense() -> None:
    g = torch.Generator().manual_seed(9)
    seq_lens = [2 * BS + 1, 20 * BS, 20 * BS]
    batch = make_paged(seq_lens, BS, 2, 32, g)
    shapes = ModelShapes(1, 8, 2, 32, BS, batch.k_cache.shape[0])
    m = build("GSAOnDevice", shapes, gpu_seq_len_threshold=10 * BS)
    write_prefill(m, batch, 1)
    plan = m.begin_step(
        ["a", "b", "c"], batch.seq_lens, batch.block_table, sparse_rows=torch.tensor([True, True, False])
    )
    sel = m.select(0, torch.randn(3, 8, 32, generator=g), plan)
    assert sel.blocks_kept.tolist() == [3, 5, 20]  # row 0 below the length threshold, row 2 forced dense
    m2 = build("GSAOnDevice", shapes, gpu_concurrency_threshold=4)  # 3 rows < 4: whole step dense
    write_prefill(m2, batch, 1)
    sel = m2.select(
        0, torch.randn(3, 8, 32, generator=g), m2.begin_step(["a", "b", "c"], batch.seq_lens, batch.block_table)
    )
    assert sel.blocks_kept.tolist() == [3, 20, 20]


def test_dense_layers_and_index_reuse() -> None:
    g = torch.Generator().manual_seed(10)
    batch = make_paged([30 * BS + 2, 17 * BS], BS, 2, 32, g)
    shapes = ModelShapes(4, 8, 2, 32, BS, batch.k_cache.shape[0])
    m = build_sparse_method(
        {"GSAOnDevice": {}}, shapes, OPS, model_config=hata_model(4, [1, 0.2, 0.3, 0.2], [-1, -1, -1, 1])
    )
    write_prefill(m, batch, 4)
    plan = m.begin_step(["a", "b"], batch.seq_lens, batch.block_table)
    sels = [m.select(layer, torch.randn(2, 8, 32, generator=g), plan) for layer in range(4)]
    assert sels[0].dense and torch.equal(sels[0].blocks_kept, sels[0].blocks_total)
    assert sels[1].blocks_kept.tolist() == [math.ceil(0.2 * 31), math.ceil(0.2 * 17)]
    assert sels[2].blocks_kept.tolist() == [math.ceil(0.3 * 31), math.ceil(0.3 * 17)]
    assert sels[3] is sels[1]  # reused, not recomputed
    m.end_step(plan)
    assert m.stats.steps == 1 and 0 < m.stats.fraction_read < 1


@pytest.mark.parametrize("name", method_names(windowed=True))
def test_windowed_methods_keep_their_dense_layers_dense(name: str) -> None:
    g = torch.Generator().manual_seed(11)
    batch = make_paged([30 * BS + 2, 17 * BS], BS, 2, 32, g)
    shapes = ModelShapes(3, 8, 2, 32, BS, batch.k_cache.shape[0])
    cfg = {k: dict(v, dense_layers=[1]) for k, v in method_config(name).items()}
    m = build_sparse_method(cfg, shapes, OPS, host_ops=OPS)
    write_prefill(m, batch, 3)
    plan = m.begin_step(["a", "b"], batch.seq_lens, batch.block_table)
    sels = [m.select(layer, torch.randn(2, 8, 32, generator=g), plan) for layer in range(3)]
    assert sels[1].dense and sels[1].blocks_kept.tolist() == [31, 17]
    for layer in (0, 2):
        assert not sels[layer].dense and sels[layer].blocks_kept.tolist() == [
            math.ceil(0.25 * 31),
            math.ceil(0.25 * 17),
        ]
    m.end_step(plan)
    with pytest.raises(ConfigError, match=f"{name}.dense_layers.*layer 3 does not exist"):
        build_sparse_method({name: dict(cfg[name], dense_layers=[3])}, shapes, OPS, host_ops=OPS)


@pytest.mark.parametrize("name", method_names(windowed=True))
def test_windowed_methods_keep_their_per_layer_ratios(name: str) -> None:
    g = torch.Generator().manual_seed(12)
    batch = make_paged([30 * BS + 2, 17 * BS], BS, 2, 32, g)
    shapes = ModelShapes(3, 8, 2, 32, BS, batch.k_cache.shape[0])
    cfg = {k: dict(v, layer_sparse_ratio={"0": 0.5, "2": 1.0}) for k, v in method_config(name).items()}
    m = build_sparse_method(cfg, shapes, OPS, host_ops=OPS)
    write_prefill(m, batch, 3)
    plan = m.begin_step(["a", "b"], batch.seq_lens, batch.block_table)
    sels = [m.select(layer, torch.randn(2, 8, 32, generator=g), plan) for layer in range(3)]
    assert sels[0].blocks_kept.tolist() == [math.ceil(0.5 * 31), math.ceil(0.5 * 17)]
    assert sels[1].blocks_kept.tolist() == [math.ceil(0.25 * 31), math.ceil(0.25 * 17)]  # the config's ratio
    assert sels[2].dense and sels[2].blocks_kept.tolist() == [31, 17]
    m.end_step(plan)
    with pytest.raises(ConfigError, match=f"{name}.layer_sparse_ratio.*layer 3 does not exist"):
        build_sparse_method({name: dict(cfg[name], layer_sparse_ratio={"3": 0.5})}, shapes, OPS, host_ops=OPS)


def test_chunks_of_several_blocks() -> None:
    batch, q = planted([24 * BS], 8, 2, 32, [[10]])
    shapes = ModelShapes(1, 8, 2, 32, BS, batch.k_cache.shape[0])
    m = build("GSAOnDevice", shapes, chunk_size=2 * BS)
    write_prefill(m, batch, 1)
    kept = m.select(0, q, m.begin_step(["a"], batch.seq_lens, batch.block_table)).logical_blocks(0)
    assert {0, 1, 10, 11, 22, 23} <= set(kept)
    assert all((j ^ 1) in kept for j in kept)  # whole chunks (pairs of blocks)
    assert len(kept) == 2 * math.ceil(0.25 * 12)


def test_mla_hash_selects_planted_blocks() -> None:
    lora, rope = 48, 16
    batch, q = planted([20 * BS + 4], 16, 1, lora + rope, [[6, 13]])
    shapes = ModelShapes(1, 16, 1, lora + rope, BS, batch.k_cache.shape[0], kv_lora_rank=lora, qk_rope_head_dim=rope)
    cfg = hata_model(
        1,
        is_mla=True,
        head_dim=lora + rope,
        hash_bits=64,
        kv_lora_rank=lora,
        qk_rope_head_dim=rope,
        hash_bits_kv_lora=48,
        hash_bits_qk_rope=16,
    )
    m = build_sparse_method({"GSAOnDevice": {}}, shapes, OPS, model_config=cfg)
    assert m.scorer.code_bytes == 8
    write_prefill(m, batch, 1)
    kept = m.select(0, q, m.begin_step(["a"], batch.seq_lens, batch.block_table)).logical_blocks(0)
    assert {0, 6, 13, 20} <= set(kept)


def _moving_target_run(name: str, stride: int, steps: int) -> list[list[int]]:
    """The query points at block 4 until step `stride`, then at block 11."""
    batch, _ = planted([16 * BS], 4, 4, 32, [[]])
    g = torch.Generator().manual_seed(3)
    qa, qb = torch.randn(1, 4, 32, generator=g), torch.randn(1, 4, 32, generator=g)
    for j, qq in ((4, qa), (11, qb)):
        batch.k_cache[int(batch.block_table[0, j])] = 3.0 * qq[0][None]
    shapes = ModelShapes(1, 4, 4, 32, BS, batch.k_cache.shape[0])
    cfg = {
        name: {
            "init_window_sz": 1,
            "local_window_sz": 1,
            "sparse_ratio": 3 / 16,
            "min_blocks": 1,
            "retrieval_stride": stride,
        }
    }
    m = build_sparse_method(cfg, shapes, OPS, host_ops=OPS)
    write_prefill(m, batch, 1)
    kept = []
    for step in range(steps):
        plan = m.begin_step(["a"], batch.seq_lens, batch.block_table)
        kept.append(m.select(0, qa if step < stride else qb, plan).logical_blocks(0))
        m.end_step(plan)
    m.close()
    return kept


def test_retrieval_stride_is_async_one_step_late() -> None:
    kept = _moving_target_run("ESA", stride=3, steps=6)
    assert kept[:4] == [[0, 4, 15]] * 4  # steps 0-2 use step 0's retrieval; step 3 starts a new one
    assert kept[4:] == [[0, 11, 15]] * 2  # consumed from step 4 on


def test_stride_one_is_synchronous_for_esa_and_one_step_late_for_gsa() -> None:
    assert _moving_target_run("ESA", stride=1, steps=3)[1] == [0, 11, 15]
    gsa = _moving_target_run("GSA", stride=1, steps=3)  # host top-k: started at step 1, used at step 2
    assert gsa == [[0, 4, 15], [0, 4, 15], [0, 11, 15]]


def test_a_failing_background_retrieval_is_logged_where_it_fails(caplog) -> None:
    """An error in the retrieval thread is logged with its traceback when it happens (a worker
    that stops before consuming the future would otherwise say nothing) and still raises in the
    step that consumes it."""
    batch, q = planted([16 * BS], 4, 4, 32, [[5]])
    shapes = ModelShapes(1, 4, 4, 32, BS, batch.k_cache.shape[0])
    m = build_sparse_method({"GSA": {"sparse_ratio": 0.25}}, shapes, OPS, host_ops=OPS)
    write_prefill(m, batch, 1)

    def broken_score(*args, **kwargs):
        raise FloatingPointError("scores went bad")

    plan = m.begin_step(["a"], batch.seq_lens, batch.block_table)
    m.select(0, q, plan)  # the first retrieval runs on the caller's thread
    m.end_step(plan)
    m.scorer.score = broken_score
    with caplog.at_level("ERROR", logger="ucm.sparse.base"):
        with pytest.raises(FloatingPointError):
            for _ in range(3):  # later ones start in the background and are consumed a step later
                plan = m.begin_step(["a"], batch.seq_lens, batch.block_table)
                m.select(0, q, plan)
                m.end_step(plan)
    m.close()
    failed = [r for r in caplog.records if "background retrieval failed" in r.getMessage()]
    assert failed and failed[0].exc_info is not None and "scores went bad" in str(failed[0].exc_info[1])


def test_growing_request_keeps_new_blocks_in_local_window() -> None:
    """Between retrievals the request grows; its newest blocks are read without rescoring."""
    g = torch.Generator().manual_seed(12)
    batch = make_paged([10 * BS + 3], BS, 2, 32, g, extra_blocks=10)
    table = torch.cat(
        [batch.block_table, torch.arange(batch.k_cache.shape[0] - 10, batch.k_cache.shape[0])[None].int()], 1
    )
    shapes = ModelShapes(1, 8, 2, 32, BS, batch.k_cache.shape[0])
    cfg = {
        "ESA": {"init_window_sz": 1, "local_window_sz": 2, "sparse_ratio": 0.3, "min_blocks": 1, "retrieval_stride": 8}
    }
    m = build_sparse_method(cfg, shapes, OPS)
    write_prefill(m, batch, 1)
    for length in [10 * BS + 3, 11 * BS + 1, 12 * BS + 1]:
        plan = m.begin_step(["a"], torch.tensor([length]), table)
        kept = m.select(0, torch.randn(1, 8, 32, generator=g), plan).logical_blocks(0)
        n_b = -(-length // BS)
        assert {0, n_b - 2, n_b - 1} <= set(kept) and len(kept) == math.ceil(0.3 * n_b)
        m.end_step(plan)
    m.close()


def test_prefetch_listener_sees_every_retrieval() -> None:
    batch, q = planted([16 * BS], 4, 4, 32, [[5]])
    shapes = ModelShapes(1, 4, 4, 32, BS, batch.k_cache.shape[0])
    m = build_sparse_method({"GSA": {"sparse_ratio": 0.25}}, shapes, OPS, host_ops=OPS)
    seen = []
    m.retrieval_listeners.append(lambda rid, layer, scores: seen.append((rid, layer, int(scores.argmax()))))
    write_prefill(m, batch, 1)
    for _ in range(3):
        plan = m.begin_step(["a"], batch.seq_lens, batch.block_table)
        m.select(0, q, plan)
        m.end_step(plan)
    m.close()  # may cancel the retrieval started at the last step
    # step 0 retrieved synchronously, step 1's async retrieval was consumed at step 2
    assert len(seen) in (2, 3) and all(s == ("a", 0, 5) for s in seen), seen


def test_block_accumulator_matches_pair_means_and_restarts_recycled_blocks() -> None:
    from ucm.sparse.base import BlockAccumulator

    g = torch.Generator().manual_seed(13)
    shapes = ModelShapes(1, 4, 2, 8, BS, 6)
    acc = BlockAccumulator(shapes, merge=2, device=torch.device("cpu"), absolute=True)
    cache = torch.zeros(6, BS, 2, 8)
    slots = torch.tensor([3 * BS + i for i in range(BS)] + [5 * BS, 5 * BS + 1])
    keys = torch.randn(len(slots), 2, 8, generator=g)
    OPS.paged_write(cache, keys, slots)
    acc.add(keys[:5], slots[:5])
    acc.add(keys[5:], slots[5:])
    want = cache[3].view(BS // 2, 2, 2, 8).mean(1)  # the mean of each pair of tokens: [R, Hkv, D]
    torch.testing.assert_close(acc.sums[3] / 2, want)
    torch.testing.assert_close(acc.abs_sums[3] / BS, cache[3].abs().mean(0))
    fresh = torch.randn(BS, 2, 8, generator=g)  # block 3 recycled for another request
    acc.add(fresh, torch.arange(3 * BS, 4 * BS))
    torch.testing.assert_close(acc.sums[3].sum(0), fresh.sum(0))


@pytest.mark.parametrize("name", method_names(windowed=True))
def test_a_finished_request_does_not_cancel_the_others_retrieval(name: str) -> None:
    """Rows of a batch share one async retrieval; finishing one request mid-retrieval must leave
    the others' result intact (it once cancelled the shared future: CancelledError in vLLM)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    batch, q = planted([16 * BS, 16 * BS], 4, 4, 32, [[5], [9]])
    shapes = ModelShapes(1, 4, 4, 32, BS, batch.k_cache.shape[0])
    cfg = {
        name: {
            "init_window_sz": 1,
            "local_window_sz": 1,
            "sparse_ratio": 3 / 16,
            "min_blocks": 1,
            "retrieval_stride": 2,
        }
    }
    m = build_sparse_method(cfg, shapes, OPS, host_ops=OPS)
    m._executor = ThreadPoolExecutor(1)
    gate = threading.Event()
    write_prefill(m, batch, 1)
    for step in range(3):  # stride 2: step 2 starts an async retrieval, consumed at step 3
        if step == 2:  # hold the pool busy so the retrieval is still queued when "a" finishes
            m._executor.submit(gate.wait)
        plan = m.begin_step(["a", "b"], batch.seq_lens, batch.block_table)
        m.select(0, q, plan)
        m.end_step(plan)
    m.finish("a")
    gate.set()
    plan = m.begin_step(["b"], batch.seq_lens[1:], batch.block_table[1:])
    sel = m.select(0, q[1:], plan)  # consumes the shared retrieval
    m.end_step(plan)
    m.close()
    assert 9 in sel.logical_blocks(0)
