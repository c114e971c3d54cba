"""Region statistics, uncertainty, saving corrected cases, and the stats/save-case CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import alignment, cli, dataset, inference, phantom, regions, statistics, transforms
from BrainLobeSegLib.errors import EXIT_INPUT_ERROR, InputError

SIZE, SPACING = (96, 96, 48), (2.0, 2.0, 3.0)
M2_LEFT = regions.region("M2", "left")


@pytest.fixture(scope="module")
def upright():
    return phantom.make_scan(size=SIZE, spacing=SPACING, angles_deg=(0.0, 0.0, 0.0), seed=3)


@pytest.fixture(scope="module")
def tilted():
    return phantom.make_scan(size=SIZE, spacing=SPACING, angles_deg=(8.0, -5.0, 6.0), seed=4)


def lowered(case, label: int, delta_hu: float) -> sitk.Image:
    """The phantom's CT with ``delta_hu`` added inside one region (simulated oedema)."""
    arr = sitk.GetArrayFromImage(case.ct).astype(np.float32)
    arr[sitk.GetArrayViewFromImage(case.labels_scan) == label] += delta_hu
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(case.ct)
    return img


# ----------------------------------------------------------------------------- flags

def test_symmetric_phantom_raises_no_flag(upright, tilted):
    for case in (upright, tilted):
        report = statistics.region_statistics(case.ct, case.labels_scan)
        assert report.flagged == [], [(r.region, r.diff_to_mirror_hu) for r in report.flagged]
        measured = [r for r in report.regions if r.diff_to_mirror_hu is not None]
        assert len(measured) >= 16
        assert max(abs(r.diff_to_mirror_hu) for r in measured) < statistics.DEFAULT_DROP_THRESHOLD_HU


@pytest.mark.parametrize("which", ["upright", "tilted"])
def test_lowered_region_is_flagged_and_only_it(request, which):
    case = request.getfixturevalue(which)
    report = statistics.region_statistics(lowered(case, M2_LEFT.label, -8.0), case.labels_scan)
    assert [r.region for r in report.flagged] == ["M2 left"]
    m2 = report.by_label(M2_LEFT.label)
    # less than the full 8 HU: voxels pushed below the window's 15 HU stop counting
    assert -9.0 < m2.diff_to_mirror_hu < -4.0
    assert "not a diagnosis" in m2.flag
    # the mirror region is brighter, not darker: it must not be flagged
    assert not report.by_label(M2_LEFT.mirror_label).flagged
    assert report.by_label(M2_LEFT.mirror_label).diff_to_mirror_hu == pytest.approx(-m2.diff_to_mirror_hu)
    assert "not a diagnosis" in report.to_json()["notice"]


def test_threshold_is_configurable(upright):
    img = lowered(upright, M2_LEFT.label, -2.0)
    assert statistics.region_statistics(img, upright.labels_scan).flagged == []
    low = statistics.region_statistics(img, upright.labels_scan, threshold_hu=1.0)
    assert [r.region for r in low.flagged] == ["M2 left"]


# ----------------------------------------------------------------------------- numbers

def box_case(spacing=(0.5, 0.8, 2.5)):
    """A 40x30x12 grid with one 10x20x4 box of caudate-left and known HU values."""
    ct = np.full((12, 30, 40), 30.0, np.float32)
    lab = np.zeros(ct.shape, np.uint8)
    lab[2:6, 5:25, 10:20] = regions.region("C", "left").label      # 800 voxels
    lab[2:6, 5:25, 22:32] = regions.region("C", "right").label
    ct[2, 5:25, 10:20] = 5.0       # CSF: excluded (200 voxels)
    ct[3, 5, 10:20] = 120.0        # calcification: excluded (10 voxels)
    ct[4:6, 5:25, 10:20] = 40.0    # 400 voxels at 40 HU, the remaining 190 at 30 HU
    imgs = []
    for a in (ct, lab):
        img = sitk.GetImageFromArray(a)
        img.SetSpacing(spacing)
        img.SetOrigin((-10.0, 4.0, 7.0))
        img.SetDirection(transforms.matrix_of(transforms.rotation((10, 0, 20)))[:3, :3].ravel().tolist())
        imgs.append(img)
    return imgs


