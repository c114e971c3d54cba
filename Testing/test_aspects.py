"""The ASPECTS read-out (aspects.py) on code phantoms: what it must call and must not.

The phantom's hemispheres are mirror images, so a normal phantom has no call; a region
lowered by a few HU must be called and cost one point on its side; what mimics early
ischaemia (a calcification, a CSF-dense old infarct, a scanner offset) must not be called,
and a haemorrhage leaves its region pair not assessed.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import aspects, phantom, regions
from BrainLobeSegLib.errors import InputError, InputWarning


@pytest.fixture(scope="module")
def case():
    # tilted, so the mirror plane must come from the regions, not from the grid
    return phantom.make_scan(size=(160, 160, 60), spacing=(1.2, 1.2, 2.5), angles_deg=(10.0, -6.0, 5.0),
                             seed=4)


def _hu(case) -> np.ndarray:
    return sitk.GetArrayFromImage(case.ct).astype(np.float32)


def _image(case, arr: np.ndarray) -> sitk.Image:
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(case.ct)
    return out


def _lowered(case, code: str, side: str, drop: float) -> sitk.Image:
    """The scan with the parenchyma (20-50 HU) of one region lowered by ``drop`` HU."""
    return phantom.lower_region(case.ct, case.labels_scan, regions.region(code, side).label, drop)


def _offsets_mm(case) -> np.ndarray:
    """(z, y, x, 3): each voxel's (x, y, z) offset in mm from the first voxel (the phantom's
    grid is axis-aligned)."""
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in case.ct.GetSize()[::-1]], indexing="ij")
    return np.stack([xx, yy, zz], -1) * np.array(case.ct.GetSpacing())


def _ball(case, code: str, side: str, radius_mm: float) -> np.ndarray:
    """Voxels of the region within ``radius_mm`` of its centroid."""
    label = regions.region(code, side).label
    centre = aspects.region_centroids(case.labels_scan)[label]
    phys = np.array(case.ct.GetOrigin()) + _offsets_mm(case)
    near = np.linalg.norm(phys - centre, axis=-1) <= radius_mm
    return near & (sitk.GetArrayFromImage(case.labels_scan) == label)


def called(result: aspects.AspectsResult):
    return [r.region for r in result.regions if r.called]


def test_normal_phantom_has_no_call_and_scores_ten(case):
    result = aspects.assess(case.ct, case.labels_scan)
    assert called(result) == []
    assert (result.score("left"), result.score("right")) == (10, 10)
    assert "no region called" in result.side_reason


def test_lowered_region_is_called_and_costs_one_point(case):
    result = aspects.assess(_lowered(case, "M2", "left", 6.0), case.labels_scan)
    assert called(result) == ["M2 left"]
    assert result.score("left") == 9 and result.score("right") == 10
    assert result.side == "left" and result.side_source == "proposed"
    m2 = result.region("M2 left")
    assert m2.affected_fraction > 0.8 and m2.median_drop_hu < -3.0
    assert any("darker than the mirror side" in why for why in m2.reasons)
    # the evidence map lies on the scan grid, darker (negative) in the lowered region
    lab = sitk.GetArrayFromImage(case.labels_scan)
    ev = sitk.GetArrayFromImage(result.evidence)
    assert result.evidence.GetSize() == case.ct.GetSize()
    assert np.median(ev[lab == m2.label]) < -2.0 and abs(np.median(ev[lab == m2.label + 10])) < 6.0


def test_deep_region_lowered_on_the_right(case):
    result = aspects.assess(_lowered(case, "L", "right", 5.0), case.labels_scan)
    assert called(result) == ["L right"]
    assert result.score() == 9 and result.side == "right"


def test_scanner_offset_changes_nothing(case):
    """+35 HU on all tissue (a calibration difference): the tissue window moves with it."""
    hu = _hu(case)
    tissue = hu > -1000
    hu[tissue] += 35.0
    result = aspects.assess(_image(case, hu), case.labels_scan)
    assert called(result) == []
    lowered = sitk.GetArrayFromImage(_lowered(case, "M5", "right", 6.0)).astype(np.float32)
    lowered[tissue] += 35.0
    assert called(aspects.assess(_image(case, lowered), case.labels_scan)) == ["M5 right"]


def _ball_lowered(case, radius_mm: float, drop_hu: float):
    """(the scan with M2 left's parenchyma within ``radius_mm`` of its centroid lowered,
    the share of the region lowered)."""
    hu = _hu(case)
    ball = _ball(case, "M2", "left", radius_mm)
    hu[ball & (hu >= 20) & (hu <= 50)] -= drop_hu
    region = sitk.GetArrayViewFromImage(case.labels_scan) == regions.region("M2", "left").label
    return _image(case, hu), float(ball.sum() / region.sum())


def test_a_4_hu_drop_over_a_third_of_a_region_is_called_from_its_darkest_part(case):
    """Issue 16's hardest target condition on the phantom: -4 HU over a compact third of
    M2 moves the region's mean by about 1 HU only; its darkest part, well below its normal
    range, and the share of darker voxels are what push the call score (the card's reasons
    name the darkest part). A small drop (an 8 mm ball, a few % of the
    region) is not called."""
    img, share = _ball_lowered(case, 16.0, 4.0)
    assert 0.25 < share < 0.4
    result = aspects.assess(img, case.labels_scan, with_evidence_map=False)
    assert called(result) == ["M2 left"] and result.score("left") == 9
    call = result.region("M2 left")
    card = aspects.bundled_card()
    median, sd = card.normal["M2"]["dark"]
    assert -2.0 < call.diff_to_mirror_hu and call.darkest_part_hu < median - 1.5 * sd
    pushes = call.reasons[0].split(": ", 1)[1].split("; ")   # the card's reasons, largest push first
    assert call.call_score >= card.threshold and any(p.startswith("darkest part (8 mm)") for p in pushes[:2])
    img, share = _ball_lowered(case, 8.0, 4.0)
    assert share < 0.1 and called(aspects.assess(img, case.labels_scan, with_evidence_map=False)) == []


@pytest.mark.parametrize("codes, kept_hu", [(("M4", "M5", "M6"), 3.0), (("M1", "M2", "M3"), 3.0),
                                            (("M2", "M3", "M5", "M6"), 2.5),
                                            (("M1", "M2", "M3", "M4", "M5", "M6"), 2.0)])
def test_an_infarct_of_several_regions_is_not_taken_for_scanner_shading(case, codes, kept_hu):
    """-4 HU over several whole regions of one side: the shading fit (a smooth field odd
    in x) explains much of it as a darker hemisphere. With pairs left out of the refit
    from 1.5 HU, three regions kept 0.8-1.7 HU of their drop and M2 was not called; from
    0.75 HU, M6 of the four kept 0.9 HU and only three of M1-M6 were called (the first fit
    left the others just under the bar). From 0.5 HU (:data:`aspects.PAIR_EXCLUDE_HU`)
    every region keeps ``kept_hu`` or more, all are called and nothing else."""
    ct = case.ct
    for code in codes:
        ct = phantom.lower_region(ct, case.labels_scan, regions.region(code, "left").label, 4.0)
    result = aspects.assess(ct, case.labels_scan, with_evidence_map=False)
    assert sorted(called(result)) == sorted(f"{code} left" for code in codes)
    assert result.score("left") == 10 - len(codes) and result.score("right") == 10
    assert all(result.region(f"{code} left").diff_to_mirror_hu < -kept_hu for code in codes)


def test_a_whole_side_infarct_is_not_taken_for_the_scans_own_darkening(case):
    """-4 HU over all ten regions of one side: the read-out takes each measure less the
    scan's own darkening (a centred card), which must not come from the infarct. Its mirror
    regions read a share of darker tissue near zero, not below normal, so with every region
    counted the median share rose by 0.19 and one region was no longer called; regions whose
    mean differs from the mirror's by more than 1.5 HU do not count, and all ten are called."""
    assert aspects.bundled_card().centred
    ct = case.ct
    for r in regions.REGIONS:
        if r.side == "left":
            ct = phantom.lower_region(ct, case.labels_scan, r.label, 4.0)
    result = aspects.assess(ct, case.labels_scan, with_evidence_map=False)
    assert sorted(called(result)) == sorted(r.segment_name for r in regions.REGIONS if r.side == "left")
    assert result.score("left") == 0 and result.score("right") == 10
    assert result.settings["scan_centre"]["frac"] == 0.0


