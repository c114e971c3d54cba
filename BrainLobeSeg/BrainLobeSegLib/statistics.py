"""Region statistics, segmentation uncertainty, and saving corrected cases.

What a stroke team reads after segmentation: for each of the 20 ASPECTS regions on the
scan's own grid, its volume, its density (mean and median HU of brain-like voxels) and
how that density compares with the same region on the other side. Early ischaemic
oedema takes up water and lowers CT density by a few HU, usually on one side only, so a
region darker than its mirror is worth a second look. It is *decision support*: a
difference of a few HU also comes from beam hardening near the skull base, old
infarcts, partial volume with CSF, motion, or a segmentation error. The report says so.

Uncertainty: the planar networks (axial, coronal, sagittal) and, in ensemble mode, the
3D model each give their own labels. Where they disagree with the fused label the
segmentation is least trustworthy; the fraction of disagreeing members per voxel is an
uncertainty volume on the scan grid, and its mean per region says where to correct first.

Command line (``brainlobeseg stats`` and ``save-case``, in :mod:`stats_command`)::

    brainlobeseg stats SCAN [--transform T.txt] [--invert-transform] [--auto-align]
                       [--labels LABELS.nii.gz] [--mode ensemble] [--threshold 2.5]
                       [--window 15 60] [--side left|right | --no-aspects] -o OUTDIR
        -> OUTDIR/<case>-stats.csv, <case>-stats.json and, when it segmented,
           <case>-uncertainty.nii.gz and <case>-aspects.nii.gz; unless --no-aspects, the
           ASPECTS read-out (:mod:`aspects`): <case>-aspects-score.json (score per side,
           calls and their evidence), <case>-aspects-evidence.nii.gz (the evidence map;
           .nrrd on a gantry-tilted grid) and <case>-aspects-score.png (:mod:`aspects_preview`),
           with its summary in <case>-stats.json (all written together)

    brainlobeseg save-case SCAN LABELS [--transform T.txt] [--invert-transform]
                           [--labels-space scan|upright] [--name N] --dataset DIR
        -> DIR/N.nii.gz, DIR/N.txt, DIR/N-seg.nii.gz (the next free number)

Only numpy and SimpleITK are imported here (the inference-path rule): the module runs
inside Slicer's Python and in CI alike.
"""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import regions
from .errors import InputError
from .transforms import matrix_of

# ----------------------------------------------------------------------------- settings

#: Lower bound of the brain window (HU). Below it: CSF (0-15 HU), sulci and ventricles
#: partial-volumed with CSF, and fat/air. Grey matter is ~35-45 HU and white matter
#: ~25-35 HU in non-contrast CT; even oedematous (ischaemic) tissue stays above ~15 HU in
#: the hyperacute window, so 15 HU removes CSF without removing the tissue of interest.
CSF_MAX_HU = 15.0
#: Upper bound of the brain window (HU). Above it: calcifications (basal ganglia, choroid
#: plexus, pineal), acute blood (50-80 HU, which would otherwise *raise* a region's mean
#: and mask a drop), and bone or beam-hardening streaks near the skull.
CALCIFIED_MIN_HU = 60.0
#: Default brain window ``(low, high)``: voxels with ``low <= HU <= high`` are measured.
BRAIN_WINDOW_HU: Tuple[float, float] = (CSF_MAX_HU, CALCIFIED_MIN_HU)

#: Default flag threshold (HU): a region is flagged when its mean HU is at least this
#: much *below* its mirror region's. Why 2.5 HU:
#:
#: - Physics: ischaemic oedema lowers attenuation by roughly 1.8-2.6 HU per 1 % of net
#:   water uptake (Kucinski 2002; Dzialowski 2004), and tissue that will not be saved
#:   typically takes up several percent within the first hours. 2.5 HU is about 1-1.5 %
#:   water uptake: early, yet already a real change.
#: - Normal variation: matched regions in healthy brains differ by about 1 HU (scanner
#:   noise averages out over thousands of voxels; what remains is beam hardening and
#:   positioning), so 2.5 HU sits above the normal asymmetry and keeps false flags rare.
#: - Visual detection needs 4-6 HU of contrast on a narrow window; a 2.5 HU flag points
#:   at regions *before* most readers see them, which is the point of decision support.
DEFAULT_DROP_THRESHOLD_HU = 2.5
#: Regions with fewer brain-window voxels than this (ml) get no mean comparison: the
#: mean of a sliver is dominated by partial volume and segmentation error.
MIN_MEASURED_ML = 0.5

