"""Channel rules: how each op carries the channel dimension, and how to narrow its layer.

Two halves, kept apart as Torch-Pruning keeps its pruning functions apart from the graph
logic that decides which channels go:

* ``RULES``: a registry from an op (module class, function, or method name) to an
  ``OpRule``: its role ("conv", "norm", "act", "add", "cat", ...), how the channels of its
  output relate to those of its inputs (``couple``), and how to build a narrowed copy of
  its module (``narrow``). Supporting a new op is one ``register(...)`` call.
* ``analyse``: a walk over a region of the traced graph that groups the tensors whose
  channel dimensions must stay equal into *channel spaces* (a union-find), starting from
  a seed tensor. Narrowing a space narrows every layer that reads or writes it.

    spaces = analyse(traced, stage.nodes, seed=stage.base)
    spaces.info["layer1_1_conv1"].reads   # the space conv1 reads: the stage's stream
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from cspify.trace import Traced


def shape(node: fx.Node) -> tuple[int, ...] | None:
    """The tensor shape ShapeProp stored on a node, or None for non-tensor values."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The input nodes of ``node`` that carry tensors, in argument order (flattened)."""
    return [n for n in node.all_input_nodes if shape(n) is not None]

# ---------------------------------------------------------------------------------------
# Channel spaces


@dataclass
class Space:
    """One union-find entry: a channel dimension shared by several tensors."""

    width: int
    parent: int
    blocks: int = 1  # the width must stay a multiple of this (conv groups, norm groups)
    grouped: str = ""  # a grouped conv that reads or writes it: keeps must be per group
    frozen: str = ""  # why this space must keep its width
    segments: tuple[int, ...] | None = None  # a channel concat of these spaces


class ChannelSpaces:
    """A union-find of channel spaces with widths, group constraints and freeze reasons."""

    def __init__(self) -> None:
        self._spaces: list[Space] = []

    def new(self, width: int, frozen: str = "", segments: tuple[int, ...] | None = None) -> int:
        self._spaces.append(Space(width, len(self._spaces), frozen=frozen, segments=segments))
        return len(self._spaces) - 1

    def find(self, i: int) -> int:
        while self._spaces[i].parent != i:
            self._spaces[i].parent = self._spaces[self._spaces[i].parent].parent
            i = self._spaces[i].parent
        return i

    def __getitem__(self, i: int) -> Space:
        return self._spaces[self.find(i)]

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        sa, sb = self._spaces[ra], self._spaces[rb]
        sb.parent = ra
        sa.blocks = math.lcm(sa.blocks, sb.blocks)
        sa.frozen = sa.frozen or sb.frozen
        sa.grouped = sa.grouped or sb.grouped
        if sa.width != sb.width:
            sa.frozen = sa.frozen or f"channel widths {sa.width} and {sb.width} meet"
        if sa.segments is None:
            sa.segments = sb.segments
        elif sb.segments is not None and sa.segments != sb.segments:
            sa.frozen = sa.frozen or "two different channel concatenations meet"
        return ra

    def freeze(self, i: int, reason: str) -> None:
        space = self[i]
        space.frozen = space.frozen or reason

    def constrain(self, i: int, blocks: int) -> None:
        space = self[i]
        space.blocks = math.lcm(space.blocks, blocks)

    def roots(self) -> list[int]:
        return sorted({self.find(i) for i in range(len(self._spaces))})


@dataclass
class ChannelInfo:
    """Where a tensor's channels are (``axis``) and which space they belong to.

    ``reads`` is set for layers that map one space to another (convs, linears): the
    space of the channels they read. ``holds`` is False for a layer whose weights do not
    follow its channels (a LayerNorm over another axis): it is never narrowed.
    """

    axis: int | None
    space: int | None
    reads: int | None = None
    holds: bool = True


