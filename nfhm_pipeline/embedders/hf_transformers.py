"""Vision towers loaded with Hugging Face transformers' `from_pretrained`.

Catalog keys (loader: transformers):
  model       hub repo id ('openai/clip-vit-base-patch32', 'facebook/dinov2-base') or a local folder
              written by save_pretrained.
  weights     optional local folder; overrides `model` as the place to load from.
  revision    hub revision (default 'main' as cached).
  pooling     'image_embeds' (CLIP projection; default for CLIP), 'pooler' (pooler_output; default
              for SigLIP, DINOv2 and other AutoModels), 'cls' (last_hidden_state[:, 0]) or
              'mean_tokens' (mean over all output tokens; the only choice for Florence-2, as in
              seed 000: mean over the 577 projected image tokens).
  trust_remote_code  true or false (default false). True RUNS PYTHON FILES FROM THE MODEL FOLDER OR
              REPO (the modules its config.json names in `auto_map`) with this process's rights.
              Accepted only when the folder's config.json names a model type in
              REMOTE_CODE_MODEL_TYPES (Florence-2's original microsoft/Florence-2-* repos, which
              load with their own code and are pooled as `model._encode_image(pixels)`); refused,
              before any of its code is imported, for every other model type. transformers >= 4.56
              loads converted Florence-2 repos (e.g. florence-community/Florence-2-base) natively,
              without it.

Before anything is loaded, config.json is read as plain JSON (never through transformers, which
may import the folder's code) and every file the model needs is resolved: config.json, the
weights (every shard of a sharded checkpoint), the image processor config and, with
trust_remote_code, the code files. One MissingWeightsError names all that are missing.

trust_remote_code is passed as an explicit bool to every from_pretrained call, and transformers'
interactive "[y/N]" question is switched off while loading (it would wait on stdin inside a
Dagster step): code that would need the question is refused with a ModelLoadError instead.

Model class by config.model_type: clip -> CLIPVisionModelWithProjection, siglip ->
SiglipVisionModel, florence2 -> Florence2ForConditionalGeneration (vision tower + projector),
anything else -> AutoModel. Size/mean/std/resize come from the repo's AutoImageProcessor config.
With HF_HUB_OFFLINE=1 everything is read with local_files_only=True.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from nfhm_pipeline.errors import MissingWeightsError, ModelLoadError
from .base import Embedder, RequiredFiles, _short_reason, file_sha256, hub_env, hub_settings, missing_hub_message
from .preprocess import PreprocessSpec

POOLINGS = ("image_embeds", "pooler", "cls", "mean_tokens")
# Model types allowed to run their own code (trust_remote_code: true). Each entry lets a catalog run
# Python from any folder or repo whose config.json claims that type: add one only for a model that
# cannot be loaded otherwise.
REMOTE_CODE_MODEL_TYPES = frozenset({"florence2"})
CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
PREPROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}


class TransformersVisionEmbedder(Embedder):
    def __init__(self, model, pooling: str, remote_florence: bool = False, **kwargs):
        self.model, self.pooling, self.remote_florence = model, pooling, remote_florence
        super().__init__(**kwargs)

    def _encode_images(self, x):
        if self.remote_florence:
            return self.model._encode_image(x).mean(dim=1)
        if hasattr(self.model, "get_image_features") and type(self.model).__name__.startswith("Florence2"):
            return self.model.get_image_features(pixel_values=x).pooler_output.mean(dim=1)
        out = self.model(pixel_values=x)
        if self.pooling == "image_embeds":
            return out.image_embeds
        if self.pooling == "pooler":
            return out.pooler_output
        if self.pooling == "cls":
            return out.last_hidden_state[:, 0]
        return out.last_hidden_state.mean(dim=1)


def _get(obj, key):
    """Read a size field from a dict or a transformers SizeDict."""
    if obj is None:
        return None
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


def preprocess_from_image_processor(proc, model_id: str) -> PreprocessSpec:
    """PreprocessSpec from a transformers image processor (CLIP/SigLIP/BitImageProcessor/Florence-2)."""
    size, crop = getattr(proc, "size", None), getattr(proc, "crop_size", None)
    resample = getattr(proc, "resample", 3)
    resample = getattr(resample, "value", resample)  # PILImageResampling enum or int
    interpolation = _PIL_RESAMPLE.get(int(resample) if resample is not None else 3)
    if interpolation is None:
        raise ModelLoadError(f"model {model_id!r}: image processor resample={resample!r} is not "
                             "bilinear or bicubic; set image_size/interpolation in the catalog")
    common = dict(interpolation=interpolation, mean=tuple(proc.image_mean), std=tuple(proc.image_std))
    if getattr(proc, "do_center_crop", False) and _get(size, "shortest_edge") and crop is not None:
        if _get(crop, "height") != _get(crop, "width"):
            raise ModelLoadError(f"model {model_id!r}: non-square crop {crop} is not supported")
        return PreprocessSpec(size=int(_get(crop, "height")), resize="shorter_crop",
                              resize_size=int(_get(size, "shortest_edge")), **common)
    if _get(size, "height") and _get(size, "height") == _get(size, "width"):
        return PreprocessSpec(size=int(_get(size, "height")), resize="squash", **common)
    raise ModelLoadError(f"model {model_id!r}: image processor size={size} crop={crop} is not a "
                         "supported square preprocessing")


def _read_json(path: str, model_id: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model {model_id!r}: {path} is not a readable JSON file ({_short_reason(e)})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"model {model_id!r}: {path} does not hold a JSON object")
    return data


def _auto_map_modules(auto_map) -> list[tuple[str | None, str]]:
    """(upstream repo or None, 'module.py') for each class reference in a config's auto_map.

    References are 'module.Class' or 'org/repo--module.Class'; tokenizers give [slow, fast] pairs.
    """
    refs = []
    for value in (auto_map or {}).values():
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    out = []
    for ref in refs:
        repo, _, ref = ref.rpartition("--")
        module = ref.rpartition(".")[0]
        if module:
            out.append((repo or None, module.replace(".", "/") + ".py"))
    return list(dict.fromkeys(out))


def _check_remote_code(trust: bool, model_type, auto_map: dict, source: str, model_id: str) -> None:
    """Refuse, before any of the folder's code is imported, remote code that is not allowed."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    code = ", ".join(sorted({m for _, m in _auto_map_modules(auto_map)})) or "none"
    allowed = ", ".join(sorted(REMOTE_CODE_MODEL_TYPES))
    if trust and model_type not in REMOTE_CODE_MODEL_TYPES:
        raise ModelLoadError(
            f"model {model_id!r}: trust_remote_code: true would run Python files from {source} "
            f"(config.json auto_map: {code}), and it is allowed only for model types that need it "
            f"({allowed}); this config.json says model_type {model_type!r}. Remove trust_remote_code "
            "from the catalog entry, or use a model that transformers loads with its own code.")
    if not trust and auto_map and model_type not in CONFIG_MAPPING_NAMES:
        raise ModelLoadError(
            f"model {model_id!r}: {source} can only be loaded by running its own Python files "
            f"(config.json auto_map: {code}; model_type {model_type!r} is not built into transformers "
            f"{transformers.__version__}), and trust_remote_code is not set. Running a "
            f"model folder's code is allowed only for model types {allowed} (with "
            "`trust_remote_code: true`); use a model that transformers supports natively.")


@contextlib.contextmanager
def _never_prompt():
    """transformers asks "Do you wish to run the custom code? [y/N]" on stdin (waiting up to
    TIME_OUT_REMOTE_CODE s) whenever a call reaches remote code with trust_remote_code=None. We
    always pass a bool; with the timeout at 0 any call we do not control fails at once instead."""
    from transformers import dynamic_module_utils

    saved = dynamic_module_utils.TIME_OUT_REMOTE_CODE
    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0
    try:
        yield
    finally:
        dynamic_module_utils.TIME_OUT_REMOTE_CODE = saved


def _required_files(source: str, local: bool, trust: bool, need: RequiredFiles, revision, model_id: str):
    """Resolve every file the model needs into `need`; returns (config dict or None, preprocessor dict or None).

    Raises ModelLoadError (before anything is imported) for remote code that is not allowed.
    """
    def find(filenames, what, repo=None):
        if repo is None and local:
            return need.in_folder(source, filenames, what=what)
        return need.hub(repo or source, filenames, what=what, revision=None if repo else revision)

    config_file = find([CONFIG_FILE], "config")
    weights_file = find(WEIGHTS_FILES, "weights")
    preprocessor_file = find(PREPROCESSOR_FILES, "image processor config")
    config = _read_json(config_file, model_id) if config_file else None
    preprocessor = _read_json(preprocessor_file, model_id) if preprocessor_file else None
    if weights_file and weights_file.endswith(".index.json"):
        shards = sorted(set((_read_json(weights_file, model_id).get("weight_map") or {}).values()))
        for shard in shards:
            find([shard], "weights shard")
    if config is not None:
        auto_map = dict(config.get("auto_map") or {})
        if trust and preprocessor is not None:
            auto_map.update({f"preprocessor {k}": v for k, v in (preprocessor.get("auto_map") or {}).items()})
        _check_remote_code(trust, config.get("model_type"), auto_map, source, model_id)
        if trust:
            for repo, module in _auto_map_modules(auto_map):
                find([module], "model code", repo)
    return config, preprocessor


