"""The whole op contract on a real Ascend NPU, checked against the CPU reference.

Skipped (at module level, with the probe's reason) wherever the Ascend backend cannot run.
Inputs are built on the CPU from seeded generators, the reference runs on the CPU, the backend
runs on the device, and the results are compared on the CPU: exact for integer/bit outputs and
selections, close for floating-point ones.

UCM_ASCEND_TEST_DEVICE overrides the device (default "npu"); it exists to dry-run this file's
logic elsewhere with a stand-in torch_npu, never as a way to claim NPU coverage.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from ucm.ops import TorchReferenceOps, get_ops, probe

_PROBE = probe("ascend")
DEVICE = os.environ.get("UCM_ASCEND_TEST_DEVICE", "npu")

pytestmark = [
    pytest.mark.npu,
    pytest.mark.skipif(not _PROBE.available, reason=f"needs an Ascend NPU with torch_npu: {_PROBE.reason}"),
]

SEEDS = list(range(6))
REF = TorchReferenceOps()


@pytest.fixture(scope="module")
def ops():
    backend = get_ops("ascend")
    assert backend.name == "ascend"
    return backend


def dev(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def random_paged_case(gen: torch.Generator, *, dtype: torch.dtype = torch.float32, mla: bool = False) -> dict:
    """A random paged cache with a random block table (shuffled physical ids) and lengths."""
    b = int(torch.randint(1, 5, (), generator=gen))
    bs = [4, 8, 16, 128][int(torch.randint(0, 4, (), generator=gen))]
    hkv = 1 if mla else [1, 2, 4][int(torch.randint(0, 3, (), generator=gen))]
    g = [1, 2, 4][int(torch.randint(0, 3, (), generator=gen))] if not mla else 8
    d = [16, 64, 128][int(torch.randint(0, 3, (), generator=gen))] if not mla else 576
    max_blocks = int(torch.randint(1, 9, (), generator=gen))
    seq_lens = torch.randint(1, max_blocks * bs + 1, (b,), generator=gen)
    m = max_blocks + int(torch.randint(0, 3, (), generator=gen))  # table wider than needed
    nb = b * m + 3
    perm = torch.randperm(nb, generator=gen)[: b * m].view(b, m).to(torch.int32)
    k = torch.randn(nb, bs, hkv, d, generator=gen).to(dtype)
    v = torch.randn(nb, bs, hkv, d if not mla else 512, generator=gen).to(dtype)
    q = torch.randn(b, hkv * g, d, generator=gen).to(dtype)
    return dict(q=q, k=k, v=v, table=perm, seq_lens=seq_lens, bs=bs, hkv=hkv, g=g, d=d, m=m, nb=nb, b=b)


# ------------------------------------------------------------------------------ hashing
@pytest.mark.parametrize("seed", SEEDS)
def test_sign_bits_pack(ops, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        lead = tuple(int(s) for s in torch.randint(1, 6, (int(torch.randint(0, 3, (), generator=gen)),), generator=gen))
        n = int(torch.randint(1, 300, (), generator=gen))
        x = torch.randn(*lead, n, generator=gen).to(dtype)
        x.view(-1)[:: max(1, n // 3)] = 0.0
        x.view(-1)[1 :: max(2, n // 2)] = -0.0
        got = ops.sign_bits_pack(dev(x))
        assert got.device.type == torch.device(DEVICE).type and got.dtype == torch.uint8
        assert torch.equal(cpu(got), REF.sign_bits_pack(x))


def test_sign_bits_pack_documented_example(ops) -> None:
    x = torch.tensor([5, 4, 3, 2, 0, -1, -2, 4, 3, 2, 1, 0, -1, -2], dtype=torch.float32)
    assert cpu(ops.sign_bits_pack(dev(x))).tolist() == [159, 15]
    assert cpu(ops.sign_bits_pack(dev(x.view(2, 7)))).tolist() == [[31], [31]]


def test_sign_bits_unpack_round_trip(ops) -> None:
    if not hasattr(ops, "sign_bits_unpack"):
        pytest.skip("backend has no unpack helper")
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 37, generator=gen)
    signs = cpu(ops.sign_bits_unpack(ops.sign_bits_pack(dev(x)), 37, torch.float32))
    assert torch.equal(signs, torch.where(x >= 0, 1.0, -1.0))


@pytest.mark.parametrize("seed", SEEDS)
def test_hash_encode_exact_on_integer_data(ops, seed: int) -> None:
    """Integer-valued inputs make the float32 matmul exact on any device: codes must be equal."""
    gen = torch.Generator().manual_seed(seed)
    d = [16, 64, 128][seed % 3]
    nbits = [8, 64, 128, 20][seed % 4]
    x = torch.randint(-3, 4, (4, 2 + seed % 3, d), generator=gen).to(torch.float16)
    w = torch.randint(-2, 3, (d, nbits), generator=gen).to(torch.float32)
    assert torch.equal(cpu(ops.hash_encode(dev(x), dev(w))), REF.hash_encode(x, w))


@pytest.mark.parametrize("seed", SEEDS)
def test_hash_encode_random_data(ops, seed: int) -> None:
    """Random data: a bit may differ only where the projection is within rounding of zero."""
    gen = torch.Generator().manual_seed(seed)
    d, nbits = 128, 128
    x = torch.randn(5, 4, d, generator=gen).to(torch.bfloat16)
    w = torch.randn(d, nbits, generator=gen)
    got = cpu(ops.hash_encode(dev(x), dev(w)))
    ref = REF.hash_encode(x, w)
    proj = x.to(torch.float32) @ w
    diff = got ^ ref
    bits = torch.stack([(diff >> i) & 1 for i in range(8)], dim=-1).reshape(*proj.shape)
    near_zero = proj.abs() < 1e-3 * proj.abs().amax()
    assert not bool((bits.bool() & ~near_zero).any())


# -------------------------------------------------------------------------- paged cache
@pytest.mark.parametrize("seed", SEEDS)
def test_paged_write(ops, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    nb, bs, h, d = 6, [4, 16][seed % 2], 2, 32
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        if dtype == torch.uint8:
            cache = torch.randint(0, 256, (nb, bs, h, 4), generator=gen, dtype=torch.uint8)
            values = torch.randint(0, 256, (10, h, 4), generator=gen, dtype=torch.uint8)
        else:
            cache = torch.randn(nb, bs, h, d, generator=gen).to(dtype)
            values = torch.randn(10, h, d, generator=gen).to(dtype)
        slots = torch.randperm(nb * bs, generator=gen)[:10]
        slots[::4] = -1  # padding slots are skipped
        ref_cache = cache.clone()
        REF.paged_write(ref_cache, values, slots)
        dcache = dev(cache)
        ops.paged_write(dcache, dev(values), dev(slots))
        assert torch.equal(cpu(dcache), ref_cache)


# ------------------------------------------------------------------------------ scoring
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("reduce", ["min", "mean", "max"])
def test_hamming_block_scores(ops, seed: int, reduce: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    case = random_paged_case(gen)
    c = [1, 8, 16][seed % 3]
    q_codes = torch.randint(0, 256, (case["b"], case["hkv"] * case["g"], c), generator=gen, dtype=torch.uint8)
    k_codes = torch.randint(0, 256, (case["nb"], case["bs"], case["hkv"], c), generator=gen, dtype=torch.uint8)
    args = (q_codes, k_codes, case["table"], case["seq_lens"])
    got = cpu(ops.hamming_block_scores(*map(dev, args), reduce))
    ref = REF.hamming_block_scores(*args, reduce)
    if reduce == "mean":
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-5)  # a division: allow an ulp
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("group_reduce", ["mean", "max"])
def test_block_scores_dot(ops, seed: int, group_reduce: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    case = random_paged_case(gen)
    repr_cache = torch.randn(case["nb"], case["hkv"], case["d"], generator=gen)
    args = (case["q"], repr_cache, case["table"], case["seq_lens"])
    got = cpu(ops.block_scores_dot(*map(dev, args), case["bs"], group_reduce))
    ref = REF.block_scores_dot(*args, case["bs"], group_reduce)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------- selection
@pytest.mark.parametrize("seed", SEEDS)
def test_block_topk(ops, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    b, m = 1 + seed % 4, 3 + 5 * seed
    n_blocks = torch.randint(0, m + 1, (b,), generator=gen)
    k = torch.randint(0, m + 2, (b,), generator=gen)
    must_keep = torch.rand(b, m, generator=gen) < 0.2
    cases = [
        torch.randn(b, m, generator=gen),  # distinct scores
        torch.randint(0, 3, (b, m), generator=gen).to(torch.float32),  # many ties -> lower index
        -torch.randint(0, 40, (b, m), generator=gen).to(torch.float32),  # negated Hamming distances
    ]
    for scores in cases:
        ids, counts = ops.block_topk(dev(scores), dev(k), dev(must_keep), dev(n_blocks))
        ref_ids, ref_counts = REF.block_topk(scores, k, must_keep, n_blocks)
        assert torch.equal(cpu(ids).to(torch.int32), ref_ids)
        assert torch.equal(cpu(counts).to(torch.int32), ref_counts)


# ---------------------------------------------------------------------------- attention
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_decode_attention(ops, seed: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(seed)
    case = random_paged_case(gen, dtype=dtype, mla=(seed == 5))
    scale = 1.0 / math.sqrt(case["d"])
    args = (case["q"], case["k"], case["v"], case["table"], case["seq_lens"])
    out, lse = ops.paged_decode_attention(*map(dev, args), scale)
    ref_out, ref_lse = REF.paged_decode_attention(*args, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(cpu(out).float(), ref_out.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(cpu(lse), ref_lse, rtol=1e-4, atol=1e-4)


def test_sparse_step_end_to_end(ops) -> None:
    """Hash -> score -> select -> attend over the selection, all on the device, equal selections."""
    gen = torch.Generator().manual_seed(11)
    case = random_paged_case(gen)
    hq, d = case["hkv"] * case["g"], case["d"]
    w = torch.randint(-2, 3, (d, 64), generator=gen).to(torch.float32)
    k_int = torch.randint(-3, 4, case["k"].shape, generator=gen).to(torch.float32)
    q_int = torch.randint(-3, 4, (case["b"], hq, d), generator=gen).to(torch.float32)

    def step(o, q, k, table, seq_lens):
        q_codes = o.hash_encode(q, w.to(q.device))
        k_codes = o.hash_encode(k, w.to(k.device))
        dist = o.hamming_block_scores(q_codes, k_codes, table, seq_lens, "min")
        n_blocks = (seq_lens.to(torch.int64) + case["bs"] - 1) // case["bs"]
        budget = torch.full_like(n_blocks, 2)
        keep = torch.zeros_like(dist, dtype=torch.bool)
        keep[:, 0] = True
        return o.block_topk(-dist, budget, keep, n_blocks)

    ids, counts = step(ops, *map(dev, (q_int, k_int, case["table"], case["seq_lens"])))
    ref_ids, ref_counts = step(REF, q_int, k_int, case["table"], case["seq_lens"])
    assert torch.equal(cpu(ids).to(torch.int32), ref_ids) and torch.equal(cpu(counts).to(torch.int32), ref_counts)
