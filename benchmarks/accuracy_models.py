"""The three small models benchmarks/accuracy.py trains on Fashion-MNIST (1x28x28), each
with a width multiplier so that the same-flops narrow baseline is the same code.

    resnet     stride-2 stem + three stages of two basic blocks, widths 16/32/64 (14, 7, 4 px)
    densenet   stride-2 stem + three dense blocks of 3 layers (growth 8, bottleneck 32) with
               two transitions (DenseNet-BC style)
    mobilenet  stride-2 stem + MobileNetV2 inverted residual blocks (expansion 4, linear
               bottlenecks 16/24/40, ReLU6), a 1x1 conv to 256 before pooling

The stem is strided so that the three train on 2 CPU cores in minutes. ``width`` scales
every channel count (stem, stage widths, growth rate and bottleneck, expansion widths);
1.0 is the model cspify converts.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """y = relu(x + conv-bn-relu-conv-bn(x)), with a 1x1 projection where the shape changes."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.project = None
        if stride != 1 or channels_in != channels_out:
            self.project = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x):
        shortcut = x if self.project is None else self.project(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + shortcut)


class ResNet(nn.Module):
    def __init__(self, channels: int = 1, num_classes: int = 10, width: float = 1.0,
                 widths=(16, 32, 64), depth: int = 2):
        super().__init__()
        stem = scaled(widths[0], width)
        self.stem = nn.Sequential(nn.Conv2d(channels, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU())
        stages, current = [], stem
        for i, w in enumerate(widths):
            w = scaled(w, width)
            blocks = [BasicBlock(current, w, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(w, w) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            current = w
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(current, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


class DenseLayer(nn.Module):
    def __init__(self, channels_in: int, growth: int, bottleneck: int):
        super().__init__()
        self.f = nn.Sequential(
            nn.BatchNorm2d(channels_in), nn.ReLU(), nn.Conv2d(channels_in, bottleneck, 1, bias=False),
            nn.BatchNorm2d(bottleneck), nn.ReLU(), nn.Conv2d(bottleneck, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.f(x)], dim=1)


class DenseNet(nn.Module):
    def __init__(self, channels: int = 1, num_classes: int = 10, width: float = 1.0,
                 growth: int = 8, layers=(3, 3, 3)):
        super().__init__()
        current, bottleneck, growth = scaled(2 * growth, width), scaled(4 * growth, width), scaled(growth, width)
        body = [nn.Conv2d(channels, current, 3, 2, 1, bias=False)]
        for i, count in enumerate(layers):
            for _ in range(count):
                body.append(DenseLayer(current, growth, bottleneck))
                current += growth
            if i < len(layers) - 1:
                out = current // 2
                body.append(nn.Sequential(
                    nn.BatchNorm2d(current), nn.ReLU(), nn.Conv2d(current, out, 1, bias=False), nn.AvgPool2d(2)
                ))
                current = out
        body += [nn.BatchNorm2d(current), nn.ReLU()]
        self.features = nn.Sequential(*body)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(current, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand, 3x3 depthwise, 1x1 project (linear); x + f(x) when shapes match."""

    def __init__(self, channels_in: int, channels_out: int, stride: int, expand: int):
        super().__init__()
        hidden = channels_in * expand
        layers = []
        if expand != 1:
            layers += [nn.Conv2d(channels_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and channels_in == channels_out

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, blocks, stride) as in MobileNetV2's table, shrunk for 28x28
    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 40, 3, 2))

    def __init__(self, channels: int = 1, num_classes: int = 10, width: float = 1.0, last: int = 256):
        super().__init__()
        current = scaled(16, width)
        layers = [nn.Conv2d(channels, current, 3, 2, 1, bias=False), nn.BatchNorm2d(current), nn.ReLU6()]
        for expand, c, n, s in self.SETTINGS:
            c = scaled(c, width)
            for i in range(n):
                layers.append(InvertedResidual(current, c, s if i == 0 else 1, expand))
                current = c
        last = scaled(last, width)
        layers += [nn.Conv2d(current, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


MODELS = {"resnet": ResNet, "densenet": DenseNet, "mobilenet": MobileNetV2}


def build(kind: str, *, channels: int = 1, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    return MODELS[kind](channels=channels, num_classes=num_classes, width=width)
