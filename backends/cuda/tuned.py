"""Launch settings of the grouped block scorer measured per GPU model.

`benchmarks/tune_selection_gpu.py --grouped-only --write-tuned DIR` times every setting of
`_scores_grouped_kernel` on the GPU it runs on and writes the fastest per (sums dtype, group
reduction) to `DIR/<GPU name>.json` (the name as CUDA reports it, every character other than a
letter or digit an underscore: `NVIDIA_H200.json`). `CudaOps` reads the file of the GPU its
tensors live on from `$UCM_CUDA_TUNED_DIR` if that folder has one for it, else from the
`tuned/` folder beside this module (the files this project measured and ships); a GPU without a
file runs the built-in heuristics. A file that does not parse is an error naming it: a tuned
setting is never dropped in silence.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

TUNED_DIR_ENV = "UCM_CUDA_TUNED_DIR"
PACKAGED_DIR = Path(__file__).with_name("tuned")


class GroupedLaunch(BaseModel):
    """One launch of `_scores_grouped_kernel` (see its docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    block_m: int = Field(ge=1, le=64)  # block columns a program
    block_r: int = Field(ge=1, le=256)  # groups a tile
    stages: int = Field(ge=1, le=8)  # software-pipeline depth
    warps: Literal[1, 2, 4, 8, 16]
    widen: Literal["query", "float16"] = "query"  # float8 sums: widened to the query's dtype or to float16

    @field_validator("block_m", "block_r")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"a power of two (Triton's block shapes), not {v}")
        return v


class TunedFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: str
    command: str
    #: "<sums dtype>/<group reduction>", e.g. "float8_e4m3fn/mean" (ESA) or "bfloat16/max" (GSA)
    grouped_scores: dict[str, GroupedLaunch]

    def grouped(self, sums_dtype: torch.dtype, group_reduce: str) -> GroupedLaunch | None:
        """The launch measured for these sums and this reduction over a GQA group, if any."""
        return self.grouped_scores.get(grouped_key(sums_dtype, group_reduce))


def file_name(device_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", device_name) + ".json"


def grouped_key(sums_dtype: torch.dtype | str, group_reduce: str) -> str:
    """ "<sums dtype>/<reduction>", the dtype by its torch name without the prefix."""
    name = sums_dtype if isinstance(sums_dtype, str) else str(sums_dtype).removeprefix("torch.")
    return f"{name}/{group_reduce}"


def load_tuned(device_name: str) -> TunedFile | None:
    """The tuned settings of this GPU model, or None where none were measured: the file in
    `$UCM_CUDA_TUNED_DIR` if that folder has one for this GPU, else the shipped one."""
    folders = [Path(os.environ[TUNED_DIR_ENV])] if os.environ.get(TUNED_DIR_ENV) else []
    paths = [f / file_name(device_name) for f in [*folders, PACKAGED_DIR]]
    path = next((p for p in paths if p.is_file()), None)
    if path is None:
        return None
    try:
        return TunedFile.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as e:
        raise ValueError(f"{path}: not a tuned-settings file of the grouped scorer: {e}") from e


def write_tuned(folder: Path, tuned: TunedFile) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / file_name(tuned.device)
    path.write_text(json.dumps(tuned.model_dump(), indent=2) + "\n")
    return path
