"""A decoded, pre-sized training cache: what a training sample needs of each film, read from
memory-mapped arrays instead of decoding a 16-bit PNG or DICOM and normalising it.

    python -m data.cache --manifest M.csv --out CACHE [--image-size 384 320] [--workers 2]

Training reads a manifest's films through it when the config sets ``data.cache_dir``; a cache
that is missing or stale is built there on first use (``SpineDataModule.setup``). A cache is
stale when the manifest's images (path, size, modification time), their vertebra points, the
image size or this module's format change; it is then rebuilt.

Per film it holds the network input, the normalised film letterboxed to ``image_size``
(data.transforms), as uint16 (value x 65535: a step of 1.5e-5), and per vertebra the **source
region** of its crops: a square around the body, ``REGION_CONTEXT`` x its larger extent, so
that every training window (jittered in centre, size and angle, data/dataset.py) lies inside
it, resampled to ``REGION_SIZE`` pixels when the body is larger than that (at the film's own
resolution otherwise). A crop is then read from the region: identical to one read from the
film for small bodies, and within the resampling's blur for large ones.

Layout: ``CACHE/<manifest stem>-<hash of its path>/``:

* ``index.json``: format, fingerprint, image size, region size and context, image paths in
  manifest order, and the films that could not be read, with the reason;
* ``films.npy`` ``(n, H, W)`` uint16; ``boxes.npy`` ``(n, 5)``: the letterbox's scale, left and
  top padding, and the original height and width;
* ``regions.npy`` ``(m, R, R)`` uint16; ``region_affine.npy`` ``(m, 2, 3)``: original pixels
  to region pixels; ``region_start.npy`` ``(n + 1,)``: film ``k``'s regions are
  ``region_start[k]:region_start[k + 1]``, in the order of
  :func:`data.vertebra_targets.film_vertebrae`.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from data.geometry import body_centre, body_extent
from data.io_utils import atomic_write_json
from data.manifest import Manifest, ManifestError, load_manifest
from data.readers import ImageReadError, read_image
from data.transforms import Letterbox, letterbox, normalize_intensity
from data.vertebra_targets import crop_matrix, extract_crop, film_vertebrae, invert_affine

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # raise when what is stored, or how it is computed, changes
REGION_SIZE = 160
# training windows reach at most 0.15 x the extent (centre jitter) + 1.8 x 1.35 / 2 x 1.13 (the
# largest window, turned by 8 degrees) = 1.52 x the extent from the body's centre, per axis
REGION_CONTEXT = 3.1
U16 = 65535.0


class CacheError(RuntimeError):
    """A cache that cannot be built or read; the message names it."""


def cache_folder(root: str | os.PathLike, manifest_path: str | os.PathLike) -> Path:
    """Where the cache of ``manifest_path`` lives under ``root``."""
    path = Path(manifest_path).resolve()
    return Path(root) / f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


def _film_points(manifest: Manifest) -> list[np.ndarray | None]:
    """Each manifest image's vertebra points (K, 6, 2), or None."""
    groups = dict(tuple(manifest.vertebrae.groupby("image"))) if manifest.vertebrae is not None else {}
    out = []
    for image in manifest.images["image"]:
        arrays = film_vertebrae(groups.get(image))
        out.append(None if arrays is None else arrays[0])
    return out


