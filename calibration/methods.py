"""Calibration methods: one small class per method behind a registry.

A method maps one head's raw output (its logit, or its probability) to a calibrated
probability. Each class knows how to fit its parameters on labelled outputs, apply them, and
give them in the JSON form stored in a calibration (``calibration.json``, or a checkpoint's
``vcf_calibration``). A method constructed without parameters is the identity map: a head
whose labels are all of one class keeps it.

A new method is one class::

    @register
    class Shift(CalibrationMethod):
        name = "shift"

        def __init__(self, b: float = 0.0):
            self.b = float(b)

        @classmethod
        def fit(cls, logits, probs, labels):
            ...
            return cls(b)

        def apply_logits(self, logits):
            return sigmoid(logits + self.b)

        def to_json(self):
            return {"b": self.b}

        @classmethod
        def from_json(cls, value):
            return cls() if value is None else cls(value["b"])

after which ``Calibrator("shift", shift={...})``, ``python -m calibration --method shift`` and
the method-selection cross-validation use it.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from models.bundle import ModelError

TEMPERATURE_BOUNDS = (0.01, 100.0)
PLATT_SLOPE_BOUNDS = (0.01, 100.0)  # a > 0 keeps the map increasing (the ranking unchanged)
PLATT_INTERCEPT_BOUND = 20.0
PROB_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before taking their logit


class CalibrationError(ModelError):
    """A calibration that cannot be fitted, or a stored one that cannot be used."""


# --------------------------------------------------------------------------- shared arithmetic
def logit(p) -> np.ndarray:
    """``ln(p / (1 - p))`` of probabilities clipped to ``[PROB_EPS, 1 - PROB_EPS]``."""
    p = np.clip(np.asarray(p, dtype=np.float64), PROB_EPS, 1.0 - PROB_EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def known_labels(values, labels) -> tuple[np.ndarray, np.ndarray]:
    """``values`` and ``labels`` where the label is known (0 or 1; NaN is left out) and the
    value finite."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels, dtype=np.float64).reshape(-1)
    if values.shape != labels.shape:
        raise ValueError(f"{values.shape[0]} values but {labels.shape[0]} labels")
    keep = ~np.isnan(labels) & np.isfinite(values)
    values, labels = values[keep], labels[keep]
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN (unknown)")
    return values, labels


def has_both_classes(labels: np.ndarray) -> bool:
    return bool((labels == 1).any() and (labels == 0).any())


def binary_nll(logits, labels) -> float:
    """Mean negative log-likelihood of 0/1 labels under ``sigmoid(logits)`` (numerically stable)."""
    z, y = known_labels(logits, labels)
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def _labelled(values, labels, what: str) -> tuple[np.ndarray, np.ndarray]:
    z, y = known_labels(values, labels)
    if not has_both_classes(y):
        raise CalibrationError(f"{what} needs labelled images of both classes")
    return z, y


