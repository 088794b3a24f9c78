"""The job spec: what a studio batch should make, and its expansion into items.

A spec (YAML or JSON) names identities (existing bundles, or photo folders to train first),
templates and/or prompts, backends, a count and a seed. `expand` turns it into items:

- one `train` item per identity that has `photos` and no bundle yet;
- one `generate` item per identity x (template | prompt) x backend x image.

Each item's id is a hash of its content (never of its position or of the time), so
submitting the same spec twice adds nothing, and two specs that ask for the same image
share it. Relative paths in a spec are relative to the spec file, like compose files,
so a spec means the same thing from any working directory.

The generate settings a spec may give (size, steps, guidance, scheduler, lora_weight,
negative_prompt, composition, fast, controls, options) are not written here: `job_spec_model`
adds them from their declaration (portrait.core.request), with its bounds, at the top level;
`generate:` takes the same settings by their Python API names (width, height, ...). Backend
options must be taken by at least one of the spec's backends (one line names the backends that
take a stray one), and each item carries only its own backend's.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from portrait.core.bundle import check_name
from portrait.core.errors import BadInput, bad_file


def known_backends() -> tuple[str, ...]:
    """The backends this build has (the backend table, portrait.stages.backends, is the one source)."""
    from portrait.stages.backends import BACKENDS

    return BACKENDS.names()


def zero_shot_backend(name: str) -> bool:
    """A backend that needs no trained LoRA: an identity used only with such backends is
    prepared (`train --zero-shot`) instead of trained (BackendSpec.needs_lora)."""
    from portrait.stages.backends import BACKENDS

    spec = BACKENDS.get(name)
    return spec is not None and spec.zero_shot

ItemKind = Literal["train", "generate"]
SPEC_MAX_BYTES = 10_000_000  # a job spec is text; anything bigger is not one


class IdentitySpec(BaseModel):
    """An identity to use: an existing bundle by name, or photos to train it from first."""

    model_config = ConfigDict(extra="forbid")

    name: str
    photos: str | list[str] | None = None  # a folder, files, or a list of either
    zero_shot: bool | None = None  # None: decided from the spec's backends
    steps: int | None = Field(default=None, ge=1)
    # `portrait train` options for training this identity (resolution, batch_size, lr, rank,
    # alpha, train_text_encoder, optimizer, gradient_checkpointing, mixed_precision).
    train: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        return check_name(value)

    @field_validator("train")
    @classmethod
    def _valid_train(cls, value: dict[str, Any]) -> dict[str, Any]:
        from portrait.flows.train import policy_overrides
        from portrait.stages.train import TrainPolicy

        options = dict(value)
        rank = options.pop("rank", None)
        TrainPolicy.from_section({}, **policy_overrides(rank=rank, **options))  # BadInput names the option
        return value


class JobSpec(BaseModel):
    """The batch spec (see examples/studio.yaml): its own fields; `job_spec_model` adds the
    declared generate settings. Parse with `parse_spec`."""

    model_config = ConfigDict(extra="forbid")

    output: str
    identities: list[IdentitySpec] = Field(min_length=1)
    templates: list[str] = Field(default_factory=list)
    prompts: list[str] = Field(default_factory=list)
    backends: list[str] = Field(default_factory=lambda: ["lora"], min_length=1)
    count: int = Field(default=1, ge=1, le=10_000)
    seed: int = Field(default=0, ge=0)
    preset: str | None = None
    # The generate settings by their Python API names (width, height, steps, fast, options, ...), as
    # on the API; the top-level ones win.
    generate: dict[str, Any] = Field(default_factory=dict)
    # Post-processing switches for the finish flow (fuse, retouch, upscale, gate, ...);
    # `finish: false` turns finishing off.
    finish: bool | dict[str, bool] = True

    @field_validator("identities", mode="before")
    @classmethod
    def _names_as_identities(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("templates", "prompts", "backends", mode="before")
    @classmethod
    def _one_as_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("backends")
    @classmethod
    def _known_backends(cls, value: list[str]) -> list[str]:
        known = known_backends()
        unknown = [b for b in value if b not in known]
        if unknown:
            raise ValueError(f"unknown backend {', '.join(unknown)} (known: {', '.join(known)})")
        return list(dict.fromkeys(value))

    @field_validator("generate")
    @classmethod
    def _declared_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        from portrait.core.request import given_settings

        given_settings(value, "generate")  # against the declaration (BadInput is our one line: exit 2)
        return value

    def settings(self) -> dict[str, Any]:
        """The declared settings given at the top level, by their declared names (size split)."""
        from portrait.core.request import door_names, split_pairs

        return split_pairs({name: getattr(self, name, None) for name in door_names()
                            if getattr(self, name, None) is not None})

    def overrides(self) -> dict[str, Any]:
        """The generate overrides every item of this spec carries (None means: template default)."""
        merged = {**self.generate, **self.settings()}
        options = {**(self.generate.get("options") or {}), **(self.settings().get("options") or {})}
        if options:
            merged["options"] = options
        return {k: v for k, v in merged.items() if v is not None}

    @model_validator(mode="after")
    def _something_to_make(self) -> "JobSpec":
        if not self.templates and not self.prompts:
            raise ValueError("give at least one of `templates` or `prompts`")
        names = [i.name for i in self.identities]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"identity listed twice: {', '.join(duplicated)}")
        options = self.overrides().get("options")
        if options:
            from portrait.core.options import refuse_foreign, validate_options
            from portrait.stages.backends import BACKENDS

            chosen = [BACKENDS.get(b) for b in self.backends]
            # each key taken by one of the spec's backends, its value checked by them (one line, exit 2)
            refuse_foreign(options, chosen, BACKENDS.specs(), "generate")
            validate_options(options, "generate", chosen)
        return self


def job_spec_model() -> type[JobSpec]:
    """The spec's schema: JobSpec's own fields and the declared generate settings at the top level."""
    from portrait.core.request import door_model

    return door_model("JobSpec", base=JobSpec)  # type: ignore[return-value]


def backend_overrides(overrides: dict[str, Any], backend: str) -> dict[str, Any]:
    """One item's overrides: the backend options its backend takes (a spec's options may be
    meant for its other backends), the rest as given."""
    from portrait.stages.backends import BACKENDS

    options = overrides.get("options")
    if not options:
        return overrides
    spec = BACKENDS.get(backend)
    mine = {k: v for k, v in options.items() if spec is not None and k in spec.options.model_fields}
    out = {k: v for k, v in overrides.items() if k != "options"}
    if mine:
        out["options"] = dict(sorted(mine.items()))
    return out


@dataclass(frozen=True)
class Item:
    """One unit of work in the store. `payload` is everything the executor needs, as JSON."""

    id: str
    kind: ItemKind
    group: str  # items of one group share warm pipelines: preset/backend/identity
    order: int  # position within the spec, for a stable run order
    label: str  # human-readable: "alice / business / lora #2"
    payload: dict[str, Any]
    depends_on: str | None = None  # the train item this one waits for

    @property
    def priority(self) -> int:
        # Training first: every generate item of that identity waits for it.
        return 0 if self.kind == "train" else 1

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "group": self.group, "order": self.order, "label": self.label,
                "payload": self.payload, "depends_on": self.depends_on}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "Item":
        return cls(id=row["id"], kind=row["kind"], group=row["group"], order=int(row["order"]), label=row["label"],
                   payload=dict(row["payload"]), depends_on=row.get("depends_on"))


@dataclass(frozen=True)
class Job:
    """A spec, resolved and expanded. `id` is a hash of the resolved spec."""

    id: str
    source: str
    spec: dict[str, Any]
    items: tuple[Item, ...] = field(default=())


def content_id(content: dict[str, Any], length: int = 16) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:length]


def slug(text: str, limit: int = 40) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return cleaned[:limit].strip("-") or "prompt"


def load_spec(path: Path | str) -> JobSpec:
    """Read and validate a spec file; any problem is one BadInput line naming the file."""
    from portrait.core.io import read_input

    path = Path(path)
    if not path.exists():
        raise bad_file(path, "no such spec file")
    text = read_input(path, SPEC_MAX_BYTES, "spec file")  # a FIFO or device is refused by type
    try:
        data = yaml.safe_load(text.decode("utf-8"))  # YAML is a superset of JSON
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise bad_file(path, f"unreadable spec ({exc.__class__.__name__}: {str(exc).splitlines()[0]})") from None
    return parse_spec(data, source=str(path))


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    if not isinstance(data, dict):
        raise bad_file(source, "a spec must be a mapping (output, identities, templates, ...)")
    try:
        return job_spec_model().model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise bad_file(source, f"{where}: {first['msg']}{more}") from None
    except BadInput as exc:  # check_name raises our own one-liner
        raise bad_file(source, str(exc)) from None


def _resolve(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else base / path).resolve())


def _photo_paths(base: Path, photos: str | list[str]) -> list[str]:
    return [_resolve(base, p) for p in ([photos] if isinstance(photos, str) else photos)]


def _is_template_path(value: str) -> bool:
    """A template written as a path (a .yaml or a folder), not a shipped template's name."""
    return value.lower().endswith((".yaml", ".yml")) or "/" in value or value.startswith(("~", "."))


