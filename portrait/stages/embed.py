"""Embed stage: identity embeddings for the zero-shot adapters, from the identity's photos.

Each adapter was trained on one embedding space, and only that space works. A backend declares
its adapter's space (`AdapterSpace`, portrait/core/backend.py) in its own module, as its SPEC's
`face_space`, and hands it to `embed_identity` / `embed_images`; this stage keeps no table of
backends. The spaces the shipped adapters read:

    InstantID          insightface antelopev2 (glintr100), raw `embedding` (not normalized)
    FaceID             insightface buffalo_l (w600k_r50), `normed_embedding`
    FaceID-Plus(V2)    buffalo_l `normed_embedding` + CLIP ViT-H hidden_states[-2] of a 224 norm_crop face
    PhotoMaker v2      buffalo_l raw `embedding` (+ CLIP on the whole photo, done by the backend)
    PuLID (SDXL)       insightface antelopev2 raw `embedding` (+ EVA-CLIP of the aligned face, by the backend)
    InfiniteYou        antelopev2 finds the face; facexlib's ArcFace IR-SE50 (torch) embeds it, normalized

Faces are located, then each pack's own ArcFace model embeds the arcface-aligned crop,
exactly as insightface's `FaceAnalysis.get` does (norm_crop on the 5 keypoints, then the
recognizer). InfiniteYou is the exception: its projection was trained on facexlib's IR-SE50
(another space than glintr100), fed as InfiniteYou's `extract_arcface_bgr_embedding` does:
the 112 norm_crop of the BGR photo, scaled (x / 255) * 2 - 1, output L2-normalised. Location and embedding are separate on purpose: any detector's 5 keypoints
give the crop the recognizer expects, so a real preset uses the pack's SCRFD and the tiny
preset (whose SCRFD is random by design) uses dlib, through the same embedding code.

Several photos make one identity (`mode`): `mean` averages the unit directions (and, for a
raw space, restores the photos' mean norm, because the adapter was trained on raw
magnitudes), `all` keeps one row per photo (PhotoMaker stacks them; IP-Adapter takes them
as several images), `best` keeps the first (the bundle lists photos best first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from portrait.core.backend import AdapterSpace
from portrait.core.errors import BadInput
from portrait.core.formats.images import read_rgb  # noqa: F401  (backends call <stage>.read_rgb)
from portrait.core.archs.recognizer import Recognizer, insightface_crop
from portrait.core.types import FaceObservation, Identity

Mode = Literal["mean", "all", "best"]
MODES = ("mean", "all", "best")


@dataclass(frozen=True)
class EmbedPolicy:
    """How the identity's photos become one embedding (a backend's typed EmbedOptions, by
    portrait.stages.identity_inputs.embed_policy_of)."""

    mode: Mode = "mean"
    max_photos: int = 8  # the bundle's best photos; more add little and cost time
    locator: str = "auto"  # auto | pack | dlib: who finds the faces (see module docstring)
    pack: str | None = None  # override the adapter's pack; a different one is refused


@dataclass(frozen=True)
class FaceCrop:
    """One located face of one photo, with its embedding in the adapter's space."""

    source: str
    image: np.ndarray  # the whole photo, RGB uint8
    face: FaceObservation  # kps/box from the locator; embedding from the pack's recognizer
    embedding: np.ndarray  # raw or normalized, as the adapter wants


@dataclass(frozen=True)
class IdEmbedding:
    """What an adapter is fed: (k, d) rows (k = 1 for mean/best, one per photo for all)."""

    space: AdapterSpace
    vectors: np.ndarray  # (k, d) float32
    crops: tuple[FaceCrop, ...]  # the faces used, best first
    mode: Mode

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def info(self) -> dict[str, Any]:
        return {"space": self.space.embedder, "normalized": self.space.normalized, "mode": self.mode,
                "photos": [c.source for c in self.crops]}


# --- checks ---------------------------------------------------------------------------------


def check_pack(space: AdapterSpace, policy: EmbedPolicy | None = None) -> AdapterSpace:
    """The space, after refusing a `face_pack` option that names another pack than the adapter's."""
    if policy is not None and policy.pack and policy.pack not in (space.pack, space.backend):
        raise wrong_pack(space, policy.pack)
    return space


def wrong_pack(space: AdapterSpace, given: str) -> BadInput:
    return BadInput(f"{space.adapter} was trained on insightface {space.pack} embeddings; '{given}' embeddings live in "
                    f"another space and would give a stranger's face (use face_pack={space.pack})")


# --- locating and embedding ------------------------------------------------------------------


def identity_photos(identity: Identity, limit: int) -> list[Path]:
    """The bundle's top-k photos (best first), or its reference when it kept none."""
    photos = [p for p in identity.photos if p.is_file()][: max(1, limit)]
    if photos:
        return photos
    if identity.reference.is_file():
        return [identity.reference]
    raise BadInput(f"identity '{identity.name}': no photos/ and no reference.png in {identity.root}")


class TorchArcFace:
    """facexlib's ArcFace IR-SE50 fed the way InfiniteYou's `extract_arcface_bgr_embedding` feeds it."""

    def __init__(self, model):
        self.model = model
        self.input_size = int(model.input_size)

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """L2-normalised embedding of the face at `kps` in an RGB image: BGR norm_crop, (x/255)*2-1."""
        return self.embed_crop(insightface_crop(np.ascontiguousarray(image[:, :, ::-1]), kps, self.input_size))

    def embed_crop(self, bgr_crop: np.ndarray) -> np.ndarray:
        import torch

        param = next(self.model.parameters())
        pixels = torch.from_numpy(np.ascontiguousarray(bgr_crop)).unsqueeze(0).permute(0, 3, 1, 2) / 255.0
        pixels = (2 * pixels - 1).to(device=param.device, dtype=param.dtype).contiguous()
        with torch.inference_mode():
            return self.model(pixels)[0].float().cpu().numpy()


def load_recognizer(ctx, space: AdapterSpace) -> Recognizer | TorchArcFace:
    """The recognizer an adapter space names, through the model door (kind "recognizer", or
    "arcface-irse50" for a space with a torch ArcFace)."""
    from portrait.core.models import load, resolve

    if space.arcface:
        return TorchArcFace(load(ctx, ctx.preset.model(space.arcface), "arcface-irse50"))
    resolved = resolve(ctx, space.pack)
    if not resolved.file(space.recognizer).is_file():
        raise BadInput(f"{resolved.root}: pack '{space.pack}' has no {space.recognizer}")
    return load(ctx, space.pack, "recognizer", file=space.recognizer)


def locator_backend(ctx, space: AdapterSpace, policy: EmbedPolicy) -> str:
    if policy.locator == "dlib":
        return "dlib"
    if policy.locator == "pack":
        return space.backend
    # The tiny packs' detectors are random by design; their 5 points would be noise.
    return "dlib" if ctx.preset.tiny else space.backend


def make_locator(ctx, space: AdapterSpace, policy: EmbedPolicy):
    from portrait.core.faces import make_analyzer

    return make_analyzer(ctx, locator_backend(ctx, space, policy))


def largest_face(locator, image: np.ndarray) -> FaceObservation | None:
    faces = locator.detect(image, embed=False)
    return max(faces, key=lambda f: f.area) if faces else None


def face_crops(sources: Sequence[tuple[str, np.ndarray]], locator, recognizer: Recognizer | TorchArcFace,
               space: AdapterSpace) -> list[FaceCrop]:
    """Locate the largest face of each photo and embed it; photos without a face are skipped."""
    crops = []
    for source, image in sources:
        face = largest_face(locator, image)
        if face is None:
            continue
        raw = recognizer.embed(image, face.kps)
        observed = FaceObservation(box=face.box, score=face.score, kps=face.kps, embedding=raw,
                                   backend=space.embedder, landmarks=face.landmarks)
        crops.append(FaceCrop(source, image, observed, normalize(raw) if space.normalized else raw))
    return crops


