"""The layering rules, checked on the import graph (docs/ARCHITECTURE.md#layers).

    core (portrait/core) -> stages (portrait/stages)
        -> flows / studio / service (portrait/flows, portrait/studio, portrait/service) -> cli (portrait/cli)

A module may import its own layer and the layers before it, never a later one. Every import
counts, wherever it is written: at the top, inside a function (the lazy heavy imports), under
`if TYPE_CHECKING:`, `importlib.import_module("portrait....")` with a literal, and the
"portrait.x.y:Name" strings of dispatch tables (the backend table, the package's lazy exports,
the tiny-model makers in presets/models.yaml), which are imports by another name.

A second rule: no module reaches into another module's private names, either by
`from portrait.stages.x import _helper` or by `x._helper` on an imported portrait module. A
stage that needs another stage's helper asks for it to be made public (or moved to core).

The checker is plain functions over (module name, source text), so the last tests feed it
synthetic forbidden imports and see it fail.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# source folder -> the package name it is installed as (pyproject.toml's package-dir)
ROOTS = {"portrait": "portrait"}

LAYERS = {"core": 0, "stages": 1, "flows": 2, "cli": 3}
# package prefix -> layer; the longest matching prefix wins
PREFIXES = {
    "portrait.core": "core",
    # data packages (YAML, configs, template photos) read through importlib.resources
    "portrait.presets": "core",
    "portrait.templates": "core",
    "portrait.stages": "stages",
    "portrait.flows": "flows",
    "portrait.studio": "flows",
    "portrait.service": "flows",
    # the Python API and the commands' helpers sit beside the flows: the package's lazy
    # exports name flows and the studio, demo runs the flows, doctor and samples read core
    "portrait.demo": "flows",
    "portrait.doctor": "flows",
    "portrait.samples": "flows",
    # which policy reads which preset section: it names the flows' and the service's policies
    "portrait.preset_schema": "flows",
    "portrait.cli": "cli",
}
# `import portrait` runs only the package's __init__ (a version string and a lazy export
# table), so any layer may read `portrait.__version__`; the table's targets are checked as
# the root's own imports, at the flows layer.
ROOT_PACKAGE = "portrait"
ROOT_LAYER = "flows"

DYNAMIC_TARGET = re.compile(r"^(portrait(?:\.\w+)+):\w+$")


@dataclass(frozen=True)
class Import:
    importer: str  # module name
    target: str  # module name (a `from m import name` is recorded as m.name when that is a module)
    line: int
    how: str  # "import", "from", "import_module", "table"
    names: tuple[str, ...] = ()  # the names a `from` import takes


def module_name(path: Path) -> str | None:
    rel = path.relative_to(REPO)
    root = ROOTS.get(rel.parts[0])
    if root is None:
        return None
    parts = list(rel.with_suffix("").parts[1:])
    if parts and parts[-1] == "__init__":
        parts.pop()
    return ".".join([root, *parts])


def source_modules() -> dict[str, tuple[str, bool]]:
    """module name -> (source text, is a package __init__)."""
    found = {}
    for folder in ROOTS:
        for path in sorted((REPO / folder).rglob("*.py")):
            name = module_name(path)
            if name is not None:
                found[name] = (path.read_text(), path.name == "__init__.py")
    return found


def layer_of(module: str) -> str | None:
    if module == ROOT_PACKAGE:
        return ROOT_LAYER
    best = None
    for prefix, layer in PREFIXES.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best[1] if best else None


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(importer: str, source: str, is_package: bool = False) -> list[Import]:
    """Every import `importer` makes of a portrait module, wherever it is written."""
    tree = ast.parse(source)
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(importer, alias.name, node.lineno, "import"))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, is_package, node.level, node.module)
            names = tuple(a.name for a in node.names)
            found.append(Import(importer, base, node.lineno, "from", names))
        elif isinstance(node, ast.Call) and _is_import_module(node.func):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append(Import(importer, arg.value, node.lineno, "import_module"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = DYNAMIC_TARGET.match(node.value)
            if match:
                found.append(Import(importer, match.group(1), node.lineno, "table"))
    return [i for i in found if i.target == ROOT_PACKAGE or i.target.startswith(ROOT_PACKAGE + ".")]


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def upward_imports(imports: list[Import]) -> list[str]:
    """Imports of a later layer, one line each."""
    bad = []
    for imp in imports:
        mine, theirs = layer_of(imp.importer), layer_of(imp.target)
        if imp.target == ROOT_PACKAGE and imp.how in ("import", "from") and not set(imp.names) - {"__version__"}:
            continue  # `import portrait` / `from portrait import __version__`: the version string
        if mine is None or theirs is None:
            bad.append(f"{imp.importer}:{imp.line}: imports {imp.target}, which is in no layer")
        elif LAYERS[theirs] > LAYERS[mine]:
            bad.append(f"{imp.importer}:{imp.line}: {mine} imports {imp.target} ({theirs}) [{imp.how}]")
    return bad


def private_reaches(importer: str, source: str, is_package: bool, modules: set[str]) -> list[str]:
    """`from portrait.x import _name` and `alias._name` on an imported portrait module."""
    tree = ast.parse(source)
    bad = []
    aliases: dict[str, str] = {}  # local name -> portrait module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = _resolve(importer, is_package, node.level, node.module)
            if not base.startswith(ROOT_PACKAGE):
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__") and base != importer:
                    bad.append(f"{importer}:{node.lineno}: takes private {alias.name} from {base}")
                if f"{base}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith(ROOT_PACKAGE + ".") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")
                and aliases[node.value.id] != importer):
            bad.append(f"{importer}:{node.lineno}: reaches into {aliases[node.value.id]}.{node.attr}")
    return bad


BACKENDS = "portrait.stages.backends"


def backend_crossings(imports: list[Import], modules: set[str]) -> list[str]:
    """A backend importing another backend (the table in the package's __init__ may name them all;
    a backend may read that table: `from portrait.stages.backends import BACKENDS` is no crossing)."""
    bad = []
    for imp in imports:
        mine = imp.importer[len(BACKENDS) + 1:].split(".")[0] if imp.importer.startswith(BACKENDS + ".") else None
        targets = [imp.target] + [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in modules]
        for target in targets:
            theirs = target[len(BACKENDS) + 1:].split(".")[0] if target.startswith(BACKENDS + ".") else None
            if mine and theirs and theirs != mine:
                bad.append(f"{imp.importer}:{imp.line}: backend {mine} imports backend {theirs}")
    return bad


def registry_makers() -> list[Import]:
    """The tiny-model makers presets/models.yaml names: imported by portrait.core.tiny."""
    import yaml

    data = yaml.safe_load((REPO / "portrait" / "presets" / "models.yaml").read_text())
    found = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and DYNAMIC_TARGET.match(value):
            found.append(Import("portrait.core.tiny", DYNAMIC_TARGET.match(value).group(1), 0, "table"))

    walk(data)
    return found


def check(modules: dict[str, tuple[str, bool]], extra: list[Import] = ()) -> list[str]:
    names = set(modules)
    problems: list[str] = []
    imports = list(extra)
    for name, (source, is_package) in modules.items():
        imports += imports_of(name, source, is_package)
        problems += private_reaches(name, source, is_package, names)
    problems += upward_imports(imports)
    problems += backend_crossings(imports, names)
    # an import of a portrait module that does not exist is a typo the layer check would miss
    for imp in imports:
        if imp.how != "from" and imp.target not in names:
            problems.append(f"{imp.importer}:{imp.line}: {imp.how} of {imp.target}, which is not a module")
    return problems


# --- the repository ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, tuple[str, bool]]:
    return source_modules()


def test_every_module_is_in_a_layer(modules):
    assert len(modules) > 80  # the walk found the tree
    assert [m for m in modules if layer_of(m) is None] == []


def test_no_upward_import_and_no_private_back_door(modules):
    problems = check(modules, registry_makers())
    assert problems == [], "\n".join(problems)


def test_the_dynamic_imports_are_seen(modules):
    """The checker sees the imports that are not plain top-of-file statements: the backend
    table's (every backend module is an import of the table package), the package's lazy
    exports (strings) and the tiny-model makers named in presets/models.yaml."""
    table = [i for i in imports_of(BACKENDS, *modules[BACKENDS])]
    reached = {f"{i.target}.{n}" for i in table for n in i.names} | {i.target for i in table}
    backends = {m for m in modules if m.startswith(BACKENDS + ".")}
    assert len(backends) >= 5 and backends <= reached
    lazy = [i for i in imports_of("portrait", *modules["portrait"]) if i.how == "table"]
    assert any(i.target == "portrait.flows.generate" for i in lazy)
    assert any(i.target.startswith("portrait.core.tiny.") for i in registry_makers())


# --- the checker itself --------------------------------------------------------------------


def _tree(**extra: str) -> dict[str, tuple[str, bool]]:
    base = {
        "portrait": ("", True),
        "portrait.core": ("", True),
        "portrait.core.io": ("def write(): pass\n", False),
        "portrait.stages": ("", True),
        "portrait.stages.controls": ("def _private(): pass\ndef public(): pass\n", False),
        "portrait.stages.backends": ("", True),
        "portrait.stages.backends.two": ("class Two: pass\n", False),
        "portrait.flows": ("", True),
        "portrait.flows.generate": ("from portrait.stages.controls import public\n", False),
        "portrait.cli": ("", True),
        "portrait.cli.main": ("from portrait.flows.generate import *\n", False),
    }
    base.update({name: (src, False) for name, src in extra.items()})
    return base


def test_checker_passes_a_clean_tree():
    assert check(_tree()) == []


@pytest.mark.parametrize("module, source, expected", [
    ("portrait.core.bad", "from portrait.flows.generate import generate\n", "core imports portrait.flows.generate"),
    ("portrait.core.bad", "def f():\n    from portrait.stages import controls\n", "core imports portrait.stages"),
    ("portrait.core.bad", "from ..stages.controls import public\n", "core imports portrait.stages.controls"),
    ("portrait.core.bad", "import importlib\nimportlib.import_module('portrait.cli.main')\n",
     "core imports portrait.cli.main (cli) [import_module]"),
    ("portrait.stages.bad", "TABLE = {'x': 'portrait.flows.generate:Thing'}\n",
     "stages imports portrait.flows.generate (flows) [table]"),
    ("portrait.flows.bad", "def f():\n    import portrait.cli.main\n", "flows imports portrait.cli.main"),
    ("portrait.stages.bad", "from portrait.stages.controls import _private\n", "takes private _private"),
    ("portrait.stages.bad", "from portrait.stages import controls as ctl\nctl._private()\n",
     "reaches into portrait.stages.controls._private"),
    ("portrait.stages.bad", "import portrait.stages.controls as ctl\nctl._private()\n",
     "reaches into portrait.stages.controls._private"),
    ("portrait.stages.bad", "import importlib\nimportlib.import_module('portrait.stages.contrlos')\n",
     "portrait.stages.contrlos, which is not a module"),
    ("portrait.stages.backends.one", "from portrait.stages.backends import two\n", "backend one imports backend two"),
    ("portrait.stages.backends.one", "def f():\n    from portrait.stages.backends.two import Two\n",
     "backend one imports backend two"),
])
def test_checker_fails_on_a_forbidden_import(module, source, expected):
    problems = check(_tree(**{module: source}))
    assert any(expected in p for p in problems), problems


def test_a_backend_may_read_the_backend_table():
    tree = _tree(**{"portrait.stages.backends.one": "from portrait.stages.backends import BACKENDS\n"})
    assert check(tree) == []


def test_checker_sees_a_forbidden_import_added_to_a_real_module(modules):
    """The real tree with one line added to a real core module fails, naming the line."""
    src, is_package = modules["portrait.core.io"]
    tampered = dict(modules)
    tampered["portrait.core.io"] = (src + "\n\ndef _late():\n    from portrait.cli import main\n", is_package)
    problems = check(tampered)
    assert len(problems) == 1 and problems[0].startswith("portrait.core.io:") and "core imports portrait.cli" in problems[0]


# --- the document the comments cite ----------------------------------------------------------

CITATION = re.compile(r"docs/ARCHITECTURE\.md#([a-z0-9-]+)")



def _cited_files() -> list[Path]:
    return [p for folder in ("portrait", "bench", "tests", "scripts")
            for p in sorted((REPO / folder).rglob("*")) if p.suffix in (".py", ".yaml", ".md") and p.is_file()]


def test_every_cited_anchor_exists():
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    anchors = set(re.findall(r'<a id="([a-z0-9-]+)"></a>', doc))
    cited = {(p.relative_to(REPO).as_posix(), a) for p in _cited_files() for a in CITATION.findall(p.read_text())}
    assert len({a for _, a in cited}) >= 8  # the comments do cite it
    missing = sorted(f"{path} cites #{anchor}" for path, anchor in cited if anchor not in anchors)
    assert missing == [], missing


def test_adding_a_backend_says_how_many_files_and_they_are_the_real_ones():
    """docs/ARCHITECTURE.md#adding-a-backend gives a count and a numbered list of files; the count
    is the list's length, and for the last backend added (InfiniteYou, with its own network) each
    listed file exists and names it."""
    doc = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    section = doc[doc.index('<a id="adding-a-backend"></a>'):doc.index('<a id="reference-fixtures"></a>')]
    count = int(re.search(r"takes \*\*(\d+) files\*\*", section).group(1))
    items = re.findall(r"^(\d+)\. `([^`]+)`", section, re.M)
    assert [int(n) for n, _ in items] == list(range(1, count + 1)), items
    example = {"<name>": "infiniteyou", "<family>": "flux", "<preset>": "flux"}
    for _, pattern in items:
        path = pattern
        for key, value in example.items():
            path = path.replace(key, value)
        assert (REPO / path).is_file() and "infiniteyou" in (REPO / path).read_text().lower(), path
    # the backend and kind tables name it once each, as the list says
    assert "infiniteyou.SPEC" in (REPO / "portrait/stages/backends/__init__.py").read_text()
    assert "portrait.core.archs.infiniteyou:" in (REPO / "portrait/core/archs/__init__.py").read_text()


def test_no_comment_cites_the_absent_design_file():
    old = re.compile(r"DESIGN section \d")
    found = sorted(p.relative_to(REPO).as_posix() for p in _cited_files()
                   if p.suffix == ".py" and old.search(p.read_text()))
    assert found == [], found


# --- import cycles ------------------------------------------------------------------------


def eager_imports(importer: str, source: str, is_package: bool = False) -> list[Import]:
    """The portrait imports that run when `importer` is imported: module and class bodies
    (through if/try/with blocks), not function bodies and not `if TYPE_CHECKING:` blocks."""
    found: list[Import] = []

    def visit(statements):
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.extend(Import(importer, a.name, node.lineno, "import") for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(importer, is_package, node.level, node.module)
                found.append(Import(importer, base, node.lineno, "from", tuple(a.name for a in node.names)))
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(ast.parse(source).body)
    return [i for i in found if i.target == ROOT_PACKAGE or i.target.startswith(ROOT_PACKAGE + ".")]


def _edges(modules: dict[str, tuple[str, bool]], imports: list[Import]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        if imp.importer not in edges or _version_only(imp):
            continue
        # `from pkg import sub` depends on the submodule; `from pkg import name` on the package
        subs = {f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in modules}
        targets = subs | ({imp.target} if len(subs) < len(imp.names) or not imp.names else set())
        edges[imp.importer] |= {t for t in targets if t in modules and t != imp.importer}
    return edges


def _version_only(imp: Import) -> bool:
    """`import portrait` / `from portrait import __version__`: runs only the package's __init__
    (a version string and a lazy export table), so it reaches none of the table's targets."""
    return imp.target == ROOT_PACKAGE and imp.how in ("import", "from") and not set(imp.names) - {"__version__"}


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that reach each other (Tarjan's algorithm; groups larger than one)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return cycles


def import_cycles(modules: dict[str, tuple[str, bool]]) -> list[list[str]]:
    """Groups of modules that import each other at import time (strongly connected, > 1)."""
    imports = [i for name, (source, is_package) in modules.items() for i in eager_imports(name, source, is_package)]
    return strongly_connected(_edges(modules, imports))


def dependency_cycles(modules: dict[str, tuple[str, bool]], extra: list[Import] = ()) -> list[list[str]]:
    """Groups of modules that depend on each other through ANY import: module level, inside a
    function, under TYPE_CHECKING, `import_module` literals and dispatch-table strings. A lazy
    import hides a cycle from the interpreter, not from a reader: two modules that need each
    other are one module split in two, and the type or helper both need belongs below them."""
    imports = list(extra) + [i for name, (source, is_package) in modules.items()
                             for i in imports_of(name, source, is_package)]
    return strongly_connected(_edges(modules, imports))


def test_no_import_cycle_at_import_time(modules):
    """A cycle among import-time imports makes a module's importability depend on which of
    them is imported first (a partially initialised module); lazy imports inside functions
    and TYPE_CHECKING blocks do not run at import time and are not cycles."""
    eager = {i.target for i in eager_imports("portrait.stages.train", *modules["portrait.stages.train"])}
    assert "portrait.core.formats.lora" in eager and "portrait.stages.train_prior" in eager  # the walk sees them
    lazy = {i.target for i in eager_imports("portrait.stages.train_prior", *modules["portrait.stages.train_prior"])}
    assert "portrait.stages.train" not in lazy  # its back-reference is under TYPE_CHECKING
    assert import_cycles(modules) == []


def test_cycle_check_fails_on_a_cycle():
    fake = {"portrait.core.a": ("from portrait.core import b\n", False),
            "portrait.core.b": ("import portrait.core.a\n", False),
            "portrait.core.c": ("def f():\n    import portrait.core.a\n", False),
            "portrait.core.d": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import portrait.core.c\n", False)}
    assert import_cycles(fake) == [["portrait.core.a", "portrait.core.b"]]


def test_no_import_cycle_through_any_import(modules):
    """Not even through the lazy imports: the registry, the license policy and the stand-in
    writers, the model door and its builders, the trainer and its helpers, the zero-shot
    plumbing and its backends each used to need each other behind a function-level import."""
    door = imports_of("portrait.core.models", *modules["portrait.core.models"])
    assert any("archs" in i.names for i in door)  # the walk sees the door read the kind table...
    table = imports_of("portrait.core.archs", *modules["portrait.core.archs"])
    assert {i.target for i in table if i.how == "table"} >= {"portrait.core.archs.pulid"}  # ...and the table's rows
    assert dependency_cycles(modules, registry_makers()) == []


def test_dependency_cycle_check_fails_on_a_lazy_cycle():
    fake = {"portrait.core.a": ("from portrait.core import b\n", False),
            "portrait.core.b": ("def f():\n    import portrait.core.a\n", False),
            "portrait.core.c": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import portrait.core.d\n", False),
            "portrait.core.d": ("TABLE = {'c': 'portrait.core.c:Thing'}\n", False),
            "portrait.core.e": ("import portrait\n", False),
            "portrait": ("TABLE = {'e': 'portrait.core.e:Thing'}\n", True)}
    assert import_cycles(fake) == []  # nothing runs at import time that closes a loop
    assert dependency_cycles(fake) == [["portrait.core.a", "portrait.core.b"], ["portrait.core.c", "portrait.core.d"]]
    # the real tree with one lazy back-reference added fails, naming both modules
    real = source_modules()
    src, is_package = real["portrait.core.io"]
    real["portrait.core.io"] = (src + "\n\ndef _late():\n    from portrait.core import registry\n", is_package)
    assert any({"portrait.core.io", "portrait.core.registry"} <= set(group) for group in dependency_cycles(real))
