"""Manifest validation (every problem listed) and masking of unknown labels."""
import math

import pytest
import torch

from data.manifest import ManifestError, assign_splits, label_arrays, load_manifest
from training.system import masked_bce


def write(path, text):
    path.write_text(text)
    return path


def test_bad_manifest_lists_every_problem(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    m = write(tmp_path / "manifest.csv",
              "image,patient_id,fracture,acute,split\n"
              "a.png,p1,1,1,train\n"
              "missing.png,p2,0,,train\n"      # missing file
              "b.png,p3,yes,,train\n"          # unknown label value
              "a.png,p1,1,1,train\n"           # duplicate row
              "b.png,p4,0,1,val\n")            # duplicate + acute without fracture
    with pytest.raises(ManifestError) as err:
        load_manifest(m)
    text = str(err.value)
    assert "missing.png" in text and "not found" in text
    assert "'yes'" in text
    assert text.count("duplicate") == 2
    assert len(err.value.problems) == 4


def test_acute_without_fracture_and_patient_in_two_splits(tmp_path):
    for n in "abc":
        (tmp_path / f"{n}.png").write_bytes(b"x")
    m = write(tmp_path / "manifest.csv",
              "image,patient_id,fracture,acute,split\n"
              "a.png,p1,0,1,train\n"
              "b.png,p2,,0,train\n"
              "c.png,p2,1,,val\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(m)
    problems = err.value.problems
    assert any("acute is 1 but fracture is 0" in p for p in problems)
    assert any("acute is 0 but fracture is unknown" in p for p in problems)
    assert any("p2" in p and "more than one split" in p for p in problems)


def test_vertebrae_csv_problems_are_reported(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    write(tmp_path / "manifest.csv", "image,patient_id,fracture,acute\na.png,p1,1,0\n")
    cols = "image,level,genant_grade,morphology,acute,x_min,y_min,x_max,y_max," + ",".join(
        f"p{i}{c}" for i in range(1, 7) for c in "xy")
    nums = ",".join(["1"] * 16)
    write(tmp_path / "vertebrae.csv", cols + "\n"
          f"a.png,L9,5,squashed,1,{nums}\n"
          f"other.png,L1,0,normal,1,{nums}\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path / "manifest.csv")
    text = str(err.value)
    for needle in ("unknown level 'L9'", "genant_grade '5'", "unknown morphology 'squashed'",
                   "other.png is not in the manifest", "acute given for a vertebra without a fracture"):
        assert needle in text, needle


def test_unknown_labels_stay_unknown(tmp_path):
    for n in "abcd":
        (tmp_path / f"{n}.png").write_bytes(b"x")
    m = load_manifest(write(tmp_path / "manifest.csv",
                            "image,patient_id,fracture,acute\n"
                            "a.png,p1,1,1\nb.png,p2,0,\nc.png,p3,,\nd.png,p4,1,\n"))
    fracture, acute = label_arrays(m.images)
    assert fracture[:2].tolist() == [1.0, 0.0] and math.isnan(fracture[2])
    assert acute[0] == 1.0 and math.isnan(acute[1]) and math.isnan(acute[2]) and math.isnan(acute[3])


def test_masked_loss_ignores_unknown_labels():
    logits = torch.tensor([2.0, -1.0, 5.0, -7.0])
    target = torch.tensor([1.0, 0.0, float("nan"), float("nan")])
    loss = masked_bce(logits, target)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:2], target[:2])
    assert torch.isclose(loss, expected)
    # treating unknown as negative would give a very different loss
    assert not torch.isclose(loss, torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(target, nan=0.0)))
    all_unknown = masked_bce(logits.requires_grad_(), torch.full((4,), float("nan")))
    assert all_unknown.item() == 0.0
    all_unknown.backward()  # still differentiable, contributes nothing
    assert torch.all(logits.grad == 0)


def test_splits_group_patients(tmp_path):
    import pandas as pd

    images = pd.DataFrame({"patient_id": [f"p{i // 2}" for i in range(400)], "split": [""] * 400})
    images.loc[0, "split"] = "test"
    images.loc[1, "split"] = "test"
    splits = assign_splits(images, val_fraction=0.2, seed=3)
    assert splits.iloc[0] == "test"
    per_patient = pd.DataFrame({"p": images.patient_id, "s": splits}).groupby("p").s.nunique()
    assert (per_patient == 1).all()
    assert 0.12 < (splits == "val").mean() < 0.28
    # stable: the same patient gets the same split when others are added
    more = pd.concat([images, pd.DataFrame({"patient_id": ["new"], "split": [""]})], ignore_index=True)
    assert (assign_splits(more, 0.2, seed=3).iloc[:400] == splits).all()


def test_a_film_without_a_split_follows_its_patients_given_split(tmp_path):
    """A held-out patient's other films never fall into training by the hash."""
    import pandas as pd

    patients = [f"p{i}" for i in range(200)]
    # every patient: one film marked test, one film with no split
    images = pd.DataFrame({"patient_id": [p for p in patients for _ in range(2)],
                           "split": [s for _ in patients for s in ("test", "")]})
    splits = assign_splits(images, val_fraction=0.3, seed=1)
    assert (splits == "test").all()
    # the same through load_manifest, which also reports no conflict
    rows = ["image,patient_id,fracture,acute,split"] + [f"{p}_{k}.png,{p},0,,{'test' if k == 0 else ''}"
                                                   for p in patients[:20] for k in range(2)]
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    man = load_manifest(tmp_path / "manifest.csv", check_files=False)
    assert (assign_splits(man.images, val_fraction=0.3, seed=1) == "test").all()


VERTEBRA_HEADER = "image,level,genant_grade,morphology,acute,x_min,y_min,x_max,y_max," + ",".join(
    f"p{i}{c}" for i in range(1, 7) for c in "xy")
NUMS = ",".join(["1"] * 16)


QUOTE_NEVER_CLOSED = "a quoted field is never closed (an unbalanced quote runs to the end of the file)"
NOT_A_LABEL = "mask_value 'abc' is not an integer (a label of the mask)"


@pytest.mark.parametrize("rows, vertebra_problems", [
    ([f"a.png,L1,1,wedge,1,{NUMS},3", f'"a.png,L2,0,normal,,{NUMS},4', f"a.png,L3,0,normal,,{NUMS},5"],
     [f"vertebrae.csv row 3: {QUOTE_NEVER_CLOSED}"]),
    ([f"a.png,L1,1,wedge,1,{NUMS},abc", f"a.png,L2,0,normal,,{NUMS},4.0"],
     [f"vertebrae.csv row 2: {NOT_A_LABEL}"]),
    # both in one file: the rows before the broken quote are still checked
    ([f"a.png,L1,1,wedge,1,{NUMS},abc", f"a.png,L2,0,normal,,{NUMS},4", f'a.png,L3,0,normal,,{NUMS},"5',
      f"a.png,L4,0,normal,,{NUMS},6"],
     [f"vertebrae.csv row 2: {NOT_A_LABEL}", f"vertebrae.csv row 4: {QUOTE_NEVER_CLOSED}"]),
])
def test_a_broken_quote_and_a_bad_mask_value_join_the_one_problem_list(tmp_path, rows, vertebra_problems):
    (tmp_path / "a.png").write_bytes(b"x")
    write(tmp_path / "manifest.csv", "image,patient_id,fracture,acute\na.png,p1,1,0\nmissing.png,p2,0,\n")
    write(tmp_path / "vertebrae.csv", VERTEBRA_HEADER + ",mask_value\n" + "".join(row + "\n" for row in rows))
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path / "manifest.csv")
    assert err.value.problems == ["row 3: image file not found: missing.png", *vertebra_problems]
    assert err.value.lines()[0] == f"{tmp_path / 'manifest.csv'}: {1 + len(vertebra_problems)} problem(s):"


