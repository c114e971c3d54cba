"""The network architectures a model card may name.

Only names in :data:`ARCHITECTURES` can be built, with only the arguments listed there:
a model folder describes its network as data (``model.json``) and carries plain
tensors, so loading a model never runs code that came with it.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import nn

from .errors import ModelError
from .steps import Steps, run_steps

_NORMS = ("batch", "instance")


def _norm(dim: int, kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)(channels)
    return (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)(channels, affine=True)


class ConvBlock(nn.Sequential):
    """Two 3x3(x3) convolutions, each followed by normalisation and LeakyReLU."""

    def __init__(self, dim: int, cin: int, cout: int, norm: str, stride: int = 1) -> None:
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        super().__init__(
            conv(cin, cout, 3, stride=stride, padding=1, bias=False), _norm(dim, norm, cout),
            nn.LeakyReLU(0.01, inplace=True),
            conv(cout, cout, 3, padding=1, bias=False), _norm(dim, norm, cout),
            nn.LeakyReLU(0.01, inplace=True))


class UNet(nn.Module):
    """A compact U-Net (2D or 3D): strided-conv downsampling, transposed-conv upsampling.

    Inputs must be divisible by ``2 ** (depth - 1)`` along every spatial axis.
    """

    def __init__(self, dim: int, in_channels: int, num_classes: int, base_features: int = 16,
                 depth: int = 4, max_features: int = 256, norm: str = "batch") -> None:
        super().__init__()
        if dim not in (2, 3) or norm not in _NORMS or depth < 2:
            raise ValueError("invalid U-Net arguments")
        self.dim, self.depth = dim, depth
        feats: List[int] = [min(base_features * 2 ** i, max_features) for i in range(depth)]
        self.encoders = nn.ModuleList(
            [ConvBlock(dim, in_channels, feats[0], norm)]
            + [ConvBlock(dim, feats[i - 1], feats[i], norm, stride=2) for i in range(1, depth)])
        up = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d
        self.ups = nn.ModuleList([up(feats[i], feats[i - 1], 2, stride=2, bias=False)
                                  for i in range(depth - 1, 0, -1)])
        self.decoders = nn.ModuleList([ConvBlock(dim, 2 * feats[i - 1], feats[i - 1], norm)
                                       for i in range(depth - 1, 0, -1)])
        self.head = (nn.Conv2d if dim == 2 else nn.Conv3d)(feats[0], num_classes, 1)

    @property
    def divisor(self) -> int:
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_steps(self.forward_steps(x))

    def forward_steps(self, x: torch.Tensor) -> "Steps[torch.Tensor]":
        """:meth:`forward` in steps of one convolution (with its norm and activation)
        each, so a whole-head 3D pass never holds Slicer's main thread for long (see
        :mod:`steps`). The same code path serves training and inference."""
        x = yield from self.features_steps(x)
        return self.head(x)

    def features_steps(self, x: torch.Tensor) -> "Steps[torch.Tensor]":
        """The last decoder's features, before the 1x1 ``head``: the head works voxel by
        voxel, so a caller may apply it to one slab at a time (a whole head's 21-class
        logits are a fresh 90 MB tensor in one step)."""
        skips = []
        for enc in self.encoders:
            x = yield from _block_steps(enc, x)
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.ups, self.decoders):
            x = torch.cat([up(x), skips.pop()], dim=1)
            yield
            x = yield from _block_steps(dec, x)
        return x


def _block_steps(block: ConvBlock, x: torch.Tensor) -> "Steps[torch.Tensor]":
    """A :class:`ConvBlock`, yielding after each convolution + norm + activation."""
    layers = list(block)
    for i in range(0, len(layers), 3):
        for layer in layers[i:i + 3]:
            x = layer(x)
        yield
    return x


def _unet2d(**kw: Any) -> UNet:
    return UNet(2, **kw)


def _unet3d(**kw: Any) -> UNet:
    return UNet(3, **kw)


#: name -> (constructor, {argument: type}); the only networks a model card can ask for.
ARCHITECTURES: Dict[str, Any] = {
    "UNet2D": (_unet2d, {"in_channels": int, "num_classes": int, "base_features": int,
                         "depth": int, "max_features": int, "norm": str}),
    "UNet3D": (_unet3d, {"in_channels": int, "num_classes": int, "base_features": int,
                         "depth": int, "max_features": int, "norm": str}),
}


#: Sane bounds of the integer arguments (inclusive). A card beyond them (10^6 features,
#: depth 1000) would exhaust memory or crash inside PyTorch before any check of ours.
ARG_BOUNDS = {"in_channels": (1, 64), "num_classes": (2, 256), "base_features": (1, 256),
              "depth": (2, 8), "max_features": (1, 1024)}


def build_network(name: str, args: Dict[str, Any]) -> UNet:
    """Build an architecture from its card entry, refusing unknown names and arguments."""
    if name not in ARCHITECTURES:
        raise ModelError(f"unknown architecture {name!r}.",
                         f"This engine builds {', '.join(sorted(ARCHITECTURES))}; update BrainLobeSeg.")
    ctor, schema = ARCHITECTURES[name]
    for key, value in args.items():
        if key not in schema:
            raise ModelError(f"architecture {name} has no argument {key!r}.",
                             "The model card does not match this engine version.")
        if not isinstance(value, schema[key]) or isinstance(value, bool):
            raise ModelError(f"architecture argument {key}={value!r} should be {schema[key].__name__}.",
                             "Fix model.json or export the model again.")
        lo, hi = ARG_BOUNDS.get(key, (value, value))
        if not lo <= value <= hi:
            raise ModelError(f"architecture argument {key}={value!r} is outside {lo}..{hi}.",
                             "Fix model.json or export the model again.")
    try:
        return ctor(**args)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot build {name} from {args} ({exc}).",
                         "Fix model.json or export the model again.") from None
