"""HireConfig: every field validated, calibration entries checked, options routed."""

import pytest

from topk_compiler import ApproxTopkConfig, HireConfig

ENTRY = {"predictor": "lowrank", "rank": 16, "candidates": 200, "recall_target": 0.95}


def test_defaults_and_options():
    config = ApproxTopkConfig.from_options({"hire": {"rewrite": "always", "ffn_activations": ["relu", "gelu"],
                                                     "calibration": {"model.py:3": ENTRY}}})
    assert config.hire.rewrite == "always" and config.hire.ffn_activations == ("relu", "gelu")
    assert HireConfig().ffn_activations == ("relu", "relu_squared") and HireConfig().rewrite == "auto"
    assert ApproxTopkConfig.from_options({"hire": False}).hire.enabled is False


@pytest.mark.parametrize("fields,match", [
    (dict(rewrite="never"), "hire.rewrite"),
    (dict(ffn_activations=["swish"]), "hire.ffn_activations"),
    (dict(ffn_activations="relu"), "hire.ffn_activations"),
    (dict(calibration={"model.py": ENTRY}), "look like"),
    (dict(calibration={"m.py:1": {**ENTRY, "margin": 3}}), "unknown field"),
    (dict(calibration={"m.py:1": {"predictor": "lowrank"}}), "missing"),
    (dict(calibration={"m.py:1": {**ENTRY, "predictor": "pca"}}), "predictor"),
    (dict(calibration={"m.py:1": {**ENTRY, "rank": 0}}), "rank"),
    (dict(calibration={"m.py:1": {**ENTRY, "candidates": -1}}), "candidates"),
    (dict(calibration={"m.py:1": {**ENTRY, "recall_target": 1.5}}), "recall_target"),
    (dict(calibration={"m.py:1": {**ENTRY, "recall": "high"}}), "recall"),
    (dict(calibration={"m.py:1": {**ENTRY, "threshold": float("inf")}}), "threshold"),
    (dict(ffn_threshold="0"), "hire.ffn_threshold"),
])
def test_bad_values_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        HireConfig(**fields)


def test_quantized_entries_have_rank_zero_and_ffn_entries_a_threshold():
    HireConfig(calibration={"m.py:1": {**ENTRY, "predictor": "int4", "rank": 0, "threshold": -0.25}})
    assert HireConfig(ffn_threshold=1).ffn_threshold == 1.0
