"""CPU backend: the op contract with C++/OpenMP kernels for the hot ops, torch for the rest.

The kernels (csrc/ucm_cpu_ops.cpp) are compiled with `torch.utils.cpp_extension.load` once per
build environment and registered as `torch.ops.ucm_cpu.*`. The build runs when the backend is
constructed (`CpuOps()`; the vLLM connector constructs it at engine start, not in a forward) or by
`ucm build`, with a progress line on stderr. Each environment builds in its own folder,
`build_root()/<ucm version>-torch<torch version>-<hash>` (the hash covers torch's build and C++
ABI, Python, the compiler, the CPU flags used and the kernel source), so two installs never
rebuild over each other; a `built.json` there lets later processes load without locking or
compiling. Builders of one folder take an flock (`build.lock`, recording pid, host, start time,
command): a killed builder's lock is released by the kernel, a live one is waited for at most
$UCM_BUILD_LOCK_TIMEOUT s (600) and then named in the error.

Building needs a C++ compiler and ninja; when either is missing, the build fails or times out, or
`UCM_CPU_NATIVE=0`, the backend logs one warning, records the reason in `native_error`, and every
op runs the inherited torch reference instead. Inputs the kernels do not take (non-CPU tensors,
odd dtypes) also go to the reference, so results never depend on whether the extension is there.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ucm.ops.contract import BlockReduce, GroupReduce, group_reduce_code, reduce_code
from ucm.ops.hash_cosine import NORM_DTYPES
from ucm.ops.reference import TorchReferenceOps
from ucm.ops.subblocks import grouped_block_scores

logger = logging.getLogger(__name__)

NATIVE_ENV_VAR = "UCM_CPU_NATIVE"
CACHE_ENV_VAR = "UCM_CACHE_DIR"
_SOURCE = Path(__file__).resolve().parent / "csrc" / "ucm_cpu_ops.cpp"

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DOT_REPS = (torch.float32, torch.bfloat16, torch.float8_e4m3fn)  # what the native dot scorer reads
_SUMS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)  # what it writes group sums in

# Process-wide cache of the build/load result (loading registers torch ops, which can happen only
# once per process). A cache, not configuration.
_native_result: BuildResult | None = None
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


_ISA_FLAGS = (("-mavx2", "avx2"), ("-mpopcnt", "popcnt"))  # (compiler flag, its /proc/cpuinfo flag)
LOCK_TIMEOUT_ENV_VAR = "UCM_BUILD_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 600.0
_MARKER = "built.json"  # in a build folder: which extension built there and loads
_LOCK_NAME = "build.lock"


def build_configs(compiler: str) -> list[tuple[str, list[str], list[str]]]:
    """(extension name, cflags, ldflags) to try in order: tuned for this CPU first, then portable."""
    flags = cpu_flags()
    isa = [f for f, cpu in _ISA_FLAGS if cpu in flags]
    omp = ["-fopenmp"] if _compiler_accepts(compiler, ["-fopenmp"]) else []
    configs = []
    if isa or omp:
        tag = "_".join(f[2:] for f in isa + omp)  # "-mavx2" -> "avx2", "-fopenmp" -> "openmp"
        configs.append((f"ucm_cpu_ops_{tag}", ["-O3", *isa, *omp], list(omp)))
    configs.append(("ucm_cpu_ops_portable", ["-O3"], []))
    return configs


def build_root() -> Path:
    """Where builds live, each in its own keyed folder (`build_folder`):
    $UCM_CACHE_DIR/torch_extensions, else ~/.cache/ucm/torch_extensions."""
    base = os.environ.get(CACHE_ENV_VAR)
    root = Path(base) / "torch_extensions" if base else Path.home() / ".cache" / "ucm" / "torch_extensions"
    return root


@functools.cache
def compiler_identity(compiler: str) -> str:
    """'<resolved path>: <first line of --version>' (part of the build key)."""
    try:
        proc = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False)
        lines = (proc.stdout or proc.stderr).strip().splitlines()
        version = lines[0] if lines else f"--version exited {proc.returncode}"
    except (OSError, subprocess.SubprocessError) as exc:
        version = f"--version failed: {type(exc).__name__}"
    return f"{os.path.realpath(shutil.which(compiler) or compiler)}: {version}"


def build_key_inputs(compiler: str) -> dict[str, Any]:
    """Everything a build depends on: two environments that differ in any of these get different
    folders (and never rebuild over each other); equal ones share one build."""
    from ucm import __version__

    flags = cpu_flags()
    return {
        "ucm": __version__,
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", ""),
        "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
        "python": "{}.{}".format(*sys.version_info[:2]),
        "compiler": compiler_identity(compiler),
        "cpu_flags": sorted(cpu for _, cpu in _ISA_FLAGS if cpu in flags),
        "source_sha256": hashlib.sha256(_SOURCE.read_bytes()).hexdigest(),
    }


def build_key(inputs: Mapping[str, Any]) -> str:
    """Folder name of one build environment: '<ucm version>-torch<torch version>-<hash of all inputs>'."""
    digest = hashlib.sha256(json.dumps(dict(inputs), sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = f"{inputs.get('ucm', 'unknown')}-torch{inputs.get('torch', 'unknown')}-{digest}"
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def build_folder(compiler: str | None = None) -> Path:
    """This environment's build folder, `build_root() / build_key(...)`."""
    compiler = compiler or find_compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    return build_root() / build_key(build_key_inputs(compiler))


