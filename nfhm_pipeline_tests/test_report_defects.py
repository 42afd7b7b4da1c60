"""The comparison report against outside testing (issue 11 items 4, 10, 14, 18, 21; issue 16 item 11;
issue 12's probe column), on a real pipeline run.

A small 'leaves' collection (label_csv, two levels, a reporting group 'site' of which 'pond' holds a
single species, one byte-identical copy that ingest rejects) is materialized once per module with
two raw-pixel models through a real Dagster instance. The model keys and level names are the pair
that used to collide in the UMAP file name: (rp, genus_species) and (rp_genus, species).
Tests that change state work on a copy of its data folder. Faults are real: RLIMIT_FSIZE in a
subprocess, a folder under a regular file, a symlink planted in the report folder.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import local_resources
from helpers import subprocess_env
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.reports.files import inside, safe_name
from nfhm_pipeline.reports.summary import class_baselines, reading_notes
from nfhm_pipeline.runner import materialize_catalog
from nfhm_pipeline.evaluation.tables import knn_tables
from nfhm_pipeline.reports.comparison import (MAPS_FOLDER, ReportInputs, build_comparison, draw_maps, read_inputs,
                                          report_folder, run_comparison, split_labels)
from nfhm_pipeline.store import provenance, warehouse

DATASET = "leaves"
LEVELS = ["species", "genus_species"]
MODELS = ["rp", "rp_genus"]
# species → (genus, site); betula lives only at the pond, so per-group rows of 'pond' mean nothing
SPECIES = {"acer_rubrum": ("acer", "north"), "acer_saccharum": ("acer", "south"),
           "quercus_alba": ("quercus", "north"), "betula_nigra": ("betula", "pond")}
PER_SPECIES = 8


def write_collection(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["path,species,genus_species,site"]
    for s, (species, (genus, site)) in enumerate(SPECIES.items()):
        for i in range(PER_SPECIES):
            pixels = rng.normal(60 + 45 * s, 25, size=(16, 16, 3)).clip(0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / f"{species}_{i}.png")
            # half of acer_rubrum also grows in the south, so 'north' and 'south' hold several species
            where = "south" if species == "acer_rubrum" and i % 2 else site
            lines.append(f"images/{species}_{i}.png,{species},{genus},{where}")
    shutil.copy(root / "images" / "acer_rubrum_0.png", root / "images" / "copy_of_acer.png")
    lines.append("images/copy_of_acer.png,acer_rubrum,acer,north")
    (root / "leaves.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "leaves.csv"


def write_catalog(path: Path, csv: Path, seed: int = 0) -> Path:
    path.write_text(textwrap.dedent(f"""
        datasets:
          {DATASET}:
            reader: label_csv
            csv: {csv}
            path_column: path
            labels: {LEVELS}
            group: site
            prompts: medical
            split: {{test_fraction: 0.25, seed: {seed}, folds: 2}}
            umap: {{n_neighbors: [5], min_dist: [0.1], max_points: 200}}
        models:
          rp: {{loader: raw_pixels, image_size: 8}}
          rp_genus: {{loader: raw_pixels, image_size: 16}}
        """), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def leaves(tmp_path_factory):
    """(tmp, csv, data_dir, instance) after the whole catalog was materialized."""
    tmp = tmp_path_factory.mktemp("report-leaves")
    csv = write_collection(tmp / "leaves")
    catalog = load_catalog(write_catalog(tmp / "catalog.yaml", csv))
    data_dir = tmp / "data"
    with dg.instance_for_test() as instance:
        outcome = materialize_catalog(catalog, instance=instance, resources=local_resources(data_dir),
                                      log=lambda *_: None)
        assert outcome.failed == {}
        yield tmp, csv, data_dir, instance


def latest_metadata(instance, asset: str, partition: str | None = None) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey([DATASET, asset]),
                              asset_partitions=[partition] if partition else None), limit=1).records
    return records[0].asset_materialization.metadata


def report_html(data_dir: Path) -> str:
    return (data_dir / "reports" / DATASET / f"{DATASET}_report.html").read_text(encoding="utf-8")


def td_cells(text: str) -> list[str]:
    return re.findall(r"<td>(.*?)</td>", text)


# ---------------------------------------------------------------- issue 12: the probe column
def test_ranking_shows_the_linear_probe_the_pipeline_wrote(leaves):
    _, _, data_dir, _ = leaves
    m = warehouse.read_table(data_dir / "warehouse.duckdb", "metrics", dataset=DATASET)
    row = m[(m["task"] == "linear_probe") & (m["metric"] == "cv_accuracy") & (m["model"] == "rp")
            & (m["level"] == "species")].iloc[0]
    text = report_html(data_dir)
    ranking = text[text.index("<h3>Ranking — species</h3>"):][:3000]
    assert "<th>linear probe, CV (mean ± std)</th>" in ranking
    assert f"<td>{100 * row['value']:.1f} ± {100 * row['std']:.1f} %</td>" in ranking


# ---------------------------------------------------------------- issue 11.4: stale results
def test_comparison_uses_only_current_split_rows_and_names_the_models_to_rerun(leaves, tmp_path):
    tmp, csv, data_dir, _ = leaves
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    # A new split seed, then only one model re-run (with the manifest, the split and the report).
    catalog = load_catalog(write_catalog(tmp_path / "catalog.yaml", csv, seed=5))
    with dg.instance_for_test() as instance:
        outcome = materialize_catalog(catalog, instance=instance, resources=local_resources(data), models=["rp"],
                                      log=lambda *_: None)
        assert outcome.failed == {}
        meta = latest_metadata(instance, "model_comparison")
    db = data / "warehouse.duckdb"
    assert provenance.stale_models(db, DATASET) == ["rp_genus"]
    assert meta["stale_models"].value == ["rp_genus"]
    text = report_html(data)
    assert "Not compared — results of an earlier split:" in text and "--model rp_genus" in text
    # no result row of the stale model (embedding speed does not depend on the split: it stays)
    head, speed = text.split("<h3>Embedding speed</h3>")
    cells = td_cells(head + speed[speed.index("<h2>"):])
    assert "rp" in cells and "rp_genus" not in cells
    inputs = read_inputs(db, DATASET)
    assert set(inputs.metrics["model"]) == {"rp"}
    test_ids = set(warehouse.query(db, "SELECT image_id FROM splits WHERE dataset = ? AND split = 'test'",
                                   [DATASET])["image_id"])
    assert set(inputs.predictions["image_id"]) <= test_ids
    # the stale model's rows are still stored (nothing lost), just not compared
    all_rows = warehouse.read_table(db, "metrics", dataset=DATASET)
    assert "rp_genus" in set(all_rows["model"])


def test_comparison_with_only_stale_results_says_which_models_to_rerun(leaves, tmp_path):
    _, _, data_dir, _ = leaves
    db = tmp_path / "warehouse.duckdb"
    shutil.copy(data_dir / "warehouse.duckdb", db)
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE splits SET split_id = 'seed9-000000000000'")
    with pytest.raises(StorageError, match=r"earlier split: re-materialize") as err:
        run_comparison(DATASET, LEVELS, db, tmp_path / "reports")
    assert "rp, rp_genus" in str(err.value)


# ---------------------------------------------------------------- issue 11.10: names never escape
def hostile_inputs(data_dir: Path, *, dataset: str, model: str, level: str) -> ReportInputs:
    """The pipeline's own current rows of 'leaves', with dataset, model 'rp' and level 'species'
    renamed to hostile values (the catalog refuses them; the report must not rely on that)."""
    inputs = read_inputs(data_dir / "warehouse.duckdb", DATASET)

    def rename(frame):
        if frame is None or frame.empty:
            return frame
        frame = frame.copy()
        for col, old, new in (("dataset", DATASET, dataset), ("model", "rp", model), ("level", "species", level)):
            if col in frame.columns:
                frame[col] = frame[col].replace(old, new)
        return frame
    return ReportInputs(metrics=rename(inputs.metrics), runs=rename(inputs.runs),
                        predictions=rename(inputs.predictions), baselines=rename(inputs.baselines),
                        split_summary=rename(inputs.split_summary), rejected=rename(inputs.rejected))


def test_no_report_file_escapes_its_folder_whatever_the_names(leaves, tmp_path):
    _, _, data_dir, _ = leaves
    target = Path("/tmp") / f"nfhm-escape-{uuid.uuid4().hex}"
    dataset, model = "../../../../../../" + str(target) + "/ds", "../../../../../../" + str(target) + "/model"
    level = "../../../../../../" + str(target) + "/PWNED"
    root = tmp_path / "data" / "reports"
    inputs = hostile_inputs(data_dir, dataset=dataset, model=model, level=level)
    levels = [level, "genus_species"]
    out = report_folder(root, dataset)
    report = build_comparison(dataset, levels, inputs, out)
    rng = np.random.default_rng(0)
    maps = draw_maps(dataset, model, rng.normal(size=(30, 8)), {level: np.array(["a", "b", "c"] * 10)},
                     {"n_neighbors": [5], "min_dist": [0.1], "max_points": 100}, 0, root)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not target.exists()
    assert written and all(p.resolve().is_relative_to(root.resolve()) for p in written)
    # every kind of file the report writes was written, each inside its folder
    suffixes = {p.suffix for p in written}
    assert {".png", ".svg", ".html"} <= suffixes
    assert report.html.parent == out and out.parent == root.resolve()
    assert all(p.parent.parent == out / MAPS_FOLDER for p in maps.values())
    assert f"knn_cosine_{safe_name(level)}.png" in {p.name for p in written}
    assert "PWNED" in report.html.read_text(encoding="utf-8")  # the name is shown, only not used as a path


def test_a_symlink_planted_in_the_report_folder_is_refused(tmp_path):
    out = tmp_path / "reports" / "leaves"
    out.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (out / "maps").symlink_to(outside)
    with pytest.raises(StorageError, match="outside the report folder"):
        inside(out, "maps", "umap_species.png")


def test_safe_names_keep_plain_names_and_separate_names_that_slug_alike():
    assert safe_name("species") == "species" and safe_name("raw-pixels") == "raw-pixels"
    assert safe_name("genus species") != safe_name("genus_species")
    assert safe_name("..") not in ("..", ".", "") and "/" not in safe_name("../../x")
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", safe_name("../.hidden/x"))


# ---------------------------------------------------------------- issue 16.11: UMAP names collide
def test_umap_maps_of_rp_genus_species_and_rp_genus_species_are_separate_files(leaves):
    _, _, data_dir, instance = leaves
    paths = {}
    for model in MODELS:
        meta = latest_metadata(instance, "embedding_maps", model)
        for level, path in meta["maps"].value.items():
            paths[model, level] = Path(path)
    assert len(set(paths.values())) == len(MODELS) * len(LEVELS)
    assert paths["rp", "genus_species"] != paths["rp_genus", "species"]
    for (model, level), path in paths.items():
        assert path.exists() and path.parent.name == model and path.name == f"umap_{level}.png"
        # the file is this model's: its SVG twin keeps the figure title as text
        assert f"— {model} UMAP" in path.with_suffix(".svg").read_text(encoding="utf-8")


# ---------------------------------------------------------------- issue 11.14: full disk
FULL_DISK = """
import resource, signal, sys
import matplotlib.font_manager  # build matplotlib's font cache before the limit
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.reports.comparison import run_comparison
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an error, not a killed process
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
try:
    run_comparison(sys.argv[1], ["species", "genus_species"], sys.argv[2], sys.argv[3])
