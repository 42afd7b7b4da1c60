"""Reports: charts, tables, UMAP grids, markdown summary and the HTML report.

Result tables come from the pipeline itself: the demo catalog materialized once per session
(``demo_run``, shared with test_pipeline.py) and read back through ``stages.reports.read_inputs``,
as the comparison asset reads them. Nothing here invents metric rows.
"""
import base64
import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.reports.html import write_html_report
from nfhm_pipeline.reports.maps import SEED_001_GRID, umap_grid
from nfhm_pipeline.reports.plots import (
    CHANCE_ROW, MAJORITY_ROW, confusion_figure, knn_group_bars, model_colour, model_styles, png_data_uri,
    probe_table, retrieval_table, save_png, speed_bars, zero_shot_table,
)
from helpers import clustered_split, write_results, write_split
from nfhm_pipeline.evaluation.tables import knn_tables, probe_tables
from nfhm_pipeline.reports.comparison import read_inputs
from nfhm_pipeline.reports.summary import markdown_summary, rank_models

DATASET = "demo_shapes"
MODELS = ["raw-pixels", "tiny-clip"]
LEVELS = ["species", "genus", "family"]


def bar_containers(ax):
    """The bars of an axes (the 95 % error bars are containers of their own)."""
    from matplotlib.container import BarContainer

    return [c for c in ax.containers if isinstance(c, BarContainer)]


@pytest.fixture(scope="module")
def demo(demo_run):
    """The demo's current-split results for demo_shapes, as the comparison stage reads them."""
    data_dir, outcome, _ = demo_run
    assert outcome.failed == {}
    return read_inputs(data_dir / "warehouse.duckdb", DATASET)


@pytest.fixture(scope="module")
def metrics(demo):
    return demo.metrics


def value(metrics, **where) -> float:
    rows = metrics
    for col, want in where.items():
        rows = rows[rows[col] == want]
    assert len(rows) == 1, where
    return float(rows["value"].iloc[0])


# ---------------------------------------------------------------- k-NN bars
def test_knn_bars_title_each_subplot_with_rule_and_level_and_say_groups_search_within(metrics):
    fig = knn_group_bars(metrics, level="species")
    assert [ax.get_title() for ax in fig.axes] == ["Top-1 cosine — species", "Mean cosine — species"]
    title = " ".join(fig.get_suptitle().split())
    assert "species" in title and "searched among that group's training images only" in title


def test_knn_bars_use_a_percent_axis_from_0_to_100(metrics):
    fig = knn_group_bars(metrics, level="genus", rule_pair=("top1_euclidean", "mean_euclidean"))
    for ax in fig.axes:
        assert "%" in ax.get_ylabel()
        assert ax.get_ylim() == (0, 100)


def test_knn_bars_heights_are_the_stored_values_times_100_with_all_group_last(metrics):
    fig = knn_group_bars(metrics, level="species")
    groups = ["Bird", "Butterfly", "Fish", "all"]
    for ax, rule in zip(fig.axes, ["top1_cosine", "mean_cosine"]):
        assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == groups
        assert [c.get_label() for c in bar_containers(ax)] == MODELS
        for container, model in zip(bar_containers(ax), MODELS):
            expected = [100 * value(metrics, task="knn", model=model, level="species", grp=g, metric=rule)
                        for g in groups]
            assert [p.get_height() for p in container.patches] == pytest.approx(expected)


def test_knn_bars_legend_lies_outside_every_axes(metrics):
    fig = knn_group_bars(metrics, level="species")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert len(fig.legends) == 1
    legend_box = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend_box.overlaps(ax.get_window_extent(renderer))


