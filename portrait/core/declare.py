"""Settings declared once, validated in one place.

Every setting a user can give (a preset key, a template field, a backend option) is declared
exactly once, as a typed field with its default and bounds: a stage's policy is a frozen
dataclass whose fields are the declaration (bounds as `Annotated[int, Field(ge=1)]`), and the
backend options are the pydantic model in `portrait.core.options`. This module turns a mapping
the user wrote into one of those declarations, and every refusal into one BadInput line that
names where the value came from, the key and the reason:

    presets/tiny.yaml prepare: unknown key 'treshold' (known: duplicate_bits, max_file_bytes, ...)
    --option ip_adapter_scale: input should be a valid number (got 'abc')

pydantic validates the stdlib dataclasses directly (TypeAdapter), so a policy stays a plain
frozen dataclass in pipeline order and gains no runtime dependency beyond the one we have.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Mapping, TypeVar

from pydantic import TypeAdapter, ValidationError

from .errors import BadInput

T = TypeVar("T")


def field_names(cls: type) -> tuple[str, ...]:
    """The declared keys of a policy dataclass or a pydantic model."""
    if dataclasses.is_dataclass(cls):
        return tuple(f.name for f in dataclasses.fields(cls))
    return tuple(getattr(cls, "model_fields", {}))


def refuse_unknown(values: Mapping[str, Any], where: str, *declared: type | Iterable[str]) -> None:
    """BadInput naming the first unknown key and every known one. `declared`: policy classes
    (their fields) and/or plain key lists, for a section several stages read."""
    known: set[str] = set()
    for d in declared:
        known.update(field_names(d) if isinstance(d, type) else d)
    unknown = sorted(k for k in values if k not in known)
    if unknown:
        listed = ", ".join(repr(k) for k in unknown)
        noun = "key" if len(unknown) == 1 else "keys"
        raise BadInput(f"{where}: unknown {noun} {listed} (known: {', '.join(sorted(known))})")


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def validate(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Build `cls` from `values`, type- and bounds-checked against its declaration."""
    try:
        return _adapter(cls).validate_python(dict(values))
    except ValidationError as exc:
        raise BadInput(f"{where}: {describe(exc)}") from None


def policy_from(cls: type[T], section: Mapping[str, Any] | None, where: str, *,
                shared: Iterable[type | Iterable[str]] = (), **overrides: Any) -> T:
    """A policy from its preset section: unknown keys refused (keys of `shared` policies that
    read the same section are allowed and ignored here), own keys validated, explicit
    `overrides` (None = not given) winning over the section."""
    section = dict(section or {})
    refuse_unknown(section, where, cls, *shared)
    own = set(field_names(cls))
    values = {k: v for k, v in section.items() if k in own}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return validate(cls, values, where)


def describe(exc: ValidationError) -> str:
    """The first error of a ValidationError as `key: reason (got VALUE)`, one line."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    msg = first["msg"]
    msg = msg[0].lower() + msg[1:] if msg else msg
    if msg.startswith("value error, "):
        msg = msg[len("value error, "):]
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None or first["type"] == "missing" else f" (got {got!r})"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc + ': ' if loc else ''}{msg}{shown}{more}".replace("\n", " ")
