"""Every setting declared once: each policy refuses a typo (exit 2, naming the key and the known
ones), every shipped preset builds every policy, and the schema shown is read from the declarations.

The policies are discovered (every dataclass named *Policy, or declaring a preset SECTION, in
every package pyproject.toml ships), so a new policy is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import tomllib
import typing
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from hostile_helpers import cli, error_line
from portrait.core.config import PRESET_SECTIONS, available_presets, load_preset
from portrait.core.declare import from_preset, policy_from, schema, section_keys
from portrait.core.errors import BadInput

REPO = Path(__file__).resolve().parents[1]
TYPO = "treshold"

# Policies that no preset section feeds, and where their keys are validated instead.
NOT_FROM_A_PRESET = {
    "RetryPolicy": "built from StudioPolicy (the studio section)",
    "EmbedPolicy": "request options, declared in portrait.core.options.BackendOptions",
    "FaceIDPolicy": "request options, declared in portrait.core.options.BackendOptions",
    "InstantIDPolicy": "request options, declared in portrait.core.options.BackendOptions",
    "PhotoMakerPolicy": "request options, declared in portrait.core.options.BackendOptions",
    "InfiniteYouPolicy": "request options, declared by stages/backends/infiniteyou.py InfiniteYouOptions",
    "PuLIDPolicy": "request options, declared by stages/backends/pulid.py PuLIDOptions",
}


def _packages() -> list[str]:
    """Every code package of the tree (the folder tree is the package: a folder with an __init__)."""
    return sorted(".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "portrait").rglob("__init__.py")
                  if p.parent.name not in ("presets", "templates"))


def discover_policies() -> list[type]:
    found: dict[str, type] = {}
    for package in _packages():
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__, package + "."):
            if info.ispkg:
                continue
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if (isinstance(value, type) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__
                        and (value.__name__.endswith("Policy") or hasattr(value, "SECTION"))):
                    found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[k] for k in sorted(found)]


POLICIES = discover_policies()
SECTIONED = [p for p in POLICIES if hasattr(p, "SECTION")]


def _id(cls: type) -> str:
    return cls.__name__


def test_discovery_finds_the_policies_and_each_is_placed():
    names = {p.__name__ for p in POLICIES}
    assert {"TrainPolicy", "GeneratePolicy", "FusePolicy", "StudioPolicy", "ServicePolicy", "RuntimePolicy",
            "IngestPolicy", "CaptionPolicy", "BackgroundPolicy", "PrepareFlowPolicy"} <= names
    unplaced = sorted(p.__name__ for p in POLICIES if not hasattr(p, "SECTION") and p.__name__ not in NOT_FROM_A_PRESET)
    assert not unplaced, f"declare a SECTION or say where their keys are validated: {unplaced}"
    # every section class is reachable from the preset schema the front doors check
    from portrait.preset_schema import sections

    table = sections()
    assert tuple(table) == PRESET_SECTIONS
    reachable = {cls for readers in table.values() for cls in readers}
    for readers in table.values():
        for cls in readers:
            hints = typing.get_type_hints(cls)
            reachable |= {hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}
    assert set(SECTIONED) <= reachable, sorted(p.__name__ for p in set(SECTIONED) - reachable)


def _typo_preset(tmp_path: Path, section: str) -> Path:
    """`extends: tiny` plus one unknown key in SECTION (a dotted path such as finish.fuse)."""
    parts = section.split(".")
    lines = ["extends: tiny"]
    for depth, part in enumerate(parts):
        lines.append("  " * depth + f"{part}:")
    lines.append("  " * len(parts) + f"{TYPO}: 0.5")
    path = tmp_path / "typo.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("cls", SECTIONED, ids=_id)
def test_a_typo_in_a_policys_section_exits_2_naming_the_key_and_the_known_ones(cls, tmp_path, capsys, tiny_home):
    preset = _typo_preset(tmp_path, cls.SECTION)
    # the front door: the whole file is checked before any work
    code, out, err = cli(capsys, tiny_home.home, "presets", "show", str(preset))
    assert code == 2, (out, err)
    line = error_line(err, str(preset), cls.SECTION, f"unknown key '{TYPO}'", "known: ")
    known = line.split("known: ", 1)[1]
    for key in section_keys(cls):
        assert key in known, (key, line)
    # the policy's own builder refuses it too (the Python API path), listing its keys
    with pytest.raises(BadInput) as caught:
        from_preset(cls, load_preset(str(preset)))
    message = str(caught.value)
    assert TYPO in message and "\n" not in message
    assert all(key in message for key in section_keys(cls))
    # and the generic builder on a bare mapping
    with pytest.raises(BadInput, match=f"unknown key '{TYPO}'"):
        policy_from(cls, {TYPO: 1}, "test")


@pytest.mark.parametrize("cls", [p for p in POLICIES if not hasattr(p, "SECTION")], ids=_id)
def test_a_policy_no_preset_feeds_has_its_keys_checked_elsewhere(cls):
    reason = NOT_FROM_A_PRESET[cls.__name__]
    if "request options" in reason:
        from portrait.core.options import validate_options
        from portrait.stages.backends import BACKENDS

        with pytest.raises(BadInput, match=f"--option {TYPO}: unknown option \\(known: "):
            validate_options({TYPO: 1}, "--option", BACKENDS.specs())
    else:
        from portrait.studio.runner import StudioPolicy

        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields <= set(section_keys(StudioPolicy)), fields - set(section_keys(StudioPolicy))


@pytest.mark.parametrize("name", available_presets())
def test_every_shipped_preset_loads_and_builds_every_policy(name):
    from portrait.preset_schema import check, load
    from portrait.studio.runner import StudioPolicy

    preset = load(name)
    built = check(preset)
    assert set(built) == set(PRESET_SECTIONS)
    for section, policies in built.items():
        for policy in policies.values():
            assert dataclasses.is_dataclass(policy) and policy.SECTION == section
    train = built["train"]["TrainPolicy"]
    # defaults are the declaration's; a preset states only what differs
    expected_rank = {"sd15": 64, "commercial": 64, "sdxl": 32, "tiny": 4, "tiny-sdxl": 4, "tiny-commercial": 4,
                     # the flow-matching trainer's bases (issue 28) set their own train sections
                     "flux": 16, "tiny-flux": 4, "klein-4b": 16, "klein-base-4b": 16, "zimage": 16,
                     "tiny-flux2-klein": 4, "tiny-zimage": 4,
                     "qwen-edit": 64, "tiny-qwen-edit": 64}  # keeps sd15's: Qwen-Image-Edit has no trainer
    assert train.rank == expected_rank[name]
    assert built["studio"]["StudioPolicy"] == StudioPolicy()


def test_shipped_presets_state_only_what_differs_from_the_declarations():
    """A key whose value equals its declared default (and its parent preset's) is a second copy."""
    import yaml

    from portrait.preset_schema import sections

    def default_of(section: str, key: str):
        head, *rest = section.split(".")
        for cls in sections()[head]:
            for part in rest:
                cls = typing.get_type_hints(cls)[part]
            for f in dataclasses.fields(cls):
                if f.metadata.get("key", f.name) == key:
                    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    return json.loads(json.dumps(value, default=list))
        raise KeyError(key)

    def walk(mapping, section):
        for key, value in mapping.items():
            if isinstance(value, dict) and section.split(".")[0] == "finish" and key in ("fuse", "retouch", "upscale"):
                yield from walk(value, f"{section}.{key}")
            else:
                yield section, key, value

    repeated = []
    for name in available_presets():
        data = yaml.safe_load((REPO / "portrait" / "presets" / f"{name}.yaml").read_text())
        parent = load_preset(data["extends"]) if data.get("extends") else None
        for section in PRESET_SECTIONS:
            for where, key, value in walk(data.get(section) or {}, section):
                same_as_default = json.loads(json.dumps(value)) == default_of(where, key)
                inherited = None
                if parent is not None:
                    inherited = parent.section(where.split(".")[0])
                    for part in where.split(".")[1:]:
                        inherited = inherited.get(part) or {}
                    inherited = inherited.get(key, default_of(where, key))
                if same_as_default and (parent is None or json.loads(json.dumps(inherited)) == default_of(where, key)):
                    repeated.append(f"{name}: {where}.{key}")
    assert not repeated, repeated


def test_resolved_settings_are_the_ones_the_presets_had_before_defaults_moved():
    """The values the policies get are the same as when sd15.yaml repeated every default."""
    from portrait.flows.finish import FinishPolicy, FinishSwitches
    from portrait.preset_schema import check

    sd15 = check(load_preset("sd15"))
    prepare = {k: v for p in sd15["prepare"].values() for k, v in dataclasses.asdict(p).items()}
    assert (prepare["resolution"], prepare["min_photos"], prepare["top_k"], prepare["face_backend"], prepare["trigger"],
            prepare["min_side"], prepare["max_pixels"], prepare["duplicate_bits"], prepare["max_yaw"],
            prepare["whiten"]) == (512, 3, 15, "auto", "sks", 192, 80_000_000, 5, 45.0, False)
    finish: FinishPolicy = sd15["finish"]["FinishPolicy"]
    assert FinishSwitches.from_options(finish.switches).as_dict() == {
        "fuse": True, "retouch": True, "upscale": True, "restore": False, "score": True, "clip": True}
    assert (finish.fuse.method, finish.fuse.blend, finish.retouch.sigma_color, finish.upscale.tile,
            finish.score.budget, finish.score.rank_space) == ("blend", "poisson", 20.0, 256, 4, "independent")
    train = sd15["train"]["TrainPolicy"]
    assert (train.rank, train.alpha, train.train_text_encoder, train.min_steps, train.snr_gamma,
            train.learning_rate, train.max_steps, train.validation_seeds) == (64, 32.0, True, 300, 5.0, 1e-4, 800, (11, 22))
    generate = sd15["generate"]["GeneratePolicy"]
    assert generate.memory == {"vae_slicing": "auto", "vae_tiling": "auto", "batch": "auto", "offload": "auto"}


def test_override_errors_name_the_option_and_section_errors_name_the_file(tmp_path):
    from portrait.stages.train import TrainPolicy

    with pytest.raises(BadInput, match=r"^--resolution 100: input should be a multiple of 8$"):
        TrainPolicy.from_section({}, resolution=100)
    with pytest.raises(BadInput, match=r"^--optimizer sgd: use one of adamw, adamw8bit, prodigy$"):
        TrainPolicy.from_section({}, optimizer="sgd")
    with pytest.raises(BadInput, match=r"^preset train \(given\): unknown key 'rnak' \(known: alpha, "):
        TrainPolicy.from_section({}, rnak=3)  # an override is checked by name too, never dropped
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: tiny\nfinish:\n  fuse: {skin_ratio: 1.5}\n")
    from portrait.flows.finish import FinishPolicy

    with pytest.raises(BadInput) as caught:
        FinishPolicy.from_preset(load_preset(str(bad)))
    assert str(caught.value) == (f"{bad} finish.fuse.skin_ratio: input should be less than or equal to 1 (got 1.5)")


def test_presets_show_prints_the_declared_schema(tiny_home, capsys):
    from portrait.stages.train import TrainPolicy

    code, out, err = cli(capsys, tiny_home.home, "presets", "show", "sd15", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc["sections"]) == set(PRESET_SECTIONS)
    train = {row["key"]: row for row in doc["sections"]["train"]}
    assert train["rank"]["type"] == "int" and train["rank"]["default"] == 32 and train["rank"]["value"] == 64
    assert train["rank"]["bounds"] == ">= 1" and train["rank"]["option"] == "--rank"
    assert train["resolution"]["bounds"] == ">= 64, <= 2048, multiple of 8"
    assert train["optimizer"]["bounds"] == "one of adamw, adamw8bit, prodigy"
    assert "value" not in train["learning_rate"]  # sd15 keeps the default
    assert [row["key"] for row in doc["sections"]["train"]] == list(section_keys(TrainPolicy))
    fuse = next(row for row in doc["sections"]["finish"] if row["key"] == "fuse")
    skin = next(row for row in fuse["settings"] if row["key"] == "skin_ratio")
    assert (skin["type"], skin["default"], skin["bounds"]) == ("float", 0.6, ">= 0, <= 1")
    assert skin["help"] == "share of the reference's skin in the result"  # the declaration's own comment
    prepare_keys = {row["key"] for row in doc["sections"]["prepare"]}
    assert {"caption_template", "whiten_background", "min_photos", "top_k", "min_side"} <= prepare_keys
    # the table form, for a person (tab-separated in a pipe)
    code, out, err = cli(capsys, tiny_home.home, "presets", "show", "tiny")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("rank\t"))
    assert row.split("\t")[:5] == ["rank", "int", "32", ">= 1", "4"]
    code, out, err = cli(capsys, tiny_home.home, "presets", "list", "--json")
    assert code == 0 and {r["name"] for r in json.loads(out)} == set(available_presets())


