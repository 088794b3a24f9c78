"""The service under attack: each finding of issue 26 replayed as a hostile client, asserting
the refusal. Two tenants (acme = A, globex = B) share one server on the tiny preset.

1. B generates with A's identity (a group template's second face, faceid regions), and the
   outputs of a group picture survive the erasure of one of its people.
2. Request values become server paths (model overrides, pose and control images): a read of
   any file, and an oracle telling which files exist.
3. Revoking the last token switches authentication off.
4. The body is read before authentication.
5. One tenant floods the queue; no way to cancel.
6. One upload at a time for every tenant; /healthz shows every tenant's queue.
7. Values accepted at submit that fail in the worker; misleading messages for NaN and bad JSON.
8. /docs needs a CDN; /v1/jobs has no pages.

Plus the walk over every field of every request model: a foreign id in any of them is refused.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from serve_helpers import Server, free_port, multipart, service_home, two_tenant_studio

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def studio(tiny_home, tmp_path_factory):
    return two_tenant_studio(tiny_home, tmp_path_factory.mktemp("serve-attacks"))


def _identity(studio, headers, name, photos=None):
    client = studio["client"]
    response = client.post("/v1/identities", data={"name": name}, files=multipart(photos or studio["photos"]),
                           headers=headers)
    assert response.status_code == 201, response.text
    identity = response.json()
    job = client.post("/v1/jobs/train", json={"identity": identity["id"], "steps": 2}, headers=headers)
    assert job.status_code == 202, job.text
    return identity


@pytest.fixture(scope="module")
def people(studio):
    """A's alice, B's bob, both trained (2 steps)."""
    alice = _identity(studio, studio["a"], "alice")
    bob = _identity(studio, studio["b"], "bob")
    studio["drain"]()
    return {"alice": alice["id"], "bob": bob["id"]}


def _jobs(studio, headers) -> list[dict]:
    body = studio["client"].get("/v1/jobs", headers=headers).json()
    return body["jobs"] if isinstance(body, dict) else body


# -- 1. another tenant's face -----------------------------------------------------------------


def test_attack1_b_cannot_paint_a_face_of_a(studio, people):
    client, b = studio["client"], studio["b"]
    before = len(_jobs(studio, b))
    attempts = [
        # the finding, as it was sent: A's id inside the backend options of a group template
        {"identity": people["bob"], "template": "duo", "backend": "template",
         "options": {"identities": [people["alice"]], "passes": 0}},
        {"identity": people["bob"], "prompt": "two people", "backend": "faceid",
         "options": {"identities": [people["alice"]], "regions": [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]}},
        # the typed field for a second person: resolved in B's scope only
        {"identity": people["bob"], "template": "duo", "backend": "template", "with_identity": [people["alice"]],
         "options": {"passes": 0}},
    ]
    for body in attempts:
        response = client.post("/v1/jobs/generate", json=body, headers=b)
        assert response.status_code in (404, 422), (body, response.text)
        assert response.json()["reason"] in ("not_found", "bad_input")
    assert len(_jobs(studio, b)) == before  # nothing was queued


def test_attack1_a_group_picture_goes_with_either_person(studio, people):
    """The outputs that used a person (here: as the second face of a group picture) go when
    that person is erased, with every row naming them; the receipt says what went."""
    client, a, service = studio["client"], studio["a"], studio["service"]
    from portrait.samples import write_sample_photos

    other = write_sample_photos(studio["root"] / "hopper-photos", majority="hopper")
    carol = _identity(studio, a, "carol", other)
    studio["drain"]()
    job = client.post("/v1/jobs/generate", json={"identity": people["alice"], "with_identity": [carol["id"]],
                                                "template": "duo", "backend": "template", "options": {"passes": 0},
                                                "finish": False}, headers=a)
    assert job.status_code == 202, job.text
    studio["drain"]()
    done = client.get(f"/v1/jobs/{job.json()['id']}", headers=a).json()
    assert done["state"] == "done", done
    images = client.get(f"/v1/jobs/{done['id']}/results", headers=a).json()["images"]
    assert len(images) == 1
    receipt = client.delete(f"/v1/identities/{carol['id']}", headers=a)
    assert receipt.status_code == 200, receipt.text
    body = receipt.json()
    assert body["deleted"] == carol["id"] and body["removed"]["jobs"] == 2 and body["removed"]["images"] == 1
    assert body["removed"]["files"] > 0 and isinstance(body["time"], str)
    assert client.get(f"/v1/jobs/{done['id']}", headers=a).status_code == 404
    assert client.get(images[0]["url"], headers=a).status_code == 404
    home = studio["settings"].home
    assert [p for p in home.rglob("*") if carol["id"] in str(p) or done["id"] in str(p)] == []
    import sqlite3

    for db in (service.root / "service.db", service.root / "studio.db"):
        con = sqlite3.connect(db)
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            rows = [r for r in con.execute(f"SELECT * FROM {table}") if table != "audit"]
            assert not any(carol["id"] in json.dumps(r, default=str) for r in rows), (db.name, table)
        con.close()
    audit = client.get("/v1/audit", headers=a).json()["entries"]
    entry = next(e for e in audit if e["subject"] == carol["id"])
    assert entry["action"] == "delete_identity" and entry["counts"] == body["removed"]
    assert "carol" not in json.dumps(audit)  # ids and counts only: no names, no photos, no embeddings


# -- 2. request values as paths ------------------------------------------------------------------


def test_attack2_no_option_names_a_server_file(studio, people):
    client, b, service = studio["client"], studio["b"], studio["service"]
    lora = service.bundle_root(people["alice"]) / "lora.safetensors"
    assert lora.is_file()
    probes = ["../../../../etc/passwd", "/etc/passwd", "/nonexistent/x.bin", str(lora)]
    for backend, key in [("faceid", "faceid_model"), ("photomaker", "photomaker_model"), ("faceid", "face_pack"),
                         ("instantid", "pose_image"), ("infiniteyou", "control_image"), ("template", "identities")]:
        answers = set()
        for value in probes:
            response = client.post("/v1/jobs/generate", json={"identity": people["bob"], "prompt": "x",
                                                              "backend": backend, "options": {key: value}}, headers=b)
            assert response.status_code in (404, 422), (key, value, response.text)
            detail = response.json()["detail"]
            assert f"options.{key}" in detail, detail
            for leak in ("checkpoint", "no such file", "IP-Adapter", "passwd:", "Permission"):
                assert leak not in detail, detail
            answers.add((response.status_code, detail.replace(value, "VALUE")))
        assert len(answers) == 1, answers  # the same answer for a file that exists and one that does not
    # A photo the request needs comes from the tenant's own asset store, by id.
    photo = studio["photos"][0]
    asset = client.post("/v1/assets", files={"file": ("pose.jpg", photo.read_bytes(), "image/jpeg")}, headers=b)
    assert asset.status_code == 201, asset.text
    asset_id = asset.json()["id"]
    assert client.get(f"/v1/assets/{asset_id}", headers=studio["a"]).status_code == 404
    assert [x["id"] for x in client.get("/v1/assets", headers=b).json()] == [asset_id]
    foreign = client.post("/v1/jobs/generate", json={"identity": people["alice"], "template": "hopper",
                                                     "backend": "template",
                                                     "options": {"passes": 0}, "template_photo": asset_id},
                          headers=studio["a"])
    assert foreign.status_code == 404 and "template_photo" in foreign.json()["detail"], foreign.text
    assert client.delete(f"/v1/assets/{asset_id}", headers=studio["a"]).status_code == 404
    # B's own photo as a photo template: resolved to B's stored file, painted with B's identity.
    own = client.post("/v1/jobs/generate", json={"identity": people["bob"], "template_photo": asset_id,
                                                 "backend": "template", "options": {"passes": 0}, "finish": False},
                      headers=b)
    assert own.status_code == 202, own.text
    assert own.json()["params"]["template_photo"] == asset_id  # the id, never the server's path
    busy = client.delete(f"/v1/assets/{asset_id}", headers=b)
    assert busy.status_code == 409 and own.json()["id"] in busy.json()["detail"]
    studio["drain"]()
    made = client.get(f"/v1/jobs/{own.json()['id']}/results", headers=b).json()
    assert made["job"]["state"] == "done" and len(made["images"]) == 1, made["job"]
    assert client.delete(f"/v1/assets/{asset_id}", headers=b).status_code == 200
    assert client.get(f"/v1/assets/{asset_id}", headers=b).status_code == 404


# -- 3. revoking the last token ---------------------------------------------------------------------


def test_attack3_revoking_every_token_never_opens_the_server(tiny_home, tmp_path):
    from fastapi.testclient import TestClient

    from portrait.service.app import create_app
    from portrait.service.service import StudioService

    service = StudioService(service_home(tiny_home, tmp_path / "home"))
    _, token = service.db.create_token("acme")
    client = TestClient(create_app(service))
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/v1/me", headers=headers).json()["tenant"] == "acme"
    assert service.db.revoke_tokens("acme") == 1
    for h in ({}, headers):
        response = client.get("/v1/me", headers=h)
        assert response.status_code == 401, response.text
        assert client.get("/v1/identities", headers=h).status_code == 401
    # A server in tokens mode that never had a token lets nobody in either.
    empty = TestClient(create_app(StudioService(service_home(tiny_home, tmp_path / "empty"))))
    assert empty.get("/v1/me").status_code == 401


def test_attack3_auth_none_is_loopback_only(tmp_path, capsys):
    from portrait.cli.main import run

    assert run(["--home", str(tmp_path), "serve", "--host", "0.0.0.0", "--auth", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--auth none" in err[0] and "loopback" in err[0]


# -- 4. the body before authentication ---------------------------------------------------------------


def _raw(port: int, head: bytes, body: bytes = b"", wait: float = 20.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(head + body)
        s.settimeout(wait)
        return s.recv(65536)


def test_attack4_no_token_no_body_read(tiny_home, tmp_path):
    settings = service_home(tiny_home, tmp_path / "home")
    from portrait.service.tenants import TenantDB

    TenantDB(settings.home / "service" / "service.db").create_token("acme")
    server = Server(settings.home, free_port(), auth=None).start()  # tokens: the default
    try:
        # 200 MB announced, 64 kB sent: the answer comes from the headers, before the body.
        head = (b"POST /v1/identities HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 200000000\r\n\r\n")
        started = time.monotonic()
        answer = _raw(server.port, head, b"x" * 65536)
        assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
        assert time.monotonic() - started < 15
        # With a token, a body over the limit is refused from its Content-Length.
        token = TenantDB(settings.home / "service" / "service.db").create_token("acme")[1]
        head = (b"POST /v1/identities HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token.encode() +
                b"\r\nContent-Type: multipart/form-data; boundary=b\r\nContent-Length: 900000000\r\n\r\n")
        assert _raw(server.port, head).startswith(b"HTTP/1.1 413")
    finally:
        server.stop()


# -- 5. floods, quotas, cancel and retry ---------------------------------------------------------------


def test_attack5_a_flood_is_refused_at_submit_and_a_job_can_be_cancelled(studio, people):
    client, a, service = studio["client"], studio["a"], studio["service"]
    before = service.store.counts()["pending"]
    flood = client.post("/v1/jobs/batch", json={"identities": [people["alice"]],
                                               "prompts": [f"prompt {i}" for i in range(100)], "count": 64},
                        headers=a)
    assert flood.status_code == 429 and flood.json()["reason"] == "quota", flood.text
    assert "max_queued_items" in flood.json()["detail"]
    assert service.store.counts()["pending"] == before  # nothing of it was queued
    job = client.post("/v1/jobs/generate", json={"identity": people["alice"], "template": "business", "count": 3,
                                                "steps": 2}, headers=a)
    assert job.status_code == 202
    job_id = job.json()["id"]
    assert client.delete(f"/v1/jobs/{job_id}", headers=studio["b"]).status_code == 404
    cancelled = client.delete(f"/v1/jobs/{job_id}", headers=a)
    assert cancelled.status_code == 200, cancelled.text
    view = client.get(f"/v1/jobs/{job_id}", headers=a).json()
    assert view["state"] == "cancelled" and view["progress"]["items"]["pending"] == 0
    assert client.post(f"/v1/jobs/{job_id}/retry", headers=studio["b"]).status_code == 404
    retried = client.post(f"/v1/jobs/{job_id}/retry", headers=a)
    assert retried.status_code == 200 and retried.json()["state"] == "queued", retried.text
    client.delete(f"/v1/jobs/{job_id}", headers=a)


def _worker(studio):
    """A service worker (the server's kind: cancellable items, progress written) in a thread."""
    from portrait.service.workers import ProgressRecorder, ServiceWorker
    from portrait.studio.executor import FlowExecutor
    from portrait.studio.store import WorkerId

    service = studio["service"]
    stop = threading.Event()
    executor = FlowExecutor(studio["settings"], progress=ProgressRecorder(service.store, 0.01))
    worker = ServiceWorker(service.store, executor, service.studio_policy, None, stop=stop,
                           worker=WorkerId.current("test"))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return stop, thread


def _until(check, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise TimeoutError(check)


def test_attack5_cancel_stops_running_work_at_its_next_step(studio, people):
    client, a, service = studio["client"], studio["a"], studio["service"]
    job = client.post("/v1/jobs/generate", json={"identity": people["alice"], "template": "business", "count": 2,
                                                "steps": 60, "size": [64, 64], "finish": False}, headers=a).json()
    stop, thread = _worker(studio)
    try:
        _until(lambda: (client.get(f"/v1/jobs/{job['id']}", headers=a).json()["progress"]["phase"] == "denoise"))
        cancelled = client.delete(f"/v1/jobs/{job['id']}", headers=a)
        assert cancelled.status_code == 200
        view = _until(lambda: (v := client.get(f"/v1/jobs/{job['id']}", headers=a).json())["state"] == "cancelled"
                      and v)
        assert view["progress"]["items"]["cancelled"] == 2 and view["progress"]["items"]["done"] == 0, view
        outputs = service.job_root(job["id"])
        assert not outputs.exists() or [p for p in outputs.rglob("*") if p.is_file()] == []  # nothing half-written
        # Retry runs it again, to the end.
        assert client.post(f"/v1/jobs/{job['id']}/retry", headers=a).json()["state"] in ("queued", "running")
        done = _until(lambda: (v := client.get(f"/v1/jobs/{job['id']}", headers=a).json())["state"] == "done" and v,
                      300)
        assert done["progress"]["items"]["done"] == 2
        assert len(client.get(f"/v1/jobs/{job['id']}/results", headers=a).json()["images"]) == 2
        # A training cancelled mid-steps keeps no checkpoint and can be trained again.
        from portrait.samples import write_sample_photos

        dora = client.post("/v1/identities", data={"name": "dora"},
                           files=multipart(write_sample_photos(studio["root"] / "dora", majority="hopper")),
                           headers=a).json()
        train = client.post("/v1/jobs/train", json={"identity": dora["id"], "steps": 400}, headers=a).json()
        _until(lambda: client.get(f"/v1/jobs/{train['id']}", headers=a).json()["progress"]["step"] >= 2)
        client.delete(f"/v1/jobs/{train['id']}", headers=a)
        _until(lambda: client.get(f"/v1/jobs/{train['id']}", headers=a).json()["state"] == "cancelled")
        home = studio["settings"].identities_dir
        assert not (home / f".{dora['id']}.work").exists() and not (home / dora["id"]).exists()
        assert client.get(f"/v1/identities/{dora['id']}", headers=a).json()["state"] == "prepared"
        client.delete(f"/v1/identities/{dora['id']}", headers=a)
    finally:
        stop.set()
        thread.join(60)


# -- 6. uploads in parallel, /healthz ---------------------------------------------------------------


def test_attack6_one_upload_does_not_hold_another_tenants(studio, monkeypatch):
    """A's upload is held inside the photo check; B's upload still completes."""
    import portrait.flows.prepare as prepare_flow

    client = studio["client"]
    real = prepare_flow.prepare
    gate, entered = threading.Event(), threading.Event()

    calls: list[int] = []

    def slow(photos, out, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first photo check (A's) is held until B's upload is through
            entered.set()
            assert gate.wait(120)
        return real(photos, out, **kwargs)

    monkeypatch.setattr(prepare_flow, "prepare", slow)
    results: dict[str, int] = {}

    def upload(key: str, name: str) -> None:
        response = client.post("/v1/identities", data={"name": name}, files=multipart(studio["photos"]),
                               headers=studio[key])
        results[key] = response.status_code

    first = threading.Thread(target=upload, args=("a", "held"), name="upload-a")
    first.start()
    try:
        assert entered.wait(60)
        second = threading.Thread(target=upload, args=("b", "free"), name="upload-b")
        second.start()
        second.join(60)
        assert results.get("b") == 201, results  # B did not wait for A
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
    finally:
        gate.set()
        first.join(120)
    assert results["a"] == 201


# -- 7. checked at submit ------------------------------------------------------------------------------


@pytest.mark.parametrize("change, status, needle", [
    ({"size": [100000, 100000]}, 422, "size"),
    ({"size": [-64, 64]}, 422, "size"),
    ({"finish": {"retuch": True}}, 422, "finish"),
    ({"backend": "instantid", "prompt": "x", "template": None}, 422, "preset 'tiny' is sd15"),
    ({"steps": 100000}, 422, "steps"),
    ({"count": 100000}, 422, "count"),
    ({"options": {"ip_adapter_scale": 99}, "backend": "faceid"}, 422, "options.ip_adapter_scale"),
])
def test_attack7_bad_values_are_refused_at_submit(studio, people, change, status, needle):
    client, a = studio["client"], studio["a"]
    before = len(_jobs(studio, a))
    body = {"identity": people["alice"], "template": "business", **change}
    response = client.post("/v1/jobs/generate", json={k: v for k, v in body.items() if v is not None}, headers=a)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"], response.text
    assert len(_jobs(studio, a)) == before


def test_attack7_nan_and_bad_json_get_clear_words(studio, people):
    client, a = studio["client"], studio["a"]
    raw = '{"identity": "%s", "template": "business", "guidance": NaN}' % people["alice"]
    response = client.post("/v1/jobs/generate", content=raw, headers={**a, "Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"].startswith("guidance: NaN"), response.text
    raw = '{"identity": "%s", "options": {"ip_adapter_scale": Infinity}, "prompt": "x"}' % people["alice"]
    response = client.post("/v1/jobs/generate", content=raw, headers={**a, "Content-Type": "application/json"})
    assert response.status_code == 422 and "options.ip_adapter_scale: Infinity" in response.json()["detail"]
    response = client.post("/v1/jobs/generate", content='{"identity": "x",, }',
                           headers={**a, "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert detail.startswith("the request body is not valid JSON") and "line 1 column" in detail, detail


# -- 8. docs offline, pages of jobs ---------------------------------------------------------------------


def test_attack8_docs_work_offline_and_jobs_come_in_pages(studio, people):
    client, a = studio["client"], studio["a"]
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "http://" not in page.text.replace("http://127.0.0.1", "") and "https://" not in page.text
    assert "/v1/jobs/{job_id}/retry" in page.text and "GenerateRequest" in page.text
    for i in range(5):
        client.post("/v1/jobs/generate", json={"identity": people["alice"], "template": "business", "steps": 2,
                                              "seed": 100 + i}, headers=a)
    seen, cursor, pages = [], None, 0
    while True:
        query = "/v1/jobs?limit=2" + (f"&after={cursor}" if cursor else "")
        body = client.get(query, headers=a).json()
        assert len(body["jobs"]) <= 2
        seen += [j["id"] for j in body["jobs"]]
        pages += 1
        cursor = body["next"]
        if cursor is None:
            break
    assert pages >= 3 and len(seen) == len(set(seen)) == len(_all_jobs(studio))
    assert client.get(f"/v1/jobs?after={seen[0]}", headers=studio["b"]).status_code == 404  # a cursor is an id, scoped
    for job in seen:
        client.delete(f"/v1/jobs/{job}", headers=a)


def _all_jobs(studio) -> list[dict]:
    return studio["client"].get("/v1/jobs?limit=1000", headers=studio["a"]).json()["jobs"]


# -- every field of every request model -------------------------------------------------------------------


def test_a_foreign_id_in_any_field_of_any_request_is_refused(studio, people):
    """Walk the request models: each field is either a scoped reference (identity, job, asset;
    a foreign id answers 404 naming the field) or a value that is never an id of anything
    (checked: the foreign id there gets a refusal or is only text, and no job uses it)."""
    from portrait.service import requests as api

    client, b = studio["client"], studio["b"]
    foreign = people["alice"]
    base = {"TrainRequest": {"identity": people["bob"]},
            "GenerateRequest": {"identity": people["bob"], "template": "business", "steps": 2},
            "BatchRequest": {"identities": [people["bob"]], "templates": ["business"], "steps": 2},
            "ShootRequest": {"identity": people["bob"], "package": "corporate", "backdrops": ["grey"],
                             "outfits": ["navy-suit"], "poses": ["front"], "steps": 2},
            "EditRequest": {"identity": people["bob"], "result": "0" * 16, "prompt": "a grey backdrop"}}
    routes = {"TrainRequest": "/v1/jobs/train", "GenerateRequest": "/v1/jobs/generate",
              "BatchRequest": "/v1/jobs/batch", "ShootRequest": "/v1/jobs/shoot", "EditRequest": "/v1/jobs/edit"}
    assert set(api.REQUEST_MODELS) == set(routes), "a new request model needs its route here"
    checked = 0
    for name, model in api.REQUEST_MODELS.items():
        for field, kind in api.reference_fields(model).items():
            value = [foreign] if api.is_list(model, field) else foreign
            body = {**base[name], field: value}
            response = client.post(routes[name], json=body, headers=b)
            assert response.status_code == 404, (name, field, response.text)
            assert response.json()["field"].split(".")[0] == field, response.text
            checked += 1
        for field in api.free_fields(model):
            # A value field holding the foreign id, in each shape a field can take: refused,
            # or taken as a value (text) that no job resolves to anyone.
            for value in (foreign, [foreign], {foreign: foreign}, [foreign, foreign]):
                response = client.post(routes[name], json={**base[name], field: value}, headers=b)
                if response.status_code < 300:
                    job = response.json()
                    assert foreign not in job["identities"], (name, field, value)
                    client.delete(f"/v1/jobs/{job['id']}", headers=b)
                else:
                    assert response.status_code in (400, 404, 409, 422), (name, field, response.text)
                checked += 1
    options = api.tenant_option_fields()
    for key, kind in options.items():
        if kind != "asset":
            continue
        response = client.post("/v1/jobs/generate", json={**base["GenerateRequest"], "options": {key: foreign}},
                               headers=b)
        assert response.status_code == 404 and response.json()["field"] == f"options.{key}", response.text
        checked += 1
    assert checked >= 100
    # No job of B uses A's identity (text fields may hold the id as text: a prompt is text).
    leaked = [j["id"] for j in _jobs(studio, b) if foreign in j["identities"]]
    assert leaked == [], leaked


def test_no_stage_opens_an_identity_by_name():
    """Backends get group members as loaded Identity values (GenerationRequest.people) from the
    flow, which the service feeds from tenant-scoped handles: a stage that called load_identity
    with a name from the request's options would reopen finding 1 (klein-ref and qwen-edit did,
    before this test)."""
    from pathlib import Path
    stages = Path(__file__).resolve().parents[1] / "portrait" / "stages"
    offenders = sorted(str(p.relative_to(stages)) for p in stages.rglob("*.py") if "load_identity" in p.read_text())
    assert offenders == []
