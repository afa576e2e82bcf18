"""Command-line checks shared by infer.py and ``python -m inference.sharded``."""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def count_at_least(minimum: int):
    """An argparse type: an integer of at least ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}")
        return value
    return parse


def add_full_resolution(parser: argparse.ArgumentParser) -> None:
    """``--full-resolution``: decode every film whole (the default decodes a large film reduced
    where that loses nothing the networks use; inference.predictor.min_decoded_size)."""
    parser.add_argument("--full-resolution", action="store_true",
                        help="decode every film at full size (default: a large film is decoded reduced 2, 4 or 8 "
                             "times where the networks lose nothing; outputs are in the original film's pixels either "
                             "way)")


def output_folder_problem(out: Path) -> str | None:
    """Why ``--out`` cannot take the outputs (created when missing), or None."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__})"
    return None