def test_calcification_is_not_early_ischaemia(case):
    hu = _hu(case)
    hu[_ball(case, "L", "left", 4.0)] = 250.0
    assert called(aspects.assess(_image(case, hu), case.labels_scan)) == []


def test_haemorrhage_leaves_its_pair_not_assessed(case, monkeypatch):
    """A 62 HU haemorrhage of 6 mm in the left lentiform: its rim lies inside the tissue
    window, so compared with it the right lentiform reads several HU darker. The pair is
    reported not assessed, with the reason, and costs no point on either side."""
    centre = aspects.region_centroids(case.labels_scan)[regions.region("L", "left").label]
    scan = phantom.add_dense_ball(case.ct, centre, 6.0, 62.0)
    result = aspects.assess(scan, case.labels_scan)
    left, right = result.region("L left"), result.region("L right")
    assert left.dense_lesion_ml is not None and left.dense_lesion_ml >= aspects.DENSE_LESION_ML
    assert right.dense_lesion_ml == left.dense_lesion_ml
    assert left.call_score is None and right.call_score is None
    assert "dense lesion" in left.reasons[0] and "in L left" in left.reasons[0]
    assert "in the mirror region" in right.reasons[0]
    assert called(result) == [] and result.score("left") == result.score("right") == 10
    assert [r.region for r in result.regions if r.dense_lesion_ml is not None] == ["L left", "L right"]
    # what the rule prevents: compared with the haemorrhage's rim, the right side reads darker
    monkeypatch.setattr(aspects, "DENSE_LESION_ML", float("inf"))
    compared = aspects.assess(scan, case.labels_scan, with_evidence_map=False)
    assert compared.region("L right").diff_to_mirror_hu < -2.0


