"""The studio desk of the service (issue 30): shoots and `keep` at submit, the results history
of an identity (list, star, download a selection, delete), the packages catalogue, and the
words a tenant reads (`public_text`: no server path, no command line).

A mixin of `StudioService` (service/service.py; docs/ARCHITECTURE.md#service-desk), kept in
its own module so the tenant scope, quotas and queues stay readable there. Every verb takes the tenant and resolves the identity
through the service's one resolver (`Scope.resolve`): the history (portrait.flows.history) is
then asked only about that identity's rows, so a result id of another identity, or of
another tenant, is the same 404 as one that never existed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from portrait.core.errors import BadInput, PortraitError

class Busy(PortraitError):
    """The object is in a state that does not allow this now (HTTP 409)."""


class InvalidField(BadInput):
    """A request value refused at submit (HTTP 422), naming the field."""

    def __init__(self, field: str, message: str):
        super().__init__(message if message.startswith(field) else f"{field}: {message}")
        self.field = field


_ABSOLUTE = re.compile(r"(?<![\w.])/(?:[^\s/'\"`,;:()]+/)+([^\s/'\"`,;:()]+)")
_DOWNLOAD = re.compile(r"run `?portrait models download ([\w.:-]+)`?")
_DEBUG = re.compile(r"\s*\(rerun with --debug[^)]*\)")


def public_text(text: str | None, labels: Mapping[str, str] | None = None) -> str | None:
    """A message as a tenant may read it: the server's paths become the names the customer
    gave (`labels`: stored path -> label) or a bare file name, and the CLI's remedies (run
    `portrait models download ID`, --debug) become words for someone who has no shell."""
    if text is None:
        return None
    for path, label in sorted((labels or {}).items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, label)
    text = _ABSOLUTE.sub(lambda m: m.group(1), text)
    text = _DOWNLOAD.sub(lambda m: f"the studio's operator can install it (model {m.group(1)})", text)
    return _DEBUG.sub("", text)


def public_image(path: Path) -> bytes:
    """A result's PNG as a tenant receives it: its text chunks (A1111 `parameters`, the `portrait`
    JSON: model files, LoRA and reference paths) with every server path reduced to its file name
    by public_text; the pixels are the file's own bytes."""
    from portrait.core.formats.images import rewrite_png_text

    data = Path(path).read_bytes()
    if not data.startswith(b"\x89PNG"):
        return data
    return rewrite_png_text(data, lambda _key, text: public_text(text) or "")


