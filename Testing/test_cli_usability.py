"""The command line as a researcher meets it (issue 15): one JSON document, quiet on a
closed pipe, warnings that are printed and recorded, several inputs per call, previews,
uncertainty, help texts. Every test goes through the command (exit status, message,
files), with the tiny real models of ``conftest.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from BrainLobeSegLib import cli
from BrainLobeSegLib.console import EXIT_CLOSED_PIPE

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT / "BrainLobeSeg"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_cli(args: List[str], capsys) -> Tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_models_json_is_one_document(tiny_models, capsys):
    code, out, err = run_cli(["models", "--model", str(tiny_models), "--json"], capsys)
    assert code == 0 and err == ""
    cards = json.loads(out)                       # the whole output parses as one document
    assert [c["name"] for c in cards] == ["tiny-3d", "tiny-planar"]
    assert all(Path(c["folder"]).is_dir() and c["networks"] for c in cards)


def test_models_json_without_models_is_an_empty_list(tmp_path, capsys):
    code, out, err = run_cli(["models", "--model", str(tmp_path), "--json"], capsys)
    assert code == cli.EXIT_NO_MODELS and json.loads(out) == [] and "no models in" in err


@pytest.mark.parametrize("command", [
    ["-m", "BrainLobeSegLib.cli", "models", "--model", "{models}"],
    ["-m", "BrainLobeSegLib.cli", "models", "--model", "{models}", "--json"],
    ["-m", "BrainLobeSegLib.cli", "segment", "--help"],
    ["-m", "training", "export", "--help"],
], ids=["models", "models-json", "segment-help", "training-help"])
def test_a_closed_pipe_ends_quietly(command, tiny_models):
    """`brainlobeseg models | head -1` used to end in "internal error: BrokenPipeError".
    Here the reading end is closed before the command writes: no traceback, no error
    line, exit 141 (a shell's status for a command stopped by a closed pipe) or 0 where
    Python never saw the pipe break (argparse's help is written at exit)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable] + [a.format(models=tiny_models) for a in command],
                              stdout=write, stderr=subprocess.PIPE, text=True, env=ENV, timeout=120)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode in (0, EXIT_CLOSED_PIPE), proc.stderr
    if "models" in command:
        assert proc.returncode == EXIT_CLOSED_PIPE


# --------------------------------------------------------------------------- --force on a non-CT

def test_force_on_a_non_ct_warns_and_records_it(tmp_path, tiny_models, capsys):
    """`--force` keeps a non-CT segmentable, but no longer silently: one warning line on
    stderr, and the warning travels with the results (`<case>-warnings.txt` for segment,
    `warnings` in the stats JSON)."""
    from test_robustness import mr_like, write
    scan = write(mr_like(), tmp_path / "mr.nii.gz")
    out = tmp_path / "out"
    code, _, err = run_cli(["segment", str(scan), "--assume-upright", "--force", "--model",
                            str(tiny_models), "-o", str(out)], capsys)
    assert code == 0
    lines = [ln for ln in err.splitlines() if ln.startswith("brainlobeseg: warning: mr:")]
    assert len(lines) == 1 and "does not look like a CT" in lines[0] and "--force" in lines[0]
    recorded = (out / "mr-warnings.txt").read_text(encoding="utf-8")
    assert "does not look like a CT" in recorded and "regions are likely meaningless" in recorded
    code, _, err = run_cli(["stats", str(scan), "--assume-upright", "--force", "--mode", "3d",
                            "--model", str(tiny_models), "-o", str(tmp_path / "stats")], capsys)
    assert code == 0 and "does not look like a CT" in err
    report = json.loads((tmp_path / "stats" / "mr-stats.json").read_text(encoding="utf-8"))
    assert any("does not look like a CT" in w for w in report["warnings"])


def test_a_ct_gets_no_warnings_file(tmp_path, tiny_models, capsys):
    from test_robustness import head_image, write
    scan = write(head_image(), tmp_path / "ct.nii.gz")
    code, _, err = run_cli(["segment", str(scan), "--assume-upright", "--mode", "3d", "--model",
                            str(tiny_models), "-o", str(tmp_path / "out")], capsys)
    assert code == 0 and "warning" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(cli.output_names("ct"))


# --------------------------------------------------------------------------- several inputs

@pytest.fixture()
def scans(tmp_path):
    """Two loose scan files (NIfTI and MetaImage) and a dataset folder of two cases."""
    from test_robustness import head_image, write
    loose = tmp_path / "loose"
    loose.mkdir()
    write(head_image(seed=1), loose / "a.nii.gz")
    write(head_image(seed=2), loose / "b.mha")
    data = tmp_path / "data"
    from BrainLobeSegLib import dataset
    for name, seed in (("1", 3), ("2", 4)):
        dataset.write_case(data, head_image(seed=seed), None, name=name)
    return loose, data


def test_segment_takes_files_folders_and_globs(scans, tmp_path, tiny_models, capsys):
    loose, data = scans
    out = tmp_path / "out"
    code, stdout, err = run_cli(["segment", str(loose / "*.nii.gz"), str(loose / "b.mha"), str(data),
                                 "--assume-upright", "--mode", "3d", "--model", str(tiny_models),
                                 "-o", str(out)], capsys)
    assert code == 0, err
    for case in ("a", "b", "1", "2"):
        assert all((out / n).is_file() for n in cli.output_names(case)), case
    assert "4 of 4 cases segmented" in stdout


def test_bad_inputs_are_refused_before_any_work(scans, tmp_path, tiny_models, capsys):
    loose, data = scans
    out = tmp_path / "out"
    base = ["--assume-upright", "--mode", "3d", "--model", str(tiny_models), "-o", str(out)]
    for inputs, words in (([str(loose / "a.nii.gz"), str(tmp_path / "missing.nii.gz")], "scan not found"),
                          ([str(loose / "*.nrrd")], "no scan matches"),
                          ([str(loose / "a.nii.gz"), str(tmp_path / "a.nii.gz")], None)):
        if words is None:   # two inputs named a: the second is a copy elsewhere
            (tmp_path / "a.nii.gz").write_bytes((loose / "a.nii.gz").read_bytes())
            words = "two inputs make the case name a"
        code, _, err = run_cli(["segment", *inputs, *base], capsys)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    code, _, err = run_cli(["segment", str(data), "--transform", str(tmp_path / "t.txt"), *base], capsys)
    assert code == 2 and "--transform goes with one scan; 2 cases were given" in err


def test_skip_existing_and_announced_replacement(scans, tmp_path, tiny_models, capsys):
    _, data = scans
    out = tmp_path / "out"
    args = ["segment", str(data), "--assume-upright", "--mode", "3d", "--model", str(tiny_models),
            "-o", str(out)]
    assert run_cli(args, capsys)[0] == 0
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, stdout, _ = run_cli(args + ["--skip-existing"], capsys)
    assert code == 0 and stdout.count("skipped, its results are in") == 2
    assert "0 of 2 cases segmented, 2 skipped" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    code, stdout, _ = run_cli(args, capsys)
    assert code == 0 and stdout.count("replacing its earlier results in") == 2


def test_quiet_and_verbose(scans, tmp_path, tiny_models, capsys):
    loose, _ = scans
    args = ["segment", str(loose / "a.nii.gz"), "--assume-upright", "--mode", "3d", "--model",
            str(tiny_models), "-o", str(tmp_path / "out")]
    code, stdout, err = run_cli(args + ["--quiet"], capsys)
    assert code == 0 and stdout == "" and err == ""
    assert (tmp_path / "out" / "a-aspects.seg.nrrd").is_file()
    code, stdout, _ = run_cli(args + ["--verbose"], capsys)
    assert code == 0 and "model: tiny-3d 0.0.test [3d]" in stdout and "a: steps " in stdout
    with pytest.raises(SystemExit):
        cli.main(args + ["--quiet", "--verbose"])


def test_stats_takes_a_folder(scans, tmp_path, tiny_models, capsys):
    _, data = scans
    out = tmp_path / "stats"
    code, stdout, err = run_cli(["stats", str(data), "--assume-upright", "--mode", "planar", "--model",
                                 str(tiny_models), "-o", str(out)], capsys)
    assert code == 0, err
    assert "== 1 ==" in stdout and "== 2 ==" in stdout
    for case in ("1", "2"):
        report = json.loads((out / f"{case}-stats.json").read_text(encoding="utf-8"))
        assert report["scan"].endswith(f"{case}.nii.gz") and len(report["regions"]) == 20
    code, _, err = run_cli(["stats", str(data), "--labels", str(data / "1.nii.gz"), "-o", str(out)], capsys)
    assert code == 2 and "--labels goes with one scan" in err


# --------------------------------------------------------------------------- preview, uncertainty

def test_preview_has_the_overlay_orientation_and_legend(scans, tmp_path, tiny_models, capsys):
    """`segment --preview` writes the demo's picture: two levels, A/P/R/L, the orientation
    line and a legend whose swatches hold all 20 region colours."""
    import numpy as np
    import SimpleITK as sitk
    from BrainLobeSegLib import preview, regions
    loose, _ = scans
    out = tmp_path / "out"
    code, _, err = run_cli(["segment", str(loose / "a.nii.gz"), "--assume-upright", "--preview",
                            "--mode", "3d", "--model", str(tiny_models), "-o", str(out)], capsys)
    assert code == 0, err
    picture = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "a-overlay.png")))
    assert picture.ndim == 3 and picture.shape[2] == 3
    colours = {tuple(c) for c in picture.reshape(-1, 3)}
    assert all(tuple(r.color) in colours for r in regions.REGIONS)
    note = preview.text_image(preview.ORIENTATION_NOTE)
    h, w = note.shape[:2]
    found = [(y, x) for y in range(picture.shape[0] - h) for x in (16,)
             if np.array_equal(picture[y:y + h, x:x + w], note)]
    assert found, "the orientation line is not in the picture"


