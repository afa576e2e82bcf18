"""Per-vertebra inference: inference/vertebrae.py (decode, order, count levels, read crops, measure,
combine with the film), its outputs in inference/pipeline.py (JSON, vertebrae.csv, calibration,
DICOM SR) and the drawing in inference/drawing.py.

The networks are untrained: the film network's ``vertebra_logits`` are replaced by hand-built
peaks (:class:`_InjectVertebrae`) and the crop network by a stub returning fixed crop points
(:class:`_StubCropNet`), so every output has a value known in advance. Everything runs on CPU
in a few seconds.
"""
import json
import math

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from data.morphometry import LEVELS, grade_vertebrae
from data.phantom2d import generate_dataset
from data.vertebra_targets import CROP_CONTEXT, CROP_SIZE, OFFSET_SCALE, VERTEBRA_CHANNELS
from data.transforms import Letterbox
from inference.vertebrae import (FILL_DRIFT, MAX_BODY_OVERLAP, MAX_GAP_FILL, OVERHANG, TRUSTED_LEVEL_CONFIDENCE, analyse_film, assign_levels,
                              count_positions,
                              decode_detections, describe_vertebrae, fracture_map, fracture_peak, gap_proposals,
                              combine_with_morphometry, duplicate_bodies, image_probabilities, kept_bodies, read_crops,
                              spine_order, with_morphometry)
from inference.drawing import GRADE_COLOURS, draw_vertebrae
from data.records import VertebraRecord
from inference.predictor import FilmPrediction
from training_config import phantom_as_dicom, save_untrained_checkpoint

STRIDE = 8
IMAGE_SIZE = (128, 96)  # network input; phantom films are 128 x 104, so the letterbox scales and pads
HALF = (CROP_SIZE - 1) / 2.0  # crop pixel centre
CELL_UNIT = STRIDE * OFFSET_SCALE


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def _box(cx, cy, w, h):
    """Six points of an axis-aligned body: p1-p3 the superior endplate (left to right), p4-p6
    the inferior one."""
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    return np.array([[x0, y0], [cx, y0], [x1, y0], [x0, y1], [cx, y1], [x1, y1]], dtype=np.float64)


def _cell_centre(i, j):
    return (np.array([j, i], dtype=np.float64) + 0.5) * STRIDE - 0.5


def _logits_with(bodies, grid_hw, background=-10.0):
    """A (30, h, w) stage-1 output: for each (cell (i, j), centre logit, points in input pixels,
    level index or None) a peak whose offsets encode the points and whose level logits favour
    that level."""
    out = torch.zeros(VERTEBRA_CHANNELS, *grid_hw)
    out[0] = background
    for (i, j), centre_logit, points, level in bodies:
        out[0, i, j] = centre_logit
        offsets = (np.asarray(points, dtype=np.float64) - _cell_centre(i, j)) / CELL_UNIT
        out[1:13, i, j] = torch.tensor(offsets.reshape(-1), dtype=torch.float32)
        if level is not None:
            out[13 + level, i, j] = 6.0
    return out


# --------------------------------------------------------------------------- decode_detections
def test_decode_detections_finds_the_peaks_recovers_points_and_levels():
    h, w = 12, 10
    spec = [((2, 3), 4.0, _box(27.0, 22.5, 14.0, 9.0), LEVELS.index("T12")),
            ((6, 5), 3.0, _box(44.25, 52.0, 15.5, 10.0), LEVELS.index("L1")),
            ((9, 2), 1.0, _box(20.0, 75.75, 16.0, 11.0), LEVELS.index("L5"))]
    logits = _logits_with(spec, (h, w))
    logits[0, 2, 4] = 3.5  # a neighbour of the strongest peak: suppressed by the 3 x 3 NMS
    logits[0, 10, 8] = -1.5  # an isolated peak below the default min_score (sigmoid 0.18)

    found = decode_detections(logits, STRIDE)
    assert len(found) == 3
    assert [d["score"] for d in found] == pytest.approx([_sigmoid(4.0), _sigmoid(3.0), _sigmoid(1.0)], abs=1e-6)
    for d, (_, _, points, level) in zip(found, spec):  # sorted by score, strongest first
        assert d["points"].shape == (6, 2)
        np.testing.assert_allclose(d["points"], points, atol=1e-4)
        assert d["level_logp"].shape == (17,)
        assert int(np.argmax(d["level_logp"])) == level
        assert np.exp(d["level_logp"]).sum() == pytest.approx(1.0, abs=1e-6)

    strong = decode_detections(logits, STRIDE, min_score=0.9)
    assert len(strong) == 2 and min(d["score"] for d in strong) >= 0.9
    assert len(decode_detections(logits, STRIDE, min_score=0.1)) == 4  # the isolated weak peak too
    assert len(decode_detections(logits, STRIDE, max_vertebrae=2)) == 2
    assert decode_detections(torch.full((VERTEBRA_CHANNELS, h, w), -10.0), STRIDE) == []


def test_decode_detections_nms_keeps_the_higher_of_two_adjacent_cells():
    pts_a, pts_b = _box(30.0, 30.0, 12.0, 8.0), _box(38.0, 30.0, 12.0, 8.0)
    for first, second in ((2.0, 2.5), (2.5, 2.0)):
        logits = _logits_with([((3, 3), first, pts_a, 0), ((3, 4), second, pts_b, 1)], (8, 8))
        found = decode_detections(logits, STRIDE)
        assert len(found) == 1
        np.testing.assert_allclose(found[0]["points"], pts_a if first > second else pts_b, atol=1e-4)
        # diagonal neighbours are suppressed too
        logits = _logits_with([((3, 3), first, pts_a, 0), ((4, 4), second, pts_b, 1)], (8, 8))
        assert len(decode_detections(logits, STRIDE)) == 1


def test_decode_detections_nms_does_not_duplicate_saturated_peaks():
    logits = _logits_with([((3, 3), 20.0, _box(30.0, 30.0, 12.0, 8.0), 0),
                           ((3, 4), 18.0, _box(38.0, 30.0, 12.0, 8.0), 1)], (8, 8))
    assert len(decode_detections(logits, STRIDE)) == 1


# --------------------------------------------------------------------------- spine_order
@pytest.mark.parametrize("tilt_deg", [0.0, 30.0, -55.0, 80.0])
def test_spine_order_runs_head_to_feet_on_a_tilted_spine(tilt_deg):
    a = np.deg2rad(tilt_deg)
    down = np.array([np.sin(a), np.cos(a)])  # along the spine, towards the feet (y grows)
    across = np.array([down[1], -down[0]])
    jitter = np.array([3.0, -3.0, 2.5, -2.0, 3.0, -3.0, 2.0])  # a scoliotic wobble across the axis
    centres = np.array([200.0, 200.0]) + np.outer(np.arange(7) * 22.0, down) + np.outer(jitter, across)
    bodies = np.stack([_box(x, y, 16.0, 12.0) for x, y in centres])
    shuffled = np.array([4, 0, 6, 2, 5, 1, 3])
    order = spine_order(bodies[shuffled])
    assert shuffled[order].tolist() == list(range(7))
    if tilt_deg == 80.0:  # nearly horizontal: sorting by y alone would get it wrong
        assert np.argsort(centres[:, 1]).tolist() != list(range(7))


def test_spine_order_of_two_bodies_is_top_to_bottom():
    bodies = np.stack([_box(50, 90, 10, 8), _box(52, 60, 10, 8)])
    assert spine_order(bodies).tolist() == [1, 0]


# --------------------------------------------------------------------------- assign_levels
def _column(n, spacing=30.0, skip=()):
    """n bodies down a vertical spine, evenly spaced, minus those at the positions in ``skip``."""
    return np.stack([_box(100.0, 50.0 + k * spacing, 36.0, 24.0) for k in range(n) if k not in skip])


def _logp(favoured, strength=8.0):
    """(n, 17) log-probabilities; row k favours level ``favoured[k]`` (None: uninformative)."""
    z = np.zeros((len(favoured), 17))
    for k, lvl in enumerate(favoured):
        if lvl is not None:
            z[k, LEVELS.index(lvl)] = strength
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_assign_levels_confident_run():
    names = ["L1", "L2", "L3", "L4", "L5"]
    out = assign_levels(_column(5), _logp(names))
    assert out["levels"] == names and out["positions"] == [0, 1, 2, 3, 4]
    assert out["level_confidence"] > 0.99 and out["trusted"] is True


def test_assign_levels_counts_from_one_informative_body_and_outvotes_a_wrong_one():
    # only the last body says where it is: counting names the others
    out = assign_levels(_column(5), _logp([None, None, None, None, "L5"]))
    assert out["levels"] == ["L1", "L2", "L3", "L4", "L5"]
    # one body voting for the wrong level is outvoted by the other four
    out = assign_levels(_column(5), _logp(["L1", "L2", "T7", "L4", "L5"], strength=4.0))
    assert out["levels"] == ["L1", "L2", "L3", "L4", "L5"] and out["trusted"]


