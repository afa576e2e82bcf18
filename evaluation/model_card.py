"""The Markdown model card of a bundle (its README.md), with or without an evaluation.

    python -m evaluation.model_card --model BUNDLE [--metrics REPORT/metrics.json] --out MODEL_CARD.md
                                [--training-data "text"]

Model details come from the bundle's ``metadata.json`` and ``calibration.json``; the training
data from the data settings recorded at export (or ``--training-data``); metrics from the
``metrics.json`` of ``evaluate.py``. A training checkpoint gets its card when it is exported
(``python -m training.export``). The card is written atomically.

Research code: the card says so, and that the model is not for clinical use.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import math
import subprocess
from pathlib import Path
from typing import Any

from calibration.methods import beta_formula, platt_formula
from data.io_utils import atomic_write_text, missing_file
from models.bundle import Bundle, ModelError, load_bundle, replace_card

REPO = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "lightning", "timm", "monai", "numpy", "torchmetrics", "scikit-learn")

INTENDED_USE = (
    "**Research only. Not for clinical use. Not a medical device.** This model is a research "
    "prototype for studying the detection of vertebral compression fractures on spine radiographs "
    "(the views it was trained on, listed under Training data) and the telling of acute from chronic fractures. It must not be used to diagnose, "
    "triage or treat patients, nor to inform any clinical decision. It has not been validated on "
    "real patient data and has no regulatory clearance."
)


# --------------------------------------------------------------------------- facts
def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(repo: Path = REPO) -> str | None:
    """``git rev-parse HEAD`` of the repository (``None`` when git or the repository is absent),
    with ``+dirty`` when tracked files have uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        commit = head.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10)
        return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def _ci(d: dict | None, key: str) -> str:
    if not d or d.get(key) is None:
        return "n/a"
    if d.get("ci_low") is None or d.get("ci_high") is None:
        return _fmt(d[key])
    return f"{_fmt(d[key])} (95% CI {_fmt(d['ci_low'])}-{_fmt(d['ci_high'])})"


def _md_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- sections
def _model_details(bundle) -> str:
    meta = bundle.model
    training = bundle.metadata.get("training") or {}
    hp = training.get("hyper_parameters") or {}
    rows = [["bundle", f"`{bundle.name}` version {bundle.version}"], ["id (weights and calibration)", f"`{bundle.id}`"]]
    storage = {n: s.get("storage") for n, s in bundle.metadata.get("networks", {}).items() if s.get("storage")}
    if storage:
        rows.append(["weight storage", ", ".join(f"{n} {s}" for n, s in storage.items())])
    for key, label in (("architecture", "architecture"), ("backbone", "backbone"), ("fpn_dim", "FPN width"),
                       ("targets", "outputs (sigmoid heads)"), ("image_size", "input size [height, width]"),
                       ("input_range", "input intensity range"), ("heatmap_stride", "heatmap stride"),
                       ("format", "checkpoint format"), ("crop_backbone", "crop network backbone (per vertebra)"),
                       ("crop_size", "vertebra crop size (px)"), ("code_version", "code version at training"),
                       ("torch_version", "torch version at training")):
        if key in meta:
            v = meta[key]
            rows.append([label, ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v])
    for key in ("epoch", "global_step"):
        if training.get(key) is not None:
            rows.append([key.replace("_", " "), training[key]])
    for key in ("pretrained", "dropout", "lr", "weight_decay", "acute_weight", "heatmap_weight", "vertebra_weight",
                "init_from"):
        if key in hp:
            rows.append([f"hyper-parameter `{key}`", "none" if hp[key] is None else hp[key]])
    text = ["## Model details", "",
            "Convolutional network (timm encoder with a feature pyramid) that outputs, per spine "
            "radiograph, the probability that a vertebral compression fracture is present (`p_fracture`), the "
            "probability that an acute fracture is present (`p_acute`), and a fracture heatmap locating it."
            + (" Per vertebra found, it gives the level (counted down the spine), six morphometry points, heights, "
               "the Genant grade and shape, and the vertebra's own `p_fracture` and `p_acute` from a crop network "
               "at the film's resolution; the film's probabilities are the larger of the film head's and the "
               "largest vertebra's." if "crop_size" in meta else ""), "",
            _md_table(["field", "value"], rows)]
    refiner = bundle.metadata.get("networks", {}).get("point_refiner")
    if isinstance(refiner, dict):
        entry = {"config": refiner.get("config") or {}, "training": bundle.metadata.get("point_refiner_training") or {}}
        text += ["", "### Point refiner", "", _refiner_details(entry)]
    history = [h for h in bundle.metadata.get("history", []) if isinstance(h, dict)]
    if history:
        text += ["", "### History", "", _md_table(["step", "date", "from"], [
            [h.get("step", ""), h.get("date", ""), json.dumps(h.get("from", ""))] for h in history])]
    text += ["", "### Calibration stored in the bundle", "", _calibration_details(bundle.calibration)]
    return "\n".join(text)