def template_ref(base: Path, value: str) -> tuple[str, str]:
    """(what the executor loads, the output folder name). A path resolves against the spec
    file's folder; its output folder is derived from its name (`<stem>-<hash6>`), never the
    raw path, so results never land in the user's template folder."""
    if not _is_template_path(value):
        return value, slug(value)
    resolved = _resolve(base, value)
    path = Path(resolved)
    name = path.parent.name if path.name.lower() in ("template.yaml", "template.yml") else (
        path.stem if path.suffix.lower() in (".yaml", ".yml") else path.name)
    return resolved, f"{slug(name)}-{hashlib.sha256(resolved.encode()).hexdigest()[:6]}"


def train_item(name: str, photos: list[str], *, zero_shot: bool, preset: str, steps: int | None,
               order: int = 0, train: dict | None = None) -> Item:
    """The item that trains (or, zero-shot, prepares) one identity from absolute photo paths.
    `train` holds trainer options (rank, lr, ...): in the payload only when given, so the ids
    of specs without it stay as they were."""
    payload = {"name": check_name(name), "photos": list(photos), "zero_shot": bool(zero_shot), "preset": preset,
               "steps": steps}
    if train:
        payload["train"] = dict(sorted(train.items()))
    return Item(id=content_id({"kind": "train", **payload}), kind="train", group=f"{preset}/train/{name}", order=order,
                label=f"{name} / train{' (zero-shot)' if zero_shot else ''}", payload=payload)


