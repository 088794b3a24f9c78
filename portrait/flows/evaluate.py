"""`portrait eval RESULTS... [--out DIR]`: compare runs in a report a person opens, and as JSON.

    report = evaluate(["out/sd15-lora", "out/sd15-template"], out="out/eval")

RESULTS are generate output folders (their results.json; a folder without one is searched
for nested results.json, as a batch output tree is) or a batch store (`jobs.db`: the done
generate items' results). Every row keeps its scores per embedding space, so two presets
or two backends can be compared on the same identities and prompts in the same spaces.

Rows are grouped by run (the results folder or store they came from), preset, backend and
template, so two runs of one backend are two groups; where the rows hold more than one preset
a second table puts the presets side by side for each backend and template. An output with
no face has similarity null: it is counted as "no face", ranked after every measured one and
left out of every mean (it used to score 0.0 and pull the means down as if measured).

The report does not take a folder's word for it: an image lying in a results folder that
its results.json does not list (a file someone dropped there, or a reference photo copied
over an output) is scored afresh against the identity's bundle in the same spaces, with
the copy-paste guard, when the bundle is in HOME.

Plots are inline SVG written here (bars, a scatter), not matplotlib: matplotlib is only a
dev dependency, the figures are four simple charts, and inline SVG keeps the report one
self-contained file (thumbnails are embedded too) that any browser opens offline.
"""

from __future__ import annotations

import base64
import html
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from portrait.core.config import Settings
from portrait.core.errors import BadInput, ModelMissing, PortraitError, bad_file
from portrait.core.formats.images import read_rgb, thumbnail_bytes
from portrait.core.formats.results import read_results
from portrait.core.io import write_json, write_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
SKIP_IMAGES = ("contact_sheet.png",)
EXTREMES = 4  # best and worst images shown


@dataclass(frozen=True)
class EvalReport:
    out: Path
    html: Path
    json: Path
    data: dict[str, Any] = field(default_factory=dict)


def evaluate(results: Sequence[str | Path], out: str | Path | None = None, *, settings: Settings | None = None,
             rescore: bool = True) -> EvalReport:
    """Read every run in `results`, rescore unlisted images, write `index.html` and `eval.json` to `out`."""
    if not results:
        raise BadInput("portrait eval: give at least one results folder or batch store")
    settings = settings or Settings()
    inputs = [Path(r).expanduser() for r in results]
    out = Path(out).expanduser() if out else inputs[0] / "eval"
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: --out exists and is not a folder")
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for source in inputs:
        if not source.exists():
            raise bad_file(source, "no such results folder or batch store")
        if source.is_file():
            rows += _store_rows(source)
            continue
        runs = [source / "results.json"] if (source / "results.json").is_file() else sorted(
            p for p in source.rglob("results.json") if out not in p.parents)
        if not runs:
            raise bad_file(source, "no results.json in this folder or below it (is it a `portrait generate` output?)")
        for run in runs:
            found, why = _run_rows(run, settings, rescore, skip=out)
            rows += found
            notes += why
    data = summarize(rows)
    data.update(inputs=[str(p) for p in inputs], notes=notes)
    report_html = render_html(data, _thumbs(data))
    json_path = write_json(out / "eval.json", data)
    html_path = write_text(out / "index.html", report_html)
    return EvalReport(out, html_path, json_path, data)


# --- reading runs ----------------------------------------------------------------------------


def _row(run: dict[str, Any], r: dict[str, Any], image: Path | None, origin: str) -> dict[str, Any]:
    scores = r.get("scores") or {}
    space = r.get("similarity_space") or (next(iter(scores)) if scores else None)
    return {
        "run": origin,
        "preset": run.get("preset") or (run.get("request") or {}).get("preset") or "?",
        "identity": run.get("identity"),
        "backend": run.get("backend"),
        "template": run.get("template") or "prompt",
        "image": str(image) if image else None,
        "seed": r.get("seed"),
        "rank": r.get("rank"),
        "similarity": r.get("similarity"),
        "similarity_space": space,
        "scores": {k: {"role": v.get("role"), "similarity": v.get("similarity")} for k, v in scores.items()},
        "clip_t": r.get("clip_t"),
        "passed_gate": bool(r.get("passed_gate")),
        "copy_paste": r.get("copy_paste"),
        "faces": r.get("faces"),
        "listed": True,
        **_confusion(r.get("face_scores") or []),
    }


