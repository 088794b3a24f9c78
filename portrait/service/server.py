"""Starting `portrait serve`: refuse an open host without tokens, start the workers, run uvicorn.

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


def check_host(settings: Settings, host: str) -> None:
    """A server reachable from other machines must not be open to anyone: tokens first."""
    if is_loopback(host):
        return
    if not TenantDB(settings.home / "service" / "service.db").has_tokens():
        raise BadInput(f"--host {host}: not a loopback address and no access tokens exist; "
                       "create one with `portrait serve token create NAME` first")


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def serve(settings: Settings, options: ServeOptions) -> None:
    import uvicorn

    from .app import create_app
    from .service import StudioService
    from .workers import RayLoop, WorkerPool

    check_host(settings, options.host)
    service = StudioService(settings)
    if options.ray is not None:
        pool = RayLoop(settings, service.store, service.studio_policy, options.ray, options.workers)
    else:
        pool = WorkerPool(settings, service.store, service.studio_policy, options.workers,
                          service.policy.progress_every, options.threads or default_threads(options.workers))
    service.wake = pool.wake
    app = create_app(service, pool)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    shown = f"[{options.host}]" if ":" in options.host else options.host
    print(f"portrait serve: http://{shown}:{options.port}/  (API docs: /docs, {options.workers} worker(s), "
          f"preset {settings.preset}, home {settings.home})", file=sys.stderr, flush=True)
    pool.start()
    try:
        server.run()
    finally:
        pool.stop()
    if not server.started:
        raise BadInput(f"--port {options.port}: cannot listen on {options.host}:{options.port} "
                       "(in use, or not allowed)")