def expand(spec: JobSpec, *, base_dir: Path, default_preset: str, identity_exists, source: str = "spec") -> Job:
    """Expand a spec into items. `identity_exists(name) -> bool` decides which need training."""
    preset = spec.preset or default_preset
    output = _resolve(base_dir, spec.output)
    zero_shot_only = all(zero_shot_backend(b) for b in spec.backends)
    overrides = dict(sorted(spec.overrides().items()))
    finish = dict(sorted(spec.finish.items())) if isinstance(spec.finish, dict) else spec.finish
    styles = [("template", *template_ref(base_dir, t)) for t in spec.templates] + [
        ("prompt", p, f"prompt-{slug(p)}") for p in spec.prompts]
    items: list[Item] = []
    order = 0
    for ident in spec.identities:
        train_id = None
        if ident.photos is not None and not identity_exists(ident.name):
            zero_shot = ident.zero_shot if ident.zero_shot is not None else zero_shot_only
            train = train_item(ident.name, _photo_paths(base_dir, ident.photos), zero_shot=zero_shot, preset=preset,
                               steps=ident.steps, order=order, train=ident.train)
            train_id = train.id
            items.append(train)
            order += 1
        for backend in spec.backends:
            for style_kind, style, folder in styles:
                for index in range(spec.count):
                    seed = spec.seed + index
                    payload = {
                        "identity": ident.name,
                        "template": style if style_kind == "template" else None,
                        "prompt": style if style_kind == "prompt" else None,
                        "backend": backend,
                        "preset": preset,
                        "seed": seed,
                        "overrides": backend_overrides(overrides, backend),
                        "finish": finish,
                        "dest": str(Path(output) / ident.name / folder),
                        "stem": f"{backend}-s{seed}",
                    }
                    # depends_on is left out of the id: the same image is the same item
                    # whether its identity was trained by this job or existed already.
                    items.append(Item(
                        id=content_id({"kind": "generate", **payload}), kind="generate",
                        group=f"{preset}/{backend}/{ident.name}", order=order,
                        label=f"{ident.name} / {folder} / {backend} #{index + 1}", payload=payload,
                        depends_on=train_id,
                    ))
                    order += 1
    resolved = spec.model_dump(mode="json")
    resolved.update(output=output, preset=preset, templates=[template_ref(base_dir, t)[0] for t in spec.templates])
    resolved["identities"] = [
        {**i, "photos": _photo_paths(base_dir, i["photos"]) if i.get("photos") is not None else None}
        for i in resolved["identities"]
    ]
    unique = tuple({item.id: item for item in items}.values())
    return Job(id=content_id(resolved, 12), source=source, spec=resolved, items=unique)
