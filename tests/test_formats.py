"""One reader and one writer per format (portrait/core/formats, portrait/core/bundle.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from portrait.core.errors import BadInput
from portrait.core.formats.images import read_rgb, thumbnail_bytes, write_image
from portrait.core.formats.lora import read_lora_file, read_safetensors, write_lora_file, write_safetensors
from portrait.core.formats.results import read_results, results_document, results_row
from portrait.core.formats.sheet import FaceBox, Tile, write_contact_sheet
from portrait.core.types import Candidate, CandidateScore, GenerationRequest, RankedResult


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- images ----------------------------------------------------------------------------------


def test_read_rgb_applies_the_exif_orientation(tmp_path):
    from PIL import Image

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "side.jpg", exif=exif.tobytes(), quality=100)
    upright = read_rgb(tmp_path / "side.jpg")
    assert upright.shape == (40, 20, 3) and upright.dtype == np.uint8
    assert upright[5, 10, 0] > 200 and upright[35, 10, 0] < 60  # the red half is now on top


def test_read_rgb_converts_to_rgb_and_names_a_bad_file(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((8, 8), 7, np.uint8), mode="L").save(tmp_path / "grey.png")
    assert read_rgb(tmp_path / "grey.png").shape == (8, 8, 3)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(BadInput, match=r"bad\.png: unreadable image"):
        read_rgb(tmp_path / "bad.png")
    with pytest.raises(BadInput, match=r"gone\.png: no such file"):
        read_rgb(tmp_path / "gone.png")


def test_write_image_is_atomic_and_round_trips(tmp_path, astronaut):
    path = write_image(tmp_path / "a.png", astronaut[:32, :48], {"source": "x"})
    assert np.array_equal(read_rgb(path), astronaut[:32, :48])
    assert _leftovers(tmp_path) == []
    import io

    from PIL import Image

    with Image.open(path) as im:
        assert im.text["source"] == "x"

    with Image.open(io.BytesIO(thumbnail_bytes(path, 16, "PNG"))) as thumb:
        assert max(thumb.size) == 16


# --- LoRA files -------------------------------------------------------------------------------


def test_lora_files_round_trip_bit_for_bit(tmp_path):
    import torch

    gen = torch.Generator().manual_seed(0)
    state = {"unet": {"a.lora_A.weight": torch.randn(4, 8, generator=gen)},
             "text_encoder": {"b.lora_B.weight": torch.randn(8, 4, generator=gen)}}
    path = write_lora_file(tmp_path / "lora.safetensors", state)
    back = read_lora_file(path)
    assert set(back) == {"unet", "text_encoder"}
    assert torch.equal(back["unet"]["a.lora_A.weight"], state["unet"]["a.lora_A.weight"])
    assert set(read_safetensors(path)) == {"unet.a.lora_A.weight", "text_encoder.b.lora_B.weight"}
    # the same state always gives the same bytes (a resumed run compares files)
    again = write_safetensors(tmp_path / "again.safetensors", {f"{c}.{k}": v for c, p in state.items() for k, v in p.items()})
    assert again.read_bytes() == path.read_bytes()
    assert _leftovers(tmp_path) == []


def test_checkpoints_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    import torch

    from portrait.stages.train_state import completed_checkpoints, save_checkpoint

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    synced: list[str] = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    target = save_checkpoint(tmp_path, 4, {"unet": {"w": torch.ones(2)}}, optimizer, schedule, [0.5, 0.25], [0.0])
    names = {Path(p).name for p in synced}
    assert {"lora.safetensors", "state.pt", "meta.json"} <= names  # every file
    assert str(target.parent) in synced  # the checkpoints folder after the rename
    assert any(Path(p).name.startswith(".step-000004.") for p in synced)  # the staged folder itself
    (record,) = completed_checkpoints(tmp_path)
    assert record.step == 4 and record.loss == pytest.approx(0.375)


# --- results.json -----------------------------------------------------------------------------

# The fields of a results.json row as `portrait generate` writes them: unchanged by issue 14
# (issue 30 added face_quality, the subject face crop's sharpness and exposure --keep checks).
ROW_FIELDS = ["path", "seed", "rank", "similarity", "passed_gate", "timings", "reference_similarity", "clip_t",
              "faces", "face_scores", "info", "similarity_space", "scores", "copy_paste", "face_quality"]


def _ranked(tmp_path: Path) -> RankedResult:
    request = GenerationRequest(identity=None, backend="lora", template=None, prompt="p", negative_prompt="",
                                width=64, height=64, steps=2, guidance=1.0, scheduler="euler", seed=5, n=1)
    candidate = Candidate(np.zeros((8, 8, 3), np.uint8), 5, request, {"generate": 0.123456}, {"note": 1})
    score = CandidateScore(similarity=0.812345, reference_similarity=0.5, faces=1, face_size=0.2, clip_t=None)
    return RankedResult(candidate, score, 1, True, tmp_path / "x_5.png")


def test_results_rows_keep_the_fields_generate_writes(tmp_path):
    row = results_row(_ranked(tmp_path))
    assert list(row) == ROW_FIELDS
    assert row["path"] == "x_5.png" and row["similarity"] == 0.8123 and row["timings"] == {"generate": 0.1235}
    document = results_document("x", "lora", None, [_ranked(tmp_path)], {"seed": 5}, {"versions": {}})
    assert list(document) == ["identity", "backend", "template", "results", "request", "versions"]
    (tmp_path / "results.json").write_text(json.dumps(document))
    assert read_results(tmp_path / "results.json")["results"][0]["seed"] == 5


def test_read_results_refuses_what_is_not_one(tmp_path):
    (tmp_path / "other.json").write_text('{"photos": []}')
    with pytest.raises(BadInput, match=r"other\.json: not a portrait results\.json"):
        read_results(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(BadInput, match=r"broken\.json: unreadable results file"):
        read_results(tmp_path / "broken.json")


# --- contact sheets ---------------------------------------------------------------------------


def test_one_contact_sheet_writer_draws_both_layouts(tmp_path, astronaut):
    white, green = (255, 255, 255), (0, 200, 0)
    tiles = [Tile(astronaut[:64, :48], (("a.jpg", white),), band=green, boxes=(FaceBox((4, 4, 20, 20), green),)),
             Tile(None, (("broken.jpg", white),), band=(170, 40, 40))]
    prepare_like = write_contact_sheet(tmp_path / "p.png", tiles, thumb=32, columns=6, caption_h=30, gap=0,
                                       background=(40, 40, 40), enlarge=True)
    sheet = read_rgb(prepare_like)
    assert sheet.shape == (32 + 30, 2 * 32, 3)
    assert (sheet[32:] == green).all(-1).any()  # the kept band
    results_like = write_contact_sheet(tmp_path / "r.png", tiles[:1] * 3, thumb=16, columns=2)
    assert read_rgb(results_like).shape == (2 * (16 + 44 + 8) + 8, 2 * (16 + 8) + 8, 3)
    assert _leftovers(tmp_path) == []


# --- the identity bundle ----------------------------------------------------------------------


def test_bundle_writer_and_reader_agree(tmp_path, astronaut, hopper):
    import torch

    from portrait.core.bundle import BundleLora, load_identity, read_manifest, update_manifest, write_bundle
    from portrait.core.config import Settings

    settings = Settings(home=tmp_path / "home", preset="tiny", device="cpu")
    root = settings.identities_dir / "ann"
    photo = tmp_path / "p.jpg"
    write_image(photo, hopper[:64, :64])
    lora = BundleLora("sd15", {"unet": {"down.to_q.lora_A.weight": torch.ones(2, 4)}}, rank=2, alpha=1.0,
                      base_model="tiny-sd15", row={"text_encoder": False})
    write_bundle(root, {"name": "ann", "trigger": "sks", "class_word": "woman", "preset": "tiny"},
                 reference=astronaut[:64, :64], photos=[photo, astronaut[:32, :32]],
                 embeddings={"dlib": np.ones(128)}, report={"photos": []}, lora=lora)
    update_manifest(root, bom=[{"id": "tiny-sd15"}])
    identity = load_identity(settings, "ann")
    assert identity.photos == (root / "photos/000.jpg", root / "photos/001.png")
    assert np.array_equal(read_rgb(identity.reference), astronaut[:64, :64])
    assert identity.consensus["dlib"].dtype == np.float32 and identity.consensus["dlib"].shape == (128,)
    assert identity.loras["sd15"].rank == 2 and identity.loras["sd15"].base_model == "tiny-sd15"
    assert identity.loras["sd15"].kohya_path is None  # no kohya metadata given: no A1111 copy
    assert set(read_safetensors(identity.loras["sd15"].path)) == {"unet.down.to_q.lora_A.weight"}
    manifest = read_manifest(root)
    assert manifest["format"] == 1 and manifest["bom"] == [{"id": "tiny-sd15"}] and manifest["loras"]["sd15"]["text_encoder"] is False
    assert json.loads((root / "report.json").read_text()) == {"photos": []}


def test_an_unreadable_manifest_is_one_line(tmp_path):
    from portrait.core.bundle import read_manifest

    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BadInput, match=r"manifest\.json: unreadable manifest \(not a JSON object\)"):
        read_manifest(tmp_path)


# --- SQLite and the service client -------------------------------------------------------------


def test_one_sqlite_helper(tmp_path):
    from portrait.core.db import connect

    with connect(tmp_path / "a.db", synchronous="FULL") as con:
        assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert con.execute("PRAGMA busy_timeout").fetchone()[0] == 60000
        con.execute("CREATE TABLE t (x)")
        con.execute("INSERT INTO t VALUES (1)")  # autocommit: visible to the next connection
    with connect(tmp_path / "a.db") as con:
        assert con.execute("SELECT x FROM t").fetchone()["x"] == 1
    with pytest.raises(ValueError, match="synchronous"):
        with connect(tmp_path / "a.db", synchronous="full; DROP TABLE t"):
            pass


def test_upload_body_parses_as_multipart(tmp_path):
    from python_multipart import MultipartParser  # the parser the service uses (python-multipart)

    from portrait.service.client import upload_body

    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8abc\r\n--x")
    body, headers = upload_body("ann", [tmp_path / "a.jpg"])
    boundary = headers["Content-Type"].split("boundary=")[1]
    parts = {}
    current = {}

    def on_part_begin():
        current.clear()
        current["data"] = b""

    def on_part_data(data, start, end):
        current["data"] += data[start:end]

    def on_header_value(data, start, end):
        current.setdefault("headers", b"")
        current["headers"] += data[start:end]

    def on_part_end():
        parts[current["headers"].split(b'name="')[1].split(b'"')[0].decode()] = current["data"]

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_part_data": on_part_data,
                                        "on_header_value": on_header_value, "on_part_end": on_part_end})
    parser.write(body)
    assert parts == {"name": b"ann", "files": b"\xff\xd8abc\r\n--x"}


def test_image_size_is_the_upright_size_the_reader_returns(tmp_path):
    from PIL import Image

    from portrait.core.formats.images import image_size, read_rgb

    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter: upright it is taller than wide
    path = tmp_path / "sideways.jpg"
    Image.new("RGB", (300, 200), (10, 20, 30)).save(path, exif=exif)
    assert image_size(path) == (200, 300)
    assert read_rgb(path).shape[:2] == (300, 200)  # rows = height
    plain = tmp_path / "plain.png"
    Image.new("RGB", (300, 200)).save(plain)
    assert image_size(plain) == (300, 200)
