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
    if ref.shipped_config is not None:
        add_shipped_means(result, shipped_dense_layers(ref.shipped_config))
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


def shipped_dense_layers(config=None) -> list[int]:
    """The layers a shipped per-model JSON (default: the demo model's) keeps dense (ratio 1)."""
    from ucm.config.loader import model_config_data
    from ucm.demo import DEMO_MODEL_CONFIG

    ratios = model_config_data(config or DEMO_MODEL_CONFIG)["top_k_ratio_per_layer"]
    return [i for i, r in enumerate(ratios) if r >= 1]


def add_shipped_means(result: dict, dense_layers: list[int]) -> None:
    """Beside each method's mean over every layer (all profiled sparse), its mean over the layers
    the shipped settings run sparse: what the product's selection achieves where it selects."""
    result["shipped_dense_layers"] = list(dense_layers)
    for res in result["methods"].values():
        rows = [row for layer, row in res["per_layer"].items() if int(layer) not in dense_layers]
        res["shipped_sparse_layers_mean"] = (
            {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]} if rows else {}
        )


def suggest_dense_layers(methods: dict, count: int) -> list[int]:
    """The `count` layers with the lowest worst-head normalised recall, averaged over methods.

    Why this and not the head-mean recall: a layer whose one retrieval head loses its block
    breaks the answer while its head mean stays high (the measurements: docs/history.md)."""
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
    dense = result.get("shipped_dense_layers")
    if dense:
        print(f"oracle-normalised recall over the layers the shipped settings run sparse (all but {dense}):")
        for name, res in result["methods"].items():
            m = res.get("shipped_sparse_layers_mean")
            if m:
                print(f"{name:<19} {m['oracle_normalised_recall']:>12.3f}")
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
    p.add_argument(
        "--trace-sample",
        type=int,
        default=None,
        metavar="INDEX",
        help="instead: trace RULER sample INDEX of --task (default niah_multikey_3) at --tokens with the one "
        "method of --methods (default ESA) at --ratio for --steps decode steps: per step and layer, whether "
        "the needle's blocks were read and the attention-mass recall per KV head (JSON to --out, heatmaps "
        "to --plot)",
    )
    p.add_argument(
        "--dense-layers",
        choices=["model", "none"],
        default="model",
        help="with --trace-sample: windowed methods keep the SmolLM2 JSON's dense layers, as `ucm eval` "
        "runs them (model), or run every layer sparse (none)",
    )
    p.add_argument(
        "--method-key",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --trace-sample: set a key of the method's config (JSON value), e.g. kv_head_combine=rank "
        "or sticky_steps=8; repeatable",
    )
    p.set_defaults(handler=_handle)


def _handle_trace(args, methods) -> int:
    from ucm.eval import ruler
    from ucm.models import MODELS

    if args.model not in MODELS:
        raise SystemExit(f"ucm profile --trace-sample: --model must be a packaged model ({', '.join(MODELS)})")
    task = args.task or "niah_multikey_3"
    method = (methods or ("ESA",))[0]
    if methods and len(methods) != 1:
        raise SystemExit("ucm profile --trace-sample: name one method in --methods")
    try:
        ruler.check_task(task)
        ruler.require_dependencies()
    except (ValueError, ImportError) as exc:
        raise SystemExit(f"ucm profile --trace-sample: {exc}") from None
    config = None
    if args.method_key:
        from ucm.demo import method_config, model_dense_layers
        from ucm.methods import get_method
        from ucm.models import MODELS

        json_name = MODELS[args.model].model_config if args.model in MODELS else None
        keep = () if args.dense_layers == "none" or get_method(method).model_json or json_name is None else None
        config = method_config(
            method,
            args.ratio,
            dense_layers=model_dense_layers(json_name) if keep is None else (),
            model_config=json_name,  # read by the per-model JSON methods only
        )
        from ucm.methods import method_key_values

        try:
            config[method].update(method_key_values(args.method_key))
        except ValueError as exc:
            raise SystemExit(f"ucm profile: {exc}") from None
    res = trace_sample(
        task,
        args.tokens,
        args.trace_sample,
        method,
        args.ratio,
        args.steps,
        dense_layers=() if args.dense_layers == "none" else None,
        config=config,
        block_size=args.block_size,
        backend=args.backend,
        out=args.out,
        plot=args.plot,
        model=args.model,
    )
    print(
        f"{task} #{args.trace_sample}: needle blocks {res['needle_blocks']}; dense {res['dense_text']!r}; "
        f"{method}@{args.ratio:g} {res['sparse_text']!r}; first divergent token {res['first_divergent_token']}; "
        f"sparse layers missing the needle there: {res['sparse_layers_missing_needle_at_divergence']}"
    )
    return 0


