"""The benchmark harness runs end to end (quick mode); timings are not checked."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def run_benchmark(
    script: str, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``benchmarks/SCRIPT ARGS`` with this Python; fail with its stderr unless it exits 0."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


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
    completed = run_benchmark("run.py", "--quick", "--no-plot", "--output", str(tmp_path))
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


E2E_METRICS = {"upload", "download", "rtt_median", "rtt_p99", "setup"}
TUNNEL_CPU = {"cpu_upload", "cpu_download"}


def test_quick_e2e_benchmark_produces_every_figure(tmp_path: Path) -> None:
    """The command-line benchmark: raw TCP, pht and phts, every figure, the backends."""
    completed = run_benchmark("e2e.py", "--quick", "--no-plot", "--output", str(tmp_path))
    results = json.loads((tmp_path / "e2e.json").read_text())
    assert list(results["backends"]) == ["installed"]
    group = results["backends"]["installed"]
    assert group["versions"]["base64"] in {"pybase64", "binascii"}
    assert group["versions"]["ssl"].startswith("OpenSSL")
    figures = group["figures"]
    assert set(figures) == E2E_METRICS | TUNNEL_CPU
    runs = results["settings"]["runs"]
    for metric in E2E_METRICS:
        for kind in ("raw", "pht", "phts"):
            assert len(figures[metric][kind]["runs"]) == runs, (metric, kind)
    for metric in E2E_METRICS | TUNNEL_CPU:
        for kind in ("pht", "phts"):
            stats = figures[metric][kind]
            assert stats["median"] > 0, (metric, kind)
            if metric in E2E_METRICS:
                assert stats["ratio_to_raw"] is not None, (metric, kind)
    assert "raw" not in figures["cpu_upload"]  # no tunnel processes on the raw path
    assert len(results["load_average"]["end"]) == 3
    assert "/GOST" in completed.stdout  # the table was printed


def test_quick_e2e_benchmark_with_a_gost_binary(tmp_path: Path) -> None:
    """``--gost PATH`` adds GOST's pairs and the mixed ones, and compares with them.

    No GOST build here: ``pht`` stands in, since it takes GOST's command line.
    """
    stand_in = tmp_path / "gost"
    stand_in.write_text(
        f"#!{sys.executable}\nimport sys\nfrom pht.cli import main\nsys.exit(main())\n"
    )
    stand_in.chmod(0o755)
    run_benchmark(
        "e2e.py", "--quick", "--no-plot", "--gost", str(stand_in), "--output", str(tmp_path)
    )
    results = json.loads((tmp_path / "e2e.json").read_text())
    kinds = ["raw", "pht", "phts", "gost", "gosts", "pht-to-gost", "gost-to-pht"]
    assert results["kinds"] == kinds
    assert results["pairs"]["pht-to-gost"] == {"client": "pht", "server": "gost", "scheme": "pht"}
    assert results["gost_version"]
    figures = results["backends"]["installed"]["figures"]
    for metric in E2E_METRICS | TUNNEL_CPU:
        for kind in kinds[1:]:
            assert figures[metric][kind]["median"] > 0, (metric, kind)
    upload = figures["upload"]
    assert upload["phts"]["gost_source"] == "measured in this run"
    assert upload["phts"]["gost"] == upload["gosts"]["median"]
    assert upload["pht-to-gost"]["gost"] == upload["gost"]["median"]
    assert upload["gost"]["gost_source"] == "reference"  # GOST itself: against the reference


def test_e2e_profile_summary_adds_up_samples() -> None:
    """py-spy's collapsed stacks become own and inclusive shares per function."""
    e2e = _load_e2e()
    collapsed = (
        "main (pht/cli/__init__.py:21);run (trio/_core/_run.py:2535);"
        "_push (pht/_trio_server.py:10);"
        "send (trio/_socket.py:5) 6\n"
        "main (pht:6);_push (pht/_trio_server.py:12);_push (pht/_trio_server.py:14) 2\n"
        "main (pht:6);get_events (/x/site-packages/trio/_core/_io_epoll.py:243) 2\n"
        "not a sample line\n"
    )
    summary = e2e.top_functions(collapsed)
    assert summary["busy_samples"] == 10
    own = {item["function"]: item["share"] for item in summary["top"]}
    assert own == {
        "send (trio/_socket.py)": 0.6,
        "_push (pht/_trio_server.py)": 0.2,
        "get_events (trio/_core/_io_epoll.py)": 0.2,
    }
    inclusive = {item["function"]: item["share"] for item in summary["pht_inclusive"]}
    assert inclusive == {"_push (pht/_trio_server.py)": 0.8}  # recursion counted once
    assert summary["areas"] == {
        "socket and TLS calls": 0.6,
        "pht": 0.2,
        "trio scheduler and epoll": 0.2,
    }


def test_e2e_push_window_and_profile_buckets() -> None:
    """``--push-window`` reaches the client node; asyncio/uvloop frames and perf's
    binaries get their own buckets (an extension module is not the interpreter)."""
    e2e = _load_e2e()
    arguments = e2e._client_arguments("pht", "127.0.0.1:9", 8443, 1080, push_window=4)
    assert arguments[3] == "forward+pht://127.0.0.1:8443?pushWindow=4"
    assert "pushWindow" not in " ".join(e2e._client_arguments("pht", "127.0.0.1:9", 8443, 1080))
    assert e2e._area("run", "asyncio/runners.py") == "event loop (asyncio/uvloop)"
    assert e2e._area("send", "anyio/_backends/_asyncio.py") == "anyio"
    assert e2e._dso("loop.cpython-311-x86_64-linux-gnu.so") == "uvloop and libuv"
    assert e2e._dso("_pybase64.cpython-311-x86_64-linux-gnu.so") == "pybase64"
    assert e2e._dso("libpython3.11.so.1.0") == "Python interpreter"
    assert e2e._dso("[kernel.kallsyms]") == "kernel (system calls, TCP)"


def _load_e2e() -> Any:
    name = "pht_benchmarks_e2e"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "e2e.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_adapters_benchmark_produces_every_figure(tmp_path: Path) -> None:
    """trio, asyncio and uvloop: every client adapter against every server adapter."""
    run_benchmark("adapters.py", "--quick", "--output", str(tmp_path))
    pairs = json.loads((tmp_path / "adapters.json").read_text())["pairs"]
    adapters = ("trio", "asyncio", "uvloop")
    for client in adapters:
        for server in adapters:
            for label in (f"{client}/{server}", f"{client}/{server} tcp"):
                assert set(pairs[label]) == {"upload", "download", "rtt_median", "rtt_p99"}
                for figure in pairs[label].values():
                    assert len(figure["runs"]) == 1
            assert "vs_tcp" in pairs[f"{client}/{server}"]["upload"]


@pytest.mark.parametrize("workload", ["rtt", "upload", "download"])
@pytest.mark.parametrize("path", ["tcp", "pht"])
def test_instruction_workloads_run(workload: str, path: str) -> None:
    """Each workload of benchmarks/instructions.py, natively (valgrind is slow)."""
    run_benchmark("instructions.py", "--inner", workload, path, "1", timeout=120)


def test_instructions_are_counted_under_valgrind() -> None:
    """One run under callgrind gives a whole-process instruction count."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        instructions = importlib.import_module("instructions")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    # A Python process that starts trio and makes one round trip runs far
    # more than ten million instructions.
    assert instructions.count_instructions("rtt", "tcp", 1) > 10_000_000
