"""Post-processing of the fused probabilities: regions on the brain only, in one piece.

A radiologist never labels bone, scalp or air, and an ASPECTS region is one connected
piece of brain. Networks sometimes disagree (a few ml of cortex label reaching into the
inner table, a 0.4 ml insula blob 40 mm below the brain), so before the labels are taken:

1. **Not in bone or air**: voxels of the skull (dense pieces larger than
   :data:`MIN_BONE_ML`, denser than :data:`BONE_HU`) or thinner than :data:`AIR_HU`
   (after the scan's calibration shift, :func:`geometry.calibration_shift`) become
   background. A calcification inside a region (basal ganglia, choroid plexus) is a small
   dense piece and keeps its label, as a radiologist would label it.
   The same holds on the scan's own grid, where the labels are finally written
   (:func:`strip_bone`): the inner table's partial volume at 2 mm is bone
   at 0.5 mm.
2. **One piece per region**: of each region's connected pieces (26-connected, on the
   model grid) only the largest stays; the others become background. Scalp is cut from
   the brain by the skull, which step 1 has emptied, so labels there are stray pieces too.

Both act on the probabilities (the removed voxels become certain background), so the
labels, the 1 mm refinement and the uncertainty all see the same result, in every mode.
Only numpy and SimpleITK are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import SimpleITK as sitk

from . import geometry
from .steps import Steps, run_steps

#: Calibrated HU above which a voxel is bone (dense cortical bone is > 300; the inner
#: table's partial volume with brain reaches 150 at 2 mm), and below which it is air
#: or fat (no brain tissue is below -100 HU).
BONE_HU = 150.0
AIR_HU = -100.0
#: Dense pieces smaller than this (ml) are calcifications, not skull.
MIN_BONE_ML = 2.0


@dataclass
class CleanupReport:
    """What the clean-up removed, in voxels of the model grid, per label id."""

    outside_brain: Dict[int, int]
    stray_pieces: Dict[int, int]


@dataclass
class NonBrain:
    """Skull and air of the upright head on a model grid (bool, z y x), and the scan's
    calibration shift (HU) they were found with."""

    skull: np.ndarray
    air: np.ndarray
    shift: float

    @property
    def mask(self) -> np.ndarray:
        return self.skull | self.air


def find_non_brain(hu: np.ndarray, spacing_mm) -> NonBrain:
    """Skull (dense pieces larger than :data:`MIN_BONE_ML`) and air of an upright HU
    volume on a model grid."""
    shift = geometry.calibration_shift(hu)
    level = hu - np.float32(shift)
    dense = sitk.GetImageFromArray((level > BONE_HU).astype(np.uint8))
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    skull = sitk.RelabelComponent(sitk.ConnectedComponent(dense, True), sortByObjectSize=True,
                                  minimumObjectSize=int(np.ceil(MIN_BONE_ML / voxel_ml)))
    return NonBrain(sitk.GetArrayFromImage(skull) > 0, level < AIR_HU, shift)


def non_brain_mask(hu: np.ndarray, spacing_mm) -> np.ndarray:
    """Skull and air (bool, same shape) of an upright HU volume on a model grid."""
    return find_non_brain(hu, spacing_mm).mask


def strip_bone(labels: np.ndarray, hu: np.ndarray, near_skull: np.ndarray,
               shift: float) -> np.ndarray:
    """``labels`` with the voxels that lie in bone at the full resolution made background
    (changed in place and returned; all arrays on one grid).

    The model grid (2 mm) leaves the inner table's partial volume to the labels; on the
    scan's own grid (0.5 mm) those voxels are bone (> :data:`BONE_HU`, calibration
    ``shift`` added). Only voxels near the model grid's skull (``near_skull`` > 0) count,
    so a calcification inside a region keeps its label.
    """
    labels[(hu > BONE_HU + shift) & (near_skull > 0)] = 0
    return labels


def largest_pieces(labels: np.ndarray) -> "Steps[np.ndarray]":
    """Bool mask of the voxels outside each region's largest 26-connected piece (one
    step per region)."""
    stray = np.zeros(labels.shape, bool)
    for label in np.unique(labels):
        if label == 0:
            continue
        box = geometry.crop_box(labels.shape, labels == label)
        region = (labels[box] == label).astype(np.uint8)
        pieces = sitk.GetArrayFromImage(sitk.RelabelComponent(
            sitk.ConnectedComponent(sitk.GetImageFromArray(region), True), sortByObjectSize=True))
        stray[box] |= pieces > 1
        yield
    return stray


def labels_in_slabs(probs: np.ndarray, slab: int = 16) -> "Steps[np.ndarray]":
    """The most probable class per voxel of ``(classes, z, y, x)`` probabilities as uint8
    labels, ``slab`` z-planes per step. Each slab's argmax output stays under the 4 MB from
    which NumPy asks for transparent huge pages: on this project's VM the whole head's
    8.8 MB argmax output stalled 0.8-1.4 s in its page faults."""
    out = np.empty(probs.shape[1:], np.uint8)
    for z in range(0, probs.shape[1], slab):
        out[z:z + slab] = np.argmax(probs[:, z:z + slab], axis=0)
        yield
    return out


def clean_probabilities(probs: np.ndarray, non_brain: np.ndarray) -> Tuple[np.ndarray, CleanupReport]:
    """Apply the two rules to fused probabilities ``(classes, z, y, x)``, in place; return
    the labels they now give (their argmax, computed once here) and what was removed."""
    return run_steps(clean_probabilities_steps(probs, non_brain))


def clean_probabilities_steps(probs: np.ndarray, non_brain: np.ndarray
                              ) -> "Steps[Tuple[np.ndarray, CleanupReport]]":
    """:func:`clean_probabilities` in steps (see :mod:`steps`)."""
    labels = yield from labels_in_slabs(probs)
    outside = non_brain & (labels > 0)
    outside_counts = _counts(labels[outside])
    labels[outside] = 0
    yield
    stray = yield from largest_pieces(labels)
    stray_counts = _counts(labels[stray])
    removed = outside | stray
    if removed.any():
        probs[:, removed] = 0.0
        probs[0, removed] = 1.0
        labels[stray] = 0
    return labels, CleanupReport(outside_counts, stray_counts)


def _counts(values: np.ndarray) -> Dict[int, int]:
    ids, counts = np.unique(values, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts) if i}