def test_knn_bars_draw_the_majority_and_chance_line_of_each_group(demo, metrics):
    base = demo.baselines[demo.baselines["level"] == "genus"]
    fig = knn_group_bars(metrics, level="genus", baselines=base)
    ax = fig.axes[0]
    lines = {c.get_label(): c for c in ax.collections}
    assert {"majority class", "chance (1 / classes)"} <= set(lines)
    heights = sorted(seg[0][1] for seg in lines["majority class"].get_segments())
    expected = sorted(100 * base.set_index("grp").loc[["Bird", "Butterfly", "Fish", "all"], "majority"])
    assert heights == pytest.approx(expected)
    all_row = base.set_index("grp").loc["all"]
    assert all_row["chance"] == pytest.approx(1 / all_row["n_classes"])
    assert set(fig.legends[0].get_texts()[i].get_text() for i in range(len(fig.legends[0].get_texts()))) >= {
        "majority class", "chance (1 / classes)", *MODELS}


def test_each_model_keeps_its_colour_when_the_model_set_changes(metrics):
    both = knn_group_bars(metrics, level="species").axes[0]
    alone = knn_group_bars(metrics[metrics["model"] == "tiny-clip"], level="species").axes[0]
    colour_both = {c.get_label(): c.patches[0].get_facecolor() for c in bar_containers(both)}
    colour_alone = {c.get_label(): c.patches[0].get_facecolor() for c in bar_containers(alone)}
    assert colour_both["tiny-clip"] == colour_alone["tiny-clip"]
    assert colour_both["raw-pixels"] != colour_both["tiny-clip"]


def test_models_sharing_a_colour_keep_it_and_the_later_gets_a_hatch():
    models = [f"m{i}" for i in range(40)]  # 40 names into 20 colours: some must share
    styles = model_styles(models)
    assert all(styles[m][0] == model_colour(m) for m in models)
    pairs = {}
    for m in sorted(models):
        pairs.setdefault(styles[m][0], []).append(styles[m][1])
    assert all(len(set(hatches)) == len(hatches) for hatches in pairs.values())


def test_knn_bars_for_a_level_without_rows_name_the_levels_present(metrics):
    with pytest.raises(EvaluationError, match="genus"):
        knn_group_bars(metrics, level="order")


def test_duplicated_metric_rows_are_refused(metrics):
    with pytest.raises(EvaluationError, match="duplicated"):
        knn_group_bars(pd.concat([metrics, metrics[metrics["task"] == "knn"].iloc[:1]]), level="species")


# ---------------------------------------------------------------- tables
def test_probe_table_shows_cv_mean_and_std_in_percent_and_the_baselines(demo, metrics):
    table = probe_table(metrics, baselines=demo.baselines)
    row = metrics[(metrics["task"] == "linear_probe") & (metrics["metric"] == "cv_accuracy")
                  & (metrics["model"] == "raw-pixels") & (metrics["level"] == "genus")].iloc[0]
    assert table.loc["raw-pixels", "genus"] == f"{100 * row['value']:.1f} ± {100 * row['std']:.1f} %"
    base = demo.baselines.set_index(["level", "grp"]).loc[("genus", "all")]
    assert table.loc[MAJORITY_ROW, "genus"] == f"{100 * base['majority']:.1f} %"
    assert table.loc[CHANCE_ROW, "genus"] == f"{100 / base['n_classes']:.1f} %"
    assert list(table.columns) == sorted(LEVELS)


def test_zero_shot_table_has_a_row_per_level_and_model_with_readable_columns(demo, metrics):
    table = zero_shot_table(metrics, baselines=demo.baselines)
    assert "top-1, prompt ensemble" in table.columns
    cell = table.loc[("family", "tiny-clip"), "top-1, prompt ensemble"]
    assert cell == f"{100 * value(metrics, task='zero_shot', level='family', metric='top1_ensemble'):.1f} %"
    assert ("family", MAJORITY_ROW) in table.index and ("family", CHANCE_ROW) in table.index
    # raw pixels have no text tower: no row
    assert "raw-pixels" not in table.index.get_level_values("model")
    # chance of top-5 among 6 families is 5/6
    assert table.loc[("family", CHANCE_ROW), "top-5, prompt ensemble"] == "83.3 %"


