"""Studio packages: the shoot as customers buy it, as data.

A headshot service sells a *shoot*: a choice of backdrops and outfits (and poses), and every
combination of them rendered for one person, a number of good portraits per combination.
A package is that menu, one YAML file beside the templates (`portrait/templates/packages/`,
or the user's own file):

    name: corporate
    template: business          # the style template whose settings every cell uses
    prompt: "professional headshot photo of {trigger} {class}, {outfit}, {pose}, {backdrop}, soft key light"
    count: 2                    # images per cell when the shoot names no count
    backdrops: [{name: grey, title: Grey studio, prompt: "plain mid-grey studio backdrop"}, ...]
    outfits:   [{name: navy-suit, title: Navy suit, prompt: "wearing a tailored navy suit"}, ...]
    poses:     [{name: front, title: Facing the camera, prompt: "facing the camera"}, ...]   # optional

A *cell* is one backdrop x outfit (x pose); a shoot is the product of the three lists or a
chosen subset (`select_cells`). Each cell resolves to an ordinary style template
(`cell_template`): the package's base template with the cell's prompt, its entries'
negatives and controls added. So a cell runs through exactly the generate path a template
does, with every backend that takes a style prompt. The package file is declared once
(`PackageFile`, unknown keys refused with the known ones listed) and every path it names is
relative to its own folder, checked when it is read (docs/ARCHITECTURE.md#studio-packages).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from portrait.core.config import templates_root
from portrait.core.declare import describe, refuse_unknown
from portrait.core.errors import BadInput
from portrait.stages.templates import (ControlFile, ControlSpec, Template, check_template_image, control_spec,
                                       find_template, read_yaml)

NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")  # entry names: they become parts of cell keys and folder names
DIMENSIONS = ("backdrop", "outfit", "pose")
SLOTS = tuple("{" + d + "}" for d in DIMENSIONS)


class EntryFile(BaseModel):
    """One backdrop, outfit or pose of a package file."""

    model_config = ConfigDict(extra="forbid")

    name: str
    title: str = ""
    prompt: str = ""  # the words it adds to the cell's prompt (in its `{backdrop}` / `{outfit}` / `{pose}` slot)
    negative: str = ""  # added to the cell's negative prompt
    controls: dict[str, float | ControlFile] = Field(default_factory=dict)  # as a template's (a pose image, ...)

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError(f"'{value}' is not a name of lowercase letters, digits and '-' (at most 40)")
        return value


class PackageFile(BaseModel):
    """A package YAML, declared once: every field, its type and bounds."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1)
    title: str = ""
    description: str = ""
    template: str = Field("business", min_length=1)  # the style template the cells take their settings from
    prompt: str = Field(min_length=1)  # with {trigger} {class} and the slots {backdrop} {outfit} {pose}
    negative: str = ""  # added to the base template's negative prompt
    count: int = Field(2, ge=1, le=64)  # images per cell when the shoot asks for no count
    backdrops: list[EntryFile] = Field(min_length=1, max_length=64)
    outfits: list[EntryFile] = Field(min_length=1, max_length=64)
    poses: list[EntryFile] = Field(default_factory=list, max_length=64)  # none: the prompt's {pose} is empty


@dataclass(frozen=True)
class Entry:
    dimension: str  # backdrop | outfit | pose
    name: str
    title: str
    prompt: str
    negative: str = ""
    controls: tuple[ControlSpec, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "prompt": self.prompt}


@dataclass(frozen=True)
class Package:
    name: str
    path: Path
    title: str
    description: str
    template: str
    prompt: str
    negative: str
    count: int
    backdrops: tuple[Entry, ...]
    outfits: tuple[Entry, ...]
    poses: tuple[Entry, ...]  # empty: the package has no pose dimension

    @property
    def dimensions(self) -> tuple[str, ...]:
        return DIMENSIONS if self.poses else DIMENSIONS[:2]

    def entries(self, dimension: str) -> tuple[Entry, ...]:
        return {"backdrop": self.backdrops, "outfit": self.outfits, "pose": self.poses}[dimension]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title or self.name, "description": self.description,
                "template": self.template, "count": self.count,
                "backdrops": [e.as_dict() for e in self.backdrops], "outfits": [e.as_dict() for e in self.outfits],
                "poses": [e.as_dict() for e in self.poses], "cells": len(all_cells(self))}


