"""What the BrainLobeSeg panel decides and says, without Qt.

The Widget in ``BrainLobeSeg.py`` connects buttons and shows what this module returns;
every decision it used to make itself is here, where the tests can reach it on a real
``vtkMRMLScene`` from the ``slicer-core`` wheel:

- :func:`gui_state`: every enabled state, button text and description line, from the
  parameters and the :class:`Session`;
- the transform choice for a newly selected CT and the line describing it, built from
  :func:`slicer_logic.resolve_transform`'s own description (one source of wording);
- :class:`TransformWatcher`, which tells the Widget when the CT's transform or the chosen
  transform node changes, so that line never goes stale;
- :class:`Session`: starting a run (with the questions to ask), finishing it, and what
  the Results buttons do with the last result (:class:`LastResult`);
- :class:`PanelRun`, the one object that knows *how* a segmentation runs for the panel:
  the engine's steps (:meth:`slicer_logic.BrainLobeSegLogic.run_steps`) on the main
  thread, a few at a time for each tick of the Widget's timer, because inside Slicer a
  Python thread would crawl (the main thread holds the GIL while Qt idles, see
  :mod:`steps`); the rest only starts, polls, cancels and finishes it;
- how a finished run is reported (:class:`RunOutcome`), the PyTorch installation, the
  statistics message, and the order in which the developer Reload reloads the modules;
- the ASPECTS read-out (:meth:`Session.read_aspects`): its scores line
  (:func:`aspects_message`), the symptomatic side the user picks, and the clinician's
  overrides, ticked in its table and applied by :class:`AspectsTableWatcher`.

Dependencies run one way: this module uses :mod:`slicer_logic` (imported where needed,
so that ``BrainLobeSeg.py`` can import this at Slicer's start-up without numpy and
SimpleITK), which knows nothing of it. User-visible text goes through Slicer's ``_()``
inside Slicer; without the application (tests) it is returned untranslated.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import logging
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, List, Optional, Sequence, Set

import vtk
from slicer.util import VTKObservationMixin

from . import steps, torch_install
from .errors import Cancelled, InputError

if TYPE_CHECKING:  # numpy and SimpleITK: imported by the functions that use them, so that
    from . import slicer_logic  # this module is light enough for Slicer's start-up

try:
    from slicer.i18n import tr as _
except ImportError:  # the slicer-core wheel has no application to translate with
    def _(text: str) -> str:
        return text

#: Transform choices (``slicer_logic.TRANSFORM_SOURCES``) that follow the selected CT:
#: a CT with a transform uses it, one without gets the automatic estimate.
AUTOMATIC_SOURCES = ("parent", "estimate")

#: Seconds of engine steps per timer tick: a tick lasts this plus at most one step
#: (the longest steps take about 0.3 s on 2 cores), short enough for the GUI to stay
#: responsive, long enough that the ticks cost nothing measurable.
STEP_BUDGET_S = 0.1


def in_scene(node) -> bool:
    """True for a node that still exists in a scene (the user may delete any node)."""
    return node is not None and node.GetScene() is not None


# ----------------------------------------------------------------------------- inputs

def default_input_volume(scene):
    """The CT to preselect: the first scalar volume that is not a label map, or None."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        if not node.IsA("vtkMRMLLabelMapVolumeNode"):
            return node
    return None


def default_transform_source(volume, current: str) -> str:
    """The transform choice for a newly selected CT.

    A choice the user made (a transform node, none) is kept. Otherwise a CT that has a
    transform is segmented as displayed (``parent``) and one without gets the automatic
    estimate, because segmenting a tilted CT as if it were upright gives wrong regions.
    """
    if volume is None or current not in AUTOMATIC_SOURCES:
        return current
    return "parent" if volume.GetParentTransformNode() is not None else "estimate"


