"""The ASPECTS read-out in Slicer (issue 16) on a real ``vtkMRMLScene`` from ``slicer-core``.

The phantom head of the self-test (48x48x32 voxels at 4 mm, upright) with its own exact
region labels, so no model is needed; one region is made "affected" by lowering its
parenchyma (voxels of 20-50 HU) by 8 HU (``phantom.lower_region``). What the clinician
sees and does is checked on the real nodes: the scores per side, the table with its
check boxes, the red highlight of the affected segments and that it is undone exactly,
the evidence volume on the CT's grid, the overrides (through the logic, and through the
table as Slicer's table view writes a ticked box), the side choice, and that nothing
else in the scene changes and a second read-out adds no node.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from BrainLobeSegLib import (aspects, panel, phantom, regions, self_test_fixtures, slicer_logic, slicer_tools,
                             transforms)
from BrainLobeSegLib.errors import InputError

#: The self-test's phantom (``self_test_fixtures.PHANTOM``).
PHANTOM = self_test_fixtures.PHANTOM
M2_LEFT = regions.region("M2", "left")
M4_RIGHT = regions.region("M4", "right")
SEGMENT_ID = slicer_tools.SEGMENT_ID_FORMAT.format
SIDE_POSE_DEG = (4.0, -3.0, 6.0)


@pytest.fixture(scope="module")
def case():
    return phantom.make_scan(**PHANTOM)


@pytest.fixture(scope="module")
def darker_ct(case) -> sitk.Image:
    """The phantom CT with the parenchyma of M2 left 8 HU darker."""
    return phantom.lower_region(case.ct, case.labels_scan, M2_LEFT.label, drop_hu=8.0)


@pytest.fixture
def scene():
    slicer_tools.ensure_segmentation_converters()
    return slicer.vtkMRMLScene()


@pytest.fixture
def core():
    return slicer_logic.BrainLobeSegLogic()


def add_case(scene, ct: sitk.Image, labels: sitk.Image, transform: bool = True):
    """A CT volume node (under a linear transform, as a CT turned upright is) and the
    segmentation of its regions, as the module makes them."""
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    slicer_tools.update_volume_from_image(volume, ct)
    if transform:
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "upright")
        R = transforms.rotation(SIDE_POSE_DEG, center=(0.0, 0.0, 0.0))
        node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(transforms.slicer_to_parent_ras(R)))
        volume.SetAndObserveTransformNodeID(node.GetID())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "regions")
    slicer_tools.fill_segmentation(segmentation, sitk.GetArrayFromImage(labels), volume)
    segmentation.SetAttribute("BrainLobeSeg.sourceVolume", volume.GetID())
    return volume, segmentation


def last_result(core, segmentation, volume, readout=None) -> panel.LastResult:
    """What a finished run leaves the panel's session (its job without the voxel copy)."""
    job = core.prepare(volume, "none").without_scan()
    return panel.LastResult(segmentation, volume, job, aspects=readout)


def display_state(segmentation) -> dict:
    """Every segment's display properties a highlight could touch."""
    display = segmentation.GetDisplayNode()
    s = segmentation.GetSegmentation()
    ids = [s.GetNthSegmentID(i) for i in range(s.GetNumberOfSegments())]
    return {sid: slicer_tools._segment_display(display, sid) for sid in ids}


def node_mtimes(scene) -> dict:
    """ID -> MTime of every node now in the scene."""
    return {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime()
            for i in range(scene.GetNumberOfNodes())}


def column(table, key: str) -> list:
    col = table.GetTable().GetColumnByName(key)
    return [col.GetValue(i) for i in range(table.GetNumberOfRows())]


def row_of(label: int) -> int:
    return [r.label for r in regions.REGIONS].index(label)


def tick(table, label: int, checked: bool) -> None:
    """What Slicer's table view (qMRMLTableModel::updateMRMLFromModel) does when a check
    box is clicked: set the value, then Modified() on the column and the table."""
    t = table.GetTable()
    col = t.GetColumnByName("affected")
    t.SetValue(row_of(label), [t.GetColumn(j) for j in range(t.GetNumberOfColumns())].index(col),
               vtk.vtkVariant(int(checked)))
    col.Modified()
    t.Modified()


