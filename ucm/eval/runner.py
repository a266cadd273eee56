"""`ucm eval`: RULER tasks through real vLLM, dense and every sparse setting, scored and tabled.

Why it is affordable on a CPU: prefill is dense for every method, so it is computed once. The
dense engine of a length runs first with a KV store (`ucm.store`, POSIX directory) attached;
it dumps every prompt's blocks as they fill. Each sparse setting then starts a fresh engine on
the same store, whose scheduler finds the prompts' blocks there and loads them instead of
recomputing them; only the last partial block and the decode run. The sparse scorers see the
loaded keys exactly as if they had been written (tests/test_vllm_store.py checks that the
tokens match a computed prefill).

Results are appended to `predictions.jsonl` one cell (length x setting x task) at a time, so
an interrupted run resumes where it stopped; `summary.json`, `results.md` and `accuracy.png`
are rebuilt from all finished cells at the end of every run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ucm.config.copy_layer_defaults import REPRESENTATION_KEYS
from ucm.methods import find_method, method_key_values, method_names

logger = logging.getLogger("ucm.eval")

DENSE = "dense"
DEFAULT_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_2", "vt", "qa_1")
DEFAULT_RATIOS = (0.1, 0.2, 0.3)
BLOCK_SIZE = 32
SHIPPED_MODEL_CONFIG = "SmolLM2-135M-Instruct"  # the default model's per-model JSON


@dataclass(frozen=True)
class Setting:
    """Dense, or one sparse method at one keep ratio."""

    method: str
    ratio: float | None = None
    dense_layers: tuple[int, ...] = ()  # windowed methods: layers kept dense (per-model JSON methods: its own)
    retrieval_stride: int | None = None  # strided methods: None = ucm's default (`EVAL_RETRIEVAL_STRIDE`)
    hash_config: str | None = None  # per-model JSON methods: "random", or a per-model JSON instead of the shipped one
    hash_weights: str | None = None  # the hash_weight_type of `hash_config` ("random" / "trained"); None: shipped
    method_keys: tuple[tuple[str, str], ...] = ()  # --method-key: (config key, JSON value) set on the method
    model_config: str | None = SHIPPED_MODEL_CONFIG  # the evaluated model's shipped per-model JSON (name), if any
    copy_layers: tuple[int, ...] = ()  # copying layers: groups of 2 (ESA, GSA), a larger budget (GSA, KVStar)

    @property
    def name(self) -> str:
        """The method as results name it: "ESA+dense" when it keeps dense layers, "ESA+dense/s4"
        when it retrieves every 4 steps instead of the default, "GSAOnDevice+random" /
        "GSAOnDevice+trained" with hash projections other than the shipped JSON's, "GSA+dense+copy"
        with the model's copying layers in groups of 2 and whole blocks elsewhere (ESA, GSA) and
        with a larger share of the budget in those layers (GSA, KVStar)."""
        name = f"{self.method}+dense" if self.dense_layers else self.method
        if self.copy_layers:
            name += "+copy"
        if self.hash_config is not None:
            name = f"{name}+{self.hash_weights}"
        if self.method_keys:
            name += "[" + ",".join(f"{k}={v}" for k, v in self.method_keys) + "]"
        return name if self.retrieval_stride is None else f"{name}/s{self.retrieval_stride}"

    @property
    def method_key_values(self) -> dict[str, Any]:
        """`method_keys` as the config values they set."""
        return {k: json.loads(v) for k, v in self.method_keys}

    @property
    def keeps_model_json(self) -> bool:
        """A method with a per-model JSON (GSA on device): it keeps that JSON's dense layers."""
        spec = find_method(self.method)
        return spec is not None and spec.model_json

    @property
    def label(self) -> str:
        return DENSE if self.method == DENSE else f"{self.name}@{self.ratio:g}"

    def extra_config(self, workdir: Path) -> dict:
        from ucm.demo import method_config

        if self.method == DENSE:
            return {}
        model_config = self.hash_config
        if model_config == RANDOM_HASH:
            from ucm.config.loader import model_config_data

            model_config = model_config_data(self.model_config, random_hash=True)
        elif model_config is None:
            model_config = self.model_config  # the evaluated model's shipped JSON (GSA on device reads it)
        config = method_config(
            self.method,
            float(self.ratio),
            workdir,
            self.dense_layers,
            self.retrieval_stride,
            model_config,
            self.copy_layers,
            self._num_layers(),
        )
        body, spec = config[self.method], find_method(self.method)
        if not self.copy_layers:
            # without "+copy": the config's default groups everywhere and one ratio in every sparse layer,
            # stated, or an engine serving a model with measured copying layers would run those
            # (`ucm.config.copy_layer_defaults`)
            if spec.takes_copy_groups:
                body.setdefault(
                    "blk_repre_inner_token_merge", spec.config.model_fields["blk_repre_inner_token_merge"].default
                )
            if spec.copy_layer_boost > 1:
                body.setdefault("copy_layer_boost", 1.0)
        body.update(self.method_key_values)
        return {"ucm_sparse_config": config}

    def _num_layers(self) -> int:
        """The evaluated model's layer count, from its per-model JSON, where "+copy" needs it (0 elsewhere)."""
        if not self.copy_layers or self.model_config is None:
            return 0
        from ucm.config.loader import load_model_config

        return load_model_config(self.model_config).config.num_hidden_layers


