"""The Slicer module's logic on a real ``vtkMRMLScene`` from the ``slicer-core`` wheel.

No mocks of MRML: volumes, transform and segmentation nodes are the real classes. The
logic never uses ``slicer.mrmlScene``; only ``slicer.util.arrayFromSegmentBinaryLabelmap``
(used here to read results back the way Slicer users do) needs it, so the ``util_hook``
fixture points ``slicer.mrmlScene`` and ``slicer.modules.segmentations.logic()`` at the
test scene and a real ``vtkSlicerSegmentationsModuleLogic``, as Slicer itself would.

The phantom is a small head-like CT (48x48x32 voxels at 4 mm) and the models are the
tiny random networks from ``conftest.tiny_models``, so the whole file runs in seconds.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from BrainLobeSegLib import (alignment, dataset, phantom, regions, slicer_logic, slicer_tools,
                             statistics, steps, torch_install, transforms)
from BrainLobeSegLib.errors import Cancelled, InputError
from BrainLobeSegLib.slicer_logic import BrainLobeSegLogic

FLIP = np.diag([-1.0, -1.0, 1.0])
POSE_DEG = (10.0, -6.0, 8.0)


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture
def scene():
    """A bare scene, with the segmentation converter rules registered as Slicer does at
    start-up (so a test that makes a segmentation itself does not depend on test order)."""
    slicer_tools.ensure_segmentation_converters()
    return slicer.vtkMRMLScene()


@pytest.fixture
def util_hook(scene, monkeypatch):
    """Let ``slicer.util`` segment helpers work on the test scene (as inside Slicer)."""
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: segmentations_logic)), raising=False)
    return scene


def head_image(size=(48, 48, 32), spacing=4.0) -> sitk.Image:
    """A head-like CT: air, a skull shell, brain with a slightly denser left half."""
    nx, ny, nz = size
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    r = np.sqrt(((x - (nx - 1) / 2) / (0.42 * nx)) ** 2 + ((y - (ny - 1) / 2) / (0.46 * ny)) ** 2
                + ((z - (nz - 1) / 2) / (0.44 * nz)) ** 2)
    hu = np.full(r.shape, -1024, np.int16)
    hu[r < 1.0] = 1000
    hu[r < 0.88] = 32
    hu[(r < 0.5) & (x < (nx - 1) / 2)] = 28
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin(tuple(-(n - 1) * spacing / 2 for n in size))
    return image


@pytest.fixture(scope="module")
def fast_logic():
    """A logic whose labels go straight back from the model grid (no 1 mm refinement:
    the slow step on a 4 mm phantom), with models cached across the tests."""
    return BrainLobeSegLogic(segmenter_options={"refine_mm": None})


def add_volume(scene, image: sitk.Image, name: str = "CT"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer_tools.update_volume_from_image(node, image)
    return node


def block_labels(shape) -> np.ndarray:
    """Every label 0..20 present, in blocks, so that no region is trivially empty."""
    labels = np.zeros(shape, np.uint8)
    flat = labels.reshape(-1)
    edges = np.linspace(0, flat.size, regions.NUM_LABELS + 2).astype(int)
    for label in range(1, regions.NUM_LABELS + 1):
        flat[edges[label]:edges[label + 1]] = label
    return labels


def pose() -> sitk.AffineTransform:
    return transforms.rotation(POSE_DEG, center=(0.0, 0.0, 0.0), translation=(3.0, -2.0, 1.0))


def snapshot(volume, transform_node=None) -> dict:
    """What must not change: the voxels, the geometry, the transform and its matrix."""
    state = {"voxels": slicer.util.arrayFromVolume(volume).copy(),
             "ijk": slicer_tools.ijk_to_ras(volume),
             "parent": volume.GetTransformNodeID()}
    if transform_node is not None:
        m = vtk.vtkMatrix4x4()
        transform_node.GetMatrixTransformToParent(m)
        state["matrix"] = slicer.util.arrayFromVTKMatrix(m)
    return state


def assert_unchanged(before: dict, volume, transform_node=None) -> None:
    after = snapshot(volume, transform_node)
    np.testing.assert_array_equal(after["voxels"], before["voxels"])
    np.testing.assert_array_equal(after["ijk"], before["ijk"])
    assert after["parent"] == before["parent"]
    if transform_node is not None:
        np.testing.assert_array_equal(after["matrix"], before["matrix"])


def segment_ids(node) -> list:
    s = node.GetSegmentation()
    return [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]


def nodes_of(scene, class_name: str) -> int:
    return scene.GetNumberOfNodesByClass(class_name)


# ----------------------------------------------------------------------------- geometry

def test_volume_to_sitk_round_trip_with_oblique_direction(scene):
    """Voxels, spacing, origin and an oblique direction survive node <-> SimpleITK, and
    a voxel's physical position agrees between the two (LPS vs RAS)."""
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-1000, 1000, (7, 9, 11)).astype(np.int16))
    rot = transforms.matrix_of(transforms.rotation((20.0, -35.0, 50.0)))[:3, :3]
    image.SetDirection(rot.ravel().tolist())
    image.SetSpacing((0.45, 0.7, 1.5))
    image.SetOrigin((12.5, -30.25, 81.0))
    node = add_volume(scene, image)
    back = slicer_tools.image_from_volume_node(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-12)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)
    ijk = (3, 5, 2)
    ras = slicer_tools.ijk_to_ras(node) @ np.array([*ijk, 1.0])
    np.testing.assert_allclose(FLIP @ ras[:3], image.TransformIndexToPhysicalPoint(ijk), atol=1e-9)


