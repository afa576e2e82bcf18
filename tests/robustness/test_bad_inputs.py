"""read_image on hostile or odd files: always an image or a one-line ImageReadError."""
from __future__ import annotations

import gzip
import os
import time
import warnings

import cv2
import numpy as np
import pytest
from PIL import Image

from data import readers

from .helpers import deny_open, dicom_bytes, png_claiming, ramp, read_ok, refused


# ----------------------------------------------------------------------------- empty / junk
@pytest.mark.parametrize("name", ["empty.png", "empty.dcm", "empty", "empty.jpg", "empty.tif"])
def test_zero_byte_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    refused(tmp_path / name, "empty file")


@pytest.mark.parametrize("name, data, needle", [
    ("notes.png", b"this is not an image\n", "not a DICOM or image file"),
    ("random.dcm", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
     "not a DICOM or image file"),
    ("zeros.dcm", b"\x00" * 1000, "not a DICOM or image file"),
    ("data.json", b'{"image": "x.png"}', "not a DICOM or image file"),
    ("archive.dcm.gz", gzip.compress(b"DICM" * 100), "gzip"),
    ("doc.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "not a DICOM or image file"),
    ("one_byte.png", b"\x89", "not a DICOM or image file"),
    ("magic_only.png", b"\x89PNG\r\n\x1a\n", "truncated or corrupt"),
    ("magic_only.jpg", b"\xff\xd8\xff", "truncated or corrupt"),
    ("magic_only.tif", b"II*\x00", "truncated or corrupt"),
    ("dicm_only.dcm", b"\x00" * 128 + b"DICM", "DICOM"),
])
def test_non_image_files(tmp_path, name, data, needle):
    (tmp_path / name).write_bytes(data)
    reason = refused(tmp_path / name)
    assert needle in reason or "no pixel data" in reason, reason


def test_directory_and_missing(tmp_path):
    refused(tmp_path, "directory")
    refused(tmp_path / "missing.png", "no such file")


# ----------------------------------------------------------------------------- truncation
def _encoded(kind: str) -> bytes:
    img = ramp(64, 48)
    if kind == "png16":
        return cv2.imencode(".png", ramp(64, 48, 65535, np.uint16))[1].tobytes()
    if kind == "jpeg":
        noise = np.random.default_rng(1).integers(0, 255, img.shape, dtype=np.uint8)
        return cv2.imencode(".jpg", noise)[1].tobytes()
    if kind == "tiff":
        return cv2.imencode(".tif", ramp(64, 48, 65535, np.uint16))[1].tobytes()
    return cv2.imencode(".png", img)[1].tobytes()


@pytest.mark.parametrize("kind, suffix", [("png", ".png"), ("png16", ".png"), ("jpeg", ".jpg"),
                                          ("tiff", ".tif")])
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.95])
def test_truncated_raster(tmp_path, kind, suffix, fraction):
    data = _encoded(kind)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: max(1, int(len(data) * fraction))])
    refused(cut, "truncated or corrupt")


@pytest.mark.parametrize("fraction", [0.04, 0.1, 0.2, 0.5, 0.9, 0.999])
def test_truncated_dicom(tmp_path, fraction):
    data = dicom_bytes(tmp_path)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * fraction)])
    reason = refused(cut)
    assert "truncated or corrupt" in reason or "not a DICOM or image file" in reason, reason


# ----------------------------------------------------------------------------- size limits
@pytest.mark.parametrize("bit_depth, colour_type", [(8, 0), (16, 0), (8, 2), (16, 6), (1, 0)])
def test_png_header_claiming_enormous_size_refused_before_decoding(tmp_path, monkeypatch,
                                                                   bit_depth, colour_type):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(2**31 - 1, 2**31 - 1, bit_depth, colour_type))
    decoded = []
    monkeypatch.setattr(readers.cv2, "imdecode", lambda *a, **k: decoded.append(1))
    start = time.perf_counter()
    refused(path, "exceeds the limit of 50000000")
    assert time.perf_counter() - start < 1.0
    assert not decoded, "the pixel data were decoded before the size check"


def test_png_header_claiming_zero_size(tmp_path):
    (tmp_path / "zero.png").write_bytes(png_claiming(0, 100))
    refused(tmp_path / "zero.png", "truncated or corrupt")


# ----------------------------------------------------------------------------- raster kinds
def test_png_16bit_exact(tmp_path):
    a = ramp(20, 30, 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "a16.png"), a)
    img = read_ok(tmp_path / "a16.png")
    assert img.bits_stored == 16
    np.testing.assert_allclose(img.pixels, a / 65535.0, atol=1e-7)


