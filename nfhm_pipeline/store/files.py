"""The one atomic file writer: a temp file in the target's folder, renamed onto the target.

Every file the pipeline writes (manifests, lake tables, checkpoints, reports, figures, cached
pixels, catalogs) goes through :func:`atomic_path`, so a reader never sees half a file and a
failed write never replaces a good one:

- the temp file is ``.<name>.<uuid>.tmp`` beside the target (same file system, so
  :func:`os.replace` is atomic), created with the mode ``open()`` would give (``0o666`` less
  the umask), not ``mkstemp``'s ``0o600``;
- on success it is renamed onto the target; on ANY exception (``KeyboardInterrupt`` too) it is
  removed and the exception goes on;
- an ``OSError`` (a full disk, a read-only folder, a parent that is a file) becomes a
  :class:`~nfhm_pipeline.errors.StorageError` naming the target; the previous file stays as it was.

Object storage (``s3://`` lakes) has no rename, but one PUT is already atomic:
:func:`write_parquet_table` writes there in place through the pyarrow file system.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

from nfhm_pipeline.errors import StorageError

WRITE_HINT = ("check that the folder is writable and has free space "
              "(or point NFHM_DATA_DIR at another folder)")


def cannot_write(path, exc: OSError, hint: str = WRITE_HINT) -> str:
    """The sentence of a StorageError for a write of ``path`` that failed with ``exc``."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"cannot write {path}: {reason}; {hint}"


def temp_name(path: str | os.PathLike, suffix: str = "") -> str:
    """The name of a temp file for ``path``: ``.<name>.<uuid>.tmp<suffix>`` (hidden, unique)."""
    return f".{os.path.basename(os.fspath(path))}.{uuid.uuid4().hex}.tmp{suffix}"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str = "", hint: str = WRITE_HINT) -> Iterator[Path]:
    """Yield a new, empty temp file beside ``path`` to write; on success it replaces ``path``.

    ``suffix`` ends the temp name (for writers that look at it, e.g. ``.yaml``); ``hint`` ends a
    StorageError's sentence (what the person can do). The parent folder is created.
    """
    path = Path(path)
    tmp = path.with_name(temp_name(path, suffix))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL: the name is ours alone; mode 0o666 goes through the umask like open()'s
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise StorageError(cannot_write(path, exc, hint)) from None
    renamed = False
    try:
        yield tmp
        os.replace(tmp, path)
        renamed = True
    except OSError as exc:
        raise StorageError(cannot_write(path, exc, hint)) from None
    finally:
        if not renamed:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes, *, skip_if_identical: bool = False,
                hint: str = WRITE_HINT) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    ``skip_if_identical``: when the file already holds exactly ``data``, touch nothing (keeps its
    time stamps; regenerating a collection is then cheap).
    """
    path = Path(path)
    if skip_if_identical and is_identical(path, data):
        return path
    with atomic_path(path, hint=hint) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def is_identical(path: str | os.PathLike, data: bytes) -> bool:
    """Whether ``path`` is a file holding exactly ``data`` (False when it cannot be read)."""
    path = Path(path)
    try:
        return path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data
    except OSError:
        return False


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", hint: str = WRITE_HINT) -> Path:
    """Write ``text`` to ``path`` atomically (``encoding``, no newline translation) and return the path."""
    return write_bytes(path, text.encode(encoding), hint=hint)


def write_parquet(frame, path: str | os.PathLike, *, hint: str = WRITE_HINT) -> Path:
    """Write the pandas ``frame`` (without its index) as Parquet to the local ``path`` atomically."""
    path = Path(path)
    with atomic_path(path, hint=hint) as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def write_parquet_table(table, path: str, filesystem=None, *, hint: str = WRITE_HINT, **options) -> str:
    """Write the pyarrow ``table`` to ``path`` on ``filesystem`` (a pyarrow FileSystem; None = local);
    ``options`` go to ``pyarrow.parquet.write_table``.

    Local paths go through :func:`atomic_path`; on object storage the single PUT is atomic already
    and the object is written in place. Either way an OSError becomes a StorageError naming ``path``.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
        with atomic_path(path, hint=hint) as tmp:
            pq.write_table(table, str(tmp), **options)
        return path
    parent = path.rsplit("/", 1)[0]
    try:
        filesystem.create_dir(parent, recursive=True)
        pq.write_table(table, path, filesystem=filesystem, **options)
    except OSError as exc:
        raise StorageError(cannot_write(path, exc, hint)) from None
    return path
