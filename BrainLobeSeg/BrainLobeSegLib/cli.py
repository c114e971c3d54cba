"""The ``brainlobeseg`` command: ``segment``, ``demo`` and ``models``.

Errors the user can fix (:class:`InputError`) print one line and exit with status 2;
nothing partial is written (each case's files are staged and moved into place together).
A progress bar is drawn on a terminal and left out when output is piped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import __version__, console, geometry, imageio, models, output, regions, transforms
from .errors import EXIT_INPUT_ERROR, Cancelled, InputError, InputWarning
from .inference import FUSIONS, SegmentationResult, Segmenter
from .modes import DEFAULT_MODE, MODES

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
    try:
        with output.OutputSet(outdir) as out:
            output.write_labelmap(result.labels_scan, out.path(scan_name))
            output.write_labelmap(result.labels_upright, out.path(upright_name))
            output.write_seg_nrrd(result.labels_scan, out.path(seg_name))
            if extra is not None:
                extra(out)
            return out.commit()
    except OSError as exc:   # disk full, no permission: the user's to fix, not a bug
        raise InputError(f"cannot write the results of {case} to {outdir} "
                         f"({exc.strerror or exc}); nothing was written.",
                         "Free some space or choose another output folder with -o.") from None


def _inputs(scan: str, transform: Optional[str]) -> List[Tuple[str, str, Optional[str]]]:
    """(case name, scan path, transform path) for a file, a DICOM folder or a dataset folder."""
    if os.path.isdir(scan) and not _is_dicom_folder(scan):
        if transform:
            raise InputError("--transform cannot be used with a folder of cases.",
                             "Put each case's transform next to it as N.txt (docs/DESIGN.md layout).")
        from .dataset import list_cases
        return [(c.name, str(c.image_path), str(c.transform_path) if c.transform_path else None)
                for c in list_cases(scan)]
    return [(imageio.strip_image_suffix(scan), scan, transform)]


def _is_dicom_folder(folder: str) -> bool:
    return bool(imageio.dicom_series_ids(folder))


def segment_file(segmenter: Segmenter, scan_path: str, transform_path: Optional[str], invert: bool,
                 force: bool, progress, assume_upright: bool = False
                 ) -> Tuple[sitk.Image, SegmentationResult, "alignment.PoseChoice"]:
    """Read and check one scan and its transform (estimated when there is none, see
    :func:`alignment.choose_pose`), then segment it."""
    from . import alignment
    if transform_path:   # a broken transform file fails before the scan is read
        transforms.read_transform(transform_path, invert=invert)
    scan = imageio.read_scan(scan_path)
    imageio.check_ct(scan, force=force, name=os.path.basename(scan_path))
    pose = alignment.choose_pose(scan, transform_path, invert, assume_upright,
                                 progress=lambda f, m: progress(0.1 * f, f"pose: {m}"))
    start = 0.1 if pose.estimate is not None else 0.0
    result = segmenter.segment(scan, pose.transform,
                               progress=lambda f, m: progress(start + (1.0 - start) * f, m))
    return scan, result, pose


def pose_line(name: str, pose: "alignment.PoseChoice", written: Optional[str] = None) -> str:
    """The one line a run prints about the head pose it used."""
    from . import alignment
    if pose.estimate is None:
        return f"{name}: head pose from {'the transform file' if pose.source == 'file' else 'none: taken as upright (--assume-upright)'}"
    where = f"; written to {written} (check it; --transform wins, --assume-upright skips this)" if written else ""
    return f"{name}: {alignment.describe(pose.estimate)}{where}"


def check_output_folder(path: str) -> None:
    """Refuse an output path that is an existing file before any work is done."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"the output path {path} exists and is not a folder.",
                         "Give a folder for -o (it is created if missing).")


def warnings_name(case: str) -> str:
    """The file that records a case's warnings next to its results (only when it has any)."""
    return f"{case}-warnings.txt"


