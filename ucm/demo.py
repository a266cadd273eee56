"""The needle demo: one long prompt, dense and every registered sparse method side by side.

A passkey sits deep in a few thousand tokens of filler; the small real model (SmolLM2-135M,
float32, on the CPU) is asked for it. One dense prefill is shared; each method then decodes
from it through ucm's selection and paged attention, and the demo reports the answers, the
blocks read per step out of the total, and decode tokens/s.

This module holds the demo's pieces (the needle prompt, the methods' demo configs, the result
rows), which eval, profile and calibrate share, and the core engine (`run_demo`). The same demo
through real vLLM is `ucm.demo_vllm`; the `ucm demo` command, which picks the engine, is in
`ucm.cli`.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

#: the per-model JSON of the model the demo, eval and profile run (methods with `model_json`)
DEMO_MODEL_CONFIG = "SmolLM2-135M-Instruct"
FILLER = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river flows past the old mill.",
    "A quiet wind moves over the hills.",
    "Bread is baked early in the morning.",
    "The train leaves the station on time.",
    "Birds sing in the tall trees.",
)


@dataclass
class DemoRow:
    method: str
    answer: str
    correct: bool
    blocks_read_per_step: float  # per layer, averaged over decode steps and layers
    blocks_total_per_step: float
    decode_tokens_per_s: float
    generated_tokens: int


def filler_sentences(rng: random.Random) -> Iterator[str]:
    """The built-in haystack: `FILLER`'s sentences drawn at random, without end."""
    while True:
        yield rng.choice(FILLER)


def needle_prompt(
    tokenizer,
    target_tokens: int,
    depth: float,
    seed: int,
    haystack: Callable[[random.Random], Iterator[str]] = filler_sentences,
) -> tuple[list[int], str]:
    """Chat-formatted token ids of a haystack with a magic number at `depth`, and the number.

    The assistant turn is started with "The special magic number is", so a model that found
    the needle answers with the number itself. `haystack(rng)` yields the sentences (drawing on
    the prompt's own random generator, after the number).
    """
    rng = random.Random(seed)
    secret = str(rng.randint(10000, 99999))
    needle = f" The special magic number is {secret}. "
    sentences: list[str] = []
    draw = haystack(rng)
    answer_prefix = tokenizer.encode("The special magic number is", add_special_tokens=False)
    while True:  # grow the haystack until the whole prompt reaches the target length
        sentences.extend(next(draw) for _ in range(20))
        cut = int(len(sentences) * depth)
        text = (
            "A special magic number is hidden in the following text. Remember it.\n\n"
            + " ".join(sentences[:cut])
            + needle
            + " ".join(sentences[cut:])
            + "\n\nWhat is the special magic number?"
        )
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids) + answer_prefix
        if len(ids) >= target_tokens:
            return ids, secret


def model_dense_layers(model_config: str | Path = DEMO_MODEL_CONFIG) -> list[int]:
    """The layers a per-model JSON keeps dense (ratio 1), chosen with `ucm profile`. ESA, GSA and
    KVStar take the same list as `dense_layers`, so every method spends its dense budget on the
    layers no block selection captures (docs/accuracy.md)."""
    from ucm.config.loader import load_model_config

    ratios = load_model_config(model_config).config.top_k_ratio_per_layer
    return [layer for layer, r in enumerate(ratios) if r >= 1]


def model_copy_layers(model_config: str | Path = DEMO_MODEL_CONFIG) -> list[int]:
    """The layers a per-model JSON measured to copy from the context (`copy_layers`, written by
    `ucm configure`; empty where it was not measured)."""
    from ucm.config.loader import load_model_config

    return list(load_model_config(model_config).config.copy_layers or ())


#: ESA and KVStar retrieve every decode step in ucm's own runs (their defaults since session 31;
#: UCM's are 5 and 8): a
#: selection made with an earlier step's query misses the blocks a later step copies from. On
#: RULER niah_single_2 at 2K (25 samples, ratio 0.3, dense layers 5-8), stride 4 scored 80 and
#: stride 2 84 against dense 96; stride 1 scored 96 for both (docs/accuracy.md).
EVAL_RETRIEVAL_STRIDE = 1


