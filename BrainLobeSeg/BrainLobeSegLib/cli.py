"""The ``brainlobeseg`` command: ``segment``, ``demo`` and ``models``.

Errors the user can fix (:class:`InputError`) print one line and exit with status 2;
nothing partial is written (each case's files are staged and moved into place together).
A progress bar is drawn on a terminal and left out when output is piped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import __version__, console, imageio, models, output, quality, regions, signals, transforms
from .errors import EXIT_INPUT_ERROR, Cancelled, InputError, InputWarning, from_os_error
from .inference import FUSIONS, SegmentationResult, Segmenter
from .modes import DEFAULT_MODE, MODES

if TYPE_CHECKING:   # imported where used: the pose estimate is loaded only when needed
    from . import alignment

EXIT_NO_MODELS = 3
EXIT_INTERNAL = 1
EXIT_CANCELLED = 130


class ProgressBar:
    """A one-line progress bar on a terminal; silent when the stream is not a TTY."""

    def __init__(self, label: str, stream=None, enabled: Optional[bool] = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label, self._last = label, -1.0

    def __call__(self, fraction: float, message: str) -> None:
        if not self.enabled or (fraction - self._last < 0.01 and fraction < 1.0):
            return
        self._last = fraction
        filled = int(round(30 * fraction))
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                          f"{100 * fraction:3.0f}% {message[:40]:<40}")
        if fraction >= 1.0:
            self.stream.write("\n")
        self.stream.flush()


def output_names(case: str, labelmap_suffix: str = ".nii.gz") -> Tuple[str, str, str]:
    """Output file names of a case: scan-grid labels, upright labels, Slicer segmentation."""
    return (f"{case}-aspects{labelmap_suffix}", f"{case}-aspects-upright{labelmap_suffix}",
            f"{case}-aspects.seg.nrrd")


def labelmap_suffix(image: sitk.Image) -> str:
    """``.nii.gz``, or ``.nrrd`` for a sheared grid (gantry tilt read from NRRD/MHA).

    NIfTI cannot store non-orthogonal direction cosines: ITK's writer silently makes
    them orthogonal, which would move the labels off the scan. NRRD keeps them.
    """
    return ".nrrd" if imageio.is_sheared(image) else ".nii.gz"


def write_outputs(result: SegmentationResult, outdir: str, case: str,
                  extra: Optional[Callable[[output.OutputSet], None]] = None) -> List[Path]:
    """Write a case's outputs all together (staged, then renamed)."""
    scan_name, upright_name, seg_name = output_names(case, labelmap_suffix(result.labels_scan))
    with output.OutputSet(outdir) as out:   # a full disk or no permission: one InputError
        output.write_labelmap(result.labels_scan, out.path(scan_name))
        output.write_labelmap(result.labels_upright, out.path(upright_name))
        output.write_seg_nrrd(result.labels_scan, out.path(seg_name))
        if result.quality is not None and not result.quality.ok:
            output.write_text_atomic(result.quality.to_json(), out.path(f"{case}-qc.json"))
        if extra is not None:
            extra(out)
        return out.commit()


def segment_file(segmenter: Segmenter, scan_path: str, transform_path: Optional[str], invert: bool,
                 force: bool, progress, assume_upright: bool = False, keep_probabilities: bool = False
                 ) -> Tuple[sitk.Image, SegmentationResult, "alignment.PoseChoice"]:
    """Read and check one scan and its transform (estimated when there is none, see
    :func:`alignment.choose_pose`), then segment it."""
    from . import alignment, region_pose
    if transform_path:   # a broken transform file fails before the scan is read
        transforms.read_transform(transform_path, invert=invert)
    scan = imageio.read_scan(scan_path)
    imageio.check_ct(scan, force=force, name=os.path.basename(scan_path))
    pose = alignment.choose_pose(scan, transform_path, invert, assume_upright,
                                 progress=lambda f, m: progress(0.1 * f, f"pose: {m}"))
    start = 0.1 if pose.estimate is not None else 0.0
    result, pose = region_pose.segment_with_pose(
        segmenter, scan, pose, progress=lambda f, m: progress(start + (1.0 - start) * f, m),
        keep_probabilities=keep_probabilities)
    quality.require_regions(result.quality, os.path.basename(os.path.normpath(scan_path)))
    return scan, result, pose