# ----------------------------------------------------------------------------- the read-out

def test_a_darker_region_is_called_and_its_side_scores_9(scene, core, case, darker_ct):
    """M2 left, 8 HU darker, is the only call: ASPECTS 9 left, 10 right, the left side
    proposed with its reason; the table, its attributes and the red highlight agree."""
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    readout = core.aspects_readout(segmentation, volume)
    result = readout.result
    assert [r.region for r in result.regions if r.called] == ["M2 left"]
    m2 = result.region("M2 left")
    print(f"M2 left: affected {m2.affected_fraction:.2f}, median drop {m2.median_drop_hu:.1f} HU, "
          f"vs mirror {m2.diff_to_mirror_hu:.1f} HU, vs expected {m2.diff_to_expected_hu:.1f} HU")
    assert (readout.score("left"), readout.score("right"), readout.score()) == (9, 10, 9)
    assert (result.side, result.side_source) == ("left", "proposed") and "left" in result.side_reason

    table = readout.table
    assert table.IsA("vtkMRMLTableNode") and table.GetName() == "regions ASPECTS read-out"
    assert table.GetNumberOfRows() == regions.NUM_LABELS
    assert column(table, "region") == [r.segment_name for r in regions.REGIONS]
    assert table.GetTable().GetColumnByName("affected").IsA("vtkBitArray")   # check boxes in Slicer
    assert column(table, "affected") == [int(r.label == M2_LEFT.label) for r in regions.REGIONS]
    assert column(table, "called") == ["yes" if r.label == M2_LEFT.label else "no" for r in regions.REGIONS]
    assert set(column(table, "override")) == {""}
    assert column(table, "affected_percent")[row_of(M2_LEFT.label)] == pytest.approx(100 * m2.affected_fraction)
    assert "darker than the mirror side" in column(table, "reasons")[row_of(M2_LEFT.label)]
    assert (table.GetAttribute("BrainLobeSeg.aspectsLeft"), table.GetAttribute("BrainLobeSeg.aspectsRight"),
            table.GetAttribute("BrainLobeSeg.aspectsSide"), table.GetAttribute("BrainLobeSeg.affected")) == \
        ("9", "10", "left", "M2 left")
    assert "not a diagnosis" in table.GetAttribute("BrainLobeSeg.notice")
    assert table.GetAttribute("BrainLobeSeg.evidenceVolume") == readout.evidence.GetID()

    assert slicer_tools.highlighted_segments(segmentation) == [SEGMENT_ID(label=M2_LEFT.label)]
    display = segmentation.GetDisplayNode()
    color = display.GetSegmentOverrideColor(SEGMENT_ID(label=M2_LEFT.label))
    assert (color.GetX(), color.GetY(), color.GetZ()) == slicer_tools.HIGHLIGHT_COLOR
    # the segment's own colour (and so its terminology colour) is untouched
    own = segmentation.GetSegmentation().GetSegment(SEGMENT_ID(label=M2_LEFT.label)).GetColor()
    assert own == pytest.approx(M2_LEFT.color_float)

    message = panel.aspects_message(readout)
    assert "ASPECTS left: 9 (left 9, right 10)" in message and "Affected: M2 left." in message
    assert "left, proposed (1 region(s) affected on the left" in message and "not a diagnosis" in message


def test_a_haemorrhage_pair_reads_not_assessed_in_the_table(scene, core, case, darker_ct):
    """A 65 HU haemorrhage of 7 mm in the left lentiform beside the darker M2 left: the
    table says "not assessed" for the lentiform pair with the reason, M2 left is still the
    one call (ASPECTS left 9)."""
    centre = aspects.region_centroids(case.labels_scan)[regions.region("L", "left").label]
    volume, segmentation = add_case(scene, phantom.add_dense_ball(darker_ct, centre, 7.0, 65.0), case.labels_scan)
    readout = core.aspects_readout(segmentation, volume)
    lentiform = [row_of(regions.region("L", side).label) for side in aspects.SIDES]
    assert [column(readout.table, "called")[i] for i in lentiform] == ["not assessed"] * 2
    assert all("dense lesion" in column(readout.table, "reasons")[i] for i in lentiform)
    assert column(readout.table, "called")[row_of(M2_LEFT.label)] == "yes" and readout.score("left") == 9