def _handle(args) -> int:
    methods = None if args.methods is None else tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods or () if m not in profile_methods()]
    if unknown or methods == ():
        raise SystemExit(
            f"ucm profile --methods: unknown {', '.join(unknown) or '(none given)'}; "
            f"valid: {', '.join(profile_methods())}"
        )
    if args.trace_sample is not None:
        return _handle_trace(args, methods)
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


# --------------------------------------------------------------------------- trace of one sample


def layer_record(
    mass: torch.Tensor, kept: Sequence[int], needle_blocks: Sequence[int], num_kv_heads: int, dense: bool
) -> dict:
    """What one decode layer's selection held, judged by its dense attention.

    mass [Hq, N]: the dense softmax mass per query head and logical block (each head sums to 1);
    kept: the logical blocks the selection read. Per KV head (the mean over its GQA group of query
    heads): `recall_kv`, the mass on the kept blocks, and `needle_mass_kv`, the mass on the needle
    blocks; `recall_min_q`, the worst query head's recall; `needle_kept`, per needle block, whether
    the selection read it."""
    hq, n = mass.shape
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.as_tensor([b for b in kept if 0 <= b < n], dtype=torch.long)] = True
    needle = torch.zeros(n, dtype=torch.bool)
    needle[torch.as_tensor([b for b in needle_blocks if 0 <= b < n], dtype=torch.long)] = True
    per_q = (mass * keep).sum(-1)  # [Hq]
    group = hq // num_kv_heads
    return {
        "dense": dense,
        "kept": int(keep.sum()),
        "total": n,
        "needle_kept": [bool(keep[b]) if 0 <= b < n else False for b in needle_blocks],
        "recall_kv": [round(x, 5) for x in per_q.view(num_kv_heads, group).mean(-1).tolist()],
        "recall_min_q": round(float(per_q.min()), 5),
        "needle_mass_kv": [round(x, 5) for x in (mass * needle).sum(-1).view(num_kv_heads, group).mean(-1).tolist()],
    }


def score_rank(unit_scores: torch.Tensor, blocks: Sequence[int]) -> list[int | None]:
    """0-based rank of each block among a row's scored units (0 = the method's top block; ties
    counted in the block's favour); None for a block without a finite score (e.g. the partial
    last block, which mean-of-K methods do not score)."""
    s = unit_scores.to(torch.float32)
    out: list[int | None] = []
    for b in blocks:
        if b >= s.shape[0] or not torch.isfinite(s[b]):
            out.append(None)
        else:
            out.append(int((s > s[b]).sum()))
    return out


