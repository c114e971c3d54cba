"""``python -m training evaluate`` end to end on two small phantom cases and tiny models.

The tiny models have random weights, so the numbers are meaningless; these tests check
structure (every model row, every file, strict JSON, what export reads) and that the
metrics path scores a perfect prediction as 1 when the truth itself is fed through it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import dataset, phantom, regions
from BrainLobeSegLib.errors import InputError
from BrainLobeSegLib.inference import Segmenter
from training import evaluate as E
from training.__main__ import main as training_main

REFINE_MM = 2.0   # the engine's 1 mm refinement costs memory a 2-core CI box lacks
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two labelled cases in the dataset layout: thin-ish slices upright, 5 mm tilted,
    plus one unlabelled case that evaluation must skip."""
    root = tmp_path_factory.mktemp("evaldata")
    phantom.write_case(phantom.make_scan(size=(64, 64, 40), spacing=(4.0, 4.0, 2.5),
                                         angles_deg=(0.0, 0.0, 0.0), seed=1), str(root), "1")
    phantom.write_case(phantom.make_scan(size=(56, 56, 32), spacing=(3.5, 3.5, 5.0),
                                         angles_deg=(10.0, -6.0, 8.0), seed=2), str(root), "2")
    extra = phantom.make_scan(size=(48, 48, 24), spacing=(4.0, 4.0, 5.0), angles_deg=(0, 0, 0), seed=3)
    dataset.write_case(root, extra.ct, None, transform=extra.transform, name="3")
    return root


