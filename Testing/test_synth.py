"""``python -m training synth`` on a small fake atlas built here (no shared data needed).

The fake atlas has the real one's file names and conventions: a head CT template in
Cormack units and tissue maps on a coarse LAS-stored MNI grid, and 20 region masks
(with overlaps) on another grid. Its tissue maps make the labelled regions grey
matter and the rest of the intracranial space CSF, so the transform convention can be
checked from intensities alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import replace
from typing import Dict, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import dataset, regions, transforms
from BrainLobeSegLib.errors import InputError
from training import synth
from training.__main__ import main as training_main

# Region shapes: code -> (lateral distance, y, z) centre and semi-axes, MNI RAS mm.
SHAPES: Dict[str, Tuple[Tuple[float, float, float], Tuple[float, float, float]]] = {
    "C": ((15, 11, 9), (6, 11, 13)), "L": ((24, 0, 0), (7, 15, 11)),
    "IC": ((17, -12, 8), (5, 12, 9)), "I": ((38, 0, 5), (5, 25, 14)),
    "M1": ((40, 40, 3), (15, 18, 12)), "M2": ((55, -10, 3), (11, 22, 12)),
    "M3": ((48, -60, 3), (14, 20, 12)), "M4": ((36, 20, 40), (14, 20, 17)),
    "M5": ((47, -20, 42), (12, 18, 17)), "M6": ((40, -60, 40), (14, 18, 17)),
}
ARGS = ["--inplane", "40", "--slice-mm", "4,6"]


def _grid(spacing: float, size: Tuple[int, int, int]) -> sitk.Image:
    """An MNI grid stored LAS like the FSL/SPM files (origin at MNI (90, -126, -72) RAS)."""
    img = sitk.Image(size, sitk.sitkFloat32)
    img.SetSpacing((spacing,) * 3)
    img.SetOrigin((-90.0, 126.0, -72.0))
    img.SetDirection((1, 0, 0, 0, -1, 0, 0, 0, 1))
    return img


def _ras(img: sitk.Image):
    """Broadcastable MNI RAS coordinates (z, y, x order) of a grid like :func:`_grid`."""
    sx, sy, sz = img.GetSize()
    h = img.GetSpacing()[0]
    x = -(-90.0 + h * np.arange(sx))
    y = -(126.0 - h * np.arange(sy))
    z = -72.0 + h * np.arange(sz)
    return x[None, None, :], y[None, :, None], z[:, None, None]


def _ellipsoid(coords, centre, semi) -> np.ndarray:
    x, y, z = coords
    return ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + (
        (z - centre[2]) / semi[2]) ** 2 <= 1.0


def _write(array: np.ndarray, ref: sitk.Image, path: Path) -> None:
    img = sitk.GetImageFromArray(array.astype(np.float32))
    img.CopyInformation(ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def make_fake_atlas(root: Path) -> Path:
    """Write a small atlas folder with the real file names (about 0.3 s)."""
    mask_ref = _grid(3.0, (61, 73, 61))
    mc = _ras(mask_ref)
    union = np.zeros(mask_ref.GetSize()[::-1], bool)
    for code, (centre, semi) in SHAPES.items():
        for side, tag, sign in (("left", "L", -1.0), ("right", "R", 1.0)):
            m = _ellipsoid(mc, (sign * centre[0],) + centre[1:], semi)
            union |= m
            _write(m, mask_ref, root / synth.MASK_PATTERN.format(code=synth.FILE_CODES[code], side=tag))
    tpl_ref = _grid(4.0, (46, 55, 46))
    tc = _ras(tpl_ref)
    centre = (0.0, -17.0, 8.0)
    head = _ellipsoid(tc, centre, (84, 101, 82))
    skull = _ellipsoid(tc, centre, (79, 96, 77))
    brain = _ellipsoid(tc, centre, (72, 89, 70))
    hu = np.where(brain, 25.0, np.where(skull, 700.0, np.where(head, 40.0, -1024.0)))
    _write(synth.hu_to_cormack(hu), tpl_ref, root / synth.TEMPLATE)
    grey = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(_as_image(union, mask_ref), sitk.sitkFloat32),
                                                tpl_ref, transforms.identity(), sitk.sitkLinear, 0.0))
    grey = np.where(brain, grey, 0.0)
    _write(grey, tpl_ref, root / synth.TISSUES["grey"])
    _write(np.zeros_like(grey), tpl_ref, root / synth.TISSUES["white"])
    _write(np.where(brain, 1.0 - grey, 0.0), tpl_ref, root / synth.TISSUES["csf"])
    return root


def _as_image(array: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(array.astype(np.uint8))
    img.CopyInformation(ref)
    return img


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory) -> Path:
    return make_fake_atlas(tmp_path_factory.mktemp("atlas"))


@pytest.fixture(scope="module")
def made(atlas_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    code = training_main(["synth", "--atlas-dir", str(atlas_dir), "--out", str(out), "-n", "3",
                          "--seed", "5", *ARGS])
    assert code == 0
    return out


def test_layout_and_manifest(made, capsys):
    names = sorted(p.name for p in made.iterdir())
    expected = sorted(f"{i}{s}" for i in (1, 2, 3) for s in (".nii.gz", ".txt", "-seg.nii.gz"))
    assert names == sorted(expected + ["synth.json"])
    cases = dataset.list_cases(made)
    assert [c.name for c in cases] == ["1", "2", "3"]
    assert all(c.seg_path is not None and c.transform_path is not None for c in cases)
    manifest = json.loads((made / "synth.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == 5 and set(manifest["cases"]) == {"1", "2", "3"}
    assert manifest["overlap_priority"] == synth.PRIORITY
    assert {s["license"] for s in manifest["sources"]} == {"BSD-2-Clause", "MIT"}


def test_types_geometry_and_labels(made):
    manifest = json.loads((made / "synth.json").read_text(encoding="utf-8"))
    for case in dataset.list_cases(made):
        ct, R, seg = dataset.read_case(case)          # includes the grid and label checks
        assert ct.GetPixelID() == sitk.sitkInt16 and seg.GetPixelID() == sitk.sitkUInt8
        params = manifest["cases"][case.name]
        assert ct.GetSize()[:2] == (40, 40) and 4.0 <= params["slice_mm"] <= 6.0
        assert ct.GetSpacing()[2] == pytest.approx(params["slice_spacing_mm"], abs=1e-4)
        assert 0.5 <= params["slice_spacing_mm"] <= params["slice_mm"]
        assert ct.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
        arr = sitk.GetArrayViewFromImage(ct)
        assert arr.min() == -1024 and 500 < arr.max() < 2000
        present = set(np.unique(sitk.GetArrayViewFromImage(seg))) - {0}
        assert len(present) >= 18, present
        assert transforms.rotation_angle_deg(R) <= 30.0 + 15.0 + 15.0 + 1e-6
        # left regions (ids 1-10) at LPS +x of the right ones
        lab = sitk.GetArrayViewFromImage(seg)
        x = np.broadcast_to(np.arange(lab.shape[2]), lab.shape)
        assert x[(lab >= 1) & (lab <= 10)].mean() > x[lab >= 11].mean()


def _in_grey_range(ct: sitk.Image, seg: sitk.Image, transform, params: dict) -> float:
    """Fraction of labelled voxels whose resampled HU is grey matter (not CSF, bone, air).

    The levels are the case's own: v2 draws a whole-image gain and offset of up to
    +-40 HU, which moves CSF into a fixed grey-matter window, so the cut is halfway
    between this case's CSF and grey matter after gain and offset."""
    sc = params.get("scanner") or {"gain": 1.0, "offset_hu": 0.0}
    grey, csf = (params[k] * sc["gain"] + sc["offset_hu"] for k in ("grey_hu", "csf_hu"))
    up = sitk.GetArrayFromImage(sitk.Resample(ct, ct, transform, sitk.sitkLinear, -1024.0,
                                              sitk.sitkFloat32))
    lab = sitk.GetArrayViewFromImage(seg) > 0
    return float(((up[lab] > (grey + csf) / 2) & (up[lab] < 150.0)).mean())


