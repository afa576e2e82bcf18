"""Datasets and the Lightning DataModule for labelled radiographs.

A sample is a dict: ``image`` (1, H, W) float in [0, 1]; ``fracture`` and ``acute`` (acute
given a fracture) as floats with NaN for unknown; ``heatmap_target`` (3, H, W) uint8 0/1 masks:
fractured, acutely fractured and any vertebra, with ``heatmap_known`` (3,) saying which channels
may be trained; ``index``.
Unknown labels stay NaN all the way to the loss, where they are masked out.

Per-vertebra truth (``vertebrae.csv``) adds the stage-1 targets on the stride-8 grid
(``vert_centre``, ``vert_offsets``, ``vert_offset_mask``, ``vert_level``, ``vert_known``) and up to
``max_crops`` crops of the original film, one per vertebra (``crops``, ``crop_points`` in crop
pixels, ``crop_fracture``, ``crop_acute``, ``crop_valid``); see data/vertebra_targets.py.

Fracture synthesis (``fracture_synthesis=p``, training only): with probability ``p`` a film with
vertebra points gets one compression fracture simulated on an intact vertebra
(:class:`data.simulate.FractureSynthesis`: the body warped to a drawn Genant grade and shape, acute
or chronic signs rendered in the film's texture) before anything else is made from it, and every
target follows: the film's ``fracture`` and ``acute``, the heatmaps, the stage-1 targets and the
crops. For sites with few fractured films; films whose vertebrae carry unknown grades are only
fractured where the grade is known (a film labelled normal counts its vertebrae as intact).
"""
from __future__ import annotations

import logging

import cv2
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from data.cache import FilmCache, open_cache, region_crop
from data.manifest import Manifest, assign_splits, check_apart_from_training, label_arrays, load_manifest
from data.readers import ImageReadError, read_image
from data.simulate import FractureSynthesis
from data.augmentation import train_augmentation
from data.transforms import letterbox, normalize_intensity, rasterize_vertebrae
from data.geometry import AP_MIRROR, body_centre, body_extent
from data.vertebra_targets import (CROP_CONTEXT, CROP_SIZE, apply_affine, crop_matrix, extract_crop, film_vertebrae,
                                   stage1_targets)

log = logging.getLogger(__name__)
GRID_STRIDE = 8  # the network's heatmap stride (models.network.HEATMAP_STRIDE)


