"""The samplers a request may name, each with its diffusers class and A1111 labels.

A leaf module (it imports nothing of portrait's): the request declaration
(portrait/core/request.py) reads the names for its `scheduler` choices, and the loaders
(portrait/core/loaders.py `make_scheduler`, `sampler_label`) build and label them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping


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
