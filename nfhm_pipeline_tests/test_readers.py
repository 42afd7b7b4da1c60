"""Manifest readers on real small CSVs, folders and .npz files (and the shared real data sets)."""
import os

import numpy as np
import pytest
from PIL import Image

from nfhm_pipeline.errors import ManifestError
from nfhm_pipeline.ingest import (
    READERS,
    read_image_folder,
    read_label_csv,
    read_medmnist_npz,
    read_source,
    read_vlm4bio_csv,
    validate_images,
)


def image(path, seed=0, size=(10, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_csv(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


# ---- read_label_csv ---------------------------------------------------------------------------

def test_label_csv_gives_absolute_uris_stripped_labels_and_line_numbers(tmp_path):
    image(tmp_path / "img" / "a.png", 1)
    image(tmp_path / "img" / "b.png", 2)
    csv = write_csv(tmp_path / "labels.csv", "file,species,genus,split\nimg/a.png, Aus bus ,Aus,train\nimg/b.png,Aus cus,Aus,test\n")
    c = read_label_csv(csv, path_column="file", label_columns=["species", "genus"], split_column="split")
    assert list(c.columns) == ["uri", "species", "genus", "group", "split_group", "official_split", "source_row", "reject_reason"]
    assert list(c.uri) == [str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")]
    assert list(c.species) == ["Aus bus", "Aus cus"]
    assert list(c.official_split) == ["train", "test"]
    assert list(c.source_row) == [2, 3]


def test_label_csv_paths_are_relative_to_image_root_when_given(tmp_path):
    image(tmp_path / "pics" / "a.png")
    (tmp_path / "meta").mkdir()
    csv = write_csv(tmp_path / "meta" / "l.csv", "f,label\na.png,x\n")
    c = read_label_csv(csv, path_column="f", label_columns=["label"], image_root=tmp_path / "pics")
    assert c.uri[0] == str(tmp_path / "pics" / "a.png")


def test_missing_column_error_names_column_and_file(tmp_path):
    csv = write_csv(tmp_path / "labels.csv", "file,species\na.png,x\n")
    with pytest.raises(ManifestError, match=r"labels\.csv.*'genus' is missing.*file, species"):
        read_label_csv(csv, path_column="file", label_columns=["species", "genus"])


def test_non_utf8_csv_asks_to_resave_as_utf8(tmp_path):
    csv = write_csv(tmp_path / "latin.csv", "file,species\na.png,Pieris brassicæ\n", encoding="latin-1")
    with pytest.raises(ManifestError, match=r"latin\.csv.*UTF-8"):
        read_label_csv(csv, path_column="file", label_columns=["species"])


def test_utf8_bom_does_not_leak_into_first_column_name(tmp_path):
    csv = write_csv(tmp_path / "bom.csv", "file,species\na.png,x\n", encoding="utf-8-sig")
    assert read_label_csv(csv, path_column="file", label_columns=["species"]).species[0] == "x"


@pytest.mark.parametrize("text, message", [("", "empty"), ("file,species\n", "no rows")])
def test_empty_csv_raises_manifest_error(tmp_path, text, message):
    csv = write_csv(tmp_path / "e.csv", text)
    with pytest.raises(ManifestError, match=message):
        read_label_csv(csv, path_column="file", label_columns=["species"])


def test_missing_csv_file_raises_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_label_csv(tmp_path / "none.csv", path_column="f", label_columns=["l"])


def test_unicode_labels_and_file_names_with_spaces_survive_validation(tmp_path):
    image(tmp_path / "Fotos ä" / "Papillon été 1.png", 1)
    image(tmp_path / "Fotos ä" / "蝶.png", 2)
    csv = write_csv(tmp_path / "l.csv", "file,species\nFotos ä/Papillon été 1.png,Iphiclides podalirius ♀\nFotos ä/蝶.png,アゲハチョウ\n")
    manifest, rejected = validate_images(read_label_csv(csv, path_column="file", label_columns=["species"]), ["species"])
    assert rejected.empty
    assert list(manifest.species) == ["Iphiclides podalirius ♀", "アゲハチョウ"]


@pytest.mark.parametrize("listed", ["../outside.png", "../../etc/passwd", "/etc/passwd", "img/../../outside.png"])
def test_paths_escaping_image_root_are_rejected_outside_root_unread(tmp_path, listed):
    image(tmp_path / "outside.png", 3)  # a valid image: it would be kept if it were read
    image(tmp_path / "root" / "img" / "ok.png", 4)
    csv = write_csv(tmp_path / "root" / "l.csv", f"file,species\nimg/ok.png,a\n{listed},b\n")
    manifest, rejected = validate_images(read_label_csv(csv, path_column="file", label_columns=["species"]), ["species"])
    assert list(manifest.species) == ["a"]
    assert rejected[["source_row", "reason"]].values.tolist() == [[3, "outside_root"]]


def test_absolute_path_inside_root_is_accepted(tmp_path):
    path = image(tmp_path / "img" / "ok.png")
    csv = write_csv(tmp_path / "l.csv", f"file,species\n{path},a\n")
    c = read_label_csv(csv, path_column="file", label_columns=["species"])
    assert c.uri[0] == str(path) and c.reject_reason[0] is None


def test_empty_path_cell_is_rejected_as_missing_file(tmp_path):
    csv = write_csv(tmp_path / "l.csv", "file,species\n ,a\n")
    _, rejected = validate_images(read_label_csv(csv, path_column="file", label_columns=["species"]), ["species"])
    assert list(rejected.reason) == ["missing_file"]


# ---- read_vlm4bio_csv ----------------------------------------------------------------------------

def test_vlm4bio_uses_file_name_as_delivered_and_derives_genus(tmp_path):
    image(tmp_path / "Fish" / "f1.png")
    csv = write_csv(tmp_path / "meta.csv", "fileName,fileNameAsDelivered,scientificName\nwrong.png,Fish/f1.png, Notropis  ludibundus \n")
    c = read_vlm4bio_csv(csv)
    assert c.uri[0] == str(tmp_path / "Fish" / "f1.png")
    assert (c.species[0], c.genus[0]) == ("Notropis  ludibundus", "Notropis")


def test_vlm4bio_falls_back_to_file_name_and_reads_rank_columns(tmp_path):
    csv = write_csv(tmp_path / "meta.csv", "fileName,scientificName,Genus,Family\nx.jpg,Aus bus,Cus,Dusidae\n")
    c = read_vlm4bio_csv(csv, tmp_path / "images", label_columns=("species", "genus", "family"))
    assert c.uri[0] == str(tmp_path / "images" / "x.jpg")
    assert (c.genus[0], c.family[0]) == ("Cus", "Dusidae")  # the column wins over the first word


def test_vlm4bio_label_level_that_cannot_be_derived_raises(tmp_path):
    csv = write_csv(tmp_path / "meta.csv", "fileName,scientificName\nx.jpg,Aus bus\n")
    with pytest.raises(ManifestError, match="'family'"):
        read_vlm4bio_csv(csv, label_columns=("species", "genus", "family"))


def test_vlm4bio_without_file_column_raises(tmp_path):
    csv = write_csv(tmp_path / "meta.csv", "path,scientificName\nx.jpg,Aus bus\n")
    with pytest.raises(ManifestError, match="fileNameAsDelivered"):
        read_vlm4bio_csv(csv)


def test_vlm4bio_taxa_from_column_then_constant_then_parent_folder(tmp_path):
    csv = write_csv(tmp_path / "meta.csv", "fileName,scientificName,kind\nBirds/x.jpg,Aus bus,Aves\n")
    assert read_vlm4bio_csv(csv, taxa_column="kind").group[0] == "Aves"
    assert read_vlm4bio_csv(csv, taxa="Bird").group[0] == "Bird"
    assert read_vlm4bio_csv(csv).group[0] == "Birds"


# ---- read_image_folder ----------------------------------------------------------------------------

def test_image_folder_class_is_subfolder_and_other_entries_are_rejected_rows(tmp_path):
    image(tmp_path / "cat" / "1.PNG", 1)
    image(tmp_path / "dog" / "2.png", 2)
    (tmp_path / "dog" / "notes.txt").write_text("x")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"")
    image(tmp_path / "dog" / "deeper" / "3.png", 3)
    image(tmp_path / "root_level.png", 4)
    c = read_image_folder(tmp_path, label_column="animal")
    assert c[["animal", "source_row", "reject_reason"]].astype(object).where(c.notna(), None).values.tolist() == [
        ["cat", 1, None], ["dog", 2, None], ["dog", 3, "folder_not_image"], ["dog", 4, "not_an_image_file"],
        [None, 5, "not_in_class_folder"]]
    assert c.uri[0] == str(tmp_path / "cat" / "1.PNG")


def test_image_folder_without_images_raises(tmp_path):
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ManifestError, match="no images"):
        read_image_folder(tmp_path)


# ---- read_medmnist_npz ----------------------------------------------------------------------------

def small_npz(path, rng=np.random.default_rng(0)):
    np.savez(path, train_images=rng.integers(0, 256, (3, 6, 6), dtype=np.uint8), train_labels=np.array([[0], [1], [1]]),
             val_images=rng.integers(0, 256, (1, 6, 6), dtype=np.uint8), val_labels=np.array([1]),
             test_images=rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8), test_labels=np.array([0, 1]))
    return path


def test_medmnist_writes_pngs_with_exact_pixels_and_official_splits(tmp_path):
    npz = small_npz(tmp_path / "m.npz")
    c = read_medmnist_npz(npz, tmp_path / "out", class_names=["normal", "pneumonia"])
    assert list(c.official_split) == ["train"] * 3 + ["val"] + ["test"] * 2
    assert list(c.label) == ["normal", "pneumonia", "pneumonia", "pneumonia", "normal", "pneumonia"]
    with np.load(npz) as data:
        assert np.array_equal(np.asarray(Image.open(c.uri[1])), data["train_images"][1])
        assert np.array_equal(np.asarray(Image.open(c.uri[5])), data["test_images"][1])


def test_medmnist_labels_without_class_names_are_integer_strings(tmp_path):
    c = read_medmnist_npz(small_npz(tmp_path / "m.npz"), tmp_path / "out", label_column="y")
    assert list(c.y) == ["0", "1", "1", "1", "0", "1"]


def test_medmnist_rerun_does_not_rewrite_identical_files(tmp_path):
    npz = small_npz(tmp_path / "m.npz")
    first = read_medmnist_npz(npz, tmp_path / "out")
    stamps = [os.stat(u).st_mtime_ns for u in first.uri]
    os.utime(first.uri[0], ns=(1, 1))
    second = read_medmnist_npz(npz, tmp_path / "out")
    assert second.equals(first)
    assert os.stat(first.uri[0]).st_mtime_ns == 1
    assert [os.stat(u).st_mtime_ns for u in first.uri[1:]] == stamps[1:]


def test_medmnist_label_without_class_name_raises(tmp_path):
    with pytest.raises(ManifestError, match=r"\[1\]"):
        read_medmnist_npz(small_npz(tmp_path / "m.npz"), tmp_path / "out", class_names=["only_zero"])


def test_medmnist_without_labels_array_raises(tmp_path):
    np.savez(tmp_path / "m.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(ManifestError, match="train_labels"):
        read_medmnist_npz(tmp_path / "m.npz", tmp_path / "out")


# ---- read_source ----------------------------------------------------------------------------------

def test_read_source_unknown_kind_lists_kinds():
    with pytest.raises(ManifestError, match="label_csv.*sklearn_digits"):
        read_source("parquet_table", path="x")


def test_read_source_bad_parameter_names_kind(tmp_path):
    with pytest.raises(ManifestError, match="image_folder"):
        read_source("image_folder", folder=tmp_path)


def test_read_source_dispatches_to_reader(tmp_path):
    image(tmp_path / "a" / "1.png")
    assert read_source("image_folder", root=tmp_path).equals(read_image_folder(tmp_path))
    assert set(READERS) == {"vlm4bio_csv", "label_csv", "image_folder", "medmnist_npz", "demo_shapes",
                            "sklearn_digits", "chexpert_csv"}


# ---- real data (skips without ../shared/data) ----------------------------------------------------

def test_leeds_butterfly_csv_gives_832_images_10_species_8_genera_4_families(shared_data):
    csv = shared_data / "leeds_butterfly" / "labels.csv"
    levels = ["species", "genus", "family"]
    manifest, rejected = validate_images(read_label_csv(csv, path_column="filename", label_columns=levels), levels)
    assert rejected.empty and len(manifest) == 832
    assert [manifest[c].nunique() for c in levels] == [10, 8, 4]


@pytest.mark.parametrize("name, counts, duplicates", [
    ("pneumoniamnist", {"train": 3882, "val": 524, "test": 624}, 28),
    ("breastmnist", {"train": 546, "val": 78, "test": 156}, 1),
])
def test_medmnist_real_files_give_official_split_sizes(shared_data, tmp_path, name, counts, duplicates):
    c = read_medmnist_npz(shared_data / "medmnist" / f"{name}.npz", tmp_path / name)
    assert c.official_split.value_counts().to_dict() == counts
    assert sorted(c.label.unique()) == ["0", "1"]
    manifest, rejected = validate_images(c, ["label"])
    # MedMNIST ships some byte-identical images (also across splits); later copies are rejected.
    assert set(rejected.reason) == {"duplicate_image"} and len(rejected) == duplicates
    assert len(manifest) + len(rejected) == len(c)


def test_brain_mri_folder_gives_1311_images_in_4_classes(shared_data):
    c = read_image_folder(shared_data / "brain_tumor_mri_4class" / "Testing")
    assert len(c) == 1311
    assert c.label.value_counts().to_dict() == {"notumor": 405, "meningioma": 306, "glioma": 300, "pituitary": 300}
    manifest, rejected = validate_images(c, ["label"])
    assert set(rejected.reason) == {"duplicate_image"} and len(manifest) == 1311 - len(rejected)
