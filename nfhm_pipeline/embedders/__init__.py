"""Embedders: one protocol (`Embedder`), loaders for open_clip, transformers, torchvision, timm and a
raw-pixel baseline, tiny self-built models for tests, and the shared preprocessing.

Importing this package does not import torch; loaders import their libraries when called.
"""
from .base import EMBEDDING_CODE_VERSION, Embedder, NoTextTowerError, compute_fingerprint
from .loaders import LOADERS, load_embedder
from .preprocess import PreprocessSpec, decode_batch, decode_to_uint8, load_rgb
from .tiny import (TINY_OPENCLIP_NAME, build_tiny_hf_hub_cache, build_tiny_openclip_checkpoint,
                   register_tiny_openclip_config)

__all__ = [
    "EMBEDDING_CODE_VERSION", "Embedder", "NoTextTowerError", "compute_fingerprint", "LOADERS",
    "load_embedder", "PreprocessSpec", "decode_batch", "decode_to_uint8", "load_rgb", "TINY_OPENCLIP_NAME",
    "build_tiny_hf_hub_cache", "build_tiny_openclip_checkpoint", "register_tiny_openclip_config",
]
