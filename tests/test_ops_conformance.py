"""One conformance suite for the op contract, parametrised over every backend.

Each case builds its inputs on the host from seeded generators, runs the backend on its device
and the torch reference (`TorchReferenceOps`) on the host, and compares on the host: bit for bit
for codes, ids, counts and min/max statistics, within the dtype's tolerance for floats. Cases
that have a loop-by-loop NumPy oracle (written from the contract's text) check every backend
against that oracle too, the reference included.

Backends:
  * reference      the oracle itself (the NumPy-oracle cases are its tests);
  * cpu            the C++/OpenMP kernels (JIT-built once per machine);
  * cpu-fallback   `CpuOps(native=False)`: the CPU backend's validation over the torch path;
  * cuda           the Triton kernels on a GPU, else under Triton's CPU interpreter
                   (TRITON_INTERPRET=1, set below before triton is first imported);
  * ascend         torch_npu on an NPU; skipped with the registry probe's reason elsewhere.

Case sizes: `gpu` cases (full-size shapes) run only where the kernels are compiled for a GPU;
`native` cases (CPU-sized shapes, hypothesis searches) skip the Triton interpreter, which runs
the small cases. Launch variants of the CUDA kernels (both top-k strategies, split attention)
run inside the cases that exercise them. Backend-specific behaviour (build folders and locks,
fallback decisions, validation messages, graph capture) stays in the per-backend test files.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported (see conftest's cuda_ops)

from tests.paged import make_paged, paged_case, rand_codes
from ucm.ops import TorchReferenceOps, probe
from ucm.ops.contract import SparseOps

REF = TorchReferenceOps()
HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = HAS_TRITON and torch.cuda.is_available()
HYP = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@dataclass
class Backend:
    name: str
    ops: SparseOps
    device: torch.device
    interpreted: bool = False  # Triton's CPU interpreter: small cases only
    gpu: bool = False  # compiled GPU kernels: the full-size cases too
    exact_mean: bool = True  # Hamming "mean" bit-exact (Ascend: within an ulp)
    #: attribute settings of the ops to run a case under, each restored after: top-k strategies,
    #: grouped-scorer launches (CUDA: what a tuned file may ask for)
    topk_variants: list[dict] = field(default_factory=lambda: [{}])
    attention_kwargs: list[dict] = field(default_factory=lambda: [{}])
    grouped_launches: list[dict] = field(default_factory=lambda: [{}])

    def to(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def need(self, tier: str) -> None:
        """Skip a `gpu` case off the GPU and a `native` case in the interpreter."""
        if tier == "gpu" and not self.gpu:
            pytest.skip("a full-size case: runs on the GPU machine only")
        if tier == "native" and self.interpreted:
            pytest.skip("CPU-sized case: Triton's interpreter runs the small cases")

    def _each_setting(self, settings: list[dict]) -> Iterator[dict]:
        for setting in settings:
            before = {k: getattr(self.ops, k) for k in setting}
            for k, v in setting.items():
                setattr(self.ops, k, v)
            try:
                yield setting
            finally:
                for k, v in before.items():
                    setattr(self.ops, k, v)

    def each_topk_variant(self) -> Iterator[dict]:
        """Run the enclosed block once per top-k strategy of this backend (CUDA: 8-bit histogram
        radix, 2-bit compare radix, sort)."""
        return self._each_setting(self.topk_variants)

    def each_grouped_launch(self) -> Iterator[dict]:
        """Run the enclosed block once per grouped-scorer launch setting."""
        return self._each_setting(self.grouped_launches)


def _cuda_backend(request) -> Backend:
    ops = request.getfixturevalue("cuda_ops")  # skips without triton / interpreter
    dev = torch.device("cuda" if ON_GPU else "cpu")
    return Backend(
        "cuda",
        ops,
        dev,
        interpreted=not ON_GPU,
        gpu=ON_GPU,
        topk_variants=[  # 8-bit histogram radix (with and without its early stop), 2-bit compare radix, sort
            {"topk_sort": False, "topk_radix_bits": 8},
            {"topk_sort": False, "topk_radix_bits": 8, "topk_early_exit": False},
            {"topk_sort": False, "topk_radix_bits": 2},
            {"topk_sort": True, "topk_radix_bits": None},
        ],
        attention_kwargs=[{}, {"num_splits": 1}, {"num_splits": 3}],
        # what a tuned file may ask for (backends/cuda/tuned.py): several block columns a
        # program (a row's last program partly past the table), float8 widened to float16
        grouped_launches=[
            {},
            {"grouped_block_m": 4, "grouped_block_r": 32, "grouped_stages": 3, "grouped_widen": "float16"},
            {"grouped_block_m": 2, "grouped_dot": False},
        ],
    )


@pytest.fixture(scope="module", params=["reference", "cpu", "cpu-fallback", "cuda", "ascend"])
def backend(request) -> Backend:
    name = request.param
    if name == "reference":
        return Backend(name, REF, torch.device("cpu"))
    if name.startswith("cpu"):
        from ucm_backends.cpu.ops import CpuOps

        return Backend(name, CpuOps(native=False if name == "cpu-fallback" else None), torch.device("cpu"))
    if name == "cuda":
        return _cuda_backend(request)
    result = probe("ascend")
    if not result.available:
        pytest.skip(f"needs an Ascend NPU with torch_npu: {result.reason}")
    from ucm.ops import get_ops

    return Backend(
        name, get_ops("ascend"), torch.device(os.environ.get("UCM_ASCEND_TEST_DEVICE", "npu")), exact_mean=False
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu")


def shuffled_table(seq_lens: list[int], bs: int, nb_extra: int, g: torch.Generator):
    """Distinct shuffled physical blocks per row, int32, -1 past each row's blocks, one spare column."""
    n = [math.ceil(s / bs) for s in seq_lens]
    m = max(max(n), 1) + 1
    total = sum(n) + nb_extra
    perm = torch.randperm(total, generator=g)
    table = torch.full((len(seq_lens), m), -1, dtype=torch.int32)
    at = 0
    for i, k in enumerate(n):
        table[i, :k] = perm[at : at + k].to(torch.int32)
        at += k
    return table, torch.tensor(seq_lens, dtype=torch.int32), total


