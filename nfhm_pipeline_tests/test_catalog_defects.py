"""Regression tests for the catalog and reader defects found by outside testing (issues 11 and 16).

Each builds a real catalog file and real images in tmp_path and goes through the same loader and
manifest stage the assets use.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.errors import CatalogError, ManifestError, SettingsError
from nfhm_pipeline.ingest.manifest import build_manifest

MODELS = """
models:
  raw-pixels:
    loader: raw_pixels
    image_size: 8
"""


def write_catalog(tmp_path: Path, datasets: str, models: str = MODELS, name: str = "cat.yaml") -> Path:
    path = tmp_path / name
    path.write_text("datasets:\n" + datasets + models, encoding="utf-8")
    return path


def png(path: Path, seed: int, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def csv_dataset(tmp_path: Path, text: str, extra: str = "", labels: str = "[species]") -> Path:
    for i in range(6):
        png(tmp_path / "img" / f"{i}.png", i)
    (tmp_path / "labels.csv").write_text(text, encoding="utf-8")
    return write_catalog(tmp_path, f"""
  ds:
    reader: label_csv
    csv: labels.csv
    path_column: file
    labels: {labels}
{extra}""")


# --- issue 11 item 2: the reporting group and the leakage unit are two settings -------------------

def test_split_group_by_names_the_leakage_unit_and_reaches_the_manifest(tmp_path):
    rows = "".join(f"img/{i}.png,sp{i % 2},v{i // 2},site{i % 3}\n" for i in range(6))
    cat = csv_dataset(tmp_path, "file,species,video,site\n" + rows,
                      "    group: site\n    split: {group_by: video}\n")
    spec = load_catalog(cat).datasets["ds"]
    assert spec.group == "site" and spec.split.group_by == "video" and spec.split.grouped
    manifest = build_manifest(spec, tmp_path / "sources").manifest.sort_values("uri")
    assert manifest["split_group"].tolist() == ["v0", "v0", "v1", "v1", "v2", "v2"]
    assert manifest["group"].tolist() == ["site0", "site1", "site2", "site0", "site1", "site2"]


def test_reporting_group_alone_is_no_leakage_unit(tmp_path):
    rows = "".join(f"img/{i}.png,sp{i % 2},v{i // 2}\n" for i in range(6))
    cat = csv_dataset(tmp_path, "file,species,video\n" + rows, "    group_column: video\n")
    spec = load_catalog(cat).datasets["ds"]
    assert spec.split.group_by is None and not spec.split.grouped
    assert build_manifest(spec, tmp_path / "sources").manifest["split_group"].isna().all()


def test_old_grouped_flag_means_group_by_the_group_column(tmp_path):
    rows = "".join(f"img/{i}.png,sp{i % 2},v{i // 2}\n" for i in range(6))
    cat = csv_dataset(tmp_path, "file,species,video\n" + rows, "    group: video\n    split: {grouped: true}\n")
    spec = load_catalog(cat).datasets["ds"]
    assert spec.split.group_by == "video"
    manifest = build_manifest(spec, tmp_path / "sources").manifest
    assert (manifest["split_group"] == manifest["group"]).all()


@pytest.mark.parametrize("extra, field", [
    ("    split: {group_by: [video]}\n", "'split.group_by'"),
    ("    split: {near_duplicates: erase}\n", "'split.near_duplicates'"),
    ("    split: {max_group_share: 0}\n", "'split.max_group_share'"),
    ("    split: {near_duplicate_distance: 99}\n", "'split.near_duplicate_distance'"),
    ("    split: {grouped: true}\n", "'split.grouped'"),
])
def test_bad_split_settings_are_refused_naming_the_field(tmp_path, extra, field):
    cat = csv_dataset(tmp_path, "file,species\nimg/0.png,a\n", extra)
    with pytest.raises(CatalogError, match=field.replace(".", r"\.")):
        load_catalog(cat)


def test_image_folder_cannot_supply_a_leakage_unit(tmp_path):
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n"
                                  "    split: {group_by: patient}\n")
    with pytest.raises(CatalogError, match="split.group_by"):
        load_catalog(cat)


# --- issue 11 item 7: CSV delimiter -----------------------------------------------------------------

SEMICOLON = "Index;file;species\n" + "".join(f"{i};img/{i}.png;sp{i % 2}\n" for i in range(6))


def test_semicolon_csv_reads_with_a_delimiter_field(tmp_path):
    cat = csv_dataset(tmp_path, SEMICOLON, '    delimiter: ";"\n')
    manifest = build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources").manifest
    assert sorted(manifest["species"]) == ["sp0", "sp0", "sp0", "sp1", "sp1", "sp1"]


def test_semicolon_csv_without_delimiter_says_which_separator_it_saw(tmp_path):
    cat = csv_dataset(tmp_path, SEMICOLON)
    with pytest.raises(ManifestError, match=r"';'-separated.*delimiter"):
        build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources")


def test_tab_separated_csv_reads_with_delimiter_tab(tmp_path):
    cat = csv_dataset(tmp_path, SEMICOLON.replace(";", "\t"), "    delimiter: tab\n")
    assert len(build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources").manifest) == 6


def test_unknown_delimiter_is_refused_at_load(tmp_path):
    cat = csv_dataset(tmp_path, SEMICOLON, '    delimiter: "::"\n')
    with pytest.raises(CatalogError, match="'delimiter'"):
        load_catalog(cat)


# --- issue 11 item 8: taxonomy from a lookup table ----------------------------------------------------

def test_taxonomy_csv_supplies_the_coarser_levels(tmp_path):
    (tmp_path / "taxonomy.csv").write_text("species,genus,family\nsp0,G0,F\nsp1,G1,F\nunused,G9,F\n")
    rows = "".join(f"img/{i}.png,sp{i % 2}\n" for i in range(6))
    cat = csv_dataset(tmp_path, "file,species\n" + rows, "    taxonomy: taxonomy.csv\n",
                      labels="[species, genus, family]")
    manifest = build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources").manifest
    pairs = set(zip(manifest["species"], manifest["genus"], manifest["family"]))
    assert pairs == {("sp0", "G0", "F"), ("sp1", "G1", "F")}


def test_species_missing_from_the_taxonomy_are_named(tmp_path):
    (tmp_path / "taxonomy.csv").write_text("species,genus\nsp0,G0\n")
    rows = "".join(f"img/{i}.png,sp{i % 2}\n" for i in range(6))
    cat = csv_dataset(tmp_path, "file,species\n" + rows, "    taxonomy: taxonomy.csv\n", labels="[species, genus]")
    with pytest.raises(ManifestError, match=r"not in the taxonomy, e\.g\. \['sp1'\]"):
        build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources")


def test_taxonomy_giving_one_species_two_genera_is_refused(tmp_path):
    (tmp_path / "taxonomy.csv").write_text("species,genus\nsp0,G0\nsp0,G1\nsp1,G1\n")
    rows = "".join(f"img/{i}.png,sp{i % 2}\n" for i in range(6))
    cat = csv_dataset(tmp_path, "file,species\n" + rows, "    taxonomy: taxonomy.csv\n", labels="[species, genus]")
    with pytest.raises(ManifestError, match="different coarser labels"):
        build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources")


def test_image_folder_with_a_taxonomy_gets_genus(tmp_path):
    for cls in ("sp0", "sp1"):
        for i in range(3):
            png(tmp_path / "imgs" / cls / f"{i}.png", hash((cls, i)) % 1000)
    (tmp_path / "taxonomy.csv").write_text("species,genus\nsp0,G0\nsp1,G1\n")
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    taxonomy: taxonomy.csv\n"
                                  "    labels: [species, genus]\n")
    manifest = build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources").manifest
    assert set(zip(manifest["species"], manifest["genus"])) == {("sp0", "G0"), ("sp1", "G1")}


# --- issue 11 item 9: image_folder asked for more than a folder can supply ----------------------------

@pytest.mark.parametrize("extra, field", [
    ("    labels: [species, genus]\n", "'labels'.*taxonomy"),
    ("    labels: [label]\n    group: site\n", "'group'"),
])
def test_image_folder_asked_for_more_than_a_folder_gives_is_refused_at_load(tmp_path, extra, field):
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n" + extra)
    with pytest.raises(CatalogError, match=field):
        load_catalog(cat)


# --- issue 11 item 20: bringing your own images ----------------------------------------------------------

def test_models_from_a_shipped_catalog_keep_their_own_paths(tmp_path):
    elsewhere = tmp_path / "deep" / "elsewhere"
    elsewhere.mkdir(parents=True)
    cat = write_catalog(elsewhere, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n",
                        models="models:\n  mobilenet-v2-imagenet: {from: shared}\n")
    shipped = load_catalog("shared").models["mobilenet-v2-imagenet"]
    mine = load_catalog(cat).models["mobilenet-v2-imagenet"]
    assert mine.params["weights"] == shipped.params["weights"]
    assert not mine.params["weights"].startswith(str(elsewhere))


def test_include_models_brings_every_model_of_a_catalog(tmp_path):
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n",
                        models="include_models: [demo]\n")
    assert set(load_catalog(cat).models) == set(load_catalog("demo").models)


def test_from_names_a_model_the_other_catalog_lacks(tmp_path):
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n",
                        models="models:\n  bioclip: {from: demo}\n")
    with pytest.raises(CatalogError, match="has no model 'bioclip'"):
        load_catalog(cat)


def test_a_catalog_including_itself_is_refused(tmp_path):
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n",
                        models="include_models: [./cat.yaml]\n")
    with pytest.raises(CatalogError, match="in itself"):
        load_catalog(cat)


def test_folder_underscores_become_spaces_when_asked(tmp_path):
    for i in range(2):
        png(tmp_path / "imgs" / "Danaus_plexippus" / f"{i}.png", i)
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [species]\n"
                                  "    underscores_to_spaces: true\n")
    manifest = build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources").manifest
    assert set(manifest["species"]) == {"Danaus plexippus"}


def test_an_unset_environment_variable_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.delenv("VLM4BIO_ROOT", raising=False)
    cat = write_catalog(tmp_path, "  ds:\n    reader: label_csv\n    csv: ${VLM4BIO_ROOT}/labels.csv\n"
                                  "    path_column: file\n    labels: [species]\n")
    with pytest.raises(ManifestError, match=r"VLM4BIO_ROOT\}, which is not set: export VLM4BIO_ROOT="):
        build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources")


# --- issue 16 item 7: image_folder skips nothing silently -------------------------------------------------

def test_image_folder_reports_every_entry_it_cannot_use(tmp_path):
    root = tmp_path / "imgs"
    png(root / "a" / "ok.png", 1)
    png(root / "a" / "ok2.png", 2)
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / "a" / "photo.jfif", format="JPEG")
    Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).save(root / "a" / "photo.jpe", format="JPEG")
    (root / "a" / "scan.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (root / "a" / "drawing.svg").write_text("<svg/>")
    (root / "a" / "gone.png").symlink_to(root / "a" / "nowhere.png")
    (root / "a" / "loop.png").symlink_to(root / "a" / "loop.png")
    (root / "a" / "folder.png").mkdir()
    png(root / "b" / "ok.png", 3)
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n")
    build = build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources")
    assert sorted(Path(u).name for u in build.manifest["uri"]) == ["ok.png", "ok.png", "ok2.png", "photo.jfif",
                                                                  "photo.jpe"]
    reasons = {Path(u).name: r for u, r in zip(build.rejected["uri"], build.rejected["reason"])}
    assert reasons == {"scan.heic": "unsupported_format", "drawing.svg": "unsupported_format",
                       "gone.png": "dangling_symlink", "loop.png": "symlink_loop", "folder.png": "folder_not_image"}
    assert build.rejected["detail"].str.len().gt(0).all()


# --- issue 16 item 8: names that failed later are refused at load -------------------------------------------

@pytest.mark.parametrize("key, match", [
    ("raw...pixels", "no '..'"),
    ("a" * 250, "at most 64"),
])
def test_model_keys_that_break_later_are_refused(tmp_path, key, match):
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n",
                        models=f"models:\n  {key}:\n    loader: raw_pixels\n")
    with pytest.raises(CatalogError, match=match):
        load_catalog(cat)


@pytest.mark.parametrize("column", ["group", "mode", "width", "uri", "image_id", "split_group"])
def test_reserved_manifest_columns_are_refused_as_labels(tmp_path, column):
    cat = csv_dataset(tmp_path, "file,species\nimg/0.png,a\n", labels=f"[species, {column}]")
    with pytest.raises(CatalogError, match=f"'{column}' is a column the manifest itself defines"):
        load_catalog(cat)


def test_reserved_column_is_refused_as_group(tmp_path):
    cat = csv_dataset(tmp_path, "file,species\nimg/0.png,a\n", "    group: height\n")
    with pytest.raises(CatalogError, match="'group'.*'height'"):
        load_catalog(cat)


@pytest.mark.parametrize("level", ["../../../../tmp/x/PWNED", "a/b", ".hidden"])
def test_label_levels_with_path_characters_are_refused(tmp_path, level):
    cat = csv_dataset(tmp_path, "file,species\nimg/0.png,a\n", labels=f'[species, "{level}"]')
    with pytest.raises(CatalogError, match="not usable as a column name"):
        load_catalog(cat)


# --- issue 16 items 9, 10, 11: raw tracebacks, billion laughs, silent choices --------------------------------

@pytest.mark.parametrize("field, value", [
    ("loader", "[raw_pixels]"), ("loader", "{a: b}"), ("image_size", "[8, 8]"), ("image_size", "{a: 1}"),
])
def test_list_or_mapping_where_a_scalar_belongs_is_a_sentence(tmp_path, field, value):
    models = MODELS.replace("    image_size: 8", "    image_size: 8" if field == "loader" else f"    {field}: {value}")
    if field == "loader":
        models = models.replace("loader: raw_pixels", f"loader: {value}")
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n", models)
    with pytest.raises(CatalogError, match=f"'{field}'"):
        load_catalog(cat)


@pytest.mark.parametrize("field", ["reader", "prompts", "uncertain_policy", "description"])
def test_list_in_a_dataset_choice_field_is_a_sentence(tmp_path, field):
    cat = write_catalog(tmp_path, f"  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n"
                                  f"    {field}: [a, b]\n".replace("    reader: image_folder\n", "" if field == "reader" else "    reader: image_folder\n"))
    with pytest.raises(CatalogError, match=f"'{field}'"):
        load_catalog(cat)


def test_deeply_nested_yaml_is_refused_without_recursion_error(tmp_path):
    cat = tmp_path / "deep.yaml"
    cat.write_text("datasets:\n  ds:\n    description: " + "[" * 5000 + "]" * 5000 + "\n" + MODELS)
    with pytest.raises(CatalogError, match="nested more than"):
        load_catalog(cat)


def test_billion_laughs_is_refused_at_once(tmp_path):
    lol = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lol.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    cat = tmp_path / "laughs.yaml"
    cat.write_text("datasets:\n  ds:\n    reader: image_folder\n    root: x\n    labels: [label]\n"
                   "    description:\n" + "".join(f"      {line}\n" for line in lol) + MODELS)
    start = time.monotonic()
    with pytest.raises(CatalogError, match="aliases"):
        load_catalog(cat)
    assert time.monotonic() - start < 5  # refused before any expansion, not after minutes


def test_a_model_key_given_twice_is_refused(tmp_path):
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n",
                        models=MODELS + "  raw-pixels:\n    loader: raw_pixels\n    image_size: 16\n")
    with pytest.raises(CatalogError, match="'raw-pixels' is given twice"):
        load_catalog(cat)


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    cat = csv_dataset(tmp_path, "file,species,species\nimg/0.png,a,b\n")
    with pytest.raises(ManifestError, match=r"more than once.*species|species.*more than once"):
        build_manifest(load_catalog(cat).datasets["ds"], tmp_path / "sources")


def test_trust_remote_code_must_be_a_boolean(tmp_path):
    models = "models:\n  f2:\n    loader: transformers\n    model: ./florence\n    trust_remote_code: 'yes'\n"
    cat = write_catalog(tmp_path, "  ds:\n    reader: image_folder\n    root: imgs\n    labels: [label]\n", models)
    with pytest.raises(CatalogError, match="'trust_remote_code' must be true or false"):
        load_catalog(cat)


# --- issue 12 item 6: validation at the edge ---------------------------------------------------------------

def test_chexpert_findings_are_validated_at_load(tmp_path):
    cat = write_catalog(tmp_path, "  xr:\n    reader: chexpert_csv\n    csv: train.csv\n    labels: [stratum]\n"
                                  "    findings: [Edema, uri]\n")
    with pytest.raises(CatalogError, match="'findings' uses reserved"):
        load_catalog(cat)


@pytest.mark.parametrize("name, value", [("NFHM_PRECISION", "fp8"), ("NFHM_DEVICE", "tpu"),
                                         ("NFHM_BATCH_SIZE", "many"), ("NFHM_LOADER_WORKERS", "-1")])
def test_bad_environment_settings_are_a_sentence(monkeypatch, name, value):
    from nfhm_pipeline.resources import default_resources

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=f"{name}={value!r}"):
        default_resources()


def test_bad_environment_setting_through_the_cli_prints_no_traceback(tmp_path):
    env = {**os.environ, "NFHM_PRECISION": "fp8", "NFHM_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "nfhm_pipeline.cli", "models"], env=env, capture_output=True,
                         text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "Traceback" not in text
    if out.returncode:  # `nfhm models` may not need the resources at all; if it fails it must say why
        assert "NFHM_PRECISION" in text


def test_the_video_example_catalog_declares_a_leakage_unit():
    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "video_frames.yaml"
    spec = load_catalog(example).datasets["butterfly_videos"]
    assert spec.split.group_by == "video_name" and spec.group == "site"


def test_a_reserved_name_as_a_label_is_refused_naming_the_dataset_and_field(tmp_path):
    cat = csv_dataset(tmp_path, "file,uri\nimg/0.png,a\n", labels="[uri]")
    with pytest.raises(CatalogError, match=r"dataset 'ds': field 'labels': 'uri' is a column the manifest"):
        load_catalog(cat)


CHEST = "  xr:\n    reader: chexpert_csv\n    csv: train.csv\n    labels: [stratum]\n"


def test_findings_are_computed_at_load_default_chexpert_and_finding_columns_returns_them(tmp_path):
    from nfhm_pipeline.evaluation.multilabel_tables import finding_columns
    from nfhm_pipeline.ingest.chexpert import CHEXPERT_FINDINGS

    default = load_catalog(write_catalog(tmp_path, CHEST)).datasets["xr"]
    assert default.multilabel and default.findings == CHEXPERT_FINDINGS
    given = load_catalog(write_catalog(tmp_path, CHEST + "    findings: [Edema, Cardiomegaly]\n",
                                       name="given.yaml")).datasets["xr"]
    assert given.findings == ("Edema", "Cardiomegaly") and finding_columns(given) == ["Edema", "Cardiomegaly"]
    single = load_catalog(csv_dataset(tmp_path, "file,species\nimg/0.png,a\n")).datasets["ds"]
    assert single.findings == () and finding_columns(single) == []


@pytest.mark.parametrize("extra, match", [
    ("    findings: Edema\n", "'findings' must be a non-empty list"),
    ("    findings: [Edema, Edema]\n", "'findings' lists a column twice"),
    ("    findings: [Edema, stratum]\n", r"'findings' uses reserved.*\['stratum'\]"),
])
def test_bad_findings_are_refused_at_load(tmp_path, extra, match):
    with pytest.raises(CatalogError, match=r"dataset 'xr'.*" + match):
        load_catalog(write_catalog(tmp_path, CHEST + extra))


def test_default_findings_clashing_with_a_label_are_refused_at_load(tmp_path):
    with pytest.raises(CatalogError, match=r"'findings' uses reserved.*\['Edema'\]"):
        load_catalog(write_catalog(tmp_path, CHEST.replace("[stratum]", "[Edema]")))


@pytest.mark.parametrize("extra, match", [
    ("    labels: [a, b]\n", r"'labels' lists 2 levels.*supplies only 1 \(the derived stratum"),
    ("    delimiter: ';'\n", r"unknown field\(s\) \['delimiter'\]"),  # chexpert's reader reads commas only
])
def test_chexpert_entries_its_reader_cannot_serve_are_refused_at_load(tmp_path, extra, match):
    text = CHEST.replace("    labels: [stratum]\n", "") + extra if "labels" in extra else CHEST + extra
    with pytest.raises(CatalogError, match=match):
        load_catalog(write_catalog(tmp_path, text))


def test_a_field_the_reader_requires_is_refused_when_missing(tmp_path):
    cat = write_catalog(tmp_path, "  ds:\n    reader: label_csv\n    csv: labels.csv\n    labels: [species]\n")
    with pytest.raises(CatalogError, match=r"dataset 'ds': reader 'label_csv' needs field\(s\) \['path_column'\]"):
        load_catalog(cat)


def test_dataset_seed_defaults_to_the_split_seed_and_can_be_set_apart(tmp_path):
    spec = load_catalog(csv_dataset(tmp_path, "file,species\nimg/0.png,a\n",
                                    "    split: {seed: 7}\n")).datasets["ds"]
    assert (spec.split.seed, spec.seed) == (7, 7)
    (tmp_path / "cat.yaml").unlink()
    spec = load_catalog(csv_dataset(tmp_path, "file,species\nimg/0.png,a\n",
                                    "    seed: 3\n    split: {seed: 7}\n")).datasets["ds"]
    assert (spec.split.seed, spec.seed) == (7, 3)
    assert load_catalog("demo").datasets["digits"].seed == 0


@pytest.mark.parametrize("extra, field", [
    ("    seed: true\n", "'seed'"), ("    seed: -1\n", "'seed'"), ("    seed: 1.5\n", "'seed'"),
    ("    seed: '3'\n", "'seed'"), ("    seed: [1]\n", "'seed'"), ("    split: {seed: -2}\n", "'split.seed'"),
])
def test_bad_seeds_are_refused_naming_the_field(tmp_path, extra, field):
    cat = csv_dataset(tmp_path, "file,species\nimg/0.png,a\n", extra)
    with pytest.raises(CatalogError, match=rf"dataset 'ds': field {field} must be an integer ≥ 0"):
        load_catalog(cat)


def test_demo_shapes_seed_seeds_the_generated_collection_and_the_evaluation(tmp_path):
    from nfhm_pipeline.ingest.manifest import reader_params

    cat = write_catalog(tmp_path, "  shapes:\n    reader: demo_shapes\n    labels: [species]\n    seed: 4\n"
                                  "    images_per_species: 2\n")
    spec = load_catalog(cat).datasets["shapes"]
    assert spec.seed == 4 and spec.split.seed == 0
    assert reader_params(spec, tmp_path)["seed"] == 4
