"""Backend `photomaker` (SDXL): PhotoMaker v1 / v2 stacked ID embedding.

The checkpoint is a `.bin` with exactly `id_encoder` and `lora_weights`. The ID encoder is
a CLIP ViT-L image tower plus:

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

Written from PhotoMaker's published architecture (DESIGN section 5), not its package: the
tokenizer is not modified (the trigger is found in the text), and one code path serves
v1 and v2 with the token count read from the checkpoint (a known bug elsewhere used one
count for both). Options: photomaker_version 1|2, trigger (img), start_merge_step (10, or
style_strength as a fraction of the steps), id_mode all|mean|best, id_photos.
"""

from __future__ import annotations

import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from portrait.core.cache import CacheKey
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import embed as emb
from portrait.stages import loras
from portrait.stages.generate import seeded_candidates
from portrait.stages.sd import call_pipeline, load_sd_pipeline, model_info, prepare_pipeline

PHOTOMAKER_KEYS = ["id_encoder", "lora_weights"]
LORA_ADAPTER = "photomaker"
V2_HEAD_DIM = 128


# --- the ID encoder (written from the architecture; see module docstring) ------------------------


class MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear (+ residual)."""

    def __init__(self, inp: int, out: int, hidden: int, residual: bool):
        super().__init__()
        self.layernorm = nn.LayerNorm(inp)
        self.fc1 = nn.Linear(inp, hidden)
        self.fc2 = nn.Linear(hidden, out)
        self.act_fn = nn.GELU()
        self.residual = residual

    def forward(self, x):
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return y + x if self.residual else y


class FuseModule(nn.Module):
    """Merges a class-word token with an ID token: MLP(cat) + word, MLP with residual, LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp1 = MLP(2 * dim, dim, dim, residual=False)
        self.mlp2 = MLP(dim, dim, dim, residual=True)
        self.layer_norm = nn.LayerNorm(dim)

    def fuse(self, words, ids):
        x = self.mlp1(torch.cat([words, ids], dim=-1)) + words
        return self.layer_norm(self.mlp2(x))

    def forward(self, prompt_embeds, id_tokens, class_mask):
        """prompt_embeds [1, seq, D]; id_tokens [n, D] in photo order; class_mask [1, seq] with n True."""
        positions = class_mask[0].nonzero().squeeze(1)
        if positions.numel() != id_tokens.shape[0]:
            raise ValueError(f"{positions.numel()} class-word slots for {id_tokens.shape[0]} ID tokens")
        out = prompt_embeds.clone()
        out[0, positions] = self.fuse(prompt_embeds[0, positions], id_tokens.to(prompt_embeds.dtype))
        return out


class PerceiverAttention(nn.Module):
    """IP-Adapter's perceiver attention: latents attend to (inputs ++ latents)."""

    def __init__(self, dim: int, inner: int, dim_head: int):
        super().__init__()
        self.heads = inner // dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)

        def heads(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q).float(), heads(k).float(), heads(v).float()).to(q.dtype)
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    """FacePerceiverResampler: proj_in, [attention, feed-forward] x depth, proj_out, norm_out."""

    def __init__(self, dim: int, inner: int, dim_head: int, depth: int, embedding_dim: int, output_dim: int,
                 ff_mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PerceiverAttention(dim, inner, dim_head),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ]) for _ in range(depth)
        ])

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class QFormerPerceiver(nn.Module):
    """v2: ID embedding -> `tokens` tokens, refined against CLIP patch features (+ residual)."""

    def __init__(self, id_dim: int, dim: int, tokens: int, clip_dim: int, inner: int, depth: int, ratio: int = 4):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.token_proj = nn.Sequential(nn.Linear(id_dim, id_dim * ratio), nn.GELU(),
                                        nn.Linear(id_dim * ratio, dim * tokens))
        self.token_norm = nn.LayerNorm(dim)
        self.perceiver_resampler = PerceiverResampler(dim, inner, V2_HEAD_DIM, depth, clip_dim, dim)

    def forward(self, id_embeds, clip_hidden):
        x = self.token_norm(self.token_proj(id_embeds).reshape(-1, self.tokens, self.dim))
        return x + self.perceiver_resampler(x, clip_hidden)


@dataclass(frozen=True)
class EncoderShape:
    """Sizes read from a checkpoint, so real and tiny files build the same classes."""

    version: int
    clip: dict[str, Any]
    dim: int  # fused token width (SDXL: 2048)
    text_2: int  # visual_projection_2 output (SDXL text_encoder_2 width)
    id_dim: int = 0
    tokens: int = 1
    perceiver_inner: int = 0
    perceiver_depth: int = 0