def transform_description(volume, source: str, transform_node=None, invert: bool = False) -> str:
    """The line under the transform options: what a run would use, or what is missing.

    For a transform the text is the description :func:`slicer_logic.resolve_transform`
    gives the run itself, and a transform that cannot be used shows the message the run
    would fail with, so the panel and the run never disagree.
    """
    if source == "none":
        return _("The CT is segmented as it is: it must already be upright.")
    if source == "estimate":
        return _("The head pose is estimated when you press Segment and, with the result, "
                 "added as a new transform node, which you can check and correct (or press "
                 "'Estimate upright transform' first). The CT itself is not moved.")
    from . import slicer_logic, transforms
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", transforms.TransformWarning)
            _R, description = slicer_logic.resolve_transform(volume, source, transform_node, invert)
    except InputError as exc:
        return str(exc)
    text = _("Segmenting with {description}.").format(description=description)
    for warning in caught:   # e.g. a mirroring transform: said here, before the run
        if issubclass(warning.category, transforms.TransformWarning):
            text += " " + _("Warning: {warning}").format(warning=warning.message)
    if source == "parent" and volume is not None and volume.GetParentTransformNode() is None:
        text += " " + _("To use an ITK-SNAP transform, load it and choose 'Transform node below'.")
    if source == "node" and transform_node.GetAttribute("BrainLobeSeg.estimated"):
        text += " " + _("It is an automatic estimate: check it by applying it to the CT in the "
                        "Data module.")
    return text


def model_description(folder: Optional[str]) -> str:
    """The line under the model folder: the models a run would load (cards only, so it
    works before PyTorch is installed)."""
    from .slicer_logic import describe_models
    lines = describe_models(folder or None)
    where = folder or _("bundled models")
    if not lines:
        return _("No models found in {where}.").format(where=where)
    return _("Models in {where}: {models}").format(where=where, models="; ".join(lines))


def gui_state(session: "Session", volume=None, source: Optional[str] = None, transform_node=None,
              invert: bool = False, model_folder: str = "") -> Dict[str, Dict[str, Any]]:
    """Every widget property the panel sets from its state, ``{widget: {property: value}}``
    (names as in ``BrainLobeSeg.ui``), which the Widget applies as it is.

    ``source`` None means there is no parameter node (scene closing, module hidden):
    then nothing can be started. While a run goes, the inputs are locked and Segment
    becomes Cancel (disabled once cancel was asked for).
    """
    if source is None:
        return {"segmentButton": {"enabled": False}, "estimateTransformButton": {"enabled": False}}
    running = session.running
    state: Dict[str, Dict[str, Any]] = {
        name: {"enabled": not running}
        for name in ("inputsCollapsibleButton", "modelCollapsibleButton", "outputCollapsibleButton")}
    if running:
        segment = {"text": _("Cancel"), "enabled": not session.run.cancel_requested,
                   "toolTip": session.run.cancel_tip()}
    else:
        segment = {"text": _("Segment"), "enabled": volume is not None,
                   "toolTip": (_("Segment the 20 ASPECTS regions of the selected CT.")
                               if volume is not None else _("Select the head CT first."))}
    state.update({
        "segmentButton": segment,
        "transformNodeSelector": {"enabled": source == "node"},
        "transformInfoLabel": {"text": transform_description(volume, source, transform_node, invert)},
        "modelInfoLabel": {"text": model_description(model_folder)},
        "estimateTransformButton": {"enabled": not running and volume is not None},
        "openEditorButton": {"enabled": session.can_edit()},
        "statisticsButton": {"enabled": session.can_measure()},
        "saveCaseButton": {"enabled": session.can_save()},
        "aspectsButton": {"enabled": session.can_measure()},
        "aspectsLabel": {"text": session.aspects_status()},
        # the table view shows the read-out of the last result only (none yet: hidden)
        "aspectsTableView": {"visible": session.aspects is not None},
    })
    return state


def loaded_transform_status(node) -> str:
    return _("Loaded transform '{name}'. It is used for segmenting; to see the head upright, "
             "apply it to the CT in the Data module.").format(name=node.GetName())


