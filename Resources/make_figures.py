"""Draw the extension's icons and the figure of the panel (run: python Resources/make_figures.py).

3D Slicer cannot run where this project is built, so the README figure is a labelled
*drawing* of the panel made from the widget layout in BrainLobeSeg.ui, not a screenshot.
Colours come from the region table, so the pictures follow it.

Writes:
  Resources/BrainLobeSeg.png                        extension icon, 128x128
  BrainLobeSeg/Resources/Icons/BrainLobeSeg.png     module icon, 128x128
  Resources/Screenshots/BrainLobeSeg-panel.png      drawing of the panel
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "BrainLobeSeg"))

from BrainLobeSegLib import regions  # noqa: E402  (path set above)


def _rgb(code: str, side: str):
    return regions.region(code, side).color


def draw_icon(path: Path, size: int = 128) -> None:
    """An axial head: skull ring, and the ASPECTS cortex sectors and deep nuclei in colour."""
    from PIL import Image, ImageDraw

    scale = 4                                   # draw large, then downsample (anti-aliasing)
    s = size * scale
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle([0, 0, s - 1, s - 1], radius=22 * scale, fill=(28, 34, 48, 255))
    cx, cy = s / 2, s / 2 + 2 * scale
    rx, ry = 50 * scale, 58 * scale
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=(225, 225, 225, 255))        # skull
    bx, by = rx - 6 * scale, ry - 6 * scale
    d.ellipse([cx - bx, cy - by, cx + bx, cy + by], fill=(70, 70, 78, 255))           # brain
    # Radiological view: anterior up, the patient's left on the image's right. PIL angles
    # run clockwise from 3 o'clock; the patient's right side mirrors them (180 - angle).
    sectors = [("M1", -80, -30), ("M2", -30, 20), ("M3", 20, 70)]
    for side in ("left", "right"):
        for code, a0, a1 in sectors:
            start, end = (a0, a1) if side == "left" else (180 - a1, 180 - a0)
            d.pieslice([cx - bx, cy - by, cx + bx, cy + by], start, end,
                       fill=_rgb(code, side) + (255,))
    d.ellipse([cx - bx * 0.72, cy - by * 0.72, cx + bx * 0.72, cy + by * 0.72], fill=(70, 70, 78, 255))
    d.line([cx, cy - by, cx, cy + by], fill=(28, 34, 48, 255), width=3 * scale)       # midline
    for side, sign in (("right", -1), ("left", 1)):
        ox = cx + sign * 14 * scale
        d.ellipse([ox - 6 * scale, cy - 22 * scale, ox + 6 * scale, cy - 6 * scale],
                  fill=_rgb("C", side) + (255,))
        lx = cx + sign * 25 * scale
        d.ellipse([lx - 8 * scale, cy - 12 * scale, lx + 8 * scale, cy + 14 * scale],
                  fill=_rgb("L", side) + (255,))
        ix = cx + sign * 38 * scale
        d.rounded_rectangle([ix - 3 * scale, cy - 20 * scale, ix + 3 * scale, cy + 20 * scale],
                            radius=3 * scale, fill=_rgb("I", side) + (255,))
    img = img.resize((size, size), Image.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def draw_panel(path: Path) -> None:
    """A labelled drawing of the module panel, following BrainLobeSeg.ui."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch, Rectangle

    W, H = 520, 1160
    fig = plt.figure(figsize=(W / 100, H / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.axis("off")
    fig.patch.set_facecolor("#f4f4f4")
    grey, blue, text = "#c8c8c8", "#2f6db5", "#202020"

    def box(x, y, w, h, face="white", edge=grey, r=3, lw=1):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={r}",
                                    facecolor=face, edgecolor=edge, linewidth=lw))

    def label(x, y, s, **kw):
        ax.text(x, y, s, va="center", fontsize=kw.pop("size", 9), color=kw.pop("color", text), **kw)

    def combo(x, y, w, s):
        box(x, y - 11, w, 22)
        label(x + 6, y, s)
        label(x + w - 14, y, "\u25be", size=9)

    def section(y, title, h):
        box(12, y, W - 24, h, face="#ffffff", edge="#b0b0b0")
        box(12, y, W - 24, 24, face="#e6e6e6", edge="#b0b0b0")
        label(22, y + 12, "\u25bc  " + title, weight="bold")

    def callout(n, x, y):
        ax.add_patch(plt.Circle((x, y), 10, color="#d6332a"))
        ax.text(x, y, str(n), ha="center", va="center", color="white", fontsize=9, weight="bold")

    label(W / 2, 18, "Drawing of the BrainLobeSeg panel (not a screenshot)", ha="center",
          size=11, weight="bold")
    label(W / 2, 36, "laid out as in BrainLobeSeg.ui; red numbers = steps in the README",
          ha="center", size=8, color="#555555")

    y = 52
    section(y, "Input CT and head pose", 228)
    col = 170
    rows = [("Head CT:", "combo", "Case 7 CT"),
            ("Upright transform:", "combo", "Transform node below"),
            ("Transform node:", "combo", "7 (ITK-SNAP)")]
    yy = y + 44
    for name, kind, value in rows:
        label(26, yy, name)
        combo(col, yy, W - col - 26, value)
        yy += 32
    box(26, yy - 12, W - 52, 24, face="#fafafa")
    label(W / 2, yy, "Load ITK-SNAP transform...", ha="center")
    yy += 32
    label(26, yy, "Invert transform:")
    box(col, yy - 7, 14, 14)
    yy += 24
    label(26, yy, "'7' maps the upright head onto the CT.", size=8, color="#444444")
    callout(1, W - 12, y + 44)
    callout(2, W - 12, y + 140)

    y = 292
    section(y, "Model", 150)
    yy = y + 44
    for name, value in (("Mode:", "3D (fastest)"), ("Device:", "Automatic (GPU if available)")):
        label(26, yy, name)
        combo(col, yy, W - col - 26, value)
        yy += 32
    label(26, yy, "Model folder:")
    box(col, yy - 11, W - col - 26, 22)
    label(col + 6, yy, "(empty: bundled models)", color="#888888")
    yy += 28
    # the line the panel shows under the model folder, from the bundled cards (needs the
    # slicer-core wheel of the test extras)
    from BrainLobeSegLib.panel import model_description
    label(26, yy, model_description(None), size=7.5, color="#444444")

    y = 454
    section(y, "Output", 64)
    label(26, y + 44, "Segmentation:")
    combo(col, y + 44, W - col - 26, "Create new segmentation")

    y = 532
    box(12, y, W - 24, 32, face=blue, edge=blue)
    label(W / 2, y + 16, "Segment", ha="center", color="white", weight="bold", size=10)
    label(W / 2, y + 44, "(turns into Cancel while running)", ha="center", size=8, color="#555555")
    callout(3, W - 12, y + 16)
    y = 590
    box(12, y, W - 24, 18)
    ax.add_patch(Rectangle((13, y + 1), (W - 26) * 0.62, 16, color="#5a9bd8"))
    label(W / 2, y + 9, "62%", ha="center", size=8)
    label(14, y + 34, "3D window 5/8", size=8.5)
    y = 650
    section(y, "Results", 118)
    for k, (name, step) in enumerate((("Open in Segment Editor", 4), ("Region statistics", None),
                                      ("Save case for training...", None))):
        yy = y + 32 + k * 28
        box(26, yy, W - 52, 22, face="#fafafa")
        label(W / 2, yy + 11, name, ha="center")
        if step:
            callout(step, W - 12, yy + 11)

    y = 780
    section(y, "ASPECTS (decision support)", 236)
    label(26, y + 44, "Symptomatic side:")
    combo(col, y + 44, W - col - 26, "Proposed from the scan (the reason is shown)")
    box(26, y + 64, W - 52, 22, face="#fafafa")
    label(W / 2, y + 75, "Read out ASPECTS", ha="center")
    callout(6, W - 12, y + 75)
    label(26, y + 102, "ASPECTS left: 9 (left 9, right 10). Symptomatic side: left,", size=8.5, weight="bold")
    label(26, y + 118, "proposed (1 region(s) affected on the left ...). Affected: M2 left. ...", size=8,
          color="#444444")
    columns = ("region", "affected", "darker share", "drop (HU)")
    rows_t = (("M2 left", "\u2611", "0.86", "-5.1"), ("M2 right", "\u2610", "0.04", "-0.3"),
              ("M3 left", "\u2610", "0.06", "-0.4"))
    for r, cells in enumerate((columns,) + rows_t):
        yy = y + 134 + r * 18
        box(26, yy, W - 52, 18, face="#e6e6e6" if r == 0 else "white")
        for c, cell in enumerate(cells):
            red = r == 1 and c == 0
            label(32 + c * 118, yy + 9, cell, size=8, color="#d6332a" if red else text)
    label(14, y + 222, "Decision support, not a diagnosis: read the images.", size=8, color="#444444")
    label(14, y + 250, "Research and decision support only, not a medical device:", size=8,
          color="#444444")
    label(14, y + 264, "check and correct every region.", size=8, color="#444444")

    # Legend of the 20 segments the result holds.
    y = 1085
    label(14, y, "Result: 20 segments (left = patient's left; right side lighter)", size=8.5,
          weight="bold")
    for i, code in enumerate(regions.CODES):
        x = 14 + (i % 5) * 100
        yy = y + 20 + (i // 5) * 22
        for k, side in enumerate(("left", "right")):
            r, g, b = _rgb(code, side)
            ax.add_patch(Rectangle((x + k * 13, yy - 6), 12, 12, color=(r / 255, g / 255, b / 255)))
        label(x + 30, yy, code, size=8.5)
    callout(5, W - 12, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, facecolor=fig.get_facecolor())
    plt.close(fig)


def main() -> None:
    draw_icon(ROOT / "Resources" / "BrainLobeSeg.png")
    draw_icon(ROOT / "BrainLobeSeg" / "Resources" / "Icons" / "BrainLobeSeg.png")
    draw_panel(ROOT / "Resources" / "Screenshots" / "BrainLobeSeg-panel.png")


if __name__ == "__main__":
    main()
