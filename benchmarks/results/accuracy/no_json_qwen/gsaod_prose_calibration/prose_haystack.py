"""Which dense layers does the worst-head rule pick with different haystacks (SmolLM2 / Qwen)?"""
import importlib, inspect, json, random, re, sys, pkgutil
import ucm.demo as demo
from ucm.configure import choose_dense_layers, layer_worst_head, PROFILE_METHODS
from ucm.profile import run_profile

def stdlib_sentences():
    out = []
    for name in ["argparse", "collections", "json", "re", "logging", "unittest", "textwrap", "email", "http.client",
                 "asyncio", "subprocess", "threading", "pathlib", "datetime", "decimal", "fractions", "statistics",
                 "tarfile", "zipfile", "shutil", "tempfile", "pickle", "csv", "sqlite3", "urllib.parse", "heapq",
                 "bisect", "functools", "itertools", "contextlib", "dataclasses", "enum", "typing", "inspect", "ast"]:
        try:
            mod = importlib.import_module(name)
        except Exception:
            continue
        docs = [inspect.getdoc(mod) or ""]
        for _, obj in inspect.getmembers(mod):
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs.append(inspect.getdoc(obj) or "")
        for d in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())):
                if 40 <= len(s) <= 200 and re.match(r"^[A-Z][a-z]", s) and not re.search(r"[>{}\[\]=_`|\\]", s):
                    out.append(s)
    return sorted(set(out))

SENTS = stdlib_sentences()

def prose_prompt(tokenizer, target_tokens, depth, seed):
    rng = random.Random(seed)
    secret = str(rng.randint(10000, 99999))
    needle = f" The special magic number is {secret}. "
    pool = SENTS[:]
    rng.shuffle(pool)
    sentences = []
    answer_prefix = tokenizer.encode("The special magic number is", add_special_tokens=False)
    i = 0
    while True:
        sentences.extend(pool[i:i + 20]); i += 20
        cut = int(len(sentences) * depth)
        text = ("A special magic number is hidden in the following text. Remember it.\n\n"
                + " ".join(sentences[:cut]) + needle + " ".join(sentences[cut:])
                + "\n\nWhat is the special magic number?")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids) + answer_prefix
        if len(ids) >= target_tokens:
            return ids, secret

if __name__ == "__main__":
    model, source = sys.argv[1], sys.argv[2]
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
    print("sentences", len(SENTS), file=sys.stderr)
    if source == "prose":
        demo.needle_prompt = prose_prompt
    task = "niah_single_2" if source == "ruler" else None
    res = run_profile(tokens, 3, 8, 0.3, PROFILE_METHODS, 32, task=task, model=model, quiet=True)
    worst = layer_worst_head(res["methods"])
    dense = choose_dense_layers(worst)
    print(json.dumps({"model": model, "source": source, "dense": dense,
                      "worst": {k: round(v, 3) for k, v in sorted(worst.items(), key=lambda kv: kv[1])[:8]}}))
