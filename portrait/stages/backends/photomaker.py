"""Backend `photomaker` (SDXL): PhotoMaker v1 / v2 stacked ID embedding.

The checkpoint is a `.bin` with exactly `id_encoder` and `lora_weights` (read through the model
door; the network and its key detection are portrait/core/archs/photomaker.py). The ID encoder
is a CLIP ViT-L image tower plus:

- v1: pooled CLIP -> visual_projection (768) ++ visual_projection_2 (1024 -> 1280) = one
  2048-d token per photo;
- v2: a `qformer_perceiver` that turns each photo's insightface (buffalo_l, raw) embedding
  into 2 tokens and refines them against CLIP's last_hidden_state: two tokens per photo.

The prompt must name the class word directly followed by the trigger word (default `img`,
e.g. "a photo of a woman img"). The class word's token is repeated once per ID token, and
a FuseModule merges each copy with one ID token; the trigger itself is dropped. The first
`start_merge_step` steps (inclusive) run on the plain text so the layout forms before the
identity comes in. The checkpoint's LoRA is loaded as the PEFT adapter `photomaker`
(next to the identity's own SDXL LoRA when the bundle has one).

Written from PhotoMaker's published architecture (docs/ARCHITECTURE.md#adapter-formats), not
its package: the tokenizer is not modified (the trigger is found in the text), and one code path serves
v1 and v2 with the token count read from the checkpoint (a known bug elsewhere used one
count for both). Options (PhotoMakerOptions): photomaker_version 1|2, trigger (img),
start_merge_step (or style_strength 0.2 as a fraction of the steps), id_mode all|mean|best, id_photos.
"""

from __future__ import annotations

import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import Field, field_validator

from portrait.core import models
from portrait.core.backend import LCM, NO_FACE_SPACE, AdapterSpace, BackendSpec
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.options import SERVER_ONLY, CommonOptions, EmbedOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import embed as emb
from portrait.stages import loras
from portrait.stages.identity_inputs import embed_policy_of
from portrait.stages.sd import call_pipeline, load_sd_pipeline, model_info, prepare_pipeline
from portrait.stages.seeding import seeded_candidates

if TYPE_CHECKING:  # the network imports torch; the backend table imports this module
    from portrait.core.archs.photomaker import PhotoMakerModel

LORA_ADAPTER = "photomaker"


