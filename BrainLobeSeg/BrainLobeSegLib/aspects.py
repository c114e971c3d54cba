"""ASPECTS read-out: per-region evidence of early ischaemic change and the score per side.

Decision support, not a diagnosis. Early ischaemic oedema lowers CT density by a few HU
in the affected part of a region, usually on one side only. This module measures that,
region by region, on the segmented scan:

1. **Mirror grid.** The mid-sagittal plane is fitted to the 10 pairs of left/right region
   centroids (the regions define the head's own symmetry, so tilt, roll and yaw of the
   head in the scan do not matter and no transform is needed). CT and labels are
   resampled onto a 1.5 mm grid whose first axis is the plane's normal and whose centre
   lies on the plane, so mirroring is an index flip (no second interpolation).
2. **Calibration.** The parenchyma level is the mode of the labelled voxels' HU, so a
   scanner offset of tens of HU moves the tissue window with it.
3. **Parenchyma.** Voxels whose lightly smoothed HU lies in ``level -17 .. level +25`` and
   that are not within 3 mm of fluid or of dense voxels: CSF, sulci, old infarcts
   and lacunes (near-CSF density) fall below, calcification, blood and bone above, and
   their partial-volume rims are left out; none of it is ever counted as early ischaemia.
   A region pair with a dense lesion of blood-like density (:data:`DENSE_LESION_HU`) in
   either region is not assessed: a haemorrhage's rim stays inside the window and would
   make the mirror region look darker.
4. **Evidence.** For each left/right pair, each side is smoothed (3 mm Gaussian) over its
   own region's parenchyma only (normalised convolution, so CSF, white matter outside the
   region or a neighbour do not dilute a drop); a voxel's evidence is its value minus the
   mirror region's at the mirror point. A smooth shading difference between the
   hemispheres (scanner shading, positioning), fitted to the whole brain's mirror
   difference and fitted again without the pairs that stand out, is subtracted. Mapped
   back to the scan grid this is the evidence volume a reader overlays (negative: darker).
5. **Per region.** Measures of the region's evidence (:data:`aspects_card.MEASURES`),
   over the region without its edge (:data:`REGION_EDGE_MM`, where labels and the next
   structure's partial volume mix in tissue an infarct did not reach): its mean (a drop
   over most of the region), its darkest compact part (the 5th percentile of the
   evidence averaged over 5, 8 or 12 mm within the region: a drop over a third of it),
   the mean of its darkest 30 % and 60 %, the share at least :data:`VOXEL_DROP_HU` darker
   (the affected fraction), its difference to the regions of the same kind in the scan,
   and its grey/white contrast against the mirror region.
6. **Call.** The read-out card (:mod:`aspects_card`) turns each measure into a z-value
   against normal scans *for that region* (a 4 ml deep nucleus differs more between normal
   hemispheres than a 30 ml cortical region) and weighs them into a call score
   (log-odds); the region is called from the card's threshold, with the measures that
   pushed the score named as reasons. A region :data:`EXPECTED_DROP_HU` darker than the
   regions of its kind is called too (bilateral change, which a mirror comparison cannot
   see).

ASPECTS per side = 10 minus the regions called on that side; the clinician can override
any call (:meth:`AspectsResult.set_override`). The symptomatic side is the user's, or is
proposed from the asymmetry, with the reason.

The bundled card was fitted (``python -m training aspects_fit``) on synthetic scans made
from one atlas with graded inserted infarcts, segmented by the bundled 3D model, and
measured on scans no fit saw (``Testing/benchmarks/aspects_bench.py``,
ASPECTS_RESULTS.md). Real normal hemispheres differ more than these, so on real scans the
calls are a starting point; a site can refit the card on its own scans.

Only numpy and SimpleITK are imported (the inference-path rule).
"""

from __future__ import annotations

import functools
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import aspects_card, numpy_pages, regions, steps
from .errors import InputError, InputWarning

# ----------------------------------------------------------------------------- settings

