"""Per-vertebra evaluation: predicted vertebrae (``OUT/vertebrae.csv`` of ``infer.py``) against
the truth ``vertebrae.csv`` (``docs/formats.md``).

Why a geometric match: a predicted level label can be wrong (a film without the sacrum or
the twelfth rib gives little to count from), so pairing predictions with truth by level would
mix up "found the wrong vertebra" with "named the right vertebra wrongly". Vertebrae are paired
by position first, and the level is then scored as a separate metric.

Rules
-----
* **Body centre** = mean of the six morphometry points; **mean height** of a truth vertebra =
  mean of ``|p1p4|``, ``|p2p5|``, ``|p3p6|`` (anterior, middle, posterior heights).
* **Matching**, per image: one-to-one, by ``scipy.optimize.linear_sum_assignment`` on the
  distance between body centres. A pair is valid only when that distance is below
  ``0.5 x`` the truth vertebra's mean height (the *gate*). Among valid pairs the assignment
  first maximises the number of matches, then minimises the total distance.
* **Images**: joined on :func:`data.tables.path_key`. Only images with an ok prediction
  count (``evaluated_images``: the ok rows of ``predictions.csv`` when given, else the images
  that appear in the predicted table). Truth images without one are left out and counted;
  predicted images with no truth vertebrae are left out and counted.
* Truth vertebrae without six finite points (or with a zero mean height) cannot be located;
  they are left out of every per-vertebra metric and counted. Predicted vertebrae without six
  finite points match nothing and count as false positives.
* **Per-vertebra AUROC**: a truth vertebra that no prediction matched gets score **0.0** (the
  model did not report it, so it did not call it fractured). This keeps missed fractures in the
  metric as misses instead of silently dropping them; the number so scored is reported.
* Unknown labels (empty ``genant_grade``, ``acute``, ``level``) are left out of the metric that
  needs them and counted, never taken as negative.

These are research metrics; on synthetic phantom films they say nothing about clinical
performance.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import cohen_kappa_score, confusion_matrix

from data.geometry import POINT_COLUMNS, body_height, table_points
from data.tables import PREDICTED_VERTEBRA_REQUIRED, load_predicted_vertebrae, path_key
from evaluation import metrics as M

__all__ = [
    "POINT_COLUMNS",
    "PREDICTED_REQUIRED_COLUMNS",
    "GATE_FRACTION",
    "UNMATCHED_SCORE",
    "load_predicted_vertebrae",
    "body_centres",
    "mean_heights",
    "match_vertebrae",
    "point_errors",
    "summarise_vertebrae",
    "plot_point_errors",
    "plot_grade_confusion",
]

PREDICTED_REQUIRED_COLUMNS = PREDICTED_VERTEBRA_REQUIRED
GATE_FRACTION = 0.5
UNMATCHED_SCORE = 0.0
GRADE_LABELS = [0, 1, 2, 3]
# percentage-of-height bins of the point-error histogram stored in metrics.json
_HIST_EDGES_PCT = [float(x) for x in np.arange(0.0, 50.0 + 1e-9, 2.5)]


# --------------------------------------------------------------------------- geometry
def body_centres(df: pd.DataFrame) -> np.ndarray:
    """(n, 2) body centres: the mean of the six points (NaN when any point is missing)."""
    return table_points(df).mean(axis=1)


def mean_heights(df: pd.DataFrame) -> np.ndarray:
    """(n,) mean of the anterior (|p1p4|), middle (|p2p5|) and posterior (|p3p6|) heights."""
    return body_height(table_points(df))


def _assign(truth_centres: np.ndarray, gates: np.ndarray, pred_centres: np.ndarray) -> list[tuple[int, int, float]]:
    """Valid one-to-one pairs ``(truth_i, pred_j, distance)``: the largest number of pairs whose
    centre distance is below the truth's gate, and among those the smallest total distance."""
    if len(truth_centres) == 0 or len(pred_centres) == 0:
        return []
    dist = np.linalg.norm(truth_centres[:, None, :] - pred_centres[None, :, :], axis=2)
    valid = np.isfinite(dist) & (dist < gates[:, None])
    if not valid.any():
        return []
    # An invalid pair costs more than all valid pairs together, so no valid match is ever
    # given up to shorten the others.
    penalty = float(dist[valid].sum()) + 1.0
    cost = np.where(valid, dist, penalty)
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j), float(dist[i, j])) for i, j in zip(rows, cols) if valid[i, j]]


