"""``python -m training synth``: labelled synthetic head CTs from the public MNI atlases.

Sources (read from ``--atlas-dir``, never copied into the project; the folder's layout,
the files' origin and licences: docs/DESIGN.md section 5):

- ``Clinical-scct/scct.nii.gz``: Rorden's mean head CT with skull (BSD-2), 2 mm MNI, in
  Cormack units; converted to HU with :func:`cormack_to_hu` (formula in docs/DESIGN.md section 5.2).
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
   ``sitk.Resample(ct, ct, R, sitk.sitkLinear, -1024)`` lies on them (docs/DESIGN.md s. 2).

Profiles (``--profile``): the steps above are **v1**, the first generator, kept draw for
draw (:func:`draw_params`, one generator per case) so v1 datasets are remade
bit-identically (its labels are not clipped). **v2** (the default) draws each group of
parameters from its own generator seeded from ``(seed, i, group)`` (:func:`case_streams`:
pose, anatomy, scanner, pathology, texture), so a change to one group leaves the
others' draws alone. Every range is a field of :class:`Profile` (``PROFILES["v2"]``,
written to synth.json's top level as ``ranges``) and every draw is recorded per case
(:class:`CaseParams` with :class:`FovParams`, :class:`AnatomyParams`,
:class:`ScannerParams` and a list of :class:`Lesion`). v2 draws:

- Pose: pitch (x angle, about the left-right axis) in +-30 degrees, roll and yaw (y, z)
  in +-15 (``--max-pitch``, ``--max-roll-yaw``; v1 honours them too).
- Field of view, in the scan frame like a scanner's scan range (:func:`plan_grid_v2`):
  the first slice at the foramen magnum (``base``, 40 %), as low as the template goes,
  with face and upper neck (``neck``, 30 %; the template ends at MNI z -72, so the
  lowest slices of a tilted head show its oblique cut), or at the orbit roofs +-5 mm
  (``orbits``, 30 %; face cut off); the top of the head cut by 0-30 mm
  (``--max-vertex-cut``); the head off-centre in-plane as in v1 (``--fov`` forces a start).
- Slices 0.6-6 mm thick; in 35 % of cases overlapping reconstructions (spacing 0.5-0.9
  x the thickness, at least 0.5 mm); each slice is the exact mean of thin planes over
  its thickness (:func:`thickness_average`).
- Anatomy: scaling 0.88-1.12 per axis; a left/right-odd smooth displacement of 0-3 mm
  (asymmetric heads); in 20 % of cases a midline shift of 2-8 mm (a Gaussian push
  centred on the midline at the foramen of Monro); atrophy 0-1: cortex next to CSF
  turned to CSF (widened sulci, up to 40 %) and the ventricles enlarged by a radial
  displacement (0-25 % at atrophy 1); a sulcal pattern in the cortex (zero sheets of a
  random field 10-16 mm in wavelength hold 20-60 % CSF), so the model does not learn the
  smooth template; skull thickness (bone threshold of the template shifted by -60..+150
  HU, plus a smooth regional variation of 0-80 HU standard deviation); in 10 % of cases
  a craniotomy (a bone flap of 10-22 degrees half-angle replaced by soft tissue, or by
  air in 30 % of those). The deformations are part of ``D``, so the labels move with
  the tissue.
- Scanner: grey matter 33-42 HU and grey/white contrast 3-12 HU; whole-image offset
  +-40 HU and gain 0.9-1.1 on tissue (air stays -1024); smooth (Gaussian 0.3-1.2 mm) or,
  in 40 % of cases, sharp kernels (0.2-0.5 mm blur, then unsharp mask 0.3-1.0 x, 0.7-1.5
  mm); a slow sinusoidal shading of 0-6 HU and beam-hardening-like darkening or
  brightening of soft tissue, -12..+8 HU per 25 % of bone in a 5 mm neighbourhood (up to
  twice that: inner table, most at the skull base);
  noise 2-20 HU (log-uniform), a share of 0-80 % of it filtered in-plane (0.6-1.5 mm
  grain). Noise is added on the ~1 mm work grid before the scan grid is interpolated.
- Lesions, which leave the labels unchanged: infarcts (50 % of cases, 1-2; cortical 8-22
  mm or deep 3-10 mm, in any region, -2 to -15 HU on parenchyma), lacunes (40 %, 1-3,
  deep, CSF density), a haemorrhage (10 %, 5-20 mm, 50-80 HU), calcifications of
  100-400 HU, 1-4 mm (pineal 60 %, both choroid plexus glomera 50 %, both basal ganglia
  10 %). Centres are MNI points carried through ``D^-1`` and ``R``.
- Labels on the brain only: kept where the deformed intracranial prior (grey + white +
  CSF) is above 0.5, where their anatomy ``R u`` lies inside the scanned slices, and where
  the noise- and lesion-free image before gain and offset is within -100..90 HU (so
  partial volume, blur or edge enhancement has not made the voxel part bone); the
  brain edge is rendered complete at the 0.5 prior, so no label lies in bone, scalp or air.

A ``synth.json`` manifest (sources, licences, profile and its ranges, options,
per-case parameters) is written next to the cases; ``training export`` copies it
(cases counted, not listed) into the model card.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

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
# v2 field-of-view landmarks (MNI LPS mm): the orbit roofs (floor of the anterior cranial
# fossa above the eyes, measured on the tissue maps: lowest intracranial z at x = +-30,
# y = 40-50 is -22..-24).
ORBIT_ROOFS_MNI = np.array([[30.0, -45.0, -24.0], [-30.0, -45.0, -24.0]])
ICV_THRESHOLD = 0.5          # grey + white + CSF prior above this is intracranial
# v2 anatomy landmarks (MNI LPS mm) and widths. Lateral ventricles: centroid and spread of
# the CSF prior > 0.6 within |x| < 25, 0 < z < 35 is (0, 9.8, 14.5), sd (12, 20, 7) mm.
VENTRICLES_MNI = np.array([0.0, 10.0, 15.0])
VENTRICLE_SIGMA_MM = np.array([14.0, 26.0, 12.0])
MIDLINE_SHIFT_MNI = np.array([0.0, 0.0, 12.0])     # about the foramen of Monro
MIDLINE_SHIFT_SIGMA_MM = np.array([18.0, 40.0, 30.0])
CALCIFICATION_SITES_MNI = {
    "pineal": [("pineal", (0.0, 28.0, 4.0))],
    "choroid plexus": [("choroid plexus left", (28.0, 42.0, 14.0)),
                       ("choroid plexus right", (-28.0, 42.0, 14.0))],
    "basal ganglia": [("basal ganglia left", (19.0, 4.0, 0.0)), ("basal ganglia right", (-19.0, 4.0, 0.0))],
}
V2_FIELD_SPACING_MM = 4.0    # the v2 displacement has finer terms (ventricles, midline)
LABEL_GUARD_HU = (-100.0, 90.0)   # labels dropped where the noise-free image leaves this
STREAMS = ("pose", "anatomy", "scanner", "pathology", "texture")


Range = Optional[Tuple[float, float]]


@dataclass(frozen=True)
class Profile:
    """The ranges one synthesis profile draws from (written to synth.json's top level).

    ``v1`` is the first generator: its cases are drawn by :func:`draw_params` from one
    generator in a fixed order, so they can be remade bit-identically; of this class it
    honours the pose limits and ``slice_mm`` only, and its other fields are None (not
    drawn). ``v2`` draws every group of parameters from its own generator
    (:data:`STREAMS`), so adding a draw to one group leaves the other groups of a case
    unchanged. Probabilities are per case; HU changes apply to tissue (not air).
    """

    name: str
    max_pitch_deg: float             # rotation about the left-right axis (x angle)
    max_roll_yaw_deg: float          # rotations about the y and z axes
    slice_mm: Tuple[float, float]    # slice thickness
    # -- pose and field of view (stream "pose")
    fov_modes: Tuple[Tuple[str, float], ...] = (("base", 1.0),)   # (mode, probability)
    max_vertex_cut_mm: float = 0.0
    overlap_probability: float = 0.0           # slice spacing < thickness
    overlap_spacing: Tuple[float, float] = (1.0, 1.0)   # spacing / thickness when overlapping
    min_slice_spacing_mm: float = 0.5
    inplane_spacing_512: Tuple[float, float] = INPLANE_SPACING_512
    # -- anatomy (stream "anatomy")
    scale: Tuple[float, float] = SCALE_RANGE   # v1: one global factor x 0.97-1.03 per axis
    clip_labels: bool = False                  # labels on the scanned intracranial space only
    asymmetry_mm: Range = None                 # left/right-odd smooth displacement
    midline_shift_probability: Optional[float] = None
    midline_shift_mm: Range = None
    atrophy: Range = None                      # 0: none, 1: strong (sulci and ventricles)
    ventricle_gain: Range = None               # ventricle enlargement at atrophy 1
    folding_depth: Range = None                # CSF share of the sulcal pattern in grey matter
    folding_wavelength_mm: Range = None
    skull_shift_hu: Range = None               # template bone threshold shift: + thicker skull
    skull_variation_hu: Range = None           # smooth regional variation of that shift
    craniotomy_probability: Optional[float] = None
    # -- scanner and reconstruction (stream "scanner")
    grey_hu: Tuple[float, float] = (33.0, 42.0)
    contrast_hu: Range = None                  # grey - white (v1: white 22-30, <= grey - 4)
    offset_hu: Range = None                    # whole-image offset of tissue
    gain: Range = None                         # whole-image gain of tissue
    noise_hu: Range = None                     # v1: 2.5-5 x sqrt(5 mm / thickness)
    noise_correlation: Range = None            # share of in-plane filtered (textured) noise
    noise_grain_mm: Range = None               # filter width of that share
    sharp_probability: Optional[float] = None  # sharp kernel (edge enhancement), else smooth
    smooth_blur_mm: Tuple[float, float] = (0.2, 0.8)
    sharp_blur_mm: Range = None
    sharpen: Range = None                      # unsharp-mask amount of a sharp kernel
    sharpen_mm: Range = None                   # unsharp-mask width
    shading_hu: Range = None                   # low-frequency shading amplitude
    beam_hardening_hu: Range = None            # near bone: - darkening, + brightening
    # -- pathology (stream "pathology"); labels unchanged
    infarct_probability: Optional[float] = None
    infarct_hu: Range = None                   # change of the parenchyma, negative
    lacune_probability: Optional[float] = None
    haemorrhage_probability: Optional[float] = None
    haemorrhage_hu: Range = None
    calcification_probability: Optional[Dict[str, float]] = None   # per site
    calcification_hu: Range = None


V2_RANGES: Dict[str, Any] = dict(
    fov_modes=(("base", 0.4), ("neck", 0.3), ("orbits", 0.3)), max_vertex_cut_mm=30.0,
    overlap_probability=0.35, overlap_spacing=(0.5, 0.9), scale=(0.88, 1.12), clip_labels=True,
    asymmetry_mm=(0.0, 3.0), midline_shift_probability=0.2, midline_shift_mm=(2.0, 8.0),
    atrophy=(0.0, 1.0), ventricle_gain=(0.0, 0.25), folding_depth=(0.2, 0.6),
    folding_wavelength_mm=(10.0, 16.0), skull_shift_hu=(-60.0, 150.0), skull_variation_hu=(0.0, 80.0),
    craniotomy_probability=0.1,
    contrast_hu=(3.0, 12.0), offset_hu=(-40.0, 40.0), gain=(0.9, 1.1), noise_hu=(2.0, 20.0),
    noise_correlation=(0.0, 0.8), noise_grain_mm=(0.6, 1.5), sharp_probability=0.4,
    smooth_blur_mm=(0.3, 1.2), sharp_blur_mm=(0.2, 0.5), sharpen=(0.3, 1.0), sharpen_mm=(0.7, 1.5),
    shading_hu=(0.0, 6.0), beam_hardening_hu=(-12.0, 8.0),
    infarct_probability=0.5, infarct_hu=(-15.0, -2.0), lacune_probability=0.4,
    haemorrhage_probability=0.1, haemorrhage_hu=(50.0, 80.0),
    calcification_probability={"pineal": 0.6, "choroid plexus": 0.5, "basal ganglia": 0.1},
    calcification_hu=(100.0, 400.0),
)
FOV_MODES = ("base", "neck", "orbits")
PROFILES: Dict[str, Profile] = {
    "v1": Profile("v1", MAX_TILT_DEG, MAX_TILT_DEG, (1.0, 5.0)),
    "v2": Profile("v2", 30.0, 15.0, (0.6, 6.0), **V2_RANGES),
}
#: v2 without noise and pathology: what the label checks render (tests, QA).
QUIET: Dict[str, Any] = dict(noise_hu=(0.0, 0.0), infarct_probability=0.0, lacune_probability=0.0,
                             haemorrhage_probability=0.0,
                             calcification_probability={"pineal": 0.0, "choroid plexus": 0.0,
                                                        "basal ganglia": 0.0})


def get_profile(name: str, **overrides: Any) -> Profile:
    """A named profile with some ranges replaced (None values are ignored)."""
    if name not in PROFILES:
        raise InputError(f"unknown synthesis profile {name!r}.", f"Use one of {', '.join(PROFILES)}.")
    return replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})


def cormack_to_hu(c: np.ndarray) -> np.ndarray:
    """Cormack units of the Clinical toolbox -> HU (its ``clinical_c2h``; docs/DESIGN.md section 5.2)."""
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
    head_points_all: np.ndarray   # (n, 3) head points including those below the skull base
    icv: sitk.Image               # grey + white + CSF prior on the template grid (float32)
    label_point_ids: np.ndarray   # (n,) label id of each of label_points


ATLAS_LAYOUT_HINT = ("Lay out --atlas-dir as docs/DESIGN.md section 5.2 describes: Clinical-scct/ "
                     "from github.com/neurolabusc/Clinical (BSD-2), aspects-on-cta/ from "
                     "github.com/AnotherMak/aspects-on-cta (MIT).")


def atlas_files() -> List[Tuple[str, str]]:
    """Every file ``synth`` reads, relative to ``--atlas-dir``, with what it is."""
    files = [(TEMPLATE, "CT template")]
    files += [(p, f"{k} matter map" if k != "csf" else "CSF map") for k, p in TISSUES.items()]
    for code, file_code in FILE_CODES.items():
        for side, tag in (("left", "L"), ("right", "R")):
            files.append((MASK_PATTERN.format(code=file_code, side=tag), f"{code} {side} mask"))
    return files


def _missing_message(root: Path, rel: str, what: str, missing: int = 1) -> InputError:
    """One error naming the missing file; the hint says how to get it (an uncompressed
    copy as the source repository stores it only needs gzip)."""
    path = root / rel
    plain = path.with_suffix("") if path.suffix == ".gz" else None
    hint = ATLAS_LAYOUT_HINT
    if plain is not None and plain.is_file():
        hint = (f"{plain.name} is there uncompressed: gzip -9 -n -c {plain} > {path} "
                "(docs/DESIGN.md section 5.2).")
    more = f"; {missing - 1} more of the {len(atlas_files())} atlas files are missing too" if missing > 1 else ""
    return InputError(f"atlas file missing: {path} ({what}){more}.", hint)


def check_atlas_dir(atlas_dir: Path) -> None:
    """Refuse an ``--atlas-dir`` without the files synth reads, naming the first missing
    one, before seconds are spent reading the others."""
    root = Path(atlas_dir)
    if not root.is_dir():
        raise InputError(f"atlas folder not found: {root}.", ATLAS_LAYOUT_HINT)
    missing = [(rel, what) for rel, what in atlas_files() if not (root / rel).is_file()]
    if missing:
        raise _missing_message(root, *missing[0], missing=len(missing))


def _read(path: Path, what: str) -> sitk.Image:
    if not path.is_file():
        raise _missing_message(path.parent.parent, str(Path(path.parent.name) / path.name), what)
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
    check_atlas_dir(root)
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
    all_pts = head_pts[:: max(1, len(head_pts) // 20000)]
    head_pts = head_pts[head_pts[:, 2] >= SKULL_BASE_MNI_Z]
    lab_arr = sitk.GetArrayViewFromImage(labels) > 0
    if not lab_arr.any():
        raise InputError("the ASPECTS masks are all empty.", "Restore the original files.")
    return Atlas(template_hu=hu, grey=grey, white=white, csf=csf, nuclei=nuclei,
                 template_ref=template, labels=labels, centre=centre, head_box=corners,
                 head_points=head_pts[:: max(1, len(head_pts) // 20000)],
                 brain_points=_physical_points(template, (grey + white + csf) > 0.5, 1)[::4],
                 label_points=_physical_points(labels, lab_arr, 2), head_points_all=all_pts,
                 icv=_like(grey + white + csf, template),
                 label_point_ids=sitk.GetArrayFromImage(labels)[::2, ::2, ::2][lab_arr[::2, ::2, ::2]])


def _like(array: np.ndarray, ref: sitk.Image) -> sitk.Image:
    """``array`` (z, y, x) as a float32 image on the grid of ``ref``."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.CopyInformation(ref)
    return img


# ----------------------------------------------------------------------------- parameters

@dataclass
class FovParams:
    """v2 field of view of one case: slices are axial planes of the scan (tilted head).

    ``mode``: ``base`` starts at the lowest head point above the foramen magnum plane (as
    v1), ``neck`` at the lowest head point of the template (face, chin and upper neck as
    far as the template reaches, MNI z -72), ``orbits`` at the orbit roofs
    (:data:`ORBIT_ROOFS_MNI`) plus ``orbit_jitter_mm``, so the face is cut off. The top
    is the highest head point minus ``vertex_cut_mm``. ``z_first_mm``/``z_last_mm``
    (scan LPS z of the first and last slice centres) are filled in by the planner.
    """

    mode: str
    orbit_jitter_mm: float
    vertex_cut_mm: float
    z_first_mm: Optional[float] = None
    z_last_mm: Optional[float] = None


@dataclass
class AnatomyParams:
    """v2 anatomy of one case (stream ``anatomy``); the deformations are part of ``D``,
    so the labels follow them.

    - ``asymmetry_modes``: per mode component, amplitude (mm), wave vector (3), phase; each
      multiplied by ``tanh(x / 30 mm)`` (x: left-right offset from the head centre), so the
      two hemispheres move in opposite directions (a skewed, asymmetric head).
    - ``midline_shift_mm``: signed (+ = towards LPS +x, the patient's left), a Gaussian
      bump of displacement centred on the midline at the foramen of Monro level.
    - ``atrophy`` 0-1: grey matter next to CSF turned to CSF (widened sulci) and the
      ventricles enlarged by a radial displacement of strength ``ventricle_gain``.
    - ``folding_*``: a sulcal CSF pattern in the grey matter, the zero sheets of a
      band-passed random field (``folding_seed``) of that wavelength.
    - ``skull_*``: shift of the template's bone threshold (+ = thicker skull) and the
      amplitude of its smooth regional variation.
    - ``craniotomy``: None, or a bone flap (direction from the head centre, half-angle)
      replaced by soft tissue or air.
    """

    asymmetry_mm: float
    asymmetry_modes: List[List[float]]
    midline_shift_mm: float
    atrophy: float
    ventricle_gain: float
    folding_depth: float
    folding_wavelength_mm: float
    folding_seed: int
    skull_shift_hu: float
    skull_variation_hu: float
    skull_seed: int
    craniotomy: Optional[Dict[str, Any]] = None


@dataclass
class ScannerParams:
    """v2 scanner and reconstruction of one case (stream ``scanner``).

    Tissue HU ``h`` becomes ``h + w(h) ((gain - 1) h + offset_hu)`` with ``w`` 0 in air
    and 1 from -700 HU up, so air stays -1024. ``kernel`` is ``smooth`` (Gaussian
    ``blur_mm``) or ``sharp`` (a light blur then an unsharp mask ``sharpen`` x (image -
    Gaussian(``sharpen_mm``))). ``noise_hu`` (CaseParams) is the standard deviation of the
    noise, a share ``noise_correlation`` of it filtered in-plane (``noise_grain_mm``).
    ``shading_*``: one low-frequency sinusoid on soft tissue; ``beam_hardening_hu``: change
    of soft tissue next to bone, proportional to the bone nearby (the skull base most).
    """

    offset_hu: float
    gain: float
    contrast_hu: float
    kernel: str
    sharpen: float
    sharpen_mm: float
    noise_correlation: float
    noise_grain_mm: float
    shading_hu: float
    shading_wave: List[float]        # wave vector (3, rad/mm) and phase
    beam_hardening_hu: float


@dataclass
class Lesion:
    """One v2 lesion (stream ``pathology``); region labels are not changed by it.

    ``centre_mni`` (LPS mm) is carried through the case's deformation to the scan;
    ``radii_mm`` are the semi-axes of an irregular ellipsoid (``irregularity``: boundary
    roughness, shape from ``seed``). ``hu``: for an infarct the change of the parenchyma
    (negative), else the density the lesion tends to (lacune: the case's CSF).
    """

    kind: str              # infarct | lacune | haemorrhage | calcification
    site: str              # region (e.g. "M2 left"), or pineal / choroid plexus / basal ganglia
    centre_mni: Tuple[float, float, float]
    radii_mm: Tuple[float, float, float]
    hu: float
    irregularity: float
    seed: int


@dataclass
class CaseParams:
    """Everything drawn for one case (recorded in synth.json).

    The fields up to ``offset_frac`` are v1's, in v1's drawing order; v2 keeps their
    meaning (``slice_mm`` is the slice thickness, ``angles_deg`` (pitch, roll, yaw)) and
    adds the fields after them, which stay None in v1 cases.
    """

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
    profile: str = "v1"
    slice_spacing_mm: Optional[float] = None   # v2: distance of slice centres (<= slice_mm)
    fov: Optional[FovParams] = None
    anatomy: Optional[AnatomyParams] = None
    scanner: Optional[ScannerParams] = None
    lesions: Optional[List[Lesion]] = None


def params_json(p: CaseParams) -> Dict[str, Any]:
    """The case's entry in synth.json: every drawn value, fields unused by its profile left out."""
    return {k: v for k, v in asdict(p).items() if v is not None}


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


def draw_params(rng: np.random.Generator, inplane: int, slice_range: Tuple[float, float],
                max_angles_deg: Tuple[float, float, float] = (MAX_TILT_DEG,) * 3) -> CaseParams:
    """Draw one v1 case's parameters (with the render's noise, the only randomness of v1).

    Kept draw for draw as the first generator made them, so v1 datasets can be remade
    bit-identically; ``max_angles_deg`` only changes the bounds of the three angle draws.
    """
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    s = u(*SCALE_RANGE)
    grey = u(33.0, 42.0)
    slice_mm = round(u(*slice_range), 2)
    scale = tuple(s * u(0.97, 1.03) for _ in range(3))
    shift = tuple(u(-15.0, 15.0) for _ in range(3))
    warp = u(0.0, 4.0)
    return CaseParams(
        scale=scale, shift_mm=shift, warp_mm=warp, warp_modes=_warp_modes(rng, warp),  # type: ignore[arg-type]
        angles_deg=tuple(u(-a, a) for a in max_angles_deg),  # type: ignore[arg-type]
        slice_mm=slice_mm, spacing_mm=u(*INPLANE_SPACING_512) * 512.0 / inplane,
        grey_hu=grey, white_hu=min(u(22.0, 30.0), grey - 4.0), csf_hu=u(0.0, 12.0),
        bone_hu=u(900.0, 1600.0), scalp_hu=u(20.0, 50.0), nuclei_gain=u(0.4, 0.9),
        noise_hu=u(2.5, 5.0) * math.sqrt(5.0 / max(slice_mm, 0.5)), blur_mm=u(0.2, 0.8),
        offset_frac=(u(-0.8, 0.8), u(-0.8, 0.8)))


def case_streams(seed: int, index: int) -> Dict[str, np.random.Generator]:
    """v2: one generator per parameter group (:data:`STREAMS`), all from ``(seed, index)``."""
    return {name: np.random.default_rng([int(seed), int(index), k + 1]) for k, name in enumerate(STREAMS)}


def _uniform(rng: np.random.Generator):
    return lambda lo, hi: float(rng.uniform(lo, hi))


def draw_pose_v2(rng: np.random.Generator, inplane: int, prof: Profile) -> Dict[str, Any]:
    """v2 pose, field of view and scan geometry (stream ``pose``)."""
    u = _uniform(rng)
    angles = (u(-prof.max_pitch_deg, prof.max_pitch_deg), u(-prof.max_roll_yaw_deg, prof.max_roll_yaw_deg),
              u(-prof.max_roll_yaw_deg, prof.max_roll_yaw_deg))
    modes = [m for m, _ in prof.fov_modes]
    weights = np.array([w for _, w in prof.fov_modes], dtype=np.float64)
    mode = modes[int(rng.choice(len(modes), p=weights / weights.sum()))]
    fov = FovParams(mode=mode, orbit_jitter_mm=u(-5.0, 5.0), vertex_cut_mm=u(0.0, prof.max_vertex_cut_mm))
    thickness = round(u(*prof.slice_mm), 2)
    overlap = bool(rng.random() < prof.overlap_probability)
    ratio = u(*prof.overlap_spacing)
    spacing_z = thickness
    if overlap:
        spacing_z = min(thickness, max(prof.min_slice_spacing_mm, round(thickness * ratio, 2)))
    return dict(angles_deg=angles, fov=fov, slice_mm=thickness, slice_spacing_mm=spacing_z,
                spacing_mm=u(*prof.inplane_spacing_512) * 512.0 / inplane,
                offset_frac=(u(-0.8, 0.8), u(-0.8, 0.8)))


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Uniform in log between ``lo`` and ``hi`` (0 if ``hi`` is 0): as many cases at 2-6
    as at 6-20 HU of noise."""
    if hi <= 0:
        return 0.0 * float(rng.uniform())
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def draw_anatomy_v2(rng: np.random.Generator, prof: Profile) -> AnatomyParams:
    """v2 anatomy beyond the v1 deformation (stream ``anatomy``, after the v1-like draws)."""
    u = _uniform(rng)
    asym = u(*prof.asymmetry_mm)
    modes = [[comp, asym * u(-1.0, 1.0), *(2 * math.pi / u(100.0, 200.0) * _unit(rng)).tolist(),
              u(0.0, 2 * math.pi)] for comp in range(3)]
    shift = u(*prof.midline_shift_mm) * (1.0 if rng.random() < 0.5 else -1.0)
    if rng.random() >= prof.midline_shift_probability:
        shift = 0.0
    atrophy = u(*prof.atrophy)
    gain = atrophy * u(*prof.ventricle_gain)
    fold = (u(*prof.folding_depth), u(*prof.folding_wavelength_mm), int(rng.integers(2 ** 31)))
    skull = (u(*prof.skull_shift_hu), u(*prof.skull_variation_hu), int(rng.integers(2 ** 31)))
    azimuth, elevation = u(0.0, 2 * math.pi), math.radians(u(10.0, 70.0))
    flap = {"direction": [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                          math.sin(elevation)],
            "half_angle_deg": u(10.0, 22.0), "fill": "air" if rng.random() < 0.3 else "soft tissue"}
    return AnatomyParams(asymmetry_mm=asym, asymmetry_modes=modes, midline_shift_mm=shift,
                         atrophy=atrophy, ventricle_gain=gain, folding_depth=fold[0],
                         folding_wavelength_mm=fold[1], folding_seed=fold[2], skull_shift_hu=skull[0],
                         skull_variation_hu=skull[1], skull_seed=skull[2],
                         craniotomy=flap if rng.random() < prof.craniotomy_probability else None)


def draw_scanner_v2(rng: np.random.Generator, prof: Profile) -> Dict[str, Any]:
    """v2 densities, scanner and reconstruction (stream ``scanner``): CaseParams fields."""
    u = _uniform(rng)
    grey, contrast = u(*prof.grey_hu), u(*prof.contrast_hu)
    base = dict(grey_hu=grey, white_hu=grey - contrast, csf_hu=u(0.0, 12.0), bone_hu=u(900.0, 1600.0),
                scalp_hu=u(20.0, 50.0), nuclei_gain=u(0.4, 0.9), noise_hu=_log_uniform(rng, *prof.noise_hu))
    sharp = bool(rng.random() < prof.sharp_probability)
    smooth_blur, sharp_blur = u(*prof.smooth_blur_mm), u(*prof.sharp_blur_mm)
    sc = ScannerParams(
        offset_hu=u(*prof.offset_hu), gain=u(*prof.gain), contrast_hu=contrast,
        kernel="sharp" if sharp else "smooth", sharpen=u(*prof.sharpen) if sharp else 0.0,
        sharpen_mm=u(*prof.sharpen_mm), noise_correlation=u(*prof.noise_correlation),
        noise_grain_mm=u(*prof.noise_grain_mm), shading_hu=u(*prof.shading_hu),
        shading_wave=[*(2 * math.pi / u(120.0, 300.0) * _unit(rng)).tolist(), u(0.0, 2 * math.pi)],
        beam_hardening_hu=u(*prof.beam_hardening_hu))
    return dict(base, blur_mm=sharp_blur if sharp else smooth_blur, scanner=sc)


_DEEP = {"C", "L", "IC"}


def _site(atlas: Atlas, rng: np.random.Generator, deep: Optional[bool]) -> Tuple[str, np.ndarray]:
    """A random labelled point (MNI LPS) and its region name; ``deep``: C, L, IC only."""
    ids = atlas.label_point_ids
    codes = {r.label: (r.code, r.side) for r in (regions.region(c, sd) for c in PRIORITY
                                                 for sd in ("left", "right"))}
    pool = np.arange(len(ids)) if deep is None else np.flatnonzero(
        np.isin(ids, [lab for lab, (c, _) in codes.items() if (c in _DEEP) == deep]))
    k = int(pool[int(rng.integers(len(pool)))])
    code, side = codes[int(ids[k])]
    return f"{code} {side}", atlas.label_points[k]


def _lesion(rng: np.random.Generator, kind: str, site: str, centre, radius: Tuple[float, float],
            hu: float, irregularity: Tuple[float, float]) -> Lesion:
    r = float(rng.uniform(*radius))
    return Lesion(kind=kind, site=site, centre_mni=tuple(float(c) for c in centre),  # type: ignore[arg-type]
                  radii_mm=tuple(r * float(rng.uniform(0.6, 1.0)) for _ in range(3)),  # type: ignore[arg-type]
                  hu=float(hu), irregularity=float(rng.uniform(*irregularity)),
                  seed=int(rng.integers(2 ** 31)))


def draw_lesions_v2(rng: np.random.Generator, atlas: Atlas, prof: Profile, csf_hu: float) -> List[Lesion]:
    """v2 pathology (stream ``pathology``): infarcts (cortical or deep, any region),
    lacunes (deep), a haemorrhage, calcifications at their usual sites."""
    out: List[Lesion] = []
    if rng.random() < prof.infarct_probability:
        for _ in range(1 + int(rng.random() < 0.3)):
            deep = bool(rng.random() < 0.35)
            site, c = _site(atlas, rng, deep)
            out.append(_lesion(rng, "infarct", site, c, (3.0, 10.0) if deep else (8.0, 22.0),
                               rng.uniform(*prof.infarct_hu), (0.1, 0.35)))
    if rng.random() < prof.lacune_probability:
        for _ in range(int(rng.integers(1, 4))):
            site, c = _site(atlas, rng, True)
            out.append(_lesion(rng, "lacune", site, c, (1.5, 6.0), csf_hu, (0.0, 0.15)))
    if rng.random() < prof.haemorrhage_probability:
        site, c = _site(atlas, rng, True if rng.random() < 0.6 else None)
        out.append(_lesion(rng, "haemorrhage", site, c, (5.0, 20.0), rng.uniform(*prof.haemorrhage_hu),
                           (0.05, 0.3)))
    for group, prob in prof.calcification_probability.items():
        if rng.random() < prob:
            for name, centre in CALCIFICATION_SITES_MNI[group]:
                c = np.array(centre) + rng.uniform(-2.0, 2.0, 3)
                out.append(_lesion(rng, "calcification", name, c, (1.0, 4.0),
                                   rng.uniform(*prof.calcification_hu), (0.0, 0.2)))
    return out


def draw_params_v2(seed: int, index: int, inplane: int, prof: Profile,
                   atlas: Optional[Atlas] = None) -> CaseParams:
    """Draw one v2 case's parameters, each group from its own stream (lesions need the
    atlas, which gives the regions they are placed in; without it none are drawn)."""
    streams = case_streams(seed, index)
    pose = draw_pose_v2(streams["pose"], inplane, prof)
    u = _uniform(streams["anatomy"])
    scale = tuple(u(*prof.scale) for _ in range(3))
    shift = tuple(u(-15.0, 15.0) for _ in range(3))
    warp = u(0.0, 4.0)
    modes = _warp_modes(streams["anatomy"], warp)
    anatomy = draw_anatomy_v2(streams["anatomy"], prof)
    scanner = draw_scanner_v2(streams["scanner"], prof)
    p = CaseParams(scale=scale, shift_mm=shift, warp_mm=warp, warp_modes=modes,  # type: ignore[arg-type]
                   profile=prof.name, anatomy=anatomy, **scanner, **pose)
    if atlas is not None:
        p.lesions = draw_lesions_v2(streams["pathology"], atlas, prof, p.csf_hu)
    return p


# ----------------------------------------------------------------------------- geometry

class Warp:
    """``D``: upright point -> MNI point; its affine part is inverted exactly for planning."""

    def __init__(self, atlas: Atlas, p: CaseParams) -> None:
        self.c_mni = atlas.centre
        self.c_up = atlas.centre + np.array(p.shift_mm)
        self.scale = np.array(p.scale)
        self.modes = np.array(p.warp_modes, dtype=np.float64).reshape(-1, 6)
        self.anatomy = p.anatomy

    def approx_to_upright(self, m: np.ndarray) -> np.ndarray:
        """MNI -> upright ignoring the few-mm smooth part (for grid planning only)."""
        return self.c_up + (m - self.c_mni) * self.scale

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """MNI points of upright points (n, 3)."""
        rel = u - self.c_up
        m = self.c_mni + rel / self.scale
        for comp, amp, kx, ky, kz, phase in self.modes:
            m[:, int(comp)] += amp * np.sin(rel @ np.array([kx, ky, kz]) + phase)
        if self.anatomy is not None:
            self._v2_terms(rel, m)
        return m

    def _v2_terms(self, rel: np.ndarray, m: np.ndarray) -> None:
        """v2 displacements (in place): left/right asymmetry, midline shift and
        ventricle enlargement, the last two anchored to MNI landmarks. Content at ``u``
        comes from ``m``, so subtracting a displacement moves the content by it."""
        a = self.anatomy
        assert a is not None
        odd = np.tanh(rel[:, 0] / 30.0)
        for comp, amp, kx, ky, kz, phase in a.asymmetry_modes:
            m[:, int(comp)] += amp * odd * np.cos(rel @ np.array([kx, ky, kz]) + phase)
        base = self.c_mni + rel / self.scale
        if a.midline_shift_mm:
            g = np.exp(-0.5 * (((base - MIDLINE_SHIFT_MNI) / MIDLINE_SHIFT_SIGMA_MM) ** 2).sum(axis=1))
            m[:, 0] -= a.midline_shift_mm * g
        if a.ventricle_gain:
            d = base - VENTRICLES_MNI
            m -= a.ventricle_gain * np.exp(-0.5 * ((d / VENTRICLE_SIGMA_MM) ** 2).sum(axis=1))[:, None] * d

    def inverse(self, m: np.ndarray, iterations: int = 30) -> np.ndarray:
        """Upright points of MNI points (n, 3) by fixed-point iteration (``D`` is close to
        its affine part, whose inverse is exact)."""
        u = self.approx_to_upright(m)
        for _ in range(iterations):
            u = u + (m - self(u)) * self.scale
        return u

    def transform(self, lower: np.ndarray, upper: np.ndarray,
                  spacing: float = FIELD_SPACING_MM) -> sitk.Transform:
        """``D`` as a SimpleITK displacement field over the box [lower, upper] (LPS mm).

        Points outside the box would not move, so the box must hold every point that
        is resampled through ``D``.
        """
        size = np.ceil((upper - lower) / spacing).astype(int) + 1
        axes = [lower[a] + spacing * np.arange(size[a]) for a in range(3)]
        z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        pts = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
        disp = (self(pts) - pts).reshape(tuple(size[::-1]) + (3,))
        field = sitk.GetImageFromArray(disp.astype(np.float64), isVector=True)
        field.SetOrigin(tuple(float(v) for v in lower))
        field.SetSpacing((spacing,) * 3)
        return sitk.DisplacementFieldTransform(field)


@dataclass
class ScanGrid:
    """The scan grid (identity direction) and the ~1 mm work grid it is rendered on."""

    origin: np.ndarray
    spacing: Tuple[float, float, float]
    size: Tuple[int, int, int]
    work_spacing: float            # in-plane spacing of the work grid
    sub: int                       # work slices per slice thickness (partial-volume average)
    thickness: Optional[float] = None   # v2: slice thickness (spacing[2] is the slice spacing)

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

    def work_reference_v2(self) -> sitk.Image:
        """v2: same in-plane extent at ``work_spacing``; thin planes ``thickness / sub``
        apart from the lower edge of the first slice to the upper edge of the last.

        Each plane stands for the slab of its thickness; slices, which may overlap, are
        averaged from the planes by :func:`thickness_average`.
        """
        h, t, s = self.work_spacing, float(self.thickness or self.spacing[2]), self.spacing[2]
        n = [int(math.ceil((self.size[a] - 1) * self.spacing[a] / h)) + 1 for a in range(2)]
        dz = t / self.sub
        planes = int(math.ceil(((self.size[2] - 1) * s + t) / dz - 1e-6))
        ref = sitk.Image(n[0], n[1], planes, sitk.sitkUInt8)
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


def fov_z_range(atlas: Atlas, warp: Warp, to_scan, fov: FovParams) -> Tuple[float, float]:
    """Scan z (LPS mm) of the first and last slice centre of a v2 field of view."""
    head = to_scan(warp.approx_to_upright(atlas.head_points_all))
    top = float(head[:, 2].max()) - fov.vertex_cut_mm
    if fov.mode == "neck":
        bottom = float(head[:, 2].min())
    elif fov.mode == "orbits":
        bottom = float(to_scan(warp.approx_to_upright(ORBIT_ROOFS_MNI))[:, 2].mean()) + fov.orbit_jitter_mm
    else:
        bottom = float(head[atlas.head_points_all[:, 2] >= SKULL_BASE_MNI_Z, 2].min())
    return bottom, max(top, bottom + 20.0)


def plan_grid_v2(atlas: Atlas, warp: Warp, R: sitk.Transform, p: CaseParams, inplane: int) -> ScanGrid:
    """v2 scan grid: slices ``slice_spacing_mm`` apart over the drawn field of view (in the
    scan frame, like a scanner's scan range); in-plane it holds the head of those slices,
    the brain and the upright labels, off-centre by ``offset_frac``."""
    assert p.fov is not None and p.slice_spacing_mm is not None
    m = transforms.matrix_of(R)
    to_scan = lambda pts: pts @ m[:3, :3].T + m[:3, 3]  # noqa: E731
    bottom, top = fov_z_range(atlas, warp, to_scan, p.fov)
    head = to_scan(warp.approx_to_upright(atlas.head_points_all))
    head = head[(head[:, 2] >= bottom) & (head[:, 2] <= top)]
    brain = to_scan(warp.approx_to_upright(atlas.brain_points))
    labels_up = warp.approx_to_upright(atlas.label_points)
    lo = np.minimum(np.vstack([brain[:, :2], labels_up[:, :2]]).min(0) - MARGIN_MM, head[:, :2].min(0) - 4.0)
    hi = np.maximum(np.vstack([brain[:, :2], labels_up[:, :2]]).max(0) + MARGIN_MM, head[:, :2].max(0) + 4.0)
    spacing = max(p.spacing_mm, float((hi - lo).max()) / (inplane - 1))
    fov = spacing * (inplane - 1)
    centre = 0.5 * (lo + hi) + np.array(p.offset_frac) * 0.5 * np.maximum(fov - (hi - lo), 0.0)
    s, t = p.slice_spacing_mm, p.slice_mm
    nz = int(math.ceil((top - bottom) / s - 1e-6)) + 1
    origin = np.array([centre[0] - fov / 2, centre[1] - fov / 2, bottom])
    p.fov.z_first_mm, p.fov.z_last_mm = bottom, bottom + (nz - 1) * s
    work = max(WORK_SPACING_MM, spacing)
    return ScanGrid(origin, (spacing, spacing, s), (inplane, inplane, nz), work,
                    max(1, int(math.ceil(t / max(WORK_SPACING_MM, min(work, 2.0)) - 1e-6))), thickness=t)


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


def _random_field(shape: Sequence[int], sigma: Sequence[float], seed: int) -> np.ndarray:
    """Gaussian-filtered white noise of unit standard deviation (float32)."""
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.standard_normal(tuple(shape), dtype=np.float32), sigma, truncate=3.0)
    return f / max(float(f.std()), 1e-6)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def brain_tissue_v2(atlas: Atlas, p: CaseParams) -> Tuple[np.ndarray, np.ndarray]:
    """(grey, csf) of the case: cortex next to CSF turned to CSF by atrophy (widened
    sulci), and a sulcal pattern in the cortex (folding texture); their sum is kept, so
    the intracranial space and the labels' clip are unchanged."""
    a = p.anatomy
    assert a is not None
    h = float(atlas.template_ref.GetSpacing()[0])
    cortex = atlas.grey * (1.0 - atlas.nuclei)
    near_csf = np.clip(2.0 * ndimage.gaussian_filter(atlas.csf, 1.0), 0.0, 1.0)
    move = 0.4 * a.atrophy * cortex * near_csf
    # zero sheets of a smooth random field are about 4.4 sigma apart
    f = _random_field(atlas.grey.shape, [a.folding_wavelength_mm / 4.4 / h] * 3, a.folding_seed)
    move += a.folding_depth * np.exp(-(f / 0.35) ** 2) * (cortex - move)
    return (atlas.grey - move).astype(np.float32), (atlas.csf + move).astype(np.float32)


def _template_points(atlas: Atlas) -> np.ndarray:
    """LPS coordinates (z, y, x, 3) of the template voxels."""
    ref = atlas.template_ref
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in ref.GetSize()[::-1]], indexing="ij")[::-1], axis=-1)
    direction = np.array(ref.GetDirection()).reshape(3, 3)
    return (idx * np.array(ref.GetSpacing())) @ direction.T + np.array(ref.GetOrigin())


