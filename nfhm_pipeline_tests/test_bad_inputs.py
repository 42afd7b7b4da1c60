"""Hostile and malformed inputs through the real Dagster assets, end to end.

Each input gives either a run that fails with one of the project's errors naming the file and what
to do, or a rejected row with its reason, while every good row lands in the manifest (and the
lake). Reader-level details (one function, one case) live in test_readers.py / test_images.py;
here the same kinds of input go through ``<dataset>/image_manifest`` (and ``image_embeddings``),
the warehouse, and the catalog, which is what a user meets.

Case counts (the closing report quotes them): see ``CSV_FAILURES``, ``BAD_ROWS``, ``GOOD_ROWS``,
``HOSTILE_NAMES``, ``ODD_IMAGES`` and ``HOSTILE_KEYS``.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import textwrap
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from PIL import Image, features

from conftest import REPO_ROOT, local_resources
from helpers import materialize, random_png, user_error
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.errors import CatalogError, StorageError
from nfhm_pipeline.store import warehouse
from nfhm_pipeline.store.embedding_store import EmbeddingStore, EmbeddingTable

RAW = {"raw-pixels": "loader: raw_pixels\n    image_size: 8",
       "raw-pixels-crop": "loader: raw_pixels\n    image_size: 8\n    resize: shorter_crop"}


# -- helpers ---------------------------------------------------------------------------------------

def catalog_file(folder: Path, datasets: str, models=("raw-pixels",)) -> Path:
    body = "datasets:\n" + textwrap.indent(textwrap.dedent(datasets), "  ") + "models:\n"
    body += "".join(f"  {m}:\n    {RAW[m]}\n" for m in models)
    path = folder / "catalog.yaml"
    path.write_text(body, encoding="utf-8")
    return path


def csv_dataset(name: str, csv_path: Path, labels="[species]") -> str:
    return f"""
    {name}:
      reader: label_csv
      csv: {csv_path}
      path_column: path
      labels: {labels}
    """


# -- malformed CSV files: the run fails with a ManifestError naming the file ----------------------

GOOD_CSV = "path,species\nimages/a.png,acer\nimages/b.png,betula\n"
CSV_FAILURES = {
    "missing_path_column": (b"file,species\nimages/a.png,acer\n", "column 'path' is missing"),
    "missing_label_column": (b"path,genus\nimages/a.png,Acer\n", "column 'species' is missing"),
    "latin1_encoding": ("path,species\nimages/a.png,Acer campêstre\n".encode("latin-1"), "not valid UTF-8"),
    "utf16_encoding": (GOOD_CSV.encode("utf-16"), "not valid UTF-8"),
    "binary_file": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe" * 20, "not valid UTF-8"),
    "too_many_fields": (b"path,species\nimages/a.png,acer\nimages/b.png,betula,extra,fields\n", "cannot be parsed"),
    "unterminated_quote": (b'path,species\n"images/a.png,acer\nimages/b.png,betula\n', "cannot be parsed"),
    "header_only": (b"path,species\n", "no rows"),
    "empty_file": (b"", "empty"),
    "file_missing": (None, "not found"),
    "folder_instead_of_file": ("folder", "not found"),
}


@pytest.mark.parametrize("case", list(CSV_FAILURES))
def test_malformed_csv_fails_the_manifest_run_with_a_manifest_error_naming_the_file(tmp_path, case):
    content, phrase = CSV_FAILURES[case]
    csv_path = tmp_path / "inbox" / "labels.csv"
    random_png(tmp_path / "inbox" / "images" / "a.png", 1)
    random_png(tmp_path / "inbox" / "images" / "b.png", 2)
    if content == "folder":
        csv_path.mkdir()
    elif content is not None:
        csv_path.write_bytes(content)
    defs = build_definitions(load_catalog(catalog_file(tmp_path, csv_dataset("inbox", csv_path))),
                             local_resources(tmp_path / "data"))
    with dg.instance_for_test() as instance:
        result = materialize(defs, instance, "inbox", ["image_manifest"])
    assert not result.success
    message = user_error(result)
    assert message.startswith("ManifestError: ") and str(csv_path) in message and phrase in message


def test_a_broken_csv_keeps_the_last_good_manifest_and_warehouse_rows(tmp_path):
    csv_path = tmp_path / "inbox" / "labels.csv"
    random_png(tmp_path / "inbox" / "images" / "a.png", 1)
    random_png(tmp_path / "inbox" / "images" / "b.png", 2)
    csv_path.write_text(GOOD_CSV, encoding="utf-8")
    data = tmp_path / "data"
    defs = build_definitions(load_catalog(catalog_file(tmp_path, csv_dataset("inbox", csv_path))), local_resources(data))
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, "inbox", ["image_manifest"]).success
        csv_path.write_bytes(GOOD_CSV.replace("acer", "acér").encode("latin-1"))  # a spreadsheet re-save
        assert not materialize(defs, instance, "inbox", ["image_manifest"]).success
    assert len(pd.read_parquet(data / "manifests" / "inbox.parquet")) == 2
    assert len(warehouse.read_table(data / "warehouse.duckdb", "images", dataset="inbox")) == 2


# -- bad rows among good ones: rejected with a reason, good rows all kept -------------------------

# name → (path cell, label cell, expected reject reason); files are made by ``bad_rows_run``.
BAD_ROWS = {
    "listed_twice": ("images/good_0.png", "acer", "duplicate_image"),
    "same_bytes_other_name": ("images/copy_of_good_1.png", "acer", "duplicate_image"),
    "dotdot_escape": ("../outside.png", "acer", "outside_root"),
    "absolute_outside": ("/etc/hostname", "acer", "outside_root"),
    "nested_dotdot_escape": ("images/../../outside.png", "acer", "outside_root"),
    "missing_file": ("images/nope.png", "acer", "missing_file"),
    "empty_label": ("images/no_label.png", "", "missing_label"),
    "whitespace_label": ("images/blank_label.png", "   ", "missing_label"),
    "folder_listed": ("images/subfolder", "acer", "missing_file"),
    "text_named_png": ("images/text.png", "acer", "not_an_image"),
    "cut_in_half": ("images/half.png", "acer", "truncated"),
    "zero_bytes": ("images/zero.png", "acer", "empty_file"),
    "path_too_long": ("images/" + "a" * 5000 + ".png", "acer", "missing_file"),
    "empty_path": ("", "acer", "missing_file"),
    "windows_separators": ("images\\good_2.png", "acer", "missing_file"),
    "url_not_path": ("https://example.org/a.png", "acer", "missing_file"),
}
# name → (path cell, label cell, label as stored)
GOOD_ROWS = {
    "plain": ("images/good_0.png", "acer", "acer"),
    "plain_2": ("images/good_1.png", "betula", "betula"),
    "plain_3": ("images/good_2.png", "betula", "betula"),
    "padded_path": ("  images/padded.png  ", "acer", "acer"),
    "sql_in_label": ("images/sql.png", "x'); DROP TABLE images; --", "x'); DROP TABLE images; --"),
    "quotes_comma_newline_label": ("images/quoted.png", 'Acer "the maple",\nnorth', 'Acer "the maple",\nnorth'),
    "cjk_label": ("images/cjk.png", "蝴蝶", "蝴蝶"),
    "accented_label": ("images/accent.png", "Æthusa cynápium", "Æthusa cynápium"),
    "emoji_label": ("images/emoji.png", "🦋 morpho", "🦋 morpho"),
    "rtl_label": ("images/rtl.png", "فراشة", "فراشة"),
    "padded_label": ("images/padded_label.png", "  quercus  ", "quercus"),
}


@pytest.fixture(scope="module")
def bad_rows_run(tmp_path_factory):
    """One CSV mixing every bad row with the good ones, through image_manifest once.
    Yields (data_dir, {case: CSV line number}, image root)."""
    tmp = tmp_path_factory.mktemp("bad-rows")
    root = tmp / "inbox"
    images = root / "images"
    for i, name in enumerate(["good_0", "good_1", "good_2", "padded", "sql", "quoted", "cjk", "accent", "emoji",
                              "rtl", "padded_label", "no_label", "blank_label"]):
        random_png(images / f"{name}.png", seed=100 + i)
    (images / "copy_of_good_1.png").write_bytes((images / "good_1.png").read_bytes())
    random_png(tmp / "outside.png", seed=999)
    (images / "subfolder").mkdir()
    (images / "text.png").write_text("not an image")
    (images / "half.png").write_bytes((images / "good_2.png").read_bytes()[:60])
    (images / "zero.png").write_bytes(b"")
    rows, lines = [], {}
    for case, (path, label, *_) in [*GOOD_ROWS.items(), *BAD_ROWS.items()]:
        rows.append((path, label))
        lines[case] = len(rows) + 1  # the header is line 1
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "species"])
    writer.writerows(rows)
    (root / "labels.csv").write_text(buf.getvalue(), encoding="utf-8")
    data = tmp / "data"
    defs = build_definitions(load_catalog(catalog_file(tmp, csv_dataset("inbox", root / "labels.csv"))),
                             local_resources(data))
    with dg.instance_for_test() as instance:
        result = materialize(defs, instance, "inbox", ["image_manifest"])
        assert result.success
        assert materialize(defs, instance, "inbox", ["image_embeddings"], "raw-pixels").success
    yield data, lines, root


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_row_is_rejected_with_its_reason_and_line(bad_rows_run, case):
    data, lines, _ = bad_rows_run
    rejected = warehouse.read_table(data / "warehouse.duckdb", "rejected_images", dataset="inbox")
    row = rejected[rejected["source_row"] == lines[case]]
    assert row["reason"].tolist() == [BAD_ROWS[case][2]]


@pytest.mark.parametrize("case", list(GOOD_ROWS))
def test_good_row_among_bad_ones_is_kept_with_its_label_verbatim(bad_rows_run, case):
    data, _, root = bad_rows_run
    path, _, stored = GOOD_ROWS[case]
    images = warehouse.read_table(data / "warehouse.duckdb", "images", dataset="inbox")
    row = images[images["uri"] == str(root / path.strip())]
    assert row["label"].tolist() == [stored]


def test_every_row_is_either_kept_or_rejected_never_dropped(bad_rows_run):
    data, _, _ = bad_rows_run
    db = data / "warehouse.duckdb"
    kept = len(warehouse.read_table(db, "images", dataset="inbox"))
    rejected = len(warehouse.read_table(db, "rejected_images", dataset="inbox"))
    assert (kept, rejected) == (len(GOOD_ROWS), len(BAD_ROWS))
    assert len(EmbeddingStore(data / "lake").read("inbox", "raw-pixels")) == len(GOOD_ROWS)


def test_the_file_outside_the_root_is_never_read(bad_rows_run):
    data, _, _ = bad_rows_run
    rejected = warehouse.read_table(data / "warehouse.duckdb", "rejected_images", dataset="inbox")
    detail = rejected.loc[rejected["reason"] == "outside_root", "detail"]
    assert len(detail) == 3 and detail.str.contains("not read").all()


def test_nul_byte_in_a_path_is_a_rejected_row_not_a_crash(tmp_path):
    root = tmp_path / "inbox"
    random_png(root / "images" / "a.png", 1)
    (root / "labels.csv").write_bytes(b"path,species\nimages/a.png,acer\nimages/b\x00.png,acer\n")
    data = tmp_path / "data"
    defs = build_definitions(load_catalog(catalog_file(tmp_path, csv_dataset("inbox", root / "labels.csv"))),
                             local_resources(data))
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, "inbox", ["image_manifest"]).success
    rejected = warehouse.read_table(data / "warehouse.duckdb", "rejected_images", dataset="inbox")
    assert rejected["reason"].tolist() == ["missing_file"]


# -- hostile file names: accepted, listed exactly, embedded -----------------------------------------

HOSTILE_NAMES = [
    "with space.png", "ünïcødé-名前.png", "quote'single.png", 'quote"double.png', "-leading-dash.png",
    "--help.png", "x" * 200 + ".png", "semi;colon $(touch pwned).png", "back\\slash.png", "new\nline.png",
    "percent%20hash#.png", "emoji🦋.png", "tab\tname.png", " leading space.png", "trailing space .png",
    "UPPER.PNG", "dots...png", "*glob?[x].png", "<angle>|pipe&amp.png", "décomposé.png",
]
# The CSV reader strips cells (spreadsheets pad them), so names with edge spaces only come via folders.
_CSV_SAFE = [n for n in HOSTILE_NAMES if n == n.strip()]
HOSTILE_CLASS = "Quercus 'robur' -rf $(x)"


@pytest.fixture(scope="module")
def hostile_names_run(tmp_path_factory):
    """The names as files in an image_folder dataset (class folder named hostilely too) and listed in a
    quoted CSV; manifest + raw-pixel embeddings of both. Yields (data_dir, folder root, csv root)."""
    tmp = tmp_path_factory.mktemp("hostile-names")
    folder_root, csv_root = tmp / "folder", tmp / "listed"
    for i, name in enumerate(HOSTILE_NAMES):
        random_png(folder_root / HOSTILE_CLASS / name, seed=200 + i)
        if name in _CSV_SAFE:
            random_png(csv_root / "images" / name, seed=400 + i)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "species"])
    writer.writerows([f"images/{n}", HOSTILE_CLASS] for n in _CSV_SAFE)
    (csv_root / "labels.csv").write_text(buf.getvalue(), encoding="utf-8")
    datasets = f"""
    by_folder:
      reader: image_folder
      root: {folder_root}
      labels: [label]
    """ + csv_dataset("by_csv", csv_root / "labels.csv")
    data = tmp / "data"
    defs = build_definitions(load_catalog(catalog_file(tmp, datasets)), local_resources(data))
    with dg.instance_for_test() as instance:
        for ds in ("by_folder", "by_csv"):
            assert materialize(defs, instance, ds, ["image_manifest"]).success
            assert materialize(defs, instance, ds, ["image_embeddings"], "raw-pixels").success
    yield data, folder_root, csv_root


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=[f"name{i}" for i in range(len(HOSTILE_NAMES))])
def test_hostile_file_name_is_listed_exactly_and_embedded(hostile_names_run, name):
    data, folder_root, csv_root = hostile_names_run
    db = data / "warehouse.duckdb"
    sources = [("by_folder", folder_root / HOSTILE_CLASS / name)]
    if name in _CSV_SAFE:
        sources.append(("by_csv", csv_root / "images" / name))
    for dataset, path in sources:
        images = warehouse.read_table(db, "images", dataset=dataset)
        row = images[images["uri"] == str(path)]
        assert row["label"].tolist() == [HOSTILE_CLASS]
        stored = EmbeddingStore(data / "lake").read(dataset, "raw-pixels")
        assert row["image_id"].iloc[0] in set(stored.image_ids)


def test_no_hostile_name_was_interpreted_by_a_shell_or_lost(hostile_names_run):
    data, folder_root, _ = hostile_names_run
    assert not list(folder_root.parent.rglob("pwned")) and not (REPO_ROOT / "pwned").exists()
    db = data / "warehouse.duckdb"
    assert len(warehouse.read_table(db, "images", dataset="by_folder")) == len(HOSTILE_NAMES)
    assert len(warehouse.read_table(db, "images", dataset="by_csv")) == len(_CSV_SAFE)
    assert warehouse.read_table(db, "rejected_images").empty


# -- images of every odd mode, size and format ----------------------------------------------------

def write_odd_images(folder: Path) -> dict[str, tuple[int, int, str]]:
    """One file per odd mode / size / format; returns file name → (width, height, mode as PIL opens it)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    rgb = Image.fromarray(rng.integers(0, 255, (11, 13, 3), dtype=np.uint8))
    alpha = Image.fromarray(rng.integers(0, 255, (11, 13), dtype=np.uint8))
    out = {}

    def save(name, image, **kwargs):
        image.save(folder / name, **kwargs)
        with Image.open(folder / name) as back:
            out[name] = (back.width, back.height, back.mode)

    save("mode_1.png", rgb.convert("1"))
    save("mode_L.png", rgb.convert("L"))
    save("mode_LA.png", Image.merge("LA", [rgb.convert("L"), alpha]))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    save("mode_P_transparent.png", palette, transparency=0)
    save("mode_I16.png", Image.fromarray(rng.integers(0, 65535, (11, 13), dtype=np.uint16)))
    save("mode_I16_bigendian.tif", Image.fromarray(rng.integers(0, 65535, (11, 13), dtype=np.uint16).astype(">u2")))
    save("mode_I32.tif", Image.fromarray(rng.integers(-2**31, 2**31 - 1, (11, 13), dtype=np.int32)))
    floats = rng.normal(size=(11, 13)).astype(np.float32)
    floats[0, 0], floats[1, 1] = np.nan, np.inf
    save("mode_F_nan_inf.tif", Image.fromarray(floats))
    save("mode_F_constant.tif", Image.fromarray(np.full((11, 13), 3.5, np.float32)))
    save("mode_CMYK.jpg", rgb.convert("CMYK"))
    save("mode_CMYK.tif", rgb.convert("CMYK"))
    save("mode_RGBA_transparent.png", Image.merge("RGBA", [*rgb.split(), Image.new("L", rgb.size, 0)]))
    save("mode_YCbCr.jpg", rgb.convert("YCbCr"))
    save("size_1x1.png", Image.new("RGB", (1, 1), (200, 10, 10)))
    # exactly at ingest.images.MAX_ASPECT_RATIO (50:1); longer strips are rejected (test_integrity.py)
    save("size_500x10.png", Image.fromarray(rng.integers(0, 255, (10, 500, 3), dtype=np.uint8)))
    save("size_10x500.png", Image.fromarray(rng.integers(0, 255, (500, 10, 3), dtype=np.uint8)))
    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    save("animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=100, loop=0)
    save("multipage.tif", frames[0], save_all=True, append_images=frames[1:])
    save("progressive.jpg", rgb, progressive=True, quality=80)
    save("format.bmp", rgb)
    if features.check("webp"):
        save("format.webp", rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation tag: shown rotated by viewers; the pixels are what gets embedded
    save("exif_rotated.jpg", rgb, exif=exif.tobytes())
    return out


ODD_IMAGES = ["mode_1.png", "mode_L.png", "mode_LA.png", "mode_P_transparent.png", "mode_I16.png",
              "mode_I16_bigendian.tif", "mode_I32.tif", "mode_F_nan_inf.tif", "mode_F_constant.tif",
              "mode_CMYK.jpg", "mode_CMYK.tif", "mode_RGBA_transparent.png", "mode_YCbCr.jpg", "size_1x1.png",
              "size_500x10.png", "size_10x500.png", "animated.gif", "multipage.tif", "progressive.jpg",
              "format.bmp", "format.webp", "exif_rotated.jpg"]
_NOT_YET: dict[str, str] = {}  # odd images a known bug still rejects (strict xfail)


@pytest.fixture(scope="module")
def odd_images_run(tmp_path_factory):
    """Every odd image in one image_folder dataset; manifest and embeddings by a squashing and a
    shorter-side-crop model. Yields (data_dir, folder, {name: (w, h, mode)})."""
    tmp = tmp_path_factory.mktemp("odd-images")
    written = write_odd_images(tmp / "odd" / "specimen")
    datasets = f"""
    odd:
      reader: image_folder
      root: {tmp / "odd"}
      labels: [label]
    """
    data = tmp / "data"
    defs = build_definitions(load_catalog(catalog_file(tmp, datasets, models=("raw-pixels", "raw-pixels-crop"))),
                             local_resources(data))
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, "odd", ["image_manifest"]).success
        for model in ("raw-pixels", "raw-pixels-crop"):
            assert materialize(defs, instance, "odd", ["image_embeddings"], model).success
    yield data, tmp / "odd" / "specimen", written


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=_NOT_YET[n]))
                                  if n in _NOT_YET else n for n in ODD_IMAGES])
