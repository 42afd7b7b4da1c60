"""Charts and small tables built from the warehouse's `metrics` and `embedding_runs` tables.

Figures are plain `matplotlib.figure.Figure` objects attached to an Agg canvas: no pyplot, so no
GUI backend is ever chosen, nothing is kept in pyplot's global figure list (no leak in long-lived
Dagster processes) and a notebook's own backend is left alone.
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError, StorageError
from nfhm_pipeline.store.files import atomic_path

METRIC_KEYS = ["dataset", "model", "task", "level", "grp", "metric"]


# ---------------------------------------------------------------- shared helpers
def new_figure(width: float, height: float):
    """A Figure with constrained layout on an Agg canvas (drawable and savable headless)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    # A margin of 0.1 in (the default is 3 pt): glyphs at the figure's edge, such as a rotated axis
    # label's first letter, are then never cut off in the saved file.
    fig.get_layout_engine().set(w_pad=0.1, h_pad=0.1)
    FigureCanvasAgg(fig)
    return fig


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


INTERVAL_METHODS = {"bootstrap-paired": "paired bootstrap", "wilson": "Wilson", "delong": "DeLong"}


def interval_legend_label(rows: pd.DataFrame) -> str:
    """The legend entry of the error bars drawn from ``rows``: '95 % interval (paired bootstrap)',
    naming the method(s) of ``ci_method``; 'mean ± std over CV folds' when every row is cv-std
    (a spread, not a 95 % interval)."""
    methods = sorted(set(rows["ci_method"].dropna().astype(str))) if "ci_method" in rows.columns else []
    if methods == ["cv-std"]:
        return "mean ± std over CV folds"
    named = ", ".join(INTERVAL_METHODS.get(m, m) for m in methods if m != "cv-std")
    return "95 % interval" + (f" ({named})" if named else "")


def draw_intervals(ax, x, low, high, *, label: str | None = None):
    """Vertical error bars spanning exactly [low, high] at positions ``x`` (the bars' units), drawn
    only where both ends are finite: a row without an interval gets no error bar (not a zero-length
    one). Returns the ErrorbarContainer, or None when no row has an interval. ``label`` names it in
    the legend (None: left out of the legend)."""
    x, low, high = (np.asarray(a, dtype=float) for a in (x, low, high))
    ok = np.isfinite(x) & np.isfinite(low) & np.isfinite(high)
    if not ok.any():
        return None
    # Centred on the interval's midpoint, so the drawn extent is the interval even where a
    # percentile interval does not contain the point estimate.
    middle, half = (low[ok] + high[ok]) / 2, np.abs(high[ok] - low[ok]) / 2
    container = ax.errorbar(x[ok], middle, yerr=half, fmt="none", ecolor="0.1", elinewidth=1.0, capsize=2.5,
                            zorder=4, label=label if label else "_nolegend_")
    # A thin white edge keeps the error bar visible where it crosses a dark bar.
    from matplotlib import patheffects

    halo = [patheffects.withStroke(linewidth=2.6, foreground="white")]
    for artist in (*container.lines[1], *container.lines[2]):
        artist.set_path_effects(halo)
    return container


def label_bars(ax, x, tops, texts, *, fontsize: float = 7, rotation: float = 0, padding: float = 2) -> None:
    """Write ``texts[i]`` above position ``x[i]`` at height ``tops[i]`` (the bar's end, or its error
    bar's end where that is higher, so a label never sits on an error bar); a missing height puts the
    text on the axis (a 'n/a' stays visible)."""
    for xi, top, text in zip(x, tops, texts):
        y = top if np.isfinite(top) else 0.0
        ax.annotate(text, (xi, y), xytext=(0, padding), textcoords="offset points", ha="center", va="bottom",
                    fontsize=fontsize, rotation=rotation)


def _sort_groups(groups) -> list[str]:
    """Taxa alphabetically, with 'all' (the whole dataset) last."""
    return sorted((g for g in groups if g != "all"), key=str) + (["all"] if "all" in set(groups) else [])


# ---------------------------------------------------------------- model colours
def _palette() -> list:
    """20 distinguishable colours: tab10, then the dark shade of each tab20b / tab20c hue."""
    from matplotlib import colormaps

    tab10 = [colormaps["tab10"](i) for i in range(10)]
    dark = [colormaps["tab20b"](i) for i in (0, 4, 8, 12, 16, 2)] + [colormaps["tab20c"](i) for i in (0, 4, 8, 12)]
    return tab10 + dark


