"""Reduced decoding of large films against full-size decoding: do the outputs agree?

    python -m benchmarks.reduced_decoding FILMS [--limit 20] [--upscale 1.5] [--factor 2]
                                          [--model BUNDLE] [--work runs/reduced_decoding]

FILMS: a folder of films or a manifest CSV. Each film is predicted (the shipped model by
default, ``Predictor.predict``, one film at a time, one torch thread) three ways: decoded whole;
decoded as inference decodes it by default (reduced where inference.predictor.min_decoded_size
allows), or with ``--factor F`` reduced F times whatever its size; and, as a yardstick of how much
any small change moves this model's outputs, decoded whole with Gaussian noise of a quarter of an
8-bit grey level added. ``--upscale S`` first writes each film S times larger (bicubic, 8-bit
PNG, under ``--work``), so that films of ordinary size become films large enough to be reduced
while holding no detail the original lacks.

Each way is compared with the whole decode: vertebrae matched by centre (within half a body
height; those left are ``missing`` / ``extra``), the distance of their six points in original
pixels and as a fraction of the body height, whether their level is the same, and the
difference of the film's and each vertebra's ``p_fracture``. Prints one JSON line per way.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import inference.predictor as predictor_module
from data.discovery import find_inputs
from data.geometry import body_centre, body_height
from data.readers import read_image
from inference.predictor import InferenceDataset, Predictor, min_decoded_size
from models.registry import default_model

NOISE = 0.25 / 255  # the yardstick: a quarter of an 8-bit grey level


def upscaled(paths: list[str], scale: float, work: Path) -> list[str]:
    """Each film ``scale`` times larger, as an 8-bit PNG in ``work`` (made once)."""
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for k, path in enumerate(paths):
        target = work / f"film_{k:03d}_x{scale:g}.png"
        if not target.is_file():
            pixels = np.round(read_image(path).pixels * 255).astype(np.uint8)
            cv2.imwrite(str(target), cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC))
        out.append(str(target))
    return out


def predict(predictor, paths: list[str], size_of) -> list:
    """(dataset item, prediction) per film; ``size_of(path)`` gives its ``min_decoded_size``."""
    out = []
    for path in paths:
        item = InferenceDataset([path], predictor.image_size, min_decoded_size=size_of(path))[0]
        if "image" not in item:
            raise RuntimeError(f"{path}: {item.get('error') or item.get('refused')}")
        out.append((item, predictor.predict([item])[0]))
    return out


def with_noise(read):
    def noisy(*args, **kwargs):
        image = read(*args, **kwargs)
        rng = np.random.default_rng(abs(hash(image.path)) % 2**32)
        image.pixels = np.clip(image.pixels + rng.normal(0, NOISE, image.pixels.shape).astype(np.float32), 0, 1)
        return image
    return noisy


def compare(reference: list, other: list) -> dict:
    errors, relative, film_diff, vertebra_diff, same_level = [], [], [], [], []
    missing = extra = 0
    for (_, a), (_, b) in zip(reference, other):
        film_diff.append(abs(a.probs["p_fracture"] - b.probs["p_fracture"]))
        pa = np.array([v.points for v in a.vertebrae], dtype=np.float64).reshape(-1, 6, 2)
        pb = np.array([v.points for v in b.vertebrae], dtype=np.float64).reshape(-1, 6, 2)
        used = set()
        for k, va in enumerate(a.vertebrae):
            if not len(pb):
                missing += 1
                continue
            height = body_height(pa[k:k + 1])[0]
            d = np.linalg.norm(body_centre(pb) - body_centre(pa[k:k + 1]), axis=1)
            j = int(np.argmin(d))
            if d[j] > 0.5 * height or j in used:
                missing += 1
                continue
            used.add(j)
            e = np.linalg.norm(pa[k] - pb[j], axis=1)
            errors += e.tolist()
            relative += (e / height).tolist()
            vertebra_diff.append(abs(va.p_fracture - b.vertebrae[j].p_fracture))
            same_level.append(va.level == b.vertebrae[j].level)
        extra += len(b.vertebrae) - len(used)

    def q(values, digits=4):
        v = np.asarray(values, dtype=np.float64)
        if not v.size:
            return None
        return {"median": round(float(np.median(v)), digits), "p95": round(float(np.percentile(v, 95)), digits),
                "max": round(float(v.max()), digits)}

    return {"vertebrae": sum(len(a.vertebrae) for _, a in reference), "missing": missing, "extra": extra,
            "point_error_px": q(errors, 3), "point_error_of_body_height": q(relative),
            "same_level": round(float(np.mean(same_level)), 4) if same_level else None,
            "film_p_fracture_diff": q(film_diff), "vertebra_p_fracture_diff": q(vertebra_diff)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reduced_decoding", description=__doc__.split("\n\n")[0])
    p.add_argument("films", help="a folder of films or a manifest CSV")
    p.add_argument("--limit", type=int, default=20, help="the first N films")
    p.add_argument("--upscale", type=float, default=None, help="make each film this many times larger first")
    p.add_argument("--factor", type=int, choices=(2, 4, 8), default=None,
                   help="reduce every film this many times, whatever its size (default: as inference does)")
    p.add_argument("--model", default=None, help="bundle folder or registry name (default: the shipped model)")
    p.add_argument("--work", default="runs/reduced_decoding", help="where the upscaled films go")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # a shared machine
    paths, problems = find_inputs([a.films])
    paths = paths[:a.limit]
    if a.upscale:
        paths = upscaled(paths, a.upscale, Path(a.work))
    predictor = Predictor(a.model or default_model(), device="cpu")
    floor = min_decoded_size(predictor.image_size, predictor.point_refiner is not None)

    def reduced_size(path):
        if a.factor is None:
            return floor
        rows = read_image(path).original_size[0]
        return (-(-rows // a.factor), 10**9)

    start = time.perf_counter()
    whole = predict(predictor, paths, lambda path: None)
    seconds = {"whole": time.perf_counter() - start}
    start = time.perf_counter()
    reduced = predict(predictor, paths, reduced_size)
    seconds["reduced"] = time.perf_counter() - start
    plain = predictor_module.read_image
    predictor_module.read_image = with_noise(plain)
    try:
        noisy = predict(predictor, paths, lambda path: None)
    finally:
        predictor_module.read_image = plain
    factors = sorted(round(1 / item["pixel_grid"].scale[0]) for item, _ in reduced)
    sizes = [list(item["image_size"]) for item, _ in whole]
    print(json.dumps({"films": len(paths), "sizes": [min(sizes), max(sizes)], "floor": floor,
                      "factors": {f: factors.count(f) for f in sorted(set(factors))},
                      "seconds": {k: round(v, 1) for k, v in seconds.items()}}))
    print(json.dumps({"way": "reduced" if a.factor is None else f"reduced {a.factor} x", **compare(whole, reduced)}))
    print(json.dumps({"way": f"whole, noise {NOISE * 255:g} grey level", **compare(whole, noisy)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
