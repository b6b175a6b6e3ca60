"""From a MODEL spec to a module and example inputs.

    load_model("examples/resnet_like.py")          # the file's single obvious model
    load_model("examples/resnet_like.py:ResNetLike")
    load_model("torchvision:resnet50")             # random weights, nothing downloaded
    load_model("timm:cspresnet50")
    load_model("ultralytics:yolov8n.yaml")         # any model YAML ultralytics ships, built offline
    load_model("torchvision:resnet50", weights="resnet50.pth")   # a state dict, weights_only=True
    load_weights(model, "checkpoint.pt")           # the same, into a module you built

``path.py:Name`` names a class built with no arguments, a function returning a module, or
a module instance. Without ``:Name`` the file's candidates are its module instances, its
``nn.Module`` classes that need no arguments and its functions annotated to return a
module; two names for one object (``model = Net``) are one candidate; classes used inside
another candidate, or instantiated by one (``def model() -> nn.Module: return Net()``),
are dropped; exactly one must remain.
``ultralytics:NAME.yaml`` gives the model of ``ultralytics.YOLO(NAME.yaml)`` (``RTDETR`` for an
``rtdetr`` YAML), with the YAML's number of classes; it sets ``YOLO_OFFLINE=1`` where unset
before importing ultralytics, so that nothing is downloaded (a ``.pt`` name is refused), and
undoes what that import patches for the whole process (``import_ultralytics``).
Loading a file runs its code, as ``python path.py`` would. Weights are read with
``torch.load(weights_only=True)``, which unpickles no code.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
import typing
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from cspify.errors import ConfigError, LoadError

DEFAULT_SHAPE = (1, 3, 224, 224)


@dataclass
class Loaded:
    model: nn.Module
    example_inputs: tuple
    mean: tuple[float, ...] | None = None   # the input normalisation the model says it was trained with
    std: tuple[float, ...] | None = None    # (None: it says nothing)
    normalisation_from: str = ""            # where that was read


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> (1, 3, 224, 224); a clear error for anything else."""
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(
            f"input shape {text!r} is not a list of positive integers.",
            "write it as N,C,H,W, for example --input-shape 1,3,224,224",
        )
    return dims


def load_model(spec: str, input_shape: tuple[int, ...] | None = None, weights: str | None = None) -> Loaded:
    """Build the model a spec names, load ``weights`` into it (``load_weights``), and make
    the example inputs to trace it with."""
    if weights is not None:
        check_weights_file(weights)  # before building what may be a large model
    zoo, sep, name = spec.partition(":")
    if sep and zoo in ZOOS:
        model = _ready(ZOOS[zoo](name), spec)
        if weights is not None:
            load_weights(model, weights)
        return Loaded(model, _inputs(input_shape), *_normalisation(zoo, name, model))
    path, name = _split_file_spec(spec)
    namespace = _exec_file(path)
    model = _pick(namespace, path, name)
    if input_shape is None and callable(namespace.get("example_inputs")):
        try:
            inputs = namespace["example_inputs"]()
        except Exception as exc:
            raise LoadError(
                f"example_inputs() in {path} raised {type(exc).__name__}: {exc}.",
                "fix example_inputs(), or give the shape with --input-shape",
            ) from exc
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    else:
        inputs = _inputs(input_shape)
    model = _ready(model, spec)
    if weights is not None:
        load_weights(model, weights)
    return Loaded(model, inputs)


def _inputs(shape: tuple[int, ...] | None) -> tuple:
    return (torch.randn(*(shape or DEFAULT_SHAPE)),)


