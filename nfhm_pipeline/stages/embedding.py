"""Stage 2: manifest → per-model embedding table (incremental, checkpointed).

Images are decoded and resized once per preprocessing spec (size, resize mode,
interpolation) into a uint8 cache shared by every model with that spec; each
model's mean/std normalisation runs on the device. On a GPU decoding costs more
than a ViT-B forward pass, so decoding per model would waste most of the run.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from nfhm_pipeline.catalog import ModelSpec
from nfhm_pipeline.store.embedding_store import EmbeddingStore, EmbedReport


class PixelCache:
    """uint8 [3, S, S] arrays keyed by (pixel_key, image_id); image_id is the sha256 of the bytes,
    so an entry is valid forever and shared across datasets."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, pixel_key: str, image_id: str) -> Path:
        return self.root / pixel_key / image_id[:2] / f"{image_id}.npy"

    def load_or_decode(self, pixel_key: str, image_id: str, uri: str, decode: Callable[[str], np.ndarray]) -> np.ndarray:
        path = self.path(pixel_key, image_id)
        try:
            return np.load(path, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            pass
        pixels = decode(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, pixels, allow_pickle=False)
        os.replace(tmp, path)
        return pixels


class _PixelDataset:
    """Map-style dataset for torch's DataLoader: position → (position, uint8 tensor)."""

    def __init__(self, image_ids, uris, positions, preprocess, cache: PixelCache):
        self.image_ids, self.uris, self.positions = image_ids, uris, list(positions)
        self.preprocess, self.cache = preprocess, cache

    def __len__(self):
        return len(self.positions)

    def _decode(self, uri: str) -> np.ndarray:
        from nfhm_pipeline.embedders.preprocess import decode_to_uint8
        from nfhm_pipeline.ingest.images import load_rgb

        return decode_to_uint8(load_rgb(uri), self.preprocess)

    def __getitem__(self, i):
        import torch

        pos = self.positions[i]
        pixels = self.cache.load_or_decode(self.preprocess.pixel_key, self.image_ids[pos], self.uris[pos], self._decode)
        return pos, torch.from_numpy(np.ascontiguousarray(pixels))


@dataclass
class EmbedSettings:
    batch_size: int = 64
    num_workers: int = 2
    chunk_size: int = 1024  # images per checkpoint
    device: str = "cpu"


def make_batches(embedder, image_ids: Sequence[str], uris: Sequence[str], pixel_cache: PixelCache,
                 settings: EmbedSettings, on_batch: Callable[[int], None] | None = None):
    """Return ``embed_chunk(positions)`` for :meth:`EmbeddingStore.embed_incrementally`."""
    import torch
    from torch.utils.data import DataLoader

    batches_done = 0

    def embed_chunk(positions):
        nonlocal batches_done
        dataset = _PixelDataset(image_ids, uris, positions, embedder.preprocess, pixel_cache)
        workers = min(settings.num_workers, max(0, len(dataset) // settings.batch_size))
        loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=workers,
                            pin_memory=settings.device == "cuda", persistent_workers=False)
        for pos, pixels in loader:
            vectors = embedder.embed_uint8(pixels)
            if isinstance(vectors, torch.Tensor):
                vectors = vectors.detach().float().cpu().numpy()
            batches_done += 1
            if on_batch is not None:
                on_batch(batches_done)
            yield pos.numpy(), vectors

    return embed_chunk


def embed_manifest(store: EmbeddingStore, dataset: str, model: str, manifest: pd.DataFrame, embedder,
                   pixel_cache: PixelCache, settings: EmbedSettings,
                   on_batch: Callable[[int], None] | None = None) -> EmbedReport:
    """Bring ``dataset``'s stored embeddings for ``model`` up to date with ``manifest``."""
    image_ids = manifest["image_id"].astype(str).tolist()
    uris = manifest["uri"].astype(str).tolist()
    embed_chunk = make_batches(embedder, image_ids, uris, pixel_cache, settings, on_batch)
    return store.embed_incrementally(dataset, model, image_ids, embedder.fingerprint, embed_chunk,
                                     chunk_size=settings.chunk_size)


def model_loader_spec(model: ModelSpec, models_dir: Path) -> dict:
    """The loader spec of a catalog model, building self-made weights (the offline demo) if needed."""
    spec = model.loader_spec()
    if model.build == "tiny_openclip":
        from nfhm_pipeline.embedders.tiny import build_tiny_openclip_checkpoint

        rel = spec.get("pretrained") or f"{model.key}.safetensors"
        path = Path(rel) if Path(rel).is_absolute() else models_dir / Path(rel).name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            build_tiny_openclip_checkpoint(path, seed=int(spec.get("seed", 0)))
        spec["pretrained"] = str(path)
        spec.pop("seed", None)
    return spec


def text_prompt_table(class_names_by_level: dict[str, Sequence[str]], templates: Sequence[str]) -> pd.DataFrame:
    rows = [(level, name, t, t.format(name)) for level, names in class_names_by_level.items()
            for name in names for t in templates]
    return pd.DataFrame(rows, columns=["level", "class", "template", "prompt"])


def embed_prompts(embedder, prompts: pd.DataFrame, batch_size: int = 256) -> np.ndarray:
    texts = prompts["prompt"].tolist()
    out = [np.asarray(embedder.embed_texts(texts[i:i + batch_size]), dtype=np.float32)
           for i in range(0, len(texts), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
