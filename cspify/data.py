"""Image data for calibration and fine-tuning: an ImageFolder tree or MNIST-style IDX files.

    data = open_data("/usr/share/datasets/fashion-mnist")   # the four IDX files, .gz or not
    data = open_data("photos")                              # photos/train/<class>/*, photos/val/<class>/*
    data = open_data(path, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    data.train[0]            # (float tensor C,H,W, class index)
    data.num_classes, data.channels, data.size, data.mean, data.std, data.normalisation
    loader = torch.utils.data.DataLoader(data.train, batch_size=128, shuffle=True)

Images become float tensors scaled to [0, 1], and nothing more unless asked: ``mean`` and
``std`` (one value, or one per channel) normalise them, ``mean="data"`` by the training
images' own statistics. A model is scored on the inputs it was trained with, so the choice
is the caller's, never a hidden default (the CLI takes it from ``--mean/--std`` or from what
a zoo model says, and prints it).
IDX files are read whole into memory as bytes; an image folder is decoded with PIL image by
image. Bad data is one ``DataError`` sentence (exit code 7): a missing folder, no images,
an unreadable IDX file, image and label counts that differ.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from cspify.errors import DataError

__all__ = ["DataError", "ImageData", "open_data", "IMAGE_SUFFIXES", "parse_normalisation"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SPLITS = {"train": ("train",), "val": ("val", "t10k")}  # IDX files call the validation split t10k
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
STAT_SAMPLE = 4096  # images of a folder read to estimate its mean and std


@dataclass
class ImageData:
    """A training and a validation split of one image-classification data set."""

    train: Dataset
    val: Dataset
    num_classes: int
    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...] = ()   # () with std (): not normalised, images in [0, 1]
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()
    source: str = ""
    kind: str = ""  # "idx" or "folder"

    @property
    def normalisation(self) -> str:
        """How the images are normalised, in words."""
        if not self.mean:
            return "none (images in [0, 1])"
        return f"mean {_numbers(self.mean)}, std {_numbers(self.std)}"

    def normalised(self, mean=None, std=None) -> ImageData:
        """The same images normalised by ``mean`` and ``std`` (see ``open_data``) instead."""
        if not mean and not std:  # None or (): none
            mean, std = (), ()
        elif isinstance(mean, str) and mean == "data":
            mean, std = _own_statistics(self.train, self.channels)
        else:
            mean, std = _per_channel(mean, "mean", self.channels), _per_channel(std, "std", self.channels)
            if any(s <= 0 for s in std):
                raise DataError(f"a normalisation std must be positive (got {_numbers(std)}).", "give --std values above 0")
        shown_mean, shown_std = mean or (0.0,), std or (1.0,)
        return replace(self, train=self.train.with_normalisation(shown_mean, shown_std),
                       val=self.val.with_normalisation(shown_mean, shown_std), mean=tuple(mean), std=tuple(std))

    def fraction(self, part: float, seed: int = 0) -> ImageData:
        """The same data with a seeded random ``part`` (0 < part <= 1) of its training images."""
        if not 0 < part <= 1:
            raise DataError(f"a fraction of the training images lies in (0, 1], not {part}.", "give for example --fraction 0.1")
        if part == 1:
            return self
        count = max(1, round(part * len(self.train)))
        chosen = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(seed))[:count]
        return replace(self, train=Subset(self.train, sorted(chosen.tolist())))

    def summary(self) -> dict:
        """What a run's record says about its data."""
        return {
            "source": self.source, "kind": self.kind, "train": len(self.train), "val": len(self.val),
            "num_classes": self.num_classes, "channels": self.channels, "size": list(self.size),
            "mean": list(self.mean), "std": list(self.std),
        }


def open_data(path, *, channels: int | None = None, size: tuple[int, int] | None = None, mean=None,
              std=None) -> ImageData:
    """Open ``path``: a folder of the four MNIST-style IDX files, or ``train/`` and ``val/``
    ImageFolder trees. ``channels`` (1 or 3) converts the images (grey to RGB repeats the
    channel); ``size`` (H, W) resizes them (bilinear); by default both are the data's own.
    ``mean`` and ``std`` normalise them (``ImageData.normalised``); by default they stay in [0, 1]."""
    data = _open(path, channels, size)
    return data.normalised(mean, std) if mean is not None or std is not None else data