class RadiographDataset(Dataset):
    def __init__(self, manifest: Manifest, indices: np.ndarray | None = None,
                 image_size: tuple[int, int] = (384, 320), augment: bool = False, max_crops: int | None = None,
                 crop_jitter: float = 2.0, fracture_synthesis: float = 0.0, cache: FilmCache | None = None):
        self.manifest = manifest
        if cache is not None and tuple(cache.image_size) != tuple(image_size):
            raise ValueError(f"{cache.folder}: a cache of image size {tuple(cache.image_size)}, not {tuple(image_size)}")
        # the decoded films and crop regions (data/cache.py); None: decode each film when it is drawn
        self.cache = cache
        self.images = manifest.images if indices is None else manifest.images.iloc[indices].reset_index(drop=True)
        self.image_size = tuple(image_size)
        self.augment = train_augmentation(flip=False) if augment else None
        # training sees a random few vertebrae per film; evaluation sees (nearly) all of them
        self.max_crops = int(max_crops if max_crops is not None else (6 if augment else 20))
        # crops at inference are centred on the film network's points, which miss by up to ~10 %
        # of a body on collapsed vertebrae: training windows wander as far (1.0 = 6 % / 10 %)
        self.crop_jitter = float(crop_jitter)
        self.fracture, self.acute = label_arrays(self.images)
        if not 0.0 <= float(fracture_synthesis) <= 1.0:
            raise ValueError(f"fracture_synthesis is a probability in [0, 1], got {fracture_synthesis}")
        # only training films are fractured on the fly: evaluation must see the films as labelled
        self.synthesis = (FractureSynthesis(p=float(fracture_synthesis), assume_intact=False)
                          if augment and fracture_synthesis > 0 else None)
        # with a cache, the films drawn for synthesis are decoded: the draw is made before reading
        self.drawn_synthesis = FractureSynthesis(p=1.0, assume_intact=False) if self.synthesis else None
        self._vertebrae = {}  # read once: a pandas lookup per sample costs more than the augmentation
        if manifest.vertebrae is not None:
            wanted = set(self.images["image"])
            for image, group in manifest.vertebrae.groupby("image"):
                arrays = film_vertebrae(group) if image in wanted else None
                if arrays is not None:
                    for a in arrays:
                        if isinstance(a, np.ndarray):
                            a.setflags(write=False)  # shared by every sample of the film
                    self._vertebrae[image] = arrays

    def __len__(self) -> int:
        return len(self.images)

    def _targets(self, verts, fracture: float, box) -> tuple[np.ndarray, np.ndarray]:
        """Masks for the heatmap channels (fracture, acute, vertebra) and which are known, from the
        film's vertebra arrays (:meth:`_vertebra_arrays`, None without vertebrae) and its label."""
        target = np.zeros((3,) + self.image_size, np.uint8)
        known = np.zeros(3, np.float32)
        if verts is not None:
            pts, _, v_fracture, v_acute, _ = verts
            in_input = [box.to_input(p) for p in pts]
            target[2] = rasterize_vertebrae(in_input, self.image_size)
            known[2] = 1.0
        if fracture == 0:
            known[:2] = 1.0  # a normal film has no fractured pixel
            return target, known
        if verts is None or fracture != 1 or np.isnan(v_fracture).any():
            return target, known
        fractured = np.flatnonzero(v_fracture == 1)
        target[0] = rasterize_vertebrae([in_input[k] for k in fractured], self.image_size)
        known[0] = 1.0
        if not np.isnan(v_acute[fractured]).any():
            target[1] = rasterize_vertebrae([in_input[k] for k in fractured if v_acute[k] == 1], self.image_size)
            known[1] = 1.0
        return target, known

    def _synthesise(self, full: np.ndarray, verts, fracture: float, acute: float, synthesis=None):
        """Fracture synthesis on one training film: ``(full, verts, fracture, acute)`` after it
        (``synthesis``: the one to apply, by default ``self.synthesis``)."""
        pts, levels, _, v_acute, grade = verts
        if fracture == 0:  # a normal film's vertebrae are intact, graded or not
            grade = np.where(np.isnan(grade), 0.0, grade)
        labels = {"genant_grade": grade, "acute_vertebrae": v_acute, "fracture": fracture,
                  "acute": acute if fracture == 1 else float("nan"), "levels": [str(v) for v in levels]}
        full, pts, labels = (synthesis or self.synthesis)(full, pts, labels, rng=self.rng)
        if labels["simulated"] is None:
            return full, verts, fracture, acute
        grade = np.asarray(labels["genant_grade"], dtype=float)
        v_fracture = np.where(np.isnan(grade), np.nan, (grade > 0).astype(float))
        v_acute = np.where(v_fracture == 1, np.asarray(labels["acute_vertebrae"], dtype=float), np.nan)
        fracture = float(labels["fracture"])
        acute = float(labels["acute"]) if fracture == 1 else float("nan")
        return np.asarray(full, dtype=np.float32), (pts, levels, v_fracture, v_acute, grade), fracture, acute

    def _vertebra_arrays(self, image: str):
        """Points (K, 6, 2), level codes, fracture and acute labels and Genant grades (NaN unknown)
        of one film (:func:`~data.vertebra_targets.film_vertebrae`, read once), or None."""
        return self._vertebrae.get(image)

    def _crops(self, full: np.ndarray | None, verts, ap: bool, regions=None) -> dict:
        """Up to ``max_crops`` vertebra crops, read from the film ``full`` or, with the cache,
        from each vertebra's cached source ``regions`` (regions, affines)."""
        m = self.max_crops
        crops = np.zeros((m, 1, CROP_SIZE, CROP_SIZE), np.float32)
        points = np.zeros((m, 6, 2), np.float32)
        fracture = np.full(m, np.nan, np.float32)
        acute = np.full(m, np.nan, np.float32)
        valid = np.zeros(m, np.float32)
        if verts is not None and m > 0:
            pts, _, frac, acu, _ = verts
            order = self.rng.permutation(len(pts)) if self.augment is not None else np.arange(len(pts))
            centres, extents = body_centre(pts), body_extent(pts)
            for slot, k in enumerate(order[:m]):
                centre, side, angle = centres[k], CROP_CONTEXT * extents[k], 0.0
                if self.augment is not None:  # the stage-1 points it will be cropped around are not exact
                    # bounded so that the body's six points stay inside the window
                    shift = np.clip(self.rng.normal(0, 0.06 * self.crop_jitter, 2), -0.15, 0.15)
                    centre = centre + shift * extents[k]
                    side *= float(np.clip(np.exp(self.rng.normal(0, 0.1 * self.crop_jitter)), 0.85, 1.35))
                    angle = float(self.rng.uniform(-8, 8))
                matrix = crop_matrix(centre, side, angle)
                crop = extract_crop(full, matrix) if regions is None else region_crop(regions[0][k], regions[1][k], matrix)
                p = apply_affine(matrix, pts[k])
                if self.augment is not None:
                    if self.rng.random() < 0.5:
                        crop = crop[:, ::-1]
                        p[:, 0] = CROP_SIZE - 1 - p[:, 0]
                        if ap:
                            p = p[AP_MIRROR]
                    crop = photometric(crop, self.rng)
                crops[slot, 0] = crop
                points[slot] = p
                fracture[slot], acute[slot], valid[slot] = frac[k], acu[k], 1.0
        return {"crops": torch.from_numpy(crops), "crop_points": torch.from_numpy(points),
                "crop_fracture": torch.from_numpy(fracture), "crop_acute": torch.from_numpy(acute),
                "crop_valid": torch.from_numpy(valid)}

    def __getitem__(self, i: int) -> dict | None:
        row = self.images.iloc[i]
        image = row["image"]
        # drawn from torch's generator, which Lightning seeds per worker (a numpy Generator made
        # once would be copied into every worker and repeat the same jitter there)
        self.rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ()).item()))
        fracture, acute = float(self.fracture[i]), float(self.acute[i])
        verts = self._vertebra_arrays(image)
        regions = None
        cached = self.cache is not None and image in self.cache
        if cached and self.synthesis is not None and verts is not None and self.rng.random() < self.synthesis.p:
            cached = False  # synthesis needs the full film
            synthesis = self.drawn_synthesis
        else:
            synthesis = None if cached else self.synthesis
        try:
            if cached:
                pixels, box = self.cache.film(image)
                regions = self.cache.regions(image)
                full = None
            else:
                full = normalize_intensity(read_image(image).pixels)
        except ImageReadError as exc:
            log.warning("skipping unreadable training image: %s", exc)
            return {"failed": str(exc)}
        if not cached:
            if synthesis is not None and verts is not None:
                full, verts, fracture, acute = self._synthesise(full, verts, fracture, acute, synthesis)
            pixels, box = letterbox(full, self.image_size)
        target, known = self._targets(verts, fracture, box)
        ap = str(row.get("view", "")).strip().lower() == "ap"
        keypoints = box.to_input(verts[0].reshape(-1, 2)) if verts is not None else np.zeros((0, 2))
        if self.augment is not None:
            # the three target channels as one (H, W, 3) mask: one warp instead of three, the same pixels
            mask = cv2.merge(list(target))
            if self.rng.random() < 0.5:  # mirror here, so that AP points can be relabelled
                pixels, mask = cv2.flip(pixels, 1), cv2.flip(mask, 1)
                keypoints = keypoints.copy()
                keypoints[:, 0] = self.image_size[1] - 1 - keypoints[:, 0]
                if ap and len(keypoints):
                    keypoints = keypoints.reshape(-1, 6, 2)[:, AP_MIRROR].reshape(-1, 2)
            out = self.augment(image=pixels, mask=mask, keypoints=keypoints)
            pixels, target = out["image"], out["mask"].transpose(2, 0, 1)
            keypoints = np.asarray(out["keypoints"], dtype=np.float64).reshape(-1, 2)
        grid = (-(-self.image_size[0] // GRID_STRIDE), -(-self.image_size[1] // GRID_STRIDE))
        levels = verts[1] if verts is not None else []
        st1 = stage1_targets(keypoints.reshape(-1, 6, 2), levels, grid, GRID_STRIDE)
        sample = {
            "image": torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None],
            "fracture": torch.tensor(fracture, dtype=torch.float32),
            "acute": torch.tensor(acute, dtype=torch.float32),
            # 0/1 masks as uint8: a quarter of the bytes to collate, pin and copy to the device
            "heatmap_target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.uint8)),
            "heatmap_known": torch.from_numpy(known),
            "vert_centre": torch.from_numpy(st1["centre"]),
            "vert_offsets": torch.from_numpy(st1["offsets"]),
            "vert_offset_mask": torch.from_numpy(st1["offset_mask"]),
            "vert_level": torch.from_numpy(st1["level"]),
            "vert_known": torch.tensor(float(verts is not None)),
            "index": i,
        }
        sample.update(self._crops(full, verts, ap, regions))
        return sample


def photometric(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gamma, contrast and noise on a [0, 1] crop."""
    crop = np.clip(crop, 0, 1) ** float(np.exp(rng.normal(0, 0.15)))
    crop = (crop - 0.5) * float(rng.uniform(0.85, 1.15)) + 0.5 + float(rng.normal(0, 0.04))
    if rng.random() < 0.3:
        crop = crop + rng.normal(0, rng.uniform(0, 0.03), crop.shape)
    return np.clip(crop, 0, 1).astype(np.float32)


def collate_skipping_failures(batch: list[dict]) -> dict:
    """Collate the readable samples; the count of unreadable ones travels in the batch."""
    good = [b for b in batch if "failed" not in b]
    failed = [b["failed"] for b in batch if "failed" in b]
    out = default_collate(good) if good else {}
    out["n_failed"] = len(failed)
    return out


class SpineDataModule(L.LightningDataModule):
    """Patient-grouped train/val/test splits of one manifest (or a separate validation one).

    Loader options: ``cache_dir`` reads each manifest's films from a decoded, pre-sized cache
    there (data/cache.py), built on first use and rebuilt when the manifest or its images
    change; ``pin_memory`` (for a GPU), ``persistent_workers`` (workers kept between epochs)
    and ``prefetch_factor`` (batches each worker prepares ahead) go to the DataLoader."""

    def __init__(self, manifest: str, vertebrae: str | None = "auto", val_manifest: str | None = None,
                 test_manifest: str | None = None, image_size: tuple[int, int] = (384, 320),
                 batch_size: int = 16, num_workers: int = 2, val_fraction: float = 0.15,
                 split_seed: int = 0, augment: bool = True, crop_jitter: float = 2.0,
                 fracture_synthesis: float = 0.0, cache_dir: str | None = None, pin_memory: bool = False,
                 persistent_workers: bool = True, prefetch_factor: int = 2):
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
        training = main.images[(splits == "train").to_numpy()]
        val = test = None
        if hp.val_manifest:
            val = load_manifest(hp.val_manifest)
            check_apart_from_training(val, training, hp.manifest, "validation")
        if hp.test_manifest:
            test = load_manifest(hp.test_manifest)
            check_apart_from_training(test, training, hp.manifest, "test")

        def cache(manifest: Manifest) -> FilmCache | None:  # built once the manifests are known to be usable
            return open_cache(hp.cache_dir, manifest, size) if hp.cache_dir else None

        main_cache = cache(main)
        self.train_set = RadiographDataset(main, np.flatnonzero(splits == "train"), size, augment=hp.augment,
                                           crop_jitter=hp.crop_jitter, fracture_synthesis=hp.fracture_synthesis,
                                           cache=main_cache)
        if val is not None:
            self.val_set = RadiographDataset(val, None, size, cache=cache(val))
        else:
            self.val_set = RadiographDataset(main, np.flatnonzero(splits == "val"), size, cache=main_cache)
        test_idx = np.flatnonzero(splits == "test")
        if test is not None:
            self.test_set = RadiographDataset(test, None, size, cache=cache(test))
        elif len(test_idx):
            self.test_set = RadiographDataset(main, test_idx, size, cache=main_cache)
        if len(self.train_set) == 0:
            raise ValueError(f"{hp.manifest}: no training images after the split")
        for name, ds in (("train", self.train_set), ("val", self.val_set)):
            n_pos = int(np.nansum(ds.fracture))
            n_unknown = int(np.isnan(ds.fracture).sum())
            log.info("%s: %d images (%d fractured, %d unknown)", name, len(ds), n_pos, n_unknown)

    def _loader(self, ds, shuffle: bool) -> DataLoader:
        hp = self.hparams
        workers = hp.num_workers
        if workers > 0:
            # OpenCV in the workers uses one thread, as torch does there (many workers each starting a
            # thread per core contend for the cores they share); set here, before they fork: set in a
            # forked worker, it can deadlock on the thread pool the parent left behind
            cv2.setNumThreads(1)
        return DataLoader(ds, batch_size=hp.batch_size, shuffle=shuffle, num_workers=workers,
                          collate_fn=collate_skipping_failures, pin_memory=hp.pin_memory,
                          persistent_workers=hp.persistent_workers and workers > 0,
                          prefetch_factor=hp.prefetch_factor if workers > 0 else None, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise ValueError("no test split: give test_manifest or rows with split = test")
        return self._loader(self.test_set, shuffle=False)