HATCHES = ("", "//", "..", "xx", "\\\\", "++")


def model_colour(model: str):
    """The model's colour: fixed by a hash of its key, so it is the same in every chart and run
    whatever other models are drawn beside it."""
    palette = _palette()
    return palette[int(hashlib.sha256(str(model).encode("utf-8")).hexdigest(), 16) % len(palette)]


def model_styles(models: Sequence[str]) -> dict[str, tuple]:
    """{model: (colour, hatch)}: each model's own colour (:func:`model_colour`); where two models
    of one chart share a colour, the later by name also gets a hatch, so bars stay distinguishable
    while every model keeps its colour."""
    styles, seen = {}, {}
    for model in sorted(models, key=str):
        colour = model_colour(model)
        n = seen.get(colour, 0)
        seen[colour] = n + 1
        styles[model] = (colour, HATCHES[n % len(HATCHES)])
    return styles


# ---------------------------------------------------------------- k-NN bars
WITHIN_GROUP_NOTE = ("per group: each test image's neighbours are searched among that group's training images "
                     "only; 'all': among every training image")


def knn_group_bars(
    metrics: pd.DataFrame,
    *,
    level: str,
    rule_pair: Sequence[str] = ("top1_cosine", "mean_cosine"),
    title: str | None = None,
    baselines: pd.DataFrame | None = None,
):
    """Grouped bars of k-NN accuracy: x = groups ('all' last), one bar per model, one subplot per rule.

    Heights are percent (value * 100) on a 0-100 axis labelled 'Accuracy (%)', each bar labelled with
    its value; each model has its own colour (:func:`model_styles`); the legend sits below the axes
    so it never covers a bar. The title says that per-group bars search neighbours within the group.
    Where a row carries ``ci_low`` / ``ci_high``, its bar gets an error bar spanning exactly that
    95 % interval (:func:`draw_intervals`; one legend entry naming the ``ci_method``); a row without
    an interval (NaN) gets none. Bar labels sit above the error bar's end.
    ``baselines`` (rows of :func:`nfhm_pipeline.reports.summary.class_baselines` for this level,
    columns grp, majority, chance) adds, over each group's bars, a dashed line at the majority-class
    accuracy and a dotted one at chance. Returns a Figure.
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
    styles = model_styles(models)
    n_rules = len(rule_pair)
    n_bars = len(groups) * len(models)
    n_cols, n_rows = min(n_rules, 2), (n_rules + 1) // 2
    fig = new_figure(n_cols * min(12.0, max(4.5, 1.0 + 0.4 * n_bars)), 1.4 + 4.0 * n_rows)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    x = np.arange(len(groups))
    width = 0.8 / len(models)
    sizes = rows.groupby("grp")["n"].max() if "n" in rows.columns else pd.Series(dtype=float)
    ticks = [g if pd.isna(sizes.get(g, np.nan)) else f"{g}\n(n={int(sizes[g])})" for g in groups]
    base = None
    if baselines is not None and len(baselines):
        base = baselines.set_index("grp").reindex(groups)
    interval_label = interval_legend_label(rows)
    for ax, rule in zip(axes, rule_pair):
        table = rows[rows["metric"] == rule].pivot(index="grp", columns="model", values="value")
        table = table.reindex(index=groups, columns=models)
        intervals = {}
        if {"ci_low", "ci_high"} <= set(rows.columns):
            for end in ("ci_low", "ci_high"):
                intervals[end] = rows[rows["metric"] == rule].pivot(index="grp", columns="model", values=end) \
                    .reindex(index=groups, columns=models)
        for i, model in enumerate(models):
            values = table[model].to_numpy(dtype=float)
            centres = x + (i - (len(models) - 1) / 2) * width
            colour, hatch = styles[model]
            ax.bar(centres, values * 100, width, label=model, color=colour, hatch=hatch or None,
                   edgecolor="white" if hatch else None)
            tops = values
            if intervals:
                low = intervals["ci_low"][model].to_numpy(dtype=float)
                high = intervals["ci_high"][model].to_numpy(dtype=float)
                if draw_intervals(ax, centres, low * 100, high * 100, label=interval_label) is not None:
                    interval_label = None  # one legend entry for every error bar of the figure
                tops = np.where(np.isfinite(low) & np.isfinite(high), np.fmax(values, high), values)
            label_bars(ax, centres, tops * 100, [_pct(v) for v in values], fontsize=7,
                       rotation=90 if n_bars > 12 else 0)
        if base is not None:
            _draw_baselines(ax, x, base["majority"].to_numpy(float), base["chance"].to_numpy(float))
        ax.set_title(f"{rule_title(rule)} — {level}", pad=14)  # room for a '100.0' bar label below it
        ax.set_ylabel("Accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_xticks(x, ticks)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    for ax in axes[n_rules:]:
        ax.set_visible(False)
    entries = {}  # label → handle, over every subplot (the error bars may start in the second)
    for ax in axes[:n_rules]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    labels = sorted(entries, key=lambda label: label not in styles)  # models first, then intervals, baselines
    handles = [entries[label] for label in labels]
    # 'outside' asks constrained layout to reserve a strip below the axes for the legend.
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 4), frameon=False)
    dataset = rows["dataset"].iloc[0]
    heading = title or f"{dataset}: nearest-neighbour accuracy by group — {level}"
    note = WITHIN_GROUP_NOTE if len(groups) > 1 else ""
    fig.suptitle(wrap_title(heading + (f"\n{note}" if note else ""), width_in=fig.get_figwidth(), fontsize=11),
                 fontsize=11)
    return fig


def _draw_baselines(ax, x, majority, chance, half_width: float = 0.42) -> None:
    """Over each x position, a dashed black segment at majority and a dotted grey one at chance (%)."""
    for values, style, colour, label in ((majority, "--", "black", "majority class"),
                                         (chance, ":", "0.35", "chance (1 / classes)")):
        ok = np.isfinite(values)
        if ok.any():
            ax.hlines(100 * values[ok], x[ok] - half_width, x[ok] + half_width, colors=colour, linestyles=style,
                      linewidth=1.4, label=label, zorder=3)


# ---------------------------------------------------------------- tables
def _mean_std(value: float, std: float) -> str:
    if not np.isfinite(value):
        return ""
    if std is None or not np.isfinite(std):
        return f"{100 * value:.1f} %"
    return f"{100 * value:.1f} ± {100 * std:.1f} %"


MAJORITY_ROW = "majority-class baseline"
CHANCE_ROW = "chance (1 / classes)"


def probe_table(
    metrics: pd.DataFrame, *, task: str = "linear_probe", metric: str = "cv_accuracy", grp: str = "all",
    baselines: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Probe results as strings: rows = model, columns = level, cells 'mean ± std %'.

    Cells are '' where a model has no result; the std part is left out where std is NaN.
    ``baselines`` (:func:`~nfhm_pipeline.reports.summary.class_baselines`) appends the rows
    'majority-class baseline' and 'chance (1 / classes)' per level.
    """
    rows = select_rows(metrics, task=task, metric=metric, grp=grp)
    std = rows["std"] if "std" in rows.columns else pd.Series(np.nan, index=rows.index)
    cells = rows.assign(cell=[_mean_std(v, s) for v, s in zip(rows["value"], std)])
    table = cells.pivot(index="model", columns="level", values="cell").fillna("")
    table = table.sort_index(axis=0).sort_index(axis=1)
    table = _append_baselines(table, baselines, lambda lvl: lvl, k=1)
    table.columns.name = None
    table.index.name = "model"
    return table


