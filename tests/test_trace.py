"""cspify.trace: models as they come. Example inputs bind to the forward's positional
parameters (a ``*args, **kwargs`` beside them is traced empty), submodules torch.fx cannot
trace are kept whole with a note, splits whose part count is fixed can be iterated, and an
error in the model's own forward names its cause."""

import pytest
import torch
import torch.nn as nn
from tiny_models import Bottleneck, cbr, seeded

import cspify
from cspify.errors import TraceError
from cspify.trace import Tracer, kept_whole, symbolic_trace, trace
from cspify.verify import drop_in_problems

X = torch.randn(1, 3, 16, 16)


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8, 3)
        self.blocks = nn.Sequential(*[Bottleneck(8, 8, 8) for _ in range(3)])

    def forward(self, x):
        return self.blocks(self.stem(x))


class VarArgs(Body):
    """A framework's signature: forward(self, x, *args, **kwargs), the rest passed on."""

    def forward(self, x, *args, **kwargs):
        return self.run(x, *args, **kwargs)

    def run(self, x, profile=False):
        return super().forward(x)


class DynamicHead(nn.Module):
    """A detection head's habit: a cache checked against the input's shape, in eval only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 1)
        self.shape = None

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            return y
        if self.shape != x.shape:  # a traced value in control flow: torch.fx stops here
            self.shape = x.shape
        return y.flatten(2).softmax(-1)


class WithHead(Body):
    def __init__(self):
        super().__init__()
        self.head = DynamicHead()

    def forward(self, x, *args, **kwargs):
        return self.head(super().forward(x))


@pytest.mark.parametrize("cls", [VarArgs, WithHead])
def test_a_model_as_it_comes_converts(cls):
    model = seeded(cls).eval()
    csp = cspify.convert(model, X)
    assert [s.name for s in cspify.record.conversion_of(csp).converted] == ["blocks"]
    with torch.no_grad():
        assert torch.equal(cspify.convert(model, X)(X), csp(X))  # deterministic, callable with x alone
    assert drop_in_problems(model, csp, X) == []


def test_var_args_are_traced_empty_and_the_graph_takes_the_inputs_alone():
    gm = symbolic_trace(seeded(VarArgs).eval())
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert kept_whole(gm) == {}


def test_a_head_that_cannot_be_traced_is_kept_whole_in_both_modes_with_its_cause():
    for training in (False, True):  # the head traces in training mode, not in eval: kept whole in both
        traced = trace(seeded(WithHead).train(training), X)
        assert list(traced.kept_whole) == ["head"]
        assert "control flow" in traced.kept_whole["head"]
        assert [n.target for n in traced.gm.graph.nodes if n.op == "call_module"][-1] == "head"
    csp = cspify.convert(seeded(WithHead).train(), X)
    assert csp.training and csp(X).shape == (1, 4, 16, 16)  # the head's own training path, at run time
    csp.eval()
    assert csp(X).shape == (1, 4, 256)


def test_a_kept_whole_module_stays_a_leaf_when_the_graph_is_traced_again():
    gm = symbolic_trace(seeded(WithHead).eval())
    again = Tracer().trace(gm)
    assert [n.target for n in again.nodes if n.op == "call_module"] == [
        n.target for n in gm.graph.nodes if n.op == "call_module"
    ]


class SplitBlock(nn.Module):
    """C2f's habit: list(t.chunk(2, 1)), then residual blocks on the last part, all concatenated."""

    def __init__(self, c=16, n=3):
        super().__init__()
        self.cv1 = cbr(c, c)
        self.m = nn.ModuleList(Bottleneck(c // 2, c // 2, c // 2) for _ in range(n))
        self.cv2 = cbr(c // 2 * (2 + n), c)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        out = self.cv2(torch.cat(y, 1))
        return torch.cat(list(torch.split(out, [4, 12], 1))[::-1], 1)  # split with sizes, iterated


class SplitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16, 3)
        self.block = SplitBlock()

    def forward(self, x):
        return self.block(self.stem(x))


def test_the_parts_of_a_fixed_split_can_be_iterated():
    traced = trace(seeded(SplitNet).eval(), X)
    assert traced.kept_whole == {}
    assert any(n.op == "call_module" and n.target.startswith("block.m.2") for n in traced.gm.graph.nodes)
    assert [s.name for s in cspify.find_stages(seeded(SplitNet).eval(), X)]


class ChunkFour(nn.Module):
    def forward(self, x):
        return torch.cat(list(x.chunk(4, 1))[::-1], 1)  # 6 channels give 3 chunks: not counted


def test_a_split_whose_count_its_arguments_do_not_fix_keeps_its_module_whole():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), ChunkFour())
    traced = trace(model, X)
    assert list(traced.kept_whole) == ["1"] and "iterates over or unpacks" in traced.kept_whole["1"]


class IteratesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = Body()

    def forward(self, x):
        return torch.stack([self.body(image[None])[0] for image in x])  # a loop over a tensor


def test_an_error_in_the_models_own_forward_names_its_cause():
    with pytest.raises(TraceError) as error:
        cspify.convert(IteratesItsInput().eval(), X)
    assert error.value.message == "torch.fx cannot trace the model (IteratesItsInput): Proxy object cannot be iterated."
    assert error.value.hint.startswith("its forward iterates over or unpacks a traced value")
    assert "--scope NAME" in error.value.hint and "body (Body)" in error.value.hint


class Pyramid(nn.Module):
    """A head that takes its feature maps as a list, as torchvision's detection heads do."""

    def __init__(self):
        super().__init__()
        self.fine = nn.Sequential(*[Bottleneck(8, 8, 8) for _ in range(3)])
        self.coarse = cbr(8, 4, 1)

    def forward(self, features: list[torch.Tensor]):
        return [self.fine(features[0]), self.coarse(features[1])]


def test_a_list_input_is_traced_as_one_placeholder_per_tensor_and_taken_as_it_comes():
    model, features = seeded(Pyramid).eval(), [torch.randn(1, 8, 16, 16), torch.randn(1, 8, 8, 8)]
    traced = trace(model, (features,))
    assert [n.op for n in traced.gm.graph.nodes].count("placeholder") == 2
    csp = cspify.convert(model, (features,))
    assert cspify.record.conversion_of(csp).converted
    assert drop_in_problems(model, csp, (features,)) == []
    assert [t.shape for t in csp(features)] == [t.shape for t in model(features)]
