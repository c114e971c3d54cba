"""Model folders: the ``model.json`` card format and safe loading.

A model folder (``Resources/Models/<name>/``) holds ``model.json`` and one weights file
per network (``<network>.pt``, a plain ``state_dict`` of tensors). The card is the single
source of truth for how a model is fed: spacing, intensity window, context slices,
coordinate channel, label table. Training writes cards with :func:`save_card`; the engine
reads them with :func:`load_model`.

Safety: weights are loaded with ``torch.load(weights_only=True)`` (tensors only, no
pickled code) after their sha256 matches the card; the network is built from
:mod:`networks` by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from . import geometry, regions
from .resources import bundled_dir
from .errors import ModelError
from .imageio import default_file_mode
from .networks import UNet, build_network

CARD_NAME = "model.json"
CARD_FORMAT = 1
KINDS = ("planar", "3d")
#: planar network names; also the axis of the (z, y, x) model-grid array they slice.
PLANES = {"axial": 0, "coronal": 1, "sagittal": 2}
MODELS_ENV = "BRAINLOBESEG_MODELS"

#: Sane bounds of a card's grid: a head CT model works at about 0.5-5 mm, and a patch of
#: [1, 1, 1] voxels would mean millions of windows (10^6 mm spacing: an empty grid).
SPACING_BOUNDS_MM = (0.25, 20.0)
PATCH_BOUNDS = (8, 512)

_REQUIRED = {"format": int, "name": str, "version": str, "kind": str, "architecture": dict,
             "spacing_mm": list, "intensity": dict, "labels": list, "networks": dict}


@dataclass
class ModelCard:
    """What ``model.json`` holds. See docs/DESIGN.md section 4."""

    name: str
    version: str
    kind: str                           # "planar" or "3d"
    architecture: Dict[str, Any]        # {"name": "UNet2D", "args": {...}}
    spacing_mm: List[float]             # model grid spacing, x y z
    intensity: Dict[str, Any]           # {"window": [lo, hi]} in HU -> [0, 1]
    networks: Dict[str, Dict[str, str]]  # network name -> {"file": ..., "sha256": ...}
    labels: List[dict] = field(default_factory=regions.label_table)
    context_slices: int = 1             # planar: neighbours on each side (2.5D)
    coordinate_channel: bool = True     # left-right channel appended to the input
    patch_size: Optional[List[int]] = None  # 3d: sliding-window patch (z, y, x); None = whole
    training: Dict[str, Any] = field(default_factory=dict)   # data provenance, settings
    metrics: Dict[str, Any] = field(default_factory=dict)    # held-out evaluation
    quality: Dict[str, Any] = field(default_factory=dict)    # plausible result ranges (quality.py)
    description: str = ""
    format: int = CARD_FORMAT

    @property
    def in_channels(self) -> int:
        n = (2 * self.context_slices + 1) if self.kind == "planar" else 1
        return n + int(self.coordinate_channel)

    def to_json(self) -> Dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "format", "name", "version", "kind", "description", "architecture", "spacing_mm",
            "intensity", "context_slices", "coordinate_channel", "patch_size", "labels",
            "networks", "training", "metrics", "quality")}


@dataclass
class LoadedModel:
    """A validated card and its networks, in eval mode on one device."""

    card: ModelCard
    folder: Path
    nets: Dict[str, UNet]
    device: torch.device


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: ``intensity.calibration`` of a card: subtract the scan's soft-tissue calibration shift
#: (:func:`geometry.calibration_shift`) before the window. Cards without it use raw HU.
CALIBRATION_SOFT_TISSUE = "soft-tissue-median"


def normalise_intensity(hu: np.ndarray, card: ModelCard) -> np.ndarray:
    """HU -> network input in [0, 1] with the card's window (the only place this happens).

    With ``intensity.calibration`` set to :data:`CALIBRATION_SOFT_TISSUE`, a whole-scan
    offset (another scanner's calibration) is removed first, so the network sees the
    same densities whatever the scanner; training and inference both come through here.
    """
    if card.intensity.get("calibration") == CALIBRATION_SOFT_TISSUE:
        hu = hu - np.float32(geometry.calibration_shift(hu))
    lo, hi = (float(v) for v in card.intensity["window"])
    out = np.clip(hu, lo, hi, out=None if hu.dtype != np.float32 else hu)
    out -= lo
    out *= 1.0 / (hi - lo)
    return out


def read_card(folder: Path) -> ModelCard:
    """Parse and check ``model.json`` (structure, kind, label table, architecture)."""
    path = Path(folder) / CARD_NAME
    if not path.is_file():
        raise ModelError(f"{folder} is not a model folder (no {CARD_NAME}).",
                         "Give a folder exported by `python -m training export`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}).", "Export the model again.") from None
    except RecursionError:
        raise ModelError(f"{path} is not a model card (JSON nested too deeply).",
                         "Export the model again.") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} does not hold a JSON object (a model card).", "Export the model again.")
    for key, typ in _REQUIRED.items():
        if not isinstance(data.get(key), typ):
            raise ModelError(f"{path}: field {key!r} is missing or not a {typ.__name__}.",
                             "Export the model again with this version of BrainLobeSeg.")
    if data["format"] != CARD_FORMAT:
        raise ModelError(f"{path} has card format {data['format']}, this engine reads {CARD_FORMAT}.",
                         "Use a matching BrainLobeSeg version.")
    known = set(ModelCard.__dataclass_fields__)
    card = ModelCard(**{k: v for k, v in data.items() if k in known})
    _check_card(card, path)
    return card


def _numbers(values: Any, count: int) -> bool:
    """``values`` is a list of ``count`` finite real numbers (bools excluded)."""
    return (isinstance(values, (list, tuple)) and len(values) == count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                    for v in values))


def _check_card(card: ModelCard, path: Path) -> None:
    """Every field the engine uses, checked for type and range: a user's own model
    folder must fail here with a clear message, not deep inside inference."""
    if card.kind not in KINDS:
        raise ModelError(f"{path}: kind {card.kind!r} is not one of {KINDS}.", "Fix model.json.")
    if not (isinstance(card.architecture.get("name"), str)
            and isinstance(card.architecture.get("args", {}), dict)):
        raise ModelError(f"{path}: architecture must be {{\"name\": ..., \"args\": {{...}}}}.",
                         "Fix model.json.")
    ours = [(r["label"], r["code"], r["side"]) for r in regions.label_table()]
    theirs = [(r.get("label"), r.get("code"), r.get("side")) if isinstance(r, dict) else r
              for r in card.labels]
    if theirs != ours:
        raise ModelError(f"{path}: the label table differs from BrainLobeSeg's 20 ASPECTS regions.",
                         "Train the model with this version's regions table.")
    if not _numbers(card.spacing_mm, 3) or not all(
            SPACING_BOUNDS_MM[0] <= s <= SPACING_BOUNDS_MM[1] for s in card.spacing_mm):
        raise ModelError(f"{path}: spacing_mm must be three numbers from {SPACING_BOUNDS_MM[0]} to "
                         f"{SPACING_BOUNDS_MM[1]} mm, not {card.spacing_mm!r}.", "Fix model.json.")
    calibration = card.intensity.get("calibration")
    if calibration not in (None, CALIBRATION_SOFT_TISSUE):
        raise ModelError(f"{path}: intensity calibration {calibration!r} is unknown to this engine "
                         f"(it knows {CALIBRATION_SOFT_TISSUE!r}).", "Update BrainLobeSeg.")
    window = card.intensity.get("window")
    if not _numbers(window, 2) or not window[1] > window[0]:
        raise ModelError(f"{path}: intensity window must be two numbers lo < hi, not {window!r}.",
                         "Fix model.json.")
    if (not isinstance(card.context_slices, int) or isinstance(card.context_slices, bool)
            or not 0 <= card.context_slices <= 16):
        raise ModelError(f"{path}: context_slices must be an integer 0..16.", "Fix model.json.")
    if not isinstance(card.coordinate_channel, bool):
        raise ModelError(f"{path}: coordinate_channel must be true or false.", "Fix model.json.")
    if card.patch_size is not None and not (_numbers(card.patch_size, 3) and all(
            isinstance(p, int) and PATCH_BOUNDS[0] <= p <= PATCH_BOUNDS[1] for p in card.patch_size)):
        raise ModelError(f"{path}: patch_size must be null or three integers from {PATCH_BOUNDS[0]} "
                         f"to {PATCH_BOUNDS[1]}, not {card.patch_size!r}.", "Fix model.json.")
    if not isinstance(card.quality, dict):
        raise ModelError(f"{path}: quality must be an object of result ranges.", "Fix model.json.")
    expected = set(PLANES) if card.kind == "planar" else {"unet3d"}
    if set(card.networks) != expected:
        raise ModelError(f"{path}: a {card.kind} model needs networks {sorted(expected)}, "
                         f"the card lists {sorted(card.networks)}.", "Export the model again.")
    for net_name, entry in card.networks.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                and isinstance(entry.get("sha256"), str)):
            raise ModelError(f"{path}: network {net_name!r} needs a \"file\" and a \"sha256\".",
                             "Export the model again.")
    args = card.architecture.get("args", {})
    if args.get("in_channels") != card.in_channels or args.get("num_classes") != regions.NUM_LABELS + 1:
        raise ModelError(f"{path}: the architecture's channels ({args.get('in_channels')} in, "
                         f"{args.get('num_classes')} out) do not match the card "
                         f"({card.in_channels} in, {regions.NUM_LABELS + 1} out).", "Fix model.json.")


def _one_line(text: str, limit: int = 200) -> str:
    """An exception text as one short line (no ANSI colours, tabs or newlines)."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", text).split())[:limit]


