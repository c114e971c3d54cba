"""Model folders are validated before use and never execute code from a file (issue 6).

A model folder is data: ``model.json`` names an architecture the engine knows and gives
its arguments; the weights are plain tensors whose sha256 the card records. These tests
tamper with each part and check the folder is refused with a :class:`ModelError` (one
clear line and exit 2 from the CLI) -- and that a weights file carrying a pickled
payload is refused *without running it*, even when its sha256 has been written into the
card to match.
"""

from __future__ import annotations

import copy
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from BrainLobeSegLib import cli, models, regions
from BrainLobeSegLib.errors import EXIT_INPUT_ERROR, ModelError

from conftest import make_tiny_model
from test_robustness import head_image, write


@pytest.fixture()
def tiny3d(tmp_path) -> Path:
    """A fresh tiny 3D model folder each test may tamper with."""
    return make_tiny_model(tmp_path / "tiny-3d", "3d")


def read_json(folder: Path) -> dict:
    return json.loads((folder / models.CARD_NAME).read_text(encoding="utf-8"))


def write_json(folder: Path, data: dict) -> None:
    (folder / models.CARD_NAME).write_text(json.dumps(data), encoding="utf-8")


def refused(folder: Path, match: str) -> ModelError:
    with pytest.raises(ModelError) as info:
        models.load_model(folder)
    assert match.lower() in str(info.value).lower(), str(info.value)
    assert "\n" not in str(info.value) and info.value.hint
    return info.value


def test_the_untouched_folder_loads(tiny3d):
    """Control: every refusal below is caused by its own change."""
    loaded = models.load_model(tiny3d)
    assert set(loaded.nets) == {"unet3d"}


# --------------------------------------------------------------------------- weights

