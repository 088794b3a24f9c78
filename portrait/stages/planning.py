"""Which modules a request loads, sized before anything loads, and the memory plan over them.

The arithmetic is portrait/core/memplan.py; this stage knows what a backend loads: the preset's
base (its parts by family), the VAE role, every role the backend declares (BackendSpec.models:
ControlNets, IdentityNet, InfuseNet, adapters, PuLID/EVA encoders, face packs), and the models
finishing puts on the device after generation (face analysis, parser, upscaler, face restorer,
scoring CLIP: `Finishing`, which the finish flow fills in). Each model is
sized from its files when present (safetensors headers, never the tensors), else from the
family's shipped config built on the meta device, else from the registry's recorded sizes.

`planned(ctx, request)` is what the generate stage calls before the backend runs: the plan is
made, refused in one line when it fits nowhere on this device, printed under --debug, and the
context that follows it (dtype, offload strategy, quantization) is handed to the backend.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from portrait.core import memplan as mp
from portrait.core.config import RuntimePolicy, presets_root
from portrait.core.errors import BadInput
from portrait.core.modelspec import ModelSpec, ResolvedModel

# The parts of a base, by family, and what each is (the loaders' _PARTS less tokenizers and
# schedulers). A family this table does not know is read from its model_index.json / registry
# rows: a folder per part, the largest the denoiser.
BASE_ROLES = {"unet": "denoiser", "transformer": "denoiser", "text_encoder": "text", "text_encoder_2": "text",
              "text_encoder_3": "text", "vae": "vae"}
# The parts runtime.quantize and the plan's quantize step may quantize (optimum-quanto on Linear
# layers): the DiT and its big text encoder, and the InfuseNet (as InfiniteYou's --quantize_8bit).
QUANTIZABLE = ("transformer", "text_encoder_2")
# A1111 / SGM single files: key prefixes per part.
SINGLE_FILE_PREFIXES = {
    "sd15": {"unet": ["model.diffusion_model."], "vae": ["first_stage_model."], "text_encoder": ["cond_stage_model."]},
    "sdxl": {"unet": ["model.diffusion_model."], "vae": ["first_stage_model."],
             "text_encoder": ["conditioner.embedders.0."], "text_encoder_2": ["conditioner.embedders.1."]},
}
# registry kind -> plan role of the model as a whole
KIND_ROLES = {
    "controlnet": "side", "instantid-adapter": "adapter", "ip-adapter-faceid": "adapter",
    "ip-adapter-faceid-plus": "adapter", "lora": "adapter", "photomaker": "adapter",
    "pulid": "aux", "pulid-flux": "aux", "eva-clip": "aux", "clip-vision": "aux", "clip": "aux",
    "arcface-irse50": "aux", "face-parser": "aux", "insightface-pack": "onnx", "onnx-recognizer": "onnx",
    "onnx-swapper": "onnx", "segmenter": "onnx",
}
NOT_ON_DEVICE = ("dlib-recognizer", "dlib-landmarks", "dlib-detector")  # dlib runs on the CPU
BASE_KINDS = ("sd-pipeline", "sd-single-file")  # a whole base: sized part by part


def _parts_of_family(family: str) -> tuple[str, ...]:
    from portrait.core.loaders import family_parts

    return tuple(p for p in (family_parts(family) or ("transformer", "text_encoder", "vae"))
                 if not p.startswith(("tokenizer", "scheduler", "processor")))


def _locate(ctx, model_id: str) -> tuple[ModelSpec, ResolvedModel | None]:
    spec = ctx.registry.stand_in(model_id, ctx.preset.tiny)
    return spec, ctx.registry.locate(model_id, ctx.settings, tiny=ctx.preset.tiny)


def _weight_files(spec: ModelSpec, under: str = "") -> dict[str, int]:
    """Recorded sizes of the weight files (under a folder), for sizing an absent model."""
    return {f: s for f, s in spec.sizes.items() if f.startswith(under)
            and f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".zip"))}


def _shipped_config(family: str, part: str, spec_config: str | None = None) -> Path | None:
    name = spec_config if spec_config and spec_config.startswith("configs/") else f"configs/{family}"
    path = presets_root() / name / part / "config.json"
    return Path(str(path)) if path.is_file() else None


def _count_present(root: Path, files: Sequence[str], under: str = "") -> mp.Count | None:
    total = None
    folders = [root / f for f in files if f.endswith("/") and f.startswith(under)]
    weights = [root / f for f in files if not f.endswith("/") and f.startswith(under)
               and f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx"))]
    for folder in folders:
        if folder.is_dir():
            c = mp.folder_count(folder)
            total = c if total is None or c is None else total + c
    for path in weights:
        if path.is_file():
            c = mp.file_count(path)
            total = c if total is None else total + c
    return total


def base_parts(ctx, model_id: str, family: str, vae_id: str | None) -> list[mp.Part]:
    spec, resolved = _locate(ctx, model_id)
    names = [p for p in _parts_of_family(family) if not (vae_id and p == "vae")]
    runtime = mp.family_runtime(family)
    counts: dict[str, mp.Count] = {}
    if resolved is not None:
        file = resolved.path if resolved.path.is_file() else None
        if file is None:
            top = [f for f in resolved.files if "/" not in f and f.endswith(".safetensors")]
            if len(top) == 1 and not (resolved.root / "model_index.json").exists():
                file = resolved.root / top[0]
        if file is not None and file.suffix == ".safetensors" and family in SINGLE_FILE_PREFIXES:
            counts = mp.header_counts(file, SINGLE_FILE_PREFIXES[family])
        elif file is not None and file.suffix == ".safetensors":
            counts = {"transformer": mp.header_counts(file)[""]}  # FLUX: BFL's transformer alone
        else:
            for part in names:
                folder = resolved.root / part
                if folder.is_dir():
                    found = mp.folder_count(folder)
                    if found is not None:
                        counts[part] = found
    missing = [p for p in names if p not in counts]
    if missing and family == "flux" and "transformer" in counts and "flux_encoders" in ctx.preset.models:
        # a FLUX single file holds the transformer; the encoders come from the preset's flux_encoders
        enc_spec, enc = _locate(ctx, ctx.preset.model("flux_encoders"))
        for part in missing:
            c = (_count_present(enc.root, [f"{part}/"] + list(enc.files), f"{part}/") if enc else None) or \
                _registry_part(enc_spec, part)
            if c is not None:
                counts[part] = c
    for part in [p for p in names if p not in counts]:
        config = _shipped_config(family, part, spec.config) if not ctx.preset.tiny else None
        c = mp.config_count(str(config)) if config else None
        counts[part] = c or _registry_part(spec, part) or mp.Count(0, 0, "", "unknown")
    unknown = [p for p in names if counts[p].source == "unknown"]
    if unknown and spec.size and not ctx.preset.tiny:
        # No header, shipped config or per-file size for these parts (a frontier base whose row
        # records only its total): the bytes not accounted for go to the largest unknown part
        # (the denoiser first), so the plan's total is right even where its split is not.
        known = sum(c.params * mp.DTYPE_BYTES.get(c.dtype or "bf16", 2) for c in counts.values() if c.source != "unknown")
        rest = max(0, spec.size - known)
        target = next((p for p in unknown if BASE_ROLES.get(p) == "denoiser"), unknown[0])
        per = mp.DTYPE_BYTES.get(spec.dtype or "bf16", 2)
        counts[target] = mp.Count(int(rest / per), 0, spec.dtype or "bf16", "registry-total")
        names = [p for p in names if p == target or p not in unknown]  # their bytes are in the target's
    parts = []
    for part in names:
        c = counts[part]
        role = BASE_ROLES.get(part, "denoiser" if part == max(counts, key=lambda k: counts[k].params) else "text")
        # the DiT and its big text encoder (FLUX.1's T5; a frontier base's only, Qwen, encoder)
        big_text = "text_encoder_2" if "text_encoder_2" in names else "text_encoder"
        quant = bool(runtime.quantize) and (part in (*QUANTIZABLE, big_text) or role == "denoiser")
        parts.append(mp.Part(part, spec.id, role, c.params, c.source, quant, c.largest, c.dtype))
    if vae_id:
        vspec, vres = _locate(ctx, vae_id)
        c = (_count_present(vres.root, vres.files) if vres else None) or \
            (mp.config_count(str(_shipped_config(family, "vae"))) if _shipped_config(family, "vae") and not
             ctx.preset.tiny else None) or _registry_part(vspec, "") or mp.Count(0, 0, "", "unknown")
        parts.append(mp.Part("vae", vspec.id, "vae", c.params, c.source, False, c.largest, c.dtype))
    return parts


def _registry_part(spec: ModelSpec, part: str) -> mp.Count | None:
    files = _weight_files(spec, f"{part}/" if part else "")
    if not files:
        if not part and spec.size:
            return mp.registry_count({"all.bin": spec.size}, spec.dtype or "fp32")
        return None
    return mp.registry_count(files, spec.dtype or "fp32")


def model_parts(ctx, role: str, model_id: str, family: str) -> list[mp.Part]:
    """The parts of one non-base model a backend loads (ControlNet, adapter, encoder, face pack)."""
    spec, resolved = _locate(ctx, model_id)
    if spec.kind in NOT_ON_DEVICE:
        return []
    quantizable = bool(mp.family_runtime(family).quantize)
    if spec.kind == "infiniteyou":
        net_files = [f for f in spec.files if "InfuseNetModel" in f]
        proj = [f for f in spec.files if f.endswith("image_proj_model.bin")]
        out = []
        for name, files, part_role, quant in ((f"infusenet:{spec.id}", net_files, "side", quantizable),
                                              (f"projection:{spec.id}", proj, "aux", False)):
            under = files[0].rsplit("/", 1)[0] + "/" if files and "/" in files[0] else ""
            recorded = _weight_files(spec, under) if name.startswith("infusenet") else \
                {f: spec.sizes[f] for f in proj if f in spec.sizes}
            if not recorded and spec.size and spec.sizes:  # the projection: the total less the shards
                recorded = {"rest.bin": spec.size - sum(spec.sizes.values())}
            c = (_count_present(resolved.root, files, under) if resolved else None) or \
                (mp.registry_count(recorded, "fp32" if not name.startswith("infusenet") else spec.dtype or "bf16")
                 if recorded else None) or mp.Count(0, 0, "", "unknown")
            out.append(mp.Part(name, spec.id, part_role, c.params, c.source, quant, c.largest, c.dtype))
        return out
    part_role = KIND_ROLES.get(spec.kind, "aux")
    c = _count_present(resolved.root, resolved.files) if resolved else None
    if c is None and spec.config and not ctx.preset.tiny:
        shipped = presets_root() / spec.config / "config.json"
        c = mp.config_count(str(shipped)) if shipped.is_file() else None
    if c is None:
        c = _registry_part(spec, "") or mp.Count(0, 0, "", "unknown")
    keep = "float32" if part_role == "onnx" or spec.kind == "arcface-irse50" else ""
    return [mp.Part(f"{part_role_name(part_role)}:{spec.id}", spec.id, part_role, c.params, c.source, False,
                    c.largest, c.dtype, keep)]


def part_role_name(role: str) -> str:
    return {"side": "controlnet"}.get(role, role)


@dataclasses.dataclass(frozen=True)
class Finishing:
    """What the finishing stages put on the device after generation, for the plan: the registry
    ids they load (face analysis pack, face parser, swapper, upscaler, face restorer, scoring
    CLIP; the finish flow says which stages run, portrait.flows.finish.finishing_plan) and the
    upscaler's tiling, which sets its activations."""

    models: tuple[str, ...] = ()
    upscale_scale: int = 0  # the upscaler's native scale (0: no upscaling)
    tile: int = 0  # input tile side in px (0: the whole image at once)
    overlap: int = 0
    restore: bool = False
    clip: bool = False

    def activation(self, width: int, height: int) -> float:
        return mp.finish_activation_bytes(width, height, upscale_scale=self.upscale_scale, tile=self.tile,
                                          overlap=self.overlap, restore=self.restore, clip=self.clip)


