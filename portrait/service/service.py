"""`StudioService`: what the HTTP API and the web UI can do, for one tenant at a time.

Every verb takes the tenant first and looks its objects up by (tenant, random id), so a
request can only see its own tenant's identities, jobs and files; an object of another
tenant is indistinguishable from one that does not exist (NotFound, HTTP 404).

Where things live (ROOT = HOME/service):

    ROOT/service.db                 tenants, hashed tokens, identities and jobs per tenant
    ROOT/studio.db                  the studio store (the same store `portrait batch` uses)
    ROOT/identities/<id>/uploads/   the screened uploads, stored as NNN.<ext>
    ROOT/identities/<id>/prepare/   prepare's output: report.json, contact_sheet.png, crops
    HOME/identities/<id>/           the Identity bundle that training writes (the CLI's place)
    ROOT/jobs/<job>/                a generation job's outputs, placed by the studio executor

Paths are built from random ids only; no name from a request ever becomes part of one.
Training and generation are items in the store, run by the service's workers with the same
executor as `portrait batch`, so they survive a crash of the server and run exactly once.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable

from portrait.core.bundle import check_name
from portrait.core.config import Settings, load_preset
from portrait.core.errors import BadInput, PortraitError
from portrait.core.lock import identity_lock
from portrait.studio.runner import StudioPolicy
from portrait.studio.spec import Job, content_id, expand, parse_spec, train_item
from portrait.studio.store import ItemRow, Store

from .policy import ServicePolicy
from .tenants import IdentityRow, JobRow, TenantDB, new_id
from .uploads import Screened, Upload, screen


class NotFound(PortraitError):
    """No such object for this tenant (HTTP 404)."""


class Busy(PortraitError):
    """The object is in a state that does not allow this now (HTTP 409)."""


class RejectedUpload(BadInput):
    """Prepare refused the photos; carries the per-photo report so the client sees why."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


def job_state(counts: dict[str, int]) -> str:
    if counts.get("running"):
        return "running"
    if counts.get("pending"):
        return "queued"
    if counts.get("failed"):
        return "failed"
    return "done"


def item_fraction(row: ItemRow, progress: dict[str, Any] | None) -> float:
    if row.state in ("done", "failed"):
        return 1.0
    if row.state != "running" or not progress:
        return 0.0
    total = float(progress.get("total") or 0)
    share = float(progress.get("done") or 0) / total if total > 0 else 0.0
    if row.item.kind != "train":
        return min(share, 0.99)
    steps = float(progress.get("steps") or 0)
    if steps > 0:  # training steps dominate: 10% before the first step, 90% over the steps
        return min(0.10 + 0.89 * float(progress.get("step") or 0) / steps, 0.99)
    return min(0.02 + 0.08 * min(share, 1.0), 0.10)


