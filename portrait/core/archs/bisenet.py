"""Face parsing (BiSeNet, CelebAMask-HQ's 19 labels): per-pixel skin, hair, eyes, lips. The network,
its detection by keys and its builder (kind "face-parser"); portrait/core/parsing.py loads it.

Landmark masks (portrait.core.facemask) cannot see hair over the forehead, glasses or a
hand over the cheek; a parsing network can. The registry's `face-parsing-bisenet` is the
checkpoint facexlib and EasyPhoto use (the same bytes as face-parsing.PyTorch's
`79999_iter.pth`): a ResNet-18 context path with attention refinement, a feature fusion
module and a 19-class head, run on a 512 px crop normalized with ImageNet statistics.

spandrel has no face-parsing architecture, so the network is written here, from the
published layout (key names `cp.resnet.*`, `cp.arm16/arm32.*`, `cp.conv_head16/32`,
`cp.conv_avg`, `ffm.convblk/conv1/conv2`, `conv_out.*`; the auxiliary `conv_out16/32`
training heads are ignored). Widths are read from the checkpoint, so the make-tiny
stand-in loads through the same code at a fraction of the size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import bad_file
from ..modelfiles import Kind, Source
from ..types import FaceObservation

LABELS = ("background", "skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r",
          "nose", "mouth", "u_lip", "l_lip", "neck", "neck_l", "cloth", "hair", "hat")
LABEL = {name: index for index, name in enumerate(LABELS)}
INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_SCALE = 2.0  # the crop is this many face-box sides wide, so the whole head is seen


def bisenet(w: int = 64, head: int = 128, fused: int = 256, mid: int = 256, classes: int = len(LABELS)):
    """The BiSeNet module; the defaults are the real checkpoint's sizes."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    class ConvBNReLU(nn.Module):
        def __init__(self, cin: int, cout: int, k: int):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, k, 1, k // 2, bias=False)
            self.bn = nn.BatchNorm2d(cout)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    conv_bn_relu = ConvBNReLU

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None
            if cin != cout or stride != 1:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
            return F.relu(y + (self.downsample(x) if self.downsample is not None else x))

    class Backbone(nn.Module):  # ResNet-18 without its classifier
        def __init__(self, w: int):
            super().__init__()
            self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
            widths = (w, w, 2 * w, 4 * w, 8 * w)
            for i in range(1, 5):
                stride = 1 if i == 1 else 2
                setattr(self, f"layer{i}", nn.Sequential(Basic(widths[i - 1], widths[i], stride),
                                                         Basic(widths[i], widths[i], 1)))

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
            f8 = self.layer2(self.layer1(x))
            f16 = self.layer3(f8)
            return f8, f16, self.layer4(f16)

    class Refine(nn.Module):  # attention refinement: features x channel attention
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.conv = conv_bn_relu(cin, cout, 3)
            self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
            self.bn_atten = nn.BatchNorm2d(cout)

        def forward(self, x):
            feat = self.conv(x)
            return feat * torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean((2, 3), keepdim=True))))

    class Context(nn.Module):
        def __init__(self, w: int, head: int):
            super().__init__()
            self.resnet = Backbone(w)
            self.arm16 = Refine(4 * w, head)
            self.arm32 = Refine(8 * w, head)
            self.conv_head32 = conv_bn_relu(head, head, 3)
            self.conv_head16 = conv_bn_relu(head, head, 3)
            self.conv_avg = conv_bn_relu(8 * w, head, 1)

        def forward(self, x):
            f8, f16, f32 = self.resnet(x)
            glob = self.conv_avg(f32.mean((2, 3), keepdim=True))
            up32 = self.conv_head32(F.interpolate(self.arm32(f32) + glob, size=f16.shape[2:], mode="nearest"))
            up16 = self.conv_head16(F.interpolate(self.arm16(f16) + up32, size=f8.shape[2:], mode="nearest"))
            return f8, up16

    class Fusion(nn.Module):
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.convblk = conv_bn_relu(cin, cout, 1)
            self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
            self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

        def forward(self, a, b):
            feat = self.convblk(torch.cat([a, b], 1))
            attention = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean((2, 3), keepdim=True)))))
            return feat + feat * attention

    class Head(nn.Module):
        def __init__(self, cin: int, mid: int, classes: int):
            super().__init__()
            self.conv = conv_bn_relu(cin, mid, 3)
            self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

        def forward(self, x):
            return self.conv_out(self.conv(x))

    class BiSeNet(nn.Module):
        def __init__(self, w: int, head: int, fused: int, mid: int, classes: int):
            super().__init__()
            self.cp = Context(w, head)
            self.ffm = Fusion(2 * w + head, fused)
            self.conv_out = Head(fused, mid, classes)

        def forward(self, x):
            logits = self.conv_out(self.ffm(*self.cp(x)))
            return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)

    return BiSeNet(w, head, fused, mid, classes)


