"""Smoke test of the benchmark harness (Testing/benchmarks/bench.py).

Checks that a run with tiny random models on a small phantom produces the report with
every row (each mode's first and steady run, the nnU-Net-class network, the targets and
the machine); timings are not checked, they depend on the machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from Testing.benchmarks import bench, nnunet_like  # noqa: E402


def test_nnunet_like_follows_the_plan():
    """6 stages 32..320, windows at step 0.5 of the patch, Gaussian peaked at the centre."""
    net = nnunet_like.PlainConvUNet3D()
    assert [s[0].out_channels for s in net.encoder] == [32, 64, 128, 256, 320, 320]
    assert [s[0].stride[0] for s in net.encoder] == [1, 2, 2, 2, 2, 2]
    assert net.divisor == 32
    assert nnunet_like.steps_along(128, 128) == [0]
    assert nnunet_like.steps_along(200, 128) == [0, 36, 72]
    assert nnunet_like.steps_along(256, 128) == [0, 64, 128]
    g = nnunet_like.gaussian_weights((8, 8, 8))
    assert float(g.max()) == pytest.approx(1.0) and float(g.min()) > 0


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"
    code = bench.main(["--tiny-models", "--tiny-spacing", "4", "4", "--size", "48", "48", "16",
                       "--spacing", "3.2", "3.2", "6", "--repeat", "0", "--nnunet-patch", "64",
                       "--nnunet-max-windows", "1", "--out", str(out)])
    assert code == 0
    text = out.read_text(encoding="utf-8")
    assert text.strip() == ("# BrainLobeSeg benchmark results\n\n" + capsys.readouterr().out).strip()
    for mode in bench.MODES:
        assert f"| {mode} (first run, fresh process) |" in text
        assert f"| our {mode} (first run) |" in text
        assert f"| {mode} peak RSS <= 2.5 GB |" in text
    assert "| nnU-Net-class 3d_fullres (first run)" in text
    for target in ("3d end to end (first run) <= 5 s", "planar end to end (first run) <= 20 s",
                   "(3d end to end)", "(3d inference only)"):
        assert target in text
    assert "TINY RANDOM MODELS" in text
    assert "failed" not in text and "n/a GB" not in text
    assert "- CPU:" in text and "- Command:" in text
    raw = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert set(raw["results"]) == {"3d", "planar", "ensemble", "nnunet"}
    for mode in bench.MODES:
        stages = raw["results"][mode]["runs"][0]["stages"]
        assert {"read", "inference", "write"} <= set(stages)


def test_report_has_every_row():
    """The report from fabricated results: steady rows, ratios, targets, atlas, Dice."""
    stages = {k: 0.1 for k in bench.STAGES}
    run = {"e2e_s": 1.0, "stages": stages}
    mode = {"load_s": 0.2, "runs": [run, run, run], "peak_rss": 1e9,
            "heldout": {"per_case": {"1": 0.8, "2": 0.7}, "dice_source": "x"}}
    results = {m: dict(mode, mode=m) for m in bench.MODES}
    results["nnunet"] = {"load_s": 0.1, "stages": dict(stages, inference=8.0), "peak_rss": 2e9,
                         "complete": False, "window_s": [3.0, 2.0], "windows_run": 2,
                         "windows_total": 8, "params_m": 31.2, "patch": [128] * 3,
                         "spacing_mm": [1.5] * 3, "volume_shape": [100, 120, 100],
                         "padded_shape": [128, 128, 128]}
    results["atlas"] = {"load_s": 1.0, "e2e_s": 60.0, "peak_rss": 1e9, "overlap_rule": "r",
                        "stages": {"read": 0.1, "registration (affine)": 5.0,
                                   "registration (b-spline)": 50.0},
                        "heldout": {"per_case": {"1": 0.5, "2": 0.6}, "dice_source": "x"}}
    meta = {"scan": "s", "machine": {}, "threads": 2, "models": "m", "models_note": "",
            "atlas_requested": True, "heldout_note": "2 cases", "command": "c", "date": "d",
            "total_s": 1.0}
    text = bench.build_report(results, meta)
    for m in bench.MODES:
        assert f"| {m} (steady, median of 2) | n/a | **1.00** |" in text
        assert f"| {m} | 0.750 | 0.800 | 0.700 |" in text
    assert "EXTRAPOLATED: 2 of 8 windows" in text
    assert "| our 3d (first run) | 0.10 | 8.00 | 80.0x |" in text
    assert "| atlas | 0.550 | 0.500 | 0.600 |" in text
    assert "| atlas registration (affine + B-spline) |" in text
