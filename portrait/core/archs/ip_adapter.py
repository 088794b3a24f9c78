"""IP-Adapter-style checkpoints (IP-Adapter, -Plus, FaceID, FaceID-Plus(V2), InstantID's
ip-adapter.bin): what a checkpoint is, told from its state-dict keys.

The projections themselves are diffusers' (`load_ip_adapter` builds ImageProjection,
IPAdapterFaceIDImageProjection, IPAdapterFaceIDPlusImageProjection or the Plus Resampler from
the same keys, the documented way), so this module holds the detection (and the "ip-adapter" kind that reads such a file) only: which kind a
file is, and the width of the face embedding its projection takes. No pipeline knowledge; the
backends (stages/backends/faceid.py, instantid.py, and the template backend through
stages/zeroshot.py) check a file against what they need with it.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from ..errors import bad_file
from ..modelfiles import Kind, Source, Weights, nested, read_weights, weights_name

IP_ADAPTER_KEYS = ("image_proj", "ip_adapter")  # the two parts of every IP-Adapter-style checkpoint


def detect(keys: Iterable[str]) -> bool:
    """An IP-Adapter-style checkpoint: both parts, nested or in the flat `image_proj.*` form."""
    heads = {k.partition(".")[0] for k in keys}
    return set(IP_ADAPTER_KEYS) <= heads


def adapter_kind(state: Mapping) -> str:
    """faceid | faceid-plus | instantid | ip-adapter-plus | ip-adapter, from the image_proj keys
    (as diffusers' loader tells them apart; InstantID's Resampler has 16 queries over 512-d
    antelopev2 embeddings)."""
    proj = state["image_proj"]
    if "perceiver_resampler.proj_in.weight" in proj:
        return "faceid-plus"
    if "norm.weight" in proj and "proj.0.weight" in proj:
        return "faceid"
    if "latents" in proj:
        return "instantid" if proj["latents"].shape[1] == 16 and proj["proj_in.weight"].shape[1] == 512 \
            else "ip-adapter-plus"
    return "ip-adapter"


def id_input_dim(state: Mapping) -> int:
    """The width of the face embedding the projection takes (512 for buffalo_l / antelopev2)."""
    proj = state["image_proj"]
    weight = proj.get("proj.0.weight", proj.get("proj_in.weight"))
    return int(weight.shape[1])


def _ip_adapter(source: Source) -> Weights:
    """An IP-Adapter-style checkpoint {image_proj, ip_adapter} (FaceID, FaceID-Plus(V2),
    InstantID's ip-adapter.bin), .bin or .safetensors; kept on the CPU for `load_ip_adapter`."""
    name = weights_name(source, (".bin", ".safetensors"))
    state = nested(read_weights(source.ctx, source.resolved, name), ("image_proj", "ip_adapter"))
    path = source.resolved.file(name) if name else source.resolved.path
    if not isinstance(state, dict) or not {"image_proj", "ip_adapter"} <= set(state):
        raise bad_file(path, "not an IP-Adapter checkpoint (needs image_proj and ip_adapter)")
    return Weights(source.model_id, path, state)


IP_ADAPTER = Kind("ip-adapter", _ip_adapter, detect=detect)
