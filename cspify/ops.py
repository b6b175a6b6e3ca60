"""The one table of op facts: what cspify knows about each op, and how to look it up.

Each entry maps an op (a module class, a function, or a method name; classes of optional
packages by their qualified name) to one ``Op`` record: its role in a stage, how it
couples channels, how its layer is narrowed, what it returns, and whether an add may
write into its output. The channel analysis, the planner, the rewrite, the measurements
and the in-place pass all read this table, so supporting a new op is one ``register``
entry, as in fvcore's ``jit_handles``.

    rule_for(traced.nodes["layer1_0_conv1"], traced.gm)   # Op(role='conv', couple='conv', narrow='conv', ...)
    role_of(traced.nodes["relu"], traced.gm)              # 'act'
    OPS[torch.narrow].returns                             # 'view': moves no memory
    is_leaf(nn.BatchNorm2d(8))                            # True: tracing keeps it whole

Modules inherit their base class's entry for the channel facts (a subclass of ``nn.Conv2d``
still carries channels as a conv); the memory facts (``returns``, ``fresh_output``) are
looked up by exact type with ``exact_op``, since a subclass may add work (timm's
``BatchNormAct2d`` adds an activation whose backward reads its output).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

RETURNS = ("new", "view", "inplace", "none")


def shape(node: fx.Node) -> tuple[int, ...] | None:
    """The tensor shape ShapeProp stored on a node, or None for non-tensor values."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


@dataclass(frozen=True)
class Op:
    """What cspify knows about one op.

    role:         what rules and the planner see it as: "conv", "linear", "norm", "act",
                  "pool", "identity", "permute", "reshape", "reduce", "add", "elementwise",
                  "cat", "split" (chunk, split), "index" (getitem), "meta"; None for an op
                  without a channel rule.
    couple:       how its output channels relate to its inputs' (a key of
                  ``cspify.channels.COUPLINGS``); None: cspify cannot follow its channels.
    narrow:       how its layer is narrowed (a key of ``cspify.narrow.NARROWERS``); None for
                  an op without per-channel parameters.
    returns:      "new" tensor, a "view" of its first input, its first input written
                  "inplace", or "none" (no tensor: ``x.size()``). Views and "none" move no memory.
    fresh_output: its output is a new tensor its backward never reads, so an add may
                  write into it.
    channel_dim:  the axis of its input it treats as channels (1 for convs and batch,
                  instance and group norms, -1 for linear layers and LayerNorm), None for
                  an op that treats every axis alike; ``channel_dim`` refines it per layer.
    """

    role: str | None = None
    couple: str | None = None
    narrow: str | None = None
    returns: str = "new"
    fresh_output: bool = False
    channel_dim: int | None = None


OPS: dict[object, Op] = {}


def register(*targets, role: str | None = None, couple: str | None = "same", narrow: str | None = None,
             returns: str = "new", fresh_output: bool = False, channel_dim: int | None = None) -> None:
    """Enter module classes, functions or method names (strings) under one set of facts."""
    if returns not in RETURNS:
        raise ValueError(f"returns must be one of {RETURNS}, not {returns!r}")
    if (role is None) != (couple is None):
        raise ValueError("an op has a channel rule (a role and a coupling) or neither")
    op = Op(role, couple, narrow, returns, fresh_output, channel_dim)
    for target in targets:
        if target in OPS:
            raise ValueError(f"{target!r} has an entry already: one entry per op")
        OPS[target] = op


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def module_rule(module: nn.Module) -> Op | None:
    """The entry of a module's class, most derived first; classes of optional packages
    (timm, torchvision) are entered by their qualified name."""
    for cls in type(module).__mro__:
        op = OPS.get(cls) or OPS.get(_qualified(cls))
        if op is not None:
            return op
    return None


def rule_for(node: fx.Node, gm: fx.GraphModule) -> Op | None:
    """The entry of a node's op: by module class (most derived first), function or method name."""
    if node.op == "call_module":
        return module_rule(gm.get_submodule(node.target))
    return _target_op(node)


def exact_op(node: fx.Node, gm: fx.GraphModule) -> Op | None:
    """The entry of exactly this node's op: a module subclass does not inherit its base's
    entry (for the memory facts, which a subclass's own forward may break)."""
    if node.op == "call_module":
        cls = type(gm.get_submodule(node.target))
        return OPS.get(cls) or OPS.get(_qualified(cls))
    return _target_op(node)


def _target_op(node: fx.Node) -> Op | None:
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        return OPS.get(node.target)
    except TypeError:  # unhashable target
        return None


def is_leaf(module: nn.Module) -> bool:
    """Modules with a channel rule stay whole when tracing: their rule covers them."""
    op = module_rule(module)
    return op is not None and op.couple is not None


def role_of(node: fx.Node, gm: fx.GraphModule) -> str | None:
    op = rule_for(node, gm)
    return op.role if op else None