class StudioService:
    def __init__(self, settings: Settings, policy: ServicePolicy | None = None,
                 studio_policy: StudioPolicy | None = None, wake: Callable[[], None] | None = None):
        from portrait.preset_schema import load

        preset = load(settings.preset)  # the whole preset file against the declarations
        self.settings = settings
        self.policy = policy or ServicePolicy.from_preset(preset)
        self.studio_policy = studio_policy or StudioPolicy.from_preset(preset)
        self.root = settings.home / "service"
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = TenantDB(self.root / "service.db")
        self.store = Store(self.root / "studio.db", self.studio_policy.retry)
        self.wake = wake or (lambda: None)
        self._ctx = None
        self._ctx_lock = threading.Lock()
        self._cards: dict[str, bytes] = {}

    # -- places ---------------------------------------------------------------------------

    def identity_root(self, identity_id: str) -> Path:
        return self.root / "identities" / check_name(identity_id)

    def bundle_root(self, identity_id: str) -> Path:
        return self.settings.identities_dir / check_name(identity_id)

    def job_root(self, job_id: str) -> Path:
        return self.root / "jobs" / check_name(job_id)

    def context(self):
        """One warm RunContext for prepare in the server process (face models stay loaded)."""
        from portrait.core.context import RunContext

        if self._ctx is None:
            self._ctx = RunContext.create(self.settings, preset=self.settings.preset)
        return self._ctx

    # -- identities -----------------------------------------------------------------------

    def create_identity(self, tenant: str, name: str, uploads: Iterable[Upload]) -> dict[str, Any]:
        """Screen the uploads, run prepare on what passed, keep the identity if enough photos are usable."""
        check_name(name)
        screened = screen(uploads, self.policy)
        identity_id = new_id("i")
        folder = self.identity_root(identity_id)
        try:
            stored = screened.write(folder / "uploads")
            report = self._prepare(identity_id, folder, screened, stored)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.db.add_identity(tenant, identity_id, name, report)
        return self.identity_view(self._identity(tenant, identity_id))

    def _prepare(self, identity_id: str, folder: Path, screened: Screened, stored: dict[str, str]) -> dict[str, Any]:
        from portrait.core.declare import from_preset
        from portrait.flows.prepare import PREPARE_READERS, PrepareFlowPolicy, prepare, write_prepare_sheet

        rows: dict[str, dict[str, Any]] = {row["path"]: row for row in screened.rejected}
        minimum = from_preset(PrepareFlowPolicy, load_preset(self.settings.preset), shared=PREPARE_READERS).min_photos
        if stored:
            with self._ctx_lock:
                ctx = self.context()
                try:
                    result = prepare(list(stored), folder / "prepare", ctx=ctx)
                    failure = None
                except BadInput as exc:
                    result, failure = None, exc
            prepared = json.loads((folder / "prepare" / "report.json").read_text()) \
                if (folder / "prepare" / "report.json").is_file() else {"photos": []}
            for row in prepared["photos"]:
                row["path"] = stored.get(row["path"], Path(row["path"]).name)
                rows[row["path"]] = row
            if result is not None:
                # The contact sheet again, under the names the customer gave (prepare saw NNN.jpg).
                relabeled = [dataclasses.replace(a, source=stored.get(a.source, a.source))
                             for a in result.training_set.assessments]
                write_prepare_sheet(folder / "prepare" / "contact_sheet.png", relabeled)
        else:
            failure = BadInput("no usable photo")
        photos = [rows[label] for label in screened.order if label in rows]
        kept = sum(r["status"] == "kept" for r in photos)
        report = {"photos": photos, "kept": kept, "rejected": len(photos) - kept}
        if failure is not None or kept < minimum:
            counts: dict[str, int] = {}
            for r in photos:
                if r["status"] == "rejected":
                    counts[r["reason"]] = counts.get(r["reason"], 0) + 1
            reasons = ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "none rejected"
            raise RejectedUpload(f"only {kept} usable photo(s) of {len(photos)}, need {minimum} ({reasons})", report)
        return report

    def _identity(self, tenant: str, identity_id: str) -> IdentityRow:
        row = self.db.identity(tenant, identity_id)
        if row is None:
            raise NotFound(f"identity '{identity_id}' not found")
        return row

    def identity_state(self, row: IdentityRow) -> str:
        if (self.bundle_root(row.id) / "manifest.json").is_file():
            return "ready"
        if row.train_job:
            job = self.db.job(row.tenant, row.train_job)
            if job is not None:
                state = job_state(self.store.counts([job.store_job]))
                return {"running": "training", "queued": "training", "failed": "failed"}.get(state, "ready")
        return "prepared"

    def identity_view(self, row: IdentityRow) -> dict[str, Any]:
        state = self.identity_state(row)
        trained: dict[str, Any] = {}
        manifest_path = self.bundle_root(row.id) / "manifest.json"
        if state == "ready" and manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            trained = {"lora": sorted((manifest.get("loras") or {})), "trigger": manifest.get("trigger"),
                       "class_word": manifest.get("class_word"),
                       "resumed_from": (manifest.get("train") or {}).get("resumed_from"),
                       "steps": (manifest.get("train") or {}).get("steps")}
        return {"id": row.id, "name": row.name, "created": row.created, "state": state, "trained": trained or None,
                "train_job": row.train_job, "report": row.report,
                "contact_sheet": f"/v1/identities/{row.id}/contact-sheet"}

    def list_identities(self, tenant: str) -> list[dict[str, Any]]:
        return [self.identity_view(r) for r in self.db.identities(tenant)]

    def show_identity(self, tenant: str, identity_id: str) -> dict[str, Any]:
        return self.identity_view(self._identity(tenant, identity_id))

    def contact_sheet(self, tenant: str, identity_id: str) -> Path:
        self._identity(tenant, identity_id)
        path = self.identity_root(identity_id) / "prepare" / "contact_sheet.png"
        if not path.is_file():
            raise NotFound(f"identity '{identity_id}' has no contact sheet")
        return path

    def delete_identity(self, tenant: str, identity_id: str) -> dict[str, Any]:
        """Erase the identity: uploads, crops, embeddings, LoRA, every output made from it, and its jobs."""
        self._identity(tenant, identity_id)
        jobs = [j for j in self.db.jobs(tenant, limit=1_000_000) if identity_id in j.identities]
        store_jobs = [j.store_job for j in jobs]
        if store_jobs:
            self.store.cancel(store_jobs, "cancelled: the identity was deleted")
            running = self.store.counts(store_jobs)["running"]
            if running:
                raise Busy(f"identity '{identity_id}' has {running} item(s) running; its queued work is cancelled, "
                           "delete again when they finish")
        gone = self.db.delete_identity(tenant, identity_id)
        self.store.forget([j.store_job for j in gone])
        idir = self.settings.identities_dir
        folders = [self.identity_root(identity_id), self.bundle_root(identity_id),
                   *(idir / f".{identity_id}.{suffix}" for suffix in ("work", "staging", "old")),
                   *(self.job_root(j.id) for j in gone)]
        removed = 0
        with identity_lock(idir, identity_id):  # no trainer may be writing while it is erased
            for folder in folders:
                if folder.exists():
                    removed += sum(1 for p in folder.rglob("*") if p.is_file())
                    shutil.rmtree(folder)
            # The lock file's name is the identity's id: it goes too (the id is never reused).
            (idir / f".{identity_id}.lock").unlink(missing_ok=True)
        return {"deleted": identity_id, "jobs_deleted": len(gone), "files_removed": removed}

    # -- jobs -----------------------------------------------------------------------------

    def submit_train(self, tenant: str, identity_id: str, *, zero_shot: bool = False,
                     steps: int | None = None) -> dict[str, Any]:
        row = self._identity(tenant, identity_id)
        state = self.identity_state(row)
        if state in ("ready", "training"):
            raise Busy(f"identity '{identity_id}' is already {'trained' if state == 'ready' else 'training'}")
        photos = sorted(str(p) for p in (self.identity_root(identity_id) / "uploads").iterdir())
        item = train_item(identity_id, photos, zero_shot=zero_shot, preset=self.settings.preset, steps=steps)
        job_id = new_id("j")
        params = {"zero_shot": zero_shot, "steps": steps}
        store_job = Job(id=content_id({"service_job": job_id}, 12), source=f"service:{tenant}:{job_id}",
                        spec={"service_job": job_id, "kind": "train", **params}, items=(item,))
        self._submit(store_job)
        self.db.add_job(JobRow(job_id, tenant, "train", store_job.id, (identity_id,), params, time.time()))
        self.db.set_train_job(tenant, identity_id, job_id)
        self.wake()
        return self.job_view(tenant, job_id)

    def submit_generate(self, tenant: str, identities: list[str], *, templates: list[str] | None = None,
                        prompts: list[str] | None = None, backends: list[str] | None = None, count: int = 1,
                        seed: int = 0, finish: bool | dict[str, bool] = True, kind: str = "generate",
                        **settings: Any) -> dict[str, Any]:
        """`settings`: the declared generate settings (portrait.core.request) by their door names
        (size, steps, guidance, scheduler, fast, options, ...), checked as the batch spec's."""
        from portrait.stages.templates import shipped_templates

        templates, prompts = list(templates or []), list(prompts or [])
        if not identities:
            raise BadInput("give at least one identity")
        train_items: dict[str, str] = {}
        for identity_id in identities:
            row = self._identity(tenant, identity_id)
            state = self.identity_state(row)
            if state == "training":
                train_items[identity_id] = self._train_item_id(tenant, row)
            elif state != "ready":
                raise Busy(f"identity '{identity_id}' is not trained yet (state {state}); POST /v1/jobs/train first")
        shipped = {t.name for t in shipped_templates()}
        unknown = [t for t in templates if t not in shipped]
        if unknown:
            # Only shipped templates by name: a path from a request must never be opened.
            raise BadInput(f"unknown template '{unknown[0]}' (known: {', '.join(sorted(shipped))})")
        for prompt in prompts:
            if len(prompt) > self.policy.max_prompt_chars:
                raise BadInput(f"prompt: {len(prompt)} characters; the limit is {self.policy.max_prompt_chars}")
        if not 1 <= count <= self.policy.max_count:
            raise BadInput(f"count: {count}; use 1-{self.policy.max_count}")
        job_id = new_id("j")
        spec: dict[str, Any] = {"output": str(self.job_root(job_id)), "identities": list(identities),
                                "templates": templates, "prompts": prompts, "backends": backends or ["lora"],
                                "count": count, "seed": seed, "finish": finish,
                                **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}
        parsed = parse_spec({k: v for k, v in spec.items() if v is not None}, source="request")
        job = expand(parsed, base_dir=self.root, default_preset=self.settings.preset, source=f"service:{tenant}:{job_id}",
                     identity_exists=lambda name: True)
        items = tuple(dataclasses.replace(i, depends_on=train_items.get(i.payload["identity"])) for i in job.items)
        job = dataclasses.replace(job, items=items)
        self._submit(job)
        params = {k: v for k, v in spec.items() if k not in ("output", "identities")}
        self.db.add_job(JobRow(job_id, tenant, kind, job.id, tuple(identities), params, time.time()))
        self.wake()
        return self.job_view(tenant, job_id)

    def _train_item_id(self, tenant: str, row: IdentityRow) -> str:
        job = self.db.job(tenant, row.train_job or "")
        items = self.store.status([job.store_job]).items if job else ()
        if not items:
            raise Busy(f"identity '{row.id}' has no training job")
        return items[0].item.id

    def _submit(self, job: Job) -> None:
        self.store.submit(job)
        # Content ids: an item a failed earlier job shares (the same training) gets another go.
        if self.store.counts([job.id])["failed"]:
            self.store.retry_failed([job.id])

    def _job(self, tenant: str, job_id: str) -> JobRow:
        row = self.db.job(tenant, job_id)
        if row is None:
            raise NotFound(f"job '{job_id}' not found")
        return row

    def list_jobs(self, tenant: str) -> list[dict[str, Any]]:
        return [self._job_view(row) for row in self.db.jobs(tenant)]

    def job_view(self, tenant: str, job_id: str) -> dict[str, Any]:
        return self._job_view(self._job(tenant, job_id))

    def _job_view(self, row: JobRow) -> dict[str, Any]:
        status = self.store.status([row.store_job])
        items = status.items
        running = [r.item.id for r in items if r.state == "running"]
        progress = self.store.progress(running)
        fractions = [item_fraction(r, progress.get(r.item.id)) for r in items]
        fraction = sum(fractions) / len(fractions) if fractions else 1.0
        state = job_state(status.counts)
        started = [r.started for r in items if r.started]
        eta = None
        if state in ("running", "queued") and started and fraction > 0.02:
            elapsed = time.time() - min(started)
            eta = round(elapsed * (1 - fraction) / fraction, 1)
        if row.kind == "train" and items:
            p = progress.get(items[0].item.id) or {}
            step, total = int(p.get("step") or 0), int(p.get("steps") or 0)
            if state == "done":
                step = total = int((self._train_summary(row) or {}).get("steps") or 0)
            phase = p.get("phase") if state == "running" else state
        else:
            step, total = status.counts["done"] + status.counts["failed"], len(items)
            phase = next((progress[i].get("phase") for i in running if i in progress), None) or state
        failed = [r for r in items if r.state == "failed"]
        return {
            "id": row.id, "kind": row.kind, "state": state, "created": row.created, "identities": list(row.identities),
            "params": row.params,
            "progress": {"fraction": round(fraction, 4), "step": step, "total": total, "phase": phase,
                         "eta_seconds": eta, "items": {**status.counts, "total": len(items)}},
            "error": failed[0].error if failed else None,
            "error_kind": failed[0].error_kind if failed else None,
            "results": f"/v1/jobs/{row.id}/results",
        }

    def _train_summary(self, row: JobRow) -> dict[str, Any] | None:
        manifest = self.bundle_root(row.identities[0]) / "manifest.json"
        if not manifest.is_file():
            return None
        data = json.loads(manifest.read_text())
        return {**(data.get("train") or {}), "lora": sorted(data.get("loras") or {}), "trigger": data.get("trigger")}

    def job_results(self, tenant: str, job_id: str) -> dict[str, Any]:
        row = self._job(tenant, job_id)
        view = self._job_view(row)
        if row.kind == "train":
            summary = self._train_summary(row) if view["state"] == "done" else None
            if summary:
                summary = {k: v for k, v in summary.items() if k not in ("params",)}
            return {"job": view, "identity": row.identities[0], "train": summary, "images": []}
        return {"job": view, "images": self._images(row)}

    def _images(self, row: JobRow) -> list[dict[str, Any]]:
        from portrait.core.io import read_png_text

        images = []
        for r in self.store.status([row.store_job]).items:
            if r.state != "done" or r.item.kind != "generate" or not r.outputs:
                continue
            p = r.item.payload
            for index, output in enumerate(r.outputs):
                meta_rows = r.meta.get("results") or [{}]
                m = meta_rows[min(index, len(meta_rows) - 1)]
                path = Path(output)
                try:
                    parameters = read_png_text(path).get("parameters")
                except OSError:
                    parameters = None
                images.append({
                    "id": r.item.id if len(r.outputs) == 1 else f"{r.item.id}-{index}",
                    "identity": p["identity"], "template": p["template"], "prompt": p["prompt"],
                    "backend": r.meta.get("backend", p["backend"]), "seed": m.get("seed", p["seed"]),
                    "similarity": m.get("similarity"), "passed_gate": m.get("passed_gate"),
                    "reference_similarity": m.get("reference_similarity"), "clip_t": m.get("clip_t"),
                    "faces": m.get("faces"), "timings": m.get("timings"), "parameters": parameters,
                    "url": f"/v1/jobs/{row.id}/images/{r.item.id if len(r.outputs) == 1 else f'{r.item.id}-{index}'}",
                    "_path": str(path),
                })
        images.sort(key=lambda im: (im["similarity"] is None, -(im["similarity"] or 0.0), im["seed"]))
        for rank, image in enumerate(images, 1):
            image["rank"] = rank
        return images

    def image_path(self, tenant: str, job_id: str, image_id: str) -> Path:
        row = self._job(tenant, job_id)
        for image in self._images(row):
            if image["id"] == image_id:
                path = Path(image["_path"])
                if path.is_file():
                    return path
        raise NotFound(f"image '{image_id}' not found in job '{job_id}'")

    def job_zip(self, tenant: str, job_id: str) -> bytes:
        row = self._job(tenant, job_id)
        images = self._images(row)
        if not images:
            raise NotFound(f"job '{job_id}' has no images yet")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
            rows = []
            for image in images:
                name = f"{image['rank']:03d}_{image['backend']}_s{image['seed']}.png"
                zf.write(image["_path"], name)
                rows.append({**{k: v for k, v in image.items() if k not in ("_path", "url")}, "file": name})
            zf.writestr("results.json", json.dumps({"job": job_id, "results": rows}, indent=2))
        return buffer.getvalue()

    # -- catalogue ------------------------------------------------------------------------

    def templates(self) -> list[dict[str, Any]]:
        from portrait.stages.templates import shipped_templates

        return [{"name": t.name, "kind": t.kind, "title": t.title or t.name, "description": t.description,
                 "backend": "template" if t.kind == "photo" else "lora",
                 "preview": f"/v1/templates/{t.name}/preview"} for t in shipped_templates()]

    def backends(self) -> list[dict[str, Any]]:
        """The backend table: name, families, help, what it needs, and its options' JSON schema
        (types, defaults, bounds: the declaration the options are validated against)."""
        from portrait.stages.backends import BACKENDS

        return [{"name": s.name, "families": list(s.families), "help": s.help, "needs_lora": s.needs_lora,
                 "group": s.group, "photo_template": s.photo_template, "license": s.license or None,
                 "fast": {mode: dataclasses.asdict(how) for mode, how in s.fast.items()},
                 "options": s.options.model_json_schema()} for s in BACKENDS.specs()]

    def template_preview(self, name: str) -> tuple[bytes, str]:
        """The photo of a photo template; a rendered card (title, prompt) for a style template."""
        from portrait.stages.templates import shipped_templates

        found = [t for t in shipped_templates() if t.name == name]
        if not found:
            raise NotFound(f"template '{name}' not found")
        template = found[0]
        if template.kind == "photo" and template.image is not None and Path(template.image).is_file():
            return _thumbnail(Path(template.image)), "image/jpeg"
        if name not in self._cards:
            self._cards[name] = _card(template)
        return self._cards[name], "image/png"

    def presets(self) -> list[dict[str, Any]]:
        from portrait.preset_schema import catalogue

        return catalogue()

    def preset(self, name: str) -> dict[str, Any]:
        """A shipped preset's declared schema and values (never a file path from the request)."""
        from portrait.core.config import available_presets
        from portrait.preset_schema import show

        if name not in available_presets():
            raise NotFound(f"preset '{name}' not found")
        return show(name)

    def models(self) -> list[dict[str, Any]]:
        from portrait.core.registry import Registry, model_table

        return model_table(Registry.load(), self.settings)

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "preset": self.settings.preset, "queue": self.store.counts()}


