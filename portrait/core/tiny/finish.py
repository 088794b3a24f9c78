"""make-tiny makers for the finishing stages: Real-ESRGAN x4/x2 and a CLIP for CLIP-T.

Each writes the real on-disk format at a tiny size, so spandrel and transformers load it
through the same code as the real weights:

- `tiny-esrgan-x4` / `tiny-esrgan-x2`: `RealESRGAN_x{4,2}plus.pth` = `{"params_ema": ...}`
  with the new-arch RRDBNet keys (`conv_first`, `body.N.rdbR.convC`, `conv_body`,
  `conv_up1/2`, `conv_hr`, `conv_last`); the x2 model takes pixel-unshuffled input (12
  channels), as the real x2plus does. The weights are a near-identity upscaler (centre taps
  carry RGB through, the RRDB body adds a small random residual), so tiny runs give
  recognisable pictures and tiling still has a receptive field to get wrong.
- `tiny-clip`: a transformers `CLIPModel` folder with the real 49,408-token CLIP tokenizer
  (built offline by tokenizer.py) and an image processor at 32 px.

- `tiny-face-parser`: a BiSeNet face parser (portrait.core.parsing) at 1/8 width.

Face restorers have no tiny stand-in: spandrel builds GFPGAN at its fixed full size
(~350 MB; CodeFormer, which spandrel's core cannot load, is not in the registry); restoration is optional and is skipped
with a stated reason under a tiny preset.
"""

from __future__ import annotations

import io
from pathlib import Path

TINY_FILTERS = 8
TINY_GROWTH = 32  # spandrel fixes the RRDB growth channels at 32; only nf and nb are free
TINY_BLOCKS = 1
BODY_NOISE = 0.01


