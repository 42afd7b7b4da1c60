"""Materialize a whole catalog in stage order: what ``nfhm demo`` and the tests run.

Each (dataset, stage) is one Dagster run, and each model partition its own run,
so one model failing (say, weights missing offline) fails only its partition.
Runs are recorded in the given instance, so ``make ui`` shows them afterwards.

A user's interrupt (Ctrl-C, SIGTERM) stops the whole catalog, not only the step it lands in:
Dagster turns it into a failure of the current step and returns, so the runner watches for the
signal itself and starts nothing after it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import dagster as dg

from nfhm_pipeline.catalog import Catalog
from nfhm_pipeline.errors import CatalogError

UNPARTITIONED_FIRST = ("image_manifest", "splits")
UNPARTITIONED_LAST = ("model_comparison",)
# `nfhm demo --only <analysis>`: the per-model stages of one analysis (manifest and splits always run;
# the comparison report, the maps and every other analysis do not).
ONLY_STAGES: dict[str, tuple[str, ...]] = {
    "knn": ("image_embeddings", "knn_metrics"),  # the seed's nearest-neighbour analysis
    "probe": ("image_embeddings", "linear_probe_metrics"),
    "zero-shot": ("image_embeddings", "text_embeddings", "zero_shot_metrics"),
}
_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class CatalogRun:
    succeeded: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # "dataset/stage[model]" → error message
    run_ids: list[str] = field(default_factory=list)  # the Dagster runs this call launched
    interrupted: str | None = None  # the run the user's interrupt landed in ("" between runs)
    not_started: list[str] = field(default_factory=list)  # runs left out after an interrupt

    @property
    def ok(self) -> bool:
        return not self.failed and self.interrupted is None


def check_selection(catalog: Catalog, datasets: list[str] | None, models: list[str] | None) -> None:
    """Refuse dataset or model names the catalog does not have (a typo must not run nothing and
    succeed), and models that none of the chosen datasets evaluates."""
    unknown = [d for d in datasets or [] if d not in catalog.datasets]
    if unknown:
        raise CatalogError(f"unknown dataset {_one_or_list(unknown)}; known: {sorted(catalog.datasets)} "
                           f"(catalog {catalog.path})")
    unknown = [m for m in models or [] if m not in catalog.models]
    if unknown:
        raise CatalogError(f"unknown model {_one_or_list(unknown)}; known: {sorted(catalog.models)} "
                           f"(catalog {catalog.path})")
    chosen = datasets or list(catalog.datasets)
    evaluated = {m.key for ds in chosen for m in catalog.models_for(ds)}
    idle = [m for m in models or [] if m not in evaluated]
    if idle:
        raise CatalogError(f"model {_one_or_list(idle)} is not evaluated on dataset(s) {chosen}: their "
                           f"'models' field lists {sorted(evaluated)}; choose another --dataset or --model")


def _one_or_list(names: list[str]) -> str:
    return repr(names[0]) if len(names) == 1 else str(names)


def materialize_catalog(catalog: Catalog, *, instance: dg.DagsterInstance, resources: dict | None = None,
                        datasets: list[str] | None = None, models: list[str] | None = None,
                        only: str | None = None, log=print, log_level: str = "CRITICAL") -> CatalogRun:
    """Materialize ``catalog`` (or the chosen datasets / models; ``only``: one analysis of
    :data:`ONLY_STAGES`) run by run. Unknown names are a :class:`CatalogError` before anything runs."""
    from nfhm_pipeline.definitions import build_definitions

    check_selection(catalog, datasets, models)
    if only is not None and only not in ONLY_STAGES:
        raise CatalogError(f"unknown analysis {only!r} for --only; choose one of {sorted(ONLY_STAGES)}")
    outcome = CatalogRun()
    plan = _plan(catalog, datasets, models, only)
    with _interrupt_watch() as interrupted:
        try:
            defs = build_definitions(catalog, resources)
            _run_plan(plan, list(defs.assets), defs.resources, instance, outcome, interrupted, log, log_level)
        except KeyboardInterrupt:  # the signal arrived outside a Dagster step (between runs)
            outcome.interrupted = outcome.interrupted or ""
        if outcome.interrupted is not None:
            done = set(outcome.succeeded) | set(outcome.failed)
            outcome.not_started = [label for label, *_ in plan
                                   if label not in done and label != outcome.interrupted]
            outcome.failed.pop(outcome.interrupted, None)  # interrupted, not failed
    return outcome


# One planned run: (label, dataset, stage names, partition key or None, is the manifest run).
_Planned = tuple[str, str, tuple[str, ...], "str | None", bool]


def _plan(catalog: Catalog, datasets, models, only) -> list[_Planned]:
    plan: list[_Planned] = []
    stages = ONLY_STAGES.get(only) if only else None
    for ds in datasets or list(catalog.datasets):
        plan.append((f"{ds}/manifest+splits", ds, UNPARTITIONED_FIRST, None, True))
        for model in catalog.models_for(ds):
            if not models or model.key in models:
                plan.append((f"{ds}/[{model.key}]", ds, stages or (), model.key, False))
        if only is None:
            plan.append((f"{ds}/model_comparison", ds, UNPARTITIONED_LAST, None, False))
    return plan


def _run_plan(plan, assets, resources, instance, outcome: CatalogRun, interrupted, log, log_level) -> None:
    # Step logs stay in the instance's event log (and the UI); the console shows one line per run.
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    by_key = {k: a for a in assets for k in a.keys}
    failed_datasets: set[str] = set()
    order = _stage_order()  # a model's stages in the STAGES table's order
    current_ds = None
    for label, ds, stages, partition_key, is_manifest in plan:
        if interrupted():
            outcome.interrupted = ""
            return
        if ds != current_ds:
            current_ds = ds
            log(f"{ds}:")
        if ds in failed_datasets:
            continue
        if partition_key is not None:
            # Every partitioned stage of the dataset in stage order (or those of the chosen analysis).
            keys = sorted({k for a in assets if a.partitions_def is not None for k in a.keys
                           if k.path[0] == ds and (not stages or k.path[-1] in stages)},
                          key=lambda k: order.get(k.path[-1], 99))
        else:
            keys = [dg.AssetKey([ds, s]) for s in stages]
        keys = [k for k in keys if k in by_key]
        if not keys:
            continue
        result = dg.materialize(assets, selection=keys, instance=instance, resources=resources,
                                partition_key=partition_key, raise_on_error=False, run_config=run_config,
                                tags={"nfhm/source": "runner"})
        outcome.run_ids.append(result.run_id)
        if interrupted() or _was_interrupted(result):
            outcome.interrupted = label
            if result.success:
                outcome.succeeded.append(label)
            log(f"  STOPPED {label}: interrupted")
            return
        if result.success:
            outcome.succeeded.append(label)
            log(f"  ok      {label}")
        else:
            message = _failure_message(result)
            outcome.failed[label] = message
            log(f"  FAILED  {label}: {message}")
            if is_manifest:
                failed_datasets.add(ds)


@contextlib.contextmanager
def _interrupt_watch() -> Iterator[Callable[[], bool]]:
    """Yield a function telling whether SIGINT or SIGTERM arrived since entry.

    Dagster swaps the SIGINT handler during each run (the interrupt becomes a failure of the
    current step), so a handler of ours would not see it. The signal module's wakeup fd does:
    the interpreter writes every signal's number to it, whatever Python handler is installed.
    SIGTERM gets the same KeyboardInterrupt handler as SIGINT, so between runs it stops cleanly too.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False  # signals reach only the main thread; nothing to watch here
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    seen: set[int] = set()

    def interrupted() -> bool:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(read_fd, 512):
                seen.update(chunk)
        return any(s in seen for s in _INTERRUPTS)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_sigterm)
    old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield interrupted
    finally:
        signal.set_wakeup_fd(old_fd)
        signal.signal(signal.SIGTERM, old_term)
        os.close(read_fd)
        os.close(write_fd)


def _stage_order() -> dict[str, int]:
    from nfhm_pipeline.assets import STAGES

    return {stage.name: i for i, stage in enumerate(STAGES)}


def _was_interrupted(result) -> bool:
    """Whether a step of the run failed because Dagster turned an interrupt into an error."""
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            while err is not None:
                if err.cls_name in ("DagsterExecutionInterruptedError", "KeyboardInterrupt"):
                    return True
                err = err.cause
    return False


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
