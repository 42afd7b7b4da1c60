"""The Embedder base class, fingerprints, and local-weights resolution shared by the loaders.

An embedder turns uint8 pixels [N, 3, H, W] (from `preprocess.decode_to_uint8`) into float32
vectors [N, dim]. Everything that changes those numbers (weights, preprocessing, model config,
precision, this module's code) goes into `fingerprint`, so stored embeddings can be reused exactly
when it is unchanged and are recomputed when it is not.

Hugging Face Hub: `huggingface_hub` reads HF_HUB_OFFLINE and HF_HUB_CACHE once, at import. Loaders
therefore read them again at call time (`hub_settings`) and hold them in place while loading
(`hub_env`), so a process (or test) that sets them after importing torch still loads offline from
the intended cache.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np

from nfhm_pipeline.errors import MissingWeightsError, ModelLoadError, NfhmError
from .preprocess import PreprocessSpec, decode_batch, normalize_on_device

log = logging.getLogger(__name__)

# Bump when a change in this package changes embedding values for the same weights and pixels.
EMBEDDING_CODE_VERSION = "1"
PRECISIONS = ("fp32", "fp16", "bf16")


class NoTextTowerError(NfhmError, NotImplementedError):
    """The model has no text encoder (embed_texts is not available)."""


def compute_fingerprint(*, loader: str, weights: Any, preprocess: PreprocessSpec, config: dict) -> str:
    """sha256 hex over weights identity, full preprocessing, model config and EMBEDDING_CODE_VERSION."""
    payload = {
        "code_version": EMBEDDING_CODE_VERSION,
        "loader": loader,
        "weights": weights,
        "preprocess": asdict(preprocess),
        "config": config,
    }
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class Embedder:
    """One loaded model. Subclasses implement `_encode_images` (and `_encode_texts` for text towers).

    Attributes: model_id (catalog key), dim, preprocess (PreprocessSpec), fingerprint (sha256 hex),
    device (torch.device), precision ('fp32' | 'fp16' | 'bf16'), has_text_tower, text_dim (or None),
    load_report (dict: where the weights came from; missing/unexpected keys where relevant).
    """

    has_text_tower: bool = False

    def __init__(self, *, model_id: str, loader: str, preprocess: PreprocessSpec, weights: Any,
                 config: dict, device="cpu", precision: str = "fp32", dim: int | None = None,
                 load_report: dict | None = None):
        import torch

        if precision not in PRECISIONS:
            raise ModelLoadError(f"model {model_id!r}: precision must be one of {PRECISIONS}, got {precision!r}")
        self.model_id = model_id
        self.loader = loader
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.precision = precision
        self.load_report = dict(load_report or {})
        self.dim = int(dim) if dim is not None else self._probe_dim()
        self.text_dim = self.dim if self.has_text_tower else None
        # precision is part of the config: fp16/bf16 autocast changes the stored numbers.
        self.fingerprint = compute_fingerprint(
            loader=loader, weights=weights, preprocess=preprocess,
            config={**config, "dim": self.dim, "precision": precision})

    def __repr__(self):
        return (f"{type(self).__name__}(model_id={self.model_id!r}, dim={self.dim}, "
                f"pixel_key={self.preprocess.pixel_key!r}, device={str(self.device)!r}, "
                f"precision={self.precision!r}, fingerprint={self.fingerprint[:12]}...)")

    # -- subclass hooks -------------------------------------------------------------------------
    def _encode_images(self, x):
        """x: float32 [N, 3, S, S], normalised, on self.device -> tensor [N, dim]."""
        raise NotImplementedError

    def _encode_texts(self, texts: list[str]):
        raise NoTextTowerError(
            f"model {self.model_id!r} has no text tower: zero-shot and text retrieval need a "
            "vision-language model (e.g. an open_clip entry)")

    # -- public API -------------------------------------------------------------------------------
    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def embed_uint8(self, batch):
        """uint8 tensor [N, 3, S, S] (S = preprocess.size) -> float32 CPU tensor [N, dim].

        Moves the batch to the device, scales to [0, 1], normalises with the spec's mean/std there,
        and runs the model under inference_mode (and autocast for fp16/bf16).
        """
        import torch

        if not isinstance(batch, torch.Tensor):
            batch = torch.as_tensor(np.asarray(batch))
        size = self.preprocess.size
        if batch.dtype != torch.uint8 or batch.ndim != 4 or tuple(batch.shape[1:]) != (3, size, size):
            raise ValueError(f"model {self.model_id!r} expects uint8 [N, 3, {size}, {size}] "
                             f"(pixel_key {self.preprocess.pixel_key}); got {batch.dtype} {tuple(batch.shape)}")
        if batch.shape[0] == 0:
            return torch.empty((0, self.dim), dtype=torch.float32)
        with torch.inference_mode():
            x = normalize_on_device(batch, self.preprocess.mean, self.preprocess.std, self.device)
            with self._autocast():
                out = self._encode_images(x).float().cpu()
        return out.clone()  # an ordinary tensor: callers may modify it in place

    def embed_images(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        """PIL images -> float32 array [N, dim] (decode + embed_uint8; convenience for notebooks)."""
        import torch

        chunks = [self.embed_uint8(torch.from_numpy(decode_batch(images[i:i + batch_size], self.preprocess)))
                  for i in range(0, len(images), batch_size)]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, self.dim), np.float32)

    def embed_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """Strings -> float32 array [n, text_dim] (raw text-tower output, not normalised).

        Raises NoTextTowerError (an NfhmError and NotImplementedError) for vision-only models.
        """
        import torch

        if not self.has_text_tower:
            self._encode_texts(list(texts))  # raises
        texts = list(texts)
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                with self._autocast():
                    out.append(self._encode_texts(texts[i:i + batch_size]).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.text_dim), np.float32)

    def _probe_dim(self) -> int:
        """Output width found by embedding one black image (used when no config states it)."""
        import torch

        s = self.preprocess.size
        self.dim = -1  # placeholder so embed_uint8's empty-batch path is never hit here
        return int(self.embed_uint8(torch.zeros((1, 3, s, s), dtype=torch.uint8)).shape[1])


# -- weights identity -----------------------------------------------------------------------------
_SHA_CACHE: dict[tuple, str] = {}
_HF_SNAPSHOT = re.compile(r"models--(?P<repo>[^/\\]+)[/\\]snapshots[/\\](?P<commit>[0-9a-f]{40})[/\\](?P<file>.+)$")


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes (memoised per process by path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def weights_identity(path: str | os.PathLike) -> str:
    """'hf:org/repo@<commit>:<file>' for a file in a Hugging Face cache snapshot (commits are
    immutable, so no hashing of multi-GB files), else 'sha256:<hex>' of the file."""
    m = _HF_SNAPSHOT.search(str(path))
    if m:
        return f"hf:{m['repo'].replace('--', '/')}@{m['commit']}:{m['file']}"
    return f"sha256:{file_sha256(path)}"


def file_identity(path: str | os.PathLike) -> list[dict]:
    """What the file system says about a file (or every file under a folder) without reading its
    bytes: one {'path', 'target', 'size', 'mtime_ns'} per file, sorted by path. 'target' is the
    file a symlink resolves to (in a Hugging Face cache, the blob named by the content's hash).

    A rewritten file changes size or mtime; a file only touched changes mtime too, which costs one
    model load (the fingerprint then proves nothing changed), never a wrong reuse.
    """
    root = Path(os.path.expanduser(str(path)))
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    out = []
    for p in files:
        st = p.stat()  # follows symlinks: the blob's size and mtime
        out.append({"path": str(p.absolute()), "target": str(p.resolve()), "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns})
    return out


def require_local_file(path: str | os.PathLike, *, model_id: str, what: str = "weights file") -> str:
    """Return `path` as str if it is a file, else raise MissingWeightsError saying how to fix it."""
    need = RequiredFiles(model_id)
    found = need.local(path, what=what)
    need.raise_if_missing()
    return found


# -- Hugging Face Hub, offline-aware --------------------------------------------------------------
def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


@dataclass(frozen=True)
class HubSettings:
    offline: bool
    cache_dir: str


@functools.lru_cache(maxsize=8)
def _hub_reachable(endpoint: str) -> bool:
    """One quick TCP connect per process. Without it, huggingface_hub retries every file request
    with backoff (~30 s each) on a machine with no network but HF_HUB_OFFLINE unset."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connect proves nothing; let the client try
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return True
    except OSError:
        log.info("%s is not reachable: loading models from the local cache only", endpoint)
        return False


def hub_settings(cache_dir: str | os.PathLike | None = None) -> HubSettings:
    """Offline flag and hub cache folder as the environment says *now* (explicit cache_dir wins).

    Offline when HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set, or the Hub endpoint cannot be reached.
    """
    from huggingface_hub import constants

    offline = (_is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE"))
               or constants.HF_HUB_OFFLINE
               or not _hub_reachable(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT))
    if cache_dir is None:
        cache_dir = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache_dir is None and os.environ.get("HF_HOME"):
        cache_dir = os.path.join(os.environ["HF_HOME"], "hub")
    return HubSettings(offline=bool(offline), cache_dir=os.path.expanduser(str(cache_dir or constants.HF_HUB_CACHE)))


@contextlib.contextmanager
def hub_env(settings: HubSettings):
    """Make huggingface_hub (and transformers/timm/open_clip through it) use `settings` inside the block.

    Those libraries read `huggingface_hub.constants` at call time, so setting them here reaches the
    code paths that take no cache_dir / local_files_only argument (e.g. open_clip's HF text towers).
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE
    constants.HF_HUB_OFFLINE = settings.offline or constants.HF_HUB_OFFLINE
    constants.HF_HUB_CACHE = settings.cache_dir
    try:
        yield settings
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE = saved


def _short_reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def missing_hub_message(model_id: str, repo_id: str, files: Sequence[str], settings: HubSettings,
                        cause: BaseException | None = None) -> str:
    """The MissingWeightsError text for one Hugging Face repo whose `files` (alternatives) are absent."""
    need = RequiredFiles(model_id, settings)
    need.gaps.append(_Gap(what="files", names=tuple(files), repo=repo_id,
                          reason="" if cause is None or settings.offline else _short_reason(cause)))
    return need.message()


def hub_download(repo_id: str, filenames: Sequence[str], *, model_id: str, settings: HubSettings,
                 revision: str | None = None) -> str:
    """Local path of the first of `filenames` found for `repo_id` (cache first; network only when
    not offline). Raises MissingWeightsError naming the repo, files, cache and the fix."""
    need = RequiredFiles(model_id, settings)
    found = need.hub(repo_id, filenames, what="files", revision=revision)
    need.raise_if_missing()
    return found


# -- every file a model needs, checked before loading ------------------------------------------------
@dataclass(frozen=True)
class _Gap:
    what: str                   # what the file is for the model: 'weights', 'state_dict file', ...
    names: tuple[str, ...]      # a local path, or file names of which any one will do
    repo: str | None = None     # Hugging Face repo id; None for a local path
    folder: str | None = None   # local folder holding one of `names`
    reason: str = ""            # why a download failed (online only)
    whole_repo: bool = True     # fetch advice: the whole repo, or only these files


class RequiredFiles:
    """Resolves every file one model needs before anything is built, then raises ONE
    MissingWeightsError naming all that are missing (a user who fetches what it lists has
    everything on the next run, instead of learning of the next file from the next failure).

        need = RequiredFiles(model_id, settings)
        weights = need.hub("org/repo", ["model.safetensors", "pytorch_model.bin"], what="weights")
        tuned = need.local("/path/ft.pt", what="state_dict file")
        need.raise_if_missing()   # from here on, every value returned above is a path (str)

    `hub` and `local` return None for a missing file, so a caller can go on collecting.
    """

    def __init__(self, model_id: str, settings: HubSettings | None = None, *,
                 local_hint: str = "set `weights: /path/to/file` in the catalog entry"):
        self.model_id, self.settings, self.local_hint = model_id, settings, local_hint
        self.gaps: list[_Gap] = []

    def local(self, path: str | os.PathLike, *, what: str = "weights file") -> str | None:
        p = Path(os.path.expanduser(str(path)))
        if p.is_file():
            return str(p)
        self.gaps.append(_Gap(what=what, names=(str(p),)))
        return None

    def in_folder(self, folder: str | os.PathLike, filenames: Sequence[str], *, what: str) -> str | None:
        """Path of the first of `filenames` present in the local `folder`."""
        folder = Path(os.path.expanduser(str(folder)))
        for filename in filenames:
            if (folder / filename).is_file():
                return str(folder / filename)
        self.gaps.append(_Gap(what=what, names=tuple(filenames), folder=str(folder)))
        return None

    def hub(self, repo_id: str, filenames: Sequence[str], *, what: str, revision: str | None = None,
            whole_repo: bool = True) -> str | None:
        """Local path of the first of `filenames` in `repo_id` (cache first; network only when not offline)."""
        from huggingface_hub import hf_hub_download

        if self.settings is None:
            raise TypeError("RequiredFiles.hub needs HubSettings")
        last: BaseException | None = None
        for filename in filenames:
            try:
                return hf_hub_download(repo_id, filename, revision=revision, cache_dir=self.settings.cache_dir,
                                       local_files_only=self.settings.offline)
            except Exception as e:  # LocalEntryNotFoundError, EntryNotFound, HTTP/connection errors, OSError
                last = e
        self.gaps.append(_Gap(what=what, names=tuple(filenames), repo=repo_id, whole_repo=whole_repo,
                              reason="" if last is None or self.settings.offline else _short_reason(last)))
        return None

    def raise_if_missing(self) -> None:
        if self.gaps:
            raise MissingWeightsError(self.message())

    def message(self) -> str:
        local = [g for g in self.gaps if g.repo is None]
        repos: dict[str, list[_Gap]] = {}
        for g in self.gaps:
            if g.repo is not None:
                repos.setdefault(g.repo, []).append(g)
        items = [f"{_gap_files(g)} is not in folder {g.folder}" if g.folder else f"{g.what} {g.names[0]} does not exist"
                 for g in local]
        items += [", ".join(_gap_files(g) for g in gaps) + f" of Hugging Face repo {repo}"
                  for repo, gaps in repos.items()]
        count = len(local) + sum(len(g) for g in repos.values())
        head = (f"model {self.model_id!r}: {items[0]}" if count == 1 else
                f"model {self.model_id!r} needs {count} files that are missing (all are listed here): "
                + "; ".join(f"({i}) {text}" for i, text in enumerate(items, 1)))
        parts = [head + "."]
        if local:
            parts.append("Copy the file" + ("s" if len(local) > 1 else "") + " there, or change the path"
                         + ("s" if len(local) > 1 else "") + " in the model's catalog entry.")
        if repos:
            s = self.settings
            mode = ("loading is offline (HF_HUB_OFFLINE=1 or no network)" if s.offline else "the download failed")
            commands = [f"`hf download {repo}`" if all(g.whole_repo for g in gaps) else
                        f"`hf download {repo} {' '.join(g.names[0] for g in gaps)}`" for repo, gaps in repos.items()]
            folders = [f"models--{repo.replace('/', '--')}" for repo in repos]
            one = len(repos) == 1
            parts.append(
                f"{'It is' if count == 1 else 'They are'} not in the local cache {s.cache_dir} and {mode}. "
                f"To provide {'it' if count == 1 else 'them'}: on a machine with internet run "
                f"{' and '.join(commands)} (older clients: `huggingface-cli download` with the same arguments) "
                f"and copy {'its' if one else 'the'} {' and '.join(folders)} folder{'' if one else 's'} into "
                f"{s.cache_dir} (or point HF_HUB_CACHE at a copied cache), or {self.local_hint}.")
            reasons = sorted({g.reason for g in self.gaps if g.reason})
            if reasons:
                parts.append(f"[{'; '.join(reasons)}]")
        return " ".join(parts)


def _gap_files(gap: _Gap) -> str:
    return f"{gap.what} ({' / '.join(gap.names)})"


def load_state_dict_file(path: str, *, model_id: str) -> dict:
    """Tensors from a .safetensors file or a torch checkpoint (torch.load(weights_only=True)).

    A checkpoint dict holding 'state_dict' is unwrapped; a leading 'module.' (DataParallel) is
    stripped from every key that has it.
    """
    import torch

    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"model {model_id!r}: cannot read weights file {path} ({_short_reason(e)}). "
                             "It must be a state dict saved by torch.save or safetensors.") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd:
        raise ModelLoadError(f"model {model_id!r}: {path} holds no state dict (got {type(sd).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in sd.items()}
