"""Static checks of the Slicer panel, since Qt and Slicer cannot run here.

- the ``.ui`` file is well-formed Qt Designer XML and every widget the Widget uses as
  ``self.ui.<name>`` exists in it;
- widgets bound to the parameter node name real parameters, and MRML combo boxes get
  the scene and know their node types;
- ``BrainLobeSeg.py`` parses, stays under 400 lines with only the Module/Widget/Test
  classes (the parameter node and Logic class are in ``BrainLobeSegLib/parameters.py``),
  does not import the engine at import time, and passes user-visible strings through
  ``_()``, as do the panel texts in ``BrainLobeSegLib/panel.py``;
- the CMake files name files that exist.
"""

from __future__ import annotations

import ast
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "BrainLobeSeg"
MODULE_PY = MODULE_DIR / "BrainLobeSeg.py"
PARAMETERS_PY = MODULE_DIR / "BrainLobeSegLib" / "parameters.py"
PANEL_PY = MODULE_DIR / "BrainLobeSegLib" / "panel.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "BrainLobeSeg.ui"

BOUND_WIDGET_CLASSES = {"qMRMLNodeComboBox", "QComboBox", "QCheckBox", "ctkPathLineEdit"}
USER_TEXT_CALLS = {"errorDisplay", "confirmOkCancelDisplay", "infoDisplay", "warningDisplay",
                   "delayDisplay", "confirmYesNoDisplay", "messageBox"}


@pytest.fixture(scope="module")
def ui_tree() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def module_ast() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"), filename=str(MODULE_PY))


@pytest.fixture(scope="module")
def parameters_ast() -> ast.Module:
    return ast.parse(PARAMETERS_PY.read_text(encoding="utf-8"), filename=str(PARAMETERS_PY))


@pytest.fixture(scope="module")
def panel_ast() -> ast.Module:
    return ast.parse(PANEL_PY.read_text(encoding="utf-8"), filename=str(PANEL_PY))


