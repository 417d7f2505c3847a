"""Small pieces shared by the client and server cores."""

from __future__ import annotations

from collections.abc import Collection, MutableMapping
from dataclasses import dataclass
from typing import Any

from ._errors import LocalProtocolError

__all__ = ["DEFAULT_PATHS", "JOIN_LIMIT", "Paths", "plan_writes", "take_paths"]

#: Pieces that add up to this much are joined into one write.
JOIN_LIMIT = 64 * 1024
#: Small pieces are written together with this much of a large neighbour.
_EDGE = 16 * 1024


@dataclass(frozen=True, kw_only=True, slots=True)
class Paths:
    """The three request paths; client and server must agree on them."""

    authorize: str = "/authorize"
    push: str = "/push"
    pull: str = "/pull"

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for name in ("authorize", "push", "pull"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.startswith("/"):
                raise LocalProtocolError(f"{name}_path must start with '/', got {value!r}")
            if "?" in value or "#" in value or any(c.isspace() for c in value):
                raise LocalProtocolError(f"{name}_path must be a plain path, got {value!r}")
            if value in seen:
                raise LocalProtocolError(f"{name}_path {value!r} is used for two roles")
            seen.add(value)


DEFAULT_PATHS = Paths()


def take_paths(caller: str, fields: MutableMapping[str, Any], known: Collection[str]) -> Paths:
    """Check an adapter's keywords and take the three ``*_path`` ones out as :class:`Paths`.

    An unknown keyword is the :class:`TypeError` Python raises for one,
    naming ``caller`` (the function the user called).
    """
    unknown = sorted(name for name in fields if name not in known)
    if unknown:
        raise TypeError(f"{caller}() got an unexpected keyword argument {unknown[0]!r}")
    return Paths(
        authorize=fields.pop("authorize_path", DEFAULT_PATHS.authorize),
        push=fields.pop("push_path", DEFAULT_PATHS.push),
        pull=fields.pop("pull_path", DEFAULT_PATHS.pull),
    )


def plan_writes(pieces: list[bytes]) -> list[bytes | memoryview]:
    """The writes that send ``pieces`` in order, in as few as a small copy allows.

    Small pieces are joined. Large ones are written from a memoryview, but
    a small piece next to one (a request head, a body's final newline) goes
    out joined with ``_EDGE`` bytes of it: a write of a few bytes becomes a
    TCP segment of its own, and a relay with Nagle's algorithm on holds such
    a segment for a delayed ACK (a 40 ms wait per push). The copy is at most
    ``2 * _EDGE`` bytes per large piece, whatever its size. Every adapter
    writes requests and responses this way.
    """
    if len(pieces) == 1:
        return [pieces[0]]
    if sum(len(piece) for piece in pieces) <= JOIN_LIMIT:
        return [b"".join(pieces)]
    writes: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    for piece in pieces:
        if len(piece) < 3 * _EDGE:
            small.append(piece)
            continue
        view = memoryview(piece)
        if small:
            small.append(view[:_EDGE])
            writes.append(b"".join(small))
            view = view[_EDGE:]
        writes.append(view[:-_EDGE])
        small = [view[-_EDGE:]]
    if small:
        writes.append(b"".join(small) if len(small) > 1 else small[0])
    return writes
