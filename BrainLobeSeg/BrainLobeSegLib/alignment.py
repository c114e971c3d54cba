"""Automatic upright alignment: estimate the head pose ``R`` (upright -> scan).

When a scan comes without the radiologist's transform file, the engine would segment the
head as it lies in the scanner; a tilted head then puts the ASPECTS levels on the wrong
slices. This module estimates ``R`` in the project's convention (see :mod:`transforms`)
and writes it as an ITK-SNAP transform file, so the user can open it in ITK-SNAP or
Slicer, check it and edit it; nothing is applied silently.

Two steps, both on a coarse (3.5 mm) isotropic copy of the head (:mod:`head_grid`):

1. **Mid-sagittal plane** (roll and yaw, :mod:`symmetry_plane`): the head is nearly
   mirror-symmetric, so the plane that best matches the head with its reflection is the
   mid-sagittal plane. It needs no template and holds for any head.
2. **The reference head** (pitch, and a refinement of all three angles,
   :mod:`reference_registration`): the upright reference head in the models' MNI frame
   is registered to the scan by a rotation, one size and the head's proportions, started
   from the plane's roll and yaw at a few pitches; the plane's roll and yaw are kept
   where they correlate better with the scan than the registration's own.

The rotation found is written about the head centre (``R(c) = c``), so the upright
space overlaps the scan and the file's translation stays small and readable.

The estimate is then checked against the regions a model finds (:mod:`region_pose`,
which also holds the ``brainlobeseg align`` command).

Accuracy on synthesised tilted head CTs: ``Testing/benchmarks/alignment_bench.py`` and
``Testing/benchmarks/ALIGNMENT_RESULTS.md``.
Only numpy and SimpleITK are used (the inference-path rule).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from . import geometry, numpy_pages, transforms
from .errors import InputError
from .head_grid import WORK_SPACING_MM, working_image_steps
from .reference_registration import (bundled_reference, brain_centroid, match_image, prepare_reference,
                                     register_reference, starting_scales)
from .steps import ProgressFn, Steps, run_steps, timed, within
from .symmetry_plane import symmetry_plane_steps

#: Below this correlation with the reference head the pose is not trusted (head CTs
#: reach 0.86-0.96 on synthesised scans and 0.77 on the real scan with a craniotomy).
MIN_MATCH = 0.5


@dataclass
class PoseEstimate:
    """The estimated head pose and the evidence behind it."""

    transform: sitk.AffineTransform   # R: upright -> scan (LPS), rotation about ``centre``
    normal: np.ndarray                # mid-sagittal plane normal in the scan (LPS), x > 0
    centre: np.ndarray                # head centre on the plane (LPS mm); R(centre) = centre
    pitch_deg: float                  # nod of the head (see :func:`pitch_of`)
    symmetry_rmse: float              # HU-clipped RMS left-right difference at the optimum
    match: float                      # correlation with the reference head (1: identical)
    scales: Tuple[float, float, float]  # head size against the reference's, per axis
    seconds: float
    # the check against the regions a model found (:mod:`region_pose`): their remaining
    # rotation in degrees (None: not checked), and whether the pose was corrected by it
    region_residual_deg: Optional[float] = None
    region_corrected: bool = False
    plane_roll: bool = False   # roll and yaw from the mid-sagittal plane, not the registration

    @property
    def angle_deg(self) -> float:
        """How far the head is from upright, in degrees."""
        return transforms.rotation_angle_deg(self.transform)


# ----------------------------------------------------------------------------- the estimate

def estimate_pose(scan: sitk.Image, template: Optional[sitk.Image] = None,
                  spacing: float = WORK_SPACING_MM,
                  progress: Optional[ProgressFn] = None) -> PoseEstimate:
    """Estimate ``R`` (upright -> scan) for a head CT: symmetry plane, then the
    registration of the upright reference head (``template``, default the bundled one)."""
    return run_steps(estimate_pose_steps(scan, template, spacing, progress))


def estimate_pose_steps(scan: sitk.Image, template: Optional[sitk.Image] = None,
                        spacing: float = WORK_SPACING_MM,
                        progress: Optional[ProgressFn] = None) -> "Steps[PoseEstimate]":
    """:func:`estimate_pose` in steps (see :mod:`steps`); ``seconds`` counts only the
    time spent in the steps."""
    if not (math.isfinite(spacing) and 0.5 <= spacing <= 10.0):
        raise InputError(f"--spacing {spacing:g} is outside 0.5..10 mm.",
                         f"Leave it out (default {WORK_SPACING_MM:g} mm) or give a value in that range.")
    work = _estimate_steps(scan, template, spacing, progress or (lambda f, m: None))
    est, seconds = yield from timed(within(numpy_pages.without_numpy_huge_pages, work))   # as the engine's steps
    return dataclasses.replace(est, seconds=seconds)


def _estimate_steps(scan: sitk.Image, template: Optional[sitk.Image], spacing: float,
                    report: ProgressFn) -> "Steps[PoseEstimate]":
    report(0.0, "finding the head")
    img, mask, fov, hu = yield from working_image_steps(scan, spacing)
    if mask.sum() < 100:
        raise InputError("no head found in the scan (too few voxels above "
                         f"{geometry.HEAD_THRESHOLD_HU:.0f} HU).", "Give a head CT in HU.")
    report(0.15, "mid-sagittal plane")
    yield
    normal, offset, head_centre, rmse = yield from symmetry_plane_steps(img, mask, fov)
    plane_rotation = transforms.rotation_taking(np.array([1.0, 0.0, 0.0]), normal)
    brain, brain_ml = brain_centroid(hu, mask, fov)
    brain = brain - (float(brain @ normal) - offset) * normal    # on the mid-sagittal plane
    report(0.45, "matching the reference head")
    yield
    ref = bundled_reference(float(spacing)) if template is None else prepare_reference(template, spacing)
    yield   # the reference, the scan's matching image and the first registration: a step each
    scan_match = match_image(hu)
    yield
    match = yield from register_reference(scan_match, fov, ref, plane_rotation, (brain, head_centre),
                                          scales=starting_scales(brain_ml, ref.brain_ml))
    if match.correlation < MIN_MATCH:
        raise InputError(f"the scan does not match a head well enough to find its pose "
                         f"(correlation with the reference head {match.correlation:.2f}, below "
                         f"{MIN_MATCH}).", "Check that it is a head CT in HU; or give the head's "
                         "transform file, or state that the head is upright.")
    m = np.asarray(match.transform.GetMatrix()).reshape(3, 3)
    rotation = transforms.nearest_rotation(m)
    head_centre = np.asarray(match.transform.TransformPoint(tuple(float(c) for c in ref.centre)))
    report(1.0, "done")
    scales = tuple(float(v) for v in np.linalg.svd(m, compute_uv=False))
    return PoseEstimate(transforms.pose_transform(rotation, head_centre), normal, head_centre,
                        pitch_of(rotation), rmse, match.correlation, scales, 0.0,
                        plane_roll=match.plane_roll)


def pitch_of(rotation: np.ndarray) -> float:
    """Nodding angle (degrees): how far the upright front-back axis is turned towards
    the scan's head-foot axis (positive: the same sense as :func:`rotation_x`)."""
    v = rotation @ np.array([0.0, 1.0, 0.0])
    return math.degrees(math.atan2(v[2], v[1]))


