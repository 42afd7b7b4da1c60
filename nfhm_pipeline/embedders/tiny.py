"""A tiny open_clip architecture with seeded random weights, for tests and the offline demo.

It goes through open_clip's own code paths: the architecture is registered with
`open_clip.add_model_config`, checkpoints load via `create_model_and_transforms(name,
pretrained=path)`, and `build_tiny_hf_hub_cache` lays out a real Hugging Face cache so
`hf-hub:nfhm/tiny-clip` loads with HF_HUB_OFFLINE=1. Weights are random: embeddings are
meaningful only as a "no learned features" reference.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from nfhm_pipeline.ingest.images import write_bytes_atomic

TINY_OPENCLIP_NAME = "nfhm-tiny-clip"
TINY_OPENCLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    # vocab and context match open_clip's default SimpleTokenizer, so real prompts tokenize.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
# open_clip's defaults (OpenAI CLIP mean/std, bicubic, shorter side + centre crop), written out.
TINY_PREPROCESS_CFG = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def register_tiny_openclip_config() -> str:
    """Make `TINY_OPENCLIP_NAME` a known open_clip architecture (idempotent); returns the name.

    open_clip only registers configs from files, so the JSON is written (atomically) under the
    system temp folder.
    """
    import open_clip

    if TINY_OPENCLIP_NAME not in open_clip.list_models():
        path = Path(tempfile.gettempdir()) / "nfhm_openclip_configs" / f"{TINY_OPENCLIP_NAME}.json"
        write_bytes_atomic(path, json.dumps(TINY_OPENCLIP_CONFIG, indent=1).encode())
        open_clip.add_model_config(path)
    return TINY_OPENCLIP_NAME


def _tiny_state_dict(seed: int) -> dict:
    """The seeded tiny model's state dict (a fresh dict each call; tensors shared, never mutated here)."""
    return dict(_tiny_state_dict_cached(seed))


class _DropRandomInitWarning(logging.Filter):
    """Drops open_clip's "No pretrained weights loaded for model 'nfhm-tiny-clip'" record: random weights
    are the point when the seeded checkpoint is built, and a user reading it in a run's log (before the
    checkpoint is then loaded) is told the model is random when it is not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("No pretrained weights loaded for model")
                    and TINY_OPENCLIP_NAME in record.msg)


@contextlib.contextmanager
def _quiet_random_init():
    # open_clip logs through the root logger (logging.warning); a filter on that logger, removed on
    # exit, silences only this record and only while the tiny model is being built.
    root, dropper = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(dropper)
    try:
        yield
    finally:
        root.removeFilter(dropper)


@functools.lru_cache(maxsize=4)
def _tiny_state_dict_cached(seed: int) -> dict:
    import open_clip
    import torch

    register_tiny_openclip_config()
    with torch.random.fork_rng(devices=[]), _quiet_random_init():  # seeded without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_OPENCLIP_NAME, pretrained=None)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def _serialize(state_dict: dict, safetensors: bool) -> bytes:
    import io

    import torch

    if safetensors:
        from safetensors.torch import save
        return save(state_dict)
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def build_tiny_openclip_checkpoint(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save the seeded tiny model's full state dict (image and text towers) to `path`, atomically.

    '.safetensors' paths are written with safetensors, anything else with torch.save. The file
    loads with `open_clip.create_model_and_transforms(TINY_OPENCLIP_NAME, pretrained=str(path))`.
    """
    path = Path(path)
    write_bytes_atomic(path, _serialize(_tiny_state_dict(seed), path.suffix == ".safetensors"))
    return path


def build_tiny_hf_hub_cache(cache_dir: str | os.PathLike, repo_id: str = "nfhm/tiny-clip",
                            seed: int = 0, safetensors: bool = True) -> Path:
    """Write a Hugging Face hub cache entry for the tiny model under `cache_dir`; returns the snapshot dir.

    Layout (as huggingface_hub writes it): models--<org>--<name>/refs/main holding a commit hash,
    snapshots/<commit>/open_clip_config.json and open_clip_model.safetensors (or
    open_clip_pytorch_model.bin). The commit is derived from the contents, so a different seed
    gives a different commit, as a new upload would.
    """
    config = json.dumps({"model_cfg": TINY_OPENCLIP_CONFIG, "preprocess_cfg": TINY_PREPROCESS_CFG},
                        indent=1).encode()
    weights = _serialize(_tiny_state_dict(seed), safetensors)
    commit = hashlib.sha1(config + weights).hexdigest()
    repo_dir = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    write_bytes_atomic(snapshot / "open_clip_config.json", config)
    write_bytes_atomic(snapshot / ("open_clip_model.safetensors" if safetensors else "open_clip_pytorch_model.bin"),
                  weights)
    write_bytes_atomic(repo_dir / "refs" / "main", commit.encode())
    return snapshot
