"""The model registry: resolution order, missing-model errors, offline behaviour, licenses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from portrait.core.config import Settings
from portrait.core.errors import BadInput, ModelMissing
from portrait.core.tiny import STAMP, TINY_VERSION
from portrait.core.registry import ModelSpec, Registry, download, verify


def _registry() -> Registry:
    return Registry(
        [
            ModelSpec(id="base", kind="sd-pipeline", repo="org/base", files=["model_index.json", "unet/w.bin"], tiny="tiny-base"),
            ModelSpec(id="tiny-base", kind="sd-pipeline", source="tiny", files=["model_index.json"], maker="x:y"),
            ModelSpec(id="dlib", kind="dlib", source="package", package="face_recognition_models",
                      files=["models/shape_predictor_5_face_landmarks.dat"]),
        ]
    )


def _write(root: Path, files: list[str]) -> None:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)


def _fake_hf_cache(cache: Path, repo: str, files: list[str]) -> Path:
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "abc123"
    _write(snapshot, files)
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    return snapshot


def test_resolution_order_explicit_home_hfcache(tmp_path, monkeypatch):
    registry = _registry()
    settings = Settings(home=tmp_path / "home")
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    with pytest.raises(ModelMissing) as missing:
        registry.resolve("base", settings)
    assert "portrait models download base" in str(missing.value)

    snapshot = _fake_hf_cache(cache, "org/base", ["model_index.json", "unet/w.bin"])
    hit = registry.resolve("base", settings)
    assert (hit.origin, hit.root) == ("hf-cache", snapshot)

    _write(settings.models_dir / "base", ["model_index.json", "unet/w.bin"])
    hit = registry.resolve("base", settings)
    assert (hit.origin, hit.root) == ("home", settings.models_dir / "base")

    explicit = tmp_path / "my.safetensors"
    explicit.write_bytes(b"x")
    hit = registry.resolve("base", settings, explicit=explicit)
    assert (hit.origin, hit.path) == ("explicit", explicit)


def test_partial_home_folder_does_not_count(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    settings = Settings(home=tmp_path)
    _write(settings.models_dir / "base", ["model_index.json"])  # unet missing: an interrupted download
    with pytest.raises(ModelMissing):
        _registry().resolve("base", settings)


def test_tiny_preset_resolves_stand_in_and_names_make_tiny(tmp_path):
    registry = _registry()
    settings = Settings(home=tmp_path)
    with pytest.raises(ModelMissing) as missing:  # asked not to write it (models list, doctor)
        registry.resolve("base", settings, tiny=True, write_tiny=False)
    assert "portrait models make-tiny" in str(missing.value)
    _write(settings.models_dir / "tiny-base", ["model_index.json", STAMP])
    (settings.models_dir / "tiny-base" / STAMP).write_text(TINY_VERSION)
    hit = registry.resolve("base", settings, tiny=True)
    assert (hit.spec.id, hit.origin) == ("tiny-base", "tiny")


def test_package_models_resolve_from_the_wheel(tmp_path):
    hit = _registry().resolve("dlib", Settings(home=tmp_path))
    assert hit.origin == "package" and hit.path.is_file() and hit.path.stat().st_size > 1000


def test_cache_lookup_never_goes_online(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(*args, **kwargs):
        calls.append(kwargs)
        raise FileNotFoundError("not cached")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(ModelMissing):
        _registry().resolve("base", Settings(home=tmp_path))
    assert calls and all(c["local_files_only"] is True for c in calls)


def test_download_respects_hf_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BadInput, match="HF_HUB_OFFLINE"):
        download(_registry().get("base"), Settings(home=tmp_path))
    assert not (tmp_path / "models" / "base").exists()


def test_verify_reports_mismatch_and_unknown(tmp_path):
    spec = ModelSpec(id="m", kind="x", files=["a.bin", "b.bin", "c.bin"],
                     sha256={"a.bin": "0" * 64, "b.bin": "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"})
    (tmp_path / "a.bin").write_text("a")
    (tmp_path / "b.bin").write_text("a")
    status = {row.file: row.status for row in verify(spec, tmp_path)}
    assert status == {"a.bin": "mismatch", "b.bin": "ok", "c.bin": "missing"}


def test_real_registry_is_complete():
    """Every real model names a license and a tiny stand-in that exists with a maker."""
    registry = Registry.load()
    real = [s for s in registry.specs.values() if s.source != "tiny"]
    assert len(real) >= 40
    for spec in real:
        assert spec.license and spec.license != "unknown", spec.id
        # face restorers: spandrel builds GFPGAN only at full size, so no tiny stand-in exists
        # No stand-in where the library hard-codes full-size networks (GFPGAN, annotators) or the package ships the real file (dlib).
        if spec.kind not in ("dlib-recognizer", "dlib-landmarks", "dlib-detector", "onnx-swapper", "face-restore", "annotator"):
            assert spec.tiny in registry.specs, f"{spec.id}: no tiny stand-in row '{spec.tiny}'"
    for spec in registry.specs.values():
        if spec.source == "tiny":
            assert spec.maker and ":" in spec.maker, spec.id
    non_commercial = {s.id for s in real if not s.commercial}
    assert {"antelopev2", "buffalo_l", "inswapper-128", "ip-adapter-faceid-sd15", "dlib-landmarks-68"} <= non_commercial


def _cli(*args: str, home: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "PORTRAIT_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "portrait.cli.main", *args], capture_output=True, text=True, env=env, timeout=300)


def test_cli_missing_model_exits_3_with_download_command(tmp_path):
    result = _cli("models", "path", "sd15", home=tmp_path, env_extra={"HF_HUB_CACHE": str(tmp_path / "hf")})
    assert result.returncode == 3
    assert "portrait models download sd15" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_unknown_model_and_preset_exit_2(tmp_path):
    result = _cli("models", "path", "no-such-model", home=tmp_path)
    assert result.returncode == 2 and "unknown model 'no-such-model'" in result.stderr
    result = _cli("--preset", "nope", "doctor", home=tmp_path)
    assert result.returncode == 0, result.stderr  # doctor does not need the preset: it reports, it does not crash


def test_doctor_lists_licenses(tmp_path):
    result = _cli("doctor", home=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "non-commercial" in result.stdout and "torch" in result.stdout


def test_tables_keep_whole_values_in_a_pipe(tmp_path):
    """stdout is a pipe here: every table prints tab-separated rows with whole values (rich cut
    them to 80 columns before: `ip-adapte…`, `non-comm…`)."""
    from portrait.core.registry import Registry

    result = _cli("models", "list", home=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["id", "kind", "family", "present", "size_mb", "license", "tiny"]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert set(rows) == set(Registry.load().specs)
    assert all(len(row) == 7 for row in rows.values())
    faceid = rows["ip-adapter-faceid-sd15"]
    assert "non-commercial" in faceid[5] and "…" not in result.stdout
    templates = _cli("templates", "list", home=tmp_path)
    assert templates.returncode == 0 and "hopper\tphoto\t" in templates.stdout


def test_tables_draw_on_a_terminal():
    import io

    from rich.table import Table

    from portrait.cli.tables import show

    table = Table(title="t")
    table.add_column("a")
    table.add_row("[bold]x[/bold]")
    plain, drawn = io.StringIO(), io.StringIO()
    show(table, file=plain, tty=False)
    show(table, file=drawn, tty=True)
    assert plain.getvalue() == "# t\na\nx\n"
    assert "─" in drawn.getvalue() or "━" in drawn.getvalue()


def test_codeformer_is_removed_not_offered_broken():
    """CodeFormer cannot load here (spandrel's core lacks it): it is not in the registry, no
    preset names it, and asking for it is one clear BadInput."""
    from portrait.core.config import load_preset

    registry = Registry.load()
    assert not [s.id for s in registry.specs.values() if "codeformer" in s.id.lower()
                or any("codeformer" in f.lower() for f in s.files)]
    for name in ("sd15", "sdxl", "tiny", "tiny-sdxl"):
        assert not [m for m in load_preset(name).models.values() if "codeformer" in str(m).lower()], name
    with pytest.raises(BadInput, match="unknown model 'codeformer'"):
        registry.get("codeformer")


# --- pins: every real entry downloads what it names, the same bytes every time -----------------------


def test_every_real_entry_is_pinned_sized_and_hashed():
    """A hub entry names a 40-hex revision and, per weight file, its exact size and sha256; the
    few that cannot are named in one place (registry.PIN_EXCEPTIONS) with the reason."""
    from portrait.core.registry import PIN_EXCEPTIONS, pin_problems

    registry = Registry.load()
    real = {s.id: s for s in registry.specs.values() if s.source != "tiny"}
    failing = {i: pin_problems(s) for i, s in real.items() if pin_problems(s) and i not in PIN_EXCEPTIONS}
    assert not failing, failing
    stale = [i for i in PIN_EXCEPTIONS if i not in real or not pin_problems(real[i])]
    assert not stale, f"PIN_EXCEPTIONS lists entries that now meet the rule (remove them): {stale}"
    assert all(reason.strip() for reason in PIN_EXCEPTIONS.values())
    # the ones this rule was written for, and the backends' own models
    for model_id in ("sd15", "sd15-inpaint", "clip-vit-h-image-encoder", "sdxl", "controlnet-canny-sd15",
                     "instantid-controlnet", "instantid-adapter", "ip-adapter-faceid-plusv2-sdxl", "pulid-flux-v0.9.1",
                     "photomaker-v2", "flux-single", "auraface"):
        assert not pin_problems(real[model_id]), model_id
    # what is left is a package's files, a gated repo's folders, or a named not-found fact
    assert all(r.startswith(("ships in", "gated repo", "InfuseNetModel/")) or "not found" in r
               for r in PIN_EXCEPTIONS.values())
    for spec in real.values():  # a recorded total agrees with the recorded files
        if spec.sizes and spec.size and len(spec.sizes) == len([f for f in spec.files if "." in f.rsplit("/", 1)[-1]
                                                                and f.endswith((".safetensors", ".bin", ".pt", ".pth",
                                                                                ".onnx", ".ckpt"))]):
            assert spec.size >= sum(spec.sizes.values()), spec.id


def test_a_replaced_file_is_recorded_as_it_is_at_the_pin():
    """h94 replaced ip-adapter-faceid_sdxl_lora.safetensors at 309dc56 (2ade2b53..., 371,828,616 bytes
    -> 4fcf93d6..., 371,842,896; that commit's LFS pointers): the registry pins a later commit, so
    it records the new file, and a download of the old bytes fails its hash check."""
    spec = Registry.load().get("ip-adapter-faceid-sdxl")
    name = "ip-adapter-faceid_sdxl_lora.safetensors"
    assert spec.revision == "43907e6f44d079bf1a9102d9a6e56aef7a219bae"
    assert spec.sha256[name].startswith("4fcf93d6") and spec.sizes[name] == 371842896


def test_sd15_inpaint_names_files_that_exist():
    """stable-diffusion-v1-5/stable-diffusion-inpainting at its only commit holds, under unet/ and
    vae/, only .bin, .fp16.bin and .fp16.safetensors weights, and under text_encoder/
    model.fp16.safetensors plus pickles (its HF tree pages at 8a4288a): the fp16 safetensors."""
    spec = Registry.load().get("sd15-inpaint")
    assert spec.revision == "8a4288a76071f7280aedbdb3253bdb9e9d5d84bb"
    weights = sorted(f for f in spec.files if f.endswith(".safetensors"))
    assert weights == ["text_encoder/model.fp16.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
                       "vae/diffusion_pytorch_model.fp16.safetensors"]
    assert spec.sha256["unet/diffusion_pytorch_model.fp16.safetensors"].startswith("24b788b4")


def test_download_asks_the_hub_for_the_pinned_files(tmp_path, monkeypatch):
    """`models download sd15-inpaint` fetches exactly the listed files at the pinned revision."""
    import huggingface_hub

    from portrait.core import registry as reg

    asked = []

    def fake_download(repo, name, revision=None, local_dir=None, token=None):
        asked.append((repo, name, revision))
        raise RuntimeError("offline test: stop after the first request")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    spec = Registry.load().get("sd15-inpaint")
    with pytest.raises(Exception):
        reg.download(spec, Settings(home=tmp_path))
    assert asked == [("stable-diffusion-v1-5/stable-diffusion-inpainting", spec.files[0], spec.revision)]


def test_gated_repo_without_a_token_exits_3_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    from portrait.cli.main import run

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("no request without a token"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("no request without a token"))
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run(["--home", str(tmp_path), "models", "download", "flux-single"])
    lines = [line for line in err.getvalue().splitlines() if line.startswith("error")]
    assert code == 3 and len(lines) == 1
    assert "gated" in lines[0] and "accept its license" in lines[0] and "log in" in lines[0]
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev" in lines[0]


def test_gated_repo_refused_by_the_hub_is_the_same_line(tmp_path, monkeypatch):
    import huggingface_hub

    from portrait.core import registry as reg

    class GatedRepoError(Exception):
        pass

    def refuse(*a, **k):
        raise GatedRepoError("401 Client Error")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_accepted")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    with pytest.raises(reg.GatedModel, match="the hub refused this token") as caught:
        reg.download(Registry.load().get("flux-single"), Settings(home=tmp_path))
    assert caught.value.exit_code == 3
