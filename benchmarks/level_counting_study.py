"""How the level counting's weights and gap factor were chosen (inference/vertebrae.py).

    python -m benchmarks.level_counting_study weights --checkpoint CKPT --manifest M.csv [--split val] [--limit N]
    python -m benchmarks.level_counting_study steps --manifest M.csv

``weights``: runs the per-vertebra analysis on labelled films, keeps each film's counted
bodies and level log-probabilities, and scores every (level weight, rib weight) pair of
:func:`inference.vertebrae.assign_levels`: level accuracy of the matched bodies, the mean
log-probability of the true placement (a proper score: it also rates ``level_confidence``),
and the share and accuracy of bodies in films whose levels are trusted. Use validation films,
never the test set.

``steps``: from the *truth* points of a ``vertebrae.csv``, how much a missing body widens the
centre-to-centre step (relative to the typical step, as :func:`count_positions` measures it),
for normal and for fractured missing bodies, against how much normal steps vary.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch


import inference.vertebrae as V
from data.morphometry import LEVELS
from data.geometry import body_centre, body_height
from data.tables import load_manifest_table, load_vertebrae_table, path_key
from inference.predictor import InferenceDataset, Predictor


def _truth_points(table: pd.DataFrame) -> np.ndarray:
    return np.stack([table[[f"p{k}x" for k in range(1, 7)]].to_numpy(float),
                     table[[f"p{k}y" for k in range(1, 7)]].to_numpy(float)], axis=-1)


def capture_films(checkpoint: str, manifest: str, vertebrae: str, split: str | None, limit: int | None) -> list[dict]:
    """Per film: the counted bodies' points and level log-probabilities as ``analyse_film``
    hands them to ``assign_levels``, and each body's truth level (None when unmatched)."""
    from tqdm import tqdm

    predictor = Predictor(checkpoint, device="cpu")
    man = load_manifest_table(manifest)
    if split:
        man = man[man["split"] == split]
    images = list(man["image"])[:limit]
    truth = load_vertebrae_table(vertebrae, manifest)
    keys = np.array([path_key(p) for p in truth["image"]])
    points = _truth_points(truth)
    seen: dict = {}
    original = V.assign_levels

    def spy(pts, logp, *args, **kwargs):
        seen["points"], seen["logp"] = np.array(pts), np.array(logp)
        return original(pts, logp, *args, **kwargs)

    V.assign_levels = spy
    data = InferenceDataset(images, predictor.image_size)
    films = []
    try:
        for n in tqdm(range(len(images)), desc="films"):
            item = data[n]
            if "image" not in item:
                continue
            seen.clear()
            with torch.no_grad():
                out = predictor.net(item["image"][None].to(predictor.device))
                V.analyse_film(out["vertebra_logits"][0], item["box"], 8, predictor.vertebra_net, item["pixels"],
                               predictor.device, point_refiner=predictor.point_refiner)
            if not seen:
                continue
            rows = np.flatnonzero(keys == path_key(images[n]))
            centres = body_centre(points[rows])
            heights = body_height(points[rows])
            levels = []
            for c in body_centre(seen["points"]):
                d = np.linalg.norm(centres - c, axis=1)
                k = int(np.argmin(d)) if len(d) else -1
                level = truth["level"].iloc[rows[k]] if k >= 0 and d[k] < 0.5 * heights[k] else None
                levels.append(level if level in LEVELS else None)
            films.append({"points": seen["points"], "logp": seen["logp"], "truth": levels})
    finally:
        V.assign_levels = original
    return films


