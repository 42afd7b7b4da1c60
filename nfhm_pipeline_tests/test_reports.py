"""Reports: charts, tables, UMAP grids, markdown summary and the HTML report, on hand-built tables."""
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
    confusion_figure, knn_group_bars, png_data_uri, probe_table, save_png, speed_bars, zero_shot_table,
)
from nfhm_pipeline.reports.summary import markdown_summary, metrics_pivot, rank_models

MODELS = ["bioclip", "clip", "dino"]
GROUPS = ["Fish", "Bird", "Butterfly", "all"]
LEVELS = ["species", "genus"]
RULES = ["top1_cosine", "mean_cosine", "top1_euclidean", "mean_euclidean"]
# Whole-dataset values the ranking tests reason about (level -> model -> (top1_cosine, mean_cosine)).
# species: bioclip and clip tie on top1_cosine; clip has the better mean_cosine so is listed first.
ALL_GROUP = {
    "species": {"bioclip": (0.80, 0.50), "clip": (0.80, 0.70), "dino": (0.60, 0.90)},
    "genus": {"bioclip": (0.90, 0.95), "clip": (0.70, 0.80), "dino": (0.95, 0.60)},
}


def knn_value(model, level, grp, rule):
    """A distinct, reproducible value per cell; hand-set values for the 'all' group's cosine rules."""
    if grp == "all" and rule in ("top1_cosine", "mean_cosine"):
        return ALL_GROUP[level][model][rule == "mean_cosine"]
    return round(0.05 + 0.1 * MODELS.index(model) + 0.2 * GROUPS.index(grp) + 0.01 * RULES.index(rule), 4)


@pytest.fixture
def metrics():
    rows = [dict(dataset="bio", model=m, task="knn", level=lvl, grp=g, metric=r,
                 value=knn_value(m, lvl, g, r), std=np.nan, n=10 + GROUPS.index(g))
            for m in MODELS for lvl in LEVELS for g in GROUPS for r in RULES]
    rows += [dict(dataset="bio", model=m, task="linear_probe", level="species", grp="all",
                  metric="accuracy", value=0.5 + 0.1 * i, std=0.01 * (i + 1), n=40)
             for i, m in enumerate(MODELS)]
    rows += [dict(dataset="bio", model="clip", task="zero_shot", level="species", grp="all",
                  metric="top1_ensemble", value=0.4567, std=np.nan, n=40)]
    return pd.DataFrame(rows)


@pytest.fixture
def embedding_runs():
    return pd.DataFrame({
        "dataset": "bio", "model": ["bioclip", "clip", "clip", "dino"],
        "images": 300, "new": [300, 300, 0, 300], "reused": [0, 0, 300, 0], "removed": 0,
        "seconds": [10.0, 5.0, 0.2, 20.0], "images_per_s": [30.0, 60.0, 0.0, 15.0],
        "device": "cpu", "batch_size": 32,
        "finished_at": pd.to_datetime(["2024-10-01", "2024-10-02", "2024-10-03", "2024-10-04"]),
    })


# ---------------------------------------------------------------- k-NN bars
def test_knn_bars_title_each_subplot_with_rule_and_level(metrics):
    fig = knn_group_bars(metrics, level="species")
    assert [ax.get_title() for ax in fig.axes] == ["Top-1 cosine — species", "Mean cosine — species"]
    assert "species" in fig.get_suptitle()


def test_knn_bars_use_a_percent_axis_from_0_to_100(metrics):
    fig = knn_group_bars(metrics, level="genus", rule_pair=("top1_euclidean", "mean_euclidean"))
    for ax in fig.axes:
        assert "%" in ax.get_ylabel()
        assert ax.get_ylim() == (0, 100)


def test_knn_bars_heights_are_metric_values_times_100_with_all_group_last(metrics):
    fig = knn_group_bars(metrics, level="species")
    for ax, rule in zip(fig.axes, ["top1_cosine", "mean_cosine"]):
        assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["Bird", "Butterfly", "Fish", "all"]
        assert [c.get_label() for c in ax.containers] == MODELS
        for container, model in zip(ax.containers, MODELS):
            heights = [p.get_height() for p in container.patches]
            expected = [100 * knn_value(model, "species", g, rule) for g in ["Bird", "Butterfly", "Fish", "all"]]
            assert heights == pytest.approx(expected)


def test_knn_bars_legend_lies_outside_every_axes(metrics):
    fig = knn_group_bars(metrics, level="species")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    assert len(fig.legends) == 1
    legend_box = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend_box.overlaps(ax.get_window_extent(renderer))


def test_knn_bars_for_a_level_without_rows_name_the_levels_present(metrics):
    with pytest.raises(EvaluationError, match="genus"):
        knn_group_bars(metrics, level="family")


def test_duplicated_metric_rows_are_refused(metrics):
    with pytest.raises(EvaluationError, match="duplicated"):
        knn_group_bars(pd.concat([metrics, metrics.iloc[:1]]), level="species")


# ---------------------------------------------------------------- tables
def test_probe_table_shows_mean_and_std_in_percent_per_dataset_level(metrics):
    table = probe_table(metrics)
    assert list(table.columns) == ["bio/species"]
    assert table.loc["bioclip", "bio/species"] == "50.0 ± 1.0 %"
    assert table.loc["dino", "bio/species"] == "70.0 ± 3.0 %"


def test_zero_shot_table_leaves_models_without_result_out(metrics):
    table = zero_shot_table(metrics)
    assert table.to_dict() == {"bio/species top1_ensemble": {"clip": "45.7 %"}}


def test_metrics_pivot_has_models_as_rows_and_level_metric_columns_in_percent(metrics):
    table = metrics_pivot(metrics)
    assert list(table.index) == MODELS
    assert table.loc["clip", ("genus", "top1_cosine")] == 70.0
    assert table.loc["dino", ("species", "top1_euclidean")] == pytest.approx(100 * knn_value("dino", "species", "all", "top1_euclidean"), abs=0.05)


