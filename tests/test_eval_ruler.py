"""RULER's synthetic tasks generated offline (ucm.eval.ruler), with SmolLM2's real tokenizer.

Every task at 2K tokens: prompts fit (prompt + tokens to generate <= length) and fill it,
answers are where the task puts them, generation is deterministic in the seed (also across
processes) and leaves the global RNGs alone; RULER's metrics on hand-written predictions;
the sentence splitter without NLTK data; the on-disk cache.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import re
import subprocess
import sys
import textwrap

import pytest

from ucm.eval import ruler
from ucm.eval.ruler import Sample

MISSING = ruler.missing_dependencies()
needs_ruler = pytest.mark.skipif(
    bool(MISSING), reason=f"the RULER tasks need {', '.join(MISSING)}: {ruler.INSTALL_HINT}"
)
LENGTH = 2048
N = 3
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "qa": 32}  # RULER's per task family


def family(task: str) -> str:
    return task.split("_")[0]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    transformers = pytest.importorskip("transformers", reason="needs the [test] extra (transformers)")
    from ucm.models import fetch_model

    try:
        path = fetch_model("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return transformers.AutoTokenizer.from_pretrained(path)


_GENERATED: dict[tuple[str, int, int], list[Sample]] = {}


def generated(tok, task: str, seed: int = 42, length: int = LENGTH) -> list[Sample]:
    key = (task, seed, length)
    if key not in _GENERATED:
        _GENERATED[key] = ruler.generate(task, length, N, tok, seed=seed, cache=False)
    return _GENERATED[key]


# --------------------------------------------------------------------------- generation


@needs_ruler
@pytest.mark.parametrize("task", ruler.TASKS)
def test_prompts_fill_the_length_and_end_with_the_answer_prefix(smollm2_tokenizer, task: str) -> None:
    tok = smollm2_tokenizer
    samples = generated(tok, task)
    assert [s.index for s in samples] == list(range(N))
    for s in samples:
        assert s.task == task
        assert s.max_new_tokens == TOKENS_TO_GENERATE[family(task)]
        assert s.num_tokens == len(tok(s.prompt)["input_ids"])
        assert s.num_tokens + s.max_new_tokens <= LENGTH
        assert s.prompt.endswith(s.answer_prefix) and s.answer_prefix.strip()
        assert s.answers and all(isinstance(a, str) and a for a in s.answers)
    fill = [s.num_tokens / LENGTH for s in samples]
    if family(task) == "qa":  # whole documents (~150 tokens, some far longer) are the unit
        assert min(fill) >= 0.75 and sum(fill) / len(fill) >= 0.85, fill
    else:
        assert min(fill) >= 0.85, fill


@needs_ruler
@pytest.mark.parametrize("task", [t for t in ruler.TASKS if t.startswith("niah")])
def test_niah_needle_values_are_in_the_context(smollm2_tokenizer, task: str) -> None:
    want = 4 if task in ("niah_multivalue", "niah_multiquery") else 1
    for s in generated(smollm2_tokenizer, task):
        body = s.prompt[: -len(s.answer_prefix)]
        question = body.rsplit("\n", 1)[-1]
        assert len(s.answers) == want
        for value in s.answers:
            assert value in body and value not in question


@needs_ruler
def test_vt_answers_form_the_assignment_chain(smollm2_tokenizer) -> None:
    for s in generated(smollm2_tokenizer, "vt"):
        assert len(s.answers) == 5 and all(re.fullmatch(r"[A-Z]{5}", v) for v in s.answers)
        value = re.search(r"\b(\d{5})\b", s.answer_prefix).group(1)  # the value asked about
        assert f"VAR {s.answers[0]} = {value}" in s.prompt
        for prev, var in itertools.pairwise(s.answers):
            assert f"VAR {var} = VAR {prev}" in s.prompt


@needs_ruler
def test_qa_gold_answer_is_in_the_documents(smollm2_tokenizer) -> None:
    for s in generated(smollm2_tokenizer, "qa_1"):
        assert any(a.lower() in s.prompt.lower() for a in s.answers)


@needs_ruler
@pytest.mark.parametrize("task", ruler.TASKS)
def test_deterministic_for_a_seed_and_different_across_seeds(smollm2_tokenizer, task: str) -> None:
    tok = smollm2_tokenizer
    first = generated(tok, task, seed=42)
    assert ruler.generate(task, LENGTH, N, tok, seed=42, cache=False) == first
    other = generated(tok, task, seed=43)
    assert all(a.prompt != b.prompt for a, b in zip(first, other, strict=True))
    if family(task) != "qa":  # a QA sample's question is the data set's index-th (as in RULER)
        assert [s.answers for s in first] != [s.answers for s in other]


@needs_ruler
def test_global_rng_states_are_left_alone(smollm2_tokenizer) -> None:
    import numpy as np

    random.seed(7)
    np.random.seed(7)
    want = random.random(), np.random.random()
    random.seed(7)
    np.random.seed(7)
    ruler.generate("niah_single_1", 1024, 1, smollm2_tokenizer, seed=3, cache=False)
    assert (random.random(), np.random.random()) == want


@needs_ruler
def test_chat_template_wraps_the_task_and_starts_the_answer(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    (s,) = ruler.generate("niah_single_2", LENGTH, 1, tok, template="chat", cache=False)
    head = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False, add_generation_prompt=True)
    assert s.prompt.startswith(head[: head.index("X")])
    assert s.prompt.endswith(head[head.index("X") + 1 :] + s.answer_prefix)
    assert s.answer_prefix == s.answer_prefix.strip()
    assert s.num_tokens == len(tok(s.prompt, add_special_tokens=False)["input_ids"])
    assert 0.85 * LENGTH <= s.num_tokens <= LENGTH - s.max_new_tokens
    (base,) = ruler.generate("niah_single_2", LENGTH, 1, tok, cache=False)
    assert base.answers == s.answers  # same draw, another wrapping


@needs_ruler
def test_qa_skips_questions_whose_documents_overflow(smollm2_tokenizer) -> None:
    # HotpotQA's first question brings ten documents (~1,350 tokens): it cannot fit in 1K,
    # where RULER's own script would retry forever
    samples = ruler.generate("qa_2", 1024, 2, smollm2_tokenizer, cache=False)
    assert [s.index for s in samples] == [0, 1]
    assert all(s.num_tokens + s.max_new_tokens <= 1024 for s in samples)


@needs_ruler
def test_length_too_small_is_an_error(smollm2_tokenizer) -> None:
    with pytest.raises(ValueError, match="room"):
        ruler.generate("niah_single_1", 100, 1, smollm2_tokenizer, cache=False)
    with pytest.raises(ValueError, match="does not fit"):
        ruler.generate("vt", 300, 1, smollm2_tokenizer, cache=False)  # its example alone is ~470


def test_unknown_task_lists_the_valid_ones() -> None:
    for call in (
        lambda: ruler.generate("niah_single_9", LENGTH, 1, None),
        lambda: ruler.score("niah_single_9", ["x"], []),
    ):
        with pytest.raises(ValueError) as e:
            call()
        assert all(t in str(e.value) for t in ruler.TASKS)


@needs_ruler
def test_cache_round_trip(smollm2_tokenizer, tmp_path, monkeypatch) -> None:
    tok = smollm2_tokenizer
    monkeypatch.setenv("UCM_CACHE_DIR", str(tmp_path))
    made = ruler.generate("vt", 1024, 2, tok, seed=5)
    files = list((tmp_path / "eval" / "ruler").glob("vt-L1024-n2-s5-*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 2

    def fail(*_args, **_kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(ruler, "_generate", fail)
    assert ruler.generate("vt", 1024, 2, tok, seed=5) == made
    with pytest.raises(AssertionError):
        ruler.generate("vt", 1024, 2, tok, seed=6)  # another key


# --------------------------------------------------------------------------- scoring


def sample(task: str, *answers: str) -> Sample:
    return Sample(task=task, index=0, prompt="...", answers=answers, answer_prefix="", num_tokens=3, max_new_tokens=8)


@needs_ruler
def test_score_exact_wrong_and_case_insensitive() -> None:
    s = sample("niah_single_1", "7339208")
    assert ruler.score("niah_single_1", [" 7339208."], [s]) == 100.0
    assert ruler.score("niah_single_1", ["7339209"], [s]) == 0.0
    assert ruler.score("niah_single_1", [None], [s]) == 0.0
    uuid = sample("niah_single_3", "cf36d58b-4737-4190-96da-1dac72ff5d2a")
    assert ruler.score("niah_single_3", ["CF36D58B-4737-4190-96DA-1DAC72FF5D2A"], [uuid]) == 100.0
    vt = sample("vt", "ABCDE", "FGHIJ")
    assert ruler.score("vt", ["abcde, fghij"], [vt]) == 100.0


@needs_ruler
def test_score_all_answers_counts_each_one() -> None:
    # string_match_all: the fraction of a sample's answers found, averaged over samples
    multi = sample("niah_multivalue", "1111111", "2222222", "3333333", "4444444")
    assert ruler.score("niah_multivalue", ["1111111 and 3333333"], [multi]) == 50.0
    vt = sample("vt", "AAAAA", "BBBBB", "CCCCC", "DDDDD", "EEEEE")
    assert ruler.score("vt", ["AAAAA BBBBB CCCCC"], [vt]) == 60.0
    three = sample("niah_multiquery", "1", "2", "3")
    assert ruler.score("niah_multiquery", ["1", "x"], [three, three]) == round(100 / 6, 2)
    assert ruler.score_samples("niah_multivalue", ["1111111", ""], [multi, multi]) == [25.0, 0.0]


@needs_ruler
def test_score_any_answer_for_qa() -> None:
    # string_match_part: a sample scores 100 when any reference is found
    q = sample("qa_1", "Denver Broncos", "the Broncos")
    assert ruler.score("qa_1", ["The Broncos won."], [q]) == 100.0
    assert ruler.score("qa_1", ["The Broncos won.", "Carolina"], [q, q]) == 50.0
    assert ruler.score("qa_2", ["Panthers"], [sample("qa_2", "yes")]) == 0.0


@needs_ruler
def test_score_rejects_mismatched_inputs() -> None:
    s = sample("vt", "ABCDE")
    with pytest.raises(ValueError):
        ruler.score("vt", ["a", "b"], [s])
    with pytest.raises(ValueError):
        ruler.score("vt", [], [])
    with pytest.raises(ValueError):
        ruler.score("qa_1", ["ABCDE"], [s])


# --------------------------------------------------------------------------- offline pieces


@needs_ruler
def test_sentence_splitter_without_nltk_data(smollm2_tokenizer, tmp_path) -> None:
    """A fresh process with an empty NLTK data path (and downloads forbidden) still splits
    sentences and makes niah essay samples; its vt/qa samples equal this process's."""
    empty = tmp_path / "nltk_data"
    empty.mkdir()
    script = textwrap.dedent(
        """
        import json, sys
        import nltk, nltk.data
        nltk.data.path[:] = [sys.argv[1]]
        def no_download(*args, **kwargs):
            raise RuntimeError("tried to download NLTK data")
        nltk.download = no_download
        from transformers import AutoTokenizer
        from ucm.eval import ruler
        used = ruler.ensure_sentence_splitter()
        split = nltk.sent_tokenize("Dr. Smith went home at 5 p.m. today. He was tired. Was he?")
        tok = AutoTokenizer.from_pretrained(sys.argv[2])
        out = {"used": used, "split": split}
        for task in ("niah_single_2", "vt", "qa_1"):
            out[task] = [s.prompt for s in ruler.generate(task, 1024, 1, tok, seed=11, cache=False)]
        print(json.dumps(out))
        """
    )
    env = {**os.environ, "NLTK_DATA": str(empty)}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(empty), smollm2_tokenizer.name_or_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["used"] == "punkt"
    assert out["split"] == ["Dr. Smith went home at 5 p.m. today.", "He was tired.", "Was he?"]
    assert len(out["niah_single_2"]) == 1 and "special magic number" in out["niah_single_2"][0]
    tasks = ["vt", "qa_1"] + (["niah_single_2"] if ruler.ensure_sentence_splitter() == "punkt" else [])
    for task in tasks:
        here = [s.prompt for s in ruler.generate(task, 1024, 1, smollm2_tokenizer, seed=11, cache=False)]
        assert out[task] == here, task


@needs_ruler
def test_niah_word_list_is_sorted_and_unique() -> None:
    words = ruler._niah_words()
    assert len(words) > 6_000_000
    edges = sorted({0, len(words) - 1} | {max(0, s - 1) for s in words._starts} | set(words._starts))
    rng = random.Random(0)
    probes = sorted(set(edges) | {rng.randrange(len(words) - 1) for _ in range(3000)})
    for i in probes:
        if i + 1 < len(words):
            assert words[i] < words[i + 1], i
    assert words[-1] == words[len(words) - 1]


@needs_ruler
@pytest.mark.slow
def test_niah_word_list_equals_rulers() -> None:
    """The on-demand list is exactly the one niah.py builds at import (~30 s)."""
    import wonderwords

    read = wonderwords.random_word._get_words_from_text_file
    nouns, adjs = read("nounlist.txt"), read("adjectivelist.txt")
    full = sorted({f"{a}-{n}" for a in adjs for n in nouns})
    assert len(full) == len(ruler._niah_words())
    assert full == ruler._niah_words()[:]
