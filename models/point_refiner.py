"""Point refinement: a third stage that re-reads each body's six points in its own frame.

The crop network (models/vertebra_net.py) reads a square window 1.8 x the body's larger
extent, unrotated. On an AP film a body is about 1.7 x wider than tall, so that window spans
about three bodies vertically and the body's height gets only ~30 of its 96 pixels; on a
scoliotic spine the body is also tilted in it. The refiner reads a window in the body's own
frame instead: rotated so that its endplates run horizontally, ``WIDTH_CONTEXT`` x its width
wide and ``HEIGHT_CONTEXT`` x its height tall, resampled to ``REFINE_SIZE`` square (so the
two axes are scaled differently). Its network is a :class:`VertebraNet` (only the points are
used), started from the crop network's weights.

It only moves points: the vertebra's ``p_fracture`` and ``p_acute`` stay the crop network's.
The morphometry (heights, grade, height loss) is measured on the refined points.

Fit it on a checkpoint's own training split and store it in a copy of the checkpoint::

    python -m models.point_refiner --checkpoint CKPT --manifest M.csv --out REFINED.ckpt [--epochs 6]

Inference (``infer.py``) uses it whenever the checkpoint holds one (``point_refiner`` key:
``{"state_dict", "config", "training"}``). Re-run ``python -m models.calibration`` on the new
checkpoint: the morphometry combiner is fitted on the heights the points give.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm import tqdm

from data.dataset import POINT_COLUMNS, photometric
from data.manifest import assign_splits, load_manifest
from data.readers import ImageReadError, read_image
from data.transforms import normalize_intensity
from data.vertebra_targets import AP_MIRROR, apply_affine, crop_matrix, extract_crop, invert_affine, unmirror_points
from models.checkpoint import network_state
from models.vertebra_net import VertebraNet

log = logging.getLogger(__name__)

REFINER_KEY = "point_refiner"
REFINE_SIZE = 96
WIDTH_CONTEXT = 1.7  # window width / mean endplate length
HEIGHT_CONTEXT = 2.2  # window height / mean body height
REFINE_PASSES = 2  # reads per body, each in the frame of the previous reading
# the last pass also reads the window mirrored and averages the two readings: on the AASCE validation
# films the median point error fell by 0.05 and 0.17 points of the height (benchmarks/RESULTS.md)
REFINE_FLIP = True
MIN_SIDE = 8.0  # original pixels: a collapsed guess still gets a window
# Training windows are placed as far off as the crop network's readings leave them. Measured on
# 40 AASCE validation films (crop readings from truth-placed windows, 2 passes): centre off by
# sd 0.05 of the width along the endplates and 0.09 of the height across them; width and height
# off by sd 0.12 and 0.15 in log ratio; tilt off by sd 4.7 degrees.
JITTER_SHIFT, JITTER_SHIFT_MAX = (0.06, 0.10), 0.25  # (along, across) the endplates
JITTER_SCALE, JITTER_SCALE_MAX = 0.14, 0.35  # log ratio, width and height drawn apart
JITTER_ANGLE_DEG = 6.0
# Training loss units. "height": each point's distance to the truth in original pixels, as a
# fraction of the body's height, the unit the benchmark reports (the window is scaled more
# along the endplates than across them, so window pixels under-weight the along-endplate error,
# the larger part on AP films). "window": the mean absolute error in window pixels (refiners
# stored before the option).
LOSS_UNITS = ("height", "window")


def body_frames(points: np.ndarray) -> dict[str, np.ndarray]:
    """Each body's centre (n, 2), tilt (n,, radians), width and height (n,) in pixels.

    The tilt is the mean endplate direction's, folded into (-90, 90] degrees so that a window
    is never turned upside down (anterior stays on whichever side the film has it)."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    direction = (p[:, 2] - p[:, 0]) + (p[:, 5] - p[:, 3])
    # fold into (-90, 90]: point the endplate direction rightwards (straight down counts as up)
    eps = 1e-9 * np.linalg.norm(direction, axis=1)
    flip = (direction[:, 0] < -eps) | ((np.abs(direction[:, 0]) <= eps) & (direction[:, 1] < 0))
    direction = np.where(flip[:, None], -direction, direction)
    width = 0.5 * (np.linalg.norm(p[:, 2] - p[:, 0], axis=-1) + np.linalg.norm(p[:, 5] - p[:, 3], axis=-1))
    height = np.linalg.norm(p[:, 3:] - p[:, :3], axis=-1).mean(axis=-1)
    return {"centre": p.mean(axis=1), "angle": np.arctan2(direction[:, 1], direction[:, 0]),
            "width": width, "height": height}


