"""Writing a converted model out: the whole module, readable source with its weights, ONNX.

    save_model(gm, "m.pt")                # torch.save, in a form torch.load reads without cspify
    write_source(gm, "resnet_csp")        # model.py + weights.pt + __init__.py, needs only torch
    write_onnx(gm, inputs, "model.onnx")  # torch.onnx.export with a dynamic batch axis, checked by onnx.checker
    write_onnx(gm, inputs, "model.onnx", dynamic_batch=False)   # the example inputs' shapes, fixed

    with Outputs() as out:                # cspify.files: all written, or none
        out.folder("resnet_csp", lambda d: write_source(gm, d))
        out.path("model.onnx", lambda tmp: write_onnx(gm, inputs, tmp), suffix=".onnx")
        out.path("m.pt", lambda tmp: save_model(gm, tmp), suffix=".pt")

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

import dataclasses
import enum
import math
import pickletools
import re
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

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


# ---------------------------------------------------------------- the whole module (-o)


def save_model(model: nn.Module, path: str) -> None:
    """``torch.save`` of ``model`` in a form that ``torch.load(path, weights_only=False)`` reads
    where cspify is not installed; ``model`` is as it was afterwards.

    Its GraphModules keep their code, layers, weights and attributes (a host framework's
    included), and are traced again by torch.fx's own Tracer when loaded; cspify's records
    (``meta``, ``loaded.meta["cspify"]`` the conversion) are saved as plain dicts and tuples,
    which ``cspify.conversion_of`` does not read. Classes and functions are pickled by name
    as torch.save does: the loading process needs the packages they come from, and a layer
    or function defined in a model file cspify ran (``cspify convert model.py``) is named
    after a module only that run had (``model_file_needs`` lists them). Raises ExportError,
    before anything is left at ``path``'s target, when the file would still need cspify.
    """
    with _detached_from_cspify(model):
        torch.save(model, path)
        found = _code_globals(model) | _pickled_globals(path)
    needed = sorted(f"{module}.{name}" for module, name in found if module.split(".")[0] == "cspify")
    if needed:
        raise ExportError(
            f"the saved model would need cspify to load ({', '.join(needed)}).",
            "save it with --export-dir or --onnx, which load with torch alone, and report this as a bug",
        )


def model_file_needs(model: nn.Module) -> list[str]:
    """The layers and functions of ``model`` defined in a model file cspify ran (each file runs
    as a module of its own, under a name only that process has): a file ``save_model`` writes
    loads in another process only where those are importable by that name."""
    found = _code_globals(model) | {(type(m).__module__, type(m).__qualname__) for m in model.modules()}
    return sorted(name for module, name in found if module.startswith("cspify_user_model_"))


_DETACHED = ("meta", "_tracer_cls", "_tracer_extras", "_deepcopy_hooks")  # what cspify leaves on a GraphModule
_NONE = object()


@contextmanager
def _detached_from_cspify(model: nn.Module):
    """Within: every GraphModule of ``model`` pickles without a reference to cspify (its
    records plain, torch.fx's Tracer, torch.fx's reduce); afterwards all is as it was."""
    saved = []
    try:
        for gm in (m for m in model.modules() if isinstance(m, fx.GraphModule)):
            kept = {key: gm.__dict__[key] for key in _DETACHED if key in gm.__dict__}
            saved.append((gm, kept, gm.graph._tracer_cls, type(gm).__dict__.get("__reduce__", _NONE)))
            _detach(gm)
        yield
    finally:
        for gm, kept, tracer, reduce in reversed(saved):
            for key in _DETACHED:
                gm.__dict__.pop(key, None)
            gm.__dict__.update(kept)
            gm.graph._tracer_cls = tracer
            if reduce is not _NONE:
                type(gm).__reduce__ = reduce
            elif type(gm).__dict__.get("__reduce__") is _reduce_standalone:
                del type(gm).__reduce__


def _detach(gm: fx.GraphModule) -> None:
    host = dict(gm.meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {}))
    gm.meta = {key: _plain(value) for key, value in gm.meta.items() if key != _USER_PRESERVED_ATTRIBUTES_KEY}
    if host:
        gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = host  # torch's deepcopy of the loaded module restores them
    gm._tracer_cls = None  # unpickling traces the code again with torch.fx's Tracer
    gm.graph._tracer_cls = None
    gm._tracer_extras = {}
    gm._deepcopy_hooks = [hook for hook in getattr(gm, "_deepcopy_hooks", []) if not _from_cspify(hook)]
    # Every GraphModule has a class of its own: this replaces cspify.host's reduce for this one only.
    type(gm).__reduce__ = _reduce_standalone


def _reduce_standalone(self: fx.GraphModule):
    """torch.fx's own reduce, with a state that ``nn.Module.__setstate__`` puts back: ``meta``
    (which torch.fx's unpickling leaves empty) and the host attributes (it skips a name that
    shadows a Module method, like ``type``)."""
    rebuild, args = fx.GraphModule.__reduce__(self)
    return rebuild, args, {"meta": self.meta, **self.meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {})}


def _plain(value):
    """``value`` as dicts, lists, tuples and scalars where it is a cspify record (a dataclass)."""
    if value is None or type(value) in (bool, int, float, str, bytes) or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        kind = type(value) if type(value) in (list, tuple, set, frozenset) else tuple
        return kind(_plain(v) for v in value)
    return repr(value) if _from_cspify(value) else value


def _from_cspify(obj) -> bool:
    module = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "")
    return str(module).split(".")[0] == "cspify"


def _code_globals(model: nn.Module) -> set[tuple[str, str]]:
    """(module, name) of what the import block of each GraphModule's pickled code imports."""
    found = set()
    for module in model.modules():
        if isinstance(module, fx.GraphModule):
            for key, obj in module.graph.python_code(root_module="self").globals.items():
                if type(obj).__name__ == "module":
                    found.add((obj.__name__, key))
                elif isinstance(getattr(obj, "__module__", None), str):
                    found.add((obj.__module__, getattr(obj, "__qualname__", key)))
    return found


