"""The resume extension on every server adapter, driven by a hand-written HTTP client.

Each server adapter (trio, asyncio, uvloop, PHTApp under uvicorn) is started
once per module with a few endpoints; the tests speak the extension
(docs/resume.md) over real loopback sockets with :mod:`tests.raw_http`:
negotiation, offsets and duplicates on pushes, ``409`` for a gap, a pull cut
mid-stream and re-attached with ``PHT-Ack`` (the replay byte for byte), the
replay window's back-pressure, ``PHT-End`` and ``410`` with ``PHT-Gone``. A
client that offers nothing (GOST's) must see no ``PHT-*`` header at all.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator

import pytest

from .adapters import SERVER_ADAPTERS, Endpoint, ServerSet, Spec
from .parity_site import payload
from .raw_http import RawPull, raw_push, resume_headers

SOURCE_SIZE = 300_000
WINDOW = 64 * 1024

SPECS = [
    Spec("echo"),
    Spec("source", behaviour="source", size=SOURCE_SIZE, options={"resume_window": WINDOW}),
    Spec("legacy", options={"legacy_grace": True}),
    Spec("plain", options={"resume": False}),
    Spec("bounded", options={"pull_max_bytes": 100_000, "pull_max_ms": 100}),
]

OFFER = [("PHT-Resume", "1")]


@pytest.fixture(scope="module", params=SERVER_ADAPTERS, ids=lambda name: f"server={name}")
def servers(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerSet]:
    started = ServerSet(request.param, SPECS, directory=tmp_path_factory.mktemp(request.param))
    yield started
    started.stop()


def new_token() -> str:
    return secrets.token_hex(16)


def push(
    endpoint: Endpoint, token: str, data: bytes | None, offset: int, ack: int
) -> tuple[int, dict[bytes, bytes]]:
    headers = [*OFFER, ("PHT-Offset", str(offset)), ("PHT-Ack", str(ack))]
    return raw_push(endpoint.port, endpoint.path("push"), token, data, headers)


def pull(endpoint: Endpoint, token: str, ack: int | None = None, offer: bool = True) -> RawPull:
    headers = list(OFFER) if offer else []
    if ack is not None:
        headers.append(("PHT-Ack", str(ack)))
    return RawPull(endpoint.port, endpoint.path("pull"), token, headers)


def received(answer: tuple[int, dict[bytes, bytes]]) -> tuple[int, dict[bytes, bytes]]:
    """An answer's status and resume headers."""
    return answer[0], resume_headers(answer[1])


def test_negotiation_offsets_duplicates_and_gaps(servers: ServerSet) -> None:
    endpoint, token = servers["echo"], new_token()
    with pull(endpoint, token) as opening:
        assert opening.status == 200
        assert resume_headers(opening.headers) == {
            b"pht-resume": b"1; window=4194304; grace=60",
            b"pht-offset": b"0",
        }
        assert received(push(endpoint, token, b"abc", 0, 0)) == (200, {b"pht-received": b"3"})
        # A retry of bytes the server has: dropped, answered at once.
        assert received(push(endpoint, token, b"abc", 0, 0)) == (200, {b"pht-received": b"3"})
        # A gap: nothing delivered, the session goes on.
        assert received(push(endpoint, token, b"zz", 10, 0)) == (409, {b"pht-received": b"3"})
        # Overlapping: only the new part is delivered.
        assert received(push(endpoint, token, b"cde", 2, 0)) == (200, {b"pht-received": b"5"})
        assert opening.read(5) == b"abcde"
        # An ack-only push (body "\n") is answered at once.
        assert received(push(endpoint, token, b"", 5, 5)) == (200, {b"pht-received": b"5"})
        # The close notification with everything pushed ends the session.
        assert received(push(endpoint, token, None, 5, 5)) == (200, {b"pht-received": b"5"})
        assert opening.rest() == b""
    # No resurrection: a request with PHT-Ack for the token gets 410 with the reason.
    assert received(push(endpoint, token, None, 5, 5)) == (410, {b"pht-gone": b"closed"})
    with pull(endpoint, token, ack=5) as late:
        assert (late.status, resume_headers(late.headers)) == (410, {b"pht-gone": b"closed"})


def test_close_with_bytes_missing_gets_409(servers: ServerSet) -> None:
    endpoint, token = servers["echo"], new_token()
    with pull(endpoint, token) as opening:
        assert received(push(endpoint, token, b"abc", 0, 0)) == (200, {b"pht-received": b"3"})
        assert received(push(endpoint, token, None, 7, 0)) == (409, {b"pht-received": b"3"})
        assert opening.read(3) == b"abc"  # the session went on
        assert received(push(endpoint, token, None, 3, 3))[0] == 200


