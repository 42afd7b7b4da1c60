"""Raw-pixel baseline: the image shrunk to size x size, flattened. No weights; the floor every model
must beat (if a model does not beat it, its features add nothing over colour and layout).

Catalog keys (loader: raw_pixels): image_size (default 16), resize ('squash' default or
'shorter_crop'), interpolation ('bilinear' default). dim = 3 * image_size**2, values in [0, 1].
"""
from __future__ import annotations

from .base import Embedder
from .preprocess import PreprocessSpec


class RawPixelEmbedder(Embedder):
    def _encode_images(self, x):
        return x.flatten(1)


def load_raw_pixels(spec: dict, *, model_id: str, device="cpu", precision="fp32", cache_dir=None) -> RawPixelEmbedder:
    size = int(spec.get("image_size", 16))
    preprocess = PreprocessSpec(size=size, resize=spec.get("resize", "squash"),
                                interpolation=spec.get("interpolation", "bilinear"),
                                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    # fp16/bf16 would only round the pixels: the baseline always runs in fp32.
    return RawPixelEmbedder(model_id=model_id, loader="raw_pixels", preprocess=preprocess, weights=None,
                            config={}, device=device, precision="fp32", dim=3 * size * size)
