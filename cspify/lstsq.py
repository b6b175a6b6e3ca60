"""Least squares for a conv or linear layer: rows of its input, the normal equations
accumulated over batches, a ridge solve toward the current weights, and setting the layer.

    solver = LeastSquares(features, outputs, intercept=True, device=x.device)
    for x, y in batches:                        # the layer's input, the output to match
        solver.add(rows_of(layer, x), targets_of(layer, y))
    weight, bias = solver.solve(ridge=1e-3, prior=current)
    set_layer(layer, weight, bias)

Convs read their input through ``F.unfold`` (im2col), 1x1 convs as strided channels-last
rows; a grouped conv is one problem per group, solved together.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["CONVS", "LeastSquares", "fits", "features_of", "groups_of", "outputs_of", "rows_of", "sample_rows", "set_layer",
           "targets_of"]

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LeastSquares:
    """Normal equations of ``y = W x (+ b)``, accumulated over batches of rows.

    With ``groups`` G (a grouped conv), the rows' features and the outputs are G consecutive
    blocks and block g of the outputs reads block g of the features alone: G independent
    problems of ``features`` features each, solved together (a depthwise conv is G of them
    with one channel's k x k taps each)."""

    def __init__(self, features: int, outputs: int, intercept: bool, device, groups: int = 1) -> None:
        width = features + int(intercept)
        self.features, self.intercept, self.groups = features, intercept, groups
        self.xx = torch.zeros(groups, width, width, dtype=torch.float64, device=device)
        self.xy = torch.zeros(groups, width, outputs // groups, dtype=torch.float64, device=device)
        self.y_sum = torch.zeros(groups, outputs // groups, dtype=torch.float64, device=device)
        self.yy = torch.zeros(groups, outputs // groups, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        g = self.groups
        x = x.float().reshape(len(x), g, -1).transpose(0, 1)  # groups, rows, features
        y = y.float().reshape(len(y), g, -1).transpose(0, 1)
        if self.intercept:
            x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], 2)
        self.xx += (x.transpose(1, 2) @ x).double()
        self.xy += (x.transpose(1, 2) @ y).double()
        self.y_sum += y.double().sum(1)
        self.yy += y.double().square().sum(1)
        self.rows += x.shape[1]

    def solve(self, ridge: float, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weights (outputs x features) and intercept (or None) minimising the squared error
        plus ``ridge`` (relative to the mean squared feature) times the squared distance to
        ``prior`` (outputs x features; zero when None); the intercept is not penalised."""
        d, g = self.features, self.groups
        penalty = ridge * self.xx.diagonal(dim1=1, dim2=2)[:, :d].mean(1).clamp_min(1e-12)[:, None]
        a, b = self.xx.clone(), self.xy.clone()
        a.diagonal(dim1=1, dim2=2)[:, :d] += penalty
        if prior is not None:
            b[:, :d] += penalty[:, :, None] * prior.double().reshape(g, -1, d).transpose(1, 2)
        try:
            solution = torch.linalg.solve(a, b)
        except RuntimeError:  # singular (a constant input column, say): the least-norm solution
            solution = torch.linalg.lstsq(a.cpu(), b.cpu(), driver="gelsd").solution.to(a.device)
        weight = solution[:, :d].transpose(1, 2).reshape(-1, d)
        bias = solution[:, d].reshape(-1) if self.intercept else None
        return weight, bias

    def error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """Squared error of ``W x + b`` over the targets' total variance, on the rows seen."""
        g, d = self.groups, self.features
        w = weight.double().reshape(g, -1, d).transpose(1, 2)  # groups, features, outputs
        if self.intercept:
            b = bias.double() if bias is not None else torch.zeros(g * w.shape[2], dtype=torch.float64, device=w.device)
            w = torch.cat([w, b.reshape(g, 1, -1)], 1)
        elif bias is not None:
            return float("nan")
        sse = self.yy.sum() - 2 * (w * self.xy).sum() + (w * (self.xx @ w)).sum()
        sst = self.yy.sum() - self.y_sum.square().sum() / max(self.rows, 1)
        return float((sse / sst.clamp_min(1e-12)).clamp_min(0))

    def input_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and uncentred second moment of the inputs (needs the intercept column; one group)."""
        d, n = self.features, max(self.rows, 1)
        return self.xx[0, d, :d] / n, self.xx[0, :d, :d] / n

    def without_intercept(self) -> LeastSquares:
        """The same normal equations with the intercept column dropped."""
        d = self.features
        plain = copy.copy(self)
        plain.intercept = False
        plain.xx, plain.xy = self.xx[:, :d, :d], self.xy[:, :d]
        return plain


def fits(module: nn.Module) -> bool:
    """Layers a least-squares fit can set: linear layers and zero-padded convs, grouped and
    depthwise ones too (any kernel in 2-d, 1x1 kernels in 1-d and 3-d)."""
    if isinstance(module, nn.Linear):
        return True
    if not isinstance(module, CONVS) or module.padding_mode != "zeros" \
            or isinstance(module.padding, str):
        return False
    return isinstance(module, nn.Conv2d) or all(k == 1 for k in module.kernel_size)


def features_of(module: nn.Module) -> int:
    """How many features a row of the layer's input has, per group of a grouped conv."""
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.in_channels // module.groups * math.prod(module.kernel_size)


def groups_of(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Linear) else module.groups


def outputs_of(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def rows_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of features, one row per output position."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if all(k == 1 for k in module.kernel_size) and all(p == 0 for p in _tuple(module.padding, x.ndim - 2)):
        index = tuple(slice(None, None, s) for s in _tuple(module.stride, x.ndim - 2))
        x = x[(slice(None), slice(None), *index)]
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def targets_of(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The layer's output as rows, one per output position."""
    return y.reshape(-1, y.shape[-1]) if isinstance(module, nn.Linear) else y.movedim(1, -1).reshape(-1, y.shape[1])


def sample_rows(rows: int, cap: int, generator: torch.Generator, device) -> torch.Tensor | None:
    """A random choice of ``cap`` of ``rows`` (None: take them all)."""
    if rows <= cap:
        return None
    return torch.randperm(rows, generator=generator)[:cap].to(device)


def set_layer(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give the layer the solved weights (outputs x features) and bias (None: zero)."""
    module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight.dtype))
    if module.bias is not None:
        module.bias.copy_(bias.to(module.bias.dtype) if bias is not None else torch.zeros_like(module.bias))


def _tuple(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