def estimate_status(node) -> str:
    return _("Created '{name}', an automatic estimate that turns the head by {angle} degrees. "
             "Check it before segmenting: apply it to the CT in the Data module and make sure "
             "the head looks upright and symmetric.").format(
        name=node.GetName(), angle=node.GetAttribute("BrainLobeSeg.angleDeg") or "?")


def replace_question(output_node) -> str:
    return _("Replace the content of the segmentation '{name}' with the new result? Its current "
             "segments, including any corrections, will be lost.").format(name=output_node.GetName())


def warnings_question(job: slicer_logic.SegmentationJob) -> str:
    return _("The transform looks unusual:\n\n{warnings}\n\nSegment anyway?").format(
        warnings="\n".join(job.warnings))


class TransformWatcher(VTKObservationMixin):
    """Calls ``callback()`` when the watched nodes' transforms change.

    The parameter node is modified only when the *selection* changes; applying a
    transform to the CT in the Data module, or editing the chosen transform node,
    modifies those nodes instead (``TransformModifiedEvent``, also sent when a parent
    transform changes). The Widget watches the input CT and the chosen transform node
    so the transform description is refreshed then too.
    """

    def __init__(self, callback: Callable[[], None]) -> None:
        VTKObservationMixin.__init__(self)
        self._callback = callback
        self._nodes: List[Any] = []

    def watch(self, *nodes) -> None:
        """Observe exactly these nodes (None entries are ignored)."""
        wanted = [n for n in nodes if n is not None]
        if len(wanted) == len(self._nodes) and all(a is b for a, b in zip(wanted, self._nodes)):
            return
        self.stop()
        for node in wanted:
            self.addObserver(node, node.TransformModifiedEvent, self._modified)
        self._nodes = wanted

    def stop(self) -> None:
        self.removeObservers()
        self._nodes = []

    def _modified(self, caller, event) -> None:
        self._callback()


# ----------------------------------------------------------------------------- a run

@dataclass
class LastResult:
    """The last result the Results section acts on; any of its nodes may be deleted."""

    segmentation: Any
    volume: Any
    job: slicer_logic.SegmentationJob      # without its scan copy: R and the CT's grid
    uncertainty: Any = None
    table: Any = None
    aspects: Optional[slicer_logic.AspectsReadout] = None

    def can_edit(self) -> bool:
        return in_scene(self.segmentation)

    def can_measure(self) -> bool:
        return in_scene(self.segmentation) and in_scene(self.volume)

    def can_save(self) -> bool:
        return in_scene(self.segmentation) and in_scene(self.job.volume_node)

    def uncertainty_in_scene(self):
        return self.uncertainty if in_scene(self.uncertainty) else None

    def table_in_scene(self):
        return self.table if in_scene(self.table) else None


class AspectsTableWatcher(VTKObservationMixin):
    """Applies the clinician's overrides when the ASPECTS table's check boxes change.

    Slicer's table view writes a ticked box into the table node (which then sends
    ModifiedEvent); the Widget only shows the table. On each change the calls are taken
    from the table (:meth:`slicer_logic.BrainLobeSegLogic.overrides_from_table`) and, if
    one changed, ``callback()`` is called so the panel shows the new scores.
    """

    def __init__(self, core: slicer_logic.BrainLobeSegLogic) -> None:
        VTKObservationMixin.__init__(self)
        self._core = core
        self._readout: Optional[slicer_logic.AspectsReadout] = None
        self._callback: Callable[[], None] = lambda: None

    def watch(self, readout: slicer_logic.AspectsReadout, callback: Callable[[], None]) -> None:
        self.stop()
        self._readout, self._callback = readout, callback
        self.addObserver(readout.table, vtk.vtkCommand.ModifiedEvent, self._modified)

    def stop(self) -> None:
        self.removeObservers()
        self._readout = None

    def _modified(self, caller, event) -> None:
        if self._readout is not None and self._core.overrides_from_table(self._readout):
            self._callback()


