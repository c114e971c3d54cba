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
    card = models.read_card(out / "run-3d")      # named after the run folder, not the bundled model
    assert (card.name, card.version) == ("run-3d", "0.1.0")
    assert card.training["train_cases"] == 3 and card.networks["unet3d"]["sha256"]
    seg = inference.Segmenter("ensemble", out, "cpu")
    case = phantom.make_scan(size=(72, 72, 36), spacing=(3.0, 3.0, 5.0), angles_deg=(4, 4, 4), seed=9)
    result = seg.segment(case.ct, case.transform)
    assert result.labels_scan.GetSize() == case.ct.GetSize()
    assert result.model_names == ["run-planar", "run-3d"]


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
                                 "--init-from", str(out / "run-3d")]) == 0
    start = models.load_model(out / "run-3d").nets["unet3d"].state_dict()
    import torch
    after = torch.load(tuned / "unet3d.pt", weights_only=True)
    for key, value in start.items():
        if value.dtype.is_floating_point and "running" not in key:
            assert torch.allclose(value, after[key], atol=1e-5), key
    logged = (tuned / "log.jsonl").read_text(encoding="utf-8")
    assert '"event": "initialised"' in logged
    # resumed from its checkpoint without --init-from, the run still records where it began
    assert training_main(base + ["--out", str(tuned), "--iterations", "3", "--checkpoint-every", "1",
                                 "--resume"]) == 0
    config = json.loads((tuned / "config.json").read_text(encoding="utf-8"))
    assert config["kinds"]["3d"]["initialised_from"] == str(out / "run-3d")
    # ... also when the first start was stopped before it wrote config.json (the log has it)
    (tuned / "config.json").unlink()
    assert training_main(base + ["--out", str(tuned), "--iterations", "4", "--checkpoint-every", "1",
                                 "--resume"]) == 0
    config = json.loads((tuned / "config.json").read_text(encoding="utf-8"))
    assert config["kinds"]["3d"]["initialised_from"] == str(out / "run-3d")
    planar = ["train", "--data", str(phantom_dataset), "--kind", "planar", "--device", "cpu", *TINY]
    assert training_main(planar + ["--out", str(tmp_path / "bad"), "--iterations", "1",
                                   "--init-from", str(out / "run-3d")]) == 2