def _refiner_details(entry: dict) -> str:
    """The ``point_refiner`` entry of ``python -m training.point_refiner`` (docs/formats.md)."""
    cfg, tr = entry.get("config") or {}, entry.get("training") or {}
    text = ("A point refiner re-reads each vertebra's six points in a window of the body's own frame "
            f"({cfg.get('width_context', '?')} x its width by {cfg.get('height_context', '?')} x its height, turned "
            f"to its endplates, {cfg.get('size', '?')} px, {cfg.get('passes', '?')} passes"
            + (", the last also read mirrored and averaged" if cfg.get("flip") else "")
            + f", backbone {cfg.get('backbone', '?')}); the vertebra probabilities stay the crop network's.")
    if tr:
        best = next((h for h in tr.get("history", []) if h.get("epoch") == tr.get("best_epoch")), {})
        err = best.get("val_median_error_pct") or {}
        text += (f" Trained for {tr.get('epochs')} epochs ({tr.get('films_per_epoch')} films each, drawn from "
                 f"{tr.get('n_train_films')} training films of {', '.join(f'`{Path(m).parent.name}/{Path(m).name}`' for m in tr.get('manifests', []))}); "
                 f"epoch {tr.get('best_epoch')} kept")
        if err:
            text += (", validation median point error " + ", ".join(f"{k} {v:.1f} %" for k, v in err.items() if k != "score")
                     + f" of the body height on {tr.get('n_val_films')} validation films (one read from windows "
                       "jittered as in training).")
        else:
            text += " (the last; no validation score)."
        units = tr.get("loss_units", "window")  # refiners stored before the option: window pixels
        text += (" Loss: point distance as a fraction of the body height." if units == "height"
                 else " Loss: absolute point error in window pixels.")
        if tr.get("started_from"):
            text += f" It started from the refiner of `{Path(tr['started_from']).parent.name}/{Path(tr['started_from']).name}` (a warm start)."
    return text