@dataclass
class RunOutcome:
    """How a finished run is shown: the status line, an error for a message box titled
    ``title`` (with details for the box's "Show details" when it is unexpected), and the
    result: a segmentation, or an ASPECTS read-out."""

    status: str
    error: str = ""
    details: str = ""
    result: Optional[LastResult] = None
    progress: int = 0
    title: str = ""
    aspects: Optional[slicer_logic.AspectsReadout] = None


def failure(exc: BaseException, details: str = "", what: str = "") -> RunOutcome:
    """An input problem is shown as its message; anything else is logged with its
    traceback and shown with the details, never lost. ``what`` failed (default: the
    segmentation), in the status line and the message box's title."""
    what = what or _("Segmentation failed.")
    if isinstance(exc, InputError):
        return RunOutcome(what, str(exc), title=what)
    logging.error("BrainLobeSeg: %s\n%s", what, details)
    return RunOutcome(what, _("{what} It failed unexpectedly: {error}").format(what=what, error=exc),
                      details, title=what)


def _run_error(run: steps.SteppedRun, what: str = "") -> Optional[RunOutcome]:
    """The outcome of a run that was cancelled or failed; None if it finished."""
    if run.cancelled or isinstance(run.error, Cancelled):
        return RunOutcome(_("Cancelled. Nothing was added to the scene."))
    if run.error is not None:
        return failure(run.error, "".join(traceback.format_exception(
            type(run.error), run.error, run.error.__traceback__)), what)
    return None


class SteppedPanelRun:
    """Steps run from the Widget's timer: :meth:`poll`, :meth:`cancel`, then the
    subclass's ``finish``.

    The steps run on the main thread in a :class:`steps.SteppedRun`: each :meth:`poll`
    (one per tick of the Widget's timer) runs steps for about ``budget_s`` and returns,
    so Slicer repaints and takes clicks between ticks. No thread is used, because inside
    Slicer a Python thread only advances while the main thread runs Python.
    """

    def cancel_tip(self) -> str:
        """Tooltip of the Cancel button while this run goes."""
        return _("Stop it; nothing is added to the scene.")

    def __init__(self, work: "steps.Steps[Any]", message: str, budget_s: Optional[float] = None) -> None:
        self._fraction, self._message = 0.0, message   # until the steps report (_progress)
        budget_s = STEP_BUDGET_S if budget_s is None else budget_s   # read now: tests may set it
        self._run = steps.SteppedRun(work, budget_s=budget_s)
        self.cancel_requested = False
        self.seconds = 0.0          # spent in the engine's steps (the GUI's time between ticks not counted)
        self.wall_seconds = 0.0     # from the first tick to the end
        self._started: Optional[float] = None

    def _progress(self, fraction: float, message: str) -> None:
        self._fraction, self._message = fraction, message

    def poll(self):
        """Run steps for one tick, then ``(fraction, message, done)``."""
        if not self._run.done:
            began = time.perf_counter()
            self._started = self._started if self._started is not None else began
            self._run.tick()
            ended = time.perf_counter()
            self.seconds += ended - began
            self.wall_seconds = ended - self._started
            if self._run.done:
                logging.info("BrainLobeSeg %s: %d steps, longest %.2f s, %.1f s in steps, "
                             "%.1f s from start to end", type(self).__name__, self._run.steps_run,
                             self._run.longest_step_s, self.seconds, self.wall_seconds)
        return self._fraction, self._message, self._run.done

    def run_to_end(self) -> None:
        """Poll until the run is done (the self-test, scripts): blocks the GUI meanwhile."""
        while not self.poll()[2]:
            pass

    @property
    def steps_run(self) -> int:
        return self._run.steps_run

    @property
    def error(self) -> Optional[BaseException]:
        """What stopped the run (:class:`Cancelled` when cancelled), None if it finished."""
        if self._run.cancelled and self._run.error is None:
            return Cancelled("cancelled by the user")
        return self._run.error

    @property
    def longest_step_s(self) -> float:
        return self._run.longest_step_s

    def cancel(self) -> None:
        """The user's Cancel: the run stops now, between two steps (a click is only
        handled between ticks), and the next :meth:`poll` reports it done; nothing is
        added to the scene."""
        self.cancel_requested = True
        self._run.cancel()

    def stop(self) -> None:
        """Cancel at once and drop the result (scene or module closing)."""
        self.cancel()


