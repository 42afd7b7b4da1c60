"""Stage 2: manifest → per-model embedding table (incremental, checkpointed).

Images are decoded and resized once per preprocessing spec (size, resize mode, interpolation,
reduced JPEG decode) into the packed uint8 cache of `pixel_cache.py`, shared by every model with
that spec; each model's mean/std normalisation runs on the device. On a GPU decoding costs more
than a ViT-B forward pass, so decoding per model would waste most of the run.

The cache is content-addressed by the manifest's image_id (sha256 of the bytes), so what is decoded
must be those bytes: each file is read once, hashed, and decoded from the same bytes
(`decode_verified`). A file rewritten since the manifest was built (the nightly re-embedding
schedule runs without the manifest) fails its partition with a message naming the file, and
nothing is cached or stored for it.

How a chunk of images is embedded (`make_batches`): a background thread produces the batches in
order (the same batches as ever: consecutive positions, `batch_size` each, so the forward pass sees
exactly the tensors it always did) into a small queue while the calling thread runs the forward
pass, so decoding and cache reads overlap compute. For each batch the producer copies cached rows
out of the chunk files and decodes the rest in a thread pool (one thread per available core; PIL
releases the GIL while decoding and resizing), writing them to the cache a chunk at a time. Batch
buffers are reused from a small ring, pinned on CUDA so the host-to-device copy is asynchronous.
With a `jpeg_draft` spec on CUDA, JPEGs are decoded on the GPU in one batched
``torchvision.io.decode_jpeg`` call, any image it cannot take going the CPU way (exact specs never
take the GPU way: nvJPEG's and torch's resampling are not bit-identical to PIL's).
"""
from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from nfhm_pipeline.embedders.pixel_cache import PixelCache
from nfhm_pipeline.embedders.preprocess import PreprocessSpec
from nfhm_pipeline.errors import ManifestError

if TYPE_CHECKING:  # pandas (and the catalog and the store, which load it) where a table is made:
    import pandas as pd  # a Ray actor decoding and embedding never loads them

    from nfhm_pipeline.catalog import ModelSpec
    from nfhm_pipeline.store.embedding_store import EmbeddingStore, EmbedReport

__all__ = ["EmbedSettings", "EmbedTimings", "PixelCache", "decode_images", "decode_verified", "embed_manifest",
           "embedding_identity", "make_batches", "model_loader_spec", "use_jpeg_draft"]


@dataclass
class EmbedSettings:
    """batch_size: images per forward pass. num_workers: no longer used (decoding runs in threads of
    this process, `decode_threads`); kept so existing callers need no change. chunk_size: images per
    checkpoint. decode_threads: decoding threads, None = one per core this process may use.
    prefetch_batches: batches decoded ahead of the forward pass, in a background thread; None: 2 on
    CUDA, 0 on CPU (each batch decoded just before its forward pass, on every core: on a CPU both
    share the same cores, and a decoding thread that wakes during the forward pass stalls torch's
    threads at their barriers: MobileNetV2 cold went from 0.75x to 0.9x of the bare forward)."""

    batch_size: int = 64
    num_workers: int = 2
    chunk_size: int = 1024  # images per checkpoint
    device: str = "cpu"
    decode_threads: int | None = None
    prefetch_batches: int | None = None


@dataclass
class EmbedTimings:
    """Seconds spent, summed over a run: decode_s producing batches (cache reads, file reads, hashing,
    decoding, resizing, cache writes; in the background thread, overlapping the forward pass, when
    batches are prefetched), forward_s in the forward pass, wait_s by the forward loop waiting for a
    batch (near 0 when the prefetching keeps up; without prefetching, the decode time)."""

    decode_s: float = 0.0
    forward_s: float = 0.0
    wait_s: float = 0.0


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def use_jpeg_draft(embedder):
    """Switch `embedder` to reduced-size JPEG decode (`PreprocessSpec.with_jpeg_draft`): its pixels get
    their own pixel_key and its fingerprint changes with them (derived from the old one, which covers
    weights, config and the rest), so its embeddings never mix with those of exact pixels. Returns it."""
    if not embedder.preprocess.jpeg_draft:
        embedder.preprocess = embedder.preprocess.with_jpeg_draft()
        embedder.fingerprint = hashlib.sha256(f"{embedder.fingerprint}+jpeg_draft".encode()).hexdigest()
    return embedder


# -- decoding ---------------------------------------------------------------------------------------

