"""Calibration: set from unlabeled images what conversion left arbitrary, no gradient step.

    csp = cspify.convert(model, x)                 # a trained model: csp now scores at chance
    cspify.calibrate(model, csp, images)           # images: a tensor N,C,H,W, a DataLoader, a Dataset
    csp.meta["cspify.calibrate"].to_dict()         # what was fitted, and how well

Conversion keeps the weights of every channel the narrowed blocks still see, but those
blocks now miss the bypass part's channels, the new partial transitions start from a
random initialisation, and the layers reading a stage output see the untouched bypass part
x0' where the original had its stage output. Each converted stage, in graph order and
seeing the already calibrated stages before it:

1. **partial stage**: every conv and linear layer inside it is refitted by ridge least
   squares to reproduce the original's output of the same layer (on the channels it keeps)
   from the inputs it now gets, in order, each after those it reads; the BatchNorms after
   them keep the original's statistics, every other BatchNorm of the stage re-estimates its
   own (train-mode forward without gradients, a cumulative average);
2. **partial transition**: its conv (a linear layer on a channels-last stream) is fitted
   so that the stage output's through part matches the original's stage output (fusion
   last: channels ``[bypass:]``; fusion first: all of them); the BatchNorm after it passes
   the fitted values through (running statistics those of the fitted output, weight
   ``sqrt(var + eps)``, bias the mean);
3. **readers**: the conv and linear layers after the stage output (those reading it, and
   up to ``reader_depth`` layers deep those reading theirs; never inside another converted
   stage) are refitted to reproduce the original's output of the same layer. This is what
   makes up for the bypass part; the classifier refitted to the original's logits is one
   case of it.

Last, every BatchNorm takes the statistics of the activations it now gets, its weight and
bias rescaled so that eval mode computes the same (``stabilise_norms``): in train mode,
as fine-tuning runs it, the calibrated model then computes what it does in eval mode.

A least-squares fit is ridge-regularised toward the layer's current weights (the
original's, where it had them) and is kept only where it lowers the layer's error. Convs
are fitted through ``F.unfold`` (im2col); a grouped or depthwise conv is one small problem
per group, solved together. Each pass over
the images starts where the stage starts: both models' values up to the stage's base are
read once per stage and every later pass computes only what lies after it
(``cspify.replay``; beyond ``replay.CACHE_BYTES`` of cached values, whole passes). The original
is traced as ``convert`` traced it (same leaf modules), so the record's node names find
the stage outputs in both graphs; with a ``scope`` conversion the images are the whole
model's inputs and the stages live in the scoped submodule.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from cspify.batches import image_batches
from cspify.errors import ConfigError
from cspify.graph import cat_args, uncast
from cspify.lstsq import LeastSquares, features_of, fits, groups_of, outputs_of, rows_of, sample_rows, set_layer, targets_of
from cspify.ops import role_of
from cspify.record import CALIBRATE_KEY, Conversion, StageRecord, find_conversions, leave_step_record
from cspify.replay import Replay
from cspify.taps import Taps, module_nodes, node_named
from cspify.trace import device_of, eval_mode, traced_originals

__all__ = ["calibrate", "Calibration", "Fit", "stabilise_norms"]

MAX_ROWS = 1 << 17  # rows (images x positions) a least-squares fit reads at most
RIDGE = 1e-3  # ridge penalty, relative to the mean squared input feature
READER_DEPTH = 3  # how deep after a stage output layers are refitted: its readers (1), theirs (2), ...
PASSES = ("act", "norm", "identity")  # ops.role_of roles a partial transition may have after its layer



@dataclass
class Fit:
    """One least-squares fit: which layer, for which stage, and its relative residual
    (squared error over the target's variance; 0 is a perfect fit), before and after."""

    stage: str
    layer: str
    role: str  # "inner", "partial transition" or "reader"
    rows: int
    features: int
    error_after: float
    error_before: float | None = None


@dataclass
class Calibration:
    """What ``calibrate`` did."""

    images: int
    seconds: float
    norms: list[str] = field(default_factory=list)
    fits: list[Fit] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    stabilised: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(
    original: nn.Module,
    converted: nn.Module,
    images,
    *,
    max_images: int = 2048,
    batch_size: int = 256,
    norms: bool = True,
    inner: bool = True,
    transitions: bool = True,
    readers: bool = True,
    stable: bool = True,
    reader_depth: int = READER_DEPTH,
    ridge: float = RIDGE,
    seed: int = 0,
    progress: bool = False,
) -> nn.Module:
    """Fit ``converted`` (made by ``cspify.convert(original, ...)``) to ``original`` on
    unlabeled ``images``, in place; returns ``converted``.

    ``images`` is a tensor (N, C, H, W), a Dataset (a seeded random subset is read), or an
    iterable of batches: tensors, or tuples/lists whose first item is the input. At most
    ``max_images`` are used, ``batch_size`` at a time, on the device ``converted`` is on.

    The steps (see the module docstring) can be switched off one by one: ``inner`` (the
    partial stage's layers), ``norms`` (its other BatchNorms), ``transitions``, ``readers``
    (``reader_depth`` layers deep) and ``stable`` (the last, function-preserving step).
    ``ridge`` scales the penalty toward the current weights (relative to the mean squared
    input feature). ``progress`` shows a bar over the stages (tqdm, on stderr: a count and
    an ETA). The record of what was done is left at
    ``meta["cspify.calibrate"]`` of the converted GraphModule (the scoped one with a scope).
    """
    start = time.perf_counter()
    device = device_of(converted)
    batches = [b.to(device) for b in image_batches(images, max_images, batch_size, seed)]
    result = Calibration(images=sum(len(b) for b in batches), seconds=0.0)
    # the conversion, then each part converted inside a module tracing kept whole (cspify.parts)
    conversions = find_conversions(converted)
    teacher, graphs = traced_originals(original, batches[0][:1], conversions, device)
    jobs = [_planned(_Job(converted, converted.get_submodule(scope) if scope else converted, teacher, graph, batches,
                          ridge, result, scope if i else ""), record, transitions, inner, norms, readers, reader_depth)
            for i, ((scope, record), graph) in enumerate(zip(conversions, graphs))]
    for job, work in jobs:  # before anything is fitted: refused whole, or done
        fitted = [n for _, found, layers, _, reading in work
                  for n in ([found.conv] if found is not None else []) + [layer.node for layer in (*layers, *reading)]]
        _check_enough(job.part, fitted, result.images)
    with eval_mode(converted):
        for job, work in jobs:
            for stage, found, layers, names, reading in _bar(work, progress):
                job.start(stage)
                _fit_layers(job, stage, layers, names)
                if found is not None:
                    _fit_transition(job, stage, found)
                _fit_layers(job, stage, reading)
        if stable:
            result.stabilised = stabilise_norms(converted, jobs[0][0].part, batches)  # the parts lie inside it
    result.seconds = round(time.perf_counter() - start, 3)
    leave_step_record(converted, CALIBRATE_KEY, result)
    return converted


def _planned(job: _Job, record: Conversion, transitions: bool, inner: bool, norms: bool, readers: bool,
             reader_depth: int) -> tuple[_Job, list]:
    """One conversion's job and, per stage in graph order, its work: (stage, its transition,
    its layers, its norms, the layers reading it), found before anything is fitted."""
    part, teacher_part, result = job.part, job.teacher_part, job.result
    stages = sorted(record.converted, key=_position(part))
    elsewhere = {n for s in stages for n in (*s.nodes, *s.added)}
    work = []
    for stage in stages:
        found = _transition_of(part, stage, record) if transitions else None
        if isinstance(found, str):
            result.skipped.append(f"{job.stage_name(stage)}: {found}")
            found = None
        layers = _inner_layers(part, teacher_part, stage) if inner else []
        layers = [layer for layer in layers if found is None or layer.node is not found.conv]
        refit = {layer.node.name for layer in layers}
        names = [n for n in _stage_norms(part, stage) if not _follows(part, n, refit)] if norms else []
        reading = _readers(part, teacher_part, stage.converted_output, reader_depth,
                           elsewhere - set(stage.nodes) - set(stage.added)) if readers else []
        work.append((stage, found, layers, names, reading))
    theirs = module_nodes(teacher_part)
    for fusion in record.fusions:  # each Maxout-compressed pyramid conv, refitted to the original's (cspify.pyramid)
        if fusion.conv in elsewhere:
            continue  # a stage's layer (its first conv, its transition): fitted with its stage
        where = StageRecord(name=f"pyramid {fusion.module}", kind="pyramid", channels=fusion.channels, converted=True,
                            base=fusion.cat, converted_output=fusion.conv)
        layer = _Layer(node_named(part, fusion.conv), theirs[fusion.module][0].name, None, "pyramid")
        work.append((where, None, [layer], [], []))
    position = _position(part)
    return job, sorted(work, key=lambda item: position(item[0]))


def _check_enough(gm: fx.GraphModule, nodes: list[fx.Node], images: int) -> None:
    """A ConfigError where some layer to fit would get fewer rows (output positions over
    the images) than it has features: its least squares would be underdetermined."""
    worst, which = 0, ""
    for node in nodes:
        layer = gm.get_submodule(node.target)
        dims = node.meta["tensor_meta"].shape
        positions = math.prod(dims[1:-1]) if isinstance(layer, nn.Linear) else math.prod(dims[2:])
        need = math.ceil((features_of(layer) + 1) / max(positions, 1))
        if need > worst:
            worst, which = need, node.target
    if images < worst:
        raise ConfigError(f"calibration fits {which} by least squares, which needs at least {worst} images and got "
                          f"{images}.", f"give {worst} or more images (max_images, --calibration-images), "
                                        "or fine-tune without calibrating")


def _bar(stages: list, shown: bool):
    if not shown:
        return stages
    from tqdm.auto import tqdm

    return tqdm(stages, desc="calibrating", unit="stage", leave=False, dynamic_ncols=True, mininterval=0)  # a stage is slow: show each


@dataclass
class _Job:
    """Both models as calibration runs them: the whole model to call, the GraphModule whose
    nodes the record names (the scoped part with a scope), each instrumented once."""

    student: nn.Module
    part: fx.GraphModule
    teacher: nn.Module
    teacher_part: fx.GraphModule
    batches: list[torch.Tensor]
    ridge: float
    result: Calibration
    where: str = ""  # a part's path in the whole model (cspify.parts): its stages and layers are named with it

    def __post_init__(self) -> None:
        self.mine = Replay(self.student, self.part, Taps(self.part))
        self.theirs = Replay(self.teacher, self.teacher_part, Taps(self.teacher_part))

    def stage_name(self, stage: StageRecord) -> str:
        return f"{self.where}:{stage.name}" if self.where else stage.name

    def layer_name(self, node: fx.Node) -> str:
        return f"{self.where}.{node.target}" if self.where else node.target

    def start(self, stage: StageRecord) -> None:
        """Each model's values up to the stage's base, read once: the stage's passes start there."""
        self.mine.start(stage.base, self.batches)
        self.theirs.start(stage.base, self.batches)

    def passes(self, mine: list[str], theirs: list[str], changing: list[str]):
        """Per batch: the converted model's values of nodes ``mine`` and the original's of
        ``theirs``, with the layers ``changing`` about to be refitted."""
        self.mine.keep_for(changing)
        for i, x in enumerate(self.batches):
            yield self.mine.values(i, x, mine), (self.theirs.values(i, x, theirs) if theirs else {})


def _position(gm: fx.GraphModule):
    order = {node.name: i for i, node in enumerate(gm.graph.nodes)}
    return lambda stage: order.get(stage.converted_output, len(order))


# ---------------------------------------------------------------- norm statistics


def _stage_norms(gm: fx.GraphModule, stage: StageRecord) -> list[str]:
    inside = set(stage.nodes)
    return [node.name for node in gm.graph.nodes if node.op == "call_module" and node.name in inside
            and isinstance(gm.get_submodule(node.target), _BatchNorm)
            and gm.get_submodule(node.target).track_running_stats]


def _follows(gm: fx.GraphModule, name: str, layers: set[str]) -> bool:
    """True when the node ``name`` reads the output of one of ``layers`` directly: a norm
    after a layer refitted to the original's output keeps the original's statistics."""
    return any(arg.name in layers for arg in node_named(gm, name).all_input_nodes)


def stabilise_norms(model: nn.Module, gm: nn.Module, batches) -> int:
    """Give every affine BatchNorm of ``gm`` the running statistics of the inputs it now
    gets (an eval-mode pass of ``model``), rescaling its weight and bias so that what it
    computes in eval mode does not change; returns how many. Fitted layers leave norms whose
    statistics describe the original's activations, not their own: in train mode (batch
    statistics) such a model would compute something else, and fine-tuning would start
    from a worse model than the calibrated one."""
    norms = [m for m in gm.modules() if isinstance(m, _BatchNorm) and m.track_running_stats and m.affine]
    sums: dict[nn.Module, list] = {}

    def record(module, args):
        x = args[0].detach().double()
        dims = [d for d in range(x.ndim) if d != 1]
        entry = sums.setdefault(module, [0, 0.0, 0.0])
        entry[0] += x.numel() // x.shape[1]
        entry[1] = entry[1] + x.sum(dims)
        entry[2] = entry[2] + x.square().sum(dims)

    handles = [m.register_forward_pre_hook(record) for m in norms]
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    for m, (n, total, squares) in sums.items():
        if n < 2:
            continue
        mean = total / n
        var = ((squares - n * mean.square()) / (n - 1)).clamp_min(0)
        old = (m.running_var.double() + m.eps).sqrt()
        new = (var + m.eps).sqrt()
        weight = m.weight.detach().double()
        m.bias.copy_((m.bias.double() + weight * (mean - m.running_mean.double()) / old).to(m.bias.dtype))
        m.weight.copy_((weight * new / old).to(m.weight.dtype))
        m.running_mean.copy_(mean.to(m.running_mean.dtype))
        m.running_var.copy_(var.to(m.running_var.dtype))
    return len(sums)


# ---------------------------------------------------------------- partial transitions


@dataclass
class _Transition:
    """A stage's partial transition as least squares sees it: the conv (or, on a
    channels-last stream, linear) layer to fit, the BatchNorm after it (None: none), and
    where its channels lie in the original's stage output: the axis, and the first of them
    (fusion last: the bypass width; fusion first: 0), or each one's position (``index``:
    where every channel kept its place, ``StageRecord.output_index``)."""

    conv: fx.Node
    norm: nn.Module | None
    axis: int
    start: int
    index: tuple[int, ...] | None = None

    def of(self, output: torch.Tensor, width: int) -> torch.Tensor:
        """The channels of the original's stage output that the transition produces."""
        if self.index is None:
            return output.narrow(self.axis, self.start, width)
        return output.index_select(self.axis, torch.tensor(self.index, device=output.device))


def _transition_of(gm: fx.GraphModule, stage: StageRecord, record: Conversion) -> _Transition | str | None:
    """The partial transition to fit, a reason why it cannot be, or None where there is none
    (fusion first without a new transition: the stage's own transition reads the concat)."""
    out = uncast(node_named(gm, stage.converted_output))
    rank = len(out.meta["tensor_meta"].shape)
    concat = out.op == "call_function" and out.target is torch.cat
    if (stage.fusion or record.config.fusion) == "last":
        if not concat:
            return "its output is not a concat"
        parts, dim = cat_args(out)
        through, axis, start = _joined(parts, stage), dim % rank, stage.bypass_channels
    elif concat:
        return None
    else:
        through, axis, start = out, None, 0
    chain, node = [], through  # from the transition's output back to its layer: norms and activations
    while role_of(node, gm) not in ("conv", "linear") or node.op != "call_module":
        if role_of(node, gm) not in PASSES or not node.args or not isinstance(node.args[0], fx.Node):
            return f"its partial transition is not a conv, norm and activation ({node.name})"
        chain.append(node)
        node = node.args[0]
    layer = gm.get_submodule(node.target)
    own_axis = rank - 1 if isinstance(layer, nn.Linear) else 1
    if axis is not None and axis != own_axis:
        return f"its partial transition {node.target} does not act on the axis of its channels"
    norms = [n for n in chain if role_of(n, gm) == "norm"]
    if not fits(layer) or len(norms) > 1 or (norms and (norms[0] is not chain[-1] or own_axis != 1
                                                       or not _settable(gm.get_submodule(norms[0].target)))):
        return f"its partial transition {node.target} cannot be fitted by least squares"
    return _Transition(node, gm.get_submodule(norms[0].target) if norms else None, own_axis, start,
                       stage.output_index)


def _joined(parts, stage: StageRecord) -> fx.Node:
    """The partial transition's output among a fusion-last concat's parts: the last part, or,
    where every channel kept its place (runs of the base and of it, narrowed), the node the
    stage added that those runs narrow."""
    if stage.output_index is None:
        return parts[-1]
    return next(p.args[0] for p in parts if p.args[0].name in stage.added)


def _settable(norm: nn.Module) -> bool:
    """A norm that can be set to pass values through: a BatchNorm, affine, with running statistics."""
    return isinstance(norm, _BatchNorm) and norm.affine and norm.track_running_stats


def _fit_transition(job: _Job, stage: StageRecord, found: _Transition) -> None:
    """Least squares from the conv's input to the original stage output's channels it
    produces; the BatchNorm after it is set to pass the fitted values through."""
    conv_node, norm = found.conv, found.norm
    conv = job.part.get_submodule(conv_node.target)
    width = outputs_of(conv)
    intercept = norm is not None or conv.bias is not None
    features = rows_of(conv, torch.zeros(1, *conv_node.args[0].meta["tensor_meta"].shape[1:], device=conv.weight.device))
    solver = LeastSquares(features.shape[1], width, intercept=True, device=conv.weight.device)
    generator = torch.Generator().manual_seed(0)
    cap = max(1, MAX_ROWS // len(job.batches))
    source = conv_node.args[0].name
    for mine, theirs in job.passes([source], [stage.output], [conv_node.name]):
        rows = rows_of(conv, mine[source])
        target = targets_of(conv, found.of(theirs[stage.output], width))
        pick = sample_rows(len(rows), cap, generator, rows.device)
        solver.add(rows if pick is None else rows[pick], target if pick is None else target[pick])
    mean_x, second = solver.input_moments()  # before dropping the intercept column
    if not intercept:
        solver = solver.without_intercept()
    weight, bias = solver.solve(job.ridge)
    if norm is not None:  # norm(W x) = W x + b: statistics of W x, weight sqrt(var + eps), bias mean + b
        mean = weight @ mean_x
        var = (((weight @ second) * weight).sum(1) - mean.square()).clamp_min(1e-6)
        set_layer(conv, weight, None)
        norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
        norm.running_var.copy_(var.to(norm.running_var.dtype))
        norm.weight.copy_((var + norm.eps).sqrt().to(norm.weight.dtype))
        norm.bias.copy_((mean + bias).to(norm.bias.dtype))
    else:
        set_layer(conv, weight, bias)
    job.result.fits.append(Fit(job.stage_name(stage), job.layer_name(conv_node), "partial transition", solver.rows,
                               solver.features, round(solver.error(weight, bias), 5)))


# ---------------------------------------------------------------- layers refitted to the original's outputs


@dataclass
class _Layer:
    """A conv or linear node of the converted graph to refit to the original's output of the
    same module (node ``target`` of the traced original), on the output channels ``keep``."""

    node: fx.Node
    target: str
    keep: tuple[int, ...] | None
    role: str


def _inner_layers(gm, teacher_gm, stage: StageRecord) -> list[_Layer]:
    """The convs and linears inside a narrowed stage, each with the output channels it keeps."""
    theirs = module_nodes(teacher_gm)
    inside, layers = set(stage.nodes), []
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.name not in inside or len(theirs.get(node.target, ())) != 1:
            continue
        module = gm.get_submodule(node.target)
        if not fits(module) or type(module) is not type(teacher_gm.get_submodule(node.target)):
            continue
        narrowing = stage.narrowing(node.name)
        keep = narrowing.out_keep if narrowing is not None else None
        if outputs_of(module) != (len(keep) if keep is not None else outputs_of(teacher_gm.get_submodule(node.target))):
            continue  # the plan and the layer disagree: leave it
        layers.append(_Layer(node, theirs[node.target][0].name, keep, "inner"))
    return layers


def _readers(gm: fx.GraphModule, teacher_gm: fx.GraphModule, start: str, depth: int,
             stop: set[str]) -> list[_Layer]:
    """The conv/linear layers downstream of node ``start``: those reading it (through any
    op but another layer), then, up to ``depth`` layers deep, those reading their outputs;
    never into the nodes ``stop`` (other converted stages, fitted with their own stage).
    Only layers the original has under the same name and shape, called once, qualify."""
    mine, theirs = module_nodes(gm), module_nodes(teacher_gm)
    found, level, after = [], {start: 0}, False
    for node in gm.graph.nodes:
        after = after or node.name == start
        levels = [level[a.name] for a in node.all_input_nodes if a.name in level]
        if not after or not levels or node.name in stop or node.op == "output":
            continue
        d = min(levels)
        if node.op == "call_module" and role_of(node, gm) in ("conv", "linear"):
            module = gm.get_submodule(node.target)
            if (fits(module) and len(mine[node.target]) == 1 and len(theirs.get(node.target, ())) == 1
                    and _same_layer(module, teacher_gm.get_submodule(node.target))):
                found.append(_Layer(node, theirs[node.target][0].name, None, "reader"))
            d += 1
        if d < depth:
            level[node.name] = d
    return found


def _same_layer(a: nn.Module, b: nn.Module) -> bool:
    return type(a) is type(b) and a.weight.shape == b.weight.shape and (a.bias is None) == (b.bias is None)


def _fit_layers(job: _Job, stage: StageRecord, layers: list[_Layer], norms: list[str] = ()) -> None:
    """Refit ``layers`` and re-estimate the BatchNorms at nodes ``norms``, each once all of
    those it reads from are done: one pass over the images per wave."""
    items = [layer.node for layer in layers] + [node_named(job.part, n) for n in norms]
    ancestors = {node.name: _ancestors(node) for node in items}
    by_node = {layer.node.name: layer for layer in layers}
    waiting = list(items)
    while waiting:
        wave = [a for a in waiting if not any(b.name in ancestors[a.name] for b in waiting if b is not a)]
        waiting = [a for a in waiting if a not in wave]
        _fit_wave(job, stage, [by_node[n.name] for n in wave if n.name in by_node],
                  [n.name for n in wave if n.name not in by_node])


def _ancestors(node: fx.Node) -> set[str]:
    found, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n.name not in found:
            found.add(n.name)
            todo += n.all_input_nodes
    return found


def _fit_wave(job: _Job, stage: StageRecord, wave: list[_Layer], norms: list[str]) -> None:
    """One pass over the images: the wave's layers' inputs and the original's outputs of
    them feed their least squares, and the BatchNorms ``norms`` estimate their statistics."""
    gm, result = job.part, job.result
    modules = {a.node.name: gm.get_submodule(a.node.target) for a in wave}
    follow = {a.node.name: _norm_after(gm, a.node) for a in wave}
    solvers = {}
    for a in wave:
        module = modules[a.node.name]
        intercept = module.bias is not None or follow[a.node.name] is not None
        solvers[a.node.name] = LeastSquares(features_of(module), outputs_of(module), intercept, module.weight.device,
                                            groups=groups_of(module))
    sources = {a.node.name: a.node.args[0].name for a in wave}
    keeps = {a.node.name: torch.tensor(a.keep, device=device_of(gm)) if a.keep is not None else None for a in wave}
    generator = torch.Generator().manual_seed(0)
    cap = max(1, MAX_ROWS // len(job.batches))
    estimating = [gm.get_submodule(node_named(gm, n).target) for n in norms]
    saved = [(m.momentum, m.training) for m in estimating]
    try:
        for m in estimating:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        changing = [a.node.name for a in wave] + list(norms)
        for mine, theirs in job.passes([*sources.values(), *norms], [a.target for a in wave], changing):
            for a in wave:
                module, keep = modules[a.node.name], keeps[a.node.name]
                rows = rows_of(module, mine[sources[a.node.name]])
                y = theirs[a.target]
                if keep is not None:
                    y = y.index_select(-1 if isinstance(module, nn.Linear) else 1, keep)
                target = targets_of(module, y)
                pick = sample_rows(len(rows), cap, generator, rows.device)
                solvers[a.node.name].add(rows if pick is None else rows[pick], target if pick is None else target[pick])
    finally:
        for m, (momentum, training) in zip(estimating, saved):
            m.momentum, m.training = momentum, training
    result.norms += [job.layer_name(node_named(gm, n)) for n in norms]
    for a in wave:
        module, solver, norm = modules[a.node.name], solvers[a.node.name], follow[a.node.name]
        current = module.weight.reshape(module.weight.shape[0], -1).double()
        before = solver.error(current, module.bias.double() if module.bias is not None else None)
        weight, bias = solver.solve(job.ridge, prior=current)
        after = solver.error(weight, bias)
        if not after < before:  # the fit would only lose: keep the layer as it is
            result.skipped.append(f"{job.stage_name(stage)}: refitting {job.layer_name(a.node)} would not lower its "
                                  f"error ({before:.4f})")
            continue
        if module.bias is not None:
            set_layer(module, weight, bias)
        else:
            set_layer(module, weight, None)
            if bias is not None:  # y + b through BatchNorm(y) = BatchNorm with its mean moved by -b
                norm.running_mean.sub_(bias.to(norm.running_mean.dtype))
        result.fits.append(Fit(job.stage_name(stage), job.layer_name(a.node), a.role, solver.rows, solver.features,
                               round(after, 5), round(before, 5)))


def _norm_after(gm: fx.GraphModule, node: fx.Node):
    """The BatchNorm (eval statistics) that alone reads ``node``, where an intercept can go."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    module = gm.get_submodule(users[0].target)
    return module if isinstance(module, _BatchNorm) and module.track_running_stats else None