RANDOM_HASH = "random"  # --hash-config random: the shipped JSON with random orthogonal projections


def _own_json(setting: Setting) -> bool:
    """A per-model JSON method run with a JSON file of its own (--hash-config JSON), not the
    model's shipped one."""
    return setting.hash_config is not None and setting.hash_config != RANDOM_HASH


def settings_grid(
    methods: Iterable[str],
    ratios: Iterable[float],
    dense_layers: Iterable[int] = (),
    retrieval_stride: int | None = None,
    hash_config: str | Path | None = None,
    method_keys: dict[str, Any] | None = None,
    model_config: str | None = SHIPPED_MODEL_CONFIG,
    copy_layers: Iterable[int] = (),
) -> list[Setting]:
    """Dense first (its engine fills the store the others load from), then method x ratio.
    `dense_layers` go to the windowed methods (a method with a per-model JSON, GSA on device,
    keeps that JSON's), `retrieval_stride` to the strided ones (the registry's `strided`: ESA
    and KVStar); `hash_config` adds every per-model JSON method at every ratio with other hash
    projections: "random" (the shipped JSON, random orthogonal W) or a per-model JSON (e.g. the
    one `ucm calibrate` writes), named "<method>+<its hash_weight_type>". `method_keys` (config key
    -> value) are set on every sparse method of the grid, which must all have those keys; the
    settings are named "<method>[key=value,...]". `model_config` names the evaluated model's
    shipped per-model JSON (default: SmolLM2's; None: the model has none). `copy_layers` go to the
    methods that run them (`MethodSpec.takes_copy_layers`: groups of 2 tokens there for ESA and GSA,
    `ucm.methods.copy_layer_keys`; a larger share of the budget there for GSA and KVStar,
    `copy_layer_budget_keys`), unless `method_keys` set their group keys."""
    dense_layers = tuple(dense_layers)
    copy_layers = tuple(copy_layers)
    if REPRESENTATION_KEYS & set(method_keys or {}):
        copy_layers = ()  # the keys asked for say how the layers group
    if copy_layers and "copy_layer_boost" in (method_keys or {}) and "layer_sparse_ratio" not in method_keys:
        # "+copy" settings carry their budgets, computed with the method's default boost
        raise ValueError(
            "--method-key copy_layer_boost with the model's copying layers: set layer_sparse_ratio for the "
            "budgets you want, or run --copy-layers none (the engine then applies that boost itself)"
        )
    variant = None
    if hash_config is not None:
        from ucm.config.loader import load_model_config

        if str(hash_config) == RANDOM_HASH:
            hash_config, variant = RANDOM_HASH, RANDOM_HASH
        else:
            hash_config = str(Path(hash_config).resolve())
            variant = load_model_config(hash_config).config.hash_weight_type  # also: the file and its W load
    if retrieval_stride is not None and retrieval_stride < 1:
        raise ValueError(f"retrieval_stride {retrieval_stride} must be >= 1")
    keys = tuple(sorted((k, json.dumps(v)) for k, v in (method_keys or {}).items()))
    out = [Setting(DENSE, model_config=model_config)]
    for m in methods:
        if m == DENSE:
            continue
        spec = find_method(m)
        if spec is None:
            raise ValueError(f"unknown method {m!r}; valid: {DENSE}, {', '.join(method_names())}")
        unknown = [k for k, _ in keys if k not in spec.config.model_fields]
        if unknown:
            raise ValueError(f"{m} has no config key {', '.join(map(repr, unknown))} (--method-key)")
        for r in ratios:
            if not 0 < r <= 1:
                raise ValueError(f"ratio {r} must be in (0, 1]")
            out.append(
                Setting(
                    m,
                    float(r),
                    () if spec.model_json else dense_layers,
                    retrieval_stride if spec.strided else None,
                    method_keys=keys,
                    model_config=model_config,
                    copy_layers=copy_layers if spec.takes_copy_layers else (),
                )
            )
    if hash_config is not None:
        out += [
            Setting(m, float(r), hash_config=hash_config, hash_weights=variant, model_config=model_config)
            for m in method_names(model_json=True)
            for r in ratios
        ]
    return out