@dataclass(frozen=True)
class Cell:
    """One combination of a package: what one group of portraits of the shoot shows."""

    package: Package
    backdrop: Entry
    outfit: Entry
    pose: Entry | None

    @property
    def parts(self) -> tuple[Entry, ...]:
        return (self.backdrop, self.outfit) + ((self.pose,) if self.pose is not None else ())

    @property
    def key(self) -> str:
        """`grey/navy-suit` (or `grey/navy-suit/front`): how a shoot names it (`--cells`)."""
        return "/".join(e.name for e in self.parts)

    @property
    def folder(self) -> str:
        """The output folder of the cell (names hold no `_`, so the key maps back one to one)."""
        return "_".join(e.name for e in self.parts)

    @property
    def title(self) -> str:
        return " · ".join(e.title or e.name for e in self.parts)

    def as_dict(self) -> dict[str, Any]:
        row = {"key": self.key, "title": self.title, "folder": self.folder, "backdrop": self.backdrop.name,
               "outfit": self.outfit.name}
        if self.pose is not None:
            row["pose"] = self.pose.name
        return row


# --- reading -------------------------------------------------------------------------------------


def packages_dir() -> Path:
    return Path(str(templates_root())) / "packages"


def shipped_packages() -> list[Package]:
    folder = packages_dir()
    return [load_package_file(p) for p in sorted(folder.glob("*.yaml"))] if folder.is_dir() else []


def find_package(name: str | Path) -> Package:
    """A shipped package by name, or a user's package file by path."""
    text = str(name)
    path = Path(text).expanduser()
    if path.suffix.lower() in (".yaml", ".yml"):
        if not path.is_file():
            raise BadInput(f"package {text}: no such file")
        return load_package_file(path)
    if "/" in text:
        raise BadInput(f"package {text}: no such package file")
    shipped = shipped_packages()
    for package in shipped:
        if package.name == text:
            return package
    known = ", ".join(p.name for p in shipped) or "none"
    raise BadInput(f"unknown package '{text}' (known: {known}; or give a package .yaml file)")


def bad_package(where: object, reason: str) -> BadInput:
    return BadInput(f"package {where}: {reason}")


