"""The edit flow: change one of the user's results (background, outfit, expression, lighting)
and keep the face, checked.

    result = edit("out/ana_business_12.png", prompt="make the background a sunny beach", out="out/beach")

The picture is edited by a reference-conditioned model (`klein-ref` on a FLUX.2 [klein] preset,
`qwen-edit` on Qwen-Image-Edit-2511, `kontext` on the flux preset), shown the result first, then
the user's references (an outfit, a backdrop), then the identity's best aligned crop. Every
edited candidate goes through the same finish as generate: the face is re-scored against the
identity in every space scored (the independent one ranks), and below the gate the backend is
asked for new seeds up to the preset's budget; results.json says what was kept. Fusion is off
by default (pasting the reference face back would undo an expression edit); `finish={"fuse":
True}` turns it on.

The identity comes from the result's own `portrait` PNG chunk (or `identity=`); the edit chain
(each step's source file and sha256, prompt, references, backend, seed) travels in the request's
options, so it lands in every PNG's `portrait` chunk and in results.json, and an edit of an edit
extends it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from portrait.core.bundle import load_identity
from portrait.core.config import Settings
from portrait.core.context import Progress, RunContext
from portrait.core.errors import BadInput
from portrait.core.types import Identity
from portrait.flows.generate import GenerationResult, check_out, preflight, run_request
from portrait.stages import generate as gen

# The edit backend of each family (portrait edit without --backend).
EDIT_BACKENDS = {"flux2-klein": "klein-ref", "qwen-image-edit": "qwen-edit", "flux": "kontext"}
MAX_REFERENCES = 3


def edit(image: str | Path, *, prompt: str, references: Sequence[str | Path] = (), backend: str | None = None,
         identity: str | Identity | None = None, n: int | None = 1, seed: int | None = None, out: str | Path,
         settings: Settings | None = None, preset: str | None = None, ctx: RunContext | None = None,
         progress: Progress | None = None, finish: bool | dict[str, bool] | None = None,
         job: str | None = None, record: bool = True, public: Callable[[Path], str] | None = None,
         **overrides: Any) -> GenerationResult:
    """Edit `image` (one of the identity's results) by `prompt` into `out`; returns the ranked edits.

    `job` names the run in results.json and the history (a new id when omitted); `record=False`
    leaves the results history to the caller (the studio records the images as it places them);
    `public` names the source and reference files in the edit chain (default: their resolved
    paths; the service names them by result and asset id, so no server path reaches a tenant)."""
    name_of = public or (lambda path: str(path.resolve()))
    from portrait.flows.prepare import check_out as check_inputs_out

    ctx = ctx or RunContext.create(settings, preset=preset, progress=progress)
    if not prompt or not str(prompt).strip():
        raise BadInput("--prompt: say what to change (e.g. \"a sunny beach behind her\")")
    chosen = backend or EDIT_BACKENDS.get(ctx.preset.family)
    if chosen not in EDIT_BACKENDS.values():
        where = f"--backend {backend}" if backend else f"--preset {ctx.preset.name}"
        raise BadInput(f"{where}: portrait edit runs klein-ref (--preset klein-4b), qwen-edit "
                       f"(--preset qwen-edit) or kontext (--preset flux); preset '{ctx.preset.name}' is "
                       f"{ctx.preset.family}" + ("" if backend else ", which has no edit model"))
    backend = chosen
    if len(references) > MAX_REFERENCES:
        raise BadInput(f"--reference: at most {MAX_REFERENCES} references ({len(references)} given)")
    source = Path(image).expanduser()
    pixels, sha, recorded = _read_result(ctx, source)
    refs = []
    for ref in references:
        ref_path = Path(ref).expanduser()
        ref_pixels, ref_sha, _ = _read_result(ctx, ref_path, what="--reference")
        refs.append({"file": name_of(ref_path), "sha256": ref_sha})
    person = _identity(ctx, identity, recorded, source)
    out = Path(out).expanduser()
    check_inputs_out(out, [source, *references], marker="results.json", what="generate or edit")
    check_out(out)
    policy = gen.GeneratePolicy.from_preset(ctx.preset)
    width, height = fit(pixels.shape[1], pixels.shape[0], policy)
    request = gen.resolve_request(person, policy, template=None, prompt=prompt, backend=backend, n=n, seed=seed,
                                  overrides={"width": width, "height": height, **overrides})
    previous = list(((recorded or {}).get("request", {}).get("options", {}).get("edit") or {}).get("chain") or [])
    step = {"source": name_of(source), "source_sha256": sha, "prompt": request.prompt, "references": refs,
            "backend": backend}
    if recorded and recorded.get("request"):
        step["source_request"] = {k: recorded["request"].get(k) for k in ("backend", "template", "seed", "prompt")}
    files = {step["source"]: str(source), **{row["file"]: str(Path(ref).expanduser())
                                             for row, ref in zip(refs, references)}}
    request = _with_edit(request, {**step, "chain": previous + [step]}, files)
    preflight(ctx, request)
    switches = finish if finish is not None else {"fuse": False}
    result = run_request(ctx, person, request, out, finish=switches, progress=progress, job=job)
    if record:
        from portrait.flows.history import record_generation

        record_generation(ctx.settings, result, job=result.info["run"])  # the identity's results history
    return result


def fit(width: int, height: int, policy: gen.GeneratePolicy) -> tuple[int, int]:
    """The edit's size: the result's aspect with its longer side at the preset's resolution, in
    multiples of its size step (a 4x-upscaled result is edited at the model's own size)."""
    scale = policy.resolution / max(width, height)
    m = policy.size_multiple
    return (max(m, int(round(width * scale / m)) * m), max(m, int(round(height * scale / m)) * m))


def _with_edit(request, edit: dict[str, Any], files: dict[str, str]):
    """The request with the edit the flow set up (never a user option: request.resolved.edit) and
    where its pictures are read from (request.resolved.edit_files, kept out of the record)."""
    import dataclasses

    return dataclasses.replace(request, resolved=request.resolved.model_copy(update={"edit": edit,
                                                                                     "edit_files": files}))


def _read_result(ctx: RunContext, path: Path, what: str = "IMAGE"):
    """The picture (bounded read and decode, as user photos are), its sha256 and its `portrait` chunk."""
    import hashlib
    import io

    from PIL import Image

    from portrait.core.declare import from_preset
    from portrait.core.io import read_input
    from portrait.flows.prepare import PREPARE_READERS
    from portrait.stages.ingest import IngestPolicy, Unusable, decode_image

    policy = from_preset(IngestPolicy, ctx.preset, shared=PREPARE_READERS)
    data = read_input(path, policy.max_file_bytes, "image")
    try:
        pixels = decode_image(data, policy)
    except Unusable as exc:
        raise BadInput(f"{path}: {what} is {exc.reason.replace('_', ' ')} ({exc.detail})") from None
    recorded = None
    try:
        with Image.open(io.BytesIO(data)) as im:
            text = getattr(im, "text", {}) or {}
        if text.get("portrait"):
            recorded = json.loads(text["portrait"])
    except (OSError, ValueError):
        recorded = None  # no readable chunk: not one of our results (an --identity is then needed)
    return pixels, hashlib.sha256(data).hexdigest(), recorded if isinstance(recorded, dict) else None


def _identity(ctx: RunContext, given: str | Identity | None, recorded: dict | None, source: Path) -> Identity:
    if isinstance(given, Identity):
        return given
    name = given or ((recorded or {}).get("request") or {}).get("identity")
    if not name:
        raise BadInput(f"{source}: not a portrait result (no `portrait` metadata naming its identity); "
                       f"give --identity NAME")
    return load_identity(ctx.settings, str(name))
