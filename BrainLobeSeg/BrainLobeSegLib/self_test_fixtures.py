"""What the module's self-test (``BrainLobeSeg.py``, ``BrainLobeSegTest``) builds its
checks from: tiny models, the phantom CT as a volume node, the phantom's regions as a
segmentation. Kept here so the module file stays thin and the fixtures are importable
(and tested) headless, on ``slicer-core``'s MRML.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    import SimpleITK as sitk

# Imported by the module file at start-up: numpy, SimpleITK and MRML helpers load only
# when a fixture is made.

#: The self-test's phantom head: upright, 48x48x32 voxels at 4 mm.
PHANTOM = dict(size=(48, 48, 32), spacing=(4.0, 4.0, 4.0), angles_deg=(0, 0, 0), seed=3)


def torch_ready() -> bool:
    """CI machines install PyTorch without asking, as other extensions' tests do."""
    from . import torch_install
    return torch_install.torch_available() or torch_install.install_without_asking()


def run_all(test) -> None:
    """Reload & Test: run every ``test_`` method of ``test`` (a ScriptedLoadableModuleTest)
    after its ``setUp``, then its ``tearDownClass``. Without PyTorch it logs and returns:
    a skip there would show as a failure."""
    if not torch_ready():
        logging.warning("BrainLobeSegTest: PyTorch is not installed; the self-test did not run.")
        return
    try:
        for name in sorted(n for n in dir(test) if n.startswith("test_")):
            test.setUp()
            getattr(test, name)()
    finally:
        test.tearDownClass()


class TinyModels:
    """A temporary folder with tiny randomly initialised models, made on first use."""

    def __init__(self) -> None:
        self._tmp: Optional[tempfile.TemporaryDirectory] = tempfile.TemporaryDirectory(
            prefix="BrainLobeSegTest-")

    def folder(self, kind: str = "3d") -> str:
        """A folder in the temporary folder; for "3d"/"planar" holding a tiny model."""
        from .models import make_tiny_model
        folder = os.path.join(self._tmp.name, kind)
        if kind in ("3d", "planar") and not os.path.isdir(folder):
            make_tiny_model(folder, kind)
        os.makedirs(folder, exist_ok=True)
        return folder

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp, tmp = None, self._tmp
            tmp.cleanup()


def volume_node(scene, image: "sitk.Image", name: str = "Phantom CT"):
    """A scalar volume node holding ``image``."""
    from . import slicer_tools
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    slicer_tools.update_volume_from_image(node, image)
    return node


def phantom_volume(scene):
    """The phantom CT (:data:`PHANTOM`) as a volume node."""
    from . import phantom
    return volume_node(scene, phantom.make_scan(**PHANTOM).ct)


def darker_region_case(scene, code: str = "M2", side: str = "left") -> Tuple[object, object]:
    """(CT volume, segmentation of its own regions) of the phantom with one region's
    parenchyma 8 HU darker (``phantom.lower_region``): an ASPECTS read-out needs no model."""
    import SimpleITK as sitk
    from . import phantom, regions, slicer_tools
    case = phantom.make_scan(**PHANTOM)
    ct = phantom.lower_region(case.ct, case.labels_scan, regions.region(code, side).label)
    volume = volume_node(scene, ct)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Phantom regions")
    slicer_tools.fill_segmentation(segmentation, sitk.GetArrayFromImage(case.labels_scan), volume)
    return volume, segmentation
