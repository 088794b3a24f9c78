"""The generate flow: identity + template/prompt -> candidates -> finish -> ranked files.

    result = generate("alice", template="business", n=4, out="out/")

Composes stages only: resolve the request (stages.generate), run the backend, hand the
candidates to the finish flow (fusion / retouch / upscale / score + the similarity gate)
when it is available, then write each image atomically with its metadata chunks and a
ranked results.json (docs/ARCHITECTURE.md#results-json).

Under a license policy the models the request needs are checked before any work
(`preflight`), and results.json carries the run's bill of materials: every model resolved
while it ran, with its files' sha256, license class and source (portrait.core.licenses).
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from portrait.core.bundle import load_identity
from portrait.core.cache import CacheKey
from portrait.core.config import Settings
from portrait.core.context import Progress, RunContext
from portrait.core.errors import BadInput, Interrupted, OutputFailed
from portrait.core.formats.results import results_document
from portrait.core.interrupt import signal_of
from portrait.core.io import (as_published, check_replaceable, discard_dir, make_dirs, publish_dir, safetensors_data_sha256, sha256_file,
                              staging_for, write_image, write_json)
from portrait.core.steps import reporting_steps
from portrait.core.types import Candidate, CandidateScore, GenerationRequest, Identity, RankedResult
from portrait.core.versions import versions
from portrait.flows.history import new_run_id
from portrait.stages import generate as gen
from portrait.stages import metadata, seeding, templates
from portrait.stages.planning import planned
from portrait.stages.backends import BACKENDS


@dataclass(frozen=True)
class GenerationResult:
    identity: str
    backend: str
    template: str | None
    out: Path
    request: GenerationRequest
    results: tuple[RankedResult, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self.results if r.path is not None]

    def as_json(self) -> dict[str, Any]:
        """results.json (docs/ARCHITECTURE.md#results-json), plus the resolved request for reproducibility."""
        return results_document(self.identity, self.backend, self.template, self.results, self.request.record(),
                                self.info)


def generate(identity: str | Identity, *, template: str | templates.Template | None = None, prompt: str | None = None,
             backend: str | None = None, n: int | None = None, seed: int | None = None, out: str | Path,
             settings: Settings | None = None, preset: str | None = None, ctx: RunContext | None = None,
             progress: Progress | None = None, finish: bool | dict[str, bool] = True,
             with_identity: Sequence[str | Identity] = (), keep: int | None = None, attempts: int | None = None,
             upscale_factor: float | None = None, job: str | None = None, cell: Mapping[str, Any] | None = None,
             record: bool = True, **overrides: Any) -> GenerationResult:
    """Generate `n` portraits of an identity into `out` and return them ranked.

    `n`: how many (default: the preset's generate.n). `keep=K` instead: generate until K are
    portraits to keep (a face, alike in the independent space, no copy of a photo, sharp and
    well exposed), within `attempts` candidates (default K x score.keep_attempts); only
    the kept are written, and results.json's `keep` says what was tried and why the others
    were dropped (portrait.flows.finish.keep_gate).
    `with_identity`: more people in the same picture (a group photo template assigns them
    faces left to right after `identity`; `backend="faceid"` gives each a region). A name is
    a bundle of this home (the CLI's); an Identity is used as given (the service hands over
    the bundles it resolved in the tenant's own scope, never a name from a request).
    The option `identities` (names) is the same as `with_identity`.
    `finish`: a dict of finish switches (`{"restore": True}` asks for face restoration; when
    the restorer cannot run, `warnings` in the result says so); `upscale_factor` sets the
    final upscale (finish.upscale.outscale). `job` names the run in the results history
    (portrait.flows.history; a new id when omitted), `cell` the shoot cell it renders;
    `record=False` leaves the history alone (a caller that moves the files records them).
    """
    if keep is not None:
        if n is not None:
            raise BadInput("--n and --keep: give one (--keep K makes K portraits that pass every check)")
        if finish is False:
            raise BadInput("--keep needs scoring to judge the portraits: leave finishing on (no --no-finish)")
        n = keep
    elif attempts is not None:
        raise BadInput("--attempts bounds --keep: give --keep too")
    ctx = ctx or RunContext.create(settings, preset=preset, progress=progress)
    report = progress or ctx.progress
    person = identity if isinstance(identity, Identity) else load_identity(ctx.settings, identity)
    options = dict(overrides.get("options") or {})
    named = [*with_identity, *(options.pop("identities", None) or [])]
    people = [p if isinstance(p, Identity) else load_identity(ctx.settings, p) for p in named]
    if "options" in overrides:
        overrides["options"] = options
    policy = gen.GeneratePolicy.from_preset(ctx.preset)
    chosen = template if isinstance(template, templates.Template) else _template(template, prompt, backend, policy)
    if backend is None and chosen is not None and chosen.kind == "photo":
        backend = _photo_backend()
    request = gen.resolve_request(person, policy, template=chosen, prompt=prompt, backend=backend, n=n, seed=seed,
                                  overrides=overrides, people=people)
    out = Path(out).expanduser()
    preflight(ctx, request)
    finish_policy = _finish_policy(ctx, upscale_factor)
    if keep is not None:
        from portrait.flows.finish import keep_budget

        keep_budget(finish_policy, keep, attempts)  # refused before any model loads
    check_out(out)
    result = run_request(ctx, person, request, out, finish=finish, progress=report, finish_policy=finish_policy,
                         keep=keep, attempts=attempts, job=job, cell=cell)
    if record:
        from portrait.flows.history import record_generation

        record_generation(ctx.settings, result, job=result.info["run"], cell=(cell or {}).get("key"))
    return result


def run_request(ctx: RunContext, person: Identity, request: GenerationRequest, out: Path, *,
                finish: bool | dict[str, bool] = True, progress: Progress | None = None, finish_policy=None,
                keep: int | None = None, attempts: int | None = None, job: str | None = None,
                cell: Mapping[str, Any] | None = None) -> GenerationResult:
    """Run a resolved request to ranked files in `out` (checked by the caller): the backend's
    candidates, the finish and gate (or with `keep`, the keep loop), the images with their
    metadata and results.json, written in a staging folder published whole. `generate` and
    `edit` (flows/edit.py) share it. results.json names the run `job` (a new id when omitted)."""
    report = progress or ctx.progress
    finish_policy = finish_policy or _finish_policy(ctx, None)
    job = job or new_run_id()
    # The memory plan before any model loads (printed under --debug, recorded in results.json),
    # the finishing models included: they share the card with the generation the gate reruns.
    chosen_finish = _switches(ctx, request, finish, finish_policy)
    ctx = planned(ctx, request, None if chosen_finish is None else _finishing_plan(ctx, chosen_finish, finish_policy))

    def run(req: GenerationRequest) -> list[Candidate]:
        found = []
        # Each denoising step is reported (phase "denoise", step / steps; a hook that
        # raises stops the pipeline there: the service cancels a running item so).
        with reporting_steps(lambda done, total: report("denoise", done, total)):
            for cand in gen.generate_candidates(req, ctx):
                found.append(cand)
                report("generate", len(found), req.n)
        return found

    # Everything goes to a staging folder beside OUT, swapped in whole at the end: an
    # interrupted or failed run publishes nothing, and a re-run replaces the old results.
    staging = staging_for(out)
    try:
        with ctx.registry.recording() as used:
            candidates = run(request)
            ranked, notes = _finish(ctx, person, request, candidates, run, finish, finish_policy, keep, attempts)
            written = _write(ctx, staging, person, ranked)
        # what made these images, for reproducing them: versions and the bill of materials
        notes = {"preset": ctx.preset.name, "run": job, **({"cell": dict(cell)} if cell else {}), **notes,
                 "versions": versions(ctx.placement),
                 "license_policy": ctx.settings.license, "bom": bill_of_materials(ctx, used),
                 "memory_plan": ctx.plan.as_dict() if ctx.plan else None}
        staged = GenerationResult(person.name, request.backend, request.template, out, request, tuple(written), notes)
        write_json(staging / "results.json", staged.as_json())
        if ("gate" in notes or "keep" in notes) and written:  # finishing ran (notes always carry versions and the BOM)
            from portrait.flows.finish import write_results_sheet

            write_results_sheet(staging / "contact_sheet.png", written)
        publish_dir(staging, out)
    except OutputFailed as exc:
        raise as_published(exc, staging, out) from None
    except KeyboardInterrupt as exc:
        raise Interrupted(f"{'edit' if request.resolved.edit else 'generate'} stopped; nothing written to "
                          f"{out}", signal_of(exc)) from None
    finally:
        discard_dir(staging)
    final = tuple(dataclasses.replace(r, path=out / r.path.name) for r in written)
    return GenerationResult(person.name, request.backend, request.template, out, request, final, notes)


def _finish_policy(ctx: RunContext, upscale_factor: float | None):
    """The preset's finish policy, with the final upscale factor a request gave (declared bounds)."""
    from portrait.core.declare import policy_from
    from portrait.flows.finish import FinishPolicy
    from portrait.stages.upscale import UpscalePolicy

    policy = FinishPolicy.from_preset(ctx.preset)
    if upscale_factor is None:
        return policy
    upscale = policy_from(UpscalePolicy, None, "--upscale-factor",
                          overrides={**dataclasses.asdict(policy.upscale), "outscale": upscale_factor})
    return dataclasses.replace(policy, upscale=upscale)


def _template(name: str | None, prompt: str | None, backend: str | None, policy: gen.GeneratePolicy):
    if name is None and prompt:
        return None
    spec = BACKENDS.get(backend) if backend else None
    kind = "photo" if spec is not None and spec.photo_template else None
    return templates.find_template(name or gen.default_template_name(policy, backend or policy.backend), kind)


def _photo_backend() -> str:
    """The backend a photo template runs on when none is named (the table's first that takes one)."""
    return next(spec.name for spec in BACKENDS.specs() if spec.photo_template)


def preflight(ctx: RunContext, request: GenerationRequest) -> None:
    """The preset roles the backend declares it loads (BackendSpec.models), checked against the
    license policy before the base model is loaded (the backend resolves them again)."""
    from portrait.core import licenses
    from portrait.flows.finish import FinishPolicy

    roles = list(gen.backend_spec(request.backend).model_roles(request))
    try:  # the backend's own models: a refusal names the commercial backends instead
        licenses.preflight(ctx.registry, [ctx.preset.models.get(role) for role in roles], ctx.settings.license)
    except licenses.LicenseRefused as exc:
        raise licenses.backend_refused(ctx.registry, exc, request.backend) from None
    if FinishPolicy.from_preset(ctx.preset).fuse.method == "inswapper":
        licenses.preflight(ctx.registry, ["inswapper-128"], ctx.settings.license)


def bill_of_materials(ctx: RunContext, used: dict) -> list[dict[str, Any]]:
    """Every model the run resolved: id, license class and source, origin, each file's sha256."""
    from portrait.core.licenses import BUILTIN, bom_row

    rows = [bom_row(ctx.registry, resolved, lambda path: _hashed(ctx, path, "sha256", sha256_file))
            for resolved in used.values()]
    if any(r["id"] == "dlib-face-recognition" for r in rows):
        rows.append(dict(BUILTIN["dlib-hog-detector"]))
    return sorted(rows, key=lambda r: r["id"])


def check_out(out: Path) -> None:
    """OUT is replaced as a unit: it must be new, empty, or an earlier generate result (never a
    folder of the user's other files, such as a template or photo folder)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: --out exists and is not a folder")
    check_replaceable(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise BadInput(f"{out}: --out holds files that are not an earlier generate result; "
                       f"choose a new or empty folder")
    make_dirs(out.parent)


# --- finishing -----------------------------------------------------------------------------


def _finish(ctx: RunContext, identity: Identity, request: GenerationRequest, candidates: list[Candidate],
            run: Callable[[GenerationRequest], list[Candidate]], switches: bool | dict[str, bool], policy,
            keep: int | None = None, attempts: int | None = None) -> tuple[list[RankedResult], dict[str, Any]]:
    """Fusion, retouch, upscale and scoring, then the similarity gate, or the keep loop when
    `keep` is given (portrait.flows.finish).

    `switches`: True = the preset's and template's defaults, False = none (generation order),
    or a dict of stage -> bool overriding them. The template backend fuses inside its own
    passes, so its default skips the extra fusion.
    """
    if switches is False:
        return [RankedResult(c, CandidateScore(similarity=None, reference_similarity=None, faces=0, face_size=0.0),
                             rank=i + 1, passed_gate=True) for i, c in enumerate(candidates)], {}
    from portrait.flows import finish as finish_flow

    chosen = _switches(ctx, request, switches, policy)
    warnings = finish_warnings(ctx, chosen)

    def generate_more(seeds: Sequence[int]) -> list[Candidate]:
        # One request per run of consecutive seeds (the gate asks for consecutive ones), so a
        # backend that batches renders the regenerations in batches too.
        more: list[Candidate] = []
        for start, count in consecutive_runs(seeds):
            more += run(seeding.with_seed(request, start, count))
        return more

    if keep is not None:
        kept = finish_flow.keep_gate(ctx, identity, candidates, chosen, generate_more, keep, policy, attempts)
        notes = {"finish": chosen.as_dict(), "keep": kept.report, "scoring": kept.scoring}
        if warnings:
            notes["warnings"] = warnings
        return kept.results, notes
    outcome = finish_flow.gate(ctx, identity, candidates, chosen, generate_more, want=request.n, policy=policy)
    notes = {"finish": chosen.as_dict(), "gate": {"rounds": outcome.rounds, "evaluated": outcome.evaluated,
                                                  "extra_seeds": list(outcome.extra_seeds), "passed": outcome.passed},
             "scoring": outcome.scoring}
    if warnings:
        notes["warnings"] = warnings
    return outcome.results, notes


def finish_warnings(ctx: RunContext, switches) -> list[str]:
    """What was asked of finishing and cannot run here, one line each (printed by the CLI, shown
    by the service, kept in results.json): today a face restorer that is missing."""
    from portrait.stages import upscale as upscale_stage

    warnings = []
    if switches.restore:
        try:
            restorer, reason = upscale_stage.try_load_restorer(ctx, ctx.preset.model("face_restorer"))
        except BadInput as exc:  # the preset names no restorer
            restorer, reason = None, str(exc)
        if restorer is None:
            warnings.append(f"face restoration was asked for and skipped: {reason}")
    return warnings


def _switches(ctx: RunContext, request: GenerationRequest, switches: bool | dict[str, bool], policy=None):
    """The finishing stages that run: the preset's, the backend's and the template's defaults,
    then `switches` (False: none, so None)."""
    if switches is False:
        return None
    from portrait.flows import finish as finish_flow

    policy = policy or finish_flow.FinishPolicy.from_preset(ctx.preset)
    spec = gen.backend_spec(request.backend)
    return finish_flow.FinishSwitches.from_options(policy.switches, dict(spec.finish), spec.read(request).finish or {},
                                                   switches if isinstance(switches, dict) else {})


def _finishing_plan(ctx: RunContext, chosen, policy=None):
    from portrait.flows import finish as finish_flow

    return finish_flow.finishing_plan(ctx, chosen, policy or finish_flow.FinishPolicy.from_preset(ctx.preset))


def consecutive_runs(seeds: Sequence[int]) -> list[tuple[int, int]]:
    """[5, 6, 7, 9] -> [(5, 3), (9, 1)]: (first seed, count) per run of consecutive seeds."""
    runs: list[tuple[int, int]] = []
    for seed in seeds:
        if runs and seed == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((seed, 1))
    return runs


# --- writing -------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:40] or "prompt"


def _write(ctx: RunContext, out: Path, identity: Identity, ranked: list[RankedResult]) -> list[RankedResult]:
    written = []
    for r in ranked:
        cand = r.candidate
        started = time.perf_counter()
        kind = cand.request.template or ("edit" if cand.request.resolved.edit else "prompt")
        name = f"{_slug(identity.name)}_{_slug(kind)}_{cand.seed}.png"
        model = cand.info.get("model") or {}
        loras = [metadata.LoraUse(u["name"], float(u["weight"]), _lora_hash12(ctx, Path(u["path"])))
                 for u in cand.info.get("loras", []) if u.get("path")]
        model_file = model.get("file")
        chunks = metadata.image_metadata(
            cand,
            model_name=model.get("name", "unknown"),
            model_hash10=(_model_hash(ctx, Path(model_file), model.get("sha256")) or "")[:10] or None
            if model_file else None,
            loras=loras,
            extra={"rank": r.rank, "similarity": r.score.similarity, "passed_gate": r.passed_gate,
                   "versions": versions(ctx.placement)},
        )
        path = write_image(out / name, cand.image, chunks)
        cand.timings["write"] = time.perf_counter() - started
        written.append(RankedResult(cand, r.score, r.rank, r.passed_gate, path))
    return written


def _file_hashes(ctx: RunContext) -> dict:
    """One cache entry holding every file hash of this context (hashing a 4 GB base takes ~15 s)."""
    return ctx.cache.get(CacheKey("file-hashes", "-", "-"), dict)


def _hashed(ctx: RunContext, path: Path, kind: str, compute: Callable[[Path], str]) -> str:
    if kind == "sha256":  # a whole-file hash is remembered across runs by (path, size, mtime)
        from portrait.core.integrity import file_sha256

        return file_sha256(path, ctx.settings.home)
    stat = path.stat()
    key = (kind, str(path), stat.st_size, stat.st_mtime_ns)
    hashes = _file_hashes(ctx)
    if key not in hashes:
        hashes[key] = compute(path)
    return hashes[key]


def _model_hash(ctx: RunContext, path: Path, known: str | None) -> str | None:
    """sha256 of the base checkpoint (A1111 `Model hash` is its first 10 hex)."""
    if known:
        return known
    if not path.is_file():
        return None
    return _hashed(ctx, path, "sha256", sha256_file)


def _lora_hash12(ctx: RunContext, path: Path) -> str:
    """A1111's LoRA hash: sha256 of the safetensors data after the header, first 12 hex."""
    return _hashed(ctx, path, "safetensors-data", safetensors_data_sha256)[:12]