except StorageError as e:
    print("STORAGE", e)
"""


def test_full_disk_during_the_report_is_a_storage_error_naming_the_file(leaves, tmp_path):
    _, _, data_dir, _ = leaves
    reports = tmp_path / "reports"
    env = subprocess_env(MPLCONFIGDIR=str(tmp_path / "mpl"))
    done = subprocess.run([sys.executable, "-c", FULL_DISK, DATASET, str(data_dir / "warehouse.duckdb"), str(reports)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("STORAGE "))
    assert f"cannot write {reports / DATASET}" in line and "free space" in line
    assert not [p for p in reports.rglob("*.tmp")]  # the partial file was removed


def test_report_folder_under_a_regular_file_is_a_storage_error_naming_it(leaves, tmp_path):
    _, _, data_dir, _ = leaves
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    with pytest.raises(StorageError, match=re.escape(str(blocker / "reports"))):
        run_comparison(DATASET, LEVELS, data_dir / "warehouse.duckdb", blocker / "reports")


# ---------------------------------------------------------------- issue 11.18: readability
def test_report_shows_the_split_facts_and_the_rejected_images(leaves):
    _, _, data_dir, _ = leaves
    db = data_dir / "warehouse.duckdb"
    s = warehouse.read_table(db, "split_summary", dataset=DATASET).iloc[0]
    text = report_html(data_dir)
    split = text[text.index("<h3>Split</h3>"):][:2500]
    assert f"mode <strong>{s['mode']}</strong>, seed 0" in split
    assert (f"test fraction requested {100 * s['requested_test_fraction']:.1f} %, realised "
            f"{100 * s['realised_test_fraction']:.1f} % ({s['n_train']} train / {s['n_test']} test images)") in split
    assert "cross-split near-duplicate pairs: " in split
    assert "images rejected at ingest: 1 (duplicate_image: 1" in split


def test_report_without_a_split_summary_table_still_renders_and_says_so(leaves, tmp_path):
    _, _, data_dir, _ = leaves
    db = tmp_path / "warehouse.duckdb"
    shutil.copy(data_dir / "warehouse.duckdb", db)
    with duckdb.connect(str(db)) as con:
        con.execute("DROP TABLE split_summary")
    report = run_comparison(DATASET, LEVELS, db, tmp_path / "reports")
    assert "no split summary recorded" in report.html.read_text(encoding="utf-8")


def test_report_tables_have_no_index_column_and_auc_tables_appear_once(leaves):
    _, _, data_dir, _ = leaves
    text = report_html(data_dir)
    assert "<th></th>" not in text and not re.search(r"<th>\d+</th>", text)
    assert text.count('<div class="table-wrap">') == text.count("<table")
    headings = re.findall(r"<h2>([^<]*AUC[^<]*)</h2>", text)
    assert headings == ["probe AUC difference: rp_genus vs rp"]


def test_confusion_rows_carry_their_counts(leaves):
    _, _, data_dir, _ = leaves
    svg = (data_dir / "reports" / DATASET / "confusion_species.svg").read_text(encoding="utf-8")
    n_test = warehouse.query(data_dir / "warehouse.duckdb",
                             "SELECT label, count(*) AS n FROM splits WHERE dataset = ? AND split = 'test' "
                             "GROUP BY label", [DATASET]).set_index("label")["n"]
    for label, n in n_test.items():
        assert f"{label} (n={n})" in svg


# ---------------------------------------------------------------- issue 11.21: what a number means
def test_every_accuracy_table_of_the_report_has_the_majority_and_chance_rows(leaves):
    _, _, data_dir, _ = leaves
    text = report_html(data_dir)
    for level in LEVELS:
        section = text[text.index(f"<h3>Ranking — {level}</h3>"):][:4000]
        assert "<td>majority-class baseline</td>" in section and "<td>chance (1 / classes)</td>" in section
    probe = text[text.index("<h2>linear probe"):][:4000]
    assert "<td>majority-class baseline</td>" in probe
    baselines = class_baselines(split_labels(data_dir / "warehouse.duckdb", DATASET)).set_index(["level", "grp"])
    assert f"{100 * baselines.loc[('species', 'all'), 'majority']:.1f} %" in probe


def test_report_states_the_per_group_rows_it_leaves_out(leaves):
    _, _, data_dir, _ = leaves
    text = " ".join(report_html(data_dir).split())
    assert "per-group rows left out</strong> for pond (its training images are all &#x27;betula_nigra&#x27;)" in text
    m = warehouse.read_table(data_dir / "warehouse.duckdb", "metrics", dataset=DATASET)
    assert "pond" not in set(m["grp"])  # and the evaluation did leave them out


def test_report_embeds_the_umap_grids_and_svgs_sit_beside_every_png(leaves):
    _, _, data_dir, _ = leaves
    text = report_html(data_dir)
    assert "<h2>Embedding maps (UMAP)</h2>" in text
    for model in MODELS:
        for level in LEVELS:
            assert f"<figcaption>UMAP of {model} coloured by {level}</figcaption>" in text
    pngs = list((data_dir / "reports" / DATASET).rglob("*.png"))
    assert len(pngs) >= 2 * 2 + 2 + 1 + 4  # k-NN ×2 per level, confusion per level, speed, 4 maps
    assert all(p.with_suffix(".svg").exists() for p in pngs)


def test_ui_metadata_previews_every_levels_charts(leaves):
    _, _, _, instance = leaves
    charts = latest_metadata(instance, "model_comparison")["charts"].value
    sections = dict(part.split("\n", 1) for part in charts.split("#### ")[1:])
    assert set(sections) == {*LEVELS, "embedding speed"}
    for level in LEVELS:  # k-NN cosine, k-NN Euclidean, confusion
        assert sections[level].count("data:image/png;base64,") == 3


def test_a_note_explains_where_the_mean_rule_collapses():
    # One broad class (two opposite directions, 20 training images) beside one compact class
    # (5 at 60°): top-1 finds the broad class's own images, the mean rule prefers the compact one.
    angles = np.r_[np.zeros(10), np.full(10, np.pi), np.full(5, np.pi / 3),
                   np.zeros(4), np.full(4, np.pi), np.full(2, np.pi / 3)] + np.linspace(0, 0.05, 35)
    vectors = np.c_[np.cos(angles), np.sin(angles)].astype(np.float32)
    family = ["broad"] * 20 + ["compact"] * 5 + ["broad"] * 8 + ["compact"] * 2
    frame = pd.DataFrame({"image_id": [f"i{i}" for i in range(35)], "split": ["train"] * 25 + ["test"] * 10,
                          "fold": 0, "group": None, "family": family})
    tables = knn_tables(frame, vectors, ["family"])
    metrics = tables.frames()[0].assign(dataset="d", model="m")
    labels = frame.assign(level="family", label=frame["family"], grp=None)[
        ["image_id", "split", "grp", "level", "label"]]
    notes = reading_notes(metrics, class_baselines(labels))
    top1 = metrics.set_index("metric").loc["top1_cosine", "value"]
    mean = metrics.set_index("metric").loc["mean_cosine", "value"]
    assert top1 - mean >= 0.15
    assert any("family: the mean rules score far below top-1" in n and "compact classes win" in n for n in notes)


def test_a_note_says_when_every_model_is_near_the_majority_class():
    rng = np.random.default_rng(3)
    labels_ = np.array(["common"] * 45 + ["rare"] * 5 + ["common"] * 18 + ["rare"] * 2)
    frame = pd.DataFrame({"image_id": [f"i{i}" for i in range(70)], "split": ["train"] * 50 + ["test"] * 20,
                          "fold": 0, "group": None, "label": labels_})
    tables = knn_tables(frame, rng.normal(size=(70, 16)).astype(np.float32), ["label"])
    metrics = tables.frames()[0].assign(dataset="d", model="m")
    labels = frame.assign(level="label", grp=None)[["image_id", "split", "grp", "level", "label"]]
    notes = reading_notes(metrics, class_baselines(labels))
    assert any("every model is within 10 points of the majority-class baseline" in n and "90.0 %" in n for n in notes)
