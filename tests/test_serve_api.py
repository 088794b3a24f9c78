"""The service's HTTP API through FastAPI's test client: every endpoint, tenant isolation,
names and upload file names that try to escape, upload limits, and delete erasing everything.

Jobs run in this process: `drain()` runs the store's items with the same executor the
server's workers use, so no test waits on a clock."""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest

from serve_helpers import multipart, service_home, two_tenant_studio, zip_bytes

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def studio(tiny_home, tmp_path_factory):
    return two_tenant_studio(tiny_home, tmp_path_factory.mktemp("serve-api"))


@pytest.fixture(scope="module")
def alice(studio):
    """Tenant A's identity, uploaded with a file name that tries to escape and a text file named .jpg."""
    client, photos = studio["client"], studio["photos"]
    names = [p.name for p in photos]
    names[0] = "../../../escaped.png"  # astronaut_bright.jpg under a traversal name
    files = multipart(photos, names) + [("files", ("notes.jpg", b"not a photo at all", "image/jpeg"))]
    response = client.post("/v1/identities", data={"name": "alice"}, files=files, headers=studio["a"])
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="module")
def trained(studio, alice):
    client = studio["client"]
    response = client.post("/v1/jobs/train", json={"identity": alice["id"], "steps": 2}, headers=studio["a"])
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued" and job["kind"] == "train"  # returned at once, before it runs
    studio["drain"]()
    return job


@pytest.fixture(scope="module")
def generated(studio, alice, trained):
    client = studio["client"]
    response = client.post("/v1/jobs/generate", json={"identity": alice["id"], "template": "business", "count": 2,
                                                      "seed": 3, "steps": 2}, headers=studio["a"])
    assert response.status_code == 202, response.text
    studio["drain"]()
    return response.json()


def test_upload_reports_each_photo_with_the_clis_reasons(studio, alice):
    rows = {row["path"]: row for row in alice["report"]["photos"]}
    assert rows["escaped.png"]["status"] == "kept"  # only the last part of a name is a label
    assert rows["hopper.jpg"] == {**rows["hopper.jpg"], "status": "rejected", "reason": "other_person"}
    assert rows["IMG_broken.jpg"]["reason"] == "unreadable"
    assert rows["notes.jpg"]["reason"] == "unreadable" and rows["notes.jpg"]["detail"] == "not an image file"
    assert alice["report"]["kept"] == 6 and alice["report"]["rejected"] == 3 and alice["state"] == "prepared"
    # Nothing was written where the name pointed; stored files are named by position.
    root = studio["root"]
    assert not list(root.rglob("escaped.png")) and not (root.parent / "escaped.png").exists()
    stored = sorted(p.name for p in (studio["service"].identity_root(alice["id"]) / "uploads").iterdir())
    assert len(stored) == 8 and all(re.fullmatch(r"\d{3}\.(png|jpg)", n) for n in stored), stored
    sheet = studio["client"].get(alice["contact_sheet"], headers=studio["a"])
    assert sheet.status_code == 200 and sheet.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_identity_list_and_show(studio, alice):
    client = studio["client"]
    listed = client.get("/v1/identities", headers=studio["a"]).json()
    assert [i["id"] for i in listed] == [alice["id"]] and listed[0]["name"] == "alice"
    shown = client.get(f"/v1/identities/{alice['id']}", headers=studio["a"]).json()
    assert shown["report"] == alice["report"]


