"""ASPECTS read-out on graded synthetic infarcts (issue 16's validation; printed numbers).

Input: a folder of *normal* labelled synthetic scans (``python -m training synth
--no-infarcts``: atrophy, calcifications, lacunes, scanner offsets, noise and shading as
the v2 profile draws them, but no acute infarct). For every scan and every condition
(density drop x extent), infarcts are inserted into known regions on the scan grid; the
scan is segmented by the bundled model with its true transform and read out by
:func:`BrainLobeSegLib.aspects.assess`. Truth: a region is affected when an infarct was
put into it. Printed: region-level sensitivity and specificity per drop x extent, the
score's accuracy (exact, within 1 point) on the infarcted side, and the share of regions
called on the normal scans.

Infarct insertion: in region ``r`` a compact blob of ``extent`` x the region's voxels
(the voxels nearest a random seed voxel of the region) is lowered by ``drop`` HU x the
scan's gain, on parenchyma only (the case's own grey, CSF, gain and offset from
``synth.json``, as the generator does), with a 1 mm soft edge inside the region.
The infarct configuration cycles over cortical (one of I, M1-M6), deep (C, L, IC),
mixed (one deep + one cortical) and multiple (three regions) on a random side.

    python Testing/benchmarks/aspects_bench.py --data /work/data/aspects-bench \\
        --markdown Testing/benchmarks/ASPECTS_RESULTS.md

``--dump`` keeps every region's measures; ``--rescore DUMP ... --card CARD`` prints the
table for another card from them, without reading the scans again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from BrainLobeSegLib import aspects, aspects_card, inference, regions, transforms
from training.aspects_fit import is_target   # the target condition the card's fit counts

DROPS = (-2.0, -4.0, -6.0, -10.0)
EXTENTS = (0.1, 0.3, 0.6, 1.0)
KINDS = ("cortical", "deep", "mixed", "multiple")
CORTICAL = ("I", "M1", "M2", "M3", "M4", "M5", "M6")
DEEP = ("C", "L", "IC")
MIN_REGION_ML = 1.0


@dataclass
class Case:
    name: str
    ct: sitk.Image
    transform: sitk.Transform
    truth: np.ndarray          # labels on the scan grid
    params: dict               # the case's synth.json entry


def load_cases(folder: Path, limit: Optional[int]) -> List[Case]:
    manifest = json.loads((folder / "synth.json").read_text())["cases"]
    names = sorted(manifest, key=int)[:limit]
    out = []
    for n in names:
        ct = sitk.ReadImage(str(folder / f"{n}.nii.gz"))
        tf = transforms.read_transform(str(folder / f"{n}.txt"))
        seg = sitk.ReadImage(str(folder / f"{n}-seg.nii.gz"))
        truth = sitk.GetArrayFromImage(sitk.Resample(seg, ct, tf.GetInverse(), sitk.sitkNearestNeighbor, 0))
        if manifest[n].get("lesions") and any(les["kind"] == "infarct" for les in manifest[n]["lesions"]):
            raise SystemExit(f"case {n} of {folder} has a synthesised infarct: make the set with --no-infarcts")
        out.append(Case(n, ct, tf, truth.astype(np.uint8), manifest[n]))
    return out


def choose_regions(case: Case, kind: str, rng: np.random.Generator) -> List[int]:
    """Label ids of the regions to infarct (one side), present with >= 1 ml."""
    ml = float(np.prod(case.ct.GetSpacing())) / 1000.0
    counts = np.bincount(case.truth.ravel(), minlength=regions.NUM_LABELS + 1) * ml
    side = str(rng.choice(aspects.SIDES))
    pool = lambda codes: [regions.region(c, side).label for c in codes
                          if counts[regions.region(c, side).label] >= MIN_REGION_ML]
    cort, deep = pool(CORTICAL), pool(DEEP)
    if kind == "cortical" or (kind == "deep" and not deep):
        return [int(rng.choice(cort))]
    if kind == "deep":
        return [int(rng.choice(deep))]
    if kind == "mixed" and deep:
        return [int(rng.choice(deep)), int(rng.choice(cort))]
    return [int(v) for v in rng.choice(cort + deep, size=3, replace=False)]


def insert_infarcts(case: Case, labels: Sequence[int], extent: float, drop: float,
                    rng: np.random.Generator) -> sitk.Image:
    """The scan with ``drop`` HU (times the scan's gain) on ``extent`` of each region."""
    arr = sitk.GetArrayFromImage(case.ct).astype(np.float32)
    spacing = np.array(case.ct.GetSpacing()[::-1])
    sc = case.params["scanner"]
    g, off = sc["gain"], sc["offset_hu"]
    clean = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.Cast(case.ct, sitk.sitkFloat32), 1.0))
    pre = (clean - off) / g
    tissue = np.clip((pre - case.params["csf_hu"] - 2.0) / 6.0, 0, 1) * \
        np.clip((case.params["grey_hu"] + 25.0 - pre) / 10.0, 0, 1)
    blob = np.zeros(arr.shape, np.float32)
    for lab in labels:
        vox = np.argwhere(case.truth == lab)
        seed = vox[rng.integers(len(vox))]
        d = np.linalg.norm((vox - seed) * spacing, axis=1)
        k = max(1, int(math.ceil(extent * len(vox))))
        take = vox[np.argsort(d)[:k]]
        blob[tuple(take.T)] = 1.0
    soft = sitk.GetImageFromArray(blob)
    soft.CopyInformation(case.ct)
    soft = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(soft, 1.0))
    region = np.isin(case.truth, labels)
    weight = np.where(region, np.maximum(soft, blob * 0.5), 0.0) * tissue
    out = sitk.GetImageFromArray(np.round(arr + drop * g * weight).astype(sitk.GetArrayViewFromImage(case.ct).dtype))
    out.CopyInformation(case.ct)
    return out


