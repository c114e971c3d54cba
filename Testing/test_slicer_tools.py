"""MRML helpers on a real ``vtkMRMLScene`` (slicer-core): table, uncertainty, saved cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from BrainLobeSegLib import dataset, phantom, regions, slicer_tools, statistics, transforms
from BrainLobeSegLib.errors import InputError

SIZE, SPACING = (96, 96, 48), (2.0, 2.0, 3.0)


@pytest.fixture(scope="module")
def case():
    return phantom.make_scan(size=SIZE, spacing=SPACING, angles_deg=(9.0, -6.0, 7.0), seed=8)


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def volume_node(scene, image: sitk.Image, name: str = "CT"):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image))
    slicer_tools.set_volume_geometry(node, image)
    return node


def transform_node(scene, R):
    """The node Slicer would hold for ``R``: its "to parent" shows the scan upright."""
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "upright")
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(transforms.slicer_to_parent_ras(R)))
    return node


def segmentation_node(scene, labels: sitk.Image, ct_node, names=None, order=None):
    """A segmentation made segment by segment from a label image (as an edited one is)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "ASPECTS")
    node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    arr = sitk.GetArrayViewFromImage(labels)
    for label in order or regions.LABELS:
        name = (names or {}).get(label, regions.REGION_BY_LABEL[label].segment_name)
        node.AddSegmentFromBinaryLabelmapRepresentation(
            slicer_tools.oriented_image_from_array(arr == label, ct_node), name)
    return node


def test_volume_geometry_round_trips(scene, case):
    img = sitk.Image(case.ct)
    img.SetDirection(transforms.matrix_of(transforms.rotation((20.0, -10.0, 35.0)))[:3, :3].ravel().tolist())
    back = slicer_tools.image_from_volume_node(volume_node(scene, img))
    assert back.GetSize() == img.GetSize()
    for a, b in ((back.GetOrigin(), img.GetOrigin()), (back.GetSpacing(), img.GetSpacing()),
                 (back.GetDirection(), img.GetDirection())):
        assert np.allclose(a, b, atol=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(img))


def test_statistics_table_node(scene, case):
    report = statistics.region_statistics(case.ct, case.labels_scan)
    node = slicer_tools.statistics_table_node(scene, report)
    assert isinstance(node, slicer.vtkMRMLTableNode)
    assert node.GetNumberOfRows() == regions.NUM_LABELS
    assert node.GetNumberOfColumns() == len(statistics.COLUMNS)
    assert node.GetColumnUnitLabel("volume_ml") == "ml" and node.GetColumnUnitLabel("mean_hu") == "HU"
    assert node.GetColumnTitle("diff_to_mirror_hu") == "difference to mirror [HU]"
    table = node.GetTable()
    for i, r in enumerate(report.regions):
        assert table.GetValueByName(i, "region").ToString() == r.region
        assert table.GetValueByName(i, "volume_ml").ToDouble() == pytest.approx(r.volume_ml)
    assert "not a diagnosis" in node.GetAttribute("BrainLobeSeg.notice")
    # refilling the same node replaces its rows
    again = slicer_tools.statistics_table_node(scene, report, table_node=node)
    assert again is node and node.GetNumberOfRows() == regions.NUM_LABELS