def _unloadable(wpath: Path, exc: Exception) -> ModelError:
    """Why ``torch.load(weights_only=True)`` refused a file: pickled code, or a file that
    is not a weights file at all (empty, cut, another format)."""
    text = str(exc)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if found is None and not re.search(r"\b(REDUCE|BUILD|GLOBAL|global)\b", text):
        reason = _one_line(text.split("WeightsUnpickler error:")[-1], 80) or type(exc).__name__
        return ModelError(f"{wpath} is not a readable weights file (empty, cut or another format: "
                          f"{reason}).", "Restore the model folder from the release or export it again.")
    return ModelError(f"{wpath} holds pickled objects, not just tensors"
                      + (f" (it refers to {found.group(1)})" if found else "") + "; it was not loaded.",
                      "Use a model folder exported by `python -m training export` from a source you trust.")


def _check_finite(state: Dict[str, torch.Tensor], wpath: Path) -> None:
    """NaN or infinite weights (a diverged training run, a damaged export) give no labels
    at all; refused here, whatever the sha256 says."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelError(f"{wpath} holds NaN or infinite weights ({len(bad)} tensors, e.g. {bad[0]}).",
                         "Restore the model folder from the release or export it again.")


def load_model(folder: Path, device: str = "cpu") -> LoadedModel:
    """Load a model folder after checking its card and the sha256 of every weights file."""
    folder = Path(folder)
    card = read_card(folder)
    nets = {}
    for net_name, entry in card.networks.items():
        wpath = folder / entry["file"]
        if wpath.resolve().parent != folder.resolve():
            raise ModelError(f"{folder}: weights file {entry['file']!r} lies outside the model folder.",
                             "Fix model.json.")
        if not wpath.is_file():
            raise ModelError(f"{folder}: weights file {entry['file']} is missing.", "Export the model again.")
        digest = sha256_of(wpath)
        if digest != entry.get("sha256"):
            raise ModelError(f"{wpath} does not match the sha256 in model.json (tampered or "
                             "replaced).", "Restore the model folder from the release or export it again.")
        net = build_network(card.architecture["name"], card.architecture.get("args", {}))
        try:
            # weights_only: tensors and plain containers only; a pickled object (code)
            # is refused by the unpickler before anything of it is run.
            state = torch.load(wpath, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _unloadable(wpath, exc) from None
        if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())):
            raise ModelError(f"{wpath} is not a state_dict of tensors.", "Export the model again.")
        _check_finite(state, wpath)
        try:
            net.load_state_dict(state, strict=True)
        except Exception as exc:
            raise ModelError(f"{wpath} does not fit the architecture in model.json "
                             f"({_one_line(str(exc))}).", "Export the model again.") from None
        nets[net_name] = net.to(device).eval()
    return LoadedModel(card=card, folder=folder, nets=nets, device=torch.device(device))


def save_model(folder: Path, card: ModelCard, nets: Dict[str, torch.nn.Module]) -> Path:
    """Write weights and card (sha256 filled in); the card is written last, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    networks = {}
    for net_name, net in nets.items():
        wpath = folder / f"{net_name}.pt"
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        torch.save(state, wpath)
        networks[net_name] = {"file": wpath.name, "sha256": sha256_of(wpath)}
    card.networks = networks
    _check_card(card, folder / CARD_NAME)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".partial-", suffix=".json")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(card.to_json(), fh, indent=2)
    os.chmod(tmp, default_file_mode())   # mkstemp makes it private (0600)
    os.replace(tmp, folder / CARD_NAME)
    return folder


