"""Tiny Qwen text encoders and their tokenizer, in the formats the frontier bases ship.

FLUX.2 [klein] and Z-Image condition on Qwen3 (klein: `Qwen3ForCausalLM`, the hidden states
of layers 9, 18 and 27 stacked; Z-Image: `Qwen3Model`, the second-to-last hidden state), and
Qwen-Image-Edit on Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`, whose vision tower also
reads the reference pictures through a `Qwen2VLProcessor`). All three tokenize with Qwen's
byte-level BPE (`Qwen2TokenizerFast`, which transformers 5 names `Qwen2Tokenizer`) and a chat
template: the pipelines wrap the prompt in `<|im_start|>user ... <|im_end|>` turns.

The hub's tokenizers cannot be fetched here, and Qwen's 151,643-entry vocabulary would make
every tiny embedding table megabytes. So the tokenizer is ours: the merges are learned with
the `tokenizers` library's BPE trainer (deterministic: ties break on the pair itself) over a
fixed corpus (the commonest words of CLIP's merge list, which open_clip ships), under Qwen's
own pre-tokenizer (the split regex of transformers' Qwen2Tokenizer, then byte-level), then
Qwen's special tokens in Qwen's order after the learned entries. The chat template is written
here: for a single user turn it renders what Qwen3's does (`enable_thinking=False` appends an
empty think block, as klein asks for; Z-Image passes `True`, which appends nothing).

Every size the diffusion stand-ins must agree with (the text width is the transformers'
`joint_attention_dim` / `cap_feat_dim`) lives in TINY_QWEN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_QWEN: dict[str, Any] = {
    "bpe_size": 2048,  # byte symbols + learned merges (Qwen2/3: 151,643)
    "vocab_size": 2064,  # + the special tokens, rounded up to a multiple of 16 (Qwen3: 151,936)
    "hidden_size": 32,  # Qwen3-4B: 2560; Qwen2.5-VL-7B: 3584
    "intermediate_size": 64,
    "heads": 2,
    "head_dim": 16,
    # klein stacks hidden states 9, 18 and 27 (Flux2KleinPipeline's default): the tiny encoder
    # keeps 28 layers so the real default applies unchanged (a layer of width 32 costs nothing).
    "qwen3_layers": 28,
    "qwen3_zimage_layers": 4,  # Z-Image reads hidden_states[-2]
    "vl_layers": 2,
    "vl_vision_depth": 2,
    "vl_vision_hidden": 16,
    "vl_vision_heads": 2,
    "vl_mrope_section": (2, 3, 3),  # sums to head_dim / 2 (Qwen2.5-VL-7B: 16, 24, 24)
    "max_position_embeddings": 2048,
}

# Qwen's special tokens, in the order (and so at the relative ids) Qwen2/2.5/3 tokenizers give them.
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen3's reasoning markers: added tokens, not special (they stay in decoded text).
THINK = ("<think>", "</think>")

# Written for these stand-ins: a single system/user/assistant exchange renders as Qwen's
# templates render it; `enable_thinking` false closes an empty think block after the
# generation prompt (Qwen3's convention, which FLUX.2 [klein] relies on).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

# Qwen-Image-Edit's processor/preprocessor_config.json (Qwen2.5-VL's image processor).
IMAGE_PROCESSOR: dict[str, Any] = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def special_ids() -> dict[str, int]:
    base = TINY_QWEN["bpe_size"]
    ids = {token: base + i for i, token in enumerate(SPECIAL)}
    ids.update({token: base + len(SPECIAL) + i for i, token in enumerate(THINK)})
    return ids


def _corpus() -> list[str]:
    """A fixed training text: the commonest English words (CLIP's merge list, in its order)."""
    from ..tokenizers import clip_merges

    words = []
    for line in clip_merges():
        if line.endswith("</w>"):
            word = line.replace(" ", "").replace("</w>", "")
            if word.isalpha():
                words.append(word)
        if len(words) >= 6000:
            break
    # Lines of a dozen words each, so capitalised and space-led forms are both learned.
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    return lines + [line.capitalize() for line in lines[:100]]


def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE learned by `tokenizers` under Qwen's pre-tokenizer (same corpus, same result)."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=TINY_QWEN["bpe_size"], min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def tokenizer(max_length: int = 512):
    """A Qwen2Tokenizer (= Qwen2TokenizerFast) over the tiny vocabulary, Qwen's specials and chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = vocab_and_merges()
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=max_length)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK])
    ids = special_ids()
    got = {t: tok.convert_tokens_to_ids(t) for t in ids}
    if got != ids:
        raise RuntimeError(f"tiny Qwen tokenizer: special ids {got}, expected {ids}")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def write_tokenizer(folder: Path, max_length: int = 512) -> None:
    tokenizer(max_length).save_pretrained(str(folder))


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def qwen3_config(layers: int):
    from transformers import Qwen3Config

    q = TINY_QWEN
    return Qwen3Config(vocab_size=q["vocab_size"], hidden_size=q["hidden_size"], intermediate_size=q["intermediate_size"],
                       num_hidden_layers=layers, num_attention_heads=q["heads"], num_key_value_heads=q["heads"],
                       head_dim=q["head_dim"], max_position_embeddings=q["max_position_embeddings"],
                       tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       bos_token_id=special_ids()["<|endoftext|>"], eos_token_id=special_ids()["<|im_end|>"],
                       pad_token_id=None)


def qwen3_causal_lm(seed: int):
    """klein's text encoder class (Qwen3-4B as a causal LM; only its hidden states are read)."""
    from transformers import Qwen3ForCausalLM

    _seed(seed)
    return Qwen3ForCausalLM(qwen3_config(TINY_QWEN["qwen3_layers"])).eval()


def qwen3_model(seed: int):
    """Z-Image's text encoder class (Qwen3-4B without its LM head)."""
    from transformers import Qwen3Model

    _seed(seed)
    return Qwen3Model(qwen3_config(TINY_QWEN["qwen3_zimage_layers"])).eval()


def qwen25_vl(seed: int):
    """Qwen-Image-Edit's text encoder: Qwen2.5-VL with its vision tower, at tiny width."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    q = TINY_QWEN
    ids = special_ids()
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": q["vocab_size"], "hidden_size": q["hidden_size"], "intermediate_size": q["intermediate_size"],
            "num_hidden_layers": q["vl_layers"], "num_attention_heads": q["heads"], "num_key_value_heads": q["heads"],
            "max_position_embeddings": q["max_position_embeddings"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": list(q["vl_mrope_section"])},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": q["vl_vision_depth"], "hidden_size": q["vl_vision_hidden"], "intermediate_size": 32,
            "num_heads": q["vl_vision_heads"], "out_hidden_size": q["hidden_size"], "fullatt_block_indexes": [1],
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    _seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def processor(max_length: int = 1024):
    """Qwen2VLProcessor: Qwen2.5-VL's image processor + the tiny tokenizer (+ its video processor)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor

    image_processor = Qwen2VLImageProcessor(**IMAGE_PROCESSOR)
    video = None
    try:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor()
    except ImportError:  # transformers without the separate video processor
        pass
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer(max_length), video_processor=video,
                            chat_template=CHAT_TEMPLATE)
