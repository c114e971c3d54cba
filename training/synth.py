"""``python -m training synth``: labelled synthetic head CTs from the public MNI atlases.

Sources (read from ``--atlas-dir``, never copied into the project; see its INDEX.md):

- ``Clinical-scct/scct.nii.gz``: Rorden's mean head CT with skull (BSD-2), 2 mm MNI, in
  Cormack units; converted to HU with :func:`cormack_to_hu` (formula of its SOURCE.md).
- ``Clinical-scct/scgrey|scwhite|sccsf.nii.gz``: grey/white/CSF probability maps, same grid.
- ``aspects-on-cta/MNI152_<CODE>_<L|R>.nii.gz``: the 20 ASPECTS masks (MIT), 1 mm MNI.
  File codes map to ours as C->C, LN->L (lentiform), InCa->IC (internal capsule),
  IC->I (insular cortex), M1..M6->M1..M6; ``_L`` is the patient's left (ids 1-10),
  ``_R`` the right (ids 11-20).

Overlap rule (the masks overlap by about 10 000 voxels): **where masks overlap, the
voxel takes the structure that comes first in C, IC, L, I, M1, M2, M3, M4, M5, M6**,
i.e. deep nuclei and capsule win over the insula, the insula over the cortical
sectors, and among the deep structures the thinner one wins (the internal capsule is
a band a few mm wide that the lentiform mask would otherwise erode). Left and right
masks do not overlap; if they did, left would win (a fixed, documented tie-break).

Per case ``i`` (generator seeded from ``(seed, i)``, so any case can be remade alone):

1. Deformation ``D`` (upright -> MNI): global scaling 0.9-1.1 (slightly anisotropic)
   about the head centre, a small shift, and a smooth random displacement (a few
   low-frequency sinusoids, 0-4 mm, kept diffeomorphic by bounding its gradient).
2. Head pose ``R`` (upright -> scan): rotations up to +-15 degrees about each axis about
   the head centre, written as ``N.txt`` by :func:`transforms.write_transform`.
3. Scan grid: 512 x 512 (``--inplane``) at 0.4-0.5 mm (scaled for other sizes; widened
   when the head would not fit), slice thickness from ``--slice-mm``, slices from the
   skull base to the vertex of the tilted head (and covering the upright labels).
4. Intensities: tissue HU drawn per case (grey, white matter, CSF, bone, scalp), mixed
   by the tissue maps; deep nuclei pulled towards grey-matter density, as on real CT.
   Rendered ``ct(q) = HU(D(R^-1 q))`` on a ~1 mm grid aligned with the scan, averaged
   over the slice thickness (partial volume), blurred in-plane, noise added, then
   interpolated to the scan grid. Air is -1024 HU.
5. Labels in the upright layout on the scan grid: ``labels(u) = atlas(D(u))``, so
   ``sitk.Resample(ct, ct, R, sitk.sitkLinear, -1024)`` lies on them (DESIGN.md s. 2).

A ``synth.json`` manifest (sources, licences, options, per-case parameters) is written
next to the cases; ``training export`` copies it into the model card.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from BrainLobeSegLib import dataset, regions, transforms
from BrainLobeSegLib.errors import InputError

AIR_HU = -1024.0
#: Our region code -> the code in the aspects-on-cta file names.
FILE_CODES = {"C": "C", "L": "LN", "IC": "InCa", "I": "IC",
              "M1": "M1", "M2": "M2", "M3": "M3", "M4": "M4", "M5": "M5", "M6": "M6"}
#: Overlap priority, first wins (see the module docstring).
PRIORITY = ["C", "IC", "L", "I", "M1", "M2", "M3", "M4", "M5", "M6"]
TEMPLATE = "Clinical-scct/scct.nii.gz"
TISSUES = {"grey": "Clinical-scct/scgrey.nii.gz", "white": "Clinical-scct/scwhite.nii.gz",
           "csf": "Clinical-scct/sccsf.nii.gz"}
MASK_PATTERN = "aspects-on-cta/MNI152_{code}_{side}.nii.gz"
SOURCES = [
    {"name": "Clinical-scct (Rorden CT template and tissue priors)", "license": "BSD-2-Clause",
     "url": "https://github.com/neurolabusc/Clinical",
     "files": [TEMPLATE] + list(TISSUES.values())},
    {"name": "aspects-on-cta (3D ASPECTS region masks)", "license": "MIT",
     "url": "https://github.com/AnotherMak/aspects-on-cta", "files": ["aspects-on-cta/MNI152_*_[LR].nii.gz"]},
]

SKULL_BASE_MNI_Z = -55.0     # scans start about at the foramen magnum
HEAD_HU = -300.0             # template voxels above this are head
INPLANE_SPACING_512 = (0.40, 0.50)
SCALE_RANGE = (0.90, 1.10)
MAX_TILT_DEG = 15.0
FIELD_SPACING_MM = 6.0       # node spacing of the displacement field
WORK_SPACING_MM = 1.0        # the ct is rendered at this (or the scan's, if coarser)
UPRIGHT_SPACING_MM = 1.5     # the deformed HU volume (the template itself is 2 mm)
MARGIN_MM = 14.0             # skull and scalp around the intracranial space


def cormack_to_hu(c: np.ndarray) -> np.ndarray:
    """Cormack units of the Clinical toolbox -> HU (its ``clinical_c2h``, per SOURCE.md)."""
    v = np.asarray(c, dtype=np.float32) - 900.0
    h = np.where(v <= 0, v, np.where(v <= 2200, v / 11.0, v - 2000.0))
    return (h - 124.0).astype(np.float32)


def hu_to_cormack(hu: np.ndarray) -> np.ndarray:
    """Inverse of :func:`cormack_to_hu` (used to build test atlases)."""
    h = np.asarray(hu, dtype=np.float64) + 124.0
    v = np.where(h <= 0, h, np.where(h <= 200, h * 11.0, h + 2000.0))
    return (v + 900.0).astype(np.float32)


# ----------------------------------------------------------------------------- atlas

@dataclass
class Atlas:
    """The atlas sources in MNI space (LPS mm), prepared once per run."""

    template_hu: np.ndarray       # (z, y, x) float32 HU on the template grid
    grey: np.ndarray              # tissue probabilities on the template grid
    white: np.ndarray
    csf: np.ndarray
    nuclei: np.ndarray            # fraction of caudate + lentiform on the template grid
    template_ref: sitk.Image      # geometry of the template grid
    labels: sitk.Image            # uint8 0..20 on the mask grid (overlaps resolved)
    centre: np.ndarray            # head centre (LPS mm): centroid of the head voxels
    head_box: np.ndarray          # (8, 3) corners of the box around all head voxels
    head_points: np.ndarray       # (n, 3) LPS points of the head, skull base upwards
    brain_points: np.ndarray      # (n, 3) intracranial points
    label_points: np.ndarray      # (n, 3) labelled points


def _read(path: Path, what: str) -> sitk.Image:
    if not path.is_file():
        raise InputError(f"atlas file missing: {path} ({what}).",
                         "Give --atlas-dir the shared data folder that holds Clinical-scct/ and "
                         "aspects-on-cta/ (see its INDEX.md).")
    dataset.check_gzip_complete(str(path))
    image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if image.GetDimension() != 3:
        raise InputError(f"atlas file {path} is not a 3D volume.", "Restore the original file.")
    return image


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def merge_masks(masks: Dict[int, np.ndarray]) -> np.ndarray:
    """One label map from binary masks by label id, resolving overlaps by :data:`PRIORITY`.

    Painted from the lowest priority to the highest, so the first structure in
    PRIORITY (left before right) is what an overlapping voxel keeps.
    """
    order: List[int] = []
    for code in PRIORITY:
        order += [regions.region(code, "left").label, regions.region(code, "right").label]
    shape = next(iter(masks.values())).shape
    out = np.zeros(shape, np.uint8)
    for label in reversed(order):
        out[masks[label]] = label
    return out


def _physical_points(image: sitk.Image, mask: np.ndarray, step: int) -> np.ndarray:
    """LPS points (n, 3) of the voxels of ``mask`` (z, y, x), every ``step``-th per axis."""
    sub = mask[::step, ::step, ::step]
    idx = np.argwhere(sub)[:, ::-1].astype(np.float64) * step      # x, y, z index
    direction = np.array(image.GetDirection()).reshape(3, 3)
    return (direction @ (idx * np.array(image.GetSpacing())).T).T + np.array(image.GetOrigin())


@functools.lru_cache(maxsize=2)
def load_atlas(atlas_dir: str) -> Atlas:
    """Read and prepare the atlas files (once per process)."""
    root = Path(atlas_dir)
    if not root.is_dir():
        raise InputError(f"atlas folder not found: {root}.",
                         "Give --atlas-dir the shared data folder (with Clinical-scct/ and aspects-on-cta/).")
    template = _read(root / TEMPLATE, "CT template")
    tissue = {k: _read(root / p, f"{k} matter map" if k != "csf" else "CSF map") for k, p in TISSUES.items()}
    for k, img in tissue.items():
        if not _same_geometry(img, template):
            raise InputError(f"the {k} map is not on the grid of the CT template.", "Restore the original files.")
    masks: Dict[int, np.ndarray] = {}
    mask_ref: Optional[sitk.Image] = None
    for code, file_code in FILE_CODES.items():
        for side, tag in (("left", "L"), ("right", "R")):
            img = _read(root / MASK_PATTERN.format(code=file_code, side=tag), f"{code} {side} mask")
            if mask_ref is None:
                mask_ref = img
            elif not _same_geometry(img, mask_ref):
                raise InputError(f"mask {file_code}_{tag} is not on the grid of the other masks.",
                                 "Restore the original files.")
            masks[regions.region(code, side).label] = sitk.GetArrayViewFromImage(img) > 0.5
    assert mask_ref is not None
    labels = sitk.GetImageFromArray(merge_masks(masks))
    labels.CopyInformation(mask_ref)
    nuclei_mask = sitk.GetImageFromArray(np.isin(sitk.GetArrayViewFromImage(labels), [
        regions.region(c, s).label for c in ("C", "L") for s in ("left", "right")]).astype(np.float32))
    nuclei_mask.CopyInformation(mask_ref)
    nuclei = sitk.GetArrayFromImage(sitk.Resample(nuclei_mask, template, transforms.identity(),
                                                  sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    hu = cormack_to_hu(sitk.GetArrayViewFromImage(template))
    grey, white, csf = (sitk.GetArrayFromImage(tissue[k]).astype(np.float32) for k in ("grey", "white", "csf"))
    head = hu > HEAD_HU
    if not head.any():
        raise InputError(f"the CT template {root / TEMPLATE} holds no head.", "Restore the original file.")
    head_pts = _physical_points(template, head, 1)
    centre = head_pts.mean(axis=0)
    lo, hi = head_pts.min(0), head_pts.max(0)
    corners = np.array([[(lo, hi)[c][a] for a, c in enumerate(idx)] for idx in np.ndindex(2, 2, 2)])
    head_pts = head_pts[head_pts[:, 2] >= SKULL_BASE_MNI_Z]
    lab_arr = sitk.GetArrayViewFromImage(labels) > 0
    if not lab_arr.any():
        raise InputError("the ASPECTS masks are all empty.", "Restore the original files.")
    return Atlas(template_hu=hu, grey=grey, white=white, csf=csf, nuclei=nuclei,
                 template_ref=template, labels=labels, centre=centre, head_box=corners,
                 head_points=head_pts[:: max(1, len(head_pts) // 20000)],
                 brain_points=_physical_points(template, (grey + white + csf) > 0.5, 1)[::4],
                 label_points=_physical_points(labels, lab_arr, 2))


# ----------------------------------------------------------------------------- parameters

@dataclass
class CaseParams:
    """Everything drawn for one case (recorded in synth.json)."""

    scale: Tuple[float, float, float]
    shift_mm: Tuple[float, float, float]
    warp_mm: float
    warp_modes: List[List[float]]   # per mode: component, amplitude, wave vector (3), phase
    angles_deg: Tuple[float, float, float]
    slice_mm: float
    spacing_mm: float
    grey_hu: float
    white_hu: float
    csf_hu: float
    bone_hu: float
    scalp_hu: float
    nuclei_gain: float
    noise_hu: float
    blur_mm: float
    offset_frac: Tuple[float, float]


def _warp_modes(rng: np.random.Generator, amplitude: float, n: int = 4) -> List[List[float]]:
    """Low-frequency sinusoids per displacement component (wavelengths 60-140 mm).

    The summed gradient is bounded by 0.3 so that the map stays one-to-one.
    """
    modes = []
    for comp in range(3):
        weights = rng.dirichlet(np.ones(n))
        for w in weights:
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            k = 2 * math.pi / rng.uniform(60.0, 140.0)
            modes.append([comp, amplitude * float(w), *(k * direction).tolist(), float(rng.uniform(0, 2 * math.pi))])
    for comp in range(3):
        grad = sum(abs(m[1]) * math.hypot(*m[2:5]) for m in modes if m[0] == comp)
        if grad > 0.3:
            for m in modes:
                if m[0] == comp:
                    m[1] *= 0.3 / grad
    return modes


def draw_params(rng: np.random.Generator, inplane: int, slice_range: Tuple[float, float]) -> CaseParams:
    """Draw one case's parameters (the only place randomness enters)."""
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    s = u(*SCALE_RANGE)
    grey = u(33.0, 42.0)
    slice_mm = round(u(*slice_range), 2)
    scale = tuple(s * u(0.97, 1.03) for _ in range(3))
    shift = tuple(u(-15.0, 15.0) for _ in range(3))
    warp = u(0.0, 4.0)
    return CaseParams(
        scale=scale, shift_mm=shift, warp_mm=warp, warp_modes=_warp_modes(rng, warp),  # type: ignore[arg-type]
        angles_deg=tuple(u(-MAX_TILT_DEG, MAX_TILT_DEG) for _ in range(3)),  # type: ignore[arg-type]
        slice_mm=slice_mm, spacing_mm=u(*INPLANE_SPACING_512) * 512.0 / inplane,
        grey_hu=grey, white_hu=min(u(22.0, 30.0), grey - 4.0), csf_hu=u(0.0, 12.0),
        bone_hu=u(900.0, 1600.0), scalp_hu=u(20.0, 50.0), nuclei_gain=u(0.4, 0.9),
        noise_hu=u(2.5, 5.0) * math.sqrt(5.0 / max(slice_mm, 0.5)), blur_mm=u(0.2, 0.8),
        offset_frac=(u(-0.8, 0.8), u(-0.8, 0.8)))