def _confusion(face_scores: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A group picture's identity-confusion figures: the lowest own similarity of its faces, the
    highest similarity of any face to another identity in the picture, and the smallest margin
    between the two (a blended picture has a margin near 0). Nothing for a single portrait."""
    others = [v for f in face_scores for v in (f.get("confusion") or {}).values()]
    if not others:
        return {}
    margins = [f["margin"] for f in face_scores if f.get("margin") is not None]
    return {"group_own": min(float(f.get("similarity") or 0.0) for f in face_scores),
            "group_confusion": max(float(v) for v in others),
            "group_margin": min(margins) if margins else None}


def _run_rows(path: Path, settings: Settings, rescore: bool, skip: Path) -> tuple[list[dict[str, Any]], list[str]]:
    run = read_results(path)
    folder = path.parent
    rows = []
    listed = set()
    for r in run["results"]:
        image = folder / r["path"] if r.get("path") else None
        if image is not None:
            listed.add(image.name)
        rows.append(_row(run, r, image, str(folder)))
    strays = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and p.name not in listed and p.name not in SKIP_IMAGES and skip not in p.parents)
    notes = []
    if strays and rescore:
        try:
            rows += _rescore(run, strays, settings, str(folder))
        except (ModelMissing, BadInput) as exc:
            notes.append(f"{folder}: {len(strays)} unlisted image(s) not scored: {exc}")
    elif strays:
        notes.append(f"{folder}: {len(strays)} unlisted image(s) not scored (--no-rescore)")
    return rows, notes


def _rescore(run: dict[str, Any], images: Sequence[Path], settings: Settings, origin: str) -> list[dict[str, Any]]:
    """Score images the run did not list, in the run's spaces, against the identity's bundle."""
    from portrait.core.bundle import load_identity
    from portrait.core.context import RunContext
    from portrait.flows.finish import FinishPolicy, score_image, scoring_for
    from portrait.stages import score as score_stage

    ctx = RunContext.create(settings)
    identity = load_identity(ctx.settings, str(run.get("identity")))
    policy = FinishPolicy.from_preset(ctx.preset)
    options = (run.get("request") or {}).get("options") or {}
    scoring = scoring_for(ctx, identity, str(run.get("backend")), options, policy)
    threshold = policy.score.threshold_for(str(run.get("backend")), scoring.analyzer.scale.threshold)
    rows = []
    for path in images:
        try:
            image = read_rgb(path)
        except BadInput:
            continue
        score = score_image(image, scoring, policy.score)
        rows.append(_row(run, {
            "similarity": score.similarity, "similarity_space": score.space, "scores": score.spaces,
            "passed_gate": score_stage.passes(score, policy.score, threshold), "copy_paste": score.copy_paste,
            "faces": score.faces}, path, origin) | {"listed": False, "template": "unlisted files"})
    return rows


def _store_rows(path: Path) -> list[dict[str, Any]]:
    """The done generate items of a batch store, one row per placed image."""
    from portrait.studio.store import Store

    try:
        status = Store(path).status()
    except PortraitError:
        raise
    except Exception as exc:  # noqa: BLE001 - not a store: one line
        raise bad_file(path, f"not a results folder or batch store ({exc.__class__.__name__})") from None
    rows = []
    for item in status.items:
        if item.item.kind != "generate" or item.state != "done":
            continue
        run = {"identity": item.item.payload.get("identity"), "backend": item.meta.get("backend"),
               "template": item.meta.get("template"), "preset": item.item.payload.get("preset")}
        for output, r in zip(item.outputs, item.meta.get("results", [])):
            rows.append(_row(run, r, Path(output), str(path)))
    return rows


# --- figures ---------------------------------------------------------------------------------


def _mean(values: Sequence[float | None]) -> float | None:
    found = [float(v) for v in values if v is not None]
    return round(statistics.fmean(found), 4) if found else None


def _figures(members: list[dict[str, Any]], spaces: list[str]) -> dict[str, Any]:
    """Count, mean similarity per space (measured rows only), CLIP-T, gate pass rate, copy-paste, no face."""
    return {
        "n": len(members),
        "similarity": {s: _mean([m["scores"].get(s, {}).get("similarity") for m in members]) for s in spaces},
        "roles": {s: next((m["scores"][s]["role"] for m in members if s in m["scores"]), None) for s in spaces},
        "clip_t": _mean([m["clip_t"] for m in members]),
        "pass_rate": round(sum(m["passed_gate"] for m in members) / len(members), 4),
        "copy_paste": sum(1 for m in members if m["copy_paste"]),
        "no_face": sum(1 for m in members if m["similarity"] is None),
        # group pictures: own similarity beside the similarity to the other people (confusion)
        "group_own": _mean([m.get("group_own") for m in members]),
        "group_confusion": _mean([m.get("group_confusion") for m in members]),
        "group_margin": _mean([m.get("group_margin") for m in members]),
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (run, preset, backend, template) the figures of `_figures`; the presets side by side
    per (backend, template); the best and worst measured images."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        key = (str(row["run"]), str(row.get("preset") or "?"), str(row["backend"]), str(row["template"]))
        groups.setdefault(key, []).append(row)
    spaces = sorted({s for row in rows for s in row["scores"]})
    table = [{"run": run, "preset": preset, "backend": backend, "template": template, **_figures(members, spaces)}
             for (run, preset, backend, template), members in sorted(groups.items())]
    measured = sorted((r for r in rows if r["similarity"] is not None and r["image"]),
                      key=lambda r: (r["copy_paste"] is not None, -float(r["similarity"])))
    ranked = measured + [r for r in rows if r["similarity"] is None and r["image"]]  # no face: last
    return {
        "rows": rows,
        "spaces": spaces,
        "groups": table,
        "side_by_side": side_by_side(rows, spaces),
        "overall": {"n": len(rows), "pass_rate": round(sum(r["passed_gate"] for r in rows) / len(rows), 4) if rows else None,
                    "copy_paste": sum(1 for r in rows if r["copy_paste"]),
                    "no_face": sum(1 for r in rows if r["similarity"] is None),
                    "unlisted": sum(1 for r in rows if not r["listed"])},
        "best": measured[:EXTREMES],
        "worst": [r for r in reversed(ranked) if r not in measured[:EXTREMES]][:EXTREMES],
    }


def side_by_side(rows: list[dict[str, Any]], spaces: list[str]) -> dict[str, Any]:
    """For each (backend, template) one cell per preset: its figures over every run of that
    preset, with `similarity` in the ranking space (the rows' own `similarity_space`)."""
    presets = sorted({str(r.get("preset") or "?") for r in rows})
    by_style: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for row in rows:
        cells = by_style.setdefault((str(row["backend"]), str(row["template"])), {})
        cells.setdefault(str(row.get("preset") or "?"), []).append(row)
    out = []
    for (backend, template), cells in sorted(by_style.items()):
        out.append({"backend": backend, "template": template, "cells": {
            preset: {**_figures(members, spaces), "similarity": _mean([m["similarity"] for m in members])}
            for preset, members in cells.items()}})
    return {"presets": presets, "rows": out}


def _thumbs(data: dict[str, Any], side: int = 192) -> dict[str, str]:
    """data: URIs of the best and worst images (a self-contained report)."""
    out = {}
    for row in data["best"] + data["worst"]:
        path = Path(row["image"])
        if str(path) in out or not path.is_file():
            continue
        try:
            png = thumbnail_bytes(path, side, "PNG")
        except BadInput:
            continue
        out[str(path)] = "data:image/png;base64," + base64.b64encode(png).decode()
    return out


# --- inline SVG ------------------------------------------------------------------------------

PALETTE = ("#3b7dd8", "#e07b39", "#4aa564", "#b4497f", "#8c6bc8", "#7f7f7f")
W, H, PAD = 640, 300, 48


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _seed(row: dict[str, Any]) -> str:
    return f"seed {row['seed']}" if row.get("seed") is not None else _esc(Path(str(row["image"])).name)


def _measured(row: dict[str, Any]) -> str:
    """A row's similarity in its space, or "no face" (not measured)."""
    if row["similarity"] is None:
        return "no face"
    return f"{_esc(row['similarity_space'])} {_num(row['similarity'])}"


def _num(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(float(value), spec)


def bar_chart(name: str, title: str, labels: list[str], series: dict[str, list[float | None]],
              ymax: float = 1.0) -> str:
    """Grouped bars: one group per label, one bar per series (None = not measured)."""
    n = max(1, len(labels))
    k = max(1, len(series))
    slot = (W - 2 * PAD) / n
    width = slot * 0.8 / k
    parts = [f'<svg class="plot" data-plot="{_esc(name)}" viewBox="0 0 {W} {H + 40}" width="{W}" height="{H + 40}" '
             f'role="img" aria-label="{_esc(title)}"><title>{_esc(title)}</title>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>',
             f'<line x1="{PAD}" y1="{PAD / 2}" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>']
    for tick in np.linspace(0, ymax, 5):
        y = H - PAD - (H - 1.5 * PAD) * tick / ymax
        parts.append(f'<text x="{PAD - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick:.2f}</text>')
    for j, (label_series, values) in enumerate(series.items()):
        for i, value in enumerate(values):
            if value is None:
                continue
            height = (H - 1.5 * PAD) * max(0.0, min(float(value), ymax)) / ymax
            x = PAD + i * slot + slot * 0.1 + j * width
            parts.append(f'<rect class="bar" x="{x:.1f}" y="{H - PAD - height:.1f}" width="{width:.1f}" '
                         f'height="{height:.1f}" fill="{PALETTE[j % len(PALETTE)]}" data-series="{_esc(label_series)}" '
                         f'data-value="{float(value):.4f}"><title>{_esc(label_series)} {_esc(labels[i])}: '
                         f'{float(value):.3f}</title></rect>')
    for i, label in enumerate(labels):
        x = PAD + (i + 0.5) * slot
        parts.append(f'<text x="{x:.1f}" y="{H - PAD + 14}" font-size="10" text-anchor="middle">{_esc(label)}</text>')
    for j, label_series in enumerate(series):
        parts.append(f'<rect x="{PAD + j * 150}" y="{H + 8}" width="10" height="10" fill="{PALETTE[j % len(PALETTE)]}"/>'
                     f'<text x="{PAD + 14 + j * 150}" y="{H + 17}" font-size="11">{_esc(label_series)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def scatter(name: str, title: str, points: list[tuple[float, float, str, bool]], xlabel: str, ylabel: str) -> str:
    """x, y in [0, 1] (auto-ranged), a label per point; flagged points are drawn as red rings."""
    parts = [f'<svg class="plot" data-plot="{_esc(name)}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
             f'role="img" aria-label="{_esc(title)}"><title>{_esc(title)}</title>',
             f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="#333"/>',
             f'<line x1="{PAD}" y1="{PAD / 2}" x2="{PAD}" y2="{H - PAD}" stroke="#333"/>',
             f'<text x="{W / 2}" y="{H - 10}" font-size="11" text-anchor="middle">{_esc(xlabel)}</text>',
             f'<text x="14" y="{H / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 14 {H / 2})">'
             f'{_esc(ylabel)}</text>']
    if not points:
        parts.append(f'<text x="{W / 2}" y="{H / 2}" font-size="12" text-anchor="middle">no measurements '
                     f'(CLIP-T absent or refused by the license policy)</text></svg>')
        return "".join(parts)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(0.0, min(xs)), max(1.0, max(xs))
    y0, y1 = min(0.0, min(ys)), max(0.4, max(ys))
    for x, y, label, flagged in points:
        px = PAD + (W - 2 * PAD) * (x - x0) / (x1 - x0 or 1)
        py = H - PAD - (H - 1.5 * PAD) * (y - y0) / (y1 - y0 or 1)
        style = 'fill="none" stroke="#d22" stroke-width="2"' if flagged else 'fill="#3b7dd8" fill-opacity="0.7"'
        parts.append(f'<circle class="point" cx="{px:.1f}" cy="{py:.1f}" r="5" {style}><title>{_esc(label)}: '
                     f'{x:.3f}, {y:.3f}</title></circle>')
    parts.append("</svg>")
    return "".join(parts)


def _group_label(group: dict[str, Any], groups: list[dict[str, Any]]) -> str:
    """backend/template, with the preset and run named only where they tell groups apart."""
    label = f"{group['backend']}/{group['template']}"
    if len({g["preset"] for g in groups}) > 1:
        label += f" [{group['preset']}]"
    if len({g["run"] for g in groups}) > 1:
        label += f" ({Path(str(group['run'])).name})"
    return label


def _side_by_side_html(compare: dict[str, Any]) -> str:
    """One row per backend and template, one column per preset (shown when there are two or more)."""
    presets = compare["presets"]
    if len(presets) < 2:
        return ""
    heads = "".join(f"<th>{_esc(p)}</th>" for p in presets)
    body = []
    for row in compare["rows"]:
        cells = []
        for preset in presets:
            cell = row["cells"].get(preset)
            if cell is None:
                cells.append("<td>-</td>")
                continue
            no_face = f" &middot; no face {cell['no_face']}" if cell["no_face"] else ""
            cells.append(f"<td>{_num(cell['similarity'])} &middot; gate {_num(cell['pass_rate'], '.0%')} &middot; "
                         f"n {cell['n']}{no_face}</td>")
        body.append(f"<tr><td>{_esc(row['backend'])}</td><td>{_esc(row['template'])}</td>{''.join(cells)}</tr>")
    return (f'<h2>Presets side by side</h2><p>Mean similarity in each row\'s ranking space, gate pass rate and '
            f'count, per preset.</p><table data-compare="presets"><tr><th>backend</th><th>template</th>{heads}</tr>'
            f'{"".join(body)}</table>')


def render_html(data: dict[str, Any], thumbs: dict[str, str]) -> str:
    groups = data["groups"]
    labels = [_group_label(g, groups) for g in groups]
    spaces = data["spaces"]
    sim_series = {f"{s} ({next((g['roles'][s] for g in groups if g['roles'].get(s)), '?')})":
                  [g["similarity"].get(s) for g in groups] for s in spaces}
    confusion_groups = [g for g in groups if g.get("group_confusion") is not None]
    confusion_html = ""
    if confusion_groups:
        confusion_html = ("<h2>Group pictures: each face's own identity against the other people (identity "
                          "confusion)</h2>" + bar_chart(
                              "confusion", "own similarity against the most similar other identity",
                              [f"{g['backend']}/{g['template']}" for g in confusion_groups],
                              {"own (lowest face)": [g["group_own"] for g in confusion_groups],
                               "other identity (highest)": [g["group_confusion"] for g in confusion_groups]}))
    gate_series = {"gate pass rate": [g["pass_rate"] for g in groups],
                   "copy-paste share": [g["copy_paste"] / g["n"] if g["n"] else None for g in groups]}
    points = [(float(r["similarity"]), float(r["clip_t"]), f"{r['backend']}/{r['template']} seed {r['seed']}",
               bool(r["copy_paste"])) for r in data["rows"] if r["clip_t"] is not None and r["similarity"] is not None]
    rows_html = "".join(
        f"<tr><td>{_esc(g['run'])}</td><td>{_esc(g['preset'])}</td><td>{_esc(g['backend'])}</td>"
        f"<td>{_esc(g['template'])}</td><td>{g['n']}</td>"
        + "".join(f"<td>{_num(g['similarity'].get(s))}</td>" for s in spaces)
        + f"<td>{_num(g['clip_t'])}</td><td>{_num(g['pass_rate'], '.0%')}</td><td>{g['copy_paste']}</td>"
        f"<td>{g['no_face']}</td></tr>"
        for g in groups)
    compare_html = _side_by_side_html(data["side_by_side"])
    flagged = "".join(f"<li><code>{_esc(Path(r['image']).name if r['image'] else '?')}</code> "
                      f"({_esc(r['backend'])}/{_esc(r['template'])}): {_esc(r['copy_paste'])}</li>"
                      for r in data["rows"] if r["copy_paste"]) or "<li>none</li>"

    def gallery(name: str, rows: list[dict[str, Any]]) -> str:
        cells = []
        for r in rows:
            src = thumbs.get(str(r["image"]))
            if not src:
                continue
            flag = " copy-paste" if r["copy_paste"] else ""
            mark = " &middot; copy-paste" if flag else ""
            name_ = _esc(Path(r["image"]).name)
            cells.append(f'<figure class="thumb{flag}"><img alt="{name_}" src="{src}">'
                         f'<figcaption>{_esc(r["backend"])}/{_esc(r["template"])} {_seed(r)}<br>'
                         f'{_measured(r)}{mark}</figcaption></figure>')
        return f'<div class="gallery" data-gallery="{name}">{"".join(cells) or "<p>none</p>"}</div>'

    overall = data["overall"]
    notes = "".join(f"<li>{_esc(n)}</li>" for n in data.get("notes", []))
    notes_html = f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""
    space_heads = "".join(f"<th>{_esc(s)}</th>" for s in spaces)
    pass_rate = _num(overall["pass_rate"], ".0%")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>portrait eval</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:nth-child(-n+4) {{ text-align: left; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 12px; }} figure {{ margin: 0; width: 200px; }}
figure img {{ width: 192px; border: 3px solid #4aa564; }} figure.copy-paste img {{ border-color: #d22; }}
figcaption {{ font-size: 12px; }} .pair {{ display: grid; grid-template-columns: 1fr 1fr; gap: 24px; }}
</style></head><body>
<h1>portrait eval</h1>
<p>{overall['n']} images from {len(data['inputs'])} input(s); gate pass rate
{pass_rate}; {overall['copy_paste']} flagged copy-paste;
{overall['unlisted']} unlisted image(s) rescored; {overall['no_face']} with no face (not measured: left out of
the means and ranked last). Ranking uses the independent space where one is available; both spaces are shown.</p>
<table><tr><th>run</th><th>preset</th><th>backend</th><th>template</th><th>n</th>{space_heads}
<th>CLIP-T</th><th>gate</th><th>copy-paste</th><th>no face</th></tr>{rows_html}</table>
{compare_html}
<h2>Identity similarity per run, backend and template, in each space</h2>
{bar_chart("similarity", "mean identity similarity per space", labels, sim_series)}
<h2>Prompt adherence (CLIP-T) against identity similarity</h2>
{scatter("clip-vs-similarity", "CLIP-T against similarity", points, "identity similarity (ranking space)", "CLIP-T")}
{confusion_html}
<h2>Gate pass rate and copy-paste flags</h2>
{bar_chart("gate", "gate pass rate and copy-paste share", labels, gate_series)}
<h3>Flagged copy-paste</h3><ul class="flags">{flagged}</ul>
<h2>Best and worst</h2>
<div class="pair"><div><h3>best</h3>{gallery("best", data["best"])}</div>
<div><h3>worst</h3>{gallery("worst", data["worst"])}</div></div>
{notes_html}
</body></html>
"""