# spandrel runs an architecture without fp16/bf16 support in fp32 on CUDA (GFPGAN)
FINISH_KEEP_DTYPE = {"face-restore": "float32"}


def finish_parts(ctx, finishing: Finishing, family: str, seen: set[str]) -> list[mp.Part]:
    """The finishing models as plan parts (role "finish"; face packs stay "onnx"); a model the
    backend already loads (InstantID's antelopev2) is counted once."""
    out: list[mp.Part] = []
    for model_id in finishing.models:
        if model_id in seen:
            continue
        seen.add(model_id)
        spec = ctx.registry.stand_in(model_id, ctx.preset.tiny)
        for part in model_parts(ctx, "finish", model_id, family):
            if part.role == "onnx":
                out.append(part)
            else:
                out.append(dataclasses.replace(part, name=f"finish:{model_id}", role="finish",
                                               keep_dtype=FINISH_KEEP_DTYPE.get(spec.kind, part.keep_dtype)))
    return out


def request_parts(ctx, backend: str, options: Mapping[str, Any] | None = None,
                  finishing: Finishing | None = None) -> list[mp.Part]:
    """Every module `backend` loads for a request with `options` on ctx's preset, and the
    finishing models when `finishing` names them."""
    from portrait.stages.backends import BACKENDS

    spec = BACKENDS.spec(backend)
    family = ctx.preset.family
    typed = spec.read(dict(options or {}))
    roles = list(spec.models(typed)) if callable(spec.models) else list(spec.models)
    vae_id = ctx.preset.models.get("vae")
    if vae_id and (ctx.registry.get(vae_id).family or family) != family:
        vae_id = None
    # a backend that brings its own base (kontext's FLUX.1 Kontext) loads it instead of the preset's
    base_id = ctx.preset.model("base")
    for role in roles:
        model_id = ctx.preset.models.get(role)
        if role != "base" and model_id and ctx.registry.stand_in(model_id, ctx.preset.tiny).kind in BASE_KINDS:
            base_id = model_id
    parts = base_parts(ctx, base_id, family, vae_id)
    seen = {base_id} | ({vae_id} if vae_id else set())
    for role in roles:
        model_id = ctx.preset.models.get(role)
        if not model_id or model_id in seen or role in ("base", "vae"):
            continue
        seen.add(model_id)
        parts += model_parts(ctx, role, model_id, family)
    if finishing is not None:
        parts += finish_parts(ctx, finishing, family, seen)
    return parts


