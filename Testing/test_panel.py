"""The panel's decisions (``BrainLobeSegLib.panel``) on a real ``vtkMRMLScene``.

What the Widget shows and decides is computed here without Qt: the transform choice and
its description, the widget states, a run from start to outcome (including a deleted
output node and failures), the Results actions, the PyTorch question, and the order of
the developer Reload. The engine runs with the tiny random models of ``conftest``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from BrainLobeSegLib import panel, phantom, regions, slicer_logic, slicer_tools, transforms
from BrainLobeSegLib.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
UI_FILE = ROOT / "BrainLobeSeg" / "Resources" / "UI" / "BrainLobeSeg.ui"


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def core():
    """Models cached across the tests; labels straight from the 4 mm model grid."""
    return slicer_logic.BrainLobeSegLogic(segmenter_options={"refine_mm": None})


def add_ct(scene, name: str = "CT"):
    image = sitk.GetImageFromArray(np.full((32, 48, 48), 30, np.int16))
    image.SetSpacing((4.0, 4.0, 4.0))
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer_tools.update_volume_from_image(node, image)
    return node


def add_transform(scene, R, name: str = "upright"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(transforms.slicer_to_parent_ras(R)))
    return node


def wait(session: panel.Session, max_polls: int = 100000) -> int:
    """Poll the run to its end, as the Widget's timer does; the number of polls."""
    for polls in range(1, max_polls + 1):
        if session.run.poll()[2]:
            return polls
    raise AssertionError("the run did not end")


# ----------------------------------------------------------------------------- inputs

def test_default_input_volume_skips_label_maps(scene):
    assert panel.default_input_volume(scene) is None
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    ct = add_ct(scene)
    assert panel.default_input_volume(scene) is ct


def test_default_transform_source_follows_the_ct_unless_chosen(scene):
    ct = add_ct(scene)
    assert panel.default_transform_source(ct, "parent") == "estimate"
    ct.SetAndObserveTransformNodeID(add_transform(scene, transforms.identity()).GetID())
    assert panel.default_transform_source(ct, "estimate") == "parent"
    for chosen in ("node", "none"):
        assert panel.default_transform_source(ct, chosen) == chosen
    assert panel.default_transform_source(None, "estimate") == "estimate"


def test_transform_description_is_the_runs_own(scene):
    """The line says what resolve_transform tells the run (one wording), the error the
    run would stop with, and warnings before the run rather than after."""
    ct = add_ct(scene)
    assert "as it is" in panel.transform_description(ct, "none")
    assert "estimated when you press Segment" in panel.transform_description(ct, "estimate")
    text = panel.transform_description(ct, "parent")
    assert slicer_logic.resolve_transform(ct, "parent")[1] in text and "ITK-SNAP" in text
    node = add_transform(scene, transforms.rotation((0.0, 0.0, 15.0), center=(0.0, 0.0, 0.0)))
    ct.SetAndObserveTransformNodeID(node.GetID())
    text = panel.transform_description(ct, "parent")
    assert slicer_logic.resolve_transform(ct, "parent")[1] in text
    assert "'upright'" in text and "15.0 degrees" in text and "ITK-SNAP" not in text
    assert "inverted" in panel.transform_description(ct, "node", node, invert=True)
    with pytest.raises(InputError) as refused:
        slicer_logic.resolve_transform(ct, "node", None)
    assert panel.transform_description(ct, "node", None) == str(refused.value)
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    assert "not linear" in panel.transform_description(ct, "node", grid)
    node.SetAttribute("BrainLobeSeg.estimated", slicer_logic.ESTIMATE_NOTE)
    assert "automatic estimate" in panel.transform_description(ct, "node", node)
    mirror = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "mirror")
    mirror.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.diag([-1.0, 1.0, 1.0, 1.0])))
    assert "Warning:" in panel.transform_description(ct, "node", mirror)
    assert "mirrors" in panel.transform_description(ct, "node", mirror)


def test_model_description(tiny_models, tmp_path):
    assert "tiny-3d 0.0.test (3d); tiny-planar" in panel.model_description(str(tiny_models))
    assert "No models found" in panel.model_description(str(tmp_path))


def test_transform_watcher_sees_the_ct_and_the_chosen_node(scene):
    ct, node = add_ct(scene), add_transform(scene, transforms.identity())
    calls = []
    watcher = panel.TransformWatcher(lambda: calls.append(1))
    watcher.watch(ct, None)
    ct.SetAndObserveTransformNodeID(node.GetID())          # applied in the Data module
    assert len(calls) == 1
    watcher.watch(ct, node)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.diag([1.0, 1.0, 1.0, 1.0])))
    assert len(calls) >= 2                                   # the CT and the node both say so
    watcher.stop()
    count = len(calls)
    ct.SetAndObserveTransformNodeID(None)
    assert len(calls) == count


# ----------------------------------------------------------------------------- widget states