def test_csf_dense_old_infarct_is_not_early_ischaemia(case):
    hu = _hu(case)
    old = _ball(case, "M2", "left", 10.0)
    assert old.sum() * np.prod(case.ct.GetSpacing()) / 1000 > 2.0   # ml: a real lesion
    hu[old] = 8.0
    assert called(aspects.assess(_image(case, hu), case.labels_scan)) == []


def test_lacune_lifted_into_the_tissue_window_is_not_early_ischaemia(case, monkeypatch):
    """A 5 mm lacune that partial volume keeps 14 HU below the parenchyma (above the fluid
    threshold, inside the tissue window) is a compact dark spot: it and its rim are not
    measured, so the lentiform is not called (its rim beyond the margin still reads -1.2 HU).
    Measured with the spots (wrongly) kept, the same lentiform reads about 2 HU darker
    still (-3.1 HU) and is called. A broad -10 HU drop over a third of M2 is not a spot: its
    tissue stays measured."""
    level = aspects.evidence_maps(case.ct, case.labels_scan).level
    hu = _hu(case)
    lacune = _ball(case, "L", "left", 5.0)
    hu[lacune] = level - 14.0
    assert level + aspects.TISSUE_WINDOW_HU[0] < level - 14.0
    img = _image(case, hu)
    lentiform = aspects.assess(img, case.labels_scan, with_evidence_map=False).region("L left")
    assert not lentiform.called and lentiform.diff_to_mirror_hu > -1.5
    monkeypatch.setattr(aspects, "SPOT_GAP_HU", 1e9)
    with pytest.warns(InputWarning, match="spot_gap_hu"):   # the card was fitted with the spots left out
        kept = aspects.assess(img, case.labels_scan, with_evidence_map=False).region("L left")
    assert kept.called and kept.diff_to_mirror_hu < lentiform.diff_to_mirror_hu - 1.5
    assert kept.parenchyma_ml - lentiform.parenchyma_ml > lacune.sum() * np.prod(case.ct.GetSpacing()) / 1000
    monkeypatch.undo()
    broad, share = _ball_lowered(case, 16.0, 10.0)
    assert share > 0.25
    m2 = aspects.assess(broad, case.labels_scan, with_evidence_map=False).region("M2 left")
    normal_ml = aspects.assess(case.ct, case.labels_scan, with_evidence_map=False).region("M2 left").parenchyma_ml
    assert m2.called and m2.parenchyma_ml > 0.99 * normal_ml