def frame_matrix(centre, angle: float, width: float, height: float, out: int = REFINE_SIZE,
                 context: tuple[float, float] = (WIDTH_CONTEXT, HEIGHT_CONTEXT)) -> np.ndarray:
    """2x3 affine map from original pixels to the window's pixels: rotate by ``-angle`` about
    ``centre``, then scale each axis so the window spans ``context[0] * width`` by
    ``context[1] * height``. The window is at least ``MIN_SIDE`` and at most 3:1 per side
    (a collapsed body's height is never read from a sliver)."""
    side_x = max(context[0] * float(width), MIN_SIDE)
    side_y = max(context[1] * float(height), MIN_SIDE, side_x / 3)
    side_x = max(side_x, side_y / 3)
    return crop_matrix(centre, (side_x, side_y), math.degrees(angle), out)


def frame_matrices(points: np.ndarray, rng: np.random.Generator | None = None, out: int = REFINE_SIZE,
                   context: tuple[float, float] = (WIDTH_CONTEXT, HEIGHT_CONTEXT)) -> list[np.ndarray]:
    """One window per body, placed from ``points``; with ``rng``, jittered as in training."""
    f = body_frames(points)
    mats = []
    for centre, angle, width, height in zip(f["centre"], f["angle"], f["width"], f["height"]):
        if rng is not None:
            shift = np.clip(rng.normal(0, JITTER_SHIFT), -JITTER_SHIFT_MAX, JITTER_SHIFT_MAX)
            c, s = math.cos(angle), math.sin(angle)
            centre = centre + shift[0] * width * np.array([c, s]) + shift[1] * height * np.array([-s, c])
            width *= float(np.exp(np.clip(rng.normal(0, JITTER_SCALE), -JITTER_SCALE_MAX, JITTER_SCALE_MAX)))
            height *= float(np.exp(np.clip(rng.normal(0, JITTER_SCALE), -JITTER_SCALE_MAX, JITTER_SCALE_MAX)))
            angle += math.radians(float(rng.normal(0, JITTER_ANGLE_DEG)))
        mats.append(frame_matrix(centre, angle, width, height, out, context))
    return mats


def build_refiner(config: dict) -> VertebraNet:
    """The refiner's network, carrying the window it was trained with (``context``, ``passes``)."""
    net = VertebraNet(backbone=config.get("backbone", "resnet18"), crop_size=int(config.get("size", REFINE_SIZE)))
    net.context = (float(config.get("width_context", WIDTH_CONTEXT)), float(config.get("height_context", HEIGHT_CONTEXT)))
    net.passes = int(config.get("passes", REFINE_PASSES))
    net.flip = bool(config.get("flip", False))  # refiners stored before the option: not mirrored
    return net


@torch.no_grad()
def refine_points(net: torch.nn.Module, image: np.ndarray, points: np.ndarray, device: torch.device,
                  passes: int | None = None, flip: bool | None = None) -> np.ndarray:
    """Refined points (n, 6, 2) in original pixels, each pass read in the frame of the last.

    ``image``: the normalised original pixels; ``points``: (n, 6, 2) in original pixels. The
    window, the number of passes and ``flip`` (the last pass also reads each window mirrored
    and averages the two readings) are the ones stored with ``net`` (:func:`build_refiner`)
    unless given here."""
    passes = int(getattr(net, "passes", REFINE_PASSES)) if passes is None else passes
    flip = bool(getattr(net, "flip", False)) if flip is None else flip
    context = tuple(getattr(net, "context", (WIDTH_CONTEXT, HEIGHT_CONTEXT)))
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 6, 2)
    if len(pts) == 0:
        return pts
    size = int(getattr(net, "crop_size", REFINE_SIZE))
    for k in range(passes):
        mats = frame_matrices(pts, out=size, context=context)
        crops = np.stack([extract_crop(image, m, out=size) for m in mats])[:, None].astype(np.float32)
        read = net(torch.from_numpy(crops).to(device))["points"].float().cpu().numpy().astype(np.float64)
        if flip and k == passes - 1:
            mirrored = net(torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).to(device))["points"]
            read = (read + unmirror_points(mirrored.float().cpu().numpy(), read, size)) / 2
        pts = np.stack([apply_affine(invert_affine(m), p) for m, p in zip(mats, read)])
    return pts


