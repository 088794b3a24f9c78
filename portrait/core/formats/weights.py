"""Model weights in safetensors, read one tensor at a time into the dtype the run wants.

Why not `safetensors.safe_open` / `load_file` (which diffusers' `from_pretrained` uses): they map
the whole file, and every mapped page a read touches counts toward the process's resident
memory until the file is closed. Loading the SD1.5 UNet (3.44 GB fp32) as bf16 that way peaked
at 5,832 MB RSS (904 MB of libraries + the 3.3 GB mapping + the 1.6 GB bf16 copy; measured with
ru_maxrss), to end at 2,553 MB. Reading each tensor with plain file reads into its own buffer
and converting it there keeps the peak at the converted model plus the largest single tensor
(59 MB for SD1.5). The file format is the documented one: an 8-byte little-endian header length,
a JSON header of {name: {dtype, shape, data_offsets}}, then the raw little-endian data.

This module only reads; the project's safetensors writer is `formats.lora.write_safetensors`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

from portrait.core.errors import bad_file

__all__ = ["safetensors_header", "check_complete", "stored_dtypes", "iter_safetensors", "folder_weight_files"]

# safetensors dtype codes -> torch dtype names (the ones model weights use)
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
          "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
MAX_HEADER = 100 * 2**20  # the format's own limit on the JSON header


def safetensors_header(path: Path | str) -> tuple[dict[str, Any], int]:
    """(the tensors' header entries, the byte offset where the data starts)."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise bad_file(path, "cannot be read as safetensors (shorter than its header)")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER:
            raise bad_file(path, "cannot be read as safetensors (header length out of range)")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise bad_file(path, "cannot be read as safetensors (its header is not JSON)") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def check_complete(path: Path | str) -> dict[str, Any]:
    """The header of a safetensors file whose data is all there: a file cut short (a copy that
    stopped, a full disk) has a header promising more bytes than follow it, which the loaders
    report as `OSError: Unable to load weights from checkpoint file`. One line naming the file
    instead (exit 2), before anything is loaded."""
    path = Path(path)
    header, start = safetensors_header(path)
    try:
        end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise bad_file(path, "cannot be read as safetensors (a header entry has no data_offsets)") from None
    size = path.stat().st_size
    if size < start + end:
        raise bad_file(path, f"truncated or damaged: its header promises {start + end:,} bytes, the file has "
                             f"{size:,}")
    return header


def stored_dtypes(headers: list[dict[str, Any]]) -> set[str]:
    """The torch dtype names the floating-point tensors of these headers are stored in."""
    return {DTYPES[entry["dtype"]] for header in headers for entry in header.values()
            if entry["dtype"] in ("F64", "F32", "F16", "BF16")}


def iter_safetensors(path: Path | str, dtype: Any = None) -> Iterator[tuple[str, Any]]:
    """(name, tensor) for each tensor of the file in file order; floating-point tensors are
    converted to `dtype` (a torch dtype) as each is read, so at most one tensor is held twice."""
    import torch

    path = Path(path)
    header, start = safetensors_header(path)
    order = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    # One read buffer, as large as the largest tensor, reused for every tensor that is converted:
    # a fresh buffer per tensor faulted in the whole file's worth of new pages (an SD1.5 UNet
    # fp32 -> bf16 load: 6.4 s, most of it allocating). A tensor kept in its stored dtype is
    # read into memory of its own.
    largest = max((e["data_offsets"][1] - e["data_offsets"][0] for _n, e in order), default=0)
    scratch = bytearray(largest) if dtype is not None else None
    with open(path, "rb", buffering=0) as f:
        for name, entry in order:
            kind = DTYPES.get(entry["dtype"])
            if kind is None:
                raise bad_file(path, f"tensor '{name}' has dtype {entry['dtype']}, which model weights do not use")
            begin, end = entry["data_offsets"]
            source = getattr(torch, kind)
            convert = dtype is not None and source.is_floating_point and source != dtype
            buffer = memoryview(scratch)[: end - begin] if convert else bytearray(end - begin)
            f.seek(start + begin)
            if f.readinto(buffer) != end - begin:
                raise bad_file(path, f"is truncated (tensor '{name}' runs past the end of the file)")
            tensor = (torch.frombuffer(buffer, dtype=source) if end > begin else torch.empty(0, dtype=source))
            tensor = tensor.reshape(entry["shape"])
            if convert:
                tensor = tensor.to(dtype)  # a new tensor: the scratch buffer is free for the next one
            yield name, tensor


def folder_weight_files(folder: Path, variant: str | None = None) -> list[Path] | None:
    """The safetensors files of one diffusers model folder (`diffusion_pytorch_model[.variant]`
    as one file or as shards listed in its `.index.json`); None when it holds no safetensors."""
    stem = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise bad_file(index, "is not a safetensors index (no weight_map)") from None
        return [folder / name for name in names]
    return None
