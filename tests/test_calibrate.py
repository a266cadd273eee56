"""`ucm calibrate` smoke run: trains on real q/k, writes weights and a per-model JSON that the
GSA-on-device loader accepts, and the built method hashes with exactly those weights."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers", reason="the model tests need the [test] extra (transformers)")

from ucm.calibrate import run_calibrate  # noqa: E402
from ucm.config.loader import load_model_config  # noqa: E402
from ucm.ops import get_ops  # noqa: E402
from ucm.sparse.base import ModelShapes  # noqa: E402
from ucm.sparse.factory import build_sparse_method  # noqa: E402


def test_calibrate_writes_loadable_trained_weights(tmp_path) -> None:
    res = run_calibrate(tmp_path, prompts=1, heldout=1, tokens=400, steps=3, queries_per_prompt=16)
    assert len(res["loss_start_end_per_layer"]) == 30
    losses = res["loss_start_end_per_layer"]
    # 3 steps only (a smoke run): the objective falls on average and in most layers
    assert sum(end for _, end in losses) < sum(start for start, _ in losses)
    assert sum(end < start for start, end in losses) >= 2 * len(losses) // 3
    for name in ("random", "trained"):
        mean = res["heldout"][name]["sparse_layers_mean"]
        assert 0.0 < mean["recall"] <= mean["oracle_normalised_recall"] <= 1.0
    loaded = load_model_config(tmp_path / res["config"])
    assert loaded.config.hash_weight_type == "trained"
    # deployable as written: the shipped JSON's dense layers and thresholds, only W changed
    shipped = load_model_config("SmolLM2-135M-Instruct").config
    assert loaded.config.top_k_ratio_per_layer == shipped.top_k_ratio_per_layer
    assert loaded.config.gpu_seq_len_threshold == shipped.gpu_seq_len_threshold
    shapes = ModelShapes(30, 9, 3, 64, 32, 64)
    method = build_sparse_method({"GSAOnDevice": {}}, shapes, get_ops("reference"), model_config=loaded)
    saved = torch.load(tmp_path / res["weights"], weights_only=True)
    assert torch.equal(method.scorer.weights[7][0], saved["weight"][7])
    # the measured mean keys go with W, and the JSON scores with them (centred, norm-weighted)
    assert loaded.config.hash_score_method == "norm_cosine" and method.scorer.cosine
    assert saved["key_center"].shape == (30, 3, 64) and torch.isfinite(saved["key_center"]).all()
    assert torch.equal(method.scorer.centers[7], saved["key_center"][7])
    assert json.loads((tmp_path / "calibration.json").read_text())["bits"] == 128


def test_calibrate_keep_weights_adds_the_mean_keys_to_the_shipped_projections(tmp_path) -> None:
    """--keep-weights: no training, the shipped W written again with the measured mean keys."""
    from ucm.calibrate import QKCollector, mean_keys
    from ucm.config.loader import model_config_data

    shipped = torch.load(model_config_data("SmolLM2-135M-Instruct")["hash_weight"], weights_only=True)["weight"]
    res = run_calibrate(tmp_path, prompts=1, heldout=1, tokens=400, keep_weights=True, score_method="hamming")
    saved = torch.load(tmp_path / res["weights"], weights_only=True)
    assert torch.equal(saved["weight"], shipped) and res["kept_weights"] and res["steps"] == 0
    assert saved["key_center"].shape == (30, 3, 64) and saved["key_center"].abs().amax() > 0
    assert load_model_config(tmp_path / res["config"]).config.hash_score_method == "hamming"
    collector = QKCollector(2)
    collector.data = {0: [(torch.zeros(1), torch.tensor([[[1.0, 2.0]], [[3.0, 6.0]]])), (None, torch.ones(2, 1, 2))]}
    assert torch.equal(mean_keys(collector, 1), torch.tensor([[[1.5, 2.5]]]))  # every key of every prompt


@pytest.mark.slow
def test_shipped_projections_are_what_calibrate_makes(tmp_path) -> None:
    """configs/smollm2_135m_hash.pt is reproducible: the recipe in docs/accuracy.md rewrites it
    bit for bit (about 3 minutes on 2 cores)."""
    from ucm.config.loader import model_config_data

    shipped = torch.load(model_config_data("SmolLM2-135M-Instruct")["hash_weight"], weights_only=True)["weight"]
    res = run_calibrate(tmp_path, prompts=4, heldout=1, tokens=1500, steps=60)
    assert torch.equal(torch.load(tmp_path / res["weights"], weights_only=True)["weight"], shipped)
