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

The resolver (stages.generate.resolve_request) adds its own keys to a request's options
(`composition`, `style_lora`, `control_images`, ...); those are not user options, are declared
in `Resolved` and read typed through `resolved(request)`.

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

from typing import TYPE_CHECKING, Any, Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .declare import describe
from .errors import BadInput

if TYPE_CHECKING:
    from .backend import BackendSpec


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


def tenant_options(specs: Iterable["BackendSpec"]) -> dict[str, TenantAccess]:
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


class Pass2(BaseModel):
    """The template backend's second (ring) pass."""

    model_config = ConfigDict(extra="forbid")

    denoise: float | None = Field(None, ge=0.0, le=1.0)
    ring: float | None = Field(None, ge=0.0, le=1.0)
    controls: dict[Literal["canny", "openpose", "depth", "tile", "color"], float] | None = None


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
    """The keys the resolver puts into every request's options (never user options)."""

    model_config = ConfigDict(extra="ignore")

    composition: Literal["merge", "switch", "composite"] = "merge"
    fast: Literal["lcm"] | None = None
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


RESOLVED_KEYS = tuple(Resolved.model_fields)


def resolved(request_or_options: Any) -> Resolved:
    """The resolver's keys of a request (or of its options mapping), typed."""
    options = getattr(request_or_options, "options", request_or_options)
    return Resolved.model_validate({k: v for k, v in options.items() if k in Resolved.model_fields})


def known_options(specs: Iterable["BackendSpec"]) -> tuple[str, ...]:
    return tuple(sorted({name for spec in specs for name in spec.options.model_fields}))


def validate_options(values: Mapping[str, Any] | None, where: str, specs: Iterable["BackendSpec"]) -> dict[str, Any]:
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
            typed.setdefault(key, value)
    # Keep plain containers (backends read dicts and lists) and drop None-valued nested keys.
    if typed.get("pass2") is not None:
        typed["pass2"] = {k: v for k, v in typed["pass2"].items() if v is not None}
    return {k: typed[k] for k in values}
