"""Packed decoded-pixel cache: uint8 [3, S, S] images stored in chunks, shared by every model and
dataset with the same preprocessing (`PreprocessSpec.pixel_key`).

Layout under the cache root (``<data>/cache/pixels``)::

    packed-v1/<pixel_key>/<chunk>.npy   uint8 [n, 3, S, S], np.save format (read with np.load mmap)
    packed-v1/<pixel_key>/<chunk>.ids   its index fragment: the n image_ids, one per line, row order

Rules:

- **Content-addressed.** An entry is (pixel_key, image_id) and image_id is the sha256 of the image
  bytes, so an entry is valid forever, whichever dataset or model wrote it. Only pixels decoded from
  bytes whose hash was checked are written (the caller's promise, see `runtime.decode_verified`).
- **Atomic, commit by index fragment.** Each chunk's ``.npy`` is renamed into place first and its
  ``.ids`` second, each through `store.files.atomic_path`; a chunk exists for readers only when
  both are there. A run killed mid-chunk leaves at most a temp file or a ``.npy`` without ids
  (never read; swept after `STALE_SECONDS`), and the next run decodes those images again.
- **Many writers, no shared file.** Every chunk has a fresh random name and no file is ever
  rewritten, so two runs filling one cache at once cannot lose each other's entries; readers merge
  all fragments (an image written by both is kept once in the index: the first chunk by name).
- **Reads are sequential.** A warm run copies rows out of memory-mapped chunk files, in the order
  they were written (the manifest's, usually), so it reads whole chunks front to back.
- **Bounded, optionally.** With a cap (`NFHM_PIXEL_CACHE_MAX_GB` or ``max_bytes``) the least
  recently used chunks (by mtime; a chunk read by a run is touched once) are deleted after each
  write until the cache fits. A reader that finds a chunk gone decodes its images again.

The per-image ``.npy`` files of the old layout (``verified-v1/<pixel_key>/xx/<image_id>.npy``) are
not read: they cost one decode per image, never a wrong answer; delete that folder to free its space.
"""
from __future__ import annotations

import math
import os
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from nfhm_pipeline.errors import SettingsError

LAYOUT = "packed-v1"
MAX_GB_ENV = "NFHM_PIXEL_CACHE_MAX_GB"
# About 32 MiB per chunk: 222 images at 224 px, 4,096 (the most) at 32 px.
CHUNK_BYTES = 32 << 20
MAX_CHUNK_IMAGES = 4096
# Temp files and chunks without ids older than this are leftovers of a killed writer.
STALE_SECONDS = 3600
_OPEN_CHUNKS = 8  # memory maps kept open per cache object


def max_bytes_from_env() -> int | None:
    """The cap in bytes from NFHM_PIXEL_CACHE_MAX_GB (GiB, a positive number), None when unset or empty."""
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb <= 0:
        raise SettingsError(f"{MAX_GB_ENV}={raw!r}: must be a positive number of GiB (e.g. 50 or 0.5), "
                            "or unset for an unbounded pixel cache")
    return int(gb * (1 << 30))


