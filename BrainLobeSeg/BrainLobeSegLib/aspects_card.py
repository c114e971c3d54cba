"""The ASPECTS read-out card: how a region's measures become its call (one source of truth).

A region's call is a logistic score over its measures (:data:`MEASURES`), each first
turned into a z-value against what normal scans show *for that region* (a deep nucleus
of 4 ml differs more between normal hemispheres than a cortical region of 30 ml, so the
same HU means less there)::

    z_f   = (value_f - centre_f - normal_median[code][f]) / normal_sd[code][f]
    score = bias + sum_f weight[kind][f] * z_f   (log-odds; called when >= threshold)

``kind`` is the region's kind (:data:`KIND_OF_CODE`: deep grey, capsule, insula, cortex):
since format version 3 each kind has its own weights, because the same measure says
different things in a 4 ml nucleus and in a cortical ribbon (on the bundled card the mean
of the darkest 30 % weighs +1.15 in the cortex and -0.10 in the capsule, the 12 mm darkest
part -0.90 in the insula and about 0 elsewhere); cards of versions 1 and 2 have one set of
weights for every kind.

``centre_f`` is zero unless the card is *centred* (``"centred": true``, since format version 2):
then it is the scan's own darkening of the measure, the median over the read-out's scored
regions within :data:`CENTRE_MAX_MEAN_HU` of their mirror of
``value_f - normal_median[code][f]``, kept only on the darker side (:func:`scan_centre`).
Noise and cortical texture pull the tail measures (darkest part, darkest share, share
>= 2 HU darker) of every region of a scan the same way, on both sides; an infarct's regions
and their mirrors differ by more than that bound and do not count, so the median stays near
the scan's own darkening even when many regions are infarcted. One-sided, so that a scan
quieter than the fitted ones (a noise-free phantom) is never read as darker than a plain
card reads it. A centred card is fitted on measures centred the same way (``aspects_fit``).

The card is plain JSON (``Resources/ASPECTS/readout-card.json``), written by
``python -m training aspects_fit`` from ``Testing/benchmarks/aspects_bench.py --dump``
records and read here with :mod:`json` only: loading it never runs code. Its
``trained_on`` block says which scans the numbers come from; the bundled card's are
synthetic scans made from one atlas, so on real scans it is a starting point that a site
should refit on its own normal and infarcted scans. Its ``readout`` block records the
read-out settings the measures were made with (``aspects.measure_settings``): a read-out
with a card fitted under other settings warns, since its normal values no longer hold.

Only the standard library and numpy-free arithmetic are used (the inference-path rule).
"""

from __future__ import annotations

import json
import math
import statistics   # the standard library's (this package's own is BrainLobeSegLib.statistics)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import regions
from .errors import InputError
from .resources import bundled_dir

FORMAT = "brainlobeseg-aspects-card"
FORMAT_VERSION = 3
#: Versions this engine reads: 1 (before centring; read as not centred), 2 (one set of
#: weights for every kind) and 3.
READABLE_VERSIONS = (1, 2, 3)
CARD_FILE = "readout-card.json"

#: The kind of tissue of each region code: the card weighs measures per kind, and a region's
#: "expected" measure compares it with the other regions of its kind (both sides).
KIND_OF_CODE: Dict[str, str] = {"C": "deep grey", "L": "deep grey", "IC": "capsule", "I": "insula",
                                **{f"M{i}": "cortex" for i in range(1, 7)}}
#: The kinds, in the order cards list their weights (that of :data:`KIND_OF_CODE`).
KINDS: Tuple[str, ...] = tuple(dict.fromkeys(KIND_OF_CODE.values()))

