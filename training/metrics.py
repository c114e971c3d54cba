"""Segmentation metrics for the 20 ASPECTS regions, all derived from one confusion matrix.

Everything here is computed from the ``21 x 21`` confusion matrix (rows: truth, columns:
prediction, background included) because one ``np.bincount`` over a joint label index
``truth * 21 + prediction`` is a single pass over the voxels: on a 512x512x110 scan that
is a fraction of a second, where a mask per region (20 regions x 2 masks x 29 M voxels)
would take seconds per model and case. Dice, IoU, misclassification, FP/FN ratios and the
left/right check then cost nothing, and summing matrices over cases pools a dataset.

Definitions (per region ``k``, ``m`` its mirror on the other side):

- ``tp = C[k, k]``, ``fn = C[k, :].sum() - tp``, ``fp = C[:, k].sum() - tp``.
- Dice ``2 tp / (2 tp + fp + fn)``, IoU ``tp / (tp + fp + fn)``. A region absent from
  both truth and prediction has no defined overlap: its Dice/IoU are NaN and it is
  *skipped* by :func:`mean_dice` (counting it as 1 would reward a model for every region
  a scan does not show; counting it as 0 would punish it for being right).
- misclassified: the fraction of the region's true voxels labelled as *another region*
  (``C[k, 1:].sum() - tp``); missed: the fraction labelled background (``C[k, 0]``).
  The overall misclassification rate is the same over all true foreground voxels.
- FP/FN ratio ``fp / fn``: above 1 the model over-segments the region, below 1 it
  under-segments (``inf`` if fn is 0 and fp is not, NaN if both are 0).
- Left/right check: Dice of the prediction's region ``k`` against the true ``k`` versus
  Dice of the prediction's *mirrored* region ``m`` against the true ``k``
  (``2 C[k, m] / (|truth k| + |pred m|)``). A model that confuses the sides scores the
  second higher. A region is "side-correct" only if the true-side Dice is strictly
  higher; ties (both 0: the region was not found at all) count as not shown correct,
  because the check must show the side was found, not merely not contradicted. Regions
  absent from the truth are skipped.

numpy only: the training tree may use more, but metrics must stay cheap to import and
identical wherever they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from BrainLobeSegLib import regions

NUM_CLASSES = regions.NUM_LABELS + 1
#: Foreground label ids 1..20, the order of every per-region array below.
REGION_LABELS = np.array(regions.LABELS, dtype=np.int64)
MIRROR = np.array(regions.mirror_lut(), dtype=np.int64)
_CHUNK = 1 << 22   # voxels per bincount pass: bounds the int64 index buffer to 32 MB


def confusion_matrix(truth: np.ndarray, pred: np.ndarray,
                     num_classes: int = NUM_CLASSES) -> np.ndarray:
    """``(num_classes, num_classes)`` int64 voxel counts, rows truth, columns prediction.

    Both arrays must have the same shape and integer labels in ``0..num_classes-1``;
    anything else raises ``ValueError`` (a label 255 from a padded resample, or a
    17-label file, must not be silently folded into another class). Works in chunks so
    a 29 M voxel scan needs ~32 MB of scratch instead of a full int64 copy.
    """
    truth = np.asarray(truth)
    pred = np.asarray(pred)
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    for name, arr in (("truth", truth), ("prediction", pred)):
        if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_:
            raise ValueError(f"{name} labels must be integers, not {arr.dtype}")
    t = truth.reshape(-1)
    p = pred.reshape(-1)
    counts = np.zeros(num_classes * num_classes, np.int64)
    for start in range(0, t.size, _CHUNK):
        tc = t[start:start + _CHUNK]
        pc = p[start:start + _CHUNK]
        for name, c in (("truth", tc), ("prediction", pc)):
            if c.size and (int(c.max()) >= num_classes or int(c.min()) < 0):
                bad = int(c.max()) if int(c.max()) >= num_classes else int(c.min())
                raise ValueError(f"{name} holds label {bad}; labels must be 0..{num_classes - 1}")
        joint = tc.astype(np.intp) * num_classes
        joint += pc
        counts += np.bincount(joint, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` with NaN where ``den`` is 0 (undefined, not zero)."""
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


@dataclass
class RegionScores:
    """Per-region arrays (index ``i`` is label ``REGION_LABELS[i]``) from one matrix."""

    dice: np.ndarray
    iou: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    fp_fn_ratio: np.ndarray
    misclassified: np.ndarray   # share of true voxels given another region's label
    missed: np.ndarray          # share of true voxels given background
    dice_mirror: np.ndarray     # Dice of the mirrored predicted region against the truth
    present: np.ndarray         # bool: region in the truth


