"""Templates: style templates (a prompt + settings, a YAML file) and photo templates (a photo
+ face options, a folder with template.yaml), shipped or the user's own.

A template file is declared once: its own fields (prompt, negative, image, controls, ...) here,
and the generate settings it shares with every other door (size, steps, guidance, scheduler,
lora_weight, composition, fast) generated from their declaration (portrait.core.request), so
their bounds are written in one place (`template_file_model`). Unknown keys are refused with the
known ones listed, and its `options:` are checked against the options the registered backends
declare (portrait.core.options). Every path a template names is relative to its own folder and
is checked (exists, is an image, is a LoRA) when the template is read, before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from portrait.core.config import load_yaml, templates_root
from portrait.core.declare import describe, refuse_unknown
from portrait.core.errors import BadInput
from portrait.core.options import validate_options
from portrait.core.request import COMPOSITIONS, CONTROL_NAMES, Strength, door_model  # noqa: F401 (re-exported)

# The generate settings a template file may set (their declaration: portrait.core.request).
TEMPLATE_SETTINGS = ("width", "height", "steps", "guidance", "scheduler", "lora_weight", "composition", "fast")


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet input of a template: which control, from which image, how strong."""

    name: str  # canny | openpose | depth | tile
    strength: float
    image: Path | None = None  # a pose/depth reference shipped with the template
    preprocessed: bool = False  # the image already is the control map (skip the annotator)
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class StyleLora:
    model: str  # registry id or a path to a .safetensors
    weight: float = 0.6


@dataclass(frozen=True)
class Template:
    """A style template (prompt + settings) or a photo template (image + face options)."""

    name: str
    kind: str  # style | photo
    root: Path  # folder that relative paths in the YAML are resolved against
    title: str = ""
    description: str = ""
    prompt: str = ""
    negative: str = ""
    size: tuple[int, int] | None = None  # (width, height) at a 512 px base
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    lora_weight: float | None = None
    composition: str = "merge"
    fast: str | None = None  # "lcm": LCM-LoRA few-step mode
    style_lora: StyleLora | None = None
    controls: tuple[ControlSpec, ...] = ()
    image: Path | None = None  # photo templates: the template photo
    faces: int | None = None  # photo templates: how many faces it should hold
    options: dict[str, Any] = field(default_factory=dict)  # backend-specific (passes, masks, ...)

    @property
    def controls_by_name(self) -> dict[str, ControlSpec]:
        return {c.name: c for c in self.controls}


def _shipped_dir(kind: str) -> Path:
    return Path(str(templates_root())) / ("styles" if kind == "style" else "photos")


def shipped_templates() -> list[Template]:
    """Every template that ships with portrait, styles first, sorted by name."""
    found = [load_template_file(p, "style") for p in sorted(_shipped_dir("style").glob("*.yaml"))]
    photos = _shipped_dir("photo")
    found += [load_template_file(p / "template.yaml", "photo") for p in sorted(photos.iterdir())
              if (p / "template.yaml").is_file()] if photos.is_dir() else []
    return found


def find_template(name: str, kind: str | None = None) -> Template:
    """A shipped template by name, or a user's template by path (a .yaml or a photo folder)."""
    path = Path(name).expanduser()
    if path.suffix.lower() in (".yaml", ".yml") and path.is_file():
        return load_template_file(path, kind or _kind_from_yaml(path))
    if path.is_dir() and (path / "template.yaml").is_file():
        return load_template_file(path / "template.yaml", "photo")
    if path.suffix.lower() in (".yaml", ".yml") or "/" in name:
        raise bad_template(name, "no such template file or folder")
    shipped = shipped_templates()
    matches = [t for t in shipped if t.name == name and (kind is None or t.kind == kind)]
    other = [t for t in shipped if t.name == name]
    if not matches and other:
        known = ", ".join(t.name for t in shipped if t.kind == kind)
        raise BadInput(f"template '{name}' is a {other[0].kind} template; this backend needs a {kind} template "
                       f"(known: {known})")
    if not matches:
        known = ", ".join(t.name for t in shipped_templates() if kind is None or t.kind == kind)
        raise BadInput(f"unknown template '{name}' (known: {known}; or give a .yaml file or a photo template folder)")
    return matches[0]


def bad_template(where: object, reason: str) -> BadInput:
    return BadInput(f"template {where}: {reason}")


