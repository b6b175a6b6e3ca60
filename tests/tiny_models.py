"""Tiny hand-written models the unit tests import (widths of 8-16 channels, 16x16 inputs)."""

import copy
import torch
import torch.fx as fx
import torch.nn as nn


def cbr(cin, cout, k=1, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """Post-activation residual block: relu(x + f(x)); a projection shortcut when shapes change."""

    def __init__(self, cin, width, cout, stride=1, groups=1, names=("reduce", "spatial", "expand", "proj")):
        super().__init__()
        self.names = names
        setattr(self, names[0], cbr(cin, width, 1))
        setattr(self, names[1], cbr(width, width, 3, stride, groups=groups))
        setattr(self, names[2], cbr(width, cout, 1, act=False))
        self.has_proj = stride != 1 or cin != cout
        if self.has_proj:
            setattr(self, names[3], cbr(cin, cout, 1, stride, act=False))

    def forward(self, x):
        a, b, c, p = (getattr(self, n, None) for n in self.names)
        shortcut = p(x) if self.has_proj else x
        return torch.relu(c(b(a(x))) + shortcut)


class PreActBlock(nn.Module):
    """Pre-activation residual block: x + f(x) with the add as the last op."""

    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1, bias=False),
                               nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1, bias=False))

    def forward(self, x):
        return x + self.f(x)


class TinyResNet(nn.Module):
    """stem (C) -> layer1: n identity blocks on C -> layer2: projection block to 2C + n-1 blocks -> head.

    ``stem``/``layer1``/``layer2`` can be renamed with ``names`` (same network, other attribute names).
    """

    def __init__(self, c=8, depth=3, groups=1, names=("stem", "layer1", "layer2", "head"), block_names=None):
        super().__init__()
        bn = block_names or ("reduce", "spatial", "expand", "proj")
        self.names = names
        setattr(self, names[0], cbr(3, c, 3))
        setattr(self, names[1], nn.Sequential(*[Bottleneck(c, c, c, groups=groups, names=bn) for _ in range(depth)]))
        setattr(self, names[2], nn.Sequential(
            Bottleneck(c, c, 2 * c, stride=2, groups=groups, names=bn),
            *[Bottleneck(2 * c, c, 2 * c, groups=groups, names=bn) for _ in range(depth - 1)],
        ))
        setattr(self, names[3], nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 5)))

    def forward(self, x):
        for name in self.names:
            x = getattr(self, name)(x)
        return x