def test_assign_levels_skips_a_level_at_a_missed_body():
    bodies = _column(5, skip=(2,))  # L3 not found: a gap of two spacings
    out = assign_levels(bodies, _logp(["L1", None, None, None]))
    assert out["positions"] == [0, 1, 3, 4]
    assert out["levels"] == ["L1", "L2", "L4", "L5"]
    # the same with the anchor at the other end
    out = assign_levels(bodies, _logp([None, None, None, "L5"]))
    assert out["levels"] == ["L1", "L2", "L4", "L5"]
    # one body's word is not enough to trust a film; two that agree across the gap are
    assert not out["trusted"]
    both = assign_levels(bodies, _logp(["L1", None, None, "L5"]))
    assert both["levels"] == ["L1", "L2", "L4", "L5"] and both["trusted"]


def test_assign_levels_the_last_rib_anchors_a_film_whose_level_reads_disagree():
    # every body is sure whether it is thoracic (98 %), but its level read is one off:
    # the thoracic bodies' one too high, the lumbar ones' one too low. The level reads alone
    # favour the thoracic majority's placement; the rib evidence puts the junction where the
    # ribs end
    truth = ["T9", "T10", "T11", "T12", "L1", "L2", "L3"]
    read = ["T8", "T9", "T10", "T11", "L2", "L3", "L4"]
    thoracic = np.array([name.startswith("T") for name in LEVELS])
    logp = np.zeros((7, 17))
    for k, (level, said) in enumerate(zip(truth, read)):
        same = thoracic == level.startswith("T")
        logp[k, same] = np.log(0.48 / (same.sum() - 1))
        logp[k, ~same] = np.log(0.02 / (~same).sum())
        logp[k, LEVELS.index(said)] = np.log(0.5)
    logp -= np.logaddexp.reduce(logp, axis=1, keepdims=True)
    assert assign_levels(_column(7), logp, rib_weight=0.0)["levels"] == read[:4] + ["T12", "L1", "L2"]
    out = assign_levels(_column(7), logp)
    assert out["levels"] == truth
    # a body without level evidence (NaN: a filled gap) leaves the count where it was
    gappy = logp.copy()
    gappy[2] = np.nan
    assert assign_levels(_column(7), gappy)["levels"] == truth


def test_count_positions_counts_a_missed_collapsed_body():
    # bodies 24 px tall, 6 px discs; the missed second body had collapsed to 12 px, so its gap
    # is only 1.6 x a normal step (2 x would be a missed normal body)
    centres = [50.0, 50.0 + 48.0, 50.0 + 78.0, 50.0 + 108.0]
    bodies = np.stack([_box(100.0, c, 36.0, 24.0) for c in centres])
    assert count_positions(bodies).tolist() == [0, 2, 3, 4]
    assert count_positions(_column(4)).tolist() == [0, 1, 2, 3]


def test_ordered_levels_reads_each_body_without_two_on_one_level():
    from inference.vertebrae import ordered_levels

    # already in order: each body's own best level
    favoured = ["T3", "T4", "T6", "T7", "L2"]
    assert [LEVELS[k] for k in ordered_levels(_logp(favoured))] == favoured
    # two bodies read as T9: the less sure one gives way to the next free level
    lp = _logp(["T8", "T9", "T9", "T11"])
    lp[1, LEVELS.index("T9")] = 3.0  # weakly T9
    lp[1, LEVELS.index("T10")] = 2.0  # and almost as much T10
    lp = lp - np.logaddexp.reduce(lp, axis=1, keepdims=True)
    assert [LEVELS[k] for k in ordered_levels(lp)] == ["T8", "T9", "T10", "T11"]
    # a body with no level evidence (NaN) takes whatever place keeps the order
    lp = _logp(["T1", None, "T3"])
    lp[1] = np.nan
    assert ordered_levels(lp).tolist() == [0, 1, 2]
    # past T1-L5 only when there are more bodies than levels; then each body's argmax
    assert ordered_levels(_logp([None] * 17)).tolist() == list(range(17))
    eighteen = ordered_levels(_logp([None] * 18))
    assert (np.diff(eighteen) > 0).all() and ((eighteen < 0) | (eighteen >= 17)).sum() == 1
    assert eighteen.min() >= -OVERHANG and eighteen.max() < 17 + OVERHANG
    assert len(ordered_levels(_logp(["L5"] * 30))) == 30


def test_assign_levels_fallback_gives_distinct_ordered_levels():
    """A body cut off at the film's top edge sits close to the next one; its short step makes
    the counted run longer than the spine, and the fallback reads each body's own level, now
    without naming two bodies alike (the AP films of benchmarks/RESULTS.md showed T9, T9)."""
    column = _column(12)
    cut_off = _box(100.0, 50.0 - 12.0, 36.0, 24.0)
    bodies = np.concatenate([cut_off[None], column])
    truth = LEVELS[2:15]
    reads = list(truth)
    reads[6] = reads[7]  # two bodies read as the same level
    out = assign_levels(bodies, _logp(reads, strength=3.0))
    assert out["trusted"] is False and max(out["positions"]) > 20  # the fallback path
    assert len(set(out["levels"])) == 13
    idx = [LEVELS.index(name) for name in out["levels"]]
    assert idx == sorted(idx)
    assert sum(a == b for a, b in zip(out["levels"], truth)) >= 12


def test_assign_levels_counts_a_gap_among_three_bodies():
    out = assign_levels(_column(4, skip=(2,)), _logp([None, None, "L5"]))
    assert out["positions"] == [0, 1, 3]
    assert out["levels"] == ["L2", "L3", "L5"]


def test_assign_levels_flat_evidence_is_not_trusted():
    flat = np.full((5, 17), -np.log(17.0))
    out = assign_levels(_column(5), flat)
    assert len(out["levels"]) == 5
    # 13 placements inside T1-L5 and 2 x OVERHANG running past its ends, all equally likely
    assert out["level_confidence"] == pytest.approx(1.0 / (13 + 2 * OVERHANG))
    assert out["level_confidence"] < TRUSTED_LEVEL_CONFIDENCE and out["trusted"] is False
    # every placement, from C6 (-2) at position 0 to the one ending on S2, equally likely
    assert out["placements"]["starts"] == list(range(-OVERHANG, 13 + OVERHANG))
    assert out["placements"]["posterior"] == pytest.approx([1.0 / (13 + 2 * OVERHANG)] * (13 + 2 * OVERHANG))
    # the counted levels are consecutive whatever the placement (C6-C7 and S1-S2 past the ends)
    order = [f"C{k}" for k in (6, 7)] + list(LEVELS) + ["S1", "S2"]
    idx = [order.index(lvl) for lvl in out["levels"]]
    assert np.diff(idx).tolist() == [1, 1, 1, 1]


def test_assign_levels_longer_run_than_t1_l5_is_not_trusted():
    n = 17 + 2 * OVERHANG + 1  # longer than any placement, even running past T1 and L5
    favoured = [LEVELS[min(k, 16)] for k in range(n)]
    out = assign_levels(_column(n, spacing=20.0), _logp(favoured))
    assert len(out["levels"]) == n and out["trusted"] is False
    assert out["levels"] == favoured  # each body's own best level
    assert 0.0 < out["level_confidence"] <= 1.0
    # a gap pushing the count past L5 is no different
    out = assign_levels(_column(16, skip=(5, 6)), _logp([None] * 14))
    assert len(out["levels"]) == 14 and out["trusted"] is False


def test_assign_levels_no_body():
    out = assign_levels(np.zeros((0, 6, 2)), np.zeros((0, 17)))
    assert out == {"levels": [], "level_confidence": None, "trusted": False, "positions": []}


# --------------------------------------------------------------------------- describe_vertebrae
def _wedge(cx, cy, w, h, loss):
    """A body whose anterior (p1-p4) height is ``(1 - loss)`` of the posterior one."""
    p = _box(cx, cy, w, h)
    p[0, 1] += loss * h / 2
    p[3, 1] -= loss * h / 2
    return p