def test_volume_copy_is_independent_of_the_node(scene):
    """The engine gets a copy: changing the node afterwards does not change it."""
    node = add_volume(scene, head_image())
    image = slicer_tools.image_from_volume_node(node)
    before = sitk.GetArrayFromImage(image).copy()
    slicer.util.arrayFromVolume(node)[:] = 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), before)


def test_unusable_volumes_are_refused(scene):
    with pytest.raises(InputError, match="no CT volume"):
        slicer_tools.image_from_volume_node(None)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no image data"):
        slicer_tools.image_from_volume_node(empty)
    flat = add_volume(scene, sitk.GetImageFromArray(np.zeros((1, 8, 8), np.int16)), "flat")
    with pytest.raises(InputError, match="single slice"):
        slicer_tools.image_from_volume_node(flat)


# ----------------------------------------------------------------------------- transforms

def test_itksnap_file_to_node_to_R(scene, tmp_path):
    """An ITK-SNAP file becomes a node that R is read back from unchanged; applied to the
    CT, the node carries each scan point to its upright point (the head shows upright)."""
    R = pose()
    path = tmp_path / "pose.txt"
    transforms.write_transform(str(path), R)
    assert "MatrixOffsetTransformBase_double_3_3" in path.read_text(encoding="utf-8")
    node = slicer_tools.load_itksnap_transform(scene, str(path))
    assert node.IsA("vtkMRMLLinearTransformNode") and node.GetName() == "pose"
    R_back = slicer_tools.transform_from_node(node)
    np.testing.assert_allclose(transforms.matrix_of(R_back), transforms.matrix_of(R), atol=1e-9)
    to_parent = slicer_tools.matrix_to_world(node)
    for p_upright in ([0.0, 0.0, 0.0], [40.0, -25.0, 30.0], [-60.0, 10.0, -5.0]):
        p_scan = np.array(R.TransformPoint(p_upright))
        shown = to_parent @ np.array([*(FLIP @ p_scan), 1.0])
        np.testing.assert_allclose(shown[:3], FLIP @ np.array(p_upright), atol=1e-9)
    inverted = slicer_tools.transform_from_node(node, invert=True)
    np.testing.assert_allclose(transforms.matrix_of(inverted),
                               np.linalg.inv(transforms.matrix_of(R)), atol=1e-9)
    node_inv = slicer_tools.load_itksnap_transform(scene, str(path), invert=True, name="inv")
    np.testing.assert_allclose(transforms.matrix_of(slicer_tools.transform_from_node(node_inv)),
                               np.linalg.inv(transforms.matrix_of(R)), atol=1e-9)


@pytest.mark.parametrize("content", ["", "not a transform\n",
                                     "#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\n"])
def test_bad_transform_files_add_no_node(scene, tmp_path, content):
    path = tmp_path / "bad.txt"
    path.write_text(content, encoding="utf-8")
    before = scene.GetNumberOfNodes()
    with pytest.raises(InputError):
        slicer_tools.load_itksnap_transform(scene, str(path))
    assert scene.GetNumberOfNodes() == before


def test_nonlinear_transform_nodes_are_refused(scene):
    volume = add_volume(scene, head_image())
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    with pytest.raises(InputError, match="not linear"):
        slicer_logic.resolve_transform(volume, "node", grid)
    linear = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "under a warp")
    linear.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="not linear"):
        slicer_logic.resolve_transform(volume, "node", linear)
    volume.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="not linear"):
        slicer_logic.resolve_transform(volume, "parent")


