"""Every SQL query in the README runs on the demo warehouse and returns rows."""
import re

import pytest

from conftest import REPO_ROOT
from nfhm_pipeline.cli import main as nfhm
from nfhm_pipeline.store import warehouse

QUERIES = re.findall(r"```sql\n(.*?)```", (REPO_ROOT / "README.md").read_text(encoding="utf-8"), re.S)


def test_readme_has_ten_queries():
    assert len(QUERIES) >= 10


@pytest.mark.parametrize("sql", QUERIES, ids=[f"q{i}" for i in range(len(QUERIES))])
def test_readme_query_returns_rows(demo_run, sql):
    data_dir, _, _ = demo_run
    frame = warehouse.query(data_dir / "warehouse.duckdb", sql)
    if "rejected_images" in sql:
        assert list(frame.columns) == ["dataset", "reason", "images", "example"]  # the demo rejects nothing
    else:
        assert len(frame) > 0


def test_nfhm_sql_prints_a_table_and_csv(demo_run, monkeypatch, capsys):
    data_dir, _, _ = demo_run
    monkeypatch.setenv("NFHM_DATA_DIR", str(data_dir))
    assert nfhm(["sql", "SELECT dataset, count(*) AS n FROM images GROUP BY dataset ORDER BY dataset"]) == 0
    out = capsys.readouterr().out
    assert "demo_shapes" in out and "216" in out
    assert nfhm(["sql", "--csv", "SELECT 1 AS one"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ["one", "1"]


def test_nfhm_sql_refuses_writes_with_a_clear_message(demo_run, monkeypatch, capsys):
    data_dir, _, _ = demo_run
    monkeypatch.setenv("NFHM_DATA_DIR", str(data_dir))
    assert nfhm(["sql", "DROP TABLE metrics"]) == 2
    assert "nfhm: query failed" in capsys.readouterr().err
