"""Where the engine's time goes outside the networks (read, shrink, resample, refine, write).

Times each step of the data flow on the synthetic 512x512x110 scan, split finer than
``Segmenter.timings`` and next to cheaper alternatives, so suggestions come with
numbers. The networks are left out on purpose (they are measured by ``bench.py``); the
refinement gets realistic probabilities (the phantom's own labels, smoothed) because
tiny random models label every voxel, which would make the region box the whole head.

    python -m Testing.benchmarks.profile_engine [--size 512 512 110] [--spacing-3d 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Callable, List, Tuple

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "BrainLobeSeg"))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from BrainLobeSegLib import geometry, imageio, inference, output, phantom, transforms  # noqa: E402
from BrainLobeSegLib.steps import run_steps  # noqa: E402

ROWS: List[Tuple[str, float, str]] = []


def timed(name: str, fn: Callable, note: str = "", repeat: int = 1, memory: bool = False):
    """Best of ``repeat`` wall times of ``fn()`` (and numpy's peak allocation if asked)."""
    best, out, peak = float("inf"), None, None
    for _ in range(repeat):
        if memory:
            tracemalloc.start()
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
        if memory:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    if peak is not None:
        note = (note + "; " if note else "") + f"peak numpy alloc {peak / 1e6:.0f} MB"
    ROWS.append((name, best, note))
    print(f"{best:7.3f} s  {name}  {note}", flush=True)
    return out


def refine_per_class(probs: np.ndarray, grid: geometry.Grid, spacing_mm: float, margin: int = 2):
    """The engine's ``refine_labels`` computed one class at a time with a running argmax:
    identical labels, but only a few fine volumes alive instead of ~5 x 21 of them."""
    coarse = inference.labels_from_probabilities(probs)
    box = geometry.crop_box(coarse.shape, coarse > 0)
    lo = [max(0, s.start - margin) for s in box]
    hi = [min(n, s.stop + margin) for s, n in zip(box, coarse.shape)]
    src = geometry.Grid(tuple(grid.origin[a] + lo[2 - a] * grid.spacing[a] for a in range(3)),
                        grid.spacing, (hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]))
    size = tuple(int((n - 1) * sp / spacing_mm) + 1 for n, sp in zip(src.size, src.spacing))
    fine = geometry.Grid(src.origin, (spacing_mm,) * 3, size)
    best = labels = None
    for c in range(probs.shape[0]):
        sub = probs[c:c + 1, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        p = inference.resample_probabilities(sub, src, fine)[0]
        if best is None:
            best, labels = p, np.zeros(p.shape, np.uint8)
        else:
            better = p > best
            best = np.where(better, p, best)
            labels[better] = c
    return labels, fine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, nargs=3, default=[512, 512, 110])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.45, 0.45, 1.5])
    ap.add_argument("--spacing-3d", type=float, default=2.0, help="model grid spacing (mm)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="brainlobeseg-profile-"))
    case = phantom.make_scan(size=tuple(args.size), spacing=tuple(args.spacing), seed=7,
                             angles_deg=(8.0, -6.0, 10.0))
    ct = sitk.Cast(case.ct, sitk.sitkInt16)
    path, tfp = str(tmp / "p.nii.gz"), str(tmp / "p.txt")
    imageio.write_image_atomic(ct, path)
    transforms.write_transform(tfp, case.transform)
    print(f"scan {ct.GetSize()} {os.path.getsize(path) / 1e6:.1f} MB gzip, threads "
          f"{sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}")

    # read
    def header():
        r = sitk.ImageFileReader()
        r.SetFileName(path)
        r.ReadImageInformation()
    timed("read: header", header)
    timed("read: check_nifti_data (full gzip pass to verify length)", lambda: imageio.check_nifti_data(path))
    scan = timed("read: sitk.ReadImage (decompress + parse)", lambda: sitk.ReadImage(path))
    timed("read: read_scan total", lambda: imageio.read_scan(path))
    timed("read: check_ct", lambda: imageio.check_ct(scan))
    R = transforms.read_transform(tfp)

    # crop
    timed("crop: BinShrink to 4 mm scout", lambda: geometry.shrink_for(scan, 4.0))
    head = timed("crop: head_box total", lambda: geometry.head_box(scan, R))

    # upright resample
    grid = head.grid((args.spacing_3d,) * 3, multiple=8)
    timed(f"resample: BinShrink to {args.spacing_3d:g} mm", lambda: geometry.shrink_for(scan, args.spacing_3d))
    shrunk = geometry.shrink_for(scan, args.spacing_3d)
    timed(f"resample: sitk.Resample linear onto {grid.size}", lambda: sitk.Resample(
        shrunk, grid.reference(), R, sitk.sitkLinear, -1024.0, sitk.sitkFloat32))
    timed("resample: upright_resample total", lambda: geometry.upright_resample(scan, R, grid))
    grid1 = head.grid((1.0, 1.0, 1.0))
    timed(f"resample: planar-like grid 1 mm {grid1.size}", lambda: geometry.upright_resample(scan, R, grid1))

    # refine with realistic probabilities: the phantom's upright labels on the model grid
    lab = sitk.GetArrayFromImage(sitk.Resample(case.labels_upright, grid.reference(),
                                               sitk.AffineTransform(3), sitk.sitkNearestNeighbor))
    probs = np.zeros((21,) + lab.shape, np.float32)
    for c in range(21):
        probs[c] = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(
            sitk.GetImageFromArray((lab == c).astype(np.float32)), 1.0))
    coarse = inference.labels_from_probabilities(probs)
    box = [s.stop - s.start for s in geometry.crop_box(coarse.shape, coarse > 0)]
    print(f"model grid {grid.shape}, region box {box}")
    fine_lab, fine = timed("to scan grid: refine_labels to 1 mm (engine)",
                           lambda: run_steps(inference.refine_labels(probs, grid, 1.0)), memory=True)
    alt, _ = timed("to scan grid: refine one class at a time (same result)",
                   lambda: refine_per_class(probs, grid, 1.0), memory=True)
    print(f"   per-class refine identical to engine: {np.array_equal(alt, fine_lab)} "
          f"(differs on {(alt != fine_lab).mean() * 100:.4f} % voxels)")
    timed("to scan grid: labels_to_scan (NN, 1 mm -> scan grid)",
          lambda: geometry.labels_to_scan(fine_lab, fine, scan, R))
    timed("to scan grid: labels_to_upright_scan_grid",
          lambda: geometry.labels_to_upright_scan_grid(fine_lab, fine, scan))
    coarse_only = timed("to scan grid: labels_to_scan from the 2 mm grid (no refine)",
                        lambda: geometry.labels_to_scan(coarse, grid, scan, R))
    labels_scan = geometry.labels_to_scan(fine_lab, fine, scan, R)
    del coarse_only

    # write
    out = tmp / "out"
    out.mkdir()
    timed("write: labelmap .nii.gz (default compression)",
          lambda: output.write_labelmap(labels_scan, str(out / "a.nii.gz")))
    timed("write: seg.nrrd (gzip) incl. label_extents",
          lambda: output.write_seg_nrrd(labels_scan, str(out / "a.seg.nrrd")))
    timed("write: label_extents alone", lambda: output.label_extents(labels_scan))
    for level in (1, 6):
        timed(f"write: labelmap .nii.gz compressionLevel={level}", lambda: sitk.WriteImage(
            labels_scan, str(out / f"b{level}.nii.gz"), True, level))
    timed("write: labelmap .nii uncompressed", lambda: sitk.WriteImage(labels_scan, str(out / "c.nii"), False))
    for f in sorted(out.iterdir()):
        print(f"   {f.name}: {f.stat().st_size / 1e6:.2f} MB")

    print("\n| step | seconds | note |\n|---|---|---|")
    for name, s, note in ROWS:
        print(f"| {name} | {s:.3f} | {note} |")


if __name__ == "__main__":
    main()