def test_a_normal_phantom_scores_10_on_both_sides(scene, core, case):
    volume, segmentation = add_case(scene, case.ct, case.labels_scan, transform=False)
    readout = core.aspects_readout(segmentation, volume)
    assert [r.region for r in readout.result.regions if r.called] == []
    assert (readout.score("left"), readout.score("right")) == (10, 10)
    assert "no region called" in readout.result.side_reason
    assert slicer_tools.highlighted_segments(segmentation) == []
    assert "Affected: none." in panel.aspects_message(readout)


def test_the_evidence_volume_lies_on_the_ct_grid(scene, core, case, darker_ct):
    """The evidence map overlays the CT: same dimensions, IJK -> RAS and parent
    transform; negative (darker) in M2 left, positive in its mirror region; shown with the diverging colour table when
    Slicer's colour logic has added it, and thresholded to the voxels counted as darker."""
    diverging = slicer.vtkMRMLColorTableNode()
    diverging.SetSingletonTag("FileDivergingBlueRed.txt")   # as Slicer's colour logic adds it
    scene.AddNode(diverging)
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    evidence = core.aspects_readout(segmentation, volume).evidence
    assert evidence.IsA("vtkMRMLScalarVolumeNode") and evidence.GetName() == "regions ASPECTS evidence"
    assert evidence.GetImageData().GetDimensions() == volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(slicer_tools.ijk_to_ras(evidence), slicer_tools.ijk_to_ras(volume))
    assert evidence.GetTransformNodeID() == volume.GetTransformNodeID() is not None
    values = slicer.util.arrayFromVolume(evidence)
    labels = sitk.GetArrayFromImage(case.labels_scan)
    assert values.dtype == np.float32
    assert np.median(values[labels == M2_LEFT.label]) < -aspects.VOXEL_DROP_HU
    assert np.median(values[labels == M2_LEFT.mirror_label]) > aspects.VOXEL_DROP_HU   # its mirror image
    assert abs(np.median(values[labels == M4_RIGHT.label])) < 1.0
    display = evidence.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"
    assert (display.GetWindow(), display.GetLevel()) == (2 * slicer_tools.EVIDENCE_WINDOW_HU, 0.0)
    assert display.GetApplyThreshold() and display.GetUpperThreshold() == -aspects.VOXEL_DROP_HU
    assert evidence.GetAttribute("BrainLobeSeg.segmentation") == segmentation.GetID()


def test_without_a_diverging_table_the_built_in_fmri_one_is_used(scene, core, case, darker_ct):
    """A slicer-core scene with MRML's own default colours has no DivergingBlueRed file
    table; fMRI (negative blue, positive red/yellow) is the diverging one it has."""
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    evidence = core.aspects_readout(segmentation, volume).evidence
    assert evidence.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodefMRI"
    colors.SetMRMLScene(None)


# ----------------------------------------------------------------------------- overrides

def test_overrides_change_the_score_the_table_and_the_highlight(scene, core, case, darker_ct):
    """Un-calling M2 left scores 10 and gives back exactly its display before; calling
    M4 right scores 9 on the right and draws it red; None goes back to the automatic call."""
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    before = display_state(segmentation)
    readout = core.aspects_readout(segmentation, volume)
    highlighted = display_state(segmentation)
    m2, m4 = SEGMENT_ID(label=M2_LEFT.label), SEGMENT_ID(label=M4_RIGHT.label)
    assert highlighted[m2] != before[m2]
    assert {k: v for k, v in highlighted.items() if k != m2} == {k: v for k, v in before.items() if k != m2}

    core.apply_override(readout, "M2 left", False)
    assert (readout.score("left"), readout.score("right")) == (10, 10)
    assert column(readout.table, "affected")[row_of(M2_LEFT.label)] == 0
    assert column(readout.table, "override")[row_of(M2_LEFT.label)] == "not affected"
    assert column(readout.table, "called")[row_of(M2_LEFT.label)] == "yes"      # the automatic call stays
    assert readout.table.GetAttribute("BrainLobeSeg.aspectsLeft") == "10"
    assert slicer_tools.highlighted_segments(segmentation) == []
    assert display_state(segmentation) == before                               # undone exactly
    assert segmentation.GetDisplayNode().GetAttribute(slicer_tools.HIGHLIGHT_ATTRIBUTE) is None

    core.apply_override(readout, M4_RIGHT.label, True)
    assert (readout.score("left"), readout.score("right")) == (10, 9)
    assert readout.table.GetAttribute("BrainLobeSeg.affected") == "M4 right"
    assert slicer_tools.highlighted_segments(segmentation) == [m4]

    core.apply_override(readout, "M2 left", None)
    core.apply_override(readout, "M4 right", None)
    assert (readout.score("left"), readout.score("right")) == (9, 10)
    assert set(column(readout.table, "override")) == {""}
    assert display_state(segmentation) == highlighted
    with pytest.raises(InputError, match="not an ASPECTS region"):
        core.apply_override(readout, "M7 left", True)


