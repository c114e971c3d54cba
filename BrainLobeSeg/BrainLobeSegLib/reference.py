"""The upright reference head the engine ships: where it lives and how it is read.

"Upright" means the frame the models were trained in: the MNI frame of the atlases that
``training synth`` draws its labels from. The automatic alignment registers this head to
a scan to find the scan's pose, so the reference must be in exactly that frame. It is
the Rorden CT template (Clinical toolbox, BSD-2-Clause), downsampled to 2.5 mm and
converted to HU by ``python -m training bundle_template``; its licence and a SOURCE note
lie beside it in ``BrainLobeSeg/Resources/Atlas``.

Only numpy and SimpleITK are used (the inference-path rule).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .resources import bundled_dir

#: Environment variable that points at another folder holding the reference files.
ATLAS_ENV = "BRAINLOBESEG_ATLAS"
TEMPLATE_FILE = "rorden-ct-template-hu-2.5mm.nii.gz"
LICENSE_FILE = "LICENSE-Clinical-BSD-2-Clause.txt"
SOURCE_FILE = "SOURCE.md"


def atlas_dir() -> Path:
    """``$BRAINLOBESEG_ATLAS``, else the extension's ``Resources/Atlas`` (or a wheel's
    ``bundled_atlas``; see :mod:`resources`)."""
    return bundled_dir(ATLAS_ENV, "Atlas", "bundled_atlas")


@functools.lru_cache(maxsize=2)
def _read_template(path: str) -> sitk.Image:
    image = sitk.ReadImage(path, sitk.sitkFloat32)
    if image.GetDimension() != 3 or min(image.GetSize()) < 16:
        raise InputError(f"the reference head {path} is not a 3D volume.",
                         "Reinstall BrainLobeSeg (or rebuild it: python -m training bundle_template).")
    arr = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(arr).all() or float(arr.max()) < 300.0 or float(arr.min()) > -500.0:
        raise InputError(f"the reference head {path} does not look like a head CT in HU.",
                         "Reinstall BrainLobeSeg (or rebuild it: python -m training bundle_template).")
    return image


def upright_template() -> sitk.Image:
    """The upright reference head CT (float32 HU, LPS, 2.5 mm), read once per process.

    Callers get a fresh copy, so nothing can change the cached image.
    """
    path = atlas_dir() / TEMPLATE_FILE
    if not path.is_file():
        raise InputError(f"the reference head for the automatic alignment is missing ({path}).",
                         "Reinstall BrainLobeSeg, give a transform file, or pass --assume-upright.")
    return sitk.Image(_read_template(str(path)))
