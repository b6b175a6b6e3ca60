"""A small hand-written DenseNet in the incremental form x = cat([x, f(x)]).

    cspify convert examples/densenet_like.py --gamma 0.5
"""

import torch
import torch.nn as nn


class DenseLayer(nn.Module):
    def __init__(self, channels_in: int, growth: int):
        super().__init__()
        self.f = nn.Sequential(
            nn.BatchNorm2d(channels_in), nn.ReLU(), nn.Conv2d(channels_in, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([x, self.f(x)], dim=1)


def transition(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(channels_in), nn.ReLU(), nn.Conv2d(channels_in, channels_out, 1, bias=False), nn.AvgPool2d(2)
    )


class DenseNetLike(nn.Module):
    def __init__(self, growth: int = 12, layers=(4, 4, 4), num_classes: int = 10):
        super().__init__()
        channels = 2 * growth
        body = [nn.Conv2d(3, channels, 3, padding=1, bias=False)]
        for i, count in enumerate(layers):
            for _ in range(count):
                body.append(DenseLayer(channels, growth))
                channels += growth
            if i < len(layers) - 1:
                body.append(transition(channels, channels // 2))
                channels //= 2
        body += [nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*body)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def example_inputs():
    return torch.randn(2, 3, 32, 32)
