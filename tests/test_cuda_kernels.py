"""The CUDA backend's own wiring: registry name and the reference fallback for inputs the kernels
do not take. Every op's kernels are checked against the reference (on a GPU, else under Triton's
CPU interpreter) in tests/test_ops_conformance.py, with both top-k strategies and split attention.
"""

from __future__ import annotations

import importlib.util
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


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


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


# ------------------------------------------------------------- norm-weighted SimHash (hash_cosine)
class _Launches:
    """Wraps the ops' kernel namespace: every launch recorded as (kernel, args, constexprs)."""

    def __init__(self, kernels) -> None:
        self.kernels, self.calls = kernels, []

    def __getattr__(self, name: str):
        kernel = getattr(self.kernels, name)
        calls = self.calls

        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls.append((name, args, kwargs))
                    return kernel[grid](*args, **kwargs)

                return launch

        return Launch()

    def names(self) -> list[str]:
        return [name for name, _, _ in self.calls]


@pytest.fixture
def launches(ops, monkeypatch) -> _Launches:
    """Record the kernel launches of `ops` for one test (the kernels themselves are shared)."""
    rec = _Launches(ops._k)
    monkeypatch.setattr(ops, "_k", rec)
    return rec


@pytest.fixture
def no_torch_default(monkeypatch) -> None:
    """The contract's torch definitions of the norm-weighted ops raise: a kernel must answer."""
    import ucm.ops.contract as contract

    def refuse(*args, **kwargs):
        raise AssertionError("the torch default ran instead of the kernel")

    monkeypatch.setattr(contract, "cosine_block_distances", refuse)
    monkeypatch.setattr(contract, "centred", refuse)


def _cosine_case(seed: int, c: int, hq: int = 8, hkv: int = 2, bs: int = 8, lens=(19, 1, 33)):
    from ucm.ops.hash_cosine import cosine_block_distances

    g = _gen(seed)
    n = [(s + bs - 1) // bs for s in lens]
    nb, m = sum(n) + 2, max(n) + 1
    table = torch.full((len(lens), m), -1, dtype=torch.int32)
    perm = torch.randperm(nb, generator=g).to(torch.int32)
    at = 0
    for i, k in enumerate(n):
        table[i, :k] = perm[at : at + k]
        at += k
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randint(0, 256, (len(lens), hq, c), dtype=torch.uint8, generator=g)
    qn = torch.rand(len(lens), hq, generator=g) * 4
    k = torch.randint(0, 256, (nb, bs, hkv, c), dtype=torch.uint8, generator=g)
    kn = (torch.rand(nb, bs, hkv, generator=g) * 10).to(torch.bfloat16)
    args = (q, qn, k, kn, table, seq_lens)
    want = {r: cosine_block_distances(*args, r) for r in ("min", "mean", "max")}
    return tuple(t.to(DEV) for t in args), want


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.cpu()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    scale = max(float(want[finite].abs().amax()), 1.0)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5 * scale)


def test_hamming_cosine_kernel_runs_on_words(ops, launches, no_torch_default):
    """Codes of a multiple of 4 bytes: one `_hamming_cosine_kernel` launch on int32 words."""
    args, want = _cosine_case(1, c=16)
    for reduce in ("min", "mean", "max"):
        _assert_close(ops.hamming_cosine_block_scores(*args, reduce), want[reduce])
    # codes in part of a wider cache's last dim: read in place as words through its strides
    q, qn, k, kn, table, lens = args
    wide = torch.zeros(*k.shape[:3], 24, dtype=torch.uint8, device=DEV)
    wide[..., 4:20] = k
    _assert_close(ops.hamming_cosine_block_scores(q, qn, wide[..., 4:20], kn, table, lens, "max"), want["max"])
    assert launches.names() == ["hamming_cosine_kernel"] * 4
    assert all(a[0].dtype == torch.int32 and a[2].dtype == torch.int32 for _, a, _ in launches.calls)
    assert launches.calls[-1][1][0].data_ptr() == wide.data_ptr() + 4  # no copy of the cache


def test_hamming_cosine_kernel_takes_unaligned_widths_as_bytes(ops, launches, no_torch_default):
    """Codes of 6 bytes (no int32 view), and 8-byte codes at an odd storage offset: the same
    kernel on bytes (upper bits zero), same answer."""
    args, want = _cosine_case(2, c=6, hq=4, hkv=4)
    for reduce in ("min", "mean", "max"):
        _assert_close(ops.hamming_cosine_block_scores(*args, reduce), want[reduce])
    (q, qn, k, kn, table, lens), want = _cosine_case(3, c=8)
    shifted = torch.empty(k.numel() + 1, dtype=torch.uint8, device=DEV)[1:].view(k.shape)
    shifted.copy_(k)
    _assert_close(ops.hamming_cosine_block_scores(q, qn, shifted, kn, table, lens, "mean"), want["mean"])
    assert launches.names() == ["hamming_cosine_kernel"] * 4
    assert all(a[0].dtype == torch.uint8 and a[2].dtype == torch.uint8 for _, a, _ in launches.calls)


