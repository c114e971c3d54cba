"""training.metrics on hand-made label arrays whose answers are known in closed form.

The bincount path is checked against a plain per-voxel loop, because every number the
evaluation report and the model cards carry comes out of that one matrix.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from BrainLobeSegLib import regions
from training import metrics as M

SHAPE = (6, 20, 40)   # z, y, x; x < 20 is one side, x >= 20 the other
L_CAUDATE = regions.region("C", "left").label
R_CAUDATE = regions.region("C", "right").label
L_M4 = regions.region("M4", "left").label


def symmetric_truth() -> np.ndarray:
    """Every region as a box on the left (x >= 20, LPS) and its mirror box on the right."""
    t = np.zeros(SHAPE, np.uint8)
    for i, r in enumerate(regions.REGIONS[:10]):
        y0 = 2 * (i % 10)
        t[1:5, y0:y0 + 2, 22:30] = r.label                  # left side of the patient
        t[1:5, y0:y0 + 2, 10:18] = r.mirror_label           # mirror position (x -> 39 - x)
    return t


def naive_confusion(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
    cm = np.zeros((M.NUM_CLASSES, M.NUM_CLASSES), np.int64)
    for t, p in zip(truth.ravel().tolist(), pred.ravel().tolist()):
        cm[t, p] += 1
    return cm


def test_perfect_prediction_scores_one():
    t = symmetric_truth()
    e = M.evaluate_labels(t, t)
    assert np.all(e.scores.dice == 1.0) and np.all(e.scores.iou == 1.0)
    assert e.mean_dice == 1.0 and e.mean_iou == 1.0
    assert e.misclassification_rate == 0.0 and e.missed_rate == 0.0
    assert np.all(e.scores.misclassified == 0) and np.all(e.scores.missed == 0)
    assert e.lr.confusion_free and len(e.lr.pairs) == regions.NUM_LABELS
    assert all(true == 1.0 and mirror == 0.0 for true, mirror in e.lr.pairs.values())
    assert np.all(np.isnan(e.scores.fp_fn_ratio))       # no errors at all: 0 / 0


def test_disjoint_prediction_scores_zero():
    t = np.zeros(SHAPE, np.uint8)
    p = np.zeros(SHAPE, np.uint8)
    t[:, :5, :5] = L_M4
    p[:, 10:, 30:] = L_M4
    e = M.evaluate_labels(t, p)
    i = L_M4 - 1
    assert e.scores.dice[i] == 0.0 and e.scores.iou[i] == 0.0
    assert e.scores.missed[i] == 1.0 and e.scores.misclassified[i] == 0.0
    assert e.mean_dice == 0.0
    assert e.scores.fp_fn_ratio[i] == pytest.approx((10 * 6 * 10) / (5 * 5 * 6))


def test_shifted_box_gives_the_analytic_dice():
    """A box of a voxels along x shifted by s: overlap (a - s), Dice 1 - s/a,
    IoU (a - s)/(a + s)."""
    a, s = 12, 3
    t = np.zeros(SHAPE, np.uint8)
    p = np.zeros(SHAPE, np.uint8)
    t[1:4, 2:9, 5:5 + a] = L_CAUDATE
    p[1:4, 2:9, 5 + s:5 + s + a] = L_CAUDATE
    e = M.evaluate_labels(t, p)
    assert e.scores.dice[L_CAUDATE - 1] == pytest.approx(1 - s / a)
    assert e.scores.iou[L_CAUDATE - 1] == pytest.approx((a - s) / (a + s))
    assert e.scores.fp_fn_ratio[L_CAUDATE - 1] == pytest.approx(1.0)
    assert e.mean_dice == pytest.approx(1 - s / a)      # the 19 absent regions are skipped


def test_absent_regions_are_skipped_not_counted():
    t = np.zeros(SHAPE, np.uint8)
    t[0, 0, :4] = L_CAUDATE
    e = M.evaluate_labels(t, t)
    assert e.scores.dice[L_CAUDATE - 1] == 1.0
    assert np.isnan(e.scores.dice).sum() == regions.NUM_LABELS - 1
    assert e.mean_dice == 1.0
    assert list(e.lr.pairs) == [L_CAUDATE]
    assert np.isnan(M.evaluate_labels(np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)).mean_dice)


def test_swapped_side_labels_flag_left_right_confusion():
    """Right voxels, wrong side names: every region's mirrored Dice is 1, true Dice 0."""
    t = symmetric_truth()
    p = np.array(regions.mirror_lut(), np.uint8)[t]
    e = M.evaluate_labels(t, p)
    assert not e.lr.confusion_free
    assert sorted(e.lr.confused) == regions.LABELS
    assert all(true == 0.0 and mirror == 1.0 for true, mirror in e.lr.pairs.values())
    assert e.misclassification_rate == 1.0


