"""``python -m training aspects_fit``: fit the ASPECTS read-out card on benchmark dumps.

Input: per-region records written by ``Testing/benchmarks/aspects_bench.py --dump`` (normal
scans and the same scans with graded inserted infarcts; each record says which regions
were infarcted). Output: a read-out card (:mod:`BrainLobeSegLib.aspects_card`) that
``brainlobeseg stats``, the Slicer panel and the benchmark use with ``--card``, or that
replaces the bundled one.

The fit, and why:
1. *Normal values per region code*: median and SD of every measure over the regions of
   the normal scans. Normal hemispheres differ more in a small deep nucleus than in a
   large cortical region, so a measure is used as a z-value against its own region.
2. *Weights*: logistic regression (L2, Newton steps; numpy only) of "this region was
   infarcted" on the z-values, with a set of weights for each kind of region
   (``aspects_card.KIND_OF_CODE``: deep grey, capsule, insula, cortex) and one bias; the
   same measure says different things in a nucleus and in a cortical ribbon. Leaving one
   set out over eight synthetic sets this raised the mean target sensitivity by
   0.007-0.010 at each fitted specificity over one set of weights, with about the same
   share of normal-scan regions called (within 0.15 points; ASPECTS_RESULTS.md,
   twenty-first session); ``--one-weight-set`` fits one set for all
   kinds (fewer scans: each kind needs its own infarcted regions). With ``--positives
   target`` only infarcts of -4 HU or more over at least 30 % of a region count as
   positives (issue 16's target condition): a -2 HU or 10 % infarct is left out of the
   fit rather than taught as normal.
3. *Centring* (default; ``--no-centre`` for a plain card): each measure is taken less the
   scan's own darkening, the median over the read-out's regions (within 1.5 HU of their
   mirror) of its value less the normal median of the region's code, kept on the darker side only
   (``aspects_card.scan_centre``); the card keeps the
   normal medians (the centring uses them) and the SDs of the centred normal values. Noise
   and texture shift the tail measures of all regions of a scan alike; leaving one set out
   over eight synthetic sets, centring raised the mean target sensitivity by 0.006-0.010 at
   each operating point (ASPECTS_RESULTS.md, twentieth session).
4. *Threshold*: the score that the given share (``--specificity``) of the unaffected
   regions stays below. Chosen a little stricter than the target so that new scans,
   whose normal regions vary a little more than the fitted ones, still meet it.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from BrainLobeSegLib import aspects, aspects_card, regions
from BrainLobeSegLib.errors import InputError
from BrainLobeSegLib.imageio import write_text_atomic

#: Measures of the bundled card (see ASPECTS_RESULTS.md for how they were chosen).
DEFAULT_FEATURES = ("mean", "dark", "dark12", "low30", "low60", "frac", "expected", "gw_loss")
CODE_OF_LABEL = {r.label: r.code for r in regions.REGIONS}
MIN_NORMAL_PER_CODE = 8
#: Infarcted target regions of a kind needed to fit that kind's own weights.
MIN_TARGETS_PER_KIND = 10


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dumps", type=Path, nargs="+", help="JSON files from aspects_bench.py --dump")
    p.add_argument("--out", type=Path, required=True, help="card file to write (JSON)")
    p.add_argument("--features", nargs="+", default=list(DEFAULT_FEATURES),
                   choices=list(aspects_card.MEASURES), help="measures the call uses")
    p.add_argument("--specificity", type=float, default=0.985,
                   help="share of unaffected regions below the threshold on the fitted scans (default 0.985)")
    p.add_argument("--positives", choices=("target", "all"), default="target",
                   help="target: only infarcts of <= -4 HU over >= 30 %% of a region are positives; "
                        "all: every infarcted region")
    p.add_argument("--l2", type=float, default=1.0, help="L2 penalty of the logistic regression")
    p.add_argument("--summary", default="", help="one line on the data, copied into the card")
    p.add_argument("--no-centre", dest="centre", action="store_false",
                   help="fit a plain card (measures not taken less the scan's own offset)")
    p.add_argument("--one-weight-set", dest="by_kind", action="store_false",
                   help="one set of weights for every kind of region (default: a set per kind)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def read_dumps(dumps: Sequence[Path]) -> List[Tuple[Path, List[Dict[str, Any]]]]:
    """The records of each ``aspects_bench --dump`` file, read once (one clear error for
    a file that is not one)."""
    out: List[Tuple[Path, List[Dict[str, Any]]]] = []
    for path in map(Path, dumps):
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the dump {path} ({exc}).",
                             "Give files written by Testing/benchmarks/aspects_bench.py --dump.") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) and "regions" in r for r in records):
            raise InputError(f"{path} is not an aspects_bench dump (a list of records with 'regions').",
                             "Give files written by Testing/benchmarks/aspects_bench.py --dump.")
        out.append((path, records))
    return out


def dump_settings(read: Sequence[Tuple[Path, List[Dict[str, Any]]]]) -> Dict[str, Any]:
    """The read-out settings the dumps' measures were made with (their records'
    ``settings``; ``read`` from :func:`read_dumps`), for the card's ``readout`` block;
    empty when no record says (dumps from before they were recorded). Dumps made with
    different settings cannot make one card: its normal values would mix two kinds of
    measure."""
    seen: Dict[str, Dict[str, Any]] = {}
    unsaid = 0
    for _, records in read:
        for rec in records:
            if isinstance(rec.get("settings"), dict):
                # a setting added after the dump was made had, then, the value it names
                settings = {**aspects.SETTINGS_BEFORE_RECORDED, **rec["settings"]}
                seen.setdefault(json.dumps(settings, sort_keys=True), settings)
            else:
                unsaid += 1
    if len(seen) > 1:
        raise InputError(f"the dumps were made with {len(seen)} different read-out settings "
                         "(their records' 'settings' differ).",
                         "Fit a card on dumps made by one version of the read-out.")
    if seen and unsaid:   # the card would claim settings for measures of unknown origin
        raise InputError(f"{unsaid} records of the dumps do not say their read-out settings and the "
                         "others do.", "Dump the older scans again with this version, or fit on "
                         "dumps of one kind.")
    return next(iter(seen.values()), {})


def load_rows(dumps: Sequence[Path], features: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per measured region of the dump files: its code, truth, condition and measures."""
    return rows_of(read_dumps(dumps), features)