# ----------------------------------------------------------------------------- geometry

class Warp:
    """``D``: upright point -> MNI point; its affine part is inverted exactly for planning."""

    def __init__(self, atlas: Atlas, p: CaseParams) -> None:
        self.c_mni = atlas.centre
        self.c_up = atlas.centre + np.array(p.shift_mm)
        self.scale = np.array(p.scale)
        self.modes = np.array(p.warp_modes, dtype=np.float64).reshape(-1, 6)

    def approx_to_upright(self, m: np.ndarray) -> np.ndarray:
        """MNI -> upright ignoring the few-mm smooth part (for grid planning only)."""
        return self.c_up + (m - self.c_mni) * self.scale

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """MNI points of upright points (n, 3)."""
        rel = u - self.c_up
        m = self.c_mni + rel / self.scale
        for comp, amp, kx, ky, kz, phase in self.modes:
            m[:, int(comp)] += amp * np.sin(rel @ np.array([kx, ky, kz]) + phase)
        return m

    def transform(self, lower: np.ndarray, upper: np.ndarray) -> sitk.Transform:
        """``D`` as a SimpleITK displacement field over the box [lower, upper] (LPS mm).

        Points outside the box would not move, so the box must hold every point that
        is resampled through ``D``.
        """
        size = np.ceil((upper - lower) / FIELD_SPACING_MM).astype(int) + 1
        axes = [lower[a] + FIELD_SPACING_MM * np.arange(size[a]) for a in range(3)]
        z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        pts = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
        disp = (self(pts) - pts).reshape(tuple(size[::-1]) + (3,))
        field = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
        field.SetOrigin(tuple(float(v) for v in lower))
        field.SetSpacing((FIELD_SPACING_MM,) * 3)
        return sitk.DisplacementFieldTransform(field)