def _calibration_details(cal) -> str:
    """The ``vcf_calibration`` entry of ``python -m calibration.fit`` (docs/formats.md) as
    Markdown: method and parameters, fitting data, metrics per head, operating points."""
    if not isinstance(cal, dict) or not cal:
        return ("None: the bundle has no `calibration.json` (probabilities are the network's raw "
                "sigmoid outputs).")
    rows = []
    for k, v in cal.items():
        if k in ("operating_points", "metrics", "method_selection"):
            continue
        if k == "isotonic" and isinstance(v, dict):  # knots can be long: summarised
            v = {head: (f"{len(h.get('x', []))} knots" if isinstance(h, dict) else "identity") for head, h in v.items()}
        if k == "platt" and isinstance(v, dict):
            v = {head: (platt_formula(h) if isinstance(h, dict) else "identity") for head, h in v.items()}
        if k == "beta" and isinstance(v, dict):
            v = {head: (beta_formula(h) if isinstance(h, dict) else "identity") for head, h in v.items()}
        if isinstance(v, dict):
            v = ", ".join(f"{kk}: {_fmt(vv, 4)}" for kk, vv in v.items())
        elif isinstance(v, (list, tuple)):
            v = ", ".join(_fmt(x, 4) for x in v)
        else:
            v = _fmt(v, 4)
        rows.append([k, v])
    parts = [_md_table(["field", "value"], rows)] if rows else []
    metrics = cal.get("metrics")
    if isinstance(metrics, dict) and metrics:
        mrows = []
        for head, m in metrics.items():
            if isinstance(m, dict):
                mrows.append([head] + [_fmt(m.get(k), 4) for k in ("nll_before", "nll_after", "ece_before", "ece_after")])
        if mrows:
            parts += ["", "Calibration fit (on its fitting images):", "",
                      _md_table(["head", "NLL before", "NLL after", "ECE before", "ECE after"], mrows)]
    sel = cal.get("method_selection")
    if isinstance(sel, dict) and isinstance(sel.get("scores"), dict):
        srows = [[name + (" (chosen)" if name == sel.get("chosen") else "")]
                 + [_fmt(s.get(k), 4) for k in ("brier", "ece", "nll")]
                 for name, s in sel["scores"].items() if isinstance(s, dict)]
        parts += ["", f"Out-of-fold `p_fracture` of each method ({sel.get('folds')} patient-grouped folds of "
                  f"{sel.get('n_images')} fitting images; method requested: {sel.get('requested')}):", "",
                  _md_table(["method", "Brier", "ECE", "NLL"], srows)]
    ops = cal.get("operating_points")
    if isinstance(ops, dict) and ops:
        orows = []
        for name, op in ops.items():
            label = name + (" (default)" if cal.get("default") == name else "")
            if isinstance(op, dict):
                orows.append([label, _fmt(op.get("threshold"), 4), _fmt(op.get("sensitivity")),
                              _fmt(op.get("specificity")), op.get("criterion", "")])
            else:
                orows.append([label, _fmt(op, 4), "", "", ""])
        parts += ["", "Operating points stored with the calibration (sensitivity and specificity measured on the "
                  "fitting images, so optimistic):", "",
                  _md_table(["operating point", "threshold", "sensitivity", "specificity", "criterion"], orows)]
    return "\n".join(parts)


def manifest_composition(manifest: str | None) -> dict | None:
    """What a training manifest holds, read from its rows: ``{"n_images", "phantom", "simulated_real",
    "real", "views": {view: n}}``; None when it cannot be read (not recorded, moved, another machine).

    A row is a *phantom* film when its patient id starts with ``phantom-`` or its image folder has the
    generator's ``phantom.json`` beside it; *simulated on a real film* when it names a ``source_image``
    (``data/simulate.py``); *real* otherwise."""
    import pandas as pd

    if not manifest:
        return None
    for path in (Path(manifest), REPO / manifest):
        if path.is_file():
            break
    else:
        return None
    try:
        rows = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return None
    if "image" not in rows:
        return None
    source = rows["source_image"].str.strip() if "source_image" in rows else pd.Series("", index=rows.index)
    patient = rows["patient_id"].str.strip() if "patient_id" in rows else pd.Series("", index=rows.index)
    base = path.parent

    def has_phantom_json(image: str) -> bool:
        folder = Path(image) if Path(image).is_absolute() else base / image
        return (folder.parent.parent / "phantom.json").is_file()

    phantom = patient.str.startswith("phantom-") | pd.Series(
        [not s and has_phantom_json(i) for i, s in zip(rows["image"], source)], index=rows.index)
    simulated = (source != "") & ~phantom
    views = rows["view"].str.strip().str.lower().replace("", "unknown") if "view" in rows else pd.Series(
        "unknown", index=rows.index)
    return {"n_images": int(len(rows)), "phantom": int(phantom.sum()), "simulated_real": int(simulated.sum()),
            "real": int((~phantom & ~simulated).sum()), "views": {k: int(v) for k, v in views.value_counts().items()}}


PHANTOM_TEXT = ("**synthetic phantom films** generated procedurally by `data/phantom.py` (lateral thoracolumbar "
                "radiograph phantoms with exact per-vertebra truth: Genant grade 1-3 wedge, biconcave and crush "
                "fractures, acute and chronic signs, and confounders)")