@dataclass
class Analysis:
    """The result of ``analyse``: channel info per node over one region."""

    traced: "Traced"
    spaces: ChannelSpaces = field(default_factory=ChannelSpaces)
    info: dict[str, ChannelInfo] = field(default_factory=dict)

    # -- helpers the couple functions use --------------------------------------------
    def of(self, node: fx.Node) -> ChannelInfo:
        """Channel info of an input; tensors from outside the region keep their width."""
        if node.name not in self.info:
            dims = shape(node)
            if node.op == "get_attr" and dims is not None and len(dims) == 1:
                self.info[node.name] = ChannelInfo(0, self.spaces.new(dims[0]))  # a per-channel parameter
            elif node.op == "get_attr":
                return ChannelInfo(None, None)  # its channel axis is known once it broadcasts
            elif dims is None or len(dims) < 2:
                self.info[node.name] = ChannelInfo(None, None)
            else:
                reason = f"it also flows to '{node.name}', outside the stage"
                self.info[node.name] = ChannelInfo(1, self.spaces.new(dims[1], frozen=reason))
        return self.info[node.name]

    def module(self, node: fx.Node) -> nn.Module:
        return self.traced.gm.get_submodule(node.target)

    def set(self, node: fx.Node, axis: int | None, space: int | None, reads: int | None = None) -> None:
        self.info[node.name] = ChannelInfo(axis, space, reads)

    def fresh(self, node: fx.Node, axis: int = 1, frozen: str = "") -> int | None:
        """A new space for the channels ``node`` writes (None for non-tensor outputs)."""
        dims = shape(node)
        if dims is None or len(dims) <= axis:
            self.set(node, None, None)
            return None
        space = self.spaces.new(dims[axis], frozen=frozen)
        self.set(node, axis, space)
        return space

    def freeze_inputs(self, node: fx.Node, reason: str) -> None:
        for arg in tensor_inputs(node):
            info = self.of(arg)
            if info.space is not None:
                self.spaces.freeze(info.space, reason)


# ---------------------------------------------------------------------------------------
# Couple functions: one per way an op relates output channels to input channels


def couple_same(node: fx.Node, a: Analysis) -> None:
    """Elementwise, unary, norm, activation, pooling, add, mul: output channels = inputs'.

    Inputs broadcast from the right; one of size 1 on the channel axis does not couple.
    """
    out = shape(node)
    inputs = tensor_inputs(node)
    if out is None:
        return
    lead = next((arg for arg in inputs if a.of(arg).axis is not None and len(shape(arg)) == len(out)), None)
    if lead is None:
        space = a.fresh(node, frozen=f"'{node.name}' reads tensors whose channels cspify cannot follow")
        if space is not None:
            a.freeze_inputs(node, f"'{node.name}' mixes channels cspify cannot follow")
        return
    axis = a.of(lead).axis
    space = a.of(lead).space
    back = axis - len(out)  # the channel axis counted from the right, for broadcasting
    for arg in inputs:
        dims = shape(arg)
        if len(dims) < -back or dims[back] == 1 and out[axis] != 1:
            continue
        if arg.op == "get_attr" and arg.name not in a.info:  # layer scale and the like
            a.set(arg, len(dims) + back, a.spaces.new(dims[back]))
        info = a.of(arg)
        if info.axis is None or info.axis - len(dims) != back:
            reason = f"'{node.name}' combines '{arg.name}', whose channels cspify cannot follow"
            a.spaces.freeze(space, reason)
            if info.space is not None:
                a.spaces.freeze(info.space, reason)
            continue
        space = a.spaces.union(space, info.space)
    a.set(node, axis, space)


