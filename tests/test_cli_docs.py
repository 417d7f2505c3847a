"""docs/cli.md and the command's own texts agree with the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import pht
from pht.cli._options import OPTIONS
from pht.cli._run import build_parser

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _option_table() -> list[tuple[str, str, str]]:
    """(option, where, status) of each row of the option reference table."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index("| option | where | status | meaning |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append((cells[0].strip("`"), cells[1], cells[2]))
    return rows


def test_option_table_matches_the_registry() -> None:
    documented = _option_table()
    registry = [(option.name, ", ".join(option.parts), option.status) for option in OPTIONS]
    assert documented == registry


def test_every_status_is_supported_or_refused() -> None:
    assert {status for _, _, status in _option_table()} == {"supported", "refused"}


def test_help_points_to_no_repository_file() -> None:
    text = build_parser().format_help()
    assert not re.search(r"\bdocs/|\.md\b", text)
    assert "The pht command line" in text


def test_version_names_the_backends(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--version"])
    out = capsys.readouterr().out
    assert out.startswith(f"pht {pht.__version__} ")
    assert f"base64 {pht.BASE64_BACKEND}" in out
    assert "TLS OpenSSL" in out or "TLS LibreSSL" in out
    assert "trio " in out
