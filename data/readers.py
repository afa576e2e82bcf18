"""Read spine radiographs (DICOM, PNG, JPEG, TIFF) into float32 arrays in [0, 1], bone bright.

The format is chosen by the file's *content*, never by its suffix alone: a DICOM file named
``.png`` or a PNG named ``.dcm`` reads correctly.

Rules (see ``docs/formats.md``, section "Image readers"):

Raster files (PNG / JPEG / TIFF)
    * unsigned integers: ``value / dtype maximum`` (8-bit ``/255``, 16-bit ``/65535``);
      signed integers: ``value / dtype maximum``, negatives clipped to 0; 1-bit: 0 or 1.
    * floating point (TIFF): must be finite; used as is when already inside [0, 1], otherwise
      min-max scaled to [0, 1] (a constant image becomes all zeros).
    * RGB / RGBA (and palette) files are accepted only when the colour channels are equal
      (grey saved as colour; lossy JPEG may differ by 2 grey levels per 8 bits); the alpha
      channel is ignored. Anything else is refused as a colour image.
    * multi-page TIFF: the first page is read and ``frames`` records the page count.
    * EXIF orientation is not applied; pixel spacing is not read (``None``).

DICOM (pydicom)
    * refused: no pixel data, ``SamplesPerPixel != 1`` or a photometric interpretation other
      than MONOCHROME1/2, a transfer syntax with no available decoder, undecodable data.
      A missing PhotometricInterpretation with one sample per pixel is taken as MONOCHROME2.
    * multi-frame: only the first frame is decoded; ``frames`` records the frame count.
    * a header integer (Rows, BitsStored, NumberOfFrames, ...) that is not an integer, or a
      file that ends inside its pixel data, is refused with a message naming it. A file
      without pixel data is refused as "<modality or SOP class>: no pixel data", saying
      when the file is truncated; a DICOMDIR is refused as a media directory.
    * modality LUT (or rescale slope/intercept) always; then, only with ``voi_lut=True`` and
      when the file has a VOI LUT or window, the VOI LUT / window, scaled to [0, 1] by the
      window's output range. Otherwise the image is scaled by the range of values that
      ``BitsStored`` / ``PixelRepresentation`` can represent, passed through the modality LUT;
      if that range is degenerate (or the data are float pixel data), by the image's own
      min / max.
    * MONOCHROME1 is inverted (``1 - x``) after scaling, so bone is bright.
    * pixel values that are NaN or infinite (float pixel data, or after the modality LUT) are
      refused, as in floating-point TIFFs.

Every result is clipped to [0, 1] and is float32. Any failure is raised as
:class:`ImageReadError` with a one-line message ``"{path}: {reason}"``; no other exception
escapes :func:`read_image`. Images with more than ``max_pixels`` pixels are refused from the
header, before any pixel data are decoded.

Reduced decoding (``min_decoded_size``, used by inference on large films)
    A film may be decoded reduced 2, 4 or 8 times per axis, the largest factor that keeps it at
    least ``min_decoded_size`` (:func:`reduction_factor`): JPEG files and JPEG baseline DICOM in
    the DCT domain (Pillow's ``draft``), JPEG 2000 DICOM at a lower resolution level (Pillow's
    OpenJPEG ``reduce``), anything else decoded whole and then reduced by block means
    (:func:`data.transforms.area_reduce`) before anything else is done with it.
    ``RadiographImage.grid`` says where the decoded pixels lie on the film as stored; pixel
    spacing and ``info`` stay the original film's.
"""
from __future__ import annotations

import contextlib
import io
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from data.transforms import PixelGrid, area_reduce


@dataclass(frozen=True)
class RasterFormat:
    """A raster format read through OpenCV (Pillow as the fallback): recognised by its magic
    bytes, listed by its suffixes. A new format that either library decodes is one entry of
    :data:`RASTER_FORMATS`; discovery and the error messages follow from the table."""

    name: str
    suffixes: tuple[str, ...]
    magics: tuple[bytes, ...]


