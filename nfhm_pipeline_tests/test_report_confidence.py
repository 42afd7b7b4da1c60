"""Reports with their statistical confidence (issue 13, section 4): every bar chart draws each row's
95 % interval (and none where a row has none), and the ranking in the markdown summary and the HTML
report marks the best model and the models statistically tied with it (Holm p >= 0.05 in
``model_differences``), by one rule.

The results are the pipeline's own: three models on a small clustered collection (``sharp``, its
exact copy ``twin`` — equal accuracy — and ``noise``, unrelated vectors) evaluated by
``evaluation.tables``, given their intervals by ``evaluation.intervals.add_intervals``, written by
the stages' writer, compared by ``evaluation.intervals.model_differences`` and read back as the
comparison stage reads them. Only ``test_a_row_without_interval...`` blanks stored intervals, to
state what a row without one looks like.
"""
from __future__ import annotations

import datetime as dt
import re
import shutil

import numpy as np
import pandas as pd
import pytest

from helpers import clustered_split, write_results, write_split
from nfhm_pipeline.evaluation import names
from nfhm_pipeline.evaluation.intervals import add_intervals, model_differences
from nfhm_pipeline.evaluation.tables import knn_tables, probe_tables
from nfhm_pipeline.reports.comparison import RULE_PAIRS, build_comparison, read_inputs
from nfhm_pipeline.reports.html import markdown_to_html
from nfhm_pipeline.reports.plots import knn_group_bars
from nfhm_pipeline.reports.summary import (BELOW, BEST, TIED, TIED_P_HOLM, markdown_summary, rank_models,
                                           standing_against_best)
from nfhm_pipeline.store import provenance, warehouse

DATASET = "leaves"
LEVELS = ["species", "genus"]
GENUS = {"acer": "sapindales", "betula": "fagales", "quercus": "fagales"}
RESAMPLES = 300


def write_run(db) -> None:
    """The three models' k-NN and probe results with intervals and their ``model_differences``,
    as the evaluation and comparison stages write them."""
    frame, vectors, split_id = clustered_split(0, genus=GENUS, per_class=24)
    # two reporting groups that each hold every species, so the per-group bars have rows
    frame = frame.assign(group=np.where(np.arange(len(frame)) % 2, "north", "south"))
    write_split(db, DATASET, frame, split_id)
    noise = np.random.default_rng(7).normal(size=vectors.shape).astype(np.float32)
    for model, v in (("sharp", vectors), ("twin", vectors.copy()), ("noise", noise)):
        for tables in (knn_tables(frame, v, LEVELS, device="cpu"), probe_tables(frame, v, LEVELS)):
            add_intervals(tables, frame, seed=0, n_resamples=RESAMPLES)
            write_results(db, DATASET, model, tables, split_id=split_id)
    predictions = provenance.current_rows(db, "predictions", DATASET)
    differences = model_differences(predictions, seed=0, n_resamples=RESAMPLES).assign(
        dataset=DATASET, split_id=split_id, created_at=dt.datetime(2026, 1, 1))
    warehouse.replace_many(db, [("model_differences", differences, {"dataset": DATASET})])


@pytest.fixture(scope="module")
def compared_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("confidence") / "warehouse.duckdb"
    write_run(db)
    return db


@pytest.fixture(scope="module")
def run(compared_db):
    """(inputs as the comparison reads them, the ComparisonReport written from them)."""
    inputs = read_inputs(compared_db, DATASET)
    return inputs, build_comparison(DATASET, LEVELS, inputs, compared_db.parent / "reports")


# ---------------------------------------------------------------- error bars
def drawn_intervals(fig) -> dict[tuple, tuple[float, float]]:
    """{(subplot title, model, x tick): (bottom, top)} of every error bar drawn, matched to its bar
    by x position."""
    from matplotlib.container import BarContainer, ErrorbarContainer

    out = {}
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        ticks = [t.get_text().split("\n")[0] for t in ax.get_xticklabels()]
        bar_at = {}
        for container in (c for c in ax.containers if isinstance(c, BarContainer)):
            for k, patch in enumerate(container.patches):
                bar_at[round(patch.get_x() + patch.get_width() / 2, 9)] = (container.get_label(), ticks[k])
        for container in (c for c in ax.containers if isinstance(c, ErrorbarContainer)):
            for segment in container.lines[2][0].get_segments():
                (x0, y0), (x1, y1) = segment
                assert x0 == x1, "a vertical error bar"
                model, tick = bar_at[round(x0, 9)]
                assert (ax.get_title(), model, tick) not in out, "one error bar per bar"
                out[(ax.get_title(), model, tick)] = (min(y0, y1), max(y0, y1))
    return out


def stored_intervals(metrics, level, rules) -> dict[tuple, tuple[float, float]]:
    """The same keys from the stored rows that have an interval, in percent."""
    from nfhm_pipeline.reports.plots import rule_title

    rows = metrics[(metrics["task"] == names.KNN) & (metrics["level"] == level) & metrics["metric"].isin(rules)]
    rows = rows[rows["ci_low"].notna() & rows["ci_high"].notna()]
    return {(f"{rule_title(r.metric)} — {level}", r.model, r.grp): (100 * r.ci_low, 100 * r.ci_high)
            for r in rows.itertuples()}


