"""Settings (home, preset, device) and presets.

A preset is YAML in presets/ (data, not code). It may `extends:` another preset and
override only what differs. Each stage reads its own section (`prepare`, `train`,
`generate`, `finish`, `score`, `studio`, `service`, `runtime`) into its own small policy
object, a frozen dataclass that is the declaration of those settings (type, default, bounds;
portrait.core.declare), so a preset states only what differs from the declared defaults.

This module checks the file itself (top-level keys, each section a mapping); every section's
keys are checked against their declarations when the policies are built, and all of them at
once by `portrait.presets.load` (the front doors) and `portrait presets show`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from .errors import BadInput

# libyaml's parser where PyYAML was built with it (the wheels are): the registry and presets
# took 0.86 s of pure-Python parsing per process start (cProfile, `portrait train` on tiny).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    """Parse one YAML document safely (no Python tags), with libyaml when it is present."""
    return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 (a safe loader)

DEFAULT_PRESET = "tiny"
# The base families a preset may name (portrait.core.loaders loads each; a test keeps the two
# lists equal). flux2-klein, zimage and qwen-image-edit are the frontier bases of issue 29.
BASE_FAMILIES = ("sd15", "sdxl", "flux", "flux2-klein", "zimage", "qwen-image-edit")


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser() if value else default


@dataclass(frozen=True)
class Settings:
    """Where things live and what to run on. Built once at the front door and passed down."""

    home: Path = field(default_factory=lambda: _env_path("PORTRAIT_HOME", Path("~/.portrait").expanduser()))
    preset: str = field(default_factory=lambda: os.environ.get("PORTRAIT_PRESET", DEFAULT_PRESET))
    device: str = field(default_factory=lambda: os.environ.get("PORTRAIT_DEVICE", "auto"))
    debug: bool = False
    # license policy (portrait.core.licenses): "any", or "commercial" to load only models a business may use
    license: str = field(default_factory=lambda: os.environ.get("PORTRAIT_LICENSE", "any"))

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def identities_dir(self) -> Path:
        return self.home / "identities"

    def with_(self, **changes: Any) -> "Settings":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class Preset:
    """A resolved preset: its name, base family, model roles and per-stage sections."""

    name: str
    family: str  # one of BASE_FAMILIES
    tiny: bool  # resolve every model to its make-tiny stand-in
    models: dict[str, str]  # role -> registry id (base, vae, controlnet_canny, ...)
    sections: dict[str, dict[str, Any]]
    description: str = ""
    license: str | None = None  # a preset may demand a license policy (e.g. commercial)
    source: str = ""  # the file as messages name it: presets/tiny.yaml, or the user's own file

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.sections.get(name, {}))

    def model(self, role: str) -> str:
        try:
            return self.models[role]
        except KeyError:
            raise BadInput(f"preset '{self.name}': no model for role '{role}'") from None


def presets_root():
    return resources.files("portrait.presets")


def templates_root():
    return resources.files("portrait.templates")


def available_presets() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")]
        for p in presets_root().iterdir()
        if p.name.endswith(".yaml") and p.name not in ("models.yaml", "licenses.yaml")
    )


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# The top-level keys a preset may hold: its identity, and one section per stage.
PRESET_KEYS = ("name", "family", "tiny", "models", "description", "extends", "license")
PRESET_SECTIONS = ("runtime", "prepare", "train", "generate", "finish", "score", "studio", "service")


def _preset_file(name: str) -> tuple[Any, str]:
    """A shipped preset by name, or the user's own preset file (`--preset my.yaml`), which
    may `extends:` a shipped one and override only limits or other keys."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise BadInput(f"{path}: no such preset file")
        return path, str(path)
    return presets_root() / f"{name}.yaml", f"presets/{name}.yaml"


def _read_preset_yaml(name: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    if name in seen:
        raise BadInput(f"preset '{name}': `extends` loops through {' -> '.join(seen + (name,))}")
    path, label = _preset_file(name)
    if not path.is_file():
        known = ", ".join(available_presets())
        raise BadInput(f"unknown preset '{name}' (known: {known}; or give a .yaml file)")
    try:
        data = load_yaml(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BadInput(f"{label}: unreadable preset ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{label}: not a mapping")
    from .declare import refuse_unknown

    refuse_unknown(data, label, PRESET_KEYS + PRESET_SECTIONS)
    for key in PRESET_SECTIONS + ("models",):
        if key in data and not isinstance(data[key], dict):
            raise BadInput(f"{label}: `{key}` must be a mapping")
    for key in ("tiny",):
        if key in data and not isinstance(data[key], bool):
            raise BadInput(f"{label}: `{key}` must be true or false (got {data[key]!r})")
    for role, model_id in (data.get("models") or {}).items():
        if not isinstance(model_id, str):
            raise BadInput(f"{label}: models.{role} must be a registry id (got {model_id!r})")
    parent = data.pop("extends", None)
    if parent:
        return deep_merge(_read_preset_yaml(str(parent), seen + (name,)), data)
    return data


def load_preset(name: str) -> Preset:
    data = _read_preset_yaml(name)
    reserved = {"name", "family", "tiny", "models", "description", "license"}
    family = str(data.get("family", "sd15"))
    if family not in BASE_FAMILIES:
        raise BadInput(f"preset '{name}': family '{family}' is not one of {', '.join(BASE_FAMILIES)}")
    return Preset(
        name=Path(name).stem if name.endswith((".yaml", ".yml")) else name,
        family=family,
        tiny=bool(data.get("tiny", False)),
        models=dict(data.get("models", {})),
        sections={k: v for k, v in data.items() if k not in reserved and isinstance(v, dict)},
        description=str(data.get("description", "")),
        license=str(data["license"]) if data.get("license") else None,
        source=_preset_file(name)[1],
    )


@dataclass(frozen=True)
class RuntimePolicy:
    """The preset's `runtime` section."""

    SECTION: ClassVar[str] = "runtime"

    precision: Literal["auto", "fp32", "float32", "fp16", "float16", "bf16", "bfloat16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    quantize: Literal["none", "int8", "fp8"] = "none"  # FLUX: 8-bit transformer/T5/InfuseNet weights (optimum-quanto)

    @classmethod
    def from_preset(cls, preset: Preset) -> "RuntimePolicy":
        from .declare import from_preset

        return from_preset(cls, preset)