@dataclass
class CellResult:
    length: int
    task: str
    setting: str
    method: str
    ratio: float | None
    index: int
    prediction: str
    score: float
    prompt_tokens: int
    retrieval_stride: int | None = None  # set when the setting overrides ucm's default
    dense_layers: list[int] | None = None  # the layers the setting kept dense (GSA on device: its JSON's)
    hash_weights: str | None = (
        None  # GSA on device with other projections than the shipped JSON's: "random" / "trained"
    )
    token_ids: list[int] | None = None  # the generated token ids (the report finds where sparse leaves dense)
    needle_spans: list[dict] | None = None  # each expected value's [token_start, token_end) in the prompt
    needle_blocks: list[int] | None = None  # the KV blocks (token // block size) holding those spans
    method_keys: dict[str, Any] | None = None  # --method-key values the setting set on the method


class Results:
    """predictions.jsonl: one line per sample; a (length, setting, task) cell is done when all
    its samples are there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict] = []
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    self.rows.append(json.loads(line))

    def indices(self, length: int, setting: str, task: str) -> set[int]:
        return {
            r["index"] for r in self.rows if r["length"] == length and r["setting"] == setting and r["task"] == task
        }

    def done(self, length: int, setting: str, task: str, n: int) -> bool:
        return len(self.indices(length, setting, task)) >= n

    def add(self, rows: list[CellResult]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for r in rows:
                f.write(json.dumps(asdict(r)) + "\n")
                self.rows.append(asdict(r))


def _needles(tokenizer, sample, prompt_token_ids) -> tuple[list[dict] | None, list[int] | None]:
    """(spans, blocks) of the sample's expected values in its prompt, from the tokenizer's character
    offsets; (None, None) when the tokenizer's ids are not the ones the engine ran (then a token
    index would point at the wrong place)."""
    from ucm.eval.divergence import needle_spans, span_blocks

    enc = tokenizer(sample.prompt, return_offsets_mapping=True)
    if prompt_token_ids is not None and list(enc.input_ids) != list(prompt_token_ids):
        logger.warning("sample %d of %s: the tokenizer's ids differ from the engine's", sample.index, sample.task)
        return None, None
    spans = needle_spans(sample.prompt, sample.answers, enc.offset_mapping)
    return spans, span_blocks(spans, BLOCK_SIZE)


def _engine(model_path: str, length: int, extra: dict, kv_space_gib: int, max_num_seqs: int):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vllm import LLM

    from ucm.integration.vllm.offline import connector_config

    return LLM(
        model=model_path,
        dtype="float32",
        block_size=BLOCK_SIZE,
        max_model_len=length,
        enforce_eager=True,
        distributed_executor_backend="uni",
        kv_transfer_config=connector_config(extra),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=2048,
        seed=0,
    )


def run_eval(
    out_dir: Path,
    tasks: Iterable[str] = DEFAULT_TASKS,
    lengths: Iterable[int] = (2048,),
    samples: int = 25,
    methods: Iterable[str] | None = None,
    ratios: Iterable[float] = DEFAULT_RATIOS,
    model: str = "smollm2",
    seed: int = 42,
    store_dir: Path | None = None,
    kv_space_gib: int = 4,
    max_num_seqs: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
    dense_layers: Iterable[int] = (),
    retrieval_stride: int | None = None,
    hash_config: str | Path | None = None,
    method_keys: dict[str, Any] | None = None,
    copy_layers: Iterable[int] = (),
) -> dict:
    """Run every missing cell, then rebuild the summary; returns the summary dict. `methods`
    defaults to every registered method."""
    from ucm.models import MODELS

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODELS)}")
    dense_layers = tuple(dense_layers)
    methods = method_names() if methods is None else methods
    tasks, lengths, grid = (
        list(tasks),
        sorted(set(lengths)),
        settings_grid(
            methods,
            ratios,
            dense_layers,
            retrieval_stride,
            hash_config,
            method_keys,
            MODELS[model].model_config,
            copy_layers,
        ),
    )
    if MODELS[model].model_config is None:
        # the per-model JSON methods (and --hash-config random) read the model's shipped JSON; a
        # model without one runs them only with --hash-config JSON (e.g. what `ucm configure`
        # wrote for it; `--methods dense` leaves out the settings that need the shipped one)
        wrong = sorted({s.name for s in grid if (s.keeps_model_json or s.hash_config is not None) and not _own_json(s)})
        if wrong:
            raise ValueError(
                f"{', '.join(wrong)} need(s) a per-model JSON for {model!r}: pass one with --hash-config JSON "
                f"(`ucm configure --model {model}` writes one) and --methods dense, or run them on "
                f"{', '.join(m for m, spec in MODELS.items() if spec.model_config)}"
            )

    from tqdm import tqdm
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from ucm.demo import model_dense_layers
    from ucm.eval import ruler
    from ucm.eval.report import write_report
    from ucm.integration.vllm.offline import checked, close_engine, find_connector, posix_store
    from ucm.models import cache_dir, fetch_model

    for t in tasks:
        ruler.check_task(t)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = str(fetch_model(model))
    tok = AutoTokenizer.from_pretrained(model_path)
    results = Results(out_dir / "predictions.jsonl")
    meta = {
        "model": model,
        "seed": seed,
        "block_size": BLOCK_SIZE,
        "max_new_tokens_cap": max_new_tokens,
        "engine": "vllm-cpu (one process), float32, prefill computed once per prompt by the dense engine "
        "and loaded from a KV store by every sparse engine",
    }
    if dense_layers:
        meta["dense_layers"] = list(dense_layers)  # of the "+dense" settings
    if copy_layers := tuple(copy_layers):
        meta["copy_layers"] = list(copy_layers)  # of the "+copy" settings
    timings: dict[str, float] = {}
    previous = out_dir / "summary.json"
    if previous.exists():  # engine statistics of earlier (resumed) runs are kept, not lost
        old = json.loads(previous.read_text())
        if old.get("model", model) != model:
            raise ValueError(f"{out_dir} holds results of model {old['model']!r}, not {model!r}: use another --out-dir")
        timings.update(old.get("seconds_per_engine", {}))
        for key in ("blocks_read", "store", "prefill"):
            if old.get(key):
                meta[key] = dict(old[key])
        for key in ("dense_layers", "copy_layers"):
            if old.get(key) and key not in meta:
                meta[key] = old[key]
    steps = [(L, s) for L in lengths for s in grid if not all(results.done(L, s.label, t, samples) for t in tasks)]
    bar = tqdm(steps, desc="ucm eval", unit="engine", disable=not progress)
    for length in lengths:
        todo = [s for s in grid if not all(results.done(length, s.label, t, samples) for t in tasks)]
        if not todo:
            continue
        data = {t: ruler.generate(t, length, samples, tok, seed=seed) for t in tasks}
        store = Path(store_dir) if store_dir else cache_dir() / "eval-store" / f"{model}-{length}"
        store_extra = posix_store(store)
        if todo[0].method != DENSE:  # resuming: the dense engine's prompts may be gone; recompute what is missing
            logger.info(
                "dense cells of length %d are done; sparse engines will recompute any prefix not in %s", length, store
            )
        for setting in todo:
            bar.set_postfix_str(f"{length} tokens, {setting.label}")
            work = out_dir / "configs"
            work.mkdir(exist_ok=True)
            extra = {**store_extra, **setting.extra_config(work)}
            llm = _engine(model_path, length, extra, kv_space_gib, max_num_seqs)
            try:
                t0 = time.perf_counter()
                setting_dense = (
                    list(setting.dense_layers)
                    if setting.dense_layers
                    else model_dense_layers(
                        setting.model_config if setting.hash_config in (None, RANDOM_HASH) else setting.hash_config
                    )
                    if setting.keeps_model_json
                    else None
                )
                for t in tasks:  # one task at a time: its rows are saved as soon as it is done
                    if results.done(length, setting.label, t, samples):
                        continue
                    have = results.indices(
                        length, setting.label, t
                    )  # more samples than an earlier run: only the new ones
                    todo_samples = [s for s in data[t] if s.index not in have]
                    params = [
                        SamplingParams(temperature=0, max_tokens=min(s.max_new_tokens, max_new_tokens or 1 << 30))
                        for s in todo_samples
                    ]
                    # vLLM's own bar counts the prompts inside an engine (a dense 8K engine runs for minutes)
                    outs = checked(llm.generate([s.prompt for s in todo_samples], params, use_tqdm=progress))
                    texts = [o.outputs[0].text for o in outs]
                    scores = ruler.score_samples(t, texts, todo_samples)
                    needles = [_needles(tok, s, o.prompt_token_ids) for s, o in zip(todo_samples, outs, strict=True)]
                    results.add(
                        [
                            CellResult(
                                length,
                                t,
                                setting.label,
                                setting.name,
                                setting.ratio,
                                s.index,
                                text,
                                sc,
                                s.num_tokens,
                                setting.retrieval_stride,
                                setting_dense,
                                setting.hash_weights,
                                list(o.outputs[0].token_ids),
                                *needle,
                                setting.method_key_values or None,
                            )
                            for s, o, text, sc, needle in zip(todo_samples, outs, texts, scores, needles, strict=True)
                        ]
                    )
                timings[f"{length}/{setting.label}"] = time.perf_counter() - t0
                conn = find_connector()
                if conn is not None:
                    conn.flush_store()
                    snap = conn.runtime.snapshot() if conn.runtime is not None else None
                    if snap and sum(snap["total"]):
                        meta.setdefault("blocks_read", {})[f"{length}/{setting.label}"] = sum(snap["kept"]) / sum(
                            snap["total"]
                        )
                    stored = conn.store_worker.snapshot() if conn.store_worker is not None else None
                    if stored is not None:
                        meta.setdefault("store", {})[f"{length}/{setting.label}"] = stored
                    # what `seconds_per_engine` includes: an engine that found no prompts in the
                    # store (the dense one; any engine of a resumed run) computed their prefill
                    meta.setdefault("prefill", {})[f"{length}/{setting.label}"] = (
                        "loaded" if stored and stored["loaded_blocks"] else "computed"
                    )
            finally:
                del llm
                conn = None
                close_engine()
            bar.update(1)
        if store_dir is None:
            shutil.rmtree(store, ignore_errors=True)
    bar.close()
    meta["seconds_per_engine"] = timings
    return write_report(out_dir, results.rows, meta)


def add_parser(sub) -> None:
    from ucm.models import MODELS

    p = sub.add_parser("eval", help="RULER accuracy through real vLLM: dense vs each sparse method and ratio")
    p.add_argument(
        "--out-dir", type=Path, required=True, help="predictions.jsonl, summary.json, results.md, accuracy.png"
    )
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--lengths", nargs="+", type=int, default=[2048], help="prompt lengths in tokens")
    p.add_argument("--samples", type=int, default=25, help="samples per task and length")
    p.add_argument(
        "--methods", nargs="+", default=None, help=f"sparse methods (default: all of {' '.join(method_names())})"
    )
    p.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    p.add_argument(
        "--model",
        default="smollm2",
        choices=sorted(MODELS),
        help="a packaged model (ucm.models.MODELS, docs/accuracy.md); its weights' pip packages must be "
        "installed. Per-model JSON methods (GSA on device) run with the model's shipped JSON (every "
        "packaged model has one), or with --methods dense --hash-config JSON (another JSON, e.g. "
        "from `ucm configure`)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap RULER's tokens_to_generate (speed)")
    p.add_argument("--kv-space-gib", type=int, default=4, help="vLLM-CPU KV cache size")
    p.add_argument("--max-num-seqs", type=int, default=8, help="vLLM's decode batch")
    p.add_argument(
        "--dense-layers",
        choices=["model", "none"],
        default="model",
        help="windowed methods keep the model JSON's dense layers (as the per-model JSON methods do; "
        "results name them ESA+dense ...) or run every layer sparse; a model without a shipped "
        "JSON runs every layer sparse",
    )
    p.add_argument(
        "--copy-layers",
        choices=["model", "none"],
        default="model",
        help="ESA and GSA keep groups of 2 tokens in the copying layers the model JSON measured "
        "(`copy_layers`, `ucm configure`) and whole blocks elsewhere, GSA and KVStar give those layers a "
        "larger share of the same budget (copy_layer_boost; results name them GSA+dense+copy ...), as the "
        "engine does by itself; or their defaults everywhere (one group size, one ratio); a model whose "
        "JSON measured none keeps the defaults",
    )
    p.add_argument(
        "--retrieval-stride",
        type=int,
        default=None,
        help=f"strided methods ({', '.join(method_names(strided=True))}) retrieve every N decode steps "
        "instead of every step (ucm's default); results name them ESA+dense/sN ... and leave them "
        "out of the headline figure",
    )
    p.add_argument(
        "--hash-config",
        default=None,
        metavar="JSON|random",
        help=f"also run the per-model JSON methods ({', '.join(method_names(model_json=True))}) with other "
        "hash projections: 'random' (the shipped JSON with random orthogonal W) or a per-model JSON "
        "such as `ucm calibrate` writes (results name them <method>+random / <method>+trained)",
    )
    p.add_argument(
        "--method-key",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set a config key of every sparse method run (JSON value), e.g. bound_guard_top=8; "
        "repeatable; results name them ESA+dense[bound_guard_top=8] ... (variants, not headline)",
    )
    p.add_argument(
        "--store-dir",
        type=Path,
        default=None,
        help="where the dense engine's prompt KV is kept for the sparse engines (default: cache, removed after)",
    )
    p.set_defaults(handler=_handle)


def _handle(args) -> int:
    from ucm.demo import model_copy_layers, model_dense_layers
    from ucm.models import MODELS

    model_json = MODELS[args.model].model_config
    try:
        method_keys = method_key_values(args.method_key)
    except ValueError as exc:
        raise SystemExit(f"ucm eval: {exc}") from None
    summary = run_eval(
        args.out_dir,
        args.tasks,
        args.lengths,
        args.samples,
        args.methods,
        args.ratios,
        model=args.model,
        seed=args.seed,
        store_dir=args.store_dir,
        kv_space_gib=args.kv_space_gib,
        max_num_seqs=args.max_num_seqs,
        max_new_tokens=args.max_new_tokens,
        dense_layers=model_dense_layers(model_json) if args.dense_layers == "model" and model_json else (),
        retrieval_stride=args.retrieval_stride,
        hash_config=args.hash_config,
        method_keys=method_keys,
        copy_layers=model_copy_layers(model_json) if args.copy_layers == "model" and model_json else (),
    )
    from ucm.eval.report import markdown

    print(markdown(summary))
    return 0
