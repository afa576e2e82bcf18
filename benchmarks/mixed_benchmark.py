"""Phantom + simulated-real benchmark: evaluate one trained checkpoint of the
phantom + simulated-real model on three held-out test sets and write benchmarks/RESULTS.md.

    python -m benchmarks.mixed_benchmark [--checkpoint runs/mix/best.ckpt] [--aasce ../shared/data/aasce]
        [--out benchmarks/out/mixed] [--limit N] [--reuse] [--no-results] [--batch-size 8] [--device auto]

Every step is a subprocess of the project's own command lines, so the benchmark measures what
users run:

1. calibrate: ``python -m calibration.fit --checkpoint CKPT --manifest runs/mix/manifest.csv
   --split val --out OUT/calibrated.ckpt``;
2. simulated-real held-out test: the ``split == test`` rows of runs/mix/manifest.csv (fractures
   simulated on the real AASCE films of the held-out patients; ``make mixed-data``), with their
   ``vertebrae.csv`` rows: ``infer.py`` with the calibrated checkpoint, then ``evaluate.py``;
3. real held-out AASCE films (no fractures, localisation only): ``python -m data.landmarks``,
   the films of the patients held out in step 2, ``infer.py``, ``evaluate.py``;
4. phantom test films of an unseen seed (benchmarks/out/phantom/data/test: 400 films of seed
   1000, generated if absent): ``infer.py``, ``evaluate.py``;
5. the section "## Phantom + simulated-real model" of benchmarks/RESULTS.md
   (replaced if present) and OUT/mixed_result.json with every number.

Relative paths given to the options are taken from the repository root. ``--limit N`` keeps the
first N films of each test set (and calibrates on N fractured + N normal films of the
validation split): for trials of the plumbing only, the numbers mean nothing.

The fractures of the simulated-real test set are simulated and the phantom is synthetic: these
numbers measure the code on simulated and synthetic data, not clinical performance.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.phantom_benchmark import ensure_data, machine
from benchmarks.results_file import replace_section
from data.io_utils import atomic_write_text
from data.tables import absolute_path, load_vertebrae_table, path_key, read_text_table
from evaluation import bootstrap as B
from evaluation import metrics as M
from calibration.methods import platt_formula
from models.bundle import file_sha256
from data.manifest import assign_splits
from data.landmarks import patient_from_name

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Phantom + simulated-real model"
PHANTOM_TEST = {"n": 400, "seed": 1000, "size": 512}
N_BOOT, BOOT_SEED = 1000, 0  # evaluate.py's defaults

TARGETS = {
    "sim_auroc_grade23": (">=", 0.90),
    "sim_ece": ("<=", 0.05),
    "aasce_recall": (">=", 0.95),
    "aasce_median_pct": ("<=", 10.0),
    "phantom_vertebra_auroc": (">=", 0.97),
    "phantom_kappa": (">=", 0.85),
    "phantom_level_accuracy": (">=", 0.95),
}


class BenchmarkError(RuntimeError):
    """A step that cannot go on; the message says which and why."""


# --------------------------------------------------------------------------- small helpers
def _repo_path(p: str | Path) -> Path:
    p = Path(p).expanduser()
    return (p if p.is_absolute() else ROOT / p).resolve()


def _log(msg: str) -> None:
    print(f"[mixed-benchmark {dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[str], what: str, ok_codes: tuple[int, ...] = (0,)) -> tuple[int, float]:
    """Run a project command line from the repository root, output streamed; raise on failure."""
    shown = " ".join(shlex.quote(str(c)) for c in cmd)
    _log(f"{what}: {shown}")
    t0 = time.time()
    rc = subprocess.run([str(c) for c in cmd], cwd=ROOT).returncode
    seconds = time.time() - t0
    if rc not in ok_codes:
        raise BenchmarkError(f"{what} failed (exit status {rc}) after {seconds:.1f} s: {shown}")
    _log(f"{what}: done in {seconds:.1f} s" + (f" (exit status {rc})" if rc else ""))
    return rc, seconds


def write_subset(manifest: pd.DataFrame, vertebrae: pd.DataFrame | None, out_dir: Path) -> dict:
    """Write ``manifest.csv`` (columns kept) + ``vertebrae.csv`` (the rows of those images) under
    ``out_dir``. Both tables must carry absolute image paths. Returns counts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = manifest.reset_index(drop=True)
    atomic_write_text(out_dir / "manifest.csv", manifest.to_csv(index=False))
    info = {"manifest": str(out_dir / "manifest.csv"), "n_images": int(len(manifest)),
            "n_patients": int(manifest["patient_id"].nunique())}
    if "fracture" in manifest.columns:
        info["n_fractured"] = int((manifest["fracture"] == "1").sum())
        info["n_normal"] = int((manifest["fracture"] == "0").sum())
    if vertebrae is not None:
        keys = {path_key(p) for p in manifest["image"]}
        sub = vertebrae[vertebrae["image"].map(path_key).isin(keys)].reset_index(drop=True)
        atomic_write_text(out_dir / "vertebrae.csv", sub.to_csv(index=False))
        with_rows = {path_key(p) for p in sub["image"]}
        info.update(vertebrae=str(out_dir / "vertebrae.csv"), n_vertebrae=int(len(sub)),
                    n_images_without_vertebrae=int(sum(1 for k in keys if k not in with_rows)))
        if "genant_grade" in sub.columns:
            info["n_fractured_vertebrae"] = int(pd.to_numeric(sub["genant_grade"], errors="coerce").gt(0).sum())
    return info


def load_dataset(manifest_path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """A manifest and the ``vertebrae.csv`` beside it (if any), as text, with absolute paths."""
    man = read_text_table(manifest_path)
    base = manifest_path.resolve().parent
    man["image"] = [absolute_path(p, base) if str(p).strip() else p for p in man["image"]]
    if "mask" in man.columns:
        man["mask"] = [absolute_path(p, base) if str(p).strip() else p for p in man["mask"]]
    vpath = manifest_path.parent / "vertebrae.csv"
    vert = None
    if vpath.is_file():
        vert = read_text_table(vpath)
        vert["image"] = [absolute_path(p, base) if str(p).strip() else p for p in vert["image"]]
    return man, vert


# --------------------------------------------------------------------------- checkpoint
def find_run_config(checkpoint: Path) -> Path | None:
    """The training run's resolved config: ``config.yaml`` beside the checkpoint, else the newest
    ``<dir>/logs/version_N/config.yaml`` (LightningCLI's copy) written before the checkpoint."""
    beside = checkpoint.parent / "config.yaml"
    if beside.is_file():
        return beside
    mtime = checkpoint.stat().st_mtime
    found = [p for p in checkpoint.parent.glob("*/version_*/config.yaml") if p.stat().st_mtime <= mtime + 1]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def checkpoint_info(checkpoint: Path) -> dict:
    import torch
    import yaml

    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)

    def plain(d):
        return {k: v for k, v in (d or {}).items() if not str(k).startswith("_")}

    info = {"path": str(checkpoint), "sha256": file_sha256(checkpoint), "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"), "vcf_model": plain(ckpt.get("vcf_model")),
            "hyper_parameters": plain(ckpt.get("hyper_parameters")),
            "datamodule_hyper_parameters": plain(ckpt.get("datamodule_hyper_parameters")),
            "calibrated": "vcf_calibration" in ckpt}
    for cb in (ckpt.get("callbacks") or {}).values():
        if isinstance(cb, dict) and "best_model_score" in cb:
            score = cb["best_model_score"]
            info["best_model_score"] = float(score) if score is not None else None
            info["monitor"] = cb.get("monitor")
    cfg_path = find_run_config(checkpoint)
    info["run_config"] = str(cfg_path) if cfg_path else None
    if cfg_path:
        try:
            cfg = yaml.safe_load(cfg_path.read_text()) or {}
            info["max_epochs"] = (cfg.get("trainer") or {}).get("max_epochs")
            info["config_manifest"] = (cfg.get("data") or {}).get("manifest")
            info["precision"] = (cfg.get("trainer") or {}).get("precision")
        except (OSError, yaml.YAMLError) as exc:
            info["run_config_error"] = f"{type(exc).__name__}: {exc}"
    return info


def stored_calibration(path: Path) -> dict | None:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True).get("vcf_calibration")
    except Exception:  # a half-written or foreign file: calibrate again
        return None


# --------------------------------------------------------------------------- steps
def calibration_manifest(mix_manifest: Path, ckpt: dict, limit: int | None, out: Path) -> Path:
    """The manifest given to the calibration: runs/mix/manifest.csv itself, or with ``limit``
    a subset holding the first ``limit`` fractured and ``limit`` normal films of the validation
    split (the split is a hash of the patient id, so the subset's split is the same), with their
    ``vertebrae.csv`` beside it (the calibration fits its per-vertebra combination from it)."""
    if limit is None:
        return mix_manifest

    man, vert = load_dataset(mix_manifest)
    hp = ckpt.get("datamodule_hyper_parameters") or {}
    val_fraction = float(hp.get("val_fraction", 0.15)) if not hp.get("val_manifest") else 0.0
    splits = assign_splits(man, val_fraction=val_fraction, seed=int(hp.get("split_seed", 0) or 0))
    val = man[splits.to_numpy() == "val"]
    keep = pd.concat([val[val["fracture"] == "1"].head(limit), val[val["fracture"] == "0"].head(limit)]).sort_index()
    info = write_subset(keep, vert, out / "calibration_subset")
    _log(f"--limit {limit}: calibrating on {len(keep)} validation films ({info['manifest']})")
    return Path(info["manifest"])


def calibrate(args, checkpoint: Path, ckpt_info: dict, mix_manifest: Path, out: Path) -> tuple[Path, dict]:
    cal_ckpt = out / "calibrated.ckpt"
    manifest = calibration_manifest(mix_manifest, ckpt_info, args.limit, out)
    stored = stored_calibration(cal_ckpt) if cal_ckpt.is_file() else None
    seconds = None
    if args.reuse and stored and stored.get("source_checkpoint_sha256") == ckpt_info["sha256"] \
            and stored.get("fitted_on") == str(manifest.resolve()) and stored.get("split") == "val":
        _log(f"step 1: reusing {cal_ckpt} (calibration of this checkpoint on {manifest})")
    else:
        if args.reuse and cal_ckpt.is_file():
            _log(f"step 1: {cal_ckpt} is of another checkpoint or manifest: calibrating again")
        _, seconds = _run([sys.executable, "-m", "calibration.fit", "--checkpoint", checkpoint,
                           "--manifest", manifest, "--split", "val", "--out", cal_ckpt,
                           "--batch-size", args.batch_size, "--device", args.device,
                           "--num-workers", args.num_workers], "step 1: calibrate")
        stored = stored_calibration(cal_ckpt)
        if not stored:
            raise BenchmarkError(f"{cal_ckpt}: no calibration stored after calibration.fit")
    info = {"checkpoint": str(cal_ckpt), "manifest": str(manifest), "seconds": seconds,
            **{k: stored.get(k) for k in ("method", "temperature", "platt", "default", "fitted_heads", "split", "n_images",
                                          "n_pos", "n_neg", "n_acute_pos", "n_acute_neg", "n_unreadable",
                                          "metrics", "vertebra_combiner")}}
    info["operating_points"] = stored.get("operating_points")
    return cal_ckpt, info


def infer_and_evaluate(args, name: str, cal_ckpt: Path, manifest: Path, vertebrae: Path, out: Path,
                       cal_sha: str) -> dict:
    """``infer.py`` then ``evaluate.py`` on one test set; returns the report's metrics.json."""
    infer_dir, report_dir = out / f"infer_{name}", out / f"report_{name}"
    stamp = {"checkpoint_sha256": cal_sha,
             "inputs": sorted(read_text_table(manifest)["image"].tolist())}
    stamp_path = infer_dir / "benchmark_inputs.json"
    seconds = None
    previous = json.loads(stamp_path.read_text()) if stamp_path.is_file() else {}
    if args.reuse and {k: previous.get(k) for k in stamp} == stamp and (infer_dir / "predictions.csv").is_file():
        seconds = previous.get("seconds")
        _log(f"{name}: reusing the inference outputs in {infer_dir}")
    else:
        shutil.rmtree(infer_dir, ignore_errors=True)  # no stale per-image JSON may reach the report
        cmd = [sys.executable, "infer.py", "--checkpoint", cal_ckpt, "--out", infer_dir,
               "--batch-size", args.batch_size, "--num-workers", args.num_workers, "--device", args.device]
        if not sys.stderr.isatty():
            cmd.append("--quiet")
        rc, seconds = _run(cmd + [manifest], f"{name}: infer", ok_codes=(0, 1))
        if rc == 1:
            _log(f"{name}: some films failed in inference; see {infer_dir / 'errors.csv'} (counted in the report)")
        atomic_write_text(stamp_path, json.dumps({**stamp, "seconds": seconds}))
    shutil.rmtree(report_dir, ignore_errors=True)
    _, eval_seconds = _run([sys.executable, "evaluate.py", "--predictions", infer_dir / "predictions.csv",
                            "--manifest", manifest, "--vertebrae", vertebrae, "--out", report_dir],
                           f"{name}: evaluate")
    metrics = json.loads((report_dir / "metrics.json").read_text())
    n = metrics.get("counts", {}).get("n_joined") or metrics.get("bootstrap", {}).get("n_images")
    return {"metrics": metrics, "infer_dir": str(infer_dir), "report_dir": str(report_dir),
            "infer_seconds": seconds, "evaluate_seconds": eval_seconds,
            "infer_seconds_per_image": (seconds / n) if seconds and n else None}


def grade_group_auroc(predictions: Path, manifest: Path, vertebrae: Path, grades=(2, 3)) -> dict:
    """Image-level AUROC of ``p_fracture``: images whose worst vertebra has a grade in ``grades``
    against images labelled normal (as the report's ``by_grade``), with a patient-bootstrap 95% CI
    (evaluation.bootstrap; evaluate.py's resamples: 1000, seed 0)."""
    df = M.join_predictions(predictions, manifest)
    vert = load_vertebrae_table(vertebrae, manifest)
    grade = M.grade_of_images(df, M.image_max_grade(vert))
    has = df["p_fracture"].notna().to_numpy()
    pos = has & grade.isin([float(g) for g in grades]).to_numpy()
    neg = has & (df["fracture"] == 0).to_numpy() & ~(grade > 0).to_numpy()
    sel = pos | neg
    out = {"grades": list(grades), "n_pos": int(pos.sum()), "n_neg": int(neg.sum()),
           "bootstrap": {"unit": "patient", "n_boot": N_BOOT, "seed": BOOT_SEED}}
    if not pos.any() or not neg.any():
        return {**out, "auroc": None, "ci_low": None, "ci_high": None, "n_valid": 0,
                "note": "n/a: needs both fractured (grade in the group) and normal images"}
    W = B.patient_bootstrap_weights(df["patient_id"].astype(str).tolist(), N_BOOT, BOOT_SEED)
    y, s = pos[sel].astype(float), df["p_fracture"].to_numpy(float)[sel]
    point = float(B.weighted_auroc(y, s, np.ones((1, y.size)))[0])
    summary = B.summarise_draws(point, B.weighted_auroc(y, s, W[:, sel]))
    return {**out, "auroc": summary["value"], "ci_low": summary["ci_low"], "ci_high": summary["ci_high"],
            "n_valid": summary["n_valid"]}


def held_out_aasce(args, aasce: Path, test_rows: pd.DataFrame, out: Path) -> tuple[Path, dict]:
    """Step 3's data: the AASCE films (data.landmarks) of the patients held out in step 2, and
    the check that the two modules name patients alike."""
    all_dir = out / "aasce_all"
    seconds = None
    if args.reuse and (all_dir / "manifest.csv").is_file() and (all_dir / "vertebrae.csv").is_file():
        _log(f"step 3: reusing {all_dir}")
    else:
        _, seconds = _run([sys.executable, "-m", "data.landmarks", "--aasce", aasce, "--out", all_dir],
                          "step 3: AASCE landmarks -> manifest")
    films, vert = load_dataset(all_dir / "manifest.csv")
    excluded = read_text_table(all_dir / "excluded.csv") if (all_dir / "excluded.csv").is_file() else None

    # Do data.simulate (via runs/mix) and data.landmarks give a film the same patient id?
    held = set(test_rows["patient_id"])
    by_film = {path_key(p): pid for p, pid in zip(films["image"], films["patient_id"])}
    excluded_keys = {path_key(p) for p in excluded["image"]} if excluded is not None and len(excluded) else set()
    mismatched, not_listed = [], []
    if "source_image" in test_rows.columns:
        for src, pid in zip(test_rows["source_image"], test_rows["patient_id"]):
            if not src:
                continue
            k = path_key(src)
            if k not in by_film:
                not_listed.append({"source_image": src, "excluded_by_landmarks": k in excluded_keys})
            elif by_film[k] != pid:
                mismatched.append({"source_image": src, "simulate": pid, "landmarks": by_film[k]})

    rename = [{"source_image": s, "simulate": p, "patient_from_name": patient_from_name(Path(s).name)}
              for s, p in zip(test_rows.get("source_image", []), test_rows["patient_id"])
              if s and patient_from_name(Path(s).name) != p]
    sub = films[films["patient_id"].isin(held)]
    missing_patients = sorted(held - set(sub["patient_id"]))
    sources = {path_key(s) for s in test_rows.get("source_image", []) if s}
    not_sources = [p for p in sub["image"] if sources and path_key(p) not in sources]
    check = {
        "agree": not mismatched and not rename and not missing_patients,
        "n_held_out_patients": len(held),
        "n_held_out_patients_without_aasce_film": len(missing_patients),
        "held_out_patients_without_aasce_film": missing_patients[:20],
        "n_source_films_with_other_patient_id": len(mismatched), "examples_other_patient_id": mismatched[:5],
        "n_simulated_ids_not_patient_from_name": len(rename), "examples_not_patient_from_name": rename[:5],
        "n_source_films_not_in_landmarks_manifest": len(not_listed), "examples_not_listed": not_listed[:5],
        "n_held_out_films_not_a_simulation_source": len(not_sources),
        "rule": "data.simulate keeps the patient_id of data.landmarks.read_aasce (patient_from_name: the part of "
                "the file name before ' A '/' B '/...); data.landmarks writes the same",
    }
    if check["agree"]:
        _log(f"step 3: patient ids agree ({len(held)} held-out patients, {len(sub)} real films)")
    else:
        _log("step 3: WARNING: patient ids of data.simulate and data.landmarks do not agree: "
             + json.dumps({k: v for k, v in check.items() if k.startswith("n_")}))
    if args.limit is not None:
        sub = sub.head(args.limit)
    info = write_subset(sub, vert, out / "aasce_test")
    info.update(landmarks_seconds=seconds, n_aasce_films=int(len(films)), n_aasce_patients=int(films["patient_id"].nunique()),
                n_aasce_excluded=int(len(excluded)) if excluded is not None else None, patient_id_check=check)
    return out / "aasce_test" / "manifest.csv", info


# --------------------------------------------------------------------------- numbers
def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _ci(d: dict | None, key: str) -> dict:
    d = d or {}
    return {"value": d.get(key), "ci_low": d.get("ci_low"), "ci_high": d.get("ci_high"),
            "n_pos": d.get("n_pos"), "n_neg": d.get("n_neg")}


def summarise(sim: dict, grade23: dict, aasce: dict, phantom: dict) -> dict:
    sm, am, pm = sim["metrics"], aasce["metrics"], phantom["metrics"]
    sv, av, pv = sm.get("vertebrae") or {}, am.get("vertebrae") or {}, pm.get("vertebrae") or {}
    by_grade = sm.get("by_grade") or {}
    cal = sm.get("calibration") or {}
    return {
        "simulated_real": {
            "auroc_fracture": _ci(_get(sm, "roc", "fracture"), "auroc"),
            "auroc_by_grade": {g: _ci(by_grade.get(g), "auroc") for g in ("1", "2", "3")},
            "auroc_grade_2_3": {"value": grade23.get("auroc"), **{k: grade23.get(k) for k in
                                                                  ("ci_low", "ci_high", "n_pos", "n_neg")}},
            "auroc_acute": _ci(_get(sm, "roc", "acute"), "auroc"),
            "auroc_acute_given_fracture": _ci(_get(sm, "roc", "acute_given_fracture"), "auroc"),
            "ece_p_fracture": {**(_get(cal, "p_fracture", "ece") or {}), "n": _get(cal, "p_fracture", "n"),
                               "key": "calibration.p_fracture.ece.ece"},
            "ece_p_fracture_uncalibrated": {**(_get(cal, "p_fracture_uncalibrated", "ece") or {}),
                                            "key": "calibration.p_fracture_uncalibrated.ece.ece"},
            "brier_p_fracture": _get(cal, "p_fracture", "brier"),
            "vertebra_auroc_fracture": sv.get("auroc_fracture"),
            "vertebra_auroc_acute": sv.get("auroc_acute"),
            "vertebra_detection_recall": _get(sv, "detection", "recall"),
            "vertebra_level_accuracy": _get(sv, "level_accuracy", "accuracy"),
            "vertebrae_note": None if sv.get("available") else sv.get("note", "no per-vertebra section"),
        },
        "aasce_real": {
            "detection": av.get("detection"),
            "point_error_px": _get(av, "point_error", "pixels"),
            "point_error_percent_height": _get(av, "point_error", "percent_height"),
            "level_accuracy": av.get("level_accuracy"),
            "counts": av.get("counts"),
            "vertebrae_note": None if av.get("available") else av.get("note", "no per-vertebra section"),
        },
        "phantom": {
            "vertebra_auroc_fracture": pv.get("auroc_fracture"),
            "vertebra_auroc_acute": pv.get("auroc_acute"),
            "kappa_quadratic": _get(pv, "grade_agreement", "kappa_quadratic"),
            "grade_exact_agreement": _get(pv, "grade_agreement", "exact_agreement"),
            "level_accuracy": pv.get("level_accuracy"),
            "detection": pv.get("detection"),
            "auroc_fracture": _ci(_get(pm, "roc", "fracture"), "auroc"),
            "auroc_acute": _ci(_get(pm, "roc", "acute"), "auroc"),
            "vertebrae_note": None if pv.get("available") else pv.get("note", "no per-vertebra section"),
        },
    }


def _num(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _met(value, target_key: str) -> str:
    v = _num(value)
    if v is None:
        return "n/a"
    op, t = TARGETS[target_key]
    return "yes" if (v >= t if op == ">=" else v <= t) else "no"


def _f(x, digits: int = 3) -> str:
    v = _num(x)
    return "n/a" if v is None else f"{v:.{digits}f}"


def _fci(d: dict | None, digits: int = 3) -> str:
    d = d or {}
    text = _f(d.get("value"), digits)
    if _num(d.get("ci_low")) is not None and _num(d.get("ci_high")) is not None:
        text += f" [{_f(d['ci_low'], digits)}, {_f(d['ci_high'], digits)}]"
    return text


def _pn(d: dict | None) -> str:
    d = d or {}
    return f"{d.get('n_pos', 'n/a')} / {d.get('n_neg', 'n/a')}"


def _target(key: str, unit: str = "") -> str:
    op, t = TARGETS[key]
    return f"{op} {t:g}{unit}"


def results_section(r: dict, section: str = SECTION) -> str:
    s = r["summary"]
    sim, aa, ph = s["simulated_real"], s["aasce_real"], s["phantom"]
    ck, cal, ts = r["checkpoint"], r["calibration"], r["test_sets"]
    vm = ck.get("vcf_model") or {}
    hp = ck.get("hyper_parameters") or {}
    dm = ck.get("datamodule_hyper_parameters") or {}
    lines = [section, ""]
    if r.get("limit") is not None:
        lines += [f"**Trial run (`--limit {r['limit']}`): a handful of films per test set; these numbers mean "
                  "nothing.**", ""]
    lines += [
        "The fractures of the simulated-real test set are *simulated* (data/simulate.py) on real AASCE AP films of",
        "adolescents with scoliosis, and the phantom films are *synthetic* (data/phantom.py). The real AASCE films",
        "carry no fracture, so on them only localisation is measured. None of these numbers is clinical",
        "performance.", "",
        f"- command: `{r['command']}`",
        f"- date: {r['date']}",
        f"- machine: {r['machine']}",
        f"- checkpoint: `{_rel(ck['path'])}` (sha256 {ck['sha256'][:16]}), epoch {ck.get('epoch')}, "
        f"global step {ck.get('global_step')}"
        + (f", best {ck.get('monitor')} {_f(ck.get('best_model_score'))}" if ck.get("monitor") else ""),
        f"- model (`vcf_model`): {vm.get('architecture')}, backbone {vm.get('backbone')}, fpn_dim {vm.get('fpn_dim')}, "
        f"input {vm.get('image_size')}, heatmap stride {vm.get('heatmap_stride')}, vertebra channels "
        f"{vm.get('vertebra_channels')}, crop backbone {vm.get('crop_backbone')} ({vm.get('crop_size')} px), "
        f"code {vm.get('code_version')}, torch {vm.get('torch_version')}",
        "- training: " + ", ".join(f"{k} {hp[k]}" for k in ("lr", "weight_decay", "dropout", "warmup_fraction",
                                                             "acute_weight", "heatmap_weight", "vertebra_weight",
                                                             "init_from", "pretrained") if k in hp)
        + f"; data {dm.get('manifest')}, batch {dm.get('batch_size')}, val_fraction {dm.get('val_fraction')}, "
        f"augment {dm.get('augment')}; trainer max_epochs "
        + (f"{ck.get('max_epochs')} (`{_rel(ck['run_config'])}`)" if ck.get("run_config") else
           "unknown (no run config.yaml found beside the checkpoint)"),
        f"- calibration: {cal.get('method')} ("
        + ", ".join([f"{h} T={_f(t, 3)}" for h, t in (cal.get("temperature") or {}).items()]
                    + [f"{h} {platt_formula(ab)}" for h, ab in (cal.get("platt") or {}).items()])
        + f") on the validation split of `{_rel(cal['manifest'])}`: {cal.get('n_images')} films "
        f"({cal.get('n_pos')} fractured, {cal.get('n_neg')} normal); default operating point {cal.get('default')}; "
        + _combiner_text(cal.get("vertebra_combiner")),
        f"- simulated-real held-out test: {ts['simulated_real']['n_images']} films of "
        f"{ts['simulated_real']['n_patients']} patients ({ts['simulated_real'].get('n_fractured')} with simulated "
        f"fractures, {ts['simulated_real'].get('n_fractured_vertebrae')} fractured vertebrae): the `split = test` rows "
        f"of `{_rel(r['mix_manifest'])}`",
        f"- real held-out AASCE films: {ts['aasce_real']['n_images']} films of {ts['aasce_real']['n_patients']} "
        f"patients (the same held-out patients; {ts['aasce_real'].get('n_vertebrae')} vertebrae), patient ids "
        + ("checked: data.simulate and data.landmarks agree" if ts["aasce_real"]["patient_id_check"]["agree"]
           else "**do not agree between data.simulate and data.landmarks** (see mixed_result.json)"),
        f"- phantom test: {ts['phantom']['n_images']} films of {ts['phantom']['n_patients']} patients "
        f"(seed {PHANTOM_TEST['seed']}, never used in training; {ts['phantom'].get('n_fractured')} fractured)",
        "",
        "### Simulated-real held-out test (fractures simulated on real films of held-out patients)", "",
        "95% intervals: patient bootstrap (1000 resamples). Image-level AUROCs use `p_fracture` after calibration.", "",
        "| metric | value | positives / negatives | target | met |", "|---|---|---|---|---|",
        f"| image-level fracture AUROC [95% CI] | {_fci(sim['auroc_fracture'])} | {_pn(sim['auroc_fracture'])} | | |",
    ]
    for g in ("1", "2", "3"):
        d = sim["auroc_by_grade"][g]
        lines.append(f"| image-level AUROC, worst grade {g} vs normal | {_fci(d)} | {_pn(d)} | | |")
    g23 = sim["auroc_grade_2_3"]
    lines += [
        f"| **image-level AUROC, worst grade 2-3 vs normal** | {_fci(g23)} | {_pn(g23)} | "
        f"{_target('sim_auroc_grade23')} | {_met(g23.get('value'), 'sim_auroc_grade23')} |",
        f"| acute vs chronic AUROC (fractured films, p_acute) | {_fci(sim['auroc_acute'])} | "
        f"{_pn(sim['auroc_acute'])} | | |",
        f"| acute vs chronic AUROC (fractured films, p_acute_given_fracture) | "
        f"{_fci(sim['auroc_acute_given_fracture'])} | {_pn(sim['auroc_acute_given_fracture'])} | | |",
        f"| **ECE of p_fracture after calibration** [95% CI] | {_fci(_ece(sim['ece_p_fracture']))} | "
        f"n = {sim['ece_p_fracture'].get('n')} | {_target('sim_ece')} | "
        f"{_met(sim['ece_p_fracture'].get('ece'), 'sim_ece')} |",
        f"| ECE of p_fracture before calibration | {_fci(_ece(sim['ece_p_fracture_uncalibrated']))} | | | |",
        f"| per-vertebra fracture AUROC (p_fracture; unmatched vertebrae score 0) | "
        f"{_f(_get(sim, 'vertebra_auroc_fracture', 'auroc'))} | {_pn(sim['vertebra_auroc_fracture'])} | | |",
        f"| per-vertebra acute vs chronic AUROC (fractured vertebrae) | "
        f"{_f(_get(sim, 'vertebra_auroc_acute', 'auroc'))} | {_pn(sim['vertebra_auroc_acute'])} | | |",
        "",
        "### Real held-out AASCE films (no fractures: localisation only)", "",
        "| metric | value | counts | target | met |", "|---|---|---|---|---|",
    ]
    det = aa.get("detection") or {}
    px, pct, la = aa.get("point_error_px") or {}, aa.get("point_error_percent_height") or {}, aa.get("level_accuracy") or {}
    lines += [
        f"| **vertebrae found (detection recall)** | {_f(det.get('recall'))} | {det.get('n_matched')} / "
        f"{det.get('n_truth')} | {_target('aasce_recall')} | {_met(det.get('recall'), 'aasce_recall')} |",
        f"| detection precision | {_f(det.get('precision'))} | {det.get('n_matched')} / {det.get('n_predicted')} "
        f"({det.get('n_false_positive')} false positives) | | |",
        f"| point error, median (90th percentile), px | {_f(px.get('median'), 1)} ({_f(px.get('p90'), 1)}) | "
        f"original film pixels | | |",
        f"| **point error, median (90th percentile), % of vertebral height** | {_f(pct.get('median'), 1)} "
        f"({_f(pct.get('p90'), 1)}) | | {_target('aasce_median_pct', ' %')} (median) | "
        f"{_met(pct.get('median'), 'aasce_median_pct')} |",
        f"| level accuracy (matched vertebrae) | {_f(la.get('accuracy'))} | {la.get('n_correct')} / {la.get('n')} | | |",
        "",
        f"### Phantom test ({ts['phantom']['n_images']} films of seed {PHANTOM_TEST['seed']})", "",
        "| metric | value | positives / negatives | target | met |", "|---|---|---|---|---|",
    ]
    vf, va, pla = ph.get("vertebra_auroc_fracture") or {}, ph.get("vertebra_auroc_acute") or {}, ph.get("level_accuracy") or {}
    lines += [
        f"| **per-vertebra fracture AUROC** | {_f(vf.get('auroc'))} | {_pn(vf)} | "
        f"{_target('phantom_vertebra_auroc')} | {_met(vf.get('auroc'), 'phantom_vertebra_auroc')} |",
        f"| per-vertebra acute vs chronic AUROC (fractured vertebrae) | {_f(va.get('auroc'))} | {_pn(va)} | | |",
        f"| **Genant grade, quadratic-weighted kappa** | {_f(ph.get('kappa_quadratic'))} | | "
        f"{_target('phantom_kappa')} | {_met(ph.get('kappa_quadratic'), 'phantom_kappa')} |",
        f"| **level accuracy** | {_f(pla.get('accuracy'))} | {pla.get('n_correct')} / {pla.get('n')} | "
        f"{_target('phantom_level_accuracy')} | {_met(pla.get('accuracy'), 'phantom_level_accuracy')} |",
        f"| image-level fracture AUROC [95% CI] | {_fci(ph['auroc_fracture'])} | {_pn(ph['auroc_fracture'])} | | |",
        f"| image-level acute vs chronic AUROC [95% CI] | {_fci(ph['auroc_acute'])} | {_pn(ph['auroc_acute'])} | | |",
        "",
    ]
    secs = r.get("timings") or {}
    spi = [f"{k} {_f(v, 3)} s" for k, v in (secs.get("infer_seconds_per_image") or {}).items() if _num(v) is not None]
    if spi:
        lines += ["Inference seconds per film (the whole `infer.py` run, start-up and model loading included, "
                  "divided by the films): " + ", ".join(spi) + ".", ""]
    notes = [n for n in (sim.get("vertebrae_note"), aa.get("vertebrae_note"), ph.get("vertebrae_note")) if n]
    if notes:
        lines += ["Per-vertebra sections missing: " + "; ".join(notes) + ".", ""]
    lines += [f"All numbers: `{_rel(r['result_json'])}`; reports: `report_*/report.html` beside it.", ""]
    return "\n".join(lines)


def _combiner_text(comb: dict | None) -> str:
    if not isinstance(comb, dict) or not comb.get("coef"):
        return "per-vertebra p_fracture: the crop network's (no morphometry combination fitted)"
    return (f"per-vertebra p_fracture combined with the measured height loss on {comb.get('n_vertebrae')} vertebrae "
            f"({comb.get('n_fractured')} fractured; validation AUROC {_f(comb.get('auroc_crop_only'))} -> "
            f"{_f(comb.get('auroc_combined'))})")


def _ece(d: dict | None) -> dict:
    d = d or {}
    return {"value": d.get("ece"), "ci_low": d.get("ci_low"), "ci_high": d.get("ci_high")}


def _rel(p) -> str:
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except (ValueError, TypeError):
        return str(p)


def write_results(r: dict, section: str = SECTION) -> None:
    replace_section(results_section(r, section))


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Relative paths are taken from the repository root.")
    p.add_argument("--checkpoint", default="runs/mix/best.ckpt", help="trained (uncalibrated) checkpoint")
    p.add_argument("--manifest", default="runs/mix/manifest.csv",
                   help="the combined training manifest (make mixed-data); its split = test rows are the "
                        "simulated-real test set, its validation split calibrates")
    p.add_argument("--aasce", default="../shared/data/aasce", help="AASCE folder (filenames.csv, landmarks.csv, images/)")
    p.add_argument("--phantom-test", default="benchmarks/out/phantom/data/test",
                   help="phantom test folder (400 films of seed 1000, generated if absent)")
    p.add_argument("--out", default="benchmarks/out/mixed")
    p.add_argument("--limit", type=int, default=None, help="only the first N films of each test set (trials)")
    p.add_argument("--reuse", action="store_true",
                   help="reuse OUT/calibrated.ckpt (when it calibrates this checkpoint on this manifest), the "
                        "AASCE manifest and inference outputs of the same inputs")
    p.add_argument("--no-results", action="store_true", help="do not touch benchmarks/RESULTS.md")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-workers", type=int, default=2, help="data-loader workers of infer.py and the calibration")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--section", default=SECTION, help="RESULTS.md heading to write or replace")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be >= 1")
    command = "python -m benchmarks.mixed_benchmark " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    t_start = time.time()
    checkpoint, mix_manifest = _repo_path(args.checkpoint), _repo_path(args.manifest)
    aasce, out = _repo_path(args.aasce), _repo_path(args.out)
    phantom_dir = _repo_path(args.phantom_test)
    for path, what in ((checkpoint, "checkpoint (train it: python train.py fit --config "
                                    "configs/phantom_plus_simulated.yaml)"),
                       (mix_manifest, "manifest (build it: make mixed-data)")):
        if not path.is_file():
            raise SystemExit(f"error: {path}: {what} not found")
    if not aasce.is_dir() or not all((aasce / f).exists() for f in ("filenames.csv", "landmarks.csv", "images")):
        raise SystemExit(f"error: {aasce}: not an AASCE folder (expected filenames.csv, landmarks.csv and images/; "
                         "the real films are not part of this repository: pass --aasce DIR)")
    out.mkdir(parents=True, exist_ok=True)

    try:
        _log(f"checkpoint {checkpoint}")
        ck = checkpoint_info(checkpoint)
        if ck["calibrated"]:
            _log("note: the checkpoint already holds a calibration; step 1 refits it")

        # 1. calibration
        cal_ckpt, cal = calibrate(args, checkpoint, ck, mix_manifest, out)

        cal_sha = file_sha256(cal_ckpt)

        # 2. simulated-real held-out test
        mix, mix_vert = load_dataset(mix_manifest)
        if "split" not in mix.columns or not (mix["split"] == "test").any():
            raise BenchmarkError(f"{mix_manifest}: no `split = test` rows (build it with make mixed-data)")
        if mix_vert is None:
            raise BenchmarkError(f"{mix_manifest.parent / 'vertebrae.csv'}: not found")
        test_all = mix[mix["split"] == "test"]
        train_patients = set(mix.loc[mix["split"] != "test", "patient_id"])
        leaked = sorted(set(test_all["patient_id"]) & train_patients)
        if leaked:
            raise BenchmarkError(f"{mix_manifest}: {len(leaked)} test patient(s) also outside the test split, "
                                 f"e.g. {leaked[:3]}")
        test_rows = test_all.head(args.limit) if args.limit is not None else test_all
        sim_info = write_subset(test_rows, mix_vert, out / "sim_test")
        _log(f"step 2: simulated-real test set: {sim_info['n_images']} films of {sim_info['n_patients']} patients "
             f"({sim_info.get('n_fractured')} fractured)")
        sim_manifest = out / "sim_test" / "manifest.csv"
        sim = infer_and_evaluate(args, "sim_test", cal_ckpt, sim_manifest, out / "sim_test" / "vertebrae.csv", out,
                                 cal_sha)
        grade23 = grade_group_auroc(Path(sim["infer_dir"]) / "predictions.csv", sim_manifest,
                                    out / "sim_test" / "vertebrae.csv")

        # 3. real held-out AASCE films (the held-out patients of all test rows, then --limit)
        aasce_manifest, aasce_info = held_out_aasce(args, aasce, test_all, out)
        _log(f"step 3: real held-out AASCE films: {aasce_info['n_images']} films of {aasce_info['n_patients']} patients")
        real = infer_and_evaluate(args, "aasce_test", cal_ckpt, aasce_manifest, out / "aasce_test" / "vertebrae.csv",
                                  out, cal_sha)

        # 4. phantom films of an unseen seed
        if not (phantom_dir / "manifest.csv").is_file():
            _log(f"step 4: generating {PHANTOM_TEST['n']} phantom films of seed {PHANTOM_TEST['seed']} in {phantom_dir}")
        ph_manifest = ensure_data(phantom_dir, PHANTOM_TEST["n"], PHANTOM_TEST["seed"], PHANTOM_TEST["size"])
        ph_all, ph_vert = load_dataset(ph_manifest)
        ph_rows = ph_all.head(args.limit) if args.limit is not None else ph_all
        ph_info = write_subset(ph_rows, ph_vert, out / "phantom_test")
        ph_info["source"] = str(ph_manifest)
        phantom = infer_and_evaluate(args, "phantom_test", cal_ckpt, out / "phantom_test" / "manifest.csv",
                                     out / "phantom_test" / "vertebrae.csv", out, cal_sha)
    except BenchmarkError as exc:
        raise SystemExit(f"error: {exc}") from None

    # 5. results
    result = {
        "command": command,
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "limit": args.limit,
        "note": "Fractures simulated on real films (data/simulate.py) and synthetic phantom films: not clinical "
                "performance. The real AASCE films have no fracture: localisation only.",
        "checkpoint": ck,
        "calibration": cal,
        "mix_manifest": str(mix_manifest),
        "aasce": str(aasce),
        "test_sets": {"simulated_real": sim_info, "aasce_real": aasce_info, "phantom": ph_info},
        "image_auroc_grade_2_3": grade23,
        "summary": summarise(sim, grade23, real, phantom),
        "reports": {"simulated_real": sim["report_dir"], "aasce_real": real["report_dir"],
                    "phantom": phantom["report_dir"]},
        "timings": {"calibration_seconds": cal.get("seconds"),
                    "infer_seconds": {"simulated_real": sim["infer_seconds"], "aasce_real": real["infer_seconds"],
                                      "phantom": phantom["infer_seconds"]},
                    "infer_seconds_per_image": {"simulated_real": sim["infer_seconds_per_image"],
                                                "aasce_real": real["infer_seconds_per_image"],
                                                "phantom": phantom["infer_seconds_per_image"]},
                    "total_seconds": round(time.time() - t_start, 1)},
        "result_json": str(out / "mixed_result.json"),
    }
    result["summary"]["targets"] = {k: {"target": f"{op} {t:g}"} for k, (op, t) in TARGETS.items()}
    s = result["summary"]
    for key, value in (("sim_auroc_grade23", s["simulated_real"]["auroc_grade_2_3"].get("value")),
                       ("sim_ece", s["simulated_real"]["ece_p_fracture"].get("ece")),
                       ("aasce_recall", _get(s, "aasce_real", "detection", "recall")),
                       ("aasce_median_pct", _get(s, "aasce_real", "point_error_percent_height", "median")),
                       ("phantom_vertebra_auroc", _get(s, "phantom", "vertebra_auroc_fracture", "auroc")),
                       ("phantom_kappa", s["phantom"].get("kappa_quadratic")),
                       ("phantom_level_accuracy", _get(s, "phantom", "level_accuracy", "accuracy"))):
        s["targets"][key].update(value=value, met=_met(value, key))
    atomic_write_text(out / "mixed_result.json", json.dumps(M.json_ready(result), indent=2))
    _log(f"wrote {out / 'mixed_result.json'}")
    if args.no_results:
        _log("--no-results: benchmarks/RESULTS.md left as it is")
    else:
        write_results(result, args.section)
        _log(f"wrote the section '{args.section}' of {RESULTS}")
    print(json.dumps(s["targets"], indent=2))
    _log(f"total {time.time() - t_start:.0f} s")
    return result


if __name__ == "__main__":
    main()
