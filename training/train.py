"""``python -m training train``: planar (axial, coronal, sagittal) and 3D U-Nets.

Inputs are prepared by the engine's own steps (:mod:`training.preprocess`), so the
networks see at training time exactly what they see in the extension. A run folder holds
``config.json`` (the card template: spacing, window, architecture), ``log.jsonl``,
per-network checkpoints (resume with ``--resume``) and final weights, which
``python -m training export`` turns into a model folder.

Scales out with ``torchrun --nproc_per_node N -m training train ...``
(DistributedDataParallel; gloo on CPU, nccl on CUDA); mixed precision on CUDA.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from BrainLobeSegLib import models, regions
from BrainLobeSegLib.errors import InputError
from BrainLobeSegLib.inference import planar_inputs, volume_inputs
from BrainLobeSegLib.networks import build_network

from .losses import LOSSES, segmentation_loss
from .preprocess import Prepared, load_dataset, phantom_cases

WINDOW_HU = [-20.0, 100.0]   # brain and bone both visible; air -> 0, bone -> 1
MIRROR = np.array(regions.mirror_lut(), np.uint8)
DEFAULTS = {
    "planar": {"spacing": 2.0, "base": 16, "depth": 4, "batch": 16, "iterations": 1500,
               "canvas": [128, 128], "lr": 2e-3},
    # 3D: held-out Dice of the bundled model 0.837 at 2100 iterations, 0.877 at 4000
    "3d": {"spacing": 2.0, "base": 8, "depth": 4, "batch": 2, "iterations": 4000,
           "patch": [64, 80, 80], "lr": 2e-3},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help="dataset folder(s) in the docs/DESIGN.md layout (N.nii.gz, N.txt, N-seg.nii.gz)")
    p.add_argument("--out", type=Path, required=True, help="run folder (checkpoints, log, weights)")
    p.add_argument("--kind", choices=("planar", "3d", "both"), default="both",
                   help="planar: three 2D networks (axial, coronal, sagittal); 3d: one 3D network "
                        "(the default mode of the extension); both")
    p.add_argument("--iterations", type=int, default=None,
                   help=f"training iterations per network (default: planar "
                        f"{DEFAULTS['planar']['iterations']}, 3d {DEFAULTS['3d']['iterations']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"samples per iteration (default: planar {DEFAULTS['planar']['batch']} "
                        f"slices, 3d {DEFAULTS['3d']['batch']} patches)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate, cosine decay (default {DEFAULTS['3d']['lr']:g})")
    p.add_argument("--spacing", type=float, default=None,
                   help=f"model grid spacing in mm (default {DEFAULTS['3d']['spacing']:g})")
    p.add_argument("--base-features", type=int, default=None,
                   help=f"feature maps of the first U-Net level (default: planar "
                        f"{DEFAULTS['planar']['base']}, 3d {DEFAULTS['3d']['base']})")
    p.add_argument("--loss", choices=LOSSES, default="dicece",
                   help="dicece: Dice + cross-entropy; tversky / tverskyce weigh false positives "
                        "and negatives with --alpha/--beta")
    p.add_argument("--alpha", type=float, default=0.85, help="Tversky false-positive weight")
    p.add_argument("--beta", type=float, default=0.15, help="Tversky false-negative weight")
    p.add_argument("--folds", type=int, default=1, help="k for k-fold cross-validation (1: none)")
    p.add_argument("--fold", type=int, default=0, help="which fold is held out (0..k-1)")
    p.add_argument("--phantoms", type=int, default=0, help="code phantoms mixed into training")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda when PyTorch sees a GPU (mixed precision), else cpu")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, the sampling and the fold split (a run is repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoints")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a folder that holds an earlier run (its weights, checkpoints, "
                        "config.json and log are removed; without --resume or this, such a folder is refused)")
    p.add_argument("--init-from", type=Path, default=None, metavar="MODEL_DIR",
                   help="start from the weights of an exported model folder of the same kind and "
                        "architecture (e.g. a bundled model) instead of random ones (fine-tuning)")
    p.add_argument("--checkpoint-every", type=int, default=100,
                   help="iterations between checkpoints (what --resume continues from)")
    p.add_argument("--log-every", type=int, default=25,
                   help="iterations between progress lines and log.jsonl entries")
    p.add_argument("--patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                   help=f"3D training crop in voxels (default {' '.join(map(str, DEFAULTS['3d']['patch']))})")
    p.add_argument("--canvas", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help=f"planar training slice size in voxels "
                        f"(default {' '.join(map(str, DEFAULTS['planar']['canvas']))})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (default: PyTorch's choice, all cores)")


# ----------------------------------------------------------------------------- sampling

def _flip(p: Prepared) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mirror left-right: pixels flip, left/right labels swap, the lateral coordinate
    (distance from the midline, + = left) flips and changes sign."""
    return p.volume[..., ::-1], MIRROR[p.labels[..., ::-1]], -p.lateral[::-1]


