"""Offline demo collections: small, deterministic, written in the layouts the readers expect.

`generate_demo_collection`: procedurally drawn "specimens" with a real three-level hierarchy
(taxa → family → genus → species). The taxa sets the body shape, the genus the colour family, the
species the pattern (plain / stripes / spots); position, scale, rotation, colour, background and
noise vary per image so the classes are learnable but not trivially separable.

`generate_digits_collection`: scikit-learn's bundled 8×8 digits as 32×32 PNGs in class folders.

Both are idempotent: a stamp file records the parameters and is written last, so a complete
collection with the same parameters is left as is, and an interrupted one is regenerated.
"""
from __future__ import annotations

import colorsys
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from nfhm_pipeline.errors import ManifestError
from nfhm_pipeline.ingest.images import png_bytes, write_bytes_atomic

# taxa -> family -> genera. Names are Latin-ish inventions; the epithet names the pattern.
DEMO_TAXONOMY: dict[str, dict[str, list[str]]] = {
    "Fish": {"Aquivagidae": ["Aquivagus", "Squamella"], "Natatoridae": ["Natator"]},
    "Bird": {"Volucridae": ["Volucris", "Pennatula"], "Avianidae": ["Avianus"]},
    "Butterfly": {"Alatidae": ["Alatus", "Papiliella"], "Lepidonidae": ["Lepidon"]},
}
DEMO_PATTERNS = {"unicolor": "plain", "lineatus": "stripes", "maculatus": "spots"}
DEMO_VERSION = 1
DIGITS_VERSION = 1
STAMP_NAME = ".nfhm_collection.json"


def demo_species() -> list[dict]:
    """One dict per demo species (taxa, family, genus, epithet, scientificName, hue, pattern), in
    generation order. The genus hue interleaves taxa so every taxa spans the colour wheel."""
    out = []
    for t, (taxa, families) in enumerate(DEMO_TAXONOMY.items()):
        genera = [(family, genus) for family, names in families.items() for genus in names]
        for g, (family, genus) in enumerate(genera):
            for epithet, pattern in DEMO_PATTERNS.items():
                out.append({"taxa": taxa, "family": family, "genus": genus, "epithet": epithet,
                            "scientificName": f"{genus} {epithet}", "hue": (3 * g + t) / 9.0, "pattern": pattern})
    return out


def _stamp_matches(out_dir: Path, stamp: dict, files: list[str]) -> bool:
    try:
        found = json.loads((out_dir / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return found == stamp and all((out_dir / f).is_file() for f in files)


def _rgb(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue % 1.0, sat, val))


def _body_mask(taxa: str, side: int, radius: float) -> Image.Image:
    """White silhouette of the taxa's body plan, centred in a side×side canvas."""
    mask = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(mask)
    c, r = side / 2, radius
    if taxa == "Fish":
        d.ellipse((c - r, c - 0.45 * r, c + 0.55 * r, c + 0.45 * r), fill=255)
        d.polygon([(c + 0.45 * r, c), (c + r, c - 0.5 * r), (c + r, c + 0.5 * r)], fill=255)
    elif taxa == "Bird":
        d.ellipse((c - 0.55 * r, c - 0.35 * r, c + 0.65 * r, c + 0.55 * r), fill=255)
        d.ellipse((c - 0.85 * r, c - 0.8 * r, c - 0.25 * r, c - 0.2 * r), fill=255)
        d.polygon([(c - 0.8 * r, c - 0.6 * r), (c - 1.1 * r, c - 0.45 * r), (c - 0.8 * r, c - 0.35 * r)], fill=255)
        d.polygon([(c + 0.5 * r, c), (c + r, c - 0.2 * r), (c + r, c + 0.35 * r)], fill=255)
    else:  # Butterfly: two pairs of wings around a thin body
        for sx in (-1, 1):
            d.ellipse((c + sx * 0.5 * r - 0.5 * r, c - 0.8 * r, c + sx * 0.5 * r + 0.5 * r, c), fill=255)
            d.ellipse((c + sx * 0.4 * r - 0.35 * r, c - 0.05 * r, c + sx * 0.4 * r + 0.35 * r, c + 0.6 * r), fill=255)
        d.ellipse((c - 0.08 * r, c - 0.85 * r, c + 0.08 * r, c + 0.7 * r), fill=255)
    return mask


def draw_specimen(rng: np.random.Generator, taxa: str, hue: float, pattern: str, size: int) -> Image.Image:
    """One size×size RGB specimen image drawn from `rng` (all randomness comes from it)."""
    side = 2 * size  # drawn at twice the size and downsampled, for smooth edges
    radius = side * 0.36 * rng.uniform(0.7, 1.05)
    body = _rgb(hue + rng.normal(0, 0.025), rng.uniform(0.55, 0.9), rng.uniform(0.6, 0.95))
    mark = _rgb(hue + rng.normal(0, 0.025), rng.uniform(0.3, 0.9), rng.uniform(0.1, 0.3))
    coat = Image.new("RGB", (side, side), body)
    d = ImageDraw.Draw(coat)
    if pattern == "stripes":
        step, width = rng.uniform(0.1, 0.16) * side, rng.uniform(0.03, 0.05) * side
        x = rng.uniform(0, step)
        while x < side:
            d.rectangle((x, 0, x + width, side), fill=mark)
            x += step
    elif pattern == "spots":
        for _ in range(int(rng.integers(8, 14))):
            px, py = rng.uniform(0.2, 0.8, 2) * side
            pr = rng.uniform(0.03, 0.06) * side
            d.ellipse((px - pr, py - pr, px + pr, py + pr), fill=mark)
    mask = _body_mask(taxa, side, radius)
    angle = float(rng.uniform(-35, 35))
    shift = tuple(int(v) for v in rng.uniform(-0.12, 0.12, 2) * side)
    coat = coat.rotate(angle, resample=Image.BICUBIC, translate=shift)
    mask = mask.rotate(angle, resample=Image.BICUBIC, translate=shift)

    background = Image.new("RGB", (side, side), _rgb(rng.uniform(), rng.uniform(0, 0.25), rng.uniform(0.55, 0.95)))
    image = Image.composite(coat, background, mask).resize((size, size), Image.LANCZOS)
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), mode="RGB")


