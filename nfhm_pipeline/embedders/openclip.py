"""open_clip models: built-in names with a pretrained tag or checkpoint file, `hf-hub:` repos, and a
fine-tuned state dict on top of a base model (ArborCLIP = BioCLIP + its fine-tuned weights).

Catalog keys (loader: open_clip):
  model       'ViT-B-32' (built-in architecture), 'hf-hub:org/repo', or 'nfhm-tiny-clip'.
              'base' is accepted instead of 'model' (reads better with state_dict).
  pretrained  open_clip tag for a built-in name (e.g. 'laion2b_s34b_b79k'), or a checkpoint path
              (.pt/.bin/.pth/.safetensors). Ignored for hf-hub: ids.
  weights     local checkpoint path; same as a path in `pretrained`.
  state_dict  fine-tuned weights loaded on top of the base model: a local path, or
              'hf-hub:org/repo/filename' resolved from the hub cache. Missing/unexpected keys are
              logged and kept in `embedder.load_report`; more than MAX_MISSING_FRACTION of the
              model's keys missing raises ModelLoadError.

Work-arounds for open_clip 3.x (checked in its factory.py):
  * For `hf-hub:` ids, a weights file that cannot be fetched is only logged and the model is built
    with random weights. We resolve config and weights from the cache first (clear
    MissingWeightsError) and pass require_pretrained=True.
  * `get_model_config('hf-hub:...')` / HF text towers take no cache_dir, so loading runs inside
    `hub_env`, which points huggingface_hub at the cache and offline flag read at call time.
  * torch.load is called by open_clip with weights_only=True (its default; passed explicitly);
    state dicts on top are loaded here with weights_only=True.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from nfhm_pipeline.errors import MissingWeightsError, ModelLoadError
from .base import (Embedder, RequiredFiles, _short_reason, hub_env, hub_settings, load_state_dict_file,
                   weights_identity)
from .preprocess import PreprocessSpec
from .tiny import TINY_OPENCLIP_NAME, register_tiny_openclip_config

log = logging.getLogger(__name__)

HF_PREFIX = "hf-hub:"
HF_CONFIG = "open_clip_config.json"
HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's own order
MAX_MISSING_FRACTION = 0.05
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
_RESIZE_MODES = {"shortest": "shorter_crop", "squash": "squash"}


class OpenClipEmbedder(Embedder):
    """Image and text towers of an open_clip model; raw (unnormalised) encode_image/encode_text output."""

    has_text_tower = True

    def __init__(self, model, tokenizer, **kwargs):
        self.model = model
        self.tokenizer = tokenizer
        super().__init__(**kwargs)

    def _encode_images(self, x):
        return self.model.encode_image(x)

    def _encode_texts(self, texts):
        return self.model.encode_text(self.tokenizer(texts).to(self.device))


def _looks_like_path(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith(_CHECKPOINT_SUFFIXES)


def preprocess_from_open_clip(model, model_id: str) -> PreprocessSpec:
    """PreprocessSpec from the model's own `visual.preprocess_cfg` (what open_clip's transforms use)."""
    from open_clip.model import get_model_preprocess_cfg

    cfg = get_model_preprocess_cfg(model)
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ModelLoadError(f"model {model_id!r}: non-square input {tuple(size)} is not supported")
        size = size[0]
    mode = cfg.get("resize_mode", "shortest")
    if mode not in _RESIZE_MODES:
        raise ModelLoadError(f"model {model_id!r}: open_clip resize_mode {mode!r} is not supported "
                             f"(supported: {sorted(_RESIZE_MODES)})")
    interpolation = cfg.get("interpolation", "bicubic")
    return PreprocessSpec(size=int(size), resize=_RESIZE_MODES[mode],
                          interpolation="bilinear" if interpolation == "bilinear" else "bicubic",
                          mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def _resolve_tag(name: str, tag: str, model_id: str, need: RequiredFiles) -> str | None:
    """Local file for a built-in open_clip pretrained tag, or None with the gap recorded in `need`."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        raise ModelLoadError(f"model {model_id!r}: {tag!r} is neither an open_clip pretrained tag for {name} "
                             f"nor a file path. Known tags: {open_clip.list_pretrained_tags_by_model(name)}")
    if cfg.get("file"):
        return need.local(cfg["file"], what="weights file")
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS[1]
        candidates = ([HF_WEIGHTS[0]] if filename == HF_WEIGHTS[1] else
                      [filename[:-4] + ".safetensors"] if filename.endswith((".bin", ".pth")) else []) + [filename]
        return need.hub(repo, candidates, what=f"weights {name}/{tag}")
    url = cfg.get("url", "")
    cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    return need.local(cached, what=f"open_clip weights {name}/{tag} (only downloadable from {url})")


def _resolve_state_dict(ref: str, model_id: str, need: RequiredFiles) -> str | None:
    if ref.startswith(HF_PREFIX):
        parts = ref[len(HF_PREFIX):].split("/")
        if len(parts) < 3:
            raise ModelLoadError(f"model {model_id!r}: state_dict {ref!r} must be 'hf-hub:org/repo/filename'")
        return need.hub("/".join(parts[:2]), ["/".join(parts[2:])], what="state_dict", whole_repo=False)
    return need.local(ref, what="state_dict file")


