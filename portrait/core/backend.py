"""The contract every generation backend meets (stages/backends/*.py).

A backend turns one resolved GenerationRequest into candidates. It loads what it needs
through ctx (registry + ModelCache, so batch jobs reuse warm pipelines), never imports
another backend, and records in each Candidate.info what it actually did (for example
{"identity_mode": "zero-shot", "note": "no sd15 LoRA in bundle"}).

The generate stage maps names to classes by data (BACKENDS in stages/generate.py), so a
backend's heavy imports happen only when it is used.
"""

from __future__ import annotations

from typing import ClassVar, Iterator, Protocol

from .context import RunContext
from .types import Candidate, GenerationRequest


class Backend(Protocol):
    name: ClassVar[str]
    families: ClassVar[tuple[str, ...]]  # base families it runs on ("sd15", "sdxl")

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        """Yield request.n candidates, seeds request.seed, request.seed + 1, ..."""
        ...
