"""Dagster resources: where things are stored and which device embeds.

Both are typed ``ConfigurableResource`` classes given once in ``Definitions``;
machine-specific values come from environment variables resolved at run start.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import dagster as dg

from nfhm_pipeline.errors import SettingsError, StorageError
from nfhm_pipeline.stages.base import Device, Paths
from nfhm_pipeline.store.embedding_store import EmbeddingStore


def default_data_dir() -> str:
    return os.environ.get("NFHM_DATA_DIR") or str(Path.cwd() / "data")


class NfhmStorage(dg.ConfigurableResource):
    """Every output lives under ``data_dir``; the embedding lake may live elsewhere (a URI)."""

    data_dir: str
    storage_root: str | None = None  # lake root; default <data_dir>/lake

    @property
    def data_path(self) -> Path:
        path = Path(self.data_dir).expanduser().resolve()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create NFHM_DATA_DIR {path}: {exc.strerror}; "
                               "point NFHM_DATA_DIR at a writable folder") from None
        if not os.access(path, os.W_OK):
            raise StorageError(f"NFHM_DATA_DIR {path} is not writable; point NFHM_DATA_DIR at a writable folder")
        return path

    @property
    def lake_root(self) -> str:
        return self.storage_root or str(self.data_path / "lake")

    @property
    def lake(self) -> EmbeddingStore:
        return self.paths().lake

    @property
    def warehouse_path(self) -> Path:
        return self.paths().warehouse

    def subdir(self, *parts: str) -> Path:
        return self.paths().subdir(*parts)

    def paths(self) -> Paths:
        """The plain folders a stage is handed (the data folder checked writable first)."""
        return Paths(self.data_path, self.lake_root)


class TorchDevice(dg.ConfigurableResource):
    """Which device embeds, with what precision and batching.

    ``device='auto'`` picks cuda → mps → cpu. Normalisation and autocast run on the device.
    """

    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    batch_size: int = 64
    num_workers: int = 2
    checkpoint_images: int = 1024  # images per checkpoint part: a killed run loses at most this many
    ray_actors: int = 1  # embedding actors when the ray engine runs (NFHM_RAY_ACTORS): one per GPU

    def resolve(self) -> str:
        import torch

        if self.device != "auto":
            if self.device == "cuda" and not torch.cuda.is_available():
                raise StorageError("TorchDevice.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
            return self.device
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"

    def settings(self, resolve: bool = True) -> Device:
        """What a stage is handed: the resolved device (``resolve=False``: 'cpu' without importing
        torch, for stages that never touch it) and the batching settings."""
        return Device(name=self.resolve() if resolve else "cpu", precision=self.precision,
                      batch_size=self.batch_size, num_workers=self.num_workers,
                      checkpoint_images=self.checkpoint_images, ray_actors=self.ray_actors)


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, default).strip()
    if value not in choices:
        raise SettingsError(f"environment variable {name}={value!r} is not one of {', '.join(choices)}; "
                            f"unset it (default {default!r}) or pick one of those")
    return value


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name, str(default)).strip()
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise SettingsError(f"environment variable {name}={raw!r} must be a whole number ≥ {minimum}; "
                            f"unset it (default {default}) or fix it")
    return value


def default_resources() -> dict:
    """The resources of the code location, machine values from ``NFHM_*`` environment variables;
    a bad value is a SettingsError sentence naming the variable, not a pydantic trace."""
    device = _env_choice("NFHM_DEVICE", "auto", ("auto", "cuda", "mps", "cpu"))
    precision = _env_choice("NFHM_PRECISION", "fp32", ("fp32", "fp16", "bf16"))
    batch_size = _env_int("NFHM_BATCH_SIZE", 64, 1)
    num_workers = _env_int("NFHM_LOADER_WORKERS", 2, 0)
    checkpoint_images = _env_int("NFHM_CHECKPOINT_IMAGES", 1024, 1)
    engine = _env_choice("NFHM_ENGINE", "local", ("local", "ray"))
    ray_actors = _env_int("NFHM_RAY_ACTORS", 1, 1)
    return {
        **({"ray_cluster": ray_cluster_resource()} if engine == "ray" else {}),
        "storage": NfhmStorage(
            data_dir=dg.EnvVar("NFHM_DATA_DIR") if os.environ.get("NFHM_DATA_DIR") else default_data_dir(),
            storage_root=dg.EnvVar("NFHM_STORAGE_ROOT") if os.environ.get("NFHM_STORAGE_ROOT") else None,
        ),
        "torch_device": TorchDevice(
            device=device,  # type: ignore[arg-type]
            precision=precision,  # type: ignore[arg-type]
            batch_size=batch_size, num_workers=num_workers, checkpoint_images=checkpoint_images,
            ray_actors=ray_actors,
        ),
    }


def ray_cluster_resource(**ray_init_options):
    """dagster-ray's ``LocalRay`` resource: ``ray.init`` before each embedding step, so the step's
    Ray Data job runs on a local Ray, or on the cluster ``RAY_ADDRESS`` names (Ray reads it).

    For a KubeRay cluster per run, give ``dagster_ray.kuberay.KubeRayInteractiveJob`` (or any
    dagster-ray ``RayResource``) as the ``ray_cluster`` resource instead (deploy/kuberay-embeddings-rayjob.yaml)."""
    try:
        from dagster_ray import LocalRay
    except ImportError:
        raise SettingsError("NFHM_ENGINE=ray needs the ray extra: pip install 'nfhm-pipeline[ray]' "
                            "(ray and dagster-ray); or unset NFHM_ENGINE") from None
    # ignore_reinit_error: a process that already joined Ray (a notebook, a test) keeps its session
    options = {"include_dashboard": False, "logging_level": "warning", "ignore_reinit_error": True,
               **ray_init_options}
    return LocalRay(ray_init_options=options)