def test_retrieval_table_states_the_candidates_each_query_ranks(demo, metrics):
    table = retrieval_table(metrics, baselines=demo.baselines)
    n_species = demo.baselines.set_index(["level", "grp"]).loc[("species", "all"), "n_classes_all"]
    assert table.loc[("species", "tiny-clip", "image → text"), "candidates ranked"] == f"{n_species} class texts"
    n_test = int(metrics[(metrics["task"] == "retrieval") & (metrics["level"] == "species")]["n"].max())
    assert table.loc[("species", "tiny-clip", "text → image"), "candidates ranked"] == f"{n_test} test images"
    assert {"P@1", "R@5"} <= set(table.columns)


# ---------------------------------------------------------------- speed
def test_speed_bars_show_latest_run_that_embedded_images(demo):
    runs = demo.runs
    fig = speed_bars(runs)
    ax = fig.axes[0]
    widths = {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches)}
    latest = runs[runs["new"] > 0].sort_values("finished_at").groupby("model").tail(1).set_index("model")
    assert widths == pytest.approx(latest["images_per_s"].to_dict())
    assert ax.get_xlabel() == "Images per second"
    assert {p.get_facecolor() for p in ax.patches} == {model_colour(m) for m in widths}


# ---------------------------------------------------------------- confusion
def test_confusion_figure_rows_are_percent_of_each_true_class():
    true = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "b", "b", "b", "b", "a"]
    fig = confusion_figure(true, pred, ["a", "b", "c"], "toy")
    shown = fig.axes[0].images[0].get_array()
    expected = np.zeros((3, 3))
    for t, p in zip(true, pred):
        expected["abc".index(t), "abc".index(p)] += 1
    expected = 100 * expected / expected.sum(axis=1, keepdims=True)
    assert np.asarray(shown) == pytest.approx(expected)
    assert fig.get_suptitle() == "toy"
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["a (n=3)", "b (n=2)", "c (n=1)"]


def test_confusion_figure_title_is_never_clipped():
    title = "a_dataset_with_a_long_name — family: some-model-with-a-long-key, top-1 cosine (row %)"
    fig = confusion_figure(["x", "y"], ["x", "x"], None, title)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
    assert " ".join(fig.get_suptitle().split()) == title


def test_confusion_figure_with_many_classes_shows_most_confused_and_says_so():
    labels = [f"c{i:02d}" for i in range(12)]
    true = [lab for lab in labels for _ in range(5)]
    pred = list(true)
    pred[0] = "c01"    # c00 -> c01
    pred[10] = "c05"   # c02 -> c05
    pred[11] = "c05"   # c02 -> c05
    fig = confusion_figure(true, pred, labels, "many", max_classes=4)
    ax = fig.axes[0]
    # errors as true + as predicted: c02 2, c05 2, c00 1, c01 1; the rest 0.
    assert [t.get_text() for t in ax.get_yticklabels()] == ["c00 (n=5)", "c01 (n=5)", "c02 (n=5)", "c05 (n=5)"]
    assert fig.get_suptitle() == "many (top 4 of 12 classes by confusion)"


# ---------------------------------------------------------------- files
def test_save_png_writes_a_valid_png_an_svg_and_no_temp_file(metrics, tmp_path):
    path = save_png(knn_group_bars(metrics, level="species"), tmp_path / "charts" / "knn.png", svg=True)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 300
    assert sorted(p.name for p in path.parent.iterdir()) == ["knn.png", "knn.svg"]
    assert path.with_suffix(".svg").read_text(encoding="utf-8").lstrip().startswith("<?xml")


def test_png_data_uri_is_a_downscaled_png_under_the_size_bound(metrics, tmp_path):
    path = save_png(knn_group_bars(metrics, level="species"), tmp_path / "knn.png", dpi=200)
    uri = png_data_uri(path, max_width_px=400)
    assert uri.startswith("data:image/png;base64,") and len(uri) < 150_000
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
        assert img.width == 400