@dataclass
class ScanGrid:
    """The scan grid (identity direction) and the ~1 mm work grid it is rendered on."""

    origin: np.ndarray
    spacing: Tuple[float, float, float]
    size: Tuple[int, int, int]
    work_spacing: float            # in-plane spacing of the work grid
    sub: int                       # work slices per scan slice (partial-volume average)

    def reference(self) -> sitk.Image:
        ref = sitk.Image([int(n) for n in self.size], sitk.sitkUInt8)
        ref.SetOrigin(tuple(float(v) for v in self.origin))
        ref.SetSpacing(self.spacing)
        return ref

    def work_reference(self) -> sitk.Image:
        """Same in-plane extent at ``work_spacing``; ``sub`` thin slices per slice,
        centred on it, spanning its thickness."""
        h, t = self.work_spacing, self.spacing[2]
        n = [int(math.ceil((self.size[a] - 1) * self.spacing[a] / h)) + 1 for a in range(2)]
        ref = sitk.Image(n[0], n[1], self.size[2] * self.sub, sitk.sitkUInt8)
        dz = t / self.sub
        ref.SetOrigin((float(self.origin[0]), float(self.origin[1]), float(self.origin[2] - t / 2 + dz / 2)))
        ref.SetSpacing((h, h, dz))
        return ref


