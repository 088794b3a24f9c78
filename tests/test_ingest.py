"""Ingest: formats, conversions, guards and duplicates on real package photos."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from portrait.core.errors import BadInput
from portrait.core.io import sha256_file
from portrait.samples import exif_rotated_jpeg, write_sample_photos
from portrait.stages.ingest import IngestPolicy, ingest, perceptual_hash, hamming


def _save(path, image, fmt, **options):
    Image.fromarray(image).save(path, format=fmt, **options)
    return path


def _reasons(result):
    return {r.source.rsplit("/", 1)[-1]: r.reason for r in result.rejected}


def test_sample_set_decodes_upright_and_untouched(tmp_path):
    paths = write_sample_photos(tmp_path / "photos")
    before = {p: sha256_file(p) for p in paths}
    result = ingest([tmp_path / "photos"])
    assert len(result.photos) == len(paths) - 1
    assert _reasons(result) == {"IMG_broken.jpg": "unreadable"}
    assert {p: sha256_file(p) for p in paths} == before
    for photo in result.photos:
        assert photo.image.dtype == np.uint8 and photo.image.ndim == 3 and photo.image.shape[2] == 3


def test_exif_orientation_is_applied(tmp_path, astronaut):
    crop = np.ascontiguousarray(astronaut[0:300, 0:400])
    (tmp_path / "rot.jpg").write_bytes(exif_rotated_jpeg(crop, quality=95))
    with Image.open(tmp_path / "rot.jpg") as raw:
        assert raw.size == (300, 400)  # stored sideways
    photo = ingest([tmp_path / "rot.jpg"]).photos[0]
    assert photo.image.shape == crop.shape
    assert np.abs(photo.image.astype(int) - crop).mean() < 6


def test_cmyk_jpeg_becomes_rgb_with_the_right_colors(tmp_path, astronaut):
    cmyk = Image.fromarray(astronaut).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    photo = ingest([tmp_path / "cmyk.jpg"]).photos[0]
    assert photo.image.shape == astronaut.shape
    assert np.abs(photo.image.astype(int) - astronaut).mean() < 8


def test_16_bit_png_is_scaled_not_clipped(tmp_path, astronaut):
    gray = np.asarray(Image.fromarray(astronaut).convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    Image.fromarray(gray).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I")
    photo = ingest([tmp_path / "deep.png"]).photos[0]
    assert np.abs(photo.image[:, :, 0].astype(int) - gray // 257).max() <= 1
    assert photo.image[:, :, 0].max() > 200  # clipping would leave everything at 255 or scaled to dark


def test_alpha_is_composited_on_white(tmp_path, astronaut):
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    rgba[:, :100, 3] = 0
    _save(tmp_path / "alpha.png", rgba, "PNG")
    photo = ingest([tmp_path / "alpha.png"]).photos[0]
    assert (photo.image[:, :100] == 255).all()
    assert np.array_equal(photo.image[:, 100:], astronaut[:, 100:])


def test_palette_and_grayscale(tmp_path, astronaut):
    Image.fromarray(astronaut).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(astronaut).convert("L").save(tmp_path / "gray.bmp")
    Image.fromarray(astronaut).save(tmp_path / "a.webp", quality=90)
    Image.fromarray(astronaut).save(tmp_path / "a.tiff")
    photos = ingest([tmp_path / "pal.png", tmp_path / "gray.bmp", tmp_path / "a.webp", tmp_path / "a.tiff"],
                    IngestPolicy(duplicate_bits=-1)).photos
    assert len(photos) == 4 and all(p.image.shape == astronaut.shape for p in photos)


def test_bad_files_get_stable_reasons(tmp_path, astronaut, hopper):
    (tmp_path / "notes.jpg").write_text("this is not a photo\n")
    data = io.BytesIO()
    Image.fromarray(astronaut).save(data, format="JPEG", quality=90)
    (tmp_path / "truncated.jpg").write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
    _save(tmp_path / "tiny.png", astronaut[:100, :100], "PNG")
    _save(tmp_path / "big.png", hopper, "PNG")  # 512x600 = 307,200 px
    result = ingest([tmp_path / "notes.jpg", tmp_path / "truncated.jpg", tmp_path / "tiny.png", tmp_path / "big.png"],
                    IngestPolicy(max_pixels=300_000))
    assert _reasons(result) == {"notes.jpg": "unreadable", "truncated.jpg": "unreadable", "tiny.png": "too_small",
                                "big.png": "too_large"}
    assert not result.photos


def test_duplicates_keep_the_biggest(tmp_path, astronaut, hopper):
    _save(tmp_path / "a.png", astronaut, "PNG")
    (tmp_path / "a_copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    small = np.asarray(Image.fromarray(astronaut).resize((300, 300)))
    _save(tmp_path / "a_small_q60.jpg", small, "JPEG", quality=60)
    _save(tmp_path / "hopper.jpg", hopper, "JPEG", quality=90)
    result = ingest([tmp_path])
    assert _reasons(result) == {"a_copy.png": "duplicate", "a_small_q60.jpg": "duplicate"}
    assert sorted(p.source.rsplit("/", 1)[-1] for p in result.photos) == ["a.png", "hopper.jpg"]
    assert hamming(perceptual_hash(astronaut), perceptual_hash(hopper)) > 10


def test_zip_archives_and_hidden_files(tmp_path, astronaut, hopper):
    folder = tmp_path / "in"
    folder.mkdir()
    _save(folder / ".hidden.png", astronaut, "PNG")
    buffer = io.BytesIO()
    Image.fromarray(astronaut).save(buffer, format="PNG")
    with zipfile.ZipFile(folder / "photos.zip", "w") as zf:
        zf.writestr("me/astronaut.png", buffer.getvalue())
        zf.writestr("__MACOSX/._astronaut.png", b"junk")
        zf.writestr("readme.txt", b"hi")
    _save(folder / "hopper.jpg", hopper, "JPEG")
    result = ingest([folder])
    assert sorted(p.source.split("/in/", 1)[-1] for p in result.photos) == ["hopper.jpg", "photos.zip::me/astronaut.png"]


def test_missing_input_and_empty_folder_are_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        ingest([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="no image files"):
        ingest([tmp_path / "empty"])
