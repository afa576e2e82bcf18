"""A file given for what it is not is named for what it is: an ONNX model or a text file given
as a checkpoint, a folder given as a file; a calibration holding a string where a number
belongs is refused in one line (exit 2 from the tools)."""
from __future__ import annotations


import pytest
import torch

from calibration import CALIBRATION_KEY, CalibrationError, Calibrator
from data.manifest import ManifestError, load_manifest
from inference.loading import open_model
from models.bundle import ModelError
from tests.parity.parity_model import FILMS_DIR, parity_checkpoint
from training.checkpoint import CheckpointError, load_checkpoint


def _onnx_model(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), path)
    return path


@pytest.mark.parametrize("stored, message", [
    ({"temperature": {"p_fracture": "2.5"}}, "temperature is '2.5', a str; it must be a number"),
    ({"temperature": "2.5"}, "temperature parameters are '2.5', a str; expected an object"),
    ({"temperature": {"p_fracture": True}}, "temperature is True, a bool"),
    ({"temperature": {"p_fracture": 2.0}, "operating_points": {"balanced": {"threshold": "0.5"}}},
     "the threshold of operating point 'balanced' is '0.5', a str"),
])
def test_a_calibration_with_a_string_for_a_number_is_refused(stored, message):
    with pytest.raises(CalibrationError) as err:
        Calibrator.from_dict({"format": 1, "method": "temperature", **stored})
    assert message in str(err.value)
    # numbers still read, a missing value is still the identity
    assert Calibrator.from_dict({"method": "temperature", "temperature": {"p_fracture": 2}}).maps["p_fracture"].temperature == 2.0


def test_infer_refuses_a_checkpoint_whose_calibration_holds_a_string_in_one_line(tmp_path, capsys):
    import infer

    path = parity_checkpoint(tmp_path / "parity.ckpt")
    ckpt = torch.load(path, weights_only=True)
    ckpt[CALIBRATION_KEY]["beta"]["p_fracture"]["a"] = "1.3"
    torch.save(ckpt, path)
    code = infer.main(["--checkpoint", str(path), "--out", str(tmp_path / "out"), "--quiet", str(FILMS_DIR)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "training checkpoint, converted" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "beta calibration parameter a is '1.3', a str; it must be a number" in line and str(path) in line
    # nor is it exported into a bundle that inference would refuse later
    from training import export

    assert export.main(["--checkpoint", str(path), "--out", str(tmp_path / "bundle")]) == 2
    assert "beta calibration parameter a is '1.3'" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()


def test_an_onnx_model_a_text_file_and_a_folder_given_as_a_checkpoint_are_named(tmp_path):
    onnx_file = _onnx_model(tmp_path / "model.ckpt")  # a misleading suffix: the content decides
    text = tmp_path / "notes.ckpt"
    text.write_text("epoch 3: loss 0.2\n")
    folder = tmp_path / "run.ckpt"
    folder.mkdir()
    for path, what in ((onnx_file, "an ONNX model"), (text, "a text file"), (folder, "a folder")):
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        assert f"{path}: {what}" in str(err.value) and "could run code" not in str(err.value)
        with pytest.raises(ModelError) as err:
            open_model(path)
        assert what in str(err.value) and "not found" not in str(err.value)
    with pytest.raises(ModelError, match="an ONNX model, not a torch model .*--backend onnx"):
        open_model(_onnx_model(tmp_path / "film.onnx"))
    # a damaged pickle is not said to run code; one that would run code still is
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as err:
        load_checkpoint(broken)
    assert "could run code" not in str(err.value)
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": print}, evil)  # unpickling it would look up a callable
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(evil)


def test_a_folder_given_as_a_file_is_called_a_folder(tmp_path, capsys):
    import evaluate

    folder = tmp_path / "manifest.csv"
    folder.mkdir()
    with pytest.raises(ManifestError, match="a folder, not a manifest file"):
        load_manifest(folder)
    (tmp_path / "real.csv").write_text("image,patient_id,fracture,acute\n")
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--predictions", str(folder), "--manifest", str(tmp_path / "real.csv"),
                       "--out", str(tmp_path / "report")])
    assert exc.value.code == 2 and f"{folder}: a folder, not a file" in capsys.readouterr().err
