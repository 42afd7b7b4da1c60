"""Stage 2: manifest → per-model embedding table (incremental, checkpointed).

Images are decoded and resized once per preprocessing spec (size, resize mode,
interpolation) into a uint8 cache shared by every model with that spec; each
model's mean/std normalisation runs on the device. On a GPU decoding costs more
than a ViT-B forward pass, so decoding per model would waste most of the run.

The cache is content-addressed by the manifest's image_id (sha256 of the bytes), so what is decoded
must be those bytes: each file is read once, hashed, and decoded from the same bytes
(`load_verified_rgb`). A file rewritten since the manifest was built (the nightly re-embedding
schedule runs without the manifest) fails its partition with a message naming the file, and
nothing is cached or stored for it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from nfhm_pipeline.catalog import ModelSpec
from nfhm_pipeline.store.embedding_store import EmbeddingStore, EmbedReport


# Cache entries written before decoding verified the bytes' hash may hold another content's pixels
# under an id; a new layout folder leaves them unread (they cost one re-decode, never a wrong answer).
PIXEL_CACHE_LAYOUT = "verified-v1"


class PixelCache:
    """uint8 [3, S, S] arrays keyed by (pixel_key, image_id); image_id is the sha256 of the bytes,
    so an entry is valid forever and shared across datasets. Only pixels decoded from bytes whose
    sha256 was checked equal to image_id are written (see `_PixelDataset._decode`)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, pixel_key: str, image_id: str) -> Path:
        return self.root / PIXEL_CACHE_LAYOUT / pixel_key / image_id[:2] / f"{image_id}.npy"

    def load_or_decode(self, pixel_key: str, image_id: str, uri: str,
                       decode: Callable[[str, str], np.ndarray]) -> np.ndarray:
        """Cached pixels of `image_id`, or ``decode(uri, image_id)`` stored first. `decode` must
        raise rather than return pixels of bytes other than `image_id`'s."""
        path = self.path(pixel_key, image_id)
        try:
            return np.load(path, allow_pickle=False)
        except (FileNotFoundError, ValueError, OSError):
            pass
        pixels = decode(uri, image_id)
        from nfhm_pipeline.store.files import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.save(f, pixels, allow_pickle=False)
        return pixels


class _PixelDataset:
    """Map-style dataset for torch's DataLoader: position → (position, uint8 tensor, error message).

    A file that cannot be used gives its ManifestError's message (and zero pixels) instead of
    raising: raised in a loader worker process, torch would re-raise it with the worker's traceback
    pasted into the message; the main process raises it as it was (see `make_batches`)."""

    def __init__(self, image_ids, uris, positions, preprocess, cache: PixelCache, dataset: str | None = None):
        self.image_ids, self.uris, self.positions = image_ids, uris, list(positions)
        self.preprocess, self.cache, self.dataset = preprocess, cache, dataset

    def __len__(self):
        return len(self.positions)

    def _decode(self, uri: str, image_id: str) -> np.ndarray:
        from nfhm_pipeline.embedders.preprocess import decode_to_uint8
        from nfhm_pipeline.ingest.images import load_verified_rgb

        return decode_to_uint8(load_verified_rgb(uri, image_id, dataset=self.dataset), self.preprocess)

    def __getitem__(self, i):
        import torch

        from nfhm_pipeline.errors import ManifestError

        pos = self.positions[i]
        try:
            pixels = self.cache.load_or_decode(self.preprocess.pixel_key, self.image_ids[pos], self.uris[pos],
                                               self._decode)
        except ManifestError as e:
            size = self.preprocess.size
            return pos, torch.zeros((3, size, size), dtype=torch.uint8), str(e)
        return pos, torch.from_numpy(np.ascontiguousarray(pixels)), ""


@dataclass
class EmbedSettings:
    batch_size: int = 64
    num_workers: int = 2
    chunk_size: int = 1024  # images per checkpoint
    device: str = "cpu"


def make_batches(embedder, image_ids: Sequence[str], uris: Sequence[str], pixel_cache: PixelCache,
                 settings: EmbedSettings, on_batch: Callable[[int], None] | None = None,
                 dataset: str | None = None):
    """Return ``embed_chunk(positions)`` for :meth:`EmbeddingStore.embed_incrementally`."""
    import torch
    from torch.utils.data import DataLoader

    from nfhm_pipeline.errors import ManifestError

    batches_done = 0

    def embed_chunk(positions):
        nonlocal batches_done
        pixels_of = _PixelDataset(image_ids, uris, positions, embedder.preprocess, pixel_cache, dataset)
        workers = min(settings.num_workers, max(0, len(pixels_of) // settings.batch_size))
        loader = DataLoader(pixels_of, batch_size=settings.batch_size, shuffle=False, num_workers=workers,
                            pin_memory=settings.device == "cuda", persistent_workers=False)
        for pos, pixels, errors in loader:
            failed = [message for message in errors if message]
            if failed:  # before the forward pass: nothing of this batch is embedded or checkpointed
                raise ManifestError(failed[0] + (f" ({len(failed) - 1} more such image(s) in the same batch)"
                                                 if len(failed) > 1 else ""))
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
    embed_chunk = make_batches(embedder, image_ids, uris, pixel_cache, settings, on_batch, dataset=dataset)
    return store.embed_incrementally(dataset, model, image_ids, embedder.fingerprint, embed_chunk,
                                     chunk_size=settings.chunk_size)


def embedding_identity(manifest_ids: Sequence[str], stored_ids: Sequence[str]) -> dict:
    """Does the stored table hold exactly the manifest's images, each once, in manifest order?

    Counts alone pass a table whose ids differ from the manifest's (an id stored twice hiding a
    missing one); this compares the ids themselves. Returns {'passed', 'missing', 'unexpected',
    'repeated', 'stored', 'expected'}.
    """
    wanted = [str(i) for i in manifest_ids]
    stored = [str(i) for i in stored_ids]
    wanted_set, stored_set = set(wanted), set(stored)
    return {
        "passed": stored == list(dict.fromkeys(wanted)),
        "missing": len(wanted_set - stored_set),
        "unexpected": len(stored_set - wanted_set),
        "repeated": len(stored) - len(stored_set),
        "stored": len(stored),
        "expected": len(wanted),
    }


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
