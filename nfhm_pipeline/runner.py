"""Materialize a whole catalog in stage order: what ``nfhm demo`` and the tests run.

Each (dataset, stage) is one Dagster run, and each model partition its own run,
so one model failing (say, weights missing offline) fails only its partition.
Runs are recorded in the given instance, so ``make ui`` shows them afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import dagster as dg

from nfhm_pipeline.catalog import Catalog

UNPARTITIONED_FIRST = ("image_manifest", "splits")
UNPARTITIONED_LAST = ("model_comparison",)


@dataclass
class CatalogRun:
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # "dataset/stage[model]" → error message

    @property
    def ok(self) -> bool:
        return not self.failed


def materialize_catalog(catalog: Catalog, *, instance: dg.DagsterInstance, resources: dict | None = None,
                        datasets: list[str] | None = None, models: list[str] | None = None,
                        log=print, log_level: str = "CRITICAL") -> CatalogRun:
    from nfhm_pipeline.definitions import build_definitions

    defs = build_definitions(catalog, resources)
    assets = list(defs.assets)
    resources = defs.resources
    outcome = CatalogRun()
    # Step logs stay in the instance's event log (and the UI); the console shows one line per run.
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    by_key = {k: a for a in assets for k in a.keys}

    def run(keys: list[dg.AssetKey], label: str, partition_key: str | None = None) -> None:
        keys = [k for k in keys if k in by_key]
        if not keys:
            return
        result = dg.materialize(assets, selection=keys, instance=instance, resources=resources,
                                partition_key=partition_key, raise_on_error=False, run_config=run_config,
                                tags={"nfhm/source": "runner"})
        if result.success:
            outcome.succeeded.append(label)
            log(f"  ok      {label}")
        else:
            message = _failure_message(result)
            outcome.failed[label] = message
            log(f"  FAILED  {label}: {message}")

    for ds in datasets or list(catalog.datasets):
        spec = catalog.datasets[ds]
        log(f"{ds}:")
        partitioned = sorted({k for a in assets if a.partitions_def is not None for k in a.keys if k.path[0] == ds},
                             key=lambda k: _STAGE_ORDER.get(k.path[-1], 99))
        run([dg.AssetKey([ds, s]) for s in UNPARTITIONED_FIRST], f"{ds}/manifest+splits")
        if f"{ds}/manifest+splits" in outcome.failed:
            continue
        for model in catalog.models_for(spec.name):
            if models and model.key not in models:
                continue
            run(partitioned, f"{ds}/[{model.key}]", partition_key=model.key)
        run([dg.AssetKey([ds, s]) for s in UNPARTITIONED_LAST], f"{ds}/model_comparison")
    return outcome


_STAGE_ORDER = {"image_embeddings": 0, "text_embeddings": 1, "knn_metrics": 2, "linear_probe_metrics": 3,
                "zero_shot_metrics": 4, "multilabel_metrics": 5, "alignment_head": 6, "embedding_maps": 7}


def _failure_message(result) -> str:
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            chain, err = [], event.event_specific_data.error
            while err is not None:
                chain.append(err)
                err = err.cause
            # Our own errors explain themselves (file, model, what to do): report the outermost one;
            # otherwise the innermost error, the root cause of a library failure.
            ours = [e for e in chain if e.cls_name in _nfhm_error_names()]
            err = ours[0] if ours else (chain[-1] if chain else None)
            return f"{event.step_key}: {err.message.strip() if err else 'failed'}"
    return "failed"


def _nfhm_error_names() -> set[str]:
    from nfhm_pipeline.errors import NfhmError

    names, todo = set(), [NfhmError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names
