"""open_data: tiny MNIST-style IDX files (gzipped or not) and ImageFolder trees written in a
temporary folder; bad data is one DataError sentence with exit code 7."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from cspify.data import DataError, open_data


def write_idx(path, array: np.ndarray, *, gz: bool = False) -> None:
    """An IDX file: two zero bytes, the type (0x08, unsigned byte), the rank, the dims, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(body))
    else:
        path.write_bytes(body)


def idx_folder(root, *, n_train=12, n_val=6, size=(8, 8), classes=3, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, *size)), gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(n) % classes, gz=gz)
    return root


def image_folder(root, *, classes=("cat", "dog"), per_class=3, size=(10, 12), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for part in ("train", "val"):
        for name in classes:
            (root / part / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                shape = (size[0], size[1], 3) if mode == "RGB" else size
                Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode).save(root / part / name / f"{i}.png")
    return root


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzipped"])
def test_idx_files(tmp_path, gz):
    data = open_data(idx_folder(tmp_path / "mnist", gz=gz))
    assert (len(data.train), len(data.val), data.num_classes, data.channels, data.size) == (12, 6, 3, 1, (8, 8))
    x, y = data.train[4]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and y == 1
    images = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert 0 <= float(images.min()) and float(images.max()) <= 1  # by default not normalised: in [0, 1]
    assert data.mean == data.std == () and data.normalisation == "none (images in [0, 1])"
    own = data.normalised("data")
    images = torch.stack([own.train[i][0] for i in range(len(own.train))])
    assert abs(float(images.mean())) < 1e-4 and abs(float(images.std()) - 1) < 0.05  # by the train split's own
    assert len(own.mean) == len(own.std) == 1 and 0 < own.mean[0] < 1 and own.normalisation.startswith("mean ")
    assert data.summary()["kind"] == "idx"


def test_normalisation_is_what_the_caller_gives(tmp_path):
    from cspify.data import parse_normalisation

    data = open_data(idx_folder(tmp_path / "mnist"))
    given = open_data(tmp_path / "mnist", mean=0.5, std=0.25)
    assert torch.allclose(given.val[0][0], (data.val[0][0] - 0.5) / 0.25)
    assert given.normalised(None).normalisation == data.normalisation  # back to none
    rgb = open_data(tmp_path / "mnist", channels=3, mean=(0.4, 0.5, 0.6), std=(1, 2, 3))
    assert rgb.mean == (0.4, 0.5, 0.6) and rgb.summary()["std"] == [1.0, 2.0, 3.0]
    assert parse_normalisation(None, None) is None and parse_normalisation("none", "none") == ((), ())
    assert parse_normalisation("0.1,0.2", "1,2") == ((0.1, 0.2), (1.0, 2.0)) and parse_normalisation("data", None)[0] == "data"
    for mean, std, words in [(0.5, 0, "positive"), ((0.1, 0.2), 1, "2 values for 1-channel")]:
        with pytest.raises(DataError, match=words):
            data.normalised(mean, std)
    for mean, std, words in [("0.5", None, "come together"), ("none", "0.2", "both 'none'"), ("a", "b", "comma lists")]:
        with pytest.raises(DataError, match=words):
            parse_normalisation(mean, std)
    part = data.fraction(0.5, seed=1)
    assert len(part.train) == 6 and len(part.val) == len(data.val) and data.fraction(1.0) is data
    with pytest.raises(DataError, match="lies in"):
        data.fraction(0)


def test_idx_batches_and_options(tmp_path):
    data = open_data(idx_folder(tmp_path / "mnist"), channels=3, size=(16, 16))
    loader = torch.utils.data.DataLoader(data.train, batch_size=5, shuffle=True)
    x, y = next(iter(loader))
    assert x.shape == (5, 3, 16, 16) and y.dtype == torch.int64 and data.channels == 3
    assert torch.equal(x[:, 0], x[:, 1])  # grey read as RGB repeats the channel


def test_image_folder(tmp_path):
    data = open_data(image_folder(tmp_path / "pets"))
    assert (len(data.train), len(data.val), data.num_classes, data.channels, data.size) == (6, 6, 2, 3, (10, 12))
    assert data.classes == ("cat", "dog") and data.kind == "folder"
    x, y = data.val[5]
    assert x.shape == (3, 10, 12) and y == 1
    grey = open_data(image_folder(tmp_path / "grey", mode="L", size=(8, 8)))
    assert grey.channels == 1 and grey.train[0][0].shape == (1, 8, 8)
    assert open_data(tmp_path / "grey", channels=3, size=(6, 6)).train[0][0].shape == (3, 6, 6)


def check(error: DataError, *words):
    assert error.exit_code == 7 and error.hint
    text = error.message
    assert text.endswith(".") and "\n" not in text and text.count(". ") == 0, text
    for word in words:
        assert word in text, text


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DataError) as info:
        open_data(tmp_path / "nowhere")
    check(info.value, "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        open_data(tmp_path / "empty")
    check(info.value, "neither IDX files nor a train/ folder")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DataError) as info:
        open_data(tmp_path / "a_file")
    check(info.value, "is a file")


def test_folder_without_images(tmp_path):
    root = tmp_path / "pets"
    for part in ("train", "val"):
        (root / part / "cat").mkdir(parents=True)
    (root / "train" / "cat" / "notes.txt").write_text("no image here")
    with pytest.raises(DataError) as info:
        open_data(root)
    check(info.value, "holds no images")
    image_folder(tmp_path / "noval")
    import shutil

    shutil.rmtree(tmp_path / "noval" / "val")
    with pytest.raises(DataError) as info:
        open_data(tmp_path / "noval")
    check(info.value, "no val/ folder")


def test_undecodable_image(tmp_path):
    root = image_folder(tmp_path / "pets")
    (root / "train" / "cat" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as info:
        open_data(root)
    check(info.value, "cannot decode image")


def test_missing_idx_file(tmp_path):
    root = idx_folder(tmp_path / "mnist")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as info:
        open_data(root)
    check(info.value, "t10k-labels-idx1-ubyte")


@pytest.mark.parametrize("damage, words", [
    (lambda raw: raw[:-5], ["should hold", "but holds"]),
    (lambda raw: b"\x01\x02" + raw[2:], ["not an IDX file"]),
    (lambda raw: raw[:6], ["cut short"]),
], ids=["truncated", "bad-magic", "short-header"])
def test_unreadable_idx(tmp_path, damage, words):
    root = idx_folder(tmp_path / "mnist")
    path = root / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as info:
        open_data(root)
    check(info.value, *words)


def test_corrupt_gzip(tmp_path):
    root = idx_folder(tmp_path / "mnist", gz=True)
    path = root / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(DataError) as info:
        open_data(root)
    check(info.value, "cannot read train-labels-idx1-ubyte.gz")


def test_counts_that_differ(tmp_path):
    root = idx_folder(tmp_path / "mnist")
    write_idx(root / "train-labels-idx1-ubyte", np.zeros(11))
    with pytest.raises(DataError) as info:
        open_data(root)
    check(info.value, "12 images", "11 labels")