# --------------------------------------------------------------------------- matching
_TRUTH_FIELDS = {"level": "truth_level", "genant_grade": "truth_grade", "morphology": "truth_morphology",
                 "acute": "truth_acute"}
_PRED_FIELDS = {"name": "name", "level": "pred_level", "level_confidence": "pred_level_confidence",
                "detection_score": "pred_detection_score", "p_fracture": "pred_p_fracture",
                "p_acute": "pred_p_acute", "genant_grade": "pred_grade", "morphology": "pred_morphology"}


def _evaluated_keys(pred_df: pd.DataFrame, evaluated_images: Iterable[str] | None) -> set[str]:
    if evaluated_images is None:
        return {path_key(p) for p in pred_df["image"]}
    return {path_key(p) for p in evaluated_images}


def match_vertebrae(pred_df: pd.DataFrame, truth_df: pd.DataFrame,
                    evaluated_images: Iterable[str] | None = None) -> pd.DataFrame:
    """Pair predicted with truth vertebrae, image by image (rules in the module docstring).

    ``pred_df``: :func:`load_predicted_vertebrae`; ``truth_df``:
    :func:`evaluation.metrics.load_vertebrae_table`. ``evaluated_images``: the images with an ok
    prediction (e.g. the ok rows of ``predictions.csv``, so that an image where the model found
    no vertebra still counts); default: the images in ``pred_df``.

    Returns one row per locatable truth vertebra of an evaluated image (``status`` "matched"
    or "missed") followed by one row per unmatched prediction (``status`` "false_positive",
    ``false_positive`` True). Columns: ``image``, ``key``, ``status``, ``matched``,
    ``false_positive``, ``truth_index`` / ``pred_index`` (row in the input table, -1 for none),
    ``truth_level``, ``truth_grade``, ``truth_morphology``, ``truth_acute``,
    ``truth_mean_height``, ``name``, ``pred_level``, ``pred_level_confidence``,
    ``pred_detection_score``, ``pred_p_fracture``, ``pred_p_acute``, ``pred_grade``,
    ``pred_morphology``, ``centre_distance``, ``error_p1`` .. ``error_p6`` (pixels) and
    ``error_pct_p1`` .. ``error_pct_p6`` (% of the truth mean height); NaN where not defined.

    ``attrs`` holds the counts: ``n_truth_images``, ``n_evaluated_images`` (evaluated images
    with truth vertebrae), ``n_truth_images_without_prediction``,
    ``n_predicted_images_without_truth``, ``n_predicted_vertebrae_without_truth``,
    ``n_truth_without_points``, ``n_pred_without_points``.
    """
    truth = truth_df.reset_index(drop=True)
    pred = pred_df.reset_index(drop=True)
    t_keys = np.array([path_key(p) for p in truth["image"]], dtype=object)
    p_keys = np.array([path_key(p) for p in pred["image"]], dtype=object)
    evaluated = _evaluated_keys(pred, evaluated_images)
    truth_images = set(t_keys)

    t_pts, p_pts = table_points(truth), table_points(pred)
    t_centre, p_centre = t_pts.mean(axis=1), p_pts.mean(axis=1)
    t_height = mean_heights(truth)
    t_locatable = np.isfinite(t_pts).all(axis=(1, 2)) & np.isfinite(t_height) & (t_height > 0)
    p_locatable = np.isfinite(p_pts).all(axis=(1, 2))

    t_in = np.array([k in evaluated for k in t_keys], dtype=bool)
    p_in = np.array([k in evaluated and k in truth_images for k in p_keys], dtype=bool)

    rows: list[dict] = []
    fp_rows: list[dict] = []
    for key in sorted(evaluated & truth_images):
        ti = np.flatnonzero((t_keys == key) & t_locatable)
        pj = np.flatnonzero((p_keys == key) & p_in)
        pj_loc = pj[p_locatable[pj]]
        pairs = _assign(t_centre[ti], GATE_FRACTION * t_height[ti], p_centre[pj_loc])
        pred_of = {ti[a]: (pj_loc[b], d) for a, b, d in pairs}
        for i in ti:
            j, d = pred_of.get(i, (-1, float("nan")))
            rows.append(_row(truth, pred, i, j, d, t_pts, p_pts, t_height))
        used = {j for j, _ in pred_of.values()}
        for j in pj:
            if j not in used:
                fp_rows.append(_row(truth, pred, -1, j, float("nan"), t_pts, p_pts, t_height))

    columns = _match_columns()
    table = pd.DataFrame(rows + fp_rows, columns=columns)
    # fixed dtypes, so that an empty table still masks and sums like a full one
    text = {"image", "key", "status", "truth_level", "truth_morphology", "name", "pred_level", "pred_morphology"}
    table = table.astype({c: (bool if c in ("matched", "false_positive") else int if c.endswith("_index")
                              else object if c in text else float) for c in columns})
    table.attrs = {
        "n_truth_images": int(len(truth_images)),
        "n_evaluated_images": int(len(evaluated & truth_images)),
        "n_truth_images_without_prediction": int(len(truth_images - evaluated)),
        "n_predicted_images_without_truth": int(len({k for k in p_keys if k in evaluated} - truth_images)),
        "n_predicted_vertebrae_without_truth": int(sum(1 for k in p_keys if k in evaluated and k not in truth_images)),
        "n_truth_without_points": int((t_in & ~t_locatable).sum()),
        "n_pred_without_points": int((p_in & ~p_locatable).sum()),
    }
    return table


