"""``--backend``: the event loop the command line runs on, and what each refuses."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from pht.cli import _backend
from pht.cli._backend import Backend, choose_backend
from pht.cli._run import build_config, prepare
from pht.cli._spec import ConfigError

from .test_cli_run import BACKENDS, PhtProcess, assert_one_line_error, run_pht

#: A chain whose PHT hop stands behind another hop (its connections go through it).
BEHIND = ["-F", "socks5://127.0.0.1:1", "-F", "socks5+pht://127.0.0.1:2"]


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown --backend 'gevent': choose one of auto, trio"):
        choose_backend("gevent")
    result = run_pht("-L", "127.0.0.1:0", "--backend", "gevent")
    assert_one_line_error(result, 2, "unknown --backend 'gevent'", "auto, trio, asyncio, uvloop")


def test_uvloop_without_uvloop_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_backend, "uvloop_available", lambda: False)
    with pytest.raises(ConfigError, match=r"uvloop is not installed \(pip install"):
        choose_backend("uvloop")
    # auto runs on what is there instead.
    assert choose_backend("auto").name in {"trio", "asyncio"}


def test_auto_takes_the_first_installed_of_the_measured_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_backend, "AUTO_PREFERENCE", ("uvloop", "asyncio"))
    monkeypatch.setattr(_backend, "uvloop_available", lambda: True)
    assert choose_backend("auto") == Backend("uvloop")
    monkeypatch.setattr(_backend, "uvloop_available", lambda: False)
    assert choose_backend("auto") == Backend("asyncio")


@pytest.mark.parametrize("loop", BACKENDS)
def test_a_pht_hop_behind_other_hops_runs_on_every_loop(loop: str) -> None:
    # Both clients take open_transport: nothing makes the chain need trio.
    services = prepare(build_config(["127.0.0.1:0"], BEHIND[1::2]), backend=loop)
    assert services[0].backend == Backend(loop)


def test_a_pht_hop_behind_other_hops_leaves_auto_to_the_fastest() -> None:
    services = prepare(build_config(["127.0.0.1:0"], BEHIND[1::2]), backend="auto")
    assert services[0].backend == choose_backend("auto")


def test_a_first_hop_behind_a_plain_http_proxy_runs_everywhere() -> None:
    # The HTTP proxy becomes the PHT node's proxy= (absolute form), which the
    # asyncio client has too: no reason to refuse.
    nodes = ["http://127.0.0.1:1", "socks5+pht://127.0.0.1:2"]
    services = prepare(build_config(["127.0.0.1:0"], nodes), backend="asyncio")
    assert services[0].backend == Backend("asyncio")


@pytest.mark.parametrize("loop", BACKENDS)
def test_the_running_line_names_the_event_loop(loop: str) -> None:
    with PhtProcess("-L", "socks5+pht://127.0.0.1:0", "--backend", loop) as child:
        line = child.wait_for(r"INFO pht .*: running$").group(0)
        status, _ = child.stop()
    assert status == 0
    assert f"event loop {Backend(loop).describe()}," in line


def test_version_names_every_event_loop() -> None:
    result = run_pht("--version")
    assert result.returncode == 0
    assert f"{choose_backend('auto').describe()} (auto)" in result.stdout
    for loop in BACKENDS:
        assert Backend(loop).describe() in result.stdout


def _e2e_benchmark() -> Any:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "e2e.py"
    spec = importlib.util.spec_from_file_location("pht_benchmarks_e2e_loops", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_the_e2e_benchmark_starts_each_loops_pair_with_its_backend() -> None:
    e2e = _e2e_benchmark()
    pairs, loops = e2e.loop_pairs(["trio", "uvloop"])
    assert list(pairs) == ["pht-trio", "phts-trio", "pht-uvloop", "phts-uvloop"]
    assert loops["phts-uvloop"] == "uvloop"
    client = e2e._client_arguments("phts", "127.0.0.1:9", 1, 2, loop="uvloop")
    assert client[-2:] == ["--backend", "uvloop"]
    assert e2e._server_arguments("pht", "127.0.0.1:9", 1)[-1].startswith("pht://")
    assert set(e2e.available_loops()) == set(BACKENDS)
