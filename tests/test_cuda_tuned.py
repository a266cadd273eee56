"""The grouped scorer's per-GPU tuned settings (backends/cuda/tuned.py): the files round-trip,
a file that does not parse is an error naming it, the folder of `$UCM_CUDA_TUNED_DIR` wins over
the shipped one (which stands in where that folder has no file for the GPU), and every shipped
file is valid for the kernel (the GPU runs use them)."""

from __future__ import annotations

import json

import pytest
import torch
from ucm_backends.cuda import tuned


def _file(device: str = "NVIDIA H20") -> tuned.TunedFile:
    return tuned.TunedFile(
        device=device,
        command="test",
        grouped_scores={
            "float8_e4m3fn/mean": tuned.GroupedLaunch(block_m=4, block_r=32, stages=3, warps=4, widen="float16"),
            "bfloat16/max": tuned.GroupedLaunch(block_m=1, block_r=16, stages=2, warps=8),
        },
    )


def test_file_name_is_the_cuda_name_with_safe_characters() -> None:
    assert tuned.file_name("NVIDIA H20") == "NVIDIA_H20.json"
    assert tuned.file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"


def test_round_trip_through_the_env_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(tuned.TUNED_DIR_ENV, str(tmp_path))
    assert tuned.load_tuned("NVIDIA H20") is None  # nothing measured: the heuristics
    path = tuned.write_tuned(tmp_path, _file())
    assert path == tmp_path / "NVIDIA_H20.json"
    got = tuned.load_tuned("NVIDIA H20")
    assert got == _file()
    launch = got.grouped(torch.float8_e4m3fn, "mean")
    assert (launch.block_m, launch.block_r, launch.widen) == (4, 32, "float16")
    assert got.grouped(torch.bfloat16, "max").warps == 8
    assert got.grouped(torch.bfloat16, "mean") is None  # not measured: the built-in setting
    assert tuned.load_tuned("NVIDIA H100 PCIe") is None  # another GPU model does not take H20's


def test_the_env_folder_wins_and_the_shipped_file_stands_in_where_it_has_none(tmp_path, monkeypatch) -> None:
    """A machine whose `$UCM_CUDA_TUNED_DIR` holds no file for its GPU (a fresh one: nothing tuned
    there yet) runs the file this project measured and ships for that GPU, not the heuristics."""
    shipped = sorted(tuned.PACKAGED_DIR.glob("*.json"))
    assert shipped, "no tuned file ships (the H100's was measured in session 22)"
    device = json.loads(shipped[0].read_text())["device"]
    monkeypatch.setenv(tuned.TUNED_DIR_ENV, str(tmp_path))
    assert tuned.load_tuned(device) == tuned.TunedFile.model_validate_json(shipped[0].read_text())
    tuned.write_tuned(tmp_path, _file(device))
    assert tuned.load_tuned(device) == _file(device)  # measured on this machine: it wins


@pytest.mark.parametrize(
    "bad",
    [
        "{not json",
        json.dumps(
            {
                "device": "x",
                "command": "c",
                "grouped_scores": {"bfloat16/max": {"block_m": 3, "block_r": 16, "stages": 2, "warps": 4}},
            }
        ),
        json.dumps(
            {
                "device": "x",
                "command": "c",
                "grouped_scores": {"bfloat16/max": {"block_m": 1, "block_r": 16, "stages": 2, "warps": 5}},
            }
        ),
        json.dumps({"device": "x", "command": "c", "grouped_scores": {}, "unknown": 1}),
    ],
)
def test_a_broken_file_is_an_error_naming_it(tmp_path, monkeypatch, bad: str) -> None:
    monkeypatch.setenv(tuned.TUNED_DIR_ENV, str(tmp_path))
    (tmp_path / "NVIDIA_H20.json").write_text(bad)
    with pytest.raises(ValueError, match="NVIDIA_H20.json"):
        tuned.load_tuned("NVIDIA H20")


@pytest.mark.parametrize("path", sorted(tuned.PACKAGED_DIR.glob("*.json")), ids=lambda p: p.name)
def test_shipped_files_are_valid(path) -> None:
    """Every shipped file validates and is named for its GPU (none ships before a GPU run
    measured one: pytest then reports this test as an empty parameter set, skipped)."""
    data = tuned.TunedFile.model_validate(json.loads(path.read_text()))
    assert path.name == tuned.file_name(data.device)
    for key in data.grouped_scores:
        sums, mode = key.split("/")
        assert sums in ("bfloat16", "float16", "float8_e4m3fn", "float32") and mode in ("mean", "max")
