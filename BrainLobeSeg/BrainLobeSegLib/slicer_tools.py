"""MRML nodes <-> images, arrays and transforms, and the nodes the module builds.

One job: stateless conversions and node builders on MRML. The segmentation workflow
(:mod:`slicer_logic`: prepare, run, output, results) is built on these; this module
imports nothing from it, so the imports run one way (``slicer_logic`` -> here).

Only classes that the ``slicer-core`` wheel provides are used (``vtkMRMLScene`` and the
nodes, ``vtkSegment``/``vtkOrientedImageData``, ``slicer.util`` array helpers), never
``slicer.app``, ``slicer.mrmlScene`` or Qt: the same functions run inside Slicer and, on
a plain ``vtkMRMLScene``, in CI. Every function takes the scene (or a node, whose scene
is used) explicitly for that reason.

- volumes: :func:`image_from_volume_node` (a voxel copy in LPS with exact geometry) and
  its inverses; the IJK -> RAS matrix; grid comparison.
- transforms: ``R`` (upright -> scan) from and to linear transform nodes, ITK-SNAP files.
- segmentations: the 20 regions into a node (:func:`fill_segmentation`) and back as a
  label array on the CT grid, by segment ID (:func:`labels_from_segmentation`) or by
  segment *name* (:func:`labelmap_from_segmentation`, for corrected segmentations), both
  without temporary nodes.
- results: the statistics table, the uncertainty volume, a corrected case saved for
  training.
- the ASPECTS read-out: its table (with the clinician's check boxes), the evidence
  volume, and the undoable highlight of the affected segments.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from . import regions, statistics, transforms
from .errors import InputError

#: Segment IDs, as in the ``.seg.nrrd`` files :mod:`output` writes.
SEGMENT_ID_FORMAT = "Segment_{label}"

#: RAS <-> LPS for 3-vectors and 3x3 matrices (x and y change sign).
_FLIP = np.diag([-1.0, -1.0, 1.0])

#: Colour maps for the uncertainty volume, in order of preference (IDs of the nodes
#: Slicer's colour logic adds from Base/Logic/Resources/ColorFiles): cold to hot, with
#: 0 ("all models agree") black. ``HotToColdRainbow`` would draw agreement, and so all
#: the air, red.
UNCERTAINTY_COLOR_IDS = ("vtkMRMLColorTableNodeFileInferno.txt",
                         "vtkMRMLColorTableNodeFileColdToHotRainbow.txt")


# ----------------------------------------------------------------------------- volumes

def ijk_to_ras(volume_node) -> np.ndarray:
    """The volume's own IJK -> RAS matrix (4x4), without any parent transform."""
    m = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def check_volume(volume_node) -> None:
    """Refuse what is not a usable CT volume node, with a message the user can act on."""
    if volume_node is None:
        raise InputError("no CT volume is selected.", "Load the head CT and select it as input.")
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"'{volume_node.GetName()}' is not a scalar volume.",
                         "Select the head CT (a scalar volume) as input.")
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"the volume '{volume_node.GetName()}' holds no image data.",
                         "Load the CT again.")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"the volume '{volume_node.GetName()}' has "
                         f"{image.GetNumberOfScalarComponents()} components per voxel (colour or "
                         "vector image), not CT numbers.", "Select the original head CT.")
    if min(image.GetDimensions()) < 2:
        raise InputError(f"the volume '{volume_node.GetName()}' is a single slice "
                         f"({'x'.join(map(str, image.GetDimensions()))} voxels).",
                         "Load the whole head CT series.")


def image_from_volume_node(volume_node) -> sitk.Image:
    """A copy of the volume's voxels as a SimpleITK image in LPS, with exact geometry.

    Slicer stores a volume as voxels plus an IJK -> RAS matrix; ITK uses LPS origin,
    spacing and direction. The columns of the matrix are the voxel axes scaled by the
    spacing, so spacing is their length and direction their unit vectors, both with x and
    y negated for LPS. The parent transform is *not* applied: this is the scan as
    acquired, which is what ``R`` refers to. The voxels are copied, so the image stays
    valid whatever happens to the node later (the user may edit or delete it between the
    engine's steps).
    """
    check_volume(volume_node)
    array = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    image = sitk.GetImageFromArray(array)
    copy_volume_geometry(volume_node, image)
    return image