def couple_conv(node: fx.Node, a: Analysis) -> None:
    """A convolution: reads its input's channels, writes new ones; depthwise keeps them."""
    conv = a.module(node)
    x = a.of(node.args[0])
    dims_in, dims_out = shape(node.args[0]), shape(node)
    if x.axis is not None and x.axis >= 2 and dims_in[x.axis] == dims_out[x.axis]:
        a.info[node.name] = ChannelInfo(x.axis, x.space, holds=False)  # slides along the channels (ECA)
        return
    if x.axis != 1:
        a.fresh(node, frozen=f"'{node.name}' reads channels on an axis other than 1")
        a.freeze_inputs(node, f"'{node.name}' reads channels on an axis other than 1")
        return
    groups = conv.groups
    if groups > 1 and groups == conv.in_channels == conv.out_channels:
        a.set(node, 1, x.space, reads=x.space)  # depthwise: one space in and out
        return
    if groups > 1 and groups == conv.in_channels:
        reason = f"'{node.name}' is a depthwise conv with a channel multiplier"
        a.spaces.freeze(x.space, reason)
        a.fresh(node, frozen=reason)
        return
    out = a.fresh(node)
    a.info[node.name].reads = x.space
    if groups > 1:
        for space in (x.space, out):
            a.spaces.constrain(space, groups)
            a.spaces[space].grouped = a.spaces[space].grouped or node.name


def couple_linear(node: fx.Node, a: Analysis) -> None:
    """A linear layer: maps the last axis, which must be the channel axis to narrow."""
    x = a.of(node.args[0])
    dims = shape(node.args[0])
    if x.axis is None or x.axis != len(dims) - 1:
        if x.space is not None:
            a.spaces.freeze(x.space, f"'{node.name}' is a linear layer over a non-channel axis")
        a.fresh(node, axis=len(shape(node)) - 1, frozen=f"'{node.name}' output")
        return
    a.fresh(node, axis=len(shape(node)) - 1)
    a.info[node.name].reads = x.space


def couple_group_norm(node: fx.Node, a: Analysis) -> None:
    couple_same(node, a)
    info = a.info.get(node.name)
    if info is not None and info.space is not None:
        a.spaces.constrain(info.space, a.module(node).num_groups)


def couple_layer_norm(node: fx.Node, a: Analysis) -> None:
    """LayerNorm normalises its last axis; subclasses named ...2d (timm's, torchvision's
    LayerNorm2d) permute inside and normalise axis 1. Only that axis can be narrowed."""
    norm = a.module(node)
    x = a.of(node.args[0])
    rank = len(shape(node.args[0]))
    norm_axis = 1 if type(norm).__name__.endswith("2d") else rank - 1
    if len(norm.normalized_shape) == 1 and x.axis == norm_axis:
        return couple_same(node, a)
    a.info[node.name] = ChannelInfo(x.axis, x.space, holds=False)


def couple_cat(node: fx.Node, a: Analysis) -> None:
    """torch.cat: along the channel axis it builds a concat of spaces, else it couples."""
    parts = node.args[0] if node.args else node.kwargs["tensors"]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = shape(node)
    dim = dim % len(out)
    infos = [a.of(p) for p in parts]
    if any(info.axis is None for info in infos) or len({info.axis for info in infos}) != 1:
        space = a.fresh(node, frozen=f"'{node.name}' concatenates tensors cspify cannot follow")
        a.freeze_inputs(node, f"'{node.name}' concatenates tensors cspify cannot follow")
        return
    axis = infos[0].axis
    if dim != axis:
        couple_same(node, a)
        return
    space = a.spaces.new(out[axis], segments=tuple(info.space for info in infos))
    a.set(node, axis, space)


def _dims_arg(node: fx.Node, start: int = 1) -> list:
    """The dims argument of permute/reshape/view, given as varargs or as one sequence."""
    args = list(node.args[start:])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return list(args[0])
    if not args:
        for key in ("dims", "shape", "size"):
            if key in node.kwargs:
                return list(node.kwargs[key])
    return args


def _moved(node: fx.Node, a: Analysis, axis: int | None, reason: str) -> None:
    """Output shares the input's space with its channels on ``axis`` (None: lost)."""
    x = a.of(node.args[0])
    if axis is None:
        if x.space is not None:
            a.spaces.freeze(x.space, f"'{node.name}' {reason}")
        a.fresh(node, frozen=f"'{node.name}' {reason}")
        return
    a.set(node, axis, x.space)


