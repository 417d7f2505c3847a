"""GOST's conformance transcripts against every server adapter and every client adapter.

Server side: GOST's captured requests (``modern_raw_http.txt`` and
``legacy_raw_http.txt``, replayed as ``test_conformance_server.py`` replays
them against ``serve_pht``) and the exact bytes GOST's modern client sent
(``modern_go_client_wire.txt``) go to the trio, asyncio, uvloop and
uvicorn (PHTApp) servers; every one must give the trio server's answers.

Client side: a scripted GOST server, both generations, answers as the
captures show (legacy: authorize, pulls that end after a heartbeat, 403 for
a session it forgot; modern: the client's own token, a pull kept open with
heartbeats, the end of the pull is the end of the session). Every client
adapter must send the requests GOST's own client sent, and read the
endings as the trio client does: 403 on a re-poll is EOF, 410 is an error.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
import trio

import pht

from . import test_conformance_server as replay
from .adapters import (
    CLIENT_ADAPTERS,
    GUARD,
    SERVER_ADAPTERS,
    Client,
    Endpoint,
    ServerSet,
    Spec,
    TunnelBroken,
    run_client,
)
from .test_conformance_client import parse_request
from .test_hardening_support import RawClient
from .transcripts import wire_pieces

pytestmark = pytest.mark.slow


# --- GOST's clients against every server adapter ----------------------------------------


@pytest.fixture(params=SERVER_ADAPTERS, ids=lambda name: f"server={name}")
def gost_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerSet]:
    """GOST's echo target of the captures (heartbeats every 0.2 s), served at the root."""
    spec = Spec("gost", "gost", mount="", options={"heartbeat_interval": 0.2})
    started = ServerSet(request.param, [spec], directory=tmp_path)
    yield started
    started.stop()


async def test_gost_requests_get_the_reference_answers(gost_target: ServerSet) -> None:
    await replay.test_replay_modern_capture(gost_target["gost"].port)


async def test_legacy_gost_requests_get_the_reference_statuses(gost_target: ServerSet) -> None:
    await replay.test_replay_legacy_capture_statuses(gost_target["gost"].port)


async def test_modern_gost_client_bytes_get_the_reference_answers(gost_target: ServerSet) -> None:
    """The bytes GOST's modern client sent, on its two connections, as it sent them."""
    pieces = [p for p in wire_pieces("modern_go_client_wire.txt") if p.direction == "C>S"]
    gost_answers = [p for p in wire_pieces("modern_go_client_wire.txt") if p.direction == "S>C"]
    assert [p.connection for p in pieces] == [1, 2, 2, 2]
    port = gost_target["gost"].port
    with trio.fail_after(GUARD):
        puller, pusher = await RawClient.connect(port), await RawClient.connect(port)
        await puller.send(pieces[0].data)
        head = await puller.head()
        assert head.status == 200
        assert head.headers[b"x-accel-buffering"] == b"no"
        assert head.headers[b"transfer-encoding"] == b"chunked"
        assert b"X-Accel-Buffering: no" in gost_answers[0].data
        pulled: list[bytes] = []

        async def next_data_line() -> bytes:
            """The next line that is not a heartbeat; ``b""`` when the pull ended."""
            buffer = b""
            while True:
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    pulled.append(line)
                    if line:
                        assert not buffer  # GOST writes one line per read
                        return line + b"\n"
                chunk = await puller.chunk()
                if not chunk:
                    assert not buffer
                    return b""
                buffer += chunk

        for push, line in ((pieces[1], b"aGVsbG8K\n"), (pieces[2], b"YWdhaW4K\n")):
            await pusher.send(push.data)
            answer = await pusher.response()
            assert (answer.status, answer.headers[b"content-length"], answer.body) == (
                200,
                b"0",
                b"",
            )
            assert await next_data_line() == line
        # The close notification (an empty POST): 200, and the pull's end.
        await pusher.send(pieces[3].data)
        assert (await pusher.response()).status == 200
        assert await next_data_line() == b""
        await puller.aclose()
        await pusher.aclose()


# --- every client adapter against a scripted GOST server --------------------------------


