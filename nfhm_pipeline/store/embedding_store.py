"""The embedding lake: per (dataset, model) a set of Parquet part files and an index of the current ones.

Layout under ``root`` (a local path or a URI such as ``s3://bucket/prefix``)::

    embeddings/dataset=<d>/model=<m>/_index.json
    embeddings/dataset=<d>/model=<m>/part-<shard>-<uuid>.parquet      (the current parts)
    embeddings/dataset=<d>/model=<m>/_staging/part-….parquet          (a run's new parts, local lakes)

A part holds the images whose ``image_id`` (the sha256 of the bytes, hex) starts with its shard
prefix of ``shard_digits`` hex digits (``all`` when the table is one part), in manifest order:
columns ``image_id`` and ``embedding`` (``FixedSizeList<float32>[dim]``, raw model output), the
model fingerprint in the file metadata. The shard width is chosen from the collection's size so a
part holds at most ~:data:`PART_ROWS` images (10k images: 16 parts; 1M: 256; 10M: 4,096) and is
kept while the collection stays within 16× of that size.

``_index.json`` names the current parts, the fingerprint, the dimension, and per part its shard,
row count and a digest of its image ids. It is the commit point of a run: written atomically
after every new part, and only then are the superseded parts deleted. So:

* a reader never sees a half-written table: it reads the parts the index names;
* a no-change rerun reads only the index (the digests say every shard holds the manifest's ids);
* adding or removing images rewrites only the parts they fall in; the others are kept as they are
  (on object storage: not uploaded again);
* no step holds more than one part's vectors plus one embedding chunk in memory to write;
* a run that dies keeps the previous index readable; its finished parts (``_staging/`` locally,
  unindexed parts on object storage) carry the fingerprint and are picked up by the next run; a
  shard larger than one embedding chunk is checkpointed per chunk (``_staging/ckpt-….parquet``).

A local lake stages new parts in ``_staging/`` and renames them into place just before the index
is written, so DuckDB's ``embeddings`` view (a glob over ``part-*.parquet``) shows a stale or a new
table, never a mix for longer than that rename. A table of the earlier layout (one
``embeddings.parquet`` per folder) is read as it is and migrated to parts by the next embedding run
(:meth:`EmbeddingStore.migrate`), without re-embedding.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.store.files import write_parquet_table, write_text
from nfhm_pipeline.store.remote import redact
from nfhm_pipeline.store.schemas import EMBEDDING_FINGERPRINT_KEY, embedding_schema

_LAKE_HINT = "check that the data folder (or storage root) is writable and has free space"
INDEX_NAME = "_index.json"
INDEX_FORMAT = "nfhm-embedding-parts-1"
LEGACY_TABLE = "embeddings.parquet"  # the single-file layout before parts
STAGING = "_staging"
PART_ROWS = 4096  # target images per part: 12 MB at 768 dims
_PART_NAME = re.compile(r"^part-(?P<shard>all|[0-9a-f]+)-[0-9a-f]{32}\.parquet$")
_CHECKPOINT_NAME = re.compile(r"^ckpt-[0-9a-f]{32}\.parquet$")  # a chunk of a shard still being embedded
_HEX_DIGITS = b"0123456789abcdef"


@dataclass
class EmbeddingTable:
    image_ids: np.ndarray  # str [N]
    vectors: np.ndarray  # float32 [N, dim]
    fingerprint: str

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.image_ids)


@dataclass
class EmbedReport:
    """What one incremental run did; counts are images, ``parts_*`` are part files.

    ``ids``: the stored image ids in manifest order (duplicates dropped), ``all_finite``: whether
    every stored vector is finite; both are gathered while the parts are written, so the asset's
    checks need no second read of the lake. ``table`` reads the stored table (in manifest order)
    when a caller wants the vectors themselves."""

    total: int
    new: int
    reused: int
    removed: int
    resumed: int
    seconds: float
    embed_seconds: float
    fingerprint: str
    dim: int
    path: str
    ids: list = field(default_factory=list)
    all_finite: bool = True
    parts_written: int = 0
    parts_kept: int = 0
    parts_removed: int = 0
    read_table: Callable[[], EmbeddingTable | None] | None = field(default=None, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.new / self.embed_seconds if self.embed_seconds > 0 else float("nan")

    @property
    def table(self) -> EmbeddingTable | None:
        return self.read_table() if self.read_table is not None else None


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" in str(root):
        try:
            return pafs.FileSystem.from_uri(str(root))
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"cannot open storage root {redact(root)}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(str(root))


def shard_digits_for(n_images: int) -> int:
    """Hex digits of the shard prefix for a table of ``n_images``: parts of at most ~PART_ROWS."""
    if n_images <= PART_ROWS:
        return 0
    return max(1, math.ceil(math.log(n_images / PART_ROWS, 16)))


def shard_of(image_id: str, digits: int) -> str:
    """The shard of ``image_id``: its first ``digits`` hex characters when it is a sha256 hex digest
    (as every manifest's ids are: uniformly spread). Any other id (a library caller's own, such as
    catalogue numbers "000123…", whose leading characters are far from uniform) is sharded by the
    sha256 of it, so parts stay near PART_ROWS rows whatever the ids look like."""
    if digits == 0:
        return "all"
    if all_digests((image_id,)):
        return image_id[:digits]
    return hashlib.sha256(image_id.encode()).hexdigest()[:digits]


def ids_digest(image_ids: Iterable[str]) -> str:
    """Order-free digest of a set of image ids (what a part holds, whatever its row order)."""
    ids = sorted(image_ids)
    # the bytes of "id\n" for each id in order, hashed in one update (as many updates would)
    return hashlib.sha256(("\n".join(ids) + "\n").encode() if ids else b"").hexdigest()


def _overlaps(a: str, b: str) -> bool:
    """Whether shards ``a`` and ``b`` (prefixes, 'all' = every id) can hold a common id."""
    if a == "all" or b == "all":
        return True
    return a.startswith(b) or b.startswith(a)


@dataclass
class _Part:
    file: str  # name inside the model folder
    shard: str
    rows: int
    digest: str

    def entry(self) -> dict:
        return {"file": self.file, "shard": self.shard, "rows": self.rows, "ids_sha256": self.digest}


@dataclass
class _Index:
    fingerprint: str
    dim: int
    shard_digits: int
    parts: list[_Part]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    def to_json(self) -> str:
        return json.dumps({"format": INDEX_FORMAT, "fingerprint": self.fingerprint, "dim": self.dim,
                           "shard_digits": self.shard_digits, "rows": self.rows,
                           "parts": [p.entry() for p in self.parts]}, indent=1, sort_keys=True)


class EmbeddingStore:
    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self.fs, self.base = _filesystem(self.root)
        self.remote = not isinstance(self.fs, pafs.LocalFileSystem)

    def folder(self, dataset: str, model: str) -> str:
        return f"{self.base}/embeddings/dataset={dataset}/model={model}"

    def index_path(self, dataset: str, model: str) -> str:
        return f"{self.folder(dataset, model)}/{INDEX_NAME}"

    def legacy_path(self, dataset: str, model: str) -> str:
        """The single-file table of the earlier layout (read, then migrated by the next run)."""
        return f"{self.folder(dataset, model)}/{LEGACY_TABLE}"

    def uri(self, dataset: str, model: str) -> str:
        """The table's folder as a path DuckDB and people can use (the URI scheme kept for remote roots)."""
        path = self.folder(dataset, model)
        if self.remote:
            return f"{self.root.split('://', 1)[0]}://{path}"
        return path

    # -- reading ---------------------------------------------------------------------------

    def _info(self, path: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(path)
        except OSError as exc:  # an unreachable endpoint or refused credentials on object storage
            raise StorageError(f"cannot reach the embedding lake {redact(self.root)}: {exc}; check the "
                               "storage root, the endpoint and the AWS_* credentials") from None

    def _is_file(self, path: str) -> bool:
        return self._info(path).type == pafs.FileType.File

    def _read_index(self, dataset: str, model: str) -> _Index | None:
        path = self.index_path(dataset, model)
        if not self._is_file(path):
            return None
        try:
            with self.fs.open_input_stream(path) as f:
                data = json.loads(f.read().decode("utf-8"))
            if data.get("format") != INDEX_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {INDEX_FORMAT!r}")
            parts = [_Part(str(p["file"]), str(p["shard"]), int(p["rows"]), str(p["ids_sha256"]))
                     for p in data["parts"]]
            return _Index(str(data["fingerprint"]), int(data["dim"]), int(data["shard_digits"]), parts)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"embedding index {path} is unreadable ({exc}); delete the folder "
                               f"{self.folder(dataset, model)} and re-run its embedding") from None

    def exists(self, dataset: str, model: str) -> bool:
        return self._is_file(self.index_path(dataset, model)) or self._is_file(self.legacy_path(dataset, model))

    def part_paths(self, dataset: str, model: str) -> list[str]:
        """The files of the current table: its indexed parts, or the single file of the earlier layout."""
        index = self._read_index(dataset, model)
        if index is not None:
            return [f"{self.folder(dataset, model)}/{p.file}" for p in index.parts]
        legacy = self.legacy_path(dataset, model)
        return [legacy] if self._is_file(legacy) else []

    def iter_parts(self, dataset: str, model: str) -> Iterator[EmbeddingTable]:
        """The current table one part at a time (memory: one part), in shard order."""
        for path in self.part_paths(dataset, model):
            yield _read_parquet(self.fs, path)

    def read(self, dataset: str, model: str, order: Sequence[str] | None = None, *,
             into: str | Path | None = None) -> EmbeddingTable | None:
        """The last complete table, or None if there is none.

        ``order`` (e.g. the manifest's image ids): the rows of those ids come first, in that order;
        stored ids not in it follow in stored order. Without it, rows come part by part.
        ``into`` (a local folder): the vectors are streamed part by part into a memory-mapped
        float32 file there (:func:`vector_file`) instead of concatenated in memory, so reading holds
        one part plus the ids; the mapped file is the table's only copy (its pages are the OS's to
        drop and re-read)."""
        index = self._read_index(dataset, model)
        paths = self.part_paths(dataset, model)
        if not paths:
            return None
        if into is not None:
            return self._read_mapped(index, paths, order, Path(into), f"{dataset}-{model}")
        pieces = [_read_parquet(self.fs, p) for p in paths]
        fingerprint = index.fingerprint if index is not None else pieces[0].fingerprint
        dim = index.dim if index is not None else pieces[0].dim
        ids = np.concatenate([p.image_ids for p in pieces]) if pieces else np.zeros(0, dtype=object)
        vectors = (np.concatenate([p.vectors for p in pieces]) if pieces
                   else np.zeros((0, dim), dtype=np.float32))
        take = _reading_order(ids, order)
        if take is not None:
            ids, vectors = ids[take], vectors[take]
        return EmbeddingTable(ids.astype(object), vectors, fingerprint)

    def _read_mapped(self, index, paths: list[str], order, folder: Path, name: str) -> EmbeddingTable:
        ids = np.asarray([iid for path in paths for iid in _read_ids(self.fs, path)], dtype=object)
        take = _reading_order(ids, order)
        take = np.arange(len(ids)) if take is None else take
        dest = np.full(len(ids), -1, dtype=np.int64)  # where each stored row goes, -1: not read
        dest[take] = np.arange(len(take))
        n_rows = len(take)
        fingerprint, out, start = index.fingerprint if index is not None else None, None, 0
        with vector_file(folder, name) as fill:
            for path in paths:
                piece = _read_parquet(self.fs, path)
                if out is None:
                    out = fill(n_rows, piece.dim)
                    fingerprint = fingerprint if fingerprint is not None else piece.fingerprint
                rows = dest[start:start + len(piece)]
                keep = rows >= 0  # a stored duplicate id: its last row is the one read
                if keep.all():  # (no masked copy of the part's vectors)
                    out[rows] = piece.vectors
                else:
                    out[rows[keep]] = piece.vectors[keep]
                start += len(piece)
            vectors = fill.done()
        return EmbeddingTable(ids[take].astype(object), vectors, fingerprint or "")

    def read_fingerprint(self, dataset: str, model: str) -> str | None:
        index = self._read_index(dataset, model)
        if index is not None:
            return index.fingerprint
        legacy = self.legacy_path(dataset, model)
        return self.file_fingerprint(legacy)

    def file_fingerprint(self, path: str) -> str | None:
        """The model fingerprint in the metadata of a lake file at ``path`` (image or text
        embeddings), or None when there is no such file."""
        if self._info(path).type != pafs.FileType.File:
            return None
        try:
            with self.fs.open_input_file(path) as f:
                meta = pq.read_schema(f).metadata or {}
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"embedding file {path} is unreadable ({exc}); delete it and re-run") from None
        return meta.get(EMBEDDING_FINGERPRINT_KEY, b"").decode() or None

    # -- writing ---------------------------------------------------------------------------

    def write(self, dataset: str, model: str, table: EmbeddingTable) -> str:
        """Replace the stored table by ``table`` (sharded into parts; rows of a part keep their
        order). Returns the path of its index, the file that names the table's parts."""
        vectors = np.asarray(table.vectors, dtype=np.float32)

        def embed_chunk(positions):  # positions are rows of the table (an id given twice: its first row)
            pos = list(positions)
            yield pos, vectors[pos] if pos else np.zeros((0, table.dim), np.float32)

        ids = [str(i) for i in table.image_ids]
        self.embed_incrementally(dataset, model, ids, table.fingerprint, embed_chunk, chunk_size=max(1, len(ids)),
                                 _replace=True, _dim=table.dim)
        return self.index_path(dataset, model)

    def migrate(self, dataset: str, model: str) -> bool:
        """Rewrite a table of the single-file layout as parts plus an index (no re-embedding).
        True when there was one to migrate."""
        if self._read_index(dataset, model) is not None or not self._is_file(self.legacy_path(dataset, model)):
            return False
        old = _read_parquet(self.fs, self.legacy_path(dataset, model))
        self.write(dataset, model, old)  # the commit deletes the legacy file and its _checkpoints
        return True

    def unchanged(self, dataset: str, model: str, image_ids: Sequence[str], fingerprint: str) -> EmbedReport | None:
        """The report of a run with nothing to do (new=0), when the stored table holds exactly
        ``image_ids`` (duplicates dropped) under ``fingerprint``; else None. Needs no embedder: with
        the fingerprint known beforehand (``FingerprintMemo``) no model is loaded. Reads only the
        index (a table of the earlier layout is migrated first)."""
        start = time.perf_counter()
        self.migrate(dataset, model)
        index = self._read_index(dataset, model)
        wanted = list(dict.fromkeys(str(i) for i in image_ids))
        if index is None or index.fingerprint != fingerprint or not self._all_parts_current(index, wanted):
            return None
        return self._unchanged_report(dataset, model, index, wanted, start)

    def _all_parts_current(self, index: _Index, wanted: list[str]) -> bool:
        if index.shard_digits != self._digits(index, len(wanted)):
            return False
        groups = _group_by_shard(wanted, index.shard_digits)
        have = {p.shard: p for p in index.parts}
        return set(groups) == set(have) and all(have[s].digest == ids_digest(ids) and have[s].rows == len(ids)
                                                for s, ids in groups.items())

    def _unchanged_report(self, dataset: str, model: str, index: _Index, wanted: list[str], start: float) -> EmbedReport:
        # Nothing new, nothing gone (the nightly re-embed): the stored parts are the answer as they
        # are; no copy, no rewrite (no re-upload on object storage). Left-over staging goes.
        self._delete_unindexed(dataset, model, index)
        return EmbedReport(total=len(wanted), new=0, reused=len(wanted), removed=0, resumed=0,
                           seconds=time.perf_counter() - start, embed_seconds=0.0, fingerprint=index.fingerprint,
                           dim=index.dim, path=self.uri(dataset, model), ids=wanted,
                           all_finite=True, parts_kept=len(index.parts),
                           read_table=lambda: self.read(dataset, model, order=wanted))

    @staticmethod
    def _digits(index: _Index | None, n_images: int) -> int:
        """Keep the stored shard width while the collection stays within 16x of its ideal size."""
        ideal = shard_digits_for(n_images)
        if index is not None and abs(index.shard_digits - ideal) <= 1:
            return index.shard_digits
        return ideal

    def pending(self, dataset: str, model: str, image_ids: Sequence[str], fingerprint: str) -> int:
        """How many of ``image_ids`` :meth:`embed_incrementally` would embed for ``fingerprint``
        (neither in the stored table under that fingerprint nor in a left-over part of a run that
        died). Reads the index and the image_id columns only: cheap enough to size a progress bar."""
        wanted = set(str(i) for i in image_ids)
        known: set[str] = set()
        for path in self._sources(dataset, model, fingerprint):
            known |= wanted.intersection(_read_ids(self.fs, path))
        return len(wanted) - len(known)

    def _sources(self, dataset: str, model: str, fingerprint: str) -> list[str]:
        """Files that may hold vectors under ``fingerprint``: the current table's parts (when its
        fingerprint matches) and the finished parts of runs that died."""
        paths = self.part_paths(dataset, model) if self.read_fingerprint(dataset, model) == fingerprint else []
        return paths + [p for p, _ in self._leftovers(dataset, model, fingerprint)]

    def _leftovers(self, dataset: str, model: str, fingerprint: str,
                   index: _Index | None = None) -> list[tuple[str, str | None]]:
        """(path, shard or None) of parts no index names that carry ``fingerprint``: ``_staging/``
        (local), unindexed parts (object storage), and checkpoints of the single-file layout."""
        folder = self.folder(dataset, model)
        index = index if index is not None else self._read_index(dataset, model)
        indexed = {p.file for p in index.parts} if index is not None else set()
        out = []
        for info in self._list(folder, recursive=True):
            rel = info.path[len(folder) + 1:]
            name = rel.rsplit("/", 1)[-1]
            if info.type != pafs.FileType.File or not name.endswith(".parquet") or name.startswith("."):
                continue
            if rel.startswith("_checkpoints/") or (rel.startswith(f"{STAGING}/") and _CHECKPOINT_NAME.match(name)):
                shard = None
            elif (rel.startswith(f"{STAGING}/") or "/" not in rel) and (m := _PART_NAME.match(name)):
                if rel in indexed:
                    continue
                shard = m.group("shard")
            else:
                continue
            if self.file_fingerprint(info.path) == fingerprint:
                out.append((info.path, shard))
        return out

    def _list(self, folder: str, recursive: bool = False) -> list[pafs.FileInfo]:
        try:
            return self.fs.get_file_info(pafs.FileSelector(folder, recursive=recursive, allow_not_found=True))
        except OSError as exc:
            raise StorageError(f"cannot list {redact(folder)}: {exc}; check the storage root, the endpoint "
                               "and the AWS_* credentials") from None

    def embed_incrementally(
        self,
        dataset: str,
        model: str,
        image_ids: Sequence[str],
        fingerprint: str,
        embed_chunk: Callable[[Sequence[int]], Iterable[tuple[np.ndarray, np.ndarray]]],
        *,
        chunk_size: int = 1024,
        _replace: bool = False,
        _dim: int | None = None,
    ) -> EmbedReport:
        """Bring the stored table in line with ``image_ids`` for ``fingerprint``.

        ``embed_chunk(indices)`` receives positions into ``image_ids`` still to embed and yields
        ``(positions, vectors float32 [n, dim])`` pairs. It is called once per group of shards whose
        missing images add up to about ``chunk_size``; each shard's part is written as soon as its
        group is embedded, so a run that dies loses at most one group.
        """
        start = time.perf_counter()
        wanted = list(dict.fromkeys(str(i) for i in image_ids))  # order kept, duplicates dropped
        wanted_set = set(wanted)
        if len(wanted) != len(image_ids):  # positions below are into `wanted`; the embedder's are not
            embed_chunk = _asked_by_first_occurrence(image_ids, embed_chunk)
        if not _replace:
            self.migrate(dataset, model)
        index = self._read_index(dataset, model)
        same = index is not None and index.fingerprint == fingerprint and not _replace
        digits = self._digits(index if same else None, len(wanted))
        groups = _group_by_shard(wanted, digits, positions=True)
        old_parts = index.parts if index is not None else []
        kept = {p.shard: p for p in old_parts} if same and index.shard_digits == digits else {}
        folder = self.folder(dataset, model)
        leftovers = [] if _replace else [
            (path, shard, set(_read_ids(self.fs, path))) for path, shard in self._leftovers(dataset, model, fingerprint, index)]

        counts = {"reused": 0, "resumed": 0, "removed": 0, "written": 0}
        old_ids: dict[str, set[str]] = {}

        def ids_of_old(part: _Part) -> set[str]:
            if part.file not in old_ids:
                old_ids[part.file] = set(_read_ids(self.fs, f"{folder}/{part.file}"))
            return old_ids[part.file]

        digests: dict[str, str] = {}  # shard -> ids_digest of its wanted ids, computed once

        def digest_of(shard: str, ids_s: list[str] | None = None) -> str:
            if shard not in digests:
                digests[shard] = ids_digest(ids_s if ids_s is not None else [wanted[p] for p in groups[shard]])
            return digests[shard]

        for part in old_parts:  # images gone from the manifest, counted whatever the fingerprint
            if not (part.shard in kept and part.shard in groups and kept[part.shard].digest == digest_of(part.shard)):
                counts["removed"] += len(ids_of_old(part) - wanted_set)

        new_parts: list[_Part] = []
        staged: list[str] = []  # names in _staging/ to rename into place at the commit (local lakes)
        finite = [True]
        dim = [_dim if _dim is not None else (index.dim if same else None)]
        embed_seconds = [0.0]
        # shard, positions, ids, todo, sources, digest
        pending: list[tuple[str, list[int], list[str], list[int], list[str], str]] = []
        piece_cache: dict[str, EmbeddingTable] = {}

        def read_piece(path: str) -> EmbeddingTable:
            if path not in piece_cache:
                piece_cache.clear()  # shards come in sorted order: one piece in memory at a time
                piece_cache[path] = _read_parquet(self.fs, path)
            return piece_cache[path]

        def flush() -> None:
            todo = [p for _, _, _, t, _, _ in pending for p in t]
            got_all: list[int] = []  # every position yielded, in order; row i of fresh_vectors is got_all[i]
            fresh_parts: list[np.ndarray] = []
            chunks = [todo[i:i + chunk_size] for i in range(0, len(todo), max(1, chunk_size))]
            for chunk in chunks:
                t0 = time.perf_counter()
                got_pos, got_vec = [], []
                for positions, vectors in embed_chunk(chunk):
                    # any iterable of integers, as documented (an integer array converts at C speed)
                    exact = isinstance(positions, np.ndarray) and positions.dtype.kind in "iu"
                    before = len(got_pos)
                    got_pos.extend(positions.tolist() if exact else map(int, positions))
                    got_vec.append(np.asarray(vectors, dtype=np.float32))
                    if len(got_vec[-1]) != len(got_pos) - before:  # checked per answer: rows would shift
                        raise StorageError(f"{dataset}/{model}: the embedder returned {len(got_vec[-1])} "
                                           f"vector(s) for {len(got_pos) - before} image(s)")
                embed_seconds[0] += time.perf_counter() - t0
                if not got_pos:
                    continue
                vectors = np.concatenate(got_vec)
                got_all.extend(got_pos)
                fresh_parts.append(vectors)
                if len(chunks) > 1:  # a shard larger than a chunk: checkpoint each chunk for a resume
                    _write_parquet(self.fs, f"{folder}/{STAGING}/ckpt-{uuid.uuid4().hex}.parquet",
                                   EmbeddingTable(np.array([wanted[p] for p in got_pos], dtype=object), vectors,
                                                  fingerprint), model)
            fresh_vectors = (np.concatenate(fresh_parts) if fresh_parts
                             else np.zeros((0, dim[0] or 0), np.float32))
            # The usual case: every position came back once, in the order asked. Then each shard
            # without older vectors is one slice of fresh_vectors, and no lookup table is built.
            in_order = got_all == todo
            fresh: dict[int, int] | None = None  # position -> its row of fresh_vectors (twice: the last), when needed
            offset = 0
            for shard, positions, ids_s, asked, sources, digest in pending:
                start, offset = offset, offset + len(asked)
                if in_order and not sources:  # nothing known before: `asked` is `positions`
                    write_part(shard, ids_s, fresh_vectors[start:offset], digest)
                    continue
                if fresh is None:
                    fresh = dict(zip(got_all, range(len(got_all))))
                if not sources and all(p in fresh for p in positions):  # all embedded now: one gather
                    vectors = fresh_vectors[[fresh[p] for p in positions]]
                    write_part(shard, ids_s, vectors, digest)
                    continue
                need = set(ids_s)
                known: dict[str, np.ndarray] = {}
                for path in sources:
                    piece = read_piece(path)
                    for iid, vec in zip(piece.image_ids.tolist(), piece.vectors):
                        if iid in need and iid not in known:
                            known[iid] = vec
                rows = []
                for p, iid in zip(positions, ids_s):
                    vec = known.get(iid)
                    if vec is None and p in fresh:
                        vec = fresh_vectors[fresh[p]]
                    if vec is None:
                        raise StorageError(f"{dataset}/{model}: the embedder returned no vector for "
                                           f"image {iid} (and maybe others of its shard {shard})")
                    rows.append(vec)
                write_part(shard, ids_s, np.stack(rows).astype(np.float32, copy=False), digest)
            pending.clear()

        def write_part(shard: str, ids_s: list[str], vectors: np.ndarray, digest: str) -> None:
            if dim[0] is None:
                dim[0] = int(vectors.shape[1])
            finite[0] = finite[0] and bool(np.isfinite(vectors).all())
            name = f"part-{shard}-{uuid.uuid4().hex}.parquet"
            target = f"{folder}/{name}" if self.remote else f"{folder}/{STAGING}/{name}"
            _write_parquet(self.fs, target, EmbeddingTable(np.array(ids_s, dtype=object), vectors, fingerprint),
                           model)
            if not self.remote:
                staged.append(name)
            new_parts.append(_Part(name, shard, len(ids_s), digest))
            counts["written"] += 1

        pending_todo = 0
        for shard in sorted(groups):
            positions = groups[shard]
            ids_s = [wanted[p] for p in positions]
            digest = digest_of(shard, ids_s)
            part = kept.get(shard)
            if part is not None and part.digest == digest and part.rows == len(ids_s):
                new_parts.append(part)  # untouched: not rewritten, not re-uploaded
                counts["reused"] += len(ids_s)
                continue
            adopt = next((path for path, s, ids_l in leftovers
                          if s == shard and len(ids_l) == len(ids_s) and ids_l == set(ids_s)), None)
            if adopt is not None:  # a run that died had finished exactly this part
                name = adopt.rsplit("/", 1)[-1]
                if not self.remote:
                    staged.append(name)
                new_parts.append(_Part(name, shard, len(ids_s), digest))
                counts["resumed"] += len(ids_s)
                if dim[0] is None:
                    dim[0] = read_piece(adopt).dim
                continue
            known, sources = set(), []
            need = set(ids_s) if same or leftovers else set()
            if same:
                # an id that is not a sha256 digest may sit in any old part: before the lake hashed such
                # ids (shard_of) it sharded them by their first characters, so a same-fingerprint run
                # looks for their vectors in every part instead of embedding them again
                anywhere = not all_digests(ids_s)
                for old in old_parts:
                    if (anywhere or _overlaps(old.shard, shard)) and (hit := (ids_of_old(old) & need) - known):
                        sources.append(f"{folder}/{old.file}")
                        known |= hit
                        counts["reused"] += len(hit)
            for path, s, ids_l in leftovers:
                if (s is None or _overlaps(s, shard)) and (hit := (ids_l & need) - known):
                    sources.append(path)
                    known |= hit
                    counts["resumed"] += len(hit)
            todo = [p for p, iid in zip(positions, ids_s) if iid not in known] if known else list(positions)
            if pending and pending_todo + len(todo) > chunk_size:
                # embed what is pending first: a group stays within one chunk, so only a shard
                # larger than a chunk is split (and checkpointed chunk by chunk)
                flush()
                pending_todo = 0
            pending.append((shard, positions, ids_s, todo, sources, digest))
            pending_todo += len(todo)
            if pending_todo >= chunk_size or not todo:
                flush()
                pending_todo = 0
        flush()

        new_index = _Index(fingerprint, int(dim[0] or 0), digits, new_parts)
        self._commit(dataset, model, new_index, staged)
        kept_files = {p.file for p in new_parts}
        return EmbedReport(
            total=len(wanted), new=len(wanted) - counts["reused"] - counts["resumed"], reused=counts["reused"],
            removed=counts["removed"], resumed=counts["resumed"], seconds=time.perf_counter() - start,
            embed_seconds=embed_seconds[0], fingerprint=fingerprint, dim=new_index.dim,
            path=self.uri(dataset, model), ids=wanted, all_finite=finite[0], parts_written=counts["written"],
            parts_kept=len(new_parts) - counts["written"],
            parts_removed=sum(1 for p in old_parts if p.file not in kept_files),
            read_table=lambda: self.read(dataset, model, order=wanted),
        )

    def _commit(self, dataset: str, model: str, index: _Index, staged: list[str]) -> None:
        """Rename the staged parts into place, write the index (the commit point), then delete what
        it no longer names."""
        folder = self.folder(dataset, model)
        for name in staged:
            try:
                os.replace(f"{folder}/{STAGING}/{name}", f"{folder}/{name}")
            except FileNotFoundError:
                raise StorageError(f"{dataset}/{model}: a part of this run vanished from {folder}/{STAGING} "
                                   "(another run of the same partition committed meanwhile); re-run it") from None
            except OSError as exc:
                raise StorageError(f"cannot move a part into {folder}: {exc}; {_LAKE_HINT}") from None
        text = index.to_json()
        path = self.index_path(dataset, model)
        if self.remote:
            try:
                self.fs.create_dir(folder, recursive=True)
                with self.fs.open_output_stream(path) as f:  # one PUT: atomic on object storage
                    f.write(text.encode("utf-8"))
            except OSError as exc:
                raise StorageError(f"cannot write {path}: {exc}; {_LAKE_HINT}") from None
        else:
            write_text(path, text, hint=_LAKE_HINT)
        self._delete_unindexed(dataset, model, index)

    def _delete_unindexed(self, dataset: str, model: str, index: _Index) -> None:
        """Delete every table file of the folder ``index`` does not name: superseded parts, the
        single-file table of the earlier layout, staging and checkpoints of runs that died."""
        folder = self.folder(dataset, model)
        keep = {p.file for p in index.parts}
        try:
            for info in self._list(folder):
                name = info.path.rsplit("/", 1)[-1]
                if info.type == pafs.FileType.Directory and name in (STAGING, "_checkpoints"):
                    self.fs.delete_dir(info.path)
                elif info.type == pafs.FileType.File and name not in keep and (
                        name == LEGACY_TABLE or _PART_NAME.match(name)):
                    self.fs.delete_file(info.path)
        except OSError as exc:
            raise StorageError(f"cannot clean up {redact(folder)}: {exc}; {_LAKE_HINT}") from None