def _tree(folder: Path) -> dict:
    """Every file of a folder with its bytes, to show that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_earlier_run_is_refused_unless_resume_or_overwrite(phantom_dataset, tmp_path, capsys):
    """Training into a run folder again without --resume used to replace its weights and
    config.json silently; now it is refused with one line naming both ways out, and the
    folder is left byte for byte. --overwrite starts again: a fresh log, new weights, and
    stdout has a human line per logged step with the time left (the network's and the
    run's) and a closing line with the next command, no JSON (that stays in log.jsonl)."""
    run = tmp_path / "run"
    args = ["train", "--data", str(phantom_dataset), "--out", str(run), "--kind", "3d", "--device", "cpu",
            *TINY, "--iterations", "1"]
    assert training_main(args) == 0
    before = _tree(run)
    capsys.readouterr()
    assert training_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a training run" in err[0]
    assert "--resume" in err[0] and "--overwrite" in err[0]
    assert _tree(run) == before
    assert training_main(args + ["--resume", "--overwrite"]) == 2
    assert training_main(args + ["--overwrite", "--seed", "3", "--iterations", "2", "--log-every", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "removed the earlier run's" in out[0]
    log = [json.loads(x) for x in (run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len([e for e in log if e.get("event") == "start"]) == 1
    assert [e["iteration"] for e in log if e.get("network") == "unet3d" and "loss" in e] == [1, 2]
    assert (run / "unet3d.pt").read_bytes() != before["unet3d.pt"]
    progress = [line for line in out if line.startswith("unet3d (1/1): iteration")]
    assert len(progress) == 2 and all("ETA" in line and "for the run" in line for line in progress)
    assert not [line for line in out if line.lstrip().startswith("{")]
    assert out[-1].startswith("done in ") and f"python -m training export --run {run}" in out[-1]


def test_a_failed_run_leaves_no_run_folder(tmp_path, capsys):
    """A dataset without labels stops the run with one line (exit 2) and the run folder
    it had created is gone; a non-empty folder that is no run is refused untouched."""
    unlabelled = tmp_path / "scans"
    case = phantom.make_scan(size=(40, 40, 20), spacing=(5.0, 5.0, 8.0), seed=1)
    from BrainLobeSegLib import dataset
    dataset.write_case(unlabelled, case.ct, None, transform=case.transform, name="1")
    run = tmp_path / "runs" / "new"
    assert training_main(["train", "--data", str(unlabelled), "--out", str(run), "--kind", "3d",
                          "--device", "cpu", "--iterations", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert "no labelled cases to train on" in err and "Traceback" not in err
    assert not run.exists()
    assert training_main(["train", "--data", str(unlabelled), "--out", str(unlabelled), "--kind", "3d",
                          "--device", "cpu", "--iterations", "1", *TINY]) == 2
    assert "is not empty and holds no training run" in capsys.readouterr().err
    assert sorted(p.name for p in unlabelled.iterdir()) == ["1.nii.gz", "1.txt"]


@pytest.fixture(scope="module")
def run_3d(phantom_dataset, tmp_path_factory) -> Path:
    """A real run folder of a 3D-only training (one iteration)."""
    run = tmp_path_factory.mktemp("runs") / "mine"
    assert training_main(["train", "--data", str(phantom_dataset), "--out", str(run), "--kind", "3d",
                          "--device", "cpu", "--iterations", "1", *TINY]) == 0
    return run


def test_export_of_a_3d_run_exports_what_it_has(run_3d, tmp_path, capsys):
    """The README's `train --kind 3d` then `export` used to end in KeyError: 'planar'."""
    out = tmp_path / "my-models"
    capsys.readouterr()
    assert training_main(["export", "--run", str(run_3d), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped planar: the run did not train it" in printed
    assert sorted(p.name for p in out.iterdir()) == ["mine-3d"]
    models.load_model(out / "mine-3d")


def test_export_needs_out_and_leaves_the_bundled_models_alone(run_3d, tmp_path, capsys, monkeypatch):
    """No --out is a usage error; the bundled folder and a bundled model's name and version
    need --allow-bundled; an existing model folder needs --overwrite. Every refusal is one
    line, exit 2, and writes nothing."""
    bundled = tmp_path / "bundled"
    from conftest import make_tiny_model
    make_tiny_model(bundled / "tiny-3d", "3d")
    monkeypatch.setenv(models.MODELS_ENV, str(bundled))
    before = _tree(bundled)
    with pytest.raises(SystemExit) as exc:
        training_main(["export", "--run", str(run_3d)])
    assert exc.value.code == 2 and "--out" in capsys.readouterr().err

    def refused(args, words):
        assert training_main(["export", "--run", str(run_3d), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err
        assert _tree(bundled) == before

    refused(["--out", str(bundled)], ["bundled models' folder", "--allow-bundled"])
    other = tmp_path / "other"
    refused(["--out", str(other), "--name-prefix", "tiny", "--version", "0.0.test"],
            ["tiny-3d 0.0.test is the name and version of a bundled model", "--allow-bundled"])
    assert not other.exists()
    assert training_main(["export", "--run", str(run_3d), "--out", str(other), "--name-prefix", "tiny"]) == 0
    refused(["--out", str(other), "--name-prefix", "tiny"], ["already exists", "--overwrite"])
    assert training_main(["export", "--run", str(run_3d), "--out", str(other), "--name-prefix", "tiny",
                          "--overwrite"]) == 0
    assert training_main(["export", "--run", str(run_3d), "--out", str(bundled), "--allow-bundled"]) == 0
    assert sorted(p.name for p in bundled.iterdir()) == ["mine-3d", "tiny-3d"]
