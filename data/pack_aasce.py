"""A smaller copy of an AASCE folder (data/landmarks.py, "AASCE / BoostNet AP films"): every
film re-encoded as greyscale JPEG no larger than ``--max-side`` pixels on its longer side, so
that the films travel with the code where space is short (a GPU run receives the repository
and at most 64 MiB in all: benchmarks/gpu_model.sh).

    python -m data.pack_aasce --aasce DIR --out DIR [--max-side 1024] [--quality 80]

What the copy holds:

* ``images/<same name>``: each film named in ``filenames.csv``, read as training reads it
  (data.readers: 8-bit grey, EXIF orientation not applied), scaled down with area averaging
  (aspect kept: the longer side becomes ``--max-side``, the other ``round(side x scale)``) when
  it is larger, then written as JPEG at ``--quality`` (optimised Huffman tables). A film that
  is already small enough is re-encoded at its own size too, so that every film in the copy
  follows one rule. The name is kept, suffix included, whatever the source format was.
* ``filenames.csv``, ``landmarks.csv``, ``angles.csv`` and ``README.md``: byte-for-byte copies.
  The landmarks are normalised to 0..1 by each film's width and height, so they need no
  change: readers multiply them by the new size (data.landmarks.read_aasce).
* ``pack.json``: the source folder, the settings, film counts and sizes.

A film that cannot be read is reported on one line naming it and copied unchanged, so that
the copy reads as its source does; the others are packed, and the command exits 1 at the end
with the list. Every file is written atomically (data.io_utils). 1024 px is the height at
which ``make model`` simulates fractures on these films (``data.simulate --size 1024``), so
training sees the same resolution from the copy as from the originals.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from data.io_utils import atomic_write_bytes, atomic_write_json
from data.readers import ImageReadError, read_image

DEFAULT_MAX_SIDE = 1024
DEFAULT_QUALITY = 80  # 481 films at 1024 px: 15.6 MB (benchmarks/RESULTS.md, "AASCE films packed")
COPIED_FILES = ("filenames.csv", "landmarks.csv", "angles.csv", "README.md")
REQUIRED = ("filenames.csv", "landmarks.csv", "images")


class PackError(Exception):
    """A folder that cannot be packed at all (missing tables, output inside the source)."""


def packed_size(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) of a film of this size in the copy: the longer side at most ``max_side``."""
    scale = max_side / max(height, width)
    if scale >= 1:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def packed_grey(pixels: np.ndarray, max_side: int) -> np.ndarray:
    """A film (float [0, 1], greyscale) as the 8-bit grey levels the copy encodes, scaled to
    ``max_side``."""
    grey = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    h, w = grey.shape
    nh, nw = packed_size(h, w, max_side)
    if (nh, nw) != (h, w):
        grey = cv2.resize(grey, (nw, nh), interpolation=cv2.INTER_AREA)
    return grey


def jpeg_bytes(grey: np.ndarray, quality: int) -> bytes:
    """``grey`` (uint8) as an optimised JPEG of ``quality``."""
    ok, buf = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, int(quality), cv2.IMWRITE_JPEG_OPTIMIZE, 1])
    if not ok:
        raise OSError(f"could not encode a {grey.shape[1]} x {grey.shape[0]} JPEG")
    return buf.tobytes()


def encode_film(pixels: np.ndarray, max_side: int, quality: int) -> bytes:
    """JPEG bytes of a film (float [0, 1], greyscale) scaled to ``max_side``."""
    return jpeg_bytes(packed_grey(pixels, max_side), quality)


def film_names(aasce: Path) -> list[str]:
    return pd.read_csv(aasce / "filenames.csv", header=None, dtype=str, keep_default_na=False)[0].tolist()


def check_folders(aasce: Path, out: Path) -> None:
    for name in REQUIRED:
        if not (aasce / name).exists():
            raise PackError(f"{aasce / name}: not found (expected an AASCE folder with filenames.csv, "
                            "landmarks.csv and images/)")
    src, dst = aasce.resolve(), out.resolve()
    if dst == src or src in dst.parents:
        raise PackError(f"{out}: the output folder must lie outside the AASCE folder {aasce}")


def pack_aasce(aasce: str | Path, out: str | Path, max_side: int = DEFAULT_MAX_SIDE,
               quality: int = DEFAULT_QUALITY, progress: bool = False) -> dict:
    """Write the packed copy of ``aasce`` to ``out`` (see the module docstring); return the
    summary also written to ``out/pack.json``, whose ``failed`` lists ``{"image", "error"}``
    for each film that could not be read (copied unchanged where it exists)."""
    aasce, out = Path(aasce), Path(out)
    check_folders(aasce, out)
    names = film_names(aasce)
    started = time.perf_counter()
    iterator = names
    if progress:
        from tqdm import tqdm

        iterator = tqdm(names, desc="pack", unit="film")
    failed, source_bytes, image_bytes = [], 0, 0
    for name in iterator:
        src, dst = aasce / "images" / name, out / "images" / name
        try:
            payload = encode_film(read_image(src).pixels, max_side, quality)
        except (ImageReadError, OSError) as exc:
            reason = str(exc) if str(src) in str(exc) else f"{src}: {exc}"
            failed.append({"image": str(src), "error": reason})
            message = f"error: {reason}"
            if src.is_file():
                payload = src.read_bytes()
                message += " (copied unchanged)"
            else:
                payload = None
            (iterator.write if progress else print)(message, file=sys.stderr)
            if payload is None:
                continue
        source_bytes += src.stat().st_size
        image_bytes += len(payload)
        atomic_write_bytes(dst, payload)
    copied = []
    for name in COPIED_FILES:
        if (aasce / name).is_file():
            atomic_write_bytes(out / name, (aasce / name).read_bytes())
            copied.append(name)
    table_bytes = sum((out / name).stat().st_size for name in copied)
    summary = {"source": str(aasce.resolve()), "max_side": max_side, "quality": quality,
               "n_films": len(names), "n_packed": len(names) - len(failed), "failed": failed,
               "copied": copied, "source_image_bytes": source_bytes, "image_bytes": image_bytes,
               "total_bytes": image_bytes + table_bytes, "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_json(out / "pack.json", summary)
    summary["total_bytes"] += (out / "pack.json").stat().st_size
    return summary


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.pack_aasce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--aasce", required=True, type=Path, help="AASCE folder (filenames.csv, landmarks.csv, images/)")
    parser.add_argument("--out", required=True, type=Path, help="the packed copy (created; files of the same name replaced)")
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="longest side of a packed film, pixels")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality, 1-100")
    args = parser.parse_args(argv)
    if args.max_side < 16 or not 1 <= args.quality <= 100:
        parser.exit(2, f"error: --max-side must be at least 16 and --quality 1 to 100 "
                       f"(got {args.max_side}, {args.quality})\n")
    try:
        summary = pack_aasce(args.aasce, args.out, args.max_side, args.quality, progress=True)
    except PackError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"packed {summary['n_packed']} of {summary['n_films']} films into {args.out}: "
          f"{megabytes(summary['total_bytes'])} in all ({megabytes(summary['image_bytes'])} of films, "
          f"from {megabytes(summary['source_image_bytes'])}), {summary['seconds']} s")
    if summary["failed"]:
        print(f"error: {len(summary['failed'])} film(s) could not be read:", file=sys.stderr)
        for item in summary["failed"]:
            print(f"  {item['error']}", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
