"""Open the model that inference runs: a bundle, a bundle folder, a registry name, or a
training checkpoint converted in memory."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from models.bundle import (METADATA_FILE, Bundle, BundleError, file_sha256, is_bundle, load_bundle,
                           not_a_checkpoint)
from models.registry import REGISTRY_PATH, resolve

log = logging.getLogger(__name__)
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def open_model(model, sha256: str | None = None, allow_download: bool = False,
               registry: str | os.PathLike = REGISTRY_PATH) -> Bundle:
    """``model`` as a :class:`Bundle`. ``sha256``: the expected digest of a checkpoint file, or
    of a bundle's metadata.json (which lists the digest of every other file)."""
    if isinstance(model, Bundle):
        return model
    path = Path(model)
    if not path.exists() and (path.suffix or len(path.parts) > 1):  # a path, not a registry name
        raise BundleError(f"{path}: model not found")
    if path.is_file():
        other = not_a_checkpoint(path)
        if other and "--backend onnx" in other:  # an ONNX model: its own hint says how to run it
            raise BundleError(f"{path}: {other}")
        if other or path.suffix not in CHECKPOINT_SUFFIXES:
            raise BundleError(f"{path}: {other or 'not a model'}: give a bundle folder, a model name, or a training "
                              f"checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})")
        from training.export import bundle_from_checkpoint  # training code, only for a checkpoint

        log.info("%s: a training checkpoint, converted in memory; export it once with "
                 "`python -m training.export --checkpoint %s --out BUNDLE`", path, path)
        return bundle_from_checkpoint(path, sha256=sha256)
    if path.is_dir() and not is_bundle(path):
        raise BundleError(f"{path}: a folder, but not a bundle (no {METADATA_FILE})")
    folder = path if path.is_dir() else resolve(str(model), allow_download=allow_download, registry=registry)
    if sha256:
        actual = file_sha256(folder / METADATA_FILE)
        if actual.lower() != sha256.lower():
            raise BundleError(f"{folder}: sha256 of {METADATA_FILE} is {actual}, expected {sha256}")
    return load_bundle(folder)
