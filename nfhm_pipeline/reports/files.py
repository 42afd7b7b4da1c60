"""Where report files go and how they are written.

Every file or folder name built from a catalog value (dataset, model and level names) goes through
:func:`safe_name`, and every path through :func:`inside`, so no name reaches outside the report
folder: a level named ``../../x`` becomes a plain file name, and a path that would still resolve
elsewhere (a symlink planted inside the folder) is refused. Writes are atomic (temp file + rename,
:mod:`nfhm_pipeline.store.files`) and any OS error, a full disk included, becomes a StorageError
naming the path.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.store.files import atomic_path, cannot_write

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SUFFIX = re.compile(r"^(.+?)(\.[A-Za-z0-9]{1,5})$")
_MAX_STEM = 80    # a rewritten name's readable part
_MAX_NAME = 200   # under the 255-byte file-name limit


def safe_name(name) -> str:
    """``name`` as one file-name component of ``[A-Za-z0-9._-]``, not starting with '.', '_' or '-'.

    A name that is already such a component is returned unchanged (so ``species`` stays
    ``species``). Any other gets its unsafe runs replaced by '_' plus 8 hex digits of its hash
    (before a file suffix such as ``.png``, which is kept), so two different names never share a
    file: ``genus species`` → ``genus_species-1a2b3c4d``, which differs from the plain
    ``genus_species``; ``../../x`` → ``x-…``.
    """
    text = str(name)
    if text and not _UNSAFE.search(text) and text[0] not in "._-" and len(text) <= _MAX_NAME:
        return text
    match = _SUFFIX.match(text)
    stem, suffix = (match.group(1), match.group(2)) if match else (text, "")
    slug = _UNSAFE.sub("_", stem).strip("._-")[:_MAX_STEM]
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug or 'x'}-{digest}{suffix}"


def inside(folder: str | os.PathLike, *names) -> Path:
    """``folder / safe_name(n1) / safe_name(n2) / ...``, checked to resolve inside ``folder``.

    Build composite file names from safe pieces, e.g. ``inside(out, f"knn_{safe_name(level)}.png")``:
    a name made only of safe characters passes through unchanged.
    """
    root = Path(folder).resolve()
    path = root.joinpath(*(safe_name(n) for n in names))
    if not path.resolve().is_relative_to(root):
        raise StorageError(f"refusing to write {path}: it resolves to {path.resolve()}, outside the report "
                           f"folder {root} (a symlink inside it?); remove the link")
    return path


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create the folder ``path`` (and parents); a StorageError naming it when that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(cannot_write(path, exc)) from None
    return path


# Yield a temp path beside ``path``; on success it replaces ``path``, on error it is removed; an
# OSError is a StorageError naming ``path`` (the one writer: :func:`nfhm_pipeline.store.files.atomic_path`).
atomic_target = atomic_path
