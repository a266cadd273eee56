"""CPU backend: the op contract with C++/OpenMP kernels for the hot ops, torch for the rest.

The kernels (csrc/ucm_cpu_ops.cpp) are JIT-built with `torch.utils.cpp_extension.load` the
first time a native op runs, and registered as `torch.ops.ucm_cpu.*`. Building needs a C++
compiler and ninja; when either is missing, the build fails, or `UCM_CPU_NATIVE=0`, the backend
logs one warning, records the reason in `native_error`, and every op runs the inherited torch
reference instead. Inputs the kernels do not take (non-CPU tensors, odd dtypes) also go to the
reference, so results never depend on whether the extension is there.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from ucm.ops.contract import BlockReduce, GroupReduce
from ucm.ops.reference import TorchReferenceOps

logger = logging.getLogger(__name__)

NATIVE_ENV_VAR = "UCM_CPU_NATIVE"
CACHE_ENV_VAR = "UCM_CACHE_DIR"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "ucm_cpu_ops.cpp"

_REDUCE_CODES = {"min": 0, "mean": 1, "max": 2}
_GROUP_CODES = {"mean": 0, "max": 1}
_BLOCK_REDUCE_CODES = {"mean": 0, "max": 1, "min": 2}
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Process-wide cache of the loaded extension (loading registers torch ops, which can happen only
# once per process): ("ok", ops namespace) or ("error", reason). A cache, not configuration.
_native_state: tuple[str, Any] | None = None
_native_lock = threading.Lock()
_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    """One warning per distinct reason per process: falling back is legal but slow."""
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("ucm cpu backend: native kernels unavailable (%s); using the torch reference ops", reason)


def cpu_flags() -> set[str]:
    """Instruction-set flags of this CPU from /proc/cpuinfo (empty set where it is unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def find_compiler() -> str | None:
    """The C++ compiler torch's extension builder will use ($CXX, else c++), if present."""
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx) or (shutil.which("g++") if "CXX" not in os.environ else None)


def _compiler_accepts(compiler: str, flags: list[str]) -> bool:
    """Does the compiler take these flags (e.g. -fopenmp without libgomp headers)?"""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            proc = subprocess.run(
                [compiler, *flags, str(src), "-o", str(Path(tmp) / "probe")],
                capture_output=True,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return proc.returncode == 0


def build_configs(compiler: str) -> list[tuple[str, list[str], list[str]]]:
    """(extension name, cflags, ldflags) to try in order: tuned for this CPU first, then portable."""
    flags = cpu_flags()
    isa = [f for f, cpu in (("-mavx2", "avx2"), ("-mpopcnt", "popcnt")) if cpu in flags]
    omp = ["-fopenmp"] if _compiler_accepts(compiler, ["-fopenmp"]) else []
    configs = []
    if isa or omp:
        tag = "_".join(f[2:] for f in isa + omp)  # "-mavx2" -> "avx2", "-fopenmp" -> "openmp"
        configs.append((f"ucm_cpu_ops_{tag}", ["-O3", *isa, *omp], list(omp)))
    configs.append(("ucm_cpu_ops_portable", ["-O3"], []))
    return configs


def build_root() -> Path:
    """Where JIT builds live: $UCM_CACHE_DIR/torch_extensions, else ~/.cache/ucm/torch_extensions."""
    base = os.environ.get(CACHE_ENV_VAR)
    root = Path(base) / "torch_extensions" if base else Path.home() / ".cache" / "ucm" / "torch_extensions"
    return root


def _build_and_load() -> tuple[str, Any]:
    """Compile (or reuse) the extension and register its ops; never raises."""
    if not _SOURCE.is_file():
        return "error", f"kernel source {_SOURCE} is missing"
    compiler = find_compiler()
    if compiler is None:
        return "error", "no C++ compiler found (set CXX or install g++)"
    try:
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001  # pragma: no cover - torch without its extension builder
        return "error", f"torch.utils.cpp_extension unavailable: {exc}"
    if not cpp_extension.is_ninja_available():
        return "error", "ninja is not installed (pip install ninja)"
    failures = []
    for name, cflags, ldflags in build_configs(compiler):
        build_dir = build_root() / name
        try:
            build_dir.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
            ns = torch.ops.ucm_cpu
            ns.build_info()  # resolves the ops: fails here, not mid-step, if registration broke
            return "ok", ns
        except Exception as exc:  # noqa: BLE001 - any build/load failure means "use the fallback"
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            # the first compiler diagnostic says more than ninja's closing "build stopped" line
            detail = next((ln for ln in lines if "error:" in ln), lines[-1] if lines else "")
            failures.append(f"{name}: {type(exc).__name__}: {detail}"[:500])
    return "error", "build failed: " + " | ".join(failures)


def load_native() -> tuple[Any | None, str | None]:
    """(torch.ops.ucm_cpu namespace, None) once built, else (None, reason). Builds at most once."""
    global _native_state
    if os.environ.get(NATIVE_ENV_VAR, "1").strip() == "0":
        return None, f"disabled by {NATIVE_ENV_VAR}=0"
    with _native_lock:
        if _native_state is None:
            _native_state = _build_and_load()
    status, payload = _native_state
    return (payload, None) if status == "ok" else (None, payload)


def _all_cpu(*tensors: torch.Tensor) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors)


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


