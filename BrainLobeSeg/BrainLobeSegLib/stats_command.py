"""The ``brainlobeseg stats`` and ``save-case`` commands (see :mod:`statistics`).

Kept apart from the statistics themselves so the engine module never imports the
command line, and the command line can use the statistics (imports run one way).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import TYPE_CHECKING, List, Optional, TextIO, Tuple

import SimpleITK as sitk

from .errors import InputError, InputWarning
from .quality import require_regions
from .statistics import (BRAIN_WINDOW_HU, DEFAULT_DROP_THRESHOLD_HU, print_summary,
                         region_statistics, save_corrected_case, statistics_for_result)

if TYPE_CHECKING:
    from .aspects import AspectsResult, RegionCall
    from .aspects_card import ReadoutCard


def _pose(args: argparse.Namespace, scan: sitk.Image):
    """The transform R for ``save-case``: from the file, or identity (the dataset layout's
    "no N.txt"). Segmenting commands use :func:`alignment.choose_pose` instead."""
    from . import transforms
    return transforms.read_transform(args.transform, invert=args.invert_transform), False


def cmd_stats(args: argparse.Namespace) -> int:
    """``stats`` of every case of the inputs (files, DICOM or dataset folders, globs), one
    after the other; the models are loaded once, at the first case that needs them."""
    from . import batch, output
    from .console import case_warnings
    output.check_output_folder(args.output)   # before minutes of inference, not after
    args.card = _card(args)
    jobs = batch.expand_inputs(args.scan, args.transform)
    if args.labels and len(jobs) != 1:
        raise InputError(f"--labels goes with one scan; {len(jobs)} cases were given.",
                         "Run stats --labels once per scan.")
    segmenters: list = []
    failed = 0
    for job in jobs:
        if len(jobs) > 1:
            print(f"== {job.name} ==")
        try:
            with case_warnings(job.name) as noted:
                _stats_case(args, job, noted, segmenters)
        except InputError as exc:
            if len(jobs) == 1:
                raise
            failed += 1
            print(f"brainlobeseg: {job.name}: {exc}", file=sys.stderr)
    if failed:
        print(f"brainlobeseg: {failed} of {len(jobs)} cases failed (see above).", file=sys.stderr)
        return 2
    return 0


def _stats_case(args: argparse.Namespace, job, noted, segmenters: list) -> None:
    """``stats`` of one case; ``noted`` collects its warnings (the JSON records them),
    ``segmenters`` holds the one Segmenter of the run once made (with its warnings)."""
    from . import cli, imageio, output, transforms
    if not all(math.isfinite(v) for v in (args.threshold, *args.window)):   # JSON has no NaN
        raise InputError("--threshold and --window must be finite numbers of HU.",
                         "Leave them out for the defaults, or give plain numbers.")
    from .console import case_warnings
    case = job.name
    scan = imageio.read_scan(job.scan)
    imageio.check_ct(scan, force=args.force, name=os.path.basename(job.scan))
    settings = dict(window_hu=tuple(args.window), threshold_hu=args.threshold)
    with output.OutputSet(args.output) as out:
        if args.labels:
            if args.auto_align or args.assume_upright:
                raise InputError("--auto-align and --assume-upright have no use with --labels "
                                 "(nothing is segmented).", "Leave them out.")
            labels = imageio.read_scan(args.labels)
            report = region_statistics(scan, labels, **settings)
            report.extra["labels"] = os.path.abspath(args.labels)
        else:
            from .alignment import ESTIMATED_SUFFIX, choose_pose
            from .region_pose import segment_with_pose
            if args.auto_align and args.transform:
                raise InputError("--auto-align and --transform exclude each other.",
                                 "Give the transform file, or leave it out to estimate the pose.")
            bar = cli.ProgressBar(case, enabled=False if args.quiet else None)
            pose = choose_pose(scan, job.transform, args.invert_transform, args.assume_upright,
                               progress=lambda f, m: bar(0.1 * f, f"pose: {m}"))
            if not segmenters:
                with case_warnings() as model_warnings:
                    segmenters.append((cli.Segmenter(args.mode, args.model, args.device, args.fusion,
                                                     args.threads), model_warnings.messages))
            segmenter = segmenters[0][0]
            result, pose = segment_with_pose(segmenter, scan, pose, keep_probabilities=True,
                                             progress=lambda f, m: bar(0.1 + 0.9 * f, m))
            transform = pose.transform
            require_regions(result.quality, case)
            labels = result.labels_scan
            if result.quality is not None and not result.quality.ok:   # as segment does: the
                # warning line points at this file
                output.write_text_atomic(result.quality.to_json(), out.path(f"{case}-qc.json"))
            report, unc = statistics_for_result(scan, result, transform, segmenter, **settings)
            report.extra["segmentation"] = {"mode": result.mode, "models": result.model_names}
            suffix = cli.labelmap_suffix(scan)   # .nrrd on a sheared grid, as segment writes
            imageio.write_image_atomic(unc, out.path(f"{case}-uncertainty{suffix}"))
            output.write_labelmap(result.labels_scan, out.path(f"{case}-aspects{suffix}"))
            report.extra["transform"] = pose.source
            if pose.estimate is not None:
                written = f"{case}{ESTIMATED_SUFFIX}"
                transforms.write_transform(out.path(written), transform)
                report.extra["transform"] = f"estimated ({written}; check it)"
                report.extra["estimated_pose"] = {"angle_deg": round(pose.estimate.angle_deg, 2),
                                                  "pitch_deg": round(pose.estimate.pitch_deg, 2),
                                                  "match": round(pose.estimate.match, 3)}
                print(cli.pose_line(case, pose, os.path.join(args.output, written)))
        report.extra["scan"] = os.path.abspath(job.scan)
        read_out = None if args.no_aspects else _read_out(report, case, scan, labels, args.side, args.card)
        report.extra["warnings"] = (segmenters[0][1] if segmenters else []) + noted.messages
        if read_out is not None:
            write_aspects(out, case, scan, labels, read_out, report.extra)
        output.write_text_atomic(report.to_csv(), out.path(f"{case}-stats.csv"))
        output.write_text_atomic(json.dumps(report.to_json(), indent=2, allow_nan=False),
                                 out.path(f"{case}-stats.json"))
        files = out.commit()
    print_summary(report)
    if read_out is not None:
        print_aspects(read_out)
    for f in files:
        print(f"output: {f}")


# ----------------------------------------------------------------------------- ASPECTS read-out

#: Start of the warning line when the read-out cannot be made (the statistics still are).
SKIPPED = "ASPECTS read-out skipped"


def _card(args: argparse.Namespace) -> Optional["ReadoutCard"]:
    """The ``--aspects-card`` read before any work (a bad card fails at once); None: the
    bundled card."""
    if not args.aspects_card:
        return None
    if args.no_aspects:
        raise InputError("--aspects-card has no use with --no-aspects.", "Leave one of them out.")
    from .aspects_card import load_card
    return load_card(args.aspects_card)


def assess_or_warn(scan: sitk.Image, labels: sitk.Image, side: Optional[str],
                   card: Optional["ReadoutCard"] = None) -> Tuple[Optional["AspectsResult"], Optional[str]]:
    """(the :class:`aspects.AspectsResult` of the case, None), or (None, the one warning
    line it gave) when there can be none.

    Labels that do not define the mid-sagittal plane (fewer than 3 left/right region
    pairs) or hold no soft tissue cannot give a score; the volumes and densities of the
    regions that are there still can, so the run goes on. Regions present but too small to
    measure, and region pairs not assessed for a dense lesion, are counted as not affected
    by the engine; a warning says which and why.
    """
    from . import aspects
    try:
        result = aspects.assess(scan, labels, side=side, card=card)
    except InputError as exc:
        message = f"{SKIPPED}: {exc}"
        warnings.warn(InputWarning(message), stacklevel=2)
        return None, message
    dense = [r.region for r in result.regions if r.dense_lesion_ml is not None]
    if dense:
        warnings.warn(InputWarning(
            f"ASPECTS: {', '.join(dense)}: not assessed, a dense lesion (haemorrhage or calcification) "
            "in the region or its mirror makes the left/right comparison meaningless; the score counts "
            "them as not affected: read the images there."), stacklevel=2)
    unmeasured = [r.region for r in result.regions if r.affected_fraction is None and r.dense_lesion_ml is None]
    if unmeasured:
        warnings.warn(InputWarning(
            f"ASPECTS: {', '.join(unmeasured)}: too little tissue to measure (missing, or under "
            f"{aspects.MIN_MEASURED_ML:g} ml): not called, so the score counts them as not affected; "
            "check the segmentation there."), stacklevel=2)
    return result, None


def _read_out(report, case: str, scan: sitk.Image, labels: sitk.Image, side: Optional[str],
              card: Optional["ReadoutCard"] = None) -> Optional["AspectsResult"]:
    """The read-out of the case, its summary (or why there is none) put in the report."""
    result, skipped = assess_or_warn(scan, labels, side, card)
    report.extra["aspects"] = (aspects_summary(result, f"{case}-aspects-score.json")
                               if result is not None else {"skipped": skipped})
    return result


def aspects_summary(result: "AspectsResult", details: str) -> dict:
    """The read-out in brief for ``<case>-stats.json``: scores, side and affected regions."""
    from .aspects import SIDES
    return {"score": result.score(), "side": result.side, "side_source": result.side_source,
            "side_reason": result.side_reason,
            **{f"score_{s}": result.score(s) for s in SIDES},
            "affected": {s: [r.region for r in result.affected(s)] for s in SIDES},
            "details": details, "notice": "Decision support, not a diagnosis."}


def write_aspects(out, case: str, scan: sitk.Image, labels: sitk.Image, result: "AspectsResult",
                  extra: dict) -> None:
    """The three read-out files into the case's :class:`output.OutputSet` (all or none):
    the calls with their evidence (strict JSON), the evidence map and the preview."""
    from . import imageio, output
    from .aspects_preview import write_aspects_preview
    from .cli import labelmap_suffix
    data = result.to_json()
    data.update({k: extra[k] for k in ("scan", "labels", "warnings") if k in extra})
    output.write_text_atomic(json.dumps(data, indent=2, allow_nan=False), out.path(f"{case}-aspects-score.json"))
    imageio.write_image_atomic(sitk.Cast(result.evidence, sitk.sitkFloat32),
                               out.path(f"{case}-aspects-evidence{labelmap_suffix(scan)}"))
    write_aspects_preview(scan, labels, result, out.path(f"{case}-aspects-score.png"))


def print_aspects(result: "AspectsResult", stream: Optional[TextIO] = None) -> None:
    """The read-out after the statistics table: the symptomatic side and why, one line per
    side with its score and each affected region's first reason, and the notice."""
    from .aspects import SIDES
    stream = stream or sys.stdout
    how = "chosen by the user" if result.side_source == "user" else f"proposed: {result.side_reason}"
    print(f"ASPECTS, symptomatic side {result.side} ({how})", file=stream)
    for side in SIDES:
        calls: List[str] = [f"{r.region} ({_first_reason(r)})" for r in result.affected(side)]
        mark = "  <- symptomatic side" if side == result.side else ""
        print(f"ASPECTS {side} {result.score(side)}: {'; '.join(calls) or 'no region called'}{mark}",
              file=stream)
    print(result.notice, file=stream)


