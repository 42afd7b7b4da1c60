"""Typed catalog of datasets and models, loaded from YAML.

A catalog is one YAML file with two mappings, ``datasets`` and ``models``. The
file is chosen by ``NFHM_CATALOG``: a name of a file shipped in this folder
(``demo``, ``shared``, ``vlm4bio``, ``medical``) or a path to any YAML file.
Every validation error names the file, the entry and the field.

Paths inside a catalog may use ``${VAR}`` / ``${VAR:-default}``; relative paths
are resolved against the catalog file's folder, except ``generated`` sources,
which live under ``NFHM_DATA_DIR``.

A dataset entry has the common fields ``reader``, ``labels`` (finest level first), ``group``,
``split``, ``prompts``, ``description``, ``uncertain_policy``, ``models``, ``umap``, ``seed``,
``resamples``, ``resample_by`` (what one bootstrap draw takes: ``image``, or the ``group`` /
``split.group_by`` column; default: the leakage unit of a grouped split, else an image) and
``probe_max_train`` (an integer ≥ 10; default none: the linear probes fit every train image, seed
001's protocol; with more train images than that, they are fitted, CV and refit, on a stratified
subsample of that many drawn with ``seed``, test images untouched); ``umap`` is
``{grid: default|seed}`` (seed 001's 10 × 5) or explicit ``n_neighbors`` / ``min_dist`` lists, plus
``max_points``,
plus the fields of its reader (``nfhm_pipeline.ingest.registry.READERS``: which are required,
which are paths, how many label levels the reader supplies, whether ``group`` and
``split.group_by`` can be read from its source).

Two seeds, two jobs:

- ``split.seed`` (default 0) seeds only the train/test split and its CV folds;
- ``seed`` (an integer ≥ 0, default ``split.seed``) seeds what comes after the split: linear and
  multi-label probes, alignment heads, the UMAP maps and the bootstrap resamples behind every
  interval (``resamples``, default 1000, at least 100). For ``demo_shapes`` it also seeds the
  generated collection (which uses 0 when ``seed`` is not given).

Names the manifest defines itself (``RESERVED_COLUMNS``: uri, image_id, width, height, mode,
phash, group, split_group, official_split, …) are refused as ``labels``, ``group``,
``split.group_by`` and ``findings`` entries; multi-label ``findings`` are checked at load.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nfhm_pipeline.embedders.loaders import LOADERS
from nfhm_pipeline.errors import CatalogError
from nfhm_pipeline.evaluation.prompts import TEMPLATE_SETS
from nfhm_pipeline.ingest.registry import READERS

CATALOG_DIR = Path(__file__).resolve().parent
SLUG = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
MAX_NAME_LENGTH = 64  # names become partition keys, asset-key parts and file names (errno 36 past 255 bytes)
MAX_CATALOG_BYTES = 1_000_000
MAX_YAML_DEPTH = 32  # a catalog is a few levels deep; 5000-deep lists only exhaust the stack
# Columns the manifest itself defines: a label level or group of the same name would collide with them.
RESERVED_COLUMNS = frozenset({"image_id", "uri", "width", "height", "mode", "group", "split_group",
                              "official_split", "source_row", "reject_reason", "phash", "split", "fold",
                              "dataset", "grp"})
CSV_DELIMITERS = {",": ",", ";": ";", "\\t": "\t", "\t": "\t", "tab": "\t", "|": "|"}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# Readers (their fields, label levels, group support, path fields, sensor fingerprint) are declared
# once, in nfhm_pipeline.ingest.registry.READERS; the catalog keeps no list of its own.
NEAR_DUPLICATE_ACTIONS = ("keep", "drop", "group")
# Loader kinds and the keys each reads are declared once, in nfhm_pipeline.embedders.loaders.LOADERS.
UNCERTAIN_POLICIES = {"ignore", "positive", "negative"}
PROMPT_SETS = tuple(TEMPLATE_SETS)  # declared once, with their templates, in evaluation/prompts.py
_DATASET_FIELDS = {"reader", "labels", "group", "split", "prompts", "description",
                   "uncertain_policy", "models", "umap", "seed", "resamples", "resample_by",
                   "probe_max_train"}
_SPLIT_FIELDS = {"test_fraction", "seed", "folds", "grouped", "group_by", "max_group_share",
                 "near_duplicates", "near_duplicate_distance"}
# The maps' grid: a named one (nfhm_pipeline.reports.maps.GRIDS: "default" 3 x 2, "seed" = seed 001's
# 10 x 5) or explicit lists (then "grid" reads "custom"); these values are GRIDS["default"].
DEFAULT_UMAP = {"grid": "default", "n_neighbors": [5, 15, 50], "min_dist": [0.1, 0.5], "max_points": 3000}
_MODEL_FIELDS = {"loader", "description", "build", "cache", "jpeg_draft"}
_TOP_LEVEL_FIELDS = {"datasets", "models", "description", "include_models"}


@dataclass(frozen=True)
class SplitSettings:
    test_fraction: float = 0.2
    seed: int = 0
    folds: int = 5
    # The leakage unit: a column (video, patient, specimen, slide) whose images never straddle train
    # and test. Distinct from the dataset's `group`, which only chooses subsets to report metrics on.
    group_by: str | None = None
    # No single leakage unit above this share of a class's test images, where the data allow it.
    max_group_share: float = 0.5
    # Cross-split near-duplicates (perceptual hash within `near_duplicate_distance` bits):
    # keep (report only), drop (the test-side copy leaves the split) or group (one leakage unit).
    near_duplicates: str = "keep"
    near_duplicate_distance: int = 4

    @property
    def grouped(self) -> bool:
        """True when the split keeps leakage units on one side (the old ``split.grouped`` flag)."""
        return self.group_by is not None


@dataclass(frozen=True)
class DatasetSpec:
    """One labeled image collection.

    ``labels`` is the label hierarchy, finest level first (species, genus, family);
    the first level is what splits are stratified by. ``findings`` (multi-label readers) are the
    finding columns; ``seed`` seeds probes, alignment heads and UMAP (``split.seed`` only the split).
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
    # Multi-label readers: the finding columns, validated at load (default: the reader's own list,
    # CheXpert's 14 findings). () for single-label datasets.
    findings: tuple[str, ...] = ()
    # Seed of everything random after the split: probes, alignment heads, UMAP, bootstrap. None → split.seed.
    seed: int | None = None
    # Bootstrap resamples behind every metric's 95 % interval and every paired model comparison.
    resamples: int = 1000
    # What one bootstrap draw takes: None → the split's leakage unit when it is grouped, else one
    # image; "image" → one image even in a grouped split; the `group` or `split.group_by` column →
    # all images sharing its value (images without one are their own unit).
    resample_by: str | None = None
    # Linear probes on a stratified subsample of at most this many train images (CV folds and the
    # refit; test images never), drawn with ``seed``. None: every train image (seed 001's protocol).
    probe_max_train: int | None = None

    def __post_init__(self):
        if self.multilabel and not self.findings:
            object.__setattr__(self, "findings", READERS[self.reader].default_findings
                               if self.reader in READERS else ())
        object.__setattr__(self, "findings", tuple(self.findings))
        seed = self.split.seed if self.seed is None else self.seed
        object.__setattr__(self, "seed", _check_seed(seed, f"dataset {self.name!r}"))

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
    # Keep decoded pixels in the packed pixel cache (``cache: off``: decode every run; for
    # collections whose cache would not fit the disk, NFHM_PIXEL_CACHE_MAX_GB bounds it instead).
    pixel_cache: bool = True
    # Decode large JPEGs at reduced size (DCT scaling, within embedders.preprocess.DRAFT_TOLERANCE
    # of the exact pixels); its own pixel key and fingerprint, so never mixed with exact pixels.
    jpeg_draft: bool = False

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