def test_train_job_progress_and_summary(studio, alice, trained):
    client = studio["client"]
    job = client.get(f"/v1/jobs/{trained['id']}", headers=studio["a"]).json()
    assert job["state"] == "done" and job["progress"]["fraction"] == 1.0
    assert job["progress"]["step"] == job["progress"]["total"] == 2 and job["error"] is None
    results = client.get(f"/v1/jobs/{trained['id']}/results", headers=studio["a"]).json()
    assert results["train"]["steps"] == 2 and results["train"]["lora"] == ["sd15"]
    identity = client.get(f"/v1/identities/{alice['id']}", headers=studio["a"]).json()
    assert identity["state"] == "ready" and identity["trained"]["lora"] == ["sd15"]
    # the likeness curve of training (issue 28): step 0 is the base model, then each validation
    curve = identity["trained"]["curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 2 and identity["trained"]["stopped_early"] is False
    again = client.post("/v1/jobs/train", json={"identity": alice["id"]}, headers=studio["a"])
    assert again.status_code == 409 and again.json()["reason"] == "busy"


def test_generate_results_images_zip_and_events(studio, alice, generated):
    client, a = studio["client"], studio["a"]
    results = client.get(f"/v1/jobs/{generated['id']}/results", headers=a).json()
    assert results["job"]["state"] == "done" and results["job"]["progress"]["step"] == 2
    images = results["images"]
    assert [im["rank"] for im in images] == [1, 2] and sorted(im["seed"] for im in images) == [3, 4]
    sims = [im["similarity"] for im in images]
    # measured where a face was found, null (ranked last) where none was: the tiny models paint noise
    assert all(isinstance(im["similarity"], float) if im["faces"] else im["similarity"] is None for im in images)
    measured = [s for s in sims if s is not None]
    assert measured == sorted(measured, reverse=True) and sims == measured + [None] * (len(sims) - len(measured))
    assert all(isinstance(im["passed_gate"], bool) and "Seed: " in im["parameters"] for im in images)
    assert all("_path" not in im for im in images)
    png = client.get(images[0]["url"], headers=a)
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"/v1/jobs/{generated['id']}/zip", headers=a).content))
    names = sorted(archive.namelist())
    assert len([n for n in names if n.endswith(".png")]) == 2 and "results.json" in names
    assert [r["rank"] for r in json.loads(archive.read("results.json"))["results"]] == [1, 2]
    with client.stream("GET", f"/v1/jobs/{generated['id']}/events", headers=a) as stream:
        text = "".join(stream.iter_text())
    events = [block for block in text.split("\n\n") if block.strip()]
    assert events[0].startswith("event: progress") and json.loads(events[0].split("data: ", 1)[1])["state"] == "done"
    assert events[-1].startswith("event: end")
    jobs = client.get("/v1/jobs", headers=a).json()["jobs"]
    assert {j["id"] for j in jobs} >= {generated["id"]} and all(j["state"] == "done" for j in jobs)


def test_batch_spec_job(studio, alice, trained):
    client = studio["client"]
    response = client.post("/v1/jobs/batch", json={"identities": [alice["id"]], "prompts": ["a photo of {trigger} {class}"],
                                                  "backends": ["lora"], "count": 1, "seed": 9, "steps": 2,
                                                  "finish": False}, headers=studio["a"])
    assert response.status_code == 202, response.text
    studio["drain"]()
    results = client.get(f"/v1/jobs/{response.json()['id']}/results", headers=studio["a"]).json()
    assert results["job"]["kind"] == "batch" and len(results["images"]) == 1
    assert results["images"][0]["prompt"] == "a photo of {trigger} {class}"