def test_tampered_weights_refused(tiny3d):
    wpath = tiny3d / "unet3d.pt"
    data = bytearray(wpath.read_bytes())
    data[len(data) // 2] ^= 0xFF
    wpath.write_bytes(bytes(data))
    refused(tiny3d, "does not match the sha256")


def test_weights_of_another_model_refused(tmp_path, tiny3d):
    """A weights file swapped for another (valid!) one is caught by the hash too."""
    other = make_tiny_model(tmp_path / "other", "3d", seed=1)
    (tiny3d / "unet3d.pt").write_bytes((other / "unet3d.pt").read_bytes())
    refused(tiny3d, "sha256")


def test_missing_weights_refused(tiny3d):
    (tiny3d / "unet3d.pt").unlink()
    refused(tiny3d, "missing")


@pytest.mark.parametrize("target", ["../outside.pt", "/etc/passwd", "sub/../../outside.pt"])
def test_weights_outside_the_folder_refused(tiny3d, target):
    (tiny3d.parent / "outside.pt").write_bytes((tiny3d / "unet3d.pt").read_bytes())
    card = read_json(tiny3d)
    card["networks"]["unet3d"]["file"] = target
    write_json(tiny3d, card)
    refused(tiny3d, "outside the model folder")


def test_symlinked_weights_outside_the_folder_refused(tiny3d):
    outside = tiny3d.parent / "outside.pt"
    os.replace(tiny3d / "unet3d.pt", outside)
    os.symlink(outside, tiny3d / "unet3d.pt")
    refused(tiny3d, "outside the model folder")


def update_sha(folder: Path) -> None:
    """What an attacker who can edit the folder would do: make the card match."""
    card = read_json(folder)
    card["networks"]["unet3d"]["sha256"] = models.sha256_of(folder / "unet3d.pt")
    write_json(folder, card)


class Payload:
    """Pickles to a call of ``exec`` that writes a marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.mark.parametrize("how", ["whole object", "inside a state_dict"])
def test_pickled_code_is_never_executed(tiny3d, tmp_path, monkeypatch, how):
    marker = tmp_path / "MARKER"
    wpath = tiny3d / "unet3d.pt"
    state = torch.load(wpath, weights_only=True)
    evil = Payload(marker) if how == "whole object" else {**state, "extra": Payload(marker)}
    torch.save(evil, wpath)
    update_sha(tiny3d)                      # the hash check alone no longer protects

    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)

    err = refused(tiny3d, "holds pickled objects")
    assert "refers to exec" in str(err)
    assert "weights_only" not in str(err), "never advise the user to load it unsafely"
    assert not marker.exists(), "loading the model executed code from the weights file"
    assert calls == [True], "weights must be loaded with torch.load(weights_only=True)"

    # control: the payload is live -- an unsafe load does run it
    monkeypatch.undo()
    torch.load(wpath, weights_only=False)
    assert marker.read_text(encoding="utf-8") == "code ran"


def test_pickled_code_refused_through_the_cli(tiny3d, tmp_path, capfd):
    marker = tmp_path / "MARKER"
    torch.save(Payload(marker), tiny3d / "unet3d.pt")
    update_sha(tiny3d)
    scan = write(head_image(), tmp_path / "case.nii.gz")
    out = tmp_path / "out"
    code = cli.main(["segment", str(scan), "-o", str(out), "--model", str(tiny3d), "--mode", "3d",
                     "--device", "cpu"])
    err = capfd.readouterr().err
    assert code == EXIT_INPUT_ERROR, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "holds pickled objects" in err
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir())


def test_wrong_shapes_with_matching_sha_refused(tmp_path, tiny3d):
    """A state_dict of plain tensors that does not fit the card's architecture."""
    other = make_tiny_model(tmp_path / "wider", "3d")
    card = read_json(other)
    card["architecture"]["args"]["base_features"] = 8
    net = models.build_network(card["architecture"]["name"], card["architecture"]["args"])
    torch.save(net.state_dict(), tiny3d / "unet3d.pt")
    update_sha(tiny3d)
    refused(tiny3d, "does not fit the architecture")


# --------------------------------------------------------------------------- the card

def mutate(path, value):
    """A card edit: set ``value`` at the key path (``None`` value with ``DELETE`` removes)."""
    def edit(card: dict) -> dict:
        node = card
        for key in path[:-1]:
            node = node[key]
        if value is DELETE:
            del node[path[-1]]
        else:
            node[path[-1]] = value
        return card
    return edit


DELETE = object()
_LABELS = regions.label_table()


def _swap_sides(card: dict) -> dict:
    for r in card["labels"]:
        r["side"] = "right" if r["side"] == "left" else "left"
    return card


CARD_CASES = [
    ("unknown architecture", mutate(["architecture", "name"], "ResNet9000"), "unknown architecture"),
    ("architecture name missing", mutate(["architecture", "name"], DELETE), "architecture"),
    ("architecture args not a dict", mutate(["architecture", "args"], [1, 2]), "architecture"),
    ("unknown argument", mutate(["architecture", "args", "dropout"], 0.5), "has no argument"),
    ("argument of wrong type", mutate(["architecture", "args", "depth"], "3"), "should be int"),
    ("depth out of range", mutate(["architecture", "args", "depth"], 1), "depth=1 is outside 2..8"),
    ("depth 1000", mutate(["architecture", "args", "depth"], 1000), "depth=1000 is outside"),
    ("negative features", mutate(["architecture", "args", "base_features"], -4), "base_features=-4"),
    ("10^6 features", mutate(["architecture", "args", "base_features"], 10**6), "is outside 1..256"),
    ("max_features 0", mutate(["architecture", "args", "max_features"], 0), "max_features=0"),
    ("patch [1, 1, 1]", mutate(["patch_size"], [1, 1, 1]), "patch_size must be null or three integers from 8"),
    ("spacing 10^6 mm", mutate(["spacing_mm"], [2.0, 2.0, 1e6]), "spacing_mm must be three numbers"),
    ("spacing 0.01 mm", mutate(["spacing_mm"], [0.01, 2.0, 2.0]), "spacing_mm"),
    ("wrong input channels", mutate(["architecture", "args", "in_channels"], 5), "channels"),
    ("wrong output channels", mutate(["architecture", "args", "num_classes"], 3), "channels"),
    ("label table: 19 regions", mutate(["labels"], _LABELS[:-1]), "label table"),
    ("label table: sides swapped", _swap_sides, "label table"),
    ("label table: not dicts", mutate(["labels"], ["C", "L"]), "label"),
    ("unknown kind", mutate(["kind"], "4d"), "kind"),
    ("wrong networks", mutate(["networks"], {"axial": {"file": "unet3d.pt", "sha256": "0"}}),
     "networks"),
    ("network entry without file", mutate(["networks", "unet3d", "file"], DELETE), "unet3d"),
    ("network entry not a dict", mutate(["networks", "unet3d"], "unet3d.pt"), "unet3d"),
    ("spacing negative", mutate(["spacing_mm"], [4.0, -4.0, 4.0]), "spacing"),
    ("spacing not numbers", mutate(["spacing_mm"], ["4", "4", "4"]), "spacing"),
    ("empty window", mutate(["intensity", "window"], [100, 100]), "window"),
    ("window of 3 numbers", mutate(["intensity", "window"], [0, 50, 100]), "window"),
    ("window missing", mutate(["intensity"], {}), "window"),
    ("context slices negative", mutate(["context_slices"], -2), "context_slices"),
    ("patch size of strings", mutate(["patch_size"], ["a", "b", "c"]), "patch_size"),
    ("format from the future", mutate(["format"], 99), "card format"),
    ("field missing", mutate(["labels"], DELETE), "labels"),
]


@pytest.mark.parametrize("name,edit,match", CARD_CASES, ids=[c[0] for c in CARD_CASES])
def test_invalid_card_refused(tiny3d, name, edit, match):
    write_json(tiny3d, edit(copy.deepcopy(read_json(tiny3d))))
    refused(tiny3d, match)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b"null", b'"model"', b'{"format": 1}', b"\x00\xff"])
