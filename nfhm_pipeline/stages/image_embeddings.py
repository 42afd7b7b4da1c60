"""``<dataset>/image_embeddings``, per model: raw image embeddings in the lake (Parquet,
FixedSizeList<float32>), embedding only images not yet stored for the model's current
fingerprint; one ``embedding_runs`` row per run (speed, where the time went, device, batch).

The nightly re-embed usually finds nothing to do, and loading a model costs more than that check:
the fingerprint is looked up by the model's load key (``embedders.loaders.load_key``: the catalog
entry and the identity of the weight files, no model built) in a memo of earlier loads
(``FingerprintMemo`` under ``<data>/cache/fingerprints``). When the stored table holds the
manifest's images under that fingerprint, the run is recorded (new=0) without loading the model.
Any other case loads it, and the load records its key. Tables embedded before the memo existed
carry the same fingerprint recipe, so they are recognised after one load, not re-embedded.

While it embeds, progress (images done / total, images/s, time left) goes to the run log every
~10 s and at each quarter, and to a console bar under ``nfhm demo`` (``nfhm_pipeline.progress``)."""
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


def model_spec(model, paths: Paths) -> dict:
    """The loader spec of a catalog model, with its key as ``id`` (self-made demo weights are built
    on first use)."""
    from nfhm_pipeline.embedders.runtime import model_loader_spec

    return {**model_loader_spec(model, paths.subdir("models")), "id": model.key}


def fingerprint_memo(paths: Paths):
    from nfhm_pipeline.store.embedding_store import FingerprintMemo

    return FingerprintMemo(paths.subdir("cache", "fingerprints"))


def model_load_key(model, spec: dict, device: Device) -> str | None:
    """``embedders.loaders.load_key`` of ``spec``, told apart by the catalog's ``jpeg_draft`` (which
    changes the pixels, hence the fingerprint, but is not a loader field)."""
    import hashlib

    from nfhm_pipeline.embedders.loaders import load_key

    key = load_key(spec, precision=device.precision)
    if key and getattr(model, "jpeg_draft", False):
        key = hashlib.sha256(f"{key}+jpeg_draft".encode()).hexdigest()
    return key


def known_model(spec: dict, paths: Paths, device: Device, model=None):
    """What an earlier load of ``spec`` at ``device.precision`` gave (``ModelFacts``), found
    without loading it; None when this load was never seen (or cannot be told apart)."""
    key = model_load_key(model, spec, device)
    return fingerprint_memo(paths).get(key) if key else None


def load_model(model, paths: Paths, device: Device, spec: dict | None = None):
    """The catalog model's embedder on ``device``; records what the load gave under its load key."""
    from nfhm_pipeline.embedders.loaders import load_embedder
    from nfhm_pipeline.embedders.runtime import use_jpeg_draft
    from nfhm_pipeline.store.embedding_store import ModelFacts

    spec = spec or model_spec(model, paths)
    embedder = load_embedder(spec, device=device.name, precision=device.precision)
    embedder.model_id = model.key
    if getattr(model, "jpeg_draft", False):
        use_jpeg_draft(embedder)  # before the memo records its fingerprint
    # The key after the load: files the load fetched into the hub cache are there now, as next time.
    key = model_load_key(model, spec, device)
    if key:
        fingerprint_memo(paths).put(key, ModelFacts(embedder.fingerprint, int(embedder.dim),
                                                    bool(embedder.has_text_tower)))
    return embedder


