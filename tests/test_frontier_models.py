"""The frontier base families (issue 29): FLUX.2 [klein], Z-Image and Qwen-Image-Edit-2511.

Their stand-ins are written in the hub's diffusers layouts and load through the one model door
(portrait.core.loaders) into the pipeline classes diffusers documents for them; the tokenizer is
ours (a byte-level BPE learned with `tokenizers`) and renders the chat prompts the pipelines
build as Qwen's own template does.
"""

from __future__ import annotations

import json

import pytest

from portrait.core.config import BASE_FAMILIES, load_preset
from portrait.core.context import RunContext
from portrait.core.errors import BadInput

PRESETS = {"tiny-flux2-klein": ("flux2-klein", "Flux2KleinPipeline", "txt2img"),
           "tiny-zimage": ("zimage", "ZImagePipeline", "txt2img"),
           "tiny-qwen-edit": ("qwen-image-edit", "QwenImageEditPlusPipeline", "edit")}


def test_the_family_lists_agree():
    from portrait.core import loaders

    assert set(loaders.FAMILIES) == set(BASE_FAMILIES)
    for name, (family, _, _) in PRESETS.items():
        preset = load_preset(name)
        assert preset.family == family and preset.tiny
        assert load_preset(name.replace("tiny-", "").replace("flux2-klein", "klein-4b")).family == family


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_stand_in_loads_through_the_door_into_its_pipeline(tiny_home, preset):
    from portrait.core.loaders import load_components, load_pipeline

    family, cls, kind = PRESETS[preset]
    ctx = RunContext.create(tiny_home, preset=preset)
    pipe = load_pipeline(ctx, kind=kind)
    assert type(pipe).__name__ == cls
    assert load_components(ctx).family == family
    assert load_pipeline(ctx, kind=kind) is pipe  # cached with its components
    if family == "flux2-klein":
        assert pipe.config.is_distilled is True  # model_index.json's setting reaches the pipeline
        assert load_pipeline(ctx, ctx.preset.model("train_base"), kind=kind).config.is_distilled is False
    if family == "qwen-image-edit":
        assert type(pipe.processor).__name__ == "Qwen2VLProcessor"
        with pytest.raises(BadInput, match="no txt2img pipeline"):
            load_pipeline(ctx, kind="txt2img")


def test_the_tokenizer_renders_qwen_chat_prompts_with_its_special_tokens():
    from portrait.core.tiny.qwen import TINY_QWEN, special_ids, tokenizer

    tok = tokenizer()
    messages = [{"role": "user", "content": "a portrait photo of a woman"}]
    klein = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    zimage = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert klein == ("<|im_start|>user\na portrait photo of a woman<|im_end|>\n<|im_start|>assistant\n"
                     "<think>\n\n</think>\n\n")
    assert zimage == "<|im_start|>user\na portrait photo of a woman<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(klein)["input_ids"]
    assert ids[0] == special_ids()["<|im_start|>"] and special_ids()["<think>"] in ids
    assert tok.decode(ids) == klein  # byte-level: nothing lost
    assert max(special_ids().values()) < TINY_QWEN["vocab_size"] and len(tok) <= TINY_QWEN["vocab_size"]
    padded = tok("a photo", padding="max_length", max_length=8)
    assert padded["input_ids"][-1] == special_ids()["<|endoftext|>"] and padded["attention_mask"][-1] == 0


def test_stand_ins_are_byte_identical_on_every_write(tmp_path):
    from portrait.core.io import sha256_file
    from portrait.core.tiny.frontier import write_klein

    write_klein(tmp_path / "a", 3)
    write_klein(tmp_path / "b", 3)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) >= 9
    for name in files:
        assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name), name


def test_a_folder_of_another_family_is_refused_in_one_line(tiny_home, tmp_path):
    import shutil

    from portrait.core.loaders import load_components

    ctx = RunContext.create(tiny_home, preset="tiny-zimage")
    folder = tmp_path / "wrong"
    shutil.copytree(ctx.resolve(ctx.preset.model("base")).root, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "Flux2Transformer2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(BadInput, match="transformer is Flux2Transformer2DModel; a zimage base has ZImageTransformer2DModel"):
        load_components(ctx, base_path=folder)


def test_the_registry_names_the_frontier_models_and_their_terms():
    from portrait.core.registry import Registry

    registry = Registry.load()
    for model_id in ("flux2-klein-4b", "flux2-klein-base-4b", "zimage-turbo", "zimage", "qwen-image-edit-2511"):
        spec = registry.get(model_id)
        assert spec.license_class == "commercial" and spec.license == "apache-2.0", model_id
        assert registry.get(spec.tiny).family == spec.family
    for model_id in ("flux2-klein-9b", "flux-kontext"):
        assert registry.get(model_id).license_class == "non-commercial"
        assert "klein" in registry.get(model_id).alternative