class PixelCache:
    """The packed cache under `root` (see the module docstring).

    max_bytes: cap on the chunk files of all pixel keys together; default from NFHM_PIXEL_CACHE_MAX_GB
    (None = unbounded). chunk_bytes: target size of one chunk file.
    """

    def __init__(self, root: str | os.PathLike, *, max_bytes: int | None | str = "env",
                 chunk_bytes: int = CHUNK_BYTES):
        self.root = Path(root)
        self.max_bytes = max_bytes_from_env() if max_bytes == "env" else max_bytes
        self.chunk_bytes = int(chunk_bytes)
        self._fragments: dict[str, dict[str, list[str]]] = {}  # pixel_key -> chunk name -> ids
        self._index: dict[str, dict[str, tuple[str, int]]] = {}  # pixel_key -> image_id -> (chunk, row)
        self._open: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._touched: set[tuple[str, str]] = set()

    # -- layout ---------------------------------------------------------------------------------
    def folder(self, pixel_key: str) -> Path:
        return self.root / LAYOUT / pixel_key

    def rows_per_chunk(self, size: int) -> int:
        return max(1, min(MAX_CHUNK_IMAGES, self.chunk_bytes // (3 * size * size)))

    # -- index ----------------------------------------------------------------------------------
    def refresh(self, pixel_key: str) -> dict[str, tuple[str, int]]:
        """Merge the index fragments now on disk: image_id -> (chunk name, row). Incremental: only
        fragments not seen before are read (they never change), vanished ones are dropped."""
        folder = self.folder(pixel_key)
        known = self._fragments.setdefault(pixel_key, {})
        self._index.setdefault(pixel_key, {})
        try:
            names = {e.name[:-4] for e in os.scandir(folder) if e.name.endswith(".ids") and not e.name.startswith(".")}
        except FileNotFoundError:
            names = set()
        for name in set(known) - names:
            self._forget(pixel_key, name)
        for name in sorted(names - set(known)):
            try:
                ids = (folder / f"{name}.ids").read_text(encoding="ascii").split()
            except FileNotFoundError:  # evicted since the listing
                continue
            self._remember(pixel_key, name, ids)
        return self._index[pixel_key]

    def __contains__(self, key: tuple[str, str]) -> bool:
        pixel_key, image_id = key
        return image_id in self._index.get(pixel_key, {}) or image_id in self.refresh(pixel_key)

    def _remember(self, pixel_key: str, chunk: str, ids: list[str]) -> None:
        self._fragments.setdefault(pixel_key, {})[chunk] = ids
        index = self._index.setdefault(pixel_key, {})
        for row, image_id in enumerate(ids):
            index.setdefault(image_id, (chunk, row))  # an image in two chunks (two writers): the first seen

    def _forget(self, pixel_key: str, chunk: str) -> None:
        """Drop a chunk that is gone (its images are decoded again when next needed)."""
        ids = self._fragments.get(pixel_key, {}).pop(chunk, None) or []
        index = self._index.get(pixel_key, {})
        for image_id in ids:
            if index.get(image_id, ("",))[0] == chunk:
                del index[image_id]
        self._open.pop((pixel_key, chunk), None)

    def _chunk(self, pixel_key: str, chunk: str, rows: int, size: int | None) -> np.ndarray | None:
        """The memory-mapped pixels of `chunk`, or None when it is gone or not what its ids say
        (`rows` images of side `size`; None: any side)."""
        key = (pixel_key, chunk)
        if key in self._open:
            self._open.move_to_end(key)
            return self._open[key]
        path = self.folder(pixel_key) / f"{chunk}.npy"
        try:
            pixels = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            pixels = None
        if pixels is None or pixels.dtype != np.uint8 or pixels.ndim != 4 or \
                pixels.shape[:2] != (rows, 3) or pixels.shape[2] != pixels.shape[3] or \
                (size is not None and pixels.shape[2] != size):
            self._forget(pixel_key, chunk)
            return None
        if key not in self._touched:  # least-recently-used order for the size cap
            self._touched.add(key)
            try:
                os.utime(path)
            except OSError:
                pass
        self._open[key] = pixels
        while len(self._open) > _OPEN_CHUNKS:
            self._open.popitem(last=False)
        return pixels

    # -- reading --------------------------------------------------------------------------------
    def read_into(self, pixel_key: str, image_ids: Sequence[str], out: np.ndarray) -> np.ndarray:
        """Copy the cached pixels of `image_ids` into ``out[i]`` (uint8 [n, 3, S, S]); returns a bool
        array: True where the image was found (rows of the others are left as they were)."""
        found = np.zeros(len(image_ids), dtype=bool)
        index = self._index.get(pixel_key)
        if index is None:
            index = self.refresh(pixel_key)
        size = out.shape[-1]
        if len(image_ids) and self._read_run(pixel_key, index.get(image_ids[0]), image_ids, out, size):
            found[:] = True
            return found
        hits = list(map(index.get, image_ids))
        if None in hits:  # another run may have added chunks since: look at the folder once more
            index = self.refresh(pixel_key)
            hits = list(map(index.get, image_ids))
        by_chunk: dict[str, list[tuple[int, int]]] = {}
        for i, hit in enumerate(hits):
            if hit is not None:
                by_chunk.setdefault(hit[0], []).append((hit[1], i))
        for chunk, pairs in by_chunk.items():
            ids = self._fragments[pixel_key].get(chunk)
            pixels = self._chunk(pixel_key, chunk, len(ids), size) if ids is not None else None
            if pixels is None:
                continue
            pairs.sort()
            rows = np.fromiter((r for r, _ in pairs), dtype=np.int64, count=len(pairs))
            dest = np.fromiter((i for _, i in pairs), dtype=np.int64, count=len(pairs))
            first, last = int(rows[0]), int(rows[-1])
            try:
                if last - first + 1 == len(rows):  # one contiguous run: a sequential read
                    block = pixels[first:last + 1]
                else:
                    block = pixels[rows]
                if np.array_equal(dest, np.arange(dest[0], dest[0] + len(dest))):
                    out[dest[0]:dest[0] + len(dest)] = block
                else:
                    out[dest] = block
            except OSError:  # the file went away under the map (evicted on another host): decode again
                self._forget(pixel_key, chunk)
                continue
            found[dest] = True
        return found

    def _read_run(self, pixel_key: str, first_hit: tuple[str, int] | None, image_ids: Sequence[str],
                  out: np.ndarray, size: int) -> bool:
        """The common warm case in one copy: the batch's images are consecutive rows of one chunk,
        in the batch's order (a chunk is filled in the order the pipeline embeds, so a warm run meets
        its batches again as such runs). Checked against the chunk's own id list, so no per-image
        index lookup is needed; an image also held by another chunk has the same pixels there.
        False: not that case (or the chunk is gone), for the general path to handle."""
        if first_hit is None:
            return False
        chunk, first = first_hit
        n = len(image_ids)
        ids = self._fragments[pixel_key].get(chunk)
        if ids is None or ids[first:first + n] != list(image_ids):
            return False
        pixels = self._chunk(pixel_key, chunk, len(ids), size)
        if pixels is None:
            return False
        try:
            out[:n] = pixels[first:first + n]
        except OSError:  # the file went away under the map: the general path forgets it and decodes
            return False
        return True

    def get(self, pixel_key: str, image_id: str, size: int) -> np.ndarray | None:
        """One image's cached pixels (a copy), or None."""
        out = np.empty((1, 3, size, size), dtype=np.uint8)
        return out[0] if self.read_into(pixel_key, [image_id], out)[0] else None

    def load_or_decode(self, pixel_key: str, image_id: str, uri: str,
                       decode: Callable[[str, str], np.ndarray]) -> np.ndarray:
        """Cached pixels of `image_id`, or ``decode(uri, image_id)`` stored first (one image, one chunk:
        for occasional use; the embedding pipeline writes through `writer`). `decode` must raise
        rather than return pixels of bytes other than `image_id`'s."""
        hit = self.refresh(pixel_key).get(image_id)
        if hit is not None:
            pixels = self._chunk(pixel_key, hit[0], len(self._fragments[pixel_key][hit[0]]), None)
            if pixels is not None:
                return np.array(pixels[hit[1]])
        pixels = decode(uri, image_id)
        with self.writer(pixel_key, pixels.shape[-1]) as writer:
            writer.add(image_id, pixels)
        return pixels

    # -- writing --------------------------------------------------------------------------------
    def writer(self, pixel_key: str, size: int) -> "ChunkWriter":
        return ChunkWriter(self, pixel_key, size)

    def write_chunk(self, pixel_key: str, image_ids: Sequence[str], pixels: np.ndarray) -> str:
        """Write one chunk (a new name: never replaces a file) and return its name."""
        from nfhm_pipeline.store.files import atomic_path

        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"
        folder = self.folder(pixel_key)
        with atomic_path(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(pixels), allow_pickle=False)
        # The ids last: their rename is what makes the chunk visible.
        with atomic_path(folder / f"{name}.ids") as tmp:
            tmp.write_text("".join(f"{i}\n" for i in image_ids), encoding="ascii")
        self._remember(pixel_key, name, list(image_ids))
        if self.max_bytes is not None:
            self.evict()
        return name

    # -- size cap -------------------------------------------------------------------------------
    def chunk_files(self) -> list[tuple[float, int, Path]]:
        """(mtime, bytes, path) of every committed chunk's .npy, all pixel keys."""
        found = []
        layout = self.root / LAYOUT
        for folder in (layout.iterdir() if layout.is_dir() else []):
            for entry in os.scandir(folder):
                if entry.name.endswith(".npy") and not entry.name.startswith("."):
                    try:
                        st = entry.stat()
                    except FileNotFoundError:
                        continue
                    found.append((st.st_mtime, st.st_size, Path(entry.path)))
        return found

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.chunk_files())

    def evict(self, max_bytes: int | None = None) -> int:
        """Delete least-recently-used chunks until the cache holds at most `max_bytes` (default: the
        cap), and leftovers of killed writers; returns how many chunks were deleted."""
        cap = self.max_bytes if max_bytes is None else max_bytes
        self.sweep()
        if cap is None:
            return 0
        chunks = sorted(self.chunk_files())
        total = sum(size for _, size, _ in chunks)
        deleted = 0
        for _, size, npy in chunks:
            if total <= cap:
                break
            # ids first: a reader must never see ids whose pixels are gone
            for path in (npy.with_suffix(".ids"), npy):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            self._forget(npy.parent.name, npy.stem)
            total -= size
            deleted += 1
        return deleted

    def sweep(self, older_than: float = STALE_SECONDS) -> None:
        """Remove temp files and id-less chunks older than `older_than` seconds (a killed writer's)."""
        layout = self.root / LAYOUT
        cutoff = time.time() - older_than
        for folder in (layout.iterdir() if layout.is_dir() else []):
            for entry in os.scandir(folder):
                stale_tmp = entry.name.startswith(".") and ".tmp" in entry.name
                orphan = entry.name.endswith(".npy") and not (folder / f"{entry.name[:-4]}.ids").exists()
                if stale_tmp or orphan:
                    try:
                        if entry.stat().st_mtime < cutoff:
                            os.unlink(entry.path)
                    except FileNotFoundError:
                        pass


class ChunkWriter:
    """Buffers decoded images of one pixel key and writes them a chunk at a time (`close` writes the
    rest). Use from one thread; each writer's chunks are its own files."""

    def __init__(self, cache: PixelCache, pixel_key: str, size: int):
        self.cache, self.pixel_key, self.size = cache, pixel_key, size
        self.rows = cache.rows_per_chunk(size)
        self._ids: list[str] = []
        self._pixels = np.empty((self.rows, 3, size, size), dtype=np.uint8)
        self._seen: set[str] = set()
        self.chunks_written = 0

    def add(self, image_id: str, pixels: np.ndarray) -> None:
        if image_id in self._seen:
            return
        self._seen.add(image_id)
        self._pixels[len(self._ids)] = pixels
        self._ids.append(image_id)
        if len(self._ids) == self.rows:
            self.flush()

    def flush(self) -> None:
        if self._ids:
            self.cache.write_chunk(self.pixel_key, self._ids, self._pixels[:len(self._ids)])
            self.chunks_written += 1
            self._ids = []

    def close(self) -> None:
        self.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