class SelectionTracer(RunObserver):
    """Observer of a sparse `PagedHFRunner.decode` (pass `tracer.wrap(method)` as its method): per
    decode step and layer, the dense attention mass per block of that step's query over the whole
    cache, the blocks the method read (recorded from its plan when the step ends) and the rank
    the method's scores gave the needle blocks."""

    def __init__(self, needle_blocks: Sequence[int], num_kv_heads: int, block_size: int) -> None:
        self.needle_blocks = list(needle_blocks)
        self.num_kv_heads = num_kv_heads
        self.block_size = block_size
        self._mass: dict[int, torch.Tensor] = {}
        self._ranks: dict[int, list[int | None]] = {}
        self._step = -1
        self.steps: list[list[dict]] = []  # [step][layer] -> layer_record + "needle_rank"

    def on_decode(self, step, layer, q, k_cache, v_cache, block_table, seq_lens, scale) -> None:
        self._step = step
        n = int(-(-int(seq_lens[0]) // self.block_size))
        self._mass[layer] = metrics.dense_block_mass(q, k_cache, block_table, seq_lens, scale)[0, :, :n].cpu()

    def _on_scores(self, req_id: str, layer: int, unit_scores: torch.Tensor) -> None:
        self._ranks[layer] = score_rank(unit_scores.cpu(), self.needle_blocks)

    def record(self, plan) -> None:
        rows = []
        for layer in sorted(self._mass):
            sel = plan.selections.get(layer)
            kept = sel._logical[0, : int(sel.blocks_kept[0])].tolist() if sel is not None else []
            rec = layer_record(
                self._mass[layer], kept, self.needle_blocks, self.num_kv_heads, bool(sel is not None and sel.dense)
            )
            rec["needle_rank"] = self._ranks.get(layer)
            rows.append(rec)
        self.steps.append(rows)
        self._mass, self._ranks = {}, {}

    def wrap(self, method: SparseMethod) -> _TracedMethod:
        method.retrieval_listeners.append(self._on_scores)
        return _TracedMethod(method, self)


class _TracedMethod:
    """A sparse method whose steps the tracer records as they end; everything else is the method's."""

    def __init__(self, method: SparseMethod, tracer: SelectionTracer) -> None:
        self._method, self._tracer = method, tracer

    def __getattr__(self, name):
        return getattr(self._method, name)

    def end_step(self, plan) -> None:
        self._tracer.record(plan)
        self._method.end_step(plan)


def copy_source_blocks(
    tokenizer, tokens: Sequence[int], value: str, value_char_start: int, offsets: Sequence[tuple[int, int]], bs: int
) -> list[int | None]:
    """Per generated token t (t >= 1, the decode step t - 1 produced it): the prompt block holding
    the value's next character to copy, while the answer so far is a prefix of the value; None
    once it has all of it or left it (leading blanks and colons of the answer are skipped)."""
    from ucm.eval.divergence import token_span

    out: list[int | None] = []
    for t in range(1, len(tokens)):
        so_far = tokenizer.decode(list(tokens[:t]), skip_special_tokens=True)
        so_far = so_far[len(so_far) - len(so_far.lstrip(" :\n\t")) :]  # RULER answers often open with ": "
        if len(so_far) < len(value) and value.startswith(so_far):
            c = value_char_start + len(so_far)
            out.append(token_span(offsets, c, c + 1)[0] // bs)
        else:
            out.append(None)
    return out


def trace_sample(
    task: str = "niah_multikey_3",
    tokens: int = 4096,
    index: int = 0,
    method: str = "ESA",
    ratio: float = 0.3,
    steps: int = 48,
    dense_layers: Sequence[int] | None = None,
    block_size: int = 32,
    seed: int = 42,
    backend: str | None = None,
    config: dict | None = None,
    out: Path | None = None,
    plot: Path | None = None,
    model: str = "smollm2",
) -> dict:
    """Trace one RULER sample through the core engine (HF runner over ucm's paged cache, the
    selection code vLLM runs): a dense greedy decode, then the method's decode with a
    `SelectionTracer`, and per decode step and layer whether the needle's blocks were read and
    how much of the dense attention mass the read blocks held (per KV head).

    `dense_layers`: the windowed methods' dense layers (None: as `ucm eval` runs them by default,
    the SmolLM2 JSON's for SmolLM2 and none for a model without a shipped JSON; () for every layer
    sparse). `model`: a packaged model (`ucm.models.MODELS`). `config` replaces the method's config
    (UCM's shape, e.g. `{"ESA": {...}}`) to trace a variant."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ucm.demo import method_config, model_dense_layers
    from ucm.eval import ruler
    from ucm.eval.divergence import first_divergence, needle_spans, span_blocks
    from ucm.hf_runner import PagedHFRunner
    from ucm.methods import get_method
    from ucm.models import MODELS, fetch_model
    from ucm.ops import get_ops
    from ucm.sparse.factory import build_sparse_method

    t0 = time.perf_counter()
    ops = get_ops(backend)
    path = fetch_model(model)
    tok = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    sample = ruler.generate(task, tokens, index + 1, tok, seed=seed)[index]
    enc = tok(sample.prompt, return_offsets_mapping=True)
    ids = list(enc.input_ids)
    spans = needle_spans(sample.prompt, sample.answers, enc.offset_mapping)
    needle = span_blocks(spans, block_size)
    spec = get_method(method)
    if spec.model_json and MODELS[model].model_config is None:
        raise ValueError(
            f"{method} needs a per-model JSON and ucm ships none for {model!r} (`ucm configure --model {model}` "
            "writes one)"
        )
    if dense_layers is None:
        json_name = MODELS[model].model_config
        dense_layers = () if spec.model_json or json_name is None else model_dense_layers(json_name)
    cfg = config or method_config(method, ratio, dense_layers=dense_layers, model_config=MODELS[model].model_config)
    runner = PagedHFRunner(hf_model, tok, ops, block_size=block_size, max_tokens=len(ids) + steps + 2 * block_size)
    state = runner.prefill(ids)
    stop = [tok.eos_token_id] if tok.eos_token_id is not None else []
    dense = runner.decode(state, None, steps, stop_ids=stop)
    built = build_sparse_method(cfg, runner.shapes, ops)
    tracer = SelectionTracer(needle, runner.shapes.num_kv_heads, block_size)
    sparse = runner.decode(state, tracer.wrap(built), steps, stop_ids=stop, observers=[tracer])
    built.close()
    div = first_divergence(sparse.tokens, dense.tokens)
    value = sample.answers[0]
    vstart = sample.prompt.find(value)
    source = copy_source_blocks(tok, dense.tokens, value, vstart, enc.offset_mapping, block_size)
    layers_dropped = None
    if div is not None and 1 <= div <= len(tracer.steps):
        layers_dropped = [
            layer for layer, r in enumerate(tracer.steps[div - 1]) if not r["dense"] and not all(r["needle_kept"])
        ]
    result = {
        "model": f"{Path(str(path)).name} (float32)",
        "engine": "core (ucm.hf_runner.PagedHFRunner: transformers model, ucm's paged cache and selection engine)",
        "backend": ops.name,
        "task": task,
        "tokens": tokens,
        "seed": seed,
        "index": index,
        "prompt_tokens": len(ids),
        "block_size": block_size,
        "method": method,
        "ratio": ratio,
        "config": cfg,
        "answers": list(sample.answers),
        "needle_spans": spans,
        "needle_blocks": needle,
        "dense_text": dense.text,
        "sparse_text": sparse.text,
        "dense_correct": ruler.score_samples(task, [dense.text], [sample])[0] >= 100,
        "sparse_correct": ruler.score_samples(task, [sparse.text], [sample])[0] >= 100,
        "dense_tokens": dense.tokens,
        "sparse_tokens": sparse.tokens,
        "first_divergent_token": div,
        "first_divergent_step": None if div is None else div - 1,  # decode step s produces token s + 1
        "sparse_layers_missing_needle_at_divergence": layers_dropped,
        "copy_source_block_per_step": source,
        "fraction_read": sparse.fraction_read,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "ucm profile " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["profile"] else "trace_sample()",
        "steps": tracer.steps,
    }
    result["summary"] = trace_summary(result)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result) + "\n")
    if plot is not None:
        plot_trace(result, plot)
    return result


def trace_summary(result: dict) -> dict:
    """Per sparse layer over the decode steps: how often the needle was read in full, the mean and
    worst mass recall (worst KV head), and the mean needle mass (best KV head: a layer that
    copies from the needle shows here)."""
    per_layer: dict[int, dict] = {}
    steps = result["steps"]
    for layer in range(len(steps[0]) if steps else 0):
        rows = [s[layer] for s in steps]
        if rows[0]["dense"]:
            continue
        per_layer[layer] = {
            "needle_kept_fraction": sum(all(r["needle_kept"]) for r in rows) / len(rows),
            "recall_worst_kv_mean": sum(min(r["recall_kv"]) for r in rows) / len(rows),
            "recall_worst_kv_min": min(min(r["recall_kv"]) for r in rows),
            "needle_mass_best_kv_mean": sum(max(r["needle_mass_kv"]) for r in rows) / len(rows),
        }
    return {
        "per_sparse_layer": per_layer,
        "needle_kept_fraction_all": (
            sum(v["needle_kept_fraction"] for v in per_layer.values()) / len(per_layer) if per_layer else None
        ),
    }


def plot_trace(result: dict, path: Path) -> None:
    """steps x layers heatmaps: needle read (all of its blocks / part / none; dense layers apart),
    the worst KV head's mass recall, and the needle's share of the best KV head's attention."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = result["steps"]
    n_layers = len(steps[0])
    kept = np.full((n_layers, len(steps)), np.nan)
    recall = np.zeros((n_layers, len(steps)))
    nmass = np.zeros((n_layers, len(steps)))
    for s, rows in enumerate(steps):
        for layer, r in enumerate(rows):
            if not r["dense"]:
                kept[layer, s] = sum(r["needle_kept"]) / max(len(r["needle_kept"]), 1)
            recall[layer, s] = min(r["recall_kv"])
            nmass[layer, s] = max(r["needle_mass_kv"])
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), constrained_layout=True)
    panels = [
        (kept, "needle blocks read (fraction; blank = dense layer)", "RdYlGn"),
        (recall, "attention-mass recall of the read blocks (worst KV head)", "viridis"),
        (nmass, "attention mass on the needle blocks (best KV head)", "magma"),
    ]
    div = result.get("first_divergent_step")
    for ax, (data, title, cmap) in zip(axes, panels, strict=True):
        im = ax.imshow(data, aspect="auto", origin="lower", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set(title=title, xlabel="decode step", ylabel="layer")
        if div is not None:
            ax.axvline(div - 0.5, color="red", linestyle="--", linewidth=1.2)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(
        f"{result['method']} @ {result['ratio']} on {result['task']} #{result['index']} ({result['prompt_tokens']} "
        f"tokens, needle blocks {result['needle_blocks']}): dense {result['dense_text'][:40]!r} / sparse "
        f"{result['sparse_text'][:40]!r}; red line: first divergent step",
        fontsize=9,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
