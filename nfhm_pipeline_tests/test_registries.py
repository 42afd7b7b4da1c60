"""`ingest.READERS` is the one declaration of every reader: the catalog, `reader_params` and the
manifest sensor's fingerprint all read it, so a reader missing from one of them cannot happen."""
from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

import nfhm_pipeline.automation as automation
import nfhm_pipeline.catalog as catalog
import nfhm_pipeline.ingest.manifest as manifest_module
from nfhm_pipeline.automation import fingerprint_source
from nfhm_pipeline.catalog import load_catalog, parse_catalog
from nfhm_pipeline.errors import CatalogError
from nfhm_pipeline.ingest import READERS, ImageListing, ReaderRecord, read_source
from nfhm_pipeline.ingest.manifest import build_manifest, reader_params

MODELS = "models:\n  raw-pixels: {loader: raw_pixels, image_size: 8}\n"


def _holds_reader_names(value) -> bool:
    names = set(READERS)
    if isinstance(value, dict):
        return bool(set(map(str, value)) & names)
    if isinstance(value, (set, frozenset, tuple, list)):
        return bool({v for v in value if isinstance(v, str)} & names)
    return False


@pytest.mark.parametrize("module", [catalog, automation, manifest_module], ids=lambda m: m.__name__)
def test_no_consumer_keeps_its_own_list_of_readers(module):
    own = [name for name, value in vars(module).items()
           if value is not READERS and not inspect.ismodule(value) and _holds_reader_names(value)]
    assert own == [], f"{module.__name__} keeps reader names of its own in {own}: read ingest.READERS instead"
    assert getattr(module, "READERS", READERS) is READERS


def _minimal_entry(name: str, record: ReaderRecord) -> dict:
    entry = {"reader": name, "labels": ["label"]}
    for field in sorted(record.required):
        entry[field] = "file" if field == "path_column" else f"{field}.src"
    return entry


@pytest.mark.parametrize("name", sorted(READERS))
def test_every_reader_field_reaches_a_parameter_of_its_read_function(name, tmp_path):
    record = READERS[name]
    parameters = record.signature().parameters
    assert record.keywords_it_needs() <= set(parameters), (
        f"{name}: the catalog can pass {sorted(record.keywords_it_needs() - set(parameters))}, "
        f"which {record.read.__name__} does not take")
    assert set(record.renamed) <= record.fields
    assert record.path_fields | record.list_fields | record.bool_fields <= record.fields
    assert set(record.hashed_fields) <= record.path_fields
    assert record.walked_field is None or record.walked_field in record.path_fields
    # A minimal catalog entry loads, and its keyword arguments bind to the read function.
    spec = parse_catalog({"datasets": {"ds": _minimal_entry(name, record)},
                          "models": {"raw-pixels": {"loader": "raw_pixels"}}}, tmp_path / "c.yaml").datasets["ds"]
    record.signature().bind(**reader_params(spec, tmp_path / "sources"))


def _read_path_list(list_path, *, label_column: str, image_root=None) -> pd.DataFrame:
    """A reader defined only here: a one-column CSV ``path`` of ``<class>/<file>`` names."""
    list_path = Path(list_path)
    root = Path(image_root or list_path.parent)
    paths = pd.read_csv(list_path, dtype=str)["path"]
    return pd.DataFrame({"uri": [str(root / p) for p in paths], label_column: [p.split("/")[0] for p in paths],
                         "group": None, "split_group": None, "official_split": None,
                         "source_row": range(2, len(paths) + 2), "reject_reason": None})


PATH_LIST = ReaderRecord(
    "path_list", _read_path_list, required=frozenset({"list"}), optional=frozenset({"image_root"}),
    path_fields=frozenset({"list", "image_root"}), levels=1, levels_from="the class folder",
    renamed={"list": "list_path"}, labels_argument="label_column", hashed_fields=("list",),
    listing=ImageListing("list", lambda header, params: "path"))


def test_a_reader_declared_once_is_known_to_the_catalog_the_manifest_and_the_sensor(tmp_path, monkeypatch):
    monkeypatch.setitem(READERS, "path_list", PATH_LIST)
    names = []
    for c, cls in enumerate(("oak", "elm")):
        for i in range(3):
            (tmp_path / "img" / cls).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (9, 9), (60 * c, 30 * i, 90)).save(tmp_path / "img" / cls / f"{i}.png")
            names.append(f"{cls}/{i}.png")
    (tmp_path / "list.csv").write_text("path\n" + "\n".join(names) + "\n", encoding="utf-8")
    path = tmp_path / "cat.yaml"
    path.write_text(textwrap.dedent("""
        datasets:
          trees:
            reader: path_list
            list: list.csv
            image_root: img
            labels: [tree]
        """) + MODELS, encoding="utf-8")
    spec = load_catalog(path).datasets["trees"]
    assert spec.params == {"list": str(tmp_path / "list.csv"), "image_root": str(tmp_path / "img")}
    built = build_manifest(spec, tmp_path / "sources").manifest
    assert sorted(built["tree"]) == ["elm"] * 3 + ["oak"] * 3
    assert read_source("path_list", **reader_params(spec, tmp_path / "sources")).shape[0] == 6

    before = fingerprint_source(spec)
    assert before.files_stated == 6
    Image.new("RGB", (9, 9), (1, 2, 3)).save(tmp_path / "img" / "elm" / "1.png")  # same name, new bytes
    assert fingerprint_source(spec).digest != before.digest

    # The record's rules hold at load: a second level, or no `list`, is refused naming the field.
    path.write_text(path.read_text(encoding="utf-8").replace("labels: [tree]", "labels: [tree, genus]"))
    with pytest.raises(CatalogError, match=r"'trees'.*supplies only 1 \(the class folder\)"):
        load_catalog(path)
    path.write_text(path.read_text(encoding="utf-8").replace("    list: list.csv\n", ""))
    with pytest.raises(CatalogError, match=r"'trees': reader 'path_list' needs field\(s\) \['list'\]"):
        load_catalog(path)


def test_chexpert_is_declared_to_list_its_images():
    record = READERS["chexpert_csv"]
    assert record.lists_images and record.listing is not None and record.multilabel
    assert record.listing.path_column(["Path", "Edema"], {}) == "Path"
    assert record.listing.path_column(["img", "Edema"], {"path_column": "img"}) == "img"
