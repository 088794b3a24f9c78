"""Output metadata (docs/ARCHITECTURE.md#a1111-metadata): the two PNG text chunks of every output image.

`parameters` is the A1111 text (prompt, `Negative prompt:` line, then `Key: value, ...`),
which A1111, ComfyUI and sd-parsers read back; `portrait` is our JSON (the resolved request,
what the backend did, timings, model and LoRA hashes).

The `parameters` chunk says only what ran: an image no sampler made (the template backend's
`passes: 0`, Candidate.info identity_mode "fusion-only") records the fusion, its source and its
target, and no prompt, steps, sampler, CFG, model, LoRA, ControlNet or denoising strength (the
request still asked for them; nothing used them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from portrait.core.backend import FUSION_ONLY
from portrait.core.loaders import sampler_label
from portrait.core.types import Candidate

VERSION = "portrait 0.1"


def _a1111_value(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if any(ch in text for ch in ",:\n") else text


def a1111_parameters(prompt: str, negative: str, params: Mapping[str, Any]) -> str:
    """The A1111 `parameters` text: prompt, optional negative line, then `Key: value, ...` last."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {_a1111_value(v)}" for k, v in params.items() if v is not None and v != ""))
    return "\n".join(lines)


@dataclass(frozen=True)
class LoraUse:
    """A LoRA that shaped an image, for the `<lora:NAME:W>` prompt tag and `Lora hashes`."""

    name: str
    weight: float
    hash12: str


def image_metadata(candidate: Candidate, *, model_name: str, model_hash10: str | None,
                   loras: Iterable[LoraUse] = (), extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The two PNG text chunks of one output: A1111 `parameters` and our `portrait` JSON."""
    r = candidate.request
    loras = list(loras)
    if candidate.info.get("identity_mode") == FUSION_ONLY:
        return _chunks(candidate, "", "", _fusion_parameters(candidate), model_name=None, model_hash10=None, loras=[],
                       extra=extra)
    sampler, schedule = sampler_label(r.scheduler)
    flux = r.scheduler == "flow_euler"
    prompt = r.prompt + "".join(f" <lora:{lora.name}:{lora.weight:g}>" for lora in loras)
    params: dict[str, Any] = {
        "Steps": r.steps,
        "Sampler": sampler,
        "Schedule type": schedule or None,
        # FLUX (flow_euler): guidance is distilled, written as Forge does ("Distilled CFG Scale").
        "CFG scale": f"{float(getattr(r.options, 'true_cfg', None) or 1.0):g}" if flux else f"{r.guidance:g}",
        "Distilled CFG Scale": f"{r.guidance:g}" if flux else None,
        "Seed": candidate.seed,
        "Size": f"{r.width}x{r.height}",
        "Model hash": model_hash10,
        "Model": model_name,
        "Lora hashes": ", ".join(f"{lora.name}: {lora.hash12}" for lora in loras) or None,
    }
    for name, strength in r.controls.items():
        params[f"ControlNet {name}"] = f"{strength:g}"
    if getattr(r.options, "denoise", None) is not None:  # img2img/inpainting backends declare it
        params["Denoising strength"] = f"{float(r.options.denoise):g}"
    params["Version"] = VERSION
    return _chunks(candidate, prompt, r.negative_prompt, params, model_name=model_name, model_hash10=model_hash10,
                   loras=loras, extra=extra)


def _fusion_parameters(candidate: Candidate) -> dict[str, Any]:
    """A fused image's A1111 keys: the fusion, whose face went in and where, seed and size."""
    r, fusion = candidate.request, candidate.info.get("fusion") or {}
    source = fusion.get("source") or [f"{r.identity.name}/{r.identity.reference.name}"]
    return {"Fusion": "reference face", "Fusion source": ", ".join(source) if isinstance(source, list) else source,
            "Fusion target": fusion.get("target") or r.template, "Seed": candidate.seed,
            "Size": f"{r.width}x{r.height}", "Version": VERSION}


def _chunks(candidate: Candidate, prompt: str, negative: str, params: Mapping[str, Any], *, model_name: str | None,
            model_hash10: str | None, loras: list[LoraUse], extra: Mapping[str, Any] | None) -> dict[str, str]:
    r = candidate.request
    resolved = {**r.record(), "seed": candidate.seed, "n": r.n}
    portrait = {"request": resolved, "info": dict(candidate.info), "timings": dict(candidate.timings),
                "model": {"name": model_name, "hash": model_hash10} if model_name else None,
                "loras": [{"name": lora.name, "weight": lora.weight, "hash": lora.hash12} for lora in loras],
                **(dict(extra) if extra else {})}
    return {"parameters": a1111_parameters(prompt, negative, params),
            "portrait": json.dumps(portrait, default=str, sort_keys=False)}