@dataclass
class Tally:
    tp: int = 0
    fn: int = 0
    fp: int = 0
    tn: int = 0
    exact: int = 0
    within1: int = 0
    scans: int = 0

    def add(self, truth: set, called: set, score_true: int, score_est: int) -> None:
        for lab in range(1, regions.NUM_LABELS + 1):
            t, c = lab in truth, lab in called
            self.tp += t and c
            self.fn += t and not c
            self.fp += c and not t
            self.tn += not t and not c
        self.scans += 1
        self.exact += score_true == score_est
        self.within1 += abs(score_true - score_est) <= 1

    def row(self) -> Tuple[float, float, float, float]:
        sens = self.tp / max(1, self.tp + self.fn)
        spec = self.tn / max(1, self.tn + self.fp)
        return sens, spec, self.exact / max(1, self.scans), self.within1 / max(1, self.scans)


def features(result: aspects.AspectsResult) -> List[dict]:
    """Per region, every measure the read-out card can use (for ``training aspects_fit``)."""
    return [{"label": r.label, "called": r.called, "call_score": r.call_score, "measures": r.measures}
            for r in result.regions]


def run(cases: List[Case], segmenter: inference.Segmenter, drops, extents, seed: int,
        dump: Optional[Path], cache: Optional[Path] = None, card: Optional[aspects_card.ReadoutCard] = None,
        shard: Tuple[int, int] = (0, 1)) -> Tuple[Dict[Tuple[float, float], Tally], Tally, dict]:
    """Read every case (or shard ``(k, n)``: the cases whose index is k modulo n) normal and
    with each condition. The infarcts drawn depend only on the case's index in ``cases`` and
    the condition's index in the full DROPS x EXTENTS grid, so shards and runs restricted to
    some conditions insert exactly the infarcts a full run does."""
    grid = [(d, e) for d in DROPS for e in EXTENTS]
    conditions = [(grid.index((d, e)) if (d, e) in grid else len(grid) + k, d, e)
                  for k, (d, e) in enumerate((d, e) for d in drops for e in extents)]
    tallies = {(d, e): Tally() for d in drops for e in extents}
    normal = Tally()
    records: List[dict] = []
    timing = {"segment_s": 0.0, "assess_s": 0.0, "runs": 0}
    settings = aspects.measure_settings()   # what every dumped record's measures were made with

    def read_out(ct: sitk.Image, case: Case, key: str):
        t0 = time.perf_counter()
        stored = cache / f"{case.name}-{key}.nii.gz" if cache else None
        if stored is not None and stored.is_file():
            labels = sitk.ReadImage(str(stored))
            labels.CopyInformation(ct)
        else:
            labels = segmenter.segment(ct, case.transform).labels_scan
            if stored is not None:
                sitk.WriteImage(labels, str(stored))
        t1 = time.perf_counter()
        maps = aspects.evidence_maps(ct, labels)
        res = aspects.read_out(maps, card=card, all_measures=dump is not None)
        timing["segment_s"] += t1 - t0
        timing["assess_s"] += time.perf_counter() - t1
        timing["runs"] += 1
        return res, (features(res) if dump else [])

    for i, case in enumerate(cases):
        if i % shard[1] != shard[0]:
            continue
        res, feats = read_out(case.ct, case, "normal")
        called = {r.label for r in res.regions if r.called}
        normal.add(set(), called, 10, 10)
        records.append({"case": case.name, "drop": 0, "extent": 0, "truth": [], "regions": feats,
                        "settings": settings})
        for j, d, e in conditions:
            rng = np.random.default_rng([seed, int(case.name), j])
            kind = KINDS[(i + j) % len(KINDS)]
            labs = choose_regions(case, kind, rng)
            res, feats = read_out(insert_infarcts(case, labs, e, d, rng), case, f"{d:g}-{e:g}")
            side = regions.REGION_BY_LABEL[labs[0]].side
            called = {r.label for r in res.regions if r.called}
            tallies[(d, e)].add(set(labs), called, 10 - len(labs), res.score(side))
            records.append({"case": case.name, "drop": d, "extent": e, "kind": kind, "truth": labs,
                            "regions": feats, "settings": settings})
        print(f"[{i + 1}/{len(cases)}] case {case.name}: {normal.fp} normal-scan calls so far, "
              f"{timing['segment_s'] / timing['runs']:.2f} s segment, "
              f"{timing['assess_s'] / timing['runs']:.2f} s read-out per run", flush=True)
        if dump:
            dump.write_text(json.dumps(records))
    return tallies, normal, timing


