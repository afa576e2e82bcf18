r"""Do a landmark data set's annotations follow one convention? An audit from the annotations alone.

Landmark sets annotated over months, or by several people, can disagree on where a corner goes
(on the cortical edge or inside it, how far round the endplate's rim). No reader of the pixels
can follow two conventions at once, so such a disagreement puts a floor under any point error
measured on the set. This audit measures it without a model:

1. **Shape of each film's bodies against its own spine.** Per film, the median body width
   (endplate length) and height, each over the median distance between consecutive body
   centres. Film size and magnification cancel, so films of one population should agree
   whoever annotated them, unless the annotators placed the corners differently.
2. **Per group** of films (the first capture group of ``--group-regex`` in the file name, e.g.
   the acquisition month; films it does not match form the group ``other``): the median of
   those ratios, fitted on ``fit`` films (the training films) and compared with all of them
   pooled (what a model trained on the mixture learns).
3. **The convention floor** on the evaluated films: every annotated point moved to where the
   pooled convention puts it (each body scaled about its centre, in its own frame, by the
   pooled / group ratios along and across its endplates), and the distance in % of the
   annotated body height: the point error of a reader that reads the pooled convention
   *perfectly*. A group with fewer than ``MIN_GROUP_FILMS`` fit films is left as annotated
   (no offset: its median would be mostly noise).
4. **The reading precision a target needs.** Add isotropic Gaussian reading noise of standard
   deviation ``s`` (% of the body height, per axis; the same draws for every ``s``) to that
   floor: the median point error as a function of ``s``, the largest ``s`` that keeps it at
   the target, and, given an observed median (``--observed-median``), the ``s`` it implies. Without
   the floor the median of such noise is ``s * sqrt(2 ln 2)``, about ``1.18 s``.
5. **An upper bound on the annotators' own scatter.** Along a spine, body widths and heights
   change smoothly, so the second differences of consecutive bodies' top-endplate lengths and
   left heights (each between two corners) are mostly annotation noise: with independent
   per-corner noise of sd ``s`` per axis their variance is ``12 s**2``. The robust (MAD) sd of
   those differences over ``sqrt(12)``, in % of the film's median body height, bounds ``s``
   from above (real changes between neighbours, such as scoliotic wedging, add to it). That
   scatter is part of any reader's measured error: a reader can only come as close to the
   annotations as they are to themselves.

Command line::

    python -m evaluation.conventions --vertebrae EVAL/vertebrae.csv [--fit-vertebrae TRAIN/vertebrae.csv] \
        --group-regex='-(\w{3}-\d{4})-' [--target 10] [--observed-median 11.5] [--json OUT.json] [--plot OUT.png]

(the ``=`` keeps a pattern that starts with a dash from reading as an option). Without
``--fit-vertebrae`` the groups are fitted on the evaluated films themselves (said in the output).
Each ``vertebrae.csv`` is read with the ``manifest.csv`` beside it when there is one
(docs/formats.md); only ``image`` and the point columns ``p1x..p6y`` are used.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from data.geometry import POINT_COLUMNS, body_axes, body_height
from data.tables import load_vertebrae_table, read_text_table
from data.io_utils import atomic_write_json, atomic_write_with, missing_file

OTHER = "other"
MIN_BODIES = 3  # a film needs this many bodies for a spacing between consecutive centres
MIN_GROUP_FILMS = 10  # fewer fit films than this: the group's convention is not estimated


class ConventionError(ValueError):
    """An input the audit cannot use (named in the message)."""


def read_films(vertebrae_csv: str | Path) -> dict[str, np.ndarray]:
    """``{image: (n, 6, 2) points}`` from a project ``vertebrae.csv``, bodies sorted top to bottom
    by their centres; bodies with a missing point are left out, films with fewer than
    ``MIN_BODIES`` bodies too."""
    path = Path(vertebrae_csv)
    if not path.is_file():
        raise ConventionError(f"{path}: {missing_file(path, 'vertebrae file')}")
    manifest = path.parent / "manifest.csv"
    if manifest.is_file():
        try:
            table = load_vertebrae_table(path, manifest)
        except ValueError as exc:
            raise ConventionError(str(exc)) from exc
    else:
        table = read_text_table(path)
    missing = [c for c in ["image"] + POINT_COLUMNS if c not in table.columns]
    if missing:
        raise ConventionError(f"{path}: needs the columns image and p1x..p6y; missing {', '.join(missing)}")
    films = {}
    for image, rows in table.groupby("image", sort=False):
        pts = rows[POINT_COLUMNS].apply(pd.to_numeric, errors="coerce").to_numpy(float).reshape(-1, 6, 2)
        pts = pts[np.isfinite(pts).all(axis=(1, 2))]
        pts = pts[np.argsort(pts.mean(axis=1)[:, 1], kind="stable")]
        if len(pts) >= MIN_BODIES:
            films[str(image)] = pts
    if not films:
        raise ConventionError(f"{path}: no film with {MIN_BODIES} or more bodies with all six points")
    return films


def film_shape(points: np.ndarray) -> tuple[float, float]:
    """``(width, height)``: the film's median body width (mean of its two endplates) and height,
    each over the median distance between consecutive body centres."""
    p = np.asarray(points, float).reshape(-1, 6, 2)
    width = (np.linalg.norm(p[:, 2] - p[:, 0], axis=1) + np.linalg.norm(p[:, 5] - p[:, 3], axis=1)) / 2
    spacing = float(np.median(np.linalg.norm(np.diff(p.mean(axis=1), axis=0), axis=1)))
    if spacing <= 0:
        return float("nan"), float("nan")
    return float(np.median(width)) / spacing, float(np.median(body_height(p))) / spacing


def group_of(image: str, pattern: re.Pattern) -> str:
    hit = pattern.search(Path(image).name)
    return hit.group(1) if hit and hit.group(1) is not None else OTHER


def compile_group_regex(group_regex: str) -> re.Pattern:
    try:
        pattern = re.compile(group_regex)
    except re.error as exc:
        raise ConventionError(f"--group-regex {group_regex!r}: {exc}") from exc
    if pattern.groups < 1:
        raise ConventionError(f"--group-regex {group_regex!r} needs a capture group naming the film's group")
    return pattern


def shape_table(films: dict[str, np.ndarray], pattern: re.Pattern) -> pd.DataFrame:
    """One row per film: ``image, group, width, height`` (ratios of :func:`film_shape`)."""
    rows = [(image, group_of(image, pattern), *film_shape(pts)) for image, pts in films.items()]
    return pd.DataFrame(rows, columns=["image", "group", "width", "height"]).dropna()


def convention_offsets(points: np.ndarray, width_scale: float, height_scale: float) -> np.ndarray:
    """Signed offsets (n, 6, 2), along and across each body's endplates in % of its height, that
    move the annotated points to a convention whose bodies are ``width_scale`` x as wide and
    ``height_scale`` x as tall (each body scaled about its centre, in its own frame)."""
    p = np.asarray(points, float).reshape(-1, 6, 2)
    u, v = body_axes(p)
    d = p - p.mean(axis=1, keepdims=True)
    along = (d * u[:, None]).sum(-1) * (width_scale - 1)
    across = (d * v[:, None]).sum(-1) * (height_scale - 1)
    return np.stack([along, across], axis=-1) * (100.0 / body_height(p))[:, None, None]


def scatter_bound(films: dict[str, np.ndarray]) -> dict[str, float | int | None]:
    """Item 5 of the module docstring: ``{"along", "across"}`` upper bounds of the per-corner
    annotation sd (% of each film's median body height) and the number of second differences."""
    along, across = [], []
    for pts in films.values():
        p = np.asarray(pts, float).reshape(-1, 6, 2)
        scale = 100.0 / float(np.median(body_height(p)))
        for length, out in ((np.linalg.norm(p[:, 2] - p[:, 0], axis=1), along),
                            (np.linalg.norm(p[:, 3] - p[:, 0], axis=1), across)):
            out.append((length[:-2] - 2 * length[1:-1] + length[2:]) * scale)
    along, across = np.concatenate(along), np.concatenate(across)

    def bound(d):
        if d.size == 0:
            return None
        return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(12))

    return {"along": bound(along), "across": bound(across), "n_differences": int(along.size)}


