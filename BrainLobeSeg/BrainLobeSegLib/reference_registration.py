"""Register the upright reference head to a scan: the pitch, and a refinement of roll and yaw.

Symmetry (:mod:`symmetry_plane`) cannot see the pitch. The upright reference, by default
the bundled Rorden CT template in the MNI frame that the models and label files use
(:mod:`reference`), is registered to the scan (correlation of images clipped to -50..300
HU after the scan's calibration shift, so scanner offsets and grey/white densities do not
matter). The map is a rotation, a shift and a size per head axis (``M = s Q diag(a)``, no
shear): heads differ in proportions along their own axes, and a free affine map could
trade rotation for shear wherever the head's outline is smooth (on the code phantoms'
ellipsoid it settled 3-16 degrees off in pitch). Starting pitches -20, 0 and +20 degrees
from the plane's roll and yaw cover heads pitched by +-30 degrees (scans angled along the
orbitomeatal line), each started from the brain's and from the head's centroid and, for a
head much larger or smaller than the reference, at its size too; the best of these coarse
similarity runs is refined by alternating the per-axis sizes and the similarity.
Reference points that fall outside the scan's field of view do not count, so a cut vertex
or face does not bias it. Where the head's outline barely fixes the roll (a nearly round
cross-section), the registration can stop a few degrees off; the plane's roll and yaw are
taken instead when they correlate better with the scan.

SimpleITK maps fixed (reference, upright) points to moving (scan) points, which is the
direction of ``R`` itself (:mod:`transforms`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import geometry, reference, transforms
from .head_grid import WORK_SPACING_MM, Sampler, index_points, mask_image, working_image
from .optimise import nelder_mead
from .steps import Steps

#: HU window and smoothing (mm, sigma) of the image matched with the reference head.
MATCH_HU = (-50.0, 300.0)
MATCH_SMOOTHING_MM = 2.0
#: Pitch starting points (degrees) of the reference registration (see module docstring).
PITCH_STARTS_DEG = (-20.0, 0.0, 20.0)
#: Share of the reference's masked voxels sampled per metric evaluation, and the
#: optimiser's iteration cap (it usually stops earlier on its step size).
MATCH_SAMPLING = 0.2
MATCH_ITERATIONS = 200
#: Rounds of the head's proportions, then the similarity (see :func:`register_reference`);
#: the proportions' search range per axis (heads differ by about +-12 % in the
#: synthesis), its sample of reference points and its iteration cap.
SIZE_ROUNDS = 2
SIZE_RANGE = (0.8, 1.25)
SIZE_POINTS = 20000
SIZE_ITERATIONS = 40


def match_image(hu: sitk.Image) -> sitk.Image:
    """The image compared with the reference head: HU clipped to :data:`MATCH_HU`, smoothed.

    The window keeps air, soft tissue and bone in order with contrasts that do not hang
    on grey/white-matter densities, which differ between scanners, heads and the
    template's smoothed mean (a brain window biased the pitch by about 1 degree on the
    synthesised scans, this one did not; ``Testing/benchmarks/alignment_bench.py``).
    """
    clipped = sitk.Clamp(hu, sitk.sitkFloat32, *MATCH_HU)
    return sitk.SmoothingRecursiveGaussian(clipped, MATCH_SMOOTHING_MM)


@dataclass
class Reference:
    """The upright reference head, prepared for matching (made once per template)."""

    image: sitk.Image     # match-window feature image, identity direction
    mask: sitk.Image      # where it is compared: the head and a margin of air around it
    centre: np.ndarray       # centroid of the brain (LPS mm), see :func:`brain_centroid`
    head_centre: np.ndarray  # centroid of the head (LPS mm)
    brain_ml: float          # volume of that brain
    # every compared voxel's centre (LPS mm) and the image there: a deterministic
    # correlation (:class:`_Correlation`) that can rank nearly equal candidate maps
    points: np.ndarray
    values: np.ndarray


def prepare_reference(template: sitk.Image, spacing: float = WORK_SPACING_MM) -> Reference:
    """Feature image and comparison mask of an upright head CT (in HU)."""
    _, mask, fov, hu = working_image(template, spacing)
    image = match_image(hu)
    # air around the head counts (the outline carries the pitch), but not beyond the
    # template's own field of view
    near = sitk.BinaryDilate(mask_image(mask, image), [3, 3, 3])
    near = sitk.And(near, mask_image(fov, image))
    head = index_points(hu, mask, max_points=200000).mean(axis=0)
    centre, brain_ml = brain_centroid(hu, mask, fov)
    points = index_points(image, sitk.GetArrayViewFromImage(near) > 0, max_points=None)
    return Reference(image, near, centre, head, brain_ml, points, Sampler(image, 0.0)(points))


def brain_centroid(hu: sitk.Image, head: np.ndarray, fov: np.ndarray) -> Tuple[np.ndarray, float]:
    """Centroid (LPS mm) and volume (ml) of the intracranial soft tissue, else of the head.

    The registration starts by putting the reference's brain on the scan's: the head's
    centroid would move with how much neck or face the scan holds (up to 100 mm of neck
    in view), the brain's hardly (a cut vertex moves it by a few mm). The brain is the
    largest 0-100 HU region (calibration-corrected) after an opening of 7 mm, which cuts
    it from the scalp, the face and the spinal canal.
    """
    soft = sitk.And(sitk.And(hu > 0.0, hu < 100.0), mask_image(fov, hu))
    radius = max(1, int(round(7.0 / hu.GetSpacing()[0])))
    soft = sitk.BinaryMorphologicalOpening(sitk.Cast(soft, sitk.sitkUInt8), [radius] * 3)
    comps = sitk.GetArrayFromImage(
        sitk.RelabelComponent(sitk.ConnectedComponent(soft), sortByObjectSize=True))
    brain = comps == 1
    # a brain is at least 0.5 l; less means the opening found no brain (e.g. a phantom)
    if brain.sum() * float(np.prod(hu.GetSpacing())) < 5e5:
        brain = head
    volume_ml = float(brain.sum() * np.prod(hu.GetSpacing())) / 1000.0
    return index_points(hu, brain, max_points=200000).mean(axis=0), volume_ml


@functools.lru_cache(maxsize=2)
def bundled_reference(spacing: float) -> Reference:
    """The bundled upright head (:mod:`reference`), prepared once per working spacing."""
    return prepare_reference(reference.upright_template(), spacing)


@dataclass
class Match:
    """The reference head as registered to a scan: ``T(p) = M (p - c) + c + t``."""

    transform: sitk.AffineTransform   # the whole map, proportions included
    correlation: float     # normalised correlation at the optimum (1: identical)
    similarity: sitk.Similarity3DTransform   # its rotation, size and shift only
    # roll and yaw taken from the mid-sagittal plane (see :func:`_plane_roll_if_better`)
    plane_roll: bool = False


def register_reference(scan_img: sitk.Image, scan_fov: np.ndarray, ref: Reference,
                       plane_rotation: np.ndarray, centres: Sequence[np.ndarray],
                       starts: Sequence[float] = PITCH_STARTS_DEG,
                       scales: Sequence[float] = (1.0,)) -> "Steps[Match]":
    """Register the upright reference to the scan: ``T(p) = s Q diag(a) (p - c) + c + t``,
    a rotation ``Q``, one size ``s`` and the head's proportions ``a`` along the
    reference's axes (removed afterwards by :func:`nearest_rotation`).

    SimpleITK maps fixed (reference, upright) points to moving (scan) points, which is the
    direction of ``R`` itself. Starting from the mid-sagittal plane's roll and yaw, a few
    starting pitches are tried on a grid twice as coarse (pitch has local optima 30-40
    degrees apart, the skull being nearly round), each from two starting positions: the
    scan's brain centroid on the reference's, and the head centroid on the reference's
    (``centres``, in that order; the first is robust to neck in view, the second when no
    brain is found), and from each of ``scales`` (a head much larger or smaller than the
    reference can settle with the reference shrunk into its skull). The best similarity
    map is refined: :data:`SIZE_ROUNDS` rounds of fitting ``a`` with the similarity held,
    then the similarity with ``a`` held, the last at the working resolution. Last, the
    roll and yaw of the mid-sagittal plane replace the registration's where they
    correlate better (:func:`_plane_roll_if_better`). In steps of one registration or size fit each.
    """
    moving_mask = mask_image(scan_fov, scan_img)
    yield
    best: Optional[Match] = None
    pairs = list(zip(centres, (ref.centre, ref.head_centre)))   # scan point <- reference point
    for scale, (scan_centre, ref_centre), pitch in itertools.product(scales, pairs, starts):
        rotation = plane_rotation @ transforms.rotation_x(pitch)
        sim = sitk.Similarity3DTransform()
        sim.SetCenter(tuple(float(c) for c in ref.centre))
        sim.SetMatrix(tuple(float(v) for v in rotation.ravel()))
        sim.SetScale(float(scale))
        # T(ref_centre) = scan_centre at the start
        sim.SetTranslation(tuple(float(v) for v in scan_centre - ref.centre
                                 - scale * rotation @ (ref_centre - ref.centre)))
        match = _fit_similarity(ref, scan_img, moving_mask, sim, np.ones(3), shrink=2)
        if best is None or match.correlation > best.correlation:
            best = match
        yield
    assert best is not None
    sim, sizes = best.similarity, np.ones(3)
    correlation = _Correlation.of(ref, scan_img, scan_fov)
    sample = correlation.subsample(SIZE_POINTS)
    for k in range(SIZE_ROUNDS):
        shrink = 1 if k == SIZE_ROUNDS - 1 else 2
        sizes = _fit_sizes(sample, sim, sizes)
        yield
        best = _fit_similarity(ref, scan_img, moving_mask, sim, sizes, shrink)
        yield
    return _plane_roll_if_better(best, correlation, plane_rotation[:, 0])


def starting_scales(brain_ml: float, reference_ml: float) -> Tuple[float, ...]:
    """1, and the head's size against the reference's (cube root of the brain volumes,
    within 0.85-1.2) when that differs by more than 5 %: a start from the right size
    keeps a large head (or a small one) from a wrong optimum."""
    if brain_ml <= 0 or reference_ml <= 0:
        return (1.0,)
    size = float(np.clip((brain_ml / reference_ml) ** (1.0 / 3.0), 0.85, 1.2))
    return (1.0,) if abs(size - 1.0) <= 0.05 else (1.0, size)


def _fit_similarity(ref: Reference, scan_img: sitk.Image, moving_mask: sitk.Image,
                    sim: sitk.Similarity3DTransform, sizes: np.ndarray, shrink: int) -> Match:
    """Fit the similarity ``sim`` (changed in place) of the reference stretched by
    ``sizes`` to the scan, on grids shrunk by ``shrink``. The match's transform is the
    whole map ``sim ∘ diag(sizes)`` in the reference's own coordinates."""
    centre = np.asarray(ref.centre)
    fixed = geometry.stretched_about(ref.image, sizes, centre)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()   # offset and gain of the scanner do not matter
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(MATCH_SAMPLING, seed=1)
    reg.SetMetricFixedMask(geometry.stretched_about(ref.mask, sizes, centre))
    reg.SetMetricMovingMask(moving_mask)   # reference points outside the scan's view
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel([shrink])
    reg.SetSmoothingSigmasPerLevel([0.0])
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=MATCH_ITERATIONS,
        gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(sim, inPlace=True)
    reg.Execute(fixed, scan_img)
    whole = sitk.AffineTransform(3)
    whole.SetCenter(sim.GetCenter())
    whole.SetMatrix(tuple(float(v) for v in (np.asarray(sim.GetMatrix()).reshape(3, 3)
                                             @ np.diag(sizes)).ravel()))
    whole.SetTranslation(sim.GetTranslation())
    return Match(whole, -float(reg.GetMetricValue()), sim)


