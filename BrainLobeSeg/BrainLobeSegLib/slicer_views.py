"""What the panel shows in Slicer's views: the result over its CT, the Segment Editor,
the statistics table (Slicer application only).

One job: switching the application's views and modules, which needs ``slicer.app`` and
so cannot run on the ``slicer-core`` wheel; the panel's Widget calls these after the
headless :mod:`panel` session has produced the nodes.
"""

import slicer


def show_result(result) -> None:
    """The CT in the slice views with the segmentation over it (``panel.LastResult``)."""
    slicer.util.setSliceViewerLayers(background=result.volume, fit=False)
    result.segmentation.CreateDefaultDisplayNodes()   # no-op when it has them
    result.segmentation.GetDisplayNode().SetVisibility(True)


def open_in_segment_editor(result) -> None:
    """Switch to the Segment Editor with the segmentation and, if still there, its CT."""
    slicer.util.selectModule("SegmentEditor")
    editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
    editor.setSegmentationNode(result.segmentation)
    if result.can_measure():
        editor.setSourceVolumeNode(result.volume)


def show_table(table_node) -> None:
    """A layout with a table view, showing ``table_node``."""
    slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
    slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table_node.GetID())
    slicer.app.applicationLogic().PropagateTableSelection()
