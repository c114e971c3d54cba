"""``brainlobeseg stats``'s ASPECTS read-out (issue 16, command line).

The phantom's own labels are given with ``--labels`` (no inference, seconds per run); one
region's parenchyma (its voxels of 20-50 HU) is lowered by 8 HU, as early ischaemic
oedema would, so the engine (:mod:`aspects`) calls it and that side scores 9.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import aspects, aspects_card, aspects_preview, cli, models, phantom, regions, transforms
from BrainLobeSegLib.errors import EXIT_INPUT_ERROR

M2_LEFT = regions.region("M2", "left")
READ_OUT = ("low-aspects-score.json", "low-aspects-evidence.nii.gz", "low-aspects-score.png")
STATS = ("low-stats.csv", "low-stats.json")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def case() -> phantom.PhantomCase:
    """The tilted phantom of test_statistics (its normal read-out calls no region)."""
    return phantom.make_scan(size=(96, 96, 48), spacing=(2.0, 2.0, 3.0), angles_deg=(8.0, -5.0, 6.0), seed=4)


def lowered(case: phantom.PhantomCase, label: int, delta_hu: float = -8.0) -> sitk.Image:
    """The CT with ``delta_hu`` added to the parenchyma (20-50 HU) of one region."""
    arr = sitk.GetArrayFromImage(case.ct).astype(np.float32)
    arr[(sitk.GetArrayViewFromImage(case.labels_scan) == label) & (arr >= 20) & (arr <= 50)] += delta_hu
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(case.ct)
    return img


@pytest.fixture(scope="module")
def files(tmp_path_factory, case) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("aspects-cli")
    paths = {"low": d / "low.nii.gz", "labels": d / "labels.nii.gz", "tf": d / "low.txt"}
    sitk.WriteImage(lowered(case, M2_LEFT.label), str(paths["low"]))
    sitk.WriteImage(case.labels_scan, str(paths["labels"]))
    transforms.write_transform(str(paths["tf"]), case.transform)
    return paths


def run(args: List[str], capsys) -> Tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(path: Path) -> dict:
    """The file parsed as JSON that has no NaN or Infinity (which are not JSON)."""
    def refuse(constant: str):
        raise AssertionError(f"{path.name} holds {constant}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def names(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- the read-out

def test_lowered_region_scores_9_on_its_side(files, tmp_path, capsys):
    code, out, err = run(["stats", str(files["low"]), "--labels", str(files["labels"]), "-o",
                          str(tmp_path)], capsys)
    assert code == 0, err
    assert names(tmp_path) == sorted(STATS + READ_OUT)      # nothing else, no .partial folder
    data = strict_json(tmp_path / "low-aspects-score.json")
    assert data["aspects"]["score_left"] == 9 and data["aspects"]["score_right"] == 10
    assert data["aspects"]["side"] == "left" and data["aspects"]["side_source"] == "proposed"
    assert data["aspects"]["affected"] == ["M2 left"]
    assert [r["region"] for r in data["regions"] if r["affected"]] == ["M2 left"]
    assert data["scan"] == str(files["low"]) and data["labels"] == str(files["labels"])
    assert data["warnings"] == [] and "not a diagnosis" in data["notice"]
    # the settings the read-out ran with, for a reader who compares runs of versions
    assert data["settings"]["csf_margin_mm"] == aspects.CSF_MARGIN_MM
    assert data["settings"]["card_readout"] == "matches" and data["settings"]["card_readout_mismatch"] == []
    summary = strict_json(tmp_path / "low-stats.json")["aspects"]
    assert (summary["score"], summary["score_left"], summary["score_right"]) == (9, 9, 10)
    assert summary["affected"] == {"left": ["M2 left"], "right": []}
    assert summary["details"] == "low-aspects-score.json"
    # stdout: after the statistics table, the side and why, one line per side, the notice
    lines = out.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("ASPECTS, symptomatic side left (proposed: "))
    assert first > next(i for i, ln in enumerate(lines) if ln.startswith("M2 left"))
    assert lines[first + 1].startswith("ASPECTS left 9: M2 left (") and "darker than the mirror" in lines[first + 1]
    assert lines[first + 2] == "ASPECTS right 10: no region called"
    assert lines[first + 3] == aspects.NOTICE


def test_evidence_map_lies_on_the_scan_grid(files, tmp_path, capsys):
    assert run(["stats", str(files["low"]), "--labels", str(files["labels"]), "-o", str(tmp_path)],
               capsys)[0] == 0
    evidence = sitk.ReadImage(str(tmp_path / "low-aspects-evidence.nii.gz"))
    scan = sitk.ReadImage(str(files["low"]))
    assert evidence.GetPixelID() == sitk.sitkFloat32 and evidence.GetSize() == scan.GetSize()
    assert np.allclose(evidence.GetOrigin(), scan.GetOrigin()) and np.allclose(evidence.GetSpacing(), scan.GetSpacing())
    assert np.allclose(evidence.GetDirection(), scan.GetDirection())
    ev = sitk.GetArrayViewFromImage(evidence)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(files["labels"])))
    assert ev[labels == M2_LEFT.label].mean() < -3.0           # darker than its mirror
    assert abs(ev[labels == regions.region("M3", "left").label].mean()) < 1.0


def test_preview_is_a_png_with_the_call_in_red(files, tmp_path, capsys):
    assert run(["stats", str(files["low"]), "--labels", str(files["labels"]), "-o", str(tmp_path)],
               capsys)[0] == 0
    path = tmp_path / "low-aspects-score.png"
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE
    img = sitk.ReadImage(str(path))
    assert img.GetNumberOfComponentsPerPixel() == 3 and min(img.GetSize()[:2]) > 300
    rgb = sitk.GetArrayViewFromImage(img)
    red = np.all(rgb == aspects_preview.WARNING_COLOUR, axis=-1).sum()
    assert red > 4 * (7 * 2) ** 2     # much more than the key's red swatch: the region's outline


def test_side_is_the_users_when_given(files, tmp_path, capsys):
    code, out, _ = run(["stats", str(files["low"]), "--labels", str(files["labels"]), "--side", "right",
                        "-o", str(tmp_path)], capsys)
    assert code == 0
    data = strict_json(tmp_path / "low-aspects-score.json")["aspects"]
    assert (data["side"], data["side_source"], data["score"]) == ("right", "user", 10)
    assert data["score_left"] == 9 and data["affected"] == []
    assert "ASPECTS, symptomatic side right (chosen by the user)" in out
    assert strict_json(tmp_path / "low-stats.json")["aspects"]["side"] == "right"


def test_no_aspects_writes_none_of_the_read_out(files, tmp_path, capsys):
    code, out, _ = run(["stats", str(files["low"]), "--labels", str(files["labels"]), "--no-aspects",
                        "-o", str(tmp_path)], capsys)
    assert code == 0 and names(tmp_path) == sorted(STATS)
    assert "aspects" not in strict_json(tmp_path / "low-stats.json")
    assert "ASPECTS" not in out
    with pytest.raises(SystemExit):      # a side for a read-out that is not made
        cli.main(["stats", str(files["low"]), "--no-aspects", "--side", "left", "-o", str(tmp_path)])


def _labels_file(case, arr: np.ndarray, path):
    """``arr`` written as a label file on the phantom's grid."""
    img = sitk.GetImageFromArray(arr.astype(np.uint8))
    img.CopyInformation(case.labels_scan)
    sitk.WriteImage(img, str(path))
    return path


