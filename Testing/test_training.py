"""A tiny end-to-end training on code phantoms: the loss falls, the export loads in the
engine and segments; and the same loop under torchrun with two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from BrainLobeSegLib import inference, models, phantom
from training.__main__ import main as training_main

TINY = ["--spacing", "4", "--base-features", "4", "--batch-size", "2", "--log-every", "5",
        "--patch", "32", "48", "48", "--canvas", "48", "48", "--lr", "0.01"]


@pytest.fixture(scope="module")
def phantom_dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("phantoms")
    for i, angles in enumerate([(0, 0, 0), (8, -5, 4), (-6, 7, -9)]):
        case = phantom.make_scan(size=(72, 72, 36), spacing=(3.0, 3.0, 5.0), angles_deg=angles, seed=i)
        phantom.write_case(case, folder, str(i + 1))
    return folder


def _losses(run: Path, network: str):
    lines = [json.loads(x) for x in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    return [e["loss"] for e in lines if e.get("network") == network and "loss" in e]


def test_tiny_training_learns_and_exports(phantom_dataset, tmp_path):
    run = tmp_path / "run"
    assert training_main(["train", "--data", str(phantom_dataset), "--out", str(run), "--kind", "both",
                          "--iterations", "30", "--device", "cpu", *TINY]) == 0
    for net in ("axial", "coronal", "sagittal", "unet3d"):
        losses = _losses(run, net)
        assert len(losses) == 6
        assert np.mean(losses[-2:]) < np.mean(losses[:2]), (net, losses)
    out = tmp_path / "models"
    assert training_main(["export", "--run", str(run), "--out", str(out)]) == 0
    card = models.read_card(out / "aspects-3d")
    assert card.training["train_cases"] == 3 and card.networks["unet3d"]["sha256"]
    seg = inference.Segmenter("ensemble", out, "cpu")
    case = phantom.make_scan(size=(72, 72, 36), spacing=(3.0, 3.0, 5.0), angles_deg=(4, 4, 4), seed=9)
    result = seg.segment(case.ct, case.transform)
    assert result.labels_scan.GetSize() == case.ct.GetSize()
    assert result.model_names == ["aspects-planar", "aspects-3d"]


def test_resume_continues_from_the_checkpoint(phantom_dataset, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(phantom_dataset), "--out", str(run), "--kind", "3d", "--device", "cpu",
            "--checkpoint-every", "5", *TINY]
    assert training_main(args + ["--iterations", "10"]) == 0
    assert training_main(args + ["--iterations", "15", "--resume"]) == 0
    log = [json.loads(x) for x in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {"event": "resumed", "network": "unet3d", "iteration": 10}.items() <= \
        [e for e in log if e.get("event") == "resumed"][0].items()
    assert [e["iteration"] for e in log if e.get("network") == "unet3d" and "loss" in e][-1] == 15


def test_torchrun_two_gloo_processes(phantom_dataset, tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "training", "train", "--data", str(phantom_dataset), "--out", str(run), "--kind", "3d",
           "--iterations", "6", "--device", "cpu", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert config["kinds"]["3d"]["world_size"] == 2
    assert (run / "unet3d.pt").is_file()


def test_init_from_an_exported_model_starts_from_its_weights(phantom_dataset, tmp_path):
    """--init-from copies an exported model's weights (fine-tuning); 0 iterations later the
    exported network is that model's; another kind is refused with a message."""
    run = tmp_path / "run"
    base = ["train", "--data", str(phantom_dataset), "--kind", "3d", "--device", "cpu", *TINY]
    assert training_main(base + ["--out", str(run), "--iterations", "5"]) == 0
    out = tmp_path / "models"
    assert training_main(["export", "--run", str(run), "--out", str(out)]) == 0
    tuned = tmp_path / "tuned"
    assert training_main(base + ["--out", str(tuned), "--iterations", "1", "--lr", "1e-12",
                                 "--init-from", str(out / "aspects-3d")]) == 0
    start = models.load_model(out / "aspects-3d").nets["unet3d"].state_dict()
    import torch
    after = torch.load(tuned / "unet3d.pt", weights_only=True)
    for key, value in start.items():
        if value.dtype.is_floating_point and "running" not in key:
            assert torch.allclose(value, after[key], atol=1e-5), key
    logged = (tuned / "log.jsonl").read_text(encoding="utf-8")
    assert '"event": "initialised"' in logged
    planar = ["train", "--data", str(phantom_dataset), "--kind", "planar", "--device", "cpu", *TINY]
    assert training_main(planar + ["--out", str(tmp_path / "bad"), "--iterations", "1",
                                   "--init-from", str(out / "aspects-3d")]) == 2