def _append_baselines(table: pd.DataFrame, baselines, level_of, k: int | None) -> pd.DataFrame:
    """Add the majority and chance rows to a table of level columns (``level_of(column)`` gives the
    column's level; ``k``: the top-k the column reports, or None to read it from the column name)."""
    if baselines is None or not len(baselines) or table.empty:
        return table
    base = baselines[baselines["grp"] == "all"].set_index("level")
    extra = {MAJORITY_ROW: {}, CHANCE_ROW: {}}
    for column in table.columns:
        level = level_of(column)
        if level not in base.index:
            continue
        kk = k if k is not None else _top_k(column)
        row = base.loc[level]
        extra[MAJORITY_ROW][column] = _mean_std(_majority_top_k(row, kk), np.nan)
        extra[CHANCE_ROW][column] = _mean_std(min(kk, row["n_classes"]) / row["n_classes"], np.nan)
    return pd.concat([table, pd.DataFrame.from_dict(extra, orient="index").reindex(columns=table.columns)
                      .fillna("")])


def _top_k(name) -> int:
    m = re.search(r"top(\d+)", str(name))
    return int(m.group(1)) if m else 1


def _majority_top_k(row, k: int) -> float:
    """Accuracy of always answering the k most common training classes (k = 1: the majority class)."""
    shares = row["train_order_test_share"]
    return float(sum(shares[:k])) if len(shares) else np.nan


