"""The parts of a diffusers base the door builds: a base's modules (kind "components"), a VAE
("vae"), a ControlNet ("controlnet"), from a diffusers folder or a single checkpoint file with
the config folder the package ships. portrait/core/loaders.py composes pipelines around them
through the door; this module knows files and diffusers classes, not the door.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..config import presets_root
from ..errors import BadInput, ModelMissing, PortraitError
from ..io import atomic_dir
from ..modelfiles import PICKLE_SUFFIXES, Kind, Source, place, verify
from ..modelspec import ResolvedModel
from ..tokenizers import EOS, write_clip_tokenizer

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")




PARTS = {
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


FAMILIES = tuple(PARTS)  # = config.BASE_FAMILIES, which presets are checked against (tests/test_frontier_models.py)
# The class of each part of a frontier folder, as its model_index.json names it: (library, class).
CLASSES = {
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
PIPELINE_CONFIG = ("is_distilled",)


def family_parts(family: str) -> tuple[str, ...] | None:
    """The pipeline parts of a family a base folder holds (None for a family loaders do not know)."""
    return PARTS.get(family)


# 8-bit weight formats for the FLUX transformer and T5 (preset runtime.quantize), through
# optimum-quanto (extra `flux`): qint8 is what InfiniteYou's own pipeline uses; both halve
# the bf16 weights (FLUX.1-dev transformer 23.8 GB -> ~12 GB, T5-XXL 9.5 GB -> ~4.8 GB).
# qint4 (4-bit weights, group scales) is the plan's last step before refusing; NF4 would need
# bitsandbytes, which the lock does not carry.
QUANTIZE = {"none": None, "int8": "qint8", "fp8": "qfloat8", "int4": "qint4"}


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


def weights_file(resolved: ResolvedModel) -> Path | None:
    """The single checkpoint file of a single-file model, else None (a diffusers folder)."""
    if resolved.path.is_file():
        return resolved.path
    top = [f for f in resolved.files if "/" not in f and f.endswith(WEIGHT_SUFFIXES)]
    if len(top) == 1 and not (resolved.root / "model_index.json").exists() and not (resolved.root / "config.json").exists():
        return resolved.root / top[0]
    return None


def variant(folder: Path) -> str | None:
    """'fp16' when a folder holds only fp16-variant weights (SDXL base's UNet, ControlNet v1.1)."""
    names = [p.name for p in folder.glob("*") if p.is_file()]
    plain = any(n.endswith((".safetensors", ".bin")) and ".fp16." not in n for n in names)
    return "fp16" if not plain and any(".fp16." in n for n in names) else None


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
        copy_tree(shipped, tmp)
        if (tmp / "model_index.json").exists():
            import json

            index = json.loads((tmp / "model_index.json").read_text())
            for folder, pad in (("tokenizer", EOS), ("tokenizer_2", "!")):
                if folder in index:
                    write_clip_tokenizer(tmp / folder, pad_token=pad)
        (tmp / ".complete").write_text("ok\n")
    return target


def copy_tree(source, target: Path) -> None:
    """Copy a Traversable (importlib.resources) folder; it may live inside a wheel."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_dir():
            copy_tree(item, target / item.name)
        elif not item.name.endswith(".md"):
            (target / item.name).write_bytes(item.read_bytes())


def build_vae(source: Source):
    """diffusers AutoencoderKL: a folder (config.json + weights) or a single file."""
    from diffusers import AutoencoderKL

    resolved = source.resolved
    file = weights_file(resolved)
    if file is not None:
        if file.suffix in PICKLE_SUFFIXES:
            verify(source.ctx, resolved, file.name)  # diffusers loads pickles weights-only; hash first
        config = single_file_config(source.ctx, resolved, resolved.spec.family or source.ctx.preset.family)
        return AutoencoderKL.from_single_file(str(file), config=str(config), subfolder="vae", torch_dtype=source.dtype,
                                              local_files_only=True)
    return AutoencoderKL.from_pretrained(resolved.root, torch_dtype=source.dtype, variant=variant(resolved.root))


def controlnet_folder(resolved: ResolvedModel) -> Path:
    configs = [f for f in resolved.files if f == "config.json" or f.endswith("/config.json")]
    return resolved.root / Path(configs[0]).parent if configs else resolved.root


def build_controlnet(source: Source):
    """The door's "controlnet" builder: a folder (maybe an fp16 variant, maybe in a subfolder like
    InstantID's ControlNetModel/) or a single ControlNet-v1-1 file with its config. A FLUX
    ControlNet folder (config `_class_name` FluxControlNetModel, e.g. InfiniteYou's
    InfuseNetModel/) loads as a FluxControlNetModel."""
    import json

    from diffusers import ControlNetModel, FluxControlNetModel

    ctx, resolved = source.ctx, source.resolved
    folder = controlnet_folder(resolved)
    if (folder / "config.json").is_file() and \
            json.loads((folder / "config.json").read_text()).get("_class_name") == "FluxControlNetModel":
        return FluxControlNetModel.from_pretrained(folder, torch_dtype=source.dtype, variant=variant(folder))
    file = weights_file(resolved)
    if file is not None:
        if file.suffix in PICKLE_SUFFIXES:
            verify(ctx, resolved, file.name)
        config = single_file_config(ctx, resolved, resolved.spec.family or "sd15", name="configs/controlnet-sd15")
        return ControlNetModel.from_single_file(str(file), config=str(config), torch_dtype=source.dtype,
                                                local_files_only=True)
    folder = controlnet_folder(resolved)
    return ControlNetModel.from_pretrained(folder, torch_dtype=source.dtype, variant=variant(folder))


def diffusers_part(cls, folder: Path, dtype, variant: str | None):
    """One diffusers model (UNet, VAE, transformer) from its folder in `dtype`.

    `from_pretrained` maps the whole weights file, so loading in another dtype than the stored
    one holds the file and the converted copy at once (SD1.5 UNet fp32 -> bf16: 5.8 GB peak RSS
    for a 1.6 GB result). Then the weights are read a tensor at a time into `dtype` instead
    (formats.weights) and assigned into the model built on the meta device; a folder whose keys
    are not the model's own (an older layout diffusers renames on load) or a class that keeps
    modules in fp32 takes `from_pretrained`'s path.
    """
    from ..formats import weights

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


def folder_components(resolved: ResolvedModel, family: str, dtype, parts: Iterable[str] | None = None,
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
    for part in parts or PARTS[family]:
        dtype = getattr(torch, dtypes[part]) if dtypes and part in dtypes else default
        folder = root / part
        if not folder.is_dir():
            raise ModelMissing(resolved.spec.id, detail=f"{folder} is absent")
        if family in CLASSES and part in CLASSES[family]:
            modules[part] = frontier_part(family, part, folder, dtype)
        elif part.startswith("tokenizer"):
            t5 = family == "flux" and part == "tokenizer_2"
            modules[part] = (transformers.T5TokenizerFast if t5 else transformers.CLIPTokenizer).from_pretrained(folder)
        elif part == "scheduler":
            config = diffusers.DDIMScheduler.load_config(folder)
            modules[part] = getattr(diffusers, config["_class_name"]).from_config(config)
        elif family == "flux" and part == "transformer":
            modules[part] = diffusers_part(diffusers.FluxTransformer2DModel, folder, dtype, variant(folder))
        elif family == "flux" and part.startswith("text_encoder"):
            cls = transformers.T5EncoderModel if part == "text_encoder_2" else transformers.CLIPTextModel
            modules[part] = cls.from_pretrained(folder, dtype=dtype, variant=variant(folder))
        elif part.startswith("text_encoder"):
            cls = transformers.CLIPTextModelWithProjection if part == "text_encoder_2" else transformers.CLIPTextModel
            modules[part] = cls.from_pretrained(folder, dtype=dtype, variant=variant(folder))
        else:
            cls = diffusers.UNet2DConditionModel if part == "unet" else diffusers.AutoencoderKL
            modules[part] = diffusers_part(cls, folder, dtype, variant(folder))
    return modules


def frontier_part(family: str, part: str, folder: Path, dtype):
    """One part of a FLUX.2 [klein] / Z-Image / Qwen-Image-Edit folder by the class its
    model_index.json names (checked against CLASSES, so a folder of another family is one line)."""
    import diffusers
    import transformers

    library, name = CLASSES[family][part]
    index = folder.parent / "model_index.json"
    if index.is_file():
        import json

        named = (json.loads(index.read_text()).get(part) or [None, None])[1]
        # transformers 5 names one Qwen2 tokenizer class under both spellings.
        same = {"Qwen2TokenizerFast": "Qwen2Tokenizer"}
        if named and same.get(named, named) != same.get(name, name):
            raise BadInput(f"{index}: {part} is {named}; a {family} base has {name}")
    if library == "diffusers":
        return diffusers_part(getattr(diffusers, name), folder, dtype, variant(folder))
    cls = getattr(transformers, name)
    if part in ("tokenizer", "processor"):
        return cls.from_pretrained(folder)
    return cls.from_pretrained(folder, dtype=dtype, variant=variant(folder))


def pipeline_config(resolved: ResolvedModel) -> dict[str, Any]:
    """The pipeline settings a folder's model_index.json carries (PIPELINE_CONFIG)."""
    import json

    index = resolved.root / "model_index.json"
    if not resolved.root.is_dir() or not index.is_file():
        return {}
    data = json.loads(index.read_text())
    return {k: data[k] for k in PIPELINE_CONFIG if k in data}


def flux_single_file_components(ctx, resolved: ResolvedModel, file: Path, dtype) -> dict[str, Any]:
    """A FLUX single file (BFL's `flux1-dev.safetensors`, or a fine-tune in its layout) holds
    only the transformer. It is converted offline with a shipped config; the text encoders,
    tokenizers, VAE and scheduler come from the preset's `flux_encoders` folder (FLUX.1-dev
    without its transformer/)."""
    import diffusers

    config = single_file_config(ctx, resolved, "flux")
    if file.suffix in PICKLE_SUFFIXES:
        verify(ctx, resolved, file.name)
    transformer = diffusers.FluxTransformer2DModel.from_single_file(
        str(file), config=str(config), subfolder="transformer", torch_dtype=dtype, local_files_only=True)
    encoders = ctx.resolve(ctx.preset.model("flux_encoders"))
    modules = folder_components(encoders, "flux", dtype, parts=[p for p in PARTS["flux"] if p != "transformer"])
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


def single_file_components(ctx, resolved: ResolvedModel, file: Path, family: str, dtype) -> dict[str, Any]:
    import diffusers

    if family == "flux":
        return flux_single_file_components(ctx, resolved, file, dtype)
    config = single_file_config(ctx, resolved, family)
    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    if file.suffix in PICKLE_SUFFIXES:
        verify(ctx, resolved, file.name)  # diffusers loads pickles weights-only; we check the hash first
    pipe = cls.from_single_file(str(file), config=str(config), torch_dtype=dtype, local_files_only=True, **extra)
    return {part: getattr(pipe, part) for part in PARTS[family]}


def build_components(source: Source, family: str, vae_id: str | None, requested: str | None = None,
                     quantize: Any = (), dtypes: Mapping[str, str] | None = None) -> Components:
    """A Stable Diffusion / FLUX base's modules (unet or transformer, vae, text encoders, tokenizers,
    scheduler): a single file or a diffusers folder, placed and in eval. `quantize` maps parts to
    an optimum-quanto scheme (the memory plan's, portrait.core.memplan; quantized before any
    placement). Parts go to the device only when the plan keeps them resident; under an offload
    strategy they stay on the CPU for the pipeline's hooks. `dtypes` maps parts to a dtype name
    of their own (default: the placement's)."""
    ctx, resolved = source.ctx, source.resolved
    file = weights_file(resolved)
    if file is not None:
        modules = single_file_components(ctx, resolved, file, family, source.dtype)
        import torch

        for name, dtype_name in (dtypes or {}).items():  # a single file is converted whole, then cast
            if name in modules:
                modules[name].to(getattr(torch, dtype_name))
    else:
        # A folder's own VAE is not read when the preset's replaces it (SD1.5: 335 MB that
        # would be loaded, then dropped, on every start).
        parts = [p for p in PARTS[family] if not (vae_id and p == "vae")]
        modules = folder_components(resolved, family, source.dtype, parts=parts, dtypes=dtypes)
    if vae_id:
        modules["vae"] = source.load(vae_id, "vae")
    if isinstance(quantize, str):  # the single-scheme form (runtime.quantize): the DiT and its big text encoder
        if family in QUANTIZABLE and quantize != "none":
            quantize_flux(modules, quantize)
        quantize = ()
    for name, scheme in dict(quantize).items():
        if name in modules:
            quantize_module(modules[name], scheme)
    for name, module in modules.items():
        if not name.startswith(("tokenizer", "scheduler", "processor")):
            modules[name] = place(ctx, module, cast=False, offloaded=True)
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2"):
        if name in modules:
            modules[name].eval()
    config = pipeline_config(resolved) if file is None else {}
    return Components(requested or source.model_id, family, modules, file or resolved.root, config)


VAE = Kind("vae", build_vae, place=True, offloaded=True)
def _controlnet(source: Source):
    """diffusers ControlNetModel (or FluxControlNetModel): a folder (fp16 variant, a subfolder like
    InstantID's ControlNetModel/) or a single ControlNet-v1-1 file with its config; in eval."""
    return build_controlnet(source).eval()


CONTROLNET = Kind("controlnet", _controlnet, place=True, offloaded=True)
def _components(source: Source, family: str, vae: str | None = None, requested: str | None = None,
                quantize: Any = (), dtypes: Mapping[str, str] | None = None):
    """A Stable Diffusion / FLUX base's modules (unet or transformer, vae, text encoders,
    tokenizers, scheduler); the pipelines portrait.core.loaders composes around them live with them."""
    return build_components(source, family, vae, requested, quantize, dtypes)


COMPONENTS = Kind("components", _components)