def test_transform_choices(scene):
    volume = add_volume(scene, head_image())
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "upright")
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(transforms.slicer_to_parent_ras(pose())))
    identity = np.eye(4)
    R, text = slicer_logic.resolve_transform(volume, "parent")
    np.testing.assert_allclose(transforms.matrix_of(R), identity)
    assert "no parent transform" in text
    R, _ = slicer_logic.resolve_transform(volume, "none", node)
    np.testing.assert_allclose(transforms.matrix_of(R), identity)
    R, text = slicer_logic.resolve_transform(volume, "node", node)
    np.testing.assert_allclose(transforms.matrix_of(R), transforms.matrix_of(pose()), atol=1e-9)
    assert "'upright'" in text and "degrees" in text
    volume.SetAndObserveTransformNodeID(node.GetID())
    R, _ = slicer_logic.resolve_transform(volume, "parent")
    np.testing.assert_allclose(transforms.matrix_of(R), transforms.matrix_of(pose()), atol=1e-9)
    R, text = slicer_logic.resolve_transform(volume, "parent", invert=True)
    np.testing.assert_allclose(transforms.matrix_of(R), np.linalg.inv(transforms.matrix_of(pose())),
                               atol=1e-9)
    assert "inverted" in text
    with pytest.raises(InputError, match="no transform node is selected"):
        slicer_logic.resolve_transform(volume, "node", None)
    with pytest.raises(InputError, match="unknown transform choice"):
        slicer_logic.resolve_transform(volume, "guess")


def test_mirroring_transform_is_reported_not_hidden(scene):
    volume = add_volume(scene, head_image())
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "mirror")
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.diag([-1.0, 1.0, 1.0, 1.0])))
    job = BrainLobeSegLogic().prepare(volume, "node", node)
    assert any("mirrors" in w for w in job.warnings)


# ----------------------------------------------------------------------------- segmentation node

def check_regions(node) -> None:
    """20 segments with the region table's ids, names, colours, label values, terminology."""
    segmentation = node.GetSegmentation()
    assert segment_ids(node) == [f"Segment_{r.label}" for r in regions.REGIONS]
    tag_name = slicer.vtkSegment.GetTerminologyEntryTagName()
    for r in regions.REGIONS:
        segment = segmentation.GetSegment(f"Segment_{r.label}")
        assert segment.GetName() == r.segment_name
        np.testing.assert_allclose(segment.GetColor(), r.color_float, atol=1e-6)
        assert segment.GetLabelValue() == r.label
        tag = vtk.mutable("")
        assert segment.GetTag(tag_name, tag)
        assert str(tag) == regions.terminology_entry(r)
        parts = str(tag).split("~")
        assert len(parts) == 7 and parts[2] == "^".join(r.type_code)
        assert parts[3] == "^".join(r.side_modifier)
    assert segmentation.GetNumberOfLayers() == 1     # one shared labelmap, like .seg.nrrd


def check_labels_match(node, volume, expected: np.ndarray) -> None:
    """Each segment's binary labelmap, exported on the CT grid, equals ``expected == id``."""
    for r in regions.REGIONS:
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, f"Segment_{r.label}", volume)
        np.testing.assert_array_equal(mask > 0, expected == r.label, err_msg=r.segment_name)
    np.testing.assert_array_equal(slicer_tools.labels_from_segmentation(node, volume), expected)


def test_fill_segmentation_every_region_voxel_for_voxel(scene, util_hook):
    """All 20 regions present: names, colours, terminology, reference geometry and the
    labelmaps equal the label array exactly, with the CT under a transform."""
    volume = add_volume(scene, head_image())
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "upright")
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(transforms.slicer_to_parent_ras(pose())))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    before = snapshot(volume, transform)
    labels = block_labels(slicer.util.arrayFromVolume(volume).shape)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    slicer_tools.fill_segmentation(node, labels, volume)
    check_regions(node)
    assert node.GetTransformNodeID() == transform.GetID()
    geometry = node.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    reference = slicer.vtkOrientedImageData()
    reference.SetDimensions(volume.GetImageData().GetDimensions())
    reference.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(slicer_tools.ijk_to_ras(volume)))
    assert geometry == slicer.vtkSegmentationConverter.SerializeImageGeometry(reference)
    check_labels_match(node, volume, labels)
    assert node.GetDisplayNode() is not None
    assert_unchanged(before, volume, transform)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture
def ct_with_itksnap_pose(scene, tmp_path):
    """A CT whose parent transform was loaded from an ITK-SNAP file."""
    path = tmp_path / "case.txt"
    transforms.write_transform(str(path), pose())
    transform = slicer_tools.load_itksnap_transform(scene, str(path))
    volume = add_volume(scene, head_image())
    volume.SetAndObserveTransformNodeID(transform.GetID())
    return volume, transform