#: Spacing of the mirror grid (mm): fine enough for the 3 mm evidence smoothing, coarse
#: enough that a whole head costs well under a second.
GRID_MM = 1.5
#: Margin around the labelled regions on the mirror grid (mm).
MARGIN_MM = 12.0
#: Each region is measured without its edge: a grid voxel counts for its region only when
#: its 6 neighbours carry the same label (eroded this many mm, one grid voxel). At the
#: edge the model's labels and the partial volume of the next structure mix in tissue the
#: infarct did not reach (an infarcted caudate's mean kept half of the drop). The shading
#: fit still leaves out whole regions, edges included (ASPECTS_RESULTS.md has the numbers).
REGION_EDGE_MM = 1.5
#: Light smoothing (mm) before the parenchyma window: scanner noise of up to 20 HU per
#: voxel would otherwise push real tissue out of the window and bias what is left.
MASK_SIGMA_MM = 1.5
#: Evidence smoothing (mm): averages noise and small grey/white misalignments between the
#: hemispheres while keeping a 10 mm infarct visible.
EVIDENCE_SIGMA_MM = 3.0
#: Parenchyma window relative to the scan's parenchyma level (HU). Below: CSF (level - 25
#: and lower), old infarcts and lacunes; an acute infarct of -10 HU in white matter stays
#: inside. Above: calcification, acute blood, bone.
TISSUE_WINDOW_HU: Tuple[float, float] = (-17.0, 25.0)
#: Tissue this close (mm) to fluid (``level + TISSUE_WINDOW_HU[0] - CSF_GAP_HU`` or lower)
#: is not measured: partial volume with the sulci and ventricles, which differ between
#: the hemispheres, would look like a density drop. 3 mm, not 1.5: the partial-volume
#: zone of a scan is wider than one grid voxel (on 12 synthetic normal scans the SD of the
#: caudate's mean evidence fell from 0.93 to 0.70 HU, M3's from 0.47 to 0.32; a caudate
#: beside a shifted ventricle read +2.05 HU at 1.5 mm, +0.80 at 3 mm).
CSF_MARGIN_MM = 3.0
CSF_GAP_HU = 3.0
#: Where the mirror region's smoothed weight is below this, its mean is the reference.
MIRROR_WEIGHT = 0.1
#: A left/right pair whose median evidence is further from 0 than this (HU) after a
#: shading fit is left out of the next (it holds an infarct or its mirror). Normal pairs
#: differ by 0.3-1 HU; at 1.5 HU a -4 HU infarct of three regions kept only 0.8-1.7 HU of
#: its drop on the code phantom (the fit took the rest). At 0.75 HU a larger one still
#: escaped: the first fit left each of its regions just under the bar (-4 HU over M2, M3,
#: M5, M6 on the phantom: M6 kept 0.9 HU; over M1-M6: M2, M5, M6 kept 0.6-0.7 HU; a
#: synthetic -6 HU infarct of M1, M5, M6: -0.72 HU corrected medians), so it was never
#: left out. At 0.5 HU every region of those phantom infarcts keeps 2.6-3.3 HU; the price:
#: normal cortical pairs vary a little more (SD of the mean evidence on seed 10100's normal
#: scans M1 0.42 -> 0.56, M3 0.38 -> 0.50 HU), which the card's normal values take in.
PAIR_EXCLUDE_HU = 0.5
#: Order of the shading field fitted to the mirror difference (:func:`_odd_basis`): x times
#: the polynomials in x^2, y, z up to this order. Order 2 (7 fields) cannot follow a slow
#: sinusoidal shading of the kind the synthetic scanner makes (a wave of 120-300 mm and up
#: to 6 HU): on seed 10400's 30 normal scans the regions' mean evidence varied with SD 0.754
#: HU and 94 of 594 regions read more than 1 HU off their mirror; order 3 (13 fields, below)
#: 0.611 HU and 47; order 4 (22 fields) 0.588 HU and 43. Order 3 is not the default: with a
#: card refitted on it (leaving one of four synthetic sets out) the worst set's normal-scan
#: rate fell from 2.83 to 2.50 % but target sensitivity from 0.866 to 0.854, about 0.01 less
#: at every operating point (ASPECTS_RESULTS.md, 19th session); the bundled card is fitted
#: with order 2.
SHADING_ORDER = 2
#: With an order above 2 the finer field is fitted only when the coarse fit (order 2, pairs
#: left out as below) left out at most this share of the fit's tissue; beyond it (a large
#: infarct) too little tissue pins the extra terms, and the coarse field is kept: -4 HU over
#: M1-M6 of the code phantom leaves 55 % out, and an order-3 field then kept -0.6 to -2.1 HU
#: of the drop (score 5 for 4) where order 2 keeps 2.6-2.9 HU. Normal synthetic scans leave
#: 0-29 % out (seed 10400).
FINE_SHADING_MAX_LEFT_OUT = 0.33
#: Fewest tissue voxels a shading fit uses (fewer: no correction).
MIN_FIT_VOXELS = 1000
#: Tissue this close (mm) to dense voxels (calcification, blood, bone: more than
#: ``DENSE_GAP_HU`` above the window) is not measured: their partial-volume rim would make
#: the region brighter and its mirror look darker.
DENSE_MARGIN_MM = 3.0
DENSE_GAP_HU = 5.0
#: Compact dark spots are not measured: tissue-window voxels more than ``SPOT_GAP_HU``
#: below the window tissue's own mean over ``SPOT_SIGMA_MM`` (normalised convolution),
#: grown by ``SPOT_MARGIN_MM``. A lacune or small old infarct of 2-5 mm is fluid, but on
#: 5 mm slices its partial volume keeps it above the fluid threshold, so its dark rim
#: counted as tissue and read as a density drop in that nucleus. An acute infarct is a
#: shallow, broad drop (-10 HU over 7 mm is about -4 HU against its 5 mm mean) and stays.
#: On 12 synthetic normal scans the SD of the mean evidence fell L 0.81 -> 0.64, IC 0.88
#: -> 0.72, C 0.70 -> 0.65 HU (cortex within 0.06); 2.4 % of the tissue is left out.
SPOT_GAP_HU = 10.0
SPOT_SIGMA_MM = 5.0
SPOT_MARGIN_MM = 1.5
#: A dense lesion in a region (an acute haemorrhage; a calcification only as dense as blood) leaves the
#: region and its mirror *not assessed*: its partial-volume rim lies inside the tissue
#: window, so the region reads brighter and its mirror darker (seed 10100: a 64 HU
#: haemorrhage of 10 mm in a left caudate had the right caudate called, call score 3.5).
#: Dense-lesion voxels: more than ``DENSE_LESION_HU`` above the parenchyma level (1.5 mm
#: smoothed; grey matter lies a few HU above it), more than ``DENSE_LESION_ASYMMETRY_HU``
#: brighter than the mirror point (a haemorrhage is one-sided; beam hardening is not), at
#: least ``DENSE_LESION_BONE_MM`` from bone (the inner table's partial volume and one-sided
#: beam hardening brighten the cortex beside it) and in connected parts of at least
#: ``DENSE_LESION_PART_ML``; a pair is not assessed when either region's measured core holds
#: ``DENSE_LESION_ML`` of them. Parts that peak more than ``DENSE_LESION_PEAK_HU`` above
#: the level are calcification (blood stays below about 90 HU), whose rim the dense margin
#: above already leaves out: a calcified nucleus stays assessed. A superficial lobar
#: haemorrhage within the bone margin is not found this way.
DENSE_LESION_HU = 15.0
DENSE_LESION_PEAK_HU = 70.0
DENSE_LESION_ASYMMETRY_HU = 10.0
DENSE_LESION_BONE_MM = 9.0
DENSE_LESION_PART_ML = 0.1
DENSE_LESION_ML = 0.5
#: Bone (HU): above it a voxel is never soft tissue.
BONE_HU = 300.0
#: A voxel counts as affected (the reported darker share) when its evidence is at least
#: this many HU below the mirror.
VOXEL_DROP_HU = 2.0
#: The darkest compact part of a region: the :data:`DARK_PART_PERCENTILE` th percentile of
#: its evidence averaged over a Gaussian of ``sigma`` mm within the region's tissue
#: (normalised convolution), at the scales the read-out card's measures name.
DARK_PART_SIGMA_MM = 8.0
DARK_PART_SCALES_MM: Dict[str, float] = {"dark": 8.0, "dark5": 5.0, "dark12": 12.0}
DARK_PART_PERCENTILE = 5.0
#: Shares of a region's darkest voxels whose mean evidence are the ``low30``/``low60`` measures.
LOW_SHARES: Dict[str, float] = {"low30": 0.3, "low60": 0.6}
#: A region is called when its call score (:mod:`aspects_card`, fitted on normal and
#: infarcted scans) reaches the card's threshold ...
#: ... or when its mean density is this far below the median of its kind (both sides): a
#: bilateral change, which the mirror comparison cannot see. 8 HU, not 6: a slow scanner
#: shading darkens a whole part of the head on both sides, and on the synthetic dev sets
#: (9600, 9700, 9900, 10100, 10400; 27,068 unaffected regions) 100 unaffected regions read 6 HU
#: or more below their kind, 19 read 7, none 8 (lowest -7.7 HU); at 6 HU this call added 1
#: true and 94 false calls there, 8 of seed 10400's 29 normal-scan calls. The one-sided
#: synthetic infarcts cannot show what it finds.
EXPECTED_DROP_HU = 8.0
#: Regions with fewer parenchyma voxels than this (ml) are not called (slivers at the
#: edge of the field of view are partial volume, not tissue).
MIN_MEASURED_ML = 0.5
#: Grey/white contrast loss (HU) against the mirror region that is reported as a reason.
GW_LOSS_HU = 3.0

NOTICE = ("Decision support, not a diagnosis. Calls are made from density differences "
          "against the mirror region; beam hardening, old lesions, partial volume, motion "
          "and segmentation errors also cause them. Read the images; the score neither "
          "confirms nor excludes a stroke.")

SIDES = ("left", "right")


# ----------------------------------------------------------------------------- results

