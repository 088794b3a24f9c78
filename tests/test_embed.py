"""Identity embeddings for the zero-shot adapters (stages/embed.py) on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from portrait.core.bundle import load_identity, write_bundle
from portrait.core.errors import BadInput
from portrait.stages import embed as emb
from portrait.stages.backends.instantid import FACE_SPACE as INSTANTID
from portrait.stages.zeroshot import FACEID_PLUS_SPACE, FACEID_SPACE


def make_identity(settings, name: str, photos: list[np.ndarray], reference: np.ndarray | None = None):
    write_bundle(settings.identities_dir / name, {"name": name, "trigger": "sks", "class_word": "woman"},
                 reference=reference if reference is not None else photos[0], photos=photos)
    return load_identity(settings, name)


@pytest.fixture(scope="module")
def two_photo_identity(tiny_home, hopper, astronaut):
    return make_identity(tiny_home, "embed-two", [hopper, astronaut])


def test_mean_of_directions_keeps_raw_magnitude():
    raw = np.array([[3.0, 4.0], [0.0, 10.0]], dtype=np.float32)
    mean_raw = emb.combine(raw, "mean", normalized=False)
    # direction = normalize(mean of unit vectors); norm = mean raw norm (5 and 10 -> 7.5)
    unit = np.array([[0.6, 0.8], [0.0, 1.0]]).mean(axis=0)
    assert np.allclose(mean_raw[0] / np.linalg.norm(mean_raw[0]), unit / np.linalg.norm(unit), atol=1e-6)
    assert np.linalg.norm(mean_raw[0]) == pytest.approx(7.5, rel=1e-5)
    assert np.linalg.norm(emb.combine(raw, "mean", normalized=True)[0]) == pytest.approx(1.0, rel=1e-5)
    assert emb.combine(raw, "all", normalized=False).shape == (2, 2)
    assert np.array_equal(emb.combine(raw, "best", normalized=False), raw[:1])


def test_each_adapter_gets_its_own_space(ctx, two_photo_identity):
    instantid = emb.embed_identity(ctx, two_photo_identity, INSTANTID)
    faceid = emb.embed_identity(ctx, two_photo_identity, FACEID_SPACE, emb.EmbedPolicy(mode="all"))
    assert instantid.space.backend == "insightface:antelopev2" and not instantid.space.normalized
    assert faceid.space.backend == "insightface:buffalo_l" and faceid.space.normalized
    assert instantid.vectors.shape == (1, 512) and faceid.vectors.shape == (2, 512)
    assert np.allclose(np.linalg.norm(faceid.vectors, axis=1), 1.0, atol=1e-5)
    assert abs(float(np.linalg.norm(instantid.vectors[0])) - 1.0) > 1e-3  # raw, not normalized
    assert all(c.face.backend == "insightface:antelopev2" for c in instantid.crops)
    # the two packs are different models: their vectors for the same faces differ
    assert not np.allclose(normalize(instantid.vectors[0]), faceid.vectors.mean(axis=0), atol=1e-2)


def normalize(v):
    return v / np.linalg.norm(v)


def test_embedding_is_what_insightface_computes(ctx, hopper):
    """Reference: insightface's own ArcFaceONNX.get on a Face with the same keypoints."""
    from insightface.app.common import Face

    space = FACEID_SPACE
    recognizer = emb.load_recognizer(ctx, space)
    locator = emb.make_locator(ctx, space, emb.EmbedPolicy())
    face = emb.largest_face(locator, hopper)
    ours = recognizer.embed(hopper, face.kps)
    ref_face = Face(bbox=np.array(face.box), kps=face.kps, det_score=face.score)
    reference = recognizer.model.get(np.ascontiguousarray(hopper[:, :, ::-1]), ref_face)
    assert np.abs(ours - reference).max() == 0.0


