"""Safe checkpoint loading.

Checkpoints are only ever read with ``torch.load(weights_only=True)``: a file whose pickle
would run code is refused with :class:`CheckpointError` rather than executed.
"""
from __future__ import annotations

import logging
import pickle
import pickletools
import zipfile
from pathlib import Path

import torch

from models.bundle import Bundle, ModelError, file_sha256, is_bundle, load_bundle, not_a_checkpoint
from models.registry import resolve
from models.network import FractureNet
from models.vertebra_net import VertebraNet

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2  # 2: adds the vertebra head and the crop network
# pickle opcodes that look up or call a callable
CALLABLE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"}


class CheckpointError(ModelError):
    pass


def load_checkpoint(path: str | Path, sha256: str | None = None, map_location: str = "cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    other = not_a_checkpoint(path)  # an ONNX model, a text file, a folder: named, not unpickled
    if other:
        raise CheckpointError(f"{path}: {other}")
    if sha256:
        actual = file_sha256(path)
        if actual.lower() != sha256.lower():
            raise CheckpointError(f"{path}: sha256 mismatch (expected {sha256}, file has {actual})")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        code = next((line for line in lines if "Unsupported global" in line), None)
        if code is None and not names_callables(path):  # damaged, or another kind of file
            detail = next((line for line in lines if line.startswith(("Unsupported operand", "invalid load key"))),
                          lines[0] if lines else "")
            raise CheckpointError(f"{path}: not a readable checkpoint (its pickle does not parse: {detail})") from exc
        raise CheckpointError(
            f"{path}: refused: the file holds objects that only an unrestricted pickle could load "
            f"(it could run code), so it was not loaded ({code or 'it names callables'})") from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a training checkpoint of this project (no state_dict)")
    return ckpt


def names_callables(path: str | Path) -> bool:
    """Whether ``path`` is a pickle (or torch's zip of one) that names callables, which only an
    unrestricted unpickler loads, calling them; read with :mod:`pickletools`, never unpickled."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
        return any(op.name in CALLABLE_OPCODES for op, _, _ in pickletools.genops(data))
    except Exception:  # not a pickle that parses
        return False


def network_state(ckpt: dict, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """The weights of one sub-network inside a Lightning checkpoint: FractureNet under ``net.``,
    the crop network under ``vertebra_net.``."""
    return {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


def build_network(ckpt: dict, path: str | Path = "checkpoint") -> tuple[FractureNet, dict]:
    """Rebuild the network a checkpoint was trained with and load its weights."""
    meta = ckpt.get("vcf_model")
    if meta is None:
        raise CheckpointError(f"{path}: no 'vcf_model' metadata: not a checkpoint of this project")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} but this code reads format "
                              f"{CHECKPOINT_FORMAT} (saved by code version {meta.get('code_version')})")
    if meta.get("architecture") != FractureNet.__name__:
        raise CheckpointError(f"{path}: architecture {meta.get('architecture')!r}, expected {FractureNet.__name__!r}")
    net = FractureNet(backbone=meta["backbone"], pretrained=None, fpn_dim=meta["fpn_dim"])
    _load_into(net, network_state(ckpt), path)
    net.eval()
    return net, meta


def build_vertebra_network(ckpt: dict, path: str | Path = "checkpoint") -> VertebraNet:
    """The crop network saved beside the FractureNet (checkpoint format 2 and later)."""
    meta = ckpt.get("vcf_model") or {}
    net = VertebraNet(backbone=meta.get("crop_backbone", "resnet18"))
    _load_into(net, network_state(ckpt, "vertebra_net."), path)
    net.eval()
    return net


def _load_into(net: torch.nn.Module, state: dict, path, may_lack: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` strictly, except that keys starting with ``may_lack`` may be absent (a
    head the earlier checkpoint did not have); returns those absent keys."""
    own = net.state_dict()
    lacking = [k for k in own if k not in state and k.startswith(may_lack)] if may_lack else []
    state = {**{k: own[k] for k in lacking}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {wrong[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise CheckpointError(f"{path}: weights do not fit {net.backbone_name} {type(net).__name__}: "
                              + "; ".join(parts))
    net.load_state_dict(state)
    return lacking


def _bundle_of(path: str | Path) -> Bundle | None:
    """The bundle ``path`` names (a folder, or a registry name), or None for a checkpoint file."""
    if is_bundle(path):
        return load_bundle(path)
    text = str(path)
    if not Path(text).exists() and "/" not in text and not text.endswith(".ckpt"):
        return load_bundle(resolve(text))
    return None


def load_network_weights(net: FractureNet, path: str | Path, vertebra_net: VertebraNet | None = None) -> None:
    """Initialise ``net`` (and the crop network, when given) from an earlier checkpoint, a
    bundle folder or a registry name such as the shipped model's (fine-tuning, e.g. phantom ->
    real data)."""
    bundle = _bundle_of(path)
    if bundle is not None:
        _load_into(net, bundle.film_net.state_dict(), path)
        if vertebra_net is not None:
            if bundle.crop_net is None:
                log.warning("%s has no crop network: it starts from scratch", path)
            else:
                _load_into(vertebra_net, bundle.crop_net.state_dict(), path)
        return
    ckpt = load_checkpoint(path)
    # A checkpoint from before the vertebra head (format 1) still starts the shared layers.
    fresh = _load_into(net, network_state(ckpt), path, may_lack=("vertebra_head.",))
    crop_state = network_state(ckpt, "vertebra_net.")
    if vertebra_net is not None and crop_state:
        _load_into(vertebra_net, crop_state, path)
    elif vertebra_net is not None:
        fresh.append("vertebra_net.*")
    if fresh:
        log.warning("%s has no weights for %s: they start from scratch", path,
                    ", ".join(sorted({k.split(".")[0] for k in fresh})))