#: Every measure a card may use: name -> how a reader says it (``{v}``: the value, HU
#: relative to the mirror region unless said otherwise). Negative means darker.
MEASURES: Dict[str, str] = {
    "mean": "mean {v:+.1f} HU against the mirror side",
    "dark": "darkest part (8 mm) {v:+.1f} HU against the mirror side",
    "dark5": "darkest part (5 mm) {v:+.1f} HU against the mirror side",
    "dark12": "darkest part (12 mm) {v:+.1f} HU against the mirror side",
    "low30": "darkest 30 % of it {v:+.1f} HU against the mirror side",
    "low60": "darkest 60 % of it {v:+.1f} HU against the mirror side",
    "frac": "{v:.0%} of it at least 2 HU darker than the mirror side",
    "expected": "{v:+.1f} HU against the median of its kind (both sides)",
    "gw_loss": "grey/white contrast {v:+.1f} HU lower than the mirror side",
}
#: How a reader says a measure whose value below zero means another finding, not less of
#: the same (``{v}``: the value's size). The grey/white measure is the region's density
#: spread (90th minus 10th percentile) below the mirror's: below zero the region is *more*
#: uneven than its mirror, as when an infarct darkens part of it, and the fitted cards
#: weigh that as evidence. "contrast -2.0 HU lower" would read as the opposite.
NEGATIVE_READING: Dict[str, str] = {
    "gw_loss": "density spread {v:.1f} HU wider than the mirror side (part of it darker)",
}
#: Measures for which a higher value means darker (the rest: lower means darker).
HIGHER_IS_DARKER: Tuple[str, ...] = ("frac",)
#: Regions whose mean differs from the mirror region's by more than this (HU) do not count
#: towards the scan's darkening (:func:`scan_centre`): an infarct lowers its region and leaves
#: its mirror's share of darker tissue near zero, not below normal, so a large one would move
#: the median of that share (-4 HU over all ten regions of one side of the code phantom: +0.19,
#: one region less called).
CENTRE_MAX_MEAN_HU = 1.5
#: A measure's contribution (weight x z) at least this large is named as a reason.
REASON_CONTRIBUTION = 0.75
#: Measures that compare a region with something other than its mirror region, so they can
#: be missing while the mirror comparison stands: "expected" needs two measured regions of
#: the region's kind (a scan cut at the basal ganglia may hold one). A missing one counts as
#: normal for the region (z = 0) instead of leaving the region unscored: a caudate 5.5 HU
#: darker than its mirror was left uncalled for want of a second deep nucleus (synthetic seed
#: 9600, case 27). Any other missing measure leaves the region without a score: "gw_loss" is
#: missing when the mirror region holds almost no tissue, and a comparison with a sliver
#: called the same normal region in all ten read-outs of one scan (seed 10300, case 5).
#: Each maps to how a reason names it when it is missing (``{kind}``: the region's kind).
CONTEXT_MEASURES: Dict[str, str] = {
    "expected": "the comparison with the other {kind} regions (fewer than two of them measured)",
}


