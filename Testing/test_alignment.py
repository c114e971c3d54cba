"""Automatic upright alignment: symmetry plane, pitch, the ITK file, the ``align`` command."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import alignment, cli, phantom, transforms
from BrainLobeSegLib.errors import EXIT_INPUT_ERROR

SIZE, SPACING = (96, 96, 48), (2.0, 2.0, 3.0)


@pytest.mark.parametrize("angles, seed", [((9.0, -6.0, 11.0), 11), ((-12.0, 8.0, -5.0), 12),
                                          ((4.0, 13.0, 0.0), 13)])
def test_estimated_pose_is_within_3_degrees(angles, seed):
    case = phantom.make_scan(size=SIZE, spacing=SPACING, angles_deg=angles, seed=seed)
    est = alignment.estimate_pose(case.ct)
    error = alignment.angle_error_deg(est.transform, case.transform)
    assert error < 3.0, f"tilt {angles}: error {error:.2f} degrees"
    # R maps the head centre to itself, so the upright space overlaps the scan
    centre = np.asarray(est.transform.TransformPoint(tuple(est.centre)))
    assert np.allclose(centre, est.centre, atol=1e-6)
    assert est.seconds < 30


def test_angle_error_is_the_relative_rotation():
    a = transforms.rotation((10.0, 0.0, 0.0), center=(5.0, 6.0, 7.0))
    b = transforms.rotation((13.0, 0.0, 0.0), center=(-5.0, 0.0, 2.0))
    assert alignment.angle_error_deg(a, b) == pytest.approx(3.0, abs=1e-6)
    assert alignment.angle_error_deg(a, a) == pytest.approx(0.0, abs=1e-4)


def test_rotation_taking_and_pose_transform():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.normal(size=3), rng.normal(size=3)
        r = alignment.rotation_taking(a, b)
        assert np.allclose(r @ (a / np.linalg.norm(a)), b / np.linalg.norm(b))
        assert np.allclose(r @ r.T, np.eye(3)) and np.linalg.det(r) == pytest.approx(1.0)
    tf = alignment.pose_transform(alignment.rotation_x(7.0), np.array([1.0, 2.0, 3.0]))
    assert transforms.rotation_angle_deg(tf) == pytest.approx(7.0)


def test_nelder_mead_finds_a_quadratic_minimum():
    x, f = alignment.nelder_mead(lambda p: float((p[0] - 1) ** 2 + 3 * (p[1] + 2) ** 2), [0, 0], [0.5, 0.5],
                                 iterations=400, tol=1e-12)
    assert np.allclose(x, [1, -2], atol=1e-3) and f < 1e-6


def test_symmetry_plane_of_a_shifted_upright_head():
    """No rotation, head off-centre in x: the plane is x = the head's centre."""
    case = phantom.make_scan(size=SIZE, spacing=SPACING, angles_deg=(0.0, 0.0, 0.0), seed=5)
    ct = sitk.Image(case.ct)
    ct.SetOrigin(tuple(np.asarray(ct.GetOrigin()) + [17.0, 0.0, 0.0]))
    normal, offset, centre, _ = alignment.find_symmetry_plane(*alignment._working_image(ct, 3.5)[:3])
    _, ref_offset, _, _ = alignment.find_symmetry_plane(*alignment._working_image(case.ct, 3.5)[:3])
    assert math.degrees(math.acos(min(1.0, normal[0]))) < 1.5
    assert offset - ref_offset == pytest.approx(17.0, abs=1.0)


def test_cli_align_writes_an_itk_snap_file(tmp_path, capsys):
    case = phantom.make_scan(size=SIZE, spacing=SPACING, angles_deg=(7.0, 5.0, -8.0), seed=21)
    scan = tmp_path / "head.nii.gz"
    sitk.WriteImage(case.ct, str(scan))
    out = tmp_path / "tf" / "head.txt"
    assert cli.main(["align", str(scan), "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "Transform: MatrixOffsetTransformBase_double_3_3" in text
    R = transforms.read_transform(str(out))
    assert alignment.angle_error_deg(R, case.transform) < 3.0
    assert "degrees from upright" in capsys.readouterr().out


def test_cli_align_refuses_a_non_ct(tmp_path, capsys):
    img = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 1, (30, 40, 40)).astype(np.float32))
    path = tmp_path / "mr.nii.gz"
    sitk.WriteImage(img, str(path))
    assert cli.main(["align", str(path), "-o", str(tmp_path / "t.txt")]) == EXIT_INPUT_ERROR
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "t.txt").exists()


def test_principal_angle_of_a_tilted_ellipsoid():
    """The brain's long axis in the sagittal plane gives the pitch (moment path)."""
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(20000, 3)) * [50.0, 80.0, 60.0]
    for pitch in (-12.0, 0.0, 9.0):
        tilted = pts @ alignment.rotation_x(pitch).T + [3.0, -4.0, 10.0]
        angle = alignment.principal_angle_deg(tilted, np.eye(3), np.array([3.0, -4.0, 10.0]))
        assert angle == pytest.approx(pitch, abs=1.0)
    assert alignment._wrap90(135.0) == -45.0 and alignment._wrap90(-90.0) == 90.0