def _composition_text(comp: dict) -> str:
    parts = []
    if comp["phantom"]:
        parts.append(f"{comp['phantom']} {PHANTOM_TEXT}")
    if comp["simulated_real"]:
        parts.append(f"{comp['simulated_real']} **real radiographs with compression fractures simulated on them** by "
                     "`data/simulate.py` (each fracture and its acute or chronic signs are drawn onto a real film "
                     "from its vertebra landmarks; the labels are those of the simulation)")
    if comp["real"]:
        parts.append(f"{comp['real']} **real radiographs** with the labels their manifest gives (real films of a "
                     "landmark data set without fractures, such as AASCE, are labelled unfractured)")
    views = ", ".join(f"{k} {v}" for k, v in sorted(comp["views"].items()))
    text = f"The model was trained on {comp['n_images']} films: " + "; ".join(parts) + f". Views: {views}."
    if not comp["real"]:
        text += " **No real fracture was seen in training: every fracture is synthetic or simulated.**"
    if not comp["real"] and not comp["simulated_real"]:
        text += " **No real patient radiographs were used.**"
    return text


def _training_data(bundle, training_data: str | None) -> tuple[str, dict | None]:
    """The section, and the training manifest's composition (None when given as text or unreadable)."""
    dm = (bundle.metadata.get("training") or {}).get("data") or {}
    hp = (bundle.metadata.get("training") or {}).get("hyper_parameters") or {}
    lines = ["## Training data", ""]
    comp = None
    if training_data is not None:
        lines.append(training_data.strip())
    else:
        comp = manifest_composition(dm.get("manifest"))
        if comp is not None:
            lines.append(_composition_text(comp))
        elif dm.get("manifest"):
            lines.append(f"The training manifest (`{dm['manifest']}`) cannot be read here, so this card cannot say "
                         "what the model was trained on: write the card where the manifest is, or describe the data "
                         "with `--training-data`.")
        else:
            lines.append("The bundle does not name its training manifest; describe the data with `--training-data`.")
    details = []
    for key, label in (("manifest", "training manifest"), ("val_manifest", "validation manifest"),
                       ("test_manifest", "test manifest"), ("vertebrae", "vertebrae table"),
                       ("val_fraction", "validation fraction"), ("split_seed", "split seed (patient-grouped)"),
                       ("image_size", "training image size"), ("batch_size", "batch size"), ("augment", "augmentation")):
        if key in dm and dm[key] is not None:
            details.append([label, f"`{dm[key]}`" if "manifest" in key or key == "vertebrae" else dm[key]])
    if details:
        lines += ["", _md_table(["data setting (recorded at training)", "value"], details)]
        manifest = dm.get("manifest")
        info = _phantom_info(manifest)
        if info:
            lines += ["", "Phantom generator record beside the training manifest (`phantom.json`): "
                      + ", ".join(f"{k} {v}" for k, v in info.items() if k != "note") + "."]
    else:
        lines += ["", "*The bundle does not record its data module settings.*"]
    if hp.get("init_from"):
        lines += ["", f"Fine-tuned from the weights of `{hp['init_from']}`."]
    return "\n".join(lines), comp


def _phantom_info(manifest: str | None) -> dict | None:
    if not manifest:
        return None
    for base in (Path(manifest).parent, REPO / Path(manifest).parent):
        p = base / "phantom.json"
        try:
            if p.is_file():
                d = json.loads(p.read_text(encoding="utf-8"))
                return {k: d[k] for k in ("generator", "seed", "n", "size", "n_fractured_images",
                                          "n_fractured_vertebrae") if k in d}
        except (OSError, ValueError):
            return None
    return None


