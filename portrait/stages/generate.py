"""Generate stage: request resolution and backend dispatch.

A GenerationRequest is resolved in one place, lowest priority first:
preset `generate` section  <  template YAML  <  explicit overrides (CLI / API),
and the resolved values travel with every candidate into its PNG chunks and results.json.

Backends are listed in one table (portrait.stages.backends.BACKENDS, a BackendSpec per
backend); dispatch goes through it only. Templates live in stages/templates.py, the seeded
candidate loop backends run in stages/seeding.py, output metadata in stages/metadata.py.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterable, Literal, Mapping, Sequence

from pydantic import Field

from portrait.core.backend import BackendSpec
from portrait.core.config import Preset
from portrait.core.declare import policy_from
from portrait.core.errors import BadInput
from portrait.core.loaders import SCHEDULERS
from portrait.core.options import validate_options
from portrait.core.types import Candidate, GenerationRequest, Identity
from portrait.stages.backends import BACKENDS
from portrait.stages.templates import COMPOSITIONS, CONTROL_NAMES, Template


# --- request resolution ------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratePolicy:
    """The preset's `generate` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "generate"

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
    memory: dict[Literal["vae_slicing", "vae_tiling", "batch", "offload"], Any] = field(default_factory=dict)  # auto: decided from free VRAM on CUDA; true/false forces (batch: candidates per call, auto or a number)
    # Limits, checked before anything is allocated (`--size 40000x40000` would ask for gigabytes).
    max_side: Annotated[int, Field(ge=8)] = 2048  # px, width and height each
    max_pixels: Annotated[int, Field(ge=64)] = 2048 * 2048  # width x height
    max_n: Annotated[int, Field(ge=1)] = 64  # images per call
    max_steps: Annotated[int, Field(ge=1)] = 150  # denoising steps
    max_sequence_length: Annotated[int, Field(ge=16, le=512)] = 512  # FLUX: T5 tokens of the prompt

    @classmethod
    def from_preset(cls, preset: Preset) -> "GeneratePolicy":
        return policy_from(cls, preset.section("generate"), f"preset '{preset.name}' generate")


OVERRIDABLE = ("width", "height", "steps", "guidance", "scheduler", "lora_weight", "negative_prompt", "composition",
               "fast", "controls", "options")


def default_template_name(policy: GeneratePolicy, backend: str) -> str:
    spec = BACKENDS.get(backend)
    return policy.photo_template if spec is not None and spec.photo_template else policy.style


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
                    overrides: Mapping[str, Any] | None = None, people: Sequence[Identity] = ()) -> GenerationRequest:
    """`people`: more identities in the picture, already loaded (the flow resolves names; the
    service resolves a tenant's own ids), recorded by name in options["identities"]."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise BadInput(f"unknown generate option(s): {', '.join(unknown)} (known: {', '.join(OVERRIDABLE)})")
    backend = backend or policy.backend
    spec = backend_spec(backend)
    if spec.photo_template and (template is None or template.kind != "photo"):
        raise BadInput(f"the {backend} backend needs a photo template "
                       f"(got {template.name if template else 'a prompt'})")
    t = template or Template(name="", kind="style", root=Path("."))
    text = fill_prompt(prompt if prompt else t.prompt, identity)
    if not text:
        text = fill_prompt("portrait photo of {trigger} {class}", identity)
    negative = ", ".join(x for x in (t.negative, policy.negative) if x)
    width, height = _size(t, policy, overrides)
    if policy.scheduler == "flow_euler" and t.scheduler != "flow_euler":
        # A FLUX preset: style templates are written for SD (their sampler and CFG scale mean
        # nothing to FLUX's flow-matching Euler and distilled guidance): the preset's apply.
        t = replace(t, scheduler=None, guidance=None, fast=None)
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
    user_options = validate_options(overrides.get("options"), "--option", BACKENDS.specs())
    others = tuple(p for p in people if p.name != identity.name)
    if user_options.get("identities") and [p.name for p in others] != [n for n in user_options["identities"]
                                                                       if n != identity.name]:
        raise BadInput("option identities: give the identities themselves (people=), not only their names")
    if others:
        user_options["identities"] = [p.name for p in others]
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
        people=others,
    )


def _size(t: Template, policy: GeneratePolicy, overrides: Mapping[str, Any]) -> tuple[int, int]:
    if t.kind == "photo" and t.size is None and t.image is not None:
        from portrait.core.formats.images import image_size

        base = image_size(t.image)  # upright, as fusion reads the template photo
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


# --- backend dispatch ----------------------------------------------------------------------


def backend_spec(name: str) -> BackendSpec:
    """The table's entry for a backend name (one line, exit 2, with the known names)."""
    spec = BACKENDS.get(name)
    if spec is None:
        raise BadInput(f"unknown backend '{name}' (known: {', '.join(sorted(BACKENDS.names()))})")
    return spec


def generate_candidates(request: GenerationRequest, ctx) -> Iterable[Candidate]:
    spec = backend_spec(request.backend)
    if ctx.preset.family not in spec.families:
        raise BadInput(f"backend '{request.backend}' runs on {', '.join(spec.families)}; "
                       f"preset '{ctx.preset.name}' is {ctx.preset.family}")
    if request.options.get("identities") and not spec.group:
        groups = [s.name for s in BACKENDS.specs() if s.group]
        raise BadInput(f"--with-identity: backend '{request.backend}' paints one identity; several people in one "
                       f"picture need a group photo template (backend template) or --backend "
                       f"{'|'.join(g for g in groups if g != 'template') or 'faceid'}")
    return spec.make().generate(request, ctx)
