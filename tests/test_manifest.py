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