def test_the_highlight_gives_back_what_the_user_had_set(scene, core, case, darker_ct):
    """A segment the user had hidden, with its own override colour and fill opacity, is
    shown red while affected and gets exactly those settings back when un-called."""
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    display, m2 = segmentation.GetDisplayNode(), SEGMENT_ID(label=M2_LEFT.label)
    display.SetSegmentVisibility(m2, False)
    display.SetSegmentOverrideColor(m2, 0.2, 0.4, 0.6)
    display.SetSegmentOpacity2DFill(m2, 0.3)
    before = display_state(segmentation)
    readout = core.aspects_readout(segmentation, volume)
    assert display.GetSegmentVisibility(m2) and display.GetSegmentOpacity2DFill(m2) == 1.0
    core.apply_override(readout, "M2 left", False)
    assert display_state(segmentation) == before


def test_ticking_a_box_in_the_table_is_an_override(scene, core, case, darker_ct):
    """The panel's way: the read-out's table is shown in a table view; a box ticked there
    changes the call, the scores line is refreshed, and unticking it back to the
    automatic call removes the override."""
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    session = panel.Session(core)
    session.result = last_result(core, segmentation, volume)
    assert panel.gui_state(session, volume, "none")["aspectsButton"]["enabled"]
    changes = []
    text = session.read_aspects("auto", on_change=lambda: changes.append(session.aspects_status()))
    assert text.startswith("ASPECTS left: 9") and session.aspects_status() == text
    state = panel.gui_state(session, volume, "none")
    assert state["aspectsLabel"]["text"] == text and state["aspectsTableView"] == {"visible": True}
    table = session.result.aspects.table

    tick(table, M2_LEFT.label, False)
    assert len(changes) == 1 and changes[0].startswith("ASPECTS left: 10 (left 10, right 10)")
    assert "1 call(s) changed by you" in changes[0]
    assert session.result.aspects.result.region("M2 left").override is False
    assert column(table, "override")[row_of(M2_LEFT.label)] == "not affected"
    assert slicer_tools.highlighted_segments(segmentation) == []

    tick(table, M2_LEFT.label, True)            # back to the automatic call
    assert len(changes) == 2 and session.result.aspects.result.region("M2 left").override is None
    assert column(table, "override")[row_of(M2_LEFT.label)] == ""
    table.Modified()                            # any other change of the table: nothing to do
    assert len(changes) == 2

    assert session.override_aspects("M4 right", True).startswith("ASPECTS left: 9 (left 9, right 9)")
    assert column(table, "affected")[row_of(M4_RIGHT.label)] == 1 and len(changes) == 2
    tick(table, M2_LEFT.label, False)           # the calls that count now point to the right:
    assert changes[-1].startswith("ASPECTS right: 9 (left 10, right 9)")   # the proposed side follows
    assert table.GetAttribute("BrainLobeSeg.aspectsSide") == "right"

    session.clear()                             # scene closing: no more observation
    tick(table, M4_RIGHT.label, False)
    assert len(changes) == 3 and session.aspects_status() == ""


