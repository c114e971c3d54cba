"""The model input's intensity calibration: a whole-scan HU offset (another scanner's
calibration) must not change what a calibrated model sees."""

from __future__ import annotations

import numpy as np
import pytest

from BrainLobeSegLib import geometry, models, phantom
from BrainLobeSegLib.errors import ModelError


def _card(calibration=None) -> models.ModelCard:
    intensity = {"window": [-20.0, 100.0]}
    if calibration:
        intensity["calibration"] = calibration
    return models.ModelCard(name="t", version="0", kind="3d", architecture={"name": "UNet3D", "args": {}},
                            spacing_mm=[2.0] * 3, intensity=intensity, networks={})


@pytest.mark.parametrize("offset", [-40.0, -15.0, 25.0, 40.0])
def test_calibrated_input_ignores_a_scanner_offset(offset):
    upright = phantom.make_upright_phantom(spacing_mm=3.0)[0]
    import SimpleITK as sitk
    hu = sitk.GetArrayFromImage(upright).astype(np.float32)
    shifted = np.where(hu > -1000, hu + offset, hu).astype(np.float32)
    card = _card(models.CALIBRATION_SOFT_TISSUE)
    a = models.normalise_intensity(hu.copy(), card)
    b = models.normalise_intensity(shifted.copy(), card)
    brain = (hu > 0) & (hu < 60)
    assert np.abs(a[brain] - b[brain]).max() < 2.0 / 120.0   # within 2 HU of the window
    raw = _card()
    assert np.abs(models.normalise_intensity(hu.copy(), raw)[brain]
                  - models.normalise_intensity(shifted.copy(), raw)[brain]).mean() > 10.0 / 120.0


def test_calibration_shift_of_a_calibrated_head_is_small():
    upright = phantom.make_upright_phantom(spacing_mm=3.0)[0]
    import SimpleITK as sitk
    hu = sitk.GetArrayFromImage(upright).astype(np.float32)
    assert abs(geometry.calibration_shift(hu)) < 10.0
    assert geometry.calibration_shift(np.full((10, 10, 10), -1000.0)) == 0.0


def test_unknown_calibration_is_refused(tmp_path):
    card = _card("per-scan-zscore")
    with pytest.raises(ModelError, match="unknown to this engine"):
        models._check_card(card, tmp_path / "model.json")