def test_odd_image_is_accepted_with_its_size_and_embedded_by_every_model(odd_images_run, name):
    data, folder, written = odd_images_run
    if name not in written:
        pytest.skip(f"this Pillow cannot write {name}")
    manifest = pd.read_parquet(data / "manifests" / "odd.parquet")
    row = manifest[manifest["uri"] == str(folder / name)]
    width, height, mode = written[name]
    assert row[["width", "height", "mode"]].values.tolist() == [[width, height, mode]]
    for model in ("raw-pixels", "raw-pixels-crop"):
        stored = EmbeddingStore(data / "lake").read("odd", model)
        vectors = stored.vectors[stored.image_ids == row["image_id"].iloc[0]]
        assert vectors.shape == (1, 3 * 8 * 8) and np.isfinite(vectors).all()


def test_image_of_a_mode_that_is_not_supported_is_a_clear_rejected_row(odd_images_run):
    data, folder, _ = odd_images_run
    rejected = warehouse.read_table(data / "warehouse.duckdb", "rejected_images", dataset="odd")
    assert set(rejected["uri"]) <= {str(folder / n) for n in _NOT_YET}
    assert (rejected["reason"] == "unsupported_mode").all() and rejected["detail"].str.contains("convert").all()


# -- untrusted identifiers ------------------------------------------------------------------------