def _views(p: Prepared, rng: np.random.Generator):
    return _flip(p) if rng.random() < 0.5 else (p.volume, p.labels, p.lateral)


def _fit(a: np.ndarray, shape: Sequence[int], starts: Sequence[int], fill: float) -> np.ndarray:
    """Crop/pad the trailing dims of ``a`` to ``shape``; ``starts`` are offsets into ``a``
    (negative: the array is placed further into the canvas)."""
    out = np.full(a.shape[: a.ndim - len(shape)] + tuple(shape), fill, a.dtype)
    src, dst = [], []
    for n, m, s in zip(a.shape[-len(shape):], shape, starts):
        lo, hi = max(s, 0), min(s + m, n)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    lead = (slice(None),) * (a.ndim - len(shape))
    out[lead + tuple(dst)] = a[lead + tuple(src)]
    return out


def _random_starts(size: Sequence[int], shape: Sequence[int], rng, focus=None) -> List[int]:
    starts = []
    for ax, (n, m) in enumerate(zip(size, shape)):
        if focus is not None:   # keep the labelled region inside the crop, jittered
            lo, hi = focus[ax]
            centre = (lo + hi) / 2 + rng.uniform(-0.25, 0.25) * m
            starts.append(int(round(centre - m / 2)))
        else:
            starts.append(int(rng.integers(min(0, n - m), max(0, n - m) + 1)))
    return starts


def sample_planar(cases: List[Prepared], axis: int, batch: int, canvas: Sequence[int],
                  context: int, rng: np.random.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(batch):
        vol, lab, lat = _views(cases[int(rng.integers(len(cases)))], rng)
        present = np.flatnonzero(lab.any(axis=tuple(a for a in range(3) if a != axis)))
        n = vol.shape[axis]
        i = int(rng.choice(present)) if len(present) and rng.random() < 0.85 else int(rng.integers(n))
        x = planar_inputs(vol, lat, axis, context, i, i + 1, True)[0]
        y = np.take(lab, i, axis=axis)
        starts = _random_starts(y.shape, canvas, rng)
        xs.append(_fit(x, canvas, starts, 0.0))
        ys.append(_fit(y, canvas, starts, 0))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


def sample_3d(cases: List[Prepared], batch: int, patch: Sequence[int], rng: np.random.Generator
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for _ in range(batch):
        vol, lab, lat = _views(cases[int(rng.integers(len(cases)))], rng)
        idx = np.argwhere(lab[::4, ::4, ::4]) * 4
        focus = [(idx[:, a].min(), idx[:, a].max()) for a in range(3)] if len(idx) else None
        starts = _random_starts(lab.shape, patch, rng, focus)
        x = volume_inputs(np.ascontiguousarray(vol), np.ascontiguousarray(lat), True)[0]
        xs.append(_fit(x, patch, starts, 0.0))
        ys.append(_fit(lab, patch, starts, 0))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.int64))


