"""The alignment's second stage: the pose checked against the regions a model found."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from BrainLobeSegLib import alignment, geometry, phantom, reference, region_pose, regions, transforms
from BrainLobeSegLib.inference import Segmenter


def _labels_on_grid(labels: sitk.Image, turn: np.ndarray, grid: geometry.Grid) -> np.ndarray:
    """The upright label image seen through a pose that is off by rotation ``turn``
    (about the head centre): what a model finds in the upright space of a wrong pose."""
    centre = np.asarray(phantom.head_center())
    tf = transforms.affine_from_matrix(np.block([[turn.T, (centre - turn.T @ centre)[:, None]],
                                                 [np.zeros((1, 3)), np.ones((1, 1))]]))
    return sitk.GetArrayFromImage(sitk.Resample(labels, grid.reference(), tf,
                                                sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def test_remaining_rotation_recovers_a_known_pitch():
    """Regions found turned by 4 degrees of pitch give back that rotation (relative to the
    same regions unturned, since the phantom's layout is not exactly the atlas's)."""
    _, labels = phantom.make_upright_phantom(2.0, seed=0)
    centre = np.asarray(phantom.head_center())
    grid = geometry.Grid(tuple(centre - 90.0), (2.0, 2.0, 2.0), (90, 90, 90))
    base = region_pose.remaining_rotation(_labels_on_grid(labels, np.eye(3), grid), grid)
    turn = transforms.rotation_x(4.0)
    turned = region_pose.remaining_rotation(_labels_on_grid(labels, turn, grid), grid)
    assert base is not None and turned is not None
    assert region_pose.angle_of(turned @ base.T @ turn.T) < 0.5
    assert 3.0 < region_pose.angle_of(turned @ base.T) < 5.0


def test_too_few_or_scattered_regions_are_not_trusted():
    grid = geometry.Grid((-80.0, -110.0, -60.0), (4.0, 4.0, 4.0), (40, 50, 40))
    assert region_pose.remaining_rotation(np.zeros(grid.shape, np.uint8), grid) is None
    noise = np.random.default_rng(0).integers(0, regions.NUM_LABELS + 1, grid.shape).astype(np.uint8)
    assert region_pose.remaining_rotation(noise, grid) is None    # centroids all in the middle


def test_corrected_estimate_turns_about_the_same_centre():
    est = alignment.PoseEstimate(transforms.rotation((10.0, 0.0, 0.0), center=(1.0, 2.0, 3.0)),
                                 np.array([1.0, 0.0, 0.0]), np.array([1.0, 2.0, 3.0]), 10.0, 1.0,
                                 0.9, (1.0, 1.0, 1.0), 1.0)
    fixed = region_pose.corrected_estimate(est, transforms.rotation_x(-3.0))
    assert fixed.region_corrected and abs(fixed.region_residual_deg - 3.0) < 1e-6
    assert np.allclose(fixed.transform.TransformPoint((1.0, 2.0, 3.0)), (1.0, 2.0, 3.0))
    assert abs(fixed.angle_deg - 7.0) < 1e-6 or abs(fixed.angle_deg - 13.0) < 1e-6
    assert "corrected by 3.0 degrees" in alignment.describe(fixed)


def _estimate_off_by(truth: sitk.AffineTransform, pitch_deg: float) -> alignment.PoseChoice:
    """An estimated pose that is ``pitch_deg`` of pitch away from ``truth``, turned about
    the head centre (what the reference registration gives when a wrong start wins)."""
    centre = np.asarray(truth.GetCenter())
    q = transforms.matrix_of(truth)[:3, :3] @ transforms.rotation_x(pitch_deg)
    est = alignment.PoseEstimate(transforms.pose_transform(q, centre), np.array([1.0, 0.0, 0.0]),
                                 centre, alignment.pitch_of(q), 1.0, 0.9, (1.0, 1.0, 1.0), 1.0)
    return alignment.PoseChoice(est.transform, "estimated", est)


def test_a_large_pitch_error_is_corrected_once_the_regions_confirm_it():
    """The bundled 3D model on the (real) reference head, pitched by 15 degrees, with an
    estimate 12 degrees off in pitch either way: the regions see more than
    :data:`MAX_CORRECTION_DEG` (but not all of it), the correction is applied in full and
    checked again, and the pose ends within 3 degrees of the truth."""
    ct, truth = phantom.make_reference_scan((15.0, 4.0, -3.0), size=(128, 128, 40),
                                            spacing=(1.8, 1.8, 4.0), seed=3)
    segmenter = Segmenter("3d", None, "cpu")
    for pitch_error in (-12.0, 12.0):
        messages = []
        pose = _estimate_off_by(truth, pitch_error)
        _, final = region_pose.segment_with_pose(segmenter, ct, pose, progress=lambda f, m: messages.append(m))
        again = [m for m in messages if m.startswith("pose corrected by")]
        assert len(again) >= 2, messages          # checked again after the first correction
        assert final.estimate is not None and final.estimate.region_corrected
        assert final.estimate.region_residual_deg > region_pose.MAX_CORRECTION_DEG
        assert alignment.angle_error_deg(final.transform, truth) < 3.0, pitch_error
        assert alignment.angle_error_deg(pose.transform, truth) > 11.0


def test_bundled_centroids_have_one_point_per_region_left_on_the_left():
    centroids = reference.region_centroids()
    assert sorted(centroids) == list(range(1, regions.NUM_LABELS + 1))
    for r in regions.REGIONS:
        assert (centroids[r.label][0] > 0) == (r.side == "left")   # LPS: +x is the patient's left