def make_tiny_model(folder: Path, kind: str, spacing: float = 4.0, seed: int = 0) -> Path:
    """A real model folder holding a very small, randomly initialised network of ``kind``.

    Plumbing checks (geometry, outputs, cancel, MRML) need a model that loads and runs
    like a trained one but in milliseconds; the pytest suite, the Slicer self-test and
    the benchmark's smoke run all make theirs here so that they test the same thing.
    ``kind="planar"`` writes the three 2D networks, ``"3d"`` one 3D network.
    """
    torch.manual_seed(seed)
    architecture = "UNet2D" if kind == "planar" else "UNet3D"
    card = ModelCard(
        name=f"tiny-{kind}", version="0.0.test", kind=kind,
        architecture={"name": architecture, "args": {}}, spacing_mm=[spacing] * 3,
        intensity={"window": [-20.0, 100.0]}, networks={}, context_slices=1,
        coordinate_channel=True, description="random weights, for tests",
        training={"data": "none (random initialisation)"})
    card.architecture["args"] = {"in_channels": card.in_channels,
                                 "num_classes": regions.NUM_LABELS + 1,
                                 "base_features": 4, "depth": 3, "norm": "batch"}
    names = list(PLANES) if kind == "planar" else ["unet3d"]
    nets = {n: build_network(architecture, card.architecture["args"]).eval() for n in names}
    return save_model(folder, card, nets)