def test_describe_vertebrae_matches_morphometry_and_uses_row_col_spacing():
    tilted = _box(0.0, 0.0, 30.0, 20.0) @ np.array([[np.cos(0.3), np.sin(0.3)], [-np.sin(0.3), np.cos(0.3)]]).T
    points = np.stack([_box(60.0, 40.0, 30.0, 20.0), _wedge(62.0, 70.0, 30.0, 20.0, 0.30),
                       tilted + [64.0, 100.0]])
    labels = {"levels": ["T11", "T12", "L1"], "level_confidence": 0.93, "trusted": True}
    probs = {"p_fracture": np.array([0.1, 0.8, 0.2]), "p_acute": np.array([0.05, 0.6, 0.1]),
             "p_acute_given_fracture": np.array([0.5, 0.75, 0.5])}
    scores = np.array([0.9, 0.8, 0.7])
    spacing = (0.5, 0.2)  # (row, col) mm: rows are 0.5 mm apart, columns 0.2 mm
    out = describe_vertebrae(points, labels, probs, scores, pixel_spacing_mm=spacing)
    truth = grade_vertebrae(points)
    assert [v["level"] for v in out] == ["T11", "T12", "L1"]
    for k, (v, g) in enumerate(zip(out, truth)):
        assert [v["heights"][s] for s in ("anterior", "middle", "posterior")] == pytest.approx(g["heights"])
        assert v["height_ratios"] == pytest.approx(g["height_ratios"])
        assert v["genant_grade"] == g["genant_grade"] and v["morphology"] == g["morphology"]
        assert v["height_loss"] == pytest.approx(g["height_loss"])
        np.testing.assert_allclose(v["points"], points[k])
        assert v["level_confidence"] == 0.93 and v["detection_score"] == scores[k]
        assert (v["p_fracture"], v["p_acute"], v["p_acute_given_fracture"]) == (
            probs["p_fracture"][k], probs["p_acute"][k], probs["p_acute_given_fracture"][k])
        for i, side in enumerate(("anterior", "middle", "posterior")):
            dx, dy = points[k, i + 3] - points[k, i]
            assert v["heights_mm"][side] == pytest.approx(math.hypot(dx * 0.2, dy * 0.5))
    # the hand-made numbers
    assert out[0]["genant_grade"] == 0 and out[0]["heights"]["anterior"] == pytest.approx(20.0)
    assert out[1]["heights"]["anterior"] == pytest.approx(14.0) and out[1]["heights"]["posterior"] == pytest.approx(20.0)
    assert out[1]["height_ratios"]["anterior_posterior"] == pytest.approx(0.7)
    assert out[1]["height_loss"] == pytest.approx(0.3)
    assert out[1]["genant_grade"] == 2 and out[1]["morphology"] == "wedge"
    assert out[0]["heights_mm"]["posterior"] == pytest.approx(10.0)  # 20 px down the rows x 0.5 mm
    assert out[2]["heights_mm"]["middle"] == pytest.approx(math.hypot(20 * np.sin(0.3) * 0.2, 20 * np.cos(0.3) * 0.5))

    assert all(v["heights_mm"] is None for v in describe_vertebrae(points, labels, probs, scores))
    assert describe_vertebrae(np.zeros((0, 6, 2)), {"levels": [], "level_confidence": None}, probs, scores) == []


def test_bodies_named_beyond_t1_l5_are_measured_but_not_graded(tmp_path):
    # L4, L5 and a sacrum-like S1 whose posterior half is low: it would read as a severe wedge
    points = np.stack([_box(60.0, 40.0, 30.0, 20.0), _box(60.0, 70.0, 30.0, 20.0),
                       _wedge(60.0, 100.0, 30.0, 20.0, 0.5)[[2, 1, 0, 5, 4, 3]]])
    assert grade_vertebrae(points)[2]["genant_grade"] == 3
    probs = {"p_fracture": np.array([0.1, 0.2, 0.05]), "p_acute": np.array([0.0, 0.1, 0.0]),
             "p_acute_given_fracture": np.array([0.1, 0.5, 0.1])}
    labels = {"levels": ["L4", "L5", "S1"], "level_confidence": 0.9, "trusted": True}
    out = describe_vertebrae(points, labels, probs, np.ones(3))
    assert [v["genant_grade"] for v in out] == [0, 0, None]
    assert out[2]["morphology"] is None and out[2]["heights"]["posterior"] == pytest.approx(10.0)
    assert out[2]["p_fracture"] == 0.05  # still scored by the crop network
    assert out[2]["height_loss"] is None and out[1]["height_loss"] == pytest.approx(0.0)
    # the morphometry combiner leaves an ungraded body's crop probability alone, so a sacrum's
    # shape cannot raise the film's p_fracture; graded bodies are combined as before
    combiner = {"coef": [1.0, 10.0], "intercept": -2.0}
    combined = with_morphometry(out, combiner)
    assert combined[2]["p_fracture"] == 0.05 and "p_fracture_crop" not in combined[2]
    assert combined[1]["p_fracture"] == pytest.approx(combine_with_morphometry(0.2, 0.0, combiner))
    # (combined with its height loss of 0.5, the sacrum would read 0.51 and carry the film)
    assert image_probabilities({"p_fracture": 0.01, "p_acute": 0.0, "p_acute_given_fracture": 0.1},
                               combined)["p_fracture"] == pytest.approx(0.05)
    # a graded body takes only graded neighbours: a crushed L5 is compared with L4, not with C7/S1
    crushed = np.stack([_box(60.0, 40.0, 30.0, 20.0), _box(60.0, 70.0, 30.0, 12.0), _box(60.0, 100.0, 30.0, 4.0)])
    assert grade_vertebrae(crushed)[1]["genant_grade"] == 0  # the sacrum drags the reference down to 12
    alone = describe_vertebrae(crushed, labels, probs, np.ones(3))
    assert alone[1]["genant_grade"] == grade_vertebrae(crushed[:2])[1]["genant_grade"] == 3  # 1 - 12/20
    assert alone[1]["morphology"] == "crush" and alone[2]["genant_grade"] is None
    # the JSON and CSV forms: null / empty, and evaluation reads it as a missing grade
    from evaluation.vertebrae import load_predicted_vertebrae
    from data.records import VertebraRecord, vertebra_rows

    json.loads(json.dumps(out))
    rows = pd.DataFrame(vertebra_rows("film.png", "film", out, True))
    rows.to_csv(tmp_path / "vertebrae.csv", index=False)
    back = load_predicted_vertebrae(tmp_path / "vertebrae.csv")
    assert back["genant_grade"].isna().tolist() == [False, False, True]
    # OUT/vertebrae.csv as inference writes it: grades stay integers beside an empty one
    from inference.pipeline import write_vertebrae_table
    from data.records import FilmRecord

    film = FilmRecord(image="film.png", name="film", p_fracture=0.5, p_acute=0.1, p_acute_given_fracture=0.2,
                      heatmap_peak=[0.0, 0.0], p_fracture_image_head=0.5, heatmap_peak_value=0.5,
                      heatmap_peak_head=[0.0, 0.0], heatmap_peak_head_value=0.5, image_size=[200, 160],
                      pixel_spacing_mm=None, heatmap={}, levels_trusted=True,
                      vertebrae=[VertebraRecord.from_json_dict(v) for v in out])
    write_vertebrae_table(tmp_path / "vertebrae_out.csv", [film])
    grades = (tmp_path / "vertebrae_out.csv").read_text().splitlines()
    column = grades[0].split(",").index("genant_grade")
    assert [line.split(",")[column] for line in grades[1:]] == ["0", "0", ""]
    # the overlay draws it grey, without a grade
    drawn = draw_vertebrae(np.full((200, 160, 3), 60, np.uint8), [dict(out[2], level_confidence=0.9)])
    from inference.drawing import UNGRADED_COLOUR

    x, y = out[2]["points"][0]
    assert tuple(drawn[int(round(y)), int(round(x))]) == UNGRADED_COLOUR
    assert not np.all(drawn == (0, 0, 255), axis=-1).any()


# --------------------------------------------------------------------------- image_probabilities
def test_image_probabilities_follow_the_most_fractured_vertebra():
    head = {"p_fracture": 0.30, "p_acute": 0.12, "p_acute_given_fracture": 0.40, "heatmap": "kept"}
    verts = [{"p_fracture": 0.20, "p_acute": 0.05}, {"p_fracture": 0.70, "p_acute": 0.60},
             {"p_fracture": 0.65, "p_acute": 0.10}]
    out = image_probabilities(head, verts)
    assert out["p_fracture"] == pytest.approx(0.70) and out["p_acute"] == pytest.approx(0.60)
    assert out["p_acute_given_fracture"] == pytest.approx(0.60 / 0.70)
    assert out["heatmap"] == "kept" and head["p_fracture"] == 0.30  # input left alone

    confident_head = dict(head, p_fracture=0.95, p_acute=0.8)
    out = image_probabilities(confident_head, verts)
    assert out["p_fracture"] == pytest.approx(0.95) and out["p_acute"] == pytest.approx(0.8)

    assert image_probabilities(head, []) == head

    rng = np.random.default_rng(0)
    for _ in range(50):
        pf = rng.random(4)
        pa = pf * rng.random(4)
        head = {"p_fracture": pf[0], "p_acute": pa[0], "p_acute_given_fracture": pa[0] / pf[0]}
        verts = [{"p_fracture": f, "p_acute": a} for f, a in zip(pf[1:], pa[1:])]
        out = image_probabilities(head, verts)
        assert out["p_fracture"] == max(pf)
        assert all(out["p_fracture"] >= v["p_fracture"] and out["p_acute"] >= v["p_acute"] for v in verts)
        assert out["p_acute"] <= out["p_fracture"]
        assert out["p_acute_given_fracture"] == pytest.approx(out["p_acute"] / out["p_fracture"])


# --------------------------------------------------------------------------- the crop network stub
def _square_template(half_side):
    return np.array([[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]], dtype=np.float64) * half_side + HALF


# Crop points of an axis-aligned square body whose side is 1 / CROP_CONTEXT of the crop: for a
# square rough body the crop window maps it back onto itself (a fixed point of both passes).
SQUARE = _square_template(CROP_SIZE / (2 * CROP_CONTEXT))


def _wedge_template(loss=0.3):
    t = SQUARE.copy()
    h = SQUARE[3, 1] - SQUARE[0, 1]
    t[0, 1] += loss * h / 2
    t[3, 1] -= loss * h / 2
    return t


