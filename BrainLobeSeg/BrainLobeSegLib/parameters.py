"""The panel's parameter node, its choices, and the module's Logic class (Slicer only).

These need Slicer's ``parameterNodeWrapper`` and ``ScriptedLoadableModuleLogic``, which
the ``slicer-core`` wheel lacks, so they are kept apart from the headless modules; they
hold no decisions (those are in :mod:`panel`, :mod:`slicer_logic`). ``BrainLobeSeg.py``
imports the names, so scripts keep using ``BrainLobeSeg.BrainLobeSegLogic()``.

Light on purpose: Slicer imports the module file, and so this, at start-up, before
PyTorch may be installed (the engine is imported only when a run needs it).
"""

import enum

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTransformNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .modes import DEFAULT_MODE


class TransformSource(enum.Enum):
    """Where the upright transform R comes from (``slicer_logic.resolve_transform``)."""

    PARENT = "parent"
    ESTIMATE = "estimate"
    NODE = "node"
    NONE = "none"

    def label(self) -> str:
        return {
            "parent": _("The CT's own transform (as displayed)"),
            "estimate": _("Automatic estimate (added as a transform node to check)"),
            "node": _("Transform node below"),
            "none": _("None: the CT is already upright"),
        }[self.value]


class SegmentationMode(enum.Enum):
    """Which models run; the values are the engine's mode names (``modes.MODES``)."""

    THREE_D = "3d"
    PLANAR = "planar"
    ENSEMBLE = "ensemble"

    def label(self) -> str:
        return {
            "3d": _("3D (fastest and most accurate; recommended)"),
            "planar": _("Multi-planar (axial, coronal, sagittal)"),
            "ensemble": _("Ensemble (3D + multi-planar, slowest; adds an uncertainty map)"),
        }[self.value]


class ComputeDevice(enum.Enum):
    """Where the models run; the values are the engine's device names."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        return {
            "auto": _("Automatic (GPU if available)"),
            "cpu": _("CPU"),
            "cuda": _("GPU (CUDA)"),
        }[self.value]


class AspectsSide(enum.Enum):
    """The symptomatic side for the ASPECTS read-out (``slicer_logic.aspects_readout``)."""

    AUTO = "auto"
    LEFT = "left"
    RIGHT = "right"

    def label(self) -> str:
        return {
            "auto": _("Proposed from the scan (the reason is shown)"),
            "left": _("Left"),
            "right": _("Right"),
        }[self.value]


@parameterNodeWrapper
class BrainLobeSegParameterNode:
    """The panel's state, saved with the scene.

    Widgets named in the .ui file carry a ``SlicerParameterName`` property and are bound
    by ``connectGui``; the model folder is synchronised by hand (ctkPathLineEdit binds to
    ``pathlib.Path`` only, whose empty default would mean the current directory).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    transformSource: TransformSource = TransformSource.PARENT
    transformNode: vtkMRMLTransformNode
    invertTransform: bool = False
    mode: SegmentationMode = SegmentationMode(DEFAULT_MODE)
    device: ComputeDevice = ComputeDevice.AUTO
    modelFolder: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    aspectsSide: AspectsSide = AspectsSide.AUTO


class BrainLobeSegLogic(ScriptedLoadableModuleLogic):
    """The parameter node, plus the headless logic in ``self.core``.

    ``self.core`` is ``BrainLobeSegLib.slicer_logic.BrainLobeSegLogic``; scripts can use
    ``BrainLobeSegLogic().segment(volumeNode, ...)`` exactly as the panel does. The
    module name (``BrainLobeSeg``, which names the parameter node) comes from this
    class's name, as in every scripted module.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from .slicer_logic import BrainLobeSegLogic as CoreLogic  # numpy, SimpleITK: on use
        self.core = CoreLogic()

    def getParameterNode(self) -> BrainLobeSegParameterNode:
        return BrainLobeSegParameterNode(super().getParameterNode())

    def segment(self, volumeNode, **kwargs):
        """Blocking segmentation; see ``slicer_logic.BrainLobeSegLogic.segment``."""
        return self.core.segment(volumeNode, **kwargs)