def copy_volume_geometry(volume_node, image: sitk.Image) -> None:
    """Give ``image`` the volume node's geometry in LPS (spacing, origin, direction).

    The geometry half of :func:`image_from_volume_node`, for images that are made on
    the volume's grid without needing its voxels (an exported label map, say).
    """
    m = ijk_to_ras(volume_node)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(m)):
        raise InputError(f"the volume '{volume_node.GetName()}' has an invalid geometry "
                         f"(voxel spacing {spacing.round(4).tolist()}).", "Load the CT again.")
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in _FLIP @ m[:3, 3]])
    image.SetDirection([float(v) for v in (_FLIP @ (m[:3, :3] / spacing)).ravel()])


def set_volume_geometry(volume_node, image: sitk.Image) -> None:
    """Give a volume node the geometry (origin, spacing, directions) of ``image``.

    The inverse of the geometry part of :func:`image_from_volume_node`: one IJK -> RAS
    matrix built from the LPS origin, spacing and direction, so that the two conversions
    cannot drift apart. The voxels are left alone.
    """
    volume_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(_ijk_to_ras_of_image(image)))
    volume_node.Modified()


def _ijk_to_ras_of_image(image: sitk.Image) -> np.ndarray:
    """The IJK -> RAS matrix of an LPS image (origin, spacing, direction)."""
    spacing = np.asarray(image.GetSpacing(), float)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = _FLIP @ direction * spacing
    m[:3, 3] = _FLIP @ np.asarray(image.GetOrigin(), float)
    return m


def grid_difference(volume_node, image: sitk.Image, tol: float = 1e-4) -> Optional[str]:
    """None if ``image`` lies on the volume node's voxel grid, else what differs.

    Compares the size and the IJK -> RAS matrices only, so a 512x512x110 CT is not
    copied just to be compared (:func:`image_from_volume_node` copies the voxels). The
    volume is checked as there (a node without image data is an InputError).
    """
    check_volume(volume_node)
    dims = tuple(volume_node.GetImageData().GetDimensions())
    if dims != tuple(image.GetSize()):
        return f"size {tuple(image.GetSize())} vs {dims}"
    ours, theirs = _ijk_to_ras_of_image(image), ijk_to_ras(volume_node)
    if not np.allclose(ours, theirs, atol=tol * max(1.0, float(np.abs(theirs).max()))):
        return "voxel spacing, position or orientation differs"
    return None


def update_volume_from_image(volume_node, image: sitk.Image) -> None:
    """Set a volume node's voxels and geometry from a SimpleITK image (inverse of
    :func:`image_from_volume_node`); used to load phantoms and engine outputs."""
    slicer.util.updateVolumeFromArray(volume_node, sitk.GetArrayFromImage(image))
    set_volume_geometry(volume_node, image)


def remove_node(scene, node) -> None:
    """Remove a node and the display/storage nodes it created."""
    for i in range(node.GetNumberOfDisplayNodes() - 1, -1, -1):
        display = node.GetNthDisplayNode(i)
        if display is not None:
            scene.RemoveNode(display)
    scene.RemoveNode(node)


# ----------------------------------------------------------------------------- transforms

def transform_name(node) -> str:
    """How messages name a transform node (quoted), or "the transform" without a name."""
    return f"'{node.GetName()}'" if node.GetName() else "the transform"


def matrix_to_world(transform_node) -> np.ndarray:
    """A linear transform node's "to world" RAS matrix (its whole parent chain).

    Non-linear nodes (grid, B-spline, thin plate) are refused: the convention needs
    one linear map between the upright and the scan space.
    """
    if not transform_node.IsTransformToWorldLinear():
        raise InputError(f"the transform {transform_name(transform_node)} is not linear "
                         "(it is, or depends on, a grid, B-spline or thin-plate transform).",
                         "Use the linear transform that turns the head upright, e.g. the "
                         "one ITK-SNAP saves, or choose no transform.")
    m = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(m)
    return slicer.util.arrayFromVTKMatrix(m)


