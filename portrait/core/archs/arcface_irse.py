"""ArcFace IR-SE50: the face recognizer InfiniteYou conditions on (facexlib's `init_recognition_model('arcface')`).

InfiniteYou's projection was trained on this network's embeddings, not on insightface's
glintr100 or w600k_r50: the spaces differ, so feeding it another recognizer gives a stranger.
facexlib ships the weights as `recognition_arcface_ir_se50.pth` (a plain state dict, pickle)
for `Backbone(num_layers=50, drop_ratio=0.6, mode='ir_se')`, whose key layout is:

    input_layer.{0 conv 3->64, 1 BN, 2 PReLU}
    body.{i}.shortcut_layer.{0 conv 1x1, 1 BN}   (only where a unit changes width; else MaxPool(1, stride))
    body.{i}.res_layer.{0 BN, 1 conv 3x3, 2 PReLU, 3 conv 3x3 (stride), 4 BN, 5 SE (fc1, fc2 1x1 convs)}
    output_layer.{0 BN2d, 1 Dropout, 2 Flatten, 3 Linear(512*7*7 -> 512), 4 BN1d}

and the output is L2-normalised. 50 layers = units (3, 4, 14, 3) of widths (64, 128, 256, 512);
the first unit of each stage has stride 2, so a 112 px face ends 7x7.

Written here (pure torch) rather than depending on facexlib, whose package import pulls its
detection/alignment modules and filterpy/numba; widths, unit counts and the final map size are
read from the state dict, so the tiny stand-in uses the same keys at a few channels.
Strides are not stored in a checkpoint: as in facexlib's `get_block`, unit 0 and every unit
that changes width start a stage (stride 2), the rest keep stride 1.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import bad_file
from ..modelfiles import Kind, Source

# Keys every IR-SE checkpoint in facexlib's layout has; the SE module (res_layer.5.fc1) tells
# ir_se from plain ir, output_layer.3/4 (Linear + BN1d) tell it from insightface's iresnet.
REQUIRED_KEYS = (
    "input_layer.0.weight", "input_layer.1.running_mean", "input_layer.2.weight",
    "body.0.res_layer.0.weight", "body.0.res_layer.1.weight", "body.0.res_layer.2.weight",
    "body.0.res_layer.3.weight", "body.0.res_layer.4.weight", "body.0.res_layer.5.fc1.weight",
    "body.0.res_layer.5.fc2.weight", "output_layer.0.weight", "output_layer.3.weight",
    "output_layer.3.bias", "output_layer.4.running_var",
)
_UNIT = re.compile(r"^body\.(\d+)\.")


def detect(keys: Iterable[str]) -> bool:
    """True for a state dict in facexlib's ArcFace IR-SE layout (any depth)."""
    keys = set(keys)
    if not all(k in keys for k in REQUIRED_KEYS):
        return False
    units = {int(m.group(1)) for k in keys if (m := _UNIT.match(k))}
    # every unit is an SE unit (a plain `ir` checkpoint has no res_layer.5)
    return bool(units) and all(f"body.{i}.res_layer.5.fc1.weight" in keys for i in units)


class SEModule(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(w))))


class UnitIRSE(nn.Module):
    """facexlib's bottleneck_IR_SE: BN-conv-PReLU-conv(stride)-BN-SE plus a shortcut."""

    def __init__(self, in_channel: int, depth: int, stride: int):
        super().__init__()
        if in_channel == depth:
            self.shortcut_layer = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channel, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channel), nn.Conv2d(in_channel, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SEModule(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class ArcFaceIRSE(nn.Module):
    """IR-SE backbone -> L2-normalised embedding; input [B, 3, S, S] BGR in [-1, 1] (S = 112 for the release)."""

    def __init__(self, units: list[tuple[int, int, int]], stem: int = 64, embedding_dim: int = 512,
                 final_size: int = 7, drop_ratio: float = 0.6):
        super().__init__()
        last = units[-1][1]
        self.input_layer = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem))
        self.body = nn.Sequential(*(UnitIRSE(i, d, s) for i, d, s in units))
        self.output_layer = nn.Sequential(nn.BatchNorm2d(last), nn.Dropout(drop_ratio), nn.Flatten(),
                                          nn.Linear(last * final_size * final_size, embedding_dim),
                                          nn.BatchNorm1d(embedding_dim))
        self.input_size = final_size * 2 ** sum(1 for _, _, s in units if s == 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_layer(self.body(self.input_layer(x)))
        return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def layout(state: Mapping[str, torch.Tensor]) -> dict:
    """The architecture a state dict describes: (in, depth, stride) per unit, stem, embedding dim, final map size."""
    count = 1 + max(int(m.group(1)) for k in state if (m := _UNIT.match(k)))
    units = []
    for i in range(count):
        depth, in_channel = state[f"body.{i}.res_layer.1.weight"].shape[:2]
        stride = 2 if i == 0 or in_channel != depth else 1
        units.append((int(in_channel), int(depth), stride))
    linear = state["output_layer.3.weight"]
    area = linear.shape[1] / units[-1][1]
    final = int(round(math.sqrt(area)))
    if final * final * units[-1][1] != linear.shape[1]:
        raise ValueError(f"output_layer.3.weight {tuple(linear.shape)} does not match a square map of {units[-1][1]}")
    return {"units": units, "stem": int(state["input_layer.0.weight"].shape[0]),
            "embedding_dim": int(linear.shape[0]), "final_size": final}


def build(state: Mapping[str, torch.Tensor]) -> ArcFaceIRSE:
    """An eval-mode ArcFaceIRSE holding exactly `state` (strict: every key, no extra)."""
    if not detect(state.keys()):
        raise ValueError("not an ArcFace IR-SE state dict in facexlib's layout")
    model = ArcFaceIRSE(**layout(state))
    model.load_state_dict(dict(state), strict=True)
    return model.eval()


def facexlib_units(num_layers: int = 50) -> list[tuple[int, int, int]]:
    """facexlib's `get_blocks(num_layers)` as (in, depth, stride) units (IR-SE 50/100/152)."""
    counts = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}[num_layers]
    units, width = [], 64
    for n, depth in zip(counts, (64, 128, 256, 512)):
        units += [(width, depth, 2)] + [(depth, depth, 1)] * (n - 1)
        width = depth
    return units


def _arcface_irse50(source: Source):
    """facexlib's ArcFace IR-SE50 (`recognition_arcface_ir_se50.pth`), InfiniteYou's recognizer: L2-normalised 512-d."""
    state = source.weights()
    if not detect(state.keys()):
        raise bad_file(source.path, "is not facexlib's ArcFace IR-SE checkpoint (no input_layer / body.*.res_layer.5 "
                                    "SE / output_layer keys)")
    try:
        model = build(state)
    except (ValueError, RuntimeError) as exc:
        raise bad_file(source.path, f"cannot be loaded as ArcFace IR-SE ({str(exc).splitlines()[0]})") from None
    # fp32 on every device, as the reference runs it (a small net; fp16 would move the embedding)
    return source.place(model, cast=False)


ARCFACE_IRSE50 = Kind("arcface-irse50", _arcface_irse50, detect=detect)
