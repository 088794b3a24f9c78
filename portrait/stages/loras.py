"""LoRA stacking on a diffusers pipeline: identity + optional style + optional LCM-LoRA.

Three ways to combine the identity LoRA with a style LoRA, chosen per template:

- merge: both adapters active at once with their weights (diffusers `set_adapters`), what
  FaceChain does; its users report likeness drops as the style weight grows (#87);
- switch (LoRA Switch, Zhong et al. 2024): one adapter active per denoising step, taking
  turns, swapped by the pipeline's step-end callback;
- composite (LoRA Composite, same paper): every step runs the UNet once per adapter and
  averages their predictions. CFG is linear, so averaging each adapter's guided prediction
  equals guiding the averaged predictions; we average the raw UNet outputs.

LCM-LoRA (few-step mode) stays active under every mode. The pipeline may be shared
through the ModelCache, so adapters are loaded once under content-derived names and the
stack is switched off again when the call ends.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from portrait.core.errors import BadInput, bad_file
from portrait.core.formats.weights import check_complete
from portrait.core.request import FAST_MODES

MAX_LOADED_ADAPTERS = 6  # beyond this the oldest unused adapters are deleted (long batch runs)


@dataclass(frozen=True)
class AdapterUse:
    """One LoRA in the stack: its adapter name in the pipeline, file, weight and role."""

    adapter: str
    path: Path
    weight: float
    role: str  # identity | style | a fast mode (lcm)
    label: str  # the name shown in `<lora:NAME:W>` and `Lora hashes`

    def as_info(self) -> dict[str, Any]:
        return {"name": self.label, "path": str(self.path), "weight": self.weight, "role": self.role}


def adapter_name(role: str, label: str, path: Path) -> str:
    """A stable adapter name that changes when the file does (a re-trained identity reloads)."""
    stat = path.stat()
    tag = zlib.crc32(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()) & 0xFFFFFFFF
    slug = re.sub(r"[^A-Za-z0-9_]", "_", label)[:32]
    return f"{role}_{slug}_{tag:08x}"


def _loaded(pipe) -> set[str]:
    try:
        listed = pipe.get_list_adapters()
    except (AttributeError, ValueError):
        return set()
    return {name for names in listed.values() for name in names}


def attach(pipe, uses: Sequence[AdapterUse]) -> None:
    """Load each LoRA file into the pipeline once (a warm pipeline keeps them)."""
    loaded = _loaded(pipe)
    wanted = {u.adapter for u in uses}
    stale = sorted(loaded - wanted)
    if len(loaded | wanted) > MAX_LOADED_ADAPTERS and stale:
        pipe.delete_adapters(stale[: len(loaded | wanted) - MAX_LOADED_ADAPTERS])
    for use in uses:
        if use.adapter in loaded:
            continue
        if not use.path.is_file():
            raise bad_file(use.path, f"{use.role} LoRA file is missing")
        if use.path.suffix == ".safetensors":
            check_complete(use.path)  # a truncated file: one line naming it, not the loader's OSError
        try:
            with _quiet_diffusers():
                pipe.load_lora_weights(str(use.path), adapter_name=use.adapter)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise bad_file(use.path, f"not a LoRA for this base model ({exc.__class__.__name__}: "
                                     f"{str(exc).splitlines()[0][:160]})") from None
        except OSError as exc:
            if exc.errno is not None:  # the machine refused a read (EIO, EACCES): not the file's fault
                raise
            raise bad_file(use.path, f"{use.role} LoRA file cannot be loaded ({str(exc).splitlines()[0][:160]})") \
                from None


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """A UNet-only LoRA makes diffusers warn that the text encoder got no keys; that is expected."""
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before)


def _activate(pipe, uses: Sequence[AdapterUse]) -> None:
    if uses:
        pipe.enable_lora()
        pipe.set_adapters([u.adapter for u in uses], adapter_weights=[u.weight for u in uses])
    else:
        pipe.disable_lora()


@contextlib.contextmanager
def composed(pipe, uses: Sequence[AdapterUse], mode: str) -> Iterator[dict[str, Any]]:
    """Activate the stack for one pipeline call; yields extra pipeline kwargs (callbacks).

    On exit every LoRA is switched off, so the next user of a cached pipeline starts clean.
    """
    always = [u for u in uses if u.role in FAST_MODES]  # a fast mode's LoRA stays on at every step
    turns = [u for u in uses if u.role not in FAST_MODES]
    try:
        if mode == "merge" or len(turns) < 2:
            _activate(pipe, list(uses))
            yield {}
        elif mode == "switch":
            yield _switch(pipe, turns, always)
        elif mode == "composite":
            with _composite(pipe, turns, always):
                yield {}
        else:
            raise BadInput(f"composition '{mode}' is not one of merge, switch, composite")
    finally:
        if uses:
            pipe.disable_lora()


def _switch(pipe, turns: Sequence[AdapterUse], always: Sequence[AdapterUse]) -> dict[str, Any]:
    """LoRA Switch: adapter k is the only one (besides LCM) active at steps k, k+N, k+2N..."""
    _activate(pipe, [turns[0], *always])

    def on_step_end(p, step: int, timestep, callback_kwargs: dict) -> dict:
        _activate(p, [turns[(step + 1) % len(turns)], *always])
        return callback_kwargs

    return {"callback_on_step_end": on_step_end}


@contextlib.contextmanager
def _composite(pipe, turns: Sequence[AdapterUse], always: Sequence[AdapterUse]) -> Iterator[None]:
    """LoRA Composite: each UNet call becomes the mean of one call per adapter.

    diffusers has no hook that combines per-adapter predictions, and copying the whole
    denoising loop would fork the pipeline; so the UNet's forward is wrapped for the
    duration of one pipeline call and restored afterwards.
    """
    unet = pipe.unet
    original = unet.forward

    def forward(*args, **kwargs):
        outputs = []
        for use in turns:
            _activate(pipe, [use, *always])
            outputs.append(original(*args, **kwargs))
        if isinstance(outputs[0], tuple):
            return (sum(o[0] for o in outputs) / len(outputs),) + tuple(outputs[0][1:])
        first = outputs[0]
        first.sample = sum(o.sample for o in outputs) / len(outputs)
        return first

    unet.forward = forward
    try:
        yield
    finally:
        del unet.forward  # drop the instance attribute: the class method is back
        if unet.forward != original:
            unet.forward = original


# --- building the stack from a request -------------------------------------------------------


def identity_use(identity, family: str, weight: float) -> AdapterUse | None:
    lora = identity.lora_for(family)
    if lora is None:
        return None
    return AdapterUse(adapter_name("id", identity.name, lora.path), lora.path, weight, "identity", identity.name)


def style_use(ctx, spec: dict[str, Any] | None) -> AdapterUse | None:
    """A template's style LoRA: a registry id (tiny stand-in under a tiny preset) or a file path."""
    if not spec:
        return None
    model = str(spec["model"])
    path = Path(model).expanduser()
    if path.suffix == ".safetensors" or "/" in model:
        if not path.is_file():
            raise bad_file(path, "style LoRA file does not exist")
        label = path.stem
    else:
        path = ctx.resolve(model).path
        label = model
    return AdapterUse(adapter_name("style", label, path), path, float(spec.get("weight", 0.6)), "style", label)


def fast_use(ctx, resolved) -> AdapterUse | None:
    """The request's fast-mode LoRA (the preset role its backend declares for the mode, e.g. the
    LCM-LoRA; request.resolved.fast / fast_lora), or None when no fast mode was asked for."""
    if resolved.fast is None or resolved.fast_lora is None:
        return None
    found = ctx.resolve_role(resolved.fast_lora)
    label = ctx.preset.model(resolved.fast_lora)
    return AdapterUse(adapter_name(resolved.fast, label, found.path), found.path, 1.0, resolved.fast, label)