HOSTILE_KEYS = ["x'; DROP TABLE metrics; --", "../escape", "a/b", "Upper", "名前", "-dash", "a b", "a;b",
                '"quoted"', "hf-hub:org/repo", "", ".hidden", 123, True]
_KEY_IDS = [f"key{i}" for i in range(len(HOSTILE_KEYS))]


def _yaml_key(key) -> str:
    """The key as YAML writes it: a JSON string (valid YAML) or a bare int / bool."""
    if isinstance(key, bool):
        return str(key).lower()
    return str(key) if isinstance(key, int) else json.dumps(key)


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=_KEY_IDS)
def test_catalog_refuses_a_hostile_model_name(tmp_path, key):
    path = tmp_path / "c.yaml"
    path.write_text(f"datasets:\n  d:\n    reader: image_folder\n    root: {tmp_path}\n    labels: [label]\n"
                    f"models:\n  {_yaml_key(key)}:\n"
                    f"    loader: raw_pixels\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="slug"):
        load_catalog(path)


@pytest.mark.parametrize("key", HOSTILE_KEYS + ["with-dash", "with.dot"], ids=_KEY_IDS + ["dash", "dot"])
def test_catalog_refuses_a_hostile_dataset_name(tmp_path, key):
    path = tmp_path / "c.yaml"
    path.write_text(f"datasets:\n  {_yaml_key(key)}:\n    reader: image_folder\n    root: {tmp_path}\n"
                    f"    labels: [label]\nmodels:\n  m:\n    loader: raw_pixels\n", encoding="utf-8")
    with pytest.raises(CatalogError, match="slug|asset-key"):
        load_catalog(path)


def test_catalog_refuses_a_name_ending_in_a_newline(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"datasets:\n  d:\n    reader: image_folder\n    root: {tmp_path}\n    labels: [label]\n"
                    'models:\n  "raw\\n":\n    loader: raw_pixels\n', encoding="utf-8")
    with pytest.raises(CatalogError, match="slug"):
        load_catalog(path)


def test_warehouse_refuses_table_and_column_names_it_does_not_declare(tmp_path):
    db = tmp_path / "w.duckdb"
    frame = pd.DataFrame({"dataset": ["d"], "model": ["m"], "task": ["knn"], "metric": ["top1"], "value": [1.0]})
    warehouse.replace_rows(db, "metrics", frame, dataset="d")
    with pytest.raises(StorageError, match="no column"):
        warehouse.replace_rows(db, "metrics", frame, **{"dataset = dataset OR 1=1 --": "x"})
    with pytest.raises(StorageError, match="unknown warehouse table"):
        warehouse.read_table(db, "metrics; DROP TABLE metrics")
    assert len(warehouse.read_table(db, "metrics")) == 1


def test_lake_root_with_a_quote_reaches_duckdb_as_a_literal(tmp_path):
    lake = tmp_path / "it's a lake"
    EmbeddingStore(lake).write("d", "m", EmbeddingTable(np.array(["a"], dtype=object), np.ones((1, 3), np.float32), "fp"))
    db = tmp_path / "w.duckdb"
    warehouse.refresh_embedding_view(db, str(lake))
    assert warehouse.query(db, "SELECT dataset, model, count(*) AS n FROM embeddings GROUP BY ALL").values.tolist() \
        == [["d", "m", 1]]
    assert warehouse.query(db, "SELECT root FROM nfhm_lake")["root"][0] == str(lake)


def test_every_torch_load_in_the_package_passes_weights_only_true():
    calls = []
    for path in (REPO_ROOT / "nfhm_pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                calls.append((path.name, node.lineno, isinstance(flag, ast.Constant) and flag.value is True))
    assert calls and all(ok for *_, ok in calls), calls