def skull_v2(atlas: Atlas, p: CaseParams, brain_weight: np.ndarray) -> np.ndarray:
    """HU outside the brain: the template's scalp and bone with this case's densities,
    the skull thickened or thinned (shifted bone threshold, varying smoothly) and an
    optional bone flap replaced by soft tissue or air."""
    a = p.anatomy
    assert a is not None
    t = atlas.template_hu
    h = float(atlas.template_ref.GetSpacing()[0])
    shift = a.skull_shift_hu + a.skull_variation_hu * _random_field(t.shape, [15.0 / h] * 3, a.skull_seed)
    soft = np.clip((t + 300.0) / 300.0, 0.0, 1.0)
    bone = np.clip((t - 80.0 + shift) / 340.0, 0.0, 1.0) ** 0.8
    fill = np.full(t.shape, p.scalp_hu, np.float32)
    if a.craniotomy is not None:
        rel = _template_points(atlas) - atlas.centre
        cos = rel @ np.array(a.craniotomy["direction"]) / np.maximum(np.linalg.norm(rel, axis=-1), 1e-6)
        flap = (cos > math.cos(math.radians(a.craniotomy["half_angle_deg"]))) & (brain_weight < 0.5)
        if a.craniotomy["fill"] == "air":
            fill[flap & (bone > 0.3)] = AIR_HU
        bone[flap] = 0.0
    return ((1 - soft) * t + soft * (fill + bone * (p.bone_hu - fill))).astype(np.float32)


