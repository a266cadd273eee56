"""CUDA backend kernels against the reference (`TorchReferenceOps`).

Two modes, chosen per machine:
  * a CUDA GPU with Triton: compiled kernels on GPU tensors, full-size shapes;
  * no GPU but Triton importable: the same kernels under Triton's CPU interpreter
    (`CudaOps(interpret=True)`), on tiny shapes so CI checks them in well under a few minutes.
Codes and block ids must match bit for bit; floats within tolerances of their dtype.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's interpreter must be chosen before triton is first imported (its reductions are
    # jit functions built at import time); on a CPU-only machine nothing else here needs it off.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from ucm.ops.reference import TorchReferenceOps

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = HAS_TRITON and torch.cuda.is_available()

pytestmark = pytest.mark.skipif(
    not HAS_TRITON,
    reason="the CUDA backend's kernels need triton (on a GPU, or its CPU interpreter): pip install triton",
)

DEV = "cuda" if ON_GPU else "cpu"
BIG = ON_GPU  # full shapes on a GPU, tiny ones in the interpreter
REF = TorchReferenceOps()


@pytest.fixture(scope="module")
def ops(cuda_ops):
    return cuda_ops


@pytest.fixture(params=["radix", "sort"])
def topk_ops(request, ops):
    """The top-k kernel's two exact strategies (radix passes, one bitonic sort)."""
    ops.topk_sort = request.param == "sort"
    yield ops
    ops.topk_sort = None


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _paged_table(seq_lens: list[int], bs: int, nb_extra: int, gen: torch.Generator):
    """A shuffled block table for rows of the given lengths (-1 past each row's blocks)."""
    n = [math.ceil(s / bs) for s in seq_lens]
    m = max(max(n), 1) + 1
    total = sum(n) + nb_extra
    perm = torch.randperm(total, generator=gen)
    table = torch.full((len(seq_lens), m), -1, dtype=torch.int32)
    at = 0
    for i, k in enumerate(n):
        table[i, :k] = perm[at : at + k].to(torch.int32)
        at += k
    return table.to(DEV), torch.tensor(seq_lens, dtype=torch.int32, device=DEV), total


def _rand_codes(shape, gen):
    return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(DEV)


