"""Automatic upright alignment: estimate the head pose ``R`` (upright -> scan).

When a scan comes without the radiologist's transform file, the engine would segment the
head as it lies in the scanner; a tilted head then puts the ASPECTS levels on the wrong
slices. This module estimates ``R`` in the project's convention (see :mod:`transforms`)
and writes it as an ITK-SNAP transform file, so the user can open it in ITK-SNAP or
Slicer, check it and edit it; nothing is applied silently.

Two steps, both on a coarse (3.5 mm) isotropic copy of the head:

1. **Mid-sagittal plane** (roll and yaw): the head is nearly mirror-symmetric, so the
   plane that maximises left-right similarity of the image with its reflection is the
   mid-sagittal plane. The cost is the mean squared difference between the image (brain
   window, lightly smoothed) and its reflection; a coarse grid over plane normals
   (+-24 degrees around the scan's left-right axis, whole head), then Nelder-Mead over
   normal and offset on the central brain (55 mm around the head's centroid). Points
   whose mirror image falls outside the scan's field of view are left out (a cut vertex
   is a plane of the *scan* and would pull the plane towards the scan's axes). Symmetry
   needs no template and holds for any head.
2. **The reference head** (pitch, and a refinement of all three angles): the upright
   reference, by default the bundled Rorden CT template in the MNI frame that the models
   and label files use (:mod:`reference`), is registered to the scan (correlation of
   images clipped to -50..300 HU after the scan's calibration shift, so scanner offsets
   and grey/white densities do not matter). The map is a rotation, a shift and a size
   per head axis (``M = s Q diag(a)``, no shear): heads differ in proportions along
   their own axes, and a free affine map could trade rotation for shear wherever the
   head's outline is smooth (on the code phantoms' ellipsoid it settled 3-16 degrees off
   in pitch). Pitch is what symmetry cannot see; starting pitches -20, 0 and +20 degrees
   from the plane's roll and yaw cover heads pitched by +-30 degrees (scans angled along
   the orbitomeatal line), each started from the brain's and from the head's centroid
   and, for a head much larger or smaller than the reference, at its size too; the best
   of these coarse similarity runs is refined by alternating the per-axis sizes and the
   similarity. Reference points that fall outside the scan's field of view do not
   count, so a cut vertex or face does not bias it.

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
import functools
import itertools
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import geometry, reference, transforms
from .errors import InputError
from .steps import Steps, run_steps, timed

#: Working resolution (mm). 3-4 mm keeps the skull and ventricles, and makes one cost
#: evaluation a few milliseconds.
WORK_SPACING_MM = 3.5
#: HU range of the feature image: the brain window. Ventricles, deep grey nuclei and the
#: brain/CSF border carry the roll; bone and air are clipped flat (the skull outline of a
#: nearly round head says little about roll, and bone density varies with thickness).
FEATURE_HU = (0.0, 80.0)
#: Half-range (degrees) of the coarse search over the symmetry plane's normal.
SEARCH_DEG = 24.0
COARSE_STEP_DEG = 4.0
#: Margin (mm) of the working grid around the head box.
GRID_MARGIN_MM = 30.0
#: Gaussian smoothing (mm, sigma) of the feature image: keeps the skull, ventricles and
#: the brain outline, blurs thin sulci whose partial volume in thick slices differs
#: between the sides of a tilted head.
SMOOTHING_MM = 2.5
#: Radius (mm) around the head's centroid used by the fine symmetry search.
CORE_RADIUS_MM = 55.0
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
#: Below this correlation with the reference head the pose is not trusted (head CTs
#: reach 0.86-0.96 on synthesised scans and 0.77 on the real scan with a craniotomy).
MIN_MATCH = 0.5

ProgressFn = Callable[[float, str], None]


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

    @property
    def angle_deg(self) -> float:
        """How far the head is from upright, in degrees."""
        return transforms.rotation_angle_deg(self.transform)


# ----------------------------------------------------------------------------- working image

def _working_image(scan: sitk.Image, spacing: float
                   ) -> Tuple[sitk.Image, np.ndarray, np.ndarray, sitk.Image]:
    """:func:`_working_image_steps` in one go."""
    return run_steps(_working_image_steps(scan, spacing))


def _working_image_steps(scan: sitk.Image, spacing: float
                         ) -> "Steps[Tuple[sitk.Image, np.ndarray, np.ndarray, sitk.Image]]":
    """The head on an identity-direction isotropic grid in the scan's physical space:
    the symmetry feature image (brain window, lightly smoothed), the head mask and the
    field-of-view mask (bool, z y x), and the HU image on that grid, less the scan's
    :func:`geometry.calibration_shift` (both feature windows move with the head's own
    soft tissue, so a scanner's calibration offset changes nothing here).

    The field of view matters: a scan often cuts the head (vertex, chin, nose), and the
    cut faces are planes of the *scan*, not of the head. Compared as air they would pull
    the symmetry plane and the pitch towards the scan's axes, so every comparison below
    uses only points whose partners also lie inside the field of view.
    """
    box = geometry.head_box(scan, transforms.identity())
    yield
    # a margin around the head: a reflected or re-posed head must stay inside the grid,
    # or points leaving it would silently stop counting (a bias towards leaving it)
    box = geometry.HeadBox(tuple(l - GRID_MARGIN_MM for l in box.lower),
                           tuple(u + GRID_MARGIN_MM for u in box.upper), box.midline_x)
    grid = box.grid((spacing,) * 3)
    hu = geometry.upright_resample(scan, transforms.identity(), grid)
    yield
    ones = sitk.Image(scan.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(scan)
    fov_img = sitk.Resample(ones, grid.reference(), transforms.identity(), sitk.sitkNearestNeighbor, 0)
    fov_img = sitk.BinaryErode(fov_img, [1, 1, 1])
    fov = sitk.GetArrayFromImage(fov_img) > 0
    yield
    mask = (hu > geometry.HEAD_THRESHOLD_HU) & fov
    shift = geometry.calibration_shift(hu, mask)
    feat = np.clip(hu - shift, *FEATURE_HU).astype(np.float32)
    img = sitk.SmoothingRecursiveGaussian(grid.image(feat), SMOOTHING_MM)
    return img, mask, fov, grid.image((hu - shift).astype(np.float32))


def match_image(hu: sitk.Image) -> sitk.Image:
    """The image compared with the reference head: HU clipped to :data:`MATCH_HU`, smoothed.

    The window keeps air, soft tissue and bone in order with contrasts that do not hang
    on grey/white-matter densities, which differ between scanners, heads and the
    template's smoothed mean (a brain window biased the pitch by about 1 degree on the
    synthesised scans, this one did not; ``Testing/benchmarks/alignment_bench.py``).
    """
    clipped = sitk.Clamp(hu, sitk.sitkFloat32, *MATCH_HU)
    return sitk.SmoothingRecursiveGaussian(clipped, MATCH_SMOOTHING_MM)


def _index_points(img: sitk.Image, mask: np.ndarray, max_points: int = 30000,
                  seed: int = 0) -> np.ndarray:
    """Physical (x, y, z) LPS points of (a random subset of) the masked voxels."""
    idx = np.argwhere(mask)[:, ::-1].astype(np.float64)  # z y x -> x y z
    if len(idx) > max_points:
        idx = idx[np.random.default_rng(seed).choice(len(idx), max_points, replace=False)]
    return np.asarray(img.GetOrigin()) + idx * np.asarray(img.GetSpacing())


class _Sampler:
    """Trilinear interpolation of an identity-direction image at physical points.

    With ``fov`` (bool, z y x), points outside it are reported through ``valid``.
    """

    def __init__(self, img: sitk.Image, outside: float, fov: Optional[np.ndarray] = None) -> None:
        self.arr = sitk.GetArrayFromImage(img).astype(np.float32)
        self.origin = np.asarray(img.GetOrigin())
        self.spacing = np.asarray(img.GetSpacing())
        self.outside = outside
        self.fov = fov

    def valid(self, pts: np.ndarray) -> np.ndarray:
        """Whether each point lies in the field of view (nearest voxel); points outside
        the working grid are air (the grid holds the whole head with a margin)."""
        f = np.rint((pts - self.origin) / self.spacing).astype(np.int64)
        nz, ny, nx = self.arr.shape
        inside = np.all((f >= 0) & (f < np.array([nx, ny, nz])), axis=1)
        ok = np.ones(len(pts), bool)
        if self.fov is not None:
            g = f[inside]
            ok[inside] = self.fov[g[:, 2], g[:, 1], g[:, 0]]
        return ok

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        f = (pts - self.origin) / self.spacing          # x y z fractional index
        nz, ny, nx = self.arr.shape
        size = np.array([nx, ny, nz])
        inside = np.all((f >= 0) & (f <= size - 1), axis=1)
        f = np.clip(f, 0, size - 1.000001)
        i0 = np.floor(f).astype(np.int64)
        w = (f - i0).astype(np.float32)
        x0, y0, z0 = i0[:, 0], i0[:, 1], i0[:, 2]
        wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
        a = self.arr
        c00 = a[z0, y0, x0] * (1 - wx) + a[z0, y0, x0 + 1] * wx
        c01 = a[z0, y0 + 1, x0] * (1 - wx) + a[z0, y0 + 1, x0 + 1] * wx
        c10 = a[z0 + 1, y0, x0] * (1 - wx) + a[z0 + 1, y0, x0 + 1] * wx
        c11 = a[z0 + 1, y0 + 1, x0] * (1 - wx) + a[z0 + 1, y0 + 1, x0 + 1] * wx
        c0 = c00 * (1 - wy) + c01 * wy
        c1 = c10 * (1 - wy) + c11 * wy
        out = c0 * (1 - wz) + c1 * wz
        out[~inside] = self.outside
        return out


# ----------------------------------------------------------------------------- symmetry plane

def _normal(u: float, v: float) -> np.ndarray:
    """Unit normal from the plane's slopes: ``n ~ (1, u, v)`` (x > 0: patient left)."""
    n = np.array([1.0, u, v])
    return n / np.linalg.norm(n)


