"""The dataset layout (docs/DESIGN.md section 2): listing, reading with checks, atomic writing."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import dataset, phantom, transforms
from BrainLobeSegLib.errors import InputError


@pytest.fixture(scope="module")
def case():
    return phantom.make_scan(size=(40, 48, 24), spacing=(4.0, 4.0, 6.0), angles_deg=(6.0, -4.0, 9.0), seed=2)


def _image(array: np.ndarray, spacing=(4.0, 4.0, 6.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _tiny_ct() -> sitk.Image:
    return _image(np.full((4, 5, 6), 30, np.int16))


def _assert_helpful(exc: InputError, *words: str) -> None:
    """One line, a problem and a hint, and the words that say what is wrong."""
    text = str(exc)
    assert "\n" not in text and exc.problem and exc.hint, text
    for w in words:
        assert w.lower() in text.lower(), (w, text)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") or "partial" in p.name]


# ----------------------------------------------------------------------------- round trip

def test_write_then_read_round_trip(tmp_path, case):
    written = dataset.write_case(tmp_path, case.ct, case.labels_upright, transform=case.transform)
    assert written.name == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1-seg.nii.gz", "1.nii.gz", "1.txt"]
    (listed,) = dataset.list_cases(tmp_path)
    assert listed == written
    ct, R, seg = dataset.read_case(listed)
    assert np.array_equal(sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(case.ct))
    assert ct.GetPixelID() == sitk.sitkInt16 and seg.GetPixelID() == sitk.sitkUInt8
    assert np.array_equal(sitk.GetArrayViewFromImage(seg), sitk.GetArrayViewFromImage(case.labels_upright))
    assert np.array_equal(transforms.matrix_of(R), transforms.matrix_of(case.transform))
    assert seg.GetOrigin() == ct.GetOrigin() and seg.GetSpacing() == ct.GetSpacing()
    _, R_inv, _ = dataset.read_case(listed, invert_transform=True)
    assert np.allclose(transforms.matrix_of(R_inv) @ transforms.matrix_of(case.transform), np.eye(4), atol=1e-9)
    second = dataset.write_case(tmp_path, case.ct, None)
    assert second.name == "2" and second.seg_path is None and second.transform_path is None
    ct2, R2, seg2 = dataset.read_case(dataset.list_cases(tmp_path)[1])
    assert seg2 is None and np.array_equal(transforms.matrix_of(R2), np.eye(4))
    assert _no_temp_files(tmp_path)


def test_float_labels_with_integer_values_are_accepted(tmp_path):
    ct = _tiny_ct()
    lab = _image(np.where(np.arange(120).reshape(4, 5, 6) % 3 == 0, 20.0, 0.0).astype(np.float32))
    sitk.WriteImage(ct, str(tmp_path / "1.nii.gz"))
    sitk.WriteImage(lab, str(tmp_path / "1-seg.nii"))
    (c,) = dataset.list_cases(tmp_path)
    assert c.seg_path.name == "1-seg.nii"
    _, _, seg = dataset.read_case(c)
    assert seg.GetPixelID() == sitk.sitkUInt8 and sitk.GetArrayViewFromImage(seg).max() == 20


def test_natural_sorting_and_next_name(tmp_path):
    for name in ("10", "2", "1", "3", "b2", "b10"):
        sitk.WriteImage(_tiny_ct(), str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "7-seg.nii.gz").write_bytes(b"")   # orphan labels: not a case, but a used number
    (tmp_path / ".partial-x.nii.gz").write_bytes(b"")
    (tmp_path / "notes.md").write_text("x", encoding="utf-8")
    assert [c.name for c in dataset.list_cases(tmp_path)] == ["1", "2", "3", "10", "b2", "b10"]
    assert dataset.next_case_name(tmp_path) == "11"
    assert dataset.next_case_name(tmp_path / "missing") == "1"
    (tmp_path / "12.txt").write_text("", encoding="utf-8")
    assert dataset.next_case_name(tmp_path) == "13"


# ----------------------------------------------------------------------------- listing errors

def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(InputError) as exc:
        dataset.list_cases(tmp_path / "nope")
    _assert_helpful(exc.value, "not found")
    with pytest.raises(InputError) as exc:
        dataset.list_cases(tmp_path)
    _assert_helpful(exc.value, "no cases")
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    with pytest.raises(InputError) as exc:
        dataset.list_cases(tmp_path / "a.txt")
    _assert_helpful(exc.value, "not a dataset folder")


def test_two_images_for_one_case_are_refused(tmp_path):
    sitk.WriteImage(_tiny_ct(), str(tmp_path / "1.nii.gz"))
    sitk.WriteImage(_tiny_ct(), str(tmp_path / "1.nii"))
    with pytest.raises(InputError) as exc:
        dataset.list_cases(tmp_path)
    _assert_helpful(exc.value, "case 1", "1.nii.gz", "1.nii")


# ----------------------------------------------------------------------------- reading errors

def _case_with_seg(folder: Path, seg: sitk.Image, ct: sitk.Image = None) -> dataset.Case:
    sitk.WriteImage(ct if ct is not None else _tiny_ct(), str(folder / "1.nii.gz"))
    sitk.WriteImage(seg, str(folder / "1-seg.nii.gz"))
    return dataset.list_cases(folder)[0]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(InputError) as exc:
        dataset.read_case(dataset.Case("9", tmp_path / "9.nii.gz"))
    _assert_helpful(exc.value, "not found", "9.nii.gz")
    (tmp_path / "1.nii.gz").write_bytes(b"")
    with pytest.raises(InputError) as exc:
        dataset.read_case(dataset.list_cases(tmp_path)[0])
    _assert_helpful(exc.value, "empty")
    sitk.WriteImage(_tiny_ct(), str(tmp_path / "2.nii.gz"))
    (tmp_path / "2-seg.nii.gz").write_bytes(b"")
    with pytest.raises(InputError) as exc:
        dataset.read_case(dataset.list_cases(tmp_path)[1])
    _assert_helpful(exc.value, "empty", "2-seg.nii.gz")
    (tmp_path / "2-seg.nii.gz").unlink()
    (tmp_path / "2.txt").write_text("", encoding="utf-8")
    with pytest.raises(InputError) as exc:
        dataset.read_case(dataset.list_cases(tmp_path)[1])
    _assert_helpful(exc.value, "empty", "2.txt")


def test_unreadable_file(tmp_path):
    (tmp_path / "1.nii.gz").write_bytes(gzip.compress(b"this is not a nifti file" * 40))
    with pytest.raises(InputError) as exc:
        dataset.read_case(dataset.list_cases(tmp_path)[0])
    _assert_helpful(exc.value, "1.nii.gz")


def test_unknown_label_values_are_named(tmp_path):
    arr = np.zeros((4, 5, 6), np.int16)
    arr[0, 0, :3] = [25, 200, -3]
    with pytest.raises(InputError) as exc:
        dataset.read_case(_case_with_seg(tmp_path, _image(arr)))
    _assert_helpful(exc.value, "-3", "25", "200", "0..20")


def test_fractional_label_values_are_named(tmp_path):
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 1, 1] = 0.5
    with pytest.raises(InputError) as exc:
        dataset.read_case(_case_with_seg(tmp_path, _image(arr)))
    _assert_helpful(exc.value, "0.5")


@pytest.mark.parametrize("what, seg", [
    ("size", lambda: _image(np.zeros((4, 5, 7), np.uint8))),
    ("spacing", lambda: _image(np.zeros((4, 5, 6), np.uint8), spacing=(4.0, 4.0, 5.0))),
    ("origin", lambda: _image(np.zeros((4, 5, 6), np.uint8), origin=(0.0, 3.0, 0.0))),
    ("direction", lambda: sitk.Flip(_image(np.zeros((4, 5, 6), np.uint8)), [True, False, False], True)),
])
def test_label_grid_mismatch_names_what_differs(tmp_path, what, seg):
    image = seg()
    if what == "direction":
        image.SetOrigin((0.0, 0.0, 0.0))
        image.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InputError) as exc:
        dataset.read_case(_case_with_seg(tmp_path, image))
    _assert_helpful(exc.value, what, "grid")


def test_truncated_gzip_is_refused(tmp_path, case):
    good = tmp_path / "good.nii.gz"
    sitk.WriteImage(case.ct, str(good))
    dataset.check_gzip_complete(str(good))          # a whole file passes
    data = good.read_bytes()
    cut = tmp_path / "1.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    assert sitk.ReadImage(str(cut)).GetSize() == case.ct.GetSize()   # ITK does not notice
    with pytest.raises(InputError) as exc:
        dataset.check_gzip_complete(str(cut))
    _assert_helpful(exc.value, "truncated")
    with pytest.raises(InputError) as exc:
        dataset.read_case(dataset.list_cases(tmp_path)[0])
    _assert_helpful(exc.value, "truncated")
    good.unlink()
    # a cut label file too
    sitk.WriteImage(case.ct, str(cut))
    sitk.WriteImage(case.labels_upright, str(tmp_path / "seg.nii.gz"))
    seg_bytes = (tmp_path / "seg.nii.gz").read_bytes()
    (tmp_path / "1-seg.nii.gz").write_bytes(seg_bytes[: len(seg_bytes) // 2])
    (tmp_path / "seg.nii.gz").unlink()
    with pytest.raises(InputError) as exc:
        dataset.read_case(dataset.list_cases(tmp_path)[0])
    _assert_helpful(exc.value, "1-seg.nii.gz", "truncated")


def test_non_3d_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.int16)), str(tmp_path / "1.nii.gz"))
    with pytest.raises(InputError) as exc:
        dataset.read_case(dataset.list_cases(tmp_path)[0])
    _assert_helpful(exc.value, "2D", "3D")
    four = sitk.JoinSeries([_tiny_ct(), _tiny_ct()])
    sitk.WriteImage(four, str(tmp_path / "1.nii.gz"))
    with pytest.raises(InputError) as exc:
        dataset.read_case(dataset.list_cases(tmp_path)[0])
    _assert_helpful(exc.value, "4D")


# ----------------------------------------------------------------------------- writing

def test_existing_case_is_not_overwritten_unless_asked(tmp_path, case):
    dataset.write_case(tmp_path, case.ct, case.labels_upright, transform=case.transform, name="5")
    before = (tmp_path / "5.nii.gz").read_bytes()
    with pytest.raises(InputError) as exc:
        dataset.write_case(tmp_path, case.ct, None, name="5")
    _assert_helpful(exc.value, "already exists")
    assert (tmp_path / "5.nii.gz").read_bytes() == before and (tmp_path / "5.txt").exists()
    dataset.write_case(tmp_path, case.ct, case.labels_upright, transform=None, name="5", overwrite=True)
    # the old transform must not stay behind to be paired with the new scan
    assert sorted(p.name for p in tmp_path.iterdir()) == ["5-seg.nii.gz", "5.nii.gz"]
    assert _no_temp_files(tmp_path)


def test_interrupted_write_leaves_nothing(tmp_path, case, monkeypatch):
    real = sitk.WriteImage
    calls = []

    def failing(image, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:           # labels written, then the scan fails (disk full)
            Path(path).write_bytes(b"half")
            raise RuntimeError("No space left on device")
        return real(image, path, *args, **kwargs)

    monkeypatch.setattr(sitk, "WriteImage", failing)
    with pytest.raises(OSError, match="No space left on device"):   # the CLI's "no space left"
        dataset.write_case(tmp_path, case.ct, case.labels_upright, transform=case.transform)
    assert list(tmp_path.iterdir()) == []
    assert all(Path(p).name.startswith(".partial-") for p in calls)


def test_bad_inputs_are_refused_before_writing(tmp_path, case):
    bad = sitk.Image(case.labels_upright)
    bad.SetOrigin((1.0, 2.0, 3.0))
    with pytest.raises(InputError) as exc:
        dataset.write_case(tmp_path, case.ct, bad)
    _assert_helpful(exc.value, "origin")
    arr = sitk.GetArrayFromImage(case.labels_upright)
    arr[0, 0, 0] = 21
    wrong = sitk.GetImageFromArray(arr)
    wrong.CopyInformation(case.ct)
    with pytest.raises(InputError) as exc:
        dataset.write_case(tmp_path, case.ct, wrong)
    _assert_helpful(exc.value, "21")
    for name in ("../x", "3-seg", "4.nii.gz", ""):
        with pytest.raises(InputError):
            dataset.write_case(tmp_path, case.ct, None, name=name)
    assert list(tmp_path.iterdir()) == []


def test_labels_are_written_as_uint8(tmp_path, case):
    seg16 = sitk.Cast(case.labels_upright, sitk.sitkInt16)
    written = dataset.write_case(tmp_path, case.ct, seg16)
    assert sitk.ReadImage(str(written.seg_path)).GetPixelID() == sitk.sitkUInt8
    assert oct(os.stat(written.image_path).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode
