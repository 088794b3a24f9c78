"""Denoising steps as progress: a hook a flow sets and every pipeline call reports to.

Why a context variable and not an argument: the step loop is deep inside each backend (a
diffusers pipeline's `callback_on_step_end`, or our own loop for FLUX adapters), and a
backend's signature is the request and the context only. The generate flow sets the hook
around its candidates (`reporting_steps`); the pipelines report each finished step
(`report_step`, or the callback `step_callback` builds). Raising from the hook stops the
pipeline at that step: the service's workers cancel a running item this way, and the flow's
usual interrupt handling discards what it had staged.
"""

from __future__ import annotations

import contextlib
import inspect
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Mapping

StepHook = Callable[[int, int], None]  # (steps done, steps in this pipeline call)

_HOOK: ContextVar[StepHook | None] = ContextVar("portrait_step_hook", default=None)


@contextlib.contextmanager
def reporting_steps(hook: StepHook | None) -> Iterator[None]:
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


def report_step(done: int, total: int) -> None:
    hook = _HOOK.get()
    if hook is not None:
        hook(int(done), int(total))


def step_callback(pipe: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments that make a diffusers pipeline call report its steps: a
    `callback_on_step_end` (chained after one the caller passes), or nothing when no hook is
    set or the pipeline does not take one."""
    hook = _HOOK.get()
    if hook is None:
        return {}
    try:
        takes = "callback_on_step_end" in inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        takes = False
    if not takes:
        return {}
    total = int(args.get("num_inference_steps") or 0)
    strength = args.get("strength")
    if isinstance(strength, (int, float)) and 0 < strength < 1:  # img2img runs the last fraction of the steps
        total = max(1, int(total * strength))
    before = args.get("callback_on_step_end")

    def on_step_end(p: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        out = before(p, step, timestep, kwargs) if before is not None else kwargs
        hook(step + 1, max(total, step + 1))
        return out

    return {"callback_on_step_end": on_step_end}
