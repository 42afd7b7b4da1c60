"""Ingest: manifest readers, image validation and demo collections (plain Python, no Dagster).

``READERS`` (from ``ingest.registry``) is the one declaration of every catalog reader.

The names below are imported from their modules when first used, so that importing one module of
the package (``ingest.images``, for decoding in a Ray actor) does not import the readers, the demo
generators and pandas with it.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "generate_demo_collection": "demo", "generate_digits_collection": "demo",
    "DEFAULT_MAX_PIXELS": "images", "REJECT_REASONS": "images", "SUPPORTED_MODES": "images",
    "load_rgb": "images", "to_rgb": "images", "validate_images": "images",
    "read_image_folder": "readers", "read_label_csv": "readers", "read_medmnist_npz": "readers",
    "read_vlm4bio_csv": "readers",
    "READERS": "registry", "ImageListing": "registry", "ReaderRecord": "registry", "read_source": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
