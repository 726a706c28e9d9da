"""Request bodies and query parameters of the box's API: their fields, defaults and checks.

What it owns: :class:`Body` (a JSON object's fields, their types, defaults and
bounds, and whether unknown fields are refused) and :class:`Query` (the same
for query parameters, which arrive as strings), and :class:`WireError`, which
lists every field that failed as ``(location, message, type)``. The app turns a
WireError into corral's error form (``{"error": {"code": "invalid_request",
"message": "timeout: must be greater than 0"}}``) on ``/v1`` routes and into
the FastAPI-style ``{"detail": [...]}`` list the reference's clients know on
``/fastapi`` routes, both with status 422.

Why not pydantic models behind FastAPI: the box starts in every sandbox, and
FastAPI with pydantic costs ~0.2 s of CPU to import there, about as much as
the rest of the box; these checks are a few dozen lines.
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = ["Field", "Body", "Query", "WireError", "REQUIRED"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a field that must be given.
REQUIRED: Any = _Required()

_TRUE = {"1", "true", "yes", "on", "t", "y"}
_FALSE = {"0", "false", "no", "off", "f", "n"}


class WireError(Exception):
    """One or more fields of a request are missing or wrong: ``errors`` is ``[(loc, msg, type)]``."""

    def __init__(self, errors: list[tuple[tuple, str, str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(str(p) for p in loc)}: {msg}" for loc, msg, _ in errors))
        self.errors = errors

    def message(self, limit: int = 3) -> str:
        """``"field: what is wrong"`` for the first ``limit`` fields, without the body/query prefix."""
        parts = []
        for loc, msg, _ in self.errors[:limit]:
            where = [str(p) for p in loc if p not in ("body", "query")]
            parts.append(f"{'.'.join(where) or 'body'}: {msg}")
        return "; ".join(parts) or "invalid request"

    def detail(self) -> list[dict]:
        """FastAPI's 422 ``detail`` list, for the reference's routes."""
        return [{"loc": list(loc), "msg": msg, "type": kind} for loc, msg, kind in self.errors]


class Field:
    """One field: ``kind`` is ``str``, ``float``, ``int``, ``bool``, ``"str_map"`` (an object of strings),
    ``"object"`` (any object) or ``"any"``; ``choices`` limits a string to a set."""

    def __init__(self, kind: Any, default: Any = REQUIRED, *, gt: Optional[float] = None, ge: Optional[float] = None,
                 le: Optional[float] = None, min_length: Optional[int] = None, nullable: bool = False,
                 choices: Optional[Sequence[str]] = None) -> None:
        self.kind, self.default = kind, default
        self.gt, self.ge, self.le, self.min_length = gt, ge, le, min_length
        self.nullable = nullable or default is None
        self.choices = tuple(choices) if choices else None

    def check(self, value: Any, loc: tuple, errors: list) -> Any:
        if value is None and self.nullable:
            return None
        kind = self.kind
        if kind is str:
            if not isinstance(value, str):
                return errors.append((loc, "must be a string", "string_type"))
            if self.min_length is not None and len(value) < self.min_length:
                return errors.append((loc, f"must have at least {self.min_length} character"
                                           f"{'s' if self.min_length != 1 else ''}", "string_too_short"))
            if self.choices is not None and value not in self.choices:
                return errors.append((loc, f"must be one of {', '.join(repr(c) for c in self.choices)}", "literal_error"))
            return value
        if kind is bool:
            if not isinstance(value, bool):
                return errors.append((loc, "must be a boolean", "bool_type"))
            return value
        if kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return errors.append((loc, f"must be {'an integer' if kind is int else 'a number'}",
                                      "int_type" if kind is int else "float_type"))
            if kind is int and isinstance(value, float):
                if not value.is_integer():
                    return errors.append((loc, "must be an integer", "int_from_float"))
                value = int(value)
            if kind is float and not math.isfinite(value):
                return errors.append((loc, "must be a finite number", "finite_number"))
            return self._bounds(kind(value), loc, errors)
        if kind == "str_map":
            if not isinstance(value, dict):
                return errors.append((loc, "must be an object of strings", "dict_type"))
            for k, v in value.items():
                if not isinstance(v, str):
                    return errors.append((loc + (k,), "must be a string", "string_type"))
            return dict(value)
        if kind == "object":
            if not isinstance(value, dict):
                return errors.append((loc, "must be an object", "dict_type"))
            return value
        return value

    def _bounds(self, value: Any, loc: tuple, errors: list) -> Any:
        if self.gt is not None and not value > self.gt:
            return errors.append((loc, f"must be greater than {self.gt:g}", "greater_than"))
        if self.ge is not None and not value >= self.ge:
            return errors.append((loc, f"must be at least {self.ge:g}", "greater_than_equal"))
        if self.le is not None and not value <= self.le:
            return errors.append((loc, f"must be at most {self.le:g}", "less_than_equal"))
        return value


class _Fields:
    def __init__(self, fields: Mapping[str, Field]) -> None:
        self.fields = dict(fields)

    def _take(self, data: Mapping[str, Any], where: str, errors: list) -> dict:
        out = {}
        for name, f in self.fields.items():
            loc = (where, name)
            if name not in data:
                if f.default is REQUIRED:
                    errors.append((loc, "is required", "missing"))
                else:
                    out[name] = f.default() if callable(f.default) else f.default
                continue
            value = f.check(data[name], loc, errors)
            out[name] = value
        return out


class Body(_Fields):
    """A JSON object body. ``extra="forbid"``: an unknown field is an error (a misspelt option is not
    silently ignored); ``"ignore"``: unknown fields are dropped (the reference's routes)."""

    def __init__(self, fields: Mapping[str, Field], extra: str = "forbid", optional: bool = False) -> None:
        super().__init__(fields)
        self.extra = extra
        self.optional = optional  # an empty body stands for every default

    def parse(self, raw: bytes) -> dict:
        if not raw.strip():
            if self.optional:
                return self._checked({})
            raise WireError([(("body",), "is required", "missing")])
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise WireError([(("body",), f"is not valid JSON ({e.msg} at {e.pos})", "json_invalid")]) from None
        if data is None and self.optional:
            return self._checked({})
        if not isinstance(data, dict):
            raise WireError([(("body",), "must be a JSON object", "model_attributes_type")])
        return self._checked(data)

    def _checked(self, data: dict) -> dict:
        errors: list = []
        out = self._take(data, "body", errors)
        if self.extra == "forbid":
            errors.extend((("body", k), "is not a known field", "extra_forbidden") for k in data if k not in self.fields)
        if errors:
            raise WireError(errors)
        return out


class Query(_Fields):
    """Query parameters (strings), converted to each field's kind."""

    def parse(self, params: Iterable[tuple[str, str]]) -> dict:
        data: dict[str, Any] = {}
        errors: list = []
        for name, value in params:
            f = self.fields.get(name)
            if f is None or name in data:
                continue
            data[name] = self._convert(f, value, ("query", name), errors)
        out = self._take({k: v for k, v in data.items() if v is not _BAD}, "query", errors)
        if errors:
            raise WireError([e for e in errors if e[2] != "missing" or e[0][1] not in data])
        return out

    @staticmethod
    def _convert(f: Field, value: str, loc: tuple, errors: list) -> Any:
        if f.kind is bool:
            low = value.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            errors.append((loc, "must be a boolean", "bool_parsing"))
            return _BAD
        if f.kind in (int, float):
            try:
                return f.kind(value)
            except ValueError:
                errors.append((loc, f"must be {'an integer' if f.kind is int else 'a number'}",
                               "int_parsing" if f.kind is int else "float_parsing"))
                return _BAD
        return value


_BAD: Any = object()
