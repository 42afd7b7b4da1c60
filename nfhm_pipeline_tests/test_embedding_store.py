"""The embedding lake: atomic Parquet tables, incremental reruns, checkpointed resume."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nfhm_pipeline.store.embedding_store import EmbeddingStore

IDS = [f"id{i:03d}" for i in range(10)]


def fake_embedder(calls: list, dim: int = 4, fail_after: int | None = None):
    """embed_chunk for the store: vector = position-independent function of the image id."""
    def embed_chunk(positions, ids):
        for start in range(0, len(positions), 3):  # batches of 3
            if fail_after is not None and len(calls) >= fail_after:
                raise RuntimeError("injected failure")
            batch = list(positions[start:start + 3])
            calls.append(batch)
            yield batch, np.array([[int(ids[p][2:]) + j for j in range(dim)] for p in batch], np.float32)
    return embed_chunk


def run(store, ids, fingerprint="fp1", calls=None, fail_after=None, chunk_size=4):
    calls = [] if calls is None else calls
    chunk = fake_embedder(calls, fail_after=fail_after)
    return store.embed_incrementally("ds", "m", ids, fingerprint, lambda pos: chunk(pos, ids), chunk_size=chunk_size)


def test_first_run_embeds_everything_and_writes_fixed_size_list(tmp_path):
    store = EmbeddingStore(tmp_path)
    report = run(store, IDS)
    assert (report.total, report.new, report.reused, report.removed) == (10, 10, 0, 0)
    table = pq.read_table(store.table_path("ds", "m"))
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 4)
    assert table.schema.metadata[b"nfhm.fingerprint"] == b"fp1"
    stored = store.read("ds", "m")
    assert list(stored.image_ids) == IDS
    np.testing.assert_array_equal(stored.vectors[3], [3, 4, 5, 6])


def test_rerun_with_same_fingerprint_embeds_nothing(tmp_path):
    store = EmbeddingStore(tmp_path)
    run(store, IDS)
    calls = []
    report = run(store, IDS, calls=calls)
    assert (report.new, report.reused, report.removed) == (0, 10, 0)
    assert calls == []


def test_added_and_removed_images_are_counted_exactly(tmp_path):
    store = EmbeddingStore(tmp_path)
    run(store, IDS)
    changed = IDS[2:] + ["id100", "id101", "id102"]
    report = run(store, changed)
    assert (report.total, report.new, report.reused, report.removed) == (11, 3, 8, 2)
    assert list(store.read("ds", "m").image_ids) == changed


def test_changed_fingerprint_re_embeds_everything(tmp_path):
    store = EmbeddingStore(tmp_path)
    run(store, IDS)
    report = run(store, IDS, fingerprint="fp2")
    assert (report.new, report.reused, report.removed) == (10, 0, 0)
    assert store.read_fingerprint("ds", "m") == "fp2"


def test_failed_run_keeps_previous_table_and_rerun_resumes_finished_chunks(tmp_path):
    store = EmbeddingStore(tmp_path)
    run(store, IDS[:5])
    before = store.read("ds", "m")
    calls = []
    with pytest.raises(RuntimeError, match="injected"):
        # chunk_size 4 → chunks of 4 images (2 batches each); dies in the 2nd chunk's first batch
        run(store, IDS, fingerprint="fp2", calls=calls, fail_after=2)
    after_crash = store.read("ds", "m")
    assert list(after_crash.image_ids) == list(before.image_ids)  # old complete table still readable
    assert after_crash.fingerprint == "fp1"
    calls2 = []
    report = run(store, IDS, fingerprint="fp2", calls=calls2)
    assert report.resumed == 4  # the first chunk was checkpointed and not redone
    assert report.new == 6
    assert sorted(p for b in calls2 for p in b) == list(range(4, 10))
    assert list(store.read("ds", "m").image_ids) == IDS
    assert not (tmp_path / "embeddings" / "dataset=ds" / "model=m" / "_checkpoints").exists()


def test_no_temporary_files_are_left_behind(tmp_path):
    store = EmbeddingStore(tmp_path)
    run(store, IDS)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_unreadable_table_gives_a_clear_error(tmp_path):
    from nfhm_pipeline.errors import StorageError

    store = EmbeddingStore(tmp_path)
    run(store, IDS)
    with open(store.table_path("ds", "m"), "wb") as f:
        f.write(b"not parquet")
    with pytest.raises(StorageError, match="delete it and re-run"):
        store.read("ds", "m")