@dataclass
class RegionCall:
    """Evidence and call of one region (HU relative values; fractions 0-1)."""

    label: int
    region: str               # segment name, e.g. "M2 left"
    code: str
    side: str
    parenchyma_ml: float      # measured tissue (parenchyma window, mirror point also tissue)
    affected_fraction: Optional[float]  # share of the tissue >= VOXEL_DROP_HU darker than the mirror
    affected_ml: Optional[float]
    median_drop_hu: Optional[float]      # median evidence over the affected voxels (negative)
    darkest_part_hu: Optional[float]     # evidence of the darkest compact part (DARK_PART_*)
    diff_to_mirror_hu: Optional[float]   # mean evidence over the region (negative: darker)
    diff_to_expected_hu: Optional[float]  # region mean minus the median of its kind
    gw_contrast_hu: Optional[float]      # grey/white contrast (90th - 10th percentile)
    gw_loss_hu: Optional[float]          # mirror's contrast minus this one's (positive: lost)
    call_score: Optional[float]          # log-odds from the read-out card (aspects_card)
    called: bool              # the automatic call
    reasons: List[str]
    override: Optional[bool] = None      # the clinician's call, when given
    measures: Dict[str, Optional[float]] = field(default_factory=dict)  # aspects_card.MEASURES
    #: ml of dense lesion in this region or its mirror when that leaves the pair not
    #: assessed (:data:`DENSE_LESION_ML`); None when the pair is compared
    dense_lesion_ml: Optional[float] = None

    @property
    def affected(self) -> bool:
        """The call that counts: the clinician's override if any, else the automatic one."""
        return self.called if self.override is None else self.override


@dataclass
class AspectsResult:
    """The 20 region calls, the side, the scores and the evidence map (scan grid)."""

    regions: List[RegionCall]
    side: str                 # symptomatic side, "left" or "right"
    side_source: str          # "user" or "proposed"
    side_reason: str
    level_hu: float           # parenchyma level of the scan
    evidence_spread_hu: float = 0.0   # robust SD of the evidence in the regions (a quality hint)
    evidence: Optional[sitk.Image] = None   # float32 HU on the scan grid, 0 outside tissue
    notice: str = NOTICE
    settings: Dict[str, Any] = field(default_factory=dict)

    def region(self, name_or_label) -> RegionCall:
        """The call of one region, by segment name ("M2 left") or label id."""
        for r in self.regions:
            if name_or_label in (r.label, r.region):
                return r
        raise InputError(f"{name_or_label!r} is not an ASPECTS region.",
                         "Use a segment name such as 'M2 left' or a label id 1-20.")

    def affected(self, side: str) -> List[RegionCall]:
        return [r for r in self.regions if r.side == side and r.affected]

    def score(self, side: Optional[str] = None) -> int:
        """ASPECTS of ``side`` (default: the symptomatic side): 10 minus affected regions."""
        return 10 - len(self.affected(side or self.side))

    def set_override(self, name_or_label, affected: Optional[bool]) -> None:
        """The clinician's call for one region (None: back to the automatic call). A side
        that was proposed (not chosen by the user) is proposed again from the calls that
        now count, so the side shown never contradicts the clinician's own calls."""
        self.region(name_or_label).override = affected
        if self.side_source == "proposed":
            self.use_proposed_side()

    def use_proposed_side(self) -> None:
        """The side proposed from the calls that count now (overrides included), and why."""
        self.side, self.side_reason = propose_side(self.regions)
        self.side_source = "proposed"

    def set_side(self, side: str) -> None:
        if side not in SIDES:
            raise InputError(f"unknown side {side!r}.", "Use left or right.")
        self.side, self.side_source, self.side_reason = side, "user", "chosen by the user"

    def to_json(self) -> dict:
        regs = []
        for r in self.regions:
            d = asdict(r)
            d["affected"] = r.affected
            d["measures"] = {k: _round(v) for k, v in r.measures.items()}
            regs.append(d)
        return {"notice": self.notice,
                "aspects": {"side": self.side, "side_source": self.side_source,
                            "side_reason": self.side_reason, "score": self.score(),
                            "score_left": self.score("left"), "score_right": self.score("right"),
                            "affected": [r.region for r in self.affected(self.side)]},
                "level_hu": _round(self.level_hu), "evidence_spread_hu": _round(self.evidence_spread_hu),
                "settings": self.settings,
                "regions": [{k: _round(v) for k, v in d.items()} for d in regs]}

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False)


def _round(v):
    return round(v, 3) if isinstance(v, float) else v


# ----------------------------------------------------------------------------- mirror grid

def region_centroids(labels: sitk.Image) -> Dict[int, np.ndarray]:
    """Physical centroid (LPS mm) of every region present in ``labels``."""
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(labels, sitk.sitkUInt8))
    return {int(k): np.array(stats.GetCentroid(k)) for k in stats.GetLabels()
            if 1 <= k <= regions.NUM_LABELS}


def midplane(labels: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """(unit normal pointing to the patient's left, a point) of the mid-sagittal plane.

    Fitted to the pairs of left/right region centroids: the normal is the mean direction
    from right to left centroid, the point the mean of the pairs' midpoints projected on
    it. Needs at least 3 pairs; fewer means the segmentation is not usable for ASPECTS.
    """
    c = region_centroids(labels)
    pairs = [(c[r.label], c[r.mirror_label]) for r in regions.REGIONS
             if r.side == "left" and r.label in c and r.mirror_label in c]
    if len(pairs) < 3:
        raise InputError(f"only {len(pairs)} region pairs are present on both sides; the "
                         "mid-sagittal plane cannot be found.",
                         "Check the segmentation (all 20 regions are needed for ASPECTS).")
    dirs = np.array([(left - right) / max(np.linalg.norm(left - right), 1e-6) for left, right in pairs])
    normal = dirs.mean(axis=0)
    normal /= np.linalg.norm(normal)
    mids = np.array([(left + right) / 2 for left, right in pairs])
    offset = float(np.median(mids @ normal))
    point = mids.mean(axis=0)
    point = point - (point @ normal - offset) * normal
    return normal, point


def mirror_grid(labels: sitk.Image, normal: np.ndarray, point: np.ndarray,
                spacing: float = GRID_MM, margin: float = MARGIN_MM) -> sitk.Image:
    """An empty grid whose axis 0 (x) runs along ``normal`` and is centred on the plane.

    Index ``i`` and ``nx - 1 - i`` are mirror images of each other, so mirroring on this
    grid is ``array[..., ::-1]``. Axis 2 follows the scan's slice direction as far as it
    is orthogonal to the normal; the grid covers the labelled regions plus ``margin``.
    """
    ex = normal / np.linalg.norm(normal)
    d = np.array(labels.GetDirection()).reshape(3, 3)
    ez = d[:, 2] - (d[:, 2] @ ex) * ex
    if np.linalg.norm(ez) < 1e-3:          # slices along the left-right axis (sagittal scan)
        ez = d[:, 1] - (d[:, 1] @ ex) * ex
    ez /= np.linalg.norm(ez)
    ey = np.cross(ez, ex)
    axes = np.stack([ex, ey, ez], axis=1)
    arr = sitk.GetArrayFromImage(labels)
    idx = np.argwhere(arr > 0)[:, ::-1]
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    phys = np.array([labels.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in p))
                     for p in corners])
    local = (phys - point) @ axes
    half_x = np.abs(local[:, 0]).max() + margin
    lo_l, hi_l = local.min(axis=0) - margin, local.max(axis=0) + margin
    nx = 2 * int(math.ceil(half_x / spacing))
    ny, nz = (int(math.ceil((hi_l[k] - lo_l[k]) / spacing)) + 1 for k in (1, 2))
    origin_local = np.array([-(nx - 1) / 2 * spacing, lo_l[1], lo_l[2]])
    grid = sitk.Image([nx, ny, nz], sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(axes.ravel().tolist())
    grid.SetOrigin((point + axes @ origin_local).tolist())
    return grid


# ----------------------------------------------------------------------------- evidence

def parenchyma_level(hu: np.ndarray) -> float:
    """The mode (HU) of labelled voxels between -60 and 140 HU: the parenchyma peak.

    Uses a 1 HU histogram smoothed over 5 HU. Robust to a scanner offset (it moves with
    it), to CSF and calcification (other peaks), and to an infarct (a minority).
    """
    v = hu[(hu > -60) & (hu < 140)]
    if v.size < 100:
        raise InputError("the labelled regions hold almost no soft-tissue voxels.",
                         "Check that the scan is a head CT in HU and the labels lie on it.")
    hist, edges = np.histogram(v, bins=200, range=(-60, 140))
    k = np.exp(-0.5 * (np.arange(-7, 8) / 2.5) ** 2)
    smooth = np.convolve(hist, k / k.sum(), mode="same")
    i = int(np.argmax(smooth))
    return float((edges[i] + edges[i + 1]) / 2)


def _smooth(arr: np.ndarray, sigma_mm: float, spacing: float) -> np.ndarray:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing([spacing] * 3)
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, sigma_mm))