def test_a_card_fitted_with_other_settings_is_said_in_the_panel(scene, core, case, darker_ct, monkeypatch):
    """The read-out card in use (here the bundled one as if fitted with an older fluid
    margin) is checked before the first step; the panel's ASPECTS line says which setting
    differs and to refit, and keeps saying it after the clinician's overrides."""
    card = aspects.bundled_card()
    older = dataclasses.replace(card, readout={**card.readout, "csf_margin_mm": 1.5})
    monkeypatch.setattr(aspects, "bundled_card", lambda: older)
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    session = panel.Session(core)
    session.result = last_result(core, segmentation, volume)
    text = session.read_aspects()
    assert text.startswith("ASPECTS left: 9") and "Warning: the ASPECTS read-out card" in text
    assert f"csf_margin_mm: 1.5 -> {aspects.CSF_MARGIN_MM!r}" in text and "aspects_fit" in text
    assert "Warning:" in session.override_aspects("M4 right", True)
    monkeypatch.setattr(aspects, "bundled_card", lambda: card)
    assert "Warning" not in session.read_aspects()       # the bundled card's own settings: nothing to say


def test_the_symptomatic_side_is_the_users_or_proposed(scene, core, case, darker_ct):
    """The side picked by the user counts at once (nothing measured again); back on
    "auto" the proposed side and its reason return."""
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    readout = core.aspects_readout(segmentation, volume, side="right")
    assert (readout.result.side, readout.result.side_source, readout.score()) == ("right", "user", 10)
    assert "your choice" in panel.aspects_message(readout)
    session = panel.Session(core)
    session.result = last_result(core, segmentation, volume, readout)
    assert session.choose_aspects_side("right") is False
    assert session.choose_aspects_side("auto") is True
    assert (readout.result.side, readout.result.side_source, readout.score()) == ("left", "proposed", 9)
    assert readout.table.GetAttribute("BrainLobeSeg.aspectsSide") == "left"
    assert session.choose_aspects_side("left") and readout.result.side_source == "user"
    with pytest.raises(InputError):
        core.aspects_readout(segmentation, volume, side="up")


# ----------------------------------------------------------------------------- the scene

def test_nothing_else_in_the_scene_changes(scene, core, case, darker_ct):
    """The read-out adds its table and evidence volume (with their display node) and
    changes the segmentation's display node (the highlight) only: every other node,
    the CT's voxels and the segments' content are as they were."""
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    voxels = slicer.util.arrayFromVolume(volume).copy()
    labels = slicer_tools.labels_from_segmentation(segmentation, volume)
    before = node_mtimes(scene)
    readout = core.aspects_readout(segmentation, volume)
    core.apply_override(readout, "M2 left", False)
    after = node_mtimes(scene)
    display_id = segmentation.GetDisplayNode().GetID()
    assert {k for k in before if after[k] != before[k]} == {display_id}
    added = set(after) - set(before)
    evidence_display = readout.evidence.GetDisplayNode().GetID()
    assert added == {readout.table.GetID(), readout.evidence.GetID(), evidence_display}
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(volume), voxels)
    np.testing.assert_array_equal(slicer_tools.labels_from_segmentation(segmentation, volume), labels)


def test_reading_out_again_reuses_the_nodes(scene, core, case, darker_ct):
    """Twice through the logic with the previous read-out, and twice through the panel:
    the same table and evidence volume, refilled, the clinician's overrides kept; no node
    piles up. A deleted table is
    made again, and an override still moves the highlight without it."""
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    first = core.aspects_readout(segmentation, volume)
    count = scene.GetNumberOfNodes()
    core.apply_override(first, "M4 right", True)
    second = core.aspects_readout(segmentation, volume, previous=first)
    assert (second.table, second.evidence) == (first.table, first.evidence)
    assert scene.GetNumberOfNodes() == count
    assert second.score("right") == 9 and second.result.region("M4 right").override is True
    assert sorted(slicer_tools.highlighted_segments(segmentation)) == sorted(
        [SEGMENT_ID(label=M2_LEFT.label), SEGMENT_ID(label=regions.region("M4", "right").label)])
    core.apply_override(second, "M4 right", None)           # back to the automatic call
    assert core.aspects_readout(segmentation, volume, previous=second).score("right") == 10

    session = panel.Session(core)
    session.result = last_result(core, segmentation, volume, second)
    session.read_aspects()
    session.read_aspects("left")
    assert session.result.aspects.table is first.table and scene.GetNumberOfNodes() == count

    scene.RemoveNode(first.table)
    session.override_aspects("M2 left", False)             # no table: the highlight still follows
    assert slicer_tools.highlighted_segments(segmentation) == []
    session.read_aspects()
    assert session.result.aspects.table is not first.table and scene.GetNumberOfNodes() == count


