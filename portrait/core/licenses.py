"""License policy: which registry models a run may load, and the bill of materials it used.

The issue every anchor's tracker repeats is "may a studio sell these pictures?". The answer
lives in the terms of each weight file, so each registry entry has a license class
(presets/licenses.yaml: commercial / non-commercial / research / unknown, with its source).
A policy names the classes it allows; `--license commercial` (PORTRAIT_LICENSE, or a preset's
`license:`) allows only `commercial`. The registry refuses to resolve anything else, so the
refusal comes before a model is loaded, with one line naming the model, its license and what
to use instead (exit 3, like a missing model). Flows also call `preflight` with the models a
run will need, so a refused backend stops before any work starts.

A make-tiny stand-in is exactly as usable as the real models it stands in for: the tiny
commercial stack must exercise the same refusals as the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

from .errors import BadInput, ModelMissing
from .modelspec import ModelSpec, ResolvedModel


class Registry(Protocol):
    """What the policy reads of a registry (portrait.core.registry.Registry, which imports this
    module to refuse before it resolves)."""

    specs: Mapping[str, ModelSpec]

    def get(self, model_id: str) -> ModelSpec: ...

LICENSE_CLASSES = ("commercial", "non-commercial", "research", "unknown")
POLICIES: dict[str, frozenset[str]] = {
    "any": frozenset(LICENSE_CLASSES),
    "commercial": frozenset({"commercial"}),
}
# Stricter policies first: combining two policies keeps the stricter one.
_STRICTNESS = ("commercial", "any")


def check_policy(name: str | None, what: str = "--license") -> str:
    name = (name or "any").strip().lower()
    if name not in POLICIES:
        raise BadInput(f"{what} '{name}' is not one of {', '.join(POLICIES)}")
    return name


def strictest(*names: str | None) -> str:
    chosen = [check_policy(n) for n in names if n]
    for name in _STRICTNESS:
        if name in chosen:
            return name
    return "any"


class LicenseRefused(ModelMissing):
    """A model the license policy does not allow (exit 3, like a missing model).

    A subclass of ModelMissing on purpose: optional models (the 68-point predictor, CLIP-T,
    the face parser) are skipped with a note exactly as when they are absent.
    """

    def __init__(self, model_id: str, policy: str, license_label: str, license_class: str, alternative: str | None,
                 via: str | None = None):
        self.model_id = model_id
        self.policy = policy
        self.alternative = alternative
        self.command = alternative or ""
        instead = f"; use {alternative} instead" if alternative else ""
        name = f"'{via}' (the stand-in for '{model_id}')" if via else f"'{model_id}'"
        Exception.__init__(self, f"model {name} is refused under --license {policy}: "
                                 f"{license_label} [{license_class}]{instead}")


def effective(registry: Registry, spec: ModelSpec) -> ModelSpec:
    """The spec whose terms apply. A tiny stand-in of only refused models answers for them; one
    that also stands in for an allowed model (tiny-sdxl: sdxl and yamermix-v8) is usable as that."""
    if spec.source != "tiny":
        return spec
    masters = [s for s in registry.specs.values() if s.tiny == spec.id]
    if not masters or any(s.license_class == "commercial" for s in masters):
        return spec
    return masters[0]


def check(registry: Registry, model_id: str, policy: str) -> None:
    """Raise LicenseRefused when `policy` does not allow `model_id` (or what it stands in for)."""
    allowed = POLICIES[check_policy(policy)]
    if allowed == POLICIES["any"]:
        return
    spec = registry.get(model_id)
    terms = effective(registry, spec)
    if terms.license_class not in allowed:
        raise LicenseRefused(terms.id, policy, terms.license, terms.license_class, terms.alternative,
                             via=spec.id if terms is not spec else None)


# What a business runs instead of a refused identity backend: the Apache-2.0 frontier bases
# (issue 29), each scored by AuraFace under the commercial policy.
FRONTIER_ALTERNATIVE = "--preset klein-4b --backend klein-ref or --preset qwen-edit --backend qwen-edit (Apache-2.0)"


def backend_refused(registry: Registry, refused: LicenseRefused, backend: str) -> LicenseRefused:
    """A backend's refusal names the commercial backends to use instead: a refused model whose
    own alternative replaces only the model (auraface for an insightface pack) is not what a
    user of the backend can switch to."""
    if "klein-ref" in (refused.alternative or ""):
        return refused
    spec = registry.get(refused.model_id)
    own = f"; the model's own substitute: {refused.alternative}" if refused.alternative else ""
    return LicenseRefused(refused.model_id, refused.policy, spec.license, spec.license_class,
                          f"{FRONTIER_ALTERNATIVE} (backend {backend} loads this model{own})")


def allowed(registry: Registry, model_id: str, policy: str) -> bool:
    try:
        check(registry, model_id, policy)
        return True
    except LicenseRefused:
        return False


def preflight(registry: Registry, model_ids: Iterable[str], policy: str) -> None:
    """Refuse the run before any work when one of the models it needs is outside the policy."""
    for model_id in model_ids:
        if model_id:
            check(registry, model_id, policy)


# --- bill of materials -----------------------------------------------------------------------


@dataclass(frozen=True)
class BomFile:
    name: str
    sha256: str | None
    size: int | None


def bom_row(registry: Registry, resolved: ResolvedModel, hasher: Callable[[Path], str]) -> dict[str, Any]:
    """One model of a run: id, license (class and source), where it came from, each file's sha256.

    A hash the registry records (checked on download by `portrait models verify`) is used as
    is; other files are hashed here (`hasher` caches by path, size and mtime).
    """
    spec = resolved.spec
    terms = effective(registry, spec)
    files = []
    for name in resolved.files:
        path = resolved.root / name
        if name.endswith("/") or path.is_dir():
            inner = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
            files += [_bom_file(spec, p, str(p.relative_to(resolved.root)), hasher) for p in inner]
        else:
            files.append(_bom_file(spec, path, name, hasher))
    stands_for = sorted(s.id for s in registry.specs.values() if s.tiny == spec.id)
    return {
        "id": spec.id,
        "kind": spec.kind,
        "license": spec.license,
        "license_class": terms.license_class if terms is spec else spec.license_class,
        "license_source": spec.license_source,
        "stands_for": stands_for or None,
        "source": _origin(spec),
        "origin": resolved.origin,
        "root": str(resolved.root),
        "files": [f.__dict__ for f in files],
    }


def _bom_file(spec: ModelSpec, path: Path, name: str, hasher: Callable[[Path], str]) -> BomFile:
    if not path.is_file():
        return BomFile(name, None, None)
    known = spec.sha256.get(name)
    return BomFile(name, known or hasher(path), path.stat().st_size)


def _origin(spec: ModelSpec) -> str:
    if spec.source == "hf":
        return f"hf:{spec.repo}" + (f"@{spec.revision}" if spec.revision else "")
    if spec.source == "url":
        return f"{spec.url}/{spec.archive or ''}".rstrip("/")
    if spec.source == "package":
        return f"package:{spec.package}"
    return f"make-tiny:{spec.maker}"


# Things a run uses that are no registry file: recorded so the bill of materials is complete.
BUILTIN = {
    "dlib-hog-detector": {"id": "dlib-hog-detector", "kind": "dlib-detector", "license": "Boost Software License 1.0",
                          "license_class": "commercial", "license_source": "dlib's LICENSE.txt; the HOG model is compiled into dlib",
                          "stands_for": None, "source": "package:dlib", "origin": "package", "root": None, "files": []},
}
