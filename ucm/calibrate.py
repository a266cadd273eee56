"""`ucm calibrate`: learn GSA-on-device's hash projections from the model's own queries and keys.

Random orthogonal projections preserve angles only on average. Here each layer's projection W
[D, bits] is trained so that hamming similarity ranks keys the way attention does: queries and
keys come from real prefills; a soft sign (tanh) makes codes differentiable, and the loss is
a cross-entropy between the true attention mass of each candidate block and a softmax over
the blocks' soft hash similarity (the best token's, summed over heads, as the scorer ranks).
W starts from the random orthogonal projection ucm uses by default, so training only moves
away from it when that helps. The result is saved in the format `hash_weight_type: "trained"`
loads, together with a per-model JSON pointing at it, and
judged against the random projection on held-out prompts by block-selection recall.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from ucm.hf_runner import RunObserver
from ucm.sparse.hashing import random_orthogonal_hash, save_trained_hash


class QKCollector(RunObserver):
    """Post-RoPE queries (from the last quarter of each prompt) and keys, per layer and prompt."""

    def __init__(self, queries_per_prompt: int, seed: int = 0) -> None:
        self.queries_per_prompt = queries_per_prompt
        self.gen = torch.Generator().manual_seed(seed)
        self.data: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def on_prefill(self, layer: int, query: torch.Tensor, key: torch.Tensor) -> None:
        n = query.shape[0]
        start = (3 * n) // 4
        pick = start + torch.randperm(n - start, generator=self.gen)[: self.queries_per_prompt]
        # keys before every picked query: what a decode query at that point could attend to
        self.data.setdefault(layer, []).append((query[pick].float().clone(), key[:start].float().clone()))


def mean_keys(collector: QKCollector, layers: int) -> torch.Tensor:
    """The mean collected key per layer and KV head [layers, Hkv, D]: the `key_center` the
    norm_cosine scorer hashes keys around (`ucm.ops.hash_cosine`)."""
    return torch.stack([torch.cat([k for _, k in collector.data[layer]]).mean(0) for layer in range(layers)])


def block_targets(
    q: torch.Tensor, k: torch.Tensor, block_size: int, skip_first: int = 1, skip_last: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What selection should reproduce: for each query, the attention mass (summed over every
    head, as the hash scorer sums distances over heads) of each *candidate* block.

    `q` [nq, Hq, D] comes from after every key of `k` [n, Hkv, D] (so all keys are visible). The
    blocks selection always keeps (`must_select_blocks`: the first and the last two) carry most
    of the mass and are left out, so the loss is spent where the choice is made. Returns the
    per-head queries [Hq, nq, D], keys [Hq, nb * bs, D] and the target distribution [nq, nb']."""
    g = q.shape[1] // k.shape[1]
    nb = k.shape[0] // block_size
    if nb <= skip_first + skip_last:
        raise ValueError(
            f"{k.shape[0]} keys make {nb} blocks of {block_size}: too few to choose among; use longer "
            "prompts (--tokens)"
        )
    kk = k[: nb * block_size].repeat_interleave(g, dim=1).transpose(0, 1)  # [Hq, n, D]
    qq = q.transpose(0, 1)  # [Hq, nq, D]
    att = torch.softmax(qq @ kk.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)  # [Hq, nq, n]
    mass = att.sum(0).view(q.shape[0], nb, block_size).sum(-1)[:, skip_first : nb - skip_last]
    return qq, kk, mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)


