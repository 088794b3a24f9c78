"""Backend `klein-ref`: FLUX.2 [klein] 4B (Apache-2.0) paints the identity from its reference photos.

klein conditions on pictures directly: each reference image is VAE-encoded and its tokens
join the sequence the transformer attends to (Flux2KleinPipeline's `image=[...]`, the same
call that edits a photo). We show it the identity's best aligned crops (stages/references.py:
the bundle's reference.png, then crops of its top photos) with the template's prompt and an
instruction naming the reference images; no face embedding is involved, so scoring ranks in
the independent space (AuraFace under `--license commercial`) with nothing held out.

A klein LoRA in the bundle (trained on the klein base, issue 28) is applied on top (identity
mode `reference+lora`); the finish fuses and scores as for every backend.

Several people (`--with-identity`): each identity's references go in, in order, and the
prompt places them side by side, left to right; each is then assigned the face found in its
strip of the picture, fused with its own reference and scored against its own identity and
the others (the identity-confusion figure).

Options: references (crops per person, 1-4), reference_size (px; 0 = the output's shorter
side), reference_instruction (appended to the prompt; {images} and {person} are filled in).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Iterator

from pydantic import Field

from portrait.core.backend import NO_FACE_SPACE, BackendSpec
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.options import CommonOptions, GroupOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import frontier, loras, references
from portrait.stages.sd import model_info, to_uint8
from portrait.stages.seeding import seeded_candidates

INSTRUCTION = "Keep the face and identity of the {person} in {images} exactly."
GROUP_INSTRUCTION = ("The picture shows {count} people side by side, left to right: {who}. Keep each face "
                     "and identity exactly as in its reference images.")
MAX_REFERENCES = 4


class KleinRefOptions(CommonOptions, GroupOptions):
    references: int = Field(2, ge=1, le=MAX_REFERENCES,
                            description="aligned crops of the identity shown to the model, best first (reference.png first)")
    reference_size: int = Field(0, ge=0, le=1024, description="px of each reference crop (0: the output's shorter side)")
    reference_instruction: str = Field(INSTRUCTION, max_length=400,
                                       description="appended to the prompt ({images}, {person} filled in; empty: none)")
    identity_references: int = Field(1, ge=0, le=3, description="portrait edit: the identity's aligned crops shown "
                                                                "after the image and the user's references")


def people_of(request: GenerationRequest) -> list:
    """The request's identity, then its people in the order given. The flow loaded them (from
    the service's tenant-scoped handles, or the CLI's names): a backend never opens an identity
    from a name (docs/ARCHITECTURE.md#service-tenants)."""
    return [request.identity, *(p for p in request.people if p.name != request.identity.name)]


def strips(count: int, width: int, height: int) -> list[list[float]]:
    """Each person's strip of the picture, left to right, in pixels [x0, y0, x1, y1]."""
    return [[round(k * width / count, 1), 0.0, round((k + 1) * width / count, 1), float(height)] for k in range(count)]


def group_prompt(prompt: str, people_refs: list[tuple[str, int, int]]) -> str:
    """The prompt for several people: who stands where, by reference image numbers (1-based)."""
    who = []
    for k, (name, first, count) in enumerate(people_refs):
        images = f"image {first}" if count == 1 else f"images {first}-{first + count - 1}"
        who.append(f"person {k + 1} from reference {images}")
    return f"{prompt.rstrip(' .')}. " + GROUP_INSTRUCTION.replace("{count}", str(len(people_refs))).replace(
        "{who}", ", ".join(who))


def pipeline_args(ctx: RunContext, request: GenerationRequest, prompt: str, pictures, seed: int) -> dict[str, Any]:
    """The keyword arguments of one Flux2KleinPipeline call (images as PIL, seed as a CPU generator)."""
    return {
        "prompt": prompt,
        "image": [p.pil() for p in pictures] or None,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "max_sequence_length": frontier.max_sequence_length(ctx),
        "generator": frontier.seeded(seed),
        "output_type": "np",
    }


class KleinRefBackend:
    name: ClassVar[str] = "klein-ref"

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        options = SPEC.read(request)
        frontier.check_request(request, ctx, ("flux2-klein",), "klein-4b")
        people = people_of(request)
        size = references.reference_size(request.width, request.height, options.reference_size)
        face_backend = request.resolved.face_backend
        edit = request.resolved.edit
        if edit:  # portrait edit: the result first, the user's references, then the identity's crops
            pictures = references.edit_pictures(edit, request.width, request.height, request.identity.name,
                                                request.resolved.edit_files)
            room = MAX_REFERENCES + 1 - len(pictures)
            if room < 0:
                raise BadInput(f"--reference: klein-ref edits with at most {MAX_REFERENCES} references "
                               f"({len(pictures) - 1} given)")
            count = min(options.identity_references, room)
            if count:
                pictures += list(references.identity_references(ctx, request.identity, count, size, face_backend))
            first = len(pictures) - count + 1
            prompt = references.edit_prompt(request.prompt, list(range(first, len(pictures) + 1)) if count else [])
            per_person = [(request.identity.name, first, count)]
        elif len(people) == 1:
            pictures = references.identity_references(ctx, request.identity, options.references, size, face_backend)
            prompt = frontier.reference_prompt(request.prompt, options.reference_instruction, len(pictures))
            per_person = [(request.identity.name, 1, len(pictures))]
        else:
            each = max(1, options.references // len(people))
            if len(people) > MAX_REFERENCES:
                raise BadInput(f"--with-identity: klein-ref paints at most {MAX_REFERENCES} people "
                               f"({len(people)} given)")
            lists = references.group_references(ctx, people, each, size, face_backend)
            pictures, per_person, first = [], [], 1
            for person, found in zip(people, lists):
                pictures.extend(found)
                per_person.append((person.name, first, len(found)))
                first += len(found)
            prompt = group_prompt(request.prompt, per_person)
        pipe = frontier.load_frontier_pipeline(ctx, request, "edit")
        lora = loras.identity_use(request.identity, ctx.preset.family, request.lora_weight)
        stack = [lora] if lora is not None else []
        loras.attach(pipe, stack)
        info: dict[str, Any] = {
            "identity_mode": ("edit" if edit else "reference") + ("+lora" if stack else ""),
            "model": model_info(ctx),
            "references": [p.info() for p in pictures],
            "prompt_sent": prompt,
            "distilled": bool(getattr(pipe.config, "is_distilled", False)),
            "max_sequence_length": frontier.max_sequence_length(ctx),
            "loras": [u.as_info() for u in stack],
        }
        if not stack:
            info["note"] = f"no {ctx.preset.family} LoRA in the bundle: the likeness comes from the reference photos"
        if edit:
            info["edit"] = {"source": edit["source"], "source_sha256": edit["source_sha256"]}
        if len(people) > 1 and not edit:
            boxes = strips(len(people), request.width, request.height)
            info["faces"] = [{"identity": name, "face": k, "box": box}
                             for k, ((name, _, _), box) in enumerate(zip(per_person, boxes))]

        def render(seed: int):
            with loras.composed(pipe, stack, "merge"):
                return to_uint8(frontier.call(pipe, pipeline_args(ctx, request, prompt, pictures, seed))[0])

        yield from seeded_candidates(request, render, setup_seconds=time.perf_counter() - started, info=info)


SPEC = BackendSpec(
    name="klein-ref",
    families=("flux2-klein",),
    make=KleinRefBackend,
    help="FLUX.2 [klein] 4B from the identity's reference photos (multi-reference; Apache-2.0; + its klein LoRA)",
    options=KleinRefOptions,
    models=("base",),
    group=True,
    conditioning=NO_FACE_SPACE,  # pictures, not a face embedding: every scoring space is independent
)
