"""The report's figures (matplotlib), drawn from a result of
:func:`evaluation.report.compute.evaluate` and the joined table. Each returns a ``Figure`` not
registered with pyplot (show it with ``display(fig)`` in a notebook)."""
from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve

from evaluation import metrics as M
from evaluation import vertebrae as V
from evaluation.report.compute import fracture_rows
from evaluation.report.formatting import format_value

__all__ = ["plot_roc_pr", "plot_roc_by_grade", "plot_reliability", "plot_confusions", "plot_by_level",
           "plot_grade_confusion", "plot_vertebrae", "error_gallery"]


def _figure(w, h):
    return Figure(figsize=(w, h), layout="constrained")


def _roc_tasks(df: pd.DataFrame) -> tuple[str, ...]:
    return ("fracture", "acute") if "p_acute" in df.columns else ("fracture",)


def plot_roc_pr(df: pd.DataFrame, result: dict | None = None, fig=None):
    """ROC (fracture and acute-vs-chronic) and precision-recall (fracture) curves, with the
    bootstrap bands of ``result`` (from :func:`evaluate`) when given. Returns the Figure."""
    fig = fig or _figure(12, 4.4)
    ax_roc, ax_pr = fig.subplots(1, 2)
    M.plot_roc(ax_roc, df, tasks=_roc_tasks(df))
    roc = (result or {}).get("roc") or {}
    for task, color in (("fracture", "C0"), ("acute", "C1")):
        band = (roc.get(task) or {}).get("band")
        if band:
            lo = np.array([np.nan if v is None else v for v in band["tpr_low"]], dtype=float)
            hi = np.array([np.nan if v is None else v for v in band["tpr_high"]], dtype=float)
            ax_roc.fill_between(band["fpr"], lo, hi, color=color, alpha=0.15, lw=0)
    ax_roc.set_title("ROC (band: patient bootstrap 95%)" if roc else "ROC")
    sel, _ = fracture_rows(df)
    y, s = df["fracture"].to_numpy(float)[sel], df["p_fracture"].to_numpy(float)[sel]
    if y.size and 0 < y.sum() < y.size:
        prec, rec, _ = precision_recall_curve(y.astype(int), s)
        pr = ((result or {}).get("pr") or {}).get("fracture") or {}
        ap = pr.get("average_precision")
        label = "fracture" + (f": AP {ap:.3f}" if ap is not None else "")
        if pr.get("ci_low") is not None:
            label += f" [{pr['ci_low']:.3f}, {pr['ci_high']:.3f}]"
        ax_pr.step(rec, prec, where="post", lw=2, label=label, color="C0")
        band = pr.get("band")
        if band:
            lo = np.array([np.nan if v is None else v for v in band["precision_low"]], dtype=float)
            hi = np.array([np.nan if v is None else v for v in band["precision_high"]], dtype=float)
            ax_pr.fill_between(band["recall"], lo, hi, color="C0", alpha=0.15, lw=0)
        ax_pr.axhline(y.mean(), ls="--", c="grey", lw=1, label=f"prevalence {y.mean():.2f}")
        ax_pr.legend(loc="lower left", fontsize="small")
    else:
        ax_pr.text(0.5, 0.5, "n/a (needs both classes)", ha="center", va="center")
    ax_pr.set_xlim(0, 1)
    ax_pr.set_ylim(0, 1.02)
    ax_pr.set_xlabel("recall (sensitivity)")
    ax_pr.set_ylabel("precision (PPV)")
    ax_pr.set_title("precision-recall, fracture vs none")
    return fig


def _panel_row(fig, n: int, width: float, height: float, empty_text: str):
    """A row of ``n`` panels (one blank panel saying ``empty_text`` when ``n`` is 0)."""
    fig = fig or _figure(width * max(1, n), height)
    axes = np.atleast_1d(fig.subplots(1, max(1, n)))
    if n == 0:
        axes[0].text(0.5, 0.5, empty_text, ha="center", va="center")
        axes[0].axis("off")
    return fig, axes


