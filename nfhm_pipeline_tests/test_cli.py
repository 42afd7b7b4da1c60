"""The `nfhm` command as a user meets it: `init` on their own images, `demo`, `results`, `sql`.

One tiny image folder is turned into a catalog by `nfhm init` and run through `nfhm demo` once per
module (a real subprocess, a real DAGSTER_HOME, a real DuckDB warehouse and Parquet lake, the
project's raw-pixels and tiny-clip models). The other tests read that warehouse, or start their
own short runs: an interrupted demo, two instances created at once, `--only knn` after a re-split.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from helpers import clustered_split, subprocess_env, write_results, write_split
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.cli import main as nfhm
from nfhm_pipeline.store import provenance, warehouse

CLASSES = ("red_fox", "grey_wolf", "brown_bear")
DATASET = "animals"


def write_folder(root: Path, per_class: int = 6) -> Path:
    """``root/<class>/<i>.png``: 16×16 noise tinted by class, so the classes are separable."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.random.default_rng(100 * c + i).integers(0, 60, (16, 16, 3), dtype=np.uint8)
            pixels[..., c] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def cli_env(data_dir: Path, dagster_home: Path, **extra) -> dict:
    return subprocess_env(**{"NFHM_DATA_DIR": str(data_dir), "DAGSTER_HOME": str(dagster_home), "NFHM_DEVICE": "cpu",
                             "NFHM_LOADER_WORKERS": "0", "PYTHONUNBUFFERED": "1", **extra})