def median_with_noise(offsets: np.ndarray, sd: float, draws: np.ndarray) -> float:
    """Median point error (% of height) of ``offsets`` (n, 6, 2) plus ``sd`` x ``draws``."""
    e = offsets + sd * draws
    return float(np.median(np.hypot(e[..., 0], e[..., 1])))


def solve_sd(offsets: np.ndarray, draws: np.ndarray, median: float, hi: float = 100.0) -> float | None:
    """The reading sd at which :func:`median_with_noise` equals ``median`` (bisection: the median
    grows with the sd for these draws); None when even no noise exceeds it."""
    if median_with_noise(offsets, 0.0, draws) > median:
        return None
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if median_with_noise(offsets, mid, draws) > median:
            hi = mid
        else:
            lo = mid
    return lo


def audit(eval_films: dict[str, np.ndarray], group_regex: str, fit_films: dict[str, np.ndarray] | None = None,
          target: float = 10.0, observed_median: float | None = None,
          sds: tuple[float, ...] = (4.0, 5.0, 6.0, 7.0, 8.0, 9.0), seed: int = 0,
          min_group_films: int = MIN_GROUP_FILMS) -> dict:
    """The audit of the module docstring. ``fit_films`` default: the evaluated films."""
    pattern = compile_group_regex(group_regex)
    in_sample = fit_films is None
    fit = shape_table(eval_films if in_sample else fit_films, pattern)
    shapes = shape_table(eval_films, pattern)
    pooled = {"width": float(fit["width"].median()), "height": float(fit["height"].median())}
    counts = fit["group"].value_counts()
    by_group = fit[fit["group"].isin(counts.index[counts >= min_group_films])].groupby("group")[["width", "height"]].median()

    offsets, groups_of_bodies = [], []
    for image, pts in eval_films.items():
        g = group_of(image, pattern)
        if g in by_group.index:
            ws, hs = pooled["width"] / by_group.loc[g, "width"], pooled["height"] / by_group.loc[g, "height"]
        else:
            ws = hs = 1.0
        offsets.append(convention_offsets(pts, ws, hs))
        groups_of_bodies += [g] * len(pts)
    offsets = np.concatenate(offsets)
    groups_of_bodies = np.asarray(groups_of_bodies, dtype=object)
    floor = np.hypot(offsets[..., 0], offsets[..., 1])
    draws = np.random.default_rng(seed).standard_normal(offsets.shape)

    groups = {}
    for g in sorted(set(shapes["group"]) | set(by_group.index)):
        s = shapes[shapes["group"] == g]
        f = fit[fit["group"] == g]
        sel = groups_of_bodies == g
        groups[g] = {
            "n_films_fit": int(len(f)), "n_films_evaluated": int(len(s)),
            "width_over_spacing": float(f["width"].median()) if len(f) else None,
            "height_over_spacing": float(f["height"].median()) if len(f) else None,
            "width_sd": float(f["width"].std()) if len(f) > 1 else None,
            "height_sd": float(f["height"].std()) if len(f) > 1 else None,
            "wider_than_pooled_pct": 100.0 * (float(f["width"].median()) / pooled["width"] - 1) if len(f) else None,
            "taller_than_pooled_pct": 100.0 * (float(f["height"].median()) / pooled["height"] - 1) if len(f) else None,
            "floor_median_pct": float(np.median(floor[sel])) if sel.any() else None,
            "convention_estimated": bool(g in by_group.index),
        }
    out = {
        "group_regex": group_regex, "fitted_on": "the evaluated films (in-sample)" if in_sample else "separate fit films",
        "n_films_fit": int(len(fit)), "n_films_evaluated": int(len(shapes)), "n_vertebrae_evaluated": int(len(offsets)),
        "min_group_films": int(min_group_films),
        "pooled": {"width_over_spacing": pooled["width"], "height_over_spacing": pooled["height"]},
        "groups": groups,
        "floor_median_pct": float(np.median(floor)),
        "floor_corners_median_pct": float(np.median(floor[:, [0, 2, 3, 5]])),
        "floor_middles_median_pct": float(np.median(floor[:, [1, 4]])),
        "target_pct": float(target),
        "median_by_reading_sd": {f"{sd:g}": median_with_noise(offsets, sd, draws) for sd in sds},
        "median_by_reading_sd_without_floor": {f"{sd:g}": median_with_noise(np.zeros_like(offsets), sd, draws) for sd in sds},
        "reading_sd_for_target": solve_sd(offsets, draws, target),
        "reading_sd_for_target_without_floor": solve_sd(np.zeros_like(offsets), draws, target),
        "seed": seed,
    }
    out["annotation_scatter_bound_pct"] = scatter_bound(eval_films)
    if observed_median is not None:
        out["observed_median_pct"] = float(observed_median)
        out["reading_sd_implied_by_observed"] = solve_sd(offsets, draws, observed_median)
    return out


