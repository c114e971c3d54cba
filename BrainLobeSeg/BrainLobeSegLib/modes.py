"""Segmentation modes: which networks run, and which runs by default.

Kept free of torch (and of everything else heavy) so that the Slicer panel and
:mod:`slicer_logic` can offer the modes before torch is installed; the engine
(:mod:`inference`), the CLI and the panel all take the names from here.
"""

from typing import Tuple

#: "planar": three 2D networks (axial, coronal, sagittal) fused; "3d": one 3D network;
#: "ensemble": both, fused.
MODES: Tuple[str, ...] = ("planar", "3d", "ensemble")

#: The mode with the best held-out Dice of the bundled models (see their model.json):
#: 3D 0.877, ensemble 0.873, multi-planar 0.855 (training/reports/heldout); 3D is also
#: the fastest.
DEFAULT_MODE = "3d"
