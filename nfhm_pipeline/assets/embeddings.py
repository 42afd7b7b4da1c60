"""``<dataset>/image_embeddings`` and ``<dataset>/text_embeddings``, partitioned by model."""

import datetime as dt

import dagster as dg
import numpy as np
import pandas as pd

from nfhm_pipeline.assets.common import markdown_table, read_manifest
from nfhm_pipeline.catalog import Catalog, DatasetSpec
from nfhm_pipeline.resources import NfhmStorage, TorchDevice
from nfhm_pipeline.stages.embedding import (
    EmbedSettings, PixelCache, embed_manifest, embed_prompts, embedding_identity, model_loader_spec,
    text_prompt_table,
)
from nfhm_pipeline.store import warehouse
from nfhm_pipeline.store.text_store import write_text_embeddings


def model_partitions(catalog: Catalog, spec: DatasetSpec) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([m.key for m in catalog.models_for(spec.name)])


def load_model(catalog: Catalog, key: str, storage: NfhmStorage, torch_device: TorchDevice):
    from nfhm_pipeline.embedders.loaders import load_embedder

    spec = {**model_loader_spec(catalog.models[key], storage.subdir("models")), "id": key}
    embedder = load_embedder(spec, device=torch_device.resolve(), precision=torch_device.precision)
    embedder.model_id = key
    return embedder


def embeddings_asset(catalog: Catalog, spec: DatasetSpec) -> dg.AssetsDefinition:
    key = dg.AssetKey([spec.name, "image_embeddings"])
    checks = [
        dg.AssetCheckSpec("every_image_embedded", asset=key, blocking=True,
                          description="The stored image_ids are exactly the manifest's, each once, in its order "
                                      "(identity, not only counts)."),
        dg.AssetCheckSpec("vectors_finite", asset=key, blocking=True, description="No NaN or inf in any vector."),
        dg.AssetCheckSpec("dimension_as_declared", asset=key,
                          description="Stored dimension equals the model's declared output dimension."),
    ]

    @dg.asset(key=key, group_name=spec.name, kinds={"pytorch", "parquet"}, pool="gpu",
              partitions_def=model_partitions(catalog, spec), deps=[dg.AssetKey([spec.name, "image_manifest"])],
              check_specs=checks, automation_condition=dg.AutomationCondition.eager(),
              description="Raw image embeddings per model (Parquet, FixedSizeList<float32>), re-embedding "
                          "only images not yet stored for the model's current fingerprint.")
    def image_embeddings(context: dg.AssetExecutionContext, storage: NfhmStorage,
                         torch_device: TorchDevice) -> dg.MaterializeResult:
        model = context.partition_key
        manifest = read_manifest(storage, spec.name)
        embedder = load_model(catalog, model, storage, torch_device)
        device = str(embedder.device)
        # On a CPU, loader workers compete with the forward pass for the same cores (measured:
        # benchmarks/embed_throughput.py); decoding happens once anyway thanks to the pixel cache.
        workers = torch_device.num_workers if not device.startswith("cpu") else 0
        settings = EmbedSettings(batch_size=torch_device.batch_size, num_workers=workers, device=device,
                                 chunk_size=torch_device.checkpoint_images)
        report = embed_manifest(storage.lake, spec.name, model, manifest, embedder,
                                PixelCache(storage.subdir("cache", "pixels")), settings)
        stored = storage.lake.read(spec.name, model)
        run = pd.DataFrame([{
            "dataset": spec.name, "model": model, "fingerprint": report.fingerprint, "images": report.total,
            "new": report.new, "reused": report.reused, "removed": report.removed, "resumed": report.resumed,
            "seconds": report.seconds, "images_per_s": report.images_per_s, "device": settings.device,
            "precision": torch_device.precision, "batch_size": settings.batch_size, "run_id": context.run_id,
            "finished_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None),
        }])
        # One transaction: the run's row and the view that shows its table appear together.
        warehouse.replace_many(storage.warehouse_path, [("embedding_runs", run, {})], lake_root=storage.lake_root,
                               log_wait=context.log.info)
        identity = embedding_identity(manifest["image_id"].tolist(), stored.image_ids.tolist())
        finite = bool(np.isfinite(stored.vectors).all())
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": report.total, "path": dg.MetadataValue.path(storage.lake.uri(spec.name, model)),
                "dim": report.dim, "fingerprint": report.fingerprint[:16], "new": report.new,
                "reused": report.reused, "removed": report.removed, "resumed": report.resumed,
                "images_per_s": float(np.nan_to_num(report.images_per_s)), "seconds": report.seconds,
                "device": settings.device, "batch_size": settings.batch_size,
            },
            check_results=[
                dg.AssetCheckResult(check_name="every_image_embedded", passed=identity.pop("passed"),
                                    metadata=identity),
                dg.AssetCheckResult(check_name="vectors_finite", passed=finite),
                dg.AssetCheckResult(check_name="dimension_as_declared", passed=stored.dim == embedder.dim,
                                    metadata={"stored": stored.dim, "declared": int(embedder.dim)}),
            ],
        )

    return image_embeddings


def text_embeddings_asset(catalog: Catalog, spec: DatasetSpec) -> dg.AssetsDefinition:
    from nfhm_pipeline.stages.prompts import templates_for

    @dg.asset(key=[spec.name, "text_embeddings"], group_name=spec.name, kinds={"pytorch", "parquet"}, pool="gpu",
              partitions_def=model_partitions(catalog, spec), deps=[dg.AssetKey([spec.name, "image_manifest"])],
              automation_condition=dg.AutomationCondition.eager(),
              description="Class-prompt text embeddings (every template × class × label level) for models "
                          "with a text tower; an empty table for the others.")
    def text_embeddings(context: dg.AssetExecutionContext, storage: NfhmStorage,
                        torch_device: TorchDevice) -> dg.MaterializeResult:
        model = context.partition_key
        embedder = load_model(catalog, model, storage, torch_device)
        if not embedder.has_text_tower:
            write_text_embeddings(storage.lake, spec.name, model, None, None, embedder.fingerprint)
            return dg.MaterializeResult(metadata={"dagster/row_count": 0, "text_tower": False})
        manifest = read_manifest(storage, spec.name)
        classes = {level: sorted(manifest[level].dropna().unique()) for level in spec.labels}
        prompts = text_prompt_table(classes, templates_for(spec.prompts))
        vectors = embed_prompts(embedder, prompts)
        path = write_text_embeddings(storage.lake, spec.name, model, prompts, vectors, embedder.fingerprint)
        return dg.MaterializeResult(metadata={
            "dagster/row_count": len(prompts), "text_tower": True, "path": dg.MetadataValue.path(path),
            "templates": len(prompts["template"].unique()), "dim": int(vectors.shape[1]),
            "preview": markdown_table(prompts.head(5)),
        })

    return text_embeddings
