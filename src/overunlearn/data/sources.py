"""Image dataset sources: files already on disk, loaded once into uint8 tensors.

Every source returns an :class:`ImageSet` -- ``images`` as a ``uint8`` tensor of shape
``(N, C, H, W)`` (``C`` is 1 for grayscale, 3 for RGB) and ``labels`` as ``int64`` -- so the
benchmarks colour, normalise and batch whole tensors instead of running per-sample PIL
transforms.

Sources (``name``: where the files must be, relative to ``--data-root``):

* ``mnist``: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (torchvision's layout; the
  files ``torchvision.datasets.MNIST(root, download=False)`` reads, read here by :func:`read_idx`).
* ``fashion-mnist``: ``FashionMNIST/raw/...`` likewise. ``overunlearn data prepare fashion-mnist``
  lays Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``) into
  this layout; when the layout is missing but the Debian files are installed they are read
  directly (read-only), so the package alone is enough.
* ``cifar10``: ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (the python version of
  CIFAR-10, as torchvision unpacks it). The batches are pickles; they are read with a restricted
  unpickler that only admits numpy arrays, and their md5 sums are not checked.
* ``tiny-imagenet``: ``tiny-imagenet-200/train/<wnid>/...`` read with ``ImageFolder``; the
  validation set (used as the test set) either reorganised into class folders
  ``tiny-imagenet-200/val/<wnid>/...`` or in the original layout ``val/images`` +
  ``val/val_annotations.txt``. The decoded tensors are cached under
  ``<cache>/decoded/`` (keyed by the file list and sizes).
* ``digits``: scikit-learn's bundled 8x8 digits (1,797 images, always available), upsampled
  x3 (nearest) and zero-padded to 28x28; images with index ``i % 5 == 0`` form the test split.

Nothing is downloaded unless ``download=True`` is passed explicitly (``--download`` on the
command line), and then only through torchvision's own ``download=True`` for MNIST,
Fashion-MNIST and CIFAR-10. A missing dataset raises :class:`DatasetNotFoundError` whose
message says exactly which files to put where; a file that is there but unusable (truncated,
corrupt, of another format) raises :class:`DatasetFileError` naming it and saying to delete it and
provide it again.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from overunlearn.errors import DatasetFileError, DatasetNotFoundError

Split = Literal["train", "test"]

#: where Debian's ``dataset-fashion-mnist`` package installs its files
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: (height, width) of every MNIST / Fashion-MNIST image
MNIST_SIZE = (28, 28)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass
class ImageSet:
    """Images as ``uint8 (N, C, H, W)``, labels as ``int64 (N,)``."""

    name: str
    split: str
    images: Tensor
    labels: Tensor
    num_classes: int
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: {self.labels.shape[0]} labels for {self.images.shape[0]} images")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, index: Tensor) -> ImageSet:
        return ImageSet(self.name, self.split, self.images[index], self.labels[index], self.num_classes, self.classes)


def default_data_root() -> Path:
    """``$OVERUNLEARN_DATA`` if set, else ``data/`` under the cache root (:func:`overunlearn.storage.default_cache_dir`)."""
    env = os.environ.get("OVERUNLEARN_DATA")
    if env:
        return Path(env)
    from overunlearn.storage import default_cache_dir

    return default_cache_dir() / "data"


# ---------------------------------------------------------------------------------------------
# readers


def bad_file(path: str | os.PathLike, why: str, cls: type[DatasetFileError] = DatasetFileError) -> DatasetFileError:
    """The error (of class ``cls``) for a dataset file that is there but unusable: names it, says why and
    what to do."""
    return cls(f"dataset file {path} is unusable: {why}. Delete it and provide the file again "
               "(`overunlearn data status` says where each dataset's files come from)", str(path))


def read_maybe_gzip(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``, decompressed when its name ends in ``.gz``.

    Raises:
        DatasetFileError: a ``.gz`` file is not a complete gzip stream (garbage, cut short).
    """
    path = Path(path)
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:  # not gzip / cut short / damaged stream
        raise bad_file(path, f"not a complete gzip file ({exc})") from None


