"""Image preprocessing shared by every embedder.

Preprocessing is split in two so that decoded pixels can be cached and shared:

1. `decode_to_uint8` (CPU, PIL): RGB image -> uint8 array [3, size, size]. Depends only on
   `PreprocessSpec.pixel_key` (size, resize rule, interpolation), so models with the same key share
   one decoded-pixel cache.
2. `normalize_on_device` (torch, on the model's device): uint8 -> float32 / 255, minus mean, over std.

The resize arithmetic mirrors torchvision's `Resize(int)` + `CenterCrop` on PIL images (which is
what open_clip, timm and torchvision weights use for inference), so pixels are identical to the
models' own transforms.

An image far longer than wide makes that intermediate huge (a 1 x 1,000,000 strip resized to a
224-pixel shorter side is 224 x 224,000,000): above `MAX_RESIZED_PIXELS` only the source region that
becomes the centre crop is resampled (PIL's ``resize(box=...)`` at the full resize's scale), which
allocates little more than size x size. PIL takes the box in float32 and may order its two passes
differently for it, so those pixels can differ from the full resize by a few levels: the crop-first
path is used only where the full resize would not fit (never for an image validation accepts, 50:1 at
most, resized to a shorter side of up to 565 px), and every other image takes the full-resize path,
bit for bit as before.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

RESIZE_RULES = ("shorter_crop", "squash")
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# Largest resized intermediate (pixels) made before the centre crop; above it the crop comes first.
# 16 Mpx is 48 MB of RGB; ordinary photos downscaled to a 224-512 px shorter side stay far below it.
MAX_RESIZED_PIXELS = 16_000_000


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model's input tensor.

    size: side of the square output, pixels.
    resize: 'shorter_crop' = resize the shorter side to `resize_size` (default `size`), keep the
        aspect ratio, centre-crop size x size (CLIP, timm, torchvision); 'squash' = resize to
        size x size ignoring the aspect ratio.
    interpolation: 'bicubic' | 'bilinear' (PIL, antialiased).
    mean, std: per-channel, on the [0, 1] scale, applied on the device after decoding.
    resize_size: shorter side before the crop for 'shorter_crop' when it differs from `size`
        (e.g. 256 -> crop 224 for ImageNet-style models); None means `size`.
    """

    size: int
    resize: str
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_size: int | None = None

    def __post_init__(self):
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"PreprocessSpec.size must be a positive int, got {self.size!r}")
        if self.resize not in RESIZE_RULES:
            raise ValueError(f"PreprocessSpec.resize must be one of {RESIZE_RULES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"PreprocessSpec.interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) == 1:
                values = values * 3
            if len(values) != 3 or not all(math.isfinite(v) for v in values):
                raise ValueError(f"PreprocessSpec.{name} must be 3 finite floats, got {getattr(self, name)!r}")
            object.__setattr__(self, name, values)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"PreprocessSpec.std must be positive, got {self.std!r}")
        object.__setattr__(self, "size", int(self.size))
        if self.resize_size is not None:
            if self.resize != "shorter_crop" or int(self.resize_size) < self.size:
                raise ValueError(
                    "PreprocessSpec.resize_size is only for resize='shorter_crop' and must be >= size, "
                    f"got resize={self.resize!r}, resize_size={self.resize_size!r}, size={self.size}")
            resize_size = int(self.resize_size)
            object.__setattr__(self, "resize_size", None if resize_size == self.size else resize_size)

    @property
    def pixel_key(self) -> str:
        """Slug ([a-z0-9._-]) naming the decoded uint8 pixels; mean/std are not part of it."""
        key = f"{self.size}-{self.resize.replace('_', '-')}-{self.interpolation}"
        return key if self.resize_size is None else f"{key}-r{self.resize_size}"


def decode_to_uint8(image: Image.Image, spec: PreprocessSpec, *,
                    max_resized_pixels: int = MAX_RESIZED_PIXELS) -> np.ndarray:
    """Resize (and crop) a PIL image per `spec`; returns a C-contiguous uint8 array [3, size, size].

    Deterministic: the same image and pixel_key give the same bytes. Non-RGB modes are converted.
    Memory stays bounded by `max_resized_pixels` for any aspect ratio (see the module docstring).
    """
    img = image if image.mode == "RGB" else image.convert("RGB")
    resample = INTERPOLATIONS[spec.interpolation]
    size = spec.size
    if spec.resize == "squash":
        if img.size != (size, size):
            img = img.resize((size, size), resample)
    else:
        target = spec.resize_size or size
        w, h = img.size
        # torchvision's Resize(int): shorter side -> target, longer side truncated, not rounded.
        if w <= h:
            new_w, new_h = target, int(target * h / w)
        else:
            new_w, new_h = int(target * w / h), target
        left = int(round((new_w - size) / 2.0))
        top = int(round((new_h - size) / 2.0))
        if new_w * new_h > max_resized_pixels:
            # Only the source region that becomes the crop, at the full resize's per-axis scale.
            sx, sy = w / new_w, h / new_h
            img = img.resize((size, size), resample, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
        else:
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), resample)
            img = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def decode_batch(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """`decode_to_uint8` over a sequence; returns uint8 [N, 3, size, size] (N may be 0)."""
    out = np.empty((len(images), 3, spec.size, spec.size), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = decode_to_uint8(image, spec)
    return out


def load_rgb(uri: str) -> Image.Image:
    """Open an image file as 8-bit RGB (the ingest package's loader when present)."""
    try:
        from nfhm_pipeline.ingest.images import load_rgb as ingest_load_rgb
    except ImportError:  # ingest not installed alongside: plain PIL is enough for embedding
        with Image.open(uri) as im:
            return im.convert("RGB")
    return ingest_load_rgb(uri)


def normalize_on_device(batch_uint8, mean: Sequence[float], std: Sequence[float], device):
    """uint8 tensor [N, 3, H, W] -> float32 tensor on `device`: (x / 255 - mean) / std."""
    import torch

    x = batch_uint8.to(device, non_blocking=True).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)
