"""evaluation.model_card: a Markdown card of a bundle (exported from a tiny checkpoint) and a metrics.json of
evaluate.py."""
import json

import pytest
import torch

from training.export import bundle_from_checkpoint, export_checkpoint
from training.system import FractureSystem


def _card(checkpoint, metrics_json=None, training_data=None):
    """The card of the bundle exported from ``checkpoint``."""
    from evaluation import model_card

    return model_card.bundle_card(bundle_from_checkpoint(checkpoint), metrics_json, training_data)


def _tiny_checkpoint(path, calibration=None, datamodule=True, manifest="runs/x/data/manifest.csv"):
    system = FractureSystem(fpn_dim=16, image_size=(64, 48))
    ckpt = {"state_dict": system.state_dict(), "epoch": 3, "global_step": 42,
            "hyper_parameters": dict(system.hparams)}
    if datamodule:
        ckpt["datamodule_hyper_parameters"] = {"manifest": str(manifest), "vertebrae": "auto",
                                               "val_fraction": 0.15, "split_seed": 0, "image_size": [64, 48]}
    system.on_save_checkpoint(ckpt)
    if calibration is not None:
        ckpt["vcf_calibration"] = calibration
    torch.save(ckpt, path)
    return path


@pytest.fixture
def metrics_json(tiny_eval_set, tmp_path):
    import evaluate

    out = tmp_path / "report"
    evaluate.main(["--predictions", tiny_eval_set["predictions"], "--manifest", tiny_eval_set["manifest"],
                   "--out", str(out), "--n-boot", "100"])
    return out / "metrics.json"


def _manifest(path, rows):
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_model_card_sections(tmp_path, metrics_json):
    from evaluation import model_card

    phantom_manifest = _manifest(tmp_path / "x" / "data" / "manifest.csv", [
        {"image": f"images/phantom_s0_{i:05d}.png", "patient_id": f"phantom-s0-{i:05d}", "fracture": i % 2,
         "view": "lateral"} for i in range(4)])
    ckpt = _tiny_checkpoint(tmp_path / "model.ckpt", manifest=phantom_manifest,
                            calibration={  # as calibration.fit writes it (docs/formats.md)
                                "format": 1, "method": "temperature",
                                "temperature": {"p_fracture": 1.7, "p_acute_given_fracture": 1.0},
                                "operating_points": {
                                    "balanced": {"threshold": 0.42, "sensitivity": 0.9, "specificity": 0.8,
                                                 "criterion": "max Youden J", "youden_j": 0.7},
                                    "high_specificity": {"threshold": 0.81, "sensitivity": 0.5, "specificity": 0.96,
                                                         "criterion": "lowest threshold with specificity >= 0.95"}},
                                "default": "balanced", "fitted_heads": {"p_fracture": True, "p_acute_given_fracture": False},
                                "n_images": 30, "metrics": {"p_fracture": {"nll_before": 0.61, "nll_after": 0.52,
                                                                           "ece_before": 0.12, "ece_after": 0.04}},
                                "method_selection": {"requested": "auto", "chosen": "temperature", "folds": 5,
                                                     "n_images": 30, "criterion": "lowest out-of-fold Brier score",
                                                     "scores": {"none": {"brier": 0.2111, "ece": 0.15, "nll": 0.7},
                                                                "temperature": {"brier": 0.1822, "ece": 0.06, "nll": 0.55},
                                                                "isotonic": {"brier": 0.1933, "ece": 0.08, "nll": 0.9}}}})
    out = tmp_path / "card" / "MODEL_CARD.md"
    bundle = export_checkpoint(ckpt, tmp_path / "bundle")
    model_card.main(["--model", str(bundle), "--metrics", str(metrics_json), "--out", str(out)])
    card = out.read_text()
    for heading in ("# Model card", "## Model details", "## Intended use", "## Training data",
                    "## Evaluation and metrics", "## Calibration", "## Limitations", "## Versions"):
        assert heading in card, heading
    low = card.lower()
    assert "not for clinical use" in low and "not a medical device" in low and "research only" in low
    # model details from vcf_model, calibration from vcf_calibration
    assert "FractureNet" in card and "resnet18" in card and "| FPN width | 16 |" in card
    assert "temperature" in card and "p_fracture: 1.7000" in card
    assert "| balanced (default) | 0.4200 |" in card and "0.0400" in card  # operating point; ECE after
    assert "| temperature (chosen) | 0.1822 | 0.0600 | 0.5500 |" in card and "method requested: auto" in card
    # training data: counted from the manifest named by the data module settings
    assert "data/phantom.py" in card and "x/data/manifest.csv" in card
    assert "trained on 4 films: 4 **synthetic phantom films**" in card and "Views: lateral 4." in card
    assert "no real patient radiographs were used" in low and "synthetic phantom films only" in low
    assert "no real fracture data" in low and "acuity" in low
    assert "Views seen in training: lateral; other views are out of scope." in card
    # metrics with confidence intervals and calibration from metrics.json
    m = json.loads(metrics_json.read_text())
    auc = m["roc"]["fracture"]
    assert f"{auc['auroc']:.3f} (95% CI {auc['ci_low']:.3f}-{auc['ci_high']:.3f})" in card
    assert f"{m['calibration']['p_fracture']['ece']['ece']:.3f}" in card
    assert "chance (95th pct)" in card and f"{m['calibration']['p_fracture']['ece_if_calibrated']['p95']:.3f}" in card
    assert "high_specificity" in card
    assert "2 with an unknown fracture label" in card
    # versions
    for lib in ("torch", "lightning", "timm", "monai", "numpy", "spine-vcf", "git commit"):
        assert f"| {lib}" in card, lib
    assert not list(out.parent.glob(".*.tmp"))  # written atomically, nothing left behind


