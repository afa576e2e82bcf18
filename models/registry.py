"""Named models: a small registry kept in the repository (models/registry.json).

Each entry maps a name to a bundle folder (relative to the repository root) or to the URL of
an archive of one (``.tar.gz``, ``.tgz`` or ``.zip``), with the sha256 that vouches for it
(of ``metadata.json`` for a folder, of the archive for a URL) and a line on its training data::

    {"format": 1, "default": "NAME",
     "models": {"NAME": {"path": "models/bundles/NAME", "sha256": "...",
                         "training_data": "...", "description": "..."}}}

``default`` names the shipped model, the one ``infer.py`` reads when no model is named.

A URL is fetched only when the caller allows it (``allow_download``; ``infer.py --download``),
then checked against its sha256, unpacked into the cache (``$SPINE_VCF_CACHE``, default
``~/.cache/spine-vcf/bundles/<sha256>``) and read from there on later runs without the network.
"""
from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from models.bundle import METADATA_FILE, BundleError, file_sha256, is_bundle

REGISTRY_PATH = Path(__file__).resolve().parent / "registry.json"
REPO_ROOT = REGISTRY_PATH.parents[1]
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip")


def cache_root() -> Path:
    """Where fetched bundles and derived files (ONNX exports) are kept: ``$SPINE_VCF_CACHE``,
    default ``~/.cache/spine-vcf``."""
    return Path(os.environ.get("SPINE_VCF_CACHE") or Path.home() / ".cache" / "spine-vcf")


def cache_dir() -> Path:
    return cache_root() / "bundles"


def read_registry(path: str | os.PathLike = REGISTRY_PATH) -> dict[str, dict]:
    """The registry's entries by name; a malformed registry raises :class:`BundleError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable model registry ({exc})") from exc
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise BundleError(f"{path}: no 'models' object")
    for name, entry in models.items():
        if not isinstance(entry, dict) or not entry.get("sha256") or not (entry.get("path") or entry.get("url")):
            raise BundleError(f"{path}: entry {name!r} needs a sha256 and a path or a url")
    return models


def default_model(path: str | os.PathLike = REGISTRY_PATH) -> str | None:
    """The name of the shipped model (the registry's ``default``), or None when none ships."""
    models = read_registry(path)
    name = json.loads(Path(path).read_text()).get("default")
    if name is not None and name not in models:
        raise BundleError(f"{path}: the default model {name!r} is not one of its entries")
    return name


def _unpack(archive: Path, url: str, into: Path) -> None:
    """Unpack ``archive`` into ``into``: tar members are filtered as data (no links out, no
    devices), zip members may not leave the folder."""
    if url.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if Path(member).is_absolute() or ".." in Path(member).parts:
                    raise BundleError(f"{url}: archive member {member!r} would leave its folder")
            zf.extractall(into)
    else:
        with tarfile.open(archive, "r:*") as tf:
            tf.extractall(into, filter="data")


def _bundle_root(folder: Path, url: str) -> Path:
    """The bundle folder inside an unpacked archive: the folder itself or its one subfolder."""
    if is_bundle(folder):
        return folder
    subs = [p for p in folder.iterdir() if p.is_dir()]
    if len(subs) == 1 and is_bundle(subs[0]):
        return subs[0]
    raise BundleError(f"{url}: the archive holds no bundle ({METADATA_FILE} at its top or in its one folder)")


def fetch(url: str, sha256: str, allow_download: bool) -> Path:
    """The cached bundle of ``url``, downloading and checking it first when allowed."""
    target = cache_dir() / sha256
    if target.is_dir():
        return _bundle_root(target, url)
    if not allow_download:
        raise BundleError(f"{url}: not in the cache ({target}); allow the download (infer.py --download) "
                          f"to fetch it once")
    if not url.endswith(ARCHIVE_SUFFIXES):
        raise BundleError(f"{url}: a bundle URL must name a {', '.join(ARCHIVE_SUFFIXES)} archive")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        archive = Path(tmp) / "download"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as fh:
                shutil.copyfileobj(response, fh)
        except (OSError, ValueError) as exc:
            raise BundleError(f"{url}: download failed ({exc})") from exc
        actual = file_sha256(archive)
        if actual != sha256:
            raise BundleError(f"{url}: sha256 {actual} does not match the registry's {sha256}; not used")
        unpacked = Path(tmp) / "bundle"
        unpacked.mkdir()
        try:
            _unpack(archive, url, unpacked)
        except (tarfile.TarError, zipfile.BadZipFile, OSError) as exc:
            raise BundleError(f"{url}: cannot unpack the archive ({exc})") from exc
        _bundle_root(unpacked, url)
        os.replace(unpacked, target)
    return _bundle_root(target, url)


def resolve(name: str, allow_download: bool = False, registry: str | os.PathLike = REGISTRY_PATH) -> Path:
    """The bundle folder of registry entry ``name``."""
    models = read_registry(registry)
    if name not in models:
        known = ", ".join(sorted(models)) or "none yet"
        raise BundleError(f"{name}: neither a bundle folder nor a model name in {Path(registry).name} "
                          f"(names: {known})")
    entry = models[name]
    if entry.get("path"):
        folder = (Path(registry).resolve().parents[1] / entry["path"]).resolve()
        if not is_bundle(folder):
            raise BundleError(f"{name}: registry path {entry['path']} is not a bundle folder")
        actual = file_sha256(folder / METADATA_FILE)
        if actual != entry["sha256"]:
            raise BundleError(f"{name}: {folder / METADATA_FILE} has sha256 {actual}, the registry says "
                              f"{entry['sha256']}")
        return folder
    return fetch(entry["url"], entry["sha256"], allow_download)
