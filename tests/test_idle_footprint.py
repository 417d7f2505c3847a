"""What an idle tunnel costs the server stays small: no dict where thousands of objects live.

An idle tunnel is one session, its stream and its open pull's connection on
the server; 10,000 of them must fit in 16 KiB each (docs/load.md measures
it). These check the cheap part of that budget that a refactor most easily
loses: the per-session objects keep ``__slots__`` (a dict costs more than the
rest of the object).
"""

from __future__ import annotations

import pytest

import pht
from pht._asyncio_server import _Signal, _Stream
from pht._server_core import SessionBuffers
from pht._trio_server import _ServerStream


@pytest.mark.parametrize(
    "cls", [pht.ServerConnection, SessionBuffers, _ServerStream, _Stream, _Signal]
)
def test_per_session_objects_have_no_dict(cls: type) -> None:
    assert cls.__dictoffset__ == 0, f"{cls.__name__} instances carry a __dict__"


def test_an_open_pull_holds_no_h11() -> None:
    conn = pht.ServerConnection()
    conn.receive_data(b"GET /authorize HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.next_event() == pht.AuthorizeRequest()
    conn.send_token("t")
    conn.receive_data(b"GET /pull?token=t HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.next_event() == pht.PullRequest(token="t")
    conn.start_pull()
    assert conn._h11 is None
