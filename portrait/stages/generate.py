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

from portrait.core.backend import BackendSpec, FastMode
from portrait.core.config import Preset
from portrait.core.declare import policy_from
from portrait.core.errors import BadInput
from portrait.core.loaders import SCHEDULERS
from portrait.core.options import Resolved, backend_options
from portrait.core.request import bounds, given_settings
from portrait.core.types import Candidate, GenerationRequest, Identity
from portrait.stages.backends import BACKENDS
from portrait.stages.templates import Template


# --- request resolution ------------------------------------------------------------------


@dataclass(frozen=True)
class GeneratePolicy:
    """The preset's `generate` section (the declaration: type, default, bounds). The bounds of the
    settings a request can override (steps, guidance, LoRA weight) are the request declaration's
    (portrait.core.request), not restated here."""

    SECTION: ClassVar[str] = "generate"

    backend: str = "lora"
    style: str = "business"  # default style template
    photo_template: str = "hopper"  # default photo template for the template backend
    resolution: Annotated[int, Field(ge=8, le=8192)] = 512  # templates' sizes are given at 512 and scaled to this
    size_multiple: Annotated[int, Field(ge=1, le=512)] = 8
    n: Annotated[int, Field(ge=1)] = 4
    steps: Annotated[int, *bounds("steps")] = 30
    steps_cap: Annotated[int, *bounds("steps")] | None = None  # the tiny preset caps steps so tests run in seconds
    guidance: Annotated[float, *bounds("guidance")] = 7.0
    scheduler: str = "dpmpp_2m_karras"
    lora_weight: Annotated[float, *bounds("lora_weight")] = 0.9
    negative: str = ""  # appended to every negative prompt
    face_backend: str = "dlib"  # to find faces in photo templates
    memory: dict[Literal["vae_slicing", "vae_tiling", "batch", "offload"], Any] = field(default_factory=dict)  # auto: decided from free VRAM on CUDA; true/false forces (batch: candidates per call, auto or a number)
    # Limits, checked before anything is allocated (`--size 40000x40000` would ask for gigabytes).
    max_side: Annotated[int, Field(ge=8)] = 2048  # px, width and height each
    max_pixels: Annotated[int, Field(ge=64)] = 2048 * 2048  # width x height
    max_n: Annotated[int, Field(ge=1)] = 64  # images per call
    max_steps: Annotated[int, *bounds("steps")] = 150  # denoising steps
    max_sequence_length: Annotated[int, Field(ge=16, le=512)] = 512  # FLUX: T5 tokens of the prompt

    @classmethod
    def from_preset(cls, preset: Preset) -> "GeneratePolicy":
        return policy_from(cls, preset.section("generate"), f"preset '{preset.name}' generate")


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
    """The one resolution every door goes through (CLI, Python API, batch items, the service):
    the overrides checked against their declaration (portrait.core.request), the backend's
    options typed and checked against that backend alone, the fast mode applied from what the
    backend declares, the limits checked; then every value is trusted downstream.

    Order, lowest first: preset < template < explicit override. A fast mode sits just above
    where it was asked for: a template's `fast: lcm` gives way to that template's own steps,
    sampler and CFG; `--fast` (or a spec's / request's `fast`) to explicit values only.

    `people`: more identities in the picture, already loaded (the flow resolves names; the
    service resolves a tenant's own ids), recorded by name in the options' `identities`."""
    given = given_settings(overrides)
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
    width, height = _size(t, policy, given)
    if policy.scheduler == "flow_euler" and t.scheduler != "flow_euler":
        # A FLUX preset: style templates are written for SD (their sampler and CFG scale mean
        # nothing to FLUX's flow-matching Euler and distilled guidance): the preset's apply.
        t = replace(t, scheduler=None, guidance=None, fast=None)
    mode_name, mode = _fast_mode(spec, given.get("fast"), t.fast, t.name)

    def pick(name: str, from_template: Any, from_preset: Any) -> Any:
        if name in given:
            return given[name]
        if mode is not None and "fast" in given:
            return getattr(mode, name)
        if from_template is not None:
            return from_template
        return getattr(mode, name) if mode is not None else from_preset

    steps = int(pick("steps", t.steps, policy.steps))
    if policy.steps_cap and "steps" not in given:  # caps the template's, preset's and mode's steps; --steps wins
        steps = min(steps, policy.steps_cap)
    n = _whole(n if n is not None else policy.n, "--n")
    check_limits(n, steps, policy)
    scheduler = str(pick("scheduler", t.scheduler, policy.scheduler))
    if scheduler not in SCHEDULERS:
        raise BadInput(f"unknown scheduler '{scheduler}' (known: {', '.join(SCHEDULERS)})")
    composition = _composition(spec, given.get("composition"), t.composition)
    if given.get("controls") and not spec.controls:
        able = [s.name for s in BACKENDS.specs() if s.controls]
        raise BadInput(f"--control {', '.join(given['controls'])}: backend '{backend}' takes no ControlNets "
                       f"(backends that do: {', '.join(able)})")
    # A template's ControlNets are for the backends that feed them; the others' requests leave them out.
    template_controls = list(t.controls) if spec.controls else []
    controls = {c.name: c.strength for c in template_controls}
    controls.update(given.get("controls") or {})
    user_options = dict(given.get("options") or {})
    others = tuple(p for p in people if p.name != identity.name)
    if user_options.get("identities") and [p.name for p in others] != [n for n in user_options["identities"]
                                                                       if n != identity.name]:
        raise BadInput("option identities: give the identities themselves (people=), not only their names")
    if others:
        user_options["identities"] = [p.name for p in others]
    if user_options.get("identities") and not spec.group:
        groups = [s.name for s in BACKENDS.specs() if s.group]
        raise BadInput(f"--with-identity: backend '{backend}' paints one identity; several people in one "
                       f"picture need a group photo template (backend template) or --backend "
                       f"{'|'.join(g for g in groups if g != 'template') or 'faceid'}")
    # The template's options are its tuning per backend: this backend's apply, the others' stay
    # out (they were checked against their backends when the template was read).
    from_template = {k: v for k, v in t.options.items() if k in spec.options.model_fields}
    options = backend_options(spec, {**from_template, **user_options}, BACKENDS.specs())
    resolved = Resolved(
        composition=composition,
        fast=mode_name,
        fast_lora=mode.lora if mode is not None else None,
        # A template's style LoRA only where the backend applies one: the request records what runs.
        style_lora={"model": t.style_lora.model, "weight": t.style_lora.weight}
        if t.style_lora and spec.style_lora else None,
        control_images={c.name: str(c.image) for c in template_controls if c.image},
        control_preprocessed=[c.name for c in template_controls if c.preprocessed],
        control_range={c.name: (c.start, c.end) for c in template_controls},
        template_image=str(t.image) if t.image else None,
        template_faces=t.faces,
        memory=dict(policy.memory),
        face_backend=policy.face_backend,
    )
    return GenerationRequest(
        identity=identity,
        backend=backend,
        template=t.name or None,
        prompt=text,
        negative_prompt=str(given.get("negative_prompt", negative)),
        width=width,
        height=height,
        steps=steps,
        guidance=float(pick("guidance", t.guidance, policy.guidance)),
        scheduler=scheduler,
        seed=int(seed) if seed is not None else secrets.randbelow(2**31),
        n=n,
        lora_weight=float(given.get("lora_weight", t.lora_weight if t.lora_weight is not None else policy.lora_weight)),
        controls=controls,
        options=options,
        resolved=resolved,
        people=others,
    )