def plan_request_for(ctx, backend: str, width: int, height: int, *, options: Mapping[str, Any] | None = None,
                     batch: int = 1, budget: mp.Budget | None = None, force: str = "auto",
                     finishing: Finishing | None = None) -> mp.MemoryPlan:
    """The plan of one request on `budget` (default: ctx's device as it is now), finishing
    included when `finishing` is given."""
    parts = request_parts(ctx, backend, options, finishing)
    runtime = RuntimePolicy.from_preset(ctx.preset)
    denoiser = sum(p.params for p in parts if p.role == "denoiser")
    req = mp.Request(ctx.preset.family, backend, int(width), int(height), batch, precision=runtime.precision,
                     quantize=runtime.quantize, force=force, denoiser_params=denoiser,
                     finish_activation=finishing.activation(int(width), int(height)) if finishing else 0.0)
    if budget is None:
        device = ctx.placement.device
        budget = mp.device_budget(device) if device.startswith("cuda") else \
            mp.Budget("cpu", mp.host_ram_bytes(), mp.host_ram_bytes(), name="cpu")
    return mp.make_plan(parts, req, budget)


def offload_setting(value: Any) -> str:
    """generate.memory.offload -> the plan's forced strategy (auto lets the plan choose)."""
    if value in (True, "true", "on", 1, "model"):
        return "model"
    if value in (False, "false", "off", 0, "resident"):
        return "resident"
    if value in ("group", "sequential", "auto"):
        return value
    raise BadInput(f"generate.memory.offload '{value}': use auto, true (model offload), group, sequential or false")