def test_another_tenant_gets_404_for_everything_and_sees_nothing(studio, alice, generated, trained):
    client, b = studio["client"], studio["b"]
    results = client.get(f"/v1/jobs/{generated['id']}/results", headers=studio["a"]).json()
    image = results["images"][0]["url"]
    gid, iid, tid = generated["id"], alice["id"], trained["id"]
    history = [r["id"] for r in client.get(f"/v1/identities/{iid}/results", headers=studio["a"]).json()["results"]]
    assert history  # the generate job's images, in alice's history
    for method, path, body in [
        ("GET", f"/v1/identities/{iid}", None), ("GET", f"/v1/identities/{iid}/contact-sheet", None),
        ("DELETE", f"/v1/identities/{iid}", None), ("POST", "/v1/jobs/train", {"identity": iid}),
        ("POST", "/v1/jobs/generate", {"identity": iid, "template": "business"}),
        ("POST", "/v1/jobs/batch", {"identities": [iid], "templates": ["business"]}),
        ("GET", f"/v1/jobs/{gid}", None), ("GET", f"/v1/jobs/{tid}", None), ("GET", f"/v1/jobs/{gid}/events", None),
        ("GET", f"/v1/jobs/{gid}/results", None), ("GET", image, None), ("GET", f"/v1/jobs/{gid}/zip", None),
        # issue 30: the identity's results history, its photos, a shoot
        ("GET", f"/v1/identities/{iid}/results", None), ("GET", f"/v1/identities/{iid}/photos/0", None),
        ("GET", f"/v1/identities/{iid}/results/{history[0]}/image", None),
        ("POST", f"/v1/identities/{iid}/results/star", {"ids": history}),
        ("POST", f"/v1/identities/{iid}/results/zip", {"ids": history}),
        ("POST", f"/v1/identities/{iid}/results/delete", {"ids": history}),
        ("POST", "/v1/jobs/shoot", {"identity": iid, "package": "corporate", "backdrops": ["grey"]}),
    ]:
        response = client.request(method, path, json=body, headers=b)
        assert response.status_code == 404 and response.json()["reason"] == "not_found", (method, path, response.text)
    assert client.get("/v1/identities", headers=b).json() == []
    assert client.get("/v1/jobs", headers=b).json() == {"jobs": [], "next": None}
    me = client.get("/v1/me", headers=b).json()
    assert {k: me[k] for k in ("tenant", "auth")} == {"tenant": "globex", "auth": True}
    # A still has everything.
    assert client.get(f"/v1/identities/{iid}", headers=studio["a"]).status_code == 200
    assert client.get(f"/v1/identities/{iid}/results", headers=studio["a"]).json()["total"] == len(history)
    for headers in ({}, {"Authorization": "Bearer pt_not-a-real-token"}, {"Authorization": "Basic abc"}):
        response = client.get("/v1/identities", headers=headers)
        assert response.status_code == 401 and "portrait serve token create" in response.json()["detail"]


def test_names_and_templates_cannot_reach_files(studio, alice, trained):
    client, a = studio["client"], studio["a"]
    photo = studio["photos"][1]
    for name in ["../../etc", "a/b", ".hidden", ""]:
        response = client.post("/v1/identities", data={"name": name}, files=multipart([photo]), headers=a)
        assert response.status_code in (400, 422) and response.json()["reason"] == "bad_input", (name, response.text)
    assert not (studio["root"] / "etc").exists()
    for template in ["../../../etc/passwd", "/etc/passwd", str(photo.parent)]:
        response = client.post("/v1/jobs/generate", json={"identity": alice["id"], "template": template}, headers=a)
        assert response.status_code == 422 and "unknown template" in response.json()["detail"], template
        assert response.json()["field"] == "template"
    for bad_id in ["..", "..%2F..%2Fetc", "i" + "0" * 16]:
        assert client.get(f"/v1/identities/{bad_id}", headers=a).status_code == 404
    response = client.post("/v1/jobs/generate", json={"identity": alice["id"], "template": "business", "count": 0},
                           headers=a)
    assert response.status_code == 422 and response.json()["reason"] == "bad_input"
    response = client.post("/v1/jobs/generate", json={"identity": alice["id"], "backend": "nope", "prompt": "x"},
                           headers=a)
    assert response.status_code == 422 and "unknown backend 'nope'" in response.json()["detail"]


