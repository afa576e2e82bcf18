"""The model bundle: what a trained model is, on disk and in memory.

A bundle is a folder, in the spirit of a MONAI bundle (format described in docs/formats.md)::

    metadata.json            name, version, task, input, outputs, networks, framework versions,
                             training data, intended use, history, and the sha256 of every file
    film_net.safetensors     FractureNet state dict
    crop_net.safetensors     VertebraNet state dict (the per-vertebra crop network)
    point_refiner.safetensors  VertebraNet state dict of the point refiner (optional)
    calibration.json         calibration method, parameters, vertebra combiner, operating points (optional)
    film_net.onnx, crop_net.onnx, point_refiner.onnx
                             the networks as ONNX graphs (optional; see models/onnx_export.py)
    README.md                the model card

Weights are stored in fp32, fp16 or int8 (symmetric, one scale per output channel, kept beside
the weight as ``<key>::scale``); they are always loaded back as fp32. Nothing is unpickled:
weights are safetensors, everything else JSON, and every file is checked against its sha256.

A bundle is never edited in place: refining, calibrating and fine-tuning call
:meth:`Bundle.derive`, which returns a new version with a history entry, and save it
elsewhere. Training checkpoints become bundles through ``python -m training.export``.
"""
from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from data.io_utils import atomic_write_text
from models.network import WEIGHTS_LOADED, FractureNet
from models.point_refiner import build_refiner
from models.vertebra_net import VertebraNet

BUNDLE_FORMAT = 1
METADATA_FILE = "metadata.json"
CALIBRATION_FILE = "calibration.json"
CARD_FILE = "README.md"
ONNX_FILE = "film_net.onnx"
# the ONNX graph of each network (models/onnx_export.py), kept beside the weights when exported
ONNX_FILES = {"film_net": ONNX_FILE, "crop_net": "crop_net.onnx", "point_refiner": "point_refiner.onnx"}
NETWORK_FILES = {"film_net": "film_net.safetensors", "crop_net": "crop_net.safetensors",
                 "point_refiner": "point_refiner.safetensors"}
STORAGES = ("fp32", "fp16", "int8")
SCALE_SUFFIX = "::scale"
# int8 only pays for large weights; biases, norms and small kernels stay fp32
INT8_MIN_ELEMENTS = 4096
INTENDED_USE = "research; not for diagnostic use"
TASK = ("vertebral compression fracture detection on spine radiographs: per-film fracture and acute-fracture "
        "probabilities with a heatmap; per vertebra the level, six morphometry points, heights, Genant grade and "
        "shape, and fracture and acuity probabilities")
OUTPUTS = {
    "film": ["p_fracture", "p_acute", "p_acute_given_fracture", "heatmap"],
    "vertebra": ["level", "points", "heights", "genant_grade", "morphology", "p_fracture", "p_acute"],
}
MODALITIES = ["CR", "DX", "RF", "XA", "OT"]


class ModelError(RuntimeError):
    """A model (bundle or checkpoint) that cannot be found, trusted or loaded; the message names it."""


class BundleError(ModelError):
    pass


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# protobuf tags of ModelProto's fields: producer_name, producer_version, domain, model_version,
# doc_string, graph, opset_import, metadata_props
ONNX_MODEL_TAGS = {0x12, 0x1a, 0x22, 0x28, 0x32, 0x3a, 0x42, 0x72}


def not_a_checkpoint(path: str | os.PathLike) -> str | None:
    """What a file given as a torch checkpoint plainly is instead, said as "an ONNX model, not a
    torch model (...)", "a text file, not a model", ..., from its first bytes; None when it may
    be a checkpoint (a zip or a pickle)."""
    path = Path(path)
    if path.is_dir():
        return "a folder, not a checkpoint file" + (" (a model bundle: give it to --model)" if is_bundle(path) else "")
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if not head:
        return "an empty file, not a model"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None  # torch's zip format, or a pickle of the older one
    # ONNX: a protobuf ModelProto, ir_version (field 1) first, then another of its fields
    if path.suffix.lower() == ".onnx" or (len(head) > 2 and head[0] == 0x08 and 1 <= head[1] <= 30
                                          and head[2] in ONNX_MODEL_TAGS):
        return "an ONNX model, not a torch model (infer.py runs it with --backend onnx)"
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "a safetensors file of network weights, not a model (a bundle folder holds such files)"
    if b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # not merely a character cut at the end of the head
                return None
        return "a text file, not a model"
    return None