def test_uncertainty_volume_node_overlays_the_ct(scene, case):
    ct_node = volume_node(scene, case.ct)
    tnode = transform_node(scene, case.transform)
    ct_node.SetAndObserveTransformNodeID(tnode.GetID())
    unc = sitk.Image(case.ct.GetSize(), sitk.sitkFloat32)
    unc.CopyInformation(case.ct)
    unc[10, 20, 5] = 0.5
    node = slicer_tools.uncertainty_volume_node(scene, unc, ct_node)
    assert node.GetTransformNodeID() == tnode.GetID()
    a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(a)
    ct_node.GetIJKToRASMatrix(b)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(a), slicer.util.arrayFromVTKMatrix(b))
    arr = slicer.util.arrayFromVolume(node)
    assert arr[5, 20, 10] == pytest.approx(0.5) and arr.sum() == pytest.approx(0.5)
    wrong = sitk.Image([s // 2 for s in case.ct.GetSize()], sitk.sitkFloat32)
    with pytest.raises(InputError, match="grid"):
        slicer_tools.uncertainty_volume_node(scene, wrong, ct_node)
    shifted = sitk.Image(unc)                       # same size, moved by half a voxel
    shifted.SetOrigin([o + s / 2 for o, s in zip(unc.GetOrigin(), unc.GetSpacing())])
    with pytest.raises(InputError, match="grid"):
        slicer_tools.uncertainty_volume_node(scene, shifted, ct_node)


@pytest.mark.parametrize("spelling", ["M2 left", "m2_LEFT", "left M2", "M2-lt"])
def test_known_spellings_of_segment_names(spelling):
    assert slicer_tools.label_for_segment_name(spelling) == regions.region("M2", "left").label


@pytest.mark.parametrize("name", ["haemorrhage", "M2", "left right M2", "M2 M3 left", "Segment_1"])
def test_unknown_segment_names(name):
    assert slicer_tools.label_for_segment_name(name) is None


def test_saved_case_round_trips_through_the_dataset_reader(scene, case, tmp_path):
    """Written by the Slicer helper from a real MRML scene (segments reordered and with
    other spellings, as after editing), read back by the training reader unchanged."""
    ct_node = volume_node(scene, case.ct)
    tnode = transform_node(scene, case.transform)
    ct_node.SetAndObserveTransformNodeID(tnode.GetID())
    order = list(reversed(regions.LABELS))
    names = {regions.region("C", "left").label: "left C", regions.region("M6", "right").label: "m6_right"}
    seg = segmentation_node(scene, case.labels_scan, ct_node, names=names, order=order)
    seg.SetAndObserveTransformNodeID(tnode.GetID())

    exported = slicer_tools.labelmap_from_segmentation(seg, ct_node)
    assert np.array_equal(sitk.GetArrayViewFromImage(exported), sitk.GetArrayViewFromImage(case.labels_scan))

    name = slicer_tools.save_case_for_training(seg, ct_node, tnode, str(tmp_path))
    cases = dataset.list_cases(tmp_path)
    assert [c.name for c in cases] == [name]
    ct, tf, seg_up = dataset.read_case(cases[0])
    assert np.array_equal(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(case.ct))
    assert np.allclose(transforms.matrix_of(tf), transforms.matrix_of(case.transform), atol=1e-6)
    expected = statistics.labels_scan_to_upright(case.labels_scan, case.ct, case.transform)
    assert np.array_equal(sitk.GetArrayViewFromImage(seg_up), sitk.GetArrayViewFromImage(expected))

    # the training pipeline takes the case as it is
    from training.preprocess import load_dataset
    from BrainLobeSegLib import models
    card = models.ModelCard(name="t", version="0", kind="3d", architecture={"name": "UNet3D", "args": {}},
                            spacing_mm=[4.0] * 3, intensity={"window": [-20.0, 100.0]}, networks={},
                            context_slices=1, coordinate_channel=True)
    prepared = load_dataset(tmp_path, card, multiple=8, log=lambda *a: None)
    assert len(prepared) == 1 and set(np.unique(prepared[0].labels)) <= set([0] + regions.LABELS)
    assert len(set(np.unique(prepared[0].labels)) - {0}) >= 16


def test_identity_case_keeps_the_labels_exactly(scene, case, tmp_path):
    ct_node = volume_node(scene, case.ct)
    seg = segmentation_node(scene, case.labels_scan, ct_node)
    name = slicer_tools.save_case_for_training(seg, ct_node, None, str(tmp_path))
    c = next(c for c in dataset.list_cases(tmp_path) if c.name == name)
    _, tf, seg_read = dataset.read_case(c)
    assert transforms.rotation_angle_deg(tf) == pytest.approx(0.0, abs=1e-6)
    assert np.array_equal(sitk.GetArrayViewFromImage(seg_read), sitk.GetArrayViewFromImage(case.labels_scan))


def test_sitk_transform_is_accepted_too(scene, case, tmp_path):
    ct_node = volume_node(scene, case.ct)
    seg = segmentation_node(scene, case.labels_scan, ct_node, order=regions.LABELS[:4])
    name = slicer_tools.save_case_for_training(seg, ct_node, case.transform, str(tmp_path))
    c = next(c for c in dataset.list_cases(tmp_path) if c.name == name)
    assert np.allclose(transforms.matrix_of(dataset.read_case(c)[1]), transforms.matrix_of(case.transform))


def test_unknown_and_duplicate_segments_are_refused(scene, case, tmp_path):
    ct_node = volume_node(scene, case.ct)
    seg = segmentation_node(scene, case.labels_scan, ct_node, order=[1, 2])
    seg.AddSegmentFromBinaryLabelmapRepresentation(
        slicer_tools.oriented_image_from_array(np.zeros(case.ct.GetSize()[::-1], bool), ct_node), "haematoma")
    with pytest.raises(InputError, match="'haematoma'"):
        slicer_tools.save_case_for_training(seg, ct_node, None, str(tmp_path))
    seg2 = segmentation_node(scene, case.labels_scan, ct_node, order=[1, 2], names={2: "C left"})
    with pytest.raises(InputError, match="same region"):
        slicer_tools.save_case_for_training(seg2, ct_node, None, str(tmp_path))
    assert not list(tmp_path.glob("*.nii*"))


def test_statistics_from_edited_nodes(scene, case):
    low = sitk.GetArrayFromImage(case.ct).astype(np.float32)
    m2 = regions.region("M2", "left").label
    low[sitk.GetArrayViewFromImage(case.labels_scan) == m2] -= 8.0
    img = sitk.GetImageFromArray(low)
    img.CopyInformation(case.ct)
    ct_node = volume_node(scene, img)
    seg = segmentation_node(scene, case.labels_scan, ct_node)
    report = slicer_tools.statistics_from_nodes(seg, ct_node)
    assert [r.region for r in report.flagged] == ["M2 left"]
    assert math.isfinite(report.by_label(m2).diff_to_mirror_hu)


class NodeAdditions:
    """Counts ``NodeAddedEvent`` on a scene: a temporary node that is added and removed
    again leaves the node count unchanged, but not this count."""

    def __init__(self, scene) -> None:
        self.count = 0
        self._scene = scene
        self._tag = scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, self._added)

    def _added(self, caller, event) -> None:
        self.count += 1

    def close(self) -> None:
        self._scene.RemoveObserver(self._tag)


def test_statistics_and_saving_add_no_temporary_nodes(scene, case, tmp_path):
    """Reading a segmentation back (statistics, Save case) goes through the segments'
    labelmaps, not through twenty labelmap nodes added to and removed from the scene."""
    ct_node = volume_node(scene, case.ct)
    seg = segmentation_node(scene, case.labels_scan, ct_node)
    additions = NodeAdditions(scene)
    try:
        report = slicer_tools.statistics_from_nodes(seg, ct_node)
        slicer_tools.save_case_for_training(seg, ct_node, None, str(tmp_path))
    finally:
        additions.close()
    assert additions.count == 0
    assert len(report.regions) == regions.NUM_LABELS


def test_segments_are_read_through_the_transform_between_the_nodes(scene, case):
    """A segmentation that is not under the CT's transform (here: in world coordinates,
    the CT under a rotation) is read onto the CT's grid through the transform between
    them, as Slicer's own export does; ignoring it would misplace every label."""
    ct_node = volume_node(scene, case.ct)
    tnode = transform_node(scene, case.transform)
    ct_node.SetAndObserveTransformNodeID(tnode.GetID())
    to_world = vtk.vtkMatrix4x4()
    tnode.GetMatrixTransformToWorld(to_world)
    image_to_world = slicer.util.arrayFromVTKMatrix(to_world) @ slicer_tools.ijk_to_ras(ct_node)
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "in world coordinates")
    arr = sitk.GetArrayViewFromImage(case.labels_scan)
    for label in (regions.region("C", "left").label, regions.region("M2", "right").label):
        mask = slicer_tools.oriented_image_from_array(arr == label, ct_node)
        mask.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(image_to_world))
        seg.AddSegmentFromBinaryLabelmapRepresentation(mask, regions.REGION_BY_LABEL[label].segment_name)
    assert seg.GetParentTransformNode() is None
    back = sitk.GetArrayFromImage(slicer_tools.labelmap_from_segmentation(seg, ct_node))
    expected = np.where(np.isin(arr, [regions.region("C", "left").label,
                                      regions.region("M2", "right").label]), arr, 0)
    assert expected.any()
    np.testing.assert_array_equal(back, expected)


