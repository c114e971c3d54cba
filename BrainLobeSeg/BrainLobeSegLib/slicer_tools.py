"""MRML helpers for the Slicer module: statistics table, uncertainty volume, saving cases.

Only classes that the ``slicer-core`` wheel provides are used (``vtkMRMLScene`` and the
nodes, ``vtkSlicerSegmentationsModuleLogic``, ``slicer.util`` array helpers), never
``slicer.app``, ``slicer.mrmlScene`` or Qt: the same functions run inside Slicer and, on
a plain ``vtkMRMLScene``, in CI. Every function takes the scene (or a node, whose scene
is used) explicitly for that reason.

- :func:`statistics_table_node` - a :class:`statistics.StatisticsReport` as a table node,
  one row per region, column units in the table's schema (Slicer shows them in the
  header), the "not a diagnosis" notice in the node's description attribute.
- :func:`uncertainty_volume_node` - the uncertainty volume as a scalar volume node on the
  CT's geometry, under the CT's transform so it overlays the CT in every view.
- :func:`labelmap_from_segmentation` - a (corrected) segmentation as a label image on the
  CT grid with label values looked up by *segment name* in :mod:`regions`, so segments
  that were reordered, recoloured or renamed to a known spelling keep their meaning.
- :func:`save_case_for_training` - scan + corrected labels + transform written as the next
  numbered case of a dataset folder (through :func:`dataset.write_case`).
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from . import regions, statistics, transforms
from .errors import InputError
# One implementation of each MRML <-> SimpleITK conversion, in slicer_logic (which checks
# the volume). The names below are also this module's API: tests and scripts import
# ``slicer_tools.image_from_volume_node`` and ``slicer_tools.set_node_geometry``.
from .slicer_logic import (_check_volume, _remove_node, copy_volume_geometry, grid_difference,
                           image_from_volume_node, labelmap_on_volume_grid)
from .slicer_logic import set_volume_geometry as set_node_geometry
from .slicer_logic import transform_from_node

__all__ = ["image_from_volume_node", "set_node_geometry", "ensure_segmentation_converters",
           "oriented_image_from_array", "statistics_table_node", "uncertainty_volume_node",
           "label_for_segment_name", "labelmap_from_segmentation", "transform_from",
           "save_case_for_training", "statistics_from_nodes"]

# ----------------------------------------------------------------------------- images

def ensure_segmentation_converters() -> None:
    """Register the binary-labelmap/closed-surface converter rules if none are.

    Slicer registers them at start-up; a bare ``vtkMRMLScene`` from ``slicer-core`` does
    not, and without them a segmentation cannot even hold a binary labelmap segment.
    """
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    rules = factory.GetConverterRules()
    if rules is not None and len(rules) > 0:
        return
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def oriented_image_from_array(mask: np.ndarray, volume_node):
    """A ``vtkOrientedImageData`` (a segment's binary labelmap) on the volume's grid.

    In the volume's *own* coordinates (its parent transform is not applied): a
    segmentation holding it belongs under the same transform node as the volume, which
    is how the Slicer module arranges a CT and its ASPECTS segmentation. The image itself
    is made by :func:`slicer_logic.labelmap_on_volume_grid` (which also checks that the
    mask has the volume's shape); the converters are registered first so that a bare
    scene can hold it.
    """
    ensure_segmentation_converters()
    return labelmap_on_volume_grid(np.asarray(mask).astype(np.uint8), volume_node)


# ----------------------------------------------------------------------------- statistics

_UNITS = {"volume_ml": "ml", "mean_hu": "HU", "median_hu": "HU", "std_hu": "HU",
          "mirror_mean_hu": "HU", "diff_to_mirror_hu": "HU", "mean_uncertainty": "0-1",
          "voxels_used": "voxels"}
_TEXT = {"region", "name", "mirror_region", "flag"}


def statistics_table_node(scene, report: statistics.StatisticsReport, name: str = "ASPECTS statistics",
                          table_node=None):
    """A ``vtkMRMLTableNode`` with one row per region (creates one, or refills ``table_node``).

    Numeric columns are doubles with NaN for "not measured"; the column titles carry the
    units (e.g. ``mean [HU]``) and the unit is also set as the column's unit label.
    """
    node = table_node or scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    node.RemoveAllColumns()
    table = node.GetTable()
    for key, title in statistics.COLUMNS:
        if key in _TEXT:
            col = vtk.vtkStringArray()
        elif key in ("label", "voxels_used"):
            col = vtk.vtkIntArray()
        else:
            col = vtk.vtkDoubleArray()
        col.SetName(key)
        table.AddColumn(col)
    rows = report.rows()
    table.SetNumberOfRows(len(rows))
    for i, row in enumerate(rows):
        for j, ((key, _), value) in enumerate(zip(statistics.COLUMNS, row)):
            col = table.GetColumn(j)
            if key in _TEXT:
                col.SetValue(i, "" if value is None else str(value))
            elif key in ("label", "voxels_used"):
                col.SetValue(i, int(value))
            else:
                col.SetValue(i, float("nan") if value is None else float(value))
    for key, title in statistics.COLUMNS:
        node.SetColumnTitle(key, title)
        if key in _UNITS:
            node.SetColumnUnitLabel(key, _UNITS[key])
    node.SetUseColumnTitleAsColumnHeader(True)
    node.SetAttribute("BrainLobeSeg.notice", report.notice)
    node.SetAttribute("BrainLobeSeg.flagged", ", ".join(r.region for r in report.flagged))
    node.SetAttribute("BrainLobeSeg.settings",
                      f"brain window {report.window_hu[0]:g}-{report.window_hu[1]:g} HU; flag at "
                      f"{report.threshold_hu:g} HU below the mirror region")
    table.Modified()
    node.Modified()
    return node


def uncertainty_volume_node(scene, uncertainty: sitk.Image, ct_node=None,
                            name: str = "ASPECTS uncertainty", volume_node=None):
    """The uncertainty (float, 0-1, scan grid) as a scalar volume node.

    With ``ct_node`` the node takes the CT's exact geometry and parent transform (so
    it overlays the CT, upright or not); the image must lie on the CT's grid.
    """
    if ct_node is not None:
        diff = grid_difference(ct_node, uncertainty)
        if diff is not None:
            raise InputError(f"the uncertainty volume is not on the CT's grid ({diff}).",
                             "Compute it for this CT.")
    node = volume_node or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(uncertainty).astype(np.float32))
    if ct_node is not None:
        node.CopyOrientation(ct_node)
        node.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
    else:
        set_node_geometry(node, uncertainty)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)
        for color_id in ("vtkMRMLColorTableNodeFileHotToColdRainbow.txt", "vtkMRMLColorTableNodeRainbow"):
            if scene.GetNodeByID(color_id) is not None:
                display.SetAndObserveColorNodeID(color_id)
                break
    node.SetAttribute("BrainLobeSeg.uncertainty", "fraction of planes/models disagreeing (0-1)")
    return node


# ----------------------------------------------------------------------------- segment names

_SIDES = {"left": "left", "lt": "left", "right": "right", "rt": "right"}
_CODES = {c.lower(): c for c in regions.CODES}


def label_for_segment_name(name: str) -> Optional[int]:
    """The region label a segment name denotes, or None if it names no region.

    Accepts the names this project writes (``M2 left``) and harmless variants: any case,
    ``_``/``-``/``.`` as separators, side first (``left M2``), ``lt``/``rt``. It does not
    guess beyond that: a name is known only if it holds exactly one ASPECTS code and one
    side word.
    """
    tokens = [t for t in re.split(r"[\s_\-.,/()]+", name.strip().lower()) if t]
    sides = [_SIDES[t] for t in tokens if t in _SIDES]
    codes = [_CODES[t] for t in tokens if t in _CODES]
    if len(tokens) != 2 or len(sides) != 1 or len(codes) != 1:
        return None
    return regions.region(codes[0], sides[0]).label


def labelmap_from_segmentation(segmentation_node, volume_node) -> sitk.Image:
    """The segmentation as a uint8 label image on the volume's grid (scan space).

    Each segment is exported with the volume as reference geometry (Slicer resolves any
    transform between the two nodes) and written with the label its *name* denotes.
    Unknown names and two segments naming one region are refused, listing them: a
    wrong label in a training case is worse than no case.
    """
    ensure_segmentation_converters()
    segmentation = segmentation_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    if not ids:
        raise InputError("the segmentation has no segments.", "Segment the scan first.")
    labels_of: Dict[str, int] = {}
    unknown: List[str] = []
    seen: Dict[int, str] = {}
    duplicate: List[str] = []
    for sid in ids:
        seg_name = segmentation.GetSegment(sid).GetName()
        label = label_for_segment_name(seg_name)
        if label is None:
            unknown.append(seg_name)
        elif label in seen:
            duplicate.append(f"'{seen[label]}' and '{seg_name}'")
        else:
            seen[label] = seg_name
            labels_of[sid] = label
    if unknown:
        raise InputError(f"segment name(s) {', '.join(repr(n) for n in unknown)} are not ASPECTS "
                         "regions, so their label in a training case would be unknown.",
                         "Rename them to a region name such as "
                         f"'{regions.REGIONS[0].segment_name}' or "
                         f"'{regions.REGIONS[-1].segment_name}' ({', '.join(regions.CODES)} "
                         "with left/right), or delete them.")
    if duplicate:
        raise InputError(f"several segments name the same region: {'; '.join(duplicate)}.",
                         "Merge them (Segment Editor: Logical operators > Add) or rename one.")
    _check_volume(volume_node)
    out = np.zeros(tuple(reversed(volume_node.GetImageData().GetDimensions())), np.uint8)
    scene = segmentation_node.GetScene()
    before = _node_ids(scene, "vtkMRMLColorTableNode")
    try:
        _export_into(out, labels_of, segmentation_node, volume_node, scene)
    finally:  # the export leaves one colour table per call behind: remove those
        for node_id in _node_ids(scene, "vtkMRMLColorTableNode") - before:
            scene.RemoveNode(scene.GetNodeByID(node_id))
    img = sitk.GetImageFromArray(out)
    copy_volume_geometry(volume_node, img)   # the CT's grid, without copying its voxels
    return img


def _node_ids(scene, class_name: str) -> set:
    nodes = scene.GetNodesByClass(class_name)
    return {nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems())}


def _export_into(out: np.ndarray, labels_of: Dict[str, int], segmentation_node, volume_node,
                 scene) -> None:
    """Export each segment onto the volume's grid and paint its label into ``out``."""
    segmentation = segmentation_node.GetSegmentation()
    for sid, label in labels_of.items():
        ids_array = vtk.vtkStringArray()
        ids_array.InsertNextValue(sid)
        tmp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__brainlobeseg_export__")
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids_array, tmp, volume_node)
            if not ok:
                raise InputError(f"segment '{segmentation.GetSegment(sid).GetName()}' could not be "
                                 "exported onto the CT's grid.", "Check that the segmentation "
                                 "overlaps the CT.")
            arr = slicer.util.arrayFromVolume(tmp)
            if arr.shape != out.shape:
                raise InputError("the exported segment does not match the CT's grid.",
                                 "Set the CT as the segmentation's reference geometry.")
            out[arr > 0] = label
        finally:
            _remove_node(scene, tmp)