@dataclass(frozen=True)
class ReadoutCard:
    """A fitted read-out: the measures, their normal values per region code, the weights."""

    features: Tuple[str, ...]
    normal: Dict[str, Dict[str, Tuple[float, float]]]   # code -> measure -> (median, sd)
    weights: Dict[str, Dict[str, float]]                # kind -> measure -> weight
    bias: float
    threshold: float
    trained_on: Dict[str, Any]
    fit: Dict[str, Any]
    source: str = ""
    #: The read-out settings the fitted measures were made with (``aspects.measure_settings``);
    #: empty in cards written before it was recorded.
    readout: Dict[str, Any] = field(default_factory=dict)
    #: Whether each measure is taken less the scan's own darkening (:func:`scan_centre`).
    centred: bool = False

    def scan_centre(self, scored: Iterable[Tuple[str, Mapping[str, Optional[float]]]]) -> Dict[str, float]:
        """The scan's offset of each measure for this card ({} unless it is centred):
        ``scored`` is (region code, measures) of every region of one read-out."""
        return scan_centre(self.normal, self.features, scored) if self.centred else {}

    def z_values(self, code: str, values: Mapping[str, Optional[float]]) -> Optional[Dict[str, float]]:
        """The measures as z-values for a region of ``code``; None if one is missing."""
        out = {}
        for f in self.features:
            v = values.get(f)
            if v is None or not math.isfinite(v):
                return None
            median, sd = self.normal[code][f]
            out[f] = (v - median) / sd
        return out

    def missing(self, values: Mapping[str, Optional[float]]) -> Tuple[str, ...]:
        """The card's measures that ``values`` lacks (None or not finite)."""
        return tuple(f for f in self.features if values.get(f) is None or not math.isfinite(values[f]))

    def scored_values(self, code: str, values: Mapping[str, Optional[float]],
                      centre: Optional[Mapping[str, float]] = None) -> Optional[Dict[str, Optional[float]]]:
        """``values`` less the scan's ``centre`` (:meth:`scan_centre`), with each missing
        :data:`CONTEXT_MEASURES` set to its normal median for ``code``; None when another
        measure is missing (the region is not scored)."""
        lacking = self.missing(values)
        if any(f not in CONTEXT_MEASURES for f in lacking):
            return None
        centre = centre or {}
        return {**values, **{f: values[f] - centre.get(f, 0.0) for f in self.features if f not in lacking},
                **{f: self.normal[code][f][0] for f in lacking}}

    def score(self, code: str, values: Mapping[str, Optional[float]],
              centre: Optional[Mapping[str, float]] = None) -> Optional[float]:
        """The call score (log-odds) of a region; None when a measure other than a
        :data:`CONTEXT_MEASURES` one is missing. ``centre``: the scan's offsets
        (:meth:`scan_centre`; needed for a centred card's calls)."""
        parts = self.contributions(code, values, centre)
        return None if parts is None else self.bias + sum(parts.values())

    def contributions(self, code: str, values: Mapping[str, Optional[float]],
                      centre: Optional[Mapping[str, float]] = None) -> Optional[Dict[str, float]]:
        """Each measure's weight (of the region's kind) times its z-value: the terms of
        :meth:`score` after the bias, which :meth:`reasons` names; None when not scored."""
        scored = self.scored_values(code, values, centre)
        z = None if scored is None else self.z_values(code, scored)
        if z is None:
            return None
        weights = self.weights[KIND_OF_CODE[code]]
        return {f: weights[f] * z[f] for f in self.features}

    def reasons(self, code: str, values: Mapping[str, Optional[float]],
                centre: Optional[Mapping[str, float]] = None) -> List[str]:
        """The measures that push the score up most, in words with their normal range (a
        missing context measure counts as normal, so it is never one of them). With a
        centred card the normal range is this scan's: shifted by its offset."""
        centre = centre or {}
        pushes = sorted(((v, f) for f, v in (self.contributions(code, values, centre) or {}).items()), reverse=True)
        out = []
        for contribution, f in pushes:
            if contribution < REASON_CONTRIBUTION:
                break
            normal_median, sd = self.normal[code][f]
            where = "this region on this scan" if centre.get(f) else "this region"
            out.append(f"{_reading(f, values[f])} (normal for {where} "
                       f"{_plain(f, normal_median + centre.get(f, 0.0))} +/- {_plain(f, sd, sign=False)})")
        return out

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "features": list(self.features),
                "normal": {c: {f: list(v) for f, v in m.items()} for c, m in self.normal.items()},
                "weights": {k: dict(w) for k, w in self.weights.items()},
                "bias": self.bias, "threshold": self.threshold,
                "trained_on": self.trained_on, "fit": self.fit, "centred": self.centred,
                **({"readout": self.readout} if self.readout else {})}


def scan_centre(normal: Mapping[str, Mapping[str, Tuple[float, float]]], features: Sequence[str],
                scored: Iterable[Tuple[str, Mapping[str, Optional[float]]]]) -> Dict[str, float]:
    """Per measure, the median over the regions that have every one of ``features`` and a
    mean within :data:`CENTRE_MAX_MEAN_HU` of their mirror's, of (value - ``normal`` median
    for the region's code), kept only where it is on the darker
    side (:data:`HIGHER_IS_DARKER`), else 0.0: the scan's own darkening of each measure
    (module docstring). One formula for the read-out and the fit (``aspects_fit``); 0.0 for
    a measure when no region has them all."""
    offsets: Dict[str, List[float]] = {f: [] for f in features}
    for code, values in scored:
        mean = values.get("mean")
        if mean is None or abs(mean) > CENTRE_MAX_MEAN_HU:
            continue   # an infarct (or its mirror): not the scan's own darkening
        if all(values.get(f) is not None and math.isfinite(values[f]) for f in features):
            for f in features:
                offsets[f].append(values[f] - normal[code][f][0])
    centre = {f: statistics.median(v) if v else 0.0 for f, v in offsets.items()}
    return {f: max(c, 0.0) if f in HIGHER_IS_DARKER else min(c, 0.0) for f, c in centre.items()}


