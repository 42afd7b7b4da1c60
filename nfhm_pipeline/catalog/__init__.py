"""Typed catalog of datasets and models, loaded from YAML.

A catalog is one YAML file with two mappings, ``datasets`` and ``models``. The
file is chosen by ``NFHM_CATALOG``: a name of a file shipped in this folder
(``demo``, ``shared``, ``vlm4bio``, ``medical``) or a path to any YAML file.
Every validation error names the file, the entry and the field.

Paths inside a catalog may use ``${VAR}`` / ``${VAR:-default}``; relative paths
are resolved against the catalog file's folder, except ``generated`` sources,
which live under ``NFHM_DATA_DIR``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nfhm_pipeline.errors import CatalogError

CATALOG_DIR = Path(__file__).resolve().parent
SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Readers and the fields each one takes (beyond the common dataset fields).
READERS: dict[str, set[str]] = {
    "demo_shapes": {"images_per_species", "size", "seed"},
    "sklearn_digits": set(),
    "vlm4bio_csv": {"csv", "image_root", "taxa", "taxa_column"},
    "label_csv": {"csv", "path_column", "image_root", "group_column", "split_column"},
    "image_folder": {"root"},
    "medmnist_npz": {"npz", "class_names"},
    "chexpert_csv": {"csv", "path_column", "image_root", "findings"},
}
_PREPROCESS_KEYS = {"image_size", "resize", "resize_size", "interpolation", "mean", "std"}
# Keys each loader reads (nfhm_pipeline/embedders/*: each loader module documents them).
LOADER_KEYS: dict[str, set[str]] = {
    "raw_pixels": {"image_size", "resize", "interpolation"},
    "open_clip": {"model", "base", "pretrained", "weights", "state_dict", "seed"},
    "transformers": {"model", "weights", "revision", "pooling", "trust_remote_code"},
    "torchvision": {"model", "pretrained", "weights", "num_classes"} | _PREPROCESS_KEYS,
    "timm": {"model", "pretrained", "weights", "num_classes"} | _PREPROCESS_KEYS,
}
LOADERS = set(LOADER_KEYS)
UNCERTAIN_POLICIES = {"ignore", "positive", "negative"}
PROMPT_SETS = {"generic", "biology", "medical", "digits"}  # nfhm_pipeline.stages.prompts.TEMPLATE_SETS
_DATASET_FIELDS = {"reader", "labels", "group", "split", "prompts", "description",
                   "uncertain_policy", "models", "umap"}
DEFAULT_UMAP = {"n_neighbors": [5, 15, 50], "min_dist": [0.1, 0.5], "max_points": 3000}
_MODEL_FIELDS = {"loader", "description", "build"}


@dataclass(frozen=True)
class SplitSettings:
    test_fraction: float = 0.2
    seed: int = 0
    folds: int = 5
    # True: images sharing the dataset's group value (a slide, a video, a patient) never straddle
    # train and test. False: the group column is only used to report metrics per group (taxa).
    grouped: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """One labeled image collection.

    ``labels`` is the label hierarchy, finest level first (species, genus, family);
    the first level is what splits are stratified by.
    """

    name: str
    reader: str
    params: dict[str, Any]
    labels: tuple[str, ...]
    group: str | None = None
    split: SplitSettings = SplitSettings()
    prompts: str = "generic"
    description: str = ""
    multilabel: bool = False
    uncertain_policy: str = "ignore"
    models: tuple[str, ...] | None = None  # None: every model of the catalog
    umap: dict = field(default_factory=lambda: dict(DEFAULT_UMAP))  # grid of the embedding maps

    @property
    def finest_label(self) -> str:
        return self.labels[0]


@dataclass(frozen=True)
class ModelSpec:
    """One embedding model. ``key`` is the partition key (a slug); ``params`` go to the loader."""

    key: str
    loader: str
    params: dict[str, Any]
    description: str = ""
    build: str | None = None  # how the project builds the weights itself (offline demo models)

    def loader_spec(self) -> dict[str, Any]:
        return {"loader": self.loader, **self.params}


@dataclass(frozen=True)
class Catalog:
    name: str
    path: Path
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    models: dict[str, ModelSpec] = field(default_factory=dict)

    def models_for(self, dataset: str) -> list[ModelSpec]:
        spec = self.datasets[dataset]
        keys = spec.models if spec.models is not None else tuple(self.models)
        return [self.models[k] for k in keys]

    @property
    def model_keys(self) -> list[str]:
        return list(self.models)


def available_catalogs() -> list[str]:
    return sorted(p.stem for p in CATALOG_DIR.glob("*.yaml"))


def resolve_catalog_path(name_or_path: str | os.PathLike | None = None) -> Path:
    """``None`` → ``NFHM_CATALOG`` (default ``demo``); a bare name → the shipped file."""
    value = str(name_or_path or os.environ.get("NFHM_CATALOG") or "demo")
    candidate = Path(value).expanduser()
    if candidate.suffix in {".yaml", ".yml"} or candidate.exists():
        if not candidate.is_file():
            raise CatalogError(f"catalog file {candidate} does not exist")
        return candidate.resolve()
    shipped = CATALOG_DIR / f"{value}.yaml"
    if not shipped.is_file():
        raise CatalogError(
            f"unknown catalog {value!r}: set NFHM_CATALOG to one of {available_catalogs()} "
            "or to the path of a YAML file"
        )
    return shipped


def load_catalog(name_or_path: str | os.PathLike | None = None) -> Catalog:
    path = resolve_catalog_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise CatalogError(f"catalog {path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise CatalogError(f"catalog {path}: not UTF-8 text; re-save it as UTF-8") from None
    return parse_catalog(raw, path)


def parse_catalog(raw: Any, path: Path) -> Catalog:
    where = f"catalog {path}"
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: top level must be a mapping with 'datasets' and 'models'")
    unknown = set(raw) - {"datasets", "models", "description"}
    if unknown:
        raise CatalogError(f"{where}: unknown top-level field(s) {sorted(unknown)}; expected datasets, models")
    models_raw = _mapping(raw.get("models"), f"{where}: field 'models'")
    datasets_raw = _mapping(raw.get("datasets"), f"{where}: field 'datasets'")
    models = {key: _parse_model(key, entry, path) for key, entry in models_raw.items()}
    datasets = {name: _parse_dataset(name, entry, path, models) for name, entry in datasets_raw.items()}
    return Catalog(name=path.stem, path=path, datasets=datasets, models=models)


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise CatalogError(f"{where} must be a non-empty mapping of name → entry")
    return value


def _check_slug(key: Any, where: str) -> str:
    if not isinstance(key, str) or not SLUG.fullmatch(key):
        raise CatalogError(
            f"{where}: name {key!r} is not a slug ([a-z0-9._-], starting with a letter or digit); "
            "it becomes a partition key and a folder name. Put a hub id such as "
            "'hf-hub:org/repo' in the entry's 'model' field instead"
        )
    return key


def _parse_model(key: Any, entry: Any, path: Path) -> ModelSpec:
    where = f"catalog {path}: model {key!r}"
    _check_slug(key, where)
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: entry must be a mapping with at least 'loader'")
    loader = entry.get("loader")
    if loader not in LOADERS:
        raise CatalogError(f"{where}: field 'loader' is {loader!r}; expected one of {sorted(LOADERS)}")
    unknown = set(entry) - _MODEL_FIELDS - {"loader"} - LOADER_KEYS[loader]
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {sorted(unknown)} for loader {loader!r}; "
                           f"allowed: {sorted(LOADER_KEYS[loader] | _MODEL_FIELDS)}")
    build = entry.get("build")
    # Weights the project builds itself live under NFHM_DATA_DIR: keep their paths relative.
    params = {k: (v if build else _expand_paths(k, v, path))
              for k, v in entry.items() if k not in _MODEL_FIELDS}
    if build is not None and build != "tiny_openclip":
        raise CatalogError(f"{where}: field 'build' is {build!r}; the only builder is 'tiny_openclip'")
    return ModelSpec(key=key, loader=loader, params=params,
                     description=str(entry.get("description", "")), build=build)


def _parse_dataset(name: Any, entry: Any, path: Path, models: dict[str, ModelSpec]) -> DatasetSpec:
    where = f"catalog {path}: dataset {name!r}"
    _check_slug(name, where)
    if "-" in name or "." in name:
        raise CatalogError(f"{where}: dataset names become asset-key prefixes; use [a-z0-9_] only")
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: entry must be a mapping with at least 'reader' and 'labels'")
    reader = entry.get("reader")
    if reader not in READERS:
        raise CatalogError(f"{where}: field 'reader' is {reader!r}; expected one of {sorted(READERS)}")
    unknown = set(entry) - _DATASET_FIELDS - READERS[reader]
    if unknown:
        raise CatalogError(
            f"{where}: unknown field(s) {sorted(unknown)} for reader {reader!r}; "
            f"allowed: {sorted(_DATASET_FIELDS | READERS[reader])}"
        )
    labels = entry.get("labels")
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise CatalogError(f"{where}: field 'labels' must be a non-empty list of label column names, finest first")
    if len(set(labels)) != len(labels):
        raise CatalogError(f"{where}: field 'labels' lists a column twice: {labels}")
    group = entry.get("group")
    if group is not None and not isinstance(group, str):
        raise CatalogError(f"{where}: field 'group' must be a column name")
    split = _parse_split(entry.get("split") or {}, where)
    if split.grouped and not group:
        raise CatalogError(f"{where}: field 'split.grouped' is true but the dataset declares no 'group' column")
    prompts = entry.get("prompts", "generic")
    if prompts not in PROMPT_SETS:
        raise CatalogError(f"{where}: field 'prompts' is {prompts!r}; expected one of {sorted(PROMPT_SETS)}")
    policy = entry.get("uncertain_policy", "ignore")
    if policy not in UNCERTAIN_POLICIES:
        raise CatalogError(f"{where}: field 'uncertain_policy' is {policy!r}; expected one of {sorted(UNCERTAIN_POLICIES)}")
    model_keys = entry.get("models")
    if model_keys is not None:
        if not isinstance(model_keys, list) or not model_keys:
            raise CatalogError(f"{where}: field 'models' must be a non-empty list of model names")
        missing = [m for m in model_keys if m not in models]
        if missing:
            raise CatalogError(f"{where}: field 'models' names unknown model(s) {missing}; known: {sorted(models)}")
        model_keys = tuple(model_keys)
    params = {k: _expand_paths(k, v, path) for k, v in entry.items() if k in READERS[reader]}
    return DatasetSpec(
        name=name, reader=reader, params=params, labels=tuple(labels), group=group, split=split,
        prompts=str(entry.get("prompts", "generic")), description=str(entry.get("description", "")),
        multilabel=reader == "chexpert_csv", uncertain_policy=policy, models=model_keys,
        umap=_parse_umap(entry.get("umap") or {}, where),
    )


def _parse_umap(raw: Any, where: str) -> dict:
    if not isinstance(raw, dict) or set(raw) - set(DEFAULT_UMAP):
        raise CatalogError(f"{where}: field 'umap' must be a mapping with keys {sorted(DEFAULT_UMAP)}")
    grid = {**DEFAULT_UMAP, **raw}
    for key in ("n_neighbors", "min_dist"):
        values = grid[key]
        if not isinstance(values, list) or not values or not all(isinstance(v, (int, float)) for v in values):
            raise CatalogError(f"{where}: field 'umap.{key}' must be a non-empty list of numbers")
    if not all(isinstance(v, int) and v >= 2 for v in grid["n_neighbors"]):
        raise CatalogError(f"{where}: field 'umap.n_neighbors' values must be integers ≥ 2")
    if not isinstance(grid["max_points"], int) or grid["max_points"] < 10:
        raise CatalogError(f"{where}: field 'umap.max_points' must be an integer ≥ 10")
    return grid


def _parse_split(raw: Any, where: str) -> SplitSettings:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: field 'split' must be a mapping (test_fraction, seed, folds)")
    unknown = set(raw) - {"test_fraction", "seed", "folds", "grouped"}
    if unknown:
        raise CatalogError(f"{where}: field 'split' has unknown key(s) {sorted(unknown)}")
    frac = raw.get("test_fraction", 0.2)
    if not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise CatalogError(f"{where}: field 'split.test_fraction' must be a number between 0 and 1, got {frac!r}")
    seed = raw.get("seed", 0)
    folds = raw.get("folds", 5)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CatalogError(f"{where}: field 'split.seed' must be an integer, got {seed!r}")
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise CatalogError(f"{where}: field 'split.folds' must be an integer ≥ 2, got {folds!r}")
    grouped = raw.get("grouped", False)
    if not isinstance(grouped, bool):
        raise CatalogError(f"{where}: field 'split.grouped' must be true or false, got {grouped!r}")
    return SplitSettings(test_fraction=float(frac), seed=seed, folds=folds, grouped=grouped)


_PATH_FIELDS = {"csv", "image_root", "root", "npz", "weights", "state_dict", "pretrained"}


def _expand_paths(key: str, value: Any, catalog_path: Path) -> Any:
    """Expand ``${VAR:-default}`` in path fields and anchor relative paths at the catalog's folder."""
    if key not in _PATH_FIELDS or not isinstance(value, str) or value.startswith("hf-hub:"):
        return value
    expanded = _ENV_REF.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if key == "pretrained" and not (expanded.startswith((".", "/", "~", "$")) or expanded.endswith(
            (".pt", ".bin", ".safetensors", ".pth"))):
        return expanded  # an open_clip pretrained *tag* such as 'laion2b_s34b_b79k'
    p = Path(expanded).expanduser()
    if not p.is_absolute():
        p = (catalog_path.parent / p).resolve()
    return str(p)
