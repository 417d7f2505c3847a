"""The benchmark harness runs end to end (quick mode); timings are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

EXPECTED = {
    "core_push_encode",
    "core_push_decode",
    "core_pull_encode",
    "core_pull_reassembly",
    "core_b64_encode_pybase64_vs_binascii",
    "core_b64_decode_pybase64_vs_binascii",
    "upload_plain",
    "upload_tls",
    "download_plain",
    "download_tls",
    "rtt_median",
    "rtt_p99",
    "setup_authorize",
    "setup_noauth",
    "tunnels_per_second_authorize",
    "tunnels_per_second_noauth",
}


def test_quick_benchmark_produces_every_figure(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--no-plot",
         "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    figures = results["figures"]
    concurrency = results["settings"]["concurrency"]
    assert concurrency
    expected = set(EXPECTED)
    for count in concurrency:
        expected |= {
            f"concurrency_{count}_throughput",
            f"concurrency_{count}_idle_rss_per_tunnel",
            f"concurrency_{count}_new_tunnel_first_byte",
        }
    assert expected <= set(figures)
    for name in expected:
        runs = figures[name]["pht"]["runs"]
        assert len(runs) == results["settings"]["runs"], name
        assert figures[name]["baseline"] is not None, name
    assert "targets" in results
    assert "figure" in completed.stdout  # the table was printed