def couple_permute(node: fx.Node, a: Analysis) -> None:
    """permute / transpose: the channel axis moves to where the permutation puts it."""
    x = a.of(node.args[0])
    rank = len(shape(node))
    if x.axis is None:
        return couple_unknown(node, a)
    if node.target in ("transpose", torch.transpose):
        d0, d1 = (d % rank for d in _dims_arg(node))
        axis = d1 if x.axis == d0 else d0 if x.axis == d1 else x.axis
    else:
        axis = [d % rank for d in _dims_arg(node)].index(x.axis)
    _moved(node, a, axis, "")


def couple_reshape(node: fx.Node, a: Analysis) -> None:
    """reshape / view / flatten: fine while the channel dim survives whole and its size is
    not written as a constant (after narrowing, a constant would be wrong)."""
    x = a.of(node.args[0])
    before, after = shape(node.args[0]), shape(node)
    if x.axis is None or after is None:
        return couple_unknown(node, a)
    lead = math.prod(before[: x.axis])
    axis = next((j for j in range(len(after)) if math.prod(after[:j]) == lead and after[j] == before[x.axis]), None)
    reason = "merges or splits the channel dim" if axis is None else ""
    if axis is not None and node.target not in ("flatten", torch.flatten) and node.op != "call_module":
        sizes = _dims_arg(node)
        if len(sizes) == len(after) and isinstance(sizes[axis], int) and sizes[axis] != -1 and before[x.axis] > 1:
            axis, reason = None, f"reshapes the channels to the constant size {sizes[axis]}"
    _moved(node, a, axis, reason)


