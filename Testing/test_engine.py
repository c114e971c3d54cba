"""The engine's data flow: geometry, the transform convention, modes, outputs, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import geometry, inference, models, output, phantom, regions, steps, transforms
from BrainLobeSegLib.errors import Cancelled, InputError
from BrainLobeSegLib.steps import run_steps


@pytest.fixture(scope="module")
def tilted():
    """A small tilted phantom with a known R (upright -> scan)."""
    return phantom.make_scan(size=(96, 96, 48), spacing=(2.0, 2.0, 3.0), angles_deg=(12.0, -7.0, 9.0))


def _agreement(a: sitk.Image, b: sitk.Image) -> float:
    """Fraction of the union of labelled voxels on which two label images agree."""
    x, y = sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)
    fg = (x > 0) | (y > 0)
    return float((x[fg] == y[fg]).mean())


def test_upright_resample_undoes_the_tilt(tilted):
    """The network input of a tilted scan is the upright head: the scan resampled with R
    matches the upright phantom; without R (or with R inverted) it does not."""
    head = geometry.head_box(tilted.ct, tilted.transform)
    grid = head.grid((2.0, 2.0, 2.0))
    upright_ct, _ = phantom.make_upright_phantom(spacing_mm=1.0)
    reference = sitk.GetArrayFromImage(sitk.Resample(upright_ct, grid.reference(), sitk.AffineTransform(3),
                                                     sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    inverse = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(tilted.transform)))

    def misfit(tf) -> float:
        """1 - correlation of the resampled scan with the upright phantom."""
        vol = geometry.upright_resample(tilted.ct, tf, grid)
        return 1.0 - float(np.corrcoef(vol.ravel(), reference.ravel())[0, 1])
    right = misfit(tilted.transform)
    assert right < 0.05
    assert misfit(transforms.identity()) > 2 * right
    assert misfit(inverse) > 4 * right


def test_labels_go_back_to_the_right_scan_voxels(tilted):
    """Labels known on the model grid, carried back by the engine with R^-1, land on the
    scan voxels the phantom says they belong to (and only with the right direction)."""
    head = geometry.head_box(tilted.ct, tilted.transform)
    grid = head.grid((1.0, 1.0, 1.0))
    truth_grid = sitk.GetArrayFromImage(sitk.Resample(
        tilted.labels_upright, grid.reference(), sitk.AffineTransform(3), sitk.sitkNearestNeighbor))
    # labels_upright is itself sampled on the scan grid; use a fine model grid so the
    # round trip loses little.
    back = geometry.labels_to_scan(truth_grid, grid, tilted.ct, tilted.transform)
    assert geometry.Grid  # noqa: B018 (import used)
    assert back.GetSize() == tilted.ct.GetSize()
    assert back.GetOrigin() == tilted.ct.GetOrigin()
    assert back.GetDirection() == tilted.ct.GetDirection()
    assert back.GetSpacing() == tilted.ct.GetSpacing()
    right = _agreement(back, tilted.labels_scan)
    inverted = geometry.labels_to_scan(truth_grid, grid, tilted.ct,
                                       transforms.affine_from_matrix(
                                           np.linalg.inv(transforms.matrix_of(tilted.transform))))
    assert right > 0.8
    assert right - _agreement(inverted, tilted.labels_scan) > 0.3


def test_head_box_midline_is_the_phantom_midline(tilted):
    head = geometry.head_box(tilted.ct, tilted.transform)
    upright = phantom.make_scan(size=(96, 96, 48), spacing=(2.0, 2.0, 3.0), angles_deg=(0, 0, 0))
    assert abs(head.midline_x - geometry.head_box(upright.ct, upright.transform).midline_x) < 4.0


@pytest.mark.parametrize("mode", inference.MODES)
def test_every_mode_gives_labels_on_the_scan_grid(tiny_models, tilted, mode):
    seg = inference.Segmenter(mode, tiny_models, "cpu")
    res = seg.segment(tilted.ct, tilted.transform, keep_probabilities=True)
    for img in (res.labels_scan, res.labels_upright):
        assert img.GetSize() == tilted.ct.GetSize()
        assert img.GetPixelID() == sitk.sitkUInt8
        assert geometry  # noqa: B018
    assert res.probabilities.shape == (regions.NUM_LABELS + 1,) + res.grid.shape
    np.testing.assert_allclose(res.probabilities.sum(0), 1.0, atol=1e-4)
    assert set(res.timings) >= {"crop", "upright resample", "inference", "to scan grid"}
    if mode != "3d":
        assert {"axial", "coronal", "sagittal"} <= set(res.member_labels)


def test_progress_is_monotonic_and_cancel_stops(tiny_models, tilted):
    seg = inference.Segmenter("planar", tiny_models, "cpu", batch_size=4)
    seen = []
    seg.segment(tilted.ct, tilted.transform, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 10
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 5
    with pytest.raises(Cancelled):
        seg.segment(tilted.ct, tilted.transform, cancel=cancel)


def test_vote_fusion_is_majority():
    a = np.zeros((2, 3), np.uint8)
    b = np.ones((2, 3), np.uint8)
    mean = np.zeros((regions.NUM_LABELS + 1, 2, 3), np.float32)
    fused = inference.fuse_probabilities([mean], [a, b, b], "vote")
    assert (inference.labels_from_probabilities(fused) == 1).all()


def test_resample_probabilities_between_grids():
    box = geometry.HeadBox((-40.0, -50.0, -30.0), (40.0, 50.0, 30.0), 0.0)
    coarse, fine = box.grid((4.0, 4.0, 4.0)), box.grid((2.0, 2.0, 2.0))
    z = coarse.axis_coordinates(2)
    probs = np.broadcast_to(z[None, :, None, None], (1,) + coarse.shape).astype(np.float32)
    out = inference.resample_probabilities(probs, coarse, fine)
    expected = np.clip(fine.axis_coordinates(2), z[0], z[-1])
    np.testing.assert_allclose(out[0, :, 0, 0], expected, atol=1e-4)


def test_resampling_and_fusion_class_by_class_match_whole_volume_arithmetic():
    """Resampling and fusion work one class at a time (no whole-volume temporaries); the
    result must be plain trilinear interpolation (clamped at the edges) along all three
    axes, the fused mean or vote of the inputs, and the inputs must stay unchanged."""
    rng = np.random.default_rng(5)
    probs = rng.random((4, 7, 8, 9)).astype(np.float32)
    src = geometry.Grid((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (9, 8, 7))
    dst = geometry.Grid((-1.0, 0.5, 1.25), (1.5, 1.5, 1.5), (12, 10, 9))
    cx, cy, cz = geometry.grid_points_in(src, dst)
    expected = probs
    for axis, coords in ((1, cz), (2, cy), (3, cx)):
        expected = np.apply_along_axis(lambda line: np.interp(coords, np.arange(line.size), line), axis, expected)
    np.testing.assert_allclose(inference.resample_probabilities(probs, src, dst), expected, atol=1e-5)
    other = rng.random(probs.shape).astype(np.float32)
    before = (probs.copy(), other.copy())
    np.testing.assert_allclose(inference.fuse_probabilities([probs, other]), (probs + other) / 2, rtol=1e-6)
    labels = [rng.integers(0, 4, probs.shape[1:]).astype(np.uint8) for _ in range(3)]
    votes = sum((lab == np.arange(4)[:, None, None, None]).astype(np.float32) for lab in labels)
    np.testing.assert_allclose(inference.fuse_probabilities([probs, other], labels, "vote"),
                               votes + 1e-3 * (probs + other) / 2, atol=1e-6)
    np.testing.assert_array_equal(probs, before[0])
    np.testing.assert_array_equal(other, before[1])


def test_engine_steps_run_without_numpy_huge_page_advice_and_restore_it():
    """Each segmentation step runs with NumPy's huge-page advice off (its page faults
    stalled steps for up to a second) and inference mode on; between steps, and after,
    the caller's own setting holds, whichever it was."""
    import torch
    from BrainLobeSegLib import numpy_pages
    switch = numpy_pages.madvise_switch()
    assert switch is not None, "this NumPy has no _set_madvise_hugepage"

    def current() -> bool:
        previous = switch(True)
        switch(previous)
        return previous

    seen = []

    def probe():
        for _ in range(2):
            seen.append((current(), torch.is_inference_mode_enabled()))
            yield
        return "done"

    for outside in (True, False):
        before = switch(outside)
        try:
            gen = steps.within(inference.engine_step, probe())
            next(gen)
            assert current() is outside and not torch.is_inference_mode_enabled()   # between steps
            assert run_steps(gen) == "done"
            assert current() is outside
        finally:
            switch(before)
    assert seen == [(False, True)] * 4


