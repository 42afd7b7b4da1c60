"""validate_images and load_rgb on real small files written in tmp_path."""
import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from nfhm_pipeline.errors import ManifestError
from nfhm_pipeline.ingest import SUPPORTED_MODES, load_rgb, to_rgb, validate_images
from nfhm_pipeline.ingest.images import MAX_ASPECT_RATIO, dhash, load_verified_rgb


def save_image(path, mode="RGB", size=(12, 10), fmt=None, color=None, seed=0):
    """A small image with random pixels (distinct bytes per seed) saved to `path`."""
    rng = np.random.default_rng(seed)
    if color is None:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    else:
        image = Image.new(mode, size, color)
    image.save(path, format=fmt)
    return path


def candidates(uris, labels=None, **extra):
    frame = pd.DataFrame({"uri": [str(u) for u in uris],
                          "species": labels if labels is not None else [f"sp{i}" for i in range(len(uris))],
                          "group": None, "official_split": None, "source_row": range(2, len(uris) + 2),
                          "reject_reason": None})
    for k, v in extra.items():
        frame[k] = v
    return frame


def validate(uris, **kwargs):
    labels = kwargs.pop("labels", None)
    extra = kwargs.pop("extra", {})
    return validate_images(candidates(uris, labels, **extra), ["species"], **kwargs)


def test_good_image_gets_sha256_of_bytes_size_mode_and_labels(tmp_path):
    path = save_image(tmp_path / "a.png", size=(12, 10))
    manifest, rejected = validate([path], labels=["  Danaus plexippus "])
    assert rejected.empty
    row = manifest.iloc[0]
    assert row.image_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (row.width, row.height, row["mode"], row.species) == (12, 10, "RGB", "Danaus plexippus")
    assert list(manifest.columns) == ["image_id", "uri", "width", "height", "mode", "species", "group", "split_group",
                                      "official_split", "phash"]


def assert_rejected_alone(tmp_path, bad_path, reason, **kwargs):
    good1 = save_image(tmp_path / "good1.png", seed=1)
    good2 = save_image(tmp_path / "good2.jpg", seed=2)
    manifest, rejected = validate([good1, bad_path, good2], **kwargs)
    assert list(manifest.uri) == [str(good1), str(good2)]
    assert rejected.to_dict("records")[0] | {"detail": None} == {
        "uri": str(bad_path), "source_row": 3, "reason": reason, "detail": None}
    return rejected.detail[0]


def test_missing_file_is_rejected_and_good_rows_kept(tmp_path):
    assert_rejected_alone(tmp_path, tmp_path / "nope.png", "missing_file")


def test_folder_listed_as_image_is_missing_file(tmp_path):
    (tmp_path / "dir.png").mkdir()
    assert_rejected_alone(tmp_path, tmp_path / "dir.png", "missing_file")


def test_zero_byte_file_is_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert_rejected_alone(tmp_path, tmp_path / "empty.png", "empty_file")


