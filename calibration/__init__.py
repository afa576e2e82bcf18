"""Calibration of a model's probabilities and its operating points.

:mod:`calibration.methods` holds one class per method behind a registry, :mod:`calibration.calibrator`
the fitted calibration that inference applies, :mod:`calibration.fit` the fitting and its command
line (``python -m calibration``)."""
from calibration.calibrator import CALIBRATION_KEY, HEADS, Calibrator, predictor_calibration
from calibration.methods import METHODS, CalibrationError, CalibrationMethod, register

__all__ = ["CALIBRATION_KEY", "HEADS", "METHODS", "CalibrationError", "CalibrationMethod", "Calibrator",
           "predictor_calibration", "register"]
