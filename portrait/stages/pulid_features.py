"""PuLID's identity features, shared by the `pulid` (SDXL) and `pulid-flux` backends.

Both reference pipelines (ToTheBeginning/PuLID pulid/pipeline_v1_1.py and pipeline_flux.py)
read a photo the same way: the antelopev2 raw embedding of the largest face, and EVA02-CLIP
features of that face aligned to facexlib's 512 FFHQ template, with the background, ears,
neck, clothes and hat painted white by a BiSeNet face parser and the rest turned gray. The
ID vector [arcface 512 ++ unit EVA embedding] and the EVA hidden states go into the IDFormer;
the unconditional tokens are the IDFormer on zeros. Faces are located and embedded by
stages/embed.py in FACE_SPACE below; the parser is the preset's `face_parser`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from portrait.core.backend import AdapterSpace
from portrait.core.context import RunContext
from portrait.core.types import Identity
from portrait.stages import embed as emb

# The face space PuLID's IDFormer was trained on (both backends read it): insightface
# antelopev2's glintr100, the raw `embedding` of each aligned face (ToTheBeginning/PuLID).
FACE_SPACE = AdapterSpace("pulid", "antelopev2", "glintr100.onnx", normalized=False)

# facexlib's FaceRestoreHelper 5-point template for a 512 face (crop ratio 1), which PuLID
# aligns with before parsing: eyes, nose, mouth corners.
FFHQ_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]], np.float32)
ALIGN_BORDER = (135, 133, 132)  # facexlib's border value for warpAffine
# Parser labels PuLID paints white: background, cloth, hat, ears, earring, neck, necklace.
WHITE_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def align_face(image: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The 512 face crop facexlib's FaceRestoreHelper makes from 5 keypoints (similarity, LMEDS)."""
    import cv2

    matrix = cv2.estimateAffinePartial2D(np.asarray(kps, np.float32), FFHQ_512, method=cv2.LMEDS)[0]
    return cv2.warpAffine(image, matrix, (512, 512), borderMode=cv2.BORDER_CONSTANT, borderValue=ALIGN_BORDER)


def eva_input(aligned: np.ndarray, labels: np.ndarray, image_size: int):
    """PuLID's EVA input from an aligned RGB face and its parser labels: gray face, white
    elsewhere, bicubic to the EVA size, OpenAI CLIP normalization -> [1, 3, S, S] float32."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import normalize, resize

    rgb = torch.from_numpy(np.ascontiguousarray(aligned)).permute(2, 0, 1)[None].float() / 255.0
    gray = (0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]).repeat(1, 3, 1, 1)
    white = torch.from_numpy(np.isin(labels, WHITE_LABELS))[None, None]
    face = torch.where(white, torch.ones_like(rgb), gray)
    face = resize(face, image_size, InterpolationMode.BICUBIC)
    return normalize(face, OPENAI_MEAN, OPENAI_STD)


@dataclass(frozen=True)
class PuLIDInputs:
    cond: Any  # [1, Q, C] ID tokens of the identity
    uncond: Any  # [1, Q, C] the IDFormer on zeros
    embedding: emb.IdEmbedding


def id_features(eva, faces, arcface: np.ndarray, device, dtype):
    """Per photo: (id vector [1, 512 + E], five hidden states [1, L, W]) from EVA on the prepared
    faces (list of [1, 3, S, S]) and the arcface rows (k, 512)."""
    import torch

    rows = []
    with torch.no_grad():
        for pixels, vector in zip(faces, arcface):
            embed, hidden = eva(pixels.to(device=device, dtype=dtype))
            embed = embed / embed.norm(p=2, dim=1, keepdim=True)
            ante = torch.from_numpy(np.asarray(vector, np.float32))[None].to(device=device, dtype=dtype)
            rows.append((torch.cat([ante, embed], dim=-1), hidden))
    return rows


def encode_identity(encoder, rows, mode: str):
    """(uncond, cond) ID tokens from per-photo (id vector, hidden states) rows."""
    import torch

    with torch.no_grad():
        if mode == "mean":
            vector = torch.stack([r[0] for r in rows]).mean(0)
            hidden = [torch.stack([r[1][i] for r in rows]).mean(0) for i in range(5)]
            cond_in, hidden_in = vector, hidden
        else:
            rows = rows[:1] if mode == "best" else rows
            cond_in = torch.stack([r[0] for r in rows], dim=1)  # [1, P, D]: P photos of one identity
            hidden_in = [torch.cat([r[1][i] for r in rows], dim=1) for i in range(5)]
        cond = encoder(cond_in, hidden_in)
        uncond = encoder(torch.zeros_like(rows[0][0]), [torch.zeros_like(h) for h in rows[0][1]])
    return uncond, cond


def pulid_inputs(ctx: RunContext, identity: Identity, models, embed_policy: emb.EmbedPolicy) -> PuLIDInputs:
    """`models` has `.eva` (portrait.core.archs.pulid.EvaVisual) and `.encoder` (IDFormer)."""
    from portrait.core.parsing import load_face_parser

    found = emb.embed_identity(ctx, identity, FACE_SPACE, replace(embed_policy, mode="all"))
    parser = load_face_parser(ctx, ctx.preset.model("face_parser"))
    faces = []
    for crop in found.crops:
        aligned = align_face(crop.image, crop.face.kps)
        faces.append(eva_input(aligned, parser.parse_crop(aligned), models.eva.image_size))
    rows = id_features(models.eva, faces, found.vectors, ctx.placement.device, ctx.placement.dtype)
    uncond, cond = encode_identity(models.encoder, rows, embed_policy.mode)
    return PuLIDInputs(cond, uncond, replace(found, mode=embed_policy.mode))
