"""Charts and small tables built from the warehouse's `metrics` and `embedding_runs` tables.

Figures are plain `matplotlib.figure.Figure` objects attached to an Agg canvas: no pyplot, so no
GUI backend is ever chosen, nothing is kept in pyplot's global figure list (no leak in long-lived
Dagster processes) and a notebook's own backend is left alone.
"""
from __future__ import annotations

import base64
import io
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError, StorageError

METRIC_KEYS = ["dataset", "model", "task", "level", "grp", "metric"]


# ---------------------------------------------------------------- shared helpers
def new_figure(width: float, height: float):
    """A Figure with constrained layout on an Agg canvas (drawable and savable headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


@contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}. Check that the folder is writable.") from exc
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600 files; reports are meant to be opened and shared like any output.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def select_rows(metrics: pd.DataFrame, **equal) -> pd.DataFrame:
    """Rows of `metrics` whose columns equal the given values (a list/tuple value means 'is in').

    Raises EvaluationError if a needed column is missing or a (dataset, model, task, level, grp,
    metric) key occurs twice (e.g. several runs read without filtering by run_id).
    """
    missing = [c for c in METRIC_KEYS + ["value"] if c not in metrics.columns]
    if missing:
        raise EvaluationError(f"metrics table lacks column(s) {missing}; it has {list(metrics.columns)}")
    mask = pd.Series(True, index=metrics.index)
    for col, want in equal.items():
        if want is None:
            continue
        mask &= metrics[col].isin(want) if isinstance(want, (list, tuple, set)) else metrics[col] == want
    rows = metrics[mask]
    dup = rows.duplicated(METRIC_KEYS, keep=False)
    if dup.any():
        first = rows[dup].iloc[0]
        raise EvaluationError(
            f"metrics has {int(dup.sum())} duplicated rows, e.g. {first[METRIC_KEYS].to_dict()}; "
            "keep one run per (dataset, model, task, level, grp, metric), e.g. the latest run_id"
        )
    return rows


def rule_title(metric: str) -> str:
    """'top1_cosine' -> 'Top-1 cosine', 'mean_euclidean' -> 'Mean euclidean', 'macro_f1_cosine' -> 'Macro F1 cosine'."""
    m = re.fullmatch(r"top(\d+)_(.+)", metric)
    if m:
        return f"Top-{m.group(1)} {m.group(2).replace('_', ' ')}"
    text = metric.replace("macro_f1", "macro F1").replace("_", " ")
    return text[:1].upper() + text[1:]


def _pct(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{100 * value:.1f}"


def _sort_groups(groups) -> list[str]:
    """Taxa alphabetically, with 'all' (the whole dataset) last."""
    return sorted((g for g in groups if g != "all"), key=str) + (["all"] if "all" in set(groups) else [])


# ---------------------------------------------------------------- k-NN bars
def knn_group_bars(
    metrics: pd.DataFrame,
    *,
    level: str,
    rule_pair: Sequence[str] = ("top1_cosine", "mean_cosine"),
    title: str | None = None,
):
    """Grouped bars of k-NN accuracy: x = groups ('all' last), one bar per model, one subplot per rule.

    Heights are percent (value * 100) on a 0-100 axis labelled 'Accuracy (%)', each bar labelled with
    its value; the legend sits below the axes so it never covers a bar. Returns a Figure.
    Raises EvaluationError when no k-NN rows exist for `level` and `rule_pair`.
    """
    rows = select_rows(metrics, task="knn", level=level, metric=list(rule_pair))
    if rows.empty:
        raise EvaluationError(
            f"no k-NN metrics for level {level!r} and rules {list(rule_pair)}; levels present: "
            f"{sorted(metrics.loc[metrics['task'] == 'knn', 'level'].unique())}"
        )
    if rows["dataset"].nunique() > 1:
        raise EvaluationError(
            f"knn_group_bars draws one dataset at a time; got {sorted(rows['dataset'].unique())}"
        )
    groups = _sort_groups(rows["grp"].unique())
    models = sorted(rows["model"].unique())
    n_rules = len(rule_pair)
    n_bars = len(groups) * len(models)
    n_cols, n_rows = min(n_rules, 2), (n_rules + 1) // 2
    fig = new_figure(n_cols * min(12.0, max(4.5, 1.0 + 0.4 * n_bars)), 1.0 + 4.0 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    x = np.arange(len(groups))
    width = 0.8 / len(models)
    sizes = rows.groupby("grp")["n"].max() if "n" in rows.columns else pd.Series(dtype=float)
    ticks = [g if pd.isna(sizes.get(g, np.nan)) else f"{g}\n(n={int(sizes[g])})" for g in groups]
    for ax, rule in zip(axes, rule_pair):
        table = rows[rows["metric"] == rule].pivot(index="grp", columns="model", values="value")
        table = table.reindex(index=groups, columns=models)
        for i, model in enumerate(models):
            values = table[model].to_numpy(dtype=float)
            bars = ax.bar(x + (i - (len(models) - 1) / 2) * width, values * 100, width, label=model)
            ax.bar_label(bars, labels=[_pct(v) for v in values], padding=2,
                         fontsize=7, rotation=90 if n_bars > 12 else 0)
        ax.set_title(f"{rule_title(rule)} — {level}")
        ax.set_ylabel("Accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_xticks(x, ticks)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in axes[n_rules:]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    # 'outside' asks constrained layout to reserve a strip below the axes for the legend.
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(models), 4), frameon=False)
    dataset = rows["dataset"].iloc[0]
    fig.suptitle(title or f"{dataset}: nearest-neighbour accuracy by group — {level}")
    return fig


# ---------------------------------------------------------------- tables
def _mean_std(value: float, std: float) -> str:
    if not np.isfinite(value):
        return ""
    if std is None or not np.isfinite(std):
        return f"{100 * value:.1f} %"
    return f"{100 * value:.1f} ± {100 * std:.1f} %"


def probe_table(
    metrics: pd.DataFrame, *, task: str = "linear_probe", metric: str = "accuracy", grp: str = "all"
) -> pd.DataFrame:
    """Probe results as strings: rows = model, columns = 'dataset/level', cells 'mean ± std %'.

    Cells are '' where a model has no result; the std part is left out where std is NaN.
    """
    rows = select_rows(metrics, task=task, metric=metric, grp=grp)
    std = rows["std"] if "std" in rows.columns else pd.Series(np.nan, index=rows.index)
    cells = rows.assign(column=rows["dataset"] + "/" + rows["level"],
                        cell=[_mean_std(v, s) for v, s in zip(rows["value"], std)])
    table = cells.pivot(index="model", columns="column", values="cell").fillna("")
    table.columns.name = None
    return table.sort_index(axis=0).sort_index(axis=1)


def zero_shot_table(metrics: pd.DataFrame, *, grp: str = "all") -> pd.DataFrame:
    """Zero-shot results as strings: rows = model, columns = 'dataset/level metric' (e.g.
    'bio/species top1_ensemble'), cells 'xx.x %' ('' where a model has no result)."""
    rows = select_rows(metrics, task="zero_shot", grp=grp)
    cells = rows.assign(column=rows["dataset"] + "/" + rows["level"] + " " + rows["metric"],
                        cell=[_mean_std(v, np.nan) for v in rows["value"]])
    table = cells.pivot(index="model", columns="column", values="cell").fillna("")
    table.columns.name = None
    return table.sort_index(axis=0).sort_index(axis=1)


# ---------------------------------------------------------------- throughput
def speed_bars(embedding_runs: pd.DataFrame, *, dataset: str | None = None):
    """Horizontal bars of embedding throughput (axis 'Images per second'), one bar per
    (dataset, model) from its latest run that embedded new images, annotated with the image
    count and seconds of that run. Returns a Figure."""
    from nfhm_pipeline.reports.summary import throughput_table

    runs = throughput_table(embedding_runs, dataset=dataset)
    if runs.empty:
        raise EvaluationError("embedding_runs has no run that embedded new images"
                              + (f" for dataset {dataset!r}" if dataset else ""))
    runs = runs.sort_values("images_per_s")
    several = runs["dataset"].nunique() > 1
    names = [f"{m} · {d}" if several else m for m, d in zip(runs["model"], runs["dataset"])]
    fig = new_figure(8.0, 1.2 + 0.45 * len(runs))
    ax = fig.subplots()
    bars = ax.barh(names, runs["images_per_s"], color="tab:blue")
    notes = [f"{r.images_per_s:,.0f}/s · {r.embedded:,} images in {r.seconds:,.1f} s ({r.device})"
             for r in runs.itertuples()]
    ax.bar_label(bars, labels=notes, padding=3, fontsize=8)
    ax.set_xlim(0, runs["images_per_s"].max() * 1.6)  # room for the annotation right of the bar
    ax.set_xlabel("Images per second")
    ax.set_title("Embedding throughput" + (f" — {dataset}" if dataset else ""))
    return fig


# ---------------------------------------------------------------- confusion
def confusion_figure(true, pred, labels=None, title: str = "", *, max_classes: int = 40):
    """Row-normalised confusion matrix in percent (row = true class, sums to 100 over all classes).

    `labels` fixes the class order (default: sorted union of true and pred). With more than
    `max_classes` classes only the `max_classes` most confused ones (most errors as true or as
    predicted class) are shown, percentages still relative to the full row, and the title says so.
    """
    true = np.asarray(true, dtype=object)
    pred = np.asarray(pred, dtype=object)
    if true.shape != pred.shape or true.ndim != 1:
        raise EvaluationError(f"true and pred must be 1-D of equal length; got {true.shape} and {pred.shape}")
    labels = sorted(set(true) | set(pred), key=str) if labels is None else list(labels)
    index = {lab: i for i, lab in enumerate(labels)}
    unknown = sorted({v for v in np.concatenate([true, pred]) if v not in index}, key=str)
    if unknown:
        raise EvaluationError(f"labels {unknown[:5]} occur in true/pred but not in `labels`; "
                              "pass the full class list")
    k = len(labels)
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, ([index[v] for v in true], [index[v] for v in pred]), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        percent = 100 * counts / counts.sum(axis=1, keepdims=True)
    if k > max_classes:
        errors = counts - np.diag(np.diag(counts))
        keep = np.sort(np.argsort(-(errors.sum(0) + errors.sum(1)), kind="stable")[:max_classes])
        percent = percent[np.ix_(keep, keep)]
        labels = [labels[i] for i in keep]
        title = f"{title} (top {max_classes} of {k} classes by confusion)".strip()
    n = len(labels)
    side = max(4.5, 2.5 + 0.28 * n)
    fig = new_figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, shrink=0.8, label="% of true class")
    font = 8 if n <= 20 else 6
    ax.set_xticks(range(n), [str(v) for v in labels], rotation=90, fontsize=font)
    ax.set_yticks(range(n), [str(v) for v in labels], fontsize=font)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    if n <= 25:  # beyond that the numbers no longer fit in a cell
        for i, j in zip(*np.nonzero(percent >= 0.5)):
            ax.text(j, i, f"{percent[i, j]:.0f}", ha="center", va="center", fontsize=font,
                    color="white" if percent[i, j] > 60 else "black")
    ax.set_title(title)
    return fig


# ---------------------------------------------------------------- files
def save_png(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write `fig` as PNG to `path` atomically (temp file + os.replace) and return the path.

    The figure is not registered with pyplot, so there is nothing to close: it is freed with its
    last reference.
    """
    path = Path(path)
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def png_data_uri(path: str | os.PathLike, max_width_px: int = 600, max_bytes: int = 150_000) -> str:
    """The image at `path` as a downscaled 'data:image/png;base64,...' URI (palette PNG), for
    Dagster markdown metadata. The width is halved until the whole URI is at most `max_bytes`
    characters (or the width reaches 64 px)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot read image {path}: {exc}") from exc
    width = min(max_width_px, img.width)
    while True:
        small = img.resize((width, max(1, round(img.height * width / img.width))), Image.LANCZOS)
        buffer = io.BytesIO()
        small.quantize(colors=128).save(buffer, format="PNG", optimize=True)
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        if len(uri) <= max_bytes or width <= 64:
            return uri
        width //= 2