def test_html_report_is_self_contained_without_index_columns(demo, metrics, tmp_path):
    chart = save_png(knn_group_bars(metrics, level="species"), tmp_path / "knn.png")
    tables = {"Linear probe": probe_table(metrics, baselines=demo.baselines),
              "Zero-shot": zero_shot_table(metrics, baselines=demo.baselines),
              "pairs": pd.DataFrame({"true class": ["a"], "predicted as": ["b"], "test images": [3]})}
    path = write_html_report(tmp_path / "report.html", dataset=DATASET,
                             summary_markdown=markdown_summary(metrics, demo.runs, DATASET, baselines=demo.baselines),
                             tables=tables, images={"k-NN species": chart}, table_notes={"Zero-shot": "a note"})
    text = path.read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    # base64 can spell 'http' by chance, so look for URLs only outside the embedded image
    assert "http" not in text.replace(sources[0], "").lower()
    assert "<h2>Linear probe</h2>" in text and "± " in text
    assert "<h3>Ranking — species</h3>" in text
    # no stray index column: no empty header cell, no 0/1/2 row headers; a named index is a column
    assert "<th></th>" not in text and not re.search(r"<th>\d+</th>", text)
    assert "<th>model</th>" in text and "<th>level</th>" in text
    # every table scrolls in its own box instead of overflowing the page
    assert text.count('<div class="table-wrap">') == text.count("<table")
    assert ".table-wrap { max-width: 100%; overflow-x: auto;" in text
    assert '<p class="note">a note</p>' in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn.png", "report.html"]


# ---------------------------------------------------------------- summary
def test_rank_models_orders_by_top1_cosine_and_carries_the_linear_probe(metrics):
    ranking = rank_models(metrics)
    for level, frame in ranking.groupby("level"):
        assert list(frame["top1_cosine"]) == sorted(frame["top1_cosine"], reverse=True)
        assert frame["rank"].iloc[0] == 1
    # the probe metrics the pipeline writes are cv_accuracy / test_accuracy (issue 12: the ranking
    # asked for 'accuracy', so its probe column never appeared)
    row = ranking[(ranking["level"] == "genus") & (ranking["model"] == "tiny-clip")].iloc[0]
    assert row["probe_cv_accuracy"] == pytest.approx(
        value(metrics, task="linear_probe", model="tiny-clip", level="genus", metric="cv_accuracy"))
    assert row["probe_test_accuracy"] == pytest.approx(
        value(metrics, task="linear_probe", model="tiny-clip", level="genus", metric="test_accuracy"))
    assert np.isfinite(row["probe_cv_std"])


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """Two models' k-NN and linear-probe results on a small collection, computed by
    ``evaluation.tables`` and written by ``warehouse.replace_many`` as the evaluation assets write
    them, then read back as the comparison reads them (no Dagster run: the rows alone)."""
    db = tmp_path_factory.mktemp("ranked") / "warehouse.duckdb"
    genus = {"acer": "sapindales", "betula": "fagales", "quercus": "fagales"}
    frame, vectors, split_id = clustered_split(0, genus=genus)
    write_split(db, "leaves", frame, split_id)
    noise = np.random.default_rng(1).normal(scale=4.0, size=vectors.shape).astype(np.float32)
    for model, v in (("sharp", vectors), ("blurred", vectors + noise)):
        for tables in (knn_tables(frame, v, ["species", "genus"], device="cpu"),
                       probe_tables(frame, v, ["species", "genus"])):
            write_results(db, "leaves", model, tables, split_id=split_id)
    return read_inputs(db, "leaves")


def test_rank_models_shows_the_probe_rows_the_pipeline_writes(stored):
    # issue 12: the ranking asked for metric 'accuracy', which the probe never writes
    # (it writes cv_accuracy / test_accuracy), so the probe columns never appeared.
    metrics = stored.metrics
    assert {"linear_probe", "knn"} <= set(metrics["task"])
    ranking = rank_models(metrics)
    assert {"probe_cv_accuracy", "probe_cv_std", "probe_test_accuracy"} <= set(ranking.columns)
    assert len(ranking) == 4  # 2 models x 2 levels
    for row in ranking.itertuples():
        where = dict(task="linear_probe", model=row.model, level=row.level, grp="all")
        cv = metrics[(metrics[list(where)] == pd.Series(where)).all(axis=1) & (metrics["metric"] == "cv_accuracy")]
        assert row.probe_cv_accuracy == cv["value"].item() and row.probe_cv_std == cv["std"].item()
        assert row.probe_test_accuracy == value(metrics, metric="test_accuracy", **where)
        assert row.top1_cosine == value(metrics, task="knn", model=row.model, level=row.level, grp="all",
                                        metric="top1_cosine")
    text = markdown_summary(metrics, stored.runs, "leaves")
    sharp = ranking[(ranking["model"] == "sharp") & (ranking["level"] == "species")].iloc[0]
    assert "| rank | model | top-1 cosine | mean cosine | linear probe, CV (mean ± std) | linear probe, test |" in text
    assert (f"| {100 * sharp.probe_cv_accuracy:.1f} ± {100 * sharp.probe_cv_std:.1f} % "
            f"| {100 * sharp.probe_test_accuracy:.1f} % |") in text


