"""Property tests: any writes, any segmentation, any chunking, arrive intact.

A sans-IO client channel and a sans-IO server connection are joined by an
in-memory link that cuts the byte stream wherever hypothesis likes.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import pht

from .support import cut

writes = st.lists(st.binary(min_size=1, max_size=5000), min_size=1, max_size=12)
cuts = st.lists(st.integers(min_value=1, max_value=700), min_size=1, max_size=50)


def drain(conn: pht.ServerConnection | pht.ClientChannel) -> list[object]:
    result: list[object] = []
    while (event := conn.next_event()) is not pht.NEED_DATA:
        result.append(event)
        if isinstance(conn, pht.ServerConnection):
            break  # one request at a time: the caller answers it first
    return result


@settings(max_examples=150, deadline=None)
@given(writes=writes, request_cuts=cuts, answer_cuts=cuts)
def test_pushes_arrive_intact_and_in_order(
    writes: list[bytes], request_cuts: list[int], answer_cuts: list[int]
) -> None:
    config = pht.ClientConfig.build("h", authorize=False)
    client = pht.ClientChannel(config)
    server = pht.ServerConnection()
    received = []
    for data in writes:
        request = b"".join(client.push("tok", data))
        events: list[object] = []
        for piece in cut(request, request_cuts):
            server.receive_data(piece)
            events += drain(server)
        assert events == [pht.PushRequest(token="tok", data=data)]
        received.append(events[0].data)  # type: ignore[attr-defined]
        answers: list[object] = []
        for piece in cut(server.send_push_ack(), answer_cuts):
            client.receive_data(piece)
            answers += drain(client)
        assert answers == [pht.PushAcknowledged()]
        assert client.state is pht.ChannelState.IDLE
    assert received == writes


@settings(max_examples=150, deadline=None)
@given(writes=writes, segment_cuts=cuts, legacy=st.booleans())
def test_pull_data_arrives_intact_across_segments(
    writes: list[bytes], segment_cuts: list[int], legacy: bool
) -> None:
    client = pht.ClientChannel(pht.ClientConfig.build("h", authorize=legacy))
    server = pht.ServerConnection()
    server.receive_data(client.pull("tok"))
    assert drain(server) == [pht.PullRequest(token="tok")]
    wire = server.start_pull()
    for data in writes:
        wire += server.send_pull_data(data)
        wire += server.send_heartbeat()
    wire += server.end_pull()
    got: list[object] = []
    for piece in cut(wire, segment_cuts):
        client.receive_data(piece)
        got += drain(client)
    data = b"".join(e.data for e in got if isinstance(e, pht.DataReceived))
    assert data == b"".join(writes)
    assert got[0] == pht.PullStarted()
    assert got[-1] == pht.PullEnded(session_over=not legacy)


@settings(max_examples=150, deadline=None)
@given(writes=writes, chunk_sizes=cuts, segment_cuts=cuts)
def test_pull_lines_reassemble_across_any_http_chunking(
    writes: list[bytes], chunk_sizes: list[int], segment_cuts: list[int]
) -> None:
    """GOST cuts its chunks anywhere (2048 bytes); any chunking must work."""
    body = b"".join(pht.encode_line(data) for data in writes)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in cut(body, chunk_sizes))
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
    client = pht.ClientChannel(pht.ClientConfig.build("h", authorize=False))
    client.pull("tok")
    got: list[object] = []
    for piece in cut(wire, segment_cuts):
        client.receive_data(piece)
        got += drain(client)
    assert b"".join(e.data for e in got if isinstance(e, pht.DataReceived)) == b"".join(writes)
    assert got[-1] == pht.PullEnded(session_over=True)


@settings(max_examples=200, deadline=None)
@given(garbage=st.binary(max_size=600), segment_cuts=cuts)
def test_server_connection_survives_garbage(garbage: bytes, segment_cuts: list[int]) -> None:
    """Only pht's own errors escape, and a status can always be answered."""
    server = pht.ServerConnection(max_push_line=256, max_header_size=512)
    for piece in cut(garbage, segment_cuts):
        try:
            server.receive_data(piece)
            event = server.next_event()
        except pht.RemoteProtocolError as exc:
            status = exc.status_hint
            assert 400 <= status < 500
            assert server.send_status(status).startswith(b"HTTP/1.1 4")
            return
        if event is not pht.NEED_DATA:
            server.send_status(400)
            if server.state is pht.ServerConnectionState.CLOSED:
                return
