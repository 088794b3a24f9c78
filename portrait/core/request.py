"""The generate settings a user gives, declared once; every door is generated from this.

`GenerateSettings` declares each setting a person can give to one generate request (steps,
guidance, size, sampler, LoRA weight, negative prompt, composition, fast mode, ControlNet
strengths, backend options): its type, its bounds and its help, written here and nowhere else.
The doors are built from it, not written beside it:

- the CLI options of `portrait generate` (portrait/cli/declared.py: `--steps` gets min/max and
  help from here, a dict becomes a repeatable `--option KEY=VALUE`, a one-choice Literal a flag);
- the service's request models (portrait/service/app.py `generate_request_model`);
- the batch spec's settings (portrait/studio/spec.py `job_spec_model`);
- a template file's settings (portrait/stages/templates.py `template_file_model`);
- and the Python API, whose keyword overrides `resolve_request` validates against it.

A declared value of None means "not given": the template's, then the preset's value applies
(resolution order in stages/generate.py). The preset's own defaults (GeneratePolicy) take their
bounds from here too (`bounds`). Width and height are declared apart (the Python API and the
request name them so) and marked as one pair: the doors that take a size take them together as
`size: [W, H]` (`--size WxH` on the command line).

A field marked `json_schema_extra={"tenant": False}` is one a service tenant may not set (a file
or model override); the service's generated models leave such fields out (`drop_marked`).

Each door model is cached by the declaration's fingerprint (every field's repr), so a changed
declaration (a test's monkeypatch) is followed by every door built after it.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from .declare import describe
from .errors import BadInput
from .schedulers import SCHEDULERS

COMPOSITIONS = ("merge", "switch", "composite")
CONTROL_NAMES = ("canny", "openpose", "depth", "tile", "color")  # color feeds the tile ControlNet a mosaic
FAST_MODES = ("lcm",)  # each backend declares how it does each (BackendSpec.fast)
Strength = Annotated[float, Field(ge=0.0, le=5.0)]  # a ControlNet's conditioning scale


class GenerateSettings(BaseModel):
    """One generate request's settings, as a person gives them (None: from the template, then the preset)."""

    model_config = ConfigDict(extra="forbid")

    width: int | None = Field(None, ge=8, le=8192, description="Image width in pixels.", json_schema_extra={
        "pair": "size", "pair_help": "[width, height] in pixels, overriding the template (multiples of the "
                                     "preset's size_multiple, at most its max_side)."})
    height: int | None = Field(None, ge=8, le=8192, description="Image height in pixels.",
                               json_schema_extra={"pair": "size"})
    steps: int | None = Field(None, ge=1, le=1000, description="Denoising steps (at most the preset's max_steps).")
    guidance: float | None = Field(None, ge=0.0, le=50.0, description="CFG scale (FLUX: its distilled guidance).")
    scheduler: Literal[tuple(SCHEDULERS)] | None = Field(None, description="The sampler.")  # type: ignore[valid-type]
    lora_weight: float | None = Field(None, ge=-5.0, le=5.0, description="The identity LoRA's weight.")
    negative_prompt: str | None = Field(None, max_length=2000, description="Replaces the template's negative prompt.")
    composition: Literal[COMPOSITIONS] | None = Field(  # type: ignore[valid-type]
        None, description="How the identity LoRA meets a template's style LoRA.")
    fast: Literal[FAST_MODES] | None = Field(  # type: ignore[valid-type]
        None, description="The backend's few-step mode: its LCM-LoRA, LCM sampler, steps and CFG (backends "
                          "without one refuse it).")
    controls: dict[Literal[CONTROL_NAMES], Strength] | None = Field(  # type: ignore[valid-type]
        None, description="ControlNet strengths NAME=STRENGTH, over the template's.",
        json_schema_extra={"flag": "--control"})
    options: dict[str, Any] | None = Field(
        None, description="Backend options KEY=VALUE (the value is read as YAML); each backend's are listed by "
                          "`portrait generate --help` and /v1/backends.", json_schema_extra={"flag": "--option"})


def fields(model: type[BaseModel] = GenerateSettings) -> dict[str, FieldInfo]:
    """The declared fields, as they are now (a door reads them when it is built)."""
    return dict(model.model_fields)


def extra(info: FieldInfo) -> dict[str, Any]:
    value = info.json_schema_extra
    return dict(value) if isinstance(value, Mapping) else {}


def bounds(name: str, model: type[BaseModel] = GenerateSettings) -> list[Any]:
    """A field's constraints (annotated_types Ge/Le/...), for a declaration that shares them
    (`steps: Annotated[int, *bounds("steps")] = 30` in the preset's GeneratePolicy)."""
    return list(model.model_fields[name].metadata)


def _copy(info: FieldInfo) -> tuple[Any, FieldInfo]:
    """(annotation, field) of a declared field, copied so a door never shares a mutable FieldInfo."""
    return info.annotation, FieldInfo.merge_field_infos(info)


