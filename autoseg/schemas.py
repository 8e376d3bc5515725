"""Validation of fingerprints and plans against the JSON Schemas shipped with the package.

The schemas live in ``autoseg/json_schemas`` (installed with the package); the repository's ``fingerprints/`` and
``plans/`` folders link to them so reviewers find them next to the golden cases.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema

from .errors import AutosegError


@lru_cache(maxsize=None)
def _validator(kind: str) -> jsonschema.protocols.Validator:
    text = resources.files("autoseg").joinpath("json_schemas", f"{kind}.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def _short(text: str, limit: int = 200) -> str:
    """A schema message cut to ``limit`` characters: jsonschema quotes the whole offending value."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate(obj: Any, kind: str, source: str = "", fix: str = "") -> None:
    """Raise an ``AutosegError`` listing every schema violation of ``obj`` (``kind``: a schema in
    ``json_schemas/``) and, when given, how to fix the file."""
    where = f"{source}: " if source else ""
    supported = _validator(kind).schema.get("properties", {}).get("schema_version", {}).get("const")
    found = obj.get("schema_version") if isinstance(obj, dict) else None
    if supported is not None and found is not None and found != supported:  # say so, not "1 was expected"
        from .version import __version__

        raise AutosegError(
            f"{where}{kind} schema_version {found!r} is not supported: this autoseg ({__version__}) reads "
            f"schema_version {supported}, so another autoseg version wrote this file; recreate it with this version "
            "(delete it and rerun `autoseg plan_and_preprocess`) or use the autoseg version that wrote it"
        )
    errors = sorted(_validator(kind).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  - at {'/'.join(map(str, e.absolute_path)) or '(top)'}: {_short(e.message)}" for e in errors[:20]]
        tail = f"\n  fix: {fix}" if fix else ""
        raise AutosegError(f"{where}{kind} does not match its schema (autoseg {kind} schema v1):\n" + "\n".join(lines)
                           + tail)