def test_too_few_regions_warn_instead_of_failing(files, case, tmp_path, capsys):
    """Two left/right pairs cannot define the midline: the statistics are written, the
    read-out is not, and one warning line says why (recorded in the stats JSON)."""
    kept = [regions.region(code, side).label for code in ("C", "M2") for side in aspects.SIDES]
    arr = sitk.GetArrayFromImage(case.labels_scan)
    path = _labels_file(case, np.where(np.isin(arr, kept), arr, 0), tmp_path / "few.nii.gz")
    out = tmp_path / "out"
    code, stdout, err = run(["stats", str(files["low"]), "--labels", str(path), "-o", str(out)], capsys)
    assert code == 0, err
    assert names(out) == sorted(STATS)
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and warned[0].startswith("brainlobeseg: warning: low: ASPECTS read-out skipped: "
                                                     "only 2 region pairs"), err
    report = strict_json(out / "low-stats.json")
    assert report["aspects"]["skipped"].startswith("ASPECTS read-out skipped")
    assert report["warnings"] == [report["aspects"]["skipped"]]
    assert report["flagged"] == ["M2 left"] and "ASPECTS" not in stdout


def test_missing_regions_are_named_in_a_warning(files, case, tmp_path, capsys):
    """Enough pairs for the midline but a region missing on both sides: the read-out is
    made, and one warning line says which regions the score counts as not affected."""
    arr = sitk.GetArrayFromImage(case.labels_scan)
    arr[np.isin(arr, [regions.region("M6", side).label for side in aspects.SIDES])] = 0
    path = _labels_file(case, arr, tmp_path / "partial.nii.gz")
    out = tmp_path / "out"
    code, _, err = run(["stats", str(files["low"]), "--labels", str(path), "-o", str(out)], capsys)
    assert code == 0 and names(out) == sorted(STATS + READ_OUT)
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and "M6 left, M6 right: too little tissue to measure" in warned[0]
    data = strict_json(out / "low-aspects-score.json")
    assert data["aspects"]["score_left"] == 9 and data["warnings"] == [warned[0].split("low: ", 1)[1]]


