"""Prediction: one data flow from a scan to labels on the scan grid (docs/DESIGN.md section 3).

    head_box -> upright_resample -> normalise_intensity -> predict_planar / predict_3d
    -> fuse_outputs -> clean_probabilities -> labels_from_probabilities -> labels_to_scan

Each step is one function; :class:`Segmenter` strings them together, reports progress
through a callback ``progress(fraction, message)`` and stops when ``cancel()`` returns
True (checked between batches), raising :class:`Cancelled` before anything is returned.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import cleanup, geometry, models, numpy_pages, quality, transforms
from .steps import ProgressFn, Steps, run_steps, within
from .errors import Cancelled, InputError, InputWarning
from .geometry import Grid, HeadBox
from .modes import DEFAULT_MODE, MODES
from .regions import NUM_LABELS

CancelFn = Callable[[], bool]
FUSIONS = ("mean", "vote")
NUM_CLASSES = NUM_LABELS + 1


@dataclass
class SegmentationResult:
    """Labels on the scan grid and in the upright space, plus what produced them."""

    labels_scan: sitk.Image          # uint8, the scan's own grid: where each region is now
    labels_upright: sitk.Image       # uint8, the scan's grid in the upright space (N-seg layout)
    grid: Grid                       # the model grid the labels were computed on
    labels_grid: np.ndarray          # uint8 (z, y, x) on ``grid``
    member_labels: Dict[str, np.ndarray]  # each plane / model's own argmax on ``grid``
    #: fused (classes, z, y, x) if kept, before the clean-up (so members can be fused again)
    probabilities: Optional[np.ndarray] = None
    timings: Dict[str, float] = field(default_factory=dict)
    mode: str = ""
    model_names: List[str] = field(default_factory=list)
    cleanup: Optional[cleanup.CleanupReport] = None   # what the post-processing removed
    non_brain: Optional[cleanup.NonBrain] = None      # skull and air on ``grid``
    quality: Optional[quality.QualityReport] = None   # region volumes and what looks wrong


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; unknown names refused."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but PyTorch sees no CUDA GPU.",
                         "Use --device cpu (or auto), or install a CUDA build of PyTorch.")
    if device not in ("cpu", "cuda"):
        raise InputError(f"unknown device {device!r}.", "Use auto, cpu or cuda.")
    return device


def check_threads(threads: int) -> int:
    """``threads`` if it is 1..(CPU cores), else :class:`InputError`.

    PyTorch takes any number: 100000 threads crash the process and 5000 try to allocate
    tens of GB, while 0 and negative numbers fail deep inside; more threads than cores
    never speed anything up.
    """
    cores = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise InputError(f"--threads {threads} is outside 1..{cores} (this computer has "
                         f"{cores} CPU cores).", f"Give a number from 1 to {cores}, or leave "
                         "--threads out to use them all.")
    return threads


class _Stages:
    """Times named stages and maps stage progress onto the overall 0..1 range."""

    def __init__(self, progress: Optional[ProgressFn], cancel: Optional[CancelFn]) -> None:
        self.timings: Dict[str, float] = {}
        self._progress, self._cancel = progress, cancel

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def report(self, fraction: float, message: str) -> None:
        self.check()
        if self._progress is not None:
            self._progress(min(max(fraction, 0.0), 1.0), message)

    def check(self) -> None:
        if self._cancel is not None and self._cancel():
            raise Cancelled("segmentation cancelled")


def _pad_to(x: torch.Tensor, divisor: int) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """Zero-pad the trailing spatial dims up to a multiple of ``divisor``."""
    spatial = x.shape[2:]
    pads: List[int] = []
    for n in reversed(spatial):
        pads += [0, (-n) % divisor]
    return (F.pad(x, pads) if any(pads) else x), tuple(spatial)


def planar_inputs(volume: np.ndarray, lateral: np.ndarray, axis: int, context: int,
                  start: int, stop: int, coordinate: bool) -> np.ndarray:
    """2.5D input of slices ``start:stop`` along ``axis``: ``2*context+1`` neighbouring
    slices (edges padded with air = 0) plus, if ``coordinate``, the left-right channel.

    ``volume`` is normalised ``(z, y, x)``; ``lateral`` the 1D left-right coordinate over
    x. Returns ``(batch, channels, h, w)`` float32. Shared by training and inference.
    """
    vol = np.moveaxis(volume, axis, 0)
    n = vol.shape[0]
    chans = []
    for off in range(-context, context + 1):
        idx = np.arange(start, stop) + off
        valid = (idx >= 0) & (idx < n)
        sl = np.zeros((stop - start,) + vol.shape[1:], np.float32)
        sl[valid] = vol[idx[valid]]
        chans.append(sl)
    if coordinate:
        h, w = vol.shape[1:]
        if axis == 2:   # sagittal slice i lies at one x: a constant channel
            lat = np.broadcast_to(lateral[start:stop, None, None], (stop - start, h, w))
        else:           # axial (y, x) and coronal (z, x) slices: x is the last axis
            lat = np.broadcast_to(lateral[None, None, :], (stop - start, h, w))
        chans.append(np.asarray(lat, np.float32))
    return np.stack(chans, axis=1)


def volume_inputs(volume: np.ndarray, lateral: np.ndarray, coordinate: bool) -> np.ndarray:
    """3D input ``(1, channels, z, y, x)``: the volume plus the left-right channel."""
    chans = [volume]
    if coordinate:
        chans.append(np.broadcast_to(lateral[None, None, :], volume.shape))
    return np.stack(chans, axis=0)[None].astype(np.float32, copy=False)


def predict_planar(model: models.LoadedModel, volume: np.ndarray, lateral: np.ndarray,
                   stages: _Stages, span: Tuple[float, float], batch_size: int = 16
                   ) -> "Steps[Tuple[np.ndarray, Dict[str, np.ndarray]]]":
    """Mean softmax of the axial, coronal and sagittal networks, and each plane's labels
    (in steps: one batch of slices each)."""
    card = model.card
    acc = np.zeros((NUM_CLASSES,) + volume.shape, np.float32)
    labels: Dict[str, np.ndarray] = {}
    planes = [p for p in models.PLANES if p in model.nets]
    total = sum(volume.shape[models.PLANES[p]] for p in planes)
    done = 0
    for plane in planes:
        axis = models.PLANES[plane]
        net = model.nets[plane]
        view = np.moveaxis(acc, axis + 1, 1)          # (C, n, h, w) view into acc
        n = volume.shape[axis]
        plane_labels = np.zeros(view.shape[1:], np.uint8)
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            x = torch.from_numpy(planar_inputs(volume, lateral, axis, card.context_slices,
                                               start, stop, card.coordinate_channel))
            x, spatial = _pad_to(x.to(model.device), net.divisor)
            prob = torch.softmax(net(x)[..., :spatial[0], :spatial[1]].float(), dim=1)
            plane_labels[start:stop] = prob.argmax(1).to(torch.uint8).cpu().numpy()
            view[:, start:stop] += prob.permute(1, 0, 2, 3).cpu().numpy()
            done += stop - start
            stages.report(span[0] + (span[1] - span[0]) * done / total, f"{plane} slices {stop}/{n}")
            yield
        labels[plane] = np.ascontiguousarray(np.moveaxis(plane_labels, 0, axis))
    acc /= len(planes)
    return acc, labels


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian weights for sliding windows: centres count more than borders."""
    grids = np.meshgrid(*[np.arange(p) - (p - 1) / 2 for p in patch], indexing="ij")
    g = np.exp(-sum((c / (sigma_scale * p)) ** 2 / 2 for c, p in zip(grids, patch)))
    return (g / g.max()).clip(1e-3, None).astype(np.float32)


