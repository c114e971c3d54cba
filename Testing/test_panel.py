"""The panel's decisions (``BrainLobeSegLib.panel``) on a real ``vtkMRMLScene``.

What the Widget shows and decides is computed here without Qt: the transform choice and
its description, the widget states, a run from start to outcome (including a deleted
output node and failures), the Results actions, the PyTorch question, and the order of
the developer Reload. The engine runs with the tiny random models of ``conftest``.
"""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from BrainLobeSegLib import panel, regions, slicer_logic, slicer_tools, torch_install, transforms
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


def wait(session: panel.Session, timeout: float = 60.0) -> None:
    deadline = time.perf_counter() + timeout
    while not session.run.poll()[2]:
        assert time.perf_counter() < deadline, "the run did not end"
        time.sleep(0.02)


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
    assert not any(state[b]["enabled"] for b in ("openEditorButton", "statisticsButton", "saveCaseButton"))
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
        raise RuntimeError("out of memory")

    monkeypatch.setattr(core, "run", broken)
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
    assert session.stop(10.0) and not session.running and not session.stop(1.0)


def test_statistics_message_says_it_is_not_a_diagnosis(scene):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "regions")
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "stats")
    table.SetAttribute("BrainLobeSeg.flagged", "M2 left")
    text = panel.statistics_message(seg, table)
    assert "M2 left" in text and "not a diagnosis" in text and "'stats'" in text
    table.SetAttribute("BrainLobeSeg.flagged", "")
    text = panel.statistics_message(seg, table)
    assert "No region is flagged" in text and "does not exclude a stroke" in text


# ----------------------------------------------------------------------------- PyTorch

def test_pytorch_is_installed_only_after_asking(monkeypatch):
    installed = []
    monkeypatch.setattr(torch_install, "nvidia_gpu_present", lambda timeout_s=5.0: False)
    monkeypatch.setattr(torch_install, "pytorch_utils_logic", lambda: None)
    monkeypatch.setattr(torch_install, "install_torch",
                        lambda pip, installer, gpu: installed.append((pip, installer, gpu)))
    assert panel.ensure_torch(lambda *a: pytest.fail("asked although torch is there"), "pip")
    monkeypatch.setattr(torch_install, "torch_available", lambda: False)
    questions = []
    assert not panel.ensure_torch(lambda text, title: questions.append(text) and False, "pip")
    assert installed == [] and "the CPU build" in questions[0] and "with pip" in questions[0]
    entered = []

    class Busy:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    assert not panel.ensure_torch(lambda *a: True, "pip", Busy)   # installed, still not importable
    assert installed == [("pip", None, False)] and entered == [True]
    text = panel.torch_install_question(gpu=True, with_extension=True)
    assert "CUDA build" in text and "PyTorch extension" in text


# ----------------------------------------------------------------------------- developer reload

STALE_CHECK = r"""
import ast, importlib, sys
from pathlib import Path
import BrainLobeSegLib
from BrainLobeSegLib import panel
pkg = Path(BrainLobeSegLib.__file__).parent
names = sorted(p.stem for p in pkg.glob("*.py") if p.stem not in ("__init__", "parameters"))
for n in names:
    importlib.import_module("BrainLobeSegLib." + n)
order = {order}
for n in order:
    importlib.reload(sys.modules[n])
stale = []
for n in names:
    mod = sys.modules["BrainLobeSegLib." + n]
    for node in ast.parse((pkg / (n + ".py")).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for a in node.names:
                source = sys.modules["BrainLobeSegLib." + node.module] if node.module else None
                want = (getattr(source, a.name) if source else
                        sys.modules.get("BrainLobeSegLib." + a.name, getattr(BrainLobeSegLib, a.name, None)))
                if getattr(mod, a.asname or a.name) is not want:
                    stale.append(n + "." + (a.asname or a.name))
print(len(stale), stale[:5])
"""


def run_reload(order_expression: str) -> str:
    code = STALE_CHECK.replace("{order}", order_expression)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT / "BrainLobeSeg")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_reload_order_leaves_no_stale_functions():
    """Reloaded in panel.reload_order, every ``from .x import f`` is the new ``f``; the
    reverse name order the module used before leaves old classes and functions behind."""
    assert run_reload("panel.reload_order()").startswith("0 ")
    before = "sorted((m for m in sys.modules if m.startswith('BrainLobeSegLib.')), reverse=True)"
    assert not run_reload(before).startswith("0 ")


def test_the_package_has_no_import_circle():
    """One job per module, imports one way: a topological order of all the package's
    imports (also those inside functions) exists."""
    from graphlib import TopologicalSorter
    graph = panel.import_graph(Path(panel.__file__).parent)
    assert graph["slicer_logic"] >= {"slicer_tools"} and "slicer_logic" not in graph["slicer_tools"]
    assert "panel" in graph and "slicer_logic" in graph["panel"]
    order = list(TopologicalSorter(graph).static_order())
    assert order.index("slicer_tools") < order.index("slicer_logic") < order.index("panel")


def test_reload_order_puts_a_module_after_what_it_imports():
    loaded = [f"BrainLobeSegLib.{n}" for n in ("slicer_logic", "errors", "slicer_tools", "panel")]
    order = panel.reload_order("BrainLobeSegLib", loaded)
    assert sorted(order) == sorted(loaded)
    assert order.index("BrainLobeSegLib.errors") < order.index("BrainLobeSegLib.slicer_tools") \
        < order.index("BrainLobeSegLib.slicer_logic") < order.index("BrainLobeSegLib.panel")