@pytest.mark.parametrize("pair", sorted(RULE_PAIRS))
@pytest.mark.parametrize("level", LEVELS)
def test_each_bar_of_the_grouped_charts_spans_its_stored_interval(run, pair, level):
    inputs, _ = run
    rules = RULE_PAIRS[pair]
    fig = knn_group_bars(inputs.metrics, level=level, rule_pair=rules, baselines=inputs.baselines)
    drawn, stored = drawn_intervals(fig), stored_intervals(inputs.metrics, level, rules)
    assert {grp for _, _, grp in stored} == {"north", "south", "all"}  # per group and whole dataset
    assert len(stored) == 2 * 3 * 3  # 2 rules x 3 models x 3 groups, each with an interval
    assert drawn.keys() == stored.keys()
    for key, (low, high) in stored.items():
        assert drawn[key] == pytest.approx((low, high), abs=1e-9), key


def test_bar_labels_sit_above_the_interval_and_the_legend_names_it_once(run):
    inputs, _ = run
    fig = knn_group_bars(inputs.metrics, level="species")
    ax = fig.axes[0]
    rows = inputs.metrics[(inputs.metrics["task"] == names.KNN) & (inputs.metrics["level"] == "species")
                          & (inputs.metrics["metric"] == names.TOP1_COSINE)]
    tops = sorted(100 * np.fmax(rows["value"], rows["ci_high"]))
    assert sorted(text.xy[1] for text in ax.texts) == pytest.approx(tops)
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend.count("95 % interval (paired bootstrap)") == 1
    assert legend[:3] == ["noise", "sharp", "twin"]


def test_a_row_without_interval_gets_no_error_bar_and_nothing_fails(run):
    inputs, _ = run
    metrics = inputs.metrics.copy()
    blank = (metrics["task"] == names.KNN) & (metrics["model"] == "noise") & (metrics["grp"] == "north")
    metrics.loc[blank, ["ci_low", "ci_high"]] = np.nan
    metrics.loc[blank & (metrics["metric"] == names.TOP1_COSINE) & (metrics["level"] == "species"), "ci_high"] = 0.5
    fig = knn_group_bars(metrics, level="species")
    drawn = drawn_intervals(fig)
    assert drawn.keys() == stored_intervals(metrics, "species", RULE_PAIRS["cosine"]).keys()
    assert not any(model == "noise" and grp == "north" for _, model, grp in drawn)  # half an interval: none
    assert len(drawn) == 2 * 3 * 3 - 2

    # no interval anywhere (NaN, or no interval columns at all): bars only, no error-bar legend entry
    for frame in (metrics.assign(ci_low=np.nan, ci_high=np.nan), metrics.drop(columns=["ci_low", "ci_high"])):
        fig = knn_group_bars(frame, level="species")
        assert drawn_intervals(fig) == {}
        assert not any("interval" in t.get_text() for t in fig.legends[0].get_texts())
        assert len(fig.axes[0].patches) == 3 * 3


# ---------------------------------------------------------------- who is tied with the best
def test_the_twin_at_equal_accuracy_is_tied_and_the_tie_rule_is_holm_p_at_least_005(run):
    inputs, _ = run
    diffs = inputs.differences
    for level in LEVELS:
        top1 = inputs.metrics[(inputs.metrics["task"] == names.KNN) & (inputs.metrics["grp"] == "all")
                              & (inputs.metrics["level"] == level)
                              & (inputs.metrics["metric"] == names.TOP1_COSINE)].set_index("model")["value"]
        assert top1["sharp"] == top1["twin"]  # equal accuracy
        standing = standing_against_best(diffs, level=level)
        rows = diffs[(diffs["task"] == names.KNN) & (diffs["metric"] == names.TOP1_COSINE)
                     & (diffs["level"] == level) & (diffs["grp"] == "all")].set_index("model_b")
        assert standing.loc["sharp", "standing"] == BEST  # ties in accuracy: the name that sorts first
        assert standing.loc["twin", "standing"] == TIED and rows.loc["twin", "p_holm"] == 1.0
        assert set(standing.index) == {"sharp", "twin", "noise"}
        for model, row in rows.iterrows():
            assert standing.loc[model, "standing"] == (TIED if row["p_holm"] >= TIED_P_HOLM else BELOW)
            assert standing.loc[model, "p_holm"] == row["p_holm"]
    assert (standing_against_best(diffs, level="species").loc["noise", "standing"]) == BELOW  # far apart


