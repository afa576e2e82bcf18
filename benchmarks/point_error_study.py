r"""Where the per-vertebra point error comes from, on labelled films.

    python -m benchmarks.point_error_study --checkpoint CKPT --vertebrae V.csv [--limit N] [--json OUT.json]

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
2. ``pipeline``: the whole per-vertebra analysis of inference (inference.vertebrae.analyse_film)
   with 2 and 3 crop passes, and with each body's crop window taken from the median extent of
   it and its neighbours (window 5): the median and 90th percentile against the truth bodies
   matched as evaluation/vertebrae.py matches them. A checkpoint with a point refiner
   (models/point_refiner.py) is read with it, once more without it, and once with the other
   setting of its mirrored last pass (``flip``: the last pass also reads each window
   mirrored and averages the two readings).

3. ``conventions`` (with ``--group-regex``): do the annotations follow one convention? The
   films are grouped by the regular expression's first capture group, searched in each file
   name (for the AASCE films, ``--group-regex='-(\w{3}-\d{4})-'``, the acquisition month; the
   ``=`` keeps a pattern that starts with a dash from reading as an option). The
   default analysis's signed point errors are taken in each truth body's own frame (along its
   endplates and across them, % of its height); per group: the median error, how much wider
   and taller than annotated the bodies are read, and the median error once the group's median
   signed offset per point is removed, fitted on the other half of the group's films
   (cross-fitted, so no film corrects itself). A large fall means the groups were annotated
   differently: an error no reader of the pixels alone can remove.

Comparing the crop rows of training films with those of validation films tells whether the
crop network fits its own training labels any better than unseen ones.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm


import inference.vertebrae as V
from data.readers import read_image
from data.transforms import normalize_intensity
from data.geometry import body_axes, body_centre, body_extent, body_height, table_points
from data.tables import load_vertebrae_table
from evaluation.vertebrae import summarise_vertebrae
from training.checkpoint import build_vertebra_network, load_checkpoint
from models.network import HEATMAP_STRIDE
from models.point_refiner import load_refiner, refine_points
from evaluation.vertebrae import match_vertebrae
from inference.predictor import InferenceDataset, Predictor
from data.records import VERTEBRA_COLUMNS, vertebra_rows
from data.io_utils import atomic_write_json

POINTS = [f"p{k}{c}" for k in range(1, 7) for c in "xy"]
JITTER = 0.06  # centre shift, fraction of the body extent per axis (the training jitter's scale)


def _quantiles(err: np.ndarray) -> dict:
    return {"median": float(np.median(err)), "p90": float(np.percentile(err, 90))}


def _read(net, pixels: np.ndarray, points: np.ndarray) -> np.ndarray:
    """One crop pass of inference's reader, its windows placed from ``points``."""
    return V.read_crops(net, pixels, points, torch.device("cpu"), passes=1)["points"]


def crop_study(net, films: list[tuple[np.ndarray, np.ndarray]], seed: int = 0, refiner=None) -> dict:
    """``films``: (normalised pixels, truth points (n, 6, 2)) per film. With a ``refiner``
    (models/point_refiner.py), two more rows: its reading from windows placed on the truth
    (``refiner on truth``) and from the crop network's truth-placed reading (``crop + refiner``)."""
    rng = np.random.default_rng(seed)
    reads = {"truth": [], "jitter": [], "scale 0.9": [], "scale 1.1": []}
    if refiner is not None:
        reads.update({"refiner on truth": [], "crop + refiner": []})
    truth = []
    for pixels, pts in films:
        c, e = body_centre(pts), body_extent(pts)
        # the window follows the points it is placed from: shift them to move it, scale them to resize it
        shift = JITTER * e[:, None] * rng.normal(0, 1, c.shape)
        reads["truth"].append(_read(net, pixels, pts))
        reads["jitter"].append(_read(net, pixels, pts + shift[:, None, :]))
        reads["scale 0.9"].append(_read(net, pixels, c[:, None] + 0.9 * (pts - c[:, None])))
        reads["scale 1.1"].append(_read(net, pixels, c[:, None] + 1.1 * (pts - c[:, None])))
        if refiner is not None:
            reads["refiner on truth"].append(refine_points(refiner, pixels, pts, torch.device("cpu")))
            reads["crop + refiner"].append(refine_points(refiner, pixels, reads["truth"][-1], torch.device("cpu")))
        truth.append(pts)
    t = np.concatenate(truth)
    height = body_height(t)
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