def test_segment_phantom_matches_the_engine(scene, util_hook, tiny_models, ct_with_itksnap_pose):
    """The issue's scenario: phantom CT, ITK-SNAP transform node, tiny model. The node's
    labelmaps equal the engine's ``labels_scan``; the input is untouched; the result sits
    under the CT's transform so it overlays the CT as displayed."""
    volume, transform = ct_with_itksnap_pose
    before = snapshot(volume, transform)
    logic = BrainLobeSegLogic()
    job = logic.prepare(volume, "parent", mode="3d", device="cpu", model_dir=tiny_models)
    np.testing.assert_allclose(transforms.matrix_of(job.transform), transforms.matrix_of(pose()),
                               atol=1e-9)
    result = logic.run(job)
    segmentations = nodes_of(scene, "vtkMRMLSegmentationNode")
    node = logic.create_output(job, result)
    assert nodes_of(scene, "vtkMRMLSegmentationNode") == segmentations + 1
    assert node.GetName() == "CT ASPECTS regions"
    check_regions(node)
    assert node.GetTransformNodeID() == transform.GetID()
    check_labels_match(node, volume, sitk.GetArrayFromImage(result.labels_scan))
    assert "Not a medical device" in node.GetAttribute("BrainLobeSeg.notice")
    assert node.GetAttribute("BrainLobeSeg.models") == "tiny-3d"
    assert node.GetAttribute("BrainLobeSeg.qualityProblems") == ""   # tiny cards carry no ranges
    assert_unchanged(before, volume, transform)

    # The one-call API gives the same labels (CPU inference is deterministic).
    again = logic.segment(volume, mode="3d", device="cpu", model_dir=tiny_models)
    assert again is not node
    check_labels_match(again, volume, sitk.GetArrayFromImage(result.labels_scan))
    assert_unchanged(before, volume, transform)


def test_output_node_is_refilled_only_when_given(scene, fast_logic, util_hook, tiny_models):
    """An explicitly passed node gets the 20 regions instead of its old content; no
    other segmentation node is created."""
    volume = add_volume(scene, head_image())
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my corrections")
    existing.GetSegmentation().AddEmptySegment("old", "old")
    logic = fast_logic
    job = logic.prepare(volume, "none", device="cpu", model_dir=tiny_models)
    result = logic.run(job)
    node = logic.create_output(job, result, output_node=existing)
    assert node is existing and node.GetName() == "my corrections"
    assert nodes_of(scene, "vtkMRMLSegmentationNode") == 1
    check_regions(node)
    check_labels_match(node, volume, sitk.GetArrayFromImage(result.labels_scan))


def test_output_node_deleted_during_the_run_gets_a_new_node(scene, fast_logic, util_hook, tiny_models):
    """The chosen output node is deleted while the engine runs: the result goes into a
    new node in the scene (with the deleted node's name), never into the removed node,
    where it would be lost although the run reports success."""
    volume = add_volume(scene, head_image())
    chosen = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my corrections")
    chosen.GetSegmentation().AddEmptySegment("old", "old")
    job = fast_logic.prepare(volume, "none", device="cpu", model_dir=tiny_models)
    result = fast_logic.run(job)
    scene.RemoveNode(chosen)                      # the user deletes it meanwhile
    assert chosen.GetScene() is None
    node = fast_logic.create_output(job, result, output_node=chosen)
    assert node is not chosen and node.GetScene() is scene
    assert node.GetName() == "my corrections"
    assert nodes_of(scene, "vtkMRMLSegmentationNode") == 1
    check_regions(node)
    check_labels_match(node, volume, sitk.GetArrayFromImage(result.labels_scan))
    assert segment_ids(chosen) == ["old"]        # the deleted node was not touched


def test_cancel_before_and_during_run_adds_no_node(scene, fast_logic, tiny_models):
    volume = add_volume(scene, head_image())
    logic = fast_logic
    count = scene.GetNumberOfNodes()
    with pytest.raises(Cancelled):
        logic.segment(volume, "none", mode="planar", device="cpu", model_dir=tiny_models,
                      cancel=lambda: True)
    assert scene.GetNumberOfNodes() == count

    seen = []

    def progress(fraction, message):
        seen.append(fraction)

    with pytest.raises(Cancelled):   # cancelled once the networks have started
        logic.segment(volume, "none", mode="planar", device="cpu", model_dir=tiny_models,
                      progress=progress, cancel=lambda: len(seen) > 3)
    assert scene.GetNumberOfNodes() == count
    assert seen and max(seen) < 0.9