def masked_smooth(hu: np.ndarray, mask: np.ndarray, sigma_mm: float, spacing: float) -> np.ndarray:
    """Gaussian mean of ``hu`` over ``mask`` only (normalised convolution); 0 where the
    mask has no weight. CSF next to cortex therefore does not darken the cortex."""
    s, w = _normalised(hu, mask, sigma_mm, spacing)
    return np.where(w > 0.05, s, 0.0).astype(np.float32)


def _normalised(hu: np.ndarray, mask: np.ndarray, sigma_mm: float,
                spacing: float = GRID_MM) -> Tuple[np.ndarray, np.ndarray]:
    """(Gaussian mean of ``hu`` over ``mask``, the mask's smoothed weight)."""
    w = _smooth(mask.astype(np.float32), sigma_mm, spacing)
    s = _smooth(np.where(mask, hu, 0).astype(np.float32), sigma_mm, spacing)
    return s / np.maximum(w, 1e-6), w


@dataclass
class EvidenceMaps:
    """The mirror-grid arrays the calls are made from (``(z, y, x)``, x mirrored)."""

    grid: sitk.Image
    labels: np.ndarray        # uint8 region ids
    hu: np.ndarray            # lightly smoothed HU
    tissue: np.ndarray        # bool, parenchyma here and at the mirror point
    evidence: np.ndarray      # HU: smoothed tissue minus the same at the mirror point
    level: float
    dense: Optional[np.ndarray] = None   # bool, dense-lesion voxels (:func:`dense_lesions`)


def evidence_maps(ct: sitk.Image, labels: sitk.Image) -> EvidenceMaps:
    """Resample to the mirror grid and compute parenchyma and the evidence map."""
    return steps.run_steps(evidence_maps_steps(ct, labels))


def evidence_maps_steps(ct: sitk.Image, labels: sitk.Image,
                        progress: Optional[steps.ProgressFn] = None) -> "steps.Steps[EvidenceMaps]":
    """:func:`evidence_maps` in steps of a fraction of a second (the Slicer panel runs
    them from a timer); ``progress(fraction, message)`` is told how far it is (0-0.9)."""
    tell = progress or (lambda fraction, message: None)
    tell(0.0, "ASPECTS: resampling to the mirror grid")
    normal, point = midplane(labels)
    grid = mirror_grid(labels, normal, point)
    ident = sitk.Transform(3, sitk.sitkIdentity)
    hu = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), grid, ident,
                                              sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    lab = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(labels, sitk.sitkUInt8), grid, ident,
                                               sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    whole, lab = lab, region_cores(lab)
    yield
    tell(0.15, "ASPECTS: finding the parenchyma")
    level = parenchyma_level(hu[lab > 0])
    soft = (hu > -200) & (hu < BONE_HU)
    hu1 = masked_smooth(np.clip(hu, -200, BONE_HU), soft, MASK_SIGMA_MM, GRID_MM)
    yield
    dense = dense_lesions(hu, hu1, level)
    tissue = parenchyma_mask(hu1, soft, level)
    yield
    tissue &= ~compact_dark_spots(hu1, soft, level)
    yield
    tell(0.3, "ASPECTS: comparing with the mirror side")
    smooth = masked_smooth(hu1, tissue, EVIDENCE_SIGMA_MM, GRID_MM)
    both = tissue & tissue[..., ::-1]
    raw = np.where(both, smooth - smooth[..., ::-1], 0.0).astype(np.float32)
    brain = _near_regions(whole > 0, 10.0)
    brain |= brain[..., ::-1]
    yield
    tell(0.4, "ASPECTS: correcting scanner shading")
    shade = yield from robust_shading_steps(raw, both & brain, whole)
    evidence = np.where(both, raw - shade, 0.0).astype(np.float32)
    in_region = tissue & (lab > 0)
    evidence[lab > 0] = 0.0
    yield
    pairs = [r for r in regions.REGIONS if r.side == "left"]
    for i, r in enumerate(pairs):
        tell(0.5 + 0.4 * i / len(pairs), "ASPECTS: measuring the regions")
        region_pair_evidence(hu1, lab, tissue, r.label, r.mirror_label, evidence)
        yield
    evidence[in_region] -= shade[in_region]
    return EvidenceMaps(grid, lab, hu1, in_region | (both & (lab == 0)), evidence, level, dense)


def region_cores(lab: np.ndarray, edge_mm: float = REGION_EDGE_MM) -> np.ndarray:
    """``lab`` (mirror grid) without each region's edge: voxels with a 6-neighbour of
    another label are made background, ``edge_mm`` / :data:`GRID_MM` times."""
    out = lab
    for _ in range(int(round(edge_mm / GRID_MM))):
        padded = np.pad(out, 1)
        core = out.copy()
        for axis in range(3):
            for shift in (-1, 1):
                neighbour = np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
                core[neighbour != out] = 0
        out = core
    return out


def window_bounds(level: float) -> Tuple[float, float]:
    """The parenchyma window (HU) around the scan's parenchyma ``level``: one place for
    the measured tissue (:func:`parenchyma_mask`) and the dark spots' reference."""
    return level + TISSUE_WINDOW_HU[0], level + TISSUE_WINDOW_HU[1]


def parenchyma_mask(hu1: np.ndarray, soft: np.ndarray, level: float) -> np.ndarray:
    """Measured tissue: inside the window around ``level`` and away from fluid and dense
    voxels (their partial-volume rims differ between the hemispheres)."""
    lo, hi = window_bounds(level)
    fluid = soft & (hu1 < lo - CSF_GAP_HU)
    dense = hu1 > hi + DENSE_GAP_HU
    return ((hu1 >= lo) & (hu1 <= hi) & soft & ~_near_regions(fluid, CSF_MARGIN_MM)
            & ~_near_regions(dense, DENSE_MARGIN_MM))