def test_head_applied_slab_by_slab_gives_the_whole_volume_softmax():
    """The 3D network's 1x1 head is applied with the softmax one slab at a time (the
    whole-head logits are never made at once): the probabilities must be the network's."""
    import torch
    from BrainLobeSegLib import networks
    torch.manual_seed(0)
    net = networks.UNet(3, in_channels=2, num_classes=regions.NUM_LABELS + 1, base_features=4, depth=3).eval()
    x = torch.randn(1, 2, 20, 12, 8)
    with torch.no_grad():
        whole = torch.softmax(net(x)[0], dim=0).numpy()
        features = run_steps(net.features_steps(x))
        slabbed = run_steps(inference.softmax_in_slabs(features[0], slab=6, head=net.head))
    assert slabbed.shape == whole.shape == (regions.NUM_LABELS + 1, 20, 12, 8)
    np.testing.assert_allclose(slabbed, whole, atol=1e-6)


def test_refinement_argmax_one_class_at_a_time_equals_the_full_argmax():
    """The memory-saving running argmax must pick the same label as interpolating all
    classes and taking np.argmax (ties included: equal classes go to the lower label)."""
    rng = np.random.default_rng(3)
    probs = rng.random((regions.NUM_LABELS + 1, 9, 11, 10)).astype(np.float32)
    probs[5] = probs[4]   # an exact tie everywhere
    src = geometry.Grid((1.0, -2.0, 0.5), (2.0, 2.0, 2.5), (10, 11, 9))
    dst = geometry.Grid((1.0, -2.0, 0.5), (0.7, 0.7, 0.7), (27, 29, 30))
    full = inference.labels_from_probabilities(inference.resample_probabilities(probs, src, dst))
    np.testing.assert_array_equal(run_steps(inference.running_argmax(probs, src, dst)), full)
    fused = inference.fuse_probabilities([probs, probs[::-1].copy()])
    np.testing.assert_allclose(fused, (probs + probs[::-1]) / 2, rtol=1e-6)


