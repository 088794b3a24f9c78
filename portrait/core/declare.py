"""Settings declared once, validated in one place.

Every setting a user can give (a preset key, a template field, a backend option) is declared
exactly once, as a typed field with its default and bounds: a stage's policy is a frozen
dataclass whose fields are the declaration (bounds as `Annotated[int, Field(ge=1)]`, choices as
`Literal[...]`), and the backend options are the pydantic model in `portrait.core.options`.
A policy read from a preset names its section in a `SECTION` class variable ("train",
"finish.fuse"); field metadata says when a preset key differs from the field name
(`field(metadata={"key": "caption_template"})`), which `portrait train` option sets a field
(`{"option": "--lr"}`, so an override's error names the option the user typed), or that a
field is filled from another section (`{"section": "score"}`).

`policy_from` is the one builder: it turns a mapping the user wrote into one of those
declarations, and every refusal into one BadInput line that names where the value came from,
the key and the reason:

    presets/tiny.yaml prepare: unknown key 'treshold' (known: duplicate_bits, max_file_bytes, ...)
    presets/tiny.yaml finish.fuse.skin_ratio: input should be less than or equal to 1 (got 1.5)
    --resolution 100: input should be a multiple of 8

`schema` reads the same declarations back as rows (key, type, default, bounds, help) for
`portrait presets show` and the service's `/v1/presets/{name}`: there is no second copy.

pydantic validates the stdlib dataclasses directly (TypeAdapter), so a policy stays a plain
frozen dataclass in pipeline order and gains no runtime dependency beyond the one we have.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import io
import math
import re
import tokenize
import types
import typing
from typing import Any, Iterable, Mapping, TypeVar

from pydantic import TypeAdapter, ValidationError

from .errors import BadInput

T = TypeVar("T")


# --- what a declaration holds ------------------------------------------------------------------


def section_keys(cls: type) -> dict[str, str]:
    """The preset keys a declaration reads, each with the field it fills. Fields filled from
    another section (metadata `section`) are not keys of this one."""
    if dataclasses.is_dataclass(cls):
        return {f.metadata.get("key", f.name): f.name for f in dataclasses.fields(cls) if "section" not in f.metadata}
    return {name: name for name in getattr(cls, "model_fields", {})}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _nested(hint: Any) -> type | None:
    """The policy dataclass a field holds (a nested section such as finish.fuse), if any."""
    while typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    return hint if isinstance(hint, type) and dataclasses.is_dataclass(hint) else None


# --- building ---------------------------------------------------------------------------------------


def refuse_unknown(values: Mapping[str, Any], where: str, *declared: type | Iterable[str]) -> None:
    """BadInput naming every unknown key and every known one. `declared`: policy classes
    (their keys) and/or plain key lists, for a section several declarations read."""
    known: set[str] = set()
    for d in declared:
        known.update(section_keys(d) if isinstance(d, type) else d)
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        listed = ", ".join(repr(k) for k in unknown)
        noun = "key" if len(unknown) == 1 else "keys"
        raise BadInput(f"{where}: unknown {noun} {listed} (known: {', '.join(sorted(known))})")


@functools.lru_cache(maxsize=None)
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def validate(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Build `cls` from field values, type- and bounds-checked against its declaration."""
    try:
        return _adapter(cls).validate_python(dict(values))
    except ValidationError as exc:
        raise BadInput(f"{where}: {describe(exc)}") from None


def policy_from(cls: type[T], section: Mapping[str, Any] | None, where: str, *,
                shared: Iterable[type | Iterable[str]] = (), overrides: Mapping[str, Any] | None = None) -> T:
    """The one way to build a declaration from what a user wrote.

    `section`: the preset section (or any mapping of preset keys); unknown keys are refused with
    the known ones listed (keys of `shared` declarations, which read the same section, are
    allowed and left to them). A nested declaration (finish.fuse) is built from its own mapping
    with its own path in the message. `overrides` are field values given explicitly (CLI options,
    API arguments; None = not given) and win over the section; an error in one names the option.
    """
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise BadInput(f"{where}: must be a mapping of settings (got {section!r})")
    keys = section_keys(cls)
    refuse_unknown(section, where, keys, *shared)
    hints = _hints(cls) if dataclasses.is_dataclass(cls) else {}
    values: dict[str, Any] = {}
    for key, value in section.items():
        name = keys.get(key)
        if name is None:
            continue
        nested = _nested(hints.get(name))
        if nested is not None and isinstance(value, Mapping):
            value = policy_from(nested, value, f"{where}.{key}")
        values[name] = value
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(keys.values())
    refuse_unknown(given, f"{where} (given)", names)  # pydantic would drop an unknown field silently
    values.update(given)
    try:
        return _adapter(cls).validate_python(values)
    except ValidationError as exc:
        raise BadInput(_explain(cls, exc, where, given)) from None


