"""How a search attribute value is matched: the text the visibility store indexes for it.

The rule lives in :mod:`kflow.engine.search` (pure, below every package that matches search
attributes); this module names it for the read side. Kept apart from
:mod:`kflow.visibility.store` (which needs SQLAlchemy, the ``visibility`` extra) because
``kflow list`` applies the same rule to state records read straight from Kafka.
"""

from __future__ import annotations

from kflow.engine.search import MAX_SEARCH_VALUE, search_text

__all__ = ["MAX_SEARCH_VALUE", "search_text"]