class StudioDesk:
    """Shoots, keep and the results history over a StudioService (see the module docstring)."""

    # -- submit-time checks (called by StudioService._plan) --------------------------------------

    def _shoot_cells(self, body) -> list:
        """The cells a ShootRequest names, from a shipped package only (a name, never a path)."""
        from portrait.stages import shoots

        packages = {p.name: p for p in shoots.shipped_packages()}
        package = packages.get(body.package)
        if package is None:
            raise InvalidField("package", f"unknown package '{body.package}' (known: {', '.join(sorted(packages))})")
        try:
            return shoots.select_cells(package, body.cells, backdrops=body.backdrops, outfits=body.outfits,
                                       poses=body.poses)
        except BadInput as exc:
            message = str(exc)
            field = next((f for f in ("cells", "backdrops", "outfits", "poses") if message.startswith(f"--{f}")),
                         "cells")
            raise InvalidField(field, message.replace("--", "")) from None

    def _check_keep(self, body) -> None:
        """keep / attempts against the preset's budget, before anything is queued."""
        from portrait.flows.finish import FinishPolicy, keep_budget

        if body.keep is None:
            if body.attempts is not None:
                raise InvalidField("attempts", "bounds `keep`: give `keep` too")
            return
        if "count" in body.model_fields_set and body.count != 1:
            raise InvalidField("keep", "give `count` or `keep`, not both (keep K makes K portraits that pass every "
                                       "check)")
        if body.finish is False:
            raise InvalidField("keep", "needs finishing on: the portraits are judged by the finish stage's scores")
        try:
            keep_budget(FinishPolicy.from_preset(self.base), body.keep, body.attempts)
        except BadInput as exc:
            field = "attempts" if str(exc).startswith("--attempts") else "keep"
            raise InvalidField(field, str(exc).replace("--attempts", "attempts").replace("--keep", "keep")) from None

    def _check_prompt(self, field: str, text: str) -> None:
        if len(text) > self.policy.max_prompt_chars:
            raise InvalidField(field, f"{len(text)} characters; the limit is {self.policy.max_prompt_chars}")

    def _check_count_steps(self, body, gpolicy) -> None:
        """`count` against the server's limit and `steps` against the preset's."""
        if not 1 <= body.count <= self.policy.max_count:
            raise InvalidField("count", f"{body.count}; use 1-{self.policy.max_count} (preset key service.max_count)")
        if body.steps is not None and body.steps > gpolicy.max_steps:
            raise InvalidField("steps", f"{body.steps}; use 1-{gpolicy.max_steps} (preset key generate.max_steps)")

    def _check_trained_for(self, people: Sequence[Any], specs: Sequence[Any], training: Mapping[str, str],
                           fields: Sequence[str]) -> None:
        """A backend that needs a trained LoRA refuses, at submit and in words, an identity that
        was prepared zero-shot (the worker would fail with the CLI's advice otherwise)."""
        import json

        from portrait.stages.backends import BACKENDS

        family = self.base.family
        for spec, field in zip(specs, fields):
            if not spec.needs_lora:
                continue
            for handle in people:
                if handle.id in training:
                    continue
                manifest = handle.bundle / "manifest.json"
                loras = (json.loads(manifest.read_text()).get("loras") or {}) if manifest.is_file() else {}
                if family not in loras:
                    others = [s.name for s in BACKENDS.specs() if not s.needs_lora and not s.photo_template
                              and family in s.families]
                    raise InvalidField(field, f"backend '{spec.name}' needs an identity trained with a LoRA; "
                                              f"'{handle.row.name}' was prepared without training (zero-shot): "
                                              f"choose {', '.join(others) or 'another backend'}, or train a new "
                                              "identity with LoRA training")

    # -- edits ------------------------------------------------------------------------------------

    def submit_edit(self, tenant: str, body) -> dict[str, Any]:
        """An edit of one of the identity's results (POST /v1/jobs/edit): `count` items, each one
        edit from its own seed, re-scored and gated by the edit flow. Every name in the body is
        resolved in the tenant's scope (the identity and the references first, the result in that
        identity's history once the server is known to edit), so a foreign id answers 404."""
        import time

        from portrait.flows.edit import EDIT_BACKENDS
        from portrait.stages import generate as gen
        from portrait.stages.backends import BACKENDS
        from portrait.studio.spec import Item, Job, content_id

        from .requests import declared_settings
        from .tenants import JobRow, new_id

        handle = self.scope.identity(tenant, body.identity, "identity")
        refs = [self.scope.asset(tenant, value, f"references.{i}") for i, value in enumerate(body.references)]
        family = self.base.family
        backend = body.backend or EDIT_BACKENDS.get(family)
        if backend is None:
            raise InvalidField("backend", f"this server's preset '{self.base.name}' ({family}) has no edit model; "
                                          "edits run on a FLUX.2 [klein], Qwen-Image-Edit or FLUX.1 preset")
        if backend not in EDIT_BACKENDS.values():
            raise InvalidField("backend", f"'{backend}' is not an edit backend (choose "
                                          f"{', '.join(sorted(set(EDIT_BACKENDS.values())))})")
        spec = BACKENDS.get(backend)
        if family not in spec.families:
            raise InvalidField("backend", f"backend '{backend}' runs on {', '.join(spec.families)}; this server's "
                                          f"preset '{self.base.name}' is {family}")
        source = self.result_file(tenant, handle.id, body.result, field="result")
        self._check_prompt("prompt", body.prompt)
        if not body.prompt.strip():
            raise InvalidField("prompt", "say what to change (e.g. \"a sunny beach behind her\")")
        self._check_count_steps(body, gen.GeneratePolicy.from_preset(self.base))
        options, assets = self._tenant_options(tenant, body.options or {})
        self._check_options(options, [spec])
        if self.identity_state(handle.row) != "ready":
            raise Busy(f"identity '{handle.id}' is not ready (state {self.identity_state(handle.row)})")
        now = time.time()
        self._admit(tenant, body.count, body.count, now)
        job_id = new_id("j")
        overrides = {**declared_settings(body), "options": options or None}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        dest = self.job_root(job_id) / handle.id / "edit"
        edit = {"source": str(source), "source_name": body.result, "prompt": body.prompt,
                "references": [str(r.path) for r in refs], "reference_names": [r.id for r in refs]}
        items = []
        for index in range(body.count):
            seed = body.seed + index
            payload = {"identity": handle.id, "bundle": str(handle.bundle), "template": None, "prompt": None,
                       "backend": backend, "preset": self.settings.preset, "seed": seed, "overrides": overrides,
                       "finish": body.finish, "dest": str(dest), "stem": f"{backend}-edit-s{seed}", "edit": edit}
            items.append(Item(id=content_id({"kind": "generate", **payload}), kind="generate",
                              group=f"{self.settings.preset}/{backend}/{handle.id}", order=index,
                              label=f"{handle.row.name} / edit / {backend} #{index + 1}",
                              payload={**payload, "run": job_id}))
        job = Job(id=content_id({"service_job": job_id}, 12), source=f"service:{tenant}:{job_id}",
                  spec={"service_job": job_id, "kind": "edit"}, items=tuple(items))
        self._submit(job, tenant)
        self.db.count_images(tenant, body.count, now)
        params = body.model_dump(mode="json", exclude={"identity"})
        self.db.add_job(JobRow(job_id, tenant, "edit", job.id, (handle.id,), params, now),
                        tuple([r.id for r in refs] + assets))
        self.wake()
        return self.job_view(tenant, job_id)

    # -- the catalogue ------------------------------------------------------------------------------

    def server_facts(self) -> dict[str, Any]:
        """What the page needs to know of this server: its preset and family, the photos a new
        identity needs, the default backend and the keep budget per portrait."""
        from portrait.core.declare import from_preset
        from portrait.flows.finish import FinishPolicy
        from portrait.flows.prepare import PREPARE_READERS, PrepareFlowPolicy
        from portrait.stages.generate import GeneratePolicy

        from portrait.flows.edit import EDIT_BACKENDS

        score = FinishPolicy.from_preset(self.base).score
        return {"preset": self.base.name, "family": self.base.family,
                # the backend that edits results on this server (None: its preset has no edit model)
                "edit_backend": EDIT_BACKENDS.get(self.base.family),
                "min_photos": from_preset(PrepareFlowPolicy, self.base, shared=PREPARE_READERS).min_photos,
                "default_backend": GeneratePolicy.from_preset(self.base).backend,
                "keep_attempts": score.keep_attempts, "max_count": self.policy.max_count}

    def packages(self) -> list[dict[str, Any]]:
        from portrait.stages.shoots import shipped_packages

        return [p.as_dict() for p in shipped_packages()]

    # -- the results history --------------------------------------------------------------------------

    def _history(self):
        from portrait.flows.history import History

        return History(self.settings)

    def _result_rows(self, tenant: str, identity_id: str, ids: Sequence[str], field: str = "ids"):
        from portrait.flows.history import UnknownResult

        from .scope import NotFound

        handle = self.scope.identity(tenant, identity_id)
        try:
            return handle, self._history().get(handle.id, ids)
        except UnknownResult as exc:
            raise NotFound(str(exc), field) from None

    def identity_results(self, tenant: str, identity_id: str, *, page: int = 1, per_page: int = 24,
                         job: str | None = None, starred: bool | None = None) -> dict[str, Any]:
        """Every portrait made of the identity, newest job first, a page at a time: each with its
        job, backend, template, shoot cell, scores and star, and the keep reports of the jobs shown."""
        handle = self.scope.identity(tenant, identity_id)
        if job is not None:
            self.scope.job(tenant, job, "job")
        found = self._history().page(handle.id, page=page, per_page=per_page, job=job, starred=starred)
        out = found.as_dict()
        jobs: dict[str, Any] = {}
        for row in out["results"]:
            row["url"] = f"/v1/identities/{handle.id}/results/{row['id']}/image"
            if row["job"] not in jobs:
                found_job = self.db.job(tenant, row["job"])
                jobs[row["job"]] = None if found_job is None else {
                    "kind": found_job.kind, "created": found_job.created, "state": self._state(found_job),
                    "params": {k: v for k, v in found_job.params.items()
                               if k in ("template", "templates", "prompt", "prompts", "package", "keep", "count",
                                        "backend", "backends")}}
        out["jobs"] = {k: v for k, v in jobs.items() if v is not None}
        out["runs"] = [r for r in self._history().runs(handle.id) if r["job"] in out["jobs"]]
        out["identity"] = handle.id
        return out

    def result_file(self, tenant: str, identity_id: str, result_id: str, field: str = "ids") -> Path:
        from .scope import NotFound

        _, rows = self._result_rows(tenant, identity_id, [result_id], field)
        if not rows[0].present:
            raise NotFound(f"result '{result_id}' is no longer on disk", field)
        return rows[0].path

    def star_results(self, tenant: str, identity_id: str, ids: Sequence[str], starred: bool = True) -> dict[str, Any]:
        handle, rows = self._result_rows(tenant, identity_id, ids)
        self._history().star(handle.id, [r.id for r in rows], on=starred)
        return {"starred" if starred else "unstarred": [r.id for r in rows]}

    def zip_results(self, tenant: str, identity_id: str, ids: Sequence[str]) -> bytes:
        from portrait.flows.history import UnknownResult

        from .scope import NotFound

        handle, rows = self._result_rows(tenant, identity_id, ids)
        try:
            return self._history().zip(handle.id, [r.id for r in rows], read=public_image)
        except UnknownResult as exc:
            raise NotFound(str(exc), "ids") from None

    def delete_results(self, tenant: str, identity_id: str, ids: Sequence[str]) -> dict[str, Any]:
        """Erase the chosen images (files and rows); the receipt goes to the audit log too."""
        handle, rows = self._result_rows(tenant, identity_id, ids)
        size = sum(r.path.stat().st_size for r in rows if r.present)
        receipt = self._history().delete(handle.id, [r.id for r in rows])
        removed = {"images": len(receipt["deleted"]), "files": receipt["files_removed"], "bytes": size,
                   "rows": len(receipt["deleted"])}
        return {**self._receipt(tenant, "delete_results", handle.id, "results", removed),
                "results": receipt["deleted"]}