def method_config(
    name: str,
    ratio: float,
    workdir: Path | None = None,
    dense_layers: Sequence[int] = (),
    retrieval_stride: int | None = None,
    model_config: str | Path | dict | None = None,
    copy_layers: Sequence[int] = (),
    num_layers: int = 0,
) -> dict:
    """UCM-shaped config `{name: {...}}` of the registered method `name` at keep ratio `ratio`,
    with the settings its registry entry gives the demo (`MethodSpec.demo_config`).

    `dense_layers` go to the windowed methods, `copy_layers` (groups of 2 tokens there, whole
    blocks elsewhere: `ucm.methods.copy_layer_keys`) to those with per-layer groups (ESA, GSA),
    and a larger share of the budget there (`ucm.methods.copy_layer_budget_keys`, over the model's
    `num_layers`) to those whose `copy_layer_boost` defaults above 1 (GSA, KVStar);
    `retrieval_stride` (default
    `EVAL_RETRIEVAL_STRIDE`) to the strided ones. A method with a per-model JSON (GSA on device)
    reads its ratios there: without `workdir` it runs the shipped SmolLM2 JSON as it is; with
    it, a copy written there with its sparse layers averaging `ratio` (the JSON's per-layer shape
    kept), so all methods compare at one ratio. `model_config` (a path, a name or the JSON's
    data) replaces the shipped JSON, e.g. with the one `ucm calibrate` writes, or random projections
    (`ucm.config.loader.model_config_data(..., random_hash=True)`); `dense_layers`, when given,
    replace its dense layers in the copy (layer ablations).
    """
    from ucm.methods import DemoRequest, get_method

    stride = EVAL_RETRIEVAL_STRIDE if retrieval_stride is None else retrieval_stride
    request = DemoRequest(
        ratio,
        Path(workdir) if workdir is not None else None,
        tuple(dense_layers),
        stride,
        DEMO_MODEL_CONFIG,
        model_config,
        tuple(copy_layers),
        num_layers,
    )
    return {name: get_method(name).demo_config(request)}


def demo_methods() -> tuple[str, ...]:
    """Every registered method: what the demo, eval and profile run by default."""
    from ucm.methods import method_names

    return method_names()


def check_methods(methods: Sequence[str], flag: str) -> None:
    """SystemExit naming the unknown ones (and the valid ones) when `methods` names one not registered."""
    valid = demo_methods()
    bad = [m for m in methods if m not in valid]
    if bad or not methods:
        raise SystemExit(f"error: {flag}: unknown method(s) {bad or '(none given)'}; valid: {', '.join(valid)}")


def run_demo(
    tokens: int = 3000,
    depth: float = 0.5,
    ratio: float = 0.3,
    methods: Sequence[str] | None = None,
    max_new_tokens: int = 12,
    block_size: int = 16,
    backend: str | None = None,
    seed: int = 7,
    out: Path | None = None,
) -> list[DemoRow]:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ucm.hf_runner import PagedHFRunner
    from ucm.models import fetch_model
    from ucm.ops import get_ops
    from ucm.sparse.factory import build_sparse_method

    ops = get_ops(backend)
    path = fetch_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids, passkey = needle_prompt(tokenizer, tokens, depth, seed)
    runner = PagedHFRunner(
        model, tokenizer, ops, block_size=block_size, max_tokens=len(ids) + max_new_tokens + block_size
    )
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    print(
        f"prompt: {len(ids)} tokens, magic number {passkey} at depth {depth:.0%}; backend {ops.name}; "
        f"block size {block_size}; keep ratio {ratio}",
        flush=True,
    )
    t0 = time.perf_counter()
    state = runner.prefill(ids)
    print(f"dense prefill: {time.perf_counter() - t0:.1f} s (shared by every method)", flush=True)
    runner.decode(state, None, 3)  # warm-up: kernels built and caches touched before timing
    rows = []
    methods = demo_methods() if methods is None else tuple(methods)
    for name in tqdm(("dense", *methods), desc="decoding", unit="method", file=sys.stderr):
        method = None
        if name != "dense":
            method = build_sparse_method(method_config(name, ratio), runner.shapes, ops)
        res = runner.decode(state, method, max_new_tokens, stop)
        steps = max(len(res.tokens) - 1, 1) * runner.shapes.num_layers
        n_blocks = -(-len(ids) // block_size)
        rows.append(
            DemoRow(
                method=name,
                answer=res.text.strip(),
                correct=passkey in res.text,
                blocks_read_per_step=res.blocks_kept / steps if method else float(n_blocks),
                blocks_total_per_step=res.blocks_total / steps if method else float(n_blocks),
                decode_tokens_per_s=res.decode_tokens_per_s,
                generated_tokens=len(res.tokens),
            )
        )
        if method is not None:
            method.close()
    print_table(rows)
    if out is not None:
        write_rows(
            out,
            rows,
            {
                "engine": "core",
                "prompt_tokens": len(ids),
                "magic_number": passkey,
                "depth": depth,
                "ratio": ratio,
                "backend": ops.name,
                "block_size": block_size,
            },
        )
    return rows


def write_rows(out: Path, rows: list[DemoRow], meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    print(f"wrote {out}")


def print_table(rows: list[DemoRow]) -> None:
    dense = next((r for r in rows if r.method == "dense"), None)
    head = f"{'method':<16} {'answer':<28} {'ok':<3} {'blocks read/step':>17} {'tok/s':>7} {'vs dense':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        speed = r.decode_tokens_per_s / dense.decode_tokens_per_s if dense else float("nan")
        answer = (r.answer[:25] + "...") if len(r.answer) > 28 else r.answer
        read = f"{r.blocks_read_per_step:.1f}/{r.blocks_total_per_step:.0f}"
        print(
            f"{r.method:<16} {answer:<28} {'yes' if r.correct else 'no':<3} {read:>17} "
            f"{r.decode_tokens_per_s:>7.2f} {speed:>7.2f}x"
        )
