"""Which layers must stay dense: answers of RULER samples with candidate dense-layer sets, and,
for every sample a set gets wrong, the layers whose sparsity alone breaks the answer.

Why: a per-model JSON spends its dense budget on a few layers, and the choice decides accuracy
(two sets of four layers for SmolLM2 differ by 20 points on one task: docs/history.md).
`ucm profile --task ... --suggest-dense N` screens layers by worst-head recall; this confirms on
answers: for each sample the first set gets wrong, it decodes with every other layer dense and
one layer sparse, so a layer that breaks the answer on its own is named.

Runs on the core engine (`PagedHFRunner`, the real SmolLM2 on ucm's paged cache, dense prefill
computed once per sample), CPU by default. Writes benchmarks/results/layer_ablation.json and .png.

    python benchmarks/layer_ablation.py --length 4096 --samples 25 --methods ESA GSA \
        --dense-sets 5,6,7,8 7,17,18,23
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch


def parse_set(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"a dense-layer set is comma-separated layer numbers, got {text!r}") from exc
    return layers


def build_method(name: str, ratio: float, dense: tuple[int, ...], shapes, ops, workdir: Path):
    """`name` at `ratio` with exactly the layers `dense` kept dense (GSA on device: in a JSON copy)."""
    from ucm.demo import method_config
    from ucm.sparse.factory import build_sparse_method

    return build_sparse_method(method_config(name, ratio, workdir, dense), shapes, ops)


def run(
    task: str,
    length: int,
    samples: int,
    methods: list[str],
    dense_sets: list[tuple[int, ...]],
    ratio: float,
    new_tokens: int,
    backend: str | None,
) -> dict:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ucm.eval import ruler
    from ucm.hf_runner import PagedHFRunner
    from ucm.models import fetch_model
    from ucm.ops import get_ops

    ops = get_ops(backend)
    path = fetch_model("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    runner = PagedHFRunner(model, tok, ops, block_size=32, max_tokens=length + new_tokens + 64)
    layers = runner.shapes.num_layers
    data = ruler.generate(task, length, samples, tok)
    labels = [",".join(map(str, s)) for s in dense_sets]
    per_sample = []
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="ucm-ablation-"))  # GSA on device's JSON copies

    def correct(state, method, sample) -> tuple[bool, str]:
        text = runner.decode(state, method, new_tokens).text
        return ruler.score_samples(task, [text], [sample])[0] >= 100.0, text

    for sample in tqdm(data, desc=f"{task}@{length}", unit="sample", file=sys.stderr):
        state = runner.prefill(tok(sample.prompt).input_ids)
        ok, text = correct(state, None, sample)
        row = {"index": sample.index, "answer": sample.answers[0], "dense": ok, "dense_text": text, "methods": {}}
        if ok:  # a sample dense gets wrong says nothing about sparsity
            for name in methods:
                res = {}
                for label, dense in zip(labels, dense_sets, strict=True):
                    res[label] = correct(state, build_method(name, ratio, dense, runner.shapes, ops, work), sample)[0]
                if not res[labels[0]]:  # explain the first set's failure: one sparse layer at a time
                    others = [layer for layer in range(layers) if layer not in dense_sets[0]]
                    res["breaks_alone"] = [
                        layer
                        for layer in others
                        if not correct(
                            state,
                            build_method(
                                name, ratio, tuple(x for x in range(layers) if x != layer), runner.shapes, ops, work
                            ),
                            sample,
                        )[0]
                    ]
                row["methods"][name] = res
        per_sample.append(row)
    shutil.rmtree(work, ignore_errors=True)
    usable = [r for r in per_sample if r["dense"]]
    summary = {}
    for name in methods:
        breaks = Counter(layer for r in usable for layer in r["methods"][name].get("breaks_alone", []))
        summary[name] = {
            "correct_of_dense_correct": {label: sum(r["methods"][name][label] for r in usable) for label in labels},
            "failures_of_first_set": sum(not r["methods"][name][labels[0]] for r in usable),
            "layers_breaking_alone": {str(k): v for k, v in sorted(breaks.items())},
        }
    return {
        "model": "SmolLM2-135M-Instruct (float32), core engine (PagedHFRunner), block 32, greedy",
        "backend": ops.name,
        "task": task,
        "length": length,
        "samples": samples,
        "dense_correct": len(usable),
        "ratio": ratio,
        "dense_sets": labels,
        "new_tokens": new_tokens,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/layer_ablation.py " + shlex.join(sys.argv[1:]),
        "methods": summary,
        "per_sample": per_sample,
    }


def plot(result: dict, path: Path, layers: int = 30) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 3.8), gridspec_kw={"width_ratios": [2.2, 1]}, constrained_layout=True)
    width = 0.8 / max(len(methods), 1)
    for i, name in enumerate(methods):
        counts = result["methods"][name]["layers_breaking_alone"]
        xs = [x + (i - (len(methods) - 1) / 2) * width for x in range(layers)]
        axes[0].bar(xs, [counts.get(str(x), 0) for x in range(layers)], width=width, label=name)
    first = result["dense_sets"][0]
    axes[0].set(
        title=f"this layer alone sparse breaks the answer (samples dense {{{first}}} gets wrong)",
        xlabel="layer",
        ylabel="samples",
        xticks=range(layers),
    )
    axes[0].legend(fontsize=8)
    n = result["dense_correct"]
    sets = result["dense_sets"]
    for i, name in enumerate(methods):
        vals = [100.0 * result["methods"][name]["correct_of_dense_correct"][s] / max(n, 1) for s in sets]
        axes[1].bar([x + (i - (len(methods) - 1) / 2) * width for x in range(len(sets))], vals, width=width, label=name)
    axes[1].set(
        title=f"correct, % of the {n} dense answers, ratio {result['ratio']}", xticks=range(len(sets)), ylim=(0, 105)
    )
    axes[1].set_xticklabels([f"dense {s}" for s in sets], fontsize=8)
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{result['task']} at {result['length']} tokens: which layers need to stay dense", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from ucm.eval import ruler

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="niah_single_2", choices=ruler.TASKS)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=25)
    p.add_argument("--methods", nargs="+", default=None, help="default: every registered method")
    p.add_argument(
        "--dense-sets",
        nargs="+",
        type=parse_set,
        default=[(5, 6, 7, 8), (7, 17, 18, 23)],
        help="candidate dense-layer sets; the first one's failures are explained layer by layer",
    )
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--backend", default=None)
    p.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", default="layer_ablation", help="output file stem")
    args = p.parse_args(argv)
    missing = ruler.missing_dependencies()
    if missing:
        p.error(f"needs {', '.join(missing)}: {ruler.INSTALL_HINT}")
    from ucm.methods import find_method, method_names

    args.methods = list(method_names()) if args.methods is None else args.methods
    for m in args.methods:
        if find_method(m) is None:
            p.error(f"unknown method {m!r}; valid: {', '.join(method_names())}")
    if not 0 < args.ratio <= 1:
        p.error("--ratio must be in (0, 1]")
    result = run(
        args.task, args.length, args.samples, args.methods, args.dense_sets, args.ratio, args.new_tokens, args.backend
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.name}.json"
    out.write_text(json.dumps(result, indent=2))
    plot(result, args.out_dir / f"{args.name}.png")
    for name, res in result["methods"].items():
        print(
            f"{name}: correct of {result['dense_correct']} dense-correct: {res['correct_of_dense_correct']}; "
            f"layers breaking alone: {res['layers_breaking_alone']}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
