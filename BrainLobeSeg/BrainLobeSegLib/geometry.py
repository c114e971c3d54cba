"""Grids and resampling between the scan and the upright space.

Frames (all physical coordinates are LPS millimetres, as in SimpleITK):

- *scan*: the CT as acquired, any direction cosines and spacing.
- *upright*: the space the radiologist labels in; ``R`` (see :mod:`transforms`) maps an
  upright point to the scan point shown there.
- *model grid*: an axis-aligned (identity direction) grid in the upright space, at the
  model's spacing, covering the head only. Arrays on it are indexed ``[z, y, x]``
  (SimpleITK's numpy order): axis 0 runs foot->head, 1 anterior->posterior, and 2 the
  patient's right->left (LPS x grows to the patient's left).

Every volume is resampled once from the scan (after an averaging shrink that avoids
aliasing and saves time), and labels are resampled once back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .transforms import matrix_of

Vec3 = Tuple[float, float, float]

AIR_HU = -1024.0
HEAD_THRESHOLD_HU = -300.0   # scalp and everything inside it
BOX_MARGIN_MM = 6.0
MAX_BOX_MM = (230.0, 260.0, 220.0)  # x, y, z: larger than any adult head
_SCOUT_SPACING_MM = 4.0      # resolution of the head-mask search
#: Median soft-tissue density (HU) of a head on a calibrated scanner (brain, CSF, scalp).
SOFT_TISSUE_LEVEL_HU = 30.0
#: Largest calibration shift (HU) that is corrected; beyond it the scan is not a
#: calibrated CT, which the CT check reports.
MAX_CALIBRATION_SHIFT_HU = 60.0


@dataclass(frozen=True)
class Grid:
    """An identity-direction grid in the upright space (sizes and vectors in x, y, z)."""

    origin: Vec3
    spacing: Vec3
    size: Tuple[int, int, int]

    @property
    def shape(self) -> Tuple[int, int, int]:
        """numpy shape ``(z, y, x)`` of arrays on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    def reference(self) -> sitk.Image:
        """An empty image with this geometry, for ``sitk.Resample``."""
        ref = sitk.Image([int(s) for s in self.size], sitk.sitkUInt8)
        ref.SetOrigin(self.origin)
        ref.SetSpacing(self.spacing)
        return ref

    def image(self, array: np.ndarray) -> sitk.Image:
        """Wrap a ``(z, y, x)`` array as a SimpleITK image on this grid."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(array))
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        return img

    def axis_coordinates(self, axis: int) -> np.ndarray:
        """Physical coordinate (mm) of each index along x (0), y (1) or z (2)."""
        return self.origin[axis] + self.spacing[axis] * np.arange(self.size[axis])


@dataclass(frozen=True)
class HeadBox:
    """Where the head is in the upright space: its bounding box and mid-sagittal x."""

    lower: Vec3
    upper: Vec3
    midline_x: float

    def grid(self, spacing: Sequence[float], multiple: int = 1) -> Grid:
        """The grid at ``spacing`` covering this box, sizes rounded up to ``multiple``.

        Grids of different spacings share the box centre, so probabilities from models
        at different spacings can be brought onto one grid (see :func:`grid_points_in`).
        """
        size, origin = [], []
        for lo, hi, sp in zip(self.lower, self.upper, spacing):
            n = int(np.ceil((hi - lo) / sp)) + 1
            n = int(np.ceil(n / multiple) * multiple)
            centre = 0.5 * (lo + hi)
            size.append(n)
            origin.append(centre - 0.5 * (n - 1) * sp)
        return Grid(tuple(origin), tuple(float(s) for s in spacing), tuple(size))  # type: ignore[arg-type]


def shrink_for(image: sitk.Image, target_mm: float) -> sitk.Image:
    """Average whole blocks of voxels down towards ``target_mm`` (never coarser).

    BinShrink averages, so thin slices and 0.4 mm pixels are low-pass filtered before
    the linear resampling to the model grid instead of being aliased, and the resample
    reads 10-30x less data.
    """
    factors = [max(1, int(target_mm / s + 1e-6)) for s in image.GetSpacing()]
    if max(factors) == 1:
        return image
    return sitk.BinShrink(image, factors)


def stretched_about(img: sitk.Image, sizes: Sequence[float], centre: Sequence[float]) -> sitk.Image:
    """``img`` stretched by ``sizes`` along the x, y, z axes about ``centre`` (LPS mm): a
    new origin and spacing only, no resampling. A head of other proportions, or the
    reference fitted to one. The image's axes must lie along x, y, z (a direction of
    +-1 on the diagonal, as the upright reference head's), so that its spacing per axis
    is a length along x, y, z."""
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    if not np.allclose(np.abs(direction), np.eye(3)):
        raise ValueError("stretched_about needs an image whose axes lie along x, y and z")
    sizes, centre = np.asarray(sizes, float), np.asarray(centre, float)
    out = sitk.Image(img)
    out.SetSpacing(tuple(float(v) for v in np.asarray(img.GetSpacing()) * sizes))
    out.SetOrigin(tuple(float(v) for v in centre + (np.asarray(img.GetOrigin()) - centre) * sizes))
    return out


def head_box(scan: sitk.Image, transform: sitk.Transform) -> HeadBox:
    """Find the head in the upright space (scalp included, table and air excluded).

    The largest connected region above -300 HU on a coarse copy of the scan is the
    head; its voxels carried into the upright space give the box and the midline.
    """
    scout = sitk.Cast(shrink_for(scan, _SCOUT_SPACING_MM), sitk.sitkFloat32)
    mask = sitk.BinaryThreshold(scout, HEAD_THRESHOLD_HU, 1e9, 1, 0)
    mask = sitk.BinaryMorphologicalOpening(mask, [1, 1, 1])
    comps = sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True)
    idx = np.argwhere(sitk.GetArrayViewFromImage(comps) == 1)[:, ::-1]  # -> x, y, z index
    if len(idx) == 0:
        idx = np.argwhere(np.ones(sitk.GetArrayViewFromImage(scout).shape, bool))[:, ::-1]
    # index -> scan physical (LPS) -> upright, vectorised with the 4x4 matrices.
    direction = np.array(scout.GetDirection()).reshape(3, 3)
    phys = (direction @ (idx * np.array(scout.GetSpacing())).T).T + np.array(scout.GetOrigin())
    inv = np.linalg.inv(matrix_of(transform))
    upright = phys @ inv[:3, :3].T + inv[:3, 3]
    lower = upright.min(axis=0) - BOX_MARGIN_MM
    upper = upright.max(axis=0) + BOX_MARGIN_MM
    centre = upright.mean(axis=0)
    for ax in range(3):  # cap to a head-sized box; in z keep the top (vertex), drop the neck
        if upper[ax] - lower[ax] > MAX_BOX_MM[ax]:
            if ax == 2:
                lower[ax] = upper[ax] - MAX_BOX_MM[ax]
            else:
                lower[ax] = centre[ax] - MAX_BOX_MM[ax] / 2
                upper[ax] = centre[ax] + MAX_BOX_MM[ax] / 2
    return HeadBox(tuple(lower), tuple(upper), float(np.median(upright[:, 0])))  # type: ignore[arg-type]


def upright_resample(scan: sitk.Image, transform: sitk.Transform, grid: Grid,
                     interpolator: int = sitk.sitkLinear,
                     default: float = AIR_HU) -> np.ndarray:
    """The scan seen in the upright space on ``grid``, as a float32 ``(z, y, x)`` array.

    ``R`` is used as the resampling transform directly: output point p takes the value
    of the scan at R(p), exactly docs/DESIGN.md's ``sitk.Resample(ct, ct, R, ...)``.
    """
    source = shrink_for(scan, min(grid.spacing)) if interpolator != sitk.sitkNearestNeighbor else scan
    out = sitk.Resample(source, grid.reference(), transform, interpolator, default, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def labels_to_scan(labels: np.ndarray, grid: Grid, scan: sitk.Image,
                   transform: sitk.Transform) -> sitk.Image:
    """Labels from the model grid onto the scan's own grid (same size, spacing, origin,
    direction): scan voxel q takes the label at upright point R^-1(q)."""
    inverse = sitk.AffineTransform(3)
    m = np.linalg.inv(matrix_of(transform))
    inverse.SetMatrix(m[:3, :3].ravel().tolist())
    inverse.SetTranslation(m[:3, 3].tolist())
    return _resample_labels(labels, grid, scan, inverse)


def labels_to_upright_scan_grid(labels: np.ndarray, grid: Grid, scan: sitk.Image) -> sitk.Image:
    """Labels in the upright space on the scan's grid: the layout of ``N-seg.nii.gz``."""
    return _resample_labels(labels, grid, scan, sitk.AffineTransform(3))


