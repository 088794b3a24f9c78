"""Backend options, declared once and typed: the groups of keys backends share, the keys the
resolver adds, and the one validation every option goes through.

Each backend declares its own options model in its module (stages/backends/<name>.py),
composed from the groups below, with its own defaults (one key can mean different defaults
per backend: `ip_adapter_scale` is 0.6 for FaceID and 0.8 for InstantID, as in the reference
code). The known user options are the union of what the registered backends declare, so a
new backend's options are known as soon as it is in the table. A value given in a template's
`options:`, a studio spec or `--option KEY=VALUE` is checked before any model loads against
the backend(s) declaring its key: `--option ip_adapter_scale=abc` or `--option frobnicate=7`
is one line, exit 2, with the list of known keys.

A request carries its backend's options as that typed model (GenerationRequest.options), built
once by the resolver from the template's options for that backend and the user's: a key no
backend of the request declares is refused there with one line naming the backends that do
(`backend_options`); a template's options for other backends are the template's tuning for
them, not for this one, and are left out.

The resolver (stages.generate.resolve_request) also fills values of its own (`composition`,
`style_lora`, `control_images`, the fast mode, ...); those are not user options and travel typed
as `Resolved` (GenerationRequest.resolved).

Who may set an option is part of its declaration (`tenant_access`): the person at the CLI may
set every option, but a tenant of the HTTP service only those a request may carry. A field
that names a file or a model override is `SERVER_ONLY` (a value from the network must never
become a path the server opens); a field that names an image the request needs is `ASSET`
(the service takes an id in the tenant's own asset store and puts the stored file's path
there itself). The service derives the options it accepts from these marks
(`tenant_options`), so a new backend's options are sorted when they are declared, not in a
list kept somewhere else.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .declare import describe
from .errors import BadInput
from .request import CONTROL_NAMES, FAST_MODES, Strength


class Declares(Protocol):
    """What these checks read of a backend (a portrait.core.backend.BackendSpec): its name and its
    options model. A protocol, not an import: the backend contract imports this module."""

    name: str
    options: type[BaseModel]


# Who may set an option (json_schema_extra of the field, so the mark is also in /v1/backends' schemas).
SERVER_ONLY: dict[str, Any] = {"tenant": False}  # files, model overrides: the operator's, never a request's
ASSET: dict[str, Any] = {"tenant": "asset"}  # an image: a tenant names one of its uploaded assets by id
TenantAccess = Literal["value", "asset", "server"]


def tenant_access(model: type[BaseModel], name: str) -> TenantAccess:
    """How a service tenant may give option `name` of `model`: as a value, as an asset id, or not."""
    extra = model.model_fields[name].json_schema_extra
    mark = extra.get("tenant", True) if isinstance(extra, dict) else True
    if mark is False:
        return "server"
    return "asset" if mark == "asset" else "value"


def tenant_options(specs: Iterable[Declares]) -> dict[str, TenantAccess]:
    """Every option the backends declare, with how a tenant may give it. A key two backends
    declare differently is as strict as the stricter one."""
    order = {"value": 0, "asset": 1, "server": 2}
    found: dict[str, TenantAccess] = {}
    for spec in specs:
        for name in spec.options.model_fields:
            access = tenant_access(spec.options, name)
            if name not in found or order[access] > order[found[name]]:
                found[name] = access
    return dict(sorted(found.items()))


class NoOptions(BaseModel):
    """A backend that reads no user option (only the shared ones every backend sees)."""

    model_config = ConfigDict(extra="forbid")


class Pass2(BaseModel):
    """The template backend's second (ring) pass (EasyPhoto's defaults)."""

    model_config = ConfigDict(extra="forbid")

    denoise: float = Field(0.3, ge=0.0, le=1.0, description="ring pass strength")
    ring: float = Field(0.15, ge=0.0, le=1.0, description="ring width around the face mask, a fraction of the face size")
    controls: dict[Literal[CONTROL_NAMES], Strength] = Field(  # type: ignore[valid-type]
        default_factory=lambda: {"tile": 1.0, "canny": 1.0}, description="the ring pass's ControlNets")


FinishStage = Literal["fuse", "retouch", "upscale", "restore", "score", "clip"]


class CommonOptions(BaseModel):
    """Options every backend takes (the finish flow reads them after any backend)."""

    model_config = ConfigDict(extra="forbid")

    # finishing switches per template (portrait/flows/finish.py STAGES)
    finish: dict[FinishStage, bool | None] | None = None


class EmbedOptions(BaseModel):
    """How the identity's photos become an embedding (stages/embed.py EmbedPolicy)."""

    model_config = ConfigDict(extra="forbid")

    id_mode: Literal["mean", "all", "best"] = "mean"
    id_photos: int = Field(8, ge=1, le=64, description="the bundle's best photos; more add little and cost time")
    face_locator: Literal["auto", "pack", "dlib"] = "auto"
    face_pack: str | None = Field(None, min_length=1, description="override the adapter's face pack",
                                  json_schema_extra=SERVER_ONLY)