def verified_bytes(uri: str, image_id: str, dataset: str | None = None) -> bytes:
    """The bytes of `uri`, checked to hash to `image_id`; ManifestError (the ingest sentences) otherwise."""
    from nfhm_pipeline.ingest.images import _read_bytes, load_verified_rgb

    data = _read_bytes(uri)
    if hashlib.sha256(data).hexdigest() != image_id:
        load_verified_rgb(uri, image_id, dataset=dataset)  # raises the sentence naming the file and the fix
        raise ManifestError(f"cannot load image {uri}: its bytes changed while it was being read; run again")
    return data


def decode_bytes(data: bytes, uri: str, spec: PreprocessSpec) -> np.ndarray:
    """uint8 [3, S, S] of image `data` per `spec` (reduced-size JPEG decode where the spec asks for it).

    A file the reduced decoder refuses goes the exact way, which raises ManifestError for a file that
    cannot be decoded at all (the same sentence as everywhere else).
    """
    from nfhm_pipeline.embedders.preprocess import decode_jpeg_reduced, decode_to_uint8
    from nfhm_pipeline.ingest.images import _decode_rgb

    if spec.jpeg_draft:
        try:
            reduced = decode_jpeg_reduced(data, spec)
        except (OSError, SyntaxError, ValueError):
            reduced = None
        if reduced is not None:
            return reduced
    return decode_to_uint8(_decode_rgb(data, uri), spec)


def decode_verified(uri: str, image_id: str, spec: PreprocessSpec, dataset: str | None = None) -> np.ndarray:
    """uint8 [3, S, S] of `uri` decoded from bytes whose sha256 is `image_id`; ManifestError otherwise.
    For an exact spec this is the pre-cache path call for call (`load_verified_rgb` + `decode_to_uint8`)."""
    from nfhm_pipeline.embedders.preprocess import decode_to_uint8
    from nfhm_pipeline.ingest.images import load_verified_rgb

    if not spec.jpeg_draft:
        return decode_to_uint8(load_verified_rgb(uri, image_id, dataset=dataset), spec)
    return decode_bytes(verified_bytes(uri, image_id, dataset), uri, spec)


def _message_or(call, *args):
    try:
        return call(*args)
    except ManifestError as e:
        return str(e)


def _gpu_jpeg_decode(spec: PreprocessSpec, device: str) -> bool:
    if not (spec.jpeg_draft and str(device).startswith("cuda")):
        return False
    try:
        import torch
        import torchvision.io  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _gpu_decodable(data: bytes) -> bool:
    """A JPEG of a mode nvJPEG decodes as PIL does (RGB/YCbCr or grey; CMYK and the like go the CPU way)."""
    import io

    from PIL import Image

    if not data.startswith(b"\xff\xd8"):
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format == "JPEG" and im.mode in ("RGB", "L")
    except Exception:  # noqa: BLE001 - the CPU path gives the proper error for a corrupt file
        return False


def decode_images(items: Sequence[tuple[str, str]], spec: PreprocessSpec, *, dataset: str | None = None,
                  pool: ThreadPoolExecutor | None = None, device: str = "cpu") -> list[np.ndarray | str]:
    """For each (uri, image_id): its uint8 [3, S, S] pixels, or the ManifestError message saying why
    the file cannot be used. Decodes in `pool` when given; JPEGs on the GPU for a `jpeg_draft` spec
    on CUDA (see the module docstring)."""
    run = pool.map if pool is not None else map
    if not _gpu_jpeg_decode(spec, device):
        return list(run(lambda item: _message_or(decode_verified, item[0], item[1], spec, dataset), items))
    from nfhm_pipeline.embedders.preprocess import decode_jpegs_torch

    datas = list(run(lambda item: _message_or(verified_bytes, item[0], item[1], dataset), items))
    results: list = list(datas)
    on_gpu = [i for i, d in enumerate(datas) if isinstance(d, bytes) and _gpu_decodable(d)]
    for i, pixels in zip(on_gpu, decode_jpegs_torch([datas[i] for i in on_gpu], spec, device)):
        results[i] = pixels  # None where the GPU refused it: the CPU way below
    on_cpu = [i for i, r in enumerate(results) if r is None or isinstance(r, bytes)]
    for i, pixels in zip(on_cpu, run(lambda i: _message_or(decode_bytes, datas[i], items[i][0], spec), on_cpu)):
        results[i] = pixels
    return results


# -- batches: a background producer, the forward pass in the caller ---------------------------------

_DONE = object()