def test_run_steps_reports_progress_and_cancels_between_steps(scene, fast_logic, tiny_models):
    """The GUI path: the engine's steps driven one at a time, as the panel's timer does;
    the labels are those of the plain loop, and closing the steps ends the run there."""
    volume = add_volume(scene, head_image())
    logic = fast_logic
    job = logic.prepare(volume, "none", mode="planar", device="cpu", model_dir=tiny_models)
    reference = sitk.GetArrayFromImage(logic.run(job).labels_scan)
    seen = []
    run = steps.SteppedRun(logic.run_steps(job, lambda f, m: seen.append(f)), budget_s=0.0)
    ticks = 0
    while run.tick():
        ticks += 1
    assert run.error is None and ticks > 10 and run.steps_run == ticks + 1
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(run.result.labels_scan), reference)

    count = scene.GetNumberOfNodes()
    seen.clear()
    run = steps.SteppedRun(logic.run_steps(job, lambda f, m: seen.append(f)), budget_s=0.0)
    while not seen or seen[-1] < 0.1:
        assert run.tick()
    run.cancel()
    assert run.done and run.cancelled and run.result is None and not run.tick()
    assert max(seen) < 0.9 and scene.GetNumberOfNodes() == count


def test_engine_errors_are_input_errors(scene, fast_logic, tmp_path):
    volume = add_volume(scene, head_image())
    logic = fast_logic
    with pytest.raises(InputError, match="no 3d model"):
        logic.segment(volume, "none", mode="3d", device="cpu", model_dir=tmp_path)
    with pytest.raises(InputError, match="unknown mode"):
        logic.segment(volume, "none", mode="4d", device="cpu", model_dir=tmp_path)
    assert nodes_of(scene, "vtkMRMLSegmentationNode") == 0


def test_output_refused_when_the_ct_changed_meanwhile(scene, fast_logic, tiny_models):
    volume = add_volume(scene, head_image())
    logic = fast_logic
    job = logic.prepare(volume, "none", device="cpu", model_dir=tiny_models)
    result = logic.run(job)
    volume.SetSpacing(2.0, 2.0, 2.0)
    with pytest.raises(InputError, match="changed while"):
        logic.create_output(job, result)
    assert nodes_of(scene, "vtkMRMLSegmentationNode") == 0


def test_failed_output_leaves_nothing_behind(scene, fast_logic, tiny_models):
    """A result that does not fit the CT grid is refused; the half-made node is removed
    and a node passed for refilling keeps its old segments."""
    volume = add_volume(scene, head_image())
    logic = fast_logic
    job = logic.prepare(volume, "none", device="cpu", model_dir=tiny_models)
    wrong = types.SimpleNamespace(labels_scan=sitk.Image(5, 5, 5, sitk.sitkUInt8), mode="3d",
                                  model_names=[])
    count = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="not on the CT's grid"):
        logic.create_output(job, wrong)
    assert scene.GetNumberOfNodes() == count
    existing = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "keep me")
    existing.GetSegmentation().AddEmptySegment("mine", "mine")
    with pytest.raises(InputError):
        logic.create_output(job, wrong, output_node=existing)
    assert segment_ids(existing) == ["mine"]


# ----------------------------------------------------------------------------- results

PLANE_NAMES = ("axial", "coronal", "sagittal")


def table_column(table_node, key: str) -> np.ndarray:
    table = table_node.GetTable()
    return np.array([table.GetValueByName(i, key).ToDouble() for i in range(table.GetNumberOfRows())])


def test_uncertainty_node_lies_on_the_ct_grid(scene, fast_logic, tiny_models, ct_with_itksnap_pose):
    """Planar mode: the node overlays the CT (same grid, same parent transform) and holds
    the fraction of the three planes that disagree with the fused label, computed here
    independently from the engine's members and mapped to the scan with R^-1. Counting
    the planar model's own fused labels as a fourth member, or using probabilities,
    would give other values. The region statistics then average it per region."""
    volume, transform = ct_with_itksnap_pose
    before = snapshot(volume, transform)
    logic = fast_logic
    job = logic.prepare(volume, "parent", mode="planar", device="cpu", model_dir=tiny_models)
    result = logic.run(job)
    segmentation = logic.create_output(job, result)
    volumes = nodes_of(scene, "vtkMRMLScalarVolumeNode")

    node = logic.create_uncertainty(job, result)
    assert nodes_of(scene, "vtkMRMLScalarVolumeNode") == volumes + 1
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetName() == "CT ASPECTS uncertainty"
    assert node.GetTransformNodeID() == transform.GetID()
    assert node.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(slicer_tools.ijk_to_ras(node), slicer_tools.ijk_to_ras(volume),
                               atol=1e-9)
    assert node.GetAttribute("BrainLobeSeg.members") == ", ".join(PLANE_NAMES)

    on_grid = np.mean([result.member_labels[p] != result.labels_grid for p in PLANE_NAMES],
                      axis=0).astype(np.float32)
    expected = sitk.GetArrayFromImage(sitk.Resample(
        result.grid.image(on_grid), job.scan, pose().GetInverse(), sitk.sitkLinear, 0.0,
        sitk.sitkFloat32))
    actual = slicer.util.arrayFromVolume(node)
    assert expected.max() > 0.3            # random networks disagree: not a trivial zero
    np.testing.assert_allclose(actual, expected, atol=1e-5)

    table = logic.statistics_table(segmentation, volume, node)
    labels = sitk.GetArrayFromImage(result.labels_scan)
    mean_unc = table_column(table, "mean_uncertainty")
    for i, r in enumerate(regions.REGIONS):
        inside = labels == r.label
        if inside.any():
            assert mean_unc[i] == pytest.approx(float(expected[inside].mean()), abs=1e-4), r.segment_name
        else:
            assert np.isnan(mean_unc[i])
    assert_unchanged(before, volume, transform)


