"""The read side: a projection of the ``state``, ``events`` and ``definitions`` topics into a
visibility store (SQLite or PostgreSQL), an HTTP API over it and a web console.

- :mod:`kflow.visibility.store` — the SQLAlchemy Core tables, indexes and queries.
- :mod:`kflow.visibility.projection` — the consumer that folds the topics into the store.
- :mod:`kflow.visibility.api` — the FastAPI application (JSON API, SSE, console, metrics).
- :mod:`kflow.visibility.server` — runs projection and API in one process (``kflow visibility``).

Store, API and server need the ``visibility`` extra (SQLAlchemy, FastAPI, uvicorn); the pure
helpers (``graph``, ``live``, ``search``) do not, so the CLI's views work without it.
"""

from __future__ import annotations

__all__: list[str] = []
