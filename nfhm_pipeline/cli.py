"""The ``nfhm`` command: verbs a researcher wants.

    nfhm init --folder DIR | --csv FILE   write a catalog for your own images, say how to run it
    nfhm demo [--only knn]    materialize every asset of the catalog, print the results
    nfhm results [--dataset | --all]   models ranked per label level, one dataset at a time
    nfhm sql "SELECT ..."     read-only SQL on the warehouse and the lake (--csv for CSV)
    nfhm models | catalogs    list the catalog's models / the shipped catalogs

Every error meant for a person is an :class:`NfhmError`, printed as ``nfhm: <sentence>`` (exit 2);
an interrupt prints what finished (exit 130).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

from nfhm_pipeline.errors import CatalogError, NfhmError, StorageError
from nfhm_pipeline.evaluation import names  # light: plain strings, no numpy

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by SIGINT


class UsageError(NfhmError):
    """A command-line option has a value the command cannot use."""


def _data_dir() -> Path:
    from nfhm_pipeline.resources import default_data_dir

    return Path(default_data_dir())


def _warehouse_path() -> Path:
    return _data_dir() / "warehouse.duckdb"


# -- the Dagster instance -------------------------------------------------------------------------

INSTANCE_INIT_LOCK = ".nfhm-init.lock"


@contextlib.contextmanager
def open_instance() -> Iterator["dagster.DagsterInstance"]:
    """The instance in ``$DAGSTER_HOME`` (created if needed), or an ephemeral one without it.

    Dagster creates its SQLite tables the first time an instance opens, with no lock of its own:
    two commands starting at once on a fresh DAGSTER_HOME both create them and one fails with
    ``table alembic_version already exists``. Opening is therefore serialised by a file lock;
    once open, the instances share the SQLite files as Dagster intends.
    """
    import fcntl

    import dagster as dg

    home = os.environ.get("DAGSTER_HOME")
    if not home:
        with dg.DagsterInstance.ephemeral() as instance:
            yield instance
        return
    home_path = Path(home)
    try:
        home_path.mkdir(parents=True, exist_ok=True)
        lock = open(home_path / INSTANCE_INIT_LOCK, "a")
    except OSError as exc:
        raise StorageError(f"cannot create the Dagster instance folder DAGSTER_HOME={home}: {exc.strerror}; "
                           "point DAGSTER_HOME at a writable folder") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            instance = dg.DagsterInstance.get()
        except Exception as exc:  # a broken dagster.yaml, an unreadable or corrupt SQLite file
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StorageError(f"cannot open the Dagster instance in DAGSTER_HOME={home}: {first_line}; "
                               f"check {home_path / 'dagster.yaml'} and the files beside it") from None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    with instance:
        yield instance


# -- nfhm demo --------------------------------------------------------------------------------------

def cmd_demo(args) -> int:
    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.progress import console_progress
    from nfhm_pipeline.runner import check_selection, materialize_catalog

    catalog = load_catalog(args.catalog)
    datasets, models = args.dataset or None, args.model or None
    check_selection(catalog, datasets, models)  # before anything starts: a typo runs nothing
    print(f"catalog {catalog.name} ({catalog.path}); data in {_data_dir()}")
    # Embedding stages show a bar on stderr (images done / total, images/s, time left); the
    # run's own log lines stay in the Dagster event log, the console shows one line per run.
    with open_instance() as instance, console_progress():
        outcome = materialize_catalog(catalog, instance=instance, datasets=datasets, models=models,
                                      only=args.only)
    if outcome.interrupted is not None:
        where = f" during {outcome.interrupted}" if outcome.interrupted else ""
        print(f"\nnfhm: interrupted{where}; stopped, nothing more started.", file=sys.stderr)
        print(f"  finished: {', '.join(outcome.succeeded) or 'nothing'}", file=sys.stderr)
        if outcome.failed:
            print(f"  failed: {', '.join(outcome.failed)}", file=sys.stderr)
        if outcome.not_started:
            print(f"  not started: {', '.join(outcome.not_started)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print()
    print_results(_warehouse_path(), datasets or list(catalog.datasets), models=models,
                  fresh_run_ids=set(outcome.run_ids))
    if not outcome.ok:
        print(f"\n{len(outcome.failed)} run(s) failed:", file=sys.stderr)
        for label, message in outcome.failed.items():
            print(f"  {label}: {message}", file=sys.stderr)
        return 1
    return 0


# -- nfhm results -------------------------------------------------------------------------------

# (task, metric, column heading): the table's columns, in order. Fractions are shown as percentages.
RESULT_COLUMNS = (
    (names.KNN, names.TOP1_COSINE, "kNN top-1 cos"),
    (names.KNN, names.MEAN_COSINE, "kNN mean cos"),
    (names.KNN, names.TOP1_EUCLIDEAN, "kNN top-1 euc"),
    (names.KNN, names.MEAN_EUCLIDEAN, "kNN mean euc"),
    (names.KNN, names.knn_metric(names.TOP1_COSINE, "macro_f1"), "kNN F1"),
    (names.LINEAR_PROBE, names.CV_ACCURACY, "SVC CV acc ± std"),
    (names.LINEAR_PROBE, names.TEST_ACCURACY, "SVC test acc"),
    (names.LINEAR_PROBE, names.TEST_MACRO_F1, "SVC test F1"),
    (names.ZERO_SHOT, names.TOP1_ENSEMBLE, "zero-shot top-1"),
)
COLUMN_NOTES = ("kNN: nearest neighbours among the train images (top-1 / per-class mean rule, cosine / "
                "Euclidean); F1 = macro F1 of kNN top-1 cos. SVC: linear probe, CV on train (mean ± std "
                "over folds), then refit and scored on test. Accuracies in %, on the shared test split; [low, high]: "
                "95 % paired-bootstrap interval; '=' after a rank: statistically tied with the best (Holm p ≥ 0.05).")


def cmd_results(args) -> int:
    from nfhm_pipeline.store import warehouse

    path = _warehouse_path()
    metrics = warehouse.read_table(path, "metrics")
    with_rows = sorted(metrics["dataset"].astype(str).unique()) if len(metrics) else []
    if not with_rows:
        print("no metrics yet: run `nfhm demo` (or materialize the metric assets in the UI)")
        return 0
    unknown = [d for d in args.dataset or [] if d not in with_rows]
    if unknown:
        raise UsageError(f"no results for dataset {unknown[0]!r} in {path}; datasets with results: {with_rows}")
    if args.all:
        datasets = with_rows
    elif args.dataset:
        datasets = args.dataset
    else:  # the dataset computed last: what the user just ran
        latest = metrics.sort_values("created_at", na_position="first")["dataset"].iloc[-1]
        datasets = [str(latest)]
    print_results(path, datasets)
    others = [d for d in with_rows if d not in datasets]
    if others:
        print(f"also in the warehouse: {', '.join(others)} (nfhm results --dataset <name>, or --all)")
    return 0


def print_results(warehouse_path: Path, datasets: list[str], *, models: list[str] | None = None,
                  fresh_run_ids: set[str] | None = None) -> None:
    """One section per dataset: per label level, the models ranked by kNN top-1 cosine accuracy
    (then probe, zero-shot), using only rows computed on the dataset's current split.

    ``models`` restricts the table; ``fresh_run_ids`` (the runs just made) marks models whose
    rows come from earlier runs, so old results are never shown as new ones."""
    from nfhm_pipeline.store import provenance

    from nfhm_pipeline.store import warehouse

    printed = False
    for ds in datasets:
        rows = provenance.current_rows(warehouse_path, "metrics", ds)
        stale = provenance.stale_models(warehouse_path, ds)
        if models:
            rows = rows[rows["model"].isin(models)]
            stale = [m for m in stale if m in models]
        print(f"== {ds} ==")
        if len(rows):
            printed = True
            print(results_text(rows, _current_differences(warehouse_path, ds)))
            if fresh_run_ids is not None:
                earlier = sorted(set(rows.loc[~rows["run_id"].isin(fresh_run_ids), "model"]))
                if earlier:
                    print(f"(results of {', '.join(earlier)} come from an earlier run: this command did not "
                          "recompute them)")
        elif not stale:
            print("no metrics yet on its current split")
        if stale:
            # Rows are replaced per (model, task), so a task is either all current or all stale.
            old = warehouse.read_table(warehouse_path, "metrics", dataset=ds)
            old = old[old["model"].isin(stale) & old["split_id"].ne(provenance.current_split_id(warehouse_path, ds))]
            what = "; ".join(f"{m} ({', '.join(sorted(old.loc[old['model'] == m, 'task'].unique()))})" for m in stale)
            print(f"not shown, computed on an earlier split of {ds}: {what}. Re-run them: "
                  f"nfhm demo --dataset {ds} " + " ".join(f"--model {m}" for m in stale))
        print()
    if printed:
        print(COLUMN_NOTES)


def _tied_with_best(differences, level: str, heading: str) -> set[str]:
    """Models statistically tied with the best on the ranking column ``heading``: the one rule of
    ``reports.summary.standing_against_best`` (paired bootstrap, Holm p >= 0.05 against the best)
    for that column's (task, metric)."""
    from nfhm_pipeline.reports.summary import TIED, standing_against_best

    column = next(((task, metric) for task, metric, h in RESULT_COLUMNS if h == heading), None)
    if column is None:
        return set()
    standing = standing_against_best(differences, level=level, task=column[0], metric=column[1])
    return set(standing.index[standing["standing"] == TIED].astype(str))