def _beta_features(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``ln p`` and ``-ln(1 - p)`` of ``p = sigmoid(z)``, computed stably from the logit."""
    return -np.logaddexp(0.0, -z), np.logaddexp(0.0, z)


def stored_number(value: Any, what: str) -> float:
    """A number of a stored calibration: a JSON number, never a string or true/false (a
    calibration edited by hand to ``"2.5"`` is refused, not read)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise CalibrationError(f"{what} is {value!r}, a {type(value).__name__}; it must be a number")
    return float(value)


def _floats(value: Any, keys: tuple[str, ...], what: str) -> tuple[float, ...]:
    if not isinstance(value, dict) or any(k not in value for k in keys):
        raise CalibrationError(f"{what} parameters are malformed: {value!r} (expected numbers {', '.join(keys)})")
    return tuple(stored_number(value[k], f"{what} parameter {k}") for k in keys)


def platt_formula(ab: dict) -> str:
    """``sigmoid(a * logit + b)`` with the fitted numbers, for printing."""
    a, b = float(ab["a"]), float(ab["b"])
    return f"sigmoid({a:.4g} * logit {'-' if b < 0 else '+'} {abs(b):.4g})"


def beta_formula(abc: dict) -> str:
    """``sigmoid(a * ln p - b * ln(1 - p) + c)`` with the fitted numbers, for printing."""
    a, b, c = float(abc["a"]), float(abc["b"]), float(abc["c"])
    return f"sigmoid({a:.4g} * ln p - {b:.4g} * ln(1 - p) {'-' if c < 0 else '+'} {abs(c):.4g})"


# --------------------------------------------------------------------------- the base class and registry
class CalibrationMethod:
    """One head's calibration map. Subclasses set ``name``, and implement :meth:`fit`,
    :meth:`to_json`, :meth:`from_json` and one of :meth:`apply_logits` (a map of the logit) or
    :meth:`apply_probabilities` (a map of the probability)."""

    name: ClassVar[str]
    has_parameters: ClassVar[bool] = True  # False: nothing stored (the method "none")
    input_form: ClassVar[str] = "logits"  # what the map is applied to: "logits" or "probabilities"

    @classmethod
    def fit(cls, logits: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> "CalibrationMethod":
        """The map fitted on one head's raw ``logits`` and ``probs`` (the same outputs in two
        forms) and their ``labels`` (0, 1 or NaN: left out). Raises :class:`CalibrationError`
        without labelled outputs of both classes."""
        raise NotImplementedError

    def apply_logits(self, logits: np.ndarray) -> np.ndarray:
        return self.apply_probabilities(sigmoid(logits))

    def apply_probabilities(self, probs: np.ndarray) -> np.ndarray:
        return self.apply_logits(logit(probs))

    def apply(self, values, logits: bool = False) -> np.ndarray:
        """Calibrated probabilities from raw probabilities, or from logits with ``logits=True``."""
        values = np.asarray(values, dtype=np.float64)
        return self.apply_logits(values) if logits else self.apply_probabilities(values)

    def to_json(self) -> Any:
        """The parameters as stored (plain JSON types)."""
        raise NotImplementedError

    @classmethod
    def from_json(cls, value: Any) -> "CalibrationMethod":
        """The map of stored parameters; ``None`` gives the identity map."""
        raise NotImplementedError

    def describe(self) -> str:
        """The parameters in a few words, for printing."""
        return repr(self.to_json())


METHODS: dict[str, type[CalibrationMethod]] = {}


def register(cls: type[CalibrationMethod]) -> type[CalibrationMethod]:
    """Class decorator: make a :class:`CalibrationMethod` available by its ``name``."""
    if not getattr(cls, "name", None):
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"calibration method {cls.name!r} is already registered ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[CalibrationMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise CalibrationError(f"unknown calibration method {name!r} (expected {', '.join(METHODS)})") from None


# --------------------------------------------------------------------------- the methods
@register
class NoCalibration(CalibrationMethod):
    """Probabilities left as they are."""

    name = "none"
    has_parameters = False
    input_form = "probabilities"

    @classmethod
    def fit(cls, logits, probs, labels) -> "NoCalibration":
        return cls()

    def apply_logits(self, logits):
        return sigmoid(logits)

    def apply_probabilities(self, probs):
        return np.asarray(probs, dtype=np.float64)

    def to_json(self):
        return None

    @classmethod
    def from_json(cls, value) -> "NoCalibration":
        return cls()

    def describe(self) -> str:
        return "unchanged"


@register
class TemperatureScaling(CalibrationMethod):
    """``p = sigmoid(logit / T)``, ``T > 0`` minimising the negative log-likelihood, searched on
    a log scale within ``TEMPERATURE_BOUNDS`` (perfectly separable data would drive it to 0)."""

    name = "temperature"

    def __init__(self, temperature: float = 1.0):
        t = float(temperature)
        if not (t > 0 and math.isfinite(t)):
            raise CalibrationError(f"temperature is {t}; it must be positive")
        self.temperature = t

    @classmethod
    def fit(cls, logits, probs, labels) -> "TemperatureScaling":
        from scipy.optimize import minimize_scalar  # fitting only: inference starts without scipy

        z, y = _labelled(logits, labels, "temperature scaling")
        lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)

        def nll(log_t: float) -> float:
            s = z * math.exp(-log_t)
            return float(np.mean(np.logaddexp(0.0, s) - y * s))

        res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
        return cls(math.exp(res.x))

    def apply_logits(self, logits):
        return sigmoid(np.asarray(logits, dtype=np.float64) / self.temperature)

    def to_json(self) -> float:
        return self.temperature

    @classmethod
    def from_json(cls, value) -> "TemperatureScaling":
        return cls() if value is None else cls(stored_number(value, "temperature"))

    def describe(self) -> str:
        return f"T={self.temperature:.4g}"


@register
class PlattScaling(CalibrationMethod):
    """``p = sigmoid(a * logit + b)``, ``a`` in ``PLATT_SLOPE_BOUNDS`` (an increasing map: the
    ranking unchanged) and ``|b| <= PLATT_INTERCEPT_BOUND``, minimising the negative
    log-likelihood. Unlike temperature scaling the intercept also corrects a shifted base rate."""

    name = "platt"

    def __init__(self, a: float = 1.0, b: float = 0.0):
        a, b = float(a), float(b)
        if not (a > 0 and math.isfinite(a) and math.isfinite(b)):
            raise CalibrationError(f"Platt slope is {a} (intercept {b}); the slope must be positive and finite")
        self.a, self.b = a, b

    @classmethod
    def fit(cls, logits, probs, labels) -> "PlattScaling":
        from scipy.optimize import minimize  # fitting only: inference starts without scipy

        z, y = _labelled(logits, labels, "Platt scaling")

        def nll_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
            a, b = params
            s = a * z + b
            r = sigmoid(s) - y  # d NLL / d s
            return float(np.mean(np.logaddexp(0.0, s) - y * s)), np.array([np.mean(r * z), np.mean(r)])

        bounds = [PLATT_SLOPE_BOUNDS, (-PLATT_INTERCEPT_BOUND, PLATT_INTERCEPT_BOUND)]
        res = minimize(nll_and_grad, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=bounds)
        return cls(float(res.x[0]), float(res.x[1]))

    def apply_logits(self, logits):
        return sigmoid(self.a * np.asarray(logits, dtype=np.float64) + self.b)

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b}

    @classmethod
    def from_json(cls, value) -> "PlattScaling":
        return cls() if not value else cls(*_floats(value, ("a", "b"), "Platt"))

    def describe(self) -> str:
        return platt_formula(self.to_json())


