"""`load_embedder`: catalog entry (a plain dict) -> Embedder.

Common keys: 'loader' (required; one of LOADERS), 'id' or 'name' (the catalog key, used in
messages and as `model_id`; defaults to 'model'). Loader-specific keys are documented in each
loader's module: openclip.py (open_clip), hf_transformers.py (transformers),
torchvision_models.py (torchvision, timm), baseline.py (raw_pixels).
"""
from __future__ import annotations

from nfhm_pipeline.errors import ModelLoadError
from .base import Embedder


def _loaders() -> dict:
    from .baseline import load_raw_pixels
    from .hf_transformers import load_transformers
    from .openclip import load_open_clip
    from .torchvision_models import load_timm, load_torchvision

    return {"open_clip": load_open_clip, "transformers": load_transformers, "torchvision": load_torchvision,
            "timm": load_timm, "raw_pixels": load_raw_pixels}


LOADERS = ("open_clip", "transformers", "torchvision", "timm", "raw_pixels")


def load_embedder(spec: dict, *, device="cpu", precision: str = "fp32", cache_dir=None) -> Embedder:
    """Build the embedder a catalog entry describes, on `device` ('cpu', 'cuda', 'cuda:1', 'mps').

    precision: 'fp32' | 'fp16' | 'bf16' (autocast; weights stay fp32). cache_dir: Hugging Face hub
    cache to read (default: HF_HUB_CACHE / HF_HOME as set now). Raises MissingWeightsError when
    weights are not available locally (offline), ModelLoadError when they do not build the model.
    """
    model_id = str(spec.get("id") or spec.get("name") or spec.get("model") or spec.get("base") or "?")
    loader = spec.get("loader")
    if loader not in LOADERS:
        raise ModelLoadError(f"model {model_id!r}: unknown loader {loader!r}; use one of {', '.join(LOADERS)}")
    return _loaders()[loader](spec, model_id=model_id, device=device, precision=precision, cache_dir=cache_dir)
