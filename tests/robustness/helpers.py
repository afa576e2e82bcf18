"""Shared helpers of the robustness tests."""
from __future__ import annotations

import builtins
import os
import struct
import zlib

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from data.readers import ImageReadError, read_image


def refused(path, *needles, **kwargs) -> str:
    with pytest.raises(ImageReadError) as info:
        read_image(path, **kwargs)
    err = info.value
    assert "\n" not in str(err) and str(err) == f"{path}: {err.reason}"
    assert not err.reason.split(":")[0].endswith("Error"), f"vague reason: {err.reason}"
    for needle in needles:
        assert needle in err.reason, err.reason
    return err.reason


def read_ok(path, **kwargs):
    img = read_image(path, **kwargs)
    a = img.pixels
    assert a.dtype == np.float32 and a.ndim == 2 and np.isfinite(a).all()
    assert a.min() >= 0.0 and a.max() <= 1.0
    return img


def ramp(h=24, w=32, top=255, dtype=np.uint8):
    return np.round(np.linspace(0, top, h * w)).reshape(h, w).astype(dtype)


def dicom_bytes(tmp_path, arr=None, name="img.dcm") -> bytes:
    arr = ramp(top=4095, dtype=np.uint16) if arr is None else arr
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.astype("<u2").tobytes()
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def png_claiming(width, height, bit_depth=8, colour_type=0) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def deny_open(monkeypatch, *denied):
    """Make the built-in open raise PermissionError for the given paths (works as root)."""
    denied_set = {os.fspath(p) for p in denied}
    real_open = builtins.open

    def fake_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) in denied_set:
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