class _Correlation:
    """Normalised correlation of the reference with the scan under a map
    ``T(p) = M (p - c) + shift`` (``c``: the reference's centre), on fixed reference
    points; points that land outside the scan's field of view do not count.
    Deterministic, unlike the registration's random sampling, so candidate maps can be
    ranked by it: on all of the reference's voxels, differences of 1e-4 still rank two
    roll angles of the code phantoms right; a sample (:meth:`subsample`) is enough for the
    many evaluations of a fit."""

    def __init__(self, centre: np.ndarray, points: np.ndarray, values: np.ndarray,
                 scan: Sampler) -> None:
        self.centre, self.points, self.values, self.scan = centre, points, values, scan

    @classmethod
    def of(cls, ref: Reference, scan_img: sitk.Image, scan_fov: np.ndarray) -> "_Correlation":
        """On all of the reference's voxels."""
        return cls(ref.centre, ref.points, ref.values, Sampler(scan_img, float(MATCH_HU[0]), scan_fov))

    def subsample(self, count: int, seed: int = 1) -> "_Correlation":
        """The same correlation on ``count`` of the points, drawn at random."""
        keep = np.random.default_rng(seed).choice(len(self.points), min(count, len(self.points)),
                                                  replace=False)
        return _Correlation(self.centre, self.points[keep], self.values[keep], self.scan)

    def __call__(self, matrix: np.ndarray, shift: np.ndarray) -> float:
        moved = (self.points - self.centre) @ matrix.T + shift
        ok = self.scan.valid(moved)
        f = self.values[ok] - self.values[ok].mean()
        g = self.scan(moved[ok])
        g = g - g.mean()
        return float(f @ g) / float(np.sqrt((f @ f) * (g @ g)) + 1e-9)


