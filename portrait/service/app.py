"""The FastAPI app of `portrait serve`: the /v1 JSON API, its reference at /docs, /healthz, and
the web UI (static/, a plain page that calls the same /v1 API, so the UI can do nothing the
API cannot and holds no logic of its own).

Errors are JSON `{"reason": WORD, "detail": ONE LINE}` with the CLI's words: `bad_input`
(400: an upload the prepare step refused also carries its per-photo `report`; 422: a request
value refused at submit, with `field` naming it), `not_found` (404: also for another tenant's
objects, with `field` when a body field named it), `busy` (409), `quota` (429: the detail
names the tenant limit), `model_missing` (503, the detail names `portrait models download
ID`), `unauthorized` (401), `too_large` (413), `error` (500).

Who is asking is settled by `Gate`, an ASGI layer in front of everything, from the headers
alone: in `tokens` mode a /v1 request without a known token is answered 401 before one byte
of its body is read, and a body whose Content-Length is over the limit 413. In `none` mode
(loopback only, checked when the server starts) every request is the one local tenant.
"""

from __future__ import annotations

import asyncio
import html
import json
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any, Callable, Optional

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from portrait.core.errors import BadInput, ModelMissing, PortraitError

from .desk import public_image, public_text
from .requests import (ResultSelection, StarRequest, TrainRequest, batch_request_model, edit_request_model,
                       generate_request_model, shoot_request_model)
from .service import SETTLED, Busy, InvalidField, NotFound, QuotaExceeded, RejectedUpload, StudioService
from .tenants import LOCAL_TENANT
from .uploads import Upload

API_VERSION = "v1"
_REASONS = {400: "bad_input", 401: "unauthorized", 404: "not_found", 405: "bad_input", 409: "busy", 411: "bad_input",
            413: "too_large", 422: "bad_input", 429: "quota", 503: "model_missing"}
AUTH_MODES = ("tokens", "none")
UNAUTHORIZED = ("missing or unknown access token: send `Authorization: Bearer TOKEN` "
                "(an operator creates one with `portrait serve token create NAME`)")


