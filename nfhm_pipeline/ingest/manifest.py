"""Stage 1: a dataset's source → image manifest + rejected images."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from nfhm_pipeline.catalog import DatasetSpec
from nfhm_pipeline.ingest.registry import READERS, read_source
from nfhm_pipeline.ingest.images import validate_images


@dataclass
class ManifestBuild:
    manifest: pd.DataFrame  # image_id, uri, width, height, mode, <labels...>, group, official_split
    rejected: pd.DataFrame  # uri, source_row, reason, detail

    def classes_per_level(self, labels) -> dict[str, int]:
        return {level: int(self.manifest[level].nunique()) for level in labels}


def reader_params(spec: DatasetSpec, sources_dir: Path, levels=None) -> dict:
    """Translate a catalog entry into the keyword arguments of its reader (``READERS[spec.reader]``).

    ``levels``: the label levels the source itself must supply (default all; fewer when a
    ``taxonomy`` CSV supplies the coarser ones)."""
    return READERS[spec.reader].arguments(spec, sources_dir, levels)


def build_manifest(spec: DatasetSpec, sources_dir: str | os.PathLike, *, max_pixels: int | None = None) -> ManifestBuild:
    """Read the dataset's source and validate every image once (hash, size, mode).

    Bad images land in ``rejected`` with a reason; good rows are never dropped because of them.
    """
    # Multi-label findings ride along as extra label columns ('1'/'0'/'-1'/None strings);
    # evaluation.multilabel_tables parses them back. The first label column is the derived stratum.
    label_columns = [*spec.labels, *spec.findings]
    if spec.params.get("taxonomy"):
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
