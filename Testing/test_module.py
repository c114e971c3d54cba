"""``BrainLobeSeg.py`` itself, run on real MRML: the self-test as ctest runs it, and the
Widget's wiring.

Slicer's application is not available here, so only what needs Qt or the application is
stood in for, by small fakes installed in ``sys.modules`` for the test's duration:
``qt``, ``slicer.i18n`` (translation needs the application), ``slicer.ScriptedLoadableModule``
(Qt widgets), ``slicer.parameterNodeWrapper`` (its GUI connectors are Qt), ``slicer.app``
and the Widget's ``ui`` widgets (mocks). The scene, volumes, transforms, segmentations,
colour tables and the terminology logic are the real classes of the ``slicer-core``
wheel, and the engine runs for real with tiny models.

- ctest registers the module with ``slicer_add_python_unittest``, which loads the
  ``test_`` methods with ``unittest.TestLoader`` (``setUp`` and each method, never
  ``runTest``): the self-test must pass that way, and skip, not fail, without PyTorch.
- Reload & Test calls ``runTest``: without PyTorch it logs and returns.
- ``cleanup()`` disconnects the GUI from the parameter node; the transform line is
  refreshed when a transform is applied to the CT.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import sys
import types
import unittest
from pathlib import Path
from unittest import mock

import pytest
import slicer
import vtk

from BrainLobeSegLib import regions, torch_install, transforms

MODULE_PY = Path(__file__).resolve().parent.parent / "BrainLobeSeg" / "BrainLobeSeg.py"


class FakeScriptedLoadableModuleTest(unittest.TestCase):
    """Slicer's ScriptedLoadableModuleTest without the Qt message boxes."""

    def delayDisplay(self, message, *args, **kwargs) -> None:
        logging.info(message)


class FakeScriptedLoadableModuleWidget:
    def __init__(self, parent=None) -> None:
        self.parent = parent

    def onReload(self) -> None:
        pass


class FakeScriptedLoadableModuleLogic:
    def __init__(self, parent=None) -> None:
        self.moduleName = type(self).__name__[:-len("Logic")]


class FakeScriptedLoadableModule:
    def __init__(self, parent) -> None:
        self.parent = parent


class FakeApp:
    """What the module asks of ``slicer.app``: connecting to startupCompleted()."""

    def __init__(self) -> None:
        self.connections = []

    def connect(self, signal: str, slot) -> None:
        self.connections.append((signal, slot))

    def testingEnabled(self) -> bool:
        return True


@pytest.fixture
def module(monkeypatch):
    """BrainLobeSeg.py imported against a real scene, with the Qt side faked."""
    scene = slicer.vtkMRMLScene()
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(scene)
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    fakes = {
        "qt": types.ModuleType("qt"),
        "slicer.i18n": types.SimpleNamespace(tr=lambda text: text, translate=lambda context, text: text),
        "slicer.parameterNodeWrapper": types.SimpleNamespace(parameterNodeWrapper=lambda cls: cls),
        "slicer.ScriptedLoadableModule": types.SimpleNamespace(
            ScriptedLoadableModule=FakeScriptedLoadableModule,
            ScriptedLoadableModuleWidget=FakeScriptedLoadableModuleWidget,
            ScriptedLoadableModuleLogic=FakeScriptedLoadableModuleLogic,
            ScriptedLoadableModuleTest=FakeScriptedLoadableModuleTest),
    }
    for name, fake in fakes.items():
        monkeypatch.setitem(sys.modules, name, fake)
    for name in ("BrainLobeSegLib.parameters", "BrainLobeSegLib.slicer_views", "BrainLobeSeg"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", FakeApp(), raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        segmentations=types.SimpleNamespace(logic=lambda: segmentations),
        terminologies=types.SimpleNamespace(logic=lambda: terminologies)), raising=False)
    # the colour table Slicer's colour logic loads from Inferno.txt (the wheel has no files)
    inferno = slicer.vtkMRMLColorTableNode()
    inferno.SetSingletonTag("FileInferno.txt")
    scene.AddNode(inferno)
    spec = importlib.util.spec_from_file_location("BrainLobeSeg", MODULE_PY)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "BrainLobeSeg", mod)
    spec.loader.exec_module(mod)
    yield mod
    mod.BrainLobeSegTest.tearDownClass()
    sys.modules.pop("BrainLobeSegLib.parameters", None)   # built against the fakes


def start_slicer(module) -> None:
    """What Slicer does at start-up: create the module, then emit startupCompleted()."""
    module.BrainLobeSeg(types.SimpleNamespace())
    for signal, slot in slicer.app.connections:
        if signal == "startupCompleted()":
            slot()


