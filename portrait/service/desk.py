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

from portrait.core.errors import BadInput

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

    # -- the catalogue ------------------------------------------------------------------------------

    def server_facts(self) -> dict[str, Any]:
        """What the page needs to know of this server: its preset and family, the photos a new
        identity needs, the default backend and the keep budget per portrait."""
        from portrait.core.declare import from_preset
        from portrait.flows.finish import FinishPolicy
        from portrait.flows.prepare import PREPARE_READERS, PrepareFlowPolicy
        from portrait.stages.generate import GeneratePolicy

        score = FinishPolicy.from_preset(self.base).score
        return {"preset": self.base.name, "family": self.base.family,
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

    def _result_rows(self, tenant: str, identity_id: str, ids: Sequence[str]):
        from portrait.flows.history import UnknownResult

        from .scope import NotFound

        handle = self.scope.identity(tenant, identity_id)
        try:
            return handle, self._history().get(handle.id, ids)
        except UnknownResult as exc:
            raise NotFound(str(exc), "ids") from None

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

    def result_file(self, tenant: str, identity_id: str, result_id: str) -> Path:
        from .scope import NotFound

        _, rows = self._result_rows(tenant, identity_id, [result_id])
        if not rows[0].present:
            raise NotFound(f"result '{result_id}' is no longer on disk")
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
            return self._history().zip(handle.id, [r.id for r in rows])
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
