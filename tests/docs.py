"""The project's documentation as tests read it: the README (the front door) and the reference in docs/."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def doc_files() -> list[Path]:
    """README.md and every page of docs/, in a stable order."""
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def docs_text() -> str:
    """All of it, one page after another."""
    return "\n\n".join(p.read_text() for p in doc_files())


def page(name: str) -> str:
    """One page of docs/ (``configuration``, ``operations`` ...)."""
    return (DOCS / f"{name}.md").read_text()