def plot_shapes(films: dict[str, np.ndarray], group_regex: str, path: str | Path) -> Path:
    """Scatter of each film's body width against height (over its spacing), one colour per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = shape_table(films, compile_group_regex(group_regex))
    fig, ax = plt.subplots(figsize=(6, 5))
    for g, s in shapes.groupby("group"):
        ax.scatter(s["width"], s["height"], s=12, alpha=0.6, label=f"{g} ({len(s)})")
        ax.plot(s["width"].median(), s["height"].median(), "k+", ms=12)
    ax.set_xlabel("body width / centre spacing (film median)")
    ax.set_ylabel("body height / centre spacing (film median)")
    ax.set_title("Annotated body shape by group (+: group median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write_with(path, lambda fh: fig.savefig(fh, format="png", dpi=120))
    plt.close(fig)
    return path


def _fmt(v, digits=2):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.conventions", description=__doc__.split("\n\n")[0])
    p.add_argument("--vertebrae", type=Path, required=True, help="vertebrae.csv of the evaluated films")
    p.add_argument("--fit-vertebrae", type=Path, default=None,
                   help="vertebrae.csv of the films the groups are fitted on (e.g. the training films); "
                        "default: the evaluated films themselves")
    p.add_argument("--group-regex", required=True,
                   help="a regular expression whose first capture group, searched in each file name, names "
                        "the film's group (e.g. --group-regex='-(\\w{3}-\\d{4})-' for the AASCE acquisition month)")
    p.add_argument("--target", type=float, default=10.0, help="median point error target, %% of the body height")
    p.add_argument("--observed-median", type=float, default=None,
                   help="a reader's observed median point error on the same films (%% of height): report the "
                        "reading sd it implies")
    p.add_argument("--min-group-films", type=int, default=MIN_GROUP_FILMS,
                   help="groups with fewer fit films get no offset (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--plot", type=Path, default=None, help="write the body-shape scatter here (PNG)")
    args = p.parse_args(argv)
    try:
        films = read_films(args.vertebrae)
        fit = read_films(args.fit_vertebrae) if args.fit_vertebrae else None
        result = audit(films, args.group_regex, fit, target=args.target, observed_median=args.observed_median,
                       seed=args.seed, min_group_films=args.min_group_films)
    except ConventionError as exc:
        p.error(str(exc))
    print(f"{result['n_films_evaluated']} films evaluated, groups fitted on {result['n_films_fit']} "
          f"({result['fitted_on']}); pooled body width {result['pooled']['width_over_spacing']:.3f} and height "
          f"{result['pooled']['height_over_spacing']:.3f} x the centre spacing")
    for g, q in result["groups"].items():
        print(f"  {g:<16} fit {q['n_films_fit']:4d}  evaluated {q['n_films_evaluated']:4d}  width {_fmt(q['width_over_spacing'], 3)} "
              f"({_fmt(q['wider_than_pooled_pct'], 1)} %)  height {_fmt(q['height_over_spacing'], 3)} "
              f"({_fmt(q['taller_than_pooled_pct'], 1)} %)  floor median {_fmt(q['floor_median_pct'])}"
              + ("" if q["convention_estimated"] else f"  (under {result['min_group_films']} fit films: no offset)"))
    print(f"convention floor (a perfect reader of the pooled convention), median % of height: "
          f"{result['floor_median_pct']:.2f} (corners {result['floor_corners_median_pct']:.2f}, "
          f"middle points {result['floor_middles_median_pct']:.2f})")
    for sd, med in result["median_by_reading_sd"].items():
        print(f"  reading sd {sd:>4}: median {med:5.2f} (without the floor {result['median_by_reading_sd_without_floor'][sd]:5.2f})")
    print(f"largest reading sd for a median of {args.target:g}: {_fmt(result['reading_sd_for_target'])} "
          f"(without the floor {_fmt(result['reading_sd_for_target_without_floor'])})")
    bound = result["annotation_scatter_bound_pct"]
    print(f"annotators' own scatter per corner, upper bound from roughness along the spine: along the endplates "
          f"{_fmt(bound['along'])}, across {_fmt(bound['across'])} % of the body height")
    if args.observed_median is not None:
        print(f"an observed median of {args.observed_median:g} implies a reading sd of "
              f"{_fmt(result['reading_sd_implied_by_observed'])}")
    if args.json:

        atomic_write_json(args.json, result)
    if args.plot:
        plot_shapes(films if fit is None else {**fit, **films}, args.group_regex, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
