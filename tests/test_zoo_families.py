"""One model per family from the zoos: it converts, and the result is a drop-in replacement
(``cspify.verify``), the user's model untouched, its flops lower. ``-m zoo`` runs every
torchvision classifier the same way (slow: ``python benchmarks/zoo.py`` is the full matrix,
with the timm list)."""

import pytest
import torch

import cspify
from cspify.errors import CspifyError, NoStageError
from cspify.load import load_model
from cspify.verify import drop_in_problems

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
NO_STAGE = ["torchvision:squeezenet1_0"]
# Refused in one sentence, as benchmarks/ZOO.md lists them: the model and what the refusal says.
# torchvision's GoogLeNet and Inception v3 run their auxiliary heads only in training.
REFUSED = {"torchvision:googlenet": "takes another path in training mode than in eval mode",
           "torchvision:inception_v3": "takes another path in training mode than in eval mode"}
SIZE = {"vit": 224, "swin": 224, "maxvit": 224, "inception_v3": 96}  # fixed patch or window grids


def converted(spec: str):
    torch.manual_seed(0)
    model = load_model(spec).model
    side = next((s for prefix, s in SIZE.items() if spec.partition(":")[2].startswith(prefix)), 64)
    x = torch.randn(2, 3, side, side)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    csp = cspify.convert(model, x)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), "the user's model changed"
    return model, csp, x


@pytest.mark.parametrize("spec", CONVERTS)
def test_family_converts(spec):
    model, csp, x = converted(spec)
    assert drop_in_problems(model, csp, x) == []
    report = cspify.compare(model, csp, x)
    assert report.converted.flops < report.original.flops
    assert any(row.converted for row in report.stages)


@pytest.mark.parametrize("spec", NO_STAGE)
def test_family_without_stages_says_so(spec):
    with pytest.raises(NoStageError, match="no residual, dense, aggregation or plain stage"):
        converted(spec)


def torchvision_classifiers() -> list[str]:
    try:
        import torchvision
    except ImportError:
        return []
    return [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


@pytest.mark.zoo
@pytest.mark.parametrize("spec", torchvision_classifiers())
def test_zoo(spec):
    if spec in REFUSED:
        with pytest.raises(CspifyError, match=REFUSED[spec]) as error:
            converted(spec)
        assert error.value.hint
        return
    try:
        model, csp, x = converted(spec)
    except NoStageError:
        return
    assert drop_in_problems(model, csp, x) == []