def test_override_and_side_change_the_score(case):
    result = aspects.assess(_lowered(case, "M2", "left", 6.0), case.labels_scan, with_evidence_map=False)
    assert result.evidence is None
    result.set_override("M2 left", False)
    assert result.score("left") == 10 and result.region("M2 left").called
    result.set_override(regions.region("C", "left").label, True)
    result.set_override("M6 left", True)
    assert result.score("left") == 8
    result.set_override("M6 left", None)
    assert result.score("left") == 9
    with pytest.raises(InputError, match="not an ASPECTS region"):
        result.set_override("M7 left", True)
    result.set_side("right")
    assert result.score() == 10 and result.side_source == "user"
    with pytest.raises(InputError):
        result.set_side("both")
    data = json.loads(result.to_json_text())
    assert data["aspects"]["score_left"] == 9 and data["aspects"]["side"] == "right"
    assert data["aspects"]["affected"] == []
    assert [r["region"] for r in data["regions"] if r["affected"]] == ["C left"]


def test_proposed_side_follows_the_overrides(case):
    """A proposed side is proposed again from the calls that count once the clinician
    overrides them; a side the user chose stays."""
    result = aspects.assess(_lowered(case, "M2", "left", 6.0), case.labels_scan, with_evidence_map=False)
    assert (result.side, result.side_source) == ("left", "proposed")
    result.set_override("M2 left", False)
    result.set_override("M4 right", True)
    result.set_override("I right", True)
    assert (result.side, result.side_source) == ("right", "proposed")
    assert result.score() == 8 and "2 region(s) affected on the right" in result.side_reason
    result.set_side("left")
    result.set_override("L right", True)
    assert (result.side, result.score()) == ("left", 10)


def test_user_side_is_kept(case):
    result = aspects.assess(_lowered(case, "M2", "left", 6.0), case.labels_scan, side="right",
                            with_evidence_map=False)
    assert result.side == "right" and result.score() == 10 and result.score("left") == 9
    with pytest.raises(InputError, match="unknown side"):
        aspects.assess(case.ct, case.labels_scan, side="up")


def test_refuses_labels_off_the_grid_and_too_few_regions(case):
    other = sitk.Image([10, 10, 10], sitk.sitkUInt8)
    with pytest.raises(InputError, match="grid"):
        aspects.assess(case.ct, other)
    lab = sitk.GetArrayFromImage(case.labels_scan)
    keep = np.isin(lab, [regions.region("M2", "left").label, regions.region("M2", "right").label])
    one_pair = sitk.GetImageFromArray(np.where(keep, lab, 0).astype(np.uint8))
    one_pair.CopyInformation(case.labels_scan)
    with pytest.raises(InputError, match="region pairs"):
        aspects.assess(case.ct, one_pair)