def ui_widget_names() -> set:
    return {w.get("name") for w in ET.parse(UI_FILE).getroot().iter("widget")}


def test_gui_state_names_widgets_of_the_ui_file(scene, core):
    session = panel.Session(core)
    state = panel.gui_state(session, add_ct(scene), "parent", None, False, "")
    assert set(state) <= ui_widget_names()
    assert state["segmentButton"] == {"text": "Segment", "enabled": True,
                                      "toolTip": "Segment the 20 ASPECTS regions of the selected CT."}
    assert not any(state[b]["enabled"] for b in ("openEditorButton", "statisticsButton", "saveCaseButton",
                                                 "aspectsButton"))
    assert state["aspectsLabel"] == {"text": ""}                  # no read-out yet
    assert state["aspectsTableView"] == {"visible": False}
    assert state["transformNodeSelector"]["enabled"] is False
    assert state["estimateTransformButton"]["enabled"] is True
    no_ct = panel.gui_state(session, None, "node")
    assert no_ct["segmentButton"]["enabled"] is False and no_ct["transformNodeSelector"]["enabled"]
    assert panel.gui_state(session) == {"segmentButton": {"enabled": False},
                                        "estimateTransformButton": {"enabled": False}}


# ----------------------------------------------------------------------------- a run

def test_a_run_from_start_to_result(scene, core, tiny_models):
    """Start, poll to the end, finish: the result and its actions; while running the
    inputs are locked and Segment is Cancel."""
    ct = add_ct(scene)
    session = panel.Session(core)
    asked = []
    job = session.start(ct, "none", None, False, "planar", "cpu", str(tiny_models), None,
                        lambda text, title: asked.append(title) or True)
    assert job is not None and session.running and asked == []
    state = panel.gui_state(session, ct, "none")
    assert state["segmentButton"]["text"] == "Cancel" and not state["inputsCollapsibleButton"]["enabled"]
    wait(session)
    outcome = session.finish()
    assert not session.running and outcome.error == "" and outcome.progress == 100
    assert outcome.status.startswith("Done in") and "uncertainty" in outcome.status
    assert outcome.result.segmentation.GetSegmentation().GetNumberOfSegments() == regions.NUM_LABELS
    assert outcome.result.job.scan is None                     # the voxel copy is not kept
    assert session.can_edit() and session.can_measure() and session.can_save()
    assert "Statistics of" in session.measure()
    table = session.result.table
    session.measure()
    assert session.result.table is table and scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    scene.RemoveNode(ct)
    assert session.can_edit() and not session.can_measure() and not session.can_save()
    with pytest.raises(InputError):
        session.measure()


def test_replacing_asks_first_and_a_deleted_output_is_not_lost(scene, core, tiny_models):
    ct = add_ct(scene)
    chosen = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my corrections")
    session = panel.Session(core)
    assert session.start(ct, "none", None, False, "3d", "cpu", str(tiny_models), chosen,
                         lambda text, title: "my corrections" in text and False) is None
    assert not session.running
    session.start(ct, "none", None, False, "3d", "cpu", str(tiny_models), chosen, lambda *a: True)
    scene.RemoveNode(chosen)                                    # deleted during the run
    wait(session)
    outcome = session.finish()
    assert "deleted during the run" in outcome.status
    assert outcome.result.segmentation is not chosen
    assert outcome.result.segmentation.GetScene() is scene
    assert outcome.result.segmentation.GetName() == "my corrections"


def test_an_unusual_transform_is_asked_about_and_declining_starts_nothing(scene, core, tiny_models):
    ct = add_ct(scene)
    mirror = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "mirror")
    mirror.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.diag([-1.0, 1.0, 1.0, 1.0])))
    asked = []
    session = panel.Session(core)
    job = session.start(ct, "node", mirror, False, "3d", "cpu", str(tiny_models), None,
                        lambda text, title: asked.append(text) and False)
    assert job is not None and job.warnings and not session.running
    assert "mirrors" in asked[0] and "Segment anyway?" in asked[0]


def test_outcomes_of_failed_and_cancelled_runs(scene, core, tiny_models, tmp_path, monkeypatch, caplog):
    ct = add_ct(scene)
    session = panel.Session(core)
    session.start(ct, "none", None, False, "3d", "cpu", str(tmp_path), None, lambda *a: True)
    wait(session)
    outcome = session.finish()                                  # no model there: the user's input
    assert outcome.status == "Segmentation failed." and "no 3d model" in outcome.error
    assert outcome.details == "" and outcome.result is None

    def broken(job, progress=None, cancel=None):
        yield
        raise RuntimeError("out of memory")

    monkeypatch.setattr(core, "run_steps", broken)
    session.start(ct, "none", None, False, "3d", "cpu", str(tiny_models), None, lambda *a: True)
    wait(session)
    outcome = session.finish()                                  # unexpected: logged, with details
    assert "unexpectedly: out of memory" in outcome.error and "RuntimeError" in outcome.details
    assert "out of memory" in caplog.text
    monkeypatch.undo()

    count = scene.GetNumberOfNodes()
    session.start(ct, "none", None, False, "3d", "cpu", str(tiny_models), None, lambda *a: True)
    session.run.cancel()
    wait(session)
    outcome = session.finish()
    assert outcome.status.startswith("Cancelled") and outcome.result is None
    assert scene.GetNumberOfNodes() == count
    session.start(ct, "none", None, False, "3d", "cpu", str(tiny_models), None, lambda *a: True)
    session.run.poll()
    assert session.stop() and not session.running and not session.stop()
    assert scene.GetNumberOfNodes() == count


