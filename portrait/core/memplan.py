"""The memory plan: where every module of a request goes, decided before anything loads.

Why: placement used to be decided after loading (every part went to CUDA as it loaded, then
the free memory left was compared with the whole footprint, counting the model twice), so
FLUX + InfuseNet ran out of memory on 24-40 GB cards even with offload on, and int8 runs that
would fit were offloaded anyway (docs/ARCHITECTURE.md#memory-plan).

A plan is computed from what is known without loading a weight:

- parameter counts: the safetensors header of a file that is present (8 bytes + JSON, never the
  tensors), else the shipped config of the family's part built on torch's meta device
  (diffusers / transformers `from_config`: no memory, no init), else the registry's recorded
  file sizes divided by the bytes of the stored dtype;
- bytes per weight under the run's precision and quantization (optimum-quanto int8 / fp8 one
  byte per weight plus a scale per output row, int4 half a byte plus group scales);
- an activation estimate per resolution and batch (per family, at its native size; scaled by
  pixels, batch and the square root of the denoiser's size against the real one).

Strategies are tried in this order, the first that fits wins: everything resident; model CPU
offload (one model on the GPU at a time, side networks stay with the denoiser); group offload
(block by block, diffusers' `enable_group_offload`); sequential offload (leaf by leaf); then the
largest quantizable part is quantized (int8, then the family's next scheme) and the strategies
are tried again. When nothing fits, the plan refuses in one line naming the smallest card the
request fits on. Offloading needs host RAM for the weights it keeps on the CPU; a strategy
whose CPU side does not fit in available RAM is skipped.

This module is pure arithmetic over `Part`s plus the sizing helpers; which parts a request
needs (backend roles, adapters, face models) is stages/planning.py.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import BadInput

GIB = 2**30
# The cards `portrait plan` answers for (GB as sold), and the ones a refusal may name.
CARDS_GB = (8, 12, 16, 24, 48, 80)
REFUSAL_CARDS_GB = (8, 10, 12, 16, 20, 24, 32, 40, 48, 80, 96, 141, 192)
STRATEGIES = ("resident", "model_offload", "group_offload", "sequential_offload")
# What the CUDA context, cuBLAS/cuDNN workspaces and the allocator's fragmentation take from a
# card beside the tensors we count: ~0.5 GB context + workspaces on recent drivers, and a 5%
# margin for fragmentation. A simulated card (portrait plan) loses both; a real device's
# `mem_get_info` already excludes the context, so only the workspace and margin apply.
CONTEXT_GB = 0.5
WORKSPACE_GB = 0.3
MARGIN = 0.05
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
               "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
# Bytes per weight under an optimum-quanto scheme: 8-bit weights carry one fp scale per output
# row (negligible), qint4 packs two weights per byte with a bf16 scale and shift per group of
# 128 (+ ~3%). The few modules quanto leaves alone (norm scales, embeddings) are ~1-2% of a
# FLUX transformer or T5 and are counted at the compute dtype.
QUANT_BYTES = {"int8": 1.0, "fp8": 1.0, "int4": 0.53}
QUANT_COVERAGE = 0.98
NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


# --- what a family declares -------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyRuntime:
    """What the plan and the precision rules need to know of a base family.

    `precisions`: the compute dtypes it runs in on CUDA, preferred first (a family without
    "fp16" is bf16-only: FLUX's activations overflow fp16, which draws black images).
    `quantize`: the optimum-quanto schemes its large parts take, mildest first.
    `activation_gb` at `native` px, batch 1, 16-bit, with CFG's doubled batch where the family
    uses CFG and the VAE decode: diffusers' published figures (SD1.5 512 px ~0.7 GB, SDXL
    1024 px ~2.5 GB); FLUX.1-dev 1024 px ~3 GB (InfiniteYou's 43 GB bf16 peak less its weights).
    `reference_params`: the real denoiser's size, so a tiny one's activations scale down.
    `block_fraction`: the largest block group of a part under group offload (a UNet's down/up
    blocks come in 3-4 groups; a DiT's in one per transformer block).
    """

    precisions: tuple[str, ...] = ("fp16", "bf16", "fp32")
    quantize: tuple[str, ...] = ()
    activation_gb: float = 3.0
    native: int = 1024
    reference_params: int = 2_600_000_000
    block_fraction: float = 0.05


FAMILY_RUNTIME: dict[str, FamilyRuntime] = {
    "sd15": FamilyRuntime(("fp16", "bf16", "fp32"), (), 0.7, 512, 859_520_964, 0.35),
    "sdxl": FamilyRuntime(("fp16", "bf16", "fp32"), (), 2.5, 1024, 2_567_463_684, 0.35),
    "flux": FamilyRuntime(("bf16", "fp32"), ("int8", "fp8", "int4"), 3.0, 1024, 11_901_408_320, 0.03),
    # The frontier bases (issue 29) run in bf16 as their cards do; their denoisers' sizes from
    # the bf16 file sizes on their pages (klein 4B 7.75 GB, Z-Image 12.3 GB, Qwen-Image-Edit-2511
    # 40.9 GB); no published activation figure: FLUX's at 1024 px.
    "flux2-klein": FamilyRuntime(("bf16", "fp32"), ("int8", "fp8", "int4"), 3.0, 1024, 3_875_000_000, 0.03),
    "zimage": FamilyRuntime(("bf16", "fp32"), ("int8", "fp8", "int4"), 3.0, 1024, 6_150_000_000, 0.03),
    "qwen-image-edit": FamilyRuntime(("bf16", "fp32"), ("int8", "fp8", "int4"), 3.0, 1024, 20_450_000_000, 0.03),
}
# A family this table does not name (a newer one added with its registry rows) is planned as a
# bf16 DiT that takes int8: sizes come from its registry rows and configs, not from here.
DEFAULT_RUNTIME = FamilyRuntime(("bf16", "fp32"), ("int8", "fp8"), 3.0, 1024, 6_000_000_000, 0.05)


def family_runtime(family: str) -> FamilyRuntime:
    return FAMILY_RUNTIME.get(family, DEFAULT_RUNTIME)


def register_family(name: str, runtime: FamilyRuntime) -> None:
    """Declare a family's precisions, quantization and activation scale (a new family module)."""
    FAMILY_RUNTIME[name] = runtime


def bf16_only(family: str) -> bool:
    return "fp16" not in family_runtime(family).precisions


# --- parts ---------------------------------------------------------------------------------------

# How a part is used, which decides where it lives under each strategy:
#   text     runs once per prompt before denoising (text encoders)
#   denoiser the UNet / transformer, every step
#   side     runs every step beside the denoiser (ControlNets, IdentityNet, InfuseNet)
#   adapter  weights that join the denoiser (IP-Adapter attention, LoRAs, PuLID's ID layers)
#   vae      encodes / decodes once
#   aux      a torch encoder run once per identity, kept on the device (CLIP, EVA, PuLID's
#            IDFormer, ArcFace IR-SE, PhotoMaker's ID encoder)
#   onnx     a face model on onnxruntime's CUDA provider (its own arena on the same card)
#   finish   a finishing model (upscaler, face restorer, scoring CLIP, face parser): placed on the
#            device when finishing runs and kept there in the run's cache, so it shares the card
#            with the next generation (the similarity gate regenerates after finishing started)
ROLES = ("text", "denoiser", "side", "adapter", "vae", "aux", "onnx", "finish")
# The roles that stay on the device under every strategy (loaded once, cached placed).
ALWAYS = ("aux", "onnx", "finish")


@dataclass(frozen=True)
class Part:
    name: str  # "unet", "text_encoder_2", "controlnet:instantid-controlnet", "onnx:antelopev2"
    model_id: str
    role: str
    params: int  # parameters (weights) counted
    source: str  # "header" | "config" | "registry" | "file-size"
    quantizable: bool = False
    largest_tensor: int = 0  # parameters in its largest tensor (sequential offload's peak)
    stored_dtype: str = ""  # what the file holds ("bf16", "fp16", "fp32"); "" unknown
    keep_dtype: str = ""  # a part that runs in its own dtype whatever the run's (fp32 ArcFace, ONNX)

    def weight_bytes(self, dtype: str, quant: str | None = None) -> float:
        own = self.keep_dtype or dtype
        per = DTYPE_BYTES[own]
        if quant:
            return self.params * (QUANT_COVERAGE * QUANT_BYTES[quant] + (1 - QUANT_COVERAGE) * per)
        return float(self.params * per)


@dataclass(frozen=True)
class Budget:
    """What the plan has to fit in: the device's free memory (bytes), whether it does bf16, the
    host's available RAM (bytes) for offloaded weights. `simulated` cards lose the context too."""

    device: str
    free: float
    total: float
    bf16: bool = True
    host_ram: float = float("inf")
    name: str = ""
    simulated: bool = False

    @property
    def usable(self) -> float:
        reserve = (CONTEXT_GB if self.simulated else 0.0) + WORKSPACE_GB
        return max(0.0, (self.free - reserve * GIB) * (1 - MARGIN))

    @classmethod
    def card(cls, gb: float, *, bf16: bool = True, host_ram_gb: float | None = None) -> "Budget":
        ram = float("inf") if host_ram_gb is None else host_ram_gb * GIB
        return cls("cuda", gb * GIB, gb * GIB, bf16, ram, f"{gb:g} GB card", simulated=True)


def device_budget(device: str) -> Budget:
    """The budget of a real (or test-patched) CUDA device: free memory now, its name, bf16."""
    import torch

    index = torch.device(device).index or 0
    free, total = torch.cuda.mem_get_info(index)
    props = torch.cuda.get_device_properties(index)
    try:
        bf16 = bool(torch.cuda.is_bf16_supported())
    except Exception:  # an old driver without the query: Ampere (sm_80) and newer have bf16
        bf16 = getattr(props, "major", 0) >= 8
    return Budget(device, float(free), float(total), bf16, host_ram_bytes(), str(getattr(props, "name", "cuda")))


def host_ram_bytes() -> float:
    """Available host RAM (MemAvailable), where offloaded weights live; infinite when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    return float("inf")


# --- the plan ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placed:
    part: Part
    where: str  # "cuda" | "offload" (moved in when used) | "cpu"
    dtype: str
    quantize: str | None
    bytes: float


@dataclass(frozen=True)
class MemoryPlan:
    """The placement chosen for one request on one budget, and what it predicts."""

    family: str
    backend: str
    width: int
    height: int
    batch: int
    device: str
    dtype: str  # "float16" | "bfloat16" | "float32"
    strategy: str  # resident | model_offload | group_offload | sequential_offload | cpu
    quantize: Mapping[str, str]  # part name -> scheme
    parts: tuple[Placed, ...]
    peak: float  # predicted peak device bytes (weights on the device + activations)
    weights: float  # all weights at the chosen precision and quantization
    activations: float
    budget: float  # usable bytes
    fits: bool
    max_batch: int = 1
    notes: tuple[str, ...] = ()
    refusal: str = ""
    card: str = ""
    key: tuple = ()  # the request shape it was made for (stages/planning.planned reuses it)

    @property
    def offload(self) -> bool:
        return self.strategy not in ("resident", "cpu")

    def part_quant(self, name: str) -> str | None:
        return self.quantize.get(name)

    def as_dict(self) -> dict[str, Any]:
        """For results.json and `portrait plan --json` (sizes in GB, 2 decimals)."""
        return {
            "device": self.device, "card": self.card, "family": self.family, "backend": self.backend,
            "size": f"{self.width}x{self.height}", "batch": self.batch, "dtype": NAMES.get(self.dtype, self.dtype),
            "strategy": self.strategy, "quantize": dict(self.quantize), "fits": self.fits,
            "predicted_peak_gb": gb(self.peak), "weights_gb": gb(self.weights),
            "activations_gb": gb(self.activations), "budget_gb": gb(self.budget), "max_batch": self.max_batch,
            "parts": [{"name": p.part.name, "model": p.part.model_id, "role": p.part.role, "where": p.where,
                       "dtype": NAMES.get(p.dtype, p.dtype), "quantize": p.quantize, "gb": gb(p.bytes),
                       "params": p.part.params, "sized_from": p.part.source} for p in self.parts],
            "notes": list(self.notes), **({"refusal": self.refusal} if self.refusal else {}),
        }

    def lines(self) -> list[str]:
        """The plan as text (`--debug`, `portrait plan`)."""
        quant = ", ".join(f"{k} {v}" for k, v in self.quantize.items()) or "none"
        head = (f"memory plan: {self.backend} on {self.family} {self.width}x{self.height} batch {self.batch}, "
                f"{self.card or self.device}: {self.strategy}, {NAMES.get(self.dtype, self.dtype)}, quantize {quant}; "
                f"predicted peak {gb(self.peak):.2f} GB of {gb(self.budget):.2f} GB usable "
                f"(weights {gb(self.weights):.2f} GB, activations {gb(self.activations):.2f} GB)")
        rows = [head]
        for p in self.parts:
            q = f" {p.quantize}" if p.quantize else ""
            rows.append(f"  {p.part.name:<34} {p.part.role:<8} {p.where:<7} {NAMES.get(p.dtype, p.dtype)}{q:<6} "
                        f"{gb(p.bytes):7.2f} GB  ({p.part.params / 1e6:,.0f}M params, from {p.part.source})")
        rows += [f"  note: {n}" for n in self.notes]
        if self.refusal:
            rows.append(f"  refused: {self.refusal}")
        return rows


def gb(value: float) -> float:
    return round(value / GIB, 2) if math.isfinite(value) else float("inf")


@dataclass(frozen=True)
class Request:
    """What the plan is for (no GenerationRequest: `portrait plan` has no identity)."""

    family: str
    backend: str
    width: int
    height: int
    batch: int = 1
    cfg: bool = True
    precision: str = "auto"  # the preset's runtime.precision
    quantize: str = "none"  # the preset's runtime.quantize (applied before any strategy)
    force: str = "auto"  # generate.memory.offload: auto | resident | model | group | sequential
    denoiser_params: int = 0  # for the activation scale (0: the family's reference)
    finish_activation: float = 0.0  # bytes of the finishing stage's own activations at 16-bit (upscaler tiles)


def finish_act(req: Request, dtype: str) -> float:
    """The finishing activations at the plan's dtype (recorded at 16-bit, as the denoiser's)."""
    return req.finish_activation * DTYPE_BYTES[dtype] / 2


def activation_bytes(req: Request, dtype: str, batch: int | None = None) -> float:
    runtime = family_runtime(req.family)
    pixels = req.width * req.height / runtime.native**2
    scale = 1.0
    if req.denoiser_params:
        scale = min(1.0, math.sqrt(req.denoiser_params / runtime.reference_params))
    per = DTYPE_BYTES[dtype] / 2  # the published figures are 16-bit
    return runtime.activation_gb * GIB * pixels * (batch or req.batch) * scale * per


# Finishing's activations (estimates from the networks' shapes, not measured on a GPU; gpu_check
# measures the real peak against the plan). Real-ESRGAN's RRDBNet keeps 64-channel feature maps;
# its head upsamples them twice by 2, so the largest live set is ~3 maps of 64 channels at the
# output size of the tile (or of the whole image when tiling is off). GFPGAN (spandrel runs it
# in fp32) on its 512 px face crop and CLIP on 224 px take a few hundred MB at most: a fixed allowance.
UPSCALER_CHANNELS = 64
UPSCALER_LIVE_MAPS = 3
RESTORER_ALLOWANCE_GB = 0.25
CLIP_ALLOWANCE_GB = 0.05


def finish_activation_bytes(width: int, height: int, *, upscale_scale: int = 0, tile: int = 0, overlap: int = 0,
                            restore: bool = False, clip: bool = False) -> float:
    """The finishing stage's own activation peak (16-bit) for one image of `width` x `height`
    (the stages run one after another, so the largest counts; the restorer's fp32 is in its allowance)."""
    peaks = [0.0]
    if upscale_scale:
        area = (tile + 2 * overlap) ** 2 if tile else width * height
        peaks.append(UPSCALER_LIVE_MAPS * UPSCALER_CHANNELS * area * upscale_scale**2 * 2)
    if restore:
        peaks.append(RESTORER_ALLOWANCE_GB * GIB)
    if clip:
        peaks.append(CLIP_ALLOWANCE_GB * GIB)
    return max(peaks)


def choose_dtype(family: str, precision: str, budget: Budget) -> tuple[str, list[str]]:
    """The compute dtype on CUDA, and notes. bf16 is never turned into fp16 for a family that
    does not run in fp16: it is planned in fp32 instead (the plan refuses when that does not fit).
    An explicit fp16 for such a family is refused outright."""
    runtime = family_runtime(family)
    want = {"auto": runtime.precisions[0], "float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(precision,
                                                                                                         precision)
    if want not in ("fp16", "bf16", "fp32"):
        raise BadInput(f"runtime.precision '{precision}': use auto, fp16, bf16 or fp32")
    notes: list[str] = []
    if want == "fp16" and "fp16" not in runtime.precisions:
        raise BadInput(f"runtime.precision fp16: the {family} family runs in bf16 or fp32 only (its activations "
                       f"overflow fp16 and the images come out black)")
    if want == "bf16" and not budget.bf16:
        if "fp16" in runtime.precisions:
            want = "fp16"
            notes.append(f"{budget.name or budget.device} has no bf16: fp16 (the {family} family runs in fp16)")
        else:
            want = "fp32"
            notes.append(f"{budget.name or budget.device} has no bf16 and {family} must not run in fp16 "
                         f"(black images): planned in fp32")
    return {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[want], notes


def _place(parts: Sequence[Part], strategy: str, dtype: str, quant: Mapping[str, str]) -> tuple[Placed, ...]:
    out = []
    for part in parts:
        q = quant.get(part.name)
        size = part.weight_bytes(dtype, q)
        on_device = strategy == "resident" or part.role in ALWAYS
        out.append(Placed(part, "cuda" if on_device else "offload", part.keep_dtype or dtype, q, size))
    return tuple(out)


def _stream_bytes(part: Part, dtype: str, quant: str | None, fraction: float, strategy: str) -> float:
    """Device bytes of a part while it runs under group / sequential offload."""
    whole = part.weight_bytes(dtype, quant)
    if strategy == "group_offload":
        # the running group and the next one being prefetched on the side stream
        return 2 * whole * fraction
    per = DTYPE_BYTES[part.keep_dtype or dtype]
    return 2 * part.largest_tensor * per if part.largest_tensor else whole * 0.02


def peak_bytes(parts: Sequence[Part], strategy: str, dtype: str, quant: Mapping[str, str], act: float,
               family: str, finish_bytes: float = 0.0) -> float:
    """The predicted device peak of one strategy: the largest stage (text, denoise, decode, finish).
    Finishing runs after the pipeline call, when an offloading strategy has moved the pipeline's
    models back to the CPU (diffusers' hooks free them at the end of the call); resident, they stay."""
    frac = family_runtime(family).block_fraction
    w = {p.name: p.weight_bytes(dtype, quant.get(p.name)) for p in parts}
    always = sum(w[p.name] for p in parts if p.role in ALWAYS)
    by_role: dict[str, list[Part]] = {}
    for p in parts:
        by_role.setdefault(p.role, []).append(p)
    text, den, side, adapter, vae = (by_role.get(r, []) for r in ("text", "denoiser", "side", "adapter", "vae"))
    if strategy in ("resident", "cpu"):
        return sum(w.values()) + max(act, finish_bytes)
    if strategy == "model_offload":
        # diffusers' chain moves one model in at a time (text encoders, then the denoiser, then
        # the VAE); ControlNets are hooked outside the chain and stay once called, so they sit
        # beside the denoiser and the VAE. Adapters are part of the denoiser module.
        text_stage = max((w[p.name] for p in text), default=0.0)
        den_stage = sum(w[p.name] for p in den + adapter + side) + act
        vae_stage = sum(w[p.name] for p in vae + side) + act * 0.5
        finish_stage = sum(w[p.name] for p in side) + finish_bytes  # the ControlNets are still there
        return always + max(text_stage, den_stage, vae_stage, finish_stage)
    stream = {p.name: _stream_bytes(p, dtype, quant.get(p.name),
                                    0.35 if p.role in ("side", "vae") and frac > 0.1 else
                                    (frac if p.role in ("denoiser", "side") else 0.1), strategy) for p in parts}
    text_stage = max((stream[p.name] for p in text), default=0.0)
    den_stage = sum(stream[p.name] for p in den + adapter + side) + act
    vae_stage = max((stream[p.name] for p in vae), default=0.0) + act * 0.5
    return always + max(text_stage, den_stage, vae_stage, finish_bytes)


def host_bytes(parts: Sequence[Part], strategy: str, dtype: str, quant: Mapping[str, str]) -> float:
    """Host RAM the offloaded weights take (pinned copies for the side stream double nothing:
    diffusers pins in place)."""
    if strategy in ("resident", "cpu"):
        return 0.0
    return sum(p.weight_bytes(dtype, quant.get(p.name)) for p in parts if p.role not in ALWAYS)


def _strategies(force: str) -> tuple[str, ...]:
    return {"auto": STRATEGIES, "resident": ("resident",), "model": ("model_offload",),
            "group": ("group_offload",), "sequential": ("sequential_offload",)}[force]


def _quant_steps(parts: Sequence[Part], family: str, base: Mapping[str, str]) -> list[dict[str, str]]:
    """The quantization settings to try after the plain ones: the largest quantizable part first,
    then the next largest too, per scheme the family takes (mildest first)."""
    runtime = family_runtime(family)
    order = sorted((p for p in parts if p.quantizable and p.name not in base), key=lambda p: -p.params)
    steps = []
    for scheme in runtime.quantize:
        chosen = dict(base)
        for p in order:
            chosen[p.name] = scheme
            steps.append(dict(chosen))
    return steps


def make_plan(parts: Sequence[Part], req: Request, budget: Budget) -> MemoryPlan:
    """Choose the placement of `parts` for `req` on `budget` (see the module docstring)."""
    parts = tuple(parts)
    if not budget.device.startswith("cuda"):
        dtype = "float32"
        act = activation_bytes(req, dtype)
        placed = tuple(Placed(p, "cpu", p.keep_dtype or dtype, None, p.weight_bytes(dtype)) for p in parts)
        total = sum(p.bytes for p in placed)
        # A forced offload runs its hooks on the CPU too (nothing moves; `gpu_check --dry-run`
        # exercises the offload code paths this way).
        forced = {"model": "model_offload", "group": "group_offload", "sequential": "sequential_offload"}.get(req.force)
        quant = {p.name: req.quantize for p in parts if p.quantizable} if req.quantize not in ("none", "", None) else {}
        return MemoryPlan(req.family, req.backend, req.width, req.height, req.batch, budget.device, dtype,
                          forced or "cpu", quant, placed, total + max(act, finish_act(req, dtype)), total, act,
                          budget.host_ram, True,
                          max_batch=req.batch, card=budget.name)
    dtype, notes = choose_dtype(req.family, req.precision, budget)
    base_quant: dict[str, str] = {}
    if req.quantize not in ("none", "", None):
        if req.quantize not in family_runtime(req.family).quantize:
            raise BadInput(f"runtime.quantize {req.quantize}: the {req.family} family takes "
                           f"{', '.join(family_runtime(req.family).quantize) or 'no quantization'}")
        base_quant = {p.name: req.quantize for p in parts if p.quantizable}
    act = activation_bytes(req, dtype)
    usable = budget.usable
    tries = [base_quant] + _quant_steps(parts, req.family, base_quant)
    for quant in tries:
        for strategy in _strategies(req.force):
            peak = peak_bytes(parts, strategy, dtype, quant, act, req.family, finish_act(req, dtype))
            if peak <= usable and host_bytes(parts, strategy, dtype, quant) <= budget.host_ram * 0.9:
                placed = _place(parts, strategy, dtype, quant)
                weights = sum(p.bytes for p in placed)
                batch = _max_batch(parts, req, strategy, dtype, quant, usable)
                return MemoryPlan(req.family, req.backend, req.width, req.height, req.batch, budget.device, dtype,
                                  strategy, quant, placed, peak, weights, act, usable, True, batch, tuple(notes),
                                  card=budget.name)
    # nothing fits: the smallest card that would take it, with this host's RAM
    smallest = smallest_card(parts, req, dtype, tries, budget.host_ram)
    least = min((peak_bytes(parts, s, dtype, q, act, req.family, finish_act(req, dtype))
                 for q in tries for s in _strategies(req.force)))
    where = f"the smallest card it fits is {smallest} GB" if smallest else \
        "it fits no single card with this host's RAM (more RAM lets offload work)"
    refusal = (f"backend {req.backend} on {req.family} at {req.width}x{req.height} needs at least "
               f"{gb(least):.1f} GB of GPU memory in {NAMES[dtype]} ({budget.name or budget.device} has "
               f"{gb(usable):.1f} GB usable): {where}, or use --device cpu")
    placed = _place(parts, "sequential_offload", dtype, tries[-1])
    return MemoryPlan(req.family, req.backend, req.width, req.height, req.batch, budget.device, dtype, "refused",
                      tries[-1], placed, least, sum(p.bytes for p in placed), act, usable, False, 0, tuple(notes),
                      refusal, card=budget.name)


def _max_batch(parts, req: Request, strategy: str, dtype: str, quant, usable: float, limit: int = 8) -> int:
    best = 1
    for batch in range(1, limit + 1):
        act = activation_bytes(req, dtype, batch)
        if peak_bytes(parts, strategy, dtype, quant, act, req.family, finish_act(req, dtype)) <= usable:
            best = batch
        else:
            break
    return best


def smallest_card(parts, req: Request, dtype: str, tries, host_ram: float) -> int | None:
    for card in REFUSAL_CARDS_GB:
        usable = Budget.card(card).usable
        for quant in tries:
            for strategy in _strategies(req.force):
                act = activation_bytes(req, dtype)
                if peak_bytes(parts, strategy, dtype, quant, act, req.family, finish_act(req, dtype)) <= usable and \
                        host_bytes(parts, strategy, dtype, quant) <= host_ram * 0.9:
                    return card
    return None


# --- sizing: headers, configs, registry sizes ----------------------------------------------------


@dataclass(frozen=True)
class Count:
    params: int
    largest: int
    dtype: str  # the stored dtype of most weights ("bf16", "fp16", "fp32")
    source: str

    def __add__(self, other: "Count") -> "Count":
        return Count(self.params + other.params, max(self.largest, other.largest),
                     self.dtype if self.params >= other.params else other.dtype, self.source)


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's header (8-byte little-endian length + JSON); the tensors are not read."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise BadInput(f"{path}: not a safetensors file (shorter than its header)")
        (length,) = struct.unpack("<Q", head)
        if length > 100_000_000:
            raise BadInput(f"{path}: not a safetensors file (header of {length} bytes)")
        return json.loads(fh.read(length))


def header_counts(path: Path, prefixes: Mapping[str, Sequence[str]] | None = None) -> dict[str, Count]:
    """Parameters per group of a safetensors file, from its header. `prefixes` maps a group name
    to key prefixes (a single-file checkpoint split into unet / vae / text encoders); without it
    the whole file is one group named ""."""
    header = safetensors_header(path)
    totals: dict[str, list[int]] = {}
    dtypes: dict[str, dict[str, int]] = {}
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict):
            continue
        group = ""
        if prefixes:
            group = next((g for g, pre in prefixes.items() if key.startswith(tuple(pre))), "")
            if not group:
                continue
        numel = math.prod(info.get("shape") or [1])
        row = totals.setdefault(group, [0, 0])
        row[0] += numel
        row[1] = max(row[1], numel)
        d = dtypes.setdefault(group, {})
        d[info.get("dtype", "F32")] = d.get(info.get("dtype", "F32"), 0) + numel
    out = {}
    for group, (params, largest) in totals.items():
        stored = max(dtypes[group].items(), key=lambda kv: kv[1])[0]
        out[group] = Count(params, largest, {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}.get(stored, "fp32"), "header")
    return out


def pickle_count(path: Path) -> Count:
    """Parameters of a weights-only torch pickle, memory-mapped (the tensors are not read)."""
    import torch

    from .modelfiles import mapped_pickle

    try:
        state = mapped_pickle(path)
    except Exception:  # an old (non-zip) pickle cannot be mapped: size it by its bytes
        size = path.stat().st_size
        return Count(size // 2, 0, "fp16", "file-size")
    params, largest, dtypes = 0, 0, {}

    def walk(value):
        nonlocal params, largest
        if isinstance(value, torch.Tensor):
            params += value.numel()
            largest = max(largest, value.numel())
            dtypes[str(value.dtype)] = dtypes.get(str(value.dtype), 0) + value.numel()
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(state)
    stored = max(dtypes.items(), key=lambda kv: kv[1])[0] if dtypes else "torch.float32"
    return Count(params, largest, {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(stored, "fp32"), "header")


def file_count(path: Path) -> Count:
    if path.suffix == ".safetensors":
        return header_counts(path).get("", Count(0, 0, "fp32", "header"))
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return pickle_count(path)
    size = path.stat().st_size  # ONNX and other formats: their bytes (fp32 weights)
    return Count(size // 4, 0, "fp32", "file-size")


def folder_count(folder: Path) -> Count | None:
    """A diffusers / transformers part folder: its weight files (the fp16 variant only when it is
    the only one, as the loaders choose), counted from their headers."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    plain = [p for p in files if ".fp16." not in p.name]
    chosen = [p for p in (plain or files) if p.suffix == ".safetensors"] or (plain or files)
    if not chosen:
        return None
    total = None
    for path in chosen:
        c = file_count(path)
        total = c if total is None else total + c
    return total


@functools.lru_cache(maxsize=64)
def config_count(config_path: str) -> Count | None:
    """Parameters of a part from its config.json, built on the meta device (no memory, no init)."""
    path = Path(config_path)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    cls = _config_class(config)
    if cls is None:
        return None
    import warnings

    import torch

    # torch's meta device: no memory and no initialisation (accelerate's init_empty_weights
    # counted T5's tied embedding twice)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        if hasattr(cls, "from_config") and "_class_name" in config:
            model = cls.from_config(config)
        else:
            import transformers

            if "model_type" not in config:
                return None
            conf = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
            model = cls(conf)
    params = [p.numel() for p in model.parameters()]
    return Count(sum(params), max(params, default=0), "", "config")


def _config_class(config: Mapping[str, Any]):
    name = config.get("_class_name") or (config.get("architectures") or [None])[0]
    if not name:
        return None
    import diffusers
    import transformers

    return getattr(diffusers, name, None) or getattr(transformers, name, None)


def registry_count(files: Mapping[str, int], dtype: str) -> Count:
    """Parameters from recorded file sizes and the stored dtype (a file's few header bytes are noise)."""
    total = 0
    for name, size in files.items():
        stored = "fp16" if ".fp16." in name else dtype
        total += int(size) // DTYPE_BYTES[stored or "fp32"]
    return Count(total, 0, dtype, "registry")


# --- the budget from a placement request ---------------------------------------------------------


def plan_for_cards(parts: Sequence[Part], req: Request, cards: Iterable[float] = CARDS_GB, *, bf16: bool = True,
                   host_ram_gb: float | None = None) -> list[MemoryPlan]:
    """One plan per card size (`portrait plan`)."""
    return [make_plan(parts, req, Budget.card(c, bf16=bf16, host_ram_gb=host_ram_gb)) for c in cards]


__all__ = ["Budget", "CARDS_GB", "Count", "FamilyRuntime", "MemoryPlan", "Part", "Placed", "Request", "STRATEGIES",
           "activation_bytes", "bf16_only", "choose_dtype", "config_count", "device_budget", "family_runtime",
           "file_count", "folder_count", "header_counts", "make_plan", "peak_bytes", "plan_for_cards",
           "register_family", "registry_count", "safetensors_header"]