def test_the_transform_convention(made):
    """``sitk.Resample(ct, ct, R)`` lies on the labels (docs/DESIGN.md section 2); without R,
    or with R the wrong way round, it does not."""
    manifest = json.loads((made / "synth.json").read_text(encoding="utf-8"))
    for case in dataset.list_cases(made):
        ct, R, seg = dataset.read_case(case)
        params = manifest["cases"][case.name]
        inverse = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(R)))
        # Coarse voxels (~6 mm) make many labelled voxels partial-volume edges (on
        # 1 mm grids the interior of the regions is grey matter at > 94 %), and v2's
        # atrophy and sulcal pattern turn part of the cortex into CSF, which here is
        # all of the labelled tissue: about half the labelled voxels look grey.
        with_r = _in_grey_range(ct, seg, R, params)
        assert with_r > 0.4, (case.name, with_r)
        assert with_r > _in_grey_range(ct, seg, inverse, params)
        if transforms.rotation_angle_deg(R) > 8.0:
            assert with_r - _in_grey_range(ct, seg, transforms.identity(), params) > 0.1
            assert with_r - _in_grey_range(ct, seg, inverse, params) > 0.2


def test_deterministic_from_seed_and_index(atlas_dir, made, tmp_path):
    """Case i depends on (seed, i) only: a shard starting at i remakes it exactly."""
    assert training_main(["synth", "--atlas-dir", str(atlas_dir), "--out", str(tmp_path), "-n", "1",
                          "--first", "1", "--seed", "5", *ARGS]) == 0
    a = dataset.read_case(dataset.list_cases(made)[1])
    b = dataset.read_case(dataset.list_cases(tmp_path)[0])
    assert dataset.list_cases(tmp_path)[0].name == "2"
    for x, y in ((a[0], b[0]), (a[2], b[2])):
        assert np.array_equal(sitk.GetArrayViewFromImage(x), sitk.GetArrayViewFromImage(y))
    assert np.array_equal(transforms.matrix_of(a[1]), transforms.matrix_of(b[1]))
    other = dataset.read_case(dataset.list_cases(made)[0])
    assert other[0].GetSize() != a[0].GetSize() or not np.array_equal(
        sitk.GetArrayViewFromImage(other[0]), sitk.GetArrayViewFromImage(a[0]))