def test_rgb_png_colour_refused_grey_accepted(tmp_path):
    g = ramp()
    cv2.imwrite(str(tmp_path / "colour.png"), np.dstack([g, 255 - g, g]))
    refused(tmp_path / "colour.png", "not a greyscale radiograph")
    one_pixel = np.dstack([g, g, g]).copy()
    one_pixel[5, 5, 0] = 7  # a single coloured pixel is still colour (PNG is lossless)
    cv2.imwrite(str(tmp_path / "almost.png"), one_pixel)
    refused(tmp_path / "almost.png", "not a greyscale radiograph")
    cv2.imwrite(str(tmp_path / "grey_rgb.png"), np.dstack([g, g, g]))
    np.testing.assert_allclose(read_ok(tmp_path / "grey_rgb.png").pixels, g / 255.0, atol=1e-7)
    cv2.imwrite(str(tmp_path / "grey_rgba.png"), np.dstack([g, g, g, np.full_like(g, 128)]))
    np.testing.assert_allclose(read_ok(tmp_path / "grey_rgba.png").pixels, g / 255.0, atol=1e-7)


def test_palette_png(tmp_path):
    g = ramp()
    grey = Image.fromarray(g).convert("P")  # palette of greys
    grey.save(tmp_path / "grey_palette.png")
    img = read_ok(tmp_path / "grey_palette.png")
    assert np.corrcoef(img.pixels.ravel(), g.ravel())[0, 1] > 0.99
    colour = Image.fromarray(np.dstack([g, 255 - g, g])).convert("P", palette=Image.ADAPTIVE)
    colour.save(tmp_path / "colour_palette.png")
    refused(tmp_path / "colour_palette.png", "not a greyscale radiograph")


def test_grey_alpha_png(tmp_path):
    g = ramp()
    Image.fromarray(np.dstack([g, np.full_like(g, 200)]), mode="LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(read_ok(tmp_path / "la.png").pixels, g / 255.0, atol=1e-7)


def test_wrong_extension_png_as_dcm_and_dicom_as_png(tmp_path):
    a = ramp(24, 32, 65535, np.uint16)
    (tmp_path / "png_named.dcm").write_bytes(cv2.imencode(".png", a)[1].tobytes())
    img = read_ok(tmp_path / "png_named.dcm")
    assert img.source_format == "png"
    np.testing.assert_allclose(img.pixels, a / 65535.0, atol=1e-7)

    d = ramp(top=4095, dtype=np.uint16)
    (tmp_path / "dicom_named.png").write_bytes(dicom_bytes(tmp_path, d))
    img = read_ok(tmp_path / "dicom_named.png")
    assert img.source_format == "dicom"
    np.testing.assert_allclose(img.pixels, d / 4095.0, atol=1e-6)

    (tmp_path / "tiff_named.jpg").write_bytes(cv2.imencode(".tif", a)[1].tobytes())
    assert read_ok(tmp_path / "tiff_named.jpg").source_format == "tiff"
    (tmp_path / "dicom_no_suffix").write_bytes(dicom_bytes(tmp_path, d))
    assert read_ok(tmp_path / "dicom_no_suffix").source_format == "dicom"


# ----------------------------------------------------------------------------- permissions
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root can read a chmod 000 file")
def test_unreadable_file_chmod(tmp_path):
    path = tmp_path / "locked.png"
    cv2.imwrite(str(path), ramp())
    path.chmod(0)
    try:
        refused(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_unreadable_file_monkeypatched(tmp_path, monkeypatch):
    path = tmp_path / "locked.png"
    cv2.imwrite(str(path), ramp())
    deny_open(monkeypatch, path)
    refused(path, "permission denied")


# ----------------------------------------------------------------------------- DICOM oddities
def test_dicom_with_non_integer_header_value(tmp_path):
    import pydicom

    dicom_bytes(tmp_path)
    ds = pydicom.dcmread(tmp_path / "img.dcm")
    ds.NumberOfFrames = 1
    ds.save_as(tmp_path / "frames.dcm")
    data = (tmp_path / "frames.dcm").read_bytes()
    element = b"\x28\x00\x08\x00IS\x02\x001 "  # (0028,0008) IS "1 "
    assert data.count(element) == 1
    (tmp_path / "bad_frames.dcm").write_bytes(data.replace(element, element[:-2] + b"x1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid IS value
        refused(tmp_path / "bad_frames.dcm", "invalid NumberOfFrames value 'x1'")


def test_dicom_without_pixel_data_says_what_it_is(tmp_path):
    import pydicom
    dicom_bytes(tmp_path)
    ds = pydicom.dcmread(tmp_path / "img.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "stripped.dcm")
    refused(tmp_path / "stripped.dcm", "DX: no pixel data", "image header without pixel data")
