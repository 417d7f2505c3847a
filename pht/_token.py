"""Session tokens.

GOST's tokens are xids: 20 characters of lowercase base32hex (``0-9a-v``)
with only a few bits of randomness. ``pht`` keeps the alphabet, so GOST
servers and clients accept its tokens, but draws 130 bits from a
cryptographically secure source: 26 characters.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable

__all__ = ["TOKEN_LENGTH", "TokenSource", "is_plausible_token", "new_token"]

#: Characters in a token made by :func:`new_token` (26 x 5 bits = 130 bits).
TOKEN_LENGTH = 26

#: Longest token a server accepts in a request; GOST's own are 20 characters.
MAX_TOKEN_LENGTH = 128

TokenSource = Callable[[], str]
"""A callable returning a fresh token; the core takes one instead of drawing
randomness itself, so tests can pass a deterministic source."""

_TOKEN_ALPHABET = frozenset("0123456789abcdefghijklmnopqrstuvwxyz-_ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def new_token() -> str:
    """Return a fresh token: 26 lowercase base32hex characters, 130 random bits."""
    raw = base64.b32hexencode(secrets.token_bytes(17)).decode("ascii").lower()
    return raw[:TOKEN_LENGTH]


def is_plausible_token(token: str) -> bool:
    """Whether ``token`` is something a client could have been given or made.

    Non-empty, at most :data:`MAX_TOKEN_LENGTH` characters, and only letters,
    digits, ``-`` and ``_``, so that it can be logged and put in a URL as is.
    """
    return 0 < len(token) <= MAX_TOKEN_LENGTH and _TOKEN_ALPHABET.issuperset(token)
