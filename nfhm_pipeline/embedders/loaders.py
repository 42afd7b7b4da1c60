"""`load_embedder`: catalog entry (a plain dict) -> Embedder, and `LOADERS`, the one record per loader kind.

Common keys: 'loader' (required; one of LOADERS), 'id' or 'name' (the catalog key, used in
messages and as `model_id`; defaults to 'model'). Loader-specific keys are documented in each
loader's module: openclip.py (open_clip), hf_transformers.py (transformers),
torchvision_models.py (torchvision, timm), baseline.py (raw_pixels).

`LOADERS[kind].fields` is the source of truth for the keys a loader reads: `load_embedder`
refuses any other key (a typo such as `size:` for `image_size:` would otherwise be ignored and
change nothing, silently), and the catalog validates its model entries against the same sets.
Adding a loader kind is one `LoaderRecord` here plus its module.

`load_key(spec)` identifies a load without doing it: the catalog entry, the precision, the
versions of the model libraries, the source of this package, and the identity (path, size,
mtime) of every file the load reads, resolved as the loader resolves them (`LoaderRecord.files`).
A rerun whose key was seen before knows the model's fingerprint without loading the model
(`store.embedding_store.FingerprintMemo` keeps what each key's load gave).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Union

from nfhm_pipeline.errors import ModelLoadError, NfhmError
from .base import EMBEDDING_CODE_VERSION, Embedder, RequiredFiles, file_identity, hub_env, hub_settings

# Keys every loader spec may carry besides its loader's fields.
COMMON_FIELDS = frozenset({"loader", "id", "name"})
PREPROCESS_FIELDS = frozenset({"image_size", "resize", "resize_size", "interpolation", "mean", "std"})


@dataclass(frozen=True)
class LoaderRecord:
    """One loader kind: where its load function lives, the spec keys it reads, and which of them
    are file paths (resolved against the catalog's folder; `pretrained` only when it is a path)."""

    kind: str
    # "module:function" inside nfhm_pipeline.embedders, imported on use (or the function itself)
    function: Union[str, Callable[..., Embedder]]
    fields: frozenset[str]
    path_fields: frozenset[str] = frozenset()
    # `(spec, *, model_id, cache_dir) -> list of files/folders | None`: what `load` will read,
    # found without building the model; None (here or returned): unknown, so every run loads.
    files: Callable[..., "list[str] | None"] | None = None

    @property
    def load(self) -> Callable[..., Embedder]:
        """The load function, `(spec, *, model_id, device, precision, cache_dir) -> Embedder`.

        Imported on first use, so reading the records (the catalog does) imports no loader module.
        """
        if callable(self.function):
            return self.function
        module, _, name = self.function.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), name)


# -- the files each loader reads, found without loading ---------------------------------------------
# Each mirrors its loader's own resolution (same helpers where the loader module has them), so a
# file the load would read is in the key. Missing files give None: the load then says what is missing.

def _no_files(spec: dict, *, model_id: str, cache_dir=None) -> list[str]:
    return []


def _open_clip_files(spec: dict, *, model_id: str, cache_dir=None) -> list[str] | None:
    from . import openclip as oc

    name = str(spec.get("model") or spec.get("base") or "")
    pretrained = str(spec.get("weights") or spec.get("pretrained") or "")
    state_dict = str(spec.get("state_dict") or "")
    if not name:
        return None
    local_weights = not name.startswith(oc.HF_PREFIX) and oc._looks_like_path(pretrained)
    uses_hub = not local_weights or state_dict.startswith(oc.HF_PREFIX)
    settings = hub_settings(cache_dir) if uses_hub else None
    need = RequiredFiles(model_id, settings)
    with hub_env(settings) if settings else contextlib.nullcontext():
        if name.startswith(oc.HF_PREFIX):
            repo = name[len(oc.HF_PREFIX):]
            config = need.hub(repo, [oc.HF_CONFIG], what="open_clip config")
            found = [config, need.hub(repo, oc.HF_WEIGHTS, what="weights")]
            if config:  # a text tower from another repo (BiomedCLIP's PubMedBERT), as the loader requires it
                text_cfg = (oc._read_json(config, model_id).get("model_cfg") or {}).get("text_cfg") or {}
                for other in dict.fromkeys(r for r in (text_cfg.get("hf_model_name"),
                                                       text_cfg.get("hf_tokenizer_name")) if r):
                    found.append(need.hub(other, ["config.json", "tokenizer_config.json"], what="text tower"))
        elif not pretrained:
            return None
        elif local_weights:
            found = [need.local(pretrained)]
        else:  # a built-in pretrained tag (imports open_clip for its table of tags; builds nothing)
            found = [oc._resolve_tag(name, pretrained, model_id, need)]
        if state_dict:
            found.append(oc._resolve_state_dict(state_dict, model_id, need))
    return None if need.gaps else found