def test_refinement_argmax_skips_only_classes_that_cannot_win():
    """Classes that are small away from their own region are interpolated only near it;
    the labels must still be exactly the whole-box argmax, also where the fine grid runs
    past the coarse one (clamped) and for 0/1 inputs (as a vote gives) that do not sum to one."""
    rng = np.random.default_rng(5)
    shape = (12, 14, 13)
    logits = rng.normal(0.0, 0.3, (regions.NUM_LABELS + 1,) + shape)
    logits[0] += 4.0   # background wherever no region is
    for c in range(1, regions.NUM_LABELS + 1):   # each region a blob in its own place
        z, y, x = (rng.integers(0, n) for n in shape)
        logits[c, max(z - 2, 0):z + 2, max(y - 2, 0):y + 2, max(x - 2, 0):x + 2] += 6.0
    logits[:, :4, :4, :4] = rng.normal(0.0, 0.05, (regions.NUM_LABELS + 1, 4, 4, 4))   # a near tie
    probs = np.exp(logits - logits.max(axis=0)).astype(np.float32)
    probs /= probs.sum(axis=0)
    src = geometry.Grid((1.0, -2.0, 0.5), (2.0, 2.0, 2.5), (13, 14, 12))
    dst = geometry.Grid((-1.0, -3.0, -1.0), (0.9, 0.9, 0.9), (32, 34, 37))
    points = geometry.grid_points_in(src, dst)
    boxes = [inference._class_reach(p >= inference.class_floor(probs), points)[0] for p in probs[1:]]
    assert np.mean([np.prod([s.stop - s.start for s in b]) for b in boxes]) < probs[0].size / 2   # real skips
    for p in (probs, inference.fuse_probabilities([probs, probs[::-1].copy()], method="mean"),
              (probs > 0.3).astype(np.float32)):
        full = inference.labels_from_probabilities(inference.resample_probabilities(p, src, dst))
        np.testing.assert_array_equal(run_steps(inference.running_argmax(p, src, dst)), full)


