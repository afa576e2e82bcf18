"""Full evaluation report: metrics with patient-level bootstrap CIs, operating points,
calibration, per-level / per-grade AUROCs, error gallery; ``metrics.json`` and ``report.html``.

Three parts:

* :mod:`evaluation.report.compute`: :func:`evaluate` computes everything into one
  JSON-serialisable dict (NaN written as ``None``), the inputs read once
  (:func:`~evaluation.report.compute.load_inputs`). It imports no plotting library.
* :mod:`evaluation.report.plots`: the matplotlib figures of a result.
* :mod:`evaluation.report.page`: :func:`~evaluation.report.page.write_report` writes
  ``metrics.json``, the PNG plots and a self-contained ``report.html`` (plots and overlays
  embedded as base64).

``evaluate.py`` is the command line.

Methods (also written into the report)
--------------------------------------
* **Bootstrap**: ``n_boot`` resamples of *patients* (``patient_id`` of the manifest) with
  replacement, every image of a drawn patient taken (see :mod:`evaluation.bootstrap`); 95%
  percentile intervals. The same resamples serve every metric. Thresholds of the operating
  points are chosen once on the full set and kept fixed in the resamples, so their intervals
  do not include the uncertainty of choosing the threshold.
* **Operating points** (an image is called positive when ``p_fracture >= threshold``; the
  candidate thresholds are the distinct scores, plus one just above the highest):
  ``high_sensitivity`` = the highest threshold whose sensitivity is >= 0.90; ``balanced`` = the
  threshold with the largest Youden J (sensitivity + specificity - 1; ties: the lowest);
  ``high_specificity`` = the lowest threshold whose specificity is >= 0.95
  (:func:`evaluation.metrics.operating_points`, the same as calibration's).
* **Calibration**: expected calibration error with 10 equal-width bins, L1 norm
  (:func:`evaluation.metrics.expected_calibration_error`: the value of torchmetrics'
  ``BinaryCalibrationError``), and its bootstrap interval from the same function with the
  resampling weights; Brier score (scikit-learn).
* **Unknown labels** are left out of each metric and counted (``n_unknown_left_out``); what the
  fracture metrics leave out is counted by reason in ``left_out``
  (:func:`evaluation.metrics.left_out`: error rows, no prediction, non-finite score, unknown label,
  and unused prediction rows: not in the manifest, repeated).

These are research metrics. On synthetic phantom films they say nothing about clinical
performance.
"""

from evaluation.report.compute import SCHEMA_VERSION, ReportInputs, evaluate, evaluate_inputs, load_inputs

__all__ = ["SCHEMA_VERSION", "ReportInputs", "evaluate", "evaluate_inputs", "load_inputs"]
