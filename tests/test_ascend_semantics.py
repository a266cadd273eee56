"""What can be proven about the Ascend backend without an NPU.

1. An independent NumPy model of torch_npu.npu_sign_bits_pack / npu_sign_bits_unpack, written
   from their public definition, reproduces the documented worked examples.
2. The core's reference bit packing (the oracle every backend is held to) is byte-identical to
   that model, so the NPU op and the CPU/CUDA backends agree by construction.
3. The AscendOps wrapper logic (per-row padding, flattening, `size`, dtype handling) is right,
   run against a stand-in torch_npu module built from the NumPy model.
4. On a machine without torch_npu the registry reports the backend unavailable with a clear
   reason, and importing ucm never imports torch_npu.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

import ucm.ops
from ucm.ops import BackendUnavailableError, TorchReferenceOps, get_ops

HAS_TORCH_NPU = importlib.util.find_spec("torch_npu") is not None


# --------------------------------------------------------------------------- NumPy model
def np_sign_bits_pack(x: np.ndarray, size: int) -> np.ndarray:
    """npu_sign_bits_pack as documented: 1-D float16/float32 -> uint8 [size, ceil(n/8)/size].

    Bit = bool(sign(x) + 1), i.e. 1 for x >= 0 (NaN also gives 1 here), packed little-endian
    inside each byte, the tail padded with -1.0 to a multiple of 8.
    """
    assert x.ndim == 1 and x.dtype in (np.float16, np.float32), (x.ndim, x.dtype)
    nbytes = (x.shape[0] + 7) // 8
    assert size != 0 and nbytes % size == 0, (nbytes, size)
    padded = np.concatenate([x, np.full(nbytes * 8 - x.shape[0], -1.0, dtype=x.dtype)])
    bits = (np.sign(padded) + 1).astype(bool)
    return np.packbits(bits, bitorder="little").reshape(size, nbytes // size)


def np_sign_bits_unpack(codes: np.ndarray, size: int, dtype: type) -> np.ndarray:
    """npu_sign_bits_unpack as documented: 1-D uint8 [c] -> [size, 8c/size] of +-1.0."""
    assert codes.ndim == 1 and codes.dtype == np.uint8
    assert size > 0 and (codes.shape[0] * 8) % size == 0
    bits = np.unpackbits(codes, bitorder="little").astype(dtype)
    return (bits * 2 - 1).astype(dtype).reshape(size, -1)


def np_pack_rows(x: np.ndarray) -> np.ndarray:
    """[..., n] -> [..., ceil(n/8)]: the model applied to every row on its own."""
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    out = np.stack([np_sign_bits_pack(r, 1)[0] for r in rows]) if rows.shape[0] else np.zeros((0, (n + 7) // 8))
    return out.astype(np.uint8).reshape(*x.shape[:-1], (n + 7) // 8)


# ------------------------------------------------------------------ documented examples
WORKED = [5, 4, 3, 2, 0, -1, -2, 4, 3, 2, 1, 0, -1, -2]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_model_reproduces_documented_pack_example(dtype) -> None:
    x = np.array(WORKED, dtype=dtype)
    np.testing.assert_array_equal(np_sign_bits_pack(x, 2), np.array([[159], [15]], dtype=np.uint8))
    np.testing.assert_array_equal(np_sign_bits_pack(x, 1), np.array([[159, 15]], dtype=np.uint8))


def test_model_reproduces_documented_unpack_example() -> None:
    out = np_sign_bits_unpack(np.array([159, 15], dtype=np.uint8), 2, np.float32)
    expected = np.array(
        [[1, 1, 1, 1, 1, -1, -1, 1], [1, 1, 1, 1, -1, -1, -1, -1]],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(out, expected)


def test_model_unpack_inverts_pack() -> None:
    rng = np.random.default_rng(0)
    for n in range(1, 41):
        x = rng.standard_normal(n).astype(np.float32)
        signs = np_sign_bits_unpack(np_sign_bits_pack(x, 1)[0], 1, np.float32)[0]
        np.testing.assert_array_equal(signs[:n], np.where(x >= 0, 1.0, -1.0))
        np.testing.assert_array_equal(signs[n:], -1.0)  # padding bits are 0


# ------------------------------------------------------- core reference == NumPy model
def _edge_vectors(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    cases = []
    for n in range(1, 18):
        cases.append(torch.randn(n, generator=gen).to(dtype))
        cases.append(torch.zeros(n, dtype=dtype))
        cases.append(torch.full((n,), -0.0, dtype=dtype))
        cases.append(-torch.ones(n, dtype=dtype))
    tiny = torch.finfo(dtype).tiny
    special = [0.0, -0.0, tiny, -tiny, tiny / 4, -tiny / 4, float("inf"), -float("inf"), 1.0, -1.0, 65504.0]
    cases.append(torch.tensor(special, dtype=dtype))
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_pack_matches_model_on_edge_vectors(dtype: torch.dtype) -> None:
    ops = TorchReferenceOps()
    for x in _edge_vectors(dtype):
        got = ops.sign_bits_pack(x)
        assert got.dtype == torch.uint8 and got.shape == ((x.shape[0] + 7) // 8,)
        np.testing.assert_array_equal(got.numpy(), np_pack_rows(x.numpy()), err_msg=f"x={x.tolist()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 17), (4, 1, 64), (1, 128), (2, 2, 2, 9), (6, 8)])
def test_reference_pack_matches_model_on_batches(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen).to(dtype)
    x.view(-1)[::7] = 0.0  # exact zeros (bit 1)
    x.view(-1)[3::11] = -0.0  # negative zeros (bit 1)
    got = TorchReferenceOps().sign_bits_pack(x)
    assert got.shape == (*shape[:-1], (shape[-1] + 7) // 8)
    np.testing.assert_array_equal(got.numpy(), np_pack_rows(x.numpy()))


def test_reference_pack_documented_example() -> None:
    got = TorchReferenceOps().sign_bits_pack(torch.tensor(WORKED, dtype=torch.float32))
    assert got.tolist() == [159, 15]


def test_nan_is_where_contract_and_npu_model_differ() -> None:
    """The contract says bit = (x >= 0), 0 for NaN; torch_npu's documented model gives 1.

    AscendOps maps NaN to -1.0 before calling the NPU op (see test_ascend_ops_pack_nan), so the
    backend follows the contract either way.
    """
    x = np.array([np.nan, 1.0, -1.0], dtype=np.float32)
    assert np_sign_bits_pack(x, 1)[0, 0] & 1 == 1
    assert TorchReferenceOps().sign_bits_pack(torch.from_numpy(x)).item() & 1 == 0


def test_reference_hash_encode_matches_model() -> None:
    ops = TorchReferenceOps()
    gen = torch.Generator().manual_seed(2)
    # integer-valued data: the float32 matmul is exact, so NumPy can compute it independently
    x = torch.randint(-3, 4, (2, 5, 16), generator=gen).to(torch.float16)
    w = torch.randint(-2, 3, (16, 24), generator=gen).to(torch.float32)
    proj = x.numpy().astype(np.float32) @ w.numpy()
    assert (proj == 0).any()  # zeros are on the bit-1 side
    np.testing.assert_array_equal(ops.hash_encode(x, w).numpy(), np_pack_rows(proj))
    # random data: the pack of the projection torch computed
    x = torch.randn(3, 4, 32, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(32, 20, generator=gen)
    proj = (x.to(torch.float32) @ w).numpy()
    np.testing.assert_array_equal(ops.hash_encode(x, w).numpy(), np_pack_rows(proj))


# ------------------------------------------- AscendOps against a stand-in torch_npu module
def _make_fake_torch_npu() -> types.ModuleType:
    """A torch_npu stand-in whose two ops are the NumPy model, with the real ops' input checks."""
    fake = types.ModuleType("torch_npu")
    fake.calls = []

    def npu_sign_bits_pack(x: torch.Tensor, size: int) -> torch.Tensor:
        if x.dim() != 1:
            raise RuntimeError("input must be one-dimensional")
        if x.dtype not in (torch.float16, torch.float32):
            raise RuntimeError("only supports torch.float16 and torch.float32")
        fake.calls.append(("pack", tuple(x.shape), x.dtype, size))
        return torch.from_numpy(np_sign_bits_pack(x.numpy(), size))

    def npu_sign_bits_unpack(x: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
        if x.dim() != 1 or x.dtype != torch.uint8:
            raise RuntimeError("input must be 1-D uint8")
        np_dtype = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
        fake.calls.append(("unpack", tuple(x.shape), dtype, size))
        return torch.from_numpy(np_sign_bits_unpack(x.numpy(), size, np_dtype))

    fake.npu_sign_bits_pack = npu_sign_bits_pack
    fake.npu_sign_bits_unpack = npu_sign_bits_unpack
    return fake


@pytest.fixture
def ascend_mod():
    """ucm_backends.ascend.ops imported against the stand-in; sys.modules restored afterwards."""
    names = ("torch_npu", "ucm_backends.ascend.ops")
    saved = {k: sys.modules.get(k) for k in names}
    pkg = importlib.import_module("ucm_backends.ascend")
    had_attr, old_attr = hasattr(pkg, "ops"), getattr(pkg, "ops", None)
    fake = _make_fake_torch_npu()
    sys.modules["torch_npu"] = fake
    sys.modules.pop("ucm_backends.ascend.ops", None)
    try:
        mod = importlib.import_module("ucm_backends.ascend.ops")
        yield mod, fake
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        if had_attr:
            pkg.ops = old_attr
        elif hasattr(pkg, "ops"):
            delattr(pkg, "ops")


def test_ascend_ops_is_a_reference_subclass(ascend_mod) -> None:
    mod, _ = ascend_mod
    ops = mod.AscendOps()
    assert ops.name == "ascend"
    assert isinstance(ops, ucm.ops.SparseOps) and isinstance(ops, TorchReferenceOps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (17,), (3, 5), (2, 3, 17), (4, 64), (2, 2, 2, 9), (5, 1)])