def _fast_mode(spec: BackendSpec, asked: str | None, from_template: str | None,
               template: str) -> tuple[str | None, FastMode | None]:
    """The fast mode asked for (explicitly, else by the template) and how this backend does it;
    a backend that declares no such mode refuses it in one line naming those that do."""
    name = asked or from_template
    if name is None:
        return None, None
    mode = spec.fast.get(name)
    if mode is None:
        able = [s.name for s in BACKENDS.specs() if name in s.fast]
        where = "--fast" if asked else f"template {template}: fast: {name}"
        raise BadInput(f"{where}: backend '{spec.name}' has no {name} mode (backends with one: "
                       f"{', '.join(able) or 'none'})")
    return name, mode


def _composition(spec: BackendSpec, asked: str | None, from_template: str) -> str:
    """How the backend combines the identity LoRA with a style LoRA: the one asked for, refused
    when the backend does not do it; a template's where the backend does it, else merge."""
    if asked is not None:
        if asked not in spec.compositions:
            able = [s.name for s in BACKENDS.specs() if asked in s.compositions]
            raise BadInput(f"--composition {asked}: backend '{spec.name}' combines LoRAs by "
                           f"{', '.join(spec.compositions)} only ({asked}: {', '.join(able) or 'none'})")
        return asked
    return from_template if from_template in spec.compositions else spec.compositions[0]


def _size(t: Template, policy: GeneratePolicy, given: Mapping[str, Any]) -> tuple[int, int]:
    if t.kind == "photo" and t.size is None and t.image is not None:
        from portrait.core.formats.images import image_size

        base = image_size(t.image)  # upright, as fusion reads the template photo
        # A photo template keeps its aspect; its longer side is scaled to the base size.
        longest = max(base)
        size = (base[0] * 512 / longest, base[1] * 512 / longest)
        width, height = scaled_size((int(size[0]), int(size[1])), policy)
    else:
        width, height = scaled_size(t.size or (512, 512), policy)
    width, height = int(given.get("width", width)), int(given.get("height", height))
    m = policy.size_multiple
    if width % m or height % m:
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


def check_limits(n: int, steps: int, policy: GeneratePolicy) -> None:
    """n and steps against the preset's limits (before any model loads); the steps' own bounds
    are the declaration's, checked with the other overrides."""
    if n < 1 or n > policy.max_n:
        raise BadInput(f"--n {n}: must be 1 to {policy.max_n} (preset key generate.max_n)")
    if steps > policy.max_steps:
        raise BadInput(f"--steps {steps}: over the preset's limit of {policy.max_steps} (preset key "
                       f"generate.max_steps)")


# --- backend dispatch ----------------------------------------------------------------------


def backend_spec(name: str) -> BackendSpec:
    """The table's entry for a backend name (one line, exit 2, with the known names)."""
    return BACKENDS.spec(name)


def generate_candidates(request: GenerationRequest, ctx) -> Iterable[Candidate]:
    spec = backend_spec(request.backend)
    if ctx.preset.family not in spec.families:
        raise BadInput(f"backend '{request.backend}' runs on {', '.join(spec.families)}; "
                       f"preset '{ctx.preset.name}' is {ctx.preset.family}")
    from portrait.stages.planning import planned

    # The memory plan comes before anything loads: the backend runs under the context that
    # follows it (dtype, offload strategy, quantization); refused in one line when it fits nowhere.
    return spec.make().generate(request, planned(ctx, request))
