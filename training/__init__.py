"""Training side of the digit recogniser: MNIST IDX data, LeNet-5, training, ONNX export, evaluation.

Only `training.cli` is imported by `digits` itself; it must stay free of torch at import time, and
`training.data`, `training.evaluate` and `training.download` work without torch too.
"""
