"""Kinds that read a file whatever network it holds: a state dict, an ONNX session, an ONNX file
routed by insightface's model zoo to its class by its shapes."""

from __future__ import annotations

from ..modelfiles import PICKLE_SUFFIXES, Kind, Source, insightface_model, onnx_session, read_weights, weights_name


def _weights(source: Source) -> dict:
    """A state dict from .safetensors or a weights-only pickle, hash-checked; kept on the CPU."""
    return read_weights(source.ctx, source.resolved, weights_name(source, (".safetensors", *PICKLE_SUFFIXES)))



def _onnx(source: Source):
    """An onnxruntime.InferenceSession on `onnx_providers(ctx)` (a CUDA provider asked for and not
    obtained is said in one line)."""
    return onnx_session(source.verified(), source.ctx)


def _insightface(source: Source, expect: str | None = None):
    """An ONNX file routed by insightface's model zoo (ArcFaceONNX, INSwapper, SCRFD, ...),
    prepared on `onnx_providers(ctx)`; `expect` names the class it must route to."""
    return insightface_model(source.verified(), source.ctx, expect)


WEIGHTS = Kind("weights", _weights)
ONNX = Kind("onnx", _onnx)
INSIGHTFACE = Kind("insightface", _insightface)
