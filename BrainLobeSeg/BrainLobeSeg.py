"""BrainLobeSeg: segment the 20 ASPECTS regions on a non-contrast head CT in 3D Slicer.

This file is the thin Slicer layer: module description, the panel (Widget) and the
self-test. All MRML work is in ``BrainLobeSegLib.slicer_logic`` (runs headless too) and
the segmentation itself in the engine (``BrainLobeSegLib.inference``). The engine is
imported only when needed, so Slicer starts quickly and the module loads even before
PyTorch is installed.
"""

import enum
import logging
import os
import sys
from typing import Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# BrainLobeSegLib sits next to this file (in the source tree and once installed).
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

from BrainLobeSegLib.modes import DEFAULT_MODE  # noqa: E402  (torch-free)

#: How often the panel looks at a running segmentation (ms).
POLL_INTERVAL_MS = 100


#
# BrainLobeSeg
#

class BrainLobeSeg(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("BrainLobeSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainLobeSeg developers"]
        self.parent.helpText = _(
            "Segments the 20 ASPECTS regions (caudate, lentiform nucleus, internal capsule, "
            "insular ribbon and M1-M6, each side) on a non-contrast head CT, in Slicer, with "
            "the bundled models. Choose the CT and how the head is turned upright (an automatic "
            "estimate, which is added as a transform node to check; its parent transform; a "
            "transform node; or an ITK-SNAP transform file), press Segment, then correct the "
            "result in the Segment Editor.<br><br>"
            "Not a medical device: for research and decision support; every region must be "
            "checked by a clinician."
        )
        self.parent.acknowledgementText = _(
            "BrainLobeSeg is open source. Models are trained on public atlases and synthetic "
            "scans; see each model's model.json for its data and held-out metrics. The automatic "
            "alignment uses the CT template of Rorden et al. (2012), Clinical toolbox, BSD-2-Clause "
            "(Resources/Atlas)."
        )
        # The Terminologies module's logic exists once every module is loaded.
        slicer.app.connect("startupCompleted()", self.loadTerminology)

    def loadTerminology(self) -> None:
        """Register the segments' terminology context (Resources/Terminology) with Slicer,
        so that their codes resolve in the Segment Editor and in DICOM export."""
        from BrainLobeSegLib import terminology
        try:
            terminology.load(slicer.modules.terminologies.logic())
        except Exception as exc:  # the module works without it; the codes just do not resolve
            logging.warning("BrainLobeSeg: terminology not loaded: %s", exc)


#
# Choices shown in the panel (the parameter node stores their names)
#

class TransformSource(enum.Enum):
    """Where the upright transform R comes from (see BrainLobeSegLib.slicer_logic)."""

    PARENT = "parent"
    ESTIMATE = "estimate"
    NODE = "node"
    NONE = "none"

    def label(self) -> str:
        return {
            "parent": _("The CT's own transform (as displayed)"),
            "estimate": _("Automatic estimate (added as a transform node to check)"),
            "node": _("Transform node below"),
            "none": _("None: the CT is already upright"),
        }[self.value]


class SegmentationMode(enum.Enum):
    """Which models run; the values are the engine's mode names."""

    THREE_D = "3d"
    PLANAR = "planar"
    ENSEMBLE = "ensemble"

    def label(self) -> str:
        return {
            "3d": _("3D (fastest and most accurate; recommended)"),
            "planar": _("Multi-planar (axial, coronal, sagittal)"),
            "ensemble": _("Ensemble (3D + multi-planar, slowest; adds an uncertainty map)"),
        }[self.value]


class ComputeDevice(enum.Enum):
    """Where the models run; the values are the engine's device names."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        return {
            "auto": _("Automatic (GPU if available)"),
            "cpu": _("CPU"),
            "cuda": _("GPU (CUDA)"),
        }[self.value]


@parameterNodeWrapper
class BrainLobeSegParameterNode:
    """The panel's state, saved with the scene.

    Widgets named in the .ui file carry a ``SlicerParameterName`` property and are bound
    by ``connectGui``; the model folder is synchronised by hand (ctkPathLineEdit binds to
    ``pathlib.Path`` only, whose empty default would mean the current directory).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    transformSource: TransformSource = TransformSource.PARENT
    transformNode: vtkMRMLTransformNode
    invertTransform: bool = False
    mode: SegmentationMode = SegmentationMode(DEFAULT_MODE)
    device: ComputeDevice = ComputeDevice.AUTO
    modelFolder: str = ""
    outputSegmentation: vtkMRMLSegmentationNode


#
# BrainLobeSegWidget
#

class BrainLobeSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. Qt lives here only; the work is done by ``self.logic.core``.

    A segmentation runs in a Python thread (``BackgroundRun``); a ``qt.QTimer`` polls it
    to update the progress bar and, when it ends, the segmentation node is built here on
    the main thread, because MRML must not be touched from another thread.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None                 # BackgroundRun while segmenting
        self._runOutputNode = None       # existing node to refill, confirmed at start
        self._discardRun = False         # scene closed while running: drop the result
        self._lastSegmentation = None
        self._lastVolume = None
        self._lastJob = None             # SegmentationJob of the last result, without its scan copy
        self._lastUncertainty = None     # its uncertainty volume node (None in 3D mode)
        self._statisticsTable = None     # the one table node of the last result
        self._timer = None
        self._sourceChosenFor = None     # the CT the transform choice was defaulted for

    # -- set-up and life cycle

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainLobeSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = BrainLobeSegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.loadTransformButton.connect("clicked(bool)", self.onLoadTransformButton)
        self.ui.estimateTransformButton.connect("clicked(bool)", self.onEstimateTransformButton)
        self.ui.openEditorButton.connect("clicked(bool)", self.onOpenEditorButton)
        self.ui.statisticsButton.connect("clicked(bool)", self.onStatisticsButton)
        self.ui.saveCaseButton.connect("clicked(bool)", self.onSaveCaseButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._pollRun)

        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = ""
        self.ui.openEditorButton.enabled = False
        self.ui.statisticsButton.enabled = False
        self.ui.saveCaseButton.enabled = False
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module widget destroyed (Slicer closing): stop a running segmentation."""
        self._stopRun(wait_s=5.0)
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # The GUI is refreshed from the parameter node on enter; a running segmentation
        # keeps running and is finished by the timer even while another module is shown.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        # The nodes of a running segmentation are about to disappear.
        self._stopRun(wait_s=5.0)
        self._forgetResult()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[BrainLobeSegParameterNode]) -> None:
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # The .ui file gives each bound widget a "SlicerParameterName" property.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._updateGUI()

    # -- GUI state

    def _updateGUI(self, caller=None, event=None) -> None:
        """Enable what can be used now and describe the chosen transform."""
        p = self._parameterNode
        running = self._run is not None
        for widget in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton,
                       self.ui.outputCollapsibleButton):
            widget.enabled = not running
        if p is None:
            self.ui.segmentButton.enabled = False
            self.ui.estimateTransformButton.enabled = False
            return
        self._defaultTransformSource(p)
        if self.ui.modelPathLineEdit.currentPath != p.modelFolder:
            wasBlocked = self.ui.modelPathLineEdit.blockSignals(True)
            self.ui.modelPathLineEdit.currentPath = p.modelFolder
            self.ui.modelPathLineEdit.blockSignals(wasBlocked)
        self.ui.transformNodeSelector.enabled = p.transformSource == TransformSource.NODE
        self.ui.transformInfoLabel.text = self._transformDescription()
        self.ui.modelInfoLabel.text = self._modelDescription()
        if running:
            self.ui.segmentButton.text = _("Cancel")
            self.ui.segmentButton.toolTip = _("Stop the segmentation; nothing is added to the scene.")
            self.ui.segmentButton.enabled = not self._run.cancel_requested
        else:
            self.ui.segmentButton.text = _("Segment")
            self.ui.segmentButton.enabled = p.inputVolume is not None
            self.ui.segmentButton.toolTip = (
                _("Segment the 20 ASPECTS regions of the selected CT.") if p.inputVolume
                else _("Select the head CT first."))
        self.ui.estimateTransformButton.enabled = not running and p.inputVolume is not None
        haveResult = not running and self._inScene(self._lastSegmentation)
        self.ui.openEditorButton.enabled = haveResult
        self.ui.statisticsButton.enabled = haveResult and self._inScene(self._lastVolume)
        self.ui.saveCaseButton.enabled = (haveResult and self._lastJob is not None
                                          and self._inScene(self._lastJob.volume_node))

    def _defaultTransformSource(self, p) -> None:
        """When another CT is selected, offer the automatic estimate for a CT without a
        transform, and the CT's own transform otherwise. Only the panel's choice changes;
        the estimate itself is made when the user presses Segment (or Estimate)."""
        volume = p.inputVolume
        if volume is self._sourceChosenFor:
            return
        self._sourceChosenFor = volume
        if volume is None or p.transformSource not in (TransformSource.PARENT, TransformSource.ESTIMATE):
            return
        wanted = TransformSource.PARENT if volume.GetParentTransformNode() else TransformSource.ESTIMATE
        if p.transformSource != wanted:
            p.transformSource = wanted   # modifies the parameter node: _updateGUI runs again

    @staticmethod
    def _inScene(node) -> bool:
        """True for a node that still exists in the scene (the user may delete any node)."""
        return node is not None and node.GetScene() is not None

    def _busy(self, title: str, work):
        """Run ``work()`` with a wait cursor and return ``(True, value)``, or ``(False, None)``
        after showing the error once the cursor is back (a modal box under a wait cursor
        looks like a hang). Used for main-thread steps of a few seconds at most."""
        import traceback
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            return True, work()
        except Exception as exc:  # shown to the user below, never lost
            error = exc
            details = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        finally:
            slicer.app.restoreOverrideCursor()
        self._reportError(title, error, details)
        return False, None

    def _reportError(self, title: str, error: BaseException, details: str = "") -> None:
        """Input problems as their message; anything else with details, and logged."""
        from BrainLobeSegLib.errors import InputError
        if isinstance(error, InputError):
            slicer.util.errorDisplay(str(error), windowTitle=title)
            return
        logging.error("BrainLobeSeg: %s failed:\n%s", title, details)
        slicer.util.errorDisplay(_("Unexpected error: {error}").format(error=error),
                                 windowTitle=title, detailedText=details)

    def _transformDescription(self) -> str:
        p = self._parameterNode
        if p.transformSource == TransformSource.NONE:
            return _("The CT is segmented as it is: it must already be upright.")
        if p.transformSource == TransformSource.ESTIMATE:
            return _("The head pose is estimated when you press Segment and added as a new "
                     "transform node, which you can check and correct (or press 'Estimate "
                     "upright transform' first). The CT itself is not moved.")
        if p.transformSource == TransformSource.PARENT:
            node = p.inputVolume.GetParentTransformNode() if p.inputVolume else None
            if node is None:
                return _("The CT has no transform applied, so it is taken as upright. To use an "
                         "ITK-SNAP transform, load it and choose 'Transform node below'.")
            return _("The CT is segmented as displayed, turned upright by '{name}'.").format(
                name=node.GetName())
        if p.transformNode is None:
            return _("Select a transform node or load an ITK-SNAP transform.")
        if not p.transformNode.IsTransformToWorldLinear():
            return _("'{name}' is not a linear transform and cannot be used.").format(
                name=p.transformNode.GetName())
        angle = p.transformNode.GetAttribute("BrainLobeSeg.angleDeg")
        if p.transformNode.GetAttribute("BrainLobeSeg.estimated") and angle:
            return _("'{name}' is an automatic estimate: it turns the head by {angle} degrees "
                     "(pitch {pitch}). Check it: apply it to the CT in the Data module.").format(
                name=p.transformNode.GetName(), angle=angle,
                pitch=p.transformNode.GetAttribute("BrainLobeSeg.pitchDeg") or "?")
        return _("'{name}' maps the upright head onto the CT{inverted}.").format(
            name=p.transformNode.GetName(),
            inverted=_(" (inverted)") if p.invertTransform else "")

    def _modelDescription(self) -> str:
        from BrainLobeSegLib import slicer_logic
        folder = self._parameterNode.modelFolder or None
        lines = slicer_logic.describe_models(folder)
        where = folder or _("bundled models")
        if not lines:
            return _("No models found in {where}.").format(where=where)
        return _("Models in {where}: {models}").format(where=where, models="; ".join(lines))

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.modelFolder = path or ""

    # -- transform file

    def onLoadTransformButton(self) -> None:
        """Read an ITK-SNAP transform file into a transform node and select it."""
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load ITK-SNAP transform"), "",
            _("ITK transform files (*.txt *.tfm *.mat);;All files (*)"))
        if not path:
            return
        from BrainLobeSegLib.errors import InputError
        from BrainLobeSegLib.slicer_tools import load_itksnap_transform
        try:
            node = load_itksnap_transform(slicer.mrmlScene, path)
        except InputError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle=_("Load ITK-SNAP transform"))
            return
        self._parameterNode.transformNode = node
        self._parameterNode.transformSource = TransformSource.NODE
        self.ui.statusLabel.text = _(
            "Loaded transform '{name}'. It is used for segmenting; to see the head upright, "
            "apply it to the CT in the Data module.").format(name=node.GetName())

    def onEstimateTransformButton(self) -> None:
        """Estimate the upright transform from the CT, select it, and ask for a check."""
        p = self._parameterNode
        if p is None or p.inputVolume is None:
            slicer.util.errorDisplay(_("Select the head CT first."),
                                     windowTitle=_("Estimate upright transform"))
            return
        ok, node = self._busy(_("Estimate upright transform"),
                              lambda: self.logic.core.estimate_upright_transform(p.inputVolume))
        if not ok:
            return
        p.transformNode = node
        p.transformSource = TransformSource.NODE
        self.ui.statusLabel.text = _(
            "Created '{name}', an automatic estimate that turns the head by {angle} degrees. "
            "Check it before segmenting: apply it to the CT in the Data module and make sure "
            "the head looks upright and symmetric.").format(
                name=node.GetName(), angle=node.GetAttribute("BrainLobeSeg.angleDeg") or "?")

    # -- segmentation

    def onSegmentButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            self._updateGUI()
            return
        self._startRun()

    def _startRun(self) -> None:
        from BrainLobeSegLib.errors import InputError
        from BrainLobeSegLib.slicer_logic import BackgroundRun

        p = self._parameterNode
        if p is None or p.inputVolume is None:
            slicer.util.errorDisplay(_("Select the head CT first."))
            return
        if not self._ensureTorch():
            return
        output = p.outputSegmentation
        if output is not None and not slicer.util.confirmOkCancelDisplay(
                _("Replace the content of the segmentation '{name}' with the new result? Its "
                  "current segments, including any corrections, will be lost.").format(
                      name=output.GetName()),
                windowTitle=_("Replace segmentation")):
            return
        ok, job = self._busy(_("Cannot segment"), lambda: self.logic.core.prepare(
            p.inputVolume, p.transformSource.value, p.transformNode, p.invertTransform,
            p.mode.value, p.device.value, p.modelFolder or None))
        if not ok:
            return
        if job.estimated_node is not None:
            # later runs reuse (and the user can inspect) the node this run made
            p.transformNode = job.estimated_node
            p.transformSource = TransformSource.NODE
        if job.warnings and not slicer.util.confirmOkCancelDisplay(
                _("The transform looks unusual:\n\n{warnings}\n\nSegment anyway?").format(
                    warnings="\n".join(job.warnings)), windowTitle=_("Check the transform")):
            return
        self._runOutputNode = output
        self._discardRun = False
        self._run = BackgroundRun(self.logic.core, job).start()
        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = _("Segmenting with {description}...").format(
            description=job.transform_description)
        self._timer.start()
        self._updateGUI()

    def _pollRun(self) -> None:
        """Timer slot: show progress; when the thread has ended, finish on this thread."""
        run = self._run
        if run is None:
            self._timer.stop()
            return
        fraction, message = run.status()
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        if not run.cancel_requested:
            self.ui.statusLabel.text = message
        if run.done():
            self._timer.stop()
            self._finishRun()

    def _finishRun(self) -> None:
        from BrainLobeSegLib.errors import Cancelled, InputError

        run, output = self._run, self._runOutputNode
        self._run, self._runOutputNode = None, None
        try:
            if self._discardRun:
                return
            if isinstance(run.error, Cancelled):
                self.ui.progressBar.setValue(0)
                self.ui.statusLabel.text = _("Cancelled. Nothing was added to the scene.")
                return
            if isinstance(run.error, InputError):
                self.ui.statusLabel.text = _("Segmentation failed.")
                slicer.util.errorDisplay(str(run.error), windowTitle=_("Segmentation failed"))
                return
            if run.error is not None:
                logging.error("BrainLobeSeg segmentation failed:\n%s", run.error_details)
                self.ui.statusLabel.text = _("Segmentation failed.")
                slicer.util.errorDisplay(
                    _("Segmentation failed unexpectedly: {error}").format(error=run.error),
                    windowTitle=_("Segmentation failed"), detailedText=run.error_details)
                return
            try:
                node = self.logic.core.create_output(run.job, run.result, output_node=output)
            except InputError as exc:
                self.ui.statusLabel.text = _("Segmentation failed.")
                slicer.util.errorDisplay(str(exc), windowTitle=_("Segmentation failed"))
                return
            self._showResult(node, run.job)
            self.ui.progressBar.setValue(100)
            ok, uncertainty = self._busy(_("Uncertainty volume"),
                                         lambda: self.logic.core.create_uncertainty(run.job, run.result))
            self._lastUncertainty = uncertainty if ok else None
            if self._lastUncertainty is not None:
                self.ui.statusLabel.text = _(
                    "Done in {seconds:.1f} s: '{name}' has the 20 regions; '{uncertainty}' shows "
                    "where the models disagree. Check every region and correct it in the Segment "
                    "Editor.").format(seconds=run.seconds, name=node.GetName(),
                                      uncertainty=self._lastUncertainty.GetName())
            else:
                self.ui.statusLabel.text = _(
                    "Done in {seconds:.1f} s: '{name}' has the 20 regions. Check every region and "
                    "correct it in the Segment Editor.").format(seconds=run.seconds, name=node.GetName())
        finally:
            self._updateGUI()

    def _stopRun(self, wait_s: float) -> None:
        """Cancel a running segmentation and wait for its thread (scene close, exit)."""
        if self._run is None:
            return
        self._discardRun = True
        self._run.cancel()
        if not self._run.wait(wait_s):
            logging.warning("BrainLobeSeg: the segmentation thread did not stop in %.0f s", wait_s)
        if self._timer is not None:
            self._timer.stop()
        self._run, self._runOutputNode = None, None
        if hasattr(self, "ui"):
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Cancelled. Nothing was added to the scene.")
            self._updateGUI()

    def _showResult(self, segmentationNode, job) -> None:
        """Show the CT with the regions over it in the slice views; remember the result.

        The job is kept without its voxel copy (as large as the CT): saving the case later
        needs only its ``R`` and the CT's grid. A new result gets its own statistics table.
        """
        self._forgetResult()
        volumeNode = job.volume_node
        self._lastSegmentation, self._lastVolume = segmentationNode, volumeNode
        self._lastJob = job.without_scan()
        slicer.util.setSliceViewerLayers(background=volumeNode, fit=False)
        display = segmentationNode.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)

    def _forgetResult(self) -> None:
        """Drop the references to the last result (new result, or scene closing)."""
        self._lastSegmentation = self._lastVolume = self._lastJob = None
        self._lastUncertainty = self._statisticsTable = None

    def onOpenEditorButton(self) -> None:
        """Switch to the Segment Editor with the result and its CT selected."""
        segmentationNode, volumeNode = self._lastSegmentation, self._lastVolume
        if segmentationNode is None or segmentationNode.GetScene() is None:
            self._updateGUI()
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentationNode)
        if volumeNode is not None and volumeNode.GetScene() is not None:
            editor.setSourceVolumeNode(volumeNode)

    def onStatisticsButton(self) -> None:
        """Measure the last result as it is now and show the table in a table view."""
        segmentationNode, volumeNode = self._lastSegmentation, self._lastVolume
        if not self._inScene(segmentationNode) or not self._inScene(volumeNode):
            self._updateGUI()
            return
        uncertaintyNode = self._lastUncertainty if self._inScene(self._lastUncertainty) else None
        tableNode = self._statisticsTable if self._inScene(self._statisticsTable) else None
        ok, tableNode = self._busy(_("Region statistics"), lambda: self.logic.core.statistics_table(
            segmentationNode, volumeNode, uncertaintyNode, tableNode))
        if not ok:
            return
        self._statisticsTable = tableNode
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        applicationLogic = slicer.app.applicationLogic()
        applicationLogic.GetSelectionNode().SetActiveTableID(tableNode.GetID())
        applicationLogic.PropagateTableSelection()
        flagged = tableNode.GetAttribute("BrainLobeSeg.flagged") or ""
        if flagged:
            self.ui.statusLabel.text = _(
                "Statistics of '{name}' are in the table '{table}'. Lower density than the same "
                "region on the other side: {regions}. Decision support, not a diagnosis: this can "
                "be early ischaemia but also artefact, an old lesion, CSF or a segmentation error; "
                "read the images.").format(name=segmentationNode.GetName(),
                                           table=tableNode.GetName(), regions=flagged)
        else:
            self.ui.statusLabel.text = _(
                "Statistics of '{name}' are in the table '{table}'. No region is flagged as "
                "darker than the other side. Decision support, not a diagnosis: this does not "
                "exclude a stroke; read the images.").format(name=segmentationNode.GetName(),
                                                             table=tableNode.GetName())

    def onSaveCaseButton(self) -> None:
        """Save the (corrected) last result with its CT and ``R`` as a training case."""
        segmentationNode, job = self._lastSegmentation, self._lastJob
        if not self._inScene(segmentationNode) or job is None:
            self._updateGUI()
            return
        folder = qt.QFileDialog.getExistingDirectory(
            slicer.util.mainWindow(), _("Training dataset folder"))
        if not folder:
            return
        ok, name = self._busy(_("Save case for training"), lambda: self.logic.core.save_case(
            segmentationNode, job, folder))
        if not ok:
            return
        self.ui.statusLabel.text = _(
            "Saved '{segmentation}' with its CT and upright transform as case '{name}' in "
            "{folder}.").format(segmentation=segmentationNode.GetName(), name=name, folder=folder)

    # -- PyTorch

    def _ensureTorch(self) -> bool:
        """True if torch imports; otherwise offer to install it (after confirmation)."""
        from BrainLobeSegLib import torch_install

        if torch_install.torch_available():
            return True
        gpu = torch_install.nvidia_gpu_present()
        try:
            import PyTorchUtils
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            how = _("with the PyTorch extension")
        except ImportError:
            torchLogic = None
            how = _("with pip")
        build = _("a CUDA build for the NVIDIA GPU") if gpu else _("the CPU build (no NVIDIA GPU found)")
        if not slicer.util.confirmOkCancelDisplay(
                _("BrainLobeSeg needs PyTorch, which is not installed yet.\n\nInstall {build} "
                  "now {how}? This downloads several hundred megabytes and may take a few "
                  "minutes.").format(build=build, how=how),
                windowTitle=_("Install PyTorch")):
            self.ui.statusLabel.text = _("PyTorch is needed to segment; it was not installed.")
            return False
        self.ui.statusLabel.text = _("Installing PyTorch...")
        slicer.app.processEvents()
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            torch_install.install_torch(slicer.util.pip_install, torchLogic, gpu)
        except Exception as exc:
            slicer.app.restoreOverrideCursor()
            logging.error("BrainLobeSeg: PyTorch installation failed: %s", exc)
            slicer.util.errorDisplay(_("PyTorch could not be installed: {error}").format(error=exc),
                                     windowTitle=_("Install PyTorch"))
            self.ui.statusLabel.text = _("PyTorch is not installed.")
            return False
        slicer.app.restoreOverrideCursor()
        self.ui.statusLabel.text = _("PyTorch installed.")
        return torch_install.torch_available()

    def onReload(self) -> None:
        """Developer reload: also reload BrainLobeSegLib so edits there take effect."""
        import importlib
        for name in sorted((n for n in list(sys.modules) if n.startswith("BrainLobeSegLib.")),
                           reverse=True):
            try:
                importlib.reload(sys.modules[name])
            except Exception as exc:  # a module that needs torch, when torch is missing
                logging.warning("BrainLobeSeg reload: %s not reloaded (%s)", name, exc)
        ScriptedLoadableModuleWidget.onReload(self)


#
# BrainLobeSegLogic
#

class BrainLobeSegLogic(ScriptedLoadableModuleLogic):
    """The parameter node, plus the headless logic in ``self.core``.

    ``self.core`` is ``BrainLobeSegLib.slicer_logic.BrainLobeSegLogic``; scripts can use
    ``BrainLobeSegLogic().segment(volumeNode, ...)`` exactly as the panel does.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from BrainLobeSegLib.slicer_logic import BrainLobeSegLogic as CoreLogic
        self.core = CoreLogic()

    def getParameterNode(self) -> BrainLobeSegParameterNode:
        return BrainLobeSegParameterNode(super().getParameterNode())

    def segment(self, volumeNode, **kwargs):
        """Blocking segmentation; see ``slicer_logic.BrainLobeSegLogic.segment``."""
        return self.core.segment(volumeNode, **kwargs)


#
# BrainLobeSegTest
#

class BrainLobeSegTest(ScriptedLoadableModuleTest):
    """Self-test inside Slicer (ctest): the pytest scenario on the real application scene.

    A small phantom CT, a tilted head pose written as an ITK-SNAP file and loaded as a
    transform node applied to the CT, and a tiny randomly initialised 3D model exported
    into a temporary folder. Checks the 20 segments (names, colours, terminology), that
    their binary labelmaps equal the engine's labels voxel for voxel, that the CT and its
    transform are unchanged, and that cancelled runs add no node. A tiny planar model adds
    the uncertainty volume (on the CT grid; none for a single 3D model) and the region
    statistics table of the Results section.
    """

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        if not self._torchReady():
            self.skipTest("PyTorch is not installed")
        import tempfile
        self._tmp = tempfile.TemporaryDirectory(prefix="BrainLobeSegTest-")
        try:
            self._modelDir = self._tinyModel(os.path.join(self._tmp.name, "tiny-3d"))
            self._planarModelDir = self._tinyModel(os.path.join(self._tmp.name, "tiny-planar"),
                                                   kind="planar")
            self.setUp()
            self.test_segment_phantom_with_itksnap_transform()
            self.setUp()
            self.test_cancel_adds_no_node()
            self.setUp()
            self.test_nonlinear_transform_refused()
            self.setUp()
            self.test_uncertainty_and_statistics()
            self.setUp()
            self.test_automatic_estimate_adds_a_node()
        finally:
            self._tmp.cleanup()

    # -- fixtures

    @staticmethod
    def _torchReady() -> bool:
        from BrainLobeSegLib import torch_install
        if torch_install.torch_available():
            return True
        try:  # CI machines: install without asking, as other extensions' tests do
            import PyTorchUtils
            PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False)
        except Exception as exc:
            logging.warning("BrainLobeSegTest: PyTorch unavailable (%s)", exc)
        return torch_install.torch_available()

    @staticmethod
    def _tinyModel(folder: str, kind: str = "3d") -> str:
        """A real model folder holding a very small random 3D U-Net, or three 2D U-Nets
        (one per plane) for ``kind="planar"``."""
        import torch
        from BrainLobeSegLib import models, regions
        from BrainLobeSegLib.networks import build_network
        torch.manual_seed(0)
        architecture = "UNet2D" if kind == "planar" else "UNet3D"
        card = models.ModelCard(
            name=f"selftest-{kind}", version="0.0.test", kind=kind,
            architecture={"name": architecture, "args": {}}, spacing_mm=[4.0, 4.0, 4.0],
            intensity={"window": [-20.0, 100.0]}, networks={}, context_slices=1,
            coordinate_channel=True, description="random weights, for the self-test")
        card.architecture["args"] = {"in_channels": card.in_channels,
                                     "num_classes": regions.NUM_LABELS + 1,
                                     "base_features": 4, "depth": 3, "norm": "batch"}
        names = list(models.PLANES) if kind == "planar" else ["unet3d"]
        models.save_model(folder, card, {
            n: build_network(architecture, card.architecture["args"]).eval() for n in names})
        return folder

    @staticmethod
    def _phantomVolume(name: str = "Phantom CT"):
        """A 48x48x32 head-like CT at 4 mm (air, skull shell, brain), oblique-free."""
        import numpy as np
        import SimpleITK as sitk
        from BrainLobeSegLib import slicer_tools
        z, y, x = np.mgrid[0:32, 0:48, 0:48].astype(np.float32)
        r = np.sqrt(((x - 23.5) / 20) ** 2 + ((y - 23.5) / 22) ** 2 + ((z - 15.5) / 14) ** 2)
        hu = np.full(r.shape, -1024, np.int16)
        hu[r < 1.0] = 1000
        hu[r < 0.88] = 32
        hu[(r < 0.5) & (x < 23.5)] = 28
        image = sitk.GetImageFromArray(hu)
        image.SetSpacing((4.0, 4.0, 4.0))
        image.SetOrigin((-94.0, -94.0, -62.0))
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer_tools.update_volume_from_image(node, image)
        node.CreateDefaultDisplayNodes()
        return node

    # -- tests

    def test_segment_phantom_with_itksnap_transform(self) -> None:
        import numpy as np
        import SimpleITK as sitk
        from BrainLobeSegLib import regions, slicer_tools, transforms

        self.delayDisplay("Segmenting a phantom CT with an ITK-SNAP transform")
        volume = self._phantomVolume()
        R = transforms.rotation((10.0, -6.0, 8.0), center=(0.0, 0.0, 0.0))
        path = os.path.join(self._tmp.name, "pose.txt")
        transforms.write_transform(path, R)
        transformNode = slicer_tools.load_itksnap_transform(slicer.mrmlScene, path)
        volume.SetAndObserveTransformNodeID(transformNode.GetID())

        voxelsBefore = slicer.util.arrayFromVolume(volume).copy()
        ijkBefore = slicer_tools.ijk_to_ras(volume)
        matrixBefore = slicer.util.arrayFromTransformMatrix(transformNode).copy()

        logic = BrainLobeSegLogic()
        job = logic.core.prepare(volume, "parent", mode="3d", device="cpu", model_dir=self._modelDir)
        np.testing.assert_allclose(transforms.matrix_of(job.transform), transforms.matrix_of(R),
                                   atol=1e-6)
        result = logic.core.run(job)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        segmentation = logic.core.create_output(job, result)
        self.assertGreater(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)

        expected = sitk.GetArrayFromImage(result.labels_scan)
        segs = segmentation.GetSegmentation()
        self.assertEqual(segs.GetNumberOfSegments(), regions.NUM_LABELS)
        self.assertEqual(segmentation.GetTransformNodeID(), transformNode.GetID())
        tagName = slicer.vtkSegment.GetTerminologyEntryTagName()
        for r in regions.REGIONS:
            segmentId = slicer_tools.SEGMENT_ID_FORMAT.format(label=r.label)
            segment = segs.GetSegment(segmentId)
            self.assertIsNotNone(segment)
            self.assertEqual(segment.GetName(), r.segment_name)
            np.testing.assert_allclose(segment.GetColor(), r.color_float, atol=1e-6)
            tag = vtk.mutable("")
            self.assertTrue(segment.GetTag(tagName, tag))
            self.assertEqual(str(tag), regions.terminology_entry(r))
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentId, volume)
            np.testing.assert_array_equal(mask > 0, expected == r.label)

        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), voxelsBefore)
        np.testing.assert_allclose(slicer_tools.ijk_to_ras(volume), ijkBefore)
        np.testing.assert_allclose(slicer.util.arrayFromTransformMatrix(transformNode), matrixBefore)
        self.assertEqual(volume.GetTransformNodeID(), transformNode.GetID())
        self.delayDisplay("Segmentation matches the engine voxel for voxel")

    def test_cancel_adds_no_node(self) -> None:
        from BrainLobeSegLib.errors import Cancelled
        from BrainLobeSegLib.slicer_logic import BackgroundRun

        self.delayDisplay("Cancelling leaves the scene unchanged")
        volume = self._phantomVolume()
        logic = BrainLobeSegLogic()
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(Cancelled):
            logic.segment(volume, transform_source="none", device="cpu", model_dir=self._modelDir,
                          cancel=lambda: True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)

        job = logic.core.prepare(volume, "none", device="cpu", model_dir=self._modelDir)
        run = BackgroundRun(logic.core, job)
        run.cancel()
        run.start()
        self.assertTrue(run.wait(60.0))
        self.assertIsInstance(run.error, Cancelled)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)

    def test_automatic_estimate_adds_a_node(self) -> None:
        """The panel's default for a CT without a transform: preparing a run adds one
        transform node holding the estimated pose (within 2 degrees of the known pose of
        the bundled reference head, posed here), and the CT is not moved under it."""
        from BrainLobeSegLib import alignment, phantom, slicer_logic, slicer_tools
        self.delayDisplay("Automatic upright estimate")
        ct, truth = phantom.make_reference_scan((18.0, -5.0, 7.0), seed=4)
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Posed head")
        slicer_tools.update_volume_from_image(volume, ct)
        before = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode")
        # prepare() loads no model, so this test needs none of runTest's fixtures
        job = slicer_logic.BrainLobeSegLogic().prepare(volume, "estimate", mode="3d", device="cpu")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode"),
                         before + 1)
        self.assertLess(alignment.angle_error_deg(job.transform, truth), 2.0)
        self.assertIsNone(volume.GetParentTransformNode())
        self.delayDisplay("Automatic upright estimate passed")

    def test_nonlinear_transform_refused(self) -> None:
        from BrainLobeSegLib.errors import InputError

        self.delayDisplay("A non-linear transform is refused with a message")
        volume = self._phantomVolume()
        grid = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLGridTransformNode", "Warp")
        logic = BrainLobeSegLogic()
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(InputError) as ctx:
            logic.segment(volume, transform_source="node", transform_node=grid, device="cpu",
                          model_dir=self._modelDir)
        self.assertIn("not linear", str(ctx.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)

    def test_uncertainty_and_statistics(self) -> None:
        import numpy as np
        import SimpleITK as sitk
        from BrainLobeSegLib import regions, slicer_tools

        self.delayDisplay("Uncertainty volume and region statistics")
        volume = self._phantomVolume()
        voxelsBefore = slicer.util.arrayFromVolume(volume).copy()
        logic = BrainLobeSegLogic()
        logic.core.segmenter_options["refine_mm"] = None   # 4 mm labels suffice here

        job = logic.core.prepare(volume, "none", mode="3d", device="cpu", model_dir=self._modelDir)
        result = logic.core.run(job)
        logic.core.create_output(job, result)
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        self.assertIsNone(logic.core.create_uncertainty(job, result))   # one model: nothing to compare
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)

        job = logic.core.prepare(volume, "none", mode="planar", device="cpu",
                                 model_dir=self._planarModelDir)
        result = logic.core.run(job)
        segmentation = logic.core.create_output(job, result)
        uncertainty = logic.core.create_uncertainty(job, result)
        self.assertIsNotNone(uncertainty)
        self.assertEqual(uncertainty.GetImageData().GetDimensions(),
                         volume.GetImageData().GetDimensions())
        np.testing.assert_allclose(slicer_tools.ijk_to_ras(uncertainty), slicer_tools.ijk_to_ras(volume),
                                   atol=1e-9)
        values = slicer.util.arrayFromVolume(uncertainty)
        self.assertGreaterEqual(float(values.min()), 0.0)
        self.assertLessEqual(float(values.max()), 1.0)
        self.assertGreater(float(values.max()), 0.0)   # random planes disagree somewhere

        table = logic.core.statistics_table(segmentation, volume, uncertainty)
        self.assertTrue(table.IsA("vtkMRMLTableNode"))
        self.assertEqual(table.GetNumberOfRows(), regions.NUM_LABELS)
        self.assertIn("not a diagnosis", table.GetAttribute("BrainLobeSeg.notice"))
        labels = sitk.GetArrayFromImage(result.labels_scan)
        mlPerVoxel = 4.0 ** 3 / 1000.0
        for i, r in enumerate(regions.REGIONS):
            self.assertEqual(table.GetTable().GetValueByName(i, "region").ToString(), r.segment_name)
            self.assertAlmostEqual(table.GetTable().GetValueByName(i, "volume_ml").ToDouble(),
                                   float((labels == r.label).sum()) * mlPerVoxel, places=6)
        again = logic.core.statistics_table(segmentation, volume, uncertainty, table)
        self.assertIs(again, table)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), voxelsBefore)
        self.delayDisplay("Uncertainty on the CT grid; statistics have the 20 regions")