def results_text(metrics, differences=None) -> str:
    """The ranked table of one dataset's current ``metrics`` rows (grp = all), one block per level:
    values in %, 95 % intervals in brackets, '=' after the rank of a model statistically tied with
    the best (``differences``: the dataset's ``model_differences`` rows)."""
    import numpy as np
    import pandas as pd

    rows = metrics[metrics["grp"] == "all"]
    blocks = []
    for level in sorted(rows["level"].dropna().unique(), key=_level_order(rows)):
        part = rows[rows["level"] == level]
        table = pd.DataFrame(index=sorted(part["model"].unique()))
        for task, metric, heading in RESULT_COLUMNS:
            sel = part[(part["task"] == task) & (part["metric"] == metric)].set_index("model")
            if sel.empty:
                continue
            table[heading] = sel["value"].astype(float) * 100
            if heading.endswith("± std"):
                table[heading + "_std"] = sel["std"].astype(float) * 100
            elif "ci_method" in sel and (sel["ci_method"] == "bootstrap-paired").any():
                table[heading + "_low"] = sel["ci_low"].astype(float) * 100
                table[heading + "_high"] = sel["ci_high"].astype(float) * 100
        shown = [h for _, _, h in RESULT_COLUMNS if h in table]
        if not shown:
            continue
        # Rank by the first headline present (kNN top-1 cosine when there is one); ties by name.
        key = shown[0]
        table = table.assign(_key=table[key].fillna(-np.inf)).rename_axis("model").reset_index()
        table = table.sort_values(["_key", "model"], ascending=[False, True]).reset_index(drop=True)
        tied = _tied_with_best(differences, level, shown[0])
        header = ["rank", "model", *shown]
        body = []
        for i, row in enumerate(table.itertuples(index=False), start=1):
            cells = [f"{i}{'=' if row.model in tied else ''}", row.model]
            for heading in shown:
                value = table.loc[i - 1, heading]
                cell = _pct(value)
                if heading + "_std" in table and np.isfinite(table.loc[i - 1, heading + "_std"]):
                    cell += f" ± {table.loc[i - 1, heading + '_std']:.1f}"
                elif heading + "_low" in table and np.isfinite(table.loc[i - 1, heading + "_low"]):
                    cell += f" [{table.loc[i - 1, heading + '_low']:.1f}, {table.loc[i - 1, heading + '_high']:.1f}]"
                cells.append(cell)
            body.append(cells)
        blocks.append(f"{level} (ranked by {key}):\n" + _format_table(header, body))
    return "\n\n".join(blocks) if blocks else "no headline metrics yet"


