"""What is specific to the CPU backend: the native build and its mode codes, the CPU's handling of
out-of-contract inputs (negative ids inside a row), validation messages, the torch fallback
(constructor, environment, inputs the kernels do not take), its fused fast paths and background
thread caps. Every contract op is checked against the reference in tests/test_ops_conformance.py.

The native extension is JIT-built once per machine (cached under $UCM_CACHE_DIR or
~/.cache/ucm/torch_extensions); later runs only load it.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, settings
from ucm_backends.cpu import ops as cpu_module
from ucm_backends.cpu.ops import CpuOps

from tests.paged import paged_case, rand_codes
from ucm.ops.contract import GroupReduceCode, ReduceCode
from ucm.ops.reference import TorchReferenceOps

REF = TorchReferenceOps()
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def cpu() -> CpuOps:
    ops = CpuOps()
    assert isinstance(ops.native_loaded, bool)  # build/load once, up front
    return ops


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------- loading
def test_native_extension_loaded(cpu: CpuOps) -> None:
    if cpu_module.find_compiler() is None:
        pytest.skip("no C++ compiler found: the CPU backend runs its torch fallback here")
    assert cpu.native_error is None, cpu.native_error
    assert cpu.native_loaded
    flags = cpu_module.cpu_flags()
    if "avx2" in flags:
        assert "avx2" in cpu.build_info
    if "popcnt" in flags:
        assert "popcnt" in cpu.build_info


def test_native_mode_codes_are_the_contracts_enums(cpu: CpuOps) -> None:
    """The C++ switches' reduce codes, echoed by the extension, are `ReduceCode` /
    `GroupReduceCode`: the one numbering the Python side passes."""
    ns = cpu._native()
    if ns is None:
        pytest.skip(f"native kernels unavailable: {cpu.native_error}")
    assert list(ns.reduce_codes()) == [ReduceCode.MIN, ReduceCode.MEAN, ReduceCode.MAX]
    assert list(ns.group_reduce_codes()) == [GroupReduceCode.MEAN, GroupReduceCode.MAX]
    assert len(ReduceCode) == 3 and len(GroupReduceCode) == 2  # every code is echoed


def test_registry_builds_cpu_backend() -> None:
    from ucm.ops.registry import get_ops

    ops = get_ops("cpu")
    assert isinstance(ops, CpuOps) and ops.name == "cpu"


# ------------------------------------------------------------------------------------- hamming
def test_hamming_edge_rows(cpu: CpuOps) -> None:
    """Negative ids inside a row read block 0 (the reference clamps); seq_len past M*bs is capped."""
    g = gen(7)
    q = rand_codes((3, 8, 16), g)
    k = rand_codes((10, 4, 2, 16), g)
    table = torch.tensor([[3, -1, 5], [9, 8, 7], [0, 1, 2]])
    seq_lens = torch.tensor([10, 50, -3])
    for reduce in ("min", "mean", "max"):
        assert torch.equal(
            cpu.hamming_block_scores(q, k, table, seq_lens, reduce),
            REF.hamming_block_scores(q, k, table, seq_lens, reduce),
        )


def test_hamming_validation(cpu: CpuOps) -> None:
    g = gen(0)
    table, seq_lens, nb = paged_case(g, [20], 8)
    k = rand_codes((nb, 8, 3, 16), g)
    with pytest.raises(ValueError, match="multiple"):
        cpu.hamming_block_scores(rand_codes((1, 4, 16), g), k, table, seq_lens)
    with pytest.raises(ValueError, match="widths"):
        cpu.hamming_block_scores(rand_codes((1, 6, 8), g), k, table, seq_lens)
    with pytest.raises(ValueError, match="reduce"):
        cpu.hamming_block_scores(rand_codes((1, 6, 16), g), k, table, seq_lens, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_table"):
        cpu.hamming_block_scores(rand_codes((2, 6, 16), g), k, table, seq_lens)
    bad = table.clone()
    bad[0, 0] = nb + 5
    with pytest.raises(IndexError):
        cpu.hamming_block_scores(rand_codes((1, 6, 16), g), k, bad, seq_lens)


# ------------------------------------------------------------------------------ hamming, cosine
def _cosine_case(g: torch.Generator, hq: int = 14, hkv: int = 2, c: int = 16, bs: int = 8):
    table, seq_lens, nb = paged_case(g, [50, 7, 0, 33], bs)
    q = rand_codes((4, hq, c), g)
    qn = torch.rand(4, hq, generator=g) * 4
    k = rand_codes((nb, bs, hkv, c), g)
    kn = torch.rand(nb, bs, hkv, generator=g) * 30
    return q, qn, k, kn, table, seq_lens


@pytest.mark.parametrize("hq,hkv,c", [(14, 2, 16), (8, 8, 16), (16, 1, 72), (4, 2, 6)])
def test_hamming_cosine_runs_natively(cpu: CpuOps, monkeypatch: pytest.MonkeyPatch, hq, hkv, c) -> None:
    """The C++ kernel scores (the torch definition is never reached) and agrees with it, for
    float32 and bfloat16 key norms and every reduce."""
    ns = cpu._native()
    if ns is None:
        pytest.skip(f"native kernels unavailable: {cpu.native_error}")
    q, qn, k, kn, table, seq_lens = _cosine_case(gen(hq + c), hq, hkv, c)
    want = {
        (dt, r): REF.hamming_cosine_block_scores(q, qn, k, kn.to(dt), table, seq_lens, r)
        for dt in (torch.float32, torch.bfloat16)
        for r in ("min", "mean", "max")
    }

    def never(*args, **kwargs):
        raise AssertionError("the torch definition ran instead of the native kernel")

    monkeypatch.setattr(TorchReferenceOps, "hamming_cosine_block_scores", never)
    t64, l64 = table.to(torch.int64), seq_lens.to(torch.int64)
    for (dt, r), ref in want.items():
        got = cpu.hamming_cosine_block_scores(q, qn, k, kn.to(dt), table, seq_lens, r)
        direct = ns.hamming_cosine_block_scores(q, qn, k, kn.to(dt), t64, l64, int(ReduceCode[r.upper()]))
        assert torch.equal(got, direct)
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_hamming_cosine_edge_rows(cpu: CpuOps) -> None:
    """Negative ids inside a row read block 0 (the reference clamps); seq_len past M*bs is capped."""
    g = gen(8)
    q, qn = rand_codes((3, 8, 16), g), torch.rand(3, 8, generator=g)
    k, kn = rand_codes((10, 4, 2, 16), g), torch.rand(10, 4, 2, generator=g).to(torch.bfloat16)
    table = torch.tensor([[3, -1, 5], [9, 8, 7], [0, 1, 2]])
    seq_lens = torch.tensor([10, 50, -3])
    for reduce in ("min", "mean", "max"):
        torch.testing.assert_close(
            cpu.hamming_cosine_block_scores(q, qn, k, kn, table, seq_lens, reduce),
            REF.hamming_cosine_block_scores(q, qn, k, kn, table, seq_lens, reduce),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.parametrize("native", [None, False], ids=["native", "fallback"])
def test_hamming_cosine_validation(cpu: CpuOps, native: bool | None) -> None:
    ops = cpu if native is None else CpuOps(native=False)
    q, qn, k, kn, table, seq_lens = _cosine_case(gen(3))
    op = "hamming_cosine_block_scores"
    with pytest.raises(ValueError, match=f"{op}: q_norms"):
        ops.hamming_cosine_block_scores(q, qn[:, :3], k, kn, table, seq_lens)
    with pytest.raises(ValueError, match=f"{op}: k_norms"):
        ops.hamming_cosine_block_scores(q, qn, k, kn[:, :2], table, seq_lens)
    with pytest.raises(ValueError, match=f"{op}: code widths"):
        ops.hamming_cosine_block_scores(q[..., :8], qn, k, kn, table, seq_lens)
    k3, kn3 = k[:, :, :1].expand(-1, -1, 3, -1), kn[:, :, :1].expand(-1, -1, 3)
    with pytest.raises(ValueError, match=f"{op}: Hq=14 query heads is not a multiple of Hkv=3"):
        ops.hamming_cosine_block_scores(q, qn, k3, kn3, table, seq_lens)
    with pytest.raises(ValueError, match=f"{op}: block_table"):
        ops.hamming_cosine_block_scores(q, qn, k, kn, table[:2], seq_lens)
    with pytest.raises(ValueError, match="reduce"):
        ops.hamming_cosine_block_scores(q, qn, k, kn, table, seq_lens, "median")  # type: ignore[arg-type]
    if native is None and cpu.native_loaded:
        bad = table.clone()
        bad[0, 0] = k.shape[0] + 5
        with pytest.raises(IndexError, match=op):
            ops.hamming_cosine_block_scores(q, qn, k, kn, bad, seq_lens)


# ------------------------------------------------------------------------------------- fallback
def _fallback_suite(ops: CpuOps) -> None:
    g = gen(21)
    x = torch.randn(3, 100, generator=g)
    assert torch.equal(ops.sign_bits_pack(x), REF.sign_bits_pack(x))
    table, seq_lens, nb = paged_case(g, [90, 7], 16)
    q = rand_codes((2, 8, 16), g)
    k = rand_codes((nb, 16, 2, 16), g)
    s = ops.hamming_block_scores(q, k, table, seq_lens, "mean")
    assert torch.equal(s, REF.hamming_block_scores(q, k, table, seq_lens, "mean"))
    must = torch.zeros(table.shape, dtype=torch.bool)
    must[:, 0] = True
    n_blocks = (seq_lens + 15) // 16
    ids, counts = ops.block_topk(-s, torch.tensor([2, 0]), must, n_blocks)
    rids, rcounts = REF.block_topk(-s, torch.tensor([2, 0]), must, n_blocks)
    assert torch.equal(ids, rids) and torch.equal(counts, rcounts)
    with pytest.raises(ValueError, match="multiple"):
        ops.hamming_block_scores(rand_codes((2, 3, 16), g), k, table, seq_lens)


def test_fallback_constructor(cpu: CpuOps) -> None:
    ops = CpuOps(native=False)
    assert not ops.native_loaded
    assert "native=False" in (ops.native_error or "")
    _fallback_suite(ops)


def test_fallback_env(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(cpu_module.NATIVE_ENV_VAR, "0")
    monkeypatch.setattr(cpu_module, "_warned", set())
    with caplog.at_level(logging.WARNING, logger=cpu_module.__name__):
        a, b = CpuOps(), CpuOps()
        assert a.native_error and cpu_module.NATIVE_ENV_VAR in a.native_error
        assert b.native_error == a.native_error
        _fallback_suite(a)
        _fallback_suite(b)
    warnings = [r for r in caplog.records if r.name == cpu_module.__name__]
    assert len(warnings) == 1, "the fallback warns once per process, not per op or instance"


def test_fallback_inputs_not_taken_natively(cpu: CpuOps) -> None:
    """Non-CPU tensors (meta stands in for a device) and odd dtypes go to the reference."""
    x = torch.empty(4, 20, device="meta")
    out = cpu.sign_bits_pack(x)
    assert out.device.type == "meta" and out.shape == (4, 3)
    xi = torch.randint(-5, 5, (3, 11), generator=gen(1))
    assert torch.equal(cpu.sign_bits_pack(xi), REF.sign_bits_pack(xi))
    table, seq_lens, nb = paged_case(gen(2), [40], 16)
    reps16 = torch.randn(nb, 2, 32, generator=gen(3)).half()
    q = torch.randn(1, 4, 32, generator=gen(4)).half()
    torch.testing.assert_close(
        cpu.block_scores_dot(q, reps16, table, seq_lens, 16), REF.block_scores_dot(q, reps16, table, seq_lens, 16)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("group_reduce", ["mean", "max"])
def test_native_dot_scores_narrow_sums_as_their_exact_float32_values(cpu: CpuOps, dtype, group_reduce) -> None:
    """The native dot scorer reads bfloat16 / float8 group sums (the GPU's defaults) row by row,
    widened exactly: its scores are bit-equal to the float32 kernel's on the widened cache, for
    every float8 bit pattern but the two NaNs (which stay NaN)."""
    ns = cpu._native()
    if ns is None:
        pytest.skip(f"native kernels unavailable: {cpu.native_error}")
    table, seq_lens, nb = paged_case(gen(5), [300, 7, 0, 129], 16)
    hkv, d = 2, 64
    if dtype == torch.float8_e4m3fn:  # every bit pattern, NaNs (0x7f, 0xff) as +-448
        bits = torch.arange(nb * hkv * d) % 256
        bits = torch.where((bits & 0x7F) == 0x7F, bits - 1, bits).to(torch.uint8)
        reps = bits.view(torch.float8_e4m3fn).view(nb, hkv, d)
    else:
        reps = (torch.randn(nb, hkv, d, generator=gen(6)) * 50).to(dtype)
    q = torch.randn(table.shape[0], 8, d, generator=gen(7))
    code = int(GroupReduceCode.MEAN if group_reduce == "mean" else GroupReduceCode.MAX)
    t64, l64 = table.to(torch.int64), seq_lens.to(torch.int64)
    got = ns.block_scores_dot(q, reps, t64, l64, 16, code)
    want = ns.block_scores_dot(q, reps.to(torch.float32), t64, l64, 16, code)
    assert torch.equal(got, want)
    torch.testing.assert_close(
        got, REF.block_scores_dot(q, reps, table, seq_lens, 16, group_reduce), rtol=1e-4, atol=1e-2
    )
    if dtype == torch.float8_e4m3fn:  # a NaN in a read block's sums makes its score NaN, as in torch
        nan = reps.clone()
        nan.view(torch.uint8)[int(table[0, 0]), 0, 0] = 0x7F
        out = ns.block_scores_dot(q, nan, t64, l64, 16, code)
        assert torch.isnan(out[0, 0]) and not torch.isnan(out[0, 1:]).any()


def test_fused_select_rewrite_and_kvstar_scores_match_the_reference_paths(cpu: CpuOps) -> None:
    """The CPU backend's fast paths (top-k + block-table rewrite in one call, batched KVStar
    scoring) give what the contract's reference ops give through the generic code."""
    from tests.paged import make_paged
    from ucm.sparse.base import ModelShapes
    from ucm.sparse.factory import build_sparse_method

    g = gen(77)
    batch = make_paged([40 * 16 + 5, 23 * 16, 7], 16, 2, 32, g)
    shapes = ModelShapes(2, 8, 2, 32, 16, batch.k_cache.shape[0])
    for cfg in (
        {"ESA": {"sparse_ratio": 0.3, "retrieval_stride": 1}},
        {"KVStarMultiStep": {"sparse_ratio": 0.3, "retrieval_stride": 1, "blk_repre_inner_token_merge": 4}},
    ):
        sels = []
        for ops in (cpu, REF):
            m = build_sparse_method(cfg, shapes, ops, host_ops=ops)
            for layer in range(2):
                for r in range(3):
                    m.on_kv_written(layer, batch.keys(r), batch.slots(r))
            plan = m.begin_step(["a", "b", "c"], batch.seq_lens, batch.block_table)
            q = torch.randn(3, 8, 32, generator=gen(5))
            sels.append([m.select(layer, q, plan) for layer in range(2)])
            m.close()
        for fast, ref in zip(*sels, strict=True):
            assert torch.equal(fast.block_table, ref.block_table.to(fast.block_table.dtype))
            assert torch.equal(fast.seq_lens.long(), ref.seq_lens.long())
            assert torch.equal(fast.blocks_kept.long(), ref.blocks_kept.long())


def test_background_threads_run_kernels_on_one_thread() -> None:
    """An async retrieval thread must not start a second OpenMP team next to the engine's."""
    from concurrent.futures import ThreadPoolExecutor

    ops = CpuOps()
    ns = ops._native()
    if ns is None:
        pytest.skip(f"native kernels unavailable: {ops.native_error}")
    main_budget = ns.thread_budget()
    assert main_budget == max(1, torch.get_num_threads())
    with ThreadPoolExecutor(1, initializer=ops.prepare_background_thread) as pool:
        assert pool.submit(ns.thread_budget).result() == 1
    with ThreadPoolExecutor(1) as pool:  # the cap is per thread: other threads keep the full budget
        assert pool.submit(ns.thread_budget).result() == main_budget
    assert ns.thread_budget() == main_budget
