"""One model per family from the zoos, through the same checks as benchmarks/zoo.py:
outputs keep their shapes, forward and backward run in train and eval mode, the result
traces again, the user's model is untouched, flops do not rise. `-m zoo` runs every
model of the matrix instead (slow: that is what benchmarks/zoo.py is for)."""

import pytest
import torch

from benchmarks.zoo import TIMM, check, torchvision_names

pytest.importorskip("torchvision")
pytest.importorskip("timm")

CONVERTS = [
    "torchvision:mobilenet_v2",          # inverted residuals, no activation after the add
    "torchvision:mobilenet_v3_small",    # hardswish, squeeze-and-excitation gates
    "torchvision:efficientnet_b0",       # SE + stochastic depth
    "torchvision:mnasnet0_5",
    "torchvision:regnet_y_400mf",        # group widths + SE
    "torchvision:convnext_tiny",         # channels-last section, LayerNorm, layer scale
    "timm:resnetv2_50",                  # pre-activation
    "timm:dla34",
]
NO_STAGE = ["torchvision:squeezenet1_0", "torchvision:shufflenet_v2_x0_5"]


@pytest.mark.parametrize("spec", CONVERTS)
def test_family_converts(spec):
    row = check(spec)
    assert row["status"] == "ok", row["reason"]
    assert row["converted"] >= 1
    assert "-" in row["flops"].split("(")[1]  # the flops change is negative


@pytest.mark.parametrize("spec", NO_STAGE)
def test_family_without_stages_says_so(spec):
    row = check(spec)
    assert row["status"] == "no stage"
    assert "no residual or dense stage" in row["reason"]


@pytest.mark.zoo
@pytest.mark.parametrize("spec", torchvision_names() + [f"timm:{n}" for n in TIMM])
def test_zoo(spec):
    assert check(spec)["status"] in ("ok", "no stage")