class _Prefetcher:
    """Produces (positions, uint8 tensor [n, 3, S, S], failure messages, buffer) per batch, in order,
    in a background thread (or, with no batches ahead, in line as the forward loop asks); `release(buffer)`
    hands a buffer back once its forward pass is done."""

    def __init__(self, batches, image_ids, uris, spec: PreprocessSpec, cache: PixelCache | None,
                 settings: EmbedSettings, dataset: str | None, timings: EmbedTimings):
        import torch

        self.batches, self.image_ids, self.uris = batches, image_ids, uris
        self.spec, self.cache, self.settings, self.dataset, self.timings = spec, cache, settings, dataset, timings
        cuda = str(settings.device).startswith("cuda")
        ahead = settings.prefetch_batches if settings.prefetch_batches is not None else (2 if cuda else 0)
        self.ready: queue.Queue = queue.Queue(maxsize=max(1, ahead))
        self.free: queue.Queue = queue.Queue()
        pin = cuda and torch.cuda.is_available()
        rows = max((len(b) for b in batches), default=0)
        for _ in range(min(len(batches), ahead + 2 if ahead > 0 else 1)):
            self.free.put(torch.empty((rows, 3, spec.size, spec.size), dtype=torch.uint8, pin_memory=pin))
        self.stop = threading.Event()
        self.thread = (threading.Thread(target=self._produce, name="nfhm-pixel-batches", daemon=True)
                       if ahead > 0 else None)  # None: batches made in line, in __iter__

    def __enter__(self):
        if self.thread is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is None:
            if getattr(self, "_inline", None) is not None:
                self._inline.close()  # stopped early: its finally closes the cache writer now
            return
        while self.thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self.ready.get(timeout=0.05)
            except queue.Empty:
                pass
        self.thread.join()

    def release(self, buffer) -> None:
        self.free.put(buffer)

    def __iter__(self):
        if self.thread is None:  # no prefetching: each batch is made when the forward loop asks
            produced = self._inline = self._produced()
            while True:
                t0 = time.perf_counter()
                item = next(produced, _DONE)
                self.timings.wait_s += time.perf_counter() - t0
                if item is _DONE:
                    return
                yield item
        while True:
            t0 = time.perf_counter()
            item = self.ready.get()
            self.timings.wait_s += time.perf_counter() - t0
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _take_buffer(self):
        while not self.stop.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                pass
        return None

    def _produce(self) -> None:
        """The background thread: every batch of ``_produced`` into the queue, then _DONE (or the error)."""
        try:
            for item in self._produced():
                if not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as e:  # noqa: BLE001 - handed to the forward loop, which raises it
            self._put(e)

    def _produced(self):
        """(positions, pixels, failure messages, buffer) per batch, in order; the pixel-cache
        writer is closed after the last one (or, stopped early, quietly: what was written is valid)."""
        threads = self.settings.decode_threads or available_cores()
        writer = self.cache.writer(self.spec.pixel_key, self.spec.size) if self.cache is not None else None
        try:
            with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nfhm-decode") as pool:
                for positions in self.batches:
                    buffer = self._take_buffer()
                    if buffer is None:
                        return
                    t0 = time.perf_counter()
                    pixels = buffer[:len(positions)]
                    failed = self._fill(positions, pixels.numpy(), pool, writer)
                    self.timings.decode_s += time.perf_counter() - t0
                    yield np.asarray(positions, dtype=np.int64), pixels, failed, buffer
            if writer is not None:
                t0 = time.perf_counter()
                writer.close()
                self.timings.decode_s += time.perf_counter() - t0
                writer = None
        finally:
            if writer is not None:  # stopped early: keep what was decoded (valid entries), quietly
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - the first error is the one the caller sees
                    pass

    def _fill(self, positions, out: np.ndarray, pool, writer) -> list[str]:
        ids = list(map(self.image_ids.__getitem__, positions))
        if self.cache is not None:
            found = self.cache.read_into(self.spec.pixel_key, ids, out)
        else:
            found = np.zeros(len(ids), dtype=bool)
        missing = np.flatnonzero(~found).tolist()
        failed = []
        if missing:
            items = [(self.uris[positions[i]], ids[i]) for i in missing]
            decoded = decode_images(items, self.spec, dataset=self.dataset, pool=pool, device=self.settings.device)
            for i, result in zip(missing, decoded):
                if isinstance(result, str):
                    failed.append(result)
                    continue
                out[i] = result
                if writer is not None:
                    writer.add(ids[i], result)
        return failed


