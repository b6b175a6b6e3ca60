"""A small YOLO-format detection dataset, written offline from labelled small images.

    data_yaml = write_pasted(root, items, labels, names, train=64, val=16, size=160)
    YOLO(...).train(data=str(data_yaml), ...)

Each canvas is dark noise with one to three items pasted at random places and scales (each
item's box is where it was pasted, the class its label). ``items`` are grayscale images
(N, h, w) of uint8: Fashion-MNIST's, or any a test draws. The folder ``root`` is written all
or nothing (``cspify.files.Outputs``): ``images/{train,val}``, ``labels/{train,val}`` and
``data.yaml``, which ultralytics reads as it reads any dataset of its format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cspify.errors import ConfigError
from cspify.files import Outputs


def write_pasted(root, items: np.ndarray, labels: np.ndarray, names: list[str], *, train: int = 64, val: int = 16,
                 size: int = 160, per_image: tuple[int, int] = (1, 3), scale: tuple[float, float] = (1.0, 2.5),
                 seed: int = 0, force: bool = False) -> Path:
    """Write the dataset into the new folder ``root`` and return its ``data.yaml``."""
    items, labels = np.asarray(items), np.asarray(labels)
    if items.ndim != 3 or items.dtype != np.uint8 or len(items) != len(labels) or not len(items):
        raise ConfigError(f"items must be grayscale uint8 images (N, h, w) with one label each, not {items.dtype} "
                          f"{tuple(items.shape)} with {len(labels)} labels.", "pass arrays like Fashion-MNIST's")
    if int(labels.max()) >= len(names) or int(labels.min()) < 0:
        raise ConfigError(f"labels go up to {int(labels.max())} but {len(names)} names are given.",
                          "give one name per class")
    biggest = int(np.ceil(max(items.shape[1:]) * scale[1]))
    if biggest > size:
        raise ConfigError(f"an item scaled by {scale[1]} is {biggest} pixels, larger than the {size}-pixel canvas.",
                          "give a larger size or a smaller scale")
    rng = np.random.default_rng(seed)
    root = Path(root)

    def write(folder: str) -> None:
        folder = Path(folder)
        for split, count in (("train", train), ("val", val)):
            (folder / "images" / split).mkdir(parents=True)
            (folder / "labels" / split).mkdir(parents=True)
            for n in range(count):
                image, rows = _canvas(rng, items, labels, size, per_image, scale)
                _save_png(folder / "images" / split / f"{n:05d}.png", image)
                (folder / "labels" / split / f"{n:05d}.txt").write_text("".join(rows))
        listed = "".join(f"  {i}: {name}\n" for i, name in enumerate(names))
        (folder / "data.yaml").write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\n"
                                          f"names:\n{listed}")

    with Outputs(force=force) as out:
        out.folder(str(root), write)
    return root / "data.yaml"


def _canvas(rng, items, labels, size, per_image, scale):
    image = rng.integers(0, 40, (size, size), dtype=np.uint8)
    rows = []
    for _ in range(int(rng.integers(per_image[0], per_image[1] + 1))):
        k = int(rng.integers(len(items)))
        factor = float(rng.uniform(*scale))
        h, w = (max(1, round(d * factor)) for d in items.shape[1:])
        patch = items[k][(np.arange(h) * items.shape[1] // h)[:, None], (np.arange(w) * items.shape[2] // w)[None, :]]
        top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        region = image[top:top + h, left:left + w]
        np.maximum(region, patch, out=region)
        rows.append(f"{int(labels[k])} {(left + w / 2) / size:.6f} {(top + h / 2) / size:.6f} {w / size:.6f} "
                    f"{h / size:.6f}\n")
    return np.repeat(image[:, :, None], 3, axis=2), rows


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(image).save(path)