def test_rescoring_a_dump_calls_what_the_read_out_called(case, tmp_path, capsys):
    """``aspects_bench.py --rescore`` measures a card on dumped measures instead of reading
    every scan again; it must call exactly what the read-out called (both decide by
    :func:`aspects.call_of_values`), here on a normal phantom and one with M2 left -6 HU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from Testing.benchmarks import aspects_bench
    m2 = regions.region("M2", "left").label
    runs = [(aspects.assess(case.ct, case.labels_scan, with_evidence_map=False), [], 0, 0),
            (aspects.assess(_lowered(case, "M2", "left", 6.0), case.labels_scan, with_evidence_map=False),
             [m2], -6.0, 1.0)]
    dump = tmp_path / "dump.json"
    dump.write_text(json.dumps([{"case": "0", "drop": d, "extent": e, "truth": truth,
                                 "regions": aspects_bench.features(res)} for res, truth, d, e in runs]))
    card = aspects.bundled_card()
    for res, _, _, _ in runs:
        centre = aspects.scan_centre(card, {r.label: r.measures for r in res.regions})
        assert centre == pytest.approx(res.settings["scan_centre"], abs=1e-4)
        for r in res.regions:
            assert aspects.call_of_values(r.code, r.measures, card, centre) == (r.call_score, r.called)
    assert aspects_bench.main(["--rescore", str(dump), "--drops", "-6", "--extents", "1"]) == 0
    out = capsys.readouterr().out
    assert "| -6 | 100 % | 1.000 | 1.000 | 1.000 | 1.000 |" in out
    assert "Normal scans: 0 of 20 regions called" in out and "2 dumped read-outs re-scored" in out


def test_regions_are_measured_without_their_edge():
    """A voxel is measured for its region only when its 6 neighbours carry the same label
    (one 1.5 mm grid voxel): labels and the next structure's partial volume mix at the
    edge. A border between two regions loses a voxel on each side, a structure one voxel
    thin disappears, background stays background, and the labels given are not changed."""
    assert aspects.REGION_EDGE_MM == aspects.GRID_MM   # one grid voxel
    lab = np.zeros((9, 10, 11), np.uint8)
    lab[1:8, 1:9, 1:6] = 4
    lab[1:8, 1:9, 6:10] = 14
    lab[4, 1:9, 10] = 7   # one voxel thin
    given = lab.copy()
    expected = np.zeros_like(lab)
    expected[2:7, 2:8, 2:5] = 4    # x = 5 touches region 14, x = 6 region 4
    expected[2:7, 2:8, 7:9] = 14   # x = 9 touches the thin structure's background
    np.testing.assert_array_equal(aspects.region_cores(lab), expected)
    np.testing.assert_array_equal(lab, given)
    np.testing.assert_array_equal(aspects.region_cores(lab, edge_mm=0.0), lab)


def test_a_region_box_of_one_voxel_around_gives_the_full_grid_values():
    """The darkest part and the pair evidence smooth a box around the region only (one
    zero voxel around its bounding box): the recursive Gaussian carries the zero border on,
    so the values inside the region must equal a smoothing of the whole grid."""
    rng = np.random.default_rng(3)
    shape = (30, 40, 44)
    mask = np.zeros(shape, bool)
    mask[8:17, 12:25, 5:14] = True
    mask[10:14, 15:20, 7:10] = False          # a hole: weights vary inside the region
    values = rng.normal(0.0, 3.0, shape).astype(np.float32)
    box = aspects._region_box(mask)
    assert [(s.start, s.stop) for s in box] == [(7, 18), (11, 26), (4, 15)]
    for sigma in (3.0, 8.0, 12.0):
        whole, whole_w = aspects._normalised(values, mask, sigma)
        boxed, boxed_w = aspects._normalised(values[box], mask[box], sigma)
        np.testing.assert_allclose(boxed[mask[box]], whole[box][mask[box]], atol=1e-4)
        np.testing.assert_allclose(boxed_w[mask[box]], whole_w[box][mask[box]], atol=1e-5)
    edge = np.zeros(shape, bool)
    edge[0:3, 0:2, 40:44] = True              # at the grid's border: the box is clipped, not wrapped
    assert [(s.start, s.stop) for s in aspects._region_box(edge)] == [(0, 4), (0, 3), (39, 44)]


def _with_shading_wave(case, amplitude_hu: float, wavelength_mm: float, direction, phase: float) -> sitk.Image:
    """The scan with a slow sinusoidal shading on its soft tissue (the synthetic scanner's kind)."""
    hu = _hu(case)
    k = 2 * np.pi / wavelength_mm * np.asarray(direction) / np.linalg.norm(direction)
    soft = (hu > 0) & (hu < 80)
    return _image(case, np.where(soft, hu + amplitude_hu * np.sin(_offsets_mm(case) @ k + phase), hu))


def test_the_finer_shading_field_follows_a_shading_wave(case, monkeypatch):
    """A 6 HU shading wave of 120 mm: the order-2 field (7 terms, the default) leaves
    regions several HU off their mirror and calls three; the order-3 field
    (``SHADING_ORDER = 3``, 13 terms) keeps every region within 1 HU and calls none. (The
    bundled card was fitted with order 2, so the read-out warns about the setting.)"""
    img = _with_shading_wave(case, 6.0, 120.0, (0.8, 0.5, 0.3), 0.7)
    spread = {}
    for order in (2, 3):
        monkeypatch.setattr(aspects, "SHADING_ORDER", order)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)
            result = aspects.assess(img, case.labels_scan, with_evidence_map=False)
        spread[order] = (max(abs(r.diff_to_mirror_hu) for r in result.regions), called(result))
    assert spread[2][0] > 3.0 and len(spread[2][1]) >= 2
    assert spread[3][0] < 1.0 and spread[3][1] == []


