"""Keeping a host framework's attributes on a converted submodule.

Frameworks route layers by plain attributes they set on them (ultralytics reads ``f``,
``i``, ``type`` and ``np`` on every layer of its ``model`` list). When ``convert(...,
scope=...)`` puts a GraphModule in a layer's place, the replacement carries the same
attributes, on itself and on its copies: ``copy.deepcopy`` (an EMA copies the model every
step) and pickling (``torch.save`` of a checkpoint).

    keep_host_attributes(original_layer, graph_module)

``convert`` does the same for a whole model, so that a framework's wrapper that reads the
model's own attributes (ultralytics' ``YOLO.predict``: ``names``, ``stride``, ``yaml``)
takes the converted model in its place.

GraphModule rebuilds itself when copied or unpickled and keeps only what its graph uses;
its deepcopy restores the attributes listed in its meta, and its unpickling restores
the others but not names that shadow a Module method (``type``), so both paths are
given the attributes explicitly here. A file pickled this way needs cspify to load;
``cspify.export.save_model`` (``-o``) pickles the same attributes as plain state instead.
"""

from __future__ import annotations

import copy

import torch.fx as fx
import torch.nn as nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY


def keep_host_attributes(original: nn.Module, replacement: fx.GraphModule) -> None:
    """Give ``replacement`` copies of the public plain attributes ``original`` carries (not
    its parameters, buffers or submodules, nor names the GraphModule uses itself), for good:
    through deepcopy and pickling."""
    own = {k: v for k, v in vars(original).items() if not k.startswith("_") and k not in _GRAPH_MODULE_NAMES}
    _host(replacement, copy.deepcopy(own))


# The names a GraphModule sets or defines itself (graph, code, meta, training, ...).
_GRAPH_MODULE_NAMES = frozenset(vars(fx.GraphModule(nn.Module(), fx.Graph()))) | frozenset(vars(fx.GraphModule))


def _host(module: fx.GraphModule, attributes: dict) -> None:
    for name, value in attributes.items():
        setattr(module, name, value)
    kept = module.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})
    kept.update(attributes)
    # Every GraphModule has a class of its own, so this changes how this one pickles only.
    type(module).__reduce__ = _reduce_keeping(dict(kept))
    if _rehost_copy not in getattr(module, "_deepcopy_hooks", []):
        module._register_deepcopy_hook(_rehost_copy)


def _rehost_copy(copied: fx.GraphModule) -> None:
    """After a deepcopy (which made a new class): pickle the copy with its attributes too."""
    _host(copied, dict(copied.meta.get(_USER_PRESERVED_ATTRIBUTES_KEY, {})))


def _reduce_keeping(attributes: dict):
    def reduce(self):
        rebuild, args = fx.GraphModule.__reduce__(self)
        return _rebuild_hosted, (rebuild, args, attributes)

    return reduce


def _rebuild_hosted(rebuild, args, attributes: dict) -> fx.GraphModule:
    """Unpickle a GraphModule, then give it its host attributes back."""
    module = rebuild(*args)
    _host(module, attributes)
    return module