def _asked_by_first_occurrence(image_ids: Sequence[str], embed_chunk: Callable) -> Callable:
    """``embed_chunk`` (which takes and yields positions into ``image_ids``) as the store calls it:
    with positions into the ids with duplicates dropped. Each id is embedded from its first row;
    without this, a repeated id shifted every later position onto the next image's pixels."""
    first: dict[str, int] = {}
    for i, iid in enumerate(image_ids):
        first.setdefault(str(iid), i)
    given = list(first.values())  # position among the distinct ids -> position in image_ids
    distinct = {g: w for w, g in enumerate(given)}

    def asked(positions):
        for pos, vectors in embed_chunk([given[p] for p in positions]):
            back = [distinct.get(int(p)) for p in pos]
            if None in back:
                raise StorageError(f"the embedder returned a vector for row {pos[back.index(None)]} of the "
                                   "image ids, a row it was not asked for")
            yield back, vectors

    return asked


def _group_by_shard(ids: Sequence[str], digits: int, positions: bool = False) -> dict[str, list]:
    """Shard -> the ids (or their positions in ``ids``) that fall in it, in the order given."""
    # the manifest's case, every id a digest: a shard is its prefix (shard_of's answer), with no check per id
    shard = (lambda iid: iid[:digits]) if digits and all_digests(ids) else (lambda iid: shard_of(iid, digits))
    groups: dict[str, list] = {}
    for i, iid in enumerate(ids):
        groups.setdefault(shard(iid), []).append(i if positions else iid)
    return groups