def couple_reduce(node: fx.Node, a: Analysis) -> None:
    """mean / sum / amax over some dims: fine while the channel dim is not reduced."""
    x = a.of(node.args[0])
    rank_in, rank_out = len(shape(node.args[0])), len(shape(node) or ())
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if x.axis is None or dims is None:
        return _moved(node, a, None, "reduces over every dim")
    dims = [d % rank_in for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if x.axis in dims:
        return _moved(node, a, None, "reduces over the channel dim")
    axis = x.axis if rank_out == rank_in else x.axis - sum(d < x.axis for d in dims)
    _moved(node, a, axis, "")


def couple_nothing(node: fx.Node, a: Analysis) -> None:
    """Ops that only look at a tensor (its size, its dim) and make no tensor."""
    a.set(node, None, None)


def couple_unknown(node: fx.Node, a: Analysis) -> None:
    """An op without a rule: its inputs and output keep their widths."""
    reason = f"op '{_op_name(node, a)}' (node '{node.name}') has no channel rule"
    a.freeze_inputs(node, reason)
    a.fresh(node, frozen=reason)


# ---------------------------------------------------------------------------------------
# Narrow functions: one per layer kind; each returns a new module, the old one untouched


def narrow_tensor(t: torch.Tensor, dim: int, keep: tuple[int, ...] | None) -> torch.Tensor:
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


def _per_channel(module: nn.Module, width: int):
    """Names of the module's own parameters and buffers with one entry per channel."""
    own = list(module._parameters.items()) + list(module._buffers.items())
    return [name for name, t in own if t is not None and t.dim() >= 1 and t.shape[0] == width]


def narrow_conv(conv: nn.Module, in_keep, out_keep) -> nn.Module:
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


def narrow_linear(linear: nn.Linear, in_keep, out_keep) -> nn.Module:
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


def narrow_per_channel(module: nn.Module, in_keep, out_keep) -> nn.Module:
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


# ---------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class OpRule:
    role: str
    couple: Callable[[fx.Node, Analysis], None]
    narrow: Callable[[nn.Module, tuple | None, tuple | None], nn.Module] | None = None


RULES: dict[object, OpRule] = {}


def register(*targets, role: str, couple=couple_same, narrow=None) -> None:
    """Register module classes, functions or method names (strings) under one rule."""
    rule = OpRule(role, couple, narrow)
    for target in targets:
        RULES[target] = rule


def rule_for(node: fx.Node, gm: fx.GraphModule) -> OpRule | None:
    """The rule for a node: by module class (most derived first), function or method name."""
    if node.op == "call_module":
        return module_rule(gm.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        try:
            return RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    return None


def module_rule(module: nn.Module) -> OpRule | None:
    """The rule of a module's class, most derived first; classes of optional packages
    (timm, torchvision) are registered by their qualified name."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls) or RULES.get(f"{cls.__module__}.{cls.__qualname__}")
        if rule is not None:
            return rule
    return None


def is_leaf(module: nn.Module) -> bool:
    """Modules the registry knows stay whole when tracing: their rule covers them."""
    return module_rule(module) is not None


def role_of(node: fx.Node, gm: fx.GraphModule) -> str | None:
    rule = rule_for(node, gm)
    return rule.role if rule else None


def _op_name(node: fx.Node, a: Analysis) -> str:
    if node.op == "call_module":
        return type(a.module(node)).__name__
    return getattr(node.target, "__name__", str(node.target))


register(nn.Conv1d, nn.Conv2d, nn.Conv3d, role="conv", couple=couple_conv, narrow=narrow_conv)
register(nn.Linear, role="linear", couple=couple_linear, narrow=narrow_linear)
register(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    role="norm", narrow=narrow_per_channel,
)
register(nn.GroupNorm, role="norm", couple=couple_group_norm, narrow=narrow_per_channel)
register(nn.LayerNorm, role="norm", couple=couple_layer_norm, narrow=narrow_per_channel)
register(nn.PReLU, role="act", narrow=narrow_per_channel)
register(
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    torch.relu, torch.sigmoid, torch.tanh,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh",
    role="act",
)
register(
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool2d,
    role="pool",
)
register(
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    F.dropout, F.dropout2d, "contiguous", "clone", "dropout",
    role="identity",
)
register(
    "torchvision.ops.stochastic_depth.StochasticDepth", "timm.layers.drop.DropPath", "timm.layers.drop.DropBlock2d",
    role="identity",
)
register(torch.permute, torch.transpose, "permute", "transpose", role="permute", couple=couple_permute)
register(
    torch.reshape, torch.flatten, nn.Flatten, "reshape", "view", "flatten",
    role="reshape", couple=couple_reshape,
)
register(torch.mean, torch.sum, torch.amax, "mean", "sum", "amax", role="reduce", couple=couple_reduce)
register(operator.add, operator.iadd, torch.add, "add", "add_", role="add")
register(
    operator.mul, operator.imul, operator.sub, operator.truediv, torch.mul, torch.sub, torch.div,
    "mul", "mul_", "sub", "div", "expand_as",
    role="elementwise",
)
register(torch.cat, torch.concat, role="cat", couple=couple_cat)
register("size", "dim", getattr, role="meta", couple=couple_nothing)


# ---------------------------------------------------------------------------------------
# The walk


def analyse(traced: Traced, region, seed: str, seed_axis: int = 1) -> Analysis:
    """Channel spaces of a region, in graph order, with ``seed``'s channels as space 0.

    Tensors that enter the region from elsewhere keep their width (their spaces are frozen
    with the reason), as does anything an op without a rule touches.
    """
    a = Analysis(traced)
    nodes = traced.nodes
    seed_node = nodes[seed]
    a.info[seed] = ChannelInfo(seed_axis, a.spaces.new(shape(seed_node)[seed_axis]))
    for name in region:
        node = nodes[name]
        if node.op == "get_attr":
            continue  # a parameter gets its channel axis where it is used (Analysis.of, couple_same)
        rule = rule_for(node, traced.gm)
        (rule.couple if rule else couple_unknown)(node, a)
    return a
