"""Model rankings, baselines, notes and a short markdown summary from the warehouse tables.

Tables returned here keep metric values as fractions in [0, 1] unless a function says otherwise;
only the markdown shows percent (one decimal).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.names import (CV_ACCURACY, KNN, KNN_RULES, LINEAR_PROBE, MEAN_COSINE, TEST_ACCURACY,
                                           TOP1_COSINE)
from nfhm_pipeline.reports.plots import rule_title, select_rows

RUN_COLUMNS = ["dataset", "model", "new", "seconds", "images_per_s", "device", "finished_at"]


def throughput_table(embedding_runs: pd.DataFrame, *, dataset: str | None = None) -> pd.DataFrame:
    """One row per (dataset, model): its latest run (by finished_at) that embedded new images.

    Columns: dataset, model, embedded (images embedded in that run), seconds, images_per_s
    (taken from the table, or embedded / seconds where missing), device, batch_size, finished_at.
    Runs that only reused stored embeddings are left out: their speed says nothing.
    """
    missing = [c for c in RUN_COLUMNS if c not in embedding_runs.columns]
    if missing:
        raise EvaluationError(f"embedding_runs lacks column(s) {missing}; it has {list(embedding_runs.columns)}")
    runs = embedding_runs[embedding_runs["new"] > 0]
    if dataset is not None:
        runs = runs[runs["dataset"] == dataset]
    runs = runs.sort_values("finished_at").groupby(["dataset", "model"], as_index=False).tail(1)
    speed = runs["images_per_s"].astype(float).fillna(runs["new"] / runs["seconds"])
    batch = runs["batch_size"] if "batch_size" in runs.columns else pd.Series(pd.NA, index=runs.index)
    out = pd.DataFrame({
        "dataset": runs["dataset"], "model": runs["model"], "embedded": runs["new"].astype(int),
        "seconds": runs["seconds"].astype(float), "images_per_s": speed, "device": runs["device"],
        "batch_size": batch, "finished_at": runs["finished_at"],
    })
    return out.sort_values(["dataset", "model"]).reset_index(drop=True)


def _all_group_values(metrics: pd.DataFrame, task: str, names) -> pd.DataFrame:
    """Wide frame indexed by (dataset, level, model) with one column per metric (grp == 'all')."""
    rows = select_rows(metrics, task=task, grp="all", metric=list(names))
    wide = rows.pivot(index=["dataset", "level", "model"], columns="metric", values="value")
    return wide.reindex(columns=list(names))



# ---------------------------------------------------------------- standing against the best
TIED_P_HOLM = 0.05  # Holm-adjusted p at or above which a model is statistically tied with the best
BEST, TIED, BELOW = "best", "tied with best", "below best"


def standing_against_best(differences: pd.DataFrame | None, *, level: str, task: str = KNN,
                          metric: str = TOP1_COSINE, grp: str = "all") -> pd.DataFrame:
    """Each compared model's standing on (task, level, grp, metric), from ``model_differences`` rows
    (every model against the best, paired bootstrap, Holm-adjusted over the others).

    One row per model, indexed by model, columns ``standing`` and ``p_holm``: the best (``model_a``)
    is 'best' (p_holm NaN); another model is 'tied with best' when its p_holm >= 0.05 and 'below
    best' when p_holm < 0.05 (a NaN p_holm is neither: no row). Empty when ``differences`` is None
    or holds no row for the key (one model only, or the comparison not run yet). This is the one
    rule the markdown summary, the HTML report and their tests read.
    """
    out = pd.DataFrame({"standing": pd.Series(dtype=object), "p_holm": pd.Series(dtype=float)})
    out.index.name = "model"
    if differences is None or differences.empty:
        return out
    rows = differences[(differences["task"] == task) & (differences["metric"] == metric)
                       & (differences["level"] == level) & (differences["grp"] == grp)]
    rows = rows[rows["p_holm"].notna()]
    if rows.empty:
        return out
    best = sorted(rows["model_a"].astype(str).unique())
    if len(best) > 1:
        raise EvaluationError(f"model_differences names {len(best)} best models {best} for ({task}, {level}, "
                              f"{grp}, {metric}); expected one: read the rows of one split only")
    p = rows.set_index(rows["model_b"].astype(str))["p_holm"].astype(float)
    standing = pd.Series(np.where(p >= TIED_P_HOLM, TIED, BELOW), index=p.index, dtype=object)
    out = pd.concat([pd.DataFrame({"standing": [BEST], "p_holm": [np.nan]}, index=best),
                     pd.DataFrame({"standing": standing, "p_holm": p})])
    out.index.name = "model"
    return out


def _interval_columns(metrics: pd.DataFrame, task: str, metric: str, prefix: str) -> pd.DataFrame:
    """``<prefix>_ci_low`` / ``<prefix>_ci_high`` indexed by (dataset, level, model), grp 'all'."""
    rows = select_rows(metrics, task=task, grp="all", metric=[metric]).set_index(["dataset", "level", "model"])
    return rows[["ci_low", "ci_high"]].rename(columns={"ci_low": f"{prefix}_ci_low", "ci_high": f"{prefix}_ci_high"})


def rank_models(metrics: pd.DataFrame, *, level: str | None = None,
                differences: pd.DataFrame | None = None) -> pd.DataFrame:
    """Models ranked per (dataset, level) by whole-dataset (grp 'all') k-NN top1_cosine.

    Columns: dataset, level, rank, model, top1_cosine, mean_cosine, plus probe_cv_accuracy,
    probe_cv_std (the linear probe's CV accuracy over the split's folds, mean and std) and
    probe_test_accuracy (refit on all train, scored on the test split) when any linear-probe
    result exists. Where ``metrics`` has ``ci_low`` / ``ci_high``: ``<column>_ci_low`` /
    ``<column>_ci_high`` (95 % interval) for top1_cosine, mean_cosine and probe_test_accuracy.
    ``vs_best`` / ``p_holm_vs_best``: the model's :func:`standing_against_best` on top-1 cosine from
    ``differences`` (``model_differences`` rows; None where a model was not compared).
    Ties share the best rank (1, 1, 3) and are listed by mean_cosine, then model name; models
    without top1_cosine come last with rank <NA>. Values are fractions.
    """
    knn = _all_group_values(metrics, KNN, (TOP1_COSINE, MEAN_COSINE))
    has_intervals = {"ci_low", "ci_high"} <= set(metrics.columns)
    if has_intervals:  # the 95 % intervals, where stored
        for metric in (TOP1_COSINE, MEAN_COSINE):
            knn = knn.join(_interval_columns(metrics, KNN, metric, metric), how="left")
    # the probe metrics evaluation.tables.probe_tables writes
    probe = select_rows(metrics, task=LINEAR_PROBE, grp="all", metric=[CV_ACCURACY, TEST_ACCURACY])
    if not probe.empty:
        keys = ["dataset", "level", "model"]
        cv = probe[probe["metric"] == CV_ACCURACY].set_index(keys)
        test = probe[probe["metric"] == TEST_ACCURACY].set_index(keys)
        std = cv["std"] if "std" in cv.columns else pd.Series(np.nan, index=cv.index)
        joined = pd.DataFrame({"probe_cv_accuracy": cv["value"], "probe_cv_std": std}).join(
            test["value"].rename("probe_test_accuracy"), how="outer")
        if has_intervals:
            joined = joined.join(_interval_columns(metrics, LINEAR_PROBE, TEST_ACCURACY, "probe_test_accuracy"),
                                 how="left")
        knn = knn.join(joined, how="left")
    table = knn.reset_index()
    if level is not None:
        table = table[table["level"] == level]
        if table.empty:
            raise EvaluationError(f"no k-NN metrics for level {level!r}; levels present: "
                                  f"{sorted(knn.index.get_level_values('level').unique())}")
    table = table.sort_values(["dataset", "level", TOP1_COSINE, MEAN_COSINE, "model"],
                              ascending=[True, True, False, False, True], na_position="last")
    table["rank"] = (table.groupby(["dataset", "level"])[TOP1_COSINE]
                     .rank(method="min", ascending=False).astype("Int64"))
    standing, p_holm = [], []
    for row in table.itertuples():
        diffs = differences
        if diffs is not None and "dataset" in diffs.columns:
            diffs = diffs[diffs["dataset"] == row.dataset]
        known = standing_against_best(diffs, level=row.level)
        standing.append(known["standing"].get(row.model))
        p_holm.append(known["p_holm"].get(row.model, np.nan))
    table["vs_best"] = pd.Series(standing, index=table.index, dtype=object)
    table["p_holm_vs_best"] = pd.Series(p_holm, index=table.index, dtype=float)
    first = ["dataset", "level", "rank", "model"]
    table = table[first + [c for c in table.columns if c not in first]]
    table.columns.name = None
    return table.reset_index(drop=True)


# ---------------------------------------------------------------- baselines
BASELINE_COLUMNS = ["level", "grp", "n_train", "n_test", "n_classes", "n_classes_all", "majority_class",
                    "majority", "chance", "smallest_class", "largest_class", "train_order_test_share"]


def class_baselines(labels: pd.DataFrame) -> pd.DataFrame:
    """What a model scores without looking at the image, per (level, group), on the test split.

    ``labels``: one row per (image, level) with columns split ('train'/'test'), grp (the reporting
    group, or None), level, label (None/blank: no label at that level, left out as the evaluation
    does). Rows are given for grp 'all' (every image) and each reporting group.

    Columns: n_train, n_test (labelled images), n_classes (classes among the training images:
    what a classifier can answer), n_classes_all (train and test), majority_class (the most common
    training class; ties: first by name), majority (test accuracy of always answering it), chance
    (1 / n_classes), smallest_class / largest_class (training images of the rarest / commonest
    class) and train_order_test_share (test share of each training class, commonest first: the
    sum of the first k is the majority baseline for top-k).
    """
    frame = labels.copy()
    frame = frame[frame["label"].notna() & (frame["label"].astype(str).str.strip() != "")]
    frame["label"] = frame["label"].astype(str)
    parts = [frame.assign(grp="all")]
    if "grp" in labels.columns:
        parts.append(frame[frame["grp"].notna()].assign(grp=lambda f: f["grp"].astype(str)))
    out = []
    for (level, grp), rows in pd.concat(parts, ignore_index=True).groupby(["level", "grp"], sort=True):
        train = rows.loc[rows["split"] == "train", "label"]
        test = rows.loc[rows["split"] == "test", "label"]
        counts = train.value_counts()
        order = sorted(counts.index, key=lambda c: (-counts[c], c))
        test_counts = test.value_counts()
        shares = [float(test_counts.get(c, 0) / len(test)) if len(test) else np.nan for c in order]
        out.append({
            "level": level, "grp": grp, "n_train": len(train), "n_test": len(test), "n_classes": len(order),
            "n_classes_all": rows["label"].nunique(), "majority_class": order[0] if order else None,
            "majority": shares[0] if shares else np.nan, "chance": 1 / len(order) if order else np.nan,
            "smallest_class": int(counts.min()) if len(counts) else 0,
            "largest_class": int(counts.max()) if len(counts) else 0, "train_order_test_share": shares,
        })
    return pd.DataFrame(out, columns=BASELINE_COLUMNS)


def skipped_groups(baselines: pd.DataFrame) -> pd.DataFrame:
    """(level, grp, reason) of the per-group k-NN rows the evaluation leaves out: a group whose
    training images hold a single class at the level (every prediction within it is that class
    whatever the embedding), or one without training or test images."""
    rows = baselines[baselines["grp"] != "all"]
    reasons = []
    for r in rows.itertuples():
        if r.n_train == 0 or r.n_test == 0:
            reasons.append((r.level, r.grp, f"{r.n_train} training and {r.n_test} test images"))
        elif r.n_classes < 2:
            reasons.append((r.level, r.grp, f"its training images are all {r.majority_class!r}"))
    return pd.DataFrame(reasons, columns=["level", "grp", "reason"])


# ---------------------------------------------------------------- notes on what a number means
MEAN_RULE_GAP = 0.15      # top-1 minus mean accuracy that counts as the mean rule collapsing
UNEVEN_CLASS_RATIO = 2.0  # largest / smallest training class that counts as uneven
NEAR_MAJORITY = 0.10      # every model within this of the majority baseline gets a note


def reading_notes(metrics: pd.DataFrame, baselines: pd.DataFrame | None) -> list[str]:
    """Sentences on numbers that mislead without context: levels where the mean rules collapse
    (uneven classes: the mean rule favours compact classes) and levels where every model is close
    to the majority-class baseline."""
    knn = _all_group_values(metrics, KNN, KNN_RULES)
    base = (baselines[baselines["grp"] == "all"].set_index("level")
            if baselines is not None and len(baselines) else pd.DataFrame())
    notes = []
    for level, frame in knn.groupby(level="level", sort=True):
        frame = frame.droplevel(["dataset", "level"])
        gap = (frame[TOP1_COSINE] - frame[MEAN_COSINE]).dropna()
        row = base.loc[level] if level in base.index else None
        uneven = row is not None and row["smallest_class"] > 0 and \
            row["largest_class"] / row["smallest_class"] >= UNEVEN_CLASS_RATIO
        if len(gap) and gap.max() >= MEAN_RULE_GAP and (uneven or row is None):
            model = sorted(gap.index[gap == gap.max()])[0]
            sizes = (f" ({int(row['n_classes'])} classes of {int(row['smallest_class'])} to "
                     f"{int(row['largest_class'])} training images)") if row is not None else ""
            notes.append(
                f"**{level}: the mean rules score far below top-1** ({model}: mean cosine "
                f"{_pct(frame.loc[model, MEAN_COSINE])} beside top-1 cosine {_pct(frame.loc[model, TOP1_COSINE])})."
                f" The mean rule answers the class whose training images are on average most similar; a broad class"
                f" of varied members{sizes} has a low average similarity even to its own images, so compact classes"
                " win. The seed's rule is kept as defined; at such a level read the top-1 rules.")
        if row is not None and pd.notna(row["majority"]):
            best = frame[TOP1_COSINE].max()
            if pd.notna(best) and best - row["majority"] <= NEAR_MAJORITY:
                notes.append(
                    f"**{level}: every model is within {100 * NEAR_MAJORITY:.0f} points of the majority-class "
                    f"baseline.** Always answering {row['majority_class']!r} scores {_pct(row['majority'])} on the "
                    f"test split (chance: {_pct(row['chance'])}); the best top-1 cosine is {_pct(best)}.")
    return notes


def split_facts(summary: pd.DataFrame | None, rejected: pd.DataFrame | None) -> list[str]:
    """Markdown list lines: the split's mode, realised fraction, groups per side, largest group
    share, near-duplicate pairs and warnings (warehouse ``split_summary``, when present) and the
    images rejected at ingest by reason (``rejected_images``)."""
    lines = []
    if summary is not None and len(summary):
        s = summary.iloc[0]
        mode = s.get("mode")
        seed = s.get("seed")
        head = f"mode **{mode}**" + (f", seed {int(seed)}" if pd.notna(seed) else "")
        frac = (f"test fraction requested {_pct(s.get('requested_test_fraction'))}, realised "
                f"{_pct(s.get('realised_test_fraction'))}")
        sizes = ""
        if pd.notna(s.get("n_train")) and pd.notna(s.get("n_test")):
            sizes = f" ({int(s['n_train']):,} train / {int(s['n_test']):,} test images)"
        lines.append(f"- {head}; {frac}{sizes}")
        if pd.notna(s.get("n_groups_train")) or pd.notna(s.get("n_groups_test")):
            share = s.get("largest_group_share")
            lines.append(f"- groups (leakage unit): {_count(s.get('n_groups_train'))} train / "
                         f"{_count(s.get('n_groups_test'))} test"
                         + (f"; the largest group holds {_pct(share)} of its class's test images"
                            if pd.notna(share) else ""))
        else:
            lines.append("- groups (leakage unit): none declared (`split.group_by`), images split one by one")
        if pd.notna(s.get("n_near_duplicate_pairs")):
            lines.append(f"- cross-split near-duplicate pairs: {int(s['n_near_duplicate_pairs'])}"
                         + (" (see table `near_duplicates`)" if int(s["n_near_duplicate_pairs"]) else ""))
        for warning in str(s.get("warnings") or "").splitlines():
            if warning.strip():
                lines.append(f"- **warning:** {warning.strip()}")
        if s.get("split_id"):
            lines.append(f"- split id `{s['split_id']}`")
    else:
        lines.append("- no split summary recorded (materialize the dataset's `splits` asset again to record one)")
    if rejected is not None and len(rejected):
        counts = rejected["reason"].astype(str).value_counts().sort_index()
        lines.append(f"- images rejected at ingest: {len(rejected):,} ("
                     + ", ".join(f"{reason}: {n:,}" for reason, n in counts.items()) + "; table `rejected_images`)")
    else:
        lines.append("- images rejected at ingest: none")
    return lines


def _count(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{int(value):,}"


# ---------------------------------------------------------------- markdown
def _pct(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{100 * float(value):.1f} %"


def _md_table(header: list[str], body: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header))] + [line(r) for r in body])


STANDING_HEADING = "vs best (top-1 cosine)"
STANDING_NOTE = (f"vs best: each model against the best one (**{BEST}**) on top-1 cosine over the same test "
                 f"images (paired bootstrap, p Holm-adjusted over the models): '{TIED}' means p ≥ "
                 f"{TIED_P_HOLM:g} (the gap could be chance), '{BELOW}' means p < {TIED_P_HOLM:g}.")


def standing_text(standing, p_holm) -> str:
    """The 'vs best' cell: '**best**', 'tied with best (p = 0.42)', 'below best (p = 0.003)', or '—'
    (not compared)."""
    if standing is None or pd.isna(standing):
        return "—"
    if standing == BEST:
        return f"**{BEST}**"
    return f"{standing} (p {_p_text(p_holm)})"


def _p_text(p) -> str:
    if p is None or pd.isna(p):
        return "n/a"
    return "< 0.001" if p < 0.001 else (f"= {p:.3f}" if p < 0.01 else f"= {p:.2f}")


def _tied_cell(standing: pd.DataFrame, winners: list[str]) -> str:
    """The models tied with the best (``standing``) beyond the exact winners, or 'none' / 'not compared'."""
    if standing.empty:
        return "not compared"
    tied = [m for m in sorted(standing.index[standing["standing"] == TIED]) if m not in winners]
    return ", ".join(tied) if tied else "none"


def _pct_ci(row, column: str) -> str:
    """``row[column]`` in percent, with ' [low, high]' from ``<column>_ci_low/high`` where both are stored."""
    text = _pct(row.get(column, np.nan))
    low, high = row.get(f"{column}_ci_low", np.nan), row.get(f"{column}_ci_high", np.nan)
    if text != "—" and pd.notna(low) and pd.notna(high):
        text += f" [{_pct(low)}, {_pct(high)}]"
    return text


def _mean_std_pct(value, std) -> str:
    if value is None or pd.isna(value):
        return "—"
    return _pct(value) if std is None or pd.isna(std) else f"{100 * float(value):.1f} ± {100 * float(std):.1f} %"


def markdown_summary(metrics: pd.DataFrame, embedding_runs: pd.DataFrame, dataset: str, *,
                     baselines: pd.DataFrame | None = None, stale_models=(), split_summary: pd.DataFrame | None = None,
                     rejected: pd.DataFrame | None = None, differences: pd.DataFrame | None = None) -> str:
    """A short markdown report for one dataset, in percent with one decimal:

    * models whose stored results come from another split (not compared; re-run them);
    * the split's facts (:func:`split_facts`);
    * notes on what the numbers mean (:func:`reading_notes`) and per-group rows left out;
    * the best model per level and k-NN rule (ties listed together), beside the majority-class
      and chance baselines;
    * the ranking per level (k-NN top-1 / mean cosine, linear probe CV and test accuracy), each
      value with its 95 % interval in brackets where stored, with baseline rows; the embedding
      speed table.

    ``differences`` (the dataset's current ``model_differences`` rows) adds the models statistically
    tied with the best to the best-model table and a 'vs best' column to each level's ranking
    (:func:`standing_against_best` on top-1 cosine: 'best', 'tied with best (p = …)', 'below best
    (p = …)'); levels without such rows get no column and no tie is claimed.
    """
    parts = [f"## {dataset}"]
    metrics = metrics[metrics["dataset"] == dataset]
    if differences is not None and "dataset" in differences.columns:
        differences = differences[differences["dataset"] == dataset]
    if stale_models:
        parts.append(f"**Not compared — results of an earlier split:** {', '.join(stale_models)}. Their stored "
                     "metrics and predictions were computed on another split of this dataset, so they are left "
                     "out; re-materialize their metric assets (e.g. `nfhm demo --dataset "
                     f"{dataset} " + " ".join(f"--model {m}" for m in stale_models) + "`).")
    if split_summary is not None or rejected is not None:
        parts += ["### Split", "\n".join(split_facts(split_summary, rejected))]
    base = (baselines[baselines["grp"] == "all"].set_index("level")
            if baselines is not None and len(baselines) else pd.DataFrame())
    knn = _all_group_values(metrics, KNN, KNN_RULES)
    notes = reading_notes(metrics, baselines) if not knn.empty else []
    if baselines is not None and len(baselines):
        skipped = skipped_groups(baselines)
        for level, rows in skipped.groupby("level", sort=True):
            notes.append(f"**{level}: per-group rows left out** for " + "; ".join(
                f"{r.grp} ({r.reason})" for r in rows.itertuples()) + ". Within such a group the nearest "
                "neighbour is right or wrong whatever the embedding, so its bar would mean nothing.")
        notes.append("Baselines: **majority class** = always answering the most common training class, scored on "
                     "the test split; **chance** = 1 / the number of training classes.")
    if notes:
        parts += ["### Reading the numbers", "\n".join(f"- {n}" for n in notes)]
    if knn.empty:
        parts.append("No k-NN metrics yet.")
    else:
        compared = differences is not None
        best = []
        for lvl, frame in knn.groupby(level="level", sort=True):
            row = base.loc[lvl] if lvl in base.index else None
            for rule in KNN_RULES:
                scores = frame[rule].droplevel(["dataset", "level"]).dropna()
                if not scores.empty:
                    winners = sorted(scores.index[scores == scores.max()])
                    cells = [lvl, rule_title(rule), ", ".join(winners), _pct(scores.max()),
                             _pct(row["majority"]) if row is not None else "—",
                             _pct(row["chance"]) if row is not None else "—"]
                    if compared:
                        cells.append(_tied_cell(standing_against_best(differences, level=lvl, metric=rule), winners))
                    best.append(cells)
        header = ["level", "rule", "best model", "accuracy", "majority class", "chance"]
        header += [f"{TIED} (Holm p ≥ {TIED_P_HOLM:g})"] if compared else []
        parts += ["### Best model per level and rule (whole dataset)", _md_table(header, best)]
        ranking = rank_models(metrics, differences=differences)
        has_probe = "probe_cv_accuracy" in ranking.columns
        for lvl, frame in ranking.groupby("level", sort=True):
            with_standing = bool(frame["vs_best"].notna().any())
            header = ["rank", "model"] + ([STANDING_HEADING] if with_standing else []) + ["top-1 cosine", "mean cosine"]
            header += ["linear probe, CV (mean ± std)", "linear probe, test"] if has_probe else []
            body = []
            for _, r in frame.iterrows():
                cells = [("—" if pd.isna(r["rank"]) else int(r["rank"])), r["model"]]
                if with_standing:
                    cells.append(standing_text(r["vs_best"], r["p_holm_vs_best"]))
                cells += [_pct_ci(r, TOP1_COSINE), _pct_ci(r, MEAN_COSINE)]
                if has_probe:
                    cells += [_mean_std_pct(r["probe_cv_accuracy"], r["probe_cv_std"]),
                              _pct_ci(r, "probe_test_accuracy")]
                body.append(cells)
            if lvl in base.index:
                row = base.loc[lvl]
                for name, value in (("majority-class baseline", row["majority"]),
                                    ("chance (1 / classes)", row["chance"])):
                    body.append(["—", name] + ["—"] * with_standing + [_pct(value)] * (len(header) - 2 - with_standing))
            parts += [f"### Ranking — {lvl}", _md_table(header, body)]
            notes = []
            if lvl in base.index and int(base.loc[lvl]["n_test"]) > 0:
                from nfhm_pipeline.evaluation.confidence import detectable_difference

                n_test = int(base.loc[lvl]["n_test"])
                notes.append(f"With {n_test:,} test images, differences under ±{detectable_difference(n_test) * 100:.1f} "
                             "points cannot be told apart.")
            if frame.filter(like="_ci_low").notna().any().any():
                notes.append("In brackets: the 95 % paired-bootstrap interval.")
            if with_standing:
                notes.append(STANDING_NOTE)
            elif compared and frame["model"].nunique() > 1:
                notes.append("No paired comparison with the best is recorded for this level (table "
                             "`model_differences`): no model is marked as tied.")
            if notes:
                parts.append(" ".join(notes))
    speed = throughput_table(embedding_runs, dataset=dataset)
    parts.append("### Embedding speed")
    if speed.empty:
        parts.append("No embedding runs recorded.")
    else:
        parts.append(_md_table(
            ["model", "images", "seconds", "images/s", "device"],
            [[r.model, f"{r.embedded:,}", f"{r.seconds:,.1f}", f"{r.images_per_s:,.1f}", r.device]
             for r in speed.sort_values("images_per_s", ascending=False).itertuples()],
        ))
    return "\n\n".join(parts) + "\n"
