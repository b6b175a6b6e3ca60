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

import torch.nn as nn

from cspify.config import CSPConfig
from cspify.errors import CspifyError
from cspify.host import keep_host_attributes
from cspify.record import attach, conversion_of
from cspify.reasons import joined
from cspify.trace import captured_inputs, eval_mode
from cspify.verify import outputs


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
    child that is never called or does not trace is looked into in turn. What every module
    inside receives is captured in one run of the model."""
    inside = [f"{path}.{name}" for name, _ in model.get_submodule(path).named_modules() if name]
    received = captured_inputs(model, inputs, inside)

    def look_into(where: str) -> list[tuple[str, nn.Module]]:
        found = []
        for name, child in model.get_submodule(where).named_children():
            child_path = f"{where}.{name}"
            csp = None
            if received[child_path] is not None:  # called, with positional inputs
                try:
                    csp = convert(child, received[child_path], config=config, seed=seed, refuse_none=False)
                except CspifyError:  # it does not trace
                    pass
            record = conversion_of(csp) if csp is not None else None
            if record is None:
                found += look_into(child_path)
            elif record.converted:
                attach(csp, replace(record, scope=child_path))
                keep_host_attributes(child, csp)
                found.append((child_path, csp))
        return found

    return look_into(path)


def _output_shapes(model: nn.Module, inputs: tuple) -> list | None:
    """The shapes of every tensor the model returns (None: it failed to run)."""
    try:
        with eval_mode(model):
            return [tuple(t.shape) for t in outputs(model(*inputs))]
    except Exception:
        return None


def _quoted(names: list[str]) -> str:
    return joined([f"'{n}'" for n in names])