def test_cut_pull_is_replayed_from_the_ack_byte_for_byte(servers: ServerSet) -> None:
    """The handler writes more than the window; the client cuts and re-attaches."""
    endpoint, token = servers["source"], new_token()
    expected = payload(SOURCE_SIZE)
    got = bytearray()
    with pull(endpoint, token) as opening:
        assert opening.headers[b"pht-resume"] == b"1; window=65536; grace=60"
        got += opening.read(40_000)  # then the connection is cut: the rest in flight is lost
    acked = len(got)
    while True:
        with pull(endpoint, token, ack=acked) as again:
            assert again.status == 200
            assert int(again.headers[b"pht-offset"]) == acked  # the replay starts at the ack
            end = again.headers.get(b"pht-end")
            while (line := again.line()) is not None:
                got += line
                # The server never holds more than the window beyond what was acked.
                assert len(got) <= acked + WINDOW
                if len(got) - acked >= WINDOW // 2:
                    acked = len(got)
                    answer = push(endpoint, token, b"", 0, acked)  # ack-only
                    assert received(answer) == (200, {b"pht-received": b"0"})
            acked = len(got)
        if end is not None:
            assert int(end) == SOURCE_SIZE
            break
    assert bytes(got) == expected
    # The pull that learnt PHT-End carried PHT-Ack: E, so the session is over.
    with pull(endpoint, token, ack=acked) as late:
        assert (late.status, resume_headers(late.headers)) == (410, {b"pht-gone": b"closed"})


def test_a_client_that_offers_nothing_sees_no_resume_header(servers: ServerSet) -> None:
    endpoint, token = servers["echo"], new_token()
    with pull(endpoint, token, offer=False) as gost:
        status, answer = raw_push(endpoint.port, endpoint.path("push"), token, b"hi")
        assert (status, resume_headers(answer)) == (200, {})
        assert gost.read(2) == b"hi"
        assert b"pht-" not in gost.raw_head.lower()
        # Resume fields for a session negotiated without them: 400, the session goes on.
        assert push(endpoint, token, b"x", 0, 0)[0] == 400
        status, answer = raw_push(endpoint.port, endpoint.path("push"), token, b"on")
        assert (status, resume_headers(answer)) == (200, {})
        assert gost.read(2) == b"on"


def test_a_server_with_resume_off_ignores_the_offer(servers: ServerSet) -> None:
    endpoint, token = servers["plain"], new_token()
    with pull(endpoint, token) as opening:
        assert resume_headers(opening.headers) == {}
        assert received(push(endpoint, token, b"hi", 0, 0)) == (200, {})
        assert opening.read(2) == b"hi"


def test_no_resurrection_and_malformed_headers(servers: ServerSet) -> None:
    endpoint = servers["echo"]
    with pull(endpoint, new_token(), ack=0) as unknown:
        assert (unknown.status, resume_headers(unknown.headers)) == (
            410,
            {b"pht-gone": b"unknown"},
        )
    assert received(push(endpoint, new_token(), b"x", 0, 0)) == (410, {b"pht-gone": b"unknown"})
    token = new_token()
    with pull(endpoint, token) as opening:
        bad = [*OFFER, ("PHT-Offset", "01"), ("PHT-Ack", "0")]
        assert raw_push(endpoint.port, endpoint.path("push"), token, b"x", bad)[0] == 400
        # ... and the session is not affected.
        assert received(push(endpoint, token, b"ok", 0, 0)) == (200, {b"pht-received": b"2"})
        assert opening.read(2) == b"ok"
        # An ack beyond what the server sent: 400, and the session ends.
        assert push(endpoint, token, b"", 2, 999)[0] == 400
        assert opening.rest() == b""
    assert received(push(endpoint, token, b"", 2, 2)) == (410, {b"pht-gone": b"aborted"})


def test_legacy_client_keeps_its_session_across_a_reopened_pull(servers: ServerSet) -> None:
    """With legacy_grace, GOST's client re-opening a dropped pull finds its session."""
    endpoint, token = servers["legacy"], new_token()
    path = endpoint.path("push")
    with pull(endpoint, token, offer=False) as first:
        assert raw_push(endpoint.port, path, token, b"one")[0] == 200
        assert first.read(3) == b"one"
    with pull(endpoint, token, offer=False) as second:
        assert b"pht-" not in second.raw_head.lower()
        assert raw_push(endpoint.port, path, token, b"two")[0] == 200
        assert second.read(3) == b"two"


def test_bounded_pulls_end_after_a_complete_line_and_keep_the_session(servers: ServerSet) -> None:
    endpoint, token = servers["bounded"], new_token()
    with pull(endpoint, token, offer=False) as idle:
        # Nothing to send: at pull_max_ms a heartbeat, then the end of the response.
        assert idle.rest() == b""
        assert idle.ended
    data = payload(300_000, seed=3)
    # The push is answered once the echo took its bytes, which may wait for pulls.
    statuses: list[int] = []
    pusher = threading.Thread(
        target=lambda: statuses.append(
            raw_push(endpoint.port, endpoint.path("push"), token, data)[0]
        )
    )
    pusher.start()
    got = bytearray()
    responses = 0
    while len(got) < len(data):
        with pull(endpoint, token, offer=False) as bounded:
            assert bounded.status == 200
            got += bounded.rest()  # each response ends: the session goes on
            responses += 1
    pusher.join()
    assert statuses == [200]
    assert bytes(got) == data
    assert responses >= 3  # 400,000 bytes of base64 in responses of about 100,000