def load_transformers(spec: dict, *, model_id: str, device="cpu", precision="fp32",
                      cache_dir=None) -> TransformersVisionEmbedder:
    """Build a vision-only embedder from a catalog entry (keys in the module docstring)."""
    source = str(spec.get("weights") or spec.get("model") or "")
    if not source:
        raise ModelLoadError(f"model {model_id!r}: transformers entry needs 'model' (hub id or folder)")
    local = os.path.isdir(os.path.expanduser(source))
    if not local and (source.startswith(("/", "./", "~")) or spec.get("weights")):
        raise MissingWeightsError(f"model {model_id!r}: model folder {source} does not exist. Copy the "
                                  "save_pretrained folder there or change the catalog entry.")
    location = os.path.expanduser(source) if local else source  # `source` stays as written: it is fingerprinted
    trust = spec.get("trust_remote_code", False)
    if not isinstance(trust, bool):
        raise ModelLoadError(f"model {model_id!r}: trust_remote_code must be true or false, got {trust!r}")
    settings = hub_settings(cache_dir)
    need = RequiredFiles(model_id, settings,
                         local_hint="set `weights: /path/to/save_pretrained/folder` in the catalog entry")
    with hub_env(settings):
        config_json, _ = _required_files(location, local, trust, need, spec.get("revision"), model_id)
        need.raise_if_missing()
        model, proc, config, remote_florence = _from_pretrained(location, local, trust, config_json, settings,
                                                                spec.get("revision"), model_id)
    model_type = config.model_type
    florence = model_type == "florence2"
    default = ("mean_tokens" if florence else "image_embeds" if model_type.startswith("clip") else "pooler")
    pooling = spec.get("pooling", default)
    if pooling not in POOLINGS or (florence and pooling != "mean_tokens"):
        raise ModelLoadError(f"model {model_id!r}: pooling {pooling!r} is not one of {POOLINGS} "
                             "(Florence-2 supports only mean_tokens)")
    if local:
        # The folder's .py files are part of the model only when they are run (trust_remote_code).
        suffixes = (".json", ".safetensors", ".bin") + ((".py",) if trust else ())
        files = sorted(p for p in Path(location).iterdir() if p.is_file() and p.suffix in suffixes)
        weights = {p.name: f"sha256:{file_sha256(p)}" for p in files}
    else:
        weights = f"hf:{source}@{getattr(config, '_commit_hash', None) or spec.get('revision') or 'unknown'}"
    model.eval().to(device)
    return TransformersVisionEmbedder(
        model, pooling, remote_florence, model_id=model_id, loader="transformers",
        preprocess=preprocess_from_image_processor(proc, model_id), weights=weights,
        config={"model": source, "model_type": model_type, "class": type(model).__name__, "pooling": pooling},
        device=device, precision=precision, load_report={"source": source, "trust_remote_code": trust})


def _from_pretrained(source: str, local: bool, trust: bool, config_json: dict, settings, revision, model_id: str):
    """(model, image processor, config, remote_florence); trust_remote_code given explicitly to every call."""
    import transformers

    kw = dict(cache_dir=settings.cache_dir, local_files_only=settings.offline, revision=revision,
              trust_remote_code=trust)
    remote_florence = (trust and config_json.get("model_type") in REMOTE_CODE_MODEL_TYPES
                       and "AutoModelForCausalLM" in (config_json.get("auto_map") or {}))
    try:
        with _never_prompt():
            config = transformers.AutoConfig.from_pretrained(source, **kw)
            if remote_florence:
                model = transformers.AutoModelForCausalLM.from_pretrained(source, config=config, **kw)
            else:
                cls = {"clip": transformers.CLIPVisionModelWithProjection,
                       "clip_vision_model": transformers.CLIPVisionModelWithProjection,
                       "siglip": transformers.SiglipVisionModel,
                       "siglip_vision_model": transformers.SiglipVisionModel,
                       "florence2": getattr(transformers, "Florence2ForConditionalGeneration", None),
                       }.get(config.model_type) or transformers.AutoModel
                model = cls.from_pretrained(source, **kw)
            # The image processor alone (a CLIPImageProcessor for Florence-2): the full processor
            # of a remote-code repo would run its processing module too, for a tokenizer not used here.
            proc = transformers.AutoImageProcessor.from_pretrained(source, **kw)
    except OSError as e:  # transformers reports missing/uncached files as OSError
        if local:
            raise MissingWeightsError(f"model {model_id!r}: folder {source} is incomplete "
                                      f"({_short_reason(e)})") from None
        raise MissingWeightsError(missing_hub_message(model_id, source, ["config/weights/preprocessor"],
                                                      settings, e)) from None
    except Exception as e:
        raise ModelLoadError(f"model {model_id!r}: transformers could not load {source} "
                             f"({_short_reason(e)})") from None
    return model, proc, config, remote_florence
