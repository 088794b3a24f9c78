"""Backend `qwen-edit`: Qwen-Image-Edit-2511 (Apache-2.0) paints the identity from up to three photos.

Qwen-Image-Edit-2511 reads each reference picture twice: its Qwen2.5-VL text encoder sees
it (at about 384 x 384) beside the prompt, and its VAE latents (at about 1024 x 1024) join
the transformer's sequence (QwenImageEditPlusPipeline, `image=[...]`, at most 3 pictures:
the model card's limit). Its card states better identity preservation and multi-person
consistency than 2509; no face-similarity figure is published, which is why every result is
scored here in the independent space (AuraFace under `--license commercial`).

We show it the identity's best aligned crops (stages/references.py) with the template's
prompt and an instruction naming the pictures; CFG is `true_cfg` (4.0, the card's value) with
the template's negative prompt (a space when it has none, so CFG runs). Option `f2p` applies
DiffSynth-Studio's Qwen-Image-Edit-F2P LoRA (Apache-2.0; face crop -> portrait, trained on
the first Qwen-Image-Edit, so on 2511 it is an option, off by default) at `f2p_weight`.

Several people (`--with-identity`): the pictures of each person in turn (3 in all at most),
placed left to right by the prompt, each face assigned to its strip for fusion and scoring.
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

MAX_PICTURES = 3  # Qwen-Image-Edit-2509/2511: "1 to 3 input images" (model card)
INSTRUCTION = "Keep the face and identity of the {person} in {images} exactly."
GROUP_INSTRUCTION = ("The picture shows {count} people side by side, left to right: {who}. Keep each face and "
                     "identity exactly as in its picture.")


class QwenEditOptions(CommonOptions, GroupOptions):
    references: int = Field(2, ge=1, le=4, description="aligned crops of the identity shown to the model "
                                                       "(qwen-edit takes 3 pictures at most)")
    reference_size: int = Field(0, ge=0, le=1024, description="px of each reference crop (0: the output's shorter side)")
    reference_instruction: str = Field(INSTRUCTION, max_length=400,
                                       description="appended to the prompt ({images}, {person} filled in; empty: none)")
    true_cfg: float = Field(4.0, ge=1.0, le=20.0, description="Qwen-Image-Edit's CFG scale (1 = one pass a step)")
    f2p: bool = Field(False, description="apply DiffSynth-Studio's Qwen-Image-Edit-F2P LoRA (face crop -> portrait)")
    f2p_weight: float = Field(1.0, ge=0.0, le=2.0, description="the F2P LoRA's weight")
    identity_references: int = Field(1, ge=0, le=3, description="portrait edit: the identity's aligned crops shown "
                                                                "after the image and the user's references")


def _models(options: QwenEditOptions) -> tuple[str, ...]:
    return ("base", "f2p_lora") if options.f2p else ("base",)


def pipeline_args(request: GenerationRequest, prompt: str, pictures, seed: int, true_cfg: float) -> dict[str, Any]:
    """The keyword arguments of one QwenImageEditPlusPipeline call."""
    args: dict[str, Any] = {
        "image": [p.pil() for p in pictures],
        "prompt": prompt,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.steps,
        "true_cfg_scale": true_cfg,
        "generator": frontier.seeded(seed),
        "output_type": "np",
    }
    if true_cfg > 1.0:
        args["negative_prompt"] = request.negative_prompt or " "  # any negative prompt switches true CFG on
    return args


def f2p_use(ctx: RunContext, weight: float) -> loras.AdapterUse:
    resolved_model = ctx.resolve_role("f2p_lora")
    label = ctx.preset.model("f2p_lora")
    return loras.AdapterUse(loras.adapter_name("f2p", label, resolved_model.path), resolved_model.path, weight,
                            "style", label)


class QwenEditBackend:
    name: ClassVar[str] = "qwen-edit"

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        options = SPEC.read(request)
        frontier.check_request(request, ctx, ("qwen-image-edit",), "qwen-edit")
        people = [request.identity, *(p for p in request.people if p.name != request.identity.name)]
        if len(people) > MAX_PICTURES:
            raise BadInput(f"--with-identity: qwen-edit takes {MAX_PICTURES} pictures, so at most "
                           f"{MAX_PICTURES} people ({len(people)} given)")
        if len(people) == 1 and options.references > MAX_PICTURES:
            raise BadInput(f"--option references={options.references}: Qwen-Image-Edit takes {MAX_PICTURES} "
                           f"pictures at most")
        size = references.reference_size(request.width, request.height, options.reference_size)
        face_backend = request.resolved.face_backend
        edit = request.resolved.edit
        if edit:  # portrait edit: the result first, the user's references, then the identity's crops
            pictures = references.edit_pictures(edit, request.width, request.height, request.identity.name,
                                                request.resolved.edit_files)
            if len(pictures) > MAX_PICTURES:
                raise BadInput(f"--reference: Qwen-Image-Edit takes {MAX_PICTURES} pictures, the image being "
                               f"edited and at most {MAX_PICTURES - 1} references ({len(pictures) - 1} given)")
            count = min(options.identity_references, MAX_PICTURES - len(pictures))
            if count:
                pictures += list(references.identity_references(ctx, request.identity, count, size, face_backend))
            first = len(pictures) - count + 1
            prompt = references.edit_prompt(request.prompt, list(range(first, len(pictures) + 1)) if count else [])
            per_person = [(request.identity.name, first, count)]
        elif len(people) == 1:
            pictures = list(references.identity_references(ctx, request.identity, options.references, size,
                                                           face_backend))
            prompt = frontier.reference_prompt(request.prompt, options.reference_instruction, len(pictures))
            per_person = [(request.identity.name, 1, len(pictures))]
        else:
            each = max(1, min(options.references, MAX_PICTURES // len(people)))
            pictures, per_person = [], []
            for person, found in zip(people, references.group_references(ctx, people, each, size, face_backend)):
                per_person.append((person.name, len(pictures) + 1, len(found)))
                pictures.extend(found)
            who = ", ".join(f"person {k + 1} from picture {first}" if count == 1 else
                            f"person {k + 1} from pictures {first}-{first + count - 1}"
                            for k, (_, first, count) in enumerate(per_person))
            prompt = f"{request.prompt.rstrip(' .')}. " + GROUP_INSTRUCTION.replace(
                "{count}", str(len(people))).replace("{who}", who)
        pipe = frontier.load_frontier_pipeline(ctx, request, "edit")
        stack = []
        lora = loras.identity_use(request.identity, ctx.preset.family, request.lora_weight)
        if lora is not None:
            stack.append(lora)
        if options.f2p:
            stack.append(f2p_use(ctx, options.f2p_weight))
        loras.attach(pipe, stack)
        info: dict[str, Any] = {
            "identity_mode": ("edit" if edit else "reference") + ("+lora" if lora is not None else ""),
            "model": model_info(ctx),
            "references": [p.info() for p in pictures],
            "prompt_sent": prompt,
            "true_cfg": options.true_cfg,
            "loras": [u.as_info() for u in stack],
        }
        if edit:
            info["edit"] = {"source": edit["source"], "source_sha256": edit["source_sha256"]}
        if len(people) > 1 and not edit:
            width = request.width / len(people)
            info["faces"] = [{"identity": name, "face": k,
                              "box": [round(k * width, 1), 0.0, round((k + 1) * width, 1), float(request.height)]}
                             for k, (name, _, _) in enumerate(per_person)]

        def render(seed: int):
            with loras.composed(pipe, stack, "merge"):
                args = pipeline_args(request, prompt, pictures, seed, options.true_cfg)
                return to_uint8(frontier.call(pipe, args)[0])

        yield from seeded_candidates(request, render, setup_seconds=time.perf_counter() - started, info=info)


SPEC = BackendSpec(
    name="qwen-edit",
    families=("qwen-image-edit",),
    make=QwenEditBackend,
    help="Qwen-Image-Edit-2511 from up to 3 reference photos (Apache-2.0; F2P LoRA optional)",
    options=QwenEditOptions,
    models=_models,
    group=True,
    conditioning=NO_FACE_SPACE,  # pictures, not a face embedding: every scoring space is independent
)
