"""The web page's "Edit" on a portrait (issue 29), in a real headless Chromium, against
`portrait serve` on the tiny FLUX.2 [klein] preset: the portrait's Edit button opens the edit
box for that portrait, a prompt and a backdrop picture are sent (the picture as an asset), the
job is followed, and the edit arrives in the identity's results under an edit job, its chain
naming the portrait it came from. A server whose preset has no edit model shows no Edit button
(tests/test_studio_browser.py runs on such a server)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from serve_helpers import Server, chromium, free_port, sample_files

pytest.importorskip("playwright")


@pytest.mark.slow
def test_a_portrait_is_edited_from_the_page(tiny_home, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    executable = chromium()
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    photos = [p for p in sample_files(tmp_path / "photos") if p.name.startswith("astronaut")]
    backdrop = tmp_path / "beach.png"
    Image.new("RGB", (160, 120), (230, 200, 120)).save(backdrop)
    server = Server(home, free_port(), env={"PORTRAIT_PRESET": "tiny-flux2-klein"}).start()
    try:
        who = server.upload("ana", photos)["id"]
        server.wait(server.post("/v1/jobs/train", {"identity": who, "zero_shot": True})["id"])
        made = server.wait(server.post("/v1/jobs/generate", {
            "identity": who, "prompt": "portrait photo of {trigger} {class}", "backend": "klein-ref", "steps": 2,
            "seed": 3, "finish": {"upscale": False}})["id"])
        assert made["state"] == "done", made
        (source,) = server.get(f"/v1/identities/{who}/results")["results"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.set_default_timeout(300_000)
            expect.set_options(timeout=300_000)
            page.goto(server.url)
            page.click(f"#identities li[data-id='{who}']")
            figure = page.locator(f"#results figure[data-id='{source['id']}']")
            expect(figure).to_be_visible()
            figure.locator("button.edit").click()
            expect(page.locator("#edit-box")).to_be_visible()
            expect(page.locator("#edit-title")).to_have_text("Edit this portrait of ana")
            page.click("#edit-button")  # no prompt yet: the page asks for one and sends nothing
            expect(page.locator("#message")).to_contain_text("Say what to change")
            page.fill("#edit-prompt", "a sunny beach behind her")
            page.set_input_files("#edit-references", [str(backdrop)])
            page.screenshot(path=str(tmp_path / "edit-box.png"), full_page=True)
            page.click("#edit-button")
            expect(page.locator("#edit-status")).to_contain_text("Done: the edit of ana's portrait", timeout=300_000)
            edits = page.locator("#results section.job-results figure")
            expect(edits).to_have_count(1)
            heading = page.locator("#results section.job-results h4").first
            expect(heading).to_contain_text("edit")
            expect(page.locator("#results .cell h5").first).to_have_text("Edited: “a sunny beach behind her”")
            page.screenshot(path=str(tmp_path / "edit-done.png"), full_page=True)
            browser.close()
        jobs = [j for j in server.get("/v1/jobs")["jobs"] if j["kind"] == "edit"]
        assert len(jobs) == 1 and jobs[0]["state"] == "done" and jobs[0]["params"]["result"] == source["id"]
        assert jobs[0]["params"]["prompt"] == "a sunny beach behind her" and len(jobs[0]["params"]["references"]) == 1
        (edited,) = server.get(f"/v1/identities/{who}/results?job={jobs[0]['id']}")["results"]
        status, data = server.request("GET", edited["url"])
        assert status == 200
        import io

        with Image.open(io.BytesIO(data)) as im:
            step = json.loads(im.text["portrait"])["request"]["options"]["edit"]
        assert step["source"] == f"result {source['id']}" and step["prompt"] == "a sunny beach behind her"
    finally:
        server.stop()