def _metrics_section(metrics: dict, metrics_path: Path) -> str:
    c = metrics.get("counts") or {}
    bs = metrics.get("bootstrap") or {}
    inputs = metrics.get("inputs") or {}
    lines = ["## Evaluation and metrics", "",
             f"From `{metrics_path.name}` (evaluation of `{inputs.get('predictions', '?')}` against "
             f"`{inputs.get('manifest', '?')}`). "
             + (f"95% confidence intervals: percentile bootstrap over **patients**, {bs.get('n_boot')} resamples "
                f"(seed {bs.get('seed')}, {bs.get('n_patients')} patients, {bs.get('n_images')} images). "
                if bs else "No confidence intervals (metrics.json without bootstrap). ")
             + f"Images with an unknown label were left out of each metric and counted: "
               f"{c.get('n_fracture_unknown', 'n/a')} with an unknown fracture label, "
               f"{c.get('n_acute_unknown', 'n/a')} fractured images with an unknown acute label; "
               f"{c.get('n_error', 'n/a')} failed predictions.", ""]
    rows = []
    roc, pr = metrics.get("roc") or {}, metrics.get("pr") or {}
    if roc:
        names = {"fracture": "AUROC, fracture vs none", "acute": "AUROC, acute vs chronic (p_acute)",
                 "acute_given_fracture": "AUROC, acute vs chronic (p_acute_given_fracture)"}
        for task, r in roc.items():
            rows.append([names.get(task, task), _ci(r, "auroc"), r.get("n_pos"), r.get("n_neg")])
        if pr.get("fracture"):
            p = pr["fracture"]
            rows.append(["average precision, fracture vs none", _ci(p, "average_precision"), p.get("n_pos"), p.get("n_neg")])
    else:  # an older metrics.json (point values only)
        rows.append(["AUROC, fracture vs none", _fmt(metrics.get("auroc_fracture")), c.get("n_fracture_pos"),
                     c.get("n_fracture_neg")])
        rows.append(["AUROC, acute vs chronic", _fmt(metrics.get("auroc_acute")), c.get("n_acute"), c.get("n_chronic")])
    vert = metrics.get("vertebrae") or {}
    if vert.get("available"):
        det, pe, lvl = vert.get("detection") or {}, vert.get("point_error") or {}, vert.get("level_accuracy") or {}
        af, ga = vert.get("auroc_fracture") or {}, vert.get("grade_agreement") or {}
        rows.append(["per vertebra: detection recall / precision",
                     f"{_fmt(det.get('recall'))} / {_fmt(det.get('precision'))}", det.get("n_truth"), ""])
        rows.append(["per vertebra: median point error, % of height",
                     _fmt((pe.get("percent_height") or {}).get("median")), pe.get("n_vertebrae"), ""])
        rows.append(["per vertebra: level accuracy", _fmt(lvl.get("accuracy")), lvl.get("n"), ""])
        rows.append(["per vertebra: AUROC, fracture vs none", _fmt(af.get("auroc")), af.get("n_pos"), af.get("n_neg")])
        rows.append(["per vertebra: Genant grade, quadratic weighted kappa", _fmt(ga.get("kappa_quadratic")),
                     ga.get("n"), ""])
    pg = metrics.get("pointing_game")
    if pg:
        rows.append(["heatmap pointing game (peak in a fractured vertebra)", _fmt(pg.get("score")),
                     f"{pg.get('hits')} hits", f"of {pg.get('n')}"])
    head = metrics.get("pointing_game_head")
    if head:
        rows.append(["pointing game of the dense heatmap head alone", _fmt(head.get("score")),
                     f"{head.get('hits')} hits", f"of {head.get('n')}"])
    lines.append(_md_table(["metric", "value", "positives", "negatives"], rows))

    by_grade = metrics.get("by_grade")
    if by_grade:
        lines += ["", "AUROC by Genant grade of the worst vertebra (negatives: normal images):", "",
                  _md_table(["grade", "AUROC", "positives", "negatives"],
                            [[g, _ci(r, "auroc"), r.get("n_pos"), r.get("n_neg")] for g, r in by_grade.items()])]
    ops = dict(metrics.get("operating_points") or {})
    stored = metrics.get("stored_operating_point") or {}
    if stored.get("available"):
        ops[f"stored at inference ({stored.get('name') or 'unnamed'})"] = stored
    if ops:
        orows = []
        for name, op in ops.items():
            thr = op.get("threshold")
            thr = ", ".join(_fmt(x) for x in thr) if isinstance(thr, list) else _fmt(thr)
            orows.append([name, thr, _ci(op.get("sensitivity"), "value"),
                          _ci(op.get("specificity"), "value"), _ci(op.get("ppv"), "value"), _ci(op.get("npv"), "value")])
        lines += ["", "Operating points (positive when `p_fracture >= threshold`; except for one stored at "
                  "inference, thresholds chosen on the evaluation set itself, so these are optimistic):", "",
                  _md_table(["operating point", "threshold", "sensitivity", "specificity", "PPV", "NPV"], orows)]
    return "\n".join(lines)


