"""The result quality check (DESIGN.md section 8): every result passes it or says why not.

A network given a scan it cannot read (a half-blanked head, a wrong pose, damaged
weights) still returns labels, and an empty or lopsided map would otherwise be written
with exit 0. :func:`check_labels` measures the regions' volumes; no region at all is an
:class:`InputError` for the front ends (:func:`require_regions`: nothing is written),
while a missing region, a total or regional volume outside the range of the model card's
``quality`` section, or a strong left/right imbalance become one :class:`QualityWarning`
and a ``N-qc.json`` next to the outputs.
Without a ``quality`` section (a user's own model) only the empty result is checked.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from . import regions
from .steps import Steps, run_steps
from .errors import InputError, InputWarning


class QualityWarning(InputWarning):
    """The result looks implausible; it is written, with its ``N-qc.json``."""


@dataclass
class QualityReport:
    """Region volumes (ml) of one result and what looks wrong with them."""

    volumes_ml: Dict[str, float]
    total_ml: float
    left_ml: float
    right_ml: float
    problems: List[str] = field(default_factory=list)
    ranges: Dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def empty(self) -> bool:
        return self.total_ml == 0

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "problems": self.problems, "total_ml": round(self.total_ml, 2),
                           "left_ml": round(self.left_ml, 2), "right_ml": round(self.right_ml, 2),
                           "volumes_ml": self.volumes_ml, "ranges": self.ranges}, indent=2)


def merge_ranges(sections: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One ``quality`` section for a run of several models: the first card's that has one
    (the models of a mode are trained on the same data, so their ranges agree)."""
    return next((dict(s) for s in sections if s), {})


def region_volumes(labels: sitk.Image) -> Dict[int, float]:
    """Label id -> volume in ml, for ids 1..20 (0 where a region is absent)."""
    return run_steps(region_volumes_steps(labels))


def region_volumes_steps(labels: sitk.Image, slab_voxels: int = 4 * 1024 * 1024
                         ) -> "Steps[Dict[int, float]]":
    """:func:`region_volumes` a slab of slices per step: counting a 512 x 512 x 110 label
    image at once takes 0.6 s (bincount widens every voxel to 64 bits), so only the
    labelled voxels (a few per cent of a scan) are counted; background is not a region."""
    arr = sitk.GetArrayViewFromImage(labels)
    counts = np.zeros(max(regions.NUM_LABELS + 1, 256), np.int64)
    step = max(1, slab_voxels // max(1, arr[0].size))
    for z in range(0, arr.shape[0], step):
        slab = arr[z:z + step].ravel()
        counts += np.bincount(slab[slab != 0], minlength=counts.size)[:counts.size]
        yield
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    return {r.label: float(counts[r.label]) * voxel_ml for r in regions.REGIONS}


def _problems(vol: Dict[int, float], left: float, right: float, ranges: Dict[str, Any]) -> List[str]:
    """What is implausible about the volumes, given the card's ranges (short phrases)."""
    found = []
    if ranges.get("all_regions"):
        missing = [r.segment_name for r in regions.REGIONS if vol[r.label] == 0]
        if missing:
            found.append(f"{len(missing)} regions missing ({', '.join(missing[:4])}"
                         f"{', ...' if len(missing) > 4 else ''})")
    lo, hi = ranges.get("total_ml", (0.0, float("inf")))
    if not lo <= left + right <= hi:
        found.append(f"total volume {left + right:.0f} ml outside {lo:g}-{hi:g} ml")
    rlo, rhi = ranges.get("region_ml", (0.0, float("inf")))
    odd = [r.segment_name for r in regions.REGIONS if vol[r.label] and not rlo <= vol[r.label] <= rhi]
    if odd:
        found.append(f"{len(odd)} region volumes outside {rlo:g}-{rhi:g} ml ({', '.join(odd[:3])})")
    ratio = ranges.get("max_lr_ratio")
    if ratio and max(left, right) > ratio * max(min(left, right), 1e-9):
        found.append(f"left {left:.0f} ml vs right {right:.0f} ml (more than {ratio:g}x apart)")
    return found


def check_labels(labels: sitk.Image, ranges: Optional[Dict[str, Any]] = None,
                 name: str = "the scan", volumes: Optional[Dict[int, float]] = None) -> QualityReport:
    """Measure a result and warn once (:class:`QualityWarning`) when it is implausible for
    the card's ``ranges``. An empty result is only marked: front ends refuse it with
    :func:`require_regions`, while training's evaluation must be able to score an early,
    still empty model. ``volumes`` (from :func:`region_volumes_steps`) saves the count."""
    ranges = dict(ranges or {})
    vol = region_volumes(labels) if volumes is None else volumes
    left = sum(v for k, v in vol.items() if k <= regions.SIDE_OFFSET)
    right = sum(v for k, v in vol.items() if k > regions.SIDE_OFFSET)
    report = QualityReport(volumes_ml={r.segment_name: round(vol[r.label], 3) for r in regions.REGIONS},
                           total_ml=left + right, left_ml=left, right_ml=right, ranges=ranges)
    if report.empty:
        report.problems = ["no region found"]
        return report
    report.problems = _problems(vol, left, right, ranges)
    if report.problems:
        warnings.warn(f"the result of {name} looks implausible: {'; '.join(report.problems)}. "
                      "Check it before use (details in the -qc.json file).", QualityWarning, stacklevel=2)
    return report


def require_regions(report: Optional[QualityReport], name: str = "the scan") -> None:
    """The front ends' rule (CLI, panel): a result without any region is an error and is
    not written. A wrong pose, a scan without brain or a broken model are the usual causes."""
    if report is not None and report.empty:
        raise InputError(f"no ASPECTS region was found in {name}; nothing was written.",
                         "Check that it is a non-contrast head CT covering the brain, the head pose "
                         "(transform), and the model folder.")
