"""Readers for the golden transcripts in ``tests/conformance/``.

The captures show bytes with ``\\r\\n`` and ``\\n`` written out literally at
the end of each line; a line without either had no line ending on the wire.
``tests/conformance/README.md`` says which GOST commits produced them.

A missing capture fails the test that asked for it (naming the file); the
readers are only called from inside tests, never at import time, so a missing
file never turns into a collection error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

CONFORMANCE = Path(__file__).resolve().parent / "conformance"
_RULE = "=" * 78


def read_capture(name: str) -> str:
    """The text of capture ``name``; fails the calling test if it is missing."""
    path = CONFORMANCE / name
    if not path.is_file():
        pytest.fail(
            f"golden transcript {name} is missing: expected {path} "
            "(see tests/conformance/README.md)",
            pytrace=False,
        )
    return path.read_text()


def decode_block(lines: list[str]) -> bytes:
    out = []
    for line in lines:
        if line.endswith("\\r\\n"):
            out.append(line[:-4] + "\r\n")
        elif line.endswith("\\n"):
            out.append(line[:-2] + "\n")
        else:
            out.append(line)
    return "".join(out).encode("latin-1")


@dataclass(frozen=True)
class Exchange:
    """One numbered section of a ``*_raw_http.txt`` capture."""

    section: str  # "1", "4b", ...
    title: str
    request: bytes
    response: bytes


def raw_http_exchanges(name: str) -> dict[str, Exchange]:
    text = read_capture(name)
    result: dict[str, Exchange] = {}
    for part in text.split(_RULE):
        match = re.search(r"^## (\w+)\. (.*)$", part, re.MULTILINE)
        if not match:
            continue
        lines = part.splitlines()
        req_at = next(i for i, line in enumerate(lines) if line.startswith("--- request"))
        resp_at = next(i for i, line in enumerate(lines) if line.startswith("--- response"))
        response_lines = [
            line
            for line in lines[resp_at + 1 :]
            if not line.startswith("[") and not line.startswith("#")
        ]
        result[match.group(1)] = Exchange(
            section=match.group(1),
            title=match.group(2),
            request=decode_block(lines[req_at + 1 : resp_at]),
            response=decode_block(response_lines),
        )
    return result


@dataclass(frozen=True)
class WirePiece:
    connection: int
    direction: str  # "C>S" or "S>C"
    data: bytes


def wire_pieces(name: str) -> list[WirePiece]:
    """The pieces of a ``*_go_client_wire.txt`` capture, in order."""
    pieces: list[WirePiece] = []
    header = re.compile(r"^\[\s*[\d.]+s\] conn#(\d+) (C>S|S>C) \d+ bytes:$")
    current: tuple[int, str] | None = None
    block: list[str] = []
    for line in read_capture(name).splitlines():
        match = header.match(line)
        if match or line.startswith(("[", "#")):
            if current is not None:
                pieces.append(WirePiece(current[0], current[1], decode_block(block)))
            current, block = None, []
            if match:
                current = (int(match.group(1)), match.group(2))
            continue
        if current is not None and line:
            block.append(line)
    if current is not None:
        pieces.append(WirePiece(current[0], current[1], decode_block(block)))
    return pieces