def _versions() -> dict:
    import importlib.metadata

    out = {"python": platform.python_version()}
    for dist in ("spine-vcf", "torch", "timm", "lightning", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


def bump_version(version: str) -> str:
    """The next minor version: 0.1.0 -> 0.2.0 (a derived bundle; the major marks a new training)."""
    parts = (str(version).split(".") + ["0", "0", "0"])[:3]
    try:
        major, minor = int(parts[0]), int(parts[1])
    except ValueError:
        return f"{version}.1"
    return f"{major}.{minor + 1}.0"


# --------------------------------------------------------------------------- weights
def encode_state(state: dict[str, torch.Tensor], storage: str) -> dict[str, torch.Tensor]:
    """The tensors to store for ``state`` in ``storage`` (fp32, fp16 or int8)."""
    if storage not in STORAGES:
        raise ValueError(f"unknown weight storage {storage!r} (expected {', '.join(STORAGES)})")
    out = {}
    for key, t in state.items():
        t = t.detach().cpu().contiguous()
        if not t.is_floating_point():
            out[key] = t
        elif storage == "fp16":
            out[key] = t.half()
        elif storage == "int8" and t.dim() >= 2 and t.numel() >= INT8_MIN_ELEMENTS:
            w = t.float()
            scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp(min=1e-12) / 127.0
            shape = (-1,) + (1,) * (w.dim() - 1)
            out[key] = torch.round(w / scale.view(shape)).clamp(-127, 127).to(torch.int8)
            out[key + SCALE_SUFFIX] = scale
        else:
            out[key] = t.float()
    return out


def decode_state(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 tensors from :func:`encode_state`'s output (any storage)."""
    out = {}
    for key, t in stored.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale = stored.get(key + SCALE_SUFFIX)
        if scale is not None:
            out[key] = t.float() * scale.float().view((-1,) + (1,) * (t.dim() - 1))
        elif t.is_floating_point():
            out[key] = t.float()
        else:
            out[key] = t
    return out


def load_state_into(net: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` strictly, or raise :class:`BundleError` naming ``where`` and what does not fit."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k}: stored {tuple(state[k].shape)} vs network {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [f"{len(x)} {what}, e.g. {x[0]}" for x, what in
                 ((wrong, "shape mismatch(es)"), (missing, "missing key(s)"), (unexpected, "unexpected key(s)")) if x]
        raise BundleError(f"{where}: weights do not fit {type(net).__name__}: " + "; ".join(parts))
    net.load_state_dict(state)


# --------------------------------------------------------------------------- networks
def build_networks(spec: dict) -> dict[str, nn.Module]:
    """Networks as ``metadata["networks"]`` describes them, to receive their stored weights
    (``WEIGHTS_LOADED``: a ResNet is built without importing timm)."""
    nets: dict[str, nn.Module] = {}
    for name, entry in spec.items():
        cls, cfg = entry.get("class"), dict(entry.get("config") or {})
        if name == "film_net" and cls == "FractureNet":
            nets[name] = FractureNet(backbone=cfg["backbone"], pretrained=WEIGHTS_LOADED, fpn_dim=int(cfg["fpn_dim"]))
        elif name == "crop_net" and cls == "VertebraNet":
            nets[name] = VertebraNet(backbone=cfg.get("backbone", "resnet18"), crop_size=int(cfg.get("crop_size", 96)),
                                     pretrained=WEIGHTS_LOADED)
        elif name == "point_refiner" and cls == "VertebraNet":
            nets[name] = build_refiner(cfg, pretrained=WEIGHTS_LOADED)
        else:
            raise BundleError(f"unknown network {name!r} of class {cls!r}")
    return nets


def network_spec(networks: dict[str, nn.Module], refiner_config: dict | None = None) -> dict:
    """``metadata["networks"]`` for ``networks``."""
    spec = {}
    for name, net in networks.items():
        if name == "film_net":
            cfg = {"backbone": net.backbone_name, "fpn_dim": int(net.fpn_dim)}
        elif name == "crop_net":
            cfg = {"backbone": net.backbone_name, "crop_size": int(net.crop_size)}
        elif name == "point_refiner":
            cfg = dict(refiner_config or {})
            cfg.update({"backbone": net.backbone_name, "size": int(net.crop_size),
                        "width_context": float(net.context[0]), "height_context": float(net.context[1]),
                        "passes": int(net.passes), "flip": bool(net.flip)})
        else:
            raise BundleError(f"unknown network {name!r}")
        spec[name] = {"class": type(net).__name__, "file": NETWORK_FILES[name], "config": cfg}
    return spec


# --------------------------------------------------------------------------- the bundle
@dataclass
class Bundle:
    """A model in memory: its metadata, networks (in eval mode), calibration and model card.

    ``metadata["model"]`` holds what inference needs to prepare an input (``image_size``,
    ``input_range``, ``heatmap_stride``, ``crop_size``, ...)."""

    metadata: dict
    networks: dict[str, nn.Module]
    calibration: dict | None = None
    card: str | None = None
    path: Path | None = None
    extra_files: dict[str, bytes] = field(default_factory=dict)  # the ONNX graphs (ONNX_FILES)

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "unnamed"))

    @property
    def version(self) -> str:
        return str(self.metadata.get("version", "0.0.0"))

    @property
    def storage(self) -> str:
        """The weight storage it was saved with (fp32 for a bundle made in memory); a derived
        version is saved the same way."""
        return str((self.metadata.get("saved") or {}).get("storage", "fp32"))

    @property
    def model(self) -> dict:
        return self.metadata["model"]

    @property
    def id(self) -> str:
        """16 hex digits naming the weights and calibration (not the card or the history)."""
        return str(self.metadata.get("id") or "unsaved")

    @property
    def film_net(self) -> FractureNet:
        return self.networks["film_net"]

    @property
    def crop_net(self) -> VertebraNet | None:
        return self.networks.get("crop_net")

    @property
    def point_refiner(self) -> VertebraNet | None:
        return self.networks.get("point_refiner")

    def describe(self) -> str:
        return f"{self.name} {self.version} ({self.id})"

    def derive(self, step: str, note: str = "", networks: dict[str, nn.Module] | None = None,
               calibration: dict | None | str = "keep", record: dict | None = None, version: str | None = None,
               drop_onnx: bool = True) -> "Bundle":
        """A new version of this bundle after ``step`` (refine, calibrate, fine-tune, ...):
        ``networks`` replace or add networks; ``calibration`` replaces the calibration (None drops
        it; "keep" keeps it). The input bundle is not changed. A calibration no longer fits once a
        network changes, so callers that change networks should pass ``calibration=None``."""
        meta = copy.deepcopy(self.metadata)
        meta["version"] = version or bump_version(self.version)
        entry = {"step": step, "date": _now(), "from": {"name": self.name, "version": self.version, "id": self.id}}
        if note:
            entry["note"] = note
        if record:
            entry["record"] = _json_safe(record)
        meta.setdefault("history", []).append(entry)
        nets = dict(self.networks)
        nets.update(networks or {})
        meta["networks"] = network_spec(nets, (meta.get("networks", {}).get("point_refiner") or {}).get("config"))
        meta.pop("id", None)
        extra = {} if drop_onnx and networks else dict(self.extra_files)
        return Bundle(metadata=meta, networks=nets, calibration=self.calibration if calibration == "keep" else calibration,
                      card=None, path=None, extra_files=extra)

    def save(self, out: str | os.PathLike, storage: str | None = None, card=None, overwrite: bool = False) -> Path:
        """Write the bundle to folder ``out`` (atomically: a temporary sibling folder renamed into
        place). ``out`` must not exist unless ``overwrite``; it may never be the folder this
        bundle was loaded from. ``storage``: fp32, fp16 or int8; by default the storage of the
        bundle it derives from (fp32 for one made in memory). ``card``: the model card's text, or
        a function of the bundle that writes it (called once the saved bundle's id is known)."""
        storage = storage or self.storage
        out = Path(out)
        if self.path is not None and out.resolve() == Path(self.path).resolve():
            raise BundleError(f"{out}: a bundle is never rewritten in place; save the new version elsewhere")
        if out.exists() and not overwrite:
            raise BundleError(f"{out}: already exists (choose a new folder, or overwrite)")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        before = self.metadata
        try:
            meta = copy.deepcopy(self.metadata)
            meta["format"] = BUNDLE_FORMAT
            meta["networks"] = network_spec(self.networks, (meta.get("networks", {}).get("point_refiner") or {}).get("config"))
            files = {}
            for name, net in self.networks.items():
                fname = NETWORK_FILES[name]
                save_file(encode_state(net.state_dict(), storage), tmp / fname,
                          metadata={"storage": storage, "network": name, "class": type(net).__name__})
                meta["networks"][name]["storage"] = storage
                files[fname] = file_sha256(tmp / fname)
            if self.calibration is not None:
                (tmp / CALIBRATION_FILE).write_text(json.dumps(self.calibration, indent=1, sort_keys=True) + "\n")
                files[CALIBRATION_FILE] = file_sha256(tmp / CALIBRATION_FILE)
            for fname, blob in self.extra_files.items():
                (tmp / fname).write_bytes(blob)
                files[fname] = file_sha256(tmp / fname)
            meta["id"] = weights_id(files)
            meta["framework"] = meta.get("framework") or _versions()
            meta["saved"] = {"date": _now(), "storage": storage, "by": _versions()}
            self.metadata = meta  # the card describes the bundle as saved (its id, its storage)
            text = card(self) if callable(card) else card if card is not None else (self.card or _minimal_card(meta))
            self.card = text
            (tmp / CARD_FILE).write_text(text)
            files[CARD_FILE] = file_sha256(tmp / CARD_FILE)
            meta["files"] = files
            (tmp / METADATA_FILE).write_text(json.dumps(_json_safe(meta), indent=1, sort_keys=True) + "\n")
            _readable(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            self.metadata = before
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.metadata = meta
        return out


def _readable(folder: Path) -> None:
    """The permissions of a plain folder and plain files (mkdtemp and safetensors make them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~umask)


def replace_card(folder: str | os.PathLike, text: str) -> Path:
    """Put ``text`` in place of the model card of the bundle at ``folder``, and its digest in
    metadata.json. The weights and calibration are not rewritten, so the bundle's id stays (a
    re-save would re-encode int8 weights, which need not give the same bytes)."""
    folder = Path(folder)
    meta = read_metadata(folder)
    atomic_write_text(folder / CARD_FILE, text)
    meta["files"][CARD_FILE] = file_sha256(folder / CARD_FILE)
    atomic_write_text(folder / METADATA_FILE, json.dumps(_json_safe(meta), indent=1, sort_keys=True) + "\n")
    return folder / CARD_FILE


def weights_id(files: dict[str, str]) -> str:
    """The bundle id: a hash of the weights' and calibration's hashes (the card and history may
    change without changing what the model predicts)."""
    keyed = sorted((k, v) for k, v in files.items() if k.endswith(".safetensors") or k == CALIBRATION_FILE)
    return hashlib.sha256(json.dumps(keyed).encode()).hexdigest()[:16]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _json_safe(obj):
    """``obj`` with tuples as lists and anything JSON cannot hold as its ``str``."""
    return json.loads(json.dumps(obj, default=str))


def _minimal_card(meta: dict) -> str:
    return (f"# {meta.get('name', 'model')} {meta.get('version', '')}\n\n"
            f"Intended use: {INTENDED_USE}.\n\nSee metadata.json for the model's description and its training data.\n")


def is_bundle(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / METADATA_FILE).is_file()


def read_metadata(path: str | os.PathLike) -> dict:
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not path.is_dir():
        raise BundleError(f"{path}: not a bundle folder" + (" (it is a file)" if path.is_file() else " (not found)"))
    if not meta_path.is_file():
        raise BundleError(f"{path}: not a bundle (no {METADATA_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{meta_path}: unreadable ({exc})") from exc
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: not a JSON object")
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{meta_path}: bundle format {meta.get('format')!r}; this code reads format {BUNDLE_FORMAT}")
    for key in ("model", "networks", "files"):
        if not isinstance(meta.get(key), dict):
            raise BundleError(f"{meta_path}: no {key!r} object")
    return meta


def load_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Load a bundle folder (no pickle). ``verify``: check every file against its sha256."""
    path = Path(path)
    meta = read_metadata(path)
    files = meta["files"]
    for fname, digest in files.items():
        f = path / fname
        if not f.is_file():
            raise BundleError(f"{path}: {fname} is listed in {METADATA_FILE} but missing")
        if verify and file_sha256(f) != digest:
            raise BundleError(f"{f}: sha256 does not match {METADATA_FILE} (the file was changed or damaged)")
    if "film_net" not in meta["networks"]:
        raise BundleError(f"{path}: no film_net in {METADATA_FILE}")
    # built on the CPU, not the meta device: moving a network off the meta device imports torch's
    # symbolic-shape machinery (sympy; about 0.5 s), more than initialising two ResNets costs
    nets = build_networks(meta["networks"])
    for name, net in nets.items():
        fname = meta["networks"][name].get("file", NETWORK_FILES[name])
        if fname not in files:
            raise BundleError(f"{path}: {fname} is not listed in {METADATA_FILE}")
        try:
            stored = load_file(path / fname)
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(f"{path / fname}: not a readable safetensors file ({exc})") from exc
        # copied into the network's own memory: the file's memory map is let go once the weights are in
        load_state_into(net, decode_state(stored), str(path / fname))
        net.eval()
    calibration = None
    if CALIBRATION_FILE in files:
        try:
            calibration = json.loads((path / CALIBRATION_FILE).read_text())
        except ValueError as exc:
            raise BundleError(f"{path / CALIBRATION_FILE}: not JSON ({exc})") from exc
    card = (path / CARD_FILE).read_text() if (path / CARD_FILE).is_file() else None
    extra = {f: (path / f).read_bytes() for f in files if f in ONNX_FILES.values()}
    return Bundle(metadata=meta, networks=nets, calibration=calibration, card=card, path=path, extra_files=extra)