def ui_widgets(root: ET.Element) -> dict:
    """name -> class for every widget (and spacer/layout name) in the .ui file."""
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def dynamic_property(widget: ET.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            child = list(prop)[0]
            return child.text
    return None


def used_ui_names(tree: ast.Module) -> set:
    """Every ``self.ui.<name>`` attribute the module reads or writes."""
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def classes(tree: ast.Module) -> dict:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


# ----------------------------------------------------------------------------- .ui file

def test_ui_file_is_qt_designer_xml(ui_tree):
    assert ui_tree.tag == "ui" and ui_tree.get("version") == "4.0"
    assert ui_tree.findtext("class") == "BrainLobeSeg"
    top = ui_tree.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "BrainLobeSeg"
    names = [w.get("name") for w in ui_tree.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    declared = {c.findtext("class") for c in ui_tree.iter("customwidget")}
    used = {w.get("class") for w in ui_tree.iter("widget")}
    custom = {c for c in used if c.startswith(("ctk", "qMRML"))}
    assert custom <= declared, f"custom widgets not declared: {custom - declared}"


def test_every_widget_the_module_uses_exists(ui_tree, module_ast):
    used = used_ui_names(module_ast)
    assert {"segmentButton", "progressBar", "statusLabel", "openEditorButton",
            "loadTransformButton", "estimateTransformButton", "statisticsButton",
            "saveCaseButton", "aspectsButton", "aspectsTableView"} <= used
    missing = used - set(ui_widgets(ui_tree))
    assert not missing, f"BrainLobeSeg.py uses widgets that BrainLobeSeg.ui lacks: {sorted(missing)}"


def test_required_widgets_have_the_right_classes(ui_tree):
    widgets = ui_widgets(ui_tree)
    expected = {
        "inputVolumeSelector": "qMRMLNodeComboBox", "transformNodeSelector": "qMRMLNodeComboBox",
        "outputSegmentationSelector": "qMRMLNodeComboBox", "transformSourceComboBox": "QComboBox",
        "modeComboBox": "QComboBox", "deviceComboBox": "QComboBox",
        "invertTransformCheckBox": "QCheckBox", "modelPathLineEdit": "ctkPathLineEdit",
        "segmentButton": "QPushButton", "loadTransformButton": "QPushButton",
        "openEditorButton": "QPushButton", "progressBar": "QProgressBar", "statusLabel": "QLabel",
        "inputsCollapsibleButton": "ctkCollapsibleButton",
        "modelCollapsibleButton": "ctkCollapsibleButton",
        "outputCollapsibleButton": "ctkCollapsibleButton",
        "estimateTransformButton": "QPushButton", "statisticsButton": "QPushButton",
        "saveCaseButton": "QPushButton", "resultsCollapsibleButton": "ctkCollapsibleButton",
        "aspectsCollapsibleButton": "ctkCollapsibleButton", "aspectsSideComboBox": "QComboBox",
        "aspectsButton": "QPushButton", "aspectsLabel": "QLabel", "aspectsTableView": "qMRMLTableView",
        "aspectsNoticeLabel": "QLabel",
    }
    for name, cls in expected.items():
        assert widgets.get(name) == cls, name


def test_buttons_sit_in_their_sections(ui_tree):
    """The estimate button is an input (next to loading a transform); what acts on a
    result is in the Results section, the ASPECTS read-out in its own section with the
    "decision support, not a diagnosis" line; result buttons start disabled (no result yet)."""
    def names_under(section: str) -> set:
        top = next(w for w in ui_tree.iter("widget") if w.get("name") == section)
        return {w.get("name") for w in top.iter("widget")} - {section}

    assert {"loadTransformButton", "estimateTransformButton"} <= names_under("inputsCollapsibleButton")
    assert names_under("resultsCollapsibleButton") == {"openEditorButton", "statisticsButton",
                                                       "saveCaseButton"}
    assert names_under("aspectsCollapsibleButton") == {
        "aspectsSideLabel", "aspectsSideComboBox", "aspectsButton", "aspectsLabel", "aspectsTableView",
        "aspectsNoticeLabel"}
    section = next(w for w in ui_tree.iter("widget") if w.get("name") == "aspectsCollapsibleButton")
    assert dynamic_property(section, "text") == "ASPECTS (decision support)"
    notice = next(w for w in section.iter("widget") if w.get("name") == "aspectsNoticeLabel")
    assert dynamic_property(notice, "text").startswith("Decision support, not a diagnosis")
    for w in ui_tree.iter("widget"):
        if w.get("name") in ("openEditorButton", "statisticsButton", "saveCaseButton",
                             "estimateTransformButton", "aspectsButton"):
            assert dynamic_property(w, "enabled") == "false", w.get("name")


def test_mrml_combo_boxes_get_the_scene_and_node_types(ui_tree):
    receivers = {c.findtext("receiver") for c in ui_tree.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    types_of = {}
    for w in ui_tree.iter("widget"):
        if w.get("class") == "qMRMLNodeComboBox":
            assert w.get("name") in receivers, w.get("name")
            prop = [p for p in w.findall("property") if p.get("name") == "nodeTypes"]
            assert prop, f"{w.get('name')} has no nodeTypes"
            types_of[w.get("name")] = [s.text for s in prop[0].iter("string")]
    assert types_of == {"inputVolumeSelector": ["vtkMRMLScalarVolumeNode"],
                        "transformNodeSelector": ["vtkMRMLTransformNode"],
                        "outputSegmentationSelector": ["vtkMRMLSegmentationNode"]}
    assert "aspectsTableView" in receivers       # qMRMLTableView::setMRMLScene, as Slicer's Tables module


def test_bound_widgets_name_parameters_of_the_parameter_node(ui_tree, parameters_ast):
    node_class = classes(parameters_ast)["BrainLobeSegParameterNode"]
    parameters = {s.target.id for s in node_class.body if isinstance(s, ast.AnnAssign)}
    bound = {}
    for w in ui_tree.iter("widget"):
        name = dynamic_property(w, "SlicerParameterName")
        if name is not None:
            assert w.get("class") in BOUND_WIDGET_CLASSES
            bound[name] = w.get("name")
    assert set(bound) <= parameters, set(bound) - parameters
    # Everything but the model folder (synchronised by hand, see the class docstring).
    assert parameters - set(bound) == {"modelFolder"}
    # Enum-bound combo boxes are filled by the wrapper: no items in the .ui file.
    for w in ui_tree.iter("widget"):
        if w.get("class") == "QComboBox":
            assert not w.findall("item"), w.get("name")


# ----------------------------------------------------------------------------- module file

def test_module_has_only_module_widget_and_test_classes(module_ast, parameters_ast):
    """A thin module file: three classes, under 400 lines (the self-test's fixtures are in
    ``BrainLobeSegLib/self_test_fixtures.py``); the parameter node and the
    Logic class (scripts use ``BrainLobeSeg.BrainLobeSegLogic``) come from parameters.py."""
    assert len(MODULE_PY.read_text(encoding="utf-8").splitlines()) < 400
    found = classes(module_ast)
    bases = {name: [ast.unparse(b) for b in cls.bases] for name, cls in found.items()}
    assert bases == {"BrainLobeSeg": ["ScriptedLoadableModule"],
                     "BrainLobeSegWidget": ["ScriptedLoadableModuleWidget", "VTKObservationMixin"],
                     "BrainLobeSegTest": ["ScriptedLoadableModuleTest"]}
    imported = {a.asname or a.name for n in module_ast.body if isinstance(n, ast.ImportFrom)
                and n.module == "BrainLobeSegLib.parameters" for a in n.names}
    assert {"BrainLobeSegLogic", "BrainLobeSegParameterNode", "TransformSource"} <= imported
    logic = classes(parameters_ast)["BrainLobeSegLogic"]
    assert [ast.unparse(b) for b in logic.bases] == ["ScriptedLoadableModuleLogic"]
    decorators = [ast.unparse(d) for d in classes(parameters_ast)["BrainLobeSegParameterNode"].decorator_list]
    assert decorators == ["parameterNodeWrapper"]
    tests = [f.name for f in found["BrainLobeSegTest"].body
             if isinstance(f, ast.FunctionDef) and f.name.startswith("test_")]
    assert len(tests) >= 3
    widget_methods = {f.name for f in found["BrainLobeSegWidget"].body if isinstance(f, ast.FunctionDef)}
    assert {"setup", "cleanup", "enter", "exit", "onSegmentButton", "onLoadTransformButton",
            "onOpenEditorButton", "initializeParameterNode", "setParameterNode", "onReload",
            "onEstimateTransformButton", "onStatisticsButton", "onSaveCaseButton",
            "onAspectsButton"} <= widget_methods


def test_engine_is_not_imported_when_slicer_loads_the_module(module_ast, parameters_ast):
    """Slicer imports every module file at start-up: the engine (torch) must wait, and
    so should numpy and SimpleITK (the light modules it imports get them lazily)."""
    light = {"BrainLobeSegLib", "BrainLobeSegLib.parameters"}
    top_level = {}
    for node in module_ast.body:
        if isinstance(node, ast.Import):
            top_level.update({a.name: [] for a in node.names})
        elif isinstance(node, ast.ImportFrom):
            top_level.setdefault(node.module or "", []).extend(a.name for a in node.names)
    assert not [m for m in top_level if m.startswith(("BrainLobeSegLib", "torch", "SimpleITK",
                                                      "numpy")) and m not in light]
    source = MODULE_PY.read_text(encoding="utf-8")
    assert "sys.path.insert(0, _MODULE_DIR)" in source
    # parameters.py needs Slicer's own modules; it may import nothing else heavy
    imports = {n.module for n in parameters_ast.body if isinstance(n, ast.ImportFrom)}
    imports |= {a.name for n in parameters_ast.body if isinstance(n, ast.Import) for a in n.names}
    assert imports <= {"enum", "slicer", "slicer.i18n", "slicer.parameterNodeWrapper",
                       "slicer.ScriptedLoadableModule", "modes"}
    # and the package modules the file imports really are light (slicer and vtk are
    # loaded in Slicer already; slicer_views needs the application)
    names = [n for n in top_level["BrainLobeSegLib"] if n != "slicer_views"]
    code = ("import sys, slicer; before = set(sys.modules)\n"
            f"from BrainLobeSegLib import {', '.join(names)}\n"
            "import BrainLobeSegLib.modes\n"
            "print(sorted(m for m in ('torch', 'numpy', 'SimpleITK') if m in set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=MODULE_PY.parent)
    assert out.stdout.strip() == "[]"


def test_panel_modes_are_the_engine_modes(parameters_ast):
    """The panel's mode enum offers exactly the engine's modes (one source: modes.py)."""
    from BrainLobeSegLib import modes
    enum_class = classes(parameters_ast)["SegmentationMode"]
    values = [n.value.value for n in enum_class.body
              if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)]
    assert sorted(values) == sorted(modes.MODES)
    assert modes.DEFAULT_MODE in modes.MODES


def _is_translated(node: ast.AST) -> bool:
    """``_("...")``, ``_("...").format(...)``, a variable or ``str(exc)`` - not a bare literal."""
    if isinstance(node, ast.Constant):
        return node.value == ""
    if isinstance(node, ast.JoinedStr):
        return False
    return True


def test_user_visible_strings_go_through_tr(module_ast):
    """Message boxes, button texts, tooltips and status lines use ``_()``."""
    widget = classes(module_ast)["BrainLobeSegWidget"]
    problems = []
    for node in ast.walk(widget):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in USER_TEXT_CALLS:
            texts = list(node.args[:1]) + [k.value for k in node.keywords
                                           if k.arg in ("windowTitle", "text")]
            problems += [ast.unparse(t) for t in texts if not _is_translated(t)]
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr in ("text", "toolTip"):
                    if not _is_translated(node.value):
                        problems.append(ast.unparse(node))
    module = classes(module_ast)["BrainLobeSeg"]
    for node in ast.walk(module):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute) \
                and node.targets[0].attr in ("title", "helpText", "acknowledgementText"):
            if not (isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "_"):
                problems.append(ast.unparse(node))
    assert not problems, problems


def test_every_translated_string_is_a_literal(module_ast, parameters_ast, panel_ast):
    """``_()`` needs literal text for the translation tools to find it (the module file,
    the panel's texts and the parameter choices)."""
    calls = [n for tree in (module_ast, parameters_ast, panel_ast) for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "_"]
    assert len(calls) > 40
    assert all(len(c.args) == 1 and isinstance(c.args[0], ast.Constant)
               and isinstance(c.args[0].value, str) for c in calls)


# ----------------------------------------------------------------------------- build files

def _png_size(path: Path):
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_cmake_files_name_existing_files():
    module_cmake = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule" in module_cmake
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake
    assert "Resources/Models/*.json" in module_cmake and "Resources/Models/*.pt" in module_cmake
    for rel in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui"):
        assert rel in module_cmake
        assert (MODULE_DIR / rel.replace("${MODULE_NAME}", "BrainLobeSeg")).is_file()
    from BrainLobeSegLib import terminology
    term = terminology.context_path().relative_to(MODULE_DIR).as_posix()
    assert term in module_cmake and "${MODULE_TERMINOLOGY_RESOURCES}" in module_cmake
    ext_cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS",
                "EXTENSION_DEPENDS"):
        assert re.search(rf"set\({key} ", ext_cmake), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in ext_cmake
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in ext_cmake
    assert "add_subdirectory(BrainLobeSeg)" in ext_cmake
    for url_key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        rel = re.search(rf'set\({url_key} "\$\{{BRAINLOBESEG_REPOSITORY_URL\}}/raw/main/([^"]+)"\)',
                        ext_cmake).group(1)
        assert (ROOT / rel).is_file(), rel


def test_icons_are_128_pixel_pngs():
    assert _png_size(MODULE_DIR / "Resources" / "Icons" / "BrainLobeSeg.png") == (128, 128)
    assert _png_size(ROOT / "Resources" / "BrainLobeSeg.png") == (128, 128)