def test_no_uncertainty_for_a_single_3d_model(scene, fast_logic, tiny_models):
    """One 3D model has no members to compare: nothing is added (not a volume of zeros)."""
    volume = add_volume(scene, head_image())
    job = fast_logic.prepare(volume, "none", mode="3d", device="cpu", model_dir=tiny_models)
    result = fast_logic.run(job)
    count = scene.GetNumberOfNodes()
    assert fast_logic.create_uncertainty(job, result) is None
    assert scene.GetNumberOfNodes() == count


def test_statistics_table_follows_corrections(scene):
    """20 rows whose volumes and mean HU equal counts and means taken here from the label
    array and the CT voxels; after a correction the same table shows the new values."""
    volume = add_volume(scene, head_image())
    tnode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "upright")
    tnode.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(transforms.slicer_to_parent_ras(pose())))
    volume.SetAndObserveTransformNodeID(tnode.GetID())
    hu = slicer.util.arrayFromVolume(volume).astype(np.float64)
    labels = block_labels(hu.shape)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "regions")
    slicer_tools.fill_segmentation(segmentation, labels, volume)
    before = snapshot(volume, tnode)
    logic = BrainLobeSegLogic()
    ml_per_voxel = 4.0 ** 3 / 1000.0

    def check(table, expected_labels):
        assert table.GetNumberOfRows() == regions.NUM_LABELS
        volume_ml, mean_hu = table_column(table, "volume_ml"), table_column(table, "mean_hu")
        for i, r in enumerate(regions.REGIONS):
            assert table.GetTable().GetValueByName(i, "region").ToString() == r.segment_name
            inside = expected_labels == r.label
            assert volume_ml[i] == pytest.approx(inside.sum() * ml_per_voxel), r.segment_name
            window = hu[inside & (hu >= 15.0) & (hu <= 60.0)]
            if window.size:
                assert mean_hu[i] == pytest.approx(window.mean()), r.segment_name
            else:
                assert np.isnan(mean_hu[i])

    table = logic.statistics_table(segmentation, volume)
    assert table.IsA("vtkMRMLTableNode") and table.GetName() == "regions statistics"
    assert "not a diagnosis" in table.GetAttribute("BrainLobeSeg.notice")
    check(table, labels)

    corrected = labels.copy()
    corrected[labels == 1] = 2                       # region 1 merged into region 2
    slicer_tools.fill_segmentation(segmentation, corrected, volume)
    again = logic.statistics_table(segmentation, volume, table_node=table)
    assert again is table and nodes_of(scene, "vtkMRMLTableNode") == 1
    check(table, corrected)
    assert table_column(table, "volume_ml")[0] == 0.0
    assert_unchanged(before, volume, tnode)

    with pytest.raises(InputError, match="no segmentation"):
        logic.statistics_table(None, volume)


def test_estimated_upright_transform_node(scene):
    """On a posed head the new node gives back R within 2 degrees of the truth via the
    same reader the panel uses; the CT is neither changed nor moved under it."""
    ct, truth = phantom.make_reference_scan((19.0, -6.0, 11.0), seed=11)
    volume = add_volume(scene, ct)
    before = snapshot(volume)
    transforms_before = nodes_of(scene, "vtkMRMLLinearTransformNode")
    seen = []
    node = BrainLobeSegLogic().estimate_upright_transform(volume, progress=lambda f, m: seen.append(f))
    assert nodes_of(scene, "vtkMRMLLinearTransformNode") == transforms_before + 1
    assert node.IsA("vtkMRMLLinearTransformNode") and node.GetName() == "CT upright (estimated)"
    assert "check" in node.GetAttribute("BrainLobeSeg.estimated")
    assert node.GetParentTransformNode() is None
    assert seen and seen[-1] == 1.0
    R = slicer_tools.transform_from_node(node)
    assert alignment.angle_error_deg(R, truth) < 2.0
    truth_deg = transforms.rotation_angle_deg(truth)
    assert float(node.GetAttribute("BrainLobeSeg.angleDeg")) == pytest.approx(truth_deg, abs=2.0)
    R_panel, text = slicer_logic.resolve_transform(volume, "node", node)
    assert alignment.angle_error_deg(R_panel, truth) < 2.0 and "estimated" in text
    assert_unchanged(before, volume)

    air = add_volume(scene, sitk.Image(24, 24, 24, sitk.sitkInt16) - 1000, "air")
    count = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="no head"):
        BrainLobeSegLogic().estimate_upright_transform(air)
    assert scene.GetNumberOfNodes() == count