def _calibration_section(metrics: dict) -> str:
    cal = metrics.get("calibration")
    lines = ["## Calibration", ""]
    if not cal:
        lines.append("Not available in the metrics file.")
        return "\n".join(lines)
    rows = [[k, v.get("population", ""), _ci(v.get("ece"), "ece"),
             _fmt((v.get("ece_if_calibrated") or {}).get("p95")), _fmt(v.get("brier")), v.get("n")]
            for k, v in cal.items()]
    lines += ["Expected calibration error (10 equal-width bins, L1) and Brier score on the evaluation set. The ECE "
              "of perfectly calibrated probabilities on a finite set is not 0: 'chance (95th pct)' is the value that "
              "these probabilities, if calibrated, would stay under 95 % of the time.", "",
              _md_table(["probability", "population", "ECE", "chance (95th pct)", "Brier", "n"], rows)]
    ic = metrics.get("inference_calibration")
    if ic:
        lines += ["", f"The evaluated predictions were calibrated at inference ({json.dumps(ic)})."]
    return "\n".join(lines)


def _limitations(comp: dict | None) -> str:
    items = []
    synthetic_only = comp is not None and not comp["real"]
    if comp is not None and synthetic_only and not comp["simulated_real"]:
        items.append(
            "Trained and evaluated on **synthetic phantom films only; no real fracture data** were used. The "
            "phantom is much simpler than real radiographs (anatomy, pathology, implants, positioning, "
            "projection and acquisition vary far more in real films), so performance on real images is unknown "
            "and may be much lower.")
    elif synthetic_only:
        items.append(
            "**No real fracture data** were used: every fracture seen in training is drawn by the phantom or "
            "simulated on a real film. Simulated fractures share the simulator's idea of a fracture; real ones vary "
            "far more, so performance on real fractures is unknown and may be much lower. The real films are those "
            "of the landmark data sets named by the manifest (for AASCE: AP films of adolescents with scoliosis).")
    if synthetic_only:
        items.append(
            "**Acuity (acute vs chronic) was learned only from synthetic signs** (endplate step with cortical "
            "break, sclerotic condensation band, prevertebral swelling for acute; smooth sclerotic margins, "
            "osteophytes, disc narrowing for chronic), drawn by the phantom or rendered by the simulator. In "
            "practice acuity is usually judged with MRI (marrow oedema) or against prior films; nothing here "
            "shows that the learned signs carry over to real radiographs.")
    else:
        items.append("Check how closely the training data above match the intended population; the metrics "
                     "hold only for data like the evaluation set.")
    views = sorted(v for v in (comp or {}).get("views", {}) if v != "unknown")
    items += [
        "Metrics come from one evaluation set; their confidence intervals cover sampling of patients only, "
        "not shifts between sites, devices or populations. Operating-point thresholds were chosen on the "
        "same set they are reported on.",
        "Probabilities may be miscalibrated on other data even where they are calibrated here.",
        (f"Views seen in training: {', '.join(views)}; other views are out of scope. " if views else
         "The views seen in training are not known to this card. ") + "One image at a time (no prior films, no "
        "clinical context).",
        "The heatmap is a coarse localisation aid, not a segmentation.",
    ]
    return "## Limitations\n\n" + "\n".join(f"- {x}" for x in items)


def _versions(bundle) -> str:
    rows = [["spine-vcf (this code)", _version("spine-vcf")], ["git commit", git_commit() or "not available"]]
    meta = bundle.model
    if "code_version" in meta:
        rows.append(["spine-vcf at training", meta["code_version"]])
    lightning = (bundle.metadata.get("training") or {}).get("lightning_version")
    if lightning:
        rows.append(["lightning at training", lightning])
    rows += [[lib, _version(lib)] for lib in LIBRARIES]
    return "## Versions\n\nCode and libraries installed when this card was written:\n\n" + _md_table(["package", "version"], rows)