def run_loader(module) -> unittest.TestResult:
    suite = unittest.TestLoader().loadTestsFromTestCase(module.BrainLobeSegTest)
    return unittest.TextTestRunner(stream=io.StringIO(), verbosity=2).run(suite)


def test_self_test_passes_under_unittest_loader(module):
    """ctest's way: every test_ method after setUp, no runTest; the fixtures (tiny models,
    phantom) are made on demand and removed by tearDownClass. This also checks, through
    the self-test, that start-up registered the terminology context."""
    start_slicer(module)
    result = run_loader(module)
    problems = [f"{t}: {e}" for t, e in result.failures + result.errors]
    assert result.wasSuccessful(), "\n".join(problems)
    assert result.testsRun == 5 and not result.skipped
    assert module.BrainLobeSegTest._models is None


def test_without_torch_the_loader_skips_and_run_test_logs(module, monkeypatch, caplog):
    """No PyTorch: under the loader the tests that run a model are skipped (four; the
    automatic estimate, too, is made by a run) and the ASPECTS read-out, which needs no
    model, runs; Reload & Test (runTest) logs and returns instead of failing."""
    monkeypatch.setattr(torch_install, "torch_available", lambda: False)
    monkeypatch.setattr(torch_install, "install_without_asking", lambda: False)
    start_slicer(module)
    result = run_loader(module)
    assert result.wasSuccessful() and len(result.skipped) == 4 and result.testsRun == 5
    with caplog.at_level(logging.WARNING):
        assert module.BrainLobeSegTest().runTest() is None
    assert "did not run" in caplog.text


