"""Shared parsing of user-facing choices (library and CLI use the same lists)."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def lookup(kind: str, name: Any, table: Mapping[str, T]) -> T:
    """``table[name]`` or a ``ValueError`` that lists the valid names."""
    if not isinstance(name, str) or name.lower() not in table:
        valid = ", ".join(sorted(table))
        raise ValueError(f"unknown {kind} {name!r}; valid choices: {valid}")
    return table[name.lower()]


def parse_number(text: str) -> Any:
    """``"0.1"`` -> 0.1, ``"3"`` -> 3, ``"true"`` -> True; anything else stays a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_shortcut(text: str) -> tuple[str, dict[str, Any]]:
    """``"normal:loc=0,scale=0.1"`` -> ``("normal", {"loc": 0, "scale": 0.1})``."""
    name, _, rest = text.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"expected key=value in {text!r}, got {item!r} (e.g. 'normal:scale=0.1')")
        kwargs[key.strip()] = parse_number(val.strip())
    return name.strip().lower(), kwargs


def with_defaults(cls: type, kwargs: dict[str, Any], default: Any) -> dict[str, Any]:
    """``kwargs`` completed with the fields of ``default`` that ``cls`` also takes.

    A shortcut names what differs from the default: with the default
    ``Normal(loc="pretrained", scale=0.03)``, ``"normal:scale=0.1"`` is
    ``Normal(loc="pretrained", scale=0.1)``, not a prior silently moved to 0.
    """
    if default is None:
        return dict(kwargs)
    takes = inspect.signature(cls).parameters
    return {**{k: v for k, v in vars(default).items() if k in takes}, **kwargs}