def normalize(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return (v / norm).astype(np.float32) if norm > 0 else v.astype(np.float32)


def combine(vectors: np.ndarray, mode: Mode, normalized: bool) -> np.ndarray:
    """(n, d) per-photo embeddings -> (k, d) as the mode asks."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if mode == "all":
        return vectors
    if mode == "best":
        return vectors[:1]
    directions = np.stack([normalize(v) for v in vectors])
    mean = normalize(directions.mean(axis=0))
    if not normalized:
        mean = mean * float(np.mean(np.linalg.norm(vectors, axis=1)))
    return mean[None, :].astype(np.float32)


def embed_identity(ctx, identity: Identity, space: AdapterSpace, policy: EmbedPolicy = EmbedPolicy()) -> IdEmbedding:
    """The identity's embedding in the adapter's `space` from its top-k photos (BadInput if none
    shows a face)."""
    check_pack(space, policy)  # refuses a wrong pack for this adapter before any photo is read
    paths = identity_photos(identity, policy.max_photos)
    sources = [(str(p), read_rgb(p)) for p in paths]
    return embed_images(ctx, sources, space, policy, owner=f"identity '{identity.name}'")


def embed_images(ctx, sources: Sequence[tuple[str, np.ndarray]], space: AdapterSpace,
                 policy: EmbedPolicy = EmbedPolicy(), owner: str = "the given photos") -> IdEmbedding:
    check_pack(space, policy)
    crops = face_crops(sources, make_locator(ctx, space, policy), load_recognizer(ctx, space), space)
    if not crops:
        where = ", ".join(s for s, _ in sources[:3]) + (" ..." if len(sources) > 3 else "")
        raise BadInput(f"{owner}: no face found in its photos ({where})")
    vectors = combine(np.stack([c.embedding for c in crops]), policy.mode, space.normalized)
    return IdEmbedding(space, vectors, tuple(crops), policy.mode)


# --- pose reference (InstantID keypoints) ------------------------------------------------------


def pose_keypoints(ctx, image: np.ndarray, source: str, space: AdapterSpace,
                   policy: EmbedPolicy = EmbedPolicy()) -> np.ndarray:
    """The 5 keypoints of the largest face of a pose reference, found by the adapter space's
    locator (BadInput when it has none)."""
    face = largest_face(make_locator(ctx, check_pack(space, policy), policy), image)
    if face is None:
        raise BadInput(f"{source}: no face found in the pose reference")
    return np.asarray(face.kps, dtype=np.float32)


# --- CLIP ViT-H face features (FaceID-Plus / PlusV2) ---------------------------------------------


def clip_face_crops(crops: Sequence[FaceCrop], size: int = 224) -> list[np.ndarray]:
    """The 224 arcface-aligned face crops IP-Adapter FaceID-Plus feeds to CLIP (`norm_crop`, ratio 2)."""
    return [insightface_crop(c.image, c.face.kps, size) for c in crops]


def clip_hidden_states(image_encoder, processor, images: Sequence[np.ndarray], mode: Mode, device, dtype):
    """(cond, uncond) CLIP hidden_states[-2], each [1, k, seq, hidden]; uncond is the encoder on a
    zero pixel tensor, as IP-Adapter's FaceID-Plus does."""
    import torch

    pixels = processor(images=list(images), return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
    with torch.no_grad():
        cond = image_encoder(pixels, output_hidden_states=True).hidden_states[-2]
        uncond = image_encoder(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
    if mode == "mean":
        cond = cond.mean(dim=0, keepdim=True)
    elif mode == "best":
        cond = cond[:1]
    uncond = uncond.expand(cond.shape[0], -1, -1)
    return cond[None], uncond[None]