class _StubCropNet(nn.Module):
    """Returns fixed crop points (``templates[k]`` for the k-th crop of a call, else ``default``)
    and fixed logits per crop index; keeps the crops it was given."""

    def __init__(self, default=SQUARE, templates=None, logits=((0.0, 0.0),)):
        super().__init__()
        self.default = np.asarray(default, dtype=np.float64)
        self.templates = dict(templates or {})
        self.logits = [tuple(x) for x in logits]
        self.seen = []

    def logit(self, k):
        return self.logits[min(k, len(self.logits) - 1)]

    def forward(self, crops):
        self.seen.append(crops.detach().cpu().numpy().copy())
        index = self.indices(crops.shape[0])
        points = np.stack([self.templates.get(k, self.default) for k in index])
        return {"points": torch.tensor(points, dtype=torch.float32, device=crops.device),
                "logits": torch.tensor([self.logit(k) for k in index], dtype=torch.float32, device=crops.device)}

    def indices(self, n):
        return list(range(n))


class _FilmBatchStubCropNet(_StubCropNet):
    """A :class:`_StubCropNet` for a batch of films whose crops may share one call, film after
    film (``film_sizes`` bodies each): ``templates`` and ``logits`` are indexed by the body within its film."""

    def __init__(self, film_sizes, **kwargs):
        super().__init__(**kwargs)
        self.film_sizes = [n for n in film_sizes if n]

    def indices(self, n):
        if n == sum(self.film_sizes):  # every film's crops in one call
            return [k for size in self.film_sizes for k in range(size)]
        return list(range(n))


def _extent(p):
    width = 0.5 * (np.linalg.norm(p[0] - p[2]) + np.linalg.norm(p[3] - p[5]))
    height = np.mean([np.linalg.norm(p[i + 3] - p[i]) for i in range(3)])
    return max(width, height)


def _expected_read(rough, template, passes=2):
    """Where the crop points land in the original film, worked out independently of the code:
    the crop is a square of CROP_CONTEXT x extent pixels around the body centre, resampled to
    CROP_SIZE, so crop pixel u lies at centre + (u - HALF) * side / CROP_SIZE."""
    p = np.asarray(rough, dtype=np.float64)
    for _ in range(passes):
        side = CROP_CONTEXT * _extent(p)
        p = p.mean(axis=0) + (template - HALF) * side / CROP_SIZE
    return p


def test_read_crops_maps_crop_points_back_to_the_film_in_two_passes():
    image = np.zeros((200, 160), np.float32)
    image[90, 80] = 1.0
    image = cv2.GaussianBlur(image, (0, 0), 1.5)
    image /= image.max()
    rough = np.stack([_box(80.0, 90.0, 20.0, 16.0), _box(70.0, 140.0, 24.0, 18.0)])
    # an off-centre template: the second crop is centred elsewhere than the first
    template = _square_template(20.0) + [6.0, -3.0]
    template[4, 1] += 2.0
    stub = _StubCropNet(default=template, logits=[(1.0, -1.0), (-2.0, 0.5)])
    out = read_crops(stub, image, rough, torch.device("cpu"))

    assert len(stub.seen) == 2 and stub.seen[0].shape == (2, 1, CROP_SIZE, CROP_SIZE)
    for k in range(2):
        np.testing.assert_allclose(out["points"][k], _expected_read(rough[k], template), atol=1e-3)
    assert np.abs(out["points"] - rough).max() > 1.0  # the crop network moved them
    # the first crop is centred on the body (the bright dot at its centre); the second one is
    # centred on the first pass's points, which lie right of and above the dot
    first = stub.seen[0][0, 0]
    assert np.unravel_index(first.argmax(), first.shape) in [(47, 47), (47, 48), (48, 47), (48, 48)]
    mid = _expected_read(rough[0], template, passes=1)
    side2 = CROP_CONTEXT * _extent(mid)
    dot = HALF + (np.array([80.0, 90.0]) - mid.mean(axis=0)) * CROP_SIZE / side2
    second = stub.seen[1][0, 0]
    i, j = np.unravel_index(second.argmax(), second.shape)
    assert abs(j - dot[0]) <= 1.0 and abs(i - dot[1]) <= 1.0

    p0, p1 = _sigmoid(1.0), _sigmoid(-2.0)
    assert out["p_fracture"] == pytest.approx([p0, p1], abs=1e-6)
    assert out["p_acute_given_fracture"] == pytest.approx([_sigmoid(-1.0), _sigmoid(0.5)], abs=1e-6)
    assert out["p_acute"] == pytest.approx([p0 * _sigmoid(-1.0), p1 * _sigmoid(0.5)], abs=1e-6)

    one = read_crops(_StubCropNet(default=template), image, rough, torch.device("cpu"), passes=1)
    np.testing.assert_allclose(one["points"][0], _expected_read(rough[0], template, passes=1), atol=1e-3)

    empty = read_crops(stub, image, np.zeros((0, 6, 2)), torch.device("cpu"))
    assert empty["points"].shape == (0, 6, 2) and len(empty["p_fracture"]) == 0


def test_square_template_is_a_fixed_point_of_the_crop_window():
    rough = _box(33.0, 71.5, 12.0, 12.0)
    np.testing.assert_allclose(_expected_read(rough, SQUARE), rough, atol=1e-9)
    out = read_crops(_StubCropNet(), np.zeros((128, 104), np.float32), rough[None], torch.device("cpu"))
    np.testing.assert_allclose(out["points"][0], rough, atol=1e-3)



class _CentroidCropNet(nn.Module):
    """Reads six points around the crop's intensity centroid, p1 on the image left (as an AP
    reading labels by side), shifted right by ``bias`` pixels; the logits grow with the
    centroid's x, so a mirrored crop reads different probabilities."""

    OFFSETS = np.array([[-10, -6], [0, -6], [10, -6], [-10, 6], [0, 6], [10, 6]], dtype=np.float64)

    def __init__(self, bias=0.0):
        super().__init__()
        self.bias = bias

    def forward(self, crops):
        c = crops[:, 0].double()
        w = c / c.sum(dim=(1, 2), keepdim=True)
        ys, xs = torch.meshgrid(torch.arange(c.shape[1], dtype=torch.float64),
                                torch.arange(c.shape[2], dtype=torch.float64), indexing="ij")
        centre = torch.stack([(w * xs).sum(dim=(1, 2)), (w * ys).sum(dim=(1, 2))], dim=-1)
        points = centre[:, None, :] + torch.from_numpy(self.OFFSETS)[None] + torch.tensor([self.bias, 0.0])
        logits = torch.stack([centre[:, 0] / 20.0 - 2.0, torch.zeros(len(c), dtype=torch.float64)], dim=-1)
        return {"points": points.float(), "logits": logits.float()}


def test_flip_averaging_maps_mirrored_readings_back_and_cancels_a_side_bias():
    image = np.zeros((200, 160), np.float32)
    image[88:98, 74:90] = 1.0  # an off-centre body in its crop
    image = cv2.GaussianBlur(image, (0, 0), 2.0) + 0.01
    rough = _box(80.0, 90.0, 20.0, 16.0)[None]
    plain = read_crops(_CentroidCropNet(), image, rough, torch.device("cpu"), passes=1)
    flipped = read_crops(_CentroidCropNet(), image, rough, torch.device("cpu"), passes=1, flip=True)
    # an equivariant network reads the same points either way: the mirrored reading is put
    # back in place and relabelled (its p1 came back on the right), not averaged across sides
    np.testing.assert_allclose(flipped["points"], plain["points"], atol=0.05)
    # probabilities are the mean of the two readings (the mirrored centroid lies elsewhere)
    side = CROP_CONTEXT * _extent(rough[0])
    cx = plain["points"][0].mean(axis=0)[0]
    x_crop = HALF + (cx - rough[0].mean(axis=0)[0]) * CROP_SIZE / side
    expected = 0.5 * (_sigmoid(x_crop / 20.0 - 2.0) + _sigmoid((CROP_SIZE - 1 - x_crop) / 20.0 - 2.0))
    assert flipped["p_fracture"][0] == pytest.approx(expected, abs=2e-3)
    assert abs(flipped["p_fracture"][0] - plain["p_fracture"][0]) > 0.01
    # a reading biased to one side of the crop: the mirror's bias points the other way
    biased = read_crops(_CentroidCropNet(bias=3.0), image, rough, torch.device("cpu"), passes=1)
    unbiased = read_crops(_CentroidCropNet(bias=3.0), image, rough, torch.device("cpu"), passes=1, flip=True)
    shift = 3.0 * side / CROP_SIZE
    np.testing.assert_allclose(biased["points"][0, :, 0] - plain["points"][0, :, 0], shift, atol=0.05)
    np.testing.assert_allclose(unbiased["points"], plain["points"], atol=0.05)

# --------------------------------------------------------------------------- gap filling
def test_gap_proposals_place_missing_bodies_between_their_neighbours():
    assert gap_proposals(_column(6))[0].shape == (0, 6, 2)
    full = _column(6)
    one, drift = gap_proposals(_column(6, skip=(3,)))
    assert one.shape == (1, 6, 2)
    np.testing.assert_allclose(one[0], full[3], atol=1e-9)
    assert drift == pytest.approx([FILL_DRIFT * 30.0])  # 30 px between the bodies of _column
    two, drift = gap_proposals(_column(7, skip=(2, 3)))
    np.testing.assert_allclose(two, _column(7)[[2, 3]], atol=1e-9)
    assert drift == pytest.approx([FILL_DRIFT * 30.0] * 2)
    assert MAX_GAP_FILL == 2
    assert gap_proposals(_column(8, skip=(2, 3, 4)))[0].shape == (0, 6, 2)  # too wide: left alone
    # the shape is the mean of the two neighbours' shapes, centred between them
    upper, lower = _box(100.0, 50.0, 30.0, 20.0), _box(110.0, 110.0, 40.0, 24.0)
    between = gap_proposals(np.stack([_box(100.0, 20.0, 30.0, 20.0), upper, lower, _box(110.0, 140.0, 40.0, 24.0)]))[0]
    np.testing.assert_allclose(between[0], _box(105.0, 80.0, 35.0, 22.0), atol=1e-9)


