"""Layers for the rewrite: narrowed copies of existing layers, and fresh ones.

One narrow function per layer kind, kept apart from the graph logic that decides which
channels go (as Torch-Pruning keeps its pruning functions): each takes the layer and the
input and output channels it keeps (``None``: all) and returns a new layer, the old one
untouched. ``NARROWERS`` names them for the op table (``cspify.ops``).

    conv = nn.Conv2d(8, 16, 3)
    narrow_layer("conv", conv, in_keep=(4, 5, 6, 7), out_keep=None)   # Conv2d(4, 16, 3)
    fresh_like(nn.BatchNorm2d(8), 4)                                   # a new BatchNorm2d(4)
    fresh_conv(4, 8, rank=4, bias=False)                               # a new 1x1 Conv2d(4, 8)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn as nn

Keep = tuple[int, ...] | None


def narrow_tensor(t: torch.Tensor, dim: int, keep: Keep) -> torch.Tensor:
    """The entries of ``t`` along ``dim`` that ``keep`` lists (all of ``t`` for None)."""
    if keep is None:
        return t
    return t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))


def replace_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Set a parameter or buffer of ``module`` to a copy of ``value``, keeping its kind."""
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
    else:
        module._buffers[name] = value.clone()


def _per_channel(module: nn.Module, width: int) -> list[str]:
    """Names of the module's own parameters and buffers with one entry per channel."""
    own = list(module._parameters.items()) + list(module._buffers.items())
    return [name for name, t in own if t is not None and t.dim() >= 1 and t.shape[0] == width]


def narrow_conv(conv: nn.Module, in_keep: Keep, out_keep: Keep) -> nn.Module:
    """A conv with only the kept channels; groups follow (depthwise) or stay (grouped)."""
    new = copy.deepcopy(conv)
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    out_keep = out_keep if out_keep is not None else (in_keep if depthwise else None)
    out_channels = len(out_keep) if out_keep is not None else conv.out_channels
    in_channels = len(in_keep) if in_keep is not None else conv.in_channels
    groups = out_channels if depthwise else conv.groups
    with torch.no_grad():
        weight = narrow_tensor(conv.weight, 0, out_keep)
        if in_keep is not None and not depthwise:
            in_per_group = conv.in_channels // conv.groups
            new_in_per_group = in_channels // groups
            cols = torch.tensor(in_keep).view(groups, new_in_per_group) % in_per_group
            rows = cols.repeat_interleave(out_channels // groups, dim=0)
            index = rows.view(*rows.shape, *([1] * (weight.dim() - 2))).expand(-1, -1, *weight.shape[2:])
            weight = weight.gather(1, index.to(weight.device))
        replace_tensor(new, "weight", weight)
        for name in _per_channel(conv, conv.out_channels):
            if name != "weight":
                replace_tensor(new, name, narrow_tensor(getattr(conv, name), 0, out_keep))
    new.in_channels, new.out_channels, new.groups = in_channels, out_channels, groups
    return new


def narrow_linear(linear: nn.Linear, in_keep: Keep, out_keep: Keep) -> nn.Module:
    """A linear layer with only the kept input features and output features."""
    new = copy.deepcopy(linear)
    with torch.no_grad():
        replace_tensor(new, "weight", narrow_tensor(narrow_tensor(linear.weight, 0, out_keep), 1, in_keep))
        if linear.bias is not None:
            replace_tensor(new, "bias", narrow_tensor(linear.bias, 0, out_keep))
    new.in_features = len(in_keep) if in_keep is not None else linear.in_features
    new.out_features = len(out_keep) if out_keep is not None else linear.out_features
    return new


WIDTH_ATTRS = ("num_features", "num_channels", "num_parameters")


def layer_width(module: nn.Module) -> int:
    """The channel count a norm-like layer was built for."""
    for attr in WIDTH_ATTRS:
        if hasattr(module, attr):
            return getattr(module, attr)
    if hasattr(module, "normalized_shape"):
        return module.normalized_shape[-1]
    raise TypeError(f"{type(module).__name__} has no known width attribute")


def _shared(module: nn.Module) -> bool:
    """One parameter shared by every channel (``nn.PReLU()``), not one per channel."""
    return getattr(module, "num_parameters", None) == 1


def _set_width(module: nn.Module, width: int) -> None:
    for attr in WIDTH_ATTRS:
        if hasattr(module, attr):
            setattr(module, attr, width)
    if hasattr(module, "normalized_shape"):
        module.normalized_shape = (*module.normalized_shape[:-1], width)


def narrow_per_channel(module: nn.Module, in_keep: Keep, out_keep: Keep) -> nn.Module:
    """Norms and other layers whose parameters and buffers have one entry per channel."""
    keep = out_keep if out_keep is not None else in_keep
    new = copy.deepcopy(module)
    width = layer_width(module)
    if _shared(module):  # one value shared by every channel (nn.PReLU()): nothing to narrow
        return new
    with torch.no_grad():
        for name in _per_channel(module, width):
            replace_tensor(new, name, narrow_tensor(getattr(module, name), 0, keep))
    _set_width(new, len(keep))
    return new


NARROWERS: dict[str, Callable[[nn.Module, Keep, Keep], nn.Module]] = {
    "conv": narrow_conv,
    "linear": narrow_linear,
    "per_channel": narrow_per_channel,
}


def narrow_layer(how: str, module: nn.Module, in_keep: Keep, out_keep: Keep) -> nn.Module:
    """A narrowed copy of ``module`` by the narrow function ``how`` names (an op's ``narrow``)."""
    return NARROWERS[how](module, in_keep, out_keep)


def fresh_like(module: nn.Module, width: int) -> nn.Module:
    """A new, freshly initialised layer of the same kind as ``module`` with ``width`` channels."""
    new = copy.deepcopy(module)
    old = layer_width(module)
    shared = _shared(module)
    for name in _per_channel(module, old) if not shared else ():
        tensor = getattr(module, name)
        replace_tensor(new, name, torch.zeros((width, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device))
    if not shared:
        _set_width(new, width)
    if getattr(new, "num_groups", None):  # GroupNorm: the most groups that divide the new width
        new.num_groups = math.gcd(new.num_groups, width)
    for reset in ("reset_parameters", "reset_running_stats"):
        if hasattr(new, reset):
            getattr(new, reset)()
    return new


CONV_BY_RANK = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


def fresh_conv(in_channels: int, out_channels: int, rank: int, bias: bool) -> nn.Module:
    """A new 1x1 conv for feature maps of ``rank`` dims (batch and channels included)."""
    return CONV_BY_RANK[rank](in_channels, out_channels, 1, bias=bias)
