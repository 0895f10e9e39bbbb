"""How the shipped model is made beyond one plain run (needs torch).

- `config`: every setting of a run (`TrainConfig`) and the learning-rate schedules.
- `loop`: one model's training: augmentation, client-style digits, outlier exposure, label smoothing,
  EMA of the weights, distillation from teachers.
- `crossval`: k-fold cross-validation of a recipe, in parallel processes, with out-of-fold outputs.
- `pipeline`: the shipped model: cross-validation, the final model, calibration, thresholds, export.
"""
