"""Stage 1: a dataset's source → image manifest + rejected images."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from nfhm_pipeline.catalog import DatasetSpec
from nfhm_pipeline.ingest.readers import read_source
from nfhm_pipeline.ingest.images import validate_images


@dataclass
class ManifestBuild:
    manifest: pd.DataFrame  # image_id, uri, width, height, mode, <labels...>, group, official_split
    rejected: pd.DataFrame  # uri, source_row, reason, detail

    def classes_per_level(self, labels) -> dict[str, int]:
        return {level: int(self.manifest[level].nunique()) for level in labels}


def reader_params(spec: DatasetSpec, sources_dir: Path, levels=None) -> dict:
    """Translate a catalog entry into the keyword arguments of its reader.

    ``levels``: the label levels the source itself must supply (default all; fewer when a
    ``taxonomy`` CSV supplies the coarser ones)."""
    p = dict(spec.params)
    p.pop("taxonomy", None)
    levels = tuple(levels or spec.labels)
    out_dir = sources_dir / spec.name
    # A leakage unit that is also the reporting group is copied from `group` after reading.
    own_column = spec.split.group_by and spec.split.group_by != spec.group
    split_group = {"split_group_column": spec.split.group_by} if own_column else {}
    if spec.reader == "demo_shapes":
        return {"out_dir": out_dir, "label_columns": levels, **p}
    if spec.reader == "sklearn_digits":
        return {"out_dir": out_dir, "label_column": spec.finest_label}
    if spec.reader == "vlm4bio_csv":
        return {"csv_path": p.pop("csv"), "label_columns": levels, **split_group, **p}
    if spec.reader == "label_csv":
        return {"csv_path": p.pop("csv"), "label_columns": levels,
                "group_column": p.pop("group_column", None) or spec.group, **split_group, **p}
    if spec.reader == "image_folder":
        return {"root": p.pop("root"), "label_column": spec.finest_label, **p}
    if spec.reader == "medmnist_npz":
        return {"npz_path": p.pop("npz"), "out_dir": out_dir, "label_column": spec.finest_label, **p}
    if spec.reader == "chexpert_csv":
        from nfhm_pipeline.stages.multilabel import finding_columns

        p.pop("findings", None)
        return {"csv_path": p.pop("csv"), "label_columns": spec.labels, "findings": finding_columns(spec),
                "group_column": spec.group, **p}
    raise NotImplementedError(spec.reader)


def build_manifest(spec: DatasetSpec, sources_dir: str | os.PathLike, *, max_pixels: int | None = None) -> ManifestBuild:
    """Read the dataset's source and validate every image once (hash, size, mode).

    Bad images land in ``rejected`` with a reason; good rows are never dropped because of them.
    """
    label_columns = list(spec.labels)
    if spec.reader == "chexpert_csv":
        # Findings ride along as extra label columns ('1'/'0'/'-1'/None strings); stages.multilabel
        # parses them back. The first label column is the derived stratum the split uses.
        from nfhm_pipeline.stages.multilabel import chexpert_candidates, finding_columns

        candidates = chexpert_candidates(**reader_params(spec, Path(sources_dir)))
        label_columns += finding_columns(spec)
    elif spec.params.get("taxonomy"):
        from nfhm_pipeline.ingest.readers import apply_taxonomy, taxonomy_levels

        taxonomy, delimiter = spec.params["taxonomy"], spec.params.get("delimiter")
        supplied = taxonomy_levels(taxonomy, label_columns, delimiter)
        own = [level for level in label_columns if level not in supplied]
        candidates = read_source(spec.reader, **reader_params(spec, Path(sources_dir), own))
        candidates = apply_taxonomy(candidates, taxonomy, label_columns, delimiter)
    else:
        candidates = read_source(spec.reader, **reader_params(spec, Path(sources_dir)))
    if spec.split.group_by and spec.split.group_by == spec.group:
        candidates = candidates.assign(split_group=candidates["group"])
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    manifest, rejected = validate_images(candidates, label_columns, workers=min(8, (os.cpu_count() or 2) * 2), **kwargs)
    return ManifestBuild(manifest=manifest, rejected=rejected)


def warehouse_frames(dataset: str, build: ManifestBuild, labels) -> dict[str, pd.DataFrame]:
    """The manifest as the warehouse tables ``images``, ``image_labels`` and ``rejected_images``."""
    m = build.manifest
    images = pd.DataFrame({
        "dataset": dataset, "image_id": m["image_id"], "uri": m["uri"],
        "width": m["width"].astype("int32"), "height": m["height"].astype("int32"),
        "label": m[labels[0]], "grp": m["group"], "official_split": m["official_split"],
    })
    image_labels = pd.concat(
        [pd.DataFrame({"dataset": dataset, "image_id": m["image_id"], "level": level, "label": m[level]})
         for level in labels], ignore_index=True)
    rejected = build.rejected.assign(dataset=dataset)
    return {"images": images, "image_labels": image_labels, "rejected_images": rejected}
