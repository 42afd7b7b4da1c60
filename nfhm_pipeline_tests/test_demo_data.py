"""Demo collections: deterministic bytes, a real hierarchy, idempotent reruns, learnable classes."""
import hashlib
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nfhm_pipeline.errors import ManifestError
from nfhm_pipeline.ingest import (
    generate_demo_collection,
    generate_digits_collection,
    read_source,
    read_vlm4bio_csv,
    validate_images,
)

LEVELS = ["species", "genus", "family"]


def digests(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_same_seed_gives_byte_identical_collections(tmp_path):
    a = generate_demo_collection(tmp_path / "a", seed=3, images_per_species=2, size=32)
    b = generate_demo_collection(tmp_path / "b", seed=3, images_per_species=2, size=32)
    assert digests(a) == digests(b) and len(digests(a)) == 27 * 2 + 2  # images, metadata.csv, stamp


def test_other_seed_gives_other_images(tmp_path):
    a = digests(generate_demo_collection(tmp_path / "a", seed=0, images_per_species=1, size=32))
    b = digests(generate_demo_collection(tmp_path / "b", seed=1, images_per_species=1, size=32))
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != b[k] for k in pngs)


def test_layout_is_vlm4bio_with_taxa_folders(tmp_path):
    root = generate_demo_collection(tmp_path, images_per_species=2, size=32)
    meta = pd.read_csv(root / "metadata.csv")
    assert list(meta.columns) == ["fileNameAsDelivered", "scientificName", "genus", "family", "taxa"]
    assert all(f.split("/")[0] == t for f, t in zip(meta.fileNameAsDelivered, meta.taxa))
    assert all(Image.open(root / f).size == (32, 32) for f in meta.fileNameAsDelivered)


def test_hierarchy_has_3_taxa_several_genera_each_and_several_species_per_genus(tmp_path):
    meta = pd.read_csv(generate_demo_collection(tmp_path, images_per_species=1, size=32) / "metadata.csv")
    assert meta.taxa.nunique() >= 3
    assert meta.groupby("taxa").genus.nunique().min() >= 3
    assert meta.groupby("taxa").family.nunique().min() >= 2
    assert meta.groupby("genus").scientificName.nunique().min() >= 3
    # a tree: every species has one genus, every genus one family, every family one taxa
    for child, parent in [("scientificName", "genus"), ("genus", "family"), ("family", "taxa")]:
        assert meta.groupby(child)[parent].nunique().max() == 1, (child, parent)
    assert all(name.split()[0] == genus for name, genus in zip(meta.scientificName, meta.genus))


def test_every_demo_image_validates_and_is_unique(tmp_path):
    candidates = read_source("demo_shapes", out_dir=tmp_path, images_per_species=2, size=32)
    manifest, rejected = validate_images(candidates, LEVELS)
    assert rejected.empty and len(manifest) == 54
    assert set(manifest.group) == {"Fish", "Bird", "Butterfly"}


def test_complete_collection_with_same_parameters_is_not_rewritten(tmp_path):
    root = generate_demo_collection(tmp_path, images_per_species=2, size=32)
    before = mtimes(root)
    for path in before:
        os.utime(path, ns=(1, 1))
    generate_demo_collection(tmp_path, images_per_species=2, size=32)
    assert all(t == 1 for t in mtimes(root).values())


def test_interrupted_collection_is_completed_on_rerun(tmp_path):
    root = generate_demo_collection(tmp_path, images_per_species=2, size=32)
    expected = digests(root)
    victim = next(root.glob("Bird/*.png"))
    victim.unlink()
    generate_demo_collection(tmp_path, images_per_species=2, size=32)
    assert digests(root) == expected


def test_new_parameters_regenerate_collection(tmp_path):
    generate_demo_collection(tmp_path, images_per_species=1, size=32)
    root = generate_demo_collection(tmp_path, images_per_species=1, size=48)
    meta = pd.read_csv(root / "metadata.csv")
    assert Image.open(root / meta.fileNameAsDelivered[0]).size == (48, 48)


def test_bad_parameters_raise_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="images_per_species"):
        generate_demo_collection(tmp_path, images_per_species=0)


def test_classes_are_learnable_from_raw_pixels_but_not_trivially(tmp_path):
    root = generate_demo_collection(tmp_path)  # defaults: 27 species x 8 images, 64x64
    c = read_vlm4bio_csv(root / "metadata.csv", label_columns=LEVELS, taxa_column="taxa")
    x = np.stack([np.asarray(Image.open(u).resize((16, 16)), dtype=float).ravel() / 255 for u in c.uri])
    test = np.arange(len(c)) % 8 >= 6  # 2 of each species' 8 images held out
    for level, factor in [("species", 3), ("genus", 3), ("group", 1.5)]:
        y = c[level].to_numpy()
        classes = np.unique(y)
        centroids = np.stack([x[~test & (y == k)].mean(0) for k in classes])
        distances = ((x[test][:, None, :] - centroids[None]) ** 2).sum(-1)
        accuracy = (classes[distances.argmin(1)] == y[test]).mean()
        assert factor / len(classes) < accuracy < 0.95, (level, accuracy)


# ---- digits ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return generate_digits_collection(tmp_path_factory.mktemp("digits"))


def test_digits_collection_has_1797_images_in_10_folders(digits_dir):
    candidates = read_source("sklearn_digits", out_dir=digits_dir)
    assert len(candidates) == 1797
    assert sorted(candidates.label.unique()) == [str(d) for d in range(10)]
    assert all(os.path.basename(os.path.dirname(u)) == label for u, label in zip(candidates.uri, candidates.label))


def test_digit_pixels_are_scaled_to_0_255_and_upsampled_nearest(digits_dir):
    from sklearn.datasets import load_digits

    root = digits_dir
    first = load_digits().images[0]
    pixels = np.asarray(Image.open(root / "0" / "digit_0000.png"))
    assert pixels.shape == (32, 32) and pixels.dtype == np.uint8
    assert np.array_equal(pixels[::4, ::4], np.round(first * 255 / 16))
    assert np.array_equal(pixels[3::4, 3::4], pixels[::4, ::4])


def test_digits_rerun_is_identical_and_does_not_rewrite(digits_dir):
    root = digits_dir
    labels = (root / "labels.csv").read_bytes()
    os.utime(root / "labels.csv", ns=(1, 1))
    generate_digits_collection(root)
    assert (root / "labels.csv").stat().st_mtime_ns == 1 and (root / "labels.csv").read_bytes() == labels