def is_target(drop: float, extent: float) -> bool:
    """Issue 16's target condition: an infarct of -4 HU or more over at least 30 % of a region."""
    return drop <= -4 and extent >= 0.3


def _measured(reg: Dict[str, Any], features: Sequence[str]) -> bool:
    """Whether a dumped region has every measure in ``features`` (none when too little
    tissue was measured in it or its mirror, or a dense lesion left the pair not assessed:
    it then has no call score)."""
    values = reg.get("measures") or {}
    return all(values.get(f) is not None for f in features)


def unmeasured_targets(read: Sequence[Tuple[Path, List[Dict[str, Any]]]], features: Sequence[str]) -> int:
    """Infarcted regions of the target condition that :func:`rows_of` leaves out (a measure
    missing: too little tissue in the region or its mirror, or a dense lesion in either).
    They have no call score, so the fit's sensitivity, which counts score calls, counts
    them as missed instead of dropping them from its denominator (a read-out can still
    call one whose mean is far below its kind, ``aspects.EXPECTED_DROP_HU``)."""
    return sum(1 for _, records in read for rec in records
               if is_target(float(rec["drop"]), float(rec["extent"]))
               for reg in rec["regions"] if reg["label"] in rec["truth"] and not _measured(reg, features))


def rows_of(read: Sequence[Tuple[Path, List[Dict[str, Any]]]], features: Sequence[str]) -> List[Dict[str, Any]]:
    """:func:`load_rows` of dumps already read (:func:`read_dumps`)."""
    rows = []
    for path, records in read:
        for index, rec in enumerate(records):
            for reg in rec["regions"]:
                if not _measured(reg, features):
                    continue   # no call score, nothing to learn (unmeasured_targets counts them)
                rows.append({"code": CODE_OF_LABEL[reg["label"]], "truth": reg["label"] in rec["truth"],
                             "normal": not rec["truth"], "drop": float(rec["drop"]),
                             "extent": float(rec["extent"]), "values": reg["measures"],
                             "scan": f"{path.name}:{rec['case']}", "readout": f"{path.name}:{index}"})
    if not rows:
        raise InputError("the dumps hold no measured regions.", "Run aspects_bench.py --dump on a few scans first.")
    return rows