def _pickled_globals(path: str) -> set[tuple[str, str]]:
    """(module, name) of each class and function the pickle in a torch.save file names
    (torch.save writes pickle protocol 2, where each is one GLOBAL "module name")."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return {tuple(arg.split(" ", 1)) for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


# ---------------------------------------------------------------- ONNX


def write_onnx(model: nn.Module, example_inputs: tuple, path: str, dynamic_batch: bool = True) -> None:
    """``torch.onnx.export`` to ``path``: the torch.export-based exporter (needs onnxscript),
    else the TorchScript-based one; the file is checked with ``onnx.checker`` where onnx is installed.

    With ``dynamic_batch`` (the default, ``--onnx``) the first axis of the tensor inputs is one
    dynamic axis, ``batch``: the file runs at any batch size. ``dynamic_batch=False``
    (``--onnx-static``) keeps the example inputs' shapes, batch size included.
    """
    model = model.eval()
    inputs = tuple(example_inputs)
    batched = _batched(inputs) if dynamic_batch else []
    try:
        import onnxscript  # noqa: F401  the torch.export-based exporter needs it
        dynamo = True
    except ImportError:
        dynamo = False
    try:
        with torch.no_grad():
            if dynamo:
                batch = torch.export.Dim("batch")
                shapes = tuple({0: batch} if i in batched else None for i in range(len(inputs))) if batched else None
                program = torch.onnx.export(model, inputs, dynamo=True, verbose=False, optimize=True, dynamic_shapes=shapes)
                program.save(path, external_data=False)
                _check_batch_is_dynamic(path, inputs, batched)
            else:
                names = [f"input_{i}" for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
                axes = {f"input_{i}": {0: "batch"} for i in batched} or None
                torch.onnx.export(model, inputs, path, dynamo=False, input_names=names, dynamic_axes=axes)
    except CspifyError:
        raise
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        if batched:
            raise ExportError(
                f"torch.onnx.export cannot export the converted model with a dynamic batch axis ({type(exc).__name__}: {first}).",
                "pass --onnx-static (write_onnx(..., dynamic_batch=False)) to keep the example inputs' batch size, "
                "or save it with -o or --export-dir",
            ) from exc
        raise ExportError(
            f"torch.onnx.export cannot export the converted model ({type(exc).__name__}: {first}).",
            "save it with -o or --export-dir instead",
        ) from exc
    try:
        import onnx
    except ImportError:
        return
    onnx.checker.check_model(path)


def _check_batch_is_dynamic(path: str, inputs: tuple, batched: list[int]) -> None:
    """An ExportError where the export kept a batched input's first axis fixed: torch.export
    specialises a dynamic axis the model fixes (a reshape to the example batch size) without
    saying so."""
    import onnx  # onnxscript, which the torch.export-based exporter needs, needs onnx

    graph_inputs = onnx.load(path, load_external_data=False).graph.input
    positions = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
    if len(graph_inputs) != len(positions):
        return  # not one graph input per tensor input: nothing to match them by
    for graph_input, position in zip(graph_inputs, positions):
        dims = graph_input.type.tensor_type.shape.dim
        if position in batched and dims and dims[0].HasField("dim_value"):
            raise ExportError(
                f"the converted model fixes its batch size at {dims[0].dim_value}, so its ONNX export "
                "cannot have a dynamic batch axis.",
                "pass --onnx-static (write_onnx(..., dynamic_batch=False)) to export it at that batch size",
            )


def _batched(inputs: tuple) -> list[int]:
    """The positions of the tensor inputs whose first axis is the batch: those with the first
    tensor input's first size."""
    tensors = [(i, x) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.dim() >= 1]
    if not tensors:
        return []
    size = tensors[0][1].shape[0]
    return [i for i, x in tensors if x.shape[0] == size]
