"""How much GSA on device's answers depend on the draw of its random hash projections, against the
trained projections the SmolLM2 JSON ships.

Why: with random orthogonal W, a RULER cell of 25 samples can lose or keep a borderline sample
depending on the seed alone (one sample is 4 points, twice the accuracy goal). This decodes the
same samples dense, with the shipped (trained) W, and with random W from several seeds, all at
the shipped dense layers and one keep ratio, and counts the samples each setting loses against
dense. Its result is why the SmolLM2 JSON ships `ucm calibrate`'s W (docs/history.md).

Runs on the core engine (`PagedHFRunner`, the real SmolLM2 on ucm's paged cache, dense prefill
computed once per sample), CPU by default. Writes benchmarks/results/hash_seed_spread.json and .png.

    python benchmarks/hash_seed_spread.py --length 4096 --samples 25 --seeds 6
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

TASKS = ("niah_single_1", "niah_single_2")
SHIPPED = "SmolLM2-135M-Instruct"


def hata_config(ratio: float, random_hash: bool) -> dict:
    """The shipped JSON with its dense layers, every other layer at `ratio`, no length threshold."""
    from ucm.config.loader import model_config_data

    data = model_config_data(SHIPPED, random_hash=random_hash)
    data["top_k_ratio_per_layer"] = [1.0 if r >= 1 else ratio for r in data["top_k_ratio_per_layer"]]
    data["gpu_seq_len_threshold"] = 0
    return data


def run(
    length: int,
    samples: int,
    seeds: int,
    ratio: float,
    new_tokens: int,
    backend: str | None,
    tasks: tuple[str, ...] = TASKS,
) -> dict:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ucm.eval import ruler
    from ucm.hf_runner import PagedHFRunner
    from ucm.models import fetch_model
    from ucm.ops import get_ops
    from ucm.sparse.gsa_on_device import build_from_model_config

    ops = get_ops(backend)
    path = fetch_model("smollm2")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    runner = PagedHFRunner(model, tok, ops, block_size=32, max_tokens=length + new_tokens + 64)
    trained, random_ = hata_config(ratio, False), hata_config(ratio, True)
    settings = {"trained (shipped)": lambda: build_from_model_config(trained, runner.shapes, ops)}
    for seed in range(seeds):
        settings[f"random seed {seed}"] = lambda s=seed: build_from_model_config(random_, runner.shapes, ops, seed=s)
    t0 = time.perf_counter()
    per_sample = []
    for task in tasks:
        data = ruler.generate(task, length, samples, tok)
        for sample in tqdm(data, desc=f"{task}@{length}", unit="sample", file=sys.stderr):
            state = runner.prefill(tok(sample.prompt).input_ids)
            row = {"task": task, "index": sample.index, "answer": sample.answers[0], "correct": {}}
            for name, make in [("dense", lambda: None), *settings.items()]:
                method = make()
                text = runner.decode(state, method, new_tokens).text
                if method is not None:
                    method.close()
                row["correct"][name] = ruler.score_samples(task, [text], [sample])[0] >= 100.0
            per_sample.append(row)
    names = ["dense", *settings]
    score = {
        name: {t: 100.0 * sum(r["correct"][name] for r in per_sample if r["task"] == t) / samples for t in tasks}
        for name in names
    }
    lost = {name: sum(r["correct"]["dense"] and not r["correct"][name] for r in per_sample) for name in settings}
    gained = {name: sum(r["correct"][name] and not r["correct"]["dense"] for r in per_sample) for name in settings}
    return {
        "model": "SmolLM2-135M-Instruct (float32), core engine (PagedHFRunner), block 32, greedy",
        "backend": ops.name,
        "length": length,
        "samples_per_task": samples,
        "tasks": list(tasks),
        "ratio": ratio,
        "dense_layers": [i for i, r in enumerate(trained["top_k_ratio_per_layer"]) if r >= 1],
        "hash_bits": trained["hash_bits"],
        "new_tokens": new_tokens,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/hash_seed_spread.py " + shlex.join(sys.argv[1:]),
        "score": score,
        "samples_lost_vs_dense": lost,
        "samples_gained_vs_dense": gained,
        "random_seeds_losing_any": sum(lost[n] > 0 for n in settings if n.startswith("random")),
        "per_sample": per_sample,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["samples_lost_vs_dense"])
    lost = [result["samples_lost_vs_dense"][n] for n in names]
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.4), constrained_layout=True)
    bars = ax.bar(
        range(len(names)), lost, color=["tab:green" if n.startswith("trained") else "tab:gray" for n in names]
    )
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    total = result["samples_per_task"] * len(result["tasks"])
    ax.set(
        ylabel=f"samples lost vs dense (of {total})",
        title=f"GSA on device at {result['length']} tokens, ratio {result['ratio']}: trained vs random W "
        f"({', '.join(result['tasks'])})",
    )
    ax.title.set_fontsize(9)
    ax.set_ylim(0, max(lost + [1]) + 0.5)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=25, help="per task")
    p.add_argument("--seeds", type=int, default=6, help="random projections drawn (seeds 0..N-1)")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--backend", default=None)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hash_seed_spread.json")
    args = p.parse_args(argv)
    if args.samples < 1 or args.seeds < 1 or not 0 < args.ratio <= 1:
        p.error("--samples and --seeds must be >= 1 and --ratio in (0, 1]")
    from ucm.eval import ruler

    try:
        ruler.require_dependencies()
    except ImportError as exc:
        p.error(str(exc))
    result = run(args.length, args.samples, args.seeds, args.ratio, args.new_tokens, args.backend)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    for name, n in result["samples_lost_vs_dense"].items():
        print(f"{name:<20} lost {n}, gained {result['samples_gained_vs_dense'][name]}  {result['score'][name]}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