# --------------------------------------------------------------------------- card
def bundle_card(bundle, metrics_json: str | Path | None = None, training_data: str | None = None,
                measured: str | None = None) -> str:
    """The Markdown model card of ``bundle`` (a :class:`models.bundle.Bundle`), with the metrics
    of ``metrics_json`` when given, and ``measured`` (Markdown: what benchmarks measured on data
    the model never saw) as its last section."""
    metrics = json.loads(Path(metrics_json).read_text(encoding="utf-8")) if metrics_json else None
    meta = bundle.model
    title = f"# Model card: {bundle.name} {bundle.version} ({meta.get('backbone', 'unknown backbone')}, {bundle.id[:12]})"
    training, comp = _training_data(bundle, training_data)
    synthetic = comp is not None and not comp["real"]
    parts = [
        title,
        "",
        f"*Written {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} by `python -m evaluation.model_card`.*",
        "",
        "> **Not for clinical use.** Research code, not a medical device. "
        + ("Every fracture it was trained on is synthetic or simulated: the metrics below are **not clinical "
           "performance**." if synthetic else "Any metrics below are not an estimate of clinical performance."),
        "",
        _model_details(bundle),
        "",
        "## Intended use",
        "",
        INTENDED_USE,
        "",
        "Out of scope: any clinical, diagnostic, screening or triage use; use on patients; use without a "
        "qualified reader; use on views, body parts or modalities other than the spine radiographs it was trained on.",
        "",
        training,
        "",
    ]
    if metrics is not None:
        parts += [_metrics_section(metrics, Path(metrics_json)), "", _calibration_section(metrics), ""]
    else:
        parts += ["## Evaluation and metrics", "",
                  "Not evaluated when this card was written: run `evaluate.py` on held-out data and rewrite the card "
                  "with `python -m evaluation.model_card --model BUNDLE --metrics metrics.json`.", ""]
    parts += [_limitations(comp), "", _versions(bundle), ""]
    if measured:
        parts += ["## Measured on data it never saw", "", measured.strip(), ""]
    return "\n".join(parts)


def build_model_card(model, metrics_json: str | Path | None = None, training_data: str | None = None,
                     measured: str | None = None) -> str:
    """The card of ``model``: a :class:`~models.bundle.Bundle` or a bundle folder."""
    bundle = model if isinstance(model, Bundle) else load_bundle(model)
    return bundle_card(bundle, metrics_json, training_data, measured)


def save_with_card(bundle: Bundle, out: str | Path, storage: str | None = None, overwrite: bool = False) -> Path:
    """Save ``bundle`` to ``out`` with its model card (no evaluation yet) as README.md."""
    return bundle.save(out, storage=storage, card=bundle_card, overwrite=overwrite)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Write a Markdown model card (research only; not for clinical use).")
    parser.add_argument("--model", required=True, help="a bundle folder")
    parser.add_argument("--metrics", default=None, help="metrics.json written by evaluate.py")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="output Markdown file, e.g. MODEL_CARD.md")
    target.add_argument("--into-bundle", action="store_true",
                        help="replace the bundle's own card (README.md, and its digest in metadata.json); "
                             "the weights and the bundle's id are unchanged")
    parser.add_argument("--measured", default=None,
                        help="a Markdown file: what benchmarks measured on data the model never saw (the card's last section)")
    parser.add_argument("--training-data", default=None,
                        help="text describing the training data (default: counted from the training manifest: "
                             "phantom, simulated-on-real and real films, and their views)")
    parser.add_argument("--training-data-file", default=None, help="the same text, from a Markdown file")
    args = parser.parse_args(argv)
    if args.metrics and not Path(args.metrics).is_file():
        parser.exit(2, f"error: {args.metrics}: {missing_file(args.metrics, 'metrics file')} (write it with evaluate.py)\n")
    for path, what in ((args.training_data_file, "training-data file"), (args.measured, "measured file")):
        if path and not Path(path).is_file():
            parser.exit(2, f"error: {path}: {missing_file(path, what)}\n")
    training_data = Path(args.training_data_file).read_text() if args.training_data_file else args.training_data
    measured = Path(args.measured).read_text() if args.measured else None
    try:
        card = build_model_card(args.model, args.metrics, training_data, measured)
    except ModelError as exc:
        parser.exit(2, f"error: {exc}\n")
    except ValueError as exc:  # json.JSONDecodeError
        parser.exit(2, f"error: {args.metrics}: not a metrics.json of evaluate.py ({exc})\n")
    path = replace_card(args.model, card) if args.into_bundle else atomic_write_text(args.out, card)
    print(f"wrote {path}")
    return path



def cli() -> int:
    """Console-script entry point (its return value is the exit status)."""
    main()
    return 0

if __name__ == "__main__":
    main()
