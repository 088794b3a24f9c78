"""Starting `portrait serve`: settle the authentication mode, start the workers, the retention
sweeper and uvicorn.

Authentication is a mode the operator chooses (`--auth tokens|none`, or the preset's
`service.auth`; tokens by default), never a consequence of what the tenant table holds: in
`tokens` mode a server with no tokens lets nobody in, and revoking the last token does not
open it. `none` (one local tenant, no tokens) is refused on any address that is not loopback.

One process serves the API and the UI (uvicorn, one event loop; blocking calls run in its
thread pool) and owns N worker processes. Stopping the server (Ctrl-C, SIGTERM) stops the
workers after their current item, or kills them after a grace period; whatever was running
goes back to the queue and runs again, once, on the next start.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass

from portrait.core.config import Settings
from portrait.core.errors import BadInput

from .tenants import TenantDB


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 7860
    workers: int = 1
    ray: str | None = None
    threads: int | None = None  # torch threads per worker (default: cores / workers)
    auth: str | None = None  # tokens | none (default: the preset's service.auth)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False


def check_auth(settings: Settings, host: str, mode: str) -> str | None:
    """Refuse `--auth none` off loopback; returns a warning line for a tokens server nobody can use yet."""
    if mode not in ("tokens", "none"):
        raise BadInput(f"--auth {mode}: use tokens or none")
    if mode == "none":
        if not is_loopback(host):
            raise BadInput(f"--auth none --host {host}: without tokens the server may listen on a loopback address "
                           "only; use --auth tokens (and `portrait serve token create NAME`)")
        return None
    if not TenantDB(settings.home / "service" / "service.db").has_tokens():
        return ("portrait serve: no access tokens yet, so nobody can sign in; create one with "
                "`portrait serve token create NAME` (or run `--auth none` on a loopback address)")
    return None


class Sweeper:
    """Runs the retention sweep (StudioService.sweep) at start and every `every` seconds."""

    def __init__(self, service, every: float):
        import threading

        self.service, self.every = service, every
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="portrait-serve-sweeper", daemon=True)

    def _loop(self) -> None:
        while True:
            try:
                self.service.sweep()
            except Exception as exc:  # noqa: BLE001 - a failed sweep is reported and tried again next round
                print(f"portrait serve: retention sweep failed: {exc}", file=sys.stderr, flush=True)
            if self.stop_event.wait(self.every):
                return

    def start(self) -> "Sweeper":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def serve(settings: Settings, options: ServeOptions) -> None:
    import uvicorn

    from .app import create_app
    from .service import StudioService
    from .workers import RayLoop, WorkerPool

    service = StudioService(settings)
    mode = options.auth or service.policy.auth
    warning = check_auth(settings, options.host, mode)
    if options.ray is not None:
        pool = RayLoop(settings, service.store, service.studio_policy, options.ray, options.workers)
    else:
        pool = WorkerPool(settings, service.store, service.studio_policy, options.workers,
                          service.policy.progress_every, options.threads or default_threads(options.workers))
    service.wake = pool.wake
    app = create_app(service, pool, auth=mode)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    shown = f"[{options.host}]" if ":" in options.host else options.host
    print(f"portrait serve: http://{shown}:{options.port}/  (API docs: /docs, {options.workers} worker(s), "
          f"preset {settings.preset}, home {settings.home}, auth {mode})", file=sys.stderr, flush=True)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    pool.start()
    sweeper = Sweeper(service, service.policy.sweep_seconds).start()
    try:
        server.run()
    finally:
        sweeper.stop()
        pool.stop()
    if not server.started:
        raise BadInput(f"--port {options.port}: cannot listen on {options.host}:{options.port} "
                       "(in use, or not allowed)")
