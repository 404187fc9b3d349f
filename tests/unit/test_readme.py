"""The documentation (README and docs/) stays true: its configuration table is generated from the
settings classes, and every Python name it shows (``kflow.X``, ``kflow.sub.X``, ``from kflow.m import
X``, ``-m kflow.m``) exists."""

import ast
import importlib
import importlib.util
import re
import textwrap

import pytest

from kflow._config_doc import config_table
from tests.docs import docs_text, page


def test_readme_config_table_matches_settings():
    assert config_table() in page("configuration"), "regenerate the table with `python -m kflow._config_doc`"


def test_every_setting_is_an_env_variable_with_a_description():
    for line in config_table().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0].startswith("`KFLOW_") and cells[3], line


# -- every Python name the README shows exists -------------------------------------------------------
class _AllDocs:
    """README and docs/ read as one text (what the tests below scan)."""

    @staticmethod
    def read_text() -> str:
        return docs_text()


README = _AllDocs()
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>\w*)[ \t]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
_CHAIN = re.compile(r"(?<![\w.\-/])kflow(?:\.[A-Za-z_]\w*)+")
_MODULE = re.compile(r"-m\s+(kflow(?:\.\w+)*)")


def readme_blocks(text: str) -> tuple[list[tuple[str, str]], str]:
    """``(language, code)`` of every fenced block, and the prose with the blocks cut out."""
    blocks = [(m["lang"], textwrap.dedent(m["body"])) for m in _FENCE.finditer(text)]
    return blocks, _FENCE.sub("", text)


def python_names(code: str) -> set[str]:
    """Dotted names under ``kflow`` a Python snippet uses: ``kflow.X.y`` chains (and their prefixes) and
    ``from kflow.m import X``. Snippets may ``await`` at top level, as the README's fragments do."""
    tree = compile(code, "<README>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "kflow":
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "kflow"}
        elif isinstance(node, ast.Attribute):
            parts: list[str] = []
            inner: ast.AST = node
            while isinstance(inner, ast.Attribute):
                parts.insert(0, inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id == "kflow":
                found.add(".".join(["kflow", *parts]))
    return found


def prose_names(prose: str) -> set[str]:
    """``kflow.…`` names in inline code that are Python (a class, a call or a decorator), not topic or header names."""
    found: set[str] = set()
    for span in re.findall(r"`([^`\n]+)`", prose):
        for m in _CHAIN.finditer(span):
            parts = m.group().split(".")
            called = span[m.end():m.end() + 1] == "(" or span[:m.start()].endswith("@")
            if called or any(p[:1].isupper() for p in parts[1:]):
                found.add(m.group())
    return found


def resolve(dotted: str) -> object:
    """The object ``dotted`` names, importing submodules on the way; AttributeError when it does not exist."""
    parts = dotted.split(".")
    obj: object = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                raise AttributeError(f"the README names {dotted}, but {'.'.join(parts[:i])} does not exist") from None
    return obj


def readme_names() -> set[str]:
    blocks, prose = readme_blocks(README.read_text())
    names = prose_names(prose)
    for lang, code in blocks:
        if lang == "python":
            names |= python_names(code)
    return names


def test_every_kflow_name_the_readme_uses_exists():
    names = readme_names()
    # the ones new users copy first: if the scan misses these, it misses everything
    assert {"kflow.ActivityError", "kflow.CancelledError", "kflow.WorkflowError", "kflow.NonRetryableError",
            "kflow.Client", "kflow.workflow", "kflow.workflow.signal", "kflow.worker.activity",
            "kflow.worker.ActivityCancelledError", "kflow.testing.replay"} <= names, names
    missing = []
    for name in sorted(names):
        try:
            resolve(name)
        except AttributeError as e:
            missing.append(str(e))
    assert not missing, "\n".join(missing)


def test_every_module_the_readme_runs_exists():
    text = README.read_text()
    modules = set(_MODULE.findall(text))
    assert "kflow.dev.demo_activities" in modules
    for module in sorted(modules):
        assert importlib.util.find_spec(module) is not None, f"the README runs -m {module}, which does not exist"


def test_the_scan_tells_python_names_from_topic_and_header_names():
    prose = ("`kflow.events` and `kflow.reason` are a topic and a header; `kflow.Nope` is a class, "
             "`kflow.testing.replay(fn, h)` a call and `@kflow.workflow(name=...)` a decorator.")
    assert prose_names(prose) == {"kflow.Nope", "kflow.testing.replay", "kflow.workflow"}
    code = "import kflow\nfrom kflow.worker import activity\ntry:\n    pass\nexcept kflow.Gone as e:\n    raise\n"
    assert python_names(code) == {"kflow", "kflow.worker.activity", "kflow.Gone"}
    with pytest.raises(AttributeError, match="kflow.Gone"):
        resolve("kflow.Gone")