class _DriftingCropNet(_StubCropNet):
    """A square-template stub that, from its ``drift_from``-th call on, reads every crop as the
    body one ``shift`` (crop pixels) above its centre."""

    def __init__(self, drift_from, shift):
        super().__init__()
        self.drift_from, self.shift = drift_from, shift

    def forward(self, crops):
        out = super().forward(crops)
        if len(self.seen) > self.drift_from:
            out["points"][..., 1] -= self.shift
        return out


GAP_SIDE, GAP_STEP = 12.0, 21.0


def _gap_film(skip):
    """Six square bodies (T11-L4) down a 128 x 104 film, minus ``skip``; stage-1 logits with a
    peak on each found body and, under each skipped one, a below-threshold centre logit (-2)
    that favours L5 (a wrong level, which a filled body must not vote for); an identity
    letterbox."""
    box = Letterbox(scale=1.0, pad_left=0, pad_top=0, out_hw=(128, 104), in_hw=(128, 104))
    levels = ["T11", "T12", "L1", "L2", "L3", "L4"]
    spec, truth = [], []
    for k, level in enumerate(levels):
        pts = _box(52.0, 10.0 + GAP_STEP * k, GAP_SIDE, GAP_SIDE)
        truth.append(pts)
        gx, gy = (pts.mean(axis=0) + 0.5) / STRIDE - 0.5
        cell = (int(np.floor(gy + 0.5)), int(np.floor(gx + 0.5)))
        spec.append((cell, -2.0, pts, LEVELS.index("L5")) if k in skip else (cell, 4.0, pts, LEVELS.index(level)))
    return _logits_with(spec, (16, 13)), box, np.stack(truth), levels


def test_analyse_film_reads_a_body_in_a_counted_gap():
    logits, box, truth, levels = _gap_film(skip=(3,))
    image = np.zeros((128, 104), np.float32)
    cpu = torch.device("cpu")

    without = analyse_film(logits, box, STRIDE, _StubCropNet(), image, cpu, fill_gaps=False)
    assert [v["level"] for v in without["vertebrae"]] == ["T11", "T12", "L1", "L3", "L4"]

    stub = _StubCropNet()
    film = analyse_film(logits, box, STRIDE, stub, image, cpu)
    verts = film["vertebrae"]
    assert [v["level"] for v in verts] == levels and film["levels_trusted"]
    assert len(stub.seen) == 4 and stub.seen[2].shape[0] == 1  # two passes of the found, two of the filled
    for v, pts in zip(verts, truth):  # the filled body sits where the missing one is, head-to-feet order kept
        np.testing.assert_allclose(v["points"], pts, atol=1e-3)
    filled = verts[3]
    # its detection score is the stage-1 heatmap under it (a sub-threshold -2), not a found peak's;
    # its level comes from the count, not from the L5 its cell's level logits favour
    assert filled["detection_score"] == pytest.approx(_sigmoid(-2.0), abs=1e-6)
    assert all(v["detection_score"] == pytest.approx(_sigmoid(4.0)) for k, v in enumerate(verts) if k != 3)
    assert filled["level"] == "L2" and film["level_confidence"] == pytest.approx(
        without["level_confidence"], abs=1e-6)

    # a filled window that the crop network reads half a step away (onto a disc) is dropped
    half = 0.5 * GAP_STEP * CROP_SIZE / (CROP_CONTEXT * GAP_SIDE)
    onto_disc = analyse_film(logits, box, STRIDE, _DriftingCropNet(drift_from=2, shift=half), image, cpu)
    assert [v["level"] for v in onto_disc["vertebrae"]] == ["T11", "T12", "L1", "L3", "L4"]

    # a filled window that the crop network reads as the body above is a duplicate: dropped
    shift = GAP_STEP * CROP_SIZE / (CROP_CONTEXT * GAP_SIDE)
    drifting = analyse_film(logits, box, STRIDE, _DriftingCropNet(drift_from=2, shift=shift), image, cpu)
    assert [v["level"] for v in drifting["vertebrae"]] == ["T11", "T12", "L1", "L3", "L4"]


# --------------------------------------------------------------------------- fracture map
TO_IMAGE = {"scale": 8.0, "offset": [3.5, 3.5]}  # heatmap cell (i, j) centres on x = 8 j + 3.5


def _vert(points, p):
    return {"points": np.asarray(points).tolist(), "p_fracture": p}


def test_fracture_map_raises_cells_under_each_vertebra_to_its_probability():
    head = np.full((10, 8), 0.1, np.float32)
    head[2, 2] = 0.9  # a confident dense-head cell inside the first body keeps its value
    big = _box(3.5 + 8 * 2, 3.5 + 8 * 2.5, 20.0, 12.0)  # covers the centres of cells (2-3, 1-3)
    tiny = _box(3.5 + 8 * 6, 3.5 + 8 * 7, 3.0, 3.0)  # smaller than a cell: its centre cell
    before = head.copy()
    fused = fracture_map(head, [_vert(big, 0.7), _vert(tiny, 0.4), _vert(big + 200, 0.99)], TO_IMAGE)
    np.testing.assert_array_equal(head, before)  # the dense map is not modified
    expected = before.copy()
    expected[2:4, 1:4] = 0.7
    expected[2, 2] = 0.9
    expected[7, 6] = 0.4
    np.testing.assert_allclose(fused, expected)  # the off-film vertebra (+200 px) paints nothing
    # a vertebra less likely fractured than the dense map changes nothing
    np.testing.assert_allclose(fracture_map(before, [_vert(big, 0.05)], TO_IMAGE), before)
    # only cells whose centres the outline covers: a body 5 x 3 cells wide, centred on a cell,
    # paints 5 x 3 cells, not the 6 x 4 its outline touches
    centred = _box(3.5 + 8 * 3, 3.5 + 8 * 4, 40.0, 24.0)
    painted = fracture_map(np.zeros((10, 8), np.float32), [_vert(centred, 0.5)], TO_IMAGE) > 0
    assert painted.sum() == 15 and painted[3:6, 1:6].all()


def test_fracture_peak_is_the_likeliest_vertebra_when_it_tops_the_dense_head():
    head = np.zeros((10, 8), np.float32)
    head[5, 6] = 0.6
    upper, lower = _box(20.0, 20.0, 24.0, 16.0), _box(22.0, 60.0, 24.0, 16.0)
    peak, value = fracture_peak(head, [_vert(upper, 0.3), _vert(lower, 0.8)], TO_IMAGE)
    assert peak == pytest.approx([22.0, 60.0]) and value == pytest.approx(0.8)
    peak, value = fracture_peak(head, [_vert(upper, 0.3), _vert(lower, 0.5)], TO_IMAGE)
    assert peak == pytest.approx([8 * 6 + 3.5, 8 * 5 + 3.5]) and value == pytest.approx(0.6)
    assert fracture_peak(head, [], TO_IMAGE)[0] == pytest.approx([51.5, 43.5])
    # a vertebra off the map does not give the peak either
    assert fracture_peak(head, [_vert(lower + 500, 0.99)], TO_IMAGE)[0] == pytest.approx([51.5, 43.5])


# --------------------------------------------------------------------------- draw_vertebrae
def test_draw_vertebrae_grade_colours_level_names_and_no_side_effects():
    base = np.full((200, 160, 3), 60, np.uint8)
    before = base.copy()
    severe = {"level": "L1", "level_confidence": 0.95, "genant_grade": 3, "points": _box(50, 60, 30, 20).tolist()}
    normal = {"level": "L2", "level_confidence": 0.95, "genant_grade": 0, "points": _box(50, 120, 30, 20).tolist()}
    out = draw_vertebrae(base, [severe, normal])
    assert out is not base and out.shape == base.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(base, before)
    for v in (severe, normal):
        colour = GRADE_COLOURS[v["genant_grade"]]
        for x, y in v["points"]:  # each point is a filled dot of the grade colour
            assert tuple(out[int(round(y)), int(round(x))]) == colour
    red = np.all(out == (0, 0, 255), axis=-1)
    assert red[40:80, 30:70].any() and not red[100:140].any()  # red only at the severe vertebra
    # the level name is written right of the body
    text = np.any(out[45:75, 68:130] != 60, axis=-1)
    assert text.sum() > 20
    renamed = draw_vertebrae(base, [dict(severe, level="T9"), normal])
    assert not np.array_equal(renamed[45:75, 68:130], out[45:75, 68:130])
    assert np.array_equal(renamed[100:], out[100:])
    doubtful = draw_vertebrae(base, [dict(severe, level_confidence=0.5), normal])  # "L1?"
    assert not np.array_equal(doubtful[45:75, 68:130], out[45:75, 68:130])
    # scale maps film pixels onto a smaller overlay
    small = draw_vertebrae(np.full((100, 80, 3), 60, np.uint8), [severe], scale=0.5)
    x, y = severe["points"][0]
    assert tuple(small[int(round(y / 2)), int(round(x / 2))]) == GRADE_COLOURS[3]
    assert np.array_equal(draw_vertebrae(base, []), base)


