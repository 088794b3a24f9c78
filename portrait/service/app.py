"""The FastAPI app of `portrait serve`: the /v1 JSON API, OpenAPI at /docs, /healthz, and the
web UI (static/, a plain page that calls the same /v1 API, so the UI can do nothing the API
cannot and holds no logic of its own).

Errors are JSON `{"reason": WORD, "detail": ONE LINE}` with the CLI's words: `bad_input`
(400; an upload the prepare step refused also carries its per-photo `report`), `not_found`
(404: also for another tenant's objects), `busy` (409), `model_missing` (503, the detail
names `portrait models download ID`), `unauthorized` (401), `too_large` (413), `error` (500).
"""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from typing import Any, Callable, Optional

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from portrait.core.errors import BadInput, ModelMissing, PortraitError
from portrait.core.request import door_model, door_names

from .service import Busy, NotFound, RejectedUpload, StudioService
from .tenants import LOCAL_TENANT
from .uploads import Upload

API_VERSION = "v1"
_REASONS = {400: "bad_input", 401: "unauthorized", 404: "not_found", 405: "bad_input", 409: "busy", 411: "bad_input",
            413: "too_large", 422: "bad_input", 503: "model_missing"}


def error(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"reason": _REASONS.get(status, "error"), "detail": detail, **extra}, status_code=status)


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    identity: str
    zero_shot: bool = Field(False, description="Prepare only (embeddings, reference) for the zero-shot backends.")
    steps: Optional[int] = Field(None, ge=1, le=100_000)


class _GenerateOptions(BaseModel):
    """What every generate request takes besides the declared settings (size, steps, guidance,
    scheduler, fast, options, ...), which the models below get from their declaration
    (portrait.core.request): the bounds are written there once."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(1, ge=1, description="Images to make (one item each in the store).")
    seed: int = Field(0, ge=0)
    finish: bool | dict[str, bool] = Field(True, description="Finishing stages (fuse, retouch, upscale, ...).")


class _GenerateFields(_GenerateOptions):
    identity: str
    template: Optional[str] = Field(None, description="A template name from /v1/templates.")
    prompt: Optional[str] = Field(None, description="A prompt with {trigger} and {class}, instead of a template.")
    backend: Optional[str] = Field(None, description="A backend name from /v1/backends; default from the template.")


class _BatchFields(_GenerateOptions):
    identities: list[str] = Field(min_length=1)
    templates: list[str] = Field(default_factory=list)
    prompts: list[str] = Field(default_factory=list)
    backends: list[str] = Field(default_factory=lambda: ["lora"])


# A declared field marked `tenant: False` (a file or model override) is the server's to set: the
# request models leave it out, so a tenant cannot send it.
TENANT_ONLY = ("tenant",)


def generate_request_model() -> type[BaseModel]:
    """POST /v1/jobs/generate's body: its own fields and the declared generate settings."""
    return door_model("GenerateRequest", base=_GenerateFields, drop_marked=TENANT_ONLY)


def batch_request_model() -> type[BaseModel]:
    """POST /v1/jobs/batch's body: its own fields and the declared generate settings."""
    return door_model("BatchRequest", base=_BatchFields, drop_marked=TENANT_ONLY)


GenerateRequest = generate_request_model()  # as the declaration stands at import (create_app builds its own)
BatchRequest = batch_request_model()