def _kind_from_yaml(path: Path) -> str:
    data = _read_yaml(path)
    return "photo" if data.get("image") else "style"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = load_yaml(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise bad_template(path, f"unreadable YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise bad_template(path, "not a mapping")
    return data


class _ControlFile(BaseModel):
    """One `controls:` entry in a template file: a strength, or this mapping."""

    model_config = ConfigDict(extra="forbid")

    strength: Strength = 1.0
    image: str | None = Field(None, min_length=1)
    preprocessed: bool = False
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)


class _StyleLoraFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    weight: float = Field(0.6, ge=-5.0, le=5.0)


class TemplateFileFields(BaseModel):
    """A template YAML's own fields; the shared generate settings are added from their
    declaration by `template_file_model`. Unknown keys are refused with the full list."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1)
    title: str = ""
    description: str = ""
    prompt: str = ""
    negative: str = ""  # appended to the preset's negative prompt
    style_lora: str | _StyleLoraFile | None = None
    controls: dict[Literal[CONTROL_NAMES], Strength | _ControlFile] = Field(  # type: ignore[valid-type]
        default_factory=dict)
    image: str | None = Field(None, min_length=1)
    faces: int | None = Field(None, ge=1, le=64)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("controls", "options", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


def template_file_model() -> type[BaseModel]:
    """The template file's schema: its own fields and the declared settings it shares (the size
    as `size: [W, H]` at a 512 px base)."""
    return door_model("TemplateFile", base=TemplateFileFields, include=TEMPLATE_SETTINGS)


def load_template_file(path: Path, kind: str) -> Template:
    path = Path(path).resolve()
    data = _read_yaml(path)
    root = path.parent
    schema = template_file_model()
    refuse_unknown(data, f"template {path}", schema.model_fields)
    try:
        spec: Any = schema.model_validate(data)
    except ValidationError as exc:
        raise bad_template(path, describe(exc)) from None
    options = validate_options(spec.options, f"template {path}", _backend_specs())
    template = Template(
        name=spec.name or (root.name if kind == "photo" else path.stem),
        kind=kind,
        root=root,
        title=spec.title,
        description=spec.description,
        prompt=spec.prompt,
        negative=spec.negative,
        size=tuple(spec.size) if spec.size else None,
        steps=spec.steps,
        guidance=spec.guidance,
        scheduler=spec.scheduler,
        lora_weight=spec.lora_weight,
        composition=spec.composition or "merge",
        fast=spec.fast,
        style_lora=_style_lora(spec.style_lora, root, path),
        controls=tuple(_control(name, c, root) for name, c in spec.controls.items()),
        image=_inside(root, spec.image) if spec.image else None,
        faces=spec.faces,
        options=options,
    )
    return _checked(template, path)


def _inside(root: Path, value: str) -> Path:
    """A path written in a template: relative to the template's own folder, never the cwd."""
    given = Path(value).expanduser()
    return given if given.is_absolute() else root / given


def _style_lora(value: Any, root: Path, path: Path) -> StyleLora | None:
    if not value:
        return None
    model, weight = (value, 0.6) if isinstance(value, str) else (value.model, value.weight)
    if model.endswith(".safetensors") or "/" in model:
        file = _inside(root, model)
        _check_lora_file(file, path)
        model = str(file)
    return StyleLora(model, float(weight))


def _check_lora_file(file: Path, template: Path) -> None:
    """A style LoRA named by path must be a safetensors file whose header parses, checked
    when the template is read (not after the base model has loaded)."""
    if not file.is_file():
        raise bad_template(template, f"style LoRA {file} does not exist")
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            ok = 2 <= length <= 100_000_000 and json.loads(fh.read(length)) is not None
    except (OSError, ValueError, UnicodeDecodeError):
        ok = False
    if not ok:
        raise bad_template(template, f"style LoRA {file} is not a safetensors LoRA file")


def _control(name: str, spec: float | _ControlFile, root: Path) -> ControlSpec:
    spec = _ControlFile(strength=spec) if isinstance(spec, (int, float)) else spec
    return ControlSpec(
        name=name,
        strength=float(spec.strength),
        image=_inside(root, spec.image) if spec.image else None,
        preprocessed=spec.preprocessed,
        start=spec.start,
        end=spec.end,
    )


def _check_image(file: Path, template: Path, what: str) -> None:
    """An image a template names must open as an image (checked before any model loads)."""
    from PIL import Image, UnidentifiedImageError

    from portrait.core.io import special_kind

    try:
        kind = special_kind(file.stat().st_mode)
        if kind:
            raise bad_template(template, f"{what} {file} is a {kind}, not an image")
        with Image.open(file) as im:
            im.verify()
    except FileNotFoundError:
        raise bad_template(template, f"{what} {file} does not exist") from None
    except PermissionError:
        raise bad_template(template, f"{what} {file}: permission denied") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise bad_template(template, f"{what} {file} is not a readable image ({exc.__class__.__name__})") from None


def _checked(t: Template, path: Path) -> Template:
    for c in t.controls:
        if c.image is not None:
            _check_image(c.image, path, "control image")
    if t.kind == "photo":
        if t.image is None:
            raise bad_template(path, "a photo template needs `image:`")
        _check_image(t.image, path, "photo template image")
    if t.kind == "style" and not t.prompt:
        raise bad_template(path, "a style template needs a prompt")
    return t




def _backend_specs():
    """The registered backends (their declared options are the known template options)."""
    from portrait.stages.backends import BACKENDS

    return BACKENDS.specs()
