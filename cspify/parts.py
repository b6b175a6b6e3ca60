"""Parts: the traceable submodules of a module that tracing keeps whole, each converted on
its own, as ``--scope`` would convert it.

    csp = cspify.convert(yolo, x)          # ultralytics' Detect head is kept whole by tracing
    conversion_of(csp).parts               # ('model.28.cv2.0', 'model.28.cv3.0', ...): its towers
    find_conversions(csp)                  # the conversion, then each part's own record

torch.fx cannot trace a module whose forward branches on a tensor (a detector's head that
decodes its boxes in eval mode), so ``convert`` keeps it whole. Its children may still trace:
each child the model calls is converted alone, fed what it receives when the whole model
runs; a child that is never called (a ``ModuleList``) or that does not trace is looked into
in turn. A child the model calls several times (a head tower shared by the pyramid levels)
converts once for all its calls. A part whose conversion leaves the whole model failing to
run, or changes its output shapes, is put back as it was, with a note.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn as nn

from cspify.config import CSPConfig
from cspify.errors import CspifyError
from cspify.host import keep_host_attributes
from cspify.record import attach, conversion_of
from cspify.trace import capture_inputs, eval_mode


def convert_parts(model: nn.Module, inputs: tuple, converted: nn.Module, kept: list[str], config: CSPConfig,
                  seed: int, convert: Callable) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Convert the traceable parts of every module in ``kept`` (paths in ``model``) and put
    each into ``converted`` in place of its copy there: (the parts' paths, a note for each
    module looked into). ``convert`` is ``cspify.convert``; the stage filter and per-stage
    options name stages of the model itself, so the parts run with ``config`` without them."""
    config = replace(config, stages=None, stage_gammas=(), stage_hidden=())
    expected = _output_shapes(converted, inputs)
    parts, notes = [], []
    for path in kept:
        found, failed = [], []
        for name, part in _parts_of(model, inputs, path, config, seed, convert):
            parent, _, child = name.rpartition(".")
            holder = converted.get_submodule(parent)
            before = getattr(holder, child)
            setattr(holder, child, part)
            if _output_shapes(converted, inputs) == expected:
                found.append(name)
            else:
                setattr(holder, child, before)
                failed.append(name)
        parts += found
        if found:
            stages = sum(len(conversion_of(converted.get_submodule(n)).converted) for n in found)
            notes.append(f"inside '{path}', which tracing keeps whole, {_quoted(found)} converted on "
                         f"{'its' if len(found) == 1 else 'their'} own ({stages} stage{'s' * (stages != 1)})")
        if failed:
            notes.append(f"inside '{path}', {_quoted(failed)} left as {'it was' if len(failed) == 1 else 'they were'}: "
                         "the whole model's outputs changed shape or it failed to run with it converted")
    return tuple(parts), tuple(notes)


def _parts_of(model: nn.Module, inputs: tuple, path: str, config: CSPConfig, seed: int,
              convert: Callable) -> list[tuple[str, nn.Module]]:
    """(path, converted part) for the children of the module at ``path`` that convert; a
    child that is never called or does not trace is looked into in turn."""
    found = []
    for name, child in model.get_submodule(path).named_children():
        where = f"{path}.{name}"
        try:
            part, part_inputs = capture_inputs(model, inputs, where)
            csp = convert(part, part_inputs, config=config, seed=seed, refuse_none=False)
        except CspifyError:  # never called (a container), called with keywords, or not traceable
            found += _parts_of(model, inputs, where, config, seed, convert)
            continue
        record = conversion_of(csp)
        if record is not None and record.converted:
            attach(csp, replace(record, scope=where))
            keep_host_attributes(child, csp)
            found.append((where, csp))
    return found


def _output_shapes(model: nn.Module, inputs: tuple) -> list | None:
    """The shapes of every tensor the model returns (None: it failed to run)."""
    try:
        with eval_mode(model), torch.no_grad():
            out = model(*inputs)
    except Exception:
        return None
    return [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _quoted(names: list[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return ", ".join(quoted[:-1]) + (" and " if len(quoted) > 1 else "") + quoted[-1]
