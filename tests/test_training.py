"""The converted model trains like any other: SGD lowers its loss, its state dict round-trips,
train()/eval() act as in the original, a warm start beats a fresh start; and conversion is
deterministic (same inputs, same model; another seed changes only the new layers)."""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import cspify
from cspify.cli import main
from cspify.record import conversion_of
from tiny_models import Bottleneck, TinyDenseNet, TinyResNet, cbr, randomize_norms, seeded

X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class DropNet(nn.Module):
    """A residual stage, then dropout in the head: both train-mode behaviours at once."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = cbr(3, c, 3)
        self.layer = nn.Sequential(*[Bottleneck(c, c, c) for _ in range(3)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(c, 4))

    def forward(self, x):
        return self.head(self.layer(self.stem(x)))


def sgd_losses(model: nn.Module, x, target, steps: int, lr=0.05) -> list[float]:
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", [TinyResNet, TinyDenseNet], ids=["residual", "dense"])
def test_sgd_lowers_the_loss(family):
    model = seeded(family)
    gm = cspify.convert(model, X)
    target = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))
    losses = sgd_losses(gm, X, target, steps=15)
    assert losses[-1] < 0.8 * losses[0] and min(losses) == losses[-1], losses


def test_state_dict_round_trips_into_a_fresh_conversion():
    model = randomize_norms(seeded(TinyResNet))
    trained = cspify.convert(model, X)
    sgd_losses(trained, X, torch.randn(8, 5), steps=3)  # weights and BN statistics move
    fresh = cspify.convert(model, X, seed=7)  # same architecture, other new-layer weights
    assert fresh.state_dict().keys() == trained.state_dict().keys()
    fresh.load_state_dict(trained.state_dict())
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(X), trained(X))


def test_train_and_eval_act_as_in_the_original():
    model = seeded(DropNet)
    gm = cspify.convert(model, X)
    norms = [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]
    added = [n for n, m in gm.named_modules() if "csp" in n and isinstance(m, nn.BatchNorm2d)]
    assert added, "the partial transition has a BatchNorm of its own"
    for net in (model, gm):
        net.train()
        assert all(m.training for m in net.modules())
        stats = [m.running_mean.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        a, b = net(X), net(X)
        assert not torch.equal(a, b), "dropout is active in train mode"
        moved = [not torch.equal(s, m.running_mean) for s, m in zip(stats, [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)])]
        assert all(moved), "every BatchNorm updates its running statistics in train mode"
        net.eval()
        assert not any(m.training for m in net.modules())
        stats = [m.running_mean.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
        with torch.no_grad():
            assert torch.equal(net(X), net(X)), "no dropout in eval mode"
        assert all(torch.equal(s, m.running_mean) for s, m in zip(stats, [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]))
    assert len(norms) > 0


def test_a_warm_start_beats_a_fresh_start():
    """Pretrain on a teacher's outputs, convert, fine-tune N steps; the same converted
    architecture re-initialised and trained N steps ends with a higher loss."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 3, 8, 8, generator=g)
    torch.manual_seed(4)
    teacher = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).eval()
    with torch.no_grad():
        target = teacher(x)
    model = seeded(TinyResNet, c=8, depth=2)
    sgd_losses(model, x, target, steps=60, lr=0.02)
    model.eval()
    warm = cspify.convert(model, x)
    cold = copy.deepcopy(warm)
    torch.manual_seed(5)
    for m in cold.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
    steps = 10
    warm_loss = sgd_losses(warm, x, target, steps, lr=0.02)[-1]
    cold_loss = sgd_losses(cold, x, target, steps, lr=0.02)[-1]
    assert warm_loss < cold_loss, (warm_loss, cold_loss)


# ---------------------------------------------------------------- determinism


def test_same_inputs_give_the_same_model():
    model = randomize_norms(seeded(TinyResNet))
    a, b = cspify.convert(model, X, 0.5), cspify.convert(model, X, 0.5)
    assert a.code == b.code
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def new_layer_modules(gm) -> set[str]:
    added = {n for stage in conversion_of(gm).stages for n in stage.added}
    return {node.target for node in gm.graph.nodes if node.name in added and node.op == "call_module"}


def test_another_seed_changes_only_the_new_layers():
    model = randomize_norms(seeded(TinyResNet))
    a, b = cspify.convert(model, X, seed=0), cspify.convert(model, X, seed=1)
    assert a.code == b.code
    sa, sb = a.state_dict(), b.state_dict()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    assert changed, "the seed reaches the new layers' initialisation"
    new = new_layer_modules(a)
    assert new and all(k.rpartition(".")[0] in new for k in changed), sorted(changed - {k for k in changed if k.rpartition(".")[0] in new})


SEEDED_FILE = """\
import torch
import torch.nn as nn
import sys
sys.path.insert(0, {tests!r})
from tiny_models import TinyResNet


def build() -> nn.Module:
    torch.manual_seed(0)
    return TinyResNet()


def example_inputs():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
"""


def test_cli_seed_option(tmp_path, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(tmp_path)
    model_file = tmp_path / "seeded.py"
    model_file.write_text(textwrap.dedent(SEEDED_FILE.format(tests=str(Path(__file__).parent))))
    states = {}
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        result = CliRunner().invoke(main, ["convert", f"{model_file}:build", "--seed", seed, "-o", f"{name}.pt", "-q"])
        assert result.exit_code == 0, result.output
        states[name] = torch.load(f"{name}.pt", weights_only=False).state_dict()
    assert all(torch.equal(states["a"][k], states["b"][k]) for k in states["a"])
    assert any(not torch.equal(states["a"][k], states["c"][k]) for k in states["a"])
