"""A fault-injecting TCP relay for tests: cuts or stalls connections at chosen bytes.

The relay listens on a loopback port and forwards every accepted connection
to a target port, both ways, as a NAT box or a load balancer would. A
:class:`Cut` names a connection (by the kind of its first request, or by
its index) and a byte offset in one direction; when that many bytes have
been forwarded in that direction the relay cuts the connection, with a FIN
or with a reset (``SO_LINGER`` 0, as a box that lost its state answers), or
holds that direction for a while (a stall). Every connection and every
fault is recorded, so that a failing test can say which cut broke it.

Given the same cuts (or the same seed for :func:`random_cuts`) the relay
forwards the same bytes of each connection before cutting it: offsets are
counted in bytes, never in time or in reads.
"""

from __future__ import annotations

import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import trio

__all__ = [
    "Connection",
    "Cut",
    "CutEveryConnection",
    "Fault",
    "FaultRelay",
    "Planner",
    "kind_of",
    "random_cuts",
]

#: ``up``: client to server (the request); ``down``: server to client (the answer).
Direction = Literal["up", "down"]
#: ``fin`` and ``rst`` close both sides of the connection; ``stall`` holds one direction.
How = Literal["fin", "rst", "stall"]
#: What a connection's first bytes say it is (``tls`` for a TLS handshake, which hides it).
Kind = Literal["push", "pull", "tls", "other"]

_READ_SIZE = 64 * 1024
_HEAD_END = b"\r\n\r\n"


def kind_of(first: bytes) -> Kind:
    """The kind of a connection, from the first bytes the client sent on it.

    ``POST`` is a push (or a close notification); ``GET`` is a pull, or an
    authorize followed by the pull on the same connection, as pht's client
    does. A TLS handshake (``phts``) hides the request: ``tls``.
    """
    if first.startswith(b"POST "):
        return "push"
    if first.startswith(b"GET "):
        return "pull"
    if first[:1] == b"\x16":
        return "tls"
    return "other"


@dataclass(frozen=True)
class Cut:
    """One fault: where and how to break a connection.

    The fault applies to the ``nth`` connection (0-based) among those of
    ``kind`` (``None``: among all connections, in the order they were
    accepted). It fires once ``offset`` bytes have been forwarded in
    ``direction``, counted from the first byte (``anchor="start"``) or from
    the end of the first HTTP head in that direction (``anchor="body"``:
    offset 0 is right after the request or response head; never fires on
    TLS). Bytes up to the offset are forwarded, none after it. ``stall``
    holds that direction for ``stall_for`` seconds instead, then forwards on.
    """

    direction: Direction
    offset: int
    how: How = "rst"
    kind: Kind | None = None
    nth: int = 0
    anchor: Literal["start", "body"] = "start"
    stall_for: float = 0.0

    def __post_init__(self) -> None:
        if self.offset < 0:
            raise ValueError(f"offset must be 0 or more, got {self.offset}")
        if self.nth < 0:
            raise ValueError(f"nth must be 0 or more, got {self.nth}")
        if self.how == "stall" and not self.stall_for > 0:
            raise ValueError("a stall needs stall_for > 0 seconds")

    def __str__(self) -> str:
        target = f"{self.kind or 'connection'} #{self.nth}"
        where = "after the head + " if self.anchor == "body" else "at "
        stall = f" for {self.stall_for:g}s" if self.how == "stall" else ""
        return f"{self.how}{stall} {target} {self.direction} {where}byte {self.offset}"


@dataclass
class Fault:
    """A fault that fired: which connection, where, how."""

    cut: Cut
    connection: int  # index among all accepted connections
    kind: Kind
    first_line: str
    position: int  # absolute byte position in ``cut.direction``

    def __str__(self) -> str:
        return (
            f"{self.cut} fired on connection {self.connection} ({self.kind}: "
            f"{self.first_line!r}) at {self.cut.direction} byte {self.position}"
        )


@dataclass
class Connection:
    """What the relay saw of one connection."""

    index: int
    kind: Kind | None = None
    first_line: str = ""
    up: int = 0  # bytes forwarded client -> server
    down: int = 0  # bytes forwarded server -> client
    ended: str = "open"

    def __str__(self) -> str:
        return (
            f"connection {self.index} ({self.kind}: {self.first_line!r}): "
            f"{self.up} bytes up, {self.down} down, {self.ended}"
        )


@dataclass
class _Plan:
    """The fault of one direction of one connection, and where it stands."""

    cut: Cut
    position: int | None  # absolute; None until the head end is seen (anchor "body")
    head_seen: bool = False
    tail: bytes = b""  # the last bytes before this read, to find a head end across reads


class _Cutting(Exception):
    """Raised inside a copy loop: the connection is to be cut now."""


#: Decides the faults of a new connection once its kind is known (``planner`` of
#: :class:`FaultRelay`): each returned cut applies to that connection only.
Planner = Callable[[Connection], "list[Cut]"]