def test_the_finer_shading_field_is_not_fitted_around_a_large_infarct(case, monkeypatch):
    """With order 3, -4 HU over M1-M6 leaves more than a third of the fit's tissue out in
    the coarse fit, so the coarse field is kept and all six are called; fitting the finer
    field anyway (the guard lifted) lets it take most of the drop."""
    ct = case.ct
    for code in ("M1", "M2", "M3", "M4", "M5", "M6"):
        ct = phantom.lower_region(ct, case.labels_scan, regions.region(code, "left").label, 4.0)
    monkeypatch.setattr(aspects, "SHADING_ORDER", 3)
    kept = {}
    for name, guard in (("guarded", aspects.FINE_SHADING_MAX_LEFT_OUT), ("unguarded", 1.0)):
        monkeypatch.setattr(aspects, "FINE_SHADING_MAX_LEFT_OUT", guard)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)
            result = aspects.assess(ct, case.labels_scan, with_evidence_map=False)
        kept[name] = (max(result.region(f"{c} left").diff_to_mirror_hu for c in ("M1", "M2", "M3", "M4", "M5", "M6")),
                      result.score("left"))
    assert kept["guarded"][0] < -2.0 and kept["guarded"][1] == 4, kept
    assert kept["unguarded"][0] > -1.0 and kept["unguarded"][1] > 4, kept


def test_a_bilateral_drop_is_called_from_its_kind_only_when_marked(case, monkeypatch):
    """Both M2 lowered: the mirror comparison sees nothing, the regions of their kind do.
    7.5 HU (about -6.6 HU against the cortical median: the size a scanner shading wave gives
    a whole part of the head) is not called since the bound is 8 HU (at 6 HU it was); 12 HU
    is called."""
    def both_lowered(drop: float) -> aspects.AspectsResult:
        ct = case.ct
        for side in ("left", "right"):
            ct = phantom.lower_region(ct, case.labels_scan, regions.region("M2", side).label, drop)
        return aspects.assess(ct, case.labels_scan, with_evidence_map=False)

    assert aspects.EXPECTED_DROP_HU == 8.0
    moderate = both_lowered(7.5)
    assert -aspects.EXPECTED_DROP_HU < moderate.region("M2 left").measures["expected"] < -6.0
    assert called(moderate) == []
    monkeypatch.setattr(aspects, "EXPECTED_DROP_HU", 6.0)
    assert sorted(called(both_lowered(7.5))) == ["M2 left", "M2 right"]
    monkeypatch.undo()
    assert sorted(called(both_lowered(12.0))) == ["M2 left", "M2 right"]