class FakeParameterNode:
    """The parameter node as the Widget sees it (parameterNodeWrapper is Slicer-only):
    attributes, connect/disconnectGui, and observers on a real scripted module node."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)
        self.node = slicer.vtkMRMLScriptedModuleNode()
        self.disconnected = None

    def connectGui(self, ui):
        return "gui-tag"

    def disconnectGui(self, tag) -> None:
        self.disconnected = tag

    def AddObserver(self, event, callback, priority=0.0):
        return self.node.AddObserver(event, callback, priority)

    def RemoveObserver(self, tag) -> None:
        self.node.RemoveObserver(tag)


def make_widget(module, volume):
    """A Widget as ``setup()`` leaves it, with mock Qt widgets, on the real scene."""
    from BrainLobeSegLib import panel
    widget = module.BrainLobeSegWidget()
    widget.ui = mock.MagicMock()
    widget.ui.modelPathLineEdit.currentPath = ""
    widget.logic = module.BrainLobeSegLogic()
    widget._session = panel.Session(widget.logic.core)
    widget._watcher = panel.TransformWatcher(widget._updateGUI)
    widget._timer = mock.MagicMock()
    widget._parameterNode = FakeParameterNode(
        inputVolume=volume, transformSource=module.TransformSource.PARENT, transformNode=None,
        invertTransform=False, modelFolder="", outputSegmentation=None,
        aspectsSide=module.AspectsSide.AUTO)
    widget._parameterNodeGuiTag = "gui-tag"
    widget.addObserver(widget._parameterNode, vtk.vtkCommand.ModifiedEvent, widget._updateGUI)
    widget._sourceChosenFor = volume       # the user has chosen "the CT's own transform"
    return widget


def test_transform_line_follows_a_transform_applied_to_the_ct(module):
    """The defect: applying a transform to the CT in the Data module does not modify the
    parameter node, so the line kept saying "no transform". The Widget now observes the
    CT; the line changes when the transform is applied and again when it is edited."""
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    widget = make_widget(module, volume)
    widget._updateGUI()
    assert "no parent transform" in widget.ui.transformInfoLabel.text
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "upright")
    volume.SetAndObserveTransformNodeID(node.GetID())          # Data module: apply it
    assert "'upright'" in widget.ui.transformInfoLabel.text
    assert "0.0 degrees" in widget.ui.transformInfoLabel.text
    R = transforms.rotation((0.0, 0.0, 12.0), center=(0.0, 0.0, 0.0))
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(transforms.slicer_to_parent_ras(R)))
    assert "12.0 degrees" in widget.ui.transformInfoLabel.text


def test_cleanup_disconnects_the_gui_and_observes_nothing(module):
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    widget = make_widget(module, volume)
    widget._updateGUI()
    parameters = widget._parameterNode
    assert widget._watcher.Observations
    widget.cleanup()
    assert parameters.disconnected == "gui-tag"
    assert widget._parameterNode is None and widget._parameterNodeGuiTag is None
    assert not widget._watcher.Observations and not widget.Observations
    text = widget.ui.transformInfoLabel.text
    volume.SetAndObserveTransformNodeID(
        slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "later").GetID())
    assert widget.ui.transformInfoLabel.text is text           # no longer updated


def test_terminology_is_registered_when_slicer_has_started(module):
    start_slicer(module)
    names = vtk.vtkStringArray()
    slicer.modules.terminologies.logic().GetLoadedTerminologyNames(names)
    assert regions.TERMINOLOGY_CONTEXT in [names.GetValue(i) for i in range(names.GetNumberOfValues())]


def test_the_widget_timer_steps_a_run_and_selects_the_estimate(module, monkeypatch, tiny_models):
    """The Widget's timer slot runs the engine's steps on this thread, one budget per
    call, shows progress, and at the end selects the automatic estimate the run added (the
    views are Qt: ``show_result`` is stood in for)."""
    from BrainLobeSegLib import panel, phantom, slicer_tools, slicer_views
    ct, _truth = phantom.make_reference_scan((14.0, -4.0, 6.0), seed=5)
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Posed head")
    slicer_tools.update_volume_from_image(volume, ct)
    shown = []
    monkeypatch.setattr(slicer_views, "show_result", shown.append)
    monkeypatch.setattr(panel, "STEP_BUDGET_S", 0.0)
    widget = make_widget(module, volume)
    widget._session.start(volume, "estimate", None, False, "3d", "cpu", str(tiny_models), None,
                          lambda *a: True)
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode") == 0
    ticks = 0
    while widget._session.running:
        widget._pollRun()
        ticks += 1
    assert module.POLL_INTERVAL_MS == 0 and ticks > 10 and widget._timer.stop.called
    node = slicer.mrmlScene.GetNthNodeByClass(0, "vtkMRMLLinearTransformNode")
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode") == 1
    p = widget._parameterNode
    assert p.transformNode is node and p.transformSource == module.TransformSource.NODE
    assert len(shown) == 1 and shown[0].job.estimated_node is node
    assert "head pose used is the automatic estimate" in widget.ui.statusLabel.text
    widget.ui.progressBar.setValue.assert_called_with(100)


def test_the_aspects_button_shows_scores_and_follows_overrides_and_the_side(module, monkeypatch):
    """The Widget's ASPECTS wiring: the button starts the read-out of the last result,
    the timer slot steps it (the inputs locked meanwhile) and shows its table in the
    panel's table view; a box ticked there (as Slicer's table view writes
    it) and a side picked in the combo box (the parameter node changes) update the
    scores line; closing the scene empties the view. The error display and wait cursor
    are Qt: stood in for by a plain context."""
    import contextlib
    from BrainLobeSegLib import panel, self_test_fixtures
    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", lambda *a, **k: contextlib.nullcontext())
    volume, segmentation = self_test_fixtures.darker_region_case(slicer.mrmlScene, "M2", "left")
    m2 = regions.region("M2", "left").label
    widget = make_widget(module, volume)
    job = widget.logic.core.prepare(volume, "none").without_scan()
    widget._session.result = panel.LastResult(segmentation, volume, job)
    widget._updateGUI()
    assert widget.ui.aspectsButton.enabled is True and widget.ui.aspectsLabel.text == ""
    assert widget.ui.aspectsTableView.visible is False
    monkeypatch.setattr(panel, "STEP_BUDGET_S", 0.0)
    widget.onAspectsButton()
    assert widget._timer.start.called and widget.ui.aspectsButton.enabled is False
    ticks = 0
    while widget._session.running:
        widget._pollRun()
        ticks += 1
    assert ticks > 5 and widget.ui.progressBar.setValue.call_args[0][0] == 100
    assert widget.ui.aspectsTableView.visible is True and widget.ui.aspectsButton.enabled is True
    table = widget._session.result.aspects.table
    widget.ui.aspectsTableView.setMRMLTableNode.assert_called_with(table)
    assert widget.ui.aspectsLabel.text.startswith("ASPECTS left: 9 (left 9, right 10)")
    column = table.GetTable().GetColumnByName("affected")
    column.SetValue(m2 - 1, 0)                     # unticked in the table view
    column.Modified()
    table.GetTable().Modified()
    assert widget.ui.aspectsLabel.text.startswith("ASPECTS left: 10 (left 10, right 10)")
    widget._parameterNode.aspectsSide = module.AspectsSide.RIGHT
    widget._parameterNode.node.Modified()          # what the parameter node wrapper sends
    assert widget.ui.aspectsLabel.text.startswith("ASPECTS right: 10") and "your choice" in widget.ui.aspectsLabel.text
    parameters = widget._parameterNode
    widget.onSceneStartClose(None, None)
    widget.ui.aspectsTableView.setMRMLTableNode.assert_called_with(None)
    assert widget._session.result is None
    widget.setParameterNode(parameters)            # what onSceneEndClose does with the new scene's
    assert widget.ui.aspectsTableView.visible is False and widget.ui.aspectsLabel.text == ""
