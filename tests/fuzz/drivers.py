"""Drive the sans-IO core with arbitrary bytes, answering events as the trio adapters do.

Shared by the hypothesis tests (``tests/test_hardening_fuzz.py``) and the
atheris harnesses next to this file. Each driver raises ``AssertionError`` when
a promise is broken; every other exception that escapes is a bug too, except
``pht.RemoteProtocolError`` / ``pht.LocalProtocolError``, which the drivers
catch and check.

Promises checked:
- only ``pht``'s own protocol errors escape;
- a refused request is answered with a ``4xx`` (a server error's
  ``status_hint`` is a ``4xx``, or ``501`` for an unknown transfer coding,
  and ``send_status`` still works);
- no event carries more data than was fed (base64 shrinks it: 3/4);
- incomplete input held by the core stays within its bounds (the push-line
  and pull-line limits, plus at most one fed piece).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pht

#: Small bounds so that short inputs reach them.
MAX_PUSH_LINE = 512
MAX_HEADER_SIZE = 1024
MAX_PULL_LINE = 512

KINDS = ("authorize", "push", "pull", "close")


def split(data: bytes, sizes: Iterable[int]) -> Iterator[bytes]:
    """Cut ``data`` into pieces of the given sizes (cycling; each at least 1)."""
    sizes = [max(1, size) for size in sizes] or [len(data) or 1]
    offset, i = 0, 0
    while offset < len(data):
        size = sizes[i % len(sizes)]
        yield data[offset : offset + size]
        offset += size
        i += 1


def _held_by_server(conn: pht.ServerConnection) -> int:
    decoder: Any = getattr(conn, "_decoder", None)
    return int(decoder.pending) if decoder is not None else 0


def drive_server(pieces: Iterable[bytes]) -> list[int]:
    """Feed ``pieces`` (then EOF) to a ServerConnection; return the statuses answered."""
    conn = pht.ServerConnection(max_push_line=MAX_PUSH_LINE, max_header_size=MAX_HEADER_SIZE)
    statuses: list[int] = []
    fed = 0
    for piece in [*pieces, b""]:
        fed += len(piece)
        try:
            conn.receive_data(piece)
        except pht.LocalProtocolError:
            # Data after the connection ended (an adapter would have stopped reading).
            assert (
                conn.state
                in (
                    pht.ServerConnectionState.CLOSED,
                    pht.ServerConnectionState.ERROR,
                )
                or not piece
            )
            return statuses
        while True:
            try:
                event = conn.next_event()
            except pht.RemoteProtocolError as exc:
                statuses.append(_refuse(conn, exc.status_hint))
                return statuses
            if event is pht.NEED_DATA:
                break
            if isinstance(event, pht.PushData):  # a piece of a long line: not answered
                assert len(event.data) <= fed * 3 // 4
                continue
            statuses.append(_answer(conn, event, fed))
            if conn.state is pht.ServerConnectionState.CLOSED:
                return statuses
        assert _held_by_server(conn) <= MAX_PUSH_LINE + len(piece)
    return statuses


def refusal_status_ok(status: int) -> bool:
    """A ``4xx``, or ``501`` for a transfer coding the server does not implement.

    RFC 9112 (6.1) asks for 501 there, and h11 answers it; everything else
    malformed is the client's fault.
    """
    return 400 <= status < 500 or status == 501


def _refuse(conn: pht.ServerConnection, status: int) -> int:
    """Answer a request the core could not parse, as serve_pht does."""
    assert refusal_status_ok(status), status
    answer = conn.send_status(status)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:20]
    assert conn.state is pht.ServerConnectionState.CLOSED
    return status


def _answer(conn: pht.ServerConnection, event: object, fed: int) -> int:
    """Answer one request event as serve_pht does; return the status sent."""
    if isinstance(event, pht.AuthorizeRequest):
        assert conn.send_token("0123456789abcdefghijklmnop").startswith(b"HTTP/1.1 200")
        return 200
    if isinstance(event, pht.PushRequest):
        assert len(event.data) <= fed * 3 // 4
        conn.send_push_ack()
        return 200
    if isinstance(event, pht.CloseRequest):
        conn.send_push_ack()
        return 200
    if isinstance(event, pht.PullRequest):
        conn.start_pull()
        conn.send_pull_data(b"data for the client")
        conn.send_heartbeat()
        conn.end_pull()
        return 200
    assert isinstance(event, pht.BadRequest), event
    assert 400 <= event.status_code < 500, event
    assert conn.send_status(event.status_code).startswith(b"HTTP/1.1 4")
    return event.status_code


def drive_client(kind: str, authorize: bool, pieces: Iterable[bytes]) -> list[object]:
    """Send one request of ``kind`` on a ClientChannel and feed ``pieces`` as the answer.

    Like the adapter, a pull that ended without ending the session is polled
    again on the same channel. Returns the events seen.
    """
    config = pht.ClientConfig.build("h", authorize=authorize, max_pull_line=MAX_PULL_LINE)
    channel = pht.ClientChannel(config)
    token = "0123456789abcdefghijklmnop"
    if kind == "authorize":
        channel.authorize()
    elif kind == "pull":
        channel.pull(token)
    elif kind == "push":
        channel.push(token, b"payload")
    else:
        channel.close_session(token)
    events: list[object] = []
    fed = 0
    delivered = 0
    for piece in [*pieces, b""]:
        fed += len(piece)
        try:
            channel.receive_data(piece)
            while (event := channel.next_event()) is not pht.NEED_DATA:
                events.append(event)
                if isinstance(event, pht.DataReceived):
                    delivered += len(event.data)
                    assert delivered <= fed * 3 // 4, (delivered, fed)
                elif isinstance(event, pht.Authorized):
                    assert len(event.token) <= fed
                elif isinstance(event, pht.Rejected):
                    assert len(event.reason) <= fed
                elif (
                    isinstance(event, pht.PullEnded)
                    and not event.session_over
                    and channel.state is pht.ChannelState.IDLE
                ):
                    channel.pull(token)  # poll again, as the adapter does
        except (pht.RemoteProtocolError, pht.LocalProtocolError):
            assert channel.state in (pht.ChannelState.ERROR, pht.ChannelState.CLOSED)
            return events
        lines: Any = getattr(channel, "_lines", None)
        if lines is not None:
            assert lines.pending <= MAX_PULL_LINE + len(piece)
        body: Any = getattr(channel, "_body", b"")
        assert len(body) <= 64 * 1024 + len(piece)
    return events