def _progress(message: str) -> None:
    """A progress line: to this module's log where someone configured one for INFO, else stderr."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the build lock
def lock_timeout() -> float:
    """Seconds to wait for another process's build: $UCM_BUILD_LOCK_TIMEOUT, else 600."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV_VAR, "").strip()
    if raw:
        try:
            value = float(raw)
            if value >= 0:
                return value
        except ValueError:
            pass
        logger.warning(
            "ucm: ignoring %s=%r (not a number of seconds >= 0); waiting up to %g s",
            LOCK_TIMEOUT_ENV_VAR,
            raw,
            DEFAULT_LOCK_TIMEOUT_S,
        )
    return DEFAULT_LOCK_TIMEOUT_S


class BuildLockTimeout(RuntimeError):
    """Another process held the build lock longer than the timeout; the message names it."""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 1 << 16, 0)
        holder = json.loads(data) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: Mapping[str, Any]) -> str:
    """'pid 123 on host h (since 12:00:01, 40 s ago: python -m ...)' from a lock file's record."""
    if not holder.get("pid"):
        return "a process that has not recorded itself in the lock file yet"
    started = holder.get("started")
    when = ""
    if isinstance(started, (int, float)):
        when = f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}, {time.time() - started:.0f} s ago"
    cmd = str(holder.get("command", ""))[:200]
    detail = "; ".join(x for x in (when, f"command: {cmd}" if cmd else "") if x)
    return f"pid {holder['pid']} on host {holder.get('host', '?')}" + (f" ({detail})" if detail else "")