def all_digests(ids: Sequence[str]) -> bool:
    """Whether every id is a sha256 hex digest (64 lowercase hex characters): one pass over all of
    their bytes (delete the hex digits, nothing may be left), not a regular expression per id."""
    if not all(len(i) == 64 for i in ids):
        return False
    try:
        joined = "".join(ids).encode("ascii")
    except UnicodeEncodeError:
        return False
    return not joined.translate(None, _HEX_DIGITS)


def _reading_order(ids: np.ndarray, order) -> np.ndarray | None:
    """Row numbers of ``ids`` that :meth:`EmbeddingStore.read` returns, in its order (None: all, as
    stored): the ids of ``order`` first, then the rest in stored order; a duplicated id once (its last row)."""
    if order is None:
        return None
    where = {iid: i for i, iid in enumerate(ids.tolist())}
    first = [where.pop(iid) for iid in dict.fromkeys(order) if iid in where]
    take = np.asarray(first + sorted(where.values()), dtype=np.int64)
    return None if np.array_equal(take, np.arange(len(ids))) else take


class vector_file:
    """A float32 [rows, dim] array in a file under ``folder``, filled and then memory-mapped
    read-only; the file is unlinked as soon as it is mapped (POSIX keeps the mapping), so nothing is
    left behind. A run killed while filling leaves a ``<name>-<pid>-*.npy`` file: the next
    ``vector_file`` in the folder deletes those of processes that are gone.

        with vector_file(folder, "d-m") as fill:
            out = fill(n, dim); out[rows] = ...; vectors = fill.done()
    """

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = Path(folder), re.sub(r"[^A-Za-z0-9_.=-]", "_", name)
        self.path: Path | None = None
        self._out = None

    def __enter__(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.npy"):
            match = re.search(r"-(\d+)-[0-9a-f]{8}\.npy$", old.name)
            if match and not _process_alive(int(match.group(1))):
                old.unlink(missing_ok=True)
        return self

    def __call__(self, n_rows: int, dim: int) -> np.ndarray:
        self.path = self.folder / f"{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.npy"
        self._out = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float32, shape=(n_rows, dim))
        return self._out

    def done(self) -> np.ndarray:
        if self._out is None:
            raise StorageError(f"{self.name}: the lake table has no part to read")
        self._out.flush()
        del self._out
        self._out = None
        vectors = np.load(self.path, mmap_mode="r")
        with contextlib.suppress(OSError):  # where an open file cannot be unlinked, it goes on the next run
            self.path.unlink()
        return vectors

    def __exit__(self, *exc):
        self._out = None
        if exc[0] is not None and self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
        return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_ids(fs: pafs.FileSystem, path: str) -> list[str]:
    try:
        with fs.open_input_file(path) as f:
            return pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(f"embedding file {path} is unreadable ({exc}); delete it and re-run") from None


