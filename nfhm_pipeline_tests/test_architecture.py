"""The shape the redesign promised (issue 12): stages and library without Dagster, one stage in one
place callable from a notebook, provenance on every result row, names and schemas declared once."""
import ast
import dataclasses
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO_ROOT
from nfhm_pipeline.store import warehouse

PACKAGE = REPO_ROOT / "nfhm_pipeline"
# The Dagster layer: everything else is library or stage code.
DAGSTER_LAYER = {"assets", "definitions.py", "automation.py", "resources.py", "runner.py", "cli.py"}


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _library_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).parts[0]
        if top not in DAGSTER_LAYER:
            yield path


def test_no_stage_or_library_module_imports_dagster_or_the_dagster_layer():
    offenders = {}
    for path in _library_modules():
        bad = sorted(n for n in _imports(path) if n.split(".")[0] in {"dagster", "dagster_webserver"}
                     or n.startswith(("nfhm_pipeline.assets", "nfhm_pipeline.automation", "nfhm_pipeline.resources",
                                      "nfhm_pipeline.runner", "nfhm_pipeline.definitions", "nfhm_pipeline.cli")))
        if bad:
            offenders[str(path.relative_to(REPO_ROOT))] = bad
    assert offenders == {}
    assert len(list(_library_modules())) > 40  # the walk really saw the package


