"""Robustness of the engine's readers and checks (issue 6), below the CLI.

Each test feeds one kind of bad input (a cut file, a 4D series, an MR volume, a singular
transform...) to the function that must catch it and checks that it raises
:class:`InputError` with a message naming the problem, that nothing else escapes, and
that the input file is left as it was. The same cases end to end through the CLI are in
``test_cli_errors.py``.

The helpers at the top (a synthetic head CT, file hashes, output-folder checks) are
shared with the other robustness suites, which import them from here: the images are
kept small (48x48x24 at 4.5 x 4.5 x 5 mm, above the minimum size checks) so that the
whole robustness suite stays fast on a 2-core CPU.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLobeSegLib import imageio, transforms
from BrainLobeSegLib.errors import InputError, InputWarning

SIZE = (48, 48, 24)            # x, y, z voxels
SPACING = (4.5, 4.5, 5.0)      # mm: 216 x 216 x 120 mm, a whole head, 5 mm slices
ITKSNAP_HEADER = ("#Insight Transform File V1.0\n#Transform 0\n"
                  "Transform: MatrixOffsetTransformBase_double_3_3\n")


# --------------------------------------------------------------------------- helpers

def head_array(size: Sequence[int] = SIZE, spacing: Sequence[float] = SPACING,
               seed: int = 0, scale: float = 0.6) -> np.ndarray:
    """A head-like HU volume ``(z, y, x)`` int16: air -1000, an ellipsoid skull at
    ~1000 HU around brain at ~30 HU, with a little noise.

    Deliberately independent of :mod:`phantom`: these tests need a plausible CT that
    passes :func:`imageio.check_ct`, not anatomy, and must not break when the phantom
    changes. ``scale`` 0.6 makes a small head (about 96 x 114 x 66 mm) in the
    whole-head field of view: the engine's work (and so the suite's time) grows with
    the head's box, not with the scan.
    """
    nx, ny, nz = size
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip((nz, ny, nx), tuple(spacing)[::-1])]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    a, b, c = 80.0 * scale, 95.0 * scale, 55.0 * scale
    outer = (x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2
    inner = (x / (a - 7)) ** 2 + (y / (b - 7)) ** 2 + (z / (c - 6)) ** 2
    rng = np.random.default_rng(seed)
    arr = np.full(outer.shape, -1000.0)
    arr[outer <= 1] = 1000.0
    arr[inner <= 1] = 30.0
    arr += rng.normal(0.0, 5.0, arr.shape)
    return arr.astype(np.int16)


def head_image(size: Sequence[int] = SIZE, spacing: Sequence[float] = SPACING,
               direction: Optional[Sequence[float]] = None,
               origin: Sequence[float] = (-100.0, -110.0, -60.0), seed: int = 0) -> sitk.Image:
    """:func:`head_array` as a SimpleITK image with the given geometry."""
    img = sitk.GetImageFromArray(head_array(size, spacing, seed))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(o) for o in origin))
    if direction is not None:
        img.SetDirection(tuple(float(d) for d in direction))
    return img


def write(img: sitk.Image, path: Path, compress: bool = True) -> Path:
    sitk.WriteImage(img, str(path), useCompression=compress)
    return path


def itksnap_text(params: Sequence) -> str:
    """An ITK-SNAP transform file with the given 12 parameters (any text allowed)."""
    return (ITKSNAP_HEADER + "Parameters: " + " ".join(str(p) for p in params)
            + "\nFixedParameters: 0 0 0\n")


def rotation_matrix(angles_deg: Tuple[float, float, float]) -> np.ndarray:
    return transforms.matrix_of(transforms.rotation(angles_deg))[:3, :3]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_hashes(folder: Path) -> Dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (to prove inputs unchanged)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(outdir: Path) -> list:
    """Staging files or folders (``.partial-*``) left anywhere under ``outdir``."""
    outdir = Path(outdir)
    return [str(p) for p in outdir.rglob(".partial-*")] if outdir.exists() else []


def assert_nothing_written(outdir: Path) -> None:
    """After a refused input: no output file at all and no staging leftovers."""
    outdir = Path(outdir)
    assert leftovers(outdir) == []
    files = [p for p in outdir.rglob("*") if p.is_file()] if outdir.exists() else []
    assert files == [], f"refused input but files were written: {files}"


def cut_in_half(path: Path) -> Path:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return path


def raises_input_error(fn, *args, match: str, **kw) -> InputError:
    """Call ``fn`` and return the :class:`InputError` it must raise (message checked)."""
    with pytest.raises(InputError) as info:
        fn(*args, **kw)
    assert match.lower() in str(info.value).lower(), str(info.value)
    assert "\n" not in str(info.value), "the message must be one line"
    assert info.value.hint, "the message must say what to do"
    return info.value


# --------------------------------------------------------------------------- scan files

def test_head_helper_passes_every_check(tmp_path):
    """The base image of all cases below is accepted: each refusal is due to its defect."""
    for suffix in (".nii.gz", ".nii", ".nrrd"):
        path = write(head_image(), tmp_path / f"ok{suffix}")
        img = imageio.read_scan(str(path))
        imageio.check_ct(img)
        assert img.GetSize() == SIZE


def test_missing_scan(tmp_path):
    raises_input_error(imageio.read_scan, str(tmp_path / "nope.nii.gz"), match="not found")


def test_empty_scan(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.touch()
    raises_input_error(imageio.read_scan, str(path), match="empty")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_scan(tmp_path, suffix):
    """A file cut in half is refused. SimpleITK itself reads a cut ``.nii.gz`` *and* a
    cut ``.nii`` without error (half the voxels, then zeros): both need our checks."""
    path = cut_in_half(write(head_image(), tmp_path / f"cut{suffix}"))
    before = sha256(path)
    raises_input_error(imageio.read_scan, str(path), match="" if suffix in (".nrrd", ".mha") else "truncated")
    assert sha256(path) == before


def test_truncated_uncompressed_nifti_is_silently_zero_filled_by_simpleitk(tmp_path):
    """Why the length check exists: without it the cut file 'reads' fine."""
    path = cut_in_half(write(head_image(), tmp_path / "cut.nii", compress=False))
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert (arr[-3:] == 0).all()


def test_gzip_of_a_short_nifti_is_refused(tmp_path):
    """A complete gzip stream around a NIfTI whose data is short (a cut ``.nii`` that was
    compressed afterwards) passes the gzip check; the length check still catches it."""
    raw = cut_in_half(write(head_image(), tmp_path / "short.nii", compress=False)).read_bytes()
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(raw))
    raises_input_error(imageio.read_scan, str(path), match="truncated")


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".dcm"])
def test_corrupt_scan(tmp_path, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(np.random.default_rng(1).bytes(20_000))
    before = sha256(path)
    raises_input_error(imageio.read_scan, str(path), match="")
    assert sha256(path) == before


def test_corrupt_scan_reason_is_not_a_stray_errno(tmp_path):
    """ITK appends 'Reason: No such file or directory' (a stale errno) to its MetaImage
    errors; the user must not be told an existing file does not exist."""
    path = cut_in_half(write(head_image(), tmp_path / "cut.mha"))
    err = raises_input_error(imageio.read_scan, str(path), match="")
    assert "no such file" not in str(err).lower()


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not a scan", encoding="utf-8")
    raises_input_error(imageio.read_scan, str(tmp_path), match="DICOM")


# --------------------------------------------------------------------------- image checks

def test_2d_image(tmp_path):
    img = sitk.GetImageFromArray(head_array()[12])
    img.SetSpacing(SPACING[:2])
    path = write(img, tmp_path / "slice.nii.gz")
    raises_input_error(imageio.check_ct, imageio.read_scan(str(path)), match="2D")


def test_4d_image(tmp_path):
    frames = [head_image(seed=0), head_image(seed=1)]
    img = sitk.JoinSeries(frames)                               # x, y, z, t
    assert img.GetDimension() == 4
    path = write(img, tmp_path / "series.nii.gz")
    raises_input_error(imageio.check_ct, imageio.read_scan(str(path)), match="4D")


def test_vector_image(tmp_path):
    arr = np.stack([head_array()] * 3, axis=-1)                  # (z, y, x, 3)
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.SetSpacing(SPACING)
    path = write(img, tmp_path / "rgb.nii.gz")
    raises_input_error(imageio.check_ct, imageio.read_scan(str(path)), match="components")


def test_complex_image(tmp_path):
    img = sitk.GetImageFromArray(head_array().astype(np.complex64))
    img.SetSpacing(SPACING)
    path = write(img, tmp_path / "complex.nii.gz")
    raises_input_error(imageio.check_ct, imageio.read_scan(str(path)), match="complex")


def mr_like() -> sitk.Image:
    """An MR-like volume: a head with intensities 0..1000 (no air at -1000), in a tight
    field of view (an MR background of 0 is all "head" to the CT head finder, so a
    smaller image keeps the ``--force`` run quick)."""
    arr = head_array(size=(24, 28, 16)).astype(np.float32)
    arr = np.where(arr < -500, 0.0, np.where(arr > 500, 150.0, 800.0))
    img = sitk.GetImageFromArray(arr.astype(np.int16))
    img.SetSpacing(SPACING)
    return img


def test_not_ct_refused_unless_forced():
    err = raises_input_error(imageio.check_ct, mr_like(), match="does not look like a CT")
    assert "--force" in str(err)
    with pytest.warns(imageio.NotCTWarning, match="segmented anyway because of --force"):
        imageio.check_ct(mr_like(), force=True)     # possible, never silent


@pytest.mark.parametrize("size,spacing", [((6, 6, 6), (30.0, 30.0, 30.0)),    # too few voxels
                                          ((48, 48, 24), (0.5, 0.5, 0.5)),   # 24 x 24 x 12 mm
                                          ((48, 48, 1), (4.5, 4.5, 5.0))])   # a single slice
def test_tiny_volume(size, spacing):
    img = sitk.Image(list(size), sitk.sitkInt16)
    img.SetSpacing(spacing)
    raises_input_error(imageio.check_ct, img, match="too small")


def test_too_large_volume_guard(monkeypatch):
    """The RAM guard, on a small image with the limit lowered (nothing big allocated)."""
    img = head_image()
    monkeypatch.setattr(imageio, "MAX_VOXELS", int(np.prod(SIZE)) - 1)
    raises_input_error(imageio.check_ct, img, match="too large")


def huge_header(path: Path, dims=(30000, 30000, 30000)) -> Path:
    """A NIfTI made of a header alone that claims a 27 * 10^12-voxel (54 TB) volume."""
    small = write(head_image(), path.with_name("small.nii"), compress=False).read_bytes()
    header = bytearray(small[:352])
    struct.pack_into("<3h", header, 42, *dims)
    data = bytes(header)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_too_large_volume_refused_from_the_header(tmp_path, name):
    """Refused from the header, before a single voxel is allocated: without the guard
    ITK would try to allocate 54 TB (and fail with an allocation error at best)."""
    path = huge_header(tmp_path / name)
    raises_input_error(imageio.read_scan, str(path), match="too large")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_non_finite_values(tmp_path, bad, suffix):
    """NaN/inf voxels are refused, ``--force`` or not. SimpleITK's NIfTI reader turns
    them into 0 (soft tissue) on reading, so for NIfTI ``read_scan`` must catch them in
    the file; NRRD and MetaImage keep them and :func:`check_ct` catches them."""
    arr = head_array().astype(np.float32)
    arr[10, 20, 20] = bad
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    path = str(write(img, tmp_path / f"nan{suffix}"))
    if suffix.startswith(".nii"):
        raises_input_error(imageio.read_scan, path, match="1 NaN or infinite")
        return
    for force in (False, True):   # --force skips only the intensity check, never this one
        raises_input_error(imageio.check_ct, imageio.read_scan(path), force=force,
                           match="1 NaN or infinite")


def test_nifti_data_check_accepts_float_ct_with_extensions_and_big_endian(tmp_path):
    """The NIfTI data check must not refuse good files: float voxels, big-endian and a
    header extension (data offset beyond 352) all pass and read back unchanged."""
    arr = head_array().astype(np.float32)
    path = tmp_path / "be.nii"
    raw = write(sitk.GetImageFromArray(arr), path, compress=False).read_bytes()
    hdr = bytearray(raw[:348])
    # byte-swap every numeric field of the NIfTI-1 header (offset, struct format)
    for off, fmt in [(0, "i"), (32, "i"), (36, "h"), (40, "8h"), (56, "3f"), (68, "4h"),
                     (76, "8f"), (108, "3f"), (120, "h"), (124, "4f"), (140, "2i"),
                     (252, "2h"), (256, "6f"), (280, "12f")]:
        struct.pack_into(">" + fmt, hdr, off, *struct.unpack_from("<" + fmt, hdr, off))
    ext = b"\x01\x00\x00\x00" + struct.pack(">ii", 32, 0) + b"\0" * 24   # one 32-byte extension
    struct.pack_into(">f", hdr, 108, 352.0 + 32)
    path.write_bytes(bytes(hdr) + ext + arr.astype(">f4").tobytes())
    imageio.check_nifti_data(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(imageio.read_scan(str(path))), arr)
    # ...and the same layout is understood, not skipped: cut or NaN-holding copies fail
    good = path.read_bytes()
    path.write_bytes(good[:-8])
    raises_input_error(imageio.read_scan, str(path), match="truncated")
    arr[3, 4, 5] = np.nan
    path.write_bytes(good[:384] + arr.astype(">f4").tobytes())
    raises_input_error(imageio.read_scan, str(path), match="1 NaN")


def test_five_mm_slices_and_oblique_directions_pass_the_checks():
    """5 mm slices, oblique cosines and a gantry tilt (sheared direction) are valid CT."""
    imageio.check_ct(head_image(spacing=(4.0, 4.0, 5.0)))
    imageio.check_ct(head_image(direction=rotation_matrix((12.0, -8.0, 20.0)).ravel()))
    imageio.check_ct(head_image(direction=gantry_tilt_direction(20.0)))


def gantry_tilt_direction(tilt_deg: float) -> Tuple[float, ...]:
    """Direction cosines of a gantry-tilted acquisition: the slice axis leans in y
    while the in-plane axes stay put, so the columns are not orthogonal (a shear)."""
    t = np.radians(tilt_deg)
    return tuple(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, np.sin(t)], [0.0, 0.0, np.cos(t)]]).ravel())


def test_write_image_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    """A failing writer leaves neither the target nor a ``.partial-*`` file."""
    def boom(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise RuntimeError("disk full")
    monkeypatch.setattr(imageio.sitk, "WriteImage", boom)
    with pytest.raises(imageio.IncompleteWrite, match="disk full"):   # an OSError: one CLI line
        imageio.write_image_atomic(head_image(), str(tmp_path / "out.nii.gz"))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- transform files

def write_text(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_transform_missing_and_empty(tmp_path):
    raises_input_error(transforms.read_transform, str(tmp_path / "none.txt"), match="not found")
    raises_input_error(transforms.read_transform, write_text(tmp_path / "e.txt", ""), match="empty")


@pytest.mark.parametrize("text", [
    "hello, this is not a transform\n",
    ITKSNAP_HEADER + "Parameters: 1 0 0\nFixedParameters: 0 0 0\n",       # too few numbers
    ITKSNAP_HEADER + "Parameters: one two three\nFixedParameters: 0 0 0\n",
    "#Insight Transform File V1.0\n#Transform 0\nTransform: MatrixOffsetTransformBase\n"
    "Parameters: 1 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n",          # no _double_3_3
])
def test_garbage_transform(tmp_path, text):
    path = write_text(tmp_path / "t.txt", text)
    raises_input_error(transforms.read_transform, path, match="not an ITK transform")


def test_binary_garbage_transform(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(np.random.default_rng(3).bytes(4000))
    raises_input_error(transforms.read_transform, str(path), match="")


def bspline_file(path: Path, composite: bool) -> str:
    ref = sitk.Image([10, 10, 10], sitk.sitkFloat32)
    ref.SetSpacing((20.0, 20.0, 20.0))
    tf = sitk.BSplineTransformInitializer(ref, [2, 2, 2])
    if composite:        # an affine followed by a B-spline: the B-spline must still be seen
        tf = sitk.CompositeTransform([sitk.AffineTransform(3), tf])
    sitk.WriteTransform(tf, str(path))
    return str(path)


@pytest.mark.parametrize("composite", [False, True])
def test_nonlinear_transform(tmp_path, composite):
    path = bspline_file(tmp_path / "bspline.txt", composite)
    raises_input_error(transforms.read_transform, path, match="not a linear transform")


def test_2d_transform(tmp_path):
    text = ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_2_2\n"
            "Parameters: 1 0 0 1 0 0\nFixedParameters: 0 0\n")
    raises_input_error(transforms.read_transform, write_text(tmp_path / "t.txt", text), match="2D")


@pytest.mark.parametrize("params", [
    [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],                    # flattens z
    [0] * 12,
    [1, 1, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0],                    # two equal rows
])
@pytest.mark.parametrize("invert", [False, True])
def test_singular_transform(tmp_path, params, invert):
    path = write_text(tmp_path / "t.txt", itksnap_text(params))
    raises_input_error(transforms.read_transform, path, invert=invert, match="singular")


@pytest.mark.parametrize("params", [
    [float("nan"), 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0],
    [1, 0, 0, 0, 1, 0, 0, 0, 1, float("inf"), 0, 0],
    [1e308, 0, 0, 0, 1e308, 0, 0, 0, 1e308, 0, 0, 0],
])
@pytest.mark.parametrize("invert", [False, True])
def test_non_finite_transform(tmp_path, params, invert):
    """NaN, inf and numbers whose use overflows are refused, however ITK parses them."""
    path = write_text(tmp_path / "t.txt", itksnap_text(params))
    with pytest.raises(InputError):
        transforms.read_transform(path, invert=invert)


@pytest.mark.parametrize("params,match", [
    ([20, 0, 0, 0, 20, 0, 0, 0, 20, 0, 0, 0], "scales the image by"),     # cm vs mm, or worse
    ([0.05, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], "scales the image by"),
    ([1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1e9], "moves the image"),
    ([1, 0, 0, 0, 1, 0, 0, 0, 1, 1e300, 0, 0], "moves the image"),
])
def test_absurd_transform(tmp_path, params, match):
    """Loads, is finite and invertible, but is no head pose: refused, not warned."""
    path = write_text(tmp_path / "t.txt", itksnap_text(params))
    raises_input_error(transforms.read_transform, path, match=match)


@pytest.mark.parametrize("params,what", [
    ([1.3, 0, 0, 0, 1.3, 0, 0, 0, 1.3, 0, 0, 0], "scales or shears"),
    ([1, 0.3, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], "scales or shears"),
    ([-1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], "mirrors"),
])
def test_scaling_shear_mirror_warn_but_load(tmp_path, params, what):
    path = write_text(tmp_path / "t.txt", itksnap_text(params))
    with pytest.warns(transforms.TransformWarning, match=what):
        tf = transforms.read_transform(path)
    np.testing.assert_allclose(transforms.matrix_of(tf)[:3, :3], np.reshape(params[:9], (3, 3)))


def test_rotation_loads_without_warning(tmp_path, recwarn):
    m = rotation_matrix((10.0, -5.0, 7.0))
    path = write_text(tmp_path / "t.txt", itksnap_text(list(m.ravel()) + [3, -2, 1]))
    tf = transforms.read_transform(path)
    np.testing.assert_allclose(transforms.matrix_of(tf)[:3, :3], m, atol=1e-12)
    assert not [w for w in recwarn if issubclass(w.category, transforms.TransformWarning)]


def test_nifti_refuses_a_sheared_grid_instead_of_straightening_it(tmp_path):
    """ITK's NIfTI writer makes a sheared direction orthogonal with a console warning
    only; the atomic writer refuses, NRRD keeps it, and DICOM-rounding noise passes."""
    sheared = head_image(direction=gantry_tilt_direction(15.0))
    raises_input_error(imageio.write_image_atomic, sheared, str(tmp_path / "x.nii.gz"), match="NIfTI")
    assert list(tmp_path.iterdir()) == []
    imageio.write_image_atomic(sheared, str(tmp_path / "x.nrrd"))
    np.testing.assert_allclose(sitk.ReadImage(str(tmp_path / "x.nrrd")).GetDirection(),
                               sheared.GetDirection(), atol=1e-6)
    noisy = head_image(direction=(1.0, 2e-6, 0.0, -1e-6, 1.0, 0.0, 0.0, 3e-6, 1.0))
    imageio.write_image_atomic(noisy, str(tmp_path / "n.nii.gz"))


def test_written_images_get_the_normal_file_mode(tmp_path):
    """Results are renamed from a ``mkstemp`` file (mode 0600); they must end up with
    the mode any new file gets (0644 under umask 022) so others can open them."""
    old = os.umask(0o022)
    try:
        imageio.write_image_atomic(head_image(), str(tmp_path / "labels.nii.gz"))
    finally:
        os.umask(old)
    assert oct((tmp_path / "labels.nii.gz").stat().st_mode & 0o777) == oct(0o644)


# --------------------------------------------------------------------------- training data

def dataset_case(folder: Path, labels: Optional[np.ndarray] = None, seg_image: Optional[sitk.Image] = None,
                 name: str = "1"):
    """Write case ``name`` (CT + labels) into ``folder``; return its ``dataset.Case``."""
    dataset = pytest.importorskip("BrainLobeSegLib.dataset")
    ct = head_image()
    write(ct, folder / f"{name}.nii.gz")
    if seg_image is None:
        arr = labels if labels is not None else (head_array() > 0).astype(np.uint8) * 5
        seg_image = sitk.GetImageFromArray(arr)
        seg_image.CopyInformation(ct)
    write(seg_image, folder / f"{name}-seg.nii.gz")
    return next(c for c in dataset.list_cases(folder) if c.name == name)


def test_dataset_case_control(tmp_path):
    """The base case reads: every refusal below is due to its one defect."""
    dataset = pytest.importorskip("BrainLobeSegLib.dataset")
    ct, tf, seg = dataset.read_case(dataset_case(tmp_path))
    assert seg.GetPixelID() == sitk.sitkUInt8 and set(np.unique(sitk.GetArrayViewFromImage(seg))) == {0, 5}


@pytest.mark.parametrize("values,dtype,shown", [
    ([21], np.uint8, "21"), ([255], np.uint8, "255"), ([-1], np.int16, "-1"),
    ([1000, 21], np.int16, "21, 1000"), ([2.5], np.float32, "2.5"), ([np.nan], np.float32, "nan"),
])
def test_dataset_unknown_label_values(tmp_path, values, dtype, shown):
    dataset = pytest.importorskip("BrainLobeSegLib.dataset")
    arr = np.zeros(head_array().shape, dtype)
    arr[10, 20, 20:20 + len(values)] = values
    arr[5, 5, 5] = 3                                    # plus a valid one
    case = dataset_case(tmp_path, labels=arr)
    before = tree_hashes(tmp_path)
    if np.isnan(values).any():   # NaN in a NIfTI never reaches the label check: read_scan
        raises_input_error(dataset.read_case, case, match="NaN")
    else:
        err = raises_input_error(dataset.read_case, case, match="not label ids")
        assert shown in str(err)
    assert tree_hashes(tmp_path) == before


@pytest.mark.parametrize("change,what", [
    (lambda img: sitk.Image([40, 48, 24], sitk.sitkUInt8), "size"),
    (lambda img: _with(img, spacing=(4.5, 4.5, 4.0)), "spacing"),
    (lambda img: _with(img, origin=(0.0, 0.0, 0.0)), "origin"),
    (lambda img: _with(img, direction=rotation_matrix((0.0, 0.0, 30.0)).ravel()), "direction"),
])
def test_dataset_label_grid_differs_from_scan(tmp_path, change, what):
    dataset = pytest.importorskip("BrainLobeSegLib.dataset")
    seg = sitk.Image(list(SIZE), sitk.sitkUInt8)
    seg.CopyInformation(head_image())
    case = dataset_case(tmp_path, seg_image=change(seg))
    err = raises_input_error(dataset.read_case, case, match="not on the grid")
    assert what in str(err)


def _with(img: sitk.Image, **geometry) -> sitk.Image:
    img = sitk.Image(img)
    for key, value in geometry.items():
        getattr(img, "Set" + key.capitalize())(tuple(float(v) for v in value))
    return img


@pytest.mark.parametrize("defect", ["cut", "4D", "random bytes", "empty"])
def test_dataset_broken_label_file(tmp_path, defect):
    dataset = pytest.importorskip("BrainLobeSegLib.dataset")
    case = dataset_case(tmp_path)
    seg = tmp_path / "1-seg.nii.gz"
    if defect == "cut":
        cut_in_half(seg)
    elif defect == "4D":
        write(sitk.JoinSeries([sitk.ReadImage(str(seg))] * 2), seg)
    elif defect == "random bytes":
        seg.write_bytes(np.random.default_rng(5).bytes(5000))
    else:
        seg.write_bytes(b"")
    raises_input_error(dataset.read_case, case, match="")


# Files on which ITK's own text reader crashes the whole process (segmentation fault),
# found by test_fuzz.py: an empty "Parameters:" line with fixed parameters present.
ITK_CRASHERS = [f"#Insight Transform File V1.0\n#Transform 0\nTransform: {kind}_double_3_3\n"
                f"Parameters: \nFixedParameters: 1 1 1{extra}\n"
                for kind in ("Euler3DTransform", "VersorRigid3DTransform", "ScaleTransform",
                             "Similarity3DTransform") for extra in ("", " 1")]


def test_transform_files_that_crash_itk_are_refused_before_itk_reads_them(tmp_path):
    """In a child process, so that a regression shows as a failed test, not a dead
    test run: every file must give InputError and the process must exit normally."""
    paths = []
    for i, text in enumerate(ITK_CRASHERS):
        paths.append(str(tmp_path / f"crash{i}.txt"))
        Path(paths[-1]).write_text(text, encoding="utf-8")
    code = ("import sys\nfrom BrainLobeSegLib import transforms\nfrom BrainLobeSegLib.errors import InputError\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n        transforms.read_transform(p)\n    except InputError as e:\n"
            "        print('refused', e.problem)\n    else:\n        print('accepted')\n")
    proc = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"crashed (status {proc.returncode}):\n{proc.stderr[-2000:]}"
    assert proc.stdout.count("refused") == len(paths), proc.stdout


# --------------------------------------------------------------------------- DICOM series

def write_dicom_series(img: sitk.Image, folder: Path, drop: Optional[int] = None,
                       modality: str = "CT", uid: str = "1.2.826.0.1.3680043.2.1125.424242",
                       description: str = "", prefix: str = "") -> Path:
    """Write ``img`` as a DICOM series (CT unless ``modality`` says otherwise), one file
    per slice, with the positions and orientation a scanner writes (Image Position per
    slice: a gantry-tilted ``img`` gives the in-plane shift from slice to slice that
    tilted series have). ``uid``, ``description`` and ``prefix`` (of the file names) put
    a second series into the same folder."""
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.Cast(img, sitk.sitkInt16)
    d = np.array(img.GetDirection()).reshape(3, 3)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(img.GetDepth()):
        if i == drop:
            continue
        sl = img[:, :, i]
        if description:
            sl.SetMetaData("0008|103e", description)
        for tag, value in (("0020|000e", uid), ("0020|000d", uid + ".1"), ("0008|0060", modality),
                           ("0020|0013", str(i)), ("0028|0030", "\\".join(map(str, img.GetSpacing()[:2]))),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in list(d[:, 0]) + list(d[:, 1]))),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in
                                                   img.TransformIndexToPhysicalPoint((0, 0, i))))):
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{i:03d}.dcm"))
        writer.Execute(sl)
    return folder


def test_dicom_series_control(tmp_path):
    img = head_image()
    got = imageio.read_scan(str(write_dicom_series(img, tmp_path / "ct")))
    assert got.GetSize() == img.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), img.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(got.GetDirection(), np.eye(3).ravel(), atol=1e-6)


def test_dicom_series_with_a_missing_slice_is_regularised(tmp_path):
    """ITK only warns and averages the spacing (a silently stretched head). The reader
    interpolates the missing slice onto the regular grid instead, with one warning that
    names the largest gap, and every slice that was there keeps its place and values."""
    img = head_image()
    folder = write_dicom_series(img, tmp_path / "ct", drop=10)
    before = tree_hashes(folder)
    with pytest.warns(InputWarning, match=r"unevenly spaced .*largest between slices 10 and 11"):
        got = imageio.read_scan(str(folder))
    assert tree_hashes(folder) == before
    assert got.GetSize() == img.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), img.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(got.GetOrigin(), img.GetOrigin(), atol=1e-4)
    full = imageio.read_scan(str(write_dicom_series(img, tmp_path / "full")))   # no slice left out
    a, b = sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(full)
    kept = [k for k in range(img.GetDepth()) if k != 10]
    assert np.array_equal(a[kept], b[kept])
    middle = (b[9].astype(np.float64) + b[11]) / 2
    assert np.abs(a[10] - middle).max() <= 0.5          # linear between its neighbours


def test_dicom_series_with_repeated_positions_refused(tmp_path):
    """Two slices at one position cannot be put in one order: refused, not averaged."""
    img = head_image()
    folder = write_dicom_series(img, tmp_path / "ct")
    clash = sitk.ReadImage(str(folder / "005.dcm"))
    clash.SetMetaData("0020|0013", "99")
    clash.SetMetaData("0008|0018", "1.2.826.0.1.3680043.2.1125.424242.99")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / "099.dcm"))
    writer.Execute(clash)
    raises_input_error(imageio.read_scan, str(folder), match="consistent order")


def test_dicom_gantry_tilt_read_with_its_true_geometry(tmp_path):
    """ITK stacks tilted slices upright (the head sheared by the tilt, up to ~40 mm at
    the top of this series); the reader restores the tilted slice axis."""
    img = head_image(direction=gantry_tilt_direction(20.0))
    got = imageio.read_scan(str(write_dicom_series(img, tmp_path / "ct")))
    np.testing.assert_allclose(got.GetDirection(), img.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(got.GetSpacing(), img.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(got.GetOrigin(), img.GetOrigin(), atol=1e-4)
    last = (0, 0, img.GetDepth() - 1)
    np.testing.assert_allclose(got.TransformIndexToPhysicalPoint(last),
                               img.TransformIndexToPhysicalPoint(last), atol=1e-3)
    imageio.check_ct(got)


def test_dicom_ram_guard_before_reading_the_series(tmp_path, monkeypatch):
    folder = write_dicom_series(head_image(), tmp_path / "ct")
    monkeypatch.setattr(imageio, "MAX_VOXELS", 48 * 48 * 20)
    raises_input_error(imageio.read_scan, str(folder), match="too large")


# --------------------------------------------------------------------------- on the phantom

def test_phantom_case_round_trip_and_tampering(tmp_path):
    """A real case in the dataset layout (the anatomical phantom, tilted, with its
    ITK-SNAP transform) reads back; one unknown label value or a label file resampled
    to another grid is then refused, and nothing of the case is modified."""
    phantom = pytest.importorskip("BrainLobeSegLib.phantom")
    dataset = pytest.importorskip("BrainLobeSegLib.dataset")
    case = phantom.write_case(phantom.make_scan(size=SIZE, spacing=SPACING, seed=4), str(tmp_path))
    ct, tf, seg = dataset.read_case(case)
    assert transforms.rotation_angle_deg(tf) > 5 and sitk.GetArrayViewFromImage(seg).max() == 20

    original = sitk.ReadImage(str(case.seg_path))
    arr = sitk.GetArrayFromImage(original)
    arr[12, 24, 24] = 42
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(original)
    write(bad, Path(case.seg_path))
    before = tree_hashes(tmp_path)
    err = raises_input_error(dataset.read_case, case, match="not label ids")
    assert "42" in str(err)

    coarser = sitk.Resample(original, [24, 24, 12], sitk.Transform(), sitk.sitkNearestNeighbor,
                            original.GetOrigin(), (9.0, 9.0, 10.0), original.GetDirection(), 0,
                            sitk.sitkUInt8)
    write(coarser, Path(case.seg_path))
    raises_input_error(dataset.read_case, case, match="not on the grid")
    assert set(tree_hashes(tmp_path)) == set(before)
