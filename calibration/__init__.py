"""Calibration of a model's probabilities and its operating points."""
