"""Training of the point refiner (models/point_refiner.py).

Fit it on a checkpoint's own training split and store it in a copy of the checkpoint::

    python -m training.point_refiner --checkpoint CKPT --manifest M.csv --out REFINED.ckpt [--epochs 6]
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

from data.dataset import photometric
from data.geometry import AP_MIRROR, POINT_COLUMNS
from data.manifest import assign_splits, load_manifest
from data.readers import ImageReadError, read_image
from data.transforms import normalize_intensity
from data.vertebra_targets import apply_affine, extract_crop, invert_affine
from training.checkpoint import network_state
from models.point_refiner import (HEIGHT_CONTEXT, LOSS_UNITS, REFINE_FLIP, REFINE_PASSES, REFINE_SIZE, REFINER_KEY,
                                  WIDTH_CONTEXT, body_frames, build_refiner, frame_matrices, load_refiner)
from models.vertebra_net import VertebraNet

log = logging.getLogger(__name__)

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


def main(argv: list[str] | None = None) -> int:
    from data.io_utils import atomic_write_with
    from training.checkpoint import load_checkpoint

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
    print(f"wrote {args.out} (best epoch {entry['training']['best_epoch']}); re-run python -m calibration.fit on it")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