def test_importing_every_stage_loads_no_dagster():
    stages = sorted(p.stem for p in (PACKAGE / "stages").glob("*.py") if p.stem != "__init__")
    code = ("import sys\n" + "".join(f"import nfhm_pipeline.stages.{s}\n" for s in stages)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dagster'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "[]"



def test_what_a_ray_actor_runs_loads_no_table_library(tmp_path):
    # An embedding actor imports torch and the embedder, decodes and embeds; each fresh actor pays
    # its imports at start-up (docs/scaling.md), so pandas, pyarrow, yaml, DuckDB and Dagster stay out.
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (20, 14), (200, 30, 40)).save(image)
    image_id = __import__("hashlib").sha256(image.read_bytes()).hexdigest()
    code = f"""
import sys
from nfhm_pipeline.embedders.ray_engine import _EmbedWorker
from nfhm_pipeline.embedders.loaders import load_embedder
spec = {{"id": "raw", "loader": "raw_pixels", "image_size": 8}}
worker = _EmbedWorker(spec, "raw", load_embedder(spec).fingerprint, "cpu", "fp32", False, "d", 1)
out = worker.embed([0], [{str(image)!r}], [{image_id!r}])
assert out["error"] == "" and out["vector"].shape == (1, 192), out
print(sorted({{m.split(".")[0] for m in sys.modules}} & {{"pandas", "pyarrow", "yaml", "duckdb", "dagster", "sklearn"}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

def test_every_asset_is_one_row_of_the_stage_table_and_one_stage_module():
    from nfhm_pipeline.assets import STAGES
    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.definitions import build_definitions

    names = [s.name for s in STAGES]
    assert len(names) == len(set(names))
    modules = {p.stem for p in (PACKAGE / "stages").glob("*.py")} - {"__init__", "base"}
    assert {s.module.__name__.rsplit(".", 1)[1] for s in STAGES} == modules
    assert [p.name for p in (PACKAGE / "assets").glob("*.py")] == ["__init__.py"]
    defs = build_definitions(load_catalog("demo"))
    stages_seen = {key.path[1] for a in defs.assets for key in a.keys}
    assert stages_seen <= set(names)
    for stage in STAGES:
        assert callable(stage.module.run)


def test_pools_name_the_work():
    from nfhm_pipeline.assets import STAGES

    pools = {s.name: s.pool for s in STAGES}
    assert {name for name, pool in pools.items() if pool == "gpu"} == {
        "image_embeddings", "text_embeddings", "knn_metrics", "alignment_head"}
    assert set(pools.values()) == {"gpu", None}


def test_a_stage_runs_from_a_notebook_and_gives_the_assets_numbers(demo_run, tmp_path):
    """knn_metrics.run on a copy of the demo's data, without Dagster, writes exactly the rows the
    asset wrote (only run_id and created_at differ)."""
    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.stages import knn_metrics
    from nfhm_pipeline.stages.base import Device, Paths

    data_dir, _, _ = demo_run
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("cache", "reports"))
    catalog = load_catalog("demo")
    result = knn_metrics.run(catalog.datasets["demo_shapes"], catalog.models["raw-pixels"], Paths.under(copy),
                             Device("cpu"), run_id="notebook")
    assert result.metadata["dagster/row_count"] > 0
    where = {"dataset": "demo_shapes", "model": "raw-pixels", "task": "knn"}
    before = warehouse.read_table(data_dir / "warehouse.duckdb", "metrics", **where)
    after = warehouse.read_table(copy / "warehouse.duckdb", "metrics", **where)
    assert set(after["run_id"]) == {"notebook"}
    keys = ["level", "grp", "metric"]
    cols = keys + ["value", "std", "n", "split_id"]
    pd.testing.assert_frame_equal(before[cols].sort_values(keys).reset_index(drop=True),
                                  after[cols].sort_values(keys).reset_index(drop=True), check_exact=True)
    runs = warehouse.read_table(copy / "warehouse.duckdb", "runs", **where)
    assert list(runs["run_id"]) == ["notebook"] and list(runs["stage"]) == ["knn_metrics"]


def test_every_result_row_leads_to_its_provenance(demo_run):
    """Each metrics / per_class_metrics / predictions row joins exactly one runs row, which names
    the embedding fingerprint stored in the lake, the split it was computed on and the software."""
    data_dir, _, _ = demo_run
    db = data_dir / "warehouse.duckdb"
    for table in ("metrics", "per_class_metrics", "predictions"):
        unmatched = warehouse.query(db, f"""
            SELECT count(*) AS n FROM {table} t
            WHERE (SELECT count(*) FROM runs r WHERE r.dataset = t.dataset AND r.model = t.model
                   AND r.task = t.task AND r.run_id = t.run_id) <> 1""")
        assert int(unmatched["n"].iloc[0]) == 0, table
    runs = warehouse.read_table(db, "runs")
    evaluated = runs[runs["task"] != "zero_shot"]
    assert len(runs) and runs[["torch_version", "sklearn_version", "dagster_version", "open_clip_version",
                               "transformers_version", "project_version", "python_version", "device",
                               "device_name", "split_id"]].notna().all().all()
    assert set(runs["device"]) == {"cpu"}
    from nfhm_pipeline.store.embedding_store import EmbeddingStore

    lake = EmbeddingStore(str(data_dir / "lake"))
    with_vectors = evaluated[evaluated["embedding_fingerprint"].notna()]
    assert len(with_vectors)
    for row in with_vectors.drop_duplicates(["dataset", "model"]).itertuples():
        assert row.embedding_fingerprint == lake.read(row.dataset, row.model).fingerprint
    splits = warehouse.query(db, "SELECT DISTINCT dataset, split_id FROM splits")
    assert set(map(tuple, runs[["dataset", "split_id"]].drop_duplicates().to_numpy())) <= \
        set(map(tuple, splits.to_numpy()))
    probes = runs[runs["task"] == "linear_probe"]
    knn = runs[runs["task"] == "knn"]
    assert probes["stage_seed"].notna().all() and knn["stage_seed"].notna().all()  # knn: its bootstrap


def test_the_dataset_seed_seeds_the_probe_and_not_the_split(demo_run, tmp_path):
    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.stages import linear_probe_metrics
    from nfhm_pipeline.stages.base import Device, Paths

    data_dir, _, _ = demo_run
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy, ignore=shutil.ignore_patterns("cache", "reports"))
    spec = load_catalog("demo").datasets["demo_shapes"]
    reseeded = dataclasses.replace(spec, seed=spec.split.seed + 11)
    model = load_catalog("demo").models["raw-pixels"]
    linear_probe_metrics.run(reseeded, model, Paths.under(copy), Device("cpu"), run_id="reseeded")
    runs = warehouse.read_table(copy / "warehouse.duckdb", "runs", dataset="demo_shapes", model="raw-pixels",
                                task="linear_probe")
    assert runs["stage_seed"].tolist() == [spec.split.seed + 11] and runs["split_seed"].tolist() == [spec.split.seed]
    before = warehouse.read_table(data_dir / "warehouse.duckdb", "splits", dataset="demo_shapes")
    after = warehouse.read_table(copy / "warehouse.duckdb", "splits", dataset="demo_shapes")
    assert before["split_id"].equals(after["split_id"])  # the split did not move


def test_the_readme_provenance_query_shows_fingerprint_seed_versions_and_device(demo_run):
    import re

    data_dir, _, _ = demo_run
    queries = re.findall(r"```sql\n(.*?)```", (REPO_ROOT / "README.md").read_text(encoding="utf-8"), re.S)
    query = next(q for q in queries if "JOIN runs" in q)
    frame = warehouse.query(data_dir / "warehouse.duckdb", query)
    assert len(frame)
    for column in ("fingerprint", "split_id", "stage_seed", "torch_version", "dagster_version", "device"):
        assert frame[column].notna().all(), column


@pytest.mark.parametrize("name", ["metrics", "per_class_metrics", "predictions", "runs", "evaluation_exclusions"])
def test_result_tables_are_declared_once_in_the_schema_module(name):
    from nfhm_pipeline.store import schemas

    columns = schemas.table_columns(name)
    assert len(columns) == len(set(columns))
    if name != "runs":
        assert {"dataset", "model", "task", "run_id", "split_id"} <= set(columns)
