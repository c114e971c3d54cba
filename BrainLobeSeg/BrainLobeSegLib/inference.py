"""Prediction: one data flow from a scan to labels on the scan grid (docs/DESIGN.md section 3).

    head_box -> upright_resample -> normalise_intensity -> predict_planar / predict_3d
    -> fuse_probabilities -> clean_probabilities -> labels_from_probabilities -> labels_to_scan

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

from . import cleanup, geometry, models
from .errors import Cancelled, InputError, InputWarning
from .geometry import Grid, HeadBox
from .modes import DEFAULT_MODE, MODES
from .regions import NUM_LABELS

ProgressFn = Callable[[float, str], None]
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
    probabilities: Optional[np.ndarray] = None  # fused (classes, z, y, x) if kept, before the
                                                # clean-up (so members can be fused again)
    timings: Dict[str, float] = field(default_factory=dict)
    mode: str = ""
    model_names: List[str] = field(default_factory=list)
    cleanup: Optional[cleanup.CleanupReport] = None   # what the post-processing removed
    non_brain: Optional[cleanup.NonBrain] = None      # skull and air on ``grid``


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
                   ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
    """Mean softmax of the axial, coronal and sagittal networks, and each plane's labels."""
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
               stages: _Stages, span: Tuple[float, float]) -> np.ndarray:
    """Softmax of the 3D network: one pass if the head fits the patch, else Gaussian-
    weighted sliding windows (step 0.5)."""
    card, net = model.card, model.nets["unet3d"]
    x = torch.from_numpy(volume_inputs(volume, lateral, card.coordinate_channel)).to(model.device)
    patch = card.patch_size
    if patch is None or all(n <= p for n, p in zip(volume.shape, patch)):
        xp, spatial = _pad_to(x, net.divisor)
        stages.report(span[0], "3D network")
        out = torch.softmax(net(xp)[..., :spatial[0], :spatial[1], :spatial[2]].float(), dim=1)
        stages.report(span[1], "3D network done")
        return out[0].cpu().numpy()
    x, spatial = _pad_to(x, net.divisor)
    patch = [min(p, n) for p, n in zip(patch, x.shape[2:])]
    weight = torch.from_numpy(gaussian_importance(patch)).to(model.device)
    acc = torch.zeros((NUM_CLASSES,) + tuple(x.shape[2:]), device=model.device)
    norm = torch.zeros(tuple(x.shape[2:]), device=model.device)
    starts = [window_starts(n, p) for n, p in zip(x.shape[2:], patch)]
    windows = [(a, b, c) for a in starts[0] for b in starts[1] for c in starts[2]]
    for i, (a, b, c) in enumerate(windows):
        sl = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
        prob = torch.softmax(net(x[(slice(None), slice(None)) + sl]).float(), dim=1)[0]
        acc[(slice(None),) + sl] += prob * weight
        norm[sl] += weight
        stages.report(span[0] + (span[1] - span[0]) * (i + 1) / len(windows),
                      f"3D window {i + 1}/{len(windows)}")
    acc /= norm
    return acc[:, :spatial[0], :spatial[1], :spatial[2]].cpu().numpy()


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
    """Probabilities ``(C, z, y, x)`` from one model grid onto another (same frame)."""
    if src == dst:
        return probs
    cx, cy, cz = geometry.grid_points_in(src, dst)
    out = _interp_axis(probs, 1, cz)
    out = _interp_axis(out, 2, cy)
    return _interp_axis(out, 3, cx).astype(np.float32, copy=False)


def fuse_probabilities(probs: Sequence[np.ndarray], member_labels: Sequence[np.ndarray] = (),
                       method: str = "mean") -> np.ndarray:
    """Fuse per-model probabilities ``(C, z, y, x)``: their mean, or a majority vote of
    the members' labels (ties broken by the mean probability)."""
    mean = probs[0]
    if len(probs) > 1:   # accumulate in place: stacking would hold every member twice
        mean = probs[0].copy()
        for p in probs[1:]:
            mean += p
        mean /= len(probs)
    if method == "mean":
        return mean
    if method != "vote":
        raise InputError(f"unknown fusion {method!r}.", f"Use one of {', '.join(FUSIONS)}.")
    votes = np.zeros_like(mean)
    for lab in member_labels:
        for c in range(NUM_CLASSES):
            votes[c] += lab == c
    return votes + 1e-3 * mean


def labels_from_probabilities(probs: np.ndarray) -> np.ndarray:
    """Most probable class per voxel, as uint8 label ids (0 background, 1-20 regions)."""
    return np.argmax(probs, axis=0).astype(np.uint8)


def refine_labels(probs: np.ndarray, grid: Grid, spacing_mm: float,
                  margin: int = 2) -> Tuple[np.ndarray, Grid]:
    """Labels on a finer grid over the regions' bounding box, from interpolated probabilities.

    Taking the argmax after linear interpolation gives smooth region borders where a
    nearest-neighbour copy of coarse labels would give 2 mm stairs on a 0.45 mm scan.
    Only the box around the regions is refined, which keeps time and memory small.
    """
    coarse = labels_from_probabilities(probs)
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
    return running_argmax(sub, src, fine), fine


