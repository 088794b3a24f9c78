"""The contract every generation backend meets, and the table that lists them.

A backend is one module, `stages/backends/<name>.py`, that declares itself with a
`BackendSpec` (its name, the base families it runs on, its typed options, the preset model
roles it loads, the face-embedding space its adapter reads, whether it needs a trained LoRA, a
one-line help) and is listed by one line
in the table `portrait.stages.backends.BACKENDS`. Everything that names backends reads that
table: request resolution and dispatch (stages/generate.py), `portrait generate --help`,
studio spec validation, the service's backend list and option schema, the license
preflight. A test or a plugin adds one with `portrait.stages.backends.register(spec)`.

A backend turns one resolved GenerationRequest into candidates. It loads what it needs
through ctx (registry + ModelCache, so batch jobs reuse warm pipelines), never imports
another backend or the generate stage (the seeded loop is stages/seeding.py), and records
in each Candidate.info what it actually did (for example {"identity_mode": "zero-shot"}).

Options: `GenerationRequest.options` is the backend's declared options model, built and checked
once before any model loaded (stages/generate.resolve_request): every field typed with its
default, `model_fields_set` holding what was given (what results.json and the PNG metadata
record). `SPEC.read(request)` gives it (and types a plain mapping, as read back from a
results.json).

Modes: `fast` declares, per mode (`lcm`), how the backend renders in few steps: the preset model
role of the distillation LoRA it attaches, the sampler, the steps and the CFG scale. The resolver
applies these once for every door (`--fast`, a template's or a spec's `fast: lcm`, the service);
a backend that declares no mode refuses it in one line naming the backends that have one. So
do `compositions` (how it combines LoRAs) and `controls` (whether it feeds ControlNets): what a
user asks for explicitly and the backend does not do is refused, what a template carries for
other backends is left out of the request (and so out of its metadata). So is a template's
style LoRA for a backend that does not declare `style_lora`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

from pydantic import BaseModel

from .context import RunContext
from .options import NoOptions
from .errors import BadInput
from .types import Candidate, GenerationRequest


LORA_SELECTION = "lora-selection"  # conditioning: the space that selected the LoRA's checkpoints
NO_FACE_SPACE = ""  # conditioning: no face embedding drives the output (plain text to image)
# Candidate.info["identity_mode"] of an image no sampler made (a face fused into a photo): its
# metadata then records the fusion and its source, and no steps, sampler, CFG, LoRA or ControlNet.
FUSION_ONLY = "fusion-only"


@dataclass(frozen=True)
class AdapterSpace:
    """The face-embedding space one identity adapter was trained on, declared by the backend that
    feeds it (`BackendSpec.face_space`, handed to portrait.stages.embed): only that space works,
    another pack's embeddings give a stranger's face."""

    adapter: str  # the adapter's name (messages, and which checkpoint was trained on it)
    pack: str  # insightface pack (registry id) that locates faces and, without `arcface`, embeds them
    recognizer: str  # the pack's ArcFace ONNX file
    normalized: bool  # normed_embedding (True) or raw embedding (False)
    arcface: str | None = None  # preset role of a torch recognizer that replaces the pack's ONNX one

    @property
    def backend(self) -> str:
        """The pack that locates faces (and, without `arcface`, embeds them)."""
        return f"insightface:{self.pack}"

    @property
    def embedder(self) -> str:
        """The embedding space's name (results.json `embedding.space`)."""
        return "facexlib:arcface-irse50" if self.arcface else self.backend


class Backend(Protocol):
    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        """Yield request.n candidates, seeds request.seed, request.seed + 1, ..."""
        ...


@dataclass(frozen=True)
class FastMode:
    """How a backend renders in few steps: the LoRA it attaches (a preset model role; None when
    the mode needs none), the sampler, and the steps and CFG scale the mode wants (a value the
    user gives explicitly still wins)."""

    lora: str | None
    scheduler: str
    steps: int
    guidance: float


# LCM-LoRA (latent-consistency/lcm-lora-sdv1-5, -sdxl): the model cards swap in LCMScheduler and
# sample 2 to 8 steps with guidance off or between 1.0 and 2.0; 6 steps at 1.5 sits in that range
# (the numbers `--fast` has always used).
LCM = FastMode(lora="lcm_lora", scheduler="lcm", steps=6, guidance=1.5)


