"""Image validation and loading.

`validate_images` turns a *candidates* table (from a reader in `readers.py`) into the image manifest:
every distinct file is read once, hashed (sha256 of its bytes = `image_id`), decoded fully from those
same bytes, given a perceptual hash (`phash`, see `dhash`), and either kept or put in the rejected
table with one of `REJECT_REASONS`. A bad file never costs a good row.

`load_rgb` is how embedders open an image: every mode validation accepts becomes 8-bit RGB.
`load_verified_rgb` does the same from bytes it hashes first, so a file rewritten after the manifest
was built is refused instead of being embedded under the old content's `image_id`.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from nfhm_pipeline.errors import ManifestError

if TYPE_CHECKING:  # pandas is imported where a manifest is built: decoding alone (a Ray actor) never loads it
    import pandas as pd

SUPPORTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I", "F", "CMYK", "YCbCr"})
REJECT_REASONS = (
    "missing_file", "empty_file", "not_an_image", "truncated", "decompression_bomb",
    "unsupported_mode", "duplicate_image", "missing_label", "outside_root", "extreme_aspect_ratio",
    # set by image_folder for entries of a class folder it cannot use
    "unsupported_format", "dangling_symlink", "symlink_loop", "folder_not_image", "not_an_image_file",
    "not_in_class_folder",
)
# What a reader-set reason means, for the rejected table's detail column.
_READER_REASON_DETAILS = {
    "outside_root": "listed path is not under the image root; not read",
    "unsupported_format": "an image format this pipeline does not decode (HEIC, SVG, RAW…); convert it to PNG or JPEG",
    "dangling_symlink": "a symbolic link whose target does not exist",
    "symlink_loop": "a symbolic link that points back to itself",
    "folder_not_image": "a folder inside a class folder; images must sit directly in their class folder",
    "not_an_image_file": "a file without an image extension in a class folder",
    "not_in_class_folder": "a file at the top of the image folder, outside every class folder: it has no label",
}
DEFAULT_MAX_PIXELS = 64_000_000
# Longer side / shorter side above which an image is refused: a 1 x 1,000,000 strip is only 1 Mpx
# (under DEFAULT_MAX_PIXELS) but no shorter-side-resize model input can be made from it sensibly,
# and a naive resize of it allocates gigabytes. 50:1 is far beyond panoramas and scanned strips.
MAX_ASPECT_RATIO = 50
REJECTED_COLUMNS = ["uri", "source_row", "reason", "detail"]


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, skip_if_identical: bool = True) -> bool:
    """Write `data` to `path` atomically (:func:`nfhm_pipeline.store.files.write_bytes`).

    Returns False (and touches nothing) when `skip_if_identical` and the file already holds exactly
    `data`, so regenerating a collection is cheap and keeps file times; True when it wrote.
    Raises StorageError naming `path` when it cannot be written.
    """
    from nfhm_pipeline.store import files

    if skip_if_identical and files.is_identical(path, data):
        return False
    files.write_bytes(path, data)
    return True


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of `image`; identical input gives identical bytes (no timestamps, fixed zlib level)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


DHASH_SIDE = 16  # 256 bits: at 8x8 (64 bits) brain MRI scans on black all look alike (87 % false pairs)


def dhash(image: Image.Image, side: int = DHASH_SIDE) -> str:
    """Difference hash of `image`: side x side bits as side*side/4 lowercase hex chars (first bit =
    most significant); 256 bits by default.

    The image is made 8-bit grey (through `to_rgb` for modes other than L/RGB, so 16-bit and
    transparent images hash what the models see), resized to (side + 1) x side (bilinear), and bit
    (row r, column c) is 1 when pixel (r, c+1) is brighter than (r, c). Re-encoded or resized copies
    of an image differ in few bits (a small Hamming distance); unrelated images in about half.
    """
    if image.mode in ("L", "RGB") and "transparency" not in image.info:
        grey = image.convert("L")  # equals to_rgb(image).convert("L") for these modes, without the copy
    else:
        grey = to_rgb(image).convert("L")
    small = np.asarray(grey.resize((side + 1, side), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):0{side * side // 4}x}"


def _aspect_ratio_detail(width: int, height: int) -> str | None:
    """Why an image of this size is refused as extreme_aspect_ratio, or None when it is fine."""
    short, long = min(width, height), max(width, height)
    if short > 0 and long <= MAX_ASPECT_RATIO * short:
        return None
    ratio = f"{long / short:.0f}:1" if short > 0 else "unbounded"
    return (f"{width}x{height}: aspect ratio {ratio} > {MAX_ASPECT_RATIO}:1 (MAX_ASPECT_RATIO); "
            "crop the image to its subject or tile it")


def _inspect_file(uri: str, max_pixels: int) -> dict:
    """Read one file and classify it: {'image_id','width','height','mode','phash'} or {'reason','detail'}."""
    try:
        data = Path(uri).read_bytes()
    except FileNotFoundError:
        return {"reason": "missing_file", "detail": "no such file"}
    except OSError as e:  # a folder, no permission, broken link: nothing to decode either way
        return {"reason": "missing_file", "detail": f"cannot read: {e.strerror or e}"}
    except ValueError as e:  # e.g. a NUL byte in the listed path
        return {"reason": "missing_file", "detail": f"unusable path: {e}"}
    if not data:
        return {"reason": "empty_file", "detail": "file has 0 bytes"}
    phash = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height, mode = im.width, im.height, im.mode
            if width * height > max_pixels:
                return {"reason": "decompression_bomb",
                        "detail": f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}"}
            aspect = _aspect_ratio_detail(width, height)
            if aspect is not None:
                return {"reason": "extreme_aspect_ratio", "detail": aspect}
            im.verify()
        # verify() leaves the image unusable and does not decode pixel data: a second open + load()
        # is what catches a JPEG cut off half way.
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if mode in SUPPORTED_MODES:
                phash = dhash(im)
    except UnidentifiedImageError:
        return {"reason": "not_an_image", "detail": "PIL cannot identify an image format"}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return {"reason": "decompression_bomb", "detail": str(e)}
    except Exception as e:  # noqa: BLE001 - PIL signals corrupt data with OSError, SyntaxError, ValueError, ...
        return {"reason": "truncated", "detail": f"{type(e).__name__}: {e}"}
    if mode not in SUPPORTED_MODES:
        return {"reason": "unsupported_mode",
                "detail": f"mode {mode!r} is not one of {sorted(SUPPORTED_MODES)}; convert the file to RGB"}
    return {"image_id": hashlib.sha256(data).hexdigest(), "width": width, "height": height, "mode": mode,
            "phash": phash}


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() == ""


def validate_images(
    candidates: pd.DataFrame,
    label_columns: Sequence[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 8,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split candidates into (manifest, rejected), both in input order.

    manifest columns: image_id (sha256 hex of the file bytes), uri, width, height (int64 pixels),
    mode (PIL mode), *label_columns (str, stripped), group, split_group, official_split, phash (64 hex
    chars, `dhash` of the decoded image). ``manifest.attrs["files_read"]`` is how many files were
    read and decoded.
    rejected columns: uri, source_row, reason (one of REJECT_REASONS), detail (for a person).
    A candidate row with a non-null `reject_reason` (set by a reader, e.g. outside_root) is rejected
    without touching the file. Each distinct uri is read and decoded once however often it is listed
    (a CSV of a million rows over thirty files reads thirty); every row then gets that file's outcome.
    Same bytes listed twice (the same uri again, or a copy): the first row is kept, later ones are
    `duplicate_image`. An empty first (finest) label is `missing_label`.
    """
    import pandas as pd

    label_columns = list(label_columns)
    missing = [c for c in ["uri", *label_columns] if c not in candidates.columns]
    if missing or not label_columns:
        raise ManifestError(f"candidates table lacks column(s) {missing or 'label columns'}; "
                            f"columns present: {list(candidates.columns)}. Build it with a reader in nfhm_pipeline.ingest.")
    n = len(candidates)
    # Plain lists: per-row DataFrame.at lookups dominate the time of a million-row candidates table.
    uris = [str(u) for u in candidates["uri"].tolist()]
    pre_reason = candidates["reject_reason"].tolist() if "reject_reason" in candidates else [None] * n
    source_row = candidates["source_row"].tolist() if "source_row" in candidates else list(range(1, n + 1))
    labels = {c: candidates[c].tolist() for c in label_columns}
    extras = {c: candidates[c].tolist() if c in candidates else [None] * n
              for c in ("group", "split_group", "official_split")}

    results: list[dict | None] = [None] * n
    to_read: dict[str, list[int]] = {}  # uri -> rows listing it, in first-seen order
    finest = labels[label_columns[0]]
    for i in range(n):
        if not _is_missing(pre_reason[i]):
            results[i] = {"reason": str(pre_reason[i]), "detail": _READER_REASON_DETAILS.get(str(pre_reason[i]), "")}
        elif _is_missing(finest[i]):
            results[i] = {"reason": "missing_label", "detail": f"empty {label_columns[0]!r}"}
        else:
            to_read.setdefault(uris[i], []).append(i)

    saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    # The warnings filter is process-global, so it is set once here around the pool rather than
    # per thread (catch_warnings is not thread-safe); it turns PIL's bomb warning into an exception.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have relaxed it
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                inspected = pool.map(lambda uri: _inspect_file(uri, max_pixels), list(to_read))
                for (uri, listed_at), res in zip(to_read.items(), inspected):
                    for i in listed_at:
                        results[i] = res
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated

    kept, rejected, first_seen = [], [], {}
    for i, res in enumerate(results):
        uri = uris[i]
        if "reason" not in res and res["image_id"] in first_seen:
            j = first_seen[res["image_id"]]
            res = {"reason": "duplicate_image", "detail": f"same bytes as {uris[j]} (row {source_row[j]})"}
        if "reason" in res:
            rejected.append({"uri": uri, "source_row": int(source_row[i]), **res})
            continue
        first_seen[res["image_id"]] = i
        row = {"image_id": res["image_id"], "uri": uri, "width": res["width"], "height": res["height"],
               "mode": res["mode"]}
        row.update({c: None if _is_missing(labels[c][i]) else str(labels[c][i]).strip() for c in label_columns})
        row.update({c: None if _is_missing(values[i]) else str(values[i]) for c, values in extras.items()})
        row["phash"] = res["phash"]
        kept.append(row)

    manifest_cols = ["image_id", "uri", "width", "height", "mode", *label_columns, "group", "split_group",
                     "official_split", "phash"]
    manifest = pd.DataFrame(kept, columns=manifest_cols).astype({"width": "int64", "height": "int64"})
    manifest.attrs["files_read"] = len(to_read)
    rejected_df = pd.DataFrame(rejected, columns=REJECTED_COLUMNS).astype({"source_row": "int64"})
    return manifest, rejected_df


