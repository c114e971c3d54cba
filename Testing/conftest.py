"""Shared fixtures: small untrained models (real model folders, random weights).

Tests that check plumbing (geometry, outputs, cancel, MRML) use these; tests of
accuracy use the bundled models and skip when those are not present. The models are
made by the engine's :func:`models.make_tiny_model`, as in the Slicer self-test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from BrainLobeSegLib.models import make_tiny_model

__all__ = ["make_tiny_model", "tiny_models"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A folder holding a tiny planar and a tiny 3D model (for every mode)."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny-planar", "planar")
    make_tiny_model(root / "tiny-3d", "3d")
    return root