def _ready(model, spec: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise LoadError(f"{spec} gives a {type(model).__name__}, not a torch.nn.Module.", "point MODEL at a module")
    return model.eval()


# ---------------------------------------------------------------- trained weights

_WEIGHTS_HINT = "save the weights with torch.save(model.state_dict(), PATH)"


def check_weights_file(path: str) -> None:
    """A LoadError when ``path`` is not a readable file (checked before any model is built)."""
    where = Path(path)
    if where.is_dir():
        raise LoadError(f"weights path {path} is a folder, not a file.", "give the file that holds the state dict")
    if not where.is_file():
        raise LoadError(f"weights file {path} does not exist.", "give the path of a state dict saved with torch.save")


def load_weights(model: nn.Module, path: str) -> nn.Module:
    """Load the state dict at ``path`` into ``model`` (in place, strictly) and return it.

    The file is read with ``torch.load(weights_only=True)``, which unpickles no code. It may
    hold the state dict itself or a checkpoint dict with it under ``"state_dict"`` or
    ``"model"``; a ``module.`` prefix on every key (DistributedDataParallel) is dropped.
    Keys that do not match, or a tensor of another shape, raise a LoadError naming the
    first such key.
    """
    check_weights_file(path)
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(path):  # torch.save writes zip files: this is something else
            raise LoadError(f"cannot read weights file {path}: torch.load finds no tensors in it.", _WEIGHTS_HINT) from exc
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a {found.group(1)}" if found else "objects other than tensors"
        raise LoadError(
            f"weights file {path} holds {what}, and cspify reads weights only with torch.load(weights_only=True).",
            f"load the model once yourself and {_WEIGHTS_HINT}",
        ) from exc
    except Exception as exc:  # not a torch file, truncated, unreadable
        if not zipfile.is_zipfile(path):  # a pickle reader's KeyError on bytes that are no pickle says nothing
            raise LoadError(f"cannot read weights file {path}: it is not a file torch.save wrote.", _WEIGHTS_HINT) from exc
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0].rstrip(".")
        raise LoadError(f"cannot read weights file {path} ({type(exc).__name__}: {first}).", _WEIGHTS_HINT) from exc
    state = _strip_prefix(_state_dict_in(saved, path), "module.", model)
    _check_fit(model, state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # anything the checks above did not name
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".:")
        raise LoadError(f"weights file {path} does not load into {type(model).__name__} ({first}).", _WEIGHTS_HINT) from exc
    return model


def _state_dict_in(saved, path: str) -> Mapping:
    """The state dict itself, or a checkpoint's ``state_dict`` / ``model`` entry."""
    if not isinstance(saved, Mapping):
        raise LoadError(f"weights file {path} holds a {type(saved).__name__}, not a state dict.", _WEIGHTS_HINT)
    for key in ("state_dict", "model"):
        if isinstance(saved.get(key), Mapping):
            return saved[key]
    if not any(isinstance(v, torch.Tensor) for v in saved.values()):
        keys = ", ".join(repr(k) for k in list(saved)[:5]) or "none"
        raise LoadError(
            f"weights file {path} holds a dict with no tensors and no 'state_dict' or 'model' entry (keys: {keys}).",
            _WEIGHTS_HINT,
        )
    return saved


def _strip_prefix(state: Mapping, prefix: str, model: nn.Module) -> dict:
    """Drop ``prefix`` when every key has it and none of the model's do."""
    keys = [k for k in state if isinstance(k, str)]
    if keys and len(keys) == len(state) and all(k.startswith(prefix) for k in keys) and not any(
        k.startswith(prefix) for k in model.state_dict()
    ):
        return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def _check_fit(model: nn.Module, state: Mapping, path: str) -> None:
    """The first missing, unexpected or misshapen key, in one sentence."""
    expected = model.state_dict()
    name = type(model).__name__
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            parts.append(f"lacks the model's key {missing[0]!r}{more}")
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            parts.append(f"has the unexpected key {unexpected[0]!r}{more}")
        raise LoadError(
            f"weights file {path} does not fit {name}: it {' and '.join(parts)}.",
            "load weights saved from this same architecture (a checkpoint's 'state_dict' or 'model' entry is read)",
        )
    for key, want in expected.items():
        got = state[key]
        if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and got.shape != want.shape:
            raise LoadError(
                f"weights file {path} does not fit {name}: {key!r} has shape {_dims(got)} in the file "
                f"but {_dims(want)} in the model.",
                "load weights saved from this same architecture and configuration (number of classes, widths)",
            )