def _current_differences(warehouse_path: Path, dataset: str):
    from nfhm_pipeline.store import provenance, warehouse

    rows = warehouse.read_table(warehouse_path, "model_differences", dataset=dataset)
    split_id = provenance.current_split_id(warehouse_path, dataset)
    return rows[rows["split_id"] == split_id] if len(rows) and split_id else rows.iloc[0:0]


def _format_table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text columns two spaces apart: the model name left-aligned, numbers right-aligned."""
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    align = lambda i, text: text.ljust(widths[i]) if i == 1 else text.rjust(widths[i])  # noqa: E731
    return "\n".join("  ".join(align(i, str(c)) for i, c in enumerate(line)).rstrip() for line in [header, *rows])


def _pct(value: float) -> str:
    import numpy as np

    return f"{value:.1f}" if np.isfinite(value) else "–"


def _level_order(rows):
    """Levels in the order the metrics were written (finest first), else by name."""
    first_seen = {level: i for i, level in enumerate(dict.fromkeys(rows["level"].dropna()))}
    return lambda level: (first_seen.get(level, 1 << 30), str(level))


# -- nfhm sql ---------------------------------------------------------------------------------------

# What a refused statement looks like in DuckDB's messages, and what to tell the user instead.
_EXPORT_HINT = 'to save a result, use `nfhm sql --csv "SELECT ..." > result.csv`'
_REFUSALS = (
    ("file system operations are disabled",
     "nfhm sql reads only the warehouse's tables and the embedding lake (as `embeddings`), no other file"),
    ("external extensions is disabled", "nfhm sql loads no extensions (LOAD, INSTALL)"),
    ("configuration has been locked", "nfhm sql changes no settings (SET, RESET, PRAGMA)"),
    ("read-only mode", "nfhm sql writes nothing to the warehouse (CREATE, INSERT, UPDATE, DELETE, DROP): "
                       "the pipeline writes it; " + _EXPORT_HINT),
)


# Statement kinds that only read; anything else (COPY, EXPORT, ATTACH, INSTALL/LOAD, SET, CREATE, INSERT,
# ...) is refused by name before it runs. SHOW, DESCRIBE, SUMMARIZE, FROM and VALUES parse as SELECT;
# PIVOT parses as MULTI (a SELECT over the pivoted values), which the other two locks keep to reading.
_READING_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA", "CALL", "MULTI"}


_REFUSALS_BY_KIND = (
    (("COPY", "EXPORT"), "it writes no file; " + _EXPORT_HINT),
    (("ATTACH", "DETACH"), "it opens no other database"),
    (("LOAD",), "it installs and loads no extensions"),
    (("SET", "VARIABLE_SET"), "it changes no settings (SET, RESET, PRAGMA x = y, USE)"),
    (("CREATE", "INSERT", "UPDATE", "DELETE", "DROP", "ALTER", "MERGE_INTO", "VACUUM", "ANALYZE"),
     "it writes nothing to the warehouse (the pipeline writes it); " + _EXPORT_HINT),
)


def read_only_query(path: Path, sql: str):
    """Run ``sql`` on the warehouse so that it can only read. Three locks, each enough for most
    statements: only reading statement kinds run; the file opens read-only; DuckDB's file system
    is switched off (no COPY TO, EXPORT, ATTACH, INSTALL, read_csv of any file) and the
    configuration locked so no statement can switch it back. The embedding lake is still
    readable as ``embeddings``: it is handed to DuckDB as a pyarrow dataset (pyarrow reads the
    files), so DuckDB itself needs no access to any folder, the lake's included.
    Returns a DataFrame."""
    import re

    import duckdb

    from nfhm_pipeline.store import warehouse
    from nfhm_pipeline.store.remote import lake_dataset

    with warehouse.connect(path, read_only=True) as con:
        try:
            kinds = [str(statement.type).rsplit(".", 1)[-1] for statement in con.extract_statements(sql)]
        except duckdb.Error as exc:
            raise StorageError(f"query failed: {str(exc).splitlines()[0]}") from None
        refused = [k for k in kinds if k not in _READING_STATEMENTS]
        if refused:
            why = next((w for marker, w in _REFUSALS_BY_KIND if refused[0] in marker), None)
            raise UsageError(f"query failed: nfhm sql only reads; {refused[0]} statements are refused"
                             + (f": {why}" if why else " (it runs SELECT, WITH, FROM, PIVOT, SHOW, DESCRIBE, SUMMARIZE, EXPLAIN, PRAGMA and CALL)"))
        try:
            root = warehouse._recorded_lake_root(con)
            if root and re.search(r"\bembeddings\b", sql, re.IGNORECASE):
                con.register("embeddings", lake_dataset(root))
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except duckdb.Error as exc:
            raise StorageError(f"cannot prepare a read-only session on {path}: {exc}") from None
        try:
            return con.execute(sql).df()
        except duckdb.Error as exc:
            message = str(exc)
            why = next((w for marker, w in _REFUSALS if marker in message), None)
            if why:
                raise UsageError(f"query failed: {why}. (DuckDB: {message.splitlines()[0]})") from None
            raise StorageError(f"query failed: {message}") from None


def cmd_sql(args) -> int:
    if args.max_rows < 0:
        raise UsageError(f"--max-rows must be 0 (every row) or a positive number of rows, got {args.max_rows}")
    frame = read_only_query(_warehouse_path(), args.query)
    if args.csv:
        frame.to_csv(sys.stdout, index=False)
    else:
        import pandas as pd

        with pd.option_context("display.width", 200, "display.max_columns", 50,
                               "display.max_rows", args.max_rows or None):
            if not len(frame):
                print("(no rows)")
            elif args.max_rows and len(frame) > args.max_rows:
                print(frame.head(args.max_rows).to_string(index=False))
                print(f"... {len(frame) - args.max_rows} more row(s); --max-rows 0 shows all, --csv exports all")
            else:
                print(frame.to_string(index=False))
    return 0


# -- nfhm init --------------------------------------------------------------------------------------

# The default model set: taken by reference from the demo catalog, so the new catalog works offline at
# once and keeps working when the demo's entries change. Real models are listed as comments to enable.
DEFAULT_MODELS = (("raw-pixels", "demo", "raw pixels: the floor every model must beat"),
                  ("tiny-clip", "demo", "a tiny CLIP with random weights: proves the pipeline runs, not a real model"))
SUGGESTED_MODELS = (("openclip-vit-b-32", "vlm4bio"), ("bioclip", "vlm4bio"), ("dinov2-base", "vlm4bio"),
                    ("resnet50-imagenet", "vlm4bio"), ("biomedclip", "medical"), ("clip-vit-b-16", "medical"))
_BIOLOGY_LEVELS = {"species", "genus", "family", "order", "class", "phylum", "kingdom", "taxon"}
# Column names that usually are a leakage unit (images of one never straddle train and test).
_LEAKAGE_HINTS = ("video", "patient", "subject", "specimen", "individual", "slide", "animal", "session", "clip")
_SNIFFED_DELIMITERS = {",": ",", ";": ";", "\t": "tab", "|": "|"}  # character → the catalog's spelling


class InitResult:
    def __init__(self, path: Path, path_as_given: str, summary: str):
        self.path, self.path_as_given, self.summary = path, path_as_given, summary


def _dataset_slug(text: str) -> str:
    import re

    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40].strip("_")
    return slug if slug and slug[0].isalnum() else "my_images"


def _yaml_str(value: str) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid, fully quoted YAML scalar


def write_init_catalog(*, folder: str | None = None, csv: str | None = None, out: str | None = None,
                       name: str | None = None, labels: str | None = None, path_column: str | None = None,
                       image_root: str | None = None, models_from: str | None = None,
                       force: bool = False) -> InitResult:
    """Write a catalog for a class-per-folder tree (``folder``) or a CSV (``csv``), check that it
    loads, and return where it is with a summary of what was found."""
    import re

    if (folder is None) == (csv is None):
        raise UsageError("give exactly one of --folder DIR or --csv FILE")
    source = Path(folder or csv).expanduser()
    name = name if name is not None else _dataset_slug(source.stem if csv else source.resolve().name)
    if not re.fullmatch(r"[a-z0-9][a-z0-9_]{0,63}", name):
        raise UsageError(f"--name {name!r}: a dataset name is [a-z0-9_], starting with a letter or digit "
                         "(it becomes an asset-key prefix and a folder name)")
    if folder is not None:
        if labels or path_column or image_root:
            raise UsageError("--labels, --path-column and --image-root are for --csv; a folder's one label "
                             "level is its sub-folder name")
        entry, found = _folder_entry(source)
    else:
        entry, found = _csv_entry(source, labels, path_column, image_root)
    out_given = out or f"{name}_catalog.yaml"
    out_path = Path(out_given).expanduser().absolute()
    if out_path.exists() and not force:
        raise UsageError(f"{out_path} exists already; choose another --out or add --force to overwrite it")
    text = _catalog_text(name, entry, found, models_from, out_path)
    _write_checked(out_path, text)
    models = (f"every model of {models_from}" if models_from
              else ", ".join(key for key, _, _ in DEFAULT_MODELS) + " (from demo)")
    summary = f"wrote {out_given}: dataset {name!r} ({found['what']}); models: {models}"
    for note in found["notes"]:
        summary += f"\n  note: {note}"
    return InitResult(out_path, out_given, summary)


def _folder_entry(root: Path) -> tuple[dict, dict]:
    from nfhm_pipeline.ingest.readers import read_image_folder

    root = root.resolve()
    if not root.is_dir():
        raise UsageError(f"--folder {root}: not a folder; give a folder with one sub-folder of images per class")
    candidates = read_image_folder(root)  # a ManifestError says what the folder lacks
    good = candidates[candidates["reject_reason"].isna()]
    classes = good["label"].value_counts()
    if len(classes) < 2:
        raise UsageError(f"{root}: only {len(classes)} class folder(s) with images ({', '.join(classes.index)}); "
                         "a comparison needs at least 2 classes, one sub-folder each")
    notes = []
    rejected = len(candidates) - len(good)
    if rejected:
        notes.append(f"{rejected} entr(y/ies) of the class folders are not images this pipeline decodes; "
                     "the manifest lists them in rejected_images")
    entry = {"reader": "image_folder", "root": str(root), "labels": ["label"]}
    if any("_" in c for c in classes.index) and not any(" " in c for c in classes.index):
        entry["underscores_to_spaces"] = True  # 'Danaus_plexippus' is the label 'Danaus plexippus'
        notes.append("folder names use '_' for spaces: underscores_to_spaces is on (labels read with spaces)")
    found = {"what": f"image_folder, {len(good)} images in {len(classes)} classes, label level 'label'",
             "notes": notes, "source": str(root), "labels": ["label"], "hints": []}
    return entry, found


def _sniff_delimiter(sample: str) -> str:
    import csv as csv_module

    try:
        return csv_module.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv_module.Error:  # one column, or too irregular: the candidate seen most in the header
        header = sample.splitlines()[0] if sample else ""
        counts = {d: header.count(d) for d in ",;\t|"}
        best = max(counts, key=counts.get)
        return best if counts[best] else ","


def _csv_entry(csv_path: Path, labels: str | None, path_column: str | None,
               image_root: str | None) -> tuple[dict, dict]:
    import numpy as np

    from nfhm_pipeline.catalog import RESERVED_COLUMNS
    from nfhm_pipeline.ingest.readers import IMAGE_EXTENSIONS, _read_csv

    csv_path = csv_path.resolve()
    if not csv_path.is_file():
        raise UsageError(f"--csv {csv_path}: no such file; give a CSV with one row per image")
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as handle:
            sample = handle.read(1 << 16)
    except UnicodeDecodeError:
        raise UsageError(f"{csv_path}: not UTF-8 text; re-save it as UTF-8 (e.g. 'CSV UTF-8')") from None
    delimiter = _sniff_delimiter(sample)
    frame = _read_csv(csv_path, _SNIFFED_DELIMITERS[delimiter])
    columns = list(frame.columns)
    notes, hints = [], []

    def looks_like_paths(col) -> float:
        values = frame[col].astype(str).str.strip()
        values = values[values != ""]
        return float(values.str.lower().str.endswith(tuple(IMAGE_EXTENSIONS)).mean()) if len(values) else 0.0

    if path_column is not None:
        if path_column not in columns:
            raise UsageError(f"--path-column {path_column!r} is not a column of {csv_path}; columns: {columns}")
    else:
        scores = {c: looks_like_paths(c) for c in columns}
        best = max(scores, key=scores.get)
        if scores[best] < 0.5:
            raise UsageError(f"{csv_path}: no column holds image file names ({', '.join(IMAGE_EXTENSIONS)}); "
                             f"columns: {columns}. Name it with --path-column")
        path_column = best
    if labels is not None:
        levels = [c.strip() for c in labels.split(",") if c.strip()]
        missing = [c for c in levels if c not in columns]
        if not levels or missing:
            raise UsageError(f"--labels names column(s) {missing or labels!r} that {csv_path} lacks; "
                             f"columns: {columns}")
        if path_column in levels:
            raise UsageError(f"--labels includes the path column {path_column!r}")
    else:
        levels = _guess_levels(frame, [c for c in columns if c != path_column], notes, hints)
        if not levels:
            raise UsageError(f"{csv_path}: found no column that looks like a label (text with repeated values, "
                             f"at least 2 classes); columns: {columns}. Name them with --labels species,genus")
    reserved = [c for c in levels if c in RESERVED_COLUMNS]
    if reserved:
        raise UsageError(f"label column(s) {reserved} collide with the manifest's own columns "
                         f"{sorted(RESERVED_COLUMNS)}; rename them in the CSV")
    root = Path(image_root).expanduser().resolve() if image_root else csv_path.parent
    listed = frame[path_column].astype(str).str.strip()
    probe = listed[listed != ""].head(200)
    exists = np.mean([(Path(p) if Path(p).is_absolute() else root / p).is_file() for p in probe]) if len(probe) else 0
    if exists < 0.5:
        notes.append(f"only {exists:.0%} of the first {len(probe)} files of column {path_column!r} exist under "
                     f"{root}: give --image-root <the folder the paths are relative to>")
    entry = {"reader": "label_csv", "csv": str(csv_path), "path_column": path_column, "labels": levels}
    if image_root:
        entry["image_root"] = str(root)
    if delimiter != ",":
        entry["delimiter"] = _SNIFFED_DELIMITERS[delimiter]
    n_classes = frame[levels[0]].replace("", np.nan).nunique()
    found = {"what": f"label_csv, {len(frame)} rows, path column {path_column!r}, label levels {levels} "
                     f"({n_classes} classes at {levels[0]!r})"
                     + (f", delimiter {entry['delimiter']!r}" if "delimiter" in entry else ""),
             "notes": notes, "source": str(csv_path), "labels": levels, "hints": hints}
    return entry, found


def _guess_levels(frame, columns: list[str], notes: list[str], hints: list[str]) -> list[str]:
    """Columns that look like labels, finest first: text with repeated values (2 ≤ classes ≤ half the
    rows), and for coarser levels, one value per value of the finest (a hierarchy: genus per species)."""
    import pandas as pd

    from nfhm_pipeline.catalog import RESERVED_COLUMNS

    n = len(frame)
    stats = {}
    for col in columns:
        values = frame[col].astype(str).str.strip()
        filled = values[values != ""]
        if len(filled) < 0.5 * n:
            continue
        classes = filled.nunique()
        numeric = pd.to_numeric(filled, errors="coerce").notna().all()
        if any(h in col.lower() for h in _LEAKAGE_HINTS) and classes > 1:
            hints.append(col)
            continue
        if set(filled.str.lower().unique()) <= {"train", "test", "val", "valid", "validation"}:
            notes.append(f"column {col!r} looks like an official split: add 'split_column: {col}' to keep it")
            continue
        if col in RESERVED_COLUMNS or not 2 <= classes <= max(2, n // 2) or (numeric and classes > 20):
            continue
        stats[col] = classes
    if not stats:
        return []
    ordered = sorted(stats, key=lambda c: (-stats[c], columns.index(c)))
    finest = ordered[0]
    levels = [finest]
    for col in ordered[1:]:
        pairs = frame[[finest, col]].astype(str)
        if pairs.groupby(finest)[col].nunique().max() == 1 and stats[col] < stats[levels[-1]]:
            levels.append(col)  # each finer class has one value here: a coarser level
        else:
            notes.append(f"column {col!r} was not taken as a label level (it is not one value per {finest!r}); "
                         "add it with --labels if it is one")
    return levels


def _catalog_text(name: str, entry: dict, found: dict, models_from: str | None, out_path: Path) -> str:
    import datetime as dt

    from nfhm_pipeline.catalog import load_catalog

    lines = [f"# Written by `nfhm init` on {dt.date.today().isoformat()}; edit freely.",
             f"# Run it:  NFHM_CATALOG={out_path} nfhm demo     then: nfhm results",
             "# Fields: see README 'Your own images' (taxonomy, delimiter, split.group_by, ...).",
             "datasets:", f"  {name}:",
             f"    description: {_yaml_str('from ' + found['source'])}"]
    for key, value in entry.items():
        if isinstance(value, list):
            lines.append(f"    {key}: [{', '.join(_yaml_str(v) for v in value)}]")
        elif isinstance(value, bool):
            lines.append(f"    {key}: {'true' if value else 'false'}")
        else:
            lines.append(f"    {key}: {_yaml_str(str(value))}")
    biology = any(level.lower() in _BIOLOGY_LEVELS for level in found["labels"])
    lines.append(f"    prompts: {'biology' if biology else 'generic'}")
    lines.append("    split: {test_fraction: 0.2, seed: 0, folds: 5}")
    for col in found["hints"]:
        lines.append(f"    # {col!r} looks like a leakage unit (a video, patient, specimen): to keep each one on")
        lines.append(f"    # one side of the split, write instead  split: {{test_fraction: 0.2, seed: 0, folds: 5, "
                     f"group_by: {col}}}")
        found["notes"].append(f"column {col!r} looks like a leakage unit; see the comment in the catalog "
                              "(split.group_by)")
    if models_from:
        try:
            load_catalog(models_from)
        except CatalogError as exc:
            raise UsageError(f"--models-from {models_from!r}: {exc}") from None
        target = models_from if Path(models_from).suffix not in (".yaml", ".yml") \
            else str(Path(models_from).expanduser().resolve())
        lines.append(f"include_models: [{_yaml_str(target)}]")
        lines.append("models: {}")
    else:
        lines.append("models:  # entries taken by reference: weights paths resolve against the catalog named")
        for key, catalog, why in DEFAULT_MODELS:
            lines.append(f"  {key}: {{from: {catalog}}}  # {why}")
        lines.append("  # real models (weights from the Hugging Face hub, or local files; see README):")
        for key, catalog in SUGGESTED_MODELS:
            lines.append(f"  # {key}: {{from: {catalog}}}")
    return "\n".join(lines) + "\n"


def _write_checked(out_path: Path, text: str) -> None:
    """Write the catalog atomically, after checking that it loads (a bad one is never left behind)."""
    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.store.files import atomic_path

    try:
        # the temp file ends in .yaml: load_catalog reads it as a catalog file
        with atomic_path(out_path, suffix=".yaml", hint="choose another --out") as tmp:
            tmp.write_text(text, encoding="utf-8")
            load_catalog(tmp)
    except StorageError:
        raise
    except NfhmError as exc:
        raise CatalogError(f"the catalog written for you does not load: {exc}") from None


def cmd_init(args) -> int:
    written = write_init_catalog(folder=args.folder, csv=args.csv, out=args.out, name=args.name,
                                 labels=args.labels, path_column=args.path_column, image_root=args.image_root,
                                 models_from=args.models_from, force=args.force)
    print(written.summary)
    print("run it:")
    print(f"  NFHM_CATALOG={written.path_as_given} nfhm demo")
    print("then:")
    print("  nfhm results")
    return 0


# -- nfhm models / catalogs ---------------------------------------------------------------------

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


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in this command's voice (``nfhm: <sentence>``, exit 2)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nfhm", description="Which embedding model understands your images?")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("demo", help="materialize every asset of the catalog and print the results")
    p.add_argument("--catalog", help="catalog name or YAML path (default: $NFHM_CATALOG or demo)")
    p.add_argument("--dataset", action="append", help="only this dataset (repeatable)")
    p.add_argument("--model", action="append", help="only this model partition (repeatable)")
    p.add_argument("--only", choices=["knn", "probe", "zero-shot"],
                   help="run one analysis alone: manifest, splits, embeddings and its metrics "
                        "(knn: the seed's nearest-neighbour analysis; no comparison report or maps)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("results", help="models ranked per label level, one dataset at a time")
    p.add_argument("--dataset", action="append", help="this dataset (repeatable; default: the last one computed)")
    p.add_argument("--all", action="store_true", help="every dataset with results")
    p.set_defaults(func=cmd_results)
    p = sub.add_parser("sql", help="read-only SQL on the warehouse and the embedding lake")
    p.add_argument("query")
    p.add_argument("--csv", action="store_true", help="print CSV (every row) instead of a table")
    p.add_argument("--max-rows", type=int, default=100, help="rows of the table to print (0: all)")
    p.set_defaults(func=cmd_sql)
    p = sub.add_parser("init", help="write a catalog for your own images (a class-per-folder tree or a CSV)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="a folder with one sub-folder of images per class")
    source.add_argument("--csv", help="a CSV with one row per image: a path column and label columns")
    p.add_argument("--out", help="the catalog file to write (default: <name>_catalog.yaml here)")
    p.add_argument("--name", help="the dataset name (default: from the folder or CSV name)")
    p.add_argument("--labels", help="CSV: the label columns, finest first, e.g. species,genus,family "
                                    "(default: the columns that look like labels)")
    p.add_argument("--path-column", help="CSV: the column with image paths (default: the one whose values "
                                         "look like image files)")
    p.add_argument("--image-root", help="CSV: the folder the paths are relative to (default: the CSV's folder)")
    p.add_argument("--models-from", help="take every model of this catalog (include_models) instead of the "
                                         "offline default raw-pixels + tiny-clip from demo")
    p.add_argument("--force", action="store_true", help="overwrite an existing catalog file")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("models", help="list the catalog's models")
    p.add_argument("--catalog")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("catalogs", help="list the shipped catalogs")
    p.set_defaults(func=cmd_catalogs)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except NfhmError as exc:
        print(f"nfhm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nnfhm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `nfhm sql ... | head`: the reader left; nothing to report
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