@dataclass(frozen=True)
class BackendSpec:
    """One backend, declared once (the fields in the order a reader asks about them)."""

    name: str
    families: tuple[str, ...]  # base families it runs on ("sd15", "sdxl")
    make: Callable[[], Backend]  # the backend class (or any zero-argument factory)
    help: str  # one line for `portrait generate --help`, the service and the docs
    options: type[BaseModel] = NoOptions  # its user options: types, defaults, bounds (extra="forbid")
    # The preset model roles it loads (for the license preflight before any model loads): a
    # tuple, or a function of its typed options when they choose the models (variants, versions).
    models: tuple[str, ...] | Callable[[Any], Sequence[str]] = ()
    needs_lora: bool = False  # runs only with a trained identity LoRA (else zero-shot: prepare is enough)
    group: bool = False  # can put several identities in one picture (--with-identity, option `identities`)
    photo_template: bool = False  # takes a photo template (not a style template or a prompt)
    license: str = ""  # a note on the license of what it loads, when it is not the preset's
    finish: Mapping[str, bool] = field(default_factory=dict)  # finish switches it changes by default
    # The face-embedding space its identity adapter reads (stages/embed.py embeds the identity's
    # photos in it): an AdapterSpace, None when no face embedding feeds it, or a function of its
    # typed options returning one of those (a variant or version that reads another space).
    face_space: AdapterSpace | Callable[[Any], AdapterSpace | None] | None = None
    # The face-embedding space its output was conditioned with (scoring ranks in another one:
    # stages/score.py). A space name ("insightface:antelopev2"), NO_FACE_SPACE when no face
    # embedding drives it, LORA_SELECTION when it is the space that picked the identity LoRA's
    # checkpoints; or a function of its typed options returning one of those. Left out: the
    # locating pack of its `face_space` when it has one, else LORA_SELECTION.
    conditioning: str | Callable[[Any], str] | None = None
    # The few-step modes it does, by name ({"lcm": LCM}); `--fast` on a backend without one is refused.
    fast: Mapping[str, FastMode] = field(default_factory=dict)
    # It applies a template's style LoRA: else the template's is left out of its request (and so
    # out of results.json and the metadata, which record only what ran).
    style_lora: bool = False
    # How it combines the identity LoRA with a template's style LoRA (merge, switch, composite);
    # an explicit `--composition` it does not do is refused, a template's falls back to merge.
    compositions: tuple[str, ...] = ("merge",)
    # It feeds the request's ControlNets (a template's `controls:`, `--control`): an explicit
    # `--control` on a backend that does not is refused; a template's are left out of its request.
    controls: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)  # room for a plugin's own facts

    def read(self, request_or_options: GenerationRequest | BaseModel | Mapping[str, Any]) -> Any:
        """This backend's typed options: a request's (typed at resolution), or a mapping typed here
        (a results.json's recorded options: keys it does not declare are other backends' or the
        resolver's and are left out)."""
        options = request_or_options.options if isinstance(request_or_options, GenerationRequest) \
            else request_or_options
        if isinstance(options, self.options):
            return options
        if isinstance(options, BaseModel):
            options = options.model_dump(exclude_unset=True)
        fields = self.options.model_fields
        return self.options.model_validate({k: v for k, v in options.items() if k in fields})

    def model_roles(self, request: GenerationRequest) -> tuple[str, ...]:
        if callable(self.models):
            return tuple(self.models(self.read(request)))
        return tuple(self.models)

    def adapter_space(self, options: GenerationRequest | BaseModel | Mapping[str, Any]) -> AdapterSpace | None:
        """The face space its adapter reads for these options (None: no face embedding feeds it)."""
        return self.face_space(self.read(options)) if callable(self.face_space) else self.face_space

    def conditioning_space(self, options: Mapping[str, Any], selection_space: str | None) -> str | None:
        """The space that shaped this backend's output for these (request) options."""
        if self.conditioning is None:
            adapter = self.adapter_space(options)
            space = adapter.backend if adapter is not None else LORA_SELECTION
        elif callable(self.conditioning):
            space = self.conditioning(self.read(options))
        else:
            space = self.conditioning
        if space == LORA_SELECTION:
            return selection_space
        return space or None

    def option_names(self) -> tuple[str, ...]:
        return tuple(self.options.model_fields)

    @property
    def zero_shot(self) -> bool:
        return not self.needs_lora


class BackendTable:
    """Name -> BackendSpec, in the order the backends were listed (help and docs show that order)."""

    def __init__(self, specs: Iterable[BackendSpec] = ()):
        self._specs: dict[str, BackendSpec] = {}
        for spec in specs:
            self.register(spec)

    def register(self, spec: BackendSpec, *, replace: bool = False) -> BackendSpec:
        if not isinstance(spec, BackendSpec):
            raise TypeError(f"register() takes a BackendSpec, got {type(spec).__name__}")
        if spec.name in self._specs and not replace:
            raise ValueError(f"backend '{spec.name}' is already registered")
        self._specs[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        self._specs.pop(name, None)

    def get(self, name: str) -> BackendSpec | None:
        return self._specs.get(name)

    def spec(self, name: str) -> BackendSpec:
        """The entry for a backend name, else one line (exit 2) with the known names."""
        found = self._specs.get(name)
        if found is None:
            raise BadInput(f"unknown backend '{name}' (known: {', '.join(sorted(self._specs))})")
        return found

    def names(self) -> tuple[str, ...]:
        return tuple(self._specs)

    def specs(self) -> tuple[BackendSpec, ...]:
        return tuple(self._specs.values())

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self):
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def help_line(self) -> str:
        return ", ".join(self._specs)


__all__ = ["FUSION_ONLY", "LCM", "AdapterSpace", "LORA_SELECTION", "NO_FACE_SPACE", "Backend", "BackendSpec", "BackendTable", "FastMode",
           "NoOptions"]
