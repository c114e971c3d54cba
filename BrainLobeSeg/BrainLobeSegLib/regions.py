"""The one table of the 20 ASPECTS regions: label ids, names, colours, terminology.

Everything else (engine, Slicer output, training, statistics, tests) reads this module
instead of repeating ids or names, so a change here is a change everywhere.

Label convention (docs/DESIGN.md section 1): 0 is background, 1-10 the patient's left side,
11-20 the right side in the same order; ``id_right = id_left + 10``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

#: Number of foreground labels; the models predict ``NUM_LABELS + 1`` classes.
NUM_LABELS = 20
BACKGROUND = 0
SIDE_OFFSET = 10

# SNOMED CT codes for the structures that have one; M1-M6 are ASPECTS-specific cortical
# territories with no SNOMED concept, so they use the project-defined coding scheme below.
PROJECT_SCHEME = "BrainLobeSeg"
SCT = "SCT"
SCT_LEFT = ("SCT", "7771000", "Left")
SCT_RIGHT = ("SCT", "24028007", "Right")

#: The terminology context every segment's ``TerminologyEntry`` names; Slicer resolves
#: the codes from the ``.term.json`` file :mod:`terminology` writes under this name.
TERMINOLOGY_CONTEXT = "Segmentation category and type - BrainLobeSeg ASPECTS"
#: Category of every region: SNOMED CT "Anatomical structure" (as in Slicer's lists).
CATEGORY_CODE = ("SCT", "123037004", "Anatomical Structure")


@dataclass(frozen=True)
class Region:
    """One ASPECTS region on one side."""

    label: int                 # voxel value in label maps
    code: str                  # ASPECTS code: C, L, IC, I, M1..M6
    side: str                  # "left" or "right" (patient's side)
    name: str                  # human-readable structure name
    level: str                 # "ganglionic" or "supraganglionic"
    color: Tuple[int, int, int]  # RGB 0-255, same hue for both sides, right one lighter
    type_code: Tuple[str, str, str]  # (scheme, code value, meaning) of the structure

    @property
    def segment_name(self) -> str:
        """Name shown in Slicer and written in .seg.nrrd files, e.g. ``M4 left``."""
        return f"{self.code} {self.side}"

    @property
    def mirror_label(self) -> int:
        """Label of the same region on the other side."""
        return self.label + SIDE_OFFSET if self.side == "left" else self.label - SIDE_OFFSET

    @property
    def side_modifier(self) -> Tuple[str, str, str]:
        return SCT_LEFT if self.side == "left" else SCT_RIGHT

    @property
    def color_float(self) -> Tuple[float, float, float]:
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]


# (code, name, level, left colour, structure code); order defines ids 1-10 and 11-20.
_LEFT_TABLE = [
    ("C", "caudate", "ganglionic", (230, 159, 0), (SCT, "11000004", "Caudate nucleus")),
    # Codes checked against DICOM PS3.16 (CID 7153 caudate, insula; CID 7702 internal
    # capsule) and Slicer's terminology JSON. 87463005, once used for L, is "Cerebral
    # fornix"; no SNOMED code for the lentiform nucleus is in those lists, so L uses the
    # project scheme rather than an unverified number.
    ("L", "lentiform nucleus", "ganglionic", (213, 94, 0),
     (PROJECT_SCHEME, "L", "ASPECTS L lentiform nucleus")),
    ("IC", "internal capsule", "ganglionic", (240, 228, 66), (SCT, "85637007", "Internal capsule")),
    ("I", "insular ribbon", "ganglionic", (204, 121, 167), (SCT, "36169008", "Insula")),
    ("M4", "anterior MCA cortex", "supraganglionic", (0, 114, 178),
     (PROJECT_SCHEME, "M4", "ASPECTS M4 anterior MCA cortex")),
    ("M5", "lateral MCA cortex", "supraganglionic", (0, 158, 115),
     (PROJECT_SCHEME, "M5", "ASPECTS M5 lateral MCA cortex")),
    ("M6", "posterior MCA cortex", "supraganglionic", (86, 180, 233),
     (PROJECT_SCHEME, "M6", "ASPECTS M6 posterior MCA cortex")),
    ("M1", "anterior MCA cortex", "ganglionic", (120, 94, 240),
     (PROJECT_SCHEME, "M1", "ASPECTS M1 anterior MCA cortex")),
    ("M2", "lateral MCA cortex (anterior temporal)", "ganglionic", (220, 38, 127),
     (PROJECT_SCHEME, "M2", "ASPECTS M2 lateral MCA cortex")),
    ("M3", "posterior MCA cortex", "ganglionic", (100, 143, 70),
     (PROJECT_SCHEME, "M3", "ASPECTS M3 posterior MCA cortex")),
]


def _lighter(rgb: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """Right-side colour: same hue, mixed 35 % towards white, so sides are told apart."""
    return tuple(int(round(c + 0.35 * (255 - c))) for c in rgb)  # type: ignore[return-value]


def _build() -> List[Region]:
    regions = []
    for side, offset in (("left", 0), ("right", SIDE_OFFSET)):
        for i, (code, name, level, color, type_code) in enumerate(_LEFT_TABLE, start=1):
            regions.append(Region(
                label=i + offset, code=code, side=side, name=name, level=level,
                color=color if side == "left" else _lighter(color), type_code=type_code))
    return regions


#: All 20 regions, ordered by label id (1..20).
REGIONS: List[Region] = _build()
REGION_BY_LABEL: Dict[int, Region] = {r.label: r for r in REGIONS}
LABELS: List[int] = [r.label for r in REGIONS]
CODES: List[str] = [code for code, *_ in _LEFT_TABLE]


def region(code: str, side: str) -> Region:
    """Look a region up by ASPECTS code and side, e.g. ``region("M4", "left")``."""
    for r in REGIONS:
        if r.code == code and r.side == side:
            return r
    raise KeyError(f"no region {code!r} on side {side!r}")


def mirror_lut() -> List[int]:
    """Lookup table ``lut[label] -> label of the mirrored side`` (0 stays 0).

    Used wherever an image is flipped left-right: flipping the pixels alone would leave
    a left caudate labelled "left" on the right side of the head.
    """
    lut = [0] * (NUM_LABELS + 1)
    for r in REGIONS:
        lut[r.label] = r.mirror_label
    return lut


def label_table() -> List[dict]:
    """The table as plain data, as written into ``model.json`` and checked on load."""
    return [{"label": r.label, "code": r.code, "side": r.side, "name": r.name,
             "color": list(r.color)} for r in REGIONS]


def terminology_entry(r: Region) -> str:
    """Slicer's terminology string for a segment (``vtkSegment`` tag ``TerminologyEntry``).

    Format: context~category~type~typeModifier~anatomicContext~anatomicRegion~regionModifier,
    each code as ``scheme^value^meaning``. Category is "Anatomical structure".
    """
    category = "^".join(CATEGORY_CODE)
    type_ = "^".join(r.type_code)
    modifier = "^".join(r.side_modifier)
    return (f"{TERMINOLOGY_CONTEXT}~{category}~{type_}~{modifier}"
            "~Anatomic codes - DICOM master list~^^~^^")
