"""benchmarks/hash_seed_spread.py on the real model: one short RULER sample per task, dense, the
shipped trained projections and one random draw; the JSON must agree with itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the model tests need the [test] extra (transformers)")

from ucm.eval import ruler  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "hash_seed_spread.py"
sys.path.insert(0, str(SCRIPT.parent))

from hash_seed_spread import hata_config  # noqa: E402


def test_configs_keep_the_shipped_dense_layers_and_differ_only_in_projections() -> None:
    trained, random_ = hata_config(0.2, False), hata_config(0.2, True)
    for cfg in (trained, random_):
        assert [i for i, r in enumerate(cfg["top_k_ratio_per_layer"]) if r >= 1] == [7, 17, 18, 23]
        assert set(cfg["top_k_ratio_per_layer"]) == {0.2, 1.0} and cfg["gpu_seq_len_threshold"] == 0
    assert trained["hash_weight_type"] == "trained" and Path(trained["hash_weight"]).is_file()
    assert random_["hash_weight_type"] == "random" and random_["hash_weight"] is None
    assert {k: v for k, v in trained.items() if "hash_weight" not in k} == {
        k: v for k, v in random_.items() if "hash_weight" not in k
    }


def test_seed_spread_smoke_is_consistent(tmp_path) -> None:
    missing = ruler.missing_dependencies()
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: {ruler.INSTALL_HINT}")
    out = tmp_path / "spread.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--length", "1024", "--samples", "1", "--seeds", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["per_sample"]) == 2 and res["tasks"] == ["niah_single_1", "niah_single_2"]
    names = ["trained (shipped)", "random seed 0"]
    assert list(res["samples_lost_vs_dense"]) == names
    for row in res["per_sample"]:
        assert row["correct"]["dense"]  # SmolLM2 finds a needle at 1K
    for name in names:
        lost = sum(r["correct"]["dense"] and not r["correct"][name] for r in res["per_sample"])
        assert res["samples_lost_vs_dense"][name] == lost
        assert res["score"][name] == {r["task"]: 100.0 * r["correct"][name] for r in res["per_sample"]}
    assert res["random_seeds_losing_any"] == int(res["samples_lost_vs_dense"]["random seed 0"] > 0)
    assert out.with_suffix(".png").stat().st_size > 5_000
    bad = subprocess.run([sys.executable, str(SCRIPT), "--seeds", "0"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--seeds" in bad.stderr