def test_volume_and_window_on_a_known_box():
    ct, lab = box_case()
    report = statistics.region_statistics(ct, lab)
    c = report.by_label(regions.region("C", "left").label)
    assert c.voxels == 800
    assert c.volume_ml == pytest.approx(800 * 0.5 * 0.8 * 2.5 / 1000.0)   # 0.8 ml
    assert c.voxels_used == 800 - 200 - 10
    assert c.mean_hu == pytest.approx((400 * 40.0 + 190 * 30.0) / 590)
    assert c.median_hu == pytest.approx(40.0)
    right = report.by_label(regions.region("C", "right").label)
    assert right.mean_hu == pytest.approx(30.0) and right.voxels_used == 800
    assert c.diff_to_mirror_hu == pytest.approx(c.mean_hu - 30.0)
    empty = report.by_label(regions.region("M5", "left").label)
    assert empty.voxels == 0 and empty.mean_hu is None and empty.diff_to_mirror_hu is None
    # a wider window takes the CSF voxels in
    wide = statistics.region_statistics(ct, lab, window_hu=(0.0, 200.0))
    assert wide.by_label(1).voxels_used == 800


def test_csv_and_json_have_units_and_every_region():
    ct, lab = box_case()
    report = statistics.region_statistics(ct, lab)
    rows = list(csv.reader(report.to_csv().splitlines()))
    assert rows[0][3] == "volume [ml]" and "mean [HU]" in rows[0]
    assert len(rows) == 1 + regions.NUM_LABELS
    assert [int(r[0]) for r in rows[1:]] == regions.LABELS
    data = json.loads(json.dumps(report.to_json()))
    assert data["settings"]["brain_window_hu"] == [statistics.CSF_MAX_HU, statistics.CALCIFIED_MIN_HU]
    assert len(data["regions"]) == regions.NUM_LABELS


def test_bad_inputs_are_refused():
    ct, lab = box_case()
    other = sitk.Image(lab)
    other.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="grid"):
        statistics.region_statistics(ct, other)
    with pytest.raises(InputError, match="outside 0-20"):
        statistics.region_statistics(ct, sitk.Cast(ct, sitk.sitkInt16))
    with pytest.raises(InputError, match="window"):
        statistics.region_statistics(ct, lab, window_hu=(60.0, 15.0))


# ----------------------------------------------------------------------------- uncertainty

def test_disagreement_is_zero_where_members_agree():
    fused = np.random.default_rng(0).integers(0, 21, (6, 7, 8)).astype(np.uint8)
    other = fused.copy()
    other[0] = (other[0] + 1) % 21
    u = statistics.member_disagreement({"axial": fused, "coronal": fused.copy(), "sagittal": other}, fused)
    assert np.all(u[1:] == 0.0)
    assert np.allclose(u[0], 1.0 / 3.0)


def test_uncertainty_of_a_real_segmentation(tiny_models, tilted):
    seg = inference.Segmenter("planar", tiny_models, "cpu")
    result = seg.segment(tilted.ct, tilted.transform, keep_probabilities=True)
    grid_u, source = statistics.uncertainty_on_grid(result)
    members = list(statistics.independent_members(result).values())
    assert len(members) == 3 and source == statistics.UNCERTAINTY_DISAGREEMENT
    agree = np.all([m == result.labels_grid for m in members], axis=0)
    assert np.all(grid_u[agree] == 0.0) and np.all(grid_u[~agree] > 0.0)
    assert set(statistics.independent_members(result, statistics.planar_names(seg))) == {
        "axial", "coronal", "sagittal"}
    report, unc = statistics.statistics_for_result(tilted.ct, result, tilted.transform, seg)
    assert unc.GetSize() == tilted.ct.GetSize() and unc.GetDirection() == tilted.ct.GetDirection()
    arr = sitk.GetArrayViewFromImage(unc)
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    present = [r for r in report.regions if r.voxels]
    assert present and all(0.0 <= r.mean_uncertainty <= 1.0 for r in present)


# ----------------------------------------------------------------------------- saving cases

