"""Turn `ucm eval`'s per-sample rows into the summary JSON, a markdown table and a plot.

Headline cells are the (task, length) pairs where dense itself scores at least
`HEADLINE_MIN` points: a task the model cannot do says nothing about sparsity.
`max_drop_vs_dense_at_0_3` is the worst drop, in points, of any method at ratio 0.3 over the
headline cells, each method as configured for the model (with its dense layers where that
variant ran, and ucm's retrieval stride: settings run with `--retrieval-stride`, named
"ESA+dense/s4" ..., are reported but left out, as are rows marked `superseded`: earlier runs of
a setting whose configuration has since changed, kept under their own name, e.g. the former
dense layers 5-8, "ESA+dense/L5-8", and GSA on device with other hash projections
than the shipped JSON's, "GSAOnDevice+random" / "GSAOnDevice+trained" (`--hash-config`));
`max_drop_all_layers_sparse_at_0_3` is the same for ESA/GSA/KVStar with every layer sparse.
The markdown puts the shipped settings in one table and these variants in a second.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from statistics import mean

from ucm.eval.divergence import divergence_rows

HEADLINE_MIN = 50.0
DENSE = "dense"
#: the per-sample divergence table lists every compared prediction up to this many, else only
#: those that differ from dense
DIVERGENCE_ROWS_ALL = 200


def summarize(rows: list[dict], meta: dict) -> dict:
    cells: dict[tuple, list[float]] = defaultdict(list)
    info: dict[str, tuple] = {}
    for r in rows:
        cells[(r["length"], r["task"], r["setting"])].append(float(r["score"]))
        # third: what makes the row a variant rather than the shipped setting (None: shipped)
        info[r["setting"]] = (
            r["method"],
            r["ratio"],
            r.get("retrieval_stride") or r.get("superseded") or r.get("hash_weights") or r.get("method_keys"),
        )
    table = [
        {
            "length": L,
            "task": t,
            "setting": s,
            "method": info[s][0],
            "ratio": info[s][1],
            "samples": len(v),
            "score": mean(v),
            **({"variant": info[s][2]} if info[s][2] is not None else {}),
        }
        for (L, t, s), v in sorted(cells.items())
    ]
    dense = {(c["length"], c["task"]): c["score"] for c in table if c["setting"] == DENSE}
    headline = sorted(k for k, v in dense.items() if v >= HEADLINE_MIN)
    drops: dict[str, float] = {}
    for c in table:
        key = (c["length"], c["task"])
        if c["setting"] == DENSE or key not in headline:
            continue
        c["drop_vs_dense"] = dense[key] - c["score"]
        drops[c["setting"]] = max(drops.get(c["setting"], float("-inf")), c["drop_vs_dense"])
    at_03 = {
        s: d for s, d in drops.items() if info[s][1] is not None and abs(info[s][1] - 0.3) < 1e-9 and info[s][2] is None
    }
    # the headline figure is each method as configured by default for the model: with the model's
    # dense layers where that variant was run ("ESA+dense"; GSA on device always keeps its JSON's)
    shipped_methods = _shipped_methods(table)
    shipped = [d for s, d in at_03.items() if info[s][0] in shipped_methods]
    all_sparse = [
        d for s, d in at_03.items() if not info[s][0].endswith("+dense") and not _keeps_model_json(info[s][0])
    ]
    per_length: dict[int, dict[str, int]] = defaultdict(dict)
    for c in table:
        per_length[c["length"]][c["task"]] = max(per_length[c["length"]].get(c["task"], 0), c["samples"])
    return {
        **meta,
        "tasks_and_samples_per_length": {str(L): v for L, v in sorted(per_length.items())},
        "settings": sorted(info, key=lambda s: (info[s][0] != DENSE, info[s][0], info[s][1] or 0)),
        "headline_min_dense_score": HEADLINE_MIN,
        "headline_cells": [{"length": L, "task": t, "dense": dense[(L, t)]} for L, t in headline],
        "dense_fails": [
            {"length": L, "task": t, "dense": v} for (L, t), v in sorted(dense.items()) if v < HEADLINE_MIN
        ],
        "worst_drop_by_setting": drops,
        "max_drop_vs_dense_at_0_3": max(shipped) if shipped else None,
        "max_drop_all_layers_sparse_at_0_3": max(all_sparse) if all_sparse else None,
        "cells": table,
        # per sparse prediction with recorded token ids: where it leaves dense, where the needle is
        "divergence": [d for d in divergence_rows(rows) if d["compared"]],
    }


def _keeps_model_json(method: str) -> bool:
    """Whether results of `method` kept a per-model JSON's dense layers (a registered method with
    `model_json`, e.g. GSA on device); a method no longer registered counts as not."""
    from ucm.methods import base_method, find_method

    spec = find_method(base_method(method))
    return spec is not None and spec.model_json


def _shipped_methods(cells: list[dict]) -> set[str]:
    """Methods as configured for the model: not a variant, and not the every-layer-sparse twin
    of a method that keeps the model's dense layers ("ESA" when "ESA+dense" ran)."""
    names = {c["method"] for c in cells}
    return {c["method"] for c in cells if "variant" not in c and f"{c['method']}+dense" not in names}


