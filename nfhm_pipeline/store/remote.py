"""The embedding lake on object storage (S3-compatible), read without DuckDB's httpfs.

A lake root is either a local folder or a URI that ``pyarrow.fs.FileSystem.from_uri`` opens,
e.g. ``s3://bucket/lake`` or, for MinIO / Ceph / a loopback test server,
``s3://bucket/lake?endpoint_override=127.0.0.1:9000&scheme=http``. Credentials come from the
usual ``AWS_*`` environment variables (or an instance profile), never from the URI we store.

DuckDB reads a local lake through a persistent view. For a remote lake that view would need the
httpfs extension, which DuckDB downloads at run time (impossible offline, and version-locked), so
``lake_dataset`` gives a lazy pyarrow dataset that ``warehouse.query`` registers as ``embeddings``
for the length of one query session; DuckDB scans it with projection and filter pushdown.
"""
from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from nfhm_pipeline.errors import StorageError

# Query parameters pyarrow accepts that carry secrets: never written into the warehouse.
_SECRET_PARAMS = {"access_key", "secret_key", "session_token"}

# The columns of the ``embeddings`` view, whatever the dimension of each model.
EMBEDDINGS_VIEW_SCHEMA = pa.schema([
    pa.field("image_id", pa.string()),
    pa.field("embedding", pa.list_(pa.float32())),
    pa.field("dataset", pa.string()),
    pa.field("model", pa.string()),
])


def is_remote(root: str | None) -> bool:
    """True when ``root`` is a URI (``s3://...``, ``gs://...``), not a local folder."""
    return root is not None and "://" in str(root) and not str(root).startswith("file://")


def redact(root: str) -> str:
    """``root`` without secret query parameters (what may be stored or logged)."""
    if not is_remote(root):
        return str(root)
    parts = urlsplit(str(root))
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in _SECRET_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(query, safe=":/")))


def lake_dataset(root: str) -> ds.Dataset:
    """Every complete embedding table of the lake at ``root`` as one lazy pyarrow dataset.

    Columns: image_id (string), embedding (list<float32>; the stored FixedSizeList is cast so that
    models of different dimensions fit one schema), dataset, model (from the hive folders).
    Only the parts each table's index names: parts of unfinished runs are left out. An empty lake gives an empty dataset.
    """
    from nfhm_pipeline.store.embedding_store import EmbeddingStore

    store = EmbeddingStore(root)
    base = f"{store.base}/embeddings"
    try:
        infos = store.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"cannot list the embedding lake {redact(root)}: {exc}; check the endpoint and "
                           "the AWS_* credentials") from None
    # The current parts of each table, as its index names them (a table of the single-file layout
    # not migrated yet: that file). Staged, superseded and checkpoint parts are left out.
    folders = sorted({i.path.rsplit("/", 1)[0] for i in infos if i.type == pafs.FileType.File
                      and i.path.rsplit("/", 1)[-1] in ("_index.json", "embeddings.parquet")
                      and i.path[len(base) + 1:].count("/") == 2})
    files = []
    for folder in folders:
        dataset_dir, model_dir = folder[len(base) + 1:].split("/")
        if dataset_dir.startswith("dataset=") and model_dir.startswith("model="):
            files += store.part_paths(dataset_dir[len("dataset="):], model_dir[len("model="):])
    if not files:
        return ds.dataset(EMBEDDINGS_VIEW_SCHEMA.empty_table())
    hive = ds.partitioning(pa.schema([("dataset", pa.string()), ("model", pa.string())]), flavor="hive")
    try:
        return ds.dataset(files, schema=EMBEDDINGS_VIEW_SCHEMA, format="parquet", filesystem=store.fs,
                          partitioning=hive, partition_base_dir=base)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(f"cannot open the embedding lake {redact(root)}: {exc}") from None
