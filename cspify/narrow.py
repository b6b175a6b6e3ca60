"""Layers for the rewrite: narrowed copies of existing layers, and fresh ones.

One narrow function per layer kind, kept apart from the graph logic that decides which
channels go (as Torch-Pruning keeps its pruning functions): each takes the layer and the
input and output channels it keeps (``None``: all) and returns a new layer, the old one
untouched. ``NARROWERS`` names them for the op table (``cspify.ops``).

    conv = nn.Conv2d(8, 16, 3)
    narrow_layer("conv", conv, in_keep=(4, 5, 6, 7), out_keep=None)   # Conv2d(4, 16, 3)
    fresh_like(nn.BatchNorm2d(8), 4)                                   # a new BatchNorm2d(4)
    sized_like(nn.PReLU(8), 4)                                         # a new PReLU(4); nn.ReLU() copied
    fresh_mix(4, 8, rank=4, axis=1, bias=False)                        # a new 1x1 Conv2d(4, 8)
    fresh_mix(4, 8, rank=4, axis=3, bias=False)                        # channels last: a new Linear(4, 8)

Layers under a weight reparametrization (``torch.nn.utils.parametrizations.weight_norm``
and ``spectral_norm``, the older ``torch.nn.utils.weight_norm`` and ``spectral_norm``
hooks) are narrowed as plain layers with their effective weight, and the reparametrization
is put back on the narrowed layer (``REPARAMETRIZATIONS``): weight norm then gives exactly
the narrowed weight, spectral norm normalises it again (its power iteration restarts).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.nn.parameter import UninitializedTensorMixin
from torch.nn import utils
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.spectral_norm import SpectralNorm as OldSpectralNorm
from torch.nn.utils.weight_norm import WeightNorm as OldWeightNorm

Keep = tuple[int, ...] | None


def clone_module(module: nn.Module) -> nn.Module:
    """``copy.deepcopy`` of a module, also where a hook left a tensor it computed with
    gradients on it (the older ``torch.nn.utils.weight_norm`` sets ``weight`` so at every
    forward, and deepcopy refuses such tensors): that tensor is copied detached, and its
    hook computes it again at the next forward. A lazy module's parameters that no forward
    has initialised yet (which deepcopy refuses too) are copied as new uninitialised ones."""
    memo = {id(t): t.detach().clone() for t in _computed_tensors(module)}
    memo.update((id(t), _uninitialised_like(t)) for t in (*module.parameters(), *module.buffers())
                if isinstance(t, UninitializedTensorMixin))
    return copy.deepcopy(module, memo)


def _uninitialised_like(t: torch.Tensor) -> torch.Tensor:
    if isinstance(t, nn.UninitializedParameter):
        return nn.UninitializedParameter(t.requires_grad, t.device, t.dtype)
    return nn.UninitializedBuffer(t.requires_grad, t.device, t.dtype)


def has_computed_tensors(module: nn.Module) -> bool:
    """Does a hook's computed tensor (see ``clone_module``) keep ``copy.deepcopy`` off it?"""
    return any(True for _ in _computed_tensors(module))


def _computed_tensors(module: nn.Module):
    """Tensors with a history kept as plain attributes of ``module`` or its submodules."""
    for m in module.modules():
        for value in vars(m).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                yield value


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
    new = clone_module(conv)
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
    new = clone_module(linear)
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
    new = clone_module(module)
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
    """A narrowed copy of ``module`` by the narrow function ``how`` names (an op's ``narrow``),
    under the weight reparametrizations ``module`` has (``reparametrization_problem`` says
    first whether cspify knows them all)."""
    plain, put_back = _without_reparametrizations(module)
    return put_back(NARROWERS[how](plain, in_keep, out_keep))


# ---------------------------------------------------------------------------------------
# Weight reparametrizations: how to take one off a layer, leaving its effective weight as a
# plain parameter, and how to put it back on a narrowed copy; one entry per kind, by the
# class that implements it (a parametrization module, or the older forward pre-hook).


