"""A DICOM film is parsed once per run: the reader's header travels with the film to the
identifiers, the JSON and the DICOM outputs."""
from tests.parity.parity_model import FILMS_DIR, parity_checkpoint
from tests.training_config import phantom_as_dicom
from training.export import export_checkpoint


def test_each_dicom_film_is_read_once_even_with_dicom_outputs(tmp_path, dicom_reads):
    from inference.pipeline import run_inference
    from inference.predictor import Predictor

    bundle = export_checkpoint(parity_checkpoint(tmp_path / "parity.ckpt"), tmp_path / "bundle")
    (tmp_path / "films").mkdir()
    films = [str(phantom_as_dicom(png, tmp_path / "films" / f"{png.stem}.dcm"))
             for png in sorted(FILMS_DIR.glob("*.png"))[:2]]
    predictor = Predictor(bundle, device="cpu")
    reads = dicom_reads
    out = tmp_path / "out"
    summary = run_inference(predictor, films, out, batch_size=2, num_workers=0, progress=False,
                            keep_identifiers=True, dicom_sc=True, dicom_sr=True)
    assert summary.n_ok == 2
    assert sorted(reads) == sorted(films)
    assert all((out / f"{name}_{kind}.dcm").is_file() for name in ("phantom_s7_00000", "phantom_s7_00001")
               for kind in ("sc", "sr"))
