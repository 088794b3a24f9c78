"""Durability of `portrait serve`: SIGKILL the server in the middle of a training and of a
generation job, start it again, and every job finishes exactly once (training resumes from
its checkpoint; each image is written once, no staging files left)."""

from __future__ import annotations

import pytest

from serve_helpers import Server, free_port, sample_files, service_home

pytest.importorskip("fastapi")


@pytest.mark.slow
def test_sigkill_during_training_and_generation_then_restart(tiny_home, tmp_path):
    settings = service_home(tiny_home, tmp_path / "home")
    photos = sample_files(tmp_path / "photos")
    port = free_port()
    server = Server(settings.home, port).start()
    try:
        identity = server.upload("carol", photos)
        # 8 steps with a checkpoint every 4 (tiny preset): kill once step 5 has started.
        job = server.post("/v1/jobs/train", {"identity": identity["id"], "steps": 8})
        seen = server.wait(job["id"], until=lambda j: j["progress"]["step"] >= 5 or j["state"] != "running"
                           and j["state"] != "queued")
        assert seen["state"] == "running", seen
        server.kill9()

        server = Server(settings.home, port).start()
        done = server.wait(job["id"])
        assert done["state"] == "done", done
        shown = server.get(f"/v1/identities/{identity['id']}")
        assert shown["state"] == "ready" and shown["trained"]["steps"] == 8
        assert shown["trained"]["resumed_from"] >= 4  # continued from the checkpoint, not from step 0
        items = server.get(f"/v1/jobs/{job['id']}")["progress"]["items"]
        assert items == {"pending": 0, "running": 0, "done": 1, "failed": 0, "cancelled": 0, "total": 1}

        gen = server.post("/v1/jobs/generate", {"identity": identity["id"], "template": "business", "count": 4,
                                                "seed": 11, "steps": 2})
        seen = server.wait(gen["id"], until=lambda j: j["progress"]["items"]["done"] >= 1 or j["state"] == "failed")
        assert seen["state"] == "running" and seen["progress"]["items"]["done"] < 4, seen
        server.kill9()

        server = Server(settings.home, port).start()
        done = server.wait(gen["id"])
        assert done["state"] == "done" and done["progress"]["items"]["done"] == 4, done
        results = server.get(f"/v1/jobs/{gen['id']}/results")
        assert sorted(im["seed"] for im in results["images"]) == [11, 12, 13, 14]
        outputs = settings.home / "service" / "jobs" / gen["id"]
        pngs = sorted(p.relative_to(outputs).as_posix() for p in outputs.rglob("*.png"))
        assert len(pngs) == 4 and len(set(pngs)) == 4, pngs
        assert [p for p in settings.home.rglob("*") if "staging" in p.name] == []
        assert not (settings.identities_dir / f".{identity['id']}.work").exists()
        # Exactly once: the store ran each image to `done` once (a killed attempt is re-queued, not duplicated).
        from portrait.studio.store import Store

        rows = Store(settings.home / "service" / "studio.db").status().items
        assert len(rows) == 5 and all(r.state == "done" for r in rows)
        assert all(len(r.outputs) == 1 for r in rows)
    finally:
        server.stop()
