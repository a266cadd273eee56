"""`ucm profile`: selection quality of every method, per layer, on real model attention.

A dense greedy decode of the real model runs over ucm's paged cache; at every decode step and
layer, each method selects blocks from the same query and keys, and its selection is judged
against dense attention: attention-mass recall, oracle-normalised recall (recall / the best
selection of the same size), and the relative error of the attention output. No task noise:
this measures the selector itself, which is how per-layer dense/ratio choices in `configs/`
should be justified.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from ucm import metrics
from ucm.hf_runner import RunObserver
from ucm.ops.contract import SparseOps
from ucm.sparse.base import SparseMethod

#: per layer and decode step, in this order; worst_head_normalised_recall finds the layers whose
#: retrieval head a shared selection starves (see `metrics.worst_head_normalised_recall`)
METRICS = ("recall", "oracle_normalised_recall", "output_error", "fraction_kept", "worst_head_normalised_recall")


class SelectionProfiler(RunObserver):
    """Observer of a dense `PagedHFRunner.decode`: runs every method alongside and scores it."""

    def __init__(self, methods: dict[str, SparseMethod], ops: SparseOps, req_id: str = "profile") -> None:
        self.methods = methods
        self.ops = ops
        self.req_id = req_id
        self._plans: dict[str, object] = {}
        self._step = None
        # method -> layer -> list of METRICS tuples
        self.samples: dict[str, dict[int, list[tuple[float, ...]]]] = defaultdict(lambda: defaultdict(list))

    def on_kv(self, layer: int, key: torch.Tensor, slots: torch.Tensor) -> None:
        for m in self.methods.values():
            m.on_kv_written(layer, key, slots)

    def on_decode(self, step, layer, q, k_cache, v_cache, block_table, seq_lens, scale) -> None:
        if step != self._step:
            self.close_step()
            self._step = step
            self._plans = {n: m.begin_step([self.req_id], seq_lens, block_table) for n, m in self.methods.items()}
        dense_out, _ = self.ops.paged_decode_attention(q, k_cache, v_cache, block_table, seq_lens, scale)
        for name, m in self.methods.items():
            sel = m.select(layer, q, self._plans[name])
            ids, counts = sel._logical, sel.blocks_kept
            recall = metrics.attention_mass_recall(q, k_cache, block_table, seq_lens, ids, counts, scale)
            normalised = metrics.oracle_normalised_recall(q, k_cache, block_table, seq_lens, ids, counts, scale)
            worst = metrics.worst_head_normalised_recall(q, k_cache, block_table, seq_lens, ids, counts, scale)
            out, _ = self.ops.paged_decode_attention(q, k_cache, v_cache, sel.block_table, sel.seq_lens, scale)
            err = metrics.relative_output_error(out.flatten(1), dense_out.flatten(1))
            frac = float(sel.blocks_kept[0]) / float(sel.blocks_total[0])
            self.samples[name][layer].append(
                (float(recall[0]), float(normalised[0]), float(err[0]), frac, float(worst[0]))
            )

    def close_step(self) -> None:
        for name, plan in self._plans.items():
            self.methods[name].end_step(plan)
        self._plans = {}

    def summary(self) -> dict:
        """Per method: per-layer means, and means over the sparse layers."""
        out = {}
        for name, layers in self.samples.items():
            rows = {}
            for layer in sorted(layers):
                vals = torch.tensor(layers[layer])
                rows[layer] = dict(zip(METRICS, vals.mean(0).tolist(), strict=True))
            sparse = [r for r in rows.values() if r["fraction_kept"] < 0.999]
            mean = {k: sum(r[k] for r in sparse) / len(sparse) for k in rows[min(rows)]} if sparse else {}
            out[name] = {"per_layer": rows, "sparse_layers_mean": mean}
        return out


def run_profile(
    tokens: int = 3000,
    prompts: int = 3,
    steps: int = 8,
    ratio: float = 0.3,
    methods: Sequence[str] | None = None,
    block_size: int = 32,
    backend: str | None = None,
    out: Path | None = None,
    plot: Path | None = None,
    task: str | None = None,
    suggest_dense: int = 0,
    model: str | Path = "smollm2",
    quiet: bool = False,
) -> dict:
    """Profile `methods` (default: every registered method) with every layer sparse at `ratio`.

    Prompts are ucm's built-in needle haystack, or with `task` the first `prompts` samples of a
    RULER task at `tokens` tokens (needs the [eval] extra): the essay haystack is where the
    retrieval heads of the model show. `suggest_dense` > 0 adds the layers a per-model JSON
    should keep dense: the ones whose worst head loses most (lowest worst-head recall, mean over
    the methods). `model` is a packaged model's name or a local HF folder (`ucm.models.resolve_model`);
    GSA on device runs it with its shipped JSON, else with the engine's generic fallback, every
    layer sparse. `quiet` skips the printed summary (`ucm configure` prints its own)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ucm.demo import demo_methods, method_config, needle_prompt
    from ucm.hf_runner import PagedHFRunner
    from ucm.methods import base_method, get_method
    from ucm.models import resolve_model
    from ucm.ops import get_ops
    from ucm.sparse.factory import build_sparse_method

    methods = demo_methods() if methods is None else tuple(methods)

    ops = get_ops(backend)
    ref = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(ref.path)
    hf_model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32)
    runner = None
    merged: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    t0 = time.perf_counter()
    if task is not None:
        from ucm.eval import ruler

        prompt_ids = [tok(s.prompt).input_ids for s in ruler.generate(task, tokens, prompts, tok)]
    else:
        prompt_ids = [needle_prompt(tok, tokens, 0.5, seed=seed)[0] for seed in range(prompts)]
    for ids in tqdm(prompt_ids, desc="profiling", unit="prompt", file=sys.stderr):
        if runner is None or len(ids) + steps + block_size > runner.max_tokens:
            runner = PagedHFRunner(
                hf_model, tok, ops, block_size=block_size, max_tokens=len(ids) + steps + 4 * block_size
            )
        shapes = runner.shapes
        state = runner.prefill(ids)
        built = {
            name: build_sparse_method(
                method_config(base_method(name), ratio),
                runner.shapes,
                ops,
                model_config=_model_json_all_sparse(ratio, name.endswith(RANDOM_HASH), ref, shapes)
                if get_method(base_method(name)).model_json
                else None,
            )
            for name in methods
        }
        prof = SelectionProfiler(built, ops)
        runner.decode(state, None, steps, observers=[prof])
        prof.close_step()
        for m in built.values():
            m.close()
        for name, layers in prof.samples.items():
            for layer, vals in layers.items():
                merged[name][layer].extend(vals)
    summary_prof = SelectionProfiler({}, ops)
    summary_prof.samples = merged
    result = {
        "model": ref.label,
        "model_name": ref.name,
        "backend": ops.name,
        "prompt_tokens": tokens,
        "prompts": prompts,
        "prompt_source": f"RULER {task}" if task else "ucm needle haystack (ucm.demo.needle_prompt)",
        "decode_steps": steps,
        "block_size": block_size,
        "ratio": ratio,
        "every_layer_sparse": True,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "ucm profile " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["profile"] else "run_profile()",
        "methods": summary_prof.summary(),
    }
    if suggest_dense > 0:
        result["suggested_dense_layers"] = suggest_dense_layers(result["methods"], suggest_dense)
    if not quiet:
        print_summary(result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    if plot is not None:
        plot_profile(result, plot)
        print(f"wrote {plot}")
    return result


def suggest_dense_layers(methods: dict, count: int) -> list[int]:
    """The `count` layers with the lowest worst-head normalised recall, averaged over methods.

    Why this and not the head-mean recall: a layer whose one retrieval head loses its block
    breaks the answer while its head mean stays high (docs/accuracy.md, session 6)."""
    per_layer: dict[int, list[float]] = defaultdict(list)
    for res in methods.values():
        for layer, row in res["per_layer"].items():
            per_layer[int(layer)].append(row["worst_head_normalised_recall"])
    ranked = sorted(per_layer, key=lambda layer: (sum(per_layer[layer]) / len(per_layer[layer]), layer))
    return sorted(ranked[:count])


#: a method with a per-model JSON (GSA on device) run with random orthogonal hash projections
#: instead of the shipped JSON's trained ones: "<method>+random"
RANDOM_HASH = "+random"


def profile_methods() -> tuple[str, ...]:
    """What `--methods` accepts: every registered method, and "<method>+random" for those with a
    per-model JSON."""
    from ucm.methods import method_names

    return (*method_names(), *(name + RANDOM_HASH for name in method_names(model_json=True)))


def _model_json_all_sparse(ratio: float, random_hash: bool, model, shapes) -> dict:
    """The model's per-model JSON (shipped, else the generic fallback) with every layer sparse:
    the profile judges every layer."""
    from ucm.models import per_model_data

    data = per_model_data(model, shapes.num_layers, shapes.head_dim, shapes.block_size, random_hash=random_hash)
    data["top_k_ratio_per_layer"] = [ratio] * data["num_hidden_layers"]
    data["gpu_seq_len_threshold"] = 0
    return data


def print_summary(result: dict) -> None:
    print(
        f"\nselection quality of {result.get('model_name', 'SmolLM2-135M-Instruct')} at ratio {result['ratio']} "
        f"({result['prompts']} prompts x {result['decode_steps']} "
        f"steps, {result['prompt_tokens']} tokens, block {result['block_size']}), mean over layers:"
    )
    print(f"{'method':<19} {'recall':>7} {'oracle-norm':>12} {'worst head':>11} {'output err':>11} {'kept':>6}")
    for name, res in result["methods"].items():
        m = res["sparse_layers_mean"]
        if m:
            print(
                f"{name:<19} {m['recall']:>7.3f} {m['oracle_normalised_recall']:>12.3f} "
                f"{m.get('worst_head_normalised_recall', float('nan')):>11.3f} {m['output_error']:>11.3f} "
                f"{m['fraction_kept']:>6.2f}"
            )
    if result.get("suggested_dense_layers"):
        print(f"layers to keep dense (lowest worst-head recall): {result['suggested_dense_layers']}")


def plot_profile(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4), constrained_layout=True)
    for name, res in result["methods"].items():
        layers = sorted(int(k) for k in res["per_layer"])
        rows = [res["per_layer"][k] if k in res["per_layer"] else res["per_layer"][str(k)] for k in layers]
        axes[0].plot(layers, [r["oracle_normalised_recall"] for r in rows], marker="o", ms=3, label=name)
        if "worst_head_normalised_recall" in rows[0]:
            axes[1].plot(layers, [r["worst_head_normalised_recall"] for r in rows], marker="o", ms=3, label=name)
        axes[2].plot(layers, [r["output_error"] for r in rows], marker="o", ms=3, label=name)
    axes[0].set(
        title=f"oracle-normalised attention-mass recall (ratio {result['ratio']})",
        xlabel="layer",
        ylabel="recall / best possible",
        ylim=(0, 1.02),
    )
    axes[1].set(
        title="worst head: its recall / its own best", xlabel="layer", ylabel="min over query heads", ylim=(0, 1.02)
    )
    axes[2].set(title="relative attention-output error", xlabel="layer", ylabel="||sparse - dense|| / ||dense||")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="per-layer selection quality of every method vs dense attention (CPU)")
    add_model_argument(p)
    p.add_argument("--tokens", type=int, default=3000)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="decode steps per prompt")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, of {','.join(profile_methods())} (default: every method but the "
        f"'{RANDOM_HASH}' ones: per-model JSON methods with random hash projections)",
    )
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--backend", default=None)
    p.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write a per-layer plot (PNG) here")
    p.add_argument(
        "--task",
        default=None,
        help="take the prompts from this RULER task (e.g. niah_single_2; needs the [eval] extra) "
        "instead of ucm's needle haystack",
    )
    p.add_argument(
        "--suggest-dense",
        type=int,
        default=0,
        metavar="N",
        help="also print the N layers to keep dense (lowest worst-head recall)",
    )
    p.set_defaults(handler=_handle)


