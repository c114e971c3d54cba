"""Automatic upright alignment: symmetry plane, reference registration, the ITK file, the
``align`` command.

The default reference is the bundled MNI-frame head CT (:mod:`reference`); the tests pose
that head by known rotations (:func:`phantom.make_reference_scan`). The analytic phantom,
whose head is a smooth ellipsoid without a face, is aligned against its own upright
image (``template=``), as the benchmark does (``Testing/benchmarks/ALIGNMENT_RESULTS.md``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import alignment, cli, head_grid, optimise, phantom, reference, symmetry_plane, transforms
from BrainLobeSegLib.errors import EXIT_INPUT_ERROR

SIZE, SPACING = (96, 96, 48), (2.0, 2.0, 3.0)
#: Seed 5's and seed 8's poses in the alignment benchmark's phantom group (pitch, roll,
#: yaw; degrees).
PHANTOM_ANGLES = (-9.73, 10.895, 1.244)
PHANTOM_8_ANGLES = (3.462, -3.49, 14.916)


@pytest.mark.parametrize("angles, offset, cut", [((24.0, -6.0, 11.0), 0.0, 0.0),
                                                 ((-28.0, 12.0, -5.0), 35.0, 20.0),
                                                 ((6.0, 14.0, 13.0), -35.0, 28.0)])
def test_default_reference_finds_a_posed_head(angles, offset, cut):
    """Pitch up to 30 degrees, roll and yaw up to 15, a scanner offset of +-35 HU and a
    vertex cut by up to 28 mm: the pose is found within 2 degrees."""
    ct, truth = phantom.make_reference_scan(angles, hu_offset=offset, cut_top_mm=cut, seed=3)
    est = alignment.estimate_pose(ct)
    error = alignment.angle_error_deg(est.transform, truth)
    assert error < 2.0, f"pose {angles}, offset {offset}, cut {cut}: error {error:.2f} degrees"
    assert est.match > 0.8 and est.pitch_deg == pytest.approx(alignment.pitch_of(
        transforms.matrix_of(truth)[:3, :3]), abs=2.0)
    # R maps the head centre to itself, so the upright space overlaps the scan
    centre = np.asarray(est.transform.TransformPoint(tuple(est.centre)))
    assert np.allclose(centre, est.centre, atol=1e-6)


def test_nearest_rotation_removes_head_scaling():
    """A head turned and scaled along its own axes, U S, gives back U (no pitch bias
    from a head longer or flatter than the reference)."""
    u = transforms.matrix_of(transforms.rotation((20.0, -7.0, 4.0)))[:3, :3]
    r = transforms.nearest_rotation(u @ np.diag([1.12, 0.9, 0.95]))
    assert np.allclose(r, u, atol=1e-9)


def test_bundled_reference_is_an_upright_head_with_its_licence():
    head = reference.upright_template()
    assert head.GetSpacing() == pytest.approx((2.5, 2.5, 2.5))
    arr = sitk.GetArrayViewFromImage(head)
    assert arr.min() < -900 and arr.max() > 500          # air and bone, in HU
    folder = reference.atlas_dir()
    assert "BSD 2-Clause" in (folder / reference.LICENSE_FILE).read_text(encoding="utf-8")
    assert "Rorden" in (folder / reference.SOURCE_FILE).read_text(encoding="utf-8")


def test_head_proportions_are_sizes_not_a_turn():
    """A head 10 % wider, 8 % shorter and 6 % lower than the reference, pitched by 22
    degrees: the per-axis sizes take up the proportions, so the pose stays within 1.5
    degrees and the sizes found are the ones made (a free affine map could trade the
    proportions for shear and rotation)."""
    sizes = (1.10, 0.92, 0.94)
    ct, truth = phantom.make_reference_scan((22.0, -4.0, 6.0), size=(96, 96, 48), noise_hu=0.0,
                                            proportions=sizes)
    est = alignment.estimate_pose(ct)
    assert alignment.angle_error_deg(est.transform, truth) < 1.5
    assert sorted(est.scales) == pytest.approx(sorted(sizes), abs=0.03)


def test_phantom_against_its_own_upright_image():
    """The analytic phantom (an ellipsoid brain, no face) turned by 14.6 degrees is found
    against the canonical phantom's upright image within 3 degrees (the free affine
    registration this replaced was 9.7 degrees off on this case)."""
    case = phantom.make_scan(size=(160, 160, 64), spacing=(1.4, 1.4, 3.0),
                             angles_deg=PHANTOM_ANGLES, seed=5)
    template = phantom.make_upright_phantom(spacing_mm=2.0)[0]
    est = alignment.estimate_pose(case.ct, template)
    assert alignment.angle_error_deg(est.transform, case.transform) < 3.0


def test_roll_of_a_round_head_comes_from_the_symmetry_plane():
    """Benchmark phantom 8: the registration alone stopped 3.66 degrees off in roll (the
    phantom brain's cross-section is nearly round); the mid-sagittal plane's roll and yaw
    correlate better and are taken, which brings it within 1 degree."""
    case = phantom.make_scan(size=(160, 160, 64), spacing=(1.4, 1.4, 3.0),
                             angles_deg=PHANTOM_8_ANGLES, seed=8)
    template = phantom.make_upright_phantom(spacing_mm=2.0)[0]
    est = alignment.estimate_pose(case.ct, template)
    assert est.plane_roll
    assert alignment.angle_error_deg(est.transform, case.transform) < 1.0


def test_angle_error_is_the_relative_rotation():
    a = transforms.rotation((10.0, 0.0, 0.0), center=(5.0, 6.0, 7.0))
    b = transforms.rotation((13.0, 0.0, 0.0), center=(-5.0, 0.0, 2.0))
    assert alignment.angle_error_deg(a, b) == pytest.approx(3.0, abs=1e-6)
    assert alignment.angle_error_deg(a, a) == pytest.approx(0.0, abs=1e-4)


def test_rotation_taking_and_pose_transform():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.normal(size=3), rng.normal(size=3)
        r = transforms.rotation_taking(a, b)
        assert np.allclose(r @ (a / np.linalg.norm(a)), b / np.linalg.norm(b))
        assert np.allclose(r @ r.T, np.eye(3)) and np.linalg.det(r) == pytest.approx(1.0)
    for a in (np.array([0.0, 0.3, 0.9]), np.array([1.0, 0.0, 0.0])):   # opposite vectors: a half turn
        r = transforms.rotation_taking(a, -a)
        assert np.allclose(r @ a, -a) and np.linalg.det(r) == pytest.approx(1.0)
    tf = transforms.pose_transform(transforms.rotation_x(7.0), np.array([1.0, 2.0, 3.0]))
    assert transforms.rotation_angle_deg(tf) == pytest.approx(7.0)


def test_nelder_mead_finds_a_quadratic_minimum():
    x, f = optimise.nelder_mead(lambda p: float((p[0] - 1) ** 2 + 3 * (p[1] + 2) ** 2), [0, 0], [0.5, 0.5],
                                iterations=400, tol=1e-12)
    assert np.allclose(x, [1, -2], atol=1e-3) and f < 1e-6


def test_symmetry_plane_of_a_shifted_upright_head():
    """No rotation, head off-centre in x: the plane is x = the head's centre."""
    case = phantom.make_scan(size=SIZE, spacing=SPACING, angles_deg=(0.0, 0.0, 0.0), seed=5)
    ct = sitk.Image(case.ct)
    ct.SetOrigin(tuple(np.asarray(ct.GetOrigin()) + [17.0, 0.0, 0.0]))
    normal, offset, centre, _ = symmetry_plane.find_symmetry_plane(*head_grid.working_image(ct, 3.5)[:3])
    _, ref_offset, _, _ = symmetry_plane.find_symmetry_plane(*head_grid.working_image(case.ct, 3.5)[:3])
    assert math.degrees(math.acos(min(1.0, normal[0]))) < 1.5
    assert offset - ref_offset == pytest.approx(17.0, abs=1.0)


def test_cli_align_writes_an_itk_snap_file(tmp_path, capsys):
    ct, truth = phantom.make_reference_scan((-17.0, 5.0, -8.0), seed=21)
    scan = tmp_path / "head.nii.gz"
    sitk.WriteImage(ct, str(scan))
    out = tmp_path / "tf" / "head.txt"
    assert cli.main(["align", str(scan), "-o", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "Transform: MatrixOffsetTransformBase_double_3_3" in text
    R = transforms.read_transform(str(out))
    assert alignment.angle_error_deg(R, truth) < 2.0
    printed = capsys.readouterr().out
    assert "degrees from upright" in printed
    # the suggested next command is complete: it runs as printed
    suggested = printed.split("`")[1].split()
    assert suggested[0] == "brainlobeseg" and "-o" in suggested and str(out) in suggested


def test_cli_align_refuses_a_non_ct(tmp_path, capsys):
    img = sitk.GetImageFromArray(np.random.default_rng(0).uniform(0, 1, (30, 40, 40)).astype(np.float32))
    path = tmp_path / "mr.nii.gz"
    sitk.WriteImage(img, str(path))
    assert cli.main(["align", str(path), "-o", str(tmp_path / "t.txt")]) == EXIT_INPUT_ERROR
    assert "error" in capsys.readouterr().err
    assert not (tmp_path / "t.txt").exists()
