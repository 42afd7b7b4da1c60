"""The ``ray`` embedding engine (issue 15 item 2): same vectors as the local engine, every image exactly
once (directly and through the store), one actor pool serving every chunk of an engine, a job that
finishes when an actor cannot be placed, the CPUs each actor reserves, a worker process killed
mid-job, the worker-side fingerprint check, a bad image's ManifestError, and `connect_ray`'s errors.

One local Ray (2 CPUs) serves the module; real demo images, the real raw-pixels and tiny OpenCLIP
models, a real SIGKILL. Each engine starts its actor pool (seconds on 2 cores), so the tests are few
and each checks several things.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray", reason="ray is not installed")

from helpers import subprocess_env  # noqa: E402
from nfhm_pipeline.catalog import load_catalog  # noqa: E402
from nfhm_pipeline.embedders.loaders import load_embedder  # noqa: E402
from nfhm_pipeline.embedders.ray_engine import (  # noqa: E402
    WorkerFingerprintError, connect_ray, cpus_per_actor, ray_embed_chunk,
)
from nfhm_pipeline.embedders.runtime import EmbedSettings, EmbedTimings, make_batches  # noqa: E402
from nfhm_pipeline.errors import ManifestError, NfhmError  # noqa: E402
from nfhm_pipeline.ingest.demo import generate_demo_collection  # noqa: E402
from nfhm_pipeline.ingest.images import validate_images  # noqa: E402
from nfhm_pipeline.stages.base import Paths  # noqa: E402
from nfhm_pipeline.stages.image_embeddings import model_spec  # noqa: E402
from nfhm_pipeline.store.embedding_store import EmbeddingStore  # noqa: E402

WORKER_TITLE = "_EmbedWorker"  # in the actor process's title: ray::MapWorker(MapBatches(_EmbedWorker))


@pytest.fixture(scope="module")
def ray_cluster():
    started = not ray.is_initialized()
    address = connect_ray(num_cpus=2)
    yield address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """108 demo specimens (32 px PNGs) as a validated manifest, and Paths for the models."""
    root = tmp_path_factory.mktemp("ray_engine")
    images = generate_demo_collection(root / "images", images_per_species=4, size=32)
    files = pd.read_csv(images / "metadata.csv")["fileNameAsDelivered"]
    manifest, rejected = validate_images(pd.DataFrame({"uri": [str(images / f) for f in files],
                                                       "species": ["x"] * len(files)}), ["species"])
    assert rejected.empty and len(manifest) == 108
    return manifest.reset_index(drop=True), Paths.under(root / "data")


def driver_embedder(key: str, paths: Paths):
    model = load_catalog("demo").models[key]
    spec = model_spec(model, paths)
    embedder = load_embedder(spec)
    embedder.model_id = model.key
    return spec, embedder


def local_vectors(embedder, manifest) -> np.ndarray:
    """The local engine's vectors (runtime.make_batches), row i for manifest position i."""
    ids, uris = manifest["image_id"].tolist(), manifest["uri"].tolist()
    out = np.full((len(ids), embedder.dim), np.nan, dtype=np.float32)
    for positions, vectors in make_batches(embedder, ids, uris, None, EmbedSettings(batch_size=8))(range(len(ids))):
        out[positions] = vectors
    assert np.isfinite(out).all()
    return out


def collect(embed_chunk, positions) -> dict[int, np.ndarray]:
    """Position -> vector from one embed_chunk call; fails on a position yielded twice."""
    got: dict[int, np.ndarray] = {}
    for pos, vectors in embed_chunk(positions):
        vectors = np.asarray(vectors)
        assert vectors.dtype == np.float32 and vectors.ndim == 2 and len(vectors) == len(pos)
        for p, v in zip(np.asarray(pos).tolist(), vectors):
            assert p not in got, f"position {p} yielded twice"
            got[p] = v
    return got


def engine(spec, embedder, manifest, **kw):
    return ray_embed_chunk(spec, embedder.model_id, manifest["image_id"].tolist(), manifest["uri"].tolist(),
                           expected_fingerprint=embedder.fingerprint, **kw)


