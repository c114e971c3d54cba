"""The result quality check (issue 14): an empty result is an error, an implausible one a
warning with a ``N-qc.json``, a normal one passes silently."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BrainLobeSegLib import cli, models, quality, regions, transforms
from BrainLobeSegLib.errors import EXIT_INPUT_ERROR

from conftest import make_tiny_model
from test_robustness import assert_nothing_written, head_image, leftovers, tree_hashes, write

PHANTOM = dict(size=(160, 160, 64), spacing=(1.4, 1.4, 2.5), angles_deg=(8.0, -6.0, 10.0), seed=2)


def background_only_model(folder: Path) -> Path:
    """A real tiny 3D model whose output layer always prefers background."""
    make_tiny_model(folder, "3d")
    state = torch.load(folder / "unet3d.pt", weights_only=True)
    state["head.bias"][0] = 1e4
    torch.save(state, folder / "unet3d.pt")
    card = json.loads((folder / models.CARD_NAME).read_text(encoding="utf-8"))
    card["networks"]["unet3d"]["sha256"] = models.sha256_of(folder / "unet3d.pt")
    (folder / models.CARD_NAME).write_text(json.dumps(card), encoding="utf-8")
    return folder


def run(args, capfd):
    code = cli.main(["segment", *args, "--device", "cpu"])
    out, err = capfd.readouterr()
    return code, out, [ln for ln in err.splitlines() if ln.strip()]


def test_no_region_found_is_an_error(tmp_path, capfd):
    model = background_only_model(tmp_path / "empty-3d")
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    scan = write(head_image(), indir / "case.nii.gz")
    before = tree_hashes(indir)
    code, _, lines = run([str(scan), "-o", str(outdir), "--model", str(model), "--mode", "3d",
                          "--assume-upright"], capfd)
    assert code == EXIT_INPUT_ERROR and len(lines) == 1, lines
    assert lines[0].startswith("brainlobeseg: error: no ASPECTS region was found"), lines[0]
    assert_nothing_written(outdir)
    assert tree_hashes(indir) == before


def _labels(volumes_ml: dict, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    """A label image holding ``volumes_ml[label]`` ml of each label (1 ml = 1000 voxels)."""
    flat = np.concatenate([np.full(int(v * 1000), k, np.uint8) for k, v in volumes_ml.items()]
                          + [np.zeros(1000, np.uint8)])
    n = int(np.ceil(flat.size / 10000.0)) * 10000
    arr = np.zeros(n, np.uint8)
    arr[: flat.size] = flat
    img = sitk.GetImageFromArray(arr.reshape(-1, 100, 100))
    img.SetSpacing(spacing)
    return img


RANGES = {"all_regions": True, "total_ml": [200, 1200], "region_ml": [0.5, 150], "max_lr_ratio": 1.5}


def test_check_labels_cases():
    normal = {r.label: 20.0 for r in regions.REGIONS}
    with warnings.catch_warnings():
        warnings.simplefilter("error", quality.QualityWarning)
        assert quality.check_labels(_labels(normal), RANGES).ok
    lopsided = {**normal, **{r.label: 2.0 for r in regions.REGIONS if r.side == "right"}}
    with pytest.warns(quality.QualityWarning, match="left 200 ml vs right 20 ml"):
        assert not quality.check_labels(_labels(lopsided), RANGES).ok
    missing = {k: v for k, v in normal.items() if k != 3}
    with pytest.warns(quality.QualityWarning, match="1 regions missing"):
        quality.check_labels(_labels(missing), RANGES)
    assert quality.check_labels(_labels(missing), {}).ok   # no card ranges: only "empty" counts


@pytest.fixture(scope="module")
def bundled_3d():
    folders = [f for f in models.list_model_folders() if models.read_card(f).kind == "3d"]
    if not folders:
        pytest.skip("no bundled 3D model")
    return folders[0]


def _phantom_case(folder: Path, half: bool):
    phantom = pytest.importorskip("BrainLobeSegLib.phantom")
    case = phantom.make_scan(**PHANTOM)
    ct = case.ct
    if half:   # one side of the scan blanked to air
        arr = sitk.GetArrayFromImage(ct)
        arr[:, :, : arr.shape[2] // 2] = -1000
        ct = sitk.GetImageFromArray(arr)
        ct.CopyInformation(case.ct)
    scan = write(ct, folder / "case.nii.gz")
    transforms.write_transform(str(folder / "case.txt"), case.transform)
    return [str(scan), "--transform", str(folder / "case.txt")]


@pytest.mark.parametrize("half", [False, True], ids=["normal scan", "half-blanked head"])
def test_quality_with_the_bundled_model(half, bundled_3d, tmp_path, capfd):
    """A normal phantom: no warning, no qc.json. Half the head blanked (16 % of the normal
    volume, silently, before): exit 0, one warning line, ``case-qc.json`` beside the outputs."""
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    args = _phantom_case(indir, half)
    code, out, lines = run([*args, "-o", str(outdir), "--model", str(bundled_3d), "--mode", "3d"], capfd)
    assert code == 0, lines
    names = sorted(p.name for p in outdir.iterdir())
    assert leftovers(outdir) == []
    if not half:
        assert lines == [] and "case-qc.json" not in names, lines
        return
    assert len(lines) == 1 and lines[0].startswith("brainlobeseg: warning: case: the result of"), lines
    assert "looks implausible" in lines[0] and "left" in lines[0]
    qc = json.loads((outdir / "case-qc.json").read_text(encoding="utf-8"))
    assert qc["ok"] is False and qc["problems"] and qc["total_ml"] < 400


def narrow_range_model(folder: Path) -> Path:
    """A real tiny 3D model whose card says a result holds 100-200 litres: every result it
    gives is implausible by its own card (the quality check warns, ``N-qc.json`` is due)."""
    make_tiny_model(folder, "3d")
    card = json.loads((folder / models.CARD_NAME).read_text(encoding="utf-8"))
    card["quality"] = {"total_ml": [100000, 200000]}
    (folder / models.CARD_NAME).write_text(json.dumps(card), encoding="utf-8")
    return folder


def test_stats_writes_the_qc_file_like_segment(tmp_path, capfd):
    """Issue 14: ``stats`` printed the quality warning, which points at ``-qc.json``, but
    wrote no such file (only ``segment`` did). Now the same file, next to its outputs."""
    model = narrow_range_model(tmp_path / "narrow-3d")
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    scan = write(head_image(), indir / "case.nii.gz")
    before = tree_hashes(indir)
    # --no-aspects: the random model's labels give no ASPECTS read-out, only its own warning
    code = cli.main(["stats", str(scan), "-o", str(outdir), "--model", str(model), "--mode", "3d",
                     "--assume-upright", "--device", "cpu", "--quiet", "--no-aspects"])
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert code == 0, lines
    assert len(lines) == 1 and "looks implausible" in lines[0] and "-qc.json" in lines[0], lines
    qc = json.loads((outdir / "case-qc.json").read_text(encoding="utf-8"))
    assert qc["ok"] is False and "outside 100000-200000 ml" in qc["problems"][0], qc
    assert (outdir / "case-stats.json").exists() and leftovers(outdir) == []
    assert tree_hashes(indir) == before