def _need_hf_text_tower(model_cfg: dict, need: RequiredFiles) -> None:
    """A text tower or tokenizer from another Hugging Face repo (BiomedCLIP's PubMedBERT) is a
    file the model needs too: require that repo's config.json (or tokenizer_config.json)."""
    text_cfg = (model_cfg or {}).get("text_cfg") or {}
    for repo in dict.fromkeys(r for r in (text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name")) if r):
        need.hub(repo, ["config.json", "tokenizer_config.json"], what="text tower / tokenizer")


def _read_json(path: str, model_id: str) -> dict:
    import json

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model {model_id!r}: {path} is not a readable JSON file ({_short_reason(e)})") from None


def apply_state_dict(model, path: str, model_id: str) -> dict:
    """Load a fine-tuned state dict onto `model` (strict=False); returns {'missing_keys', 'unexpected_keys'}.

    Raises ModelLoadError when shapes disagree or more than MAX_MISSING_FRACTION of the model's
    keys are missing (the file is for another architecture).
    """
    state_dict = load_state_dict_file(path, model_id=model_id)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:
        raise ModelLoadError(f"model {model_id!r}: state dict {path} does not fit the base model "
                             f"({_short_reason(e)})") from None
    report = {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys)}
    n_model = len(model.state_dict())
    if report["missing_keys"] or report["unexpected_keys"]:
        log.warning("model %s: state dict %s: %d of %d model keys missing %s; %d unexpected keys %s",
                    model_id, path, len(report["missing_keys"]), n_model, report["missing_keys"][:5],
                    len(report["unexpected_keys"]), report["unexpected_keys"][:5])
    if len(report["missing_keys"]) > MAX_MISSING_FRACTION * n_model:
        raise ModelLoadError(
            f"model {model_id!r}: state dict {path} leaves {len(report['missing_keys'])} of {n_model} "
            f"model keys missing (e.g. {report['missing_keys'][:3]}); it is not for this base model.")
    return report


def load_open_clip(spec: dict, *, model_id: str, device="cpu", precision="fp32",
                   cache_dir=None) -> OpenClipEmbedder:
    """Build an OpenClipEmbedder from a catalog entry (keys in the module docstring)."""
    import open_clip

    name = spec.get("model") or spec.get("base")
    if not name:
        raise ModelLoadError(f"model {model_id!r}: open_clip entry needs 'model' (or 'base')")
    if name == TINY_OPENCLIP_NAME:
        register_tiny_openclip_config()
    settings = hub_settings(cache_dir)
    pretrained = spec.get("weights") or spec.get("pretrained")
    kwargs = dict(device=device, cache_dir=settings.cache_dir, weights_only=True, require_pretrained=True)
    config = {"model": name}
    # Every file (base config and weights, text tower repo, state dict) is resolved before any is
    # loaded, so one MissingWeightsError lists them all.
    need = RequiredFiles(model_id, settings, local_hint="set `weights:` / `state_dict:` to local files in "
                                                        "the catalog entry")
    with hub_env(settings):
        if name.startswith(HF_PREFIX):
            repo = name[len(HF_PREFIX):]
            config_file = need.hub(repo, [HF_CONFIG], what="open_clip config")
            weights_file = need.hub(repo, HF_WEIGHTS, what="weights")
            if config_file:
                _need_hf_text_tower(_read_json(config_file, model_id).get("model_cfg"), need)
        else:
            if not pretrained:
                raise ModelLoadError(f"model {model_id!r}: open_clip entry for {name} needs 'pretrained' "
                                     "(a tag or a checkpoint path) or 'weights'")
            if _looks_like_path(str(pretrained)):
                weights_file = need.local(pretrained, what="weights file")
            else:
                weights_file = _resolve_tag(name, pretrained, model_id, need)
                config["pretrained"] = pretrained
            config["architecture"] = open_clip.get_model_config(name)
            _need_hf_text_tower(config["architecture"], need)
        sd_file = _resolve_state_dict(str(spec["state_dict"]), model_id, need) if spec.get("state_dict") else None
        need.raise_if_missing()
        if name.startswith(HF_PREFIX):
            create_args = (name,)
        else:
            create_args = (name, weights_file if _looks_like_path(str(pretrained)) else pretrained)
        weights = [weights_identity(weights_file)]
        try:
            model, _, _ = open_clip.create_model_and_transforms(*create_args, **kwargs)
            tokenizer = open_clip.get_tokenizer(name, cache_dir=settings.cache_dir)
        except (OSError, FileNotFoundError) as e:  # e.g. an HF text tower's config/tokenizer not cached
            raise MissingWeightsError(f"model {model_id!r}: a file open_clip needs for {name} is missing "
                                      f"({_short_reason(e)}); cache {settings.cache_dir}, offline="
                                      f"{settings.offline}. Download the model on a machine with internet "
                                      "and copy the Hugging Face cache here.") from None
        except Exception as e:
            raise ModelLoadError(f"model {model_id!r}: open_clip could not build {name} from "
                                 f"{weights_file} ({_short_reason(e)})") from None
        report = {"weights_file": weights_file}
        if sd_file:
            report.update(apply_state_dict(model, sd_file, model_id), state_dict_file=sd_file)
            weights.append(weights_identity(sd_file))
    model.eval()
    return OpenClipEmbedder(model, tokenizer, model_id=model_id, loader="open_clip",
                            preprocess=preprocess_from_open_clip(model, model_id), weights=weights,
                            config=config, device=device, precision=precision,
                            dim=getattr(model.visual, "output_dim", None), load_report=report)
