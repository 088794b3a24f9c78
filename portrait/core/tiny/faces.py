"""make-tiny makers for insightface-layout ONNX packs (tiny-antelopev2, tiny-buffalo_l).

Each pack is a folder of synthetic ONNX files built with onnx.helper whose shapes make
insightface's `model_zoo` router pick the same classes as for a real pack:

- detector: 9 outputs (scores, boxes, keypoints at strides 8/16/32, two anchors each)
  -> SCRFD with keypoints, like scrfd_10g_bnkps / det_10g;
- recognizer: a square 112 input and one 512-d output -> ArcFaceONNX, like glintr100 /
  w600k_r50;
- attributes: a 96 input and 3 outputs -> Attribute ("genderage").

The detector is built to be useful rather than random: it fires exactly once per image,
on the brightest 32x32 block (padding is black, so never there), with a 4-stride box and
keypoints laid out as the arcface template. So every photo has one "face" whose crop and
embedding are deterministic. The identities it finds are meaningless by design.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPSET = 13
EMBEDDING_DIM = 512
STRIDES = (8, 16, 32)
ANCHORS = 2
BOX_HALF_STRIDES = 2.0  # box = 4 strides wide around the anchor centre

# The arcface template (insightface order) relative to a 112 px face box centred at 56,56.
_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

PACK_FILES = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "genderage.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx", "genderage.onnx"),
}


def write_antelopev2(root: Path, seed: int) -> None:
    write_pack(root, seed, "antelopev2")


def write_buffalo_l(root: Path, seed: int) -> None:
    write_pack(root, seed, "buffalo_l")


def write_pack(root: Path, seed: int, pack: str) -> None:
    import onnx

    detector, recognizer, attributes = PACK_FILES[pack]
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, model in (
        (detector, detector_model(rng)),
        (recognizer, recognizer_model(rng)),
        (attributes, genderage_model(rng)),
    ):
        onnx.checker.check_model(model)
        onnx.save(model, str(root / name))


def _tensor(name: str, array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _model(graph, doc: str):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="portrait-make-tiny")
    model.doc_string = doc
    model.ir_version = 8
    return model


def detector_model(rng: np.random.Generator):
    """An SCRFD-shaped detector (9 outputs, non-batched, 2 anchors, keypoints)."""
    from onnx import TensorProto, helper

    nodes, inits = [], []
    mix = rng.dirichlet(np.ones(3)).astype(np.float32).reshape(1, 3, 1, 1)
    inits.append(_tensor("mix_w", mix))
    nodes.append(helper.make_node("Conv", ["input.1", "mix_w"], ["gray"], name="mix"))
    inits.append(_tensor("peak", np.array([0.99], np.float32)))
    inits.append(helper.make_tensor("zero_i", TensorProto.INT64, [], [0]))
    inits.append(helper.make_tensor("one_i", TensorProto.INT64, [], [1]))
    for name, shape in (("shape1", [-1, 1]), ("shape4", [-1, 4]), ("shape10", [-1, 10])):
        inits.append(helper.make_tensor(name, TensorProto.INT64, [2], shape))
    outputs = {"score": [], "bbox": [], "kps": []}
    kps_offsets = ((_TEMPLATE - 56.0) / 112.0 * 2 * BOX_HALF_STRIDES).reshape(-1)  # in stride units
    for stride in STRIDES:
        pooled = f"pool{stride}"
        nodes.append(helper.make_node("AveragePool", ["gray"], [pooled], kernel_shape=[stride, stride],
                                      strides=[stride, stride], name=f"pool_{stride}"))
        fires = stride == STRIDES[-1]
        heads = {
            # the coarsest level scores brightness; finer levels never fire
            "score": (np.full((ANCHORS, 1, 1, 1), 1.0 if fires else 0.0), np.full(ANCHORS, 0.0 if fires else -20.0), 1),
            "bbox": (np.zeros((ANCHORS * 4, 1, 1, 1)), np.full(ANCHORS * 4, BOX_HALF_STRIDES), 4),
            "kps": (np.zeros((ANCHORS * 10, 1, 1, 1)), np.tile(kps_offsets, ANCHORS), 10),
        }
        for head, (weight, bias, width) in heads.items():
            raw = f"{head}{stride}_raw"
            inits.append(_tensor(f"{head}{stride}_w", weight))
            inits.append(_tensor(f"{head}{stride}_b", bias))
            nodes.append(helper.make_node("Conv", [pooled, f"{head}{stride}_w", f"{head}{stride}_b"], [raw],
                                          name=f"{head}_conv_{stride}"))
            nhwc = f"{head}{stride}_nhwc"
            nodes.append(helper.make_node("Transpose", [raw], [nhwc], perm=[0, 2, 3, 1], name=f"{head}_t_{stride}"))
            flat = f"{head}{stride}_flat"
            nodes.append(helper.make_node("Reshape", [nhwc, f"shape{width}"], [flat], name=f"{head}_r_{stride}"))
            if head == "score":
                flat = _peak_score(nodes, flat, stride, fires)
            outputs[head].append((flat, width))
    graph_outputs = []
    for head in ("score", "bbox", "kps"):
        for name, width in outputs[head]:
            graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, width]))
    graph = helper.make_graph(
        nodes, "tiny_scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        graph_outputs, initializer=inits,
    )
    return _model(graph, "tiny SCRFD stand-in (portrait make-tiny): fires on the brightest block")


def _peak_score(nodes: list, flat: str, stride: int, fires: bool) -> str:
    """One-hot at the first maximum of the level (score 0.99), 0 elsewhere: one face per image."""
    from onnx import TensorProto, helper

    out = f"score_{stride}"
    if not fires:
        nodes.append(helper.make_node("Sigmoid", [flat], [out], name=f"score_sig_{stride}"))
        return out
    p = f"{flat}_"
    nodes += [
        helper.make_node("ArgMax", [flat], [p + "arg"], axis=0, keepdims=1, name=f"score_argmax_{stride}"),
        helper.make_node("Shape", [flat], [p + "shape"], name=f"score_shape_{stride}"),
        helper.make_node("Gather", [p + "shape", "zero_i"], [p + "n"], axis=0, name=f"score_n_{stride}"),
        helper.make_node("Range", ["zero_i", p + "n", "one_i"], [p + "range"], name=f"score_range_{stride}"),
        helper.make_node("Reshape", [p + "range", "shape1"], [p + "col"], name=f"score_col_{stride}"),
        helper.make_node("Equal", [p + "col", p + "arg"], [p + "hit"], name=f"score_eq_{stride}"),
        helper.make_node("Cast", [p + "hit"], [p + "hitf"], to=TensorProto.FLOAT, name=f"score_cast_{stride}"),
        helper.make_node("Mul", [p + "hitf", "peak"], [out], name=f"score_peak_{stride}"),
    ]
    return out


def recognizer_model(rng: np.random.Generator, size: int = 112, dim: int = EMBEDDING_DIM):
    """An ArcFace-shaped recognizer: [N,3,112,112] -> [N,512] (a strided conv and a linear layer)."""
    from onnx import TensorProto, helper

    channels, kernel = 8, 8
    cells = (size // kernel) ** 2 * channels
    conv_w = rng.normal(0, 1.0 / np.sqrt(3 * kernel * kernel), (channels, 3, kernel, kernel))
    fc_w = rng.normal(0, 1.0 / np.sqrt(cells), (cells, dim))
    nodes = [
        # node names avoid the Sub/Mul prefixes insightface reads as "mxnet model, no normalization"
        helper.make_node("Conv", ["input.1", "conv_w"], ["feat"], strides=[kernel, kernel], name="conv_0"),
        helper.make_node("Relu", ["feat"], ["act"], name="relu_0"),
        helper.make_node("Flatten", ["act"], ["flat"], axis=1, name="flatten_0"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["683"], name="fc_0"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_arcface",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, size, size])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", dim])],
        initializer=[_tensor("conv_w", conv_w), _tensor("fc_w", fc_w)],
    )
    return _model(graph, "tiny ArcFace stand-in (portrait make-tiny)")


def genderage_model(rng: np.random.Generator, size: int = 96):
    """A genderage-shaped attribute model: [N,3,96,96] -> [N,3] (female, male, age/100)."""
    from onnx import TensorProto, helper

    fc_w = rng.normal(0, 1.0, (3, 3))
    nodes = [
        helper.make_node("GlobalAveragePool", ["data"], ["pooled"], name="gap_0"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten_0"),
        helper.make_node("Gemm", ["flat", "fc_w"], ["logits"], name="fc_0"),
        helper.make_node("Sigmoid", ["logits"], ["fc1"], name="sigmoid_0"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_genderage",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["None", 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", 3])],
        initializer=[_tensor("fc_w", fc_w)],
    )
    return _model(graph, "tiny genderage stand-in (portrait make-tiny)")


def write_auraface(root: Path, seed: int) -> None:
    """tiny-auraface: AuraFace's one file, an ArcFace-shaped recognizer (fal ships glintr100.onnx).

    No detector or attribute model: the commercial stack detects and aligns with dlib.
    """
    import onnx

    root.mkdir(parents=True, exist_ok=True)
    model = recognizer_model(np.random.default_rng(seed))
    model.doc_string = "tiny AuraFace stand-in (portrait make-tiny)"
    onnx.checker.check_model(model)
    onnx.save(model, str(root / "glintr100.onnx"))


# facexlib's ArcFace IR-SE layout at a few channels: 4 stride-2 stages (112 px -> 7x7) with one
# width-keeping unit (MaxPool shortcut, as most real units have), a 512-d output like the real one
# (InfiniteYou's projection reads 512). 3.3 MB, nearly all of it the 32*7*7 -> 512 Linear.
TINY_IRSE_UNITS = [(16, 16, 2), (16, 20, 2), (20, 20, 1), (20, 24, 2), (24, 32, 2)]


def arcface_irse_state(seed: int) -> dict:
    """A deterministic state dict in `recognition_arcface_ir_se50.pth`'s key layout, tiny widths."""
    import torch

    from ..archs.arcface_irse import ArcFaceIRSE

    model = ArcFaceIRSE(TINY_IRSE_UNITS, stem=16, embedding_dim=EMBEDDING_DIM, final_size=7)
    gen = torch.Generator().manual_seed(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen)

    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = value.clone()
        elif name.endswith("running_var"):
            state[name] = 1.0 + 0.1 * randn(value.shape).abs()
        elif value.ndim >= 2:  # conv / linear weights, scaled by fan-in so activations stay O(1)
            state[name] = randn(value.shape) / float(value[0].numel()) ** 0.5
        elif name == "input_layer.2.weight" or name.endswith("res_layer.2.weight"):  # PReLU slopes
            state[name] = torch.full(value.shape, 0.25)
        elif name.endswith("weight"):  # BN scales
            state[name] = 1.0 + 0.1 * randn(value.shape)
        else:  # BN shifts, running means, the Linear bias
            state[name] = 0.1 * randn(value.shape)
    return {k: v.contiguous() for k, v in state.items()}


def write_arcface_irse50(root: Path, seed: int) -> None:
    """tiny-arcface-irse50: `recognition_arcface_ir_se50.pth`, a plain state dict like facexlib's release."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    torch.save(arcface_irse_state(seed), root / "recognition_arcface_ir_se50.pth")