def test_model_card_custom_training_data_and_no_calibration(tmp_path, tiny_eval_set):
    from data.io_utils import atomic_write_json
    from evaluation.report import evaluate
    from evaluation import model_card

    metrics_json = atomic_write_json(tmp_path / "metrics.json", evaluate(
        tiny_eval_set["predictions"], tiny_eval_set["manifest"], n_boot=50))

    ckpt = _tiny_checkpoint(tmp_path / "model.ckpt", datamodule=False)
    card = _card(ckpt, metrics_json, training_data="Site X radiographs, 2019-2021.")
    assert "Site X radiographs, 2019-2021." in card
    assert "data/phantom.py" not in card
    assert "no `calibration.json`" in card
    assert "not for clinical use" in card.lower()


def test_model_card_counts_simulated_and_real_films_and_never_calls_them_phantom(tmp_path, tiny_eval_set):
    from data.io_utils import atomic_write_json
    from evaluation.report import evaluate
    from evaluation import model_card

    metrics_json = atomic_write_json(tmp_path / "metrics.json", evaluate(
        tiny_eval_set["predictions"], tiny_eval_set["manifest"], n_boot=50))
    (tmp_path / "mix" / "phantom").mkdir(parents=True)
    (tmp_path / "mix" / "phantom" / "phantom.json").write_text("{}")
    rows = [{"image": "phantom/images/a.png", "patient_id": "p1", "fracture": 1, "view": "lateral", "source_image": ""},
            {"image": "sim/images/b.png", "patient_id": "aasce-1", "fracture": 1, "view": "ap",
             "source_image": "/data/aasce/images/b.jpg"},
            {"image": "sim/images/c.png", "patient_id": "aasce-2", "fracture": 0, "view": "ap",
             "source_image": "/data/aasce/images/c.jpg"}]
    mixed = _manifest(tmp_path / "mix" / "manifest.csv", rows)
    assert model_card.manifest_composition(str(mixed)) == {
        "n_images": 3, "phantom": 1, "simulated_real": 2, "real": 0, "views": {"ap": 2, "lateral": 1}}
    card = _card(_tiny_checkpoint(tmp_path / "mix.ckpt", manifest=mixed), metrics_json)
    low = card.lower()
    assert "no real patient radiographs were used" not in low and "synthetic phantom films only" not in low
    assert "2 **real radiographs with compression fractures simulated on them**" in card
    assert "every fracture is synthetic or simulated" in low and "acuity (acute vs chronic) was learned only" in low
    assert "Views seen in training: ap, lateral" in card

    # a real labelled film: no claim that every fracture is synthetic
    real = _manifest(tmp_path / "site" / "manifest.csv", rows[1:] + [
        {"image": "/site/d.png", "patient_id": "s1", "fracture": 1, "view": "lateral", "source_image": ""}])
    card = _card(_tiny_checkpoint(tmp_path / "site.ckpt", manifest=real), metrics_json)
    assert "1 **real radiographs**" in card and "every fracture is synthetic" not in card.lower()
    assert "Check how closely the training data" in card

    # a manifest that is not here: the card says it cannot tell, and claims nothing
    card = _card(_tiny_checkpoint(tmp_path / "gone.ckpt", manifest="/nowhere/manifest.csv"),
                                       metrics_json)
    assert "cannot be read here" in card and "data/phantom.py" not in card
    assert "no real patient radiographs" not in card.lower()


def test_model_card_refuses_unsafe_checkpoint(tmp_path):
    import pickle

    from evaluation import model_card
    from training.checkpoint import CheckpointError

    class _Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": {}, "x": _Evil()}, fh)
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(CheckpointError):
        _card(path, tmp_path / "metrics.json")


