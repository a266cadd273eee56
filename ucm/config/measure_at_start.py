"""What an engine measures when it starts on a model ucm ships no per-model JSON for (its copying
layers; for GSA on device also hash projections trained on it), once, kept for the next start.

ESA, GSA and KVStar run a model's measured copying layers (`copy_layers`,
`ucm.config.copy_layer_defaults`), GSA on device their budgets; without a per-model JSON every
layer ran alike, which on Qwen2.5-Coder served without its JSON cost ESA, GSA and KVStar 12 of
dense's 92 points on RULER's 8K niah_multikey_2, and the copying layers alone won ESA all of them
back (docs/accuracy.md, session 26). So an engine serving a local Hugging Face model folder with
no JSON (no `config_file`, none built in under the model's name) runs `ucm configure
--copy-layers-only` on it: four forwards of 512 random tokens in float32 on the CPU (19 s for
Qwen2.5-Coder-0.5B, 41 s for SmolLM2-135M on a 2-core machine beside other work). It runs as its
own process: the measurement loads the model with transformers (`ucm.configure`, an app above
the engine's layers), and its memory goes back when it ends. The written JSON is kept under
`$UCM_CACHE_DIR` (default `~/.cache/ucm`, where ucm keeps its converted models too), keyed by the model's
config.json, its weight files (names, sizes, modification times), the KV block size and ucm's
version: the next engine reads it in milliseconds. The processes of one engine (the scheduler,
each TP worker) measure once: the others wait on a file lock.

GSA on device reads the whole JSON: for it the engine runs `ucm configure --no-profile` instead, which
also trains the model's hash projections (`ucm calibrate` on ucm's built-in needle prompts; ~4
minutes for Qwen2.5-Coder-0.5B on 2 cores) and keeps them where they rank held-out keys better than
random ones: on Qwen2.5-Coder served without its JSON (25 samples, ratio 0.3) GSA on device then
scores dense's 72 on 4K niah_multikey_3, against 56 with random projections and the copying layers'
budgets and 20 with neither (docs/accuracy.md, session 27). A model above `MAX_CALIBRATED_BYTES`,
or a calibration past `CALIBRATED_TIMEOUT_S`, gets the copying layers alone.

Measured only: a local folder with config.json and weight files of at most `MAX_WEIGHT_BYTES` (a
larger model takes minutes on a CPU: run the command yourself, where it fits, and name its JSON in
`config_file`). `measure_at_start: false` in the method's config turns it off. A measurement
that fails (no transformers, an architecture it cannot load, past `TIMEOUT_S`) leaves the engine
on the defaults it ran before, says why in one line with the log's path, and is not retried for
the same files until its `.failed` marker is removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ucm.config.loader import file_stem

#: the most weight bytes measured at engine start (a 2B-parameter bf16 checkpoint; float32 doubles it
#: in memory while the measurement runs); calibrated (GSA on device) only up to `MAX_CALIBRATED_BYTES`
#: (Qwen2.5-Coder-0.5B as float32, 2.0 GB, calibrates in ~4 minutes on 2 cores)
MAX_WEIGHT_BYTES = 4 * 2**30
MAX_CALIBRATED_BYTES = 5 * 2**29
#: the measurement's wall-clock limit (copying layers alone; with the calibration): vLLM gives an engine
#: 600 s to start (VLLM_ENGINE_READY_TIMEOUT_S), model load included
TIMEOUT_S = 300
CALIBRATED_TIMEOUT_S = 420
#: files whose bytes are the model's weights (the folder's top level, as transformers reads them)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
#: the measured configs' folder under the cache root
CACHE_FOLDER = "measured_models"
#: the written JSON's report (`ucm configure`: `<stem>_configure.json`, its "config" names the JSON)
_REPORT_GLOB = "*_configure.json"


@dataclass(frozen=True)
class Measured:
    """The measured per-model JSON (None: nothing measured) and the engine's line on it."""

    path: Path | None
    note: str


def cache_root() -> Path:
    """ucm's cache: `$UCM_CACHE_DIR`, else `~/.cache/ucm`."""
    return Path(os.environ.get("UCM_CACHE_DIR") or Path.home() / ".cache" / "ucm").expanduser()