class FaceIDAdapterOptions(BaseModel):
    """IP-Adapter FaceID / Plus / PlusV2 (the faceid backend, and the template backend's
    `identity_adapter: faceid`)."""

    model_config = ConfigDict(extra="forbid")

    faceid_variant: Literal["faceid", "plus", "plusv2"] = "plusv2"
    ip_adapter_scale: float = Field(0.6, ge=0.0, le=5.0, description="IP-Adapter scale (h94's examples: 0.6)")
    s_scale: float = Field(1.0, ge=0.0, le=5.0, description="FaceID PlusV2 shortcut weight")
    faceid_lora_scale: float = Field(1.0, ge=0.0, le=5.0, description="the FaceID LoRA's weight")
    faceid_model: str | None = Field(None, min_length=1, description="registry id or file overriding the preset's role",
                                     json_schema_extra=SERVER_ONLY)


class GroupOptions(BaseModel):
    """More people in one picture (`--with-identity`)."""

    model_config = ConfigDict(extra="forbid")

    # Names of bundles on this machine: the CLI's. The service resolves a tenant's own ids
    # (`with_identity`) and hands the flow the identities themselves.
    identities: list[str] | None = Field(None, json_schema_extra=SERVER_ONLY)


class Resolved(BaseModel):
    """What the resolver decided for a request besides the backend's options (never user options):
    recorded with them in results.json and the PNG metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    composition: Literal["merge", "switch", "composite"] = "merge"
    fast: Literal[FAST_MODES] | None = None  # type: ignore[valid-type]  # the backend's few-step mode, if asked
    fast_lora: str | None = None  # the preset model role of that mode's LoRA (BackendSpec.fast), attached by the backend
    style_lora: dict[str, Any] | None = None  # {"model": id or path, "weight": w}
    control_images: dict[str, str] = Field(default_factory=dict)  # control name -> image path
    control_preprocessed: list[str] = Field(default_factory=list)
    control_range: dict[str, tuple[float, float]] = Field(default_factory=dict)
    template_image: str | None = None
    template_faces: int | None = None
    memory: dict[str, Any] = Field(default_factory=dict)
    face_backend: str = "dlib"
    # `portrait edit` (flows/edit.py): {"source": path, "source_sha256", "references": [{"file",
    # "sha256"}], "chain": the edits that made the source}; set by the edit flow, never a user option
    edit: dict[str, Any] | None = None
    # Where the edit's pictures are read from, by the names the record gives them (the service
    # records "result ID" and "asset ID" instead of its own paths): left out of every record.
    edit_files: dict[str, str] = Field(default_factory=dict, exclude=True)


def known_options(specs: Iterable[Declares]) -> tuple[str, ...]:
    return tuple(sorted({name for spec in specs for name in spec.options.model_fields}))


def validate_options(values: Mapping[str, Any] | None, where: str, specs: Iterable[Declares]) -> dict[str, Any]:
    """Check user options against the backends that declare them; returns them typed (only
    the keys given). A key no backend declares is refused with the known ones listed.

    `where` names the source: `--option` (each key is shown as `--option KEY`) or a template
    file (shown as `template FILE: options.KEY`)."""
    values = dict(values or {})
    if not values:
        return {}
    specs = tuple(specs)
    flag = where == "--option"
    known = known_options(specs)
    for key in values:
        if key not in known:
            if flag:
                raise BadInput(f"--option {key}: unknown option (known: {', '.join(known)})")
            raise BadInput(f"{where}: options: unknown key {key!r} (known: {', '.join(known)})")
    typed: dict[str, Any] = {}
    for spec in specs:  # every declaring backend checks its keys (types and bounds)
        mine = {k: v for k, v in values.items() if k in spec.options.model_fields}
        if not mine:
            continue
        try:
            model = spec.options.model_validate(mine)
        except ValidationError as exc:
            text = describe(exc)
            if flag:
                raise BadInput(f"--option {text}") from None
            raise BadInput(f"{where}: options.{text}") from None
        for key, value in model.model_dump(exclude_unset=True, mode="python").items():
            typed.setdefault(key, value)  # plain containers, nested keys as given
    return {k: typed[k] for k in values}


def takers(key: str, specs: Iterable[Declares]) -> list[str]:
    """The backends (of `specs`) that declare option `key`."""
    return [s.name for s in specs if key in s.options.model_fields]


def refuse_foreign(keys: Iterable[str], chosen: Iterable[Declares], specs: Iterable[Declares],
                   where: str = "--option") -> None:
    """An option none of the `chosen` backends takes (but another backend does) is refused with
    one line naming the backends that take it; an option no backend declares is unknown."""
    chosen, specs = tuple(chosen), tuple(specs)
    keys = list(keys)
    known = known_options(specs)
    unknown = [k for k in keys if k not in known]
    if unknown:
        key = unknown[0]
        if where == "--option":
            raise BadInput(f"--option {key}: unknown option (known: {', '.join(known)})")
        raise BadInput(f"{where}: options: unknown key {key!r} (known: {', '.join(known)})")
    foreign = [k for k in keys if not any(k in s.options.model_fields for s in chosen)]
    if not foreign:
        return
    names = ", ".join(f"'{s.name}'" for s in chosen)
    who = f"backend {names}" if len(chosen) == 1 else f"none of the backends {names}"
    verb = ("does" if len(chosen) == 1 else "takes") if len(foreign) == 1 else ("do" if len(chosen) == 1 else "take")
    taken = "; ".join(f"{k}: {', '.join(takers(k, specs))}" for k in foreign)
    label = "--option" if where == "--option" else f"{where}: option"
    raise BadInput(f"{label} {', '.join(foreign)}: {who} {verb} not take {'it' if len(foreign) == 1 else 'them'} "
                   f"(taken by {taken})")


def backend_options(spec: Declares, values: Mapping[str, Any] | None, specs: Iterable[Declares],
                    where: str = "--option") -> BaseModel:
    """The backend's typed options object from the given values (every field typed, defaults
    filled; `model_fields_set` holds what was given). A key of another backend is refused."""
    values = dict(values or {})
    refuse_foreign(values, [spec], specs, where)
    try:
        return spec.options.model_validate(values)
    except ValidationError as exc:
        text = describe(exc)
        raise BadInput(f"--option {text}" if where == "--option" else f"{where}: options.{text}") from None


def given_options(options: BaseModel) -> dict[str, Any]:
    """What was given of a typed options object, as plain data (results.json, PNG metadata)."""
    return options.model_dump(mode="json", exclude_unset=True)
