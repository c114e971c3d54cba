"""Automatic upright alignment: estimate the head pose ``R`` (upright -> scan).

When a scan comes without the radiologist's transform file, the engine would segment the
head as it lies in the scanner; a tilted head then puts the ASPECTS levels on the wrong
slices. This module estimates ``R`` in the project's convention (see :mod:`transforms`)
and writes it as an ITK-SNAP transform file, so the user can open it in ITK-SNAP or
Slicer, check it and edit it; nothing is applied silently.

Two steps, both on a coarse (3.5 mm) isotropic copy of the head in the brain window
(0-80 HU, lightly smoothed):

1. **Mid-sagittal plane** (roll and yaw): the head is nearly mirror-symmetric, so the
   plane that maximises left-right similarity of the image with its reflection is the
   mid-sagittal plane. The cost is the mean squared difference between the image and its
   reflection; a coarse grid over plane normals (+-24 degrees around the scan's
   left-right axis, whole head), then Nelder-Mead over normal and offset on the central
   brain (55 mm around the head's centroid: ventricles, deep nuclei, insulae). Two
   lessons from the benchmark shaped this: points whose mirror image falls outside the
   scan's field of view are left out (a cut vertex is a plane of the *scan* and pulls
   the plane towards the scan's axes), and the outer head is left out of the fine
   stage (a nearly round skull says little about roll, and thin cortical folds alias
   differently on the two sides of a tilted thick-slice scan). Symmetry needs no
   template and holds for any head.
2. **Pitch** (nodding about the left-right axis, which symmetry cannot see), relative
   to an upright template: by default the symmetric head phantom of :mod:`phantom`
   (whose orientation *defines* upright for synthetic data), or any upright CT given
   with ``template=`` (e.g. an MNI-space CT template, to follow the atlas convention of
   a dataset). When the whole brain is in view, pitch is the angle between the brain's
   long axis in the mid-sagittal plane (second moments of the intracranial soft tissue)
   and the template's: independent of tissue densities and of head size. When the view
   cuts the brain (moments would be biased), a rigid registration restricted to pitch
   and the two in-plane shifts matches the scan to the template's central brain (65 mm,
   correlation metric, three starting pitches compared on one common point set).
   The benchmark taught both choices: template registration of the whole head has a
   nearly flat pitch landscape when head proportions differ from the template's.

The rotation found is written about the head centre (``R(c) = c``), so the upright
space overlaps the scan and the file's translation stays small and readable.

Command line (added to ``brainlobeseg`` by :func:`register_cli`)::

    brainlobeseg align SCAN -o T.txt [--template UPRIGHT_CT] [--spacing 3.5]

Accuracy on synthetic tilted phantoms: see ``Testing/benchmarks/alignment_bench.py``.
Only numpy and SimpleITK are used (the inference-path rule).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import geometry, transforms
from .errors import InputError

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
#: Radius (mm) around the template's centroid compared in the pitch registration.
PITCH_RADIUS_MM = 65.0
#: Radius (mm) around the head's centroid used by the fine symmetry search.
CORE_RADIUS_MM = 55.0
#: Pitch starting points (degrees) of the template registration: pitch is found by local
#: optimisation, so a few starts cover tilts up to about +-20 degrees.
PITCH_STARTS_DEG = (-12.0, 0.0, 12.0)

ProgressFn = Callable[[float, str], None]


@dataclass
class PoseEstimate:
    """The estimated head pose and the evidence behind it."""

    transform: sitk.AffineTransform   # R: upright -> scan (LPS), rotation about ``centre``
    normal: np.ndarray                # mid-sagittal plane normal in the scan (LPS), x > 0
    centre: np.ndarray                # head centre on the plane (LPS mm); R(centre) = centre
    pitch_deg: float                  # rotation about the upright left-right axis
    symmetry_rmse: float              # HU-clipped RMS left-right difference at the optimum
    seconds: float

    @property
    def angle_deg(self) -> float:
        """How far the head is from upright, in degrees."""
        return transforms.rotation_angle_deg(self.transform)


# ----------------------------------------------------------------------------- working image

def _working_image(scan: sitk.Image, spacing: float
                   ) -> Tuple[sitk.Image, np.ndarray, np.ndarray, "BrainShape"]:
    """The head on an identity-direction isotropic grid in the scan's physical space,
    feature-clipped and lightly smoothed, its head mask, and its field-of-view mask
    (bool, z y x).

    The field of view matters: a scan often cuts the head (vertex, chin, nose), and the
    cut faces are planes of the *scan*, not of the head. Compared as air they would pull
    the symmetry plane and the pitch towards the scan's axes, so every comparison below
    uses only points whose partners also lie inside the field of view.
    """
    box = geometry.head_box(scan, transforms.identity())
    # a margin around the head: a reflected or re-posed head must stay inside the grid,
    # or points leaving it would silently stop counting (a bias towards leaving it)
    box = geometry.HeadBox(tuple(l - GRID_MARGIN_MM for l in box.lower),
                           tuple(u + GRID_MARGIN_MM for u in box.upper), box.midline_x)
    grid = box.grid((spacing,) * 3)
    hu = geometry.upright_resample(scan, transforms.identity(), grid)
    ones = sitk.Image(scan.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(scan)
    fov_img = sitk.Resample(ones, grid.reference(), transforms.identity(), sitk.sitkNearestNeighbor, 0)
    fov_img = sitk.BinaryErode(fov_img, [1, 1, 1])
    fov = sitk.GetArrayFromImage(fov_img) > 0
    mask = (hu > geometry.HEAD_THRESHOLD_HU) & fov
    feat = np.clip(hu, *FEATURE_HU).astype(np.float32)
    img = sitk.SmoothingRecursiveGaussian(grid.image(feat), SMOOTHING_MM)
    return img, mask, fov, _brain_shape(hu, fov, grid)


@dataclass
class BrainShape:
    """The brain (intracranial soft tissue) as points, and whether the view cuts it."""

    points: np.ndarray    # (N, 3) LPS mm
    cut: bool             # touches the edge of the field of view


def _brain_shape(hu: np.ndarray, fov: np.ndarray, grid) -> BrainShape:
    """The largest connected soft-tissue region inside the skull (0-100 HU), i.e. the
    brain with its CSF; the scalp is a thin shell cut off by the opening."""
    soft = grid.image(((hu > 0) & (hu < 100) & fov).astype(np.uint8))
    soft = sitk.BinaryMorphologicalOpening(soft, [1, 1, 1])
    comps = sitk.RelabelComponent(sitk.ConnectedComponent(soft), sortByObjectSize=True)
    brain = sitk.GetArrayViewFromImage(comps) == 1
    edge = ~np.asarray(sitk.GetArrayViewFromImage(
        sitk.BinaryErode(grid.image(fov.astype(np.uint8)), [1, 1, 1])), bool)
    idx = np.argwhere(brain)[:, ::-1]
    pts = np.asarray(grid.origin) + idx * np.asarray(grid.spacing)
    return BrainShape(pts, bool((brain & edge).any()))


def principal_angle_deg(points: np.ndarray, rotation: np.ndarray, centre: np.ndarray) -> float:
    """Angle (degrees, from +y towards +z) of the brain's long axis in the sagittal plane
    of the frame ``p -> rotation^T (p - centre)``; in (-90, 90]."""
    local = (points - centre) @ rotation
    yz = local[:, 1:3] - local[:, 1:3].mean(axis=0)
    _, vecs = np.linalg.eigh(yz.T @ yz / max(len(yz), 1))
    major = vecs[:, 1]
    angle = math.degrees(math.atan2(major[1], major[0]))
    return _wrap90(angle)


def _wrap90(angle: float) -> float:
    """An axis angle folded into (-90, 90] (an axis has no sign)."""
    while angle > 90.0:
        angle -= 180.0
    while angle <= -90.0:
        angle += 180.0
    return angle


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
    n = len(x0)
    pts = [np.asarray(x0, float)]
    for i in range(n):
        p = np.asarray(x0, float).copy()
        p[i] += step[i]
        pts.append(p)
    vals = [f(p) for p in pts]
    for _ in range(iterations):
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
    x, cost = nelder_mead(f, [best[1], best[2], 0.0], [step, step, img.GetSpacing()[0]])
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

def default_template() -> sitk.Image:
    """The upright reference head: the symmetric phantom that defines "upright"."""
    from . import phantom
    return phantom.make_upright_phantom(spacing_mm=2.0)[0]


@functools.lru_cache(maxsize=4)
def _default_template_image(spacing: float) -> Tuple[sitk.Image, np.ndarray, "BrainShape"]:
    """The default template's working image, made once per process (it never changes)."""
    img, mask, _, brain = _working_image(default_template(), spacing)
    return img, mask, brain