def _rrdb_state(seed: int, in_channels: int, passthrough: list[list[int]]) -> dict:
    """A near-identity RRDBNet: feature channel i carries the mean of input channels passthrough[i]."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    nf, gc = TINY_FILTERS, TINY_GROWTH

    def noise(*shape):
        return torch.randn(*shape, generator=gen) * BODY_NOISE

    def carry(out_ch: int, in_ch: int, sources) -> torch.Tensor:
        weight = noise(out_ch, in_ch, 3, 3) * 0.1
        for out_index, in_indices in enumerate(sources):
            for in_index in in_indices:
                weight[out_index, in_index, 1, 1] = 1.0 / len(in_indices)
        return weight

    state = {"conv_first.weight": carry(nf, in_channels, passthrough), "conv_first.bias": torch.zeros(nf)}
    for block in range(TINY_BLOCKS):
        for rdb in (1, 2, 3):
            for conv in range(1, 6):
                out_ch = nf if conv == 5 else gc
                key = f"body.{block}.rdb{rdb}.conv{conv}"
                state[f"{key}.weight"] = noise(out_ch, nf + (conv - 1) * gc, 3, 3)
                state[f"{key}.bias"] = torch.zeros(out_ch)
    state["conv_body.weight"] = noise(nf, nf, 3, 3)
    state["conv_body.bias"] = torch.zeros(nf)
    same = [[0], [1], [2]]
    for name in ("conv_up1", "conv_up2", "conv_hr"):
        state[f"{name}.weight"] = carry(nf, nf, same)
        state[f"{name}.bias"] = torch.zeros(nf)
    state["conv_last.weight"] = carry(3, nf, same)
    state["conv_last.bias"] = torch.zeros(3)
    return state


def _save_pth(state: dict, path: Path) -> None:
    _save_state({"params_ema": state}, path)


def _save_state(state: dict, path: Path) -> None:
    import torch

    # through a buffer: torch.save names the zip's inner folder after the file
    buffer = io.BytesIO()
    torch.save({k: (v.contiguous() if hasattr(v, "contiguous") else v) for k, v in state.items()}, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())


def write_esrgan_x4(root: Path, seed: int) -> None:
    _save_pth(_rrdb_state(seed, 3, [[0], [1], [2]]), Path(root) / "RealESRGAN_x4plus.pth")


def write_esrgan_x2(root: Path, seed: int) -> None:
    # pixel_unshuffle(2) puts colour c's four sub-pixels in channels 4c..4c+3; average them
    _save_pth(_rrdb_state(seed, 12, [[4 * c + k for k in range(4)] for c in range(3)]), Path(root) / "RealESRGAN_x2plus.pth")


TINY_CLIP_SIZE = 32


def write_clip(root: Path, seed: int) -> None:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from ..tokenizers import VOCAB_SIZE, write_clip_tokenizer

    root = Path(root)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 49406,
                     "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": TINY_CLIP_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    model.save_pretrained(root, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": TINY_CLIP_SIZE},
                       crop_size={"height": TINY_CLIP_SIZE, "width": TINY_CLIP_SIZE}).save_pretrained(root)
    write_clip_tokenizer(root)


def write_face_parser(root: Path, seed: int) -> None:
    """A BiSeNet with the real key names (`cp.resnet.*`, `cp.arm16.*`, `ffm.*`, `conv_out.*`) at 1/8 width."""
    import torch

    from ..archs.bisenet import bisenet

    torch.manual_seed(seed)
    network = bisenet(w=8, head=16, fused=32, mid=16)
    _save_state(network.state_dict(), Path(root) / "parsing_bisenet.pth")


def write_inswapper(root: Path, seed: int) -> None:
    """An inswapper-shaped ONNX (target [1,3,128,128] + source [1,512] -> [1,3,128,128]).

    insightface routes it to INSwapper by its shapes and reads the embedding map from the
    graph's last initializer, as with the real file. The tiny network dims the face and
    shifts it by the mean of the mapped source latent, so the source visibly matters.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    emap = (np.eye(512) + rng.normal(0, 0.01, (512, 512))).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["source", "emap"], ["mapped"]),  # used, so onnxruntime keeps it
        helper.make_node("ReduceMean", ["mapped", "axes"], ["latent_mean"], keepdims=1),
        helper.make_node("Reshape", ["latent_mean", "shape"], ["shift"]),
        helper.make_node("Mul", ["target", "half"], ["dimmed"]),
        helper.make_node("Mul", ["shift", "gain"], ["scaled_shift"]),
        helper.make_node("Add", ["dimmed", "scaled_shift"], ["shifted"]),
        helper.make_node("Add", ["shifted", "quarter"], ["output"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array([1, 1, 1, 1], np.int64), "shape"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        numpy_helper.from_array(np.array(20.0, np.float32), "gain"),
        numpy_helper.from_array(np.array(0.25, np.float32), "quarter"),
        numpy_helper.from_array(emap, "emap"),  # last, where INSwapper looks for it
    ]
    graph = helper.make_graph(
        nodes, "tiny-inswapper",
        [helper.make_tensor_value_info("target", TensorProto.FLOAT, [1, 3, 128, 128]),
         helper.make_tensor_value_info("source", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3, 128, 128])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="portrait-make-tiny")
    model.ir_version = 9
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "inswapper_128.onnx").write_bytes(model.SerializeToString())


def write_u2net(root: Path, seed: int) -> None:
    """A U^2-Net-shaped ONNX (rembg's u2net.onnx): input `input.1` [N,3,320,320] (ImageNet-
    normalised RGB) -> seven side outputs [N,1,320,320] of which the first is the mask.

    The tiny network is a 1x1 convolution + sigmoid that calls reddish pixels foreground, so a
    test can predict its mask: it proves the loading and whitening path, not segmentation.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = np.array([8.0, -4.0, -4.0], np.float32).reshape(1, 3, 1, 1)
    nodes = [helper.make_node("Conv", ["input.1", "w"], ["logit"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["logit"], ["d0"])]
    outputs = ["d0"] + [f"d{k}" for k in range(1, 7)]
    nodes += [helper.make_node("Identity", ["d0"], [name]) for name in outputs[1:]]
    graph = helper.make_graph(
        nodes, "tiny-u2net",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 320, 320])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 1, 320, 320]) for name in outputs],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="portrait-make-tiny")
    model.ir_version = 9
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "u2net.onnx").write_bytes(model.SerializeToString())