def test_slicer_tools_imports_nothing_from_slicer_logic():
    """One job each, imports one way: the workflow (slicer_logic) builds on the MRML
    helpers (slicer_tools), which must not reach back, not even inside a function."""
    import ast
    from pathlib import Path
    source = Path(slicer_tools.__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(a.name for a in node.names)
    assert not {name for name in imported if "slicer_logic" in name}


def add_colour_table(scene, file_name: str):
    """A colour table node with the ID Slicer's colour logic gives the one it loads from
    ``Base/Logic/Resources/ColorFiles/<file_name>`` (the wheel ships no colour files)."""
    node = slicer.vtkMRMLColorTableNode()
    node.SetSingletonTag(f"File{file_name}")
    scene.AddNode(node)
    return node


@pytest.mark.parametrize("available, expected", [
    (("HotToColdRainbow.txt", "ColdToHotRainbow.txt", "Inferno.txt"), "Inferno.txt"),
    (("HotToColdRainbow.txt", "ColdToHotRainbow.txt"), "ColdToHotRainbow.txt"),
    (("HotToColdRainbow.txt",), None),
])
def test_uncertainty_is_shown_cold_to_hot_with_agreement_transparent(scene, case, available, expected):
    """Agreement (0, all the air too) must not be drawn hot: the colour map runs cold to
    hot (a hot-to-cold one is never chosen), and 0 is thresholded out so only voxels
    where members disagree are drawn over the CT; the smallest disagreement a run can
    give (1 of 4 members) stays visible."""
    for file_name in available:
        add_colour_table(scene, file_name)
    ct_node = volume_node(scene, case.ct)
    unc = sitk.Image(case.ct.GetSize(), sitk.sitkFloat32)
    unc.CopyInformation(case.ct)
    unc[10, 20, 5] = 0.25
    display = slicer_tools.uncertainty_volume_node(scene, unc, ct_node).GetDisplayNode()
    if expected is not None:
        assert display.GetColorNodeID() == f"vtkMRMLColorTableNodeFile{expected}"
    assert "HotToCold" not in (display.GetColorNodeID() or "")
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert 0.0 < display.GetLowerThreshold() < 0.25 and display.GetUpperThreshold() >= 1.0
    assert (display.GetWindow(), display.GetLevel()) == (1.0, 0.5)
