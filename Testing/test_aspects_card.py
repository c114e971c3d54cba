"""The ASPECTS read-out card (aspects_card.py) and its fit (training/aspects_fit.py).

The card is data: a broken or hostile file must fail with one clear message and never
run code; a card fitted on records where infarcted regions are darker must call them and
keep the asked specificity on the records it was fitted on; the bundled card must read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from BrainLobeSegLib import aspects, aspects_card, regions
from BrainLobeSegLib.errors import InputError
from training import aspects_fit

FEATURES = ("mean", "dark", "frac")


def _records(n_scans: int, seed: int):
    """aspects_bench --dump records: per scan a normal read-out, one with a region of each
    kind (the card weighs measures per kind) on one side whose measures are darker (-4 HU
    over 60 % of it), and one with a faint region (-2 HU over 10 %)."""
    rng = np.random.default_rng(seed)

    def regs(hit, strength):
        out = []
        for r in regions.REGIONS:
            deep = r.code in ("C", "L", "IC")
            sd = 1.0 if deep else 0.4
            shift = strength if r.label in hit else 0.0
            out.append({"label": r.label, "called": False, "measures": {
                "mean": float(rng.normal(-0.6 * shift, sd)), "dark": float(rng.normal(-1 - 1.5 * shift, sd)),
                "frac": float(np.clip(rng.normal(0.05 + 0.1 * shift, 0.03), 0, 1)), "dark5": None}})
        return out

    recs = []
    for case in range(n_scans):
        recs.append({"case": str(case), "drop": 0, "extent": 0, "kind": "normal", "truth": [], "regions": regs([], 0)})
        side = str(rng.choice(aspects.SIDES))
        hit = [regions.region(str(rng.choice(codes)), side).label
               for codes in (("C", "L"), ("IC",), ("I",), tuple(f"M{i}" for i in range(1, 7)))]
        recs.append({"case": str(case), "drop": -4.0, "extent": 0.6, "kind": "cortical", "truth": hit,
                     "regions": regs(hit, 2.0)})
        faint = [int(rng.integers(1, 21))]
        recs.append({"case": str(case), "drop": -2.0, "extent": 0.1, "kind": "cortical", "truth": faint,
                     "regions": regs(faint, 0.3)})
    return recs


@pytest.fixture(scope="module")
def dump(tmp_path_factory):
    path = tmp_path_factory.mktemp("dumps") / "dump.json"
    path.write_text(json.dumps(_records(40, 1)))
    return path


def test_fitted_card_calls_darker_regions_and_keeps_its_specificity(dump, tmp_path):
    rows = aspects_fit.load_rows([dump], FEATURES)
    card = aspects_fit.fit_card(rows, FEATURES, specificity=0.98)
    assert card.fit["specificity"] >= 0.975 and card.fit["target_sensitivity"] > 0.9
    assert all(card.weights[kind]["dark"] < 0 for kind in aspects_card.KINDS)   # darker (lower) -> called
    assert card.normal["M2"]["dark"][0] < 0
    # the normal values are per region code: deep nuclei vary more than cortex
    assert card.normal["L"]["mean"][1] > 1.8 * card.normal["M2"]["mean"][1]
    # written, it reads back as the same card and scores a fresh scan's regions the same way
    out = tmp_path / "card.json"
    aspects_fit.write_card(card, out, overwrite=False)
    back = aspects_card.load_card(out)
    fresh = [r for rec in _records(10, 2) for r in rec["regions"]]
    code = {r.label: r.code for r in regions.REGIONS}
    for reg in fresh:
        assert back.score(code[reg["label"]], reg["measures"]) == pytest.approx(
            card.score(code[reg["label"]], reg["measures"]), abs=1e-3)
    with pytest.raises(InputError, match="exists"):
        aspects_fit.write_card(card, out, overwrite=False)


def test_a_centred_card_reads_each_measure_against_the_scans_own_offset(dump, tmp_path):
    """Noise pulls the darkest-part measures of every region of a scan the same way; a
    centred card takes each measure less the scan's offset (the median over its regions of
    value minus normal median), so a scan whose regions all read 1.5 HU darker scores as
    before and its infarcted region stays the one called, while a plain card calls more.
    The flag round-trips through the card file; a version-1 card reads as plain."""
    rows = aspects_fit.load_rows([dump], FEATURES)
    centred = aspects_fit.fit_card(rows, FEATURES, specificity=0.98)
    plain = aspects_fit.fit_card(rows, FEATURES, specificity=0.98, centre=False)
    assert centred.centred and not plain.centred
    assert centred.normal["M2"]["dark"][0] == plain.normal["M2"]["dark"][0]   # the centring's reference
    code = {r.label: r.code for r in regions.REGIONS}
    scan = next(rec for rec in _records(10, 5) if rec["drop"] == -4.0)
    pulled = [{**reg, "measures": {**reg["measures"], "dark": reg["measures"]["dark"] - 1.5}}
              for reg in scan["regions"]]

    def calls(card, regs):
        centre = card.scan_centre((code[reg["label"]], reg["measures"]) for reg in regs)
        scores = {reg["label"]: card.score(code[reg["label"]], reg["measures"], centre) for reg in regs}
        return centre, scores, {lab for lab, v in scores.items() if v >= card.threshold}

    centre, scores, called = calls(centred, scan["regions"])
    centre_pulled, scores_pulled, called_pulled = calls(centred, pulled)
    assert centre_pulled["dark"] == pytest.approx(centre["dark"] - 1.5)
    assert scores_pulled == pytest.approx(scores) and called_pulled == called and set(scan["truth"]) <= called
    assert len(calls(plain, pulled)[2]) > len(calls(plain, scan["regions"])[2])
    out = tmp_path / "card.json"
    aspects_fit.write_card(centred, out, overwrite=False)
    back = aspects_card.load_card(out)
    assert back.centred and calls(back, pulled)[1] == pytest.approx(scores, abs=1e-3)
    data = centred.to_json()
    assert aspects_card.card_from_json({**data, "version": 1, "weights": data["weights"]["cortex"]}).centred is False
    with pytest.raises(ValueError, match="reads versions 1, 2, 3"):
        aspects_card.card_from_json({**data, "version": 4})
    with pytest.raises(TypeError, match="centred"):
        aspects_card.card_from_json({**data, "centred": "yes"})


def test_each_kind_of_region_has_its_own_weights(tmp_path):
    """An infarct shows in different measures in a nucleus and in a cortical ribbon. Here
    the cortex's infarcts show only in the share of darker voxels and the deep regions'
    only in their darkest part: a card with weights per kind finds more of them at the
    same specificity than one set of weights for all. A one-set card written as a
    version-2 card (flat weights) reads back with the same weights for every kind."""
    rng = np.random.default_rng(11)
    records = _records(60, 7)
    code = {r.label: r.code for r in regions.REGIONS}
    for rec in records:
        for reg in rec["regions"]:
            if reg["label"] in rec["truth"] and rec["drop"] == -4.0:
                m, deep = reg["measures"], code[reg["label"]] in ("C", "L", "IC")
                m["mean"] = float(rng.normal(0.0, 1.0 if deep else 0.4))
                if deep:
                    m["frac"] = float(np.clip(rng.normal(0.05, 0.03), 0, 1))
                else:
                    m["dark"] = float(rng.normal(-1.0, 0.4))
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(records))
    rows = aspects_fit.load_rows([path], FEATURES)
    by_kind = aspects_fit.fit_card(rows, FEATURES, specificity=0.98)
    one_set = aspects_fit.fit_card(rows, FEATURES, specificity=0.98, by_kind=False)
    assert by_kind.fit["target_sensitivity"] > one_set.fit["target_sensitivity"] + 0.05
    assert by_kind.weights["cortex"]["frac"] > by_kind.weights["deep grey"]["frac"]
    assert all(w == one_set.weights["cortex"] for w in one_set.weights.values())
    flat = {**one_set.to_json(), "version": 2, "weights": one_set.weights["cortex"]}
    assert aspects_card.card_from_json(flat).weights == one_set.weights
    with pytest.raises(InputError, match="infarcted insula regions"):
        aspects_fit.fit_card([r for r in rows if not (r["truth"] and r["code"] == "I")], FEATURES)


def test_unmeasured_target_regions_count_as_missed_in_the_fit(tmp_path):
    """A target region without its measures (too little tissue) is left out of the fit but
    has no call score, so the card's fit sensitivity counts it as missed instead of quietly
    shrinking the denominator."""
    records = _records(40, 1)
    hit = next(r for r in records if r["drop"] == -4.0)
    for reg in hit["regions"]:
        if reg["label"] == hit["truth"][0]:
            reg["measures"] = {f: None for f in reg["measures"]}
    path = tmp_path / "dump.json"
    path.write_text(json.dumps(records))
    read = aspects_fit.read_dumps([path])
    assert aspects_fit.unmeasured_targets(read, FEATURES) == 1
    rows = aspects_fit.rows_of(read, FEATURES)
    card = aspects_fit.fit_card(rows, FEATURES, unmeasured=1)
    plain = aspects_fit.fit_card(rows, FEATURES)
    measured = plain.fit["target_regions"]
    assert card.fit["target_regions"] == measured + 1 and card.fit["target_regions_unmeasured"] == 1
    assert card.fit["target_sensitivity"] == pytest.approx(plain.fit["target_sensitivity"] * measured / (measured + 1),
                                                           abs=1e-4)
    assert card.threshold == plain.threshold   # the fit itself is the same


def test_reasons_name_the_measures_that_push_the_call(dump):
    card = aspects_fit.fit_card(aspects_fit.load_rows([dump], FEATURES), FEATURES)
    low = {f: card.normal["M2"][f][0] - 5 * card.normal["M2"][f][1] for f in ("mean", "dark")}
    values = {**low, "frac": card.normal["M2"]["frac"][0]}   # frac as in a normal region
    assert card.score("M2", values) >= card.threshold
    reasons = card.reasons("M2", values)
    assert len(reasons) == 2 and all("normal for this region" in why for why in reasons)
    assert {why.split(" ")[0] for why in reasons} == {"darkest", "mean"}
    assert card.score("M2", {**values, "frac": None}) is None   # a missing measure: no score


def test_a_missing_context_measure_counts_as_normal_and_the_reason_says_so():
    """A region whose mirror comparison stands is scored when its comparison with its kind
    is missing (the kind's median needs two measured regions of the kind; a scan cut at the
    basal ganglia may hold one): that measure counts as normal for the region, the call
    stands on the others and its reasons say what was left out. A missing mirror measure
    still leaves the region unscored."""
    card = aspects.bundled_card()
    assert set(aspects_card.CONTEXT_MEASURES) <= set(card.features)
    caudate = regions.region("C", "left")
    normal = {f: card.normal["C"][f][0] for f in card.features}
    dark = {**normal, **{f: card.normal["C"][f][0] - 4 * card.normal["C"][f][1]
                         for f in ("mean", "dark", "dark12", "low30", "low60")},
            "frac": card.normal["C"]["frac"][0] + 4 * card.normal["C"]["frac"][1]}
    without_kind = {**dark, "expected": None}
    assert card.score("C", without_kind) == pytest.approx(card.score("C", dark))
    assert card.score("C", {**dark, "mean": None}) is None
    assert card.score("C", {**dark, "expected": None, "gw_loss": None}) is None   # a sliver of a mirror
    me = {"ml": 1.0, "ev": np.full(200, -5.0), "gw": 8.0, "dense_ml": 0.0,   # 5 HU darker than its mirror
          **{name: -5.0 for name in aspects.DARK_PART_SCALES_MM}}
    call = aspects.call_region(caudate, me, {"ml": 1.0, "gw": 8.0, "dense_ml": 0.0}, None, card)
    assert call.measures["expected"] is None and call.call_score is not None
    as_normal = {**call.measures, "expected": card.normal["C"]["expected"][0]}
    assert call.call_score == pytest.approx(card.score("C", as_normal))
    assert any(why.startswith("scored without the comparison with the other deep grey regions")
               for why in call.reasons)
    sliver = aspects.call_region(caudate, me, {"ml": 0.01, "gw": None, "dense_ml": 0.0}, None, card)
    assert sliver.call_score is None and not sliver.called
    assert any(why.startswith("not scored: the mirror region holds almost no measured tissue (0.01 ml)")
               for why in sliver.reasons)


def test_a_wider_spread_than_the_mirror_is_read_as_such():
    """A card that weighs a negative grey/white measure as evidence (as the fitted ones do:
    part of the region darker widens its spread) names it as a wider spread, not as a
    contrast "-2.5 HU lower"; a positive value keeps the contrast wording."""
    normal = {r.code: {"gw_loss": (0.0, 1.0)} for r in regions.REGIONS}
    card = aspects_card.ReadoutCard(("gw_loss",), normal, aspects_card.same_for_every_kind({"gw_loss": -1.0}),
                                    0.0, 1.0, {}, {})
    wider = card.reasons("M3", {"gw_loss": -2.5})
    assert len(wider) == 1 and wider[0].startswith("density spread 2.5 HU wider than the mirror side")
    assert "lower" not in wider[0]
    flat = aspects_card.ReadoutCard(("gw_loss",), normal, aspects_card.same_for_every_kind({"gw_loss": 1.0}),
                                    0.0, 1.0, {}, {})
    assert flat.reasons("M3", {"gw_loss": 3.0})[0].startswith("grey/white contrast +3.0 HU lower")


def test_fit_command_writes_a_card_and_refuses_bad_input(dump, tmp_path):
    out = tmp_path / "card.json"
    cmd = [sys.executable, "-m", "training", "aspects_fit", str(dump), "--out", str(out), "--features", *FEATURES]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "target sensitivity" in done.stdout and aspects_card.load_card(out).features == FEATURES
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a dump"}')
    done = subprocess.run(cmd[:4] + [str(bad), "--out", str(tmp_path / "x.json")], capture_output=True, text=True)
    assert done.returncode != 0 and "not an aspects_bench dump" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_bundled_card_reads_and_uses_known_measures():
    card = aspects_card.load_card()
    assert set(card.features) <= set(aspects_card.MEASURES)
    assert set(card.normal) == {r.code for r in regions.REGIONS}
    assert card.trained_on["scans"] >= 30 and 0.9 < card.fit["specificity"] < 1.0
    # fitted with this engine's read-out settings: a change to one of them needs a refit
    assert card.readout and aspects.card_settings_mismatch(card) == []


def test_the_card_records_the_read_out_settings_of_its_dumps(tmp_path):
    """aspects_fit copies the dumps' read-out settings into the card (they round-trip);
    dumps made with different settings cannot make one card; dumps that do not say make
    a card without the block, and the fit says so."""
    settings = aspects.measure_settings()
    recs = _records(40, 3)
    for rec in recs:
        rec["settings"] = settings
    same = tmp_path / "same.json"
    same.write_text(json.dumps(recs))
    out = tmp_path / "card.json"
    cmd = [sys.executable, "-m", "training", "aspects_fit", str(same), "--out", str(out), "--features", *FEATURES]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    card = aspects_card.load_card(out)
    assert card.readout == json.loads(json.dumps(settings)) and aspects.card_settings_mismatch(card) == []
    older_dump = tmp_path / "older.json"   # made before a setting was recorded, with the value it names
    before = {k: v for k, v in settings.items() if k not in aspects.SETTINGS_BEFORE_RECORDED}
    older_dump.write_text(json.dumps([{**rec, "settings": before} for rec in recs]))
    assert aspects_fit.dump_settings(aspects_fit.read_dumps([same, older_dump])) == json.loads(json.dumps(settings))
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{**rec, "settings": {**settings, "csf_margin_mm": 1.5}} for rec in recs]))
    with pytest.raises(InputError, match="2 different read-out settings"):
        aspects_fit.dump_settings(aspects_fit.read_dumps([same, other]))
    unsaid = tmp_path / "unsaid.json"
    unsaid.write_text(json.dumps(_records(2, 4)))
    with pytest.raises(InputError, match="records of the dumps do not say their read-out settings"):
        aspects_fit.dump_settings(aspects_fit.read_dumps([same, unsaid]))
    older = aspects_card.card_from_json({**card.to_json(), "readout": {**card.readout, "csf_margin_mm": 1.5}})
    assert aspects.card_settings_mismatch(older) == [f"csf_margin_mm: 1.5 -> {aspects.CSF_MARGIN_MM!r}"]
    # a block written before a setting was recorded was made with its earlier value
    before = {k: v for k, v in card.readout.items() if k not in aspects.SETTINGS_BEFORE_RECORDED}
    legacy = aspects_card.card_from_json({**card.to_json(), "readout": before})
    assert aspects.card_settings_mismatch(legacy) == (
        [] if aspects.SHADING_ORDER == 2 else [f"shading_order: 2 -> {aspects.SHADING_ORDER!r}"])


def test_dumps_without_settings_make_a_card_without_the_block(dump, tmp_path):
    out = tmp_path / "card.json"
    cmd = [sys.executable, "-m", "training", "aspects_fit", str(dump), "--out", str(out), "--features", *FEATURES]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0 and "do not record their read-out settings" in done.stdout
    card = aspects_card.load_card(out)
    assert card.readout == {} and "readout" not in json.loads(out.read_text())
    assert aspects.card_settings_mismatch(card) == []     # nothing to compare: no warning


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="pickle"), "format"),
    (lambda d: d.update(version=99), "version"),
    (lambda d: d.update(features=["mean", "__import__('os')"]), "unknown"),
    (lambda d: d["normal"].pop("M4"), "M4"),
    (lambda d: d["normal"]["C"].__setitem__(d["features"][0], [0.0, 0.0]), "not positive"),
    (lambda d: d.update(bias="os.system('x')"), "not a finite number"),
    (lambda d: d.update(threshold=float("nan")), "not a finite number"),
    (lambda d: d.update(readout=["csf_margin_mm", 3.0]), "readout"),
    (lambda d: d["weights"].pop("insula"), "insula"),
])
def test_broken_card_is_one_clear_error(tmp_path, edit, message):
    data = json.loads(aspects_card.default_card_path().read_text())
    edit(data)
    path = tmp_path / "card.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="not valid") as err:
        aspects_card.load_card(path)
    assert message in str(err.value)


def test_unreadable_card_is_one_clear_error(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        aspects_card.load_card(tmp_path / "missing.json")
    path = tmp_path / "card.json"
    path.write_text("{ not json")
    with pytest.raises(InputError, match="cannot be read"):
        aspects_card.load_card(path)
    assert not list(Path(tmp_path).glob(".*partial"))