def detect_version(id_encoder: dict) -> int:
    """2 when the checkpoint carries v2's qformer_perceiver, else 1."""
    return 2 if any(k.startswith("qformer_perceiver.") for k in id_encoder) else 1


def encoder_shape(sd: dict) -> EncoderShape:
    hidden = int(sd["vision_model.embeddings.class_embedding"].shape[0])
    patch = int(sd["vision_model.embeddings.patch_embedding.weight"].shape[-1])
    positions = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
    layers = len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})
    clip = dict(hidden_size=hidden, patch_size=patch, image_size=patch * int(round((positions - 1) ** 0.5)),
                num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                intermediate_size=int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
                projection_dim=int(sd["visual_projection.weight"].shape[0]), hidden_act="quick_gelu")
    dim = int(sd["fuse_module.layer_norm.weight"].shape[0])
    text_2 = int(sd["visual_projection_2.weight"].shape[0])
    if detect_version(sd) == 1:
        return EncoderShape(1, clip, dim, text_2)
    q = "qformer_perceiver."
    depth = len({k.split(".")[3] for k in sd if k.startswith(f"{q}perceiver_resampler.layers.")})
    return EncoderShape(2, clip, dim, text_2, id_dim=int(sd[f"{q}token_proj.0.weight"].shape[1]),
                        tokens=int(sd[f"{q}token_proj.2.weight"].shape[0]) // dim,
                        perceiver_inner=int(sd[f"{q}perceiver_resampler.layers.0.0.to_q.weight"].shape[0]),
                        perceiver_depth=depth)


def build_encoder(shape: EncoderShape):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection


    class PhotoMakerIDEncoder(CLIPVisionModelWithProjection):
        """CLIP ViT-L tower + PhotoMaker's projections and fuse module (state dict keys as released)."""

        def __init__(self):
            super().__init__(CLIPVisionConfig(**shape.clip))
            self.shape = shape
            self.visual_projection_2 = nn.Linear(shape.clip["hidden_size"], shape.text_2, bias=False)
            self.fuse_module = FuseModule(shape.dim)
            if shape.version == 2:
                self.qformer_perceiver = QFormerPerceiver(shape.id_dim, shape.dim, shape.tokens,
                                                          shape.clip["hidden_size"], shape.perceiver_inner,
                                                          shape.perceiver_depth)

        @property
        def tokens_per_image(self) -> int:
            return self.shape.tokens if self.shape.version == 2 else 1

        def id_tokens(self, pixels, id_embeds=None):
            """[n photos, 3, H, W] -> [n * tokens_per_image, D] in photo order."""
            out = self.vision_model(pixel_values=pixels)
            if self.shape.version == 1:
                pooled = out[1]
                return torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)
            if id_embeds is None:
                raise ValueError("PhotoMaker v2 needs insightface embeddings of the ID photos")
            tokens = self.qformer_perceiver(id_embeds.to(out[0].dtype), out[0])
            return tokens.reshape(-1, self.shape.dim)

    return PhotoMakerIDEncoder()


# --- checkpoint ---------------------------------------------------------------------------------------


@dataclass
class PhotoMakerModel:
    model_id: str
    path: Path
    version: int
    encoder: Any
    lora: dict
    processor: Any


def read_checkpoint(ctx, model_id_or_path: str) -> tuple[str, Path, dict]:
    from portrait.core.loaders import load_torch_file

    path = Path(str(model_id_or_path)).expanduser()
    if path.suffix in (".bin", ".safetensors") or "/" in str(model_id_or_path):
        if not path.is_file():
            raise BadInput(f"{path}: PhotoMaker checkpoint does not exist")
        resolved = ctx.registry.resolve("photomaker-v1", ctx.settings, tiny=ctx.preset.tiny, explicit=path)
        name = path.name
    else:
        resolved = ctx.resolve(model_id_or_path)
        name = resolved.files[0]
    state = load_torch_file(ctx, resolved, name)
    if isinstance(state, dict) and "id_encoder" not in state and any(k.startswith("id_encoder.") for k in state):
        state = _unflatten(state)  # the safetensors form PhotoMaker's loader also accepts
    if not isinstance(state, dict) or list(state) != PHOTOMAKER_KEYS:
        raise BadInput(f"{resolved.root / name}: not a PhotoMaker checkpoint (its keys must be exactly "
                       f"id_encoder, lora_weights)")
    return resolved.spec.id, resolved.root / name, state