def _resample_labels(labels: np.ndarray, grid: Grid, reference: sitk.Image,
                     transform: sitk.Transform) -> sitk.Image:
    src = grid.image(labels.astype(np.uint8, copy=False))
    return sitk.Resample(src, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def lateral_coordinate(grid: Grid, midline_x: float, scale_mm: float = 80.0) -> np.ndarray:
    """Signed distance from the mid-sagittal plane along x, in units of ``scale_mm``.

    Positive is the patient's left (LPS). Fed to the networks as an extra channel: a
    sagittal slice, or a 3D patch near the midline, cannot tell left from right alone.
    Returns a 1D array over x; broadcast it where needed.
    """
    return ((grid.axis_coordinates(0) - midline_x) / scale_mm).astype(np.float32)


def grid_points_in(src: Grid, dst: Grid) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fractional indices (x, y, z arrays) of ``dst``'s grid lines in ``src``'s index space."""
    return tuple((dst.axis_coordinates(a) - src.origin[a]) / src.spacing[a]  # type: ignore[return-value]
                 for a in range(3))


def crop_box(shape: Sequence[int], mask: Optional[np.ndarray] = None) -> Tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` (everything if None or empty)."""
    if mask is None or not mask.any():
        return tuple(slice(0, n) for n in shape)
    idx = np.argwhere(mask)
    return tuple(slice(int(lo), int(hi) + 1) for lo, hi in zip(idx.min(0), idx.max(0)))


def calibration_shift(hu: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
    """How far (HU) the head's median soft-tissue density lies from
    :data:`SOFT_TISSUE_LEVEL_HU`; 0 when there is too little soft tissue to tell.

    Scanners differ in calibration by tens of HU over the whole image. Soft tissue
    (-100..150 HU: brain, CSF, scalp; not fat, air or bone) is mostly brain in a head
    scan, and its median moves with the calibration and hardly with the patient, so
    subtracting this shift makes densities comparable between scanners.
    """
    sel = (hu > -100.0) & (hu < 150.0)
    if mask is not None:
        sel &= mask
    soft = hu[sel]
    if soft.size < 100:
        return 0.0
    shift = float(np.median(soft)) - SOFT_TISSUE_LEVEL_HU
    return float(np.clip(shift, -MAX_CALIBRATION_SHIFT_HU, MAX_CALIBRATION_SHIFT_HU))
