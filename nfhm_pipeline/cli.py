"""The ``nfhm`` command: verbs a researcher wants.

    nfhm demo                 materialize every asset of the catalog, print the results
    nfhm results [--dataset]  print the nearest-neighbour / probe / zero-shot table
    nfhm sql "SELECT ..."     read-only SQL on the warehouse (--csv for CSV)
    nfhm models | catalogs    list the catalog's models / the shipped catalogs
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nfhm_pipeline.errors import NfhmError


def _data_dir() -> Path:
    from nfhm_pipeline.resources import default_data_dir

    return Path(default_data_dir())


def _instance():
    import dagster as dg

    home = os.environ.get("DAGSTER_HOME")
    if home:
        Path(home).mkdir(parents=True, exist_ok=True)
        return dg.DagsterInstance.get()
    return dg.DagsterInstance.ephemeral()


def cmd_demo(args) -> int:
    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.runner import materialize_catalog

    catalog = load_catalog(args.catalog)
    print(f"catalog {catalog.name} ({catalog.path}); data in {_data_dir()}")
    with _instance() as instance:
        outcome = materialize_catalog(catalog, instance=instance, datasets=args.dataset or None,
                                      models=args.model or None)
    print()
    print_results(_data_dir() / "warehouse.duckdb", args.dataset)
    if not outcome.ok:
        print(f"\n{len(outcome.failed)} run(s) failed:", file=sys.stderr)
        for label, message in outcome.failed.items():
            print(f"  {label}: {message}", file=sys.stderr)
        return 1
    return 0


def print_results(warehouse_path: Path, datasets=None) -> None:
    from nfhm_pipeline.store import warehouse

    metrics = warehouse.read_table(warehouse_path, "metrics")
    if metrics.empty:
        print("no metrics yet: run `nfhm demo` (or materialize the metric assets in the UI)")
        return
    if datasets:
        metrics = metrics[metrics["dataset"].isin(datasets)]
    wanted = {
        "knn": ["top1_cosine", "mean_cosine", "top1_euclidean", "mean_euclidean"],
        "linear_probe": ["cv_accuracy", "test_accuracy"],
        "zero_shot": ["top1_ensemble"],
    }
    rows = metrics[(metrics["grp"] == "all") & metrics.apply(lambda r: r["metric"] in wanted.get(r["task"], []), axis=1)]
    if rows.empty:
        print("no headline metrics yet")
        return
    rows = rows.assign(column=rows["task"].str.replace("linear_probe", "svc").str.replace("zero_shot", "zs")
                       + ":" + rows["metric"], pct=rows["value"] * 100)
    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.1f}".format):
        for ds, part in rows.groupby("dataset"):
            table = part.pivot_table(index=["level", "model"], columns="column", values="pct")
            print(f"== {ds}: accuracy (%) on the shared test split, grp=all ==")
            print(table.to_string())
            print()


def cmd_results(args) -> int:
    print_results(_data_dir() / "warehouse.duckdb", args.dataset)
    return 0


def cmd_sql(args) -> int:
    from nfhm_pipeline.store import warehouse

    frame = warehouse.query(_data_dir() / "warehouse.duckdb", args.query)
    if args.csv:
        frame.to_csv(sys.stdout, index=False)
    else:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 50, "display.max_rows", args.max_rows):
            print(frame.to_string(index=False) if len(frame) else "(no rows)")
    return 0


def cmd_models(args) -> int:
    from nfhm_pipeline.catalog import load_catalog

    catalog = load_catalog(args.catalog)
    for m in catalog.models.values():
        ident = m.params.get("model") or m.params.get("weights") or ""
        print(f"{m.key:28s} {m.loader:13s} {ident}  {m.description}")
    return 0


def cmd_catalogs(args) -> int:
    from nfhm_pipeline.catalog import available_catalogs

    print("\n".join(available_catalogs()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nfhm", description="Which embedding model understands your images?")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="materialize every asset of the catalog and print the results")
    p.add_argument("--catalog", help="catalog name or YAML path (default: $NFHM_CATALOG or demo)")
    p.add_argument("--dataset", action="append", help="only this dataset (repeatable)")
    p.add_argument("--model", action="append", help="only this model partition (repeatable)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("results", help="print the headline metrics table")
    p.add_argument("--dataset", action="append")
    p.set_defaults(func=cmd_results)
    p = sub.add_parser("sql", help="read-only SQL on the warehouse")
    p.add_argument("query")
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p.add_argument("--max-rows", type=int, default=100)
    p.set_defaults(func=cmd_sql)
    p = sub.add_parser("models", help="list the catalog's models")
    p.add_argument("--catalog")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("catalogs", help="list the shipped catalogs")
    p.set_defaults(func=cmd_catalogs)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NfhmError as exc:
        print(f"nfhm: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
