"""A third adapter, for tests: client and server session machines joined in memory.

No trio, no sockets: tasks are generators that yield a condition to wait
for, a :class:`World` runs the ones whose condition holds (in an order its
``random`` chooses) and, when none can move, advances its fake clock to the
earliest deadline the machines name. Every HTTP connection the client opens
is a pair of :class:`Pipe` objects that hand bytes over in pieces of the
sizes the world was given. The client and server parts mirror what
``pht._trio_client`` and ``pht._trio_server`` do with the machines' outputs.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from typing import Any

from pht._client import ClientChannel
from pht._client_session import (
    ClientOptions,
    ClientSession,
    Deliver,
    EndOfStream,
    PollAgain,
    SendPull,
)
from pht._errors import PHTError, RemoteProtocolError, TunnelError
from pht._events import (
    NEED_DATA,
    AuthorizeRequest,
    BadRequest,
    ChannelState,
    ClientEvent,
    CloseRequest,
    Heartbeat,
    PullRequest,
    PushData,
    PushRequest,
    ServerConnectionState,
)
from pht._server import ServerConnection
from pht._server_session import Input, PushVerdict, ServerSession, ServerSessions

Task = Generator[Callable[[], bool], None, Any]


class Stuck(Exception):
    """Nothing can move and no deadline is left: the adapters deadlocked."""


class World:
    """Runs tasks and owns the fake clock."""

    def __init__(self, sizes: Iterable[int], rnd: random.Random) -> None:
        self.now = 0.0
        self.sizes = itertools.cycle(list(sizes))
        self.rnd = rnd
        self.tasks: list[list[Any]] = []
        self.deadlines: list[Callable[[], float]] = []

    def spawn(self, task: Task) -> None:
        self.tasks.append([task, None])

    def sleep_until(self, when: float, condition: Callable[[], bool] = lambda: False) -> Task:
        """Wait until ``condition`` holds or the clock reaches ``when``."""
        self.deadlines.append(lambda: when)
        yield lambda: condition() or self.now >= when

    def run(self, until: Callable[[], bool], max_rounds: int = 100_000) -> None:
        for _ in range(max_rounds):
            if until():
                return
            ready = [t for t in self.tasks if t[1] is None or t[1]()]
            if not ready:
                due = min((t for d in self.deadlines if (t := d()) > self.now), default=math.inf)
                if due == math.inf:
                    raise Stuck(f"no task can move at t={self.now}")
                self.now = due
                continue
            self.rnd.shuffle(ready)
            for entry in ready:
                if entry[1] is not None and not entry[1]():
                    continue  # an earlier task of this round took what it waited for
                try:
                    entry[1] = next(entry[0])
                except StopIteration:
                    self.tasks.remove(entry)
        raise Stuck("too many rounds")


class Pipe:
    """One direction of a connection: bytes out in pieces of the world's sizes."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.buffer = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        if not self.closed:  # the reader hung up: the bytes are lost, as on a socket
            self.buffer += data

    def readable(self) -> bool:
        return bool(self.buffer) or self.closed

    def read(self) -> bytes:
        size = next(self.world.sizes)
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data


# --- the client --------------------------------------------------------------------


class ClientConn:
    """One HTTP connection of the client (as ``_trio_client._Connection``)."""

    def __init__(self, client: Client) -> None:
        self.world = client.world
        self.channel = ClientChannel(client.options.config, push_window=max(2, client.window))
        self.up, self.down = Pipe(self.world), Pipe(self.world)
        self.last_used = self.world.now
        self.closed = False
        client.connections.append(self)
        client.server.accept(self)

    def reusable(self) -> bool:
        if self.channel.state is not ChannelState.IDLE:
            return False
        if self.down.readable():
            self.channel.receive_data(self.down.read())
        return self.channel.reusable(self.world.now - self.last_used)

    def send(self, pieces: bytes | list[bytes]) -> None:
        self.last_used = self.world.now
        for piece in [pieces] if isinstance(pieces, bytes) else pieces:
            self.up.write(piece)

    def next_event(self) -> Generator[Callable[[], bool], None, ClientEvent]:
        while True:
            if self.closed:
                raise TunnelError("stream was closed")
            event = self.channel.next_event()
            if event is not NEED_DATA:
                self.last_used = self.world.now
                assert not isinstance(event, type(NEED_DATA))
                return event
            if self.closed or self.channel.state in (ChannelState.CLOSED, ChannelState.ERROR):
                raise TunnelError("connection to the PHT server is closed")
            yield lambda: self.down.readable() or self.closed
            if self.closed:
                raise TunnelError("stream was closed")
            self.channel.receive_data(self.down.read())

    def close(self) -> None:
        self.closed = True
        self.up.closed = True
        self.down.closed = True


