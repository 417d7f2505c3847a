"""The load suite runs end to end in a tiny configuration; no figure is judged.

``python -m benchmarks.load`` starts its own target, server (the ``pht``
command line and ``serve_pht``) and canary processes on loopback; this only
checks that every scenario finishes and produces each of its figures, so the
suite does not rot between the runs that measure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

#: Figures every scenario reports (from the canary, /proc and the target).
COMMON = {
    "canary_echo_p99_ms",
    "canary_echo_max_ms",
    "canary_stalls_over_100ms",
    "server_rss_mib_start",
    "server_rss_mib_peak",
    "server_rss_growth_mib",
    "target_accepts",
}
#: Figures of each scenario that must be numbers.
EXPECTED = {
    "idle": {
        "tunnels_opened",
        "open_seconds",
        "close_seconds",
        "rss_per_tunnel_kib",
        "idle_cpu_pct",
        "open_stalls_over_100ms",
        "idle_stalls_over_100ms",
        "close_stalls_over_100ms",
    },
    "junk-push": {"pushes_sent", "pushes_per_second", "target_dials_not_by_canary"},
    "junk-push-strict": {"pushes_sent", "pushes_per_second", "target_dials_not_by_canary"},
    "held-pulls": {"pulls_held", "open_seconds", "release_stalls_over_100ms"},
    "held-pulls-strict": {"pulls_held", "open_seconds", "release_stalls_over_100ms"},
    "authorize": {"authorize_calls", "authorize_per_second"},
    "authorize-strict": {"authorize_calls", "authorize_per_second"},
    "endless-lines": {
        "connections",
        "mib_sent",
        "line_rss_growth_mib",
        "rss_mib_while_held",
        "rss_mib_after_release",
    },
    "keepalive": {"library_echo_after_idle", "cli_echo_after_idle"},
}
PHASES = {
    "idle": ["baseline", "open", "idle", "close", "after"],
    "junk-push": ["baseline", "attack", "after"],
    "junk-push-strict": ["baseline", "attack", "after"],
    "held-pulls": ["baseline", "open", "hold", "release", "after"],
    "held-pulls-strict": ["baseline", "open", "hold", "release", "after"],
    "authorize": ["baseline", "attack", "after"],
    "authorize-strict": ["baseline", "attack", "after"],
    "endless-lines": ["baseline", "attack", "release", "after"],
    "keepalive": ["baseline", "idle", "after"],
}


def test_every_scenario_produces_its_figures(tmp_path: Path) -> None:
    output = tmp_path / "load.json"
    # --quick, made smaller still: a few dozen connections, a second or two per phase.
    command = [
        sys.executable, "-m", "benchmarks.load", "--quick", "--json", str(output),
        "--tunnels", "40", "--count", "40", "--duration", "1", "--hold-seconds", "1",
        "--line-bytes", "65536", "--keepalive-timeout", "0.5", "--idle-seconds", "1.5",
        "--client-processes", "2", "--server-gc", "tuned",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]
    scenarios = json.loads(output.read_text())["scenarios"]
    assert set(scenarios) == set(EXPECTED)
    for name, expected in EXPECTED.items():
        result = scenarios[name]
        assert list(result["phases"]) == PHASES[name], name
        figures = result["figures"]
        for figure in expected | COMMON:
            value = figures[figure]
            assert isinstance(value, (int, float)), (name, figure, value)
            assert not isinstance(value, bool), (name, figure)
        # Per-phase latencies are present (None only if no echo started in that phase).
        for phase_name, phase in result["phases"].items():
            for key in ("echo_median_ms", "echo_p99_ms", "echo_max_ms", "cpu_pct"):
                assert phase[key] is None or isinstance(phase[key], float), (name, phase_name)
            assert isinstance(phase["stalls_over_100ms"], int), (name, phase_name)
        assert f"== {name}" in completed.stdout  # the table was printed
    # The idle tunnels came from two client processes, to the uvloop (or asyncio) server.
    idle = scenarios["idle"]
    assert idle["settings"]["client_processes"] == 2
    assert idle["settings"]["server"] in ("uvloop", "asyncio")
    assert idle["figures"]["tunnels_opened"] == 40
