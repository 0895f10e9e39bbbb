"""Figures about a model's outputs, with numpy only (no torch): `digits evaluate` uses them on a server
install, training uses them to calibrate and to choose thresholds.

- `metrics`: Wilson intervals, AUROC, coverage-vs-accuracy curves, mean and sd.
- `calibration`: temperature scaling, expected calibration error, reliability bins.
- `thresholds`: choosing the rejection rule and measuring it with the server's own `decide`.
"""