# --------------------------------------------------------------------------- Predictor end to end
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained FractureSystem saved as an uncalibrated and a calibrated checkpoint, and
    three phantom films (128 x 104 px)."""
    from calibration import CALIBRATION_KEY, Calibrator

    tmp = tmp_path_factory.mktemp("vinf")
    generate_dataset(tmp / "data", n=3, seed=5, size=128, workers=1, progress=False)
    _, plain = save_untrained_checkpoint(tmp / "model.ckpt", image_size=IMAGE_SIZE)
    ckpt = torch.load(plain, weights_only=True)
    calibrator = Calibrator("temperature", temperature={"p_fracture": 2.5, "p_acute_given_fracture": 0.7},
                            points={"balanced": {"threshold": 0.6, "sensitivity": 0.9, "specificity": 0.8}},
                            default="balanced")
    ckpt[CALIBRATION_KEY] = calibrator.to_dict()
    calibrated = tmp / "model_calibrated.ckpt"
    torch.save(ckpt, calibrated)
    films = sorted(str(p) for p in (tmp / "data" / "images").glob("*.png"))
    assert len(films) == 3
    return {"tmp": tmp, "plain": plain, "calibrated": calibrated, "films": films, "calibrator": calibrator}


class _InjectVertebrae(nn.Module):
    """The real film network, with ``vertebra_logits`` replaced by hand-built ones for the inputs
    it knows (matched by content) and by 'nothing here' for any other input."""

    def __init__(self, net, known):
        super().__init__()
        self.net = net
        self.known = known  # [(input tensor (1, H, W), logits (30, h, w))]

    def forward(self, x):
        out = self.net(x)
        grid = out["vertebra_logits"].shape[-2:]
        logits = []
        for b in range(x.shape[0]):
            match = [v for k, v in self.known if torch.equal(k.to(x.device), x[b])]
            logits.append(match[0] if match else torch.full((VERTEBRA_CHANNELS, *grid), -10.0))
        return {**out, "vertebra_logits": torch.stack(logits).to(out["vertebra_logits"])}


# Designed films, in original pixels: bodies are squares of side 12 (the stub crop network's
# SQUARE template maps such a body onto itself); the third body of a film (index 2 down the
# spine) is read as a 30 % anterior wedge.
SIDE = 12.0
FILM_BODIES = [
    [((52.0, 20.0), "L1"), ((52.0, 41.0), "L2"), ((52.0, 62.0), "L3"), ((52.0, 83.0), "L4"), ((52.0, 104.0), "L5")],
    [((36.0, 30.0), "T10"), ((44.0, 54.0), "T11"), ((52.0, 78.0), "T12")],  # a tilted spine
    [],  # no vertebra found
]
CROP_LOGITS = [(-3.0, 0.0), (-1.0, 0.0), (3.5, 1.0), (-2.0, -1.0), (0.0, 0.0)]
# centre logits down the spine: the detections come out strongest first, not head to feet
CENTRE_LOGITS = [3.0, 5.0, 4.0, 6.0, 3.5]


def _designed_logits(box, bodies, grid_hw):
    spec = []
    for k, ((cx, cy), level) in enumerate(bodies):
        pts = box.to_input(_box(cx, cy, SIDE, SIDE))
        gx, gy = (pts.mean(axis=0) + 0.5) / STRIDE - 0.5
        spec.append(((int(round(gy)), int(round(gx))), CENTRE_LOGITS[k], pts, LEVELS.index(level)))
    cells = [s[0] for s in spec]
    assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) >= 2 for k, a in enumerate(cells) for b in cells[k + 1:])
    return _logits_with(spec, grid_hw)


def _expected_vertebrae(bodies):
    """(level, points in original pixels, crop logits, detection score) per body, head to feet."""
    out = []
    for k, ((cx, cy), level) in enumerate(bodies):
        rough = _box(cx, cy, SIDE, SIDE)
        template = _wedge_template() if k == 2 else SQUARE
        out.append((level, _expected_read(rough, template), CROP_LOGITS[k], _sigmoid(CENTRE_LOGITS[k])))
    return out


def _rig(predictor, paths, bodies):
    """Wrap the predictor's networks so that films ``paths`` show ``bodies``."""
    from inference.predictor import InferenceDataset

    data = InferenceDataset(paths, predictor.image_size)
    grid = (IMAGE_SIZE[0] // STRIDE, IMAGE_SIZE[1] // STRIDE)
    known = [(data[i]["image"], _designed_logits(data[i]["box"], b, grid)) for i, b in enumerate(bodies)]
    predictor.net = _InjectVertebrae(predictor.net, known)
    predictor.vertebra_net = _FilmBatchStubCropNet([len(b) for b in bodies], templates={2: _wedge_template()},
                                                   logits=CROP_LOGITS)
    return data


VERTEBRA_KEYS = {"level", "level_confidence", "detection_score", "points", "heights", "heights_mm", "height_ratios",
                 "height_loss", "genant_grade", "morphology", "p_fracture", "p_acute", "p_acute_given_fracture"}


def _check_vertebrae(record, bodies, pixel_spacing=None):
    verts = record["vertebrae"]
    expected = _expected_vertebrae(bodies)
    assert isinstance(verts, list) and len(verts) == len(expected)
    for v, (level, points, (lf, la), score) in zip(verts, expected):
        assert VERTEBRA_KEYS <= set(v)
        assert v["level"] == level
        assert np.asarray(v["points"]).shape == (6, 2)
        # the injected points went through the letterbox and back, then through the crop window
        np.testing.assert_allclose(v["points"], points, atol=2e-3)
        assert v["detection_score"] == pytest.approx(score, abs=1e-6)
        assert v["p_fracture"] == pytest.approx(_sigmoid(lf), abs=1e-6)
        assert v["p_acute"] == pytest.approx(_sigmoid(lf) * _sigmoid(la), abs=1e-6)
        assert set(v["heights"]) == {"anterior", "middle", "posterior"}
        assert set(v["height_ratios"]) == {"anterior_posterior", "middle_posterior"}
    if verts:
        assert record["levels_trusted"] is True and record["level_confidence"] > TRUSTED_LEVEL_CONFIDENCE
        assert all(v["level_confidence"] == record["level_confidence"] for v in verts)
        assert [v["genant_grade"] for v in verts] == [2 if k == 2 else 0 for k in range(len(verts))]
        assert [v["morphology"] for v in verts] == ["wedge" if k == 2 else "normal" for k in range(len(verts))]
        assert verts[0]["heights"]["posterior"] == pytest.approx(SIDE, abs=2e-3)
        assert verts[2]["height_ratios"]["anterior_posterior"] == pytest.approx(0.7, abs=1e-4)
        if pixel_spacing is None:
            assert all(v["heights_mm"] is None for v in verts)
        else:
            row, _ = pixel_spacing  # the bodies are upright: heights run down the rows
            for v in verts:
                for side in ("anterior", "middle", "posterior"):
                    assert v["heights_mm"][side] == pytest.approx(v["heights"][side] * row, abs=1e-3)
    else:
        assert record["levels_trusted"] is False and record["level_confidence"] is None


def row_peak(table, name):
    row = table[table.name == name].iloc[0]
    return [row.heatmap_peak_x, row.heatmap_peak_y]


def _check_film_agrees(record):
    verts = record["vertebrae"]
    head = record["p_fracture_image_head"]
    assert record["p_fracture"] == pytest.approx(max([head] + [v["p_fracture"] for v in verts]), abs=1e-6)
    assert all(record["p_fracture"] >= v["p_fracture"] - 1e-9 for v in verts)
    assert all(record["p_acute"] >= v["p_acute"] - 1e-9 for v in verts)
    assert record["p_acute"] <= record["p_fracture"] + 1e-9


def test_predictor_reports_the_injected_vertebrae_in_original_pixels(model, tmp_path):
    from inference.pipeline import run_inference
    from inference.predictor import Predictor
    from data.records import VERTEBRA_COLUMNS

    predictor = Predictor(model["plain"], device="cpu")
    assert predictor.vertebra_net is not None and predictor.calibrator is None
    data = _rig(predictor, model["films"], FILM_BODIES)
    box = data[0]["box"]
    assert box.scale != 1.0 and (box.pad_top or box.pad_left)  # the letterbox is not the identity

    results = predictor.predict([data[i] for i in range(3)])
    heads = predictor(torch.stack([data[i]["image"] for i in range(3)]))["p_fracture"]
    for k, (res, bodies) in enumerate(zip(results, FILM_BODIES)):
        assert isinstance(res, FilmPrediction) and all(isinstance(v, VertebraRecord) for v in res.vertebrae)
        assert res.probs["p_fracture_image_head"] == pytest.approx(float(heads[k]), abs=1e-6)
        _check_vertebrae({"vertebrae": res.vertebra_dicts(), "levels_trusted": res.levels_trusted,
                          "level_confidence": res.level_confidence}, bodies)
    # film 0: its L3 (p = 0.97) outweighs the untrained head; film 2: no vertebra, the head's values
    assert results[0].probs["p_fracture_image_head"] < _sigmoid(3.5)
    assert results[0].probs["p_fracture"] == pytest.approx(_sigmoid(3.5), abs=1e-6)
    assert results[2].probs["p_fracture"] == pytest.approx(float(heads[2]), abs=1e-6)
    # the film network's strongest body score: the injected centres, or sigmoid(-10) where nothing is
    assert results[1].spine_score == pytest.approx(_sigmoid(max(CENTRE_LOGITS[:3])), abs=1e-6)
    assert results[2].spine_score == pytest.approx(_sigmoid(-10.0), abs=1e-6)

    out = tmp_path / "out"
    summary = run_inference(predictor, model["films"], out, num_workers=0, progress=False)
    # the film without a vertebra gets no probability (the no-spine rule, inference/acceptance.py)
    assert summary.n_ok == 2 and summary.failed_by_status == {"no_spine": 1}
    table = pd.read_csv(out / "predictions.csv")
    spineless = table[table.image == model["films"][2]].iloc[0]
    assert spineless.status == "no_spine" and "no spine found" in spineless.error and pd.isna(spineless.p_fracture)
    assert not (out / f"{spineless['name']}.json").exists()
    records = {}
    for path, bodies in zip(model["films"][:2], FILM_BODIES[:2]):
        row = table[table.image == path].iloc[0]
        record = json.loads((out / f"{row['name']}.json").read_text())
        records[row["name"]] = record
        _check_vertebrae(record, bodies)
        _check_film_agrees(record)
        assert row.p_fracture == pytest.approx(record["p_fracture"])
        assert "p_fracture_image_head" in record
    name0 = table[table.image == model["films"][0]].name.iloc[0]
    assert records[name0]["p_fracture"] > records[name0]["p_fracture_image_head"]  # the L3 drives the film
    # ... and the written map and its peak: the peak is the wedged L3's centre, the map holds its value there
    l3 = records[name0]["vertebrae"][2]
    assert records[name0]["heatmap_peak"] == pytest.approx(np.mean(l3["points"], axis=0).tolist())
    assert records[name0]["heatmap_peak_value"] == pytest.approx(l3["p_fracture"])
    assert records[name0]["heatmap_peak_head_value"] < l3["p_fracture"]
    assert row_peak(table, name0) == pytest.approx(records[name0]["heatmap_peak"])
    fused = np.load(out / f"{name0}_heatmap.npy")
    to_image = records[name0]["heatmap"]["to_image"]
    cx, cy = (np.mean(l3["points"], axis=0) - to_image["offset"]) / to_image["scale"]
    assert fused[int(round(cy)), int(round(cx))] == pytest.approx(l3["p_fracture"], abs=1e-6)
    assert fused.max() == pytest.approx(l3["p_fracture"], abs=1e-6)

    vt = pd.read_csv(out / "vertebrae.csv")
    assert list(vt.columns) == VERTEBRA_COLUMNS
    assert len(vt) == sum(len(r["vertebrae"]) for r in records.values()) == 8
    for name, record in records.items():
        rows = vt[vt.name == name]
        assert len(rows) == len(record["vertebrae"])
        assert (rows.image == record["image"]).all()
        for (_, r), v in zip(rows.iterrows(), record["vertebrae"]):
            assert r.level == v["level"] and r.genant_grade == v["genant_grade"] and r.morphology == v["morphology"]
            assert r.levels_trusted == record["levels_trusted"]
            assert r.p_fracture == pytest.approx(v["p_fracture"]) and r.p_acute == pytest.approx(v["p_acute"])
            assert r.height_anterior == pytest.approx(v["heights"]["anterior"])
            assert r.ratio_anterior_posterior == pytest.approx(v["height_ratios"]["anterior_posterior"])
            assert pd.isna(r.height_anterior_mm)  # PNG films carry no pixel spacing
            got = np.array([[r[f"p{k}x"], r[f"p{k}y"]] for k in range(1, 7)])
            np.testing.assert_allclose(got, v["points"], atol=1e-6)
    assert set(vt.level) == {"L1", "L2", "L3", "L4", "L5", "T10", "T11", "T12"}

    # the overlay outlines the wedge (grade 2) in its colour
    overlay = cv2.imread(str(out / f"{name0}_heatmap.png"))
    assert np.all(overlay == GRADE_COLOURS[2], axis=-1).any()
    assert np.all(overlay == GRADE_COLOURS[0], axis=-1).any()


def test_calibrated_predictor_keeps_films_above_their_vertebrae(model, tmp_path):
    from inference.pipeline import run_inference
    from inference.predictor import Predictor

    cal = model["calibrator"]
    predictor = Predictor(model["calibrated"], device="cpu")
    assert predictor.calibrator is not None and predictor.operating_point == "balanced"
    _rig(predictor, model["films"], FILM_BODIES)
    out = tmp_path / "out"
    run_inference(predictor, model["films"], out, num_workers=0, progress=False)
    table = pd.read_csv(out / "predictions.csv", dtype={"decision": str})
    assert list(table.status) == ["ok", "ok", "no_spine"]  # the third film shows no vertebra
    for path, bodies in zip(model["films"][:2], FILM_BODIES[:2]):
        row = table[table.image == path].iloc[0]
        record = json.loads((out / f"{row['name']}.json").read_text())
        _check_film_agrees(record)
        raw_vertebrae = []
        for v, (_, _, (lf, la), _) in zip(record["vertebrae"], _expected_vertebrae(bodies)):
            p_raw = _sigmoid(lf)
            raw_vertebrae.append(p_raw)
            assert v["p_fracture_uncalibrated"] == pytest.approx(p_raw, abs=1e-6)
            assert v["p_fracture"] == pytest.approx(float(cal.apply(p_raw)), abs=1e-6)
            agf = float(cal.apply(_sigmoid(la), "p_acute_given_fracture"))
            assert v["p_acute"] == pytest.approx(v["p_fracture"] * agf, abs=1e-6)
        # the head is calibrated like the vertebrae; the uncalibrated film value combines raw values
        head_cal = record["p_fracture_image_head"]
        head_raw = float(1.0 / (1.0 + np.exp(-np.log(head_cal / (1 - head_cal)) * 2.5)))  # undo T = 2.5
        assert record["p_fracture_uncalibrated"] == pytest.approx(max([head_raw] + raw_vertebrae), abs=1e-5)
        assert record["p_fracture"] == pytest.approx(float(cal.apply(record["p_fracture_uncalibrated"])), abs=1e-5)
        assert record["decision"]["fracture"] == (record["p_fracture"] >= 0.6)
        assert row.decision == ("1" if record["decision"]["fracture"] else "0")
    vt = pd.read_csv(out / "vertebrae.csv")
    assert len(vt) == 8 and (vt.p_fracture <= 1).all()


# --------------------------------------------------------------------------- DICOM SR
def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def test_dicom_sr_has_a_measurement_group_per_vertebra(model, tmp_path):
    import pydicom

    from inference.pipeline import run_inference
    from inference.predictor import Predictor

    spacing = (0.5, 0.25)  # (row, col) mm, anisotropic
    dcm = phantom_as_dicom(model["films"][0], tmp_path / "film.dcm", spacing, orientation=("A", "F"))
    predictor = Predictor(model["plain"], device="cpu")
    _rig(predictor, [str(dcm)], FILM_BODIES[:1])
    out = tmp_path / "out"
    run_inference(predictor, [str(dcm)], out, num_workers=0, progress=False, dicom_sr=True)
    record = json.loads((out / "film.json").read_text())
    assert record["pixel_spacing_mm"] == list(spacing)
    _check_vertebrae(record, FILM_BODIES[0], pixel_spacing=spacing)
    assert record["dicom_outputs"]["structured_report"] == "film_sr.dcm"
    vt = pd.read_csv(out / "vertebrae.csv")
    assert vt.height_posterior_mm.tolist() == pytest.approx([v["heights_mm"]["posterior"] for v in record["vertebrae"]])

    sr = pydicom.dcmread(out / "film_sr.dcm")
    groups = [it for it in _walk(sr.ContentSequence) if it.ValueType == "CONTAINER"
              and it.ConceptNameCodeSequence[0].CodeValue == "125007"]  # Measurement Group
    ids = []
    by_level = {}
    for g in groups:
        tracking = [it.TextValue for it in g.ContentSequence
                    if it.ValueType == "TEXT" and it.ConceptNameCodeSequence[0].CodeValue == "112039"]
        assert len(tracking) == 1
        ids.append(tracking[0])
        by_level[tracking[0]] = {
            it.ConceptNameCodeSequence[0].CodeValue: (float(it.MeasuredValueSequence[0].NumericValue),
                                                      it.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue)
            for it in _walk(g.ContentSequence) if it.ValueType == "NUM"}
    assert ids == ["image", "L1", "L2", "L3", "L4", "L5"]
    assert by_level["image"]["VCF002"][0] == pytest.approx(record["p_fracture"], abs=1e-6)
    for v in record["vertebrae"]:
        nums = by_level[v["level"]]
        assert nums["VCF002"][0] == pytest.approx(v["p_fracture"], abs=1e-6)
        for code, side in (("VCF020", "anterior"), ("VCF021", "middle"), ("VCF022", "posterior")):
            value, unit = nums[code]
            assert unit == "mm" and value == pytest.approx(v["heights_mm"][side], abs=1e-4)
    assert by_level["L3"]["VCF020"][0] == pytest.approx(0.7 * by_level["L3"]["VCF022"][0], abs=1e-3)
    grades = {(it.ConceptNameCodeSequence[0].CodeValue, it.ConceptCodeSequence[0].CodeValue)
              for it in _walk(sr.ContentSequence) if it.ValueType == "CODE"}
    assert ("VCF004", "VCF012") in grades  # the L3 wedge: Genant grade 2


class _ShrinkingRefiner(nn.Module):
    """A point refiner that reads every body in its window 0.8 x as tall as the window was
    placed for (a visible, known change per pass)."""

    def __init__(self):
        super().__init__()
        from models.point_refiner import HEIGHT_CONTEXT, REFINE_SIZE, WIDTH_CONTEXT

        half = (REFINE_SIZE - 1) / 2.0
        unit = np.array([[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]], float)
        self.template = unit * [REFINE_SIZE / (2 * WIDTH_CONTEXT), 0.8 * REFINE_SIZE / (2 * HEIGHT_CONTEXT)] + half
        self.calls = 0

    def forward(self, crops):
        self.calls += 1
        n = crops.shape[0]
        return {"points": torch.tensor(np.repeat(self.template[None], n, 0), dtype=torch.float32),
                "logits": torch.zeros(n, 2)}


def test_analyse_film_measures_the_point_refiners_reading_and_keeps_the_crop_probabilities():
    from models.point_refiner import REFINE_PASSES

    logits, box, truth, levels = _gap_film(skip=())
    image = np.zeros((128, 104), np.float32)
    cpu = torch.device("cpu")
    crop = _StubCropNet(logits=((1.0, -1.0),))
    plain = analyse_film(logits, box, STRIDE, crop, image, cpu)
    refiner = _ShrinkingRefiner()
    refined = analyse_film(logits, box, STRIDE, _StubCropNet(logits=((1.0, -1.0),)), image, cpu, point_refiner=refiner)
    assert refiner.calls == REFINE_PASSES == 2
    assert [v["level"] for v in refined["vertebrae"]] == levels
    for a, b, pts in zip(plain["vertebrae"], refined["vertebrae"], truth):
        np.testing.assert_allclose(a["points"], pts, atol=1e-3)
        centre = pts.mean(axis=0)
        shrunk = centre + (pts - centre) * [1.0, 0.8 ** REFINE_PASSES]  # each pass: 0.8 x the height
        np.testing.assert_allclose(b["points"], shrunk, atol=1e-3)
        assert b["heights"]["posterior"] == pytest.approx(0.64 * a["heights"]["posterior"], rel=1e-3)
        assert b["p_fracture"] == a["p_fracture"] and b["p_acute"] == a["p_acute"]


class _CollapsingRefiner(_ShrinkingRefiner):
    """Reads the bodies with ``collapse`` (indices, in call order) flattened to a line."""

    def __init__(self, collapse):
        super().__init__()
        self.collapse = list(collapse)

    def forward(self, crops):
        out = super().forward(crops)
        for k in self.collapse:
            out["points"][k, 3:, 1] = out["points"][k, :3, 1]
        return out


def test_analyse_film_drops_a_body_the_refiner_collapses():
    logits, box, truth, levels = _gap_film(skip=())
    image = np.zeros((128, 104), np.float32)
    cpu = torch.device("cpu")
    plain = analyse_film(logits, box, STRIDE, _StubCropNet(logits=((1.0, -1.0),)), image, cpu)
    n = len(plain["vertebrae"])
    collapsed = analyse_film(logits, box, STRIDE, _StubCropNet(logits=((1.0, -1.0),)), image, cpu,
                             point_refiner=_CollapsingRefiner(collapse=[1]))
    # one body read with no height is no measurement: dropped, as an unmeasurable crop reading is
    assert len(collapsed["vertebrae"]) == n - 1
    assert all(min(v["heights"].values()) >= 1.0 for v in collapsed["vertebrae"])
    none_left = analyse_film(logits, box, STRIDE, _StubCropNet(logits=((1.0, -1.0),)), image, cpu,
                             point_refiner=_CollapsingRefiner(collapse=range(n)))
    assert none_left["vertebrae"] == [] and none_left["levels_trusted"] is False


def test_describe_vertebrae_grades_the_sides_of_ap_films_alike():
    """A DICOM ViewPosition of AP/PA grades a wedge on the p3-p6 side as one on the p1-p4 side."""
    right = _wedge(62.0, 70.0, 30.0, 20.0, 0.30)[[2, 1, 0, 5, 4, 3]]  # the low side now p3-p6
    points = np.stack([_box(60.0, 40.0, 30.0, 20.0), right, _box(64.0, 100.0, 30.0, 20.0)])
    labels = {"levels": ["T11", "T12", "L1"], "level_confidence": 0.9, "trusted": True}
    probs = {k: np.full(3, 0.5) for k in ("p_fracture", "p_acute", "p_acute_given_fracture")}
    scores = np.ones(3)
    for view in ("AP", "pa"):
        v = describe_vertebrae(points, labels, probs, scores, view=view)[1]
        assert v["genant_grade"] == 2 and v["morphology"] == "wedge" and v["height_loss"] == pytest.approx(0.3)
    lateral = describe_vertebrae(points, labels, probs, scores, view="LATERAL")[1]
    assert lateral["morphology"] == "crush"  # p3-p6 read as posterior, collapsed against the neighbours
    assert describe_vertebrae(points, labels, probs, scores)[1]["morphology"] == "crush"


def test_overlay_label_fits_a_narrow_film():
    """The probabilities line shrinks to the film's width instead of running off a narrow AP film."""
    import cv2

    from inference.drawing import label_font_scale, overlay_heatmap

    label = "p(fracture) 0.05 p(acute) 0.01"
    narrow = overlay_heatmap(np.full((1024, 348), 0.0), np.zeros((1024, 348)), label=label)
    # white text pixels stop before the right edge
    white = (narrow == 255).all(axis=2)
    cols = np.flatnonzero(white.any(axis=0))
    assert cols.size and cols.max() < 348 - 4
    font = label_font_scale(label, 348 - 16, 0.8, 2)
    assert font < 0.8 and cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font, 2)[0][0] <= 348 - 16
    assert label_font_scale("p 0.1", 1000, 0.8, 2) == 0.8  # a label that fits keeps its size