def transform_from_node(transform_node, invert: bool = False) -> sitk.AffineTransform:
    """``R`` (upright -> scan, LPS) from a Slicer linear transform node.

    A node that shows the CT upright when applied to it has the "to parent" matrix
    ``slicer_to_parent_ras(R)``; :func:`transforms.from_slicer_to_parent_ras` undoes
    that. ``invert`` is the explicit switch for transforms made the other way round.
    The result is checked like a transform file (singular, absurd, mirrored, scaled).
    """
    R = transforms.from_slicer_to_parent_ras(matrix_to_world(transform_node))
    if invert:
        R = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(R)))
    return transforms.validate(R, source=f"the transform {transform_name(transform_node)}")


def add_upright_transform_node(scene, R: sitk.Transform, name: str):
    """A new ``vtkMRMLLinearTransformNode`` holding ``R`` (upright -> scan, LPS).

    Its "to parent" matrix is ``slicer_to_parent_ras(R)``: applied to the CT it shows the
    head upright, and :func:`transform_from_node` reads exactly ``R`` back. Every place
    that turns an ``R`` into a node (a transform file, the automatic estimate) goes
    through here so that they all follow the one convention.
    """
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(transforms.slicer_to_parent_ras(R)))
    return node


def load_itksnap_transform(scene, path: str, invert: bool = False,
                           name: Optional[str] = None):
    """Read an ITK-SNAP transform file into a new ``vtkMRMLLinearTransformNode``.

    Slicer's own reader refuses ``MatrixOffsetTransformBase_double_3_3``, so the file is
    read with :func:`transforms.read_transform` (which also rejects non-linear, singular
    and garbage files) and the node gets the "to parent" matrix
    ``slicer_to_parent_ras(R)``: applied to the CT it shows the head upright. The file is
    read before anything is added, so a bad file leaves the scene unchanged.
    """
    R = transforms.read_transform(str(path), invert=invert)
    node = add_upright_transform_node(
        scene, R, name or os.path.splitext(os.path.basename(str(path)))[0])
    node.SetAttribute("BrainLobeSeg.sourceFile", str(path))
    node.SetAttribute("BrainLobeSeg.inverted", "true" if invert else "false")
    return node


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


# ----------------------------------------------------------------------------- segmentations

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
    is made by :func:`labelmap_on_volume_grid` (which also checks that the
    mask has the volume's shape); the converters are registered first so that a bare
    scene can hold it.
    """
    ensure_segmentation_converters()
    return labelmap_on_volume_grid(np.asarray(mask).astype(np.uint8), volume_node)


def labelmap_on_volume_grid(labels: np.ndarray, volume_node):
    """A ``vtkOrientedImageData`` holding ``labels`` (uint8) on the volume's own grid.

    The segmentation is put under the volume's parent transform, so the volume's own
    IJK -> RAS matrix is the right image-to-"node" matrix: the labels stay voxel-aligned
    with the CT whether or not a transform is applied to it. Used for the shared 20-label
    layer and for single binary segments alike (a bool mask becomes 0/1).
    """
    dims = volume_node.GetImageData().GetDimensions()
    if tuple(labels.shape) != (dims[2], dims[1], dims[0]):
        raise InputError(f"the labels ({'x'.join(map(str, labels.shape[::-1]))}) are not on the "
                         f"CT's grid ({'x'.join(map(str, dims))}).", "Segment this CT again.")
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*dims)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(volume_node)))
    flat = np.ascontiguousarray(labels, dtype=np.uint8).ravel()
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True,
                                                               array_type=vtk.VTK_UNSIGNED_CHAR))
    return image


def fill_segmentation(segmentation_node, labels: np.ndarray, volume_node) -> None:
    """Replace the node's segments with the 20 regions from a label array.

    ``labels`` is the ``(k, j, i)`` uint8 array on the volume's grid (0 background,
    1-20 regions). All 20 segments share one labelmap layer (as a ``.seg.nrrd`` does),
    each with its label value, name, colour and terminology from :mod:`regions`; empty
    regions are kept as empty segments so that every result has the same 20 segments.
    The node goes under the volume's parent transform and takes the volume as
    reference geometry.
    """
    labelmap = labelmap_on_volume_grid(labels, volume_node)
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    tag = slicer.vtkSegment.GetTerminologyEntryTagName()
    was_modifying = segmentation_node.StartModify()
    try:
        segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segmentation = segmentation_node.GetSegmentation()
        segmentation.RemoveAllSegments()
        segmentation.SetSourceRepresentationName(binary)
        for r in regions.REGIONS:
            segment = slicer.vtkSegment()
            segment.SetName(r.segment_name)
            segment.SetNameAutoGenerated(False)
            segment.SetColor(*r.color_float)
            segment.SetColorAutoGenerated(False)
            segment.SetLabelValue(r.label)
            segment.SetTag(tag, regions.terminology_entry(r))
            segment.AddRepresentation(binary, labelmap)
            segmentation.AddSegment(segment, SEGMENT_ID_FORMAT.format(label=r.label))
    finally:
        segmentation_node.EndModify(was_modifying)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()


def _segmentation_to_volume(segmentation_node, volume_node) -> Optional[vtk.vtkGeneralTransform]:
    """The transform from the segmentation's frame to the volume's, or None if they share
    a parent transform (as the module arranges them); Slicer's own export does the same."""
    if segmentation_node.GetParentTransformNode() is volume_node.GetParentTransformNode():
        return None
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        segmentation_node.GetParentTransformNode(), volume_node.GetParentTransformNode(), transform)
    return transform


