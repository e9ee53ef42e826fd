"""The built-in corpus: the ``*.py`` sources of the running Python's standard library.

Every Python install ships them, so the demo model trains on real, varied text with no download.
What is left out, and why:

* ``site-packages`` / ``dist-packages``: third-party code differs from machine to machine.
* ``test`` / ``tests`` folders, ``idlelib``, ``lib2to3``: the test suites alone are larger than the
  rest of the library and full of deliberately odd files (bad encodings, huge generated cases),
  ``idlelib`` is mostly its own tests and ``lib2to3`` is a deprecated parser with fixtures.
* ``__pycache__``: compiled files, not source.
* ``encodings``: about a hundred generated codec tables that differ only in their byte values;
  with some in train and some in val they would make validation loss look far better than it is.

The train/val split is decided per file by a stable hash (crc32) of its path relative to the
library root, so it is the same on every run and every machine that has that file, and no file
lands in both splits. Python's ``hash()`` is salted per process and must not be used for this.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from pathlib import Path

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "encodings"}
)
SPLITS = ("train", "val")


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """All corpus source files under ``root`` (default: the stdlib), sorted by relative path.

    Folders in ``EXCLUDED_DIRS`` are pruned during the walk (not filtered afterwards) because
    ``site-packages`` and ``test`` hold most of the files and walking them is the slow part.
    """
    root = Path(root) if root is not None else stdlib_root()
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    found.sort(key=lambda item: item[0])
    return [path for _, path in found]


def split_of(relative_path: str, val_fraction: float = 0.05) -> str:
    """``"val"`` or ``"train"`` for a file, from the crc32 of its relative POSIX path."""
    bucket = zlib.crc32(relative_path.encode("utf-8")) / 2**32  # uniform in [0, 1)
    return "val" if bucket < val_fraction else "train"


def split_files(
    split: str = "train", *, val_fraction: float = 0.05, root: str | Path | None = None
) -> list[Path]:
    """The files of one split, in the same sorted order as :func:`stdlib_files`."""
    _check_split(split, val_fraction)
    root = Path(root) if root is not None else stdlib_root()
    return [
        p for p in stdlib_files(root) if split_of(p.relative_to(root).as_posix(), val_fraction) == split
    ]


def load_corpus(
    split: str = "train",
    *,
    max_bytes: int | None = None,
    val_fraction: float = 0.05,
    root: str | Path | None = None,
) -> list[bytes]:
    """Documents (one per file, raw bytes) of one split, in sorted-path order.

    Args:
        split: ``"train"`` or ``"val"``.
        max_bytes: cap on the total size. Whole files are taken in order; a file that would push
            the total over the cap is skipped and later, smaller files may still fit. ``None``
            loads everything (about 10 MB of text for CPython 3.11).
        val_fraction: share of files (by hash of the path) that go to ``"val"``; in (0, 1).
        root: another folder to read instead of the stdlib (tests, custom corpora).

    Returns:
        ``list[bytes]``, one document per file; files that cannot be read are skipped.

    Example::

        docs = load_corpus("train", max_bytes=2_000_000)
        sum(map(len, docs)) <= 2_000_000
    """
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0):
        raise ValueError(f"max_bytes: expected a positive int or None, got {max_bytes!r}")
    files = split_files(split, val_fraction=val_fraction, root=root)
    docs: list[bytes] = []
    total = 0
    for path in files:
        if max_bytes is not None:
            if total >= max_bytes:
                break
            try:
                if path.stat().st_size > max_bytes - total:  # skip before reading it
                    continue
            except OSError:
                continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if not data:
            continue  # empty __init__.py files add nothing but EOS tokens
        if max_bytes is not None and total + len(data) > max_bytes:
            continue  # the file changed size between stat and read
        docs.append(data)
        total += len(data)
    if not docs:
        where = root if root is not None else stdlib_root()
        raise ValueError(
            f"corpus: split {split!r} of {where} is empty (no readable, non-empty .py files"
            f"{'' if max_bytes is None else f' of at most max_bytes={max_bytes} bytes'})"
        )
    return docs


def _check_split(split: str, val_fraction: float) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
