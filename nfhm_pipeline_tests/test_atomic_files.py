"""The one atomic writer (store/files.py) and the writers built on it: no temp file is left behind
when a write fails (an exception, Ctrl-C, a full disk), the previous file stays intact until the
new one is complete, an OS error is a StorageError naming the file, and files get ordinary modes."""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nfhm_pipeline.errors import CatalogError, StorageError
from nfhm_pipeline.ingest.images import write_bytes_atomic
from nfhm_pipeline.reports.plots import new_figure, save_png
from nfhm_pipeline.store import files
from nfhm_pipeline.store.embedding_store import EmbeddingStore, EmbeddingTable
from nfhm_pipeline.store.text_store import read_text_embeddings, text_path, write_text_embeddings

REPO_ROOT = Path(__file__).resolve().parent.parent


def leftovers(folder: Path) -> list[Path]:
    return [p for p in Path(folder).rglob("*") if ".tmp" in p.name]


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def failing_figure(error):
    """A figure holding an artist whose drawing raises ``error``: it fails while being saved."""
    from matplotlib.artist import Artist

    class Failing(Artist):
        def draw(self, renderer):
            raise error

    fig = new_figure(2, 2)
    fig.add_artist(Failing())
    return fig


# -- the context manager itself ------------------------------------------------------------------

def test_temp_file_is_hidden_beside_the_target_and_the_old_file_stays_until_the_rename(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with files.atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".out.bin.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # a reader still sees the whole previous file
    assert target.read_bytes() == b"new" and leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()], ids=["ValueError", "KeyboardInterrupt"])
def test_an_exception_inside_the_write_removes_the_temp_file_and_keeps_the_old_one(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(type(error)):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half a fi")
            raise error
    assert target.read_bytes() == b"old"
    assert leftovers(tmp_path) == []


def test_a_write_creates_the_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    assert files.write_text(target, "héllo\n") == target
    assert target.read_bytes() == "héllo\n".encode()


def test_target_under_a_regular_file_is_a_storage_error_naming_it(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    target = blocker / "sub" / "out.bin"
    with pytest.raises(StorageError, match=f"cannot write {target}: .*free space"):
        files.write_bytes(target, b"x")
    assert blocker.read_text() == "a file, not a folder" and leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway")
def test_target_in_a_read_only_folder_is_a_storage_error_naming_it(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "out.bin").write_bytes(b"old")
    folder.chmod(0o500)
    try:
        with pytest.raises(StorageError, match=f"cannot write {folder / 'out.bin'}: Permission denied"):
            files.write_bytes(folder / "out.bin", b"new")
    finally:
        folder.chmod(0o700)
    assert (folder / "out.bin").read_bytes() == b"old" and leftovers(tmp_path) == []


def test_skip_if_identical_touches_nothing(tmp_path):
    target = tmp_path / "same.bin"
    assert write_bytes_atomic(target, b"data") is True
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    assert write_bytes_atomic(target, b"data") is False
    assert target.stat().st_mtime_ns == 1_000_000_000
    assert write_bytes_atomic(target, b"other") is True and target.read_bytes() == b"other"


# -- file modes ----------------------------------------------------------------------------------

def lake_files_written(store):
    """The part and the index a one-image table write leaves in the lake."""
    store.write("d", "m", EmbeddingTable(np.array(["i"], dtype=object), np.ones((1, 2), np.float32), "fp"))
    return [*store.part_paths("d", "m"), store.index_path("d", "m")]


def test_every_writer_gives_files_the_mode_open_would_give(tmp_path, umask022):
    written = [
        files.write_bytes(tmp_path / "a.bin", b"x"),
        files.write_text(tmp_path / "a.txt", "x"),
        files.write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "a.parquet"),
        save_png(new_figure(2, 2), tmp_path / "a.png", svg=True),
        tmp_path / "a.svg",
        *map(Path, lake_files_written(EmbeddingStore(tmp_path / "lake"))),
        Path(write_text_embeddings(EmbeddingStore(tmp_path / "lake"), "d", "m", None, None, "fp")),
    ]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: "0o644" for p in written}


