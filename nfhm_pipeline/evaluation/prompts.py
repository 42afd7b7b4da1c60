"""Prompt template sets named in the catalog's ``prompts`` field."""
from __future__ import annotations

from nfhm_pipeline.errors import CatalogError
from nfhm_pipeline.evaluation.zero_shot import BIO_TEMPLATES, DEFAULT_TEMPLATES, MEDICAL_TEMPLATES

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "generic": DEFAULT_TEMPLATES,
    "biology": BIO_TEMPLATES,
    "medical": MEDICAL_TEMPLATES,
    "digits": ("a photo of the digit {}.", "a handwritten digit {}.", "the number {}.", "{}"),
}


def templates_for(name: str) -> tuple[str, ...]:
    if name not in TEMPLATE_SETS:
        raise CatalogError(f"unknown prompt set {name!r}; expected one of {sorted(TEMPLATE_SETS)}")
    return TEMPLATE_SETS[name]
