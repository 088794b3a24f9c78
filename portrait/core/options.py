"""Backend options, declared once: every key a template's `options:` or `--option KEY=VALUE`
may set, with its type and bounds.

The backends read these keys (stages/backends/*, stages/zeroshot.py, stages/embed.py,
stages/backends/photomaker.py); their defaults stay with the backend that reads them, because
one key can mean different defaults per backend (`ip_adapter_scale` is 0.6 for FaceID and
0.8 for InstantID, as in the reference code). A value given here is checked before any
model loads: `--option ip_adapter_scale=abc` or `--option frobnicate=7` is one line, exit 2,
with the list of known keys.

The resolver (stages.generate.resolve_request) adds its own keys to a request's options
(`composition`, `style_lora`, `control_images`, ...); those are not user options and are
declared in RESOLVED_KEYS so nothing reads an undeclared key.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .declare import describe
from .errors import BadInput

Scale = float  # documented alias; bounds are per field


class Pass2(BaseModel):
    """The template backend's second (ring) pass."""

    model_config = ConfigDict(extra="forbid")

    denoise: float | None = Field(None, ge=0.0, le=1.0)
    ring: float | None = Field(None, ge=0.0, le=1.0)
    controls: dict[Literal["canny", "openpose", "depth", "tile", "color"], float] | None = None


class BackendOptions(BaseModel):
    """Every user-settable backend option (template `options:` and `--option`)."""

    model_config = ConfigDict(extra="forbid")

    # zero-shot adapters (stages/zeroshot.py)
    ip_adapter_scale: float | None = Field(None, ge=0.0, le=5.0, description="IP-Adapter scale (FaceID 0.6, InstantID 0.8)")
    s_scale: float | None = Field(None, ge=0.0, le=5.0, description="FaceID PlusV2 shortcut weight")
    faceid_variant: Literal["faceid", "plus", "plusv2"] | None = None
    faceid_lora_scale: float | None = Field(None, ge=0.0, le=5.0)
    faceid_model: str | None = Field(None, min_length=1, description="registry id or file overriding the preset's role")
    controlnet_conditioning_scale: float | None = Field(None, ge=0.0, le=5.0, description="InstantID IdentityNet scale")
    pose_image: str | None = Field(None, min_length=1, description="InstantID pose reference image")
    # PhotoMaker (stages/backends/photomaker.py)
    photomaker_version: Literal["v1", "v2", "1", "2"] | None = None
    photomaker_model: str | None = Field(None, min_length=1)
    start_merge_step: int | None = Field(None, ge=0, le=10_000)
    style_strength: float | None = Field(None, ge=0.0, le=1.0)
    trigger: str | None = Field(None, min_length=1)
    # PuLID (stages/backends/pulid.py)
    id_scale: float | None = Field(None, ge=0.0, le=5.0, description="PuLID ID attention scale (0.8)")
    pulid_mode: Literal["fidelity", "style", "plain"] | None = None
    pulid_num_zero: int | None = Field(None, ge=0, le=64, description="zero tokens appended to PuLID's ID tokens")
    pulid_ortho: Literal["off", "v1", "v2"] | None = None
    pulid_schedule: Literal["karras", "lightning"] | None = None
    # identity embeddings (stages/embed.py)
    id_mode: Literal["mean", "all", "best"] | None = None
    id_photos: int | None = Field(None, ge=1, le=64)
    face_locator: Literal["auto", "pack", "dlib"] | None = None
    face_pack: str | None = Field(None, min_length=1)
    # photo templates (stages/backends/template.py)
    identity_adapter: Literal["faceid"] | None = None
    passes: Literal[0, 1, 2] | None = Field(None, description="2 face + ring, 1 face only, 0 fusion only (preview)")
    denoise: float | None = Field(None, ge=0.0, le=1.0)
    crop_scale: float | None = Field(None, gt=0.0, le=10.0)
    mask_grow: float | None = Field(None, ge=0.0, le=2.0)
    color_transfer: bool | None = None
    fuse_ratio: float | None = Field(None, ge=0.0, le=1.0)
    pass2: Pass2 | None = None
    assign: Literal["left_to_right"] | list[int] | None = None
    identities: list[str] | None = None  # more people in one picture (group template faces, or faceid regions)
    regions: list[list[float]] | None = Field(None, description="faceid with identities: one [x0, y0, x1, y1] box "
                                                                "(fractions of the image) per identity")
    crop_size: int | None = Field(None, ge=8, le=4096)
    # finishing switches per template (portrait/flows/finish.py STAGES)
    finish: dict[Literal["fuse", "retouch", "upscale", "restore", "score", "clip"], bool | None] | None = None

    @field_validator("photomaker_version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


# Keys the resolver itself puts into a request's options (never user options).
RESOLVED_KEYS = ("composition", "fast", "style_lora", "control_images", "control_preprocessed", "control_range",
                 "template_image", "template_faces", "memory", "face_backend")


def known_options() -> tuple[str, ...]:
    return tuple(sorted(BackendOptions.model_fields))


def validate_options(values: Mapping[str, Any] | None, where: str) -> dict[str, Any]:
    """Check user options against the declaration; returns them typed (only the keys given).

    `where` names the source: `--option` (each key is shown as `--option KEY`) or a template
    file (shown as `template FILE: options.KEY`)."""
    values = dict(values or {})
    if not values:
        return {}
    flag = where == "--option"
    known = ", ".join(known_options())
    for key in values:
        if key not in BackendOptions.model_fields:
            if flag:
                raise BadInput(f"--option {key}: unknown option (known: {known})")
            raise BadInput(f"{where}: options: unknown key {key!r} (known: {known})")
    try:
        model = BackendOptions.model_validate(values)
    except ValidationError as exc:
        text = describe(exc)
        if flag:
            raise BadInput(f"--option {text}") from None
        raise BadInput(f"{where}: options.{text}") from None
    typed = model.model_dump(exclude_unset=True, mode="python")
    # Keep plain containers (backends read dicts and lists) and drop None-valued nested keys.
    if "pass2" in typed and typed["pass2"] is not None:
        typed["pass2"] = {k: v for k, v in typed["pass2"].items() if v is not None}
    return typed
