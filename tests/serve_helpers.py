"""Helpers for the service tests: homes that share the session's tiny models, sample uploads,
and a real `portrait serve` process on a free loopback port."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from portrait.core.config import Settings

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "outputs" / "test-artifacts" / "serve"


def service_home(tiny_home: Settings, folder: Path, preset: str = "tiny") -> Settings:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    return Settings(home=folder, preset=preset, device="cpu")


def two_tenant_studio(tiny_home: Settings, root: Path, preset: str = "tiny") -> dict:
    """A service on a tiny preset (default: the SD1.5 one) with two tenants (acme = "a", globex = "b": their auth headers),
    a FastAPI test client, the demo photos, and `drain()`, which runs the store's items in this
    process with the executor the server's workers use (so no test waits on a clock)."""
    from fastapi.testclient import TestClient

    from portrait.service.app import create_app
    from portrait.service.service import StudioService
    from portrait.service.workers import ProgressRecorder
    from portrait.studio.executor import FlowExecutor
    from portrait.studio.runner import LocalWorker

    settings = service_home(tiny_home, root / "home", preset)
    service = StudioService(settings)
    _, token_a = service.db.create_token("acme")
    _, token_b = service.db.create_token("globex")
    client = TestClient(create_app(service))
    executor = FlowExecutor(settings, progress=ProgressRecorder(service.store, 0.05))

    def drain() -> int:
        return LocalWorker(service.store, executor, service.studio_policy).run()

    return {"service": service, "client": client, "a": {"Authorization": f"Bearer {token_a}"},
            "b": {"Authorization": f"Bearer {token_b}"}, "drain": drain, "photos": sample_files(root / "photos"),
            "root": root, "settings": settings}


def sample_files(folder: Path) -> list[Path]:
    """The demo set: six astronaut shots, Hopper (other_person), a truncated JPEG (unreadable)."""
    from portrait.samples import write_sample_photos

    return write_sample_photos(folder)


def multipart(paths: list[Path], names: list[str] | None = None) -> list[tuple[str, tuple[str, bytes, str]]]:
    names = names or [p.name for p in paths]
    return [("files", (name, p.read_bytes(), "application/octet-stream")) for p, name in zip(paths, names)]


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


def chromium() -> str:
    """Debian's chromium for Playwright. Outside CI a machine without it skips the browser tests;
    in CI (CI=true) that is a failure, because `.ci/run` installs it."""
    import pytest

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("chromium is not installed; .ci/run installs Debian's `chromium` package")
    pytest.skip("chromium is not installed (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`portrait serve` as a child process (its own process group, so a test can SIGKILL it)."""

    def __init__(self, home: Path, port: int, workers: int = 1, log: Path | None = None, auth: str | None = "none",
                 env: dict[str, str] | None = None):
        self.home, self.port, self.workers, self.auth = home, port, workers, auth
        self.extra_env = dict(env or {})  # e.g. PORTRAIT_BACKENDS: a plugin backend in the server and its workers
        self.url = f"http://127.0.0.1:{port}"
        self.log = log or home / f"serve-{port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "Server":
        env = {**os.environ, "PORTRAIT_HOME": str(self.home), "PORTRAIT_PRESET": "tiny", "PORTRAIT_DEVICE": "cpu",
               "HF_HUB_OFFLINE": "1", **self.extra_env}
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "portrait.cli.main", "serve", "--port", str(self.port),
                                      "--workers", str(self.workers), "--threads", "1",
                                      *(["--auth", self.auth] if self.auth else [])],
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"portrait serve exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if self.get("/healthz").get("status") == "ok" and self.workers_alive() >= self.workers:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"portrait serve did not come up: {self.log.read_text()[-2000:]}")

    def workers_alive(self) -> int:
        """Worker processes started (spawned children; /healthz says only that the server is alive)."""
        count = 0
        for pid in self.worker_pids():
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    count += 1
            except OSError:
                continue
        return count

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(p) for p in children.read_text().split()] if children.exists() else []

    def kill9(self) -> None:
        """SIGKILL the server process only: its workers must die with it on their own."""
        workers = self.worker_pids()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), "a worker outlived the killed server"
        self._log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def request(self, method: str, path: str, body: dict | None = None, data: bytes | None = None,
                headers: dict | None = None) -> tuple[int, bytes]:
        headers = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get(self, path: str) -> dict:
        status, data = self.request("GET", path)
        if status != 200:
            raise OSError(f"GET {path}: {status} {data[:300]!r}")
        return json.loads(data)

    def post(self, path: str, body: dict) -> dict:
        status, data = self.request("POST", path, body)
        assert status in (200, 201, 202), (status, data[:500])
        return json.loads(data)

    def upload(self, name: str, paths: list[Path]) -> dict:
        from portrait.service.client import upload_body

        body, headers = upload_body(name, paths)
        status, data = self.request("POST", "/v1/identities", data=body, headers=headers)
        assert status == 201, (status, data[:500])
        return json.loads(data)

    def wait(self, job_id: str, until=lambda job: job["state"] in ("done", "failed"), timeout: float = 600.0,
             every: float = 0.1) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/v1/jobs/{job_id}")
            if until(job):
                return job
            time.sleep(every)
        raise TimeoutError(f"job {job_id}: {self.get(f'/v1/jobs/{job_id}')}")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"