# ----------------------------------------------------------------------------- saving cases

def transform_from(transform_node_or_R) -> Optional[sitk.Transform]:
    """``R`` (upright -> scan) from a Slicer linear transform node, a SimpleITK transform,
    or None (no transform: the dataset case gets none, i.e. identity)."""
    if transform_node_or_R is None:
        return None
    if isinstance(transform_node_or_R, sitk.Transform):
        return transforms.validate(transform_node_or_R, "the transform")
    if not hasattr(transform_node_or_R, "IsTransformToWorldLinear"):
        raise InputError(f"{type(transform_node_or_R).__name__} is not a transform.",
                         "Give a linear transform node or a SimpleITK transform.")
    return transform_from_node(transform_node_or_R)


def save_case_for_training(segmentation_node, volume_node, transform_node_or_R,
                           dataset_dir: str, name: Optional[str] = None) -> str:
    """Write the CT, its transform and the (corrected) segmentation as the next case.

    The segmentation is exported on the CT's grid with labels by segment name
    (:func:`labelmap_from_segmentation`), converted to the upright ``N-seg`` layout with
    ``R`` and handed to :func:`dataset.write_case`. Returns the case name.
    """
    if segmentation_node is None or volume_node is None:
        raise InputError("a segmentation and its CT volume are needed.", "Select both.")
    ct = image_from_volume_node(volume_node)
    labels = labelmap_from_segmentation(segmentation_node, volume_node)
    R = transform_from(transform_node_or_R)
    return statistics.save_corrected_case(dataset_dir, ct, labels, R, labels_space="scan", name=name)


def statistics_from_nodes(segmentation_node, volume_node, uncertainty_node=None,
                          **settings) -> statistics.StatisticsReport:
    """Statistics of the segmentation *as it is now* (e.g. after correction)."""
    ct = image_from_volume_node(volume_node)
    labels = labelmap_from_segmentation(segmentation_node, volume_node)
    unc = image_from_volume_node(uncertainty_node) if uncertainty_node is not None else None
    return statistics.region_statistics(ct, labels, unc, uncertainty_source=(
        statistics.UNCERTAINTY_DISAGREEMENT if unc is not None else None), **settings)

