"""Datasets and the Lightning DataModule for labelled radiographs.

A sample is a dict: ``image`` (1, H, W) float in [0, 1]; ``fracture`` and ``acute`` (acute
given a fracture) as floats with NaN for unknown; ``heatmap_target`` (3, H, W): fractured, acutely
fractured and any vertebra, with ``heatmap_known`` (3,) saying which channels may be trained; ``index``.
Unknown labels stay NaN all the way to the loss, where they are masked out.
"""
from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from data.manifest import Manifest, assign_splits, label_arrays, load_manifest
from data.readers import ImageReadError, read_image
from data.transforms import letterbox, normalize_intensity, rasterize_vertebrae, train_augmentation

log = logging.getLogger(__name__)
POINT_COLUMNS = [f"p{i}{c}" for i in range(1, 7) for c in "xy"]


class RadiographDataset(Dataset):
    def __init__(self, manifest: Manifest, indices: np.ndarray | None = None,
                 image_size: tuple[int, int] = (384, 320), augment: bool = False):
        self.manifest = manifest
        self.images = manifest.images if indices is None else manifest.images.iloc[indices].reset_index(drop=True)
        self.image_size = tuple(image_size)
        self.augment = train_augmentation() if augment else None
        self.fracture, self.acute = label_arrays(self.images)
        self._vertebrae = {}
        if manifest.vertebrae is not None:
            for image, group in manifest.vertebrae.groupby("image"):
                self._vertebrae[image] = group

    def __len__(self) -> int:
        return len(self.images)

    def _targets(self, image: str, fracture: float, box) -> tuple[np.ndarray, np.ndarray]:
        """Masks for the heatmap channels (fracture, acute, vertebra) and which are known."""
        target = np.zeros((3,) + self.image_size, np.uint8)
        known = np.zeros(3, np.float32)
        rows = self._vertebrae.get(image)
        if rows is not None:
            all_pts = [box.to_input(r[POINT_COLUMNS].to_numpy(dtype=float).reshape(6, 2)) for _, r in rows.iterrows()]
            target[2] = rasterize_vertebrae(all_pts, self.image_size)
            known[2] = 1.0
        if fracture == 0:
            known[:2] = 1.0  # a normal film has no fractured pixel
            return target, known
        if rows is None or fracture != 1:
            return target, known
        grades = rows["genant_grade"].to_numpy(dtype=float)
        if np.isnan(grades).any():
            return target, known
        fractured = rows[grades > 0]
        pts = [box.to_input(r[POINT_COLUMNS].to_numpy(dtype=float).reshape(6, 2)) for _, r in fractured.iterrows()]
        target[0] = rasterize_vertebrae(pts, self.image_size)
        known[0] = 1.0
        acute = fractured["acute"].to_numpy(dtype=float)
        if not np.isnan(acute).any():
            target[1] = rasterize_vertebrae([p for p, a in zip(pts, acute) if a == 1], self.image_size)
            known[1] = 1.0
        return target, known

    def __getitem__(self, i: int) -> dict | None:
        row = self.images.iloc[i]
        try:
            pixels = read_image(row["image"]).pixels
        except ImageReadError as exc:
            log.warning("skipping unreadable training image: %s", exc)
            return {"failed": str(exc)}
        pixels, box = letterbox(normalize_intensity(pixels), self.image_size)
        target, known = self._targets(row["image"], float(self.fracture[i]), box)
        if self.augment is not None:
            out = self.augment(image=pixels, masks=list(target))
            pixels, target = out["image"], np.stack(out["masks"])
        return {
            "image": torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None],
            "fracture": torch.tensor(self.fracture[i]),
            "acute": torch.tensor(self.acute[i]),
            "heatmap_target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
            "heatmap_known": torch.from_numpy(known),
            "index": i,
        }


def collate_skipping_failures(batch: list[dict]) -> dict:
    """Collate the readable samples; the count of unreadable ones travels in the batch."""
    good = [b for b in batch if "failed" not in b]
    failed = [b["failed"] for b in batch if "failed" in b]
    out = default_collate(good) if good else {}
    out["n_failed"] = len(failed)
    return out


class SpineDataModule(L.LightningDataModule):
    """Patient-grouped train/val/test splits of one manifest (or a separate validation one)."""

    def __init__(self, manifest: str, vertebrae: str | None = "auto", val_manifest: str | None = None,
                 test_manifest: str | None = None, image_size: tuple[int, int] = (384, 320),
                 batch_size: int = 16, num_workers: int = 2, val_fraction: float = 0.15,
                 split_seed: int = 0, augment: bool = True):
        super().__init__()
        self.save_hyperparameters()
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        # Validation runs before training starts: a bad manifest fails here, listing every problem.
        main = load_manifest(hp.manifest, hp.vertebrae)
        splits = assign_splits(main.images, val_fraction=0.0 if hp.val_manifest else hp.val_fraction,
                               seed=hp.split_seed)
        size = tuple(hp.image_size)
        self.train_set = RadiographDataset(main, np.flatnonzero(splits == "train"), size, augment=hp.augment)
        if hp.val_manifest:
            self.val_set = RadiographDataset(load_manifest(hp.val_manifest), None, size)
        else:
            self.val_set = RadiographDataset(main, np.flatnonzero(splits == "val"), size)
        test_idx = np.flatnonzero(splits == "test")
        if hp.test_manifest:
            self.test_set = RadiographDataset(load_manifest(hp.test_manifest), None, size)
        elif len(test_idx):
            self.test_set = RadiographDataset(main, test_idx, size)
        if len(self.train_set) == 0:
            raise ValueError(f"{hp.manifest}: no training images after the split")
        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            n_pos = int(np.nansum(ds.fracture))
            n_unknown = int(np.isnan(ds.fracture).sum())
            log.info("%s: %d images (%d fractured, %d unknown)", name, len(ds), n_pos, n_unknown)

    def _loader(self, ds, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, collate_fn=collate_skipping_failures,
                          persistent_workers=self.hparams.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise ValueError("no test split: give test_manifest or rows with split = test")
        return self._loader(self.test_set, shuffle=False)