def test_the_mode_follows_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        path = files.write_bytes(tmp_path / "g.bin", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664


# -- each writer, failing ------------------------------------------------------------------------

@pytest.mark.parametrize("error", [ValueError("bad figure"), KeyboardInterrupt()], ids=["ValueError", "KeyboardInterrupt"])
def test_a_figure_that_fails_while_saving_leaves_the_old_png_and_no_temp_file(tmp_path, error):
    target = save_png(new_figure(2, 2), tmp_path / "fig.png")
    before = target.read_bytes()
    with pytest.raises(type(error)):
        save_png(failing_figure(error), target)
    assert target.read_bytes() == before and leftovers(tmp_path) == []


def test_a_frame_parquet_cannot_hold_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = files.write_parquet(pd.DataFrame({"a": [1, 2]}), tmp_path / "m.parquet")
    with pytest.raises(Exception) as err:  # pyarrow's ArrowTypeError / ArrowInvalid, as raised
        files.write_parquet(pd.DataFrame({"a": [1, "two", object()]}), target)
    assert not isinstance(err.value, StorageError)
    assert pd.read_parquet(target)["a"].tolist() == [1, 2] and leftovers(tmp_path) == []


def test_a_failing_embedding_run_leaves_no_temp_file_and_the_old_table(tmp_path):
    store = EmbeddingStore(tmp_path)
    old = EmbeddingTable(np.array(["a"], dtype=object), np.ones((1, 2), np.float32), "fp0")
    store.write("d", "m", old)

    def embed_chunk(positions):
        yield positions[:1], np.zeros((1, 2), np.float32)  # one part is written, then Ctrl-C
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.embed_incrementally("d", "m", ["a", "b", "c"], "fp1", embed_chunk, chunk_size=3)
    kept = store.read("d", "m")
    assert kept.fingerprint == "fp0" and np.array_equal(kept.vectors, old.vectors)
    assert leftovers(tmp_path) == []


def test_lake_and_text_store_under_a_regular_file_are_storage_errors_naming_the_path(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    store = EmbeddingStore(blocker / "lake")
    with pytest.raises(StorageError, match=f"cannot write {re.escape(store.folder('d', 'm'))}/_staging/part-all-"):
        store.write("d", "m", EmbeddingTable(np.array(["a"], dtype=object), np.ones((1, 2), np.float32), "fp"))
    with pytest.raises(StorageError, match=f"cannot write {text_path(store, 'd', 'm')}"):
        write_text_embeddings(store, "d", "m", None, None, "fp")


def test_a_catalog_that_does_not_load_is_never_left_behind(tmp_path):
    from nfhm_pipeline.cli import _write_checked

    out = tmp_path / "mine.yaml"
    with pytest.raises(CatalogError, match="does not load"):
        _write_checked(out, "datasets: [not, a, mapping]\n")
    assert not out.exists() and leftovers(tmp_path) == []


# Under a 16 KiB file-size limit (a nearly full disk, as a writer sees it), every kind of writer
# is asked to replace a small file with a big one: each must say which file, keep the small one,
# and leave no temp file.
FULL_DISK = """
import resource, signal, sys
from pathlib import Path
import numpy as np, pandas as pd
import matplotlib.font_manager  # build matplotlib's font cache before the limit
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.reports.plots import new_figure, save_png
from nfhm_pipeline.store import files
from nfhm_pipeline.store.embedding_store import EmbeddingStore, EmbeddingTable
from nfhm_pipeline.store.text_store import write_text_embeddings
root = Path(sys.argv[1])
store = EmbeddingStore(root / "lake")
rng = np.random.default_rng(0)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG as an error, not a killed process
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
big = rng.random((400, 64), dtype=np.float32)  # incompressible, ~100 KB
prompts = pd.DataFrame({"level": "l", "class": [f"c{i}" for i in range(400)], "template": "{}", "prompt": "p"})
fig = new_figure(12, 12)
fig.subplots().imshow(rng.random((300, 300)))
writers = {
    "bytes": lambda: files.write_bytes(root / "a.bin", rng.bytes(100_000)),
    "parquet": lambda: files.write_parquet(pd.DataFrame({"x": rng.random(20_000)}), root / "a.parquet"),
    "lake": lambda: store.write("d", "m", EmbeddingTable(np.array([f"i{i}" for i in range(400)], dtype=object),
                                                         big, "fp")),
    "text": lambda: write_text_embeddings(store, "d", "m", prompts, big, "fp"),
    "png": lambda: save_png(fig, root / "a.png", dpi=100),
}
for name, write in writers.items():
    try:
        write()
        print(name, "WROTE")
    except StorageError as e:
        print(name, e)
"""


def test_a_full_disk_is_a_storage_error_for_every_writer_and_keeps_every_old_file(tmp_path):
    store = EmbeddingStore(tmp_path / "lake")
    small = EmbeddingTable(np.array(["a"], dtype=object), np.ones((1, 2), np.float32), "fp0")
    old = {
        "bytes": files.write_bytes(tmp_path / "a.bin", b"old"),
        "parquet": files.write_parquet(pd.DataFrame({"x": [1.0]}), tmp_path / "a.parquet"),
        "lake": Path(store.write("d", "m", small)),
        "text": Path(write_text_embeddings(store, "d", "m", None, None, "fp0")),
        "png": save_png(new_figure(1, 1), tmp_path / "a.png", dpi=20),
    }
    before = {name: path.read_bytes() for name, path in old.items()}
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MPLCONFIGDIR": str(tmp_path / "mpl")}
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert set(lines) == set(old), done.stdout
    for name, path in old.items():
        # the lake's old table is named by its index (kept); the write fails on a new part beside it
        target = f"{store.folder('d', 'm')}/_staging/part-all-" if name == "lake" else f"{path}: "
        assert lines[name].startswith(f"cannot write {target}"), (name, lines[name])
        assert "free space" in lines[name]
        assert path.read_bytes() == before[name], name
    assert leftovers(tmp_path) == []
    prompts, vectors = read_text_embeddings(store, "d", "m")
    assert prompts.empty