def _pair_field(members: list[tuple[str, FieldInfo]]) -> tuple[Any, FieldInfo]:
    """`size: [W, H]` from the paired width and height fields, each keeping its own bounds."""
    items = tuple(Annotated[info.annotation.__args__[0], *info.metadata] for _, info in members)  # X | None -> X
    help_ = next((extra(info)["pair_help"] for _, info in members if extra(info).get("pair_help")), "")
    return tuple[items] | None, FieldInfo(default=None, description=help_)  # type: ignore[misc]


def door_fields(model: type[BaseModel] = GenerateSettings, *, include: Iterable[str] | None = None,
                exclude: Iterable[str] = (), drop_marked: Iterable[str] = (), pairs: bool = True
                ) -> dict[str, tuple[Any, FieldInfo]]:
    """The declared fields as one door takes them: `include`/`exclude` by declared name, fields
    marked False under any key in `drop_marked` left out, paired fields merged (`size`)."""
    include = None if include is None else set(include)
    exclude, drop_marked = set(exclude), tuple(drop_marked)
    out: dict[str, tuple[Any, FieldInfo]] = {}
    grouped: dict[str, list[tuple[str, FieldInfo]]] = {}
    for name, info in fields(model).items():
        marks = extra(info)
        if (include is not None and name not in include) or name in exclude:
            continue
        if any(marks.get(key) is False for key in drop_marked):
            continue
        if pairs and marks.get("pair"):
            if marks["pair"] not in grouped:
                out[marks["pair"]] = (None, None)  # type: ignore[assignment]  # keeps the declared order
            grouped.setdefault(marks["pair"], []).append((name, info))
            continue
        out[name] = _copy(info)
    for pair, members in grouped.items():
        out[pair] = _pair_field(members)
    return out


def door_names(model: type[BaseModel] = GenerateSettings, **selection: Any) -> set[str]:
    return set(door_fields(model, **selection))


def pair_members(model: type[BaseModel] = GenerateSettings) -> dict[str, tuple[str, ...]]:
    """{"size": ("width", "height")}: each pair and its fields, in declared order."""
    found: dict[str, list[str]] = {}
    for name, info in fields(model).items():
        if extra(info).get("pair"):
            found.setdefault(extra(info)["pair"], []).append(name)
    return {pair: tuple(names) for pair, names in found.items()}


def split_pairs(values: Mapping[str, Any], model: type[BaseModel] = GenerateSettings) -> dict[str, Any]:
    """A door's values with each pair (`size: [W, H]`) back as its declared fields (width, height)."""
    out = dict(values)
    for pair, names in pair_members(model).items():
        if out.get(pair) is not None:
            out.update(zip(names, out.pop(pair)))
        else:
            out.pop(pair, None)
    return out


def _fingerprint(model: type[BaseModel]) -> tuple:
    return tuple((name, repr(info)) for name, info in model.model_fields.items())


def door_model(name: str, model: type[BaseModel] = GenerateSettings, *, base: type[BaseModel] | None = None,
               include: Iterable[str] | None = None, exclude: Iterable[str] = (), drop_marked: Iterable[str] = (),
               pairs: bool = True) -> type[BaseModel]:
    """A pydantic model named `name` whose fields are the declaration's (selected as in
    `door_fields`), on top of `base` (the door's own fields: identity, count, ...)."""
    return _door_model(name, model, base, None if include is None else tuple(include), tuple(exclude),
                       tuple(drop_marked), pairs, _fingerprint(model))


@functools.lru_cache(maxsize=64)
def _door_model(name: str, model: type[BaseModel], base: type[BaseModel] | None, include, exclude, drop_marked,
                pairs: bool, fingerprint: tuple) -> type[BaseModel]:
    declared = door_fields(model, include=include, exclude=exclude, drop_marked=drop_marked, pairs=pairs)
    if base is None:
        return create_model(name, __config__=ConfigDict(extra="forbid"), **declared)  # type: ignore[call-overload]
    return create_model(name, __base__=base, **declared)  # type: ignore[call-overload]


def given_settings(values: Mapping[str, Any] | None, where: str = "generate") -> dict[str, Any]:
    """The settings given to the Python API (declared names; None = not given), checked against the
    declaration: a key it does not declare or a value out of bounds is one BadInput line."""
    values = {k: v for k, v in (values or {}).items() if v is not None}
    known = list(fields())
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise BadInput(f"{where}: unknown setting {', '.join(unknown)} (known: {', '.join(known)})")
    try:
        checked = door_model("GenerateSettings", pairs=False).model_validate(values)
    except ValidationError as exc:
        raise BadInput(f"{where}: {describe(exc)}") from None
    return checked.model_dump(exclude_unset=True)


__all__ = ["COMPOSITIONS", "CONTROL_NAMES", "FAST_MODES", "GenerateSettings", "Strength", "bounds", "door_fields",
           "door_model", "door_names", "fields", "given_settings", "pair_members", "split_pairs"]