def paint_segments(segmentation_node, volume_node, labels_of: Dict[str, int]) -> np.ndarray:
    """A ``(k, j, i)`` uint8 array on the volume's grid: each segment in ``labels_of``
    (segment ID -> label) resampled onto the grid and painted with its label.

    Read straight from the segments' binary labelmaps with
    ``vtkOrientedImageDataResample``: no temporary labelmap nodes are added to the scene
    (each would fire scene events that the GUI reacts to, twenty times per call), and
    any transform between the segmentation and the volume is applied, as Slicer's export
    does. Later segments win where segments overlap.
    """
    check_volume(volume_node)
    ensure_segmentation_converters()
    dims = volume_node.GetImageData().GetDimensions()
    out = np.zeros((dims[2], dims[1], dims[0]), np.uint8)
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if labels_of and not segmentation_node.GetSegmentation().ContainsRepresentation(binary):
        segmentation_node.CreateBinaryLabelmapRepresentation()   # e.g. made from surfaces
    reference = labelmap_on_volume_grid(out, volume_node)
    to_volume = _segmentation_to_volume(segmentation_node, volume_node)
    for segment_id, label in labels_of.items():
        mask = slicer.vtkOrientedImageData()
        if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, mask) or mask.IsEmpty():
            continue
        resampled = slicer.vtkOrientedImageData()
        slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            mask, reference, resampled, False, False, to_volume)
        values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(out.shape)
        out[values > 0] = label
    return out


def labels_from_segmentation(segmentation_node, volume_node) -> np.ndarray:
    """The regions of a segmentation this module made, as a ``(k, j, i)`` uint8 array
    on the volume grid, finding each region by its segment ID (``Segment_<label>``).

    Used by tests and the self-test to compare a node with the engine's labels voxel for
    voxel. For segmentations a user may have edited, :func:`labelmap_from_segmentation`
    goes by segment name instead.
    """
    segmentation = segmentation_node.GetSegmentation()
    labels_of = {SEGMENT_ID_FORMAT.format(label=r.label): r.label for r in regions.REGIONS
                 if segmentation.GetSegment(SEGMENT_ID_FORMAT.format(label=r.label)) is not None}
    return paint_segments(segmentation_node, volume_node, labels_of)


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

    Each segment is written with the label its *name* denotes, so corrections made in
    the Segment Editor count and renamed or extra segments are reported instead of
    being measured as something else. Unknown names and two segments naming one region
    are refused, listing them: a wrong label in a training case is worse than no case.
    """
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
    img = sitk.GetImageFromArray(paint_segments(segmentation_node, volume_node, labels_of))
    copy_volume_geometry(volume_node, img)   # the CT's grid, without copying its voxels
    return img


# ----------------------------------------------------------------------------- results

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
    it overlays the CT, upright or not); the image must lie on the CT's grid. It is
    shown cold to hot (:data:`UNCERTAINTY_COLOR_IDS`, the first one the scene has) over
    0-1, and voxels where all members agree (0) are thresholded out, so they are
    transparent when the node is shown over the CT.
    """
    node = _overlay_volume_node(scene, uncertainty, ct_node, name, volume_node, "uncertainty volume",
                                window=(0.0, 1.0), shown=(1e-6, 1.0),   # agreement (0) transparent
                                color_ids=UNCERTAINTY_COLOR_IDS)
    node.SetAttribute("BrainLobeSeg.uncertainty", "fraction of planes/models disagreeing (0-1)")
    return node