def test_catalogue_health_and_docs(studio):
    client, a = studio["client"], studio["a"]
    templates = {t["name"]: t for t in client.get("/v1/templates", headers=a).json()}
    assert templates["hopper"]["kind"] == "photo" and templates["business"]["kind"] == "style"
    photo = client.get(templates["hopper"]["preview"], headers=a)
    card = client.get(templates["business"]["preview"], headers=a)
    assert photo.headers["content-type"] == "image/jpeg" and photo.content[:2] == b"\xff\xd8"
    assert card.headers["content-type"] == "image/png" and card.content[:4] == b"\x89PNG"
    assert client.get("/v1/templates/../../etc/preview", headers=a).status_code == 404
    presets = {p["name"]: p for p in client.get("/v1/presets", headers=a).json()}
    assert presets["tiny"]["tiny"] is True and presets["sdxl"]["family"] == "sdxl"
    shown = client.get("/v1/presets/sd15", headers=a).json()
    rank = next(row for row in shown["sections"]["train"] if row["key"] == "rank")
    assert (rank["type"], rank["default"], rank["bounds"], rank["value"]) == ("int", 32, ">= 1", 64)
    from portrait.preset_schema import show

    assert shown == show("sd15")  # the same document `portrait presets show sd15 --json` prints
    for name in ("nope", "..%2F..%2Fetc%2Fx.yaml", "%2Ftmp%2Fx.yaml"):
        assert client.get(f"/v1/presets/{name}", headers=a).status_code == 404
    models = {m["id"]: m for m in client.get("/v1/models", headers=a).json()}
    assert models and all({"present", "license", "size_mb"} <= set(m) for m in models.values())
    assert client.get("/healthz").json() == {"status": "ok"}  # alive, and nothing about anyone's queue
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/identities", "/v1/jobs/{job_id}/events", "/v1/jobs/{job_id}/zip", "/v1/models",
            "/v1/presets/{name}"} <= set(paths)
    page = client.get("/")
    assert page.status_code == 200 and "portrait studio" in page.text and "/static/app.js" in page.text
    assert client.get("/static/app.js").status_code == 200


def _png(width: int, height: int, value: int = 128) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def strict(studio):
    """The same home behind a second app with tight limits (checked before prepare runs)."""
    from fastapi.testclient import TestClient

    from portrait.service.app import create_app
    from portrait.service.policy import ServicePolicy
    from portrait.service.service import StudioService

    service = StudioService(studio["service"].settings,
                            policy=ServicePolicy(max_file_bytes=400_000, max_files=8, max_pixels=1_000_000,
                                                 max_request_bytes=3_000_000, max_zip_ratio=50.0, max_zip_members=20))
    return TestClient(create_app(service))


def test_upload_limits_give_per_file_reasons(studio, strict):
    a = studio["a"]
    noise = np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)
    from PIL import Image

    big = io.BytesIO()
    Image.fromarray(noise).save(big, "PNG")  # ~480 kB of incompressible pixels
    assert len(big.getvalue()) > 400_000
    bomb = zip_bytes({"zeros.jpg": b"\0" * 300_000})  # 300 kB of zeros in ~300 bytes: ratio ~1000:1
    traversal = zip_bytes({"../../outside.png": _png(300, 300), "/abs.png": _png(300, 300),
                           "C:\\win.png": _png(300, 300), "ok/inner.png": _png(256, 256, 90)}, zipfile.ZIP_STORED)
    files = [("files", ("huge.png", big.getvalue(), "image/png")),
             ("files", ("wide.png", _png(1100, 1000), "image/png")),
             ("files", ("bomb.zip", bomb, "application/zip")),
             ("files", ("pics.zip", traversal, "application/zip"))]
    response = strict.post("/v1/identities", data={"name": "limits"}, files=files, headers=a)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["reason"] == "bad_input" and body["detail"].startswith("only 0 usable photo(s)")
    rows = {row["path"]: row for row in body["report"]["photos"]}
    assert rows["huge.png"]["reason"] == "too_large" and "byte limit" in rows["huge.png"]["detail"]
    assert rows["wide.png"]["reason"] == "too_large" and "pixel limit" in rows["wide.png"]["detail"]
    assert rows["bomb.zip::zeros.jpg"]["reason"] == "too_large" and "compression ratio" in rows["bomb.zip::zeros.jpg"]["detail"]
    assert {rows[k]["reason"] for k in ("pics.zip::../../outside.png", "pics.zip::/abs.png", "pics.zip::C:\\win.png")} \
        == {"unsafe_name"}
    assert rows["pics.zip::inner.png"]["reason"] == "no_face"  # extracted under a safe name, then prepared
    root = studio["root"]
    assert not list(root.rglob("outside.png")) and not Path("/abs.png").exists()
    # Nothing of a refused upload is kept: every identity folder belongs to a created identity.
    known = {i["id"] for i in studio["client"].get("/v1/identities", headers=a).json()}
    assert {p.name for p in (studio["service"].root / "identities").iterdir()} <= known