def score_weights(films: list[dict], level_weight: float, rib_weight: float) -> dict:
    correct = total = trusted_correct = trusted_total = 0
    log_true = []
    for f in films:
        out = V.assign_levels(f["points"], f["logp"], level_weight=level_weight, rib_weight=rib_weight)
        pairs = [(p, t) for p, t in zip(out["levels"], f["truth"]) if t is not None]
        ok = sum(p == t for p, t in pairs)
        correct, total = correct + ok, total + len(pairs)
        if out["trusted"]:
            trusted_correct, trusted_total = trusted_correct + ok, trusted_total + len(pairs)
        # the true placement: the most common truth offset of the counted positions
        offsets = [LEVELS.index(t) - p for t, p in zip(f["truth"], out["positions"]) if t is not None]
        if offsets and "placements" in out:
            true_start = int(np.bincount(np.array(offsets) + 10).argmax() - 10)
            starts, posterior = np.array(out["placements"]["starts"]), np.array(out["placements"]["posterior"])
            log_true.append(np.log(max(float(posterior[starts == true_start].sum()), 1e-9)))
    return {"level_weight": level_weight, "rib_weight": rib_weight, "accuracy": correct / max(total, 1),
            "mean_log_p_true_placement": float(np.mean(log_true)) if log_true else float("nan"),
            "trusted_share": trusted_total / max(total, 1), "trusted_accuracy": trusted_correct / max(trusted_total, 1),
            "n_bodies": total, "n_films": len(films)}


def gap_steps(manifest: str, vertebrae: str) -> None:
    truth = load_vertebrae_table(vertebrae, manifest)
    points = _truth_points(truth)
    normal_steps, missing_normal, missing_fractured = [], [], []

    def relative(p):
        c = body_centre(p)
        h = body_height(p)
        return np.linalg.norm(np.diff(c, axis=0), axis=1) / np.maximum(0.5 * (h[1:] + h[:-1]), 1e-6)

    for _, film in truth.groupby("image"):
        pts, grades = points[film.index], film["genant_grade"].to_numpy()
        order = V.spine_order(pts)
        pts, grades = pts[order], grades[order]
        steps = relative(pts)
        normal_steps += list(steps / np.median(steps))
        for k in range(1, len(pts) - 1):  # drop one inner body: how wide is its gap?
            rest = relative(np.delete(pts, k, axis=0))
            typical = np.median(rest[rest <= 1.6 * rest.min()])
            (missing_fractured if grades[k] > 0 else missing_normal).append(rest[k - 1] / typical)
    normal_steps, missing_normal, missing_fractured = map(np.array, (normal_steps, missing_normal, missing_fractured))
    print("| gap factor | normal steps above it | missing normal bodies above it | missing fractured bodies above it |")
    print("|---|---|---|---|")
    for factor in (1.3, 1.4, 1.5, 1.6):
        print(f"| {factor} | {(normal_steps > factor).mean():.4f} | {(missing_normal > factor).mean():.3f} "
              f"| {(missing_fractured > factor).mean():.3f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="study", required=True)
    w = sub.add_parser("weights", help="score level-counting weights on labelled (validation) films")
    w.add_argument("--checkpoint", required=True)
    w.add_argument("--manifest", required=True)
    w.add_argument("--vertebrae", default=None, help="default: vertebrae.csv beside the manifest")
    w.add_argument("--split", default=None, help="only the manifest rows of this split (e.g. val)")
    w.add_argument("--limit", type=int, default=None)
    w.add_argument("--level-weights", default="1,0.5,0.25,0.15")
    w.add_argument("--rib-weights", default="0,0.25,0.5,1,2")
    s = sub.add_parser("steps", help="gap widths of missing bodies, from truth points")
    s.add_argument("--manifest", required=True)
    s.add_argument("--vertebrae", default=None)
    args = p.parse_args(argv)
    vertebrae = args.vertebrae or str(Path(args.manifest).parent / "vertebrae.csv")
    if args.study == "steps":
        gap_steps(args.manifest, vertebrae)
        return
    films = capture_films(args.checkpoint, args.manifest, vertebrae, args.split, args.limit)
    print("| level weight | rib weight | level accuracy | mean log p(true placement) | trusted share | trusted accuracy |")
    print("|---|---|---|---|---|---|")
    for a in (float(x) for x in args.level_weights.split(",")):
        for b in (float(x) for x in args.rib_weights.split(",")):
            r = score_weights(films, a, b)
            print(f"| {a:g} | {b:g} | {r['accuracy']:.3f} | {r['mean_log_p_true_placement']:.3f} "
                  f"| {r['trusted_share']:.2f} | {r['trusted_accuracy']:.3f} |")
    print(f"({films and len(films)} films, {r['n_bodies']} matched bodies)")


if __name__ == "__main__":
    main()
