"""The assets, declared: one row per stage in :data:`STAGES`, one loop that makes the ``@dg.asset``s
of every catalog dataset. What a stage does is in its ``nfhm_pipeline.stages`` module.

Pools name the work, not the asset: ``gpu`` for the stages whose heavy loop runs on the torch
device (embedding, the kNN Gram matrices, the alignment head), so one GPU is never oversubscribed.
Warehouse writes need no pool: the warehouse serialises its writers itself with a file lock held
only for the write's transaction (``store.warehouse``), so a CPU step never waits for a GPU step
to finish its compute, nor the other way round.

The embedding stages also carry op tags that only the distributed executors read: a GPU request for
their Kubernetes pod (``dagster-k8s/config``, ``NFHM_K8S_GPU_LIMIT`` GPUs, default 1) and the Celery
queue ``gpu`` (``dagster-celery/queue``). The multiprocess executor ignores both.
"""

import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Callable

import dagster as dg

from nfhm_pipeline.catalog import Catalog, DatasetSpec
from nfhm_pipeline.errors import SettingsError
from nfhm_pipeline.resources import NfhmStorage, TorchDevice
from nfhm_pipeline.stages import (
    alignment_head, embedding_maps, image_embeddings, knn_metrics, linear_probe_metrics, manifest,
    model_comparison, multilabel_metrics, splits, text_embeddings, zero_shot_metrics,
)
from nfhm_pipeline.stages.base import ColumnSchema, Location, Markdown, StageResult

EAGER = dg.AutomationCondition.eager
NIGHTLY_REPORT = "0 6 * * *"


def _always(spec: DatasetSpec) -> bool:
    return True


def _auc(spec: DatasetSpec) -> bool:
    from nfhm_pipeline.evaluation.multilabel_tables import evaluates_auc

    return evaluates_auc(spec)


@dataclass(frozen=True)
class Stage:
    name: str  # the asset key is [dataset, name]
    module: ModuleType  # its run(), CHECKS and DESCRIPTION / describe(spec)
    deps: tuple[str, ...] | Callable[[DatasetSpec], tuple[str, ...]]
    kinds: frozenset[str]
    pool: str | None = None
    partitioned: bool = True  # one partition per catalog model
    applies: Callable[[DatasetSpec], bool] = _always
    cron: str | None = None  # on_cron automation instead of eager
    op_tags: Callable[[], dict] | None = None  # read when the code location loads
    ray_engine: bool = False  # runs on Ray Data when the definitions carry a `ray_cluster` resource


