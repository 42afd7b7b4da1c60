"""The embedding lake: atomic Parquet tables, incremental reruns, checkpointed resume."""
import numpy as np
import pandas as pd
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
    [part] = store.part_paths("ds", "m")  # ten images: one part
    table = pq.read_table(part)
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
    assert not (tmp_path / "embeddings" / "dataset=ds" / "model=m" / "_staging").exists()


def test_no_temporary_files_are_left_behind(tmp_path):
    store = EmbeddingStore(tmp_path)
    run(store, IDS)
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_unreadable_table_gives_a_clear_error(tmp_path):
    from nfhm_pipeline.errors import StorageError

    store = EmbeddingStore(tmp_path)
    run(store, IDS)
    with open(store.part_paths("ds", "m")[0], "wb") as f:
        f.write(b"not parquet")
    with pytest.raises(StorageError, match="delete it and re-run"):
        store.read("ds", "m")


def assert_same_table(got, fresh):
    assert got.image_ids.dtype == fresh.image_ids.dtype == object
    assert [type(i) for i in got.image_ids] == [type(i) for i in fresh.image_ids]
    np.testing.assert_array_equal(got.image_ids, fresh.image_ids)
    assert got.vectors.dtype == fresh.vectors.dtype == np.float32
    assert got.vectors.shape == fresh.vectors.shape and got.dim == fresh.dim
    assert np.array_equal(got.vectors.view(np.uint32), fresh.vectors.view(np.uint32))  # bit for bit
    assert got.fingerprint == fresh.fingerprint


@pytest.mark.parametrize("case", ["first", "unchanged", "changed", "resumed"])
def test_report_carries_the_table_a_fresh_read_gives(tmp_path, case):
    store = EmbeddingStore(tmp_path)
    ids = np.array(IDS)  # numpy str_ ids: the table holds them as the lake gives them back (str)
    if case in ("unchanged", "changed"):
        run(store, list(ids))
    if case == "changed":
        ids = np.concatenate([ids[3:], ["id100"]])
    if case == "resumed":
        with pytest.raises(RuntimeError):
            run(store, list(ids), fail_after=2)
    report = run(store, list(ids))
    assert report.table is not None and report.dim == report.table.dim
    assert_same_table(report.table, store.read("ds", "m"))
    assert list(report.table.image_ids) == [str(i) for i in ids]


# -- text embeddings ---------------------------------------------------------------------------------

def odd_vectors(n, dim=5):
    """float32 values a lossy round trip would change: -0.0, subnormals, NaN payloads, infinities."""
    bits = np.random.default_rng(1).integers(0, 2**32, size=(n, dim), dtype=np.uint64).astype(np.uint32)
    bits[0, :4] = [0x80000000, 0x00000001, 0x7FC00123, 0xFF800000]
    return bits.view(np.float32)


def class_prompts(n=3):
    return pd.DataFrame({"level": "species", "class": [f"c{i}" for i in range(n)], "template": "a {}",
                         "prompt": [f"a c{i}" for i in range(n)]})


def test_text_embeddings_round_trip_bit_exactly_and_class_prompts_are_zero_shot(tmp_path):
    from nfhm_pipeline.store.schemas import TEXT_PROMPT_COLUMNS
    from nfhm_pipeline.store.text_store import read_text_embeddings, write_text_embeddings

    store = EmbeddingStore(tmp_path)
    vectors = odd_vectors(3)
    write_text_embeddings(store, "ds", "m", class_prompts(), vectors, "fp1")
    prompts, got = read_text_embeddings(store, "ds", "m")
    assert list(prompts.columns) == list(TEXT_PROMPT_COLUMNS)
    assert prompts["use"].tolist() == ["zero_shot"] * 3
    assert prompts["prompt"].tolist() == ["a c0", "a c1", "a c2"]
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), vectors.view(np.uint32))


def test_text_embeddings_keep_the_use_they_are_given(tmp_path):
    from nfhm_pipeline.store.text_store import read_text_embeddings, write_text_embeddings

    store = EmbeddingStore(tmp_path)
    uses = ["zero_shot", "auc_positive", "auc_negative"]
    write_text_embeddings(store, "ds", "m", class_prompts().assign(use=uses), odd_vectors(3), "fp1")
    prompts, _ = read_text_embeddings(store, "ds", "m")
    assert prompts["use"].tolist() == uses


def test_text_embeddings_written_before_use_existed_read_as_zero_shot(tmp_path):
    from nfhm_pipeline.store.schemas import EMBEDDING_FINGERPRINT_KEY
    from nfhm_pipeline.store.text_store import read_text_embeddings, text_path

    store = EmbeddingStore(tmp_path)
    vectors = odd_vectors(2)
    old = pa.table({"level": ["l", "l"], "class": ["a", "b"], "template": ["{}", "{}"], "prompt": ["a", "b"],
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 5)})
    path = text_path(store, "ds", "m")
    (tmp_path / path).parent.mkdir(parents=True)
    pq.write_table(old.replace_schema_metadata({EMBEDDING_FINGERPRINT_KEY: b"fp"}), path)
    prompts, got = read_text_embeddings(store, "ds", "m")
    assert prompts["use"].tolist() == ["zero_shot", "zero_shot"]
    assert np.array_equal(got.view(np.uint32), vectors.view(np.uint32))


def test_a_model_without_a_text_tower_gets_an_empty_table_with_every_column(tmp_path):
    from nfhm_pipeline.store.schemas import TEXT_PROMPT_COLUMNS
    from nfhm_pipeline.store.text_store import read_text_embeddings, write_text_embeddings

    store = EmbeddingStore(tmp_path)
    assert read_text_embeddings(store, "ds", "m") is None
    write_text_embeddings(store, "ds", "m", None, None, "fp")
    prompts, vectors = read_text_embeddings(store, "ds", "m")
    assert prompts.empty and list(prompts.columns) == list(TEXT_PROMPT_COLUMNS) and len(vectors) == 0


def test_text_prompts_and_vectors_of_different_lengths_are_refused(tmp_path):
    from nfhm_pipeline.errors import StorageError
    from nfhm_pipeline.store.text_store import write_text_embeddings

    with pytest.raises(StorageError, match="3 prompt"):
        write_text_embeddings(EmbeddingStore(tmp_path), "ds", "m", class_prompts(), odd_vectors(2), "fp")
