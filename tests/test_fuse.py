"""Norms folded into the convs before them for inference (cspify.fuse_for_inference, convert --inference):
outputs kept, the record and the model's class kept, the user's model untouched, bad inputs refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import cspify
from cspify.errors import CspifyError, TraceError
from cspify.fuse import fold_norms
from cspify.record import conversion_of

from test_cli import RESNET, SMALL, cli
from tiny_models import TinyDenseNet, TinyResNet, randomize_norms, seeded

X = torch.randn(2, 3, 16, 16)


def _norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.fixture(scope="module")
def converted():
    model = randomize_norms(seeded(TinyResNet)).eval()  # norms with statistics of their own: folding changes weights
    return model, cspify.convert(model, X).eval()


def test_folded_model_gives_the_same_outputs_with_fewer_layers(converted):
    _, csp = converted
    state = {k: v.clone() for k, v in csp.state_dict().items()}
    folded = fold_norms(csp, X)
    assert _norms(csp) > 0 and _norms(folded.model) == 0
    assert len(folded.norms) == _norms(csp)
    for norm, conv in folded.norms:
        assert isinstance(csp.get_submodule(norm), nn.BatchNorm2d) and isinstance(csp.get_submodule(conv), nn.Conv2d)
    with torch.no_grad():
        assert torch.allclose(folded.model(X), csp(X), atol=1e-5)
    assert 0 <= folded.max_abs_diff <= folded.tolerance
    assert "folded" in folded.summary()
    # the converted model itself is untouched, and the fused copy keeps the conversion record
    assert all(torch.equal(v, state[k]) for k, v in csp.state_dict().items())
    assert conversion_of(folded.model) == conversion_of(csp)
    assert not folded.model.training


def test_fuse_for_inference_on_a_model_cspify_did_not_convert():
    model = randomize_norms(seeded(TinyDenseNet)).eval()
    fused = cspify.fuse_for_inference(model, X)
    assert isinstance(fused, torch.fx.GraphModule) and _norms(fused) < _norms(model)
    with torch.no_grad():
        assert torch.allclose(fused(X), model(X), atol=1e-5)
    assert _norms(model) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # untouched


def test_only_the_converted_part_of_a_scope_conversion_is_folded():
    class Host(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = seeded(TinyResNet)
            self.extra = nn.Sequential(nn.Conv2d(5, 5, 1), nn.BatchNorm1d(5))

        def forward(self, x):
            return self.body(x)

    host = Host().eval()
    csp = cspify.convert(host, X, scope="body").eval()
    folded = fold_norms(csp, X)
    assert all(norm.startswith("body.") for norm, _ in folded.norms) and folded.norms
    assert isinstance(folded.model, Host) and isinstance(folded.model.extra[1], nn.BatchNorm1d)
    assert conversion_of(folded.model, "body") is not None


def test_training_mode_is_refused(converted):
    _, csp = converted
    csp.train()
    try:
        with pytest.raises(CspifyError, match="the model is in training mode") as error:
            cspify.fuse_for_inference(csp, X)
        assert "model.eval()" in error.value.hint
    finally:
        csp.eval()


def test_a_fold_that_changes_the_outputs_is_refused(converted, monkeypatch):
    from cspify import fuse

    real = fuse._torch_fuse

    def broken(gm, inplace, no_trace):
        result = real(gm, inplace=inplace, no_trace=no_trace)
        conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
        conv.weight.data.mul_(3.0)
        return result

    monkeypatch.setattr(fuse, "_torch_fuse", broken)
    _, csp = converted
    with pytest.raises(CspifyError, match=r"changed the outputs by up to [0-9.e-]+ on the example inputs, more than"):
        fold_norms(csp, X)


def test_inputs_the_model_does_not_take_are_refused(converted):
    _, csp = converted
    with pytest.raises(TraceError, match="the model does not run on the example inputs"):
        fold_norms(csp, torch.randn(1, 5, 16, 16))


def test_cli_convert_inference_saves_the_folded_model(tmp_path):
    out = tmp_path / "m.pt"
    result = cli("convert", RESNET, *SMALL, "--inference", "-o", out, "-q")
    assert result.exit_code == 0, result.output
    assert "for inference: folded" in result.output
    saved = torch.load(out, weights_only=False)
    assert _norms(saved) == 0 and not saved.training
    with torch.no_grad():
        assert saved(torch.randn(1, 3, 32, 32)).shape[0] == 1
