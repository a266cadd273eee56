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


def prose_prompt(tokenizer, target_tokens: int, depth: float, seed: int) -> tuple[list[int], str]:
    """`ucm.demo.needle_prompt`'s prompt and answer, its haystack shuffled docstring sentences."""
    rng = random.Random(seed)
    secret = str(rng.randint(10000, 99999))
    needle = f" The special magic number is {secret}. "
    pool = SENTENCES[:]
    rng.shuffle(pool)
    answer_prefix = tokenizer.encode("The special magic number is", add_special_tokens=False)
    for n in range(20, len(pool) + 20, 20):
        sentences = pool[:n]
        cut = int(len(sentences) * depth)
        text = (
            "A special magic number is hidden in the following text. Remember it.\n\n"
            + " ".join(sentences[:cut])
            + needle
            + " ".join(sentences[cut:])
            + "\n\nWhat is the special magic number?"
        )
        messages = [{"role": "user", "content": text}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids) + answer_prefix
        if len(ids) >= target_tokens:
            return ids, secret
    raise ValueError(f"{len(pool)} sentences make fewer than {target_tokens} tokens")


if __name__ == "__main__":
    import ucm.demo
    from ucm.cli import main

    ucm.demo.needle_prompt = prose_prompt
    model, out = sys.argv[1:3]
    sys.exit(main(["configure", "--no-profile", "--model", model, "--out", out, "--block-size", "32"]))