def _thumbnail(path: Path, side: int = 320) -> bytes:
    from portrait.core.formats.images import thumbnail_bytes

    return thumbnail_bytes(path, side, "JPEG", quality=85)


def _card(template, size: tuple[int, int] = (320, 320)) -> bytes:
    """A preview card for a style template: its title and prompt on a colour drawn from its name."""
    import hashlib
    import textwrap

    from PIL import Image, ImageDraw

    digest = hashlib.sha256(template.name.encode()).digest()
    top, bottom = tuple(40 + b % 120 for b in digest[:3]), tuple(20 + b % 60 for b in digest[3:6])
    card = Image.new("RGB", size)
    draw = ImageDraw.Draw(card)
    for y in range(size[1]):
        t = y / (size[1] - 1)
        draw.line((0, y, size[0], y), fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))
    draw.text((16, 16), (template.title or template.name)[:32], fill=(255, 255, 255), font_size=24)
    prompt = template.prompt.replace("{trigger}", "you").replace("{class}", "").strip()
    for i, line in enumerate(textwrap.wrap(prompt, 34)[:9]):
        draw.text((16, 64 + i * 22), line, fill=(235, 235, 235), font_size=15)
    out = io.BytesIO()
    card.save(out, "PNG", optimize=True)
    return out.getvalue()