def _first_reason(call: "RegionCall") -> str:
    """Why a region counts as affected, in a few words."""
    if call.override is not None:
        return "set by the clinician"
    return call.reasons[0] if call.reasons else "called"


def cmd_save_case(args: argparse.Namespace) -> int:
    from . import imageio, output
    output.check_output_folder(args.dataset, "--dataset")   # before reading and converting
    scan = imageio.read_scan(args.scan)
    imageio.check_ct(scan, force=args.force, name=os.path.basename(args.scan))
    labels = imageio.read_scan(args.labels)
    transform, _ = _pose(args, scan)
    name = save_corrected_case(args.dataset, scan, labels, transform if args.transform else None,
                               labels_space=args.labels_space, name=args.name)
    print(f"saved case {name} in {args.dataset}")
    return 0


def register_cli(sub) -> None:
    """Add ``stats`` and ``save-case`` to the ``brainlobeseg`` command."""
    from .cli import _model_options
    from .console import add_verbosity

    s = sub.add_parser("stats", help="per-region volume, HU, left-right difference, "
                                     "uncertainty and the ASPECTS read-out (decision support, "
                                     "not a diagnosis)")
    s.add_argument("scan", nargs="+", metavar="SCAN",
                   help="CT file (NIfTI, NRRD, MetaImage), DICOM series folder, dataset folder of "
                        "cases N.nii.gz (+ N.txt), or a glob pattern of these; several may be given")
    s.add_argument("--transform", help="ITK transform file R (upright -> scan), as ITK-SNAP saves it")
    s.add_argument("--invert-transform", action="store_true",
                   help="the transform file maps scan -> upright (the other way round)")
    s.add_argument("--auto-align", action="store_true",
                   help="the default without --transform (kept for old scripts): the head pose is "
                        "estimated and written as <case>-upright-estimated.txt")
    s.add_argument("--assume-upright", action="store_true",
                   help="no transform and no estimate: the head is upright in the scan as it is")
    s.add_argument("--labels", help="ASPECTS labels on the scan grid: skip segmentation")
    s.add_argument("--threshold", type=float, default=DEFAULT_DROP_THRESHOLD_HU,
                   help=f"flag a region this many HU darker than its mirror (default {DEFAULT_DROP_THRESHOLD_HU})")
    s.add_argument("--window", type=float, nargs=2, default=list(BRAIN_WINDOW_HU), metavar=("LOW", "HIGH"),
                   help=f"brain window in HU: voxels outside are not measured "
                        f"(default {BRAIN_WINDOW_HU[0]:g} {BRAIN_WINDOW_HU[1]:g}: no CSF, no calcification)")
    read_out = s.add_mutually_exclusive_group()
    read_out.add_argument("--side", choices=("left", "right"),
                          help="the symptomatic side (from the clinical findings) for the ASPECTS "
                               "read-out of every case given; left out, it is proposed from the "
                               "asymmetry and the reason printed")
    read_out.add_argument("--no-aspects", action="store_true",
                          help="no ASPECTS read-out (<case>-aspects-score.json, "
                               "-aspects-evidence.nii.gz, -aspects-score.png)")
    s.add_argument("--aspects-card", metavar="CARD",
                   help="ASPECTS read-out card (JSON from 'python -m training aspects_fit'; default: "
                        "the bundled one, fitted on synthetic scans)")
    s.add_argument("--force", action="store_true", help="skip the 'is this a CT in HU' check")
    s.add_argument("-o", "--output", required=True, help="output folder")
    add_verbosity(s)
    _model_options(s, default_mode="ensemble")
    s.set_defaults(func=cmd_stats)

    c = sub.add_parser("save-case", help="write a scan and its (corrected) labels as the next "
                                         "numbered case of a training dataset")
    c.add_argument("scan", help="CT file")
    c.add_argument("labels", help="label map on the scan grid (e.g. a corrected <case>-aspects.nii.gz)")
    c.add_argument("--transform", help="ITK transform file R (upright -> scan); identity if left out")
    c.add_argument("--invert-transform", action="store_true",
                   help="the transform file maps scan -> upright (the other way round)")
    c.add_argument("--labels-space", choices=("scan", "upright"), default="scan",
                   help="labels in the scan space (default; converted to the N-seg layout) or "
                        "already upright (N-seg layout)")
    c.add_argument("--name", help="case name (default: the next free number)")
    c.add_argument("--force", action="store_true", help="skip the 'is this a CT in HU' check")
    c.add_argument("--dataset", required=True, help="dataset folder (created if missing)")
    c.set_defaults(func=cmd_save_case)