def dense_lesions(hu: np.ndarray, hu1: np.ndarray, level: float) -> np.ndarray:
    """Dense-lesion voxels of the mirror grid (see :data:`DENSE_LESION_HU`): ``hu`` the
    resampled scan (for the bone), ``hu1`` its 1.5 mm smoothed soft tissue."""
    candidates = ((hu1 > level + DENSE_LESION_HU) & (hu1 < BONE_HU)
                  & (hu1 - hu1[..., ::-1] > DENSE_LESION_ASYMMETRY_HU))
    if not candidates.any():
        return candidates
    candidates &= ~_near_regions(hu >= BONE_HU, DENSE_LESION_BONE_MM)
    parts = sitk.ConnectedComponent(sitk.GetImageFromArray(candidates.astype(np.uint8)))
    min_voxels = int(math.ceil(DENSE_LESION_PART_ML * 1000.0 / GRID_MM ** 3))
    parts = sitk.RelabelComponent(parts, minimumObjectSize=min_voxels)
    stats = sitk.LabelStatisticsImageFilter()
    stats.Execute(sitk.GetImageFromArray(hu1.astype(np.float32)), parts)
    blood = [k for k in stats.GetLabels() if k > 0 and stats.GetMaximum(k) <= level + DENSE_LESION_PEAK_HU]
    return np.isin(sitk.GetArrayFromImage(parts), blood)


def compact_dark_spots(hu1: np.ndarray, soft: np.ndarray, level: float) -> np.ndarray:
    """Voxels of the tissue window more than :data:`SPOT_GAP_HU` darker than the window's
    tissue around them (mean over :data:`SPOT_SIGMA_MM`), grown by :data:`SPOT_MARGIN_MM`:
    lacunes and other small fluid spots that partial volume lifted into the window."""
    lo, hi = window_bounds(level)
    window = soft & (hu1 >= lo) & (hu1 <= hi)
    around = masked_smooth(hu1, window, SPOT_SIGMA_MM, GRID_MM)
    spots = window & (hu1 < around - SPOT_GAP_HU)
    return _near_regions(spots, SPOT_MARGIN_MM) if spots.any() else spots


