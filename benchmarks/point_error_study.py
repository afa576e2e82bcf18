"""Where the per-vertebra point error comes from, on labelled films (issue 3's AASCE target).

    python benchmarks/point_error_study.py --checkpoint CKPT --vertebrae V.csv [--limit N] [--json OUT.json]

``V.csv``: a project-format ``vertebrae.csv`` with its ``manifest.csv`` beside it (e.g. the
AASCE validation films written by ``python -m data.landmarks``). Use validation or training
films, never the test set. Every error is the distance to the truth point as a percentage of
the truth vertebra's mean height, the unit of the benchmark's point error.

1. ``crop``: the crop network alone, read once on crops placed from the *truth* points, as
   placed (``truth``), with the centre moved by a random 6 % of the body extent per axis
   (``jitter``), the window 10 % smaller or larger (``scale 0.9`` / ``1.1``), and the average
   of truth, 0.9 and 1.1 (``multi-scale``). Also: the mean signed error per point (x, y) and
   the share of the error that is common to a film's vertebrae (each film's mean signed error
   per point removed).
2. ``pipeline``: the whole per-vertebra analysis of inference (models.vertebrae.analyse_film)
   with 2 and 3 crop passes, and with each body's crop window taken from the median extent of
   it and its neighbours (window 5): the median and 90th percentile against the truth bodies
   matched as evaluation/vertebrae.py matches them.

Comparing the crop rows of training films with those of validation films tells whether the
crop network fits its own training labels any better than unseen ones.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models.vertebrae as V  # noqa: E402
from data.readers import read_image  # noqa: E402
from data.transforms import normalize_intensity  # noqa: E402
from data.vertebra_targets import (CROP_CONTEXT, apply_affine, body_centre, body_extent, crop_matrix,  # noqa: E402
                                   extract_crop, invert_affine)
from evaluation.metrics import load_vertebrae_table  # noqa: E402
from evaluation.vertebrae import summarise_vertebrae  # noqa: E402
from models.checkpoint import build_vertebra_network, load_checkpoint  # noqa: E402
from models.network import HEATMAP_STRIDE  # noqa: E402

POINTS = [f"p{k}{c}" for k in range(1, 7) for c in "xy"]
JITTER = 0.06  # centre shift, fraction of the body extent per axis (the training jitter's scale)


def _quantiles(err: np.ndarray) -> dict:
    return {"median": float(np.median(err)), "p90": float(np.percentile(err, 90))}


@torch.no_grad()
def _read(net, pixels: np.ndarray, centres: np.ndarray, sides: np.ndarray) -> np.ndarray:
    mats = [crop_matrix(c, s) for c, s in zip(centres, sides)]
    crops = np.stack([extract_crop(pixels, m) for m in mats])[:, None].astype(np.float32)
    pts = net(torch.from_numpy(crops))["points"].float().numpy().astype(np.float64)
    return np.stack([apply_affine(invert_affine(m), p) for m, p in zip(mats, pts)])


def crop_study(net, films: list[tuple[np.ndarray, np.ndarray]], seed: int = 0) -> dict:
    """``films``: (normalised pixels, truth points (n, 6, 2)) per film."""
    rng = np.random.default_rng(seed)
    reads = {"truth": [], "jitter": [], "scale 0.9": [], "scale 1.1": []}
    truth = []
    for pixels, pts in films:
        c, e = body_centre(pts), body_extent(pts)
        reads["truth"].append(_read(net, pixels, c, CROP_CONTEXT * e))
        reads["jitter"].append(_read(net, pixels, c + JITTER * e[:, None] * rng.normal(0, 1, c.shape), CROP_CONTEXT * e))
        reads["scale 0.9"].append(_read(net, pixels, c, 0.9 * CROP_CONTEXT * e))
        reads["scale 1.1"].append(_read(net, pixels, c, 1.1 * CROP_CONTEXT * e))
        truth.append(pts)
    t = np.concatenate(truth)
    height = np.linalg.norm(t[:, 3:] - t[:, :3], axis=-1).mean(axis=1)
    pred = {k: np.concatenate(v) for k, v in reads.items()}
    pred["multi-scale"] = (pred["truth"] + pred["scale 0.9"] + pred["scale 1.1"]) / 3
    out = {"n_vertebrae": int(len(t)), "variants": {}}
    for name, p in pred.items():
        out["variants"][name] = _quantiles(np.linalg.norm(p - t, axis=-1) / height[:, None] * 100)
    signed = (pred["truth"] - t) / height[:, None, None] * 100
    out["mean_signed_error_pct"] = {"x": signed[..., 0].mean(0).round(2).tolist(), "y": signed[..., 1].mean(0).round(2).tolist()}
    residual = signed.copy()
    start = 0
    for pts in truth:
        residual[start:start + len(pts)] -= signed[start:start + len(pts)].mean(axis=0, keepdims=True)
        start += len(pts)
    out["without_each_films_mean_error"] = _quantiles(np.linalg.norm(residual, axis=-1))
    return out


def _smoothed_extent_reader(window: int):
    """read_crops with each body's window from the median extent of it and its neighbours."""
    def read_crops(net, image, points, device, passes=2, flip=False):
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
        if len(pts) < 3:
            return ORIGINAL_READ_CROPS(net, image, points, device, passes=passes, flip=flip)
        half = window // 2
        for _ in range(passes):
            order = np.argsort(body_centre(pts)[:, 1])
            ext = body_extent(pts)
            smooth = ext.copy()
            smooth[order] = [np.median(ext[order][max(0, i - half): i + half + 1]) for i in range(len(ext))]
            mats = [crop_matrix(c, max(CROP_CONTEXT * e, V.MIN_CROP_SIDE)) for c, e in zip(body_centre(pts), smooth)]
            crops = np.stack([extract_crop(image, m) for m in mats])[:, None].astype(np.float32)
            with torch.no_grad():
                out = net(torch.from_numpy(crops).to(device))
            crop_pts = out["points"].float().cpu().numpy().astype(np.float64)
            probs = torch.sigmoid(out["logits"].float()).cpu().numpy().astype(np.float64)
            pts = np.stack([apply_affine(invert_affine(m), p) for m, p in zip(mats, crop_pts)])
        return {"points": pts, "p_fracture": probs[:, 0], "p_acute_given_fracture": probs[:, 1],
                "p_acute": probs[:, 0] * probs[:, 1]}
    return read_crops


