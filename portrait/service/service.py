"""`StudioService`: what the HTTP API and the web UI can do, for one tenant at a time.

Every id a request names goes through one resolver (`Scope.resolve`, service/scope.py) that
takes the tenant and returns a handle or NotFound (HTTP 404): another tenant's object is
indistinguishable from one that does not exist. The items put into the store carry paths
taken from handles (the bundle folder of each person in the picture, an asset's file), so the
workers never open an identity by a string a request held.

Where things live (ROOT = HOME/service):

    ROOT/service.db                 tenants, hashed tokens, identities, jobs, assets, usage, audit log
    ROOT/studio.db                  the studio store (the same store `portrait batch` uses)
    ROOT/identities/<id>/uploads/   the screened uploads, stored as NNN.<ext>
    ROOT/identities/<id>/prepare/   prepare's output: report.json, contact_sheet.png, crops
    ROOT/assets/<id>/               an uploaded image (image.<ext>) and the template.yaml that
                                    lets it serve as a photo template
    HOME/identities/<id>/           the Identity bundle that training writes (the CLI's place)
    ROOT/jobs/<job>/                a generation job's outputs, placed by the studio executor

Paths are built from random ids only; no name from a request ever becomes part of one.
Training and generation are items in the store, run by the service's workers with the same
executor as `portrait batch`, so they survive a crash of the server and run exactly once.

Everything a request says is checked at submit (`_plan`): references, the options a tenant
may set (their declarations say which: portrait.core.options.tenant_options), sizes, counts
and steps against the preset's limits, backend and preset family, a dry resolution of each
(backend, template) pair with the generate stage's own resolver, and the tenant's quotas
(TenantPolicy: queued items, active jobs, images per day, stored bytes). The worker then has
nothing left to refuse that a 4xx could have told.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import queue
import shutil
import threading
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from portrait.core.bundle import check_name
from portrait.core.config import Settings, load_preset
from portrait.core.errors import BadInput, PortraitError
from portrait.core.lock import identity_lock
from portrait.studio.runner import StudioPolicy
from portrait.studio.spec import Job, backend_overrides, content_id, expand, parse_spec, train_item
from portrait.studio.store import ItemRow, Store

from .desk import Busy, InvalidField, StudioDesk, public_image, public_text
from .policy import ServicePolicy, TenantPolicy
from .requests import BatchFields, GenerateFields, ShootFields, declared_settings
from .scope import AssetHandle, IdentityHandle, JobHandle, NotFound, Scope
from .tenants import AssetRow, IdentityRow, JobRow, TenantDB, new_id
from .uploads import Screened, Upload, screen, sniff

__all__ = ["Busy", "InvalidField", "NotFound", "QuotaExceeded", "RejectedUpload", "StudioService"]


class QuotaExceeded(PortraitError):
    """The tenant's limit (TenantPolicy) would be passed (HTTP 429); the detail names the key."""


class RejectedUpload(BadInput):
    """Prepare refused the photos; carries the per-photo report so the client sees why."""

    def __init__(self, message: str, report: dict[str, Any]):
        super().__init__(message)
        self.report = report


CANCELLED = "cancelled"


def job_state(counts: dict[str, int], cancelled: int = 0) -> str:
    if counts.get("running"):
        return "running"
    if counts.get("pending"):
        return "queued"
    if counts.get("failed", 0) > cancelled:
        return "failed"
    if cancelled:
        return CANCELLED
    return "done"


SETTLED = ("done", "failed", CANCELLED)


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


def iso(when: float) -> str:
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="seconds")


def folder_stats(folder: Path) -> tuple[int, int]:
    """(files, bytes) under a folder (0, 0 when it does not exist)."""
    files = size = 0
    if folder.is_dir():
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                files += 1
                size += path.stat().st_size
    return files, size


class ContextPool:
    """RunContexts for the photo checks of uploads: up to `size` at once, each used by one
    upload at a time (its face models are its own, so two checks never share a model object).
    Uploads of different identities run side by side; more wait for a free context."""

    def __init__(self, factory: Callable[[], Any], size: int):
        self.factory, self.size = factory, size
        self._free: queue.LifoQueue = queue.LifoQueue()
        self._made = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def context(self) -> Iterator[Any]:
        try:
            ctx = self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                make = self._made < self.size
                if make:
                    self._made += 1
            if make:
                try:
                    ctx = self.factory()
                except BaseException:
                    with self._lock:
                        self._made -= 1
                    raise
            else:
                ctx = self._free.get()
        try:
            yield ctx
        finally:
            self._free.put(ctx)


