"""Request checking for the explorer's API: every parameter is parsed here or refused with a 4xx.

Each check raises ``ApiError(status, message)`` with a one-line message that says what was wrong and
what is allowed; the server turns it into ``{"error": message}`` with that status.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .table import MAX_LIMIT, NUMERIC_FILTERS, SORT_KEYS, Query

MAX_SLIDER = 10.0     # slider values are in units of the atom's max observed activation
MAX_EDITS = 64
MAX_TEXT = 200
MAX_BODY = 64 * 1024
EDIT_OPS = ("clamp", "ablate")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())


def only_params(params: Mapping[str, str], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}: allowed are {', '.join(allowed) or 'none'}")


def integer(value: Any, name: str, *, lo: int | None = None, hi: int | None = None, status: int = 400) -> int:
    """An int from a query string or JSON value (no bools, no floats with a fraction)."""
    if isinstance(value, bool):
        raise ApiError(400, f"{name} must be an integer, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 20:
        n = int(value)
    elif isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        n = int(value)
    else:
        raise ApiError(400, f"{name} must be an integer, got {str(value)[:40]!r}")
    if (lo is not None and n < lo) or (hi is not None and n > hi):
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ApiError(status, f"{name} {n} is out of range: use {span}")
    return n


def number(value: Any, name: str, *, lo: float | None = None, hi: float | None = None) -> float:
    """A finite float within bounds."""
    if isinstance(value, bool):
        raise ApiError(400, f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, f"{name} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(x):
        raise ApiError(400, f"{name} must be a finite number, got {value!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        raise ApiError(400, f"{name} {x:g} is out of bounds: use {lo:g}..{hi:g}")
    return x


def text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    if len(value) > MAX_TEXT:
        raise ApiError(400, f"{name} is too long ({len(value)} characters; at most {MAX_TEXT})")
    if any(ord(c) < 32 for c in value):
        raise ApiError(400, f"{name} holds control characters")
    return value


def run_name(params: Mapping[str, Any], runs: list[str]) -> str:
    name = params.get("run")
    if name is None or name == "":
        return runs[0]
    if name not in runs:
        raise ApiError(404, f"unknown run {str(name)[:60]!r}: the runs are {', '.join(runs)}")
    return name


ATOMS_PARAMS = ("run", "sort", "q", "label", "offset", "limit", *NUMERIC_FILTERS)


def atoms_query(params: Mapping[str, str]) -> Query:
    """``GET /api/atoms`` parameters -> a table Query (``sort=-kappa`` sorts descending)."""
    only_params(params, ATOMS_PARAMS)
    query = Query()
    sort = text(params.get("sort", "id"), "sort") or "id"
    query.descending = sort.startswith("-")
    query.sort = sort[1:] if query.descending else sort
    if query.sort not in SORT_KEYS:
        raise ApiError(400, f"unknown sort key {query.sort!r}: use one of {', '.join(SORT_KEYS)} "
                            "(prefix - for descending)")
    query.q = text(params.get("q", ""), "q")
    query.label = text(params["label"], "label") if params.get("label") else None
    query.offset = integer(params.get("offset", "0"), "offset", lo=0, hi=10**9)
    query.limit = integer(params.get("limit", "50"), "limit", lo=1, hi=MAX_LIMIT)
    for name in NUMERIC_FILTERS:
        if params.get(name) not in (None, ""):
            setattr(query, name, number(params[name], name))
    return query


def atom_id(raw: str, n_atoms: int) -> int:
    """A path atom id: 400 when not an integer, 404 when out of range."""
    return integer(raw, "atom id", lo=0, hi=n_atoms - 1, status=404)


def image_id(raw: Any, known) -> int:
    """An image id of the store: 400 when not an integer, 404 when the store has no such image."""
    n = integer(raw, "image id", lo=0, hi=2**62, status=404)
    if n not in known:
        raise ApiError(404, f"image {n} is not in the activation store")
    return n


def intervention(body: Any, runs: list[str], n_atoms_of, known_images, n_patches: int | None) -> dict:
    """``POST /api/intervene`` body -> {"run", "image", "edits": [...], "patches": [...] | None}."""
    if not isinstance(body, dict):
        raise ApiError(400, 'the body must be a JSON object like {"image": 0, "edits": [{"atom": 3, "value": 0}]}')
    only_params(body, ("run", "image", "edits", "patches"))
    run = run_name(body, runs)
    if "image" not in body:
        raise ApiError(400, "missing 'image': the store image id to edit")
    image = image_id(body["image"], known_images)
    edits = body.get("edits")
    if not isinstance(edits, list) or not edits:
        raise ApiError(400, 'edits must be a non-empty list like [{"atom": 3, "value": 0}]')
    if len(edits) > MAX_EDITS:
        raise ApiError(400, f"too many edits ({len(edits)}; at most {MAX_EDITS})")
    n_atoms = n_atoms_of(run)
    clean = []
    for i, e in enumerate(edits):
        if not isinstance(e, dict):
            raise ApiError(400, f'edit {i} must be an object like {{"atom": 3, "value": 0}}')
        only_params(e, ("atom", "value", "op"))
        if "atom" not in e:
            raise ApiError(400, f"edit {i} has no 'atom'")
        atom = integer(e["atom"], f"edit {i} atom", lo=0, hi=n_atoms - 1)
        op = e.get("op", "clamp")
        if op not in EDIT_OPS:
            raise ApiError(400, f"edit {i} op {str(op)[:20]!r} is unknown: use clamp or ablate")
        if op == "ablate":
            clean.append({"atom": atom, "op": "ablate"})
            continue
        if "value" not in e:
            raise ApiError(400, f"edit {i} needs a 'value' (-{MAX_SLIDER:g}..{MAX_SLIDER:g} x the atom's "
                                "max activation)")
        value = number(e["value"], f"edit {i} value", lo=-MAX_SLIDER, hi=MAX_SLIDER)
        clean.append({"atom": atom, "op": "clamp", "value": value})
    patches = body.get("patches")
    if patches is not None:
        if not isinstance(patches, list) or len(patches) > 100_000:
            raise ApiError(400, "patches must be a list of patch indices")
        if n_patches is None:
            raise ApiError(400, "this store has no patch grid: leave out 'patches'")
        patches = sorted({integer(p, "patch", lo=0, hi=n_patches - 1) for p in patches}) or None
    return {"run": run, "image": image, "edits": clean, "patches": patches}