NOTICE = ("Decision support only, not a diagnosis. A region flagged here has a lower mean "
          "density than the same region on the other side; this can be early ischaemia but "
          "also beam-hardening artefact, an old lesion, partial volume with CSF, motion or a "
          "segmentation error. Read the images; the flag neither confirms nor excludes a stroke.")
FLAG_TEXT = "lower density than mirror region - check (decision support, not a diagnosis)"

UNCERTAINTY_DISAGREEMENT = "fraction of planes/models disagreeing with the fused label"
UNCERTAINTY_PROBABILITY = "1 - highest fused probability (single model: no members to compare)"


# ----------------------------------------------------------------------------- results

@dataclass
class RegionStats:
    """The statistics of one region (all HU values over brain-window voxels only)."""

    label: int
    region: str                 # segment name, e.g. "M2 left"
    code: str
    side: str
    name: str
    volume_ml: float            # whole region, every labelled voxel
    voxels: int                 # whole region
    voxels_used: int            # inside the brain window (those the HU values are from)
    mean_hu: Optional[float]
    median_hu: Optional[float]
    std_hu: Optional[float]
    mirror_region: str
    mirror_mean_hu: Optional[float]
    diff_to_mirror_hu: Optional[float]   # mean_hu - mirror_mean_hu (negative: darker)
    flagged: bool
    flag: str                   # FLAG_TEXT when flagged, else ""
    mean_uncertainty: Optional[float]    # None when no uncertainty volume was given


#: Column names (with units) of the CSV and of the Slicer table, in order, and the
#: RegionStats field each comes from.
COLUMNS: List[Tuple[str, str]] = [
    ("label", "label"), ("region", "region"), ("name", "name"),
    ("volume_ml", "volume [ml]"), ("voxels_used", "voxels in brain window"),
    ("mean_hu", "mean [HU]"), ("median_hu", "median [HU]"), ("std_hu", "SD [HU]"),
    ("mirror_region", "mirror region"), ("mirror_mean_hu", "mirror mean [HU]"),
    ("diff_to_mirror_hu", "difference to mirror [HU]"), ("flag", "flag"),
    ("mean_uncertainty", "mean uncertainty [0-1]"),
]


@dataclass
class StatisticsReport:
    """All regions' statistics plus the settings they were computed with."""

    regions: List[RegionStats]
    window_hu: Tuple[float, float]
    threshold_hu: float
    min_measured_ml: float
    uncertainty_source: Optional[str] = None
    notice: str = NOTICE
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def flagged(self) -> List[RegionStats]:
        return [r for r in self.regions if r.flagged]

    def by_label(self, label: int) -> RegionStats:
        return next(r for r in self.regions if r.label == label)

    def to_json(self) -> dict:
        return {
            "notice": self.notice,
            "settings": {"brain_window_hu": list(self.window_hu),
                         "drop_threshold_hu": self.threshold_hu,
                         "min_measured_ml": self.min_measured_ml,
                         "uncertainty": self.uncertainty_source},
            "flagged": [r.region for r in self.flagged],
            "regions": [asdict(r) for r in self.regions],
            **self.extra,
        }

    def rows(self) -> List[List[object]]:
        """Table rows (one per region) in :data:`COLUMNS` order; None for missing values."""
        return [[getattr(r, key) for key, _ in COLUMNS] for r in self.regions]

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([title for _, title in COLUMNS])
        for row in self.rows():
            w.writerow(["" if v is None else (f"{v:.3f}" if isinstance(v, float) else v) for v in row])
        return buf.getvalue()


# ----------------------------------------------------------------------------- statistics

def _check_same_grid(ct: sitk.Image, other: sitk.Image, what: str) -> None:
    from .imageio import same_grid  # imageio is light; imported here to keep import order simple
    diff = same_grid(ct, other)
    if diff is not None:
        raise InputError(f"the {what} does not lie on the scan's grid ({diff}).",
                         f"Give the {what} on the scan's own grid (as `brainlobeseg segment` "
                         "writes <case>-aspects.nii.gz), not the upright one.")


