"""Value classes without ``dataclasses``.

jailcell's value types (Policy, Result, a run's request, ...) are plain classes whose fields are
their ``__slots__``: ``@dataclass`` cost every ``jailcell run`` ~10 ms (importing dataclasses
imports inspect, ast and dis, and each decorated class generated and compiled its methods at
import).  A class lists its fields in ``__slots__`` (a subclass adds its own) and its ``__init__``
takes them by name; :class:`Value` gives it equality, a repr, ``replace`` and pickling over those
fields, and :class:`Frozen` makes it immutable and hashable.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

V = TypeVar("V", bound="Value")


class Value:
    """Equality, repr, ``replace`` and pickling over the fields: the ``__slots__`` of the class and of
    the classes it derives from, base first."""

    __slots__: tuple[str, ...] = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._fields = tuple(name for klass in reversed(cls.__mro__) for name in vars(klass).get("__slots__", ()))

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (a shallow copy)."""
        return {name: getattr(self, name) for name in self._fields}

    def replace(self: V, **changes: Any) -> V:
        """A copy with ``changes`` (field name -> value); an unknown name is a TypeError, as in ``__init__``."""
        return type(self)(**{**self.as_dict(), **changes})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Value) or type(other) is not type(self):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable values are not hashable (Frozen ones are)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)!r}' for name in self._fields)})"

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (type(self), self.as_dict())


def _rebuild(cls: type[Value], fields: dict[str, Any]) -> Value:
    """How a pickled value is made again: its class, called with its fields by name."""
    return cls(**fields)


class Frozen(Value):
    """An immutable :class:`Value` (hashable when its fields are).  ``__init__`` sets the fields
    with ``self._set(name=value, ...)``."""

    __slots__ = ()

    def _set(self, **values: Any) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: derive a changed copy with .replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self._values())