def _scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Min-max stretch to 0..255: 16-bit, int32 and float images carry no fixed white point in
    practice (12-bit scanners, Hounsfield units, reflectance), so each image is stretched to its range."""
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any SUPPORTED_MODES image to 8-bit RGB.

    Transparency (RGBA, LA, PA, palette or L/RGB with a tRNS colour) is composited onto `background`
    rather than dropped, since dropped alpha often exposes arbitrary colours under transparent pixels.
    I;16 / I / F are min-max stretched to 0..255 (see _scale_to_uint8).
    """
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_uint8(np.asarray(image)), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _decode_rgb(data: bytes, uri) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise ManifestError(f"cannot load image {uri}: {type(e).__name__}: {e}. "
                            "Re-run image validation; the file changed or was never validated.") from e


def _read_bytes(uri) -> bytes:
    try:
        return Path(uri).read_bytes()
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot load image {uri}: {type(e).__name__}: {e}. "
                            "Re-run image validation; the file changed or was never validated.") from e


def load_rgb(uri: str | os.PathLike) -> Image.Image:
    """Open `uri` and return a fully loaded 8-bit RGB PIL image (see `to_rgb` for mode handling)."""
    return _decode_rgb(_read_bytes(uri), uri)


def load_verified_rgb(uri: str | os.PathLike, image_id: str, *, dataset: str | None = None) -> Image.Image:
    """`load_rgb`, decoded from the very bytes whose sha256 is checked against `image_id`.

    Raises ManifestError naming the file when they differ: the file was rewritten after the manifest
    was built, and its new pixels must not be stored (or cached) under the old content's id.
    """
    data = _read_bytes(uri)
    actual = hashlib.sha256(data).hexdigest()
    if actual != image_id:
        asset = f"{dataset}/image_manifest" if dataset else "the dataset's image_manifest"
        raise ManifestError(
            f"cannot load image {uri}: it changed after the manifest was built (its bytes now hash to "
            f"{actual[:12]}…, the manifest lists image_id {image_id[:12]}…), so nothing was embedded or cached "
            f"for it. Re-run image validation: re-materialize {asset} (the new content gets its own "
            "image_id), then embed again; or restore the file.")
    return _decode_rgb(data, uri)