def error(status: int, detail: str, **extra: Any) -> JSONResponse:
    """The error body; its detail in a tenant's words (no server path: service/desk.public_text)."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"reason": _REASONS.get(status, "error"), "detail": public_text(detail), **extra},
                        status_code=status, headers=headers)


def create_app(service: StudioService, workers: Any = None, auth: str | None = None) -> FastAPI:
    """The app over `service`. `auth`: tokens | none (default: the preset's service.auth)."""
    mode = auth or service.policy.auth
    if mode not in AUTH_MODES:
        raise BadInput(f"--auth {mode}: use tokens or none")
    app = FastAPI(title="portrait studio", version=API_VERSION, docs_url=None, redoc_url=None,
                  description="Identity-preserving portraits: upload photos, train, generate, download. "
                              "Send `Authorization: Bearer TOKEN` (unless the server runs with `--auth none`).")
    app.state.service = service
    app.state.auth = mode
    # Photo checks run here, not in the server's request threads: a queue of uploads never
    # holds the threads that answer status calls (ServicePolicy.upload_workers run at once).
    uploads = ThreadPoolExecutor(max_workers=max(2, 2 * service.policy.upload_workers),
                                 thread_name_prefix="portrait-upload")

    # -- errors ------------------------------------------------------------------------

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return error(404, str(exc), **({"field": exc.field} if exc.field else {}))

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(QuotaExceeded)
    async def _quota(request: Request, exc: QuotaExceeded) -> JSONResponse:
        return error(429, str(exc))

    @app.exception_handler(RejectedUpload)
    async def _rejected(request: Request, exc: RejectedUpload) -> JSONResponse:
        return error(400, str(exc), report=exc.report)

    @app.exception_handler(InvalidField)
    async def _invalid_field(request: Request, exc: InvalidField) -> JSONResponse:
        return error(422, str(exc), field=exc.field)

    @app.exception_handler(BadInput)
    async def _bad_input(request: Request, exc: BadInput) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(ModelMissing)
    async def _model_missing(request: Request, exc: ModelMissing) -> JSONResponse:
        return error(503, str(exc))

    @app.exception_handler(PortraitError)
    async def _internal(request: Request, exc: PortraitError) -> JSONResponse:
        return error(500, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error(400, _json_error(first, exc.body))
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        msg = str(first.get("msg", "invalid"))
        msg = msg[len("Value error, "):] if msg.startswith("Value error, ") else msg
        detail = f"{where}: {msg[0].lower() + msg[1:]}" if where else msg
        return error(422, detail, **({"field": where} if where else {}))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    # -- who is asking, from the headers, before any body ------------------------------------

    app.add_middleware(Gate, service=service, mode=mode, limit=service.policy.max_request_bytes)

    def tenant(request: Request) -> str:
        return request.scope["state"]["tenant"]

    # -- health and the page --------------------------------------------------------------

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, Any]:
        """That the server is alive: nothing else (no tenant's figures without a token)."""
        return {"status": "ok"}

    static = resources.files("portrait.service") / "static"

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(reference_page(app.openapi()))

    @app.get("/v1/me", tags=["service"])
    def me(request: Request) -> dict[str, Any]:
        """Who you are, and what this server runs: its preset (and family: /v1/backends says
        which backends run on it) and how many usable photos a new identity needs."""
        t = tenant(request)
        return {"tenant": service.db.tenant_name(t), "auth": mode == "tokens", **service.server_facts()}

    @app.get("/v1/usage", tags=["service"])
    def usage(request: Request) -> dict[str, Any]:
        """Your queue, your limits and what you use of them."""
        return service.usage(tenant(request))

    @app.get("/v1/audit", tags=["service"])
    def audit(request: Request, limit: int = Query(100, ge=1, le=1000)) -> dict[str, Any]:
        """Your audit log: what was erased (by you or by retention), when, how much. Ids and counts only."""
        return {"entries": service.audit(tenant(request), limit)}

    # -- identities -----------------------------------------------------------------------

    @app.get("/v1/identities", tags=["identities"])
    def list_identities(request: Request) -> list[dict[str, Any]]:
        return service.list_identities(tenant(request))

    @app.post("/v1/identities", tags=["identities"], status_code=201)
    async def create_identity(request: Request,
                              name: str = Form(..., description="A display name (letters, digits, _ - .), not "
                                                                "one of your identities' names already."),
                              files: list[UploadFile] = File(..., description="Photos of one person, or zips of them."),
                              stream: bool = Query(False, description="Answer with NDJSON events while the photos "
                                                                      "are checked (see below) instead of one reply.")
                              ) -> Any:
        """Screen and prepare the photos; the report says which were kept and why the rest were not.
        A rejected upload creates nothing. With `stream=true` the answer is one JSON object per
        line as the check goes: `screened` (each upload received or refused), `checking` (phase,
        photos done, total: counted over the received ones, in order), then `created` (the identity) or `rejected` (detail, report) or
        `error` (status, reason, detail)."""
        parts = [Upload(f.filename or "", f.file) for f in files]
        who = tenant(request)
        if not stream:
            return await asyncio.get_running_loop().run_in_executor(uploads, service.create_identity, who, name, parts)
        service.check_new_name(who, name)  # refused before the stream starts (a plain 4xx)
        return StreamingResponse(_upload_events(service, uploads, who, name, parts),
                                 media_type="application/x-ndjson", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/identities/{identity_id}/photos/{index}", tags=["identities"])
    def identity_photo(identity_id: str, index: int, request: Request) -> Response:
        """A thumbnail of one stored upload (the photo report's `thumbnail`)."""
        return Response(service.photo_thumbnail(tenant(request), identity_id, index), media_type="image/jpeg")

    @app.get("/v1/identities/{identity_id}/results", tags=["results"])
    def identity_results(identity_id: str, request: Request, page: int = Query(1, ge=1),
                         per_page: int = Query(24, ge=1, le=100),
                         job: Optional[str] = Query(None, description="Only this job's results."),
                         starred: Optional[bool] = Query(None, description="Only starred (true) or unstarred.")
                         ) -> dict[str, Any]:
        """Every portrait made of the identity, in every job, newest first: job, backend,
        template, shoot cell, scores, star; `jobs` and `runs` (keep reports) for the jobs shown."""
        return service.identity_results(tenant(request), identity_id, page=page, per_page=per_page, job=job,
                                        starred=starred)

    @app.get("/v1/identities/{identity_id}/results/{result_id}/image", tags=["results"], response_class=Response)
    def identity_result_image(identity_id: str, result_id: str, request: Request) -> Response:
        return Response(public_image(service.result_file(tenant(request), identity_id, result_id)),
                        media_type="image/png")

    @app.post("/v1/identities/{identity_id}/results/star", tags=["results"])
    def star_results(identity_id: str, body: StarRequest, request: Request) -> dict[str, Any]:
        return service.star_results(tenant(request), identity_id, body.ids, body.starred)

    @app.post("/v1/identities/{identity_id}/results/zip", tags=["results"])
    def zip_results(identity_id: str, body: ResultSelection, request: Request) -> Response:
        """The chosen images and a results.json describing them, as one zip."""
        data = service.zip_results(tenant(request), identity_id, body.ids)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="portrait-{identity_id}.zip"'})

    @app.post("/v1/identities/{identity_id}/results/delete", tags=["results"])
    def delete_results(identity_id: str, body: ResultSelection, request: Request) -> dict[str, Any]:
        """Erase the chosen images (files and history rows); the receipt is also in /v1/audit."""
        return service.delete_results(tenant(request), identity_id, body.ids)

    @app.get("/v1/identities/{identity_id}", tags=["identities"])
    def show_identity(identity_id: str, request: Request) -> dict[str, Any]:
        return service.show_identity(tenant(request), identity_id)

    @app.get("/v1/identities/{identity_id}/contact-sheet", tags=["identities"], response_class=FileResponse)
    def contact_sheet(identity_id: str, request: Request) -> FileResponse:
        return FileResponse(service.contact_sheet(tenant(request), identity_id), media_type="image/png")

    @app.delete("/v1/identities/{identity_id}", tags=["identities"])
    def delete_identity(identity_id: str, request: Request) -> dict[str, Any]:
        """Erase photos, crops, embeddings, LoRA, every output made from it (group pictures too),
        its jobs and every row naming it. Returns the receipt (also in /v1/audit)."""
        return service.delete_identity(tenant(request), identity_id)

    # -- assets ---------------------------------------------------------------------------

    @app.post("/v1/assets", tags=["assets"], status_code=201)
    async def create_asset(request: Request, file: UploadFile = File(..., description="An image: a pose, a control "
                                                                                       "image or a photo template.")
                           ) -> dict[str, Any]:
        """Store an image a request names by its id (options pose_image / control_image, template_photo)."""
        return await asyncio.get_running_loop().run_in_executor(
            uploads, service.add_asset, tenant(request), Upload(file.filename or "", file.file))

    @app.get("/v1/assets", tags=["assets"])
    def list_assets(request: Request) -> list[dict[str, Any]]:
        return service.list_assets(tenant(request))

    @app.get("/v1/assets/{asset_id}", tags=["assets"])
    def show_asset(asset_id: str, request: Request) -> dict[str, Any]:
        return service.show_asset(tenant(request), asset_id)

    @app.get("/v1/assets/{asset_id}/image", tags=["assets"], response_class=FileResponse)
    def asset_image(asset_id: str, request: Request) -> FileResponse:
        return FileResponse(service.asset_image(tenant(request), asset_id))

    @app.delete("/v1/assets/{asset_id}", tags=["assets"])
    def delete_asset(asset_id: str, request: Request) -> dict[str, Any]:
        return service.delete_asset(tenant(request), asset_id)

    # -- jobs ------------------------------------------------------------------------------

    @app.post("/v1/jobs/train", tags=["jobs"], status_code=202)
    def train(body: TrainRequest, request: Request) -> dict[str, Any]:
        return service.submit_train(tenant(request), body.identity, zero_shot=body.zero_shot, steps=body.steps)

    def generate(body, request: Request) -> dict[str, Any]:
        return service.submit_generate(tenant(request), body)

    def batch(body, request: Request) -> dict[str, Any]:
        return service.submit_generate(tenant(request), body)

    def shoot(body, request: Request) -> dict[str, Any]:
        """A studio package's cells (backdrop x outfit x pose, /v1/packages) for one identity:
        `count` images per cell, or with `keep` that many portraits that pass every check."""
        return service.submit_generate(tenant(request), body)

    def edit(body, request: Request) -> dict[str, Any]:
        """Edit one of the identity's results by a prompt (background, outfit, expression,
        lighting), optionally from up to 3 uploaded references; the face is kept and checked:
        each edit is re-scored against the identity and regenerated with new seeds below the
        likeness check. Runs on a server whose preset has an edit model (FLUX.2 [klein],
        Qwen-Image-Edit, FLUX.1 Kontext)."""
        return service.submit_edit(tenant(request), body)

    # The bodies' models are generated from the declared generate settings when the app is built
    # (service/requests.py): the annotations are set here, not written, because FastAPI reads
    # them and a model built in this function has no global name to write.
    generate.__annotations__["body"] = generate_request_model()
    batch.__annotations__["body"] = batch_request_model()
    shoot.__annotations__["body"] = shoot_request_model()
    edit.__annotations__["body"] = edit_request_model()
    app.post("/v1/jobs/generate", tags=["jobs"], status_code=202)(generate)
    app.post("/v1/jobs/batch", tags=["jobs"], status_code=202)(batch)
    app.post("/v1/jobs/shoot", tags=["jobs"], status_code=202)(shoot)
    app.post("/v1/jobs/edit", tags=["jobs"], status_code=202)(edit)

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(request: Request, limit: int = Query(50, ge=1, le=1000, description="Jobs per page."),
                  after: Optional[str] = Query(None, description="The `next` cursor of the page before (a job id).")
                  ) -> dict[str, Any]:
        """Your jobs, newest first, a page at a time: `{"jobs": [...], "next": CURSOR or null}`;
        pass `after=CURSOR` for the next page (keyset paging: pages do not shift as jobs arrive)."""
        return service.list_jobs(tenant(request), limit, after)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def show_job(job_id: str, request: Request) -> dict[str, Any]:
        """State (queued, running, done, failed, cancelled), progress (step / total, ETA), the error reason."""
        return service.job_view(tenant(request), job_id)

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
        """Cancel: queued items are dropped, running ones stop at their next step (nothing half-written
        is kept); finished images stay."""
        return service.cancel_job(tenant(request), job_id)

    @app.post("/v1/jobs/{job_id}/retry", tags=["jobs"])
    def retry_job(job_id: str, request: Request) -> dict[str, Any]:
        """Queue the job's failed and cancelled items again."""
        return service.retry_job(tenant(request), job_id)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: a `progress` event whenever the job changes, `end` when it settles."""
        t = tenant(request)
        await run_in_threadpool(service.job_view, t, job_id)  # 404 before the stream starts

        async def stream():
            last = None
            while True:
                view = await run_in_threadpool(service.job_view, t, job_id)
                text = json.dumps(view)
                if text != last:
                    last = text
                    yield f"event: progress\ndata: {text}\n\n"
                if view["state"] in SETTLED:
                    yield "event: end\ndata: {}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/jobs/{job_id}/results", tags=["results"])
    def job_results(job_id: str, request: Request) -> dict[str, Any]:
        """The ranked images (similarity, gate verdict, metadata) or the training summary."""
        results = service.job_results(tenant(request), job_id)
        for image in results["images"]:
            image.pop("_path", None)
        return results

    @app.get("/v1/jobs/{job_id}/images/{image_id}", tags=["results"], response_class=Response)
    def job_image(job_id: str, image_id: str, request: Request) -> Response:
        return Response(public_image(service.image_path(tenant(request), job_id, image_id)), media_type="image/png")

    @app.get("/v1/jobs/{job_id}/zip", tags=["results"])
    def job_zip(job_id: str, request: Request) -> Response:
        data = service.job_zip(tenant(request), job_id)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="portrait-{job_id}.zip"'})

    # -- catalogue -------------------------------------------------------------------------

    @app.get("/v1/templates", tags=["catalogue"])
    def templates() -> list[dict[str, Any]]:
        return service.templates()

    @app.get("/v1/templates/{name}/preview", tags=["catalogue"])
    def template_preview(name: str) -> Response:
        data, media = service.template_preview(name)
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.get("/v1/packages", tags=["catalogue"])
    def packages() -> list[dict[str, Any]]:
        """The studio packages: backdrops, outfits, poses (a shoot renders their combinations)."""
        return service.packages()

    @app.get("/v1/presets", tags=["catalogue"])
    def presets() -> list[dict[str, Any]]:
        return service.presets()

    @app.get("/v1/presets/{name}", tags=["catalogue"])
    def preset(name: str) -> dict[str, Any]:
        """Every setting of every section: key, type, default, bounds, help, this preset's value."""
        return service.preset(name)

    @app.get("/v1/backends", tags=["catalogue"])
    def backends() -> list[dict[str, Any]]:
        """The generation backends (the backend table), each with its options' JSON schema; an
        option marked `"tenant": false` is the operator's, `"tenant": "asset"` takes an asset id."""
        return service.backends()

    @app.get("/v1/models", tags=["catalogue"])
    def models() -> list[dict[str, Any]]:
        return service.models()

    return app


async def _upload_events(service: StudioService, pool: Any, tenant: str, name: str, parts: list):
    """NDJSON lines while an upload is checked (POST /v1/identities?stream=true)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def progress(event: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def work() -> dict[str, Any]:
        try:
            return {"event": "created", "identity": service.create_identity(tenant, name, parts, progress)}
        except RejectedUpload as exc:
            return {"event": "rejected", "detail": public_text(str(exc)), "report": exc.report}
        except Busy as exc:
            return {"event": "error", "status": 409, "reason": "busy", "detail": public_text(str(exc))}
        except QuotaExceeded as exc:
            return {"event": "error", "status": 429, "reason": "quota", "detail": public_text(str(exc))}
        except BadInput as exc:
            return {"event": "error", "status": 400, "reason": "bad_input", "detail": public_text(str(exc))}
        except PortraitError as exc:
            return {"event": "error", "status": 500, "reason": "error", "detail": public_text(str(exc))}

    future = loop.run_in_executor(pool, work)
    last = None
    while True:
        getter = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({getter, future}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            event = getter.result()
            line = json.dumps(event)
            if line != last:  # prepare repeats a phase's figures; send each change once
                last = line
                yield line + "\n"
            continue
        getter.cancel()
        while not events.empty():
            yield json.dumps(events.get_nowait()) + "\n"
        yield json.dumps(future.result()) + "\n"
        return


def _json_error(first: dict, body: Any) -> str:
    """`the request body is not valid JSON: Expecting ',' delimiter at line 1 column 34`."""
    reason = str((first.get("ctx") or {}).get("error") or "unreadable")
    loc = first.get("loc") or ()
    pos = loc[-1] if loc and isinstance(loc[-1], int) else None
    if pos is not None and isinstance(body, (str, bytes)):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return f"the request body is not valid JSON: {reason} at line {line} column {column}"
    return f"the request body is not valid JSON: {reason}"


class Gate:
    """Who is asking and how much they send, from the headers, before the app reads a byte of
    the body: a /v1 request without a known token (tokens mode) is 401; a body over the limit is
    413 by its Content-Length, a chunked one without a length 411. Plain ASGI: Starlette's
    BaseHTTPMiddleware costs every request a task hop. The tenant goes into scope["state"]."""

    def __init__(self, app: Any, service: StudioService, mode: str, limit: int):
        self.app, self.service, self.mode, self.limit = app, service, mode, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = None
        if scope["path"].startswith(f"/{API_VERSION}/"):
            who = LOCAL_TENANT if self.mode == "none" else await run_in_threadpool(self._token_tenant, headers)
            if who is None:
                refusal = error(401, UNAUTHORIZED)
            else:
                scope.setdefault("state", {})["tenant"] = who
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get("content-length")
            if length is None and "chunked" in headers.get("transfer-encoding", ""):
                refusal = error(411, "send the upload with a Content-Length")
            elif length is not None and (not length.isdigit() or int(length) > self.limit):
                refusal = error(413, f"request body of {length} bytes is over the {self.limit:,} byte limit")
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _token_tenant(self, headers: dict[str, str]) -> str | None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        found = self.service.db.tenant_for_token(token.strip())
        return found.id if found is not None else None


def reference_page(spec: dict[str, Any]) -> str:
    """/docs: the API reference as one plain HTML page rendered from the OpenAPI document.

    Why not Swagger UI or ReDoc: both are JavaScript bundles that FastAPI loads from a CDN, so
    on a studio machine without internet /docs was blank. Serving a bundle ourselves means
    shipping (and updating) a megabyte of someone else's JavaScript; this page is rendered
    from the same document as /openapi.json (which tools that want an interactive client read),
    needs nothing from anywhere, and cannot drift from the API."""
    esc = html.escape
    out = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(spec['info']['title'])} API</title>",
           "<style>body{font:15px/1.45 system-ui,sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}"
           "code,pre{font:13px ui-monospace,monospace;background:#f4f4f4;padding:1px 4px}h3{margin:1.4em 0 .3em}"
           ".m{display:inline-block;min-width:4.5em;font-weight:600}table{border-collapse:collapse;margin:.3em 0}"
           "td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}</style></head><body>",
           f"<h1>{esc(spec['info']['title'])} API {esc(spec['info'].get('version', ''))}</h1>",
           f"<p>{esc(spec['info'].get('description', ''))}</p>",
           "<p>The machine-readable document: <a href=/openapi.json><code>/openapi.json</code></a>. "
           "Errors: <code>{\"reason\", \"detail\"}</code> (and <code>field</code> when a request field is refused).</p>"]
    by_tag: dict[str, list[tuple[str, str, dict]]] = {}
    for path, methods in spec.get("paths", {}).items():
        for method, op in methods.items():
            by_tag.setdefault((op.get("tags") or ["other"])[0], []).append((path, method, op))
    for tag, ops in by_tag.items():
        out.append(f"<h2>{esc(tag)}</h2>")
        for path, method, op in ops:
            out.append(f"<h3><span class=m>{method.upper()}</span><code>{esc(path)}</code></h3>")
            text = op.get("description") or op.get("summary") or ""
            if text:
                out.append(f"<p>{esc(text)}</p>")
            params = op.get("parameters") or []
            if params:
                out.append("<table><tr><th>parameter</th><th>in</th><th>type</th><th>about</th></tr>")
                for prm in params:
                    out.append(f"<tr><td><code>{esc(prm['name'])}</code></td><td>{esc(prm.get('in', ''))}</td>"
                               f"<td>{esc(_type(prm.get('schema', {})))}</td>"
                               f"<td>{esc(prm.get('description', ''))}</td></tr>")
                out.append("</table>")
            content = (op.get("requestBody") or {}).get("content") or {}
            for media, body in content.items():
                out.append(f"<p>body ({esc(media)}): <code>{esc(_type(body.get('schema', {})))}</code></p>")
            codes = ", ".join(esc(code) for code in (op.get("responses") or {}))
            out.append(f"<p>answers: {codes}</p>")
    schemas = spec.get("components", {}).get("schemas", {})
    if schemas:
        out.append("<h2>Request and response bodies</h2>")
    for name, schema in schemas.items():
        out.append(f"<h3 id='{esc(name)}'>{esc(name)}</h3>")
        props = schema.get("properties") or {}
        if props:
            required = set(schema.get("required") or [])
            out.append("<table><tr><th>field</th><th>type</th><th>about</th></tr>")
            for field, prop in props.items():
                mark = " (required)" if field in required else ""
                out.append(f"<tr><td><code>{esc(field)}</code>{mark}</td><td>{esc(_type(prop))}</td>"
                           f"<td>{esc(prop.get('description', ''))}</td></tr>")
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def _type(schema: Any) -> str:
    if not isinstance(schema, dict):
        return "any"
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        items = schema.get("prefixItems") or [schema.get("items", {})]
        return f"array of {', '.join(_type(i) for i in items)}"
    if kind == "object" and "additionalProperties" in schema:
        return f"object of {_type(schema['additionalProperties'] or {})}"
    bounds = [f"{k} {schema[k]}" for k in ("minimum", "maximum", "maxLength") if k in schema]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")
