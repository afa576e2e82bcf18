"""The report's files: ``metrics.json``, the PNG plots and a self-contained ``report.html``
(plots and overlays embedded as base64)."""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import pandas as pd

from data.io_utils import atomic_write_json, atomic_write_text, atomic_write_with
from evaluation import vertebrae as V
from evaluation.metrics import LEFT_OUT_REASONS
from evaluation.report import plots
from evaluation.report.formatting import format_ci, format_value

__all__ = ["write_report", "render_html"]


def _save(fig, path: Path) -> Path:
    # the format from the name, since the temporary file's name does not end in .png
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write_with(path, lambda fh: fig.savefig(fh, dpi=100, format=fmt))


def write_report(result: dict, df: pd.DataFrame, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``metrics.json``, the PNG plots and ``report.html`` into ``out_dir``. ``df`` is
    :func:`evaluation.metrics.join_predictions` of the same inputs. Returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": atomic_write_json(out / "metrics.json", result)}
    # the plot of the earlier evaluate.py (fracture and acute ROC, by-grade bars)
    paths["roc"] = _save(plots.plot_roc_by_grade(df, result), out / "roc.png")
    paths["roc_pr"] = _save(plots.plot_roc_pr(df, result), out / "roc_pr.png")
    paths["confusion"] = _save(plots.plot_confusions(result), out / "confusion.png")
    paths["reliability"] = _save(plots.plot_reliability(result["calibration"]), out / "reliability.png")
    if result.get("by_level"):
        paths["by_level"] = _save(plots.plot_by_level(result["by_level"]), out / "by_level.png")
    if (result.get("grade_confusion") or {}).get("available"):
        paths["grade_confusion"] = _save(plots.plot_grade_confusion(result["grade_confusion"]), out / "grade_confusion.png")
    if (result.get("vertebrae") or {}).get("available"):
        paths["vertebrae"] = _save(plots.plot_vertebrae(result["vertebrae"]), out / "vertebrae.png")
    paths["gallery"] = _save(plots.error_gallery(result["gallery"]), out / "gallery.png")
    paths["html"] = atomic_write_text(out / "report.html", render_html(result, {k: v for k, v in paths.items()}))
    return paths


def _img(path: Path | str | None, alt: str, width: str | None = None) -> str:
    if not path or not Path(path).is_file():
        return f"<p><em>{html.escape(alt)}: image not available</em></p>"
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    style = f' style="max-width:{width}"' if width else ' style="max-width:100%"'
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"{style}>'


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;color:#222;line-height:1.4}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f2f2f2}.warn{background:#fff3cd;border:1px solid #e0c36c;padding:.8em 1em;border-radius:4px}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;width:220px;font-size:small}
.gallery img{width:220px}code{background:#f4f4f4;padding:0 3px}
"""


def _vertebrae_html(v: dict, image: Path | None) -> list[str]:
    """The per-vertebra section of the report (see :func:`vertebrae_section`)."""
    parts = ["<h2>Per-vertebra localisation and grading</h2>"]
    if not v.get("available"):
        parts.append(f"<p>{html.escape(v.get('note', 'not available'))}</p>")
        return parts
    c, d, pe = v["counts"], v["detection"], v["point_error"]
    la, af, aa, ga = v["level_accuracy"], v["auroc_fracture"], v["auroc_acute"], v["grade_agreement"]
    parts.append(
        "<p>Predicted vertebrae (<code>" + html.escape(str(v["inputs"]["predicted"])) + "</code>) are paired with the "
        "truth one-to-one per image on the distance between body centres (mean of the six points); a pair counts "
        f"only when that distance is below {V.GATE_FRACTION} x the truth vertebra's mean height. A truth vertebra "
        f"that no prediction matched scores {V.UNMATCHED_SCORE} in the per-vertebra AUROCs. "
        f"{c['n_evaluated_images']} image(s) evaluated; <strong>{c['n_truth_images_without_prediction']} truth "
        "image(s) without an ok prediction were left out</strong>; "
        f"{c['n_predicted_images_without_truth']} predicted image(s) without truth vertebrae left out; "
        f"{c['n_truth_without_points']} truth vertebra(e) without usable points left out.</p>")
    rows = [
        ["detection recall", format_value(d.get("recall")), f"{d['n_matched']} / {d['n_truth']} truth vertebrae matched"],
        ["detection precision", format_value(d.get("precision")),
         f"{d['n_matched']} / {d['n_predicted']} predictions matched ({d['n_false_positive']} false positives)"],
        ["point error, median (90th pct), pixels", f"{format_value(pe['pixels'].get('median'), 2)} ({format_value(pe['pixels'].get('p90'), 2)})",
         f"{pe['n_points']} points of {pe['n_vertebrae']} matched vertebrae"],
        ["point error, median (90th pct), % of mean height",
         f"{format_value(pe['percent_height'].get('median'), 2)} ({format_value(pe['percent_height'].get('p90'), 2)})", ""],
        ["level accuracy", format_value(la.get("accuracy")),
         f"{la['n_correct']} / {la['n']} matched; {la['n_truth_level_unknown']} with no truth level left out"],
    ]
    for flag, acc in (la.get("by_levels_trusted") or {}).items():
        if isinstance(acc, dict):
            rows.append([f"level accuracy, levels_trusted {flag}", format_value(acc.get("accuracy")), f"{acc['n_correct']} / {acc['n']}"])
    rows += [
        ["AUROC fracture (grade > 0 vs 0, p_fracture)", format_value(af.get("auroc")),
         f"pos {af['n_pos']}, neg {af['n_neg']}; {af['n_unmatched_scored_zero']} unmatched scored 0; "
         f"{af['n_unknown_left_out']} unknown grade left out"],
        ["AUROC acute vs chronic (fractured, p_acute)", format_value(aa.get("auroc")),
         f"acute {aa['n_pos']}, chronic {aa['n_neg']}; {aa['n_unmatched_scored_zero']} unmatched scored 0; "
         f"{aa['n_unknown_left_out']} unknown acuity left out"],
        ["Genant grade, quadratic-weighted kappa", format_value(ga.get("kappa_quadratic")),
         f"{ga['n']} matched vertebrae with a known grade; exact agreement {format_value(ga.get('exact_agreement'))}"],
    ]
    parts.append(_table(["metric", "value", "counts"], rows))
    mat = ga["matrix"]
    parts.append("<h3>Genant grade confusion (matched vertebrae)</h3>")
    parts.append(_table(["true \\ predicted", "0", "1", "2", "3"], [[g] + mat[g] for g in range(4)]))
    parts.append("<h3>Per-vertebra AUROC by truth grade and by level</h3>")
    parts.append(_table(["subset", "AUROC", "positives", "negatives", "note"],
                        [[f"grade {g} vs grade 0", format_value(r.get("auroc")), r["n_pos"], r["n_neg"], ""]
                         for g, r in v["auroc_by_grade"].items()]
                        + [[f"level {lv} (fractured vs grade 0 at {lv})", format_value(r.get("auroc")), r["n_pos"], r["n_neg"],
                            r.get("note", "")] for lv, r in v["auroc_by_level"].items()]))
    parts.append(_img(image, "per-vertebra point error and grade confusion"))
    return parts


def render_html(result: dict, images: dict[str, Path] | None = None) -> str:
    """The self-contained HTML page of a :func:`evaluate` result (plots from ``images``,
    embedded as base64)."""
    images = images or {}
    c = result.get("counts", {})
    roc, pr, cal = result.get("roc", {}), result.get("pr", {}), result.get("calibration", {})
    bs = result.get("bootstrap", {})
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>VCF evaluation report</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>Vertebral compression fracture detection: evaluation report</h1>",
             "<p class='warn'><strong>Research code, not a medical device.</strong> Unless the inputs below are "
             "your own labelled radiographs, these numbers come from <strong>synthetic phantom films</strong>: "
             "they are <strong>not clinical performance</strong> and must not be quoted as such.</p>"]
    inputs = result.get("inputs", {})
    parts.append("<h2>Inputs</h2>" + _table(["input", "value"], [[k, "" if v is None else v] for k, v in inputs.items()]))

    # counts
    n_unk = c.get("n_fracture_unknown", 0)
    n_acute_unk = c.get("n_acute_unknown", 0)
    parts.append("<h2>Counts</h2>")
    parts.append(f"<p><strong>{n_unk} image(s) with an unknown fracture label</strong> were left out of the fracture "
                 f"metrics, and <strong>{n_acute_unk} fractured image(s) with an unknown acute label</strong> were left "
                 f"out of the acuity metrics (never taken as negative). {c.get('n_error', 0)} prediction(s) failed, "
                 f"{c.get('n_missing_prediction', 0)} manifest image(s) have no usable prediction, "
                 f"{c.get('n_unmatched', 0)} prediction(s) are not in the manifest.</p>")
    parts.append(_table(["count", "value"], [[k, v] for k, v in c.items()]))
    left = result.get("left_out")
    if left:
        parts.append("<h3>Left out, by reason</h3>" + _table(
            ["reason", "what", "count"], [[k, LEFT_OUT_REASONS.get(k, k), n] for k, n in left.items()]))

    # headline
    rows = []
    names = {"fracture": "fracture vs none (p_fracture)", "acute": "acute vs chronic (p_acute, fractured images)",
             "acute_given_fracture": "acute vs chronic (p_acute_given_fracture)"}
    for task, r in roc.items():
        rows.append([f"AUROC {names.get(task, task)}", format_ci(r, "auroc"), r["n_pos"], r["n_neg"], r["n_unknown_left_out"]])
        p = pr.get(task, {})
        rows.append([f"average precision {names.get(task, task)}", format_ci(p, "average_precision"), p.get("n_pos"),
                     p.get("n_neg"), p.get("n_unknown_left_out")])
    parts.append("<h2>Discrimination</h2>")
    parts.append(f"<p>95% intervals: percentile bootstrap over <strong>patients</strong> ({bs.get('n_boot')} resamples, "
                 f"seed {bs.get('seed')}, {bs.get('n_patients')} patients, {bs.get('n_images')} images).</p>")
    parts.append(_table(["metric", "value [95% CI]", "positives", "negatives", "left out (unknown label)"], rows))
    parts.append(_img(images.get("roc_pr"), "ROC and precision-recall curves"))

    # by grade / level
    parts.append("<h2>AUROC by Genant grade and by level</h2>")
    if result.get("by_grade"):
        parts.append("<p>Positives: images whose worst vertebra has the grade (or a fractured vertebra at the level); "
                     "negatives: all images labelled normal.</p>")
        parts.append(_table(["grade", "AUROC [95% CI]", "positives", "negatives"],
                            [[g, format_ci(r, "auroc"), r["n_pos"], r["n_neg"]] for g, r in result["by_grade"].items()]))
    else:
        parts.append("<p>not available (no vertebrae.csv)</p>")
    if result.get("by_level"):
        parts.append(_table(["level", "AUROC [95% CI]", "positives", "negatives", "note"],
                            [[l, format_ci(r, "auroc"), r["n_pos"], r["n_neg"], r.get("note", "")]
                             for l, r in result["by_level"].items()]))
        parts.append(f"<p>Levels with fewer than {result.get('by_level_min_positives')} positives: n/a.</p>")
        parts.append(_img(images.get("by_level"), "AUROC by level"))

    # operating points
    parts.append("<h2>Operating points (fracture vs none)</h2>")
    ops = dict(result.get("operating_points") or {})
    st = result.get("stored_operating_point") or {}
    if st.get("available"):
        ops["stored (" + (st.get("name") or st.get("source", "")) + ")"] = st
    if ops:
        rows = []
        for name, op in ops.items():
            cf = op["confusion"]
            rows.append([name, op.get("criterion", st.get("source", "")), format_value(op.get("threshold")),
                         format_ci(op["sensitivity"], "value"), format_ci(op["specificity"], "value"), format_ci(op["ppv"], "value"),
                         format_ci(op["npv"], "value"), f"TP {cf['tp']} FN {cf['fn']} FP {cf['fp']} TN {cf['tn']}"])
        parts.append(_table(["operating point", "criterion", "threshold", "sensitivity", "specificity", "PPV", "NPV",
                             "confusion"], rows))
        parts.append("<p>Thresholds are chosen on this set and held fixed in the bootstrap. "
                     "An image is called positive when p_fracture &gt;= threshold.</p>")
    else:
        parts.append("<p>n/a (needs fractured and normal images)</p>")
    if not st.get("available"):
        parts.append(f"<p>Stored operating point: {html.escape(st.get('note', 'not available'))}</p>")
    else:
        txt = (f"Stored operating point ({st.get('source')}): {st.get('name') or 'unnamed'}, threshold "
               f"{format_value(st.get('threshold'))}")
        if "validation_sensitivity" in st or "validation_specificity" in st:
            txt += (f"; at calibration it had sensitivity {format_value(st.get('validation_sensitivity'))} and specificity "
                    f"{format_value(st.get('validation_specificity'))} on its fitting images")
        txt += f". {st.get('n_without_decision', 0)} labelled image(s) without a stored decision."
        parts.append(f"<p>{html.escape(txt)}</p>")
    parts.append(_img(images.get("confusion"), "confusion matrices"))

    # grade confusion
    parts.append("<h2>Genant grade confusion (per vertebra)</h2>")
    gc = result.get("grade_confusion") or {}
    if (result.get("vertebrae") or {}).get("available"):
        # matching by level would fold level errors into the grade table: the position-matched one is shown
        parts.append("<p>See <em>Per-vertebra localisation and grading</em> below: vertebrae there are matched "
                     "by position, so a wrong level name does not count as a grading error. "
                     "(<code>metrics.json</code> keeps the table matched by image and level under "
                     "<code>grade_confusion</code>.)</p>")
    elif gc.get("available"):
        mat = gc["matrix"]
        parts.append(_table(["true \\ predicted", "0", "1", "2", "3"], [[g] + mat[g] for g in range(4)]))
        parts.append(f"<p>{gc['n_matched']} vertebrae matched by image and level; accuracy {format_value(gc.get('accuracy'))}, "
                     f"quadratic-weighted kappa {format_value(gc.get('kappa_quadratic'))}; {gc['n_predicted_unmatched']} predicted "
                     f"vertebrae without truth, {gc['n_truth_not_predicted']} labelled vertebrae not predicted.</p>")
    else:
        parts.append(f"<p>{html.escape(gc.get('note', 'not available (no per-vertebra predictions)'))}</p>")

    if "vertebrae" in result:
        parts.extend(_vertebrae_html(result["vertebrae"], images.get("vertebrae")))

    # calibration
    parts.append("<h2>Calibration</h2>")
    rows = [[k, v.get("population", ""), format_ci(v.get("ece"), "ece"),
             f"{format_value((v.get('ece_if_calibrated') or {}).get('mean'))} / {format_value((v.get('ece_if_calibrated') or {}).get('p95'))}",
             format_value(v.get("brier")), v.get("n"), v.get("n_unknown_left_out")] for k, v in cal.items()]
    parts.append(_table(["probability", "population", "ECE [95% CI]", "ECE if calibrated (mean / 95th pct)", "Brier",
                         "n", "left out (unknown label)"], rows))
    parts.append("<p>ECE: 10 equal-width bins, L1 (torchmetrics BinaryCalibrationError). Binned ECE is above 0 on any "
                 "finite set: 'ECE if calibrated' is what these same probabilities would score if they were perfectly "
                 "calibrated (outcomes drawn from them 1000 times); an ECE above its 95th percentile is miscalibration, "
                 "not chance. p_acute is P(acute fracture present); among fractured images the matching probability is "
                 "p_acute_given_fracture.</p>")
    ic = result.get("inference_calibration")
    if ic:
        parts.append("<p>Inference applied the checkpoint's calibration: "
                     + html.escape(json.dumps(ic)) + ". p_fracture_uncalibrated (when listed above) is the "
                     "network's output before it.</p>")
    else:
        parts.append("<p>The per-image JSONs record no calibration applied at inference.</p>")
    parts.append(_img(images.get("reliability"), "reliability diagrams"))

    # pointing game
    parts.append("<h2>Heatmap pointing game</h2>")
    pg = result.get("pointing_game")
    if pg:
        parts.append(f"<p>{pg['hits']} / {pg['n']} fractured images have the fracture map's peak inside a "
                     f"fractured vertebra's box (score {format_value(pg.get('score'))}).</p>")
        head = result.get("pointing_game_head")
        if head:
            parts.append(f"<p>The dense heatmap head's own peak: {head['hits']} / {head['n']} "
                         f"(score {format_value(head.get('score'))}). The map's peak is the likeliest fractured vertebra's "
                         "centre where its p_fracture tops the dense head (docs/formats.md).</p>")
    else:
        parts.append("<p>not available (needs vertebrae.csv and the per-image JSONs)</p>")

    # gallery
    parts.append("<h2>Worst errors</h2>")
    gal = result.get("gallery") or {}
    if gal.get("threshold") is not None:
        parts.append(f"<p>Balanced threshold: {format_value(gal['threshold'])}.</p>")
    for title, key in (("Worst false negatives (fractured, lowest p_fracture)", "false_negatives"),
                       ("Worst false positives (normal, highest p_fracture)", "false_positives")):
        parts.append(f"<h3>{title}</h3><div class='gallery'>")
        items = gal.get(key) or []
        if not items:
            parts.append("<p>none</p>")
        for it in items:
            flag = {True: "; misclassified at the balanced threshold", False: "; correct at the balanced threshold"}
            cap = html.escape(f"{it['name']} (patient {it['patient_id']}): p_fracture {it['p_fracture']:.3f}, "
                              f"{it['truth']}{flag.get(it.get('error'), '')}")
            parts.append(f"<figure>{_img(it.get('overlay'), it['name'])}<figcaption>{cap}</figcaption></figure>")
        parts.append("</div>")

    parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.get("notes", [])) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
