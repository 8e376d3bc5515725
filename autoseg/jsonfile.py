"""The one reader of every JSON file autoseg trusts: bounded in size and nesting, strict, schema-checked.

A hand-edited or hostile JSON file must end in a message naming the file, the problem and the fix, never in a
``JSONDecodeError``, ``KeyError`` or ``RecursionError`` deep inside a stage. So every JSON the project reads
(``dataset.json``, plans, fingerprints, splits, ``inference_plan.json``, preprocessed case properties, validation
summaries, bundle manifests) goes through :func:`read_json` or :func:`parse_json`: the size is bounded before
reading, the nesting depth before parsing (CPython's parser recurses), ``NaN``/``Infinity`` (not JSON) are
refused, and with ``kind`` the parsed object is validated against ``autoseg/json_schemas/<kind>.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .errors import AutosegError
from .schemas import validate

MAX_JSON_BYTES = 64 * 2**20  # plans, fingerprints of thousands of cases and manifests stay far below this
MAX_DEPTH = 32  # the deepest file autoseg writes nests 6 levels
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def nesting_depth(text: bytes) -> int:
    """Deepest ``[``/``{`` nesting of JSON text, outside strings (no recursion, linear time)."""
    codes = np.frombuffer(_STRING.sub(b'""', text), dtype=np.uint8)
    step = np.isin(codes, (ord("["), ord("{"))).astype(np.int64) - np.isin(codes, (ord("]"), ord("}")))
    return int(np.cumsum(step).max(initial=0))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON; write a number or null")


def parse_json(raw: bytes | str, source: str, fix: str, kind: str | None = None) -> Any:
    """The object in ``raw`` (the contents of ``source``); any problem is an :class:`AutosegError` that names
    ``source``, what is wrong and ``fix``. With ``kind``, the object must match that JSON Schema."""
    data = raw.encode("utf-8") if isinstance(raw, str) else raw
    if len(data) > MAX_JSON_BYTES:
        raise AutosegError(f"{source}: {len(data)} bytes, more than the {MAX_JSON_BYTES} a JSON file may hold; {fix}")
    depth = nesting_depth(data)
    if depth > MAX_DEPTH:
        raise AutosegError(f"{source}: nested {depth} levels deep (at most {MAX_DEPTH} are read); {fix}")
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as e:
        raise AutosegError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); {fix}") from None
    except json.JSONDecodeError as e:
        raise AutosegError(f"{source}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}") from None
    except ValueError as e:
        raise AutosegError(f"{source}: {e}; {fix}") from None
    if kind is not None:
        validate(obj, kind, source, fix)
    return obj


def read_json(path: str | Path, fix: str, kind: str | None = None) -> Any:
    """:func:`parse_json` of the file ``path``; a missing, unreadable or oversized file is an error naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise AutosegError(f"{path}: {size} bytes, more than the {MAX_JSON_BYTES} a JSON file may hold; {fix}")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise AutosegError(f"{path}: file not found; {fix}") from None
    except IsADirectoryError:
        raise AutosegError(f"{path}: is a folder, not a JSON file; {fix}") from None
    except OSError as e:
        raise AutosegError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    return parse_json(raw, str(path), fix, kind)

