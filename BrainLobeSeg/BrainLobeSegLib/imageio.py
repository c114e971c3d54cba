"""Reading and checking scans, and writing results so that no half-written file is left.

A scan is read with SimpleITK from NIfTI, NRRD, MetaImage or a DICOM series folder. Before
anything is computed it is checked (:func:`check_ct`): SimpleITK happily returns a
truncated ``.nii.gz`` as zeros, a 4D series or an MR volume, and each of these would
otherwise end as a wrong segmentation rather than an error.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import math
import os
import re
import stat
import struct
import sys
import tempfile
import warnings
import zlib
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError, InputWarning

# A head CT in HU has air near -1000; below this the 1st percentile is not air.
_AIR_HU_MAX = -500.0
# Above this the 99.9th percentile of a HU CT of a head is bone; MR or a display-scaled
# image rarely has both this and air.
_BONE_HU_MIN = 300.0
MIN_SIZE_VOXELS = 8          # per axis
MIN_EXTENT_MM = 40.0         # per axis; smaller is not a head
MAX_VOXELS = 400_000_000     # ~0.8 GB as int16, more than any head CT (guard for RAM)
_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: File suffixes read as scans (NIfTI, NRRD, MetaImage); DICOM comes as a folder.
IMAGE_SUFFIXES = _IMAGE_SUFFIXES


def check_gzip_complete(path: str) -> None:
    """Raise :class:`InputError` if a gzip file is truncated or corrupt.

    SimpleITK (via zlib) returns the decompressed part of a cut ``.nii.gz`` and fills
    the rest with zeros, without an error; only reading the stream to its end (and
    its CRC) tells.
    """
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise _gzip_error(path, exc) from None


def _gzip_error(path: str, exc: BaseException) -> InputError:
    """A cut download and a file that is not gzip at all need different advice."""
    if isinstance(exc, EOFError):
        return InputError(f"{path} is truncated: the gzip stream ends early ({exc}).",
                          "Copy or export the file again.")
    if isinstance(exc, (gzip.BadGzipFile, zlib.error)):
        return InputError(f"{path} is corrupt: not a valid gzip stream ({exc}).",
                          "Copy or export the file again; if it is an uncompressed NIfTI, name it .nii.")
    return InputError(f"cannot read {path} ({getattr(exc, 'strerror', None) or exc}).",
                      "Check that the file is readable (permissions, disk), or copy it again.")


def image_suffix(path: str) -> str:
    low = path.lower()
    for s in _IMAGE_SUFFIXES:
        if low.endswith(s):
            return s
    return os.path.splitext(low)[1]


def read_scan(path: str) -> sitk.Image:
    """Read a scan from a file or a DICOM series folder, with clear errors.

    Returns the image as SimpleITK reads it (pixel type unchanged); call
    :func:`check_ct` before using it as a head CT.
    """
    check_input_file(path, "scan")
    if os.path.isdir(path):
        return _read_dicom_folder(path)
    if os.path.getsize(path) == 0:
        raise InputError(f"scan file is empty: {path}.", "Export or copy the scan again.")
    gz = path.lower().endswith(".gz")
    if image_suffix(path) in (".nii", ".nii.gz"):
        check_nifti_spacing(path)   # before ITK, which only warns about it
    # The header first: a file claiming a huge volume is refused before ITK allocates
    # it (ITK allocates the whole buffer before reading a single voxel).
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        if gz:
            check_gzip_complete(path)   # a clearer message for a cut or non-gzip file
        raise InputError(f"cannot read {path} as an image ({_itk_reason(exc)}).",
                         "Give a NIfTI (.nii, .nii.gz), NRRD or a DICOM series folder.") from None
    check_voxel_count(reader.GetSize(), reader.GetNumberOfComponents(), os.path.basename(path))
    if image_suffix(path) in (".nii", ".nii.gz"):
        check_nifti_data(path)
    elif gz:
        check_gzip_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except Exception as exc:
        raise InputError(f"cannot read {path} as an image ({_itk_reason(exc)}).",
                         "Give a NIfTI (.nii, .nii.gz), NRRD or a DICOM series folder.") from None
    return image


def _itk_reason(exc: Exception) -> str:
    """The informative line of an ITK/SimpleITK exception, without source paths.

    ITK's text ends with the "ITK ERROR: Class(0x...): message" line, sometimes followed
    by "Reason: <strerror>" from a stale errno ("No such file or directory" for a file
    that exists), which would mislead the user; that line is dropped.
    """
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Reason:")] or lines
    if not lines:
        return type(exc).__name__
    line = lines[-1]
    line = re.sub(r"^(ITK ERROR|sitk::ERROR):\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", line)
    return line[:160]


# NIfTI datatype code -> numpy dtype of the stored voxels (those a CT can come in).
_NIFTI_DTYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2",
                 768: "u4", 1024: "i8", 1280: "u8"}


MAX_SPACING_MM = 50.0        # a head CT voxel is below 10 mm; beyond this a header is broken


def _nifti_pixdim(head: bytes) -> Optional[Tuple[int, Tuple[float, ...]]]:
    """(number of dimensions, pixdim[1..3]) of a NIfTI-1/2 header, or None."""
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack_from(order + "i", head, 0)[0] == 348:
            return struct.unpack_from(order + "h", head, 40)[0], struct.unpack_from(order + "3f", head, 80)
        if len(head) >= 540 and struct.unpack_from(order + "i", head, 0)[0] == 540:
            return struct.unpack_from(order + "q", head, 16)[0], struct.unpack_from(order + "3d", head, 112)
    return None


def check_nifti_spacing(path: str) -> None:
    """Refuse a NIfTI header whose voxel size is not finite, zero, negative or absurd.

    ITK reads such headers with only a console warning and gives a silently stretched or
    mirrored grid (pixdim NaN, 0 or negative) or an all-background result (1e6 mm), so
    the header is read here first.
    """
    try:
        with (gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")) as fh:
            found = _nifti_pixdim(fh.read(540))
    except (EOFError, OSError, zlib.error):
        return   # the data check that follows names a cut or corrupt file
    if found is None:
        return
    ndim, pixdim = found
    used = pixdim[: max(1, min(int(ndim), 3))]
    if all(math.isfinite(v) and 0 < v <= MAX_SPACING_MM for v in used):
        return
    shown = " x ".join(f"{v:.6g}" for v in used)
    raise InputError(f"{os.path.basename(path)} has an impossible voxel size in its header "
                     f"({shown} mm; each must be a finite number above 0 and at most "
                     f"{MAX_SPACING_MM:g} mm).", "Fix the header's pixdim or export the scan again.")


def _nifti_layout(head: bytes) -> Optional[Tuple[int, int, Optional[np.dtype]]]:
    """(data offset, data bytes, float dtype or None) from a NIfTI-1/2 header.

    None when the header is not one this function understands (ITK then decides).
    """
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack_from(order + "i", head, 0)[0] == 348:
            dims = struct.unpack_from(order + "8h", head, 40)
            code, bitpix = struct.unpack_from(order + "2h", head, 70)
            offset = int(struct.unpack_from(order + "f", head, 108)[0])
            break
        if len(head) >= 540 and struct.unpack_from(order + "i", head, 0)[0] == 540:
            code, bitpix = struct.unpack_from(order + "2h", head, 12)
            dims = struct.unpack_from(order + "8q", head, 16)
            offset = int(struct.unpack_from(order + "q", head, 168)[0])
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0 or bitpix % 8:
        return None
    n = int(np.prod([max(1, int(d)) for d in dims[1:ndim + 1]], dtype=np.float64))
    kind = _NIFTI_DTYPES.get(code)
    dtype = np.dtype(order + kind) if kind and kind[0] == "f" else None
    return max(offset, 348), n * bitpix // 8, dtype


def check_nifti_data(path: str) -> None:
    """Raise :class:`InputError` if a NIfTI file holds fewer voxels than its header
    says, or NaN/infinite values; for ``.nii.gz`` also if the gzip stream is cut.

    SimpleITK reads a cut ``.nii`` (or a ``.nii.gz`` of one) as the data present followed
    by zeros, and its NIfTI reader turns NaN and infinite voxels into 0 (which look like
    brain tissue): neither is visible after reading. One streaming pass over the file.
    """
    gz = path.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(540)
            layout = _nifti_layout(head)
            if layout is None:           # not a header we know: only the gzip check
                while gz and fh.read(1 << 22):
                    pass
                return
            offset, expected, dtype = layout
            if not gz and offset > os.fstat(fh.fileno()).st_size:
                raise InputError(f"{path} is broken: its header puts the voxel data at byte "
                                 f"{offset}, beyond the end of the file.", "Copy or export the file again.")
            if dtype is None and not gz:  # integer voxels on disk: the size tells
                got, bad = os.path.getsize(path) - offset, 0
            else:
                if offset > len(head):
                    fh.seek(offset)   # in steps: a huge offset allocates nothing
                pending, rest, got, bad = head[offset:], b"", 0, 0
                while True:
                    chunk, pending = pending or fh.read(1 << 22), b""
                    if not chunk:
                        break
                    if dtype is not None and got < expected:
                        buf = rest + chunk[: expected - got]
                        n = len(buf) // dtype.itemsize * dtype.itemsize
                        block = np.frombuffer(buf[:n], dtype=dtype)
                        bad += int(block.size - np.count_nonzero(np.isfinite(block)))
                        rest = buf[n:]
                    got += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise _gzip_error(path, exc) from None
    if got < expected:
        raise InputError(f"{path} is truncated: its header announces {expected} bytes of voxel "
                         f"data, the file holds {got}.", "Copy or export the file again.")
    if bad:
        raise InputError(f"{os.path.basename(path)} contains {bad} NaN or infinite voxel values.",
                         "Fix or re-export the scan; a CT has finite HU everywhere.")


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK's warnings (printed straight to the C stderr) for a block.

    Used where a warning is expected and answered by our own message, e.g. GDCM's
    "No Series were found" when a folder is probed for DICOM: the user must see one
    clear line, not ITK's source paths.
    """
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