def generate_demo_collection(out_dir: str | os.PathLike, *, seed: int = 0, images_per_species: int = 8,
                             size: int = 64) -> Path:
    """Write the demo collection and return `out_dir` (absolute).

    Layout: `out_dir/<taxa>/<Genus>_<epithet>_<i:03d>.png` (RGB, size×size) and `out_dir/metadata.csv`
    with columns fileNameAsDelivered (relative to out_dir), scientificName, genus, family, taxa.
    3 taxa × 3 genera (2 families per taxa) × 3 species = 27 species, images_per_species each.
    Same parameters → byte-identical files; a complete collection with the same parameters is not redrawn.
    """
    if images_per_species < 1 or size < 16:
        raise ManifestError(f"demo collection: images_per_species must be ≥ 1 and size ≥ 16 "
                            f"(got {images_per_species}, {size}).")
    out_dir = Path(os.path.abspath(out_dir))
    species = demo_species()
    rows = [{"fileNameAsDelivered": f"{s['taxa']}/{s['genus']}_{s['epithet']}_{i:03d}.png",
             "scientificName": s["scientificName"], "genus": s["genus"], "family": s["family"], "taxa": s["taxa"]}
            for s in species for i in range(images_per_species)]
    files = [r["fileNameAsDelivered"] for r in rows] + ["metadata.csv"]
    stamp = {"collection": "demo_shapes", "version": DEMO_VERSION, "seed": seed,
             "images_per_species": images_per_species, "size": size, "images": len(rows)}
    if _stamp_matches(out_dir, stamp, files):
        return out_dir
    for k, s in enumerate(species):
        for i in range(images_per_species):
            # One generator per image: an image depends only on (seed, species, index), not on order.
            rng = np.random.default_rng([seed, k, i])
            image = draw_specimen(rng, s["taxa"], s["hue"], s["pattern"], size)
            write_bytes_atomic(out_dir / rows[k * images_per_species + i]["fileNameAsDelivered"], png_bytes(image))
    write_bytes_atomic(out_dir / "metadata.csv", pd.DataFrame(rows).to_csv(index=False, lineterminator="\n").encode("utf-8"))
    write_bytes_atomic(out_dir / STAMP_NAME, json.dumps(stamp, sort_keys=True).encode("utf-8"))
    return out_dir


def generate_digits_collection(out_dir: str | os.PathLike, *, upscale: int = 4) -> Path:
    """Write scikit-learn's bundled digits (1797 images, 8×8, values 0..16) and return `out_dir`.

    Layout: `out_dir/<digit>/digit_<index:04d>.png` (grey 'L', values ×255/16 rounded, upsampled
    `upscale`× by nearest neighbour: 32×32 by default) and `out_dir/labels.csv` (filename, label).
    Deterministic and idempotent like `generate_demo_collection`.
    """
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    out_dir = Path(os.path.abspath(out_dir))
    digits = load_digits()
    rows = [{"filename": f"{int(t)}/digit_{i:04d}.png", "label": str(int(t))} for i, t in enumerate(digits.target)]
    files = [r["filename"] for r in rows] + ["labels.csv"]
    stamp = {"collection": "sklearn_digits", "version": DIGITS_VERSION, "upscale": upscale, "images": len(rows)}
    if _stamp_matches(out_dir, stamp, files):
        return out_dir
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for row, pixels in zip(rows, grey):
        big = np.kron(pixels, np.ones((upscale, upscale), dtype=np.uint8))
        write_bytes_atomic(out_dir / row["filename"], png_bytes(Image.fromarray(big, mode="L")))
    write_bytes_atomic(out_dir / "labels.csv", pd.DataFrame(rows).to_csv(index=False, lineterminator="\n").encode("utf-8"))
    write_bytes_atomic(out_dir / STAMP_NAME, json.dumps(stamp, sort_keys=True).encode("utf-8"))
    return out_dir
