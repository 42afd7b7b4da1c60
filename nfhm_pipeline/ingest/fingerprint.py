"""A cheap fingerprint of a dataset's source: what the manifest sensor compares between ticks.

What each reader's fingerprint covers (the files hashed, the CSV column listing images, the folder
walked) is declared in its record, :data:`nfhm_pipeline.ingest.registry.READERS`. Plain Python, so
the manifest stage can record the fingerprint it was built from.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import json
import os
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

if TYPE_CHECKING:
    from nfhm_pipeline.catalog import DatasetSpec

from nfhm_pipeline.ingest.registry import READERS, ImageListing

# The manifest asset records its source's fingerprint under this metadata key (see the sensor).
SOURCE_FINGERPRINT_KEY = "source_fingerprint"
# Changing what goes into a fingerprint changes every digest once; the version says so.
_FINGERPRINT_RECIPE = "nfhm-source-fingerprint-v2"


# What each reader's source fingerprint covers (the files hashed, the CSV column listing images, the
# folder walked) is declared in its record, nfhm_pipeline.ingest.registry.READERS.
# Source files up to this size are hashed (streamed); bigger ones by size and mtime only.
_HASH_LIMIT_BYTES = 64 * 2**20
# At most this many image files are stat'ed per dataset. Above it, a fixed sample (chosen by a
# hash of the name, the same on every tick) plus the mtimes of the folders they sit in: an image
# added, removed or renamed changes its folder; one rewritten in place is seen when sampled.
STAT_SAMPLE_LIMIT = 50_000
_CSV_CHUNK_ROWS = 200_000


class FingerprintTimeout(Exception):
    """A dataset's fingerprint ran past its time budget (a huge or slow source); retried next tick."""


@dataclass(frozen=True)
class SourceFingerprint:
    digest: str
    listed_rows: int  # rows of the listing read (CSV data rows, or files found in a folder)
    files_stated: int  # image files stat'ed: at most STAT_SAMPLE_LIMIT
    sampled: bool  # True when more files were listed than stat'ed


def _file_state(path: str | os.PathLike) -> str:
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        return f"{path}:unreadable:{getattr(exc, 'strerror', None) or type(exc).__name__}"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _check(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise FingerprintTimeout(f"fingerprinting {what} ran past its time budget")


def _hash_file(h, path: str, deadline: float | None) -> None:
    """Size and mtime of ``path``, and its bytes when it is a regular file under the hash limit."""
    h.update(_file_state(path).encode())
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _HASH_LIMIT_BYTES:
            return
        with open(path, "rb") as handle:
            while block := handle.read(2**20):
                h.update(block)
                _check(deadline, path)
    except (OSError, ValueError):
        pass  # the state above already says it is unreadable


def _listed_names(spec: DatasetSpec, listing: ImageListing,
                  deadline: float | None) -> tuple[Path, list[str], int, bool]:
    """(root the names are relative to, a sample of at most STAT_SAMPLE_LIMIT distinct listed names,
    rows read, whether names were left out of the sample). Reads only the path column, in chunks."""
    import csv

    import pandas as pd

    from nfhm_pipeline.catalog import CSV_DELIMITERS

    csv_path = Path(spec.params[listing.csv_field]).absolute()
    sep = CSV_DELIMITERS.get(spec.params.get("delimiter") or ",", ",")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        header = [c.strip() for c in next(csv.reader(handle, delimiter=sep), [])]
    column = listing.path_column(header, spec.params)
    if column is None or column not in header:
        raise KeyError(f"no path column {column!r}")
    position = header.index(column)
    root = Path(os.path.abspath(spec.params.get(listing.root_field) or csv_path.parent))
    # The names whose hash is smallest: a bounded sample that is the same on every tick.
    kept = pd.Series([], dtype=object)
    rows, truncated = 0, False
    for chunk in pd.read_csv(csv_path, usecols=[position], dtype=str, keep_default_na=False, sep=sep,
                             encoding="utf-8-sig", chunksize=_CSV_CHUNK_ROWS):
        _check(deadline, str(csv_path))
        rows += len(chunk)
        names = chunk.iloc[:, 0].str.strip()
        names = pd.concat([kept, names[names != ""]]).drop_duplicates()
        names.index = pd.util.hash_pandas_object(names, index=False).to_numpy()
        if len(names) > STAT_SAMPLE_LIMIT:
            truncated = True
            names = names.sort_index(kind="stable").iloc[:STAT_SAMPLE_LIMIT]
        kept = names
    return root, sorted(kept.tolist()), rows, truncated


def _stat_sample(h, paths: list[str], truncated: bool, deadline: float | None, what: str) -> None:
    for i, path in enumerate(paths):
        if i % 1024 == 0:
            _check(deadline, what)
        h.update(_file_state(path).encode())
    if truncated:
        for folder in sorted({os.path.dirname(p) for p in paths}):
            h.update(_file_state(folder).encode())


def fingerprint_source(spec: DatasetSpec, *, deadline: float | None = None) -> SourceFingerprint:
    """A digest that changes when a dataset's source changes, cheap enough for every sensor tick.

    Covers the catalog entry (reader + parameters), the bytes of the files its reader record
    hashes (``hashed_fields``: CSV, taxonomy CSV, .npz; size and mtime only above 64 MiB), and
    name, size and mtime of the image files it lists (``listing``: only the path column of the CSV
    is read) or contains (``walked_field``: every name, sizes and mtimes of a bounded sample).
    Generated demo sources have no outside input: their fingerprint is their parameters. A missing or unreadable source is part of the digest, never an error, so the run
    requested reports the problem and fixing it fires the sensor again. ``deadline``
    (``time.monotonic()``): raise :class:`FingerprintTimeout` once past it.
    """
    h = hashlib.sha256(json.dumps([_FINGERPRINT_RECIPE, spec.reader, spec.params], sort_keys=True,
                                  default=str).encode())
    record = READERS[spec.reader]
    for key in record.hashed_fields:
        if spec.params.get(key):
            _hash_file(h, str(spec.params[key]), deadline)
    listed_rows, stated, truncated = 0, 0, False
    if record.listing is not None:
        import pandas as pd

        try:
            root, names, listed_rows, truncated = _listed_names(spec, record.listing, deadline)
        except FingerprintTimeout:
            raise
        except (OSError, ValueError, KeyError, UnicodeDecodeError, pd.errors.ParserError,
                pd.errors.EmptyDataError, StopIteration) as exc:
            h.update(f"unlisted:{type(exc).__name__}".encode())
        else:
            paths = [os.path.normpath(n if os.path.isabs(n) else os.path.join(root, n)) for n in names]
            _stat_sample(h, paths, truncated, deadline, spec.name)
            stated = len(paths)
    root = spec.params.get(record.walked_field) if record.walked_field else None
    if root and Path(root).is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            _check(deadline, str(root))
            dirnames.sort()
            for name in sorted(filenames):
                files.append(os.path.join(dirpath, name))
        h.update("\n".join(files).encode())  # every name: an added or removed file always counts
        listed_rows = len(files)
        if len(files) > STAT_SAMPLE_LIMIT:
            truncated = True
            files = sorted(sorted(files, key=lambda f: zlib.crc32(f.encode()))[:STAT_SAMPLE_LIMIT])
        _stat_sample(h, files, truncated, deadline, spec.name)
        stated = len(files)
    return SourceFingerprint(h.hexdigest(), listed_rows, stated, truncated)


def source_fingerprint(spec: DatasetSpec) -> str:
    """The digest of :func:`fingerprint_source`, without a time limit (what the manifest records)."""
    return fingerprint_source(spec).digest


