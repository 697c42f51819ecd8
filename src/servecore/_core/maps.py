"""The persistent map of the core's values: ``immutables.Map`` that compares like a dict.

The core updates its state with persistent maps, so that a step costs what it changed
(a ``set`` shares all but a path of the old map). ``immutables.Map`` does that, but it
compares equal only to another ``immutables.Map``: ``state.endpoints["e"].traffic ==
{"a": 1.0}`` would be ``False``, a trap for anyone checking state in a test or a
script. :class:`Map` wraps it and compares equal to any mapping with the same items;
everything else (``set``, ``delete``, lookups, hashing) is the wrapped map's own.

Pure: no I/O, like the rest of the core.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from typing import Any, TypeVar, overload

import immutables

__all__ = ["Map"]

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


class Map(Mapping[K, V]):
    """An immutable mapping with O(log n) ``set``/``delete`` that return a new map.

    Equal to any :class:`~collections.abc.Mapping` with the same items (a ``dict``
    included, on either side of ``==``)::

        >>> Map({"a": 1.0}) == {"a": 1.0}
        True
        >>> Map({"a": 1.0}).set("b", 0.5)
        Map({'a': 1.0, 'b': 0.5})
    """

    __slots__ = ("_map",)

    _map: immutables.Map[K, V]

    def __init__(self, items: Mapping[K, V] | Iterable[tuple[K, V]] | None = None) -> None:
        if isinstance(items, Map):
            self._map = items._map
        elif items is None:
            self._map = immutables.Map()
        else:
            self._map = immutables.Map(items)

    @classmethod
    def _wrap(cls, inner: immutables.Map[K, V]) -> Map[K, V]:
        new = object.__new__(cls)
        new._map = inner
        return new

    def set(self, key: K, value: V) -> Map[K, V]:
        """A new map with ``key`` set to ``value``."""
        return Map._wrap(self._map.set(key, value))

    def delete(self, key: K) -> Map[K, V]:
        """A new map without ``key`` (``KeyError`` if it is not there)."""
        return Map._wrap(self._map.delete(key))

    def __getitem__(self, key: K) -> V:
        return self._map[key]

    @overload
    def get(self, key: K, /) -> V | None: ...
    @overload
    def get(self, key: K, default: V | D, /) -> V | D: ...
    def get(self, key: K, default: Any = None) -> Any:
        """The value of ``key``, or ``default``."""
        return self._map.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __iter__(self) -> Iterator[K]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)

    def keys(self) -> KeysView[K]:
        """The keys (a view)."""
        return self._map.keys()  # type: ignore[return-value]

    def values(self) -> ValuesView[V]:
        """The values (a view)."""
        return self._map.values()  # type: ignore[return-value]

    def items(self) -> ItemsView[K, V]:
        """The ``(key, value)`` pairs (a view)."""
        return self._map.items()  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Map):
            return self._map == other._map
        if isinstance(other, immutables.Map):
            return self._map == other
        if isinstance(other, Mapping):
            if len(other) != len(self._map):
                return False
            missing = object()
            return all(self._map.get(k, missing) == v for k, v in other.items())
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self._map)

    def __repr__(self) -> str:
        return f"Map({dict(self._map.items())!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Map, (dict(self._map.items()),))