def test_rank_models_for_one_level(metrics):
    genus = rank_models(metrics, level="genus")
    assert set(genus["model"]) == set(MODELS) and set(genus["level"]) == {"genus"}


def test_markdown_summary_shows_best_model_ranking_with_probe_and_baselines(demo, metrics):
    text = markdown_summary(metrics, demo.runs, DATASET, baselines=demo.baselines)
    top = value(metrics, task="knn", model="raw-pixels", level="genus", grp="all", metric="top1_cosine")
    base = demo.baselines.set_index(["level", "grp"]).loc[("genus", "all")]
    assert (f"| genus | Top-1 cosine | raw-pixels | {100 * top:.1f} % | {100 * base['majority']:.1f} % | "
            f"{100 * base['chance']:.1f} % |") in text
    assert "| rank | model | top-1 cosine | mean cosine | linear probe, CV (mean ± std) | linear probe, test |" in text
    assert f"| — | majority-class baseline | {100 * base['majority']:.1f} % |" in text
    assert "| tiny-clip | 216 |" in text


# ---------------------------------------------------------------- UMAP
def test_umap_grid_draws_one_figure_per_level_and_notes_the_subsample():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16))
    labels = {"species": rng.integers(0, 6, 120).astype(str), "genus": rng.integers(0, 3, 120).astype(str)}
    figures = umap_grid(x, labels, n_neighbors=(5,), min_dist=(0.1,), max_points=100, seed=0)
    assert sorted(figures) == ["genus", "species"]
    for level, fig in figures.items():
        title = " ".join(fig.get_suptitle().split())
        assert f"coloured by {level}" in title
        assert "subsample 100 of 120, seed 0" in title
        assert [ax.get_title() for ax in fig.axes] == ["n_neighbors=5, min_dist=0.1"]
        assert len(fig.axes[0].collections[0].get_offsets()) == 100


def test_umap_legend_stays_clear_of_the_title_and_inside_the_figure():
    rng = np.random.default_rng(0)
    labels = {"species": [f"class number {i % 20}" for i in range(60)]}  # 20 classes: the tallest legend
    fig = umap_grid(rng.normal(size=(60, 8)), labels, n_neighbors=(5,), min_dist=(0.1,), max_points=50,
                    title_prefix="a dataset with a long name — a-model-with-a-long-key")["species"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, title = fig.legends[0].get_window_extent(renderer), fig._suptitle.get_window_extent(renderer)
    assert not legend.overlaps(title)
    for box in (legend, title):
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height


def test_umap_grid_clips_n_neighbors_to_points_minus_one_and_drops_duplicates():
    x = np.random.default_rng(1).normal(size=(20, 8))
    figures = umap_grid(x, {"label": ["a", "b"] * 10}, n_neighbors=(50, 100), min_dist=(0.5,))
    fig = figures["label"]
    assert [ax.get_title() for ax in fig.axes] == ["n_neighbors=19, min_dist=0.5"]
    assert "subsample" not in fig.get_suptitle()


def test_seed_001_grid_is_ten_by_five():
    assert len(SEED_001_GRID["n_neighbors"]) == 10 and SEED_001_GRID["min_dist"] == (0.1, 0.25, 0.5, 0.75, 1.0)
