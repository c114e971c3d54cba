"""Shared fixtures: small untrained models (real model folders, random weights).

Tests that check plumbing (geometry, outputs, cancel, MRML) use these; tests of
accuracy use the bundled models and skip when those are not present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import pytest
import torch

from BrainLobeSegLib import models, regions
from BrainLobeSegLib.networks import build_network


def make_tiny_model(folder: Path, kind: str, spacing: float = 4.0, seed: int = 0) -> Path:
    """Export a real model folder with a very small random network of ``kind``."""
    torch.manual_seed(seed)
    card = models.ModelCard(
        name=f"tiny-{kind}", version="0.0.test", kind=kind,
        architecture={"name": "UNet2D" if kind == "planar" else "UNet3D", "args": {}},
        spacing_mm=[spacing] * 3, intensity={"window": [-20.0, 100.0]}, networks={},
        context_slices=1, coordinate_channel=True, description="random weights, for tests",
        training={"data": "none (random initialisation)"})
    card.architecture["args"] = {"in_channels": card.in_channels,
                                 "num_classes": regions.NUM_LABELS + 1,
                                 "base_features": 4, "depth": 3, "norm": "batch"}
    names = list(models.PLANES) if kind == "planar" else ["unet3d"]
    nets: Dict[str, torch.nn.Module] = {
        n: build_network(card.architecture["name"], card.architecture["args"]).eval() for n in names}
    return models.save_model(folder, card, nets)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    """A folder holding a tiny planar and a tiny 3D model (for every mode)."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny-planar", "planar")
    make_tiny_model(root / "tiny-3d", "3d")
    return root