def test_tiny_clip_on_ray_gives_the_local_engines_vectors_for_every_position_once(ray_cluster, collection):
    manifest, paths = collection
    spec, embedder = driver_embedder("tiny-clip", paths)
    reference = local_vectors(embedder, manifest)
    wanted = list(range(5, len(manifest)))  # a chunk as the store asks for one: not from 0
    timings, counted = EmbedTimings(), []
    got = collect(engine(spec, embedder, manifest, batch_size=16, timings=timings, on_images=counted.append),
                  wanted)
    assert sorted(got) == wanted and sum(counted) == len(wanted)
    np.testing.assert_allclose(np.stack([got[p] for p in wanted]), reference[wanted], atol=1e-6, rtol=0)
    assert timings.forward_s > 0 and timings.decode_s > 0


def test_raw_pixels_through_the_store_hold_every_image_once_with_the_local_vectors(ray_cluster, collection,
                                                                                   tmp_path):
    manifest, paths = collection
    spec, embedder = driver_embedder("raw-pixels", paths)
    reference = local_vectors(embedder, manifest)
    ids = manifest["image_id"].tolist()
    store = EmbeddingStore(tmp_path / "lake")
    report = store.embed_incrementally("demo", "raw-pixels", ids, embedder.fingerprint,
                                       engine(spec, embedder, manifest, batch_size=16, concurrency=2),
                                       chunk_size=4096)
    assert report.new == len(ids)
    table = store.read("demo", "raw-pixels")
    stored = [str(i) for i in table.image_ids]
    assert sorted(stored) == sorted(ids) and len(set(stored)) == len(stored)
    row = {iid: i for i, iid in enumerate(stored)}
    np.testing.assert_allclose(np.asarray(table.vectors)[[row[i] for i in ids]], reference, atol=1e-6, rtol=0)


def _ancestors(pid: int) -> list[int]:
    chain = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        chain.append(pid)
    return chain


