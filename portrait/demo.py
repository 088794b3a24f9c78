"""`portrait demo`: the whole path, offline, on sample photos that ship in installed packages.

sample photos -> prepare + train a tiny identity -> generate with each backend -> a summary a
person can read (`summary.json`, `index.html`). The tiny preset's stand-ins are written on
first use; they draw noise, so a similarity printed for their images would mean nothing.
One path is measured for real: fusing the trained face into the Grace Hopper photo template
(`passes=0`, no diffusion), scored by dlib's real recognizer against the identity, beside the
same figure for the untouched template face. That shows, offline, that the product keeps a
face; the other paths show that each backend runs end to end and say that they drew noise.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from .core.config import Settings
from .core.context import RunContext
from .core.io import write_json, write_text

DEMO_IDENTITY = "demo"


@dataclass(frozen=True)
class DemoStep:
    """One generate call of the demo: which backend, which template, on which preset."""

    label: str
    backend: str
    template: str | None
    preset: str
    prompt: str | None = None
    measured: bool = False  # its images carry a real face: score it and compare with the template's own face
    n: int = 2
    size: tuple[int, int] | None = None  # None: the preset's size (64 px on tiny)
    options: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None
    license: str | None = None  # run under this license policy (the commercial path)
    edit: str | None = None  # then edit the best result with this prompt (portrait edit)

    @property
    def out_name(self) -> str:
        return self.folder or (self.backend if self.template is None else f"{self.backend}-{self.template}")


DEMO_STEPS = (
    # 256x296 keeps Hopper's face ~100 px, enough for dlib's detector; one image, since fusion
    # alone draws no noise and every seed gives the same picture.
    DemoStep("photo template: hopper, face fusion", "template", "hopper", "tiny", measured=True, n=1,
             size=(256, 296), options={"passes": 0}, folder="fusion-hopper"),
    DemoStep("photo template: hopper, two inpainting passes", "template", "hopper", "tiny"),
    DemoStep("style: business headshot (LoRA)", "lora", "business", "tiny"),
    DemoStep("style: film (LoRA)", "lora", "film", "tiny"),
    DemoStep("zero-shot: IP-Adapter FaceID", "faceid", "business", "tiny"),
    DemoStep("zero-shot: InstantID (SDXL)", "instantid", "business", "tiny-sdxl"),
    DemoStep("zero-shot: PhotoMaker (SDXL)", "photomaker", None, "tiny-sdxl",
             prompt="studio portrait of a {class} img, soft light"),
    DemoStep("zero-shot: InfiniteYou (FLUX.1-dev)", "infiniteyou", "business", "tiny-flux"),
    DemoStep("zero-shot: PuLID v1.1 (SDXL)", "pulid", "business", "tiny-sdxl"),
    DemoStep("zero-shot: PuLID-FLUX v0.9.1 (FLUX)", "pulid-flux", None, "tiny-flux",
             prompt="studio portrait of a {class}, soft light"),
    # The commercial path (issue 29): only Apache-2.0 / commercial-class models, AuraFace or dlib
    # scoring, then an identity-locked edit of the best result.
    DemoStep("commercial path: FLUX.2 [klein] 4B from the reference photos, then an edit (--license commercial)",
             "klein-ref", "business", "tiny-flux2-klein", n=1, options={"references": 2}, license="commercial",
             edit="a sunny beach behind them", folder="commercial-klein"),
)

NOISE_NOTE = "ran end to end; tiny stand-ins draw noise, so there is no face to measure (real presets: README)"


def commercial_note(bom: list[dict[str, Any]], passed: int, evaluated: int, edit_passed: int | None) -> str:
    """What the commercial step can and cannot show, from its own results.json."""
    classes = sorted({str(row.get("license_class")) for row in bom})
    edit = "" if edit_passed is None else f", and the edit of the best one ({edit_passed} passed)"
    return (f"ran under --license commercial loading only {len(bom)} model(s) of license class "
            f"{' / '.join(classes)} (bill of materials in results.json); every candidate was re-scored against "
            f"the identity and gated ({passed} of {evaluated} passed{edit}). What this shows: the Apache-2.0 path runs "
            f"end to end, refuses nothing it needs, and its gate rejects faces that are not the person. What it "
            f"cannot show: whether klein keeps a face. The tiny stand-in paints noise, so failing the gate is the "
            f"right answer here; likeness needs `--preset klein-4b` (about 16 GB of weights; README, for businesses).")


@dataclass(frozen=True)
class DemoRow:
    """What one step did and what it measured, for the summary."""

    label: str
    backend: str
    template: str | None
    preset: str
    folder: str
    images: list[str]
    seconds: float
    space: str | None = None  # the embedding space of the figures below
    similarity: float | None = None  # best output face to the identity
    template_similarity: float | None = None  # the untouched template face to the identity
    threshold: float | None = None  # same-person threshold of the space
    note: str = ""

    def line(self) -> str:
        head = f"{self.label}: {len(self.images)} image(s) in {self.folder}/"
        if self.similarity is None:
            return f"{head} - {self.note}"
        return (f"{head} - identity kept: {self.space} similarity to the trained person {self.similarity:.2f} "
                f"(untouched template face {self.template_similarity:.2f}; same person above {self.threshold:.2f})")


def run_demo(settings: Settings, out: Path, n: int | None = None) -> Iterator[str]:
    """Run the demo, yielding one line of news per step, then the summary lines."""
    from .flows.generate import generate
    from .flows.train import train
    from .samples import write_sample_photos

    settings = settings.with_(preset="tiny")
    out = Path(out)
    photos = write_sample_photos(out / "photos")
    yield f"sample photos: {len(photos)} in {out / 'photos'} (astronaut variants, one outsider, one bad file)"

    ctx = RunContext.create(settings, preset="tiny")
    identity = train(photos, DEMO_IDENTITY, ctx=ctx, overwrite=True)
    report = json.loads((identity.root / "report.json").read_text())
    trained = (f"trained identity '{identity.name}' in {identity.root} (LoRA families: "
               f"{', '.join(identity.loras) or 'none'}; kept {report['kept']}, rejected {report['rejected']}: "
               f"{_reasons(report)})")
    yield trained

    contexts = {"tiny": ctx}
    rows: list[DemoRow] = []
    for step in DEMO_STEPS:
        key = f"{step.preset}:{step.license or 'any'}"
        step_settings = settings.with_(license=step.license) if step.license else settings
        step_ctx = contexts.setdefault(key, RunContext.create(step_settings, preset=step.preset, cache=ctx.cache))
        target = out / step.out_name
        overrides: dict[str, Any] = {"options": dict(step.options)} if step.options else {}
        if step.size:
            overrides.update(width=step.size[0], height=step.size[1])
        started = time.perf_counter()
        result = generate(identity, template=step.template, prompt=step.prompt, backend=step.backend,
                          n=n or step.n, seed=7, out=target, ctx=step_ctx, **overrides)
        seconds = time.perf_counter() - started
        images = [p.name for p in result.paths]
        row = DemoRow(step.label, step.backend, step.template, step.preset, step.out_name, images, round(seconds, 1),
                      note=NOISE_NOTE)
        if step.license:
            edit_passed = None
            if step.edit and result.paths:
                from .flows.edit import edit

                edited = edit(result.paths[0], prompt=step.edit, n=1, seed=7, out=target / "edit", ctx=step_ctx)
                images += [f"edit/{p.name}" for p in edited.paths]
                edit_passed = sum(r.passed_gate for r in edited.results)
                seconds = time.perf_counter() - started
            gate = result.info.get("gate") or {}
            row = replace(row, images=images, seconds=round(seconds, 1),
                          note=commercial_note(result.info.get("bom") or [], sum(r.passed_gate for r in result.results),
                                               int(gate.get("evaluated", len(result.results))), edit_passed))
        if step.measured:
            row = _measured(row, step_ctx, identity, result)
        rows.append(row)
        yield row.line()

    summary = {"identity": identity.name, "trained": trained, "photos": report["kept"] + report["rejected"],
               "kept": report["kept"], "rejected": report["rejected"], "steps": [asdict(r) for r in rows]}
    write_json(out / "summary.json", summary)
    write_text(out / "index.html", _html(summary, rows))
    yield f"summary: {out / 'index.html'} (open it in a browser) and {out / 'summary.json'}"


def _measured(row: DemoRow, ctx: RunContext, identity, result) -> DemoRow:
    """The best output's similarity (the pipeline's own dlib score) beside the untouched
    template face's similarity to the same identity, in the same space."""
    from .core.faces import make_analyzer, similarity, similarity_scale
    from .core.formats.images import read_rgb
    from .stages.templates import find_template

    space = "dlib"
    analyzer = make_analyzer(ctx, space)
    template = find_template(row.template, "photo")
    faces = analyzer.detect(read_rgb(template.image))
    consensus = identity.consensus[space]
    scored = [r for r in result.results if r.score.similarity is not None and r.score.faces]
    if not faces or not scored:
        return replace(row, note="no face found to measure (see results.json)")
    best = max(r.score.similarity for r in scored)
    return replace(row, space=space, similarity=round(float(best), 3),
                   template_similarity=round(similarity(faces[0].embedding, consensus, space), 3),
                   threshold=similarity_scale(space).threshold, note="")


