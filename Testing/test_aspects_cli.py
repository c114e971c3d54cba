"""``brainlobeseg stats``'s ASPECTS read-out (issue 16, command line).

The phantom's own labels are given with ``--labels`` (no inference, seconds per run); one
region's parenchyma (its voxels of 20-50 HU) is lowered by 8 HU, as early ischaemic
oedema would, so the engine (:mod:`aspects`) calls it and that side scores 9.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import aspects, aspects_preview, cli, models, phantom, regions, transforms
from BrainLobeSegLib.errors import EXIT_INPUT_ERROR

M2_LEFT = regions.region("M2", "left")
READ_OUT = ("low-aspects-score.json", "low-aspects-evidence.nii.gz", "low-aspects-score.png")
STATS = ("low-stats.csv", "low-stats.json")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def case() -> phantom.PhantomCase:
    """The tilted phantom of test_statistics (its normal read-out calls no region)."""
    return phantom.make_scan(size=(96, 96, 48), spacing=(2.0, 2.0, 3.0), angles_deg=(8.0, -5.0, 6.0), seed=4)


def lowered(case: phantom.PhantomCase, label: int, delta_hu: float = -8.0) -> sitk.Image:
    """The CT with ``delta_hu`` added to the parenchyma (20-50 HU) of one region."""
    arr = sitk.GetArrayFromImage(case.ct).astype(np.float32)
    arr[(sitk.GetArrayViewFromImage(case.labels_scan) == label) & (arr >= 20) & (arr <= 50)] += delta_hu
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(case.ct)
    return img


@pytest.fixture(scope="module")
def files(tmp_path_factory, case) -> Dict[str, Path]:
    d = tmp_path_factory.mktemp("aspects-cli")
    paths = {"low": d / "low.nii.gz", "labels": d / "labels.nii.gz", "tf": d / "low.txt"}
    sitk.WriteImage(lowered(case, M2_LEFT.label), str(paths["low"]))
    sitk.WriteImage(case.labels_scan, str(paths["labels"]))
    transforms.write_transform(str(paths["tf"]), case.transform)
    return paths


def run(args: List[str], capsys) -> Tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(path: Path) -> dict:
    """The file parsed as JSON that has no NaN or Infinity (which are not JSON)."""
    def refuse(constant: str):
        raise AssertionError(f"{path.name} holds {constant}")
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


def names(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- the picture

def test_region_panel_draws_only_the_final_calls_red():
    labels = np.zeros((40, 60), np.uint8)
    labels[10:30, 5:25] = M2_LEFT.label
    labels[10:30, 35:55] = M2_LEFT.mirror_label
    hu = np.full(labels.shape, 30.0, np.float32)

    def red(affected: List[int]) -> np.ndarray:
        panel = aspects_preview.region_panel(hu, labels, affected, level_hu=30.0)
        return np.all(panel == aspects_preview.WARNING_COLOUR, axis=-1)
    assert not red([]).any()
    marked = red([M2_LEFT.label])
    border = aspects_preview.outline(labels == M2_LEFT.label, aspects_preview.AFFECTED_OUTLINE_PX)
    assert border.sum() == 20 * 20 - 14 * 14
    assert marked[border].mean() > 0.75     # the rest is under the code written on it (M2)
    assert not marked[~border].any()


def test_an_override_changes_the_picture(case):
    img = lowered(case, M2_LEFT.label)
    result = aspects.assess(img, case.labels_scan, with_evidence_map=False)

    def red_pixels() -> int:
        picture = aspects_preview.aspects_picture(img, case.labels_scan, result)
        return int(np.all(picture == aspects_preview.WARNING_COLOUR, axis=-1).sum())
    called = red_pixels()
    result.set_override(M2_LEFT.label, False)
    assert red_pixels() == (7 * 2) ** 2 < called     # only the key's swatch is left
    assert "left: none" in aspects_preview.affected_line(result)
    assert aspects_preview.score_line(result).startswith("ASPECTS left 10, right 10 (symptomatic side left: ")
