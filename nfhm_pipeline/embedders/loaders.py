"""`load_embedder`: catalog entry (a plain dict) -> Embedder, and `LOADERS`, the one record per loader kind.

Common keys: 'loader' (required; one of LOADERS), 'id' or 'name' (the catalog key, used in
messages and as `model_id`; defaults to 'model'). Loader-specific keys are documented in each
loader's module: openclip.py (open_clip), hf_transformers.py (transformers),
torchvision_models.py (torchvision, timm), baseline.py (raw_pixels).

`LOADERS[kind].fields` is the source of truth for the keys a loader reads: `load_embedder`
refuses any other key (a typo such as `size:` for `image_size:` would otherwise be ignored and
change nothing, silently), and the catalog validates its model entries against the same sets.
Adding a loader kind is one `LoaderRecord` here plus its module.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from nfhm_pipeline.errors import ModelLoadError
from .base import Embedder

# Keys every loader spec may carry besides its loader's fields.
COMMON_FIELDS = frozenset({"loader", "id", "name"})
PREPROCESS_FIELDS = frozenset({"image_size", "resize", "resize_size", "interpolation", "mean", "std"})


@dataclass(frozen=True)
class LoaderRecord:
    """One loader kind: where its load function lives, the spec keys it reads, and which of them
    are file paths (resolved against the catalog's folder; `pretrained` only when it is a path)."""

    kind: str
    function: str                  # "module:function" inside nfhm_pipeline.embedders, imported on use
    fields: frozenset[str]
    path_fields: frozenset[str] = frozenset()

    @property
    def load(self) -> Callable[..., Embedder]:
        """The load function, `(spec, *, model_id, device, precision, cache_dir) -> Embedder`.

        Imported on first use, so reading the records (the catalog does) imports no loader module.
        """
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)


LOADERS: dict[str, LoaderRecord] = {r.kind: r for r in (
    LoaderRecord("open_clip", "openclip:load_open_clip",
                 # seed: of the self-built tiny model (catalog `build: tiny_openclip`); unused otherwise.
                 frozenset({"model", "base", "pretrained", "weights", "state_dict", "seed"}),
                 path_fields=frozenset({"pretrained", "weights", "state_dict"})),
    LoaderRecord("transformers", "hf_transformers:load_transformers",
                 frozenset({"model", "weights", "revision", "pooling", "trust_remote_code"}),
                 path_fields=frozenset({"weights"})),
    LoaderRecord("torchvision", "torchvision_models:load_torchvision",
                 frozenset({"model", "pretrained", "weights", "num_classes"}) | PREPROCESS_FIELDS,
                 path_fields=frozenset({"weights"})),
    LoaderRecord("timm", "torchvision_models:load_timm",
                 frozenset({"model", "pretrained", "weights", "num_classes"}) | PREPROCESS_FIELDS,
                 path_fields=frozenset({"weights"})),
    LoaderRecord("raw_pixels", "baseline:load_raw_pixels", frozenset({"image_size", "resize", "interpolation"})),
)}


def check_spec(spec: dict) -> tuple[str, LoaderRecord]:
    """(model_id, record) of a loader spec; ModelLoadError naming the model and field when the
    loader is unknown or a key is not one the loader reads."""
    if not isinstance(spec, dict):
        raise ModelLoadError(f"a loader spec must be a mapping with at least 'loader', got {type(spec).__name__}")
    model_id = str(spec.get("id") or spec.get("name") or spec.get("model") or spec.get("base") or "?")
    loader = spec.get("loader")
    if not isinstance(loader, str) or loader not in LOADERS:
        raise ModelLoadError(f"model {model_id!r}: unknown loader {loader!r}; use one of {', '.join(LOADERS)}")
    record = LOADERS[loader]
    unknown = sorted(str(k) for k in set(spec) - COMMON_FIELDS - record.fields)
    if unknown:
        raise ModelLoadError(f"model {model_id!r}: unknown field(s) {unknown} for loader {loader!r}; "
                             f"allowed: {sorted(record.fields | COMMON_FIELDS)}")
    return model_id, record


def load_embedder(spec: dict, *, device="cpu", precision: str = "fp32", cache_dir=None) -> Embedder:
    """Build the embedder a catalog entry describes, on `device` ('cpu', 'cuda', 'cuda:1', 'mps').

    precision: 'fp32' | 'fp16' | 'bf16' (autocast; weights stay fp32). cache_dir: Hugging Face hub
    cache to read (default: HF_HUB_CACHE / HF_HOME as set now). Raises ModelLoadError for an
    unknown loader or key, MissingWeightsError (naming every missing file at once) when weights are
    not available locally (offline), ModelLoadError when they do not build the model.
    """
    model_id, record = check_spec(spec)
    return record.load(spec, model_id=model_id, device=device, precision=precision, cache_dir=cache_dir)