def _unflatten(flat: dict) -> dict:
    out: dict[str, dict] = {k: {} for k in PHOTOMAKER_KEYS}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        if head in out:
            out[head][rest] = value
    return out


def load_photomaker(ctx, model_id_or_path: str, expected: int | None = None) -> PhotoMakerModel:
    """Read, version-check and build the ID encoder once per (file, device, dtype)."""

    def build() -> PhotoMakerModel:
        from transformers import CLIPImageProcessor

        model_id, path, state = read_checkpoint(ctx, model_id_or_path)
        found = detect_version(state["id_encoder"])
        if expected is not None and found != expected:
            raise BadInput(f"{path}: is a PhotoMaker v{found} checkpoint "
                           f"({'has' if found == 2 else 'has no'} qformer_perceiver), but v{expected} was asked "
                           f"for; use photomaker_version={found} or the photomaker-v{expected} model")
        encoder = build_encoder(encoder_shape(state["id_encoder"]))
        try:
            encoder.load_state_dict(state["id_encoder"], strict=True)
        except RuntimeError as exc:
            raise BadInput(f"{path}: id_encoder does not match PhotoMaker v{found} "
                           f"({str(exc).splitlines()[0][:200]})") from None
        encoder = encoder.to(device=ctx.placement.device, dtype=ctx.placement.dtype).eval()
        size = int(encoder.config.image_size)
        processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return PhotoMakerModel(model_id, path, found, encoder, state["lora_weights"], processor)

    key = CacheKey(f"photomaker:{model_id_or_path}", ctx.placement.device, ctx.placement.dtype_name, expected)
    return ctx.cache.get(key, build)


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
    def from_options(cls, options: dict[str, Any]) -> "PhotoMakerPolicy":
        version = options.get("photomaker_version")
        if version is not None and str(version).lstrip("v") not in ("1", "2"):
            raise BadInput(f"option photomaker_version={version} is not 1 or 2")
        start = options.get("start_merge_step")
        return cls(version=int(str(version).lstrip("v")) if version is not None else None,
                   trigger=str(options.get("trigger", "img")),
                   start_merge_step=int(start) if start is not None else None,
                   style_strength=float(options.get("style_strength", 0.2)),
                   mode=str(options.get("id_mode", "all")))

    def merge_step(self, steps: int) -> int:
        if self.start_merge_step is not None:
            return self.start_merge_step
        return min(int(self.style_strength * steps), 30)  # PhotoMaker's demo caps it at 30


def model_for(ctx, policy: PhotoMakerPolicy, options: dict[str, Any]) -> tuple[str, int | None]:
    explicit = options.get("photomaker_model")
    if explicit:
        return str(explicit), policy.version
    version = policy.version or (2 if "photomaker_v2" in ctx.preset.models else 1)
    return ctx.preset.model(f"photomaker_v{version}"), version


@dataclass(frozen=True)
class IdImages:
    pixels: Any  # [n, 3, H, W]
    id_embeds: Any | None  # [n, 512] (v2)
    sources: tuple[str, ...]
    embedding: emb.IdEmbedding | None


def id_images(ctx, request: GenerationRequest, model: PhotoMakerModel) -> IdImages:
    """The identity's photos as CLIP inputs (whole photos, as PhotoMaker takes them) and, for
    v2, their buffalo_l raw embeddings; v2 keeps only the photos where a face was found."""
    embed_policy = emb.EmbedPolicy.from_options({**request.options, "id_mode": "all"})
    paths = emb.identity_photos(request.identity, embed_policy.max_photos)
    images = [(str(p), emb.read_rgb(p)) for p in paths]
    found, ids = None, None
    if model.version == 2:
        found = emb.embed_images(ctx, images, "photomaker_v2", embed_policy,
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
    name: ClassVar[str] = "photomaker"
    families: ClassVar[tuple[str, ...]] = ("sdxl",)

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        policy = PhotoMakerPolicy.from_options(request.options)
        if policy.mode not in emb.MODES:
            raise BadInput(f"option id_mode='{policy.mode}' is not one of {', '.join(emb.MODES)}")
        prompt, rewritten = template_prompt(request, policy.trigger)
        split_trigger(prompt, policy.trigger)  # fail on the prompt before loading anything
        model_ref, expected = model_for(ctx, policy, request.options)
        model = load_photomaker(ctx, model_ref, expected)
        ids = id_images(ctx, request, model)
        pipe = load_sd_pipeline(ctx, "txt2img")
        identity_lora = loras.identity_use(request.identity, "sdxl", request.lora_weight)
        stack = [identity_lora] if identity_lora else []
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