def tissue_hu_v2(atlas: Atlas, p: CaseParams) -> sitk.Image:
    """v2 HU volume in MNI space (template grid): atrophy and folding in the brain, the
    skull of :func:`skull_v2` outside, and a brain edge that is complete at the labels'
    clip (intracranial prior 0.5), so no labelled voxel is part bone or scalp."""
    grey, csf = brain_tissue_v2(atlas, p)
    total = grey + atlas.white + csf
    brain = (grey * p.grey_hu + atlas.white * p.white_hu + csf * p.csf_hu) / np.maximum(total, 1e-3)
    brain += p.nuclei_gain * atlas.nuclei * (p.grey_hu - brain)
    s = _smoothstep((total - 0.3) / (ICV_THRESHOLD - 0.3))
    hu = s * brain + (1 - s) * skull_v2(atlas, p, total)
    return _like(hu, atlas.template_ref)


def _field_box(points: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    pts = np.vstack(points)
    return pts.min(0) - 3 * FIELD_SPACING_MM, pts.max(0) + 3 * FIELD_SPACING_MM


def upright_hu(atlas: Atlas, D: sitk.Transform, box: Tuple[np.ndarray, np.ndarray],
               p: CaseParams, grid: ScanGrid, hu: Optional[sitk.Image] = None) -> sitk.Image:
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
    return sitk.Resample(tissue_hu(atlas, p) if hu is None else hu, ref, D, sitk.sitkLinear, AIR_HU,
                         sitk.sitkFloat32)


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
    return slab_to_scan(slab, grid)


def slab_to_scan(slab: np.ndarray, grid: ScanGrid) -> sitk.Image:
    """Slices on the work grid in-plane (float32 HU, changed in place) -> the int16 scan."""
    np.clip(np.rint(slab, out=slab), AIR_HU, 3071, out=slab)
    slab_img = sitk.GetImageFromArray(slab)
    slab_img.SetOrigin(tuple(float(v) for v in grid.origin))
    slab_img.SetSpacing((grid.work_spacing, grid.work_spacing, grid.spacing[2]))
    # Rounded on the way to int16 without a numpy pass over the big grid: shifted to be
    # positive (+1024.5), ITK's cast truncates, which is then rounding to nearest.
    ct = sitk.Resample(slab_img + (0.5 - AIR_HU), grid.reference(), transforms.identity(),
                       sitk.sitkLinear, 0.5, sitk.sitkFloat32)
    return sitk.Cast(ct, sitk.sitkInt16) + int(AIR_HU)


def slab_to_scan_float(slab: np.ndarray, grid: ScanGrid) -> np.ndarray:
    """Slices on the work grid in-plane -> float32 (z, y, x) on the scan grid, by the
    same linear interpolation as :func:`slab_to_scan` (without rounding)."""
    img = sitk.GetImageFromArray(slab)
    img.SetOrigin(tuple(float(v) for v in grid.origin))
    img.SetSpacing((grid.work_spacing, grid.work_spacing, grid.spacing[2]))
    out = sitk.Resample(img, grid.reference(), transforms.identity(), sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def thickness_average(planes: np.ndarray, dz: float, spacing: float, thickness: float,
                      n: int) -> np.ndarray:
    """``n`` slices ``spacing`` apart, each the mean of ``planes`` (``dz`` thick, plane 0
    starting at the lower edge of slice 0) over its ``thickness``: a box slice profile,
    exact for overlapping reconstructions (spacing < thickness) too."""
    out = np.empty((n,) + planes.shape[1:], np.float32)
    for i in range(n):
        a = i * spacing / dz
        b = a + thickness / dz
        j = np.arange(max(0, int(math.floor(a))), min(len(planes), int(math.ceil(b))))
        w = np.clip(np.minimum(j + 1, b) - np.maximum(j, a), 0.0, None)
        out[i] = np.tensordot((w / w.sum()).astype(np.float32), planes[j[0]:j[-1] + 1], axes=1)
    return out


def _slab_axes(grid: ScanGrid, shape: Sequence[int]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan LPS coordinates (x, y, z) of the slab voxels' columns, rows and slices."""
    h = grid.work_spacing
    return (grid.origin[0] + h * np.arange(shape[2]), grid.origin[1] + h * np.arange(shape[1]),
            grid.origin[2] + grid.spacing[2] * np.arange(shape[0]))


def reconstruction_kernel(slab: np.ndarray, p: CaseParams, h: float) -> np.ndarray:
    """In-plane kernel: a Gaussian blur, then for sharp kernels an unsharp mask (edge
    enhancement: overshoot at the skull, a dark rim inside it). Linear, so it commutes
    with adding lesions."""
    sc = p.scanner
    assert sc is not None
    sigma = p.blur_mm / h
    out = ndimage.gaussian_filter(slab, (0.0, sigma, sigma), truncate=3.0) if sigma > 0.25 else slab.copy()
    if sc.kernel == "sharp" and sc.sharpen > 0:
        w = sc.sharpen_mm / h
        out += np.float32(sc.sharpen) * (out - ndimage.gaussian_filter(out, (0.0, w, w), truncate=3.0))
    return out


def _bone_nearby(slab: np.ndarray, grid: ScanGrid, sigma_mm: float = 5.0) -> np.ndarray:
    """Share of bone (> 300 HU) in a ``sigma_mm`` Gaussian neighbourhood, computed on a
    4x coarser in-plane grid (it is smooth) and brought back by linear interpolation."""
    step = 4
    coarse = (slab[:, ::step, ::step] > 300.0).astype(np.float32)
    inplane = sigma_mm / (grid.work_spacing * step)
    sig = (sigma_mm / grid.spacing[2], inplane, inplane)
    coarse = ndimage.gaussian_filter(coarse, sig, truncate=2.0)
    zoom = [n / c for n, c in zip(slab.shape, coarse.shape)]
    return ndimage.zoom(coarse, zoom, order=1, grid_mode=True, mode="nearest")[:, :slab.shape[1], :slab.shape[2]]


def shading(clean: np.ndarray, grid: ScanGrid, p: CaseParams) -> np.ndarray:
    """Additive low-frequency HU on soft tissue: beam-hardening-like darkening or
    brightening in proportion to the bone nearby (inner table, most at the skull base)
    and one slow sinusoidal shading across the image."""
    sc = p.scanner
    assert sc is not None
    soft = np.clip((clean + 50.0) / 30.0, 0.0, 1.0) * np.clip((150.0 - clean) / 50.0, 0.0, 1.0)
    field = np.float32(sc.beam_hardening_hu) * np.minimum(_bone_nearby(clean, grid) / 0.25, 2.0)
    x, y, z = _slab_axes(grid, clean.shape)
    kx, ky, kz, phase = sc.shading_wave
    field += np.float32(sc.shading_hu) * np.sin(
        (kx * x)[None, None, :] + (ky * y)[None, :, None] + (kz * z + phase)[:, None, None]).astype(np.float32)
    return (field * soft).astype(np.float32)


def scanner_map(hu: np.ndarray, p: CaseParams) -> np.ndarray:
    """Whole-image gain and offset on tissue; air (-1024) stays, full effect from -700 HU."""
    sc = p.scanner
    assert sc is not None
    w = np.clip((hu - AIR_HU) / 324.0, 0.0, 1.0)
    return hu + w * (np.float32(sc.gain - 1.0) * hu + np.float32(sc.offset_hu))


def add_noise(slab: np.ndarray, p: CaseParams, h: float, rng: np.random.Generator) -> None:
    """Noise of ``noise_hu`` standard deviation on tissue (in place): white, plus a share
    ``noise_correlation`` filtered in-plane (grainy texture) and renormalised."""
    sc = p.scanner
    assert sc is not None
    noise = rng.standard_normal(slab.shape, dtype=np.float32)
    grain = rng.standard_normal(slab.shape, dtype=np.float32)
    c = sc.noise_correlation
    if c > 0:
        w = sc.noise_grain_mm / h
        grain = ndimage.gaussian_filter(grain, (0.0, w, w), truncate=3.0)
        grain /= max(float(grain.std()), 1e-6)
        noise = np.float32(math.sqrt(1 - c * c)) * noise + np.float32(c) * grain
    slab += np.where(slab > AIR_HU + 24.0, noise * np.float32(p.noise_hu), np.float32(0.0))


def _lesion_weight(les: Lesion, d: np.ndarray) -> np.ndarray:
    """Membership (0-1) of offsets ``d`` (..., 3) from the centre (scan mm) in the lesion:
    an ellipsoid whose radius is modulated by a smooth function of direction, with a
    soft edge about 1 mm wide."""
    rng = np.random.default_rng(les.seed)
    waves, phases = rng.normal(size=(3, 3)), rng.uniform(0, 2 * math.pi, 3)
    r = np.sqrt(((d / np.array(les.radii_mm)) ** 2).sum(axis=-1))
    n = d / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-6)
    bump = np.mean([np.sin(2.0 * (n @ waves[i]) + phases[i]) for i in range(3)], axis=0)
    edge = 1.0 / max(min(les.radii_mm), 0.5)
    return np.clip((1.0 + les.irregularity * bump - r) / edge + 0.5, 0.0, 1.0)


def add_lesions(slab: np.ndarray, grid: ScanGrid, p: CaseParams, warp: "Warp", R: sitk.Transform) -> None:
    """Paint the case's lesions into the slab (in place), averaged over each slice's
    thickness. Each lesion's MNI centre is carried through ``D^-1`` and ``R``. Infarcts
    change parenchyma only (between CSF and grey-matter density); lacunes, haemorrhages
    and calcifications pull soft tissue (CSF included) towards their density."""
    assert p.lesions is not None
    m = transforms.matrix_of(R)
    x, y, z = _slab_axes(grid, slab.shape)
    t = float(grid.thickness or grid.spacing[2])
    subs = (np.arange(max(1, int(math.ceil(t / 0.75)))) + 0.5) / max(1, int(math.ceil(t / 0.75))) - 0.5
    for les in p.lesions:
        q = m[:3, :3] @ warp.inverse(np.array([les.centre_mni]))[0] + m[:3, 3]
        reach = max(les.radii_mm) * (1.0 + les.irregularity) + 1.5
        ix = np.flatnonzero(np.abs(x - q[0]) <= reach)
        iy = np.flatnonzero(np.abs(y - q[1]) <= reach)
        iz = np.flatnonzero(np.abs(z - q[2]) <= reach + t / 2)
        if not (len(ix) and len(iy) and len(iz)):
            continue
        box = (slice(iz[0], iz[-1] + 1), slice(iy[0], iy[-1] + 1), slice(ix[0], ix[-1] + 1))
        d = np.zeros((len(iz), len(subs), len(iy), len(ix), 3), np.float32)
        d[..., 0] = (x[ix] - q[0])[None, None, None, :]
        d[..., 1] = (y[iy] - q[1])[None, None, :, None]
        d[..., 2] = ((z[iz][:, None] + subs[None, :] * t) - q[2])[:, :, None, None]
        w = _lesion_weight(les, d).mean(axis=1).astype(np.float32)
        hu = slab[box]
        if les.kind == "infarct":
            tissue = np.clip((hu - p.csf_hu - 2.0) / 6.0, 0, 1) * np.clip((p.grey_hu + 25.0 - hu) / 10.0, 0, 1)
            hu += w * tissue * np.float32(les.hu)
        else:
            tissue = np.clip((hu + 20.0) / 10.0, 0, 1) * np.clip((p.grey_hu + 25.0 - hu) / 10.0, 0, 1)
            hu += w * tissue * (np.float32(les.hu) - hu)


def render_ct_v2(upright: sitk.Image, R: sitk.Transform, grid: ScanGrid, p: CaseParams,
                 rng: np.random.Generator, warp: Optional["Warp"] = None) -> Tuple[sitk.Image, np.ndarray]:
    """v2 ``ct(q) = upright(R^-1 q)``: thin planes averaged over each (possibly
    overlapping) slice's thickness; lesions; kernel; shading; gain and offset; noise.

    Also returns the noise- and lesion-free image before gain and offset on the scan
    grid (float32, interpolated as the scan is), which the labels are checked against
    (:func:`render_labels`).
    """
    R_inv = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(R)))
    ref = grid.work_reference_v2()
    work = sitk.Resample(upright, ref, R_inv, sitk.sitkLinear, AIR_HU, sitk.sitkFloat32)
    slab = thickness_average(sitk.GetArrayViewFromImage(work), ref.GetSpacing()[2], grid.spacing[2],
                             float(grid.thickness or grid.spacing[2]), grid.size[2])
    del work
    h = grid.work_spacing
    clean = reconstruction_kernel(slab, p, h)
    field = shading(clean, grid, p)
    clean += field
    if p.lesions and warp is not None:
        add_lesions(slab, grid, p, warp, R)
        out = reconstruction_kernel(slab, p, h)
        out += field
    else:
        out = clean.copy()
    del slab, field
    out = scanner_map(out, p)
    add_noise(out, p, h, rng)
    ct = slab_to_scan(out, grid)
    del out
    return ct, slab_to_scan_float(clean, grid)