def weight_files(folder: Path) -> list[Path]:
    """The weight files at the top of a model folder, by name."""
    return sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def fingerprint(folder: Path, weights: list[Path], block_size: int) -> str:
    """What a measurement depends on: config.json's bytes, each weight file's name, size and
    modification time, the block size and ucm's version (a new release measures again)."""
    from ucm import __version__

    digest = hashlib.sha256(f"ucm {__version__} block {block_size}\n".encode())
    digest.update((folder / "config.json").read_bytes())
    for path in weights:
        stat = path.stat()
        digest.update(f"\n{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def measured_model_config(
    model: str,
    block_size: int,
    announce: Callable[[str], None] | None = None,
    calibrate: bool = False,
    timeout_s: float | None = None,
) -> Measured:
    """The measured JSON of the local model folder `model` (module docstring): from the cache,
    else measured now (`announce` gets one line before it starts); `Measured(None, why)` where it
    is not measured. With `calibrate` the JSON also carries projections trained on the model
    (`ucm configure --no-profile`, GSA on device), where they rank held-out keys better than random
    ones."""
    timeout_s = timeout_s or (CALIBRATED_TIMEOUT_S if calibrate else TIMEOUT_S)
    cap = MAX_CALIBRATED_BYTES if calibrate else MAX_WEIGHT_BYTES
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        return Measured(None, f"{model} is not a local model folder with config.json")
    folder = folder.resolve()
    weights = weight_files(folder)
    if not weights:
        return Measured(None, f"{folder} has no weight files")
    size = sum(p.stat().st_size for p in weights)
    if size > cap:
        what = "calibrated" if calibrate else "measured"
        return Measured(
            None, f"its weights ({size / 2**30:.1f} GiB) are above the {cap / 2**30:g} GiB {what} at engine start"
        )
    mode = "-calibrated" if calibrate else ""
    entry = cache_root() / CACHE_FOLDER / f"{file_stem(folder.name)}-{fingerprint(folder, weights, block_size)}{mode}"
    if found := _written_config(entry):
        return Measured(found, f"kept from an earlier measurement: {found}")
    failed = entry.with_suffix(".failed")
    if failed.is_file():
        return Measured(None, f"its measurement failed at an earlier start ({failed}; delete it to measure again)")
    if importlib.util.find_spec("transformers") is None:
        return Measured(None, "the measurement needs transformers (pip install 'ucm[demo]')")
    entry.parent.mkdir(parents=True, exist_ok=True)
    with _locked(entry.with_suffix(".lock"), timeout_s + 60) as held:
        if not held:
            return Measured(None, f"another process held {entry.with_suffix('.lock')} past {timeout_s + 60:g} s")
        if found := _written_config(entry):  # another process of this engine measured it meanwhile
            return Measured(found, f"measured by another process of this engine: {found}")
        if failed.is_file():
            return Measured(None, f"its measurement failed in another process ({failed})")
        flag = "--no-profile" if calibrate else "--copy-layers-only"
        if announce is not None:
            what = "copying layers and hash projections (minutes" if calibrate else "copying layers (seconds"
            announce(f"measuring the {what}, once) of {folder}: `ucm configure {flag}`, kept in {entry}")
        return _measure(folder, entry, block_size, flag, timeout_s)


def _measure(folder: Path, entry: Path, block_size: int, flag: str, timeout_s: float) -> Measured:
    """Run `ucm configure <flag>` into a temporary folder beside `entry` and move it to `entry` when
    it wrote its JSON; else write `entry.failed` with the command's output."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    command = [sys.executable, "-m", "ucm.cli", "configure", "--model", str(folder), flag]
    command += ["--out", str(scratch), "--block-size", str(block_size)]
    started = time.monotonic()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        output, why = proc.stdout + proc.stderr, f"exit {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        output, why = f"{exc.stdout or ''}{exc.stderr or ''}", f"ran past {timeout_s:g} s"
        proc = None
    if proc is not None and proc.returncode == 0 and _written_config(scratch):
        scratch.rename(entry)
        return Measured(_written_config(entry), f"measured now in {time.monotonic() - started:.0f} s: {entry}")
    shutil.rmtree(scratch, ignore_errors=True)
    failed = entry.with_suffix(".failed")
    failed.write_text(f"{' '.join(command)}\n{why}\n{output}")
    last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
    return Measured(None, f"its measurement failed ({why}: {last[-300:]}; the command's output: {failed})")


def _written_config(folder: Path) -> Path | None:
    """The JSON a `ucm configure` run wrote into `folder` (named by its report), if complete."""
    for report in sorted(folder.glob(_REPORT_GLOB)) if folder.is_dir() else ():
        try:
            name = json.loads(report.read_text())["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(name, str) and (folder / name).is_file():
            return folder / name
    return None


@contextmanager
def _locked(path: Path, wait_s: float) -> Iterator[bool]:
    """An exclusive lock on `path` (released when its process ends, however it ends); yields
    whether it was taken within `wait_s`."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(0.2)
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
