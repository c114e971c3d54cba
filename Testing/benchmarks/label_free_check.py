"""Label-free checks of a segmentation on real scans (no truth needed; issue 12).

For each scan (a file or a DICOM folder; several may be given):

- the share of labelled volume in bone (> 150 HU, after the scan's calibration shift) and
  in air (< -200 HU);
- the left/right volume ratio of each region (1 = symmetric), and regions missing on a side;
- consistency under a known head rotation: the head is turned by ``Q`` (``--turn`` degrees
  about x, y, z, about the head centre), segmented again *without a transform* (through the
  automatic alignment), its labels mapped back through ``Q``, and compared with the unturned
  result by mean Dice over the regions;
- an overlay montage PNG (``--montage``): upright axial slices at five levels with the
  labels, anterior up, the patient's right on the image's left (radiological view). A
  picture of a scan under ``../shared/data`` is that data: write it outside the project.

The unturned scan is segmented without a transform too (the automatic pose), as a
clinician without an ITK-SNAP file would. Printed numbers only; nothing is asserted.

    python Testing/benchmarks/label_free_check.py atlas/real-ct/dcm_qa_ct-GE \\
        --montage OUT/real-ct-overlay.png
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import numpy as np
import SimpleITK as sitk

from BrainLobeSegLib import alignment, geometry, imageio, inference, output, regions, transforms


def region_volumes(labels: np.ndarray, voxel_ml: float) -> dict:
    counts = np.bincount(labels.ravel(), minlength=regions.NUM_LABELS + 1)
    return {r.label: float(counts[r.label] * voxel_ml) for r in regions.REGIONS}


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    per = [2.0 * ((a == r.label) & (b == r.label)).sum() / max(1, (a == r.label).sum() + (b == r.label).sum())
           for r in regions.REGIONS if (a == r.label).any() or (b == r.label).any()]
    return float(np.mean(per)) if per else float("nan")


def montage(scan: sitk.Image, transform: sitk.Transform, result: inference.SegmentationResult,
            path: str, levels: int = 5) -> None:
    """Upright axial slices through the labelled range, labels over the brain window."""
    grid = result.grid
    hu = geometry.upright_resample(scan, transform, grid)
    lab = result.labels_grid
    zs = np.nonzero(lab.any(axis=(1, 2)))[0]
    if not len(zs):
        return
    picks = np.linspace(zs.min() + 2, zs.max() - 2, levels).round().astype(int)
    # rows run anterior->posterior (LPS y grows posterior), columns patient right->left
    tiles = [output.overlay_slice(hu[z], lab[z]) for z in picks]
    picture = np.concatenate(tiles, axis=1)
    zoom = max(1, int(round(max(grid.spacing[:2]) / 0.75)))
    from BrainLobeSegLib.preview import explained   # orientation line and legend below
    output.write_png(explained(np.repeat(np.repeat(picture, zoom, axis=0), zoom, axis=1)), path)


def automatic(seg: inference.Segmenter, scan: sitk.Image):
    """Segmented as ``segment`` does without a transform: the pose estimated, checked
    against the regions found; returns (result, the pose estimate used)."""
    from BrainLobeSegLib import region_pose
    est = alignment.estimate_pose(scan)
    result, pose = region_pose.segment_with_pose(seg, scan, alignment.PoseChoice(est.transform, "estimated", est))
    return result, pose.estimate


def check(path: str, seg: inference.Segmenter, turn, montage_path: Optional[str]) -> None:
    scan = sitk.Cast(imageio.read_scan(path), sitk.sitkFloat32)
    imageio.check_ct(scan, name=path)
    result, est = automatic(seg, scan)
    labels = sitk.GetArrayFromImage(result.labels_scan)
    voxel_ml = float(np.prod(scan.GetSpacing())) / 1000.0
    hu = sitk.GetArrayViewFromImage(scan)
    shift = geometry.calibration_shift(hu)
    labelled = labels > 0
    print(f"{path}: {alignment.describe(est)}")
    print(f"  labelled {labelled.sum() * voxel_ml:.0f} ml; in bone (> 150 HU calibrated) "
          f"{(labelled & (hu > 150 + shift)).sum() * voxel_ml:.2f} ml "
          f"({100 * (labelled & (hu > 150 + shift)).sum() / max(1, labelled.sum()):.2f} %); "
          f"in air (< -200 HU) {(labelled & (hu < -200)).sum() * voxel_ml:.2f} ml")
    vols = region_volumes(labels, voxel_ml)
    missing = [r.name for r in regions.REGIONS if vols[r.label] == 0]
    ratios = []
    for r in regions.REGIONS:
        if r.side == "left":
            right = regions.region(r.code, "right").label
            ratio = vols[r.label] / vols[right] if vols[right] else float("inf")
            ratios.append(f"{r.code} {vols[r.label]:.1f}/{vols[right]:.1f} ml ({ratio:.2f})")
    print("  left/right: " + "; ".join(ratios))
    print(f"  regions missing: {', '.join(missing) if missing else 'none'}")
    # turn the head by a known rotation and segment again without a transform
    centre = est.centre
    Q = transforms.rotation(tuple(turn), center=tuple(centre))
    q_inv = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(Q)))
    turned = sitk.Resample(scan, scan, q_inv, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    result2, est2 = automatic(seg, turned)
    labels2 = result2.labels_scan
    back = sitk.GetArrayFromImage(sitk.Resample(labels2, scan, Q, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    # only where the turned scan still showed the head (its field of view is the same grid)
    seen = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(turned > -1023.0, sitk.sitkUInt8), scan, Q,
                                                sitk.sitkNearestNeighbor, 0)) > 0
    expected = transforms.affine_from_matrix(transforms.matrix_of(Q) @ transforms.matrix_of(est.transform))
    print(f"  turned by {tuple(turn)} deg and segmented without a transform: pose "
          f"{alignment.angle_error_deg(est2.transform, expected):.2f} deg "
          f"from Q R_0; mean Dice of the mapped-back labels with the unturned ones "
          f"{mean_dice(np.where(seen, labels, 0), np.where(seen, back, 0)):.3f}")
    if montage_path:
        montage(scan, est.transform, result, montage_path)
        print(f"  montage: {montage_path}")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scans", nargs="+", help="scan files or DICOM folders")
    p.add_argument("--mode", default="3d")
    p.add_argument("--turn", type=float, nargs=3, default=[13.0, 5.0, -4.0], metavar=("RX", "RY", "RZ"))
    p.add_argument("--montage", help="PNG path (for one scan)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled models)")
    args = p.parse_args(argv)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    seg = inference.Segmenter(args.mode, args.model, "cpu")
    for path in args.scans:
        check(path, seg, args.turn, args.montage if len(args.scans) == 1 else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
