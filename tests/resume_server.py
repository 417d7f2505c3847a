"""A small scripted resume server for the client's tests (h11 and the sans-IO pieces).

It follows ``docs/resume.md`` with :class:`pht._resume.ServerResume` doing the
offset rules, and echoes what each session's pushes deliver into its
downstream (its replay buffer), so a client can check that every byte came
back once, in order, whatever connections were cut on the way. It is no
production server: one task per connection, no timeouts, no grace expiry
(a test that needs a ``410`` sets :attr:`ResumeServer.gone`).
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from pht._codec import decode_line, encode_line
from pht._resume import (
    GoneReason,
    OffsetGap,
    RequestFields,
    ResponseFields,
    ResumeConflict,
    ResumeSettings,
    ServerResume,
)

LINE = 32 * 1024


@dataclass
class _Session:
    resume: ServerResume
    changed: trio.Event = field(default_factory=trio.Event)
    pull: int = 0  # generation of the current pull: an older one ends
    turn: trio.Lock = field(default_factory=trio.Lock)
    upstream: bytearray = field(default_factory=bytearray)

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class ResumeServer:
    """Serve resume sessions on connections handed to :meth:`handle`."""

    def __init__(self, *, window: int = 4 * 1024 * 1024, grace: int = 10) -> None:
        self.settings = ResumeSettings(window=window, grace=grace)
        self.sessions: dict[str, _Session] = {}
        #: Why a token has no session (else ``unknown``).
        self.gone: dict[str, GoneReason] = {}
        #: Every session's upstream, in order, as delivered (kept after the end).
        self.delivered: dict[str, bytearray] = {}
        #: Requests seen: (method, path, PHT-* headers).
        self.requests: list[tuple[str, str, dict[bytes, bytes]]] = []

    async def handle(self, stream: trio.abc.Stream) -> None:
        try:
            await self._serve(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request, body = await self._read_request(conn, stream)
            if request is None:
                return
            target = urlsplit(request.target.decode("ascii"))
            token = parse_qs(target.query).get("token", [""])[0]
            pht = {name: value for name, value in request.headers if name.startswith(b"pht-")}
            self.requests.append((request.method.decode(), target.path, pht))
            fields = RequestFields.from_headers(request.headers)
            if request.method == b"GET":
                await self._pull(conn, stream, token, fields)
            else:
                status, headers = await self._push(token, fields, body)
                await self._answer(conn, stream, status, headers)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    @staticmethod
    async def _read_request(
        conn: h11.Connection, stream: trio.abc.Stream
    ) -> tuple[h11.Request | None, bytes]:
        request = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            else:  # ConnectionClosed
                return None, b""

    @staticmethod
    async def _answer(
        conn: h11.Connection,
        stream: trio.abc.Stream,
        status: int,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        head = [*headers, (b"Content-Length", b"0")]
        data = conn.send(h11.Response(status_code=status, headers=head))
        data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        await stream.send_all(data)

    def _gone(self, token: str) -> tuple[int, list[tuple[bytes, bytes]]]:
        reason = self.gone.get(token, GoneReason.UNKNOWN)
        return 410, ResponseFields.gone_headers(reason)

    def _end(self, token: str, reason: GoneReason) -> None:
        session = self.sessions.pop(token, None)
        self.gone[token] = reason
        if session is not None:
            session.pull += 1
            session.notify()

    async def _pull(
        self, conn: h11.Connection, stream: trio.abc.Stream, token: str, fields: RequestFields
    ) -> None:
        session = self.sessions.get(token)
        try:
            if fields.ack is None and session is None:
                resume = ServerResume.negotiate(self.settings, fields)
                assert resume is not None, "the scripted server serves resume sessions only"
                session = self.sessions[token] = _Session(resume)
                self.delivered[token] = session.upstream
            elif session is None:
                await self._answer(conn, stream, *self._gone(token))
                return
            headers = session.resume.attach(fields.ack)
        except ResumeConflict:
            await self._answer(conn, stream, 409, [])
            return
        session.pull += 1
        session.notify()  # the older pull ends
        mine = session.pull
        head = [*headers, (b"Transfer-Encoding", b"chunked")]
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=head)) or b"")
        resume = session.resume
        while session.pull == mine:
            if resume.done:
                self._end(token, GoneReason.CLOSED)
                break
            data = resume.next_line(LINE)
            if data:
                await stream.send_all(conn.send(h11.Data(data=encode_line(data))) or b"")
                session.notify()
                continue
            if resume.end is not None:
                break  # everything sent: the client polls again and learns PHT-End
            await session.changed.wait()
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    async def _push(
        self, token: str, fields: RequestFields, body: bytes
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        session = self.sessions.get(token)
        if session is None:
            return self._gone(token) if fields.ack is not None else (403, [])
        resume = session.resume
        if fields.ack is None or fields.offset is None:
            self._end(token, GoneReason.ABORTED)
            return 400, []
        resume.apply_ack(fields.ack)
        session.notify()
        if resume.done:
            self._end(token, GoneReason.CLOSED)
            return 200, resume.received_headers()
        if not body:  # the close notification
            try:
                resume.close(fields.offset)
            except OffsetGap:
                return 409, resume.received_headers()
            self._end(token, GoneReason.CLOSED)
            return 200, resume.received_headers()
        if body == b"\n":  # ack-only: answered at once
            return 200, resume.received_headers()
        async with session.turn:
            try:
                part = resume.push(fields.offset, decode_line(body.rstrip(b"\n")))
            except OffsetGap:
                return 409, resume.received_headers()
            session.upstream += part
            view = memoryview(bytes(part))
            while view.nbytes:  # echo, as the replay buffer has room
                taken = resume.write(view)
                view = view[taken:]
                session.notify()
                if view.nbytes:
                    await session.changed.wait()
            return 200, resume.received_headers()


async def serve_resume(
    nursery: trio.Nursery, server: ResumeServer, context: ssl.SSLContext | None = None
) -> int:
    """Serve ``server`` on a free loopback port (TLS with ``context``); return the port."""

    async def handler(stream: trio.SocketStream) -> None:
        if context is None:
            await server.handle(stream)
            return
        tls = trio.SSLStream(stream, context, server_side=True)
        await server.handle(tls)

    serve = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
    listeners = await nursery.start(serve)
    port: int = listeners[0].socket.getsockname()[1]
    return port