def _table(cells: list[dict], cols: list[tuple], headline: set) -> list[str]:
    settings = list(
        dict.fromkeys(
            c["setting"] for c in sorted(cells, key=lambda c: (c["method"] != DENSE, c["method"], c["ratio"] or 0))
        )
    )
    score = {(c["length"], c["task"], c["setting"]): c for c in cells}
    lines = ["| setting | " + " | ".join(f"{t} @{L}" for L, t in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for s in settings:
        row = []
        for L, t in cols:
            c = score.get((L, t, s))
            text = "" if c is None else f"{c['score']:.0f}"
            if c is not None and (L, t) not in headline:
                text = f"({text})"
            row.append(text)
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    return lines


def markdown(summary: dict) -> str:
    """The shipped settings (dense first), then the variants and superseded runs beside dense."""
    cells = summary["cells"]
    cols = sorted({(c["length"], c["task"]) for c in cells}, key=lambda k: (k[0], k[1]))
    headline = {(h["length"], h["task"]) for h in summary["headline_cells"]}
    shipped_methods = _shipped_methods(cells)
    shipped = [c for c in cells if c["method"] in shipped_methods]
    variants = [c for c in cells if c["method"] not in shipped_methods or c["setting"] == DENSE]
    n = sorted({c["samples"] for c in cells})
    worst = summary["max_drop_vs_dense_at_0_3"]
    lines = ["Shipped settings (each method as configured for the model; these make the headline):", ""]
    lines += _table(shipped, cols, headline)
    if len(variants) > len([c for c in cells if c["setting"] == DENSE]):
        lines += [
            "",
            "Variants (every layer sparse: no `+dense`; other retrieval strides `/sN`; other hash "
            "projections `+random` / `+trained`; config keys set by `--method-key`, `[key=value]`, "
            "`blk_repre_inner_token_merge=32` being whole-block representations, the default until session 17) "
            "and superseded runs (`/L5-8`: the dense layers of sessions 2-5), reported but not headline:",
            "",
        ]
        lines += _table(variants, cols, headline)
    samples = summary.get("tasks_and_samples_per_length", {})
    per = "; ".join(f"{L}: " + ", ".join(f"{t} {k}" for t, k in sorted(v.items())) for L, v in samples.items())
    lines += [
        "",
        f"Scores are RULER's metric in points; samples per cell: {', '.join(map(str, n))}"
        + (f" (most per task and length: {per})" if per else "")
        + ". "
        f"Parenthesised cells are where dense scores below {summary['headline_min_dense_score']:.0f} "
        "(not headline).",
        f"Worst drop vs dense at ratio 0.3 over headline cells: {'n/a' if worst is None else f'{worst:.1f} points'}.",
    ]
    lines += divergence_markdown(summary.get("divergence", []))
    return "\n".join(lines) + "\n"


def _cell_text(text: str | None) -> str:
    """A snippet of an answer for a markdown cell: visible whitespace, no pipes."""
    if text is None:
        return ""
    if text == "":
        return "(end)"  # this answer stopped where the other goes on
    return "`" + text.replace("\n", "\\n").replace("|", "/").replace("`", "'") + "`"


def _blank(x) -> str:
    return "" if x is None else str(x)


def divergence_markdown(rows: list[dict]) -> list[str]:
    """Per sample: where each sparse answer first leaves dense's (token, character, what each says
    from there) and the prompt blocks holding the expected value."""
    if not rows:
        return []
    rows = sorted(rows, key=lambda d: (d["length"], d["task"], d["index"], d["setting"]))
    differing = [d for d in rows if not d["identical"]]
    shown = rows if len(rows) <= DIVERGENCE_ROWS_ALL else differing
    lines = [
        "",
        "Where sparse answers leave dense's, per sample (first divergent generated token and character; "
        "the blocks of the prompt that hold the expected value, block = token // block size): "
        f"{len(rows) - len(differing)} of {len(rows)} sparse predictions are token-identical to dense"
        + ("." if shown is rows else "; the table lists the others."),
        "",
        "| sample | setting | correct (dense) | first divergent token | char | dense from there | sparse from there "
        "| needle blocks |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def yes(x):
        return "?" if x is None else ("yes" if x else "no")

    for d in shown:
        tok = "identical" if d["identical"] else str(d["first_divergent_token"])
        blocks = d.get("needle_blocks")
        lines.append(
            f"| {d['task']} @{d['length']} #{d['index']} | {d['setting']} | {yes(d['correct'])} "
            f"({yes(d['dense_correct'])}) | {tok} | {_blank(d['first_divergent_char'])} "
            f"| {_cell_text(d['dense_from_there'])} | {_cell_text(d['sparse_from_there'])} "
            f"| {'' if blocks is None else ', '.join(map(str, blocks))} |"
        )
    return lines


def plot(summary: dict, path: Path) -> None:
    """Accuracy vs keep ratio per method, one panel per length, averaged over headline tasks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summary["cells"]
    lengths = sorted({c["length"] for c in cells})
    headline = {(h["length"], h["task"]) for h in summary["headline_cells"]}
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.5 * len(lengths) + 2.5, 3.6), squeeze=False)
    methods = sorted({c["method"] for c in cells if c["setting"] != DENSE})
    shipped = _shipped_methods(cells)
    named = [m for m in methods if m in shipped]  # the variants are grey
    palette = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # tab10's grey: the variants'
    if len(named) > len(palette):
        palette = list(plt.get_cmap("tab20").colors)
    colors = {m: palette[i % len(palette)] for i, m in enumerate(named)}
    for ax, L in zip(axes[0], lengths, strict=True):
        tasks = sorted({t for (l2, t) in headline if l2 == L}) or sorted({c["task"] for c in cells if c["length"] == L})
        mark = "headline tasks" if any(l2 == L for l2, _ in headline) else "all tasks (dense < headline bar)"
        dense = [c["score"] for c in cells if c["length"] == L and c["setting"] == DENSE and c["task"] in tasks]
        if dense:
            ax.axhline(mean(dense), color="black", linestyle="--", label="dense")
        # x = the fraction of KV blocks the engine actually read (GSA on device keeps its model
        # JSON's dense layers, so it reads more than its ratio); the ratio where not measured
        read = summary.get("blocks_read", {})
        by_method: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for c in cells:
            if c["length"] == L and c["setting"] != DENSE and c["task"] in tasks:
                by_method[c["method"]][read.get(f"{L}/{c['setting']}", c["ratio"])].append(c["score"])
        for m, pts in sorted(by_method.items()):
            xs = sorted(pts)
            variant = m not in shipped  # every layer sparse, /s4, +random, /L5-8: context
            ax.plot(
                xs,
                [mean(pts[x]) for x in xs],
                marker="o",
                label=f"_{m}" if variant else m,  # variants: faint, named in results.md, not the legend
                color="grey" if variant else colors[m],
                linestyle="--" if variant else "-",
                linewidth=1.0 if variant else 1.8,
                alpha=0.55 if variant else 1.0,
            )
        ax.set_title(f"{L} tokens ({mark})", fontsize=9)
        ax.set_xlabel("fraction of KV blocks read per decode step")
        ax.set_ylabel("RULER score (points)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    lines = [h for ax in axes[0] for h in ax.get_lines()]
    handles = {h.get_label(): h for h in lines if not h.get_label().startswith("_")}  # each shipped method once
    order = sorted(handles, key=lambda m: (m != "dense", m))
    labels = [*order]
    variants = {h.get_label() for h in lines if h.get_label().startswith("_")}
    if variants:  # one grey entry for them all: their names would not fit (results.md lists them)
        handles["variants"] = next(h for h in lines if h.get_label() in variants)
        order.append("variants")
        labels.append(f"{len(variants)} variants (results.md)")
    fig.legend([handles[m] for m in order], labels, fontsize=8, loc="center right")
    fig.suptitle(f"{summary.get('model', '')}: sparse vs dense on RULER (vLLM-CPU)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out_dir: Path, rows: list[dict], meta: dict) -> dict:
    summary = summarize(rows, meta)
    out_dir = Path(out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "results.md").write_text(markdown(summary))
    if summary["cells"]:
        plot(summary, out_dir / "accuracy.png")
    return summary
