"""Command-line options generated from a declaration (portrait.core.request.GenerateSettings).

`declared_options(func)` adds one typer option per declared setting to a command's signature,
so `portrait generate --help` shows the declaration's bounds and help and an out-of-range value
is refused while the command line is parsed, before anything runs; `collect(values)` turns what was given back into the
declared names (None: not given). How each kind of field is written on the command line:

- a number with bounds: `--steps N`, parsed and bounds-checked against the declared field, so a
  refusal names the option, the value and the bound in one line (exit 2);
- a Literal of several choices: `--scheduler NAME` (a choice); of one choice: a flag
  (`--fast` gives "lcm");
- a pair (width, height marked `pair: size`): `--size WxH`;
- a mapping: a repeatable `--option KEY=VALUE` (the flag the field declares; the value is
  read as YAML, so numbers and booleans arrive typed);
- text: `--negative-prompt TEXT`.

The command is built when the app is (portrait.cli.main.build_app), so a declaration changed
before that is what the command offers.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, Mapping, Optional

import typer

from portrait.core.errors import BadInput
from portrait.core.request import GenerateSettings, door_fields, extra, fields, pair_members


def _flag(name: str, info) -> str:
    return extra(info).get("flag") or "--" + name.replace("_", "-")


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    for arg in typing.get_args(annotation) or (annotation,):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def _is(annotation: Any, kind: type) -> bool:
    args = typing.get_args(annotation) or (annotation,)
    return any(arg is kind or typing.get_origin(arg) is kind for arg in args)


def _bound(info, attr: str) -> Any:
    return next((getattr(m, attr) for m in info.metadata if hasattr(m, attr)), None)


def _option(name: str, annotation: Any, info, pairs: Mapping[str, tuple[str, ...]]) -> inspect.Parameter:
    """One typer parameter for one declared (door) field."""
    help_ = info.description or ""
    flag = _flag(name, info)
    if name in pairs:
        members = fields()
        limits = [f"{m} {_bound(members[m], 'ge')}-{_bound(members[m], 'le')}" for m in pairs[name]]
        option = typer.Option(None, flag, metavar="WxH", help=f"{help_.replace('[width, height]', 'WIDTHxHEIGHT')} "
                                                              f"({', '.join(limits)})")
        kind: Any = Optional[str]
    elif _is(annotation, dict):
        option = typer.Option([], flag, metavar="KEY=VALUE", help=f"{help_} Repeatable.")
        kind = list[str]
    elif (choices := _literal_choices(annotation)) is not None and len(choices) == 1:
        option = typer.Option(False, flag, help=help_)
        kind = bool
    elif choices is not None:
        option = typer.Option(None, flag, help=help_)
        kind = Optional[typing.Literal[choices]]  # typer offers a Literal as click's Choice
    elif _is(annotation, int) or _is(annotation, float):
        number = int if _is(annotation, int) else float
        low, high = _bound(info, "ge"), _bound(info, "le")
        span = f"{low if low is not None else ''}<=x{'<=' + str(high) if high is not None else ''}"
        option = typer.Option(None, flag, metavar=number.__name__.upper().replace("INT", "INTEGER"),
                              parser=_number(name, flag), help=f"{help_} ({span})")
        kind = Optional[number]
    else:
        option = typer.Option(None, flag, help=help_)
        kind = Optional[str]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)


def _number(name: str, flag: str) -> Callable[[str], Any]:
    """A number option's parser: the text checked against the declared field (type and bounds) as
    it is written, so a refusal is the project's one line with the option, the value and the
    bound (`--steps 5000: input should be less than or equal to 1000`, exit 2). click's own
    range types said `Invalid value for '--steps'` without the value given."""

    def parse(text: Any) -> Any:
        from pydantic import ValidationError

        from portrait.core.declare import option_error
        from portrait.core.request import door_model

        try:
            return getattr(door_model("GenerateSettings", pairs=False).model_validate({name: text}), name)
        except ValidationError as exc:
            raise BadInput(option_error(flag, text, exc)) from None

    return parse


def declared_options(func: Callable | None = None, *, include: tuple[str, ...] | None = None,
                     exclude: tuple[str, ...] = ()) -> Callable:
    """`func` (which takes **declared) with the declared settings added to its typer signature
    (all of them, or those `include` names); usable bare or as `@declared_options(include=...)`."""
    if func is None:
        return lambda f: declared_options(f, include=include, exclude=exclude)
    signature = inspect.signature(func, eval_str=True)
    own = [p for p in signature.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    pairs = pair_members(GenerateSettings)
    added = [_option(name, annotation, info, pairs)
             for name, (annotation, info) in door_fields(GenerateSettings, include=include, exclude=exclude).items()]
    func.__signature__ = signature.replace(parameters=own + added)  # type: ignore[attr-defined]
    return func


def collect(values: Mapping[str, Any]) -> dict[str, Any]:
    """The declared settings given on the command line, by declared name (not given: left out)."""
    declared = {k: v for k, v in door_fields(GenerateSettings).items() if k in values}
    pairs = pair_members(GenerateSettings)
    out: dict[str, Any] = {}
    for name, (annotation, info) in declared.items():
        value = values.get(name)
        if name in pairs:
            if value:
                out.update(_pair(value, pairs[name], _flag(name, info)))
        elif _is(annotation, dict):
            if value:
                out[name] = key_values(value, _flag(name, info))
        elif (choices := _literal_choices(annotation)) is not None and len(choices) == 1:
            if value:
                out[name] = choices[0]
        elif value is not None:
            out[name] = value
    return out


def _pair(value: str, members: tuple[str, ...], flag: str) -> dict[str, int]:
    """`--size WxH` as the declared pair (width, height), each within its declared bounds."""
    from portrait.core.request import given_settings

    try:
        numbers = [int(v) for v in value.lower().split("x")]
    except ValueError:
        numbers = []
    if len(numbers) != len(members):
        raise BadInput(f"{flag} '{value}': use WIDTHxHEIGHT, e.g. 512x640")
    given = dict(zip(members, numbers))
    try:
        given_settings(given, flag)
    except BadInput as exc:
        raise BadInput(f"{flag} {value}: {str(exc).removeprefix(flag + ': ')}") from None
    return given


def key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """KEY=VALUE pairs; values are YAML so numbers and booleans arrive typed."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BadInput(f"{flag} '{pair}': expected KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise BadInput(f"{flag} '{pair}': the value is not valid YAML") from None
    return out
