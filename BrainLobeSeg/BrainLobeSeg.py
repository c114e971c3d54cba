"""BrainLobeSeg: the 20 ASPECTS regions on a non-contrast head CT, in 3D Slicer.

The thin Slicer layer (module, panel, self-test). Decisions and texts: BrainLobeSegLib.panel;
parameter node and Logic: .parameters; MRML work: .slicer_logic/.slicer_tools (headless).
"""

import os
import sys

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# BrainLobeSegLib sits next to this file (in the source tree and once installed).
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)

from BrainLobeSegLib import panel, slicer_views, terminology  # noqa: E402  (light: no numpy, no torch)
from BrainLobeSegLib import self_test_fixtures as fixtures  # noqa: E402  (light too)
from BrainLobeSegLib.parameters import (AspectsSide, BrainLobeSegLogic,  # noqa: E402,F401
                                        BrainLobeSegParameterNode, ComputeDevice, SegmentationMode,
                                        TransformSource)

#: 0 ms: a tick per event-loop turn, after pending events; each runs engine steps here for
#: panel.STEP_BUDGET_S plus one step (a thread would crawl: Slicer's main thread holds the GIL).
POLL_INTERVAL_MS = 0


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
            "result in the Segment Editor. 'Read out ASPECTS' scores each side from the density "
            "of each region against its mirror region, highlights the affected regions, adds the "
            "evidence map as a volume, and lets you change any call.<br><br>"
            "Not a medical device: for research and decision support; every region must be "
            "checked by a clinician."
        )
        self.parent.acknowledgementText = _(
            "BrainLobeSeg is open source. Models are trained on public atlases and synthetic "
            "scans; see each model's model.json for its data and held-out metrics. The automatic "
            "alignment uses the CT template of Rorden et al. (2012), Clinical toolbox, BSD-2-Clause "
            "(Resources/Atlas)."
        )
        # The segments' codes resolve (Segment Editor, DICOM export) once Slicer's
        # Terminologies logic has our context; that logic exists when startup completes.
        slicer.app.connect("startupCompleted()", terminology.load_into_slicer)


class BrainLobeSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: Qt only. Its decisions and texts come from ``BrainLobeSegLib.panel``
    (``self._session`` holds the run and the last result); a ``qt.QTimer`` advances a
    run step by step on the main thread and builds its nodes when it ends."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = self._parameterNode = self._parameterNodeGuiTag = None
        self._session = self._timer = self._watcher = None
        self._sourceChosenFor = None     # the CT the transform choice was defaulted for

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainLobeSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BrainLobeSegLogic()
        self._session = panel.Session(self.logic.core)
        self._watcher = panel.TransformWatcher(self._updateGUI)   # keeps the description fresh
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        for button, slot in ((self.ui.segmentButton, self.onSegmentButton),
                             (self.ui.loadTransformButton, self.onLoadTransformButton),
                             (self.ui.estimateTransformButton, self.onEstimateTransformButton),
                             (self.ui.openEditorButton, self.onOpenEditorButton),
                             (self.ui.statisticsButton, self.onStatisticsButton),
                             (self.ui.aspectsButton, self.onAspectsButton),
                             (self.ui.saveCaseButton, self.onSaveCaseButton)):
            button.connect("clicked(bool)", slot)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._pollRun)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Slicer closing or Reload: stop a run, disconnect the GUI, observe nothing."""
        self._stopRun()
        self._session.clear()
        self.setParameterNode(None)
        self._watcher.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)   # reconnected on enter; a run is finished by the timer

    def onSceneStartClose(self, caller, event) -> None:
        self._stopRun()    # its nodes are about to disappear
        self._session.clear()
        self.ui.aspectsTableView.setMRMLTableNode(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = panel.default_input_volume(slicer.mrmlScene)

    def setParameterNode(self, parameterNode) -> None:
        """Connect the GUI to ``parameterNode``; None disconnects it from the current one."""
        if self._parameterNode:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            # The .ui file gives each bound widget a "SlicerParameterName" property.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGUI)
        self._updateGUI()

    def _updateGUI(self, caller=None, event=None) -> None:
        """Show the panel's state (``panel.gui_state``): what can be used now, which
        transform and models a run would use."""
        p = self._parameterNode
        self._watcher.watch(*((p.inputVolume, p.transformNode) if p else ()))
        if p is not None and p.inputVolume is not self._sourceChosenFor:   # another CT: its default
            self._sourceChosenFor = p.inputVolume
            p.transformSource = TransformSource(panel.default_transform_source(
                p.inputVolume, p.transformSource.value))   # if changed, _updateGUI runs again
        if p is not None and self.ui.modelPathLineEdit.currentPath != p.modelFolder:
            wasBlocked = self.ui.modelPathLineEdit.blockSignals(True)
            self.ui.modelPathLineEdit.currentPath = p.modelFolder
            self.ui.modelPathLineEdit.blockSignals(wasBlocked)
        if p is not None:   # a read-out follows the symptomatic side the user picks
            self._session.choose_aspects_side(p.aspectsSide.value)
        state = panel.gui_state(self._session, *((p.inputVolume, p.transformSource.value, p.transformNode,
                                                  p.invertTransform, p.modelFolder) if p else ()))
        for name, properties in state.items():
            for key, value in properties.items():
                setattr(getattr(self.ui, name), key, value)

    def onModelPathChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.modelFolder = path or ""

    def _useTransformNode(self, node, status: str) -> None:
        self._parameterNode.transformNode, self._parameterNode.transformSource = node, TransformSource.NODE
        self.ui.statusLabel.text = status

    def onLoadTransformButton(self) -> None:
        """Read an ITK-SNAP transform file into a transform node and select it."""
        from BrainLobeSegLib import slicer_tools
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load ITK-SNAP transform"), "",
            _("ITK transform files (*.txt *.tfm *.mat);;All files (*)"))
        if path:
            with slicer.util.tryWithErrorDisplay(_("The transform could not be loaded."), waitCursor=True):
                node = slicer_tools.load_itksnap_transform(slicer.mrmlScene, path)
            self._useTransformNode(node, panel.loaded_transform_status(node))

    def onEstimateTransformButton(self) -> None:
        """Estimate the upright transform from the CT, select it, and ask for a check."""
        with slicer.util.tryWithErrorDisplay(_("The upright transform could not be estimated."),
                                             waitCursor=True):
            node = self.logic.core.estimate_upright_transform(self._parameterNode.inputVolume)
        self._useTransformNode(node, panel.estimate_status(node))

    def onSegmentButton(self) -> None:
        """Segment, or cancel the running segmentation (the button says Cancel then)."""
        p, s = self._parameterNode, self._session
        if s.running:
            s.run.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
        elif p is not None and p.inputVolume is not None and panel.ensure_torch(
                self._confirm, slicer.util.pip_install,
                lambda: slicer.util.tryWithErrorDisplay(_("PyTorch could not be installed."), waitCursor=True)):
            with slicer.util.tryWithErrorDisplay(_("Cannot segment."), waitCursor=True):
                job = s.start(p.inputVolume, p.transformSource.value, p.transformNode, p.invertTransform,
                              p.mode.value, p.device.value, p.modelFolder, p.outputSegmentation, self._confirm)
            if s.running:
                self.ui.progressBar.setValue(0)
                self.ui.statusLabel.text = _("Segmenting with {description}...").format(
                    description=job.transform_description)
                self._timer.start()
        self._updateGUI()

    def _pollRun(self) -> None:
        """Timer slot: run steps (segmentation or ASPECTS) for one tick; once done, finish."""
        s = self._session
        if not s.running:
            return self._timer.stop()
        fraction, message, done = s.run.poll()
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        if not s.run.cancel_requested:
            self.ui.statusLabel.text = message
        if not done:
            return
        self._timer.stop()
        try:
            outcome = s.finish()
            if outcome.aspects is not None:
                self.ui.aspectsTableView.setMRMLTableNode(outcome.aspects.table)
            if outcome.result is not None:
                slicer_views.show_result(outcome.result)
                estimated, p = outcome.result.job.estimated_node, self._parameterNode
                if estimated is not None and p is not None:   # selected, for the user to check
                    p.transformNode, p.transformSource = estimated, TransformSource.NODE
            self.ui.progressBar.setValue(outcome.progress)
            self.ui.statusLabel.text = outcome.status
            if outcome.error:   # details (a traceback) only for an unexpected error
                details = {"detailedText": outcome.details} if outcome.details else {}
                slicer.util.errorDisplay(outcome.error, windowTitle=outcome.title, **details)
        finally:
            self._updateGUI()

    def _stopRun(self) -> None:
        """Cancel a running segmentation and drop its result (scene or module closing)."""
        self._timer.stop()
        if self._session.stop():
            self.ui.progressBar.setValue(0)
            self.ui.statusLabel.text = _("Cancelled. Nothing was added to the scene.")
            self._updateGUI()

    def onOpenEditorButton(self) -> None:
        if self._session.can_edit():
            slicer_views.open_in_segment_editor(self._session.result)
        self._updateGUI()

    def onStatisticsButton(self) -> None:
        """Measure the last result as it is now and show the table in a table view."""
        with slicer.util.tryWithErrorDisplay(_("Region statistics failed."), waitCursor=True):
            self.ui.statusLabel.text = self._session.measure()
        slicer_views.show_table(self._session.result.table)

    def onAspectsButton(self) -> None:
        """ASPECTS of the last result as it is now, in timer steps; _pollRun shows its table."""
        with slicer.util.tryWithErrorDisplay(_("The ASPECTS read-out failed."), waitCursor=True):
            self._session.start_aspects(self._parameterNode.aspectsSide.value, self._updateGUI)
            self._timer.start()
        self._updateGUI()

    def onSaveCaseButton(self) -> None:
        """Save the (corrected) last result with its CT and ``R`` as a training case."""
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Training dataset folder"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("The case could not be saved."), waitCursor=True):
                self.ui.statusLabel.text = self._session.save(folder)

    def _confirm(self, text: str, title: str) -> bool:
        return slicer.util.confirmOkCancelDisplay(text, windowTitle=title)

    def onReload(self) -> None:
        """Developer reload: the engine's modules first, each after the modules it imports
        (``panel.reload_order``), so that none keeps a function of the old code."""
        panel.reload_package()
        ScriptedLoadableModuleWidget.onReload(self)


class BrainLobeSegTest(ScriptedLoadableModuleTest):
    """Self-test on the application's scene, fixtures from ``self_test_fixtures`` (made on
    first use, kept for the class): ctest's ``unittest.TestLoader`` calls ``setUp`` and each
    ``test_`` method, Reload & Test calls ``runTest``. Without PyTorch each test is skipped."""

    _models = None   # self_test_fixtures.TinyModels, made on first use

    @classmethod
    def tearDownClass(cls) -> None:
        if cls._models is not None:
            cls._models, models = None, cls._models
            models.cleanup()

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        fixtures.run_all(self)   # Reload & Test: every test_ method, as the loader would

    def _folder(self, kind: str = "3d") -> str:
        if not fixtures.torch_ready():
            self.skipTest("PyTorch is not installed")
        cls = type(self)
        cls._models = cls._models or fixtures.TinyModels()
        return cls._models.folder(kind)

    def test_segment_phantom_with_itksnap_transform(self) -> None:
        """Labels equal to the engine's voxel for voxel, the terminology context loaded at
        start-up, the CT and its transform unchanged."""
        import numpy as np
        import SimpleITK as sitk
        from BrainLobeSegLib import regions, slicer_tools, transforms
        volume, R = fixtures.phantom_volume(slicer.mrmlScene), transforms.rotation((10.0, -6.0, 8.0))
        path = os.path.join(self._folder("files"), "pose.txt")
        transforms.write_transform(path, R)
        transformNode = slicer_tools.load_itksnap_transform(slicer.mrmlScene, path)
        volume.SetAndObserveTransformNodeID(transformNode.GetID())
        voxels = slicer.util.arrayFromVolume(volume).copy()
        core = BrainLobeSegLogic().core
        job = core.prepare(volume, "parent", mode="3d", device="cpu", model_dir=self._folder("3d"))
        result = core.run(job)
        segmentation = core.create_output(job, result)
        self.assertEqual(segmentation.GetTransformNodeID(), transformNode.GetID())
        np.testing.assert_array_equal(slicer_tools.labels_from_segmentation(segmentation, volume),
                                      sitk.GetArrayFromImage(result.labels_scan))
        names = vtk.vtkStringArray()
        slicer.modules.terminologies.logic().GetLoadedTerminologyNames(names)   # loaded at start-up
        self.assertIn(regions.TERMINOLOGY_CONTEXT, [names.GetValue(i) for i in range(names.GetNumberOfValues())])
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), voxels)
        np.testing.assert_allclose(transforms.matrix_of(slicer_tools.transform_from_node(transformNode)),
                                   transforms.matrix_of(R), atol=1e-6)

    def test_panel_run_cancelled_and_into_a_deleted_output(self) -> None:
        """The panel's run (engine steps, polled): cancelled, the scene keeps its nodes;
        finished after the chosen output node was deleted, the result is in a new node."""
        session, volume = panel.Session(BrainLobeSegLogic().core), fixtures.phantom_volume(slicer.mrmlScene)
        for cancel in (True, False):
            output = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen")
            session.start(volume, "none", None, False, "3d", "cpu", self._folder("3d"), output, lambda *a: True)
            if cancel:
                session.run.cancel()
            else:
                slicer.mrmlScene.RemoveNode(output)   # the user deletes it meanwhile
            session.run.run_to_end()
            outcome = session.finish()
            self.assertEqual((outcome.error, outcome.result is None), ("", cancel))
        self.assertIn("deleted", outcome.status)
        self.assertIs(outcome.result.segmentation.GetScene(), slicer.mrmlScene)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"), 2)

    def test_uncertainty_and_statistics(self) -> None:
        """A planar model adds the uncertainty volume on the CT grid, shown cold to hot;
        the statistics table has the 20 regions."""
        from BrainLobeSegLib import slicer_tools
        core, volume = BrainLobeSegLogic().core, fixtures.phantom_volume(slicer.mrmlScene)
        core.segmenter_options["refine_mm"] = None   # 4 mm labels suffice here
        job = core.prepare(volume, "none", mode="planar", device="cpu", model_dir=self._folder("planar"))
        result = core.run(job)
        segmentation, uncertainty = core.create_output(job, result), core.create_uncertainty(job, result)
        self.assertEqual(uncertainty.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        self.assertIn(uncertainty.GetDisplayNode().GetColorNodeID(), slicer_tools.UNCERTAINTY_COLOR_IDS)
        table = core.statistics_table(segmentation, volume, uncertainty)
        self.assertEqual(table.GetNumberOfRows(), 20)
        self.assertIn("not a diagnosis", table.GetAttribute("BrainLobeSeg.notice"))

    def test_aspects_readout_and_override(self) -> None:
        """The phantom's own regions (no model needed) with M2 left 8 HU darker: ASPECTS 9
        left, 10 right, M2 left drawn in red; un-calling it scores 10 and takes the red away;
        reading out again refills the same nodes."""
        from BrainLobeSegLib import regions, slicer_tools
        volume, segmentation = fixtures.darker_region_case(slicer.mrmlScene, "M2", "left")
        m2 = regions.region("M2", "left").label
        core = BrainLobeSegLogic().core
        readout = core.aspects_readout(segmentation, volume)
        self.assertEqual((readout.score("left"), readout.score("right"), readout.result.side), (9, 10, "left"))
        self.assertEqual(slicer_tools.highlighted_segments(segmentation), [f"Segment_{m2}"])
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        core.apply_override(readout, "M2 left", False)
        self.assertEqual((readout.score("left"), slicer_tools.highlighted_segments(segmentation)), (10, []))
        self.assertIs(core.aspects_readout(segmentation, volume, previous=readout).table, readout.table)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)

    def test_automatic_estimate_adds_a_node(self) -> None:
        """A run with the automatic estimate adds with its result one transform node, within
        2 degrees of the reference head's known pose; the CT is not moved under it."""
        from BrainLobeSegLib import alignment, phantom, slicer_tools
        ct, truth = phantom.make_reference_scan((18.0, -5.0, 7.0), seed=4)
        volume = fixtures.volume_node(slicer.mrmlScene, ct, "Posed head")
        session = panel.Session(BrainLobeSegLogic().core)
        session.start(volume, "estimate", None, False, "3d", "cpu", self._folder("3d"), None, lambda *a: True)
        session.run.run_to_end()
        node = session.finish().result.job.estimated_node
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode"), 1)
        self.assertLess(alignment.angle_error_deg(slicer_tools.transform_from_node(node), truth), 2.0)
        self.assertIsNone(volume.GetParentTransformNode())
