"""Lay files that are already on this machine into torchvision's layout (no network)."""

from __future__ import annotations

import os
from pathlib import Path

from overunlearn.data.sources import (
    DEBIAN_FASHION_MNIST,
    MNIST_FILES,
    check_mnist_pair,
    default_data_root,
    parse_idx,
    read_maybe_gzip,
)
from overunlearn.errors import DatasetNotFoundError
from overunlearn.storage import atomic_write_bytes


def prepare_fashion_mnist(root: str | os.PathLike | None = None, source: str | os.PathLike | None = None,
                          link: bool = True) -> Path:
    """Put Debian's Fashion-MNIST into ``<root>/FashionMNIST/raw/`` for ``torchvision.datasets.FashionMNIST``.

    The ``.gz`` files are symlinked (or copied with ``link=False``) and decompressed next to
    them, because torchvision reads the uncompressed IDX files. All four files are checked
    (complete gzip streams, well-formed IDX files, as many labels as images) before anything
    is laid out, so a bad source leaves ``raw/`` as it was; every output is replaced atomically,
    so rerunning is safe (idempotent).

    Args:
        root: the data root (``--data-root``); default :func:`default_data_root`.
        source: the folder holding the four ``*-ubyte.gz`` files; default
            ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
        link: symlink the ``.gz`` files instead of copying them.

    Returns:
        the ``raw`` folder that was filled.

    Raises:
        DatasetNotFoundError: a source file is missing.
        DatasetFileError: a source file is unusable (the message names it).
        NotADirectoryError, PermissionError: ``raw/`` cannot be created (the message says where).
    """
    src = Path(source) if source is not None else DEBIAN_FASHION_MNIST
    base = Path(root) if root is not None else default_data_root()
    names = [f for files in MNIST_FILES.values() for f in files]
    missing = [n + ".gz" for n in names if not (src / (n + ".gz")).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST source files {missing} are not in {src}. On Debian/Ubuntu install them with "
            "`apt install dataset-fashion-mnist`, or pass --source DIR pointing at the four *-ubyte.gz files.")
    # check every source file before writing anything: a bad one must not leave a half-filled raw/
    decoded: dict[str, bytes] = {}
    for images_name, labels_name in MNIST_FILES.values():
        pair = []
        for n in (images_name, labels_name):
            decoded[n] = read_maybe_gzip(src / (n + ".gz"))
            pair.append(parse_idx(decoded[n], src / (n + ".gz")))
        check_mnist_pair(pair[0], pair[1], src / (images_name + ".gz"), src / (labels_name + ".gz"))
    raw = base / "FashionMNIST" / "raw"
    try:
        raw.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as exc:  # a file in the way, or no rights
        blocker = next((p for p in raw.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else str(exc.strerror)
        raise type(exc)(f"cannot create the folder {raw}: {why}; --data-root must be a folder this user can "
                        "write to") from None
    for n in names:
        gz = src / (n + ".gz")
        target = raw / (n + ".gz")
        if target.parent.resolve() == gz.parent.resolve():
            pass  # (the source is this very file: --source pointing at the laid-out folder; leave it be)
        elif link:
            _replace_with_symlink(target, gz.resolve())
        else:
            atomic_write_bytes(target, gz.read_bytes())
        atomic_write_bytes(raw / n, decoded[n])
    return raw


def _replace_with_symlink(target: Path, points_to: Path) -> None:
    """Make ``target`` a symlink to ``points_to`` in one rename (a reader never finds it missing)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a killed run of this process id
    tmp.symlink_to(points_to)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["prepare_fashion_mnist"]
