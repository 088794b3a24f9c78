"""`portrait demo`: the whole path, offline, on sample photos that ship in installed packages.

make-tiny (once) -> sample photos -> prepare + train a tiny identity -> generate with two
style templates and one photo template -> each zero-shot backend. The tiny preset's
images are noise; every stage in between is the real code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .core.config import Settings
from .core.context import RunContext

DEMO_IDENTITY = "demo"


@dataclass(frozen=True)
class DemoStep:
    """One generate call of the demo: which backend, which template, on which preset."""

    label: str
    backend: str
    template: str | None
    preset: str
    prompt: str | None = None


DEMO_STEPS = (
    DemoStep("style: business headshot", "lora", "business", "tiny"),
    DemoStep("style: film", "lora", "film", "tiny"),
    DemoStep("photo template: hopper", "template", "hopper", "tiny"),
    DemoStep("zero-shot: IP-Adapter FaceID", "faceid", "business", "tiny"),
    DemoStep("zero-shot: InstantID (SDXL)", "instantid", "business", "tiny-sdxl"),
    DemoStep("zero-shot: PhotoMaker (SDXL)", "photomaker", None, "tiny-sdxl",
             prompt="studio portrait of a {class} img, soft light"),
)


def run_demo(settings: Settings, out: Path, n: int = 2) -> Iterator[str]:
    """Run the demo, yielding one line of news per step."""
    from .core.tiny import make_tiny
    from .flows.generate import generate
    from .flows.train import train
    from .samples import write_sample_photos

    settings = settings.with_(preset="tiny")
    out = Path(out)
    made = make_tiny(settings)
    yield f"tiny models: {len(made)} written to {settings.models_dir}" if made else "tiny models: present"

    photos = write_sample_photos(out / "photos")
    yield f"sample photos: {len(photos)} in {out / 'photos'} (astronaut variants, one outsider, one bad file)"

    ctx = RunContext.create(settings, preset="tiny")
    identity = train(photos, DEMO_IDENTITY, ctx=ctx, overwrite=True)
    report = json.loads((identity.root / "report.json").read_text())
    yield (f"trained identity '{identity.name}' in {identity.root} (LoRA families: {', '.join(identity.loras) or 'none'}; "
           f"kept {report['kept']}, rejected {report['rejected']}: {_reasons(report)})")

    contexts = {"tiny": ctx}
    for step in DEMO_STEPS:
        step_ctx = contexts.setdefault(step.preset, RunContext.create(settings, preset=step.preset, cache=ctx.cache))
        target = out / step.backend if step.template is None else out / f"{step.backend}-{step.template}"
        result = generate(identity, template=step.template, prompt=step.prompt, backend=step.backend, n=n, seed=7,
                          out=target, ctx=step_ctx)
        best = result.results[0] if result.results else None
        similarity = f"{best.score.similarity:.3f}" if best else "n/a"
        yield f"{step.label}: {len(result.paths)} image(s) in {target} (best similarity {similarity})"
    yield f"done: outputs in {out} (tiny models draw noise, so similarities are ~0; real presets: see README)"


def _reasons(report: dict) -> str:
    reasons = [row["reason"] for row in report["photos"] if row["status"] == "rejected"]
    return ", ".join(sorted(set(reasons))) or "none"