@contextlib.contextmanager
def captured_c_stderr() -> Iterator[List[str]]:
    """Collect what C libraries write to file descriptor 2 during a block.

    HDF5 prints its error stack (some 25 lines of source paths) straight to the C
    stderr before ITK raises, and no ITK switch turns that off: the fd is pointed at a
    temporary file for the block, and the lines are handed back (the caller reports one
    line of its own instead). Where there is no fd 2 (an embedding without one) nothing
    is redirected.
    """
    lines: List[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):
        yield lines
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read(1 << 16).decode("utf-8", "replace").splitlines())


def check_input_file(path: str, what: str = "scan") -> None:
    """Raise :class:`InputError` unless ``path`` can be opened as an input: a missing
    path is "not found", but a symbolic link loop, a dangling link, a named pipe (FIFO),
    a device or a socket is named as what it is (each needs a different fix, and a FIFO
    would make a reader wait forever). Folders pass (DICOM and dataset folders)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(f"{what} path {path} is a symbolic link loop (its links point back "
                             "at each other).", "Give the real file, or fix the link.") from None
        if isinstance(exc, FileNotFoundError) and os.path.islink(path):
            raise InputError(f"{what} path {path} is a broken symbolic link (it points at "
                             f"{os.readlink(path)}, which does not exist).",
                             "Give the real file, or fix the link.") from None
        if isinstance(exc, FileNotFoundError):
            raise InputError(f"{what} not found: {path}.", "Check the path.") from None
        raise InputError(f"cannot open {what} {path} ({exc.strerror or exc}).",
                         "Check the path and its permissions.") from None
    kind = next((name for test, name in ((stat.S_ISFIFO, "a named pipe (FIFO)"),
                                         (stat.S_ISSOCK, "a socket"),
                                         (stat.S_ISCHR, "a character device"),
                                         (stat.S_ISBLK, "a block device"))
                 if test(info.st_mode)), None)
    if kind is not None:
        raise InputError(f"{what} path {path} is {kind}, not a file.",
                         "Give the file itself (write the stream to a file first).")


def dicom_series_ids(folder: str) -> Tuple[str, ...]:
    """The DICOM series in a folder (empty when there are none), without ITK noise."""
    try:
        with quiet_itk():
            return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except Exception:
        return ()


def _read_dicom_folder(folder: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = dicom_series_ids(folder)
    if not series:
        raise InputError(f"{folder} is a folder without a DICOM series.",
                         "Give the folder of one CT series, or a NIfTI/NRRD file.")
    # Several series (scout, bone and brain kernels...): take the one with most slices.
    file_lists = {s: reader.GetGDCMSeriesFileNames(folder, s) for s in series}
    most = max(len(f) for f in file_lists.values())
    tied = sorted(s for s in series if len(file_lists[s]) == most)   # lowest UID first: reruns agree
    files = file_lists[tied[0]]
    header = sitk.ImageFileReader()
    header.SetFileName(files[0])
    try:
        header.ReadImageInformation()
    except Exception as exc:
        raise InputError(f"cannot read the DICOM series in {folder} ({_itk_reason(exc)}).",
                         "Export the series again, or convert it to NIfTI.") from None
    if len(tied) > 1:   # the slice count cannot decide: never pick silently
        named = [f"{uid} ({_dicom_tag(file_lists[uid][0], _SERIES_DESCRIPTION) or 'no description'})"
                 for uid in tied]
        warnings.warn(f"{os.path.basename(os.path.normpath(folder))} holds {len(tied)} DICOM series "
                      f"of {most} slices each; used {named[0]}, not {', '.join(named[1:])}. Put the "
                      "series you want in a folder of its own to use another.", InputWarning, stacklevel=3)
    modality = _dicom_tag(files[0], MODALITY_TAG)
    # the RAM guard from the first slice's header, before the series is allocated
    check_voxel_count(tuple(header.GetSize()[:2]) + (len(files),), header.GetNumberOfComponents(),
                      os.path.basename(os.path.normpath(folder)))
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        with quiet_itk():   # its "non uniform sampling" warning is replaced by ours below
            image = reader.Execute()
    except Exception as exc:
        raise InputError(f"cannot read the DICOM series in {folder} ({_itk_reason(exc)}).",
                         "Export the series again, or convert it to NIfTI.") from None
    image = _dicom_slice_geometry(image, reader, folder)
    if modality:   # for check_ct: a series that says it is MR is not segmented as CT
        image.SetMetaData(MODALITY_TAG, modality)
    return image


#: DICOM Modality (CT, MR, PT...), kept on an image read from a series for :func:`check_ct`.
MODALITY_TAG = "0008|0060"
_SERIES_DESCRIPTION = "0008|103e"


def _dicom_tag(path: str, tag: str) -> str:
    """One tag of a DICOM file's header as text ('' when absent or unreadable)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_itk():
            reader.ReadImageInformation()
        return reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else ""
    except Exception:
        return ""