# ---------------------------------------------------------------- speed
def test_speed_bars_show_latest_run_that_embedded_images(embedding_runs):
    fig = speed_bars(embedding_runs)
    ax = fig.axes[0]
    widths = {t.get_text(): p.get_width() for t, p in zip(ax.get_yticklabels(), ax.patches)}
    # clip's last run only reused stored embeddings (0 images/s); its real speed is 60.
    assert widths == {"bioclip": 30.0, "clip": 60.0, "dino": 15.0}
    assert ax.get_xlabel() == "Images per second"
    notes = [t.get_text() for t in ax.texts]
    assert any("300 images in 5.0 s" in n for n in notes)


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
    assert fig.axes[0].get_title() == "toy"


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
    assert [t.get_text() for t in ax.get_yticklabels()] == ["c00", "c01", "c02", "c05"]
    assert ax.get_title() == "many (top 4 of 12 classes by confusion)"


# ---------------------------------------------------------------- files
def test_save_png_writes_a_valid_png_and_no_temp_file(metrics, tmp_path):
    path = save_png(knn_group_bars(metrics, level="species"), tmp_path / "charts" / "knn.png")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 300
    assert [p.name for p in path.parent.iterdir()] == ["knn.png"]


def test_png_data_uri_is_a_downscaled_png_under_the_size_bound(metrics, tmp_path):
    path = save_png(knn_group_bars(metrics, level="species"), tmp_path / "knn.png", dpi=200)
    uri = png_data_uri(path, max_width_px=400)
    assert uri.startswith("data:image/png;base64,") and len(uri) < 150_000
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as img:
        assert img.width == 400


def test_html_report_is_self_contained_and_contains_each_table(metrics, embedding_runs, tmp_path):
    chart = save_png(knn_group_bars(metrics, level="species"), tmp_path / "knn.png")
    tables = {"Linear probe": probe_table(metrics), "k-NN (whole dataset, %)": metrics_pivot(metrics)}
    path = write_html_report(tmp_path / "report.html", dataset="bio",
                             summary_markdown=markdown_summary(metrics, embedding_runs, "bio"),
                             tables=tables, images={"k-NN species": chart})
    text = path.read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]*)"', text)
    assert len(sources) == 1 and sources[0].startswith("data:image/png;base64,")
    # base64 can spell 'http' by chance, so look for URLs only outside the embedded image
    assert "http" not in text.replace(sources[0], "").lower()
    assert "<h2>Linear probe</h2>" in text and "50.0 ± 1.0 %" in text
    assert "<h2>k-NN (whole dataset, %)</h2>" in text and "<td>95.0</td>" in text
    assert "<h3>Ranking — species</h3>" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["knn.png", "report.html"]


# ---------------------------------------------------------------- summary
def test_rank_models_orders_by_top1_cosine_and_ties_share_a_rank(metrics):
    ranking = rank_models(metrics)
    got = [(r.level, r.rank, r.model) for r in ranking.itertuples()]
    assert got == [
        ("genus", 1, "dino"), ("genus", 2, "bioclip"), ("genus", 3, "clip"),
        ("species", 1, "clip"), ("species", 1, "bioclip"), ("species", 3, "dino"),
    ]
    species = ranking[ranking["level"] == "species"].set_index("model")
    assert species.loc["dino", "probe_accuracy"] == pytest.approx(0.7)
    assert species.loc["bioclip", "mean_cosine"] == pytest.approx(0.5)


def test_rank_models_for_one_level(metrics):
    assert list(rank_models(metrics, level="genus")["model"]) == ["dino", "bioclip", "clip"]


def test_markdown_summary_names_best_model_per_level_and_rule(metrics, embedding_runs):
    text = markdown_summary(metrics, embedding_runs, "bio")
    assert "| genus | Top-1 cosine | dino | 95.0% |" in text
    assert "| species | Top-1 cosine | bioclip, clip | 80.0% |" in text
    assert "| species | Mean cosine | dino | 90.0% |" in text
    assert "| clip | 300 | 5.0 | 60.0 | cpu |" in text


# ---------------------------------------------------------------- UMAP
def test_umap_grid_draws_one_figure_per_level_and_notes_the_subsample():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 16))
    labels = {"species": rng.integers(0, 6, 120).astype(str), "genus": rng.integers(0, 3, 120).astype(str)}
    figures = umap_grid(x, labels, n_neighbors=(5,), min_dist=(0.1,), max_points=100, seed=0)
    assert sorted(figures) == ["genus", "species"]
    for level, fig in figures.items():
        assert f"coloured by {level}" in fig.get_suptitle()
        assert "subsample 100 of 120, seed 0" in fig.get_suptitle()
        assert [ax.get_title() for ax in fig.axes] == ["n_neighbors=5, min_dist=0.1"]
        assert len(fig.axes[0].collections[0].get_offsets()) == 100


def test_umap_grid_clips_n_neighbors_to_points_minus_one_and_drops_duplicates():
    x = np.random.default_rng(1).normal(size=(20, 8))
    figures = umap_grid(x, {"label": ["a", "b"] * 10}, n_neighbors=(50, 100), min_dist=(0.5,))
    fig = figures["label"]
    assert [ax.get_title() for ax in fig.axes] == ["n_neighbors=19, min_dist=0.5"]
    assert "subsample" not in fig.get_suptitle()


def test_seed_001_grid_is_ten_by_five():
    assert len(SEED_001_GRID["n_neighbors"]) == 10 and SEED_001_GRID["min_dist"] == (0.1, 0.25, 0.5, 0.75, 1.0)
