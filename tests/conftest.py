"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Qwen3-VL, built once per test session."""
    # Imported here, not at the top: transformers is slow to import and most tests do not need it.
    from p2r_recipe.toy.model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "p2r-tiny")