def run(dataset, model, paths: Paths, device: Device, *, run_id: str | None = None, log: Log = quiet) -> StageResult:
    from nfhm_pipeline import progress
    from nfhm_pipeline.embedders.runtime import (
        EmbedSettings, EmbedTimings, PixelCache, embed_manifest, embedding_identity,
    )
    from nfhm_pipeline.store import warehouse

    manifest = read_manifest(paths, dataset.name)
    image_ids = manifest["image_id"].astype(str).tolist()
    lake = paths.lake
    spec = model_spec(model, paths)
    facts = known_model(spec, paths, device, model)
    report = lake.unchanged(dataset.name, model.key, image_ids, facts.fingerprint) if facts else None
    timings = EmbedTimings()
    loaded = report is None
    if not loaded:
        log(f"{dataset.name}/{model.key}: the {report.total} stored embeddings are the manifest's, under the "
            f"model's current fingerprint {report.fingerprint[:12]}: nothing to embed, model not loaded")
        settings = EmbedSettings(batch_size=device.batch_size, num_workers=0, device=device.name,
                                 chunk_size=device.checkpoint_images)
        declared_dim = facts.dim
    elif device.engine == "ray":
        report, settings, declared_dim = _embed_on_ray(dataset, model, manifest, spec, paths, device, timings, log)
    else:
        embedder = load_model(model, paths, device, spec)
        device_name = str(embedder.device)
        # On a CPU, loader workers compete with the forward pass for the same cores (measured:
        # benchmarks/embed_throughput.py); decoding happens once anyway thanks to the pixel cache.
        workers = device.num_workers if not device_name.startswith("cpu") else 0
        settings = EmbedSettings(batch_size=device.batch_size, num_workers=workers, device=device_name,
                                 chunk_size=device.checkpoint_images)
        label = f"{dataset.name}/{model.key}"
        todo = lake.pending(dataset.name, model.key, image_ids, embedder.fingerprint)
        meter = progress.ProgressMeter(todo, label=f"{label} embedding", log=log,
                                       bar=progress.console_bar(todo, label)) if todo else None
        try:
            report = embed_manifest(lake, dataset.name, model.key, manifest, embedder,
                                    PixelCache(paths.subdir("cache", "pixels")) if model.pixel_cache else None,
                                    settings, timings=timings,
                                    on_images=meter.update if meter else None)
        finally:
            if meter is not None:
                meter.close()
        declared_dim = int(embedder.dim)
    # The checks read what the store gathered while writing the parts: no second read of the lake.
    runs = pd.DataFrame([{
        "dataset": dataset.name, "model": model.key, "fingerprint": report.fingerprint, "images": report.total,
        "new": report.new, "reused": report.reused, "removed": report.removed, "resumed": report.resumed,
        "seconds": report.seconds, "images_per_s": report.images_per_s, "device": settings.device,
        "precision": device.precision, "batch_size": settings.batch_size, "run_id": new_run_id(run_id),
        "finished_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
        "decode_s": float(timings.decode_s), "forward_s": float(timings.forward_s),
        "wait_s": float(timings.wait_s),
    }])
    # One transaction: the run's row and the view that shows its table appear together.
    warehouse.replace_many(paths.warehouse, [("embedding_runs", runs, {})], lake_root=paths.lake_root, log_wait=log)
    identity = embedding_identity(image_ids, report.ids)
    finite = bool(report.all_finite)
    return StageResult(
        metadata={
            "dagster/row_count": report.total, "path": Location(lake.uri(dataset.name, model.key)),
            "dim": report.dim, "fingerprint": report.fingerprint[:16], "new": report.new,
            "reused": report.reused, "removed": report.removed, "resumed": report.resumed,
            "parts_written": report.parts_written, "parts_kept": report.parts_kept,
            "images_per_s": float(np.nan_to_num(report.images_per_s)), "seconds": report.seconds,
            "decode_s": float(timings.decode_s), "forward_s": float(timings.forward_s),
            "wait_s": float(timings.wait_s), "model_loaded": loaded,
            "device": settings.device, "batch_size": settings.batch_size,
        },
        checks=[
            CheckOutcome("every_image_embedded", identity.pop("passed"), identity),
            CheckOutcome("vectors_finite", finite),
            CheckOutcome("dimension_as_declared", report.dim == declared_dim,
                         {"stored": report.dim, "declared": declared_dim}),
        ],
    )


# Images per Ray Data job: each job starts its actor pool and loads the model in every actor
# (benchmarks/ray_overhead.py), so it takes many checkpoints' worth; a killed worker is retried
# inside the job, and a killed driver still keeps every part written before.
RAY_CHUNK_IMAGES = 16_384


def _embed_on_ray(dataset, model, manifest, spec: dict, paths: Paths, device: Device, timings, log: Log):
    """The ``ray`` engine: the forward passes run in ``device.ray_actors`` Ray actors
    (``embedders.ray_engine``) on the Ray this process is connected to; parts are written here."""
    from nfhm_pipeline import progress
    from nfhm_pipeline.embedders.ray_engine import connect_ray, ray_embed_chunk
    from nfhm_pipeline.embedders.runtime import EmbedSettings

    address = connect_ray()  # reuses the Ray the ray_cluster resource (or the caller) joined
    # The driver needs the fingerprint the actors must reproduce; a CPU load keeps the GPUs for them.
    embedder = load_model(model, paths, Device("cpu", precision=device.precision), spec)
    cuda = device.name.startswith("cuda")
    settings = EmbedSettings(batch_size=device.batch_size, num_workers=0, device=f"ray:{device.name}",
                             chunk_size=max(device.checkpoint_images, RAY_CHUNK_IMAGES))
    image_ids = manifest["image_id"].astype(str).tolist()
    label = f"{dataset.name}/{model.key}"
    todo = paths.lake.pending(dataset.name, model.key, image_ids, embedder.fingerprint)
    log(f"{label}: embedding {todo} image(s) on Ray at {address} with {device.ray_actors} actor(s) on {device.name}")
    meter = progress.ProgressMeter(todo, label=f"{label} embedding", log=log,
                                   bar=progress.console_bar(todo, label)) if todo else None
    chunk = ray_embed_chunk(spec, model.key, image_ids, manifest["uri"].astype(str).tolist(),
                            expected_fingerprint=embedder.fingerprint, device=device.name,
                            precision=device.precision, batch_size=device.batch_size,
                            num_gpus_per_actor=1 if cuda else 0, concurrency=device.ray_actors,
                            jpeg_draft=bool(getattr(model, "jpeg_draft", False)), dataset=dataset.name,
                            on_images=meter.update if meter else None, timings=timings)
    try:
        report = paths.lake.embed_incrementally(dataset.name, model.key, image_ids, embedder.fingerprint, chunk,
                                                chunk_size=settings.chunk_size)
    finally:
        if meter is not None:
            meter.close()
    return report, settings, int(embedder.dim)
