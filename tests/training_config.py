"""The real debug config (configs/debug.yaml), pointed at a test's tmp folder."""
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose_config(tmp: Path, manifest: Path, trainer: dict | None = None, model: dict | None = None,
                   data: dict | None = None) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "debug.yaml").read_text())
    cfg["trainer"]["default_root_dir"] = str(tmp)
    cfg["trainer"]["logger"][0]["init_args"]["save_dir"] = str(tmp)
    for callback in cfg["trainer"]["callbacks"]:
        if "dirpath" in callback.get("init_args", {}):
            callback["init_args"]["dirpath"] = str(tmp)
    cfg["trainer"].update(trainer or {})
    cfg["model"].update(model or {})
    cfg["data"]["manifest"] = str(manifest)
    cfg["data"].update(data or {})
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def save_untrained_checkpoint(path, image_size=(64, 48), fpn_dim: int = 16, seed: int = 0, **kw):
    """An untrained FractureSystem saved as a checkpoint of this project (as Lightning would,
    with its ``vcf_model`` metadata); returns ``(system, path)``."""
    import torch

    from training.system import FractureSystem

    torch.manual_seed(seed)
    system = FractureSystem(fpn_dim=fpn_dim, image_size=tuple(image_size), **kw)
    ckpt = {"state_dict": system.state_dict()}
    system.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return system, path


def phantom_as_dicom(png, out, spacing=(0.5, 0.5), orientation=None):
    """A phantom film as a MONOCHROME2 DICOM with made-up identifiers (Doe^Jane, MRN-991122,
    born 19400101) and the given pixel spacing (row, column), as PixelSpacing and
    ImagerPixelSpacing."""
    import cv2
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    pixels = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "MRN-991122", "19400101"
    ds.Modality, ds.Rows, ds.Columns = "DX", *pixels.shape
    if orientation:
        ds.PatientOrientation = list(orientation)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing = ds.ImagerPixelSpacing = list(spacing)
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out