#: Intensity augmentation, at least as wide as synthesis v2 (training/synth.py V2_RANGES),
#: in HU; applied on the normalised input x = (HU - WINDOW_HU[0]) / 120 (the card window
#: is 120 HU wide, so 40 HU is 0.33 of the input range and 20 HU of noise 0.17).
AUG_OFFSET_HU = 40.0                 # whole-image offset +-40 HU
AUG_GAIN = (0.9, 1.1)                # gain about 0 HU
AUG_CONTRAST = (-0.5, 1.0)           # change of the local slope at a brain level (x 0.5-2)
AUG_CONTRAST_LEVEL_HU = (20.0, 40.0)
AUG_NOISE_HU = (0.0, 20.0)           # noise standard deviation
AUG_NOISE_CORRELATION = (0.0, 0.8)   # share of it smoothed (0.5-1.5 voxels)
AUG_BLUR = (0.5, (0.3, 1.0))         # probability, Gaussian sigma in voxels


def _blur(x: torch.Tensor, sigma: float, dims: int) -> torch.Tensor:
    """Separable Gaussian blur of the last ``dims`` (2 or 3) axes, edges replicated."""
    r = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    conv = F.conv3d if dims == 3 else F.conv2d
    shape = x.shape
    out = x.reshape((-1, 1) + tuple(shape[-dims:]))
    for axis in range(dims):
        view = [1] * dims
        view[axis] = 2 * r + 1
        pad = [0] * (2 * dims)
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = r   # F.pad lists the last axis first
        out = conv(F.pad(out, pad, mode="replicate"), k.view([1, 1] + view))
    return out.reshape(shape)


def augment_intensity(img: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Scanner variation on normalised images (b, c, *spatial), each sample drawn alone:
    gain and offset, a grey/white contrast change, blur, then noise partly smoothed.

    Only voxels inside the window (0 < x < 1) change: air and fat (0) and bone (1) are
    clipped at inference whatever the scanner, so they stay. Every draw is made for
    every sample, so the stream of ``rng`` does not depend on the branches taken.
    """
    width = WINDOW_HU[1] - WINDOW_HU[0]
    zero = -WINDOW_HU[0] / width                       # 0 HU on the input scale
    dims = img.ndim - 2
    out = []
    for x in img:
        gain, offset = rng.uniform(*AUG_GAIN), rng.uniform(-AUG_OFFSET_HU, AUG_OFFSET_HU) / width
        kappa = rng.uniform(*AUG_CONTRAST)
        level = (rng.uniform(*AUG_CONTRAST_LEVEL_HU) - WINDOW_HU[0]) / width
        blur, blur_sigma = rng.random() < AUG_BLUR[0], rng.uniform(*AUG_BLUR[1])
        sigma, corr = rng.uniform(*AUG_NOISE_HU) / width, rng.uniform(*AUG_NOISE_CORRELATION)
        grain_sigma = rng.uniform(0.5, 1.5)
        noise = torch.from_numpy(rng.standard_normal((2,) + tuple(x.shape), dtype=np.float32))
        # local slope x (1 + kappa) at ``level``, monotone for kappa in [-0.5, 1] (10 HU wide)
        d = x - level
        y = x + kappa * d * torch.exp(-(d / (10.0 / width)) ** 2)
        y = gain * (y - zero) + zero + offset
        if blur:
            y = _blur(y, blur_sigma, dims)
        grain = _blur(noise[1], grain_sigma, dims)
        grain = grain / grain.std().clamp_min(1e-6)
        y = y + sigma * (math.sqrt(1.0 - corr * corr) * noise[0] + corr * grain)
        out.append(torch.where((x > 0) & (x < 1), y.clamp(0.0, 1.0), x))
    return torch.stack(out)


def augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, max_deg: float,
            image_channels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Intensity augmentation on the image channels (:func:`augment_intensity`); a small
    random rotation and scaling of image and labels (a residual head-pose error). The
    left-right channel is left unrotated: it stays a coordinate of the grid, as in
    inference. Deterministic given ``rng``."""
    b = x.shape[0]
    img = augment_intensity(x[:, :image_channels].float(), rng)
    dim = x.ndim - 2
    theta = torch.zeros(b, dim, dim + 1)
    for k in range(b):
        ang = np.radians(rng.uniform(-max_deg, max_deg, 3 if dim == 3 else 1))
        scale = rng.uniform(0.92, 1.08)
        if dim == 2:
            c, s = np.cos(ang[0]), np.sin(ang[0])
            rot = np.array([[c, -s], [s, c]])
        else:
            rot = np.eye(3)
            for ax, a in enumerate(ang):
                c, s = np.cos(a), np.sin(a)
                r = np.eye(3)
                i, j = [q for q in range(3) if q != ax]
                r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
                rot = rot @ r
        theta[k, :, :dim] = torch.from_numpy(rot * scale)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                      align_corners=False)[:, 0].long()
    return torch.cat([img, x[:, image_channels:]], dim=1), y