def test_existing_cases_are_kept_unless_overwrite(made, tmp_path, capsys):
    """Taken case names are refused before the atlas is even looked at (here there is
    none: the refusal still comes first), in one line that names the cases and both ways
    on (--overwrite, or --first after the cases there)."""
    before = {p.name: p.read_bytes() for p in made.iterdir()}
    code = training_main(["synth", "--atlas-dir", str(tmp_path / "no-atlas"), "--out", str(made),
                          "-n", "4", "--seed", "6", *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "already holds cases 1, 2, 3 of the 4 this run would write" in err[0]
    assert "--overwrite" in err[0] and "--first 3 to add cases 4-7" in err[0]
    assert {p.name: p.read_bytes() for p in made.iterdir()} == before


def test_overlaps_follow_the_documented_priority():
    shape = (2, 2, 2)
    masks = {lab: np.zeros(shape, bool) for lab in regions.LABELS}
    lab = lambda code, side="left": regions.region(code, side).label  # noqa: E731
    masks[lab("I")][0, 0, 0] = masks[lab("M2")][0, 0, 0] = True           # insula beats cortex
    masks[lab("L")][0, 0, 1] = masks[lab("IC")][0, 0, 1] = True           # capsule beats lentiform
    masks[lab("C", "right")][0, 1, 0] = masks[lab("L", "right")][0, 1, 0] = True
    masks[lab("M5")][1, 1, 1] = True
    out = synth.merge_masks(masks)
    assert out[0, 0, 0] == lab("I") and out[0, 0, 1] == lab("IC")
    assert out[0, 1, 0] == lab("C", "right") and out[1, 1, 1] == lab("M5") and out[1, 0, 0] == 0


def test_cormack_conversion_round_trip():
    hu = np.array([-1024.0, -500.0, -124.0, 0.0, 25.0, 76.0, 300.0, 1500.0], np.float32)
    assert np.allclose(synth.cormack_to_hu(synth.hu_to_cormack(hu)), hu, atol=1e-3)
    assert synth.cormack_to_hu(np.array([0.0]))[0] == -1024.0


def test_missing_atlas_file_is_named(atlas_dir, tmp_path):
    broken = make_fake_atlas(tmp_path / "atlas")
    (broken / "aspects-on-cta" / "MNI152_InCa_R.nii.gz").unlink()
    with pytest.raises(InputError) as exc:
        synth.load_atlas(str(broken))
    assert "MNI152_InCa_R.nii.gz" in str(exc.value) and "IC right" in str(exc.value)


def test_bad_options_are_refused(atlas_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        training_main(["synth", "--atlas-dir", str(atlas_dir), "--out", str(tmp_path), "--slice-mm", "5,1"])
    assert training_main(["synth", "--atlas-dir", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "atlas folder not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- profiles

#: Case 0 of seed 5 (--inplane 40 --slice-mm 4,6) as drawn by the generator before the
#: profiles existed (commit bc2e748), captured from its code: --profile v1 must keep it.
V1_CASE0 = {
    "scale": (1.0473646930903406, 1.0326037976123759, 1.053575843607886),
    "shift_mm": (-2.7458038374000395, -13.641744182926645, -13.537268678184958),
    "warp_mm": 3.9967044602602857,
    "warp_modes_head": [0, 1.475208346843334, 0.007342012201383006, -0.06268337030918385,
                        -0.0030288400875473236, 4.251764592949832],
    "warp_modes_tail": [2, 0.09500945798284254, -0.04182725666982801, 0.031536886137921154,
                        -0.011760900822207751, 5.32578105202249],
    "angles_deg": (-2.963227560221057, 1.5975011938062273, -0.6153674471741368),
    "slice_mm": 5.03, "grey_hu": 40.271467107628446, "white_hu": 24.538222722213725,
    "csf_hu": 4.825014323253191, "bone_hu": 900.643852377606, "scalp_hu": 32.605536040793915,
    "nuclei_gain": 0.7157180530661451, "noise_hu": 4.822955507377517,
    "blur_mm": 0.7542059508546408, "offset_frac": (-0.2762402986814435, 0.7821776409904309),
}
#: The same case rendered on the fake atlas by that code (SimpleITK 2.5.7, numpy 2.4.6):
#: grid, spacing after widening, and the label histogram and CT sum it wrote.
V1_CASE0_RENDER = {
    "size": (40, 40, 32), "spacing_mm": 6.346909439743196, "ct_sum": -33190058,
    "label_counts": [50032, 14, 30, 5, 43, 106, 80, 102, 91, 62, 77, 11, 22, 10, 45, 97, 72, 86,
                     72, 67, 76],
}


def test_v1_draws_exactly_as_before():
    p = synth.draw_params(synth.case_rng(5, 0), 40, (4.0, 6.0))
    got = synth.asdict(p)
    for key, value in V1_CASE0.items():
        if key.startswith("warp_modes"):
            continue
        assert got[key] == value, key
    assert p.warp_modes[0] == V1_CASE0["warp_modes_head"] and p.warp_modes[-1] == V1_CASE0["warp_modes_tail"]
    assert len(p.warp_modes) == 12
    assert p.profile == "v1" and p.fov is None and p.slice_spacing_mm is None
    assert set(synth.params_json(p)) == set(V1_CASE0) - {"warp_modes_head", "warp_modes_tail"} | {
        "warp_modes", "spacing_mm", "profile"}


def test_v1_case_is_remade_bit_identically(atlas_dir, tmp_path):
    """``--profile v1`` writes what the first generator wrote (grid, labels, CT)."""
    out = tmp_path / "v1"
    assert training_main(["synth", "--atlas-dir", str(atlas_dir), "--out", str(out), "-n", "1",
                          "--seed", "5", "--profile", "v1", *ARGS]) == 0
    ct, R, seg = dataset.read_case(dataset.list_cases(out)[0])
    assert ct.GetSize() == V1_CASE0_RENDER["size"]
    assert ct.GetSpacing()[0] == pytest.approx(V1_CASE0_RENDER["spacing_mm"], abs=1e-5)
    assert int(sitk.GetArrayViewFromImage(ct).astype(np.int64).sum()) == V1_CASE0_RENDER["ct_sum"]
    counts = np.bincount(sitk.GetArrayViewFromImage(seg).ravel(), minlength=21).tolist()
    assert counts == V1_CASE0_RENDER["label_counts"]
    manifest = json.loads((out / "synth.json").read_text(encoding="utf-8"))
    assert manifest["profile"] == "v1" and manifest["ranges"]["name"] == "v1"
    assert manifest["cases"]["1"]["angles_deg"] == list(V1_CASE0["angles_deg"])
    assert "fov" not in manifest["cases"]["1"]


def test_pitch_and_roll_yaw_ranges_are_honoured():
    prof = synth.get_profile("v2")
    angles = np.array([synth.draw_params_v2(3, i, 64, prof).angles_deg for i in range(300)])
    assert np.abs(angles[:, 0]).max() <= 30.0 and np.abs(angles[:, 0]).max() > 27.0
    assert np.abs(angles[:, 1:]).max() <= 15.0 and np.abs(angles[:, 1:]).max() > 13.5
    narrow = synth.get_profile("v2", max_pitch_deg=10.0, max_roll_yaw_deg=2.0)
    a = np.array([synth.draw_params_v2(3, i, 64, narrow).angles_deg for i in range(100)])
    assert np.abs(a[:, 0]).max() <= 10.0 and np.abs(a[:, 1:]).max() <= 2.0
    # a pose limit changes the angles only: the other groups are drawn from their own streams
    p, q = synth.draw_params_v2(3, 0, 64, prof), synth.draw_params_v2(3, 0, 64, narrow)
    assert p.grey_hu == q.grey_hu and p.scale == q.scale and p.angles_deg != q.angles_deg


def test_pose_options_reach_the_manifest(atlas_dir, tmp_path):
    out = tmp_path / "pose"
    assert training_main(["synth", "--atlas-dir", str(atlas_dir), "--out", str(out), "-n", "2",
                          "--seed", "8", "--max-pitch", "5", "--max-roll-yaw", "1", *ARGS]) == 0
    manifest = json.loads((out / "synth.json").read_text(encoding="utf-8"))
    assert manifest["profile"] == "v2" and manifest["ranges"]["max_pitch_deg"] == 5.0
    for case in manifest["cases"].values():
        assert abs(case["angles_deg"][0]) <= 5.0 and max(map(abs, case["angles_deg"][1:])) <= 1.0
        assert case["profile"] == "v2" and case["fov"]["mode"] in synth.FOV_MODES
    assert training_main(["synth", "--atlas-dir", str(atlas_dir), "--out", str(out), "--profile", "v1",
                          "--fov", "neck"]) == 2


def _case_with_cut(prof, lo: float) -> int:
    """The first index whose drawn vertex cut is at least ``lo`` mm."""
    return next(i for i in range(100) if synth.draw_params_v2(2, i, 40, prof).fov.vertex_cut_mm >= lo)


def test_vertex_cut_removes_the_top_slices(atlas_dir):
    """The same case with and without the drawn vertex cut: the cut scan stops lower, in
    the scan frame, and its top slice still crosses the head (the vertex is missing)."""
    atlas = synth.load_atlas(str(atlas_dir))
    base = synth.get_profile("v2", fov_modes=(("base", 1.0),), slice_mm=(2.0, 2.0),
                             overlap_probability=0.0)
    cut_prof = replace(base, max_vertex_cut_mm=30.0)
    index = _case_with_cut(cut_prof, 20.0)
    whole = synth.synth_case(atlas, 2, index, 40, profile=replace(base, max_vertex_cut_mm=0.0))
    cut = synth.synth_case(atlas, 2, index, 40, profile=cut_prof)
    drop = cut.params.fov.vertex_cut_mm
    assert cut.params.fov.z_first_mm == pytest.approx(whole.params.fov.z_first_mm)
    assert whole.params.fov.z_last_mm - cut.params.fov.z_last_mm == pytest.approx(drop, abs=2.0)
    assert whole.ct.GetSize()[2] - cut.ct.GetSize()[2] == pytest.approx(drop / 2.0, abs=1.01)
    head = lambda img, k: int((sitk.GetArrayViewFromImage(img)[k] > -300).sum())  # noqa: E731
    assert head(whole.ct, -1) < 0.2 * head(cut.ct, -1)


def test_fov_modes_start_lower_with_the_neck_and_higher_at_the_orbits(atlas_dir):
    atlas = synth.load_atlas(str(atlas_dir))
    starts = {}
    for mode in synth.FOV_MODES:
        prof = synth.get_profile("v2", fov_modes=((mode, 1.0),), max_vertex_cut_mm=0.0)
        p = synth.draw_params_v2(4, 0, 40, prof)
        warp = synth.Warp(atlas, p)
        R = transforms.rotation(p.angles_deg, center=tuple(warp.c_up))
        synth.plan_grid_v2(atlas, warp, R, p, 40)
        starts[mode] = p.fov.z_first_mm
    assert starts["neck"] < starts["base"] < starts["orbits"]


# ----------------------------------------------------------------------------- v2 content

def _quiet(**ranges):
    """v2 without noise and lesions (what the label checks render), with ``ranges``."""
    return synth.get_profile("v2", **{**synth.QUIET, **ranges})


def _labelled_hu(case) -> np.ndarray:
    """HU of ``sitk.Resample(ct, ct, R)`` at the labelled voxels."""
    up = sitk.GetArrayFromImage(sitk.Resample(case.ct, case.ct, case.transform, sitk.sitkLinear,
                                              -1024.0, sitk.sitkFloat32))
    return up[sitk.GetArrayViewFromImage(case.labels) > 0]


def test_v2_labels_lie_on_brain_only(atlas_dir):
    """No label where the noise-free v2 image is bone (> 150 HU) or air (< -200 HU), for
    each field-of-view mode, thick and thin slices, sharp and smooth kernels, craniotomies;
    v1 (unclipped labels) has such voxels on the same atlas, so the check bites."""
    atlas = synth.load_atlas(str(atlas_dir))
    profiles = [_quiet(fov_modes=(("neck", 1.0),), slice_mm=(5.0, 6.0), sharp_probability=1.0),
                _quiet(fov_modes=(("orbits", 1.0),), slice_mm=(1.0, 2.0), craniotomy_probability=1.0),
                _quiet(fov_modes=(("base", 1.0),), slice_mm=(3.0, 3.0), overlap_probability=1.0)]
    for k, prof in enumerate(profiles):
        for index in range(2):
            case = synth.synth_case(atlas, 21 + k, index, 40, profile=prof)
            hu = _labelled_hu(case)
            assert len(hu) > 300 and hu.max() <= 150.0 and hu.min() >= -200.0, (k, index, hu.min(), hu.max())
    old = _labelled_hu(synth.synth_case(atlas, 21, 0, 40, (5.0, 6.0), profile="v1"))
    assert (old > 150.0).sum() > 20


def test_pathology_leaves_the_labels_unchanged(atlas_dir):
    atlas = synth.load_atlas(str(atlas_dir))
    sick = _quiet(infarct_probability=1.0, lacune_probability=1.0, haemorrhage_probability=1.0,
                  calcification_probability={"pineal": 1.0, "choroid plexus": 1.0, "basal ganglia": 1.0},
                  slice_mm=(3.0, 3.0), overlap_probability=0.0)
    a = synth.synth_case(atlas, 4, 0, 64, profile=sick)
    b = synth.synth_case(atlas, 4, 0, 64, profile=replace(sick, **{
        k: v for k, v in synth.QUIET.items() if k != "noise_hu"}))
    kinds = {les.kind for les in a.params.lesions}
    assert kinds == {"infarct", "lacune", "haemorrhage", "calcification"} and not b.params.lesions
    assert np.array_equal(sitk.GetArrayViewFromImage(a.labels), sitk.GetArrayViewFromImage(b.labels))
    diff = sitk.GetArrayViewFromImage(a.ct).astype(int) - sitk.GetArrayViewFromImage(b.ct)
    assert diff.max() >= 40 and diff.min() <= -2     # calcification / haemorrhage; infarct / lacune


def test_midline_shift_moves_the_labels(atlas_dir):
    """The shift is part of the deformation D, so the labels follow the tissue."""
    atlas = synth.load_atlas(str(atlas_dir))
    base = _quiet(midline_shift_probability=1.0, midline_shift_mm=(8.0, 8.0), slice_mm=(3.0, 3.0),
                  overlap_probability=0.0, max_vertex_cut_mm=0.0, fov_modes=(("base", 1.0),))
    shifted = synth.synth_case(atlas, 6, 0, 64, profile=base)
    straight = synth.synth_case(atlas, 6, 0, 64, profile=replace(base, midline_shift_probability=0.0))
    sign = np.sign(shifted.params.anatomy.midline_shift_mm)
    assert straight.params.anatomy.midline_shift_mm == 0.0

    def centre_x(case, ids):
        lab = sitk.GetArrayViewFromImage(case.labels)
        xs = np.broadcast_to(np.arange(lab.shape[2]), lab.shape)[np.isin(lab, ids)]
        return xs.mean() * case.ct.GetSpacing()[0]
    deep = [regions.region(c, s).label for c in ("C", "IC") for s in ("left", "right")]
    moved = centre_x(shifted, deep) - centre_x(straight, deep)
    assert sign * moved > 2.0, moved


def test_overlapping_slices_average_their_thickness():
    planes = np.arange(12, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    # planes 0.5 mm thick; slices 2 mm thick, 1 mm apart: centres at planes 1.5, 3.5, ...
    out = synth.thickness_average(planes, 0.5, 1.0, 2.0, 5)
    assert np.allclose(out[:, 0, 0], [1.5, 3.5, 5.5, 7.5, 9.5])
    # 1.25 mm = 2.5 planes from plane 0, 1.5, 3: plane 2 (and 1, 5) count half
    odd = synth.thickness_average(planes, 0.5, 0.75, 1.25, 3)
    assert np.allclose(odd[:, 0, 0], [(0 + 1 + 1) / 2.5, (0.5 + 2 + 3) / 2.5, (3 + 4 + 2.5) / 2.5])


def test_gain_and_offset_leave_air_alone():
    p = synth.draw_params_v2(1, 0, 64, synth.get_profile("v2"))
    p.scanner.gain, p.scanner.offset_hu = 1.1, 40.0
    hu = np.array([-1024.0, -1000.0, -500.0, 0.0, 30.0, 1000.0], np.float32)
    out = synth.scanner_map(hu, p)
    assert out[0] == -1024.0 and out[1] > -1024.0 and out[1] < -990.0
    assert np.allclose(out[3:], hu[3:] * 1.1 + 40.0)


def test_v2_manifest_records_every_group(made):
    manifest = json.loads((made / "synth.json").read_text(encoding="utf-8"))
    ranges = manifest["ranges"]
    assert manifest["profile"] == "v2" and ranges["offset_hu"] == [-40.0, 40.0]
    assert ranges["noise_hu"] == [2.0, 20.0] and ranges["max_pitch_deg"] == 30.0
    offsets, noises = [], []
    for case in manifest["cases"].values():
        assert {"fov", "anatomy", "scanner", "lesions", "slice_spacing_mm"} <= set(case)
        assert -40.0 <= case["scanner"]["offset_hu"] <= 40.0 and 2.0 <= case["noise_hu"] <= 20.0
        assert 3.0 <= case["grey_hu"] - case["white_hu"] <= 12.0
        offsets.append(case["scanner"]["offset_hu"])
        noises.append(case["noise_hu"])
    assert len(set(offsets)) == len(offsets) and len(set(noises)) == len(noises)


def test_training_augmentation_is_as_wide_as_the_synthesis():
    """train.augment_intensity on a flat 35 HU brain with air and bone: per-sample offsets
    reach +-30 HU and noise 15 HU (of +-40 and 0-20), air and bone stay, same rng, same result."""
    torch = pytest.importorskip("torch")
    from training import train
    width = train.WINDOW_HU[1] - train.WINDOW_HU[0]
    x = torch.full((200, 1, 16, 16), (35.0 - train.WINDOW_HU[0]) / width)
    x[:, :, :2], x[:, :, -2:] = 0.0, 1.0
    out = train.augment_intensity(x, np.random.default_rng(3))
    assert torch.equal(out, train.augment_intensity(x, np.random.default_rng(3)))
    assert bool((out[:, :, :2] == 0).all()) and bool((out[:, :, -2:] == 1).all())
    brain = (out[:, 0, 4:12, 4:12] - x[:, 0, 4:12, 4:12]) * width            # HU change
    shift = brain.mean(dim=(1, 2))
    assert shift.max() > 30.0 and shift.min() < -30.0 and shift.abs().max() < 60.0
    assert brain.std(dim=(1, 2)).max() > 15.0


def test_synth_names_the_missing_atlas_file_through_the_cli(tmp_path, capsys):
    """An incomplete --atlas-dir is refused with exit 2 before anything is read or written,
    naming the first missing file, how many more are missing, and where the layout is
    documented; a template left uncompressed (as its repository stores it) gets the gzip
    command instead."""
    atlas = make_fake_atlas(tmp_path / "atlas")
    (atlas / "aspects-on-cta" / "MNI152_M2_L.nii.gz").unlink()
    (atlas / "aspects-on-cta" / "MNI152_M2_R.nii.gz").unlink()
    out = tmp_path / "out"
    assert training_main(["synth", "--atlas-dir", str(atlas), "--out", str(out), "-n", "1", *ARGS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MNI152_M2_L.nii.gz (M2 left mask)" in err[0]
    assert "1 more of the 24 atlas files" in err[0] and "docs/DESIGN.md section 5.2" in err[0]
    assert not out.exists()
    template = atlas / synth.TEMPLATE
    template.with_suffix("").write_bytes(template.read_bytes())   # any bytes: only the name counts
    template.unlink()
    assert training_main(["synth", "--atlas-dir", str(atlas), "--out", str(out), "-n", "1", *ARGS]) == 2
    err = capsys.readouterr().err
    assert "scct.nii.gz (CT template)" in err and "gzip -9 -n -c" in err