@register
class BetaCalibration(CalibrationMethod):
    """``p = sigmoid(a * ln p - b * ln(1 - p) + c)`` (beta calibration, Kull, Silva Filho and
    Flach, AISTATS 2017), ``a, b`` in ``PLATT_SLOPE_BOUNDS``, ``|c| <= PLATT_INTERCEPT_BOUND``.
    Platt scaling is the case ``a = b``; otherwise the two ends are corrected apart."""

    name = "beta"

    def __init__(self, a: float = 1.0, b: float = 1.0, c: float = 0.0):
        a, b, c = float(a), float(b), float(c)
        if not (a > 0 and b > 0 and all(map(math.isfinite, (a, b, c)))):
            raise CalibrationError(f"beta calibration has a = {a}, b = {b}, c = {c}; "
                                   "a and b must be positive and all finite")
        self.a, self.b, self.c = a, b, c

    @classmethod
    def fit(cls, logits, probs, labels) -> "BetaCalibration":
        from scipy.optimize import minimize  # fitting only: inference starts without scipy

        z, y = _labelled(logits, labels, "beta calibration")
        log_p, neg_log_q = _beta_features(z)

        def nll_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
            a, b, c = params
            s = a * log_p + b * neg_log_q + c
            r = sigmoid(s) - y  # d NLL / d s
            return (float(np.mean(np.logaddexp(0.0, s) - y * s)),
                    np.array([np.mean(r * log_p), np.mean(r * neg_log_q), np.mean(r)]))

        bounds = [PLATT_SLOPE_BOUNDS, PLATT_SLOPE_BOUNDS, (-PLATT_INTERCEPT_BOUND, PLATT_INTERCEPT_BOUND)]
        res = minimize(nll_and_grad, x0=np.array([1.0, 1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=bounds)
        return cls(float(res.x[0]), float(res.x[1]), float(res.x[2]))

    def apply_logits(self, logits):
        log_p, neg_log_q = _beta_features(np.asarray(logits, dtype=np.float64))
        return sigmoid(self.a * log_p + self.b * neg_log_q + self.c)

    def to_json(self) -> dict:
        return {"a": self.a, "b": self.b, "c": self.c}

    @classmethod
    def from_json(cls, value) -> "BetaCalibration":
        return cls() if not value else cls(*_floats(value, ("a", "b", "c"), "beta calibration"))

    def describe(self) -> str:
        return beta_formula(self.to_json())


@register
class IsotonicCalibration(CalibrationMethod):
    """A non-decreasing piecewise-linear map of the probability (scikit-learn's
    ``IsotonicRegression``), its knots stored as plain lists and applied by linear
    interpolation, clipped to the end values outside them. Monotone but not strictly (ties
    appear); needs more data than temperature scaling."""

    name = "isotonic"
    input_form = "probabilities"

    def __init__(self, x: list[float] | None = None, y: list[float] | None = None):
        if x is None and y is None:
            self.knots = None  # identity
            return
        if not isinstance(x, (list, tuple)) or not isinstance(y, (list, tuple)) or not x or len(x) != len(y):
            raise CalibrationError("isotonic table is malformed (expected lists x and y of equal length)")
        self.knots = {"x": [stored_number(v, "isotonic knot x") for v in x],
                      "y": [stored_number(v, "isotonic knot y") for v in y]}

    @classmethod
    def fit(cls, logits, probs, labels) -> "IsotonicCalibration":
        from sklearn.isotonic import IsotonicRegression  # fitting only: inference starts without sklearn

        p, y = _labelled(probs, labels, "isotonic calibration")
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(p, y)
        return cls(list(iso.X_thresholds_), list(iso.y_thresholds_))

    def apply_probabilities(self, probs):
        p = np.asarray(probs, dtype=np.float64)
        return p if self.knots is None else np.interp(p, self.knots["x"], self.knots["y"])

    def to_json(self) -> dict | None:
        return None if self.knots is None else {"x": list(self.knots["x"]), "y": list(self.knots["y"])}

    @classmethod
    def from_json(cls, value) -> "IsotonicCalibration":
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise CalibrationError(f"isotonic table is malformed: {value!r}")
        return cls(value.get("x") or [], value.get("y", []))

    def describe(self) -> str:
        return "identity" if self.knots is None else f"{len(self.knots['x'])} knots"
