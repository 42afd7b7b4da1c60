"""`READERS`: every manifest reader, declared once.

One `ReaderRecord` per ``reader:`` value of a catalog entry. It is the only place that says, for
that reader, which function turns the source into candidates, which catalog fields it takes (and
which of them are paths), how many label levels it supplies, whether a reporting group or a
leakage unit can come from its source, and what the manifest sensor must look at to notice that
the source changed. The catalog (field validation), ``ingest.manifest.reader_params`` (catalog
entry → keyword arguments) and ``automation.fingerprint_source`` (the sensor) all read these
records and keep no list of reader names of their own. Adding a reader is one record here.

This module must not import ``nfhm_pipeline.catalog`` at import time: the catalog imports it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import pandas as pd

from nfhm_pipeline.ingest import readers as _readers
from nfhm_pipeline.ingest.chexpert import CHEXPERT_FINDINGS, chexpert_candidates

if TYPE_CHECKING:
    from nfhm_pipeline.catalog import DatasetSpec

# Catalog fields the pipeline handles around the reader (never passed to the read function).
PIPELINE_FIELDS = frozenset({"taxonomy"})
# The keyword a reader that can read a leakage-unit column takes it by.
SPLIT_GROUP_ARGUMENT = "split_group_column"


@dataclass(frozen=True)
class ImageListing:
    """A source that names its image files in a CSV column: the sensor reads that column (only)
    and stats every file it names, so an image rewritten under an unchanged CSV is noticed."""

    csv_field: str  # the catalog field naming the CSV
    # (CSV header, catalog params) → the column holding the image paths (None: none found)
    path_column: Callable[[Sequence[str], Mapping[str, Any]], str | None]
    root_field: str = "image_root"  # the field naming the folder paths are relative to (default: the CSV's)


@dataclass(frozen=True)
class ReaderRecord:
    """One reader: its read function, its catalog fields and what the pipeline may ask of it.

    Fields:
      name: the catalog's ``reader:`` value.
      read: ``(**keywords) -> candidates`` (see ``ingest.readers``); `arguments` builds the keywords.
      required / optional: catalog fields the entry must / may give besides the common dataset fields.
      path_fields: fields naming a file or folder (``${VAR}`` expanded, anchored at the catalog's folder).
      list_fields: fields that take a list (or mapping); every other reader field is a single value.
      bool_fields: fields that take true/false.
      levels: label levels the source supplies by itself (None: any number of its columns); more
        need a ``taxonomy`` where the reader takes one. levels_from says where they come from.
      group: a reporting ``group`` can come from the source; group_argument is the keyword that
        receives the dataset's ``group`` column (None: the reader derives the group itself).
      split_group: a leakage unit (``split.group_by``) column can be read from the source.
      default_findings: non-empty for multi-label readers: the findings when ``findings`` is not given.
      renamed: catalog field → keyword of `read` (``csv`` → ``csv_path``); other fields keep their name.
      labels_argument: ``label_columns`` (gets every level the source supplies) or ``label_column``
        (gets the finest level), or None.
      out_dir: `read` writes images (generated or extracted) under ``<sources>/<dataset>``.
      hashed_fields: fields naming a file whose bytes are part of the source fingerprint.
      listing: how the source lists image files (the sensor stats each one), or None.
      walked_field: a field naming a folder whose image files are the source (walked by the sensor).
    A reader with neither ``listing`` nor ``walked_field`` lists no image file: its images are
    inside a hashed file (an .npz) or generated from its parameters.
    """

    name: str
    read: Callable[..., pd.DataFrame]
    required: frozenset[str] = frozenset()
    optional: frozenset[str] = frozenset()
    path_fields: frozenset[str] = frozenset()
    list_fields: frozenset[str] = frozenset()
    bool_fields: frozenset[str] = frozenset()
    levels: int | None = None
    levels_from: str = ""
    group: bool = False
    group_argument: str | None = None
    split_group: bool = False
    default_findings: tuple[str, ...] = ()
    renamed: Mapping[str, str] = field(default_factory=dict)
    labels_argument: str | None = "label_columns"
    out_dir: bool = False
    hashed_fields: tuple[str, ...] = ()
    listing: ImageListing | None = None
    walked_field: str | None = None

    @property
    def fields(self) -> frozenset[str]:
        """Every catalog field this reader takes (beyond the common dataset fields)."""
        return self.required | self.optional

    @property
    def multilabel(self) -> bool:
        return bool(self.default_findings)

    @property
    def takes_taxonomy(self) -> bool:
        return "taxonomy" in self.fields

    @property
    def lists_images(self) -> bool:
        """True when the source names or holds image files the sensor must stat."""
        return self.listing is not None or self.walked_field is not None

    def keyword(self, catalog_field: str) -> str:
        """The keyword of `read` that a catalog field is passed as."""
        return self.renamed.get(catalog_field, catalog_field)

    def arguments(self, spec: "DatasetSpec", sources_dir: str | Path, levels: Sequence[str] | None = None) -> dict:
        """The keyword arguments of `read` for a catalog entry.

        ``levels``: the label levels the source itself must supply (default all; fewer when a
        ``taxonomy`` CSV supplies the coarser ones)."""
        p = {k: v for k, v in spec.params.items() if k not in PIPELINE_FIELDS}
        kw: dict[str, Any] = {}
        for catalog_field, keyword in self.renamed.items():
            if catalog_field in p:
                kw[keyword] = p.pop(catalog_field)
        if self.labels_argument == "label_columns":
            kw["label_columns"] = tuple(levels or spec.labels)
        elif self.labels_argument == "label_column":
            kw["label_column"] = spec.finest_label
        if self.out_dir:
            kw["out_dir"] = Path(sources_dir) / spec.name
        if self.group_argument:
            kw[self.group_argument] = p.pop(self.group_argument, None) or spec.group
        # A leakage unit that is also the reporting group is copied from `group` after reading.
        if self.split_group and spec.split.group_by and spec.split.group_by != spec.group:
            kw[SPLIT_GROUP_ARGUMENT] = spec.split.group_by
        if self.multilabel:
            p["findings"] = list(spec.findings)
        return {**kw, **p}

    def keywords_it_needs(self) -> set[str]:
        """Every keyword `arguments` may pass (a test checks `read` takes each of them)."""
        names = {self.keyword(f) for f in self.fields - PIPELINE_FIELDS}
        names |= {n for n, used in (("label_columns", self.labels_argument == "label_columns"),
                                    ("label_column", self.labels_argument == "label_column"),
                                    ("out_dir", self.out_dir), (SPLIT_GROUP_ARGUMENT, self.split_group),
                                    ("findings", self.multilabel)) if used}
        if self.group_argument:
            names.add(self.group_argument)
        return names

    def signature(self) -> inspect.Signature:
        return inspect.signature(self.read)


def _vlm4bio_path_column(header: Sequence[str], params: Mapping[str, Any]) -> str | None:
    return next((c for c in ("fileNameAsDelivered", "fileName") if c in header), None)


_CSV = frozenset({"csv", "image_root"})

READERS: dict[str, ReaderRecord] = {r.name: r for r in (
    ReaderRecord(
        "vlm4bio_csv", _readers.read_vlm4bio_csv,
        required=frozenset({"csv"}), optional=frozenset({"image_root", "taxa", "taxa_column", "delimiter", "taxonomy"}),
        path_fields=_CSV | {"taxonomy"}, group=True, split_group=True, renamed={"csv": "csv_path"},
        hashed_fields=("csv", "taxonomy"), listing=ImageListing("csv", _vlm4bio_path_column)),
    ReaderRecord(
        "label_csv", _readers.read_label_csv,
        required=frozenset({"csv", "path_column"}),
        optional=frozenset({"image_root", "group_column", "split_column", "delimiter", "taxonomy"}),
        path_fields=_CSV | {"taxonomy"}, group=True, group_argument="group_column", split_group=True,
        renamed={"csv": "csv_path"}, hashed_fields=("csv", "taxonomy"),
        listing=ImageListing("csv", lambda header, params: params.get("path_column"))),
    ReaderRecord(
        "image_folder", _readers.read_image_folder,
        required=frozenset({"root"}), optional=frozenset({"taxonomy", "underscores_to_spaces"}),
        path_fields=frozenset({"root", "taxonomy"}), bool_fields=frozenset({"underscores_to_spaces"}),
        levels=1, levels_from="the folder or class name", labels_argument="label_column",
        hashed_fields=("taxonomy",), walked_field="root"),
    ReaderRecord(
        "medmnist_npz", _readers.read_medmnist_npz,
        required=frozenset({"npz"}), optional=frozenset({"class_names"}), path_fields=frozenset({"npz"}),
        list_fields=frozenset({"class_names"}), levels=1, levels_from="the class index",
        renamed={"npz": "npz_path"}, labels_argument="label_column", out_dir=True, hashed_fields=("npz",)),
    ReaderRecord(
        # seed: of the generated collection (the dataset's `seed` field: it seeds the evaluation too).
        "demo_shapes", _readers._read_demo_shapes,
        optional=frozenset({"images_per_species", "size", "seed"}), group=True, out_dir=True),
    ReaderRecord(
        "sklearn_digits", _readers._read_sklearn_digits,
        levels=1, levels_from="the digit", labels_argument="label_column", out_dir=True),
    ReaderRecord(
        "chexpert_csv", chexpert_candidates,
        required=frozenset({"csv"}), optional=frozenset({"path_column", "image_root", "findings"}),
        path_fields=_CSV, list_fields=frozenset({"findings"}), levels=1,
        levels_from="the derived stratum: the first positive finding", group=True, group_argument="group_column",
        default_findings=CHEXPERT_FINDINGS, renamed={"csv": "csv_path"}, hashed_fields=("csv",),
        listing=ImageListing("csv", lambda header, params: params.get("path_column", "Path"))),
)}


def read_source(kind: str, **params) -> pd.DataFrame:
    """Candidates from the reader ``READERS[kind]``, called with ``params`` as its keyword arguments
    (ManifestError naming the reader and what it takes when they do not fit). demo_shapes takes
    out_dir, seed, images_per_species, size, label_columns; sklearn_digits takes out_dir,
    label_column; both generate their collection into out_dir first."""
    from nfhm_pipeline.errors import ManifestError

    if kind not in READERS:
        raise ManifestError(f"unknown source kind {kind!r}; known kinds: {', '.join(READERS)}.")
    record = READERS[kind]
    signature = record.signature()
    try:
        signature.bind(**params)
    except TypeError as e:
        raise ManifestError(f"source kind {kind!r}: bad parameters {sorted(params)} ({e}); "
                            f"it takes {', '.join(signature.parameters)}.") from e
    return record.read(**params)