def _transformers_files(spec: dict, *, model_id: str, cache_dir=None) -> list[str] | None:
    source = str(spec.get("weights") or spec.get("model") or "")
    if not source:
        return None
    if os.path.isdir(os.path.expanduser(source)):
        return [os.path.expanduser(source)]  # the save_pretrained folder, every file in it
    if source.startswith(("/", "./", "~")) or spec.get("weights"):
        return None
    settings = hub_settings(cache_dir)
    need = RequiredFiles(model_id, settings)
    with hub_env(settings):
        config = need.hub(source, ["config.json"], what="config", revision=spec.get("revision"))
    # The snapshot folder of the commit config.json resolved to: weights, shards, processor config.
    return [str(Path(config).parent)] if config else None


def _torchvision_files(spec: dict, *, model_id: str, cache_dir=None) -> list[str] | None:
    if spec.get("weights"):
        return [str(spec["weights"])] if os.path.isfile(os.path.expanduser(str(spec["weights"]))) else None
    if spec.get("pretrained") and spec.get("model"):
        from .torchvision_models import _torchvision_tag_file

        return [_torchvision_tag_file(str(spec["model"]), str(spec["pretrained"]), model_id)[0]]
    return None


def _timm_files(spec: dict, *, model_id: str, cache_dir=None) -> list[str] | None:
    if spec.get("weights"):
        return [str(spec["weights"])] if os.path.isfile(os.path.expanduser(str(spec["weights"]))) else None
    if not spec.get("model"):
        return None
    import timm

    cfg = timm.models.get_pretrained_cfg(str(spec["model"]))
    if cfg is None or not cfg.hf_hub_id:
        return None
    settings = hub_settings(cache_dir)
    need = RequiredFiles(model_id, settings)
    with hub_env(settings):
        found = need.hub(cfg.hf_hub_id, [cfg.hf_hub_filename] if cfg.hf_hub_filename
                         else ["model.safetensors", "pytorch_model.bin"], what="weights")
    return [found] if found else None


LOADERS: dict[str, LoaderRecord] = {r.kind: r for r in (
    LoaderRecord("open_clip", "openclip:load_open_clip",
                 # seed: of the self-built tiny model (catalog `build: tiny_openclip`); unused otherwise.
                 frozenset({"model", "base", "pretrained", "weights", "state_dict", "seed"}),
                 path_fields=frozenset({"pretrained", "weights", "state_dict"}), files=_open_clip_files),
    LoaderRecord("transformers", "hf_transformers:load_transformers",
                 frozenset({"model", "weights", "revision", "pooling", "trust_remote_code"}),
                 path_fields=frozenset({"weights"}), files=_transformers_files),
    LoaderRecord("torchvision", "torchvision_models:load_torchvision",
                 frozenset({"model", "pretrained", "weights", "num_classes"}) | PREPROCESS_FIELDS,
                 path_fields=frozenset({"weights"}), files=_torchvision_files),
    LoaderRecord("timm", "torchvision_models:load_timm",
                 frozenset({"model", "pretrained", "weights", "num_classes"}) | PREPROCESS_FIELDS,
                 path_fields=frozenset({"weights"}), files=_timm_files),
    LoaderRecord("raw_pixels", "baseline:load_raw_pixels", frozenset({"image_size", "resize", "interpolation"}),
                 files=_no_files),
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


# -- the identity of a load, without loading ---------------------------------------------------------
# Bump when what goes into the key changes meaning (old keys then simply stop matching: one load each).
LOAD_KEY_VERSION = "1"
# Their code reads the model configs and preprocessing a fingerprint is made of.
MODEL_LIBRARIES = ("open_clip_torch", "transformers", "timm", "torchvision")


def load_key(spec: dict, *, precision: str = "fp32", cache_dir=None) -> str | None:
    """sha256 hex naming everything a load of `spec` at `precision` reads, found without building
    the model: the entry, the precision, EMBEDDING_CODE_VERSION, this package's source, the model
    libraries' versions, and `file_identity` of each file the loader would read (hub ids: the
    resolved cache snapshot's files). Equal keys give equal fingerprints.

    None when that cannot be told without loading (a loader kind without `files`, a file missing:
    the load reports it), so the caller loads.
    """
    model_id, record = check_spec(spec)
    if record.files is None:
        return None
    try:
        files = record.files(spec, model_id=model_id, cache_dir=cache_dir)
    except (NfhmError, OSError):
        return None
    if files is None:
        return None
    payload = {
        "key_version": LOAD_KEY_VERSION, "code_version": EMBEDDING_CODE_VERSION, "code": _package_source_digest(),
        "spec": spec, "precision": precision, "libraries": {name: _version(name) for name in MODEL_LIBRARIES},
        "files": [file_identity(f) for f in files],
    }
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


_RUN_ONLY_MODULES = frozenset({"runtime.py", "ray_engine.py"})


@functools.lru_cache(maxsize=1)
def _package_source_digest() -> str:
    """sha256 over the source of the modules that build models and compute fingerprints (every module
    of this package but the ones that only run models: runtime.py, which batches and stores, and
    the ray engine): an edit costs one load, never a stale fingerprint."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name not in _RUN_ONLY_MODULES:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