def region_scores(cm: np.ndarray) -> RegionScores:
    """Dice, IoU, counts, rates and the mirrored Dice of every region, vectorised."""
    cm = np.asarray(cm, np.int64)
    truth_n = cm.sum(axis=1)   # |truth == c|
    pred_n = cm.sum(axis=0)    # |pred == c|
    k = REGION_LABELS
    tp = cm[k, k]
    fn = truth_n[k] - tp
    fp = pred_n[k] - tp
    wrong_region = cm[k, 1:].sum(axis=1) - tp
    fp_fn = _ratio(fp, fn)
    fp_fn[(fn == 0) & (fp > 0)] = np.inf
    return RegionScores(
        dice=_ratio(2 * tp, 2 * tp + fp + fn),
        iou=_ratio(tp, tp + fp + fn),
        tp=tp, fp=fp, fn=fn, fp_fn_ratio=fp_fn,
        misclassified=_ratio(wrong_region, truth_n[k]),
        missed=_ratio(cm[k, 0], truth_n[k]),
        dice_mirror=_ratio(2 * cm[k, MIRROR[k]], truth_n[k] + pred_n[MIRROR[k]]),
        present=truth_n[k] > 0)


def mean_dice(dice: np.ndarray) -> float:
    """Mean over the regions that have a Dice (absent in truth and prediction: skipped).

    NaN when no region has one (an empty truth and an empty prediction)."""
    d = np.asarray(dice, np.float64)
    d = d[~np.isnan(d)]
    return float(d.mean()) if d.size else float("nan")


def misclassification_rate(cm: np.ndarray) -> float:
    """Share of all true foreground voxels labelled as a *different* region."""
    cm = np.asarray(cm, np.int64)
    fg = cm[1:, :].sum()
    wrong = cm[1:, 1:].sum() - np.trace(cm[1:, 1:])
    return float(wrong / fg) if fg else float("nan")


def missed_rate(cm: np.ndarray) -> float:
    """Share of all true foreground voxels labelled background."""
    cm = np.asarray(cm, np.int64)
    fg = cm[1:, :].sum()
    return float(cm[1:, 0].sum() / fg) if fg else float("nan")


@dataclass
class LRCheck:
    """The left/right check of one prediction: per region (true-side, mirrored) Dice."""

    pairs: Dict[int, Tuple[float, float]] = field(default_factory=dict)  # label -> (true, mirror)
    confused: List[int] = field(default_factory=list)  # labels not shown side-correct

    @property
    def confusion_free(self) -> bool:
        return not self.confused


def lr_check(cm: np.ndarray) -> LRCheck:
    """For every region in the truth: is the Dice against its true side strictly higher
    than the Dice of the mirrored label? (See the module docstring for ties.)"""
    s = region_scores(cm)
    out = LRCheck()
    for i, label in enumerate(REGION_LABELS.tolist()):
        if not s.present[i]:
            continue
        true_d, mirror_d = float(s.dice[i]), float(s.dice_mirror[i])
        out.pairs[label] = (true_d, mirror_d)
        if not true_d > mirror_d:
            out.confused.append(label)
    return out


@dataclass
class Evaluation:
    """Everything about one prediction against one truth (or a pooled set of them)."""

    confusion: np.ndarray
    scores: RegionScores
    lr: LRCheck
    mean_dice: float
    mean_iou: float
    misclassification_rate: float
    missed_rate: float

    def to_json(self, include_confusion: bool = False) -> dict:
        """Plain data keyed by segment name (``"M4 left"``), NaN/inf written as null."""
        s = self.scores
        per_region = {}
        for i, r in enumerate(regions.REGIONS):
            per_region[r.segment_name] = {
                "label": r.label, "dice": json_number(s.dice[i]), "iou": json_number(s.iou[i]),
                "tp": int(s.tp[i]), "fp": int(s.fp[i]), "fn": int(s.fn[i]),
                "fp_fn_ratio": json_number(s.fp_fn_ratio[i]),
                "misclassified": json_number(s.misclassified[i]),
                "missed": json_number(s.missed[i]),
                "dice_mirror": json_number(s.dice_mirror[i])}
        out = {"mean_dice": json_number(self.mean_dice), "mean_iou": json_number(self.mean_iou),
               "misclassification_rate": json_number(self.misclassification_rate),
               "missed_rate": json_number(self.missed_rate),
               "lr_confusion_free": self.lr.confusion_free,
               "lr_confused": [regions.REGION_BY_LABEL[k].segment_name for k in self.lr.confused],
               "regions": per_region}
        if include_confusion:
            out["confusion_matrix"] = self.confusion.tolist()
        return out


def evaluate_confusion(cm: np.ndarray) -> Evaluation:
    """All metrics from one (possibly summed) confusion matrix."""
    s = region_scores(cm)
    return Evaluation(confusion=np.asarray(cm, np.int64), scores=s, lr=lr_check(cm),
                      mean_dice=mean_dice(s.dice), mean_iou=mean_dice(s.iou),
                      misclassification_rate=misclassification_rate(cm),
                      missed_rate=missed_rate(cm))


def evaluate_labels(truth: np.ndarray, pred: np.ndarray) -> Evaluation:
    """All metrics of ``pred`` against ``truth`` (same-shape integer label arrays)."""
    return evaluate_confusion(confusion_matrix(truth, pred))


def json_number(value: float) -> Optional[float]:
    """A float for JSON: NaN and infinities become null (JSON has neither)."""
    v = float(value)
    return v if np.isfinite(v) else None