@pytest.mark.parametrize("mode", ["planar", "ensemble", "3d"])
def test_segment_writes_the_uncertainty(mode, scans, tmp_path, tiny_models, capsys):
    import SimpleITK as sitk
    loose, _ = scans
    out = tmp_path / "out"
    code, _, err = run_cli(["segment", str(loose / "a.nii.gz"), "--assume-upright", "--uncertainty",
                            "--mode", mode, "--model", str(tiny_models), "-o", str(out)], capsys)
    assert code == 0, err
    unc = sitk.ReadImage(str(out / "a-uncertainty.nii.gz"))
    scan = sitk.ReadImage(str(loose / "a.nii.gz"))
    assert unc.GetSize() == scan.GetSize() and unc.GetPixelID() == sitk.sitkFloat32
    values = sitk.GetArrayViewFromImage(unc)
    assert 0.0 <= values.min() and values.max() <= 1.0 and values.max() > 0.0


def test_a_low_dice_in_the_card_warns_when_the_model_is_used(scans, tmp_path, capsys):
    """A model whose card records a held-out mean Dice of 0.05 (a few iterations) warns
    once per run, the warning lands in each case's warnings file, and `models` marks it."""
    from conftest import make_tiny_model
    folder = make_tiny_model(tmp_path / "models" / "weak-3d", "3d")
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    card["metrics"] = {"mean_dice": 0.05, "cases": 3}
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    _, data = scans
    out = tmp_path / "out"
    code, _, err = run_cli(["segment", str(data), "--assume-upright", "--mode", "3d", "--model",
                            str(folder), "-o", str(out)], capsys)
    assert code == 0
    lines = [ln for ln in err.splitlines() if "held-out mean Dice of 0.050" in ln]
    assert len(lines) == 1 and lines[0].startswith("brainlobeseg: warning: model tiny-3d")
    for case in ("1", "2"):
        assert "held-out mean Dice of 0.050" in (out / f"{case}-warnings.txt").read_text(encoding="utf-8")
    code, stdout, _ = run_cli(["models", "--model", str(tmp_path / "models")], capsys)
    assert "held-out mean Dice: 0.05 (low: below 0.7)" in stdout
