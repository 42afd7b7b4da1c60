"""Dump the result tables sorted, without provenance columns, to compare two runs bit for bit.

    python scripts/dump_results.py data/warehouse.duckdb /tmp/before      # writes one Parquet per table
    python scripts/dump_results.py --compare /tmp/before /tmp/after       # exit 1 on any difference

Floats are compared exactly (no tolerance): the redesign promised identical numbers.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import duckdb
import pandas as pd

TABLES = ("metrics", "per_class_metrics", "predictions")
# Columns that say when and by what a row was made, not what it is.
PROVENANCE = {"run_id", "created_at", "stage_run_id", "embedding_fingerprint", "stage_seed"}


def dump(warehouse: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(warehouse), read_only=True)
    try:
        for table in TABLES:
            frame = con.execute(f"SELECT * FROM {table}").df()
            frame = frame[[c for c in frame.columns if c not in PROVENANCE]]
            frame = frame[sorted(frame.columns)]
            frame = frame.sort_values(list(frame.columns), na_position="first", kind="mergesort")
            frame.reset_index(drop=True).to_parquet(out / f"{table}.parquet", index=False)
            print(f"{table}: {len(frame)} rows, columns {list(frame.columns)}")
    finally:
        con.close()


def compare(a: Path, b: Path) -> bool:
    same = True
    for table in TABLES:
        left, right = pd.read_parquet(a / f"{table}.parquet"), pd.read_parquet(b / f"{table}.parquet")
        common = [c for c in left.columns if c in right.columns]
        extra = sorted(set(left.columns) ^ set(right.columns))
        def ordered(frame):  # sorted on the shared columns only: a new column must not reorder rows
            return frame[common].sort_values(common, na_position="first", kind="mergesort").reset_index(drop=True)

        try:
            pd.testing.assert_frame_equal(ordered(left), ordered(right), check_exact=True, check_dtype=False)
            print(f"{table}: identical, {len(left)} rows" + (f" (columns only on one side: {extra})" if extra else ""))
        except AssertionError as exc:
            same = False
            print(f"{table}: DIFFERENT ({len(left)} vs {len(right)} rows)\n{exc}")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", action="store_true")
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    if args.compare:
        return 0 if compare(args.first, args.second) else 1
    dump(args.first, args.second)
    return 0


if __name__ == "__main__":
    sys.exit(main())