def test_a_haemorrhage_pair_is_named_in_a_warning_and_kept_out_of_the_score(files, case, tmp_path, capsys):
    """A 65 HU haemorrhage of 7 mm in the left lentiform (edge blurred 1.5 mm): one warning
    line names the lentiform pair as not assessed and why; the JSON says how much dense
    lesion it holds; the lowered M2 left is still called (score 9)."""
    centre = aspects.region_centroids(case.labels_scan)[regions.region("L", "left").label]
    bleed = phantom.add_dense_ball(sitk.ReadImage(str(files["low"])), centre, 7.0, 65.0)
    path = tmp_path / "low.nii.gz"
    sitk.WriteImage(bleed, str(path))
    out = tmp_path / "out"
    code, _, err = run(["stats", str(path), "--labels", str(files["labels"]), "-o", str(out)], capsys)
    assert code == 0 and names(out) == sorted(STATS + READ_OUT)
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and "L left, L right: not assessed, a dense lesion" in warned[0]
    data = strict_json(out / "low-aspects-score.json")
    pair = [r for r in data["regions"] if r["code"] == "L"]
    assert all(r["dense_lesion_ml"] >= aspects.DENSE_LESION_ML and r["call_score"] is None for r in pair)
    assert data["aspects"]["score_left"] == 9 and data["aspects"]["affected"] == ["M2 left"]


def test_gantry_tilted_grid_keeps_its_evidence_map_in_nrrd(files, tmp_path, capsys):
    """NIfTI cannot store a sheared grid: the evidence map is written as .nrrd there, as
    `segment` writes its labels."""
    tilt = np.radians(15.0)
    direction = (1.0, 0.0, 0.0, 0.0, 1.0, float(np.sin(tilt)), 0.0, 0.0, float(np.cos(tilt)))
    for name in ("low", "labels"):
        img = sitk.ReadImage(str(files[name]))
        img.SetDirection(direction)
        sitk.WriteImage(img, str(tmp_path / f"{name}.nrrd"))
    out = tmp_path / "out"
    code, _, err = run(["stats", str(tmp_path / "low.nrrd"), "--labels", str(tmp_path / "labels.nrrd"),
                        "-o", str(out)], capsys)
    assert code == 0, err
    assert "low-aspects-evidence.nrrd" in names(out) and "low-aspects-evidence.nii.gz" not in names(out)
    evidence = sitk.ReadImage(str(out / "low-aspects-evidence.nrrd"))
    assert np.allclose(evidence.GetDirection(), direction)
    assert strict_json(out / "low-aspects-score.json")["aspects"]["score_left"] == 9


def test_all_files_of_a_case_or_none(files, tmp_path, capsys, monkeypatch):
    """The read-out is written in the same transaction as the statistics: a failure while
    writing the preview (here a full disk) leaves no file of the case."""
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(aspects_preview, "write_aspects_preview", full_disk)
    out = tmp_path / "out"
    code, _, err = run(["stats", str(files["low"]), "--labels", str(files["labels"]), "-o", str(out)], capsys)
    assert code == EXIT_INPUT_ERROR and "no space left" in err
    assert not out.exists() or names(out) == []


# ----------------------------------------------------------------------------- the picture

def test_region_panel_draws_only_the_final_calls_red():
    labels = np.zeros((40, 60), np.uint8)
    labels[10:30, 5:25] = M2_LEFT.label
    labels[10:30, 35:55] = M2_LEFT.mirror_label
    hu = np.full(labels.shape, 30.0, np.float32)

    def red(affected: List[int]) -> np.ndarray:
        panel = aspects_preview.region_panel(hu, labels, affected, level_hu=30.0)
        return np.all(panel == aspects_preview.WARNING_COLOUR, axis=-1)
    assert not red([]).any()
    marked = red([M2_LEFT.label])
    border = aspects_preview.outline(labels == M2_LEFT.label, aspects_preview.AFFECTED_OUTLINE_PX)
    assert border.sum() == 20 * 20 - 14 * 14
    assert marked[border].mean() > 0.75     # the rest is under the code written on it (M2)
    assert not marked[~border].any()