def parse_normalisation(mean: str | None, std: str | None):
    """``--mean/--std`` as ``ImageData.normalised`` takes them: comma lists of numbers,
    "none" (no normalisation) or "data" (the training images' own); None where not given."""
    words = {mean, std} - {None}
    if not words:
        return None
    for word in ("none", "data"):
        if word in words:
            if words != {word}:
                raise DataError(f"--mean and --std are both {word!r} or both numbers, not {mean!r} and {std!r}.",
                                f"write --mean {word} alone, or numbers for both")
            return ((), ()) if word == "none" else ("data", None)
    if mean is None or std is None:
        raise DataError("--mean and --std come together.", "give both, for example --mean 0.5 --std 0.25")
    try:
        return tuple(float(v) for v in mean.split(",")), tuple(float(v) for v in std.split(","))
    except ValueError:
        raise DataError(f"--mean {mean!r} and --std {std!r} are not comma lists of numbers.",
                        "write for example --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225, or --mean none") from None


def _open(path, channels, size) -> ImageData:
    root = Path(path)
    if not root.exists():
        raise DataError(f"the data folder {str(root)!r} does not exist.", _LAYOUT)
    if not root.is_dir():
        raise DataError(f"{str(root)!r} is a file, not a data folder.", _LAYOUT)
    if channels not in (None, 1, 3):
        raise DataError(f"images can be read with 1 or 3 channels, not {channels}.", "use channels=1 (grey) or 3 (RGB)")
    idx = _idx_files(root)
    if idx:
        return _open_idx(root, idx, channels, size)
    if (root / "train").is_dir():
        return _open_folder(root, channels, size)
    raise DataError(f"{str(root)!r} holds neither IDX files nor a train/ folder.", _LAYOUT)


_LAYOUT = (
    "give a folder with train/<class>/* and val/<class>/* images, or the four MNIST-style IDX files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, gzipped or not)"
)


# ---------------------------------------------------------------- datasets


class TensorImages(Dataset):
    """Images kept as one uint8 tensor N,C,H,W; each item is normalised when read."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, size=None) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.size = tuple(size) if size is not None else tuple(images.shape[-2:])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.batch(torch.as_tensor([i]))[0][0], int(self.labels[i])

    def __getitems__(self, indices):  # DataLoader's batched fetch: one normalisation per batch
        images, labels = self.batch(torch.as_tensor(indices))
        return list(zip(images, labels.tolist()))

    def with_normalisation(self, mean, std) -> TensorImages:
        return TensorImages(self.images, self.labels, mean, std, self.size)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and their labels at ``indices``, as two tensors."""
        x = (self.images[indices].float().div_(255) - self.mean) / self.std
        if x.shape[-2:] != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return x, self.labels[indices]


