"""The ``ray`` embedding engine: the forward passes of a chunk run in Ray actors.

`ray_embed_chunk` returns an ``embed_chunk(positions)`` with the contract of
`runtime.make_batches`: it yields ``(positions int64 [n], float32 vectors [n, dim])`` pairs that
cover every requested position exactly once, in whatever order the batches finish (the store keys
by position), and raises ManifestError with runtime's sentence for an image that cannot be used.

How: a pool of ``concurrency`` `_EmbedWorker` actors (Ray core) is started on the first call and
kept for every later chunk of the same engine. Each actor loads the model once (`load_embedder`, the
catalog key as model_id, `use_jpeg_draft` where asked) and checks that its fingerprint is the one
the driver expects: a worker node with other weights, other library versions or other code would
otherwise write vectors the store files under the driver's fingerprint. The driver cuts the
positions into batches of consecutive positions (as make_batches does) and keeps
``BATCHES_IN_FLIGHT_PER_ACTOR`` of them queued on each actor, handing the next batch to whichever
actor finished; per batch an actor decodes with runtime's `decode_images` (same verification and
sentences; no pixel cache in the workers), runs `embed_uint8` and returns the vectors as one numpy
array (one out-of-band buffer, mapped by the driver without a copy).

Why not Ray Data: a Ray Data job starts its actor pool and loads the model in every actor each
time (it keeps no actors across datasets), i.e. once per store chunk, and adds its block
scheduling per batch; on 2 cores that cost more than the embedding (benchmarks/ray_overhead.py).

Faults: the actors are restartable and their tasks retried (``max_restarts``, without bound by
default), so a worker process that dies (killed, OOM) is replaced and the batches queued on it are
embedded again; the driver keeps the first vectors it receives for a position, so a batch delivered
twice is counted once, and it raises if any requested position never came back. Errors the project
raises on purpose (a bad image, missing weights on a worker, a fingerprint mismatch) are not
retried: the worker returns the message for the batch and the driver raises it as the same
NfhmError class.

Cost: a fixed start-up per engine (actor processes start, import torch and the project, load the
model: the time to the first batch) and then a steady rate; ``benchmarks/ray_overhead.py`` states
both. Ray is optional (the ``ray`` extra); nothing here imports it at module import.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable, Sequence

import numpy as np

from nfhm_pipeline import errors
from nfhm_pipeline.errors import ManifestError, ModelLoadError, NfhmError, SettingsError

__all__ = ["RayEmbedChunk", "RayEngineError", "WorkerFingerprintError", "connect_ray", "cpus_per_actor",
           "ray_embed_chunk"]

INSTALL_HINT = "install the ray extra: pip install 'nfhm-pipeline[ray]'"


class RayEngineError(NfhmError):
    """The Ray job itself failed (workers kept dying, a bug in a worker), not an input or a model."""


class WorkerFingerprintError(ModelLoadError):
    """A Ray worker loaded the model with another fingerprint than the driver's."""


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise NfhmError(f"the ray embedding engine needs Ray, which is not installed; {INSTALL_HINT}") from exc
    return ray


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
    """One Ray actor: loads the model once, then embeds batches (`embed`) for as long as its engine lives.

    `embed(positions, uris, image_ids)` returns {position int64 [n], vector float32 [n, dim], error,
    error_kind, decode_s, forward_s}: error is "" for a batch that was embedded, else the NfhmError
    message (error_kind its class name) and no vectors; decode_s / forward_s the batch's seconds.
    """

    def __init__(self, spec: dict, model_key: str, expected_fingerprint: str, device: str, precision: str,
                 jpeg_draft: bool, dataset: str | None, threads: int, pause_per_batch_s: float = 0.0):
        t0 = time.perf_counter()
        import torch

        from nfhm_pipeline.embedders.loaders import load_embedder
        from nfhm_pipeline.embedders.runtime import use_jpeg_draft

        # The actor owns `threads` CPUs of the node: torch's intra-op pool and the decode threads are
        # sized to them, so actors sharing a node do not oversubscribe its cores.
        threads = max(1, int(threads))
        torch.set_num_threads(threads)
        self.dataset, self.device, self.pause_per_batch_s = dataset, device, pause_per_batch_s
        self.embedder, self.error, self.error_kind, self.dim = None, "", "", 0
        self.pool = None
        if threads > 1:  # one thread decodes inline: a pool would only add a hand-off per image
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nfhm-ray-decode")
        self.load_s = 0.0
        try:
            embedder = load_embedder(spec, device=device, precision=precision)
        except NfhmError as exc:  # missing weights on this node and the like: the driver raises it
            self.error, self.error_kind = str(exc), type(exc).__name__
            return
        finally:
            self.load_s = time.perf_counter() - t0
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

    def startup(self) -> dict:
        """This actor's process id, the seconds its constructor took (imports and model load) and its
        error ("" when it loaded the expected model)."""
        return {"pid": os.getpid(), "load_s": self.load_s, "error": self.error, "error_kind": self.error_kind}

    def _failed(self, positions: np.ndarray, message: str, kind: str) -> dict:
        return {"position": positions, "vector": None, "error": message, "error_kind": kind,
                "decode_s": 0.0, "forward_s": 0.0}

    def embed(self, positions: np.ndarray, uris: list[str], image_ids: list[str]) -> dict:
        import torch

        from nfhm_pipeline.embedders.runtime import decode_images

        positions = np.asarray(positions, dtype=np.int64)
        if self.embedder is None:
            return self._failed(positions, self.error, self.error_kind)
        if self.pause_per_batch_s:
            time.sleep(self.pause_per_batch_s)
        t0 = time.perf_counter()
        decoded = decode_images(list(zip(uris, image_ids)), self.embedder.preprocess, dataset=self.dataset,
                                pool=self.pool, device=self.device)
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
        # A numpy array: Ray ships it as one out-of-band buffer (the driver maps it from the object
        # store without a copy); a list or a tensor would be pickled element by element.
        return {"position": positions, "vector": np.ascontiguousarray(vectors, dtype=np.float32), "error": "",
                "error_kind": "", "decode_s": t1 - t0, "forward_s": t2 - t1}


