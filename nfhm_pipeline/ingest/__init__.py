"""Ingest: manifest readers, image validation and demo collections (plain Python, no Dagster).

``READERS`` (from ``ingest.registry``) is the one declaration of every catalog reader."""
from nfhm_pipeline.ingest.demo import generate_demo_collection, generate_digits_collection
from nfhm_pipeline.ingest.images import (
    DEFAULT_MAX_PIXELS,
    REJECT_REASONS,
    SUPPORTED_MODES,
    load_rgb,
    to_rgb,
    validate_images,
)
from nfhm_pipeline.ingest.readers import (
    read_image_folder,
    read_label_csv,
    read_medmnist_npz,
    read_vlm4bio_csv,
)
from nfhm_pipeline.ingest.registry import READERS, ImageListing, ReaderRecord, read_source

__all__ = [
    "DEFAULT_MAX_PIXELS", "READERS", "REJECT_REASONS", "SUPPORTED_MODES", "ImageListing", "ReaderRecord",
    "generate_demo_collection", "generate_digits_collection", "load_rgb", "read_image_folder",
    "read_label_csv", "read_medmnist_npz", "read_source", "read_vlm4bio_csv", "to_rgb", "validate_images",
]