def test_tied_means_holm_p_at_or_above_005_exactly(run):
    inputs, _ = run
    diffs = inputs.differences.copy()
    key = (diffs["task"] == names.KNN) & (diffs["metric"] == names.TOP1_COSINE) & (diffs["level"] == "genus") \
        & (diffs["grp"] == "all")
    for p, expected in ((0.05, TIED), (0.0499999, BELOW), (np.nan, None)):
        diffs.loc[key & (diffs["model_b"] == "noise"), "p_holm"] = p
        standing = standing_against_best(diffs, level="genus")
        assert standing["standing"].get("noise") == expected


@pytest.mark.parametrize("level", LEVELS)
def test_ranking_marks_best_and_tied_in_text_and_html_alike_with_intervals(run, level):
    inputs, report = run
    ranking = rank_models(inputs.metrics, level=level, differences=inputs.differences).set_index("model")
    text = report.summary_markdown
    block = text[text.index(f"### Ranking — {level}"):]
    block = block[:block.index("\n\n", block.index("|"))]
    html = report.html.read_text(encoding="utf-8")
    table = html[html.index(f"<h3>Ranking — {level}</h3>"):]
    table = table[:table.index("</table>")]
    assert "<th>vs best (top-1 cosine)</th>" in table
    html_rows = {cells[1]: cells for cells in (re.findall(r"<td>(.*?)</td>", row)
                                               for row in re.findall(r"<tr>(.*?)</tr>", table)) if cells}
    for model, r in ranking.iterrows():
        p = r["p_holm_vs_best"]
        expected = {BEST: "**best**", TIED: f"tied with best (p = {p:.2f})"}.get(r["vs_best"])
        if r["vs_best"] == BELOW:
            assert p < TIED_P_HOLM
            expected = "below best (p < 0.001)" if p < 0.001 else f"below best (p = {p:.3f})" if p < 0.01 else \
                f"below best (p = {p:.2f})"
        low, high = 100 * r["top1_cosine_ci_low"], 100 * r["top1_cosine_ci_high"]
        top1 = f"{100 * r['top1_cosine']:.1f} % [{low:.1f} %, {high:.1f} %]"
        assert f"| {r['rank']} | {model} | {expected} | {top1} |" in block
        # the HTML renders the same rows: the same mark, the same value and interval
        assert html_rows[model][2] == expected.replace("**best**", "<strong>best</strong>")
        assert html_rows[model][3] == top1
        assert re.fullmatch(r"[\d.]+ % \[[\d.]+ %, [\d.]+ %\]", html_rows[model][6])  # probe test, with interval
    assert ranking.loc["sharp", "vs_best"] == BEST and ranking.loc["twin", "vs_best"] == TIED
    assert (ranking["vs_best"] == TIED).sum() == block.count("tied with best (p =")
    note = text[text.index(block) + len(block):].split("\n\n")[1]  # the paragraph under the table
    assert "Holm-adjusted" in note and "'tied with best' means p ≥ 0.05" in note and "95 % paired-bootstrap" in note


def test_best_model_table_lists_the_tied_models_beside_the_winners(run):
    inputs, report = run
    line = next(l for l in report.summary_markdown.splitlines() if l.startswith("| species | Top-1 cosine |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "sharp, twin"  # equal accuracy: both are the best
    standing = standing_against_best(inputs.differences, level="species")
    assert cells[-1] == ", ".join(m for m in sorted(standing.index[standing["standing"] == TIED])
                                  if m not in ("sharp", "twin")) or cells[-1] == "none"


def test_without_model_differences_rows_no_model_is_marked(run):
    inputs, _ = run
    # the table holds no row for the dataset's level (one model only, or the comparison not run)
    empty = inputs.differences.iloc[0:0]
    text = markdown_summary(inputs.metrics, inputs.runs, DATASET, baselines=inputs.baselines, differences=empty)
    assert "tied with best (p" not in text and "**best**" not in text and "vs best" not in text
    assert "No paired comparison with the best is recorded for this level" in text
    assert "| species | Top-1 cosine | sharp, twin |" in text and "| not compared |" in text
    assert rank_models(inputs.metrics, differences=empty)["vs_best"].isna().all()
    # no model_differences at all (a warehouse written before the table existed): no mark, no
    # claim, the intervals still shown, in the text and in its HTML
    text = markdown_summary(inputs.metrics, inputs.runs, DATASET, baselines=inputs.baselines, differences=None)
    html = markdown_to_html(text)
    for shown in (text, html):
        assert "tied with best" not in shown and "best**" not in shown and "<strong>best</strong>" not in shown
        assert "No paired comparison" not in shown
    assert re.search(r"<td>[\d.]+ % \[[\d.]+ %, [\d.]+ %\]</td>", html)
    assert rank_models(inputs.metrics)["vs_best"].isna().all()


def test_differences_of_an_earlier_split_are_not_read(compared_db, tmp_path):
    db = tmp_path / "warehouse.duckdb"
    shutil.copy(compared_db, db)
    with warehouse.connect(db) as con:
        con.execute("UPDATE model_differences SET split_id = 'seed0-earlier'")
    again = read_inputs(db, DATASET)
    assert again.differences is not None and again.differences.empty
    assert rank_models(again.metrics, differences=again.differences)["vs_best"].isna().all()
