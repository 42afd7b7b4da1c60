"""Ingest: manifest readers, image validation and demo collections (plain Python, no Dagster)."""
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
    SOURCE_READERS,
    read_image_folder,
    read_label_csv,
    read_medmnist_npz,
    read_source,
    read_vlm4bio_csv,
)

__all__ = [
    "DEFAULT_MAX_PIXELS", "REJECT_REASONS", "SOURCE_READERS", "SUPPORTED_MODES",
    "generate_demo_collection", "generate_digits_collection", "load_rgb", "read_image_folder",
    "read_label_csv", "read_medmnist_npz", "read_source", "read_vlm4bio_csv", "to_rgb", "validate_images",
]