def gpu_step_tags() -> dict:
    """Op tags of a step that needs a GPU on a cluster (deploy/k8s-gpu-op-tags.yaml, with
    ``NFHM_K8S_GPU_LIMIT`` GPUs): read by dagster-k8s (pod resources) and dagster-celery (queue)."""
    raw = os.environ.get("NFHM_K8S_GPU_LIMIT", "1").strip()
    if not raw.isdigit() or int(raw) < 1:
        raise SettingsError(f"environment variable NFHM_K8S_GPU_LIMIT={raw!r} must be a whole number >= 1 "
                            "(GPUs per embedding pod); unset it (default 1) or fix it")
    return {
        "dagster-k8s/config": {
            "container_config": {"resources": {"limits": {"nvidia.com/gpu": str(int(raw))}}},
            "pod_spec_config": {
                "node_selector": {"nvidia.com/gpu.present": "true"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
        "dagster-celery/queue": "gpu",
    }


def _text_deps(spec: DatasetSpec) -> tuple[str, ...]:
    # AUC datasets embed the label prompts of the split's classes
    return ("image_manifest", "splits") if _auc(spec) else ("image_manifest",)


def _comparison_deps(spec: DatasetSpec) -> tuple[str, ...]:
    metric_stages = ("knn_metrics", "linear_probe_metrics", "zero_shot_metrics")
    return metric_stages + (("multilabel_metrics", "alignment_head") if _auc(spec) else ())


# In the order the runner materializes a model's stages (Dagster orders dependent steps anyway).
STAGES: tuple[Stage, ...] = (
    Stage("image_manifest", manifest, (), frozenset({"parquet", "duckdb"}), partitioned=False),
    Stage("image_embeddings", image_embeddings, ("image_manifest",), frozenset({"pytorch", "parquet"}), pool="gpu",
          op_tags=gpu_step_tags, ray_engine=True),
    Stage("splits", splits, ("image_manifest",), frozenset({"duckdb"}), partitioned=False),
    Stage("text_embeddings", text_embeddings, _text_deps, frozenset({"pytorch", "parquet"}), pool="gpu",
          op_tags=gpu_step_tags),
    Stage("knn_metrics", knn_metrics, ("image_embeddings", "splits"), frozenset({"pytorch", "duckdb"}), pool="gpu"),
    Stage("linear_probe_metrics", linear_probe_metrics, ("image_embeddings", "splits"),
          frozenset({"scikitlearn", "duckdb"})),
    Stage("zero_shot_metrics", zero_shot_metrics, ("image_embeddings", "text_embeddings", "splits"),
          frozenset({"pytorch", "duckdb"})),
    Stage("multilabel_metrics", multilabel_metrics, ("image_embeddings", "text_embeddings", "splits"),
          frozenset({"scikitlearn", "duckdb"}), applies=_auc),
    Stage("alignment_head", alignment_head, ("image_embeddings", "text_embeddings", "splits"),
          frozenset({"pytorch", "safetensors", "duckdb"}), pool="gpu", applies=_auc),
    Stage("embedding_maps", embedding_maps, ("image_embeddings",), frozenset({"umap", "png"})),
    Stage("model_comparison", model_comparison, _comparison_deps, frozenset({"duckdb", "html"}), partitioned=False,
          cron=NIGHTLY_REPORT),
)


def dataset_assets(catalog: Catalog, spec: DatasetSpec, *, ray: bool = False) -> list[dg.AssetsDefinition]:
    """Every asset of one dataset, keys ``[dataset, stage]``. ``ray``: the image embeddings run on
    the ``ray`` engine, each step holding the ``ray_cluster`` resource (dagster-ray) while it runs."""
    partitions = dg.StaticPartitionsDefinition([m.key for m in catalog.models_for(spec.name)])
    return [_asset(catalog, spec, stage, partitions, ray=ray and stage.ray_engine)
            for stage in STAGES if stage.applies(spec)]


def _asset(catalog: Catalog, spec: DatasetSpec, stage: Stage, partitions, *, ray: bool = False) -> dg.AssetsDefinition:
    key = dg.AssetKey([spec.name, stage.name])
    module = stage.module
    deps = stage.deps(spec) if callable(stage.deps) else stage.deps
    describe = getattr(module, "describe", None)
    checks = [dg.AssetCheckSpec(c.name, asset=key, blocking=c.blocking, description=c.description)
              for c in getattr(module, "CHECKS", ())]

    decorate = dg.asset(key=key, group_name=spec.name, kinds=set(stage.kinds), pool=stage.pool,
                        partitions_def=partitions if stage.partitioned else None,
                        deps=[dg.AssetKey([spec.name, d]) for d in deps], check_specs=checks or None,
                        automation_condition=dg.AutomationCondition.on_cron(stage.cron) if stage.cron else EAGER(),
                        description=describe(spec) if describe else module.DESCRIPTION,
                        op_tags=stage.op_tags() if stage.op_tags else None)

    def run_stage(context: dg.AssetExecutionContext, storage: NfhmStorage, torch_device: TorchDevice,
                  engine: str = "local") -> dg.MaterializeResult:
        model = catalog.models[context.partition_key] if stage.partitioned else None
        # Only the stages that run torch resolve the device (resolving imports torch).
        device = torch_device.settings() if stage.pool == "gpu" else torch_device.settings(resolve=False)
        device = replace(device, engine=engine)
        result = module.run(spec, model, storage.paths(), device, run_id=context.run_id, log=context.log.info)
        return materialize_result(result)

    if ray:
        from dagster_ray import RayResource

        # Holding dagster-ray's resource connects the step to Ray (local, RAY_ADDRESS or KubeRay)
        # before the stage runs; the stage's Ray Data job then uses that connection.
        @decorate
        def _stage_asset(context: dg.AssetExecutionContext, storage: NfhmStorage, torch_device: TorchDevice,
                         ray_cluster: RayResource) -> dg.MaterializeResult:
            return run_stage(context, storage, torch_device, engine="ray")
    else:
        @decorate
        def _stage_asset(context: dg.AssetExecutionContext, storage: NfhmStorage,
                         torch_device: TorchDevice) -> dg.MaterializeResult:
            return run_stage(context, storage, torch_device)

    return _stage_asset


def materialize_result(result: StageResult) -> dg.MaterializeResult:
    """A stage's plain result as Dagster metadata and check results."""
    return dg.MaterializeResult(
        metadata={name: _metadata_value(value) for name, value in result.metadata.items()},
        check_results=[
            dg.AssetCheckResult(check_name=c.name, passed=bool(c.passed),
                                metadata={k: _metadata_value(v) for k, v in c.metadata.items()},
                                **({"severity": dg.AssetCheckSeverity.WARN} if c.warn_only else {}))
            for c in result.checks] or None,
    )


def _metadata_value(value):
    if isinstance(value, Markdown):
        return dg.MetadataValue.md(str(value))
    if isinstance(value, (Path, Location)):
        return dg.MetadataValue.path(str(value))
    if isinstance(value, ColumnSchema):
        return dg.TableSchema(columns=[dg.TableColumn(name=n, type=t) for n, t in value.columns])
    return value
