"""The command line as a researcher meets it (issue 15): one JSON document, quiet on a
closed pipe, warnings that are printed and recorded, several inputs per call, previews,
uncertainty, help texts. Every test goes through the command (exit status, message,
files), with the tiny real models of ``conftest.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from BrainLobeSegLib import cli
from BrainLobeSegLib.console import EXIT_CLOSED_PIPE

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    [str(ROOT / "BrainLobeSeg"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_cli(args: List[str], capsys) -> Tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_models_json_is_one_document(tiny_models, capsys):
    code, out, err = run_cli(["models", "--model", str(tiny_models), "--json"], capsys)
    assert code == 0 and err == ""
    cards = json.loads(out)                       # the whole output parses as one document
    assert [c["name"] for c in cards] == ["tiny-3d", "tiny-planar"]
    assert all(Path(c["folder"]).is_dir() and c["networks"] for c in cards)


def test_models_json_without_models_is_an_empty_list(tmp_path, capsys):
    code, out, err = run_cli(["models", "--model", str(tmp_path), "--json"], capsys)
    assert code == cli.EXIT_NO_MODELS and json.loads(out) == [] and "no models in" in err


@pytest.mark.parametrize("command", [
    ["-m", "BrainLobeSegLib.cli", "models", "--model", "{models}"],
    ["-m", "BrainLobeSegLib.cli", "models", "--model", "{models}", "--json"],
    ["-m", "BrainLobeSegLib.cli", "segment", "--help"],
    ["-m", "training", "export", "--help"],
], ids=["models", "models-json", "segment-help", "training-help"])
def test_a_closed_pipe_ends_quietly(command, tiny_models):
    """`brainlobeseg models | head -1` used to end in "internal error: BrokenPipeError".
    Here the reading end is closed before the command writes: no traceback, no error
    line, exit 141 (a shell's status for a command stopped by a closed pipe) or 0 where
    Python never saw the pipe break (argparse's help is written at exit)."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable] + [a.format(models=tiny_models) for a in command],
                              stdout=write, stderr=subprocess.PIPE, text=True, env=ENV, timeout=120)
    finally:
        os.close(write)
    assert proc.stderr == "" and proc.returncode in (0, EXIT_CLOSED_PIPE), proc.stderr
    if "models" in command:
        assert proc.returncode == EXIT_CLOSED_PIPE


# --------------------------------------------------------------------------- --force on a non-CT

def test_force_on_a_non_ct_warns_and_records_it(tmp_path, tiny_models, capsys):
    """`--force` keeps a non-CT segmentable, but no longer silently: one warning line on
    stderr, and the warning travels with the results (`<case>-warnings.txt` for segment,
    `warnings` in the stats JSON)."""
    from test_robustness import mr_like, write
    scan = write(mr_like(), tmp_path / "mr.nii.gz")
    out = tmp_path / "out"
    code, _, err = run_cli(["segment", str(scan), "--assume-upright", "--force", "--model",
                            str(tiny_models), "-o", str(out)], capsys)
    assert code == 0
    lines = [ln for ln in err.splitlines() if ln.startswith("brainlobeseg: warning: mr:")]
    assert len(lines) == 1 and "does not look like a CT" in lines[0] and "--force" in lines[0]
    recorded = (out / "mr-warnings.txt").read_text(encoding="utf-8")
    assert "does not look like a CT" in recorded and "regions are likely meaningless" in recorded
    code, _, err = run_cli(["stats", str(scan), "--assume-upright", "--force", "--mode", "3d",
                            "--model", str(tiny_models), "-o", str(tmp_path / "stats")], capsys)
    assert code == 0 and "does not look like a CT" in err
    report = json.loads((tmp_path / "stats" / "mr-stats.json").read_text(encoding="utf-8"))
    assert any("does not look like a CT" in w for w in report["warnings"])


def test_a_ct_gets_no_warnings_file(tmp_path, tiny_models, capsys):
    from test_robustness import head_image, write
    scan = write(head_image(), tmp_path / "ct.nii.gz")
    code, _, err = run_cli(["segment", str(scan), "--assume-upright", "--mode", "3d", "--model",
                            str(tiny_models), "-o", str(tmp_path / "out")], capsys)
    assert code == 0 and "warning" not in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(cli.output_names("ct"))
