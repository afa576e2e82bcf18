"""The inference pipeline: a predictor over a model, per-vertebra analysis and the outputs it writes."""