def fingerprint(manifest: Manifest, image_size: tuple[int, int], points: list | None = None) -> str:
    """A hash of everything the cache's contents follow from: each image's path, size and
    modification time, the vertebra points, the image size and the cache's format."""
    points = _film_points(manifest) if points is None else points
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "image_size": list(image_size),
                                   "region": [REGION_SIZE, REGION_CONTEXT]}).encode())
    for image, pts in zip(manifest.images["image"], points):
        try:
            st = os.stat(image)
            h.update(f"{image}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        except OSError:
            h.update(f"{image}\0missing\0".encode())
        h.update(b"-" if pts is None else np.ascontiguousarray(pts, dtype=np.float64).tobytes())
    return h.hexdigest()


def region_matrix(centre: np.ndarray, extent: float) -> np.ndarray:
    """Original pixels to region pixels: a square of ``REGION_CONTEXT`` x ``extent`` around
    ``centre``, at most ``REGION_SIZE`` pixels across; a smaller square is kept at the film's
    resolution, its corner on a whole pixel, so that the region is an exact copy."""
    side = REGION_CONTEXT * float(extent)
    if side > REGION_SIZE:
        return crop_matrix(centre, side, 0.0, REGION_SIZE)
    corner = np.round(np.asarray(centre, dtype=np.float64) - (REGION_SIZE - 1) / 2.0)
    return np.array([[1.0, 0.0, -corner[0]], [0.0, 1.0, -corner[1]]])


def read_film(image: str, image_size: tuple[int, int], points: np.ndarray | None) -> dict:
    """What the cache holds of one film: ``film`` (H, W) uint16, ``box`` (5,), ``regions``
    (K, R, R) uint16 and ``affine`` (K, 2, 3); or ``error`` when it cannot be read."""
    try:
        full = normalize_intensity(read_image(image).pixels)
    except ImageReadError as exc:
        return {"error": exc.reason}
    pixels, box = letterbox(full, image_size)
    n = 0 if points is None else len(points)
    regions = np.zeros((n, REGION_SIZE, REGION_SIZE), np.uint16)
    affine = np.zeros((n, 2, 3))
    if n:
        for k, (centre, extent) in enumerate(zip(body_centre(points), body_extent(points))):
            affine[k] = region_matrix(centre, extent)
            regions[k] = to_u16(extract_crop(full, affine[k], out=REGION_SIZE))
    return {"film": to_u16(pixels), "box": np.array([box.scale, box.pad_left, box.pad_top, *box.in_hw], np.float64),
            "regions": regions, "affine": affine}


def to_u16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * U16).astype(np.uint16)


def _read_job(job):
    return read_film(*job)


def build(manifest: Manifest, out: str | os.PathLike, image_size: tuple[int, int], workers: int = 0,
          progress: bool = False) -> Path:
    """Write the cache of ``manifest`` into folder ``out`` (replacing what is there; written
    beside it and renamed into place, so that a killed build leaves no half cache)."""
    out = Path(out)
    image_size = (int(image_size[0]), int(image_size[1]))
    points = _film_points(manifest)
    images = [str(p) for p in manifest.images["image"]]
    start = np.zeros(len(images) + 1, np.int64)
    start[1:] = np.cumsum([0 if p is None else len(p) for p in points])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    began = time.time()
    try:
        films = np.lib.format.open_memmap(tmp / "films.npy", "w+", np.uint16, (len(images), *image_size))
        regions = np.lib.format.open_memmap(tmp / "regions.npy", "w+", np.uint16,
                                            (int(start[-1]), REGION_SIZE, REGION_SIZE))
        boxes = np.zeros((len(images), 5))
        affine = np.zeros((int(start[-1]), 2, 3))
        failed = {}
        jobs = [(image, image_size, pts) for image, pts in zip(images, points)]
        pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
        try:
            results = pool.map(_read_job, jobs, chunksize=4) if pool else map(_read_job, jobs)
            for k, r in enumerate(results):
                if "error" in r:
                    failed[images[k]] = r["error"]
                    continue
                films[k], boxes[k] = r["film"], r["box"]
                regions[start[k]:start[k + 1]], affine[start[k]:start[k + 1]] = r["regions"], r["affine"]
                if progress and (k + 1) % 200 == 0:
                    log.info("cache %s: %d / %d films", out, k + 1, len(images))
        finally:
            if pool:
                pool.shutdown()
        films.flush()
        regions.flush()
        del films, regions
        np.save(tmp / "boxes.npy", boxes)
        np.save(tmp / "region_affine.npy", affine)
        np.save(tmp / "region_start.npy", start)
        atomic_write_json(tmp / "index.json", {
            "format": CACHE_FORMAT, "fingerprint": fingerprint(manifest, image_size, points),
            "manifest": str(Path(manifest.path).resolve()), "image_size": list(image_size),
            "region_size": REGION_SIZE, "region_context": REGION_CONTEXT, "images": images, "failed": failed,
            "seconds": round(time.time() - began, 1)})
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class FilmCache:
    """A built cache, memory-mapped (each process maps it itself, so DataLoader workers share
    the pages)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self.index = json.loads((self.folder / "index.json").read_text())
        except (OSError, ValueError) as exc:
            raise CacheError(f"{self.folder}: not a readable training cache ({type(exc).__name__}: {exc})") from exc
        self.image_size = tuple(self.index["image_size"])
        self.row = {image: k for k, image in enumerate(self.index["images"])}
        self.failed = self.index["failed"]
        self.boxes = np.load(self.folder / "boxes.npy")
        self.affine = np.load(self.folder / "region_affine.npy")
        self.start = np.load(self.folder / "region_start.npy")
        self._maps = None  # opened in the process that reads them

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def _arrays(self):
        if self._maps is None:
            self._maps = (np.load(self.folder / "films.npy", mmap_mode="r"),
                          np.load(self.folder / "regions.npy", mmap_mode="r"))
        return self._maps

    def __contains__(self, image: str) -> bool:
        return image in self.row

    def film(self, image: str) -> tuple[np.ndarray, Letterbox]:
        """The film's network input (float32 in [0, 1]) and its letterbox; :class:`ImageReadError`
        for a film that could not be read when the cache was built."""
        if image in self.failed:
            raise ImageReadError(image, self.failed[image])
        k = self.row[image]
        scale, left, top, h, w = self.boxes[k]
        pixels = self._arrays()[0][k].astype(np.float32) * np.float32(1.0 / U16)
        return pixels, Letterbox(scale=float(scale), pad_left=int(left), pad_top=int(top),
                                 out_hw=self.image_size, in_hw=(int(h), int(w)))

    def regions(self, image: str) -> tuple[np.ndarray, np.ndarray]:
        """The film's vertebra regions (K, R, R) uint16 and their affines (original pixels to region pixels)."""
        k = self.row[image]
        a, b = int(self.start[k]), int(self.start[k + 1])
        return self._arrays()[1][a:b], self.affine[a:b]


