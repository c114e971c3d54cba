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
import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk

from . import regions
from .errors import InputError
from .resources import bundled_dir

#: Environment variable that points at another folder holding the reference files.
ATLAS_ENV = "BRAINLOBESEG_ATLAS"
TEMPLATE_FILE = "rorden-ct-template-hu-2.5mm.nii.gz"
LICENSE_FILE = "LICENSE-Clinical-BSD-2-Clause.txt"
SOURCE_FILE = "SOURCE.md"
CENTROIDS_FILE = "region-centroids.json"
CENTROIDS_LICENSE_FILE = "LICENSE-aspects-on-cta-MIT.txt"


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


@functools.lru_cache(maxsize=2)
def _read_centroids(path: str) -> Tuple[Tuple[int, Tuple[float, float, float]], ...]:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)["centroids"]
        pairs = tuple((int(k), tuple(float(v) for v in xyz)) for k, xyz in raw.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"the region centroids {path} cannot be read ({exc}).",
                         "Reinstall BrainLobeSeg (or rebuild them: python -m training bundle_template).")
    if (sorted(k for k, _ in pairs) != list(range(1, regions.NUM_LABELS + 1))
            or any(len(p) != 3 or not np.isfinite(p).all() for _, p in pairs)):
        raise InputError(f"the region centroids {path} do not hold one point per region.",
                         "Reinstall BrainLobeSeg (or rebuild them: python -m training bundle_template).")
    return pairs


def region_centroids() -> Dict[int, np.ndarray]:
    """Where each region's centroid lies in the upright frame (LPS mm), by label id: the
    alignment's check of a pose against the regions a model found."""
    path = atlas_dir() / CENTROIDS_FILE
    if not path.is_file():
        raise InputError(f"the region centroids for the automatic alignment are missing ({path}).",
                         "Reinstall BrainLobeSeg, give a transform file, or pass --assume-upright.")
    return {k: np.array(p) for k, p in _read_centroids(str(path))}
