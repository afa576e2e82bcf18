"""Command-line checks shared by infer.py and ``python -m inference.sharded``."""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

import torch


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


def number_between(low: float, high: float):
    """An argparse type: a finite number from ``low`` to ``high``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} is not a number from {low:g} to {high:g}")
        return value
    return parse


def device_problem(device: str, backend: str = "torch") -> str | None:
    """Why ``--device`` cannot run the networks with ``backend`` here, or None."""
    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda") or (parsed.type == "cpu" and parsed.index):
        return f"--device {device}: not a device (auto, cpu, cuda or cuda:N)"
    if parsed.type == "cpu":
        return None
    if backend == "onnx":
        import onnxruntime  # only with --backend onnx

        available = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            return (f"--device {device}: this onnxruntime has no CUDAExecutionProvider (has {', '.join(available)}); "
                    f"install onnxruntime-gpu or use --device cpu")
        return None
    if not torch.cuda.is_available():
        return f"--device {device}: no CUDA GPU is available here (use --device cpu or auto)"
    if (parsed.index or 0) >= torch.cuda.device_count():
        return f"--device {device}: there are {torch.cuda.device_count()} CUDA GPU(s) here, numbered from 0"
    return None


def add_full_resolution(parser: argparse.ArgumentParser) -> None:
    """``--full-resolution``: decode every film whole (the default decodes a large film reduced
    where that loses nothing the networks use; inference.predictor.min_decoded_size)."""
    parser.add_argument("--full-resolution", action="store_true",
                        help="decode every film at full size (default: a large film is decoded reduced 2, 4 or 8 "
                             "times where the networks lose nothing; outputs are in the original film's pixels either "
                             "way)")


def output_folder_problem(out: Path, inputs: list[str] = ()) -> str | None:
    """Why ``--out`` cannot take the outputs (created when missing), or None. It may lie inside
    an input folder (it is not walked) but not be one of ``inputs``: the next run would read
    its outputs as films."""
    if out.exists() and not out.is_dir():
        return f"--out {out}: exists and is not a folder"
    for given in inputs:
        if out.is_dir() and Path(given).is_dir() and os.path.samefile(given, out):
            return (f"--out {out}: is an input folder ({given}); the next run would read its outputs as films: "
                    f"use a folder of its own (one inside the input folder is skipped)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as exc:
        return f"--out {out}: cannot write there ({exc.strerror or type(exc).__name__})"
    return None