#: IDX type code -> numpy dtype (big-endian where multi-byte)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(data: bytes, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decode the bytes of an IDX file (MNIST format); ``path`` only names it in errors.

    Raises:
        DatasetFileError: bad magic number, unknown type, or a size that disagrees with the header
            (a truncated file, or one with bytes after the data).
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise bad_file(path, "not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code not in _IDX_DTYPES:
        raise bad_file(path, f"unknown IDX data type 0x{dtype_code:02x}")
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise bad_file(path, f"the IDX header is cut short ({len(data)} of {offset} bytes)")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_DTYPES[dtype_code])
    expected = offset + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        state = "truncated: " if len(data) < expected else ""
        raise bad_file(path, f"{state}its header says shape {dims} ({expected} bytes) but the file has "
                             f"{len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or not.

    Raises:
        DatasetFileError: the file is not a complete, well-formed IDX file (see :func:`parse_idx`).
    """
    return parse_idx(read_maybe_gzip(path), path)


def check_mnist_pair(images: np.ndarray, labels: np.ndarray, image_path: str | os.PathLike,
                     label_path: str | os.PathLike) -> None:
    """Check one split read from IDX files: ``uint8`` 28x28 images, one label in 0..9 per image.

    Raises:
        DatasetFileError: naming the file at fault.
    """
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != MNIST_SIZE:
        raise bad_file(image_path, f"expected uint8 images of shape (N, 28, 28), got {images.dtype} "
                                   f"{tuple(images.shape)}")
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise bad_file(label_path, f"expected a uint8 vector of labels, got {labels.dtype} {tuple(labels.shape)}")
    if len(labels) != len(images):
        raise bad_file(label_path, f"it holds {len(labels)} labels for the {len(images)} images of "
                                   f"{Path(image_path).name}")
    if labels.size and int(labels.max()) > 9:
        raise bad_file(label_path, f"label {int(labels.max())} is not a class (0..9)")


class UnsafePickleError(DatasetFileError, pickle.UnpicklingError):
    """A CIFAR batch holds objects other than numpy arrays (unpickling them could run code). Also a
    :class:`pickle.UnpicklingError`, for callers that catch that."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admit only what a CIFAR batch needs (numpy arrays, dtypes, builtin containers)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _load_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``uint8 (N, 3, 32, 32)`` and labels ``int64 (N,)`` of one CIFAR-10 python batch.

    Raises:
        DatasetFileError: the file is not a complete CIFAR-10 batch (:class:`UnsafePickleError` when it
            holds objects other than numpy arrays).
    """
    with open(path, "rb") as fh:
        try:
            entry = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
        except UnsafePickleError as exc:
            raise bad_file(path, str(exc), UnsafePickleError) from None
        except MemoryError:
            raise
        except Exception as exc:  # garbage or a cut pickle fails in many ways (EOFError, ValueError, ...)
            raise bad_file(path, f"not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(entry, dict):
        raise bad_file(path, f"not a CIFAR-10 python batch (it holds a {type(entry).__name__}, not a dict)")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    labels = entry.get("labels", entry.get("fine_labels"))
    if "data" not in entry or labels is None:
        raise bad_file(path, "not a CIFAR-10 python batch (no 'data'/'labels')")
    try:
        data = np.asarray(entry["data"], dtype=np.uint8)
        targets = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad_file(path, f"its 'data' or 'labels' are not arrays of numbers ({exc})") from None
    if data.size % (3 * 32 * 32) or targets.ndim != 1 or data.size // (3 * 32 * 32) != len(targets):
        raise bad_file(path, f"its {data.size} bytes of 'data' are not 3x32x32 images, one per each of its "
                             f"{targets.size} labels")
    if targets.size and (int(targets.min()) < 0 or int(targets.max()) > 9):
        raise bad_file(path, "its labels are not all classes 0..9")
    return data.reshape(-1, 3, 32, 32), targets


# ---------------------------------------------------------------------------------------------
# sources


@dataclass(frozen=True)
class Source:
    """One dataset: how to find it under a root, load it, and tell the user how to provide it."""

    name: str
    description: str
    num_classes: int
    image_size: tuple[int, int]
    channels: int
    find: Callable[[Path], Path | None]
    load: Callable[[Path, str], ImageSet]
    how_to: Callable[[Path], str]
    downloadable: bool = False


def _mnist_like(folder: str, debian: Path | None = None):
    def find(root: Path) -> Path | None:
        raw = root / folder / "raw"
        if all((raw / f).is_file() for files in MNIST_FILES.values() for f in files):
            return raw
        if debian is not None:
            deb = _debian_dir(debian)
            if all((deb / (f + ".gz")).is_file() for files in MNIST_FILES.values() for f in files):
                return deb
        return None

    return find


def _debian_dir(default: Path) -> Path:
    return Path(os.environ.get("OVERUNLEARN_DEBIAN_FASHION_MNIST", str(default)))


def _load_mnist_like(name: str, folder: str, classes: tuple[str, ...], debian: Path | None = None):
    def load(root: Path, split: str) -> ImageSet:
        raw = root / folder / "raw"
        img_f, lab_f = MNIST_FILES[split]
        if (raw / img_f).is_file() and (raw / lab_f).is_file():  # torchvision's layout, uncompressed
            img_p, lab_p = raw / img_f, raw / lab_f
        elif debian is not None and (_debian_dir(debian) / (img_f + ".gz")).is_file():
            deb = _debian_dir(debian)
            img_p, lab_p = deb / (img_f + ".gz"), deb / (lab_f + ".gz")
        else:
            raise DatasetNotFoundError(_SOURCES[name].how_to(root))
        images, labels = read_idx(img_p), read_idx(lab_p)
        check_mnist_pair(images, labels, img_p, lab_p)
        return ImageSet(name, split, torch.from_numpy(images.copy()).unsqueeze(1).contiguous(),
                        torch.from_numpy(labels.astype(np.int64)), 10, classes)

    return load


def _mnist_how_to(folder: str, pretty: str, extra: str = ""):
    def how_to(root: Path) -> str:
        files = ", ".join(f for fs in MNIST_FILES.values() for f in fs)
        return (f"{pretty} was not found under {root}: torchvision's layout needs the uncompressed IDX files "
                f"{files} in {root / folder / 'raw'}. {extra}Or let torchvision fetch it once with `overunlearn "
                f"bench erase --dataset ... --download` (needs network access).")

    return how_to


def _cifar_find(root: Path) -> Path | None:
    base = root / "cifar-10-batches-py"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return base if all((base / f).is_file() for f in files) else None


def _cifar_load(root: Path, split: str) -> ImageSet:
    base = _cifar_find(root)
    if base is None:
        raise DatasetNotFoundError(_SOURCES["cifar10"].how_to(root))
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = [_load_cifar_batch(base / n) for n in names]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageSet("cifar10", split, images, labels, 10, CIFAR10_CLASSES)


def _cifar_how_to(root: Path) -> str:
    return (f"CIFAR-10 was not found under {root}: extract cifar-10-python.tar.gz "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) so that {root / 'cifar-10-batches-py'} holds "
            "data_batch_1 ... data_batch_5 and test_batch, or let torchvision fetch it once with `overunlearn bench "
            "erase --dataset cifar10 --download` (needs network access).")


def _tiny_find(root: Path) -> Path | None:
    base = root / "tiny-imagenet-200"
    return base if (base / "train").is_dir() and (base / "val").is_dir() else None


def _pil_to_uint8(path: str, size: tuple[int, int]) -> np.ndarray:
    """One image file as ``uint8 (3, H, W)``; a file PIL cannot decode raises :class:`DatasetFileError`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]))
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's ways to fail
        raise bad_file(path, f"not a readable image ({type(exc).__name__}: {exc})") from None


def _tiny_load(root: Path, split: str) -> ImageSet:
    base = _tiny_find(root)
    if base is None:
        raise DatasetNotFoundError(_SOURCES["tiny-imagenet"].how_to(root))
    from torchvision.datasets import ImageFolder

    train = ImageFolder(str(base / "train"))
    classes = tuple(train.classes)
    if split == "train":
        samples = train.samples
    else:
        val = base / "val"
        ann = val / "val_annotations.txt"
        class_dirs = [d for d in val.iterdir() if d.is_dir() and d.name in train.class_to_idx]
        if class_dirs:
            vf = ImageFolder(str(val))
            remap = {i: train.class_to_idx[c] for c, i in vf.class_to_idx.items() if c in train.class_to_idx}
            samples = [(p, remap[t]) for p, t in vf.samples if t in remap]
        elif ann.is_file():
            samples = []
            for line in ann.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1] in train.class_to_idx:
                    samples.append((str(val / "images" / parts[0]), train.class_to_idx[parts[1]]))
        else:
            raise DatasetNotFoundError(f"{val} has neither class folders nor val_annotations.txt; "
                                       + _SOURCES["tiny-imagenet"].how_to(root))
    if not samples:
        raise DatasetNotFoundError(f"no images found for the {split} split of Tiny ImageNet under {base}")
    from overunlearn.errors import CacheFileError, CacheRebuiltWarning
    from overunlearn.storage import atomic_torch_save, default_cache_dir, safe_torch_load, stable_hash

    # decoding ~100k JPEGs takes minutes: keep the decoded uint8 tensors, keyed by the file list
    key = stable_hash([str(base.resolve()), split, [(p, t, os.path.getsize(p)) for p, t in samples]])
    cached = default_cache_dir() / "decoded" / f"tiny-imagenet-{split}-{key}.pt"
    if cached.is_file():
        try:
            d = safe_torch_load(cached)
            return ImageSet("tiny-imagenet", split, d["images"], d["labels"], len(classes), classes)
        except (CacheFileError, KeyError, TypeError) as exc:
            warnings.warn(f"decoded-image cache {cached} is unusable ({exc}); decoding the images again",
                          CacheRebuiltWarning, stacklevel=2)
            cached.unlink(missing_ok=True)
    images = torch.from_numpy(np.stack([_pil_to_uint8(p, (64, 64)) for p, _ in samples]))
    labels = torch.from_numpy(np.asarray([t for _, t in samples], dtype=np.int64))
    if len(samples) >= 1000:  # not worth it for small fixtures
        atomic_torch_save(cached, {"images": images, "labels": labels})
    return ImageSet("tiny-imagenet", split, images, labels, len(classes), classes)


def _tiny_how_to(root: Path) -> str:
    return (f"Tiny ImageNet was not found under {root}: unzip tiny-imagenet-200.zip "
            f"(http://cs231n.stanford.edu/tiny-imagenet-200.zip) so that {root / 'tiny-imagenet-200'} holds "
            "train/<wnid>/images/*.JPEG and val/ (either val/<wnid>/... class folders or the original "
            "val/images + val/val_annotations.txt). It cannot be downloaded by this tool.")


def _digits_load(root: Path, split: str) -> ImageSet:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))  # (1797, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    x = x.repeat_interleave(3, dim=1).repeat_interleave(3, dim=2)  # 24x24, nearest
    x = torch.nn.functional.pad(x, (2, 2, 2, 2))  # 28x28
    idx = torch.arange(len(y))
    keep = idx % 5 != 0 if split == "train" else idx % 5 == 0
    return ImageSet("digits", split, x[keep].unsqueeze(1).contiguous(), y[keep], 10, tuple(str(i) for i in range(10)))


_SOURCES: dict[str, Source] = {
    "mnist": Source("mnist", "MNIST handwritten digits (28x28 gray, 60k/10k)", 10, (28, 28), 1,
                    _mnist_like("MNIST"), _load_mnist_like("mnist", "MNIST", tuple(str(i) for i in range(10))),
                    _mnist_how_to("MNIST", "MNIST"), downloadable=True),
    "fashion-mnist": Source(
        "fashion-mnist", "Fashion-MNIST (28x28 gray, 60k/10k)", 10, (28, 28), 1,
        _mnist_like("FashionMNIST", DEBIAN_FASHION_MNIST),
        _load_mnist_like("fashion-mnist", "FashionMNIST", FASHION_CLASSES, DEBIAN_FASHION_MNIST),
        _mnist_how_to("FashionMNIST", "Fashion-MNIST",
                      "On Debian/Ubuntu: `apt install dataset-fashion-mnist` then "
                      "`overunlearn data prepare fashion-mnist --data-root ROOT`. "),
        downloadable=True),
    "cifar10": Source("cifar10", "CIFAR-10 (32x32 RGB, 50k/10k)", 10, (32, 32), 3, _cifar_find, _cifar_load,
                      _cifar_how_to, downloadable=True),
    "tiny-imagenet": Source("tiny-imagenet", "Tiny ImageNet (64x64 RGB, 200 classes, 100k/10k)", 200, (64, 64), 3,
                            _tiny_find, _tiny_load, _tiny_how_to),
    "digits": Source("digits", "scikit-learn digits (8x8 upsampled to 28x28 gray, 1437/360; bundled)", 10,
                     (28, 28), 1, lambda root: Path("<scikit-learn>"), _digits_load,
                     lambda root: "scikit-learn's digits are bundled with scikit-learn"),
}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
            "cifar-10": "cifar10", "cifar_10": "cifar10", "tiny_imagenet": "tiny-imagenet",
            "tinyimagenet": "tiny-imagenet", "tiny": "tiny-imagenet", "sklearn-digits": "digits"}


def canonical_name(name: str) -> str:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _SOURCES:
        raise KeyError(f"unknown dataset {name!r}; valid names: {', '.join(_SOURCES)}")
    return key


def get_source(name: str) -> Source:
    return _SOURCES[canonical_name(name)]


def list_sources() -> list[str]:
    return list(_SOURCES)


def dataset_location(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """Where the files of ``name`` were found under ``root`` (``None``: not available)."""
    src = get_source(name)
    return src.find(Path(root) if root is not None else default_data_root())


def _download(name: str, root: Path) -> None:
    from torchvision import datasets

    classes = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}
    if name not in classes:
        raise DatasetNotFoundError(f"{name} cannot be downloaded by this tool. " + _SOURCES[name].how_to(root))
    for train in (True, False):
        classes[name](str(root), train=train, download=True)


def load_images(name: str, split: Split = "train", root: str | os.PathLike | None = None,
                download: bool = False) -> ImageSet:
    """Load split ``split`` of dataset ``name`` from ``root`` into uint8 tensors.

    Raises:
        DatasetNotFoundError: the files are not there (the message says how to provide them).
        DatasetFileError: a file is there but unusable (truncated, corrupt); the message names it.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    key = canonical_name(name)
    src = _SOURCES[key]
    base = Path(root) if root is not None else default_data_root()
    if src.find(base) is None:
        if not download:
            raise DatasetNotFoundError(src.how_to(base))
        _download(key, base)
    return src.load(base, split)


__all__ = ["ImageSet", "Source", "load_images", "list_sources", "get_source", "canonical_name", "dataset_location",
           "default_data_root", "read_idx", "parse_idx", "read_maybe_gzip", "check_mnist_pair", "bad_file",
           "UnsafePickleError", "DEBIAN_FASHION_MNIST", "MNIST_SIZE"]
