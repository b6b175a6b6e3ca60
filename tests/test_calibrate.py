"""calibrate: on tiny models and random images, a calibrated model's outputs are closer to
the original's than an uncalibrated one's, in every input form, for every fusion, with a
scope; modes and momenta come back; train mode computes what eval mode does. And the taps
calibration and fine-tuning read intermediate values with."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

import cspify
from cspify.calibrate import calibrate
from cspify.errors import ConfigError
from cspify.taps import run_until_tapped, tapping
from tiny_models import (Bottleneck, ChannelsLastNet, LastDense, TinyDenseNet, TinyResNet, cbr, randomize_norms,
                         seeded)

X = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
TEST = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def distance(model, converted, x=TEST) -> float:
    model.eval(), converted.eval()
    with torch.no_grad():
        reference = model(x)
        return float((converted(x) - reference).square().mean() / reference.var())


@pytest.mark.parametrize("family, options", [
    (TinyResNet, {}), (TinyResNet, {"fusion": "first"}), (TinyResNet, {"hidden": "scale"}),
    (TinyDenseNet, {}), (TinyDenseNet, {"fusion": "first"}), (ChannelsLastNet, {}), (LastDense, {}),
], ids=["resnet", "resnet-first", "resnet-scale", "dense", "dense-first", "channels-last", "channels-last-dense"])
def test_calibrated_outputs_are_closer(family, options):
    model = randomize_norms(seeded(family))
    converted = cspify.convert(model, X[:2], **options)
    before = distance(model, converted)
    assert calibrate(model, converted, X) is converted
    after = distance(model, converted)
    assert after < 0.5 * before, (before, after)
    record = converted.meta["cspify.calibrate"]
    assert record.images == len(X) and record.fits and not record.skipped
    json.dumps(record.to_dict())


def test_every_input_form_gives_the_same_model():
    model = randomize_norms(seeded(TinyResNet))
    labels = torch.zeros(len(X), dtype=torch.long)
    forms = {
        "tensor": X,
        "pairs": [(x, y) for x, y in zip(X.split(32), labels.split(32))],
        "loader": torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, labels), batch_size=32),
    }
    states = {}
    for name, images in forms.items():
        converted = cspify.convert(model, X[:2])
        calibrate(model, converted, images, batch_size=32)
        states[name] = converted.state_dict()
    for name, state in states.items():
        for key, value in state.items():
            assert torch.allclose(value.float(), states["tensor"][key].float(), atol=1e-5), (name, key)
    dataset = torch.utils.data.TensorDataset(X, labels)  # a Dataset: a seeded random subset
    converted = cspify.convert(model, X[:2])
    calibrate(model, converted, dataset, max_images=24, norms=False, inner=False, readers=False)
    assert converted.meta["cspify.calibrate"].images == 24


def test_a_transition_the_planner_accepts_is_fitted():
    """Calibration reads the op table the planner reads: a Sigmoid after the partial
    transition's conv and norm is an activation to both."""
    model = randomize_norms(seeded(TinyResNet))
    for block in model.modules():
        for name, layer in block.named_children():
            if isinstance(layer, nn.ReLU):
                setattr(block, name, nn.Sigmoid())
    converted = cspify.convert(model, X[:2])
    assert any(isinstance(m, nn.Sigmoid) and "csp" in name for name, m in converted.named_modules())
    calibrate(model, converted, X)
    record = converted.meta["cspify.calibrate"]
    assert not [reason for reason in record.skipped if "partial transition" in reason]
    assert sum(f.role == "partial transition" for f in record.fits) == len(cspify.conversion_of(converted).converted)


def test_progress_shows_a_bar_over_the_stages(capsys):
    model = randomize_norms(seeded(TinyResNet))
    converted = cspify.convert(model, X[:2])
    calibrate(model, converted, X[:24], progress=True)
    shown = capsys.readouterr().err
    assert "calibrating" in shown and "2/2" in shown, shown
    calibrate(model, converted, X[:24])
    assert capsys.readouterr().err == ""


def test_too_few_images_for_a_solve_are_refused_with_the_count_needed():
    """The classifier reads 16 features (and an intercept) per image: 16 images cannot
    determine it. Refused before anything is fitted."""
    model = randomize_norms(seeded(TinyResNet))
    converted = cspify.convert(model, X[:2])
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    with pytest.raises(ConfigError, match="needs at least 17 images and got 16"):
        calibrate(model, converted, X[:16])
    assert all(torch.equal(v, before[k]) for k, v in converted.state_dict().items())


def test_modes_momenta_and_the_original_are_left_alone():
    model = randomize_norms(seeded(TinyResNet))
    original = copy.deepcopy(model.state_dict())
    converted = cspify.convert(model, X[:2])
    converted.train()
    norms = [m for m in converted.modules() if isinstance(m, nn.BatchNorm2d)]
    norms[0].momentum = 0.3
    calibrate(model, converted, X)
    assert all(m.training for m in converted.modules())
    assert norms[0].momentum == 0.3 and all(m.momentum == 0.1 for m in norms[1:])
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert not model.training or model.training == seeded(TinyResNet).training


def test_train_mode_computes_what_eval_mode_does():
    """Norm statistics describe the calibrated model's own activations (weights rescaled so
    eval mode is unchanged): fine-tuning starts from the calibrated model, not a worse one."""
    model = randomize_norms(seeded(TinyResNet))
    converted = cspify.convert(model, X[:2])
    calibrate(model, converted, X)
    with torch.no_grad():
        converted.eval()
        evaluated = converted(X)
        converted.train()
        trained = copy.deepcopy(converted)(X)  # a copy: train mode moves the running statistics
    assert float((trained - evaluated).square().mean() / evaluated.var()) < 0.05


