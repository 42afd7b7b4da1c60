"""``<dataset>/image_embeddings``, per model: raw image embeddings in the lake (Parquet,
FixedSizeList<float32>), embedding only images not yet stored for the model's current
fingerprint; one ``embedding_runs`` row per run (speed, device, batch)."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pandas as pd

from nfhm_pipeline.stages.base import (
    CheckOutcome, CheckSpec, Device, Location, Log, Paths, StageResult, new_run_id, quiet, read_manifest,
)

CHECKS = (
    CheckSpec("every_image_embedded", "The stored image_ids are exactly the manifest's, each once, in its order "
              "(identity, not only counts).", blocking=True),
    CheckSpec("vectors_finite", "No NaN or inf in any vector.", blocking=True),
    CheckSpec("dimension_as_declared", "Stored dimension equals the model's declared output dimension."),
)
DESCRIPTION = ("Raw image embeddings per model (Parquet, FixedSizeList<float32>), re-embedding only images not "
               "yet stored for the model's current fingerprint.")


def load_model(model, paths: Paths, device: Device):
    """The catalog model's embedder on ``device`` (self-made demo weights are built on first use)."""
    from nfhm_pipeline.embedders.loaders import load_embedder
    from nfhm_pipeline.embedders.runtime import model_loader_spec

    spec = {**model_loader_spec(model, paths.subdir("models")), "id": model.key}
    embedder = load_embedder(spec, device=device.name, precision=device.precision)
    embedder.model_id = model.key
    return embedder


def run(dataset, model, paths: Paths, device: Device, *, run_id: str | None = None, log: Log = quiet) -> StageResult:
    from nfhm_pipeline.embedders.runtime import EmbedSettings, PixelCache, embed_manifest, embedding_identity
    from nfhm_pipeline.store import warehouse

    manifest = read_manifest(paths, dataset.name)
    embedder = load_model(model, paths, device)
    device_name = str(embedder.device)
    # On a CPU, loader workers compete with the forward pass for the same cores (measured:
    # benchmarks/embed_throughput.py); decoding happens once anyway thanks to the pixel cache.
    workers = device.num_workers if not device_name.startswith("cpu") else 0
    settings = EmbedSettings(batch_size=device.batch_size, num_workers=workers, device=device_name,
                             chunk_size=device.checkpoint_images)
    report = embed_manifest(paths.lake, dataset.name, model.key, manifest, embedder,
                            PixelCache(paths.subdir("cache", "pixels")), settings)
    stored = report.table  # the table as written: the checks need no second read of the lake
    runs = pd.DataFrame([{
        "dataset": dataset.name, "model": model.key, "fingerprint": report.fingerprint, "images": report.total,
        "new": report.new, "reused": report.reused, "removed": report.removed, "resumed": report.resumed,
        "seconds": report.seconds, "images_per_s": report.images_per_s, "device": settings.device,
        "precision": device.precision, "batch_size": settings.batch_size, "run_id": new_run_id(run_id),
        "finished_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
    }])
    # One transaction: the run's row and the view that shows its table appear together.
    warehouse.replace_many(paths.warehouse, [("embedding_runs", runs, {})], lake_root=paths.lake_root, log_wait=log)
    identity = embedding_identity(manifest["image_id"].tolist(), stored.image_ids.tolist())
    finite = bool(np.isfinite(stored.vectors).all())
    return StageResult(
        metadata={
            "dagster/row_count": report.total, "path": Location(paths.lake.uri(dataset.name, model.key)),
            "dim": report.dim, "fingerprint": report.fingerprint[:16], "new": report.new,
            "reused": report.reused, "removed": report.removed, "resumed": report.resumed,
            "images_per_s": float(np.nan_to_num(report.images_per_s)), "seconds": report.seconds,
            "device": settings.device, "batch_size": settings.batch_size,
        },
        checks=[
            CheckOutcome("every_image_embedded", identity.pop("passed"), identity),
            CheckOutcome("vectors_finite", finite),
            CheckOutcome("dimension_as_declared", stored.dim == embedder.dim,
                         {"stored": stored.dim, "declared": int(embedder.dim)}),
        ],
    )
