"""`portrait serve` under load, and the cost of going through HTTP.

Starts `portrait serve` on 127.0.0.1 (a free port; nothing else is ever contacted) with one
worker on the tiny preset, uploads and trains an identity through the API, then:

1. Overhead: the same generation (one image, same identity, template, seed, size, steps and
   finishing) through the HTTP API (submit the job, poll every 0.2 s until done, as the web
   page does every 0.4 s) and through the Python
   API (`portrait.flows.generate.generate` with a warm RunContext), alternating, both warm.
   Prints each side's median and the median of the paired ratios HTTP / Python (target <= 1.10).
   (Off by default: --rounds 0; the load test is what issue 26 asks for.)
2. Load, for --seconds (60): a generation job of --load-images images runs while --clients (20)
   clients poll its status (each waiting --poll-every between calls), one client polls
   /healthz, and --uploaders (4) clients each upload the sample photos at once (each upload
   runs the photo check in the server's pool). Prints p50 / p99 of the status and health
   calls, every upload's time, the job's state and the error count (target: 0).

Bounded: --rounds pairs, and the load phase lasts --seconds; loopback only (127.0.0.1, a free
port), the tiny preset, one worker with one thread.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_load.py [--seconds 60] [--clients 20] [--uploaders 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from portrait.service.client import upload_body

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


class Client:
    """One keep-alive HTTP/1.1 connection to the loopback server."""

    def __init__(self, port: int):
        self.port = port
        self.con = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        for attempt in range(2):
            try:
                self.con.request(method, path, body=body, headers=headers or {})
                response = self.con.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                self.con.close()
                self.con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, payload: dict | None = None) -> dict:
        body = json.dumps(payload).encode() if payload is not None else None
        status, data = self.call(method, path, body, {"Content-Type": "application/json"} if body else None)
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {data[:300]!r}")
        return json.loads(data)

    def wait(self, job_id: str, every: float = 0.2) -> dict:
        while True:
            job = self.json("GET", f"/v1/jobs/{job_id}")
            if job["state"] in ("done", "failed"):
                if job["state"] == "failed":
                    raise RuntimeError(f"job {job_id} failed: {job['error']}")
                return job
            time.sleep(every)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=0, help="HTTP / Python pairs for the overhead ratio (0: skip).")
    parser.add_argument("--clients", type=int, default=20, help="Concurrent status pollers during the load phase.")
    parser.add_argument("--uploaders", type=int, default=4, help="Concurrent photo uploads during the load phase.")
    parser.add_argument("--load-images", type=int, default=6, help="Images in the generation job under load.")
    parser.add_argument("--size", type=int, default=256, help="Image side for every generation.")
    parser.add_argument("--steps", type=int, default=8, help="Denoising steps for every generation.")
    parser.add_argument("--poll-every", type=float, default=0.25, help="Each load client's pause between status calls.")
    parser.add_argument("--seconds", type=float, default=60.0, help="How long the load phase lasts.")
    parser.add_argument("--home", type=Path, help="A PORTRAIT_HOME with tiny models (default: a new temp one).")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from portrait.core.config import Settings
    from portrait.samples import write_sample_photos
    from serve_helpers import Server, free_port

    torch.set_num_threads(1)  # the server's worker runs with --threads 1 too
    work = Path(tempfile.mkdtemp(prefix="portrait-serve-bench-"))
    home = args.home or work / "home"
    settings = Settings(home=home, preset="tiny", device="cpu")
    if not (home / "models").is_dir():
        from portrait.core.registry import make_tiny

        print("making tiny models ...", file=sys.stderr)
        make_tiny(settings)
    photos = write_sample_photos(work / "photos")
    port = free_port()
    server = Server(home, port).start()
    try:
        client = Client(port)
        body, headers = upload_body("bench", photos)
        status, data = client.call("POST", "/v1/identities", body, headers)
        assert status == 201, data[:300]
        identity = json.loads(data)["id"]
        client.wait(client.json("POST", "/v1/jobs/train", {"identity": identity, "steps": 4})["id"])
        request = {"identity": identity, "template": "business", "count": 1, "seed": 42, "steps": args.steps,
                   "size": [args.size, args.size]}

        from portrait.core.context import RunContext
        from portrait.flows.generate import generate

        ctx = RunContext.create(settings, preset="tiny")

        stage_times: dict[str, list[float]] = {"http": [], "python": []}  # the diffusion stage alone

        def python_once() -> float:
            start = time.perf_counter()
            result = generate(identity, template="business", backend="lora", n=1, seed=42,
                              out=Path(tempfile.mkdtemp(dir=work)), ctx=ctx, steps=args.steps, width=args.size,
                              height=args.size)
            elapsed = time.perf_counter() - start
            stage_times["python"].append(result.as_json()["results"][0]["timings"]["generate"])
            return elapsed

        def http_once() -> float:
            start = time.perf_counter()
            job_id = client.json("POST", "/v1/jobs/generate", request)["id"]
            client.wait(job_id)
            elapsed = time.perf_counter() - start
            stage_times["http"].append(client.json("GET", f"/v1/jobs/{job_id}/results")["images"][0]["timings"]["generate"])
            return elapsed

        pairs = []
        if args.rounds:
            python_once(), http_once()  # warm both: models loaded, caches filled
            for times in stage_times.values():  # the warm-up runs do not count
                times.clear()
        for _ in range(args.rounds):
            t_http, t_py = http_once(), python_once()
            pairs.append((t_http, t_py))
            print(f"  round: http {t_http:.3f} s, python {t_py:.3f} s, ratio {t_http / t_py:.3f}", file=sys.stderr)

        # -- load ---------------------------------------------------------------------------
        job = client.json("POST", "/v1/jobs/generate", {**request, "count": args.load_images, "seed": 1000})
        started = time.perf_counter()
        deadline = started + args.seconds
        latencies: list[float] = []
        health: list[float] = []
        errors: list[str] = []
        uploads: list[tuple[int, float]] = []
        lock = threading.Lock()

        def poll(path: str, into: list[float]) -> None:
            c = Client(port)
            mine = []
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    status, _ = c.call("GET", path)
                except (OSError, http.client.HTTPException) as exc:
                    status = f"{exc.__class__.__name__}"
                mine.append(time.perf_counter() - t0)
                if status != 200:
                    with lock:
                        errors.append(f"{path}: {status}")
                time.sleep(args.poll_every)
            with lock:
                into.extend(mine)

        def upload(i: int) -> None:
            c = Client(port)
            body, headers = upload_body(f"load{i}", photos)
            t0 = time.perf_counter()
            status, _ = c.call("POST", "/v1/identities", body, headers)
            with lock:
                uploads.append((status, time.perf_counter() - t0))

        threads = [threading.Thread(target=poll, args=(f"/v1/jobs/{job['id']}", latencies)) for _ in range(args.clients)]
        threads.append(threading.Thread(target=poll, args=("/healthz", health)))
        threads += [threading.Thread(target=upload, args=(i,)) for i in range(args.uploaders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        final = client.json("GET", f"/v1/jobs/{job['id']}")
    finally:
        server.stop()

    ms = [x * 1000 for x in latencies]
    hms = [x * 1000 for x in health]
    upload_errors = [s for s, _ in uploads if s != 201]
    print()
    print(f"portrait serve, tiny preset, {args.size} px, {args.steps} steps, 1 worker (--threads 1), "
          f"{os.cpu_count()} CPUs, loopback")
    if pairs:
        print()
        print("| one generation (1 image) | median s |")
        print("| --- | --- |")
        print(f"| through HTTP (submit, worker, poll) | {statistics.median(p[0] for p in pairs):.3f} |")
        print(f"| through the Python API (warm) | {statistics.median(p[1] for p in pairs):.3f} |")
        print(f"| ratio HTTP / Python (median of {len(pairs)} pairs; target <= 1.10) | "
              f"{statistics.median(p[0] / p[1] for p in pairs):.3f} |")
        print(f"| of which the diffusion stage: worker / in-process (medians) | "
              f"{statistics.median(stage_times['http']):.3f} / {statistics.median(stage_times['python']):.3f} |")
    print()
    print(f"| {args.seconds:.0f} s of load: {args.clients} pollers (each every {args.poll_every} s) + /healthz + "
          f"{args.uploaders} uploads during a {args.load_images}-image job | |")
    print("| --- | --- |")
    print(f"| status calls | {len(ms)} |")
    print(f"| status p50 / p99 ms | {percentile(ms, 50):.1f} / {percentile(ms, 99):.1f} |")
    print(f"| /healthz calls, p50 / p99 ms | {len(hms)}, {percentile(hms, 50):.1f} / {percentile(hms, 99):.1f} |")
    print(f"| uploads (HTTP status, seconds) | {', '.join(f'{s} {t:.1f}s' for s, t in sorted(uploads))} |")
    print(f"| job state at the end / its images done | {final['state']} / {final['progress']['items']['done']} "
          f"of {final['progress']['items']['total']} |")
    print(f"| errors | {len(errors) + len(upload_errors)} |")
    ok = not errors and not upload_errors
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