def _region_box(mask: np.ndarray) -> Tuple[slice, ...]:
    """The bounding box of ``mask`` and one voxel around it: all a normalised convolution
    over ``mask`` needs. Its inputs are zero outside the mask and the recursive Gaussian
    carries a border value on as a constant, so a zero border equals unlimited zero
    padding; a 3-sigma margin gave the same values bit for bit (seed 9700 and 10100 scans)
    at 1.6-1.9 times the read-out time."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(max(int(hit[0]) - 1, 0))
        hi.append(min(int(hit[-1]) + 2, mask.shape[axis]))
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def region_pair_evidence(hu: np.ndarray, lab: np.ndarray, tissue: np.ndarray, left: int, right: int,
                         out: np.ndarray) -> None:
    """Evidence of a left/right region pair, written into ``out`` at their tissue voxels.

    Each side is smoothed over its *own* region's tissue only (normalised convolution),
    so neither the CSF, the white matter outside the region nor a neighbouring region
    dilutes a drop; a voxel's evidence is its value minus the mirror region's smoothed
    value at the mirror point (or, where the mirror region does not reach, its mean).
    """
    a = (lab == left) & tissue
    b_flipped = ((lab == right) & tissue)[..., ::-1]
    if not a.any() or not b_flipped.any():
        return
    box = _region_box(a | b_flipped)
    hu_a, hu_b = hu[box], hu[..., ::-1][box]
    ma, mb = a[box], b_flipped[box]
    sa, wa = _normalised(hu_a, ma, EVIDENCE_SIGMA_MM)
    sb, wb = _normalised(hu_b, mb, EVIDENCE_SIGMA_MM)
    mean_a, mean_b = float(hu_a[ma].mean()), float(hu_b[mb].mean())
    ref_b = np.where(wb > MIRROR_WEIGHT, sb, mean_b)
    ref_a = np.where(wa > MIRROR_WEIGHT, sa, mean_a)
    out[box][ma] = (sa - ref_b)[ma]
    out[..., ::-1][box][mb] = (sb - ref_a)[mb]


def robust_shading(raw: np.ndarray, fit_mask: np.ndarray, lab: np.ndarray) -> np.ndarray:
    """:func:`robust_shading_steps` in a plain loop."""
    return steps.run_steps(robust_shading_steps(raw, fit_mask, lab))


def robust_shading_steps(raw: np.ndarray, fit_mask: np.ndarray, lab: np.ndarray) -> "steps.Steps[np.ndarray]":
    """The shading field, fitted again without the region pairs that stand out; a step
    per fit (each is a least-squares fit to the whole brain's tissue).

    A large infarct (a whole region or several) is a big share of the tissue and would
    pull the fit towards itself, halving its own evidence. After a fit, every left/right
    pair whose median corrected difference exceeds :data:`PAIR_EXCLUDE_HU` (an infarct,
    or its mirror) is left out and the field is fitted again, twice at most. This is done
    with the order-2 field; with :data:`SHADING_ORDER` above 2 the finer field is then fitted
    the same way, unless the order-2 fit left out more than
    :data:`FINE_SHADING_MAX_LEFT_OUT` of the tissue.

    Limit: an infarct of most of the MCA cortex of one side is most of the regions' tissue
    and the first fit takes part of it for shading: -4 HU over M1-M6 on the code phantom
    keeps 2.6-2.9 HU of its drop after the refits (3.4-3.6 HU for three regions); a first
    fit to the tissue outside the regions avoided that but let normal cortical regions
    vary twice as much (12 synthetic normal scans), so it is not used.
    """
    mirrored = lab[..., ::-1]
    idx = np.flatnonzero(fit_mask & (lab > 0))
    lab_fit = lab.ravel()[idx]

    def standing_out(shade: np.ndarray) -> List[int]:
        corrected = (raw - shade).ravel()[idx]
        odd = [r for r in regions.REGIONS if (lab_fit == r.label).sum() > 50
               and abs(float(np.median(corrected[lab_fit == r.label]))) > PAIR_EXCLUDE_HU]
        return sorted({r.label for r in odd} | {r.mirror_label for r in odd})

    def without(ids: List[int]) -> np.ndarray:
        return fit_mask & ~(np.isin(lab, ids) | np.isin(mirrored, ids))

    def fitted(basis: List[np.ndarray]) -> "steps.Steps[Tuple[np.ndarray, List[int]]]":
        shade = shading_difference(raw, fit_mask, basis)
        left_out: List[int] = []
        for _ in range(2):
            yield
            ids = standing_out(shade)
            if ids == left_out:
                break
            left_out = ids
            shade = shading_difference(raw, without(ids), basis)
        return shade, left_out

    shade, left_out = yield from fitted(_odd_basis(raw.shape, 2))
    if SHADING_ORDER <= 2 or without(left_out).sum() < (1.0 - FINE_SHADING_MAX_LEFT_OUT) * fit_mask.sum():
        return shade
    shade, _ = yield from fitted(_odd_basis(raw.shape, SHADING_ORDER))
    return shade


def _near_regions(mask: np.ndarray, mm: float) -> np.ndarray:
    """``mask`` dilated by ``mm`` on the mirror grid: the brain around the regions
    (scalp and skull base stay out of the shading fit)."""
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    r = max(1, int(round(mm / GRID_MM)))
    return sitk.GetArrayFromImage(sitk.BinaryDilate(img, [r] * 3)).astype(bool)


def _odd_basis(shape: Tuple[int, int, int], order: int = 2) -> List[np.ndarray]:
    """Smooth fields that change sign under the mirror flip (odd in x), scaled to ~1: x
    times every monomial y^a z^b x^2c with a + b + 2c <= ``order`` (order 2: 7 fields, the
    coarse field :func:`robust_shading_steps` fits first; order 3: 13)."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in (nz, ny, nx)), indexing="ij")
    return [x * y ** a * z ** b * (x * x) ** c for c in range(order // 2 + 1)
            for a in range(order + 1) for b in range(order + 1) if a + b + 2 * c <= order]


def shading_difference(raw: np.ndarray, tissue: np.ndarray,
                       basis: Optional[List[np.ndarray]] = None, rounds: int = 3) -> np.ndarray:
    """The part of the mirror difference that smooth scanner shading explains.

    A slow shading across the head (position off the isocentre, beam hardening, a
    heel effect) makes one whole hemisphere a few HU darker than the other; in the
    mirror difference it is a smooth field odd in x. It is fitted by least squares to
    all tissue, dropping voxels that lie more than 2.5 robust SDs off the fit in later
    rounds (an infarct is local and is dropped), and subtracted. ``basis``: the
    :func:`_odd_basis` of ``raw``'s shape, when the caller fits more than once.
    """
    basis = _odd_basis(raw.shape) if basis is None else basis
    sel = tissue & (np.abs(basis[0]) > 0.08)
    if sel.sum() < MIN_FIT_VOXELS:
        return np.zeros_like(raw)
    a = np.stack([b[sel] for b in basis], axis=1)
    y = raw[sel]
    keep = np.ones(y.shape, bool)
    coef = np.zeros(len(basis))
    for _ in range(rounds):
        coef, *_ = np.linalg.lstsq(a[keep], y[keep], rcond=None)
        res = y - a @ coef
        mad = 1.4826 * float(np.median(np.abs(res[keep] - np.median(res[keep])))) + 1e-3
        keep = np.abs(res) <= 2.5 * mad
    return sum(c * b for c, b in zip(coef, basis)).astype(np.float32)


# ----------------------------------------------------------------------------- calls

def darkest_part(maps: EvidenceMaps, label: int, sigma_mm: float = DARK_PART_SIGMA_MM) -> Optional[float]:
    """The :data:`DARK_PART_PERCENTILE` th percentile (HU) of the region's evidence averaged
    over ``sigma_mm`` within its own tissue: how dark its darkest compact part is. An
    infarct of a third of a region barely moves the region's mean, and single voxels are
    too noisy; an average over about the infarct's size sees it. Only points with at least
    30 % of the best-supported point's weight count (not the region's rim)."""
    m = (maps.labels == label) & maps.tissue
    if m.sum() < 30:
        return None
    box = _region_box(m)
    mean, weight = _normalised(maps.evidence[box], m[box], sigma_mm)
    inside = m[box]
    values = mean[inside & (weight >= 0.3 * weight[inside].max())]
    return float(np.percentile(values, DARK_PART_PERCENTILE))


def _region_measures_steps(maps: EvidenceMaps, dark_parts: Sequence[str] = ("dark",)
                           ) -> "steps.Steps[Dict[int, dict]]":
    """Per region: tissue voxels' evidence and HU, its darkest parts, grey/white contrast;
    a step per 2 regions (each darkest part is a smoothing, the card's take two per region).
    ``dark_parts``: which of :data:`DARK_PART_SCALES_MM` to measure."""
    ml = GRID_MM ** 3 / 1000.0
    dense = np.zeros(regions.NUM_LABELS + 1) if maps.dense is None else \
        np.bincount(maps.labels[maps.dense], minlength=regions.NUM_LABELS + 1) * ml
    lab = maps.labels.ravel()
    keep = maps.tissue.ravel() & (lab > 0)
    idx = np.flatnonzero(keep)
    lab_k, ev_k, hu_k = lab[idx], maps.evidence.ravel()[idx], maps.hu.ravel()[idx]
    out = {}
    for i, r in enumerate(regions.REGIONS):
        if i % 2 == 1:
            yield
        sel = lab_k == r.label
        ev, hu = ev_k[sel], hu_k[sel]
        out[r.label] = {"n": int(sel.sum()), "ml": float(sel.sum() * ml), "ev": ev,
                        "dense_ml": float(dense[r.label]),
                        "mean": float(hu.mean()) if hu.size else None,
                        "gw": float(np.percentile(hu, 90) - np.percentile(hu, 10)) if hu.size > 10 else None,
                        **{name: darkest_part(maps, r.label, DARK_PART_SCALES_MM[name]) if sel.any() else None
                           for name in dark_parts}}
    return out


def _expected_diffs(measures: Dict[int, dict]) -> Dict[int, Optional[float]]:
    """Region mean minus the median mean of the regions of its kind (both sides)."""
    out: Dict[int, Optional[float]] = {}
    for r in regions.REGIONS:
        kind = aspects_card.KIND_OF_CODE[r.code]
        peers = [measures[q.label]["mean"] for q in regions.REGIONS
                 if aspects_card.KIND_OF_CODE[q.code] == kind and measures[q.label]["mean"] is not None
                 and measures[q.label]["ml"] >= MIN_MEASURED_ML]
        me = measures[r.label]
        out[r.label] = (me["mean"] - float(np.median(peers))) if me["mean"] is not None and len(peers) >= 2 \
            and me["ml"] >= MIN_MEASURED_ML else None
    return out


def region_values(me: dict, mirror: dict, expected: Optional[float]) -> Dict[str, Optional[float]]:
    """Every measure of :data:`aspects_card.MEASURES` that ``me`` allows (None where the
    region has too little tissue, or a dense lesion leaves its pair not assessed): the
    inputs of the call and of the benchmark's dumps."""
    ev = np.sort(me["ev"])
    if me["ml"] < MIN_MEASURED_ML or ev.size == 0 or dense_pair_ml(me, mirror) is not None:
        return {name: None for name in aspects_card.MEASURES}
    out: Dict[str, Optional[float]] = {name: me.get(name) for name in DARK_PART_SCALES_MM}
    out["mean"] = float(ev.mean())
    out.update({name: float(ev[:max(1, int(share * ev.size))].mean()) for name, share in LOW_SHARES.items()})
    out["frac"] = float((ev <= -VOXEL_DROP_HU).mean())
    out["expected"] = expected
    out["gw_loss"] = mirror["gw"] - me["gw"] if me["gw"] is not None and mirror["gw"] is not None else None
    return out


def dense_pair_ml(me: dict, mirror: dict) -> Optional[float]:
    """The larger dense-lesion volume (ml) of a region and its mirror when it leaves the
    pair not assessed (:data:`DENSE_LESION_ML`), else None."""
    most = max(me.get("dense_ml", 0.0), mirror.get("dense_ml", 0.0))
    return most if most >= DENSE_LESION_ML else None


def call_of_values(code: str, values: Dict[str, Optional[float]], card: aspects_card.ReadoutCard,
                   centre: Optional[Dict[str, float]] = None) -> Tuple[Optional[float], bool]:
    """(call score, called) of a region with these :func:`region_values`: the card's score
    from its threshold on, or a mean this far below its kind (:data:`EXPECTED_DROP_HU`).
    ``centre``: the scan's offsets (:func:`scan_centre`), for a centred card. The one place
    the call is decided, so a benchmark re-scoring dumped values with another card calls
    exactly what a read-out would."""
    if values.get("mean") is None:
        return None, False      # too little tissue measured
    score = card.score(code, values, centre)
    return score, _score_calls(score, card) or _below_its_kind(values.get("expected"))


def _score_calls(score: Optional[float], card: aspects_card.ReadoutCard) -> bool:
    return score is not None and score >= card.threshold


def _below_its_kind(expected: Optional[float]) -> bool:
    return expected is not None and expected <= -EXPECTED_DROP_HU


def scan_centre(card: aspects_card.ReadoutCard, values: Dict[int, Dict[str, Optional[float]]]) -> Dict[str, float]:
    """The scan's offset of each measure for a centred ``card`` ({} otherwise): ``values``
    maps every region's label to its :func:`region_values` (``aspects_card.scan_centre``)."""
    return card.scan_centre((regions.REGION_BY_LABEL[label].code, v) for label, v in values.items())


def call_region(r: regions.Region, me: dict, mirror: dict, expected: Optional[float],
                card: aspects_card.ReadoutCard, centre: Optional[Dict[str, float]] = None) -> RegionCall:
    """The evidence of one region, its call score and call, with the reasons in words
    (``centre``: the scan's offsets, :func:`scan_centre`)."""
    ml = GRID_MM ** 3 / 1000.0
    dense = dense_pair_ml(me, mirror)
    measured = me["ml"] >= MIN_MEASURED_ML and dense is None
    values = region_values(me, mirror, expected)
    frac = aff_ml = drop = score = None
    reasons: List[str] = []
    called = False
    if measured:
        ev = me["ev"]
        hit = ev <= -VOXEL_DROP_HU
        frac, aff_ml = values["frac"], float(hit.sum() * ml)
        drop = float(np.median(ev[hit])) if hit.any() else 0.0
        score, called = call_of_values(r.code, values, card, centre)
        if _score_calls(score, card):
            reasons.append(f"call score {score:.1f} (called from {card.threshold:.1f}): "
                           + "; ".join(card.reasons(r.code, values, centre) or ["several small differences together"]))
        if _below_its_kind(expected):
            reasons.append(f"{-expected:.1f} HU below the other {aspects_card.KIND_OF_CODE[r.code]} regions")
        if score is None:
            reasons.append(f"not scored: the mirror region holds almost no measured tissue ({mirror['ml']:.2f} ml), "
                           "nothing to compare with: read the images")
        else:
            unmeasured = [aspects_card.CONTEXT_MEASURES[f].format(kind=aspects_card.KIND_OF_CODE[r.code])
                          for f in card.missing(values)]   # only context measures: it was scored
            if unmeasured:
                reasons.append(f"scored without {' and '.join(unmeasured)}, counted as normal")
        gw_loss = values["gw_loss"]
        if gw_loss is not None and gw_loss >= GW_LOSS_HU:
            reasons.append(f"grey/white contrast {gw_loss:.1f} HU lower than the mirror side")
    elif dense is not None:
        where = r.segment_name if me.get("dense_ml", 0.0) >= mirror.get("dense_ml", 0.0) else "the mirror region"
        reasons.append(f"not assessed: a dense lesion ({dense:.1f} ml, brighter than the other side) in {where}, "
                       "a haemorrhage or calcification; its rim makes the comparison with the mirror side "
                       "meaningless: read the images")
    else:
        reasons.append(f"too little tissue measured ({me['ml']:.1f} ml): not called")
    return RegionCall(label=r.label, region=r.segment_name, code=r.code, side=r.side,
                      parenchyma_ml=me["ml"], affected_fraction=frac, affected_ml=aff_ml,
                      median_drop_hu=drop, darkest_part_hu=values["dark"],
                      diff_to_mirror_hu=values["mean"], diff_to_expected_hu=expected if measured else None,
                      gw_contrast_hu=me["gw"], gw_loss_hu=values["gw_loss"], call_score=score,
                      called=called, reasons=reasons, measures=values, dense_lesion_ml=dense)


def propose_side(calls: Sequence[RegionCall]) -> Tuple[str, str]:
    """The side with more affected regions (the clinician's overrides counted), then more
    darker tissue, and why; ties go to the darker side."""
    ml = {s: sum(c.affected_ml or 0.0 for c in calls if c.side == s and c.affected) for s in SIDES}
    n = {s: sum(1 for c in calls if c.side == s and c.affected) for s in SIDES}
    if n["left"] != n["right"] or ml["left"] != ml["right"]:
        side = max(SIDES, key=lambda s: (n[s], ml[s]))
        return side, (f"{n[side]} region(s) affected on the {side} ({ml[side]:.1f} ml darker than "
                      f"the mirror side) against {n[_other(side)]} on the {_other(side)}")
    dark = {s: float(np.mean([c.diff_to_mirror_hu for c in calls if c.side == s
                              and c.diff_to_mirror_hu is not None] or [0.0])) for s in SIDES}
    side = min(SIDES, key=lambda s: dark[s])
    return side, (f"no region called; the {side} side is {abs(dark[side]):.1f} HU darker on "
                  "average (weak): choose the side from the clinical findings")


def _other(side: str) -> str:
    return "right" if side == "left" else "left"


def evidence_on_scan(maps: EvidenceMaps, scan: sitk.Image) -> sitk.Image:
    """The evidence map resampled onto the scan grid (float32 HU, 0 outside tissue)."""
    img = sitk.GetImageFromArray(maps.evidence)
    img.CopyInformation(maps.grid)
    return sitk.Resample(img, scan, sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, 0.0,
                         sitk.sitkFloat32)


def assess(ct: sitk.Image, labels: sitk.Image, side: Optional[str] = None,
           with_evidence_map: bool = True, card: Optional[aspects_card.ReadoutCard] = None) -> AspectsResult:
    """The ASPECTS read-out of ``ct`` (HU) with its ASPECTS ``labels`` (same grid).

    ``side``: the symptomatic side if the clinician knows it; else proposed. ``card``: the
    read-out card (default: the bundled one).
    """
    return steps.run_steps(assess_steps(ct, labels, side, with_evidence_map, card=card))


def assess_steps(ct: sitk.Image, labels: sitk.Image, side: Optional[str] = None,
                 with_evidence_map: bool = True, progress: Optional[steps.ProgressFn] = None,
                 card: Optional[aspects_card.ReadoutCard] = None) -> "steps.Steps[AspectsResult]":
    """:func:`assess` in short steps (see :mod:`steps`). The input is checked here, before
    the first step, so that a bad input fails at once with nothing started."""
    from .statistics import _check_same_grid, labels_array
    _check_same_grid(ct, labels, "label image")
    labels_array(labels)
    if side is not None and side not in SIDES:
        raise InputError(f"unknown side {side!r}.", "Use left, right, or leave it out to have it proposed.")
    card = card or bundled_card()   # a missing or broken card fails here, before any step
    warn_if_card_mismatch(card)
    return steps.within(numpy_pages.without_numpy_huge_pages,   # as the segmentation's steps
                        _assess_steps(ct, labels, side, with_evidence_map,
                                      progress or (lambda fraction, message: None), card))


def _assess_steps(ct: sitk.Image, labels: sitk.Image, side: Optional[str], with_evidence_map: bool,
                  tell: steps.ProgressFn, card: aspects_card.ReadoutCard) -> "steps.Steps[AspectsResult]":
    maps = yield from evidence_maps_steps(ct, labels, tell)
    tell(0.9, "ASPECTS: calling the regions")
    result = yield from read_out_steps(maps, side, card)
    if with_evidence_map:
        yield
        result.evidence = evidence_on_scan(maps, ct)
    return result


def read_out(maps: EvidenceMaps, side: Optional[str] = None,
             card: Optional[aspects_card.ReadoutCard] = None, all_measures: bool = False) -> AspectsResult:
    """The calls, the side and the scores from the evidence maps (no evidence volume).
    ``card``: the read-out card (default: the bundled one); ``all_measures``: measure every
    darkest-part scale, not only the card's (for fitting a card)."""
    return steps.run_steps(read_out_steps(maps, side, card, all_measures))


def evidence_spread(maps: EvidenceMaps) -> float:
    """Robust standard deviation (HU) of the evidence over all regions' tissue."""
    ev = maps.evidence[maps.tissue & (maps.labels > 0)]
    return float(1.4826 * np.median(np.abs(ev))) if ev.size else 0.0


def read_out_steps(maps: EvidenceMaps, side: Optional[str] = None,
                   card: Optional[aspects_card.ReadoutCard] = None,
                   all_measures: bool = False) -> "steps.Steps[AspectsResult]":
    """:func:`read_out` in short steps."""
    card = card or bundled_card()
    dark_parts = list(DARK_PART_SCALES_MM) if all_measures else \
        [m for m in aspects_card.measure_names(card, ("dark",)) if m in DARK_PART_SCALES_MM]
    measures = yield from _region_measures_steps(maps, dark_parts)
    expected = _expected_diffs(measures)
    centre = scan_centre(card, {r.label: region_values(measures[r.label], measures[r.mirror_label], expected[r.label])
                                for r in regions.REGIONS})
    calls = [call_region(r, measures[r.label], measures[r.mirror_label], expected[r.label], card, centre)
             for r in regions.REGIONS]
    if side is None:
        side, reason = propose_side(calls)
        source = "proposed"
    else:
        source, reason = "user", "chosen by the user"
    mismatch = card_settings_mismatch(card)
    settings = {**measure_settings(), "expected_drop_hu": EXPECTED_DROP_HU,
                "card": card.source, "card_measures": list(card.features),
                "card_threshold": card.threshold, "card_trained_on": card.trained_on.get("summary", ""),
                "card_centred": card.centred, "scan_centre": {f: round(v, 4) for f, v in centre.items()},
                "card_readout": ("not recorded in the card" if not card.readout
                                 else "differs from this engine's" if mismatch else "matches"),
                "card_readout_mismatch": mismatch}
    return AspectsResult(calls, side, source, reason, maps.level, evidence_spread_hu=evidence_spread(maps),
                         settings=settings)


#: Settings added to :func:`measure_settings` after cards recorded their ``readout`` block,
#: with the value every read-out had before: a card that does not name one was made with it.
SETTINGS_BEFORE_RECORDED: Dict[str, Any] = {"shading_order": 2, "fine_shading_max_left_out": 0.33}


def measure_settings() -> Dict[str, Any]:
    """The settings that change what a region's measures read (JSON values).

    A read-out card's normal values and threshold hold only for measures made with these
    settings, so ``aspects_bench --dump`` records them, ``aspects_fit`` writes them into the
    card's ``readout`` block and :func:`card_settings_mismatch` compares them.
    """
    return {"grid_mm": GRID_MM, "region_edge_mm": REGION_EDGE_MM, "mask_sigma_mm": MASK_SIGMA_MM,
            "evidence_sigma_mm": EVIDENCE_SIGMA_MM,
            "tissue_window_hu": list(TISSUE_WINDOW_HU), "csf_margin_mm": CSF_MARGIN_MM,
            "csf_gap_hu": CSF_GAP_HU, "dense_margin_mm": DENSE_MARGIN_MM, "dense_gap_hu": DENSE_GAP_HU,
            "spot_gap_hu": SPOT_GAP_HU, "spot_sigma_mm": SPOT_SIGMA_MM, "spot_margin_mm": SPOT_MARGIN_MM,
            "mirror_weight": MIRROR_WEIGHT, "shading_pair_exclude_hu": PAIR_EXCLUDE_HU,
            "shading_order": SHADING_ORDER, "fine_shading_max_left_out": FINE_SHADING_MAX_LEFT_OUT,
            "voxel_drop_hu": VOXEL_DROP_HU, "dark_part_scales_mm": dict(DARK_PART_SCALES_MM),
            "dark_part_sigma_mm": DARK_PART_SIGMA_MM, "dark_part_percentile": DARK_PART_PERCENTILE,
            "low_shares": dict(LOW_SHARES), "min_measured_ml": MIN_MEASURED_ML}


def card_settings_mismatch(card: aspects_card.ReadoutCard) -> List[str]:
    """The read-out settings (``name: card's -> this engine's``) that differ between the
    card's ``readout`` block and :func:`measure_settings`; empty when they agree or the
    card does not record them (cards fitted before the block existed)."""
    here = json.loads(json.dumps(measure_settings()))   # the JSON form the card holds
    said = {**SETTINGS_BEFORE_RECORDED, **card.readout}
    return [f"{k}: {said.get(k)!r} -> {v!r}" for k, v in here.items()
            if card.readout and said.get(k) != v]


def warn_if_card_mismatch(card: aspects_card.ReadoutCard) -> None:
    """One :class:`InputWarning` when ``card`` was fitted on measures made with other
    read-out settings: its normal values and threshold then do not hold, and the calls
    may be too many or too few."""
    diff = card_settings_mismatch(card)
    if diff:
        warnings.warn(InputWarning(
            f"the ASPECTS read-out card {card.source or '(given)'} was fitted with other read-out "
            f"settings than this engine uses ({'; '.join(diff)}), so its calls may be too many or too "
            "few; refit it with 'python -m training aspects_fit' on dumps made by this version"),
            stacklevel=3)


@functools.lru_cache(maxsize=1)
def bundled_card() -> aspects_card.ReadoutCard:
    """The bundled read-out card, read once per process."""
    return aspects_card.load_card()