def test_unusable_input_adds_nothing(scene, core, case, darker_ct):
    """A segment whose name is no region, or a segmentation made from another CT, is
    refused before anything is added or highlighted."""
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "another CT")
    slicer_tools.update_volume_from_image(other, darker_ct)
    count, state = scene.GetNumberOfNodes(), display_state(segmentation)
    with pytest.raises(InputError, match="another CT"):
        core.aspects_readout(segmentation, other)
    segmentation.GetSegmentation().GetSegment(SEGMENT_ID(label=1)).SetName("bleed")
    with pytest.raises(InputError, match="not ASPECTS regions"):
        core.aspects_readout(segmentation, volume)
    with pytest.raises(InputError, match="no segmentation"):
        core.aspects_readout(None, volume)
    assert scene.GetNumberOfNodes() == count and display_state(segmentation) == state
    session = panel.Session(core)
    with pytest.raises(InputError):
        session.override_aspects("M2 left", False)
    assert session.aspects_status() == "" and not panel.gui_state(session, volume, "none")["aspectsButton"]["enabled"]


def test_the_panel_reads_out_in_steps_and_adds_nodes_only_at_the_end(scene, core, case, darker_ct, monkeypatch):
    """The panel's read-out runs from the Widget's timer like a segmentation: one step per
    poll here (budget 0), the GUI's state says it is running (inputs locked, Cancel for
    the read-out), progress grows, and the scene is untouched until the last step."""
    monkeypatch.setattr(panel, "STEP_BUDGET_S", 0.0)
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    session = panel.Session(core)
    session.result = last_result(core, segmentation, volume)
    count = scene.GetNumberOfNodes()
    run = session.start_aspects("auto")
    state = panel.gui_state(session, volume, "none")
    assert not state["aspectsButton"]["enabled"] and state["segmentButton"]["text"] == "Cancel"
    assert "ASPECTS read-out" in state["segmentButton"]["toolTip"]
    fractions = []
    while True:
        fraction, message, done = run.poll()
        if done:
            break
        fractions.append(fraction)
        assert scene.GetNumberOfNodes() == count and message.startswith("ASPECTS")
    assert len(fractions) >= 10 and fractions == sorted(fractions) and fractions[-1] >= 0.9
    outcome = session.finish()
    assert outcome.status.startswith("ASPECTS left: 9") and outcome.aspects is session.aspects
    readout = session.aspects   # added: the table, the evidence volume and its display node
    assert scene.GetNumberOfNodes() == count + 3 and readout.table.GetScene() is scene
    assert readout.evidence.GetScene() is scene and readout.evidence.GetDisplayNode() is not None
    assert not session.running and panel.gui_state(session, volume, "none")["aspectsButton"]["enabled"]


def test_a_cancelled_or_orphaned_read_out_adds_nothing(scene, core, case, darker_ct, monkeypatch):
    """Cancel between two steps adds nothing; nor does a read-out whose segmentation was
    deleted while it ran (it says so)."""
    monkeypatch.setattr(panel, "STEP_BUDGET_S", 0.0)
    volume, segmentation = add_case(scene, darker_ct, case.labels_scan)
    session = panel.Session(core)
    session.result = last_result(core, segmentation, volume)
    count, state = scene.GetNumberOfNodes(), display_state(segmentation)
    run = session.start_aspects("auto")
    run.poll()
    run.cancel()
    assert run.poll()[2]
    outcome = session.finish()
    assert outcome.status.startswith("Cancelled") and session.aspects is None
    assert scene.GetNumberOfNodes() == count and display_state(segmentation) == state

    run = session.start_aspects("auto")
    run.poll()
    scene.RemoveNode(segmentation)
    run.run_to_end()
    outcome = session.finish()
    assert "removed during the ASPECTS read-out" in outcome.error and outcome.title.startswith("The ASPECTS")
    assert scene.GetNumberOfNodes() == count - 1 and session.aspects is None