def _match_columns() -> list[str]:
    return (["image", "key", "status", "matched", "false_positive", "truth_index", "pred_index"]
            + list(_TRUTH_FIELDS.values()) + ["truth_mean_height"] + list(_PRED_FIELDS.values())
            + ["centre_distance"] + [f"error_p{k}" for k in range(1, 7)] + [f"error_pct_p{k}" for k in range(1, 7)])


def _row(truth, pred, i, j, distance, t_pts, p_pts, t_height) -> dict:
    has_t, has_p = i >= 0, j >= 0
    image = truth.at[i, "image"] if has_t else pred.at[j, "image"]
    row: dict[str, Any] = {"image": image, "key": path_key(image),
                           "status": "matched" if has_t and has_p else ("missed" if has_t else "false_positive"),
                           "matched": bool(has_t and has_p), "false_positive": bool(has_p and not has_t),
                           "truth_index": int(i), "pred_index": int(j)}
    for src, dst in _TRUTH_FIELDS.items():
        val = truth.at[i, src] if has_t and src in truth.columns else np.nan
        if src in ("level", "morphology"):
            val = "" if (val is None or (isinstance(val, float) and math.isnan(val))) else str(val).strip()
        row[dst] = val
    row["truth_mean_height"] = float(t_height[i]) if has_t else np.nan
    for src, dst in _PRED_FIELDS.items():
        val = pred.at[j, src] if has_p and src in pred.columns else np.nan
        if src in ("name", "level", "morphology") and not has_p:
            val = ""
        row[dst] = val
    row["centre_distance"] = distance
    if has_t and has_p:
        err = np.linalg.norm(t_pts[i] - p_pts[j], axis=1)
        pct = 100.0 * err / t_height[i]
    else:
        err = pct = np.full(6, np.nan)
    for k in range(6):
        row[f"error_p{k + 1}"] = float(err[k])
        row[f"error_pct_p{k + 1}"] = float(pct[k])
    return row


def point_errors(matches: pd.DataFrame, percent: bool = False) -> np.ndarray:
    """(n_matched, 6) point errors of the matched vertebrae of :func:`match_vertebrae`, in
    pixels or (``percent``) as % of the truth vertebra's mean height."""
    m = matches[matches["matched"]]
    cols = [f"error_pct_p{k}" if percent else f"error_p{k}" for k in range(1, 7)]
    return m[cols].to_numpy(float).reshape(len(m), 6)


# --------------------------------------------------------------------------- summary
def _quantiles(values: np.ndarray) -> dict:
    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"median": float("nan"), "p90": float("nan"), "mean": float("nan")}
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
            "mean": float(values.mean())}


