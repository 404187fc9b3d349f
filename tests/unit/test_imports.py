"""Import direction and purity of the core, and the layer order of every package, checked by parsing source with ``ast``.

``kflow.model`` may import only the standard library, pydantic and itself; ``kflow.engine`` only the
standard library, ``kflow.model``, itself and the pure libraries ``cel``, ``orjson``, ``croniter`` and ``semantic_version``. Neither
may read the wall clock, randomness, fresh uuids, the environment or sleep: time, ids and
randomness are inputs to the engine. ``kflow.authoring`` (what workflow code imports) adds only
the engine. Modules every layer leans on are held to their own rules: ``kflow.clock`` is standard
library only, ``kflow.readend`` adds confluent_kafka and ``kflow.model``.

Every package and top-level module of kflow has a place in :data:`LAYERS`, and imports only from
layers below its own (any import: at module level, inside a function, or for type checking). The
few imports that go up are listed, each with why, in :data:`UPWARD`; each closes an import cycle
between packages, no other cycle exists, and a listed import that is gone must leave the list.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

import kflow

PACKAGE_ROOT = Path(kflow.__file__).resolve().parent
STDLIB = frozenset(sys.stdlib_module_names)

ALLOWED = {
    "model": ({"pydantic"}, ("kflow.model",)),
    "engine": ({"cel", "orjson", "croniter", "semantic_version"}, ("kflow.model", "kflow.engine")),
    "authoring": (set(), ("kflow.model", "kflow.engine", "kflow.authoring")),
}
#: Packages held to the purity rules (the sandbox of ``authoring`` names the clock to refuse it).
PURE = ("engine", "model")

#: Single modules (path under kflow/) -> (third-party packages, kflow prefixes) they may import.
MODULE_ALLOWED: dict[str, tuple[set[str], tuple[str, ...]]] = {
    "clock.py": (set(), ()),
    "readend.py": ({"confluent_kafka"}, ("kflow.model",)),
}

#: Whole modules the core must not import at all.
BANNED_MODULES = frozenset({"time", "random", "secrets", "importlib"})
#: Names (imported from a module, or reached as an attribute chain) the core must not use.
BANNED_NAMES = {
    ("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"), ("date", "today"),
    ("uuid", "uuid1"), ("uuid", "uuid4"), ("asyncio", "sleep"), ("os", "environ"), ("os", "getenv"),
    ("os", "urandom"), ("time", "*"), ("random", "*"),
}


@dataclass(frozen=True)
class Violation:
    where: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.where}:{self.line}: {self.what}"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, _resolve(node, module, is_package)))
    return found


def import_violations(source: str, module: str, allowed_third_party: set[str], allowed_kflow: tuple[str, ...],
                      is_package: bool = False) -> list[Violation]:
    tree = ast.parse(source)
    out: list[Violation] = []
    for line, name in imported_modules(tree, module, is_package):
        top = name.split(".")[0]
        if name == "__future__" or top in STDLIB or top in allowed_third_party:
            continue
        if any(name == a or name.startswith(a + ".") for a in allowed_kflow):
            continue
        out.append(Violation(module, line, f"imports {name}"))
    return out


def _dotted(node: ast.AST) -> list[str]:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return list(reversed(parts))


def purity_violations(source: str, module: str) -> list[Violation]:
    tree = ast.parse(source)
    out: list[Violation] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    out.append(Violation(module, node.lineno, f"imports {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            top = node.module.split(".")[0]
            if top in BANNED_MODULES:
                out.append(Violation(module, node.lineno, f"imports from {node.module}"))
            for alias in node.names:
                if (top, alias.name) in BANNED_NAMES or (node.module, alias.name) in BANNED_NAMES:
                    out.append(Violation(module, node.lineno, f"imports {node.module}.{alias.name}"))
        elif isinstance(node, ast.Attribute):
            chain = _dotted(node)
            for owner, attr in pairwise(chain):
                if (owner, attr) in BANNED_NAMES or (owner, "*") in BANNED_NAMES:
                    out.append(Violation(module, node.lineno, f"uses {'.'.join(chain)}"))
                    break
        elif isinstance(node, ast.Name) and node.id == "__import__":
            out.append(Violation(module, node.lineno, "uses __import__"))
    return sorted(set(out), key=lambda v: (v.line, v.what))


def sources(package: str) -> list[Path]:
    files = sorted((PACKAGE_ROOT / package).rglob("*.py"))
    assert files, f"no sources found under kflow/{package}"
    return files


# -- the real packages -----------------------------------------------------------------------------
@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_import_direction(package: str) -> None:
    third_party, kflow_prefixes = ALLOWED[package]
    violations: list[Violation] = []
    for path in sources(package):
        violations += import_violations(path.read_text(encoding="utf-8"), module_name(path), third_party,
                                        kflow_prefixes, is_package=path.name == "__init__.py")
    assert not violations, "\n".join(map(str, violations))


@pytest.mark.parametrize("path", sorted(MODULE_ALLOWED))
def test_import_direction_of_shared_modules(path: str) -> None:
    third_party, kflow_prefixes = MODULE_ALLOWED[path]
    source = PACKAGE_ROOT / path
    violations = import_violations(source.read_text(encoding="utf-8"), module_name(source), third_party, kflow_prefixes)
    assert not violations, "\n".join(map(str, violations))


@pytest.mark.parametrize("package", PURE)
def test_no_clock_randomness_environment_or_sleep(package: str) -> None:
    violations: list[Violation] = []
    for path in sources(package):
        violations += purity_violations(path.read_text(encoding="utf-8"), module_name(path))
    assert not violations, "\n".join(map(str, violations))


def test_the_scanned_sources_include_the_engine_core() -> None:
    names = {module_name(p) for p in sources("engine")} | {module_name(p) for p in sources("model")}
    assert {"kflow.engine.core", "kflow.engine.spec_interpreter", "kflow.model.messages", "kflow.model.spec"} <= names


# -- the checker itself catches what it claims to ----------------------------------------------------
@pytest.mark.parametrize("snippet", [
    "import time\n",
    "import time as t\n",
    "from time import monotonic\n",
    "import random\n",
    "from random import choice\n",
    "from datetime import datetime\nx = datetime.now()\n",
    "import datetime\nx = datetime.datetime.utcnow()\n",
    "from datetime import date\nx = date.today()\n",
    "import uuid\nx = uuid.uuid4()\n",
    "from uuid import uuid4\n",
    "import asyncio\nasync def f():\n    await asyncio.sleep(1)\n",
    "from asyncio import sleep\n",
    "import os\nx = os.environ['X']\n",
    "import os\nx = os.environ.get('X')\n",
    "from os import environ\n",
    "import os\nx = os.getenv('X')\n",
    "def f(time):\n    return time.time()\n",
    "m = __import__('time')\n",
    "import importlib\n",
])
def test_purity_checker_flags(snippet: str) -> None:
    assert purity_violations(snippet, "kflow.engine.x"), snippet


@pytest.mark.parametrize("snippet", [
    "from datetime import timedelta\nx = timedelta(seconds=1)\n",
    "import uuid\nx = uuid.uuid5(uuid.NAMESPACE_URL, 'a')\n",
    "import os.path\nx = os.path.join('a', 'b')\n",
    "now = 5\nx = now + 1\n",
])
def test_purity_checker_allows(snippet: str) -> None:
    assert purity_violations(snippet, "kflow.engine.x") == []


@pytest.mark.parametrize(("snippet", "module", "ok"), [
    ("import pydantic\n", "kflow.model.x", True),
    ("from kflow.model.errors import KflowError\n", "kflow.model.x", True),
    ("from . import errors\n", "kflow.model.x", True),
    ("from kflow.engine import decide\n", "kflow.model.x", False),
    ("import orjson\n", "kflow.model.x", False),
    ("from ..streams import store\n", "kflow.model.x", False),
    ("import cel\nimport orjson\n", "kflow.engine.x", True),
    ("from kflow.model.messages import Event\n", "kflow.engine.x", True),
    ("from .expr import evaluate\n", "kflow.engine.x", True),
    ("import pydantic\n", "kflow.engine.x", False),
    ("from kflow.streams import x\n", "kflow.engine.x", False),
    ("from kflow.testing import harness\n", "kflow.engine.x", False),
    ("import confluent_kafka\n", "kflow.engine.x", False),
    ("from ..worker import w\n", "kflow.engine.x", False),
])
def test_import_checker(snippet: str, module: str, ok: bool) -> None:
    package = module.split(".")[1]
    third_party, prefixes = ALLOWED[package]
    assert (import_violations(snippet, module, third_party, prefixes) == []) is ok


@pytest.mark.parametrize(("snippet", "path", "ok"), [
    ("import time\nfrom typing import Protocol\n", "clock.py", True),
    ("from kflow.model.errors import KflowError\n", "clock.py", False),
    ("import confluent_kafka\n", "clock.py", False),
    ("from confluent_kafka import Consumer\nfrom kflow.model.errors import BrokerUnavailable\n", "readend.py", True),
    ("from kflow.config import KafkaConfig\n", "readend.py", False),
    ("from kflow.streams.processor import EngineProcessor\n", "readend.py", False),
    ("from . import store\n", "readend.py", False),
    ("import orjson\n", "readend.py", False),
])
def test_shared_module_checker(snippet: str, path: str, ok: bool) -> None:
    third_party, prefixes = MODULE_ALLOWED[path]
    assert (import_violations(snippet, module_name(PACKAGE_ROOT / path), third_party, prefixes) == []) is ok


# -- the layer order of every package -----------------------------------------------------------------
#: Every package and top-level module of kflow (by its name under ``kflow``; ``kflow`` is the package's
#: own ``__init__``, the lazy facade of the public names), lowest layer first. A module imports only
#: from layers below its own, or from its own package.
LAYERS: list[set[str]] = [
    {"model", "clock", "_hops", "_tracing"},  # data, time; the tracing and hop-stamp helpers every process uses
    {"engine", "schemas", "converter", "_http", "readend"},  # the pure engine; the wire format; reading a topic to its end
    {"authoring", "security", "_migration", "faust"},  # what workflow code imports; auth; migration plans
    {"testing", "_workflow"},  # kflow.testing (replay, harness); the former name of authoring
    {"config"},  # the settings of every process
    {"dlq"},
    {"streams"},  # the engine's stream-processing runtime
    {"_worker"},
    {"worker", "client", "subscriptions", "_log"},
    {"aio", "connectors", "batch"},
    {"visibility"},  # the read side and the API server
    {"kflow"},  # the public facade: ``import kflow``
    {"dev"},  # the embedded stack and the benchmarks
    {"_cli", "_config_doc"},
    {"cli"},
    {"__main__"},
]

#: Imports that go up the layers: (importing module, imported package) -> why it is there. Each
#: closes a cycle between packages; a new one is a design decision, made here on purpose.
UPWARD: dict[tuple[str, str], str] = {}


def component(module: str) -> str:
    """The package (or top-level module) of ``module`` that :data:`LAYERS` places."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def package_imports() -> dict[tuple[str, str], list[str]]:
    """(importing module, imported package) -> where, for every import of another kflow package."""
    modules = _modules()
    found: dict[tuple[str, str], list[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, path.name == "__init__.py")
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs if base == "kflow" and len(subs) == len(node.names) else [base, *subs]
            for target in targets:
                if target.split(".")[0] != "kflow" or component(target) == component(module):
                    continue
                found.setdefault((module, component(target)), []).append(f"{module}:{node.lineno}")
    return found


def layer_of(name: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def test_every_package_has_one_layer() -> None:
    placed = [name for layer in LAYERS for name in layer]
    assert len(placed) == len(set(placed)), "a package is in two layers"
    missing = {component(m) for m in _modules()} - set(placed)
    assert not missing, f"packages without a layer in LAYERS: {sorted(missing)}"


def test_imports_go_down_the_layers() -> None:
    wrong = [f"{where[0]} imports kflow.{target} ({LAYERS.index(next(lay for lay in LAYERS if target in lay))} "
             f"above its layer {layer_of(component(module))})"
             for (module, target), where in sorted(package_imports().items())
             if layer_of(target) >= layer_of(component(module)) and (module, target) not in UPWARD]
    assert not wrong, "\n".join(wrong)


def test_every_listed_upward_import_is_still_there() -> None:
    found = package_imports()
    gone = [f"{module} -> {target}" for module, target in UPWARD if (module, target) not in found]
    assert not gone, f"no longer imported, remove from UPWARD: {gone}"
    assert all(layer_of(target) > layer_of(component(module)) for module, target in UPWARD)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one node (each holds an import cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_between_packages_but_the_listed_ones() -> None:
    edges: dict[str, set[str]] = {}
    for module, target in package_imports():
        if (module, target) not in UPWARD:
            edges.setdefault(component(module), set()).add(target)
    assert cycles(edges) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_engine_never_imports_the_authoring_package() -> None:
    assert not [k for k in package_imports() if component(k[0]) == "engine" and k[1] == "authoring"]
    assert layer_of("authoring") > layer_of("engine") and layer_of("streams") > layer_of("authoring")


# -- the public surface ------------------------------------------------------------------------------
#: What ``import kflow`` offers; a name added or removed is a decision, made here on purpose.
PUBLIC = {
    "ActivityCancelledError", "ActivityError", "AsyncClient", "BrokerUnavailable", "CancelledError", "Client", "DefinitionConflict",
    "DefinitionError", "DeterminismError", "KflowError", "NonRetryableError", "NondeterminismError", "ProblemsError", "QueryFailedError",
    "StartRejectedError",
    "TopicConfigMismatch", "UpdateFailedError", "UpdateRejectedError", "Worker", "WorkflowCancelledError", "WorkflowContext", "WorkflowError", "WorkflowFailedError", "WorkflowHandle",
    "WorkflowNotDeployed", "WorkflowSandboxError", "activity", "heartbeat", "migration", "query_state", "workflow",
}
#: Errors of ``kflow.model.errors`` that stay internal (raised and handled inside kflow's processors).
INTERNAL_ERRORS = {"DecodeError"}


def test_public_surface_is_pinned() -> None:
    assert set(kflow.__all__) == PUBLIC
    for name in sorted(PUBLIC):
        assert getattr(kflow, name) is not None, name
    assert set(dir(kflow)) >= PUBLIC


def test_every_user_facing_error_is_exported() -> None:
    from kflow.model import errors

    classes = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)
               and v.__module__ == errors.__name__}
    assert classes - INTERNAL_ERRORS <= set(kflow.__all__), classes - INTERNAL_ERRORS - set(kflow.__all__)
    assert issubclass(kflow.ActivityError, kflow.WorkflowError) and issubclass(kflow.CancelledError, kflow.WorkflowError)
    assert all(issubclass(getattr(kflow, n), kflow.KflowError) for n in PUBLIC if n[0].isupper()
               and n not in {"Client", "AsyncClient", "WorkflowHandle", "WorkflowContext", "Worker"})


def test_an_unknown_name_is_a_precise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'kflow' has no attribute 'ActivityErorr'"):
        kflow.ActivityErorr  # noqa: B018