def _read_parquet(fs: pafs.FileSystem, path: str) -> EmbeddingTable:
    try:
        with fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(f"embedding file {path} is unreadable ({exc}); delete it and re-run") from None
    meta = table.schema.metadata or {}
    emb = table.column("embedding").combine_chunks()
    dim = emb.type.list_size
    values = emb.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return EmbeddingTable(
        image_ids=np.asarray(table.column("image_id").to_pylist(), dtype=object),
        vectors=values.reshape(len(table), dim),
        fingerprint=meta.get(EMBEDDING_FINGERPRINT_KEY, b"").decode(),
    )


def _write_parquet(fs: pafs.FileSystem, path: str, table: EmbeddingTable, model: str) -> None:
    """Write ``table`` through :func:`~nfhm_pipeline.store.files.write_parquet_table`: a reader never
    sees a half-written file (temp file + rename locally, one PUT on object storage)."""
    vectors = np.ascontiguousarray(table.vectors, dtype=np.float32)
    n, dim = vectors.shape
    schema = embedding_schema(dim, table.fingerprint, model)
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    arrow = pa.Table.from_arrays(
        [pa.array(list(table.image_ids), type=pa.string()), pa.FixedSizeListArray.from_arrays(flat, dim)],
        schema=schema,
    )
    # No dictionary encoding: ids are unique and float vectors hardly repeat, so Arrow's attempt at
    # a dictionary (then its fallback) only costs. 625 x 512: 3.4 ms and 1.32 MB a part instead of
    # 15.8 ms and 1.95 MB; the same values, read by every Parquet reader.
    write_parquet_table(arrow, path, fs, hint=_LAKE_HINT, use_dictionary=False)


# -- what loading a model gave, kept by its load key ----------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    """What a load of a model told: its fingerprint, output width, and whether it has a text tower."""

    fingerprint: str
    dim: int
    has_text_tower: bool


class FingerprintMemo:
    """``embedders.loaders.load_key`` → :class:`ModelFacts`, one small JSON file per key under
    ``root`` (a local folder: keys name local files and their mtimes), written atomically.

    A key names every input of the fingerprint, so an entry never goes stale; a run whose key is
    here knows the fingerprint without loading the model. An unreadable entry reads as absent
    (the model is then loaded and the entry rewritten)."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)

    def path(self, key: str) -> str:
        return os.path.join(self.root, key[:2], f"{key}.json")

    def get(self, key: str) -> ModelFacts | None:
        import json

        try:
            with open(self.path(key), encoding="utf-8") as f:
                data = json.load(f)
            return ModelFacts(fingerprint=str(data["fingerprint"]), dim=int(data["dim"]),
                              has_text_tower=bool(data["has_text_tower"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, facts: ModelFacts) -> None:
        import json
        from dataclasses import asdict

        from nfhm_pipeline.store.files import write_text

        write_text(self.path(key), json.dumps(asdict(facts), sort_keys=True))
