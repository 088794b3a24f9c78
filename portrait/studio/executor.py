"""What runs one item, and how its outputs get into place.

The runners (local, Ray) only move items between the store and an `Executor`; the
executor is the seam where the real flows plug in (`FlowExecutor`), so the queue's
semantics can be exercised with any object that has the same `run` method.

`perform` is shared by every runner: it gives the executor a private staging folder,
renames what it produced to names fixed by the item, removes the staging folder, and
turns any error into an `Outcome` saying whether a retry can help.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from portrait.core.cache import ModelCache
from portrait.core.config import Settings
from portrait.core.errors import BadInput, ModelMissing, PortraitError

from .spec import Item

@dataclass(frozen=True)
class ItemResult:
    """What an executor produced: files in the staging folder to rename into place, and
    outputs it already wrote in place itself (an identity bundle)."""

    staged: tuple[Path, ...] = ()
    in_place: tuple[Path, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    def run(self, item: Item, staging: Path) -> ItemResult: ...


@dataclass(frozen=True)
class Outcome:
    """How an item ended, as plain data (it crosses process boundaries under Ray)."""

    ok: bool
    outputs: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_kind: str | None = None  # bad_input | model_missing | error
    permanent: bool = False
    seconds: float = 0.0


class NothingKept(PortraitError):
    """A `keep` item kept no portrait within its attempt budget: the same seeds would give the
    same images, so retrying cannot help (the message is the keep report's summary)."""


def classify(exc: BaseException) -> tuple[str, bool, str]:
    """(kind, permanent, message). User errors never heal by retrying; anything else may
    (out of memory, a busy disk, a flaky network mount), so it is retried with backoff."""
    if isinstance(exc, NothingKept):
        return "not_kept", True, str(exc)
    if isinstance(exc, ModelMissing):
        return "model_missing", True, str(exc)
    if isinstance(exc, BadInput):
        return "bad_input", True, str(exc)
    if isinstance(exc, PortraitError):
        return "error", False, str(exc)
    return "error", False, f"{exc.__class__.__name__}: {exc}"


def staging_dir(item: Item) -> Path:
    if item.kind == "generate":
        # Beside the final names, so placing an output is a rename on one filesystem.
        return Path(item.payload["dest"]) / f".{item.payload['stem']}.{item.id}.staging"
    # Training writes its bundle in place itself (atomically); never write near the photos.
    return Path(tempfile.gettempdir()) / f"portrait-train.{item.id}.staging"


def final_names(item: Item, staged: tuple[Path, ...]) -> list[tuple[Path, Path]]:
    """Fixed names per item, so a re-run after a crash overwrites instead of adding: the images
    as `<stem>.png` (or `<stem>-<i>.png` in rank order), a staged results.json as
    `<stem>.results.json`."""
    dest = Path(item.payload["dest"])
    stem = item.payload["stem"]
    images = [p for p in staged if p.suffix.lower() != ".json"]
    names = [(images[0], dest / f"{stem}{images[0].suffix.lower()}")] if len(images) == 1 else [
        (src, dest / f"{stem}-{i}{src.suffix.lower()}") for i, src in enumerate(images)]
    return names + [(p, dest / f"{stem}.{p.name}") for p in staged if p.suffix.lower() == ".json"]


def drop_stale_outputs(item: Item, keep: set[Path]) -> None:
    """A crashed attempt that placed a different number of images must not leave extras."""
    dest, stem = Path(item.payload["dest"]), item.payload["stem"]
    if not dest.is_dir():
        return
    for old in [*dest.glob(f"{stem}.*"), *dest.glob(f"{stem}-*.*")]:
        if old not in keep and old.is_file():
            old.unlink()


def discard_staging(staging: Path) -> None:
    """The item's staging folder and what a flow staged beside it: the generate flow builds its
    --out (this folder) in a sibling `.NAME.staging-*` and swaps it in, so a kill -9 in the
    middle leaves that sibling too. The item's folder name is unique, so no other item's
    work matches."""
    shutil.rmtree(staging, ignore_errors=True)
    for pattern in (f".{staging.name}.staging-*", f".{staging.name}.old-*"):
        for leftover in staging.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def perform(executor: Executor, item: Item) -> Outcome:
    """Run one item to an Outcome. Only KeyboardInterrupt/SystemExit escape."""
    start = time.perf_counter()
    staging = staging_dir(item)
    discard_staging(staging)  # a crashed earlier attempt's leftovers
    try:
        staging.mkdir(parents=True, exist_ok=True)
        result = executor.run(item, staging)
        placed = []
        if item.kind == "generate":
            if not result.staged:
                raise PortraitError(f"{item.label}: generate wrote no image")
            names = final_names(item, result.staged)
            drop_stale_outputs(item, {target for _, target in names})
            for src, target in names:
                target.parent.mkdir(parents=True, exist_ok=True)
                src.replace(target)  # same folder tree, so an atomic rename
                placed.append(str(target))
            on_placed = getattr(executor, "placed", None)  # e.g. the results history (FlowExecutor)
            if on_placed is not None:
                on_placed(item, [target for _, target in names], result.meta)
        placed += [str(p) for p in result.in_place]
        return Outcome(ok=True, outputs=tuple(placed), meta=result.meta, seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the item
        kind, permanent, message = classify(exc)
        return Outcome(ok=False, error=message, error_kind=kind, permanent=permanent,
                       seconds=time.perf_counter() - start)
    finally:
        discard_staging(staging)
        if item.kind == "generate":
            remove_empty_folders(Path(item.payload["dest"]), levels=2)


def remove_empty_folders(folder: Path, levels: int) -> None:
    """A failed item leaves no empty `<identity>/<template>/` folders behind."""
    for path in [folder, *folder.parents][:levels]:
        try:
            path.rmdir()  # only succeeds when empty
        except OSError:
            return


# (item, phase, done, total): where a running item is, for a progress bar (the service's).
ItemProgress = Callable[[Item, str, float, float], None]


class FlowExecutor:
    """Runs items through the real flows with one warm RunContext per preset.

    All contexts share one ModelCache: pipelines are keyed by model id, device and dtype,
    so two presets that use the same base share its weights too.
    """

    def __init__(self, settings: Settings, cache: ModelCache | None = None, progress: ItemProgress | None = None):
        self.settings = settings
        self.cache = cache or ModelCache()
        self.progress = progress
        self._contexts: dict[str, Any] = {}

    def _reporter(self, item: Item) -> Callable[[str, float, float], None] | None:
        if self.progress is None:
            return None
        return lambda what, done, total: self.progress(item, what, done, total)

    def context(self, preset: str):
        from portrait.core.context import RunContext

        if preset not in self._contexts:
            self._contexts[preset] = RunContext.create(self.settings.with_(preset=preset), preset=preset,
                                                       cache=self.cache)
        return self._contexts[preset]

    def run(self, item: Item, staging: Path) -> ItemResult:
        if item.kind == "train":
            return self._train(item)
        return self._generate(item, staging)

    def _train(self, item: Item) -> ItemResult:
        from portrait.core.bundle import identity_dir, load_identity
        from portrait.flows.train import train

        p = item.payload
        ctx = self.context(p["preset"])
        meta = {"identity": p["name"], "zero_shot": bool(p["zero_shot"])}
        if (identity_dir(ctx.settings, p["name"]) / "manifest.json").is_file():
            # An earlier attempt swapped the bundle into place and died before it was marked done.
            return ItemResult(in_place=(load_identity(ctx.settings, p["name"]).root,), meta=meta)
        # resume: a re-run after a crash continues from the interrupted run's last checkpoint.
        report = self._reporter(item)
        on_event = (lambda event: report(event.phase, event.step, event.total)) if report else None
        options = dict(p.get("train") or {})
        identity = train(p["photos"], p["name"], zero_shot=bool(p["zero_shot"]), steps=p.get("steps"), resume=True,
                         ctx=ctx, progress=report, on_event=on_event, rank=options.pop("rank", None), **options)
        return ItemResult(in_place=(Path(identity.root),), meta=meta)

    def _generate(self, item: Item, staging: Path) -> ItemResult:
        from portrait.core.bundle import load_bundle
        from portrait.core.io import write_json
        from portrait.flows.generate import generate

        p = item.payload
        # A service item names its bundles by the folders the service resolved in the tenant's
        # scope (`bundle`, `with_identity`); a batch item by the identity's name in this home.
        identity = load_bundle(Path(p["bundle"])) if p.get("bundle") else p["identity"]
        people = [load_bundle(Path(b)) for b in p.get("with_identity") or ()]
        template, cell = p["template"], None
        if p.get("shoot"):  # a studio package's cell (portrait.stages.shoots)
            from portrait.stages import shoots

            found = shoots.find_cell(shoots.find_package(p["shoot"]["package"]), p["shoot"]["cell"])
            template, cell = shoots.cell_template(found), found.as_dict()
        keep = p.get("keep")
        if p.get("edit"):  # an edit of one of the identity's results (portrait.flows.edit)
            from portrait.flows.edit import edit

            e = p["edit"]
            names = {Path(e["source"]): f"result {e['source_name']}",
                     **{Path(f): f"asset {n}" for f, n in zip(e["references"], e["reference_names"])}}
            result = edit(e["source"], prompt=e["prompt"], references=e["references"], backend=p["backend"],
                          identity=identity, n=1, seed=p["seed"], out=staging, ctx=self.context(p["preset"]),
                          finish=p["finish"], progress=self._reporter(item), job=p.get("run"), record=False,
                          public=lambda path: names.get(path, path.name), **p["overrides"])
        else:
            result = generate(identity, template=template, prompt=p["prompt"], backend=p["backend"],
                              n=None if keep else 1, keep=keep, attempts=p.get("attempts"), seed=p["seed"],
                              out=staging, ctx=self.context(p["preset"]), finish=p["finish"],
                              progress=self._reporter(item), with_identity=people, job=p.get("run"), cell=cell,
                              record=False, upscale_factor=p.get("upscale_factor"), **p["overrides"])
        report = result.as_json()
        rows = [{k: v for k, v in row.items() if k != "path"} for row in report["results"]]
        meta = {"backend": report["backend"], "template": report["template"], "results": rows}
        for key in ("notes", "keep", "warnings", "cell"):
            if key in report:
                meta[key] = report[key]
        images = tuple(Path(path) for path in result.paths)
        if keep is not None:
            if not images:
                raise NothingKept(f"{item.label}: {report['keep']['summary']}")
            # The keep report beside the images, naming them as they will be placed.
            placed = dict(final_names(item, images))
            report["results"] = [{**row, "path": placed[image].name} for row, image in zip(report["results"], images)]
            images += (write_json(staging / "results.json", report),)
        # Rank order, so `<stem>.png` (or `<stem>-0.png`) is always the best candidate.
        return ItemResult(staged=images, meta=meta)

    def placed(self, item: Item, targets: list[Path], meta: dict[str, Any]) -> None:
        """Index the item's placed images in the results history (portrait.flows.history)."""
        from portrait.flows.history import History

        p = item.payload
        images = [t for t in targets if t.suffix.lower() != ".json"]
        report = {key: meta[key] for key in ("keep", "warnings") if key in meta}
        History(self.settings).record(identity=p["identity"], job=p.get("run") or item.id,
                                      folder=Path(p["dest"]), rows=meta.get("results") or [],
                                      files=[t.name for t in images], backend=meta.get("backend"),
                                      template=meta.get("template"), cell=(meta.get("cell") or {}).get("key"),
                                      report=report or None)
