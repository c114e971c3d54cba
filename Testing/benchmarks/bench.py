"""Speed and memory benchmark of BrainLobeSeg, side by side with an nnU-Net-class network
and an atlas-registration baseline (issue 5; targets in docs/DESIGN.md section 6).

Run from the repository root::

    make bench                                  # bundled models
    make bench ATLAS=atlas                      # + atlas baseline and held-out Dice (docs/DESIGN.md 5.2)
    python -m Testing.benchmarks.bench --help

What is measured, and why this way:

- A synthetic 512x512x110 int16 head CT (tilted) and its ITK-SNAP transform file are
  written to a temporary folder; each mode then goes from *reading that file* to *the
  written outputs* (what a clinician waits for).
- Each mode runs in a fresh subprocess: its peak RSS (VmHWM) is its own, and the first
  run pays every first-call cost (lazy imports, oneDNN kernel selection, allocator
  growth) exactly as a user's first case does. The model load is timed apart from the
  segmentation. A second run in the same process gives the steady state; no warm-up is
  hidden in the first number.
- The nnU-Net-class network (``nnunet_like.py``) runs the same read, crop, upright
  resample and normalisation at the 3D model's spacing (from its card), then its own
  sliding windows. If a full pass would take too long, a fixed number of windows is
  timed and the rest extrapolated; the table says so.
- The atlas baseline registers the Rorden CT template (converted to HU) to the
  upright-resampled scan (affine, then B-spline) and carries the 20 aspects-on-cta masks.

The table is printed and written to ``Testing/benchmarks/RESULTS.md`` with the machine.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
for _p in (REPO / "BrainLobeSeg", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

MODES = ("3d", "planar", "ensemble")
STAGES = ("read", "crop", "upright resample", "normalise", "inference", "fusion",
          "to scan grid", "write")
TARGET_3D_S = 5.0
TARGET_PLANAR_S = 20.0
TARGET_RSS_GB = 2.5
TARGET_NNUNET_RATIO = 4.0
GB = 1e9   # the target's GB read as 10^9 bytes (stricter than GiB)

# Atlas baseline: file code -> our region code (aspects-on-cta names; docs/DESIGN.md section 5.1).
ATLAS_CODES = {"C": "C", "LN": "L", "InCa": "IC", "IC": "I", "M1": "M1", "M2": "M2",
               "M3": "M3", "M4": "M4", "M5": "M5", "M6": "M6"}


# --------------------------------------------------------------------------- helpers
def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def cpu_count() -> int:
    """Cores this process may use (affinity), not the host's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> Dict[str, Any]:
    """CPU model, cores, RAM, load, Python and library versions, for RESULTS.md."""
    info: Dict[str, Any] = {"cpu": platform.processor() or platform.machine(),
                            "cores": cpu_count(), "python": platform.python_version(),
                            "os": platform.platform()}
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in open("/proc/meminfo", encoding="utf-8"):
            if line.startswith("MemTotal"):
                info["ram_gb"] = round(int(line.split()[1]) * 1024 / GB, 1)
                break
        info["load_avg"] = " ".join(open("/proc/loadavg", encoding="utf-8").read().split()[:3])
    except OSError:
        pass
    try:
        import numpy
        import SimpleITK
        import torch
        info.update(torch=torch.__version__, numpy=numpy.__version__,
                    simpleitk=SimpleITK.Version_VersionString())
    except Exception:  # pragma: no cover - reported, not fatal
        pass
    return info


def _fmt(v: Optional[float], digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def _list_cases(folder: Path) -> List[Dict[str, Optional[str]]]:
    """Labelled cases of a dataset folder (``N.nii.gz``, ``N.txt``, ``N-seg.nii[.gz]``)."""
    try:
        from BrainLobeSegLib.dataset import list_cases
        cases = list_cases(folder)
        return [{"name": c.name, "image": str(c.image_path),
                 "transform": str(c.transform_path) if c.transform_path else None,
                 "seg": str(c.seg_path)} for c in cases if c.seg_path is not None]
    except ImportError:
        out = []
        for img in sorted(folder.glob("*.nii*")):
            name = img.name.split(".nii")[0]
            if name.endswith("-seg"):
                continue
            seg = next((p for p in (folder / f"{name}-seg.nii.gz", folder / f"{name}-seg.nii")
                        if p.exists()), None)
            tf = folder / f"{name}.txt"
            if seg is not None:
                out.append({"name": name, "image": str(img),
                            "transform": str(tf) if tf.exists() else None, "seg": str(seg)})
        return out


def dice_scores(truth, pred) -> Tuple[float, str]:
    """Mean Dice of ``pred`` against ``truth`` and which function computed it:
    ``training.metrics.evaluate_labels`` (one confusion matrix; regions absent from both
    skipped) when present, else the engine's per-region helper."""
    import numpy as np
    try:
        from training import metrics  # type: ignore
        return float(metrics.evaluate_labels(np.asarray(truth), np.asarray(pred)).mean_dice), \
            "training.metrics.evaluate_labels"
    except ImportError:
        from BrainLobeSegLib.cli import dice_per_label
        per = dice_per_label(truth, pred)
        return (float(np.mean(list(per.values()))) if per else float("nan"),
                "BrainLobeSegLib.cli.dice_per_label")


# --------------------------------------------------------------------------- workers
def _heldout_dice(segment_fn, cases: List[Dict[str, Optional[str]]]) -> Dict[str, Any]:
    """Mean Dice per held-out case: ``segment_fn(scan, transform) -> labels_upright``
    (the N-seg layout: upright space on the scan grid), compared with ``N-seg``."""
    import SimpleITK as sitk
    from BrainLobeSegLib import imageio, transforms
    per_case, source = {}, ""
    for c in cases:
        scan = imageio.read_scan(c["image"])
        tf = transforms.read_transform(c["transform"])
        pred = segment_fn(scan, tf)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(c["seg"]))
        per_case[c["name"]], source = dice_scores(truth, sitk.GetArrayViewFromImage(pred))
    return {"per_case": per_case, "dice_source": source}