def _neighbour_median_extent(window: int):
    """``body_extent`` with each body's value replaced by the median of it and its neighbours
    (head to feet), for read_crops' window sizes."""
    def extent(points: np.ndarray) -> np.ndarray:
        ext = body_extent(points)
        if len(ext) < 3:
            return ext
        order, half = np.argsort(body_centre(points)[:, 1]), window // 2
        smooth = ext.copy()
        smooth[order] = [np.median(ext[order][max(0, i - half): i + half + 1]) for i in range(len(ext))]
        return smooth
    return extent


def body_frame_errors(pred_points: np.ndarray, truth_points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signed errors (n, 6) of predicted points along the truth body's endplates (from its p1/p4
    side towards p3/p6) and across them (towards its inferior endplate), % of its mean height."""
    t = np.asarray(truth_points, float).reshape(-1, 6, 2)
    d = np.asarray(pred_points, float).reshape(-1, 6, 2) - t
    u, v = body_axes(t)
    scale = 100.0 / body_height(t)[:, None]
    return (d * u[:, None]).sum(-1) * scale, (d * v[:, None]).sum(-1) * scale


def convention_study(pred: pd.DataFrame, truth: pd.DataFrame, group_regex: str, seed: int = 0) -> dict:
    """Per group of films (``group_regex``'s first capture group in the file name; films it does
    not match form the group ``"other"``): how the matched points' errors shift with the group.
    See the module docstring, item 3."""

    pattern = re.compile(group_regex)
    if pattern.groups < 1:
        raise ValueError(f"--group-regex {group_regex!r} needs a capture group naming the film's group")
    m = match_vertebrae(pred, truth)
    m = m[m["matched"]]
    along, across = body_frame_errors(table_points(pred)[m["pred_index"].to_numpy()],
                                      table_points(truth)[m["truth_index"].to_numpy()])
    films = m["image"].to_numpy()

    def group_of(path: str) -> str:
        hit = pattern.search(Path(path).name)
        return hit.group(1) if hit and hit.group(1) is not None else "other"

    groups = np.array([group_of(f) for f in films], dtype=object)
    error = np.hypot(along, across)
    # cross-fitting: each group's films in two halves; one half's median offsets correct the other
    rng = np.random.default_rng(seed)
    names = np.array(sorted(set(films)), dtype=object)
    first_half = set(rng.permutation(names)[: len(names) // 2])
    half = np.array([f in first_half for f in films])
    along_c, across_c = np.full_like(along, np.nan), np.full_like(across, np.nan)
    for g in set(groups):
        for fit, apply in ((half, ~half), (~half, half)):
            s_fit, s_apply = (groups == g) & fit, (groups == g) & apply
            if s_fit.any() and s_apply.any():
                along_c[s_apply] = along[s_apply] - np.median(along[s_fit], axis=0)
                across_c[s_apply] = across[s_apply] - np.median(across[s_fit], axis=0)
    corrected = np.hypot(along_c, across_c)

    def med(x):
        x = x[np.isfinite(x)]
        return float(np.median(x)) if x.size else None

    out = {"group_regex": group_regex, "n_vertebrae": int(len(m)), "median_error_pct": med(error.ravel()),
           "median_error_group_offsets_removed_pct": med(corrected.ravel()),
           "n_vertebrae_corrected": int(np.isfinite(corrected).all(axis=1).sum()), "groups": {}}
    for g in sorted(set(groups)):
        s = groups == g
        out["groups"][g] = {
            "n_films": int(len(set(films[s]))), "n_vertebrae": int(s.sum()),
            "median_error_pct": med(error[s].ravel()),
            # read minus annotated: width (right minus left corners along), height (inferior minus superior across)
            "read_wider_than_annotated_pct": med(along[s][:, [2, 5]].mean(1) - along[s][:, [0, 3]].mean(1)),
            "read_taller_than_annotated_pct": med(across[s][:, 3:].mean(1) - across[s][:, :3].mean(1)),
            "median_error_group_offsets_removed_pct": med(corrected[s].ravel()),
        }
    return out


def pipeline_study(checkpoint: Path, paths: list[str], truth: pd.DataFrame, only: list[str] | None = None,
                   tables: dict | None = None) -> dict:

    predictor = Predictor(checkpoint, device="cpu", calibrated=False)
    dataset = InferenceDataset(paths, predictor.image_size)
    films = []
    for i in tqdm(range(len(dataset)), desc="film network", leave=False):
        item = dataset[i]
        with torch.no_grad():
            logits = predictor.net(item["image"][None].to(predictor.device))["vertebra_logits"][0]
        films.append((item, logits))
    # read_crops sizes its windows with inference.vertebrae's body_extent: swapped for one variant
    refiner = predictor.point_refiner
    variants = {"2 passes": (2, body_extent, refiner, None), "3 passes": (3, body_extent, refiner, None),
                "2 passes, neighbour-median extent": (2, _neighbour_median_extent(5), refiner, None)}
    if refiner is not None:
        stored_flip = bool(getattr(refiner, "flip", False))
        variants["2 passes, without the point refiner"] = (2, body_extent, None, None)
        other = "refiner's last pass not mirrored" if stored_flip else "refiner's last pass also mirrored"
        variants[f"2 passes, {other}"] = (2, body_extent, refiner, not stored_flip)
    if only:  # names matching any of these regular expressions, whole
        variants = {k: v for k, v in variants.items() if any(re.fullmatch(pattern, k) for pattern in only)}
    out = {}
    saved = V.CROP_PASSES, V.body_extent
    try:
        for name, (passes, extent, refiner, flip) in variants.items():
            V.CROP_PASSES, V.body_extent = passes, extent
            if refiner is not None:
                refiner.flip = stored_flip if flip is None else flip
            rows = []
            for path, (item, logits) in zip(paths, films):
                film = V.analyse_film(logits, item["box"], HEATMAP_STRIDE, predictor.vertebra_net,
                                      item["pixels"], predictor.device, point_refiner=refiner)
                rows += vertebra_rows(path, path, film["vertebrae"], film["levels_trusted"])
            pred = pd.DataFrame(rows, columns=VERTEBRA_COLUMNS)  # the columns even where nothing was found
            pred["genant_grade"] = pd.to_numeric(pred["genant_grade"])
            summary = summarise_vertebrae(pred, truth, evaluated_images=paths)
            if tables is not None:  # the caller keeps each variant's predicted vertebrae
                tables[name] = pred
            out[name] = {**summary["point_error"]["percent_height"], "recall": summary["detection"]["recall"],
                         "precision": summary["detection"]["precision"]}
    finally:
        V.CROP_PASSES, V.body_extent = saved
        if predictor.point_refiner is not None:
            predictor.point_refiner.flip = stored_flip
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--vertebrae", type=Path, required=True, help="vertebrae.csv with manifest.csv beside it")
    p.add_argument("--limit", type=int, default=None, help="only the first N films")
    p.add_argument("--skip-pipeline", action="store_true", help="the crop study only")
    p.add_argument("--only", action="append", default=None,
                   help="run only the pipeline variants whose whole name matches this regular expression "
                        "(repeat for more), e.g. '2 passes|.*mirrored'")
    p.add_argument("--group-regex", default=None,
                   help="also compare the errors of groups of films named by this regular expression's first "
                        "capture group in the file name (e.g. --group-regex='-(\\w{3}-\\d{4})-' for the AASCE acquisition "
                        "month): do the groups follow different annotation conventions?")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args(argv)
    if args.group_regex is not None:
        if args.skip_pipeline:
            p.error("--group-regex compares the whole analysis's errors: drop --skip-pipeline")
        try:
            if re.compile(args.group_regex).groups < 1:
                p.error(f"--group-regex {args.group_regex!r} needs a capture group naming the film's group")
        except re.error as exc:
            p.error(f"--group-regex {args.group_regex!r}: {exc}")
    truth = load_vertebrae_table(args.vertebrae, args.vertebrae.parent / "manifest.csv")
    paths = list(dict.fromkeys(truth["image"]))[: args.limit]
    truth = truth[truth["image"].isin(paths)].reset_index(drop=True)
    ckpt = load_checkpoint(args.checkpoint)
    net = build_vertebra_network(ckpt, args.checkpoint).eval()
    refiner = load_refiner(ckpt, args.checkpoint)
    films = []
    for path in tqdm(paths, desc="crop study", leave=False):
        pts = truth.loc[truth["image"] == path, POINTS].to_numpy(float).reshape(-1, 6, 2)
        films.append((normalize_intensity(read_image(path).pixels), pts[np.isfinite(pts).all(axis=(1, 2))]))
    result = {"checkpoint": str(args.checkpoint), "vertebrae": str(args.vertebrae), "n_films": len(paths),
              "crop": crop_study(net, films, refiner=refiner)}
    crop = result["crop"]
    print(f"crop network on crops placed from the truth ({crop['n_vertebrae']} vertebrae of {len(paths)} films), "
          f"point error as % of body height:")
    for name, q in crop["variants"].items():
        print(f"  {name:<28} median {q['median']:5.2f}  p90 {q['p90']:5.2f}")
    print(f"  each film's mean signed error removed: median {crop['without_each_films_mean_error']['median']:.2f}")
    print(f"  mean signed error per point p1..p6, x: {crop['mean_signed_error_pct']['x']}, y: {crop['mean_signed_error_pct']['y']}")
    if not args.skip_pipeline:
        tables: dict = {}
        result["pipeline"] = pipeline_study(args.checkpoint, paths, truth, only=args.only, tables=tables)
        print("whole per-vertebra analysis (matched vertebrae):")
        def fmt(v, digits):  # None where nothing was matched
            return "-" if v is None else f"{v:.{digits}f}"

        for name, q in result["pipeline"].items():
            print(f"  {name:<36} median {fmt(q['median'], 2)}  p90 {fmt(q['p90'], 2)}  recall {fmt(q['recall'], 3)}  "
                  f"precision {fmt(q['precision'], 3)}")
        if args.group_regex is not None:
            first = next(iter(tables))  # the default analysis unless --only left it out
            conv = result["conventions"] = {"variant": first, **convention_study(tables[first], truth, args.group_regex)}
            print(f"annotation groups ({first}; % of the body height; offsets removed: cross-fitted per group):")
            for g, q in conv["groups"].items():
                print(f"  {g:<16} films {q['n_films']:3d}  median {fmt(q['median_error_pct'], 2)}  "
                      f"read wider {fmt(q['read_wider_than_annotated_pct'], 1)}  taller {fmt(q['read_taller_than_annotated_pct'], 1)}  "
                      f"offsets removed {fmt(q['median_error_group_offsets_removed_pct'], 2)}")
            print(f"  all groups: median {fmt(conv['median_error_pct'], 2)} -> "
                  f"{fmt(conv['median_error_group_offsets_removed_pct'], 2)} with each group's offsets removed")
    if args.json:

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
