"""Same input, same output (issue 6): two CPU runs give identical labels.

A radiologist who runs the tool twice on one scan, or a study that re-runs a cohort, must
get the same regions. Checked with the tiny random models (no bundled models needed) in
every mode, through a fresh :class:`Segmenter` each time (models loaded again), through
the CLI's files, and across two separate processes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import cli, transforms
from BrainLobeSegLib.inference import Segmenter

from test_robustness import head_image, itksnap_text, rotation_matrix, write

POSE = list(rotation_matrix((9.0, -7.0, 12.0)).ravel()) + [4.0, -3.0, 2.0]


def labels(result) -> np.ndarray:
    return sitk.GetArrayFromImage(result.labels_scan)


@pytest.mark.parametrize("mode", ["planar", "3d", "ensemble"])
def test_two_runs_identical(mode, tiny_models, tmp_path):
    """Two Segmenters (models loaded twice) on the same tilted scan: identical labels on
    the scan grid, in the upright space and on the model grid, not merely close."""
    scan = head_image()
    (tmp_path / "t.txt").write_text(itksnap_text(POSE), encoding="utf-8")
    tf = transforms.read_transform(str(tmp_path / "t.txt"))
    first = Segmenter(mode, tiny_models, "cpu").segment(scan, tf, keep_probabilities=True)
    second = Segmenter(mode, tiny_models, "cpu").segment(scan, tf, keep_probabilities=True)
    np.testing.assert_array_equal(labels(first), labels(second))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(first.labels_upright),
                                  sitk.GetArrayFromImage(second.labels_upright))
    np.testing.assert_array_equal(first.labels_grid, second.labels_grid)
    # bit for bit, before the argmax too: random tiny nets may well give one label
    # everywhere, so equal labels alone would prove little
    assert first.probabilities is not None
    assert np.array_equal(first.probabilities, second.probabilities)
    assert labels(first).any()


def test_segmenting_does_not_change_the_scan(tiny_models):
    """The input image object is not modified in place (a caller may reuse it)."""
    scan = head_image()
    before = sitk.GetArrayFromImage(scan).copy(), scan.GetOrigin(), scan.GetDirection()
    Segmenter("ensemble", tiny_models, "cpu").segment(scan, transforms.identity())
    assert np.array_equal(sitk.GetArrayFromImage(scan), before[0])
    assert (scan.GetOrigin(), scan.GetDirection()) == before[1:]


def read_outputs(folder: Path) -> dict:
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
            for p in sorted(folder.iterdir()) if p.name.endswith((".nii.gz", ".nrrd"))}


def test_cli_runs_in_two_processes_identical(tiny_models, tmp_path, capfd):
    """In-process and in a fresh interpreter (other thread pool, other allocations):
    the files hold the same labels."""
    scan = str(write(head_image(seed=3), tmp_path / "case.nii.gz"))
    (tmp_path / "case.txt").write_text(itksnap_text(POSE), encoding="utf-8")
    common = [scan, "--transform", str(tmp_path / "case.txt"), "--model", str(tiny_models),
              "--device", "cpu", "--mode", "ensemble"]
    assert cli.main(["segment", *common, "-o", str(tmp_path / "a")]) == 0
    proc = subprocess.run([sys.executable, "-m", "BrainLobeSegLib.cli", "segment", *common,
                           "-o", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    a, b = read_outputs(tmp_path / "a"), read_outputs(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 3
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