# ------------------------------------------------------------------------------------ hashing
@pytest.mark.parametrize("n", [1, 7, 16, 128, 576, 100])
def test_sign_bits_pack(ops, n):
    g = _gen(n)
    x = torch.randn(3, 5, n, generator=g).to(DEV)
    x[0, 0, : min(n, 4)] = torch.tensor([0.0, -0.0, float("nan"), -1e-30][: min(n, 4)])
    got = ops.sign_bits_pack(x)
    assert got.dtype == torch.uint8 and got.shape == (3, 5, (n + 7) // 8)
    assert torch.equal(got, REF.sign_bits_pack(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv,d,nbits", [(2, 32, 64), (1, 72, 576), (4, 16, 20)])
def test_hash_write_matches_encode_plus_write(ops, dtype, hkv, d, nbits):
    g = _gen(hkv * d + nbits)
    nb, bs = 5, 8
    t = 13 if not BIG else 333
    nb = nb if not BIG else 64
    x = torch.randn(t, hkv, d, generator=g).to(DEV, dtype)
    w = torch.randn(d, nbits, generator=g).to(DEV)
    slots = torch.randperm(nb * bs, generator=g)[:t].to(DEV)
    slots[::4] = -1
    c = (nbits + 7) // 8
    cache = _rand_codes((nb, bs, hkv, c), g)
    want = cache.clone()
    REF.paged_write(want, REF.hash_encode(x, w), slots)
    ops.hash_write(cache, x, w, slots)
    # the fused kernel's float32 dot sums in another order than torch.matmul: a bit may differ
    # only where the projection is within rounding of 0
    got_bits, want_bits = _unpack(cache), _unpack(want)
    proj = torch.zeros(nb * bs, hkv, nbits, device=DEV)
    keep = slots >= 0
    proj[slots[keep]] = torch.matmul(x[keep].float(), w)
    near_zero = proj.abs().view(nb, bs, hkv, nbits) <= 1e-4 * proj.abs().amax().clamp(min=1)
    near_zero = torch.nn.functional.pad(near_zero, (0, 8 * c - nbits), value=False)  # padding bits are 0 in both
    assert torch.equal(got_bits | near_zero, want_bits | near_zero)
    assert (got_bits != want_bits).float().mean() < 1e-3
    assert torch.equal(ops.hash_encode(x, w), REF.hash_encode(x, w))


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., C] -> bool bits [..., 8C] (bit i of byte j is element 8j + i)."""
    bits = (codes[..., None].to(torch.int32) >> torch.arange(8, device=codes.device)) & 1
    return bits.flatten(-2).bool()


# ------------------------------------------------------------------------------------ scoring
HAMMING_CASES = [
    # (hq, hkv, code bytes, block size, seq lens)
    (4, 1, 16, 8, [1, 17, 40]),  # G=4 on one KV head, partial blocks
    (8, 8, 16, 8, [24, 3]),  # G=1 (plain MHA)
    (8, 2, 4, 4, [9]),  # tiny codes
    (16, 1, 72, 4, [10, 7]),  # MLA: 576-bit codes, 16 q heads on one latent head
    (4, 2, 6, 4, [11, 1]),  # code width not a multiple of 4: byte words
]
if BIG:
    HAMMING_CASES += [
        (32, 8, 16, 128, [32769, 1000, 128, 4097]),
        (128, 1, 72, 64, [5000, 63]),
        (32, 4, 16, 16, [3333, 16]),
    ]


@pytest.mark.parametrize("reduce", ["min", "mean", "max"])
@pytest.mark.parametrize("hq,hkv,c,bs,lens", HAMMING_CASES)
def test_hamming_block_scores(ops, reduce, hq, hkv, c, bs, lens):
    g = _gen(hq * 31 + c * 7 + bs)
    table, seq_lens, nb = _paged_table(lens, bs, 3, g)
    q = _rand_codes((len(lens), hq, c), g)
    k = _rand_codes((nb, bs, hkv, c), g)
    got = ops.hamming_block_scores(q, k, table, seq_lens, reduce)
    want = REF.hamming_block_scores(q, k, table, seq_lens, reduce)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize(
    "hq,hkv,d,nbits,bs,lens",
    [(8, 2, 16, 64, 4, [9, 30]), (16, 1, 40, 96, 4, [13])]
    + ([(32, 8, 128, 128, 128, [32768, 300]), (128, 1, 576, 576, 64, [3000])] if BIG else []),
)
def test_hash_hamming_block_scores_fused(ops, hq, hkv, d, nbits, bs, lens):
    """Fused query hash + scoring equals hash_encode then the reference scorer.

    Integer-valued inputs make every projection exact in any summation order, so the codes
    (and the distances) must agree bit for bit, zeros included.
    """
    g = _gen(hq + nbits)
    table, seq_lens, nb = _paged_table(lens, bs, 2, g)
    q = torch.randint(-2, 3, (len(lens), hq, d), generator=g).to(DEV, torch.bfloat16)
    w = torch.randint(-2, 3, (d, nbits), generator=g).to(DEV, torch.float32)
    k = _rand_codes((nb, bs, hkv, nbits // 8), g)
    for reduce in ("min", "mean"):
        got = ops.hash_hamming_block_scores(q, w, k, table, seq_lens, reduce)
        want = REF.hamming_block_scores(REF.hash_encode(q, w), k, table, seq_lens, reduce)
        assert torch.equal(got, want)


DOT_CASES = [(4, 2, 16, [9, 30], 8), (16, 1, 40, [5], 4)]
if BIG:
    DOT_CASES += [(32, 8, 128, [32768, 700, 1], 128), (128, 1, 576, [4000], 64)]


@pytest.mark.parametrize("mode", ["mean", "max"])
@pytest.mark.parametrize("hq,hkv,d,lens,bs", DOT_CASES)
def test_block_scores_dot(ops, mode, hq, hkv, d, lens, bs):
    g = _gen(hq + d)
    table, seq_lens, nb = _paged_table(lens, bs, 2, g)
    q = torch.randn(len(lens), hq, d, generator=g).to(DEV)
    reps = torch.randn(nb, hkv, d, generator=g).to(DEV)
    got = ops.block_scores_dot(q, reps, table, seq_lens, bs, mode)
    want = REF.block_scores_dot(q, reps, table, seq_lens, bs, mode)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


# ---------------------------------------------------------------------------------- selection
def _topk_inputs(b, m, gen, ties: bool):
    if ties:
        scores = torch.randint(-3, 3, (b, m), generator=gen).to(torch.float32)
    else:
        scores = torch.randn(b, m, generator=gen)
    n_blocks = torch.randint(0, m + 1, (b,), generator=gen)
    n_blocks[0] = m
    k = torch.randint(0, m + 3, (b,), generator=gen)
    keep = torch.rand(b, m, generator=gen) < 0.1
    return scores, k, keep, n_blocks


TOPK_SHAPES = [(6, 1), (5, 13), (4, 64), (3, 130)] + ([(100, 257), (8, 1024), (2, 8192)] if BIG else [])


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("b,m", TOPK_SHAPES)
def test_block_topk(topk_ops, b, m, ties):
    g = _gen(b * 1000 + m + ties)
    scores, k, keep, n_blocks = _topk_inputs(b, m, g, ties)
    if m > 3:  # awkward values: signed zeros, infinities, NaN, forced blocks at both ends
        scores[0, :4] = torch.tensor([-0.0, 0.0, float("inf"), float("nan")])
        scores[-1, -2:] = float("-inf")
        keep[0, 0] = keep[0, -1] = True
    scores, k, keep, n_blocks = (t.to(DEV) for t in (scores, k, keep, n_blocks))
    ids, counts = topk_ops.block_topk(scores, k, keep, n_blocks)
    rids, rcounts = REF.block_topk(scores, k, keep, n_blocks)
    assert ids.dtype == torch.int32 and counts.dtype == torch.int32
    assert torch.equal(counts, rcounts)
    assert torch.equal(ids, rids)


def test_block_topk_forced_beats_inf_and_wide_n_blocks(topk_ops):
    """Forced blocks win against +inf scores; n_blocks past the table width is clamped to M."""
    scores = torch.tensor([[float("inf"), 0.0, 0.0, 1.0], [3.0, float("inf"), float("nan"), 2.0]], device=DEV)
    keep = torch.tensor([[False, True, False, False], [False, False, True, False]], device=DEV)
    k = torch.tensor([1, 2], device=DEV)
    n_blocks = torch.tensor([4, 9], device=DEV)
    got = topk_ops.block_topk(scores, k, keep, n_blocks)
    want = REF.block_topk(scores, k, keep, n_blocks)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_block_topk_k_at_least_blocks(topk_ops):
    g = _gen(5)
    scores = torch.randn(3, 10, generator=g).to(DEV)
    k = torch.tensor([10, 50, 3], device=DEV)
    keep = torch.zeros(3, 10, dtype=torch.bool, device=DEV)
    keep[2, :6] = True  # more forced blocks than k
    n_blocks = torch.tensor([10, 7, 9], device=DEV)
    got = topk_ops.block_topk(scores, k, keep, n_blocks)
    want = REF.block_topk(scores, k, keep, n_blocks)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("bs", [4, 16])
def test_select_and_rewrite_rewrites_table(topk_ops, bs):
    g = _gen(bs)
    lens = [bs * 9 + 3, bs * 4, 1, bs * 12, 0, bs * 5] if not BIG else [bs * 2000 + 3, bs * 4, 1, bs * 1200, 0, bs * 5]
    table, seq_lens, _ = _paged_table(lens, bs, 0, g)
    b, m = table.shape
    scores = torch.randn(b, m, generator=g).to(DEV)
    keep = torch.zeros(b, m, dtype=torch.bool, device=DEV)
    n_b = (seq_lens.long() + bs - 1) // bs
    keep[torch.arange(b, device=DEV), (n_b - 1).clamp(min=0)] = True  # the last block, as a sparse step would
    keep[4] = False  # the empty row keeps nothing
    k = torch.tensor([3, 2, 5, 7, 3, 1000], device=DEV)  # the last row keeps all its blocks: it comes back as it was
    tab, new_lens = topk_ops.select_and_rewrite(scores, k, keep, table, seq_lens, bs)
    rids, rcounts = REF.block_topk(scores, k, keep, n_b)
    rtab, rlens = REF.select_and_rewrite(scores, k, keep, table, seq_lens, bs)
    dtab, dlens = topk_ops.select_and_rewrite(-scores, k, keep, table, seq_lens, bs, largest=False)
    assert torch.equal(tab, rtab) and torch.equal(new_lens, rlens)
    assert torch.equal(dtab, rtab) and torch.equal(dlens, rlens)
    for r in range(b):
        c = int(rcounts[r])
        sel = rids[r, :c].long()
        assert torch.equal(tab[r, :c], table[r, sel])
        assert not tab[r, c:].any()
        n_tok = sum(min(bs, int(seq_lens[r]) - int(j) * bs) for j in sel)
        assert int(new_lens[r]) == n_tok
    assert torch.equal(tab[5, : int(n_b[5])], table[5, : int(n_b[5])]) and int(new_lens[5]) == int(seq_lens[5])
    assert int(new_lens[4]) == 0


@pytest.mark.parametrize("merge", [1, 4])
def test_block_sums_add_matches_reference(ops, merge):
    """Running block sums from written keys: fresh blocks (offset 0 written) restart, padding
    slots are skipped, several keys of one block in one call all land (atomics)."""
    g = _gen(11 + merge)
    nb, bs, h, d = 6, 8, 2, 16
    sums = torch.randn(nb, bs // merge, h, d, generator=g).to(DEV)
    abs_sums = torch.randn(nb, h, d, generator=g).to(DEV)
    # block 1 from its start (a prefill), two keys into block 3 mid-block, a padding slot, the
    # first three offsets of block 5 (fresh: its other groups restart from zero too), block 0's
    # last offset alone (a decode step)
    slots = torch.tensor([8, 9, 10, 11, 12, 13, 14, 15, 26, 27, -1, 40, 41, 42, 7], device=DEV)
    key = torch.randn(slots.shape[0], h, d, generator=g).to(DEV)
    want, want_abs = sums.clone(), abs_sums.clone()
    REF.block_sums_add(want, want_abs, key, slots, bs, merge)
    ops.block_sums_add(sums, abs_sums, key, slots, bs, merge)
    torch.testing.assert_close(sums, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(abs_sums, want_abs, rtol=1e-5, atol=1e-5)
    no_abs = want.clone()
    ops.block_sums_add(no_abs, None, key, slots, bs, merge)
    REF.block_sums_add(want, None, key, slots, bs, merge)
    torch.testing.assert_close(no_abs, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- attention
ATTN_CASES = [
    # (hq, hkv, d, dv, bs, lens, shared_latent)
    (4, 1, 16, 16, 4, [1, 9, 23], False),
    (8, 8, 32, 32, 8, [17, 40], False),  # G=1
    (8, 2, 16, 32, 4, [13], False),  # Dv != D
    (16, 1, 48, 32, 4, [21, 6], True),  # MLA-like: V = first 32 dims of the latent cache, K 32 + 16 rope
    (4, 2, 24, 24, 4, [10, 0], False),  # non-power-of-two head dim, an empty row
]
if BIG:
    ATTN_CASES += [
        (32, 8, 128, 128, 128, [32768, 1000, 130, 1], False),
        (32, 4, 128, 128, 16, [5000, 77], False),
        (16, 1, 576, 512, 64, [4097, 64], True),
        (128, 1, 576, 512, 64, [3000, 1], True),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("hq,hkv,d,dv,bs,lens,shared", ATTN_CASES)
def test_paged_decode_attention(ops, dtype, splits, hq, hkv, d, dv, bs, lens, shared):
    if not BIG and dtype == torch.float16 and splits == 3:
        pytest.skip("covered by bf16 on the interpreter")
    g = _gen(hq * d + bs + len(lens))
    table, seq_lens, nb = _paged_table(lens, bs, 2, g)
    q = torch.randn(len(lens), hq, d, generator=g).to(DEV, dtype)
    k = torch.randn(nb, bs, hkv, d, generator=g).to(DEV, dtype)
    v = k[..., :dv] if shared else torch.randn(nb, bs, hkv, dv, generator=g).to(DEV, dtype)
    scale = d**-0.5
    out, lse = ops.paged_decode_attention(q, k, v, table, seq_lens, scale, num_splits=splits)
    rq, rk, rv = (t.to(torch.float32) for t in (q, k, v))
    rout, rlse = REF.paged_decode_attention(rq, rk, rv, table, seq_lens, scale)
    assert out.dtype == dtype and out.shape == rout.shape and lse.dtype == torch.float32
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    torch.testing.assert_close(out.float(), rout, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=tol)


def test_paged_decode_attention_sparse_table(ops):
    """Attention over a rewritten table equals the reference over the same selection."""
    g = _gen(77)
    bs, hq, hkv, d = 4, 4, 2, 16
    lens = [37, 18]
    table, seq_lens, nb = _paged_table(lens, bs, 0, g)
    q = torch.randn(2, hq, d, generator=g).to(DEV, torch.bfloat16)
    k = torch.randn(nb, bs, hkv, d, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn(nb, bs, hkv, d, generator=g).to(DEV, torch.bfloat16)
    m = table.shape[1]
    scores = torch.randn(2, m, generator=g).to(DEV)
    keep = torch.zeros(2, m, dtype=torch.bool, device=DEV)
    keep[0, 9] = keep[1, 4] = True  # each row's partial last block
    k_budget = torch.tensor([4, 2], device=DEV)
    tab, new_lens = ops.select_and_rewrite(scores, k_budget, keep, table, seq_lens, bs)
    out, lse = ops.paged_decode_attention(q, k, v, tab, new_lens, d**-0.5)
    rout, rlse = REF.paged_decode_attention(q.float(), k.float(), v.float(), tab, new_lens, d**-0.5)
    torch.testing.assert_close(out.float(), rout, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, rlse, rtol=1e-4, atol=2e-2)


# ------------------------------------------------------------------------------------- wiring
def test_registry_and_fallbacks(ops):
    assert ops.name == "cuda"
    # CPU float64 scores are outside the kernels: the reference answers
    scores = torch.randn(2, 5, dtype=torch.float64, device=DEV)
    k = torch.tensor([2, 3], device=DEV)
    keep = torch.zeros(2, 5, dtype=torch.bool, device=DEV)
    nbk = torch.tensor([5, 4], device=DEV)
    got = ops.block_topk(scores, k, keep, nbk)
    want = REF.block_topk(scores, k, keep, nbk)
    assert torch.equal(got[0], want[0])
    if ON_GPU:
        from ucm.ops.registry import get_ops

        assert get_ops("cuda").name == "cuda"


@pytest.mark.parametrize("merge", [32, 4])
def test_block_sums_add_on_the_device(ops, merge: int) -> None:
    """The representations' running sums on the backend's device (the contract's torch path on
    CUDA tensors) equal the reference's on the CPU, recycled block included."""
    g = _gen(5)
    nb, bs, h, d = 8, 32, 3, 16
    ref = (torch.zeros(nb, bs // merge, h, d), torch.zeros(nb, h, d))
    dev = tuple(t.to(DEV) for t in ref)
    for slots in (torch.arange(0, 80), torch.tensor([80, 81, -1, 200]), torch.tensor([33, 32])):
        keys = torch.randn(len(slots), h, d, generator=g)
        REF.block_sums_add(*ref, keys, slots, bs, merge)
        ops.block_sums_add(*dev, keys.to(DEV), slots.to(DEV), bs, merge)
    for a, b in zip(ref, dev, strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