def plan_grid(atlas: Atlas, warp: Warp, R: sitk.Transform, p: CaseParams, inplane: int) -> ScanGrid:
    """Scan grid holding the tilted head (skull base to vertex) and the upright labels."""
    m = transforms.matrix_of(R)
    to_scan = lambda pts: pts @ m[:3, :3].T + m[:3, 3]  # noqa: E731
    head = to_scan(warp.approx_to_upright(atlas.head_points))
    brain = to_scan(warp.approx_to_upright(atlas.brain_points))
    labels_up = warp.approx_to_upright(atlas.label_points)
    planar = np.vstack([brain[:, :2], labels_up[:, :2]])
    lo, hi = planar.min(0) - MARGIN_MM, planar.max(0) + MARGIN_MM
    extent = float((hi - lo).max())
    spacing = max(p.spacing_mm, extent / (inplane - 1))
    fov = spacing * (inplane - 1)
    centre = 0.5 * (lo + hi) + np.array(p.offset_frac) * 0.5 * np.maximum(fov - (hi - lo), 0.0)
    zs = np.concatenate([head[:, 2], labels_up[:, 2]])
    z0, z1 = float(zs.min()), float(zs.max())
    t = p.slice_mm
    nz = int(math.ceil((z1 - z0) / t)) + 1
    zc = 0.5 * (z0 + z1)
    origin = np.array([centre[0] - fov / 2, centre[1] - fov / 2, zc - (nz - 1) * t / 2])
    work = max(WORK_SPACING_MM, spacing)
    return ScanGrid(origin, (spacing, spacing, t), (inplane, inplane, nz), work,
                    max(1, int(math.ceil(t / max(WORK_SPACING_MM, min(work, 2.0)) - 1e-6))))