def window_starts(n: int, patch: int, step: float = 0.5) -> List[int]:
    """Window starts along one axis covering ``n`` with overlap ``1 - step``."""
    if n <= patch:
        return [0]
    count = int(math.ceil((n - patch) / (patch * step))) + 1
    return sorted({int(round(i * (n - patch) / (count - 1))) for i in range(count)})


def predict_3d(model: models.LoadedModel, volume: np.ndarray, lateral: np.ndarray,
               stages: _Stages, span: Tuple[float, float]) -> "Steps[np.ndarray]":
    """Softmax of the 3D network: one pass if the head fits the patch, else Gaussian-
    weighted sliding windows (step 0.5). In steps of one convolution layer each."""
    card, net = model.card, model.nets["unet3d"]
    x = torch.from_numpy(volume_inputs(volume, lateral, card.coordinate_channel)).to(model.device)
    patch = card.patch_size
    if patch is None or all(n <= p for n, p in zip(volume.shape, patch)):
        xp, spatial = _pad_to(x, net.divisor)
        stages.report(span[0], "3D network")
        layers = 5 * net.depth - 3   # the steps of features_steps: 2 per encoder, 3 per decoder
        done = 0
        forward = net.features_steps(xp)
        while True:
            try:
                next(forward)
            except StopIteration as finished:
                features = finished.value
                break
            done += 1
            stages.report(span[0] + (span[1] - span[0]) * min(done / layers, 1.0), "3D network")
            yield
        probs = yield from softmax_in_slabs(features[0, :, :spatial[0], :spatial[1], :spatial[2]], head=net.head)
        stages.report(span[1], "3D network done")
        return probs
    x, spatial = _pad_to(x, net.divisor)
    patch = [min(p, n) for p, n in zip(patch, x.shape[2:])]
    weight = torch.from_numpy(gaussian_importance(patch)).to(model.device)
    acc = torch.zeros((NUM_CLASSES,) + tuple(x.shape[2:]), device=model.device)
    norm = torch.zeros(tuple(x.shape[2:]), device=model.device)
    starts = [window_starts(n, p) for n, p in zip(x.shape[2:], patch)]
    windows = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    for i, (a, b, c) in enumerate(windows):
        sl = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
        logits = yield from net.forward_steps(x[(slice(None), slice(None)) + sl])
        prob = torch.softmax(logits.float(), dim=1)[0]
        acc[(slice(None),) + sl] += prob * weight
        norm[sl] += weight
        stages.report(span[0] + (span[1] - span[0]) * (i + 1) / len(windows),
                      f"3D window {i + 1}/{len(windows)}")
    acc /= norm
    return acc[:, :spatial[0], :spatial[1], :spatial[2]].cpu().numpy()