def test_the_automatic_estimate_is_made_by_the_run_and_added_with_its_result(
        scene, fast_logic, tiny_models):
    """The panel's default for a CT without a transform: prepare() adds nothing; the run
    estimates the pose (checked against the regions found) and create_output adds it as
    one new transform node, with its evidence, next to the segmentation. The CT is not
    moved under the node; a failed or cancelled run adds no node."""
    ct, truth = phantom.make_reference_scan((-22.0, 7.0, -6.0), seed=12)
    volume = add_volume(scene, ct)
    before = snapshot(volume)
    count = scene.GetNumberOfNodes()
    job = fast_logic.prepare(volume, "estimate", mode="3d", device="cpu", model_dir=tiny_models)
    assert scene.GetNumberOfNodes() == count and job.estimate_pose and job.estimated_node is None
    assert job.transform_description == slicer_logic.ESTIMATE_PENDING
    seen = []
    result = fast_logic.run(job, progress=lambda f, m: seen.append((f, m)))
    assert scene.GetNumberOfNodes() == count                   # the run reads, never adds
    assert any(m.startswith("head pose:") for f, m in seen if f <= 0.1)
    assert alignment.angle_error_deg(job.transform, truth) < 2.0
    # an untrained model: no region check
    assert job.pose_estimate is not None and job.pose_estimate.region_residual_deg is None
    segmentation = fast_logic.create_output(job, result)
    assert nodes_of(scene, "vtkMRMLLinearTransformNode") == 1
    node = job.estimated_node
    assert node.GetScene() is scene and "check" in node.GetAttribute("BrainLobeSeg.estimated")
    assert float(node.GetAttribute("BrainLobeSeg.angleDeg")) == pytest.approx(
        transforms.rotation_angle_deg(job.transform), abs=0.06)
    for name in ("pitchDeg", "match", "symmetryRmseHU"):
        float(node.GetAttribute(f"BrainLobeSeg.{name}"))
    assert node.GetAttribute("BrainLobeSeg.regionCorrectionDeg") == ""
    assert node.GetAttribute("BrainLobeSeg.regionCorrected") == "no"
    np.testing.assert_allclose(transforms.matrix_of(slicer_tools.transform_from_node(node)),
                               transforms.matrix_of(job.transform), atol=1e-6)
    assert segmentation.GetAttribute("BrainLobeSeg.transform") == job.transform_description
    assert node.GetName() in job.transform_description and "automatic estimate" in job.transform_description
    assert volume.GetParentTransformNode() is None and node.GetParentTransformNode() is None
    assert_unchanged(before, volume)

    with pytest.raises(InputError, match="cannot be inverted"):
        fast_logic.prepare(volume, "estimate", invert=True)
    count = scene.GetNumberOfNodes()
    air = add_volume(scene, sitk.Image(40, 40, 40, sitk.sitkInt16) - 1000, "air")
    with pytest.raises(InputError, match="no head"):
        fast_logic.segment(air, "estimate", mode="3d", device="cpu", model_dir=tiny_models)
    assert scene.GetNumberOfNodes() == count + 1               # the air volume only
    calls = []
    with pytest.raises(Cancelled):                             # cancelled during the estimate
        fast_logic.segment(volume, "estimate", mode="3d", device="cpu", model_dir=tiny_models,
                           cancel=lambda: calls.append(1) or len(calls) > 3)
    assert scene.GetNumberOfNodes() == count + 1


