"""data.readers: DICOM / PNG / JPEG / TIFF into float32 [0, 1], bone bright (docs/formats.md)."""
import struct
import time
import zlib

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, UID, generate_uid

from data import readers
from data.readers import ImageReadError, RadiographImage, is_dicom, read_image

IDENTIFIERS = ("PatientName", "PatientID", "PatientBirthDate")


# ----------------------------------------------------------------------------- helpers
def pydicom_file(name):
    """Path of a pydicom bundled test file, or skip (never download: no network here)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not bundled with pydicom {pydicom.__version__}")
    return path


def write_dicom(path, arr, photometric="MONOCHROME2", bits_stored=12, signed=False,
                frames=None, pixel_data=None, transfer_syntax=ExplicitVRLittleEndian, **attrs):
    """Write a 16-bit-allocated DX file (with patient identifiers) from a numpy array."""
    arr = np.asarray(arr)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1.1")
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.ViewPosition = "LL"
    ds.BodyPartExamined = "LSPINE"
    ds.PatientName = "Doe^John"
    ds.PatientID = "123456"
    ds.PatientBirthDate = "19500101"
    ds.Rows, ds.Columns = arr.shape[-2:]
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    for key, value in attrs.items():
        setattr(ds, key, value)
    if pixel_data is None:
        pixel_data = arr.astype("<i2" if signed else "<u2").tobytes()
    ds.PixelData = pixel_data
    if UID(transfer_syntax).is_compressed:
        ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return str(path)


def gradient(h=32, w=40, top=4095):
    return np.round(np.linspace(0, top, h * w)).reshape(h, w).astype(np.uint16)


def png_header(width, height, bit_depth=8, colour_type=0):
    """A PNG signature + IHDR chunk (+ tiny IDAT + IEND): decodes to nothing sensible."""
    def chunk(kind, payload):
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 8))
            + chunk(b"IEND", b""))


def check_image(img, shape=None):
    assert isinstance(img, RadiographImage)
    a = img.pixels
    assert a.dtype == np.float32 and a.ndim == 2
    if shape is not None:
        assert a.shape == tuple(shape)
    assert np.isfinite(a).all() and a.min() >= 0.0 and a.max() <= 1.0
    assert a.max() > a.min(), "constant image"
    for key in IDENTIFIERS:
        assert key not in img.info


def corr(a, b):
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


# ----------------------------------------------------------------------------- pydicom files
READABLE = [
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEG2000.dcm",
    "693_J2KI.dcm",
    "JPGExtended.dcm",
    "image_dfl.dcm",
    "emri_small.dcm",
]


@pytest.mark.parametrize("name", READABLE)
def test_pydicom_files_read(name):
    path = pydicom_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    img = read_image(path)
    check_image(img, (ds.Rows, ds.Columns))
    assert img.source_format == "dicom"
    assert img.bits_stored == ds.BitsStored
    assert img.photometric == ds.PhotometricInterpretation
    assert img.frames == int(ds.get("NumberOfFrames", 1) or 1)
    assert img.info["Rows"] == ds.Rows and img.info["Columns"] == ds.Columns
    assert img.info.get("Modality") == ds.get("Modality")
    assert is_dicom(path)


@pytest.mark.parametrize("compressed", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                        "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"])
def test_compressed_matches_uncompressed(compressed):
    ref = read_image(pydicom_file("MR_small.dcm")).pixels
    other = read_image(pydicom_file(compressed)).pixels
    assert other.shape == ref.shape
    assert corr(ref, other) > 0.99
    assert np.abs(ref - other).max() < 1e-3  # lossless


def test_stored_bit_range_scaling_ct():
    # CT_small: signed 16 bits stored, intercept -1024: range [-32768, 32767] - 1024
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = (hu - (-32768 - 1024)) / 65535.0
    np.testing.assert_allclose(read_image(path).pixels, expected, atol=1e-6)
    assert read_image(path).pixel_spacing_mm == pytest.approx((0.661468, 0.661468))


@pytest.mark.parametrize("name, reason", [
    ("SC_rgb.dcm", "RGB: not a greyscale radiograph"),
    ("SC_rgb_small_odd.dcm", "RGB: not a greyscale radiograph"),
    ("SC_ybr_full_422_uncompressed.dcm", "YBR_FULL_422: not a greyscale radiograph"),
    ("examples_palette.dcm", "PALETTE COLOR: not a greyscale radiograph"),
    ("rtplan.dcm", "RTPLAN: no pixel data"),
    ("test-SR.dcm", "SR: no pixel data"),
    ("MR_truncated.dcm", "truncated or corrupt pixel data"),
])
def test_pydicom_files_refused(name, reason):
    path = pydicom_file(name)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert reason in err.value.reason
    assert str(err.value).startswith(f"{path}: ")
    assert "\n" not in str(err.value)


def test_jpeg_lossy_reads_or_names_transfer_syntax():
    # 12-bit JPEG Extended: pylibjpeg's libjpeg rejects this particular file; either it reads,
    # or the refusal says which transfer syntax could not be decoded.
    path = pydicom_file("JPEG-lossy.dcm")
    try:
        img = read_image(path)
    except ImageReadError as e:
        assert "JPEG Extended" in e.reason and "1.2.840.10008.1.2.4.51" in e.reason
    else:
        check_image(img, (1024, 256))


def test_preamble_less_dicom_detected():
    path = pydicom_file("ExplVR_LitEndNoMeta.dcm")
    assert is_dicom(path)
    with pytest.raises(ImageReadError, match="RTPLAN: no pixel data"):
        read_image(path)


def test_multiframe_pydicom_file_uses_first_frame():
    path = pydicom_file("rtdose.dcm")  # 15 frames of 10 x 10, 32 bits stored
    img = read_image(path)
    assert img.frames == 15 and img.pixels.shape == (10, 10)
    frame0 = pydicom.dcmread(path).pixel_array[0].astype(np.float64)
    np.testing.assert_allclose(img.pixels, frame0 / (2**32 - 1), rtol=1e-5, atol=1e-9)


def test_multiframe_written(tmp_path):
    stack = np.stack([gradient(), gradient()[::-1], np.zeros((32, 40), np.uint16)])
    path = write_dicom(tmp_path / "mf.dcm", stack, frames=3)
    img = read_image(path)
    assert img.frames == 3
    np.testing.assert_allclose(img.pixels, stack[0] / 4095.0, atol=1e-6)


# ----------------------------------------------------------------------------- written DICOM
def test_monochrome1_inverted(tmp_path):
    g = gradient()
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", g, "MONOCHROME2"))
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", g, "MONOCHROME1"))
    np.testing.assert_allclose(m2.pixels, g / 4095.0, atol=1e-6)
    np.testing.assert_allclose(m1.pixels, 1.0 - m2.pixels, atol=1e-6)
    assert m1.photometric == "MONOCHROME1" and m2.photometric == "MONOCHROME2"
    assert m1.bits_stored == 12


def test_monochrome1_inverted_after_window(tmp_path):
    g = gradient()
    kw = dict(WindowCenter=2048, WindowWidth=1024)
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", g, "MONOCHROME2", **kw), voi_lut=True)
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", g, "MONOCHROME1", **kw), voi_lut=True)
    np.testing.assert_allclose(m1.pixels, 1.0 - m2.pixels, atol=1e-6)


def test_voi_window(tmp_path):
    g = gradient()
    path = write_dicom(tmp_path / "w.dcm", g, WindowCenter=2048, WindowWidth=1024)
    plain = read_image(path).pixels
    win = read_image(path, voi_lut=True).pixels
    assert not np.allclose(plain, win)
    assert (win[g < 1500] == 0.0).all() and (win[g > 2600] == 1.0).all()
    inside = (g > 1600) & (g < 2500)
    np.testing.assert_allclose(win[inside], (g[inside] - 1535.5) / 1023.0, atol=1e-3)
    np.testing.assert_allclose(plain, g / 4095.0, atol=1e-6)


def test_voi_lut_true_without_window_falls_back(tmp_path):
    g = gradient()
    path = write_dicom(tmp_path / "nw.dcm", g)
    np.testing.assert_array_equal(read_image(path, voi_lut=True).pixels, read_image(path).pixels)


def test_voi_on_pydicom_file():
    path = pydicom_file("MR_small.dcm")  # WindowCenter 600, WindowWidth 1600
    plain = read_image(path).pixels
    win_img = read_image(path, voi_lut=True)
    check_image(win_img, (64, 64))
    win = win_img.pixels
    assert not np.allclose(plain, win)
    assert win.max() == 1.0  # values above the window saturate


@pytest.mark.parametrize("slope, intercept", [(2.0, -100.0), (-1.0, 4095.0)])
def test_modality_rescale(tmp_path, slope, intercept):
    g = gradient()
    path = write_dicom(tmp_path / "r.dcm", g, RescaleSlope=slope, RescaleIntercept=intercept)
    expected = g / 4095.0 if slope > 0 else 1.0 - g / 4095.0
    np.testing.assert_allclose(read_image(path).pixels, expected, atol=1e-6)


def test_signed_stored_range(tmp_path):
    g = gradient().astype(np.int16) - 2048  # [-2048, 2047]
    path = write_dicom(tmp_path / "s.dcm", g, signed=True)
    np.testing.assert_allclose(read_image(path).pixels, (g + 2048) / 4095.0, atol=1e-6)


@pytest.mark.parametrize("attrs, expected", [
    ({"PixelSpacing": [0.15, 0.2]}, (0.15, 0.2)),
    ({"ImagerPixelSpacing": [0.143, 0.144]}, (0.143, 0.144)),
    ({"PixelSpacing": [0.1, 0.1], "ImagerPixelSpacing": [0.143, 0.143]}, (0.1, 0.1)),
    ({}, None),
])
def test_pixel_spacing(tmp_path, attrs, expected):
    img = read_image(write_dicom(tmp_path / "ps.dcm", gradient(), **attrs))
    if expected is None:
        assert img.pixel_spacing_mm is None
    else:
        assert img.pixel_spacing_mm == pytest.approx(expected)


def test_info_has_no_identifiers(tmp_path):
    img = read_image(write_dicom(tmp_path / "id.dcm", gradient()))
    check_image(img, (32, 40))
    for key in IDENTIFIERS:
        assert key not in img.info
    assert "Doe" not in repr(img.info) and "123456" not in repr(img.info)
    assert img.info["Modality"] == "DX" and img.info["ViewPosition"] == "LL"
    assert img.info["BodyPartExamined"] == "LSPINE"
    assert set(img.info) <= set(readers.INFO_KEYWORDS)
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert key in img.info


def test_dicom_pixel_limit_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "huge.dcm", np.zeros((2, 2), np.uint16),
                       pixel_data=b"\x00" * 8, Rows=60000, Columns=60000)
    start = time.perf_counter()
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert time.perf_counter() - start < 2.0
    assert "image of 60000 x 60000 = 3600000000 pixels exceeds the limit of 50000000" \
        in err.value.reason


def test_dicom_missing_codec_names_transfer_syntax(tmp_path):
    mpeg2 = "1.2.840.10008.1.2.4.100"  # no pixel data decoder in pydicom
    frag = b"\x00" * 16
    encap = (b"\xfe\xff\x00\xe0" + struct.pack("<I", 0)
             + b"\xfe\xff\x00\xe0" + struct.pack("<I", len(frag)) + frag
             + b"\xfe\xff\xdd\xe0" + struct.pack("<I", 0))
    path = write_dicom(tmp_path / "mpeg.dcm", np.zeros((8, 8), np.uint16), pixel_data=encap,
                       transfer_syntax=mpeg2)
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert mpeg2 in err.value.reason and "MPEG2" in err.value.reason


def test_dicom_named_png_and_png_named_dcm(tmp_path):
    g = gradient()
    dcm_as_png = write_dicom(tmp_path / "really_dicom.png", g)
    img = read_image(dcm_as_png)
    assert img.source_format == "dicom"
    np.testing.assert_allclose(img.pixels, g / 4095.0, atol=1e-6)

    g16 = (gradient() * 16).astype(np.uint16)
    png_as_dcm = tmp_path / "really_png.dcm"
    ok, buf = cv2.imencode(".png", g16)
    png_as_dcm.write_bytes(buf.tobytes())
    assert not is_dicom(png_as_dcm)
    img = read_image(png_as_dcm)
    assert img.source_format == "png"
    np.testing.assert_allclose(img.pixels, g16 / 65535.0, atol=1e-6)

    jpg_as_png = tmp_path / "really_jpeg.png"
    ok, buf = cv2.imencode(".jpg", (g // 16).astype(np.uint8))
    jpg_as_png.write_bytes(buf.tobytes())
    assert read_image(jpg_as_png).source_format == "jpeg"


# ----------------------------------------------------------------------------- raster files
def test_png_8bit(tmp_path):
    a = np.zeros((20, 30), np.uint8)
    a[:, 10:20], a[:, 20:] = 128, 255
    cv2.imwrite(str(tmp_path / "a.png"), a)
    img = read_image(tmp_path / "a.png")
    check_image(img, (20, 30))
    assert img.source_format == "png" and img.bits_stored == 8 and img.frames == 1
    assert img.photometric == "MONOCHROME2" and img.pixel_spacing_mm is None
    np.testing.assert_allclose(img.pixels, a / 255.0, atol=1e-7)


def test_png_16bit(tmp_path):
    a = np.zeros((20, 30), np.uint16)
    a[:, 10:20], a[:, 20:] = 32768, 65535
    cv2.imwrite(str(tmp_path / "a.png"), a)
    img = read_image(tmp_path / "a.png")
    assert img.bits_stored == 16
    assert img.pixels[0, 0] == 0.0 and img.pixels[0, 25] == 1.0
    assert img.pixels[0, 15] == pytest.approx(0.5, abs=1e-4)


def test_jpeg(tmp_path):
    a = np.full((32, 48), 40, np.uint8)
    a[8:24, 16:32] = 200
    cv2.imwrite(str(tmp_path / "a.jpg"), a, [cv2.IMWRITE_JPEG_QUALITY, 95])
    img = read_image(tmp_path / "a.jpg")
    check_image(img, (32, 48))
    assert img.source_format == "jpeg"
    assert img.pixels[12:20, 20:28].mean() == pytest.approx(200 / 255, abs=0.02)
    assert img.pixels[:4, :4].mean() == pytest.approx(40 / 255, abs=0.02)


def test_jpeg_grey_saved_as_rgb(tmp_path):
    a = np.full((32, 48), 40, np.uint8)
    a[8:24, 16:32] = 200
    cv2.imwrite(str(tmp_path / "rgb.jpg"), np.dstack([a] * 3))
    img = read_image(tmp_path / "rgb.jpg")
    assert img.pixels[12:20, 20:28].mean() == pytest.approx(200 / 255, abs=0.02)


def test_tiff_16bit_and_multipage(tmp_path):
    a = gradient(top=65535)
    cv2.imwrite(str(tmp_path / "a.tif"), a)
    img = read_image(tmp_path / "a.tif")
    assert img.source_format == "tiff" and img.bits_stored == 16
    np.testing.assert_allclose(img.pixels, a / 65535.0, atol=1e-7)

    pages = [Image.fromarray((a >> 8).astype(np.uint8)), Image.fromarray(np.zeros((32, 40), np.uint8))]
    pages[0].save(tmp_path / "mp.tiff", save_all=True, append_images=pages[1:])
    img = read_image(tmp_path / "mp.tiff")
    assert img.frames == 2
    np.testing.assert_allclose(img.pixels, (a >> 8) / 255.0, atol=1e-7)


def test_tiff_float(tmp_path):
    a = np.linspace(0.1, 0.9, 32 * 40, dtype=np.float32).reshape(32, 40)
    Image.fromarray(a).save(tmp_path / "in_range.tif")
    img = read_image(tmp_path / "in_range.tif")
    np.testing.assert_allclose(img.pixels, a, atol=1e-7)  # already in [0, 1]: kept
    Image.fromarray(a * 1000 - 200).save(tmp_path / "out_of_range.tif")
    img = read_image(tmp_path / "out_of_range.tif")  # otherwise min-max scaled
    np.testing.assert_allclose(img.pixels, (a - 0.1) / 0.8, atol=1e-5)


def test_colour_png_refused_grey_rgb_accepted(tmp_path):
    g = (gradient() // 16).astype(np.uint8)
    colour = np.dstack([g, g, 255 - g])
    cv2.imwrite(str(tmp_path / "colour.png"), colour)
    with pytest.raises(ImageReadError, match=r"colour image \(3 channels\): not a greyscale"):
        read_image(tmp_path / "colour.png")
    cv2.imwrite(str(tmp_path / "colour4.png"), np.dstack([colour, np.full_like(g, 255)]))
    with pytest.raises(ImageReadError, match=r"colour image \(4 channels\)"):
        read_image(tmp_path / "colour4.png")

    for name, arr in [("grey3.png", np.dstack([g] * 3)),
                      ("grey4.png", np.dstack([g] * 3 + [np.full_like(g, 255)]))]:
        cv2.imwrite(str(tmp_path / name), arr)
        img = read_image(tmp_path / name)
        np.testing.assert_allclose(img.pixels, g / 255.0, atol=1e-7)
    g16 = gradient(top=65535)
    cv2.imwrite(str(tmp_path / "grey16rgb.png"), np.dstack([g16] * 3))
    np.testing.assert_allclose(read_image(tmp_path / "grey16rgb.png").pixels, g16 / 65535.0, atol=1e-7)


# ----------------------------------------------------------------------------- bad files
def test_empty_file(tmp_path):
    for name in ("empty.png", "empty.dcm"):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(ImageReadError, match="empty file"):
            read_image(tmp_path / name)
        assert not is_dicom(tmp_path / name)


def test_truncated_png(tmp_path):
    cv2.imwrite(str(tmp_path / "full.png"), gradient(top=65535))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(tmp_path / "cut.png")
    (tmp_path / "tiny.png").write_bytes(data[:20])  # cut inside IHDR
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(tmp_path / "tiny.png")


def test_truncated_jpeg(tmp_path):
    cv2.imwrite(str(tmp_path / "full.jpg"), (gradient() // 16).astype(np.uint8))
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(ImageReadError, match="truncated or corrupt"):
        read_image(tmp_path / "cut.jpg")


def test_truncated_dicom(tmp_path):
    path = write_dicom(tmp_path / "full.dcm", gradient())
    with open(path, "rb") as fh:
        data = fh.read()
    for size in (len(data) - 500, 400, 300, 140):  # in the pixel data, the header, the meta
        (tmp_path / "cut.dcm").write_bytes(data[:size])
        with pytest.raises(ImageReadError, match="truncated or corrupt"):
            read_image(tmp_path / "cut.dcm")


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="not a DICOM or image file"):
        read_image(tmp_path / "notes.png")


def test_bmp_refused_clearly(tmp_path):
    cv2.imwrite(str(tmp_path / "a.bmp"), (gradient() // 16).astype(np.uint8))
    with pytest.raises(ImageReadError, match=r"unsupported image format \(BMP\)"):
        read_image(tmp_path / "a.bmp")


def test_png_header_over_pixel_limit_refused_quickly(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(100000, 100000))
    start = time.perf_counter()
    with pytest.raises(ImageReadError) as err:
        read_image(path)
    assert time.perf_counter() - start < 1.0
    assert err.value.reason == ("image of 100000 x 100000 = 10000000000 pixels exceeds the "
                                "limit of 50000000")


def test_jpeg_header_over_pixel_limit_refused(tmp_path):
    ok, buf = cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))
    data = bytearray(buf.tobytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 50000)  # height, width
    (tmp_path / "bomb.jpg").write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match="image of 50000 x 60000 = 3000000000 pixels exceeds"):
        read_image(tmp_path / "bomb.jpg")
    assert time.perf_counter() - start < 1.0


def test_max_pixels_argument(tmp_path):
    cv2.imwrite(str(tmp_path / "a.tif"), gradient(top=65535))
    with pytest.raises(ImageReadError, match="image of 40 x 32 = 1280 pixels exceeds the limit of 1000"):
        read_image(tmp_path / "a.tif", max_pixels=1000)
    assert read_image(tmp_path / "a.tif", max_pixels=1280).pixels.shape == (32, 40)
    path = write_dicom(tmp_path / "a.dcm", gradient())
    with pytest.raises(ImageReadError, match="exceeds the limit of 1000"):
        read_image(path, max_pixels=1000)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError):
        read_image(tmp_path)
    assert not is_dicom(tmp_path / "nope.dcm")


def test_unexpected_exception_wrapped_on_one_line(tmp_path, monkeypatch):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((4, 4), np.uint8))

    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(readers, "_read_raster", boom)
    with pytest.raises(ImageReadError) as err:
        read_image(tmp_path / "a.png")
    assert err.value.reason == "RuntimeError: boom second line"
    assert err.value.path == str(tmp_path / "a.png")
    assert "\n" not in str(err.value)


def test_suffix_sets():
    assert readers.image_suffixes() == {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
    assert readers.DICOM_SUFFIXES == {".dcm", ".dicom", ""}
    assert readers.readable_formats() == "DICOM, PNG, JPEG or TIFF"


def test_a_new_raster_format_is_one_table_entry(tmp_path, monkeypatch):
    """BMP, which OpenCV decodes, added as one RasterFormat: read, found in a folder, named in errors."""
    import cv2

    from data.discovery import find_inputs

    film = (np.arange(40 * 30, dtype=np.uint32).reshape(40, 30) % 256).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "film.bmp"), film)
    with pytest.raises(ImageReadError):
        read_image(tmp_path / "film.bmp")
    assert find_inputs([str(tmp_path)])[0] == []
    monkeypatch.setattr(readers, "RASTER_FORMATS",
                        readers.RASTER_FORMATS + (readers.RasterFormat("bmp", (".bmp",), (b"BM",)),))
    img = read_image(tmp_path / "film.bmp")
    assert img.pixels.shape == (40, 30) and np.allclose(img.pixels, film / 255.0, atol=1e-6)
    assert find_inputs([str(tmp_path)])[0] == [str(tmp_path / "film.bmp")]
    assert readers.readable_formats().endswith("TIFF or BMP")