class AspectsRun(SteppedPanelRun):
    """An ASPECTS read-out started from the panel (about 1-4 s of steps): the table and
    the evidence volume are added in its last step, so a cancelled run adds nothing."""

    def cancel_tip(self) -> str:
        return _("Stop the ASPECTS read-out; nothing is added to the scene.")

    def __init__(self, logic: slicer_logic.BrainLobeSegLogic, last: LastResult, side: str,
                 on_change: Callable[[], None] = lambda: None, budget_s: Optional[float] = None) -> None:
        self.last, self.on_change = last, on_change
        super().__init__(logic.aspects_readout_steps(last.segmentation, last.volume, side,
                                                     previous=last.aspects, progress=self._progress),
                         _("ASPECTS: starting"), budget_s)

    def finish(self) -> RunOutcome:
        """The read-out, or how it ended without one."""
        ended = _run_error(self._run, _("The ASPECTS read-out failed."))
        if ended is not None:
            return ended
        readout = self._run.result
        return RunOutcome(aspects_message(readout), aspects=readout, progress=100)


class PanelRun(SteppedPanelRun):
    """One segmentation started from the panel: :meth:`poll`, :meth:`cancel`,
    :meth:`finish`. Once :meth:`poll` reports done, :meth:`finish` builds the nodes.
    ``output_node`` is the segmentation the user confirmed to replace (or None).
    """

    def cancel_tip(self) -> str:
        return _("Stop the segmentation; nothing is added to the scene.")

    def __init__(self, logic: slicer_logic.BrainLobeSegLogic, job: slicer_logic.SegmentationJob,
                 output_node=None, budget_s: Optional[float] = None) -> None:
        self.logic, self.job, self.output_node = logic, job, output_node
        super().__init__(logic.run_steps(job, self._progress), _("starting"), budget_s)

    def finish(self) -> RunOutcome:
        """Add the result to the scene and say how the run ended."""
        run = self._run
        ended = _run_error(run)
        if ended is not None:
            return ended
        try:
            node = self.logic.create_output(self.job, run.result, output_node=self.output_node)
        except Exception as exc:  # reported, never lost
            return failure(exc, traceback.format_exc())
        uncertainty, note = None, ""
        try:
            uncertainty = self.logic.create_uncertainty(self.job, run.result)
        except Exception as exc:  # the segmentation stands; say what is missing
            logging.error("BrainLobeSeg: uncertainty volume failed:\n%s", traceback.format_exc())
            note = " " + _("The uncertainty volume could not be made: {error}").format(error=exc)
        if self.output_node is not None and node is not self.output_node:
            note += " " + _("The segmentation chosen as output was deleted during the run, so "
                            "the result is in a new segmentation.")
        if self.job.estimated_node is not None:
            note += " " + _("The head pose used is {description}.").format(
                description=self.job.transform_description)
        seconds = self.seconds
        if uncertainty is not None:
            status = _("Done in {seconds:.1f} s: '{name}' has the 20 regions; '{uncertainty}' "
                       "shows where the models disagree. Check every region and correct it in "
                       "the Segment Editor.").format(seconds=seconds, name=node.GetName(),
                                                     uncertainty=uncertainty.GetName())
        else:
            status = _("Done in {seconds:.1f} s: '{name}' has the 20 regions. Check every region "
                       "and correct it in the Segment Editor.").format(seconds=seconds,
                                                                       name=node.GetName())
        problems = node.GetAttribute("BrainLobeSeg.qualityProblems")
        if problems:   # the engine's quality check (quality.py): said where it is seen
            status = _("Done in {seconds:.1f} s, but the result looks implausible: {problems}. "
                       "Check it carefully before use.").format(seconds=seconds, problems=problems)
        result = LastResult(node, self.job.volume_node, self.job.without_scan(), uncertainty)
        return RunOutcome(status + note, result=result, progress=100)


