"""Segmentation modes: which networks run, and which runs by default.

Kept free of torch (and of everything else heavy) so that the Slicer panel and
:mod:`slicer_logic` can offer the modes before torch is installed; the engine
(:mod:`inference`), the CLI and the panel all take the names from here.
"""

from typing import Tuple

#: "planar": three 2D networks (axial, coronal, sagittal) fused; "3d": one 3D network;
#: "ensemble": both, fused.
MODES: Tuple[str, ...] = ("planar", "3d", "ensemble")

#: The kind whose bundled model has the best held-out mean Dice in its model.json
#: (Testing/test_bundled_models.py holds it to that); 3D is also the fastest.
DEFAULT_MODE = "3d"