def _dicom_slice_geometry(image: sitk.Image, reader: sitk.ImageSeriesReader, folder: str) -> sitk.Image:
    """Check and correct the slice geometry ITK derives from a DICOM series.

    ITK assumes evenly spaced slices stacked along the slice normal. Uneven gaps (slices
    left out, or a scanner that varies the table step) only produce an ITK warning and an
    averaged spacing, i.e. a silently wrong grid: here the slices are interpolated onto a
    regular grid along their own axis instead, with one warning naming the largest gap
    (as Slicer's DICOM module and dcm2niix do). A gantry tilt (slices shifted in-plane
    from one to the next, common in head CT) is returned by ITK as an upright stack,
    shearing the head: here the slice axis is set to the true step between the slice
    positions, a non-orthogonal direction matrix that SimpleITK resamples exactly. Only
    slices that cannot be put in one consistent order along one axis are refused.
    """
    n = image.GetDepth() if image.GetDimension() == 3 else 0
    key = "0020|0032"   # Image Position (Patient) of each slice, in the reader's order
    if n < 3 or not all(reader.HasMetaDataKey(i, key) for i in range(n)):
        return image
    try:
        pos = np.array([[float(v) for v in reader.GetMetaData(i, key).split("\\")[:3]]
                        for i in range(n)])
    except ValueError:
        return image
    if pos.shape[1] != 3 or not np.isfinite(pos).all():
        return image
    span = pos[-1] - pos[0]
    length = float(np.linalg.norm(span))
    if length < 1e-3:
        return image
    axis = span / length
    along = (pos - pos[0]) @ axis                       # slice positions on the axis (mm)
    across = np.linalg.norm((pos - pos[0]) - along[:, None] * axis, axis=1)
    gaps = np.diff(along)
    if gaps.min() <= 1e-3 or across.max() > max(0.5, 0.05 * length / (n - 1)):
        raise InputError(f"the slices of the DICOM series in {folder} cannot be put in one "
                         "consistent order along one axis (repeated or out-of-line slice "
                         "positions): the folder mixes series or reconstructions.",
                         "Export the one CT series again into its own folder, or convert it to NIfTI.")
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if abs(float(np.dot(axis, direction[:, 2]))) < np.cos(np.radians(0.1)):   # gantry tilt
        direction[:, 2] = axis
    image.SetDirection(direction.ravel().tolist())
    image.SetOrigin(tuple(pos[0]))
    if gaps.max() - gaps.min() <= max(0.05, 0.02 * float(gaps.mean())):
        image.SetSpacing(tuple(image.GetSpacing()[:2]) + (float(gaps.mean()),))
        return image
    return _regular_slices(image, along, folder)