def _overlay_volume_node(scene, image: sitk.Image, ct_node, name: str, volume_node, what: str,
                         window: Tuple[float, float], shown: Tuple[float, float],
                         color_ids: Sequence[str]):
    """A float scalar volume node holding ``image``, displayed as an overlay of the CT.

    Shared by the uncertainty and the ASPECTS evidence volumes, so that both overlay the
    CT the same way: with ``ct_node`` the node takes the CT's exact geometry and parent
    transform (the image must lie on the CT's grid); ``window`` is the colour range,
    voxels outside ``shown`` are thresholded out (transparent over the CT), and the
    colour table is the first of ``color_ids`` the scene has (Slicer's colour logic adds
    them at start-up; a bare scene has none, and the default stays). ``volume_node`` is
    refilled instead of adding a new node.
    """
    if ct_node is not None:
        diff = grid_difference(ct_node, image)
        if diff is not None:
            raise InputError(f"the {what} is not on the CT's grid ({diff}).", "Compute it for this CT.")
    node = volume_node or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, sitk.GetArrayFromImage(image).astype(np.float32))
    if ct_node is not None:
        node.CopyOrientation(ct_node)
        node.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
    else:
        set_volume_geometry(node, image)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(*window)
        display.SetAutoThreshold(False)
        display.SetThreshold(*shown)
        display.SetApplyThreshold(True)
        color_id = next((c for c in color_ids if scene.GetNodeByID(c) is not None), None)
        if color_id is not None:
            display.SetAndObserveColorNodeID(color_id)
    return node


def save_case_for_training(segmentation_node, volume_node, transform_node_or_R,
                           dataset_dir: os.PathLike, name: Optional[str] = None) -> str:
    """Write the CT, its transform and the (corrected) segmentation as the next case.

    The segmentation is read on the CT's grid with labels by segment name
    (:func:`labelmap_from_segmentation`), converted to the upright ``N-seg`` layout with
    ``R`` and handed to :func:`dataset.write_case`. Returns the case name.
    """
    if segmentation_node is None or volume_node is None:
        raise InputError("a segmentation and its CT volume are needed.", "Select both.")
    ct = image_from_volume_node(volume_node)
    labels = labelmap_from_segmentation(segmentation_node, volume_node)
    R = transform_from(transform_node_or_R)
    return statistics.save_corrected_case(str(dataset_dir), ct, labels, R, labels_space="scan",
                                          name=name)


def statistics_from_nodes(segmentation_node, volume_node, uncertainty_node=None,
                          **settings) -> statistics.StatisticsReport:
    """Statistics of the segmentation *as it is now* (e.g. after correction)."""
    ct = image_from_volume_node(volume_node)
    labels = labelmap_from_segmentation(segmentation_node, volume_node)
    unc = image_from_volume_node(uncertainty_node) if uncertainty_node is not None else None
    return statistics.region_statistics(ct, labels, unc, uncertainty_source=(
        statistics.UNCERTAINTY_DISAGREEMENT if unc is not None else None), **settings)


# ----------------------------------------------------------------------------- ASPECTS read-out