# ----------------------------------------------------------------------------- training

def class_weights(cases: List[Prepared]) -> torch.Tensor:
    """Inverse square-root frequency, normalised to mean 1: the internal capsule and
    caudate are 10x smaller than M5 and would otherwise be learnt last."""
    counts = np.zeros(regions.NUM_LABELS + 1)
    for c in cases:
        counts += np.bincount(c.labels.ravel(), minlength=regions.NUM_LABELS + 1)
    w = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def make_card(kind: str, cfg: dict) -> models.ModelCard:
    """The card template of a run (networks and metrics are filled in at export)."""
    card = models.ModelCard(
        name=f"aspects-{kind}", version="0", kind=kind,
        architecture={"name": "UNet2D" if kind == "planar" else "UNet3D", "args": {}},
        spacing_mm=[cfg["spacing"]] * 3,
        intensity={"window": WINDOW_HU, "calibration": models.CALIBRATION_SOFT_TISSUE}, networks={},
        context_slices=1, coordinate_channel=True, patch_size=None)
    card.architecture["args"] = {"in_channels": card.in_channels,
                                 "num_classes": regions.NUM_LABELS + 1,
                                 "base_features": cfg["base"], "depth": cfg["depth"],
                                 "norm": "batch"}
    return card


class Dist:
    """torchrun environment: rank, world size, and whether this process logs/saves."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(self.local)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def train_network(net: torch.nn.Module, sampler: Callable[[np.random.Generator], tuple],
                  name: str, run: Path, args: argparse.Namespace, iterations: int, lr: float,
                  weights: torch.Tensor, image_channels: int, max_deg: float, device: str,
                  dd: Dist, log: Callable[[dict], None]) -> torch.nn.Module:
    """Train one network with AdamW + cosine decay; checkpoint and resume by name."""
    net = net.to(device)
    model = torch.nn.parallel.DistributedDataParallel(net) if dd.world > 1 else net
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations)))
    scaler = torch.amp.GradScaler("cuda", enabled=device == "cuda")
    ckpt = run / f"checkpoint-{name}.pt"
    start = 0
    if args.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = int(state["iteration"])
        log({"event": "resumed", "network": name, "iteration": start})
    # crc32, not hash(): str hashes change per process, which made runs unrepeatable
    rng = np.random.default_rng([args.seed, dd.rank, start, zlib.crc32(name.encode())])
    w = weights.to(device)
    model.train()
    t0, running = time.perf_counter(), []
    for it in range(start, iterations):
        x, y = augment(*sampler(rng), rng, max_deg, image_channels)
        x, y = x.to(device), y.to(device)
        with torch.autocast(device_type="cuda", enabled=device == "cuda"):
            loss = segmentation_loss(model(x), y, args.loss, args.alpha, args.beta, w)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        running.append(float(loss.detach()))
        done = it + 1
        if dd.main and (done % args.log_every == 0 or done == iterations):
            log({"network": name, "iteration": done, "of": iterations,
                 "loss": round(float(np.mean(running)), 4), "lr": opt.param_groups[0]["lr"],
                 "seconds": round(time.perf_counter() - t0, 1)})
            running = []
        if dd.main and (done % args.checkpoint_every == 0 or done == iterations):
            tmp = ckpt.with_suffix(".partial")
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "iteration": done}, tmp)
            os.replace(tmp, ckpt)
    if dd.main:
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, run / f"{name}.pt")
    dd.barrier()
    return net.eval()


def initialise_from(net: torch.nn.Module, folder: Path, name: str, card: models.ModelCard) -> dict:
    """Copy the weights of network ``name`` of an exported model folder into ``net``.

    The folder is read by the engine's safe loader (no pickled code runs, the sha256 is
    checked), and its architecture must be the one this run trains: a fine-tuned model
    that silently dropped half its weights would look trained and be not.
    """
    loaded = models.load_model(Path(folder), device="cpu")
    if loaded.card.kind != card.kind or name not in loaded.nets:
        raise InputError(f"--init-from {folder} holds a {loaded.card.kind} model without a "
                         f"'{name}' network; this run trains {card.kind}.",
                         "Give a model folder of the same kind.")
    theirs, ours = loaded.card.architecture, card.architecture
    if theirs != ours:
        raise InputError(f"--init-from {folder} has another architecture ({theirs}) than this run "
                         f"({ours}).", "Train with the same --base-features and depth, or start "
                         "from random weights.")
    net.load_state_dict(loaded.nets[name].state_dict())
    return {"from": str(folder), "model": f"{loaded.card.name} {loaded.card.version}"}


def split_folds(names: List[str], folds: int, fold: int, seed: int) -> Tuple[List[str], List[str]]:
    """Deterministic k-fold split of case names: (training, held out)."""
    if folds <= 1:
        return names, []
    if not 0 <= fold < folds:
        raise ValueError(f"--fold must be in 0..{folds - 1}")
    order = list(np.random.default_rng(seed).permutation(len(names)))
    held = {names[i] for k, i in enumerate(order) if k % folds == fold}
    return [n for n in names if n not in held], sorted(held)


#: Files that make a folder a training run (what ``--overwrite`` replaces).
RUN_FILES = ("config.json", "log.jsonl")
RUN_PATTERNS = ("*.pt", "*.partial")


def run_files(run_dir: Path) -> List[Path]:
    """The files of an earlier run in ``run_dir`` (config, log, weights, checkpoints)."""
    if not run_dir.is_dir():
        return []
    found = [run_dir / n for n in RUN_FILES if (run_dir / n).is_file()]
    for pattern in RUN_PATTERNS:
        found += sorted(p for p in run_dir.glob(pattern) if p.is_file())
    return found


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> List[Path]:
    """Refuse to train into an earlier run unless ``--resume`` or ``--overwrite`` says so.

    Training over a run silently replaced its weights and ``config.json``: hours of work
    gone by a repeated command. Returns the earlier run's files that ``--overwrite``
    removes (none otherwise). A non-empty folder that is no run is refused too: weights
    mixed into a dataset or another project are hard to tell apart afterwards.
    """
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other.",
                         "--resume continues the run in --out, --overwrite starts it again.")
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"--out {run_dir} is a file.", "Give a folder for the run (created if missing).")
    earlier = run_files(run_dir)
    if earlier and not (resume or overwrite):
        names = ", ".join(p.name for p in earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        raise InputError(f"{run_dir} already holds a training run ({names}); nothing was changed.",
                         "Continue it with --resume, start it again with --overwrite, or give "
                         "another --out.")
    if not earlier and run_dir.is_dir() and any(p.name != "cache" for p in run_dir.iterdir()):
        raise InputError(f"--out {run_dir} is not empty and holds no training run.",
                         "Give a new or empty folder for the run.")
    return earlier if overwrite else []


def _duration(seconds: float) -> str:
    """``42 s``, ``7 min 5 s``, ``2 h 13 min``: how long, for people."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min"