ZERO_SHOT_COLUMNS = {"top1_single_template": "top-1, first template", "top1_ensemble": "top-1, prompt ensemble",
                     "top5_single_template": "top-5, first template", "top5_ensemble": "top-5, prompt ensemble"}


def zero_shot_table(metrics: pd.DataFrame, *, grp: str = "all", baselines: pd.DataFrame | None = None) -> pd.DataFrame:
    """Zero-shot results as strings: one row per (level, model), one column per metric (readable
    names such as 'top-1, prompt ensemble'), cells 'xx.x %' ('' where a model has no result).
    ``baselines`` adds, per level, a 'majority-class baseline' row (the k most common training
    classes, for top-k) and a 'chance' row (k / classes)."""
    rows = select_rows(metrics, task="zero_shot", grp=grp)
    cells = rows.assign(cell=[_mean_std(v, np.nan) for v in rows["value"]])
    table = cells.pivot(index=["level", "model"], columns="metric", values="cell").fillna("")
    order = [c for c in ZERO_SHOT_COLUMNS if c in table.columns] + sorted(c for c in table.columns
                                                                         if c not in ZERO_SHOT_COLUMNS)
    table = table[order].sort_index()
    if baselines is not None and len(baselines):
        base = baselines[baselines["grp"] == "all"].set_index("level")
        parts = []
        for level, part in table.groupby(level="level", sort=True):
            parts.append(part)
            if level in base.index:
                row = base.loc[level]
                parts.append(pd.DataFrame(
                    [[_mean_std(_majority_top_k(row, _top_k(c)), np.nan) for c in order],
                     [_mean_std(min(_top_k(c), row["n_classes"]) / row["n_classes"], np.nan) for c in order]],
                    index=pd.MultiIndex.from_tuples([(level, MAJORITY_ROW), (level, CHANCE_ROW)],
                                                    names=["level", "model"]), columns=order))
        table = pd.concat(parts)
    table = table.rename(columns=ZERO_SHOT_COLUMNS)
    table.columns.name = None
    return table


def retrieval_table(metrics: pd.DataFrame, *, grp: str = "all", baselines: pd.DataFrame | None = None) -> pd.DataFrame:
    """Image↔text retrieval as strings: one row per (level, model, direction) with the candidates
    each query ranks stated, columns 'P@k' / 'R@k' in percent.

    image→text: each test image ranks one prompt-ensembled text per class (K class texts);
    text→image: each class text ranks the N test images. K and N come from ``baselines``
    (classes at the level) and the rows' ``n`` (test images scored).
    """
    rows = select_rows(metrics, task="retrieval", grp=grp)
    parts = rows["metric"].str.extract(r"^(image_to_text|text_to_image)_(precision|recall)@(\d+)$")
    rows = rows.assign(direction=parts[0], kind=parts[1], k=pd.to_numeric(parts[2])).dropna(subset=["direction"])
    rows = rows.assign(column=np.where(rows["kind"] == "precision", "P@", "R@") + rows["k"].astype(int).astype(str),
                       cell=[_mean_std(v, np.nan) for v in rows["value"]])
    table = rows.pivot(index=["level", "model", "direction"], columns="column", values="cell").fillna("")
    order = sorted(table.columns, key=lambda c: (c[0] != "P", int(c[2:])))
    table = table[order]
    classes = (baselines[baselines["grp"] == "all"].set_index("level")["n_classes_all"]
               if baselines is not None and len(baselines) else pd.Series(dtype=float))
    n_images = rows.groupby(["level", "model"])["n"].max()
    candidates = []
    for level, model, direction in table.index:
        if direction == "image_to_text":
            k = classes.get(level)
            candidates.append(f"{int(k)} class texts" if k is not None and pd.notna(k) else "one text per class")
        else:
            n = n_images.get((level, model))
            candidates.append(f"{int(n)} test images" if n is not None and pd.notna(n) else "the test images")
    table.insert(0, "candidates ranked", candidates)
    table = table.rename(index={"image_to_text": "image → text", "text_to_image": "text → image"})
    table.columns.name = None
    return table


# ---------------------------------------------------------------- throughput
def speed_bars(embedding_runs: pd.DataFrame, *, dataset: str | None = None):
    """Horizontal bars of embedding throughput (axis 'Images per second'), one bar per
    (dataset, model) from its latest run that embedded new images, in the model's colour,
    annotated with the image count and seconds of that run. Returns a Figure.
    The one bar chart without error bars: a speed is one timed run, not an estimate from a sample
    of test images, so there is no interval to draw."""
    from nfhm_pipeline.reports.summary import throughput_table

    runs = throughput_table(embedding_runs, dataset=dataset)
    if runs.empty:
        raise EvaluationError("embedding_runs has no run that embedded new images"
                              + (f" for dataset {dataset!r}" if dataset else ""))
    runs = runs.sort_values("images_per_s")
    several = runs["dataset"].nunique() > 1
    names = [f"{m} · {d}" if several else m for m, d in zip(runs["model"], runs["dataset"])]
    styles = model_styles(runs["model"].unique())
    fig = new_figure(8.0, 1.2 + 0.45 * len(runs))
    ax = fig.subplots()
    bars = ax.barh(names, runs["images_per_s"], color=[styles[m][0] for m in runs["model"]])
    for bar, model in zip(bars, runs["model"]):
        if styles[model][1]:
            bar.set_hatch(styles[model][1])
            bar.set_edgecolor("white")
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

    `labels` fixes the class order (default: sorted union of true and pred). Each row's label ends
    with its count of test images, '(n=…)'. With more than `max_classes` classes only the
    `max_classes` most confused ones (most errors as true or as predicted class) are shown,
    percentages still relative to the full row, and the title says so. A title too long for the
    figure is wrapped, never clipped.
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
    row_totals = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        percent = 100 * counts / row_totals[:, None]
    if k > max_classes:
        errors = counts - np.diag(np.diag(counts))
        keep = np.sort(np.argsort(-(errors.sum(0) + errors.sum(1)), kind="stable")[:max_classes])
        percent = percent[np.ix_(keep, keep)]
        row_totals = row_totals[keep]
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
    ax.set_yticks(range(n), [f"{v} (n={int(c)})" for v, c in zip(labels, row_totals)], fontsize=font)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True (test images per class)")
    if n <= 25:  # beyond that the numbers no longer fit in a cell
        for i, j in zip(*np.nonzero(percent >= 0.5)):
            ax.text(j, i, f"{percent[i, j]:.0f}", ha="center", va="center", fontsize=font,
                    color="white" if percent[i, j] > 60 else "black")
    # A figure title spans the whole figure (labels and colour bar included), and constrained
    # layout makes room for it; wrapped to the figure's width it can never be clipped.
    fig.suptitle(wrap_title(title, width_in=side + 1.0, fontsize=11), fontsize=11)
    return fig


def wrap_title(text: str, *, width_in: float, fontsize: float) -> str:
    """``text`` wrapped (each of its lines) to lines that fit ``width_in`` inches at ``fontsize``
    points, so a figure title is never clipped at the figure's edges."""
    chars = max(20, int(width_in * 72 / (0.62 * fontsize)))  # average glyph ≈ 0.6 em wide
    return "\n".join(part for line in text.splitlines()
                     for part in (textwrap.wrap(line, chars, break_on_hyphens=False) or [""]))


# ---------------------------------------------------------------- files
def save_png(fig, path: str | os.PathLike, dpi: int = 110, *, svg: bool = False) -> Path:
    """Write `fig` as PNG to `path` atomically (temp file + os.replace) and return the path; with
    ``svg``, also the same figure as SVG beside it (same name, suffix .svg) for publication.

    The figure is not registered with pyplot, so there is nothing to close: it is freed with its
    last reference. Raises StorageError naming the file when it cannot be written.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    if svg:
        from matplotlib import rc_context

        # fonttype 'none': titles and labels stay text in the SVG (editable, searchable)
        with atomic_path(path.with_suffix(".svg")) as tmp, rc_context({"svg.fonttype": "none"}):
            fig.savefig(tmp, format="svg")
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