#: Colour tables for the ASPECTS evidence volume, in order of preference: diverging, so
#: that darker than the mirror side (negative) and lighter (positive) differ in hue with
#: 0 in the middle. ``DivergingBlueRed`` (blue = darker) is one of the tables Slicer's
#: colour logic adds from Base/Logic/Resources/ColorFiles at start-up; ``fMRI`` (negative
#: blue/cyan, positive red/yellow) is built into MRML's own colour logic, which is what a
#: ``slicer-core`` scene gets from ``vtkMRMLColorLogic.AddDefaultColorNodes``. A bare scene
#: has neither: the volume then keeps the default grey table.
EVIDENCE_COLOR_IDS = ("vtkMRMLColorTableNodeFileDivergingBlueRed.txt", "vtkMRMLColorTableNodefMRI")
#: Colour range of the evidence volume (HU around 0): an early infarct is a few HU.
EVIDENCE_WINDOW_HU = 8.0

#: Display node attribute holding the highlighted segments and their display properties
#: from before (JSON), so that any later call, even from a new session, can undo them.
HIGHLIGHT_ATTRIBUTE = "BrainLobeSeg.highlighted"
#: Colour of a highlighted (affected) region in the views: pure red, which no region has.
HIGHLIGHT_COLOR = (1.0, 0.0, 0.0)

#: The ASPECTS table's columns: key, title, kind ("text", "check" or a unit for numbers).
#: "affected" is a ``vtkBitArray``: Slicer's table view shows it as check boxes, and
#: ticking one is the clinician's override (:func:`table_calls` reads them back).
ASPECTS_COLUMNS = (
    ("region", "region", "text"),
    ("affected", "affected", "check"),
    ("called", "automatic call", "text"),
    ("override", "clinician", "text"),
    ("call_score", "call score", "log-odds"),
    ("affected_percent", "darker part [%]", "%"),
    ("affected_ml", "darker part [ml]", "ml"),
    ("median_drop_hu", "median drop [HU]", "HU"),
    ("darkest_part_hu", "darkest part [HU]", "HU"),
    ("diff_to_mirror_hu", "vs mirror [HU]", "HU"),
    ("diff_to_expected_hu", "vs expected [HU]", "HU"),
    ("gw_loss_hu", "grey/white loss [HU]", "HU"),
    ("parenchyma_ml", "tissue measured [ml]", "ml"),
    ("reasons", "reasons", "text"),
)


def region_segment_ids(segmentation_node) -> Dict[int, str]:
    """Region label -> segment ID, by segment *name* (as :func:`labelmap_from_segmentation`
    reads a corrected segmentation), so that the highlight lands on the segment that was
    measured; segments whose names denote no region are left out."""
    segmentation = segmentation_node.GetSegmentation()
    out: Dict[int, str] = {}
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        label = label_for_segment_name(segmentation.GetSegment(sid).GetName())
        if label is not None:
            out.setdefault(label, sid)
    return out


def _segment_display(display, sid: str) -> dict:
    """The per-segment display properties a highlight changes (override colour,
    visibility, 2D fill and outline), as plain values for :data:`HIGHLIGHT_ATTRIBUTE`."""
    color = display.GetSegmentOverrideColor(sid)
    return {"color": [color.GetX(), color.GetY(), color.GetZ()],
            "visible": bool(display.GetSegmentVisibility(sid)),
            "fill": bool(display.GetSegmentVisibility2DFill(sid)),
            "outline": bool(display.GetSegmentVisibility2DOutline(sid)),
            "fillOpacity": display.GetSegmentOpacity2DFill(sid),
            "outlineOpacity": display.GetSegmentOpacity2DOutline(sid)}


def _set_segment_display(display, sid: str, props: dict) -> None:
    if min(props["color"]) < 0:     # SEGMENT_COLOR_NO_OVERRIDE: the segment's own colour
        display.UnsetSegmentOverrideColor(sid)
    else:
        display.SetSegmentOverrideColor(sid, *props["color"])
    display.SetSegmentVisibility(sid, props["visible"])
    display.SetSegmentVisibility2DFill(sid, props["fill"])
    display.SetSegmentVisibility2DOutline(sid, props["outline"])
    display.SetSegmentOpacity2DFill(sid, props["fillOpacity"])
    display.SetSegmentOpacity2DOutline(sid, props["outlineOpacity"])


