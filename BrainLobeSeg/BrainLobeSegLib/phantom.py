"""Synthetic head-CT phantoms made in code, with exact labels and a known head pose.

Used by the test suites (no data files needed), the ``brainlobeseg demo`` command and,
in a small share, model training (so the demo head is segmented too).

The phantom is analytic: an upright adult-sized head in LPS millimetres, in MNI
coordinates (the 20 ASPECTS regions sit where the MNI atlas has them), made of
scalp, a three-layer skull, subarachnoid CSF, a brain with a folded grey-matter
cortex over white matter, lateral and third ventricles, thalami and the deep nuclei
(caudate and lentiform at grey-matter density, so they show as on real CT).
Region shapes are written in MNI RAS millimetres (``x`` < 0 is the patient's left),
as the atlas literature gives them, and evaluated on LPS grids (``x_lps = -x_ras``,
``y_lps = -y_ras``); so left regions (ids 1-10) lie at LPS ``x > 0``.

Regions are volumetric and non-overlapping (one label per voxel). Where the simple
shapes touch, the priority is caudate > lentiform > internal capsule > insula >
cortical sectors M1-M6; ventricles and thalami carry no label.

A tilted scan is made as ``ct(q) = upright(R^-1(q))`` with ``R`` (upright -> scan) the
transform of the project's convention (:mod:`transforms`): the upright phantom is
rasterised once (cached) and resampled with SimpleITK, linear for HU and nearest for
labels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from . import geometry, regions, transforms

Vec3 = Tuple[float, float, float]

AIR_HU = -1024
#: Head centre (LPS mm): the centre of the brain ellipsoid, MNI RAS (0, -17, 8).
HEAD_CENTER_LPS: Vec3 = (0.0, 17.0, 8.0)
_BRAIN_SEMI_MM = (70.0, 87.0, 68.0)    # x (left-right), y, z semi-axes of the brain
_CSF_GAP_MM = 2.5                      # brain surface -> inner table of the skull
_SCALP_MM = 5.0
_RASTER_MARGIN_MM = 4.0
_AIR_LIMIT_HU = -1000.0                # noise is added above this (tissue), not in air


@dataclass(frozen=True)
class PhantomParams:
    """What a seed varies: size and shape a little, and tissue densities (HU)."""

    scale: Vec3 = (1.0, 1.0, 1.0)      # per-axis size factor about the head centre
    gm_hu: float = 38.0
    wm_hu: float = 27.0
    csf_hu: float = 6.0
    skull_hu: float = 1150.0
    scalp_hu: float = 40.0
    skull_mm: float = 6.0
    folds: Vec3 = (0.0, 0.0, 0.0)      # phases of the cortical folding pattern

    @staticmethod
    def from_seed(seed: Optional[int]) -> "PhantomParams":
        """The canonical phantom for ``None``, else a deterministic variant."""
        if seed is None:
            return PhantomParams()
        rng = np.random.default_rng(seed)
        u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
        return PhantomParams(scale=(u(0.94, 1.06), u(0.94, 1.06), u(0.94, 1.06)),
                             gm_hu=u(35.5, 40.0), wm_hu=u(25.0, 29.5), csf_hu=u(2.0, 10.0),
                             skull_hu=u(900.0, 1400.0), scalp_hu=u(32.0, 48.0),
                             skull_mm=u(5.2, 6.8),
                             folds=(u(0, 2 * math.pi), u(0, 2 * math.pi), u(0, 2 * math.pi)))


@dataclass
class PhantomCase:
    """A tilted phantom scan and its truth, all on the scan's grid.

    ``labels_upright`` is what a radiologist's ``N-seg.nii.gz`` holds
    (``sitk.Resample(ct, ct, transform)`` lies on it); ``labels_scan`` is the true
    label of each scan voxel.
    """

    ct: sitk.Image               # int16 HU, identity direction
    transform: sitk.AffineTransform  # R: upright point -> scan point (LPS mm)
    labels_upright: sitk.Image   # uint8, upright layout, same grid as ct
    labels_scan: sitk.Image      # uint8, scan layout, same grid as ct
    center: Vec3                 # head centre (LPS mm), the centre of rotation
    angles_deg: Vec3


# ----------------------------------------------------------------------------- anatomy

class _Coords:
    """Broadcastable MNI RAS coordinates of a raster grid, undone by the seed's scaling.

    Arrays are shaped for numpy (z, y, x) broadcasting so that only the combined
    expressions allocate full volumes.
    """

    def __init__(self, origin: Sequence[float], spacing: Sequence[float], size: Sequence[int],
                 params: PhantomParams) -> None:
        c = HEAD_CENTER_LPS
        axes = [c[a] + (origin[a] + spacing[a] * np.arange(size[a], dtype=np.float32) - c[a])
                / params.scale[a] for a in range(3)]
        self.X = -axes[0][None, None, :]      # RAS x: < 0 is the patient's left
        self.Y = -axes[1][None, :, None]      # RAS y: > 0 is anterior
        self.Z = axes[2][:, None, None]
        self.D = np.abs(self.X)               # distance from the midline
        self.left = self.X < 0


def _ellipsoid(k: _Coords, centre: Vec3, semi: Vec3, lateral: bool = True) -> np.ndarray:
    """Inside an ellipsoid; ``lateral`` places it at distance ``centre[0]`` on both sides."""
    x = k.D if lateral else k.X
    return (((x - centre[0]) / semi[0]) ** 2 + ((k.Y - centre[1]) / semi[1]) ** 2
            + ((k.Z - centre[2]) / semi[2]) ** 2) <= 1.0


def _surface_distance(k: _Coords) -> np.ndarray:
    """Signed distance (mm) to the brain surface along the ray from the centre (< 0 inside).

    Exact for a sphere and close for this ellipsoid; one field gives every shell
    (CSF, skull tables, scalp) by thresholds.
    """
    c = (0.0, -HEAD_CENTER_LPS[1], HEAD_CENTER_LPS[2])
    dx, dy, dz = k.X - c[0], k.Y - c[1], k.Z - c[2]
    r = np.sqrt(dx * dx + dy * dy + dz * dz)
    rn = np.sqrt((dx / _BRAIN_SEMI_MM[0]) ** 2 + (dy / _BRAIN_SEMI_MM[1]) ** 2
                 + (dz / _BRAIN_SEMI_MM[2]) ** 2)
    return r * (1.0 - 1.0 / np.maximum(rn, 1e-6))


def _folding(k: _Coords, params: PhantomParams) -> np.ndarray:
    """A smooth field whose zero set makes sulci; symmetric (uses ``|x|``)."""
    p = params.folds
    return (np.sin(k.D / 4.5 + p[0]) + np.sin(k.Y / 5.0 + p[1]) + np.sin(k.Z / 4.5 + p[2]))


def _deep_structures(k: _Coords) -> Dict[str, np.ndarray]:
    """Masks of the deep structures (both sides), placed as in the MNI atlas."""
    vent = (_ellipsoid(k, (6.5, -2.0, 14.0), (4.0, 26.0, 6.0))          # frontal horn + body
            | _ellipsoid(k, (12.0, -28.0, 12.0), (5.0, 8.0, 6.0))        # towards the atrium
            | _ellipsoid(k, (17.0, -37.0, 8.0), (5.0, 11.0, 8.0))        # atrium
            | _ellipsoid(k, (0.0, -12.0, 2.0), (1.8, 13.0, 9.0), lateral=False))  # third
    caudate = _ellipsoid(k, (15.0, 11.0, 9.0), (4.5, 11.0, 15.0))
    lentiform = _ellipsoid(k, (23.0, 0.0, 0.0), (7.0, 16.0, 12.0))
    thalamus = _ellipsoid(k, (11.0, -18.0, 5.0), (6.5, 12.0, 8.5))
    capsule = (_ellipsoid(k, (22.0, -2.0, 3.0), (12.0, 21.0, 15.0)) & (k.D < 23.0)
               & (k.Z >= -4.0) & (k.Z <= 18.0) & ~lentiform & ~caudate & ~thalamus & ~vent)
    insula = ((np.abs(k.D - 38.0) <= 3.0)
              & ((k.Y / 30.0) ** 2 + ((k.Z - 5.0) / 17.0) ** 2 <= 1.0))
    return {"vent": vent, "C": caudate, "L": lentiform, "T": thalamus, "IC": capsule & ~vent,
            "I": insula}


def _cortical_sectors(k: _Coords, brain: np.ndarray, deep: Dict[str, np.ndarray]
                      ) -> Dict[str, np.ndarray]:
    """M1-M6: MCA territory (cortex and the white matter under it) by level and sector.

    Ganglionic level z -12..18 lateral to the insula (further forward and back, lateral
    to the ACA/PCA strip); supraganglionic level z 19..72 lateral to a parasagittal ACA
    strip that widens upwards. Anterior/lateral/posterior split by y, as in the atlas.
    """
    free = brain & ~(deep["vent"] | deep["C"] | deep["L"] | deep["IC"] | deep["I"] | deep["T"])
    gang = free & (k.Z >= -12.0) & (k.Z < 18.5) & (
        k.D >= np.where((k.Y >= -32.0) & (k.Y <= 30.0), 41.0, 26.0))
    supra = free & (k.Z >= 18.5) & (k.Z <= 72.0) & (k.D >= 22.0 + 0.12 * (k.Z - 18.5))
    return {"M1": gang & (k.Y > 18.0) & (k.Y < 70.0),
            "M2": gang & (k.Y > -35.0) & (k.Y <= 18.0),
            "M3": gang & (k.Y > -96.0) & (k.Y <= -35.0),
            "M4": supra & (k.Y > 5.0) & (k.Y < 45.0),
            "M5": supra & (k.Y > -40.0) & (k.Y <= 5.0),
            "M6": supra & (k.Y > -92.0) & (k.Y <= -40.0)}


#: Painting order: later entries win where shapes touch (caudate last, i.e. highest).
_PAINT_ORDER = ["M1", "M2", "M3", "M4", "M5", "M6", "I", "IC", "L", "C"]


def _label_map(k: _Coords, masks: Dict[str, np.ndarray], shape: Tuple[int, ...]) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    left = np.broadcast_to(k.left, shape)
    for code in _PAINT_ORDER:
        m = np.broadcast_to(masks[code], shape)
        labels[m & left] = regions.region(code, "left").label
        labels[m & ~left] = regions.region(code, "right").label
    return labels


def _hu_map(k: _Coords, sd: np.ndarray, deep: Dict[str, np.ndarray], params: PhantomParams,
            shape: Tuple[int, ...]) -> np.ndarray:
    """Tissue densities, from the outside in (later assignments overwrite earlier)."""
    p = params
    hu = np.full(shape, AIR_HU, np.float32)
    inner = _CSF_GAP_MM
    table = p.skull_mm * 0.3
    hu[sd <= inner + p.skull_mm + _SCALP_MM] = p.scalp_hu
    hu[sd <= inner + p.skull_mm] = p.skull_hu                         # outer and inner tables
    hu[(sd > inner + table) & (sd <= inner + p.skull_mm - table)] = 0.55 * p.skull_hu  # diploe
    hu[sd <= inner] = p.csf_hu
    brain = sd <= 0.0
    hu[brain] = p.wm_hu
    depth = -sd
    fold = _folding(k, p)
    cortex = brain & ((depth < 2.5) | ((np.abs(fold) < 0.55) & (depth < 10.0)))
    hu[cortex] = p.gm_hu
    hu[brain & (np.abs(fold) < 0.12) & (depth < 9.0)] = p.csf_hu      # sulci
    for code in ("T", "C", "L", "I"):
        hu[np.broadcast_to(deep[code], shape)] = p.gm_hu
    hu[np.broadcast_to(deep["vent"], shape)] = p.csf_hu
    return hu


def _raster_geometry(spacing: Vec3, params: PhantomParams) -> Tuple[Vec3, Tuple[int, int, int]]:
    """Origin and size of an axis-aligned grid centred on the head that holds all of it."""
    reach = [(_BRAIN_SEMI_MM[a] + _CSF_GAP_MM + params.skull_mm + _SCALP_MM) * params.scale[a]
             + _RASTER_MARGIN_MM for a in range(3)]
    size = tuple(int(math.ceil(2 * reach[a] / spacing[a])) + 1 for a in range(3))
    origin = tuple(HEAD_CENTER_LPS[a] - 0.5 * (size[a] - 1) * spacing[a] for a in range(3))
    return origin, size  # type: ignore[return-value]


@functools.lru_cache(maxsize=6)
def _raster(spacing: Vec3, seed: Optional[int]) -> Tuple[sitk.Image, sitk.Image]:
    """The upright phantom (float32 HU, uint8 labels) on a grid of ``spacing``; cached
    because tests and training ask for the same one many times."""
    params = PhantomParams.from_seed(seed)
    origin, size = _raster_geometry(spacing, params)
    k = _Coords(origin, spacing, size, params)
    shape = (size[2], size[1], size[0])
    sd = _surface_distance(k)
    deep = _deep_structures(k)
    masks = dict(deep, **_cortical_sectors(k, sd <= 0.0, deep))
    images = []
    for array in (_hu_map(k, sd, deep, params, shape), _label_map(k, masks, shape)):
        img = sitk.GetImageFromArray(array)
        img.SetOrigin(origin)
        img.SetSpacing(spacing)
        images.append(img)
    return images[0], images[1]


def _vec3(value: Union[float, Sequence[float]]) -> Vec3:
    if np.isscalar(value):
        return (float(value),) * 3  # type: ignore[arg-type, return-value]
    v = tuple(float(x) for x in value)  # type: ignore[union-attr]
    if len(v) != 3:
        raise ValueError(f"expected one number or three, got {value!r}")
    return v  # type: ignore[return-value]


# ----------------------------------------------------------------------------- public API

def make_upright_phantom(spacing_mm: Union[float, Sequence[float]] = 1.0,
                         seed: Optional[int] = None) -> Tuple[sitk.Image, sitk.Image]:
    """The upright phantom on an axis-aligned grid around the head: (CT int16, labels uint8).

    ``seed=None`` gives the canonical phantom; a seed varies size, shape and densities a
    little, deterministically. No noise: this is the truth a scan is made from.
    """
    hu, labels = _raster(_vec3(spacing_mm), seed)
    ct = sitk.GetImageFromArray(np.rint(sitk.GetArrayViewFromImage(hu)).astype(np.int16))
    ct.CopyInformation(hu)
    return ct, sitk.Image(labels)


def head_center(seed: Optional[int] = None) -> Vec3:
    """Centre of the phantom head (LPS mm); every seed's variant is scaled about it."""
    return HEAD_CENTER_LPS


