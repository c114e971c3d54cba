"""The head's mid-sagittal plane: the plane whose mirror image of the head matches it best.

The head is nearly mirror-symmetric, so this plane gives the head's roll and yaw without
any template. The cost is the mean squared difference between the working image (brain
window, lightly smoothed; :mod:`head_grid`) and its reflection: a coarse grid over plane
normals (+-24 degrees around the scan's left-right axis, whole head), then Nelder-Mead
over normal and offset on the central brain (55 mm around the head's centroid). Points
whose mirror image falls outside the scan's field of view are left out: a cut vertex is a
plane of the *scan* and would pull the plane towards the scan's axes.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .head_grid import FEATURE_HU, Sampler, index_points
from .optimise import nelder_mead_steps
from .steps import Steps, run_steps

#: Half-range (degrees) of the coarse search over the symmetry plane's normal.
SEARCH_DEG = 24.0
COARSE_STEP_DEG = 4.0
#: Radius (mm) around the head's centroid used by the fine symmetry search.
CORE_RADIUS_MM = 55.0


def _normal(u: float, v: float) -> np.ndarray:
    """Unit normal from the plane's slopes: ``n ~ (1, u, v)`` (x > 0: patient left)."""
    n = np.array([1.0, u, v])
    return n / np.linalg.norm(n)


def symmetry_cost(sample: Sampler, pts: np.ndarray, values: np.ndarray, normal: np.ndarray,
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
    pts = index_points(img, mask)
    sample = Sampler(img, outside=FEATURE_HU[0], fov=fov)
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