class PreActNet(nn.Module):
    def __init__(self, c=8, depth=3):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 1, 1)
        self.layer1 = nn.Sequential(*[PreActBlock(c) for _ in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.layer1(self.stem(x)))


class DenseLayer(nn.Module):
    """torchvision's _DenseLayer: reads torch.cat of every earlier feature map."""

    def __init__(self, cin, growth):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    """torchvision's _DenseBlock: one growing torch.cat per layer."""

    def __init__(self, n, cin, growth):
        super().__init__()
        for i in range(n):
            self[f"denselayer{i + 1}"] = DenseLayer(cin + i * growth, growth)

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm, self.relu = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class TinyDenseNet(nn.Module):
    """stem (C) -> dense block (n layers) -> transition -> dense block -> norm -> pool -> linear."""

    def __init__(self, c=8, growth=4, n=3):
        super().__init__()
        self.stem = cbr(3, c, 3)
        self.block1 = DenseBlock(n, c, growth)
        c1 = c + n * growth
        self.trans1 = Transition(c1, c1 // 2)
        self.block2 = DenseBlock(n, c1 // 2, growth)
        c2 = c1 // 2 + n * growth
        self.norm = nn.BatchNorm2d(c2)
        self.head = nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, 5))

    def forward(self, x):
        return self.head(self.norm(self.block2(self.trans1(self.block1(self.stem(x))))))


class IncrementalDense(nn.Module):
    """The incremental dense form: x = cat([x, f(x)]) per layer."""

    def __init__(self, c=8, growth=4, n=3):
        super().__init__()
        self.stem = cbr(3, c, 3)
        self.layers = nn.ModuleList(cbr(c + i * growth, growth, 3) for i in range(n))
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.stem(x)
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return self.pool(x)


def seeded(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs).eval()


def randomize_norms(model, seed=2):
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def flat_renamed(model):
    """The same network with every module under a meaningless flat name (m0, m1, ...)."""
    gm = fx.symbolic_trace(model)
    root = nn.Module()
    for i, n in enumerate(n for n in gm.graph.nodes if n.op == "call_module"):
        root.add_module(f"m{i}", copy.deepcopy(gm.get_submodule(n.target)))
        n.target = f"m{i}"
    return fx.GraphModule(root, gm.graph)


class Shift(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, 2)


class RollBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.shift = Shift()
        self.f = nn.Sequential(cbr(c, c, 3), cbr(c, c, 3, act=False))

    def forward(self, x):
        return torch.relu(x + self.f(self.shift(x)))


class LastBlock(nn.Module):
    """A residual block on a channels-last (N,H,W,C) stream: it permutes to N,C,H,W around
    its convs (and its norm, unless ``norm=False``, and activation, ``act``: a module class)."""

    def __init__(self, c, act=nn.ReLU, norm=True):
        super().__init__()
        self.a, self.act = nn.Conv2d(c, c, 3, 1, 1, bias=False), act()
        self.norm = nn.BatchNorm2d(c) if norm else nn.Identity()
        self.b = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.b(self.act(self.norm(self.a(x.permute(0, 3, 1, 2)))))
        return x + y.permute(0, 2, 3, 1)


class MlpBlock(nn.Module):
    """A block written channels-last with no permute: LayerNorm and linear layers over C."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.fc1, self.act, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ChannelsLastNet(nn.Module):
    """A stem, then a channels-last stream of C = 8 channels on 16x16 inputs (its height,
    16, is not its width), blocks of ``block`` (LastBlock or MlpBlock), a linear head."""

    def __init__(self, c=8, depth=3, block=LastBlock):
        super().__init__()
        self.stem = cbr(3, c, 3)
        self.layer1 = nn.Sequential(*[block(c) for _ in range(depth)])
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.layer1(self.stem(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


class LastDense(nn.Module):
    """A dense block on a channels-last stream: x = cat([x, f(x)], -1), f permuting around a
    conv; for ``along="height"``, a block that grows its height instead: x = cat([x, f(x)], 2),
    f a conv that halves it (a concat along an axis that is not the channels')."""

    def __init__(self, along="channels"):
        super().__init__()
        self.along = along
        self.stem = cbr(3, 8, 3)
        if along == "height":
            self.fs = nn.ModuleList(nn.Conv2d(8, 8, 3, (2, 1), 1) for _ in range(3))
        else:
            self.fs = nn.ModuleList(cbr(8 + 4 * i, 4, 3) for i in range(3))

    def forward(self, x):
        x = self.stem(x)
        if self.along == "height":
            for f in self.fs:
                x = torch.cat([x, f(x)], 2)
            return x
        x = x.permute(0, 2, 3, 1)
        for f in self.fs:
            x = torch.cat([x, f(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)], -1)
        return x


class ConvAndLinear(nn.Module):
    """A block whose conv reads axis 1 as channels and whose linear reads the last axis:
    the stream's channel axis is not clear."""

    def __init__(self):
        super().__init__()
        self.conv, self.mix = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(16, 16)

    def forward(self, x):
        return x + self.conv(x) * self.mix(x)


# Channel slices, chunks and splits; partial and multi-branch residuals (issue 12, items 3 and 4)


class GhostModule(nn.Module):
    """GhostNet's module: a primary 1x1 conv, a cheap depthwise conv on its output, both
    concatenated and sliced to ``cout`` channels: the full range where ``cout`` is even
    (``out[:, :cout]`` with the concat ``cout`` wide), a strict slice where it is odd."""

    def __init__(self, cin, cout, act=True):
        super().__init__()
        self.cout, init = cout, (cout + 1) // 2
        self.primary = cbr(cin, init, 1, act=act)
        self.cheap = cbr(init, init, 3, groups=init, act=act)

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, : self.cout]


class GhostBlock(nn.Module):
    """GhostNet's bottleneck at stride 1: x + ghost2(ghost1(x)), then a spatial crop and pad
    (``[:, :, 1:-1, 1:-1]``, not a channel slice) when ``crop``."""

    def __init__(self, c, hidden, crop=False):
        super().__init__()
        self.crop = crop
        self.ghost1, self.ghost2 = GhostModule(c, hidden), GhostModule(hidden, c, act=False)

    def forward(self, x):
        y = self.ghost1(x)
        if self.crop:
            y = nn.functional.pad(y[:, :, 1:-1, 1:-1], (1, 1, 1, 1))
        return x + self.ghost2(y)


class GhostNetLike(nn.Module):
    """stem (C) -> ``depth`` ghost blocks on C -> head. C = 8: full-range slices; C = 7: the
    stream's ghost modules slice their 8-channel concat strictly to 7."""

    def __init__(self, c=8, hidden=16, depth=3, crop=False):
        super().__init__()
        self.stem = cbr(3, c, 3)
        self.blocks = nn.Sequential(*[GhostBlock(c, hidden, crop) for _ in range(depth)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class C2fBottleneck(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = cbr(c, c, 3), cbr(c, c, 3)

    def forward(self, x):
        return x + self.cv2(self.cv1(x))


class C2f(nn.Module):
    """YOLOv8's C2f: cv1's output chunked in two, bottlenecks on the second half, every
    piece concatenated and fused by cv2."""

    def __init__(self, cin, cout, n=2):
        super().__init__()
        c = cout // 2
        self.cv1 = cbr(cin, 2 * c, 1)
        self.m = nn.ModuleList(C2fBottleneck(c) for _ in range(n))
        self.cv2 = cbr((2 + n) * c, cout, 1)

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C2fNet(nn.Module):
    def __init__(self, c=16, n=2):
        super().__init__()
        self.stem = cbr(3, c, 3)
        self.c2f = C2f(c, c, n)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))

    def forward(self, x):
        return self.head(self.c2f(self.stem(x)))


class ShuffleBlock(nn.Module):
    """A residual block that splits its stream by literal sizes and works on each part:
    x + cat(f(a), g(b)) with a, b = x.split(sizes, 1) (``chunk=True``: x.chunk(2, 1))."""

    def __init__(self, sizes=(12, 4), chunk=False):
        super().__init__()
        self.sizes, self.chunk = list(sizes), chunk
        self.f, self.g = cbr(sizes[0], sizes[0], 3), cbr(sizes[1], sizes[1], 3)

    def forward(self, x):
        a, b = x.chunk(2, 1) if self.chunk else x.split(self.sizes, 1)
        return x + torch.cat([self.f(a), self.g(b)], 1)


class ShuffleNetLike(nn.Module):
    def __init__(self, sizes=(12, 4), chunk=False, depth=2):
        super().__init__()
        c = sum(sizes)
        self.stem = cbr(3, c, 3)
        self.blocks = nn.Sequential(*[ShuffleBlock(sizes, chunk) for _ in range(depth)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class PartialResidual(nn.Module):
    """ReXNet's block: the input added to the first ``cin`` channels of a wider output,
    cat([y[:, 0:cin] + x, y[:, cin:]]) with y = f(x)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.cin = cin
        self.f = nn.Sequential(cbr(cin, 2 * cin, 1), cbr(2 * cin, 2 * cin, 3, groups=2 * cin), cbr(2 * cin, cout, 1, act=False))

    def forward(self, x):
        y = self.f(x)
        return torch.cat([y[:, 0 : self.cin] + x, y[:, self.cin :]], dim=1)


class RexNetLike(nn.Module):
    """stem (8) -> partial residual blocks 8 -> 10 -> 12 -> 14 -> head."""

    def __init__(self, widths=(8, 10, 12, 14)):
        super().__init__()
        self.stem = cbr(3, widths[0], 3)
        self.blocks = nn.Sequential(*[PartialResidual(a, b) for a, b in zip(widths, widths[1:])])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 5))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class ThreeBranch(nn.Module):
    """relu(x + f(x) + g(x)): a residual block with two branches."""

    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(cbr(c, c, 3), cbr(c, c, 3, act=False))
        self.g = cbr(c, c, 1, act=False)

    def forward(self, x):
        return torch.relu(x + self.f(x) + self.g(x))


class RepVggBlock(nn.Module):
    """RepVGG's training-time block: act(conv_1x1(x) + conv_kxk(x) + bn(x)), the identity
    branch a BatchNorm when the block keeps its width, none where it downsamples."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.conv_kxk, self.conv_1x1 = cbr(cin, cout, 3, stride, act=False), cbr(cin, cout, 1, stride, act=False)
        self.attn, self.act = nn.Identity(), nn.ReLU()

    def forward(self, x):
        y = self.conv_1x1(x) + self.conv_kxk(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return self.act(self.attn(y))


class MultiBranchNet(nn.Module):
    """stem -> ``depth`` blocks of ``block`` (ThreeBranch or RepVggBlock) on C -> head; a
    RepVGG net downsamples with a block that has no identity branch first."""

    def __init__(self, block=ThreeBranch, c=8, depth=3):
        super().__init__()
        self.stem = cbr(3, c, 3)
        first = [RepVggBlock(c, c, 2)] if block is RepVggBlock else []
        self.blocks = nn.Sequential(*first, *[block(c, c) if block is RepVggBlock else block(c) for _ in range(depth)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class ViewBlock(nn.Module):
    """A residual block that reshapes with sizes read from its input's shape:
    ``"own"``: an SE-like gate on x itself, x.view(B, C, H * W) (fine after narrowing);
    ``"other"``: C2PSA's attention, a 2C-channel tensor viewed into 2 heads and one head
    viewed back to (B, C, H, W) with C read from x (C no longer matches once x narrows);
    ``"literal"``: the SE-like gate with the literal channel count ``c``."""

    def __init__(self, c, kind):
        super().__init__()
        self.c, self.kind = c, kind
        self.qkv, self.proj = nn.Conv2d(c, 2 * c, 1), cbr(c, c, 1, act=False)

    def forward(self, x):
        B, C, H, W = x.shape
        if self.kind in ("own", "literal"):
            c = C if self.kind == "own" else self.c
            gate = torch.sigmoid(x.view(B, c, H * W).mean(-1)).view(B, c, 1, 1)
            return x + self.proj(x * gate)
        t = self.qkv(x)
        heads = t.view(B, 2, 2 * self.c // 2, H * W).softmax(-1)
        return x + self.proj(heads[:, 0].view(B, C, H, W))


class ScaleViewBlock(nn.Module):
    """A residual block with a layer scale viewed to (C, 1, 1) by its literal width."""

    def __init__(self, c):
        super().__init__()
        self.f = nn.Sequential(cbr(c, c, 3), cbr(c, c, 3, act=False))
        self.scale, self.c = nn.Parameter(torch.linspace(0.5, 1.5, c)), c

    def forward(self, x):
        return x + self.f(x) * self.scale.view(self.c, 1, 1)


class ScaleViewNet(nn.Module):
    def __init__(self, c=8, depth=2):
        super().__init__()
        self.stem = cbr(3, c, 3)
        self.blocks = nn.Sequential(*[ScaleViewBlock(c) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.stem(x))


class ViewNet(nn.Module):
    def __init__(self, kind, c=8, depth=2):
        super().__init__()
        self.stem = cbr(3, c, 3)
        self.blocks = nn.Sequential(*[ViewBlock(c, kind) for _ in range(depth)])
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))
