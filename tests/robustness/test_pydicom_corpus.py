"""Every file of pydicom's bundled test corpus is read correctly or refused with a clear reason.

Allowed outcomes of ``read_image`` for each file:

1. a RadiographImage: float32, 2-D, finite, in [0, 1], of the header's Rows x Columns, with
   ``frames`` = NumberOfFrames; and *not silently wrong*: its pixels are a monotonic function
   of the modality values pydicom decodes for the first frame (increasing for MONOCHROME2,
   decreasing for MONOCHROME1: bone bright), and not constant when those values are not;
2. an ImageReadError whose reason is one line, names the problem (not a bare wrapped
   exception such as ``"ValueError: ..."``) and is justified: pydicom itself cannot give a
   greyscale image for the file.

The corpus is listed with ``pydicom.data.get_testdata_files()`` with downloads disabled: only
the files shipped in the installed pydicom are tried.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pydicom
import pytest

from data.readers import ImageReadError, RadiographImage, read_image


def _corpus() -> tuple[Path, list[Path]]:
    import pydicom.data.data_manager as dm
    from pydicom.data import get_testdata_files

    def no_download(*args, **kwargs):
        raise RuntimeError("downloads are disabled in this test")

    with mock.patch.object(dm, "data_path_with_download", no_download), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        names = get_testdata_files()
    root = Path(dm.DATA_ROOT) / "test_files"
    files = sorted({Path(n) for n in names if Path(n).is_file() and root in Path(n).parents})
    return root, files


ROOT, FILES = _corpus()
IDS = [f.relative_to(ROOT).as_posix() for f in FILES]


def test_corpus_is_not_empty():
    assert len(FILES) >= 50, f"only {len(FILES)} pydicom test files found under {ROOT}"


def _reference(path: Path):
    """(dataset, first-frame modality values) from pydicom alone, or (dataset|None, None)."""
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path, force=True)
        arr = np.asarray(ds.pixel_array)
    except Exception:
        return None, None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[0]
    return ds, np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)


def _check_read(path: Path, img: RadiographImage) -> None:
    a = img.pixels
    assert isinstance(img, RadiographImage)
    assert a.dtype == np.float32 and a.ndim == 2 and a.size > 0
    assert np.isfinite(a).all()
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert img.frames >= 1
    if img.source_format != "dicom":
        return
    ds, ref = _reference(path)
    assert ref is not None, "read_image read a file that pydicom cannot decode"
    assert a.shape == (int(ds.Rows), int(ds.Columns)) == ref.shape
    assert img.frames == int(ds.get("NumberOfFrames", 1) or 1)
    assert img.photometric == str(ds.PhotometricInterpretation).strip().upper()
    if img.photometric == "MONOCHROME1":
        ref = -ref  # bone bright: high stored values must come out dark
    order = np.argsort(ref.ravel(), kind="stable")
    ours = a.ravel().astype(np.float64)[order]
    assert (np.diff(ours) >= -1e-7).all(), "pixels are not a monotonic function of the data"
    if ref.max() > ref.min():
        assert a.max() > a.min(), "constant image from non-constant data"


def _check_refused(path: Path, err: ImageReadError) -> None:
    reason = err.reason
    assert reason and "\n" not in str(err) and "\r" not in str(err)
    assert str(err) == f"{path}: {reason}"
    assert not re.match(r"^[A-Za-z]*(Error|Exception|Warning)\b", reason), (
        f"vague reason (an unexpected exception passed through): {reason}")
    assert len(reason) < 400, f"overlong reason: {reason}"
    # Justified: pydicom must not be able to give a 1-sample monochrome image for the file.
    ds, ref = _reference(path)
    if ref is not None and "exceeds the limit" not in reason:
        greyscale = (int(ds.get("SamplesPerPixel", 1) or 1) == 1 and str(
            ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
            in ("MONOCHROME1", "MONOCHROME2"))
        assert not greyscale or ref.ndim != 2, (
            f"refused a greyscale image that pydicom decodes: {reason}")


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_corpus_file(path, corpus_outcomes):
    outcome = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the odd files: not a failure
        for voi_lut in (False, True):
            try:
                img = read_image(path, voi_lut=voi_lut)
            except ImageReadError as err:
                _check_refused(path, err)
                result = err.reason
            else:
                if voi_lut:  # windowed: a clipped, possibly constant, image is right
                    a = img.pixels
                    assert a.dtype == np.float32 and a.ndim == 2 and np.isfinite(a).all()
                    assert a.min() >= 0.0 and a.max() <= 1.0
                else:
                    _check_read(path, img)
                result = "read"
            if outcome is None:
                outcome = result
                corpus_outcomes[path.relative_to(ROOT).as_posix()] = outcome
            else:  # the VOI option changes the scaling, never whether a file is readable
                assert (result == "read") == (outcome == "read"), (outcome, result)
