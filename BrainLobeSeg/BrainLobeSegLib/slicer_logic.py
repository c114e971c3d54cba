"""The Slicer module's workflow: MRML nodes in, a 20-segment segmentation node out.

One job: the steps of a segmentation and what is done with its result, and the state
they share (:class:`SegmentationJob`). The conversions and node builders it uses are in
:mod:`slicer_tools`; the imports run one way (here -> ``slicer_tools``), never back.

Everything here uses only what the ``slicer-core`` pip wheel also provides
(``vtkMRMLScene`` and its nodes, ``vtkSegment``/``vtkOrientedImageData``,
``slicer.util`` array helpers). Nothing touches ``slicer.app``, ``slicer.mrmlScene`` or
Qt, so the same code runs inside 3D Slicer and, headless, in the pytest suite on a plain
``vtkMRMLScene``. The scene is always taken from the nodes passed in.

Work is split in three parts so that a GUI can keep responding:

1. :meth:`BrainLobeSegLogic.prepare` (fast): copies the CT voxels and geometry out of
   the volume node and resolves the transform choice into ``R`` (DESIGN.md section 2).
   After this, nothing from MRML is needed.
2. :meth:`BrainLobeSegLogic.run_steps` (slow, in short steps, see :mod:`steps`): the
   engine, pure numpy/SimpleITK/torch, including the automatic pose estimate and its
   check against the regions found. Inside Slicer the panel runs one step after
   another from a ``QTimer`` on the main thread (a Python thread would crawl there:
   the main thread holds the GIL while Qt idles); :meth:`BrainLobeSegLogic.run` runs
   them in a plain loop for scripts. Progress goes to a callback; closing the
   generator (or a cancel callback, for :meth:`~BrainLobeSegLogic.run`) cancels it.
3. :meth:`BrainLobeSegLogic.create_output` (fast): builds the segmentation node and,
   for an automatic estimate, the transform node of the pose the run used. Only now is
   anything added to the scene, so a cancelled or failed run leaves the scene exactly
   as it was.

:meth:`BrainLobeSegLogic.segment` runs the three in a row for scripts and tests.

After a run, on the main thread, the panel's Results section uses
:meth:`~BrainLobeSegLogic.create_uncertainty` (member disagreement on the CT grid),
:meth:`~BrainLobeSegLogic.statistics_table` (per-region volumes and densities of the
segmentation as corrected), :meth:`~BrainLobeSegLogic.aspects_readout` (the ASPECTS
read-out: scores, a table with the clinician's overrides, the evidence volume, the
affected regions highlighted) and :meth:`~BrainLobeSegLogic.save_case` (the corrected case
as training data, with the ``R`` of the run). Before a run,
:meth:`~BrainLobeSegLogic.estimate_upright_transform` offers an automatic ``R`` as a
transform node for the user to check.

The engine (torch) is imported when a run loads its models
(:meth:`BrainLobeSegLogic.segmenter`) only, so this module imports without PyTorch and
the Slicer module can offer to install it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import slicer

from . import slicer_tools, steps, transforms
from .quality import require_regions
from .errors import Cancelled, InputError, InputWarning
from .modes import DEFAULT_MODE
from .slicer_tools import (add_upright_transform_node, check_volume, fill_segmentation, ijk_to_ras,
                           image_from_volume_node, remove_node, transform_from_node,
                           transform_name)

ProgressFn = steps.ProgressFn
CancelFn = Callable[[], bool]

#: Where ``R`` comes from: the volume's own parent transform, a chosen transform node,
#: or nowhere (identity: the scan is taken as upright).
TRANSFORM_SOURCES = ("parent", "node", "none", "estimate")

NOTICE = ("BrainLobeSeg result: automatic ASPECTS region segmentation for research and "
          "decision support. Not a medical device; check and correct before use.")

#: Attribute text of an automatically estimated transform node.
ESTIMATE_NOTE = ("automatic estimate (mid-sagittal plane and the bundled reference head): check "
                 "that the head looks upright with it")

#: What a job with an automatic estimate says before its run has made the estimate.
ESTIMATE_PENDING = "an automatic estimate of the head pose (made first, then checked against the regions found)"


# ----------------------------------------------------------------------------- transforms

def resolve_transform(volume_node, source: str = "parent", transform_node=None,
                      invert: bool = False) -> Tuple[sitk.AffineTransform, str]:
    """``R`` for a segmentation, from the user's choice, and a one-line description.

    - ``parent``: the volume's parent transform (identity if it has none): the CT is
      segmented as it is displayed, which is how a user checks that the head looks
      upright before pressing Segment.
    - ``node``: any linear transform node, applied to the volume or not.
    - ``none``: identity; the scan is taken as upright.
    - ``estimate`` is not resolved here: the pose is estimated during the run
      (:meth:`BrainLobeSegLogic.run_steps`), not before it.

    ``invert`` inverts whichever transform is chosen (never guessed).
    """
    if source not in TRANSFORM_SOURCES or source == "estimate":
        raise InputError(f"unknown transform choice {source!r}.",
                         f"Use one of {', '.join(s for s in TRANSFORM_SOURCES if s != 'estimate')}.")
    if source == "parent":
        transform_node = volume_node.GetParentTransformNode() if volume_node is not None else None
        if transform_node is None:
            return transforms.identity(), "no transform (the CT has no parent transform)"
    elif source == "node":
        if transform_node is None:
            raise InputError("'transform node' was chosen but no transform node is selected.",
                             "Select a transform node, load an ITK-SNAP transform, or choose "
                             "another transform option.")
    else:
        return transforms.identity(), "no transform (the CT is taken as upright)"
    R = transform_from_node(transform_node, invert)
    angle = transforms.rotation_angle_deg(R)
    return R, (f"transform {transform_name(transform_node)}{' inverted' if invert else ''} "
               f"(rotates by {angle:.1f} degrees)")


# ----------------------------------------------------------------------------- logic

def _scene_of_job(job: "SegmentationJob"):
    """The scene of a job's CT, checking that the CT still has the grid it was segmented on.

    Everything built from a result (segmentation, uncertainty, a saved case) assumes the
    CT's voxel grid of :meth:`BrainLobeSegLogic.prepare`; a CT that was removed,
    resampled or moved since would silently get misplaced labels.
    """
    volume = job.volume_node
    scene = volume.GetScene() if volume is not None else None
    if scene is None or volume.GetImageData() is None:
        raise InputError("the segmented CT volume is no longer in the scene.",
                         "Load it again and press Segment.")
    if (tuple(volume.GetImageData().GetDimensions()) != tuple(job.dimensions)
            or not np.allclose(ijk_to_ras(volume), job.ijk_to_ras)):
        raise InputError(f"the CT '{volume.GetName()}' changed while it was being segmented or "
                         "afterwards (its voxel grid or position is not the same).",
                         "Press Segment again.")
    return scene


@dataclass
class SegmentationJob:
    """Everything the engine needs, copied out of MRML (the run reads no node).

    With ``estimate_pose`` the run estimates ``R`` itself; ``transform`` is the identity
    until a run succeeds, which sets ``transform`` and ``pose_estimate`` to the pose the
    result was made with; :meth:`BrainLobeSegLogic.create_output` then adds that pose as
    ``estimated_node`` and describes it in ``transform_description``.
    """

    volume_node: Any                 # kept to build the output; not touched by run()
    scan: Optional[sitk.Image]       # voxel copy with exact geometry (LPS)
    transform: sitk.AffineTransform  # R: upright -> scan
    transform_description: str
    mode: str = DEFAULT_MODE
    device: str = "auto"
    model_dir: Optional[Path] = None
    fusion: str = "mean"
    ijk_to_ras: np.ndarray = field(default_factory=lambda: np.eye(4))
    dimensions: Tuple[int, int, int] = (0, 0, 0)
    warnings: List[str] = field(default_factory=list)
    estimate_pose: bool = False      # R is estimated by the run (the "estimate" choice)
    pose_estimate: Any = None        # alignment.PoseEstimate of a successful such run
    estimated_node: Any = None       # the transform node create_output added for it

    def without_scan(self) -> "SegmentationJob":
        """A copy without the voxel copy, for keeping after the run.

        The panel keeps the last job to save the case later with the same ``R``; the scan
        copy is as large as the CT itself and no longer needed then (saving reads the
        node, which is what the user may have looked at since). Such a job cannot be run.
        """
        return replace(self, scan=None)


def _in_scene(node) -> bool:
    return node is not None and node.GetScene() is not None


@dataclass
class AspectsReadout:
    """An ASPECTS read-out in the scene (:meth:`BrainLobeSegLogic.aspects_readout`).

    ``result`` is the engine's ``aspects.AspectsResult`` (calls, overrides, scores);
    ``table`` and ``evidence`` are its nodes, any of which the user may delete;
    ``side_choice`` is "auto" (the proposed side) or the side the user chose;
    ``warnings`` what the read-out said about its input (e.g. a read-out card fitted with
    other settings), shown with the scores.
    """

    segmentation: Any
    volume: Any
    result: Any
    table: Any
    evidence: Any
    side_choice: str = "auto"
    warnings: List[str] = field(default_factory=list)

    def score(self, side: Optional[str] = None) -> int:
        """ASPECTS of ``side`` (default: the symptomatic side), overrides counted."""
        return self.result.score(side)


class BrainLobeSegLogic:
    """Segments a CT volume node into a 20-segment segmentation node, without a GUI.

    Loaded models are cached per (mode, model folder, device, fusion), so repeated runs
    skip loading. Runs happen on the calling thread, one at a time per instance (the GUI
    allows no more).
    ``segmenter_options`` go to the engine's ``Segmenter`` (e.g. ``threads``,
    ``batch_size``, ``refine_mm``); the defaults are the engine's.
    """

    def __init__(self, segmenter_options: Optional[Dict[str, Any]] = None) -> None:
        self._segmenters: Dict[tuple, Any] = {}
        self.segmenter_options: Dict[str, Any] = dict(segmenter_options or {})

    # -- part 1
    def prepare(self, volume_node, transform_source: str = "parent", transform_node=None,
                invert: bool = False, mode: str = DEFAULT_MODE, device: str = "auto",
                model_dir: Optional[os.PathLike] = None, fusion: str = "mean") -> SegmentationJob:
        """Copy the CT and resolve ``R``; raises :class:`InputError` on unusable input.

        Transform warnings (mirroring, scaling) are collected in ``job.warnings`` for the
        caller to show, instead of going to a console nobody reads.

        ``transform_source="estimate"`` (the panel's default for a CT without a transform)
        leaves ``R`` to the run (``job.estimate_pose``): it is estimated in steps and
        checked against the regions found, like the command line does. Its transform node
        is added with the result (:meth:`create_output`), so that the user can inspect and
        correct the pose the result was made with, and a cancelled or failed run adds
        nothing. The CT is never moved under the node.
        """
        check_volume(volume_node)
        estimate_pose = transform_source == "estimate"
        if estimate_pose:
            if invert:
                raise InputError("an automatic estimate cannot be inverted.",
                                 "Untick 'Invert transform', or choose a transform node.")
            transform_source = "none"    # the identity until the run has estimated R
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", transforms.TransformWarning)
            R, description = resolve_transform(volume_node, transform_source, transform_node, invert)
        scan = image_from_volume_node(volume_node)
        if estimate_pose:
            description = ESTIMATE_PENDING
        return SegmentationJob(
            volume_node=volume_node, scan=scan, transform=R, transform_description=description,
            mode=mode, device=device, model_dir=Path(model_dir) if model_dir else None,
            fusion=fusion, ijk_to_ras=ijk_to_ras(volume_node),
            dimensions=tuple(volume_node.GetImageData().GetDimensions()),
            warnings=[str(w.message) for w in caught
                      if issubclass(w.category, transforms.TransformWarning)],
            estimate_pose=estimate_pose)

    # -- part 2
    def segmenter(self, mode: str, model_dir: Optional[Path], device: str, fusion: str = "mean"):
        """The engine's :class:`inference.Segmenter` for these settings (loaded once)."""
        from .inference import Segmenter   # torch: imported only when segmenting
        key = (mode, str(model_dir) if model_dir else "", device, fusion)
        if key not in self._segmenters:
            self._segmenters[key] = Segmenter(mode, model_dir, device, fusion, **self.segmenter_options)
        return self._segmenters[key]

    def run(self, job: SegmentationJob, progress: Optional[ProgressFn] = None,
            cancel: Optional[CancelFn] = None):
        """:meth:`run_steps` in a plain loop (scripts, tests, the self-test).

        Returns the engine's ``SegmentationResult``; raises ``Cancelled`` when ``cancel()``
        turned true (checked between steps) and ``InputError`` for unusable input.
        """
        return steps.run_steps(self.run_steps(job, progress, cancel))

    def run_steps(self, job: SegmentationJob, progress: Optional[ProgressFn] = None,
                  cancel: Optional[CancelFn] = None) -> "steps.Steps[Any]":
        """The engine on a prepared job, in short steps (see :mod:`steps`); reads no MRML.

        Loads the models, then segments with ``job.transform``; with ``job.estimate_pose``
        it first estimates the pose (:func:`alignment.estimate_pose_steps`) and segments
        with the check against the regions found
        (:func:`region_pose.segment_with_pose_steps`), the data flow of the command line,
        so the panel and ``brainlobeseg segment`` give the same pose. A result without any
        region is an ``InputError``. Only a successful run changes the job (the pose it
        used, see :class:`SegmentationJob`). The panel cancels by closing the generator;
        ``cancel()`` is also checked between steps for the plain loop of :meth:`run`.
        """
        report = progress or (lambda fraction, message: None)
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")
        report(0.0, "loading the models")
        yield                                   # the message shows before the loading
        segmenter = self.segmenter(job.mode, job.model_dir, job.device, job.fusion)
        yield
        if not job.estimate_pose:
            result = yield from segmenter.segment_steps(job.scan, job.transform, progress=report,
                                                        cancel=cancel)
            require_regions(result.quality)   # an InputError: nothing is added to the scene
            return result
        from . import alignment, region_pose
        est = yield from _checking(cancel, alignment.estimate_pose_steps(
            job.scan, progress=lambda f, m: report(0.1 * f, f"head pose: {m}")))
        result, pose = yield from region_pose.segment_with_pose_steps(
            segmenter, job.scan, alignment.PoseChoice(est.transform, "estimated", est),
            progress=lambda f, m: report(0.1 + 0.9 * f, m), cancel=cancel)
        require_regions(result.quality)
        job.transform, job.pose_estimate = pose.transform, pose.estimate
        return result

    # -- part 3
    def create_output(self, job: SegmentationJob, result, output_node=None,
                      name: Optional[str] = None):
        """The segmentation node for a finished run (new, or ``output_node`` refilled).

        The CT must be unchanged since :meth:`prepare` (same grid); otherwise the labels
        would not fit it and nothing is written. A refilled node gets its old content
        back if filling fails; a new node is removed.

        An ``output_node`` that has left the scene (the user deleted it while the engine
        ran) is not refilled, because a node outside the scene is lost with its content:
        a new node with its name is added instead. Callers tell the user when the
        returned node is not ``output_node``.

        A run that estimated the pose also gets its transform node here (``job.estimated_node``,
        the final, region-checked pose), so the user can check the pose the result was
        made with; it is removed again if the segmentation cannot be written.
        """
        volume = job.volume_node
        scene = _scene_of_job(job)
        labels = sitk.GetArrayFromImage(result.labels_scan).astype(np.uint8, copy=False)
        if output_node is not None and output_node.GetScene() is None:
            name = name or output_node.GetName()
            output_node = None
        if job.pose_estimate is not None and not (job.estimated_node is not None
                                                  and job.estimated_node.GetScene() is scene):
            job.estimated_node = self._add_estimate_node(volume, job.pose_estimate)
            job.transform_description = estimate_description(job.estimated_node)
        try:
            node = self._fill_output(job, labels, output_node, name)
        except Exception:
            if job.estimated_node is not None:   # nothing of a failed output stays
                remove_node(scene, job.estimated_node)
                job.estimated_node = None
            raise
        node.SetAttribute("BrainLobeSeg.notice", NOTICE)
        node.SetAttribute("BrainLobeSeg.mode", str(getattr(result, "mode", job.mode)))
        node.SetAttribute("BrainLobeSeg.models", ", ".join(getattr(result, "model_names", [])))
        node.SetAttribute("BrainLobeSeg.transform", job.transform_description)
        node.SetAttribute("BrainLobeSeg.sourceVolume", volume.GetID())
        report = getattr(result, "quality", None)
        node.SetAttribute("BrainLobeSeg.qualityProblems",
                          "; ".join(report.problems) if report is not None else "")
        return node

    @staticmethod
    def _fill_output(job: SegmentationJob, labels: np.ndarray, output_node, name: Optional[str]):
        """``output_node`` refilled (its old content back on failure), or a new node."""
        volume = job.volume_node
        scene = volume.GetScene()
        if output_node is not None:
            backup = slicer.vtkSegmentation()
            backup.DeepCopy(output_node.GetSegmentation())
            try:
                fill_segmentation(output_node, labels, volume)
            except Exception:
                output_node.GetSegmentation().DeepCopy(backup)
                raise
            node = output_node
        else:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                           name or f"{volume.GetName()} ASPECTS regions")
            try:
                fill_segmentation(node, labels, volume)
            except Exception:
                remove_node(scene, node)
                raise
        return node

    # -- after a run (main thread): what the Results section of the panel offers
    def create_uncertainty(self, job: SegmentationJob, result, name: Optional[str] = None):
        """A scalar volume node of member disagreement on the CT's grid, or None.

        The value is the fraction of independent members (each plane of a planar model,
        each 3D model) whose label differs from the fused one, so 0 where all agree. The
        planar models' own fused labels are not counted next to their planes, which is
        why the names come from the segmenter that ran (cached by :meth:`run`). A run with
        fewer than two independent members (3D mode with one model) has nothing to
        compare: None is returned and nothing is added, rather than a volume of zeros or
        a probability-based measure that means something else.

        The node lies on the CT's own grid under the CT's parent transform, so it
        overlays the CT as displayed; the CT must be unchanged since :meth:`prepare`.
        """
        from . import statistics
        segmenter = self.segmenter(job.mode, job.model_dir, job.device, job.fusion)
        names = statistics.planar_names(segmenter)
        members = statistics.independent_members(result, names)
        if len(members) < 2:
            return None
        scene = _scene_of_job(job)
        volume = job.volume_node
        scan = job.scan if job.scan is not None else image_from_volume_node(volume)
        uncertainty, source = statistics.uncertainty_volume(result, scan, job.transform, names)
        node = slicer_tools.uncertainty_volume_node(
            scene, uncertainty, ct_node=volume, name=name or f"{volume.GetName()} ASPECTS uncertainty")
        node.SetAttribute("BrainLobeSeg.uncertainty", source)
        node.SetAttribute("BrainLobeSeg.members", ", ".join(sorted(members)))
        node.SetAttribute("BrainLobeSeg.sourceVolume", volume.GetID())
        return node

    def statistics_table(self, segmentation_node, volume_node, uncertainty_node=None,
                         table_node=None, **settings):
        """A ``vtkMRMLTableNode`` with one row per region of the segmentation as it is now.

        The segments are read back by name (:func:`slicer_tools.labelmap_from_segmentation`),
        so corrections made in the Segment Editor count and renamed or extra segments are
        reported instead of being measured as something else. ``table_node`` is refilled
        when given (one table per result, refreshed after each correction), otherwise a
        new one is added. ``settings`` go to :func:`statistics.region_statistics` (brain
        window, flag threshold). The flagged regions and the notice are node attributes
        (``BrainLobeSeg.flagged``, ``BrainLobeSeg.notice``) for the caller to show.
        """
        if segmentation_node is None or segmentation_node.GetScene() is None:
            raise InputError("there is no segmentation to measure.", "Segment the CT first.")
        check_volume(volume_node)
        if uncertainty_node is not None and uncertainty_node.GetScene() is None:
            uncertainty_node = None    # deleted by the user: measure without it
        report = slicer_tools.statistics_from_nodes(segmentation_node, volume_node,
                                                    uncertainty_node, **settings)
        node = slicer_tools.statistics_table_node(
            segmentation_node.GetScene(), report, name=f"{segmentation_node.GetName()} statistics",
            table_node=table_node)
        node.SetAttribute("BrainLobeSeg.segmentation", segmentation_node.GetID())
        node.SetAttribute("BrainLobeSeg.sourceVolume", volume_node.GetID())
        return node

    def aspects_readout(self, segmentation_node, volume_node, side: Optional[str] = None,
                        previous: Optional["AspectsReadout"] = None) -> "AspectsReadout":
        """The ASPECTS read-out of the segmentation as it is now, on its CT (decision support).

        The regions are read back by segment name, as :meth:`statistics_table` does, so
        corrections count; :func:`aspects.assess` makes the calls on the CT's own grid.
        ``side`` is the symptomatic side ("left"/"right"), or None/"auto" to have it
        proposed with its reason. Adds (or, with ``previous``, refills: one table and one
        evidence volume per result, however often it is read out, and the previous read-out's
        overrides are kept) a table node with one
        row per region and a check box per call, and the evidence map as a volume on the
        CT's grid, both named after the segmentation; the affected segments are
        highlighted (:func:`slicer_tools.highlight_segments`). Everything is computed
        before anything is added, so a failure leaves the scene as it was. The CT and the
        segmentation's content are only read.
        """
        return steps.run_steps(self.aspects_readout_steps(segmentation_node, volume_node, side, previous))

    def aspects_readout_steps(self, segmentation_node, volume_node, side: Optional[str] = None,
                              previous: Optional["AspectsReadout"] = None,
                              progress: Optional[ProgressFn] = None) -> "steps.Steps[AspectsReadout]":
        """:meth:`aspects_readout` in short steps, for the panel's timer. The input is
        checked and read from the scene here, before the first step; the scene is changed
        only in the last step, and only if the segmentation and the CT are still there."""
        from . import aspects
        if segmentation_node is None or segmentation_node.GetScene() is None:
            raise InputError("there is no segmentation to read ASPECTS from.", "Segment the CT first.")
        check_volume(volume_node)
        source = segmentation_node.GetAttribute("BrainLobeSeg.sourceVolume")
        if source and volume_node.GetID() and source != volume_node.GetID():
            raise InputError(f"the segmentation '{segmentation_node.GetName()}' was made from "
                             f"another CT than '{volume_node.GetName()}'.",
                             "Read ASPECTS with the CT it was segmented from.")
        choice = side or "auto"
        ct = image_from_volume_node(volume_node)
        labels = slicer_tools.labelmap_from_segmentation(segmentation_node, volume_node)
        with warnings.catch_warnings(record=True) as caught:   # said before the first step
            warnings.simplefilter("always", InputWarning)
            work = aspects.assess_steps(ct, labels, side=None if choice == "auto" else choice, progress=progress)
        said = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
        return self._readout_steps(work, segmentation_node, volume_node, choice, previous, said)

    def _readout_steps(self, work, segmentation_node, volume_node, choice: str,
                       previous: Optional["AspectsReadout"], said: List[str]) -> "steps.Steps[AspectsReadout]":
        result = yield from work
        if not (_in_scene(segmentation_node) and _in_scene(volume_node)):
            raise InputError("the segmentation or its CT was removed during the ASPECTS read-out.",
                             "Read ASPECTS again.")
        scene, name = segmentation_node.GetScene(), segmentation_node.GetName()
        reuse = previous if previous is not None and previous.segmentation is segmentation_node else None
        if reuse is not None:   # the clinician's calls are kept: reading out again after a
            for call in reuse.result.regions:   # correction must not silently drop them
                if call.override is not None:
                    result.set_override(call.label, call.override)
        table = slicer_tools.aspects_table_node(
            scene, result, name=f"{name} ASPECTS read-out",
            table_node=reuse.table if reuse is not None and _in_scene(reuse.table) else None)
        evidence = slicer_tools.evidence_volume_node(
            scene, result.evidence, volume_node, name=f"{name} ASPECTS evidence",
            volume_node=reuse.evidence if reuse is not None and _in_scene(reuse.evidence) else None)
        for node in (table, evidence):
            node.SetAttribute("BrainLobeSeg.segmentation", segmentation_node.GetID())
            node.SetAttribute("BrainLobeSeg.sourceVolume", volume_node.GetID())
        table.SetAttribute("BrainLobeSeg.evidenceVolume", evidence.GetID())
        readout = AspectsReadout(segmentation_node, volume_node, result, table, evidence, choice, said)
        self._show_calls(readout)
        return readout

    def apply_override(self, readout: "AspectsReadout", region, affected: Optional[bool]) -> None:
        """The clinician's call for one region (its name, e.g. "M2 left", or label):
        True or False, or None for the automatic call again. The scores, the table and
        the highlight follow."""
        readout.result.set_override(region, affected)   # InputError for an unknown region
        self._show_calls(readout)

    def overrides_from_table(self, readout: "AspectsReadout") -> bool:
        """Take the clinician's calls from the table's check boxes (ticked in Slicer's table
        view); returns whether any call changed. A box set back to the automatic call
        removes the override. Called on every change of the table, so it does nothing
        when the boxes already match (also when the table has been deleted)."""
        if not _in_scene(readout.table):
            return False
        calls = slicer_tools.table_calls(readout.table)
        if len(calls) != len(readout.result.regions):
            return False
        changed = False
        for checked, r in zip(calls, readout.result.regions):
            if checked != r.affected:   # through set_override: a proposed side follows
                readout.result.set_override(r.label, None if checked == r.called else checked)
                changed = True
        if changed:
            self._show_calls(readout)
        return changed

    def set_aspects_side(self, readout: "AspectsReadout", side: Optional[str]) -> bool:
        """Change the symptomatic side of a read-out ("left", "right", or None/"auto" for the
        proposed one); returns whether it changed. Nothing is measured again."""
        choice = side or "auto"
        if choice == readout.side_choice:
            return False
        if choice == "auto":
            readout.result.use_proposed_side()
        else:
            readout.result.set_side(choice)
        readout.side_choice = choice
        self._show_calls(readout)
        return True

    @staticmethod
    def _show_calls(readout: "AspectsReadout") -> None:
        """The calls that count, in the table (if still there) and as the highlight."""
        if _in_scene(readout.table):
            slicer_tools.update_aspects_table(readout.table, readout.result)
        if _in_scene(readout.segmentation):
            ids = slicer_tools.region_segment_ids(readout.segmentation)
            slicer_tools.highlight_segments(readout.segmentation, [
                ids[r.label] for r in readout.result.regions if r.affected and r.label in ids])

    def estimate_upright_transform(self, volume_node, progress: Optional[ProgressFn] = None,
                                   name: Optional[str] = None):
        """A new linear transform node with an automatic estimate of ``R`` for the CT.

        :func:`alignment.estimate_pose` finds the mid-sagittal plane and registers the
        bundled upright reference head (the models' frame) to the scan as acquired (the
        volume's own geometry, its parent transform ignored, like
        :meth:`prepare`), so the node is meant to be chosen as the transform node, or
        applied to the CT *instead of* any transform it has. The node follows the same
        convention as a loaded ITK-SNAP file (:func:`add_upright_transform_node`). It is
        an estimate: the attribute ``BrainLobeSeg.estimated`` says it must be checked,
        and the volume is not touched (the user decides whether to apply it).
        """
        from .alignment import estimate_pose
        scan = image_from_volume_node(volume_node)      # checks the volume
        if volume_node.GetScene() is None:
            raise InputError(f"the volume '{volume_node.GetName()}' is not in a scene.",
                             "Load the CT into Slicer first.")
        return self._add_estimate_node(volume_node, estimate_pose(scan, progress=progress), name)

    @staticmethod
    def _add_estimate_node(volume_node, estimate, name: Optional[str] = None):
        """The transform node of an ``alignment.PoseEstimate`` for ``volume_node``, with
        the evidence as attributes (the button's estimate and a run's final pose alike).

        ``BrainLobeSeg.regionCorrectionDeg`` is the check against the regions found: the
        rotation between the estimate and the regions (empty when not checked);
        ``BrainLobeSeg.regionCorrected`` says whether the pose was turned by it.
        """
        node = add_upright_transform_node(
            volume_node.GetScene(), estimate.transform, name or f"{volume_node.GetName()} upright (estimated)")
        node.SetAttribute("BrainLobeSeg.estimated", ESTIMATE_NOTE)
        node.SetAttribute("BrainLobeSeg.angleDeg", f"{estimate.angle_deg:.1f}")
        node.SetAttribute("BrainLobeSeg.pitchDeg", f"{estimate.pitch_deg:.1f}")
        node.SetAttribute("BrainLobeSeg.match", f"{estimate.match:.2f}")
        node.SetAttribute("BrainLobeSeg.symmetryRmseHU", f"{estimate.symmetry_rmse:.1f}")
        residual = estimate.region_residual_deg
        node.SetAttribute("BrainLobeSeg.regionCorrectionDeg", "" if residual is None else f"{residual:.1f}")
        node.SetAttribute("BrainLobeSeg.regionCorrected", "yes" if estimate.region_corrected else "no")
        node.SetAttribute("BrainLobeSeg.sourceVolume", volume_node.GetID() or "")
        return node

    def save_case(self, segmentation_node, job_or_volume_node, dataset_dir: os.PathLike,
                  transform=None, name: Optional[str] = None) -> str:
        """Save the CT, ``R`` and the (corrected) segmentation as the next training case.

        With a :class:`SegmentationJob` (what the panel keeps after a run), the ``R`` that
        was used for the segmentation is saved, and the CT must still have the grid it
        was segmented on. With a volume node, ``transform`` gives ``R`` (a linear
        transform node or a SimpleITK transform; None means identity, i.e. the scan is
        taken as upright). An explicit ``transform`` also overrides a job's ``R``.
        A segmentation made from another CT is refused. Returns the case name.
        """
        if isinstance(job_or_volume_node, SegmentationJob):
            job = job_or_volume_node
            _scene_of_job(job)
            volume = job.volume_node
            R = transform if transform is not None else job.transform
        else:
            volume = job_or_volume_node
            check_volume(volume)
            R = transform
        if segmentation_node is None or segmentation_node.GetScene() is None:
            raise InputError("there is no segmentation to save.", "Segment the CT first.")
        source = segmentation_node.GetAttribute("BrainLobeSeg.sourceVolume")
        if source and volume.GetID() and source != volume.GetID():
            raise InputError(f"the segmentation '{segmentation_node.GetName()}' was made from "
                             f"another CT than '{volume.GetName()}'.",
                             "Save it with the CT it was segmented from.")
        return slicer_tools.save_case_for_training(segmentation_node, volume, R, str(dataset_dir),
                                                   name=name)

    # -- all three parts
    def segment(self, volume_node, transform_source: str = "parent", transform_node=None,
                invert: bool = False, mode: str = DEFAULT_MODE, device: str = "auto",
                model_dir: Optional[os.PathLike] = None, progress: Optional[ProgressFn] = None,
                cancel: Optional[CancelFn] = None, output_node=None, fusion: str = "mean",
                name: Optional[str] = None):
        """Segment ``volume_node`` and return the ``vtkMRMLSegmentationNode``.

        Blocking; for scripts, tests and batch use. Raises ``Cancelled`` (nothing added to
        the scene) when ``cancel()`` turns true, ``InputError`` for unusable input. A new
        node is created unless ``output_node`` is given explicitly, in which case its
        content is replaced. The input volume and its transform are only read; with
        ``transform_source="estimate"`` the estimated pose is added as a transform node.
        """
        job = self.prepare(volume_node, transform_source, transform_node, invert, mode, device,
                           model_dir, fusion)
        result = self.run(job, progress, cancel)
        return self.create_output(job, result, output_node, name)


