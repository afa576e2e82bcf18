"""Atomic file writes (a killed process never leaves a half-written output behind) and the
fingerprint of an input file."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import cv2
import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, then rename it into place.

    A killed process leaves either the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should read like any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    return atomic_write_with(path, lambda fh: fh.write(payload))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, strict: bool = False) -> Path:
    """``strict``: refuse NaN and infinity (``ValueError``), which JSON does not have."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default, allow_nan=not strict) + "\n")


def atomic_write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a PNG/JPEG/TIFF (chosen by the suffix); uint16 greyscale PNGs keep 16 bits."""
    path = Path(path)
    ok, buf = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise OSError(f"{path}: could not encode image of shape {image.shape} and dtype {image.dtype}")
    return atomic_write_bytes(path, buf.tobytes())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return atomic_write_bytes(path, buf.getvalue())


def _json_default(obj: Any):
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def file_fingerprint(path: str | os.PathLike, stat: os.stat_result | None = None) -> dict:
    """``{"size", "mtime_ns", "sha256"}`` of a file: what tells a replaced or edited input from
    the one an output was made from. ``stat``: the file's ``os.stat`` taken before it was read
    (a file changed since then keeps the earlier time, so it no longer matches)."""
    stat = stat or os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}


def missing_file(path: str | os.PathLike, what: str = "file") -> str:
    """Why ``path``, which is not a file, cannot be read as ``what``: a folder is named as one."""
    article = "an" if what[:1].lower() in "aeiou" else "a"
    return f"a folder, not {article} {what}" if Path(path).is_dir() else f"{what} not found"
