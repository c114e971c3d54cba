"""An nnU-Net-class 3d_fullres network and its sliding-window inference, for speed only.

Written from the published description of nnU-Net's default 3d_fullres plan for a head
CT with 128^3 patches (no nnU-Net code is used or copied):

- ``PlainConvUNet`` with 6 stages, features 32, 64, 128, 256, 320, 320;
- each stage: 2 x (3x3x3 conv with bias -> InstanceNorm (affine) -> LeakyReLU 0.01);
  the first conv of stages 2-6 has stride 2 (strided-conv downsampling, no pooling);
- decoder: 2x2x2 transposed conv (stride 2) -> concatenate the skip -> 2 x conv block;
  a 1x1x1 segmentation head at full resolution (deep supervision is off at inference);
- inference: sliding 128^3 windows with step 0.5 of the patch, logits weighted by a
  Gaussian (sigma = patch / 8) and divided by the summed weights.

Not counted, on purpose: nnU-Net's default test-time mirroring (8 flipped passes per
window, i.e. about 8x the time measured here). Leaving it out makes the baseline faster
than real nnU-Net inference, so the speed ratios reported against it are conservative.

The weights are random: the network is a yardstick for compute, not a segmenter.
"""

from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

FEATURES = (32, 64, 128, 256, 320, 320)
PATCH = (128, 128, 128)
STEP = 0.5


class _Stage(nn.Sequential):
    """Two conv -> instance norm -> LeakyReLU blocks; the first may be strided."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__(
            nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=True),
            nn.InstanceNorm3d(cout, eps=1e-5, affine=True), nn.LeakyReLU(0.01, inplace=True),
            nn.Conv3d(cout, cout, 3, stride=1, padding=1, bias=True),
            nn.InstanceNorm3d(cout, eps=1e-5, affine=True), nn.LeakyReLU(0.01, inplace=True))


class PlainConvUNet3D(nn.Module):
    """The 6-stage plain-convolution U-Net of nnU-Net's 3d_fullres default plan."""

    def __init__(self, in_channels: int = 1, num_classes: int = 21,
                 features: Sequence[int] = FEATURES) -> None:
        super().__init__()
        feats = list(features)
        self.encoder = nn.ModuleList(
            [_Stage(in_channels if i == 0 else feats[i - 1], f, 1 if i == 0 else 2)
             for i, f in enumerate(feats)])
        self.up = nn.ModuleList([nn.ConvTranspose3d(feats[i], feats[i - 1], 2, stride=2, bias=True)
                                 for i in range(len(feats) - 1, 0, -1)])
        self.decoder = nn.ModuleList([_Stage(2 * feats[i - 1], feats[i - 1], 1)
                                      for i in range(len(feats) - 1, 0, -1)])
        self.head = nn.Conv3d(feats[0], num_classes, 1, bias=True)

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this (five stride-2 stages)."""
        return 2 ** (len(self.encoder) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: List[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.decoder):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def steps_along(n: int, patch: int, step: float = STEP) -> List[int]:
    """Window starts along one axis: as few as cover ``n`` with at most ``step * patch``
    between neighbours, spread evenly from 0 to ``n - patch``."""
    if n <= patch:
        return [0]
    count = int(math.ceil((n - patch) / (step * patch))) + 1
    spacing = (n - patch) / (count - 1)
    return [int(round(i * spacing)) for i in range(count)]


def gaussian_weights(patch: Sequence[int], sigma_fraction: float = 1.0 / 8) -> torch.Tensor:
    """Gaussian importance map (max 1, tiny positive floor so no voxel gets weight 0)."""
    axes = [torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in patch]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    g = torch.exp(-0.5 * ((zz / (sigma_fraction * patch[0])) ** 2
                          + (yy / (sigma_fraction * patch[1])) ** 2
                          + (xx / (sigma_fraction * patch[2])) ** 2))
    g /= g.max()
    return g.clamp_min(float(g[g > 0].min()))


def windows_for(shape: Sequence[int], patch: Sequence[int] = PATCH,
                step: float = STEP) -> List[Tuple[int, int, int]]:
    """All window corners for a (z, y, x) volume already padded to at least ``patch``."""
    s = [steps_along(n, p, step) for n, p in zip(shape, patch)]
    return [(a, b, c) for a in s[0] for b in s[1] for c in s[2]]


def pad_to_patch(volume: np.ndarray, patch: Sequence[int]) -> Tuple[np.ndarray, Tuple[slice, ...]]:
    """Pad (centred, with 0 = air after normalisation) to at least the patch size."""
    pads, crop = [], []
    for n, p in zip(volume.shape, patch):
        extra = max(0, p - n)
        pads.append((extra // 2, extra - extra // 2))
        crop.append(slice(extra // 2, extra // 2 + n))
    return np.pad(volume, pads) if any(sum(p) for p in pads) else volume, tuple(crop)


def sliding_window_predict(net: PlainConvUNet3D, volume: np.ndarray,
                           patch: Sequence[int] = PATCH, step: float = STEP,
                           max_windows: Optional[int] = None, budget_s: Optional[float] = None,
                           num_classes: int = 21,
                           on_window: Optional[Callable[[int, int, float], None]] = None) -> dict:
    """Run Gaussian-weighted sliding windows over a normalised (z, y, x) volume.

    Stops early after ``max_windows`` windows, or once ``budget_s`` seconds are spent
    (always at least two windows, so a steady-state window time exists beside the first
    one, which carries the first-call costs). Returns the timings and, only when every
    window ran, the label volume.

    Why stop early: one 128^3 window of this network costs on the order of a teraflop;
    on a 2-core laptop a full pass can take minutes, and a benchmark that takes an hour
    is not run. The caller extrapolates and says so.
    """
    t0 = time.perf_counter()
    padded, crop = pad_to_patch(volume, patch)
    x = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))[None, None]
    weight = gaussian_weights(patch)
    corners = windows_for(padded.shape, patch, step)
    logits = torch.zeros((num_classes,) + tuple(padded.shape), dtype=torch.float32)
    norm = torch.zeros(tuple(padded.shape), dtype=torch.float32)
    times: List[float] = []
    setup = time.perf_counter() - t0
    with torch.inference_mode():
        for i, (a, b, c) in enumerate(corners):
            if max_windows is not None and i >= max(1, max_windows):
                break
            if budget_s is not None and i >= 2 and sum(times) >= budget_s:
                break
            w0 = time.perf_counter()
            sl = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
            out = net(x[(slice(None), slice(None)) + sl])[0]
            logits[(slice(None),) + sl] += out * weight
            norm[sl] += weight
            times.append(time.perf_counter() - w0)
            if on_window is not None:
                on_window(i + 1, len(corners), times[-1])
        complete = len(times) == len(corners)
        f0 = time.perf_counter()   # timed even when stopped early: it is part of a pass
        logits /= norm.clamp_min(1e-8)
        labels = logits.argmax(0)[crop].to(torch.uint8).numpy()
        finish = time.perf_counter() - f0
    return {"windows_total": len(corners), "windows_run": len(times), "window_s": times,
            "setup_s": setup, "finish_s": finish, "complete": complete, "labels": labels if complete else None,
            "padded_shape": list(padded.shape)}


def estimated_inference_s(result: dict) -> float:
    """Total time of the full pass: measured windows, plus the windows not run at the
    steady-state (median of all but the first) window time, plus setup and finish."""
    times = result["window_s"]
    steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
    missing = result["windows_total"] - result["windows_run"]
    return result["setup_s"] + sum(times) + missing * steady + result["finish_s"]
