"""The sharded embedding lake: parts per image_id prefix, an index as the commit point, incremental
rewrites of only the parts that changed, resume after a crash, migration of single-file tables,
and DuckDB's view over the parts."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nfhm_pipeline.store import warehouse
from nfhm_pipeline.store.embedding_store import (
    PART_ROWS, EmbeddingStore, EmbeddingTable, all_digests, ids_digest, shard_digits_for, shard_of,
)
from nfhm_pipeline.store.schemas import embedding_schema


def image_ids(n: int, start: int = 0) -> list[str]:
    """Ids as the manifest makes them: sha256 hex (of made-up bytes)."""
    return [hashlib.sha256(f"image {i}".encode()).hexdigest() for i in range(start, start + n)]


def vector_of(iid: str, dim: int = 3) -> np.ndarray:
    """A vector that is a function of the id alone, so any run can be checked against it."""
    seed = int(iid[:8], 16)
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


class Embedder:
    """embed_chunk for the store that records which ids it was asked for."""

    def __init__(self, ids, fail_after_calls: int | None = None):
        self.ids, self.asked, self.fail_after = ids, [], fail_after_calls

    def __call__(self, positions):
        if self.fail_after is not None and len(self.asked) >= self.fail_after:
            raise RuntimeError("injected crash")
        self.asked.append([self.ids[p] for p in positions])
        yield list(positions), np.stack([vector_of(self.ids[p]) for p in positions])

    @property
    def embedded(self) -> list[str]:
        return [i for call in self.asked for i in call]


def embed(store, ids, fingerprint="fp", **kw):
    embedder = Embedder(ids, kw.pop("fail_after_calls", None))
    report = store.embed_incrementally("d", "m", ids, fingerprint, embedder, **kw)
    return report, embedder


def part_files(store) -> dict[str, float]:
    folder = store.folder("d", "m")
    return {name: os.stat(f"{folder}/{name}").st_mtime_ns for name in os.listdir(folder) if name.startswith("part-")}


def assert_table(store, ids):
    table = store.read("d", "m", order=ids)
    assert table.image_ids.tolist() == ids
    np.testing.assert_array_equal(table.vectors, np.stack([vector_of(i) for i in ids]))


def test_shard_width_follows_the_collection_size():
    assert shard_digits_for(1) == shard_digits_for(PART_ROWS) == 0
    assert shard_digits_for(10_000) == 1 and shard_digits_for(1_000_000) == 2 and shard_digits_for(10_000_000) == 3
    iid = image_ids(1)[0]
    assert shard_of(iid, 0) == "all" and shard_of(iid, 2) == iid[:2]
    assert len(shard_of("not-hex", 2)) == 2  # a library caller's own ids are sharded by their hash
    # hex-looking ids that are not digests (catalogue numbers) are hashed too: 10,000 of them
    # spread over the 16 one-digit shards instead of all falling into shard "0"
    numbered = [shard_of(f"{i:09d}", 1) for i in range(10_000)]
    assert len(set(numbered)) == 16 and max(numbered.count(s) for s in set(numbered)) < 1000


def test_the_digest_check_and_the_ids_digest_equal_plain_per_id_references():
    import re

    def digest_reference(ids):  # the part index's ids_sha256 as first written: one update per id
        h = hashlib.sha256()
        for iid in sorted(ids):
            h.update(iid.encode())
            h.update(b"\n")
        return h.hexdigest()

    digests = image_ids(50)
    one = digests[0]
    hostile = [one.upper(), one[:63], one + "0", one[:63] + "\n", one[:63] + "é", "g" * 64, " " * 64,
               one[:63] + "\u0660", "", "catalogue-000123", "a\nb", "ü"]
    for extra in [[]] + [[h] for h in hostile]:
        ids = digests + extra
        assert all_digests(ids) == all(re.fullmatch(r"[0-9a-f]{64}", i) is not None for i in ids), extra
        assert ids_digest(ids) == digest_reference(ids) == ids_digest(reversed(ids)), extra
    assert all_digests([]) and ids_digest([]) == digest_reference([])
    # the groups of a list of ids are those of shard_of id by id (digests by their prefix, any
    # other id by its hash), in the order given, whatever the mix
    from nfhm_pipeline.store.embedding_store import _group_by_shard

    for ids in ([], digests, digests[:7] + ["catalogue-000123"] + digests[7:], ["0001", "0002", "ü"]):
        for digits in (0, 1, 2):
            for positions in (False, True):
                expected: dict = {}
                for i, iid in enumerate(ids):
                    expected.setdefault(shard_of(iid, digits), []).append(i if positions else iid)
                got = _group_by_shard(ids, digits, positions=positions)
                assert got == expected and list(got) == list(expected), (ids[:2], digits, positions)


def test_ten_thousand_images_are_sixteen_parts_each_holding_its_prefix(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(10_000)
    report, _ = embed(store, ids)
    assert (report.total, report.new, report.parts_written) == (10_000, 10_000, 16)
    index = json.loads(open(store.index_path("d", "m")).read())
    assert index["shard_digits"] == 1 and index["rows"] == 10_000 and len(index["parts"]) == 16
    for entry in index["parts"]:
        ids_in = pq.read_table(f"{store.folder('d', 'm')}/{entry['file']}").column("image_id").to_pylist()
        assert ids_in and all(i.startswith(entry["shard"]) for i in ids_in) and len(ids_in) == entry["rows"]
        assert ids_in == [i for i in ids if i.startswith(entry["shard"])]  # manifest order within a part
    assert_table(store, ids)
    assert report.ids == ids and report.all_finite


def test_a_rerun_with_no_change_writes_no_part_and_adding_ten_images_rewrites_only_their_parts(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(10_000)
    embed(store, ids)
    before = part_files(store)

    report, embedder = embed(store, ids)
    assert (report.new, report.reused, report.parts_written, report.parts_kept) == (0, 10_000, 0, 16)
    assert embedder.asked == [] and part_files(store) == before  # not one file touched
    assert store.unchanged("d", "m", ids, "fp") is not None

    added = image_ids(10, start=10_000)
    report, embedder = embed(store, ids + added)
    touched = {i[0] for i in added}
    assert (report.new, report.reused, report.removed) == (10, 10_000, 0)
    assert sorted(embedder.embedded) == sorted(added)  # only the new images are embedded
    assert report.parts_written == len(touched) and report.parts_kept == 16 - len(touched)
    after = part_files(store)
    kept = {name: t for name, t in before.items() if name.split("-")[1] not in touched}
    assert {name: after[name] for name in kept} == kept  # the other parts: same files, untouched
    assert len(after) == 16  # the superseded parts are gone
    assert_table(store, ids + added)


def test_removed_images_drop_from_their_parts_only(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(5_000)
    embed(store, ids)
    gone = [i for i in ids if i[0] == "a"][:3]
    remaining = [i for i in ids if i not in gone]
    report, embedder = embed(store, remaining)
    assert (report.new, report.removed, report.parts_written) == (0, 3, 1)
    assert embedder.asked == []
    assert_table(store, remaining)


def test_a_changed_fingerprint_rewrites_every_part(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(5_000)
    embed(store, ids)
    report, embedder = embed(store, ids, fingerprint="fp2")
    assert (report.new, report.reused, report.parts_written, report.parts_kept) == (5_000, 0, 16, 0)
    assert store.read_fingerprint("d", "m") == "fp2" and len(part_files(store)) == 16


def test_a_crash_keeps_the_old_table_and_the_rerun_reuses_every_finished_part(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(10_000)
    embed(store, ids[:100])  # an earlier, smaller table under another fingerprint
    with pytest.raises(RuntimeError, match="injected"):
        # chunk_size 1,000: about two shards per call; the third call dies
        embed(store, ids, fingerprint="fp2", chunk_size=1_000, fail_after_calls=2)
    old = store.read("d", "m")
    assert old.fingerprint == "fp" and len(old) == 100  # the index still names the old table
    staging = f"{store.folder('d', 'm')}/_staging"
    finished = {i for name in os.listdir(staging) for i in pq.read_table(f"{staging}/{name}")
                .column("image_id").to_pylist()}
    assert finished
    report, embedder = embed(store, ids, fingerprint="fp2", chunk_size=1_000)
    assert report.resumed == len(finished) and report.resumed + report.new == 10_000 and report.reused == 0
    assert len(set(embedder.embedded)) == len(embedder.embedded) == report.new  # nothing embedded twice
    assert set(embedder.embedded).isdisjoint(finished)
    assert_table(store, ids)
    assert not os.path.exists(f"{store.folder('d', 'm')}/_staging")


def test_a_shard_larger_than_a_chunk_is_checkpointed_per_chunk(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(40)  # one part; chunks of 10
    with pytest.raises(RuntimeError):
        embed(store, ids, chunk_size=10, fail_after_calls=3)
    report, embedder = embed(store, ids, chunk_size=10)
    assert (report.resumed, report.new) == (30, 10) and embedder.embedded == ids[30:]
    assert_table(store, ids)


def write_single_file_table(store, ids, fingerprint="fp", dim=3):
    """A table as the earlier layout wrote it: one embeddings.parquet per (dataset, model)."""
    vectors = np.stack([vector_of(i, dim) for i in ids])
    arrow = pa.Table.from_arrays(
        [pa.array(ids, type=pa.string()),
         pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)],
        schema=embedding_schema(dim, fingerprint, "m"))
    os.makedirs(store.folder("d", "m"), exist_ok=True)
    pq.write_table(arrow, store.legacy_path("d", "m"))
    return vectors


def test_a_single_file_table_is_read_as_it_is_and_migrated_without_re_embedding(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(6_000)
    vectors = write_single_file_table(store, ids)
    table = store.read("d", "m")  # readable before any migration, in its stored order
    assert table.image_ids.tolist() == ids and np.array_equal(table.vectors, vectors)
    assert store.read_fingerprint("d", "m") == "fp"

    report = store.unchanged("d", "m", ids, "fp")  # the no-load path of the nightly run migrates
    assert report is not None and report.new == 0
    assert not os.path.exists(store.legacy_path("d", "m")) and len(part_files(store)) == 16
    migrated = store.read("d", "m", order=ids)
    assert np.array_equal(migrated.vectors.view(np.uint32), vectors.view(np.uint32))  # bit for bit

    added = image_ids(5, start=6_000)
    report, embedder = embed(store, ids + added)
    assert (report.new, report.reused) == (5, 6_000) and sorted(embedder.embedded) == sorted(added)


def test_the_embedding_run_migrates_a_single_file_table_it_finds(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(50)
    write_single_file_table(store, ids)
    report, embedder = embed(store, ids)
    assert (report.new, report.reused) == (0, 50) and embedder.asked == []
    assert not os.path.exists(store.legacy_path("d", "m")) and len(part_files(store)) == 1


def test_the_duckdb_view_shows_the_current_parts_only(tmp_path):
    lake, db = tmp_path / "lake", tmp_path / "w.duckdb"
    store = EmbeddingStore(lake)
    ids = image_ids(5_000)
    with pytest.raises(RuntimeError):  # leaves finished parts of fp2 in _staging
        embed(store, ids, fingerprint="fp2", chunk_size=1_000, fail_after_calls=2)
    embed(store, ids[:4_000])
    other = EmbeddingStore(lake)
    other.embed_incrementally("d2", "m", ids[:7], "fp", Embedder(ids[:7]))
    write_single_file_table(EmbeddingStore(lake / "x"), ids[:3])  # not in this lake's tree
    warehouse.refresh_embedding_view(db, str(lake))
    rows = warehouse.query(db, "SELECT dataset, model, count(*) AS n, count(DISTINCT image_id) AS ids "
                               "FROM embeddings GROUP BY ALL ORDER BY dataset").values.tolist()
    assert rows == [["d", "m", 4_000, 4_000], ["d2", "m", 7, 7]]


def test_the_view_reads_parts_and_not_yet_migrated_tables_together(tmp_path):
    lake, db = tmp_path / "lake", tmp_path / "w.duckdb"
    embed(EmbeddingStore(lake), image_ids(20))
    old = EmbeddingStore(lake)
    vectors = np.stack([vector_of(i) for i in image_ids(4)])
    os.makedirs(f"{old.base}/embeddings/dataset=old/model=m", exist_ok=True)
    arrow = pa.Table.from_arrays(
        [pa.array(image_ids(4)), pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 3)],
        schema=embedding_schema(3, "fp", "m"))
    pq.write_table(arrow, f"{old.base}/embeddings/dataset=old/model=m/embeddings.parquet")
    warehouse.refresh_embedding_view(db, str(lake))
    rows = warehouse.query(db, "SELECT dataset, count(*) FROM embeddings GROUP BY ALL ORDER BY 1").values.tolist()
    assert rows == [["d", 20], ["old", 4]]


def test_read_puts_the_rows_in_the_order_asked(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(9_000)
    embed(store, ids)
    shuffled = list(np.random.default_rng(0).permutation(ids))
    assert_table(store, shuffled)
    table = store.read("d", "m", order=ids[:10])  # ids not named follow in stored order
    assert table.image_ids.tolist()[:10] == ids[:10] and len(table) == 9_000
    parts = list(store.iter_parts("d", "m"))
    assert len(parts) == 16 and sum(len(p) for p in parts) == 9_000


def test_a_growing_collection_is_resharded_without_re_embedding(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(70_000)
    embed(store, ids[:3_000])  # one part
    report, embedder = embed(store, ids)
    assert (report.reused, report.new) == (3_000, 67_000)
    index = json.loads(open(store.index_path("d", "m")).read())
    assert index["shard_digits"] == 2 and len(index["parts"]) == 256
    assert sorted(embedder.embedded) == sorted(ids[3_000:])
    table = store.read("d", "m", order=ids[:3_000])
    np.testing.assert_array_equal(table.vectors[:3_000], np.stack([vector_of(i) for i in ids[:3_000]]))


def test_an_unreadable_index_is_a_storage_error_naming_it(tmp_path):
    from nfhm_pipeline.errors import StorageError

    store = EmbeddingStore(tmp_path)
    embed(store, image_ids(5))
    with open(store.index_path("d", "m"), "w") as f:
        f.write("{not json")
    with pytest.raises(StorageError, match="_index.json is unreadable"):
        store.read("d", "m")


def test_a_write_of_a_table_keeps_its_rows(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(5_000)
    table = EmbeddingTable(np.array(ids, dtype=object), np.stack([vector_of(i) for i in ids]), "fp")
    store.write("d", "m", table)
    assert_table(store, ids)
    store.write("d", "m", EmbeddingTable(np.array(ids[:2], dtype=object), table.vectors[:2], "fp"))
    assert_table(store, ids[:2])
    assert len(part_files(store)) == 1


def test_groups_of_shards_stay_within_a_chunk_and_only_a_larger_shard_is_checkpointed(tmp_path):
    """Shards are grouped up to chunk_size missing images; a group never spills into a second
    chunk, so checkpoints (``_staging/ckpt-*``) are written only for a shard larger than a chunk."""
    ids = image_ids(10_000)  # 16 shards of ~625
    store = EmbeddingStore(tmp_path)
    staging = tmp_path / "embeddings" / "dataset=d" / "model=m" / "_staging"
    seen_checkpoints = []

    class Watching(Embedder):
        def __call__(self, positions):
            seen_checkpoints.extend(p.name for p in staging.glob("ckpt-*")) if staging.exists() else None
            yield from super().__call__(positions)

    embedder = Watching(ids)
    store.embed_incrementally("d", "m", ids, "fp", embedder, chunk_size=2_000)
    assert all(len(call) <= 2_000 for call in embedder.asked) and sorted(embedder.embedded) == sorted(ids)
    assert len(embedder.asked) < 16 and not seen_checkpoints  # several shards per call, no checkpoint
    assert_table(store, ids)

    embedder = Watching(ids)
    store.embed_incrementally("d", "m", ids, "fp2", embedder, chunk_size=400)  # every shard > a chunk
    assert all(len(call) <= 400 for call in embedder.asked) and sorted(embedder.embedded) == sorted(ids)
    assert seen_checkpoints  # each shard's first chunk was checkpointed before its second was asked
    assert_table(store, ids)


def test_a_lake_sharded_by_the_earlier_rule_for_non_digest_ids_is_resharded_without_re_embedding(tmp_path, monkeypatch):
    """Ids that are not sha256 digests (catalogue numbers) used to be sharded by their first
    characters, so 10,000 of them sat in one part; hashed now, they move to 16 parts, each vector
    taken from the old part rather than embedded again."""
    from nfhm_pipeline.store import embedding_store

    ids = [f"{i:09d}" for i in range(10_000)]
    vectors = {i: vector_of(hashlib.sha256(i.encode()).hexdigest()) for i in ids}

    def earlier_rule(image_id, digits):
        return "all" if digits == 0 else image_id[:digits]

    store = EmbeddingStore(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(embedding_store, "shard_of", earlier_rule)
        store.write("d", "m", EmbeddingTable(np.array(ids, dtype=object), np.stack([vectors[i] for i in ids]), "fp"))
    assert len(store.part_paths("d", "m")) == 1  # every id begins with "0"

    asked = []

    def embed_chunk(positions):
        asked.extend(positions)
        yield list(positions), np.stack([vectors[ids[p]] for p in positions])

    report = store.embed_incrementally("d", "m", ids, "fp", embed_chunk, chunk_size=4096)
    assert asked == [] and report.new == 0 and report.reused == 10_000
    assert len(store.part_paths("d", "m")) == 16
    table = store.read("d", "m", order=ids)
    assert table.image_ids.tolist() == ids
    np.testing.assert_array_equal(table.vectors, np.stack([vectors[i] for i in ids]))


@pytest.mark.parametrize("kind", [list, tuple, np.array, iter])
def test_an_embedder_may_yield_its_positions_as_any_iterable_of_integers(tmp_path, kind):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(300)

    def embed_chunk(positions):
        positions = list(positions)
        yield kind(positions), np.stack([vector_of(ids[p]) for p in positions])

    report = store.embed_incrementally("d", "m", ids, "fp", embed_chunk, chunk_size=64)
    assert report.new == 300
    assert_table(store, ids)


def test_an_id_listed_twice_is_embedded_once_from_its_first_row_and_later_rows_keep_their_own_vectors(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(40)
    listed = ids[:3] + [ids[1]] + ids[3:20] + [ids[0], ids[5]] + ids[20:]  # three repeats, early and late
    asked_rows = []

    def embed_chunk(positions):
        positions = list(positions)
        asked_rows.extend(positions)
        yield positions, np.stack([vector_of(listed[p]) for p in positions])

    report = store.embed_incrementally("d", "m", listed, "fp", embed_chunk, chunk_size=16)
    assert report.new == 40 and report.total == 40
    assert sorted(asked_rows) == sorted(listed.index(i) for i in ids)  # each id once, at its first row
    assert_table(store, ids)


def test_an_embedder_yielding_a_row_it_was_not_asked_for_is_a_storage_error(tmp_path):
    from nfhm_pipeline.errors import StorageError

    ids = image_ids(6)
    listed = ids + [ids[0]]

    def embed_chunk(positions):
        yield [6], np.stack([vector_of(ids[0])])  # row 6 repeats row 0: never asked for

    with pytest.raises(StorageError, match="row 6 of the image ids, a row it was not asked for"):
        EmbeddingStore(tmp_path).embed_incrementally("d", "m", listed, "fp", embed_chunk)


def test_a_write_of_a_table_with_a_repeated_id_keeps_the_first_row_of_each_id(tmp_path):
    store = EmbeddingStore(tmp_path)
    ids = image_ids(30)
    listed = ids[:10] + [ids[2]] + ids[10:]
    vectors = np.stack([vector_of(i) for i in listed])
    vectors[10] += 100.0  # the repeat's own row differs: the first one must win
    store.write("d", "m", EmbeddingTable(np.array(listed, dtype=object), vectors, "fp"))
    assert_table(store, ids)


@pytest.mark.parametrize("extra", [-1, 1])
def test_an_embedder_returning_more_or_fewer_vectors_than_positions_is_a_storage_error(tmp_path, extra):
    from nfhm_pipeline.errors import StorageError

    ids = image_ids(20)

    def embed_chunk(positions):
        positions = list(positions)
        yield positions, np.stack([vector_of(ids[p]) for p in positions[:len(positions) + extra]]
                                  + ([vector_of(ids[0])] if extra > 0 else []))

    store = EmbeddingStore(tmp_path)
    with pytest.raises(StorageError, match=r"returned (19|21) vector\(s\) for 20 image\(s\)"):
        store.embed_incrementally("d", "m", ids, "fp", embed_chunk)
    assert not os.path.exists(store.index_path("d", "m"))  # nothing committed


def test_one_answer_short_and_the_next_one_over_is_still_a_storage_error(tmp_path):
    # 9 vectors for 10 images, then 11 for 10: the totals agree, the rows would not
    from nfhm_pipeline.errors import StorageError

    ids = image_ids(20)

    def embed_chunk(positions):
        positions = list(positions)
        yield positions[:10], np.stack([vector_of(ids[p]) for p in positions[:9]])
        yield positions[10:], np.stack([vector_of(ids[p]) for p in positions[9:]])

    store = EmbeddingStore(tmp_path)
    with pytest.raises(StorageError, match=r"returned 9 vector\(s\) for 10 image\(s\)"):
        store.embed_incrementally("d", "m", ids, "fp", embed_chunk)
    assert not os.path.exists(store.index_path("d", "m"))