def write_warnings(messages: Sequence[str], path: str) -> None:
    """The warnings of a case as text, one per line: a result made from doubtful input
    (``--force`` on a non-CT, an untrustworthy model) carries that with it."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("".join(f"warning: {m}\n" for m in messages))


def cmd_segment(args: argparse.Namespace) -> int:
    from . import alignment
    check_output_folder(args.output)
    cases = _inputs(args.scan, args.transform)
    with console.case_warnings() as model_warnings:
        segmenter = Segmenter(args.mode, args.model, args.device, args.fusion, args.threads)
    failed = 0
    for name, scan_path, tf_path in cases:
        bar = ProgressBar(name)
        try:
            t0 = time.perf_counter()
            with console.case_warnings(name) as case_warnings:
                _, result, pose = segment_file(segmenter, scan_path, tf_path, args.invert_transform,
                                               args.force, bar, args.assume_upright)
                estimated = name + alignment.ESTIMATED_SUFFIX
                noted = model_warnings.messages + case_warnings.messages

                def extra(o: output.OutputSet) -> None:
                    if pose.estimate is not None:
                        transforms.write_transform(o.path(estimated), pose.transform)
                    if noted:
                        write_warnings(noted, o.path(warnings_name(name)))
                files = write_outputs(result, args.output, name, extra=extra)
        except InputError as exc:
            if len(cases) == 1:
                raise
            failed += 1
            print(f"brainlobeseg: {name}: {exc}", file=sys.stderr)
            continue
        print(pose_line(name, pose, os.path.join(args.output, estimated) if pose.estimate else None))
        print(f"{name}: {result.mode} segmentation in {time.perf_counter() - t0:.1f} s -> "
              + ", ".join(str(f) for f in files))
    if failed:
        print(f"brainlobeseg: {failed} of {len(cases)} cases failed (see above).", file=sys.stderr)
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


def demo_overlay(result: SegmentationResult, scan: sitk.Image, transform, path: str) -> None:
    """Two axial slices of the upright head (ganglionic and supraganglionic level) with
    the labels over the CT, side by side."""
    hu = geometry.upright_resample(scan, transform, result.grid)
    lab = result.labels_grid
    ganglionic = [r.label for r in regions.REGIONS if r.level == "ganglionic"]
    supra = [r.label for r in regions.REGIONS if r.level == "supraganglionic"]
    panels = []
    for group in (ganglionic, supra):
        counts = np.isin(lab, group).sum(axis=(1, 2))
        z = int(np.argmax(counts)) if counts.any() else lab.shape[0] // 2
        # rows run anterior->posterior, columns patient right->left: radiological view as is
        panels.append(output.overlay_slice(hu[z], lab[z]))
    picture = np.concatenate(panels, axis=1)
    zoom = max(1, int(round(max(result.grid.spacing[:2]) / 0.5)))   # about 0.5 mm a pixel
    output.write_png(np.repeat(np.repeat(picture, zoom, axis=0), zoom, axis=1), path)


def cmd_demo(args: argparse.Namespace) -> int:
    if not models.list_model_folders(args.model):
        print("brainlobeseg demo: no bundled models found in "
              f"{args.model or models.bundled_models_dir()}. The demo segments with the bundled "
              "models and cannot run without them; train and export them with "
              "`python -m training` (see training/README.md).", file=sys.stderr)
        return EXIT_NO_MODELS
    from . import phantom
    out = Path(args.output)
    print(f"making a synthetic tilted head CT ({'x'.join(map(str, args.size))}, "
          f"tilt {args.angles} degrees)...")
    case = phantom.make_scan(size=tuple(args.size), angles_deg=tuple(args.angles), seed=args.seed)
    in_dir = out / "input"
    in_dir.mkdir(parents=True, exist_ok=True)
    scan_path, tf_path = str(in_dir / "demo.nii.gz"), str(in_dir / "demo.txt")
    imageio.write_image_atomic(case.ct, scan_path)
    transforms.write_transform(tf_path, case.transform)
    segmenter = Segmenter(args.mode, args.model, args.device)
    t0 = time.perf_counter()
    scan, result, _ = segment_file(segmenter, scan_path, tf_path, False, False, ProgressBar("demo"))
    seconds = time.perf_counter() - t0
    transform = transforms.read_transform(tf_path)
    files = write_outputs(result, str(out), "demo", extra=lambda o: demo_overlay(
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
              f"  held-out mean Dice: {dice if dice is not None else 'not recorded'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="brainlobeseg", description=(
        "Segment the 20 ASPECTS regions on non-contrast head CT."))
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment a scan, or a folder of cases (N.nii.gz + N.txt)")
    s.add_argument("scan", help="CT file (.nii, .nii.gz, .nrrd), DICOM series folder, or dataset folder")
    s.add_argument("--transform", help="ITK transform file that turns the head upright (ITK-SNAP); "
                                       "without one the head pose is estimated and written as "
                                       "<case>" + "-upright-estimated.txt")
    s.add_argument("--invert-transform", action="store_true",
                   help="the transform file maps scan -> upright (the other way round)")
    s.add_argument("--assume-upright", action="store_true",
                   help="no transform and no estimate: the head is upright in the scan as it is")
    s.add_argument("--force", action="store_true", help="skip the 'is this a CT in HU' check")
    s.add_argument("-o", "--output", required=True, help="output folder")
    _model_options(s)
    s.set_defaults(func=cmd_segment)

    d = sub.add_parser("demo", help="segment a built-in synthetic head CT (no data needed)")
    d.add_argument("-o", "--output", default="brainlobeseg-demo", help="output folder")
    d.add_argument("--size", type=int, nargs=3, default=[512, 512, 110], metavar=("X", "Y", "Z"),
                   help="voxels of the synthetic scan (a clinical 512 x 512 matrix by default; "
                        "smaller sizes run faster)")
    d.add_argument("--angles", type=float, nargs=3, default=[8.0, -6.0, 10.0],
                   metavar=("RX", "RY", "RZ"), help="head tilt in degrees")
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
    for module in ("statistics", "alignment", "dataset"):
        try:
            mod = __import__(f"{__package__}.{module}", fromlist=["register_cli"])
        except ImportError:
            continue
        if hasattr(mod, "register_cli"):
            mod.register_cli(sub)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``brainlobeseg`` command; quiet when the reader of its output goes away."""
    return console.quiet_on_closed_pipe(lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        try:
            code = args.func(args)
        except InputError as exc:
            print(f"brainlobeseg: error: {exc}", file=sys.stderr)
            code = EXIT_INPUT_ERROR
        except (Cancelled, KeyboardInterrupt):
            print("brainlobeseg: cancelled; nothing was written.", file=sys.stderr)
            code = EXIT_CANCELLED
        except BrokenPipeError:   # the reader went away (| head): main() ends quietly
            raise
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
