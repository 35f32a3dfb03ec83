"""Frozen dataclass configs to and from plain dicts (JSON and YAML sections): one reading, one error.

    P2PConfig.from_dict({"mode": "refine", "blend_words": ["man", "panda"]})  # lists become tuples
    Recipe.from_dict({"name": "x", "temporl": "ta"})   # = from_dict(Recipe, data, "recipe")
    # ValueError: unknown recipe key 'temporl' (did you mean 'temporal'?); known keys: coarse_factor, ...

The configs that use it (`P2PConfig`, `InjectionConfig`, `Recipe`) check their values in `__post_init__`;
this module only maps keys to fields. It imports nothing of ei2, so any layer may use it.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any], what: str, error: type[Exception] = ValueError) -> T:
    """`cls(**data)`, lists turned into tuples (JSON and YAML give lists; the configs hold tuples), also inside
    dicts. A key that is no field of `cls` is an `error` that names the key, the nearest field and all the fields
    (`what` names the config: "p2p", "recipe")."""
    names = sorted(f.name for f in dataclasses.fields(cls))
    if not isinstance(data, Mapping):
        raise error(f"{what} settings must be a mapping of {', '.join(names)}; got {type(data).__name__} {data!r}")
    unknown = [key for key in data if key not in names]
    if unknown:
        def described(key) -> str:
            close = difflib.get_close_matches(str(key), names, n=1)
            return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)

        keys = "key" if len(unknown) == 1 else "keys"
        raise error(f"unknown {what} {keys} {', '.join(map(described, unknown))}; known keys: {', '.join(names)}")
    return cls(**{key: _frozen(value) for key, value in data.items()})


def to_dict(config) -> dict:
    """The fields of a dataclass as a dict of plain values (tuples as lists, as JSON writes them); `from_dict`
    reads it back."""
    return _plain(dataclasses.asdict(config))


def _frozen(value):
    if isinstance(value, Mapping):
        return {k: _frozen(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