def test_hamming_cosine_falls_back_where_the_kernel_cannot_run(ops, launches, monkeypatch):
    """Tensors the kernels cannot take (`_can_run` false: another device) get the torch default."""
    args, want = _cosine_case(4, c=16)
    monkeypatch.setattr(ops, "_can_run", lambda *tensors: False)
    _assert_close(ops.hamming_cosine_block_scores(*args, "min"), want["min"])
    assert launches.names() == []
    with pytest.raises(ValueError):
        ops.hamming_cosine_block_scores(*args, "median")


@pytest.mark.parametrize("nbits", [64, 48], ids=["words", "bytes"])
def test_hash_cosine_fuses_the_query_hash(ops, launches, monkeypatch, nbits):
    """Codes of a multiple of 32 bits: `_qhash_norm_kernel` hashes the queries and takes their
    norms (no `hash_encode`), then the scorer; other widths hash through `hash_encode` and score
    on bytes. Integer-valued inputs: every projection exact in any order."""
    from ucm.ops.hash_cosine import cosine_block_distances

    g = _gen(5)
    hq, hkv, d, bs = 8, 2, 16, 4
    (_, _, _, _, table, lens), _ = _cosine_case(6, c=nbits // 8, hq=hq, hkv=hkv, bs=bs)
    nb = int(table.max()) + 1
    q = torch.randint(-2, 3, (table.shape[0], hq, d), generator=g).to(torch.bfloat16)
    w = torch.randint(-2, 3, (d, nbits), generator=g).to(torch.float32)
    k = torch.randint(0, 256, (nb, bs, hkv, nbits // 8), dtype=torch.uint8, generator=g)
    kn = (torch.rand(nb, bs, hkv, generator=g) * 10).to(torch.bfloat16)
    want = cosine_block_distances(REF.hash_encode(q, w), q.float().norm(dim=-1), k, kn, table.cpu(), lens.cpu(), "min")
    if nbits % 32 == 0:

        def refuse(*args, **kwargs):
            raise AssertionError("the query was hashed outside the fused kernel")

        monkeypatch.setattr(ops, "hash_encode", refuse)
    got = ops.hash_cosine_block_scores(*(t.to(DEV) for t in (q, w, k, kn, table, lens)), "min")
    _assert_close(got, want)
    fused = ["qhash_norm_kernel", "hamming_cosine_kernel"]
    assert launches.names() == (fused if nbits % 32 == 0 else ["sign_pack_kernel", "hamming_cosine_kernel"])


def test_hash_norm_write_is_one_launch(ops, launches, no_torch_default):
    """`hash_norm_write` is `_hash_write_kernel` with the center and the norms fused in, and
    `hash_norm_write_layers` one such launch for every layer (a layer without a center too).
    Integer-valued keys, centers and weights: exact projections and sums of squares."""
    g = _gen(7)
    nb, bs, hkv, d, nbits = 4, 8, 2, 16, 64
    slots = torch.tensor([3, -1, 17, 30, 8])
    keep = slots >= 0
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[slots[keep]] = True
    w = torch.randint(-2, 3, (d, nbits), generator=g).to(torch.float32)
    center = torch.randint(-1, 2, (hkv, d), generator=g).to(torch.float32)

    def check(got_codes, got_norms, x, center_l):
        xc = x.float() if center_l is None else x.float() - center_l
        codes, norms = got_codes.cpu().view(nb * bs, hkv, -1), got_norms.cpu().view(nb * bs, hkv)
        assert torch.equal(codes[slots[keep]], REF.sign_bits_pack(xc[keep] @ w))
        assert torch.equal(norms[slots[keep]], xc[keep].norm(dim=-1).to(norms.dtype))
        assert not codes[~written].any() and not norms[~written].any()  # other slots untouched

    x = torch.randint(-3, 4, (5, hkv, d), generator=g).to(torch.bfloat16)
    got_c = torch.zeros(nb, bs, hkv, nbits // 8, dtype=torch.uint8, device=DEV)
    got_n = torch.zeros(nb, bs, hkv, dtype=torch.bfloat16, device=DEV)
    ops.hash_norm_write(got_c, got_n, *(t.to(DEV) for t in (x, w, center, slots)))
    check(got_c, got_n, x, center)
    assert launches.names() == ["hash_write_kernel"]
    assert launches.calls[0][2]["NORMS"] and launches.calls[0][2]["HAS_CENTER"]
    # every layer at once, keys read from the paged key caches at the slots; layer 1 without a center
    caches = [torch.randint(-3, 4, (nb, bs, hkv, d), generator=g).to(torch.bfloat16) for _ in range(3)]
    centers = [center, None, center + 1]
    codes = [torch.zeros(nb, bs, hkv, nbits // 8, dtype=torch.uint8, device=DEV) for _ in caches]
    norms = [torch.zeros(nb, bs, hkv, dtype=torch.float32, device=DEV) for _ in caches]
    before = ops.layered_writes
    ops.hash_norm_write_layers(
        codes,
        norms,
        [c.to(DEV) for c in caches],
        [w.to(DEV)] * 3,
        [None if c is None else c.to(DEV) for c in centers],
        slots.to(DEV),
    )
    assert ops.layered_writes == before + 1 and launches.names()[1:] == ["hash_write_kernel"]
    at = slots.clamp(min=0)
    for cache, center_l, got_codes, got_norms in zip(caches, centers, codes, norms, strict=True):
        check(got_codes, got_norms, cache[at // bs, at % bs], center_l)
