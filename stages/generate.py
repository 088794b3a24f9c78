"""Generate stage: templates, request resolution, backend dispatch and output metadata.

A GenerationRequest is resolved in one place, lowest priority first:
preset `generate` section  <  template YAML  <  explicit overrides (CLI / API),
and the resolved values travel with every candidate into its PNG chunks and results.json.

Backends are named in BACKENDS as data ("module:Class") and imported only when used, so
`portrait generate --backend lora` never imports InstantID's code, and the zero-shot
backends plug in with a one-line edit of the table.
"""

from __future__ import annotations

import importlib
import json
import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Literal, Mapping

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from portrait.core.declare import describe, policy_from, refuse_unknown
from portrait.core.options import validate_options

from portrait.core.config import Preset, templates_root
from portrait.core.errors import BadInput
from portrait.core.loaders import SCHEDULERS, sampler_label
from portrait.core.types import Candidate, GenerationRequest, Identity

# Backends that put several identities in one picture (option `identities`, `--with-identity`).
GROUP_BACKENDS = ("template", "faceid")

# name -> "module:Class". Zero-shot backends add their rows here.
BACKENDS: dict[str, str] = {
    "lora": "portrait.stages.backends.lora:LoraBackend",
    "template": "portrait.stages.backends.template:TemplateBackend",
    "instantid": "portrait.stages.backends.instantid:InstantIDBackend",
    "faceid": "portrait.stages.backends.faceid:FaceIDBackend",
    "photomaker": "portrait.stages.backends.photomaker:PhotoMakerBackend",
    "pulid": "portrait.stages.backends.pulid:PuLIDBackend",
}

COMPOSITIONS = ("merge", "switch", "composite")
CONTROL_NAMES = ("canny", "openpose", "depth", "tile", "color")  # color feeds the tile ControlNet a mosaic
VERSION = "portrait 0.1"


