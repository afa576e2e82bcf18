"""The shipped model on data it never saw, against the targets of its card.

    python -m benchmarks.shipped_model [--model spine-vcf-default] [--reference BUNDLE]
        [--aasce ../shared/data/aasce] [--out runs/shipped_benchmark] [--phantom-n 400] [--draws 7]
        [--no-results] [--reuse]

Test sets (each written by the project's own command lines, then ``infer.py`` and ``evaluate.py``):

1. ``phantom``: 3D phantom films of seed 2001 (never a training seed), both views, default size;
2. ``aasce``: the real AASCE films of the held-out patients (the 20 % that ``data.combine
   --test-fraction-of ...=0.2`` keeps out of training; ``data.manifest.is_held_out``), without
   landmark problems: localisation only (they have no fractures). The median point error is
   reported beside the annotation-convention floor of these films (6.48 % of the body height,
   docs/studies/2026-11-22-annotation-convention-floor.md);
3. ``simulated``: fractures simulated on those held-out films (``data.simulate --held-out 0.2``,
   ``--draws`` films per source film): image-level grade 2-3 against normal AUROC.

``--reference BUNDLE`` reads the phantom set with a second bundle too (e.g. the fp32 export of
the same checkpoint), so the table shows what the stored precision costs. Writes the section
"## Shipped model" of benchmarks/RESULTS.md and ``OUT/shipped_result.json``. The phantom is
synthetic and the fractures are simulated: no number here is a clinical performance.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

from benchmarks.mixed_benchmark import grade_group_auroc, load_dataset, write_subset
from benchmarks.phantom_benchmark import machine
from benchmarks.results_file import replace_section
from benchmarks.transfer import log, run
from data.io_utils import atomic_write_text
from data.manifest import is_held_out
from models.bundle import load_bundle
from models.registry import default_model, resolve

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Shipped model"
PHANTOM_SEED = 2001
HELD_OUT_FRACTION = 0.2
CONVENTION_FLOOR_PCT = 6.48
TARGETS = {  # (metric, comparison, target)
    "phantom_auroc_fracture": (">=", 0.98), "phantom_auroc_acute_given_fracture": (">=", 0.95),
    "phantom_vertebra_auroc": (">=", 0.98), "phantom_kappa": (">=", 0.90), "phantom_level_accuracy": (">=", 0.95),
    "aasce_found": (">=", 0.95), "aasce_level_accuracy": (">=", 0.90), "simulated_auroc_grade23": (">=", 0.90),
}


def bundle_path(model: str) -> Path:
    path = Path(model)
    return path if path.is_dir() else resolve(model)


def infer_evaluate(bundle: Path, manifest: Path, out: Path, name: str, reuse: bool = False) -> dict:
    infer, report = out / f"infer_{name}", out / f"report_{name}"
    stamp = infer / "benchmark_model.json"
    same = stamp.is_file() and json.loads(stamp.read_text()).get("id") == load_bundle(bundle).id
    if reuse and same and (report / "metrics.json").is_file():
        log(f"{name}: reusing {report}")
        return {"metrics": json.loads((report / "metrics.json").read_text()), "infer_seconds": None,
                "predictions": infer / "predictions.csv"}
    shutil.rmtree(infer, ignore_errors=True)
    seconds = run([sys.executable, "infer.py", "--model", bundle, "--out", infer, "--quiet", manifest], f"{name}: infer",
                  ok_codes=(0, 1))  # 1: some films turned away (no_spine) or failed; evaluate.py counts them
    atomic_write_text(stamp, json.dumps({"id": load_bundle(bundle).id}))
    run([sys.executable, "evaluate.py", "--predictions", infer / "predictions.csv", "--manifest", manifest,
         "--out", report, "--n-boot", 200], f"{name}: evaluate")
    return {"metrics": json.loads((report / "metrics.json").read_text()), "infer_seconds": round(seconds, 1),
            "predictions": infer / "predictions.csv"}


def numbers(metrics: dict) -> dict:
    v = metrics.get("vertebrae", {})
    return {"auroc_fracture": metrics.get("auroc_fracture"),
            "auroc_acute_given_fracture": metrics.get("auroc_acute_given_fracture"),
            "vertebra_auroc": v.get("auroc_fracture", {}).get("auroc"),
            "kappa": v.get("grade_agreement", {}).get("kappa_quadratic"),
            "found": v.get("detection", {}).get("recall"), "n_truth": v.get("detection", {}).get("n_truth"),
            "level_accuracy": v.get("level_accuracy", {}).get("accuracy"),
            "median_point_error_pct": v.get("point_error", {}).get("percent_height", {}).get("median")}


def held_out_films(aasce: Path, out: Path) -> Path:
    every = out / "aasce_all"
    if not (every / "manifest.csv").is_file():
        run([sys.executable, "-m", "data.landmarks", "--aasce", aasce, "--out", every], "AASCE landmarks")
    films, vert = load_dataset(every / "manifest.csv")
    held = films[films["patient_id"].map(lambda p: is_held_out(p, HELD_OUT_FRACTION))]
    write_subset(held, vert, out / "aasce_held_out")
    return out / "aasce_held_out" / "manifest.csv"


def _f(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _met(key: str, value) -> str:
    op, target = TARGETS[key]
    if value is None:
        return "n/a"
    ok = value >= target if op == ">=" else value <= target
    return f"{_f(value)} ({'met' if ok else 'not met'}; target {op} {target})"


def results_section(r: dict) -> str:
    p, a, s = r["phantom"], r.get("aasce") or {}, r.get("simulated") or {}
    lines = [SECTION, "",
             f"Bundle: `{r['bundle']}` (id {r['bundle_id']}, {r['storage']} weights, {r['size_mb']:.1f} MB).  ",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}  ", f"Date: {r['date']}", "",
             f"Trained on: {r['training_data']}", "",
             "| data | metric | value |", "|---|---|---|",
             f"| 3D phantom, {r['phantom_n']} films of seed {PHANTOM_SEED}, both views | image fracture AUROC | "
             f"{_met('phantom_auroc_fracture', p['auroc_fracture'])} |",
             f"| | acute vs chronic on fractured films | {_met('phantom_auroc_acute_given_fracture', p['auroc_acute_given_fracture'])} |",
             f"| | per-vertebra fracture AUROC | {_met('phantom_vertebra_auroc', p['vertebra_auroc'])} |",
             f"| | Genant grade kappa (quadratic) | {_met('phantom_kappa', p['kappa'])} |",
             f"| | level accuracy | {_met('phantom_level_accuracy', p['level_accuracy'])} |"]
    if a:
        lines += [f"| held-out AASCE patients, {a['n_films']} real films ({a['n_truth']} vertebrae) | vertebrae found | "
                  f"{_met('aasce_found', a['found'])} |",
                  f"| | level accuracy | {_met('aasce_level_accuracy', a['level_accuracy'])} |",
                  f"| | median point error, % of body height | {_f(a['median_point_error_pct'], 1)} "
                  f"(annotation-convention floor {CONVENTION_FLOOR_PCT}) |"]
    if s:
        lines.append(f"| fractures simulated on those films, {s['n_films']} draws | grade 2-3 vs normal image AUROC | "
                     f"{_met('simulated_auroc_grade23', s['auroc_grade23'])} |")
    ref = r.get("reference")
    if ref:
        lines += ["", f"What the storage costs: the same checkpoint exported with {ref['storage']} weights "
                      f"({ref['size_mb']:.1f} MB) on the same phantom films:", "",
                  "| weights | image fracture AUROC | per-vertebra AUROC | kappa | level accuracy |",
                  "|---|---|---|---|---|",
                  f"| {r['storage']} (shipped) | {_f(p['auroc_fracture'])} | {_f(p['vertebra_auroc'])} | {_f(p['kappa'])} | "
                  f"{_f(p['level_accuracy'])} |",
                  f"| {ref['storage']} | {_f(ref['auroc_fracture'])} | {_f(ref['vertebra_auroc'])} | {_f(ref['kappa'])} | "
                  f"{_f(ref['level_accuracy'])} |"]
    return "\n".join(lines) + "\n"


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.shipped_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="bundle folder or registry name (default: the shipped model)")
    parser.add_argument("--reference", type=Path, default=None, help="a second bundle read on the phantom set")
    parser.add_argument("--aasce", type=Path, default=ROOT.parent / "shared" / "data" / "aasce")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "shipped_benchmark")
    parser.add_argument("--phantom-n", type=int, default=400)
    parser.add_argument("--draws", type=int, default=7, help="simulated films per held-out source film")
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="keep a test set's report made with the same bundle")
    args = parser.parse_args(argv)
    model = args.model or default_model()
    if model is None:
        parser.error("no model named and none ships (models/registry.json)")
    bundle = bundle_path(model)
    loaded = load_bundle(bundle)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": "python -m benchmarks.shipped_model " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "date": dt.date.today().isoformat(), "bundle": str(bundle.relative_to(ROOT))
              if bundle.is_relative_to(ROOT) else str(bundle), "bundle_id": loaded.id, "storage": loaded.storage,
              "size_mb": folder_mb(bundle), "phantom_n": args.phantom_n,
              "training_data": loaded.metadata.get("training", {}).get("data_summary")
              or loaded.metadata.get("training_data") or "see the model card"}
    phantom = out / "phantom"
    if not (phantom / "manifest.csv").is_file():
        run([sys.executable, "-m", "data.phantom", "--out", phantom, "--n", args.phantom_n, "--seed", PHANTOM_SEED,
             "--view", "both"], "phantom test films")
    result["phantom"] = numbers(infer_evaluate(bundle, phantom / "manifest.csv", out, "phantom", args.reuse)["metrics"])
    if args.reference is not None:
        ref = load_bundle(args.reference)
        result["reference"] = {**numbers(infer_evaluate(args.reference, phantom / "manifest.csv", out,
                                                        "phantom_reference", args.reuse)["metrics"]),
                               "storage": ref.storage, "size_mb": folder_mb(args.reference)}
    if args.aasce.is_dir():
        manifest = held_out_films(args.aasce, out)
        got = infer_evaluate(bundle, manifest, out, "aasce", args.reuse)
        result["aasce"] = {**numbers(got["metrics"]), "n_films": int(len(load_dataset(manifest)[0]))}
        sim = out / "simulated"
        if not (sim / "manifest.csv").is_file():
            run([sys.executable, "-m", "data.simulate", "--aasce", args.aasce, "--held-out", HELD_OUT_FRACTION,
                 "--n", args.draws, "--seed", 99, "--size", 1024, "--out", sim], "fractures simulated on held-out films")
        got = infer_evaluate(bundle, sim / "manifest.csv", out, "simulated", args.reuse)
        g23 = grade_group_auroc(got["predictions"], sim / "manifest.csv", sim / "vertebrae.csv")
        result["simulated"] = {"auroc_grade23": g23.get("auroc"), "ci": [g23.get("ci_low"), g23.get("ci_high")],
                               "n_films": int(len(load_dataset(sim / "manifest.csv")[0]))}
    else:
        log(f"{args.aasce} not found: the AASCE rows are left out")
    atomic_write_text(out / "shipped_result.json", json.dumps(result, indent=1, default=str))
    if not args.no_results:
        replace_section(results_section(result))
        log(f"wrote the section {SECTION!r} of {RESULTS}")
    return result


if __name__ == "__main__":
    main()