class FaultRelay:
    """Relays loopback connections to ``target`` and applies ``cuts``.

    Start it with ``port = await nursery.start(relay.serve)``. ``faults``
    lists what fired, ``connections`` what was relayed; :meth:`describe`
    puts both in a message for a failing assertion. A ``planner`` adds
    cuts per connection as it comes (for runs of hundreds of cuts, where
    the connections are not known in advance).
    """

    def __init__(
        self,
        target: int,
        cuts: list[Cut] | tuple[Cut, ...] = (),
        *,
        fin_linger: float = 10.0,
        planner: Planner | None = None,
    ) -> None:
        self.target = target
        #: After a FIN cut, how long to wait for both ends to close before closing anyway.
        self.fin_linger = fin_linger
        self.cuts = list(cuts)
        self.planner = planner
        self.connections: list[Connection] = []
        self.faults: list[Fault] = []
        self._seen: dict[Kind | None, int] = {}

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept on 127.0.0.1 (a free port, reported to ``task_status``) until cancelled."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)

    def describe(self) -> str:
        """The cuts asked for, the faults that fired and the connections seen."""
        lines = [f"cuts asked for: {[str(cut) for cut in self.cuts]}"]
        lines += [f"fired: {fault}" for fault in self.faults] or ["fired: none"]
        lines += [str(connection) for connection in self.connections]
        return "\n".join(lines)

    def _plans_for(self, record: Connection, kind: Kind) -> dict[Direction, _Plan]:
        """The fault of each direction for this connection, if any.

        When several apply, one counted from the start beats one counted
        from the head's end, and a smaller offset beats a larger one.
        """
        nth_of_kind = self._seen.get(kind, 0)
        self._seen[kind] = nth_of_kind + 1
        plans: dict[Direction, _Plan] = {}
        for cut in self.cuts:
            nth = record.index if cut.kind is None else nth_of_kind
            if cut.kind not in (None, kind) or cut.nth != nth:
                continue
            position = cut.offset if cut.anchor == "start" else None
            current = plans.get(cut.direction)
            if current is None or (
                position is not None and (current.position is None or position < current.position)
            ):
                plans[cut.direction] = _Plan(cut, position)
        return plans

    async def _handle(self, client: trio.SocketStream) -> None:
        record = Connection(len(self.connections))
        self.connections.append(record)
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target)
        except OSError as exc:
            record.ended = f"could not reach the target: {exc}"
            await trio.aclose_forcefully(client)
            return
        try:
            await self._relay(record, client, server)
        finally:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(server)

    async def _relay(
        self, record: Connection, client: trio.SocketStream, server: trio.SocketStream
    ) -> None:
        try:
            first = await client.receive_some(_READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            first = b""
        record.kind = kind_of(first)
        if record.kind == "tls":
            record.first_line = "(a TLS handshake)"
        else:
            record.first_line = first.split(b"\r\n", 1)[0][:80].decode("latin-1")
        if self.planner is not None:
            for cut in self.planner(record):
                self.cuts.append(replace(cut, kind=None, nth=record.index))
        plans = self._plans_for(record, record.kind)
        outcome: list[How] = []
        async with trio.open_nursery() as nursery:

            async def copy(
                direction: Direction,
                source: trio.SocketStream,
                sink: trio.SocketStream,
                first: bytes,
            ) -> None:
                try:
                    await self._copy(record, direction, source, sink, first, plans.get(direction))
                except _Cutting as cutting:
                    outcome.append(cutting.args[0].cut.how)
                    nursery.cancel_scope.cancel()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    record.ended = f"{direction} broke: {exc!r}"
                    nursery.cancel_scope.cancel()

            nursery.start_soon(copy, "up", client, server, first)
            nursery.start_soon(copy, "down", server, client, b"")
        if outcome:
            how = outcome[0]
            record.ended = f"cut ({how})"
            if how == "rst":
                for stream in (client, server):
                    stream.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
            else:
                await self._finish(client, server)
        elif record.ended == "open":
            record.ended = "closed"

    async def _finish(self, client: trio.SocketStream, server: trio.SocketStream) -> None:
        """A FIN to both ends; what they still send is dropped until they close.

        Closing a socket with unread bytes would send a reset instead of a FIN.
        """

        async def drain(stream: trio.SocketStream) -> None:
            try:
                await stream.send_eof()
                while await stream.receive_some(_READ_SIZE):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        with trio.move_on_after(self.fin_linger):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, client)
                nursery.start_soon(drain, server)

    async def _copy(
        self,
        record: Connection,
        direction: Direction,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        data: bytes,
        plan: _Plan | None,
    ) -> None:
        """Forward one direction until EOF (then half-close) or the planned fault."""
        done = 0
        pre_read = direction == "up"  # the first "up" read was made to tell the kind
        while True:
            if not data:
                if not pre_read:
                    data = await source.receive_some(_READ_SIZE)
                pre_read = False
                if not data:
                    with trio.CancelScope(shield=True):
                        try:
                            await sink.send_eof()
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass
                    return
            if plan is not None and plan.position is None:
                found = (plan.tail + data).find(_HEAD_END)
                if found >= 0:
                    head_end = done - len(plan.tail) + found + len(_HEAD_END)
                    plan.position = head_end + plan.cut.offset
                plan.tail = (plan.tail + data)[-3:]
            position = None if plan is None else plan.position
            if plan is not None and position is not None and done + len(data) >= position:
                keep = position - done
                if keep:
                    await sink.send_all(data[:keep])
                    done += keep
                    self._count(record, direction, keep)
                kind = record.kind or "other"
                fault = Fault(plan.cut, record.index, kind, record.first_line, done)
                self.faults.append(fault)
                if plan.cut.how != "stall":
                    raise _Cutting(fault)
                await trio.sleep(plan.cut.stall_for)
                data = data[keep:]
                plan = None
                continue
            await sink.send_all(data)
            done += len(data)
            self._count(record, direction, len(data))
            data = b""
            pre_read = False

    @staticmethod
    def _count(record: Connection, direction: Direction, size: int) -> None:
        if direction == "up":
            record.up += size
        else:
            record.down += size