def find_pitch(scan_img: sitk.Image, template_img: sitk.Image, template_mask: np.ndarray,
               plane_rotation: np.ndarray, centre: np.ndarray,
               starts: Sequence[float] = PITCH_STARTS_DEG, fov: Optional[np.ndarray] = None) -> float:
    """Pitch (degrees) that best aligns the scan, turned by ``plane_rotation`` about
    ``centre``, to the upright template; the other rotations stay fixed.

    SimpleITK's registration maps fixed (template, upright) points to moving (scan)
    points, which is the convention of ``R`` itself: total = plane ∘ Euler(pitch, t).
    Only the pitch and the anterior-posterior and head-foot shifts are optimised; the
    left-right shift puts the template's midline on the scan's mid-sagittal plane.
    """
    t_pts = _index_points(template_img, template_mask)
    t_centroid = t_pts.mean(axis=0)
    t_mid = float(np.median(t_pts[:, 0]))
    # the template's central brain only: a scan's field of view often cuts the vertex or
    # the skull base, and the central structures carry the pitch as well
    nz, ny, nx = template_mask.shape
    zz, yy, xx = np.meshgrid(*(np.arange(n) for n in (nz, ny, nx)), indexing="ij")
    sp, org = np.asarray(template_img.GetSpacing()), np.asarray(template_img.GetOrigin())
    dist = np.sqrt((org[0] + sp[0] * xx - t_centroid[0]) ** 2 + (org[1] + sp[1] * yy - t_centroid[1]) ** 2
                   + (org[2] + sp[2] * zz - t_centroid[2]) ** 2)
    template_mask = template_mask & (dist < PITCH_RADIUS_MM)
    # fixed point p (template) -> q = plane(euler(p)); euler about the template centroid
    plane = pose_transform(plane_rotation, centre)
    # the template centroid (moved to the plane's x) should land near the scan centre
    shift = centre - np.array([t_mid, t_centroid[1], t_centroid[2]])
    candidates = []
    for start in starts:
        euler = sitk.Euler3DTransform()
        euler.SetCenter(tuple(float(c) for c in t_centroid))
        euler.SetRotation(math.radians(start), 0.0, 0.0)
        euler.SetTranslation(tuple(float(s) for s in shift))
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsCorrelation()   # tissue densities differ between heads and scanners
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.12, seed=1)
        reg.SetMetricFixedMask(_mask_image(template_mask, template_img))
        if fov is not None:   # template points that land outside the scan's view do not count
            reg.SetMetricMovingMask(_mask_image(fov, scan_img))
        reg.SetInterpolator(sitk.sitkLinear)
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=2.0, minStep=1e-3, numberOfIterations=150,
            gradientMagnitudeTolerance=1e-8)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetOptimizerWeights([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
        reg.SetMovingInitialTransform(plane)
        reg.SetInitialTransform(euler, inPlace=True)
        reg.Execute(template_img, scan_img)
        candidates.append(euler)
    # Choose among the starts on one common set of template points (those every candidate
    # maps into the field of view): the registration's own metric averages over whatever
    # stays in view, so a pose that pushes mismatching parts out of view would look best.
    pts = _index_points(template_img, template_mask)
    t_values = _Sampler(template_img, FEATURE_HU[0])(pts)
    sample = _Sampler(scan_img, FEATURE_HU[0], fov)
    mapped = []
    for euler in candidates:
        q = np.array([plane.TransformPoint(euler.TransformPoint(tuple(p))) for p in pts[::10]])
        mapped.append(q)
    valid = np.all([sample.valid(q) for q in mapped], axis=0)
    sub = t_values[::10]
    costs = [-float(np.corrcoef(sample(q[valid]), sub[valid])[0, 1]) if valid.sum() > 10 else math.inf
             for q in mapped]
    return math.degrees(candidates[int(np.argmin(costs))].GetAngleX())


def _mask_image(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    m = sitk.GetImageFromArray(mask.astype(np.uint8))
    m.CopyInformation(like)
    return m


# ----------------------------------------------------------------------------- the estimate

def estimate_pose(scan: sitk.Image, template: Optional[sitk.Image] = None,
                  spacing: float = WORK_SPACING_MM,
                  progress: Optional[ProgressFn] = None) -> PoseEstimate:
    """Estimate ``R`` (upright -> scan) for a head CT: symmetry plane, then pitch."""
    t0 = time.perf_counter()
    report = progress or (lambda f, m: None)
    report(0.0, "finding the head")
    img, mask, fov, brain = _working_image(scan, spacing)
    if mask.sum() < 100:
        raise InputError("no head found in the scan (too few voxels above "
                         f"{geometry.HEAD_THRESHOLD_HU:.0f} HU).", "Give a head CT in HU.")
    report(0.1, "mid-sagittal plane")
    normal, _, centre, rmse = find_symmetry_plane(img, mask, fov)
    plane_rotation = rotation_taking(np.array([1.0, 0.0, 0.0]), normal)
    report(0.6, "pitch")
    if template is None:
        t_img, t_mask, t_brain = _default_template_image(float(spacing))
    else:
        t_img, t_mask, _, t_brain = _working_image(template, spacing)
    if not brain.cut and not t_brain.cut and len(brain.points) > 1000:
        # the brain's long axis against the template's: exact for any head whose brain
        # is in view, whatever its tissue densities
        t_angle = principal_angle_deg(t_brain.points, np.eye(3), t_brain.points.mean(axis=0))
        s_angle = principal_angle_deg(brain.points, plane_rotation, centre)
        pitch = _wrap90(s_angle - t_angle)
    else:   # the view cuts the brain: its moments would be biased; register the centre
        pitch = find_pitch(img, t_img, t_mask, plane_rotation, centre, fov=fov)
    rotation = plane_rotation @ rotation_x(pitch)
    report(1.0, "done")
    return PoseEstimate(pose_transform(rotation, centre), normal, centre, pitch, rmse,
                        time.perf_counter() - t0)


def angle_error_deg(estimated: sitk.Transform, truth: sitk.Transform) -> float:
    """Rotation angle of ``R_est^-1 ∘ R_true``: 0 when the poses agree."""
    m = np.linalg.inv(transforms.matrix_of(estimated)) @ transforms.matrix_of(truth)
    return transforms.rotation_angle_deg(transforms.affine_from_matrix(m))


# ----------------------------------------------------------------------------- command line

def cmd_align(args: argparse.Namespace) -> int:
    from . import imageio
    scan = imageio.read_scan(args.scan)
    imageio.check_ct(scan, force=args.force, name=os.path.basename(args.scan))
    template = None
    if args.template:
        template = imageio.read_scan(args.template)
        imageio.check_ct(template, force=args.force, name=os.path.basename(args.template))
    est = estimate_pose(scan, template, spacing=args.spacing)
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    transforms.write_transform(args.output, est.transform)
    print(f"estimated head pose: {est.angle_deg:.1f} degrees from upright (pitch "
          f"{est.pitch_deg:+.1f}); mid-sagittal normal "
          f"({', '.join(f'{c:+.3f}' for c in est.normal)}) in {est.seconds:.1f} s")
    print(f"wrote {args.output} (R: upright -> scan, ITK-SNAP format). Check it before use, e.g. "
          f"`brainlobeseg segment {args.scan} --transform {args.output}`.")
    return 0


def register_cli(sub) -> None:
    """Add ``align`` to the ``brainlobeseg`` command."""
    a = sub.add_parser("align", help="estimate the upright head pose and write it as an ITK "
                                     "transform file (check it before use)")
    a.add_argument("scan", help="CT file (.nii, .nii.gz, .nrrd) or DICOM series folder")
    a.add_argument("-o", "--output", required=True, help="transform file to write (e.g. case.txt)")
    a.add_argument("--template", help="an upright head CT defining upright (default: the "
                                      "built-in symmetric phantom)")
    a.add_argument("--spacing", type=float, default=WORK_SPACING_MM,
                   help=f"working resolution in mm (default {WORK_SPACING_MM})")
    a.add_argument("--force", action="store_true", help="skip the 'is this a CT in HU' check")
    a.set_defaults(func=cmd_align)