def labels_array(labels: sitk.Image) -> np.ndarray:
    """The label image as uint8 ``(z, y, x)``, refusing values that are not region ids."""
    arr = sitk.GetArrayViewFromImage(labels)
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise InputError("the label image contains NaN or infinite values.", "Give a label map.")
    if arr.size and (arr.min() < 0 or arr.max() > regions.NUM_LABELS or
                     (arr.dtype.kind == "f" and np.any(arr != np.round(arr)))):
        bad = np.unique(arr[(arr < 0) | (arr > regions.NUM_LABELS)])[:5]
        raise InputError(f"the label image has values outside 0-{regions.NUM_LABELS} "
                         f"(e.g. {', '.join(str(b) for b in bad) or 'non-integers'}).",
                         "Give an ASPECTS label map (0 background, 1-10 left, 11-20 right).")
    return np.asarray(arr, dtype=np.uint8)


def region_statistics(ct: sitk.Image, labels: sitk.Image, uncertainty: Optional[sitk.Image] = None,
                      window_hu: Tuple[float, float] = BRAIN_WINDOW_HU,
                      threshold_hu: float = DEFAULT_DROP_THRESHOLD_HU,
                      min_measured_ml: float = MIN_MEASURED_ML,
                      uncertainty_source: Optional[str] = None) -> StatisticsReport:
    """Statistics of the 20 regions of ``labels`` (on ``ct``'s grid) over ``ct`` in HU.

    Volumes count every labelled voxel; HU values only voxels inside ``window_hu``
    (CSF and calcification/bone excluded, see :data:`BRAIN_WINDOW_HU`). A region is
    flagged when its mean is at least ``threshold_hu`` below its mirror's and both have
    at least ``min_measured_ml`` measured. ``uncertainty`` (float, same grid) gives each
    region's mean uncertainty.

    Works on the labelled voxels only (one pass over the volume to find them), so a
    512x512x110 scan takes well under a second.
    """
    lo, hi = float(window_hu[0]), float(window_hu[1])
    if not lo < hi:
        raise InputError(f"brain window {lo:g}..{hi:g} HU is empty.", "Give LOW < HIGH, e.g. 15 60.")
    if threshold_hu <= 0:
        raise InputError(f"threshold {threshold_hu:g} HU must be positive.",
                         "Give the drop (in HU) that should raise a flag, e.g. 2.5.")
    _check_same_grid(ct, labels, "label image")
    lab = labels_array(labels).ravel()
    idx = np.flatnonzero(lab)
    lab_fg = lab[idx]
    hu_fg = sitk.GetArrayViewFromImage(ct).ravel()[idx].astype(np.float64)
    unc_fg = None
    if uncertainty is not None:
        _check_same_grid(ct, uncertainty, "uncertainty volume")
        unc_fg = sitk.GetArrayViewFromImage(uncertainty).ravel()[idx].astype(np.float64)
    ml_per_voxel = float(np.prod(ct.GetSpacing())) / 1000.0
    min_voxels = min_measured_ml / ml_per_voxel

    order = np.argsort(lab_fg, kind="stable")
    bounds = np.searchsorted(lab_fg[order], np.arange(regions.NUM_LABELS + 2))
    raw: Dict[int, dict] = {}
    for r in regions.REGIONS:
        sel = order[bounds[r.label]:bounds[r.label + 1]]
        hu = hu_fg[sel]
        used = hu[(hu >= lo) & (hu <= hi)]
        measured = used.size >= max(1.0, min_voxels)
        raw[r.label] = {
            "voxels": int(sel.size), "used": int(used.size),
            "mean": float(used.mean()) if used.size else None,
            "median": float(np.median(used)) if used.size else None,
            "std": float(used.std()) if used.size > 1 else None,
            "measured": measured,
            "unc": float(unc_fg[sel].mean()) if unc_fg is not None and sel.size else None,
        }
    out = []
    for r in regions.REGIONS:
        me, mirror = raw[r.label], raw[r.mirror_label]
        mr = regions.REGION_BY_LABEL[r.mirror_label]
        diff = (me["mean"] - mirror["mean"]) if me["measured"] and mirror["measured"] else None
        flagged = diff is not None and diff <= -threshold_hu
        out.append(RegionStats(
            label=r.label, region=r.segment_name, code=r.code, side=r.side, name=r.name,
            volume_ml=me["voxels"] * ml_per_voxel, voxels=me["voxels"], voxels_used=me["used"],
            mean_hu=me["mean"], median_hu=me["median"], std_hu=me["std"],
            mirror_region=mr.segment_name, mirror_mean_hu=mirror["mean"],
            diff_to_mirror_hu=diff, flagged=flagged, flag=FLAG_TEXT if flagged else "",
            mean_uncertainty=me["unc"]))
    return StatisticsReport(out, (lo, hi), float(threshold_hu), float(min_measured_ml),
                            uncertainty_source if uncertainty is not None else None)


