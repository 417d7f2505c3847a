"""Run each atheris harness for a bounded number of inputs (a smoke test, not a campaign).

``scripts/fuzz.sh SECONDS`` runs the same harnesses for as long as you like.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
RUNS = 5_000

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed for this Python: pip install -r requirements-fuzz.txt "
    "(scripts/fuzz.sh does it, building against clang if there is no wheel)",
)


def run_harness(target: str, tmp_path: Path) -> str:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(HERE / f"fuzz_{target}.py"),
            str(corpus),
            str(HERE / "seeds" / target),
            f"-runs={RUNS}",
            "-seed=1",
            "-max_len=4096",
            f"-dict={HERE / 'http.dict'}",
            f"-artifact_prefix={tmp_path}/",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    # The input that broke a promise, to replay with the harness.
    crashes = [crash.read_bytes()[:600] for crash in sorted(tmp_path.glob("crash-*"))]
    tail = "\n".join(output.splitlines()[-40:])
    assert result.returncode == 0, f"harness failed on {crashes!r}:\n{tail}"
    assert f"Done {RUNS} runs" in output, tail
    return output


def coverage(output: str) -> int:
    return max(int(n) for n in re.findall(r"cov: (\d+)", output))


def test_server_harness(tmp_path: Path) -> None:
    output = run_harness("server", tmp_path)
    assert coverage(output) > 400  # instrumentation reaches pht and h11


def test_client_harness(tmp_path: Path) -> None:
    output = run_harness("client", tmp_path)
    assert coverage(output) > 400
