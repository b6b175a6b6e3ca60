"""What the Python API accepts as data, read by one set of rules: calibrate, finetune and
evaluate all take their images through here.

    source = batch_source(data, batch_size=128)   # a tensor, a Dataset, a DataLoader, or batches
    source.dataset                                # map-style data, read through a DataLoader ...
    source.batches                                # ... or the batches as they come
    x, y = split_batch(batch)                     # (inputs, labels or None)

- a tensor (N, C, H, W) is its images, ``batch_size`` at a time;
- a map-style Dataset (with ``__len__`` and ``__getitem__``), or a DataLoader over one, is
  its Dataset (a DataLoader lends its batch size, workers and collate function), so that
  each step chooses its order: a seeded subset of a larger one (calibrate), a shuffled shard per process
  (finetune), a strided shard (evaluate);
- an IterableDataset, bare or in a DataLoader, is read as it comes: under torch.distributed
  it shards itself;
- any other iterable is batches as they come; a one-shot iterator (a generator) can be read
  only once.

A batch is a tensor of inputs, or a tuple or list whose first item is the inputs and whose
second, when it is a 1-d integer tensor of the same length, the labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from cspify.errors import ConfigError

__all__ = ["BatchSource", "batch_source", "image_batches", "split_batch"]


@dataclass
class BatchSource:
    """Data as ``batch_source`` classifies it: a map-style ``dataset`` or ``batches``."""

    batch_size: int
    dataset: Dataset | None = None
    batches: Iterable | None = None
    num_workers: int = 0
    collate: Callable | None = None
    once: bool = False          # batches from a one-shot iterator: they can be read once only
    shards_itself: bool = False  # an IterableDataset: read as it comes under torch.distributed too

    def loader(self, indices=None, sampler=None) -> DataLoader:
        """The dataset (or its items at ``indices``) in batches, in order or by ``sampler``."""
        data = self.dataset if indices is None else Subset(self.dataset, list(indices))
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=self.collate, drop_last=False)


def batch_source(data, batch_size: int, num_workers: int = 0) -> BatchSource:
    """Classify ``data`` (see the module docstring); one sentence where it is none of them."""
    if batch_size < 1:
        raise ConfigError(f"the batch size must be at least 1 (got {batch_size}).", "give a positive number")
    if isinstance(data, torch.Tensor):
        if data.ndim < 2:
            raise ConfigError(f"a tensor of images has a batch axis first; this one has shape {tuple(data.shape)}.",
                              "give a tensor N, C, H, W")
        return BatchSource(batch_size, batches=list(data.split(batch_size)))
    if isinstance(data, DataLoader):
        if _map_style(data.dataset):
            return BatchSource(data.batch_size or batch_size, dataset=data.dataset, num_workers=data.num_workers,
                               collate=data.collate_fn)
        return BatchSource(data.batch_size or batch_size, batches=data, shards_itself=True)
    if _map_style(data):
        return BatchSource(batch_size, dataset=data, num_workers=num_workers)
    if isinstance(data, IterableDataset):
        return BatchSource(batch_size, batches=data, shards_itself=True)
    try:
        once = iter(data) is data
    except TypeError:
        raise ConfigError(f"the data is a {type(data).__name__}, which cannot be read as batches.",
                          "give a tensor, a Dataset, a DataLoader, or a list of batches") from None
    return BatchSource(batch_size, batches=data, once=once)


def image_batches(images, max_images: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """At most ``max_images`` input images (of a larger Dataset a seeded random subset; else
    the first, in order), as a list of tensors of at most ``batch_size``."""
    if max_images < 1 or batch_size < 1:
        raise ConfigError(f"max_images and batch_size must be at least 1 (got {max_images} and {batch_size}).",
                          "give positive numbers")
    source = batch_source(images, batch_size)
    reader = source.batches
    if source.dataset is not None and len(source.dataset) > max_images:
        generator = torch.Generator().manual_seed(seed)
        reader = source.loader(torch.randperm(len(source.dataset), generator=generator)[:max_images].tolist())
    elif source.dataset is not None:
        reader = source.loader()
    found, count = [], 0
    for batch in reader:
        x = split_batch(batch)[0][: max_images - count]
        found += list(x.split(batch_size))
        count += len(x)
        if count >= max_images:
            break
    if not found:
        raise ConfigError("no images to calibrate on.", "give at least one batch of images")
    return found


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, labels or None) from a batch: a tensor, or a tuple/list (inputs, labels, ...)."""
    if isinstance(batch, (tuple, list)) and batch:
        x, y = batch[0], batch[1] if len(batch) > 1 else None
    else:
        x, y = batch, None
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"a batch is a {type(x).__name__}, not a tensor or (inputs, labels).",
                          "give batches of tensors, or of (inputs, labels) pairs")
    if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.ndim == 1 and len(y) == len(x):
        return x, y
    return x, None


def _map_style(data) -> bool:
    return isinstance(data, Dataset) and not isinstance(data, IterableDataset) \
        and hasattr(data, "__len__") and hasattr(data, "__getitem__")