#: A held-out mean Dice below this in a card makes the model announce itself as unreliable
#: when used (the bundled models reach 0.83-0.88; a briefly trained test model 0.1-0.5).
LOW_DICE = 0.7


def quality_warning(card: ModelCard) -> Optional[str]:
    """The warning a model's own card calls for, or None: a held-out mean Dice below
    :data:`LOW_DICE` says its regions cannot be trusted, and nothing else would say so."""
    dice = card.metrics.get("mean_dice") if isinstance(card.metrics, dict) else None
    if isinstance(dice, (int, float)) and not isinstance(dice, bool) and dice < LOW_DICE:
        return (f"model {card.name} {card.version} has a held-out mean Dice of {dice:.3f} in its "
                f"card (below {LOW_DICE}; the bundled models reach 0.83-0.88): treat its regions "
                "as unreliable.")
    return None


def bundled_models_dir() -> Path:
    """``$BRAINLOBESEG_MODELS``, else ``BrainLobeSeg/Resources/Models`` (or a wheel's
    ``bundled_models``; see :mod:`resources`)."""
    return bundled_dir(MODELS_ENV, "Models", "bundled_models")


def list_model_folders(root: Optional[Path] = None) -> List[Path]:
    root = Path(root) if root else bundled_models_dir()
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if (p / CARD_NAME).is_file())


def find_models(mode: str, model_dir: Optional[Path] = None) -> List[Path]:
    """The model folders a mode needs: ``planar`` and ``3d`` one each, ``ensemble`` both.

    ``model_dir`` may be one model folder (used alone, its kind must fit the mode) or a
    folder of model folders; default is the bundled models.
    """
    if model_dir is not None and (Path(model_dir) / CARD_NAME).is_file():
        card = read_card(Path(model_dir))
        if mode != "ensemble" and card.kind != mode:
            raise ModelError(f"{model_dir} is a {card.kind} model, but mode {mode!r} was asked for.",
                             f"Use --mode {card.kind}, or give a {mode} model.")
        return [Path(model_dir)]
    folders = list_model_folders(model_dir)
    kinds = {read_card(f).kind: f for f in folders}
    wanted = ["planar", "3d"] if mode == "ensemble" else [mode]
    missing = [k for k in wanted if k not in kinds]
    if missing:
        where = model_dir or bundled_models_dir()
        raise ModelError(f"no {' and '.join(missing)} model found in {where}.",
                         "Train and export one (`python -m training train/export`), or pass --model.")
    return [kinds[k] for k in wanted]