def test_mirrored_image_flags_and_mirrored_labels_clear_the_check():
    """Flipping the picture left-right without swapping names is LR confusion; flipping
    and swapping names (what a correct model does on a mirrored head) is not."""
    t = symmetric_truth()
    flipped = t[..., ::-1]
    assert not M.evaluate_labels(t, flipped).lr.confusion_free
    swapped_back = np.array(regions.mirror_lut(), np.uint8)[flipped]
    e = M.evaluate_labels(t, swapped_back)
    assert e.lr.confusion_free and e.mean_dice == 1.0


def test_partial_side_errors_are_compared_per_region():
    """Dice against the mirror counts only the mirrored label's voxels."""
    t = np.zeros(SHAPE, np.uint8)
    t[:, :, 22:30] = L_CAUDATE
    p = t.copy()
    p[:, :, 22:25] = R_CAUDATE         # 3 of 8 columns named with the other side
    e = M.evaluate_labels(t, p)
    true_d, mirror_d = e.lr.pairs[L_CAUDATE]
    n = t.size // SHAPE[2] * 8
    assert true_d == pytest.approx(2 * (n * 5 / 8) / (n + n * 5 / 8))
    assert mirror_d == pytest.approx(2 * (n * 3 / 8) / (n + n * 3 / 8))
    assert e.lr.confusion_free
    p[:, :, 22:28] = R_CAUDATE         # now 6 of 8
    assert M.evaluate_labels(t, p).lr.confused == [L_CAUDATE]


def test_region_found_nowhere_is_not_shown_side_correct():
    """Both Dice 0 is a tie: the check cannot show the side was found."""
    t = np.zeros(SHAPE, np.uint8)
    t[:, :4, :4] = L_CAUDATE
    e = M.evaluate_labels(t, np.zeros_like(t))
    assert e.lr.pairs[L_CAUDATE] == (0.0, 0.0) and e.lr.confused == [L_CAUDATE]