def test_ascend_ops_pack_matches_reference(ascend_mod, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    mod, fake = ascend_mod
    gen = torch.Generator().manual_seed(len(shape) * 31 + shape[-1])
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x.view(-1)[::5] = 0.0
    x.view(-1)[2::6] = -0.0
    x = x.to(dtype)
    got = mod.AscendOps().sign_bits_pack(x)
    assert got.dtype == torch.uint8 and got.shape == (*shape[:-1], (shape[-1] + 7) // 8)
    assert torch.equal(got, TorchReferenceOps().sign_bits_pack(x))
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    assert fake.calls == [("pack", (rows * 8 * ((shape[-1] + 7) // 8),), torch.float16, rows)]


def test_ascend_ops_pack_every_length(ascend_mod) -> None:
    mod, _ = ascend_mod
    gen = torch.Generator().manual_seed(3)
    for n in range(1, 18):
        x = torch.randn(3, n, generator=gen)
        assert torch.equal(mod.AscendOps().sign_bits_pack(x), TorchReferenceOps().sign_bits_pack(x)), n


def test_ascend_ops_pack_exact_sign_in_source_dtype(ascend_mod) -> None:
    """Values that would change sign class if cast to float32/float16 first keep their bit."""
    mod, _ = ascend_mod
    x = torch.tensor([-1e-300, 1e-300, -0.0, 0.0, -1e-40, 1e-40, -1e300, 1e300], dtype=torch.float64)
    got = mod.AscendOps().sign_bits_pack(x)
    assert got.tolist() == TorchReferenceOps().sign_bits_pack(x).tolist() == [0b10101110]
    y = torch.tensor([-1e-8, 1e-8, -0.0, 0.0], dtype=torch.float32)  # underflow to +-0 in float16
    assert torch.equal(mod.AscendOps().sign_bits_pack(y), TorchReferenceOps().sign_bits_pack(y))


def test_ascend_ops_pack_nan(ascend_mod) -> None:
    mod, _ = ascend_mod
    x = torch.tensor([[float("nan"), 1.0, -1.0, float("nan"), 0.0]])
    assert torch.equal(mod.AscendOps().sign_bits_pack(x), TorchReferenceOps().sign_bits_pack(x))


def test_ascend_ops_pack_empty(ascend_mod) -> None:
    mod, fake = ascend_mod
    for shape in [(0, 16), (3, 0, 9), (4, 0)]:
        x = torch.randn(shape)
        got = mod.AscendOps().sign_bits_pack(x)
        ref = TorchReferenceOps().sign_bits_pack(x)
        assert got.shape == ref.shape and got.dtype == torch.uint8
    assert fake.calls == []  # the NPU op rejects size == 0, so it is never called with it


def test_ascend_ops_hash_encode_matches_reference(ascend_mod) -> None:
    mod, _ = ascend_mod
    gen = torch.Generator().manual_seed(4)
    for d, nbits, lead in [(16, 8, (5,)), (64, 128, (2, 3)), (128, 20, (4, 2, 3)), (32, 13, (1,))]:
        x = torch.randn(*lead, d, generator=gen, dtype=torch.float16)
        w = torch.randn(d, nbits, generator=gen)
        got = mod.AscendOps().hash_encode(x, w)
        assert torch.equal(got, TorchReferenceOps().hash_encode(x, w))
        assert got.shape == (*lead, (nbits + 7) // 8)


def test_ascend_ops_unpack_round_trip(ascend_mod) -> None:
    mod, _ = ascend_mod
    ops = mod.AscendOps()
    gen = torch.Generator().manual_seed(5)
    for shape in [(9,), (3, 17), (2, 4, 64)]:
        x = torch.randn(shape, generator=gen)
        for dtype in (torch.float32, torch.float16):
            signs = ops.sign_bits_unpack(ops.sign_bits_pack(x), shape[-1], dtype)
            assert signs.dtype == dtype and signs.shape == x.shape
            assert torch.equal(signs, torch.where(x >= 0, 1.0, -1.0).to(dtype))
    full = ops.sign_bits_unpack(torch.tensor([159, 15], dtype=torch.uint8))
    assert full.tolist() == [1, 1, 1, 1, 1, -1, -1, 1, 1, 1, 1, 1, -1, -1, -1, -1]
    with pytest.raises(TypeError):
        ops.sign_bits_unpack(torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError):
        ops.sign_bits_unpack(torch.zeros(2, dtype=torch.uint8), 17)


# ---------------------------------------------------------------- registry on this host
@pytest.mark.skipif(HAS_TORCH_NPU, reason="torch_npu is installed here; these check a host without it")
class TestWithoutTorchNpu:
    def test_probe_says_unavailable_naming_torch_npu(self) -> None:
        result = ucm.ops.probe("ascend")
        assert result.name == "ascend" and not result.available
        assert "torch_npu" in result.reason

    def test_probe_all_lists_ascend_unavailable(self) -> None:
        by_name = {r.name: r for r in ucm.ops.probe_all()}
        assert not by_name["ascend"].available and "torch_npu" in by_name["ascend"].reason

    def test_get_ops_by_name_raises(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv(ucm.ops.ENV_VAR, raising=False)
        with pytest.raises(BackendUnavailableError) as info:
            get_ops("ascend")
        msg = str(info.value)
        assert "'ascend'" in msg and "unavailable" in msg and "torch_npu" in msg and "argument" in msg

    @pytest.mark.parametrize("value", ["ascend", "ASCEND", " ascend "])
    def test_env_var_forcing_raises(self, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
        monkeypatch.setenv("UCM_BACKEND", value)
        with pytest.raises(BackendUnavailableError) as info:
            get_ops()
        msg = str(info.value)
        assert "'ascend'" in msg and "UCM_BACKEND" in msg and "torch_npu" in msg
        with pytest.raises(BackendUnavailableError):
            ucm.ops.select_backend_name()


def _run_isolated(code: str, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = None
    if extra_path is not None:
        import os

        env = dict(os.environ)
        env["PYTHONPATH"] = extra_path + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120
    )


def test_importing_ucm_and_probing_never_imports_the_ascend_implementation() -> None:
    code = """
        import os, sys
        os.environ.pop("UCM_BACKEND", None)
        import ucm, ucm.ops, ucm.ops.registry, ucm.ops.reference, ucm.ops.contract
        from ucm.ops import probe_all, get_ops, BackendUnavailableError
        probe_all()
        get_ops("reference")
        try:
            get_ops("ascend")
        except BackendUnavailableError:
            pass
        prefixes = ("torch_npu.", "ucm_backends.ascend.ops")
        bad = sorted(m for m in sys.modules if m == "torch_npu" or m.startswith(prefixes))
        print("BAD", bad)
        sys.exit(1 if bad else 0)
    """
    if HAS_TORCH_NPU:
        pytest.skip("torch_npu is installed here: probing the ascend backend imports it by design")
    proc = _run_isolated(code)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_importing_ucm_never_imports_torch_npu_even_when_installed(tmp_path) -> None:
    """A torch_npu on the path that fails loudly on import: ucm's imports must not touch it."""
    (tmp_path / "torch_npu").mkdir()
    (tmp_path / "torch_npu" / "__init__.py").write_text("raise ImportError('torch_npu must not be imported')\n")
    code = """
        import sys
        import ucm, ucm.ops, ucm.ops.registry, ucm.ops.reference, ucm.ops.contract
        import ucm_backends, ucm_backends.ascend
        from ucm.ops import BackendSpec, ProbeResult, SparseOps, TorchReferenceOps
        assert "torch_npu" not in sys.modules, "torch_npu imported"
        assert "ucm_backends.ascend.ops" not in sys.modules, "ascend ops imported"
        # probing imports torch_npu by design when it is installed: the broken one is reported, not raised
        from ucm.ops import probe
        r = probe("ascend")
        assert not r.available and "must not be imported" in r.reason, r
        print("OK")
    """
    proc = _run_isolated(code, str(tmp_path))
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr
