"""Transfer to real anatomy: a model trained on the 3D phantom against one trained on the
retired 2D phantom, with the same config (configs/transfer.yaml) and the same budget
(``--epochs`` over ``--films`` films), read on real films.

    python -m benchmarks.transfer [--arms 3d,2d] [--films 1600] [--epochs 2] [--threads 1]
        [--train-args '--trainer.accelerator gpu ...'] [--aasce ../shared/data/aasce]
        [--verse ../shared/data/verse] [--out runs/transfer] [--stages data,train,evaluate,results]

For each arm (``OUT/<arm>/``):

1. data: ``python -m data.phantom --view both`` (3D) or ``python -m data.phantom2d`` (2D),
   ``--films`` films of seed 1 at 512 px;
2. train: ``train.py fit`` with configs/transfer.yaml, resumed from ``last.ckpt`` when a run
   was cut short; ``--threads`` CPU threads (``OMP_NUM_THREADS``) so that two arms can run side
   by side and still get the same compute each; ``--train-args``: further ``train.py`` options
   after the config's (they win), e.g. the loader and accelerator of a GPU run;
3. evaluate: the last checkpoint exported as a bundle, ``infer.py --min-spine-score 0`` (what
   each model localises, with no film turned away as "no spine") on every AASCE film (real
   AP anatomy, no fractures; their corners are the truth), ``evaluate.py`` on all of them and on
   the films without annotation problems (``data.landmarks``); the same on 40 unseen 3D phantom
   films of seed 2001 (both views: what the arm learned on its own kind of film); then lateral DRRs of the VerSe
   CT facing both ways (``python -m data.drr``) and the smoke check: the six bodies found,
   no detection on the posterior elements, L1 graded as the most collapsed body;
4. results: the section "## Transfer: 3D against 2D phantom" of benchmarks/RESULTS.md and
   ``OUT/transfer_result.json``.

"Found" is evaluate.py's detection recall: a truth body counts as found when a predicted body
centre lies within half its height (one-to-one matching).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from benchmarks.phantom_benchmark import machine
from benchmarks.results_file import replace_section
from data.geometry import as_points, body_centre, table_points
from data.io_utils import atomic_write_text
from data.tables import absolute_path, path_key, read_text_table
from training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Transfer: 3D against 2D phantom"
GENERATORS = {"3d": ["-m", "data.phantom", "--view", "both"], "2d": ["-m", "data.phantom2d"]}
VERSE_GRADES = "level,genant_grade\nT10,0\nT11,0\nT12,0\nL1,3\nL2,0\nL3,1\n"  # the subject's README
TARGET_FOUND = 0.80
PHANTOM_TEST_SEED, PHANTOM_TEST_FILMS = 2001, 40  # unseen 3D phantom films every arm is also read on


def log(msg: str) -> None:
    print(f"[transfer {dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list, what: str, env: dict | None = None, ok_codes: tuple[int, ...] = (0,)) -> float:
    """Run a project command line from the repository root; stop on an exit status not in ``ok_codes``
    (infer.py exits 1 when a film is turned away or fails: its rows say which)."""
    shown = " ".join(shlex.quote(str(c)) for c in cmd)
    log(f"{what}: {shown}")
    t0 = time.time()
    rc = subprocess.run([str(c) for c in cmd], cwd=ROOT, env={**os.environ, **(env or {})}).returncode
    if rc not in ok_codes:
        raise SystemExit(f"error: {what} failed (exit status {rc}): {shown}")
    return time.time() - t0


def arm_config(arm_dir: Path, epochs: int) -> Path:
    """configs/transfer.yaml with this arm's paths and budget."""
    config = yaml.safe_load((ROOT / "configs" / "transfer.yaml").read_text())
    config["trainer"]["max_epochs"] = int(epochs)
    config["trainer"]["default_root_dir"] = str(arm_dir)
    for logger in config["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(arm_dir)
    for callback in config["trainer"]["callbacks"]:
        if "dirpath" in callback.get("init_args", {}):
            callback["init_args"]["dirpath"] = str(arm_dir)
    config["data"]["manifest"] = str(arm_dir / "data" / "manifest.csv")
    path = arm_dir / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    return path


def precision() -> str:
    try:
        return "bf16-mixed" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "32-true"
    except OSError:
        return "32-true"


def stage_data(arm: str, arm_dir: Path, films: int) -> None:
    if (arm_dir / "data" / "manifest.csv").is_file():
        log(f"{arm}: data present")
        return
    run([sys.executable, *GENERATORS[arm], "--out", arm_dir / "data", "--n", films, "--seed", 1, "--size", 512],
        f"{arm}: phantom films")


def stage_train(arm: str, arm_dir: Path, epochs: int, threads: int, train_args: str = "") -> dict:
    config = arm_config(arm_dir, epochs)
    extra = shlex.split(train_args)
    cmd = [sys.executable, "train.py", "fit", "--config", config, "--trainer.precision", precision(), *extra]
    used_precision = next((extra[i + 1] for i in range(len(extra) - 2, -1, -1) if extra[i] == "--trainer.precision"),
                          precision())
    if (arm_dir / "last.ckpt").is_file():
        cmd += ["--ckpt_path", arm_dir / "last.ckpt"]
    before = os.times()
    seconds = run(cmd, f"{arm}: training", env={"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    info = {"wall_seconds_last_leg": round(seconds, 1), "threads": threads, "epochs": epochs, "steps": checkpoint_steps(arm_dir / "last.ckpt"),
            "precision": used_precision, "train_args": train_args,
            "cpu_seconds": round(sum(os.times()[2:4]) - sum(before[2:4]), 1)}
    atomic_write_text(arm_dir / "train_info.json", json.dumps(info, indent=1))
    return info


def checkpoint_steps(path: Path) -> int | None:
    try:
        return int(load_checkpoint(path).get("global_step"))
    except Exception:  # a benchmark note, not a reason to stop
        return None


def aasce_tables(aasce: Path, out: Path) -> dict[str, Path]:
    """Manifests of every AASCE film and of the films without annotation problems."""
    every = out / "aasce_all"
    if not (every / "manifest.csv").is_file():
        run([sys.executable, "-m", "data.landmarks", "--aasce", aasce, "--out", every, "--keep-flagged"],
            "AASCE landmarks, every film")
    clean = out / "aasce_clean"
    if not (clean / "manifest.csv").is_file():
        run([sys.executable, "-m", "data.landmarks", "--aasce", aasce, "--out", clean], "AASCE landmarks, clean films")
    return {"all": every / "manifest.csv", "clean": clean / "manifest.csv"}


def verse_films(verse: Path, out: Path) -> Path:
    drr = out / "verse_drr"
    if not (drr / "manifest.csv").is_file():
        grades = out / "verse_grades.csv"
        atomic_write_text(grades, VERSE_GRADES)
        run([sys.executable, "-m", "data.drr", "--ct", verse / "sub-verse012_ct.nii.gz",
             "--mask", verse / "sub-verse012_seg-vert_msk.nii.gz", "--grades", grades, "--out", drr,
             "--views", "lateral", "--size", "1024"], "VerSe lateral DRRs")
    return drr / "manifest.csv"


def read_metrics(path: Path) -> dict:
    v = json.loads(path.read_text()).get("vertebrae", {})
    det, lev, pe = v.get("detection", {}), v.get("level_accuracy", {}), v.get("point_error", {})
    return {"found": det.get("recall"), "n_truth": det.get("n_truth"), "n_matched": det.get("n_matched"),
            "precision": det.get("precision"), "level_accuracy": lev.get("accuracy"),
            "median_point_error_px": pe.get("pixels", {}).get("median"),
            "median_point_error_pct_height": pe.get("percent_height", {}).get("median")}


def verse_smoke(predicted: Path, truth: Path) -> dict:
    """The six bodies found, none placed behind a body's posterior wall (on the posterior
    elements), and the body graded most collapsed - per film (one per facing)."""
    pred = read_text_table(predicted)
    true = read_text_table(truth)
    true["image"] = [absolute_path(p, Path(truth).resolve().parent) for p in true["image"]]
    films = {}
    for image, t in true.groupby("image"):
        key = path_key(image)
        p = pred[pred["image"].map(path_key) == key]
        t_pts, p_pts = as_points(table_points(t)), as_points(table_points(p)) if len(p) else np.zeros((0, 6, 2))
        t_centre, p_centre = body_centre(t_pts), body_centre(p_pts)
        heights = np.linalg.norm(t_pts[:, 3] - t_pts[:, 0], axis=1)
        found, on_posterior = [], 0
        for c in p_centre:
            d = np.linalg.norm(t_centre - c, axis=1)
            j = int(np.argmin(d))
            if d[j] < 0.5 * heights[j]:
                found.append(j)
                continue
            # behind the nearest body's posterior wall (p3-p6 line), away from its centre?
            wall_mid = (t_pts[j, 2] + t_pts[j, 5]) / 2
            outward = wall_mid - t_centre[j]
            if np.dot(c - wall_mid, outward) > 0:
                on_posterior += 1
        levels = list(t["level"])
        grades = pd.to_numeric(p.get("genant_grade", pd.Series(dtype=str)), errors="coerce").to_numpy()
        prob = pd.to_numeric(p.get("p_fracture", pd.Series(dtype=str)), errors="coerce").to_numpy()
        matched = {}
        for i, c in enumerate(p_centre):
            d = np.linalg.norm(t_centre - c, axis=1)
            j = int(np.argmin(d))
            if d[j] < 0.5 * heights[j]:
                matched[levels[j]] = (grades[i] if i < len(grades) else np.nan, prob[i] if i < len(prob) else np.nan)
        most = max(matched, key=lambda lv: (np.nan_to_num(matched[lv][0], nan=-1), np.nan_to_num(matched[lv][1], nan=-1)),
                   default=None)
        films[Path(image).name] = {"n_truth": len(t), "n_found": len(set(found)), "n_predicted": len(p),
                                   "n_on_posterior_elements": on_posterior, "most_collapsed": most,
                                   "by_level": {lv: {"grade": None if np.isnan(g) else float(g),
                                                     "p_fracture": None if np.isnan(q) else float(q)}
                                                for lv, (g, q) in matched.items()}}
    return films


def stage_evaluate(arm: str, arm_dir: Path, aasce: Path | None, verse: Path | None, out: Path) -> dict:
    bundle = arm_dir / "bundle"
    run([sys.executable, "-m", "training.export", "--checkpoint", arm_dir / "last.ckpt", "--out", bundle,
         "--name", f"transfer-{arm}", "--overwrite"], f"{arm}: export")
    result = {}
    if aasce is not None and aasce.is_dir():
        manifests = aasce_tables(aasce, out)
        infer = arm_dir / "infer_aasce"
        run([sys.executable, "infer.py", "--model", bundle, "--out", infer, "--resume", "--min-spine-score", 0,
             manifests["all"]], f"{arm}: inference on the AASCE films", ok_codes=(0, 1))
        for subset, manifest in manifests.items():
            report = arm_dir / f"report_aasce_{subset}"
            run([sys.executable, "evaluate.py", "--predictions", infer / "predictions.csv", "--manifest", manifest,
                 "--out", report, "--n-boot", 200], f"{arm}: evaluation ({subset} AASCE films)")
            result[f"aasce_{subset}"] = read_metrics(report / "metrics.json")
    # the model's own kind of film: unseen 3D phantom films (both views), what each arm learned at all
    phantom = out / f"phantom_s{PHANTOM_TEST_SEED}"
    if not (phantom / "manifest.csv").is_file():
        run([sys.executable, *GENERATORS["3d"], "--out", phantom, "--n", PHANTOM_TEST_FILMS,
             "--seed", PHANTOM_TEST_SEED, "--size", 512], f"3D phantom test films (seed {PHANTOM_TEST_SEED})")
    infer = arm_dir / "infer_phantom"
    run([sys.executable, "infer.py", "--model", bundle, "--out", infer, "--resume", "--min-spine-score", 0,
         phantom / "manifest.csv"], f"{arm}: inference on 3D phantom test films", ok_codes=(0, 1))
    run([sys.executable, "evaluate.py", "--predictions", infer / "predictions.csv", "--manifest",
         phantom / "manifest.csv", "--out", arm_dir / "report_phantom", "--n-boot", 200], f"{arm}: evaluation (3D phantom)")
    result["phantom_3d"] = read_metrics(arm_dir / "report_phantom" / "metrics.json")
    if verse is not None and verse.is_dir():
        manifest = verse_films(verse, out)
        infer = arm_dir / "infer_verse"
        run([sys.executable, "infer.py", "--model", bundle, "--out", infer, "--min-spine-score", 0, manifest],
            f"{arm}: inference on VerSe DRRs", ok_codes=(0, 1))
        result["verse"] = verse_smoke(infer / "vertebrae.csv", manifest.parent / "vertebrae.csv")
    atomic_write_text(arm_dir / "evaluation.json", json.dumps(result, indent=1))
    return result


def _f(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def results_section(result: dict) -> str:
    arms = result["arms"]
    lines = [SECTION, "",
             f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}  ",
             f"Date: {result['date']}", "",
             "Both models: configs/transfer.yaml (resnet10t film and crop networks, 384 x 320 input), "
             f"{result['epochs']} epochs over {result['films']} phantom films of seed 1 "
             "(512 px), the last checkpoint. They never saw a real film. The AASCE films are real AP "
             "films without fractures; \"found\" is evaluate.py's detection recall.", "",
             "| model | AASCE films | vertebrae found | level accuracy | median point error (px / % height) |",
             "|---|---|---|---|---|"]
    for arm, r in arms.items():
        for subset in ("all", "clean"):
            m = r.get("evaluation", {}).get(f"aasce_{subset}")
            if m:
                lines.append(f"| {arm} phantom | {subset} ({m['n_truth']} vertebrae) | {_f(m['found'])} | "
                             f"{_f(m['level_accuracy'])} | {_f(m['median_point_error_px'], 1)} / "
                             f"{_f(m['median_point_error_pct_height'], 1)} |")
    for arm, r in arms.items():
        m = r.get("evaluation", {}).get("phantom_3d")
        if m:
            lines.append(f"| {arm} phantom | (not AASCE) {PHANTOM_TEST_FILMS} unseen 3D phantom films of seed "
                         f"{PHANTOM_TEST_SEED}, both views ({m['n_truth']} vertebrae) | {_f(m['found'])} | "
                         f"{_f(m['level_accuracy'])} | {_f(m['median_point_error_px'], 1)} / "
                         f"{_f(m['median_point_error_pct_height'], 1)} |")
    lines += ["", f"Target: {TARGET_FOUND:.0%} or more of the vertebrae found by the 3D-phantom model.", "",
              "VerSe smoke check (lateral DRRs of the one real CT, facing left and right; T10-L3, real L1 "
              "grade-3 and L3 grade-1 fractures):", "",
              "| model | film | bodies found | detections on posterior elements | most collapsed (predicted) |",
              "|---|---|---|---|---|"]
    for arm, r in arms.items():
        for film, s in (r.get("evaluation", {}).get("verse") or {}).items():
            lines.append(f"| {arm} phantom | {film} | {s['n_found']} / {s['n_truth']} | {s['n_on_posterior_elements']} | "
                         f"{s['most_collapsed'] or 'none'} |")
    for arm, r in arms.items():
        t = r.get("training") or {}
        if t:
            lines.append("")
            lines.append(f"{arm} arm training: {t.get('steps')} optimizer steps, {t.get('threads')} thread(s), "
                         f"{t.get('precision')}, {t.get('cpu_seconds')} CPU seconds in its last leg.")
    return "\n".join(lines) + "\n"

def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", default="3d,2d")
    parser.add_argument("--films", type=int, default=1600)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-args", default="", help="further train.py options, one string (after the config's; they win)")
    parser.add_argument("--aasce", type=Path, default=ROOT.parent / "shared" / "data" / "aasce")
    parser.add_argument("--verse", type=Path, default=ROOT.parent / "shared" / "data" / "verse")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "transfer")
    parser.add_argument("--stages", default="data,train,evaluate,results")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    for arm in arms:
        if arm not in GENERATORS:
            parser.error(f"unknown arm {arm!r}; expected 3d or 2d")
    out = args.out.resolve()
    result = {"command": "python -m benchmarks.transfer " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "date": dt.date.today().isoformat(), "epochs": args.epochs, "films": args.films,
              "arms": {}}
    for arm in arms:
        arm_dir = out / arm
        arm_dir.mkdir(parents=True, exist_ok=True)
        entry = {}
        if "data" in stages:
            stage_data(arm, arm_dir, args.films)
        if "train" in stages:
            entry["training"] = stage_train(arm, arm_dir, args.epochs, args.threads, args.train_args)
        elif (arm_dir / "train_info.json").is_file():
            entry["training"] = json.loads((arm_dir / "train_info.json").read_text())
        if "evaluate" in stages:
            entry["evaluation"] = stage_evaluate(arm, arm_dir, args.aasce, args.verse, out)
        elif (arm_dir / "evaluation.json").is_file():
            entry["evaluation"] = json.loads((arm_dir / "evaluation.json").read_text())
        result["arms"][arm] = entry
    atomic_write_text(out / "transfer_result.json", json.dumps(result, indent=1))
    if "results" in stages:
        replace_section(results_section(result))
        log(f"wrote the section {SECTION!r} of {RESULTS}")
    return result


if __name__ == "__main__":
    main()