def symmetry_cost(sample: _Sampler, pts: np.ndarray, values: np.ndarray, normal: np.ndarray,
                  offset: float) -> float:
    """Mean squared difference between the image and its reflection in the plane
    ``normal . p = offset``, over those of ``pts`` (whose image values are ``values``)
    whose mirror image lies in the field of view."""
    d = pts @ normal - offset
    mirrored = pts - 2.0 * d[:, None] * normal[None, :]
    ok = sample.valid(mirrored)
    if ok.sum() < 0.2 * len(pts):   # the plane sends most of the head out of view
        return float("inf")
    diff = sample(mirrored[ok]) - values[ok]
    return float(np.mean(diff * diff))


def nelder_mead(f: Callable[[np.ndarray], float], x0: Sequence[float], step: Sequence[float],
                iterations: int = 120, tol: float = 1e-4) -> Tuple[np.ndarray, float]:
    """Minimise ``f`` from ``x0`` (plain Nelder-Mead; no scipy on the inference path)."""
    return run_steps(nelder_mead_steps(f, x0, step, iterations, tol))


def nelder_mead_steps(f: Callable[[np.ndarray], float], x0: Sequence[float], step: Sequence[float],
                      iterations: int = 120, tol: float = 1e-4) -> "Steps[Tuple[np.ndarray, float]]":
    """:func:`nelder_mead` in steps of one iteration (see :mod:`steps`)."""
    n = len(x0)
    pts = [np.asarray(x0, float)]
    for i in range(n):
        p = np.asarray(x0, float).copy()
        p[i] += step[i]
        pts.append(p)
    vals = [f(p) for p in pts]
    for _ in range(iterations):
        yield
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * (abs(vals[0]) + 1e-9):
            break
        centroid = np.mean(pts[:-1], axis=0)
        xr = centroid + (centroid - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = centroid + 2.0 * (centroid - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = centroid + 0.5 * (pts[-1] - centroid)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:  # shrink towards the best point
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    best = int(np.argmin(vals))
    return pts[best], vals[best]


def find_symmetry_plane(img: sitk.Image, mask: np.ndarray, fov: Optional[np.ndarray] = None,
                        search_deg: float = SEARCH_DEG, step_deg: float = COARSE_STEP_DEG
                        ) -> Tuple[np.ndarray, float, np.ndarray, float]:
    """The mid-sagittal plane of the head: (normal, offset, centre on the plane, RMS cost).

    Coarse: a grid over the normal's two slopes, the plane through the head's centroid
    (a symmetric head's centroid lies on its symmetry plane). Fine: Nelder-Mead over
    slopes and offset.
    """
    return run_steps(symmetry_plane_steps(img, mask, fov, search_deg, step_deg))


def symmetry_plane_steps(img: sitk.Image, mask: np.ndarray, fov: Optional[np.ndarray] = None,
                         search_deg: float = SEARCH_DEG, step_deg: float = COARSE_STEP_DEG
                         ) -> "Steps[Tuple[np.ndarray, float, np.ndarray, float]]":
    """:func:`find_symmetry_plane` in steps (a row of the coarse grid, an iteration)."""
    pts = _index_points(img, mask)
    sample = _Sampler(img, outside=FEATURE_HU[0], fov=fov)
    values = sample(pts)
    centroid = pts.mean(axis=0)
    best = (math.inf, 0.0, 0.0)
    angles = np.radians(np.arange(-search_deg, search_deg + 1e-6, step_deg))
    coarse = pts[:: max(1, len(pts) // 15000)]
    coarse_values = values[:: max(1, len(pts) // 15000)]
    for a in angles:
        for b in angles:
            u, v = math.tan(a), math.tan(b)
            n = _normal(u, v)
            cost = symmetry_cost(sample, coarse, coarse_values, n, float(n @ centroid))
            if cost < best[0]:
                best = (cost, u, v)
        yield

    # Fine stage: the central brain only (ventricles, deep nuclei, insula). They carry
    # the roll; a nearly round skull outline and the thin cortical folds (whose partial
    # volume differs between the sides of a tilted thick-slice scan) only add bias.
    core = np.linalg.norm(pts - centroid, axis=1) < CORE_RADIUS_MM
    if core.sum() > 500:
        pts, values = pts[core], values[core]

    def f(x: np.ndarray) -> float:
        n = _normal(x[0], x[1])
        return symmetry_cost(sample, pts, values, n, float(n @ centroid) + x[2])

    step = math.tan(math.radians(step_deg / 2))
    x, cost = yield from nelder_mead_steps(f, [best[1], best[2], 0.0], [step, step, img.GetSpacing()[0]])
    n = _normal(x[0], x[1])
    offset = float(n @ centroid) + float(x[2])
    centre = centroid - (centroid @ n - offset) * n
    return n, offset, centre, math.sqrt(max(cost, 0.0))


def rotation_taking(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest rotation matrix taking unit vector ``a`` to unit vector ``b``."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    v, c = np.cross(a, b), float(a @ b)
    if np.linalg.norm(v) < 1e-12:
        return np.eye(3) if c > 0 else -np.eye(3)
    k = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + k + k @ k * (1.0 / (1.0 + c))


def rotation_x(deg: float) -> np.ndarray:
    t = math.radians(deg)
    return np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])


def pose_transform(rotation: np.ndarray, centre: np.ndarray) -> sitk.AffineTransform:
    """``R(p) = centre + rotation @ (p - centre)`` as a SimpleITK affine."""
    m = np.eye(4)
    m[:3, :3] = rotation
    m[:3, 3] = centre - rotation @ centre
    return transforms.affine_from_matrix(m)


# ----------------------------------------------------------------------------- pitch

@dataclass
class Reference:
    """The upright reference head, prepared for matching (made once per template)."""

    image: sitk.Image     # match-window feature image, identity direction
    mask: sitk.Image      # where it is compared: the head and a margin of air around it
    centre: np.ndarray       # centroid of the brain (LPS mm), see :func:`brain_centroid`
    head_centre: np.ndarray  # centroid of the head (LPS mm)
    brain_ml: float          # volume of that brain


def prepare_reference(template: sitk.Image, spacing: float = WORK_SPACING_MM) -> Reference:
    """Feature image and comparison mask of an upright head CT (in HU)."""
    _, mask, fov, hu = _working_image(template, spacing)
    image = match_image(hu)
    # air around the head counts (the outline carries the pitch), but not beyond the
    # template's own field of view
    near = sitk.BinaryDilate(_mask_image(mask, image), [3, 3, 3])
    near = sitk.And(near, _mask_image(fov, image))
    head = _index_points(hu, mask, max_points=200000).mean(axis=0)
    centre, brain_ml = brain_centroid(hu, mask, fov)
    return Reference(image, near, centre, head, brain_ml)


def brain_centroid(hu: sitk.Image, head: np.ndarray, fov: np.ndarray) -> Tuple[np.ndarray, float]:
    """Centroid (LPS mm) and volume (ml) of the intracranial soft tissue, else of the head.

    The registration starts by putting the reference's brain on the scan's: the head's
    centroid would move with how much neck or face the scan holds (up to 100 mm of neck
    in view), the brain's hardly (a cut vertex moves it by a few mm). The brain is the
    largest 0-100 HU region (calibration-corrected) after an opening of 7 mm, which cuts
    it from the scalp, the face and the spinal canal.
    """
    soft = sitk.And(sitk.And(hu > 0.0, hu < 100.0), _mask_image(fov, hu))
    radius = max(1, int(round(7.0 / hu.GetSpacing()[0])))
    soft = sitk.BinaryMorphologicalOpening(sitk.Cast(soft, sitk.sitkUInt8), [radius] * 3)
    comps = sitk.GetArrayFromImage(
        sitk.RelabelComponent(sitk.ConnectedComponent(soft), sortByObjectSize=True))
    brain = comps == 1
    # a brain is at least 0.5 l; less means the opening found no brain (e.g. a phantom)
    if brain.sum() * float(np.prod(hu.GetSpacing())) < 5e5:
        brain = head
    volume_ml = float(brain.sum() * np.prod(hu.GetSpacing())) / 1000.0
    return _index_points(hu, brain, max_points=200000).mean(axis=0), volume_ml


@functools.lru_cache(maxsize=2)
def _bundled_reference(spacing: float) -> Reference:
    return prepare_reference(reference.upright_template(), spacing)


def nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The rotation part of a linear map (polar decomposition).

    A head that is both turned and scaled along its own axes, ``U S``, gives back ``U``
    exactly, so a head larger or narrower than the reference does not bias the pose.
    """
    u, _, vt = np.linalg.svd(matrix)
    r = u @ vt
    if np.linalg.det(r) < 0:   # a reflection cannot be a head pose; keep it a rotation
        u[:, -1] *= -1
        r = u @ vt
    return r


@dataclass
class Match:
    """The reference head as registered to a scan: ``T(p) = M (p - c) + c + t``."""

    transform: sitk.AffineTransform   # the whole map, proportions included
    correlation: float     # normalised correlation at the optimum (1: identical)
    similarity: sitk.Similarity3DTransform   # its rotation, size and shift only


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
    then the similarity with ``a`` held, the last at the working resolution. In steps of
    one registration each.
    """
    moving_mask = _mask_image(scan_fov, scan_img)
    best: Optional[Match] = None
    pairs = list(zip(centres, (ref.centre, ref.head_centre)))   # scan point <- reference point
    for scale, (scan_centre, ref_centre), pitch in itertools.product(scales, pairs, starts):
        rotation = plane_rotation @ rotation_x(pitch)
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
    for k in range(SIZE_ROUNDS):
        shrink = 1 if k == SIZE_ROUNDS - 1 else 2
        sizes = _fit_sizes(ref, scan_img, scan_fov, sim, sizes)
        best = _fit_similarity(ref, scan_img, moving_mask, sim, sizes, shrink)
        yield
    return best


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


def _fit_sizes(ref: Reference, scan_img: sitk.Image, scan_fov: np.ndarray,
               sim: sitk.Similarity3DTransform, sizes: np.ndarray) -> np.ndarray:
    """The head's proportions ``a`` (per reference axis, within :data:`SIZE_RANGE`) that
    best correlate with the scan with ``sim`` held: Nelder-Mead over ``log a`` on a fixed
    sample of the reference's points (ITK's registration cannot compose a similarity
    after a per-axis scale with only the scale free)."""
    centre = np.asarray(ref.centre)
    mask = sitk.GetArrayViewFromImage(ref.mask) > 0
    points = _index_points(ref.image, mask, max_points=SIZE_POINTS, seed=1)
    values = _Sampler(ref.image, 0.0)(points)
    scan = _Sampler(scan_img, float(MATCH_HU[0]), scan_fov)
    m = np.asarray(sim.GetMatrix()).reshape(3, 3)
    shift = centre + np.asarray(sim.GetTranslation())

    def cost(log_sizes: np.ndarray) -> float:
        a = np.exp(np.clip(log_sizes, *np.log(SIZE_RANGE)))
        moved = ((points - centre) * a) @ m.T + shift
        ok = scan.valid(moved)
        f, g = values[ok] - values[ok].mean(), scan(moved[ok])
        g = g - g.mean()
        return -float(f @ g) / float(np.sqrt((f @ f) * (g @ g)) + 1e-9)

    x, _ = nelder_mead(cost, np.log(sizes), [0.04, 0.04, 0.04], iterations=SIZE_ITERATIONS)
    return np.exp(np.clip(x, *np.log(SIZE_RANGE)))


def _mask_image(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    m = sitk.GetImageFromArray(mask.astype(np.uint8))
    m.CopyInformation(like)
    return m


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
    est, seconds = yield from timed(_estimate_steps(scan, template, spacing, progress or (lambda f, m: None)))
    return dataclasses.replace(est, seconds=seconds)


def _estimate_steps(scan: sitk.Image, template: Optional[sitk.Image], spacing: float,
                    report: ProgressFn) -> "Steps[PoseEstimate]":
    report(0.0, "finding the head")
    img, mask, fov, hu = yield from _working_image_steps(scan, spacing)
    if mask.sum() < 100:
        raise InputError("no head found in the scan (too few voxels above "
                         f"{geometry.HEAD_THRESHOLD_HU:.0f} HU).", "Give a head CT in HU.")
    report(0.15, "mid-sagittal plane")
    yield
    normal, offset, head_centre, rmse = yield from symmetry_plane_steps(img, mask, fov)
    plane_rotation = rotation_taking(np.array([1.0, 0.0, 0.0]), normal)
    brain, brain_ml = brain_centroid(hu, mask, fov)
    brain = brain - (float(brain @ normal) - offset) * normal    # on the mid-sagittal plane
    report(0.45, "matching the reference head")
    yield
    ref = _bundled_reference(float(spacing)) if template is None else prepare_reference(template, spacing)
    match = yield from register_reference(match_image(hu), fov, ref, plane_rotation, (brain, head_centre),
                                          scales=starting_scales(brain_ml, ref.brain_ml))
    if match.correlation < MIN_MATCH:
        raise InputError(f"the scan does not match a head well enough to find its pose "
                         f"(correlation with the reference head {match.correlation:.2f}, below "
                         f"{MIN_MATCH}).", "Check that it is a head CT in HU; or give the head's "
                         "transform file, or state that the head is upright.")
    m = np.asarray(match.transform.GetMatrix()).reshape(3, 3)
    rotation = nearest_rotation(m)
    head_centre = np.asarray(match.transform.TransformPoint(tuple(float(c) for c in ref.centre)))
    report(1.0, "done")
    scales = tuple(float(v) for v in np.linalg.svd(m, compute_uv=False))
    return PoseEstimate(pose_transform(rotation, head_centre), normal, head_centre,
                        pitch_of(rotation), rmse, match.correlation, scales, 0.0)


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
