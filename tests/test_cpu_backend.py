"""The CPU backend against the torch reference: bit-exact for codes/ids/counts, allclose for floats.

The native extension is JIT-built once per machine (cached under $UCM_CACHE_DIR or
~/.cache/ucm/torch_extensions); later runs only load it.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ucm_backends.cpu import ops as cpu_module
from ucm_backends.cpu.ops import CpuOps

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


def rand_codes(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)


def paged_case(g: torch.Generator, seq_lens: list[int], bs: int, extra_width: int = 0, nb_pool: int | None = None):
    """A block table with distinct random physical blocks per row and -1 past each row's end."""
    b = len(seq_lens)
    n = [max(0, math.ceil(s / bs)) for s in seq_lens]
    m = max(n + [1]) + extra_width
    nb = nb_pool or max(8, sum(n) + 3)
    table = torch.full((b, m), -1, dtype=torch.int64)
    for r, nr in enumerate(n):
        table[r, :nr] = torch.randint(0, nb, (min(nr, m),), generator=g)
    return table, torch.tensor(seq_lens, dtype=torch.int64), nb


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


# ------------------------------------------------------------------------------------- hashing
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 100, 128, 576])
def test_sign_bits_pack(cpu: CpuOps, dtype: torch.dtype, n: int) -> None:
    g = gen(n)
    x = torch.randn(3, 5, n, generator=g).to(dtype)
    x[0, 0] = 0.0
    x[0, 1] = -0.0
    x[0, 2] = float("nan")
    x[1, 0, ::2] = float("-inf")
    x[1, 1, ::3] = float("inf")
    out = cpu.sign_bits_pack(x)
    assert out.dtype == torch.uint8 and out.shape == (3, 5, (n + 7) // 8)
    assert torch.equal(out, REF.sign_bits_pack(x))


def test_sign_bits_pack_noncontiguous_and_1d(cpu: CpuOps) -> None:
    x = torch.randn(40, 24, generator=gen(1)).t()  # [24, 40], not contiguous
    assert torch.equal(cpu.sign_bits_pack(x), REF.sign_bits_pack(x))
    v = torch.randn(13, generator=gen(2))
    assert torch.equal(cpu.sign_bits_pack(v), REF.sign_bits_pack(v))
    empty = torch.randn(0, 16)
    assert cpu.sign_bits_pack(empty).shape == (0, 2)


@HYP
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    n=st.integers(1, 80),
    seed=st.integers(0, 2**31 - 1),
)
def test_sign_bits_pack_hypothesis(cpu: CpuOps, lead: list[int], n: int, seed: int) -> None:
    x = torch.randn(*lead, n, generator=gen(seed))
    x = torch.where(torch.rand(x.shape, generator=gen(seed + 1)) < 0.1, torch.zeros_like(x), x)
    assert torch.equal(cpu.sign_bits_pack(x), REF.sign_bits_pack(x))


