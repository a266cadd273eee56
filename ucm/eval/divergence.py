"""Where a sparse answer leaves dense's, and where the needle it should copy sits in the prompt.

Issue #20: on multi-key needles the sparse runs copy the right value for a while, then change a
character or drift to a distractor. To read a regression at a glance, every sparse prediction
gets the first generated token where it differs from dense's for the same sample (and the
character offset in the answer text), and every prediction the prompt blocks that hold the
value the task expects (`block = token // block_size`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

CONTEXT_CHARS = 12


def first_divergence(tokens: Sequence[int], reference: Sequence[int]) -> int | None:
    """Index of the first generated token where `tokens` differs from `reference`; None when both
    are identical. When one is a strict prefix of the other (one stopped earlier), the index is
    the shorter length: the first token one of them has and the other has not."""
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def first_char_divergence(text: str, reference: str) -> int | None:
    """Character offset of the first difference between two answer texts (None: identical; the
    shorter length when one is a prefix of the other)."""
    for i, (a, b) in enumerate(zip(text, reference, strict=False)):
        if a != b:
            return i
    return None if len(text) == len(reference) else min(len(text), len(reference))


def char_spans(text: str, value: str) -> list[tuple[int, int]]:
    """Every occurrence of `value` in `text` as [start, end) character spans (non-overlapping)."""
    if not value:
        return []
    out, start = [], text.find(value)
    while start >= 0:
        out.append((start, start + len(value)))
        start = text.find(value, start + len(value))
    return out


def token_span(offsets: Sequence[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """The [first, last + 1) tokens whose character offsets overlap [start, end).

    `offsets` are a fast tokenizer's `offset_mapping` (one (start, end) per token; special tokens
    have (0, 0) and are skipped). ValueError when no token overlaps (the span is outside the text)."""
    hit = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not hit:
        raise ValueError(f"no token covers characters [{start}, {end})")
    return hit[0], hit[-1] + 1


def needle_spans(prompt: str, values: Iterable[str], offsets: Sequence[tuple[int, int]]) -> list[dict[str, int | str]]:
    """Where each expected value sits in the prompt: one dict per occurrence with the value and
    its [token_start, token_end) span."""
    out: list[dict[str, int | str]] = []
    for v in values:
        for s, e in char_spans(prompt, v):
            t0, t1 = token_span(offsets, s, e)
            out.append({"value": v, "token_start": t0, "token_end": t1})
    return out


def span_blocks(spans: Iterable[dict], block_size: int) -> list[int]:
    """The sorted KV blocks (token // block_size) that hold any token of the spans."""
    blocks: set[int] = set()
    for sp in spans:
        blocks.update(range(int(sp["token_start"]) // block_size, (int(sp["token_end"]) - 1) // block_size + 1))
    return sorted(blocks)


def divergence_rows(rows: list[dict]) -> list[dict]:
    """Per sparse prediction with generated token ids: the first token and character where it
    leaves the dense prediction of the same (length, task, index), and the needle's blocks.

    A row without token ids (results of runs before they were recorded), or without a dense row
    to compare to, gets `first_divergent_token` None and `compared` False."""
    dense = {(r["length"], r["task"], r["index"]): r for r in rows if r["method"] == "dense"}
    out = []
    for r in rows:
        if r["method"] == "dense":
            continue
        ref = dense.get((r["length"], r["task"], r["index"]))
        compared = ref is not None and r.get("token_ids") is not None and ref.get("token_ids") is not None
        tok = first_divergence(r["token_ids"], ref["token_ids"]) if compared else None
        char = first_char_divergence(r["prediction"], ref["prediction"]) if compared else None
        out.append(
            {
                "length": r["length"],
                "task": r["task"],
                "index": r["index"],
                "setting": r["setting"],
                "method": r["method"],
                "ratio": r["ratio"],
                "correct": float(r["score"]) >= 100.0,
                "dense_correct": None if ref is None else float(ref["score"]) >= 100.0,
                "compared": compared,
                "identical": compared and tok is None,
                "first_divergent_token": tok,
                "first_divergent_char": char,
                # what each answer says from there on (a few characters: enough to see the drift)
                "dense_from_there": None if char is None else ref["prediction"][char : char + CONTEXT_CHARS],
                "sparse_from_there": None if char is None else r["prediction"][char : char + CONTEXT_CHARS],
                "needle_blocks": r.get("needle_blocks"),
            }
        )
    return out
