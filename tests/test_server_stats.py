"""``serve_pht(stats=...)`` reports sessions, pushes, pulls and refusals as they happen."""

from __future__ import annotations

import logging

import pytest
import trio

import pht
from pht._stats import ServiceStats

from .support import LogLine, echo, receive_exactly


async def _raw_request(port: int, request: bytes) -> bytes:
    """Send one raw request and read the answer until the server closes or answers."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    async with stream:
        await stream.send_all(request)
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in answer:
                try:
                    chunk = await stream.receive_some()
                except trio.BrokenResourceError:  # a TLS server resets a plain client
                    break
                if not chunk:
                    break
                answer += chunk
    return answer


class _Stats(ServiceStats):
    """ServiceStats that wakes a waiter when a session closes."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.closed = trio.Event()

    def session_closed(self) -> None:
        super().session_closed()
        self.closed.set()


async def test_stats_count_a_tunnel_and_refusals() -> None:
    stats = _Stats("pht-test")
    assert not stats.pht_enabled
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(lambda task_status: pht.serve_pht(
            echo, 0, host="127.0.0.1", stats=stats, task_status=task_status
        ))  # fmt: skip
        port = listeners[0].socket.getsockname()[1]
        assert stats.pht_enabled  # counters exist, at zero, once it listens
        assert (stats.sessions_total, stats.pushes_total, stats.pulls_total) == (0, 0, 0)

        stream = await pht.open_pht_stream("127.0.0.1", port)
        await stream.send_all(b"x" * 1000)
        assert await receive_exactly(stream, 1000) == b"x" * 1000
        assert stats.sessions_total == 1
        assert stats.sessions_open == 1
        assert stats.pushes_total >= 1
        assert stats.pulls_total == 1
        await stream.aclose()
        with trio.fail_after(5):
            await stats.closed.wait()
        assert stats.sessions_open == 0

        not_found = await _raw_request(port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert not_found.startswith(b"HTTP/1.1 404 ")
        nursery.cancel_scope.cancel()
    assert stats.refusals[404] == 1
    assert stats.sessions_total == 1


async def test_refusals_and_tls_failures_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """A path mismatch and a TLS failure show at INFO, the default level of the CLI."""
    caplog.set_level(logging.INFO, logger="pht")
    tls_failed = LogLine("TLS handshake failed")
    logging.getLogger("pht").addHandler(tls_failed)
    async with trio.open_nursery() as nursery:
        plain = await nursery.start(lambda task_status: pht.serve_pht(
            echo, 0, host="127.0.0.1", task_status=task_status
        ))  # fmt: skip
        secure = await nursery.start(lambda task_status: pht.serve_pht(
            echo, 0, host="127.0.0.1", tls=True, task_status=task_status
        ))  # fmt: skip
        plain_port = plain[0].socket.getsockname()[1]
        secure_port = secure[0].transport_listener.socket.getsockname()[1]
        await _raw_request(plain_port, b"GET /wrong/pull HTTP/1.1\r\nHost: x\r\n\r\n")
        await _raw_request(secure_port, b"GET /pull?token=t HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            with trio.fail_after(5):
                await tls_failed.seen.wait()
        finally:
            logging.getLogger("pht").removeHandler(tls_failed)
        nursery.cancel_scope.cancel()
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any(
        level == logging.INFO and "refused a request from 127.0.0.1" in text and "(404)" in text
        for level, text in messages
    ), messages
    assert any(
        level == logging.INFO
        and text.startswith("connection from 127.0.0.1")
        and "TLS handshake failed" in text
        for level, text in messages
    ), messages