ORIGINAL_READ_CROPS = V.read_crops


def pipeline_study(checkpoint: Path, paths: list[str], truth: pd.DataFrame) -> dict:
    from models.inference import VERTEBRA_COLUMNS, InferenceDataset, Predictor, vertebra_rows

    predictor = Predictor(checkpoint, device="cpu", calibrated=False)
    dataset = InferenceDataset(paths, predictor.image_size)
    films = []
    for i in tqdm(range(len(dataset)), desc="film network", leave=False):
        item = dataset[i]
        with torch.no_grad():
            logits = predictor.net(item["image"][None].to(predictor.device))["vertebra_logits"][0]
        films.append((item, logits))
    variants = {"2 passes": (2, ORIGINAL_READ_CROPS), "3 passes": (3, ORIGINAL_READ_CROPS),
                "2 passes, neighbour-median extent": (2, _smoothed_extent_reader(5))}
    out = {}
    saved = V.CROP_PASSES, V.read_crops
    try:
        for name, (passes, reader) in variants.items():
            V.CROP_PASSES, V.read_crops = passes, reader
            rows = []
            for path, (item, logits) in zip(paths, films):
                film = V.analyse_film(logits, item["box"], HEATMAP_STRIDE, predictor.vertebra_net,
                                      item["pixels"], predictor.device)
                rows += vertebra_rows({"image": path, "name": path, "levels_trusted": film["levels_trusted"],
                                       "vertebrae": film["vertebrae"]})
            pred = pd.DataFrame(rows, columns=VERTEBRA_COLUMNS)  # the columns even where nothing was found
            pred["genant_grade"] = pd.to_numeric(pred["genant_grade"])
            summary = summarise_vertebrae(pred, truth, evaluated_images=paths)
            out[name] = {**summary["point_error"]["percent_height"], "recall": summary["detection"]["recall"],
                         "precision": summary["detection"]["precision"]}
    finally:
        V.CROP_PASSES, V.read_crops = saved
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--vertebrae", type=Path, required=True, help="vertebrae.csv with manifest.csv beside it")
    p.add_argument("--limit", type=int, default=None, help="only the first N films")
    p.add_argument("--skip-pipeline", action="store_true", help="the crop study only")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args(argv)
    truth = load_vertebrae_table(args.vertebrae, args.vertebrae.parent / "manifest.csv")
    paths = list(dict.fromkeys(truth["image"]))[: args.limit]
    truth = truth[truth["image"].isin(paths)].reset_index(drop=True)
    net = build_vertebra_network(load_checkpoint(args.checkpoint), args.checkpoint).eval()
    films = []
    for path in tqdm(paths, desc="crop study", leave=False):
        pts = truth.loc[truth["image"] == path, POINTS].to_numpy(float).reshape(-1, 6, 2)
        films.append((normalize_intensity(read_image(path).pixels), pts[np.isfinite(pts).all(axis=(1, 2))]))
    result = {"checkpoint": str(args.checkpoint), "vertebrae": str(args.vertebrae), "n_films": len(paths),
              "crop": crop_study(net, films)}
    crop = result["crop"]
    print(f"crop network on crops placed from the truth ({crop['n_vertebrae']} vertebrae of {len(paths)} films), "
          f"point error as % of body height:")
    for name, q in crop["variants"].items():
        print(f"  {name:<28} median {q['median']:5.2f}  p90 {q['p90']:5.2f}")
    print(f"  each film's mean signed error removed: median {crop['without_each_films_mean_error']['median']:.2f}")
    print(f"  mean signed error per point p1..p6, x: {crop['mean_signed_error_pct']['x']}, y: {crop['mean_signed_error_pct']['y']}")
    if not args.skip_pipeline:
        result["pipeline"] = pipeline_study(args.checkpoint, paths, truth)
        print("whole per-vertebra analysis (matched vertebrae):")
        def fmt(v, digits):  # None where nothing was matched
            return "-" if v is None else f"{v:.{digits}f}"

        for name, q in result["pipeline"].items():
            print(f"  {name:<36} median {fmt(q['median'], 2)}  p90 {fmt(q['p90'], 2)}  recall {fmt(q['recall'], 3)}  "
                  f"precision {fmt(q['precision'], 3)}")
    if args.json:
        from data.io_utils import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
