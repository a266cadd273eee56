"""`ucm configure`: a measured per-model config of GSA on device for any model, in one command.

For a packaged model or a local Hugging Face folder:

1. **profile** (`ucm.profile.run_profile`): every layer sparse at `--ratio`, each layer's
   worst-head normalised recall (the query head that loses most, against its own best) over a
   few prompts and decode steps;
2. **dense layers** (`choose_dense_layers`): the layers whose worst-head recall is below
   `--dense-threshold` (default 0.75), lowest first, at most `--max-dense-fraction` (default
   0.15) of the layers -- SmolLM2's shipped budget, 4 of 30; none when every layer clears the
   threshold; **copying layers** (`ucm.copy_layers`): each layer's best induction head on a
   repeated random sequence, the layers at `COPY_THRESHOLD` or above (at most
   `MAX_COPY_FRACTION` of the layers; dense ones too: a method that keeps a layer dense skips
   it), written as `copy_layers`: an engine serving the model runs ESA and GSA with groups of 2
   tokens there and whole blocks elsewhere where their config leaves the representations unset
   (`ucm.config.copy_layer_defaults`), `ucm eval` names those settings `+copy`, and the summary
   prints the keys for a vLLM config; GSA on device's `top_k_ratio_per_layer` gives the copying
   layers a larger share of the same budget (`ucm.methods.copy_layer_ratios`: 0.5 there and
   less elsewhere for a mean of 0.3);
3. **calibrate** (`ucm.calibrate.run_calibrate`): trained hash projections on the model's own
   queries and keys, judged against random ones on held-out prompts;
4. **write and validate**: `OUT/<model>.json` and `OUT/<model>_hash.pt` in the shape of
   `configs/*.json` (the method defaults: the shipped JSON's thresholds where ucm ships one,
   else the generic fallback's, `ucm.config.fallback`), loaded back through the engine's loader
   and built against the model's shapes; a config that does not load is an error. The
   measurements go to `OUT/<model>_configure.json`.

`--copy-layers-only` runs step 2's copying-layer measurement alone (seconds: four forwards of 512
tokens, no profile, no calibration) and writes the JSON with the method defaults (the shipped
JSON's dense layers and projections where ucm ships one, else the generic fallback's): what ESA,
GSA and KVStar need from it, for a model too large to profile on the machine at hand.
`--no-profile` skips only the profile: the copying layers and the calibration, the defaults' dense
layers (minutes: what an engine runs at start for GSA on device on a model without a JSON,
`ucm.config.measure_at_start`). Trained projections that rank the held-out prompts' keys worse
than random ones are not kept (the JSON keeps the defaults' projections; the report says so).

The engine uses the written file with `{"GSAOnDevice": {"config_file": "OUT/<model>.json"}}` (any
method: ESA, GSA and KVStar take its copying layers from it), or without `config_file` once
it is copied into `configs/` (found by the model's name).
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

#: a layer whose worst head keeps less than this share of what its own best selection would is a
#: dense-layer candidate (SmolLM2 at 4K: the layers that broke answers, 7, 17 and 18, sit at
#: 0.52-0.75; most layers at 0.8-0.98; docs/accuracy.md, session 6)
DENSE_THRESHOLD = 0.75
#: at most this share of the layers is kept dense (floor, at least one): the budget of the shipped
#: SmolLM2 JSON (4 of 30 layers, 39.7% of the blocks read at ratio 0.3)
MAX_DENSE_FRACTION = 0.15
#: the profile behind the dense layers: GSA on device with random projections (what the model
#: runs before calibration), every layer sparse
PROFILE_METHODS = ("GSAOnDevice+random",)


def layer_worst_head(methods: dict) -> dict[int, float]:
    """Per layer, the worst-head normalised recall averaged over the profiled methods
    (`run_profile`'s "methods" entry)."""
    per_layer: dict[int, list[float]] = defaultdict(list)
    for res in methods.values():
        for layer, row in res["per_layer"].items():
            per_layer[int(layer)].append(row["worst_head_normalised_recall"])
    return {layer: sum(v) / len(v) for layer, v in sorted(per_layer.items())}


def dense_budget(num_layers: int, max_fraction: float = MAX_DENSE_FRACTION) -> int:
    """How many layers may be dense: floor(max_fraction * layers), at least 1 (0 when max_fraction is 0)."""
    if max_fraction <= 0:
        return 0
    return max(1, math.floor(max_fraction * num_layers + 1e-9))


def choose_dense_layers(
    worst_head: dict[int, float], threshold: float = DENSE_THRESHOLD, max_fraction: float = MAX_DENSE_FRACTION
) -> list[int]:
    """The dense-layer rule: layers whose worst-head recall is below `threshold`, the lowest
    first (ties: the lower layer), capped at `dense_budget(len(worst_head), max_fraction)`;
    returned sorted by layer."""
    below = sorted((v, layer) for layer, v in worst_head.items() if v < threshold)
    return sorted(layer for _, layer in below[: dense_budget(len(worst_head), max_fraction)])


def config_text(data: dict) -> str:
    """A per-model JSON in the layout of `configs/*.json`: one key a line, lists on one line,
    dense layers written as 1."""

    def value(key, v):
        if key == "top_k_ratio_per_layer":
            v = [1 if r >= 1 else r for r in v]
        return json.dumps(v)

    lines = [f"  {json.dumps(k)}: {value(k, v)}" for k, v in data.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def with_calibration(base: dict, calib: dict, weight_name: str) -> dict:
    """`base` JSON data with a calibration's (`ucm.calibrate.run_calibrate`'s result) trained
    projections in `weight_name`, scored the way they were calibrated for: their file holds the
    mean keys `norm_cosine` centres on, which a JSON saying "hamming" would never read."""
    return dict(base, hash_weight_type="trained", hash_weight=weight_name, hash_score_method=calib["score_method"])


def run_configure(
    model: str | Path,
    out_dir: Path,
    *,
    profile: bool = True,
    calibrate: bool = True,
    tokens: int = 3000,
    prompts: int = 3,
    steps: int = 8,
    ratio: float = 0.3,
    task: str | None = None,
    threshold: float = DENSE_THRESHOLD,
    max_fraction: float = MAX_DENSE_FRACTION,
    profile_methods: tuple[str, ...] = PROFILE_METHODS,
    calib_prompts: int = 4,
    calib_heldout: int = 2,
    calib_tokens: int = 1500,
    calib_steps: int = 100,
    block_size: int = 32,
) -> dict:
    """Profile, choose dense layers, measure the copying layers, calibrate, write and validate (the
    module docstring). Without `profile` the dense layers are the method defaults' (the shipped
    JSON's, else none); without `calibrate` so are the projections. Returns the measurements written
    to `OUT/<model>_configure.json`."""
    from transformers import AutoConfig

    from ucm.models import per_model_data, resolve_model

    t0 = time.perf_counter()
    ref = resolve_model(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = ref.config_stem
    steps_named = ["profile"] * profile + ["copying layers"] + ["calibrate"] * calibrate + ["validate"]
    step = iter(f"[{i}/{len(steps_named)}]" for i in range(1, len(steps_named) + 1))
    print(f"ucm configure: {ref.name} ({ref.path}): {', '.join(steps_named)}", file=sys.stderr)
    result: dict = {"model": ref.label, "model_name": ref.name}
    worst: dict[int, float] = {}
    if profile:
        from ucm.profile import run_profile

        print(f"{next(step)} profile: {', '.join(profile_methods)}, every layer sparse at {ratio}", file=sys.stderr)
        measured = run_profile(
            tokens, prompts, steps, ratio, profile_methods, block_size, task=task, model=model, quiet=True
        )
        worst = layer_worst_head(measured["methods"])
        num_layers = len(worst)
        base = per_model_data(ref, num_layers, _head_dim(ref.path), block_size)
        dense = choose_dense_layers(worst, threshold, max_fraction)
        result["dense_rule"] = {
            "threshold": threshold,
            "max_fraction": max_fraction,
            "budget": dense_budget(num_layers, max_fraction),
            "profile_methods": list(profile_methods),
        }
        result["worst_head_per_layer"] = {str(k): round(v, 4) for k, v in worst.items()}
        keys = ("prompt_tokens", "prompts", "prompt_source", "decode_steps", "ratio")
        result["profile"] = {k: measured[k] for k in keys}
    else:
        cfg = AutoConfig.from_pretrained(ref.path)
        num_layers = (getattr(cfg, "text_config", None) or cfg).num_hidden_layers
        base = per_model_data(ref, num_layers, _head_dim(ref.path), block_size)
        dense = [i for i, r in enumerate(base["top_k_ratio_per_layer"]) if r >= 1]  # the defaults' own
    result["dense_layers"] = dense
    print(f"{next(step)} copying layers: induction scores of 4 repeated random sequences", file=sys.stderr)
    copy, copy_report = _measure_copy_layers(ref.path)  # dense layers too: a method keeping one dense skips it
    result.update(copy_report)
    base = _with_layers(base, ref.name, num_layers, dense, copy, ratio)

    cfg_file = out_dir / f"{stem}.json"
    if calibrate:
        from ucm.calibrate import run_calibrate

        print(
            f"{next(step)} calibrate: {calib_prompts} prompts x {calib_tokens} tokens, {calib_steps} steps",
            file=sys.stderr,
        )
        with tempfile.TemporaryDirectory(prefix="ucm-configure-") as tmp:
            calib = run_calibrate(
                Path(tmp),
                prompts=calib_prompts,
                heldout=calib_heldout,
                tokens=calib_tokens,
                steps=calib_steps,
                ratio=ratio,
                block_size=block_size,
                model=model,
                base=base,
                file_stem=stem,
                announce_files=False,
            )
            held = calib["heldout"]
            recall = {k: held[k]["sparse_layers_mean"]["oracle_normalised_recall"] for k in ("random", "trained")}
            if recall["trained"] >= recall["random"]:
                weight_file = out_dir / f"{stem}_hash.pt"
                shutil.copyfile(Path(tmp) / calib["weights"], weight_file)
                base = with_calibration(base, calib, weight_file.name)
                result["hash_weight"] = weight_file.name
        result["calibration"] = {
            # trained projections that rank held-out keys worse than random ones are not kept
            "kept": "trained" if "hash_weight" in result else "the defaults' (trained ranked held-out keys worse)",
            "prompts": calib_prompts,
            "heldout_prompts": calib_heldout,
            "prompt_tokens": calib_tokens,
            "steps": calib_steps,
            "heldout_oracle_normalised_recall": recall,
            "heldout_output_error": {k: held[k]["sparse_layers_mean"]["output_error"] for k in ("random", "trained")},
        }
    print(f"{next(step)} validate: the engine's loader, the weights, the model's shapes", file=sys.stderr)
    _write_validated(cfg_file, base, ref.path, block_size)
    result["config"] = cfg_file.name
    skipped = ["profile (the defaults' dense layers)"] * (not profile)
    skipped += ["calibration (the defaults' projections)"] * (not calibrate)
    if skipped:
        result["mode"] = "without " + " and ".join(skipped)
    result["defaults_from"] = _defaults_from(ref)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = (
        "ucm configure " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["configure"] else "run_configure()"
    )
    (out_dir / f"{stem}_configure.json").write_text(json.dumps(result, indent=2))
    print_summary(result, worst)
    written = f"{cfg_file} and {out_dir / result['hash_weight']}" if "hash_weight" in result else str(cfg_file)
    print(f"wrote {written}: validated; name it in the sparse method's config_file")
    return result


def _measure_copy_layers(path: Path) -> tuple[list[int], dict]:
    """The copying layers of the model at `path` (`ucm.copy_layers`) and their report entries."""
    from ucm.copy_layers import COPY_THRESHOLD, choose_copy_layers

    induction = measure_induction(path)
    copy = choose_copy_layers(induction)
    return copy, {
        "copy_rule": {"threshold": COPY_THRESHOLD, "measure": "ucm.copy_layers.induction_scores"},
        "copy_layers": copy,
        "induction_score_per_layer": {str(k): round(float(v), 4) for k, v in enumerate(induction)},
    }


def _with_layers(base: dict, name: str, num_layers: int, dense: list[int], copy: list[int], ratio: float) -> dict:
    """`base` (the method defaults) for model `name` with its dense and copying layers: the sparse
    copying layers read a larger share of `ratio` (`ucm.methods.copy_layer_ratios`)."""
    from ucm.methods import copy_layer_ratios

    return dict(
        base,
        model_name=name,
        top_k_ratio_per_layer=copy_layer_ratios(num_layers, dense, copy, ratio),
        top_k_index_reuse=[-1] * num_layers,
        copy_layers=copy,
    )


def _write_validated(cfg_file: Path, data: dict, model_path: Path, block_size: int) -> None:
    """Write `data` as `cfg_file` and check it as the engine and `ucm configs check` would."""
    from ucm.config.loader import check_config_file

    cfg_file.write_text(config_text(data))
    validate_config(cfg_file, model_path, block_size)
    check_config_file(cfg_file)


def _defaults_from(ref) -> str:
    """Where a written config's method defaults come from: the model's shipped JSON, else the fallback."""
    return str(ref.shipped_config.name) if ref.shipped_config else "generic fallback (ucm.config.fallback)"


def measure_induction(path: Path) -> list[float]:
    """Each layer's best induction-head score (`ucm.copy_layers.induction_scores`) of the model at
    `path`, loaded in float32 with eager attention (which returns the attention weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ucm.copy_layers import induction_scores

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return induction_scores(model.eval()).tolist()


def _head_dim(path: Path) -> int:
    """The model's attention head dim, from its config.json (as transformers reads it)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def validate_config(cfg_file: Path, model_path: Path, block_size: int):
    """Load `cfg_file` as the engine does (`ucm.config.loader`), load its trained weights
    (shape, finite values), and build GSA on device from it against the model's own shapes
    (layer count, head dim, chunk vs KV block): any failure is the ConfigError the engine would
    raise."""
    from transformers import AutoConfig

    from ucm.config.loader import load_model_config
    from ucm.ops import get_ops
    from ucm.sparse.base import ModelShapes
    from ucm.sparse.gsa_on_device import build_from_model_config
    from ucm.sparse.hashing import hash_projections

    loaded = load_model_config(cfg_file)
    hash_projections(loaded)
    cfg = AutoConfig.from_pretrained(model_path)
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    shapes = ModelShapes(cfg.num_hidden_layers, heads, kv_heads, _head_dim(model_path), block_size, 8)
    build_from_model_config(loaded, shapes, get_ops("reference")).close()
    return loaded


def print_summary(result: dict, worst: dict[int, float]) -> None:
    """The measurements a `run_configure` result holds, one line each."""
    from ucm.methods import copy_layer_keys

    rows = [("model", result["model_name"])]
    if "mode" in result:
        rows.append(("mode", result["mode"]))
    if worst:
        rule = result["dense_rule"]
        ranked = sorted(worst.items(), key=lambda kv: (kv[1], kv[0]))[:6]
        rows += [
            ("layers", str(len(worst))),
            (
                "dense layers",
                f"{result['dense_layers'] or 'none'} (worst head < {rule['threshold']}, at most {rule['budget']})",
            ),
            ("lowest worst-head", ", ".join(f"L{layer} {v:.3f}" for layer, v in ranked)),
        ]
    else:
        rows.append(("dense layers", f"{result['dense_layers'] or 'none'} (the defaults')"))
    copy = result["copy_layers"]
    rows += [
        ("copying layers", f"{copy or 'none'} (induction >= {result['copy_rule']['threshold']})"),
        ("ESA / GSA keys", json.dumps(copy_layer_keys(copy)) if copy else "defaults"),
    ]
    if "calibration" in result:
        cal = result["calibration"]
        recall, error = cal["heldout_oracle_normalised_recall"], cal["heldout_output_error"]
        rows += [
            (
                "held-out recall",
                f"random {recall['random']:.3f} -> trained {recall['trained']:.3f} (oracle-normalised)",
            ),
            ("held-out out. error", f"random {error['random']:.3f} -> trained {error['trained']:.3f}"),
            ("projections", cal["kept"]),
        ]
    files = [result["config"]] + ([result["hash_weight"]] if "hash_weight" in result else [])
    rows += [
        ("defaults from", result["defaults_from"]),
        ("files", ", ".join(files)),
        ("seconds", str(result["seconds"])),
    ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


def add_parser(sub) -> None:
    from ucm.profile import add_model_argument

    p = sub.add_parser(
        "configure",
        help="write a measured, validated per-model config of GSA on device for a model (profile + calibrate)",
    )
    add_model_argument(p)
    p.add_argument("--out", type=Path, required=True, help="folder for <model>.json, <model>_hash.pt")
    p.add_argument("--ratio", type=float, default=0.3, help="keep ratio of the sparse layers")
    p.add_argument("--tokens", type=int, default=3000, help="profile prompt length")
    p.add_argument("--prompts", type=int, default=3, help="profile prompts")
    p.add_argument("--steps", type=int, default=8, help="profile decode steps per prompt")
    p.add_argument("--task", default=None, help="profile RULER prompts of this task (needs the [eval] extra)")
    p.add_argument(
        "--dense-threshold",
        type=float,
        default=DENSE_THRESHOLD,
        help="worst-head recall below which a layer is kept dense",
    )
    p.add_argument(
        "--max-dense-fraction", type=float, default=MAX_DENSE_FRACTION, help="cap on the share of dense layers"
    )
    p.add_argument("--calib-prompts", type=int, default=4)
    p.add_argument("--calib-heldout", type=int, default=2)
    p.add_argument("--calib-tokens", type=int, default=1500)
    p.add_argument("--calib-steps", type=int, default=100)
    p.add_argument(
        "--copy-layers-only",
        action="store_true",
        help="measure only the copying layers (seconds; what ESA, GSA and KVStar read) and keep the "
        "defaults' dense layers and projections: no profile, no calibration",
    )
    p.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the profile (minutes): the defaults' dense layers; the copying layers and the calibration "
        "still run (what an engine measures at start for GSA on device on a model without a JSON)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=32,
        help="the served KV block size the config is written for (GSA on device's chunk is a multiple of it); "
        "without --copy-layers-only also the profile's and the calibration's block",
    )
    p.set_defaults(handler=_handle)


#: `ucm configure`'s profile flags and calibration flags (argparse names) -> `run_configure` parameters
_PROFILE_FLAGS = {
    "tokens": "tokens",
    "prompts": "prompts",
    "steps": "steps",
    "task": "task",
    "dense_threshold": "threshold",
    "max_dense_fraction": "max_fraction",
}
_CALIBRATION_FLAGS = {
    "calib_prompts": "calib_prompts",
    "calib_heldout": "calib_heldout",
    "calib_tokens": "calib_tokens",
    "calib_steps": "calib_steps",
}


def _handle(args) -> int:
    from ucm.config.errors import ConfigError
    from ucm.profile import check_model_argument

    check_model_argument(args.model, "configure")
    if not 0 < args.ratio <= 1:
        raise SystemExit("ucm configure: --ratio must be in (0, 1]")
    if not 0 <= args.max_dense_fraction < 1:
        raise SystemExit("ucm configure: --max-dense-fraction must be in [0, 1)")
    if args.block_size < 1:
        raise SystemExit("ucm configure: --block-size must be a positive number of tokens")
    profile = not (args.copy_layers_only or args.no_profile)
    calibrate = not args.copy_layers_only
    skipped = {**({} if profile else _PROFILE_FLAGS), **({} if calibrate else _CALIBRATION_FLAGS)}
    defaults = inspect.signature(run_configure).parameters
    unread = [
        "--" + flag.replace("_", "-") for flag, name in skipped.items() if getattr(args, flag) != defaults[name].default
    ]
    if unread:  # flags of a step that does not run would be read by nothing
        mode = "--copy-layers-only" if args.copy_layers_only else "--no-profile"
        raise SystemExit(f"ucm configure: {', '.join(unread)} set a step that {mode} skips")
    try:
        run_configure(
            args.model,
            args.out,
            profile=profile,
            calibrate=calibrate,
            tokens=args.tokens,
            prompts=args.prompts,
            steps=args.steps,
            ratio=args.ratio,
            task=args.task,
            threshold=args.dense_threshold,
            max_fraction=args.max_dense_fraction,
            calib_prompts=args.calib_prompts,
            calib_heldout=args.calib_heldout,
            calib_tokens=args.calib_tokens,
            calib_steps=args.calib_steps,
            block_size=args.block_size,
        )
    except ConfigError as exc:
        print(f"ucm configure: the written config does not load: {exc}", file=sys.stderr)
        return 1
    return 0