class Client:
    """The client side: a session, its connections, and the application's stream."""

    def __init__(self, world: World, server: Server, options: ClientOptions) -> None:
        self.world, self.server, self.options = world, server, options
        self.window = options.push_window
        self.session = ClientSession(options)
        self.connections: list[ClientConn] = []
        self.received = bytearray()
        self.heartbeats = 0
        self.eof = False
        self.closing = False
        self.error: TunnelError | None = None
        self.pull: ClientConn | None = None
        self.push: ClientConn | None = None

    def open(self) -> Task:
        """``open_pht_stream``: the handshake, as the session says."""
        session = self.session
        pull = ClientConn(self)
        action: object = session.start()
        if action is None:
            pull.send(pull.channel.authorize())
            action = session.pull_event((yield from pull.next_event()))
            if not pull.reusable():
                pull.close()
                pull = ClientConn(self)
        assert isinstance(action, SendPull)
        pull.send(pull.channel.pull(action.token))
        session.pull_event((yield from pull.next_event()))
        self.pull, self.push = pull, ClientConn(self)

    def reader(self) -> Task:
        """``receive_some`` in a loop: everything the pull delivers, then EOF or an error."""
        session = self.session
        try:
            while True:
                assert self.pull is not None
                try:
                    event = yield from self.pull.next_event()
                except PHTError as exc:
                    if self.pull.closed:  # our own aclose: "stream was closed"
                        return
                    raise session.pull_failed(exc) from exc
                if self.closing:
                    # receive_some during aclose: "stream was closed". The
                    # machine (CLOSED) refuses pull events as a misuse.
                    return
                if isinstance(event, Heartbeat):
                    self.heartbeats += 1
                action = session.pull_event(event)
                if isinstance(action, Deliver):
                    self.received += action.data
                elif isinstance(action, EndOfStream):
                    self.eof = True
                    return
                elif isinstance(action, PollAgain):
                    if not self.pull.reusable():
                        self.pull.close()
                        self.pull = ClientConn(self)
                    self.pull.send(self.pull.channel.pull(action.token))
        except TunnelError as exc:
            self.error = exc

    def send_all(self, data: bytes) -> Task:
        session = self.session
        if session.send_error is not None:
            raise session.send_error
        size = session.options.max_push_size
        window = session.push_window_for(len(data))
        push = self.push
        if push is not None and session.should_settle(
            push.channel.pushes_in_flight, self.world.now - push.last_used
        ):
            yield from self.collect_acks(0)
        for start in range(0, len(data), size):
            yield from self.collect_acks(window - 1)
            push = self.push_connection()
            push.send(push.channel.push(session.token or "", data[start : start + size]))
        yield from self.collect_acks(session.options.push_window - 1)
        if self.push is not None:
            session.write_returned(self.push.channel.pushes_in_flight)

    def collect_acks(self, keep: int) -> Task:
        push = self.push
        while push is not None and push.channel.pushes_in_flight > keep:
            try:
                event = yield from push.next_event()
            except PHTError as exc:
                self.push = None
                raise self.session.push_failed(f"push failed: {exc}") from exc
            channel = push.channel
            try:
                done = self.session.push_answer(
                    event,
                    closed=channel.state is ChannelState.CLOSED,
                    still_in_flight=channel.pushes_in_flight,
                )
            except TunnelError:
                self.push = None
                push.close()
                raise
            if done:
                self.push = None
                push.close()
                return

    def push_connection(self) -> ClientConn:
        push = self.push
        if push is not None and push.channel.state is ChannelState.IDLE and not push.reusable():
            push.close()
            self.push = None
        if self.push is None:
            self.push = ClientConn(self)
        return self.push

    def aclose(self) -> Task:
        """``aclose``: collect due acknowledgements, notify the server, hang up."""
        self.closing = True
        refused = None
        try:
            yield from self.collect_acks(0)
        except TunnelError as exc:
            refused = exc
        if self.session.close(pushes_settled=refused is None):
            push = self.push
            if push is None or not push.reusable():
                push = ClientConn(self)
            push.send(push.channel.close_session(self.session.token or ""))
            try:
                yield from push.next_event()
            except PHTError:
                pass
        for connection in self.connections:
            connection.close()
        if refused is not None:
            raise refused