def recorded_init(run_dir: Path, config: dict, kind: str, nets: List[str]) -> Optional[str]:
    """The model folder an earlier start of this run was initialised from: config.json's
    entry when the kind finished once, else the log's "initialised" event (a run stopped
    before its end has no config.json entry yet)."""
    entry = config.get("kinds", {}).get(kind, {})
    if entry.get("initialised_from"):
        return entry["initialised_from"]
    logfile = run_dir / "log.jsonl"
    if not logfile.is_file():
        return None
    for line in logfile.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "initialised" and event.get("network") in nets and event.get("from"):
            return str(event["from"])
    return None


class Reporter:
    """Writes every event as a JSON line to ``log.jsonl`` (the machine-readable record)
    and prints a human line for it: progress with the time left for the network and for
    the whole run (at the current speed), so a long run says when it will end."""

    def __init__(self, logfile: Path, plan: List[Tuple[str, int]], enabled: bool) -> None:
        self.logfile, self.plan, self.enabled = logfile, plan, enabled
        self.start_iteration: Dict[str, int] = {}
        self.done: Dict[str, int] = {}

    def __call__(self, entry: dict) -> None:
        if not self.enabled:
            return
        entry = {"time": round(time.time(), 1), **entry}
        with open(self.logfile, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")
        line = self.human(entry)
        if line:
            print(line, flush=True)

    def remaining_iterations(self, network: str, iteration: int) -> int:
        """Iterations left in the run: this network's and every later one's."""
        names = [n for n, _ in self.plan]
        later = names[names.index(network) + 1:] if network in names else []
        total = dict(self.plan)
        return (total.get(network, iteration) - iteration) + sum(
            total[n] - self.done.get(n, 0) for n in later)

    def human(self, e: dict) -> Optional[str]:
        event, net = e.get("event"), e.get("network")
        if "prepare" in e:
            return f"  {e['prepare']}"
        if event == "start":
            held = f", {len(e['held_out'])} held out" if e.get("held_out") else ""
            return (f"training {e['kind']} on {e['cases']} cases{held}, {e['config']['iterations']} "
                    f"iterations per network, device {e['device']} (JSON log: {self.logfile})")
        if event == "resumed":
            self.start_iteration[net] = e["iteration"]
            self.done[net] = e["iteration"]
            return f"{net}: resumed at iteration {e['iteration']}"
        if event == "initialised":
            return f"{net}: starting from the weights of {e.get('model')} ({e.get('from')})"
        if "loss" in e and net is not None:
            it, of = e["iteration"], e["of"]
            self.done[net] = it
            ran = it - self.start_iteration.get(net, 0)
            rate = e["seconds"] / ran if ran > 0 else 0.0
            names = [n for n, _ in self.plan]
            position = f" ({names.index(net) + 1}/{len(names)})" if net in names else ""
            return (f"{net}{position}: iteration {it}/{of}, loss {e['loss']:.4f}, {rate:.2f} s/iteration, "
                    f"ETA {_duration(rate * (of - it))} for {net}, "
                    f"{_duration(rate * self.remaining_iterations(net, it))} for the run at this speed")
        return None


def run(args: argparse.Namespace) -> int:
    """Train the networks of ``--kind`` into the run folder ``--out``.

    A run folder this call created is removed again when the run fails before any
    weights or checkpoint were saved, so a typo in ``--data`` leaves nothing behind.
    """
    run_dir = Path(args.out)
    created = not run_dir.exists()
    try:
        return _run(args, run_dir)
    except BaseException:
        if created and run_dir.is_dir() and not any(run_dir.glob("*.pt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _kind_config(kind: str, args: argparse.Namespace) -> dict:
    """The defaults of a kind with the command line's values over them."""
    cfg = {k: v for k, v in DEFAULTS[kind].items()}
    for key, value in (("iterations", args.iterations), ("batch", args.batch_size),
                       ("lr", args.lr), ("spacing", args.spacing), ("base", args.base_features),
                       ("patch", args.patch), ("canvas", args.canvas)):
        if value is not None:
            cfg[key] = value
    return cfg


def _run(args: argparse.Namespace, run_dir: Path) -> int:
    from BrainLobeSegLib.dataset import list_cases
    from BrainLobeSegLib.inference import resolve_device
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dd = Dist(device)
    earlier = check_run_folder(run_dir, args.resume, getattr(args, "overwrite", False))
    dd.barrier()   # every rank has looked before rank 0 writes anything
    if dd.main:
        for path in earlier:
            path.unlink()
        if earlier:
            print(f"--overwrite: removed the earlier run's {len(earlier)} files from {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    logfile = run_dir / "log.jsonl"
    kinds = ["planar", "3d"] if args.kind == "both" else [args.kind]
    cfgs = {kind: _kind_config(kind, args) for kind in kinds}
    plan = [(name, cfgs[kind]["iterations"]) for kind in kinds
            for name in (list(models.PLANES) if kind == "planar" else ["unet3d"])]
    log = Reporter(logfile, plan, enabled=dd.main)
    t_run = time.perf_counter()

    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8")) if args.resume and (
        run_dir / "config.json").is_file() else {"kinds": {}}
    for kind in kinds:
        cfg = cfgs[kind]
        card = make_card(kind, cfg)
        multiple = 2 ** (cfg["depth"] - 1)
        names = [c.name for d in args.data for c in list_cases(d) if c.seg_path is not None]
        train_names, held = split_folds(names, args.folds, args.fold, args.seed)
        cases: List[Prepared] = []
        for d in args.data:
            cases += load_dataset(d, card, multiple, run_dir / "cache", names=train_names,
                                  log=lambda m: log({"prepare": m}))
        if args.phantoms:
            cases += phantom_cases(args.phantoms, card, multiple, args.seed)
        if not cases:
            raise InputError(f"no labelled cases to train on in {', '.join(str(d) for d in args.data)} "
                             "(no N-seg.nii.gz next to the scans).",
                             "Give dataset folders with labels (docs/DESIGN.md section 2), or add "
                             "--phantoms N.")
        weights = class_weights(cases)
        log({"event": "start", "kind": kind, "cases": len(cases), "held_out": held, "config": cfg,
             "loss": args.loss, "world_size": dd.world, "device": device})
        nets = list(models.PLANES) if kind == "planar" else ["unet3d"]
        # a run resumed from its checkpoints keeps the provenance its first start recorded
        # (--init-from is only needed, and usually only given, at that start)
        inherited_init = (recorded_init(run_dir, config, kind, nets) if args.resume and all(
            (run_dir / f"checkpoint-{n}.pt").is_file() for n in nets) else None)
        for name in nets:
            torch.manual_seed(args.seed)
            net = build_network(card.architecture["name"], card.architecture["args"])
            if args.init_from:
                log({"event": "initialised", "network": name,
                     **initialise_from(net, args.init_from, name, card)})
            if kind == "planar":
                axis = models.PLANES[name]
                sampler = (lambda a: lambda rng: sample_planar(
                    cases, a, cfg["batch"], cfg["canvas"], card.context_slices, rng))(axis)
                image_channels, max_deg = card.in_channels - 1, 8.0
            else:
                sampler = lambda rng: sample_3d(cases, cfg["batch"], cfg["patch"], rng)  # noqa: E731
                image_channels, max_deg = 1, 5.0
            train_network(net, sampler, name, run_dir, args, cfg["iterations"], cfg["lr"], weights,
                          image_channels, max_deg, device, dd, log)
        init_from = str(args.init_from) if args.init_from else inherited_init
        config["kinds"][kind] = {"card": card.to_json(), "config": cfg, "held_out": held,
                                 "train_cases": len(cases), "phantoms": args.phantoms,
                                 "data": [str(d) for d in args.data], "loss": args.loss,
                                 "alpha": args.alpha, "beta": args.beta, "seed": args.seed,
                                 "folds": args.folds, "fold": args.fold, "world_size": dd.world,
                                 "initialised_from": init_from}
        if dd.main:
            (run_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if dd.world > 1:
        dist.destroy_process_group()
    if dd.main:
        print(f"done in {_duration(time.perf_counter() - t_run)}: {', '.join(n for n, _ in plan)} in "
              f"{run_dir} (log {logfile.name}); next: python -m training export --run {run_dir} "
              "--out MODELS_DIR", flush=True)
    return 0