# ----------------------------------------------------------------------------- uncertainty

def member_disagreement(member_labels: Mapping[str, np.ndarray], fused: np.ndarray) -> np.ndarray:
    """Per voxel, the fraction of members whose label differs from the fused label.

    0 where every plane/model agrees with the result, 1 where none does. Members not on
    the fused grid are ignored (the engine only keeps those that are).
    """
    members = [m for m in member_labels.values() if m.shape == fused.shape]
    if not members:
        raise ValueError("no member labels on the fused grid")
    acc = np.zeros(fused.shape, np.float32)
    for m in members:
        acc += (m != fused)
    return acc / len(members)


def independent_members(result, planar_model_names: Optional[Sequence[str]] = None
                        ) -> Dict[str, np.ndarray]:
    """The members whose votes are independent: each plane's labels and each 3D model's.

    The engine also records a planar model's *fused* labels under the model's name;
    counting those next to its three planes would count the planes twice. They are
    dropped: by name when ``planar_model_names`` is given (the caller's Segmenter knows
    each model's kind, see :func:`planar_names`), and in planar mode whenever planes are
    present (then every model is planar).
    """
    members = {k: v for k, v in result.member_labels.items() if v.shape == result.labels_grid.shape}
    from .models import PLANES
    if not any(k in PLANES for k in members):
        return members
    if planar_model_names is None:
        planar_model_names = list(result.model_names) if result.mode == "planar" else []
    return {k: v for k, v in members.items() if k in PLANES or k not in set(planar_model_names)}


def planar_names(segmenter) -> List[str]:
    """Names of a :class:`~inference.Segmenter`'s planar models."""
    return [m.card.name for m in segmenter.models if m.card.kind == "planar"]


def uncertainty_on_grid(result, planar_model_names: Optional[Sequence[str]] = None
                        ) -> Tuple[np.ndarray, str]:
    """The uncertainty of a :class:`~inference.SegmentationResult` on its model grid.

    With two or more independent members (planar mode: three planes; ensemble: planes +
    3D model), member disagreement. A single 3D model has no members to compare; then
    ``1 - max(fused probability)`` if the probabilities were kept, which is 0 where the
    network is sure and grows where classes compete.
    """
    members = independent_members(result, planar_model_names)
    if len(members) >= 2:
        return member_disagreement(members, result.labels_grid), UNCERTAINTY_DISAGREEMENT
    if result.probabilities is not None:
        return (1.0 - result.probabilities.max(axis=0)).astype(np.float32), UNCERTAINTY_PROBABILITY
    return np.zeros(result.labels_grid.shape, np.float32), UNCERTAINTY_DISAGREEMENT


def grid_to_scan(values: np.ndarray, grid, scan: sitk.Image, transform: sitk.Transform,
                 default: float = 0.0) -> sitk.Image:
    """A float volume on the model grid (upright space) onto the scan's own grid.

    Same mapping as :func:`geometry.labels_to_scan` (scan voxel q takes the value at the
    upright point R^-1(q)) but linear, since uncertainty is a continuous quantity.
    """
    inverse = sitk.AffineTransform(3)
    m = np.linalg.inv(matrix_of(transform))
    inverse.SetMatrix(m[:3, :3].ravel().tolist())
    inverse.SetTranslation(m[:3, 3].tolist())
    src = grid.image(np.asarray(values, np.float32))
    return sitk.Resample(src, scan, inverse, sitk.sitkLinear, float(default), sitk.sitkFloat32)