# --------------------------------------------------------------------------- training


class RefinerCrops(Dataset):
    """All labelled bodies of one film per item: jittered windows (k, 1, S, S) and the true
    points in window pixels (k, 6, 2). Training items are mirrored half the time (AP points
    relabelled, as the crop network's training does) and get the photometric augmentation."""

    def __init__(self, films: list[dict], augment: bool, size: int = REFINE_SIZE, seed: int = 0):
        self.films, self.augment, self.size, self.seed = films, augment, size, seed

    def __len__(self) -> int:
        return len(self.films)

    def __getitem__(self, i: int) -> dict:
        film = self.films[i]
        # validation windows are the same every epoch; training ones differ per draw
        rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ()).item()) if self.augment else (self.seed, i))
        try:
            image = normalize_intensity(read_image(film["image"]).pixels)
        except ImageReadError as exc:
            log.warning("skipping unreadable image: %s", exc)
            return {"failed": str(exc)}
        pts = film["points"]
        mats = frame_matrices(pts, rng=rng, out=self.size)
        crops = np.stack([extract_crop(image, m, out=self.size) for m in mats]).astype(np.float32)
        target = np.stack([apply_affine(m, p) for m, p in zip(mats, pts)])
        if self.augment:
            flip = rng.random(len(crops)) < 0.5
            for k in np.flatnonzero(flip):
                crops[k] = crops[k][:, ::-1]
                target[k, :, 0] = self.size - 1 - target[k, :, 0]
                if film["ap"]:
                    target[k] = target[k][AP_MIRROR]
            crops = np.stack([photometric(c, rng) for c in crops])
        to_original = np.stack([invert_affine(m)[:, :2] for m in mats])
        return {"crops": torch.from_numpy(np.ascontiguousarray(crops[:, None])),
                "points": torch.from_numpy(target.astype(np.float32)),
                "height": torch.from_numpy(body_frames(pts)["height"].astype(np.float32)),
                "to_original": torch.from_numpy(to_original.astype(np.float32)),
                "ap": torch.full((len(crops),), bool(film["ap"]))}


def _collate(items: list[dict]) -> dict | None:
    items = [it for it in items if "failed" not in it]
    if not items:
        return None
    return {k: torch.cat([it[k] for it in items]) for k in items[0]}


def labelled_films(manifest_path: str | Path, split: str, val_fraction: float, seed: int) -> list[dict]:
    """Films of ``split`` ("train" or "val") with their bodies' points (n, 6, 2), from a
    manifest with ``vertebrae.csv`` beside it, split by patient as training splits it."""
    manifest = load_manifest(manifest_path)
    if manifest.vertebrae is None:
        raise ValueError(f"{manifest_path}: no vertebrae.csv beside it: the refiner needs labelled points")
    splits = assign_splits(manifest.images, val_fraction=val_fraction, seed=seed)
    images = manifest.images[splits.to_numpy() == split]
    by_image = {img: g for img, g in manifest.vertebrae.groupby("image")}
    films = []
    for _, row in images.iterrows():
        rows = by_image.get(row["image"])
        if rows is None:
            continue
        pts = rows[POINT_COLUMNS].to_numpy(dtype=float).reshape(-1, 6, 2)
        pts = pts[np.isfinite(pts).all(axis=(1, 2))]
        if len(pts):
            films.append({"image": row["image"], "points": pts,
                          "ap": str(row.get("view", "")).strip().lower() == "ap"})
    return films