def _two_patient_set(folder, patients=("p1", "p2")):
    folder.mkdir()
    rows = []
    for k, patient in enumerate(patients):
        (folder / f"f{k}.png").write_bytes(b"x")
        rows.append(f"f{k}.png,{patient},0,,train")
    return write(folder / "manifest.csv", "image,patient_id,fracture,acute,split\n" + "\n".join(rows) + "\n")


def test_a_validation_manifest_sharing_training_patients_or_files_is_refused(tmp_path):
    from data.dataset import SpineDataModule

    train = _two_patient_set(tmp_path / "train")
    for val, needle in ((train, "is a training image of"),  # the very same files
                        (_two_patient_set(tmp_path / "val", ("p9", "p2")), "patient p2 has training images in")):
        dm = SpineDataModule(str(train), val_manifest=str(val), image_size=(64, 48), num_workers=0)
        with pytest.raises(ManifestError) as err:
            dm.setup("fit")
        assert err.value.path == str(val) and needle in str(err.value)
    dm = SpineDataModule(str(train), test_manifest=str(train), image_size=(64, 48), num_workers=0)
    with pytest.raises(ManifestError, match="a test image must not be trained on"):
        dm.setup("fit")
    other = _two_patient_set(tmp_path / "other", ("p8", "p9"))
    dm = SpineDataModule(str(train), val_manifest=str(other), image_size=(64, 48), num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 2 and len(dm.val_set) == 2


def test_train_prints_manifest_problems_one_a_line_and_exits_2(tmp_path, capsys):
    import train
    from tests.training_config import compose_config

    manifest = _two_patient_set(tmp_path / "data")
    write(manifest, manifest.read_text() + "gone.png,p3,maybe,,train\n")
    config = compose_config(tmp_path / "run", manifest, trainer={"max_epochs": 1}, data={"num_workers": 0})
    assert train.run(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-3:] == [f"error: {manifest}: 2 problem(s):", "  row 4: image file not found: gone.png",
                                     "  row 4: fracture has unknown value 'maybe' (expected 1, 0 or empty)"]


def test_train_prints_a_validation_manifest_sharing_training_patients_as_an_error(tmp_path, capsys):
    import train
    from tests.training_config import compose_config

    manifest = _two_patient_set(tmp_path / "data")
    config = compose_config(tmp_path / "run", manifest, trainer={"max_epochs": 1},
                            data={"num_workers": 0, "val_manifest": str(manifest)})
    assert train.run(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.splitlines()[-3] == f"error: {manifest}: 2 problem(s):"
    assert "a validation image must not be trained on" in err.splitlines()[-1]
