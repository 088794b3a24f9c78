"""What a tenant may send: the request bodies of the /v1 API, typed and bounded.

Every field that names an object of the service is a reference (`IdentityRef`, `AssetRef`,
`JobRef`: the mark is in the field's JSON schema as `x-portrait-ref`), and the service
resolves each one through one function, in the requesting tenant's scope only
(`Scope.resolve`, service/scope.py): another tenant's id, a made-up id and a path all answer
the same 404 naming the field. Every other field is a value (text, a number, a name from the
catalogue) that never becomes a path. `reference_fields` reads the marks back, so the test
that walks every field of every request model (tests/test_serve_attacks.py) follows new
fields without a list kept by hand.

Backend options (`options`) are a mapping checked at submit against the backends'
declarations: the keys a tenant may set are derived from the declarations' marks
(portrait.core.options.tenant_options), asset-typed ones are references too.

The generate settings (size, steps, guidance, scheduler, lora_weight, negative_prompt,
composition, fast, controls, options) are not written here: `generate_request_model` and
`batch_request_model` add them from their declaration (portrait.core.request), with its bounds
and help, leaving out any field marked `tenant: False`. The app builds its body models when it
is built, so they follow the declaration.

Numbers are finite: JSON has no NaN or Infinity, and Python's JSON reader accepting them is
no reason for the service to; a request holding one is refused naming the field.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from portrait.core.options import FinishStage

REF = "x-portrait-ref"
_ID = {"min_length": 1, "max_length": 64}
IdentityRef = Annotated[str, Field(json_schema_extra={REF: "identity"}, description="an identity id", **_ID)]
AssetRef = Annotated[str, Field(json_schema_extra={REF: "asset"}, description="an asset id (POST /v1/assets)", **_ID)]
JobRef = Annotated[str, Field(json_schema_extra={REF: "job"}, description="a job id", **_ID)]


def nonfinite(value: Any, path: str = "") -> tuple[str, float] | None:
    """The first NaN or infinity in a parsed JSON value: (its dotted path, the number)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found = nonfinite(inner, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


class RequestModel(BaseModel):
    """Unknown fields are refused; so is a NaN or an infinity anywhere in the body."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, data: Any) -> Any:
        found = nonfinite(data)
        if found:
            where, number = found
            shown = "NaN" if math.isnan(number) else ("Infinity" if number > 0 else "-Infinity")
            raise ValueError(f"{where}: {shown} is not a number (JSON has no NaN or Infinity)")
        return data


class TrainRequest(RequestModel):
    identity: IdentityRef
    zero_shot: bool = Field(False, description="Prepare only (embeddings, reference) for the zero-shot backends.")
    steps: Optional[int] = Field(None, ge=1, le=100_000)


class GenerateOptions(RequestModel):
    """What every generate request takes besides the declared generate settings (added by
    `generate_request_model` / `batch_request_model`). `options` (declared there) is checked at
    submit: a tenant sets the options not marked server-only, and names images by asset id."""

    count: int = Field(1, ge=1, description="Images to make (one item each in the store; the server's limit: "
                                            "the preset's service.max_count).")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    finish: bool | dict[FinishStage, bool] = Field(True, description="Finishing stages (fuse, retouch, upscale, ...).")
    keep: Optional[int] = Field(None, ge=1, le=64, description="Make this many portraits that pass every check (a "
                                "face, alike in the independent space, no copy of a photo, sharp, well exposed) "
                                "per identity x template (or cell) x backend, instead of `count`.")
    attempts: Optional[int] = Field(None, ge=1, le=1000, description="With `keep`: the most candidates to try for "
                                    "each (default keep x the preset's score.keep_attempts).")
    upscale_factor: Optional[float] = Field(None, gt=0, le=8, description="The final upscale factor (the preset's "
                                            "finish.upscale.outscale otherwise).")


class GenerateFields(GenerateOptions):
    identity: IdentityRef
    with_identity: list[IdentityRef] = Field(default_factory=list, max_length=8,
                                             description="More people in the picture (a group template, or faceid "
                                                         "with regions), left to right after `identity`.")
    template: Optional[str] = Field(None, max_length=64, description="A template name from /v1/templates.")
    template_photo: Optional[AssetRef] = Field(None, description="Your own photo template: an uploaded asset whose "
                                                                  "people are repainted (backend template).")
    prompt: Optional[str] = Field(None, description="A prompt with {trigger} and {class}, instead of a template.")
    backend: Optional[str] = Field(None, max_length=64, description="A backend name from /v1/backends; default "
                                                                    "from the template.")


class BatchFields(GenerateOptions):
    identities: list[IdentityRef] = Field(min_length=1, max_length=100)
    templates: list[str] = Field(default_factory=list, max_length=100)
    prompts: list[str] = Field(default_factory=list, max_length=100)
    backends: list[str] = Field(default_factory=lambda: ["lora"], min_length=1, max_length=20)


_NAMES = Field(None, max_length=64, description="names from /v1/packages")


class ShootFields(GenerateOptions):
    """A studio package's cells (backdrop x outfit x pose) for one identity; results grouped by cell."""

    identity: IdentityRef
    package: str = Field(max_length=64, description="A package name from /v1/packages.")
    cells: Optional[list[Annotated[str, Field(max_length=200)]]] = Field(
        None, max_length=500, description="Cells as backdrop/outfit[/pose]; or choose backdrops, outfits, poses.")
    backdrops: Optional[list[Annotated[str, Field(max_length=64)]]] = _NAMES
    outfits: Optional[list[Annotated[str, Field(max_length=64)]]] = _NAMES
    poses: Optional[list[Annotated[str, Field(max_length=64)]]] = _NAMES
    backend: Optional[str] = Field(None, max_length=64, description="A backend that takes a prompt (default: the "
                                                                    "preset's).")


ResultId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$", description="a result id (GET .../results)")]


class ResultSelection(RequestModel):
    """Results of the identity in the path, by id."""

    ids: list[ResultId] = Field(min_length=1, max_length=500)


class StarRequest(ResultSelection):
    starred: bool = True


class EditFields(RequestModel):
    """One of the identity's results, changed by a prompt (background, outfit, expression,
    lighting) with the face kept and checked (portrait.flows.edit): each edit is re-scored
    against the identity and regenerated with new seeds below the likeness check."""

    identity: IdentityRef
    result: ResultId = Field(description="The result to edit: an id from GET /v1/identities/{id}/results.")
    prompt: str = Field(min_length=1, description="What to change, e.g. \"a sunny beach behind her\".")
    references: list[AssetRef] = Field(default_factory=list, max_length=3,
                                       description="Up to 3 uploaded images to take from (an outfit, a backdrop).")
    backend: Optional[str] = Field(None, max_length=64, description="klein-ref, qwen-edit or kontext (default: the "
                                                                    "one of this server's preset).")
    count: int = Field(1, ge=1, description="Edits to make, each from its own seed (the server's limit: the preset's "
                                            "service.max_count).")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    finish: bool | dict[FinishStage, bool] = Field(
        {"fuse": False}, description="Finishing stages; fusion is off (pasting the reference face back would undo "
                                     "an expression edit).")


# The declared settings an edit takes (its size is the result's own, fitted to the preset).
EDIT_SETTINGS = ("steps", "guidance", "options")


# A declared setting marked `tenant: False` (a file or model override) is the operator's: the
# request models leave it out, so a tenant cannot send it.
TENANT_MARKS = ("tenant",)


def generate_request_model() -> type[GenerateFields]:
    """POST /v1/jobs/generate's body: its own fields and the declared generate settings."""
    from portrait.core.request import door_model

    return door_model("GenerateRequest", base=GenerateFields, drop_marked=TENANT_MARKS)  # type: ignore[return-value]


def batch_request_model() -> type[BatchFields]:
    """POST /v1/jobs/batch's body: its own fields and the declared generate settings."""
    from portrait.core.request import door_model

    return door_model("BatchRequest", base=BatchFields, drop_marked=TENANT_MARKS)  # type: ignore[return-value]


def declared_settings(body: BaseModel) -> dict[str, Any]:
    """The declared generate settings a body gave, by their declared names (`size` split into
    width and height; not given: left out)."""
    from portrait.core.request import door_names, split_pairs

    given = {name: getattr(body, name) for name in door_names(drop_marked=TENANT_MARKS)
             if getattr(body, name, None) is not None}
    return split_pairs(given)


def shoot_request_model() -> type[ShootFields]:
    """POST /v1/jobs/shoot's body: its own fields and the declared generate settings."""
    from portrait.core.request import door_model

    return door_model("ShootRequest", base=ShootFields, drop_marked=TENANT_MARKS)  # type: ignore[return-value]


def edit_request_model() -> type[EditFields]:
    """POST /v1/jobs/edit's body: its own fields and the declared steps, guidance and options."""
    from portrait.core.request import door_model

    return door_model("EditRequest", base=EditFields, include=EDIT_SETTINGS,  # type: ignore[return-value]
                      drop_marked=TENANT_MARKS)


GenerateRequest = generate_request_model()  # the declaration as it stands at import (create_app builds its own)
BatchRequest = batch_request_model()
ShootRequest = shoot_request_model()
EditRequest = edit_request_model()
REQUEST_MODELS: dict[str, type[RequestModel]] = {m.__name__: m for m in (TrainRequest, GenerateRequest, BatchRequest,
                                                                          ShootRequest, EditRequest)}


def _ref_kind(info: Any) -> str | None:
    for source in (info, *getattr(info, "metadata", ())):
        extra = getattr(source, "json_schema_extra", None)
        if isinstance(extra, dict) and REF in extra:
            return extra[REF]
    return None


def reference_fields(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the kind of object it references (identity, asset, job), for the fields
    that hold an id (alone or in a list)."""
    import typing

    found = {}
    for name, info in model.model_fields.items():
        kind = _ref_kind(info)
        if kind is None:
            for arg in typing.get_args(info.annotation):
                for inner in (arg, *typing.get_args(arg)):
                    if typing.get_origin(inner) is Annotated:
                        kind = kind or next((e[REF] for e in _extras(inner) if REF in e), None)
        if kind is not None:
            found[name] = kind
    return found


def _extras(annotated: Any) -> list[dict]:
    import typing

    return [m.json_schema_extra for m in typing.get_args(annotated)[1:]
            if isinstance(getattr(m, "json_schema_extra", None), dict)]


def is_list(model: type[BaseModel], name: str) -> bool:
    import typing

    annotation = model.model_fields[name].annotation
    return typing.get_origin(annotation) is list


def free_fields(model: type[BaseModel]) -> tuple[str, ...]:
    """The fields that are values, not references."""
    refs = reference_fields(model)
    return tuple(name for name in model.model_fields if name not in refs)


def tenant_option_fields() -> dict[str, str]:
    """Backend option -> how a tenant may give it (value, asset, server), from the declarations."""
    from portrait.core.options import tenant_options
    from portrait.stages.backends import BACKENDS

    return tenant_options(BACKENDS.specs())