def normal_values(rows: Sequence[dict], features: Sequence[str]) -> Dict[str, Dict[str, Tuple[float, float]]]:
    """Per region code and measure: (median, SD) over the normal scans' regions."""
    out: Dict[str, Dict[str, Tuple[float, float]]] = {}
    for code in sorted(set(CODE_OF_LABEL.values())):
        sub = [r["values"] for r in rows if r["normal"] and r["code"] == code]
        if len(sub) < MIN_NORMAL_PER_CODE:
            raise InputError(f"only {len(sub)} normal {code} regions in the dumps (at least "
                             f"{MIN_NORMAL_PER_CODE} are needed).", "Dump more normal scans.")
        out[code] = {}
        for f in features:
            v = np.array([s[f] for s in sub], float)
            out[code][f] = (float(np.median(v)), max(float(np.std(v)), 1e-3))
    return out


def centred_rows(rows: Sequence[dict], normal: Dict[str, Dict[str, Tuple[float, float]]],
                 features: Sequence[str]) -> List[dict]:
    """``rows`` with each measure less its read-out's offset (``aspects_card.scan_centre``,
    the formula the read-out uses), from the regions of the read-out in ``rows``: those
    with every measure, as the read-out's own centring counts them."""
    by_readout: Dict[str, List[dict]] = {}
    for r in rows:
        by_readout.setdefault(r["readout"], []).append(r)
    out = []
    for group in by_readout.values():
        centre = aspects_card.scan_centre(normal, features, [(r["code"], r["values"]) for r in group])
        out += [{**r, "values": {**r["values"], **{f: r["values"][f] - centre[f] for f in features}}} for r in group]
    return out


def logistic_fit(x: np.ndarray, y: np.ndarray, weight: np.ndarray, l2: float) -> Tuple[float, np.ndarray]:
    """(bias, weights) of an L2 logistic regression by Newton steps (the columns are
    standardised inside, so ``l2`` means the same for every measure)."""
    mu, sd = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = np.column_stack([np.ones(len(x)), (x - mu) / sd])
    beta = np.zeros(z.shape[1])
    penalty = l2 * np.eye(z.shape[1])
    penalty[0, 0] = 0.0
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -30, 30)))
        grad = z.T @ (weight * (y - p)) - penalty @ beta
        hess = (z * (weight * p * (1 - p))[:, None]).T @ z + penalty
        step = np.linalg.solve(hess, grad)
        beta += step
        if np.abs(step).max() < 1e-9:
            break
    w = beta[1:] / sd
    return float(beta[0] - w @ mu), w


def kind_blocks(x: np.ndarray, codes: Sequence[str], target: np.ndarray) -> np.ndarray:
    """The z-values ``x`` (a row per region) as a column block per kind of
    ``aspects_card.KINDS``, zero outside the row's own kind, so that a logistic fit gives
    each kind its own weights. Raises when a kind has too few target infarcts to fit."""
    of_kind = np.array([[aspects_card.KIND_OF_CODE[c] == k for k in aspects_card.KINDS] for c in codes])
    for k, kind in enumerate(aspects_card.KINDS):
        found = int((target & of_kind[:, k]).sum())
        if found < MIN_TARGETS_PER_KIND:
            raise InputError(f"only {found} infarcted {kind} regions in the target condition (at least "
                             f"{MIN_TARGETS_PER_KIND} for weights of their own).",
                             "Dump more scans, or pass --one-weight-set.")
    return np.hstack([x * of_kind[:, [k]] for k in range(len(aspects_card.KINDS))])


