"""The golden transcripts live in the repository, and a missing one is a clear failure."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from . import transcripts

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_captures_are_read_from_inside_the_repository() -> None:
    assert transcripts.CONFORMANCE == TESTS / "conformance"
    assert (transcripts.CONFORMANCE / "README.md").is_file()
    assert "## 1. GET /authorize" in transcripts.read_capture("modern_raw_http.txt")


def test_a_missing_capture_fails_the_test_naming_the_file() -> None:
    with pytest.raises(pytest.fail.Exception, match=r"no_such_capture\.txt is missing"):
        transcripts.raw_http_exchanges("no_such_capture.txt")
    with pytest.raises(pytest.fail.Exception, match=r"no_such_wire\.txt is missing"):
        transcripts.wire_pieces("no_such_wire.txt")


def test_conformance_modules_without_captures_fail_not_error(tmp_path: Path) -> None:
    """Without tests/conformance/, the conformance tests fail (exit 1), naming the file.

    A collection error (exit 2) would hide every other test in the run.
    """
    shutil.copytree(
        TESTS, tmp_path / "tests", ignore=shutil.ignore_patterns("conformance", "__pycache__")
    )
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options]\ntrio_mode = true\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_conformance_server.py",
            "tests/test_conformance_client.py",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "error" not in result.stdout.splitlines()[-1], result.stdout
    assert "golden transcript modern_raw_http.txt is missing" in result.stdout
    assert "golden transcript legacy_go_client_wire.txt is missing" in result.stdout