def highlighted_segments(segmentation_node) -> List[str]:
    """IDs of the segments :func:`highlight_segments` has highlighted now."""
    display = segmentation_node.GetDisplayNode()
    text = display.GetAttribute(HIGHLIGHT_ATTRIBUTE) if display is not None else None
    return sorted(json.loads(text)) if text else []


def highlight_segments(segmentation_node, segment_ids) -> None:
    """Highlight exactly ``segment_ids`` in the segmentation's views; undo the others.

    Slicer has no per-segment outline width (``SliceIntersectionThickness`` is the whole
    node's), so a highlighted segment is drawn in :data:`HIGHLIGHT_COLOR` (a per-view
    override colour: the segment's own colour and terminology are untouched), shown,
    with full 2D fill and outline opacity. Its previous display properties are kept in
    the display node's :data:`HIGHLIGHT_ATTRIBUTE` and put back exactly when it is no
    longer in ``segment_ids``, so un-highlighting leaves the display as it was. Nothing
    else is changed; a segmentation without a display node is not shown anywhere and is
    left alone.
    """
    display = segmentation_node.GetDisplayNode()
    if display is None:
        return
    segmentation = segmentation_node.GetSegmentation()
    text = display.GetAttribute(HIGHLIGHT_ATTRIBUTE)
    saved: Dict[str, dict] = json.loads(text) if text else {}
    wanted = {sid for sid in segment_ids if segmentation.GetSegment(sid) is not None}
    was_modifying = display.StartModify()
    try:
        for sid in [s for s in saved if s not in wanted]:
            props = saved.pop(sid)
            if segmentation.GetSegment(sid) is not None:    # a deleted segment needs nothing
                _set_segment_display(display, sid, props)
        for sid in sorted(wanted - set(saved)):
            saved[sid] = _segment_display(display, sid)
            _set_segment_display(display, sid, {
                "color": list(HIGHLIGHT_COLOR), "visible": True, "fill": True, "outline": True,
                "fillOpacity": 1.0, "outlineOpacity": 1.0})
        if saved:
            display.SetAttribute(HIGHLIGHT_ATTRIBUTE, json.dumps(saved, sort_keys=True))
        elif text is not None:
            display.RemoveAttribute(HIGHLIGHT_ATTRIBUTE)
    finally:
        display.EndModify(was_modifying)


def evidence_volume_node(scene, evidence: sitk.Image, ct_node, name: str = "ASPECTS evidence",
                         volume_node=None):
    """The ASPECTS evidence map (float32 HU on the CT's grid, negative = darker than the
    mirror side) as a scalar volume node overlaying the CT.

    Coloured with a diverging table (:data:`EVIDENCE_COLOR_IDS`) over
    ±:data:`EVIDENCE_WINDOW_HU`; only voxels at least ``aspects.VOXEL_DROP_HU`` darker
    than the mirror side (those counted as affected) are shown over the CT, the rest is
    transparent (the Volumes module's threshold shows more). ``volume_node`` is
    refilled instead of adding a new node.
    """
    from . import aspects
    node = _overlay_volume_node(scene, evidence, ct_node, name, volume_node, "evidence map",
                                window=(-EVIDENCE_WINDOW_HU, EVIDENCE_WINDOW_HU),
                                shown=(-1000.0, -aspects.VOXEL_DROP_HU), color_ids=EVIDENCE_COLOR_IDS)
    node.SetAttribute("BrainLobeSeg.aspectsEvidence",
                      "smoothed HU difference to the mirror side; negative: darker (0 outside tissue)")
    return node


def _number(value: Optional[float], scale: float = 1.0) -> float:
    return float("nan") if value is None else float(value) * scale


