"""Cases -> arrays on the model grid, exactly as the engine prepares a scan.

Training must see what inference sees, so this module calls the engine's own steps
(:func:`geometry.head_box`, :func:`geometry.upright_resample`,
:func:`models.normalise_intensity`, :func:`geometry.lateral_coordinate`) and adds only
the labels: ``N-seg`` already lies in the upright space on the scan grid, so it is
carried onto the model grid with the identity.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from BrainLobeSegLib import geometry, models
from BrainLobeSegLib.dataset import list_cases, read_case


@dataclass
class Prepared:
    """One case on the model grid: normalised volume, labels, left-right coordinate."""

    name: str
    volume: np.ndarray    # float32 (z, y, x) in [0, 1]
    labels: np.ndarray    # uint8 (z, y, x)
    lateral: np.ndarray   # float32 (x,)


def prepare_case(ct: sitk.Image, transform, seg: sitk.Image, card: models.ModelCard,
                 multiple: int, name: str = "") -> Prepared:
    head = geometry.head_box(ct, transform)
    grid = head.grid(card.spacing_mm, multiple=multiple)
    hu = geometry.upright_resample(ct, transform, grid)
    volume = models.normalise_intensity(hu, card)
    lab = sitk.Resample(seg, grid.reference(), sitk.AffineTransform(3), sitk.sitkNearestNeighbor,
                        0, sitk.sitkUInt8)
    return Prepared(name, volume, sitk.GetArrayFromImage(lab),
                    geometry.lateral_coordinate(grid, head.midline_x))


def _cache_key(card: models.ModelCard, multiple: int) -> str:
    spec = json.dumps([card.spacing_mm, card.intensity, multiple], sort_keys=True)
    return hashlib.sha1(spec.encode()).hexdigest()[:10]


def load_dataset(folder: Path, card: models.ModelCard, multiple: int,
                 cache_dir: Optional[Path] = None, names: Optional[Sequence[str]] = None,
                 log=print) -> List[Prepared]:
    """Prepare every labelled case of a dataset folder (cached as .npz per case)."""
    cases = [c for c in list_cases(folder) if c.seg_path is not None]
    if names is not None:
        cases = [c for c in cases if c.name in set(names)]
    out = []
    cache = Path(cache_dir) / _cache_key(card, multiple) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(cases):
        path = cache / f"{Path(folder).name}-{case.name}.npz" if cache else None
        if path is not None and path.is_file():
            z = np.load(path)
            out.append(Prepared(case.name, z["volume"].astype(np.float32), z["labels"], z["lateral"]))
            continue
        ct, tf, seg = read_case(case)
        p = prepare_case(ct, tf, seg, card, multiple, case.name)
        if path is not None:
            np.savez(path, volume=p.volume.astype(np.float16), labels=p.labels, lateral=p.lateral)
        out.append(p)
        log(f"prepared {case.name} ({i + 1}/{len(cases)}) grid {p.volume.shape}")
    return out


def phantom_cases(n: int, card: models.ModelCard, multiple: int, seed: int) -> List[Prepared]:
    """Code-made phantoms (BrainLobeSegLib.phantom) prepared like dataset cases.

    Mixed into training so that the demo phantom, which has no atlas behind it, is
    segmented too; a small share keeps the atlas-based anatomy dominant.
    """
    from BrainLobeSegLib import phantom
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        angles = tuple(float(a) for a in rng.uniform(-15, 15, 3))
        slice_mm = float(rng.choice([1.5, 2.5, 5.0]))
        case = phantom.make_scan(size=(192, 192, int(np.ceil(165 / slice_mm))),
                                 spacing=(1.2, 1.2, slice_mm), angles_deg=angles,
                                 seed=int(rng.integers(1 << 30)))
        out.append(prepare_case(case.ct, case.transform, case.labels_upright, card, multiple,
                                f"phantom{i}"))
    return out
