"""The converted model on PyTorch's deployment paths: TorchScript, torch.compile, torch.export,
channels-last memory format, bf16 autocast on CPU.

One representative per family: a hand-written residual model, a hand-written dense model,
torchvision resnet18 at 64x64. ``torch.compile`` runs with the ``aot_eager`` backend in the
default suite (dynamo capture and AOT autograd, the parts a graph rewrite can break); the
inductor backend, which compiles C++ and takes close to a minute per model on 2 cores, is
marked ``slow`` (``python -m pytest -m slow tests/test_targets.py``).
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torchvision

import cspify
from cspify.record import conversion_of
from tiny_models import TinyDenseNet, TinyResNet, randomize_norms, seeded

FAMILIES = {
    "residual": (lambda: randomize_norms(seeded(TinyResNet)), (2, 3, 16, 16)),
    "dense": (lambda: randomize_norms(seeded(TinyDenseNet)), (2, 3, 16, 16)),
    "resnet18": (lambda: seeded(torchvision.models.resnet18), (1, 3, 64, 64)),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request):
    build, shape = FAMILIES[request.param]
    torch.manual_seed(1)
    x = torch.randn(*shape)
    model = build()
    gm = cspify.convert(model, x).eval()
    assert conversion_of(gm).converted
    with torch.no_grad():
        y = gm(x)
    return gm, x, y


def close(got, want, tol=1e-5):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got, want, atol=tol, rtol=tol), f"max abs difference {(got - want).abs().max()}"


def test_torchscript_trace(converted, tmp_path):
    gm, x, y = converted
    with torch.no_grad():
        scripted = torch.jit.trace(gm, (x,))
    scripted.save(str(tmp_path / "m.ts"))
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    with torch.no_grad():
        close(loaded(torch.clone(x)), y)


def test_torchscript_script(converted):
    """torch.jit.script of the GraphModule: fx generates scriptable code for these graphs."""
    gm, x, y = converted
    scripted = torch.jit.script(gm)
    with torch.no_grad():
        close(scripted(x), y)


def test_torch_compile_aot_eager(converted):
    gm, x, y = converted
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        close(compiled(x), y)


@pytest.mark.slow
def test_torch_compile_inductor():
    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("torch.compile's inductor backend needs a C++ compiler on CPU, and none is installed")
    x = torch.randn(2, 3, 16, 16)
    gm = cspify.convert(randomize_norms(seeded(TinyResNet)), x).eval()
    torch._dynamo.reset()
    compiled = torch.compile(gm)
    with torch.no_grad():
        close(compiled(x), gm(x), tol=1e-4)


def test_torch_export(converted):
    gm, x, y = converted
    program = torch.export.export(gm, (x,))
    with torch.no_grad():
        close(program.module()(x), y)


def test_channels_last(converted):
    gm, x, y = converted
    model = copy.deepcopy(gm).to(memory_format=torch.channels_last)
    with torch.no_grad():
        close(model(x.to(memory_format=torch.channels_last)), y, tol=1e-4)
    model.train()
    model(x.to(memory_format=torch.channels_last)).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bf16_autocast_on_cpu(converted):
    gm, x, y = converted
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = gm(x)
    assert got.dtype == torch.bfloat16 and got.shape == y.shape
    cosine = torch.nn.functional.cosine_similarity(got.float().flatten(), y.flatten(), dim=0)
    assert cosine > 0.99, f"bf16 output points elsewhere than fp32 (cosine {cosine:.4f})"
    model = copy.deepcopy(gm).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