def _reasons(report: dict) -> str:
    reasons = [row["reason"] for row in report["photos"] if row["status"] == "rejected"]
    return ", ".join(sorted(set(reasons))) or "none"


def _html(summary: dict, rows: list[DemoRow]) -> str:
    """A page a person opens: each path, what it did, its figure, its images (relative links)."""
    e = html.escape
    blocks = []
    for r in rows:
        if r.similarity is not None:
            figure = (f"<p class=ok>Identity kept: {e(r.space)} similarity to the trained person "
                      f"<b>{r.similarity:.2f}</b>; the untouched template face measures <b>{r.template_similarity:.2f}"
                      f"</b> (same person above {r.threshold:.2f}).</p>")
        else:
            figure = f"<p class=note>{e(r.note)}</p>"
        pics = "".join(f'<a href="{e(r.folder)}/{e(name)}"><img src="{e(r.folder)}/{e(name)}" alt="{e(name)}"></a>'
                       for name in r.images)
        blocks.append(f"<section><h2>{e(r.label)}</h2><p>backend <code>{e(r.backend)}</code>, template "
                      f"<code>{e(r.template or '-')}</code>, preset <code>{e(r.preset)}</code>, {r.seconds:.1f} s, "
                      f'<a href="{e(r.folder)}/results.json">results.json</a></p>{figure}<div>{pics}</div></section>')
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>portrait demo</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }}
section {{ border-top: 1px solid #ddd; padding: .5em 0 1em; }}
img {{ height: 160px; margin: 0 .5em .5em 0; image-rendering: auto; border: 1px solid #ccc; }}
.ok {{ color: #0a6b2d; }} .note {{ color: #666; }} code {{ background: #f3f3f3; padding: 0 .2em; }}
</style></head><body>
<h1>portrait demo</h1>
<p>{e(summary['trained'])}</p>
<p>Sample photos in <a href="photos/">photos/</a>: {summary['kept']} kept, {summary['rejected']} rejected.</p>
{''.join(blocks)}
</body></html>
"""
