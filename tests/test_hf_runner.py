"""The core with real attention from a real model (SmolLM2-135M, float32, CPU).

The dense paged runner must reproduce transformers' own greedy generation token for token;
every method at ratio 1.0 must reproduce dense; at ratio 0.3 on a long needle prompt the
methods read ~30% of the blocks (and, in the slow test, still find the needle).
"""

from __future__ import annotations

import pytest
import torch

from tests.vllm_engine import layer_ratios
from ucm.demo import DEMO_MODEL_CONFIG, method_config, needle_prompt
from ucm.hf_runner import PagedHFRunner
from ucm.methods import get_method, method_names
from ucm.ops import get_ops
from ucm.sparse.factory import build_sparse_method

transformers = pytest.importorskip("transformers", reason="the model tests need the [test] extra (transformers)")


@pytest.fixture(scope="module")
def smollm2():
    from ucm.models import fetch_model

    path = fetch_model("smollm2")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return path, tok, model


def chat_ids(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_dense_paged_runner_matches_transformers_generate(smollm2) -> None:
    path, tok, model = smollm2
    ids = chat_ids(tok, "Name three colours of the rainbow and explain why the sky is blue.")
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    want = reference.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
    runner = PagedHFRunner(model, tok, get_ops("cpu"), block_size=16, max_tokens=len(ids) + 32)
    got = runner.generate(ids, max_new_tokens=16).tokens
    assert got == want


@pytest.fixture(scope="module")
def needle(smollm2):
    _, tok, model = smollm2
    ids, secret = needle_prompt(tok, 1500, 0.5, seed=3)
    runner = PagedHFRunner(model, tok, get_ops("cpu"), block_size=16, max_tokens=len(ids) + 32)
    state = runner.prefill(ids)
    dense = runner.decode(state, None, 8)
    return runner, state, dense, secret


@pytest.mark.parametrize("name", method_names())
def test_every_method_at_ratio_one_equals_dense(needle, name: str) -> None:
    runner, state, dense, _ = needle
    cfg = method_config(name, 1.0)
    model_config = None
    if get_method(name).model_json:  # the shipped SmolLM2 config with every layer at ratio 1
        from ucm.config.loader import model_config_data

        data = model_config_data(DEMO_MODEL_CONFIG)
        data["top_k_ratio_per_layer"] = [1.0] * data["num_hidden_layers"]
        data["gpu_seq_len_threshold"] = 0
        model_config = data
    method = build_sparse_method(cfg, runner.shapes, runner.ops, model_config=model_config)
    res = runner.decode(state, method, 8)
    method.close()
    assert res.tokens == dense.tokens
    assert res.blocks_kept == res.blocks_total


@pytest.mark.parametrize("name", method_names())
def test_ratio_point_three_reads_a_third_of_the_blocks(needle, name: str) -> None:
    runner, state, dense, secret = needle
    config = method_config(name, 0.3)
    method = build_sparse_method(config, runner.shapes, runner.ops)
    res = runner.decode(state, method, 8)
    method.close()
    assert secret in dense.text  # the model itself finds the needle at this length
    sparse_layers = [i for i, t in enumerate(res.layer_total) if res.layer_kept[i] < t]
    assert len(sparse_layers) >= 25
    ratios = layer_ratios(config, len(res.layer_total), 0.3)  # GSA on device: its JSON's, layer 20 at 0.5
    for i in sparse_layers:  # per sparse layer: ceil(ratio * blocks), at least min_blocks
        got = res.layer_kept[i] / res.layer_total[i]
        assert ratios[i] - 0.02 <= got <= ratios[i] + 0.06, (i, res.layer_kept[i], res.layer_total[i], ratios[i])


@pytest.mark.slow
@pytest.mark.parametrize("name", method_names())
def test_needle_found_at_ratio_point_three(smollm2, name: str) -> None:
    """The demo's claim, at its default 3K tokens: every method still answers."""
    _, tok, model = smollm2
    ids, secret = needle_prompt(tok, 3000, 0.5, seed=7)
    runner = PagedHFRunner(model, tok, get_ops("cpu"), block_size=16, max_tokens=len(ids) + 32)
    state = runner.prefill(ids)
    assert secret in runner.decode(state, None, 8).text
    method = build_sparse_method(method_config(name, 0.3), runner.shapes, runner.ops)
    res = runner.decode(state, method, 8)
    method.close()
    assert secret in res.text, res.text
    assert res.fraction_read < 0.4
