"""Image data sources, colouring and the ``overunlearn data`` commands.

Torchvision-root loading is tested on small fixture files generated here (IDX gz files, CIFAR-10
python batches, an ImageFolder tree); the real Debian Fashion-MNIST is loaded when installed.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from overunlearn.data import (
    COLLAPSE_PALETTE,
    ERASE_PALETTE,
    FULL_GRAY,
    ColoredImages,
    colorize,
    intensity,
    load_images,
    prepare_fashion_mnist,
)
from overunlearn.data.sources import DEBIAN_FASHION_MNIST, dataset_location, read_idx
from overunlearn.errors import DatasetNotFoundError


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08}[arr.dtype]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return header + arr.tobytes()


def _write_mnist_gz(folder: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for name, arr in arrays.items():
        with gzip.open(folder / (name + ".gz"), "wb") as fh:
            fh.write(_idx_bytes(arr))
    return arrays


# ---------------------------------------------------------------------------------------------- digits


def test_digits_always_available_and_shaped():
    train, test = load_images("digits", "train"), load_images("digits", "test")
    assert train.images.dtype == torch.uint8 and train.images.shape == (1437, 1, 28, 28)
    assert test.images.shape == (360, 1, 28, 28)
    assert set(train.labels.unique().tolist()) == set(range(10))
    # 8x8 content upsampled x3 into the centre, a 2-pixel zero border
    assert train.images[:, :, :2].sum() == 0 and train.images[:, :, :, -2:].sum() == 0
    assert int(train.images.max()) == 255


# ---------------------------------------------------------------------------------------------- colouring


def test_intensity_matches_pil_convert_L():
    from PIL import Image

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    ours = intensity(torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous())
    for i in range(2):
        pil = np.asarray(Image.fromarray(rgb[i]).convert("L"))
        assert np.array_equal(ours[i, 0].numpy(), pil)
    gray = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.uint8)
    assert torch.equal(intensity(gray), gray)


def test_erase_colours_pixel_values():
    lum = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 2, 2).contiguous()
    gray, red, green = (colorize(lum, ERASE_PALETTE[i]) for i in range(3))
    expected = torch.tensor([0, 51, 255]).float() / 255 * 2 - 1  # normalised (x - .5) / .5
    for img in (gray, red, green):
        assert img.shape == (3, 3, 2, 2)
    assert torch.allclose(gray[:, 0, 0, 0], expected) and torch.allclose(gray[:, 1, 0, 0], expected)
    assert torch.allclose(gray[:, 2, 0, 0], expected)
    assert torch.allclose(red[:, 0, 0, 0], expected)
    assert torch.all(red[:, 1:] == -1.0)  # no green, no blue
    assert torch.allclose(green[:, 1, 0, 0], expected)
    assert torch.all(green[:, 0] == -1.0) and torch.all(green[:, 2] == -1.0)


def test_collapse_palette_pixel_values():
    assert COLLAPSE_PALETTE.shape == (10, 3)
    lum = torch.full((10, 1, 1, 1), 200, dtype=torch.uint8)
    x = colorize(lum, COLLAPSE_PALETTE, normalize=False)
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                        [255, 128, 0], [128, 0, 255], [128, 128, 128], [0, 128, 128]]).float()
    assert torch.allclose(x[:, :, 0, 0], 200 / 255 * rgb / 255)
    # index 8 is half-intensity gray, the warm start's gray is full intensity
    assert torch.allclose(colorize(lum[:1], FULL_GRAY[0], normalize=False)[0, :, 0, 0], torch.full((3,), 200 / 255))


def test_colored_images_batches_and_concat():
    lum = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    color = torch.tensor([0, 1, 2, 0, 1, 2])
    a = ColoredImages(lum, color, (torch.arange(6), color), ERASE_PALETTE)
    b = a.subset(torch.tensor([1, 2]))
    both = ColoredImages.concat([a, b])
    assert len(both) == 8 and torch.equal(both.targets[1], torch.cat([color, color[1:3]]))
    batch = a.batch(torch.tensor([1]))
    assert torch.all(batch.inputs[0, 1:] == -1.0)  # red
    td = a.materialize()
    assert td.inputs.shape == (6, 3, 4, 4) and td.inputs.dtype == torch.float32
    with pytest.raises(ValueError):
        ColoredImages(lum, torch.full((6,), 3), torch.arange(6), ERASE_PALETTE)


# ---------------------------------------------------------------------------------------------- torchvision roots


def test_prepare_fashion_mnist_from_generated_gz_files(tmp_path):
    src = tmp_path / "debian"
    arrays = _write_mnist_gz(src)
    root = tmp_path / "root"
    raw = prepare_fashion_mnist(root, src)
    assert raw == root / "FashionMNIST" / "raw"
    assert (raw / "train-images-idx3-ubyte.gz").is_symlink() and (raw / "train-images-idx3-ubyte").is_file()
    import torchvision

    tv = torchvision.datasets.FashionMNIST(str(root), train=True, download=False)
    assert np.array_equal(tv.data.numpy(), arrays["train-images-idx3-ubyte"])
    train = load_images("fashion-mnist", "train", root)
    test = load_images("fashion-mnist", "test", root)
    assert train.images.shape == (12, 1, 28, 28) and test.images.shape == (6, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(test.labels.numpy(), arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    prepare_fashion_mnist(root, src, link=False)  # idempotent, copies this time
    assert not (raw / "train-images-idx3-ubyte.gz").is_symlink()


def test_mnist_layout_uncompressed(tmp_path):
    arrays = _write_mnist_gz(tmp_path / "gz", seed=3)
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, arr in arrays.items():
        (raw / name).write_bytes(_idx_bytes(arr))
    assert np.array_equal(read_idx(raw / "t10k-images-idx3-ubyte"), arrays["t10k-images-idx3-ubyte"])
    ds = load_images("mnist", "test", tmp_path / "root")
    assert np.array_equal(ds.images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert dataset_location("mnist", tmp_path / "root") == raw


def test_cifar10_python_batches(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        with open(base / name, "wb") as fh:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, fh, protocol=2)
        written[name] = (data, labels)
    train = load_images("cifar10", "train", tmp_path)
    test = load_images("cifar10", "test", tmp_path)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert np.array_equal(test.images.numpy().reshape(4, -1), written["test_batch"][0])
    assert test.labels.tolist() == written["test_batch"][1]
    # channel-major layout: the first 1024 values are the red plane
    assert np.array_equal(train.images[0, 0].numpy().ravel(), written["data_batch_1"][0][0, :1024])


def test_cifar10_refuses_unexpected_pickle_content(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as fh:
            pickle.dump({"data": Evil(), "labels": [0]}, fh)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_images("cifar10", "test", tmp_path)


def test_tiny_imagenet_image_folder(tmp_path):
    from PIL import Image

    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n001", "n002"]
    rng = np.random.default_rng(0)
    for w in wnids:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f"{w}_{i}.png")
    val = base / "val" / "images"
    val.mkdir(parents=True)
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(val / "val_0.png")
    Image.fromarray(pixels).save(val / "val_1.png")
    (base / "val" / "val_annotations.txt").write_text("val_0.png\tn002\t0\t0\t63\t63\nval_1.png\tn001\t0\t0\t63\t63\n")
    train = load_images("tiny-imagenet", "train", tmp_path)
    test = load_images("tiny-imagenet", "test", tmp_path)
    assert train.images.shape == (4, 3, 64, 64) and train.num_classes == 2
    assert sorted(train.labels.tolist()) == [0, 0, 1, 1]
    assert test.labels.tolist() == [1, 0]
    assert np.array_equal(test.images[0].permute(1, 2, 0).numpy(), pixels)


@pytest.mark.parametrize("name, hint", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"),
                                        ("tiny-imagenet", "tiny-imagenet-200")])
def test_missing_dataset_error_says_how_to_provide_it(tmp_path, name, hint):
    with pytest.raises(DatasetNotFoundError) as info:
        load_images(name, "train", tmp_path)
    msg = str(info.value)
    assert hint in msg and str(tmp_path) in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_fashion_mnist_points_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("OVERUNLEARN_DEBIAN_FASHION_MNIST", str(tmp_path / "nothing"))
    with pytest.raises(DatasetNotFoundError, match="data prepare fashion-mnist"):
        load_images("fashion-mnist", "train", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path, tmp_path / "nothing")


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(KeyError, match="fashion-mnist"):
        load_images("imagenet-21k")


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_debian_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.delenv("OVERUNLEARN_DEBIAN_FASHION_MNIST", raising=False)
    prepare_fashion_mnist(tmp_path)
    test = load_images("fashion-mnist", "test", tmp_path)
    assert test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # the Debian files are also read directly when the layout is missing
    direct = load_images("fashion-mnist", "test", tmp_path / "empty")
    assert torch.equal(direct.images, test.images)


# ---------------------------------------------------------------------------------------------- CLI


def test_data_cli_status_and_prepare(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from overunlearn.cli import _register, app

    _register()
    src = tmp_path / "deb"
    _write_mnist_gz(src)
    runner = CliRunner()
    res = runner.invoke(app, ["data", "prepare", "fashion-mnist", "--data-root", str(tmp_path / "r"),
                              "--source", str(src)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["data", "status", "--data-root", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert "fashion-mnist" in res.output and "available" in res.output
    assert "cifar-10-batches-py" in res.output  # how to get the missing ones
    res = runner.invoke(app, ["data", "prepare", "cifar10"])
    assert res.exit_code != 0
