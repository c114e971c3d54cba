"""The segments' terminology context for Slicer, generated from :mod:`regions`.

Every segment carries a ``TerminologyEntry`` tag naming the context
``regions.TERMINOLOGY_CONTEXT`` and its category, type and side codes. Slicer's
Terminologies logic resolves those codes (for the Segment Editor's terminology picker,
DICOM SEG export, colours by terminology) only from contexts it has loaded, and no
built-in list has the ASPECTS M1-M6 territories or the lentiform nucleus. The extension
therefore ships this context as a ``.term.json`` file (the dcmqi segment-context schema
that ``vtkSlicerTerminologiesModuleLogic::LoadTerminologyFromFile`` accepts) and the
module loads it once Slicer has started.

The file is generated from the region table, so the two cannot disagree: a test checks
that the shipped file equals :func:`context_json` and that every segment's codes
resolve from it. After changing :mod:`regions`, rewrite it with
``python -m BrainLobeSegLib.terminology``.

Plain Python (json only): the module imports at Slicer start-up without numpy or torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import regions

#: The schema identifier Slicer's terminology logic requires in a terminology file.
SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"
FILE_NAME = "SegmentationCategoryTypeModifier-BrainLobeSeg.term.json"


def context_path() -> Path:
    """The shipped file: ``Resources/Terminology`` beside the package (Slicer and a source
    checkout; only Slicer reads it, so a wheel does not carry it)."""
    return Path(__file__).resolve().parent.parent / "Resources" / "Terminology" / FILE_NAME


def _code(code: tuple) -> Dict[str, str]:
    scheme, value, meaning = code
    return {"CodeMeaning": meaning, "CodingSchemeDesignator": scheme, "CodeValue": value}


def context() -> Dict[str, Any]:
    """The terminology context as a dict: one category (anatomical structure), one type
    per ASPECTS region (ten), each with a left and a right modifier carrying that side's
    colour, segment name (``3dSlicerLabel``) and label value."""
    types: List[Dict[str, Any]] = []
    for left in (r for r in regions.REGIONS if r.side == "left"):
        right = regions.REGION_BY_LABEL[left.mirror_label]
        modifiers = [dict(_code(r.side_modifier), **{
            "recommendedDisplayRGBValue": list(r.color), "3dSlicerLabel": r.segment_name,
            "3dSlicerIntegerLabel": r.label}) for r in (left, right)]
        types.append(dict(_code(left.type_code), Modifier=modifiers))
    category = dict(_code(regions.CATEGORY_CODE), showAnatomy=False, Type=types)
    return {"SegmentationCategoryTypeContextName": regions.TERMINOLOGY_CONTEXT,
            "@schema": SCHEMA, "SegmentationCodes": {"Category": [category]}}


def context_json() -> str:
    """:func:`context` as the text of the shipped file."""
    return json.dumps(context(), indent=2) + "\n"


def load(terminologies_logic, path: Optional[Path] = None) -> str:
    """Load the shipped context into Slicer's ``vtkSlicerTerminologiesModuleLogic`` and
    return its name; raises ``RuntimeError`` if the logic refuses the file or knows it
    under another name than the segments use (they would not resolve)."""
    path = Path(path) if path is not None else context_path()
    name = terminologies_logic.LoadTerminologyFromFile(str(path))
    if name != regions.TERMINOLOGY_CONTEXT:
        raise RuntimeError(f"terminology file {path} was not loaded as "
                           f"{regions.TERMINOLOGY_CONTEXT!r} (got {name!r})")
    return name


def load_into_slicer() -> None:
    """Slot for Slicer's ``startupCompleted()``, when the Terminologies module's logic
    exists: load the context into it. A failure is logged, not raised: the module works
    without it, only the codes do not resolve."""
    import slicer
    try:
        load(slicer.modules.terminologies.logic())
    except Exception as exc:
        logging.warning("BrainLobeSeg: terminology not loaded: %s", exc)


if __name__ == "__main__":
    context_path().parent.mkdir(parents=True, exist_ok=True)
    context_path().write_text(context_json(), encoding="utf-8")
    print(f"wrote {context_path()}")