@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1)])
def test_scan_layouts_equal_the_whole_image_resample(tilted, direction):
    """Only the scan voxels that can reach the labels' box are resampled; both layouts must
    equal resampling the whole scan grid at once and clearing bone near the skull."""
    from BrainLobeSegLib import cleanup
    scan = sitk.Image(tilted.ct)
    scan.SetDirection(direction)   # a flipped scan frame moves where the box lies
    head = geometry.head_box(scan, tilted.transform)
    grid = head.grid((2.0, 2.0, 2.0))
    labels_grid = geometry.Grid(tuple(o + 40.0 for o in grid.origin), (1.0, 1.0, 1.0),
                                tuple(int(n * 2 * 0.45) for n in grid.size))   # inside the scan
    labels = np.zeros(labels_grid.shape, np.uint8)
    labels[:] = 1 + np.arange(labels.shape[2], dtype=np.uint8) % regions.NUM_LABELS   # to its edges
    non_brain = cleanup.find_non_brain(geometry.upright_resample(scan, tilted.transform, grid), grid.spacing)
    got = run_steps(inference.scan_layouts(labels, labels_grid, grid, scan, tilted.transform, non_brain))
    near = sitk.BinaryDilate(grid.image(non_brain.skull.astype(np.uint8)), [1, 1, 1])
    inverse = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(tilted.transform)))
    hu = {"scan": sitk.GetArrayFromImage(scan),
          "upright": sitk.GetArrayFromImage(sitk.Resample(scan, scan, tilted.transform, sitk.sitkLinear,
                                                          geometry.AIR_HU, scan.GetPixelID()))}
    for image, (layout, tf) in zip(got, (("scan", inverse), ("upright", transforms.identity()))):
        def nearest(source: sitk.Image) -> np.ndarray:
            return sitk.GetArrayFromImage(sitk.Resample(source, scan, tf, sitk.sitkNearestNeighbor, 0,
                                                        sitk.sitkUInt8))
        want = cleanup.strip_bone(nearest(labels_grid.image(labels)), hu[layout], nearest(near),
                                  non_brain.shift)
        assert want.any()
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), want)


def test_seg_nrrd_has_20_named_segments(tmp_path, tilted):
    slicerio = pytest.importorskip("slicerio")
    path = str(tmp_path / "x.seg.nrrd")
    output.write_seg_nrrd(tilted.labels_scan, path)
    seg = slicerio.read_segmentation(path)
    segs = seg["segments"]
    assert [s["name"] for s in segs] == [r.segment_name for r in regions.REGIONS]
    assert [s["labelValue"] for s in segs] == regions.LABELS
    for s, r in zip(segs, regions.REGIONS):
        np.testing.assert_allclose(s["color"], r.color_float, atol=1e-5)
        assert s["terminology"]["type"] == list(r.type_code)
        assert s["terminology"]["typeModifier"] == list(r.side_modifier)
    arr = sitk.GetArrayFromImage(sitk.ReadImage(path))
    np.testing.assert_array_equal(arr, sitk.GetArrayViewFromImage(tilted.labels_scan))


def test_model_mode_mismatch_is_a_clear_error(tiny_models):
    with pytest.raises(InputError, match="planar model"):
        inference.Segmenter("3d", tiny_models / "tiny-planar", "cpu")
    with pytest.raises(InputError, match="no 3d model"):
        models.find_models("3d", tiny_models / "missing")