def make_batches(embedder, image_ids: Sequence[str], uris: Sequence[str], pixel_cache: PixelCache | None,
                 settings: EmbedSettings, on_batch: Callable[[int], None] | None = None,
                 dataset: str | None = None, timings: EmbedTimings | None = None,
                 on_images: Callable[[int], None] | None = None):
    """Return ``embed_chunk(positions)`` for :meth:`EmbeddingStore.embed_incrementally`.

    pixel_cache: None decodes every image every time (a model whose catalog entry turns the cache
    off). on_batch(batches done so far) and on_images(images in this batch) are called after each
    batch's forward pass; `timings` is added to (see EmbedTimings).
    """
    import torch

    batches_done = 0
    timings = timings if timings is not None else EmbedTimings()

    def embed_chunk(positions):
        nonlocal batches_done
        positions = list(positions)
        size = max(1, settings.batch_size)
        batches = [positions[i:i + size] for i in range(0, len(positions), size)]
        with _Prefetcher(batches, image_ids, uris, embedder.preprocess, pixel_cache, settings, dataset,
                         timings) as prefetched:
            for pos, pixels, failed, buffer in prefetched:
                if failed:  # before the forward pass: nothing of this batch is embedded or checkpointed
                    raise ManifestError(failed[0] + (f" ({len(failed) - 1} more such image(s) in the same batch)"
                                                     if len(failed) > 1 else ""))
                t0 = time.perf_counter()
                vectors = embedder.embed_uint8(pixels)
                if isinstance(vectors, torch.Tensor):
                    # Copied out of torch's memory and the tensor dropped before the next batch:
                    # holding the model's own output tensors until the chunk is written made every
                    # later forward pass land its activations on fresh pages (measured on CPU:
                    # ~230 page faults a batch, 6 % of tiny-clip's forward time; with the copy, none).
                    vectors = np.array(vectors.detach().float().cpu().numpy(), dtype=np.float32)
                timings.forward_s += time.perf_counter() - t0
                prefetched.release(buffer)  # embed_uint8 returned host vectors: the copy from it is done
                batches_done += 1
                if on_batch is not None:
                    on_batch(batches_done)
                if on_images is not None:
                    on_images(len(pos))
                yield pos, vectors

    return embed_chunk


def embed_manifest(store: EmbeddingStore, dataset: str, model: str, manifest: pd.DataFrame, embedder,
                   pixel_cache: PixelCache | None, settings: EmbedSettings,
                   on_batch: Callable[[int], None] | None = None, timings: EmbedTimings | None = None,
                   on_images: Callable[[int], None] | None = None) -> EmbedReport:
    """Bring ``dataset``'s stored embeddings for ``model`` up to date with ``manifest``
    (`make_batches` for the callbacks, `timings` and a None `pixel_cache`)."""
    image_ids = manifest["image_id"].astype(str).tolist()
    uris = manifest["uri"].astype(str).tolist()
    embed_chunk = make_batches(embedder, image_ids, uris, pixel_cache, settings, on_batch, dataset=dataset,
                               timings=timings, on_images=on_images)
    return store.embed_incrementally(dataset, model, image_ids, embedder.fingerprint, embed_chunk,
                                     chunk_size=settings.chunk_size)


def embedding_identity(manifest_ids: Sequence[str], stored_ids: Sequence[str]) -> dict:
    """Does the stored table hold exactly the manifest's images, each once, in manifest order?

    Counts alone pass a table whose ids differ from the manifest's (an id stored twice hiding a
    missing one); this compares the ids themselves. Returns {'passed', 'missing', 'unexpected',
    'repeated', 'stored', 'expected'}.
    """
    wanted = [str(i) for i in manifest_ids]
    stored = [str(i) for i in stored_ids]
    wanted_set, stored_set = set(wanted), set(stored)
    return {
        "passed": stored == list(dict.fromkeys(wanted)),
        "missing": len(wanted_set - stored_set),
        "unexpected": len(stored_set - wanted_set),
        "repeated": len(stored) - len(stored_set),
        "stored": len(stored),
        "expected": len(wanted),
    }


def model_loader_spec(model: ModelSpec, models_dir: Path) -> dict:
    """The loader spec of a catalog model, building self-made weights (the offline demo) if needed."""
    spec = model.loader_spec()
    if model.build == "tiny_openclip":
        from nfhm_pipeline.embedders.tiny import build_tiny_openclip_checkpoint

        rel = spec.get("pretrained") or f"{model.key}.safetensors"
        path = Path(rel) if Path(rel).is_absolute() else models_dir / Path(rel).name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            build_tiny_openclip_checkpoint(path, seed=int(spec.get("seed", 0)))
        spec["pretrained"] = str(path)
        spec.pop("seed", None)
    return spec


def text_prompt_table(class_names_by_level: dict[str, Sequence[str]], templates: Sequence[str]) -> pd.DataFrame:
    import pandas as pd

    rows = [(level, name, t, t.format(name)) for level, names in class_names_by_level.items()
            for name in names for t in templates]
    return pd.DataFrame(rows, columns=["level", "class", "template", "prompt"])


def embed_prompts(embedder, prompts: pd.DataFrame, batch_size: int = 256) -> np.ndarray:
    texts = prompts["prompt"].tolist()
    out = [np.asarray(embedder.embed_texts(texts[i:i + batch_size]), dtype=np.float32)
           for i in range(0, len(texts), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
