"""`ucm profile --trace-sample`: per decode step and layer, was the needle read and how much of the
dense attention mass did the read blocks hold. The per-layer arithmetic against NumPy on
hand-made masses, and a real SmolLM2 trace whose sparse decode must equal an untraced decode of
the same method, whose dense layers read everything, and whose recall matches a NumPy softmax of
the observed query and keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ucm.profile import layer_record, score_rank


def test_layer_record_against_numpy() -> None:
    rng = np.random.default_rng(0)
    hq, hkv, n = 6, 2, 10
    logits = rng.normal(size=(hq, n))
    mass = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    kept, needle = [0, 3, 4, 9], [4, 5]
    rec = layer_record(torch.tensor(mass, dtype=torch.float32), kept, needle, hkv, dense=False)
    per_q = mass[:, kept].sum(-1)
    np.testing.assert_allclose(rec["recall_kv"], per_q.reshape(hkv, 3).mean(-1), atol=1e-5)
    np.testing.assert_allclose(rec["recall_min_q"], per_q.min(), atol=1e-5)
    np.testing.assert_allclose(rec["needle_mass_kv"], mass[:, needle].sum(-1).reshape(hkv, 3).mean(-1), atol=1e-5)
    assert rec["needle_kept"] == [True, False] and rec["kept"] == 4 and rec["total"] == n and not rec["dense"]
    full = layer_record(torch.tensor(mass, dtype=torch.float32), range(n), needle, hkv, dense=True)
    np.testing.assert_allclose(full["recall_kv"], 1.0, atol=1e-5)
    assert full["needle_kept"] == [True, True]


def test_score_rank() -> None:
    s = torch.tensor([0.5, 2.0, -1.0, 2.0, float("-inf")])
    assert score_rank(s, [1, 3, 0, 2, 4, 9]) == [0, 0, 2, 3, None, None]  # -inf ranks below -1.0 but has no rank itself


def test_trace_of_a_real_sample_through_the_core_engine(tmp_path) -> None:
    pytest.importorskip("transformers", reason="needs the [test] extra (transformers)")
    from ucm.eval import ruler

    if ruler.missing_dependencies():
        pytest.skip(f"RULER generators missing: {ruler.missing_dependencies()}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ucm.demo import method_config, model_dense_layers
    from ucm.hf_runner import PagedHFRunner, RunObserver
    from ucm.models import fetch_model
    from ucm.ops import get_ops
    from ucm.profile import trace_sample
    from ucm.sparse.factory import build_sparse_method

    steps = 5
    res = trace_sample(
        "niah_single_1", 1024, 0, "ESA", 0.3, steps, out=tmp_path / "t.json", plot=tmp_path / "t.png", backend="cpu"
    )
    assert json.loads((tmp_path / "t.json").read_text())["needle_blocks"] == res["needle_blocks"]
    assert (tmp_path / "t.png").stat().st_size > 10_000
    dense_layers = set(model_dense_layers())
    assert len(res["steps"]) == len(res["sparse_tokens"]) - 1  # one record per decode step (none if stopped)
    for rows in res["steps"]:
        for layer, r in enumerate(rows):
            assert r["dense"] == (layer in dense_layers)
            if r["dense"]:
                assert r["kept"] == r["total"] and all(r["needle_kept"])
                np.testing.assert_allclose(r["recall_kv"], 1.0, atol=1e-4)
            else:
                assert r["kept"] < r["total"]
                for rec, nm in zip(r["recall_kv"], r["needle_mass_kv"], strict=True):
                    assert 0 <= rec <= 1 + 1e-5
                    if all(r["needle_kept"]):
                        assert rec >= nm - 1e-5  # the needle's mass is part of what the kept blocks hold

    # an independent run: the same prompt and method, no tracer, gives the traced tokens, and a
    # NumPy softmax of what that run's last sparse layer saw gives the traced recall
    tok = AutoTokenizer.from_pretrained(fetch_model("smollm2"))
    model = AutoModelForCausalLM.from_pretrained(fetch_model("smollm2"), dtype=torch.float32)
    sample = ruler.generate("niah_single_1", 1024, 1, tok)[0]
    ids = tok(sample.prompt).input_ids
    assert res["prompt_tokens"] == len(ids)
    ops = get_ops("cpu")
    runner = PagedHFRunner(model, tok, ops, block_size=32, max_tokens=len(ids) + steps + 64)
    state = runner.prefill(ids)
    method = build_sparse_method(method_config("ESA", 0.3, dense_layers=model_dense_layers()), runner.shapes, ops)
    layer = max(i for i in range(runner.shapes.num_layers) if i not in dense_layers)
    seen = {}

    class Grab(RunObserver):
        def on_decode(self, step, lyr, q, k_cache, v_cache, block_table, seq_lens, scale):
            if step == 0 and lyr == layer:
                n = int(seq_lens[0])
                rows = block_table[0, : (n + 31) // 32].long()
                k = k_cache[rows].reshape(-1, *k_cache.shape[2:])[:n]  # [n, Hkv, D]
                seen.update(q=q[0].numpy().copy(), k=k.numpy().copy(), scale=scale, n=n)

    orig_select = method.select

    def select(lyr, q, plan):
        sel = orig_select(lyr, q, plan)
        if lyr == layer and "kept" not in seen:
            seen["kept"] = sel.logical_blocks(0)
        return sel

    method.select = select
    plain = runner.decode(state, method, steps, stop_ids=[tok.eos_token_id], observers=[Grab()])
    method.close()
    assert plain.tokens == res["sparse_tokens"]
    q, k, n = seen["q"], seen["k"], seen["n"]
    g = q.shape[0] // k.shape[1]
    logits = np.einsum("hd,thd->ht", q, np.repeat(k, g, axis=1)) * seen["scale"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    block = np.arange(n) // 32
    per_q = p[:, np.isin(block, seen["kept"])].sum(-1)
    np.testing.assert_allclose(res["steps"][0][layer]["recall_kv"], per_q.reshape(-1, g).mean(-1), atol=1e-4)
    needle = np.isin(block, res["needle_blocks"])
    np.testing.assert_allclose(
        res["steps"][0][layer]["needle_mass_kv"], p[:, needle].sum(-1).reshape(-1, g).mean(-1), atol=1e-4
    )