def test_card_that_is_not_a_json_object_refused(tiny3d, data):
    (tiny3d / models.CARD_NAME).write_bytes(data)
    with pytest.raises(ModelError):
        models.load_model(tiny3d)


def test_no_card_refused(tiny3d):
    (tiny3d / models.CARD_NAME).unlink()
    refused(tiny3d, "not a model folder")


def test_invalid_model_through_the_cli(tiny3d, tmp_path, capfd):
    """One line, exit 2 and no output for a bad ``--model`` folder."""
    write_json(tiny3d, mutate(["architecture", "name"], "ResNet9000")(read_json(tiny3d)))
    scan = write(head_image(), tmp_path / "case.nii.gz")
    before = scan.read_bytes()
    out = tmp_path / "out"
    code = cli.main(["segment", str(scan), "-o", str(out), "--model", str(tiny3d), "--mode", "3d",
                     "--device", "cpu"])
    err = capfd.readouterr().err
    assert code == EXIT_INPUT_ERROR
    assert err.startswith("brainlobeseg: error: ") and len(err.strip().splitlines()) == 1, err
    assert "unknown architecture" in err
    assert scan.read_bytes() == before
    assert not out.exists() or not any(out.iterdir())


def test_model_files_are_readable_by_others(tmp_path):
    """An exported model is shipped in an extension other users load: the card must
    not be created private (0600) by the temporary-file mechanism."""
    old = os.umask(0o022)
    try:
        folder = make_tiny_model(tmp_path / "m", "3d")
    finally:
        os.umask(old)
    for f in folder.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, (f.name, oct(f.stat().st_mode))


# --------------------------------------------------------------------------- issue 14: damaged weights

def test_nan_weights_refused(tiny3d):
    """NaN weights with a valid sha256 segmented nothing, silently."""
    state = torch.load(tiny3d / "unet3d.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key][0] = float("nan")
    torch.save(state, tiny3d / "unet3d.pt")
    update_sha(tiny3d)
    err = refused(tiny3d, "holds NaN or infinite weights")
    assert key in str(err)


@pytest.mark.parametrize("data", [b"", b"PK\x03\x04 cut", b"\x80\x02garbage"])
def test_corrupt_weights_are_not_called_pickled(tiny3d, data):
    (tiny3d / "unet3d.pt").write_bytes(data)
    update_sha(tiny3d)
    err = refused(tiny3d, "is not a readable weights file")
    assert "pickled" not in str(err) and "weights_only" not in str(err)


def test_deeply_nested_card_refused(tiny3d):
    (tiny3d / models.CARD_NAME).write_text("[" * 100000 + "]" * 100000, encoding="utf-8")
    refused(tiny3d, "nested too deeply")


def test_absurd_card_through_the_cli(tiny3d, tmp_path, capfd):
    """Depth 1000 was an internal error; now one line, exit 2, nothing written."""
    write_json(tiny3d, mutate(["architecture", "args", "depth"], 1000)(read_json(tiny3d)))
    scan = write(head_image(), tmp_path / "case.nii.gz")
    out = tmp_path / "out"
    code = cli.main(["segment", str(scan), "-o", str(out), "--model", str(tiny3d), "--mode", "3d",
                     "--device", "cpu"])
    lines = capfd.readouterr().err.strip().splitlines()
    assert code == EXIT_INPUT_ERROR and len(lines) == 1, lines
    assert lines[0].startswith("brainlobeseg: error: ") and "depth=1000 is outside" in lines[0]
    assert not out.exists() or not any(out.iterdir())