def estimate_description(node) -> str:
    """How a job describes the automatic estimate it used, once its node exists."""
    corrected = node.GetAttribute("BrainLobeSeg.regionCorrected") == "yes"
    return (f"the automatic estimate {transform_name(node)} (turns the head by "
            f"{node.GetAttribute('BrainLobeSeg.angleDeg')} degrees"
            f"{', corrected by the regions found' if corrected else ''}; check it)")


def _checking(cancel: Optional[CancelFn], work: "steps.Steps[Any]") -> "steps.Steps[Any]":
    """``work`` with ``cancel()`` checked between its steps (for steps that take no
    cancel callback themselves, such as the pose estimate)."""
    try:
        while True:
            try:
                next(work)
            except StopIteration as done:
                return done.value
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
            yield
    finally:
        work.close()


def describe_models(model_dir: Optional[os.PathLike] = None) -> List[str]:
    """One line per model folder (name, version, kind), read from ``model.json`` only.

    Uses ``json`` rather than the engine so that the panel can show the models before
    PyTorch is installed.
    """
    import json
    if model_dir:
        root = Path(model_dir)
    else:
        env = os.environ.get("BRAINLOBESEG_MODELS")
        root = Path(env) if env else Path(__file__).resolve().parent.parent / "Resources" / "Models"
    folders = [root] if (root / "model.json").is_file() else (
        sorted(p for p in root.iterdir() if (p / "model.json").is_file()) if root.is_dir() else [])
    lines = []
    for folder in folders:
        try:
            card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
            lines.append(f"{card.get('name', folder.name)} {card.get('version', '')} "
                         f"({card.get('kind', '?')})".replace("  ", " "))
        except (OSError, ValueError, AttributeError):
            lines.append(f"{folder.name} (unreadable model.json)")
    return lines