def test_steps_can_be_switched_off():
    model = randomize_norms(seeded(TinyResNet))
    converted = cspify.convert(model, X[:2])
    untouched = copy.deepcopy(converted.state_dict())
    calibrate(model, converted, X, norms=False, inner=False, transitions=False, readers=False, stable=False)
    assert all(torch.equal(v, untouched[k]) for k, v in converted.state_dict().items())
    calibrate(model, converted, X, inner=False, readers=False)
    roles = {fit.role for fit in converted.meta["cspify.calibrate"].fits}
    assert roles == {"partial transition"}


class Wrapped(nn.Module):
    """A model whose backbone is converted with scope= (the head stays outside)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(cbr(3, 8, 3), *[Bottleneck(8, 8, 8) for _ in range(3)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x):
        return self.head(self.backbone(x))


def test_scope_conversion():
    model = randomize_norms(seeded(Wrapped))
    converted = cspify.convert(model, X[:2], scope="backbone")
    before = distance(model, converted)
    calibrate(model, converted, X)
    assert distance(model, converted) < 0.5 * before
    assert "cspify.calibrate" in converted.backbone.meta


def test_a_model_cspify_did_not_make_is_refused():
    model = seeded(TinyResNet)
    with pytest.raises(ConfigError, match="not made by cspify.convert"):
        calibrate(model, copy.deepcopy(model), X)
    with pytest.raises(ConfigError, match="no images"):
        calibrate(model, cspify.convert(model, X[:2]), [])


def test_taps_record_values_as_computed():
    model = seeded(TinyResNet)
    converted = cspify.convert(model, X[:2])
    names = [node.name for node in converted.graph.nodes if node.op == "call_module"]
    expand = next(n for n in names if "expand_1" in n)  # a norm output the residual add then writes into
    with torch.no_grad():
        plain = converted(X[:4])
        with tapping(converted, [expand, "layer1_fuse"]) as values:
            tapped = converted(X[:4])
        assert torch.equal(plain, tapped) and set(values) == {expand, "layer1_fuse"}
        norm = converted.get_submodule(next(n.target for n in converted.graph.nodes if n.name == expand))
        seen = []
        handle = norm.register_forward_hook(lambda m, args, out: seen.append(out.clone()) and None)
        converted(X[:4])
        handle.remove()
        assert torch.equal(values[expand], seen[0])  # before the in-place add wrote into it, not after
        with tapping(converted, ["layer1_fuse", expand], stop=True) as values:
            run_until_tapped(converted, X[:4])
            assert values["layer1_fuse"].shape == (4, 8, 16, 16)
            run_until_tapped(converted, X[4:6])  # a second pass waits for its own values
            assert values["layer1_fuse"].shape[0] == values[expand].shape[0] == 2
    assert "forward" not in vars(converted)  # the model's own forward is back


def test_a_grouped_conv_is_one_least_squares_per_group():
    """A depthwise conv's weights come back exactly from its own inputs and outputs, and a
    grouped solve equals the groups' separate solves."""
    from cspify.lstsq import LeastSquares, features_of, groups_of, rows_of, targets_of

    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=True)
    x = torch.randn(8, 6, 10, 10)
    with torch.no_grad():
        y = conv(x)
    solver = LeastSquares(features_of(conv), 6, intercept=True, device="cpu", groups=groups_of(conv))
    solver.add(rows_of(conv, x), targets_of(conv, y))
    weight, bias = solver.solve(ridge=0.0)
    assert torch.allclose(weight.float(), conv.weight.reshape(6, -1), atol=1e-4)
    assert torch.allclose(bias.float(), conv.bias, atol=1e-4) and solver.error(weight, bias) < 1e-8

    grouped = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    target = torch.randn(8, 6, 10, 10)
    together = LeastSquares(features_of(grouped), 6, intercept=True, device="cpu", groups=2)
    together.add(rows_of(grouped, x[:, :4]), targets_of(grouped, target))
    w, b = together.solve(ridge=1e-3)
    for g in range(2):
        alone = nn.Conv2d(2, 3, 3, padding=1)
        one = LeastSquares(features_of(alone), 3, intercept=True, device="cpu")
        one.add(rows_of(alone, x[:, 2 * g : 2 * g + 2]), targets_of(alone, target[:, 3 * g : 3 * g + 3]))
        w1, b1 = one.solve(ridge=1e-3)
        assert torch.allclose(w[3 * g : 3 * g + 3], w1) and torch.allclose(b[3 * g : 3 * g + 3], b1)


def test_depthwise_layers_inside_a_stage_are_refitted():
    model = randomize_norms(seeded(TinyResNet, groups=8))
    converted = cspify.convert(model, X[:2], hidden="scale")
    before = distance(model, converted)
    calibrate(model, converted, X)
    fitted = {f.layer for f in converted.meta["cspify.calibrate"].fits}
    grouped = {name for name, m in converted.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    assert fitted & grouped, (fitted, grouped)
    assert distance(model, converted) < 0.5 * before


@pytest.mark.parametrize("family", [TinyResNet, TinyDenseNet, ChannelsLastNet])
def test_passes_resumed_from_the_stage_fit_what_whole_passes_fit(family, monkeypatch):
    """Calibration resumes each pass from the values cached before the stage (cspify.replay);
    with no room for that cache every pass runs the whole model: the same fits either way."""
    import cspify.replay

    model = randomize_norms(seeded(family))
    resumed, whole = cspify.convert(model, X[:2]), cspify.convert(model, X[:2])
    calibrate(model, resumed, X)
    monkeypatch.setattr(cspify.replay, "CACHE_BYTES", 0)
    calibrate(model, whole, X)
    a, b = resumed.state_dict(), whole.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5), key
