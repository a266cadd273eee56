"""KVStar's channel-major ops (`kvstar_reps_add`, `kvstar_block_mass`): the torch reference
against loop-by-loop NumPy oracles written from the contract's definitions and against the
scorer's row-major `_mass` (the quantity KVStar scored before), then the CUDA kernels (on a GPU,
else under Triton's CPU interpreter) against the oracles and the reference, and the scorer on the
CUDA backend through `BatchSelector` against the reference backend.

Representations are rounded once per call, in token order, so written bits must match the
oracle exactly; scores within float32 summation-order tolerances.
"""

from __future__ import annotations

import importlib.util
import math
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (see test_cuda_kernels)

from ucm.ops.reference import TorchReferenceOps
from ucm.sparse.base import ModelShapes
from ucm.sparse.batch_selection import BatchSelector
from ucm.sparse.factory import build_sparse_method
from ucm.sparse.kvstar import ChannelMajorReps, KVStarScorer

REF = TorchReferenceOps()
HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = HAS_TRITON and torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the CUDA kernels need triton (GPU or interpreter)")


class ChannelMajorReference(TorchReferenceOps):
    """The reference ops, asking KVStar for float32 channel-major representations: the scorer's
    channel-major path on plain torch."""

    def kvstar_reps_dtype(self, device: torch.device) -> torch.dtype | None:
        return torch.float32


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def ops(cuda_ops):
    return cuda_ops


@pytest.fixture(params=["scan-once", "scan", "sort"])
def write_ops(request, ops):
    """The writer's ways of finding a group's keys in a call: the in-kernel scan in one vector
    (decode) or in chunks (short prefills), and the stable sort of group ids (long prefills)."""
    ops.write_scan_max = 0 if request.param == "sort" else 1 << 30
    ops.write_scan_once = request.param != "scan"
    yield ops
    ops.write_scan_max, ops.write_scan_once = 4096, True