def random_cuts(
    seed: int,
    count: int,
    *,
    max_offset: int,
    min_offset: int = 0,
    kinds: tuple[Kind | None, ...] = ("push", "pull"),
    hows: tuple[How, ...] = ("fin", "rst"),
    anchors: tuple[Literal["start", "body"], ...] = ("start", "body"),
    max_nth: int = 0,
    max_stall: float = 0.2,
) -> list[Cut]:
    """``count`` cuts at offsets from ``min_offset`` below ``max_offset``, fixed by ``seed``.

    Offsets below 256 (in a request or response head) are drawn as often as
    larger ones (in a body), so that heads are cut as well as data. A
    ``stall`` lasts up to ``max_stall`` seconds.
    """
    rng = random.Random(seed)
    cuts = []
    for _ in range(count):
        limit = rng.choice((min_offset + 256, max_offset))
        how = rng.choice(hows)
        cuts.append(
            Cut(
                direction=rng.choice(("up", "down")),
                offset=rng.randrange(min_offset, max(limit, min_offset + 1)),
                how=how,
                kind=rng.choice(kinds),
                nth=rng.randint(0, max_nth),
                anchor=rng.choice(anchors),
                stall_for=rng.uniform(0.01, max_stall) if how == "stall" else 0.0,
            )
        )
    return cuts


class CutEveryConnection:
    """A :class:`FaultRelay` planner: a random cut for every connection, until enough fired.

    Connection 0 (the opening pull of a client with ``authorize=False``) is
    cut only in its answer, once ``first_after`` bytes came down: resume
    covers an established session, a failed open is an error. The next
    ``spare`` connections are left alone. Then each pull is cut in its
    answer (head or lines) or now and then in its request head; each push
    in its request (head or data) or in its answers (answers lost); a TLS
    connection, which hides what it carries, both ways at independent
    offsets (the first to come wins). FIN or RST at random. Once
    ``relay.faults`` holds ``until`` faults, new connections are left alone,
    so that the run ends.
    """

    def __init__(
        self,
        relay: FaultRelay,
        seed: int,
        *,
        until: int,
        max_offset: int = 1_500_000,
        first_after: int = 50_000,
        spare: int = 0,
    ) -> None:
        self.relay = relay
        self.rng = random.Random(seed)
        self.until = until
        self.max_offset = max_offset
        self.first_after = first_after
        self.spare = spare

    def _offset(self, head: int) -> int:
        """In a head (below ``head``) as often as anywhere below ``max_offset``."""
        return self.rng.randrange(self.rng.choice((head, self.max_offset)))

    def __call__(self, connection: Connection) -> list[Cut]:
        rng = self.rng
        how: How = rng.choice(("fin", "rst"))
        if connection.index == 0:
            return [Cut("down", rng.randrange(self.first_after, self.max_offset), how)]
        if connection.index <= self.spare or len(self.relay.faults) >= self.until:
            return []
        if connection.kind == "tls":
            other: How = rng.choice(("fin", "rst"))
            return [Cut("up", self._offset(2_000), how), Cut("down", self._offset(2_000), other)]
        if connection.kind == "pull":
            if rng.random() < 0.15:
                return [Cut("up", rng.randrange(100), how)]  # in the request's head
            return [Cut("down", self._offset(400), how)]
        if connection.kind == "push":
            if rng.random() < 0.3:
                return [Cut("down", rng.randrange(1_500), how)]  # answers lost
            return [Cut("up", self._offset(400), how)]
        return []
