"""Manifest readers: each turns a source into a *candidates* table for `validate_images`.

Candidates columns (see `CANDIDATE_BASE_COLUMNS`): `uri` (absolute path, str), one column per label
level in the order given (finest first, str or None), `group` (the reporting subset, str or None),
`split_group` (the leakage unit: video, patient, specimen; str or None), `official_split` (str or None), `source_row` (int, 1-based: the line in a CSV counting the header as line 1, the
position in a folder listing, or the position in an .npz), `reject_reason` (None, or a reason such as
`outside_root` for a listed path that must not be read).

CSV files are read as UTF-8 (a BOM is accepted). Any other encoding raises ManifestError asking to
re-save the file as UTF-8: guessing latin-1 would silently turn accented species names into
mojibake labels that then look like separate classes.

Which catalog ``reader:`` value uses which function is declared in ``ingest.registry.READERS``
(with `read_source`, the dispatcher).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from nfhm_pipeline.errors import ManifestError
from nfhm_pipeline.ingest.images import png_bytes, write_bytes_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
CANDIDATE_BASE_COLUMNS = ("uri", "group", "split_group", "official_split", "source_row", "reject_reason")
# Listed in a class folder but not decodable here: reported as rejected rows, never skipped silently.
_UNSUPPORTED_IMAGE_EXTENSIONS = (".heic", ".heif", ".svg", ".avif", ".jxl", ".raw", ".dng")
MEDMNIST_SPLITS = ("train", "val", "test")


def _candidates(records: list[dict], label_columns: Sequence[str]) -> pd.DataFrame:
    columns = ["uri", *label_columns, *CANDIDATE_BASE_COLUMNS[1:-2], "source_row", "reject_reason"]
    frame = pd.DataFrame(records, columns=columns)
    frame["source_row"] = frame["source_row"].astype("int64")
    return frame


def _clean_label(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def _resolve_under(root: Path, listed: str) -> tuple[str, bool]:
    """Absolute, normalised path for `listed` (relative to `root` unless absolute) and whether it is
    inside `root`. Lexical, not realpath: a collection built from symlinks stays inside its root."""
    full = os.path.normpath(listed if os.path.isabs(listed) else os.path.join(root, listed))
    return full, os.path.commonpath([str(root), full]) == str(root)


def _read_csv(csv_path: Path, delimiter: str | None = None) -> pd.DataFrame:
    if not csv_path.is_file():
        unset = re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", str(csv_path))
        hint = (f" The path uses ${{{unset[0]}}}, which is not set: export {unset[0]}=<folder> "
                "(see 'Environment variables' in the README).") if unset else ""
        raise ManifestError(f"{csv_path}: manifest CSV not found. Check the path in the dataset catalog.{hint}")
    sep = _delimiter(delimiter)
    try:
        header = _csv_header(csv_path, sep)
        frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, encoding="utf-8-sig", sep=sep)
    except UnicodeDecodeError as e:
        raise ManifestError(f"{csv_path}: not valid UTF-8 (byte {e.start}: {e.reason}). "
                            "Re-save the file as UTF-8 (e.g. 'CSV UTF-8' in a spreadsheet program).") from e
    except pd.errors.EmptyDataError as e:
        raise ManifestError(f"{csv_path}: the file is empty; it needs a header line and one row per image.") from e
    except pd.errors.ParserError as e:
        raise ManifestError(f"{csv_path}: cannot be parsed as CSV ({e}). Check quoting and the number of fields per line.") from e
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        # pandas would rename the second one to 'species.1' and read the first without a word.
        raise ManifestError(f"{csv_path}: the header names column(s) {twice} more than once; "
                            "rename or remove the duplicates.")
    frame.columns = header
    if frame.empty:
        raise ManifestError(f"{csv_path}: has a header ({', '.join(frame.columns)}) but no rows; list one image per row.")
    return frame


def _delimiter(delimiter: str | None) -> str:
    from nfhm_pipeline.catalog import CSV_DELIMITERS

    if delimiter is None:
        return ","
    if delimiter not in CSV_DELIMITERS:
        raise ManifestError(f"CSV delimiter {delimiter!r} is not supported; use one of {sorted(CSV_DELIMITERS)}.")
    return CSV_DELIMITERS[delimiter]


def _csv_header(csv_path: Path, sep: str) -> list[str]:
    import csv

    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        first = next(csv.reader(handle, delimiter=sep), [])
    return [str(c).strip() for c in first]


def _require_columns(csv_path: Path, frame: pd.DataFrame, columns: Sequence[str], hint: str = "") -> None:
    if len(frame.columns) == 1 and (other := next((d for d in (";", "\t", "|") if d in frame.columns[0]), None)):
        name = {"\t": "a tab"}.get(other, repr(other))
        hint = (f"The header was read as one column and contains {name}: the file is probably {name}-separated; "
                f"add 'delimiter: \"{other.encode('unicode_escape').decode()}\"' to the dataset's catalog entry.")
    for column in columns:
        if column not in frame.columns:
            raise ManifestError(f"{csv_path}: column {column!r} is missing (columns present: "
                                f"{', '.join(frame.columns)}). {hint or 'Add the column or fix the dataset catalog entry.'}")


def _records_from_frame(
    frame: pd.DataFrame, paths: pd.Series, root: Path, labels: Mapping[str, pd.Series],
    group: pd.Series | None, split: pd.Series | None, split_group: pd.Series | None = None,
) -> list[dict]:
    records = []
    for i in range(len(frame)):
        listed = str(paths.iloc[i]).strip()
        uri, inside = _resolve_under(root, listed) if listed else (str(root), True)
        reason = None if inside else "outside_root"
        if not listed:
            reason = "missing_file"
        records.append({
            "uri": uri,
            **{name: _clean_label(series.iloc[i]) for name, series in labels.items()},
            "group": _clean_label(group.iloc[i]) if group is not None else None,
            "split_group": _clean_label(split_group.iloc[i]) if split_group is not None else None,
            "official_split": _clean_label(split.iloc[i]) if split is not None else None,
            "source_row": i + 2,  # line number in the file; the header is line 1
            "reject_reason": reason,
        })
    return records


def read_label_csv(
    csv_path: str | os.PathLike,
    *,
    path_column: str,
    label_columns: Sequence[str],
    image_root: str | os.PathLike | None = None,
    group_column: str | None = None,
    split_column: str | None = None,
    split_group_column: str | None = None,
    delimiter: str | None = None,
) -> pd.DataFrame:
    """Candidates from a CSV with one row per image: `path_column` holds paths relative to
    `image_root` (default: the CSV's folder); each of `label_columns` becomes a label column of the
    same name (finest first); `group_column` is the reporting subset, `split_group_column` the
    leakage unit (a video, a patient) kept on one side of the split."""
    csv_path = Path(csv_path).absolute()
    frame = _read_csv(csv_path, delimiter)
    optional = [c for c in (group_column, split_column, split_group_column) if c]
    _require_columns(csv_path, frame, [path_column, *label_columns, *optional])
    root = Path(os.path.abspath(image_root if image_root is not None else csv_path.parent))
    return _candidates(
        _records_from_frame(frame, frame[path_column], root, {c: frame[c] for c in label_columns},
                            frame[group_column] if group_column else None,
                            frame[split_column] if split_column else None,
                            frame[split_group_column] if split_group_column else None),
        label_columns,
    )


def _find_column(frame: pd.DataFrame, name: str) -> str | None:
    """Exact column name, else a unique case-insensitive match ('Genus' for 'genus')."""
    if name in frame.columns:
        return name
    matches = [c for c in frame.columns if c.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else None


def read_vlm4bio_csv(
    csv_path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    *,
    label_columns: Sequence[str] = ("species", "genus"),
    taxa: str | None = None,
    taxa_column: str | None = None,
    split_group_column: str | None = None,
    delimiter: str | None = None,
) -> pd.DataFrame:
    """Candidates from a VLM4Bio-style metadata CSV.

    File column: `fileNameAsDelivered`, else `fileName` (relative to `image_root`, default the
    CSV's folder). `species` comes from `scientificName`; any other label level from a column of that
    name (case-insensitive); `genus`, when there is no such column, is the first word of
    scientificName. `group` (the taxa) comes from `taxa_column`, else the constant `taxa`, else the
    name of each image's parent folder.
    """
    csv_path = Path(csv_path).absolute()
    frame = _read_csv(csv_path, delimiter)
    file_column = next((c for c in ("fileNameAsDelivered", "fileName") if c in frame.columns), None)
    if file_column is None:
        raise ManifestError(f"{csv_path}: needs a 'fileNameAsDelivered' or 'fileName' column with image file "
                            f"names (columns present: {', '.join(frame.columns)}).")
    labels: dict[str, pd.Series] = {}
    for level in label_columns:
        if level == "species":
            _require_columns(csv_path, frame, ["scientificName"], "VLM4Bio CSVs name the species in 'scientificName'.")
            labels[level] = frame["scientificName"]
        elif (column := _find_column(frame, level)) is not None:
            labels[level] = frame[column]
        elif level == "genus" and "scientificName" in frame.columns:
            labels[level] = frame["scientificName"].map(lambda s: (str(s).split() or [""])[0])
        else:
            raise ManifestError(f"{csv_path}: label level {level!r} is requested but the CSV has no {level!r} column "
                                f"and it cannot be derived (columns present: {', '.join(frame.columns)}). "
                                "Add the column or drop the level from label_columns.")
    _require_columns(csv_path, frame, [c for c in (taxa_column, split_group_column) if c])
    root = Path(os.path.abspath(image_root if image_root is not None else csv_path.parent))
    records = _records_from_frame(frame, frame[file_column], root, labels,
                                  frame[taxa_column] if taxa_column else None, None,
                                  frame[split_group_column] if split_group_column else None)
    if not taxa_column:
        for record in records:
            record["group"] = taxa if taxa is not None else Path(record["uri"]).parent.name
    return _candidates(records, label_columns)


def read_image_folder(
    root: str | os.PathLike,
    *,
    label_column: str = "label",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    underscores_to_spaces: bool = False,
) -> pd.DataFrame:
    """Candidates from `root/<class>/<image>`: one label column `label_column` = the sub-folder name
    (underscores read as spaces with `underscores_to_spaces`). Files directly inside a class folder
    with one of `extensions` (case-insensitive) are candidates; every other entry there that is not
    hidden (another format, a dangling link, a folder named like an image) becomes a row with a
    `reject_reason`, so nothing is skipped without a count. Sorted by (class, file name)."""
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise ManifestError(f"{root}: image folder not found. It should hold one sub-folder per class.")
    wanted = {e.lower() for e in extensions}
    records = []
    for class_dir in sorted(p for p in root.iterdir() if _is_dir(p) and not p.name.startswith(".")):
        label = class_dir.name.strip()
        if underscores_to_spaces:
            label = " ".join(label.replace("_", " ").split())
        for file in sorted(class_dir.iterdir()):
            if file.name.startswith("."):
                continue
            reason = _folder_entry_problem(file, wanted)
            records.append({"uri": str(file), label_column: label, "group": None, "split_group": None,
                            "official_split": None, "source_row": len(records) + 1, "reject_reason": reason})
    # An image at the top has no class; other top-level files (a labels.csv, a README) are not images.
    image_like = wanted | set(_UNSUPPORTED_IMAGE_EXTENSIONS)
    for file in sorted(p for p in root.iterdir()
                       if not p.name.startswith(".") and not _is_dir(p) and p.suffix.lower() in image_like):
        records.append({"uri": str(file), label_column: None, "group": None, "split_group": None,
                        "official_split": None, "source_row": len(records) + 1,
                        "reject_reason": "not_in_class_folder"})
    if not any(r["reject_reason"] is None for r in records):
        raise ManifestError(f"{root}: no images ({', '.join(sorted(wanted))}) in any class sub-folder; "
                            "expected root/<class>/<image> with one folder per class.")
    return _candidates(records, [label_column])


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a symlink loop
        return False


def _folder_entry_problem(path: Path, wanted: set[str]) -> str | None:
    """Why an entry of a class folder is not an image this reader decodes (None: it is one)."""
    import errno
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink_loop"
        return "dangling_symlink" if path.is_symlink() else "missing_file"
    if stat.S_ISDIR(mode):
        return "folder_not_image"
    if not stat.S_ISREG(mode):
        return "not_an_image_file"
    suffix = path.suffix.lower()
    if suffix in wanted:
        return None
    if suffix in _UNSUPPORTED_IMAGE_EXTENSIONS:
        return "unsupported_format"
    return "not_an_image_file"


def taxonomy_levels(taxonomy_csv: str | os.PathLike, label_columns: Sequence[str],
                    delimiter: str | None = None) -> list[str]:
    """The coarser label levels (of ``label_columns[1:]``) that a taxonomy CSV supplies.

    The taxonomy has one row per finest label: a column named like the finest level (e.g.
    ``species``) and one column per coarser level it knows (``genus``, ``family``…)."""
    path = Path(taxonomy_csv).absolute()
    frame = _read_csv(path, delimiter)
    _require_columns(path, frame, [label_columns[0]],
                     f"A taxonomy needs a {label_columns[0]!r} column (the finest label level) to join on.")
    supplied = [level for level in label_columns[1:] if level in frame.columns]
    if not supplied:
        raise ManifestError(f"{path}: the taxonomy has none of the coarser levels {list(label_columns[1:])} "
                            f"(columns present: {', '.join(frame.columns)}).")
    return supplied


def apply_taxonomy(candidates: pd.DataFrame, taxonomy_csv: str | os.PathLike, label_columns: Sequence[str],
                   delimiter: str | None = None) -> pd.DataFrame:
    """Fill the coarser levels of ``candidates`` from a taxonomy CSV joined on the finest level.

    Every finest label of a usable candidate row must be in the taxonomy, each with one value per
    level; otherwise a ManifestError lists what is missing or contradictory."""
    path = Path(taxonomy_csv).absolute()
    supplied = taxonomy_levels(path, label_columns, delimiter)
    key = label_columns[0]
    frame = _read_csv(path, delimiter)
    table = pd.DataFrame({c: frame[c].map(_clean_label) for c in [key, *supplied]}).dropna(subset=[key])
    conflicting = sorted(k for k, rows in table.groupby(key) if len(rows.drop_duplicates()) > 1)
    if conflicting:
        raise ManifestError(f"{path}: {len(conflicting)} {key} value(s) are listed with different coarser labels, "
                            f"e.g. {conflicting[:5]}; give each {key} one row.")
    lookup = table.drop_duplicates().set_index(key)
    out = candidates.copy()
    usable = out["reject_reason"].isna() & out[key].notna()
    unknown = sorted(set(out.loc[usable, key]) - set(lookup.index), key=str)
    if unknown:
        raise ManifestError(f"{path}: {len(unknown)} {key} value(s) of the dataset are not in the taxonomy, "
                            f"e.g. {unknown[:10]}; add a row for each (columns {', '.join([key, *supplied])}).")
    for level in supplied:
        out[level] = out[key].map(lookup[level])
    ordered = ["uri", *label_columns, *[c for c in out.columns if c not in ("uri", *label_columns)]]
    return out[ordered]


def read_medmnist_npz(
    npz_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    label_column: str = "label",
    class_names: Sequence[str] | Mapping[int, str] | None = None,
) -> pd.DataFrame:
    """Candidates from a MedMNIST .npz (keys `{train,val,test}_images` uint8 (N,H,W) or (N,H,W,3),
    `{split}_labels` (N,) or (N,1) ints). Each image is written once as
    `out_dir/<split>/<split>_<index:05d>.png` (rewritten only if its bytes differ); official_split is
    the split, the label is `class_names[label]` or str(label)."""
    npz_path = Path(npz_path).absolute()
    if not npz_path.is_file():
        raise ManifestError(f"{npz_path}: MedMNIST file not found. Check the path in the dataset catalog.")
    out_dir = Path(os.path.abspath(out_dir))
    records = []
    try:
        archive = np.load(npz_path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{npz_path}: not a readable .npz archive ({e}).") from e
    with archive:
        splits = [s for s in MEDMNIST_SPLITS if f"{s}_images" in archive.files]
        if not splits:
            raise ManifestError(f"{npz_path}: no '<split>_images' arrays (keys: {', '.join(archive.files)}); "
                                "expected train_images/train_labels, val_..., test_... as in MedMNIST.")
        for split in splits:
            if f"{split}_labels" not in archive.files:
                raise ManifestError(f"{npz_path}: has {split}_images but no {split}_labels.")
            images, labels = archive[f"{split}_images"], archive[f"{split}_labels"]
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels[:, 0]
            if labels.ndim != 1 or len(labels) != len(images):
                raise ManifestError(f"{npz_path}: {split}_labels has shape {labels.shape} for {len(images)} images; "
                                    "this reader takes one integer class per image (multi-label MedMNIST sets are not supported).")
            if images.dtype != np.uint8 or images.ndim not in (3, 4):
                raise ManifestError(f"{npz_path}: {split}_images must be uint8 (N,H,W) or (N,H,W,3), "
                                    f"got {images.dtype} {images.shape}.")
            unnamed = sorted({int(v) for v in np.unique(labels)} - set(
                range(len(class_names)) if not isinstance(class_names, Mapping) else class_names
            )) if class_names is not None else []
            if unnamed:
                raise ManifestError(f"{npz_path}: {split}_labels contains {unnamed} but class_names has no entry "
                                    "for them; give one name per class index.")
            for index, (pixels, label) in enumerate(zip(images, labels)):
                path = out_dir / split / f"{split}_{index:05d}.png"
                write_bytes_atomic(path, png_bytes(Image.fromarray(pixels)))
                name = class_names[int(label)] if class_names is not None else str(int(label))
                records.append({"uri": str(path), label_column: str(name), "group": None, "split_group": None,
                                "official_split": split,
                                "source_row": len(records) + 1, "reject_reason": None})
    return _candidates(records, [label_column])


def _read_demo_shapes(out_dir, *, seed: int = 0, images_per_species: int = 8, size: int = 64,
                      label_columns: Sequence[str] = ("species", "genus", "family")) -> pd.DataFrame:
    from nfhm_pipeline.ingest.demo import generate_demo_collection

    root = generate_demo_collection(out_dir, seed=seed, images_per_species=images_per_species, size=size)
    return read_vlm4bio_csv(root / "metadata.csv", label_columns=label_columns, taxa_column="taxa")


def _read_sklearn_digits(out_dir, *, label_column: str = "label") -> pd.DataFrame:
    from nfhm_pipeline.ingest.demo import generate_digits_collection

    return read_image_folder(generate_digits_collection(out_dir), label_column=label_column)
