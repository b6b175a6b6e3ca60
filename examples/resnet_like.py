"""A small hand-written ResNet: the kind of model.py a user brings to cspify.

    cspify convert examples/resnet_like.py
"""

import torch
import torch.nn as nn


class Bottleneck(nn.Module):
    """x + f(x) with a 1x1 -> 3x3 -> 1x1 branch; a projection where the shape changes."""

    def __init__(self, channels_in: int, width: int, channels_out: int, stride: int = 1):
        super().__init__()
        self.branch = nn.Sequential(
            nn.Conv2d(channels_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, channels_out, 1, bias=False), nn.BatchNorm2d(channels_out),
        )
        self.project = None
        if stride != 1 or channels_in != channels_out:
            self.project = nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)
            )

    def forward(self, x):
        shortcut = x if self.project is None else self.project(x)
        return torch.relu(self.branch(x) + shortcut)


class ResNetLike(nn.Module):
    def __init__(self, widths=(64, 128, 256), depth: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        stages, channels = [], 32
        for i, width in enumerate(widths):
            blocks = [Bottleneck(channels, width // 4, width, stride=1 if i == 0 else 2)]
            blocks += [Bottleneck(width, width // 4, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x):
        return self.head(self.stages(self.stem(x)))


def example_inputs():
    return torch.randn(2, 3, 64, 64)