def _clip_to_scan(full: np.ndarray, grid: ScanGrid, R: sitk.Transform) -> None:
    """Zero the labels (upright layout on the scan grid) whose anatomy ``R u`` lies outside
    the scanned volume (the slices' extent, half a voxel beyond the outer centres, as
    ITK's resampling counts it): what was not scanned is not labelled."""
    m = transforms.matrix_of(R)
    sp, n, o = np.array(grid.spacing), np.array(grid.size), np.array(grid.origin, np.float64)
    lo, hi = o - sp / 2, o + (n - 1) * sp + sp / 2
    x = o[0] + sp[0] * np.arange(n[0])
    y = o[1] + sp[1] * np.arange(n[1])
    for k in np.flatnonzero(full.reshape(full.shape[0], -1).any(axis=1)):
        z = o[2] + sp[2] * k
        inside = np.ones(full.shape[1:], bool)
        for a in range(3):
            q = m[a, 0] * x[None, :] + m[a, 1] * y[:, None] + (m[a, 2] * z + m[a, 3])
            inside &= (q >= lo[a]) & (q <= hi[a])
        full[k][~inside] = 0


def _clip_to_image(full: np.ndarray, grid: ScanGrid, R: sitk.Transform, clean: np.ndarray) -> None:
    """Zero the labels whose anatomy ``R u`` the noise-free image shows as bone or air:
    ``clean`` (on the scan grid, before gain and offset) interpolated there as
    ``sitk.Resample(ct, ct, R)`` interpolates the scan, outside :data:`LABEL_GUARD_HU`.
    A labelled voxel that partial volume, blur or edge enhancement has made part bone
    is not brain on this image."""
    m = transforms.matrix_of(R)
    sp, o = np.array(grid.spacing), np.array(grid.origin, np.float64)
    lo, hi = LABEL_GUARD_HU
    for k in np.flatnonzero(full.reshape(full.shape[0], -1).any(axis=1)):
        jy, ix = np.nonzero(full[k])
        u = np.stack([o[0] + sp[0] * ix, o[1] + sp[1] * jy, np.full(len(ix), o[2] + sp[2] * k)], axis=1)
        q = (u @ m[:3, :3].T + m[:3, 3] - o) / sp
        v = ndimage.map_coordinates(clean, [q[:, 2], q[:, 1], q[:, 0]], order=1, mode="nearest")
        bad = (v > hi) | (v < lo)
        full[k, jy[bad], ix[bad]] = 0


