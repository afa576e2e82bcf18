"""A fitted calibration: one method's map per image head, the operating points, and what the
fit recorded (the per-vertebra combiner among it).

The stored form (:meth:`Calibrator.to_dict`, plain JSON types; see ``docs/formats.md``,
"Calibration and operating points") is ``{"format": 1, "method": NAME, NAME: {head:
parameters}, "operating_points": {...}, "default": POINT, ...what the fit recorded}``; the
method ``none`` stores no parameters.
"""
from __future__ import annotations

import numpy as np
import torch

from calibration.methods import METHODS, CalibrationError, CalibrationMethod, method_class, stored_number

CALIBRATION_KEY = "vcf_calibration"
CALIBRATION_FORMAT = 1
HEADS = ("p_fracture", "p_acute_given_fracture")


class Calibrator:
    """Maps raw head probabilities (or logits) to calibrated ones and holds the operating points.

    ``Calibrator(method, points=..., default=..., info=..., **{method: {head: parameters}})``:
    the parameters of each head in their stored form (e.g. ``temperature={"p_fracture":
    2.5}``); a head left out keeps the identity map. ``maps`` gives fitted
    :class:`~calibration.methods.CalibrationMethod` objects instead."""

    def __init__(self, method: str = "none", points: dict | None = None, default: str = "balanced",
                 info: dict | None = None, maps: dict[str, CalibrationMethod] | None = None, **parameters):
        cls = method_class(method)
        unknown = [k for k in parameters if k not in METHODS]
        if unknown:
            raise TypeError(f"Calibrator got parameters of unknown method(s) {unknown}")
        self.method = method
        stored = parameters.get(method) or {}
        if not isinstance(stored, dict):
            raise CalibrationError(f"{method} parameters are {stored!r}, a {type(stored).__name__}; expected an "
                                   f"object with a value per head ({', '.join(HEADS)})")
        self.maps: dict[str, CalibrationMethod] = {}
        for head in HEADS:
            if maps is not None and head in maps:
                if not isinstance(maps[head], cls):
                    raise CalibrationError(f"{head}: a {type(maps[head]).__name__} is not a {method!r} calibration")
                self.maps[head] = maps[head]
                continue
            try:
                self.maps[head] = cls.from_json(stored.get(head))
            except CalibrationError as exc:
                raise CalibrationError(f"{method} calibration of {head}: {exc}") from None
        self.operating_points = dict(points or {})
        for name, point in self.operating_points.items():
            if not isinstance(point, dict) or "threshold" not in point:
                raise CalibrationError(f"operating point {name!r} is {point!r}; expected an object with a threshold")
            stored_number(point["threshold"], f"the threshold of operating point {name!r}")
        if self.operating_points and default not in self.operating_points:
            raise CalibrationError(f"default operating point {default!r} is not one of "
                                   f"{', '.join(self.operating_points)}")
        self.default = default
        self.info = dict(info or {})

    @property
    def vertebra_combiner(self) -> dict | None:
        """The fitted crop-probability + morphometry combination (inference.vertebrae), if any."""
        return self.info.get("vertebra_combiner")

    # ---- applying
    def apply(self, p_or_logits, head: str = "p_fracture", logits: bool = False) -> np.ndarray:
        """Calibrated probabilities of one head (``p_fracture`` or ``p_acute_given_fracture``)
        from its raw probabilities, or from its logits with ``logits=True``."""
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r} (expected {', '.join(HEADS)})")
        x = p_or_logits.detach().cpu().numpy() if isinstance(p_or_logits, torch.Tensor) else p_or_logits
        return self.maps[head].apply(x, logits=logits)

    def apply_probabilities(self, probs: dict) -> dict:
        """A predictor's outputs with calibrated ``p_fracture``, ``p_acute_given_fracture`` and
        ``p_acute`` (their product), plus ``p_fracture_uncalibrated``; other keys pass through."""
        out = dict(probs)
        raw = np.asarray(probs["p_fracture"])
        dtype = raw.dtype if np.issubdtype(raw.dtype, np.floating) else np.float32
        p_f = self.apply(raw, "p_fracture").astype(dtype)
        p_ag = self.apply(np.asarray(probs["p_acute_given_fracture"]), "p_acute_given_fracture").astype(dtype)
        out["p_fracture_uncalibrated"] = raw
        out["p_fracture"], out["p_acute_given_fracture"] = p_f, p_ag
        out["p_acute"] = (p_f * p_ag).astype(dtype)
        return out

    # ---- deciding
    def threshold(self, point: str | None = None) -> float:
        name = point or self.default
        if name not in self.operating_points:
            raise CalibrationError(f"operating point {name!r} not in this calibration "
                                   f"(have: {', '.join(self.operating_points) or 'none'})")
        return float(self.operating_points[name]["threshold"])

    def decide(self, p_fracture_calibrated, point: str | None = None):
        """``p_fracture_calibrated >= threshold`` of the operating point (the default one if None)."""
        return np.asarray(p_fracture_calibrated) >= self.threshold(point)

    # ---- storing
    def to_dict(self) -> dict:
        d = {"format": CALIBRATION_FORMAT, "method": self.method}
        if self.maps[HEADS[0]].has_parameters:
            d[self.method] = {head: self.maps[head].to_json() for head in HEADS}
        d["operating_points"] = {k: dict(v) for k, v in self.operating_points.items()}
        d["default"] = self.default
        d.update({k: v for k, v in self.info.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Calibrator":
        if not isinstance(d, dict):
            raise CalibrationError(f"stored calibration is a {type(d).__name__}, not a dict")
        if d.get("format", CALIBRATION_FORMAT) != CALIBRATION_FORMAT:
            raise CalibrationError(f"calibration format {d.get('format')} but this code reads format {CALIBRATION_FORMAT}")
        method = d.get("method", "none")
        known = {"format", "method", "operating_points", "default", *METHODS}
        return cls(method, points=d.get("operating_points"), default=d.get("default", "balanced"),
                   info={k: v for k, v in d.items() if k not in known},
                   **({method: d.get(method)} if method in METHODS else {}))

    def describe(self) -> str:
        """The fitted parameters in a line."""
        if not self.maps[HEADS[0]].has_parameters:
            return f"{self.method} (probabilities unchanged)"
        return f"{self.method}: " + ", ".join(f"{h} {m.describe()}" for h, m in self.maps.items())


def predictor_calibration(stored, source, operating_point: str | None = None) -> tuple[Calibrator | None, str | None]:
    """The :class:`Calibrator` and operating-point name a predictor should use.

    ``stored``: the stored calibration dict (or None). Raises :class:`CalibrationError` (a
    ``ModelError``) for a malformed calibration, an unknown ``operating_point``, or an
    ``operating_point`` asked of a model without calibration."""
    if stored is None:
        if operating_point:
            raise CalibrationError(f"{source}: operating point {operating_point!r} asked for, but the model has no "
                                   f"calibration; fit one with `python -m calibration`")
        return None, None
    try:
        cal = Calibrator.from_dict(stored)
        point = operating_point or cal.default
        cal.threshold(point)
    except CalibrationError as exc:
        raise CalibrationError(f"{source}: {exc}") from exc
    return cal, point