def _detection(matches: pd.DataFrame) -> dict:
    n_matched = int(matches["matched"].sum())
    n_missed = int((matches["status"] == "missed").sum())
    n_fp = int(matches["false_positive"].sum())
    n_truth, n_pred = n_matched + n_missed, n_matched + n_fp
    return {"recall": n_matched / n_truth if n_truth else float("nan"),
            "precision": n_matched / n_pred if n_pred else float("nan"),
            "n_truth": n_truth, "n_predicted": n_pred, "n_matched": n_matched, "n_missed": n_missed,
            "n_false_positive": n_fp,
            "gate": f"body-centre distance < {GATE_FRACTION} x the truth vertebra's mean height"}


def _point_error(matches: pd.DataFrame) -> dict:
    px, pct = point_errors(matches), point_errors(matches, percent=True)
    out: dict[str, Any] = {"n_vertebrae": int(len(px)), "n_points": int(px.size),
                           "pixels": _quantiles(px), "percent_height": _quantiles(pct), "per_point": {}}
    for k in range(6):
        qpx, qpct = _quantiles(px[:, k]), _quantiles(pct[:, k])
        out["per_point"][f"p{k + 1}"] = {"median_px": qpx["median"], "p90_px": qpx["p90"],
                                         "median_pct": qpct["median"], "p90_pct": qpct["p90"]}
    flat = pct.ravel()
    flat = flat[np.isfinite(flat)]
    counts, _ = np.histogram(np.minimum(flat, _HIST_EDGES_PCT[-1]), bins=_HIST_EDGES_PCT)
    out["histogram_percent_height"] = {"bin_edges": list(_HIST_EDGES_PCT), "counts": counts.tolist(),
                                       "n_above_last_edge": int((flat > _HIST_EDGES_PCT[-1]).sum())}
    return out


def _accuracy_of(m: pd.DataFrame) -> dict:
    correct = (m["pred_level"].astype(str).str.strip().str.upper()
               == m["truth_level"].astype(str).str.strip().str.upper())
    n = int(len(m))
    return {"accuracy": float(correct.mean()) if n else float("nan"), "n_correct": int(correct.sum()), "n": n}


def _level_accuracy(matches: pd.DataFrame, levels_trusted: Mapping[str, bool] | None) -> dict:
    m = matches[matches["matched"]]
    known = m["truth_level"].astype(str).str.strip() != ""
    out = {**_accuracy_of(m[known]), "n_truth_level_unknown": int((~known).sum()),
           "n_predicted_level_empty": int((m.loc[known, "pred_level"].astype(str).str.strip() == "").sum())}
    if levels_trusted:
        trusted = m.loc[known, "key"].map(lambda k: levels_trusted.get(k))
        mk = m[known]
        out["by_levels_trusted"] = {
            "true": _accuracy_of(mk[trusted == True]),  # noqa: E712 - None stays out of both
            "false": _accuracy_of(mk[trusted == False]),  # noqa: E712
            "n_unknown": int(trusted.isna().sum()),
        }
    return out


def _scores(rows: pd.DataFrame, column: str) -> np.ndarray:
    """Predicted score of each truth vertebra, ``UNMATCHED_SCORE`` where none matched."""
    s = rows[column].to_numpy(float).copy()
    s[~rows["matched"].to_numpy(bool)] = UNMATCHED_SCORE
    return s


def _auroc_block(pos: pd.DataFrame, neg: pd.DataFrame, column: str) -> dict:
    """AUROC of ``column`` for ``pos`` vs ``neg`` truth vertebrae. Matched vertebrae with an
    empty score are left out and counted; unmatched ones score ``UNMATCHED_SCORE``."""
    both = pd.concat([pos.assign(_y=1.0), neg.assign(_y=0.0)])
    s = _scores(both, column)
    ok = np.isfinite(s)
    y = both["_y"].to_numpy(float)[ok]
    return {"auroc": M.binary_auroc(y, s[ok]) if ok.any() else float("nan"),
            "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum()),
            "n_unmatched_scored_zero": int((~both["matched"].to_numpy(bool)).sum()),
            "n_missing_score": int((~ok).sum())}