class Session:
    """The panel between button presses: the run in progress and the last result.

    The Widget keeps one and passes in only what needs Qt (``confirm(text, title)``,
    which asks the user); every decision about starting, finishing, measuring and saving
    is taken here. A method that cannot work raises :class:`InputError` (or another
    exception) with nothing half done, for the Widget to show.
    """

    def __init__(self, core: slicer_logic.BrainLobeSegLogic) -> None:
        self.core = core
        self.run: Optional[SteppedPanelRun] = None   # a segmentation or an ASPECTS read-out
        self.result: Optional[LastResult] = None
        self._aspects_watcher = AspectsTableWatcher(core)

    @property
    def running(self) -> bool:
        return self.run is not None

    def start(self, volume, source: str, transform_node, invert: bool, mode: str, device: str,
              model_folder: Optional[str], output_node,
              confirm: Callable[[str, str], bool]) -> Optional[slicer_logic.SegmentationJob]:
        """Prepare and start a run; returns its job (None if the user declined to replace
        ``output_node``). An unusual transform is shown first and the run starts only if
        the user agrees (the job is returned either way; see :attr:`running`). Nothing is
        added to the scene before the run finishes, not even an automatic estimate."""
        if output_node is not None and not confirm(replace_question(output_node),
                                                   _("Replace segmentation")):
            return None
        job = self.core.prepare(volume, source, transform_node, invert, mode, device,
                                model_folder or None)
        if not job.warnings or confirm(warnings_question(job), _("Check the transform")):
            self.run = PanelRun(self.core, job, output_node)
        return job

    def finish(self) -> RunOutcome:
        """End the finished run and keep its result: a segmentation becomes the last
        result; an ASPECTS read-out becomes the last result's, its table watched."""
        run, self.run = self.run, None
        outcome = run.finish()
        if outcome.result is not None:
            self._aspects_watcher.stop()   # the read-out of the previous result stays as it is
            self.result = outcome.result
        if outcome.aspects is not None and isinstance(run, AspectsRun) and self.result is run.last:
            self.result.aspects = outcome.aspects
            self._aspects_watcher.watch(outcome.aspects, run.on_change)
        return outcome

    def clear(self) -> None:
        """Forget the last result and stop observing its nodes (scene or module closing)."""
        self._aspects_watcher.stop()
        self.result = None

    def stop(self) -> bool:
        """Cancel a run and drop its result (scene or module closing); False if none ran."""
        run, self.run = self.run, None
        if run is None:
            return False
        run.stop()
        return True

    def can_edit(self) -> bool:
        return not self.running and self.result is not None and self.result.can_edit()

    def can_measure(self) -> bool:
        return not self.running and self.result is not None and self.result.can_measure()

    def can_save(self) -> bool:
        return not self.running and self.result is not None and self.result.can_save()

    def measure(self) -> str:
        """Region statistics of the last result as it is now, in its one table node
        (refilled each time); returns the status line."""
        if not self.can_measure():
            raise InputError("the segmentation or its CT is no longer in the scene.",
                             "Segment the CT again.")
        r = self.result
        r.table = self.core.statistics_table(r.segmentation, r.volume, r.uncertainty_in_scene(),
                                             r.table_in_scene())
        return statistics_message(r.segmentation, r.table)

    def start_aspects(self, side: str = "auto", on_change: Callable[[], None] = lambda: None) -> AspectsRun:
        """Start the ASPECTS read-out of the last result as it is now, in steps polled like a
        segmentation (:meth:`finish` then keeps it). ``side``: "auto" (the proposed side),
        "left" or "right". When the clinician later ticks a box in its table, the override
        is applied and ``on_change()`` is called. Its table and evidence volume are refilled
        on each read-out."""
        if not self.can_measure():
            raise InputError("the segmentation or its CT is no longer in the scene.",
                             "Segment the CT again.")
        self.run = AspectsRun(self.core, self.result, side, on_change)
        return self.run

    def read_aspects(self, side: str = "auto", on_change: Callable[[], None] = lambda: None) -> str:
        """:meth:`start_aspects` run to its end at once (scripts, tests); returns the scores
        line, or raises what stopped it."""
        run = self.start_aspects(side, on_change)
        run.run_to_end()
        outcome = self.finish()
        if run.error is not None:
            raise run.error
        return outcome.status

    @property
    def aspects(self) -> Optional[slicer_logic.AspectsReadout]:
        """The ASPECTS read-out of the last result, if it has been read out."""
        return self.result.aspects if self.result is not None else None

    def aspects_status(self) -> str:
        """The scores line of the last read-out, or "" when there is none."""
        return aspects_message(self.aspects) if self.aspects is not None else ""

    def choose_aspects_side(self, side: str) -> bool:
        """The user picked the symptomatic side ("auto", "left", "right"): the last read-out
        follows it at once (nothing is measured again); False if there is nothing to change."""
        return self.aspects is not None and self.core.set_aspects_side(self.aspects, side)

    def override_aspects(self, region, affected: Optional[bool]) -> str:
        """The clinician's call for one region of the last read-out (None: the automatic
        call again); returns the new scores line."""
        readout = self.aspects
        if readout is None:
            raise InputError("there is no ASPECTS read-out to change.", "Press 'Read out ASPECTS' first.")
        self.core.apply_override(readout, region, affected)
        return aspects_message(readout)

    def save(self, folder: str) -> str:
        """Save the (corrected) last result as a training case; returns the status line."""
        if not self.can_save():
            raise InputError("the segmentation or its CT is no longer in the scene.",
                             "Segment the CT again.")
        name = self.core.save_case(self.result.segmentation, self.result.job, folder)
        return saved_case_status(self.result.segmentation, name, folder)


