"""`ucm profile` smoke runs on the real model: at ratio 1.0 every selection holds all of the
dense attention (recall 1, output error 0); at 0.3 recall is below 1 but the oracle bounds it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the model tests need the [test] extra (transformers)")

from ucm.profile import run_profile  # noqa: E402


def test_ratio_one_selects_all_attention(tmp_path) -> None:
    res = run_profile(tokens=600, prompts=1, steps=2, ratio=1.0, methods=("ESA",), out=tmp_path / "p.json")
    layers = res["methods"]["ESA"]["per_layer"]
    assert len(layers) == 30
    for row in layers.values():
        assert row["recall"] == pytest.approx(1.0, abs=1e-5)
        assert row["output_error"] == pytest.approx(0.0, abs=1e-5)
    assert json.loads((tmp_path / "p.json").read_text())["ratio"] == 1.0


def test_cli_smoke_two_prompts_one_method(tmp_path) -> None:
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, "-m", "ucm.cli", "profile", "--tokens", "600", "--prompts", "2", "--steps",
                           "2", "--methods", "GSAOnDevice", "--out", str(out), "--plot", str(tmp_path / "p.png")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["methods"]["GSAOnDevice"]["sparse_layers_mean"]
    assert 0.3 <= res["fraction_kept"] <= 0.4
    assert 0.0 < res["recall"] < 1.0 and res["recall"] <= res["oracle_normalised_recall"] <= 1.0
    assert (tmp_path / "p.png").stat().st_size > 10_000