class _CatalogLoader(yaml.SafeLoader):
    """YAML that cannot surprise: a key given twice, an alias (``*ref``: nested aliases expand
    exponentially, the "billion laughs") or absurd nesting is refused instead of silently accepted."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise CatalogError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                               "allowed in a catalog; write the value out")
        self._nfhm_depth = getattr(self, "_nfhm_depth", 0) + 1
        try:
            if self._nfhm_depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise CatalogError(f"line {mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep; "
                                   "a catalog needs only a few")
            return super().compose_node(parent, index)
        finally:
            self._nfhm_depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise CatalogError(f"line {key_node.start_mark.line + 1}: a mapping key must be a name, "
                                   f"not {type(key).__name__}") from None
            if key in seen:
                raise CatalogError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice (first on "
                                   f"line {seen[key]}); YAML would silently keep only the last one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_catalog_yaml(path: Path) -> Any:
    """The parsed YAML of a catalog file, with every refusal naming the file."""
    try:
        size = path.stat().st_size
        if size > MAX_CATALOG_BYTES:
            raise CatalogError(f"catalog {path}: {size} bytes; a catalog is at most {MAX_CATALOG_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
        return yaml.load(text, Loader=_CatalogLoader)  # noqa: S506 - a SafeLoader subclass
    except CatalogError as exc:
        raise CatalogError(f"catalog {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise CatalogError(f"catalog {path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise CatalogError(f"catalog {path}: not UTF-8 text; re-save it as UTF-8") from None
    except RecursionError:
        raise CatalogError(f"catalog {path}: nested too deeply to read") from None
    except OSError as exc:
        raise CatalogError(f"catalog {path}: cannot be read: {exc.strerror}") from None


def load_catalog(name_or_path: str | os.PathLike | None = None) -> Catalog:
    path = resolve_catalog_path(name_or_path)
    return parse_catalog(read_catalog_yaml(path), path)


def parse_catalog(raw: Any, path: Path, *, _including: tuple[Path, ...] = ()) -> Catalog:
    where = f"catalog {path}"
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: top level must be a mapping with 'datasets' and 'models'")
    unknown = set(raw) - _TOP_LEVEL_FIELDS
    if unknown:
        raise CatalogError(f"{where}: unknown top-level field(s) {_names(unknown)}; "
                           f"expected {sorted(_TOP_LEVEL_FIELDS)}")
    _text(raw.get("description", ""), f"{where}: field 'description'")
    included = _included_models(raw.get("include_models"), path, _including)
    models_raw = raw.get("models") or {}
    if not isinstance(models_raw, dict) or not (models_raw or included):
        raise CatalogError(f"{where}: field 'models' must be a non-empty mapping of name → entry "
                           "(or give 'include_models')")
    datasets_raw = _mapping(raw.get("datasets"), f"{where}: field 'datasets'")
    models = dict(included)
    for key, entry in models_raw.items():
        models[key] = _parse_model_entry(key, entry, path, _including)
    datasets = {name: _parse_dataset(name, entry, path, models) for name, entry in datasets_raw.items()}
    return Catalog(name=path.stem, path=path, datasets=datasets, models=models)


def _included_models(value: Any, path: Path, including: tuple[Path, ...]) -> dict[str, "ModelSpec"]:
    """``include_models: [shared, ./other.yaml]``: every model of those catalogs, with their paths
    resolved against THEIR folder (so a shipped catalog's weights path works from anywhere)."""
    if value is None:
        return {}
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise CatalogError(f"catalog {path}: field 'include_models' must be a catalog name or a list of them")
    models: dict[str, ModelSpec] = {}
    for name in names:
        models.update(_other_catalog(name, path, including).models)
    return models


def _other_catalog(name: str, path: Path, including: tuple[Path, ...]) -> "Catalog":
    target = name if name in available_catalogs() else str((path.parent / name).resolve())
    other = resolve_catalog_path(target)
    if other == path or other in including:
        raise CatalogError(f"catalog {path}: including {name!r} would include {path.name} in itself")
    return parse_catalog(read_catalog_yaml(other), other, _including=(*including, path))


def _parse_model_entry(key: Any, entry: Any, path: Path, including: tuple[Path, ...]) -> "ModelSpec":
    """A model entry, or ``{from: <catalog>}``: the entry of the same name in another catalog."""
    if isinstance(entry, dict) and "from" in entry:
        where = f"catalog {path}: model {key!r}"
        source = entry["from"]
        if set(entry) != {"from"} or not isinstance(source, str) or not source:
            raise CatalogError(f"{where}: an entry with 'from' takes only that field, the name of another catalog")
        other = _other_catalog(source, path, including)
        if key not in other.models:
            raise CatalogError(f"{where}: catalog {source!r} has no model {key!r}; it has {sorted(other.models)}")
        return other.models[key]
    return _parse_model(key, entry, path)


def _names(values) -> list[str]:
    return sorted(str(v) for v in values)


def _text(value: Any, where: str, *, limit: int = 10_000) -> str:
    """A free-text field: a string (numbers are accepted as text), of bounded length."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise CatalogError(f"{where} must be text, got {type(value).__name__}")
    text = str(value)
    if len(text) > limit:
        raise CatalogError(f"{where} is {len(text)} characters long; at most {limit}")
    return text


def _scalar_choice(value: Any, choices, where: str) -> Any:
    """``value`` if it is one of ``choices`` (lists and mappings are refused by name, not by TypeError)."""
    if isinstance(value, (list, dict, set)) or value not in choices:
        raise CatalogError(f"{where} is {value!r}; expected one of {sorted(choices)}")
    return value


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict) or not value:
        raise CatalogError(f"{where} must be a non-empty mapping of name → entry")
    return value


def _check_slug(key: Any, where: str) -> str:
    if not isinstance(key, str) or not SLUG.fullmatch(key) or ".." in key:
        raise CatalogError(
            f"{where}: name {key!r} is not a slug ([a-z0-9._-], starting with a letter or digit, no '..'); "
            "it becomes a partition key and a folder name. Put a hub id such as "
            "'hf-hub:org/repo' in the entry's 'model' field instead"
        )
    if len(key) > MAX_NAME_LENGTH:
        raise CatalogError(f"{where}: name is {len(key)} characters long; at most {MAX_NAME_LENGTH} "
                           "(it becomes a folder and file name)")
    return key


def _parse_model(key: Any, entry: Any, path: Path) -> ModelSpec:
    where = f"catalog {path}: model {key!r}"
    _check_slug(key, where)
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: entry must be a mapping with at least 'loader'")
    loader = _scalar_choice(entry.get("loader"), LOADERS, f"{where}: field 'loader'")
    fields = LOADERS[loader].fields
    unknown = set(entry) - _MODEL_FIELDS - {"loader"} - fields
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {_names(unknown)} for loader {loader!r}; "
                           f"allowed: {sorted(fields | _MODEL_FIELDS)}")
    for name, value in entry.items():
        _check_model_value(name, value, f"{where}: field {name!r}")
    build = entry.get("build")
    # Weights the project builds itself live under NFHM_DATA_DIR: keep their paths relative.
    params = {k: (v if build else _expand_paths(k, v, path))
              for k, v in entry.items() if k not in _MODEL_FIELDS}
    if build is not None and build != "tiny_openclip":
        raise CatalogError(f"{where}: field 'build' is {build!r}; the only builder is 'tiny_openclip'")
    # YAML reads a bare on/off as true/false; the quoted words mean the same.
    cache = {"on": True, "off": False}.get(entry.get("cache"), entry.get("cache", True))
    if not isinstance(cache, bool):
        raise CatalogError(f"{where}: field 'cache' must be on or off (keep decoded pixels between runs), "
                           f"got {entry.get('cache')!r}")
    jpeg_draft = entry.get("jpeg_draft", False)
    if not isinstance(jpeg_draft, bool):
        raise CatalogError(f"{where}: field 'jpeg_draft' must be true or false, got {jpeg_draft!r}")
    return ModelSpec(key=key, loader=loader, params=params,
                     description=_text(entry.get("description", ""), f"{where}: field 'description'"), build=build,
                     pixel_cache=cache, jpeg_draft=jpeg_draft)


# Fields whose value is a list of numbers (normalisation constants); every other field is a scalar.
_LIST_FIELDS = {"mean", "std"}
_BOOL_FIELDS = {"trust_remote_code"}


def _check_model_value(name: str, value: Any, where: str) -> None:
    if name in _LIST_FIELDS:
        if not isinstance(value, list) or not value or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise CatalogError(f"{where} must be a list of numbers, one per channel, got {value!r}")
    elif name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise CatalogError(f"{where} must be true or false, got {value!r}")
    elif isinstance(value, (list, dict)) or value is None:
        raise CatalogError(f"{where} must be a single value (text or number), got {type(value).__name__}")


def _parse_dataset(name: Any, entry: Any, path: Path, models: dict[str, ModelSpec]) -> DatasetSpec:
    where = f"catalog {path}: dataset {name!r}"
    _check_slug(name, where)
    if "-" in name or "." in name:
        raise CatalogError(f"{where}: dataset names become asset-key prefixes; use [a-z0-9_] only")
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: entry must be a mapping with at least 'reader' and 'labels'")
    reader = _scalar_choice(entry.get("reader"), READERS, f"{where}: field 'reader'")
    record = READERS[reader]
    unknown = set(entry) - _DATASET_FIELDS - record.fields
    if unknown:
        raise CatalogError(
            f"{where}: unknown field(s) {_names(unknown)} for reader {reader!r}; "
            f"allowed: {sorted(_DATASET_FIELDS | record.fields)}"
        )
    absent = sorted(record.required - set(entry))
    if absent:
        raise CatalogError(f"{where}: reader {reader!r} needs field(s) {absent}; add them to the entry")
    labels = entry.get("labels")
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x.strip() for x in labels):
        raise CatalogError(f"{where}: field 'labels' must be a non-empty list of label column names, finest first")
    if len(set(labels)) != len(labels):
        raise CatalogError(f"{where}: field 'labels' lists a column twice: {labels}")
    for level in labels:
        _check_column_name(level, f"{where}: field 'labels'")
    group = entry.get("group")
    if group is not None:
        if not isinstance(group, str) or not group.strip():
            raise CatalogError(f"{where}: field 'group' must be a column name")
        _check_column_name(group, f"{where}: field 'group'")
        if group in labels:
            raise CatalogError(f"{where}: field 'group' is {group!r}, which is also a label level")
        if not record.group:
            raise CatalogError(f"{where}: field 'group' is set but reader {reader!r} has no per-image column "
                               "to read it from; use label_csv with group_column, or drop 'group'")
    split = _parse_split(entry.get("split") or {}, where, group)
    if split.group_by is not None:
        _check_column_name(split.group_by, f"{where}: field 'split.group_by'")
        if not record.split_group and split.group_by != group:
            readers = sorted(r for r, other in READERS.items() if other.split_group)
            raise CatalogError(f"{where}: field 'split.group_by' needs a per-image column, which reader "
                               f"{reader!r} cannot read; readers with one: {readers}")
    if record.levels is not None and len(labels) > record.levels and "taxonomy" not in entry:
        supplies = f"{record.levels} ({record.levels_from})" if record.levels_from else str(record.levels)
        raise CatalogError(
            f"{where}: field 'labels' lists {len(labels)} levels {labels} but reader {reader!r} supplies only "
            + (f"{supplies}; add 'taxonomy: <csv with columns {', '.join(labels)}>' to look the coarser levels "
               "up, or keep one level" if record.takes_taxonomy else f"{supplies}; keep {record.levels}")
        )
    if "delimiter" in entry:
        _scalar_choice(entry["delimiter"], CSV_DELIMITERS, f"{where}: field 'delimiter'")
    for key in sorted(record.bool_fields & set(entry)):
        if not isinstance(entry[key], bool):
            raise CatalogError(f"{where}: field {key!r} must be true or false")
    prompts = _scalar_choice(entry.get("prompts", "generic"), PROMPT_SETS, f"{where}: field 'prompts'")
    policy = _scalar_choice(entry.get("uncertain_policy", "ignore"), UNCERTAIN_POLICIES,
                            f"{where}: field 'uncertain_policy'")
    model_keys = entry.get("models")
    if model_keys is not None:
        if not isinstance(model_keys, list) or not model_keys or not all(isinstance(m, str) for m in model_keys):
            raise CatalogError(f"{where}: field 'models' must be a non-empty list of model names")
        missing = [m for m in model_keys if m not in models]
        if missing:
            raise CatalogError(f"{where}: field 'models' names unknown model(s) {missing}; known: {sorted(models)}")
        if len(set(model_keys)) != len(model_keys):
            raise CatalogError(f"{where}: field 'models' names a model twice: {model_keys}")
        model_keys = tuple(model_keys)
    for key in sorted((record.fields - record.list_fields) & set(entry)):
        if isinstance(entry[key], (list, dict)):
            raise CatalogError(f"{where}: field {key!r} must be a single value, got {type(entry[key]).__name__}")
    findings = _check_findings(entry.get("findings"), record.default_findings, labels, where)
    seed = _check_seed(entry.get("seed", split.seed), where, "seed" if "seed" in entry else "split.seed")
    resamples = entry.get("resamples", 1000)
    if isinstance(resamples, bool) or not isinstance(resamples, int) or not 100 <= resamples <= 100_000:
        raise CatalogError(f"{where}: field 'resamples' must be a whole number from 100 to 100000 (bootstrap "
                           f"resamples behind every interval), got {resamples!r}")
    resample_by = _check_resample_by(entry.get("resample_by"), group, split, where)
    probe_max_train = _check_probe_max_train(entry.get("probe_max_train"), where)
    params = {k: _expand_paths(k, v, path, record.path_fields) for k, v in entry.items() if k in record.fields}
    return DatasetSpec(
        name=name, reader=reader, params=params, labels=tuple(labels), group=group, split=split,
        prompts=prompts, description=_text(entry.get("description", ""), f"{where}: field 'description'"),
        multilabel=record.multilabel, uncertain_policy=policy, models=model_keys,
        umap=_parse_umap(entry.get("umap") or {}, where), findings=findings, seed=seed,
        resamples=resamples, resample_by=resample_by, probe_max_train=probe_max_train,
    )


def _check_probe_max_train(value: Any, where: str) -> int | None:
    """``probe_max_train``: None (fit every train image) or a whole number of train images ≥ 10."""
    from nfhm_pipeline.evaluation.linear_probe import MIN_PROBE_TRAIN

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_PROBE_TRAIN:
        raise CatalogError(f"{where}: field 'probe_max_train' must be a whole number of train images, at least "
                           f"{MIN_PROBE_TRAIN} (the linear probes fit a stratified subsample of that many when "
                           f"the train split is larger; leave it out to fit every train image), got {value!r}")
    return value


def _check_resample_by(value: Any, group: str | None, split: SplitSettings, where: str) -> str | None:
    """``resample_by`` names what the bootstrap draws: "image", or a per-image column the manifest
    carries (the dataset's ``group`` or the split's ``group_by``)."""
    if value is None:
        return None
    choices = ["image"] + [c for c in dict.fromkeys([split.group_by, group]) if c]
    if not isinstance(value, str) or value not in choices:
        hint = ("" if len(choices) > 1 else "; to resample by a column (patient, video, specimen), declare it as "
                "'group' or 'split.group_by' first")
        raise CatalogError(f"{where}: field 'resample_by' must be one of {choices} (what one bootstrap draw "
                           f"takes), got {value!r}{hint}")
    return value


def _check_column_name(name: str, where: str) -> None:
    """A label level / group names a source column and becomes part of file names and titles: it
    must not collide with the manifest's own columns, nor carry path or control characters."""
    if name in RESERVED_COLUMNS:
        raise CatalogError(f"{where}: {name!r} is a column the manifest itself defines "
                           f"(reserved: {sorted(RESERVED_COLUMNS)}); rename the source column")
    if len(name) > MAX_NAME_LENGTH or any(c in name for c in "/\\") or name.startswith(".") or any(
            ord(c) < 32 for c in name):
        raise CatalogError(f"{where}: {name!r} is not usable as a column name (at most {MAX_NAME_LENGTH} "
                           "characters, no '/', '\\', control characters or leading '.')")


def _check_findings(findings: Any, default: tuple[str, ...], labels: list[str], where: str) -> tuple[str, ...]:
    """The finding columns of a multi-label reader (``findings``, default the reader's own list),
    checked at load rather than at the first run; () for single-label readers."""
    if not default:
        return ()
    if findings is None:
        findings = list(default)
    if not isinstance(findings, list) or not findings or not all(isinstance(f, str) and f.strip() for f in findings):
        raise CatalogError(f"{where}: field 'findings' must be a non-empty list of CSV column names, got {findings!r}")
    if len(set(findings)) != len(findings):
        raise CatalogError(f"{where}: field 'findings' lists a column twice: {findings}")
    clash = sorted(set(findings) & (RESERVED_COLUMNS | set(labels)))
    if clash:
        raise CatalogError(f"{where}: field 'findings' uses reserved manifest column name(s) {clash}; rename the "
                           "CSV column(s) or the dataset's 'labels' entry")
    return tuple(findings)


def _check_seed(seed: Any, where: str, name: str = "seed") -> int:
    """A seed: an integer ≥ 0 (numpy and scikit-learn refuse negative ones; true/false is no seed)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CatalogError(f"{where}: field {name!r} must be an integer ≥ 0, got {seed!r}")
    return seed


def _parse_umap(raw: Any, where: str) -> dict:
    """``umap: {grid: seed}`` (a named grid), ``umap: {n_neighbors: [...], min_dist: [...]}`` (explicit
    lists; an omitted one is the default's), either with ``max_points``; returns every key of DEFAULT_UMAP."""
    from nfhm_pipeline.reports.maps import GRIDS  # named grids are declared once, beside the maps

    if not isinstance(raw, dict) or set(raw) - set(DEFAULT_UMAP):
        raise CatalogError(f"{where}: field 'umap' must be a mapping with keys {sorted(DEFAULT_UMAP)}, "
                           f"e.g. umap: {{grid: seed}} for seed 001's 10 x 5 grid")
    name = raw.get("grid")
    if name is not None:
        if not isinstance(name, str) or name not in GRIDS:
            raise CatalogError(f"{where}: field 'umap.grid' must be one of {sorted(GRIDS)}, got {name!r}")
        if {"n_neighbors", "min_dist"} & set(raw):
            raise CatalogError(f"{where}: field 'umap' gives both 'grid' and 'n_neighbors'/'min_dist'; "
                               "give a named grid or the lists, not both")
        grid = {**DEFAULT_UMAP, **{key: list(values) for key, values in GRIDS[name].items()}, "grid": name}
    else:
        grid = {**DEFAULT_UMAP, **raw, "grid": "custom" if {"n_neighbors", "min_dist"} & set(raw) else "default"}
    grid["max_points"] = raw.get("max_points", DEFAULT_UMAP["max_points"])
    for key in ("n_neighbors", "min_dist"):
        values = grid[key]
        if not isinstance(values, list) or not values or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise CatalogError(f"{where}: field 'umap.{key}' must be a non-empty list of numbers, got {values!r}")
    if not all(isinstance(v, int) and v >= 2 for v in grid["n_neighbors"]):
        raise CatalogError(f"{where}: field 'umap.n_neighbors' values must be integers ≥ 2, "
                           f"got {grid['n_neighbors']!r}")
    if not all(0 <= v <= 1 for v in grid["min_dist"]):  # UMAP's spread is 1: min_dist beyond it is refused
        raise CatalogError(f"{where}: field 'umap.min_dist' values must lie between 0 and 1, got {grid['min_dist']!r}")
    points = grid["max_points"]
    if isinstance(points, bool) or not isinstance(points, int) or points < 10:
        raise CatalogError(f"{where}: field 'umap.max_points' must be an integer ≥ 10, got {points!r}")
    return grid


def _parse_split(raw: Any, where: str, group: str | None = None) -> SplitSettings:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: field 'split' must be a mapping (test_fraction, seed, folds, group_by)")
    unknown = set(raw) - _SPLIT_FIELDS
    if unknown:
        raise CatalogError(f"{where}: field 'split' has unknown key(s) {_names(unknown)}; "
                           f"allowed: {sorted(_SPLIT_FIELDS)}")
    frac = raw.get("test_fraction", 0.2)
    if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1:
        raise CatalogError(f"{where}: field 'split.test_fraction' must be a number between 0 and 1, got {frac!r}")
    seed = raw.get("seed", 0)
    folds = raw.get("folds", 5)
    _check_seed(seed, where, "split.seed")
    if not isinstance(folds, int) or isinstance(folds, bool) or not 2 <= folds <= 100:
        raise CatalogError(f"{where}: field 'split.folds' must be an integer from 2 to 100, got {folds!r}")
    grouped = raw.get("grouped", False)
    if not isinstance(grouped, bool):
        raise CatalogError(f"{where}: field 'split.grouped' must be true or false, got {grouped!r}")
    group_by = raw.get("group_by")
    if group_by is not None and (not isinstance(group_by, str) or not group_by.strip()):
        raise CatalogError(f"{where}: field 'split.group_by' must be a column name (video, patient, specimen…)")
    if grouped:
        # The old flag: the reporting group doubles as the leakage unit.
        if not group:
            raise CatalogError(f"{where}: field 'split.grouped' is true but the dataset declares no 'group' column; "
                               "name the leakage unit with 'split.group_by: <column>' instead")
        if group_by is not None and group_by != group:
            raise CatalogError(f"{where}: 'split.grouped: true' means group_by = {group!r}, but 'split.group_by' "
                               f"is {group_by!r}; drop 'grouped'")
        group_by = group
    share = raw.get("max_group_share", 0.5)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise CatalogError(f"{where}: field 'split.max_group_share' must be a number in (0, 1], got {share!r}")
    action = _scalar_choice(raw.get("near_duplicates", "keep"), NEAR_DUPLICATE_ACTIONS,
                            f"{where}: field 'split.near_duplicates'")
    distance = raw.get("near_duplicate_distance", 4)
    if isinstance(distance, bool) or not isinstance(distance, int) or not 0 <= distance <= 32:
        raise CatalogError(f"{where}: field 'split.near_duplicate_distance' must be an integer from 0 to 32 "
                           f"(bits of a 64-bit perceptual hash), got {distance!r}")
    return SplitSettings(test_fraction=float(frac), seed=seed, folds=folds, group_by=group_by,
                         max_group_share=float(share), near_duplicates=action, near_duplicate_distance=distance)


# Model fields that name files (each LoaderRecord.path_fields); a reader's are its ReaderRecord.path_fields.
_MODEL_PATH_FIELDS = frozenset(f for record in LOADERS.values() for f in record.path_fields)


def _expand_paths(key: str, value: Any, catalog_path: Path, path_fields=_MODEL_PATH_FIELDS) -> Any:
    """Expand ``${VAR:-default}`` in path fields and anchor relative paths at the catalog's folder."""
    if key not in path_fields or not isinstance(value, str) or value.startswith("hf-hub:"):
        return value
    # An unset variable without a default stays as written, so the file-not-found error shows it.
    expanded = _ENV_REF.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) if m.group(2) is not None
                                                                       else m.group(0)), value)
    if key == "pretrained" and not (expanded.startswith((".", "/", "~", "$")) or expanded.endswith(
            (".pt", ".bin", ".safetensors", ".pth"))):
        return expanded  # an open_clip pretrained *tag* such as 'laion2b_s34b_b79k'
    p = Path(expanded).expanduser()
    if not p.is_absolute():
        p = (catalog_path.parent / p).resolve()
    return str(p)