# ------------------------------------------------------------------------------ NumPy oracles
def round_to(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """float32 values rounded (nearest even) to `dtype`, back as float32."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dtype).to(torch.float32).numpy()


def np_reps_add(
    reps: np.ndarray, abs_sums: np.ndarray, key: np.ndarray, slots: np.ndarray, bs: int, merge: int, dtype: torch.dtype
) -> None:
    """The contract read literally (values held as float32): restart every block whose offset 0
    is in the call; per group of the call, the float32 sum of its keys in token order, added to
    the old value and rounded once to `dtype`; |K| per block (float64, then float32)."""
    r = reps.shape[3]
    for s in slots:
        if s >= 0 and s % bs == 0:
            reps[s // bs] = 0.0
            abs_sums[s // bs] = 0.0
    sums: dict[int, np.ndarray] = {}
    absum = {}
    for t, s in enumerate(slots):
        if s < 0:
            continue
        g = int(s) // merge
        sums[g] = sums.get(g, np.zeros(key.shape[1:], np.float32)) + key[t].astype(np.float32)
        absum[int(s) // bs] = absum.get(int(s) // bs, 0.0) + np.abs(key[t].astype(np.float64))
    for g, total in sums.items():
        p, rr = divmod(g, r)
        reps[p, :, :, rr] = round_to(reps[p, :, :, rr] + total, dtype)
    for p, a in absum.items():
        abs_sums[p] = (abs_sums[p].astype(np.float64) + a).astype(np.float32)


def np_block_mass(q, reps, abs_sums, table, lens, bs: int, kept: int, scale: float) -> np.ndarray:
    """KVStar's scores in float64, row by row and head by head: the kept channels by importance,
    one softmax per query over all the row's representations, the mass per block."""
    b, w, hq, d = q.shape
    _, hkv, _, r = reps.shape
    g = hq // hkv
    m = table.shape[1]
    out = np.full((b, m), -np.inf)
    for row in range(b):
        n = min(int(lens[row]) // bs, m)
        if n == 0:
            continue
        blocks = table[row, :n].astype(np.int64)
        mass = np.zeros(n)
        for h in range(hkv):
            imp = abs_sums[blocks, h].astype(np.float64).sum(0)
            dims = np.argsort(-imp, kind="stable")[:kept]
            k = reps[blocks, h][:, dims].astype(np.float64)  # [n, kept, R]
            for wi in range(w):
                for gi in range(g):
                    qv = q[row, wi, h * g + gi, dims].astype(np.float64)
                    logits = np.einsum("c,jcr->jr", qv, k) * scale
                    p = np.exp(logits - logits.max())
                    mass += (p / p.sum()).sum(1)
        out[row, :n] = mass
    return out


def random_table(lens: list[int], bs: int, nb_extra: int, gen_: torch.Generator, extra_cols: int = 1):
    """Scattered physical blocks per row (every row's partial block too); -1 past the row."""
    n = [max(math.ceil(s / bs), 0) for s in lens]
    m = max(max(n), 1) + extra_cols
    nb = sum(n) + nb_extra
    perm = torch.randperm(nb, generator=gen_)
    table = torch.full((len(lens), m), -1, dtype=torch.int32)
    at = 0
    for i, k in enumerate(n):
        table[i, :k] = perm[at : at + k].to(torch.int32)
        at += k
    return table, torch.tensor(lens, dtype=torch.int32), nb


# one call = (slots, keys): a prefill of whole and partial blocks, a shuffled block, padding,
# a slot written twice, decode steps completing groups, a recycled block (offset 0 again)
def write_calls(bs: int, h: int, d: int, gen_: torch.Generator, dtype: torch.dtype):
    calls = []
    pre = [
        torch.arange(3 * bs, 4 * bs),
        torch.arange(5 * bs, 5 * bs + bs // 2 + 1),
        (6 * bs + torch.randperm(bs, generator=gen_))[: bs - 1],
        torch.tensor([-1, 9 * bs + 2, 9 * bs + 2]),
    ]
    calls.append(torch.cat(pre))
    for step in range(3):
        calls.append(torch.tensor([5 * bs + bs // 2 + 1 + step, -1, 6 * bs + bs - 1 if step == 0 else -1]))
    calls.append(torch.tensor([3 * bs, 3 * bs + 1, 1 * bs]))  # block 3 recycled, block 1 starts
    calls.append(torch.empty(0, dtype=torch.int64))
    return [(s, torch.randn(len(s), h, d, generator=gen_).to(dtype)) for s in calls]


# ------------------------------------------------------------------------------ the reference
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", [1, 2, 4])
def test_reference_reps_add_matches_the_numpy_oracle(dtype, merge) -> None:
    bs, h, d, nb = 8, 2, 12, 12
    g = gen(merge)
    reps = torch.randn(nb, h, d, bs // merge, generator=g).to(dtype)  # stale values: recycled blocks
    abs_sums = torch.rand(nb, h, d, generator=g)
    want_r, want_a = reps.float().numpy().copy(), abs_sums.numpy().copy()
    for slots, key in write_calls(bs, h, d, g, torch.float32):
        REF.kvstar_reps_add(reps, abs_sums, key, slots, bs, merge)
        np_reps_add(want_r, want_a, key.numpy(), slots.numpy(), bs, merge, dtype)
    assert torch.equal(reps.float(), torch.from_numpy(want_r))
    torch.testing.assert_close(abs_sums, torch.from_numpy(want_a), rtol=1e-6, atol=1e-5)


def test_reference_reps_are_the_row_major_sums_channel_major() -> None:
    """float32 channel-major reps hold exactly `block_sums_add`'s sums, transposed."""
    bs, h, d, nb, merge = 16, 3, 8, 10, 4
    g = gen(3)
    reps, abs_cm = torch.zeros(nb, h, d, bs // merge), torch.zeros(nb, h, d)
    sums, abs_rm = torch.zeros(nb, bs // merge, h, d), torch.zeros(nb, h, d)
    for slots, key in write_calls(bs, h, d, g, torch.float32):
        REF.kvstar_reps_add(reps, abs_cm, key, slots, bs, merge)
        REF.block_sums_add(sums, abs_rm, key, slots, bs, merge)
    torch.testing.assert_close(reps, sums.permute(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(abs_cm, abs_rm, rtol=1e-6, atol=1e-6)


def test_reference_reps_add_validation() -> None:
    reps, abs_sums = torch.zeros(4, 1, 4, 4), torch.zeros(4, 1, 4)
    with pytest.raises(ValueError, match="representations per block"):
        REF.kvstar_reps_add(reps, abs_sums, torch.zeros(1, 1, 4), torch.tensor([0]), 8, 4)
    with pytest.raises(ValueError, match="past 4 blocks"):
        REF.kvstar_reps_add(reps, abs_sums, torch.zeros(1, 1, 4), torch.tensor([4 * 8]), 8, 2)


@pytest.mark.parametrize(
    "hq,hkv,d,bs,merge,kept,w,lens",
    [
        (4, 4, 16, 8, 2, 5, 1, [40, 7, 24]),  # G = 1; a row without a full block
        (8, 2, 16, 8, 1, 16, 2, [33, 17]),  # G = 4, every channel kept, a window of 2
        (4, 1, 24, 16, 4, 1, 1, [64, 0, 20]),  # one channel kept; an empty row
    ],
)
def test_reference_block_mass_matches_the_numpy_oracle(hq, hkv, d, bs, merge, kept, w, lens) -> None:
    g = gen(hq + d)
    table, sl, nb = random_table(lens, bs, 3, g)
    reps = torch.randn(nb, hkv, d, bs // merge, generator=g)
    abs_sums = torch.rand(nb, hkv, d, generator=g) * 3
    q = torch.randn(len(lens), w, hq, d, generator=g)
    scale = 0.3
    got = REF.kvstar_block_mass(q, reps, abs_sums, table, sl, bs, kept, scale)
    want = np_block_mass(q.numpy(), reps.numpy(), abs_sums.numpy(), table.numpy(), sl.numpy(), bs, kept, scale)
    torch.testing.assert_close(got.double(), torch.from_numpy(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merge,prune", [(2, 0.25), (1, 1.0), (4, 0.5)])
def test_reference_block_mass_is_the_scorers_row_major_mass(merge, prune) -> None:
    """Same keys into a row-major scorer (reference ops) and into channel-major float32 reps: the
    op gives `KVStarScorer._mass` (what KVStar scored before), whatever the window."""
    hq, hkv, d, bs, nb = 8, 2, 32, 8, 40
    shapes = ModelShapes(1, hq, hkv, d, bs, nb)
    scorer = KVStarScorer(shapes, REF, prune, merge, window=2)
    assert not scorer.channel_major
    g = gen(merge)
    lens = [70, 13, 40, 5]
    table, sl, _ = random_table(lens, bs, 0, g)
    reps, abs_sums = torch.zeros(nb, hkv, d, bs // merge), torch.zeros(nb, hkv, d)
    for r, n in enumerate(lens):
        slots = table[r, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
        keys = torch.randn(n, hkv, d, generator=g)
        scorer.on_kv_written(0, keys, slots)
        REF.kvstar_reps_add(reps, abs_sums, keys, slots, bs, merge)
    q = torch.randn(len(lens), 2, hq, d, generator=g)
    m = table.shape[1]
    n_full = (sl.long() // bs).clamp(max=m)
    want = scorer._mass(0, q, table, n_full, m)
    got = REF.kvstar_block_mass(q, reps, abs_sums, table, sl, bs, scorer.kept_dims, scorer.scale / merge)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ CUDA kernels
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("key_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("merge", [1, 2, 4])
def test_kernel_reps_add_writes_the_oracles_bits(write_ops, dtype, key_dtype, merge) -> None:
    """Recycled blocks, partial and shuffled prefills, padding, a slot written twice, decode
    steps that complete groups: the same bits as the oracle (one rounding per group and call,
    in token order) and |K| sums within float32 atomics' order."""
    bs, h, d, nb = 8, 2, 24, 12
    g = gen(merge * 7)
    reps = torch.randn(nb, h, d, bs // merge, generator=g).to(dtype)
    abs_sums = torch.rand(nb, h, d, generator=g)
    want_r, want_a = reps.float().numpy().copy(), abs_sums.numpy().copy()
    reps, abs_sums = reps.to(DEV), abs_sums.to(DEV)
    for slots, key in write_calls(bs, h, d, g, key_dtype):
        write_ops.kvstar_reps_add(reps, abs_sums, key.to(DEV), slots.to(DEV), bs, merge)
        np_reps_add(want_r, want_a, key.float().numpy(), slots.numpy(), bs, merge, dtype)
    assert torch.equal(reps.float().cpu(), torch.from_numpy(want_r))
    torch.testing.assert_close(abs_sums.cpu(), torch.from_numpy(want_a), rtol=1e-6, atol=1e-5)


@needs_triton
def test_kernel_reps_add_large_prefill_and_key_views(write_ops) -> None:
    """A prefill of several rows in vLLM's order (consecutive slots, blocks scattered) taken from
    a strided view of a fused qkv tensor, then decode: the layout equals the reference's sums."""
    hkv, d, bs, merge = 2, 32, 16, 2
    g = gen(11)
    lens = [100, 37, 64]
    table, _, nb = random_table(lens, bs, 4, g)
    slots = torch.cat([table[r, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs for r, n in enumerate(lens)])
    qkv = torch.randn(len(slots), (4 + 2 * hkv) * d, generator=g).to(torch.bfloat16)
    key = qkv[:, 4 * d : (4 + hkv) * d].view(-1, hkv, d)  # rows strided by the fused width
    reps = torch.zeros(nb, hkv, d, bs // merge, dtype=torch.bfloat16, device=DEV)
    abs_sums = torch.zeros(nb, hkv, d, device=DEV)
    sums, abs_rm = torch.zeros(nb, bs // merge, hkv, d), torch.zeros(nb, hkv, d)
    write_ops.kvstar_reps_add(reps, abs_sums, key.to(DEV), slots.to(DEV), bs, merge)
    REF.block_sums_add(sums, abs_rm, key, slots, bs, merge)
    for step in range(3):
        pos = torch.tensor(lens) + step
        new = table.gather(1, (pos // bs)[:, None].long())[:, 0].long() * bs + pos % bs
        k = torch.randn(len(lens), hkv, d, generator=g).to(torch.bfloat16)
        write_ops.kvstar_reps_add(reps, abs_sums, k.to(DEV), new.to(DEV), bs, merge)
        REF.block_sums_add(sums, abs_rm, k, new, bs, merge)
    want = sums.permute(0, 2, 3, 1)
    # within bfloat16 rounding: once for a prefill group, at most twice for a decode-built one
    torch.testing.assert_close(reps.float().cpu(), want, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(abs_sums.cpu(), abs_rm, rtol=1e-6, atol=1e-5)


MASS_CASES = [
    # hq, hkv, d, bs, merge, kept, w, lens
    pytest.param(8, 2, 32, 8, 2, 8, 1, [40, 7, 17, 24], id="gqa4-merge2-kept8"),
    pytest.param(4, 4, 16, 16, 1, 16, 1, [64, 33], id="gqa1-merge1-all-channels"),
    pytest.param(4, 1, 24, 8, 4, 5, 2, [30, 0, 8], id="gqa4-merge4-window2-empty-row"),
    pytest.param(16, 4, 64, 16, 2, 1, 1, [160, 15, 47], id="gqa4-one-channel"),
    pytest.param(8, 2, 40, 8, 4, 13, 1, [96, 70], id="non-pow2-dims"),
    pytest.param(32, 1, 16, 256, 1, 4, 3, [600, 300], id="wide-R-in-chunks-96-queries-in-two-programs"),
]


@needs_triton
@pytest.mark.parametrize(
    "qdtype,rdtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
)
@pytest.mark.parametrize("hq,hkv,d,bs,merge,kept,w,lens", MASS_CASES)
def test_kernel_block_mass_matches_the_reference(ops, qdtype, rdtype, hq, hkv, d, bs, merge, kept, w, lens) -> None:
    g = gen(hq * d + bs)
    table, sl, nb = random_table(lens, bs, 5, g, extra_cols=2)
    table[table < 0] = 10**6  # ids past a row's end may hold anything
    reps = torch.randn(nb, hkv, d, bs // merge, generator=g).to(rdtype)
    abs_sums = torch.rand(nb, hkv, d, generator=g) * 4
    # queries as a half-precision model gives them (the scorer's float32 windows hold such values):
    # on the GPU float32 queries go through tf32 dots, exact for these
    q = torch.randn(len(lens), w, hq, d, generator=g).to(torch.float16).to(qdtype)
    scale = 1 / math.sqrt(d) / merge
    args = (table.to(DEV), sl.to(DEV), bs, kept, scale)
    got = ops.kvstar_block_mass(q.to(DEV), reps.to(DEV), abs_sums.to(DEV), *args).cpu()
    want = REF.kvstar_block_mass(q, reps, abs_sums, table, sl, bs, kept, scale)
    n_full = (sl.long() // bs).clamp(max=table.shape[1])
    valid = torch.arange(table.shape[1])[None] < n_full[:, None]
    assert got.dtype == torch.float32 and got.shape == table.shape
    assert torch.equal(torch.isinf(got) & (got < 0), ~valid)
    torch.testing.assert_close(got[valid], want[valid], rtol=2e-4, atol=1e-6)
    # the mass of a row sums to its number of queries
    torch.testing.assert_close(torch.where(valid, got, 0.0).sum(1), (n_full > 0).float() * w * hq)


@needs_triton
@pytest.mark.parametrize(
    "hq,hkv,d,bs,merge,kept,w,lens",
    [
        MASS_CASES[0],
        MASS_CASES[3],
        MASS_CASES[5],
        pytest.param(4, 2, 16, 2, 1, 4, 1, [1100, 700], id="rows-of-550-blocks-two-passes"),
    ],
)
def test_kernel_block_mass_launch_settings(ops, hq, hkv, d, bs, merge, kept, w, lens) -> None:
    """Programs walking several tiles (loads pipelined across tiles), channel chunks of 16 (several
    per tile when more than 16 channels are kept), narrow and wide tiles, rows wider than the
    softmax kernel's tile (two passes over the row): the reference's scores."""
    g = gen(hq * d + bs)
    table, sl, nb = random_table(lens, bs, 5, g, extra_cols=2)
    reps = torch.randn(nb, hkv, d, bs // merge, generator=g).to(torch.bfloat16)
    abs_sums = torch.rand(nb, hkv, d, generator=g) * 4
    q = torch.randn(len(lens), w, hq, d, generator=g).to(torch.bfloat16)
    want = REF.kvstar_block_mass(q, reps, abs_sums, table, sl, bs, kept, 0.2)
    valid = torch.isfinite(want)
    try:
        for tpp, bk, bn in ((3, 16, 256), (2, 16, 32), (1, None, 512)):
            ops.kvstar_tiles_per_prog, ops.kvstar_block_k, ops.kvstar_block_n = tpp, bk, bn
            got = ops.kvstar_block_mass(
                q.to(DEV), reps.to(DEV), abs_sums.to(DEV), table.to(DEV), sl.to(DEV), bs, kept, 0.2
            ).cpu()
            assert torch.equal(torch.isfinite(got), valid)
            torch.testing.assert_close(got[valid], want[valid], rtol=2e-4, atol=1e-6)
    finally:
        ops.kvstar_tiles_per_prog = ops.kvstar_block_k = ops.kvstar_block_n = None


@needs_triton
def test_kernel_block_mass_without_full_blocks_and_empty_batch(ops) -> None:
    reps = torch.randn(6, 2, 16, 4).to(DEV, torch.bfloat16)
    abs_sums = torch.rand(6, 2, 16, device=DEV)
    q = torch.randn(2, 1, 4, 16, device=DEV)
    table = torch.tensor([[0, 1, 2], [3, -1, -1]], dtype=torch.int32, device=DEV)
    got = ops.kvstar_block_mass(q, reps, abs_sums, table, torch.tensor([7, 0], device=DEV), 8, 4, 0.1)
    assert torch.equal(got.cpu(), torch.full((2, 3), -math.inf))
    empty = ops.kvstar_block_mass(
        q[:0], reps, abs_sums, table[:0], torch.zeros(0, dtype=torch.int32, device=DEV), 8, 4, 0.1
    )
    assert empty.shape == (0, 3)
    with pytest.raises(ValueError, match="kept_dims"):
        ops.kvstar_block_mass(q, reps, abs_sums, table, torch.tensor([8, 8], device=DEV), 8, 17, 0.1)


@needs_triton
def test_kernel_kept_channels_follow_the_importance(ops) -> None:
    """Blocks whose logits differ only on one channel: the scores see it exactly when that
    channel is among the kept ones, i.e. when it is among the most important over full blocks."""
    hq, hkv, d, bs, merge = 4, 1, 16, 8, 2
    nb = 4
    reps = torch.zeros(nb, hkv, d, bs // merge)
    reps[1, 0, 5] = 4.0  # block 1's representations point along channel 5
    abs_sums = torch.ones(nb, hkv, d)
    abs_sums[:, 0, 5] = 0.5  # channel 5 is the least important ...
    q = torch.ones(1, 1, hq, d)
    table = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    lens = torch.tensor([4 * bs])
    for kept, seen in ((d - 1, False), (d, True)):
        got = ops.kvstar_block_mass(
            q.to(DEV), reps.to(DEV, torch.bfloat16), abs_sums.to(DEV), table.to(DEV), lens.to(DEV), bs, kept, 1.0
        ).cpu()
        want = REF.kvstar_block_mass(q, reps, abs_sums, table, lens, bs, kept, 1.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert (got[0, 1] > got[0, 0]) == seen
    abs_sums[3, 0, 5] = 100.0  # ... until a full block makes it the most important
    got = ops.kvstar_block_mass(
        q.to(DEV), reps.to(DEV, torch.bfloat16), abs_sums.to(DEV), table.to(DEV), lens.to(DEV), bs, 1, 1.0
    ).cpu()
    assert got[0, 1] > got[0, 0]
    got = ops.kvstar_block_mass(
        q.to(DEV),
        reps.to(DEV, torch.bfloat16),
        abs_sums.to(DEV),
        table.to(DEV),
        torch.tensor([3 * bs + 5], device=DEV),
        bs,
        1,
        1.0,
    ).cpu()  # block 3 is not full
    torch.testing.assert_close(got[0, :3], torch.full((3,), float(hq) / 3))


@needs_triton
def test_written_reps_score_like_the_reference(ops) -> None:
    """Keys written by the kernels and scored by the kernels against keys written and scored by
    the reference (float32 row-major sums, the scorer's former quantity): the bfloat16 layout
    moves the scores by less than its rounding."""
    hq, hkv, d, bs, merge = 8, 2, 32, 16, 2
    g = gen(5)
    lens = [150, 97, 64]
    table, sl, nb = random_table(lens, bs, 2, g)
    reps = torch.zeros(nb, hkv, d, bs // merge, dtype=torch.bfloat16, device=DEV)
    abs_sums = torch.zeros(nb, hkv, d, device=DEV)
    ref_reps, ref_abs = torch.zeros(nb, hkv, d, bs // merge), torch.zeros(nb, hkv, d)
    for r, n in enumerate(lens):
        slots = table[r, torch.arange(n) // bs].long() * bs + torch.arange(n) % bs
        keys = torch.randn(n, hkv, d, generator=g).to(torch.bfloat16)
        ops.kvstar_reps_add(reps, abs_sums, keys.to(DEV), slots.to(DEV), bs, merge)
        REF.kvstar_reps_add(ref_reps, ref_abs, keys, slots, bs, merge)
    q = torch.randn(len(lens), 1, hq, d, generator=g).to(torch.bfloat16)
    got = ops.kvstar_block_mass(q.to(DEV), reps, abs_sums, table.to(DEV), sl.to(DEV), bs, 8, 0.1).cpu()
    want = REF.kvstar_block_mass(q, ref_reps, ref_abs, table, sl, bs, 8, 0.1)
    valid = torch.isfinite(want)
    assert torch.equal(valid, torch.isfinite(got))
    torch.testing.assert_close(got[valid], want[valid], rtol=2e-2, atol=1e-4)


# ------------------------------------------------------------------------------ the scorer
def test_scorer_layout_and_memory(ops) -> None:
    """The CUDA backend asks for bfloat16 channel-major reps (half of the float32 sums); the
    reference keeps row-major sums; memory_bytes counts what is held."""
    shapes = ModelShapes(3, 8, 2, 32, 16, 20, DEV)
    cm = KVStarScorer(shapes, ops, 0.25, 2, window=1)
    rm = KVStarScorer(ModelShapes(3, 8, 2, 32, 16, 20), REF, 0.25, 2, window=1)
    assert cm.channel_major and not rm.channel_major
    assert isinstance(cm.acc[0], ChannelMajorReps) and cm.acc[0].reps.dtype == torch.bfloat16
    assert cm.acc[0].reps.shape == (20, 2, 32, 8)
    held = sum(a.reps.numel() * 2 + a.abs_sums.numel() * 4 for a in cm.acc)
    assert cm.memory_bytes() == held
    assert rm.memory_bytes() == sum(a.sums.numel() * 4 + a.abs_sums.numel() * 4 for a in rm.acc)
    assert cm.memory_bytes() < rm.memory_bytes()
    cm.acc[1].reps[4].fill_(3.0)
    cm.acc[1].abs_sums[4].fill_(2.0)
    cm.copy_blocks(torch.tensor([4]), torch.tensor([7]))
    assert torch.equal(cm.acc[1].reps[7], cm.acc[1].reps[4]) and torch.equal(
        cm.acc[1].abs_sums[7], cm.acc[1].abs_sums[4]
    )


BS, LAYERS, HQ, HKV, D, NB = 16, 2, 8, 2, 64, 96
CONFIG = {
    "KVStarMultiStep": {
        "init_window_sz": 1,
        "local_window_sz": 1,
        "sparse_ratio": 0.3,
        "min_blocks": 2,
        "retrieval_stride": 1,
        "blk_repre_dim_prune_ratio": 0.25,
        "blk_repre_inner_token_merge": 2,
    }
}


def _write(methods, lens, table, g) -> None:
    for layer in range(LAYERS):
        for r, n in enumerate(lens):
            slots = table[r, torch.arange(n) // BS].long() * BS + torch.arange(n) % BS
            keys = torch.randn(n, HKV, D, generator=g).to(torch.bfloat16)
            for method in methods:
                method.on_kv_written(layer, keys.to(method.shapes.device), slots.to(method.shapes.device))


def _same_up_to_ties(got: list[int], want: list[int], scores: torch.Tensor, rtol: float) -> None:
    """The kept blocks match, except swaps between blocks of (nearly) equal reference score."""
    extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
    assert len(extra) == len(missing), (got, want)
    a = sorted(float(scores[j]) for j in extra)
    b = sorted(float(scores[j]) for j in missing)
    for x, y in zip(a, b, strict=False):
        assert abs(x - y) <= rtol * max(abs(x), abs(y)), (got, want, a, b)


@pytest.mark.parametrize("uniform", [True, False])
def test_batch_selector_on_the_kernels_picks_the_reference_blocks(ops, uniform) -> None:
    """BatchSelector with KVStar on the CUDA backend (bfloat16 channel-major reps, the fused
    scorer) keeps the blocks the reference backend (float32 row-major sums, `_mass`) keeps."""
    g = gen(17)
    lens = [200, 150, 97, 64, 12]  # the last row is under every budget: dense
    table = torch.randperm(NB, generator=g)[: 5 * 14].view(5, 14).to(torch.int32)
    cfg = {"ucm_sparse_config": CONFIG}
    on_kernels = build_sparse_method(cfg, ModelShapes(LAYERS, HQ, HKV, D, BS, NB, DEV), ops, host_scoring=False)
    on_ref = build_sparse_method(cfg, ModelShapes(LAYERS, HQ, HKV, D, BS, NB), REF, host_scoring=False)
    assert on_kernels.scorer.channel_major and not on_ref.scorer.channel_major
    _write([on_kernels, on_ref], lens, table, g)
    qlens = torch.ones(5, dtype=torch.int32)
    qsl = torch.cat([torch.zeros(1, dtype=torch.int32), qlens.cumsum(0).to(torch.int32)])
    query = torch.randn(5, HQ, D, generator=g).to(torch.bfloat16)
    sl = torch.tensor(lens, dtype=torch.int32)
    sel_k, sel_r = BatchSelector(on_kernels), BatchSelector(on_ref)
    mql = 1 if uniform else None
    plan_k = sel_k.plan(qsl.to(DEV), sl.to(DEV), table.to(DEV), max_query_len=mql)
    plan_r = sel_r.plan(qsl, sl, table, max_query_len=mql)
    full = (sl // BS * BS).to(torch.int32)
    for layer in range(LAYERS):
        if not sel_r.layer_selects(layer):
            continue
        got_t, got_l = (x.cpu() for x in sel_k.select(layer, query.to(DEV), plan_k))
        want_t, want_l = sel_r.select(layer, query, plan_r)
        scores = on_ref.scorer.batch_scores(layer, query, table, full)
        for r, _n in enumerate(lens):
            kept = (int(want_l[r]) + BS - 1) // BS
            assert (int(got_l[r]) + BS - 1) // BS == kept
            got_cols = [int((table[r] == p).nonzero()[0]) for p in got_t[r, :kept].tolist()]
            want_cols = [int((table[r] == p).nonzero()[0]) for p in want_t[r, :kept].tolist()]
            _same_up_to_ties(got_cols, want_cols, scores[r], rtol=2e-2)
        assert int(got_l[0]) < lens[0] and int(got_l[4]) == lens[4]


def test_channel_major_scorer_selects_like_the_row_major_one() -> None:
    """The scorer's channel-major path (float32 reps through the contract's ops, on plain torch)
    against its row-major path: per-request retrieval with a window of 2 queries and the batch
    path pick the same blocks."""
    cfg = {"ucm_sparse_config": {"KVStarMultiStep": {**CONFIG["KVStarMultiStep"], "retrieval_stride": 2}}}
    shapes = ModelShapes(LAYERS, HQ, HKV, D, BS, NB)
    cm = build_sparse_method(cfg, shapes, ChannelMajorReference(), host_ops=ChannelMajorReference())
    rm = build_sparse_method(cfg, shapes, REF, host_ops=REF)
    assert cm.scorer.channel_major and not rm.scorer.channel_major
    g = gen(23)
    lens = [200, 150, 97]
    table = torch.randperm(NB, generator=g)[: 3 * 14].view(3, 14).to(torch.int32)
    _write([cm, rm], lens, table, g)
    ids = ["a", "b", "c"]
    for step in range(3):
        sl = torch.tensor(lens) + step
        plans = [m.begin_step(ids, sl, table) for m in (cm, rm)]
        q = torch.randn(3, HQ, D, generator=g)
        for layer in range(LAYERS):
            got, want = (m.select(layer, q, p) for m, p in zip((cm, rm), plans, strict=False))
            assert torch.equal(got.seq_lens, want.seq_lens) and torch.equal(got.block_table, want.block_table)
        for m, p in zip((cm, rm), plans, strict=False):
            m.end_step(p)
    full = (torch.tensor(lens) // BS * BS).to(torch.int32)
    q = torch.randn(3, HQ, D, generator=g)
    torch.testing.assert_close(
        cm.scorer.batch_scores(0, q, table, full), rm.scorer.batch_scores(0, q, table, full), rtol=1e-5, atol=1e-6
    )
    cm.close()
    rm.close()


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_batch_scores_replay_in_a_cuda_graph(ops) -> None:
    """Static shapes, no host read: a captured step (write + score) replays to the eager result."""
    hq, hkv, d, bs, nb = 32, 8, 128, 128, 300
    shapes = ModelShapes(1, hq, hkv, d, bs, nb, DEV)
    scorer = KVStarScorer(shapes, ops, 0.25, 2, window=1)
    g = torch.Generator(device=DEV).manual_seed(0)
    b, m = 4, 64
    table = torch.randperm(nb, device=DEV, generator=g)[: b * m].view(b, m).to(torch.int32)
    pos = torch.arange(m * bs - 7, device=DEV)
    for r in range(b):
        scorer.on_kv_written(
            0,
            torch.randn(len(pos), hkv, d, device=DEV, dtype=torch.bfloat16, generator=g),
            table[r, pos // bs].long() * bs + pos % bs,
        )
    new_pos = torch.full((b,), m * bs - 7, device=DEV)
    slots = table.gather(1, (new_pos // bs)[:, None].long())[:, 0].long() * bs + new_pos % bs
    key = torch.randn(b, hkv, d, device=DEV, dtype=torch.bfloat16, generator=g)
    q = torch.randn(b, hq, d, device=DEV, dtype=torch.bfloat16, generator=g)
    full = torch.tensor([m * bs - bs, 40 * bs, 0, 7 * bs], dtype=torch.int32, device=DEV)
    backup = (scorer.acc[0].reps.clone(), scorer.acc[0].abs_sums.clone())

    def step():
        scorer.on_kv_written(0, key, slots)
        return scorer.batch_scores(0, q, table, full)

    eager = step()
    scorer.acc[0].reps.copy_(backup[0])
    scorer.acc[0].abs_sums.copy_(backup[1])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up (compiles)
    torch.cuda.current_stream().wait_stream(s)
    scorer.acc[0].reps.copy_(backup[0])
    scorer.acc[0].abs_sums.copy_(backup[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    scorer.acc[0].reps.copy_(backup[0])
    scorer.acc[0].abs_sums.copy_(backup[1])
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    want = REF.kvstar_block_mass(
        q[:, None], scorer.acc[0].reps, scorer.acc[0].abs_sums, table, full, bs, scorer.kept_dims, scorer.scale / 2
    )
    torch.testing.assert_close(out, want, rtol=2e-4, atol=1e-6)
