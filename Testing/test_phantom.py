"""The code-made head phantom: anatomy, sides, the transform convention, determinism."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import dataset, phantom, regions, transforms

SIZE, SPACING = (80, 96, 56), (2.5, 2.5, 3.0)
ANGLES = (12.0, -8.0, 10.0)


@pytest.fixture(scope="module")
def upright():
    return phantom.make_upright_phantom(spacing_mm=2.0)


@pytest.fixture(scope="module")
def tilted():
    return phantom.make_scan(size=SIZE, spacing=SPACING, angles_deg=ANGLES, seed=7)


def _x_of_labels(labels: sitk.Image):
    """Mean LPS x (mm) of each label's voxels."""
    arr = sitk.GetArrayViewFromImage(labels)
    x = labels.GetOrigin()[0] + labels.GetSpacing()[0] * np.arange(arr.shape[2])
    return {lab: float(np.broadcast_to(x, arr.shape)[arr == lab].mean()) for lab in regions.LABELS
            if (arr == lab).any()}


def test_all_20_regions_present_and_non_overlapping(upright):
    ct, labels = upright
    assert ct.GetPixelID() == sitk.sitkInt16 and labels.GetPixelID() == sitk.sitkUInt8
    assert ct.GetSize() == labels.GetSize() and ct.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    counts = phantom.label_counts(labels)
    assert all(counts[lab] > 0 for lab in regions.LABELS), counts
    assert max(sitk.GetArrayViewFromImage(labels).ravel()) == regions.NUM_LABELS


def test_left_regions_lie_at_positive_lps_x(upright):
    """Patient left = +x in LPS = ids 1-10 (regions.py); the phantom is symmetric."""
    xs = _x_of_labels(upright[1])
    counts = phantom.label_counts(upright[1])
    for r in regions.REGIONS:
        assert (xs[r.label] > 5.0) == (r.side == "left"), (r.segment_name, xs[r.label])
        assert counts[r.label] == counts[r.mirror_label]


def test_regions_sit_at_their_mni_places(upright):
    """Centroids (MNI RAS = LPS with x, y negated) match the atlas roughly."""
    arr = sitk.GetArrayViewFromImage(upright[1])
    img = upright[1]
    z, y, x = np.nonzero(arr == regions.region("C", "left").label)
    ras = (-(img.GetOrigin()[0] + 2.0 * x).mean(), -(img.GetOrigin()[1] + 2.0 * y).mean(),
           (img.GetOrigin()[2] + 2.0 * z).mean())
    assert -20 < ras[0] < -10 and 0 < ras[1] < 20 and 0 < ras[2] < 20
    for code, (zlo, zhi) in {"M1": (-13, 19), "M4": (18, 73), "L": (-13, 14)}.items():
        z = np.nonzero(arr == regions.region(code, "right").label)[0]
        zmm = img.GetOrigin()[2] + 2.0 * z
        assert zlo <= zmm.min() and zmm.max() <= zhi, code


def test_tissue_densities(upright):
    ct, labels = (sitk.GetArrayViewFromImage(i) for i in upright)
    assert ct.min() == phantom.AIR_HU
    assert 700 <= ct.max() <= 1500                      # skull
    caudate = ct[labels == regions.region("C", "left").label].mean()
    lentiform = ct[labels == regions.region("L", "right").label].mean()
    capsule = ct[labels == regions.region("IC", "left").label].mean()
    assert 33 <= caudate <= 42 and 33 <= lentiform <= 42 and 24 <= capsule <= 31
    soft = ct[(ct > -100) & (ct < 100)]
    assert (np.abs(soft - 5) < 6).any() and (np.abs(soft - 27) < 2).any()  # CSF, white matter


def test_scan_geometry_and_types(tilted):
    for img in (tilted.ct, tilted.labels_upright, tilted.labels_scan):
        assert img.GetSize() == SIZE and img.GetSpacing() == SPACING
        assert img.GetOrigin() == tilted.ct.GetOrigin()
        assert img.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert tilted.ct.GetPixelID() == sitk.sitkInt16
    assert tilted.labels_scan.GetPixelID() == sitk.sitkUInt8
    assert all(c > 0 for c in phantom.label_counts(tilted.labels_scan)[1:])
    assert all(c > 0 for c in phantom.label_counts(tilted.labels_upright)[1:])


def test_labels_scan_are_labels_upright_carried_by_r_inverse(tilted):
    R_inv = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(tilted.transform)))
    carried = sitk.GetArrayFromImage(sitk.Resample(tilted.labels_upright, tilted.ct, R_inv,
                                                   sitk.sitkNearestNeighbor, 0))
    truth = sitk.GetArrayViewFromImage(tilted.labels_scan)
    fg = (carried > 0) | (truth > 0)
    assert (carried[fg] == truth[fg]).mean() > 0.85
    wrong = sitk.GetArrayFromImage(sitk.Resample(tilted.labels_upright, tilted.ct, tilted.transform,
                                                 sitk.sitkNearestNeighbor, 0))
    fg = (wrong > 0) | (truth > 0)
    assert (wrong[fg] == truth[fg]).mean() < 0.5