def preset_label(preset: Any) -> str:
    """How a message names a preset: its file (presets/tiny.yaml, or the user's own file)."""
    return getattr(preset, "source", "") or f"preset '{preset.name}'"


def section_of(preset: Any, path: str) -> Mapping[str, Any]:
    """A section by its dotted path ("finish.fuse") in a loaded preset."""
    head, *rest = path.split(".")
    values: Any = preset.section(head)
    for part in rest:
        values = values.get(part) if isinstance(values, Mapping) else None
        values = {} if values is None else values
    return values


def from_preset(cls: type[T], preset: Any, *, shared: Iterable[type | Iterable[str]] = (),
                overrides: Mapping[str, Any] | None = None) -> T:
    """A declaration from the preset section it names (`cls.SECTION`). Fields declared with
    `metadata={"section": name}` are built from that other section (FinishPolicy.score)."""
    hints = _hints(cls)
    filled = {f.name: from_preset(_nested(hints[f.name]), preset) for f in dataclasses.fields(cls)
              if "section" in f.metadata}
    return policy_from(cls, section_of(preset, cls.SECTION), f"{preset_label(preset)} {cls.SECTION}", shared=shared,
                       overrides={**filled, **(overrides or {})})


# --- messages ------------------------------------------------------------------------------------


def _reason(error: Mapping[str, Any], choices_plain: bool = True) -> str:
    """pydantic's reason, lower-cased; a choice as `use one of a, b, c` (policy settings; the
    backend options keep pydantic's quoted `input should be 'a' or 'b'`)."""
    msg = error["msg"]
    if choices_plain and error["type"] == "literal_error":
        expected = str((error.get("ctx") or {}).get("expected", ""))
        choices = [c.strip().strip("'") for c in re.split(r",| or ", expected) if c.strip()]
        choices = [c.lower() if c in ("True", "False") else c for c in choices]
        return f"use one of {', '.join(choices)}"
    msg = msg[0].lower() + msg[1:] if msg else msg
    if msg.startswith("value error, "):
        msg = msg[len("value error, "):]
    return msg


def _got(error: Mapping[str, Any]) -> str:
    got = error.get("input")
    if isinstance(got, (dict, list)) or got is None or error["type"] == "missing":
        return ""
    return f" (got {got!r})"


def _path(loc: Iterable[Any]) -> list[str]:
    """A pydantic location without union-member and dict-key tags (`bool`, `literal['auto']`, `[key]`)."""
    return [str(p) for p in loc if not (isinstance(p, str) and (p.startswith("function-") or "[" in p or "'" in p
                                                                  or p in _TAGS))]


_TAGS = {"bool", "int", "float", "str", "none", "dict", "list", "tuple", "is-instance"}


def _explain(cls: type, exc: ValidationError, where: str, given: Mapping[str, Any]) -> str:
    first = exc.errors()[0]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    path = _path(first["loc"])
    name = path[0] if path else ""
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    if name in given and name in fields:
        return option_error(fields[name].metadata.get("option", name), given[name], exc)
    if name in fields:
        path[0] = fields[name].metadata.get("key", name)
    key = ".".join(path)
    return f"{where}{'.' + key if key else ''}: {_reason(first)}{_got(first)}{more}".replace("\n", " ")


def option_error(option: str, given: Any, exc: ValidationError) -> str:
    """A value a command-line option gave, refused: `--steps 5000: input should be less than or
    equal to 1000`, one line (the option, the value and the reason with its bound)."""
    first = exc.errors()[0]
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{option} {given}: {_reason(first)}{more}".replace("\n", " ")