@pytest.mark.parametrize("nbits", [128, 100, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hash_encode(cpu: CpuOps, nbits: int, dtype: torch.dtype) -> None:
    g = gen(nbits)
    x = torch.randn(4, 8, 64, generator=g).to(dtype)
    w = torch.randn(64, nbits, generator=g)
    assert torch.equal(cpu.hash_encode(x, w), REF.hash_encode(x, w))


# ------------------------------------------------------------------------------------- hamming
HAMMING_CASES = [
    # (Hq, Hkv, C, bs, seq_lens)
    (8, 8, 16, 16, [50, 16, 1]),  # GQA 1; not a multiple / exactly one block / shorter than a block
    (32, 8, 16, 32, [300, 0, 31, 257]),  # GQA 4, an empty row
    (16, 2, 16, 8, [64, 5, 23]),  # GQA 8
    (16, 1, 72, 16, [100, 7]),  # MLA: one latent head, 576-bit codes = 72 bytes
    (4, 1, 72, 64, [1000]),
    (8, 2, 5, 16, [40, 3]),  # code width not a multiple of 8 (byte path)
    (6, 3, 13, 4, [21, 9, 0]),  # odd widths and an odd group
    (4, 4, 8, 128, [128, 129, 40]),
    (128, 1, 72, 16, [70, 16]),  # MLA with 128 query heads (bit-plane path)
    (20, 4, 16, 8, [33, 8]),  # G = 5, the smallest bit-plane group
    (28, 4, 11, 8, [33]),  # G = 7, byte tail
]


@pytest.mark.parametrize("reduce", ["min", "mean", "max"])
@pytest.mark.parametrize("case", HAMMING_CASES, ids=lambda c: f"hq{c[0]}-hkv{c[1]}-c{c[2]}-bs{c[3]}")
def test_hamming_block_scores(cpu: CpuOps, case, reduce: str) -> None:
    hq, hkv, c, bs, lens = case
    g = gen(hq * 1000 + c)
    table, seq_lens, nb = paged_case(g, lens, bs, extra_width=2)
    q = rand_codes((len(lens), hq, c), g)
    k = rand_codes((nb, bs, hkv, c), g)
    for tbl in (table, table.to(torch.int32)):
        out = cpu.hamming_block_scores(q, k, tbl, seq_lens, reduce)
        ref = REF.hamming_block_scores(q, k, tbl, seq_lens, reduce)
        assert out.dtype == torch.float32
        assert torch.equal(out, ref)


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


def test_hamming_all_identical_codes(cpu: CpuOps) -> None:
    """Distance 0 everywhere (and ties everywhere downstream)."""
    q = torch.full((2, 4, 16), 0xA5, dtype=torch.uint8)
    k = torch.full((6, 8, 4, 16), 0xA5, dtype=torch.uint8)
    table, seq_lens, _ = paged_case(gen(3), [20, 9], 8, nb_pool=6)
    out = cpu.hamming_block_scores(q, k, table, seq_lens, "min")
    assert torch.equal(out, REF.hamming_block_scores(q, k, table, seq_lens, "min"))


@HYP
@given(
    g_ratio=st.sampled_from([1, 2, 3, 4, 5, 8, 16]),
    hkv=st.integers(1, 3),
    c=st.sampled_from([1, 3, 8, 16, 24, 72]),
    bs=st.sampled_from([1, 4, 16, 32]),
    lens=st.lists(st.integers(0, 150), min_size=1, max_size=4),
    reduce=st.sampled_from(["min", "mean", "max"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_hamming_hypothesis(cpu: CpuOps, g_ratio, hkv, c, bs, lens, reduce, seed) -> None:
    g = gen(seed)
    table, seq_lens, nb = paged_case(g, lens, bs, extra_width=1)
    q = rand_codes((len(lens), hkv * g_ratio, c), g)
    k = rand_codes((nb, bs, hkv, c), g)
    assert torch.equal(
        cpu.hamming_block_scores(q, k, table, seq_lens, reduce), REF.hamming_block_scores(q, k, table, seq_lens, reduce)
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


# ------------------------------------------------------------------------------------ block_topk
def assert_topk_equal(cpu: CpuOps, scores, k, must, n_blocks) -> None:
    ids, counts = cpu.block_topk(scores, k, must, n_blocks)
    rids, rcounts = REF.block_topk(scores, k, must, n_blocks)
    assert ids.dtype == torch.int32 and counts.dtype == torch.int32
    assert torch.equal(ids, rids), (ids, rids)
    assert torch.equal(counts, rcounts), (counts, rcounts)


def test_block_topk_random(cpu: CpuOps) -> None:
    g = gen(11)
    b, m = 16, 64
    scores = torch.randn(b, m, generator=g)
    must = torch.rand(b, m, generator=g) < 0.1
    k = torch.randint(0, m + 8, (b,), generator=g)
    n_blocks = torch.randint(0, m + 1, (b,), generator=g)
    assert_topk_equal(cpu, scores, k, must, n_blocks)
    assert_topk_equal(cpu, scores.double(), k.to(torch.int32), must, n_blocks.to(torch.int32))


def test_block_topk_ties_nan_inf(cpu: CpuOps) -> None:
    g = gen(12)
    b, m = 12, 40
    scores = torch.randint(-3, 3, (b, m), generator=g).to(torch.float32)  # lots of ties
    scores[0, ::3] = float("nan")
    scores[1, :] = float("nan")
    scores[2, 5:9] = float("-inf")
    scores[3, ::4] = -0.0
    scores[4, 7] = float("inf")  # a non-forced +inf must not displace a forced block
    must = torch.rand(b, m, generator=g) < 0.15
    must[1, 3] = True
    must[4, 20] = True
    k = torch.tensor([5, 3, 40, 50, 1, 0, 0, 7, 39, 1, 12, 100])
    n_blocks = torch.tensor([40, 40, 30, 40, 40, 25, 0, 8, 40, 1, 100, 33])  # incl. n_b > M
    assert_topk_equal(cpu, scores, k, must, n_blocks)


def test_block_topk_forced_only_and_large_k(cpu: CpuOps) -> None:
    scores = torch.linspace(0, 1, 20).repeat(4, 1)
    must = torch.zeros(4, 20, dtype=torch.bool)
    must[:, [0, 19]] = True
    must[2, 15:] = True
    k = torch.tensor([0, 0, 3, 25])  # k = 0 with forced blocks, k < forced, k >= M
    n_blocks = torch.tensor([20, 10, 20, 20])  # row 1: a forced block past n_b is ignored
    assert_topk_equal(cpu, scores, k, must, n_blocks)
    assert_topk_equal(cpu, scores.to(torch.float16), k, must, n_blocks)
    assert_topk_equal(cpu, scores.to(torch.bfloat16), k, must, n_blocks)


def test_block_topk_empty(cpu: CpuOps) -> None:
    assert_topk_equal(
        cpu,
        torch.zeros(0, 5),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, 5, dtype=torch.bool),
        torch.zeros(0, dtype=torch.int64),
    )
    assert_topk_equal(
        cpu, torch.zeros(2, 0), torch.tensor([1, 0]), torch.zeros(2, 0, dtype=torch.bool), torch.tensor([0, 0])
    )


@HYP
@given(
    b=st.integers(1, 5),
    m=st.integers(1, 70),
    levels=st.integers(1, 6),
    nan_p=st.floats(0, 0.3),
    forced_p=st.floats(0, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_topk_hypothesis(cpu: CpuOps, b, m, levels, nan_p, forced_p, seed) -> None:
    g = gen(seed)
    scores = torch.randint(0, levels, (b, m), generator=g).to(torch.float32)
    scores = torch.where(torch.rand(b, m, generator=g) < nan_p, float("nan"), scores)
    must = torch.rand(b, m, generator=g) < forced_p
    k = torch.randint(0, m + 3, (b,), generator=g)
    n_blocks = torch.randint(0, m + 2, (b,), generator=g)
    assert_topk_equal(cpu, scores, k, must, n_blocks)


def test_hamming_topk_pipeline(cpu: CpuOps) -> None:
    """The decode step: Hamming distances -> negate -> top-k with sink/recent blocks forced."""
    g = gen(5)
    bs, hq, hkv, c = 16, 16, 4, 16
    lens = [700, 123, 16, 5]
    table, seq_lens, nb = paged_case(g, lens, bs)
    q = rand_codes((len(lens), hq, c), g)
    k = rand_codes((nb, bs, hkv, c), g)
    n_blocks = (seq_lens + bs - 1) // bs
    must = torch.zeros(table.shape, dtype=torch.bool)
    must[:, 0] = True
    must[torch.arange(len(lens)), (n_blocks - 1).clamp(min=0)] = True
    budget = (n_blocks.float() * 0.3).ceil().long()
    scores = -cpu.hamming_block_scores(q, k, table, seq_lens, "min")
    assert torch.equal(scores, -REF.hamming_block_scores(q, k, table, seq_lens, "min"))
    assert_topk_equal(cpu, scores, budget, must, n_blocks)


# ------------------------------------------------------------------------------ float-valued ops
@pytest.mark.parametrize("group_reduce", ["mean", "max"])
@pytest.mark.parametrize("hq,hkv,d", [(8, 8, 64), (32, 8, 128), (16, 2, 32), (16, 1, 576)])
def test_block_scores_dot(cpu: CpuOps, group_reduce: str, hq: int, hkv: int, d: int) -> None:
    g = gen(hq + d)
    bs = 16
    table, seq_lens, nb = paged_case(g, [200, 1, 0, 48], bs, extra_width=1)
    q = torch.randn(4, hq, d, generator=g)
    reps = torch.randn(nb, hkv, d, generator=g)
    out = cpu.block_scores_dot(q, reps, table, seq_lens, bs, group_reduce)
    ref = REF.block_scores_dot(q, reps, table, seq_lens, bs, group_reduce)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("merge", [32, 4, 1])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sums_add(cpu: CpuOps, merge: int, absolute: bool, dtype: torch.dtype) -> None:
    """A prefill of whole and partial blocks, then decode steps that finish blocks and recycle
    one (its offset 0 written again, after another key of the same call), with slots of -1;
    native and reference accumulate the same sums."""
    g = gen(7)
    nb, bs, h, d = 6, 32, 3, 16
    state = {}
    for name in ("ref", "cpu"):
        state[name] = (torch.zeros(nb, bs // merge, h, d), torch.zeros(nb, h, d) if absolute else None)
    calls = [
        torch.cat([torch.arange(0, 70), torch.tensor([-1, -1])]),  # blocks 0, 1 and part of 2
        torch.tensor([70, 71, -1, 140]),  # decode: block 2 grows, block 4 starts
        torch.tensor([33, 32, 34]),
    ]  # block 1 recycled: offset 0 written after offset 1
    for slots in calls:
        keys = torch.randn(len(slots), h, d, generator=g).to(dtype)
        REF.block_sums_add(*state["ref"], keys, slots, bs, merge)
        cpu.block_sums_add(*state["cpu"], keys, slots, bs, merge)
        for a, b in zip(state["ref"], state["cpu"], strict=True):
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert state["cpu"][0][1].abs().sum() > 0 and state["cpu"][0][3].abs().sum() == 0
    with pytest.raises(ValueError, match="past"):
        cpu.block_sums_add(*state["cpu"], torch.zeros(1, h, d), torch.tensor([nb * bs]), bs, merge)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,dv", [(8, 8, 64, 64), (32, 8, 64, 64), (16, 2, 32, 48), (8, 1, 576, 512)])
def test_paged_decode_attention(cpu: CpuOps, dtype: torch.dtype, hq: int, hkv: int, d: int, dv: int) -> None:
    g = gen(hq * d)
    bs = 16
    table, seq_lens, nb = paged_case(g, [100, 0, 16, 3], bs, extra_width=1)
    q = torch.randn(4, hq, d, generator=g).to(dtype)
    kc = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    vc = torch.randn(nb, bs, hkv, dv, generator=g).to(dtype)
    scale = d**-0.5
    out, lse = cpu.paged_decode_attention(q, kc, vc, table, seq_lens, scale)
    rout, rlse = REF.paged_decode_attention(q, kc, vc, table, seq_lens, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out, rout, **tol)
    torch.testing.assert_close(lse, rlse, rtol=1e-5, atol=1e-5)


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