def softmax_in_slabs(logits: torch.Tensor, slab: int = 16,
                     head: Optional[torch.nn.Module] = None) -> "Steps[np.ndarray]":
    """Softmax over classes of ``(C, z, y, x)`` logits as a float32 numpy array, ``slab``
    z-planes per step (a whole head's 21 classes at once take a long step). ``head``: a
    voxel-wise layer (the network's 1x1 head) that turns ``logits``, then features, into
    logits slab by slab, so the whole-head logits never exist at once."""
    classes = logits.shape[0] if head is None else head.out_channels
    out = np.empty((classes,) + tuple(logits.shape[1:]), np.float32)   # its pages are touched slab by slab
    for z in range(0, logits.shape[1], slab):
        part = logits[:, z:z + slab]
        if head is not None:
            part = head(part[None])[0]
        out[:, z:z + slab] = torch.softmax(part.float(), dim=0).cpu().numpy()
        yield
    return out


def _interp_axis(arr: np.ndarray, axis: int, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at fractional indices (clamped)."""
    n = arr.shape[axis]
    c = np.clip(coords, 0, n - 1)
    i0 = np.floor(c).astype(np.int64)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (c - i0).astype(np.float32)
    shape = [1] * arr.ndim
    shape[axis] = -1
    w = w.reshape(shape)
    return np.take(arr, i0, axis=axis) * (1 - w) + np.take(arr, i1, axis=axis) * w


def resample_probabilities(probs: np.ndarray, src: Grid, dst: Grid) -> np.ndarray:
    """Probabilities ``(C, z, y, x)`` from one model grid onto another (same frame).

    One class at a time into one output array: each class's temporaries are a few MB,
    near the 4 MB from which NumPy asks the kernel for huge pages. Whole-volume
    temporaries (about 90 MB each for a head) stalled 1-5 s in page faults on a VM where
    the per-class loop takes 0.24 s for 21 classes (the same numbers).
    """
    if src == dst:
        return probs
    points = geometry.grid_points_in(src, dst)
    out = np.empty((probs.shape[0],) + dst.shape, np.float32)
    for c in range(probs.shape[0]):
        out[c] = _resample_class(probs[c], points)
    return out


def _resample_class(arr: np.ndarray, points: Tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """One class ``(z, y, x)`` at ``points`` (:func:`geometry.grid_points_in`), trilinear."""
    cx, cy, cz = points
    return _interp_axis(_interp_axis(_interp_axis(arr, 0, cz), 1, cy), 2, cx)


def fuse_outputs(outputs: Sequence[Tuple[Grid, np.ndarray]], grid: Grid,
                 member_labels: Sequence[np.ndarray] = (), method: str = "mean",
                 consume: bool = False) -> np.ndarray:
    """The members' probabilities ``(grid, (C, z, y, x))`` brought onto ``grid`` and fused
    (:func:`fuse_probabilities`), one class at a time.

    ``consume=True`` lets the result overwrite the array of a member already on ``grid``
    (the engine's own, used once): no fresh whole-volume array at all. In a process that
    has just run a network, a fresh 70-90 MB array stalled 0.3-1 s in page faults (the
    kernel assembling huge pages) on a 2-core VM; the class-by-class work does not.
    """
    if len(outputs) == 1 and method == "mean":
        return resample_probabilities(outputs[0][1], outputs[0][0], grid)
    points = [None if g == grid else geometry.grid_points_in(g, grid) for g, _ in outputs]
    base = next((p for g, p in outputs if g == grid), None) if consume else None
    fused = base if base is not None else np.empty((outputs[0][1].shape[0],) + grid.shape, np.float32)
    return _fuse_classes(lambda c: [p[c] if at is None else _resample_class(p[c], at)
                                    for at, (_, p) in zip(points, outputs)], fused, member_labels, method)


def fuse_probabilities(probs: Sequence[np.ndarray], member_labels: Sequence[np.ndarray] = (),
                       method: str = "mean") -> np.ndarray:
    """Fuse per-model probabilities ``(C, ...)`` on one grid: their mean, or a majority
    vote of the members' labels (ties broken by the mean probability). The inputs are
    not changed (class by class, as :func:`fuse_outputs`)."""
    if len(probs) == 1 and method == "mean":
        return probs[0]
    return _fuse_classes(lambda c: [p[c] for p in probs], np.empty_like(probs[0]), member_labels, method)


def _fuse_classes(parts_of: Callable[[int], List[np.ndarray]], fused: np.ndarray,
                  member_labels: Sequence[np.ndarray], method: str) -> np.ndarray:
    """Fill ``fused[c]`` with the mean of ``parts_of(c)`` (or the vote), class by class."""
    if method not in FUSIONS:
        raise InputError(f"unknown fusion {method!r}.", f"Use one of {', '.join(FUSIONS)}.")
    for c in range(fused.shape[0]):
        parts = parts_of(c)
        mean = parts[0].astype(np.float32, copy=True)   # parts[0] may be a view of ``fused``
        for part in parts[1:]:
            mean += part
        mean /= len(parts)
        if method == "vote":
            mean *= 1e-3
            for lab in member_labels:
                mean += lab == c
        fused[c] = mean
    return fused


def labels_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """Most probable class per voxel, as uint8 label ids (0 background, 1-20 regions)."""
    return np.argmax(probs, axis=0).astype(np.uint8)


def refine_labels(probs: np.ndarray, grid: Grid, spacing_mm: float, margin: int = 2,
                  coarse: Optional[np.ndarray] = None) -> "Steps[Tuple[np.ndarray, Grid]]":
    """Labels on a finer grid over the regions' bounding box, from interpolated probabilities.

    Taking the argmax after linear interpolation gives smooth region borders where a
    nearest-neighbour copy of coarse labels would give 2 mm stairs on a 0.45 mm scan.
    Only the box around the regions is refined, which keeps time and memory small.
    In steps of one class each. ``coarse``: the labels of ``probs`` where the caller
    already has them (the clean-up's), so the step after the clean-up does not take a
    second whole-grid argmax of the same probabilities (0.05-0.1 s on a head).
    """
    coarse = labels_from_probabilities(probs) if coarse is None else coarse
    if spacing_mm >= min(grid.spacing) or not coarse.any():
        return coarse, grid
    box = geometry.crop_box(coarse.shape, coarse > 0)
    lo = [max(0, s.start - margin) for s in box]
    hi = [min(n, s.stop + margin) for s, n in zip(box, coarse.shape)]
    sub = probs[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    src = Grid(tuple(grid.origin[a] + lo[2 - a] * grid.spacing[a] for a in range(3)),  # type: ignore[arg-type]
               grid.spacing, (hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0]))
    size = tuple(int((n - 1) * sp / spacing_mm) + 1 for n, sp in zip(src.size, src.spacing))
    fine = Grid(src.origin, (spacing_mm,) * 3, size)  # type: ignore[arg-type]
    yield
    labels = yield from running_argmax(sub, src, fine)
    return labels, fine


def running_argmax(probs: np.ndarray, src: Grid, dst: Grid) -> "Steps[np.ndarray]":
    """``labels_from_probabilities(resample_probabilities(probs, src, dst))`` one class at
    a time (one step each): only the best probability so far and its label are kept on
    the fine grid, not all 21 interpolated classes (7x less memory, 2x faster at 1 mm).

    A class is interpolated only over the box of fine voxels next to where it reaches
    ``low``: elsewhere it is below ``low`` (interpolation never exceeds its neighbours),
    and the classes sum to at least 21 x ``low`` (interpolation keeps sums), so it cannot
    be the largest there and the labels are exactly the whole-box argmax's."""
    points = geometry.grid_points_in(src, dst)
    low = class_floor(probs)
    best = _resample_class(probs[0], points)
    labels = np.zeros(best.shape, np.uint8)
    for c in range(1, probs.shape[0]):
        yield
        reach = _class_reach(probs[c] >= low, points)
        if reach is None:
            continue
        coarse, fine, sub_points = reach
        p = _resample_class(probs[c][coarse], sub_points)
        best_part = best[fine]
        better = p > best_part   # strict: ties keep the lower label, as np.argmax does
        labels[fine][better] = c
        np.maximum(best_part, p, out=best_part)
    return labels


def class_floor(probs: np.ndarray) -> float:
    """A probability below which a class cannot be the largest of ``probs`` (C, ...) at a
    point, nor anywhere interpolated between such points: 0.9 x the smallest class sum / C
    (the 0.9 keeps float rounding on the safe side)."""
    return 0.9 * float(probs.sum(axis=0).min()) / probs.shape[0]


def _class_reach(mask: np.ndarray, points: Tuple[np.ndarray, np.ndarray, np.ndarray]
                 ) -> Optional[Tuple[Tuple[slice, ...], Tuple[slice, ...], Tuple[np.ndarray, ...]]]:
    """The coarse (z, y, x) box of ``mask`` grown by one voxel, the fine voxels whose
    interpolation reads it, and their fractional indices within that box (x, y, z, as
    ``points``); None for an empty mask."""
    if not mask.any():
        return None
    box = geometry.crop_box(mask.shape, mask)
    coarse, fine, sub = [], [], []
    for axis, coords in zip((0, 1, 2), points[::-1]):   # points are (x, y, z)
        lo, hi = max(box[axis].start - 1, 0), min(box[axis].stop, mask.shape[axis] - 1)
        clamped = np.clip(coords, 0, mask.shape[axis] - 1)
        inside = np.flatnonzero((clamped >= lo) & (clamped <= hi))
        if inside.size == 0:
            return None
        coarse.append(slice(lo, hi + 1))
        fine.append(slice(int(inside[0]), int(inside[-1]) + 1))
        sub.append(coords[fine[-1]] - lo)
    return tuple(coarse), tuple(fine), tuple(sub[::-1])


#: Scan voxels mapped back per step: 16 slices of 512 x 512 took about 0.15 s before only
#: their part that can hold labels was resampled (fewer slices cost more in the per-call
#: overhead of the five resamples each slab needs).
SLAB_VOXELS = 16 * 512 * 512


def scan_layouts(labels: np.ndarray, labels_grid: Grid, grid: Grid, scan: sitk.Image,
                 transform: sitk.Transform, non_brain: cleanup.NonBrain
                 ) -> "Steps[Tuple[sitk.Image, sitk.Image]]":
    """Labels (on ``labels_grid``) onto the scan's grid in both output layouts, with the
    bone of the full resolution cleared (:func:`cleanup.strip_bone`), a slab of scan
    slices per step.

    Layouts: the scan as acquired (voxel ``q`` takes the label at ``R^-1(q)``) and the
    upright space on the scan's grid (``N-seg.nii.gz``: voxel ``p`` is the upright point
    ``p``, whose HU is the scan's at ``R(p)``). Bone counts only near the model grid's
    skull (``grid``, grown by one voxel), so a calcification inside a region keeps its
    label. Every voxel is computed on its own, so slabs give exactly the whole-image result.
    """
    source = labels_grid.image(labels.astype(np.uint8, copy=False))
    near = sitk.BinaryDilate(grid.image(non_brain.skull.astype(np.uint8)), [1, 1, 1])
    inverse = transforms.affine_from_matrix(np.linalg.inv(transforms.matrix_of(transform)))
    upright = transforms.identity()
    hu_scan = sitk.GetArrayViewFromImage(scan)
    nx, ny, nz = scan.GetSize()
    out_scan = np.zeros((nz, ny, nx), np.uint8)
    out_upright = np.zeros((nz, ny, nx), np.uint8)
    # Outside the labels' box every voxel is background in both layouts: only the scan
    # voxels that can reach it are resampled (about half of a 0.45 mm scan's voxels).
    box_scan = _reach_box(source, scan, transform)
    box_upright = _reach_box(source, scan, upright)
    step = max(1, SLAB_VOXELS // (nx * ny))
    for z0 in range(0, nz, step):
        part = _slab_reference(scan, (z0, min(nz, z0 + step)), box_scan)
        if part is not None:
            slab, where = part
            out_scan[where] = cleanup.strip_bone(_nearest(source, slab, inverse), hu_scan[where],
                                                 _nearest(near, slab, inverse), non_brain.shift)
        part = _slab_reference(scan, (z0, min(nz, z0 + step)), box_upright)
        if part is not None:
            slab, where = part
            hu_up = sitk.GetArrayFromImage(sitk.Resample(scan, slab, transform, sitk.sitkLinear,
                                                         geometry.AIR_HU, scan.GetPixelID()))
            out_upright[where] = cleanup.strip_bone(_nearest(source, slab, upright), hu_up,
                                                    _nearest(near, slab, upright), non_brain.shift)
        yield
    return _on_scan_grid(out_scan, scan), _on_scan_grid(out_upright, scan)


def _reach_box(source: sitk.Image, scan: sitk.Image, to_scan: sitk.Transform
               ) -> List[Tuple[int, int]]:
    """Per scan axis (x, y, z), the index range [lo, hi) of the scan voxels whose point,
    mapped by the inverse of ``to_scan``, can fall inside ``source`` (its 8 corners, half a
    voxel out, mapped by ``to_scan``, and a voxel of margin): a nearest or linear resample
    of ``source`` gives its default value everywhere else."""
    size = source.GetSize()
    corners = [[n - 0.5 if (k >> a) & 1 else -0.5 for a, n in enumerate(size)] for k in range(8)]
    index = np.array([scan.TransformPhysicalPointToContinuousIndex(
        to_scan.TransformPoint(source.TransformContinuousIndexToPhysicalPoint(c))) for c in corners])
    lo = np.maximum(np.floor(index.min(axis=0)) - 1, 0).astype(int)
    hi = np.minimum(np.ceil(index.max(axis=0)) + 2, scan.GetSize()).astype(int)
    return [(int(a), int(b)) for a, b in zip(lo, hi)]


def _slab_reference(scan: sitk.Image, slices: Tuple[int, int], box: List[Tuple[int, int]]
                    ) -> Optional[Tuple[sitk.Image, Tuple[slice, slice, slice]]]:
    """An empty image on scan slices ``slices`` cut to ``box`` (x, y, z index ranges;
    same spacing and direction as the scan) and where it lies in the scan's (z, y, x)
    array; None where nothing is left."""
    lo = [box[0][0], box[1][0], max(slices[0], box[2][0])]
    hi = [box[0][1], box[1][1], min(slices[1], box[2][1])]
    if any(b <= a for a, b in zip(lo, hi)):
        return None
    ref = sitk.Image([b - a for a, b in zip(lo, hi)], sitk.sitkUInt8)
    ref.SetSpacing(scan.GetSpacing())
    ref.SetDirection(scan.GetDirection())
    ref.SetOrigin(scan.TransformIndexToPhysicalPoint(lo))
    return ref, (slice(lo[2], hi[2]), slice(lo[1], hi[1]), slice(lo[0], hi[0]))


def _nearest(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, transform,
                                                sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def _on_scan_grid(array: np.ndarray, scan: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(scan)
    return image


def fused_to_labels(fused: np.ndarray, grid: Grid, scan: sitk.Image, transform: sitk.Transform,
                    refine_mm: Optional[float], non_brain: Optional[cleanup.NonBrain] = None,
                    st: Optional["_Stages"] = None
                    ) -> "Steps[Tuple[np.ndarray, sitk.Image, sitk.Image, cleanup.CleanupReport]]":
    """Every step after fusion, in one place for every mode (and for the evaluation's
    ensemble made from kept probabilities): clean-up (``fused`` is changed in place), the
    labels on the model grid, the optional refinement, both output layouts on the scan's
    grid with the clean-up at full resolution. Returns (model-grid labels, scan labels,
    upright labels, what was removed)."""
    st = st or _Stages(None, None)
    with st.stage("clean-up"):
        if non_brain is None:
            non_brain = cleanup.find_non_brain(geometry.upright_resample(scan, transform, grid), grid.spacing)
            yield
        labels, report = yield from cleanup.clean_probabilities_steps(fused, non_brain.mask)
    st.report(0.93, "mapping labels back to the scan")
    with st.stage("to scan grid"):
        out_labels, out_grid = labels, grid
        if refine_mm and refine_mm < min(grid.spacing):
            out_labels, out_grid = yield from refine_labels(fused, grid, refine_mm, coarse=labels)
        labels_scan, labels_upright = yield from scan_layouts(out_labels, out_grid, grid, scan,
                                                              transform, non_brain)
    return labels, labels_scan, labels_upright, report


@contextmanager
def engine_step() -> Iterator[None]:
    """What each step of a segmentation runs inside: PyTorch's inference mode, and NumPy
    without huge-page advice (:mod:`numpy_pages`: its page faults stalled steps for up to
    a second). Both are restored between steps."""
    with torch.inference_mode(), numpy_pages.without_numpy_huge_pages():
        yield


class Segmenter:
    """Loads the models for a mode once and segments any number of scans."""

    def __init__(self, mode: str = DEFAULT_MODE, model_dir: Optional[Path] = None, device: str = "auto",
                 fusion: str = "mean", threads: Optional[int] = None, batch_size: int = 16,
                 refine_mm: Optional[float] = 1.0) -> None:
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}.", f"Use one of {', '.join(MODES)}.")
        if fusion not in FUSIONS:
            raise InputError(f"unknown fusion {fusion!r}.", f"Use one of {', '.join(FUSIONS)}.")
        self.mode, self.fusion, self.batch_size = mode, fusion, batch_size
        self.refine_mm = refine_mm   # None: labels go back from the model grid directly
        if threads is not None:
            torch.set_num_threads(check_threads(threads))
        self.device = resolve_device(device)
        folders = models.find_models(mode, model_dir)
        self.models = [models.load_model(f, self.device) for f in folders]
        for model in self.models:   # a weak model says so wherever it is used (CLI, Slicer)
            message = models.quality_warning(model.card)
            if message:
                warnings.warn(InputWarning(message), stacklevel=2)

    def segment(self, scan: sitk.Image, transform: sitk.Transform,
                progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                keep_probabilities: bool = False) -> SegmentationResult:
        """Segment one scan; ``transform`` is ``R`` (upright -> scan), identity if none.
        The steps of :meth:`segment_steps` in a plain loop."""
        return run_steps(self.segment_steps(scan, transform, progress, cancel, keep_probabilities))

    def segment_steps(self, scan: sitk.Image, transform: sitk.Transform,
                      progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                      keep_probabilities: bool = False) -> "Steps[SegmentationResult]":
        """:meth:`segment` as a sequence of short steps (see :mod:`steps`): each ``next()``
        does one piece (a network layer, a region's clean-up, a slab of scan slices) inside
        :func:`engine_step`, and returns. Progress and ``cancel`` are checked
        within the steps; closing the generator abandons the run."""
        return within(engine_step, self._segment_steps(scan, transform, _Stages(progress, cancel),
                                                       keep_probabilities))

    def _segment_steps(self, scan: sitk.Image, transform: sitk.Transform, st: _Stages,
                       keep_probabilities: bool) -> "Steps[SegmentationResult]":
        st.report(0.0, "finding the head")
        with st.stage("crop"):
            head = geometry.head_box(scan, transform)
        yield
        outputs: List[Tuple[Grid, np.ndarray]] = []
        member_labels: Dict[str, np.ndarray] = {}
        n = len(self.models)
        prepared: Dict[tuple, np.ndarray] = {}   # ensemble members on one grid share it
        non_brain_masks: Dict[Grid, cleanup.NonBrain] = {}   # skull and air, per model grid
        for i, model in enumerate(self.models):
            span = (0.05 + 0.85 * i / n, 0.05 + 0.85 * (i + 1) / n)
            grid, volume, lateral = self._prepare(scan, transform, head, model, st, prepared,
                                                  non_brain_masks)
            st.report(span[0], f"running the {model.card.kind} model")
            yield
            with st.stage("inference"):
                if model.card.kind == "planar":
                    probs, planes = yield from predict_planar(model, volume, lateral, st, span,
                                                              self.batch_size)
                    member_labels.update(planes)
                else:
                    probs = yield from predict_3d(model, volume, lateral, st, span)
            if model.card.name not in member_labels:
                member_labels[model.card.name] = yield from cleanup.labels_in_slabs(probs)
            outputs.append((grid, probs))
            yield
        st.report(0.9, "fusing")
        with st.stage("fusion"):
            grid = min((g for g, _ in outputs), key=lambda g: min(g.spacing))
            members = {k: v for k, v in member_labels.items()
                       if v.shape == grid.shape}
            fused = fuse_outputs(outputs, grid, list(members.values()), self.fusion, consume=True)
            outputs.clear()   # their arrays are used up (one of them may hold the fused result)
        yield
        non_brain = non_brain_masks.get(grid)
        kept = fused.copy() if keep_probabilities else None   # before the clean-up
        labels, labels_scan, labels_upright, report = yield from fused_to_labels(
            fused, grid, scan, transform, self.refine_mm, non_brain, st)
        volumes = yield from quality.region_volumes_steps(labels_scan)
        report_q = quality.check_labels(labels_scan, quality.merge_ranges(
            [m.card.quality for m in self.models]), volumes=volumes)   # front ends refuse an empty result
        st.report(1.0, "done")
        return SegmentationResult(
            labels_scan=labels_scan, labels_upright=labels_upright, grid=grid, labels_grid=labels,
            member_labels=members, probabilities=kept,
            timings=st.timings, mode=self.mode, model_names=[m.card.name for m in self.models],
            cleanup=report, non_brain=non_brain_masks.get(grid), quality=report_q)

    @staticmethod
    def _prepare(scan: sitk.Image, transform: sitk.Transform, head: HeadBox,
                 model: models.LoadedModel, st: _Stages, prepared: Dict[tuple, np.ndarray],
                 non_brain_masks: Dict[Grid, "cleanup.NonBrain"]) -> Tuple[Grid, np.ndarray, np.ndarray]:
        """Upright, cropped, normalised volume at the model's spacing (once per grid and
        intensity setting), and the grid's bone-and-air mask for the clean-up."""
        divisor = max(net.divisor for net in model.nets.values())
        grid = head.grid(model.card.spacing_mm, multiple=divisor if model.card.kind == "3d" else 1)
        key = (grid, json.dumps(model.card.intensity, sort_keys=True))
        if key not in prepared:
            with st.stage("upright resample"):
                hu = geometry.upright_resample(scan, transform, grid)
            if grid not in non_brain_masks:
                non_brain_masks[grid] = cleanup.find_non_brain(hu, grid.spacing)
            with st.stage("normalise"):
                prepared[key] = models.normalise_intensity(hu, model.card)
        lateral = geometry.lateral_coordinate(grid, head.midline_x)
        return grid, prepared[key], lateral