def rescore(dumps: Sequence[Path], card: aspects_card.ReadoutCard, drops, extents
            ) -> Tuple[Dict[Tuple[float, float], Tally], Tally, int]:
    """The tallies a run would give with ``card``, from the measures in ``--dump`` files
    of runs with the same read-out code (calls by :func:`aspects.call_of_values`): a card
    is measured in seconds instead of re-reading every scan. Also returns the runs read."""
    tallies = {(d, e): Tally() for d in drops for e in extents}
    normal = Tally()
    runs = 0
    for path in dumps:
        for rec in json.loads(path.read_text()):
            centre = aspects.scan_centre(card, {reg["label"]: reg["measures"] for reg in rec["regions"]})
            called = {reg["label"] for reg in rec["regions"]
                      if aspects.call_of_values(regions.REGION_BY_LABEL[reg["label"]].code,
                                                reg["measures"], card, centre)[1]}
            runs += 1
            if not rec["truth"]:
                normal.add(set(), called, 10, 10)
                continue
            key = (float(rec["drop"]), float(rec["extent"]))
            if key not in tallies:
                continue
            side = regions.REGION_BY_LABEL[rec["truth"][0]].side
            on_side = sum(1 for lab in called if regions.REGION_BY_LABEL[lab].side == side)
            tallies[key].add(set(rec["truth"]), called, 10 - len(rec["truth"]), 10 - on_side)
    return tallies, normal, runs


