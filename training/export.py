"""``python -m training export``: a run folder -> a model folder the extension loads.

Writes ``model.json`` (architecture, spacing, window, label table, training provenance,
held-out metrics from ``evaluate``'s ``metrics.json``, sha256 of every weights file) and
the weights, via the engine's :func:`models.save_model`, so the card format has one
owner.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from BrainLobeSegLib import models
from BrainLobeSegLib.errors import InputError
from BrainLobeSegLib.networks import build_network


DEFAULT_VERSION = "0.1.0"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=Path, required=True, help="run folder written by `train`")
    p.add_argument("--kind", choices=("planar", "3d", "both"), default="both",
                   help="which of the run's models to export (both: those the run trained)")
    p.add_argument("--out", type=Path, required=True,
                   help="folder that receives the <name>-<kind>/ model folders (created if missing); "
                        "pass it as --model to brainlobeseg")
    p.add_argument("--name-prefix", default=None,
                   help="model folders and names are <prefix>-<kind> (default: the run folder's name)")
    p.add_argument("--version", default=DEFAULT_VERSION, help="version written into the card")
    p.add_argument("--metrics", type=Path, default=None,
                   help="metrics.json from `evaluate` on held-out cases, copied into the card")
    p.add_argument("--description", default="", help="the card's description (default: one per kind)")
    p.add_argument("--overwrite", action="store_true", help="replace model folders of the same name in --out")
    p.add_argument("--allow-bundled", action="store_true",
                   help="allow --out to be the bundled models' folder and a name and version that a "
                        "bundled model has (for maintainers replacing the shipped models)")


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


def _prefix(args: argparse.Namespace) -> str:
    """``--name-prefix``, else the run folder's name made safe for a folder name."""
    if args.name_prefix:
        return args.name_prefix
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(args.run).resolve().name).strip("-.")
    return name or "model"


def check_destination(out: Path, names: List[str], version: str, allow_bundled: bool,
                      overwrite: bool) -> None:
    """Refuse to change the bundled models, or to pass a model off as one of them.

    ``export`` used to write into the source tree's bundled models by default, and under
    their name and version: a 10-iteration test model then looked like the release in
    ``brainlobeseg models`` and in every card. Both now need ``--allow-bundled``. An
    existing model folder of the same name needs ``--overwrite``.
    """
    bundled = models.bundled_models_dir()
    if not allow_bundled:
        if bundled.exists() and out.resolve() == bundled.resolve():
            raise InputError(f"--out {out} is the bundled models' folder; nothing was written.",
                             "Export into a folder of your own and pass it as --model, or add "
                             "--allow-bundled to replace the shipped models on purpose.")
        taken = {(c.name, c.version) for c in (models.read_card(f) for f in models.list_model_folders(bundled))}
        for name in names:
            if (name, version) in taken:
                raise InputError(f"{name} {version} is the name and version of a bundled model; "
                                 "nothing was written.",
                                 "Choose another --name-prefix or --version, or add --allow-bundled.")
    if not overwrite:
        existing = [n for n in names if (out / n).exists()]
        if existing:
            raise InputError(f"{', '.join(str(out / n) for n in existing)} already exists; nothing was written.",
                             "Add --overwrite to replace it, or choose another --out or --name-prefix.")


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
    prefix = _prefix(args)
    check_destination(Path(args.out), [f"{prefix}-{k}" for k in kinds], args.version,
                      args.allow_bundled, args.overwrite)
    for kind in skipped:
        print(f"skipped {kind}: the run did not train it (train --kind {kind} to add it)")
    for kind in kinds:
        metrics = None
        if summary is not None:
            metrics = summary.get(kind) or summary
        folder = export_kind(args.run, kind, Path(args.out), prefix, args.version,
                             metrics, args.description)
        print(f"exported {kind} model {folder.name} {args.version} to {folder}")
    return 0
