"""Dice under what real scanners send: calibration offsets, gain, noise, thick slices,
head pitch and a cut vertex (issue 12's robustness benchmark; printed numbers).

For each held-out labelled case (``N.nii.gz``, ``N.txt``, ``N-seg.nii.gz``) and each
condition, the scan is changed in a known way, segmented with the true transform (for
the pitch conditions: the true transform composed with the known extra rotation), and
scored on the scan grid (the truth ``N-seg`` mapped there through ``R``, so a cut field
of view also cuts the truth). Printed per condition and mode: mean Dice over regions and
cases, and the labelled volume in bone (> 150 HU after the calibration shift) per scan. ``--calibration on|off``
overrides the models' card (``intensity.calibration``) to measure what the input
calibration does with the same weights. With ``--markdown`` the table is written there.

    python Testing/benchmarks/robustness_bench.py --data /tmp/heldout --cases 8 \\
        --modes 3d --conditions clean offset-30 offset+30 noise15 --markdown out.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from BrainLobeSegLib import dataset, geometry, inference, models, regions, transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))
from Testing.benchmarks.bench import AtlasBaseline  # noqa: E402

AIR_LIMIT_HU = -1000.0      # tissue above this; air is left alone by every change
Case = Tuple[sitk.Image, sitk.Transform, sitk.Image]


def _tissue_map(ct: sitk.Image, fn: Callable[[np.ndarray], np.ndarray]) -> sitk.Image:
    arr = sitk.GetArrayFromImage(ct).astype(np.float32)
    tissue = arr > AIR_LIMIT_HU
    arr[tissue] = fn(arr[tissue])
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(ct)
    return out


def offset(hu: float) -> Callable[[Case], Case]:
    return lambda c: (_tissue_map(c[0], lambda v: v + hu), c[1], c[2])


def gain(g: float) -> Callable[[Case], Case]:
    return lambda c: (_tissue_map(c[0], lambda v: v * g), c[1], c[2])


def noise(sd: float) -> Callable[[Case], Case]:
    rng = np.random.default_rng(5)
    return lambda c: (_tissue_map(c[0], lambda v: v + rng.normal(0, sd, v.shape).astype(np.float32)), c[1], c[2])


def thick_slices(mm: float) -> Callable[[Case], Case]:
    """Slices of ``mm`` thickness: the scan averaged over the thickness (partial volume)."""
    def change(c: Case) -> Case:
        ct, R, seg = c
        sp = ct.GetSpacing()
        if sp[2] >= mm:
            return c
        # a Gaussian slice profile of the new thickness (FWHM = mm), along the slice axis
        smooth = sitk.DiscreteGaussian(sitk.Cast(ct, sitk.sitkFloat32), [0.0, 0.0, (mm / 2.355) ** 2],
                                       32, 0.01, True)
        size = list(ct.GetSize())
        size[2] = max(2, int(round((size[2] - 1) * sp[2] / mm)) + 1)
        ref = sitk.Image(size, sitk.sitkUInt8)
        ref.SetOrigin(ct.GetOrigin())
        ref.SetDirection(ct.GetDirection())
        ref.SetSpacing((sp[0], sp[1], mm))
        new = sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
        new_seg = sitk.Resample(seg, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        return new, R, new_seg
    return change


def pitch(deg: float) -> Callable[[Case], Case]:
    """The head nodded by ``deg`` more about its centre; the transform says so."""
    def change(c: Case) -> Case:
        ct, R, seg = c
        if deg == 0:
            return c
        centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in ct.GetSize()]))
        Q = transforms.rotation((deg, 0.0, 0.0), center=tuple(centre))
        q_inv = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(Q)))
        turned = sitk.Resample(ct, ct, q_inv, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
        R2 = transforms.affine_from_matrix(transforms.matrix_of(Q) @ transforms.matrix_of(R))
        return turned, R2, seg
    return change


def vertex_cut(mm: float) -> Callable[[Case], Case]:
    def change(c: Case) -> Case:
        ct, R, seg = c
        keep = ct.GetSize()[2] - int(round(mm / ct.GetSpacing()[2]))
        return ct[:, :, :keep], R, seg[:, :, :keep]
    return change


#: The regions an inserted infarct covers: a right MCA stroke (lentiform, insula, M2, M5).
INFARCT_LABELS = tuple(regions.region(code, "right").label for code in ("L", "I", "M2", "M5"))


def infarct(drop_hu: float) -> Callable[[Case], Case]:
    """A hypodense infarct of ``drop_hu`` over the whole of :data:`INFARCT_LABELS` (the
    truth mapped onto the scan); the region labels stay what they were."""
    def change(c: Case) -> Case:
        ct, R, seg = c
        inside = np.isin(truth_on_scan(ct, R, seg), INFARCT_LABELS)
        arr = sitk.GetArrayFromImage(ct).astype(np.float32)
        arr[inside] += drop_hu
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(ct)
        return out, R, seg
    return change


CONDITIONS: Dict[str, Callable[[Case], Case]] = {
    "clean": lambda c: c,
    **{f"offset{h:+d}": offset(float(h)) for h in range(-40, 41, 10) if h},
    "gain0.9": gain(0.9), "gain1.1": gain(1.1), "noise5": noise(5.0), "noise15": noise(15.0),
    "slices5mm": thick_slices(5.0), "pitch15": pitch(15.0), "pitch30": pitch(30.0),
    "vertexcut30": vertex_cut(30.0), "infarct-10": infarct(-10.0),
}


def truth_on_scan(ct: sitk.Image, R: sitk.Transform, seg: sitk.Image) -> np.ndarray:
    """The upright-layout truth on the scan's own grid (what the scan shows)."""
    inv = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(R)))
    return sitk.GetArrayFromImage(sitk.Resample(seg, ct, inv, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def score(truth: np.ndarray, pred: np.ndarray, labels: Optional[Tuple[int, ...]] = None) -> float:
    """Mean Dice over the regions present in the truth (only ``labels`` if given)."""
    per = [2.0 * ((truth == r.label) & (pred == r.label)).sum()
           / max(1, (truth == r.label).sum() + (pred == r.label).sum())
           for r in regions.REGIONS if (truth == r.label).any() and (labels is None or r.label in labels)]
    return float(np.mean(per)) if per else float("nan")


def bone_ml(ct: sitk.Image, pred: np.ndarray) -> float:
    """Labelled volume (ml) denser than 150 HU after the scan's calibration shift: bone
    is bone whatever the scanner's offset (raw HU would count brain at +40 HU offsets'
    partial volume as bone)."""
    hu = sitk.GetArrayViewFromImage(ct)
    threshold = 150.0 + geometry.calibration_shift(hu)
    return float(((pred > 0) & (hu > threshold)).sum() * np.prod(ct.GetSpacing()) / 1000.0)


def with_calibration(seg: inference.Segmenter, setting: str) -> None:
    """Override the loaded cards' input calibration (same weights)."""
    for m in seg.models:
        if setting == "on":
            m.card.intensity["calibration"] = models.CALIBRATION_SOFT_TISSUE
        elif setting == "off":
            m.card.intensity.pop("calibration", None)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="labelled held-out dataset folder")
    p.add_argument("--cases", type=int, default=20, help="first N labelled cases")
    p.add_argument("--modes", nargs="+", default=["3d"], choices=["3d", "planar", "ensemble", "atlas"],
                   help="engine modes, and 'atlas' for the atlas-registration baseline (needs --atlas-dir)")
    p.add_argument("--atlas-dir", type=Path, default=None,
                   help="folder with Clinical-scct/ and aspects-on-cta/ (the atlas baseline)")
    p.add_argument("--atlas-clip", action="store_true",
                   help="clip the atlas labels to the intracranial space (as synth profile v2 does)")
    p.add_argument("--model", default=None, help="model folder(s) (default: bundled)")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=list(CONDITIONS))
    p.add_argument("--calibration", choices=("card", "on", "off"), default="card")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    cases = [c for c in dataset.list_cases(args.data) if c.seg_path is not None][: args.cases]
    table: Dict[Tuple[str, str], List[Tuple[float, float]]] = {}
    t0 = time.perf_counter()
    for mode in args.modes:
        if mode == "atlas":
            if args.atlas_dir is None:
                p.error("--modes atlas needs --atlas-dir")
            seg = AtlasBaseline(args.atlas_dir, clip_to_brain=args.atlas_clip)
        else:
            seg = inference.Segmenter(mode, args.model, "cpu")
            with_calibration(seg, args.calibration)
        for case in cases:
            base = dataset.read_case(case)
            for name in args.conditions:
                ct, R, up = CONDITIONS[name](base)
                pred = sitk.GetArrayFromImage(seg.segment(ct, R).labels_scan)
                truth = truth_on_scan(ct, R, up)
                d, b, a = score(truth, pred), bone_ml(ct, pred), score(truth, pred, INFARCT_LABELS)
                table.setdefault((mode, name), []).append((d, b, a))
                print(f"{mode:<8} case {case.name:<4} {name:<12} Dice {d:.3f}  in bone {b:5.2f} ml  "
                      f"infarct regions {a:.3f}", flush=True)
    lines = [f"Data: {args.data}, {len(cases)} cases; calibration: {args.calibration}; "
             f"{time.perf_counter() - t0:.0f} s", "",
             "| mode | condition | mean Dice | vs clean | bone ml/scan (max) | Dice of R L, I, M2, M5 | vs clean |",
             "|---|---|---|---|---|---|---|"]
    for (mode, name), rows in table.items():
        d, b, a = (np.array([r[k] for r in rows]) for k in range(3))
        clean = table.get((mode, "clean"), rows)
        lines.append(f"| {mode} | {name} | {d.mean():.3f} | {d.mean() - np.mean([r[0] for r in clean]):+.3f} | "
                     f"{b.mean():.2f} ({b.max():.2f}) | {np.nanmean(a):.3f} | "
                     f"{np.nanmean(a) - np.nanmean([r[2] for r in clean]):+.3f} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