def plot_reliability(calibration: dict, fig=None):
    """Reliability diagrams (observed frequency against mean predicted probability per bin,
    marker area ~ bin count) of each entry of ``result["calibration"]``. Returns the Figure."""
    names = [k for k, v in calibration.items() if v and v.get("n")]
    fig, axes = _panel_row(fig, len(names), 4.2, 4.2, "no labelled images")
    if not names:
        return fig
    for ax, name in zip(axes, names):
        c = calibration[name]
        rel = c["reliability"]
        x = [r["mean_predicted"] for r in rel]
        yv = [r["observed"] for r in rel]
        n = np.array([r["n"] for r in rel], dtype=float)
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.plot(x, yv, "-", c="C0", lw=1)
        ax.scatter(x, yv, s=20 + 180 * n / max(1.0, n.max()), c="C0", zorder=3)
        e = c["ece"]
        ttl = f"{name}\nECE {format_value(e.get('ece'))} [{format_value(e.get('ci_low'))}, {format_value(e.get('ci_high'))}], n={c['n']}"
        ax.set_title(ttl, fontsize="small")
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_aspect("equal")
    return fig


def plot_confusions(result: dict, fig=None):
    """2 x 2 confusion matrices at each operating point of ``result``. Returns the Figure."""
    ops = dict(result.get("operating_points") or {})
    st = result.get("stored_operating_point") or {}
    if st.get("available"):
        ops["stored"] = st
    fig, axes = _panel_row(fig, len(ops), 3.2, 3.4, "no operating points\n(needs both classes)")
    if not ops:
        return fig
    for ax, (name, op) in zip(axes, ops.items()):
        c = op["confusion"]
        mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(1, mat.max()))
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, str(v), ha="center", va="center", color="black" if v < mat.max() * 0.6 else "white")
        ax.set_xticks([0, 1], ["pred normal", "pred fracture"], fontsize="small")
        ax.set_yticks([0, 1], ["normal", "fracture"], fontsize="small")
        thr = op.get("threshold")
        ax.set_title(f"{name}" + (f"\nthreshold {thr:.3f}" if isinstance(thr, (int, float)) else ""), fontsize="small")
    return fig


def plot_by_level(by_level: dict, fig=None):
    """AUROC per level with CI whiskers; n/a levels drawn empty. Returns the Figure."""
    levels = list(by_level)
    fig = fig or _figure(max(5, 0.45 * len(levels) + 2), 3.6)
    ax = fig.subplots()
    if not levels:
        ax.text(0.5, 0.5, "no levels", ha="center", va="center")
        ax.axis("off")
        return fig
    x = np.arange(len(levels))
    vals = np.array([np.nan if by_level[l]["auroc"] is None else by_level[l]["auroc"] for l in levels], dtype=float)
    lo = np.array([np.nan if by_level[l].get("ci_low") is None else by_level[l]["ci_low"] for l in levels], dtype=float)
    hi = np.array([np.nan if by_level[l].get("ci_high") is None else by_level[l]["ci_high"] for l in levels], dtype=float)
    ax.bar(x, np.nan_to_num(vals), color="tab:blue")
    ok = np.isfinite(vals) & np.isfinite(lo)
    ax.errorbar(x[ok], vals[ok], yerr=[vals[ok] - lo[ok], hi[ok] - vals[ok]], fmt="none", ecolor="k", capsize=3)
    for xi, l, v in zip(x, levels, vals):
        ax.text(xi, (0 if np.isnan(v) else v) + 0.03, ("n/a" if np.isnan(v) else f"{v:.2f}") + f"\n{by_level[l]['n_pos']}",
                ha="center", va="bottom", fontsize="x-small")
    ax.axhline(0.5, ls="--", c="grey", lw=1)
    ax.set_xticks(x, levels, fontsize="small")
    ax.set_ylim(0, 1.25)
    ax.set_ylabel("AUROC (vs normal images)")
    ax.set_title("AUROC by fractured level (number: positives)", fontsize="small")
    return fig


