"""The overlay preview PNG (``demo``, ``segment --preview``): a picture that explains itself.

Two upright axial slices (the ganglionic and the supraganglionic ASPECTS level) with the
regions over the brain-windowed CT, each side labelled with its direction (A, P, and R/L
for the patient's right and left: the radiological view, the patient's right on the
image's left), a line that says so, and a legend of the 20 regions in their colours. A
picture without its orientation invites a left/right mistake, and one without a legend
cannot be read without the code.

Text is drawn with a small built-in 5 x 7 bitmap font, so the inference path still needs
only numpy and SimpleITK (no imaging or plotting package).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import geometry, output, regions

# 5 x 7 glyphs, upper case only: each is its character on one line, then 7 rows.
_FONT_SOURCE = """
A .###. #...# #...# ##### #...# #...# #...#
B ####. #...# #...# ####. #...# #...# ####.
C .###. #...# #.... #.... #.... #...# .###.
D ####. #...# #...# #...# #...# #...# ####.
E ##### #.... #.... ####. #.... #.... #####
F ##### #.... #.... ####. #.... #.... #....
G .###. #...# #.... #.### #...# #...# .###.
H #...# #...# #...# ##### #...# #...# #...#
I .###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.
J ..### ...#. ...#. ...#. ...#. #..#. .##..
K #...# #..#. #.#.. ##... #.#.. #..#. #...#
L #.... #.... #.... #.... #.... #.... #####
M #...# ##.## #.#.# #.#.# #...# #...# #...#
N #...# #...# ##..# #.#.# #..## #...# #...#
O .###. #...# #...# #...# #...# #...# .###.
P ####. #...# #...# ####. #.... #.... #....
Q .###. #...# #...# #...# #.#.# #..#. .##.#
R ####. #...# #...# ####. #.#.. #..#. #...#
S .#### #.... #.... .###. ....# ....# ####.
T ##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..
U #...# #...# #...# #...# #...# #...# .###.
V #...# #...# #...# #...# #...# .#.#. ..#..
W #...# #...# #...# #.#.# #.#.# #.#.# .#.#.
X #...# #...# .#.#. ..#.. .#.#. #...# #...#
Y #...# #...# .#.#. ..#.. ..#.. ..#.. ..#..
Z ##### ....# ...#. ..#.. .#... #.... #####
0 .###. #...# #..## #.#.# ##..# #...# .###.
1 ..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.
2 .###. #...# ....# ...#. ..#.. .#... #####
3 ##### ...#. ..#.. ...#. ....# #...# .###.
4 ...#. ..##. .#.#. #..#. ##### ...#. ...#.
5 ##### #.... ####. ....# ....# #...# .###.
6 ..##. .#... #.... ####. #...# #...# .###.
7 ##### ....# ...#. ..#.. .#... .#... .#...
8 .###. #...# #...# .###. #...# #...# .###.
9 .###. #...# #...# .#### ....# ...#. .##..
, ..... ..... ..... ..... .##.. ..#.. .#...
. ..... ..... ..... ..... ..... .##.. .##..
( ...#. ..#.. .#... .#... .#... ..#.. ...#.
) .#... ..#.. ...#. ...#. ...#. ..#.. .#...
' ..#.. ..#.. .#... ..... ..... ..... .....
- ..... ..... ..... ##### ..... ..... .....
: ..... .##.. .##.. ..... .##.. .##.. .....
/ ..... ....# ...#. ..#.. .#... #.... .....
; ..... .##.. .##.. ..... .##.. ..#.. .#...
% ##..# ##..# ...#. ..#.. .#... #..## #..##
"""


def _parse_font(source: str) -> Dict[str, np.ndarray]:
    font = {" ": np.zeros((7, 5), bool)}
    for line in source.strip().splitlines():
        char, *rows = line.split()
        font[char] = np.array([[c == "#" for c in row] for row in rows], bool)
    return font


FONT = _parse_font(_FONT_SOURCE)
BACKGROUND = (0, 0, 0)
TEXT = (255, 255, 255)
#: The line under the slices: what the picture shows and which way it faces.
ORIENTATION_NOTE = "Upright axial slices, anterior up, patient's right on the image's left (radiological view)"


def text_image(text: str, scale: int = 2, colour: Tuple[int, int, int] = TEXT) -> np.ndarray:
    """``text`` (upper-cased; unknown characters as blanks) as an RGB uint8 picture on
    black, one pixel between glyphs."""
    glyphs = [FONT.get(c, FONT[" "]) for c in text.upper()]
    width = max(1, 6 * len(glyphs) - 1)
    mask = np.zeros((7, width), bool)
    for i, g in enumerate(glyphs):
        mask[:, 6 * i:6 * i + 5] = g
    mask = np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1)
    out = np.zeros(mask.shape + (3,), np.uint8)
    out[mask] = colour
    return out


def _stack(pictures: Sequence[np.ndarray], axis: int, gap: int = 0, align: str = "start") -> np.ndarray:
    """Pictures side by side (``axis`` 1) or one below the other (0), padded with the
    background to a common size, ``gap`` pixels apart; ``align`` start or centre."""
    other = 1 - axis
    size = max(p.shape[other] for p in pictures)
    parts = []
    for k, p in enumerate(pictures):
        pad = size - p.shape[other]
        before = pad // 2 if align == "centre" else 0
        widths = [(0, 0), (0, 0), (0, 0)]
        widths[other] = (before, pad - before)
        parts.append(np.pad(p, widths))
        if gap and k < len(pictures) - 1:
            shape = list(parts[-1].shape)
            shape[axis] = gap
            parts.append(np.zeros(shape, np.uint8))
    return np.concatenate(parts, axis=axis)


def _framed(panel: np.ndarray, title: str, scale: int) -> np.ndarray:
    """A slice with its title above and A / P / R / L at its four sides."""
    margin = 10 * scale
    left, right = text_image("R", scale), text_image("L", scale)
    middle = _stack([left, panel, right], axis=1, gap=margin // 2, align="centre")
    return _stack([text_image(title, scale), text_image("A", scale), middle, text_image("P", scale)],
                  axis=0, gap=margin // 2, align="centre")


def legend(scale: int = 2, width: int = 0) -> np.ndarray:
    """The 20 regions: for each ASPECTS code a left and a right colour swatch and its name,
    in as many columns as fit in ``width`` pixels (one if 0)."""
    side = 7 * scale
    entries = []
    for r in regions.REGIONS[: regions.SIDE_OFFSET]:
        swatches = [np.full((side, side, 3), regions.REGION_BY_LABEL[label].color, np.uint8)
                    for label in (r.label, r.mirror_label)]
        entries.append(_stack(swatches + [text_image(f" {r.code}  {r.name}", scale)], axis=1, gap=scale))
    head = text_image("Regions: colour on the left side, on the right side (lighter)", scale)
    columns = 1
    entry_width = max(e.shape[1] for e in entries) + 6 * side
    while width and columns < len(entries) and (columns + 1) * entry_width <= width:
        columns += 1
    rows = -(-len(entries) // columns)
    cols = [_stack(entries[c * rows:(c + 1) * rows], axis=0, gap=scale * 3)
            for c in range(columns) if entries[c * rows:(c + 1) * rows]]
    return _stack([head, _stack(cols, axis=1, gap=4 * side)], axis=0, gap=scale * 4)


def level_slices(labels: np.ndarray) -> List[int]:
    """The axial slice (index along z) with most ganglionic, then most supraganglionic
    region voxels: the two levels ASPECTS is scored on."""
    out = []
    for level in ("ganglionic", "supraganglionic"):
        group = [r.label for r in regions.REGIONS if r.level == level]
        counts = np.isin(labels, group).sum(axis=(1, 2))
        out.append(int(np.argmax(counts)) if counts.any() else labels.shape[0] // 2)
    return out


def overlay_picture(hu: np.ndarray, labels: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """The whole preview as RGB uint8 from the upright model-grid CT and labels (z, y, x).

    Rows of a model-grid slice run anterior to posterior and columns from the patient's
    right to left (docs/DESIGN.md, geometry), so a slice as stored is the radiological view.
    """
    zoom = max(1, int(round(max(spacing_mm[:2]) / 0.5)))    # about 0.5 mm a pixel
    scale = 2
    panels = []
    for z, title in zip(level_slices(labels), ("Ganglionic level", "Supraganglionic level")):
        slice_rgb = output.overlay_slice(hu[z], labels[z])
        slice_rgb = np.repeat(np.repeat(slice_rgb, zoom, axis=0), zoom, axis=1)
        panels.append(_framed(slice_rgb, title, scale))
    return explained(_stack(panels, axis=1, gap=20 * scale), scale)


def explained(picture: np.ndarray, scale: int = 2) -> np.ndarray:
    """``picture`` (upright axial slices in the radiological view) with the orientation
    line and the legend of the 20 regions below it, and a margin."""
    note = text_image(ORIENTATION_NOTE, scale)
    out = _stack([picture, note, legend(scale, width=max(picture.shape[1], note.shape[1]))],
                 axis=0, gap=8 * scale, align="start")
    return np.pad(out, ((8 * scale,) * 2, (8 * scale,) * 2, (0, 0)))


def write_preview(result, scan: sitk.Image, transform: sitk.Transform, path: str) -> None:
    """The preview of a :class:`~inference.SegmentationResult` of ``scan`` as a PNG."""
    hu = geometry.upright_resample(scan, transform, result.grid)
    output.write_png(overlay_picture(hu, result.labels_grid, result.grid.spacing), path)