# ----------------------------------------------------------------------------- rendering

def tissue_hu(atlas: Atlas, p: CaseParams) -> sitk.Image:
    """The case's HU volume in MNI space (template grid): tissue maps inside the skull,
    the template's bone and scalp outside, with this case's densities."""
    s = np.clip(atlas.grey + atlas.white + atlas.csf, 0.0, 1.0)
    brain = (atlas.grey * p.grey_hu + atlas.white * p.white_hu + atlas.csf * p.csf_hu) / np.maximum(
        atlas.grey + atlas.white + atlas.csf, 1e-3)
    brain += p.nuclei_gain * atlas.nuclei * (p.grey_hu - brain)
    t = atlas.template_hu
    soft = np.clip((t + 300.0) / 300.0, 0.0, 1.0)             # 0 in air, 1 in tissue
    bone = np.clip((t - 80.0) / 340.0, 0.0, 1.0) ** 0.8        # template skull 80..420 HU
    outside = (1 - soft) * t + soft * (p.scalp_hu + bone * (p.bone_hu - p.scalp_hu))
    hu = (s * brain + (1 - s) * outside).astype(np.float32)
    img = sitk.GetImageFromArray(hu)
    img.CopyInformation(atlas.template_ref)
    return img


def _field_box(points: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    pts = np.vstack(points)
    return pts.min(0) - 3 * FIELD_SPACING_MM, pts.max(0) + 3 * FIELD_SPACING_MM


def upright_hu(atlas: Atlas, D: sitk.Transform, box: Tuple[np.ndarray, np.ndarray],
               p: CaseParams, grid: ScanGrid) -> sitk.Image:
    """The case's HU volume in the upright space, ``HU(D(u))``, over ``box``.

    The displacement field is costly per point in ITK (about 10x an affine), so it is
    applied once here, on a grid a little finer than the 2 mm template (coarser for
    coarse scans), and the scan is then rendered from this volume through the affine
    ``R^-1`` alone.
    """
    lo, hi = box
    h = float(np.clip(min(grid.spacing), UPRIGHT_SPACING_MM, 4.0))
    size = np.ceil((hi - lo) / h).astype(int) + 1
    ref = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    ref.SetOrigin(tuple(float(v) for v in lo))
    ref.SetSpacing((h, h, h))
    return sitk.Resample(tissue_hu(atlas, p), ref, D, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)


def render_ct(upright: sitk.Image, R: sitk.Transform, grid: ScanGrid, p: CaseParams,
              rng: np.random.Generator) -> sitk.Image:
    """``ct(q) = upright(R^-1 q)`` with partial volume, blur and noise, as int16."""
    R_inv = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(R)))
    work = sitk.Resample(upright, grid.work_reference(), R_inv, sitk.sitkLinear, AIR_HU,
                         sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(work)
    nz, ny, nx = arr.shape
    slab = arr.reshape(nz // grid.sub, grid.sub, ny, nx).mean(axis=1)   # slice thickness
    sigma = p.blur_mm / grid.work_spacing
    if sigma > 0.25:
        slab = ndimage.gaussian_filter(slab, (0.0, sigma, sigma), truncate=3.0)
    tissue = slab > AIR_HU + 24.0
    slab[tissue] += rng.standard_normal(int(tissue.sum()), dtype=np.float32) * np.float32(p.noise_hu)
    np.clip(np.rint(slab, out=slab), AIR_HU, 3071, out=slab)
    slab_img = sitk.GetImageFromArray(slab)
    slab_img.SetOrigin(tuple(float(v) for v in grid.origin))
    slab_img.SetSpacing((grid.work_spacing, grid.work_spacing, grid.spacing[2]))
    # Rounded on the way to int16 without a numpy pass over the big grid: shifted to be
    # positive (+1024.5), ITK's cast truncates, which is then rounding to nearest.
    ct = sitk.Resample(slab_img + (0.5 - AIR_HU), grid.reference(), transforms.identity(),
                       sitk.sitkLinear, 0.5, sitk.sitkFloat32)
    return sitk.Cast(ct, sitk.sitkInt16) + int(AIR_HU)


def render_labels(atlas: Atlas, D: sitk.Transform, upright_box: Tuple[np.ndarray, np.ndarray],
                  grid: ScanGrid) -> sitk.Image:
    """Upright labels ``atlas(D(u))`` on the scan grid (uint8).

    Sampled once on a ~1 mm upright grid over the labelled box only, then copied
    (nearest) into the matching part of the scan grid, which is cheaper than sampling
    every scan voxel through the displacement field.
    """
    lo, hi = upright_box
    h = float(np.clip(min(grid.spacing), 1.0, 2.0))
    size = np.ceil((hi - lo) / h).astype(int) + 1
    box_ref = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    box_ref.SetOrigin(tuple(float(v) for v in lo))
    box_ref.SetSpacing((h, h, h))
    box = sitk.Resample(atlas.labels, box_ref, D, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    spacing = np.array(grid.spacing)
    i0 = np.clip(np.floor((lo - grid.origin) / spacing).astype(int), 0, np.array(grid.size) - 1)
    i1 = np.clip(np.ceil((hi - grid.origin) / spacing).astype(int), 0, np.array(grid.size) - 1)
    full = np.zeros(tuple(grid.size[::-1]), np.uint8)
    sub_ref = sitk.Image([int(n) for n in i1 - i0 + 1], sitk.sitkUInt8)
    sub_ref.SetOrigin(tuple(float(v) for v in grid.origin + i0 * spacing))
    sub_ref.SetSpacing(grid.spacing)
    sub = sitk.Resample(box, sub_ref, transforms.identity(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    full[i0[2]:i1[2] + 1, i0[1]:i1[1] + 1, i0[0]:i1[0] + 1] = sitk.GetArrayViewFromImage(sub)
    out = sitk.GetImageFromArray(full)
    out.SetOrigin(tuple(float(v) for v in grid.origin))
    out.SetSpacing(grid.spacing)
    return out


@dataclass
class SynthCase:
    ct: sitk.Image
    labels: sitk.Image           # upright layout, on the ct's grid
    transform: sitk.AffineTransform
    params: CaseParams


def case_rng(seed: int, index: int) -> np.random.Generator:
    """Case ``index`` of a run with ``seed``: independent of how many cases are made."""
    return np.random.default_rng([int(seed), int(index)])


def synth_case(atlas: Atlas, seed: int, index: int, inplane: int = 512,
               slice_range: Tuple[float, float] = (1.0, 5.0)) -> SynthCase:
    """Make case ``index`` of the run ``seed`` (deterministic)."""
    rng = case_rng(seed, index)
    p = draw_params(rng, inplane, slice_range)
    warp = Warp(atlas, p)
    R = transforms.rotation(p.angles_deg, center=tuple(warp.c_up))
    grid = plan_grid(atlas, warp, R, p, inplane)
    p.spacing_mm = grid.spacing[0]          # widened if the head would not fit
    labels_up = warp.approx_to_upright(atlas.label_points)
    label_box = (labels_up.min(0) - 8.0, labels_up.max(0) + 8.0)
    head_up = warp.approx_to_upright(atlas.head_box)
    head_box = (head_up.min(0) - 10.0, head_up.max(0) + 10.0)
    D = warp.transform(*_field_box([head_up, np.array(label_box)]))
    ct = render_ct(upright_hu(atlas, D, head_box, p, grid), R, grid, p, rng)
    labels = render_labels(atlas, D, label_box, grid)
    return SynthCase(ct=ct, labels=labels, transform=R, params=p)


# ----------------------------------------------------------------------------- command

def _slice_range(text: str) -> Tuple[float, float]:
    try:
        parts = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX in mm, got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not 0.3 <= parts[0] <= parts[1] <= 20.0:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with 0.3 <= MIN <= MAX <= 20, got {text!r}")
    return parts[0], parts[1]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atlas-dir", type=Path, required=True,
                   help="shared data folder holding Clinical-scct/ and aspects-on-cta/")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write (created if missing)")
    p.add_argument("-n", type=int, default=10, help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="run seed; case i uses (seed, i)")
    p.add_argument("--first", type=int, default=0,
                   help="index of the first case (case i is named i+1); lets shards of one run "
                        "be made in parallel into different folders")
    p.add_argument("--inplane", type=int, default=512,
                   help="in-plane matrix size; spacing 0.4-0.5 mm at 512, proportionally coarser below")
    p.add_argument("--slice-mm", type=_slice_range, default=(1.0, 5.0), metavar="MIN,MAX",
                   help="slice thickness range in mm (default 1,5)")
    p.add_argument("--overwrite", action="store_true", help="replace existing cases of the same names")


def _manifest(args: argparse.Namespace, cases: Dict[str, dict]) -> dict:
    return {"generator": "training.synth", "sources": SOURCES, "overlap_priority": PRIORITY,
            "seed": args.seed, "inplane": args.inplane, "slice_mm": list(args.slice_mm),
            "cases": cases}


def _write_manifest(folder: Path, args: argparse.Namespace, new: Dict[str, dict]) -> None:
    """Merge this run's cases into ``synth.json`` (atomically)."""
    path = folder / "synth.json"
    cases: Dict[str, dict] = {}
    if path.is_file():
        try:
            cases = dict(json.loads(path.read_text(encoding="utf-8")).get("cases", {}))
        except (ValueError, AttributeError):
            cases = {}
    cases.update(new)
    tmp = folder / ".partial-synth.json"
    tmp.write_text(json.dumps(_manifest(args, cases), indent=1), encoding="utf-8")
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    if args.n < 1 or args.first < 0:
        raise InputError("-n must be at least 1 and --first not negative.", "Check the options.")
    if args.inplane < 16:
        raise InputError(f"--inplane {args.inplane} is too small.", "Use 16 or more (512 is clinical).")
    t0 = time.perf_counter()
    atlas = load_atlas(str(args.atlas_dir))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"atlas loaded in {time.perf_counter() - t0:.1f} s; making {args.n} cases in {args.out}", flush=True)
    done: Dict[str, dict] = {}
    try:
        for k in range(args.n):
            index = args.first + k
            t = time.perf_counter()
            case = synth_case(atlas, args.seed, index, args.inplane, tuple(args.slice_mm))
            name = str(index + 1)
            dataset.write_case(args.out, case.ct, case.labels, transform=case.transform, name=name,
                               overwrite=args.overwrite)
            done[name] = {"index": index, **asdict(case.params)}
            size = "x".join(str(n) for n in case.ct.GetSize())
            print(f"[{k + 1}/{args.n}] case {name}: {size} at {case.params.spacing_mm:.2f} x "
                  f"{case.params.slice_mm:.2f} mm, tilt "
                  f"{', '.join(f'{a:+.1f}' for a in case.params.angles_deg)} deg, "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
    finally:
        if done:
            _write_manifest(args.out, args, done)
    print(f"done: {args.n} cases in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