def test_misclassified_missed_and_fp_fn_ratio():
    t = np.zeros((1, 1, 200), np.uint8)
    t[0, 0, :100] = L_CAUDATE
    p = t.copy()
    p[0, 0, :30] = L_M4           # 30 % given another region
    p[0, 0, 30:50] = 0            # 20 % missed
    p[0, 0, 150:160] = L_CAUDATE  # 10 false positives
    e = M.evaluate_labels(t, p)
    i = L_CAUDATE - 1
    assert e.scores.misclassified[i] == pytest.approx(0.3)
    assert e.scores.missed[i] == pytest.approx(0.2)
    assert (e.scores.tp[i], e.scores.fp[i], e.scores.fn[i]) == (50, 10, 50)
    assert e.scores.fp_fn_ratio[i] == pytest.approx(0.2)
    assert e.misclassification_rate == pytest.approx(0.3)
    assert e.missed_rate == pytest.approx(0.2)
    # a region predicted where the truth has none of it: fn 0, fp > 0 -> infinite ratio
    assert np.isinf(e.scores.fp_fn_ratio[L_M4 - 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bincount_equals_a_naive_loop(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(3, 17, 3))
    t = rng.integers(0, M.NUM_CLASSES, shape).astype(np.uint8)
    p = rng.integers(0, M.NUM_CLASSES, shape).astype(np.uint8)
    expected = naive_confusion(t, p)
    assert np.array_equal(M.confusion_matrix(t, p), expected)
    monkeypatch.setattr(M, "_CHUNK", 97)      # many chunks, a ragged last one
    assert np.array_equal(M.confusion_matrix(t, p), expected)
    # and every derived number agrees with masks built the slow way
    s = M.region_scores(expected)
    for i, label in enumerate(regions.LABELS):
        tm, pm = t == label, p == label
        denom = tm.sum() + pm.sum()
        if denom:
            assert s.dice[i] == pytest.approx(2 * (tm & pm).sum() / denom)
        mirror = regions.REGION_BY_LABEL[label].mirror_label
        mm = p == mirror
        if tm.sum() + mm.sum():
            assert s.dice_mirror[i] == pytest.approx(2 * (tm & mm).sum() / (tm.sum() + mm.sum()))


def test_other_integer_types_and_orders_are_accepted():
    rng = np.random.default_rng(5)
    t = rng.integers(0, M.NUM_CLASSES, (4, 5, 6))
    p = rng.integers(0, M.NUM_CLASSES, (4, 5, 6)).astype(np.int16)
    ref = naive_confusion(t, p)
    assert np.array_equal(M.confusion_matrix(t, p), ref)
    assert np.array_equal(M.confusion_matrix(np.asfortranarray(t), p[...]), ref)
    assert np.array_equal(M.confusion_matrix(t.transpose(2, 1, 0), p.transpose(2, 1, 0)), ref)


@pytest.mark.parametrize("truth, pred, message", [
    (np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), "shape"),
    (np.full((2, 2, 2), 21, np.uint8), np.zeros((2, 2, 2), np.uint8), "label 21"),
    (np.zeros((2, 2, 2), np.uint8), np.full((2, 2, 2), 255, np.uint8), "label 255"),
    (np.zeros((2, 2, 2), np.int16), np.full((2, 2, 2), -1, np.int16), "label -1"),
    (np.zeros((2, 2, 2), np.float32), np.zeros((2, 2, 2), np.uint8), "integers"),
])
def test_bad_inputs_are_refused(truth, pred, message):
    with pytest.raises(ValueError, match=message):
        M.confusion_matrix(truth, pred)


def test_pooled_matrices_add_up():
    t = symmetric_truth()
    p = t.copy()
    p[:, :, 22:24] = 0
    one = M.confusion_matrix(t, p)
    pooled = M.evaluate_confusion(one + M.confusion_matrix(t, t))
    assert pooled.confusion.sum() == 2 * t.size
    assert pooled.missed_rate == pytest.approx(M.missed_rate(one) / 2)


def test_to_json_is_strict_json_keyed_by_segment_name():
    t = np.zeros(SHAPE, np.uint8)
    t[0, 0, :4] = L_CAUDATE
    p = t.copy()
    p[0, 1, :4] = L_M4                       # infinite FP/FN ratio for M4 left
    data = M.evaluate_labels(t, p).to_json(include_confusion=True)
    text = json.dumps(data, allow_nan=False)  # NaN / inf were turned into null
    back = json.loads(text)
    assert set(back["regions"]) == {r.segment_name for r in regions.REGIONS}
    assert back["regions"]["C left"]["dice"] == 1.0
    assert back["regions"]["M4 left"]["fp_fn_ratio"] is None
    assert back["regions"]["IC right"]["dice"] is None
    assert len(back["confusion_matrix"]) == M.NUM_CLASSES
    assert back["lr_confusion_free"] is True


def test_full_size_scan_is_fast():
    """512x512x110 (the design's target scan) in well under a second or two on a busy
    CPU: the report evaluates six predictions per case."""
    import time
    t = np.zeros((110, 512, 512), np.uint8)
    t[30:80, 100:400, 100:400] = 7
    start = time.perf_counter()
    cm = M.confusion_matrix(t, t)
    elapsed = time.perf_counter() - start
    assert cm[7, 7] == 50 * 300 * 300 and cm.sum() == t.size
    assert elapsed < 5.0