def plot_grade_confusion(gc: dict, fig=None):
    """Genant grade confusion matrix (truth x predicted). Returns the Figure."""
    fig = fig or _figure(4, 3.6)
    ax = fig.subplots()
    if not gc.get("available"):
        ax.text(0.5, 0.5, gc.get("note", "not available"), ha="center", va="center", wrap=True)
        ax.axis("off")
        return fig
    mat = np.array(gc["matrix"])
    ax.imshow(mat, cmap="Blues")
    for (i, j), v in np.ndenumerate(mat):
        ax.text(j, i, str(v), ha="center", va="center", fontsize="small")
    ax.set_xticks(range(4), [f"{g}" for g in range(4)])
    ax.set_yticks(range(4), [f"{g}" for g in range(4)])
    ax.set_xlabel("predicted Genant grade")
    ax.set_ylabel("true Genant grade")
    ax.set_title(f"per-vertebra grades ({gc['n_matched']} matched)", fontsize="small")
    return fig


def plot_vertebrae(section: dict, fig=None):
    """Point-error histogram and Genant grade confusion of the per-vertebra section of
    :func:`evaluate` (``result["vertebrae"]``). Returns the Figure."""
    fig = fig or _figure(9, 3.8)
    ax_err, ax_grade = fig.subplots(1, 2)
    V.plot_point_errors(ax_err, section.get("point_error") or {})
    V.plot_grade_confusion(ax_grade, section.get("grade_agreement") or {})
    return fig


def short_name(name: str, most: int = 30) -> str:
    """``name`` cut in the middle to at most ``most`` characters (its start and its end stay)."""
    if len(name) <= most:
        return name
    head = (most - 1) // 2
    return f"{name[:head]}…{name[-(most - 1 - head):]}"


def error_gallery(gallery: dict, fig=None):
    """Overlays of the worst false negatives (top row) and false positives (bottom row) of
    ``result["gallery"]``. Returns the Figure."""
    fn, fp = gallery.get("false_negatives", []), gallery.get("false_positives", [])
    ncols = max(1, len(fn), len(fp))
    fig = fig or _figure(2.8 * ncols, 6.4)
    axes = fig.subplots(2, ncols, squeeze=False)
    for r, (title, items) in enumerate((("worst false negative", fn), ("worst false positive", fp))):
        for c in range(ncols):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(items):
                if c == 0:
                    ax.text(0.5, 0.5, f"no {title.split(' ', 1)[1]} candidates", ha="center", va="center", fontsize="small")
                continue
            it = items[c]
            if it["overlay"]:
                ax.imshow(mpimg.imread(it["overlay"]), cmap="gray")
            else:
                ax.text(0.5, 0.5, "no overlay", ha="center", va="center", fontsize="small")
            flag = {True: "\nerror at balanced thr.", False: "\ncorrect at balanced thr."}.get(it.get("error"), "")
            # a title per column: a long file name would run into its neighbours'
            ax.set_title(f"{title}\n{short_name(it['name'])}{flag}\np_fracture {it['p_fracture']:.3f} | {it['truth']}",
                         fontsize="x-small")
    return fig


def plot_roc_by_grade(df: pd.DataFrame, result: dict, fig=None):
    """The fracture and acute ROC curves beside the AUROC per Genant grade (``roc.png``)."""
    fig = fig or _figure(10, 4.5)
    axes = fig.subplots(1, 2)
    M.plot_roc(axes[0], df, tasks=_roc_tasks(df))
    if result.get("by_grade"):
        M.plot_by_grade(axes[1], {int(k): v for k, v in result["by_grade"].items()})
    else:
        axes[1].axis("off")
    return fig