def window_error_pct(pred: torch.Tensor, target: torch.Tensor, to_original: torch.Tensor,
                     height: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """(k, 6) distances from window-pixel points to the truth, in original pixels (through each
    window's linear map back, ``to_original`` (k, 2, 2)) as a percentage of the body's height.
    ``eps`` > 0 (squared pixels) smooths the norm so that its gradient stays finite at zero error."""
    d = (pred - target) @ to_original.transpose(1, 2)
    return (d.pow(2).sum(-1) + eps).sqrt() / height[:, None] * 100


def refiner_loss(pred: torch.Tensor, batch: dict, units: str, size: int) -> torch.Tensor:
    """The training loss of a batch's readings ``pred`` (k, 6, 2), in window pixels, in
    ``units`` (:data:`LOSS_UNITS`); both are about 1 for a typical early error."""
    target = batch["points"].to(pred.device)
    if units == "window":
        return (pred - target).abs().mean() / size * 10
    height = batch["height"].to(pred.device).clamp_min(1.0)
    return window_error_pct(pred, target, batch["to_original"].to(pred.device), height, eps=1e-6).mean() / 10


def _evaluate(net: VertebraNet, loader: DataLoader, device: torch.device) -> dict:
    net.eval()
    errors, ap = [], []
    with torch.no_grad():
        for batch in loader:
            if batch is None:
                continue
            pred = net(batch["crops"].to(device))["points"].float().cpu()
            errors.append(window_error_pct(pred, batch["points"], batch["to_original"], batch["height"]))
            ap.append(batch["ap"])
    if not errors:
        return {}  # no readable validation film
    err, ap = torch.cat(errors), torch.cat(ap)
    out = {}
    for name, sel in (("ap", ap), ("lateral", ~ap)):
        if sel.any():
            out[name] = float(err[sel].median())
    out["score"] = float(np.mean([out[k] for k in ("ap", "lateral") if k in out]))
    return out


def fit_refiner(checkpoint: dict, manifests: list[str | Path], epochs: int = 6, lr: float = 5e-4,
                films_per_epoch: int | None = None, batch_films: int = 4, num_workers: int = 1,
                seed: int = 0, limit_val: int | None = None, device: str = "cpu", size: int = REFINE_SIZE,
                start_state: dict | None = None, flip: bool = REFINE_FLIP, loss_units: str = "height",
                passes: int = REFINE_PASSES) -> dict:
    """Train a refiner on the training split of ``manifests`` (split by patient with the
    checkpoint's ``val_fraction`` and seed, so its validation patients stay unseen; rows with
    ``split = test`` are never read) and return the ``point_refiner`` entry: the best epoch's
    weights by the validation median point error (one read, from windows jittered as in
    training), the config and the training record. A checkpoint validated on a separate
    ``val_manifest`` scores on that manifest's films, and ``manifests`` are then all training.

    ``size``: the window's side in pixels. ``start_state``: a refiner's weights to start from
    (a warm start, e.g. at a new ``size``), instead of the crop network's. ``flip`` and
    ``passes``: stored for inference (:func:`refine_points`); training is the same either way.
    ``loss_units``: one of :data:`LOSS_UNITS`.

    Each epoch draws ``films_per_epoch`` training films (default: as many as there are), with
    replacement, AP and lateral films weighted to equal shares, so that a mixed manifest's many
    phantom films do not crowd out the AP ones."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    torch.manual_seed(seed)
    dhp = checkpoint.get("datamodule_hyper_parameters") or {}
    split_seed = int(dhp.get("split_seed", 0) or 0)
    val_fraction = 0.0 if dhp.get("val_manifest") else float(dhp.get("val_fraction", 0.15))
    train, val = [], []
    for m in manifests:
        train += labelled_films(m, "train", val_fraction, split_seed)
        if not dhp.get("val_manifest"):
            val += labelled_films(m, "val", val_fraction, split_seed)
    if dhp.get("val_manifest"):
        val = labelled_films(dhp["val_manifest"], "train", 0.0, split_seed)  # all its films but split = test rows
    if not train:
        raise ValueError(f"{', '.join(map(str, manifests))}: no training film with labelled points")
    if limit_val:
        val = [val[i] for i in np.random.default_rng(seed).permutation(len(val))[:limit_val]]
    meta = checkpoint.get("vcf_model") or {}
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if loss_units not in LOSS_UNITS:
        raise ValueError(f"loss_units must be one of {LOSS_UNITS}, got {loss_units!r}")
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    config = {"backbone": meta.get("crop_backbone", "resnet18"), "size": int(size), "width_context": WIDTH_CONTEXT,
              "height_context": HEIGHT_CONTEXT, "passes": int(passes), "flip": bool(flip)}
    net = build_refiner(config)
    crop_state = network_state(checkpoint, "vertebra_net.")
    if start_state is not None:
        net.load_state_dict(start_state)
    elif crop_state:  # the crop network's features already know vertebrae
        net.load_state_dict(crop_state)
    dev = torch.device(device)
    net.to(dev)
    n_ap = sum(f["ap"] for f in train)
    weights = [0.5 / n_ap if f["ap"] else 0.5 / (len(train) - n_ap) for f in train] if 0 < n_ap < len(train) else [1.0] * len(train)
    per_epoch = int(films_per_epoch or len(train))
    sampler = WeightedRandomSampler(weights, num_samples=per_epoch, replacement=True)
    train_loader = DataLoader(RefinerCrops(train, augment=True, size=size), batch_size=batch_films, sampler=sampler,
                              num_workers=num_workers, collate_fn=_collate, persistent_workers=num_workers > 0)
    val_loader = DataLoader(RefinerCrops(val, augment=False, size=size, seed=seed), batch_size=batch_films,
                            num_workers=num_workers, collate_fn=_collate) if val else None
    steps = epochs * math.ceil(per_epoch / batch_films)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history, best, best_state, best_epoch, t0 = [], math.inf, None, 0, time.time()
    if val_loader is not None:
        history.append({"epoch": 0, "train_loss": None, "val_median_error_pct": _evaluate(net, val_loader, dev)})
        print(f"before training ({'the starting refiner' if start_state is not None else 'crop network weights'}, refiner windows): validation median error "
              f"{history[-1]['val_median_error_pct']}")
    for epoch in range(1, epochs + 1):
        net.train()
        total, n = 0.0, 0
        bar = tqdm(train_loader, desc=f"refiner epoch {epoch}/{epochs}", leave=False)
        for batch in bar:
            if batch is None:
                continue
            pred = net(batch["crops"].to(dev))["points"].float()
            loss = refiner_loss(pred, batch, loss_units, size)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item(), n + 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
        record = {"epoch": epoch, "train_loss": total / max(n, 1)}
        score = -epoch  # without a validation score: the last epoch
        if val_loader is not None:
            record["val_median_error_pct"] = _evaluate(net, val_loader, dev)
            score = record["val_median_error_pct"].get("score", score)
        if score < best or best_state is None:
            best, best_epoch = score, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        history.append(record)
        print(f"epoch {epoch}: train loss {record['train_loss']:.4f}"
              + (f", validation median error {record['val_median_error_pct']}" if "val_median_error_pct" in record else "")
              + f" ({time.time() - t0:.0f} s)")
    training = {"manifests": [str(m) for m in manifests], "epochs": epochs, "lr": lr, "films_per_epoch": per_epoch,
                "n_train_films": len(train), "n_val_films": len(val), "seed": seed, "history": history,
                "warm_start": start_state is not None, "loss_units": loss_units,
                "best_epoch": best_epoch,
                "seconds": round(time.time() - t0, 1)}
    return {"state_dict": best_state, "config": config, "training": training}


def load_refiner(ckpt: dict, path: str | Path = "checkpoint") -> VertebraNet | None:
    """The refiner stored in a checkpoint, ready to run, or None when it holds none. A malformed
    entry raises ValueError naming ``path``."""
    entry = ckpt.get(REFINER_KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("state_dict"), dict):
        raise ValueError(f"{path}: malformed {REFINER_KEY!r} entry (expected a dict with a state_dict)")
    config = entry.get("config") or {}
    try:
        if not isinstance(config, dict):
            raise TypeError(f"config is a {type(config).__name__}, not a dict")
        net = build_refiner(config)
        if net.passes < 1 or min(net.context) <= 0 or net.crop_size < 16:
            raise ValueError(f"passes {net.passes}, context {net.context}, size {net.crop_size} out of range")
        net.load_state_dict(entry["state_dict"])
    except Exception as exc:  # any shape, key or value problem: the file is at fault, say which
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: the point refiner's weights or config do not fit ({detail})") from exc
    return net.eval()


def main(argv: list[str] | None = None) -> int:
    from data.io_utils import atomic_write_with
    from models.checkpoint import load_checkpoint

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained checkpoint with a crop network")
    p.add_argument("--manifest", type=Path, action="append", default=None,
                   help="manifest.csv with vertebrae.csv beside it (repeat for more); only its training split is read "
                        "(default: the manifest the checkpoint was trained on)")
    p.add_argument("--out", type=Path, required=True, help="the new checkpoint (a copy with the refiner added)")
    p.add_argument("--epochs", type=int, default=6,
                   help="0 with --start-from: no training, the starting refiner stored with this run's --flip "
                        "and --passes")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--films-per-epoch", type=int, default=None)
    p.add_argument("--batch-films", type=int, default=4, help="films per batch (all their bodies)")
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--limit-val", type=int, default=None, help="validate on at most N films")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None,
                   help=f"window side in pixels (default {REFINE_SIZE}, or the --start-from refiner's)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=REFINE_FLIP,
                   help="the last pass also reads each window mirrored and averages the two (inference only)")
    p.add_argument("--passes", type=int, default=None,
                   help=f"reads per body at inference, each in the frame of the last (default {REFINE_PASSES}, "
                        "or the --start-from refiner's)")
    p.add_argument("--loss-units", choices=LOSS_UNITS, default="height",
                   help="height: point distance as a fraction of the body height (the benchmark's unit); "
                        "window: absolute error in window pixels (refiners before the option)")
    p.add_argument("--start-from", type=Path, default=None,
                   help="a refined checkpoint of the same training run whose refiner to start from (a warm start)")
    args = p.parse_args(argv)
    if args.out.resolve() == args.checkpoint.resolve():
        p.error("--out must differ from --checkpoint")
    if args.passes is not None and args.passes < 1:
        p.error(f"--passes must be at least 1, got {args.passes}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    ckpt = load_checkpoint(args.checkpoint)
    if not any(k.startswith("vertebra_net.") for k in ckpt["state_dict"]):
        p.error(f"{args.checkpoint}: no crop network to start the refiner from")
    dhp = ckpt.get("datamodule_hyper_parameters") or {}
    manifests = args.manifest or ([Path(dhp["manifest"])] if dhp.get("manifest") else None)
    if not manifests:
        p.error(f"{args.checkpoint}: no training manifest recorded; give --manifest")
    held_out = {Path(dhp[k]).resolve() for k in ("test_manifest", "val_manifest") if dhp.get(k)}
    for m in manifests:
        if m.resolve() in held_out:
            p.error(f"{m}: the checkpoint's test or validation manifest; the refiner must not train on it")
        if dhp.get("manifest") and m.resolve() != Path(dhp["manifest"]).resolve():
            log.warning("%s is not the checkpoint's training manifest (%s): its patients are split with the same "
                        "seed, so make sure it holds none of that run's validation or test patients outside "
                        "their split", m, dhp["manifest"])
    start_state = None
    if args.start_from is not None:
        start = load_checkpoint(args.start_from)
        # a refiner fitted on another split may have trained on this run's validation patients
        split_keys = ("manifest", "val_manifest", "test_manifest", "val_fraction", "split_seed")
        start_dhp = start.get("datamodule_hyper_parameters") or {}
        differ = [k for k in split_keys if start_dhp.get(k) != dhp.get(k)]
        if differ:
            p.error(f"{args.start_from}: not from the same training run as {args.checkpoint} "
                    f"(differs in {', '.join(differ)}); its refiner may have seen this run's held-out patients")
        try:
            refiner = load_refiner(start, args.start_from)
        except ValueError as exc:
            p.error(str(exc))
        if refiner is None:
            p.error(f"{args.start_from}: holds no point refiner to start from")
        start_state = refiner.state_dict()
        if args.size is None:
            args.size = refiner.crop_size
        if args.passes is None:
            args.passes = refiner.passes
    if args.epochs == 0 and start_state is not None:  # the same weights, new inference settings
        entry = {**start[REFINER_KEY], "config": {**start[REFINER_KEY]["config"], "flip": bool(args.flip),
                                                  "passes": int(args.passes)}}
        if args.size != refiner.crop_size:
            p.error(f"--size {args.size}: without training, the window stays the starting refiner's ({refiner.crop_size})")
        entry["training"] = {**entry["training"], "copied_from": str(args.start_from)}
    else:
        if args.epochs < 1:
            p.error("--epochs must be at least 1 (0 only with --start-from)")
        entry = fit_refiner(ckpt, manifests, epochs=args.epochs, lr=args.lr, films_per_epoch=args.films_per_epoch,
                            batch_films=args.batch_films, num_workers=args.num_workers, seed=args.seed,
                            limit_val=args.limit_val, device=device, size=args.size or REFINE_SIZE,
                            start_state=start_state, flip=args.flip, loss_units=args.loss_units,
                            passes=args.passes or REFINE_PASSES)
        entry["training"]["base_checkpoint"] = str(args.checkpoint)
        if args.start_from is not None:
            entry["training"]["started_from"] = str(args.start_from)
    ckpt[REFINER_KEY] = entry
    if ckpt.pop("vcf_calibration", None) is not None:  # its combiner was fitted on the crop network's heights
        print("dropped the checkpoint's calibration: it was fitted without the refiner")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(args.out, lambda tmp: torch.save(ckpt, tmp))
    print(f"wrote {args.out} (best epoch {entry['training']['best_epoch']}); re-run python -m models.calibration on it")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
