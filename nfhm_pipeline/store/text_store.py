"""Prompt text embeddings in the lake, beside the image embeddings.

``text_embeddings/dataset=<d>/model=<m>/text_embeddings.parquet`` with the columns of
:func:`~nfhm_pipeline.store.schemas.text_embedding_schema` (level, class, template, prompt, use,
embedding as FixedSizeList<float32>[dim]) and the model fingerprint in the file metadata. Models
without a text tower get an empty table, so downstream assets can tell "no text tower" from "not run".
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.store.embedding_store import EmbeddingStore
from nfhm_pipeline.store.files import write_parquet_table
from nfhm_pipeline.store.schemas import TEXT_PROMPT_COLUMNS, TEXT_USE_ZERO_SHOT, text_embedding_schema


def text_path(store: EmbeddingStore, dataset: str, model: str) -> str:
    return f"{store.base}/text_embeddings/dataset={dataset}/model={model}/text_embeddings.parquet"


def write_text_embeddings(store: EmbeddingStore, dataset: str, model: str, prompts: pd.DataFrame | None,
                          vectors: np.ndarray | None, fingerprint: str) -> str:
    """Write one row per prompt: ``prompts`` (level, class, template, prompt, and optionally
    ``use``; missing → ``zero_shot``) with its vector (row i of ``vectors``). ``prompts`` None
    writes the empty table of a model without a text tower. Returns the path written."""
    if prompts is None:
        prompts = pd.DataFrame(columns=list(TEXT_PROMPT_COLUMNS))
        vectors = np.zeros((0, 1), np.float32)
    path = text_path(store, dataset, model)
    if "use" not in prompts.columns:
        prompts = prompts.assign(use=TEXT_USE_ZERO_SHOT)
    missing = [c for c in TEXT_PROMPT_COLUMNS if c not in prompts.columns]
    if missing:
        raise StorageError(f"{path}: the prompts table has no column(s) {missing}; it needs {list(TEXT_PROMPT_COLUMNS)}")
    if prompts["use"].isna().any():
        raise StorageError(f"{path}: {int(prompts['use'].isna().sum())} prompt(s) have no 'use'; give each one "
                           f"(e.g. {TEXT_USE_ZERO_SHOT!r})")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(prompts):
        raise StorageError(f"{path}: {len(prompts)} prompt(s) but vectors of shape {vectors.shape}; "
                           "give one vector per prompt")
    dim = vectors.shape[1]
    schema = text_embedding_schema(dim, fingerprint)
    columns = [pa.array(prompts[c].astype(str).tolist(), type=pa.string()) for c in TEXT_PROMPT_COLUMNS]
    columns.append(pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim))
    return write_parquet_table(pa.Table.from_arrays(columns, schema=schema), path, store.fs)


def read_text_embeddings(store: EmbeddingStore, dataset: str, model: str) -> tuple[pd.DataFrame, np.ndarray] | None:
    """(prompts frame with the TEXT_PROMPT_COLUMNS, vectors float32 [n, dim]) or None when never
    written; an empty frame means no text tower. A file from before ``use`` existed reads as all
    ``zero_shot`` (it held only class prompts)."""
    path = text_path(store, dataset, model)
    if store.fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with store.fs.open_input_file(path) as f:
            table = pq.read_table(f)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StorageError(f"text embedding file {path} is unreadable ({exc}); delete it and re-run") from None
    emb = table.column("embedding").combine_chunks()
    vectors = emb.values.to_numpy(zero_copy_only=False).reshape(len(table), emb.type.list_size)
    prompts = table.drop(["embedding"]).to_pandas()
    if "use" not in prompts.columns:
        prompts["use"] = TEXT_USE_ZERO_SHOT
    return prompts, vectors.astype(np.float32, copy=False)
