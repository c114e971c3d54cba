"""The alignment's second stage: the pose checked against the regions a model found."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from BrainLobeSegLib import alignment, geometry, phantom, reference, region_pose, regions, transforms


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


def test_bundled_centroids_have_one_point_per_region_left_on_the_left():
    centroids = reference.region_centroids()
    assert sorted(centroids) == list(range(1, regions.NUM_LABELS + 1))
    for r in regions.REGIONS:
        assert (centroids[r.label][0] > 0) == (r.side == "left")   # LPS: +x is the patient's left