def _dims(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "()"


def _torchvision(name: str) -> nn.Module:
    try:
        import torchvision
    except ImportError:
        raise LoadError("torchvision is not installed.", 'install the zoo extra: pip install "cspify[zoo]"') from None
    try:
        builder = torchvision.models.get_model_builder(name)
    except (ValueError, KeyError):
        raise LoadError(
            f"torchvision has no model named {name!r}.",
            "see torchvision.models.list_models() for the names",
        ) from None
    # random weights throughout: a detector's backbone too (its builder would fetch ImageNet weights)
    backbone = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
    return builder(weights=None, **backbone)


def _normalisation(zoo: str, name: str, model: nn.Module) -> tuple:
    """(mean, std, where it was read) of the inputs a zoo model is trained on, or Nones:
    timm's ``pretrained_cfg``, the transforms of torchvision's default weights."""
    if zoo == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if cfg.get("mean") and cfg.get("std"):
            return tuple(cfg["mean"]), tuple(cfg["std"]), "timm's pretrained_cfg"
    if zoo == "torchvision":
        import torchvision

        try:
            preset = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        except (ValueError, KeyError, AttributeError, TypeError):
            return None, None, ""
        if getattr(preset, "mean", None) and getattr(preset, "std", None):
            return tuple(preset.mean), tuple(preset.std), "the transforms of torchvision's default weights"
    return None, None, ""


def _timm(name: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise LoadError("timm is not installed.", 'install the zoo extra: pip install "cspify[zoo]"') from None
    try:
        return timm.create_model(name, pretrained=False)
    except RuntimeError:
        raise LoadError(f"timm has no model named {name!r}.", "see timm.list_models() for the names") from None


def import_ultralytics():
    """The ``ultralytics`` package, imported offline (``YOLO_OFFLINE=1`` where unset), with
    what its import patches for the whole process put back: ``PIL.Image.open`` (which
    would try to install a HEIF plugin on an image it cannot read) and ``torch.save``."""
    os.environ.setdefault("YOLO_OFFLINE", "1")  # read when ultralytics is imported: no network checks
    from PIL import Image

    patched = Image.open, torch.save
    try:
        import ultralytics
    except ImportError:
        raise LoadError("ultralytics is not installed.", 'install the zoo extra: pip install "cspify[zoo]"') from None
    finally:
        Image.open, torch.save = patched
    return ultralytics


def _ultralytics(name: str) -> nn.Module:
    if Path(name).suffix.lower() not in (".yaml", ".yml"):
        raise LoadError(
            f"ultralytics:{name} is not a model YAML, and cspify builds ultralytics models only from YAMLs, offline.",
            "name the YAML, for example ultralytics:yolov8n.yaml, and load trained weights with --weights PATH",
        )
    ultralytics = import_ultralytics()
    rtdetr = "rtdetr" in Path(name).stem.lower()
    try:
        return (ultralytics.RTDETR(name) if rtdetr else ultralytics.YOLO(name, verbose=False)).model
    except FileNotFoundError:
        raise LoadError(
            f"ultralytics has no model YAML named {name!r}.",
            "name a YAML it ships with its scale letter, such as yolov8n.yaml, yolo11n.yaml or yolov3.yaml "
            "(see ultralytics/cfg/models), or give the path of your own",
        ) from None
    except Exception as exc:
        raise LoadError(f"building ultralytics:{name} raised {type(exc).__name__}: {exc}.", "try another YAML") from exc


ZOOS = {"torchvision": _torchvision, "timm": _timm, "ultralytics": _ultralytics}


def _split_file_spec(spec: str) -> tuple[Path, str | None]:
    path_text, name = spec, None
    if ":" in spec and not Path(spec).exists():
        path_text, name = spec.rsplit(":", 1)
    path = Path(path_text)
    if path.is_dir():
        raise LoadError(f"{path_text} is a folder, not a model file.", "give the path of the .py file that builds the model")
    if not path.is_file():
        hint = "give a path to a .py file, or torchvision:NAME / timm:NAME / ultralytics:NAME.yaml"
        raise LoadError(f"model file {path_text} does not exist.", hint)
    return path, name or None


def _exec_file(path: Path) -> dict:
    """Run a model file as a module of its own (its folder importable) and return its names."""
    module_name = f"cspify_user_model_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None:
        raise LoadError(f"{path} is not a Python file.", "give a .py file, or torchvision:NAME / timm:NAME / ultralytics:NAME.yaml")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise LoadError(f"{path} has a syntax error on line {exc.lineno}: {exc.msg}.", "fix the file and run again") from exc
    except ImportError as exc:
        raise LoadError(f"{path} fails to import: {exc}.", "install what it imports, or fix the import") from exc
    except SystemExit as exc:
        raise LoadError(
            f"running {path} called sys.exit({exc.code!r}).",
            "put the script part of the file under if __name__ == \"__main__\":",
        ) from exc
    except Exception as exc:
        raise LoadError(f"running {path} raised {type(exc).__name__}: {exc}.", "fix the file and run again") from exc
    finally:
        sys.path.remove(folder)
    return {k: v for k, v in vars(module).items() if not k.startswith("__")} | {"__name__": module_name}


def _pick(namespace: dict, path: Path, name: str | None):
    if name is not None:
        if name not in namespace:
            known = ", ".join(sorted(_candidates(namespace))) or "none"
            raise LoadError(f"{path} has no name {name!r}.", f"models it defines: {known}")
        return _build(namespace[name], f"{path}:{name}")
    candidates = _candidates(namespace)
    if not candidates:
        raise LoadError(
            f"{path} defines no model.",
            "define an nn.Module class that needs no arguments, a module instance, or name one with MODEL:Name",
        )
    built = {}
    for n, obj in candidates.items():
        model = _build(obj, f"{path}:{n}")
        if not any(model is other for other in built.values()):  # net = Net(); def model(): return net
            built[n] = model
    inner = {type(m) for b in built.values() if isinstance(b, nn.Module) for m in list(b.modules())[1:]}
    # class Net beside model = Net() or def model() -> nn.Module: return Net(): the instance or factory wins
    inner |= {type(built[n]) for n in built if not inspect.isclass(candidates[n])}
    top = [n for n in built if not (inspect.isclass(candidates[n]) and candidates[n] in inner)]
    if len(top) != 1:
        raise LoadError(
            f"{path} defines several models: {', '.join(top)}.",
            f"pick one with {path}:{top[0]}",
        )
    return built[top[0]]


def _candidates(namespace: dict) -> dict:
    """Module instances, no-argument module classes and module-returning functions of the file,
    each object once (under its first name)."""
    own = namespace["__name__"]
    found = {}
    for key, obj in namespace.items():
        if key.startswith("_") or any(obj is seen for seen in found.values()):  # model = Net: one candidate
            continue
        if isinstance(obj, nn.Module):
            found[key] = obj
        elif inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == own and _no_args(obj):
            found[key] = obj
        elif inspect.isfunction(obj) and obj.__module__ == own and _returns_module(obj) and _no_args(obj):
            found[key] = obj
    return found


def _no_args(fn) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def _returns_module(fn) -> bool:
    try:
        ret = typing.get_type_hints(fn).get("return")
    except Exception:  # an annotation that does not resolve says nothing
        return False
    return inspect.isclass(ret) and issubclass(ret, nn.Module)


def _build(obj, label: str):
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise LoadError(f"{label} is a {type(obj).__name__}, not a model.", "name a module class, instance or function")
    if not _no_args(obj):
        raise LoadError(
            f"{label} needs arguments to build.",
            "add a function with no arguments that returns the model, and name it with MODEL:function",
        )
    try:
        return obj()
    except Exception as exc:
        raise LoadError(f"building {label} raised {type(exc).__name__}: {exc}.", "fix the model code") from exc
