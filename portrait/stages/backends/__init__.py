"""The backend table: every generation backend, one line each.

A backend is one module here that declares itself with `SPEC = BackendSpec(...)`
(portrait/core/backend.py); listing its SPEC below is the only other edit adding it takes.
Request resolution, dispatch, `portrait generate --help`, studio spec validation, the
service's backend list and option schema, the license preflight and the docs all read
BACKENDS. A backend never imports another backend or the generate stage. The modules import
light (torch, diffusers and the networks load inside `generate`), so reading the table costs
no model library.

Tests and plugins add a backend at run time with `register(spec)`.
"""

from __future__ import annotations

from portrait.core.backend import BackendSpec, BackendTable

from . import faceid, flux, infiniteyou, instantid, klein_ref, kontext, lora, photomaker, pulid, pulid_flux, qwen_edit, template, zimage

BACKENDS = BackendTable([
    lora.SPEC,
    template.SPEC,
    instantid.SPEC,
    faceid.SPEC,
    photomaker.SPEC,
    pulid.SPEC,
    flux.SPEC,
    infiniteyou.SPEC,
    pulid_flux.SPEC,
    klein_ref.SPEC,
    qwen_edit.SPEC,
    zimage.SPEC,
    kontext.SPEC,
])


def register(spec: BackendSpec, *, replace: bool = False) -> BackendSpec:
    """Add a backend to the table (a plugin's, or a test's toy backend)."""
    return BACKENDS.register(spec, replace=replace)


def unregister(name: str) -> None:
    BACKENDS.unregister(name)


__all__ = ["BACKENDS", "BackendSpec", "register", "unregister"]