class CpuOps(TorchReferenceOps):
    """C++/OpenMP kernels for hashing, block reduction, Hamming and dot block scoring, top-k and
    decode attention; everything else (and every input the kernels don't take) is the torch
    reference."""

    name = "cpu"

    def __init__(self, native: bool | None = None) -> None:
        """native=None: use the kernels unless UCM_CPU_NATIVE=0; False: always the torch path."""
        self._native_requested = native
        self._ns: Any | None = None
        self._native_error: str | None = None
        self._resolved = False

    # ------------------------------------------------------------ native plumbing
    def _native(self) -> Any | None:
        """The loaded op namespace, or None (after one warning) when running on the torch path."""
        if not self._resolved:
            if self._native_requested is False:
                self._ns, self._native_error = None, "disabled by the constructor (native=False)"
            else:
                self._ns, self._native_error = load_native()
                if self._ns is None:
                    _warn_once(self._native_error or "unknown reason")
            self._resolved = True
        return self._ns

    def prepare_background_thread(self) -> None:
        """One OpenMP thread for kernels called from this thread (see SparseOps)."""
        ns = self._native()
        if ns is not None:
            ns.set_thread_cap(1)

    @property
    def native_error(self) -> str | None:
        """None when the native kernels are in use, else why not (loads them on first access)."""
        self._native()
        return self._native_error

    @property
    def native_loaded(self) -> bool:
        """True when ops run the compiled kernels (for the inputs they accept)."""
        return self._native() is not None

    @property
    def build_info(self) -> str:
        """Instruction sets the kernels were compiled with ("avx2 popcnt openmp"), or ""."""
        ns = self._native()
        return ns.build_info() if ns is not None else ""

    # ------------------------------------------------------------ host memory
    def host_copy_many(self, dsts, srcs) -> None:
        ns = self._native()
        dsts, srcs = list(dsts), list(srcs)
        ok = len(dsts) == len(srcs) and all(
            t.device.type == "cpu" and t.dtype == torch.uint8 and t.is_contiguous() for t in (*dsts, *srcs)
        ) and all(d.numel() == s.numel() for d, s in zip(dsts, srcs))
        if ns is None or not ok:
            return super().host_copy_many(dsts, srcs)  # the torch path, or the contract's error
        if dsts:
            ns.host_copy_many(dsts, srcs)

    # -------------------------------------------------------- representations
    def block_sums_add(self, sums, abs_sums, key, slot_mapping, block_size, merge) -> None:
        ns = self._native()
        ok = (_all_cpu(sums, key, slot_mapping) and sums.dtype == torch.float32 and sums.dim() == 4
              and sums.is_contiguous() and key.dtype in _FLOATS and _is_int(slot_mapping)
              and (abs_sums is None or (_all_cpu(abs_sums) and abs_sums.dtype == torch.float32
                                        and abs_sums.is_contiguous())))
        if ns is None or not ok:
            return super().block_sums_add(sums, abs_sums, key, slot_mapping, block_size, merge)
        ns.block_sums_add(sums, abs_sums, key, slot_mapping, block_size, merge)  # its checks raise ValueError

    # ---------------------------------------------------------------- hashing
    def sign_bits_pack(self, x: torch.Tensor) -> torch.Tensor:
        ns = self._native()
        if ns is None or not _all_cpu(x) or x.dim() == 0 or x.dtype not in _FLOATS:
            return super().sign_bits_pack(x)
        return ns.sign_bits_pack(x)

    def hash_encode(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The same float32 matmul as the reference (so the signs, hence the codes, are
        # bit-identical); only the packing is native.
        proj = torch.matmul(x.to(torch.float32), weight.to(device=x.device, dtype=torch.float32))
        return self.sign_bits_pack(proj)

    # -------------------------------------------------------- representations
    def block_reduce(
        self,
        k_cache: torch.Tensor,
        block_ids: torch.Tensor,
        valid_lens: torch.Tensor,
        method: BlockReduce = "mean",
        merge: int = 0,
    ) -> torch.Tensor:
        if k_cache.dim() != 4:
            raise ValueError(f"block_reduce: k_cache must be [NB, bs, Hkv, D], got {tuple(k_cache.shape)}")
        if block_ids.dim() != 1 or valid_lens.shape != block_ids.shape:
            raise ValueError(
                f"block_reduce: block_ids and valid_lens must both be [n], got {tuple(block_ids.shape)} and "
                f"{tuple(valid_lens.shape)}"
            )
        bs = k_cache.shape[1]
        group = merge if merge > 0 else bs
        if group <= 0 or bs % group:
            raise ValueError(f"merge={merge} must divide the block size {bs}")
        if method not in _BLOCK_REDUCE_CODES:
            raise ValueError(f"unknown block reduce method {method!r}; valid: mean, max, min")
        ns = self._native()
        if (
            ns is None
            or not _all_cpu(k_cache, block_ids, valid_lens)
            or k_cache.dtype not in _ATTN_DTYPES
            or not (_is_int(block_ids) and _is_int(valid_lens))
        ):
            return super().block_reduce(k_cache, block_ids, valid_lens, method, merge)
        out = ns.block_reduce(
            k_cache, block_ids.to(torch.int64), valid_lens.to(torch.int64), _BLOCK_REDUCE_CODES[method], int(group)
        )
        return out.squeeze(2) if merge <= 0 else out

    # ---------------------------------------------------------------- scoring
    @staticmethod
    def _check_paged(name: str, hq: int, hkv: int, block_table: torch.Tensor, seq_lens: torch.Tensor, b: int) -> None:
        if hkv <= 0 or hq % hkv:
            raise ValueError(f"{name}: Hq={hq} query heads is not a multiple of Hkv={hkv} KV heads")
        if block_table.dim() != 2 or block_table.shape[0] != b:
            raise ValueError(f"{name}: block_table must be [B={b}, M], got {tuple(block_table.shape)}")
        if seq_lens.dim() != 1 or seq_lens.shape[0] != b:
            raise ValueError(f"{name}: seq_lens must be [B={b}], got {tuple(seq_lens.shape)}")

    def hamming_block_scores(
        self,
        q_codes: torch.Tensor,
        k_codes: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        if q_codes.dim() != 3 or k_codes.dim() != 4:
            raise ValueError(
                f"hamming_block_scores: q_codes must be [B, Hq, C] and k_codes [NB, bs, Hkv, C], got "
                f"{tuple(q_codes.shape)} and {tuple(k_codes.shape)}"
            )
        if q_codes.shape[-1] != k_codes.shape[-1]:
            raise ValueError(f"hamming_block_scores: code widths differ ({q_codes.shape[-1]} vs {k_codes.shape[-1]})")
        self._check_paged(
            "hamming_block_scores", q_codes.shape[1], k_codes.shape[2], block_table, seq_lens, q_codes.shape[0]
        )
        if reduce not in _REDUCE_CODES:
            raise ValueError(f"unknown block reduce {reduce!r}; valid: mean, max, min")
        ns = self._native()
        if (
            ns is None
            or not _all_cpu(q_codes, k_codes, block_table, seq_lens)
            or q_codes.dtype != torch.uint8
            or k_codes.dtype != torch.uint8
            or not (_is_int(block_table) and _is_int(seq_lens))
            or k_codes.shape[1] == 0
        ):
            return super().hamming_block_scores(q_codes, k_codes, block_table, seq_lens, reduce)
        return ns.hamming_block_scores(
            q_codes, k_codes, block_table.to(torch.int64), seq_lens.to(torch.int64), _REDUCE_CODES[reduce]
        )

    def block_scores_dot(
        self,
        q: torch.Tensor,
        repr_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        group_reduce: GroupReduce = "mean",
    ) -> torch.Tensor:
        if q.dim() != 3 or repr_cache.dim() != 3:
            raise ValueError(
                f"block_scores_dot: q must be [B, Hq, D] and repr_cache [NB, Hkv, D], got {tuple(q.shape)} and "
                f"{tuple(repr_cache.shape)}"
            )
        self._check_paged("block_scores_dot", q.shape[1], repr_cache.shape[1], block_table, seq_lens, q.shape[0])
        if group_reduce not in _GROUP_CODES:
            raise ValueError(f"unknown group reduce {group_reduce!r}; valid: mean, max")
        ns = self._native()
        if (
            ns is None
            or not _all_cpu(q, repr_cache, block_table, seq_lens)
            or repr_cache.dtype != torch.float32  # converting the whole cache would cost more than it saves
            or q.dtype not in _FLOATS
            or not (_is_int(block_table) and _is_int(seq_lens))
            or int(block_size) <= 0
        ):
            return super().block_scores_dot(q, repr_cache, block_table, seq_lens, block_size, group_reduce)
        return ns.block_scores_dot(
            q.to(torch.float32),
            repr_cache,
            block_table.to(torch.int64),
            seq_lens.to(torch.int64),
            int(block_size),
            _GROUP_CODES[group_reduce],
        )

    # -------------------------------------------------------------- selection
    def block_topk(
        self,
        scores: torch.Tensor,
        k: torch.Tensor,
        must_keep: torch.Tensor,
        n_blocks: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if scores.dim() != 2:
            raise ValueError(f"block_topk: scores must be [B, M], got {tuple(scores.shape)}")
        b = scores.shape[0]
        if must_keep.shape != scores.shape:
            raise ValueError(f"block_topk: must_keep {tuple(must_keep.shape)} must match scores {tuple(scores.shape)}")
        if k.dim() != 1 or k.shape[0] != b or n_blocks.dim() != 1 or n_blocks.shape[0] != b:
            raise ValueError(
                f"block_topk: k and n_blocks must be [B={b}], got {tuple(k.shape)} and {tuple(n_blocks.shape)}"
            )
        ns = self._native()
        if (
            ns is None
            or not _all_cpu(scores, k, must_keep, n_blocks)
            or scores.dtype not in _FLOATS
            or must_keep.dtype != torch.bool
        ):
            return super().block_topk(scores, k, must_keep, n_blocks)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.to(torch.float32)  # exact, and the reference compares in float64 anyway
        ids, counts = ns.block_topk(scores, k.to(torch.int64), must_keep, n_blocks.to(torch.int64))
        return ids, counts

    def select_rewrite(
        self,
        scores: torch.Tensor,
        k: torch.Tensor,
        must_keep: torch.Tensor,
        n_units: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        n_blocks: torch.Tensor,
        unit_blocks: int,
        block_size: int,
    ) -> tuple[torch.Tensor, ...] | None:
        """`block_topk` fused with `BlockSelector.rewrite` (not part of the contract: an optional
        fast path the selector probes for, since per-layer op dispatch dominates at decode sizes).

        Returns (unit_ids int32 [B, U], unit_counts int32 [B], block_table [B, M] in the table's
        dtype, seq_lens int64 [B], blocks_kept int64 [B], logical int64 [B, M]), or None when the
        kernels are unavailable or the inputs are not ones they take (the caller falls back).
        """
        ns = self._native()
        if (
            ns is None
            or not _all_cpu(scores, k, must_keep, n_units, block_table, seq_lens, n_blocks)
            or scores.dtype not in (torch.float32, torch.float64)
            or must_keep.dtype != torch.bool
            or block_table.dtype not in (torch.int32, torch.int64)
            or scores.dim() != 2
            or must_keep.shape != scores.shape
        ):
            return None
        return tuple(ns.select_rewrite(scores, k.to(torch.int64), must_keep, n_units.to(torch.int64), block_table,
                                       seq_lens.to(torch.int64), n_blocks.to(torch.int64), int(unit_blocks),
                                       int(block_size)))

    def kvstar_scores(
        self,
        q: torch.Tensor,
        sums: torch.Tensor,
        abs_sums: torch.Tensor,
        block_table: torch.Tensor,
        n_full: torch.Tensor,
        kept_dims: int,
        scale: float,
    ) -> torch.Tensor | None:
        """KVStar's block scores in one native pass (not part of the contract: an optional fast
        path `KVStarScorer` probes for). q [B, W, Hq, D], sums [NB, R, Hkv, D] (sums of `merge`
        keys; pass scale / merge), abs_sums [NB, Hkv, D], n_full [B] full blocks per row ->
        float32 [B, M], -inf past n_full; None when the kernels cannot take the inputs."""
        ns = self._native()
        if (
            ns is None
            or not _all_cpu(q, sums, abs_sums, block_table, n_full)
            or sums.dtype != torch.float32
            or abs_sums.dtype != torch.float32
            or q.dtype not in _FLOATS
            or not (_is_int(block_table) and _is_int(n_full))
        ):
            return None
        return ns.kvstar_scores(q.to(torch.float32), sums, abs_sums, block_table.to(torch.int64),
                                n_full.to(torch.int64), int(kept_dims), float(scale))

    # -------------------------------------------------------------- attention
    def paged_decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
            raise ValueError(
                f"paged_decode_attention: q must be [B, Hq, D] and caches [NB, bs, Hkv, D], got {tuple(q.shape)}, "
                f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
            )
        if k_cache.shape[:3] != v_cache.shape[:3] or k_cache.shape[3] != q.shape[2]:
            raise ValueError(
                f"paged_decode_attention: k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)} and q "
                f"{tuple(q.shape)} disagree"
            )
        self._check_paged("paged_decode_attention", q.shape[1], k_cache.shape[2], block_table, seq_lens, q.shape[0])
        ns = self._native()
        if (
            ns is None
            or not _all_cpu(q, k_cache, v_cache, block_table, seq_lens)
            or q.dtype not in _ATTN_DTYPES
            or k_cache.dtype not in _ATTN_DTYPES
            or v_cache.dtype != k_cache.dtype
            or not (_is_int(block_table) and _is_int(seq_lens))
            or k_cache.shape[1] == 0
        ):
            return super().paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale)
        out, lse = ns.paged_decode_attention(
            q, k_cache, v_cache, block_table.to(torch.int64), seq_lens.to(torch.int64), float(scale)
        )
        return out, lse