def running_argmax(probs: np.ndarray, src: Grid, dst: Grid) -> np.ndarray:
    """``labels_from_probabilities(resample_probabilities(probs, src, dst))`` one class at
    a time: only the best probability so far and its label are kept on the fine grid,
    not all 21 interpolated classes (7x less memory, 2x faster at 1 mm)."""
    best = resample_probabilities(probs[:1], src, dst)[0]
    labels = np.zeros(best.shape, np.uint8)
    for c in range(1, probs.shape[0]):
        p = resample_probabilities(probs[c:c + 1], src, dst)[0]
        better = p > best   # strict: ties keep the lower label, as np.argmax does
        labels[better] = c
        np.maximum(best, p, out=best)
    return labels


def strip_skull(labels_scan: sitk.Image, labels_upright: sitk.Image, scan: sitk.Image,
                transform: sitk.Transform, grid: Grid, non_brain: cleanup.NonBrain
                ) -> Tuple[sitk.Image, sitk.Image]:
    """:func:`cleanup.strip_skull_on_scan_grid` for both output layouts: the skull of the
    model grid (grown by one voxel) and the scan's HU, each on the layout's grid."""
    near = sitk.GetArrayFromImage(sitk.BinaryDilate(
        grid.image(non_brain.skull.astype(np.uint8)), [1, 1, 1]))
    near_scan = geometry.labels_to_scan(near, grid, scan, transform)
    near_upright = geometry.labels_to_upright_scan_grid(near, grid, scan)
    hu_upright = sitk.Resample(scan, scan, transform, sitk.sitkLinear, geometry.AIR_HU)
    return (cleanup.strip_skull_on_scan_grid(labels_scan, scan, near_scan, non_brain.shift),
            cleanup.strip_skull_on_scan_grid(labels_upright, hu_upright, near_upright, non_brain.shift))


def fused_to_labels(fused: np.ndarray, grid: Grid, scan: sitk.Image, transform: sitk.Transform,
                    refine_mm: Optional[float], non_brain: Optional[cleanup.NonBrain] = None,
                    st: Optional["_Stages"] = None
                    ) -> Tuple[np.ndarray, sitk.Image, sitk.Image, cleanup.CleanupReport]:
    """Every step after fusion, in one place for every mode (and for the evaluation's
    ensemble made from kept probabilities): clean-up (``fused`` is changed in place), the
    labels on the model grid, the optional refinement, both output layouts on the scan's
    grid, and the clean-up at full resolution. Returns (model-grid labels, scan labels,
    upright labels, what was removed)."""
    st = st or _Stages(None, None)
    with st.stage("clean-up"):
        if non_brain is None:
            non_brain = cleanup.find_non_brain(geometry.upright_resample(scan, transform, grid), grid.spacing)
        labels, report = cleanup.clean_probabilities(fused, non_brain.mask)
    st.report(0.93, "mapping labels back to the scan")
    with st.stage("to scan grid"):
        out_labels, out_grid = labels, grid
        if refine_mm and refine_mm < min(grid.spacing):
            out_labels, out_grid = refine_labels(fused, grid, refine_mm)
        labels_scan = geometry.labels_to_scan(out_labels, out_grid, scan, transform)
        labels_upright = geometry.labels_to_upright_scan_grid(out_labels, out_grid, scan)
    with st.stage("clean-up"):
        labels_scan, labels_upright = strip_skull(labels_scan, labels_upright, scan, transform,
                                                  grid, non_brain)
    return labels, labels_scan, labels_upright, report


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
        self.device = resolve_device(device)
        if threads:
            torch.set_num_threads(threads)
        folders = models.find_models(mode, model_dir)
        self.models = [models.load_model(f, self.device) for f in folders]
        for model in self.models:   # a weak model says so wherever it is used (CLI, Slicer)
            message = models.quality_warning(model.card)
            if message:
                warnings.warn(InputWarning(message), stacklevel=2)

    @torch.inference_mode()
    def segment(self, scan: sitk.Image, transform: sitk.Transform,
                progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None,
                keep_probabilities: bool = False) -> SegmentationResult:
        """Segment one scan; ``transform`` is ``R`` (upright -> scan), identity if none."""
        st = _Stages(progress, cancel)
        st.report(0.0, "finding the head")
        with st.stage("crop"):
            head = geometry.head_box(scan, transform)
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
            with st.stage("inference"):
                if model.card.kind == "planar":
                    probs, planes = predict_planar(model, volume, lateral, st, span, self.batch_size)
                    member_labels.update(planes)
                else:
                    probs = predict_3d(model, volume, lateral, st, span)
            member_labels.setdefault(model.card.name, labels_from_probabilities(probs))
            outputs.append((grid, probs))
        st.report(0.9, "fusing")
        with st.stage("fusion"):
            grid = min((g for g, _ in outputs), key=lambda g: min(g.spacing))
            probs = [resample_probabilities(p, g, grid) for g, p in outputs]
            members = {k: v for k, v in member_labels.items()
                       if v.shape == grid.shape}
            fused = fuse_probabilities(probs, list(members.values()), self.fusion)
        non_brain = non_brain_masks.get(grid)
        kept = fused.copy() if keep_probabilities else None   # before the clean-up
        labels, labels_scan, labels_upright, report = fused_to_labels(
            fused, grid, scan, transform, self.refine_mm, non_brain, st)
        st.report(1.0, "done")
        return SegmentationResult(
            labels_scan=labels_scan, labels_upright=labels_upright, grid=grid, labels_grid=labels,
            member_labels=members, probabilities=kept,
            timings=st.timings, mode=self.mode, model_names=[m.card.name for m in self.models],
            cleanup=report, non_brain=non_brain_masks.get(grid))

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