class PhotoMakerOptions(CommonOptions, EmbedOptions):
    """PhotoMaker's options (defaults as in PhotoMaker's demo)."""

    photomaker_version: Literal["v1", "v2", "1", "2"] | None = Field(
        None, description="1 or 2 (default: the preset's photomaker_v2 role when it has one, else v1)")
    photomaker_model: str | None = Field(None, min_length=1, description="registry id or file overriding the role",
                                         json_schema_extra=SERVER_ONLY)
    start_merge_step: int | None = Field(None, ge=0, le=10_000, description="steps on the text alone before the ID")
    style_strength: float = Field(0.2, ge=0.0, le=1.0, description="start_merge_step as a fraction of the steps")
    trigger: str = Field("img", min_length=1, description="the word after the class word that marks the identity")
    id_mode: Literal["mean", "all", "best"] = "all"  # PhotoMaker stacks every photo's tokens

    @field_validator("photomaker_version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @property
    def version(self) -> int | None:
        return int(self.photomaker_version.lstrip("v")) if self.photomaker_version else None


def _models(options: PhotoMakerOptions) -> tuple[str, ...]:
    version = options.version or 2  # the preflight's view: v2 unless v1 was asked for
    return (f"photomaker_v{version}",) + (("face_pack_faceid",) if version == 2 else ())



# --- checkpoint ---------------------------------------------------------------------------------------


def _explicit(model_id_or_path: str) -> Path | None:
    path = Path(str(model_id_or_path)).expanduser()
    return path if path.suffix in (".bin", ".safetensors") or "/" in str(model_id_or_path) else None


def load_photomaker(ctx, model_id_or_path: str, expected: int | None = None) -> PhotoMakerModel:
    """The ID encoder of a checkpoint, version-checked, built once per (file, device, dtype)
    by the model door's "photomaker" kind (portrait/core/archs/photomaker.py)."""
    explicit = _explicit(model_id_or_path)
    return models.load(ctx, "photomaker-v1" if explicit else model_id_or_path, "photomaker", path=explicit,
                       expected=expected)


# --- prompts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerPrompt:
    before: str  # text up to and including the class word
    class_word: str
    after: str  # text after the trigger word
    text_only: str  # the prompt without the trigger word


def split_trigger(prompt: str, trigger: str) -> TriggerPrompt:
    """Find `<class word> <trigger>`; a prompt without it gets a message that says what to write."""
    words = list(re.finditer(r"[^\s,.;:!?()]+", prompt))
    hits = [i for i, m in enumerate(words) if m.group(0) == trigger]
    example = f"e.g. 'portrait photo of a woman {trigger}, ...'"
    if not hits:
        raise BadInput(f"prompt: PhotoMaker needs the trigger word '{trigger}' right after the class word "
                       f"({example}); got: {prompt!r}")
    if len(hits) > 1:
        raise BadInput(f"prompt: the trigger word '{trigger}' appears {len(hits)} times; use it once, after the "
                       f"class word ({example})")
    i = hits[0]
    between = prompt[words[i - 1].end(): words[i].start()] if i > 0 else ""
    if i == 0 or between.strip():
        raise BadInput(f"prompt: the trigger word '{trigger}' must directly follow a class word such as man, woman "
                       f"or person ({example}); got: {prompt!r}")
    m = words[i]
    text_only = (prompt[: words[i - 1].end()] + prompt[m.end():]).strip()
    return TriggerPrompt(prompt[: words[i - 1].end()], words[i - 1].group(0), prompt[m.end():], text_only)


def template_prompt(request: GenerationRequest, trigger: str) -> tuple[str, bool]:
    """A template's prompt names `{class}` but not PhotoMaker's trigger: put the trigger right
    after the identity's class word. A prompt the user typed is never rewritten."""
    prompt = request.prompt
    if request.template is None or re.search(rf"(?<![^\s,.;:!?()]){re.escape(trigger)}(?![^\s,.;:!?()])", prompt):
        return prompt, False
    word = request.identity.class_word or "person"
    match = re.search(rf"(?<![^\s,.;:!?()]){re.escape(word)}(?![^\s,.;:!?()])", prompt)
    if match is None:
        return prompt, False
    return f"{prompt[: match.end()]} {trigger}{prompt[match.end():]}", True


def class_token_ids(tokenizer, parts: TriggerPrompt, copies: int) -> tuple[list[int], list[bool]]:
    """Token ids of the prompt with the trigger dropped and the class word's last token
    repeated `copies` times, padded/truncated to the tokenizer's length; and the class mask."""
    before = tokenizer(parts.before, add_special_tokens=False).input_ids
    after = tokenizer(parts.after, add_special_tokens=False).input_ids
    if not before:
        raise BadInput(f"prompt: no class word before the trigger in {parts.before!r}")
    start = len(before)  # the class token's index once BOS is prepended
    ids = [tokenizer.bos_token_id, *before[:-1], *[before[-1]] * copies, *after, tokenizer.eos_token_id]
    length = tokenizer.model_max_length
    ids = ids[:length] + [tokenizer.pad_token_id] * max(0, length - len(ids))
    mask = [start <= i < start + copies for i in range(length)]
    if sum(mask) != copies:
        raise BadInput("prompt: too long for PhotoMaker (the class word falls past the 77-token limit)")
    return ids, mask


def encode_with_ids(pipe, parts: TriggerPrompt, copies: int):
    """(prompt_embeds [1, 77, D], pooled [1, P], class_mask [1, 77]) for the trigger prompt,
    encoded as SDXL does: penultimate hidden states of both encoders, pooled from the second."""
    import torch

    embeds, pooled, mask = [], None, None
    device = pipe._execution_device  # where offload hooks run the encoders
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids, mask = class_token_ids(tokenizer, parts, copies)
        out = encoder(torch.tensor([ids], device=device), output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    prompt_embeds = torch.cat(embeds, dim=-1).to(dtype=pipe.text_encoder_2.dtype)
    return prompt_embeds, pooled, torch.tensor([mask], device=device)


# --- backend -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoMakerPolicy:
    version: int | None = None  # None: the preset's photomaker_v2 role, else v1
    trigger: str = "img"
    start_merge_step: int | None = None
    style_strength: float = 0.2  # start_merge_step = style_strength * steps when not given
    mode: str = "all"

    @classmethod
    def from_options(cls, options: PhotoMakerOptions) -> "PhotoMakerPolicy":
        return cls(version=options.version, trigger=options.trigger, start_merge_step=options.start_merge_step,
                   style_strength=options.style_strength, mode=options.id_mode)

    def merge_step(self, steps: int) -> int:
        if self.start_merge_step is not None:
            return self.start_merge_step
        return min(int(self.style_strength * steps), 30)  # PhotoMaker's demo caps it at 30


def model_for(ctx, policy: PhotoMakerPolicy, options: PhotoMakerOptions) -> tuple[str, int | None]:
    explicit = options.photomaker_model
    if explicit:
        return str(explicit), policy.version
    version = policy.version or (2 if "photomaker_v2" in ctx.preset.models else 1)
    return ctx.preset.model(f"photomaker_v{version}"), version


# PhotoMaker v2's face space: insightface buffalo_l's w600k_r50, the raw `embedding` of each photo
# (its ID encoder's insightface branch). v1 reads CLIP image features only.
V2_FACE_SPACE = AdapterSpace("photomaker_v2", "buffalo_l", "w600k_r50.onnx", normalized=False)


@dataclass(frozen=True)
class IdImages:
    pixels: Any  # [n, 3, H, W]
    id_embeds: Any | None  # [n, 512] (v2)
    sources: tuple[str, ...]
    embedding: emb.IdEmbedding | None


def id_images(ctx, request: GenerationRequest, model: PhotoMakerModel) -> IdImages:
    """The identity's photos as CLIP inputs (whole photos, as PhotoMaker takes them) and, for
    v2, their buffalo_l raw embeddings; v2 keeps only the photos where a face was found."""
    import torch

    embed_policy = embed_policy_of(SPEC.read(request), mode="all")
    paths = emb.identity_photos(request.identity, embed_policy.max_photos)
    images = [(str(p), emb.read_rgb(p)) for p in paths]
    found, ids = None, None
    if model.version == 2:
        found = emb.embed_images(ctx, images, V2_FACE_SPACE, embed_policy,
                                 owner=f"identity '{request.identity.name}'")
        images = [(c.source, c.image) for c in found.crops]
        ids = torch.from_numpy(found.vectors).to(device=ctx.placement.device, dtype=ctx.placement.dtype)
    pixels = model.processor(images=[im for _, im in images], return_tensors="pt").pixel_values
    return IdImages(pixels.to(device=ctx.placement.device, dtype=ctx.placement.dtype), ids,
                    tuple(s for s, _ in images), found)


def combine_tokens(tokens, per_image: int, mode: str):
    """[n * per_image, D] -> all (stacked, PhotoMaker's way), best (first photo) or mean (one set)."""
    if mode == "all":
        return tokens
    if mode == "best":
        return tokens[:per_image]
    return tokens.reshape(-1, per_image, tokens.shape[-1]).mean(dim=0)


@dataclass
class PromptEmbeds:
    text_only: Any
    negative: Any
    pooled_text_only: Any
    negative_pooled: Any
    fused: Any
    pooled_fused: Any


def photomaker_embeds(pipe, model: PhotoMakerModel, request: GenerationRequest, policy: PhotoMakerPolicy,
                      ids: IdImages) -> PromptEmbeds:
    import torch

    parts = split_trigger(template_prompt(request, policy.trigger)[0], policy.trigger)
    with torch.no_grad():
        tokens = combine_tokens(model.encoder.id_tokens(ids.pixels, ids.id_embeds),
                                model.encoder.tokens_per_image, policy.mode)
        prompt_embeds, pooled, mask = encode_with_ids(pipe, parts, tokens.shape[0])
        fused = model.encoder.fuse_module(prompt_embeds.to(tokens.dtype), tokens, mask)
        text_only, negative, pooled_text, negative_pooled = pipe.encode_prompt(
            prompt=parts.text_only, device=pipe._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=True, negative_prompt=request.negative_prompt or None)
    return PromptEmbeds(text_only, negative, pooled_text, negative_pooled, fused.to(text_only.dtype),
                        pooled.to(text_only.dtype))


def merge_callback(embeds: PromptEmbeds, start_merge_step: int):
    """Steps 0..start_merge_step run on the text alone; then the fused ID prompt takes over."""

    import torch

    def on_step_end(pipe, step: int, timestep, kwargs: dict) -> dict:
        if step == start_merge_step:
            cfg = pipe.do_classifier_free_guidance
            kwargs["prompt_embeds"] = torch.cat([embeds.negative, embeds.fused]) if cfg else embeds.fused
            kwargs["add_text_embeds"] = (torch.cat([embeds.negative_pooled, embeds.pooled_fused]) if cfg
                                         else embeds.pooled_fused)
        return kwargs

    return on_step_end


def call_kwargs(embeds: PromptEmbeds, start_merge_step: int, steps: int) -> dict[str, Any]:
    start_with_id = start_merge_step < 0
    return {
        "prompt": None, "negative_prompt": None,
        "prompt_embeds": embeds.fused if start_with_id else embeds.text_only,
        "pooled_prompt_embeds": embeds.pooled_fused if start_with_id else embeds.pooled_text_only,
        "negative_prompt_embeds": embeds.negative,
        "negative_pooled_prompt_embeds": embeds.negative_pooled,
        **({} if start_with_id or start_merge_step >= steps - 1 else {
            "callback_on_step_end": merge_callback(embeds, start_merge_step),
            "callback_on_step_end_tensor_inputs": ["prompt_embeds", "add_text_embeds"]}),
    }


def attach_lora(pipe, model: PhotoMakerModel) -> str:
    """PhotoMaker's LoRA as one PEFT adapter named after the checkpoint (reloaded if it changed)."""
    name = f"{LORA_ADAPTER}_v{model.version}_{zlib.crc32(str(model.path).encode()) & 0xFFFFFFFF:08x}"
    loaded = {n for names in pipe.get_list_adapters().values() for n in names} if hasattr(
        pipe, "get_list_adapters") else set()
    if name not in loaded:
        pipe.load_lora_weights(dict(model.lora), adapter_name=name)
    return name


class PhotoMakerBackend:
    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        options = SPEC.read(request)
        policy = PhotoMakerPolicy.from_options(options)
        prompt, rewritten = template_prompt(request, policy.trigger)
        split_trigger(prompt, policy.trigger)  # fail on the prompt before loading anything
        model_ref, expected = model_for(ctx, policy, options)
        model = load_photomaker(ctx, model_ref, expected)
        ids = id_images(ctx, request, model)
        pipe = load_sd_pipeline(ctx, "txt2img")
        identity_lora = loras.identity_use(request.identity, "sdxl", request.lora_weight)
        fast = loras.fast_use(ctx, request.resolved)  # --fast: the LCM-LoRA beside PhotoMaker's own LoRA
        stack = [u for u in (identity_lora, fast) if u is not None]
        loras.attach(pipe, stack)  # first: it prunes adapters it does not know, PhotoMaker's among them
        photomaker_lora = attach_lora(pipe, model)
        prepare_pipeline(pipe, request, ctx)
        start = policy.merge_step(request.steps)
        embeds = photomaker_embeds(pipe, model, request, policy, ids)
        info = {
            "identity_mode": "zero-shot+lora" if identity_lora else "zero-shot",
            "adapter": {"id": model.model_id, "version": model.version, "trigger": policy.trigger,
                        "start_merge_step": start, "id_mode": policy.mode,
                        "tokens_per_photo": model.encoder.tokens_per_image},
            "id_photos": list(ids.sources),
            "embedding": ids.embedding.info() if ids.embedding else None,
            "model": model_info(ctx),
            "loras": [u.as_info() for u in stack],
        }
        if rewritten:
            info["prompt"] = prompt  # the template's prompt with PhotoMaker's trigger after the class word
        if start >= request.steps - 1:
            info["note"] = f"start_merge_step {start} >= steps - 1: the identity never enters; lower it"
        if identity_lora is None:
            info.setdefault("note", "no sdxl LoRA in the bundle: ran zero-shot")
        setup = time.perf_counter() - started
        try:
            pipe.enable_lora()
            pipe.set_adapters([photomaker_lora, *[u.adapter for u in stack]],
                              adapter_weights=[1.0, *[u.weight for u in stack]])
            yield from seeded_candidates(
                request, lambda seed: call_pipeline(pipe, request, seed, **call_kwargs(embeds, start, request.steps)),
                setup_seconds=setup, info=info)
        finally:
            pipe.disable_lora()


def _face_space(options: PhotoMakerOptions) -> AdapterSpace | None:
    """v2 adds a buffalo_l embedding to its ID encoder; v1 reads CLIP image features only."""
    return None if options.version == 1 else V2_FACE_SPACE


def _conditioning(options: PhotoMakerOptions) -> str:
    """v1: no face embedding shapes the output (CLIP features of the photos do)."""
    space = _face_space(options)
    return space.backend if space else NO_FACE_SPACE


SPEC = BackendSpec(
    name="photomaker",
    families=("sdxl",),
    make=PhotoMakerBackend,
    help="PhotoMaker v1/v2 stacked ID embedding (SDXL, zero-shot; the prompt needs `CLASS img`)",
    options=PhotoMakerOptions,
    models=_models,
    face_space=_face_space,
    conditioning=_conditioning,
    fast={"lcm": LCM},
)
