"""Is a converted model a drop-in replacement for the original? The checks the zoo matrix,
the fuzz tests and the family tests run on every conversion.

    problems = drop_in_problems(model, csp, torch.randn(2, 3, 64, 64))
    assert not problems, problems      # [] when every check passed

Checks: the outputs keep their structure, shapes and dtypes (eval mode); forward and
backward run in train and in eval mode; the converted model traces again with cspify's
tracer. Both models are left in eval mode with no gradients; neither is otherwise changed.
(Whether it is cheaper is the report's business: ``cspify.compare``.)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cspify.trace import Tracer, as_inputs


def outputs(result) -> list[torch.Tensor]:
    """The tensors of a model's output, whatever nesting of tuples, lists and dicts holds them."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in outputs(v)]
    if isinstance(result, (list, tuple)):
        return [t for v in result for t in outputs(v)]
    return []


def drop_in_problems(original: nn.Module, converted: nn.Module, example_inputs) -> list[str]:
    """Every way ``converted`` fails to stand in for ``original`` on these inputs, one sentence each."""
    inputs = as_inputs(example_inputs)
    problems = []
    original.eval()
    converted.eval()
    with torch.no_grad():
        want = [(tuple(t.shape), t.dtype) for t in outputs(original(*inputs))]
        got = [(tuple(t.shape), t.dtype) for t in outputs(converted(*inputs))]
    if want != got:
        problems.append(f"outputs changed: {want} -> {got}")
    for training in (True, False):
        converted.train(training)
        try:
            sum(t.float().sum() for t in outputs(converted(*inputs))).backward()
        except Exception as error:  # any failure is a finding, not a crash of the check
            problems.append(f"backward in {'train' if training else 'eval'} mode fails: {type(error).__name__}: {error}")
        converted.zero_grad(set_to_none=True)
    converted.eval()
    try:
        Tracer().trace(converted)
    except Exception as error:
        problems.append(f"the converted model no longer traces: {type(error).__name__}: {error}")
    return problems
