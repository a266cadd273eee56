"""Session 28's experiment: `ucm configure --no-profile` (copying layers + calibration) with the
calibration's needle prompts drawn from the Python standard library's docstrings (read at run time)
instead of `ucm.demo`'s ten filler sentences.

    python prose_haystack.py MODEL_FOLDER OUT_DIR   # then ucm eval --hash-config OUT_DIR/<model>.json
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
import sys
from collections.abc import Iterator

MODULES = (
    "argparse collections json re logging unittest textwrap email http.client asyncio subprocess threading "
    "pathlib datetime decimal fractions statistics tarfile zipfile shutil tempfile pickle csv sqlite3 "
    "urllib.parse heapq bisect functools itertools contextlib dataclasses enum typing inspect ast"
).split()


def stdlib_sentences() -> list[str]:
    """Sentences of 40-200 characters from the docstrings of `MODULES` and their members."""
    out = set()
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [inspect.getdoc(mod) or ""]
        docs += [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(mod, inspect.isfunction)]
        docs += [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(mod, inspect.isclass)]
        for doc in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                if 40 <= len(s) <= 200 and re.match(r"^[A-Z][a-z]", s) and not re.search(r"[>{}\[\]=_`|\\]", s):
                    out.add(s)
    return sorted(out)


SENTENCES = stdlib_sentences()


def prose_sentences(rng: random.Random) -> Iterator[str]:
    """A haystack for `ucm.demo.needle_prompt`: `SENTENCES` shuffled, each once."""
    pool = SENTENCES[:]
    rng.shuffle(pool)
    yield from pool
    raise ValueError(f"the {len(pool)} sentences are too few for the prompt asked for")


def prose_prompt(tokenizer, target_tokens: int, depth: float, seed: int) -> tuple[list[int], str]:
    """`ucm.demo.needle_prompt` with the docstring sentences for its haystack."""
    from ucm.demo import needle_prompt

    return needle_prompt(tokenizer, target_tokens, depth, seed, haystack=prose_sentences)


if __name__ == "__main__":
    import ucm.demo
    from ucm.cli import main

    ucm.demo.needle_prompt = prose_prompt  # what `ucm calibrate` draws its prompts from
    model, out = sys.argv[1:3]
    sys.exit(main(["configure", "--no-profile", "--model", model, "--out", out, "--block-size", "32"]))