def _regular_slices(image: sitk.Image, along: np.ndarray, folder: str) -> sitk.Image:
    """The slices at positions ``along`` (mm on the slice axis, increasing) interpolated
    linearly onto a regular grid at their median gap; one :class:`InputWarning`."""
    gaps = np.diff(along)
    step = float(np.median(gaps))
    count = int(np.floor(along[-1] / step + 1e-6)) + 1
    targets = np.arange(count) * step
    upper = np.clip(np.searchsorted(along, targets, side="right"), 1, len(along) - 1)
    weight = np.clip((targets - along[upper - 1]) / (along[upper] - along[upper - 1]), 0.0, 1.0)
    src = sitk.GetArrayViewFromImage(image)
    out = np.empty((count,) + src.shape[1:], np.float32)
    for k in range(count):   # slice by slice: no second full-size float copy
        out[k] = (1.0 - weight[k]) * src[upper[k] - 1] + weight[k] * src[upper[k]]
    if np.issubdtype(src.dtype, np.integer):
        out = np.rint(out).astype(src.dtype)
    regular = sitk.GetImageFromArray(out)
    regular.SetOrigin(image.GetOrigin())
    regular.SetDirection(image.GetDirection())
    regular.SetSpacing(tuple(image.GetSpacing()[:2]) + (step,))
    k = int(np.argmax(gaps))
    warnings.warn(f"the slices of the DICOM series in {os.path.basename(os.path.normpath(folder))} are "
                  f"unevenly spaced (gaps {gaps.min():.2f}-{gaps.max():.2f} mm, the largest between "
                  f"slices {k + 1} and {k + 2}); they were interpolated onto a regular grid of "
                  f"{count} slices at {step:.2f} mm. Regions in the largest gaps rest on "
                  "interpolated data.", InputWarning, stacklevel=3)
    return regular