RASTER_FORMATS = (
    RasterFormat("png", (".png",), (b"\x89PNG\r\n\x1a\n",)),
    RasterFormat("jpeg", (".jpg", ".jpeg"), (b"\xff\xd8\xff",)),
    RasterFormat("tiff", (".tif", ".tiff"), (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
)
DICOM_SUFFIXES = {".dcm", ".dicom", ""}


def image_suffixes() -> set[str]:
    """The suffixes of the raster formats (DICOM files may have any suffix or none)."""
    return {s for f in RASTER_FORMATS for s in f.suffixes}


def raster_magics() -> tuple[bytes, ...]:
    return tuple(m for f in RASTER_FORMATS for m in f.magics)


def readable_formats() -> str:
    names = [f.name.upper() for f in RASTER_FORMATS]
    return "DICOM, " + ", ".join(names[:-1]) + f" or {names[-1]}"

# Non-identifying DICOM attributes copied to RadiographImage.info (never patient identifiers).
INFO_KEYWORDS = (
    "Modality",
    "ViewPosition",
    "BodyPartExamined",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Rows",
    "Columns",
)

# Recognised only to give a clearer refusal.
_OTHER_MAGICS = (
    (b"BM", "BMP"),
    (b"GIF8", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"\x1f\x8b", "gzip-compressed file"),
    (b"PK\x03\x04", "ZIP archive"),
)


class ImageReadError(Exception):
    """An image could not be read; ``str(err)`` is one line: ``"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line
        super().__init__(f"{self.path}: {self.reason}")


@dataclass
class RadiographImage:
    pixels: np.ndarray  # float32 (H, W) in [0, 1], bone bright
    path: str
    source_format: str  # "dicom", "png", "jpeg", "tiff"
    bits_stored: int | None
    pixel_spacing_mm: tuple[float, float] | None  # (row, col)
    photometric: str | None
    frames: int
    info: dict = field(default_factory=dict)
    # DICOM only: the parsed header without its pixel data, so that nothing reads the file twice
    header: Any = None
    # where ``pixels`` lie on the film as stored (a reduced decode); None: pixel for pixel
    grid: PixelGrid | None = None

    def __post_init__(self):
        if self.grid is None:
            self.grid = PixelGrid(tuple(int(v) for v in self.pixels.shape[:2]))

    @property
    def original_size(self) -> tuple[int, int]:
        """Rows and columns of the film as stored (``pixels`` may be a reduced decode of it)."""
        return self.grid.original_size


# --------------------------------------------------------------------------------------
# format detection
# --------------------------------------------------------------------------------------
def _head(path: str | os.PathLike, n: int = 132) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a DICOM Part 10 file ('DICM' at offset 128).

    Also true for a preamble-less dataset that starts with a group 0008 element and that
    pydicom parses into a plausible dataset (old ACR-NEMA style files). Never raises.
    """
    try:
        head = _head(path)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8 or head[:2] not in (b"\x08\x00", b"\x00\x08"):
        return False
    try:
        import pydicom

        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return len(ds) >= 3 and ("SOPClassUID" in ds or "Modality" in ds)
    except Exception:
        return False


def _raster_kind(head: bytes) -> str | None:
    return next((f.name for f in RASTER_FORMATS if head.startswith(f.magics)), None)


def _other_kind(head: bytes) -> str | None:
    for magic, name in _OTHER_MAGICS:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return None


REDUCTIONS = (8, 4, 2)  # what JPEG's DCT scaling offers, and JPEG 2000's first three resolution levels


def reduction_factor(rows: int, cols: int, min_decoded_size: tuple[int, int] | None) -> int:
    """The largest of 8, 4 and 2 by which a ``rows`` x ``cols`` film may be decoded reduced and
    still have at least ``min_decoded_size[0]`` rows or ``min_decoded_size[1]`` columns (so that
    letterboxed into that size it is not enlarged); 1 when none does, or with no minimum."""
    if min_decoded_size is None:
        return 1
    min_rows, min_cols = min_decoded_size
    for factor in REDUCTIONS:
        if -(-int(rows) // factor) >= min_rows or -(-int(cols) // factor) >= min_cols:
            return factor
    return 1


def _check_limit(path, width: int, height: int, max_pixels: int | None) -> None:
    n = int(width) * int(height)
    if max_pixels is not None and n > max_pixels:
        raise ImageReadError(
            path, f"image of {width} x {height} = {n} pixels exceeds the limit of {max_pixels}"
        )


# --------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------
def read_image(
    path: str | os.PathLike, voi_lut: bool = False, max_pixels: int | None = 50_000_000,
    min_decoded_size: tuple[int, int] | None = None,
) -> RadiographImage:
    """Read a radiograph into float32 pixels in [0, 1], bone bright; see the module docstring.

    ``min_decoded_size`` (rows, columns): decode a large film reduced, as far as
    :func:`reduction_factor` allows (module docstring, "Reduced decoding"); None: full size.

    Multi-frame files (multi-frame DICOM, multi-page TIFF): only the **first** frame / page is
    decoded and returned; ``RadiographImage.frames`` records how many the file holds
    (DICOM ``NumberOfFrames``, TIFF page count; 1 for single-frame files).

    Raises :class:`ImageReadError` (one-line ``"{path}: {reason}"``) for anything that is not
    a readable greyscale radiograph; no other exception escapes.
    """
    try:
        p = Path(path)
        if not p.exists():
            raise ImageReadError(path, "no such file")
        if p.is_dir():
            raise ImageReadError(path, "is a directory, not an image file")
        if p.stat().st_size == 0:
            raise ImageReadError(path, "empty file")
        head = _head(p)
        if is_dicom(p):
            return _read_dicom(p, voi_lut=voi_lut, max_pixels=max_pixels, min_decoded_size=min_decoded_size)
        kind = _raster_kind(head)
        if kind is not None:
            return _read_raster(p, kind, max_pixels=max_pixels, min_decoded_size=min_decoded_size)
        other = _other_kind(head)
        if other is not None:
            raise ImageReadError(
                path, f"unsupported image format ({other}); expected {readable_formats()}"
            )
        raise ImageReadError(path, "not a DICOM or image file")
    except ImageReadError:
        raise
    except PermissionError as e:
        raise ImageReadError(path, "permission denied: cannot open the file") from e
    except OSError as e:
        raise ImageReadError(
            path, f"cannot read the file: {e.strerror or type(e).__name__}"
        ) from e
    except Exception as e:  # never let anything else escape
        raise ImageReadError(path, f"{type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------------------
# raster
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _pil_without_bomb_check():
    """Our own max_pixels check replaces Pillow's decompression-bomb guard."""
    import warnings

    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # e.g. corrupt EXIF: we refuse or read
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _raster_header(path, kind: str) -> tuple[int, int, int]:
    """(width, height, frames) from the header, without decoding pixels."""
    if kind == "png":
        # signature (8) + IHDR length (4) + b"IHDR" (4) + width (4) + height (4)
        with open(path, "rb") as fh:
            ihdr = fh.read(33)
        if len(ihdr) < 24 or ihdr[12:16] != b"IHDR":
            raise ImageReadError(path, "truncated or corrupt PNG: no IHDR header")
        width, height = struct.unpack(">II", ihdr[16:24])
        return width, height, 1
    from PIL import Image

    try:
        with _pil_without_bomb_check(), Image.open(path) as im:
            width, height = im.size
            frames = int(getattr(im, "n_frames", 1) or 1) if kind == "tiff" else 1
    except Exception as e:
        raise ImageReadError(
            path, f"truncated or corrupt {kind.upper()} header: {type(e).__name__}: {e}"
        ) from e
    return width, height, frames


def _jpeg_truncated(data: bytes) -> bool:
    # libjpeg only warns on a premature end and fills the rest with grey, so check that an
    # end-of-image marker follows the last start-of-scan marker.
    return data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def _decode_with_pil(path, data: bytes, kind: str) -> np.ndarray:
    from PIL import Image

    try:
        with _pil_without_bomb_check(), Image.open(io.BytesIO(data)) as im:
            im.seek(0)
            im.load()
            if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGBA" if im.mode == "PA" else "RGB")
            arr = np.asarray(im)
    except Exception as e:
        raise ImageReadError(
            path, f"truncated or corrupt {kind.upper()} file: {type(e).__name__}: {e}"
        ) from e
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _to_grey(path, arr: np.ndarray, kind: str) -> np.ndarray:
    if arr.ndim == 2:
        return arr
    if arr.ndim != 3:
        raise ImageReadError(path, f"unexpected image array of shape {arr.shape}")
    c = arr.shape[2]
    if c == 1:
        return arr[:, :, 0]
    if c == 2:  # grey + alpha
        return arr[:, :, 0]
    if c in (3, 4):
        colour = arr[:, :, :3]
        if kind == "jpeg" and np.issubdtype(arr.dtype, np.integer):
            tol = 2 * max(1, np.iinfo(arr.dtype).max // 255)
            wide = colour.astype(np.int64)
            spread = int((wide.max(axis=2) - wide.min(axis=2)).max())
            if spread <= tol:
                return np.rint(wide.mean(axis=2)).astype(arr.dtype)
        elif (colour[:, :, 0] == colour[:, :, 1]).all() and (
            colour[:, :, 1] == colour[:, :, 2]
        ).all():
            return colour[:, :, 0]
        raise ImageReadError(path, f"colour image ({c} channels): not a greyscale radiograph")
    raise ImageReadError(path, f"image with {c} channels: not a greyscale radiograph")


def _scale_raster(path, arr: np.ndarray) -> tuple[np.ndarray, int | None]:
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), 1
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        out = arr.astype(np.float64) / float(info.max)
        return np.clip(out, 0.0, 1.0).astype(np.float32), info.bits
    if np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float64)
        if not np.isfinite(out).all():
            raise ImageReadError(path, "floating-point image contains NaN or infinite values")
        lo, hi = float(out.min()), float(out.max())
        if lo < 0.0 or hi > 1.0:
            out = (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        return np.clip(out, 0.0, 1.0).astype(np.float32), None
    raise ImageReadError(path, f"unsupported pixel type {arr.dtype}")


def _jpeg_reduced(data: bytes, rows: int, cols: int, factor: int) -> np.ndarray | None:
    """A JPEG decoded ``factor`` times smaller in the DCT domain (each pixel an f x f block's
    mean), or None where Pillow cannot (the full decode then says what is wrong, if anything)."""
    from PIL import Image

    want = (-(-cols // factor), -(-rows // factor))
    try:
        with _pil_without_bomb_check(), Image.open(io.BytesIO(data)) as im:
            if im.format != "JPEG" or im.mode not in ("L", "RGB") or im.size != (cols, rows):
                return None
            im.draft(im.mode, (cols // factor, rows // factor))  # Pillow picks the largest scale that fits
            if im.size != want:
                return None
            im.load()
            arr = np.asarray(im)
    except Exception:
        return None
    return arr if arr.shape[:2] == want[::-1] else None


def _read_raster(path: Path, kind: str, max_pixels: int | None,
                 min_decoded_size: tuple[int, int] | None = None) -> RadiographImage:
    width, height, frames = _raster_header(path, kind)
    _check_limit(path, width, height, max_pixels)
    if width == 0 or height == 0:
        raise ImageReadError(path, f"truncated or corrupt {kind.upper()}: image of size 0")
    data = path.read_bytes()
    if kind == "jpeg" and _jpeg_truncated(data):
        raise ImageReadError(path, "truncated or corrupt JPEG: no end-of-image marker")
    factor = reduction_factor(height, width, min_decoded_size)
    arr = _jpeg_reduced(data, height, width, factor) if kind == "jpeg" and factor > 1 else None
    drafted = arr is not None  # already reduced, in the DCT domain
    if arr is not None:
        arr = _to_grey(path, arr, kind)
    else:
        arr = _decode_raster(path, data, kind)
        if arr.shape != (height, width):
            raise ImageReadError(
                path, f"decoded size {arr.shape[1]} x {arr.shape[0]} differs from the header's "
                f"{width} x {height}"
            )
    if factor > 1 and not drafted and arr.dtype.kind == "u":
        # value / maximum is linear: reduce first, on a quarter of the pixels or fewer
        reduced = area_reduce(arr.astype(np.float32), factor)
        pixels, bits = np.clip(reduced / np.float32(np.iinfo(arr.dtype).max), 0.0, 1.0), np.iinfo(arr.dtype).bits
    else:
        pixels, bits = _scale_raster(path, arr)
        if factor > 1 and not drafted:
            pixels = area_reduce(pixels, factor)
    return RadiographImage(
        pixels=np.ascontiguousarray(pixels),
        path=str(path),
        source_format=kind,
        bits_stored=bits,
        pixel_spacing_mm=None,
        photometric="MONOCHROME2",
        frames=frames,
        info={"Rows": int(height), "Columns": int(width)},
        grid=PixelGrid.reduced_by((height, width), factor) if factor > 1 else None,
    )


def _decode_raster(path: Path, data: bytes, kind: str) -> np.ndarray:
    """The whole image, grey (colour files whose channels agree), as stored."""
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.size == 0:
        if kind != "tiff":
            raise ImageReadError(path, f"truncated or corrupt {kind.upper()} file")
        arr = _decode_with_pil(path, data, kind)
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[:, :, [2, 1, 0] + ([3] if arr.shape[2] == 4 else [])]  # BGR(A) -> RGB(A)
    return _to_grey(path, arr, kind)


# --------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage


def _sop_class(ds):
    """SOPClassUID of the data set, else MediaStorageSOPClassUID of the file meta (or None)."""
    sop = ds.get("SOPClassUID", None)
    if not sop:
        meta = getattr(ds, "file_meta", None)
        sop = meta.get("MediaStorageSOPClassUID", None) if meta is not None else None
    return sop or None


def _sop_name(sop) -> str:
    try:
        return str(sop.name)
    except Exception:
        return str(sop)


def _what(ds) -> str:
    modality = str(ds.get("Modality", "") or "").strip()
    if modality:
        return modality
    sop = _sop_class(ds)
    return _sop_name(sop) if sop else ""


def _truncation(ds, path) -> tuple[Any, str] | None:
    """``(tag, text)`` when the file ends inside its last top-level element, else None.

    pydicom stops quietly at the end of a truncated file; the raw (not yet converted) last
    element still knows where its value starts and how long it claims to be. An empty data
    set gives ``(None, text)``. Call before the elements are accessed (converted).
    """
    try:
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID", None) if meta is not None else None
        if ts is not None and ts.is_deflated:  # offsets are in the inflated stream
            return None
        if len(ds) == 0:
            return None, "no data elements after the file meta information"
        last = max(ds.keys())
        raw = ds.get_item(last)
        tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
        if tell is None or length is None or int(length) == 0xFFFFFFFF:
            return None
        missing = int(tell) + int(length) - os.path.getsize(path)
        if missing > 0:
            return last, f"the file ends {missing} bytes before the end of element {last}"
    except Exception:
        return None
    return None


def _header_int(path, ds, keyword: str, default: int | None = None) -> int | None:
    """An integer header attribute, or a clear refusal when its value is not an integer."""
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        try:
            raw = ds[keyword].value
        except Exception:
            raw = value
        raise ImageReadError(path, f"invalid {keyword} value {str(raw)!r} in the DICOM header") \
            from None


def _decode_error_text(e: Exception, limit: int = 300) -> str:
    """One short line from a pixel decoding exception (pydicom lists each plugin's error)."""
    text = str(e)
    prefix = "Unable to decode as exceptions were raised by all available plugins:"
    if text.startswith(prefix):
        text = "; ".join(line.strip() for line in text[len(prefix):].splitlines() if line.strip())
    else:
        text = f"{type(e).__name__}: {text}"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _spacing(ds) -> tuple[float, float] | None:
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(kw, None)
        if value is None:
            continue
        try:
            values = [float(v) for v in value]
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(np.isfinite(v) and v > 0 for v in values):
            return (values[0], values[1])
    return None


def _info(ds) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for kw in INFO_KEYWORDS:
        value = ds.get(kw, None)
        if value is None or value == "":
            continue
        info[kw] = int(value) if kw in ("Rows", "Columns") else str(value)
    return info


def _stored_range(ds) -> tuple[float, float] | None:
    """Min / max of the representable stored values, passed through the modality LUT."""
    from pydicom.pixels import apply_modality_lut

    bits = ds.get("BitsStored", None) or ds.get("BitsAllocated", None)
    if not bits:
        return None
    bits = int(bits)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        lo, hi = 0, 2**bits - 1
    if bits <= 16:  # exact even for a non-monotonic modality LUT
        values = np.arange(lo, hi + 1, dtype=np.int64)
    else:
        values = np.array([lo, hi], dtype=np.int64)
    out = np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
    lo_out, hi_out = float(out.min()), float(out.max())
    if not (np.isfinite(lo_out) and np.isfinite(hi_out)) or hi_out <= lo_out:
        return None
    return lo_out, hi_out


def _voi_range(ds) -> tuple[float, float] | None:
    """Output range of the VOI LUT / window that apply_voi_lut(prefer_lut=True) uses."""
    seq = ds.get("VOILUTSequence", None)
    if seq:
        item = seq[0]
        if item.get("LUTDescriptor", None) is not None and item.get("LUTData", None) is not None:
            return 0.0, float(2 ** int(item.LUTDescriptor[2]) - 1)
    if ds.get("WindowCenter", None) is None or ds.get("WindowWidth", None) is None:
        return None
    # Same output range as pydicom.pixels.processing.apply_windowing.
    if ds.get("ModalityLUTSequence", None):
        lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(ds.get("PixelRepresentation", 0) or 0) == 0:
        lo, hi = 0.0, float(2 ** int(ds.BitsStored) - 1)
    else:
        lo, hi = float(-(2 ** (int(ds.BitsStored) - 1))), float(2 ** (int(ds.BitsStored) - 1) - 1)
    slope, intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    lo, hi = min(lo, hi), max(lo, hi)
    return (lo, hi) if hi > lo else None


def _value_table(arr: np.ndarray) -> np.ndarray | None:
    """Every value of ``arr``'s integer type of at most 16 bits, in the order of
    :func:`_table_index`, or None for other types."""
    if arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2:
        return None
    unsigned = np.dtype(f"u{arr.dtype.itemsize}")
    return np.arange(2 ** (8 * arr.dtype.itemsize), dtype=unsigned).view(arr.dtype)


def _table_index(arr: np.ndarray) -> np.ndarray:
    """Each pixel's row in :func:`_value_table` (its bits read as unsigned: no copy)."""
    return arr.view(np.dtype(f"u{arr.dtype.itemsize}"))


def _ensure_transfer_syntax(ds) -> None:
    """Preamble-less files have no file meta: derive the transfer syntax from the encoding."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    elif little is False:
        meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian


def _j2k_header(codestream: bytes) -> tuple[int, int, int, int, int, bool, int] | None:
    """(columns, rows, x offset, y offset, components, signed, precision) of a JPEG 2000
    codestream's SIZ segment (of its first component), or None when it does not start with one."""
    if len(codestream) < 45 or codestream[:4] != b"\xff\x4f\xff\x51":
        return None
    cols, rows, x0, y0 = struct.unpack(">IIII", codestream[8:24])
    components = struct.unpack(">H", codestream[40:42])[0]
    ssiz = codestream[42]
    return cols, rows, x0, y0, components, bool(ssiz & 0x80), (ssiz & 0x7F) + 1


def _j2k_reduced(codestream: bytes, rows: int, cols: int, factor: int) -> np.ndarray | None:
    """An unsigned one-component JPEG 2000 codestream decoded ``factor`` times smaller (a lower
    resolution level: each pixel centred on its block's first pixel), in stored values; None
    where Pillow's OpenJPEG cannot."""
    from PIL import Image, features

    header = _j2k_header(codestream)
    if not features.check("jpg_2000") or header is None or header[:5] != (cols, rows, 0, 0, 1) or header[5] \
            or header[6] > 16:
        return None
    try:
        with _pil_without_bomb_check(), Image.open(io.BytesIO(codestream)) as im:
            im.reduce = factor.bit_length() - 1  # resolution levels dropped
            im.load()
            arr = np.asarray(im)
    except Exception:
        return None
    if arr.shape != (-(-rows // factor), -(-cols // factor)) or arr.dtype not in (np.uint8, np.uint16):
        return None
    return arr >> (8 * arr.itemsize - header[6])  # Pillow widens the samples to 8 or 16 bits


def _dicom_reduced(ds, ts, frames: int, rows: int, cols: int, factor: int) -> tuple[np.ndarray | None, bool]:
    """The first frame decoded ``factor`` times smaller where its codec allows it, and whether
    each pixel is centred on its block (JPEG baseline's DCT scaling) or on the block's first
    pixel (JPEG 2000); ``(None, True)`` for the other transfer syntaxes, signed data, or
    anything Pillow cannot decode (the full decode then says what is wrong, if anything)."""
    from pydicom import uid
    from pydicom.encaps import get_frame

    if int(ds.get("PixelRepresentation", 0) or 0) != 0:
        return None, True
    j2k = ts in (uid.JPEG2000Lossless, uid.JPEG2000, uid.HTJ2KLossless, uid.HTJ2KLosslessRPCL, uid.HTJ2K)
    if ts != uid.JPEGBaseline8Bit and not j2k:
        return None, True
    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception:
        return None, True
    if j2k:
        arr = _j2k_reduced(frame, rows, cols, factor)
        if arr is not None and (int(ds.get("BitsAllocated", 16) or 16) > 8) != (arr.dtype == np.uint16):
            arr = arr.astype(np.uint16 if arr.dtype == np.uint8 else np.uint8)  # the type pydicom gives
        return arr, False
    arr = _jpeg_reduced(frame, rows, cols, factor)
    return (arr, True) if arr is not None and arr.ndim == 2 else (None, True)


def _read_dicom(path: Path, voi_lut: bool, max_pixels: int | None,
                min_decoded_size: tuple[int, int] | None = None) -> RadiographImage:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    from pydicom.tag import Tag

    try:
        # Large elements (the pixel data) are read only when needed: after the size check.
        ds = pydicom.dcmread(path, force=True, defer_size="4 MB")
    except Exception as e:
        raise ImageReadError(path, f"truncated or corrupt DICOM: {type(e).__name__}: {e}") from e

    truncated = _truncation(ds, path)  # before any element is converted
    what = _what(ds)
    if not any(kw in ds for kw in _PIXEL_KEYWORDS):
        sop = _sop_class(ds)
        if str(sop or "") == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
            raise ImageReadError(
                path, "DICOMDIR: no pixel data (a media directory that lists image files, "
                "not an image)"
            )
        reason = f"{what}: no pixel data" if what else "no pixel data"
        if truncated:
            reason += f" (truncated or corrupt file: {truncated[1]})"
        elif "Rows" in ds or "Columns" in ds or "Image Storage" in _sop_name(sop or ""):
            # pydicom stops quietly at an element boundary too: say why it may be missing
            reason += " (an image header without pixel data: a truncated or stripped file)"
        raise ImageReadError(path, reason)

    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "NumberOfFrames"):
        _header_int(path, ds, keyword)
    spp = _header_int(path, ds, "SamplesPerPixel", 1) or 1
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric and spp == 1:
        photometric = "MONOCHROME2"
        ds.PhotometricInterpretation = photometric
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ImageReadError(path, f"{photometric or 'no PhotometricInterpretation'}: "
                                   "not a greyscale radiograph")
    if spp != 1:
        raise ImageReadError(path, f"{spp} samples per pixel: not a greyscale radiograph")

    rows, cols = _header_int(path, ds, "Rows", 0), _header_int(path, ds, "Columns", 0)
    if not rows or not cols or rows < 0 or cols < 0:
        raise ImageReadError(path, "pixel data without valid Rows / Columns (missing or zero)")
    _check_limit(path, cols, rows, max_pixels)
    frames = max(1, _header_int(path, ds, "NumberOfFrames", 1) or 1)

    _ensure_transfer_syntax(ds)
    ts = ds.file_meta.TransferSyntaxUID
    ts_text = f"{ts.name} ({ts})" if ts.name != str(ts) else str(ts)
    if "PixelData" in ds and ts.is_compressed:
        from pydicom.pixels.decoders.base import get_decoder

        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise ImageReadError(path, f"no decoder for transfer syntax {ts_text}") from None
        if not decoder.is_available:
            missing = "; ".join(decoder.missing_dependencies)
            raise ImageReadError(
                path, f"no installed codec for transfer syntax {ts_text} ({missing})"
            )

    pixel_tags = {Tag(kw) for kw in _PIXEL_KEYWORDS}
    if truncated and truncated[0] in pixel_tags:
        raise ImageReadError(path, f"truncated or corrupt pixel data ({ts_text}): {truncated[1]}")
    factor = reduction_factor(rows, cols, min_decoded_size)
    arr, block_centred = None, True
    if factor > 1 and "PixelData" in ds and ts.is_compressed:
        arr, block_centred = _dicom_reduced(ds, ts, frames, rows, cols, factor)
    decoded_reduced = arr is not None
    if arr is None:
        try:
            ds.pixel_array_options(index=0)  # decode only the first frame
            arr = np.asarray(ds.pixel_array)
        except Exception as e:
            problem = "cannot decode pixel data" if ts.is_compressed else (
                "truncated or corrupt pixel data"
            )
            raise ImageReadError(path, f"{problem} ({ts_text}): {_decode_error_text(e)}") from e
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ImageReadError(path, f"unexpected pixel array of shape {arr.shape}")

    is_float = "PixelData" not in ds
    # An integer image of at most 16 bits holds at most 65536 values and every step below is
    # elementwise: the steps run on a table of those values, and the image looks its values up
    # (the same numbers; on a 3000 x 3000 film 40 ms instead of 250)
    table = _value_table(arr) if not is_float else None
    modality = np.asarray(apply_modality_lut(arr if table is None else table, ds))
    data = modality.astype(np.float64)
    if not np.isfinite(data).all():  # float pixel data, or a rescale that overflows
        raise ImageReadError(path, "pixel data contain NaN or infinite values")
    value_range = None
    if voi_lut:
        window = _voi_range(ds)
        if window is not None:
            voi = apply_voi_lut(modality, ds, index=0, prefer_lut=True)
            data = np.asarray(voi, dtype=np.float64)
            value_range = window
    if value_range is None and not is_float:
        value_range = _stored_range(ds)
    if value_range is None:
        present = data if table is None else data[np.bincount(_table_index(arr).ravel(), minlength=len(table)) > 0]
        finite = present[np.isfinite(present)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        value_range = (lo, hi)
    lo, hi = value_range
    if hi > lo:
        pixels = (data - lo) / (hi - lo)
    else:
        pixels = np.zeros_like(data)
    pixels = np.nan_to_num(pixels, nan=0.0, posinf=1.0, neginf=0.0)
    pixels = np.clip(pixels, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    pixels = np.asarray(pixels, dtype=np.float32)
    if table is not None:
        pixels = np.take(pixels, _table_index(arr))
    if factor > 1 and not decoded_reduced:
        pixels = area_reduce(pixels, factor)

    bits = ds.get("BitsStored", None)
    for keyword in _PIXEL_KEYWORDS:  # the header travels with the image; the pixels are in ``pixels``
        if keyword in ds:
            del ds[keyword]
    return RadiographImage(
        pixels=np.ascontiguousarray(pixels),
        path=str(path),
        source_format="dicom",
        bits_stored=int(bits) if bits else None,
        pixel_spacing_mm=_spacing(ds),
        photometric=photometric,
        frames=frames,
        info=_info(ds),
        header=ds,
        grid=PixelGrid.reduced_by((rows, cols), factor, block_centred) if factor > 1 else None,
    )
