"""``python -m training evaluate``: score the models on a labelled dataset folder.

For every labelled case the engine segments the scan exactly as the extension would
(:class:`BrainLobeSegLib.inference.Segmenter`), and each of these is compared with the
truth: each plane alone (axial, coronal, sagittal), the fused planar model, the 3D model
and the ensemble of both. Output (``--out``): ``report.md`` with tables per region and
per model, the confusion matrices, the left/right check, results split by slice
thickness and by tilt, a per-case table and timings; PNG plots; overlay pictures; and
``metrics.json``, whose summary :func:`summarise` turns into the ``metrics`` of
``model.json`` (``python -m training export --metrics``).

Where the comparison happens: ``N-seg.nii.gz`` holds the truth in the upright layout on
the scan's own voxel grid, so predictions are brought onto that grid
(``SegmentationResult.labels_upright``, and :func:`geometry.labels_to_upright_scan_grid`
for the single planes) and the truth is never resampled. Mapping predictions into the
tilted scan instead would need the truth resampled too (nearest neighbour through ``R``),
which at 5 mm slices and 15 degrees of tilt moves reference voxels by up to a slice and
would score the resampling, not the model. Both are the same voxel grid; with ``R`` the
identity they are the same thing.

The planar and 3D models are each run once; the ensemble is fused from their kept
probabilities by the engine's own functions in the order :class:`Segmenter` uses, so the
ensemble costs no third inference (``Testing/test_evaluate.py`` checks it equals the
engine's ensemble mode voxel for voxel). Plane-alone labels are the engine's
``member_labels``: each network's argmax on the model grid, taken back to the scan grid
by nearest neighbour (the fused models get the engine's 1 mm refinement, planes cannot).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from BrainLobeSegLib import geometry, inference, models, output, regions, transforms
from BrainLobeSegLib.dataset import list_cases, read_case
from BrainLobeSegLib.steps import run_steps
from BrainLobeSegLib.errors import InputError, ModelError
from BrainLobeSegLib.inference import Segmenter, SegmentationResult

from . import metrics as M

PLANES = tuple(models.PLANES)                  # axial, coronal, sagittal
PRIMARY = ("planar", "3d", "ensemble")          # what a user can choose in the extension
MODEL_ORDER = PLANES + PRIMARY
METRICS_FORMAT = 1
#: (upper bound in mm, name). The issue's clinical protocols are <=1.5, 2.5 and 5 mm.
THICKNESS_BINS = ((1.5, "<=1.5 mm"), (3.5, "2.5 mm (1.5-3.5)"), (math.inf, "5 mm (>3.5)"))
#: (upper bound in degrees, name) of the rotation angle of R.
TILT_BINS = ((5.0, "0-5 deg"), (10.0, "5-10 deg"), (15.0, "10-15 deg"), (math.inf, ">15 deg"))
DEFAULT_REFINE_MM = 1.0    # the engine's default (Segmenter.refine_mm)

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


def bin_name(value: float, bins: Sequence[Tuple[float, str]]) -> str:
    """Name of the first bin whose upper bound is >= ``value``."""
    for upper, name in bins:
        if value <= upper:
            return name
    return bins[-1][1]


# ----------------------------------------------------------------------------- models

def model_kinds(model_dir: Optional[Path]) -> Dict[str, Path]:
    """The model folders to evaluate, by kind (``planar``, ``3d``).

    ``model_dir`` is one model folder or a folder of them (default: the bundled models);
    which kinds exist decides which rows the report has (the ensemble needs both).
    """
    if model_dir is not None and not Path(model_dir).exists():
        raise InputError(f"model folder not found: {model_dir}.", "Check the --model path.")
    if model_dir is not None and (Path(model_dir) / models.CARD_NAME).is_file():
        card = models.read_card(Path(model_dir))
        return {card.kind: Path(model_dir)}
    kinds = {models.read_card(f).kind for f in models.list_model_folders(model_dir)}
    if not kinds:
        where = model_dir or models.bundled_models_dir()
        raise ModelError(f"no model folders (with {models.CARD_NAME}) in {where}.",
                         "Train and export models first, or pass --model.")
    return {k: models.find_models(k, model_dir)[0] for k in ("planar", "3d") if k in kinds}


def load_segmenters(model_dir: Optional[Path], device: str = "auto", fusion: str = "mean",
                    threads: Optional[int] = None,
                    refine_mm: Optional[float] = DEFAULT_REFINE_MM) -> Dict[str, Segmenter]:
    """One :class:`Segmenter` per available kind, loaded once for all cases."""
    return {kind: Segmenter(kind, folder, device, fusion, threads, refine_mm=refine_mm)
            for kind, folder in model_kinds(model_dir).items()}


def fuse_ensemble(planar: SegmentationResult, threed: SegmentationResult, scan: sitk.Image,
                  transform: sitk.Transform, fusion: str = "mean",
                  refine_mm: Optional[float] = DEFAULT_REFINE_MM) -> sitk.Image:
    """The ensemble's labels (N-seg layout) from a planar and a 3D result, both run with
    ``keep_probabilities=True``.

    These are the steps of :meth:`Segmenter.segment` after inference, in its order
    (planar first, so a tie in spacing keeps the planar grid), with the engine's own
    functions; a test holds it equal to the ensemble mode.
    """
    if planar.probabilities is None or threed.probabilities is None:
        raise ValueError("fuse_ensemble needs results segmented with keep_probabilities=True")
    outputs = [(planar.grid, planar.probabilities), (threed.grid, threed.probabilities)]
    grid = min((g for g, _ in outputs), key=lambda g: min(g.spacing))
    merged = {**planar.member_labels, **threed.member_labels}
    members = [v for v in merged.values() if v.shape == grid.shape]
    fused = inference.fuse_outputs(outputs, grid, members, fusion)   # the results stay unchanged
    non_brain = next((r.non_brain for r in (planar, threed) if r.grid == grid), None)
    return run_steps(inference.fused_to_labels(fused, grid, scan, transform, refine_mm, non_brain))[2]


def predict_case(segmenters: Dict[str, Segmenter], scan: sitk.Image, transform: sitk.Transform,
                 fusion: str = "mean") -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
    """Every model's labels for one scan in the N-seg layout, and the timings.

    Returns ``(labels, timings)``: labels by model name (:data:`MODEL_ORDER`, those the
    available kinds give) as uint8 ``(z, y, x)`` arrays on the scan's grid; timings
    with wall seconds per kind and the engine's stage times.
    """
    both = "planar" in segmenters and "3d" in segmenters
    out: Dict[str, np.ndarray] = {}
    seconds: Dict[str, float] = {}
    stages: Dict[str, Dict[str, float]] = {}
    results: Dict[str, SegmentationResult] = {}
    for kind in ("planar", "3d"):
        if kind not in segmenters:
            continue
        t0 = time.perf_counter()
        res = segmenters[kind].segment(scan, transform, keep_probabilities=both)
        seconds[kind] = time.perf_counter() - t0
        stages[kind] = dict(res.timings)
        results[kind] = res
        out[kind] = sitk.GetArrayFromImage(res.labels_upright)
        if kind == "planar":
            for plane in PLANES:
                if plane in res.member_labels:
                    img = geometry.labels_to_upright_scan_grid(res.member_labels[plane], res.grid, scan)
                    out[plane] = sitk.GetArrayFromImage(img)
    if both:
        t0 = time.perf_counter()
        img = fuse_ensemble(results["planar"], results["3d"], scan, transform, fusion,
                            segmenters["planar"].refine_mm)
        out["ensemble"] = sitk.GetArrayFromImage(img)
        fusion_s = time.perf_counter() - t0
        # the ensemble mode runs both models one after the other, then fuses
        seconds["ensemble"] = seconds["planar"] + seconds["3d"] + fusion_s
        stages["ensemble"] = {"fusion": fusion_s}
    return {m: out[m] for m in MODEL_ORDER if m in out}, {"seconds": seconds, "stages": stages}


# ----------------------------------------------------------------------------- cases

def case_geometry(scan: sitk.Image, transform: sitk.Transform) -> Dict[str, Any]:
    """Slice thickness (spacing of the third image axis, the slice direction of an axial
    series) and tilt (rotation angle of R), with their report bins."""
    slice_mm = float(scan.GetSpacing()[2])
    tilt = transforms.rotation_angle_deg(transform)
    return {"slice_mm": slice_mm, "tilt_deg": tilt, "spacing_mm": list(scan.GetSpacing()),
            "size": list(scan.GetSize()),
            "thickness_bin": bin_name(slice_mm, THICKNESS_BINS),
            "tilt_bin": bin_name(tilt, TILT_BINS)}


def overlay_slices(truth: np.ndarray) -> List[int]:
    """Three axial slice indices worth looking at: the slice with most ganglionic-level
    labels, the one with most supraganglionic labels, and the one between them."""
    level_of = np.zeros(regions.NUM_LABELS + 1, np.uint8)
    for r in regions.REGIONS:
        level_of[r.label] = 1 if r.level == "ganglionic" else 2
    lev = level_of[truth]
    gang = (lev == 1).sum(axis=(1, 2))
    supra = (lev == 2).sum(axis=(1, 2))
    if not gang.any() and not supra.any():
        n = truth.shape[0]
        return [n // 3, n // 2, (2 * n) // 3]
    g = int(np.argmax(gang)) if gang.any() else int(np.argmax(supra))
    s = int(np.argmax(supra)) if supra.any() else g
    picks = [g, (g + s) // 2, s]
    return sorted(set(picks), key=picks.index)


def _display_flips(scan: sitk.Image) -> Tuple[bool, bool]:
    """(flip rows, flip columns) so an axial slice shows anterior up and the patient's
    right on the image's left (radiological convention) whatever the direction cosines."""
    d = np.array(scan.GetDirection()).reshape(3, 3)
    return bool(d[1, 1] < 0), bool(d[0, 0] < 0)