def check_voxel_count(size: Sequence[int], components: int = 1, name: str = "the scan") -> None:
    """The RAM guard: refuse volumes larger than :data:`MAX_VOXELS` (from a header too,
    so nothing is allocated)."""
    n_voxels = int(np.prod([int(n) for n in size], dtype=np.float64)) * max(1, int(components))
    if n_voxels > MAX_VOXELS:
        raise InputError(f"{name} is too large ({'x'.join(map(str, size))} = {n_voxels / 1e6:.3g} "
                         f"million voxels; the limit is {MAX_VOXELS / 1e6:.3g} million).",
                         "Crop it to the head or resample it to <= 0.4 mm in-plane and >= 0.5 mm "
                         "slices first.")


#: Below this correlation of neighbouring voxels an image has no structure. A CT's air,
#: tissue and bone regions put it near 1 (0.9 and more on real scans); random bytes at 0.
_MIN_NEIGHBOUR_CORRELATION = 0.2


def neighbour_correlation(arr: np.ndarray) -> float:
    """Correlation of each voxel with its neighbour along x, on up to 8 slices (1.0 for a
    constant image, which other checks refuse)."""
    slices = arr[:: max(1, arr.shape[0] // 8)].astype(np.float64)
    a, b = slices[..., :-1].ravel(), slices[..., 1:].ravel()
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 1.0
    return float(np.corrcoef(a, b)[0, 1])


def check_not_noise(arr: np.ndarray, name: str = "the scan") -> None:
    """Refuse an image of random values (a detached NRRD pointing at /dev/urandom, a
    corrupt export): its percentiles can look like air and bone, and it would give an
    empty segmentation or a made-up head pose. Applies with ``--force`` too."""
    corr = neighbour_correlation(arr)
    if corr < _MIN_NEIGHBOUR_CORRELATION:
        raise InputError(f"{name} looks like random noise, not an image (neighbouring voxels "
                         f"are unrelated: correlation {corr:.2f}).",
                         "Check the file: it may be corrupt or point at the wrong data file.")


class NotCTWarning(InputWarning):
    """``--force`` let through an image whose intensities are not those of a CT in HU."""


def check_modality(image: sitk.Image, force: bool = False, name: str = "the scan") -> None:
    """Refuse a DICOM series whose Modality is not CT (MR, PT...), or warn with ``force``.

    The intensity check alone lets through an MR series that happens to span -1000..300,
    and the models only know CT; the series' own word is the clearer reason. Images from
    other formats carry no modality and are left to the intensity check.
    """
    modality = image.GetMetaData(MODALITY_TAG).strip() if image.HasMetaDataKey(MODALITY_TAG) else ""
    if not modality or modality.upper() == "CT":
        return
    problem = f"{name} is a DICOM series of modality {modality}, not CT"
    if force:
        warnings.warn(NotCTWarning(f"{problem}; segmented anyway because of --force, so the "
                                   "regions are likely meaningless."), stacklevel=3)
        return
    raise InputError(problem + ".", "Give a non-contrast head CT series, or pass --force if its "
                                    "Modality tag is wrong.")


def check_ct(image: sitk.Image, force: bool = False, name: str = "the scan") -> None:
    """Refuse images that are not a 3D head CT in HU.

    ``force`` turns the intensity check into a :class:`NotCTWarning` (for a CT stored with
    an unusual offset); the structural checks (dimension, components, size, NaN) always
    apply. Front ends print the warning and record it with the results.
    """
    dim = image.GetDimension()
    if dim != 3:
        what = "2D (a single slice)" if dim == 2 else f"{dim}D"
        raise InputError(f"{name} is {what}, not a 3D volume.",
                         "Give the whole 3D CT series" + (" (one time point)." if dim > 3 else "."))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(colour or vector image).", "Give the grey-scale CT volume.")
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{name} has complex voxel values, not HU.", "Give the grey-scale CT volume.")
    size = image.GetSize()
    extent = [n * s for n, s in zip(size, image.GetSpacing())]
    if min(size) < MIN_SIZE_VOXELS or min(extent) < MIN_EXTENT_MM:
        raise InputError(f"{name} is too small to be a head CT ({'x'.join(map(str, size))} voxels, "
                         f"{' x '.join(f'{e:.0f}' for e in extent)} mm).",
                         "Give the whole head scan, not a crop or a thumbnail.")
    check_voxel_count(size, 1, name)
    check_modality(image, force, name)
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise InputError(f"{name} contains {bad} NaN or infinite voxel values.",
                         "Fix or re-export the scan; a CT has finite HU everywhere.")
    check_not_noise(arr, name)
    sample = arr[:: max(1, arr.shape[0] // 24)].ravel()[::7]
    lo, hi = np.percentile(sample, [1, 99.9])
    if lo > _AIR_HU_MAX or hi < _BONE_HU_MIN:
        problem = (f"{name} does not look like a CT in Hounsfield units (1st percentile "
                   f"{lo:.0f}, 99.9th {hi:.0f}; a head CT has air near -1000 and bone above "
                   f"{_BONE_HU_MIN:.0f})")
        if force:   # kept possible, but never silent: the regions are likely meaningless
            warnings.warn(NotCTWarning(f"{problem}; segmented anyway because of --force, so the "
                                       "regions are likely meaningless."), stacklevel=2)
            return
        raise InputError(problem + ".",
                         "Give a non-contrast head CT in HU (not MR, not a display-scaled image), "
                         "or pass --force if you are sure it is one.")


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file (0666 less the umask).

    Temporary files from :func:`tempfile.mkstemp` are 0600; renamed into place as they
    are, results and model cards would be unreadable to the colleague or the Slicer
    installation of another user that needs them.
    """
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def is_sheared(image: sitk.Image, tol: float = 1e-4) -> bool:
    """True if the direction cosines are not orthonormal (a gantry-tilted grid).

    The tolerance ignores the rounding noise of DICOM orientation strings; a real tilt
    (0.1 degree or more) is 20x above it.
    """
    n = image.GetDimension()
    d = np.array(image.GetDirection(), dtype=np.float64).reshape(n, n)
    return not np.allclose(d.T @ d, np.eye(n), atol=tol)


class IncompleteWrite(OSError):
    """A file came out shorter than its image: SimpleITK's NIfTI writer only prints
    ``** ERROR: NWAD`` when the disk fills up, and returns as if it had succeeded."""


_NIFTI1_DATA_OFFSET = 352       # where SimpleITK's NIfTI-1 writer puts the voxels
_PNG_END = b"IEND\xaeB`\x82"


def _gunzip_length(fh) -> Optional[int]:
    """Bytes in the gzip stream from ``fh``'s position to its end (CRC checked), or None
    when the stream is cut or corrupt. Bounded memory: at most 16 MB decompressed at once."""
    unzip = zlib.decompressobj(16 + zlib.MAX_WBITS)
    n = 0
    try:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            while chunk and not unzip.eof:
                n += len(unzip.decompress(chunk, 1 << 24))
                chunk = unzip.unconsumed_tail
    except zlib.error:
        return None
    return n if unzip.eof else None


def _written_voxel_bytes(path: str, suffix: str) -> Optional[int]:
    """Voxel bytes a written NIfTI or NRRD file holds (None: cut or corrupt gzip)."""
    with open(path, "rb") as fh:
        header = 0
        if suffix in (".nrrd", ".nhdr"):
            lines = iter(fh.readline, b"")
            header_lines = []
            for line in lines:
                header_lines.append(line)
                if line in (b"\n", b"\r\n"):
                    break
            header = sum(map(len, header_lines))
            if b"encoding: gzip\n" in header_lines:
                return _gunzip_length(fh)
        elif suffix == ".nii.gz":
            got = _gunzip_length(fh)
            return None if got is None else got - _NIFTI1_DATA_OFFSET
        elif suffix == ".nii":
            header = _NIFTI1_DATA_OFFSET
        return os.fstat(fh.fileno()).st_size - header


def verify_written(path: str, image: sitk.Image) -> None:
    """Raise :class:`IncompleteWrite` unless ``path`` holds all of ``image``: the size of
    the voxel data, and for gzip the whole stream read back (its CRC too). PNG must end
    with its IEND chunk; other formats are read back with SimpleITK."""
    suffix, name = image_suffix(path), os.path.basename(path)
    if suffix == ".png":
        with open(path, "rb") as fh:
            fh.seek(max(0, os.fstat(fh.fileno()).st_size - len(_PNG_END)))
            if fh.read() != _PNG_END:
                raise IncompleteWrite(errno.ENOSPC, f"{name} came out incomplete", path)
        return
    if suffix not in (".nii", ".nii.gz", ".nrrd"):
        with quiet_itk():
            if sitk.ReadImage(path).GetSize() != image.GetSize():
                raise IncompleteWrite(errno.ENOSPC, f"{name} came out incomplete", path)
        return
    expected = sitk.GetArrayViewFromImage(image).nbytes
    got = _written_voxel_bytes(path, suffix)
    if got is None or got < expected:
        what = "a cut gzip stream" if got is None else f"{max(got, 0)} of {expected} voxel bytes"
        raise IncompleteWrite(errno.ENOSPC, f"{name} came out incomplete: {what}", path)


def write_image_verified(image: sitk.Image, path: str, compress: bool = True) -> None:
    """``sitk.WriteImage`` followed by :func:`verify_written`; a writer that raises (the
    NRRD writer on a full disk) is reported the same way."""
    try:
        sitk.WriteImage(image, str(path), useCompression=compress)
    except RuntimeError as exc:
        raise IncompleteWrite(errno.ENOSPC, f"{os.path.basename(path)} could not be written "
                              f"({_itk_reason(exc)})", str(path)) from None
    verify_written(str(path), image)


def write_image_atomic(image: sitk.Image, path: str, compress: bool = True) -> None:
    """Write an image so that ``path`` appears only when complete.

    The data goes to a temporary file in the same folder (same suffix, so SimpleITK
    picks the same format), is checked complete (:func:`verify_written`: a full disk
    must not publish a cut file) and is renamed over ``path`` at the end. A sheared grid is
    refused for NIfTI, which cannot store it: ITK would straighten it with only a
    console warning, moving every voxel off its true position.
    """
    if image_suffix(path) in (".nii", ".nii.gz") and is_sheared(image):
        raise InputError(f"{os.path.basename(path)}: NIfTI cannot store the sheared (gantry-tilted) "
                         "grid of this image; it would be silently straightened.",
                         "Write it as .nrrd, or resample it onto an orthogonal grid first.")
    folder = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=image_suffix(path), dir=folder)
    os.close(fd)
    try:
        write_image_verified(image, tmp, compress)
        os.chmod(tmp, default_file_mode())   # mkstemp makes it private (0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(text: str, path: str) -> None:
    """A small text file (a report, a transform) that appears only when complete; a full
    disk or a signal leaves no ``.partial`` behind."""
    tmp = f"{path}.partial"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def strip_image_suffix(path: str) -> str:
    """``/a/b/12.nii.gz`` -> ``12``: the case name used for output files."""
    base = os.path.basename(os.path.normpath(path))
    suffix = image_suffix(base)
    return base[: -len(suffix)] if suffix and base.lower().endswith(suffix) else base


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> Optional[str]:
    """None if two images share size, spacing, origin and direction; else what differs."""
    if a.GetSize() != b.GetSize():
        return f"size {a.GetSize()} vs {b.GetSize()}"
    for what, x, y in (("spacing", a.GetSpacing(), b.GetSpacing()),
                       ("origin", a.GetOrigin(), b.GetOrigin()),
                       ("direction", a.GetDirection(), b.GetDirection())):
        if not np.allclose(x, y, atol=tol * max(1.0, float(np.abs(x).max()))):
            return f"{what} {tuple(round(v, 4) for v in x)} vs {tuple(round(v, 4) for v in y)}"
    return None