class FolderImages(Dataset):
    """Image files decoded with PIL when read: converted to grey or RGB, resized, normalised."""

    def __init__(self, items: list[tuple[Path, int]], mode: str, size: tuple[int, int], mean=(0.0,), std=(1.0,)) -> None:
        self.items, self.mode, self.size = items, mode, tuple(size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        path, label = self.items[i]
        return (self.raw(i) - self.mean) / self.std, label

    def with_normalisation(self, mean, std) -> FolderImages:
        return FolderImages(self.items, self.mode, self.size, mean, std)

    def raw(self, i: int) -> torch.Tensor:
        """Image ``i`` as a float tensor C,H,W in [0, 1], before normalisation."""
        return _decode(self.items[i][0], self.mode, self.size)


# ---------------------------------------------------------------- IDX files


def _idx_files(root: Path) -> dict[str, Path]:
    """The IDX files in ``root`` by role (train-images, ..., val-labels), any naming variant."""
    found = {}
    for file in sorted(root.iterdir()):
        name = file.name.lower()
        if name.endswith(".gz"):
            name = name[:-3]
        for split, prefixes in SPLITS.items():
            for prefix in prefixes:
                for kind, dims in (("images", 3), ("labels", 1)):
                    if name in (f"{prefix}-{kind}-idx{dims}-ubyte", f"{prefix}-{kind}.idx{dims}-ubyte"):
                        found.setdefault(f"{split}-{kind}", file)
    return found


def _open_idx(root: Path, files: dict[str, Path], channels, size) -> ImageData:
    missing = [role for role in ("train-images", "train-labels", "val-images", "val-labels") if role not in files]
    if missing:
        names = {"train-images": "train-images-idx3-ubyte", "train-labels": "train-labels-idx1-ubyte",
                 "val-images": "t10k-images-idx3-ubyte", "val-labels": "t10k-labels-idx1-ubyte"}
        raise DataError(
            f"{str(root)!r} lacks the IDX file{'s' if len(missing) > 1 else ''} {', '.join(names[m] for m in missing)}.",
            "an IDX data set is four files: training and t10k images and labels (gzipped or not)",
        )
    split = {}
    for part in ("train", "val"):
        images, labels = _read_idx(files[f"{part}-images"]), _read_idx(files[f"{part}-labels"])
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DataError(f"{files[f'{part}-images'].name} holds {images.ndim}-d {images.dtype} values, not uint8 images.",
                            "image IDX files hold unsigned bytes, N x H x W (or N x H x W x C)")
        if labels.ndim != 1:
            raise DataError(f"{files[f'{part}-labels'].name} holds {labels.ndim}-d values, not one label per image.",
                            "label IDX files hold one integer per image")
        if len(images) != len(labels):
            raise DataError(
                f"{files[f'{part}-images'].name} has {len(images)} images but {files[f'{part}-labels'].name} {len(labels)} labels.",
                "each image needs exactly one label: use files from the same data set",
            )
        if len(images) == 0:
            raise DataError(f"{files[f'{part}-images'].name} holds no images.", _LAYOUT)
        tensor = torch.from_numpy(images.copy())
        tensor = tensor.unsqueeze(1) if tensor.ndim == 3 else tensor.permute(0, 3, 1, 2).contiguous()
        split[part] = tensor, torch.from_numpy(labels.astype(np.int64))
    (train_x, train_y), (val_x, val_y) = split["train"], split["val"]
    if train_x.shape[1:] != val_x.shape[1:]:
        raise DataError(f"training images are {_dims(train_x)} but t10k images {_dims(val_x)}.",
                        "use the four files of one data set")
    num_classes = _num_classes(train_y, val_y, root)
    if channels is not None and channels != train_x.shape[1]:
        if train_x.shape[1] != 1:
            raise DataError(f"cannot read {train_x.shape[1]}-channel images with {channels} channel.",
                            "grey images can be read as RGB, not the other way")
        train_x, val_x = train_x.expand(-1, channels, -1, -1), val_x.expand(-1, channels, -1, -1)
    out_size = tuple(size) if size is not None else tuple(train_x.shape[-2:])
    return ImageData(
        TensorImages(train_x, train_y, (0.0,), (1.0,), out_size), TensorImages(val_x, val_y, (0.0,), (1.0,), out_size),
        num_classes, train_x.shape[1], out_size, (), (), tuple(str(c) for c in range(num_classes)), str(root), "idx",
    )


def _read_idx(file: Path) -> np.ndarray:
    """One IDX file as an array (the format of LeCun's MNIST files: magic, dims, values)."""
    try:
        raw = gzip.open(file, "rb").read() if file.name.lower().endswith(".gz") else file.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {file.name}: {exc}.", "check that the file is complete (download it again)") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise DataError(f"{file.name} is not an IDX file (its first bytes are not an IDX header).",
                        "IDX files start with two zero bytes, a type byte and the number of dimensions")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{file.name} is cut short inside its header.", "download the file again")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(IDX_TYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 0
    body = raw[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise DataError(
            f"{file.name} should hold {count * dtype.itemsize} bytes of values for its {'x'.join(map(str, dims))} shape, "
            f"but holds {len(body)}.",
            "the file is cut short or damaged: download it again",
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _dims(images: torch.Tensor) -> str:
    return "x".join(map(str, images.shape[1:]))


def _num_classes(train_y: torch.Tensor, val_y: torch.Tensor, root: Path) -> int:
    low = min(int(train_y.min()), int(val_y.min()))
    if low < 0:
        raise DataError(f"the labels in {str(root)!r} include {low}, below 0.", "class labels count from 0")
    return int(max(int(train_y.max()), int(val_y.max()))) + 1


# ---------------------------------------------------------------- image folders


def _open_folder(root: Path, channels, size) -> ImageData:
    if not (root / "val").is_dir():
        raise DataError(f"{str(root)!r} has a train/ folder but no val/ folder.", _LAYOUT)
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{str(root / 'train')!r} has no class folders.", _LAYOUT)
    val_classes = sorted(d.name for d in (root / "val").iterdir() if d.is_dir())
    unknown = [c for c in val_classes if c not in classes]
    if unknown:
        raise DataError(f"val/ has class folder{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown[:3]))} "
                        "that train/ lacks.", "train/ and val/ need the same class folders")
    index = {c: i for i, c in enumerate(classes)}
    items = {part: _list_images(root / part, classes, index) for part in ("train", "val")}
    for part, found in items.items():
        if not found:
            raise DataError(f"{str(root / part)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}).", _LAYOUT)
    first = _open_image(items["train"][0][0])
    mode = {1: "L", 3: "RGB"}[channels] if channels else ("L" if first.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB")
    out_size = tuple(size) if size is not None else (first.height, first.width)
    train, val = FolderImages(items["train"], mode, out_size), FolderImages(items["val"], mode, out_size)
    return ImageData(train, val, len(classes), len(mode), out_size, (), (), tuple(classes), str(root), "folder")


def _own_statistics(train: Dataset, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training images in [0, 1]: all of an IDX set, a
    spread-out sample of STAT_SAMPLE images of a folder."""
    if isinstance(train, TensorImages):
        flat = train.images.transpose(0, 1).reshape(train.images.shape[1], -1).double() / 255
        mean, std = flat.mean(1), flat.std(1)
    else:
        step = max(1, len(train) // STAT_SAMPLE)
        total = torch.zeros(channels, dtype=torch.float64)
        squares = torch.zeros_like(total)
        count = 0
        for i in range(0, len(train), step):
            x = train.raw(i).double()
            total += x.sum((1, 2))
            squares += (x * x).sum((1, 2))
            count += x[0].numel()
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) for s in std.clamp_min(1e-6))


def _per_channel(values, what: str, channels: int) -> tuple[float, ...]:
    values = tuple(float(v) for v in (values if isinstance(values, (tuple, list)) else [values]))
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise DataError(f"the normalisation {what} has {len(values)} values for {channels}-channel images.",
                        f"give one {what}, or one per channel")
    return values


def _numbers(values) -> str:
    return ",".join(f"{v:.4g}" for v in values)


def _list_images(folder: Path, classes: list[str], index: dict[str, int]) -> list[tuple[Path, int]]:
    found = []
    for name in classes:
        directory = folder / name
        if directory.is_dir():
            found += [(f, index[name]) for f in sorted(directory.rglob("*"))
                      if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    return found


def _open_image(file: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(file)
        image.load()
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot decode image {str(file)!r}: {exc}.", "remove or replace the damaged file") from None
    return image


def _decode(file: Path, mode: str, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    image = _open_image(file).convert(mode)
    if (image.height, image.width) != tuple(size):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    array = np.asarray(image, dtype=np.float32) / 255
    tensor = torch.from_numpy(array.copy())
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1).contiguous()


def check_fits(model: torch.nn.Module, data: ImageData, name: str | None = None, classes: bool = True) -> None:
    """A DataError when ``model`` cannot take ``data``'s images (a first conv of another
    channel count, or a forward that fails on two of them) or (``classes``) does not give
    class scores for as many classes as ``data`` has. ``name`` is what the sentence calls
    the model (its class name by default)."""
    from cspify.trace import device_of, eval_mode

    name = name or type(model).__name__
    x = torch.stack([data.train[i][0] for i in range(min(2, len(data.train)))])
    expected = next((m.in_channels for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)), None)
    if expected is not None and expected != data.channels:
        hint = ("read the images as RGB with --channels 3" if data.channels == 1 and expected == 3
                else "use images with as many channels as the model's first conv takes")
        raise DataError(f"{name} takes {expected}-channel images but {data.source} has {data.channels}-channel images.",
                        hint)
    with eval_mode(model):
        try:
            out = model(x.to(device_of(model)))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
            raise DataError(f"{name} does not run on the {'x'.join(map(str, x.shape[1:]))} images of {data.source}: "
                            f"{first}.", "give images of the size and channels the model takes") from None
    if not classes:
        return
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise DataError(f"{name} does not output class scores (one row per image), so it cannot be scored on "
                        f"{data.source}.", "fine-tune a classifier, or use the Python API with your own loss")
    if out.shape[1] < data.num_classes:
        raise DataError(f"{data.source} has {data.num_classes} classes but {name} has only {out.shape[1]} outputs.",
                        "give a model with one output per class (or more)")
