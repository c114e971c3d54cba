"""The head on a coarse isotropic working grid, and sampling it at physical points.

The pose estimate (:mod:`alignment`) compares the head with its mirror image
(:mod:`symmetry_plane`) and with an upright reference head (:mod:`reference_registration`)
thousands of times; on a 3-4 mm identity-direction grid in the scan's physical space (LPS)
each comparison takes milliseconds. Arrays are z y x; points are x y z in mm.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from . import geometry, transforms
from .steps import Steps, run_steps

#: Working resolution (mm). 3-4 mm keeps the skull and ventricles, and makes one cost
#: evaluation a few milliseconds.
WORK_SPACING_MM = 3.5
#: HU range of the feature image: the brain window. Ventricles, deep grey nuclei and the
#: brain/CSF border carry the roll; bone and air are clipped flat (the skull outline of a
#: nearly round head says little about roll, and bone density varies with thickness).
FEATURE_HU = (0.0, 80.0)
#: Margin (mm) of the working grid around the head box.
GRID_MARGIN_MM = 30.0
#: Gaussian smoothing (mm, sigma) of the feature image: keeps the skull, ventricles and
#: the brain outline, blurs thin sulci whose partial volume in thick slices differs
#: between the sides of a tilted head.
SMOOTHING_MM = 2.5


def working_image(scan: sitk.Image, spacing: float
                  ) -> Tuple[sitk.Image, np.ndarray, np.ndarray, sitk.Image]:
    """:func:`working_image_steps` in one go."""
    return run_steps(working_image_steps(scan, spacing))


def working_image_steps(scan: sitk.Image, spacing: float
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
    box = geometry.HeadBox(tuple(lo - GRID_MARGIN_MM for lo in box.lower),
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


def index_points(img: sitk.Image, mask: np.ndarray, max_points: Optional[int] = 30000,
                 seed: int = 0) -> np.ndarray:
    """Physical (x, y, z) LPS points of (a random subset of) the masked voxels; all of
    them with ``max_points=None``."""
    idx = np.argwhere(mask)[:, ::-1].astype(np.float64)  # z y x -> x y z
    if max_points is not None and len(idx) > max_points:
        idx = idx[np.random.default_rng(seed).choice(len(idx), max_points, replace=False)]
    return np.asarray(img.GetOrigin()) + idx * np.asarray(img.GetSpacing())


class Sampler:
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


def mask_image(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    m = sitk.GetImageFromArray(mask.astype(np.uint8))
    m.CopyInformation(like)
    return m
