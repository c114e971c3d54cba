"""The ASPECTS preview PNG of ``brainlobeseg stats``: the read-out next to the scan it came from.

A score alone cannot be checked; the picture shows where it comes from. Axial slices at
the ganglionic and the supraganglionic level (plus the level of any affected region that
neither shows), with the regions whose final call is "affected" (the automatic call, or
the clinician's override) filled and outlined in red and the other regions as faint
outlines in their own colours, so the eye goes to the calls and can compare them with the
mirror side. Below: the score per side with the symptomatic side and its reason, the
affected regions, the orientation, a key and the "decision support" line.

The slices are cut square to the mid-sagittal plane the read-out itself used
(:func:`aspects.midplane`), centred on it, with the scanner's superior direction up: a
rolled or turned head is shown symmetric, as it was compared, and no transform is needed
(``stats --labels`` has none). Only numpy and SimpleITK (the inference-path rule).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import aspects, output, regions
from .preview import _framed, _stack, level_slices, text_image

#: Colour of an affected region: pure red is no region's colour (regions.py).
WARNING_COLOUR: Tuple[int, int, int] = (255, 0, 0)
#: Colour of the "decision support" line: it must not read as part of the legend.
NOTICE_COLOUR: Tuple[int, int, int] = (255, 220, 0)
#: Pixel size of the slices (mm): a 0.45 mm scan keeps its detail, a coarse one is
#: interpolated (smoother than blocks, and the outlines stay thin).
DISPLAY_MM = 0.5
#: Spacing (mm) of the coarse grid on which the levels are chosen.
LEVEL_GRID_MM = 2.0
#: Border around the labelled regions (mm, x y z): the skull and a little scalp at the
#: sides, and also the frontal and occipital lobes (no ASPECTS region) in front and behind.
MARGIN_MM: Tuple[float, float, float] = (15.0, 35.0, 15.0)
#: Width (pixels) of an affected region's outline; the others get 1.
AFFECTED_OUTLINE_PX = 3
ORIENTATION = ("Axial slices square to the mid-sagittal plane, anterior up, patient's right "
               "on the image's left (radiological view)")
SHORT_NOTICE = "Decision support, not a diagnosis"


# ----------------------------------------------------------------------------- geometry

def display_grid(labels: sitk.Image, spacing: float,
                 margin: Tuple[float, float, float] = MARGIN_MM) -> sitk.Image:
    """An empty grid: x along the mid-sagittal plane's normal (to the patient's left) and
    centred on the plane, z the scanner's superior direction made square to it, y posterior.

    A slice of it, as stored, is the radiological view (rows anterior to posterior,
    columns from the patient's right to left), whatever the scan's own axis order.
    """
    normal, point = aspects.midplane(labels)
    ex = normal / np.linalg.norm(normal)
    up = np.array([0.0, 0.0, 1.0]) - ex[2] * ex
    ez = up / np.linalg.norm(up)
    axes = np.stack([ex, np.cross(ez, ex), ez], axis=1)
    idx = np.argwhere(sitk.GetArrayViewFromImage(labels) > 0)[:, ::-1]
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    corners = [labels.TransformContinuousIndexToPhysicalPoint([float(c) for c in (a, b, d)])
               for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for d in (lo[2], hi[2])]
    local = (np.array(corners) - point) @ axes
    pad = np.asarray(margin, dtype=float)
    half_x = np.abs(local[:, 0]).max() + pad[0]
    low, high = local.min(axis=0) - pad, local.max(axis=0) + pad
    size = [2 * int(np.ceil(half_x / spacing))] + \
        [int(np.ceil((high[k] - low[k]) / spacing)) + 1 for k in (1, 2)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(axes.ravel().tolist())
    grid.SetOrigin((point + axes @ np.array([-(size[0] - 1) / 2 * spacing, low[1], low[2]])).tolist())
    return grid


def slice_of(grid: sitk.Image, z: int, spacing: float) -> sitk.Image:
    """Slice ``z`` of ``grid`` as a one-slice grid with the same centre and area at
    ``spacing``: only the slices shown are sampled finely, not the whole head."""
    size = [int(round(n * s / spacing)) for n, s in zip(grid.GetSize()[:2], grid.GetSpacing()[:2])]
    centre = np.array(grid.TransformContinuousIndexToPhysicalPoint(
        [(grid.GetSize()[0] - 1) / 2, (grid.GetSize()[1] - 1) / 2, float(z)]))
    axes = np.array(grid.GetDirection()).reshape(3, 3)
    out = sitk.Image(size + [1], sitk.sitkUInt8)
    out.SetSpacing([spacing] * 3)
    out.SetDirection(grid.GetDirection())
    out.SetOrigin((centre - axes @ np.array([(size[0] - 1) / 2 * spacing, (size[1] - 1) / 2 * spacing, 0.0])
                   ).tolist())
    return out


def sample(image: sitk.Image, grid: sitk.Image, labels: bool) -> np.ndarray:
    """``image`` on ``grid`` as ``(z, y, x)``: nearest neighbour for labels, linear for HU."""
    if labels:
        img = sitk.Resample(sitk.Cast(image, sitk.sitkUInt8), grid, sitk.Transform(), sitk.sitkNearestNeighbor,
                            0, sitk.sitkUInt8)
    else:
        img = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear,
                            -1024.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(img)


# ----------------------------------------------------------------------------- levels

def shown_levels(coarse_labels: np.ndarray, affected: Sequence[int]) -> List[Tuple[int, str]]:
    """(coarse slice index, title) of the slices to show: the two ASPECTS levels, then the
    slice with most voxels of the affected regions neither level cuts (a call the picture
    does not show cannot be checked on it)."""
    levels = list(zip(level_slices(coarse_labels), ("Ganglionic level", "Supraganglionic level")))
    cut = coarse_labels[[z for z, _ in levels]]
    missing = [a for a in affected if not np.any(cut == a)]
    counts = np.isin(coarse_labels, missing).sum(axis=(1, 2))
    if missing and counts.any():
        names = ", ".join(regions.REGION_BY_LABEL[a].segment_name for a in missing)
        levels.append((int(np.argmax(counts)), f"Level of {names}"))
    return levels


# ----------------------------------------------------------------------------- drawing

def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` minus its 4-connected border pixel (outside the picture counts as outside)."""
    pad = np.pad(mask, 1)
    return mask & pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    """The inner border of ``mask``, ``width`` pixels wide (inside, so neighbours keep theirs)."""
    inner = mask
    for _ in range(width):
        inner = _eroded(inner)
    return mask & ~inner


def _blend(rgb: np.ndarray, mask: np.ndarray, colour: Sequence[int], alpha: float) -> None:
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * np.asarray(colour, np.float32)


def _stamp(rgb: np.ndarray, text: np.ndarray, centre: Tuple[int, int]) -> None:
    """Put ``text`` (RGB on black) centred at ``centre`` (row, column), clipped to the
    picture; black stays transparent."""
    h, w = text.shape[:2]
    r0, c0 = max(0, centre[0] - h // 2), max(0, centre[1] - w // 2)
    part = text[: rgb.shape[0] - r0, : rgb.shape[1] - c0]
    target = rgb[r0:r0 + part.shape[0], c0:c0 + part.shape[1]]
    ink = part.any(axis=-1)
    target[ink] = part[ink]


def region_panel(hu: np.ndarray, labels: np.ndarray, affected: Sequence[int], level_hu: float
                 ) -> np.ndarray:
    """One slice as RGB uint8: the CT windowed around the scan's own parenchyma level
    (a calibration offset does not darken the picture), affected regions red (filled,
    thick outline, code written on them), the others a faint outline in their colour."""
    lo, hi = level_hu - 30.0, level_hu + 50.0
    grey = np.clip((hu - lo) / (hi - lo), 0, 1) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    for r in regions.REGIONS:
        mask = labels == r.label
        if not mask.any():
            continue
        if r.label in affected:
            _blend(rgb, mask, WARNING_COLOUR, 0.25)
            _blend(rgb, outline(mask, AFFECTED_OUTLINE_PX), WARNING_COLOUR, 1.0)
        else:
            _blend(rgb, outline(mask, 1), r.color, 0.6)
    out = rgb.astype(np.uint8)
    for a in affected:
        rows, cols = np.nonzero(labels == a)
        if rows.size:
            _stamp(out, text_image(regions.REGION_BY_LABEL[a].code, 2), (int(rows.mean()), int(cols.mean())))
    return out


# ----------------------------------------------------------------------------- text

def wrapped(text: str, width_px: int, scale: int = 2, colour: Tuple[int, int, int] = (255, 255, 255)
            ) -> np.ndarray:
    """``text`` broken at spaces into lines no wider than ``width_px`` (a long reason must
    not make the picture wider than its slices)."""
    per_line = max(20, (width_px + scale) // (6 * scale))
    lines: List[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= per_line:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return _stack([text_image(line, scale, colour) for line in lines or [""]], axis=0, gap=3 * scale)


def score_line(result: aspects.AspectsResult) -> str:
    """``ASPECTS left N, right M (symptomatic side X: reason)``."""
    reason = result.side_reason if result.side_source == "user" else f"proposed, {result.side_reason}"
    return (f"ASPECTS left {result.score('left')}, right {result.score('right')} "
            f"(symptomatic side {result.side}: {reason})")


def affected_line(result: aspects.AspectsResult) -> str:
    """The affected regions per side (final calls, overrides marked)."""
    parts = []
    for side in aspects.SIDES:
        names = [r.code + (" (override)" if r.override is not None else "") for r in result.affected(side)]
        parts.append(f"{side}: {', '.join(names) if names else 'none'}")
    return "Affected regions (red) - " + "; ".join(parts)


def key(scale: int) -> np.ndarray:
    """What red and the thin outlines mean."""
    side = 7 * scale
    red = np.zeros((side, side, 3), np.uint8)
    red[...] = WARNING_COLOUR
    thin = np.zeros((side, side, 3), np.uint8)
    thin[outline(np.ones((side, side), bool), 1)] = (160, 160, 160)
    return _stack([red, text_image(" affected (final call)    ", scale), thin,
                   text_image(" other regions (outline in the region's colour)", scale)],
                  axis=1, gap=scale, align="centre")


def aspects_picture(ct: sitk.Image, labels: sitk.Image, result: aspects.AspectsResult,
                    scale: int = 2) -> np.ndarray:
    """The whole ASPECTS preview as RGB uint8 (see the module docstring)."""
    affected = [r.label for r in result.regions if r.affected]
    coarse = display_grid(labels, LEVEL_GRID_MM)
    levels = shown_levels(sample(labels, coarse, labels=True), affected)
    panels = []
    for z, title in levels:
        fine = slice_of(coarse, z, DISPLAY_MM)
        panel = region_panel(sample(ct, fine, labels=False)[0], sample(labels, fine, labels=True)[0],
                             affected, result.level_hu)
        panels.append(_framed(panel, title, scale))
    picture = _stack(panels, axis=1, gap=20 * scale)
    width = picture.shape[1]
    caption = [wrapped(score_line(result), width, scale), wrapped(affected_line(result), width, scale),
               key(scale), wrapped(ORIENTATION, width, scale),
               wrapped(SHORT_NOTICE, width, scale + 1, NOTICE_COLOUR)]
    out = _stack([picture] + caption, axis=0, gap=8 * scale)
    return np.pad(out, ((8 * scale,) * 2, (8 * scale,) * 2, (0, 0)))


def write_aspects_preview(ct: sitk.Image, labels: sitk.Image, result: aspects.AspectsResult,
                          path: str) -> None:
    """:func:`aspects_picture` as a PNG at ``path`` (written atomically)."""
    output.write_png(aspects_picture(ct, labels, result), path)