# --- the server --------------------------------------------------------------------


@dataclass(eq=False)
class Stream:
    """A session's handler side (as ``_trio_server._ServerStream``, minus back-pressure)."""

    session: ServerSession[Stream]
    inbound: deque[bytes] = field(default_factory=deque)
    outbound: bytearray = field(default_factory=bytearray)
    handler_closed: bool = False
    finished: bool = False

    def readable(self) -> bool:
        return bool(self.inbound) or self.session.closed or self.handler_closed

    def take(self) -> bytes:
        """What ``receive_some`` returns once :meth:`readable` (``b""``: EOF)."""
        if not self.inbound:
            return b""
        data = self.inbound.popleft()
        self.session.took(len(data))
        return data

    def send_all(self, data: bytes) -> None:
        if self.session.closed:
            raise BrokenPipeError("the PHT client closed the session")
        self.outbound += data

    def aclose(self) -> None:
        self.handler_closed = True
        if not self.outbound:
            self.finished = True

    def take_outbound(self) -> bytes:
        data = bytes(self.outbound)
        self.outbound.clear()
        if self.handler_closed:
            self.finished = True
        return data

    def close_from_client(self) -> None:
        self.outbound.clear()
        self.finished = True


Handler = Callable[[Stream], Task]


class Server:
    """The server side: a session table, a task per connection and per handler."""

    def __init__(
        self,
        world: World,
        sessions: ServerSessions[Stream],
        handler: Handler,
        *,
        legacy_polls: bool = False,
    ) -> None:
        self.world, self.sessions, self.handler = world, sessions, handler
        #: End each long poll after its heartbeat, as legacy GOST servers do.
        self.legacy_polls = legacy_polls
        self.options = sessions.options
        self.refused: list[int] = []
        self.polls = 0
        world.deadlines.append(self.next_deadline)

    def next_deadline(self) -> float:
        due = [r.payload.deadline() for r in self.sessions.registry if r.payload is not None]
        return min(due, default=math.inf)

    def accept(self, link: ClientConn) -> None:
        self.world.spawn(self.serve(link.up, link.down))

    def stream_for(self, token: str) -> Stream | int:
        session = self.sessions.admit(token, self.world.now, "127.0.0.1")
        if isinstance(session, int):
            return session
        if session.handle is None:
            session.handle = Stream(session)
        return session.handle

    def start_handler(self, stream: Stream) -> None:
        self.world.spawn(self.run_handler(stream))

    def run_handler(self, stream: Stream) -> Task:
        yield from self.handler(stream)
        stream.aclose()
        give_up = self.world.now + self.options.push_timeout
        yield from self.world.sleep_until(give_up, lambda: stream.finished)
        stream.session.end(Input.HANDLER_DONE)
        self.end_session(stream)

    def end_session(self, stream: Stream) -> None:
        stream.close_from_client()
        self.sessions.forget(stream.session, self.world.now)

    def refusal(self, conn: ServerConnection, status: int) -> bytes:
        self.refused.append(status)
        return conn.send_status(status)

    def serve(self, up: Pipe, down: Pipe) -> Task:
        """``_serve_requests``: answer one connection's requests until it closes."""
        conn = ServerConnection(self.options.paths)
        while True:
            try:
                event = conn.next_event()
            except RemoteProtocolError as exc:
                down.write(self.refusal(conn, exc.status_hint))
                return
            if event is NEED_DATA:
                if conn.state is not ServerConnectionState.IDLE:
                    return
                if conn.expects_continue:
                    down.write(conn.send_continue())
                yield up.readable
                data = up.read()
                conn.receive_data(data)
                if not data:
                    return
                continue
            if isinstance(event, PushData):
                status = yield from self.deliver(event)
                if status != 200:
                    conn.discard_push(status)
                continue
            if isinstance(event, PushRequest):
                status = yield from self.deliver(event)
                down.write(conn.send_push_ack() if status == 200 else self.refusal(conn, status))
            elif isinstance(event, PullRequest):
                yield from self.pull(up, down, conn, event)
            elif isinstance(event, CloseRequest):
                self.close_token(event.token)
                down.write(conn.send_push_ack())
            elif isinstance(event, AuthorizeRequest):
                token = self.sessions.authorize(self.world.now, "127.0.0.1")
                down.write(
                    conn.send_token(token) if isinstance(token, str) else self.refusal(conn, token)
                )
            elif isinstance(event, BadRequest):
                if event.token is not None:
                    self.close_token(event.token)
                down.write(self.refusal(conn, event.status_code))
            if conn.state is ServerConnectionState.CLOSED:
                return

    def close_token(self, token: str) -> None:
        session = self.sessions.close(token, self.world.now)
        if session is not None and session.handle is not None:
            session.handle.close_from_client()

    def deliver(self, event: PushRequest | PushData) -> Generator[Any, None, int]:
        stream = self.stream_for(event.token)
        if isinstance(stream, int):
            return stream
        if event.data and stream.session.push_data():
            self.start_handler(stream)
        if (yield from self.deposit(stream, event.data)):
            return 200
        self.end_session(stream)
        return 410

    def deposit(self, stream: Stream, data: bytes) -> Generator[Any, None, bool]:
        """``_ServerStream.deposit``: hand the bytes over, wait for the machine's verdict."""
        session = stream.session
        if stream.handler_closed or session.closed:
            return False
        if not data:
            return True
        session.wait_for_push(self.world.now)
        goal: int | None = None
        while True:
            now = self.world.now
            if goal is None and session.may_deposit():
                stream.inbound.append(data)
                goal = session.deposit(len(data), now)
            verdict = session.verdict(session.deposited if goal is None else goal, now)
            if verdict is PushVerdict.WAIT and stream.handler_closed:
                verdict = PushVerdict.GONE
            if verdict is PushVerdict.WAIT:
                yield self.push_may_move(stream, goal)
                continue
            if verdict is PushVerdict.GONE and goal is not None:
                stream.inbound.clear()
            session.push_over(verdict)
            return verdict is PushVerdict.ACK and goal is not None

    def push_may_move(self, stream: Stream, goal: int | None) -> Callable[[], bool]:
        session = stream.session
        target = session.deposited if goal is None else goal

        def ready() -> bool:
            if goal is None and session.may_deposit():
                return True
            moved = session.verdict(target, self.world.now) is not PushVerdict.WAIT
            return moved or stream.handler_closed

        return ready

    def pull(self, up: Pipe, down: Pipe, conn: ServerConnection, event: PullRequest) -> Task:
        """``_pull`` and ``_feed_pull``: the long poll, until the session or the client ends it."""
        stream = self.stream_for(event.token)
        if isinstance(stream, int):
            down.write(self.refusal(conn, stream))
            return
        session = stream.session
        writer = _Writer()
        self.polls += 1
        replaced, start = self.sessions.attach_pull(session, writer, self.world.now)
        if isinstance(replaced, _Writer):
            replaced.cancelled = True
        down.write(conn.start_pull())
        if start:
            self.start_handler(stream)
        hung_up = False
        if not session.closed:
            while not writer.cancelled:
                now = self.world.now
                if up.readable():  # _watch_for_hangup
                    data = up.read()
                    conn.receive_data(data)
                    if not data:
                        hung_up = True
                        break
                elif stream.outbound:
                    down.write(conn.send_pull_data(stream.take_outbound()))
                    session.wrote(now)
                    self.sessions.touch(session, now)
                elif stream.finished:
                    if session.lost_data:
                        down.closed = True  # cut: no last chunk (as _trio_server)
                    else:
                        down.write(conn.end_pull())
                    break
                elif now >= session.heartbeat_due():
                    session.wrote(now)
                    down.write(conn.send_heartbeat())
                    if self.legacy_polls:  # as a legacy GOST server: the client polls again
                        down.write(conn.end_pull())
                        break
                else:
                    yield (
                        lambda: (
                            up.readable()
                            or bool(stream.outbound)
                            or stream.finished
                            or writer.cancelled
                            or self.world.now >= session.heartbeat_due()
                        )
                    )
        else:
            down.write(conn.end_pull())
        if session.pull_ended(writer, hung_up=hung_up, stalled=False):
            self.end_session(stream)


class _Writer:
    """Identifies one pull to the session machine."""

    cancelled = False