def test_resampling_with_r_undoes_the_tilt(tilted):
    """``sitk.Resample(ct, ct, R)`` is the upright head: it matches an untilted scan of
    the same phantom and lies on labels_upright (docs/DESIGN.md section 2)."""
    straight = phantom.make_scan(size=SIZE, spacing=SPACING, angles_deg=(0, 0, 0), seed=7, noise_hu=0)
    assert straight.ct.GetOrigin() == tilted.ct.GetOrigin()
    ref = sitk.GetArrayViewFromImage(straight.ct).astype(np.float32)
    brain = sitk.GetArrayViewFromImage(straight.labels_upright) > 0
    with_r = sitk.GetArrayFromImage(sitk.Resample(tilted.ct, tilted.ct, tilted.transform,
                                                  sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    without = sitk.GetArrayViewFromImage(tilted.ct).astype(np.float32)
    err_with = np.abs(with_r - ref)[brain].mean()
    err_without = np.abs(without - ref)[brain].mean()
    assert err_with < 15.0, err_with
    assert err_without > 3 * err_with
    # the upright labels are soft tissue in the upright resample
    assert ((with_r[brain] > 0) & (with_r[brain] < 60)).mean() > 0.95


def test_transform_file_round_trip(tilted, tmp_path):
    path = str(tmp_path / "R.txt")
    transforms.write_transform(path, tilted.transform)
    back = transforms.read_transform(path)
    assert np.array_equal(transforms.matrix_of(back), transforms.matrix_of(tilted.transform))
    assert abs(transforms.rotation_angle_deg(back) - transforms.rotation_angle_deg(
        transforms.rotation(ANGLES))) < 1e-9
    # R rotates about the head centre: the centre stays put
    assert np.allclose(tilted.transform.TransformPoint(tilted.center), tilted.center, atol=1e-9)


def test_translation_keeps_both_heads_in_the_grid():
    case = phantom.make_scan(size=(72, 80, 56), spacing=(3.0, 3.0, 3.0), angles_deg=(0, 0, 0),
                             translation_mm=(20.0, -15.0, 10.0))
    m = transforms.matrix_of(case.transform)
    assert np.allclose(m[:3, 3], (20.0, -15.0, 10.0))
    assert all(c > 0 for c in phantom.label_counts(case.labels_scan)[1:])
    assert all(c > 0 for c in phantom.label_counts(case.labels_upright)[1:])


def test_deterministic_per_seed():
    a = phantom.make_scan(size=(48, 56, 40), spacing=(4.0, 4.0, 4.0), seed=11)
    b = phantom.make_scan(size=(48, 56, 40), spacing=(4.0, 4.0, 4.0), seed=11)
    c = phantom.make_scan(size=(48, 56, 40), spacing=(4.0, 4.0, 4.0), seed=12)
    for field in ("ct", "labels_upright", "labels_scan"):
        assert np.array_equal(sitk.GetArrayViewFromImage(getattr(a, field)),
                              sitk.GetArrayViewFromImage(getattr(b, field)))
    assert not np.array_equal(sitk.GetArrayViewFromImage(a.ct), sitk.GetArrayViewFromImage(c.ct))
    canon1, canon2 = phantom.make_upright_phantom(3.0), phantom.make_upright_phantom(3.0)
    assert np.array_equal(sitk.GetArrayViewFromImage(canon1[0]), sitk.GetArrayViewFromImage(canon2[0]))
    assert phantom.PhantomParams.from_seed(None) == phantom.PhantomParams()


def test_small_scans_are_fast():
    t = time.perf_counter()
    phantom.make_scan(size=(64, 64, 40), spacing=(3.0, 3.0, 3.0), seed=12345)  # not cached
    assert time.perf_counter() - t < 2.0   # ~0.1 s on 2 idle cores; loose for shared CI


def test_write_case_uses_the_dataset_layout(tilted, tmp_path):
    written = phantom.write_case(tilted, str(tmp_path), "4")
    assert {p.name for p in tmp_path.iterdir()} == {"4.nii.gz", "4.txt", "4-seg.nii.gz"}
    ct, R, seg = dataset.read_case(dataset.list_cases(tmp_path)[0])
    assert written.name == "4"
    assert np.array_equal(sitk.GetArrayViewFromImage(seg), sitk.GetArrayViewFromImage(tilted.labels_upright))
    assert np.array_equal(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(tilted.ct))
    assert np.allclose(transforms.matrix_of(R), transforms.matrix_of(tilted.transform), atol=1e-12)
