"""results.json: one row builder, one document builder, one reader.

The contract (docs/ARCHITECTURE.md#results-json): a document with `identity`, `backend`,
`template`, `results` (one row per written image, best first), the resolved `request`, and the
run's extra facts (bill of materials, versions, scoring, gate figures). A row holds the image's
file name, seed, rank, the identity `similarity` in `similarity_space` with every space's scores,
`reference_similarity`, `clip_t`, `faces`, the per-face `face_scores` of a group picture,
`passed_gate`, `copy_paste`, stage `timings` (s) and the candidate's `info`. Similarities and
timings are rounded to 4 decimals.

Before this module the generate flow and finish each built rows, with different fields; the
generate flow's rows are the ones users have in their results.json, so they are the contract
kept here field for field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from portrait.core.errors import bad_file
from portrait.core.types import RankedResult

RESULTS_FILE = "results.json"

__all__ = ["RESULTS_FILE", "results_row", "results_document", "read_results"]


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)


def results_row(result: RankedResult) -> dict[str, Any]:
    """One `results` entry for a ranked, written (or not yet written: path None) result."""
    s = result.score
    return {
        "path": result.path.name if result.path else None,
        "seed": result.candidate.seed,
        "rank": result.rank,
        "similarity": _round(s.similarity),
        "passed_gate": bool(result.passed_gate),
        "timings": {k: round(float(v), 4) for k, v in result.candidate.timings.items()},
        "reference_similarity": _round(s.reference_similarity),
        "clip_t": _round(s.clip_t),
        "faces": s.faces,
        # a group picture: every assigned face with its identity, box and similarity
        "face_scores": [f.as_dict() for f in s.per_face],
        "info": result.candidate.info,
        # issue 18: the space `similarity` is measured in, every space scored, copy-paste
        "similarity_space": s.space,
        "scores": {space: dict(v) for space, v in s.spaces.items()},
        "copy_paste": s.copy_paste,
        # the subject's face crop as prepare judges photos (sharpness, exposure); --keep checks it
        "face_quality": {k: _round(v) for k, v in s.quality.items()} or None,
    }


def results_document(identity: str, backend: str, template: str | None, results: Sequence[RankedResult],
                     request: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The whole results.json."""
    return {"identity": identity, "backend": backend, "template": template,
            "results": [results_row(r) for r in results], "request": dict(request), **dict(extra or {})}


def read_results(path: Path | str) -> dict[str, Any]:
    """A results.json, checked to be one (an object with a `results` list); else one line, exit 2."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise bad_file(path, f"unreadable results file ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), list):
        raise bad_file(path, "not a portrait results.json (no `results` list)")
    return data
