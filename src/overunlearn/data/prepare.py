"""Lay files that are already on this machine into torchvision's layout (no network)."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

from overunlearn.data.sources import DEBIAN_FASHION_MNIST, MNIST_FILES, default_data_root, read_idx
from overunlearn.errors import DatasetNotFoundError
from overunlearn.storage import atomic_write_bytes


def prepare_fashion_mnist(root: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
                          link: bool = True) -> Path:
    """Put Debian's Fashion-MNIST into ``<root>/FashionMNIST/raw/`` for ``torchvision.datasets.FashionMNIST``.

    The ``.gz`` files are symlinked (or copied with ``link=False``) and decompressed next to
    them, because torchvision reads the uncompressed IDX files. Every file is checked to be a
    well-formed IDX file first. Idempotent: existing outputs are rewritten atomically.

    Args:
        root: the data root (``--data-root``); default :func:`default_data_root`.
        source: the folder holding the four ``*-ubyte.gz`` files; default
            ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
        link: symlink the ``.gz`` files instead of copying them.

    Returns:
        the ``raw`` folder that was filled.
    """
    src = Path(source) if source is not None else DEBIAN_FASHION_MNIST
    base = Path(root) if root is not None else default_data_root()
    names = [f for files in MNIST_FILES.values() for f in files]
    missing = [n + ".gz" for n in names if not (src / (n + ".gz")).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST source files {missing} are not in {src}. On Debian/Ubuntu install them with "
            "`apt install dataset-fashion-mnist`, or pass --source DIR pointing at the four *-ubyte.gz files.")
    raw = base / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for n in names:
        gz = src / (n + ".gz")
        read_idx(gz)  # validates the file (magic number, sizes)
        target = raw / (n + ".gz")
        if target.is_symlink() or target.exists():
            target.unlink()
        if link:
            target.symlink_to(gz.resolve())
        else:
            shutil.copyfile(gz, target)
        with gzip.open(gz, "rb") as fh:
            atomic_write_bytes(raw / n, fh.read())
    return raw


__all__ = ["prepare_fashion_mnist"]