@dataclass
class _Session:
    lines: list[bytes] = field(default_factory=list)
    ending: bool = False
    gone_status: int | None = None
    then_status: int = 403
    pulls: int = 0
    changed: trio.Event = field(default_factory=trio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


@dataclass(frozen=True)
class Seen:
    """One request as the scripted server saw it (the token replaced by ``T``)."""

    method: bytes
    target: bytes
    content_length: bytes | None
    body: bytes
    x_test: bytes | None
    host: bytes | None = field(default=None, compare=False)


class ScriptedGost:
    """GOST's server of generation ``legacy`` or ``modern``, scripted after the captures.

    It echoes pushed lines on the pull. A push of ``!bye`` (legacy:
    ``!bye403`` / ``!bye410``) makes it write ``bye`` and end the pull and
    the session; a legacy session then answers later pulls with that status.
    Legacy pulls end after a heartbeat (GOST's idle timeout, without the
    wait): the first one at once, later ones after the lines they carried.
    """

    def __init__(self, generation: str) -> None:
        self.generation = generation
        self.sessions: dict[str, _Session] = {}
        self.seen: dict[str, list[Seen]] = {}
        self._issued = 0
        self._lock = threading.Lock()

    def requests(self, token: str) -> list[Seen]:
        with self._lock:
            return list(self.seen.get(token, []))

    def _record(self, token: str, request: h11.Request, body: bytes) -> None:
        headers = dict(request.headers)
        target = request.target.replace(token.encode(), b"T") if token else request.target
        with self._lock:
            self.seen.setdefault(token, []).append(
                Seen(
                    request.method,
                    target,
                    headers.get(b"content-length"),
                    body,
                    headers.get(b"x-test"),
                    headers.get(b"host"),
                )
            )

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await self._read(conn, stream)
                if request is None:
                    return
                await self._answer(conn, stream, request, body)
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def _read(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> tuple[h11.Request | None, bytes]:
        request: h11.Request | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data and request is None:
                    return None, b""
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, body
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send(
        self, conn: h11.Connection, stream: trio.SocketStream, *events: h11.Event
    ) -> None:
        out = b"".join(conn.send(event) or b"" for event in events)
        await stream.send_all(out)

    async def _status(self, conn: h11.Connection, stream: trio.SocketStream, code: int) -> None:
        head = h11.Response(status_code=code, headers=[("Content-Length", "0")])
        await self._send(conn, stream, head, h11.EndOfMessage())

    async def _answer(
        self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, body: bytes
    ) -> None:
        url = urlsplit(request.target.decode())
        token = parse_qs(url.query).get("token", [""])[0]
        if url.path == "/authorize":
            self._issued += 1
            token = f"{self.generation[:6]}{self._issued:014d}"
            self.sessions[token] = _Session()
            self._record(token, request, body)
            answer = f"token={token}".encode()
            head = h11.Response(
                status_code=200,
                headers=[
                    ("Content-Length", str(len(answer))),
                    ("Content-Type", "text/plain; charset=utf-8"),
                ],
            )
            await self._send(conn, stream, head, h11.Data(data=answer), h11.EndOfMessage())
            return
        self._record(token, request, body)
        session = self.sessions.get(token)
        if session is None:
            if self.generation == "legacy":
                await self._status(conn, stream, 403)
                return
            session = self.sessions[token] = _Session()
        if url.path == "/push":
            await self._push(conn, stream, session, body)
        else:
            await self._pull(conn, stream, session)

    async def _push(
        self, conn: h11.Connection, stream: trio.SocketStream, session: _Session, body: bytes
    ) -> None:
        if not body:  # the close notification
            session.ending = True
        else:
            data = base64.b64decode(body.split(b"\n", 1)[0])
            if data.startswith(b"!bye"):
                session.lines.append(pht.encode_line(b"bye"))
                session.ending = True
                session.then_status = int(data[4:] or b"403")
            else:
                session.lines.append(pht.encode_line(data))
        session.notify()
        await self._status(conn, stream, 200)

    async def _pull(
        self, conn: h11.Connection, stream: trio.SocketStream, session: _Session
    ) -> None:
        if session.gone_status is not None:
            await self._status(conn, stream, session.gone_status)
            return
        session.pulls += 1
        head = h11.Response(
            status_code=200,
            headers=[("X-Accel-Buffering", "no"), ("Transfer-Encoding", "chunked")],
        )
        await self._send(conn, stream, head)
        legacy = self.generation == "legacy"
        if legacy and session.pulls == 1:
            await self._send(conn, stream, h11.Data(data=b"\n"), h11.EndOfMessage())
            return
        if not legacy:
            await self._send(conn, stream, h11.Data(data=b"\n"))  # a heartbeat, kept open
        while True:
            while not session.lines and not session.ending:
                await session.changed.wait()
            if session.lines:
                lines, session.lines = b"".join(session.lines), []
                await self._send(conn, stream, h11.Data(data=lines))
            if session.ending:
                session.gone_status = session.then_status
                await self._send(conn, stream, h11.EndOfMessage())
                return
            if legacy:  # idle: a heartbeat, and the response ends
                await self._send(conn, stream, h11.Data(data=b"\n"), h11.EndOfMessage())
                return


class ScriptedServers:
    """Both generations' scripted servers, in a thread under ``trio.run``."""

    def __init__(self) -> None:
        self.servers = {name: ScriptedGost(name) for name in ("legacy", "modern")}
        self.ports: dict[str, int] = {}
        ready = threading.Event()
        self._state: dict[str, object] = {}

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                self._state["token"] = trio.lowlevel.current_trio_token()
                self._state["scope"] = nursery.cancel_scope
                for name, server in self.servers.items():
                    listeners = await nursery.start(trio.serve_tcp, server.serve, 0)
                    self.ports[name] = listeners[0].socket.getsockname()[1]
                ready.set()

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
        self._thread.start()
        assert ready.wait(GUARD), "the scripted GOST servers did not start"

    def endpoint(self, generation: str) -> Endpoint:
        return Endpoint("gost-" + generation, self.ports[generation], "", False, {})

    def stop(self) -> None:
        scope = self._state["scope"]
        assert isinstance(scope, trio.CancelScope)
        token = self._state["token"]
        assert isinstance(token, trio.lowlevel.TrioToken)
        trio.from_thread.run_sync(scope.cancel, trio_token=token)
        self._thread.join(GUARD)


@pytest.fixture(scope="module")
def gost() -> Iterator[ScriptedServers]:
    servers = ScriptedServers()
    yield servers
    servers.stop()


@pytest.fixture(params=CLIENT_ADAPTERS, ids=lambda name: f"client={name}")
def client(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def gost_client_requests(capture: str, token: str) -> list[Seen]:
    """What GOST's own client sent in ``capture``, as :class:`Seen` records."""
    seen = []
    for piece in wire_pieces(capture):
        if piece.direction == "C>S":
            request, body = parse_request(piece.data)
            headers = dict(request.headers)
            target = request.target.replace(token.encode(), b"T")
            seen.append(
                Seen(
                    request.method,
                    target,
                    headers.get(b"content-length"),
                    body,
                    headers.get(b"x-test"),
                )
            )
    return seen


@pytest.mark.parametrize("generation", ["legacy", "modern"])
def test_the_client_sends_what_gost_client_sent(
    client: str, gost: ScriptedServers, generation: str
) -> None:
    """The captures' session: hello, echo, (idle), again, echo, close."""

    async def scenario(client: Client) -> tuple[str, list[bytes]]:
        tunnel = await client.open(
            gost.endpoint(generation), authorize=generation == "legacy", headers={"X-Test": "abc"}
        )
        echoes = []
        for line in (b"hello\n", b"again\n"):
            await tunnel.send(line)
            echoes.append(await tunnel.receive_exactly(len(line)))
        await tunnel.close()
        return tunnel.token, echoes

    token, echoes = run_client(client, scenario)
    assert echoes == [b"hello\n", b"again\n"]
    seen = gost.servers[generation].requests(token)
    capture = f"{generation}_go_client_wire.txt"
    gost_token = "nqirv7vovj4duofe4n00" if generation == "legacy" else "0jlvkbo4h2ijdbnmiu20"
    theirs = gost_client_requests(capture, gost_token)
    assert all(request.x_test == b"abc" for request in seen), seen  # on every request
    pushes = [request for request in seen if request.method == b"POST"]
    gost_pushes = [request for request in theirs if request.method == b"POST"]
    others = {request for request in seen if request.method != b"POST"}
    if generation == "legacy":
        # Authorize first; pulls as GOST's (the re-poll after the heartbeat);
        # GOST's legacy client never sends the close notification, pht does.
        assert seen[0] == theirs[0]
        assert others == {request for request in theirs if request.method != b"POST"}
        assert pushes == [*gost_pushes, Seen(b"POST", b"/push?token=T", b"0", b"", b"abc")]
    else:
        # The client's own token, no authorize; the pushes and the close notification.
        assert others == {request for request in theirs if request.method != b"POST"}
        assert pushes == gost_pushes
        assert gost_pushes[-1].content_length == b"0"


@pytest.mark.parametrize(
    ("generation", "command", "ending"),
    [
        ("legacy", b"!bye403", "eof"),
        ("legacy", b"!bye410", "410"),
        ("modern", b"!bye", "eof"),
    ],
    ids=["legacy-403-is-eof", "legacy-410-is-an-error", "modern-end-of-pull-is-eof"],
)
def test_the_end_of_a_gost_session(
    client: str, gost: ScriptedServers, generation: str, command: bytes, ending: str
) -> None:
    async def scenario(client: Client) -> tuple[bytes, str]:
        tunnel = await client.open(gost.endpoint(generation), authorize=generation == "legacy")
        await tunnel.send(command)
        received = await tunnel.receive_exactly(3)
        try:
            rest = await tunnel.receive()
        except TunnelBroken as exc:
            outcome = str(exc.status)
        else:
            outcome = "eof" if rest == b"" else f"data {rest!r}"
        await tunnel.close()
        return received, outcome

    assert run_client(client, scenario) == (b"bye", ending)


# --- byte for byte: every server adapter answers as the trio server ----------------------

PROBE = "parityprobe000000001"


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while piece := sock.recv(65536):
        data += piece
    return data


def _normal(answer: bytes, token: str) -> list[bytes]:
    """Status code, headers (lower-case names, no Date/Server: the ASGI server's) and body.

    The reason phrase is left out here (see the next test), and the token is ``T``.
    """
    head, _, body = answer.replace(token.encode(), b"T").partition(b"\r\n\r\n")
    status, *header_lines = head.split(b"\r\n")
    headers = [
        name.lower() + b":" + value.strip()
        for name, _, value in (line.partition(b":") for line in header_lines)
        if name.lower() not in (b"date", b"server")
    ]
    return [status.split(b" ")[1], *headers, b"", body]


def _conversation(port: int) -> list[list[bytes]]:
    """A session's requests, and GOST's refusals, in raw HTTP; each answer normalised."""

    def once(request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as sock:
            sock.sendall(request)
            return _read_all(sock)

    def push(token: str, body: bytes) -> bytes:
        return (
            b"POST /push?token=%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (token.encode(), len(body), body)
        )

    def pull(token: str) -> bytes:
        return b"GET /pull?token=%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % (
            token.encode()
        )

    answers = []
    issued = once(b"GET /authorize HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    token = issued.rpartition(b"token=")[2].decode()
    answers.append(_normal(issued, token))
    answers.append(_normal(once(push(PROBE, b"aGk=\n")), PROBE))  # the echo waits for the pull
    with socket.create_connection(("127.0.0.1", port), timeout=GUARD) as puller:
        puller.sendall(pull(PROBE))
        first = b""
        while not first.endswith(b"aGk=\n\r\n"):
            first += puller.recv(65536)
        answers.append(_normal(once(push(PROBE, b"")), PROBE))  # the close notification
        answers.append(_normal(first + _read_all(puller), PROBE))
    answers.append(_normal(once(pull(PROBE)), PROBE))  # closed for good: 403
    answers.append(_normal(once(push(token, b"not base64!\n")), token))  # 400
    answers.append(_normal(once(pull(token)), token))  # that closed it: 403
    for request in (
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /push?token=a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /pull?token=a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n",
    ):
        answers.append(_normal(once(request), PROBE))
    return answers


@pytest.fixture(scope="module")
def trio_reference(tmp_path_factory: pytest.TempPathFactory) -> list[list[bytes]]:
    reference = ServerSet("trio", [Spec("echo", mount="")], directory=tmp_path_factory.mktemp("r"))
    try:
        return _conversation(reference["echo"].port)
    finally:
        reference.stop()


@pytest.mark.parametrize("adapter", SERVER_ADAPTERS[1:], ids=lambda name: f"server={name}")
def test_answers_are_byte_for_byte_the_trio_servers(
    adapter: str, trio_reference: list[list[bytes]], tmp_path: Path
) -> None:
    servers = ServerSet(adapter, [Spec("echo", mount="")], directory=tmp_path)
    try:
        answers = _conversation(servers["echo"].port)
    finally:
        servers.stop()
    assert [answer[0] for answer in trio_reference] == [
        b"200",
        b"200",
        b"200",
        b"200",
        b"403",
        b"400",
        b"403",
        b"404",
        b"400",
        b"400",
    ]
    assert answers == trio_reference


@pytest.mark.parametrize(
    "adapter",
    [
        "trio",
        "asyncio",
        "uvloop",
        "uvicorn",
    ],
    ids=lambda name: f"server={name}",
)
def test_the_pull_status_line_is_gosts(adapter: str, tmp_path: Path) -> None:
    gost_pull_answer = wire_pieces("modern_go_client_wire.txt")[1]
    assert gost_pull_answer.direction == "S>C"
    gost_status_line = gost_pull_answer.data.split(b"\r\n", 1)[0]
    servers = ServerSet(adapter, [Spec("echo", mount="")], directory=tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", servers["echo"].port), timeout=GUARD) as sock:
            sock.sendall(b"GET /pull?token=%s HTTP/1.1\r\nHost: x\r\n\r\n" % PROBE.encode())
            status_line = sock.makefile("rb").readline().rstrip(b"\r\n")
    finally:
        servers.stop()
    assert status_line == gost_status_line == b"HTTP/1.1 200 OK"


@pytest.mark.parametrize("generation", ["legacy", "modern"])
def test_host_header_is_gosts_host_option(
    client: str, gost: ScriptedServers, generation: str
) -> None:
    """GOST's client ``host`` option: the Host header of every request, the server unchanged."""

    async def scenario(client: Client) -> str:
        tunnel = await client.open(
            gost.endpoint(generation),
            authorize=generation == "legacy",
            host_header="tunnel.example:8443",
        )
        await tunnel.send(b"hi")
        assert await tunnel.receive_exactly(2) == b"hi"
        await tunnel.close()
        return tunnel.token

    token = run_client(client, scenario)
    hosts = {request.host for request in gost.servers[generation].requests(token)}
    assert hosts == {b"tunnel.example:8443"}


@pytest.mark.parametrize("generation", ["legacy", "modern"])
def test_through_a_forward_proxy_every_request_is_absolute_form(
    client: str, gost: ScriptedServers, generation: str
) -> None:
    """``proxy=``: the requests go to the proxy (here the scripted server) in absolute form."""
    proxy = gost.endpoint(generation)

    async def scenario(client: Client) -> str:
        target = Endpoint("via-proxy", 18702, "", False, {})
        tunnel = await client.open(
            target,
            host="gost.example",
            authorize=generation == "legacy",
            proxy=f"http://127.0.0.1:{proxy.port}",
        )
        await tunnel.send(b"hi")
        assert await tunnel.receive_exactly(2) == b"hi"
        await tunnel.close()
        return tunnel.token

    token = run_client(client, scenario)
    seen = gost.servers[generation].requests(token)
    assert len(seen) >= 3  # (authorize,) pull, push, close notification
    assert {request.target.split(b"?")[0] for request in seen} <= {
        b"http://gost.example:18702/authorize",
        b"http://gost.example:18702/pull",
        b"http://gost.example:18702/push",
    }
    assert {request.host for request in seen} == {b"gost.example:18702"}