def _fit_sizes(correlation: _Correlation, sim: sitk.Similarity3DTransform,
               sizes: np.ndarray) -> np.ndarray:
    """The head's proportions ``a`` (per reference axis, within :data:`SIZE_RANGE`) that
    best correlate with the scan with ``sim`` held (``correlation`` on a sample of
    :data:`SIZE_POINTS` points): Nelder-Mead over ``log a`` (ITK's
    registration cannot compose a similarity after a per-axis scale with only the scale
    free)."""
    m = np.asarray(sim.GetMatrix()).reshape(3, 3)
    shift = correlation.centre + np.asarray(sim.GetTranslation())

    def cost(log_sizes: np.ndarray) -> float:
        return -correlation(m * np.exp(np.clip(log_sizes, *np.log(SIZE_RANGE))), shift)

    x, _ = nelder_mead(cost, np.log(sizes), [0.04, 0.04, 0.04], iterations=SIZE_ITERATIONS)
    return np.exp(np.clip(x, *np.log(SIZE_RANGE)))


def _plane_roll_if_better(match: Match, correlation: _Correlation, normal: np.ndarray) -> Match:
    """The match, or the match turned so that its left-right axis is the mid-sagittal
    plane's normal (the smallest such turn about the mapped reference centre: pitch and
    position stay), whichever correlates better with the scan.

    On a head whose outline is nearly round across the front-back axis (the code
    phantoms' ellipsoid brain), the correlation hardly changes with roll, and the
    registration stops up to 4 degrees off where the symmetry plane is exact; on real and
    synthesised heads, which are not mirror-symmetric, the registration's roll is usually
    the better one. The same objective decides between the two candidates.
    """
    m = np.asarray(match.transform.GetMatrix()).reshape(3, 3)
    shift = np.asarray(match.transform.TransformPoint(tuple(float(c) for c in correlation.centre)))
    turn = transforms.rotation_taking(transforms.nearest_rotation(m) @ np.array([1.0, 0.0, 0.0]), normal)
    if correlation(turn @ m, shift) <= correlation(m, shift):
        return match
    turned = sitk.AffineTransform(match.transform)
    turned.SetMatrix(tuple(float(v) for v in (turn @ m).ravel()))
    sim = sitk.Similarity3DTransform(match.similarity)
    # ITK takes the size from the matrix's determinant
    sim.SetMatrix(tuple(float(v) for v in (turn @ np.asarray(sim.GetMatrix()).reshape(3, 3)).ravel()))
    return dataclasses.replace(match, transform=turned, similarity=sim, plane_roll=True)
