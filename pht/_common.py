"""Small pieces shared by the client and server cores."""

from __future__ import annotations

from dataclasses import dataclass

from ._errors import LocalProtocolError

__all__ = ["DEFAULT_PATHS", "Paths"]


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