def test_model_card_describes_a_stored_point_refiner(tmp_path, tiny_eval_set):
    from data.io_utils import atomic_write_json
    from evaluation.report import evaluate
    from evaluation import model_card
    from models.vertebra_net import VertebraNet

    metrics_json = atomic_write_json(tmp_path / "metrics.json", evaluate(
        tiny_eval_set["predictions"], tiny_eval_set["manifest"], n_boot=50))
    path = _tiny_checkpoint(tmp_path / "model.ckpt")
    assert "Point refiner" not in _card(path, metrics_json)
    ckpt = torch.load(path, weights_only=True)
    ckpt["point_refiner"] = {  # as python -m training.point_refiner writes it (docs/formats.md)
        "state_dict": VertebraNet().state_dict(), "config": {"backbone": "resnet18", "size": 96, "width_context": 1.5, "height_context": 2.2,
                                     "passes": 2},
        "training": {"manifests": ["/data/mix/manifest.csv"], "epochs": 8, "films_per_epoch": 800,
                     "n_train_films": 2300, "n_val_films": 433, "best_epoch": 2,
                     "history": [{"epoch": 1, "val_median_error_pct": {"ap": 11.0, "lateral": 2.5, "score": 6.75}},
                                 {"epoch": 2, "val_median_error_pct": {"ap": 9.51, "lateral": 2.04, "score": 5.8}}]}}
    torch.save(ckpt, path)
    card = _card(path, metrics_json)
    assert "### Point refiner" in card and "1.5 x its width by 2.2 x its height" in card  # the stored window, not today's default
    assert "epoch 2 kept" in card and "ap 9.5 %, lateral 2.0 %" in card and "`mix/manifest.csv`" in card
    assert "mirrored" not in card and "warm start" not in card
    assert "Loss: absolute point error in window pixels." in card  # stored before the option
    ckpt["point_refiner"]["config"]["flip"] = True
    ckpt["point_refiner"]["training"]["started_from"] = "/runs/refined_96/best.ckpt"
    ckpt["point_refiner"]["training"]["loss_units"] = "height"
    torch.save(ckpt, path)
    card = _card(path, metrics_json)
    assert "Loss: point distance as a fraction of the body height." in card
    assert "2 passes, the last also read mirrored and averaged" in card
    assert "started from the refiner of `refined_96/best.ckpt` (a warm start)" in card
    ckpt["point_refiner"]["training"].update(history=[{"epoch": 1}], best_epoch=1, n_val_films=0)
    torch.save(ckpt, path)
    assert "epoch 1 kept (the last; no validation score)." in _card(path, metrics_json)


def test_model_card_cli_names_bad_inputs(tmp_path, capsys):
    from evaluation import model_card

    bundle = export_checkpoint(_tiny_checkpoint(tmp_path / "model.ckpt"), tmp_path / "bundle")
    with pytest.raises(SystemExit) as exit_info:
        model_card.main(["--model", str(bundle), "--metrics", str(tmp_path / "none.json"),
                         "--out", str(tmp_path / "card.md")])
    assert exit_info.value.code == 2 and "none.json: metrics file not found" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SystemExit):
        model_card.main(["--model", str(bundle), "--metrics", str(tmp_path / "bad.json"), "--out", str(tmp_path / "c.md")])
    assert "bad.json: not a metrics.json" in capsys.readouterr().err
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(SystemExit):
        model_card.main(["--model", str(tmp_path / "missing"), "--metrics", str(tmp_path / "m.json"),
                         "--out", str(tmp_path / "c.md")])
    assert "missing: not a bundle folder (not found)" in capsys.readouterr().err
    assert not (tmp_path / "card.md").exists() and not (tmp_path / "c.md").exists()


def test_card_written_into_the_bundle_keeps_its_weights_and_id(tmp_path, capsys):
    """--into-bundle replaces README.md and its digest in metadata.json and nothing else: the
    bundle still loads (every digest checked) with the same id, and a re-save is not needed."""
    from evaluation import model_card
    from models.bundle import file_sha256, load_bundle

    bundle = export_checkpoint(_tiny_checkpoint(tmp_path / "model.ckpt"), tmp_path / "bundle")
    before = json.loads((bundle / "metadata.json").read_text())
    weights = {name: file_sha256(bundle / name) for name in before["files"] if name.endswith(".safetensors")}
    (tmp_path / "training.md").write_text("Two stages on synthetic films, 3 minutes.")
    (tmp_path / "measured.md").write_text("Image AUROC 0.5 on 40 unseen films (benchmarks/RESULTS.md).")
    model_card.main(["--model", str(bundle), "--into-bundle", "--training-data-file", str(tmp_path / "training.md"),
                     "--measured", str(tmp_path / "measured.md")])
    after = json.loads((bundle / "metadata.json").read_text())
    card = (bundle / "README.md").read_text()
    assert "Two stages on synthetic films, 3 minutes." in card
    assert card.rstrip().endswith("Image AUROC 0.5 on 40 unseen films (benchmarks/RESULTS.md).")
    assert "## Measured on data it never saw" in card
    assert after["id"] == before["id"] and after["files"]["README.md"] == file_sha256(bundle / "README.md")
    assert {k: v for k, v in after["files"].items() if k != "README.md"} == \
        {k: v for k, v in before["files"].items() if k != "README.md"}
    assert {name: file_sha256(bundle / name) for name in weights} == weights
    assert load_bundle(bundle).id == before["id"]
    with pytest.raises(SystemExit) as exit_info:
        model_card.main(["--model", str(bundle), "--into-bundle", "--measured", str(tmp_path / "none.md")])
    assert exit_info.value.code == 2 and "none.md" in capsys.readouterr().err