def pose_line(name: str, pose: "alignment.PoseChoice", written: Optional[str] = None) -> str:
    """The one line a run prints about the head pose it used."""
    from . import alignment
    if pose.estimate is None:
        source = 'the transform file' if pose.source == 'file' else 'none: taken as upright (--assume-upright)'
        return f"{name}: head pose from {source}"
    where = f"; written to {written} (check it; --transform wins, --assume-upright skips this)" if written else ""
    return f"{name}: {alignment.describe(pose.estimate)}{where}"


def check_output_folder(path: str) -> None:
    """Refuse an unusable output folder before any work is done (:func:`output.check_output_folder`)."""
    output.check_output_folder(path)


def warnings_name(case: str) -> str:
    """The file that records a case's warnings next to its results (only when it has any)."""
    return f"{case}-warnings.txt"


def write_warnings(messages: Sequence[str], path: str) -> None:
    """The warnings of a case as text, one per line: a result made from doubtful input
    (``--force`` on a non-CT, an untrustworthy model) carries that with it."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(f"warning: {m}\n" for m in messages))


def _case_outputs(name: str, outdir: str) -> List[str]:
    """The result files of a case that mark it as done (either label-map suffix)."""
    scan_names = [output_names(name, suffix)[0] for suffix in (".nii.gz", ".nrrd")]
    done = [n for n in scan_names if os.path.exists(os.path.join(outdir, n))]
    return done + [n for n in output_names(name)[1:] if os.path.exists(os.path.join(outdir, n))]


def _segment_one(args: argparse.Namespace, segmenter: Segmenter, job, bar,
                 model_warnings: console.CaseWarnings) -> Tuple[SegmentationResult, "alignment.PoseChoice", List[Path]]:
    """Segment one case and write its files (with the preview, the uncertainty and the
    warnings file when asked for or due) all together."""
    from . import alignment, preview, statistics
    with console.case_warnings(job.name) as case_warnings:
        scan, result, pose = segment_file(segmenter, job.scan, job.transform, args.invert_transform,
                                          args.force, bar, args.assume_upright,
                                          keep_probabilities=args.uncertainty)
        noted = model_warnings.messages + case_warnings.messages

        def extra(o: output.OutputSet) -> None:
            if pose.estimate is not None:
                transforms.write_transform(o.path(job.name + alignment.ESTIMATED_SUFFIX), pose.transform)
            if args.preview:
                preview.write_preview(result, scan, pose.transform, o.path(f"{job.name}-overlay.png"))
            if args.uncertainty:
                unc, _ = statistics.uncertainty_volume(result, scan, pose.transform,
                                                       statistics.planar_names(segmenter))
                imageio.write_image_atomic(unc, o.path(f"{job.name}-uncertainty.nii.gz"))
            if noted:
                write_warnings(noted, o.path(warnings_name(job.name)))
        stale = os.path.join(args.output, warnings_name(job.name))
        files = write_outputs(result, args.output, job.name, extra=extra)
        if not noted and os.path.exists(stale):   # an earlier run's warnings are not this one's
            os.remove(stale)
    return result, pose, files


def cmd_segment(args: argparse.Namespace) -> int:
    from . import alignment, batch
    check_output_folder(args.output)
    jobs = batch.expand_inputs(args.scan, args.transform)
    with console.case_warnings() as model_warnings:
        segmenter = Segmenter(args.mode, args.model, args.device, args.fusion, args.threads)
    if args.verbose:
        for model in segmenter.models:
            print(f"model: {model.card.name} {model.card.version} [{model.card.kind}] from {model.folder}")
    failed = skipped = 0
    for job in jobs:
        done = _case_outputs(job.name, args.output)
        if done and args.skip_existing:
            skipped += 1
            print(f"{job.name}: skipped, its results are in {args.output} (--skip-existing)")
            continue
        if done:
            print(f"{job.name}: replacing its earlier results in {args.output}")
        bar = ProgressBar(job.name, enabled=False if args.quiet else None)
        t0 = time.perf_counter()
        try:
            result, pose, files = _segment_one(args, segmenter, job, bar, model_warnings)
        except InputError as exc:
            if len(jobs) == 1:
                raise
            failed += 1
            print(f"brainlobeseg: {job.name}: {exc}", file=sys.stderr)
            continue
        estimated = os.path.join(args.output, job.name + alignment.ESTIMATED_SUFFIX)
        print(pose_line(job.name, pose, estimated if pose.estimate else None))
        print(f"{job.name}: {result.mode} segmentation in {time.perf_counter() - t0:.1f} s -> "
              + ", ".join(str(f) for f in files))
        if args.verbose:
            print(f"{job.name}: steps " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items()))
    if len(jobs) > 1:
        print(f"{len(jobs) - failed - skipped} of {len(jobs)} cases segmented"
              + (f", {skipped} skipped" if skipped else "") + (f", {failed} failed" if failed else ""))
    if failed:
        print(f"brainlobeseg: {failed} of {len(jobs)} cases failed (see above).", file=sys.stderr)
        return EXIT_INPUT_ERROR
    return 0


def dice_per_label(truth: np.ndarray, pred: np.ndarray) -> dict:
    """Dice of each region present in ``truth`` (label id -> Dice)."""
    out = {}
    for r in regions.REGIONS:
        t, p = truth == r.label, pred == r.label
        denom = t.sum() + p.sum()
        if t.any():
            out[r.label] = float(2.0 * (t & p).sum() / denom)
    return out


#: The demo scan: a clinical 512 x 512 x 110 matrix at 0.45 x 0.45 x 1.5 mm.
DEMO_SIZE, DEMO_SPACING_MM = (512, 512, 110), (0.45, 0.45, 1.5)


def demo_spacing(size: Sequence[int]) -> Tuple[float, float, float]:
    """Spacing that keeps the demo's field of view (the whole head) at any ``--size``:
    a smaller matrix is a coarser scan of the same head, not a crop of it."""
    return tuple(s * n0 / n for s, n0, n in zip(DEMO_SPACING_MM, DEMO_SIZE, size))  # type: ignore[return-value]


def cmd_demo(args: argparse.Namespace) -> int:
    if not models.list_model_folders(args.model):
        print("brainlobeseg demo: no bundled models found in "
              f"{args.model or models.bundled_models_dir()}. The demo segments with the bundled "
              "models and cannot run without them; train and export them with "
              "`python -m training` (see training/README.md).", file=sys.stderr)
        return EXIT_NO_MODELS
    from . import phantom
    segmenter = Segmenter(args.mode, args.model, args.device, threads=args.threads)
    out = Path(args.output)
    print(f"making a synthetic tilted head CT ({'x'.join(map(str, args.size))}, "
          f"tilt {args.angles} degrees)...")
    case = phantom.make_scan(size=tuple(args.size), spacing=demo_spacing(args.size),
                             angles_deg=tuple(args.angles), seed=args.seed)
    in_dir = out / "input"
    in_dir.mkdir(parents=True, exist_ok=True)
    scan_path, tf_path = str(in_dir / "demo.nii.gz"), str(in_dir / "demo.txt")
    imageio.write_image_atomic(case.ct, scan_path)
    transforms.write_transform(tf_path, case.transform)
    t0 = time.perf_counter()
    scan, result, _ = segment_file(segmenter, scan_path, tf_path, False, False,
                                   ProgressBar("demo", enabled=False if args.quiet else None))
    seconds = time.perf_counter() - t0
    transform = transforms.read_transform(tf_path)
    from .preview import write_preview
    files = write_outputs(result, str(out), "demo", extra=lambda o: write_preview(
        result, scan, transform, o.path("demo-overlay.png")))
    dice = dice_per_label(sitk.GetArrayViewFromImage(case.labels_scan),
                          sitk.GetArrayViewFromImage(result.labels_scan))
    print(f"segmented in {seconds:.1f} s ({result.mode}: {', '.join(result.model_names)}); "
          f"{len(dice)} regions, mean Dice against the phantom's truth {np.mean(list(dice.values())):.3f}")
    print(f"input:  {scan_path}\n        {tf_path}")
    for f in files:
        print(f"output: {f}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    folders = models.list_model_folders(args.model)
    if args.json:   # one JSON document (a list of cards with their folders), even if empty
        print(json.dumps([{"folder": str(f), **models.read_card(f).to_json()} for f in folders], indent=2))
    if not folders:
        print(f"no models in {args.model or models.bundled_models_dir()}", file=sys.stderr)
        return EXIT_NO_MODELS
    for folder in folders if not args.json else []:
        card = models.read_card(folder)
        dice = card.metrics.get("mean_dice")
        print(f"{card.name} {card.version} [{card.kind}] at {folder}\n"
              f"  {card.description}\n"
              f"  spacing {card.spacing_mm} mm, window {card.intensity.get('window')} HU, "
              f"networks {', '.join(card.networks)}\n"
              f"  trained on: {card.training.get('data', 'unknown')}\n"
              f"  held-out mean Dice: {dice if dice is not None else 'not recorded'}"
              + (f" (low: below {models.LOW_DICE})" if models.quality_warning(card) else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brainlobeseg", description=(
        "Segment the 20 ASPECTS regions on non-contrast head CT."))
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment scans: files, DICOM folders, dataset folders, globs")
    s.add_argument("scan", nargs="+", metavar="SCAN",
                   help="CT file (NIfTI .nii/.nii.gz, NRRD .nrrd/.nhdr, MetaImage .mha/.mhd), DICOM "
                        "series folder, dataset folder of cases N.nii.gz (+ N.txt), or a glob "
                        "pattern of these; several may be given")
    s.add_argument("--transform", help="ITK transform file that turns the head upright (ITK-SNAP); "
                                       "without one the head pose is estimated and written as "
                                       "<case>" + "-upright-estimated.txt")
    s.add_argument("--invert-transform", action="store_true",
                   help="the transform file maps scan -> upright (the other way round)")
    s.add_argument("--assume-upright", action="store_true",
                   help="no transform and no estimate: the head is upright in the scan as it is")
    s.add_argument("--force", action="store_true", help="skip the 'is this a CT in HU' check")
    s.add_argument("-o", "--output", required=True, help="output folder")
    s.add_argument("--skip-existing", action="store_true",
                   help="leave cases whose results are already in the output folder (batch reruns); "
                        "without it they are replaced, and each replacement is announced")
    s.add_argument("--preview", action="store_true",
                   help="also write <case>-overlay.png: the regions on two upright axial slices, "
                        "with orientation and legend")
    s.add_argument("--uncertainty", action="store_true",
                   help="also write <case>-uncertainty.nii.gz (0-1): where the planes / models "
                        "disagree (planar, ensemble), or 1 - top probability (3d)")
    console.add_verbosity(s)
    _model_options(s)
    s.set_defaults(func=cmd_segment)

    d = sub.add_parser("demo", help="segment a built-in synthetic head CT (no data needed)")
    d.add_argument("-o", "--output", default="brainlobeseg-demo", help="output folder")
    d.add_argument("--size", type=int, nargs=3, default=list(DEMO_SIZE), metavar=("X", "Y", "Z"),
                   help="voxels of the synthetic scan, over the same whole head (default "
                        f"{' '.join(map(str, DEMO_SIZE))} at {' x '.join(map(str, DEMO_SPACING_MM))} mm; "
                        "smaller sizes are coarser and faster)")
    d.add_argument("--angles", type=float, nargs=3, default=[8.0, -6.0, 10.0],
                   metavar=("RX", "RY", "RZ"), help="head tilt in degrees")
    console.add_verbosity(d)
    d.add_argument("--seed", type=int, default=None,
                   help="a seed varies the head's size, shape and tissue densities "
                        "(default: the canonical phantom)")
    _model_options(d)
    d.set_defaults(func=cmd_demo)

    m = sub.add_parser("models", help="list the bundled models and their cards")
    m.add_argument("--model", type=Path, default=None, help="folder of model folders")
    m.add_argument("--json", action="store_true",
                   help="print the full cards as one JSON list (each card with its folder)")
    m.set_defaults(func=cmd_models)
    _register_extensions(sub)
    return console.use_help_formatter(p)


def _model_options(parser: argparse.ArgumentParser, default_mode: str = DEFAULT_MODE) -> None:
    parser.add_argument("--mode", choices=MODES, default=default_mode,
                        help=f"model: planar (3 planes fused), 3d, or ensemble (default {default_mode})")
    parser.add_argument("--fusion", choices=FUSIONS, default="mean",
                        help="how the planar networks are fused: mean probability or majority vote")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: cuda when PyTorch sees a GPU, else cpu")
    parser.add_argument("--model", type=Path, default=None,
                        help="a model folder, or a folder of them (default: bundled models)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for PyTorch (default: PyTorch's choice, all cores)")


def _register_extensions(sub) -> None:
    """Subcommands of other modules (statistics, alignment, dataset tools), if present."""
    for module in ("stats_command", "region_pose", "dataset"):
        try:
            mod = __import__(f"{__package__}.{module}", fromlist=["register_cli"])
        except ImportError:
            continue
        if hasattr(mod, "register_cli"):
            mod.register_cli(sub)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill``, a job scheduler) and SIGHUP (a closed terminal) stop a run like
    Ctrl+C: the staging folders are removed on the way out and one line is printed,
    where the default action would kill the process mid-write and leave them behind."""
    wanted = [s for s in signals.STOP_SIGNALS if s != signal.SIGINT]
    with signals.handlers_swapped(wanted, _interrupt):
        yield


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``brainlobeseg`` command; quiet when the reader of its output goes away."""
    return console.quiet_on_closed_pipe(lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught, signals_as_interrupt():
        warnings.simplefilter("always", InputWarning)
        try:
            with console.quiet_stdout(getattr(args, "quiet", False)):
                code = args.func(args)
        except InputError as exc:
            print(f"brainlobeseg: error: {exc}", file=sys.stderr)
            code = EXIT_INPUT_ERROR
        except BrokenPipeError:   # the reader went away (| head): main() ends quietly
            raise
        except OSError as exc:   # disk full, no permission, a bad path: the user's to fix
            print(f"brainlobeseg: error: {from_os_error(exc)}", file=sys.stderr)
            code = EXIT_INPUT_ERROR
        except (Cancelled, KeyboardInterrupt):
            print("brainlobeseg: cancelled; nothing was written.", file=sys.stderr)
            code = EXIT_CANCELLED
        except Exception as exc:  # a bug, not bad input: one line unless --debug
            if args.debug:
                raise
            print(f"brainlobeseg: internal error: {type(exc).__name__}: {exc} "
                  "(run with --debug for details and please report it)", file=sys.stderr)
            code = EXIT_INTERNAL
        for w in caught:
            if issubclass(w.category, InputWarning):
                print(f"brainlobeseg: warning: {w.message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
