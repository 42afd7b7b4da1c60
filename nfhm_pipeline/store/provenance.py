"""Which result rows belong to the dataset's current split.

Every result row (``metrics``, ``per_class_metrics``, ``predictions``) records the ``split_id`` of
the split it was computed on (``seed<seed>-<hash of the assignment>``, see
:func:`nfhm_pipeline.evaluation.splits.split_identity`). When a dataset is split again (a new seed,
new images), rows of models that were not re-run keep the old id: comparisons, reports and
``nfhm results`` read only current rows and name the models that need re-running.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pandas as pd

from nfhm_pipeline.store import warehouse

RESULT_TABLES = ("metrics", "per_class_metrics", "predictions")


def current_split_id(path: str | Path, dataset: str) -> str | None:
    """The ``split_id`` of the dataset's stored split (None: no split, or one written before ids)."""
    if not Path(path).exists():
        return None
    frame = warehouse.query(path, "SELECT DISTINCT split_id FROM splits WHERE dataset = ?", [dataset]) \
        if _has_table(path, "splits") else pd.DataFrame()
    ids = [v for v in frame.get("split_id", pd.Series(dtype=object)).tolist() if isinstance(v, str)]
    return ids[0] if len(ids) == 1 else None


def current_rows(path: str | Path, table: str, dataset: str, **where: str) -> pd.DataFrame:
    """Rows of a result table for ``dataset`` computed on its current split."""
    if table not in RESULT_TABLES:
        raise ValueError(f"{table!r} is not a result table; expected one of {RESULT_TABLES}")
    rows = warehouse.read_table(path, table, dataset=dataset, **where)
    split_id = current_split_id(path, dataset)
    if split_id is None:
        return rows.iloc[0:0] if len(rows) else rows
    return rows[rows["split_id"] == split_id].reset_index(drop=True)


def stale_models(path: str | Path, dataset: str) -> list[str]:
    """Models with result rows for ``dataset`` computed on another split than the current one:
    they must be re-materialized before they can be compared."""
    rows = warehouse.read_table(path, "metrics", dataset=dataset)
    if rows.empty:
        return []
    split_id = current_split_id(path, dataset)
    stale = rows[rows["split_id"].ne(split_id) | rows["split_id"].isna()] if split_id else rows
    return sorted(stale["model"].astype(str).unique().tolist())


def _has_table(path: str | Path, table: str) -> bool:
    frame = warehouse.query(path, "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ?", [table])
    return bool(frame["n"].iloc[0])


# --- what a result was computed with (table ``runs``) ----------------------------------------------

_PACKAGES = {"project_version": "nfhm_pipeline", "torch_version": "torch", "open_clip_version": "open_clip_torch",
             "transformers_version": "transformers", "sklearn_version": "scikit-learn",
             "dagster_version": "dagster", "numpy_version": "numpy"}


@functools.lru_cache(maxsize=None)
def _versions() -> tuple[tuple[str, str | None], ...]:
    # importlib.metadata reads the installed distributions without importing them (no dagster
    # import in the library, no torch import just to learn its version).
    from importlib import metadata

    out = []
    for column, dist in _PACKAGES.items():
        try:
            out.append((column, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            out.append((column, None))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def git_commit() -> str | None:
    """The commit of the project's checkout (with ``-dirty`` when files differ from it), or None
    outside a git checkout (an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("-dirty" if dirty else "") if head else None


@functools.lru_cache(maxsize=None)
def device_name(device: str) -> str:
    """A readable name of the hardware behind a torch device string (GPU model, or the CPU's)."""
    import platform

    if device.startswith("cuda"):
        try:
            import torch

            return torch.cuda.get_device_name(torch.device(device))
        except Exception:  # a device string from another machine: record what was asked for
            return device
    if device == "mps":
        return f"Apple MPS ({platform.machine()})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def environment(device: str) -> dict:
    """The ``runs`` columns that describe the software and hardware: package versions, Python,
    git commit, device and its name."""
    import platform

    return {**dict(_versions()), "python_version": platform.python_version(), "git_commit": git_commit(),
            "device": device, "device_name": device_name(device)}