def test_an_override_changes_the_picture(case):
    img = lowered(case, M2_LEFT.label)
    result = aspects.assess(img, case.labels_scan, with_evidence_map=False)

    def red_pixels() -> int:
        picture = aspects_preview.aspects_picture(img, case.labels_scan, result)
        return int(np.all(picture == aspects_preview.WARNING_COLOUR, axis=-1).sum())
    called = red_pixels()
    result.set_override(M2_LEFT.label, False)
    assert red_pixels() == (7 * 2) ** 2 < called     # only the key's swatch is left
    assert "left: none" in aspects_preview.affected_line(result)
    assert aspects_preview.score_line(result).startswith("ASPECTS left 10, right 10 (symptomatic side left: ")


# ----------------------------------------------------------------------------- with segmentation

def test_read_out_after_segmenting_with_the_bundled_model(files, tmp_path, capsys):
    folders = [f for f in models.list_model_folders() if models.read_card(f).kind == "3d"]
    if not folders:
        pytest.skip("no bundled 3D model")
    code, out, err = run(["stats", str(files["low"]), "--transform", str(files["tf"]), "--mode", "3d",
                          "--model", str(folders[0]), "--device", "cpu", "-o", str(tmp_path)], capsys)
    assert code == 0, err
    assert set(READ_OUT) <= set(names(tmp_path)) and "low-aspects.nii.gz" in names(tmp_path)
    summary = strict_json(tmp_path / "low-stats.json")["aspects"]
    # the crude phantom is far from the model's training heads: its predicted insula takes
    # in some of the lowered M2 and may be called too; M2 must be, and nothing on the right
    assert "M2 left" in summary["affected"]["left"] and len(summary["affected"]["left"]) <= 2
    assert summary["score_left"] == 10 - len(summary["affected"]["left"]) and summary["score_right"] == 10
    details = strict_json(tmp_path / "low-aspects-score.json")
    darkest = min(details["regions"], key=lambda r: r["darkest_part_hu"] if r["darkest_part_hu"] is not None else 0)
    assert darkest["region"] == "M2 left"


def test_another_read_out_card_is_used_and_a_broken_one_refused(files, tmp_path, capsys):
    """--aspects-card: the calls come from the card given (here one whose threshold every
    region reaches); a broken card stops the run before anything is written."""
    card = json.loads(aspects_card.default_card_path().read_text())
    card["threshold"] = -1e6
    strict = tmp_path / "lax.json"
    strict.write_text(json.dumps(card))
    out_dir = tmp_path / "out"
    code, _, err = run(["stats", str(files["low"]), "--labels", str(files["labels"]), "--aspects-card", str(strict),
                        "-o", str(out_dir)], capsys)
    assert code == 0, err
    data = strict_json(out_dir / "low-aspects-score.json")
    assert data["aspects"]["score_right"] == 0 and data["settings"]["card"] == str(strict)
    m3 = next(r for r in data["regions"] if r["region"] == "M3 right")
    assert m3["called"] and m3["reasons"][0].startswith("call score") and abs(m3["measures"]["mean"]) < 1.0
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({**card, "weights": {}}))
    code, _, err = run(["stats", str(files["low"]), "--labels", str(files["labels"]), "--aspects-card", str(broken),
                        "-o", str(tmp_path / "none")], capsys)
    assert code == EXIT_INPUT_ERROR and "read-out card" in err and "not valid" in err and "Traceback" not in err
    assert not (tmp_path / "none").exists()


def test_a_card_fitted_with_other_read_out_settings_warns(files, tmp_path, capsys):
    """A card records the read-out settings its measures were made with; used with an
    engine whose settings differ (here the fluid margin of an older version), the run
    still reads out but says, once, which setting differs and to refit."""
    card = json.loads(aspects_card.default_card_path().read_text())
    card["readout"]["csf_margin_mm"] = 1.5
    old = tmp_path / "old.json"
    old.write_text(json.dumps(card))
    code, _, err = run(["stats", str(files["low"]), "--labels", str(files["labels"]), "--aspects-card", str(old),
                        "-o", str(tmp_path / "out")], capsys)
    assert code == 0, err
    data = strict_json(tmp_path / "out" / "low-aspects-score.json")
    assert data["settings"]["card_readout_mismatch"] == [f"csf_margin_mm: 1.5 -> {aspects.CSF_MARGIN_MM!r}"]
    assert data["settings"]["card_readout"] == "differs from this engine's"
    assert len(data["warnings"]) == 1 and "csf_margin_mm: 1.5 -> 3.0" in data["warnings"][0]
    assert "aspects_fit" in data["warnings"][0] and "csf_margin_mm: 1.5" in err
    assert data["aspects"]["affected"] == ["M2 left"]     # the read-out itself still runs