def unpack_bits(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., C] -> bool bits [..., 8C] (bit i of byte j is element 8j + i)."""
    bits = (codes[..., None].to(torch.int32) >> torch.arange(8, device=codes.device)) & 1
    return bits.flatten(-2).bool()


# ------------------------------------------------------------------------------ NumPy oracles
def np_pack(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    out = np.zeros((*x.shape[:-1], (n + 7) // 8), dtype=np.uint8)
    for idx in np.ndindex(*x.shape[:-1]):
        for i in range(n):
            if x[idx + (i,)] >= 0:
                out[idx + (i // 8,)] |= np.uint8(1 << (i % 8))
    return out


def np_popcount(x: np.ndarray) -> int:
    return int(sum(bin(int(v)).count("1") for v in x.ravel()))


def np_topk(scores, k, must, n):
    out = []
    for r in range(scores.shape[0]):
        valid = list(range(n[r]))
        forced = [j for j in valid if must[r, j]]
        rest = sorted(
            (j for j in valid if not must[r, j]),
            key=lambda j: (-(scores[r, j] if not np.isnan(scores[r, j]) else -np.inf), j),
        )
        count = min(n[r], max(k[r], len(forced)))
        out.append(sorted(forced + rest[: count - len(forced)]))
    return out


ORACLE_CASES = [
    # (seq_lens, block_size, Hq, Hkv, D)
    ([37, 5, 64], 8, 4, 4, 16),  # GQA 1, lengths not multiples of the block
    ([3], 8, 8, 2, 32),  # shorter than one block, GQA 4
    ([40, 17, 1], 4, 16, 2, 8),  # GQA 8, a one-token row
    ([24, 33], 8, 4, 1, 72),  # MLA-like: one KV head, wide
]


# ------------------------------------------------------------------------------------- hashing
@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 64])
def test_sign_bits_pack_matches_the_bitwise_definition(backend: Backend, n: int) -> None:
    x = torch.randn(3, 2, n, generator=gen(n))
    x[0, 0, 0] = 0.0  # zero packs as 1
    x[0, 1, 0] = -0.0  # so does negative zero (-0.0 >= 0)
    got = host(backend.ops.sign_bits_pack(backend.to(x)))
    assert got.dtype == torch.uint8 and got.shape == (3, 2, (n + 7) // 8)
    np.testing.assert_array_equal(got.numpy(), np_pack(x.numpy()))


def test_sign_bits_pack_documented_example(backend: Backend) -> None:
    x = torch.tensor([5, 4, 3, 2, 0, -1, -2, 4, 3, 2, 1, 0, -1, -2], dtype=torch.float32)
    assert host(backend.ops.sign_bits_pack(backend.to(x))).tolist() == [159, 15]
    assert host(backend.ops.sign_bits_pack(backend.to(x.view(2, 7)))).tolist() == [[31], [31]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 64, 100, 128, 576])
def test_sign_bits_pack(backend: Backend, dtype: torch.dtype, n: int) -> None:
    """Signed zeros, NaN (a 0 bit), infinities and a tiny negative, every dtype."""
    if backend.interpreted and (dtype in (torch.float64, torch.float16) or n in (8, 9, 64)):
        pytest.skip("the interpreter runs float32 / bfloat16 at a few widths")
    x = torch.randn(3, 5, n, generator=gen(n)).to(dtype)
    x[0, 0] = 0.0
    x[0, 1] = -0.0
    x[0, 2] = float("nan")
    x[1, 0, ::2] = float("-inf")
    x[1, 1, ::3] = float("inf")
    x[2, 0, : min(n, 4)] = torch.tensor([0.0, -0.0, float("nan"), -1e-30][: min(n, 4)]).to(dtype)
    out = host(backend.ops.sign_bits_pack(backend.to(x)))
    assert out.dtype == torch.uint8 and out.shape == (3, 5, (n + 7) // 8)
    assert torch.equal(out, REF.sign_bits_pack(x))


def test_sign_bits_pack_noncontiguous_1d_and_empty(backend: Backend) -> None:
    x = torch.randn(40, 24, generator=gen(1)).t()  # [24, 40], not contiguous
    assert torch.equal(host(backend.ops.sign_bits_pack(backend.to(x))), REF.sign_bits_pack(x))
    v = torch.randn(13, generator=gen(2))
    assert torch.equal(host(backend.ops.sign_bits_pack(backend.to(v))), REF.sign_bits_pack(v))
    assert backend.ops.sign_bits_pack(backend.to(torch.randn(0, 16))).shape == (0, 2)


@pytest.mark.parametrize("seed", range(6))
def test_sign_bits_pack_random_shapes(backend: Backend, seed: int) -> None:
    backend.need("native")
    g = gen(seed)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        lead = tuple(int(s) for s in torch.randint(1, 6, (int(torch.randint(0, 3, (), generator=g)),), generator=g))
        n = int(torch.randint(1, 300, (), generator=g))
        x = torch.randn(*lead, n, generator=g).to(dtype)
        x.view(-1)[:: max(1, n // 3)] = 0.0
        x.view(-1)[1 :: max(2, n // 2)] = -0.0
        got = backend.ops.sign_bits_pack(backend.to(x))
        assert got.device.type == backend.device.type and got.dtype == torch.uint8
        assert torch.equal(host(got), REF.sign_bits_pack(x))


@HYP
@given(
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=2),
    n=st.integers(1, 80),
    seed=st.integers(0, 2**31 - 1),
)
def test_sign_bits_pack_hypothesis(backend: Backend, lead: list[int], n: int, seed: int) -> None:
    backend.need("native")
    x = torch.randn(*lead, n, generator=gen(seed))
    x = torch.where(torch.rand(x.shape, generator=gen(seed + 1)) < 0.1, torch.zeros_like(x), x)
    assert torch.equal(host(backend.ops.sign_bits_pack(backend.to(x))), REF.sign_bits_pack(x))


@pytest.mark.parametrize("nbits", [128, 100, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hash_encode_on_integer_data(backend: Backend, nbits: int, dtype: torch.dtype) -> None:
    """Integer-valued inputs make the float32 projection exact in any order: equal codes."""
    if backend.interpreted and nbits == 576:
        pytest.skip("the interpreter runs the narrower codes")
    g = gen(nbits)
    x = torch.randint(-3, 4, (4, 8, 64), generator=g).to(dtype)
    w = torch.randint(-2, 3, (64, nbits), generator=g).to(torch.float32)
    assert torch.equal(host(backend.ops.hash_encode(backend.to(x), backend.to(w))), REF.hash_encode(x, w))


@pytest.mark.parametrize("seed", range(3))
def test_hash_encode_random_data(backend: Backend, seed: int) -> None:
    """Random data: a bit may differ only where the projection is within rounding of zero."""
    g = gen(seed)
    x = torch.randn(5, 4, 128, generator=g).to(torch.bfloat16)
    w = torch.randn(128, 128, generator=g)
    got = host(backend.ops.hash_encode(backend.to(x), backend.to(w)))
    proj = x.to(torch.float32) @ w
    differ = unpack_bits(got ^ REF.hash_encode(x, w))
    assert not bool((differ & ~(proj.abs() < 1e-3 * proj.abs().amax())).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv,d,nbits", [(2, 32, 64), (1, 72, 576), (4, 16, 20)])
@pytest.mark.parametrize("few", [False, True], ids=["many", "few"])
def test_hash_write_matches_encode_plus_write(backend: Backend, dtype, hkv, d, nbits, few) -> None:
    """A prefill-sized call and a small decode batch (the CUDA kernel's path without `tl.dot`)."""
    g = gen(hkv * d + nbits)
    bs = 8
    t, nb = (333, 64) if backend.gpu else (13, 5)
    t = 3 if few else t
    x = torch.randn(t, hkv, d, generator=g).to(dtype)
    w = torch.randn(d, nbits, generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[::4] = -1
    c = (nbits + 7) // 8
    cache = rand_codes((nb, bs, hkv, c), g)
    want = cache.clone()
    REF.paged_write(want, REF.hash_encode(x, w), slots)
    got = backend.to(cache)
    backend.ops.hash_write(got, backend.to(x), backend.to(w), backend.to(slots))
    # a fused kernel's float32 dot sums in another order than torch.matmul: a bit may differ
    # only where the projection is within rounding of 0
    got_bits, want_bits = unpack_bits(host(got)), unpack_bits(want)
    proj = torch.zeros(nb * bs, hkv, nbits)
    keep = slots >= 0
    proj[slots[keep]] = torch.matmul(x[keep].float(), w)
    near_zero = proj.abs().view(nb, bs, hkv, nbits) <= 1e-4 * proj.abs().amax().clamp(min=1)
    near_zero = torch.nn.functional.pad(near_zero, (0, 8 * c - nbits), value=False)  # padding bits are 0 in both
    assert torch.equal(got_bits | near_zero, want_bits | near_zero)
    assert (got_bits != want_bits).float().mean() < 1e-3


# ------------------------------------------------------------------------------------ paged cache
@pytest.mark.parametrize("seed", range(3))
def test_paged_write(backend: Backend, seed: int) -> None:
    g = gen(seed)
    nb, bs, h, d = 6, [4, 16][seed % 2], 2, 32
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        if dtype == torch.uint8:
            cache = torch.randint(0, 256, (nb, bs, h, 4), generator=g, dtype=torch.uint8)
            values = torch.randint(0, 256, (10, h, 4), generator=g, dtype=torch.uint8)
        else:
            cache = torch.randn(nb, bs, h, d, generator=g).to(dtype)
            values = torch.randn(10, h, d, generator=g).to(dtype)
        slots = torch.randperm(nb * bs, generator=g)[:10]
        slots[::4] = -1  # padding slots are skipped
        want = cache.clone()
        REF.paged_write(want, values, slots)
        got = backend.to(cache)
        backend.ops.paged_write(got, backend.to(values), backend.to(slots))
        assert torch.equal(host(got), want)


def test_paged_write_matches_the_definition(backend: Backend) -> None:
    cache = backend.to(torch.zeros(4, 2, 3))
    vals = torch.arange(12, dtype=torch.float32).view(4, 3)
    backend.ops.paged_write(cache, backend.to(vals), backend.to(torch.tensor([7, -1, 0, 3])))
    flat = host(cache).view(8, 3)
    assert flat[7].tolist() == [0, 1, 2] and flat[0].tolist() == [6, 7, 8] and flat[3].tolist() == [9, 10, 11]
    assert flat[[1, 2, 4, 5, 6]].abs().sum() == 0  # the -1 slot wrote nothing


# ------------------------------------------------------------------------------------- hamming
def assert_hamming_equal(backend: Backend, got: torch.Tensor, want: torch.Tensor, reduce: str) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    if reduce == "mean" and not backend.exact_mean:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # a division: an ulp allowed
    else:
        assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("seq_lens,bs,hq,hkv,d", ORACLE_CASES)
@pytest.mark.parametrize("reduce", ["min", "mean", "max"])
def test_hamming_block_scores_match_the_numpy_oracle(backend: Backend, seq_lens, bs, hq, hkv, d, reduce) -> None:
    backend.need("native")
    g = gen(1)
    batch = make_paged(seq_lens, bs, hkv, d, g)
    w = torch.randn(d, 24, generator=g)
    k_codes = REF.hash_encode(batch.k_cache, w)  # [NB, bs, Hkv, 3]
    q_codes = REF.hash_encode(torch.randn(len(seq_lens), hq, d, generator=g), w)
    got = backend.ops.hamming_block_scores(
        *map(backend.to, (q_codes, k_codes, batch.block_table, batch.seq_lens)), reduce
    )
    got = host(got).numpy()
    grp = hq // hkv
    kc, qc = k_codes.numpy(), q_codes.numpy()
    for r, n in enumerate(seq_lens):
        for j in range(batch.block_table.shape[1]):
            toks = list(range(j * bs, min((j + 1) * bs, n)))
            if not toks:
                assert got[r, j] == math.inf
                continue
            phys = int(batch.block_table[r, j])
            dists = [sum(np_popcount(qc[r, h] ^ kc[phys, t - j * bs, h // grp]) for h in range(hq)) for t in toks]
            want = {"min": min, "max": max, "mean": lambda v: sum(v) / len(v)}[reduce](dists)
            assert got[r, j] == pytest.approx(want, rel=1e-6)


HAMMING_CASES = [
    # (tier, Hq, Hkv, C, bs, seq_lens, table): table "any" = random ids with repeats, -1 past the
    # row, two spare columns, int64 and int32; "shuffled" = distinct ids, int32, one spare column
    ("any", 4, 1, 16, 8, [1, 17, 40], "shuffled"),  # G=4 on one KV head, partial blocks
    ("any", 8, 8, 16, 8, [24, 3], "shuffled"),  # G=1 (plain MHA)
    ("any", 8, 2, 4, 4, [9], "shuffled"),  # tiny codes
    ("any", 16, 1, 72, 4, [10, 7], "shuffled"),  # MLA: 576-bit codes, 16 q heads on one latent head
    ("any", 4, 2, 6, 4, [11, 1], "shuffled"),  # code width not a multiple of 4: byte words
    ("native", 8, 8, 16, 16, [50, 16, 1], "any"),  # GQA 1; not a multiple / one block / shorter
    ("native", 32, 8, 16, 32, [300, 0, 31, 257], "any"),  # GQA 4, an empty row
    ("native", 16, 2, 16, 8, [64, 5, 23], "any"),  # GQA 8
    ("native", 16, 1, 72, 16, [100, 7], "any"),  # MLA: one latent head, 72-byte codes
    ("native", 4, 1, 72, 64, [1000], "any"),
    ("native", 8, 2, 5, 16, [40, 3], "any"),  # code width not a multiple of 8 (byte path)
    ("native", 6, 3, 13, 4, [21, 9, 0], "any"),  # odd widths and an odd group
    ("native", 4, 4, 8, 128, [128, 129, 40], "any"),
    ("native", 128, 1, 72, 16, [70, 16], "any"),  # MLA with 128 query heads (bit-plane path)
    ("native", 20, 4, 16, 8, [33, 8], "any"),  # G = 5, the smallest bit-plane group
    ("native", 28, 4, 11, 8, [33], "any"),  # G = 7, byte tail
    ("gpu", 32, 8, 16, 128, [32769, 1000, 128, 4097], "shuffled"),
    ("gpu", 128, 1, 72, 64, [5000, 63], "shuffled"),
    ("gpu", 32, 4, 16, 16, [3333, 16], "shuffled"),
]


@pytest.mark.parametrize("reduce", ["min", "mean", "max"])
@pytest.mark.parametrize(
    "case", HAMMING_CASES, ids=lambda c: f"{c[0]}-hq{c[1]}-hkv{c[2]}-c{c[3]}-bs{c[4]}-b{len(c[5])}"
)
def test_hamming_block_scores(backend: Backend, case, reduce: str) -> None:
    tier, hq, hkv, c, bs, lens, kind = case
    backend.need(tier)
    g = gen(hq * 1000 + c * 7 + bs)
    if kind == "shuffled":
        table, seq_lens, nb = shuffled_table(lens, bs, 3, g)
        tables = [table]
    else:
        table, seq_lens, nb = paged_case(g, lens, bs, extra_width=2)
        tables = [table, table.to(torch.int32)]
    q = rand_codes((len(lens), hq, c), g)
    k = rand_codes((nb, bs, hkv, c), g)
    for tbl in tables:
        got = backend.ops.hamming_block_scores(*map(backend.to, (q, k, tbl, seq_lens)), reduce)
        assert_hamming_equal(backend, host(got), REF.hamming_block_scores(q, k, tbl, seq_lens, reduce), reduce)


def test_hamming_edge_rows(backend: Backend) -> None:
    """seq_len past M*bs is capped at the table; a negative length is an empty row. (A negative id
    inside a row is outside the contract; the CPU backend's clamping is tested in its own file.)"""
    g = gen(7)
    q = rand_codes((3, 8, 16), g)
    k = rand_codes((10, 4, 2, 16), g)
    table = torch.tensor([[3, 4, 5], [9, 8, 7], [0, 1, 2]])
    seq_lens = torch.tensor([10, 50, -3])
    for reduce in ("min", "mean", "max"):
        got = host(backend.ops.hamming_block_scores(*map(backend.to, (q, k, table, seq_lens)), reduce))
        assert_hamming_equal(backend, got, REF.hamming_block_scores(q, k, table, seq_lens, reduce), reduce)


def test_hamming_all_identical_codes(backend: Backend) -> None:
    """Distance 0 everywhere (and ties everywhere downstream)."""
    q = torch.full((2, 4, 16), 0xA5, dtype=torch.uint8)
    k = torch.full((6, 8, 4, 16), 0xA5, dtype=torch.uint8)
    table, seq_lens, _ = paged_case(gen(3), [20, 9], 8, nb_pool=6)
    got = host(backend.ops.hamming_block_scores(*map(backend.to, (q, k, table, seq_lens)), "min"))
    assert torch.equal(got, REF.hamming_block_scores(q, k, table, seq_lens, "min"))


def test_stale_table_entries_past_a_rows_end_are_ignored(backend: Backend) -> None:
    g = gen(6)
    batch = make_paged([10], 8, 2, 16, g)
    table = torch.cat([batch.block_table, torch.tensor([[10_000, -7]], dtype=torch.int32)], 1)
    q = torch.randn(1, 4, 16, generator=g)
    out, _ = backend.ops.paged_decode_attention(
        *map(backend.to, (q, batch.k_cache, batch.v_cache, table, batch.seq_lens)), 0.25
    )
    ref, _ = REF.paged_decode_attention(q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens, 0.25)
    torch.testing.assert_close(host(out), ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(16, 16, generator=g)
    qc, kc = REF.hash_encode(q, w), REF.hash_encode(batch.k_cache, w)
    s = host(backend.ops.hamming_block_scores(*map(backend.to, (qc, kc, table, batch.seq_lens))))
    assert torch.isinf(s[0, 2:]).all()
    assert torch.equal(s, REF.hamming_block_scores(qc, kc, table, batch.seq_lens))


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
def test_hamming_hypothesis(backend: Backend, g_ratio, hkv, c, bs, lens, reduce, seed) -> None:
    backend.need("native")
    g = gen(seed)
    table, seq_lens, nb = paged_case(g, lens, bs, extra_width=1)
    q = rand_codes((len(lens), hkv * g_ratio, c), g)
    k = rand_codes((nb, bs, hkv, c), g)
    got = host(backend.ops.hamming_block_scores(*map(backend.to, (q, k, table, seq_lens)), reduce))
    assert_hamming_equal(backend, got, REF.hamming_block_scores(q, k, table, seq_lens, reduce), reduce)


@pytest.mark.parametrize(
    "tier,hq,hkv,d,nbits,bs,lens",
    [
        ("any", 8, 2, 16, 64, 4, [9, 30]),
        ("any", 16, 1, 40, 96, 4, [13]),
        ("gpu", 32, 8, 128, 128, 128, [32768, 300]),
        ("gpu", 128, 1, 576, 576, 64, [3000]),
    ],
)
def test_hash_hamming_block_scores(backend: Backend, tier, hq, hkv, d, nbits, bs, lens) -> None:
    """Query hash + scoring (fused on CUDA) equals hash_encode then the reference scorer.
    Integer-valued inputs make every projection exact in any summation order, so the codes
    (and the distances) must agree bit for bit, zeros included."""
    backend.need(tier)
    g = gen(hq + nbits)
    table, seq_lens, nb = shuffled_table(lens, bs, 2, g)
    q = torch.randint(-2, 3, (len(lens), hq, d), generator=g).to(torch.bfloat16)
    w = torch.randint(-2, 3, (d, nbits), generator=g).to(torch.float32)
    k = rand_codes((nb, bs, hkv, nbits // 8), g)
    for reduce in ("min", "mean"):
        got = host(backend.ops.hash_hamming_block_scores(*map(backend.to, (q, w, k, table, seq_lens)), reduce))
        want = REF.hamming_block_scores(REF.hash_encode(q, w), k, table, seq_lens, reduce)
        assert_hamming_equal(backend, got, want, reduce)


# ------------------------------------------------------------- norm-weighted SimHash (hash_cosine)
def assert_cosine_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Float sums in another order: equal within float32 rounding of the summed magnitudes; +inf
    (blocks past a row's end) exactly where the reference has it."""
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    scale = float(want[finite].abs().amax()) if finite.any() else 1.0
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5 * max(scale, 1.0))


@pytest.mark.parametrize("norm_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv,d,nbits", [(2, 32, 64), (4, 16, 128)])
@pytest.mark.parametrize("few", [False, True], ids=["many", "few"])
def test_hash_norm_write_matches_the_definition(backend: Backend, norm_dtype, hkv, d, nbits, few) -> None:
    """Codes of x - center and |x - center| at the written slots; other slots untouched."""
    g = gen(hkv * d + nbits + (7 if few else 0))
    bs = 8
    t, nb = (333, 64) if backend.gpu else (13, 5)
    t = 3 if few else t
    x = torch.randn(t, hkv, d, generator=g) * 3 + 2
    center = torch.randn(hkv, d, generator=g) + 2
    w = torch.randn(d, nbits, generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:t]
    slots[::4] = -1
    codes = rand_codes((nb, bs, hkv, nbits // 8), g)
    norms = torch.randn(nb, bs, hkv, generator=g).to(norm_dtype)
    want_codes, want_norms = codes.clone(), norms.clone()
    keep = slots >= 0
    xc = (x - center)[keep]
    want_codes.view(nb * bs, hkv, -1)[slots[keep]] = REF.sign_bits_pack(xc @ w)
    want_norms.view(nb * bs, hkv)[slots[keep]] = xc.norm(dim=-1).to(norm_dtype)
    got_codes, got_norms = backend.to(codes), backend.to(norms)
    backend.ops.hash_norm_write(got_codes, got_norms, *map(backend.to, (x, w, center, slots)))
    proj = torch.zeros(nb * bs, hkv, nbits)
    proj[slots[keep]] = xc @ w
    near_zero = proj.abs().view(nb, bs, hkv, nbits) <= 1e-4 * proj.abs().amax()
    got_bits, want_bits = unpack_bits(host(got_codes)), unpack_bits(want_codes)
    assert torch.equal(got_bits | near_zero, want_bits | near_zero)
    tol = 1e-5 if norm_dtype == torch.float32 else 8e-3
    torch.testing.assert_close(host(got_norms).float(), want_norms.float(), rtol=tol, atol=0)
    untouched = torch.ones(nb * bs, dtype=torch.bool)
    untouched[slots[keep]] = False
    assert torch.equal(host(got_norms).view(nb * bs, hkv)[untouched], norms.view(nb * bs, hkv)[untouched])


def test_hash_norm_write_layers_matches_per_layer_writes(backend: Backend) -> None:
    """Every layer's keys read from its paged key cache (any strides) at the step's slots."""
    g = gen(21)
    layers, nb, bs, hkv, d, nbits = 3, 6, 8, 2, 32, 64
    slots = torch.tensor([5, -1, 17, 40, 41])
    kv = torch.randn(layers, 2, nb, bs, hkv, d, generator=g)  # a vLLM-like [2, NB, ...] per layer
    k_caches = [kv[i, 0] for i in range(layers)]
    weights = [torch.randn(d, nbits, generator=g) for _ in range(layers)]
    centers = [torch.randn(hkv, d, generator=g), None, torch.randn(hkv, d, generator=g)]
    want_c = [torch.zeros(nb, bs, hkv, nbits // 8, dtype=torch.uint8) for _ in range(layers)]
    want_n = [torch.zeros(nb, bs, hkv, dtype=torch.bfloat16) for _ in range(layers)]
    got_c, got_n = [backend.to(c) for c in want_c], [backend.to(n) for n in want_n]
    keep = slots >= 0
    for i in range(layers):
        at = slots.clamp(min=0)
        x = k_caches[i][at // bs, at % bs]
        REF.hash_norm_write(want_c[i], want_n[i], x, weights[i], centers[i], slots)
        assert bool((want_n[i].view(-1, hkv)[slots[keep]] > 0).all())
    backend.ops.hash_norm_write_layers(
        got_c,
        got_n,
        [backend.to(k) for k in k_caches],
        [backend.to(w) for w in weights],
        [None if c is None else backend.to(c) for c in centers],
        backend.to(slots),
    )
    for i in range(layers):
        assert (unpack_bits(host(got_c[i])) != unpack_bits(want_c[i])).float().mean() < 1e-3
        torch.testing.assert_close(host(got_n[i]).float(), want_n[i].float(), rtol=8e-3, atol=0)


def np_cosine_distances(qc, qn, kc, kn, table, seq_lens, bs, reduce):
    """Loop-by-loop oracle of `hamming_cosine_block_scores`, written from the contract's text."""
    b, hq, c = qc.shape
    grp = hq // kc.shape[2]
    out = np.full(table.shape, np.inf)
    for r in range(b):
        for j in range(table.shape[1]):
            toks = list(range(j * bs, min((j + 1) * bs, int(seq_lens[r]))))
            if not toks:
                continue
            phys = int(table[r, j])
            vals = []
            for t in toks:
                o = t - j * bs
                est = 0.0
                for h in range(hq):
                    d = np_popcount(qc[r, h] ^ kc[phys, o, h // grp])
                    est += float(qn[r, h]) * float(kn[phys, o, h // grp]) * math.cos(math.pi * d / (8 * c))
                vals.append(-est)
            out[r, j] = {"min": min, "max": max, "mean": lambda v: sum(v) / len(v)}[reduce](vals)
    return out


@pytest.mark.parametrize("seq_lens,bs,hq,hkv,d", ORACLE_CASES)
@pytest.mark.parametrize("reduce", ["min", "mean", "max"])
def test_hamming_cosine_block_scores_match_the_numpy_oracle(backend, seq_lens, bs, hq, hkv, d, reduce) -> None:
    backend.need("native")
    g = gen(2)
    batch = make_paged(seq_lens, bs, hkv, d, g)
    w = torch.randn(d, 32, generator=g)
    k_codes = REF.hash_encode(batch.k_cache, w)
    k_norms = batch.k_cache.norm(dim=-1).to(torch.bfloat16)
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    q_codes, q_norms = REF.hash_encode(q, w), q.norm(dim=-1)
    got = backend.ops.hamming_cosine_block_scores(
        *map(backend.to, (q_codes, q_norms, k_codes, k_norms, batch.block_table, batch.seq_lens)), reduce
    )
    want = np_cosine_distances(
        q_codes.numpy(),
        q_norms.numpy(),
        k_codes.numpy(),
        k_norms.float().numpy(),
        batch.block_table.numpy(),
        batch.seq_lens.numpy(),
        bs,
        reduce,
    )
    assert_cosine_close(host(got), torch.from_numpy(want).to(torch.float32))


@pytest.mark.parametrize("reduce", ["min", "mean", "max"])
@pytest.mark.parametrize(
    "case", HAMMING_CASES, ids=lambda c: f"{c[0]}-hq{c[1]}-hkv{c[2]}-c{c[3]}-bs{c[4]}-b{len(c[5])}"
)
def test_hamming_cosine_block_scores(backend: Backend, case, reduce: str) -> None:
    tier, hq, hkv, c, bs, lens, kind = case
    backend.need(tier)
    g = gen(hq * 1000 + c * 7 + bs + 1)
    table, seq_lens, nb = (
        shuffled_table(lens, bs, 3, g) if kind == "shuffled" else paged_case(g, lens, bs, extra_width=2)
    )
    q = rand_codes((len(lens), hq, c), g)
    qn = torch.rand(len(lens), hq, generator=g) * 4
    k = rand_codes((nb, bs, hkv, c), g)
    for kn in (torch.rand(nb, bs, hkv, generator=g) * 30, torch.rand(nb, bs, hkv, generator=g).to(torch.bfloat16)):
        for tbl in (table, table.to(torch.int64)):
            got = backend.ops.hamming_cosine_block_scores(*map(backend.to, (q, qn, k, kn, tbl, seq_lens)), reduce)
            assert_cosine_close(host(got), REF.hamming_cosine_block_scores(q, qn, k, kn, tbl, seq_lens, reduce))


@pytest.mark.parametrize(
    "tier,hq,hkv,d,nbits,bs,lens",
    [
        ("any", 8, 2, 16, 64, 4, [9, 30]),
        ("any", 14, 2, 64, 128, 8, [40, 1]),
        ("gpu", 32, 8, 128, 128, 128, [32768, 300]),
    ],
)
def test_hash_cosine_block_scores(backend: Backend, tier, hq, hkv, d, nbits, bs, lens) -> None:
    """Query hash, query norms and scoring (fused where a backend can) equal hash_encode, |q|
    and the reference scorer. Integer-valued inputs make every projection exact in any order."""
    backend.need(tier)
    g = gen(hq + nbits + 5)
    table, seq_lens, nb = shuffled_table(lens, bs, 2, g)
    q = torch.randint(-2, 3, (len(lens), hq, d), generator=g).to(torch.bfloat16)
    w = torch.randint(-2, 3, (d, nbits), generator=g).to(torch.float32)
    k = rand_codes((nb, bs, hkv, nbits // 8), g)
    kn = (torch.rand(nb, bs, hkv, generator=g) * 10).to(torch.bfloat16)
    for reduce in ("min", "mean"):
        got = host(backend.ops.hash_cosine_block_scores(*map(backend.to, (q, w, k, kn, table, seq_lens)), reduce))
        qf = q.float()
        want = REF.hamming_cosine_block_scores(REF.hash_encode(q, w), qf.norm(dim=-1), k, kn, table, seq_lens, reduce)
        assert_cosine_close(got, want)


# ------------------------------------------------------------------------------- dot scoring
@pytest.mark.parametrize("groups", [None, 4])
@pytest.mark.parametrize("group_reduce", ["mean", "max"])
def test_block_scores_dot_match_the_numpy_oracle(backend: Backend, group_reduce: str, groups: int | None) -> None:
    """One representation per block [NB, Hkv, D], or per group of tokens [NB, R, Hkv, D]: a block
    then scores as its best group whose first token is before the row's end (the partial last
    block's later groups never count)."""
    g = gen(3 if groups is None else 5)
    hq, hkv, d = 8, 2, 16
    bs = 4 if groups is None else 8  # groups of 2 tokens
    reps = torch.randn(10, *(() if groups is None else (groups,)), hkv, d, generator=g)
    table = torch.tensor([[3, 1, 7, 0], [9, 2, 0, 0]])
    lens = torch.tensor([13 if groups is None else 19, 8])  # row 0's last block: partial
    q = torch.randn(2, hq, d, generator=g)
    got = host(backend.ops.block_scores_dot(*map(backend.to, (q, reps, table, lens)), bs, group_reduce)).numpy()
    qn = q.numpy().reshape(2, hkv, hq // hkv, d)
    rn = reps.numpy()[:, None] if groups is None else reps.numpy()  # [NB, R, Hkv, D]
    merge = bs // rn.shape[1]
    for r in range(2):
        n_b = -(-int(lens[r]) // bs)
        for j in range(4):
            if j >= n_b:
                assert got[r, j] == -math.inf
                continue
            best = -math.inf
            for grp in range(rn.shape[1]):
                if j * bs + grp * merge >= int(lens[r]):
                    continue
                rep = rn[int(table[r, j]), grp]
                if group_reduce == "mean":
                    s_ = sum(qn[r, h].mean(0) @ rep[h] for h in range(hkv))
                else:
                    s_ = sum(max(qn[r, h, i] @ rep[h] for i in range(hq // hkv)) for h in range(hkv))
                best = max(best, float(s_))
            assert got[r, j] == pytest.approx(best, rel=1e-5, abs=1e-5)


DOT_CASES = [
    # (tier, hq, hkv, d, lens, bs, table)
    ("any", 4, 2, 16, [9, 30], 8, "shuffled"),
    ("any", 16, 1, 40, [5], 4, "shuffled"),
    ("native", 8, 8, 64, [200, 1, 0, 48], 16, "any"),
    ("native", 32, 8, 128, [200, 1, 0, 48], 16, "any"),
    ("native", 16, 2, 32, [200, 1, 0, 48], 16, "any"),
    ("native", 16, 1, 576, [200, 1, 0, 48], 16, "any"),
    ("gpu", 32, 8, 128, [32768, 700, 1], 128, "shuffled"),
    ("gpu", 128, 1, 576, [4000], 64, "shuffled"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_reduce", ["mean", "max"])
@pytest.mark.parametrize("case", DOT_CASES, ids=lambda c: f"{c[0]}-hq{c[1]}-hkv{c[2]}-d{c[3]}-b{len(c[4])}")
def test_block_scores_dot(backend: Backend, case, group_reduce: str, dtype: torch.dtype) -> None:
    """float32 and bfloat16 queries and representations (the CUDA backend's group sums of a few
    keys are bfloat16)."""
    tier, hq, hkv, d, lens, bs, kind = case
    backend.need(tier)
    g = gen(hq + d)
    if kind == "shuffled":
        table, seq_lens, nb = shuffled_table(lens, bs, 2, g)
    else:
        table, seq_lens, nb = paged_case(g, lens, bs, extra_width=1)
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    reps = torch.randn(nb, hkv, d, generator=g).to(dtype)
    got = host(backend.ops.block_scores_dot(*map(backend.to, (q, reps, table, seq_lens)), bs, group_reduce))
    want = REF.block_scores_dot(q, reps, table, seq_lens, bs, group_reduce)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


GROUPED_CASES = [
    # (tier, hq, hkv, d, lens, bs, groups)
    ("any", 8, 2, 16, [19, 40], 8, 4),
    ("any", 32, 8, 32, [70, 1, 0], 32, 16),  # the tensor-core path (max, bf16): 16 groups
    ("any", 12, 4, 16, [33], 16, 8),  # a group of 3 query heads, 8 groups padded to the dot's 16
    ("native", 32, 8, 128, [500, 31, 128], 128, 32),
    ("gpu", 32, 8, 128, [32768, 700, 1], 128, 32),
    ("gpu", 32, 8, 128, [32768, 4000], 128, 8),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("group_reduce", ["mean", "max"])
@pytest.mark.parametrize("case", GROUPED_CASES, ids=lambda c: f"{c[0]}-hq{c[1]}-hkv{c[2]}-d{c[3]}-r{c[6]}")
def test_grouped_block_scores(backend: Backend, case, group_reduce: str, dtype: torch.dtype) -> None:
    """Per-group ESA / GSA (dot) and Quest (min / max) scores against the reference: float32,
    bfloat16 (the CUDA backend's group sums; a bfloat16 query meets them on the tensor cores) and
    float8 sums against a bfloat16 query (`blk_repre_dtype: float8_e4m3fn`)."""
    tier, hq, hkv, d, lens, bs, groups = case
    backend.need(tier)
    g = gen(hq + d + groups)
    table, seq_lens, nb = shuffled_table(lens, bs, 2, g)
    q = torch.randn(len(lens), hq, d, generator=g).to(torch.bfloat16 if dtype.itemsize == 1 else dtype)
    reps = torch.randn(nb, groups, hkv, d, generator=g).to(dtype)
    lo = torch.randn(nb, groups, hkv, d, generator=g)
    hi = lo + torch.rand(nb, groups, hkv, d, generator=g)
    want = REF.block_scores_dot(q, reps, table, seq_lens, bs, group_reduce)
    want_bound = REF.block_scores_minmax(q, lo, hi, table, seq_lens, bs, group_reduce)
    for launch in backend.each_grouped_launch():
        got = host(backend.ops.block_scores_dot(*map(backend.to, (q, reps, table, seq_lens)), bs, group_reduce))
        assert got.shape == want.shape and torch.equal(torch.isinf(got), torch.isinf(want)), launch
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3, msg=lambda m, launch=launch: f"{launch}: {m}")
        got = host(backend.ops.block_scores_minmax(*map(backend.to, (q, lo, hi, table, seq_lens)), bs, group_reduce))
        assert torch.equal(torch.isinf(got), torch.isinf(want_bound)), launch
        torch.testing.assert_close(got, want_bound, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("group_reduce", ["mean", "max"])
def test_block_scores_dot_into_kept_rows(backend: Backend, group_reduce: str) -> None:
    """With `out` and `keep_rows` (the batch path's retrieval stride): the marked rows keep what
    `out` held, bit for bit, the others get what a call without them gives; float8 group sums
    against a bfloat16 query, as the engine keeps them on CUDA (float32 where a backend has no float8)."""
    tier, hq, hkv, d, lens, bs, groups = GROUPED_CASES[0] if not backend.gpu else GROUPED_CASES[4]
    g = gen(77)
    table, seq_lens, nb = shuffled_table(lens + [bs * 3 + 1, 0], bs, 2, g)
    b, m = table.shape
    on_device = backend.name == "cuda"
    q = torch.randn(b, hq, d, generator=g).to(torch.bfloat16 if on_device else torch.float32)
    reps = torch.randn(nb, groups, hkv, d, generator=g).to(torch.float8_e4m3fn if on_device else torch.float32)
    keep_rows = torch.tensor([True, False] + [i % 2 == 0 for i in range(b - 2)])
    before = torch.randn(b, m, generator=g)
    args = tuple(map(backend.to, (q, reps, table, seq_lens)))
    want = host(backend.ops.block_scores_dot(*args, bs, group_reduce))
    out = backend.to(before.clone())
    got = backend.ops.block_scores_dot(*args, bs, group_reduce, out=out, keep_rows=backend.to(keep_rows))
    assert got.data_ptr() == out.data_ptr()
    got = host(got)
    assert torch.equal(got[keep_rows], before[keep_rows])
    assert torch.equal(got[~keep_rows], want[~keep_rows])


def test_select_and_rewrite_keeps_marked_rows(backend: Backend) -> None:
    """With `out` and `keep_rows`: the marked rows' tables stay as `out` held them (a previous
    call's selection) and their lengths are those of min(n_b, max(k, forced)) blocks with the
    forced last one; the others get the tables and lengths of a call without them."""
    g = gen(91)
    bs = 16
    lens = [bs * 9 + 3, bs * 4, 1, bs * 12, 0, bs * 5, bs * 7]
    table, seq_lens, _ = shuffled_table(lens, bs, 0, g)
    b, m = table.shape
    scores = torch.randn(b, m, generator=g)
    keep = torch.zeros(b, m, dtype=torch.bool)
    n_b = (seq_lens.long() + bs - 1) // bs
    keep[torch.arange(b), (n_b - 1).clamp(min=0)] = True
    keep[4] = False
    k = torch.tensor([3, 2, 5, 7, 3, 1000, 4])
    keep_rows = torch.tensor([True, False, True, False, True, True, False])
    rtab, rlens = REF.select_and_rewrite(scores, k, keep, table, seq_lens, bs)
    before = torch.randint(1, 1000, (b, m), generator=g).to(table.dtype)
    kept = torch.minimum(n_b, torch.maximum(k, (keep & (torch.arange(m) < n_b[:, None])).sum(1)))
    keep_lens = (kept * bs - (n_b * bs - seq_lens.long()) * (n_b > 0)).to(seq_lens.dtype)
    args = tuple(map(backend.to, (keep, table, seq_lens)))
    for _ in backend.each_topk_variant():
        out = backend.to(before.clone())
        tab, new_lens = backend.ops.select_and_rewrite(
            backend.to(scores), backend.to(k), *args, bs, out=out, keep_rows=backend.to(keep_rows)
        )
        assert tab.data_ptr() == out.data_ptr()
        tab, new_lens = host(tab), host(new_lens)
        assert torch.equal(tab[keep_rows], before[keep_rows]) and torch.equal(tab[~keep_rows], rtab[~keep_rows])
        assert torch.equal(new_lens, torch.where(keep_rows, keep_lens, rlens))


# ---------------------------------------------------------------------------- a step's plan
def budgets_oracle(lens, eligible, width, bs, ub, ratio, fixed, min_u, init, local, select):
    """`window_budgets` row by row from the contract's text (Python floats are float64)."""
    ks, musts, outs = [], [], []
    for n_tok, e in zip(lens, eligible, strict=True):
        n = -(-n_tok // (bs * ub))
        k_u = min(n, max(min_u, fixed if fixed is not None else math.ceil(n * ratio))) if e else n
        forced_units = {s if s >= 0 else n + s for s in select}
        flags = [
            u < n and (u < init or u >= n - local or u == n - 1 or u in forced_units) for u in range(-(-width // ub))
        ]
        must = [flags[j // ub] for j in range(width)]
        n_b = min(-(-n_tok // bs), width)
        kept = min(n_b, max(k_u * ub, sum(must[:n_b])))
        ks.append(k_u * ub)
        musts.append(must)
        outs.append(kept * bs - (n_b * bs - n_tok if n_b > 0 else 0))
    return ks, musts, outs


BUDGET_CASES = [
    # (lens, eligible, width, bs, unit_blocks, ratio, fixed_units, min_units, init, local, must_select)
    ([1000, 10, 7, 0, 33], [True, True, True, False, True], 1000, 1, 1, 0.3, None, 0, 1, 2, ()),  # float64 ceil
    ([130, 64, 1, 0, 129], [True, False, True, True, True], 9, 16, 1, 0.1, None, 2, 1, 1, (0, -2, -1)),
    ([300, 301, 17], [True, True, True], 13, 8, 3, 0.25, None, 1, 1, 1, (3, -5)),  # units of 3 blocks
    ([90, 200, 55], [True, True, False], 25, 8, 1, 1 / 3, 4, 0, 0, 0, ()),  # a fixed token budget
    ([500, 499], [True, True], 80, 7, 2, 0.999, None, 0, 0, 3, (100, -100)),  # must_select past the row
]


@pytest.mark.parametrize("case", BUDGET_CASES, ids=range(len(BUDGET_CASES)))
def test_window_budgets_match_the_definition(backend: Backend, case) -> None:
    lens, elig, width, bs, ub, ratio, fixed, min_u, init, local, select = case
    want_k, want_must, want_lens = budgets_oracle(lens, elig, width, bs, ub, ratio, fixed, min_u, init, local, select)
    for dtype in (torch.int32, torch.int64):
        seq_lens = backend.to(torch.tensor(lens, dtype=dtype))
        k, must, got_lens = backend.ops.window_budgets(
            seq_lens, backend.to(torch.tensor(elig)), width, bs, ub, ratio, fixed, min_u, init, local, select
        )
        assert k.dtype == torch.int64 and must.dtype == torch.bool and got_lens.dtype == dtype
        assert host(k).tolist() == want_k
        assert host(must).tolist() == want_must
        assert host(got_lens).tolist() == want_lens


@HYP
@given(
    lens=st.lists(st.integers(0, 3000), min_size=1, max_size=6),
    width_extra=st.integers(0, 5),
    bs=st.sampled_from([1, 4, 16, 128]),
    ub=st.integers(1, 4),
    ratio=st.floats(0.001, 1.0),
    fixed=st.one_of(st.none(), st.integers(0, 50)),
    windows=st.tuples(st.integers(0, 5), st.integers(0, 5), st.integers(0, 5)),
    select=st.lists(st.integers(-8, 8), max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_window_budgets_hypothesis(backend, lens, width_extra, bs, ub, ratio, fixed, windows, select, seed) -> None:
    backend.need("native")
    width = max(-(-n // bs) for n in lens) + width_extra
    elig = (torch.rand(len(lens), generator=gen(seed)) < 0.8).tolist()
    min_u, init, local = windows
    want = budgets_oracle(lens, elig, width, bs, ub, ratio, fixed, min_u, init, local, tuple(select))
    got = backend.ops.window_budgets(
        backend.to(torch.tensor(lens)),
        backend.to(torch.tensor(elig)),
        width,
        bs,
        ub,
        ratio,
        fixed,
        min_u,
        init,
        local,
        select,
    )
    assert [host(t).tolist() for t in got] == list(want)


@pytest.mark.parametrize("distinct", [1, 3])
def test_add_kept_counts_match_the_definition(backend: Backend, distinct: int) -> None:
    """Each layer adds what its eligible rows read under the lengths it names (-1: everything they
    hold, -2: nothing) and what they hold; the rows counter adds (any eligible, eligible rows)."""
    g = gen(5 + distinct)
    bs, b = 16, 7
    lens = torch.randint(0, 40 * bs, (distinct, b), generator=g, dtype=torch.int32)
    n_blocks = torch.randint(0, 40, (b,), generator=g)
    layers = [0, -1, *range(distinct), -2, distinct - 1]
    start = torch.randint(0, 100, (len(layers), 2), generator=g)
    start_rows = torch.tensor([3, 11])
    for elig in ([True, False, True, True, False, True, True], [False] * b):
        held = sum(int(n_blocks[i]) for i in range(b) if elig[i])
        read = [sum(-(-int(lens[p, i]) // bs) for i in range(b) if elig[i]) for p in range(distinct)]
        want = [
            [s0 + (read[w] if w >= 0 else held if w == -1 else 0), s1 + held]
            for (s0, s1), w in zip(start.tolist(), layers, strict=True)
        ]
        blocks, rows = backend.to(start.clone()), backend.to(start_rows.clone())
        backend.ops.add_kept_counts(
            blocks,
            rows,
            backend.to(lens),
            backend.to(torch.tensor(layers)),
            backend.to(n_blocks),
            backend.to(torch.tensor(elig)),
            bs,
        )
        assert host(blocks).tolist() == want
        assert host(rows).tolist() == [3 + any(elig), 11 + sum(elig)]


# ------------------------------------------------------------------------------------ top-k
def assert_topk_equal(backend: Backend, scores, k, must, n_blocks) -> None:
    rids, rcounts = REF.block_topk(scores, k, must, n_blocks)
    for _ in backend.each_topk_variant():
        ids, counts = backend.ops.block_topk(*map(backend.to, (scores, k, must, n_blocks)))
        assert ids.dtype == torch.int32 and counts.dtype == torch.int32
        assert torch.equal(host(ids), rids), (ids, rids)
        assert torch.equal(host(counts), rcounts), (counts, rcounts)


@pytest.mark.parametrize("seed", range(6))
def test_block_topk_matches_the_definition(backend: Backend, seed: int) -> None:
    g = gen(seed)
    b, m = 5, 12
    scores = torch.randint(0, 4, (b, m), generator=g).to(torch.float32)  # many ties
    scores[0, 3] = float("nan")
    k = torch.tensor([0, 3, 12, 20, 5])
    must = torch.rand(b, m, generator=g) < 0.2
    n = torch.tensor([12, 7, 12, 3, 0])
    want = np_topk(scores.numpy(), k.tolist(), must.numpy(), n.tolist())
    for _ in backend.each_topk_variant():
        ids, counts = (host(t) for t in backend.ops.block_topk(*map(backend.to, (scores, k, must, n))))
        for r in range(b):
            assert counts[r] == len(want[r])
            assert ids[r, : counts[r]].tolist() == want[r]
            assert (ids[r, counts[r] :] == -1).all()


TOPK_SHAPES = [("any", 6, 1), ("any", 5, 13), ("any", 4, 64), ("any", 3, 130)]
TOPK_SHAPES += [("gpu", 100, 257), ("gpu", 8, 1024), ("gpu", 2, 8192)]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("tier,b,m", TOPK_SHAPES)
def test_block_topk(backend: Backend, tier, b, m, ties) -> None:
    backend.need(tier)
    g = gen(b * 1000 + m + ties)
    if ties:
        scores = torch.randint(-3, 3, (b, m), generator=g).to(torch.float32)
    else:
        scores = torch.randn(b, m, generator=g)
    n_blocks = torch.randint(0, m + 1, (b,), generator=g)
    n_blocks[0] = m
    k = torch.randint(0, m + 3, (b,), generator=g)
    keep = torch.rand(b, m, generator=g) < 0.1
    if m > 3:  # awkward values: signed zeros, infinities, NaN, forced blocks at both ends
        scores[0, :4] = torch.tensor([-0.0, 0.0, float("inf"), float("nan")])
        scores[-1, -2:] = float("-inf")
        keep[0, 0] = keep[0, -1] = True
    assert_topk_equal(backend, scores, k, keep, n_blocks)


def test_block_topk_random(backend: Backend) -> None:
    g = gen(11)
    b, m = 16, 64
    scores = torch.randn(b, m, generator=g)
    must = torch.rand(b, m, generator=g) < 0.1
    k = torch.randint(0, m + 8, (b,), generator=g)
    n_blocks = torch.randint(0, m + 1, (b,), generator=g)
    assert_topk_equal(backend, scores, k, must, n_blocks)
    assert_topk_equal(backend, scores.double(), k.to(torch.int32), must, n_blocks.to(torch.int32))


def test_block_topk_ties_nan_inf(backend: Backend) -> None:
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
    assert_topk_equal(backend, scores, k, must, n_blocks)


def test_block_topk_forced_only_and_large_k(backend: Backend) -> None:
    scores = torch.linspace(0, 1, 20).repeat(4, 1)
    must = torch.zeros(4, 20, dtype=torch.bool)
    must[:, [0, 19]] = True
    must[2, 15:] = True
    k = torch.tensor([0, 0, 3, 25])  # k = 0 with forced blocks, k < forced, k >= M
    n_blocks = torch.tensor([20, 10, 20, 20])  # row 1: a forced block past n_b is ignored
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert_topk_equal(backend, scores.to(dtype), k, must, n_blocks)


def test_block_topk_forced_beats_inf_and_wide_n_blocks(backend: Backend) -> None:
    """Forced blocks win against +inf scores; n_blocks past the table width is clamped to M."""
    scores = torch.tensor([[float("inf"), 0.0, 0.0, 1.0], [3.0, float("inf"), float("nan"), 2.0]])
    keep = torch.tensor([[False, True, False, False], [False, False, True, False]])
    assert_topk_equal(backend, scores, torch.tensor([1, 2]), keep, torch.tensor([4, 9]))
    assert_topk_equal(
        backend,
        torch.tensor([[math.inf, 0.0, 1.0]]),
        torch.tensor([1]),
        torch.tensor([[False, False, True]]),
        torch.tensor([3]),
    )
    assert_topk_equal(
        backend, torch.zeros(1, 2), torch.tensor([5]), torch.zeros(1, 2, dtype=torch.bool), torch.tensor([9])
    )


def test_block_topk_k_at_least_blocks(backend: Backend) -> None:
    g = gen(5)
    scores = torch.randn(3, 10, generator=g)
    keep = torch.zeros(3, 10, dtype=torch.bool)
    keep[2, :6] = True  # more forced blocks than k
    assert_topk_equal(backend, scores, torch.tensor([10, 50, 3]), keep, torch.tensor([10, 7, 9]))


def test_block_topk_empty(backend: Backend) -> None:
    assert_topk_equal(
        backend,
        torch.zeros(0, 5),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, 5, dtype=torch.bool),
        torch.zeros(0, dtype=torch.int64),
    )
    assert_topk_equal(
        backend, torch.zeros(2, 0), torch.tensor([1, 0]), torch.zeros(2, 0, dtype=torch.bool), torch.tensor([0, 0])
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
def test_block_topk_hypothesis(backend: Backend, b, m, levels, nan_p, forced_p, seed) -> None:
    backend.need("native")
    g = gen(seed)
    scores = torch.randint(0, levels, (b, m), generator=g).to(torch.float32)
    scores = torch.where(torch.rand(b, m, generator=g) < nan_p, float("nan"), scores)
    must = torch.rand(b, m, generator=g) < forced_p
    k = torch.randint(0, m + 3, (b,), generator=g)
    n_blocks = torch.randint(0, m + 2, (b,), generator=g)
    assert_topk_equal(backend, scores, k, must, n_blocks)


def assert_rewrite_equal(backend: Backend, scores, k, keep, table, seq_lens, bs, rtab, rlens) -> None:
    """Every top-k strategy of the backend rewrites the reference's tables and lengths, from the
    scores (largest first) and from their negation (largest=False)."""
    args = tuple(map(backend.to, (keep, table, seq_lens)))
    for _ in backend.each_topk_variant():
        tab, new_lens = backend.ops.select_and_rewrite(backend.to(scores), backend.to(k), *args, bs)
        assert torch.equal(host(tab), rtab) and torch.equal(host(new_lens), rlens)
        dtab, dlens = backend.ops.select_and_rewrite(backend.to(-scores), backend.to(k), *args, bs, largest=False)
        assert torch.equal(host(dtab), rtab) and torch.equal(host(dlens), rlens)


@pytest.mark.parametrize("bs", [4, 16])
def test_select_and_rewrite_rewrites_the_table(backend: Backend, bs: int) -> None:
    g = gen(bs)
    if backend.gpu:
        lens = [bs * 2000 + 3, bs * 4, 1, bs * 1200, 0, bs * 5]
    else:
        lens = [bs * 9 + 3, bs * 4, 1, bs * 12, 0, bs * 5]
    table, seq_lens, _ = shuffled_table(lens, bs, 0, g)
    b, m = table.shape
    scores = torch.randn(b, m, generator=g)
    keep = torch.zeros(b, m, dtype=torch.bool)
    n_b = (seq_lens.long() + bs - 1) // bs
    keep[torch.arange(b), (n_b - 1).clamp(min=0)] = True  # the last block, as a sparse step would
    keep[4] = False  # the empty row keeps nothing
    k = torch.tensor([3, 2, 5, 7, 3, 1000])  # the last row keeps all its blocks: it comes back as it was
    rids, rcounts = REF.block_topk(scores, k, keep, n_b)
    rtab, rlens = REF.select_and_rewrite(scores, k, keep, table, seq_lens, bs)
    for r in range(b):  # the reference against the definition
        c = int(rcounts[r])
        sel = rids[r, :c].long()
        assert torch.equal(rtab[r, :c], table[r, sel]) and not rtab[r, c:].any()
        assert int(rlens[r]) == sum(min(bs, int(seq_lens[r]) - int(j) * bs) for j in sel)
    assert torch.equal(rtab[5, : int(n_b[5])], table[5, : int(n_b[5])]) and int(rlens[5]) == int(seq_lens[5])
    assert int(rlens[4]) == 0
    assert_rewrite_equal(backend, scores, k, keep, table, seq_lens, bs, rtab, rlens)


@pytest.mark.parametrize("wide", [False, True])
def test_select_and_rewrite_partial_last_block(backend: Backend, wide: bool) -> None:
    """The rewritten length counts the partly filled last block only when it is kept: ranked
    above the threshold, at it (ties go to the lower index, so the last block at a tie is the
    last taken), or forced; with no block forced at the end, ties, NaN and forced-only budgets.
    `wide`: rows over 16384 columns (the top-k's other prefix-sum path; compiled kernels only:
    the interpreter runs a prefix sum element by element)."""
    if wide:
        backend.need("gpu")
    g = gen(31 + wide)
    bs = 16
    m_blocks = 20000 if wide else 24
    lens = [bs * m_blocks - 5, bs * 10 - 1, bs * 10 - 1, bs * 10 - 1, bs * 10 - 1, bs * 10 - 7, 1, 0]
    table, seq_lens, _ = shuffled_table(lens, bs, 0, g)
    b, m = table.shape
    scores = torch.randint(-2, 3, (b, m), generator=g).to(torch.float32)  # many ties
    keep = torch.rand(b, m, generator=g) < 0.1
    keep[:, 9] = False  # rows 1-5 own 10 blocks: block 9 is their partial last one
    scores[1] = 1.0  # all tied: k = 9 of 10 takes blocks 0..8, not the last
    scores[2] = 1.0  # all tied, k = 10: every block, the last included
    keep[3] = False
    keep[3, [2, 9]] = True  # k = 0: the forced blocks fill the budget, the last among them
    keep[4] = False
    keep[4, [2, 5]] = True  # the same without the last
    scores[5, 9] = float("nan")  # NaN ranks last: dropped by k = 9
    scores[0, -3] = float("nan")
    k = torch.tensor([m // 3, 9, 10, 0, 0, 9, 1, 2])
    rtab, rlens = REF.select_and_rewrite(scores, k, keep, table, seq_lens, bs)
    assert int(rlens[1]) == 9 * bs and int(rlens[2]) == lens[2]  # the cases the rows are for
    assert int(rlens[3]) == bs + bs - 1 and int(rlens[4]) == 2 * bs and int(rlens[5]) == 9 * bs
    assert_rewrite_equal(backend, scores, k, keep, table, seq_lens, bs, rtab, rlens)


def test_hamming_topk_pipeline(backend: Backend) -> None:
    """The decode step: Hamming distances -> negate -> top-k with sink/recent blocks forced."""
    g = gen(5)
    bs, hq, hkv, c = 16, 16, 4, 16
    lens = [700, 123, 16, 5] if not backend.interpreted else [70, 23, 16, 5]
    table, seq_lens, nb = paged_case(g, lens, bs)
    q = rand_codes((len(lens), hq, c), g)
    k = rand_codes((nb, bs, hkv, c), g)
    n_blocks = (seq_lens + bs - 1) // bs
    must = torch.zeros(table.shape, dtype=torch.bool)
    must[:, 0] = True
    must[torch.arange(len(lens)), (n_blocks - 1).clamp(min=0)] = True
    budget = (n_blocks.float() * 0.3).ceil().long()
    scores = -host(backend.ops.hamming_block_scores(*map(backend.to, (q, k, table, seq_lens)), "min"))
    assert torch.equal(scores, -REF.hamming_block_scores(q, k, table, seq_lens, "min"))
    assert_topk_equal(backend, scores, budget, must, n_blocks)


def test_sparse_step_end_to_end(backend: Backend) -> None:
    """Hash -> score -> select on the backend's device equals the reference's selection
    (integer-valued data: exact projections)."""
    g = gen(11)
    bs, hkv, grp, d = 8, 2, 2, 16
    lens = torch.tensor([37, 64, 9])
    table, seq_lens, nb = shuffled_table(lens.tolist(), bs, 2, g)
    w = torch.randint(-2, 3, (d, 64), generator=g).to(torch.float32)
    k = torch.randint(-3, 4, (nb, bs, hkv, d), generator=g).to(torch.float32)
    q = torch.randint(-3, 4, (3, hkv * grp, d), generator=g).to(torch.float32)

    def step(o, *args):
        q_, k_, w_, table_, seq_lens_ = args
        dist = o.hamming_block_scores(o.hash_encode(q_, w_), o.hash_encode(k_, w_), table_, seq_lens_, "min")
        n_blocks = (seq_lens_.to(torch.int64) + bs - 1) // bs
        keep = torch.zeros_like(dist, dtype=torch.bool)
        keep[:, 0] = True
        return o.block_topk(-dist, torch.full_like(n_blocks, 2), keep, n_blocks)

    ids, counts = step(backend.ops, *map(backend.to, (q, k, w, table, seq_lens)))
    rids, rcounts = step(REF, q, k, w, table, seq_lens)
    assert torch.equal(host(ids), rids) and torch.equal(host(counts), rcounts)


# --------------------------------------------------------------------------- representations
def write_paths(backend: Backend):
    """Each way the backend finds a block's keys in a representation write: the CUDA kernels scan
    the call's slots in one vector (decode), in chunks (short prefills) or sort its block ids
    (long prefills); one pass elsewhere. Yields the path's name, restoring the backend's setting
    after."""
    limit = getattr(backend.ops, "write_scan_max", None)
    if limit is None:
        yield "one"
        return
    try:
        for name, value, once in (("scan-once", 1 << 30, True), ("scan", 1 << 30, False), ("sort", 0, True)):
            backend.ops.write_scan_max, backend.ops.write_scan_once = value, once
            yield name
    finally:
        backend.ops.write_scan_max, backend.ops.write_scan_once = limit, True


@pytest.mark.parametrize("merge", [32, 4, 1])
@pytest.mark.parametrize("absolute", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sums_add(backend: Backend, merge: int, absolute: bool, dtype: torch.dtype) -> None:
    """A prefill of whole and partial blocks, then decode steps that finish blocks and recycle
    one (its offset 0 written again, after another key of the same call), with slots of -1:
    the backend accumulates the reference's sums."""
    _check_block_sums_add(backend, merge, absolute, dtype, torch.float32)


@pytest.mark.parametrize("merge", [1, 4, 32])
def test_block_sums_add_half_sums(backend: Backend, merge: int) -> None:
    """The same calls into bfloat16 sums (`group_sums_dtype` of the CUDA backend): every touched
    group takes its call's keys summed in float32, once rounded, so the backend stores the
    reference's bits (a backend with no half-precision path takes the reference's)."""
    _check_block_sums_add(backend, merge, False, torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("merge", [1, 4])
def test_block_sums_add_float8_sums(backend: Backend, merge: int) -> None:
    """float8 e4m3 sums (`blk_repre_dtype: float8_e4m3fn`): the reference's bits, subnormal
    groups, rounding to nearest even and saturation at +-448 included (keys of 10^-3 to 10^3)."""
    _check_block_sums_add(backend, merge, False, torch.bfloat16, torch.float8_e4m3fn, spread=True)


def _check_block_sums_add(
    backend: Backend, merge: int, absolute: bool, dtype: torch.dtype, sums_dtype, spread: bool = False
) -> None:
    nb, bs, h, d = 6, 32, 3, 16
    calls = [
        torch.cat([torch.arange(0, 70), torch.tensor([-1, -1])]),  # blocks 0, 1 and part of 2
        torch.tensor([70, 71, -1, 140]),  # decode: block 2 grows, block 4 starts
        torch.tensor([33, 32, 34]),  # block 1 recycled: offset 0 written after offset 1
        torch.tensor([72, 141, -1, 73, 142]),  # two blocks' keys interleaved (not vLLM's order)
    ]
    for _ in write_paths(backend):
        g = gen(7)
        ref = (torch.zeros(nb, bs // merge, h, d, dtype=sums_dtype), torch.zeros(nb, h, d) if absolute else None)
        got = tuple(None if t is None else backend.to(t) for t in ref)
        for slots in calls:
            keys = torch.randn(len(slots), h, d, generator=g)
            if spread:  # magnitudes from 10^-3 to 10^3: subnormal, normal and saturated sums
                keys = keys * 10 ** (torch.rand(len(slots), h, d, generator=g) * 6 - 3)
            keys = keys.to(dtype)
            REF.block_sums_add(*ref, keys, slots, bs, merge)
            backend.ops.block_sums_add(*got, backend.to(keys), backend.to(slots), bs, merge)
            for a, b in zip(ref, got, strict=True):
                if a is not None:
                    assert host(b).dtype == a.dtype
                    torch.testing.assert_close(host(b).float(), a.float(), rtol=1e-5, atol=1e-5)
        assert host(got[0][1]).float().abs().sum() > 0 and host(got[0][3]).float().abs().sum() == 0
    if sums_dtype == torch.float8_e4m3fn:  # the cases the rounding has to get right did occur
        vals = ref[0].float().abs()
        assert (vals == 448).any() and ((vals > 0) & (vals < 2**-6)).any()
    if backend.name != "cuda":  # the host-side range check (the CUDA kernels skip it: it would sync)
        with pytest.raises(ValueError, match="past"):
            backend.ops.block_sums_add(*got, torch.zeros(1, h, d), torch.tensor([nb * bs]), bs, merge)


@pytest.mark.parametrize("merge", [1, 4])
def test_block_sums_add_from_random_state(backend: Backend, merge: int) -> None:
    """Fresh blocks (offset 0 written) restart, padding slots are skipped, several keys of one
    block in one call all land; with and without |K| sums."""
    g = gen(11 + merge)
    nb, bs, h, d = 6, 8, 2, 16
    sums = torch.randn(nb, bs // merge, h, d, generator=g)
    abs_sums = torch.randn(nb, h, d, generator=g)
    slots = torch.tensor([8, 9, 10, 11, 12, 13, 14, 15, 26, 27, -1, 40, 41, 42, 7])
    key = torch.randn(slots.shape[0], h, d, generator=g)
    want, want_abs = sums.clone(), abs_sums.clone()
    REF.block_sums_add(want, want_abs, key, slots, bs, merge)
    got, got_abs = backend.to(sums), backend.to(abs_sums)
    backend.ops.block_sums_add(got, got_abs, backend.to(key), backend.to(slots), bs, merge)
    torch.testing.assert_close(host(got), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(host(got_abs), want_abs, rtol=1e-5, atol=1e-5)
    backend.ops.block_sums_add(got, None, backend.to(key), backend.to(slots), bs, merge)
    REF.block_sums_add(want, None, key, slots, bs, merge)
    torch.testing.assert_close(host(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sums", "sums-float8", "minmax", "minmax-bfloat16", "minmax-groups", "kvstar"])
def test_reps_write_layers(backend: Backend, kind: str) -> None:
    """Every layer's representations from its paged key cache in one call (vLLM 0.26's
    FlashAttention layout, [NB, Hkv, bs, 2D] with K first in the last dimension, seen as
    [NB, bs, Hkv, D]) equal the per-layer op given the keys themselves: decode calls with
    padding, a recycled block, several keys of one block, a call past one scan vector (300
    tokens) and a call with no tokens (changes nothing). Quest's bounds per block in float32 and
    in bfloat16 (the keys' dtype), and per group of 4 tokens."""
    g = gen(23)
    layers, nb, bs, h, d = 3, 12, 16, 2, 8
    merge = {"sums": 4, "sums-float8": 4, "minmax": bs, "minmax-bfloat16": bs, "minmax-groups": 4, "kvstar": 8}[kind]
    # float8 sums: magnitudes from 10^-3 to 10^3, so subnormal and saturated groups occur
    spread = [
        10 ** (torch.rand(nb, h, bs, 2 * d, generator=g) * 6 - 3) if kind == "sums-float8" else 1.0
        for _ in range(layers)
    ]
    raw = [(torch.randn(nb, h, bs, 2 * d, generator=g) * spread[i]).to(torch.bfloat16) for i in range(layers)]
    calls = [
        torch.tensor([3 * bs + 5, -1, 1 * bs, 1 * bs + 1, 4 * bs + 15, 5 * bs + 7]),
        torch.tensor([3 * bs + 6, 1 * bs + 2, -1]),
        torch.tensor([1 * bs, 9 * bs + 3]),  # block 1 recycled
        torch.arange(6 * bs, 6 * bs + 300) % (nb * bs),  # past one scan vector (blocks 6.. wrap to 0)
        torch.tensor([], dtype=torch.int64),
    ]

    def fresh() -> tuple[list, list]:
        gg = gen(29)
        if kind.startswith("sums"):
            sums_dtype = torch.float8_e4m3fn if kind == "sums-float8" else torch.float32
            return [torch.randn(nb, bs // merge, h, d, generator=gg).to(sums_dtype) for _ in range(layers)], [
                torch.randn(nb, h, d, generator=gg) for _ in range(layers)
            ]
        n = nb * bs // merge if kind.startswith("minmax") else nb  # Quest: per group of `merge` tokens
        a = [torch.randn(n, h, d, generator=gg) for _ in range(layers)]
        b = [torch.randn(n, h, d, generator=gg) for _ in range(layers)]
        if kind == "kvstar":
            a = [x[..., None].repeat(1, 1, 1, bs // merge).to(torch.bfloat16) for x in a]
        if kind in ("minmax-bfloat16", "minmax-groups"):  # Quest's bounds in the keys' own dtype
            a, b = ([x.to(torch.bfloat16) for x in t] for t in (a, b))
        return a, b

    want_a, want_b = fresh()
    got = tuple([backend.to(t) for t in ts] for ts in fresh())
    caches = [backend.to(r).transpose(1, 2)[..., :d] for r in raw]
    launches = getattr(backend.ops, "layered_writes", 0)
    for slots in calls:
        for i in range(layers):
            keys = raw[i].transpose(1, 2)[..., :d][slots.clamp(min=0) // bs, slots.clamp(min=0) % bs]
            if kind.startswith("sums"):
                REF.block_sums_add(want_a[i], want_b[i], keys, slots, bs, merge)
            elif kind.startswith("minmax"):
                REF.block_minmax_update(want_a[i], want_b[i], keys, slots, merge)
            else:
                REF.kvstar_reps_add(want_a[i], want_b[i], keys, slots, bs, merge)
        backend.ops.reps_write_layers(kind.split("-")[0], *got, caches, backend.to(slots), bs, merge)
        for w, o in zip(want_a + want_b, got[0] + got[1], strict=True):
            assert host(o).dtype == w.dtype
            torch.testing.assert_close(host(o).float(), w.float(), rtol=1e-5, atol=1e-5)
    if backend.name == "cuda":  # the three decode calls in one launch each; 300 tokens layer by layer
        assert backend.ops.layered_writes - launches == 3


def test_hash_write_layers(backend: Backend) -> None:
    """Every layer's hash codes from its paged key cache in one call (vLLM 0.26's layout, as in
    `test_reps_write_layers`) equal `hash_write` of each layer given the keys: decode calls of 1
    and 6 tokens with padding (the kernel's two projection paths), 300 tokens (layer by layer)
    and no tokens. Integer-valued keys and weights: exact projections, no sign at rounding."""
    g = gen(31)
    layers, nb, bs, h, d, bits = 3, 12, 16, 2, 16, 64
    raw = [torch.randint(-3, 4, (nb, h, bs, 2 * d), generator=g).to(torch.bfloat16) for _ in range(layers)]
    weights = [torch.randint(-2, 3, (d, bits), generator=g).to(torch.float32) for _ in range(layers)]
    calls = [
        torch.tensor([3 * bs + 5]),
        torch.tensor([3 * bs + 6, -1, 1 * bs, 1 * bs + 1, 4 * bs + 15, 5 * bs + 7]),
        torch.arange(6 * bs, 6 * bs + 300) % (nb * bs),
        torch.tensor([], dtype=torch.int64),
    ]
    want = [torch.zeros(nb, bs, h, bits // 8, dtype=torch.uint8) for _ in range(layers)]
    got = [backend.to(w) for w in want]
    caches = [backend.to(r).transpose(1, 2)[..., :d] for r in raw]
    launches = getattr(backend.ops, "layered_writes", 0)
    for slots in calls:
        for i in range(layers):
            keys = raw[i].transpose(1, 2)[..., :d][slots.clamp(min=0) // bs, slots.clamp(min=0) % bs]
            REF.hash_write(want[i], keys, weights[i], slots)
        backend.ops.hash_write_layers(got, caches, [backend.to(w) for w in weights], backend.to(slots))
        for w, o in zip(want, got, strict=True):
            assert torch.equal(host(o), w)
    assert any(int(w.sum()) for w in want)
    if backend.name == "cuda":  # the two decode calls in one launch each
        assert backend.ops.layered_writes - launches == 2


# ---------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("seq_lens,bs,hq,hkv,d", ORACLE_CASES)
def test_paged_decode_attention_matches_sdpa(backend: Backend, seq_lens, bs, hq, hkv, d) -> None:
    g = gen(5)
    batch = make_paged(seq_lens, bs, hkv, d, g)
    q = torch.randn(len(seq_lens), hq, d, generator=g)
    out, lse = backend.ops.paged_decode_attention(
        *map(backend.to, (q, batch.k_cache, batch.v_cache, batch.block_table, batch.seq_lens)), 0.3
    )
    out, lse = host(out), host(lse)
    for r in range(len(seq_lens)):
        k = batch.keys(r).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)  # [Hq, n, D]
        v = batch.values(r).repeat_interleave(hq // hkv, dim=1).transpose(0, 1)
        want = torch.nn.functional.scaled_dot_product_attention(q[r][:, None], k, v, scale=0.3)[:, 0]
        torch.testing.assert_close(out[r], want, rtol=2e-5, atol=2e-5)
        logits = torch.einsum("hd,hnd->hn", q[r], k) * 0.3
        torch.testing.assert_close(lse[r], torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)


ATTN_CASES = [
    # (tier, hq, hkv, d, dv, bs, lens, shared_latent, table)
    ("any", 4, 1, 16, 16, 4, [1, 9, 23], False, "shuffled"),
    ("any", 8, 8, 32, 32, 8, [17, 40], False, "shuffled"),  # G=1
    ("any", 8, 2, 16, 32, 4, [13], False, "shuffled"),  # Dv != D
    ("any", 16, 1, 48, 32, 4, [21, 6], True, "shuffled"),  # MLA-like: V = first 32 dims of the latent
    ("any", 4, 2, 24, 24, 4, [10, 0], False, "shuffled"),  # non-power-of-two head dim, an empty row
    ("native", 8, 8, 64, 64, 16, [100, 0, 16, 3], False, "any"),
    ("native", 32, 8, 64, 64, 16, [100, 0, 16, 3], False, "any"),
    ("native", 16, 2, 32, 48, 16, [100, 0, 16, 3], False, "any"),
    ("native", 8, 1, 576, 512, 16, [100, 0, 16, 3], False, "any"),
    ("gpu", 32, 8, 128, 128, 128, [32768, 1000, 130, 1], False, "shuffled"),
    ("gpu", 32, 4, 128, 128, 16, [5000, 77], False, "shuffled"),
    ("gpu", 16, 1, 576, 512, 64, [4097, 64], True, "shuffled"),
    ("gpu", 128, 1, 576, 512, 64, [3000, 1], True, "shuffled"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "case", ATTN_CASES, ids=lambda c: f"{c[0]}-hq{c[1]}-hkv{c[2]}-d{c[3]}-dv{c[4]}-bs{c[5]}-b{len(c[6])}"
)
def test_paged_decode_attention(backend: Backend, dtype: torch.dtype, case) -> None:
    tier, hq, hkv, d, dv, bs, lens, shared, kind = case
    backend.need(tier)
    g = gen(hq * d + bs + len(lens))
    if kind == "shuffled":
        table, seq_lens, nb = shuffled_table(lens, bs, 2, g)
    else:
        table, seq_lens, nb = paged_case(g, lens, bs, extra_width=1)
    q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
    k = torch.randn(nb, bs, hkv, d, generator=g).to(dtype)
    v = k[..., :dv] if shared else torch.randn(nb, bs, hkv, dv, generator=g).to(dtype)
    scale = d**-0.5
    rout, rlse = REF.paged_decode_attention(*(t.float() for t in (q, k, v)), table, seq_lens, scale)
    tol = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    for kw in backend.attention_kwargs:
        if backend.interpreted and dtype == torch.float16 and kw.get("num_splits") == 3:
            continue  # covered by bf16 on the interpreter
        out, lse = backend.ops.paged_decode_attention(*map(backend.to, (q, k, v, table, seq_lens)), scale, **kw)
        assert out.dtype == dtype and out.shape == rout.shape and lse.dtype == torch.float32
        torch.testing.assert_close(host(out).float(), rout, rtol=tol, atol=tol)
        torch.testing.assert_close(host(lse), rlse, rtol=1e-4, atol=max(tol, 1e-4))


def test_paged_decode_attention_over_a_rewritten_table(backend: Backend) -> None:
    """Attention over the backend's own selection equals the reference over the same selection."""
    g = gen(77)
    bs, hq, hkv, d = 4, 4, 2, 16
    table, seq_lens, nb = shuffled_table([37, 18], bs, 0, g)
    q = torch.randn(2, hq, d, generator=g).to(torch.bfloat16)
    k = torch.randn(nb, bs, hkv, d, generator=g).to(torch.bfloat16)
    v = torch.randn(nb, bs, hkv, d, generator=g).to(torch.bfloat16)
    scores = torch.randn(2, table.shape[1], generator=g)
    keep = torch.zeros(2, table.shape[1], dtype=torch.bool)
    keep[0, 9] = keep[1, 4] = True  # each row's partial last block
    tab, new_lens = backend.ops.select_and_rewrite(
        *map(backend.to, (scores, torch.tensor([4, 2]), keep, table, seq_lens)), bs
    )
    out, lse = backend.ops.paged_decode_attention(*map(backend.to, (q, k, v)), tab, new_lens, d**-0.5)
    tab, new_lens = host(tab), host(new_lens)
    rout, rlse = REF.paged_decode_attention(q.float(), k.float(), v.float(), tab, new_lens, d**-0.5)
    torch.testing.assert_close(host(out).float(), rout, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(host(lse), rlse, rtol=1e-4, atol=2e-2)


# ------------------------------------------------------------------------------------- Quest
QUEST_UPDATE_CALLS = [
    torch.cat([torch.arange(0, 21), torch.tensor([-1, -1])]),  # a prefill: blocks 0, 1, part of 2
    torch.tensor([21, 22, -1, 40]),  # decode: block 2 grows, block 5 starts
    torch.tensor([9, 8, 10]),  # block 1 recycled: its offset 0 written after offset 1 of the same call
    torch.tensor([23, 23]),  # one slot written twice in one call
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,d", [(2, 16), (1, 72), (3, 40)])
def test_block_minmax_update(backend: Backend, dtype, h, d) -> None:
    """A prefill of whole and partial blocks, decode steps, a recycled block (offset 0 after
    offset 1 in one call), padding slots and a slot written twice: bit-identical statistics."""
    nb, bs = 7, 8
    for _ in write_paths(backend):
        g = gen(h * d)
        ref = (torch.zeros(nb, h, d), torch.zeros(nb, h, d))
        got = tuple(backend.to(t) for t in ref)
        for slots in QUEST_UPDATE_CALLS:
            key = torch.randn(len(slots), h, d, generator=g).to(dtype)
            key[0, 0, :2] = torch.tensor([-0.0, float("inf")], dtype=dtype)
            REF.block_minmax_update(*ref, key, slots, bs)
            backend.ops.block_minmax_update(*got, backend.to(key), backend.to(slots), bs)
            for a, b in zip(ref, got, strict=True):
                assert torch.equal(host(b), a)


@pytest.mark.parametrize("key_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_block_minmax_update_half_bounds(backend: Backend, key_dtype) -> None:
    """Bounds kept in bfloat16 (`group_bounds_dtype` for bf16 keys on the GPU): from keys of their
    own dtype the float32 bounds' values exactly (the reference's bits on every backend); from
    keys bfloat16 cannot hold, each min rounded down and each max up to the nearest bfloat16,
    so they still bound every key (values from 2^-100 to 2^100: past float16's range both ways;
    not bfloat16's subnormals, which a CPU set to flush them flushes in the reference too)."""
    nb, bs, h, d = 7, 8, 2, 24
    for _ in write_paths(backend):
        g = gen(41)
        wide = (torch.zeros(nb, h, d), torch.zeros(nb, h, d))
        ref = tuple(t.to(torch.bfloat16) for t in wide)
        got = tuple(backend.to(t) for t in ref)
        for slots in QUEST_UPDATE_CALLS:
            key = torch.randn(len(slots), h, d, generator=g) * 2.0 ** torch.randint(
                -100, 100, (len(slots), h, d), generator=g
            )
            key = key.to(key_dtype)
            REF.block_minmax_update(*wide, key, slots, bs)
            REF.block_minmax_update(*ref, key, slots, bs)
            backend.ops.block_minmax_update(*got, backend.to(key), backend.to(slots), bs)
            for exact, want, have in zip(wide, ref, got, strict=True):
                assert host(have).dtype == torch.bfloat16 and torch.equal(host(have), want)
                if key_dtype == torch.bfloat16:
                    assert torch.equal(want.float(), exact)
        lo, hi = (t.float() for t in ref)
        assert (lo <= wide[0]).all() and (hi >= wide[1]).all()
        if key_dtype != torch.bfloat16:  # some keys did need rounding
            assert (lo < wide[0]).any() and (hi > wide[1]).any()


def test_block_scores_of_half_bounds_equal_float32_bounds(backend: Backend) -> None:
    """Quest's scores of bfloat16 bounds of bfloat16 keys (whole blocks and groups of 4 keys)
    equal the scores of the same keys' float32 bounds: keeping them in the keys' dtype changes
    no selection."""
    g = gen(43)
    nb, bs, hq, hkv, d = 6, 16, 8, 2, 32
    slots = torch.cat([torch.arange(0, 40), torch.arange(48, 60), torch.tensor([80, 81, -1])])
    key = torch.randn(len(slots), hkv, d, generator=g).to(torch.bfloat16)
    table, lens = torch.tensor([[0, 1, 2, 0], [3, 5, 0, 0]]), torch.tensor([40, 18])
    q = torch.randn(2, hq, d, generator=g).to(torch.bfloat16)
    for merge in (bs, 4):
        shape = (nb * (bs // merge), hkv, d)
        wide = (torch.zeros(shape), torch.zeros(shape))
        half = tuple(backend.to(t.to(torch.bfloat16)) for t in wide)
        REF.block_minmax_update(*wide, key, slots, merge)
        backend.ops.block_minmax_update(*half, backend.to(key), backend.to(slots), merge)
        if merge != bs:
            wide = tuple(t.view(nb, bs // merge, hkv, d) for t in wide)
            half = tuple(t.view(nb, bs // merge, hkv, d) for t in half)
        for mode in ("mean", "max"):
            want = REF.block_scores_minmax(q, *wide, table, lens, bs, mode)
            have = backend.ops.block_scores_minmax(backend.to(q), *half, backend.to(table), backend.to(lens), bs, mode)
            torch.testing.assert_close(host(have), want, rtol=1e-5, atol=1e-4)
            ref_half = REF.block_scores_minmax(q, *(host(t) for t in half), table, lens, bs, mode)
            assert torch.equal(ref_half, want)  # the same bounds, so the reference's same float32 sums


def test_block_minmax_update_edge_calls(backend: Backend) -> None:
    ops, dev = backend.ops, backend.device
    mins = torch.full((3, 2, 4), 5.0, device=dev)
    maxs = torch.full((3, 2, 4), -5.0, device=dev)
    ops.block_minmax_update(
        mins, maxs, torch.zeros(0, 2, 4, device=dev), torch.zeros(0, dtype=torch.long, device=dev), 4
    )
    ops.block_minmax_update(mins, maxs, torch.ones(2, 2, 4, device=dev), torch.tensor([-1, -1], device=dev), 4)
    assert (host(mins) == 5).all() and (host(maxs) == -5).all()  # nothing written: nothing changes
    ops.block_minmax_update(mins, maxs, torch.ones(1, 2, 4, device=dev), torch.tensor([5], device=dev), 4)
    assert (host(mins[1]) == 1).all() and (host(maxs[1]) == 1).all()  # mid-block write: folded in
    key = torch.arange(8.0, device=dev).view(1, 2, 4)
    ops.block_minmax_update(mins, maxs, key, torch.tensor([8], dtype=torch.int32, device=dev), 4)
    assert torch.equal(host(mins[2]), host(key[0])) and torch.equal(host(maxs[2]), host(key[0]))  # restarted


QUEST_SCORE_CASES = [
    # (hq, hkv, d, bs, lens)
    (4, 4, 16, 4, [13, 1, 0]),
    (8, 2, 40, 8, [9, 30]),
    (16, 1, 72, 4, [21]),  # MLA-like: one KV head, wide
    (9, 3, 64, 16, [100, 17, 16]),  # SmolLM2-135M's group of 3
]


@pytest.mark.parametrize("group_reduce", ["mean", "max"])
@pytest.mark.parametrize("hq,hkv,d,bs,lens", QUEST_SCORE_CASES)
def test_block_scores_minmax(backend: Backend, group_reduce, hq, hkv, d, bs, lens) -> None:
    g = gen(hq + d + bs)
    table, seq_lens, nb = shuffled_table(lens, bs, 3, g)
    lo = torch.randn(nb, hkv, d, generator=g)
    hi = lo + torch.rand(nb, hkv, d, generator=g)
    q = torch.randn(len(lens), hq, d, generator=g)
    want = REF.block_scores_minmax(q, lo, hi, table, seq_lens, bs, group_reduce)
    dlo, dhi = backend.to(lo), backend.to(hi)

    def run(q_, table_, lens_):
        return host(
            backend.ops.block_scores_minmax(
                backend.to(q_), dlo, dhi, *map(backend.to, (table_, lens_)), bs, group_reduce
            )
        )

    got = run(q, table, seq_lens)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    # int64 tables and lengths, a bf16 query, a non-contiguous query: the same scores
    qb = q.to(torch.bfloat16)
    torch.testing.assert_close(
        run(qb, table.long(), seq_lens.long()),
        REF.block_scores_minmax(qb, lo, hi, table, seq_lens, bs, group_reduce),
        rtol=1e-4,
        atol=1e-3,
    )
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)
    torch.testing.assert_close(run(qt, table, seq_lens), want, rtol=1e-4, atol=1e-3)


def test_block_scores_of_written_minmax_statistics(backend: Backend) -> None:
    """Statistics written through the backend's update, scored by its scorer, equal the
    reference's pipeline."""
    g = gen(3)
    nb, bs, hq, hkv, d = 6, 4, 8, 2, 24
    ref = (torch.zeros(nb, hkv, d), torch.zeros(nb, hkv, d))
    got = tuple(backend.to(t) for t in ref)
    slots = torch.tensor([8, 9, 10, 11, 12, 13, 20, 21, 22, 4])  # blocks 2, 3 (partial), 5, 1 (one key)
    key = torch.randn(len(slots), hkv, d, generator=g)
    REF.block_minmax_update(*ref, key, slots, bs)
    backend.ops.block_minmax_update(*got, backend.to(key), backend.to(slots), bs)
    table, lens = torch.tensor([[2, 3, 0, 0], [5, 1, 0, 0]]), torch.tensor([6, 5])
    q = torch.randn(2, hq, d, generator=g)
    for mode in ("mean", "max"):
        want = REF.block_scores_minmax(q, *ref, table, lens, bs, mode)
        have = backend.ops.block_scores_minmax(backend.to(q), *got, backend.to(table), backend.to(lens), bs, mode)
        torch.testing.assert_close(host(have), want, rtol=1e-4, atol=1e-3)


def test_mode_codes_name_every_literal_once() -> None:
    """`reduce_code` / `group_reduce_code` map exactly the contract's Literal names to distinct
    codes, and reject anything else with the valid names."""
    from typing import get_args

    from ucm.ops.contract import BlockReduce, GroupReduce, group_reduce_code, reduce_code

    assert sorted(c.name.lower() for c in {reduce_code(n) for n in get_args(BlockReduce)}) == sorted(
        get_args(BlockReduce)
    )
    assert sorted(c.name.lower() for c in {group_reduce_code(n) for n in get_args(GroupReduce)}) == sorted(
        get_args(GroupReduce)
    )
    for bad in ("sum", "MIN", "", None):
        with pytest.raises(ValueError, match="valid: mean, max, min"):
            reduce_code(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="valid: mean, max"):
        group_reduce_code("min")