# --- templates ---------------------------------------------------------------------------


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
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise bad_template(path, f"unreadable YAML ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise bad_template(path, "not a mapping")
    return data


class _ControlFile(BaseModel):
    """One `controls:` entry in a template file: a strength, or this mapping."""

    model_config = ConfigDict(extra="forbid")

    strength: float = Field(1.0, ge=0.0, le=5.0)
    image: str | None = Field(None, min_length=1)
    preprocessed: bool = False
    start: float = Field(0.0, ge=0.0, le=1.0)
    end: float = Field(1.0, ge=0.0, le=1.0)


class _StyleLoraFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    weight: float = Field(0.6, ge=-5.0, le=5.0)


class TemplateFile(BaseModel):
    """A template YAML, declared once: every field, its type and bounds. Unknown keys are
    refused with this list; `options` is checked against portrait.core.options."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1)
    title: str = ""
    description: str = ""
    prompt: str = ""
    negative: str = ""
    size: tuple[Annotated[int, Field(ge=8, le=8192)], Annotated[int, Field(ge=8, le=8192)]] | None = None
    steps: int | None = Field(None, ge=1, le=1000)
    guidance: float | None = Field(None, ge=0.0, le=50.0)
    scheduler: str | None = None
    lora_weight: float | None = Field(None, ge=-5.0, le=5.0)
    composition: Literal["merge", "switch", "composite"] = "merge"
    fast: Literal["lcm"] | None = None
    style_lora: str | _StyleLoraFile | None = None
    controls: dict[str, float | _ControlFile] = Field(default_factory=dict)
    image: str | None = Field(None, min_length=1)
    faces: int | None = Field(None, ge=1, le=64)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("controls", "options", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value


def load_template_file(path: Path, kind: str) -> Template:
    path = Path(path).resolve()
    data = _read_yaml(path)
    root = path.parent
    refuse_unknown(data, f"template {path}", TemplateFile)
    try:
        spec = TemplateFile.model_validate(data)
    except ValidationError as exc:
        raise bad_template(path, describe(exc)) from None
    options = validate_options(spec.options, f"template {path}")
    if spec.scheduler is not None and spec.scheduler not in SCHEDULERS:
        raise bad_template(path, f"scheduler '{spec.scheduler}' is not one of {', '.join(SCHEDULERS)}")
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
        composition=spec.composition,
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
    if t.composition not in COMPOSITIONS:
        raise bad_template(path, f"composition '{t.composition}' is not one of {', '.join(COMPOSITIONS)}")
    for c in t.controls:
        if c.name not in CONTROL_NAMES:
            raise bad_template(path, f"control '{c.name}' is not one of {', '.join(CONTROL_NAMES)}")
        if c.image is not None:
            _check_image(c.image, path, "control image")
    if t.kind == "photo":
        if t.image is None:
            raise bad_template(path, "a photo template needs `image:`")
        _check_image(t.image, path, "photo template image")
    if t.kind == "style" and not t.prompt:
        raise bad_template(path, "a style template needs a prompt")
    if t.fast not in (None, "lcm"):
        raise bad_template(path, f"fast mode '{t.fast}' is not 'lcm'")
    return t


# --- request resolution ------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratePolicy:
    """The preset's `generate` section (the declaration: type, default, bounds)."""

    backend: str = "lora"
    style: str = "business"  # default style template
    photo_template: str = "hopper"  # default photo template for the template backend
    resolution: Annotated[int, Field(ge=8, le=8192)] = 512  # templates' sizes are given at 512 and scaled to this
    size_multiple: Annotated[int, Field(ge=1, le=512)] = 8
    n: Annotated[int, Field(ge=1)] = 4
    steps: Annotated[int, Field(ge=1)] = 30
    steps_cap: Annotated[int, Field(ge=1)] | None = None  # the tiny preset caps steps so tests run in seconds
    guidance: float = 7.0
    scheduler: str = "dpmpp_2m_karras"
    lora_weight: float = 0.9
    negative: str = ""  # appended to every negative prompt
    face_backend: str = "dlib"  # to find faces in photo templates
    memory: dict[str, Any] = field(default_factory=dict)  # vae_slicing/vae_tiling/offload: auto|true|false
    # Limits, checked before anything is allocated (`--size 40000x40000` would ask for gigabytes).
    max_side: Annotated[int, Field(ge=8)] = 2048  # px, width and height each
    max_pixels: Annotated[int, Field(ge=64)] = 2048 * 2048  # width x height
    max_n: Annotated[int, Field(ge=1)] = 64  # images per call
    max_steps: Annotated[int, Field(ge=1)] = 150  # denoising steps

    @classmethod
    def from_preset(cls, preset: Preset) -> "GeneratePolicy":
        return policy_from(cls, preset.section("generate"), f"preset '{preset.name}' generate")


OVERRIDABLE = ("width", "height", "steps", "guidance", "scheduler", "lora_weight", "negative_prompt", "composition",
               "fast", "controls", "options")


def default_template_name(policy: GeneratePolicy, backend: str) -> str:
    return policy.photo_template if backend == "template" else policy.style


def scaled_size(size: tuple[int, int], policy: GeneratePolicy) -> tuple[int, int]:
    scale = policy.resolution / 512
    m = policy.size_multiple
    return tuple(max(m, int(round(v * scale / m)) * m) for v in size)  # type: ignore[return-value]


def fill_prompt(text: str, identity: Identity) -> str:
    """Put the identity's trigger and class word into `{trigger}` / `{class}`."""
    return text.replace("{trigger}", identity.trigger or "").replace("{class}", identity.class_word or "person").replace(
        "  ", " ").strip()


def resolve_request(identity: Identity, policy: GeneratePolicy, *, template: Template | None, prompt: str | None,
                    backend: str | None, n: int | None, seed: int | None,
                    overrides: Mapping[str, Any] | None = None) -> GenerationRequest:
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise BadInput(f"unknown generate option(s): {', '.join(unknown)} (known: {', '.join(OVERRIDABLE)})")
    backend = backend or policy.backend
    if backend not in BACKENDS:
        raise BadInput(f"unknown backend '{backend}' (known: {', '.join(sorted(BACKENDS))})")
    if backend == "template" and (template is None or template.kind != "photo"):
        raise BadInput(f"the template backend needs a photo template (got {template.name if template else 'a prompt'})")
    t = template or Template(name="", kind="style", root=Path("."))
    text = fill_prompt(prompt if prompt else t.prompt, identity)
    if not text:
        text = fill_prompt("portrait photo of {trigger} {class}", identity)
    negative = ", ".join(x for x in (t.negative, policy.negative) if x)
    width, height = _size(t, policy, overrides)
    steps = int(t.steps or policy.steps)
    if policy.steps_cap:  # caps the template's and preset's steps; an explicit --steps wins
        steps = min(steps, policy.steps_cap)
    steps = _whole(overrides.get("steps", steps), "--steps")
    n = _whole(n if n is not None else policy.n, "--n")
    check_limits(n, steps, policy)
    fast = overrides.get("fast", t.fast)
    if fast not in (None, "lcm"):
        raise BadInput(f"fast mode '{fast}' is not 'lcm'")
    controls = {c.name: c.strength for c in t.controls}
    controls.update(_control_overrides(overrides.get("controls") or {}))
    user_options = validate_options(overrides.get("options"), "--option")
    options: dict[str, Any] = {
        "composition": overrides.get("composition", t.composition),
        "fast": fast,
        "style_lora": {"model": t.style_lora.model, "weight": t.style_lora.weight} if t.style_lora else None,
        "control_images": {c.name: str(c.image) for c in t.controls if c.image},
        "control_preprocessed": [c.name for c in t.controls if c.preprocessed],
        "control_range": {c.name: [c.start, c.end] for c in t.controls},
        "template_image": str(t.image) if t.image else None,
        "template_faces": t.faces,
        "memory": dict(policy.memory),
        "face_backend": policy.face_backend,
        **t.options,
        **user_options,
    }
    scheduler = str(overrides.get("scheduler", t.scheduler or ("lcm" if fast == "lcm" else policy.scheduler)))
    if scheduler not in SCHEDULERS:
        raise BadInput(f"unknown scheduler '{scheduler}' (known: {', '.join(SCHEDULERS)})")
    if options["composition"] not in COMPOSITIONS:
        raise BadInput(f"--composition '{options['composition']}' is not one of {', '.join(COMPOSITIONS)}")
    return GenerationRequest(
        identity=identity,
        backend=backend,
        template=t.name or None,
        prompt=text,
        negative_prompt=str(overrides.get("negative_prompt", negative)),
        width=width,
        height=height,
        steps=steps,
        guidance=_number(overrides.get("guidance", t.guidance if t.guidance is not None else policy.guidance),
                         "--guidance", 0.0, 50.0),
        scheduler=scheduler,
        seed=int(seed) if seed is not None else secrets.randbelow(2**31),
        n=n,
        lora_weight=_number(overrides.get("lora_weight",
                                          t.lora_weight if t.lora_weight is not None else policy.lora_weight),
                            "--lora-weight", -5.0, 5.0),
        controls=controls,
        options=options,
    )


def _size(t: Template, policy: GeneratePolicy, overrides: Mapping[str, Any]) -> tuple[int, int]:
    if t.kind == "photo" and t.size is None and t.image is not None:
        from PIL import Image

        with Image.open(t.image) as im:
            base = im.size
        # A photo template keeps its aspect; its longer side is scaled to the base size.
        longest = max(base)
        size = (base[0] * 512 / longest, base[1] * 512 / longest)
        width, height = scaled_size((int(size[0]), int(size[1])), policy)
    else:
        width, height = scaled_size(t.size or (512, 512), policy)
    width = _whole(overrides.get("width", width), "--size width")
    height = _whole(overrides.get("height", height), "--size height")
    m = policy.size_multiple
    if width % m or height % m or width <= 0 or height <= 0:
        raise BadInput(f"--size {width}x{height}: width and height must be positive multiples of {m}")
    if max(width, height) > policy.max_side or width * height > policy.max_pixels:
        raise BadInput(f"--size {width}x{height}: over the limit of {policy.max_side} px a side and "
                       f"{policy.max_pixels:,} pixels (preset keys generate.max_side, generate.max_pixels)")
    return width, height


def _whole(value: Any, what: str) -> int:
    """An int from a user value; a float with a fraction, a bool or text is refused."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise BadInput(f"{what}: '{value}' is not a whole number")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BadInput(f"{what}: '{value}' is not a whole number") from None


def _number(value: Any, what: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadInput(f"{what}: '{value}' is not a number") from None
    if not low <= number <= high:
        raise BadInput(f"{what} {number:g}: must be in [{low:g}, {high:g}]")
    return number


def _control_overrides(value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping):
        raise BadInput(f"controls: expected a mapping of control name to strength, got {type(value).__name__}")
    out = {}
    for name, strength in value.items():
        if name not in CONTROL_NAMES:
            raise BadInput(f"control '{name}' is not one of {', '.join(CONTROL_NAMES)}")
        out[name] = _number(strength, f"control {name}", 0.0, 5.0)
    return out


def check_limits(n: int, steps: int, policy: GeneratePolicy) -> None:
    """n and steps against the preset's limits (before any model loads)."""
    if n < 1 or n > policy.max_n:
        raise BadInput(f"--n {n}: must be 1 to {policy.max_n} (preset key generate.max_n)")
    if steps < 1 or steps > policy.max_steps:
        raise BadInput(f"--steps {steps}: must be 1 to {policy.max_steps} (preset key generate.max_steps)")


def candidate_seeds(request: GenerationRequest) -> list[int]:
    return [(request.seed + i) % 2**32 for i in range(request.n)]


def with_seed(request: GenerationRequest, seed: int, n: int = 1) -> GenerationRequest:
    return replace(request, seed=seed, n=n)


def seeded_candidates(request: GenerationRequest, render: Callable[[int], np.ndarray], *, setup_seconds: float,
                      info: Mapping[str, Any], render_batch: Callable[[list[int]], list[np.ndarray]] | None = None,
                      batch_size: int = 1) -> Iterator[Candidate]:
    """One candidate per seed of the request, `render(seed)` making each image.

    Every backend's loop: time each image, charge the setup (loading) to the first one, and
    record the seed's own request so a candidate can be regenerated alone. A backend that can
    render several seeds in one call passes `render_batch(seeds)` (one image per seed, each
    equal to its `render(seed)` within float tolerance) and the `batch_size` that fits memory;
    the seeds then go in chunks of that size, and each image is charged its share of its chunk.
    """
    seeds = candidate_seeds(request)
    size = max(1, int(batch_size)) if render_batch is not None else 1
    first = True
    for start in range(0, len(seeds), size):
        chunk = seeds[start:start + size]
        started = time.perf_counter()
        images = render_batch(chunk) if len(chunk) > 1 else [render(chunk[0])]
        if len(images) != len(chunk):
            raise RuntimeError(f"batched render returned {len(images)} images for {len(chunk)} seeds")
        share = (time.perf_counter() - started) / len(chunk)
        for seed, image in zip(chunk, images):
            timings = {"generate": share}
            if first:
                timings["load"] = setup_seconds
                first = False
            yield Candidate(image=image, seed=seed, request=with_seed(request, seed, request.n), timings=timings,
                            info=dict(info))


# --- backend dispatch ----------------------------------------------------------------------


def load_backend(name: str):
    """Instantiate the backend named in BACKENDS (its module is imported only now)."""
    target = BACKENDS.get(name)
    if target is None:
        raise BadInput(f"unknown backend '{name}' (known: {', '.join(sorted(BACKENDS))})")
    module_name, cls_name = target.split(":")
    return getattr(importlib.import_module(module_name), cls_name)()


def generate_candidates(request: GenerationRequest, ctx) -> Iterable[Candidate]:
    backend = load_backend(request.backend)
    if ctx.preset.family not in backend.families:
        raise BadInput(f"backend '{request.backend}' runs on {', '.join(backend.families)}; "
                       f"preset '{ctx.preset.name}' is {ctx.preset.family}")
    if request.options.get("identities") and request.backend not in GROUP_BACKENDS:
        raise BadInput(f"--with-identity: backend '{request.backend}' paints one identity; several people in one "
                       f"picture need a group photo template (backend template) or --backend faceid")
    return backend.generate(request, ctx)


# --- output metadata (DESIGN section 6) ----------------------------------------------------


def _a1111_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(ch in text for ch in ",:\n") else text


def a1111_parameters(prompt: str, negative: str, params: Mapping[str, Any]) -> str:
    """The A1111 `parameters` text: prompt, optional negative line, then `Key: value, ...` last."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_a1111_value(v)}" for k, v in params.items() if v is not None and v != ""))
    return "\n".join(lines)


@dataclass(frozen=True)
class LoraUse:
    """A LoRA that shaped an image, for the `<lora:NAME:W>` prompt tag and `Lora hashes`."""

    name: str
    weight: float
    hash12: str


def image_metadata(candidate: Candidate, *, model_name: str, model_hash10: str | None,
                   loras: Iterable[LoraUse] = (), extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The two PNG text chunks of one output: A1111 `parameters` and our `portrait` JSON."""
    r = candidate.request
    loras = list(loras)
    sampler, schedule = sampler_label(r.scheduler)
    prompt = r.prompt + "".join(f" <lora:{lora.name}:{lora.weight:g}>" for lora in loras)
    params: dict[str, Any] = {
        "Steps": r.steps,
        "Sampler": sampler,
        "Schedule type": schedule or None,
        "CFG scale": f"{r.guidance:g}",
        "Seed": candidate.seed,
        "Size": f"{r.width}x{r.height}",
        "Model hash": model_hash10,
        "Model": model_name,
        "Lora hashes": ", ".join(f"{lora.name}: {lora.hash12}" for lora in loras) or None,
    }
    for name, strength in r.controls.items():
        params[f"ControlNet {name}"] = f"{strength:g}"
    if r.options.get("denoise") is not None:
        params["Denoising strength"] = f"{float(r.options['denoise']):g}"
    params["Version"] = VERSION
    resolved = {**r.resolved(), "seed": candidate.seed, "n": r.n}
    portrait = {"request": resolved, "info": dict(candidate.info), "timings": dict(candidate.timings),
                "model": {"name": model_name, "hash": model_hash10},
                "loras": [{"name": lora.name, "weight": lora.weight, "hash": lora.hash12} for lora in loras],
                **(dict(extra) if extra else {})}
    return {"parameters": a1111_parameters(prompt, r.negative_prompt, params),
            "portrait": json.dumps(portrait, default=str, sort_keys=False)}
