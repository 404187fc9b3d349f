"""One discriminated union of frozen dataclasses, each tagged by its ``TYPE``: the type registry and
the conversions between a model and the ``data`` dict of a message, shared by the typed commands
(:mod:`kflow.model.commands`) and the typed events (:mod:`kflow.model.events`)."""

from __future__ import annotations

from dataclasses import MISSING, Field, fields
from typing import Any, Generic, TypeVar, get_args

__all__ = ["ModelUnion"]

M = TypeVar("M")


class ModelUnion(Generic[M]):
    """The members of ``union`` (a ``Union`` of dataclasses with a ``TYPE`` class variable), by type.

    Attributes:
        kind: What a member is called in error messages ("command", "event").
        types: Type tag -> its class.
    """

    def __init__(self, kind: str, union: Any) -> None:
        self.kind = kind
        self.types: dict[str, type[M]] = {cls.TYPE: cls for cls in get_args(union)}
        #: class -> its field names, in schema order
        self._fields: dict[type, tuple[str, ...]] = {
            cls: tuple(f.name for f in fields(cls)) for cls in self.types.values()}  # type: ignore[arg-type]

    def build(self, type_: str, data: dict[str, Any]) -> M:
        """The model of type ``type_`` with the fields in ``data``.

        Raises:
            ValueError: the type is unknown, or ``data`` has a field the type does not have or lacks
                one it requires; the message names the type and the fields.
        """
        cls = self.types.get(type_)
        if cls is None:
            raise ValueError(f"unknown {self.kind} type {type_!r}")
        try:
            return cls(**data)
        except TypeError:
            raise ValueError(self._mismatch(type_, cls, data)) from None

    def to_data(self, model: M) -> dict[str, Any]:
        """The ``data`` dict of a message carrying ``model``.

        Raises:
            TypeError: ``model`` is not a member of this union.
        """
        names = self._fields.get(type(model))
        if names is None:
            raise TypeError(f"not a {self.kind} model: {type(model).__name__}")
        return {name: getattr(model, name) for name in names}

    def _mismatch(self, type_: str, cls: type, data: dict[str, Any]) -> str:
        """Say which fields of ``data`` do not fit ``cls``."""
        unknown = sorted(map(str, data.keys() - set(self._fields[cls])))
        if unknown:
            return f"{type_}: unknown field(s) {', '.join(repr(n) for n in unknown)}"
        required = [f.name for f in fields(cls) if f.name not in data and _required(f)]
        return f"{type_}: missing field(s) {', '.join(repr(n) for n in required)}"


def _required(f: Field[Any]) -> bool:
    return bool(f.default is MISSING and f.default_factory is MISSING)
