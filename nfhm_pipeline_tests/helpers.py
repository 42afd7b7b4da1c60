"""Helpers shared by several test modules (``from helpers import ...``): image files, a small
label_csv collection and its catalog, runs through Dagster and the error a person sees, and
warehouse result rows written by the pipeline's own functions.

Nothing here fakes the pipeline: images are real PNG files, results come from
``nfhm_pipeline.evaluation.tables`` and go through ``nfhm_pipeline.store.warehouse.replace_many``.
"""
from __future__ import annotations

import datetime as dt
import os
import textwrap
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from PIL import Image

from conftest import REPO_ROOT

# -- images ------------------------------------------------------------------------------------------

def noise_image(seed: int, size=(10, 8)) -> Image.Image:
    """An RGB image of ``size`` (width, height) with uniform random pixels from ``seed``."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def random_png(path: Path, seed: int, size=(10, 8)) -> Path:
    """``noise_image(seed, size)`` saved as a PNG at ``path`` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(seed, size).save(path, format="PNG")
    return path


# -- a label_csv collection and its catalog ----------------------------------------------------------

def write_leaves(root: Path, names: list[str], *, image: Callable[[int, str], Image.Image] | None = None,
                 keep_existing: bool = False) -> Path:
    """``root/images/<name>.png`` for each name and ``root/leaves.csv`` (columns path, species; the
    species is the part of the name before '_'). Returns the CSV's path.

    ``image(i, name)`` draws the i-th image (default: ``noise_image(i, (10, 10))``);
    ``keep_existing`` leaves images already on disk untouched (same bytes, same mtime).
    """
    draw = image or (lambda i, name: noise_image(i, (10, 10)))
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        path = root / "images" / f"{name}.png"
        if not (keep_existing and path.exists()):
            draw(i, name).save(path)
    csv = root / "leaves.csv"
    csv.write_text("path,species\n" + "".join(f"images/{n}.png,{n.split('_')[0]}\n" for n in names),
                   encoding="utf-8")
    return csv


# The demo_shapes 'specimens' dataset small enough for a test (54 images), as a catalog entry.
SPECIMENS_DATASET = """\
specimens:
  reader: demo_shapes
  labels: [species, genus, family]
  group: taxa
  images_per_species: 2
  size: 32
  split: {test_fraction: 0.2, seed: 0, folds: 2}
"""


def write_leaves_catalog(path: Path, csv: Path, models: dict[str, str], *, leaves_extra: str = "",
                         extra_datasets: str = "") -> Path:
    """A catalog at ``path`` with the 'leaves' label_csv dataset over ``csv`` (split: test fraction
    0.25, seed 0, 2 folds), then ``extra_datasets`` (YAML entries, unindented) and ``models``
    (key -> YAML body of the entry, e.g. ``"loader: raw_pixels\\nimage_size: 8"``).
    ``leaves_extra``: more YAML lines of the leaves entry (e.g. ``"models: [raw-pixels]"``)."""
    leaves = textwrap.dedent(f"""\
        leaves:
          reader: label_csv
          csv: {csv}
          path_column: path
          labels: [species]
          split: {{test_fraction: 0.25, seed: 0, folds: 2}}
        """) + textwrap.indent(textwrap.dedent(leaves_extra).strip() + "\n", "  ") * bool(leaves_extra.strip())
    text = "datasets:\n" + textwrap.indent(leaves + textwrap.dedent(extra_datasets), "  ")
    text += "models:\n" + "".join(f"  {k}:\n" + textwrap.indent(textwrap.dedent(v).strip(), "    ") + "\n"
                                  for k, v in models.items())
    path.write_text(text, encoding="utf-8")
    return path



def write_chexpert_collection(root: Path, findings: list[str], n_images: int, *, seed: int,
                              p: tuple[float, float, float, float]) -> Path:
    """16x16 PNGs under ``root`` and a CheXpert-style ``labels.csv`` (Path, Sex, one column per
    finding: '1.0', '0.0', '-1.0' or '' drawn with probabilities ``p``). The red / green / blue
    channels rise with the first findings and the brightness with the last one (full for 1.0,
    half for -1.0), so a model can learn every finding. Returns the CSV's path."""
    import csv

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    states = rng.choice(["1.0", "0.0", "-1.0", ""], p=list(p), size=(n_images, len(findings)))
    channels = len(findings) - 1
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Path", "Sex", *findings])
        for i, row in enumerate(states):
            pixels = rng.normal(100, 20, size=(16, 16, 3))
            level = np.array([{"1.0": 70.0, "-1.0": 35.0}.get(v, 0.0) for v in row])
            pixels[..., :channels] += level[:channels]
            pixels += level[channels]
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / f"img_{i:03d}.png")
            writer.writerow([f"img_{i:03d}.png", "F" if i % 2 else "M", *row])
    return root / "labels.csv"

# -- processes and Dagster runs ----------------------------------------------------------------------

