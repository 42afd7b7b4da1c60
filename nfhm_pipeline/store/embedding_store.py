"""The embedding lake: one Parquet file per (dataset, model), written atomically.

Layout under ``root`` (a local path or a URI such as ``s3://bucket/prefix``)::

    embeddings/dataset=<d>/model=<m>/embeddings.parquet
    embeddings/dataset=<d>/model=<m>/_checkpoints/<fingerprint>/part-<n>.parquet

``embeddings.parquet`` is the last complete table: ``image_id`` (sha256 of the image
bytes), ``embedding`` (``FixedSizeList<float32>[dim]``, raw model output), and the
model fingerprint in the file metadata. While a run embeds, each finished chunk is
written as a checkpoint part; a run that dies keeps the previous complete table
readable, and the next run with the same fingerprint reuses the parts instead of
redoing them.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.store.files import write_parquet_table
from nfhm_pipeline.store.remote import redact
from nfhm_pipeline.store.schemas import EMBEDDING_FINGERPRINT_KEY, embedding_schema

_LAKE_HINT = "check that the data folder (or storage root) is writable and has free space"


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
    """What one incremental run did; counts are images. ``table`` is the table the run left in
    the lake, as :meth:`EmbeddingStore.read` would return it right after (no re-read needed)."""

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
    table: EmbeddingTable | None = None

    @property
    def images_per_s(self) -> float:
        return self.new / self.embed_seconds if self.embed_seconds > 0 else float("nan")


def _filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    if "://" in str(root):
        try:
            return pafs.FileSystem.from_uri(str(root))
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"cannot open storage root {redact(root)}: {exc}") from None
    return pafs.LocalFileSystem(), os.path.abspath(str(root))


class EmbeddingStore:
    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self.fs, self.base = _filesystem(self.root)

    def folder(self, dataset: str, model: str) -> str:
        return f"{self.base}/embeddings/dataset={dataset}/model={model}"

    def table_path(self, dataset: str, model: str) -> str:
        return f"{self.folder(dataset, model)}/embeddings.parquet"

    def uri(self, dataset: str, model: str) -> str:
        """A path DuckDB and people can use (the URI scheme kept for remote roots)."""
        path = self.table_path(dataset, model)
        if "://" in self.root:
            return f"{self.root.split('://', 1)[0]}://{path}"
        return path

    def _checkpoint_dir(self, dataset: str, model: str, fingerprint: str) -> str:
        return f"{self.folder(dataset, model)}/_checkpoints/{fingerprint[:32]}"

    # -- reading ---------------------------------------------------------------------------

    def exists(self, dataset: str, model: str) -> bool:
        try:
            return self.fs.get_file_info(self.table_path(dataset, model)).type == pafs.FileType.File
        except OSError as exc:  # an unreachable endpoint or refused credentials on object storage
            raise StorageError(f"cannot reach the embedding lake {redact(self.root)}: {exc}; check the "
                               "storage root, the endpoint and the AWS_* credentials") from None

    def read(self, dataset: str, model: str) -> EmbeddingTable | None:
        """The last complete table, or None if there is none."""
        if not self.exists(dataset, model):
            return None
        return _read_parquet(self.fs, self.table_path(dataset, model))

    def read_fingerprint(self, dataset: str, model: str) -> str | None:
        if not self.exists(dataset, model):
            return None
        with self.fs.open_input_file(self.table_path(dataset, model)) as f:
            meta = pq.read_schema(f).metadata or {}
        return meta.get(EMBEDDING_FINGERPRINT_KEY, b"").decode() or None

    # -- writing ---------------------------------------------------------------------------

    def write(self, dataset: str, model: str, table: EmbeddingTable) -> str:
        path = self.table_path(dataset, model)
        _write_parquet(self.fs, path, table, model)
        return path

    def embed_incrementally(
        self,
        dataset: str,
        model: str,
        image_ids: Sequence[str],
        fingerprint: str,
        embed_chunk: Callable[[Sequence[int]], Iterable[tuple[np.ndarray, np.ndarray]]],
        *,
        chunk_size: int = 1024,
    ) -> EmbedReport:
        """Bring the stored table in line with ``image_ids`` for ``fingerprint``.

        ``embed_chunk(indices)`` receives positions into ``image_ids`` still to embed and
        yields ``(positions, vectors float32 [n, dim])`` pairs; it is called once per chunk
        of at most ``chunk_size`` images so every finished chunk is checkpointed.
        """
        start = time.perf_counter()
        wanted = list(dict.fromkeys(image_ids))  # order kept, duplicates dropped
        wanted_set = set(wanted)
        existing = self.read(dataset, model)
        if existing is not None and existing.fingerprint == fingerprint and existing.image_ids.tolist() == wanted:
            return self._unchanged_report(dataset, model, existing, start)
        known: dict[str, np.ndarray] = {}
        removed = 0
        if existing is not None:
            # Set lookups: np.isin on object (string) arrays compares every pair, O(N·M).
            keep = np.fromiter((iid in wanted_set for iid in existing.image_ids), dtype=bool, count=len(existing))
            removed = int((~keep).sum())
            if existing.fingerprint == fingerprint:
                known = dict(zip(existing.image_ids[keep], existing.vectors[keep]))
        reused = len(known)

        ckpt_dir = self._checkpoint_dir(dataset, model, fingerprint)
        resumed = 0
        for part in self._checkpoint_parts(ckpt_dir):
            piece = _read_parquet(self.fs, part)
            for iid, vec in zip(piece.image_ids, piece.vectors):
                if iid in wanted_set and iid not in known:
                    known[iid] = vec
                    resumed += 1

        todo = [i for i, iid in enumerate(wanted) if iid not in known]
        embed_seconds = 0.0
        dim = existing.dim if existing is not None and reused else None
        if todo:
            try:
                self.fs.create_dir(ckpt_dir, recursive=True)
            except OSError as exc:
                raise StorageError(f"cannot write {ckpt_dir}: {exc}; check that the data folder (or storage "
                                   "root) is writable and has free space") from None
        for start_at in range(0, len(todo), chunk_size):
            chunk = todo[start_at:start_at + chunk_size]
            t0 = time.perf_counter()
            got_pos, got_vec = [], []
            for positions, vectors in embed_chunk(chunk):
                got_pos.extend(int(p) for p in positions)
                got_vec.append(np.asarray(vectors, dtype=np.float32))
            embed_seconds += time.perf_counter() - t0
            if not got_pos:
                continue
            vectors = np.concatenate(got_vec)
            ids = np.array([wanted[p] for p in got_pos], dtype=object)
            part = EmbeddingTable(ids, vectors, fingerprint)
            _write_parquet(self.fs, f"{ckpt_dir}/part-{uuid.uuid4().hex}.parquet", part, model)
            known.update(zip(ids, vectors))

        missing = [iid for iid in wanted if iid not in known]
        if missing:
            raise StorageError(f"{dataset}/{model}: the embedder returned no vector for {len(missing)} "
                               f"image(s), e.g. {missing[0]}")
        if wanted:
            vectors = np.stack([known[iid] for iid in wanted]).astype(np.float32, copy=False)
        else:
            vectors = np.zeros((0, dim or 0), dtype=np.float32)
        # str(): ids as the lake gives them back (Python str, not numpy.str_)
        final = EmbeddingTable(np.array([str(iid) for iid in wanted], dtype=object), vectors, fingerprint)
        path = self.write(dataset, model, final)
        self._drop_checkpoints(dataset, model)
        return EmbedReport(
            total=len(wanted), new=len(wanted) - reused - resumed, reused=reused, removed=removed,
            resumed=resumed, seconds=time.perf_counter() - start, embed_seconds=embed_seconds,
            fingerprint=fingerprint, dim=final.dim, path=path, table=final,
        )

    def unchanged(self, dataset: str, model: str, image_ids: Sequence[str], fingerprint: str) -> EmbedReport | None:
        """The report of a run with nothing to do (new=0), when the stored table holds exactly
        ``image_ids`` (in order, duplicates dropped) under ``fingerprint``; else None. Needs no
        embedder: with the fingerprint known beforehand (``FingerprintMemo``) no model is loaded."""
        start = time.perf_counter()
        existing = self.read(dataset, model)
        if existing is None or existing.fingerprint != fingerprint \
                or existing.image_ids.tolist() != list(dict.fromkeys(image_ids)):
            return None
        return self._unchanged_report(dataset, model, existing, start)

    def _unchanged_report(self, dataset: str, model: str, existing: EmbeddingTable, start: float) -> EmbedReport:
        # Nothing new, nothing gone (the nightly re-embed): the stored table is the answer as it
        # is; no copy, no rewrite (no re-upload on object storage).
        self._drop_checkpoints(dataset, model)
        return EmbedReport(total=len(existing), new=0, reused=len(existing), removed=0, resumed=0,
                           seconds=time.perf_counter() - start, embed_seconds=0.0,
                           fingerprint=existing.fingerprint, dim=existing.dim,
                           path=self.table_path(dataset, model), table=existing)

    def pending(self, dataset: str, model: str, image_ids: Sequence[str], fingerprint: str) -> int:
        """How many of ``image_ids`` :meth:`embed_incrementally` would embed for ``fingerprint``
        (neither in the stored table under that fingerprint nor in its checkpoints). Reads only
        the image_id columns: cheap enough to size a progress bar before the run."""
        wanted = set(image_ids)
        known: set[str] = set()
        path = self.table_path(dataset, model)
        if self.read_fingerprint(dataset, model) == fingerprint:
            known |= wanted.intersection(_read_ids(self.fs, path))
        for part in self._checkpoint_parts(self._checkpoint_dir(dataset, model, fingerprint)):
            known |= wanted.intersection(_read_ids(self.fs, part))
        return len(wanted) - len(known)

    def file_fingerprint(self, path: str) -> str | None:
        """The model fingerprint in the metadata of a lake file at ``path`` (image or text
        embeddings), or None when there is no such file."""
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            return None
        try:
            with self.fs.open_input_file(path) as f:
                meta = pq.read_schema(f).metadata or {}
        except (pa.ArrowInvalid, OSError) as exc:
            raise StorageError(f"embedding file {path} is unreadable ({exc}); delete it and re-run") from None
        return meta.get(EMBEDDING_FINGERPRINT_KEY, b"").decode() or None

    def _checkpoint_parts(self, ckpt_dir: str) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(ckpt_dir, allow_not_found=True))
        return sorted(i.path for i in info if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def _drop_checkpoints(self, dataset: str, model: str) -> None:
        ckpt_root = f"{self.folder(dataset, model)}/_checkpoints"
        if self.fs.get_file_info(ckpt_root).type == pafs.FileType.Directory:
            self.fs.delete_dir(ckpt_root)


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
    write_parquet_table(arrow, path, fs, hint=_LAKE_HINT)


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