def test_text_file_named_png_is_not_an_image(tmp_path):
    (tmp_path / "text.png").write_text("hello, I am not a picture\n")
    assert_rejected_alone(tmp_path, tmp_path / "text.png", "not_an_image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_file_cut_in_half_is_truncated(tmp_path, fmt):
    whole = save_image(tmp_path / f"whole.{fmt.lower()}", size=(64, 64), fmt=fmt, seed=5).read_bytes()
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(whole[: len(whole) // 2])
    assert_rejected_alone(tmp_path, cut, "truncated")


def test_truncated_file_is_caught_even_if_another_library_relaxed_pil(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    whole = save_image(tmp_path / "w.jpg", size=(64, 64), seed=5).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    assert_rejected_alone(tmp_path, tmp_path / "cut.jpg", "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_image_over_max_pixels_is_decompression_bomb(tmp_path):
    big = save_image(tmp_path / "big.png", size=(40, 30), seed=3)
    detail = assert_rejected_alone(tmp_path, big, "decompression_bomb", max_pixels=1000)
    assert "1200" in detail


@pytest.mark.parametrize("side", [15, 25])  # 225 px: PIL warns; 625 px: PIL raises (limit 200, error at 2x)
def test_pil_own_bomb_warning_and_error_are_rejected(tmp_path, monkeypatch, side):
    big = save_image(tmp_path / "big.png", size=(side, side), seed=3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # good images are 120 px
    assert_rejected_alone(tmp_path, big, "decompression_bomb", max_pixels=10**9)


def test_image_longer_than_the_aspect_cap_is_extreme_aspect_ratio(tmp_path):
    strip = save_image(tmp_path / "strip.png", size=(MAX_ASPECT_RATIO + 1, 1), seed=3)
    detail = assert_rejected_alone(tmp_path, strip, "extreme_aspect_ratio")
    assert f"{MAX_ASPECT_RATIO + 1}x1" in detail


def test_image_exactly_at_the_aspect_cap_is_kept(tmp_path):
    path = save_image(tmp_path / "tall.png", size=(2, 2 * MAX_ASPECT_RATIO), seed=3)
    manifest, rejected = validate([path])
    assert rejected.empty and manifest.height[0] == 2 * MAX_ASPECT_RATIO


def test_mode_pil_opens_but_we_cannot_convert_is_unsupported_mode(tmp_path):
    lab = tmp_path / "lab.tif"
    Image.new("LAB", (8, 8), (50, 10, 10)).save(lab)
    assert Image.open(lab).mode == "LAB"
    assert_rejected_alone(tmp_path, lab, "unsupported_mode")


def test_same_bytes_listed_again_keeps_first_and_rejects_later(tmp_path):
    a = save_image(tmp_path / "a.png", seed=1)
    copy = tmp_path / "copy.png"
    copy.write_bytes(a.read_bytes())
    other = save_image(tmp_path / "b.png", seed=2)
    manifest, rejected = validate([a, other, copy, a])
    assert list(manifest.uri) == [str(a), str(other)]
    assert list(rejected.reason) == ["duplicate_image", "duplicate_image"]
    assert list(rejected.source_row) == [4, 5]
    assert str(a) in rejected.detail[0]


@pytest.mark.parametrize("label", [None, float("nan"), "", "   "])
def test_empty_finest_label_is_missing_label(tmp_path, label):
    bad = save_image(tmp_path / "bad.png", seed=9)
    good1 = save_image(tmp_path / "good1.png", seed=1)
    manifest, rejected = validate([good1, bad], labels=["sp", label])
    assert list(manifest.uri) == [str(good1)]
    assert list(rejected.reason) == ["missing_label"]


def test_empty_coarser_label_is_kept_as_none(tmp_path):
    path = save_image(tmp_path / "a.png")
    frame = candidates([path], ["sp"], genus=[" "])
    manifest, rejected = validate_images(frame, ["species", "genus"])
    assert rejected.empty and manifest.genus[0] is None


def test_row_flagged_outside_root_is_rejected_without_reading(tmp_path):
    readable = save_image(tmp_path / "fine_but_outside.png")
    manifest, rejected = validate([readable], extra={"reject_reason": ["outside_root"]})
    assert manifest.empty
    assert list(rejected.reason) == ["outside_root"]


def test_output_keeps_input_order_with_many_threads(tmp_path):
    paths = [save_image(tmp_path / f"{i}.png", size=(8 + i % 7, 8), seed=i) for i in range(40)]
    order = list(reversed(paths))
    manifest, _ = validate(order, workers=8)
    assert list(manifest.uri) == [str(p) for p in order]
    assert list(manifest.width) == [Image.open(p).width for p in order]


def test_same_uri_listed_again_is_read_once_and_later_rows_are_duplicates(tmp_path):
    a = save_image(tmp_path / "a.png", seed=1)
    manifest, rejected = validate([a, a, tmp_path / "gone.png", a, tmp_path / "gone.png"])
    assert manifest.attrs["files_read"] == 2
    assert list(manifest.uri) == [str(a)]
    assert list(rejected.reason) == ["duplicate_image", "missing_file", "duplicate_image", "missing_file"]
    assert list(rejected.source_row) == [3, 4, 5, 6]


def test_candidates_without_label_column_raise_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="genus"):
        validate_images(candidates([tmp_path / "a.png"]), ["genus"])


def test_empty_candidates_give_empty_tables_with_columns():
    manifest, rejected = validate([])
    assert manifest.empty and "image_id" in manifest.columns
    assert rejected.empty and list(rejected.columns) == ["uri", "source_row", "reason", "detail"]


# ---- phash -----------------------------------------------------------------------------------------

def smooth_image(seed: int, size=(96, 64)) -> Image.Image:
    """A smooth random picture (blurred blobs): what dHash is meant for, unlike white noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def test_phash_column_is_the_dhash_of_the_decoded_image(tmp_path):
    path = tmp_path / "a.png"
    smooth_image(1).save(path)
    manifest, _ = validate([path])
    with Image.open(path) as im:
        assert manifest.phash[0] == dhash(im)
    assert len(manifest.phash[0]) == 64 and int(manifest.phash[0], 16) >= 0


def test_dhash_is_the_standard_difference_hash():
    grey = np.asarray(smooth_image(2).convert("L").resize((17, 16), Image.Resampling.BILINEAR), dtype=int)
    bits = "".join("1" if grey[r, c + 1] > grey[r, c] else "0" for r in range(16) for c in range(16))
    assert dhash(smooth_image(2)) == f"{int(bits, 2):064x}"


def test_resized_reencoded_copy_has_a_near_phash_and_another_image_does_not(tmp_path):
    original = smooth_image(3, size=(240, 160))
    original.save(tmp_path / "orig.png")
    original.resize((120, 80), Image.Resampling.LANCZOS).save(tmp_path / "copy.jpg", quality=70)
    smooth_image(4, size=(240, 160)).save(tmp_path / "other.png")
    manifest, _ = validate([tmp_path / "orig.png", tmp_path / "copy.jpg", tmp_path / "other.png"])
    orig, copy, other = manifest.phash
    assert hamming(orig, copy) <= 6 < hamming(orig, other)


def test_phash_of_16bit_and_transparent_images_hashes_what_models_see(tmp_path):
    values = (np.add.outer(np.arange(40), np.arange(60)) * 20 + 1000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    rgba = smooth_image(5).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "t.png")
    manifest, rejected = validate([tmp_path / "g16.png", tmp_path / "t.png"])
    assert rejected.empty
    assert list(manifest.phash) == [dhash(load_rgb(tmp_path / "g16.png")), dhash(load_rgb(tmp_path / "t.png"))]


# ---- load_rgb -------------------------------------------------------------------------------------

def test_every_supported_mode_loads_as_8bit_rgb(tmp_path):
    rng = np.random.default_rng(0)
    for mode in sorted(SUPPORTED_MODES):
        if mode in ("I;16", "I", "F"):
            image = Image.fromarray(rng.integers(0, 4000, (6, 5)).astype({"I;16": np.uint16, "I": np.int32,
                                                                            "F": np.float32}[mode]))
            image = image if image.mode == mode else image.convert(mode)
        else:
            image = Image.new("RGB", (5, 6), (10, 200, 30)).convert(mode)
        assert image.mode == mode
        out = to_rgb(image)
        assert (out.mode, out.size) == ("RGB", (5, 6)), mode


def test_16bit_grey_png_is_stretched_to_full_8bit_range(tmp_path):
    values = np.array([[1000, 2000], [3000, 5000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    out = np.asarray(load_rgb(tmp_path / "g16.png"))
    expected = np.round((values.astype(float) - 1000) * 255 / 4000).astype(np.uint8)
    assert np.array_equal(out[..., 0], expected) and np.array_equal(out[..., 0], out[..., 2])


def test_float_image_with_nan_loads_without_nan_and_full_range(tmp_path):
    values = np.array([[-1.5, np.nan], [0.0, 2.5]], dtype=np.float32)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    out = np.asarray(load_rgb(tmp_path / "f.tif"))[..., 0]
    assert out[0, 0] == 0 and out[1, 1] == 255


def test_constant_16bit_image_loads_black_not_nan(tmp_path):
    Image.fromarray(np.full((3, 3), 700, dtype=np.uint16)).save(tmp_path / "c.png")
    assert np.asarray(load_rgb(tmp_path / "c.png")).max() == 0


def test_transparent_pixels_become_white_background(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert np.asarray(load_rgb(tmp_path / "t.png")).tolist() == [[[255, 0, 0], [255, 255, 255]]]


def test_palette_image_with_transparent_index_becomes_white(tmp_path):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 255, 0, 0, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(load_rgb(tmp_path / "p.png")).tolist() == [[[0, 0, 255], [255, 255, 255]]]


def test_cmyk_jpeg_loads_with_right_colours(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=100)
    r, g, b = np.asarray(load_rgb(tmp_path / "c.jpg"))[4, 4]
    assert r > 240 and g < 15 and b < 15


def test_load_rgb_of_unreadable_file_names_it(tmp_path):
    (tmp_path / "x.png").write_text("no")
    with pytest.raises(ManifestError, match="x.png"):
        load_rgb(tmp_path / "x.png")


def test_load_verified_rgb_decodes_the_checked_bytes(tmp_path):
    path = save_image(tmp_path / "a.png", seed=4)
    image = load_verified_rgb(path, hashlib.sha256(path.read_bytes()).hexdigest())
    assert np.array_equal(np.asarray(image), np.asarray(load_rgb(path)))


def test_load_verified_rgb_refuses_a_file_changed_since_the_manifest(tmp_path):
    path = save_image(tmp_path / "a.png", seed=4)
    old_id = hashlib.sha256(path.read_bytes()).hexdigest()
    save_image(path, seed=5)
    with pytest.raises(ManifestError, match=r"a\.png: it changed after the manifest"):
        load_verified_rgb(path, old_id, dataset="birds")
    with pytest.raises(ManifestError, match="re-materialize birds/image_manifest"):
        load_verified_rgb(path, old_id, dataset="birds")
