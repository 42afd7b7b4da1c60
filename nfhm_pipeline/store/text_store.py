"""Class-prompt text embeddings in the lake, beside the image embeddings.

``text_embeddings/dataset=<d>/model=<m>/text_embeddings.parquet`` with columns
level, class, template, prompt, embedding (FixedSizeList<float32>[dim]) and the
model fingerprint in the file metadata. Models without a text tower get an
empty table, so downstream assets can tell "no text tower" from "not run".
"""
from __future__ import annotations

import os
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from nfhm_pipeline.store.embedding_store import EmbeddingStore
from nfhm_pipeline.store.schemas import EMBEDDING_FINGERPRINT_KEY


def text_path(store: EmbeddingStore, dataset: str, model: str) -> str:
    return f"{store.base}/text_embeddings/dataset={dataset}/model={model}/text_embeddings.parquet"


def write_text_embeddings(store: EmbeddingStore, dataset: str, model: str, prompts: pd.DataFrame | None,
                          vectors: np.ndarray | None, fingerprint: str) -> str:
    if prompts is None:
        prompts = pd.DataFrame(columns=["level", "class", "template", "prompt"])
        vectors = np.zeros((0, 1), np.float32)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    cols = {c: pa.array(prompts[c].astype(str).tolist(), type=pa.string()) for c in ["level", "class", "template", "prompt"]}
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)
    table = pa.table(cols).replace_schema_metadata({EMBEDDING_FINGERPRINT_KEY: fingerprint.encode()})
    path = text_path(store, dataset, model)
    parent = path.rsplit("/", 1)[0]
    store.fs.create_dir(parent, recursive=True)
    if isinstance(store.fs, pafs.LocalFileSystem):
        tmp = f"{parent}/.text_embeddings.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    else:
        pq.write_table(table, path, filesystem=store.fs)
    return path


def read_text_embeddings(store: EmbeddingStore, dataset: str, model: str) -> tuple[pd.DataFrame, np.ndarray] | None:
    """(prompts frame, vectors [n, dim]) or None when never written; an empty frame means no text tower."""
    path = text_path(store, dataset, model)
    if store.fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with store.fs.open_input_file(path) as f:
        table = pq.read_table(f)
    emb = table.column("embedding").combine_chunks()
    vectors = emb.values.to_numpy(zero_copy_only=False).reshape(len(table), emb.type.list_size)
    return table.drop(["embedding"]).to_pandas(), vectors.astype(np.float32, copy=False)
