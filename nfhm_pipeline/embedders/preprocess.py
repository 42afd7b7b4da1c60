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

Reduced-size JPEG decode (opt-in, `PreprocessSpec.with_jpeg_draft()`): a JPEG much larger than the
model input is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's ``Image.draft``), so a
4000-px sheet never exists at full size, then resized as above with the full-size geometry (the
reduced image's box stands for the whole source). The reduced image stays at least `DRAFT_GAP` times
the resized size on each axis, so the antialiased resize still does most of the averaging; an image
that cannot be reduced that much takes the exact path, bit for bit. Pixels of reduced images differ
from the exact path by a few levels (measured on the Leeds butterflies and asserted in
test_pixel_cache.py: `DRAFT_TOLERANCE`). It is opt-in rather than automatic because it changes
pixels, hence embeddings, of every large JPEG: the spec gets its own pixel_key (suffix ``-draft``)
and, through its extra dataclass field, its own fingerprint, so exact and reduced pixels or
embeddings never mix, and every spec made without it keeps its pixel_key and fingerprint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import ClassVar, Sequence

import numpy as np
from PIL import Image

RESIZE_RULES = ("shorter_crop", "squash")
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# Largest resized intermediate (pixels) made before the centre crop; above it the crop comes first.
# 16 Mpx is 48 MB of RGB; ordinary photos downscaled to a 224-512 px shorter side stay far below it.
MAX_RESIZED_PIXELS = 16_000_000
# Reduced JPEG decode keeps at least this many source pixels per output pixel on each axis.
DRAFT_GAP = 2
# How far reduced-decode pixels may be from the exact path's, in uint8 levels, over one image's
# pixels: the mean and the 99th percentile of the absolute difference, asserted by test_pixel_cache.py
# on real JPEGs (measured on 40 Leeds butterflies at 32-100 px: mean <= 1.2, p99 <= 6; the torch
# resize after a GPU-style decode, run on the CPU: mean <= 0.2, p99 <= 3).
DRAFT_TOLERANCE = {"mean_abs": 2.0, "p99_abs": 10}


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
    # Reduced-size JPEG decode: only `DraftJpegSpec` (its own dataclass field) sets it, so the
    # fingerprint payload (dataclasses.asdict) of every other spec is what it always was.
    jpeg_draft: ClassVar[bool] = False

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
        key = key if self.resize_size is None else f"{key}-r{self.resize_size}"
        return f"{key}-draft" if self.jpeg_draft else key

    def with_jpeg_draft(self) -> "PreprocessSpec":
        """This spec with reduced-size JPEG decode (see the module docstring): another pixel_key and
        fingerprint, the same size, resize rule, interpolation and normalisation."""
        return DraftJpegSpec(**{f.name: getattr(self, f.name) for f in fields(PreprocessSpec)})


@dataclass(frozen=True)
class DraftJpegSpec(PreprocessSpec):
    """A PreprocessSpec whose large JPEGs are decoded at reduced size (`PreprocessSpec.with_jpeg_draft`)."""

    jpeg_draft: bool = True


def resized_size(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int]:
    """(width, height) of the resized image before the centre crop (torchvision's ``Resize(int)``:
    shorter side -> target, longer side truncated, not rounded); (size, size) for 'squash'."""
    if spec.resize == "squash":
        return spec.size, spec.size
    target = spec.resize_size or spec.size
    if width <= height:
        return target, int(target * height / width)
    return int(target * width / height), target


def crop_origin(new_w: int, new_h: int, size: int) -> tuple[int, int]:
    """(left, top) of the centre crop of side `size` in a (new_w, new_h) image (CenterCrop's rounding)."""
    return int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def draft_request(width: int, height: int, spec: PreprocessSpec) -> tuple[int, int] | None:
    """The size to ask ``Image.draft`` for, or None when the source is too small to be reduced
    (less than 2 * DRAFT_GAP times the resized size on an axis): that image takes the exact path."""
    new_w, new_h = resized_size(width, height, spec)
    want = (new_w * DRAFT_GAP, new_h * DRAFT_GAP)
    if min(width // want[0], height // want[1]) < 2:
        return None
    return want


def decode_to_uint8(image: Image.Image, spec: PreprocessSpec, *,
                    max_resized_pixels: int = MAX_RESIZED_PIXELS,
                    reduced_from: tuple[tuple[int, int], tuple[float, float, float, float]] | None = None,
                    ) -> np.ndarray:
    """Resize (and crop) a PIL image per `spec`; returns a C-contiguous uint8 array [3, size, size].

    Deterministic: the same image and pixel_key give the same bytes. Non-RGB modes are converted.
    Memory stays bounded by `max_resized_pixels` for any aspect ratio (see the module docstring).
    `reduced_from`: ((width, height) of the source, box of `image` that covers it) when `image` is a
    reduced-size decode (``Image.draft``'s box); the geometry is then the full-size source's.
    """
    img = image if image.mode == "RGB" else image.convert("RGB")
    if reduced_from is not None:
        return _resize_reduced(img, spec, *reduced_from)
    resample = INTERPOLATIONS[spec.interpolation]
    size = spec.size
    if spec.resize == "squash":
        if img.size != (size, size):
            img = img.resize((size, size), resample)
    else:
        w, h = img.size
        new_w, new_h = resized_size(w, h, spec)
        left, top = crop_origin(new_w, new_h, size)
        if new_w * new_h > max_resized_pixels:
            # Only the source region that becomes the crop, at the full resize's per-axis scale.
            sx, sy = w / new_w, h / new_h
            img = img.resize((size, size), resample, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
        else:
            if (new_w, new_h) != (w, h):
                img = img.resize((new_w, new_h), resample)
            img = img.crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def _resize_reduced(img: Image.Image, spec: PreprocessSpec, source_size: tuple[int, int],
                    box: tuple[float, float, float, float]) -> np.ndarray:
    """`decode_to_uint8` of a reduced decode: every coordinate is the full-size source's, mapped into
    `img` through `box` (a reduced image never approaches MAX_RESIZED_PIXELS: no crop-first path)."""
    resample = INTERPOLATIONS[spec.interpolation]
    size = spec.size
    if spec.resize == "squash":
        img = img.resize((size, size), resample, box=box)
    else:
        new_w, new_h = resized_size(*source_size, spec)
        left, top = crop_origin(new_w, new_h, size)
        img = img.resize((new_w, new_h), resample, box=box).crop((left, top, left + size, top + size))
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def decode_jpeg_reduced(data: bytes, spec: PreprocessSpec) -> np.ndarray | None:
    """uint8 [3, size, size] of the JPEG `data` decoded at reduced size, or None when `data` is not a
    baseline-decodable JPEG much larger than the target (the caller then takes the exact path).

    Raises what PIL raises on corrupt data (OSError, SyntaxError, ValueError).
    """
    import io

    from nfhm_pipeline.ingest.images import to_rgb

    if not data.startswith(b"\xff\xd8"):
        return None
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "JPEG":
            return None
        source_size = im.size
        want = draft_request(*source_size, spec)
        if want is None:
            return None
        drafted = im.draft(im.mode, want)
        if drafted is None:  # a JPEG Pillow cannot reduce (several tiles): exact path
            return None
        im.load()
        return decode_to_uint8(to_rgb(im), spec, reduced_from=(source_size, drafted[1]))


def resize_crop_tensor(image, spec: PreprocessSpec):
    """torch uint8 [3, H, W] (any device) -> uint8 [3, size, size] on the same device: the geometry of
    `decode_to_uint8` with torch's antialiased interpolation (used after a GPU JPEG decode).

    Not bit-identical to PIL (another resampling kernel implementation): only for specs whose pixels
    are approximate anyway (`jpeg_draft`); see `DRAFT_TOLERANCE`.
    """
    import torch

    _, h, w = image.shape
    new_w, new_h = resized_size(w, h, spec)
    x = image.unsqueeze(0).float()
    if (new_w, new_h) != (w, h):
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode=spec.interpolation, antialias=True,
                                            align_corners=False)
    if spec.resize == "shorter_crop":
        left, top = crop_origin(new_w, new_h, spec.size)
        x = x[:, :, top:top + spec.size, left:left + spec.size]
    return x.round_().clamp_(0, 255).to(torch.uint8)[0].contiguous()


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


def decode_jpegs_torch(datas: Sequence[bytes], spec: PreprocessSpec, device) -> list[np.ndarray | None]:
    """JPEG bytes -> uint8 [3, size, size] arrays via one batched ``torchvision.io.decode_jpeg`` on
    `device` (nvJPEG on CUDA) and `resize_crop_tensor`; None for an image that failed (the caller
    decodes it on the CPU). A failure of the batched call retries the images one at a time."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad JPEG fails the whole batch
        images = []
        for t in tensors:
            try:
                images.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    return [None if im is None else resize_crop_tensor(im, spec).cpu().numpy() for im in images]
