"""benchmarks/layer_ablation.py on the real model: a short RULER sample, a dense set that leaves
GSA on device at ratio 0.1 every layer but one sparse, and the shipped set; the JSON must agree
with itself and with a direct decode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the model tests need the [test] extra (transformers)")

from ucm.demo import method_config  # noqa: E402
from ucm.eval import ruler  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "layer_ablation.py"


def test_method_config_dense_layers_override_gsa_on_device_json(tmp_path) -> None:
    from ucm.config.loader import load_model_config

    ref = method_config("GSAOnDevice", 0.2, tmp_path, (2, 3))["GSAOnDevice"]["config_file"]
    ratios = load_model_config(ref).config.top_k_ratio_per_layer
    assert [i for i, r in enumerate(ratios) if r >= 1] == [2, 3]
    sparse = [r for i, r in enumerate(ratios) if i not in (2, 3)]
    assert sum(sparse) / len(sparse) == pytest.approx(0.2, abs=1e-5)  # the sparse layers average the ratio
    assert ratios[20] == max(sparse) > ratios[0] == min(sparse)  # ... the copying layer 20 with its larger share
    shipped = load_model_config(method_config("GSAOnDevice", 0.2, tmp_path)["GSAOnDevice"]["config_file"]).config
    assert [i for i, r in enumerate(shipped.top_k_ratio_per_layer) if r >= 1] == [7, 17, 18, 23]


def test_ablation_smoke_is_consistent(tmp_path) -> None:
    missing = ruler.missing_dependencies()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: {ruler.INSTALL_HINT}")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--length",
            "1024",
            "--samples",
            "1",
            "--methods",
            "GSAOnDevice",
            "--dense-sets",
            "0",
            "7,17,18,23",
            "--ratio",
            "0.1",
            "--out-dir",
            str(tmp_path),
            "--name",
            "abl",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "abl.json").read_text())
    assert res["dense_sets"] == ["0", "7,17,18,23"] and res["samples"] == 1
    (row,) = res["per_sample"]
    assert row["dense"] and row["answer"] in row["dense_text"]  # SmolLM2 finds a needle at 1K
    got = row["methods"]["GSAOnDevice"]
    summary = res["methods"]["GSAOnDevice"]
    assert summary["correct_of_dense_correct"] == {"0": int(got["0"]), "7,17,18,23": int(got["7,17,18,23"])}
    if got["0"]:
        assert "breaks_alone" not in got
    else:  # the failure was explained layer by layer, and only layers the first set left sparse
        assert all(isinstance(x, int) and 1 <= x < 30 for x in got["breaks_alone"])
        assert summary["layers_breaking_alone"] == {str(x): 1 for x in got["breaks_alone"]}
    assert (tmp_path / "abl.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, str(SCRIPT), "--methods", "XSA"], capture_output=True, text=True)
    assert bad.returncode != 0 and "valid:" in bad.stderr