def test_the_probabilities_line_is_readable_on_a_white_film():
    """The title is white on a black outline: on a film whose top edge is white it still shows."""
    from inference.drawing import overlay_heatmap

    white_film = overlay_heatmap(np.full((600, 500), 1.0), np.zeros((600, 500)), label="p(fracture) 0.42")
    title = white_film[:40]
    dark = (title < 60).all(axis=2)
    assert dark.sum() > 100  # the outline of every letter
    assert (title == 255).all(axis=2).sum() > 100  # and the white letters inside it


def test_a_body_overlapping_a_better_one_is_dropped_and_neighbours_are_kept():
    """Two readings of one vertebra, half a body apart (too far for the centre rule), share
    0.43 of their outlines: the lower-scoring one goes. True neighbours touch at most."""
    top, slid, below = _box(100, 100, 60, 40), _box(103, 122, 60, 40), _box(100, 160, 60, 40)
    assert np.linalg.norm(slid.mean(0) - top.mean(0)) > 0.5 * 40  # the centre rule misses it
    bodies = np.stack([top, slid, below])
    assert duplicate_bodies(bodies, np.array([0.9, 0.6, 0.8])).tolist() == [False, True, False]
    # the slid reading scored highest: it stays and the body it covers goes; the one it touches stays
    assert duplicate_bodies(bodies, np.array([0.5, 0.9, 0.4])).tolist() == [True, False, False]
    # neighbours sharing a tenth of their outlines (a tilted disc space) are two bodies
    touching = _box(100, 136, 60, 40)
    assert MAX_BODY_OVERLAP > 0.1 and not duplicate_bodies(np.stack([top, touching]), np.array([0.9, 0.8])).any()


def test_a_sliver_that_cannot_be_measured_does_not_remove_the_body_it_lies_on():
    """A spurious reading squashed under a pixel, scored above the body it lies in, is dropped
    as unmeasurable, and the body stays (the overlap rule looks at measurable bodies only)."""
    real, sliver = _box(100, 100, 60, 40), _box(110, 118, 30, 0.8)
    assert kept_bodies(np.stack([real, sliver]), np.array([0.8, 0.9])).tolist() == [True, False]


def test_a_non_convex_outline_is_compared_by_its_hull():
    """OpenCV's convex intersection gives a wrong area for a non-convex outline (here the whole
    square, where a hundredth of it is shared): outlines are compared by their hulls (0.12)."""
    dart = np.array([[0, 0], [5, 1.5], [10, 0], [0, 10], [1.5, 5], [3, 3]], dtype=np.float64)  # p6 dented in
    square = _box(9, 3, 4, 4)
    assert duplicate_bodies(np.stack([dart, square]), np.array([0.9, 0.8])).tolist() == [False, False]