def planned(ctx, request, finishing: Finishing | None = None):
    """The context a backend runs under for `request`: the plan made (with the finishing models
    `finishing` names), refused in one line when nothing fits, printed under --debug (the same
    plan is reused for the same request shape)."""
    from portrait.core.options import given_options

    memory = request.resolved.memory
    force = offload_setting(memory.get("offload", "auto"))
    options = given_options(request.options)  # the typed options, as given (the backend types them again)
    key = (request.backend, request.width, request.height, force, ctx.placement.device,
           tuple(sorted((k, str(v)) for k, v in options.items() if k in _MODEL_OPTIONS)), finishing)
    made = getattr(ctx.plan, "key", None) if ctx.plan is not None else None
    # the flow plans with its finishing; the backend's own call (no finishing) reuses that plan
    if made == key or (finishing is None and made and made[:-1] == key[:-1]):
        return ctx
    plan = plan_request_for(ctx, request.backend, request.width, request.height, options=options,
                            force=force, finishing=finishing)
    plan = dataclasses.replace(plan, key=key)
    if ctx.settings.debug:
        print("\n".join(plan.lines()), file=sys.stderr)
    if not plan.fits:
        raise BadInput(plan.refusal)
    return ctx.planned(plan)


# the options that change which models a backend loads (their roles)
_MODEL_OPTIONS = ("faceid_variant", "photomaker_version", "infiniteyou_variant", "identity_adapter", "controls")
