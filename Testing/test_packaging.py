"""A wheel (``pip install .``, not editable) must carry the bundled models.

The models live in the extension's ``Resources/Models``, outside the Python package;
without the mapping in pyproject.toml a plain install segments nothing ("no model
found"). This builds the wheel, unpacks it away from the source tree and asks the
engine, in a fresh interpreter, where its bundled models are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from BrainLobeSegLib import aspects_card, models, reference

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    # build from a clean copy: setuptools reuses a stale build/ folder of the checkout
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE", "BrainLobeSeg", "training"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.egg-info", "reports"))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    str(src), "-w", str(out)], check=True, capture_output=True, cwd=out)
    (found,) = out.glob("brainlobeseg-*.whl")
    return found


def test_wheel_carries_every_bundled_model_file(wheel):
    source = ROOT / "BrainLobeSeg" / "Resources" / "Models"
    expected = {f"BrainLobeSegLib/bundled_models/{p.relative_to(source).as_posix()}"
                for p in source.glob("*/*") if p.suffix in (".json", ".pt")}
    assert expected, "no bundled models in the source tree"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert expected <= names, sorted(expected - names)


def test_wheel_carries_the_reference_head_and_its_licence(wheel):
    source = ROOT / "BrainLobeSeg" / "Resources" / "Atlas"
    expected = {f"BrainLobeSegLib/bundled_atlas/{p.name}" for p in source.iterdir()}
    assert {f"BrainLobeSegLib/bundled_atlas/{n}" for n in
            (reference.TEMPLATE_FILE, reference.LICENSE_FILE, reference.SOURCE_FILE)} <= expected
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert expected <= names, sorted(expected - names)


def test_installed_wheel_finds_its_models(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = ("import json; from BrainLobeSegLib import aspects_card, models, reference; "
            "reference.upright_template(); "
            "print(json.dumps([aspects_card.load_card().source, str(models.bundled_models_dir())] + "
            "[str(p) for p in models.find_models('ensemble')]))")
    env = {k: v for k, v in os.environ.items() if k != models.MODELS_ENV}
    env["PYTHONPATH"] = str(site)   # ahead of the editable install of the source tree
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, check=True)
    card, root, *found = (Path(p) for p in json.loads(out.stdout))
    assert card == site / "BrainLobeSegLib" / "bundled_aspects" / aspects_card.CARD_FILE   # the ASPECTS card
    assert root == site / "BrainLobeSegLib" / "bundled_models"
    assert [models.read_card(f).kind for f in found] == ["planar", "3d"]
    assert all(f.parent == root for f in found)