class StudioService(StudioDesk):
    def __init__(self, settings: Settings, policy: ServicePolicy | None = None,
                 studio_policy: StudioPolicy | None = None, wake: Callable[[], None] | None = None):
        from portrait.preset_schema import load

        preset = load(settings.preset)  # the whole preset file against the declarations
        self.settings = settings
        self.base = load_preset(settings.preset)  # the server's preset (limits, family)
        self.policy = policy or ServicePolicy.from_preset(preset)
        self.studio_policy = studio_policy or StudioPolicy.from_preset(preset)
        self.root = settings.home / "service"
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = TenantDB(self.root / "service.db")
        self.store = Store(self.root / "studio.db", self.studio_policy.retry)
        self.scope = Scope(self.db, self.root, settings.identities_dir)
        self.wake = wake or (lambda: None)
        self._contexts = ContextPool(self._new_context, self.policy.upload_workers)
        self._cards: dict[str, bytes] = {}
        self._bytes: dict[str, tuple[float, int]] = {}

    def _new_context(self):
        from portrait.core.context import RunContext

        return RunContext.create(self.settings, preset=self.settings.preset)

    # -- places ---------------------------------------------------------------------------

    def identity_root(self, identity_id: str) -> Path:
        return self.root / "identities" / check_name(identity_id)

    def bundle_root(self, identity_id: str) -> Path:
        return self.settings.identities_dir / check_name(identity_id)

    def job_root(self, job_id: str) -> Path:
        return self.root / "jobs" / check_name(job_id)

    def asset_root(self, asset_id: str) -> Path:
        return self.root / "assets" / check_name(asset_id)

    # -- tenants ----------------------------------------------------------------------------

    def tenant_policy(self, tenant: str) -> TenantPolicy:
        """The defaults (the preset's service.tenant) with the tenant's stored overrides."""
        return self.policy.tenant.with_overrides(self.db.tenant_settings(tenant),
                                                 f"tenant '{self.db.tenant_name(tenant)}' settings")

    def stored_bytes(self, tenant: str, fresh: bool = False) -> int:
        """Bytes the tenant keeps on this server: uploads, identities, assets, results (walked
        at most every 10 s; the quota check needs the order of magnitude, not the last byte)."""
        cached = self._bytes.get(tenant)
        if cached and not fresh and time.monotonic() - cached[0] < 10.0:
            return cached[1]
        total = 0
        for row in self.db.identities(tenant):
            handle = self.scope.handle_of(row)
            total += folder_stats(handle.folder)[1] + folder_stats(handle.bundle)[1]
        for job in self.db.all_jobs(tenant):
            total += folder_stats(self.job_root(job.id))[1]
        total += sum(a.bytes for a in self.db.assets(tenant))
        self._bytes[tenant] = (time.monotonic(), total)
        return total

    def _check_storage(self, tenant: str, policy: TenantPolicy, adding: int = 0) -> None:
        used = self.stored_bytes(tenant)
        if used + adding > policy.max_stored_bytes:
            raise QuotaExceeded(f"max_stored_bytes: {used + adding:,} bytes would be stored, the limit is "
                                f"{policy.max_stored_bytes:,}; delete identities, assets or jobs first")

    def usage(self, tenant: str) -> dict[str, Any]:
        """The tenant's queue, limits and use (what /v1/usage shows it)."""
        policy = self.tenant_policy(tenant)
        counts = self.store.owner_counts(tenant)
        return {"limits": dataclasses.asdict(policy),
                "queued_items": counts["pending"] + counts["running"], "running_items": counts["running"],
                "active_jobs": self.store.active_jobs(tenant), "images_today": self.db.images_today(tenant, time.time()),
                "stored_bytes": self.stored_bytes(tenant, fresh=True)}

    # -- identities -----------------------------------------------------------------------

    def check_new_name(self, tenant: str, name: str) -> str:
        """A new identity's name: valid, and not one the tenant already uses (any case), so
        every action the page names by it means one identity."""
        check_name(name)
        taken = {row.name.casefold() for row in self.db.identities(tenant)}
        if name.casefold() in taken:
            raise Busy(f"an identity named '{name}' exists already; choose another name")
        return name

    def create_identity(self, tenant: str, name: str, uploads: Iterable[Upload],
                        progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Screen the uploads, run prepare on what passed, keep the identity if enough photos are
        usable. `progress` receives events as the photos are checked: `screened` (each upload
        received or refused), `checking` (prepare's phase, photos done, total)."""
        self.check_new_name(tenant, name)
        policy = self.tenant_policy(tenant)
        self._check_storage(tenant, policy)
        screened = screen(uploads, self.policy)
        if progress is not None:
            refused = {row["path"]: row for row in screened.rejected}
            progress({"event": "screened", "photos": [
                {"name": label, "status": "rejected", "reason": refused[label]["reason"]} if label in refused
                else {"name": label, "status": "received"} for label in screened.order]})
        self._check_storage(tenant, policy, sum(len(data) for _, data, _ in screened.accepted))
        identity_id = new_id("i")
        folder = self.identity_root(identity_id)
        try:
            stored = screened.write(folder / "uploads")
            report = self._prepare(identity_id, folder, screened, stored, progress)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.check_new_name(tenant, name)  # another upload of the same name may have finished meanwhile
        self.db.add_identity(tenant, identity_id, name, report)
        self._bytes.pop(tenant, None)
        return self.identity_view(self.scope.identity(tenant, identity_id))

    def _prepare(self, identity_id: str, folder: Path, screened: Screened, stored: dict[str, str],
                 progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        from portrait.core.declare import from_preset
        from portrait.flows import prepare as prepare_flow
        from portrait.flows.prepare import PREPARE_READERS, PrepareFlowPolicy, write_prepare_sheet

        rows: dict[str, dict[str, Any]] = {row["path"]: row for row in screened.rejected}
        minimum = from_preset(PrepareFlowPolicy, self.base, shared=PREPARE_READERS).min_photos
        if stored:
            # Each identity's photos are checked with a context of the pool: uploads of several
            # tenants run side by side (ServicePolicy.upload_workers), none waits on one lock.
            with self._contexts.context() as ctx:
                def report_phase(phase: str, done: float, total: float) -> None:
                    if progress is not None:
                        progress({"event": "checking", "phase": phase, "done": int(done), "total": int(total)})

                try:
                    result = prepare_flow.prepare(list(stored), folder / "prepare", ctx=ctx, progress=report_phase)
                    failure = None
                except BadInput as exc:
                    result, failure = None, exc
            prepared = json.loads((folder / "prepare" / "report.json").read_text()) \
                if (folder / "prepare" / "report.json").is_file() else {"photos": []}
            for row in prepared["photos"]:
                row["path"] = stored.get(row["path"], Path(row["path"]).name)
                # a detail may name another stored photo ("same picture as .../003.jpg"): its label
                row["detail"] = public_text(row.get("detail"), stored)
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
        for index, label in enumerate(stored.values()):  # the stored NNN.<ext>, in upload order
            if label in rows:
                rows[label]["thumbnail"] = f"/v1/identities/{identity_id}/photos/{index}"
        return report

    def identity_state(self, row: IdentityRow) -> str:
        if row.expired:
            return "expired"
        if (self.bundle_root(row.id) / "manifest.json").is_file():
            return "ready"
        if row.train_job:
            job = self.db.job(row.tenant, row.train_job)
            if job is not None:
                state = self._state(job)
                return {"running": "training", "queued": "training", "failed": "failed",
                        CANCELLED: "prepared"}.get(state, "ready")
        return "prepared"

    def identity_view(self, handle: IdentityHandle) -> dict[str, Any]:
        row = handle.row
        state = self.identity_state(row)
        trained: dict[str, Any] = {}
        manifest_path = handle.bundle / "manifest.json"
        if state == "ready" and manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            record = manifest.get("train") or {}
            trained = {"lora": sorted((manifest.get("loras") or {})), "trigger": manifest.get("trigger"),
                       "class_word": manifest.get("class_word"), "resumed_from": record.get("resumed_from"),
                       "steps": record.get("steps"), "max_steps": record.get("max_steps"),
                       "stopped_early": record.get("stopped_early"), "stop_reason": record.get("stop_reason"),
                       # the likeness curve (step 0 = the base model), as the train summary plots it
                       "curve": [{"step": r.get("step"), "likeness": r.get("score"), "clip_t": r.get("clip_t"),
                                  "selected": r.get("selected")} for r in manifest.get("validation") or []]}
        return {"id": row.id, "name": row.name, "created": row.created, "state": state, "trained": trained or None,
                "train_job": row.train_job, "report": row.report, "expired": row.expired,
                "contact_sheet": f"/v1/identities/{row.id}/contact-sheet"}

    def list_identities(self, tenant: str) -> list[dict[str, Any]]:
        return [self.identity_view(self.scope.handle_of(r)) for r in self.db.identities(tenant)]

    def show_identity(self, tenant: str, identity_id: str) -> dict[str, Any]:
        return self.identity_view(self.scope.identity(tenant, identity_id))

    def photo_thumbnail(self, tenant: str, identity_id: str, index: int, side: int = 256) -> bytes:
        """A small JPEG of the identity's stored upload number `index` (the report's thumbnail)."""
        from portrait.core.formats.images import thumbnail_bytes

        handle = self.scope.identity(tenant, identity_id)
        folder = handle.folder / "uploads"
        photos = sorted(folder.iterdir()) if folder.is_dir() else []
        if not 0 <= index < len(photos):
            raise NotFound(f"identity '{identity_id}' has no photo {index}")
        return thumbnail_bytes(photos[index], side, "JPEG", quality=85)

    def contact_sheet(self, tenant: str, identity_id: str) -> Path:
        handle = self.scope.identity(tenant, identity_id)
        path = handle.folder / "prepare" / "contact_sheet.png"
        if not path.is_file():
            raise NotFound(f"identity '{identity_id}' has no contact sheet")
        return path

    def delete_identity(self, tenant: str, identity_id: str, action: str = "delete_identity") -> dict[str, Any]:
        """Erase the identity: uploads, crops, embeddings, LoRA, every output made from it in any
        job (a group picture it is in too) and every row naming it. Returns the receipt, which
        the audit log keeps (ids and counts only)."""
        handle = self.scope.identity(tenant, identity_id)
        self._stop_jobs(self.db.jobs_using(identity_id), f"identity '{identity_id}'")
        jobs = self.db.jobs_using(identity_id)
        removed = self._erase_jobs(jobs)
        gone, rows = self.db.delete_identity(tenant, identity_id)
        removed["rows"] += rows + self._history().forget(identity_id)
        idir = self.settings.identities_dir
        folders = [handle.folder, handle.bundle, *(idir / f".{identity_id}.{suffix}" for suffix in ("work", "staging", "old"))]
        with identity_lock(idir, identity_id):  # no trainer may be writing while it is erased
            for folder in folders:
                self._remove(folder, removed)
            # The lock file's name is the identity's id: it goes too (the id is never reused).
            (idir / f".{identity_id}.lock").unlink(missing_ok=True)
        return self._receipt(tenant, action, identity_id, "identity", removed)

    def _stop_jobs(self, jobs: list[JobRow], what: str, wait: float = 15.0) -> None:
        """Cancel the jobs' queued items and stop their running ones (each stops at its next
        step); wait a little for them, else Busy."""
        store_jobs = [j.store_job for j in jobs]
        if not store_jobs:
            return
        self.store.cancel(store_jobs, f"cancelled: {what} is being deleted", running=True)
        deadline = time.monotonic() + wait
        while (running := self.store.counts(store_jobs)["running"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if running:
            raise Busy(f"{what} has {running} item(s) still running; they were asked to stop, delete again in a moment")

    def _erase_jobs(self, jobs: list[JobRow]) -> dict[str, int]:
        removed = {"jobs": len(jobs), "items": 0, "images": 0, "files": 0, "bytes": 0, "rows": 0}
        if not jobs:
            return removed
        store_jobs = [j.store_job for j in jobs]
        for r in self.store.status(store_jobs).items:
            if r.item.kind == "generate" and r.state == "done":
                removed["images"] += len(r.outputs)
        removed["items"] = self.store.forget(store_jobs)
        removed["rows"] += removed["items"]
        history = self._history()
        for job in jobs:
            self._remove(self.job_root(job.id), removed)
            removed["rows"] += history.forget_job(job.id)
        for tenant in {j.tenant for j in jobs}:
            self._bytes.pop(tenant, None)
        return removed

    @staticmethod
    def _remove(folder: Path, removed: dict[str, int]) -> None:
        if folder.exists():
            files, size = folder_stats(folder)
            removed["files"] += files
            removed["bytes"] += size
            shutil.rmtree(folder)

    def _receipt(self, tenant: str, action: str, subject: str, kind: str, removed: dict[str, int],
                 now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        self.db.add_audit(tenant, action, subject, removed, now)
        self._bytes.pop(tenant, None)
        return {"deleted": subject, "kind": kind, "action": action, "time": iso(now), "removed": removed,
                # the fields of the first release, kept for its clients
                "jobs_deleted": removed.get("jobs", 0), "files_removed": removed.get("files", 0)}

    def audit(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        return [{**e, "time": iso(e["time"])} for e in self.db.audit(tenant, limit)]

    # -- assets ---------------------------------------------------------------------------

    def add_asset(self, tenant: str, upload: Upload) -> dict[str, Any]:
        """An image a request may need (a pose, a control image, a photo template), screened as
        an uploaded photo is, stored under a random id; it can serve as a photo template."""
        from portrait.core.formats.images import image_size
        from portrait.core.io import write_bytes, write_text

        from .uploads import label

        policy = self.tenant_policy(tenant)
        data = upload.file.read(self.policy.max_file_bytes + 1)
        if len(data) > self.policy.max_file_bytes:
            raise BadInput(f"{label(upload.filename)}: over the {self.policy.max_file_bytes:,} byte limit")
        ext, reason, detail = sniff(data, self.policy)
        if reason:
            raise BadInput(f"{label(upload.filename)}: {reason} ({detail})")
        self._check_storage(tenant, policy, len(data))
        asset_id = new_id("a")
        folder = self.asset_root(asset_id)
        try:
            path = write_bytes(folder / f"image{ext}", data)
            width, height = image_size(path)
            # A photo template of our own words: the image, nothing from the request.
            write_text(folder / "template.yaml", f"name: {asset_id}\ntitle: uploaded photo\nimage: image{ext}\n")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        row = AssetRow(asset_id, tenant, "image", label(upload.filename), f"image{ext}", len(data), width, height,
                       time.time())
        self.db.add_asset(row)
        self._bytes.pop(tenant, None)
        return self.asset_view(self.scope.asset(tenant, asset_id))

    @staticmethod
    def asset_view(handle: AssetHandle) -> dict[str, Any]:
        r = handle.row
        return {"id": r.id, "kind": r.kind, "name": r.label, "bytes": r.bytes, "width": r.width, "height": r.height,
                "created": r.created, "image": f"/v1/assets/{r.id}/image"}

    def list_assets(self, tenant: str) -> list[dict[str, Any]]:
        return [self.asset_view(self.scope.asset(tenant, r.id)) for r in self.db.assets(tenant)]

    def show_asset(self, tenant: str, asset_id: str) -> dict[str, Any]:
        return self.asset_view(self.scope.asset(tenant, asset_id))

    def asset_image(self, tenant: str, asset_id: str) -> Path:
        return self.scope.asset(tenant, asset_id).path

    def delete_asset(self, tenant: str, asset_id: str) -> dict[str, Any]:
        handle = self.scope.asset(tenant, asset_id)
        jobs = [j for j in (self.db.job(tenant, job) for job in self.db.jobs_with_asset(asset_id)) if j is not None]
        busy = [j.id for j in jobs if self._state(j) in ("queued", "running")]
        if busy:
            raise Busy(f"asset '{asset_id}' is used by job(s) {', '.join(busy)} that have not finished; "
                       "cancel them or wait")
        removed = {"files": 0, "bytes": 0, "rows": self.db.delete_asset(tenant, asset_id)}
        self._remove(handle.folder, removed)
        return self._receipt(tenant, "delete_asset", asset_id, "asset", removed)

    # -- submitting ---------------------------------------------------------------------------

    def _admit(self, tenant: str, items: int, images: int, now: float) -> TenantPolicy:
        """The tenant's quotas against what a submission adds (429 naming the key)."""
        policy = self.tenant_policy(tenant)
        counts = self.store.owner_counts(tenant)
        queued = counts["pending"] + counts["running"]
        if queued + items > policy.max_queued_items:
            raise QuotaExceeded(f"max_queued_items: {queued} item(s) queued and {items} more asked for; the limit is "
                                f"{policy.max_queued_items} (cancel jobs, or wait for them)")
        active = self.store.active_jobs(tenant)
        if active + 1 > policy.max_active_jobs:
            raise QuotaExceeded(f"max_active_jobs: {active} job(s) queued or running; the limit is "
                                f"{policy.max_active_jobs}")
        today = self.db.images_today(tenant, now)
        if images and today + images > policy.max_images_per_day:
            raise QuotaExceeded(f"max_images_per_day: {today} image(s) today and {images} more asked for; the limit "
                                f"is {policy.max_images_per_day} per UTC day")
        self._check_storage(tenant, policy)
        self.store.set_owner_limit(tenant, policy.max_running_items)
        return policy

    def submit_train(self, tenant: str, identity_id: str, *, zero_shot: bool = False,
                     steps: int | None = None) -> dict[str, Any]:
        handle = self.scope.identity(tenant, identity_id, "identity")
        state = self.identity_state(handle.row)
        if state in ("ready", "training", "expired"):
            raise Busy(f"identity '{identity_id}' is {'already trained' if state == 'ready' else state}")
        now = time.time()
        self._admit(tenant, 1, 0, now)
        photos = sorted(str(p) for p in (handle.folder / "uploads").iterdir())
        item = train_item(identity_id, photos, zero_shot=zero_shot, preset=self.settings.preset, steps=steps)
        job_id = new_id("j")
        params = {"zero_shot": zero_shot, "steps": steps}
        store_job = Job(id=content_id({"service_job": job_id}, 12), source=f"service:{tenant}:{job_id}",
                        spec={"service_job": job_id, "kind": "train", **params}, items=(item,))
        self._submit(store_job, tenant)
        self.db.add_job(JobRow(job_id, tenant, "train", store_job.id, (identity_id,), params, now))
        self.db.set_train_job(tenant, identity_id, job_id)
        self.wake()
        return self.job_view(tenant, job_id)

    def submit_generate(self, tenant: str, body: GenerateFields | BatchFields | ShootFields) -> dict[str, Any]:
        """A generation (one identity, one template or prompt), a batch (identities x
        templates x prompts x backends) or a shoot (one identity x a package's cells), checked
        whole before anything is queued. With `keep`, each item makes `keep` portraits."""
        now = time.time()
        plan = self._plan(tenant, body)
        items = plan["items"]
        images = len(items) * (body.keep or 1)
        self._admit(tenant, len(items), images, now)
        job = plan["job"]
        self._submit(job, tenant)
        self.db.count_images(tenant, images, now)
        kind = "generate" if isinstance(body, GenerateFields) else "shoot" if isinstance(body, ShootFields) else "batch"
        params = body.model_dump(mode="json", exclude={"identity", "identities", "with_identity"})
        self.db.add_job(JobRow(plan["job_id"], tenant, kind, job.id, tuple(plan["identities"]), params, now),
                        tuple(plan["assets"]))
        self.wake()
        return self.job_view(tenant, plan["job_id"])

    def _plan(self, tenant: str, body: GenerateFields | BatchFields | ShootFields) -> dict[str, Any]:
        from portrait.stages import generate as gen
        from portrait.stages.backends import BACKENDS
        from portrait.stages.templates import find_template, shipped_templates

        shooting = isinstance(body, ShootFields)
        single = isinstance(body, GenerateFields)
        gpolicy = gen.GeneratePolicy.from_preset(self.base)
        # 1. references, each resolved in the tenant's scope
        named = [("identity", body.identity)] if single or shooting else [
            (f"identities.{i}", v) for i, v in enumerate(body.identities)]
        people = [self.scope.identity(tenant, value, field) for field, value in named]
        others = [self.scope.identity(tenant, v, f"with_identity.{i}")
                  for i, v in enumerate(body.with_identity)] if single else []
        photo = self.scope.asset(tenant, body.template_photo, "template_photo") \
            if single and body.template_photo else None
        options, assets = self._tenant_options(tenant, body.options or {})
        if photo is not None:
            assets.append(photo.id)
        # 2. what to make: templates (shipped names, or the tenant's photo), prompts, backends
        shipped = {t.name: t for t in shipped_templates()}
        cells: list = []
        if shooting:
            templates, prompts = [], []
            cells = self._shoot_cells(body)
            backends = [("backend", body.backend or gpolicy.backend)]
        elif single:
            if photo is not None and body.template:
                raise InvalidField("template", "give `template` or `template_photo`, not both")
            if not body.template and not body.prompt and photo is None:
                raise InvalidField("template", "give `template`, `template_photo` or `prompt`")
            templates = [("template", body.template)] if body.template else []
            prompts = [("prompt", body.prompt)] if body.prompt and not body.template and photo is None else []
            backend = body.backend
            if backend is None:
                chosen = shipped.get(body.template or "")
                backend = "template" if photo is not None or (chosen and chosen.kind == "photo") else "lora"
            backends = [("backend", backend)]
        else:
            templates = [(f"templates.{i}", t) for i, t in enumerate(body.templates)]
            prompts = [(f"prompts.{i}", p) for i, p in enumerate(body.prompts)]
            backends = [(f"backends.{i}", b) for i, b in enumerate(dict.fromkeys(body.backends))]
            if not templates and not prompts:
                raise InvalidField("templates", "give at least one of `templates` or `prompts`")
        for field, name in templates:
            if name not in shipped:  # only shipped templates by name: a path from a request is never opened
                raise InvalidField(field, f"unknown template '{name}' (known: {', '.join(sorted(shipped))})")
        for field, text in prompts:
            self._check_prompt(field, text)
        specs = []
        for field, name in backends:
            spec = BACKENDS.get(name)
            if spec is None:
                raise InvalidField(field, f"unknown backend '{name}' (known: {', '.join(sorted(BACKENDS.names()))})")
            if self.base.family not in spec.families:
                raise InvalidField(field, f"backend '{name}' runs on {', '.join(spec.families)}; preset "
                                          f"'{self.base.name}' is {self.base.family}")
            if others and not spec.group:
                raise InvalidField("with_identity", f"backend '{name}' paints one identity; several people need "
                                                    "a group photo template (backend template) or faceid")
            if cells and spec.photo_template:
                raise InvalidField(field, f"backend '{name}' paints into photo templates; a package's cells are "
                                          "style prompts (choose a backend that takes a prompt)")
            specs.append(spec)
        self._check_options(options, specs)
        self._check_keep(body)
        # 3. numbers against the server's and the preset's limits
        self._check_count_steps(body, gpolicy)
        if body.size is not None:
            w, h = body.size
            m = gpolicy.size_multiple
            if w <= 0 or h <= 0 or w % m or h % m:
                raise InvalidField("size", f"{w}x{h}: width and height must be positive multiples of {m}")
            if max(w, h) > gpolicy.max_side or w * h > gpolicy.max_pixels:
                raise InvalidField("size", f"{w}x{h}: over the limit of {gpolicy.max_side} px a side and "
                                           f"{gpolicy.max_pixels:,} pixels (preset keys generate.max_side, max_pixels)")
        # 4. the people: trained (or training, for the identities the items wait for)
        train_items: dict[str, str] = {}
        for handle in people:
            state = self.identity_state(handle.row)
            if state == "training":
                train_items[handle.id] = self._train_item_id(tenant, handle.row)
            elif state != "ready":
                raise Busy(f"identity '{handle.id}' is not ready (state {state}); POST /v1/jobs/train first")
        for handle in others:
            if self.identity_state(handle.row) != "ready":
                raise Busy(f"identity '{handle.id}' (with_identity) is not trained yet; train it first")
        self._check_trained_for(people, specs, train_items, [f for f, _ in backends])
        # 5. a dry run of the generate stage's own resolver for each (backend, template or prompt)
        # the declared settings the body gave (size as width, height), the options as resolved above
        overrides = {**declared_settings(body), "options": options or None}
        styles = [(f, find_template(t)) for f, t in templates] + [(f, None) for f, _ in prompts]
        if cells:
            from portrait.stages.shoots import cell_template

            styles += [(f"cells.{i}", cell_template(c)) for i, c in enumerate(cells)]
        if photo is not None:
            styles.append(("template_photo", self._photo_template(photo)))
        for _, backend in backends:
            for field, template in styles:
                try:
                    # each backend gets the options it takes (a batch's options may be meant for its others)
                    gen.resolve_request(_stand_in(people[0]), gpolicy, template=template,
                                        prompt=None if template is not None else "portrait of {trigger} {class}",
                                        backend=backend, n=1, seed=body.seed,
                                        overrides=backend_overrides(overrides, backend))
                except BadInput as exc:
                    raise InvalidField(field, f"{exc} (backend {backend})") from None
        # 6. the items: paths from handles only
        job_id = new_id("j")
        spec = {"output": str(self.job_root(job_id)), "identities": [h.id for h in people],
                "templates": [t for _, t in templates] + ([str(photo.folder)] if photo is not None else []),
                "prompts": [p for _, p in prompts], "backends": [b for _, b in backends], "count": body.count,
                "seed": body.seed, "finish": body.finish,
                # the declared settings by their Python API names (width, height, ...), options as resolved
                "generate": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()
                             if v is not None},
                "keep": body.keep, "attempts": body.attempts, "upscale_factor": body.upscale_factor,
                # the results history names these images by this job (portrait.flows.history)
                "run": job_id}
        if body.keep is not None:
            spec.pop("count")
        if cells:
            spec["shoot"] = {"package": cells[0].package.name, "cells": [c.key for c in cells]}
        parsed = parse_spec({k: v for k, v in spec.items() if v is not None}, source="request")
        job = expand(parsed, base_dir=self.root, default_preset=self.settings.preset,
                     source=f"service:{tenant}:{job_id}", identity_exists=lambda name: True)
        bundles = {h.id: str(h.bundle) for h in people}
        with_bundles = [str(h.bundle) for h in others]
        items = []
        for item in job.items:
            payload = {**item.payload, "bundle": bundles[item.payload["identity"]]}
            if with_bundles:
                payload["with_identity"] = with_bundles
            items.append(dataclasses.replace(item, id=content_id({"kind": "generate", **payload}), payload=payload,
                                             depends_on=train_items.get(item.payload["identity"])))
        job = dataclasses.replace(job, items=tuple(items))
        return {"job": job, "job_id": job_id, "items": items, "assets": assets,
                "identities": [h.id for h in people] + [h.id for h in others]}

    def _tenant_options(self, tenant: str, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """The backend options a tenant gave, with asset ids replaced by the stored files' paths.
        A key no backend declares, or one only the operator may set, is refused naming it."""
        from portrait.core.options import tenant_options
        from portrait.stages.backends import BACKENDS

        access = tenant_options(BACKENDS.specs())
        allowed = [k for k, a in access.items() if a != "server"]
        out, assets = {}, []
        for key, value in values.items():
            field = f"options.{key}"
            if key not in access:
                raise InvalidField(field, f"unknown option (known: {', '.join(allowed)})")
            if access[key] == "server":
                raise InvalidField(field, "set by the server's operator, not by a request")
            if access[key] == "asset":
                if value is None:
                    continue
                handle = self.scope.asset(tenant, value, field)
                assets.append(handle.id)
                value = str(handle.path)
            out[key] = value
        return out, assets

    @staticmethod
    def _check_options(options: dict[str, Any], specs: list) -> None:
        """Each option against the chosen backends' declarations (types and bounds)."""
        from pydantic import ValidationError

        from portrait.core.declare import describe

        for key in options:
            if not any(key in spec.options.model_fields for spec in specs):
                raise InvalidField(f"options.{key}", f"not an option of backend {', '.join(s.name for s in specs)}")
        for spec in specs:
            mine = {k: v for k, v in options.items() if k in spec.options.model_fields}
            try:
                spec.options.model_validate(mine)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise InvalidField(f"options.{first['loc'][0]}", f"options.{describe(exc)}") from None

    def _photo_template(self, photo: AssetHandle):
        from portrait.stages.templates import find_template

        return find_template(str(photo.folder), "photo")

    def _train_item_id(self, tenant: str, row: IdentityRow) -> str:
        job = self.db.job(tenant, row.train_job or "")
        items = self.store.status([job.store_job]).items if job else ()
        if not items:
            raise Busy(f"identity '{row.id}' has no training job")
        return items[0].item.id

    def _submit(self, job: Job, tenant: str) -> None:
        self.store.submit(job, owner=tenant)
        # Content ids: an item a failed earlier job shares (the same training) gets another go.
        if self.store.counts([job.id])["failed"]:
            self.store.retry_failed([job.id])

    # -- the queue ---------------------------------------------------------------------------------

    def cancel_job(self, tenant: str, job_id: str) -> dict[str, Any]:
        """Cancel the job's queued items and stop its running ones at their next step (their
        staged files are discarded; nothing half-written is kept). Done items stay."""
        handle = self.scope.job(tenant, job_id)
        self.store.cancel([handle.row.store_job], "cancelled", running=True)
        self.wake()
        return self._job_view(handle.row)

    def retry_job(self, tenant: str, job_id: str) -> dict[str, Any]:
        """Queue the job's failed and cancelled items again (the tenant's quotas apply)."""
        handle = self.scope.job(tenant, job_id)
        failed = self.store.counts([handle.row.store_job])["failed"]
        if not failed:
            raise Busy(f"job '{job_id}' has no failed or cancelled items")
        now = time.time()
        images = failed if handle.row.kind != "train" else 0
        self._admit(tenant, failed, images, now)
        self.store.retry_failed([handle.row.store_job])
        if images:
            self.db.count_images(tenant, images, now)
        self.wake()
        return self._job_view(handle.row)

    def list_jobs(self, tenant: str, limit: int = 50, after: str | None = None) -> dict[str, Any]:
        """A page of the tenant's jobs, newest first; `next` is the cursor of the following page
        (a job id: pass it as `after`), null on the last page."""
        cursor = self.scope.job(tenant, after, "after").row if after else None
        rows = self.db.jobs(tenant, limit=limit + 1, after=cursor)
        more = len(rows) > limit
        rows = rows[:limit]
        return {"jobs": [self._job_view(row) for row in rows], "next": rows[-1].id if more and rows else None}

    def job_view(self, tenant: str, job_id: str) -> dict[str, Any]:
        return self._job_view(self.scope.job(tenant, job_id).row)

    def _state(self, row: JobRow) -> str:
        status = self.store.status([row.store_job])
        return job_state(status.counts, sum(1 for r in status.items if r.state == "failed" and r.error_kind == CANCELLED))

    def _job_view(self, row: JobRow) -> dict[str, Any]:
        status = self.store.status([row.store_job])
        items = status.items
        running = [r.item.id for r in items if r.state == "running"]
        progress = self.store.progress(running)
        fractions = [item_fraction(r, progress.get(r.item.id)) for r in items]
        fraction = sum(fractions) / len(fractions) if fractions else 1.0
        cancelled = [r for r in items if r.state == "failed" and r.error_kind == CANCELLED]
        state = job_state(status.counts, len(cancelled))
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
        failed = [r for r in items if r.state == "failed" and r.error_kind != CANCELLED] or cancelled
        counts = {**status.counts, "cancelled": len(cancelled), "failed": status.counts["failed"] - len(cancelled)}
        return {
            "id": row.id, "kind": row.kind, "state": state, "created": row.created, "identities": list(row.identities),
            "params": row.params,
            "progress": {"fraction": round(fraction, 4), "step": step, "total": total, "phase": phase,
                         "eta_seconds": eta, "items": {**counts, "total": len(items)}},
            "error": public_text(failed[0].error) if failed else None,
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
        row = self.scope.job(tenant, job_id).row
        view = self._job_view(row)
        if row.kind == "train":
            summary = self._train_summary(row) if view["state"] == "done" else None
            if summary:
                summary = {k: v for k, v in summary.items() if k not in ("params",)}
            return {"job": view, "identity": row.identities[0], "train": summary, "images": []}
        return {"job": view, "images": self._images(row), "reports": self._keep_reports(row),
                "warnings": self._warnings(row)}

    def _warnings(self, row: JobRow) -> list[str]:
        """What was asked of the job's items and could not run (a missing face restorer), once each."""
        seen: dict[str, None] = {}
        for r in self.store.status([row.store_job]).items:
            for warning in r.meta.get("warnings") or ():
                seen[public_text(warning)] = None
        return list(seen)

    def _keep_reports(self, row: JobRow) -> list[dict[str, Any]]:
        """The keep report of each item that had one (per template or shoot cell)."""
        out = []
        for r in self.store.status([row.store_job]).items:
            keep = r.meta.get("keep")
            if r.item.kind == "generate" and keep:
                out.append({"cell": (r.meta.get("cell") or {}).get("key"), "template": r.meta.get("template"),
                            "backend": r.meta.get("backend"), **{k: keep[k] for k in (
                                "wanted", "kept", "tried", "budget", "complete", "reasons", "summary")}})
        return out

    def _images(self, row: JobRow) -> list[dict[str, Any]]:
        from portrait.core.io import read_png_text

        images = []
        for r in self.store.status([row.store_job]).items:
            if r.state != "done" or r.item.kind != "generate" or not r.outputs:
                continue
            p = r.item.payload
            outputs = [o for o in r.outputs if not o.endswith(".json")]  # a keep item's report beside its images
            for index, output in enumerate(outputs):
                meta_rows = r.meta.get("results") or [{}]
                m = meta_rows[min(index, len(meta_rows) - 1)]
                path = Path(output)
                if not path.is_file():  # deleted from the results history
                    continue
                try:
                    parameters = read_png_text(path).get("parameters")
                except OSError:
                    parameters = None
                images.append({
                    "id": r.item.id if len(outputs) == 1 else f"{r.item.id}-{index}",
                    "cell": (r.meta.get("cell") or {}).get("key"),
                    "identity": p["identity"], "template": p["template"], "prompt": p["prompt"],
                    "backend": r.meta.get("backend", p["backend"]), "seed": m.get("seed", p["seed"]),
                    "similarity": m.get("similarity"), "passed_gate": m.get("passed_gate"),
                    "reference_similarity": m.get("reference_similarity"), "clip_t": m.get("clip_t"),
                    "faces": m.get("faces"), "timings": m.get("timings"), "parameters": parameters,
                    "url": f"/v1/jobs/{row.id}/images/{r.item.id if len(outputs) == 1 else f'{r.item.id}-{index}'}",
                    "_path": str(path),
                })
        images.sort(key=lambda im: (im["similarity"] is None, -(im["similarity"] or 0.0), im["seed"]))
        for rank, image in enumerate(images, 1):
            image["rank"] = rank
        return images

    def image_path(self, tenant: str, job_id: str, image_id: str) -> Path:
        row = self.scope.job(tenant, job_id).row
        for image in self._images(row):
            if image["id"] == image_id:
                path = Path(image["_path"])
                if path.is_file():
                    return path
        raise NotFound(f"image '{image_id}' not found in job '{job_id}'")

    def job_zip(self, tenant: str, job_id: str) -> bytes:
        row = self.scope.job(tenant, job_id).row
        images = self._images(row)
        if not images:
            raise NotFound(f"job '{job_id}' has no images yet")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
            rows = []
            for image in images:
                name = f"{image['rank']:03d}_{image['backend']}_s{image['seed']}.png"
                zf.writestr(name, public_image(Path(image["_path"])))
                rows.append({**{k: v for k, v in image.items() if k not in ("_path", "url")}, "file": name})
            zf.writestr("results.json", json.dumps({"job": job_id, "results": rows}, indent=2))
        return buffer.getvalue()

    # -- retention -------------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> list[dict[str, Any]]:
        """Apply every tenant's retention (TenantPolicy.photos_days, outputs_days) and return
        the receipts (each also in the audit log). Photos: the identity's uploads, crops and
        bundle (photos, embeddings, LoRA) are erased and it is marked expired; its results stay
        until their own retention. Results: a settled job older than outputs_days is erased."""
        now = time.time() if now is None else now
        receipts = []
        for tenant in self.db.tenant_ids():
            policy = self.tenant_policy(tenant)
            if policy.photos_days is not None:
                cutoff = now - policy.photos_days * 86400
                for row in self.db.identities(tenant):
                    if row.expired is None and row.created < cutoff:
                        receipts.append(self._expire_identity(self.scope.handle_of(row), now))
                for asset in self.db.assets(tenant):
                    if asset.created < cutoff:
                        with contextlib.suppress(Busy, NotFound):
                            receipt = self.delete_asset(tenant, asset.id)
                            receipts.append(receipt)
            if policy.outputs_days is not None:
                cutoff = now - policy.outputs_days * 86400
                for job in self.db.all_jobs(tenant):
                    if job.kind != "train" and job.created < cutoff and self._state(job) in SETTLED:
                        removed = self._erase_jobs([job])
                        removed["rows"] += self.db.delete_job(tenant, job.id)
                        receipts.append(self._receipt(tenant, "retention_outputs", job.id, "job", removed, now))
        return receipts

    def _expire_identity(self, handle: IdentityHandle, now: float) -> dict[str, Any]:
        removed = {"jobs": 0, "items": 0, "images": 0, "files": 0, "bytes": 0, "rows": 1}
        idir = self.settings.identities_dir
        try:
            self._stop_jobs([j for j in self.db.jobs_using(handle.id) if j.kind == "train"], f"identity '{handle.id}'")
        except Busy:
            pass
        with identity_lock(idir, handle.id):
            for folder in (handle.folder, handle.bundle,
                           *(idir / f".{handle.id}.{suffix}" for suffix in ("work", "staging", "old"))):
                self._remove(folder, removed)
        self.db.expire_identity(handle.tenant, handle.id, now)
        return self._receipt(handle.tenant, "retention_photos", handle.id, "identity", removed, now)

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
                 "compositions": list(s.compositions), "controls": s.controls, "style_lora": s.style_lora,
                 # whether this server's preset can run it (the web page offers only those)
                 "runs_here": self.base.family in s.families,
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
        """That the server is alive, and nothing else: no tenant's figures without a token."""
        return {"status": "ok"}


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


def _stand_in(handle: IdentityHandle):
    """An Identity for the dry resolution at submit: the request's values are checked, no
    bundle is read (the identity may still be training)."""
    from portrait.core.types import Identity

    return Identity(name=handle.id, root=handle.bundle, trigger="sks", class_word="person",
                    reference=handle.bundle / "reference.png", photos=(), consensus={}, loras={}, manifest={})