def subprocess_env(**extra) -> dict:
    """This process's environment with the repository on PYTHONPATH, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def materialize(defs, instance, dataset: str, stages, partition_key: str | None = None, *,
                raise_on_error: bool = False):
    """Materialize ``<dataset>/<stage>`` for each of ``stages`` in one run of ``defs``."""
    import dagster as dg

    return dg.materialize(list(defs.assets), selection=[dg.AssetKey([dataset, s]) for s in stages],
                          instance=instance, resources=defs.resources, partition_key=partition_key,
                          raise_on_error=raise_on_error)


def user_error(result) -> str:
    """What a person sees of the first failed step, as "ClassName: message": the outermost error of
    the project's own types in the cause chain (below it are the library errors it explains)."""
    from nfhm_pipeline import errors

    ours = {n for n, c in vars(errors).items() if isinstance(c, type) and issubclass(c, errors.NfhmError)}
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            while err is not None and err.cls_name not in ours:
                err = err.cause
            assert err is not None, "the step failed with a library error and no project error explaining it"
            return f"{err.cls_name}: {err.message.strip().split(f'{err.cls_name}: ', 1)[-1]}"
    raise AssertionError("no step failed")


# -- result rows, computed and written as the evaluation assets do -----------------------------------

def clustered_split(dataset_seed: int = 0, *, classes=("acer", "betula", "quercus"), per_class: int = 12,
                    dim: int = 8, genus: dict[str, str] | None = None, test_fraction: float = 0.25,
                    n_folds: int = 2) -> tuple[pd.DataFrame, np.ndarray, str]:
    """A small labelled collection split by the pipeline's ``make_split``: (evaluation frame with
    columns image_id, split, fold, group, species[, genus]; float32 vectors [n, dim], one Gaussian
    cluster per class; the split's ``split_identity``)."""
    from nfhm_pipeline.evaluation.splits import make_split, split_identity

    rng = np.random.default_rng(dataset_seed)
    species = np.repeat(list(classes), per_class)
    ids = [f"{s}_{i}" for s in classes for i in range(per_class)]
    centres = rng.normal(scale=3.0, size=(len(classes), dim))
    vectors = (centres.repeat(per_class, axis=0) + rng.normal(size=(len(ids), dim))).astype(np.float32)
    labels = pd.DataFrame({"image_id": ids, "species": species})
    split = make_split(labels, label_column="species", test_fraction=test_fraction, seed=dataset_seed,
                       n_folds=n_folds)
    frame = labels.merge(split.assignments[["image_id", "split", "fold"]], on="image_id").assign(group=None)
    if genus is not None:
        frame["genus"] = frame["species"].map(genus)
    columns = ["image_id", "split", "fold", "group", "species", *(["genus"] if genus is not None else [])]
    rows = frame["image_id"].map({i: k for k, i in enumerate(ids)}).to_numpy()
    return frame[columns], vectors[rows], split_identity(split.assignments, dataset_seed)


def write_split(db: Path, dataset: str, frame: pd.DataFrame, split_id: str) -> None:
    """The ``splits`` rows of ``frame`` (as the splits asset stores them), via ``replace_many``."""
    from nfhm_pipeline.store import warehouse

    rows = pd.DataFrame({"dataset": dataset, "image_id": frame["image_id"], "split": frame["split"],
                         "fold": frame["fold"], "split_id": split_id})
    warehouse.replace_many(db, [("splits", rows, {"dataset": dataset})])


def write_results(db: Path, dataset: str, model: str, tables, *, split_id: str | None, run_id: str = "test-run",
                  created_at: dt.datetime | None = None) -> pd.DataFrame:
    """Store the ``EvalTables`` of one model with the evaluation stages' own writer
    (`stages.base.store_results`), for each task present; ``created_at`` then stamps the metrics
    rows (a test of "newest first"). Returns the metrics."""
    from nfhm_pipeline.stages.base import Paths, Provenance, store_results
    from nfhm_pipeline.store import warehouse

    metrics = tables.frames()[0]
    tasks = sorted(set(metrics["task"])) if len(metrics) else []
    paths = Paths(Path(db).parent, str(Path(db).parent / "lake"))
    assert paths.warehouse == Path(db), "write_results writes <folder>/warehouse.duckdb"
    provenance = Provenance(run_id=run_id, stage="test", embedding_fingerprint=None, split_id=split_id,
                            split_seed=0, stage_seed=None, device="cpu")
    stored = store_results(paths, dataset, model, tasks, tables, provenance)
    if created_at is not None:
        with warehouse.connect(db) as con:
            con.execute("UPDATE metrics SET created_at = ? WHERE dataset = ? AND model = ? AND run_id = ?",
                        [created_at, dataset, model, run_id])
    return stored


# The tiny OpenCLIP model as a catalog's `models:` entry (2-space indented), built on first use.
TINY_CLIP_YAML = """  tiny-clip:
    loader: open_clip
    build: tiny_openclip
    model: nfhm-tiny-clip
    pretrained: models/nfhm-tiny-clip-seed0.safetensors
    seed: 0
"""