def describe(exc: ValidationError) -> str:
    """The first error of a ValidationError as `key: reason (got VALUE)`, one line."""
    first = exc.errors()[0]
    key = ".".join(_path(first["loc"]))
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{key + ': ' if key else ''}{_reason(first, choices_plain=False)}{_got(first)}{more}".replace("\n", " ")


# --- the declared schema, read back -----------------------------------------------------------------


def schema(cls: type, values: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per preset key of a declaration: key, type, default, bounds, help (the field's own
    comment), and `value` when `values` (a built policy's fields) differs from the default.
    A nested declaration's row holds its own rows under `settings`."""
    hints = _hints(cls)
    notes = comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if "section" in f.metadata:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        kind, bounds = describe_type(hints[f.name])
        row: dict[str, Any] = {"key": f.metadata.get("key", f.name), "type": kind, "default": jsonable(default),
                               "bounds": bounds, "help": notes.get(f.name, "")}
        if f.metadata.get("option"):
            row["option"] = f.metadata["option"]
        nested = _nested(hints[f.name])
        current = getattr(values, f.name, None) if values is not None else None
        if nested is not None:
            row["type"] = "section"
            row.pop("default")
            row["settings"] = schema(nested, current)
        elif values is not None and jsonable(current) != row["default"]:
            row["value"] = jsonable(current)
        rows.append(row)
    return rows


def describe_type(hint: Any) -> tuple[str, str]:
    """A field's type and bounds in words: ("int", ">= 1, <= 64"), ("str", "one of adamw, prodigy")."""
    bounds: list[str] = []
    while typing.get_origin(hint) is typing.Annotated:
        hint, *meta = typing.get_args(hint)
        for m in meta:
            for item in getattr(m, "metadata", None) or [m]:
                for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("multiple_of", "multiple of")):
                    value = getattr(item, attr, None)
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        text = f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}"
                        if text not in bounds:
                            bounds.append(text)
    kind, choices = _type_name(hint)
    if choices:
        bounds.insert(0, f"one of {', '.join(choices)}")
    return kind, ", ".join(bounds)


def _type_name(hint: Any) -> tuple[str, list[str]]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        kinds = sorted({"bool" if isinstance(a, bool) else type(a).__name__ for a in args})
        return " or ".join(kinds), [str(a).lower() if isinstance(a, bool) else str(a) for a in args]
    if origin in (typing.Union, types.UnionType):
        names, choices = [], []
        for a in args:
            if a is type(None):
                continue
            name, more = _type_name(a)
            names.append(name)
            choices += more
        optional = " or null" if type(None) in args else ""
        return " or ".join(dict.fromkeys(names)) + optional, choices
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (tuple, list):
        inner = _type_name(args[0])[0] if args else "any"
        return f"list of {inner}", []
    if origin in (dict, Mapping, collections.abc.Mapping):
        if args:
            key, choices = _type_name(args[0])
            return (f"mapping of {'/'.join(choices)} to {_type_name(args[1])[0]}" if choices
                    else f"mapping of {key} to {_type_name(args[1])[0]}"), []
        return "mapping", []
    if hint is Any:
        return "any", []
    return getattr(hint, "__name__", str(hint)), []


def jsonable(value: Any) -> Any:
    """A default or value as JSON shows it (tuples as lists, non-finite floats as strings)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@functools.lru_cache(maxsize=None)
def comments(cls: type) -> dict[str, str]:
    """The comment at the end of each field's declaration line: the field's help, written once
    beside its default. Read from the class's source with tokenize (the comments are not kept at
    run time); empty when the source is not available (a zipped install)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    notes: dict[str, str] = {}
    line_field: dict[int, str] = {}
    field_names_ = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for number, line in enumerate(source.splitlines(), 1):
        match = re.match(r"\s+([A-Za-z_][A-Za-z0-9_]*)\s*:", line)
        if match and match.group(1) in field_names_:
            line_field[number] = match.group(1)
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT and token.start[0] in line_field:
                notes.setdefault(line_field[token.start[0]], token.string.lstrip("#").strip())
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return {}
    return notes