def _raster_spacing(spacing: Vec3) -> Vec3:
    """1 mm for clinical grids, up to 2 mm for coarse test grids (keeps those fast)."""
    s = float(np.clip(min(spacing), 1.0, 2.0))
    return (s, s, s)


def _scan_reference(size: Sequence[int], spacing: Vec3, centre: np.ndarray) -> sitk.Image:
    ref = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    ref.SetSpacing(spacing)
    ref.SetOrigin(tuple(float(centre[a] - 0.5 * (size[a] - 1) * spacing[a]) for a in range(3)))
    return ref


def _add_noise(ct: sitk.Image, noise_hu: float, seed: Optional[int]) -> sitk.Image:
    """Gaussian noise in tissue (air stays -1024, as outside a reconstruction), int16."""
    arr = sitk.GetArrayFromImage(ct)
    if noise_hu > 0:
        rng = np.random.default_rng(0 if seed is None else seed)
        tissue = arr > _AIR_LIMIT_HU
        arr[tissue] += rng.standard_normal(int(tissue.sum()), dtype=np.float32) * np.float32(noise_hu)
    out = sitk.GetImageFromArray(np.clip(np.rint(arr), AIR_HU, 3071).astype(np.int16))
    out.CopyInformation(ct)
    return out


def make_scan(size: Sequence[int] = (512, 512, 110), spacing: Sequence[float] = (0.45, 0.45, 1.5),
              angles_deg: Sequence[float] = (8.0, -5.0, 10.0),
              translation_mm: Sequence[float] = (0.0, 0.0, 0.0), seed: Optional[int] = None,
              noise_hu: float = 4.0) -> PhantomCase:
    """A tilted phantom scan with a known ``R`` (upright -> scan) and both label layouts.

    ``R`` rotates by ``angles_deg`` (about x, y, z) about the head centre and then
    translates; the grid (identity direction) is centred between the upright and the
    tilted head, so both lie in it. ``ct(q) = upright(R^-1(q))`` plus noise.
    """
    spacing3 = _vec3(spacing)
    angles = _vec3(angles_deg)
    translation = np.array(_vec3(translation_mm))
    centre = np.array(head_center(seed))
    hu, labels = _raster(_raster_spacing(spacing3), seed)
    R = transforms.rotation(angles, center=tuple(centre), translation=tuple(translation))
    R_inv = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(R)))
    ref = _scan_reference(size, spacing3, centre + 0.5 * translation)
    ct = sitk.Resample(hu, ref, R_inv, sitk.sitkLinear, float(AIR_HU), sitk.sitkFloat32)
    identity = transforms.identity()
    return PhantomCase(
        ct=_add_noise(ct, noise_hu, seed), transform=R,
        labels_upright=sitk.Resample(labels, ref, identity, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8),
        labels_scan=sitk.Resample(labels, ref, R_inv, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8),
        center=tuple(float(c) for c in centre), angles_deg=angles)  # type: ignore[arg-type]