def embed_workers() -> set[int]:
    """PIDs of this test process's Ray actors running _EmbedWorker (descendants of it: the local Ray)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if WORKER_TITLE.encode() in title and os.getpid() in _ancestors(int(entry)):
            found.add(int(entry))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker process through /proc")
def test_a_worker_killed_mid_job_is_replaced_and_every_image_is_embedded_once(ray_cluster, collection):
    manifest, paths = collection
    spec, embedder = driver_embedder("raw-pixels", paths)
    reference = local_vectors(embedder, manifest)
    killed: list[int] = []
    seen_after_kill: set[int] = set()
    received = [0]

    def on_images(n):
        received[0] += n
        if not killed:  # first block back: the actor is busy with the next ones (0.15 s a batch)
            workers = embed_workers()
            assert len(workers) == 1, workers
            pid = workers.pop()
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            assert received[0] < len(manifest)  # the job is not done
        else:
            seen_after_kill.update(embed_workers())

    wanted = list(range(len(manifest)))
    got = collect(engine(spec, embedder, manifest, batch_size=8, on_images=on_images, _pause_per_batch_s=0.15),
                  wanted)
    assert killed and sorted(got) == wanted
    assert seen_after_kill and killed[0] not in seen_after_kill  # a new process embedded the rest
    np.testing.assert_allclose(np.stack([got[p] for p in wanted]), reference, atol=1e-6, rtol=0)


def wait_for_no_embed_workers(timeout_s: float = 30.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (left := embed_workers()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_one_actor_pool_serves_every_chunk_of_an_engine_until_it_is_closed(ray_cluster, collection):
    manifest, paths = collection
    spec, embedder = driver_embedder("raw-pixels", paths)
    reference = local_vectors(embedder, manifest)
    assert not wait_for_no_embed_workers()  # no actor of an earlier test left
    chunk = engine(spec, embedder, manifest, batch_size=8, concurrency=2)
    first = collect(chunk, range(0, 60))  # as the store calls it: one chunk after the other
    workers = embed_workers()
    # An actor gets batches once it has loaded the model: a slower one may have had none of these yet.
    started = {a["pid"] for a in chunk.actor_startup()}
    assert len(workers) == 2 and started and started <= workers
    assert chunk.first_batch_s > 0 and all(a["load_s"] > 0 for a in chunk.actor_startup())
    second = collect(chunk, range(60, len(manifest)))
    assert embed_workers() == workers  # the same processes: no new pool, no second model load
    assert not set(first) & set(second) and sorted({**first, **second}) == list(range(len(manifest)))
    got = {**first, **second}
    np.testing.assert_allclose(np.stack([got[p] for p in range(len(manifest))]), reference, atol=1e-6, rtol=0)
    chunk.close()
    assert not wait_for_no_embed_workers()


def test_an_actor_the_cluster_cannot_place_holds_no_batches(ray_cluster, collection):
    manifest, paths = collection
    spec, embedder = driver_embedder("raw-pixels", paths)
    reference = local_vectors(embedder, manifest)
    # Three 1-CPU actors on a 2-CPU Ray: the third never starts; the other two embed everything.
    chunk = engine(spec, embedder, manifest, batch_size=8, concurrency=3, num_cpus_per_actor=1)
    try:
        got = collect(chunk, range(len(manifest)))
        assert len(embed_workers()) == 2 and 1 <= len(chunk.actor_startup()) <= 2  # the third: no process
    finally:
        chunk.close()
    assert sorted(got) == list(range(len(manifest)))
    np.testing.assert_allclose(np.stack([got[p] for p in range(len(manifest))]), reference, atol=1e-6, rtol=0)
    assert not wait_for_no_embed_workers()


def test_each_actor_reserves_its_share_of_the_cpus(ray_cluster):
    # The module's Ray has 2 CPUs and no GPU: one actor takes both, two take one each, never below one.
    assert [cpus_per_actor(ray, n, cuda=False) for n in (1, 2, 3)] == [2, 1, 1]
    assert cpus_per_actor(ray, 1, cuda=True) == 1  # no GPU node to share out


def test_a_worker_with_another_fingerprint_refuses_to_embed(ray_cluster, collection):
    manifest, paths = collection
    spec, embedder = driver_embedder("raw-pixels", paths)
    chunk = ray_embed_chunk(spec, embedder.model_id, manifest["image_id"].tolist(), manifest["uri"].tolist(),
                            expected_fingerprint="0" * 64, batch_size=16)
    with pytest.raises(WorkerFingerprintError, match="the workers see different weights") as caught:
        collect(chunk, range(len(manifest)))
    assert embedder.fingerprint[:12] in str(caught.value) and "000000000000" in str(caught.value)


def test_a_bad_image_raises_the_local_engines_manifest_error(ray_cluster, collection, tmp_path):
    manifest, paths = collection
    spec, embedder = driver_embedder("raw-pixels", paths)
    manifest = manifest.head(20).copy()
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(manifest.loc[3, "uri"]).read_bytes()[:60])  # a truncated PNG
    manifest.loc[3, "uri"] = str(broken)  # its bytes no longer hash to the manifest's image_id
    ids, uris = manifest["image_id"].tolist(), manifest["uri"].tolist()
    with pytest.raises(ManifestError) as local:
        list(make_batches(embedder, ids, uris, None, EmbedSettings(batch_size=8))(range(len(ids))))
    with pytest.raises(ManifestError) as remote:
        collect(engine(spec, embedder, manifest, batch_size=8), range(len(ids)))
    assert str(remote.value) == str(local.value) and "broken.png" in str(remote.value)


def test_connect_ray_names_an_unreachable_address_and_a_missing_ray(ray_cluster):
    assert connect_ray() == ray_cluster  # an initialised Ray is reused
    script = (
        "import sys\n"
        "from nfhm_pipeline.embedders import ray_engine\n"
        "for address in ('127.0.0.1:1', 'ray://127.0.0.1:1'):\n"
        "    try:\n"
        "        ray_engine.connect_ray(address)\n"
        "    except ray_engine.NfhmError as e:\n"
        "        print('ERR', e)\n"
        "sys.modules['ray'] = None\n"  # what an environment without Ray sees on import
        "try:\n"
        "    ray_engine.connect_ray()\n"
        "except ray_engine.NfhmError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**subprocess_env(), "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    lines = [line for line in out.stdout.splitlines() if line.startswith("ERR")]
    assert len(lines) == 3, out.stdout + out.stderr
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in lines[0]
    assert "cannot reach the Ray cluster at 'ray://127.0.0.1:1'" in lines[1]
    assert "pip install 'nfhm-pipeline[ray]'" in lines[2]
    with pytest.raises(NfhmError, match="num_gpus_per_actor"):
        ray_embed_chunk({}, "m", [], [], expected_fingerprint="x", device="cuda")