def overlay_figure(path: str, upright_hu: np.ndarray, truth: np.ndarray,
                   preds: Dict[str, np.ndarray], spacing: Sequence[float], title: str,
                   flips: Tuple[bool, bool] = (False, False)) -> None:
    """Rows: axial slices; columns: truth, then each model's prediction (CT in the
    brain window with the region colours of :mod:`regions` blended on top)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zs = overlay_slices(truth)
    columns = [("truth", truth)] + list(preds.items())
    fig, axes = plt.subplots(len(zs), len(columns), squeeze=False,
                             figsize=(2.6 * len(columns), 2.6 * len(zs) + 0.4))
    aspect = float(spacing[1]) / float(spacing[0])
    for i, z in enumerate(zs):
        for j, (name, lab) in enumerate(columns):
            rgb = output.overlay_slice(upright_hu[z], lab[z])
            if flips[0]:
                rgb = rgb[::-1]
            if flips[1]:
                rgb = rgb[:, ::-1]
            ax = axes[i][j]
            ax.imshow(rgb, aspect=aspect, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"slice {z}", fontsize=8)
    fig.suptitle(title + "  (anterior up, patient's right on the left)", fontsize=9)
    from matplotlib.patches import Patch   # the legend: one entry per region and side
    handles = [Patch(color=np.array(r.color) / 255.0, label=f"{r.code} {r.side}") for r in regions.REGIONS]
    fig.legend(handles=handles, loc="lower center", ncol=10, fontsize=6, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- aggregation

def _nanmean(stack: np.ndarray, axis: int = 0) -> np.ndarray:
    """``np.nanmean`` without the all-NaN warning (the result is NaN there anyway)."""
    stack = np.asarray(stack, np.float64)
    ok = ~np.isnan(stack)
    n = ok.sum(axis=axis)
    s = np.where(ok, stack, 0.0).sum(axis=axis)
    out = np.full(n.shape, np.nan)
    np.divide(s, n, out=out, where=n > 0)
    return out


def mean_dice_over_cases(dice_per_case: Sequence[np.ndarray]) -> float:
    """Each region's Dice averaged over the cases that have it, then averaged over the
    regions: every region counts once, however many cases show it."""
    if not len(dice_per_case):
        return float("nan")
    return M.mean_dice(_nanmean(np.stack(dice_per_case)))


def aggregate(model: str, cases: List[Dict[str, Any]], evals: List[M.Evaluation]) -> Dict[str, Any]:
    """One model's results over all cases.

    Dice, IoU and the mirrored Dice are means over cases of per-case values (a region
    absent from truth and prediction of a case is skipped for that case). Voxel rates
    (misclassified, missed, FP/FN) come from the confusion matrix summed over cases.
    The model is left/right-confusion free only if every case is.
    """
    dice = np.stack([e.scores.dice for e in evals])
    iou = np.stack([e.scores.iou for e in evals])
    mirror = np.stack([np.where(e.scores.present, e.scores.dice_mirror, np.nan) for e in evals])
    pooled = M.evaluate_confusion(sum(e.confusion for e in evals))
    case_means = np.array([e.mean_dice for e in evals], np.float64)
    flagged = [{"case": c["name"], "regions": [regions.REGION_BY_LABEL[k].segment_name
                                               for k in e.lr.confused]}
               for c, e in zip(cases, evals) if not e.lr.confusion_free]
    per_region = {}
    d_mean, d_std, i_mean, m_mean = _nanmean(dice), _nanstd(dice), _nanmean(iou), _nanmean(mirror)
    s = pooled.scores
    for i, r in enumerate(regions.REGIONS):
        per_region[r.segment_name] = {
            "label": r.label, "dice": d_mean[i], "dice_std": d_std[i], "iou": i_mean[i],
            "dice_mirror": m_mean[i], "fp_fn_ratio": s.fp_fn_ratio[i],
            "misclassified": s.misclassified[i], "missed": s.missed[i],
            "cases": int((~np.isnan(dice[:, i])).sum()),
            "lr_flagged_cases": sum(1 for e in evals if r.label in e.lr.confused)}
    groups: Dict[str, Dict[str, Any]] = {}
    for key in ("thickness_bin", "tilt_bin"):
        bins = THICKNESS_BINS if key == "thickness_bin" else TILT_BINS
        groups[key] = {}
        for _, name in bins:
            idx = [j for j, c in enumerate(cases) if c[key] == name]
            if idx:
                groups[key][name] = {"cases": len(idx),
                                     "mean_dice": mean_dice_over_cases([dice[j] for j in idx]),
                                     "lr_confusion_free": all(evals[j].lr.confusion_free for j in idx)}
    finite = case_means[~np.isnan(case_means)]
    return {
        "model": model,
        "cases": len(evals),
        "mean_dice": mean_dice_over_cases(list(dice)),
        "mean_iou": mean_dice_over_cases(list(iou)),
        "case_mean_dice": {"mean": float(finite.mean()) if finite.size else math.nan,
                           "min": float(finite.min()) if finite.size else math.nan,
                           "max": float(finite.max()) if finite.size else math.nan},
        "misclassification_rate": pooled.misclassification_rate,
        "missed_rate": pooled.missed_rate,
        "lr_confusion_free": not flagged,
        "lr_flagged": flagged,
        "regions": per_region,
        "by_thickness": groups["thickness_bin"],
        "by_tilt": groups["tilt_bin"],
        "confusion_matrix": pooled.confusion.tolist(),
    }


def _nanstd(stack: np.ndarray) -> np.ndarray:
    mean = _nanmean(stack)
    return np.sqrt(_nanmean((np.asarray(stack, np.float64) - mean) ** 2))


def clean_json(value: Any) -> Any:
    """numpy scalars/arrays to Python, NaN and infinities to null (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return clean_json(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    return value


# ----------------------------------------------------------------------------- the run

def evaluate(data: Path, model_dir: Optional[Path], out: Path, device: str = "auto",
             limit: Optional[int] = None, overlays: int = 3, fusion: str = "mean",
             threads: Optional[int] = None, refine_mm: Optional[float] = DEFAULT_REFINE_MM,
             invert_transform: bool = False, log: Log = _print) -> Dict[str, Any]:
    """Evaluate every labelled case of ``data``; write the report to ``out``; return the
    metrics (what ``metrics.json`` holds). Nothing is written if a case fails."""
    data = Path(data)
    cases = list_cases(data)
    labelled = [c for c in cases if c.seg_path is not None]
    if not labelled:
        raise InputError(f"{data} has {len(cases)} case(s) but no labels (no N-seg.nii.gz): "
                         "there is nothing to evaluate against.",
                         "Give a dataset folder whose cases have N-seg.nii.gz label files.")
    if len(labelled) < len(cases):
        log(f"skipping {len(cases) - len(labelled)} case(s) without labels: "
            + ", ".join(c.name for c in cases if c.seg_path is None))
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be at least 1, not {limit}.", "")
        labelled = labelled[:limit]
    segmenters = load_segmenters(model_dir, device, fusion, threads, refine_mm)
    kinds = list(segmenters)
    log(f"evaluating {len(labelled)} case(s) of {data} with "
        + ", ".join(f"{k} ({segmenters[k].models[0].card.name})" for k in kinds)
        + f" on {next(iter(segmenters.values())).device}")

    staged = output.OutputSet(str(out))
    try:
        case_rows: List[Dict[str, Any]] = []
        evals: Dict[str, List[M.Evaluation]] = {}
        overlay_files: List[str] = []
        t_all = time.perf_counter()
        for n, case in enumerate(labelled, start=1):
            ct, tf, seg = read_case(case, invert_transform)
            truth = sitk.GetArrayFromImage(seg)
            if not truth.any():   # scored, but only its false positives count: say so
                log(f"warning: case {case.name}: its label file {Path(case.seg_path).name} is all "
                    "zero (no region labelled); check that it is the right file.")
            info = {"name": case.name, **case_geometry(ct, tf)}
            preds, timing = predict_case(segmenters, ct, tf, fusion)
            t0 = time.perf_counter()
            row_models = {}
            for model, pred in preds.items():
                e = M.evaluate_labels(truth, pred)
                evals.setdefault(model, []).append(e)
                row_models[model] = {
                    "mean_dice": e.mean_dice, "mean_iou": e.mean_iou,
                    "misclassification_rate": e.misclassification_rate,
                    "lr_confusion_free": e.lr.confusion_free,
                    "lr_confused": [regions.REGION_BY_LABEL[k].segment_name for k in e.lr.confused],
                    "dice": {r.segment_name: e.scores.dice[i] for i, r in enumerate(regions.REGIONS)}}
            info.update(models=row_models, seconds=timing["seconds"], stage_seconds=timing["stages"],
                        metric_seconds=time.perf_counter() - t0)
            if n <= overlays:
                name = f"overlay_{case.name}.png"
                upright = sitk.GetArrayFromImage(
                    sitk.Resample(ct, ct, tf, sitk.sitkLinear, geometry.AIR_HU, sitk.sitkFloat32))
                overlay_figure(staged.path(name), upright, truth,
                               {m: preds[m] for m in PRIMARY if m in preds}, ct.GetSpacing(),
                               f"case {case.name}: {info['slice_mm']:g} mm slices, "
                               f"tilt {info['tilt_deg']:.1f} deg", _display_flips(ct))
                overlay_files.append(name)
            case_rows.append(info)
            log(f"[{n}/{len(labelled)}] case {case.name}: {info['slice_mm']:g} mm, "
                f"tilt {info['tilt_deg']:.1f} deg; mean Dice "
                + ", ".join(f"{m} {row_models[m]['mean_dice']:.3f}" for m in PRIMARY if m in row_models)
                + f" ({sum(v for k, v in timing['seconds'].items() if k != 'ensemble'):.1f} s)")
        summary = {m: aggregate(m, case_rows, evals[m]) for m in MODEL_ORDER if m in evals}
        result = clean_json({
            "format": METRICS_FORMAT,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "data": str(data.resolve()), "data_name": data.resolve().name,
            "models": {k: {"name": s.models[0].card.name, "version": s.models[0].card.version,
                           "folder": str(s.models[0].folder), "spacing_mm": s.models[0].card.spacing_mm}
                       for k, s in segmenters.items()},
            "settings": {"device": str(next(iter(segmenters.values())).device), "fusion": fusion,
                         "refine_mm": refine_mm, "threads": threads,
                         "invert_transform": invert_transform, "limit": limit,
                         "python": platform.python_version(), "machine": platform.machine()},
            "definitions": {
                "mean_dice": "each region's Dice averaged over the cases that have it (a region "
                             "absent from both truth and prediction of a case is skipped), then "
                             "averaged over regions",
                "rates": "misclassified/missed/fp_fn_ratio from the confusion matrix summed over cases",
                "lr_confusion_free": "in every case, every region present in the truth has a higher "
                                     "Dice against its true side than its mirrored label has",
                "grid": "predictions on the scan's voxel grid in the upright (N-seg) layout"},
            "regions": [{"label": r.label, "segment_name": r.segment_name, "name": r.name}
                        for r in regions.REGIONS],
            "evaluated": [m for m in MODEL_ORDER if m in summary],
            "summary": summary,
            "cases": case_rows,
            "seconds_total": time.perf_counter() - t_all,
        })
        with open(staged.path("metrics.json"), "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, allow_nan=False)
        plots = write_plots(result, staged)
        with open(staged.path("report.md"), "w", encoding="utf-8") as fh:
            fh.write(report_markdown(result, plots, overlay_files))
        files = staged.commit()
    finally:
        staged.discard()
    log(f"wrote {len(files)} files to {out}: report.md, metrics.json, "
        f"{len(plots)} plots, {len(overlay_files)} overlays")
    return result


# ----------------------------------------------------------------------------- plots

def write_plots(result: Dict[str, Any], staged: output.OutputSet) -> List[str]:
    """Per-region Dice bars (one panel per model) and a confusion heat map per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["segment_name"] for r in result["regions"]]
    colours = output.colour_table()[1:] / 255.0
    evaluated = result["evaluated"]
    files = []
    fig, axes = plt.subplots(len(evaluated), 1, squeeze=False, sharex=True,
                             figsize=(11, 1.9 * len(evaluated) + 1.2))
    for ax, model in zip(axes[:, 0], evaluated):
        s = result["summary"][model]
        vals = [s["regions"][n]["dice"] for n in names]
        ax.bar(range(len(names)), [0.0 if v is None else v for v in vals], color=colours,
               edgecolor="black", linewidth=0.4)
        for x, v in enumerate(vals):
            if v is None:
                ax.text(x, 0.02, "n/a", ha="center", fontsize=6, rotation=90)
        ax.set_ylim(0, 1)
        ax.axhline(0.85, color="grey", linestyle=":", linewidth=0.8)
        md = s["mean_dice"]
        ax.set_title(f"{model}: mean Dice {md:.3f}" if md is not None else f"{model}: no Dice",
                     fontsize=9, loc="left")
        ax.set_ylabel("Dice", fontsize=8)
    axes[-1, 0].set_xticks(range(len(names)))
    axes[-1, 0].set_xticklabels(names, rotation=60, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(staged.path("dice_per_region.png"), dpi=90)
    plt.close(fig)
    files.append("dice_per_region.png")

    ticks = ["bg"] + names
    for model in evaluated:
        cm = np.array(result["summary"][model]["confusion_matrix"], np.float64)
        rows = cm.sum(axis=1, keepdims=True)
        norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
        fig, ax = plt.subplots(figsize=(7.5, 6.5))
        im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(ticks)))
        ax.set_yticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=90, fontsize=7)
        ax.set_yticklabels(ticks, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{model}: confusion matrix (rows sum to 1)", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        name = f"confusion_{model}.png"
        fig.savefig(staged.path(name), dpi=80)
        plt.close(fig)
        files.append(name)
    return files


# ----------------------------------------------------------------------------- report

def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def report_markdown(result: Dict[str, Any], plots: Sequence[str], overlays: Sequence[str]) -> str:
    """The human-readable report (GitHub Markdown) of :func:`evaluate`'s result."""
    S, ev = result["summary"], result["evaluated"]
    names = [r["segment_name"] for r in result["regions"]]
    primary = [m for m in PRIMARY if m in ev]
    out = [f"# Evaluation on `{result['data_name']}`\n\n",
           f"{len(result['cases'])} labelled case(s), evaluated {result['created']} on "
           f"{result['settings']['device']} (fusion {result['settings']['fusion']}, labels refined "
           f"to {result['settings']['refine_mm']} mm).\n\n"]
    out.append(_table(["kind", "model", "version", "spacing (mm)"],
                      [[k, v["name"], v["version"], " x ".join(f"{s:g}" for s in v["spacing_mm"])]
                       for k, v in result["models"].items()]))
    out.append("\nDefinitions: " + "; ".join(f"*{k}*: {v}" for k, v in result["definitions"].items())
               + ". Planes are each 2D network alone (its argmax on the model grid); "
                 "the ensemble is the mean of the planar and 3D probabilities.\n")

    out.append("\n## Summary\n\n")
    out.append(_table(["model", "mean Dice", "mean IoU", "case mean Dice min-max", "misclassified",
                       "missed", "L/R confusion free"],
                      [[m, S[m]["mean_dice"], S[m]["mean_iou"],
                        f"{_f(S[m]['case_mean_dice']['min'])}-{_f(S[m]['case_mean_dice']['max'])}",
                        S[m]["misclassification_rate"], S[m]["missed_rate"], S[m]["lr_confusion_free"]]
                       for m in ev]))
    if "dice_per_region.png" in plots:
        out.append("\n![Dice per region](dice_per_region.png)\n")

    out.append("\n## Dice per region\n\nMean over cases (± standard deviation).\n\n")
    out.append(_table(["region"] + list(ev),
                      [[n] + [f"{_f(S[m]['regions'][n]['dice'])} ± {_f(S[m]['regions'][n]['dice_std'], 2)}"
                              for m in ev] for n in names]))

    for m in primary:
        out.append(f"\n### {m}: all region metrics\n\n")
        out.append(_table(["region", "Dice", "IoU", "misclassified", "missed", "FP/FN", "cases"],
                          [[n, r["dice"], r["iou"], r["misclassified"], r["missed"],
                            r["fp_fn_ratio"], r["cases"]]
                           for n, r in ((n, S[m]["regions"][n]) for n in names)]))

    out.append("\n## Left/right check\n\nDice against the true side / Dice of the mirrored "
               "label (means over cases); a region is side-correct in a case when the first is "
               "strictly higher.\n\n")
    out.append(_table(["region"] + list(ev),
                      [[n] + [f"{_f(S[m]['regions'][n]['dice'], 2)} / "
                              f"{_f(S[m]['regions'][n]['dice_mirror'], 2)}"
                              + (f" ({S[m]['regions'][n]['lr_flagged_cases']} flagged)"
                                 if S[m]['regions'][n]['lr_flagged_cases'] else "")
                              for m in ev] for n in names]))
    out.append("\n" + _table(["model", "L/R confusion free", "flagged cases"],
                             [[m, S[m]["lr_confusion_free"],
                               ", ".join(f["case"] for f in S[m]["lr_flagged"]) or "-"] for m in ev]))

    out.append("\n## By slice thickness and tilt\n\nMean Dice (cases).\n\n")
    for key, bins, label in (("by_thickness", THICKNESS_BINS, "slice thickness"),
                             ("by_tilt", TILT_BINS, "tilt")):
        present = [b for _, b in bins if any(b in S[m][key] for m in ev)]
        out.append(_table([label] + list(ev),
                          [[b] + [f"{_f(S[m][key][b]['mean_dice'])} ({S[m][key][b]['cases']})"
                                  if b in S[m][key] else "-" for m in ev] for b in present]))
        out.append("\n")

    out.append("\n## Confusion matrices\n\nRows: true label, columns: predicted label, percent of "
               "the row (empty: 0), summed over cases.\n")
    ticks = ["bg"] + names
    for m in primary:
        cm = np.array(S[m]["confusion_matrix"], np.float64)
        rows = cm.sum(axis=1, keepdims=True)
        pct = np.divide(100 * cm, rows, out=np.zeros_like(cm), where=rows > 0)
        out.append(f"\n### {m}\n\n")
        if f"confusion_{m}.png" in plots:
            out.append(f"![confusion {m}](confusion_{m}.png)\n\n")
        out.append(_table(["true \\ pred"] + ticks,
                          [[ticks[i]] + [f"{v:.1f}" if cm[i, j] else "" for j, v in enumerate(pct[i])]
                           for i in range(len(ticks))]))
    others = [p for p in plots if p.startswith("confusion_") and p[len("confusion_"):-4] not in primary]
    if others:
        out.append("\nSingle planes: " + ", ".join(f"[{p[len('confusion_'):-4]}]({p})" for p in others)
                   + "\n")

    out.append("\n## Cases\n\n")
    out.append(_table(["case", "slice (mm)", "tilt (deg)"] + [f"{m} Dice" for m in ev]
                      + ["L/R ok (" + ", ".join(primary) + ")", "seconds (" + ", ".join(
                          k for k in ("planar", "3d") if k in result["models"]) + ")"],
                      [[c["name"], f"{c['slice_mm']:g}", f"{c['tilt_deg']:.1f}"]
                       + [c["models"][m]["mean_dice"] for m in ev]
                       + [" ".join("ok" if c["models"][m]["lr_confusion_free"] else "NO" for m in primary),
                          " / ".join(f"{c['seconds'][k]:.1f}" for k in ("planar", "3d") if k in c["seconds"])]
                       for c in result["cases"]]))

    out.append("\n## Timings\n\nWall seconds per case (mean, max) with the engine's stages; the "
               "ensemble is the planar and the 3D run one after the other plus fusion, as the "
               "ensemble mode runs them. Metrics per case (all models): "
               f"{np.mean([c['metric_seconds'] for c in result['cases']]):.2f} s. "
               f"Whole evaluation: {result['seconds_total']:.0f} s.\n\n")
    rows = []
    for k in ("planar", "3d", "ensemble"):
        secs = [c["seconds"][k] for c in result["cases"] if k in c["seconds"]]
        if not secs:
            continue
        stage_names = list(dict.fromkeys(  # the engine's order of stages
            s for c in result["cases"] for s in c["stage_seconds"].get(k, {})))
        stages = ", ".join(
            f"{s} {np.mean([c['stage_seconds'][k].get(s, 0.0) for c in result['cases']]):.2f}"
            for s in stage_names)
        rows.append([k, f"{np.mean(secs):.2f}", f"{np.max(secs):.2f}", stages])
    out.append(_table(["run", "mean s", "max s", "stages (mean s)"], rows))

    if overlays:
        out.append("\n## Overlays\n\nAxial slices of the upright CT: the truth, then each "
                   "model (ganglionic level, between, supraganglionic level).\n\n")
        out.extend(f"![{o}]({o})\n\n" for o in overlays)
    return "".join(out)


# ----------------------------------------------------------------------------- export hook

def summarise(metrics_json: Dict[str, Any]) -> Dict[str, Any]:
    """What a model card keeps of an evaluation: per evaluated model (``planar``, ``3d``,
    ``ensemble``, and the planes) its mean Dice, Dice per region and the left/right
    verdict, with the data and case count they come from.

    ``python -m training export --metrics metrics.json`` stores ``summary[kind]`` in
    ``model.json``; the planar entry also lists each plane's mean Dice.
    """
    if not isinstance(metrics_json, dict) or not isinstance(metrics_json.get("summary"), dict):
        raise InputError("this is not a metrics.json written by `python -m training evaluate` "
                         "(no \"summary\").", "Give the metrics.json of an evaluation run.")
    base = {"data": metrics_json.get("data_name"), "evaluated": metrics_json.get("created"),
            "grid": "scan grid, upright (N-seg) layout"}
    out: Dict[str, Any] = {}
    for model, s in metrics_json["summary"].items():
        out[model] = {
            **base, "cases": s.get("cases"), "mean_dice": s.get("mean_dice"),
            "mean_iou": s.get("mean_iou"),
            "misclassification_rate": s.get("misclassification_rate"),
            "lr_confusion_free": s.get("lr_confusion_free"),
            "dice": {n: r.get("dice") for n, r in s.get("regions", {}).items()},
            "by_thickness": {b: g.get("mean_dice") for b, g in s.get("by_thickness", {}).items()},
            "by_tilt": {b: g.get("mean_dice") for b, g in s.get("by_tilt", {}).items()}}
    if "planar" in out:
        out["planar"]["planes"] = {p: out[p]["mean_dice"] for p in PLANES if p in out}
    return out


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True,
                   help="labelled dataset folder (N.nii.gz, N.txt, N-seg.nii.gz)")
    p.add_argument("--model", type=Path, default=None,
                   help="a model folder or a folder of model folders (default: the bundled models)")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: training/reports/<data folder name>)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when PyTorch sees a GPU, else cpu")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N labelled cases only")
    p.add_argument("--overlays", type=int, default=3, help="cases that get overlay pictures")
    p.add_argument("--fusion", choices=inference.FUSIONS, default="mean",
                   help="how the planar networks are fused: mean probability or majority vote")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    p.add_argument("--refine-mm", type=float, default=DEFAULT_REFINE_MM,
                   help="spacing the fused labels are refined to (0: none), as in the extension")
    p.add_argument("--invert-transform", action="store_true",
                   help="the N.txt files map scan -> upright (the other way round)")


def default_out(data: Path) -> Path:
    return Path(__file__).resolve().parent / "reports" / Path(data).resolve().name


def run(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else default_out(args.data)
    evaluate(args.data, args.model, out, device=args.device, limit=args.limit,
             overlays=args.overlays, fusion=args.fusion, threads=args.threads,
             refine_mm=args.refine_mm or None, invert_transform=args.invert_transform)
    return 0