SIZING_KEYS = ("cp.resnet.conv1.weight", "cp.arm16.conv.conv.weight", "ffm.convblk.conv.weight",
               "conv_out.conv.conv.weight", "conv_out.conv_out.weight")


def detect(keys) -> bool:
    """A BiSeNet face-parsing state dict: the context path, fusion module and head it is sized from."""
    return set(SIZING_KEYS) <= set(keys)


def bisenet_from_state(state: dict):
    """The BiSeNet module sized from a checkpoint's shapes."""
    try:
        return bisenet(w=state["cp.resnet.conv1.weight"].shape[0], head=state["cp.arm16.conv.conv.weight"].shape[0],
                       fused=state["ffm.convblk.conv.weight"].shape[0], mid=state["conv_out.conv.conv.weight"].shape[0],
                       classes=state["conv_out.conv_out.weight"].shape[0])
    except KeyError as exc:
        raise ValueError(f"not a BiSeNet face-parsing checkpoint (no {exc.args[0]})") from None


@dataclass
class FaceParser:
    """A loaded BiSeNet; `parse` returns a label map (uint8, LABELS indices) for an image."""

    network: object
    device: str

    def parse(self, image: np.ndarray, faces: Sequence[FaceObservation]) -> np.ndarray:
        """Labels over the whole image; each face is parsed in a head-sized crop, background elsewhere."""
        labels = np.zeros(image.shape[:2], np.uint8)
        for face in sorted(faces, key=lambda f: f.area):  # larger faces win overlaps
            y0, y1, x0, x1 = _crop_box(face, image.shape)
            crop = _run(self, image[y0:y1, x0:x1])
            region = labels[y0:y1, x0:x1]
            region[crop > 0] = crop[crop > 0]
        return labels

    def parse_crop(self, crop: np.ndarray) -> np.ndarray:
        """Labels of an image that already is a face crop (e.g. an aligned 512 face)."""
        return _run(self, crop)


def _crop_box(face: FaceObservation, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    h, w = shape[:2]
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    half = max(face.width, face.height) * CROP_SCALE / 2
    return (max(int(cy - half), 0), min(int(cy + half) + 1, h), max(int(cx - half), 0), min(int(cx + half) + 1, w))


def _run(parser: FaceParser, crop: np.ndarray) -> np.ndarray:
    import cv2
    import torch

    param = next(parser.network.parameters())
    resized = cv2.resize(crop, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    normalized = (resized - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    tensor = torch.from_numpy(normalized.transpose(2, 0, 1).copy())[None].to(param.device, param.dtype)
    with torch.inference_mode():
        labels = parser.network(tensor)[0].argmax(0).byte().cpu().numpy()
    return cv2.resize(labels, (crop.shape[1], crop.shape[0]), interpolation=cv2.INTER_NEAREST)


def build_face_parser(source: Source) -> FaceParser:
    """BiSeNet face parsing (CelebAMask-HQ labels): hash-checked, weights_only, strict keys; fp16 on CUDA."""
    state = source.weights()
    state = {k: v for k, v in state.items() if not k.startswith(("conv_out16.", "conv_out32."))}
    try:
        network = bisenet_from_state(state)
        network.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError) as exc:
        raise bad_file(source.path, f"cannot be loaded as a BiSeNet face parser ({str(exc).splitlines()[0]})") from None
    return FaceParser(source.place(network.eval()), source.device)


FACE_PARSER = Kind("face-parser", build_face_parser, detect=detect)