@dataclasses.dataclass(frozen=True)
class ToyDeclaration:
    level: Annotated[int, Field(ge=2, le=9)] = 3  # how loud
    mode: str = "a"


def test_schema_rows_follow_the_declaration_not_a_copy():
    """A field added to a declaration shows up in the schema with its type, default and bounds."""
    rows = schema(ToyDeclaration)
    assert rows == [{"key": "level", "type": "int", "default": 3, "bounds": ">= 2, <= 9", "help": "how loud"},
                    {"key": "mode", "type": "str", "default": "a", "bounds": "", "help": ""}]
    with pytest.raises(BadInput, match=r"^toy\.level: input should be less than or equal to 9 \(got 10\)$"):
        policy_from(ToyDeclaration, {"level": 10}, "toy")


def test_a_typo_fails_generate_before_any_work(tiny_home, tmp_path, capsys):
    preset = tmp_path / "t.yaml"
    preset.write_text("extends: tiny\nstudio:\n  workerz: 2\n")
    code, _, err = cli(capsys, tiny_home.home, "generate", "nobody", "--out", str(tmp_path / "out"), preset=str(preset))
    assert code == 2
    error_line(err, str(preset), "studio", "unknown key 'workerz'", "lease_seconds")
    assert not (tmp_path / "out").exists()
