"""`ucm profile` smoke runs on the real model: at ratio 1.0 every selection holds all of the
dense attention (recall 1, output error 0); at 0.3 recall is below 1 but the oracle bounds it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers", reason="the model tests need the [test] extra (transformers)")

from ucm.methods import method_names  # noqa: E402
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
    hashed = method_names(model_json=True)[0]  # GSA on device: its shipped (trained) W and random W
    variants = (hashed, f"{hashed}+random")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ucm.cli",
            "profile",
            "--tokens",
            "600",
            "--prompts",
            "2",
            "--steps",
            "2",
            "--methods",
            ",".join(variants),
            "--out",
            str(out),
            "--plot",
            str(tmp_path / "p.png"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    methods = json.loads(out.read_text())["methods"]
    for name in variants:
        res = methods[name]["sparse_layers_mean"]
        assert 0.3 <= res["fraction_kept"] <= 0.4
        assert 0.0 < res["recall"] < 1.0 and res["recall"] <= res["oracle_normalised_recall"] <= 1.0
    trained, random_ = (methods[n]["per_layer"] for n in variants)
    assert any(trained[k]["recall"] != random_[k]["recall"] for k in trained)  # other projections, other blocks
    assert (tmp_path / "p.png").stat().st_size > 10_000
    bad = subprocess.run(
        [sys.executable, "-m", "ucm.cli", "profile", "--methods", "ESA,XSA"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "unknown XSA" in bad.stderr and variants[1] in bad.stderr


def test_suggest_dense_layers_ranks_by_worst_head_mean_over_methods() -> None:
    from ucm.profile import suggest_dense_layers

    def rows(values):
        return {"per_layer": {str(i): {"worst_head_normalised_recall": v} for i, v in enumerate(values)}}

    methods = {"A": rows([0.9, 0.2, 0.8, 0.5]), "B": rows([0.9, 0.6, 0.1, 0.5])}  # means 0.9, 0.4, 0.45, 0.5
    assert suggest_dense_layers(methods, 2) == [1, 2]
    assert suggest_dense_layers(methods, 3) == [1, 2, 3]


def test_cli_profiles_ruler_prompts_and_suggests_dense_layers(tmp_path) -> None:
    from ucm.eval import ruler

    missing = ruler.missing_dependencies()
    if missing:
        pytest.skip(f"--task needs {', '.join(missing)}: {ruler.INSTALL_HINT}")
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ucm.cli",
            "profile",
            "--task",
            "niah_single_2",
            "--tokens",
            "1024",
            "--prompts",
            "1",
            "--steps",
            "2",
            "--methods",
            "ESA",
            "--suggest-dense",
            "3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["prompt_source"] == "RULER niah_single_2"
    per_layer = res["methods"]["ESA"]["per_layer"]
    worst = {int(k): v["worst_head_normalised_recall"] for k, v in per_layer.items()}
    assert all(0.0 <= w <= 1.0 for w in worst.values())
    # min over heads of got_h / best_h <= sum(got) / sum(best) <= the head-mean normalised recall
    norm = {int(k): v["oracle_normalised_recall"] for k, v in per_layer.items()}
    assert all(worst[k] <= norm[k] + 1e-5 for k in worst)
    assert any(worst[k] < norm[k] - 0.05 for k in worst)
    suggested = res["suggested_dense_layers"]
    assert len(suggested) == 3 and sorted(suggested) == suggested
    assert max(worst[k] for k in suggested) <= min(w for k, w in worst.items() if k not in suggested)
    assert "layers to keep dense" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "ucm.cli", "profile", "--task", "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "valid:" in bad.stderr


def test_shipped_means_leave_out_exactly_the_dense_layers() -> None:
    from ucm.profile import add_shipped_means, shipped_dense_layers

    def row(x):
        return {"oracle_normalised_recall": x, "recall": x / 2}

    result = {"methods": {"M": {"per_layer": {"0": row(1.0), "1": row(0.5), "2": row(0.8), "3": row(0.6)}}}}
    add_shipped_means(result, [1, 3])
    assert result["shipped_dense_layers"] == [1, 3]
    got = result["methods"]["M"]["shipped_sparse_layers_mean"]
    assert got == {"oracle_normalised_recall": 0.9, "recall": 0.45}
    # the demo model's JSON keeps its retrieval-head layers dense (ratio 1 in top_k_ratio_per_layer)
    assert shipped_dense_layers() == [7, 17, 18, 23]
