"""``<dataset>/splits``: one seeded train/test split (+ CV folds) shared by every model.

Stratified by the finest label; grouped by the leakage unit (``split.group_by``, manifest column
``split_group``) when one is declared; the dataset's own split when the manifest carries one.
Cross-split near-duplicates (manifest ``phash``) are listed, and kept, dropped or grouped as
``split.near_duplicates`` says. Tables written together: ``splits``, ``split_exclusions``,
``split_summary``, ``near_duplicates``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dataclasses import dataclass

import pandas as pd

if TYPE_CHECKING:
    from nfhm_pipeline.catalog import DatasetSpec

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation import near_duplicates as nd
from nfhm_pipeline.evaluation.splits import (
    SplitResult,
    check_split,
    check_split_result,
    leakage_warnings,
    make_split,
    split_identity,
)
from nfhm_pipeline.stages.base import (
    CheckOutcome, CheckSpec, Device, Log, Paths, StageResult, markdown_table, quiet, read_manifest,
)

CHECKS = (
    CheckSpec("stratified_as_declared", "Every class in test is in train; no leakage unit straddles train and "
              "test; the realised test fraction is within the split's stated tolerance.", blocking=True),
    CheckSpec("no_cross_split_near_duplicates", "No test image has a near-duplicate (perceptual hash) in train."),
)


def describe(dataset) -> str:
    group_by = getattr(dataset.split, "group_by", None)
    how = f"grouped by {group_by!r}" if group_by else f"stratified by {dataset.finest_label!r}"
    return (f"Train/test split {how} (seed {dataset.split.seed}), {dataset.split.folds} CV folds over train; "
            f"one split for every model so comparisons are paired.")


NEAR_DUPLICATE_REASON = "near_duplicate_of_train"
_UNIT = "__leakage_unit"


@dataclass(frozen=True)
class SplitTables:
    """A dataset's split and the warehouse rows that record it.

    ``drawn`` is the split as drawn (its fraction is what the split promised); ``result`` is the
    split as used, after near-duplicate test images were dropped (``split.near_duplicates: drop``).
    """

    result: SplitResult
    drawn: SplitResult
    split_id: str
    splits: pd.DataFrame
    exclusions: pd.DataFrame
    summary: pd.DataFrame
    near_duplicates: pd.DataFrame
    near_duplicates_checked: bool
    near_duplicates_note: str

    @property
    def cross_split_pairs_left(self) -> int:
        """Near-duplicate pairs with one image in train and the other in test of the split as used."""
        nd_rows = self.near_duplicates
        return int(((nd_rows["split_a"] != nd_rows["split_b"]) & (nd_rows["action"] == "kept")).sum())


def split_frames(spec: DatasetSpec, manifest: pd.DataFrame) -> SplitTables:
    """The split of a manifest and the rows of every table it writes."""
    settings = spec.split
    group_by = getattr(settings, "group_by", None)
    action = getattr(settings, "near_duplicates", "keep")
    max_distance = int(getattr(settings, "near_duplicate_distance", 4))
    has_official = "official_split" in manifest and manifest["official_split"].notna().any()
    unit_column = _leakage_column(spec, manifest, group_by)
    phash = _phash(manifest)

    columns = ["image_id", spec.finest_label] + (["official_split"] if has_official else [])
    frame = manifest[columns].copy()
    group_column = None
    if unit_column:
        frame[_UNIT] = manifest[unit_column].astype(str).to_numpy()
        group_column = _UNIT
    notes: list[str] = []
    grouped_pairs = pd.DataFrame(columns=["image_id_a", "image_id_b", "distance"])
    if action == "group" and phash is not None and not has_official:
        units = pd.Series(frame[_UNIT].to_numpy() if unit_column else frame["image_id"].to_numpy(),
                          index=frame["image_id"].to_numpy())
        pairs = nd.all_pairs(frame["image_id"], frame["image_id"].map(phash), max_distance)
        # Pairs inside one unit change nothing; the others join two units into one.
        grouped_pairs = pairs[units.reindex(pairs["image_id_a"]).to_numpy()
                              != units.reindex(pairs["image_id_b"]).to_numpy()].reset_index(drop=True)
        if len(grouped_pairs):
            merged = nd.merge_units(units, grouped_pairs)
            frame[_UNIT] = merged.reindex(frame["image_id"]).to_numpy()
            group_column = _UNIT
            notes.append(f"{len(grouped_pairs)} near-duplicate pair(s) (perceptual-hash distance <= {max_distance}) "
                         f"joined {units.nunique() - merged.nunique()} leakage unit(s) into others, so each "
                         f"copy sits on the side of its original (split.near_duplicates: group).")
    elif action == "group" and has_official:
        notes.append("split.near_duplicates: group cannot regroup the dataset's official split; "
                     "its cross-split near-duplicates are listed and kept.")

    drawn = make_split(
        frame, label_column=spec.finest_label, test_fraction=settings.test_fraction, seed=settings.seed,
        n_folds=settings.folds, group_column=group_column,
        official_split_column="official_split" if has_official else None,
        max_group_share=float(getattr(settings, "max_group_share", 0.5)),
    )
    result = drawn
    cross = (nd.cross_split_pairs(drawn.assignments, phash, max_distance) if phash is not None
             else pd.DataFrame(columns=nd.PAIR_COLUMNS))
    if len(cross) and action == "drop":
        copies = cross["image_id_b"].unique()
        result = drawn.without(copies, NEAR_DUPLICATE_REASON)
        cross = cross.assign(action="dropped_test_image")
        notes.append(f"{len(copies)} test image(s) with a near-duplicate in train (perceptual-hash distance "
                     f"<= {max_distance}) were left out of the split (split_exclusions reason "
                     f"{NEAR_DUPLICATE_REASON!r}).")
    elif len(cross):
        cross = cross.assign(action="kept")
        n_test = cross["image_id_b"].nunique()
        example = cross.iloc[0]
        notes.append(f"{n_test} test image(s) have a near-duplicate in train (perceptual-hash distance <= "
                     f"{max_distance}; e.g. test {example['image_id_b'][:12]} ~ train {example['image_id_a'][:12]}, "
                     f"{int(example['distance'])} bits): their nearest neighbour may be their own copy. "
                     f"See table near_duplicates; set split.near_duplicates: drop or group to act on them.")
    if phash is None and action != "keep":
        notes.append(f"split.near_duplicates: {action} had no effect: the manifest has no phash column "
                     f"(re-materialize {spec.name}/image_manifest to compute it).")
    if spec.group and "group" in manifest:
        notes += leakage_warnings(
            manifest, spec.finest_label, "group", used_as_leakage_unit=unit_column == "group" or group_by == spec.group,
            assignments=result.assignments, leakage_column="split_group" if unit_column == "split_group" else None,
            group_label=spec.group,
        )
    result = result.with_warnings(notes)
    split_id = split_identity(result.assignments, settings.seed)

    side = result.assignments.set_index("image_id")["split"]
    grouped_rows = grouped_pairs.assign(split_a=grouped_pairs["image_id_a"].map(side),
                                        split_b=grouped_pairs["image_id_b"].map(side), action="grouped")
    near = pd.concat([df for df in (grouped_rows, cross) if len(df)] or [pd.DataFrame(columns=nd.PAIR_COLUMNS)],
                     ignore_index=True)
    near = near.assign(dataset=spec.name)[["dataset", *nd.PAIR_COLUMNS, "action"]] if len(near) else \
        pd.DataFrame(columns=["dataset", *nd.PAIR_COLUMNS, "action"])

    by_id = manifest.set_index("image_id")
    a = result.assignments
    splits = pd.DataFrame({
        "dataset": spec.name, "image_id": a["image_id"], "split": a["split"],
        "fold": a["fold"].astype("Int32"), "label": by_id.loc[a["image_id"], spec.finest_label].to_numpy(),
        "grp": by_id.loc[a["image_id"], "group"].to_numpy(),
        "split_group": by_id.loc[a["image_id"], unit_column].to_numpy() if unit_column else None,
        "split_id": split_id,
    })
    d = result.dropped
    exclusions = pd.DataFrame({"dataset": spec.name, "image_id": d["image_id"], "label": d["label"], "reason": d["reason"]})
    s = result.summary()
    summary = pd.DataFrame([{
        "dataset": spec.name, "split_id": split_id, "mode": s["mode"], "seed": s["seed"],
        "requested_test_fraction": s["requested_test_fraction"], "realised_test_fraction": s["realised_test_fraction"],
        "n_train": s["n_train"], "n_test": s["n_test"], "n_groups_train": s["n_groups_train"],
        "n_groups_test": s["n_groups_test"], "largest_group_share": s["largest_group_share"],
        "n_near_duplicate_pairs": len(near), "warnings": "\n".join(s["warnings"]) or None,
    }]).astype({"n_groups_train": "Int64", "n_groups_test": "Int64", "largest_group_share": "Float64"})
    note = "" if phash is not None else "not checked: the manifest has no phash column (re-materialize image_manifest)"
    return SplitTables(result=result, drawn=drawn, split_id=split_id, splits=splits, exclusions=exclusions,
                       summary=summary, near_duplicates=near, near_duplicates_checked=phash is not None,
                       near_duplicates_note=note)


def _leakage_column(spec: DatasetSpec, manifest: pd.DataFrame, group_by: str | None) -> str | None:
    """The manifest column holding the leakage unit, or None when the split is not grouped."""
    if group_by is None:
        return None
    if "split_group" in manifest and manifest["split_group"].notna().any():
        column = "split_group"
    elif group_by == spec.group and "group" in manifest and manifest["group"].notna().any():
        column = "group"  # a manifest written before split_group existed
    else:
        raise EvaluationError(
            f"Dataset {spec.name!r} declares split.group_by: {group_by}, but its manifest has no leakage-unit "
            f"values (column 'split_group'); re-materialize {spec.name}/image_manifest."
        )
    missing = manifest[column].isna()
    if missing.any():
        raise EvaluationError(
            f"{int(missing.sum())} image(s) of dataset {spec.name!r} have no value in the leakage-unit column "
            f"{group_by!r} (split.group_by), e.g. {manifest.loc[missing, 'uri'].iloc[0] if 'uri' in manifest else ''}; "
            f"fill it in the source, or drop those rows, so that every image belongs to one unit."
        )
    return column


def _phash(manifest: pd.DataFrame) -> pd.Series | None:
    """image_id → perceptual hash, or None when the manifest has none (then nothing is checked)."""
    if "phash" not in manifest or not manifest["phash"].notna().any():
        return None
    return manifest.set_index("image_id")["phash"].dropna()


def run(dataset, model=None, paths: Paths | None = None, device: Device | None = None, *,
        run_id: str | None = None, log: Log = quiet) -> StageResult:
    from nfhm_pipeline.store import warehouse

    manifest = read_manifest(paths, dataset.name)
    tables = split_frames(dataset, manifest)
    warehouse.replace_many(paths.warehouse, [
        ("splits", tables.splits, {"dataset": dataset.name}),
        ("split_exclusions", tables.exclusions, {"dataset": dataset.name}),
        ("split_summary", tables.summary, {"dataset": dataset.name}),
        ("near_duplicates", tables.near_duplicates, {"dataset": dataset.name}),
    ], log_wait=log)
    labels = manifest.set_index("image_id")[dataset.finest_label]
    # The fraction is what the drawn split promised; dropping near-duplicates afterwards only
    # removes test images, which cannot make a class or a unit straddle.
    problems = list(dict.fromkeys(check_split_result(tables.drawn, labels)
                                  + check_split(tables.result.assignments, labels)))
    result = tables.result
    near = tables.near_duplicates
    left = tables.cross_split_pairs_left
    note = {"note": tables.near_duplicates_note} if tables.near_duplicates_note else {}
    return StageResult(
        metadata={"dagster/row_count": len(tables.splits), **result.summary(), "split_id": tables.split_id,
                  "n_near_duplicate_pairs": len(near),
                  "near_duplicates_action": getattr(dataset.split, "near_duplicates", "keep"),
                  "near_duplicates_checked": tables.near_duplicates_checked,
                  **({"near_duplicates_note": tables.near_duplicates_note} if tables.near_duplicates_note else {}),
                  "excluded_classes": sorted(tables.exclusions["label"].astype(str).unique().tolist())[:50]},
        checks=[
            CheckOutcome("stratified_as_declared", not problems, {"problems": problems or ["none"]}),
            CheckOutcome("no_cross_split_near_duplicates", left == 0, {
                "cross_split_pairs": left, "pairs_listed": len(near), "checked": tables.near_duplicates_checked,
                "examples": markdown_table(near.drop(columns=["dataset"]).assign(
                    image_id_a=near["image_id_a"].str[:12], image_id_b=near["image_id_b"].str[:12]), 10),
                **note}, warn_only=True),
        ],
    )