def _holder_is_dead(holder: Mapping[str, Any]) -> bool:
    """True only when the holder certainly is gone: it ran on this host, in this pid namespace,
    and its pid no longer exists. A holder elsewhere is never judged (its pid means nothing here)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    if holder.get("host") != socket.gethostname() or holder.get("pid_ns") != _pid_namespace():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, someone else's
        return False
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        st, fst = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


@contextlib.contextmanager
def build_lock(path: Path, timeout: float | None = None) -> Iterator[dict[str, Any]]:
    """Exclusive `flock` on `path` (created if missing), recording who holds it (pid, host, start
    time, command line) in the file.

    The kernel drops an flock when its holder dies, so a killed build never blocks the next one.
    A lock that is still held although its recorded holder is dead (a fork of the holder kept the
    descriptor) is broken: the file is unlinked and a fresh one locked. A live holder is waited for,
    with one progress line, for `timeout` seconds (default `lock_timeout()`); then
    `BuildLockTimeout` names it."""
    timeout = lock_timeout() if timeout is None else timeout
    start = time.monotonic()
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            if _holder_is_dead(holder) and _same_file(fd, path):
                _progress(f"ucm: breaking the build lock {path}: its holder, {describe_holder(holder)}, is dead")
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                os.close(fd)
                continue
            os.close(fd)
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                raise BuildLockTimeout(
                    f"gave up after {elapsed:.0f} s waiting for the build lock {path}, "
                    f"held by {describe_holder(holder)}"
                    f"; if that process is gone (another host), delete the lock file; {LOCK_TIMEOUT_ENV_VAR} sets the "
                    f"wait (now {timeout:g} s)"
                ) from None
            if not waited:
                waited = True
                _progress(
                    f"ucm: waiting for {describe_holder(holder)} to finish building in {path.parent} "
                    f"(giving up after {timeout:g} s; {LOCK_TIMEOUT_ENV_VAR} sets that)"
                )
            time.sleep(max(0.01, min(0.2, timeout - elapsed)))
            continue
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # the file was unlinked (a broken lock) between our open and flock: lock the new one
    if waited:
        _progress(f"ucm: got the build lock after {time.monotonic() - start:.0f} s")
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "pid_ns": _pid_namespace(),
        "started": time.time(),
        "command": " ".join(sys.argv)[:1000] or sys.executable,
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield info
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # released cleanly: no holder on record
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _clear_stale_baton(ext_dir: Path) -> None:
    """torch's cpp_extension guards a build folder with a `lock` file (created O_EXCL, removed at
    the end) and waits, without limit, while one exists; a build killed midway leaves it behind.
    Under our lock no other build of this folder runs, so a baton found now is such a leftover."""
    baton = ext_dir / "lock"
    if baton.exists():
        _progress(f"ucm: removing {baton}, left by an interrupted build (torch would wait on it forever)")
        baton.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- build and load
@dataclass
class BuildResult:
    """What `build_native` did: ok with the loaded op namespace, or the reason it could not."""

    ok: bool
    folder: Path | None = None
    extension: str | None = None
    library: Path | None = None
    built: bool = False  # compiled now (False: an existing build was loaded)
    seconds: float = 0.0
    error: str | None = None
    ns: Any = field(default=None, repr=False)


def _load_built(folder: Path) -> BuildResult | None:
    """Load the build recorded in `folder`'s marker, or None when there is none (or it won't load)."""
    try:
        info = json.loads((folder / _MARKER).read_text())
        name = str(info["extension"])
        library = folder / name / str(info["library"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not library.is_file():
        return None
    start = time.monotonic()
    try:
        torch.ops.load_library(str(library))
        ns = torch.ops.ucm_cpu
        ns.build_info()  # resolves the ops: fails here, not mid-step, if registration broke
    except Exception as exc:  # noqa: BLE001 - rebuild under the lock instead
        logger.warning(
            "ucm: could not load the CPU kernels built in %s (%s: %s); rebuilding", library, type(exc).__name__, exc
        )
        return None
    return BuildResult(True, folder, name, library, built=False, seconds=time.monotonic() - start, ns=ns)


def _compile(folder: Path, compiler: str, cpp_extension: Any) -> BuildResult:
    """Build the first config that compiles and loads, and record it in the marker (under the lock)."""
    _progress(f"ucm: building CPU kernels (first use of this ucm/torch/compiler/CPU) in {folder} ...")
    start = time.monotonic()
    failures = []
    for name, cflags, ldflags in build_configs(compiler):
        ext_dir = folder / name
        try:
            ext_dir.mkdir(parents=True, exist_ok=True)
            _clear_stale_baton(ext_dir)
            library = cpp_extension.load(
                name=name,
                sources=[str(_SOURCE)],
                extra_cflags=cflags,
                extra_ldflags=ldflags,
                build_directory=str(ext_dir),
                is_python_module=False,
                verbose=False,
            )
            ns = torch.ops.ucm_cpu
            ns.build_info()  # resolves the ops: fails here, not mid-step, if registration broke
        except Exception as exc:  # noqa: BLE001 - any build/load failure means "use the fallback"
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            # the first compiler diagnostic says more than ninja's closing "build stopped" line
            detail = next((ln for ln in lines if "error:" in ln), lines[-1] if lines else "")
            failures.append(f"{name}: {type(exc).__name__}: {detail}"[:500])
            continue
        seconds = time.monotonic() - start
        library = Path(library) if isinstance(library, str) else ext_dir / f"{name}.so"
        marker = {
            "extension": name,
            "library": library.name,
            "cflags": cflags,
            "ldflags": ldflags,
            "built_at": time.time(),
            "seconds": round(seconds, 1),
            "key": build_key_inputs(compiler),
        }
        try:
            tmp = folder / f"{_MARKER}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(marker, indent=1))
            os.replace(tmp, folder / _MARKER)
        except OSError as exc:  # the next process rebuilds (a ninja no-op): slower, not wrong
            logger.warning("ucm: could not record the CPU kernel build in %s: %s", folder, exc)
        _progress(f"ucm: building CPU kernels ... done in {seconds:.0f} s ({name})")
        return BuildResult(True, folder, name, library, built=True, seconds=seconds, ns=ns)
    seconds = time.monotonic() - start
    _progress(f"ucm: building CPU kernels ... failed after {seconds:.0f} s")
    return BuildResult(False, folder, seconds=seconds, error="build failed: " + " | ".join(failures))


def build_native(timeout: float | None = None) -> BuildResult:
    """Load this environment's kernels, compiling them first if no process has (under the build
    lock, waiting at most `timeout` s, default `lock_timeout()`, for another builder). Never raises.
    Loading registers torch ops, which can happen once per process: use `native_build()`."""
    if not _SOURCE.is_file():
        return BuildResult(False, error=f"kernel source {_SOURCE} is missing")
    compiler = find_compiler()
    if compiler is None:
        return BuildResult(False, error="no C++ compiler found (set CXX or install g++)")
    try:
        folder = build_folder(compiler)
    except Exception as exc:  # noqa: BLE001
        return BuildResult(False, error=f"cannot name the build folder: {type(exc).__name__}: {exc}")
    done = _load_built(folder)  # the common case: built before, no lock needed
    if done is not None:
        return done
    try:
        from torch.utils import cpp_extension
    except Exception as exc:  # noqa: BLE001  # pragma: no cover - torch without its extension builder
        return BuildResult(False, folder, error=f"torch.utils.cpp_extension unavailable: {exc}")
    if not cpp_extension.is_ninja_available():
        return BuildResult(False, folder, error="ninja is not installed (pip install ninja)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with build_lock(folder / _LOCK_NAME, timeout):
            return _load_built(folder) or _compile(folder, compiler, cpp_extension)  # (built while we waited)
    except BuildLockTimeout as exc:
        return BuildResult(False, folder, error=str(exc))
    except OSError as exc:
        return BuildResult(False, folder, error=f"cannot lock the build folder {folder}: {exc}")


def native_build() -> BuildResult:
    """`build_native()` once per process (ops register once); later calls return the same result."""
    global _native_result
    with _native_lock:
        if _native_result is None:
            _native_result = build_native()
        return _native_result


def load_native() -> tuple[Any | None, str | None]:
    """(torch.ops.ucm_cpu namespace, None) once built, else (None, reason). Builds at most once."""
    if os.environ.get(NATIVE_ENV_VAR, "1").strip() == "0":
        return None, f"disabled by {NATIVE_ENV_VAR}=0"
    result = native_build()
    return (result.ns, None) if result.ok else (None, result.error)


def _all_cpu(*tensors: torch.Tensor) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tensors)


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


class CpuOps(TorchReferenceOps):
    """C++/OpenMP kernels for hashing, running block sums and min/max, Hamming, norm-weighted
    (cosine) Hamming, dot and min/max (Quest) block scoring, top-k and decode attention; everything
    else (and every input the kernels don't take) is the torch reference."""

    name = "cpu"

    def __init__(self, native: bool | None = None) -> None:
        """native=None: use the kernels unless UCM_CPU_NATIVE=0; False: always the torch path.

        Builds (first use in this environment) or loads the kernels now, so that the build happens
        where the backend is set up, never inside a model's forward."""
        self._native_requested = native
        self._ns: Any | None = None
        self._native_error: str | None = None
        self._resolved = False
        self._native()

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

    # -------------------------------------------------------- representations
    def block_sums_add(self, sums, abs_sums, key, slot_mapping, block_size, merge) -> None:
        ns = self._native()
        ok = (
            _all_cpu(sums, key, slot_mapping)
            and sums.dtype in _SUMS_DTYPES
            and sums.dim() == 4
            and sums.is_contiguous()
            and key.dtype in _FLOATS
            and _is_int(slot_mapping)
            and (
                abs_sums is None
                or (_all_cpu(abs_sums) and abs_sums.dtype == torch.float32 and abs_sums.is_contiguous())
            )
        )
        if ns is None or not ok:
            return super().block_sums_add(sums, abs_sums, key, slot_mapping, block_size, merge)
        ns.block_sums_add(sums, abs_sums, key, slot_mapping, block_size, merge)  # its checks raise ValueError

    def block_minmax_update(self, mins, maxs, key, slot_mapping, block_size) -> None:
        ns = self._native()
        ok = (
            _all_cpu(mins, maxs, key, slot_mapping)
            and mins.dtype == torch.float32
            and maxs.dtype == torch.float32
            and mins.dim() == 3
            and maxs.shape == mins.shape
            and mins.is_contiguous()
            and maxs.is_contiguous()
            and key.dtype in _FLOATS
            and _is_int(slot_mapping)
        )
        if ns is None or not ok:
            return super().block_minmax_update(mins, maxs, key, slot_mapping, block_size)
        ns.block_minmax_update(mins, maxs, key, slot_mapping, int(block_size))  # its checks raise ValueError

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

    # ---------------------------------------------------------------- scoring
    @staticmethod
    def _check_paged(name: str, hq: int, hkv: int, block_table: torch.Tensor, seq_lens: torch.Tensor, b: int) -> None:
        if hkv <= 0 or hq % hkv:
            raise ValueError(f"{name}: Hq={hq} query heads is not a multiple of Hkv={hkv} KV heads")
        if block_table.dim() != 2 or block_table.shape[0] != b:
            raise ValueError(f"{name}: block_table must be [B={b}, M], got {tuple(block_table.shape)}")
        if seq_lens.dim() != 1 or seq_lens.shape[0] != b:
            raise ValueError(f"{name}: seq_lens must be [B={b}], got {tuple(seq_lens.shape)}")

    @classmethod
    def _check_codes(cls, name: str, q_codes, k_codes, block_table, seq_lens) -> None:
        """The Hamming scorers' shared checks: query and key codes of one width, a paged batch."""
        if q_codes.dim() != 3 or k_codes.dim() != 4:
            raise ValueError(
                f"{name}: q_codes must be [B, Hq, C] and k_codes [NB, bs, Hkv, C], got "
                f"{tuple(q_codes.shape)} and {tuple(k_codes.shape)}"
            )
        if q_codes.shape[-1] != k_codes.shape[-1]:
            raise ValueError(f"{name}: code widths differ ({q_codes.shape[-1]} vs {k_codes.shape[-1]})")
        cls._check_paged(name, q_codes.shape[1], k_codes.shape[2], block_table, seq_lens, q_codes.shape[0])

    def hamming_block_scores(
        self,
        q_codes: torch.Tensor,
        k_codes: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        self._check_codes("hamming_block_scores", q_codes, k_codes, block_table, seq_lens)
        code = reduce_code(reduce)
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
            q_codes, k_codes, block_table.to(torch.int64), seq_lens.to(torch.int64), int(code)
        )

    def hamming_cosine_block_scores(
        self,
        q_codes: torch.Tensor,
        q_norms: torch.Tensor,
        k_codes: torch.Tensor,
        k_norms: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        reduce: BlockReduce = "min",
    ) -> torch.Tensor:
        name = "hamming_cosine_block_scores"
        self._check_codes(name, q_codes, k_codes, block_table, seq_lens)
        if q_codes.shape[-1] == 0:
            raise ValueError(f"{name}: code width must be positive")
        if q_norms.shape != q_codes.shape[:2]:
            raise ValueError(
                f"{name}: q_norms must be [B, Hq] = {tuple(q_codes.shape[:2])}, got {tuple(q_norms.shape)}"
            )
        if k_norms.shape != k_codes.shape[:3]:
            raise ValueError(
                f"{name}: k_norms must be [NB, bs, Hkv] = {tuple(k_codes.shape[:3])}, got {tuple(k_norms.shape)}"
            )
        code = reduce_code(reduce)
        ns = self._native()
        if (
            ns is None
            or not _all_cpu(q_codes, q_norms, k_codes, k_norms, block_table, seq_lens)
            or q_codes.dtype != torch.uint8
            or k_codes.dtype != torch.uint8
            or q_norms.dtype not in _FLOATS
            or k_norms.dtype not in NORM_DTYPES
            or not (_is_int(block_table) and _is_int(seq_lens))
            or k_codes.shape[1] == 0
        ):
            return super().hamming_cosine_block_scores(
                q_codes, q_norms, k_codes, k_norms, block_table, seq_lens, reduce
            )
        return ns.hamming_cosine_block_scores(
            q_codes,
            q_norms.to(torch.float32),
            k_codes,
            k_norms,
            block_table.to(torch.int64),
            seq_lens.to(torch.int64),
            int(code),
        )

    def block_scores_dot(
        self,
        q: torch.Tensor,
        repr_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        group_reduce: GroupReduce = "mean",
        out: torch.Tensor | None = None,
        keep_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if out is not None:  # the reference's: every row scored (by this backend), then the kept ones restored
            return super().block_scores_dot(
                q, repr_cache, block_table, seq_lens, block_size, group_reduce, out, keep_rows
            )
        if q.dim() == 3 and repr_cache.dim() == 4:  # groups of tokens: their max, scored as sub-blocks
            return grouped_block_scores(
                lambda reps, table, bs: self.block_scores_dot(q, *reps, table, seq_lens, bs, group_reduce),
                (repr_cache,),
                block_table,
                block_size,
            )
        if q.dim() != 3 or repr_cache.dim() != 3:
            raise ValueError(
                f"block_scores_dot: q must be [B, Hq, D] and repr_cache [NB, (R,) Hkv, D], got {tuple(q.shape)} and "
                f"{tuple(repr_cache.shape)}"
            )
        self._check_paged("block_scores_dot", q.shape[1], repr_cache.shape[1], block_table, seq_lens, q.shape[0])
        code = group_reduce_code(group_reduce)
        ns = self._native()
        if (
            ns is None
            or not _all_cpu(q, repr_cache, block_table, seq_lens)
            or repr_cache.dtype not in _DOT_REPS  # each row is widened as it is read, never the whole cache
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
            int(code),
        )

    def block_scores_minmax(
        self,
        q: torch.Tensor,
        mins: torch.Tensor,
        maxs: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        block_size: int,
        group_reduce: GroupReduce = "max",
    ) -> torch.Tensor:
        if q.dim() == 3 and mins.dim() == 4 and maxs.shape == mins.shape:
            return grouped_block_scores(
                lambda reps, table, bs: self.block_scores_minmax(q, *reps, table, seq_lens, bs, group_reduce),
                (mins, maxs),
                block_table,
                block_size,
            )
        if q.dim() != 3 or mins.dim() != 3 or maxs.shape != mins.shape:
            raise ValueError(
                f"block_scores_minmax: q must be [B, Hq, D] and mins / maxs [NB, (R,) Hkv, D] of one shape, got "
                f"{tuple(q.shape)}, {tuple(mins.shape)} and {tuple(maxs.shape)}"
            )
        if q.shape[2] != mins.shape[2]:
            raise ValueError(f"block_scores_minmax: head dims differ ({q.shape[2]} vs {mins.shape[2]})")
        self._check_paged("block_scores_minmax", q.shape[1], mins.shape[1], block_table, seq_lens, q.shape[0])
        code = group_reduce_code(group_reduce)
        ns = self._native()
        if (
            ns is None
            or not _all_cpu(q, mins, maxs, block_table, seq_lens)
            or mins.dtype != torch.float32
            or maxs.dtype != torch.float32
            or q.dtype not in _FLOATS
            or not (_is_int(block_table) and _is_int(seq_lens))
            or int(block_size) <= 0
        ):
            return super().block_scores_minmax(q, mins, maxs, block_table, seq_lens, block_size, group_reduce)
        return ns.block_scores_minmax(
            q.to(torch.float32),
            mins,
            maxs,
            block_table.to(torch.int64),
            seq_lens.to(torch.int64),
            int(block_size),
            int(code),
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
        return tuple(
            ns.select_rewrite(
                scores,
                k.to(torch.int64),
                must_keep,
                n_units.to(torch.int64),
                block_table,
                seq_lens.to(torch.int64),
                n_blocks.to(torch.int64),
                int(unit_blocks),
                int(block_size),
            )
        )

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
        return ns.kvstar_scores(
            q.to(torch.float32),
            sums,
            abs_sums,
            block_table.to(torch.int64),
            n_full.to(torch.int64),
            int(kept_dims),
            float(scale),
        )

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