def table(tallies, normal: Tally, drops, extents) -> List[str]:
    lines = ["| drop (HU) | extent | sensitivity | specificity | score exact | score within 1 |",
             "|---|---|---|---|---|---|"]
    for d in drops:
        for e in extents:
            s, p, ex, w1 = tallies[(d, e)].row()
            lines.append(f"| {d:+g} | {100 * e:.0f} % | {s:.3f} | {p:.3f} | {ex:.3f} | {w1:.3f} |")
    pooled = Tally()
    for (d, e), t in tallies.items():
        if is_target(d, e):
            for k in ("tp", "fn", "fp", "tn"):
                setattr(pooled, k, getattr(pooled, k) + getattr(t, k))
    s, p, _, _ = pooled.row()
    lines += ["", f"Drops <= -4 HU and extent >= 30 % pooled: sensitivity {s:.3f}, specificity {p:.3f} "
                  f"({pooled.tp + pooled.fn} affected and {pooled.tn + pooled.fp} unaffected regions).",
              f"Normal scans: {normal.fp} of {normal.fp + normal.tn} regions called "
              f"({100 * normal.fp / max(1, normal.fp + normal.tn):.2f} %) on {normal.scans} scans."]
    return lines


def shard_of(text: str) -> Tuple[int, int]:
    """``--shard K/N`` as (K, N); argparse reports anything else as a usage error."""
    parts = text.split("/")
    if len(parts) == 2 and all(v.strip().isdigit() for v in parts) and 0 <= int(parts[0]) < int(parts[1]):
        return int(parts[0]), int(parts[1])
    raise argparse.ArgumentTypeError(f"{text!r}: expected K/N with 0 <= K < N")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="folder of normal synthetic cases (synth --no-infarcts)")
    p.add_argument("--cases", type=int, default=None, help="use the first N cases")
    p.add_argument("--mode", default="3d", help="segmentation mode (default 3d)")
    p.add_argument("--model", default=None, help="model folder (default: the bundled models)")
    p.add_argument("--seed", type=int, default=16)
    p.add_argument("--drops", type=float, nargs="+", default=list(DROPS))
    p.add_argument("--extents", type=float, nargs="+", default=list(EXTENTS))
    p.add_argument("--dump", type=Path, help="write per-region features of every run (JSON, for tuning)")
    p.add_argument("--cache", type=Path, help="folder to keep (and reuse) each run's segmentation")
    p.add_argument("--markdown", type=Path, help="write the result table there")
    p.add_argument("--card", type=Path, help="read-out card to measure (default: the bundled one)")
    p.add_argument("--shard", type=shard_of, default="0/1", metavar="K/N",
                   help="read only the cases whose index is K modulo N (parallel runs; default 0/1)")
    p.add_argument("--rescore", type=Path, nargs="+", metavar="DUMP",
                   help="no read-out: score the measures in these --dump files with the card")
    args = p.parse_args(argv)
    card = aspects_card.load_card(args.card) if args.card else None
    if args.rescore:
        used = card or aspects.bundled_card()
        tallies, normal, runs = rescore(args.rescore, used, args.drops, args.extents)
        print("\n".join(table(tallies, normal, args.drops, args.extents)))
        print(f"{runs} dumped read-outs re-scored with {used.source}")
        return 0
    if args.data is None:
        p.error("--data is needed (or --rescore DUMP ...)")
    cases = load_cases(args.data, args.cases)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    segmenter = inference.Segmenter(args.mode, args.model, "cpu")
    t0 = time.perf_counter()
    tallies, normal, timing = run(cases, segmenter, args.drops, args.extents, args.seed, args.dump, args.cache,
                                  card, args.shard)

    lines = table(tallies, normal, args.drops, args.extents)
    print("\n".join(lines))
    print(f"{timing['runs']} read-outs in {time.perf_counter() - t0:.0f} s; per run "
          f"{timing['segment_s'] / timing['runs']:.2f} s segmentation, "
          f"{timing['assess_s'] / timing['runs']:.2f} s ASPECTS")
    used = card or aspects.bundled_card()
    print(f"read-out card: {used.source} (fitted on: {used.trained_on.get('summary', '?')})")
    if args.markdown:
        head = ["# ASPECTS read-out on graded synthetic infarcts", "",
                f"Data: {len(cases)} normal synthetic scans from `{args.data}` (synthetic, made from one "
                "atlas by `python -m training synth --no-infarcts`), infarcts inserted as in "
                "`Testing/benchmarks/aspects_bench.py`; segmentation mode "
                f"`{args.mode}` with the true transform; read-out card `{used.source}` (fitted on: "
                f"{used.trained_on.get('summary', '?')}).", ""]
        args.markdown.write_text("\n".join(head + lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