def angle_error_deg(estimated: sitk.Transform, truth: sitk.Transform) -> float:
    """Rotation angle of ``R_est^-1 ∘ R_true``: 0 when the poses agree."""
    m = np.linalg.inv(transforms.matrix_of(estimated)) @ transforms.matrix_of(truth)
    return transforms.rotation_angle_deg(transforms.affine_from_matrix(m))


# ----------------------------------------------------------------------------- choosing the pose

#: Name of the estimated transform written next to a case's outputs.
ESTIMATED_SUFFIX = "-upright-estimated.txt"


@dataclass
class PoseChoice:
    """The transform a run uses and where it came from."""

    transform: sitk.AffineTransform
    source: str                                   # "file", "estimated" or "assumed upright"
    estimate: Optional[PoseEstimate] = None       # set when estimated


def choose_pose(scan: sitk.Image, transform_path: Optional[str], invert: bool = False,
                assume_upright: bool = False, progress: Optional[ProgressFn] = None) -> PoseChoice:
    """The head pose for a run: a transform file always wins; without one the pose is
    estimated, unless the user states that the head is upright.

    Treating a tilted head as upright silently puts the ASPECTS levels on the wrong
    slices, so "no transform" no longer means "identity" unless asked for.
    """
    if transform_path:
        if assume_upright:
            raise InputError("--assume-upright and --transform exclude each other.",
                             "Give the transform file, or state that the head is upright.")
        return PoseChoice(transforms.read_transform(transform_path, invert=invert), "file")
    if invert:
        raise InputError("--invert-transform needs a --transform file.", "Leave it out, or give the file.")
    if assume_upright:
        return PoseChoice(transforms.identity(), "assumed upright")
    est = estimate_pose(scan, progress=progress)
    return PoseChoice(est.transform, "estimated", est)


# ----------------------------------------------------------------------------- command line

def scan_stem(path: str) -> str:
    """A scan's name without folder and image extensions (``head.nii.gz`` -> ``head``)."""
    name = os.path.basename(os.path.normpath(path))
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def describe(est: PoseEstimate) -> str:
    """One line for the user: how far from upright, and how sure."""
    regions = ""
    if est.region_residual_deg is not None:
        regions = (f", corrected by {est.region_residual_deg:.1f} degrees from the regions found"
                   if est.region_corrected else
                   f", regions found agree within {est.region_residual_deg:.1f} degrees")
    return (f"estimated head pose: {est.angle_deg:.1f} degrees from upright (pitch "
            f"{est.pitch_deg:+.1f}), match with the reference head {est.match:.2f}"
            f"{regions}, in {est.seconds:.1f} s")