def uncertainty_volume(result, scan: sitk.Image, transform: sitk.Transform,
                       planar_model_names: Optional[Sequence[str]] = None) -> Tuple[sitk.Image, str]:
    """The result's uncertainty on the scan grid (float32, 0-1) and what it measures."""
    u, source = uncertainty_on_grid(result, planar_model_names)
    return grid_to_scan(u, result.grid, scan, transform), source


def statistics_for_result(scan: sitk.Image, result, transform: sitk.Transform, segmenter=None,
                          **settings) -> Tuple[StatisticsReport, sitk.Image]:
    """Statistics of a segmentation result, with its uncertainty volume (scan grid).

    Pass the ``segmenter`` that produced ``result`` so that planar models' fused labels
    are not counted next to their planes (see :func:`independent_members`).
    """
    names = planar_names(segmenter) if segmenter is not None else None
    unc, source = uncertainty_volume(result, scan, transform, names)
    return region_statistics(scan, result.labels_scan, unc, uncertainty_source=source,
                             **settings), unc


# ----------------------------------------------------------------------------- saving cases

def labels_scan_to_upright(labels_scan: sitk.Image, scan: sitk.Image,
                           transform: sitk.Transform) -> sitk.Image:
    """Scan-grid labels -> the ``N-seg`` layout (upright space, the scan's grid).

    Upright point p shows scan point R(p), so ``seg_upright = Resample(labels_scan, scan,
    R, nearest)``, exactly how docs/DESIGN.md resamples the CT into the upright space.
    """
    _check_same_grid(scan, labels_scan, "label image")
    return sitk.Resample(sitk.Cast(labels_scan, sitk.sitkUInt8), scan, transform,
                         sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def save_corrected_case(dataset_dir: str, scan: sitk.Image, labels: sitk.Image,
                        transform: Optional[sitk.Transform] = None, labels_space: str = "scan",
                        name: Optional[str] = None) -> str:
    """Write a (corrected) case as the next numbered case of a training dataset.

    ``labels`` lie on the scan grid; ``labels_space`` says whether in the scan space
    (what the Slicer segmentation and ``<case>-aspects.nii.gz`` hold: converted here) or
    already upright (``N-seg`` layout). The layout itself is :mod:`dataset`'s business.
    Returns the case name.
    """
    from . import dataset, transforms
    if labels_space not in ("scan", "upright"):
        raise InputError(f"unknown labels space {labels_space!r}.", "Use scan or upright.")
    tf = transform if transform is not None else transforms.identity()
    labels_array(labels)  # refuse non-label images before anything is written
    _check_same_grid(scan, labels, "label image")
    seg = labels_scan_to_upright(labels, scan, tf) if labels_space == "scan" else sitk.Cast(labels, sitk.sitkUInt8)
    if not sitk.GetArrayViewFromImage(seg).any():
        raise InputError("the segmentation is empty: there is nothing to train on.",
                         "Segment the scan (and correct it) before saving it as a case.")
    result = dataset.write_case(dataset_dir, scan, seg, transform=transform, name=name)
    return str(getattr(result, "name", result))


# ----------------------------------------------------------------------------- command line

def print_summary(report: StatisticsReport, stream=None) -> None:
    """A short human-readable table on stdout, flagged regions marked with ``!``."""
    stream = stream or sys.stdout
    print(f"{'region':<10} {'ml':>6} {'mean HU':>8} {'vs mirror':>9} {'uncert.':>7}", file=stream)
    for r in report.regions:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        print(f"{r.region:<10} {r.volume_ml:6.1f} {f(r.mean_hu, '8.1f')} "
              f"{f(r.diff_to_mirror_hu, '+9.1f')} {f(r.mean_uncertainty, '7.2f')}"
              f"{'  !' if r.flagged else ''}", file=stream)
    if report.flagged:
        print(f"! {len(report.flagged)} region(s) at least {report.threshold_hu:g} HU darker than "
              f"their mirror: {', '.join(r.region for r in report.flagged)}", file=stream)
    print(report.notice, file=stream)
