"""Writing a converted model out: readable source with its weights, ONNX.

    write_source(gm, "resnet_csp")        # model.py + weights.pt + __init__.py, needs only torch
    write_onnx(gm, inputs, "model.onnx")  # torch.onnx.export, checked by onnx.checker

    with Outputs() as out:                # cspify.files: all written, or none
        out.folder("resnet_csp", lambda d: write_source(gm, d))
        out.path("model.onnx", lambda tmp: write_onnx(gm, inputs, tmp), suffix=".onnx")

The exported folder loads in a process where cspify is not installed:

    import importlib.util
    spec = importlib.util.spec_from_file_location("csp_model", "resnet_csp/model.py")
    module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
    model = module.load()                 # weights.pt via torch.load(weights_only=True)

Only models built from torch.nn layers (the layers cspify converts, and whatever the fx
graph calls as a function) can be written as source; a model with a custom layer kept
whole raises ExportError naming the layer, and ``-o`` (torch.save) or ``--onnx`` remain.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn

from cspify.errors import CspifyError, OutputError

MODEL_FILE, WEIGHTS_FILE = "model.py", "weights.pt"


class ExportError(OutputError):
    """The converted model cannot be written in the format asked for."""


# ---------------------------------------------------------------- readable source


def write_source(gm: nn.Module, folder: str, class_name: str | None = None) -> None:
    """Write ``model.py`` (the model's class, its ``load()``), ``weights.pt`` and ``__init__.py``."""
    source = source_of(gm, class_name)
    folder_path = Path(folder)
    (folder_path / MODEL_FILE).write_text(source)
    (folder_path / "__init__.py").write_text("from .model import *  # noqa: F401,F403\n")
    state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    torch.save(state, folder_path / WEIGHTS_FILE)


def source_of(gm: nn.Module, class_name: str | None = None) -> str:
    """The Python source of ``gm``: torch.nn layers by constructor, forward from the fx graph.

    Raises ExportError when some part can only be pickled (a custom layer, a function the
    graph calls that lives in an unimportable file, a non-fx model).
    """
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(
            f"a {type(gm).__name__} cannot be written as source, only a torch.fx GraphModule can.",
            "convert the whole model (without --scope) for --export-dir, or save it with -o or --onnx",
        )
    name = class_name or _identifier(f"{type(gm).__name__}CSP")
    code = gm.graph.python_code(root_module="self")
    used = {k: v for k, v in code.globals.items() if re.search(rf"\b{re.escape(k)}\b", code.src)}
    imports = _imports(used)
    init = list(_init_lines(gm))
    forward = "\n".join(("    " + line) if line.strip() else "" for line in code.src.strip("\n").splitlines())
    return _TEMPLATE.format(
        origin=type(gm).__name__,
        torch_version=torch.__version__,
        imports="\n".join(imports),
        name=name,
        init="\n".join("        " + line for line in init) or "        pass",
        forward=forward,
        weights=WEIGHTS_FILE,
    )


_TEMPLATE = '''"""The CSP version of {origin}, written by cspify (torch {torch_version}); needs only torch.

    model = load()   # the converted weights, from {weights} beside this file (weights_only=True)
    model = {name}()   # the same layers, freshly initialised

The layers are built in __init__ and the forward is the torch.fx graph of the converted
model as Python; edit either as you would your own code.
"""

import os

import torch
import torch.nn as nn
{imports}

__all__ = ["{name}", "load"]


class {name}(nn.Module):
    def __init__(self):
        super().__init__()
{init}

{forward}


def load(weights=None, map_location="cpu"):
    """A {name} with the converted model's weights, in eval mode."""
    path = weights or os.path.join(os.path.dirname(os.path.abspath(__file__)), "{weights}")
    model = {name}()
    model.load_state_dict(torch.load(path, map_location=map_location, weights_only=True), assign=True)
    return model.eval()
'''


def _identifier(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in text)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"Model_{cleaned}"


def _imports(globals_: dict) -> list[str]:
    """Import lines for every global name the generated forward uses."""
    lines = []
    for name, obj in globals_.items():
        if name == "torch":
            continue
        lines.append(fx_builtin_import(name) or _import_line(name, obj))
    return sorted(set(lines))


def fx_builtin_import(name: str) -> str | None:
    """The import line of a name torch.fx's generated code uses without importing it
    (``inf``, ``nan``, ``NoneType``, ``device``, ...), or None for any other name.

    The one place cspify reads torch.fx's private ``_custom_builtins`` table;
    tests/test_export.py fails when upstream renames it or changes its entries.
    """
    from torch.fx.graph import _custom_builtins

    builtin = _custom_builtins.get(name)
    return builtin.import_str if builtin is not None else None


def _import_line(name: str, obj) -> str:
    if type(obj).__name__ == "module" and obj.__name__ in sys.modules and _importable(obj.__name__):
        return f"import {obj.__name__} as {name}" if obj.__name__ != name else f"import {name}"
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module and _importable(module) and qualname and "<" not in qualname and "." not in qualname:
        return f"from {module} import {qualname} as {name}" if qualname != name else f"from {module} import {name}"
    raise ExportError(
        f"the converted model calls {name} ({getattr(obj, '__module__', '?')}), which cannot be imported by name.",
        "move that function into an installed package, or save the model with -o or --onnx",
    )


def _importable(module: str) -> bool:
    """A module another process can import by name: not __main__, not a model file cspify ran."""
    return not (module == "__main__" or module.startswith("cspify_user_model_") or module.split(".")[0] == "cspify")


def _init_lines(gm: fx.GraphModule):
    """``self.add_module("a", nn.Module())``, ``self.a.add_module("0", nn.Conv2d(...))``, ... depth first."""
    yield from _tensor_lines("self", gm)
    yield from _children_lines("self", gm)


def _children_lines(owner: str, module: nn.Module):
    for child_name, child in module.named_children():
        ref = f"{owner}.{child_name}" if child_name.isidentifier() else f'getattr({owner}, "{child_name}")'
        if type(child) is nn.Module:  # the plain containers torch.fx builds
            yield f'{owner}.add_module("{child_name}", nn.Module())'
            yield from _tensor_lines(ref, child)
            yield from _children_lines(ref, child)
        else:
            yield f'{owner}.add_module("{child_name}", {_constructor(child, ref)})'


def _tensor_lines(ref: str, module: nn.Module):
    """Parameters and buffers that sit on a container (weights come from weights.pt)."""
    persistent = set(module.state_dict(keep_vars=True)) if module._buffers else set()
    for name, param in module.named_parameters(recurse=False):
        yield f'{ref}.register_parameter("{name}", nn.Parameter(torch.empty({tuple(param.shape)}, dtype={param.dtype}), requires_grad={param.requires_grad}))'
    for name, buf in module.named_buffers(recurse=False):
        if name not in persistent:
            raise ExportError(
                f"buffer {ref}.{name} is not saved in a state dict, so it cannot be written as weights.",
                "save the model with -o or --onnx",
            )
        yield f'{ref}.register_buffer("{name}", torch.empty({tuple(buf.shape)}, dtype={buf.dtype}))'


def _constructor(module: nn.Module, where: str) -> str:
    """``nn.Conv2d(3, 8, kernel_size=(3, 3), ...)`` from the layer's repr, checked by rebuilding it."""
    kind = type(module)
    text = repr(module)
    expression = f"nn.{text}"
    if getattr(nn, kind.__name__, None) is kind and "\n" not in text and _rebuilds(module, expression):
        return expression
    raise ExportError(
        f"layer {where.removeprefix('self.')} ({kind.__module__}.{kind.__name__}) cannot be written as source.",
        "only torch.nn layers can be written by --export-dir; save the model with -o or --onnx",
    )


def _rebuilds(module: nn.Module, expression: str) -> bool:
    """True when evaluating ``expression`` gives a layer of the same settings and tensor shapes."""
    try:
        built = eval(expression, {"nn": nn, "torch": torch, "inf": math.inf, "nan": math.nan})  # noqa: S307
    except Exception:
        return False
    if type(built) is not type(module):
        return False
    ours = {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}
    theirs = {k: (tuple(v.shape), v.dtype) for k, v in built.state_dict().items()}
    if set(ours) != set(theirs) or any(ours[k][0] != theirs[k][0] for k in ours):
        return False
    settings = [k for k in vars(module) if not k.startswith("_") and k != "training"]
    try:
        return all(k in vars(built) and bool(vars(built)[k] == vars(module)[k]) for k in settings)
    except Exception:  # a setting that does not compare: do not trust the rebuild
        return False


# ---------------------------------------------------------------- ONNX


def write_onnx(model: nn.Module, example_inputs: tuple, path: str) -> None:
    """``torch.onnx.export`` to ``path``: the torch.export-based exporter (needs onnxscript),
    else the TorchScript-based one; the file is checked with ``onnx.checker`` where onnx is installed."""
    model = model.eval()
    try:
        import onnxscript  # noqa: F401  the torch.export-based exporter needs it
        dynamo = True
    except ImportError:
        dynamo = False
    try:
        with torch.no_grad():
            if dynamo:
                program = torch.onnx.export(model, tuple(example_inputs), dynamo=True, verbose=False, optimize=True)
                program.save(path, external_data=False)
            else:
                torch.onnx.export(model, tuple(example_inputs), path, dynamo=False)
    except CspifyError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise ExportError(
            f"torch.onnx.export cannot export the converted model ({type(exc).__name__}: {first}).",
            "save it with -o or --export-dir instead",
        ) from exc
    try:
        import onnx
    except ImportError:
        return
    onnx.checker.check_model(path)
