"""The real CLIP BPE tokenizer, built offline from the vocabulary open_clip_torch ships.

Stable Diffusion's tokenizer folders (`tokenizer/`, `tokenizer_2/`) hold `vocab.json`
(49,408 entries) and `merges.txt`. Both derive from OpenAI's `bpe_simple_vocab_16e6.txt.gz`,
which the open_clip_torch wheel carries, so we can write byte-level-identical token ids
without the hub: "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].

The construction follows CLIP's own recipe (the same one open_clip's SimpleTokenizer runs):
the 256 byte symbols, then each with the end-of-word marker, then one token per merge, then
the two special tokens. Only the special-token spelling differs: transformers names them
`<|startoftext|>` / `<|endoftext|>`.

Production code uses it (portrait.core.loaders writes the tokenizer folders a single-file
checkpoint's config needs), so it lives in the foundation; the make-tiny writers in
portrait/core/tiny/ import it from here for their stand-ins.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

from .errors import ModelMissing
from .io import write_text

VOCAB_SIZE = 49408
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP's BPE keeps the first 49152 - 256 - 2 merges of the shipped file (after its header line).
N_MERGES = VOCAB_SIZE - 256 * 2 - 2


def _bpe_source() -> bytes:
    # find_spec locates the package without importing it: importing open_clip pulls in
    # torch and timm and costs seconds, and we only want one data file.
    found = importlib.util.find_spec("open_clip")
    for location in (found.submodule_search_locations or []) if found else []:
        path = Path(location) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path.read_bytes()
    raise ModelMissing("clip-tokenizer", "pip install open_clip_torch",
                       detail="the CLIP vocabulary ships in open_clip_torch")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (a fixed published mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_merges() -> list[str]:
    lines = gzip.decompress(_bpe_source()).decode("utf-8").split("\n")
    return lines[1 : 1 + N_MERGES]


def clip_vocab(merges: list[str]) -> dict[str, int]:
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"CLIP vocabulary has {len(tokens)} tokens, expected {VOCAB_SIZE}")
    return {token: index for index, token in enumerate(tokens)}


def tokenizer_files(pad_token: str = EOS, model_max_length: int = 77) -> dict[str, str]:
    """The text of each file of a transformers CLIPTokenizer folder.

    SD1.5 and SDXL's first tokenizer pad with `<|endoftext|>`; SDXL's `tokenizer_2` pads with
    `!` (id 0), which changes the padded positions the second text encoder sees.
    """
    merges = clip_merges()
    vocab = clip_vocab(merges)
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": model_max_length,
        "tokenizer_class": "CLIPTokenizer",
        **special,
    }
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2, sort_keys=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
    }


def write_clip_tokenizer(folder: Path, pad_token: str = EOS, model_max_length: int = 77) -> Path:
    """Write a folder `transformers.CLIPTokenizer.from_pretrained` loads offline."""
    folder = Path(folder)
    for name, text in tokenizer_files(pad_token, model_max_length).items():
        write_text(folder / name, text)
    return folder