def make_reference_scan(angles_deg: Sequence[float] = (15.0, -6.0, 8.0),
                        size: Sequence[int] = (96, 96, 40), spacing: Sequence[float] = (2.2, 2.2, 4.0),
                        hu_offset: float = 0.0, cut_top_mm: float = 0.0, noise_hu: float = 4.0,
                        seed: Optional[int] = None,
                        proportions: Sequence[float] = (1.0, 1.0, 1.0),
                        ) -> Tuple[sitk.Image, sitk.AffineTransform]:
    """The bundled upright reference head (a real mean head CT in the models' frame, see
    :mod:`reference`), stretched by ``proportions`` along its own axes (a head wider,
    longer or flatter than the reference), posed by ``R`` (rotations about x, y, z about
    its centre), with a scanner offset, the top ``cut_top_mm`` of the field of view
    removed, and noise.

    The analytic phantom above has region labels at MNI places but not an MNI head
    shape (its brain is a horizontal ellipsoid without a face), so the automatic
    alignment, which matches head shapes to the reference, is tested on this head.
    Returns the scan (int16 HU) and ``R`` (upright -> scan).
    """
    from . import reference   # reads the bundled file only when asked for
    head = reference.upright_template()
    arr = sitk.GetArrayViewFromImage(head)
    pts = np.argwhere(arr > -300.0)[:, ::-1].astype(np.float64)
    centre = np.array(head.TransformContinuousIndexToPhysicalPoint(tuple(pts.mean(axis=0))))
    head = geometry.stretched_about(head, _vec3(proportions), centre)
    R = transforms.rotation(_vec3(angles_deg), center=tuple(centre))
    R_inv = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(R)))
    spacing3 = _vec3(spacing)
    ref = _scan_reference(size, spacing3, centre)
    ct = sitk.Resample(head, ref, R_inv, sitk.sitkLinear, float(AIR_HU), sitk.sitkFloat32)
    ct = _add_noise(ct, noise_hu, seed)
    if hu_offset:
        ct = sitk.Mask(ct + float(hu_offset), ct > _AIR_LIMIT_HU, float(AIR_HU))
    keep = int(size[2]) - int(round(cut_top_mm / spacing3[2]))
    return (ct[:, :, :keep] if keep < int(size[2]) else ct), R