def _grade_agreement(matches: pd.DataFrame) -> dict:
    m = matches[matches["matched"] & matches["truth_grade"].notna()]
    has_pred = m["pred_grade"].notna()
    t = m.loc[has_pred, "truth_grade"].to_numpy(float).astype(int)
    p = m.loc[has_pred, "pred_grade"].to_numpy(float).astype(int)
    n = int(t.size)
    if n and len(set(t.tolist()) | set(p.tolist())) > 1:
        kappa = float(cohen_kappa_score(t, p, labels=GRADE_LABELS, weights="quadratic"))
    else:
        kappa = float("nan")  # undefined with a single grade on both sides
    matrix = (confusion_matrix(t, p, labels=GRADE_LABELS) if n else np.zeros((4, 4), int)).tolist()
    return {"kappa_quadratic": kappa, "exact_agreement": float((t == p).mean()) if n else float("nan"),
            "n": n, "labels": GRADE_LABELS, "matrix": matrix,
            "n_truth_grade_unknown": int((matches["matched"] & matches["truth_grade"].isna()).sum()),
            "n_predicted_grade_missing": int((~has_pred).sum())}


def _level_order_key(level: str):
    order = [f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 14)] + [f"L{i}" for i in range(1, 7)] + ["S1"]
    return (order.index(level), "") if level in order else (len(order), level)


def summarise_vertebrae(pred_df: pd.DataFrame, truth_df: pd.DataFrame,
                        evaluated_images: Iterable[str] | None = None,
                        levels_trusted: Mapping[str, bool] | None = None,
                        min_level_fractured: int = 5) -> dict:
    """Every per-vertebra metric in one JSON-serialisable dict (NaN written as ``None``).

    Arguments as in :func:`match_vertebrae`; ``levels_trusted`` maps an image's path key
    (:func:`data.tables.path_key`) to the ``levels_trusted`` of its inference JSON and
    adds ``level_accuracy.by_levels_trusted``. Levels with fewer than ``min_level_fractured``
    fractured truth vertebrae get ``auroc_by_level[level].auroc`` None.

    Keys: ``rules``, ``counts``, ``detection``, ``point_error``, ``level_accuracy``,
    ``auroc_fracture``, ``auroc_acute``, ``grade_agreement``, ``auroc_by_grade``,
    ``auroc_by_level`` (see ``docs/formats.md``).
    """
    matches = match_vertebrae(pred_df, truth_df, evaluated_images)
    counts = dict(matches.attrs)
    truth_rows = matches[matches["status"] != "false_positive"]
    graded = truth_rows[truth_rows["truth_grade"].notna()]
    fractured = graded[graded["truth_grade"] > 0]
    normal = graded[graded["truth_grade"] == 0]

    acute_known = fractured[fractured["truth_acute"].notna()]
    auroc_acute = _auroc_block(acute_known[acute_known["truth_acute"] == 1],
                               acute_known[acute_known["truth_acute"] == 0], "pred_p_acute")
    auroc_acute["n_unknown_left_out"] = int(fractured["truth_acute"].isna().sum())
    auroc_fracture = _auroc_block(fractured, normal, "pred_p_fracture")
    auroc_fracture["n_unknown_left_out"] = int(truth_rows["truth_grade"].isna().sum())

    by_grade = {}
    for g in (1, 2, 3):
        by_grade[str(g)] = _auroc_block(graded[graded["truth_grade"] == g], normal, "pred_p_fracture")
    by_level = {}
    levels = sorted({lv for lv in graded["truth_level"].astype(str).str.strip() if lv}, key=_level_order_key)
    for level in levels:
        at = graded[graded["truth_level"].astype(str).str.strip() == level]
        block = _auroc_block(at[at["truth_grade"] > 0], at[at["truth_grade"] == 0], "pred_p_fracture")
        if block["n_pos"] < min_level_fractured:
            block["auroc"] = float("nan")
            block["note"] = f"n/a: {block['n_pos']} fractured vertebra(e), fewer than {min_level_fractured}"
        by_level[level] = block

    out = {
        "rules": {
            "matching": "per image, one-to-one (scipy linear_sum_assignment) on body-centre distance "
                        "(centre = mean of the 6 points)",
            "gate": f"a pair is valid when the centre distance < {GATE_FRACTION} x the truth vertebra's mean "
                    "height (mean of |p1p4|, |p2p5|, |p3p6|)",
            "unmatched_truth_score": UNMATCHED_SCORE,
            "auroc_by_level_negatives": "grade-0 truth vertebrae at the same level",
            "auroc_by_grade_negatives": "grade-0 truth vertebrae",
            "min_level_fractured": int(min_level_fractured),
        },
        "counts": counts,
        "detection": _detection(matches),
        "point_error": _point_error(matches),
        "level_accuracy": _level_accuracy(matches, levels_trusted),
        "auroc_fracture": auroc_fracture,
        "auroc_acute": auroc_acute,
        "grade_agreement": _grade_agreement(matches),
        "auroc_by_grade": by_grade,
        "auroc_by_level": by_level,
    }
    return M.json_ready(out)