@contextmanager
def _quietly(grad: bool = True):
    """Without the older reparametrizations' deprecation warning; ``grad=False``: without
    gradients too (putting an older hook back would otherwise leave a computed weight that
    ``copy.deepcopy`` refuses; taking a parametrization off needs them, to tell whether the
    effective tensor is a parameter)."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _remove_parametrization(layer: nn.Module, name: str, how) -> None:
    """``remove_parametrizations``, leaving the effective tensor, on a copy: parametrize
    makes a class per module, which ``copy.deepcopy`` shares with the original and whose
    property for the tensor the removal deletes, so the copy gets a class of its own first."""
    cls = type(layer)
    layer.__class__ = type(cls.__name__, cls.__bases__, dict(vars(cls)))
    parametrize.remove_parametrizations(layer, name, leave_parametrized=True)


REPARAMETRIZATIONS: dict[type, tuple[Callable, Callable]] = {
    # kind: (take it off layer's tensor `name`, put it back: (layer, name, how) -> None)
    parametrizations._WeightNorm: (
        _remove_parametrization,
        lambda layer, name, how: parametrizations.weight_norm(layer, name, dim=how.dim),
    ),
    parametrizations._SpectralNorm: (
        _remove_parametrization,
        lambda layer, name, how: parametrizations.spectral_norm(
            layer, name, n_power_iterations=how.n_power_iterations, eps=how.eps, dim=how.dim
        ),
    ),
    OldWeightNorm: (
        lambda layer, name, how: utils.remove_weight_norm(layer, name),
        lambda layer, name, how: utils.weight_norm(layer, name, dim=how.dim),
    ),
    OldSpectralNorm: (
        lambda layer, name, how: utils.remove_spectral_norm(layer, name),
        lambda layer, name, how: _old_spectral_norm(layer, name, how),
    ),
}


def _old_spectral_norm(layer: nn.Module, name: str, how) -> None:
    """The older spectral norm hook, its estimate of the largest singular value refined as
    the newer one does when it starts (15 power iterations), not left at a random start."""
    utils.spectral_norm(layer, name, n_power_iterations=how.n_power_iterations, eps=how.eps, dim=how.dim)
    hook = next(h for h in layer._forward_pre_hooks.values() if isinstance(h, OldSpectralNorm) and h.name == name)
    for _ in range(15):
        weight = hook.compute_weight(layer, do_power_iteration=True)
    setattr(layer, name, weight)


def _reparametrizations(module: nn.Module) -> list[tuple[str, object]]:
    """(tensor name, what reparametrizes it) of every parametrization and every known hook
    on ``module`` itself; a stack of several parametrizations on one tensor counts as one."""
    found = []
    if parametrize.is_parametrized(module):
        for name, stack in module.parametrizations.items():
            found.append((name, stack[0] if len(stack) == 1 else stack))
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (OldWeightNorm, OldSpectralNorm)):
            found.append((hook.name, hook))
    return found


def reparametrization_problem(module: nn.Module) -> str:
    """Why cspify cannot narrow ``module``'s reparametrized weights ("" where it can)."""
    for name, how in _reparametrizations(module):
        if type(how) not in REPARAMETRIZATIONS:
            what = type(how).__name__
            if isinstance(how, parametrize.ParametrizationList):
                what = " then ".join(type(p).__name__ for p in how)
            return f"its {name!r} is parametrized by {what}, which cspify cannot narrow"
    return ""


def _without_reparametrizations(module: nn.Module) -> tuple[nn.Module, Callable[[nn.Module], nn.Module]]:
    """A copy of ``module`` without its reparametrizations (its tensors the effective ones),
    and a function that puts them back on a (narrowed) copy."""
    found = _reparametrizations(module)
    if not found:
        return module, lambda layer: layer
    plain = clone_module(module)
    with _quietly():
        for name, how in _reparametrizations(plain):
            REPARAMETRIZATIONS[type(how)][0](plain, name, how)

    def put_back(layer: nn.Module) -> nn.Module:
        with _quietly(grad=False):
            for name, how in found:
                REPARAMETRIZATIONS[type(how)][1](layer, name, how)
        return layer

    return plain, put_back


# ---------------------------------------------------------------------------------------
# Fresh layers


def fresh_like(module: nn.Module, width: int) -> nn.Module:
    """A new, freshly initialised layer of the same kind as ``module`` with ``width`` channels."""
    new = clone_module(module)
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


def sized_like(module: nn.Module, width: int) -> nn.Module:
    """A template layer for ``width`` channels: one with parameters per channel
    (``nn.PReLU(C)``, a norm) made fresh at that width (``fresh_like``), any other (an
    activation, ``nn.PReLU()``) copied as it is."""
    try:
        per_channel = not _shared(module) and bool(_per_channel(module, layer_width(module)))
    except TypeError:  # no width attribute: nothing per channel
        per_channel = False
    return fresh_like(module, width) if per_channel else clone_module(module)


CONV_BY_RANK = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


def fresh_conv(in_channels: int, out_channels: int, rank: int, bias: bool) -> nn.Module:
    """A new 1x1 conv for feature maps of ``rank`` dims (batch and channels included)."""
    return CONV_BY_RANK[rank](in_channels, out_channels, 1, bias=bias)


def can_mix(rank: int, axis: int) -> bool:
    """Is there a pointwise layer (``fresh_mix``) for channels on ``axis`` of ``rank`` dims?"""
    return (axis == 1 and rank in CONV_BY_RANK) or axis == rank - 1


def fresh_mix(in_channels: int, out_channels: int, rank: int, axis: int, bias: bool) -> nn.Module:
    """A new layer that mixes the channels on ``axis`` at every position: a 1x1 conv where
    they are on axis 1 (N,C,H,W), a linear layer where they are on the last axis (N,H,W,C;
    the same map), as ``can_mix`` says."""
    if axis == 1 and rank in CONV_BY_RANK:
        return fresh_conv(in_channels, out_channels, rank, bias)
    if axis == rank - 1:
        return nn.Linear(in_channels, out_channels, bias=bias)
    raise ValueError(f"no pointwise layer mixes channels on axis {axis} of {rank} dims")