def test_a_failed_output_removes_the_estimate_node_again(scene, fast_logic, tiny_models, monkeypatch):
    """The estimate's node is added just before the segmentation is written; if writing
    fails, the scene is left as it was, without a node for a result that does not exist."""
    ct, _truth = phantom.make_reference_scan((10.0, 0.0, 5.0), seed=13)
    volume = add_volume(scene, ct)
    job = fast_logic.prepare(volume, "estimate", mode="3d", device="cpu", model_dir=tiny_models)
    result = fast_logic.run(job)
    count = scene.GetNumberOfNodes()

    def full_disk(*args, **kwargs):
        raise OSError("no space left")

    monkeypatch.setattr(slicer_logic, "fill_segmentation", full_disk)
    with pytest.raises(OSError):
        fast_logic.create_output(job, result)
    assert scene.GetNumberOfNodes() == count and job.estimated_node is None
    monkeypatch.undo()
    fast_logic.create_output(job, result)
    assert nodes_of(scene, "vtkMRMLLinearTransformNode") == 1


def test_save_case_with_the_R_of_the_run(scene, fast_logic, tiny_models, ct_with_itksnap_pose,
                                         tmp_path):
    """The case holds the CT, the pose the run used (read back by the dataset reader) and
    the labels turned upright with that pose; other CTs and changed CTs are refused."""
    volume, transform = ct_with_itksnap_pose
    before = snapshot(volume, transform)
    logic = fast_logic
    job = logic.prepare(volume, "parent", device="cpu", model_dir=tiny_models)
    result = logic.run(job)
    segmentation = logic.create_output(job, result)
    kept = job.without_scan()
    assert kept.scan is None and job.scan is not None

    name = logic.save_case(segmentation, kept, tmp_path / "cases")
    cases = dataset.list_cases(tmp_path / "cases")
    assert [c.name for c in cases] == [name]
    ct, tf, seg_up = dataset.read_case(cases[0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(head_image()))
    np.testing.assert_allclose(transforms.matrix_of(tf), transforms.matrix_of(pose()), atol=1e-6)
    expected = statistics.labels_scan_to_upright(result.labels_scan, head_image(), pose())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(seg_up), sitk.GetArrayFromImage(expected))

    # a volume node without a transform: identity
    name2 = logic.save_case(segmentation, volume, tmp_path / "cases")
    tf2 = dataset.read_case(next(c for c in dataset.list_cases(tmp_path / "cases")
                                 if c.name == name2))[1]
    assert transforms.rotation_angle_deg(tf2) == pytest.approx(0.0, abs=1e-6)

    other = add_volume(scene, head_image(), "other CT")
    with pytest.raises(InputError, match="another CT"):
        logic.save_case(segmentation, other, tmp_path / "refused")
    assert_unchanged(before, volume, transform)
    volume.SetSpacing(2.0, 2.0, 2.0)
    with pytest.raises(InputError, match="changed while"):
        logic.save_case(segmentation, kept, tmp_path / "refused")
    assert not (tmp_path / "refused").exists() or not dataset.list_cases(tmp_path / "refused")


# ----------------------------------------------------------------------------- helpers

def test_describe_models_reads_cards_without_torch(tiny_models, tmp_path):
    lines = slicer_logic.describe_models(tiny_models)
    assert lines == ["tiny-3d 0.0.test (3d)", "tiny-planar 0.0.test (planar)"]
    assert slicer_logic.describe_models(tiny_models / "tiny-3d") == ["tiny-3d 0.0.test (3d)"]
    assert slicer_logic.describe_models(tmp_path / "missing") == []


def test_torch_install_choices():
    """CPU-only wheels without a GPU (Linux/Windows); PyTorchUtils told not to ask again."""
    assert torch_install.torch_available()
    assert torch_install.pip_arguments(gpu=True, system="Linux") == ["torch"]
    assert torch_install.pip_arguments(gpu=False, system="Windows") == [
        "torch", "--index-url", torch_install.CPU_INDEX_URL]
    assert torch_install.pip_arguments(gpu=False, system="Darwin") == ["torch"]

    calls = []

    class PyTorchUtilsLogic:   # the PyTorch extension's interface
        def installTorch(self, askConfirmation=False, forceComputationBackend=None):
            calls.append((askConfirmation, forceComputationBackend))
            return object()

    torch_install.install_torch(calls.append, PyTorchUtilsLogic(), gpu=False)
    torch_install.install_torch(calls.append, PyTorchUtilsLogic(), gpu=True)
    torch_install.install_torch(calls.append, None, gpu=False)
    assert calls[:2] == [(False, "cpu"), (False, None)]
    assert calls[2][0] == "torch"

    class Declined:
        def installTorch(self, **kwargs):
            return None

    with pytest.raises(InputError, match="not installed"):
        torch_install.install_torch(calls.append, Declined(), gpu=False)


def test_slicer_logic_imports_without_torch():
    """The module must load in Slicer before PyTorch is installed."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None\n"
            "import BrainLobeSegLib.slicer_logic, BrainLobeSegLib.torch_install\n"
            "assert not BrainLobeSegLib.torch_install.torch_available()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