def _reading(measure: str, v: float) -> str:
    """A measure's value in words (:data:`MEASURES`, or :data:`NEGATIVE_READING` below zero)."""
    if v < 0 and measure in NEGATIVE_READING:
        return NEGATIVE_READING[measure].format(v=-v)
    return MEASURES[measure].format(v=v)


def _plain(measure: str, v: float, sign: bool = True) -> str:
    if measure == "frac":
        return f"{v:.0%}"
    return f"{v:+.1f}" if sign else f"{v:.1f}"


def default_card_path() -> Path:
    """``$BRAINLOBESEG_ASPECTS_CARD``'s folder, else ``Resources/ASPECTS`` (a wheel's
    ``BrainLobeSegLib/bundled_aspects``), with :data:`CARD_FILE` in it."""
    return bundled_dir("BRAINLOBESEG_ASPECTS", "ASPECTS", "bundled_aspects") / CARD_FILE


def load_card(path: Optional[Path] = None) -> ReadoutCard:
    """Read and check a card; every defect is one :class:`InputError` naming the file."""
    path = Path(path) if path is not None else default_card_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"the ASPECTS read-out card {path} does not exist.",
                         "Reinstall the extension, or make one with 'python -m training aspects_fit'.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"the ASPECTS read-out card {path} cannot be read ({exc}).",
                         "Replace it with a card written by 'python -m training aspects_fit'.") from None
    try:
        return card_from_json(data, str(path))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"the ASPECTS read-out card {path} is not valid ({exc}).",
                         "Replace it with a card written by 'python -m training aspects_fit'.") from None


def card_from_json(data: Any, source: str = "") -> ReadoutCard:
    """A card from its JSON; raises KeyError/TypeError/ValueError with what is wrong."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"format is not {FORMAT!r}")
    version = data.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"version {version!r}, this engine reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))}")
    centred = data["centred"] if version >= 2 else False
    if not isinstance(centred, bool):
        raise TypeError(f"centred is {centred!r}, not true or false")
    features = tuple(str(f) for f in data["features"])
    unknown = [f for f in features if f not in MEASURES]
    if not features or unknown:
        raise ValueError(f"unknown or no measures: {unknown}")
    codes = sorted({r.code for r in regions.REGIONS})
    normal = {}
    for code in codes:
        normal[code] = {}
        for f in features:
            median, sd = (_number(v) for v in data["normal"][code][f])
            if sd <= 0:
                raise ValueError(f"normal SD of {f} in {code} is not positive")
            normal[code][f] = (median, sd)
    if version >= 3:
        weights = {k: {f: _number(data["weights"][k][f]) for f in features} for k in KINDS}
    else:
        weights = same_for_every_kind({f: _number(data["weights"][f]) for f in features})
    readout = data.get("readout") or {}
    if not isinstance(readout, dict):
        raise TypeError("readout is not a mapping of setting names to values")
    return ReadoutCard(features, normal, weights, _number(data["bias"]), _number(data["threshold"]),
                       dict(data.get("trained_on") or {}), dict(data.get("fit") or {}), source, dict(readout),
                       centred)


def same_for_every_kind(weights: Mapping[str, float]) -> Dict[str, Dict[str, float]]:
    """One set of measure weights as the weights of every kind (a version-1 or 2 card)."""
    return {k: dict(weights) for k in KINDS}


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise TypeError(f"{v!r} is not a finite number")
    return float(v)


def measure_names(card: ReadoutCard, extra: Sequence[str] = ()) -> Tuple[str, ...]:
    """The card's measures plus ``extra`` (in :data:`MEASURES` order)."""
    wanted = set(card.features) | set(extra)
    return tuple(m for m in MEASURES if m in wanted)
