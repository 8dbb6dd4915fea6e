"""Checkpoint names with a scheme (`released:NAME`), resolved by the room that knows them.

The loader takes a checkpoint folder or a hub repo id. A room that knows other names (the
authors' releases: `sphinx_model.released`) registers a resolver for its scheme here when it
is imported, so the loader reaches it without importing it and the dependency points one way
(released -> loading). A hub repo id cannot hold a colon, so a scheme is never mistaken for one.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

Resolver = Callable[[str], Path]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_RESOLVERS: dict[str, Resolver] = {}


def register_scheme(scheme: str, resolver: Resolver) -> None:
    """Resolve names `SCHEME...` (e.g. "released:") to a checkpoint folder with `resolver(name)`."""
    if not _SCHEME.fullmatch(scheme):
        raise ValueError(f"a scheme is letters, digits, '+', '.' or '-' ending in ':', not {scheme!r}")
    _RESOLVERS[scheme] = resolver


def registered_schemes() -> tuple[str, ...]:
    return tuple(sorted(_RESOLVERS))


def scheme_of(spec: object) -> str | None:
    """The scheme `spec` names ("released:"), or None for a path, a hub repo id or a preset name
    (a local path whose name holds a colon is a path)."""
    if not isinstance(spec, str):
        return None
    match = _SCHEME.match(spec)
    if match is None or Path(spec).exists():
        return None
    return match.group(0)


def resolver_for(scheme: str) -> Resolver | None:
    return _RESOLVERS.get(scheme)