def fit_card(rows: Sequence[dict], features: Sequence[str], specificity: float = 0.985,
             positives: str = "target", l2: float = 1.0, summary: str = "",
             readout: Optional[Dict[str, Any]] = None, unmeasured: int = 0,
             centre: bool = True, by_kind: bool = True) -> aspects_card.ReadoutCard:
    """The card fitted on ``rows`` (see the module's docstring); ``readout``: the read-out
    settings the rows' measures were made with (:func:`dump_settings`); ``unmeasured``: target
    regions left out of ``rows`` (:func:`unmeasured_targets`), counted as missed in the fit's
    sensitivity; ``centre``: fit a centred card (step 3); ``by_kind``: a set of weights per
    kind of region (step 2)."""
    normal = normal_values(rows, features)
    if centre:
        rows = centred_rows(rows, normal, features)
        spread = normal_values(rows, features)
        normal = {code: {f: (normal[code][f][0], spread[code][f][1]) for f in features} for code in normal}
    x = np.array([[(r["values"][f] - normal[r["code"]][f][0]) / normal[r["code"]][f][1] for f in features]
                  for r in rows])
    y = np.array([r["truth"] for r in rows], float)
    target = np.array([r["truth"] and is_target(r["drop"], r["extent"]) for r in rows])
    weight = np.ones(len(rows))
    if positives == "target":
        weight[(y > 0) & ~target] = 0.0
    if target.sum() < 10 or (y == 0).sum() < 100:
        raise InputError(f"too few regions to fit ({int(target.sum())} infarcted in the target "
                         f"condition, {int((y == 0).sum())} unaffected).", "Dump more scans.")
    design = kind_blocks(x, [r["code"] for r in rows], target) if by_kind else x
    bias, w = logistic_fit(design, y, weight, l2)
    score = bias + design @ w
    blocks = w.reshape(-1, len(features))
    weights = {kind: dict(zip(features, map(float, b))) for kind, b in zip(aspects_card.KINDS, blocks)} \
        if by_kind else aspects_card.same_for_every_kind(dict(zip(features, map(float, blocks[0]))))
    threshold = float(np.quantile(score[y == 0], specificity))
    called = score >= threshold
    is_normal = np.array([r["normal"] for r in rows])
    fit = {"target_sensitivity": round(float(called[target].sum() / (target.sum() + unmeasured)), 4),
           "specificity": round(float(1 - called[y == 0].mean()), 4),
           "normal_scan_regions_called": round(float(called[is_normal].mean()), 4),
           "regions": len(rows), "target_regions": int(target.sum()) + unmeasured,
           "target_regions_unmeasured": unmeasured,
           "specificity_asked": specificity, "positives": positives, "l2": l2}
    trained_on = {"summary": summary, "scans": len({r["scan"] for r in rows}),
                  "normal_scans": len({r["scan"] for r in rows if r["normal"]})}
    return aspects_card.ReadoutCard(tuple(features), normal, weights, bias,
                                    threshold, trained_on, fit, readout=dict(readout or {}), centred=centre)


def write_card(card: aspects_card.ReadoutCard, out: Path, overwrite: bool) -> None:
    """Write the card atomically (a half-written card never replaces a good one)."""
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; nothing was written.", "Pass --overwrite to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_rounded(card.to_json()), indent=1, allow_nan=False) + "\n"
    aspects_card.card_from_json(json.loads(text))   # what is written must read back
    write_text_atomic(text, str(out))


def _rounded(v: Any) -> Any:
    if isinstance(v, float):
        return float(f"{v:.6g}") if math.isfinite(v) else v
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_rounded(x) for x in v]
    return v


def run(args: argparse.Namespace) -> int:
    if not 0.5 < args.specificity < 1.0:
        raise InputError(f"--specificity {args.specificity} is not between 0.5 and 1.", "Use e.g. 0.98.")
    read = read_dumps(args.dumps)   # each file parsed once
    rows = rows_of(read, args.features)
    readout = dump_settings(read)
    unmeasured = unmeasured_targets(read, args.features)
    card = fit_card(rows, args.features, args.specificity, args.positives, args.l2,
                    args.summary or ", ".join(p.name for p in args.dumps), readout, unmeasured, args.centre,
                    args.by_kind)
    write_card(card, args.out, args.overwrite)
    f = card.fit
    print(f"card written to {args.out}: {card.trained_on['scans']} scans, {f['regions']} regions; on them "
          f"target sensitivity {f['target_sensitivity']:.3f} at specificity {f['specificity']:.3f}, "
          f"{100 * f['normal_scan_regions_called']:.2f} % of normal-scan regions called")
    if unmeasured:
        print(f"({unmeasured} of the {f['target_regions']} infarcted target regions lack a measure (too "
              "little tissue in them or their mirror): no call score, counted as missed)")
    if not readout:
        print("note: the dumps do not record their read-out settings, so neither does the card "
              "(a read-out cannot warn when it is used with other settings)")
    return 0
