"""Reference pictures of an identity for the reference-conditioned backends (klein-ref, qwen-edit).

FLUX.2 [klein] and Qwen-Image-Edit take pictures, not embeddings: the likeness comes from the
pixels they are shown. The best ones an identity bundle holds are its aligned crops: the
bundle's `reference.png` (prepare's head-and-shoulders crop of the photo the ranking chose)
and, after it, crops of the bundle's top-k photos (`photos/NNN`, best first) aligned the same
way, with the preset's `prepare` crop geometry, by the request's face analyzer (dlib under
the commercial policy). A photo whose crop is the reference's own (the ranking's choice is
usually also the first kept photo) is skipped, so three references are three photos.

Each picture records its file and sha256, so results.json says exactly what conditioned an
image. Several identities (a group picture) each get their own list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from portrait.core.errors import BadInput
from portrait.core.types import Identity

# Mean absolute difference (0-255) of two 32x32 grey thumbnails below which an aligned crop is
# the reference photo again (a re-crop of the same photo differs by resampling only: < 3 on the
# test photos; two photos of one person differ by > 20).
SAME_PHOTO = 8.0


@dataclass(frozen=True)
class ReferencePicture:
    """One picture a reference-conditioned backend is shown."""

    identity: str  # whose face it shows ("" for a user's reference of an outfit or backdrop)
    source: Path  # the bundle file it was cut from, or the user's file
    image: np.ndarray  # RGB uint8 (identity crops: size x size, face aligned)
    sha256: str  # of the source file
    role: str = "identity"  # identity | edit-source | reference

    def info(self) -> dict[str, Any]:
        in_bundle = self.role == "identity"
        name = (str(self.source.relative_to(self.source.parent.parent)) if self.source.parent.name == "photos"
                else self.source.name) if in_bundle else str(self.source)
        return {"role": self.role, "identity": self.identity, "file": name, "sha256": self.sha256,
                "size": [int(self.image.shape[1]), int(self.image.shape[0])]}

    def pil(self):
        from PIL import Image

        return Image.fromarray(self.image)


def _thumb(image: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).convert("L").resize((32, 32), Image.BILINEAR), np.float32)


def _resized(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size and image.shape[1] == size:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.LANCZOS))


def crop_geometry(ctx):
    """The preset's prepare crop (face size and eye height), as prepare itself reads it."""
    from portrait.stages.prepare import PreparePolicy

    section = ctx.preset.section("prepare")
    return PreparePolicy(**{k: section[k] for k in ("face_fraction", "eye_height") if k in section})


def identity_references(ctx, identity: Identity, count: int, size: int, face_backend: str) -> tuple[ReferencePicture, ...]:
    """Up to `count` aligned pictures of `identity`, best first, each `size` px square."""
    from portrait.core.faces import make_analyzer
    from portrait.core.formats.images import read_rgb
    from portrait.core.io import sha256_file
    from portrait.stages.prepare import align_crop

    if count < 1:
        raise BadInput(f"references: {count} asked; at least 1")
    if not identity.reference.is_file():
        raise BadInput(f"identity '{identity.name}': {identity.reference} is missing (re-run `portrait train`)")
    first = _resized(read_rgb(identity.reference), size)
    pictures = [ReferencePicture(identity.name, identity.reference, first, sha256_file(identity.reference))]
    thumbs = [_thumb(first)]
    hashes = {pictures[0].sha256}
    geometry = crop_geometry(ctx)
    analyzer = None
    for path in identity.photos:
        if len(pictures) >= count:
            break
        if not Path(path).is_file():
            continue
        digest = sha256_file(path)
        if digest in hashes:
            continue  # the same file again (a bundle whose reference is a kept photo as it is)
        analyzer = analyzer or make_analyzer(ctx, face_backend)
        photo = read_rgb(path)
        faces = analyzer.detect(photo, embed=False, max_faces=1)
        if not faces:
            continue
        crop, _ = align_crop(photo, faces[0].kps, size, geometry)
        thumb = _thumb(crop)
        if min(float(np.abs(thumb - t).mean()) for t in thumbs) < SAME_PHOTO:
            continue  # the reference photo again
        pictures.append(ReferencePicture(identity.name, Path(path), crop, digest))
        thumbs.append(thumb)
        hashes.add(digest)
    return tuple(pictures)


def group_references(ctx, identities: Sequence[Identity], count: int, size: int,
                     face_backend: str) -> tuple[tuple[ReferencePicture, ...], ...]:
    """Each identity's references (a group picture: one list per person, in order)."""
    return tuple(identity_references(ctx, person, count, size, face_backend) for person in identities)


def reference_size(request_width: int, request_height: int, asked: int, multiple: int = 16) -> int:
    """The side of the reference crops: `asked`, or (0) the output's shorter side, capped at 1024
    px (klein and Qwen-Image-Edit scale larger inputs down to about 1024 x 1024), in multiples
    of the model's patch grid, and at least MIN_SIDE (FLUX.2 refuses smaller pictures)."""
    side = asked or min(request_width, request_height, 1024)
    return max(MIN_SIDE, side // multiple * multiple)


def edit_pictures(edit: dict[str, Any], width: int, height: int, identity: str,
                  files: dict[str, str] | None = None) -> list[ReferencePicture]:
    """An edit's pictures: the image being edited (at the output's size) first, then the user's
    references (outfit, backdrop), their longer side at most the output's longer side. `files`
    maps the names the edit records to the files to read (Resolved.edit_files; a name it does
    not hold is the file's path)."""
    from PIL import Image

    from portrait.core.formats.images import read_rgb

    where = files or {}
    source = Path(where.get(edit["source"], edit["source"]))
    pixels = np.asarray(Image.fromarray(read_rgb(source)).resize((width, height), Image.LANCZOS))
    # each picture is recorded under the edit's own name for it
    pictures = [ReferencePicture(identity, Path(edit["source"]), _at_least(pixels), str(edit["source_sha256"]),
                                 "edit-source")]
    longest = max(width, height, 256)
    for row in edit.get("references") or ():
        file = Path(where.get(row["file"], row["file"]))
        image = read_rgb(file)
        h, w = image.shape[:2]
        if max(h, w) > longest:
            scale = longest / max(h, w)
            image = np.asarray(Image.fromarray(image).resize((max(16, round(w * scale)), max(16, round(h * scale))),
                                                             Image.LANCZOS))
        pictures.append(ReferencePicture("", Path(row["file"]), _at_least(image), str(row["sha256"]), "reference"))
    return pictures


# FLUX.2's image processor refuses a picture with a side under 64 px (Qwen-Image-Edit's VL
# processor needs 28 px): smaller ones are scaled up, keeping their aspect.
MIN_SIDE = 64


def _at_least(image: np.ndarray, side: int = MIN_SIDE) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    if min(h, w) >= side:
        return image
    scale = side / min(h, w)
    return np.asarray(Image.fromarray(image).resize((max(side, round(w * scale)), max(side, round(h * scale))),
                                                    Image.LANCZOS))


def edit_prompt(prompt: str, identity_images: Sequence[int]) -> str:
    """An edit's prompt: the user's instruction, then what must not change (image 1's person,
    the same as in the identity's pictures when they are shown too)."""
    also = ""
    if identity_images:
        numbers = ", ".join(str(i) for i in identity_images)
        also = f" (the same person as in image{'s' if len(identity_images) > 1 else ''} {numbers})"
    return f"{prompt.rstrip(' .')}. Keep the face and identity of the person in image 1{also} exactly."