def create_app(service: StudioService, workers: Any = None) -> FastAPI:
    """The app over `service`; `workers` (a pool with .alive()) only feeds /healthz."""
    app = FastAPI(title="portrait studio", version=API_VERSION,
                  description="Identity-preserving portraits: upload photos, train, generate, download. "
                              "Send `Authorization: Bearer TOKEN` when the server has tokens.")
    app.state.service = service

    # -- errors ------------------------------------------------------------------------

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(RejectedUpload)
    async def _rejected(request: Request, exc: RejectedUpload) -> JSONResponse:
        return error(400, str(exc), report=exc.report)

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
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
        return error(422, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    # -- request size -------------------------------------------------------------------

    app.add_middleware(BodyLimit, limit=service.policy.max_request_bytes)

    # -- who is asking --------------------------------------------------------------------

    def tenant(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        found = service.db.tenant_for_token(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if found is not None:
            return found.id
        if not service.db.has_tokens():
            return LOCAL_TENANT
        raise StarletteHTTPException(401, "missing or unknown access token: send `Authorization: Bearer TOKEN` "
                                          "(an operator creates one with `portrait serve token create NAME`)")

    # -- health and the page --------------------------------------------------------------

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        return {**service.health(), "workers": workers.alive() if workers is not None else 0}

    static = resources.files("portrait.service") / "static"

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((static / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    @app.get("/v1/me", tags=["service"])
    def me(t: str = Depends(tenant)) -> dict[str, Any]:
        names = {row["id"]: row["name"] for row in service.db.tenants()}
        return {"tenant": names.get(t, t), "auth": service.db.has_tokens()}

    # -- identities -----------------------------------------------------------------------

    @app.get("/v1/identities", tags=["identities"])
    def list_identities(t: str = Depends(tenant)) -> list[dict[str, Any]]:
        return service.list_identities(t)

    @app.post("/v1/identities", tags=["identities"], status_code=201)
    def create_identity(name: str = Form(..., description="A display name (letters, digits, _ - .)."),
                        files: list[UploadFile] = File(..., description="Photos of one person, or zips of them."),
                        t: str = Depends(tenant)) -> dict[str, Any]:
        """Screen and prepare the photos; the report says which were kept and why the rest were not."""
        return service.create_identity(t, name, [Upload(f.filename or "", f.file) for f in files])

    @app.get("/v1/identities/{identity_id}", tags=["identities"])
    def show_identity(identity_id: str, t: str = Depends(tenant)) -> dict[str, Any]:
        return service.show_identity(t, identity_id)

    @app.get("/v1/identities/{identity_id}/contact-sheet", tags=["identities"], response_class=FileResponse)
    def contact_sheet(identity_id: str, t: str = Depends(tenant)) -> FileResponse:
        return FileResponse(service.contact_sheet(t, identity_id), media_type="image/png")

    @app.delete("/v1/identities/{identity_id}", tags=["identities"])
    def delete_identity(identity_id: str, t: str = Depends(tenant)) -> dict[str, Any]:
        """Erase photos, crops, embeddings, LoRA, outputs and jobs of the identity."""
        return service.delete_identity(t, identity_id)

    # -- jobs ------------------------------------------------------------------------------

    @app.post("/v1/jobs/train", tags=["jobs"], status_code=202)
    def train(body: TrainRequest, t: str = Depends(tenant)) -> dict[str, Any]:
        return service.submit_train(t, body.identity, zero_shot=body.zero_shot, steps=body.steps)

    def generate(body, t: str = Depends(tenant)) -> dict[str, Any]:
        if not body.template and not body.prompt:
            raise BadInput("give `template` or `prompt`")
        backend = body.backend
        if backend is None:
            kinds = {row["name"]: row["backend"] for row in service.templates()}
            backend = kinds.get(body.template or "", "lora")
        return service.submit_generate(
            t, [body.identity], templates=[body.template] if body.template else [],
            prompts=[body.prompt] if body.prompt and not body.template else [], backends=[backend],
            **_options(body))

    def batch(body, t: str = Depends(tenant)) -> dict[str, Any]:
        return service.submit_generate(t, body.identities, templates=body.templates, prompts=body.prompts,
                                       backends=body.backends, kind="batch", **_options(body))

    # The bodies' models are generated from the declaration now (the annotations are set here,
    # not written: FastAPI reads them, and a model built in this function has no global name).
    generate.__annotations__["body"] = generate_request_model()
    batch.__annotations__["body"] = batch_request_model()
    app.post("/v1/jobs/generate", tags=["jobs"], status_code=202)(generate)
    app.post("/v1/jobs/batch", tags=["jobs"], status_code=202)(batch)

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(t: str = Depends(tenant)) -> list[dict[str, Any]]:
        return service.list_jobs(t)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def show_job(job_id: str, t: str = Depends(tenant)) -> dict[str, Any]:
        """State, progress (step / total, ETA), the error reason, and where the results are."""
        return service.job_view(t, job_id)

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, request: Request, t: str = Depends(tenant)) -> StreamingResponse:
        """Server-sent events: a `progress` event whenever the job changes, `end` when it settles."""
        await run_in_threadpool(service.job_view, t, job_id)  # 404 before the stream starts

        async def stream():
            last = None
            while True:
                view = await run_in_threadpool(service.job_view, t, job_id)
                text = json.dumps(view)
                if text != last:
                    last = text
                    yield f"event: progress\ndata: {text}\n\n"
                if view["state"] in ("done", "failed"):
                    yield "event: end\ndata: {}\n\n"
                    return
                if await request.is_disconnected():
                    return
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/v1/jobs/{job_id}/results", tags=["results"])
    def job_results(job_id: str, t: str = Depends(tenant)) -> dict[str, Any]:
        """The ranked images (similarity, gate verdict, metadata) or the training summary."""
        results = service.job_results(t, job_id)
        for image in results["images"]:
            image.pop("_path", None)
        return results

    @app.get("/v1/jobs/{job_id}/images/{image_id}", tags=["results"], response_class=FileResponse)
    def job_image(job_id: str, image_id: str, t: str = Depends(tenant)) -> FileResponse:
        return FileResponse(service.image_path(t, job_id, image_id), media_type="image/png")

    @app.get("/v1/jobs/{job_id}/zip", tags=["results"])
    def job_zip(job_id: str, t: str = Depends(tenant)) -> Response:
        data = service.job_zip(t, job_id)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="portrait-{job_id}.zip"'})

    # -- catalogue -------------------------------------------------------------------------

    @app.get("/v1/templates", tags=["catalogue"])
    def templates(t: str = Depends(tenant)) -> list[dict[str, Any]]:
        return service.templates()

    @app.get("/v1/templates/{name}/preview", tags=["catalogue"])
    def template_preview(name: str, t: str = Depends(tenant)) -> Response:
        data, media = service.template_preview(name)
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    @app.get("/v1/presets", tags=["catalogue"])
    def presets(t: str = Depends(tenant)) -> list[dict[str, Any]]:
        return service.presets()

    @app.get("/v1/presets/{name}", tags=["catalogue"])
    def preset(name: str, t: str = Depends(tenant)) -> dict[str, Any]:
        """Every setting of every section: key, type, default, bounds, help, this preset's value."""
        return service.preset(name)
    @app.get("/v1/backends", tags=["catalogue"])
    def backends(t: str = Depends(tenant)) -> list[dict[str, Any]]:
        """The generation backends (the backend table), each with its options' JSON schema."""
        return service.backends()

    @app.get("/v1/models", tags=["catalogue"])
    def models(t: str = Depends(tenant)) -> list[dict[str, Any]]:
        return service.models()

    return app


class BodyLimit:
    """Refuse a body over the limit before anything reads it (413), and a chunked one without a
    length (411). Plain ASGI: Starlette's BaseHTTPMiddleware costs every request a task hop."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            length = headers.get("content-length")
            refusal = None
            if length is None and "chunked" in headers.get("transfer-encoding", ""):
                refusal = error(411, "send the upload with a Content-Length")
            elif length is not None and (not length.isdigit() or int(length) > self.limit):
                refusal = error(413, f"request body of {length} bytes is over the {self.limit:,} byte limit")
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _options(body: BaseModel) -> dict[str, Any]:
    """count, seed, finish and every declared setting the body gave (by its door name: `size`)."""
    declared = {name: getattr(body, name) for name in door_names(drop_marked=TENANT_ONLY)
                if getattr(body, name, None) is not None}
    return {"count": body.count, "seed": body.seed, "finish": body.finish, **declared}