def channel_dim(node: fx.Node, gm: fx.GraphModule) -> int | None:
    """The axis of its input that ``node``'s op treats as channels, counted from 0 (None:
    it treats every axis alike, or it is no tensor op).

    The entry's ``channel_dim``, refined per layer where the layer's settings decide it:
    a LayerNorm normalises its last axis (subclasses named ...2d, timm's and torchvision's
    LayerNorm2d, permute inside and normalise axis 1) and over several axes has no one
    channel axis; a layer with one parameter shared by every channel (``nn.PReLU()``)
    treats no axis as channels.
    """
    op = rule_for(node, gm)
    dim = op.channel_dim if op else None
    dims = shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if dim is None or dims is None or len(dims) < 2:
        return None
    if node.op == "call_module":
        layer = gm.get_submodule(node.target)
        if getattr(layer, "num_parameters", None) == 1:
            return None
        if isinstance(layer, nn.LayerNorm):
            if len(layer.normalized_shape) != 1:
                return None
            dim = 1 if type(layer).__name__.endswith("2d") else -1
    return dim % len(dims)


# ---------------------------------------------------------------------------------------
# The entries

# Layers with weights: the output is new, and their backward never reads it.
register(
    nn.Conv1d, nn.Conv2d, nn.Conv3d, role="conv", couple="conv", narrow="conv", fresh_output=True, channel_dim=1,
)
register(nn.Linear, role="linear", couple="linear", narrow="linear", fresh_output=True, channel_dim=-1)
register(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    role="norm", narrow="per_channel", fresh_output=True, channel_dim=1,
)
register(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, role="norm", narrow="per_channel", channel_dim=1)
register(nn.GroupNorm, role="norm", couple="group_norm", narrow="per_channel", fresh_output=True, channel_dim=1)
register(nn.LayerNorm, role="norm", couple="layer_norm", narrow="per_channel", fresh_output=True, channel_dim=-1)

# Activations, pooling, identities: output channels are the input's.
register(nn.PReLU, role="act", narrow="per_channel", channel_dim=1)
register(
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    F.relu, F.relu6, F.hardtanh, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    torch.relu, torch.sigmoid, torch.tanh,
    "relu", "sigmoid", "tanh",
    role="act",
)
register("relu_", "sigmoid_", role="act", returns="inplace")
# Elementwise math of one tensor (RMS norms written out, as MobileNetV5's: x.pow(2), rsqrt).
register(
    operator.pow, operator.neg, torch.pow, torch.sqrt, torch.rsqrt, torch.exp, torch.log, torch.abs, torch.neg,
    torch.square, torch.clamp, "pow", "sqrt", "rsqrt", "exp", "log", "abs", "neg", "square", "clamp",
    role="elementwise",
)
# Padding layers pad the spatial axes only (a pad over the channels would be F.pad's 6-tuple).
register(
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
    nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
    role="pool",
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
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, F.dropout, F.dropout2d, "clone", "dropout",
    "torchvision.ops.stochastic_depth.StochasticDepth", "timm.layers.drop.DropPath", "timm.layers.drop.DropBlock2d",
    role="identity",
)
register(nn.Identity, "contiguous", role="identity", returns="view")
register("to", role="identity", returns="view")  # a dtype cast, as the rewrite adds them (a no-op outside autocast)

# Ops that move the channel axis or reduce over others.
register(torch.permute, torch.transpose, "permute", "transpose", role="permute", couple="permute", returns="view")
register(
    torch.reshape, torch.flatten, nn.Flatten, "reshape", "view", "flatten",
    role="reshape", couple="reshape", returns="view",
)
register(torch.mean, torch.sum, torch.amax, "mean", "sum", "amax", role="reduce", couple="reduce")

# Elementwise ops over several tensors, and the channel concat.
register(operator.add, torch.add, "add", role="add")
register(operator.iadd, "add_", role="add", returns="inplace")
register(
    operator.mul, operator.sub, operator.truediv, torch.mul, torch.sub, torch.div, "mul", "sub", "div",
    role="elementwise",
)
register(operator.imul, "mul_", role="elementwise", returns="inplace")
register("expand_as", role="elementwise", returns="view")
register(torch.cat, torch.concat, role="cat", couple="cat")

# Views of parts of a tensor: a chunk's or split's pieces, and indexing (a slice of the
# channels reads part of their space, a spatial crop keeps them; ``cspify.channels``).
register(torch.chunk, torch.split, "chunk", "split", role="split", couple="split", returns="view")
register(operator.getitem, role="index", couple="getitem", returns="view")

# Ops that only look at a tensor and make none.
register("size", "dim", getattr, role="meta", couple="nothing", returns="none")

# Views and in-place ops without a channel rule: a stage that uses them stays as it is.
register(
    torch.narrow, torch.squeeze, torch.unsqueeze, nn.Unflatten,
    "narrow", "view_as", "squeeze", "unsqueeze", "expand",
    couple=None, returns="view",
)
register(operator.isub, operator.itruediv, torch.relu_, couple=None, returns="inplace")