def render_labels(atlas: Atlas, D: sitk.Transform, upright_box: Tuple[np.ndarray, np.ndarray],
                  grid: ScanGrid, R: Optional[sitk.Transform] = None,
                  icv: Optional[sitk.Image] = None, clean: Optional[np.ndarray] = None) -> sitk.Image:
    """Upright labels ``atlas(D(u))`` on the scan grid (uint8).

    Sampled once on a ~1 mm upright grid over the labelled box only, then copied
    (nearest) into the matching part of the scan grid, which is cheaper than sampling
    every scan voxel through the displacement field. v2 passes ``icv`` (labels kept where
    the deformed intracranial prior is above :data:`ICV_THRESHOLD`) and ``R`` (labels
    kept where their anatomy was scanned) and ``clean`` (kept where the noise-free image
    is not bone or air); v1 passes none.
    """
    lo, hi = upright_box
    h = float(np.clip(min(grid.spacing), 1.0, 2.0))
    size = np.ceil((hi - lo) / h).astype(int) + 1
    box_ref = sitk.Image([int(n) for n in size], sitk.sitkUInt8)
    box_ref.SetOrigin(tuple(float(v) for v in lo))
    box_ref.SetSpacing((h, h, h))
    box = sitk.Resample(atlas.labels, box_ref, D, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if icv is not None:
        inside = sitk.Resample(icv, box_ref, D, sitk.sitkLinear, 0.0, sitk.sitkFloat32) > ICV_THRESHOLD
        box = box * sitk.Cast(inside, sitk.sitkUInt8)
    spacing = np.array(grid.spacing)
    i0 = np.clip(np.floor((lo - grid.origin) / spacing).astype(int), 0, np.array(grid.size) - 1)
    i1 = np.clip(np.ceil((hi - grid.origin) / spacing).astype(int), 0, np.array(grid.size) - 1)
    full = np.zeros(tuple(grid.size[::-1]), np.uint8)
    sub_ref = sitk.Image([int(n) for n in i1 - i0 + 1], sitk.sitkUInt8)
    sub_ref.SetOrigin(tuple(float(v) for v in grid.origin + i0 * spacing))
    sub_ref.SetSpacing(grid.spacing)
    sub = sitk.Resample(box, sub_ref, transforms.identity(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    full[i0[2]:i1[2] + 1, i0[1]:i1[1] + 1, i0[0]:i1[0] + 1] = sitk.GetArrayViewFromImage(sub)
    if R is not None:
        _clip_to_scan(full, grid, R)
        if clean is not None:
            _clip_to_image(full, grid, R, clean)
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
               slice_range: Optional[Tuple[float, float]] = None,
               profile: Union[str, Profile] = "v2") -> SynthCase:
    """Make case ``index`` of the run ``seed`` (deterministic) with a profile (name or
    :class:`Profile`); ``slice_range`` replaces the profile's slice thickness range."""
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    if slice_range is not None:
        prof = replace(prof, slice_mm=(float(slice_range[0]), float(slice_range[1])))
    if prof.name == "v1":
        return _synth_case_v1(atlas, seed, index, inplane, prof)
    return _synth_case_v2(atlas, seed, index, inplane, prof)


def _case_geometry(atlas: Atlas, p: CaseParams, inplane: int, plan, field_spacing: float):
    """What both profiles derive from a case's parameters: the warp ``D`` (as a field), the
    pose ``R``, the scan grid (``plan``: the profile's planner; ``p.spacing_mm`` is set to
    the grid's, widened if the head would not fit) and the labelled and head boxes."""
    warp = Warp(atlas, p)
    R = transforms.rotation(p.angles_deg, center=tuple(warp.c_up))
    grid = plan(atlas, warp, R, p, inplane)
    p.spacing_mm = grid.spacing[0]
    labels_up = warp.approx_to_upright(atlas.label_points)
    label_box = (labels_up.min(0) - 8.0, labels_up.max(0) + 8.0)
    head_up = warp.approx_to_upright(atlas.head_box)
    head_box = (head_up.min(0) - 10.0, head_up.max(0) + 10.0)
    D = warp.transform(*_field_box([head_up, np.array(label_box)]), spacing=field_spacing)
    return warp, R, grid, label_box, head_box, D


def _synth_case_v1(atlas: Atlas, seed: int, index: int, inplane: int, prof: Profile) -> SynthCase:
    """The first generator, unchanged: one stream, labels not clipped."""
    rng = case_rng(seed, index)
    p = draw_params(rng, inplane, prof.slice_mm,
                    (prof.max_pitch_deg, prof.max_roll_yaw_deg, prof.max_roll_yaw_deg))
    _, R, grid, label_box, head_box, D = _case_geometry(atlas, p, inplane, plan_grid, FIELD_SPACING_MM)
    ct = render_ct(upright_hu(atlas, D, head_box, p, grid), R, grid, p, rng)
    labels = render_labels(atlas, D, label_box, grid)
    return SynthCase(ct=ct, labels=labels, transform=R, params=p)


def _synth_case_v2(atlas: Atlas, seed: int, index: int, inplane: int, prof: Profile) -> SynthCase:
    """v2: wider pose and field of view, anatomy, scanner and pathology randomisation;
    labels on the scanned brain only."""
    p = draw_params_v2(seed, index, inplane, prof, atlas)
    warp, R, grid, label_box, head_box, D = _case_geometry(atlas, p, inplane, plan_grid_v2,
                                                           V2_FIELD_SPACING_MM)
    upright = upright_hu(atlas, D, head_box, p, grid, tissue_hu_v2(atlas, p))
    ct, clean = render_ct_v2(upright, R, grid, p, case_streams(seed, index)["texture"], warp)
    del upright
    labels = render_labels(atlas, D, label_box, grid, R=R, icv=atlas.icv if prof.clip_labels else None,
                           clean=clean if prof.clip_labels else None)
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


def _angle(text: str) -> float:
    value = _non_negative(text)
    if value > 90.0:
        raise argparse.ArgumentTypeError(f"expected an angle of 0-90 degrees, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value < 1e4:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def profile_from_args(args: argparse.Namespace) -> Profile:
    """The profile named by ``--profile`` with the ranges given on the command line."""
    fov = getattr(args, "fov", "random")
    if args.profile == "v1" and (fov != "random" or getattr(args, "max_vertex_cut", None) is not None
                                 or getattr(args, "no_infarcts", False)):
        raise InputError("--fov, --max-vertex-cut and --no-infarcts need --profile v2 (v1 always "
                         "scans from the skull base to the vertex and has no lesions).",
                         "Drop them or use --profile v2.")
    pitch, roll_yaw = getattr(args, "max_pitch", None), getattr(args, "max_roll_yaw", None)
    return get_profile(args.profile, max_pitch_deg=pitch, max_roll_yaw_deg=roll_yaw,
                       slice_mm=tuple(args.slice_mm) if args.slice_mm else None,
                       fov_modes=((fov, 1.0),) if fov != "random" else None,
                       max_vertex_cut_mm=getattr(args, "max_vertex_cut", None),
                       infarct_probability=0.0 if getattr(args, "no_infarcts", False) else None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--atlas-dir", type=Path, required=True,
                   help="atlas folder holding Clinical-scct/ and aspects-on-cta/ (layout: docs/DESIGN.md section 5.2)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write (created if missing)")
    p.add_argument("-n", type=int, default=10, help="number of cases (default 10)")
    p.add_argument("--seed", type=int, default=0, help="run seed; case i uses (seed, i)")
    p.add_argument("--first", type=int, default=0,
                   help="index of the first case (case i is named i+1); lets shards of one run "
                        "be made in parallel into different folders")
    p.add_argument("--inplane", type=int, default=512,
                   help="in-plane matrix size; spacing 0.4-0.5 mm at 512, proportionally coarser below")
    p.add_argument("--profile", choices=tuple(PROFILES), default="v2",
                   help="v2 (default): wide pose, field of view, anatomy, scanner and pathology "
                        "randomisation, labels on the scanned brain only; v1: the first generator, "
                        "draw for draw (remakes v1 datasets bit-identically)")
    p.add_argument("--slice-mm", type=_slice_range, default=None, metavar="MIN,MAX",
                   help="slice thickness range in mm (default: v2 0.6,6; v1 1,5)")
    p.add_argument("--max-pitch", type=_angle, default=None, metavar="DEG",
                   help="head pitch (x angle, about the left-right axis) up to +-DEG "
                        "(default: v2 30, v1 15)")
    p.add_argument("--max-roll-yaw", type=_angle, default=None, metavar="DEG",
                   help="roll and yaw (y and z angles) up to +-DEG (default 15)")
    p.add_argument("--fov", choices=("random",) + FOV_MODES, default="random",
                   help="v2 field-of-view start: random (default: base 40 %%, neck 30 %%, orbits "
                        "30 %%), base (foramen magnum), neck (face and upper neck included) or "
                        "orbits (face cut off at the orbit roofs)")
    p.add_argument("--max-vertex-cut", type=_non_negative, default=None, metavar="MM",
                   help="v2: the top of the head is cut by 0-MM mm (default 30)")
    p.add_argument("--no-infarcts", action="store_true",
                   help="v2: no acute infarcts (lacunes, haemorrhage and calcifications as usual): "
                        "the normal scans the ASPECTS benchmark inserts graded infarcts into")
    p.add_argument("--overwrite", action="store_true", help="replace existing cases of the same names")


def _manifest(args: argparse.Namespace, prof: Profile, cases: Dict[str, dict]) -> dict:
    return {"generator": "training.synth", "sources": SOURCES, "overlap_priority": PRIORITY,
            "profile": prof.name, "ranges": asdict(prof),
            "seed": args.seed, "inplane": args.inplane, "slice_mm": list(prof.slice_mm),
            "cases": cases}


def _write_manifest(folder: Path, args: argparse.Namespace, prof: Profile, new: Dict[str, dict]) -> None:
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
    tmp.write_text(json.dumps(_manifest(args, prof, cases), indent=1), encoding="utf-8")
    os.replace(tmp, path)


def check_free(out: Path, first: int, n: int, overwrite: bool) -> None:
    """Refuse, before the atlas is read (seconds) and before anything is written, a run
    whose case names are taken in ``out``, and say both ways on: ``--overwrite`` or a
    ``--first`` after the cases that are there."""
    if overwrite or not Path(out).is_dir():
        return
    taken = [str(i + 1) for i in range(first, first + n) if dataset.existing_case_files(out, str(i + 1))]
    if taken:
        shown = ", ".join(taken[:5]) + (f" and {len(taken) - 5} more" if len(taken) > 5 else "")
        after = int(dataset.next_case_name(out)) - 1
        raise InputError(f"{out} already holds case{'s' if len(taken) > 1 else ''} {shown} of the "
                         f"{n} this run would write; nothing was written.",
                         f"Add --overwrite to replace them, or --first {after} to add cases "
                         f"{after + 1}-{after + n} after them (or give another --out).")


def run(args: argparse.Namespace) -> int:
    if args.n < 1 or args.first < 0:
        raise InputError("-n must be at least 1 and --first not negative.", "Check the options.")
    if args.inplane < 16:
        raise InputError(f"--inplane {args.inplane} is too small.", "Use 16 or more (512 is clinical).")
    prof = profile_from_args(args)
    check_free(args.out, args.first, args.n, args.overwrite)
    t0 = time.perf_counter()
    atlas = load_atlas(str(args.atlas_dir))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"atlas loaded in {time.perf_counter() - t0:.1f} s; making {args.n} cases in {args.out}", flush=True)
    done: Dict[str, dict] = {}
    try:
        for k in range(args.n):
            index = args.first + k
            t = time.perf_counter()
            case = synth_case(atlas, args.seed, index, args.inplane, profile=prof)
            name = str(index + 1)
            dataset.write_case(args.out, case.ct, case.labels, transform=case.transform, name=name,
                               overwrite=args.overwrite)
            done[name] = {"index": index, **params_json(case.params)}
            size = "x".join(str(n) for n in case.ct.GetSize())
            fov = f", fov {case.params.fov.mode}" if case.params.fov else ""
            print(f"[{k + 1}/{args.n}] case {name}: {size} at {case.params.spacing_mm:.2f} x "
                  f"{case.ct.GetSpacing()[2]:.2f} mm ({case.params.slice_mm:.2f} mm thick{fov}), tilt "
                  f"{', '.join(f'{a:+.1f}' for a in case.params.angles_deg)} deg, "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
    finally:
        if done:
            _write_manifest(args.out, args, prof, done)
    print(f"done: {args.n} cases in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0