def _error_class(kind: str) -> type[NfhmError]:
    if kind == WorkerFingerprintError.__name__:
        return WorkerFingerprintError
    found = getattr(errors, kind, None)
    if isinstance(found, type) and issubclass(found, NfhmError):
        return found
    return NfhmError


# -- the driver ---------------------------------------------------------------------------------------

# Batches queued on each actor: one running and one waiting, so an actor never idles while the driver
# handles a result, and a restarted actor has at most this many batches to embed again.
BATCHES_IN_FLIGHT_PER_ACTOR = 2


def cpus_per_actor(ray, concurrency: int, cuda: bool) -> int:
    """The CPUs each of ``concurrency`` actors reserves when the caller gives none: on CUDA (one GPU
    per actor) a GPU node's CPUs shared by its GPUs, for decoding; on CPU the cluster's CPUs shared by
    the actors (never more than the largest node has), so that together they use every core."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if cuda:
        shares = [int(r.get("CPU", 0) // r["GPU"]) for r in nodes if r.get("GPU")]
        return max(1, min(shares, default=1))
    total = sum(int(r.get("CPU", 0)) for r in nodes)
    largest = max((int(r.get("CPU", 0)) for r in nodes), default=1)
    return max(1, min(total // max(1, concurrency), largest))


class RayEmbedChunk:
    """``embed_chunk(positions)`` on a pool of Ray actors that is started on the first call and kept
    for every later call (each of the store's chunks), so the actors start and load the model once
    per engine, not once per chunk. `close()` ends the actors; dropping the engine does too (Ray ends
    an actor when the last handle to it goes). first_batch_s: seconds from the pool's start to its
    first vectors (actor processes start, import, load the model, embed one batch), after the first
    call; `actor_startup()` the actors' own share of it."""

    def __init__(self, model_key: str, image_ids: list[str], uris: list[str], worker_args: dict, *,
                 batch_size: int, concurrency: int, num_cpus_per_actor: float | None, num_gpus_per_actor: float,
                 max_restarts: int | None, on_images, timings):
        self.model_key, self.image_ids, self.uris, self.worker_args = model_key, image_ids, uris, worker_args
        self.batch_size, self.concurrency = batch_size, concurrency
        self.num_cpus_per_actor, self.num_gpus_per_actor, self.max_restarts = (num_cpus_per_actor,
                                                                               num_gpus_per_actor, max_restarts)
        self.on_images, self.timings = on_images, timings
        self.actors: list = []
        self._ready: list = []  # actors whose constructor is done: they get batches
        self._unready: dict = {}  # the `startup` call of each other actor -> the actor
        self._startup: list[dict] = []
        self.first_batch_s: float | None = None
        self._started_at = 0.0

    def _start(self, ray, batches: int) -> None:
        cuda = str(self.worker_args["device"]).startswith("cuda")
        cpus = self.num_cpus_per_actor or cpus_per_actor(ray, self.concurrency, cuda)
        # Unbounded by default, as Ray Data had it: a dead actor process is replaced and the batches
        # queued on it run again on the new one.
        restarts = -1 if self.max_restarts is None else int(self.max_restarts)
        worker = ray.remote(_EmbedWorker).options(num_cpus=cpus, num_gpus=self.num_gpus_per_actor or None,
                                                  max_restarts=restarts, max_task_retries=restarts)
        args = dict(self.worker_args, threads=max(1, int(cpus)))
        self._started_at = time.perf_counter()
        # No more actors than batches of this first call: an extra one would load the model and idle.
        self.actors = [worker.remote(**args) for _ in range(min(self.concurrency, batches))]
        # Each actor's first task: it reports once its constructor is done, and only then gets batches,
        # so an actor the cluster cannot place (or that loads slowly) holds no batches hostage.
        self._unready = {actor.startup.remote(): actor for actor in self.actors}

    def close(self) -> None:
        """End the actors now (they end anyway once this engine is dropped)."""
        ray = _import_ray()
        actors, self.actors, self._ready, self._unready = self.actors, [], [], {}
        if ray.is_initialized():
            for actor in actors:
                ray.kill(actor, no_restart=True)

    def __call__(self, positions):
        ray = _import_ray()
        if not ray.is_initialized():
            connect_ray()
        wanted = np.fromiter((int(p) for p in positions), dtype=np.int64)
        if not len(wanted):
            return
        # The batches are consecutive positions, as make_batches forms them.
        batches = [wanted[i:i + self.batch_size] for i in range(0, len(wanted), self.batch_size)]
        if not self.actors:
            self._start(ray, len(batches))
        todo = iter(batches)
        in_flight: dict = {}  # ObjectRef -> the actor it runs on
        batches_left = [len(batches)]

        def submit(actor) -> None:
            batch = next(todo, None)
            if batch is not None:
                batches_left[0] -= 1
                ref = actor.embed.remote(batch, [self.uris[p] for p in batch], [self.image_ids[p] for p in batch])
                in_flight[ref] = actor

        def give_work(actor) -> None:
            for _ in range(BATCHES_IN_FLIGHT_PER_ACTOR):
                submit(actor)

        for actor in self._ready:
            give_work(actor)
        pending = np.zeros(len(self.image_ids), dtype=bool)
        pending[wanted] = True
        left = int(pending.sum())
        try:
            while in_flight or (self._unready and batches_left[0]):
                t0 = time.perf_counter()
                [ref], _ = ray.wait([*in_flight, *(self._unready if batches_left[0] else ())], num_returns=1)
                result = ray.get(ref)
                if self.timings is not None:
                    self.timings.wait_s += time.perf_counter() - t0
                if ref in self._unready:
                    self._startup.append(result)
                    if result["error"]:
                        raise _error_class(result["error_kind"])(result["error"])
                    actor = self._unready.pop(ref)
                    self._ready.append(actor)
                    give_work(actor)
                    continue
                submit(in_flight.pop(ref))
                if result["error"]:
                    raise _error_class(str(result["error_kind"]))(str(result["error"]))
                if self.first_batch_s is None:
                    self.first_batch_s = time.perf_counter() - self._started_at
                got = result["position"]
                # A batch delivered twice (a retry racing its first attempt) counts once: first vectors win.
                keep = pending[got] & ~_repeated(got)
                if not keep.any():
                    continue
                fresh = got[keep]
                pending[fresh] = False
                left -= len(fresh)
                if self.timings is not None:
                    share = len(fresh) / len(got)
                    self.timings.decode_s += float(result["decode_s"]) * share
                    self.timings.forward_s += float(result["forward_s"]) * share
                if self.on_images is not None:
                    self.on_images(len(fresh))
                yield fresh, (result["vector"] if keep.all() else result["vector"][keep])
        except NfhmError:
            raise
        except ray.exceptions.RayError as exc:
            raise RayEngineError(f"the Ray job embedding {len(wanted)} images with model {self.model_key!r} "
                                 f"failed: {_first_line(exc)}") from exc
        if left:
            missing = np.flatnonzero(pending)
            raise RayEngineError(f"the Ray job for model {self.model_key!r} returned no vectors for {left} of "
                                 f"{len(wanted)} images (first missing position {missing.min()}); run again")

    def actor_startup(self) -> list[dict]:
        """The ready actors' {"pid", "load_s": seconds their constructor took (imports, model load)}."""
        return [{"pid": info["pid"], "load_s": info["load_s"]} for info in self._startup]


def ray_embed_chunk(spec: dict, model_key: str, image_ids: Sequence[str], uris: Sequence[str], *,
                    expected_fingerprint: str, device: str = "cpu", precision: str = "fp32", batch_size: int = 64,
                    num_gpus_per_actor: float = 0, num_cpus_per_actor: float | None = None, concurrency: int = 1,
                    max_restarts: int | None = None, jpeg_draft: bool = False, dataset: str | None = None,
                    on_images: Callable[[int], None] | None = None, timings=None,
                    _pause_per_batch_s: float = 0.0) -> RayEmbedChunk:
    """Return ``embed_chunk(positions)`` for `EmbeddingStore.embed_incrementally`, embedding on Ray.

    spec: the loader spec (`stages.image_embeddings.model_spec`: weight paths must exist on every
    node). model_key: the catalog key (the embedder's model_id). expected_fingerprint: the driver's
    fingerprint of the model (with jpeg_draft applied); every actor checks its own against it.
    concurrency: actors (each ``num_cpus_per_actor`` CPUs, as many torch and decode threads, and
    ``num_gpus_per_actor`` GPUs; give a GPU share for a cuda device). num_cpus_per_actor None: see
    `cpus_per_actor` (on CPU, the cluster's CPUs shared by the actors; on CUDA, a GPU's share of
    its node's CPUs). max_restarts: times an actor whose process dies is replaced (and its batches
    retried) before the job fails; None: without bound. on_images(n): after each batch of n new
    images. timings (runtime.EmbedTimings): decode_s and forward_s as summed in the workers, wait_s
    the driver waiting for results. Ray is connected (`connect_ray`) on first use when this process
    has not done so. _pause_per_batch_s: for tests, seconds each worker sleeps per batch, so that a
    fault can be injected while the job runs.
    """
    if str(device).startswith("cuda") and not num_gpus_per_actor:
        raise SettingsError(f"model {model_key!r}: the ray engine on {device!r} needs num_gpus_per_actor > 0 "
                            f"(e.g. 1, or 0.5 to share a GPU between two actors); Ray hides the GPUs from "
                            f"actors that reserve none")
    if concurrency < 1 or batch_size < 1:
        raise SettingsError(f"model {model_key!r}: the ray engine needs concurrency >= 1 and batch_size >= 1, "
                            f"got concurrency={concurrency}, batch_size={batch_size}")
    worker_args = dict(spec=dict(spec), model_key=model_key, expected_fingerprint=expected_fingerprint,
                       device=str(device), precision=precision, jpeg_draft=bool(jpeg_draft), dataset=dataset,
                       pause_per_batch_s=float(_pause_per_batch_s))
    return RayEmbedChunk(model_key, [str(i) for i in image_ids], [str(u) for u in uris], worker_args,
                         batch_size=int(batch_size), concurrency=int(concurrency),
                         num_cpus_per_actor=num_cpus_per_actor, num_gpus_per_actor=num_gpus_per_actor,
                         max_restarts=max_restarts, on_images=on_images, timings=timings)


def _repeated(positions: np.ndarray) -> np.ndarray:
    """True where a position already occurred earlier in the same block."""
    _, first = np.unique(positions, return_index=True)
    repeated = np.ones(len(positions), dtype=bool)
    repeated[first] = False
    return repeated


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