def test_upload_count_request_size_and_bombs_refuse_the_whole_upload(studio, strict):
    a = studio["a"]
    nine = [("files", (f"p{i}.png", _png(200, 200, i), "image/png")) for i in range(9)]
    response = strict.post("/v1/identities", data={"name": "many"}, files=nine, headers=a)
    assert response.status_code == 400 and response.json()["detail"] == "9 photos given; the limit is 8"
    blob = b"x" * 3_100_000
    response = strict.post("/v1/identities", data={"name": "huge"}, files=[("files", ("a.jpg", blob, "image/jpeg"))],
                           headers=a)
    assert response.status_code == 413 and response.json()["reason"] == "too_large"
    expands = zip_bytes({f"z{i}.jpg": b"\0" * 400_000 for i in range(9)})  # 3.6 MB declared > 8 x 400 kB
    response = strict.post("/v1/identities", data={"name": "bomb"}, files=[("files", ("b.zip", expands, "application/zip"))],
                           headers=a)
    assert response.status_code == 400 and "zip bomb" in response.json()["detail"]
    members = zip_bytes({f"d{i}/": b"" for i in range(25)})
    response = strict.post("/v1/identities", data={"name": "dirs"}, files=[("files", ("d.zip", members, "application/zip"))],
                           headers=a)
    assert response.status_code == 400 and "25 entries" in response.json()["detail"]


def test_delete_erases_everything_of_the_identity(studio, alice, generated):
    client, a, service = studio["client"], studio["a"], studio["service"]
    home = service.settings.home
    store_jobs = [j.store_job for j in service.db.jobs(service.db.tenant_for_token(a["Authorization"][7:]).id)]
    assert any(alice["id"] in str(p) for p in home.rglob("*"))
    response = client.delete(f"/v1/identities/{alice['id']}", headers=a)
    assert response.status_code == 200, response.text
    assert response.json()["jobs_deleted"] >= 3 and response.json()["files_removed"] > 10
    leftovers = [p for p in home.rglob("*") if alice["id"] in str(p) or generated["id"] in str(p)]
    assert leftovers == []
    assert service.store.status(store_jobs).items == ()
    assert client.get(f"/v1/identities/{alice['id']}", headers=a).status_code == 404
    assert client.get(f"/v1/jobs/{generated['id']}", headers=a).status_code == 404
    assert client.get("/v1/identities", headers=a).json() == []
    assert client.get("/v1/jobs", headers=a).json()["jobs"] == []
    assert response.json()["removed"]["images"] >= 3  # the generate job's 2 and the batch job's 1