def region_crop(region: np.ndarray, affine: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The crop of window ``matrix`` (original pixels to crop pixels, data.vertebra_targets)
    read from a cached ``region`` (uint16) whose ``affine`` maps original pixels to it."""
    back = invert_affine(affine)  # region pixels to original pixels
    composed = np.concatenate([matrix[:, :2] @ back[:, :2], (matrix[:, :2] @ back[:, 2] + matrix[:, 2])[:, None]], axis=1)
    # resampled as uint16 (rounding moves a value by at most 7.6e-6), converted once it is small
    return extract_crop(np.asarray(region), composed).astype(np.float32) * np.float32(1.0 / U16)


def open_cache(root: str | os.PathLike, manifest: Manifest, image_size: tuple[int, int], workers: int = 0,
               build_missing: bool = True) -> FilmCache:
    """The cache of ``manifest`` under ``root``, built first when it is missing or stale (one
    process builds while the others, e.g. the ranks of a DDP run, wait for it)."""
    folder = cache_folder(root, manifest.path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = fingerprint(manifest, tuple(image_size))
        index = folder / "index.json"
        try:
            stored = json.loads(index.read_text()).get("fingerprint") if index.is_file() else None
        except ValueError:
            stored = None
        if stored != current:
            if not build_missing:
                raise CacheError(f"{folder}: {'stale' if stored else 'missing'}; build it with "
                                 f"`python -m data.cache --manifest {manifest.path} --out {root}`")
            log.info("building the training cache %s (%s)", folder, "stale" if stored else "missing")
            build(manifest, folder, image_size, workers=workers)
        return FilmCache(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the decoded, pre-sized training cache of a manifest "
                                            "(read by training when data.cache_dir is set).")
    p.add_argument("--manifest", required=True, help="manifest CSV (vertebrae.csv beside it is read too)")
    p.add_argument("--out", required=True, help="cache folder (data.cache_dir); one sub-folder per manifest")
    p.add_argument("--image-size", type=int, nargs=2, default=(384, 320), metavar=("H", "W"),
                   help="the network's input size (data.image_size; default 384 320)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: this one)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        manifest = load_manifest(args.manifest)
        began = time.time()
        cache = open_cache(args.out, manifest, tuple(args.image_size), workers=args.workers)
    except ManifestError as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except (CacheError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{cache.folder}: {len(cache.row)} films, {int(cache.start[-1])} vertebra regions, "
          f"{len(cache.failed)} unreadable; {time.time() - began:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
