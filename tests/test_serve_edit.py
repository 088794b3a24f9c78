"""POST /v1/jobs/edit (issue 29): a tenant edits one of its identity's results on a server whose
preset has an edit model (the tiny FLUX.2 [klein] stand-in here); the edit is re-scored and
gated by the edit flow, lands in the identity's results history, and its edit chain names the
source and references by result and asset id, never by a server path. Every id in the body is
resolved in the tenant's scope."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from serve_helpers import multipart, two_tenant_studio

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def klein(tiny_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-edit")
    studio = two_tenant_studio(tiny_home, root, preset="tiny-flux2-klein")
    client, a, b, drain, photos = studio["client"], studio["a"], studio["b"], studio["drain"], studio["photos"]

    def person(headers, name):
        response = client.post("/v1/identities", data={"name": name}, files=multipart(photos), headers=headers)
        assert response.status_code == 201, response.text
        identity = response.json()["id"]
        job = client.post("/v1/jobs/train", json={"identity": identity, "zero_shot": True}, headers=headers)
        assert job.status_code == 202, job.text
        return identity

    ana, bea = person(a, "ana"), person(b, "bea")
    drain()
    for who, headers in ((ana, a), (bea, b)):
        job = client.post("/v1/jobs/generate", json={"identity": who, "prompt": "portrait photo of {trigger} {class}",
                                                     "backend": "klein-ref", "steps": 2, "seed": 3,
                                                     "finish": {"upscale": False}}, headers=headers)
        assert job.status_code == 202, job.text
    drain()
    results = {who: client.get(f"/v1/identities/{who}/results", headers=h).json()["results"]
               for who, h in ((ana, a), (bea, b))}
    assert all(len(rows) == 1 for rows in results.values()), results
    backdrop = root / "backdrop.png"
    Image.new("RGB", (128, 96), (40, 120, 200)).save(backdrop)
    asset = client.post("/v1/assets", files={"file": ("backdrop.png", backdrop.read_bytes(), "image/png")}, headers=a)
    assert asset.status_code == 201, asset.text
    return {"client": client, "a": a, "b": b, "drain": drain, "ana": ana, "bea": bea, "root": root,
            "result": {ana: results[ana][0]["id"], bea: results[bea][0]["id"]}, "asset": asset.json()["id"]}


def test_an_edit_of_a_result_is_rescored_kept_in_the_history_and_names_no_server_path(klein):
    client, a, ana = klein["client"], klein["a"], klein["ana"]
    source = klein["result"][ana]
    body = {"identity": ana, "result": source, "prompt": "a sunny beach behind her", "references": [klein["asset"]],
            "steps": 2, "seed": 11, "count": 2}
    job = client.post("/v1/jobs/edit", json=body, headers=a)
    assert job.status_code == 202, job.text
    job = job.json()
    assert job["kind"] == "edit" and job["progress"]["items"]["total"] == 2
    klein["drain"]()
    done = client.get(f"/v1/jobs/{job['id']}/results", headers=a).json()
    assert done["job"]["state"] == "done", json.dumps(client.get(f"/v1/jobs/{job['id']}", headers=a).json())[:3000]
    assert len(done["images"]) == 2 and {im["backend"] for im in done["images"]} == {"klein-ref"}
    history = client.get(f"/v1/identities/{ana}/results?job={job['id']}", headers=a).json()
    assert history["total"] == 2 and history["jobs"][job["id"]]["kind"] == "edit"
    row = history["results"][0]
    assert row["scores"] and row["similarity_space"]  # re-scored against the identity
    image = client.get(row["url"], headers=a)
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"
    import io

    with Image.open(io.BytesIO(image.content)) as im:
        chunk = json.loads(im.text["portrait"])
    step = chunk["request"]["options"]["edit"]
    assert step["source"] == f"result {source}" and step["prompt"] == "a sunny beach behind her"
    assert [r["file"] for r in step["references"]] == [f"asset {klein['asset']}"]
    assert step["source_request"]["backend"] == "klein-ref" and len(step["chain"]) == 1
    # what the tenant reads holds no server path: not the job's view, not the image's chunks (the
    # model file, the references: reduced to file names as the service hands the PNG out)
    with Image.open(io.BytesIO(image.content)) as im:
        texts = json.dumps(dict(im.text))
    assert "/tmp/" not in texts and str(klein["root"]) not in texts and str(klein["root"]) not in json.dumps(done)
    zipped = client.post(f"/v1/identities/{ana}/results/zip", json={"ids": [row["id"]]}, headers=a)
    assert zipped.status_code == 200 and str(klein["root"]).encode() not in zipped.content
    # an edit of the edit extends the chain
    again = client.post("/v1/jobs/edit", json={"identity": ana, "result": row["id"], "prompt": "evening light",
                                               "steps": 2}, headers=a)
    assert again.status_code == 202, again.text
    klein["drain"]()
    (last,) = client.get(f"/v1/identities/{ana}/results?job={again.json()['id']}", headers=a).json()["results"]
    with Image.open(io.BytesIO(client.get(last["url"], headers=a).content)) as im:
        chain = json.loads(im.text["portrait"])["request"]["options"]["edit"]["chain"]
    assert [c["prompt"] for c in chain] == ["a sunny beach behind her", "evening light"]
    assert chain[1]["source"] == f"result {row['id']}"


@pytest.mark.parametrize("change, status, field", [
    ({"identity": "ANA"}, 404, "identity"),  # A's identity, asked by B
    ({"result": "BEA_RESULT_OF_A"}, 404, "result"),  # A's result under B's own identity
    ({"references": ["ASSET"]}, 404, "references"),  # A's asset
    ({"result": "../../etc/passwd"}, 422, "result"),
    ({"backend": "lora"}, 422, "backend"),
    ({"backend": "qwen-edit"}, 422, "backend"),  # an edit model this preset does not run
    ({"prompt": "   "}, 422, "prompt"),
    ({"options": {"faceid_model": "/etc/passwd"}}, 422, "options"),
])
def test_edit_requests_are_checked_in_the_tenants_scope(klein, change, status, field):
    client, b = klein["client"], klein["b"]
    ana, bea = klein["ana"], klein["bea"]
    values = {"ANA": ana, "BEA_RESULT_OF_A": klein["result"][ana], "ASSET": klein["asset"]}
    change = {k: ([values.get(x, x) for x in v] if isinstance(v, list) else values.get(v, v) if isinstance(v, str)
                  else v) for k, v in change.items()}
    body = {"identity": bea, "result": klein["result"][bea], "prompt": "a grey backdrop", "steps": 2, **change}
    response = client.post("/v1/jobs/edit", json=body, headers=b)
    assert response.status_code == status, response.text
    detail = response.json()
    assert (detail.get("field") or "").split(".")[0] == field or field in json.dumps(detail), detail
    assert str(klein["root"]) not in response.text


def test_a_server_without_an_edit_model_says_so(tiny_home, tmp_path):
    studio = two_tenant_studio(tiny_home, tmp_path)
    client, a = studio["client"], studio["a"]
    response = client.post("/v1/identities", data={"name": "cy"}, files=multipart(studio["photos"]), headers=a)
    who = response.json()["id"]
    client.post("/v1/jobs/train", json={"identity": who, "zero_shot": True}, headers=a)
    studio["drain"]()
    response = client.post("/v1/jobs/edit", json={"identity": who, "result": "0" * 16, "prompt": "beach"}, headers=a)
    assert response.status_code == 422 and response.json()["field"] == "backend", response.text
    assert "has no edit model" in response.text and "klein" in response.text
