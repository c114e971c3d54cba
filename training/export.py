"""``python -m training export``: a run folder -> a model folder the extension loads.

Writes ``model.json`` (architecture, spacing, window, label table, training provenance,
held-out metrics from ``evaluate``'s ``metrics.json``, sha256 of every weights file) and
the weights, via the engine's :func:`models.save_model`, so the card format has one
owner.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from BrainLobeSegLib import models
from BrainLobeSegLib.errors import InputError
from BrainLobeSegLib.networks import build_network


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="run folder written by `train`")
    p.add_argument("--kind", choices=("planar", "3d", "both"), default="both")
    p.add_argument("--out", type=Path, default=models.bundled_models_dir(),
                   help="folder that receives <name>/ model folders (default: the bundled models)")
    p.add_argument("--name-prefix", default="aspects", help="model folders are <prefix>-<kind>")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--metrics", type=Path, default=None,
                   help="metrics.json from `evaluate` on held-out cases, copied into the card")
    p.add_argument("--description", default="")


def data_provenance(data_dirs) -> Dict[str, Any]:
    """What trained the model: each dataset folder's manifest if it has one."""
    out = []
    for d in data_dirs:
        entry: Dict[str, Any] = {"folder": Path(d).name}
        for manifest in ("synth.json", "manifest.json", "SOURCES.json"):
            f = Path(d) / manifest
            if f.is_file():
                try:
                    manifest = json.loads(f.read_text(encoding="utf-8"))
                    # per-case draws stay in the dataset's manifest: 120 cases would make
                    # model.json half a megabyte, read every time the model loads
                    if isinstance(manifest, dict) and isinstance(manifest.get("cases"), dict):
                        manifest = {**manifest, "cases": len(manifest["cases"])}
                    entry["manifest"] = manifest
                except ValueError:
                    entry["manifest"] = f.read_text(encoding="utf-8")[:2000]
                break
        out.append(entry)
    return {"datasets": out}


def export_kind(run: Path, kind: str, out: Path, prefix: str, version: str,
                metrics: Optional[dict], description: str) -> Path:
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))["kinds"][kind]
    card_data = dict(config["card"])
    card = models.ModelCard(**{k: v for k, v in card_data.items()
                               if k in models.ModelCard.__dataclass_fields__})
    card.name, card.version = f"{prefix}-{kind}", version
    card.description = description or (
        "Three 2.5D U-Nets (axial, coronal, sagittal) with a left-right coordinate channel, "
        "fused by mean probability" if kind == "planar" else
        "Compact 3D U-Net with a left-right coordinate channel")
    card.training = {**data_provenance(config["data"]),
                     **({"initialised_from": config["initialised_from"]} if config.get("initialised_from") else {}),
                     "data": ", ".join(Path(d).name for d in config["data"])
                     + (f" + {config['phantoms']} code phantoms" if config.get("phantoms") else ""),
                     **{k: config[k] for k in ("config", "train_cases", "phantoms", "loss", "alpha",
                                               "beta", "seed", "folds", "fold", "world_size",
                                               "held_out") if k in config}}
    if metrics:
        card.metrics = metrics
    nets = {}
    for name in (list(models.PLANES) if kind == "planar" else ["unet3d"]):
        net = build_network(card.architecture["name"], card.architecture["args"])
        net.load_state_dict(torch.load(run / f"{name}.pt", map_location="cpu", weights_only=True))
        nets[name] = net
    folder = models.save_model(out / card.name, card, nets)
    models.load_model(folder)   # what we ship must load through the engine's checks
    return folder


def _trained_kinds(run: Path) -> List[str]:
    """The kinds the run's config.json records (a ``--kind 3d`` run has no planar entry)."""
    path = run / "config.json"
    if not path.is_file():
        raise InputError(f"{run} is not a training run (no config.json).",
                         "Give the --out folder of python -m training train.")
    return list(json.loads(path.read_text(encoding="utf-8")).get("kinds", {}))


def run(args: argparse.Namespace) -> int:
    summary = None
    if args.metrics:
        from .evaluate import summarise
        summary = summarise(json.loads(Path(args.metrics).read_text(encoding="utf-8")))
    trained = _trained_kinds(Path(args.run))
    wanted = ["planar", "3d"] if args.kind == "both" else [args.kind]
    kinds = [k for k in wanted if k in trained]
    skipped = [k for k in wanted if k not in trained]
    if not kinds:
        raise InputError(f"the run {args.run} holds no trained {' or '.join(wanted)} model "
                         f"(it has: {', '.join(trained) or 'none'}).",
                         "Train it first (python -m training train --kind ...), or export the kind it has.")
    for kind in skipped:
        print(f"skipped {kind}: the run did not train it (train --kind {kind} to add it)")
    for kind in kinds:
        metrics = None
        if summary is not None:
            metrics = summary.get(kind) or summary
        folder = export_kind(args.run, kind, Path(args.out), args.name_prefix, args.version,
                             metrics, args.description)
        print(f"exported {kind} model to {folder}")
    return 0