# ----------------------------------------------------------------------------- results

def statistics_message(segmentation_node, table_node) -> str:
    """The status line after Region statistics: the flagged regions and why a flag (or
    none) is not a diagnosis."""
    flagged = table_node.GetAttribute("BrainLobeSeg.flagged") or ""
    if flagged:
        return _("Statistics of '{name}' are in the table '{table}'. Lower density than the "
                 "same region on the other side: {regions}. Decision support, not a diagnosis: "
                 "this can be early ischaemia but also artefact, an old lesion, CSF or a "
                 "segmentation error; read the images.").format(
            name=segmentation_node.GetName(), table=table_node.GetName(), regions=flagged)
    return _("Statistics of '{name}' are in the table '{table}'. No region is flagged as darker "
             "than the other side. Decision support, not a diagnosis: this does not exclude a "
             "stroke; read the images.").format(name=segmentation_node.GetName(),
                                                table=table_node.GetName())


def aspects_message(readout: slicer_logic.AspectsReadout) -> str:
    """The ASPECTS line of the panel: the score of each side, the symptomatic side (the
    user's, or the proposed one with its reason), the affected regions, and that it is
    decision support, not a diagnosis."""
    r = readout.result
    affected = ", ".join(c.region for c in r.regions if c.affected) or _("none")
    if r.side_source == "user":
        side = _("Symptomatic side: {side} (your choice).").format(side=r.side)
    else:
        side = _("Symptomatic side: {side}, proposed ({reason}); choose the side above if the "
                 "clinical findings say otherwise.").format(side=r.side, reason=r.side_reason)
    overridden = sum(1 for c in r.regions if c.override is not None)
    changed = (" " + _("{count} call(s) changed by you.").format(count=overridden)) if overridden else ""
    return _("ASPECTS {side}: {score} (left {left}, right {right}). {side_line} Affected: "
             "{affected}.{changed} Tick or untick a region's 'affected' box in the table to "
             "change its call; '{evidence}' shows where the tissue is darker than on the "
             "other side. Decision support, not a diagnosis: read the images.").format(
        side=r.side, score=r.score(), left=r.score("left"), right=r.score("right"),
        side_line=side, affected=affected, changed=changed,
        evidence=readout.evidence.GetName() if readout.evidence is not None else "") + "".join(
        " " + _("Warning: {warning}.").format(warning=w) for w in readout.warnings)


