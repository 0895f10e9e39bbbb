"""Calibration and rejection rule fitted together on held-out outputs: what `digits train` stores in
the model (out-of-fold outputs with --cv, the validation part without)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from service.recognition.model_metadata import Calibration, Rejection
from training.quality.calibration import ece, fit_temperature, nll, softmax
from training.quality.thresholds import Outputs, choose_rule, measure_digits, measure_negatives


def calibrate_and_choose(oof: dict[str, np.ndarray], source: str) -> tuple[Calibration, Rejection, dict[str, Any]]:
    """Temperature and rule from held-out outputs (`source` says which), and what they measure there
    (in-sample for both: the honest figures are the test part's)."""
    labels = oof["labels"]
    both = np.concatenate([oof["logits"], oof["client_logits"]])
    temperature = fit_temperature(both, np.concatenate([labels, labels]))
    figures: dict[str, Any] = {}
    for view, logits in (("mnist", oof["logits"]), ("client_style", oof["client_logits"])):
        figures[view] = {"ece_before": ece(softmax(logits), labels),
                         "ece_after": ece(softmax(logits, temperature), labels),
                         "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, temperature)}
    shapes = {key: oof.get(f"{key}_shapes") for key in ("digits", "client", "val", "eval")}
    digits = [Outputs.of(oof["logits"], temperature, labels, shapes=shapes["digits"]),
              Outputs.of(oof["client_logits"], temperature, labels, shapes=shapes["client"])]
    val_negatives = Outputs.of(oof["val_negatives"], temperature, kinds=oof["val_kinds"], shapes=shapes["val"])
    source = (f"{source}: {len(labels)} real digits, as MNIST arrays and as clients send them, and "
              f"{len(val_negatives.logits)} generated negatives of the training kinds (other images than those "
              f"trained on)")
    rule = choose_rule(digits, val_negatives, describe={"data": source})
    calibration = Calibration(temperature=temperature, extra={
        "fitted_on": source.split(", and ")[0], "objective": "negative log-likelihood", "ece_bins": 15,
        "out_of_fold": {view: {k: round(v, 6) for k, v in f.items()} for view, f in figures.items()}})
    figures["rejection_mnist"] = measure_digits(rule, digits[0])
    figures["rejection_client_style"] = measure_digits(rule, digits[1])
    figures["val_negatives"] = measure_negatives(rule, val_negatives, digits[0])
    if len(oof["eval_negatives"]):
        figures["eval_negatives"] = measure_negatives(rule, Outputs.of(oof["eval_negatives"], temperature,
                                                                      kinds=oof["eval_kinds"], shapes=shapes["eval"]),
                                                      digits[0])
    rule = replace(rule, extra={**rule.extra, "negatives": _negatives_made(), "validation_rates": {
        "digits_rejected": {view: round(figures[f"rejection_{view}"]["rejected"]["value"], 6)
                            for view in ("mnist", "client_style")},
        "negatives_rejected": round(figures["val_negatives"]["rejected"]["value"], 6),
        "negatives_rejected_by_kind": {kind: round(f["value"], 4)
                                       for kind, f in figures["val_negatives"]["by_kind"].items()}}})
    return calibration, rule, figures


def _negatives_made() -> dict[str, Any]:
    """How the validation negatives were made, for the record."""
    from training.synth.glyphs import training_fonts
    from training.synth.negatives import NEGATIVES_VAL_SEED, TRAIN_MIX

    return {"kinds": sorted(TRAIN_MIX), "seed": NEGATIVES_VAL_SEED, "fonts": training_fonts().describe(),
            "generator": "training.synth.negatives"}