def test_saved_case_reads_back_in_the_upright_layout(tmp_path, tilted):
    name = statistics.save_corrected_case(str(tmp_path), tilted.ct, tilted.labels_scan, tilted.transform)
    case = next(c for c in dataset.list_cases(tmp_path) if c.name == name)
    ct, tf, seg = dataset.read_case(case)
    expected = sitk.Resample(tilted.labels_scan, tilted.ct, tilted.transform, sitk.sitkNearestNeighbor, 0)
    assert np.array_equal(sitk.GetArrayViewFromImage(seg), sitk.GetArrayViewFromImage(expected))
    assert np.allclose(transforms.matrix_of(tf), transforms.matrix_of(tilted.transform), atol=1e-9)
    # the upright labels lie where the phantom drew them (up to nearest-neighbour steps)
    truth = sitk.GetArrayViewFromImage(tilted.labels_upright)
    got = sitk.GetArrayViewFromImage(seg)
    fg = (truth > 0) | (got > 0)
    assert (truth[fg] == got[fg]).mean() > 0.85
    second = statistics.save_corrected_case(str(tmp_path), tilted.ct, tilted.labels_scan, tilted.transform)
    assert second != name


def test_empty_labels_are_not_saved(tmp_path, upright):
    empty = sitk.Image(upright.labels_scan.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(upright.labels_scan)
    with pytest.raises(InputError, match="empty"):
        statistics.save_corrected_case(str(tmp_path), upright.ct, empty)
    assert not list(tmp_path.glob("*.nii*"))


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def files(tmp_path_factory, tilted):
    d = tmp_path_factory.mktemp("stats-cli")
    paths = {"scan": d / "head.nii.gz", "tf": d / "head.txt", "labels": d / "head-aspects.nii.gz",
             "low": d / "low.nii.gz"}
    sitk.WriteImage(tilted.ct, str(paths["scan"]))
    sitk.WriteImage(tilted.labels_scan, str(paths["labels"]))
    sitk.WriteImage(lowered(tilted, M2_LEFT.label, -8.0), str(paths["low"]))
    transforms.write_transform(str(paths["tf"]), tilted.transform)
    return paths


def test_cli_stats_with_labels_flags_the_lowered_region(files, tmp_path, capsys):
    code = cli.main(["stats", str(files["low"]), "--labels", str(files["labels"]), "-o", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "low-stats.json").read_text(encoding="utf-8"))
    assert data["flagged"] == ["M2 left"]
    assert (tmp_path / "low-stats.csv").read_text(encoding="utf-8").startswith("label,region")
    out = capsys.readouterr().out
    assert "M2 left" in out and "not a diagnosis" in out
    assert not list(tmp_path.glob(".partial*"))


def test_cli_stats_segments_and_writes_uncertainty(files, tmp_path, tiny_models):
    code = cli.main(["stats", str(files["scan"]), "--transform", str(files["tf"]), "--mode", "planar",
                     "--model", str(tiny_models), "--device", "cpu", "--threshold", "3", "-o", str(tmp_path)])
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["head-aspects.nii.gz", "head-stats.csv", "head-stats.json", "head-uncertainty.nii.gz"]
    data = json.loads((tmp_path / "head-stats.json").read_text(encoding="utf-8"))
    assert data["settings"]["drop_threshold_hu"] == 3.0
    assert data["settings"]["uncertainty"] == statistics.UNCERTAINTY_DISAGREEMENT
    unc = sitk.ReadImage(str(tmp_path / "head-uncertainty.nii.gz"))
    assert unc.GetSize() == sitk.ReadImage(str(files["scan"])).GetSize()


def test_cli_stats_refuses_labels_on_another_grid(files, tmp_path, capsys):
    lab = sitk.ReadImage(str(files["labels"]))
    bad = sitk.Resample(lab, [s // 2 for s in lab.GetSize()], sitk.Transform(), sitk.sitkNearestNeighbor,
                        lab.GetOrigin(), [2 * s for s in lab.GetSpacing()], lab.GetDirection())
    path = tmp_path / "bad.nii.gz"
    sitk.WriteImage(bad, str(path))
    out = tmp_path / "out"
    assert cli.main(["stats", str(files["scan"]), "--labels", str(path), "-o", str(out)]) == EXIT_INPUT_ERROR
    assert "grid" in capsys.readouterr().err
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_cli_save_case(files, tmp_path, capsys):
    ds = tmp_path / "dataset"
    for _ in range(2):
        assert cli.main(["save-case", str(files["scan"]), str(files["labels"]), "--transform",
                         str(files["tf"]), "--dataset", str(ds)]) == 0
    cases = dataset.list_cases(ds)
    assert len(cases) == 2 and all(c.seg_path is not None for c in cases)
    ct, tf, seg = dataset.read_case(cases[0])
    lab = sitk.ReadImage(str(files["labels"]))
    expected = statistics.labels_scan_to_upright(lab, ct, tf)
    assert np.array_equal(sitk.GetArrayViewFromImage(seg), sitk.GetArrayViewFromImage(expected))
    assert "saved case" in capsys.readouterr().out


def test_ensemble_members_are_the_planes_and_the_3d_model(tiny_models, upright):
    seg = inference.Segmenter("ensemble", tiny_models, "cpu")
    result = seg.segment(upright.ct, upright.transform)
    members = statistics.independent_members(result, statistics.planar_names(seg))
    # the planar model's own fused labels would count its planes twice
    assert {"axial", "coronal", "sagittal"} <= set(members) and "tiny-planar" not in members
    assert set(members) <= {"axial", "coronal", "sagittal", "tiny-3d"}


def test_cli_stats_estimates_the_pose_without_a_transform(tmp_path, tiny_models, capsys):
    """No --transform: the pose is estimated (the default), printed in one line and
    written next to the outputs; --auto-align (the old switch) does the same;
    --assume-upright skips it; --auto-align with --transform is refused."""
    ct, truth = phantom.make_reference_scan((18.0, -5.0, 7.0), seed=4)
    scan = tmp_path / "head.nii.gz"
    sitk.WriteImage(ct, str(scan))
    common = ["--mode", "3d", "--model", str(tiny_models), "--device", "cpu"]
    for flag, out in (([], tmp_path / "a"), (["--auto-align"], tmp_path / "b")):
        assert cli.main(["stats", str(scan), *flag, *common, "-o", str(out)]) == 0
        R = transforms.read_transform(str(out / f"head{alignment.ESTIMATED_SUFFIX}"))
        assert alignment.angle_error_deg(R, truth) < 2.0
        data = json.loads((out / "head-stats.json").read_text(encoding="utf-8"))
        assert "estimated" in data["transform"] and data["estimated_pose"]["angle_deg"] > 15
        assert data["settings"]["uncertainty"] == statistics.UNCERTAINTY_PROBABILITY
        assert "degrees from upright" in capsys.readouterr().out
    out = tmp_path / "c"
    assert cli.main(["stats", str(scan), "--assume-upright", *common, "-o", str(out)]) == 0
    assert not list(out.glob("*.txt"))
    assert json.loads((out / "head-stats.json").read_text(encoding="utf-8"))["transform"] == "assumed upright"
    tf = tmp_path / "head.txt"
    transforms.write_transform(str(tf), truth)
    assert cli.main(["stats", str(scan), "--auto-align", "--transform", str(tf),
                     "-o", str(tmp_path / "x")]) == EXIT_INPUT_ERROR


def test_cli_stats_on_a_gantry_tilted_grid_writes_nrrd(files, tmp_path, tiny_models):
    """A sheared (gantry-tilted) scan: NIfTI cannot store its grid, so the uncertainty and
    the labels are written as .nrrd, as `segment` does (stats failed at the first write)."""
    tilt = np.radians(15.0)
    scan = sitk.ReadImage(str(files["scan"]))
    scan.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, float(np.sin(tilt)), 0.0, 0.0, float(np.cos(tilt))))
    path = tmp_path / "tilted.nrrd"
    sitk.WriteImage(scan, str(path))
    out = tmp_path / "out"
    assert cli.main(["stats", str(path), "--assume-upright", "--mode", "3d", "--model", str(tiny_models),
                     "--device", "cpu", "--no-aspects", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["tilted-aspects.nrrd", "tilted-stats.csv",
                                                     "tilted-stats.json", "tilted-uncertainty.nrrd"]
    assert np.allclose(sitk.ReadImage(str(out / "tilted-uncertainty.nrrd")).GetDirection(), scan.GetDirection())