def test_cli_stores_tokens_hashed_and_tenant_settings_checked(tmp_path, capsys):
    from portrait.cli.main import run

    assert run(["--home", str(tmp_path), "serve", "token", "create", "acme"]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("pt_") and len(token) > 40
    db = tmp_path / "service" / "service.db"
    raw = b"".join(p.read_bytes() for p in db.parent.glob("service.db*"))
    assert token.encode() not in raw
    assert run(["--home", str(tmp_path), "serve", "token", "create", "../x"]) == 2
    assert run(["--home", str(tmp_path), "serve", "token", "list"]) == 0
    assert "acme\t1 token(s)" in capsys.readouterr().out
    assert run(["--home", str(tmp_path), "serve", "tenant", "set", "acme", "max_queued_items=10", "photos_days=7"]) == 0
    capsys.readouterr()
    assert run(["--home", str(tmp_path), "serve", "tenant", "show", "acme"]) == 0
    shown = capsys.readouterr().out
    assert "max_queued_items\t10\t(tenant)" in shown and "photos_days\t7.0\t(tenant)" in shown
    assert "max_active_jobs\t20\t(preset)" in shown
    assert run(["--home", str(tmp_path), "serve", "tenant", "set", "acme", "max_queued_items=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max_queued_items" in err[0] and "greater than or equal to 1" in err[0], err
    assert run(["--home", str(tmp_path), "serve", "tenant", "set", "acme", "frobnicate=1"]) == 2
    assert run(["--home", str(tmp_path), "serve", "tenant", "set", "nobody", "photos_days=1"]) == 2


def test_without_tokens_one_local_tenant_needs_no_header(tiny_home, tmp_path):
    from fastapi.testclient import TestClient

    from portrait.service.app import create_app
    from portrait.service.service import StudioService

    client = TestClient(create_app(StudioService(service_home(tiny_home, tmp_path / "home")), auth="none"))
    me = client.get("/v1/me").json()
    assert {k: me[k] for k in ("tenant", "auth")} == {"tenant": "local", "auth": False}
    assert client.get("/v1/identities").json() == []


def test_retention_erases_photos_then_results_with_receipts_in_the_audit_log(studio):
    """photos_days: the identity's photos and all cut from them go, its results stay; outputs_days:
    the results go. Each erasure leaves a receipt in the tenant's audit log (ids and counts)."""
    client, a, service = studio["client"], studio["a"], studio["service"]
    response = client.post("/v1/identities", data={"name": "kept"}, files=multipart(studio["photos"]), headers=a)
    identity = response.json()
    client.post("/v1/jobs/train", json={"identity": identity["id"], "steps": 2}, headers=a)
    studio["drain"]()
    job = client.post("/v1/jobs/generate", json={"identity": identity["id"], "template": "business", "steps": 2,
                                                "finish": False}, headers=a).json()
    studio["drain"]()
    tenant = service.db.tenant_for_token(a["Authorization"][7:]).id
    service.db.set_tenant_settings("acme", {"photos_days": 7, "outputs_days": 30})
    created = service.db.identity(tenant, identity["id"]).created
    assert [r for r in service.sweep(now=created + 6 * 86400) if r["deleted"] == identity["id"]] == []
    receipts = service.sweep(now=created + 8 * 86400)
    mine = [r for r in receipts if r["deleted"] == identity["id"]]
    assert len(mine) == 1 and mine[0]["action"] == "retention_photos" and mine[0]["removed"]["files"] > 5
    shown = client.get(f"/v1/identities/{identity['id']}", headers=a).json()
    assert shown["state"] == "expired" and shown["report"]["photos"] == []
    assert not service.identity_root(identity["id"]).exists() and not service.bundle_root(identity["id"]).exists()
    assert client.post("/v1/jobs/generate", json={"identity": identity["id"], "template": "business"},
                       headers=a).status_code == 409
    results = client.get(f"/v1/jobs/{job['id']}/results", headers=a).json()["images"]
    assert len(results) == 1 and client.get(results[0]["url"], headers=a).status_code == 200  # results outlive photos
    receipts = service.sweep(now=created + 31 * 86400)
    assert any(r["deleted"] == job["id"] and r["action"] == "retention_outputs" for r in receipts)
    assert client.get(f"/v1/jobs/{job['id']}", headers=a).status_code == 404
    assert not service.job_root(job["id"]).exists()
    audit = client.get("/v1/audit", headers=a).json()["entries"]
    assert {(e["action"], e["subject"]) for e in audit} >= {("retention_photos", identity["id"]),
                                                           ("retention_outputs", job["id"])}
    assert "kept" not in json.dumps(audit)
    service.db.set_tenant_settings("acme", {"photos_days": None, "outputs_days": None})
    assert client.delete(f"/v1/identities/{identity['id']}", headers=a).status_code == 200
