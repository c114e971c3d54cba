"""The shipped terminology context, loaded by Slicer's own terminology logic.

``vtkSlicerTerminologiesModuleLogic`` from the ``slicer-core`` wheel is the class Slicer
uses: the file must load under the name the segments' ``TerminologyEntry`` tags give,
and every segment's category, type and side must be found in it with the segment's
colour and name, as the Segment Editor's terminology picker looks them up.
"""

from __future__ import annotations

import json

import pytest
import slicer
import vtk

from BrainLobeSegLib import regions, terminology


@pytest.fixture(scope="module")
def loaded():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    name = terminology.load(logic)
    return logic, name


def resolved_codes(logic, name: str) -> dict:
    """(category, type, modifier) code triples -> the modifier entry, walking the loaded
    context with the accessors the terminology widgets use."""
    found = {}
    category = slicer.vtkSlicerTerminologyCategory()
    for c in range(logic.GetNumberOfCategoriesInTerminology(name)):
        assert logic.GetNthCategoryInTerminology(name, c, category)
        type_ = slicer.vtkSlicerTerminologyType()
        for t in range(logic.GetNumberOfTypesInTerminologyCategory(name, category)):
            assert logic.GetNthTypeInTerminologyCategory(name, category, t, type_)
            for m in range(logic.GetNumberOfTypeModifiersInTerminologyType(name, category, type_)):
                modifier = slicer.vtkSlicerTerminologyType()
                assert logic.GetNthTypeModifierInTerminologyType(name, category, type_, m, modifier)
                key = tuple((o.GetCodingSchemeDesignator(), o.GetCodeValue())
                            for o in (category, type_, modifier))
                found[key] = modifier
    return found


def test_the_shipped_file_loads_under_the_segments_context_name(loaded):
    logic, name = loaded
    assert name == regions.TERMINOLOGY_CONTEXT
    names = vtk.vtkStringArray()
    logic.GetLoadedTerminologyNames(names)
    assert regions.TERMINOLOGY_CONTEXT in [names.GetValue(i) for i in range(names.GetNumberOfValues())]


def test_every_segments_codes_resolve_with_its_colour_and_name(loaded):
    logic, name = loaded
    codes = resolved_codes(logic, name)
    assert len(codes) == regions.NUM_LABELS
    for r in regions.REGIONS:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(regions.terminology_entry(r), entry), r.segment_name
        assert entry.GetTerminologyContextName() == name
        key = tuple((o.GetCodingSchemeDesignator(), o.GetCodeValue()) for o in
                    (entry.GetCategoryObject(), entry.GetTypeObject(), entry.GetTypeModifierObject()))
        modifier = codes.get(key)
        assert modifier is not None, f"{r.segment_name}: {key} not in the terminology"
        assert tuple(modifier.GetRecommendedDisplayRGBValue()) == r.color, r.segment_name
        assert modifier.GetSlicerLabel() == r.segment_name
        by_label = slicer.vtkSlicerTerminologyEntry()
        assert logic.FindTypeInTerminologyBy3dSlicerLabel(name, r.segment_name, by_label)


def test_the_shipped_file_is_generated_from_the_region_table():
    """Edited regions.py without regenerating (python -m BrainLobeSegLib.terminology)
    would leave segments whose codes no longer resolve."""
    shipped = terminology.context_path().read_text(encoding="utf-8")
    assert shipped == terminology.context_json()
    assert json.loads(shipped)["@schema"] == terminology.SCHEMA


def test_a_file_under_another_name_is_refused(tmp_path):
    wrong = terminology.context()
    wrong["SegmentationCategoryTypeContextName"] = "something else"
    path = tmp_path / "wrong.term.json"
    path.write_text(json.dumps(wrong), encoding="utf-8")
    with pytest.raises(RuntimeError, match="BrainLobeSeg ASPECTS"):
        terminology.load(slicer.vtkSlicerTerminologiesModuleLogic(), path)
