"""The ``ray`` embedding engine: the forward passes of a chunk run in Ray actors (Ray Data).

`ray_embed_chunk` returns an ``embed_chunk(positions)`` with the contract of
`runtime.make_batches`: it yields ``(positions int64 [n], float32 vectors [n, dim])`` pairs that
cover every requested position exactly once, in whatever order the batches finish (the store keys
by position), and raises ManifestError with runtime's sentence for an image that cannot be used.

How: each call builds a Ray Data dataset of rows {position, image_id, uri} (one block per batch) and
maps it with `_EmbedWorker`, a callable class run by a fixed pool of ``concurrency`` actors. Each
actor loads the model once (`load_embedder`, the catalog key as model_id, `use_jpeg_draft` where
asked) and checks that its fingerprint is the one the driver expects: a worker node with other
weights, other library versions or other code would otherwise write vectors the store files under
the driver's fingerprint. Per batch it decodes with runtime's `decode_images` (same verification
and sentences; no pixel cache in the workers) and runs `embed_uint8`.

Faults: the actors are restartable (``max_restarts``) and their tasks retried (``max_task_retries``),
so a worker process that dies (killed, OOM) is replaced and its batch embedded again; the driver
keeps the first vectors it receives for a position, so a batch delivered twice is counted once, and
it raises if any requested position never came back. Errors the project raises on purpose (a bad
image, missing weights on a worker, a fingerprint mismatch) are not retried: the worker returns the
message in the batch and the driver raises it as the same NfhmError class.

Cost: every ``embed_chunk`` call starts its actor pool and loads the model in each actor (Ray Data
does not keep actors across datasets), so give the store a large ``chunk_size`` with this engine;
``benchmarks/ray_overhead.py`` measures the start-up cost.

Ray is optional (the ``ray`` extra); nothing here imports it at module import.
"""
from __future__ import annotations

import logging
import math
import os
import time
import warnings
from typing import Callable, Sequence

import numpy as np

from nfhm_pipeline import errors
from nfhm_pipeline.errors import ManifestError, ModelLoadError, NfhmError, SettingsError

__all__ = ["RayEngineError", "WorkerFingerprintError", "connect_ray", "ray_embed_chunk"]

INSTALL_HINT = "install the ray extra: pip install 'nfhm-pipeline[ray]'"


class RayEngineError(NfhmError):
    """The Ray job itself failed (workers kept dying, a bug in a worker), not an input or a model."""


class WorkerFingerprintError(ModelLoadError):
    """A Ray worker loaded the model with another fingerprint than the driver's."""


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs Ray Data, not only Ray core
    except ImportError as exc:
        raise NfhmError(f"the ray embedding engine needs Ray and Ray Data, which are not installed; "
                        f"{INSTALL_HINT}") from exc
    return ray


def _quiet_ray_data(ray) -> None:
    # Ray Data's progress bars (or, off a terminal, its progress log lines every few seconds) would
    # interleave with the pipeline's own progress meter; its warnings and errors still show.
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # spends Ray Data's one "progress bars disabled" warning
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def connect_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect this process to Ray and return the cluster's address.

    An already initialised Ray is reused as it is. Otherwise ``address`` (or RAY_ADDRESS) joins that
    cluster ("host:6379", "auto", "ray://host:10001"); without either a local Ray is started with
    ``num_cpus`` CPUs (None: all), no dashboard and warnings-only logging. The workers import
    nfhm_pipeline: on a remote cluster it must be installed there, in the same version.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return _address_of(ray)
    target = address or os.environ.get("RAY_ADDRESS") or None
    options = dict(logging_level=logging.WARNING, log_to_driver=True)
    if target:
        _check_reachable(target)
    try:
        if target:
            ray.init(address=target, **options)
        else:
            # address="local": a new local Ray even when a `ray start` cluster runs on this machine
            # (ray.init() would join it, and refuse num_cpus there).
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **options)
    except Exception as exc:  # noqa: BLE001 - ray.init raises many kinds; each becomes one sentence
        if target and _is_auth_failure(exc):
            raise NfhmError(f"the Ray cluster at {target!r} requires its authentication token: set "
                            f"RAY_AUTH_MODE=token and make the cluster's token available (~/.ray/auth_token, "
                            f"RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN) in this process's environment") from exc
        if target:
            raise NfhmError(f"cannot connect to the Ray cluster at {target!r} ({_first_line(exc)}); check that "
                            f"it is running (`ray status --address {target}`) and that RAY_ADDRESS / the "
                            f"address is right, or unset it to start a local Ray") from exc
        raise NfhmError(f"cannot start a local Ray ({_first_line(exc)}); see the Ray logs under "
                        f"/tmp/ray/session_latest/logs") from exc
    _quiet_ray_data(ray)
    return _address_of(ray)