def test_wrong_pack_is_refused(ctx, two_photo_identity):
    with pytest.raises(BadInput, match="trained on insightface buffalo_l"):
        emb.embed_identity(ctx, two_photo_identity, FACEID_SPACE, emb.EmbedPolicy(pack="antelopev2"))
    with pytest.raises(BadInput, match="instantid was trained on insightface antelopev2"):
        emb.pose_keypoints(ctx, np.zeros((64, 64, 3), np.uint8), "pose.png", INSTANTID,
                           emb.EmbedPolicy(pack="insightface:buffalo_l"))
    assert emb.check_pack(INSTANTID, emb.EmbedPolicy(pack="insightface:antelopev2")) is INSTANTID


def test_no_face_in_photos_or_pose_reference(ctx, tiny_home):
    blank = np.full((96, 96, 3), 128, dtype=np.uint8)
    identity = make_identity(tiny_home, "embed-blank", [blank])
    with pytest.raises(BadInput, match="no face found"):
        emb.embed_identity(ctx, identity, INSTANTID)
    with pytest.raises(BadInput, match="pose reference"):
        emb.pose_keypoints(ctx, blank, "blank.png", INSTANTID)


def test_clip_face_crops_are_224_aligned(ctx, two_photo_identity):
    found = emb.embed_identity(ctx, two_photo_identity, FACEID_PLUS_SPACE, emb.EmbedPolicy(mode="all"))
    crops = emb.clip_face_crops(found.crops)
    assert [c.shape for c in crops] == [(224, 224, 3)] * 2
    # norm_crop at 224 is the 112 alignment at twice the scale
    from portrait.core.faces import norm_crop

    small = norm_crop(found.crops[0].image, found.crops[0].face.kps, 112)
    big = np.asarray(Image.fromarray(crops[0]).resize((112, 112), Image.BILINEAR))
    assert np.abs(small.astype(int) - big.astype(int)).mean() < 12


def test_reads_only_the_bundle_photos(two_photo_identity):
    paths = emb.identity_photos(two_photo_identity, 8)
    assert [Path(p).name for p in paths] == ["000.png", "001.png"]
    assert emb.identity_photos(two_photo_identity, 1) == paths[:1]


def test_adapter_makers_are_deterministic_and_in_the_real_layouts(tmp_path):
    import hashlib

    import torch
    from safetensors.torch import load_file

    from portrait.core.tiny import adapters

    for run in ("a", "b"):
        adapters.write_faceid_sd15(tmp_path / run, 7)
        adapters.write_photomaker_v2(tmp_path / run, 7)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "a").iterdir()}
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tmp_path / "b").iterdir()}

    faceid = torch.load(tmp_path / "a" / "ip-adapter-faceid_sd15.bin", weights_only=True)
    assert list(faceid) == ["image_proj", "ip_adapter"]
    assert {"proj.0.weight", "proj.2.weight", "norm.weight"} <= set(faceid["image_proj"])
    ip = faceid["ip_adapter"]
    # LoRA on every processor, to_k_ip/to_v_ip on the cross-attention (odd) ones only
    n = len({k.split(".")[0] for k in ip})
    assert all(f"{i}.to_q_lora.down.weight" in ip for i in range(n))
    assert {int(k.split(".")[0]) % 2 for k in ip if "to_k_ip" in k} == {1}
    kohya = load_file(tmp_path / "a" / "ip-adapter-faceid_sd15_lora.safetensors")
    assert all(k.startswith("lora_unet_") for k in kohya) and len(kohya) == n * 4 * 3
    assert torch.equal(kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"],
                       ip["0.to_q_lora.down.weight"])

    photomaker = torch.load(tmp_path / "a" / "photomaker-v2.bin", weights_only=True)
    assert list(photomaker) == ["id_encoder", "lora_weights"]
    assert any(k.startswith("qformer_perceiver.perceiver_resampler.layers.3.") for k in photomaker["id_encoder"])
    assert all(k.startswith("unet.") and ".processor.to_" in k for k in photomaker["lora_weights"])
