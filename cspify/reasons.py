"""Why stages were left, as a user reads it: modules named as the model names them, not by
their torch.fx node names, a reason's gist, and stages refused alike said once.

    names = module_names(traced.gm, model)   # {'layer1_0_conv1': "'layer1.0.conv1'", 'cat_1': "'cat' in 'model.2'"}
    readable("'model_0_act_2' is used 2 times", names)    # "'model.2.cv1.act' is used 2 times"
    gist("it is already ... block (its output joins 'getitem' in 'model.2', ...)")   # "it is already ... block"
    brief(reasons)          # each reason, or its gist where stages refused alike differ only in such details
    grouped([("layer1", "why"), ("layer2", "why"), ("layer3", "other")])    # 'layer1, layer2: why; layer3: other'

A module the model calls under several names (ultralytics' one SiLU shared by every Conv)
is named where it was called (``model.2.cv1.act``, not ``model.0.act``); an op is named by
what it is and the module whose forward calls it (``'cat' in 'model.2'``).
"""

from __future__ import annotations

import re

import torch.fx as fx
import torch.nn as nn

__all__ = ["module_names", "readable", "gist", "brief", "grouped"]

_QUOTED = re.compile(r"'([^' ]+)'")
_DETAIL = re.compile(r"\s*\([^()]*'[^()]*\)")  # a parenthesis that names nodes: the detail of a reason


def module_names(gm: nn.Module, root: nn.Module | None = None) -> dict[str, str]:
    """fx node name -> how a sentence names it, quoted: the module's dotted path, an op with
    the module whose forward calls it. ``root`` (the model traced) confirms the path a
    shared module was called at; without it, the paths torch.fx recorded are kept."""
    if not isinstance(gm, fx.GraphModule):
        return {}
    names = {}
    for node in gm.graph.nodes:
        paths = _called_at(node, root)
        if node.op == "call_module":
            names[node.name] = f"'{paths[-1] if paths else node.target}'"
        elif node.op in ("call_function", "call_method"):
            op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            names[node.name] = f"'{op}' in '{paths[-1]}'" if paths else f"'{op}'"
        elif node.op == "get_attr":
            names[node.name] = f"'{node.target}'"
    return names


def _called_at(node: fx.Node, root: nn.Module | None) -> list[str]:
    """The module paths the node was traced inside, outermost first, each shared module
    renamed to its name in the module that called it (where ``root`` has it so)."""
    stack = node.meta.get("nn_module_stack") or {}
    paths: list[str] = []
    for key, value in stack.items():
        path = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else str(key).split("@")[0]
        if paths and path and not path.startswith(paths[-1] + "."):
            there = f"{paths[-1]}.{path.rsplit('.', 1)[-1]}"
            if _same_module(root, there, path):
                path = there
        paths.append(path)
    return [p for p in paths if p]


def _same_module(root: nn.Module | None, a: str, b: str) -> bool:
    if root is None:
        return False
    try:
        return root.get_submodule(a) is root.get_submodule(b)
    except AttributeError:
        return False


def readable(text: str, names: dict[str, str]) -> str:
    """``text`` with each quoted fx node name (``'layer1_0_conv1'``) written as ``names`` says."""
    return _QUOTED.sub(lambda m: names.get(m.group(1), m.group(0)), text) if names else text


def gist(reason: str) -> str:
    """``reason`` without its parenthesised details that name nodes (which concat, which
    split): what stages refused alike have in common."""
    return _DETAIL.sub("", reason)


def brief(reasons: list[str]) -> list[str]:
    """Each reason as a short account says it: its gist where another reason has the same
    gist but other details (ten stages, each inside its own CSP block: said once), else
    the reason whole (a detail that is the only one of its kind says what went wrong)."""
    details: dict[str, set[str]] = {}
    for reason in reasons:
        details.setdefault(gist(reason), set()).add(reason)
    return [gist(reason) if len(details[gist(reason)]) > 1 else reason for reason in reasons]


def grouped(reasons: list[tuple[str, str]], groups: int = 3, names: int = 4) -> str:
    """``(stage, reason)`` pairs as one clause per reason, its stages named once (at most
    ``names`` of them, then how many more), the ``groups`` most common reasons first and
    the rest counted."""
    by_reason: dict[str, list[str]] = {}
    for stage, reason in reasons:
        by_reason.setdefault(reason, []).append(stage)
    ordered = sorted(by_reason.items(), key=lambda item: -len(item[1]))  # stable: first seen first on a tie
    clauses = [f"{_named(stages, names)}: {reason}" for reason, stages in ordered[:groups]]
    rest = ordered[groups:]
    if rest:
        count = sum(len(stages) for _, stages in rest)
        clauses.append(f"{count} more stage{'s' if count > 1 else ''} for {len(rest)} other "
                       f"reason{'s' if len(rest) > 1 else ''}")
    return "; ".join(clauses)


def joined(items: list[str]) -> str:
    """``a, b and c``."""
    return ", ".join(items[:-1]) + (" and " if len(items) > 1 else "") + items[-1]


def _named(stages: list[str], most: int) -> str:
    if len(stages) <= most:
        return ", ".join(stages)
    return f"{', '.join(stages[:most])} and {len(stages) - most} more"