@pytest.fixture(scope="module")
def report(data_dir, tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "rep"
    lines = []
    result = E.evaluate(data_dir, tiny_models, out, device="cpu", overlays=1,
                        refine_mm=REFINE_MM, threads=1, log=lines.append)
    return out, result, lines


def test_every_model_is_evaluated_and_every_file_written(report):
    out, result, lines = report
    assert result["evaluated"] == list(E.MODEL_ORDER)
    names = {p.name for p in out.iterdir()}
    expected = {"report.md", "metrics.json", "dice_per_region.png", "overlay_1.png"} | {
        f"confusion_{m}.png" for m in E.MODEL_ORDER}
    assert expected <= names
    assert not any(n.startswith(".partial") for n in names)
    for png in expected - {"report.md", "metrics.json"}:
        assert (out / png).read_bytes()[:8] == PNG_MAGIC, png
    # progress: one line per case, the unlabelled case named as skipped
    assert any("skipping 1 case" in line and "3" in line for line in lines)
    assert sum(line.startswith("[") for line in lines) == 2


def test_metrics_json_structure(report):
    out, result, _ = report
    data = json.loads((out / "metrics.json").read_text(encoding="utf-8"), parse_constant=_no_constants)
    assert data == result
    assert [c["name"] for c in data["cases"]] == ["1", "2"]
    assert set(data["models"]) == {"planar", "3d"}
    segment_names = [r.segment_name for r in regions.REGIONS]
    for model in E.MODEL_ORDER:
        s = data["summary"][model]
        assert s["cases"] == 2
        assert list(s["regions"]) == segment_names
        assert np.array(s["confusion_matrix"]).shape == (regions.NUM_LABELS + 1,) * 2
        assert isinstance(s["lr_confusion_free"], bool)
        assert s["mean_dice"] is None or 0.0 <= s["mean_dice"] <= 1.0
        for r in s["regions"].values():
            assert {"dice", "iou", "dice_mirror", "fp_fn_ratio", "misclassified", "missed",
                    "cases", "lr_flagged_cases"} <= set(r)
    # each case's voxels are all counted, once per model
    sizes = [int(np.prod(c["size"])) for c in data["cases"]]
    assert sum(map(sum, data["summary"]["3d"]["confusion_matrix"])) == sum(sizes)


def test_cases_carry_thickness_tilt_and_timings(report):
    _, result, _ = report
    one, two = result["cases"]
    assert one["slice_mm"] == pytest.approx(2.5) and one["thickness_bin"] == "2.5 mm (1.5-3.5)"
    assert two["slice_mm"] == pytest.approx(5.0) and two["thickness_bin"] == "5 mm (>3.5)"
    assert one["tilt_deg"] == pytest.approx(0.0, abs=1e-6) and one["tilt_bin"] == "0-5 deg"
    assert 12.0 < two["tilt_deg"] < 15.0 and two["tilt_bin"] == "10-15 deg"
    for c in (one, two):
        assert set(c["seconds"]) == {"planar", "3d", "ensemble"}
        assert c["seconds"]["ensemble"] >= c["seconds"]["planar"] + c["seconds"]["3d"]
        assert set(c["models"]) == set(E.MODEL_ORDER)
    s = result["summary"]["ensemble"]
    assert set(s["by_thickness"]) == {"2.5 mm (1.5-3.5)", "5 mm (>3.5)"}
    assert set(s["by_tilt"]) == {"0-5 deg", "10-15 deg"}
    assert all(g["cases"] == 1 for g in s["by_tilt"].values())


def test_report_has_every_section(report):
    out, _, _ = report
    text = (out / "report.md").read_text(encoding="utf-8")
    for heading in ("## Summary", "## Dice per region", "## Left/right check",
                    "## By slice thickness and tilt", "## Confusion matrices", "## Cases",
                    "## Timings", "## Overlays"):
        assert heading in text
    for picture in ("dice_per_region.png", "confusion_planar.png", "overlay_1.png"):
        assert f"]({picture})" in text
    assert not re.search(r"\bnan\b|\binf\b", text, re.I)


def test_summarise_gives_what_export_stores(report):
    _, result, _ = report
    summary = E.summarise(result)
    assert set(summary) == set(E.MODEL_ORDER)
    for kind in ("planar", "3d"):
        entry = summary[kind]
        assert {"mean_dice", "dice", "lr_confusion_free", "cases", "data"} <= set(entry)
        assert list(entry["dice"]) == [r.segment_name for r in regions.REGIONS]
    assert set(summary["planar"]["planes"]) == {"axial", "coronal", "sagittal"}
    json.dumps(summary, allow_nan=False)
    with pytest.raises(InputError, match="metrics.json"):
        E.summarise({"something": "else"})


def test_ensemble_from_parts_equals_the_engine_ensemble(data_dir, tiny_models):
    """The evaluation fuses kept probabilities instead of a third inference run: it must
    give the ensemble mode's labels voxel for voxel."""
    ct, tf, _ = dataset.read_case(dataset.list_cases(data_dir)[1])
    segs = E.load_segmenters(tiny_models, "cpu", refine_mm=REFINE_MM)
    preds, _ = E.predict_case(segs, ct, tf)
    engine = Segmenter("ensemble", tiny_models, "cpu", refine_mm=REFINE_MM).segment(ct, tf)
    assert np.array_equal(preds["ensemble"], sitk.GetArrayFromImage(engine.labels_upright))
    alone = Segmenter("planar", tiny_models, "cpu", refine_mm=REFINE_MM).segment(ct, tf)
    assert np.array_equal(preds["planar"], sitk.GetArrayFromImage(alone.labels_upright))
    assert all(p.shape == ct.GetSize()[::-1] and p.dtype == np.uint8 for p in preds.values())


def test_perfect_predictions_score_one(data_dir, tiny_models, tmp_path, monkeypatch):
    """The truth fed through the whole metrics path (aggregation, JSON, report) as every
    model's prediction scores exactly 1, with no left/right confusion."""
    real_read = E.read_case
    last = {}

    def read_and_remember(case, invert=False):
        ct, tf, seg = real_read(case, invert)
        last["truth"] = sitk.GetArrayFromImage(seg)
        return ct, tf, seg

    def truth_as_prediction(segmenters, ct, tf, fusion="mean"):
        preds = {m: last["truth"].copy() for m in E.MODEL_ORDER}
        return preds, {"seconds": {"planar": 0.0, "3d": 0.0, "ensemble": 0.0}, "stages": {}}

    monkeypatch.setattr(E, "read_case", read_and_remember)
    monkeypatch.setattr(E, "predict_case", truth_as_prediction)
    result = E.evaluate(data_dir, tiny_models, tmp_path / "perfect", device="cpu", overlays=0,
                        log=lambda _: None)
    for model in E.MODEL_ORDER:
        s = result["summary"][model]
        assert s["mean_dice"] == 1.0 and s["mean_iou"] == 1.0
        assert s["misclassification_rate"] == 0.0 and s["missed_rate"] == 0.0
        assert s["lr_confusion_free"] and not s["lr_flagged"]
        assert all(r["dice"] == 1.0 and r["dice_mirror"] == 0.0 for r in s["regions"].values())
    assert E.summarise(result)["3d"]["lr_confusion_free"] is True
    assert not list((tmp_path / "perfect").glob("overlay_*"))


def test_cli_one_model_folder_and_limit(data_dir, tiny_models, tmp_path, capsys):
    """`python -m training evaluate` with a single (3D) model folder: only its row."""
    out = tmp_path / "cli"
    code = training_main(["evaluate", "--data", str(data_dir), "--model", str(tiny_models / "tiny-3d"),
                          "--out", str(out), "--device", "cpu", "--limit", "1", "--overlays", "0",
                          "--refine-mm", str(REFINE_MM)])
    assert code == 0
    data = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert data["evaluated"] == ["3d"] and len(data["cases"]) == 1
    assert "ensemble" not in E.summarise(data)
    assert "[1/1] case 1" in capsys.readouterr().out


def test_folder_without_labels_is_an_input_error(tmp_path, tiny_models, capsys):
    case = phantom.make_scan(size=(32, 32, 16), spacing=(6.0, 6.0, 8.0), angles_deg=(0, 0, 0), seed=4)
    dataset.write_case(tmp_path / "nolabels", case.ct, None, name="1")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no labels"):
        E.evaluate(tmp_path / "nolabels", tiny_models, out, device="cpu")
    assert not out.exists() or not list(out.iterdir())
    code = training_main(["evaluate", "--data", str(tmp_path / "nolabels"), "--model",
                          str(tiny_models), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no labels" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_model_folder_is_an_input_error(data_dir, tmp_path):
    with pytest.raises(InputError, match="not found"):
        E.evaluate(data_dir, tmp_path / "nowhere", tmp_path / "out", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no model folders"):
        E.evaluate(data_dir, tmp_path / "empty", tmp_path / "out", device="cpu")


def test_bins():
    assert E.bin_name(0.625, E.THICKNESS_BINS) == "<=1.5 mm"
    assert E.bin_name(1.5, E.THICKNESS_BINS) == "<=1.5 mm"
    assert E.bin_name(2.5, E.THICKNESS_BINS) == "2.5 mm (1.5-3.5)"
    assert E.bin_name(5.0, E.THICKNESS_BINS) == "5 mm (>3.5)"
    assert E.bin_name(4.9, E.TILT_BINS) == "0-5 deg"
    assert E.bin_name(25.0, E.TILT_BINS) == ">15 deg"


def _no_constants(name: str):
    raise AssertionError(f"metrics.json holds {name}, which is not JSON")


def _small_case(root: Path, name: str, seed: int) -> None:
    phantom.write_case(phantom.make_scan(size=(32, 32, 16), spacing=(6.0, 6.0, 8.0),
                                         angles_deg=(0.0, 0.0, 0.0), seed=seed), str(root), name)


def _hashes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_failed_evaluation_leaves_no_report_folder(tmp_path, tiny_models, capsys):
    """Issue 14: a case that fails mid-run (labels 99 in its N-seg file) left an empty
    report folder behind. Now exit 2, one line, no folder, the dataset unchanged."""
    data = tmp_path / "data"
    _small_case(data, "1", seed=4)
    _small_case(data, "2", seed=5)
    seg = sitk.ReadImage(str(data / "2-seg.nii.gz"))
    sitk.WriteImage(sitk.Cast(seg, sitk.sitkUInt8) * 0 + 99, str(data / "2-seg.nii.gz"))
    before = _hashes(data)
    out = tmp_path / "reports" / "run"
    code = training_main(["evaluate", "--data", str(data), "--model", str(tiny_models / "tiny-3d"),
                          "--out", str(out), "--device", "cpu", "--overlays", "0",
                          "--refine-mm", str(REFINE_MM), "--threads", "1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("training evaluate: error: ") and "not label ids" in err[0], err
    assert not out.exists() and not (tmp_path / "reports").exists()
    assert _hashes(data) == before


def test_all_zero_label_file_is_warned_about(tmp_path, tiny_models):
    """Issue 14: a label file of zeros was scored without a word; now one warning line."""
    data = tmp_path / "data"
    _small_case(data, "1", seed=4)
    _small_case(data, "2", seed=5)
    seg = sitk.ReadImage(str(data / "2-seg.nii.gz"))
    sitk.WriteImage(sitk.Cast(seg, sitk.sitkUInt8) * 0, str(data / "2-seg.nii.gz"))
    lines: list = []
    E.evaluate(data, tiny_models / "tiny-3d", tmp_path / "out", device="cpu", overlays=0,
               refine_mm=REFINE_MM, threads=1, log=lines.append)
    warned = [ln for ln in lines if ln.startswith("warning:")]
    assert warned == ["warning: case 2: its label file 2-seg.nii.gz is all zero (no region "
                      "labelled); check that it is the right file."], lines
    assert (tmp_path / "out" / "metrics.json").exists()