def worker_mode(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One mode in a fresh process: model load, a first run, ``repeat`` steady runs."""
    t0 = time.perf_counter()
    import torch
    from BrainLobeSegLib import cli, imageio, transforms
    from BrainLobeSegLib.inference import Segmenter
    import_s = time.perf_counter() - t0
    threads = spec["threads"]
    torch.set_num_threads(threads)
    t = time.perf_counter()
    seg = Segmenter(spec["mode"], Path(spec["model"]) if spec["model"] else None, "cpu",
                    threads=threads)
    load_s = time.perf_counter() - t
    runs = []
    for r in range(1 + spec["repeat"]):
        out = Path(spec["tmp"]) / f"out-{spec['mode']}-{r}"
        t_start = time.perf_counter()
        transform = transforms.read_transform(spec["transform"])
        scan = imageio.read_scan(spec["scan"])
        imageio.check_ct(scan, name="bench scan")
        t_read = time.perf_counter() - t_start
        result = seg.segment(scan, transform)
        t_w = time.perf_counter()
        cli.write_outputs(result, str(out), "bench")
        t_end = time.perf_counter()
        stages = {"read": t_read, **result.timings, "write": t_end - t_w}
        runs.append({"e2e_s": t_end - t_start, "stages": stages})
        del result, scan
        shutil.rmtree(out, ignore_errors=True)
    rss = peak_rss_bytes()   # before held-out cases, which may be larger than the bench scan
    res: Dict[str, Any] = {"kind": "mode", "mode": spec["mode"], "import_s": import_s,
                           "load_s": load_s, "runs": runs, "peak_rss": rss,
                           "threads": torch.get_num_threads(), "models": seg.models and
                           [m.card.name + " " + m.card.version for m in seg.models]}
    if spec.get("heldout"):
        res["heldout"] = _heldout_dice(lambda s, tf: seg.segment(s, tf).labels_upright,
                                       spec["heldout"])
    return res


def worker_nnunet(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The nnU-Net-class network on the same preprocessed volume as our 3D model."""
    t0 = time.perf_counter()
    import torch
    from BrainLobeSegLib import geometry, imageio, models, transforms
    try:
        from . import nnunet_like  # type: ignore
    except ImportError:
        import nnunet_like  # type: ignore
    import_s = time.perf_counter() - t0
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    folder = models.find_models("3d", Path(spec["model"]) if spec["model"] else None)[0]
    card = models.read_card(folder)
    t = time.perf_counter()
    net = nnunet_like.PlainConvUNet3D(in_channels=1, num_classes=21).eval()
    build_s = time.perf_counter() - t
    stages: Dict[str, float] = {}
    t = time.perf_counter()
    transform = transforms.read_transform(spec["transform"])
    scan = imageio.read_scan(spec["scan"])
    imageio.check_ct(scan, name="bench scan")
    stages["read"] = time.perf_counter() - t
    t = time.perf_counter()
    head = geometry.head_box(scan, transform)
    grid = head.grid(card.spacing_mm)
    stages["crop"] = time.perf_counter() - t
    t = time.perf_counter()
    hu = geometry.upright_resample(scan, transform, grid)
    stages["upright resample"] = time.perf_counter() - t
    t = time.perf_counter()
    volume = models.normalise_intensity(hu, card)
    stages["normalise"] = time.perf_counter() - t
    patch = tuple(spec["nnunet_patch"] for _ in range(3))
    sw = nnunet_like.sliding_window_predict(
        net, volume, patch=patch, max_windows=spec["nnunet_max_windows"],
        budget_s=spec["nnunet_budget_s"])
    stages["inference"] = nnunet_like.estimated_inference_s(sw)
    return {"kind": "nnunet", "import_s": import_s, "load_s": build_s, "stages": stages,
            "spacing_mm": list(card.spacing_mm), "volume_shape": list(volume.shape),
            "padded_shape": sw["padded_shape"], "patch": list(patch),
            "windows_total": sw["windows_total"], "windows_run": sw["windows_run"],
            "window_s": sw["window_s"], "complete": sw["complete"],
            "inference_measured_s": sw["setup_s"] + sum(sw["window_s"]) + sw["finish_s"],
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "peak_rss": peak_rss_bytes(), "threads": torch.get_num_threads()}


# Atlas registration settings: modest on purpose (a minute or two per case on 2 cores).
ATLAS_SPACING_MM = 2.0
AFFINE_ITERATIONS = 60
BSPLINE_MESH = 5
BSPLINE_ITERATIONS = 20
SAMPLING = 0.05


def cormack_to_hu(image):
    """Rorden's Cormack units -> HU (docs/DESIGN.md section 5.2): v = C - 900; v <= 0: h = v;
    v <= 2200: h = v / 11; else h = v - 2000; HU = h - 124."""
    import numpy as np
    import SimpleITK as sitk
    c = sitk.GetArrayFromImage(image).astype(np.float32)
    v = c - 900.0
    h = np.where(v <= 0, v, np.where(v <= 2200, v / 11.0, v - 2000.0))
    out = sitk.GetImageFromArray((h - 124.0).astype(np.float32))
    out.CopyInformation(image)
    return out


def atlas_label_map(atlas_dir: Path):
    """The 20 aspects-on-cta masks as one uint8 label map (ids of regions.py).

    Overlaps are resolved by training/synth.py's ``merge_masks`` (its PRIORITY rule);
    without it, smaller masks win (painted last), which keeps the thin subcortical
    structures and the insula from being swallowed by the large cortical regions.
    """
    import numpy as np
    import SimpleITK as sitk
    from BrainLobeSegLib import regions
    folder = atlas_dir / "aspects-on-cta"
    masks: Dict[int, np.ndarray] = {}
    ref = None
    for fcode, code in ATLAS_CODES.items():
        for suffix, side in (("L", "left"), ("R", "right")):
            img = sitk.ReadImage(str(folder / f"MNI152_{fcode}_{suffix}.nii.gz"))
            ref = ref or img
            masks[regions.region(code, side).label] = sitk.GetArrayViewFromImage(img) > 0.5
    try:   # the training data's own rule, so the baseline is judged on the same truth
        from training.synth import merge_masks  # type: ignore
        labels, rule = merge_masks(masks), "training.synth.merge_masks (PRIORITY, first wins)"
    except ImportError:
        labels = np.zeros(next(iter(masks.values())).shape, np.uint8)
        for k in sorted(masks, key=lambda k: -int(masks[k].sum())):
            labels[masks[k]] = k
        rule = "smaller masks win (training.synth.merge_masks not available)"
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(ref)
    return out, rule


def _tissue(image):
    """Float mask of tissue (> -300 HU): the head's mass, for a moments initialisation
    that air (-1024 HU, a negative 'mass') cannot upset."""
    import SimpleITK as sitk
    return sitk.Cast(sitk.BinaryThreshold(image, -300.0, 1e9, 1, 0), sitk.sitkFloat32)


def _registration(iterations: int, shrink: Sequence[int], sigmas: Sequence[float], seed: int):
    """Mattes MI, random sampling, multi-resolution; the optimizer is set by the caller."""
    import SimpleITK as sitk
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(SAMPLING, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(sigmas))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return reg


def register_atlas(fixed, moving, seed: int = 1):
    """Similarity, then affine, then B-spline registration of ``moving`` to ``fixed``.

    Modest on purpose (a minute or so per case on 2 cores): few iterations, coarse
    levels, 5 % of the voxels sampled. The similarity stage first (initialised on the
    centres of mass of the heads) keeps the affine from stretching the template's neck
    into a scan that shows none. Returns the fixed -> moving transform and the seconds
    of each stage.
    """
    import SimpleITK as sitk
    times = {}
    t = time.perf_counter()
    init = sitk.CenteredTransformInitializer(_tissue(fixed), _tissue(moving), sitk.Similarity3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = _registration(AFFINE_ITERATIONS, [4, 2], [4.0, 2.0], seed)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, AFFINE_ITERATIONS, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(init, inPlace=True)
    reg.Execute(fixed, moving)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(init.GetCenter())
    affine.SetMatrix(init.GetMatrix())
    affine.SetTranslation(init.GetTranslation())
    reg = _registration(AFFINE_ITERATIONS // 2, [2, 1], [2.0, 0.0], seed)
    reg.SetOptimizerAsRegularStepGradientDescent(0.5, 1e-3, AFFINE_ITERATIONS // 2, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(affine, inPlace=True)
    reg.Execute(fixed, moving)
    times["affine"] = time.perf_counter() - t
    t = time.perf_counter()
    bspline = sitk.BSplineTransformInitializer(fixed, [BSPLINE_MESH] * 3)
    reg = _registration(BSPLINE_ITERATIONS, [2, 1], [2.0, 0.0], seed)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=BSPLINE_ITERATIONS)
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bspline, inPlace=True)
    reg.Execute(fixed, moving)
    times["b-spline"] = time.perf_counter() - t
    # ITK applies a composite's transforms last-added first: the B-spline, then the
    # affine, as the registration evaluated moving = affine(bspline(x)).
    return sitk.CompositeTransform([affine, bspline]), times


class AtlasBaseline:
    """Atlas registration as a segmenter: the Rorden template registered to the scan's
    upright copy (affine + B-spline, :func:`register_atlas`), the aspects-on-cta labels
    carried over at 1 mm. ``clip_to_brain`` clips the atlas labels to the template's
    intracranial space, as ``training synth`` profile v2 clips its truth."""

    def __init__(self, atlas_dir: Path, clip_to_brain: bool = False) -> None:
        import SimpleITK as sitk
        self.template = cormack_to_hu(sitk.ReadImage(str(atlas_dir / "Clinical-scct" / "scct.nii.gz")))
        self.labels, self.rule = atlas_label_map(atlas_dir)
        if clip_to_brain:
            self.labels = _clipped_to_brain(self.labels, atlas_dir)
            self.rule += "; clipped to the intracranial prior > 0.5"

    def segment(self, scan, transform, stages: Optional[Dict[str, float]] = None):
        import SimpleITK as sitk
        from BrainLobeSegLib import geometry, inference
        stages = {} if stages is None else stages
        t = time.perf_counter()
        head = geometry.head_box(scan, transform)
        stages["crop"] = time.perf_counter() - t
        t = time.perf_counter()
        grid = head.grid((ATLAS_SPACING_MM,) * 3)
        fixed = grid.image(geometry.upright_resample(scan, transform, grid))
        stages["upright resample"] = time.perf_counter() - t
        tf, reg_times = register_atlas(fixed, self.template)
        stages.update({f"registration ({k})": v for k, v in reg_times.items()})
        t = time.perf_counter()
        fine = head.grid((1.0, 1.0, 1.0))   # labels carried at 1 mm, like the engine's refine
        lab = sitk.GetArrayFromImage(sitk.Resample(self.labels, fine.reference(), tf,
                                                   sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
        labels_scan = geometry.labels_to_scan(lab, fine, scan, transform)
        labels_upright = geometry.labels_to_upright_scan_grid(lab, fine, scan)
        stages["to scan grid"] = time.perf_counter() - t
        return inference.SegmentationResult(labels_scan=labels_scan, labels_upright=labels_upright,
                                            grid=fine, labels_grid=lab, member_labels={},
                                            mode="atlas")


def _clipped_to_brain(labels, atlas_dir: Path):
    """``labels`` without the voxels outside the template's grey + white + CSF prior > 0.5."""
    import SimpleITK as sitk
    from BrainLobeSegLib import transforms
    prior = None
    for name in ("scgrey", "scwhite", "sccsf"):
        img = sitk.ReadImage(str(atlas_dir / "Clinical-scct" / f"{name}.nii.gz"), sitk.sitkFloat32)
        prior = img if prior is None else prior + img
    prior = sitk.Resample(prior, labels, transforms.identity(), sitk.sitkLinear, 0.0)
    arr = sitk.GetArrayFromImage(labels)
    arr[sitk.GetArrayFromImage(prior) <= 0.5] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(labels)
    return out


def worker_atlas(spec: Dict[str, Any]) -> Dict[str, Any]:
    """The atlas baseline end to end on the bench scan, then on held-out cases."""
    import SimpleITK as sitk
    from BrainLobeSegLib import cli, imageio, transforms
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(spec["threads"])
    t = time.perf_counter()
    atlas = AtlasBaseline(Path(spec["atlas_dir"]))
    load_s = time.perf_counter() - t
    stages: Dict[str, float] = {}
    t_start = time.perf_counter()
    transform = transforms.read_transform(spec["transform"])
    scan = imageio.read_scan(spec["scan"])
    imageio.check_ct(scan, name="bench scan")
    stages["read"] = time.perf_counter() - t_start
    result = atlas.segment(scan, transform, stages)
    t = time.perf_counter()
    cli.write_outputs(result, str(Path(spec["tmp"]) / "out-atlas"), "bench")
    stages["write"] = time.perf_counter() - t
    e2e = time.perf_counter() - t_start
    res: Dict[str, Any] = {"kind": "atlas", "load_s": load_s, "e2e_s": e2e, "stages": stages,
                           "peak_rss": peak_rss_bytes(), "overlap_rule": atlas.rule}
    del result, scan
    if spec.get("heldout"):
        res["heldout"] = _heldout_dice(lambda s, tf: atlas.segment(s, tf).labels_upright,
                                       spec["heldout"])
    return res


WORKERS = {"mode": worker_mode, "nnunet": worker_nnunet, "atlas": worker_atlas}


def run_worker(kind: str, spec: Dict[str, Any], log) -> Dict[str, Any]:
    """Run one measurement in a fresh Python process and return its JSON result."""
    tmp = Path(spec["tmp"])
    spec_path = tmp / f"spec-{kind}-{spec.get('mode', '')}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--spec", str(spec_path), "--result", str(out_path)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        log(f"  {kind} {spec.get('mode', '')} FAILED (exit {proc.returncode}):\n{tail}")
        return {"kind": kind, "mode": spec.get("mode"), "error": tail.splitlines()[-1] if tail else
                f"exit {proc.returncode}"}
    res = json.loads(out_path.read_text(encoding="utf-8"))
    res["process_s"] = time.perf_counter() - t
    return res


# --------------------------------------------------------------------------- inputs
def make_bench_scan(folder: Path, size: Sequence[int], spacing: Optional[Sequence[float]],
                    angles: Sequence[float], seed: int) -> Tuple[str, str, str]:
    """Write the synthetic tilted head CT (int16 HU) and its transform file."""
    import SimpleITK as sitk
    from BrainLobeSegLib import imageio, phantom, transforms
    kw: Dict[str, Any] = {"size": tuple(size), "angles_deg": tuple(angles), "seed": seed}
    if spacing:
        kw["spacing"] = tuple(spacing)
    case = phantom.make_scan(**kw)
    ct = case.ct if case.ct.GetPixelID() == sitk.sitkInt16 else sitk.Cast(case.ct, sitk.sitkInt16)
    scan_path, tf_path = str(folder / "bench.nii.gz"), str(folder / "bench.txt")
    imageio.write_image_atomic(ct, scan_path)
    transforms.write_transform(tf_path, case.transform)
    desc = (f"{'x'.join(map(str, ct.GetSize()))} int16, spacing "
            f"{'x'.join(f'{s:g}' for s in ct.GetSpacing())} mm, tilt {tuple(angles)} deg")
    return scan_path, tf_path, desc


def make_tiny_models(folder: Path, spacing_3d: float, spacing_planar: float) -> Path:
    """Random tiny models (the engine's ``models.make_tiny_model``, as the tests use), for
    development and the smoke test before the bundled models exist."""
    from BrainLobeSegLib.models import make_tiny_model
    make_tiny_model(folder / "tiny-3d", "3d", spacing=spacing_3d)
    make_tiny_model(folder / "tiny-planar", "planar", spacing=spacing_planar)
    return folder


def prepare_heldout(args, tmp: Path, log) -> Tuple[List[Dict[str, Optional[str]]], str]:
    """Held-out labelled cases: ``--heldout DIR``, else synthesised with training/synth.py."""
    if args.heldout:
        cases = _list_cases(Path(args.heldout))[: args.n_heldout]
        return cases, f"{len(cases)} cases from {args.heldout}"
    out = tmp / "heldout"
    cmd = [sys.executable, "-m", "training", "synth", "--atlas-dir", str(args.atlas_dir),
           "--out", str(out), "-n", str(args.n_heldout), "--seed", str(args.heldout_seed)]
    log("synthesising held-out scans: " + shlex.join(cmd))
    proc = subprocess.run(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    if proc.returncode != 0:
        last = (proc.stdout.strip().splitlines() or ["?"])[-1]
        return [], f"not available (training synth failed: {last[:160]})"
    cases = _list_cases(out)
    return cases, (f"{len(cases)} scans synthesised by `python -m training synth -n "
                   f"{args.n_heldout} --seed {args.heldout_seed}` (unseen seed, same generator "
                   "as the training data)")


# --------------------------------------------------------------------------- report
def _stage_row(label: str, load: Optional[float], e2e: Optional[float],
               stages: Dict[str, float], rss: Optional[float], extra_keys: Sequence[str],
               other: bool = True, mark: str = "") -> str:
    """One table row: load, end to end (bold), each stage, the rest, peak RSS."""
    cells = [label, _fmt(load), f"**{_fmt(e2e)}**{mark}"]
    cells += [_fmt(stages.get(k)) for k in list(STAGES) + list(extra_keys)]
    known = sum(stages.values())
    cells.append(_fmt(None if e2e is None or not other else e2e - known))
    cells.append(_fmt(None if rss is None else rss / GB))
    return "| " + " | ".join(cells) + " |"


def build_report(results: Dict[str, Any], meta: Dict[str, Any]) -> str:
    """Markdown: stage table, nnU-Net comparison, targets, atlas baseline, machine."""
    lines: List[str] = []
    modes = [m for m in MODES if m in results]
    extra = sorted({k for m in modes if "runs" in results[m]
                    for r in results[m]["runs"] for k in r["stages"] if k not in STAGES})
    lines.append(f"## Speed and memory ({meta['scan']})\n")
    if meta.get("models_note"):
        lines.append(f"**{meta['models_note']}**\n")
    head = ["run", "model load s", "end to end s"] + list(STAGES) + extra + ["other", "peak RSS GB"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for m in modes:
        r = results[m]
        if "error" in r:
            lines.append(f"| {m} | failed: {r['error'][:120]} |" + " |" * (len(head) - 2))
            continue
        first, steady = r["runs"][0], r["runs"][1:]
        lines.append(_stage_row(f"{m} (first run, fresh process)", r["load_s"], first["e2e_s"],
                                first["stages"], r["peak_rss"], extra))
        if steady:
            med = {k: _median([s["stages"].get(k, 0.0) for s in steady]) for k in steady[0]["stages"]}
            lines.append(_stage_row(f"{m} (steady, median of {len(steady)})", None,
                                    _median([s["e2e_s"] for s in steady]), med, None, extra))
    nn = results.get("nnunet")
    if nn and "error" not in nn:
        e2e_nn = None
        if "3d" in results and "runs" in results["3d"]:
            # Same read/crop/resample/normalise/fusion/back/write as our 3D first run,
            # with its inference swapped for the nnU-Net-class sliding windows.
            s3 = results["3d"]["runs"][0]
            e2e_nn = s3["e2e_s"] - s3["stages"].get("inference", 0.0) + nn["stages"]["inference"]
        lines.append(_stage_row("nnU-Net-class 3d_fullres (first run)" + (
            "" if nn["complete"] else " *"), nn["load_s"], e2e_nn, nn["stages"], nn["peak_rss"],
            extra, other=False, mark=" ‡"))
    at = results.get("atlas")
    if at and "error" not in at:
        ak = [k for k in at["stages"] if k.startswith("registration")]
        st = dict(at["stages"])
        st["inference"] = sum(st.pop(k) for k in ak)
        lines.append(_stage_row("atlas registration (affine + B-spline)", at["load_s"],
                                at["e2e_s"], st, at["peak_rss"], extra))
    lines.append("")
    lines.append("Times in seconds, wall clock. *end to end* = reading the scan file and its "
                 "transform to the written outputs (labels on the scan grid, upright labels, "
                 "Slicer .seg.nrrd). *model load* (card check, sha256, weights) is not part "
                 "of it. *other* = end to end minus the listed stages. Peak RSS = the mode's "
                 "own process (VmHWM), GB = 10^9 bytes.")
    if nn and "error" not in nn:
        lines.append("‡ nnU-Net-class end to end = our 3D first run with its inference "
                     "replaced by the nnU-Net-class inference (same pre- and post-processing).")
        if at and "error" not in at:
            lines.append("For the atlas row, *inference* holds the registration "
                         "(" + ", ".join(f"{k[14:-1]} {at['stages'][k]:.1f} s" for k in ak) + ").")
    lines.append("")

    # nnU-Net comparison
    ratios: Dict[str, Optional[float]] = {}
    if nn and "error" not in nn:
        inf_nn = nn["stages"]["inference"]
        lines.append("## Side by side: nnU-Net-class 3d_fullres network\n")
        ws = nn["window_s"]
        how = ("full pass measured" if nn["complete"] else
               f"* EXTRAPOLATED: {nn['windows_run']} of {nn['windows_total']} windows timed, the "
               f"other {nn['windows_total'] - nn['windows_run']} counted at the median steady "
               f"window time")
        lines.append(f"PlainConvUNet, 6 stages (32-64-128-256-320-320), instance norm, LeakyReLU, "
                     f"{nn['params_m']:.1f} M parameters, random weights; {nn['patch'][0]}^3 "
                     f"patches, step 0.5, Gaussian weighting, no mirroring (nnU-Net's default "
                     f"8-fold test-time mirroring would take about 8x longer: the ratios below "
                     f"are conservative). Same spacing as our 3D model "
                     f"({'x'.join(f'{s:g}' for s in nn['spacing_mm'])} mm, from its card), same "
                     f"read/crop/resample/normalise; volume {'x'.join(map(str, nn['volume_shape']))}"
                     f" (z, y, x), padded {'x'.join(map(str, nn['padded_shape']))}, "
                     f"{nn['windows_total']} windows. {how}. Window times: first "
                     f"{ws[0]:.1f} s" + (f", steady median {_median(ws[1:]):.1f} s" if len(ws) > 1 else "")
                     + ".\n")
        lines.append("| compared with | our inference s | nnU-Net-class inference s | inference ratio | "
                     "our end to end s | nnU-Net-class end to end s | end-to-end ratio |")
        lines.append("|---|---|---|---|---|---|---|")
        for m in ("3d", "planar", "ensemble"):
            r = results.get(m)
            if not r or "runs" not in r:
                continue
            s = r["runs"][0]
            ours_inf, ours_e2e = s["stages"].get("inference"), s["e2e_s"]
            nn_e2e = ours_e2e - (ours_inf or 0.0) + inf_nn if m == "3d" else None
            if m != "3d" and "3d" in results and "runs" in results["3d"]:
                s3 = results["3d"]["runs"][0]
                nn_e2e = s3["e2e_s"] - s3["stages"].get("inference", 0.0) + inf_nn
            ri = inf_nn / ours_inf if ours_inf else None
            re_ = nn_e2e / ours_e2e if nn_e2e and ours_e2e else None
            ratios[m] = re_
            ratios[m + "_inference"] = ri
            lines.append(f"| our {m} (first run) | {_fmt(ours_inf)} | {_fmt(inf_nn)} | "
                         f"{_fmt(ri, 1)}x | {_fmt(ours_e2e)} | {_fmt(nn_e2e)} | {_fmt(re_, 1)}x |")
        lines.append("")

    # targets
    lines.append("## Targets (docs/DESIGN.md section 6)\n")
    lines.append("| target | measured | result |")
    lines.append("|---|---|---|")

    def verdict(ok: Optional[bool], detail: str = "") -> str:
        if ok is None:
            return "not measured"
        return ("PASS" if ok else "**FAIL**") + (f" ({detail})" if detail else "")

    for m, limit in (("3d", TARGET_3D_S), ("planar", TARGET_PLANAR_S)):
        r = results.get(m)
        v = r["runs"][0]["e2e_s"] if r and "runs" in r else None
        lines.append(f"| {m} end to end (first run) <= {limit:g} s | {_fmt(v)} s | "
                     + verdict(None if v is None else v <= limit,
                               "" if v is None else f"{v / limit * 100:.0f} % of the budget") + " |")
    for m in modes:
        r = results[m]
        v = r.get("peak_rss")
        lines.append(f"| {m} peak RSS <= {TARGET_RSS_GB:g} GB | {_fmt(None if v is None else v / GB)} GB | "
                     + verdict(None if v is None else v <= TARGET_RSS_GB * GB) + " |")
    for key, label in (("3d", "3d end to end"), ("3d_inference", "3d inference only")):
        v = ratios.get(key)
        lines.append(f"| >= {TARGET_NNUNET_RATIO:g}x faster than nnU-Net-class ({label}) | "
                     f"{_fmt(v, 1)}x | " + verdict(None if v is None else v >= TARGET_NNUNET_RATIO)
                     + " |")
    lines.append("")

    # atlas
    if meta.get("atlas_requested"):
        lines.append("## Atlas-registration baseline\n")
        if at and "error" not in at:
            lines.append(f"Rorden CT template (Cormack units -> HU) registered to the upright scan at "
                         f"{ATLAS_SPACING_MM:g} mm (Mattes MI, affine {AFFINE_ITERATIONS} iterations x 3 "
                         f"levels, then B-spline mesh {BSPLINE_MESH}^3, {BSPLINE_ITERATIONS} "
                         f"iterations x 2 levels, {SAMPLING * 100:g} % random samples), the 20 "
                         f"aspects-on-cta masks carried at 1 mm (overlaps: {at['overlap_rule']}). "
                         f"End to end on the bench scan: {at['e2e_s']:.1f} s, peak RSS "
                         f"{at['peak_rss'] / GB:.2f} GB.\n")
        elif at:
            lines.append(f"Atlas baseline failed: {at['error']}\n")
        lines.append(f"Held-out scans: {meta.get('heldout_note', 'none')}.\n")
        rows = [(m, results[m]) for m in list(modes) + ["atlas"]
                if m in results and "heldout" in results[m]]
        if rows:
            names = sorted({n for _, r in rows for n in r["heldout"]["per_case"]})
            lines.append("| method | mean Dice | " + " | ".join(names) + " |")
            lines.append("|---|---|" + "---|" * len(names))
            for m, r in rows:
                pc = r["heldout"]["per_case"]
                mean = sum(pc.values()) / len(pc) if pc else None
                lines.append(f"| {m} | {_fmt(mean, 3)} | " + " | ".join(_fmt(pc.get(n), 3) for n in names) + " |")
            src = rows[0][1]["heldout"]["dice_source"]
            lines.append(f"\nDice per case = mean over the regions present in the truth "
                         f"(`{src}`), on the scan grid in the upright space (the N-seg layout).\n")
    # machine
    mi = meta["machine"]
    lines.append("## Machine and run\n")
    lines.append(f"- CPU: {mi.get('cpu')}, {mi.get('cores')} cores usable, RAM {mi.get('ram_gb')} GB, "
                 f"load average at start {mi.get('load_avg', 'n/a')}")
    lines.append(f"- Python {mi.get('python')}, torch {mi.get('torch')} "
                 f"({meta['threads']} threads, torch.set_num_threads = cores), numpy {mi.get('numpy')}, "
                 f"SimpleITK {mi.get('simpleitk')}; {mi.get('os')}")
    lines.append(f"- Models: {meta['models']}")
    lines.append(f"- Date: {meta['date']}")
    lines.append(f"- Command: `{meta['command']}` (total {meta['total_s']:.0f} s)")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m Testing.benchmarks.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--model", type=Path, default=None,
                   help="folder of model folders (default: the bundled models)")
    p.add_argument("--tiny-models", action="store_true",
                   help="benchmark tiny random models instead (development, smoke test)")
    p.add_argument("--tiny-spacing", type=float, nargs=2, default=[2.0, 1.0], metavar=("MM_3D", "MM_PLANAR"))
    p.add_argument("--repeat", type=int, default=1, help="steady-state runs after the first (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: number of cores)")
    p.add_argument("--skip-nnunet", action="store_true")
    p.add_argument("--nnunet-patch", type=int, default=128, help="patch edge (default 128, nnU-Net's plan)")
    p.add_argument("--nnunet-max-windows", type=int, default=None,
                   help="time at most this many windows and extrapolate the rest")
    p.add_argument("--nnunet-budget", type=float, default=150.0,
                   help="stop timing windows after this many seconds (>= 2 windows) and extrapolate")
    p.add_argument("--atlas-dir", type=Path, default=None,
                   help="atlas folder (docs/DESIGN.md section 5.2): adds the atlas baseline")
    p.add_argument("--heldout", type=Path, default=None, help="dataset folder of labelled held-out scans")
    p.add_argument("--n-heldout", type=int, default=3)
    p.add_argument("--heldout-seed", type=int, default=90210)
    p.add_argument("--size", type=int, nargs=3, default=[512, 512, 110], metavar=("X", "Y", "Z"))
    p.add_argument("--spacing", type=float, nargs=3, default=[0.45, 0.45, 1.5], metavar=("X", "Y", "Z"))
    p.add_argument("--angles", type=float, nargs=3, default=[8.0, -6.0, 10.0], metavar=("RX", "RY", "RZ"))
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md", help="markdown report to write")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        spec = json.loads(args.spec.read_text(encoding="utf-8"))
        res = WORKERS[args.worker](spec)
        args.result.write_text(json.dumps(res), encoding="utf-8")
        return 0

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_total = time.perf_counter()
    threads = args.threads or cpu_count()
    tmp = Path(tempfile.mkdtemp(prefix="brainlobeseg-bench-"))
    try:
        machine = machine_info()
        if args.tiny_models:
            model_dir: Optional[Path] = make_tiny_models(tmp / "models", *args.tiny_spacing)
            note = ("TINY RANDOM MODELS (development run, not the bundled models): the inference "
                    "numbers say nothing about the real models")
        else:
            model_dir, note = args.model, ""
        from BrainLobeSegLib import models
        try:
            folders = sorted({f for m in args.modes for f in models.find_models(m, model_dir)})
        except Exception as exc:
            log(f"bench: {exc}\n(pass --model DIR, or --tiny-models for a development run)")
            return 2
        model_desc = ", ".join(f"{c.name} {c.version} [{c.kind}, {'x'.join(f'{s:g}' for s in c.spacing_mm)} mm]"
                               for c in (models.read_card(f) for f in folders))
        log(f"bench: writing the synthetic scan ({'x'.join(map(str, args.size))}) to {tmp}")
        scan, tf, scan_desc = make_bench_scan(tmp, args.size, args.spacing, args.angles, args.seed)
        heldout, heldout_note = [], "none"
        if args.atlas_dir:
            heldout, heldout_note = prepare_heldout(args, tmp, log)
        base = {"scan": scan, "transform": tf, "tmp": str(tmp), "threads": threads,
                "model": str(model_dir) if model_dir else None, "repeat": args.repeat,
                "heldout": heldout}
        results: Dict[str, Any] = {}
        for mode in args.modes:
            log(f"bench: {mode} mode (fresh process)")
            results[mode] = run_worker("mode", {**base, "mode": mode}, log)
        if not args.skip_nnunet:
            log("bench: nnU-Net-class 3d_fullres network (fresh process)")
            results["nnunet"] = run_worker("nnunet", {
                **base, "mode": "nnunet", "nnunet_patch": args.nnunet_patch,
                "nnunet_max_windows": args.nnunet_max_windows,
                "nnunet_budget_s": args.nnunet_budget}, log)
        if args.atlas_dir:
            log("bench: atlas registration baseline (fresh process)")
            results["atlas"] = run_worker("atlas", {**base, "mode": "atlas",
                                                    "atlas_dir": str(args.atlas_dir)}, log)
        command = os.environ.get("BENCH_COMMAND") or "python -m Testing.benchmarks.bench " + shlex.join(
            argv if argv is not None else sys.argv[1:])
        meta = {"scan": f"synthetic head CT {scan_desc}", "machine": machine, "threads": threads,
                "models": model_desc, "models_note": note, "atlas_requested": bool(args.atlas_dir),
                "heldout_note": heldout_note, "command": command,
                "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                "total_s": time.perf_counter() - t_total}
        report = build_report(results, meta)
        print(report)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# BrainLobeSeg benchmark results\n\n" + report, encoding="utf-8")
        (args.out.with_suffix(".json")).write_text(json.dumps({"meta": meta, "results": results},
                                                              indent=1, default=str), encoding="utf-8")
        log(f"bench: wrote {args.out}")
        failed = [k for k, v in results.items() if "error" in v]
        return 1 if failed else 0
    finally:
        if args.keep:
            log(f"bench: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
