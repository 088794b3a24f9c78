"""The one place that turns registry ids into loaded diffusers objects.

Real models and their make-tiny stand-ins go through the same functions: a diffusers
folder, an A1111 single-file checkpoint (loaded offline with `from_single_file` and a
config folder), or an explicit `--base PATH`. Loaded weights live in `ctx.cache`:

- `load_components` loads a base once (unet, vae, text encoders, tokenizers, scheduler);
- `load_pipeline` composes a pipeline class (txt2img / img2img / inpaint, with or without
  ControlNets) around those same modules, so switching kind never reloads weights. The
  pipelines share their modules: a LoRA or IP-Adapter loaded into one is seen by all of
  them, exactly as with diffusers' `from_pipe`;
- `load_controlnet`, `load_vae` load and cache one model each.

All three go through the model door (portrait.core.models: resolve, verify, cache under one key):
this module holds the door's "components", "vae" and "controlnet" builders (`build_*`), i.e. the
diffusers-specific part of turning files into modules.

Placement comes from `ctx.placement`: fp32 on CPU, fp16/bf16 on CUDA (with the fp16-fix
VAE the sdxl preset names), `enable_model_cpu_offload` when placement.offload.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import models
from .config import presets_root
from .errors import BadInput, ModelMissing, PortraitError, bad_file
from .io import atomic_dir
from .registry import ResolvedModel
from .tokenizers import EOS, write_clip_tokenizer

# `edit`: a picture from reference images and a prompt (FLUX.2 [klein]'s multi-reference
# conditioning, Qwen-Image-Edit-2511, FLUX.1 Kontext), the frontier backends' kind.
KINDS = ("txt2img", "img2img", "inpaint", "edit")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# diffusers pipeline class per (family, kind, with ControlNet)
_PIPELINES = {
    ("sd15", "txt2img", False): "StableDiffusionPipeline",
    ("sd15", "img2img", False): "StableDiffusionImg2ImgPipeline",
    ("sd15", "inpaint", False): "StableDiffusionInpaintPipeline",
    ("sd15", "txt2img", True): "StableDiffusionControlNetPipeline",
    ("sd15", "img2img", True): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd15", "inpaint", True): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "txt2img", False): "StableDiffusionXLPipeline",
    ("sdxl", "img2img", False): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint", False): "StableDiffusionXLInpaintPipeline",
    ("sdxl", "txt2img", True): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", "inpaint", True): "StableDiffusionXLControlNetInpaintPipeline",
    ("flux", "txt2img", False): "FluxPipeline",
    ("flux", "img2img", False): "FluxImg2ImgPipeline",
    ("flux", "inpaint", False): "FluxInpaintPipeline",
    ("flux", "txt2img", True): "FluxControlNetPipeline",
    ("flux", "img2img", True): "FluxControlNetImg2ImgPipeline",
    ("flux", "inpaint", True): "FluxControlNetInpaintPipeline",
    ("flux", "edit", False): "FluxKontextPipeline",  # FLUX.1 Kontext [dev] weights (same transformer layout)
    # FLUX.2 [klein]: one pipeline for text to image and single/multi-reference editing.
    ("flux2-klein", "txt2img", False): "Flux2KleinPipeline",
    ("flux2-klein", "edit", False): "Flux2KleinPipeline",
    ("flux2-klein", "inpaint", False): "Flux2KleinInpaintPipeline",
    ("zimage", "txt2img", False): "ZImagePipeline",
    ("zimage", "img2img", False): "ZImageImg2ImgPipeline",
    ("zimage", "inpaint", False): "ZImageInpaintPipeline",
    ("qwen-image-edit", "edit", False): "QwenImageEditPlusPipeline",  # 2509/2511: up to 3 references
}

_PARTS = {
    "sd15": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "sdxl": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    # FLUX.1: a transformer instead of a UNet, CLIP-L (pooled) + T5 (sequence) text encoders.
    "flux": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"),
    # The frontier bases (issue 29): one Qwen text encoder each; Qwen-Image-Edit adds the
    # Qwen2.5-VL processor that reads the reference pictures.
    "flux2-klein": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    "zimage": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    "qwen-image-edit": ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler"),
}
FAMILIES = tuple(_PARTS)  # = config.BASE_FAMILIES, which presets are checked against (tests/test_loaders.py)
# The class of each part of a frontier folder, as its model_index.json names it: (library, class).
_CLASSES = {
    "flux2-klein": {"transformer": ("diffusers", "Flux2Transformer2DModel"), "vae": ("diffusers", "AutoencoderKLFlux2"),
                    "text_encoder": ("transformers", "Qwen3ForCausalLM"),
                    "tokenizer": ("transformers", "Qwen2TokenizerFast")},
    "zimage": {"transformer": ("diffusers", "ZImageTransformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "Qwen3Model"), "tokenizer": ("transformers", "Qwen2Tokenizer")},
    "qwen-image-edit": {"transformer": ("diffusers", "QwenImageTransformer2DModel"),
                        "vae": ("diffusers", "AutoencoderKLQwenImage"),
                        "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
                        "tokenizer": ("transformers", "Qwen2Tokenizer"),
                        "processor": ("transformers", "Qwen2VLProcessor")},
}
# Families whose transformer and text encoder runtime.quantize turns to 8-bit weights.
QUANTIZABLE = ("flux", "flux2-klein", "zimage", "qwen-image-edit")
# Pipeline settings a folder's model_index.json carries beside its parts (klein: whether the
# checkpoint is step-distilled, which switches CFG off).
_PIPELINE_CONFIG = ("is_distilled",)
# 8-bit weight formats for the FLUX transformer and T5 (preset runtime.quantize), through
# optimum-quanto (extra `flux`): qint8 is what InfiniteYou's own pipeline uses; both halve
# the bf16 weights (FLUX.1-dev transformer 23.8 GB -> ~12 GB, T5-XXL 9.5 GB -> ~4.8 GB).
QUANTIZE = {"none": None, "int8": "qint8", "fp8": "qfloat8"}


@dataclass(frozen=True)
class Components:
    """A loaded base: its modules (by pipeline argument name) and what it is.

    The pipelines composed around these modules live here too, not as separate cache
    entries: they are cheap wrappers, and evicting the base must evict them with it (else an
    old pipeline would keep the old weights alive beside a reloaded copy).
    """

    model_id: str
    family: str
    modules: Mapping[str, Any]
    source: Path  # the folder or file the weights came from
    config: Mapping[str, Any] = field(default_factory=dict)  # pipeline settings from model_index.json (is_distilled)
    pipelines: dict = field(default_factory=dict, compare=False, repr=False)
    lock: Any = field(default_factory=threading.RLock, compare=False, repr=False)

    def __getitem__(self, name: str) -> Any:
        return self.modules[name]

    def pipeline(self, key: Any, factory):
        with self.lock:
            if key not in self.pipelines:
                self.pipelines[key] = factory()
            return self.pipelines[key]


# --- small helpers --------------------------------------------------------------------


def _family(ctx, resolved: ResolvedModel | None, family: str | None) -> str:
    chosen = family or (resolved.spec.family if resolved else None) or ctx.preset.family
    if chosen not in _PARTS:
        raise BadInput(f"unknown model family '{chosen}' (expected {', '.join(FAMILIES)})")
    return chosen




def _weights_file(resolved: ResolvedModel) -> Path | None:
    """The single checkpoint file of a single-file model, else None (a diffusers folder)."""
    if resolved.path.is_file():
        return resolved.path
    top = [f for f in resolved.files if "/" not in f and f.endswith(WEIGHT_SUFFIXES)]
    if len(top) == 1 and not (resolved.root / "model_index.json").exists() and not (resolved.root / "config.json").exists():
        return resolved.root / top[0]
    return None


def _variant(folder: Path) -> str | None:
    """'fp16' when a folder holds only fp16-variant weights (SDXL base's UNet, ControlNet v1.1)."""
    names = [p.name for p in folder.glob("*") if p.is_file()]
    plain = any(n.endswith((".safetensors", ".bin")) and ".fp16." not in n for n in names)
    return "fp16" if not plain and any(".fp16." in n for n in names) else None


# The door's checks, under the names this module has always had (tests and callers use them).
verified_file = models.verify
load_torch_file = models.read_weights


# --- config folders for single files -------------------------------------------------


def single_file_config(ctx, resolved: ResolvedModel | None, family: str, name: str | None = None) -> Path:
    """The local config folder `from_single_file(config=...)` needs, never the hub.

    A tiny stand-in carries its own folder next to the weights (`config:` relative to the
    model). Real checkpoints use a folder the package ships (presets/configs/NAME), which is
    copied once into HOME/cache/configs/ with the CLIP tokenizers written beside it.
    """
    spec_config = (resolved.spec.config if resolved else None) or ""
    if resolved is not None and spec_config and (resolved.root / spec_config).is_dir():
        return resolved.root / spec_config
    shipped_name = spec_config if spec_config.startswith("configs/") else ""
    name = name or shipped_name or f"configs/{family}"
    shipped = presets_root() / name
    if not shipped.is_dir():
        raise PortraitError(f"config folder '{name}' is not shipped with portrait")
    target = ctx.settings.home / "cache" / name
    if (target / ".complete").exists():
        return target
    with atomic_dir(target) as tmp:
        _copy_tree(shipped, tmp)
        if (tmp / "model_index.json").exists():
            import json

            index = json.loads((tmp / "model_index.json").read_text())
            for folder, pad in (("tokenizer", EOS), ("tokenizer_2", "!")):
                if folder in index:
                    write_clip_tokenizer(tmp / folder, pad_token=pad)
        (tmp / ".complete").write_text("ok\n")
    return target


def _copy_tree(source, target: Path) -> None:
    """Copy a Traversable (importlib.resources) folder; it may live inside a wheel."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_dir():
            _copy_tree(item, target / item.name)
        elif not item.name.endswith(".md"):
            (target / item.name).write_bytes(item.read_bytes())


# --- single models ----------------------------------------------------------------------


def load_vae(ctx, model_id: str, explicit: Path | None = None):
    """An AutoencoderKL, through the model door (kind "vae")."""
    return models.load(ctx, model_id, "vae", path=explicit)


def build_vae(source: models.Source):
    """The door's "vae" builder: a folder (config.json + weights) or a single file."""
    from diffusers import AutoencoderKL

    resolved = source.resolved
    file = _weights_file(resolved)
    if file is not None:
        if file.suffix in PICKLE_SUFFIXES:
            models.verify(source.ctx, resolved, file.name)  # diffusers loads pickles weights-only; hash first
        config = single_file_config(source.ctx, resolved, resolved.spec.family or source.ctx.preset.family)
        return AutoencoderKL.from_single_file(str(file), config=str(config), subfolder="vae", torch_dtype=source.dtype,
                                              local_files_only=True)
    return AutoencoderKL.from_pretrained(resolved.root, torch_dtype=source.dtype, variant=_variant(resolved.root))


def _controlnet_folder(resolved: ResolvedModel) -> Path:
    configs = [f for f in resolved.files if f == "config.json" or f.endswith("/config.json")]
    return resolved.root / Path(configs[0]).parent if configs else resolved.root


def load_controlnet(ctx, model_id: str, explicit: Path | None = None):
    """A ControlNetModel (InstantID's IdentityNet too), through the model door (kind "controlnet")."""
    return models.load(ctx, model_id, "controlnet", path=explicit)


def build_controlnet(source: models.Source):
    """The door's "controlnet" builder: a folder (maybe an fp16 variant, maybe in a subfolder like
    InstantID's ControlNetModel/) or a single ControlNet-v1-1 file with its config. A FLUX
    ControlNet folder (config `_class_name` FluxControlNetModel, e.g. InfiniteYou's
    InfuseNetModel/) loads as a FluxControlNetModel."""
    import json

    from diffusers import ControlNetModel, FluxControlNetModel

    ctx, resolved = source.ctx, source.resolved
    folder = _controlnet_folder(resolved)
    if (folder / "config.json").is_file() and \
            json.loads((folder / "config.json").read_text()).get("_class_name") == "FluxControlNetModel":
        return FluxControlNetModel.from_pretrained(folder, torch_dtype=source.dtype, variant=_variant(folder))
    file = _weights_file(resolved)
    if file is not None:
        if file.suffix in PICKLE_SUFFIXES:
            models.verify(ctx, resolved, file.name)
        config = single_file_config(ctx, resolved, resolved.spec.family or "sd15", name="configs/controlnet-sd15")
        return ControlNetModel.from_single_file(str(file), config=str(config), torch_dtype=source.dtype,
                                                local_files_only=True)
    folder = _controlnet_folder(resolved)
    return ControlNetModel.from_pretrained(folder, torch_dtype=source.dtype, variant=_variant(folder))


_friendly = models.friendly


# --- bases --------------------------------------------------------------------------------


def _diffusers_part(cls, folder: Path, dtype, variant: str | None):
    """One diffusers model (UNet, VAE, transformer) from its folder in `dtype`.

    `from_pretrained` maps the whole weights file, so loading in another dtype than the stored
    one holds the file and the converted copy at once (SD1.5 UNet fp32 -> bf16: 5.8 GB peak RSS
    for a 1.6 GB result). Then the weights are read a tensor at a time into `dtype` instead
    (formats.weights) and assigned into the model built on the meta device; a folder whose keys
    are not the model's own (an older layout diffusers renames on load) or a class that keeps
    modules in fp32 takes `from_pretrained`'s path.
    """
    from .formats import weights

    files = weights.folder_weight_files(folder, variant)
    headers = [weights.safetensors_header(path)[0] for path in files or ()]
    wanted = str(dtype).removeprefix("torch.")
    if not files or weights.stored_dtypes(headers) <= {wanted} or getattr(cls, "_keep_in_fp32_modules", None):
        return cls.from_pretrained(folder, torch_dtype=dtype, variant=variant)
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device; buffers real
        model = cls.from_config(cls.load_config(folder))
    if {name for header in headers for name in header} != set(model.state_dict()):
        return cls.from_pretrained(folder, torch_dtype=dtype, variant=variant)
    state: dict[str, Any] = {}
    for path in files:
        state.update(weights.iter_safetensors(path, dtype))
    model.load_state_dict(state, assign=True)
    return model.eval()


def _folder_components(resolved: ResolvedModel, family: str, dtype, parts: Iterable[str] | None = None,
                       dtypes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Load each part of a diffusers folder by itself, so a folder whose model_index names a
    custom pipeline (YamerMIX) or whose UNet is only an fp16 variant (SDXL base) still loads.
    `dtypes` gives some parts a dtype of their own (the trainer's bf16 UNet on CPU)."""
    import diffusers
    import torch
    import transformers

    root = resolved.root
    modules: dict[str, Any] = {}
    default = dtype
    for part in parts or _PARTS[family]:
        dtype = getattr(torch, dtypes[part]) if dtypes and part in dtypes else default
        folder = root / part
        if not folder.is_dir():
            raise ModelMissing(resolved.spec.id, detail=f"{folder} is absent")
        if family in _CLASSES and part in _CLASSES[family]:
            modules[part] = _frontier_part(family, part, folder, dtype)
        elif part.startswith("tokenizer"):
            t5 = family == "flux" and part == "tokenizer_2"
            modules[part] = (transformers.T5TokenizerFast if t5 else transformers.CLIPTokenizer).from_pretrained(folder)
        elif part == "scheduler":
            config = diffusers.DDIMScheduler.load_config(folder)
            modules[part] = getattr(diffusers, config["_class_name"]).from_config(config)
        elif family == "flux" and part == "transformer":
            modules[part] = _diffusers_part(diffusers.FluxTransformer2DModel, folder, dtype, _variant(folder))
        elif family == "flux" and part.startswith("text_encoder"):
            cls = transformers.T5EncoderModel if part == "text_encoder_2" else transformers.CLIPTextModel
            modules[part] = cls.from_pretrained(folder, dtype=dtype, variant=_variant(folder))
        elif part.startswith("text_encoder"):
            cls = transformers.CLIPTextModelWithProjection if part == "text_encoder_2" else transformers.CLIPTextModel
            modules[part] = cls.from_pretrained(folder, dtype=dtype, variant=_variant(folder))
        else:
            cls = diffusers.UNet2DConditionModel if part == "unet" else diffusers.AutoencoderKL
            modules[part] = _diffusers_part(cls, folder, dtype, _variant(folder))
    return modules


def _frontier_part(family: str, part: str, folder: Path, dtype):
    """One part of a FLUX.2 [klein] / Z-Image / Qwen-Image-Edit folder by the class its
    model_index.json names (checked against _CLASSES, so a folder of another family is one line)."""
    import diffusers
    import transformers

    library, name = _CLASSES[family][part]
    index = folder.parent / "model_index.json"
    if index.is_file():
        import json

        named = (json.loads(index.read_text()).get(part) or [None, None])[1]
        # transformers 5 names one Qwen2 tokenizer class under both spellings.
        same = {"Qwen2TokenizerFast": "Qwen2Tokenizer"}
        if named and same.get(named, named) != same.get(name, name):
            raise BadInput(f"{index}: {part} is {named}; a {family} base has {name}")
    if library == "diffusers":
        return _diffusers_part(getattr(diffusers, name), folder, dtype, _variant(folder))
    cls = getattr(transformers, name)
    if part in ("tokenizer", "processor"):
        return cls.from_pretrained(folder)
    return cls.from_pretrained(folder, dtype=dtype, variant=_variant(folder))


def _pipeline_config(resolved: ResolvedModel) -> dict[str, Any]:
    import json

    index = resolved.root / "model_index.json"
    if not resolved.root.is_dir() or not index.is_file():
        return {}
    data = json.loads(index.read_text())
    return {k: data[k] for k in _PIPELINE_CONFIG if k in data}


def _flux_single_file_components(ctx, resolved: ResolvedModel, file: Path, dtype) -> dict[str, Any]:
    """A FLUX single file (BFL's `flux1-dev.safetensors`, or a fine-tune in its layout) holds
    only the transformer. It is converted offline with a shipped config; the text encoders,
    tokenizers, VAE and scheduler come from the preset's `flux_encoders` folder (FLUX.1-dev
    without its transformer/)."""
    import diffusers

    config = single_file_config(ctx, resolved, "flux")
    if file.suffix in PICKLE_SUFFIXES:
        verified_file(ctx, resolved, file.name)
    transformer = diffusers.FluxTransformer2DModel.from_single_file(
        str(file), config=str(config), subfolder="transformer", torch_dtype=dtype, local_files_only=True)
    encoders = ctx.resolve(ctx.preset.model("flux_encoders"))
    modules = _folder_components(encoders, "flux", dtype, parts=[p for p in _PARTS["flux"] if p != "transformer"])
    return {"transformer": transformer, **modules}


def quantize_module(module, scheme: str | None) -> bool:
    """8-bit weights for one module in place (optimum-quanto); False when scheme is none."""
    weights = QUANTIZE.get(scheme or "none", "?")
    if weights == "?":
        raise BadInput(f"runtime.quantize '{scheme}': use one of {', '.join(QUANTIZE)}")
    if weights is None or getattr(module, "_portrait_quantized", None) == weights:
        return False
    try:
        import optimum.quanto as quanto
    except ImportError:
        raise BadInput("runtime.quantize needs optimum-quanto: pip install 'portrait[flux]'") from None
    quanto.quantize(module, weights=getattr(quanto, weights))
    quanto.freeze(module)
    module._portrait_quantized = weights
    return True


def quantize_flux(modules: dict[str, Any], scheme: str | None) -> None:
    """8-bit weights for the transformer and the big text encoder in place (optimum-quanto), as
    InfiniteYou's pipeline does with --quantize_8bit; activations stay in the placement dtype.
    FLUX.1: the transformer and T5 (text_encoder_2); the frontier bases: the transformer and
    their Qwen encoder (text_encoder, the only one they have)."""
    names = ("transformer", "text_encoder_2") if "text_encoder_2" in modules else ("transformer", "text_encoder")
    for name in names:
        if name in modules:
            quantize_module(modules[name], scheme)


def _single_file_components(ctx, resolved: ResolvedModel, file: Path, family: str, dtype) -> dict[str, Any]:
    import diffusers

    if family == "flux":
        return _flux_single_file_components(ctx, resolved, file, dtype)
    config = single_file_config(ctx, resolved, family)
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    if file.suffix in PICKLE_SUFFIXES:
        verified_file(ctx, resolved, file.name)  # diffusers loads pickles weights-only; we check the hash first
    pipe = cls.from_single_file(str(file), config=str(config), torch_dtype=dtype, local_files_only=True, **extra)
    return {part: getattr(pipe, part) for part in _PARTS[family]}


def _default_vae_id(ctx, family: str) -> str | None:
    """The preset's VAE when it fits the base family (sd-vae-ft-mse, sdxl-vae-fp16-fix)."""
    vae_id = ctx.preset.models.get("vae")
    if not vae_id:
        return None
    spec = ctx.registry.get(vae_id)
    return vae_id if (spec.family or family) == family else None


def load_components(ctx, model_id: str | None = None, *, family: str | None = None, base_path: Path | str | None = None,
                    vae: str | None = "auto", dtypes: Mapping[str, str] | None = None) -> Components:
    """Load a base's modules once per (model, device, dtype, vae); cached in ctx.cache.

    `base_path` is an explicit file or folder (`--base PATH`): a single-file checkpoint
    (.safetensors, or a pickle .ckpt) or a diffusers folder. `vae="auto"` swaps in the
    preset's VAE role; None keeps the base's own; any other value is a registry id.
    """
    model_id = model_id or ctx.preset.model("base")
    explicit = Path(base_path) if base_path else None
    resolved = models.resolve(ctx, model_id, explicit)
    fam = _family(ctx, resolved, family)
    vae_id = _default_vae_id(ctx, fam) if vae == "auto" else vae
    quantize = str(ctx.preset.section("runtime").get("quantize", "none")) if fam in QUANTIZABLE else "none"
    extra: dict[str, Any] = {"quantize": quantize} if quantize != "none" else {}
    if dtypes:
        extra["dtypes"] = dict(dtypes)
    return models.load(ctx, model_id, "components", path=explicit, family=fam, vae=vae_id, requested=model_id, **extra)


def build_components(source: models.Source, family: str, vae_id: str | None, requested: str | None = None,
                     quantize: str = "none", dtypes: Mapping[str, str] | None = None) -> Components:
    """The door's "components" builder: a single file or a diffusers folder, placed and in eval
    (FLUX: the transformer and T5 quantized first when runtime.quantize asks). `dtypes` maps
    parts to a dtype name of their own (default: the placement's)."""
    ctx, resolved = source.ctx, source.resolved
    file = _weights_file(resolved)
    if file is not None:
        modules = _single_file_components(ctx, resolved, file, family, source.dtype)
        import torch

        for name, dtype_name in (dtypes or {}).items():  # a single file is converted whole, then cast
            if name in modules:
                modules[name].to(getattr(torch, dtype_name))
    else:
        # A folder's own VAE is not read when the preset's replaces it (SD1.5: 335 MB that
        # would be loaded, then dropped, on every start).
        parts = [p for p in _PARTS[family] if not (vae_id and p == "vae")]
        modules = _folder_components(resolved, family, source.dtype, parts=parts, dtypes=dtypes)
    if vae_id:
        modules["vae"] = load_vae(ctx, vae_id)
    if family in QUANTIZABLE:
        quantize_flux(modules, quantize)
    for name, module in modules.items():
        if not name.startswith(("tokenizer", "scheduler", "processor")):
            modules[name] = models.place(ctx, module, cast=False, offloaded=True)
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        if name in modules:
            modules[name].eval()
    config = _pipeline_config(resolved) if file is None else {}
    return Components(requested or source.model_id, family, modules, file or resolved.root, config)


def _build(cls, components: Components, extra: Mapping[str, Any]):
    """Instantiate `cls` from shared modules, passing only what its constructor takes."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.modules.items() if k in accepted}
    # Each pipeline gets its own scheduler object: schedulers keep per-call state (timesteps).
    kwargs["scheduler"] = kwargs["scheduler"].__class__.from_config(kwargs["scheduler"].config)
    defaults = {"safety_checker": None, "feature_extractor": None, "image_encoder": None,
                "requires_safety_checker": False, "add_watermarker": False}
    for name, value in defaults.items():
        if name in accepted and name not in kwargs:
            kwargs[name] = value
    kwargs.update({k: v for k, v in components.config.items() if k in accepted})
    kwargs.update({k: v for k, v in extra.items() if k in accepted})
    return cls(**kwargs)


def load_pipeline(ctx, model_id: str | None = None, kind: str = "txt2img", controlnets: Iterable[str] = (), *,
                  family: str | None = None, base_path: Path | str | None = None, vae: str | None = "auto",
                  vae_slicing: bool = False, vae_tiling: bool = False, scheduler: str | None = None,
                  dtypes: Mapping[str, str] | None = None):
    """A ready diffusers pipeline for `kind` (txt2img | img2img | inpaint), with ControlNets.

    Built around `load_components` so kinds and ControlNet sets share one copy of the base
    weights; the pipeline itself is kept with those components per (kind, ControlNets). `scheduler`
    names a sampler (see SCHEDULERS); None keeps the model's own. `dtypes`: parts loaded in a
    dtype of their own (see load_components).
    """
    import diffusers

    if kind not in KINDS:
        raise BadInput(f"unknown pipeline kind '{kind}' (expected one of {', '.join(KINDS)})")
    controlnets = tuple(controlnets)
    components = load_components(ctx, model_id, family=family, base_path=base_path, vae=vae, dtypes=dtypes)
    model_id = components.model_id
    key = (components.family, kind, bool(controlnets))
    if key not in _PIPELINES:
        what = f"{kind} with ControlNets" if controlnets else kind
        raise BadInput(f"base '{components.model_id}' ({components.family}) has no {what} pipeline")
    cls = getattr(diffusers, _PIPELINES[key])

    def factory():
        extra: dict[str, Any] = {}
        if controlnets:
            nets = [load_controlnet(ctx, cid) for cid in controlnets]
            for cid, net in zip(controlnets, nets):
                _check_controlnet_fits(cid, net, components)
            extra["controlnet"] = nets[0] if len(nets) == 1 else nets
        pipe = _build(cls, components, extra)
        if ctx.placement.offload:
            pipe.enable_model_cpu_offload(device=ctx.placement.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = components.pipeline((kind, controlnets), _friendly(factory, model_id))
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if scheduler:
        set_scheduler(pipe, scheduler)
    return pipe


def _check_controlnet_fits(controlnet_id: str, net, components: Components) -> None:
    """A ControlNet for the other family fails deep inside the UNet; say so up front."""
    if components.family == "flux":
        if "unet" in components.modules or getattr(net.config, "joint_attention_dim", None) != \
                components["transformer"].config.joint_attention_dim:
            raise BadInput(f"ControlNet '{controlnet_id}' does not fit base '{components.model_id}' (flux)")
        return
    if not hasattr(net.config, "cross_attention_dim"):
        raise BadInput(f"ControlNet '{controlnet_id}' is a FLUX ControlNet; base '{components.model_id}' is "
                       f"{components.family}")
    unet = components["unet"]
    if net.config.cross_attention_dim != unet.config.cross_attention_dim or \
            tuple(net.config.block_out_channels) != tuple(unet.config.block_out_channels):
        raise BadInput(f"ControlNet '{controlnet_id}' does not fit base '{components.model_id}' "
                       f"({components.family}): use a ControlNet of the same family")


# --- schedulers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SchedulerChoice:
    cls: str
    options: Mapping[str, Any]
    a1111: str  # A1111's "Sampler" label for the PNG parameters chunk
    schedule: str = ""  # A1111's "Schedule type" (Karras) when not the default
    families: tuple[str, ...] = ("sd15", "sdxl")  # the bases whose noise schedule it fits


SCHEDULERS: dict[str, SchedulerChoice] = {
    "euler": SchedulerChoice("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": SchedulerChoice("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "ddim": SchedulerChoice("DDIMScheduler", {}, "DDIM"),
    "pndm": SchedulerChoice("PNDMScheduler", {}, "PLMS"),
    "unipc": SchedulerChoice("UniPCMultistepScheduler", {}, "UniPC"),
    "dpmpp_2m": SchedulerChoice("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}, "DPM++ 2M"),
    "dpmpp_2m_karras": SchedulerChoice("DPMSolverMultistepScheduler",
                                       {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}, "DPM++ 2M", "Karras"),
    "dpmpp_2m_sde_karras": SchedulerChoice("DPMSolverMultistepScheduler",
                                           {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
                                           "DPM++ 2M SDE", "Karras"),
    "lcm": SchedulerChoice("LCMScheduler", {}, "LCM"),
    # FLUX's flow-matching Euler (its only sampler in diffusers); Forge labels it Euler / Simple.
    "flow_euler": SchedulerChoice("FlowMatchEulerDiscreteScheduler", {}, "Euler", "Simple",
                                  ("flux", "flux2-klein", "zimage", "qwen-image-edit")),
}


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A diffusers scheduler for a sampler name, from a model's scheduler config."""
    import diffusers

    choice = SCHEDULERS.get(name)
    if choice is None:
        raise BadInput(f"unknown sampler '{name}' (known: {', '.join(SCHEDULERS)})")
    # Karras sigmas are an Euler/DPM option; other classes ignore unknown keys, but a stale
    # `use_karras_sigmas` from the base config must not leak into a plain choice.
    base = {k: v for k, v in dict(config).items() if k not in ("use_karras_sigmas", "algorithm_type")}
    return getattr(diffusers, choice.cls).from_config({**base, **choice.options})


def set_scheduler(pipe, name: str):
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return pipe


def sampler_label(name: str) -> tuple[str, str]:
    """(Sampler, Schedule type) as A1111 writes them, e.g. ("DPM++ 2M", "Karras")."""
    choice = SCHEDULERS.get(name)
    if choice is None:
        raise BadInput(f"unknown sampler '{name}' (known: {', '.join(SCHEDULERS)})")
    return choice.a1111, choice.schedule
