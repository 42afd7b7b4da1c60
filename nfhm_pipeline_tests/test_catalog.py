"""The catalog: shipped files load; every malformed entry names the file, the entry and the field."""
from pathlib import Path

import pytest

from nfhm_pipeline.catalog import available_catalogs, load_catalog, resolve_catalog_path
from nfhm_pipeline.errors import CatalogError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cat.yaml"
    path.write_text(text, encoding="utf-8")
    return path


GOOD = """
datasets:
  birds:
    reader: image_folder
    root: images
    taxonomy: taxonomy.csv
    labels: [species, genus]
models:
  raw-pixels:
    loader: raw_pixels
"""


def test_every_shipped_catalog_loads():
    assert {"demo", "shared", "vlm4bio", "medical"} <= set(available_catalogs())
    for name in available_catalogs():
        catalog = load_catalog(name)
        assert catalog.datasets and catalog.models


def test_demo_is_the_default_catalog(monkeypatch):
    monkeypatch.delenv("NFHM_CATALOG", raising=False)
    assert resolve_catalog_path().name == "demo.yaml"


def test_nfhm_catalog_selects_a_file_by_path(tmp_path, monkeypatch):
    monkeypatch.setenv("NFHM_CATALOG", str(write(tmp_path, GOOD)))
    catalog = load_catalog()
    assert list(catalog.datasets) == ["birds"]
    assert catalog.datasets["birds"].params["root"] == str(tmp_path / "images")


def test_unknown_catalog_name_lists_the_shipped_ones():
    with pytest.raises(CatalogError, match="demo"):
        load_catalog("no-such-catalog")


@pytest.mark.parametrize("bad, field", [
    (GOOD.replace("labels: [species, genus]", "labels: []"), "'labels'"),
    (GOOD.replace("reader: image_folder", "reader: magic"), "'reader'"),
    (GOOD.replace("loader: raw_pixels", "loader: nope"), "'loader'"),
    (GOOD.replace("    root: images", "    root: images\n    split: {test_fraction: 1.5}"), "'split.test_fraction'"),
    (GOOD.replace("    root: images", "    root: images\n    colour: red"), "colour"),
    (GOOD.replace("raw-pixels:", "Raw Pixels:"), "slug"),
    (GOOD.replace("raw-pixels:", "'hf-hub:org/repo':"), "slug"),
    (GOOD.replace("    root: images", "    root: images\n    models: [missing-model]"), "'models'"),
    (GOOD.replace("    root: images", "    root: images\n    split: {grouped: true}"), "'split.grouped'"),
])
def test_malformed_entry_names_file_entry_and_field(tmp_path, bad, field):
    path = write(tmp_path, bad)
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    message = str(err.value)
    assert str(path) in message and field in message
    assert "'birds'" in message or "'raw-pixels'" in message or "Raw Pixels" in message or "hf-hub" in message


def test_invalid_yaml_is_a_catalog_error(tmp_path):
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(write(tmp_path, "datasets: [unclosed"))


def test_env_references_in_paths_are_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("PHOTO_ROOT", "/srv/photos")
    catalog = load_catalog(write(tmp_path, GOOD.replace("root: images", "root: ${PHOTO_ROOT}/birds")))
    assert catalog.datasets["birds"].params["root"] == "/srv/photos/birds"


def test_hub_ids_are_not_treated_as_paths():
    model = load_catalog("vlm4bio").models["arborclip"]
    assert model.params["state_dict"].startswith("hf-hub:ChihHsuan-Yang/ArborCLIP/")


def test_a_model_field_its_loader_does_not_read_is_refused(tmp_path):
    # `size` instead of `image_size` used to be silently ignored.
    path = write(tmp_path, GOOD.replace("loader: raw_pixels", "loader: raw_pixels\n    size: 8"))
    with pytest.raises(CatalogError, match=r"'raw-pixels'.*\['size'\].*image_size"):
        load_catalog(path)