def _handle(args) -> int:
    methods = None if args.methods is None else tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods or () if m not in profile_methods()]
    if unknown or methods == ():
        raise SystemExit(
            f"ucm profile --methods: unknown {', '.join(unknown) or '(none given)'}; "
            f"valid: {', '.join(profile_methods())}"
        )
    if args.task is not None:
        from ucm.eval import ruler

        try:  # before the model loads: a typo or a missing extra fails at once
            ruler.check_task(args.task)
            ruler.require_dependencies()
        except (ValueError, ImportError) as exc:
            raise SystemExit(f"ucm profile --task: {exc}") from None
    if args.suggest_dense < 0:
        raise SystemExit("ucm profile: --suggest-dense must be >= 0")
    check_model_argument(args.model, "profile")
    run_profile(
        args.tokens,
        args.prompts,
        args.steps,
        args.ratio,
        methods,
        args.block_size,
        args.backend,
        args.out,
        args.plot,
        args.task,
        args.suggest_dense,
        args.model,
    )
    return 0


def check_model_argument(value: str, command: str) -> None:
    """Fail at once (before any model loads) on a --model that is neither a packaged model nor a folder
    with config.json."""
    from ucm.models import MODELS

    if value not in MODELS and not (Path(value).expanduser() / "config.json").is_file():
        raise SystemExit(
            f"ucm {command} --model {value}: neither a packaged model ({', '.join(MODELS)}) nor a Hugging Face "
            "model folder (no config.json there)"
        )


def add_model_argument(p) -> None:
    """`--model NAME|PATH`, shared by profile, calibrate and configure."""
    from ucm.models import MODELS

    p.add_argument(
        "--model",
        default="smollm2",
        help=f"a packaged model ({', '.join(MODELS)}) or a local Hugging Face model folder (config.json + "
        "weights + tokenizer); default smollm2",
    )
