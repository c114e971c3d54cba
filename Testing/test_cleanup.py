"""Post-processing: no region label in the skull or air, one piece per region, and a
calcification inside a region keeps its label (cleanup.py)."""

from __future__ import annotations

import numpy as np

from BrainLobeSegLib import cleanup, geometry, inference, phantom


def _probs_from(labels: np.ndarray) -> np.ndarray:
    probs = np.zeros((21,) + labels.shape, np.float32)
    for c in range(21):
        probs[c][labels == c] = 0.9
    return probs + 0.005


def test_skull_air_and_stray_pieces_become_background_calcification_stays():
    hu = np.full((40, 40, 40), 30.0, np.float32)
    hu[:, :, :4] = 1000.0                       # a skull slab (large dense piece)
    hu[:, :, 36:] = -1000.0                     # air
    hu[20:22, 20:22, 20:22] = 300.0             # a calcification inside region 2
    labels = np.zeros(hu.shape, np.uint8)
    labels[10:30, 10:30, 0:12] = 5              # M4 reaching into the skull slab
    labels[15:25, 15:25, 15:25] = 2             # lentiform with the calcification
    labels[2:4, 2:4, 30:33] = 2                 # a stray lentiform piece, far away
    labels[10:14, 10:14, 34:40] = 7             # M6 partly in air
    probs = _probs_from(labels)
    mask = cleanup.non_brain_mask(hu, (2.0, 2.0, 2.0))
    labels, report = cleanup.clean_probabilities(probs, mask)
    out = np.argmax(probs, axis=0)
    assert np.array_equal(labels, out)      # the labels returned are the cleaned argmax
    assert not out[:, :, :4].any() and not out[:, :, 36:].any()
    assert (out[20:22, 20:22, 20:22] == 2).all()               # calcification keeps its label
    assert not (out[2:4, 2:4, 30:33] == 2).any()               # stray piece gone
    assert (out[15:25, 15:25, 15:25] == 2).all() and (out[10:30, 10:30, 4:12] == 5).sum() > 0
    assert report.outside_brain[5] == 20 * 20 * 4 and report.stray_pieces[2] == 12


def test_calibration_offset_does_not_move_the_skull_threshold():
    hu = np.full((30, 30, 30), 30.0, np.float32)
    hu[:, :, :5] = 120.0   # dense soft tissue, not bone: +40 HU scanner offset keeps it below
    shifted = hu + 40.0
    assert not cleanup.non_brain_mask(shifted, (2.0,) * 3).any()


def test_segmentation_never_labels_the_skull(tiny_models):
    """Random tiny networks label everywhere; after the clean-up nothing is left in the
    skull on the model grid, in every mode."""
    case = phantom.make_scan(size=(80, 80, 40), spacing=(2.8, 2.8, 4.0), angles_deg=(6, -4, 5), seed=3)
    removed = 0
    for mode in ("3d", "planar", "ensemble"):
        res = inference.Segmenter(mode, tiny_models, "cpu", refine_mm=None).segment(case.ct, case.transform)
        hu = geometry.upright_resample(case.ct, case.transform, res.grid)
        skull = cleanup.non_brain_mask(hu, res.grid.spacing)
        assert skull.any() and not (res.labels_grid[skull] > 0).any(), mode
        removed += sum(res.cleanup.outside_brain.values())
    assert removed > 0        # the networks did put labels there: the clean-up did the work


def test_labels_in_slabs_equal_the_whole_argmax():
    """The stepped argmax (a few z-planes per step) gives the whole-volume labels, ties
    included, also when the planes do not divide into whole slabs."""
    rng = np.random.default_rng(4)
    probs = rng.random((21, 37, 8, 9)).astype(np.float32)
    probs[7] = probs[6]
    gen, count = cleanup.labels_in_slabs(probs, slab=5), 0
    try:
        while True:
            next(gen)
            count += 1
    except StopIteration as done:
        labels = done.value
    assert count == 8   # ceil(37 / 5) steps
    np.testing.assert_array_equal(labels, inference.labels_from_probabilities(probs))
