"""Image validation and loading.

`validate_images` turns a *candidates* table (from a reader in `readers.py`) into the image manifest:
every file is read once, hashed (sha256 of its bytes = `image_id`), decoded fully, and either kept or
put in the rejected table with one of `REJECT_REASONS`. A bad file never costs a good row.

`load_rgb` is how embedders open an image: every mode validation accepts becomes 8-bit RGB.
"""
from __future__ import annotations

import hashlib
import io
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, UnidentifiedImageError

from nfhm_pipeline.errors import ManifestError

SUPPORTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "I;16", "I;16B", "I;16L", "I", "F", "CMYK", "YCbCr"})
REJECT_REASONS = (
    "missing_file", "empty_file", "not_an_image", "truncated", "decompression_bomb",
    "unsupported_mode", "duplicate_image", "missing_label", "outside_root",
)
DEFAULT_MAX_PIXELS = 64_000_000
REJECTED_COLUMNS = ["uri", "source_row", "reason", "detail"]


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, skip_if_identical: bool = True) -> bool:
    """Write `data` to `path` via a temp file in the same folder + os.replace.

    Returns False (and touches nothing) when `skip_if_identical` and the file already holds exactly
    `data`, so regenerating a collection is cheap and keeps file times; True when it wrote.
    """
    path = Path(path)
    if skip_if_identical and path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding of `image`; identical input gives identical bytes (no timestamps, fixed zlib level)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _inspect_file(uri: str, max_pixels: int) -> dict:
    """Read one file and classify it: {'image_id','width','height','mode'} or {'reason','detail'}."""
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
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height, mode = im.width, im.height, im.mode
            if width * height > max_pixels:
                return {"reason": "decompression_bomb",
                        "detail": f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}"}
            im.verify()
        # verify() leaves the image unusable and does not decode pixel data: a second open + load()
        # is what catches a JPEG cut off half way.
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except UnidentifiedImageError:
        return {"reason": "not_an_image", "detail": "PIL cannot identify an image format"}
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return {"reason": "decompression_bomb", "detail": str(e)}
    except Exception as e:  # noqa: BLE001 - PIL signals corrupt data with OSError, SyntaxError, ValueError, ...
        return {"reason": "truncated", "detail": f"{type(e).__name__}: {e}"}
    if mode not in SUPPORTED_MODES:
        return {"reason": "unsupported_mode",
                "detail": f"mode {mode!r} is not one of {sorted(SUPPORTED_MODES)}; convert the file to RGB"}
    return {"image_id": hashlib.sha256(data).hexdigest(), "width": width, "height": height, "mode": mode}


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
    mode (PIL mode), *label_columns (str, stripped), group, official_split.
    rejected columns: uri, source_row, reason (one of REJECT_REASONS), detail (for a person).
    A candidate row with a non-null `reject_reason` (set by a reader, e.g. outside_root) is rejected
    without touching the file. Same bytes listed twice: the first row is kept, later ones are
    `duplicate_image`. An empty first (finest) label is `missing_label`.
    """
    label_columns = list(label_columns)
    missing = [c for c in ["uri", *label_columns] if c not in candidates.columns]
    if missing or not label_columns:
        raise ManifestError(f"candidates table lacks column(s) {missing or 'label columns'}; "
                            f"columns present: {list(candidates.columns)}. Build it with a reader in nfhm_pipeline.ingest.")
    rows = candidates.reset_index(drop=True)
    n = len(rows)
    pre_reason = rows["reject_reason"] if "reject_reason" in rows else pd.Series([None] * n)
    source_row = rows["source_row"] if "source_row" in rows else pd.Series(range(1, n + 1))

    results: list[dict | None] = [None] * n
    to_read: list[int] = []
    for i in range(n):
        if not _is_missing(pre_reason[i]):
            results[i] = {"reason": str(pre_reason[i]), "detail": "listed path is not under the image root; not read"
                          if pre_reason[i] == "outside_root" else ""}
        elif _is_missing(rows.at[i, label_columns[0]]):
            results[i] = {"reason": "missing_label", "detail": f"empty {label_columns[0]!r}"}
        else:
            to_read.append(i)

    saved_truncated = ImageFile.LOAD_TRUNCATED_IMAGES
    # The warnings filter is process-global, so it is set once here around the pool rather than
    # per thread (catch_warnings is not thread-safe); it turns PIL's bomb warning into an exception.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # another library may have relaxed it
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                inspected = pool.map(lambda i: _inspect_file(str(rows.at[i, "uri"]), max_pixels), to_read)
                for i, res in zip(to_read, inspected):
                    results[i] = res
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = saved_truncated

    kept, rejected, first_seen = [], [], {}
    for i, res in enumerate(results):
        uri = str(rows.at[i, "uri"])
        if "reason" not in res and res["image_id"] in first_seen:
            j = first_seen[res["image_id"]]
            res = {"reason": "duplicate_image", "detail": f"same bytes as {rows.at[j, 'uri']} (row {source_row[j]})"}
        if "reason" in res:
            rejected.append({"uri": uri, "source_row": int(source_row[i]), **res})
            continue
        first_seen[res["image_id"]] = i
        row = {"image_id": res["image_id"], "uri": uri, "width": res["width"], "height": res["height"],
               "mode": res["mode"]}
        row.update({c: str(rows.at[i, c]).strip() if not _is_missing(rows.at[i, c]) else None for c in label_columns})
        for c in ("group", "official_split"):
            v = rows.at[i, c] if c in rows else None
            row[c] = None if _is_missing(v) else str(v)
        kept.append(row)

    manifest_cols = ["image_id", "uri", "width", "height", "mode", *label_columns, "group", "official_split"]
    manifest = pd.DataFrame(kept, columns=manifest_cols).astype({"width": "int64", "height": "int64"})
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


def load_rgb(uri: str | os.PathLike) -> Image.Image:
    """Open `uri` and return a fully loaded 8-bit RGB PIL image (see `to_rgb` for mode handling)."""
    try:
        with Image.open(uri) as im:
            im.load()
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise ManifestError(f"cannot load image {uri}: {type(e).__name__}: {e}. "
                            "Re-run image validation; the file changed or was never validated.") from e