def aspects_table_node(scene, result, name: str = "ASPECTS", table_node=None):
    """A ``vtkMRMLTableNode`` with one row per region of an ``aspects.AspectsResult``, in
    the result's order (creates one, or refills ``table_node``).

    Numbers are doubles with NaN for "not measured", titles carry the units. The calls,
    overrides, scores and side are written by :func:`update_aspects_table`.
    """
    node = table_node or scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    was_modifying = node.StartModify()
    try:
        node.RemoveAllColumns()
        table = node.GetTable()
        for key, _title, kind in ASPECTS_COLUMNS:
            col = (vtk.vtkStringArray() if kind == "text" else vtk.vtkBitArray() if kind == "check"
                   else vtk.vtkDoubleArray())
            col.SetName(key)
            table.AddColumn(col)
        table.SetNumberOfRows(len(result.regions))
        for i, r in enumerate(result.regions):
            call = "yes" if r.called else "not assessed" if r.dense_lesion_ml is not None else "no"
            values = {"region": r.region, "affected": 0, "called": call,
                      "override": "", "call_score": _number(r.call_score),
                      "affected_percent": _number(r.affected_fraction, 100.0),
                      "affected_ml": _number(r.affected_ml), "median_drop_hu": _number(r.median_drop_hu),
                      "darkest_part_hu": _number(r.darkest_part_hu),
                      "diff_to_mirror_hu": _number(r.diff_to_mirror_hu),
                      "diff_to_expected_hu": _number(r.diff_to_expected_hu),
                      "gw_loss_hu": _number(r.gw_loss_hu), "parenchyma_ml": _number(r.parenchyma_ml),
                      "reasons": "; ".join(r.reasons)}
            for key, value in values.items():
                table.GetColumnByName(key).SetValue(i, value)
        for key, title, kind in ASPECTS_COLUMNS:
            node.SetColumnTitle(key, title)
            if kind not in ("text", "check"):
                node.SetColumnUnitLabel(key, kind)
        node.SetUseColumnTitleAsColumnHeader(True)
        node.SetAttribute("BrainLobeSeg.notice", result.notice)
        node.SetAttribute("BrainLobeSeg.settings", json.dumps(result.settings, sort_keys=True))
        update_aspects_table(node, result)
        table.Modified()
    finally:
        node.EndModify(was_modifying)
    return node


def update_aspects_table(node, result) -> bool:
    """Write the calls that count (the check boxes), the overrides and the scores into
    ``node``; returns whether anything changed.

    Only cells and attributes that differ are written, so calling it from the table's
    own ModifiedEvent (a check box was ticked) ends there instead of looping.
    """
    table = node.GetTable()
    affected, override = table.GetColumnByName("affected"), table.GetColumnByName("override")
    if affected is None or override is None or table.GetNumberOfRows() != len(result.regions):
        raise InputError(f"the table '{node.GetName()}' is not the table of this ASPECTS read-out.",
                         "Read out ASPECTS again.")
    changed = False
    for i, r in enumerate(result.regions):
        text = "" if r.override is None else ("affected" if r.override else "not affected")
        if bool(affected.GetValue(i)) != r.affected:
            affected.SetValue(i, int(r.affected))
            changed = True
        if override.GetValue(i) != text:
            override.SetValue(i, text)
            changed = True
    attributes = {"BrainLobeSeg.aspectsLeft": str(result.score("left")),
                  "BrainLobeSeg.aspectsRight": str(result.score("right")),
                  "BrainLobeSeg.aspectsSide": result.side,
                  "BrainLobeSeg.aspectsSideSource": result.side_source,
                  "BrainLobeSeg.aspectsSideReason": result.side_reason,
                  "BrainLobeSeg.affected": ", ".join(r.region for r in result.regions if r.affected)}
    was_modifying = node.StartModify()
    try:
        for key, value in attributes.items():
            if node.GetAttribute(key) != value:
                node.SetAttribute(key, value)
                changed = True
        if changed:
            affected.Modified()
            override.Modified()
            table.Modified()
    finally:
        node.EndModify(was_modifying)
    return changed


def table_calls(node) -> List[bool]:
    """The "affected" check boxes of an ASPECTS table, row by row (the clinician's view)."""
    column = node.GetTable().GetColumnByName("affected")
    return [bool(column.GetValue(i)) for i in range(column.GetNumberOfTuples())] if column is not None else []