def load_package_file(path: Path) -> Package:
    path = Path(path).resolve()
    data = read_yaml(path)
    refuse_unknown(data, f"package {path}", PackageFile)
    try:
        spec = PackageFile.model_validate(data)
    except ValidationError as exc:
        raise bad_package(path, describe(exc)) from None
    unknown = sorted(set(re.findall(r"\{(\w+)\}", spec.prompt)) - {"trigger", "class", *DIMENSIONS})
    if unknown:
        raise bad_package(path, f"prompt slot {{{unknown[0]}}} is not one of {{trigger}} {{class}} "
                                f"{' '.join(SLOTS)}")
    root = path.parent
    lists = {}
    for dimension, entries in (("backdrop", spec.backdrops), ("outfit", spec.outfits), ("pose", spec.poses)):
        names = [e.name for e in entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise bad_package(path, f"{dimension} '{twice[0]}' is listed twice")
        lists[dimension] = tuple(_entry(dimension, e, root, path) for e in entries)
    package = Package(name=spec.name or path.stem, path=path, title=spec.title, description=spec.description,
                      template=spec.template, prompt=spec.prompt, negative=spec.negative, count=spec.count,
                      backdrops=lists["backdrop"], outfits=lists["outfit"], poses=lists["pose"])
    base_template(package)  # the base template must exist and be a style template: checked now, not per cell
    return package


def _entry(dimension: str, entry: EntryFile, root: Path, path: Path) -> Entry:
    from portrait.stages.templates import CONTROL_NAMES

    controls = []
    for name, value in entry.controls.items():
        if name not in CONTROL_NAMES:
            raise bad_package(path, f"{dimension} '{entry.name}': control '{name}' is not one of "
                                    f"{', '.join(CONTROL_NAMES)}")
        spec = control_spec(name, value, root)
        if spec.image is not None:
            check_template_image(spec.image, path, f"{dimension} '{entry.name}' control image")
        controls.append(spec)
    return Entry(dimension, entry.name, entry.title, entry.prompt, entry.negative, tuple(controls))


def base_template(package: Package) -> Template:
    try:
        return find_template(package.template, "style")
    except BadInput as exc:
        raise bad_package(package.path, f"template: {exc}") from None


# --- choosing cells -------------------------------------------------------------------------------


def all_cells(package: Package) -> list[Cell]:
    poses: Sequence[Entry | None] = package.poses or (None,)
    return [Cell(package, b, o, p) for b, o, p in itertools.product(package.backdrops, package.outfits, poses)]


def _pick(package: Package, dimension: str, names: Iterable[str] | None, option: str) -> list[Entry]:
    entries = package.entries(dimension)
    if names is None:
        return list(entries)
    chosen = []
    by_name = {e.name: e for e in entries}
    for name in names:
        if name not in by_name:
            known = ", ".join(by_name) or f"none: package '{package.name}' has no {dimension}s"
            raise BadInput(f"{option} '{name}': package '{package.name}' has no {dimension} '{name}' (known: {known})")
        if by_name[name] not in chosen:
            chosen.append(by_name[name])
    if not chosen:
        raise BadInput(f"{option}: name at least one {dimension}")
    return chosen


def select_cells(package: Package, cells: Iterable[str] | None = None, *, backdrops: Iterable[str] | None = None,
                 outfits: Iterable[str] | None = None, poses: Iterable[str] | None = None) -> list[Cell]:
    """The cells of a shoot: every combination (nothing chosen), the product of chosen subsets
    (`backdrops`, `outfits`, `poses`), or named cells (`grey/navy-suit[/front]`; a key without
    its pose part means every pose). Order: the package's, each cell once."""
    if cells is not None and any(v is not None for v in (backdrops, outfits, poses)):
        raise BadInput("--cells: name cells, or choose --backdrops/--outfits/--poses; not both")
    if cells is None:
        b = _pick(package, "backdrop", backdrops, "--backdrops")
        o = _pick(package, "outfit", outfits, "--outfits")
        if poses is not None and not package.poses:
            raise BadInput(f"--poses: package '{package.name}' has no poses")
        p: Sequence[Entry | None] = _pick(package, "pose", poses, "--poses") if package.poses else (None,)
        return [Cell(package, *combo) for combo in itertools.product(b, o, p)]
    wanted: list[Cell] = []
    for key in cells:
        parts = [part.strip() for part in str(key).strip().strip("/").split("/")]
        if not 2 <= len(parts) <= len(package.dimensions) or not all(parts):
            shape = "/".join(package.dimensions)
            raise BadInput(f"--cells '{key}': a cell is {shape} (e.g. "
                           f"{all_cells(package)[0].key}); known: {', '.join(c.key for c in all_cells(package))}")
        b = _pick(package, "backdrop", [parts[0]], f"--cells '{key}'")
        o = _pick(package, "outfit", [parts[1]], f"--cells '{key}'")
        p = (_pick(package, "pose", [parts[2]], f"--cells '{key}'") if len(parts) == 3
             else list(package.poses) or [None])
        for combo in itertools.product(b, o, p):
            cell = Cell(package, *combo)
            if cell not in wanted:
                wanted.append(cell)
    if not wanted:
        raise BadInput("--cells: name at least one cell")
    return wanted


def find_cell(package: Package, key: str) -> Cell:
    """One cell by its full key (how a batch item names it)."""
    for cell in all_cells(package):
        if cell.key == key:
            return cell
    raise BadInput(f"package '{package.name}' has no cell '{key}' (known: "
                   f"{', '.join(c.key for c in all_cells(package))})")


# --- a cell as a template --------------------------------------------------------------------------


def cell_prompt(cell: Cell) -> str:
    """The package prompt with the cell's words in its slots; an empty slot leaves no stray comma."""
    text = cell.package.prompt
    for dimension in DIMENSIONS:
        entry = getattr(cell, dimension)
        text = text.replace("{" + dimension + "}", entry.prompt if entry is not None else "")
    pieces = [p.strip() for p in text.split(",")]
    return ", ".join(p for p in pieces if p)


def cell_template(cell: Cell) -> Template:
    """The cell as a style template: the package's base template with the cell's prompt, the
    entries' negatives and controls added (an entry's control replaces the base's of that name)."""
    base = base_template(cell.package)
    negative = ", ".join(x for x in (base.negative, cell.package.negative, *(e.negative for e in cell.parts)) if x)
    controls = {c.name: c for c in base.controls}
    for entry in cell.parts:
        controls.update({c.name: c for c in entry.controls})
    return dataclasses.replace(base, name=cell.package.name, title=f"{cell.package.title or cell.package.name}: "
                               f"{cell.title}", description=cell.package.description, prompt=cell_prompt(cell),
                               negative=negative, controls=tuple(controls.values()))