def test_a_polled_run_gives_the_labels_of_logic_run(scene, core, tiny_models):
    """The panel's run is the engine's steps on the calling thread, a budget's worth per
    poll: many polls, each short, and the same labels as the plain loop of logic.run."""
    ct = add_ct(scene)
    job = core.prepare(ct, "none", mode="planar", device="cpu", model_dir=str(tiny_models))
    expected = sitk.GetArrayFromImage(core.run(job).labels_scan)
    run = panel.PanelRun(core, job, budget_s=0.0)             # one step per poll
    fractions, polls = [], 0
    while True:
        fraction, message, done = run.poll()
        polls += 1
        fractions.append(fraction)
        if done:
            break
    assert polls > 10 and run.steps_run == polls and fractions == sorted(fractions)
    assert run.longest_step_s < 5.0 and 0.0 < run.seconds <= run.wall_seconds
    assert fractions[-1] == 1.0 and run.poll()[2] and run.steps_run == polls   # done stays done
    outcome = run.finish()
    assert outcome.error == "" and outcome.status.startswith(f"Done in {run.seconds:.1f} s")
    np.testing.assert_array_equal(
        slicer_tools.labels_from_segmentation(outcome.result.segmentation, ct), expected)

    timed = panel.PanelRun(core, job)                          # the default budget: fewer polls
    timed.run_to_end()
    assert timed.steps_run > 1 and timed.finish().result is not None


def posed_head(scene, seed: int = 21):
    ct, truth = phantom.make_reference_scan((16.0, -6.0, 8.0), seed=seed)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Posed head")
    slicer_tools.update_volume_from_image(node, ct)
    return node, truth


def test_the_estimate_choice_adds_one_transform_node_after_success_only(scene, core, tiny_models,
                                                                        monkeypatch):
    """Nothing is added when the run starts; after success exactly one transform node (the
    pose the result was made with) and the status says so; after a cancel (during the
    estimate, or during the networks) or a failure, no node at all."""
    monkeypatch.setattr(panel, "STEP_BUDGET_S", 0.0)            # one step per poll
    ct, truth = posed_head(scene)
    count = scene.GetNumberOfNodes()
    session = panel.Session(core)
    for cancel_in in ("head pose: matching", "running the 3d model"):
        job = session.start(ct, "estimate", None, False, "3d", "cpu", str(tiny_models), None,
                            lambda *a: True)
        assert session.running and scene.GetNumberOfNodes() == count and job.estimated_node is None
        message = ""
        while not message.startswith(cancel_in):
            _fraction, message, done = session.run.poll()
            assert not done, f"the run ended before '{cancel_in}'"
        session.run.cancel()
        assert session.run.poll()[2] and session.run.cancel_requested
        outcome = session.finish()
        assert outcome.status.startswith("Cancelled") and outcome.result is None
        assert scene.GetNumberOfNodes() == count and job.estimated_node is None

    session.start(ct, "estimate", None, False, "3d", "cpu", str(tiny_models), None, lambda *a: True)
    assert wait(session) > 10
    outcome = session.finish()
    assert outcome.error == "" and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLLinearTransformNode") == 1
    node = outcome.result.job.estimated_node
    assert node is scene.GetNthNodeByClass(0, "vtkMRMLLinearTransformNode")
    assert f"head pose used is the automatic estimate '{node.GetName()}'" in outcome.status
    R = slicer_tools.transform_from_node(node)
    np.testing.assert_allclose(transforms.matrix_of(R), transforms.matrix_of(outcome.result.job.transform),
                               atol=1e-6)
    assert transforms.rotation_angle_deg(R) > 5.0 and ct.GetParentTransformNode() is None

    air = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "air")
    slicer_tools.update_volume_from_image(air, sitk.Image(40, 40, 40, sitk.sitkInt16) - 1000)
    count = scene.GetNumberOfNodes()
    session.start(air, "estimate", None, False, "3d", "cpu", str(tiny_models), None, lambda *a: True)
    wait(session)
    outcome = session.finish()
    assert "no head found" in outcome.error and scene.GetNumberOfNodes() == count
