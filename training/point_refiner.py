"""Training of the point refiner (models/point_refiner.py), as a Lightning run.

:class:`PointRefinerSystem` trains the refiner network on jittered body-frame windows of
:class:`RefinerCrops`; :func:`fit_refiner` runs ``Trainer.fit`` and keeps the epoch with the
lowest validation median point error (``val/median_error_pct``). Fit it on a model's own
training split (the split settings its bundle records) and write a new version of the bundle
holding it (:func:`write_refined`; the input is never edited)::

    python -m training.point_refiner --model BUNDLE_OR_NAME --manifest M.csv --out NEW_BUNDLE [--epochs 6]

``--checkpoint CKPT`` instead of ``--model`` reads a training checkpoint, converted in memory.
The new version has no calibration (its combiner was fitted on the crop network's points):
calibrate it again.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from data.dataset import photometric
from data.geometry import AP_MIRROR, POINT_COLUMNS
from data.manifest import assign_splits, load_manifest
from data.readers import ImageReadError, read_image
from data.transforms import normalize_intensity
from data.vertebra_targets import apply_affine, extract_crop, invert_affine
from evaluation.model_card import save_with_card
from inference.loading import open_model
from models.bundle import Bundle, ModelError, load_state_into
from models.point_refiner import (HEIGHT_CONTEXT, LOSS_UNITS, REFINE_FLIP, REFINE_PASSES, REFINE_SIZE, WIDTH_CONTEXT,
                                  body_frames, build_refiner, frame_matrices)

log = logging.getLogger(__name__)
# the data settings that decide which patients a run trained, validated and tested on
SPLIT_KEYS = ("manifest", "val_manifest", "test_manifest", "val_fraction", "split_seed")

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


def median_errors(errors: torch.Tensor, ap: torch.Tensor) -> dict[str, float]:
    """The median of ``errors`` (k, 6) per view (``ap`` (k,) bool) and their mean, the ``score``;
    ``{}`` without any error (no readable validation film)."""
    if len(errors) == 0:
        return {}
    out = {}
    for name, sel in (("ap", ap), ("lateral", ~ap)):
        if sel.any():
            out[name] = float(errors[sel].median())
    out["score"] = float(np.mean([out[k] for k in ("ap", "lateral") if k in out]))
    return out


class PointRefinerSystem(L.LightningModule):
    """Trains the refiner network (:func:`models.point_refiner.build_refiner`) on body-frame
    windows: :func:`refiner_loss` in ``loss_units``, AdamW with a cosine decay over every step,
    and the validation median point error per view (``val/median_error_pct`` is the mean of the
    AP and lateral medians, in percent of the body's height)."""

    def __init__(self, config: dict, lr: float = 5e-4, weight_decay: float = 1e-4, loss_units: str = "height"):
        super().__init__()
        if loss_units not in LOSS_UNITS:
            raise ValueError(f"loss_units must be one of {LOSS_UNITS}, got {loss_units!r}")
        self.save_hyperparameters()
        self.refiner = build_refiner(config)
        self.size = int(self.refiner.crop_size)
        self.history: list[dict] = []  # one record per training epoch (epoch 0: before training)
        self.last_validation: dict[str, float] = {}
        self._val_errors: list[torch.Tensor] = []
        self._val_ap: list[torch.Tensor] = []
        self._train_loss_sum, self._train_batches = 0.0, 0

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Points (k, 6, 2) in window pixels, read from windows (k, 1, S, S)."""
        return self.refiner(crops)["points"].float()

    def training_step(self, batch: dict | None, batch_idx: int):
        if batch is None:
            return None  # every film of this batch was unreadable: no step
        loss = refiner_loss(self(batch["crops"]), batch, self.hparams.loss_units, self.size)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["crops"]))
        self._train_loss_sum += loss.item()
        self._train_batches += 1
        return loss

    def on_train_epoch_end(self) -> None:
        record = {"epoch": self.current_epoch + 1, "train_loss": self._train_loss_sum / max(self._train_batches, 1)}
        if self.trainer.val_dataloaders is not None:
            record["val_median_error_pct"] = self.last_validation
        self.history.append(record)
        self._train_loss_sum, self._train_batches = 0.0, 0
        self.print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}"
                   + (f", validation median error {record['val_median_error_pct']}"
                      if "val_median_error_pct" in record else ""))

    def on_validation_epoch_start(self) -> None:
        self._val_errors, self._val_ap = [], []

    def validation_step(self, batch: dict | None, batch_idx: int) -> None:
        if batch is None:
            return
        pred = self(batch["crops"])
        self._val_errors.append(window_error_pct(pred, batch["points"], batch["to_original"], batch["height"]).cpu())
        self._val_ap.append(batch["ap"].cpu())

    def on_validation_epoch_end(self) -> None:
        errors = torch.cat(self._val_errors) if self._val_errors else torch.zeros(0, 6)
        ap = torch.cat(self._val_ap) if self._val_ap else torch.zeros(0, dtype=torch.bool)
        self.last_validation = median_errors(errors, ap)
        # NaN when no film was readable: the checkpoint callback then keeps the last epoch
        self.log("val/median_error_pct", self.last_validation.get("score", math.nan), prog_bar=True)
        for view in ("ap", "lateral"):
            if view in self.last_validation:
                self.log(f"val/median_error_pct_{view}", self.last_validation[view])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.refiner.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def split_settings(model: Bundle) -> dict:
    """The data settings ``model`` was trained with (manifest, val_manifest, test_manifest,
    val_fraction, split_seed, ...), as its bundle records them; ``{}`` when none are recorded."""
    return dict((model.metadata.get("training") or {}).get("data") or {})


def refiner_films(model: Bundle, manifests: list[str | Path], limit_val: int | None = None,
                  seed: int = 0) -> tuple[list[dict], list[dict]]:
    """The training and validation films of ``manifests`` for a refiner of ``model``: split by
    patient with the ``val_fraction`` and seed ``model`` was trained with, or, for a model
    validated on a separate ``val_manifest``, all of ``manifests`` training and that manifest's
    films scoring. ``limit_val``: at most that many validation films, drawn with ``seed``."""
    dhp = split_settings(model)
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
    return train, val


def refiner_loaders(train: list[dict], val: list[dict], size: int, batch_films: int, num_workers: int,
                    films_per_epoch: int | None, seed: int) -> tuple[DataLoader, DataLoader | None]:
    """The training loader draws ``films_per_epoch`` films (default: as many as there are) with
    replacement, AP and lateral films weighted to equal shares; the validation loader reads each
    film's windows, jittered once and for all by ``seed``."""
    n_ap = sum(f["ap"] for f in train)
    if 0 < n_ap < len(train):
        weights = [0.5 / n_ap if f["ap"] else 0.5 / (len(train) - n_ap) for f in train]
    else:
        weights = [1.0] * len(train)
    sampler = WeightedRandomSampler(weights, num_samples=int(films_per_epoch or len(train)), replacement=True)
    train_loader = DataLoader(RefinerCrops(train, augment=True, size=size), batch_size=batch_films, sampler=sampler,
                              num_workers=num_workers, collate_fn=_collate, persistent_workers=num_workers > 0)
    val_loader = DataLoader(RefinerCrops(val, augment=False, size=size, seed=seed), batch_size=batch_films,
                            num_workers=num_workers, collate_fn=_collate) if val else None
    return train_loader, val_loader


def trainer_device(device: str) -> dict:
    """Trainer arguments (accelerator, devices) for a torch device name such as "cpu" or "cuda:1"."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return {"accelerator": "gpu", "devices": [dev.index or 0]}
    return {"accelerator": dev.type, "devices": 1}


def fit_refiner(model: Bundle, manifests: list[str | Path], epochs: int = 6, lr: float = 5e-4,
                films_per_epoch: int | None = None, batch_films: int = 4, num_workers: int = 1,
                seed: int = 0, limit_val: int | None = None, device: str = "cpu", size: int = REFINE_SIZE,
                start_state: dict | None = None, flip: bool = REFINE_FLIP, loss_units: str = "height",
                passes: int = REFINE_PASSES) -> dict:
    """Train a refiner for ``model`` on the training split of ``manifests`` (split by patient with
    the ``val_fraction`` and seed ``model`` was trained with, so its validation patients stay
    unseen; rows with ``split = test`` are never read) and return the refiner entry
    ``{"state_dict", "config", "training"}``: the best epoch's weights by the validation median
    point error (one read, from windows jittered as in training), the config and the training
    record. A model validated on a separate ``val_manifest`` scores on that manifest's films,
    and ``manifests`` are then all training. The refiner starts from ``model``'s crop network
    weights, and uses its crop backbone.

    ``size``: the window's side in pixels. ``start_state``: a refiner's weights to start from
    (a warm start, e.g. at a new ``size``), instead of the crop network's. ``flip`` and
    ``passes``: stored for inference (:func:`refine_points`); training is the same either way.
    ``loss_units``: one of :data:`LOSS_UNITS`.

    Each epoch draws ``films_per_epoch`` training films (default: as many as there are), with
    replacement, AP and lateral films weighted to equal shares, so that a mixed manifest's many
    phantom films do not crowd out the AP ones."""
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels, got {size}")
    if loss_units not in LOSS_UNITS:
        raise ValueError(f"loss_units must be one of {LOSS_UNITS}, got {loss_units!r}")
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    L.seed_everything(seed, workers=True)
    train, val = refiner_films(model, manifests, limit_val, seed)
    config = {"backbone": model.model.get("crop_backbone", "resnet18"), "size": int(size), "width_context": WIDTH_CONTEXT,
              "height_context": HEIGHT_CONTEXT, "passes": int(passes), "flip": bool(flip)}
    system = PointRefinerSystem(config, lr=lr, loss_units=loss_units)
    crop_state = model.crop_net.state_dict() if model.crop_net is not None else None
    if start_state is not None:
        system.refiner.load_state_dict(start_state)
    elif crop_state:  # the crop network's features already know vertebrae
        system.refiner.load_state_dict(crop_state)
    train_loader, val_loader = refiner_loaders(train, val, size, batch_films, num_workers, films_per_epoch, seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="refiner_") as tmp:
        keep_best = ModelCheckpoint(dirpath=tmp, filename="best", monitor="val/median_error_pct" if val else None,
                                    mode="min", save_top_k=1, save_last=bool(val), save_weights_only=True,
                                    enable_version_counter=False)
        trainer = L.Trainer(max_epochs=epochs, logger=False, callbacks=[keep_best], default_root_dir=tmp,
                            num_sanity_val_steps=0, enable_model_summary=False, **trainer_device(device))
        if val_loader is not None:
            trainer.validate(system, val_loader, verbose=False)
            system.history.append({"epoch": 0, "train_loss": None, "val_median_error_pct": system.last_validation})
            print(f"before training ({'the starting refiner' if start_state is not None else 'crop network weights'}, "
                  f"refiner windows): validation median error {system.last_validation}")
        trainer.fit(system, train_loader, val_loader)
        score = keep_best.best_model_score
        # no score (no validation) or no finite one (no readable validation film): the last epoch
        best_path = keep_best.best_model_path if score is None or torch.isfinite(score) else keep_best.last_model_path
        best = torch.load(best_path, map_location="cpu", weights_only=True)
    prefix = "refiner."
    best_state = {k[len(prefix):]: v for k, v in best["state_dict"].items() if k.startswith(prefix)}
    training = {"manifests": [str(m) for m in manifests], "epochs": epochs, "lr": lr,
                "films_per_epoch": int(films_per_epoch or len(train)),
                "n_train_films": len(train), "n_val_films": len(val), "seed": seed, "history": system.history,
                "warm_start": start_state is not None, "loss_units": loss_units,
                "best_epoch": int(best["epoch"]) + 1,
                "seconds": round(time.time() - t0, 1)}
    return {"state_dict": best_state, "config": config, "training": training}


def write_refined(model: Bundle, entry: dict, out: str | Path) -> Path:
    """Write a new version of ``model`` holding the refiner ``entry`` (:func:`fit_refiner`) to the
    bundle folder ``out``, with its model card; returns ``out``. The new version has no
    calibration: the input's combiner was fitted on the crop network's points. ``model`` is not
    changed."""
    refiner = build_refiner(entry["config"])
    load_state_into(refiner, entry["state_dict"], f"{out}: point refiner")
    training = entry.get("training") or {}
    dropped = model.calibration is not None
    record = {key: training[key] for key in ("manifests", "epochs", "best_epoch", "warm_start", "copied_from")
              if key in training}
    record["calibration_dropped"] = dropped
    note = f"point refiner ({entry['config'].get('size')} px window, {entry['config'].get('passes')} passes)"
    if dropped:
        note += "; calibration dropped (fitted on the crop network's points): calibrate again"
    refined = model.derive("point refiner", note=note, networks={"point_refiner": refiner.eval()},
                           calibration=None, record=record)
    refined.metadata["point_refiner_training"] = training
    return save_with_card(refined, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a bundle folder or a registry name, of a model with a crop network")
    source.add_argument("--checkpoint", help="a training checkpoint (.ckpt) with a crop network, converted to a bundle")
    p.add_argument("--manifest", type=Path, action="append", default=None,
                   help="manifest.csv with vertebrae.csv beside it (repeat for more); only its training split is read "
                        "(default: the manifest the model was trained on)")
    p.add_argument("--out", type=Path, required=True,
                   help="the new bundle folder (the input's new version, with the refiner); must not exist")
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
    p.add_argument("--start-from", default=None,
                   help="a bundle (or checkpoint) of the same training run holding a point refiner to start from "
                        "(a warm start)")
    args = p.parse_args(argv)
    source_name = args.model or args.checkpoint
    flag = "--model" if args.model else "--checkpoint"
    if args.out.resolve() == Path(source_name).resolve():
        p.error(f"--out must differ from {flag}: a model is never edited in place")
    if args.out.exists():
        p.error(f"{args.out}: already exists; --out is a new bundle folder")
    if args.passes is not None and args.passes < 1:
        p.error(f"--passes must be at least 1, got {args.passes}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model = open_model(source_name)
    except ModelError as exc:
        p.error(str(exc))
    if model.crop_net is None:
        p.error(f"{source_name}: no crop network to start the refiner from")
    dhp = split_settings(model)
    manifests = args.manifest or ([Path(dhp["manifest"])] if dhp.get("manifest") else None)
    if not manifests:
        p.error(f"{source_name}: no training manifest recorded; give --manifest")
    held_out = {Path(dhp[k]).resolve() for k in ("test_manifest", "val_manifest") if dhp.get(k)}
    for m in manifests:
        if m.resolve() in held_out:
            p.error(f"{m}: the model's test or validation manifest; the refiner must not train on it")
        if dhp.get("manifest") and m.resolve() != Path(dhp["manifest"]).resolve():
            log.warning("%s is not the model's training manifest (%s): its patients are split with the same "
                        "seed, so make sure it holds none of that run's validation or test patients outside "
                        "their split", m, dhp["manifest"])
    start, start_state = None, None
    if args.start_from is not None:
        try:
            start = open_model(args.start_from)
        except ModelError as exc:
            p.error(str(exc))
        # a refiner fitted on another split may have trained on this run's validation patients
        start_dhp = split_settings(start)
        differ = [k for k in SPLIT_KEYS if start_dhp.get(k) != dhp.get(k)]
        if differ:
            p.error(f"{args.start_from}: not from the same training run as {source_name} "
                    f"(differs in {', '.join(differ)}); its refiner may have seen this run's held-out patients")
        if start.point_refiner is None:
            p.error(f"{args.start_from}: holds no point refiner to start from")
        start_state = start.point_refiner.state_dict()
        if args.size is None:
            args.size = start.point_refiner.crop_size
        if args.passes is None:
            args.passes = start.point_refiner.passes
    if args.epochs == 0 and start is not None:  # the same weights, new inference settings
        if args.size != start.point_refiner.crop_size:
            p.error(f"--size {args.size}: without training, the window stays the starting refiner's "
                    f"({start.point_refiner.crop_size})")
        config = start.metadata["networks"]["point_refiner"]["config"]
        entry = {"state_dict": start_state,
                 "config": {**config, "flip": bool(args.flip), "passes": int(args.passes)},
                 "training": {**(start.metadata.get("point_refiner_training") or {}),
                              "copied_from": str(args.start_from)}}
    else:
        if args.epochs < 1:
            p.error("--epochs must be at least 1 (0 only with --start-from)")
        entry = fit_refiner(model, manifests, epochs=args.epochs, lr=args.lr, films_per_epoch=args.films_per_epoch,
                            batch_films=args.batch_films, num_workers=args.num_workers, seed=args.seed,
                            limit_val=args.limit_val, device=device, size=args.size or REFINE_SIZE,
                            start_state=start_state, flip=args.flip, loss_units=args.loss_units,
                            passes=args.passes or REFINE_PASSES)
        entry["training"]["base_model"] = str(source_name)
        if args.start_from is not None:
            entry["training"]["started_from"] = str(args.start_from)
    try:
        out = write_refined(model, entry, args.out)
    except ModelError as exc:
        p.error(str(exc))
    if model.calibration is not None:
        print("dropped the model's calibration: it was fitted without the refiner")
    print(f"wrote {out} (best epoch {entry['training'].get('best_epoch')}); calibrate it again: "
          f"python -m calibration --model {out} --manifest VAL.csv")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    sys.exit(main())