def write_case(case: PhantomCase, folder: str, name: Optional[str] = None,
               overwrite: bool = False):
    """Write a phantom case in the dataset layout (``name.nii.gz``, ``name.txt``,
    ``name-seg.nii.gz`` with the upright labels); returns the :class:`dataset.Case`
    holding the three paths."""
    from . import dataset
    return dataset.write_case(folder, case.ct, case.labels_upright, transform=case.transform,
                              name=name, overwrite=overwrite)


def label_counts(labels: sitk.Image) -> List[int]:
    """Voxels per label id 0..20 (a quick check that every region is present)."""
    arr = sitk.GetArrayViewFromImage(labels)
    return np.bincount(arr.ravel(), minlength=regions.NUM_LABELS + 1).tolist()


def add_dense_ball(ct: sitk.Image, centre: Sequence[float], radius_mm: float, value_hu: float,
                   edge_mm: float = 1.5) -> sitk.Image:
    """``ct`` (as float32) with a ball of ``value_hu`` around the physical point ``centre``,
    its edge blurred over ``edge_mm`` as a scanner's partial volume blurs it: a haemorrhage
    (50-90 HU) or calcification for tests of the ASPECTS read-out."""
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in ct.GetSize()[::-1]], indexing="ij")
    phys = np.array(ct.GetOrigin()) + np.stack([xx, yy, zz], -1) @ (
        np.array(ct.GetDirection()).reshape(3, 3) * np.array(ct.GetSpacing())).T
    ball = sitk.GetImageFromArray((np.linalg.norm(phys - np.asarray(centre), axis=-1) <= radius_mm).astype(np.float32))
    ball.CopyInformation(ct)
    share = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(ball, edge_mm))
    out = sitk.GetImageFromArray(arr + share * (np.float32(value_hu) - arr))
    out.CopyInformation(ct)
    return out


def lower_region(ct: sitk.Image, labels: sitk.Image, label: int, drop_hu: float = 8.0,
                 window_hu: Tuple[float, float] = (20.0, 50.0)) -> sitk.Image:
    """``ct`` with the parenchyma of one region (its voxels within ``window_hu``) made
    ``drop_hu`` darker: an early-ischaemia-like density drop for tests of the ASPECTS
    read-out. Only brain tissue is lowered, so the region's CSF and any calcification stay
    as they were (as in a real infarct). The type of ``ct`` is kept."""
    arr = sitk.GetArrayFromImage(ct)
    lab = sitk.GetArrayViewFromImage(labels)
    inside = (lab == label) & (arr >= window_hu[0]) & (arr <= window_hu[1])
    arr[inside] = arr[inside] - np.asarray(drop_hu).astype(arr.dtype)
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(ct)
    return out