def run_cli(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nfhm_pipeline.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`nfhm init --folder` then `nfhm demo` on the catalog it wrote. Yields (root, catalog, data, env, demo)."""
    root = tmp_path_factory.mktemp("cli")
    folder = write_folder(root / "my images")
    catalog = root / "animals.yaml"
    env = cli_env(root / "data", root / "dagster_home")
    init = run_cli(["init", "--folder", str(folder), "--name", DATASET, "--out", str(catalog)], env)
    assert init.returncode == 0, init.stderr
    done = run_cli(["demo"], {**env, "NFHM_CATALOG": str(catalog)})
    assert done.returncode == 0, done.stdout + done.stderr
    yield root, catalog, root / "data", env, done


@pytest.fixture
def in_data_dir(demo, monkeypatch):
    """Point the in-process CLI at the module demo's data folder."""
    monkeypatch.setenv("NFHM_DATA_DIR", str(demo[2]))
    monkeypatch.setenv("NFHM_CATALOG", str(demo[1]))
    return demo[2]


# -- nfhm init (issue 11 item 20) --------------------------------------------------------------------

def test_init_on_a_folder_writes_a_catalog_that_loads_and_demo_runs(demo):
    root, catalog_path, data, env, done = demo
    catalog = load_catalog(catalog_path)
    spec = catalog.datasets[DATASET]
    assert spec.reader == "image_folder" and spec.labels == ("label",)
    assert Path(spec.params["root"]) == (root / "my images").resolve()
    # The default models come by reference from the demo catalog, with the demo's own settings.
    assert sorted(catalog.models) == ["raw-pixels", "tiny-clip"]
    assert catalog.models["tiny-clip"] == load_catalog("demo").models["tiny-clip"]
    assert "{from: demo}" in catalog_path.read_text(encoding="utf-8")
    labels = warehouse.query(data / "warehouse.duckdb", "SELECT DISTINCT label FROM images ORDER BY label")
    assert labels["label"].tolist() == ["brown bear", "grey wolf", "red fox"]  # underscores read as spaces
    assert "ok      animals/[tiny-clip]" in done.stdout


def test_init_says_how_to_run_the_catalog(tmp_path):
    folder = write_folder(tmp_path / "imgs", per_class=2)
    out = run_cli(["init", "--folder", str(folder), "--out", str(tmp_path / "mine.yaml")],
                  cli_env(tmp_path / "d", tmp_path / "h"), timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"NFHM_CATALOG={tmp_path / 'mine.yaml'} nfhm demo" in out.stdout
    assert "3 classes" in out.stdout and "'imgs'" in out.stdout


def test_init_refuses_to_overwrite_a_catalog(tmp_path, capsys):
    folder = write_folder(tmp_path / "imgs", per_class=2)
    out = tmp_path / "mine.yaml"
    out.write_text("keep me", encoding="utf-8")
    assert nfhm(["init", "--folder", str(folder), "--out", str(out)]) == 2
    assert "exists already" in capsys.readouterr().err and out.read_text(encoding="utf-8") == "keep me"
    assert nfhm(["init", "--folder", str(folder), "--out", str(out), "--force"]) == 0
    assert load_catalog(out).datasets["imgs"].reader == "image_folder"


def write_csv_collection(root: Path, text: str) -> Path:
    for i in range(12):
        pixels = np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / "img" / f"{i}.png")
    csv = root / "labels.csv"
    csv.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return csv


SEMICOLON_CSV = """
    Index;image;specie;genus;video_name;photographer
    0;img/0.png;Danaus plexippus;Danaus;v1;ann
    1;img/1.png;Danaus plexippus;Danaus;v1;bob
    2;img/2.png;Danaus plexippus;Danaus;v2;ann
    3;img/3.png;Danaus gilippus;Danaus;v3;bob
    4;img/4.png;Danaus gilippus;Danaus;v3;ann
    5;img/5.png;Danaus gilippus;Danaus;v4;bob
    6;img/6.png;Vanessa atalanta;Vanessa;v5;ann
    7;img/7.png;Vanessa atalanta;Vanessa;v5;bob
    8;img/8.png;Vanessa atalanta;Vanessa;v6;ann
    9;img/9.png;Vanessa cardui;Vanessa;v7;bob
    10;img/10.png;Vanessa cardui;Vanessa;v7;ann
    11;img/11.png;Vanessa cardui;Vanessa;v8;ann
    """


def test_init_on_a_csv_sniffs_the_delimiter_and_finds_the_label_levels(tmp_path, capsys):
    from nfhm_pipeline.ingest.manifest import build_manifest

    csv = write_csv_collection(tmp_path / "butterflies", SEMICOLON_CSV)
    out = tmp_path / "b.yaml"
    assert nfhm(["init", "--csv", str(csv), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    spec = load_catalog(out).datasets["labels"]
    assert spec.reader == "label_csv" and spec.params["delimiter"] == ";"
    assert spec.params["path_column"] == "image"
    # species then genus (one genus per species); the index, the video and the photographer are not levels
    assert spec.labels == ("specie", "genus")
    assert "video_name" in printed and "group_by: video_name" in out.read_text(encoding="utf-8")
    assert "photographer" in printed  # said why it was not taken
    manifest = build_manifest(spec, tmp_path / "sources").manifest
    assert len(manifest) == 12 and sorted(manifest["genus"].unique()) == ["Danaus", "Vanessa"]


def test_init_on_a_csv_takes_the_columns_it_is_told(tmp_path):
    csv = write_csv_collection(tmp_path / "c", SEMICOLON_CSV)
    out = tmp_path / "c.yaml"
    assert nfhm(["init", "--csv", str(csv), "--out", str(out), "--labels", "genus", "--path-column", "image",
                 "--name", "bflies", "--models-from", "shared"]) == 0
    catalog = load_catalog(out)
    assert catalog.datasets["bflies"].labels == ("genus",)
    assert set(catalog.models) == set(load_catalog("shared").models)  # include_models: every model of it


@pytest.mark.parametrize("args, says", [
    (["--labels", "species"], "--labels names column(s) ['species']"),
    (["--path-column", "file"], "--path-column 'file' is not a column"),
])
def test_init_on_a_csv_names_a_column_it_lacks(tmp_path, capsys, args, says):
    csv = write_csv_collection(tmp_path / "c", SEMICOLON_CSV)
    assert nfhm(["init", "--csv", str(csv), "--out", str(tmp_path / "x.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nfhm: ") and says in err and not (tmp_path / "x.yaml").exists()


def test_init_on_a_csv_without_image_paths_asks_for_the_path_column(tmp_path, capsys):
    csv = tmp_path / "l.csv"
    csv.write_text("name,species\na,x\nb,x\nc,y\nd,y\n", encoding="utf-8")
    assert nfhm(["init", "--csv", str(csv), "--out", str(tmp_path / "x.yaml")]) == 2
    assert "--path-column" in capsys.readouterr().err


# -- nfhm results (issue 11 items 21 and 4) -----------------------------------------------------------

def test_results_rank_models_per_level_with_readable_columns(in_data_dir, capsys):
    assert nfhm(["results"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == f"== {DATASET} =="
    assert lines[1] == "label (ranked by kNN top-1 cos):"
    header = lines[2]
    for column in ("rank", "model", "kNN top-1 cos", "kNN mean cos", "kNN F1", "SVC CV acc ± std", "SVC test F1",
                   "zero-shot top-1"):
        assert column in header
    metrics = provenance.current_rows(in_data_dir / "warehouse.duckdb", "metrics", DATASET)
    top1 = metrics[(metrics["task"] == "knn") & (metrics["metric"] == "top1_cosine") & (metrics["grp"] == "all")]
    expected = top1.sort_values(["value", "model"], ascending=[False, True])["model"].tolist()
    ranked = [line.split()[1] for line in lines[3:3 + len(expected)]]
    assert ranked == expected
    ranks = [line.split()[0] for line in lines[3:3 + len(expected)]]
    assert [r.rstrip("=") for r in ranks] == ["1", "2"]
    # '=' marks exactly the models the paired comparison finds tied with the best
    differences = warehouse.read_table(in_data_dir / "warehouse.duckdb", "model_differences", dataset=DATASET)
    tied = differences[(differences["task"] == "knn") & (differences["metric"] == "top1_cosine")
                       & (differences["grp"] == "all") & (differences["level"] == "label")
                       & (differences["p_holm"] >= 0.05)]
    assert {m for m, r in zip(ranked, ranks) if r.endswith("=")} == set(tied["model_b"])
    assert "[" in lines[3] and "]" in lines[3]  # value [low, high]
    first = top1.set_index("model")["value"][expected[0]] * 100
    assert f"{first:.1f}" in lines[3]
    assert " ± " in lines[3]  # the probe's CV spread


def test_results_show_one_dataset_unless_asked(tmp_path, monkeypatch, capsys):
    import datetime as dt

    from nfhm_pipeline.evaluation.tables import knn_tables

    db = tmp_path / "warehouse.duckdb"
    # k-NN rows computed and stored as the knn_metrics asset does, the older dataset a month earlier
    for seed, (ds, when) in enumerate((("older", dt.datetime(2024, 1, 1)), ("newer", dt.datetime(2024, 2, 1)))):
        frame, vectors, split_id = clustered_split(seed)
        write_split(db, ds, frame, split_id)
        write_results(db, ds, "m", knn_tables(frame, vectors, ["species"], device="cpu"), split_id=split_id,
                      created_at=when)
    monkeypatch.setenv("NFHM_DATA_DIR", str(tmp_path))
    assert nfhm(["results"]) == 0
    out = capsys.readouterr().out
    assert "== newer ==" in out and "== older ==" not in out and "--all" in out
    assert nfhm(["results", "--all"]) == 0
    out = capsys.readouterr().out
    assert "== newer ==" in out and "== older ==" in out
    assert nfhm(["results", "--dataset", "older"]) == 0
    assert "== newer ==" not in capsys.readouterr().out
    assert nfhm(["results", "--dataset", "nope"]) == 2
    assert "no results for dataset 'nope'" in capsys.readouterr().err


def test_only_knn_after_a_resplit_shows_current_rows_and_names_stale_models(demo, tmp_path):
    root, catalog_path, data, env, _ = demo
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    resplit = tmp_path / "animals.yaml"
    resplit.write_text(catalog_path.read_text(encoding="utf-8").replace("seed: 0", "seed: 1"), encoding="utf-8")
    home = tmp_path / "home"
    env = cli_env(copy, home, NFHM_CATALOG=str(resplit))
    done = run_cli(["demo", "--only", "knn", "--model", "raw-pixels"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    db = copy / "warehouse.duckdb"
    split_id = provenance.current_split_id(db, DATASET)
    assert split_id.startswith("seed1-")
    new = warehouse.query(db, "SELECT DISTINCT model, task FROM metrics WHERE split_id = ?", [split_id])
    assert new.to_dict("records") == [{"model": "raw-pixels", "task": "knn"}]  # no probe, zero-shot
    import dagster as dg

    stages = ("image_manifest", "splits", "image_embeddings", "knn_metrics", "text_embeddings",
              "linear_probe_metrics", "zero_shot_metrics", "embedding_maps", "model_comparison")
    with dg.DagsterInstance.from_config(str(home)) as instance:
        ran = {s for s in stages if instance.get_latest_materialization_event(dg.AssetKey([DATASET, s]))}
    assert ran == {"image_manifest", "splits", "image_embeddings", "knn_metrics"}  # no maps, no comparison
    assert "model_comparison" not in done.stdout
    # The results after the run: raw-pixels' kNN only (its probe rows are of the old split), and the
    # models to re-run named with what is stale.
    out = run_cli(["results"], env).stdout
    table, _, note = out.partition("not shown")
    assert "raw-pixels" in table and "tiny-clip" not in table and "SVC" not in table
    assert "earlier split" in note and "tiny-clip (knn, " in note and "raw-pixels (linear_probe" in note
    assert f"nfhm demo --dataset {DATASET} --model raw-pixels --model tiny-clip" in out
    assert provenance.stale_models(db, DATASET) == ["raw-pixels", "tiny-clip"]



def test_results_marks_ties_by_the_one_rule_standing_against_best(in_data_dir, capsys):
    """On the demo's warehouse, the ranks `nfhm results` prints ('1', '2=' for a model tied with the
    best) are those reports.summary.standing_against_best gives for each block's ranking column."""
    import re

    from nfhm_pipeline.cli import RESULT_COLUMNS
    from nfhm_pipeline.reports.summary import BEST, TIED, standing_against_best

    db = in_data_dir / "warehouse.duckdb"
    assert nfhm(["results"]) == 0
    out = capsys.readouterr().out
    differences = warehouse.read_table(db, "model_differences", dataset=DATASET)
    differences = differences[differences["split_id"] == provenance.current_split_id(db, DATASET)]
    blocks = re.findall(r"^(\S+) \(ranked by (.+)\):\n(.+(?:\n(?!\n).+)*)", out, flags=re.M)
    assert blocks, out
    compared = 0
    for level, heading, table in blocks:
        task, metric = next((t, m) for t, m, h in RESULT_COLUMNS if h == heading)
        standing = standing_against_best(differences, level=level, task=task, metric=metric)
        lines = table.splitlines()[1:]  # under the header: one line per model, the rank right-aligned
        ranks = {line.split()[1]: line.split()[0] for line in lines}
        assert len(ranks) >= 2 and [r.rstrip("=") for r in ranks.values()] == [str(i) for i in range(1, len(ranks) + 1)]
        assert {m for m, r in ranks.items() if r.endswith("=")} == set(standing.index[standing["standing"] == TIED])
        if len(standing):
            compared += 1
            best = standing.index[standing["standing"] == BEST][0]
            assert ranks[best] == "1" and set(standing.index) == set(ranks)
        assert all(re.search(r"\d\.\d \[\d+\.\d, \d+\.\d\]", line) for line in lines)  # value [low, high]
    assert compared, "no block's ranking column was compared: the test would check nothing"


# -- nfhm demo: selections that would run nothing (issue 16 items 9 and 11) --------------------------

def test_demo_with_a_misspelt_model_refuses_and_prints_no_results(in_data_dir, capsys):
    assert nfhm(["demo", "--model", "raw-pixel"]) == 2
    captured = capsys.readouterr()
    assert "unknown model 'raw-pixel'; known: ['raw-pixels', 'tiny-clip']" in captured.err
    assert "kNN top-1" not in captured.out and "ok " not in captured.out


def test_demo_with_a_misspelt_dataset_is_a_sentence_without_traceback(demo):
    root, catalog, data, env, _ = demo
    out = run_cli(["demo", "--dataset", "animal"], {**env, "NFHM_CATALOG": str(catalog)}, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("nfhm: unknown dataset 'animal'; known: ['animals']")
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("argv, says", [
    (["demo", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["demo", "--model", "nope", "--model", "raw-pixels"], "unknown model 'nope'"),
    (["demo", "--only", "everything"], "invalid choice: 'everything'"),
    (["demo", "--catalog", "/no/such/catalog.yaml"], "/no/such/catalog.yaml"),
    (["sql", "--max-rows", "-1", "SELECT 1"], "--max-rows must be 0 (every row) or a positive number"),
    (["sql", "--max-rows", "many", "SELECT 1"], "invalid int value: 'many'"),
    (["sql", "SELEC 1"], "query failed: Parser Error"),
    (["sql", "SELECT * FROM no_such_table"], "query failed"),
    (["results", "--dataset", "nope"], "no results for dataset 'nope'"),
    (["init", "--folder", "/no/such/folder"], "not a folder"),
    (["init"], "one of the arguments --folder --csv is required"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_every_cli_error_is_one_nfhm_sentence(in_data_dir, capsys, argv, says):
    assert nfhm(argv) == 2  # an exception escaping main() would fail the test with its traceback
    err = capsys.readouterr().err
    assert err.startswith("nfhm: ") and says in err and "Traceback" not in err


def test_sql_negative_max_rows_through_the_real_command(demo):
    root, catalog, data, env, _ = demo
    out = run_cli(["sql", "--max-rows", "-1", "SELECT 1"], env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("nfhm: --max-rows must be 0")


# -- nfhm sql: reads, never writes (issue 11 item 11) ------------------------------------------------

def test_sql_reads_the_warehouse_and_the_lake(in_data_dir, capsys):
    assert nfhm(["sql", "--csv", "SELECT model, count(*) AS n, any_value(len(embedding)) AS dim "
                                 "FROM embeddings GROUP BY model ORDER BY model"]) == 0
    assert capsys.readouterr().out.split() == ["model,n,dim", "raw-pixels,18,768", "tiny-clip,18,32"]
    assert nfhm(["sql", "SELECT count(*) AS n FROM images; SELECT count(*) AS n FROM metrics WHERE task = 'knn'"]) == 0
    assert int(capsys.readouterr().out.split()[1]) > 0
    assert nfhm(["sql", "SHOW TABLES"]) == 0 and "metrics" in capsys.readouterr().out
    assert nfhm(["sql", "--max-rows", "2", "SELECT * FROM range(5)"]) == 0
    assert "3 more row(s)" in capsys.readouterr().out


@pytest.fixture
def other_db(tmp_path):
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE t (a INTEGER)")
    return path


def refused_statements(tmp_path: Path, other_db: Path, lake: Path) -> dict[str, str]:
    return {
        "copy_to_file": f"COPY (SELECT 1 AS a) TO '{tmp_path / 'out.csv'}'",
        "copy_into_the_lake": f"COPY (SELECT 1 AS a) TO '{lake / 'planted.parquet'}' (FORMAT parquet)",
        "copy_from_file": f"COPY metrics FROM '{tmp_path / 'out.csv'}'",
        "attach_and_insert": f"ATTACH '{other_db}' AS n (READ_WRITE); INSERT INTO n.t VALUES (1)",
        "attach_read_only": f"ATTACH '{other_db}' AS n (READ_ONLY)",
        "export_database": f"EXPORT DATABASE '{tmp_path / 'export'}'",
        "install_extension": "INSTALL httpfs",
        "load_extension": "LOAD httpfs",
        "set": "SET enable_external_access = true",
        "reset": "RESET lock_configuration",
        "pragma_assignment": "PRAGMA threads = 1",
        "use": "USE memory",
        "read_any_file": "SELECT * FROM read_csv('/etc/passwd')",
        "read_any_file_in_a_select": "SELECT count(*) FROM read_text('/etc/hostname')",
        "glob_the_disk": "SELECT * FROM glob('/etc/*')",
        "create_table": "CREATE TABLE planted AS SELECT 1 AS a",
        "create_temp_table": "CREATE TEMP TABLE planted AS SELECT 1 AS a",
        "insert": "INSERT INTO metrics (dataset, model, task, metric) VALUES ('x', 'y', 'z', 'w')",
        "delete": "DELETE FROM metrics",
        "drop": "DROP TABLE metrics",
        "create_secret": "CREATE SECRET (TYPE s3, KEY_ID 'k', SECRET 's')",
        "hidden_after_a_select": f"SELECT 1; COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'",
        "transaction": "BEGIN TRANSACTION",
    }


STATEMENT_KINDS = list(refused_statements(Path("/t"), Path("/t/o"), Path("/t/l")))


@pytest.mark.parametrize("kind", STATEMENT_KINDS)
def test_sql_refuses_every_statement_that_writes_or_reaches_outside(in_data_dir, tmp_path, other_db, capsys, kind):
    db = in_data_dir / "warehouse.duckdb"
    lake = in_data_dir / "lake" / "embeddings" / f"dataset={DATASET}" / "model=raw-pixels"
    before_lake = sorted(p.name for p in lake.iterdir())
    before_metrics = len(warehouse.read_table(db, "metrics"))
    statement = refused_statements(tmp_path, other_db, lake)[kind]
    assert nfhm(["sql", statement]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nfhm: query failed") and "nfhm sql" in err and "Traceback" not in err
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "export").exists()
    assert sorted(p.name for p in lake.iterdir()) == before_lake
    assert len(warehouse.read_table(db, "metrics")) == before_metrics
    with duckdb.connect(str(other_db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_every_readme_query_runs_through_nfhm_sql(in_data_dir, capsys):
    import re

    queries = re.findall(r"```sql\n(.*?)```", (REPO_ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    assert len(queries) >= 10
    for sql in queries:  # PIVOT included: DuckDB parses it as a MULTI statement
        assert nfhm(["sql", "--csv", sql]) == 0, (sql, capsys.readouterr().err)


def test_sql_csv_export_is_the_way_to_keep_a_result(in_data_dir, capsys):
    assert nfhm(["sql", "--csv", "SELECT DISTINCT model FROM metrics ORDER BY model"]) == 0
    assert capsys.readouterr().out.splitlines() == ["model", "raw-pixels", "tiny-clip"]


# -- the Dagster instance: two commands at once on a fresh DAGSTER_HOME (issue 11 item 13) -----------

OPEN_INSTANCE_TOGETHER = """
import sys, time
from pathlib import Path
import dagster
from nfhm_pipeline.cli import open_instance
barrier, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
(barrier / me).touch()
while len(list(barrier.iterdir())) < n:  # every process leaves the barrier together, imports done
    time.sleep(0.001)
with open_instance() as instance:
    instance.get_runs(limit=1)
print("opened", flush=True)
"""


def test_instances_created_at_once_on_a_fresh_dagster_home_all_open(tmp_path):
    home, barrier, n = tmp_path / "fresh_home", tmp_path / "barrier", 6  # 6 at once fail without the lock
    barrier.mkdir()
    env = cli_env(tmp_path / "data", home)
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_INSTANCE_TOGETHER, str(barrier), str(i), str(n)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0 and out.strip() == "opened", err[-3000:]
    assert (home / "history" / "runs.db").exists()


def test_an_unusable_dagster_home_is_a_sentence(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder", encoding="utf-8")
    monkeypatch.setenv("DAGSTER_HOME", str(blocker / "home"))
    monkeypatch.setenv("NFHM_DATA_DIR", str(tmp_path / "data"))
    folder = write_folder(tmp_path / "imgs", per_class=2)
    assert nfhm(["init", "--folder", str(folder), "--out", str(tmp_path / "c.yaml")]) == 0
    capsys.readouterr()
    assert nfhm(["demo", "--catalog", str(tmp_path / "c.yaml")]) == 2
    assert "DAGSTER_HOME" in capsys.readouterr().err


# -- an interrupt stops the whole command (issue 11 item 17) ------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_demo_stops_it_and_says_what_finished(demo, tmp_path, signum):
    root, catalog, _, _, _ = demo
    env = cli_env(tmp_path / "data", tmp_path / "home", NFHM_CATALOG=str(catalog))
    proc = subprocess.Popen([sys.executable, "-m", "nfhm_pipeline.cli", "demo"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stdout:  # the first run's line: the next run (raw-pixels) is starting
            seen.append(line)
            if f"ok      {DATASET}/manifest+splits" in line:
                break
        assert seen and "manifest+splits" in seen[-1], "".join(seen) + proc.stderr.read()
        proc.send_signal(signum)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.monotonic() - sent < 30  # promptly, not after the remaining models
    assert proc.returncode == 130, out + err
    assert f"nfhm: interrupted" in err and f"finished: {DATASET}/manifest+splits" in err
    # The signal lands in the raw-pixels run or just before it: either way nothing after it starts.
    not_started = next(line for line in err.splitlines() if "not started:" in line)
    assert not_started.endswith(f"{DATASET}/[tiny-clip], {DATASET}/model_comparison")
    assert "tiny-clip]" not in out and "model_comparison" not in out and "Traceback" not in err
    done = warehouse.query(tmp_path / "data" / "warehouse.duckdb", "SELECT DISTINCT model FROM metrics")
    assert "tiny-clip" not in done["model"].tolist()