def saved_case_status(segmentation_node, name: str, folder: str) -> str:
    return _("Saved '{segmentation}' with its CT and upright transform as case '{name}' in "
             "{folder}.").format(segmentation=segmentation_node.GetName(), name=name, folder=folder)


# ----------------------------------------------------------------------------- PyTorch

def ensure_torch(confirm: Callable[[str, str], bool], pip_install: Callable,
                 busy: Callable[[], ContextManager] = contextlib.nullcontext) -> bool:
    """True if torch imports; otherwise ask (``confirm(text, title)``) and install it
    inside ``busy()`` (the Widget passes its wait cursor and error display). The user
    may decline (False); an installer failure is raised inside ``busy()``."""
    if torch_install.torch_available():
        return True
    gpu, installer = torch_install.nvidia_gpu_present(), torch_install.pytorch_utils_logic()
    if not confirm(torch_install_question(gpu, installer is not None), _("Install PyTorch")):
        return False
    with busy():
        torch_install.install_torch(pip_install, installer, gpu)
    return torch_install.torch_available()


def torch_install_question(gpu: bool, with_extension: bool) -> str:
    """What the panel asks before installing PyTorch: which build, and with what."""
    build = (_("a CUDA build for the NVIDIA GPU") if gpu
             else _("the CPU build (no NVIDIA GPU found)"))
    how = _("with the PyTorch extension") if with_extension else _("with pip")
    return _("BrainLobeSeg needs PyTorch, which is not installed yet.\n\nInstall {build} now "
             "{how}? This downloads several hundred megabytes and may take a few minutes.").format(
        build=build, how=how)


# ----------------------------------------------------------------------------- developer reload

def import_graph(package_dir: Path) -> Dict[str, Set[str]]:
    """``module -> the package modules it imports`` (anywhere in its file), read from
    the source of every module of the package."""
    names = {p.stem for p in package_dir.glob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for path in package_dir.glob("*.py"):
        deps: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module
                            else [a.name for a in node.names])
        graph[path.stem] = (deps & names) - {path.stem}
    return graph


def reload_order(package: str = __package__, loaded: Optional[Sequence[str]] = None) -> List[str]:
    """The loaded modules of ``package``, each after every module it imports.

    ``from .x import f`` binds ``f`` when the importing module runs, so reloading a
    module before the ones it imports from leaves it holding the old functions. With an
    import circle there is no such order; the modules are then reloaded in name order
    and a warning is logged.
    """
    loaded = list(loaded if loaded is not None else
                  [n for n in sys.modules if n.startswith(package + ".")])
    graph = import_graph(Path(sys.modules[package].__file__).parent)
    short = {name.rsplit(".", 1)[1]: name for name in loaded}
    try:
        order = list(TopologicalSorter({m: graph.get(m, set()) for m in short}).static_order())
    except CycleError as exc:
        logging.warning("BrainLobeSeg reload: import circle %s", exc.args[1])
        order = sorted(short)
    return [short[m] for m in order if m in short]


def reload_package(package: str = __package__) -> None:
    """Reload the package's loaded modules in :func:`reload_order`; a module that
    cannot be reloaded (one needing torch before it is installed) is logged and kept."""
    for name in reload_order(package):
        try:
            importlib.reload(sys.modules[name])
        except Exception as exc:
            logging.warning("BrainLobeSeg reload: %s not reloaded (%s)", name, exc)