# --------------------------------------------------------------------------- plots
def plot_point_errors(ax, errors, title: str | None = None):
    """Histogram of point errors as % of the truth vertebra's mean height, with the median
    and 90th percentile marked. ``errors``: the ``point_error`` dict of
    :func:`summarise_vertebrae` (drawn from its stored histogram) or raw % errors (any shape,
    e.g. ``point_errors(matches, percent=True)``). Returns ``ax``."""
    if isinstance(errors, Mapping):
        hist = errors.get("histogram_percent_height") or {}
        edges = np.asarray(hist.get("bin_edges") or _HIST_EDGES_PCT, dtype=float)
        counts = np.asarray(hist.get("counts") or np.zeros(len(edges) - 1), dtype=float)
        n_above = int(hist.get("n_above_last_edge") or 0)
        q = errors.get("percent_height") or {}
        median, p90 = q.get("median"), q.get("p90")
    else:
        flat = np.asarray(errors, dtype=float).ravel()
        flat = flat[np.isfinite(flat)]
        edges = np.asarray(_HIST_EDGES_PCT, dtype=float)
        counts, _ = np.histogram(np.minimum(flat, edges[-1]), bins=edges)
        n_above = int((flat > edges[-1]).sum())
        median = float(np.median(flat)) if flat.size else None
        p90 = float(np.percentile(flat, 90)) if flat.size else None
    if counts.sum() == 0:
        ax.text(0.5, 0.5, "no matched vertebrae", ha="center", va="center")
        ax.axis("off")
        return ax
    ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue", edgecolor="white")
    for value, name, style in ((median, "median", "-"), (p90, "90th pct", "--")):
        if value is not None and math.isfinite(value):
            ax.axvline(min(value, edges[-1]), color="k", ls=style, lw=1, label=f"{name} {value:.1f} %")
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("point error, % of truth vertebra mean height" + (f" ({n_above} beyond, in last bin)" if n_above else ""))
    ax.set_ylabel("points (6 per matched vertebra)")
    ax.set_title(title or "morphometry point error", fontsize="small")
    ax.legend(fontsize="small")
    return ax


def plot_grade_confusion(ax, grade_agreement: Mapping, title: str | None = None):
    """Genant grade confusion (truth rows x predicted columns) of matched vertebrae, from the
    ``grade_agreement`` dict of :func:`summarise_vertebrae`, with kappa and agreement in the
    title. Returns ``ax``."""
    mat = np.asarray(grade_agreement.get("matrix") or np.zeros((4, 4)), dtype=int)
    if mat.sum() == 0:
        ax.text(0.5, 0.5, "no matched vertebrae with a known grade", ha="center", va="center")
        ax.axis("off")
        return ax
    ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(1, int(mat.max())))
    for (i, j), v in np.ndenumerate(mat):
        ax.text(j, i, str(v), ha="center", va="center", fontsize="small",
                color="white" if v > 0.6 * mat.max() else "black")
    ax.set_xticks(range(4), [str(g) for g in GRADE_LABELS])
    ax.set_yticks(range(4), [str(g) for g in GRADE_LABELS])
    ax.set_xlabel("predicted Genant grade")
    ax.set_ylabel("true Genant grade")

    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"

    ax.set_title(title or (f"matched vertebrae (n={grade_agreement.get('n')}): kappa "
                           f"{fmt(grade_agreement.get('kappa_quadratic'))}, agreement "
                           f"{fmt(grade_agreement.get('exact_agreement'))}"), fontsize="small")
    return ax