def _is_auth_failure(exc: BaseException | None) -> bool:
    """Somewhere in the exception's chain, the cluster refused this process's (missing) token."""
    seen = 0
    while exc is not None and seen < 10:
        if type(exc).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """NfhmError unless a TCP connection to a "host:port" / "ray://host:port" address opens within
    `timeout_s`: ray.init retries an unreachable cluster for minutes without saying so."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local") or address.startswith(("anyscale://",)):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or port is None:
        raise NfhmError(f"the Ray address {address!r} is not host:port, ray://host:port or 'auto'; "
                        f"check RAY_ADDRESS or the address given")
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        raise NfhmError(f"cannot reach the Ray cluster at {address!r} ({exc}); check that it is running "
                        f"(`ray status --address {host}:{port}`) and that RAY_ADDRESS / the address is right, "
                        f"or unset it to start a local Ray") from exc


def _address_of(ray) -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - a Ray client ("ray://") connection has no GCS address here
        return str(os.environ.get("RAY_ADDRESS") or "ray")


# -- the worker ---------------------------------------------------------------------------------------

def _failure_message(failed: list[str]) -> str:
    # runtime.make_batches' sentence for a batch with failed images, word for word.
    return failed[0] + (f" ({len(failed) - 1} more such image(s) in the same batch)" if len(failed) > 1 else "")


class _EmbedWorker:
    """One Ray actor: loads the model once, then embeds batches of rows {position, image_id, uri}.

    Returns {position int64, vector float32 [n, dim], error str, error_kind str, decode_s, forward_s}:
    error is "" for a batch that was embedded, else the NfhmError message (error_kind its class
    name) on every row and zero vectors. decode_s / forward_s: the batch's seconds spread over its
    rows, so the driver's sum over the rows it keeps is the time spent on them.
    """

    def __init__(self, spec: dict, model_key: str, expected_fingerprint: str, device: str, precision: str,
                 jpeg_draft: bool, dataset: str | None, decode_threads: int, pause_per_batch_s: float = 0.0):
        from concurrent.futures import ThreadPoolExecutor

        from nfhm_pipeline.embedders.loaders import load_embedder
        from nfhm_pipeline.embedders.runtime import use_jpeg_draft

        self.dataset, self.device, self.pause_per_batch_s = dataset, device, pause_per_batch_s
        self.embedder, self.error, self.error_kind, self.dim = None, "", "", 0
        self.pool = ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="nfhm-ray-decode")
        try:
            embedder = load_embedder(spec, device=device, precision=precision)
        except NfhmError as exc:  # missing weights on this node and the like: the driver raises it
            self.error, self.error_kind = str(exc), type(exc).__name__
            return
        embedder.model_id = model_key
        if jpeg_draft:
            use_jpeg_draft(embedder)
        self.dim = int(embedder.dim)
        if embedder.fingerprint != expected_fingerprint:
            import socket

            self.error_kind = WorkerFingerprintError.__name__
            self.error = (f"model {model_key!r}: the Ray worker on {socket.gethostname()} (pid {os.getpid()}) loaded "
                          f"fingerprint {embedder.fingerprint[:12]}, the driver expects {expected_fingerprint[:12]}: "
                          f"the workers see different weights, catalog entry, library versions or nfhm_pipeline "
                          f"code than the driver; install the same versions and weight files on every Ray node")
            return
        self.embedder = embedder

    def _failed(self, positions: np.ndarray, message: str, kind: str) -> dict:
        n = len(positions)
        return {"position": positions, "vector": np.zeros((n, max(1, self.dim)), dtype=np.float32),
                "error": np.array([message] * n, dtype=object), "error_kind": np.array([kind] * n, dtype=object),
                "decode_s": np.zeros(n), "forward_s": np.zeros(n)}

    def __call__(self, batch: dict) -> dict:
        import torch

        from nfhm_pipeline.embedders.runtime import decode_images

        positions = np.asarray(batch["position"], dtype=np.int64)
        if self.embedder is None:
            return self._failed(positions, self.error, self.error_kind)
        if self.pause_per_batch_s:
            time.sleep(self.pause_per_batch_s)
        t0 = time.perf_counter()
        items = list(zip((str(u) for u in batch["uri"]), (str(i) for i in batch["image_id"])))
        decoded = decode_images(items, self.embedder.preprocess, dataset=self.dataset, pool=self.pool,
                                device=self.device)
        failed = [d for d in decoded if isinstance(d, str)]
        if failed:  # nothing of this batch is embedded, as in make_batches
            return self._failed(positions, _failure_message(failed), ManifestError.__name__)
        pixels = torch.from_numpy(np.stack(decoded)) if decoded else torch.empty(
            (0, 3, self.embedder.preprocess.size, self.embedder.preprocess.size), dtype=torch.uint8)
        t1 = time.perf_counter()
        vectors = self.embedder.embed_uint8(pixels)
        if isinstance(vectors, torch.Tensor):
            vectors = vectors.detach().float().cpu().numpy()
        t2 = time.perf_counter()
        n = max(1, len(positions))
        return {"position": positions, "vector": np.ascontiguousarray(vectors, dtype=np.float32),
                "error": np.array([""] * len(positions), dtype=object),
                "error_kind": np.array([""] * len(positions), dtype=object),
                "decode_s": np.full(len(positions), (t1 - t0) / n), "forward_s": np.full(len(positions), (t2 - t1) / n)}


def _error_class(kind: str) -> type[NfhmError]:
    if kind == WorkerFingerprintError.__name__:
        return WorkerFingerprintError
    found = getattr(errors, kind, None)
    if isinstance(found, type) and issubclass(found, NfhmError):
        return found
    return NfhmError


# -- the driver ---------------------------------------------------------------------------------------

def ray_embed_chunk(spec: dict, model_key: str, image_ids: Sequence[str], uris: Sequence[str], *,
                    expected_fingerprint: str, device: str = "cpu", precision: str = "fp32", batch_size: int = 64,
                    num_gpus_per_actor: float = 0, num_cpus_per_actor: float = 1, concurrency: int = 1,
                    max_restarts: int | None = None, jpeg_draft: bool = False, dataset: str | None = None,
                    on_images: Callable[[int], None] | None = None, timings=None,
                    _pause_per_batch_s: float = 0.0):
    """Return ``embed_chunk(positions)`` for `EmbeddingStore.embed_incrementally`, embedding on Ray.

    spec: the loader spec (`stages.image_embeddings.model_spec`: weight paths must exist on every
    node). model_key: the catalog key (the embedder's model_id). expected_fingerprint: the driver's
    fingerprint of the model (with jpeg_draft applied); every actor checks its own against it.
    concurrency: actors (each ``num_cpus_per_actor`` CPUs, its decode threads, and
    ``num_gpus_per_actor`` GPUs; give a GPU share for a cuda device). max_restarts: times an actor
    whose process dies is replaced (and its batch retried) before the job fails; None: Ray Data's
    default, without bound. on_images(n): after each block of n new images. timings
    (runtime.EmbedTimings): decode_s and forward_s as summed in the workers, wait_s the driver
    waiting for results. Ray is connected (`connect_ray`) on first use when this process has not
    done so. _pause_per_batch_s: for tests, seconds each worker sleeps per batch, so that a fault
    can be injected while the job runs.
    """
    if str(device).startswith("cuda") and not num_gpus_per_actor:
        raise SettingsError(f"model {model_key!r}: the ray engine on {device!r} needs num_gpus_per_actor > 0 "
                            f"(e.g. 1, or 0.5 to share a GPU between two actors); Ray hides the GPUs from "
                            f"actors that reserve none")
    if concurrency < 1 or batch_size < 1:
        raise SettingsError(f"model {model_key!r}: the ray engine needs concurrency >= 1 and batch_size >= 1, "
                            f"got concurrency={concurrency}, batch_size={batch_size}")
    image_ids = [str(i) for i in image_ids]
    uris = [str(u) for u in uris]
    worker_args = dict(spec=dict(spec), model_key=model_key, expected_fingerprint=expected_fingerprint,
                       device=str(device), precision=precision, jpeg_draft=bool(jpeg_draft), dataset=dataset,
                       decode_threads=max(1, int(round(num_cpus_per_actor or 1))),
                       pause_per_batch_s=float(_pause_per_batch_s))

    def embed_chunk(positions):
        ray = _import_ray()
        if not ray.is_initialized():
            connect_ray()
        wanted = [int(p) for p in positions]
        if not wanted:
            return
        rows = [{"position": p, "image_id": image_ids[p], "uri": uris[p]} for p in wanted]
        # One block per batch: the batches are consecutive positions, as make_batches forms them; no
        # more actors than batches (an extra one would load the model and idle).
        blocks_in = max(1, math.ceil(len(rows) / batch_size))
        source = ray.data.from_items(rows, override_num_blocks=blocks_in)
        # Ray Data makes map actors restartable by default (max_restarts=-1, max_task_retries=-1: a dead
        # actor process is replaced and the task it was running retried on the new one); a bound is
        # passed as an actor option, an API Ray 2.60 deprecates (removal announced for 2.64).
        restarts = {} if max_restarts is None else {"max_restarts": int(max_restarts),
                                                    "max_task_retries": int(max_restarts)}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
            mapped = source.map_batches(
                _EmbedWorker, fn_constructor_kwargs=worker_args, batch_size=batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=min(concurrency, blocks_in)),
                num_cpus=num_cpus_per_actor, num_gpus=num_gpus_per_actor or None, zero_copy_batch=True,
                udf_modifying_row_count=False,
                **restarts)
        pending = set(wanted)
        blocks = iter(mapped.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
        try:
            while pending:
                t0 = time.perf_counter()
                try:
                    block = next(blocks)
                except StopIteration:
                    break
                if timings is not None:
                    timings.wait_s += time.perf_counter() - t0
                got = np.asarray(block["position"], dtype=np.int64)
                failures = [i for i, e in enumerate(block["error"]) if e]
                if failures:
                    first = failures[0]
                    raise _error_class(str(block["error_kind"][first]))(str(block["error"][first]))
                # A batch Ray delivered twice (a retry racing its first attempt): first vectors win.
                keep = np.array([p in pending for p in got.tolist()], dtype=bool) & ~_repeated(got)
                if not keep.any():
                    continue
                fresh = got[keep]
                pending.difference_update(fresh.tolist())
                if timings is not None:
                    timings.decode_s += float(np.sum(block["decode_s"][keep]))
                    timings.forward_s += float(np.sum(block["forward_s"][keep]))
                if on_images is not None:
                    on_images(len(fresh))
                yield fresh, np.asarray(block["vector"], dtype=np.float32)[keep]
        except NfhmError:
            raise
        except ray.exceptions.RayError as exc:
            raise RayEngineError(f"the Ray job embedding {len(wanted)} images with model {model_key!r} failed: "
                                 f"{_first_line(exc)}") from exc
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()  # stops the streaming executor (and its actors) when we leave early
        if pending:
            raise RayEngineError(f"the Ray job for model {model_key!r} returned no vectors for {len(pending)} of "
                                 f"{len(wanted)} images (first missing position {min(pending)}); run again")

    return embed_chunk


def _repeated(positions: np.ndarray) -> np.ndarray:
    """True where a position already occurred earlier in the same block."""
    _, first = np.unique(positions, return_index=True)
    repeated = np.ones(len(positions), dtype=bool)
    repeated[first] = False
    return repeated


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