def train_layer(
    samples: list[tuple[torch.Tensor, torch.Tensor]],
    init: torch.Tensor,
    steps: int,
    lr: float = 0.01,
    block_size: int = 32,
) -> tuple[torch.Tensor, float, float]:
    """Train one layer's projection so that hash similarity ranks *blocks* as attention does.

    The scorer's block similarity is the best token's similarity summed over heads; softly: soft
    codes (tanh with a temperature annealed towards the sign), a smooth max over each block's
    tokens, a softmax over candidate blocks, cross-entropy against the true block mass
    (`block_targets`). Returns (W, loss of the initial W, loss of the trained W), both at the
    schedule's final temperature so that they compare."""
    w = torch.nn.Parameter(init.clone())
    beta = torch.nn.Parameter(torch.tensor(4.0))
    opt = torch.optim.Adam([w, beta], lr=lr)
    bits = init.shape[1]
    prepared = [block_targets(q, k, block_size) for q, k in samples]
    final_tau = 0.2  # the soft sign at the end of the schedule (1.0 -> 0.2)

    def loss_at(weight: torch.Tensor, tau: float) -> torch.Tensor:
        total = torch.zeros(())
        for qq, kk, target in prepared:
            hq = torch.tanh(qq @ weight / tau)
            hk = torch.tanh(kk @ weight / tau)
            sim = (hq @ hk.transpose(1, 2)).sum(0) / bits  # [nq, n]: summed over heads, like the scorer
            nq, n = sim.shape
            score = torch.logsumexp(8.0 * sim.view(nq, n // block_size, block_size), dim=-1) / 8.0  # smooth max
            score = score[:, 1 : n // block_size - 2]
            total = total - (target * torch.log_softmax(beta * score, dim=-1)).sum(-1).mean()
        return total / len(prepared)

    with torch.no_grad():
        first = float(loss_at(w, final_tau))
    for step in range(steps):
        tau = 1.0 - (1.0 - final_tau) * step / max(steps - 1, 1)  # sharpen the soft sign towards the hard one
        opt.zero_grad()
        loss_at(w, tau).backward()
        opt.step()
        with torch.no_grad():  # keep the columns on the unit sphere: only directions matter for signs
            w.div_(w.norm(dim=0, keepdim=True).clamp(min=1e-6))
    with torch.no_grad():
        last = float(loss_at(w, final_tau))
    return w.detach().clone(), first, last


def run_calibrate(
    out_dir: Path,
    prompts: int = 4,
    heldout: int = 2,
    tokens: int = 1500,
    steps: int = 100,
    queries_per_prompt: int = 64,
    ratio: float = 0.3,
    block_size: int = 32,
    seed: int = 0,
    model: str | Path = "smollm2",
    base: dict | None = None,
    file_stem: str | None = None,
    announce_files: bool = True,
    score_method: str = "norm_cosine",
    keep_weights: bool = False,
) -> dict:
    """Train `model`'s hash projections (a packaged model's name or a local HF folder) and judge
    them against random ones on held-out prompts. The JSON written next to the weights is `base`
    (default: the model's shipped JSON, else the engine's generic fallback) with the trained W;
    files are named `<file_stem>_trained_hash.pt` / `<config stem>_trained.json` (default: the
    model's registry key / its per-model JSON's stem, so SmolLM2's keep their names).
    `announce_files=False` leaves out the closing "wrote ..." line (`ucm configure` writes its
    own files from these). The mean key per layer and KV head is measured on the training
    prompts and saved with W; the JSON scores with `score_method` ("norm_cosine": centred,
    norm-weighted estimates of q . k; "hamming": summed distances). `keep_weights` keeps the
    base JSON's trained W (no training; e.g. to add the mean keys to a file that has none)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ucm.demo import needle_prompt
    from ucm.hf_runner import PagedHFRunner
    from ucm.models import per_model_data, resolve_model
    from ucm.ops import get_ops
    from ucm.profile import SelectionProfiler
    from ucm.sparse.gsa_on_device import build_from_model_config

    t0 = time.perf_counter()
    ops = get_ops()
    ref = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(ref.path)
    hf_model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32)
    prompt_ids = [needle_prompt(tok, tokens, 0.5, seed=1000 + i)[0] for i in range(prompts + heldout)]
    runner = PagedHFRunner(hf_model, tok, ops, block_size=block_size, max_tokens=max(map(len, prompt_ids)) + 64)
    shapes = runner.shapes
    if base is None:
        base = per_model_data(ref, shapes.num_layers, shapes.head_dim, shapes.block_size)
    if base.get("is_mla"):
        raise ValueError(f"{ref.name}: calibrating MLA models (two projections per layer) is not supported")
    kept = None
    if keep_weights:
        from ucm.config.loader import load_model_config
        from ucm.sparse.hashing import hash_projections

        if base.get("hash_weight_type") != "trained":
            raise ValueError(f"{ref.name}: --keep-weights needs a base JSON with trained projections")
        kept = [ws[0] for ws in hash_projections(load_model_config(base))]
    # training starts from random W
    base = dict(base, hash_weight_type="random", hash_weight=None, hash_score_method=score_method)
    layers, dim, bits = base["num_hidden_layers"], base["head_dim"], base["hash_bits"]

    collector = QKCollector(queries_per_prompt, seed)
    for ids in tqdm(prompt_ids[:prompts], desc="collecting q/k", unit="prompt", file=sys.stderr):
        runner.prefill(ids, observers=[collector])
    weights, losses = kept or [], []
    for layer in tqdm(range(0 if kept else layers), desc="training", unit="layer", file=sys.stderr):
        init = random_orthogonal_hash(dim, bits, seed * 1_000_003 + layer * 7)  # the factory's random W
        w, first, last = train_layer(collector.data[layer], init, steps, block_size=block_size)
        weights.append(w)
        losses.append((first, last))
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_file = out_dir / f"{file_stem or ref.key}_trained_hash.pt"
    save_trained_hash(weight_file, weights, mean_keys(collector, layers))
    # the file to deploy: the base JSON (its dense layers and thresholds) with the trained W
    cfg_file = out_dir / f"{file_stem or ref.config_stem}_trained.json"
    cfg_file.write_text(json.dumps(dict(base, hash_weight_type="trained", hash_weight=weight_file.name), indent=2))
    # the held-out comparison judges every layer: both projections with every layer sparse
    random_cfg = dict(base, top_k_ratio_per_layer=[ratio] * layers, gpu_seq_len_threshold=0)
    trained_cfg = dict(random_cfg, hash_weight_type="trained", hash_weight=str(weight_file.resolve()))

    # held-out prompts: the same selector with random vs trained projections, judged on real attention
    merged: dict[str, dict[int, list]] = {}
    for ids in tqdm(prompt_ids[prompts:], desc="held-out", unit="prompt", file=sys.stderr):
        state = runner.prefill(ids)
        methods = {
            "random": build_from_model_config(random_cfg, runner.shapes, ops, seed=seed),
            "trained": build_from_model_config(trained_cfg, runner.shapes, ops),
        }
        prof = SelectionProfiler(methods, ops)
        runner.decode(state, None, 6, observers=[prof])
        prof.close_step()
        for name, per_layer in prof.samples.items():
            for layer, vals in per_layer.items():
                merged.setdefault(name, {}).setdefault(layer, []).extend(vals)
    judge = SelectionProfiler({}, ops)
    judge.samples = merged
    summary = judge.summary()
    result = {
        "model": ref.label,
        "model_name": ref.name,
        "bits": bits,
        "train_prompts": prompts,
        "heldout_prompts": heldout,
        "prompt_tokens": tokens,
        "steps": 0 if kept else steps,
        "kept_weights": bool(kept),
        "score_method": score_method,
        "ratio": ratio,
        "block_size": block_size,
        "loss_start_end_per_layer": losses,
        "heldout": summary,
        "weights": weight_file.name,
        "config": cfg_file.name,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out_dir / "calibration.json").write_text(json.dumps(result, indent=2))
    r, t = summary["random"]["sparse_layers_mean"], summary["trained"]["sparse_layers_mean"]
    print(
        f"held-out oracle-normalised recall at ratio {ratio}, {bits} bits: random {r['oracle_normalised_recall']:.3f}"
        f" -> trained {t['oracle_normalised_recall']:.3f}; output error {r['output_error']:.3f} -> "
        f"{t['output_error']:.3f}"
    )
    if announce_files:
        print(f"wrote {weight_file}, {cfg_file} (use it as GSAOnDevice.config_file) and {out_dir / 'calibration.json'}")
    return result


def add_parser(sub) -> None:
    from ucm.profile import add_model_argument

    p = sub.add_parser("calibrate", help="train GSA-on-device hash projections on the model's own q/k (CPU)")
    add_model_argument(p)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--prompts", type=int, default=4, help="training prompts")
    p.add_argument("--heldout", type=int, default=2, help="held-out prompts for the random-vs-trained comparison")
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps per layer")
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument(
        "--score-method",
        choices=["norm_cosine", "hamming"],
        default="norm_cosine",
        help="the JSON's hash_score_method: centred, norm-weighted estimates of q . k (keys minus the "
        "measured mean key) or summed Hamming distances",
    )
    p.add_argument(
        "--keep-weights",
        action="store_true",
        help="keep the model JSON's trained projections (no training): measure and add the mean keys only",
    )
    p.set_defaults(handler=_handle)


def _handle(args) -> int:
    from ucm.profile import check_model_argument

    check_model_argument(args.model, "calibrate")
    run_calibrate(
        args.out_dir,
        args.prompts,
        args.heldout,
        args.tokens,
        args.steps,
        ratio=args.ratio,
        model=args.model,
        score_method=args.score_method,
        keep_weights=args.keep_weights,
    )
    return 0
