"""Connections cut by the network: without resume, an error or EOF, never corruption.

A fault-injecting relay (:mod:`tests.faults`) sits between a real
``open_pht_stream`` client and a real ``serve_pht`` server on loopback and
cuts the push and pull connections at chosen byte offsets, with a FIN or a
reset. Both ends move data at once; whatever each application received
must be an exact prefix of what the other sent (no gap, no duplicate, no
altered byte), a short stream must have ended with an exception or EOF
(and stay ended), a ``send_all`` that returned must have delivered its
bytes, and nothing may hang. Every wait is bounded; a failure names the cut.
"""

from __future__ import annotations

import functools
import ssl
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pht

from .faults import Cut, FaultRelay, random_cuts
from .middlebox.tunnel_checks import pattern
from .support import start_server

#: Bound on one whole run (a hang check, never a performance expectation).
HANG_BOUND = 30.0
PIECE = 256 * 1024
CERTIFICATE = pht.make_self_signed_certificate()
FLOWS = pytest.mark.parametrize("authorize", [True, False], ids=["authorize", "tokenless"])


@dataclass
class Side:
    """What one application did and saw."""

    name: str
    received: bytearray = field(default_factory=bytearray)
    sent_ok: int = 0  # bytes of send_all calls that returned
    receive_end: str | None = None  # "eof" or the exception that ended receiving
    send_end: str | None = None
    after_end: bytes | str | None = None  # what a receive after the end gave

    def __str__(self) -> str:
        return (
            f"{self.name}: received {len(self.received)}, send_all returned for "
            f"{self.sent_ok}, receive ended by {self.receive_end}, send ended by "
            f"{self.send_end}, then a receive gave {self.after_end!r}"
        )


async def _receive(stream: pht.PHTStream, side: Side, size: int | None) -> None:
    """Receive until ``size`` bytes (or the end); then check the end stays the end."""
    try:
        while size is None or len(side.received) < size:
            data = await stream.receive_some(PIECE)
            if not data:
                side.receive_end = "eof"
                break
            side.received += data
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        side.receive_end = f"{type(exc).__name__}: {exc}"
    if side.receive_end is None:
        return
    try:
        side.after_end = bytes(await stream.receive_some(PIECE))
    except trio.BrokenResourceError:  # pht's BrokenTunnelError included
        side.after_end = "BrokenResourceError"
    except trio.ClosedResourceError:
        side.after_end = "ClosedResourceError"


async def _send(stream: pht.PHTStream, side: Side, data: bytes) -> None:
    try:
        for start in range(0, len(data), PIECE):
            piece = data[start : start + PIECE]
            await stream.send_all(piece)
            side.sent_ok += len(piece)
        side.send_end = "done"
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        side.send_end = f"{type(exc).__name__}: {exc}"


def _check(side: Side, sent: bytes, relay: FaultRelay, report: str) -> None:
    """The invariant: an exact prefix; short only after an end that stays the end."""
    got = bytes(side.received)
    where = f"\n{report}\n{relay.describe()}"
    if got != sent[: len(got)]:
        first = next(i for i, (a, b) in enumerate(zip(got, sent, strict=False)) if a != b)
        raise AssertionError(f"{side.name} received altered bytes from offset {first}{where}")
    if len(got) < len(sent) and side.receive_end is not None:
        ended = (b"", "BrokenResourceError", "ClosedResourceError", "no stream")
        assert side.after_end in ended, f"{side.name} got data after its stream ended short{where}"


async def run_with_cuts(
    cuts: list[Cut],
    *,
    authorize: bool,
    tls: bool,
    size: int,
    seed: int = 0,
    push_window: int = 1,
) -> FaultRelay:
    """Move ``size`` bytes each way through a relay applying ``cuts``; check the invariant."""
    client_data, server_data = pattern(size, 2 * seed), pattern(size, 2 * seed + 1)
    handlers: list[Side] = []
    handlers_done = trio.Event()
    running = 0

    async def handler(stream: pht.PHTStream) -> None:
        nonlocal running
        side = Side(f"server handler {len(handlers)}")
        handlers.append(side)
        running += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send, stream, side, server_data)
                await _receive(stream, side, None)
        finally:
            running -= 1
            if not running:
                handlers_done.set()

    client = Side("client")
    async with trio.open_nursery() as nursery:
        serve = functools.partial(start_server, nursery, handler, idle_timeout=HANG_BOUND)
        port = await (serve(tls=CERTIFICATE) if tls else serve())
        relay = FaultRelay(port, cuts, fin_linger=5.0)
        relay_port = await nursery.start(relay.serve)
        context: ssl.SSLContext | bool = False
        if tls:
            context = ssl.create_default_context()
            CERTIFICATE.configure_trust(context)
        try:
            with trio.fail_after(HANG_BOUND):
                try:
                    stream = await pht.open_pht_stream(
                        "127.0.0.1",
                        relay_port,
                        tls=context,
                        server_hostname="localhost",
                        authorize=authorize,
                        connect_timeout=5.0,
                        close_timeout=5.0,
                        push_window=push_window,
                    )
                except (pht.TunnelError, trio.BrokenResourceError) as exc:
                    client.receive_end = client.send_end = f"open failed: {exc}"
                    client.after_end = "no stream"
                else:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(_send, stream, client, client_data)
                        await _receive(stream, client, size)
                    try:
                        await stream.aclose()
                    except trio.BrokenResourceError as exc:
                        client.send_end = f"{client.send_end}; aclose: {exc}"
                if handlers:
                    await handlers_done.wait()
        except trio.TooSlowError:
            pytest.fail(
                f"hang: not over after {HANG_BOUND}s\n{client}\n"
                + "\n".join(map(str, handlers))
                + f"\n{relay.describe()}"
            )
        nursery.cancel_scope.cancel()
    report = "\n".join(map(str, [client, *handlers]))
    _check(client, server_data, relay, report)
    # The handler never ends the session early, so a short download is an
    # error, never a clean EOF (docs/deployment.md: never a silent b"").
    assert len(client.received) == size or client.receive_end != "eof", (
        f"the client saw a clean EOF after a cut\n{report}\n{relay.describe()}"
    )
    assert len(handlers) <= 1, f"one session, several handlers\n{report}\n{relay.describe()}"
    # A send_all that returned was acknowledged, its bytes reached the handler;
    # with a push window of N, up to N - 1 pushes may await their answer (whose
    # failure a later send_all or aclose reports).
    unconfirmed = 0 if client.send_end == "done" else (push_window - 1) * PIECE
    confirmed = size if client.send_end == "done" else client.sent_ok - unconfirmed
    for side in handlers:
        _check(side, client_data, relay, report)
        assert len(side.received) >= confirmed, (
            f"send_all returned for bytes the handler never got\n{report}\n{relay.describe()}"
        )
    if not handlers:
        assert confirmed <= 0, f"acknowledged bytes, yet no handler\n{report}"
    return relay


# -- cuts at chosen places ------------------------------------------------------------

#: Named places, plain HTTP: before the request reached the server, in a head,
#: in a body, right after the answer's head, and after the answer began.
PLAIN_CUTS = {
    "push-before-request": Cut("up", 0, kind="push"),
    "push-mid-head": Cut("up", 20, kind="push"),
    "push-mid-body": Cut("up", 100_000, kind="push", anchor="body"),
    "push-answer-lost": Cut("down", 0, kind="push"),
    "push-after-answer-head": Cut("down", 0, kind="push", anchor="body"),
    "push-before-body": Cut("up", 0, kind="push", anchor="body"),
    "pull-before-request": Cut("up", 0, kind="pull"),
    "pull-mid-head": Cut("up", 10, kind="pull"),
    "pull-mid-answer-head": Cut("down", 30, kind="pull"),
    "pull-after-answer-head": Cut("down", 0, kind="pull", anchor="body"),
    "pull-mid-body": Cut("down", 300_000, kind="pull", anchor="body"),
}

#: With TLS the relay sees no HTTP: the first connection is the pull (after
#: the authorize, if any), the second the push.
TLS_CUTS = {
    "pull-in-handshake": Cut("up", 100),
    "pull-after-handshake": Cut("down", 4_000),
    "pull-mid-body": Cut("down", 300_000),
    "push-in-handshake": Cut("up", 0, nth=1),
    "push-mid-body": Cut("up", 200_000, nth=1),
    "push-answers": Cut("down", 1_500, nth=1),
}


@FLOWS
@pytest.mark.parametrize("how", ["fin", "rst"])
@pytest.mark.parametrize("place", list(PLAIN_CUTS))
async def test_plain_cut_at_a_chosen_place(authorize: bool, how: str, place: str) -> None:
    template = PLAIN_CUTS[place]
    cut = Cut(
        template.direction,
        template.offset,
        how="fin" if how == "fin" else "rst",
        kind=template.kind,
        nth=template.nth,
        anchor=template.anchor,
    )
    relay = await run_with_cuts([cut], authorize=authorize, tls=False, size=1024 * 1024)
    assert relay.faults, f"the cut never fired\n{relay.describe()}"


@FLOWS
@pytest.mark.parametrize("place", list(TLS_CUTS))
async def test_tls_cut_at_a_chosen_place(authorize: bool, place: str) -> None:
    template = TLS_CUTS[place]
    relay = await run_with_cuts([template], authorize=authorize, tls=True, size=1024 * 1024)
    assert relay.faults, f"the cut never fired\n{relay.describe()}"


async def test_a_stall_delays_but_delivers_everything() -> None:
    """A hop that holds the pull for a moment costs time, not bytes."""
    relay = await run_with_cuts(
        [Cut("down", 100_000, how="stall", kind="pull", anchor="body", stall_for=0.5)],
        authorize=False,
        tls=False,
        size=512 * 1024,
    )
    assert relay.faults


# -- cuts at random places --------------------------------------------------------------


@pytest.mark.slow
@FLOWS
@pytest.mark.parametrize("tls", [False, True], ids=["pht", "phts"])
@pytest.mark.parametrize("seed", range(6))
async def test_random_cuts(authorize: bool, tls: bool, seed: int) -> None:
    """4 MiB each way while three seeded faults (cuts, stalls) hit push and pull
    connections, including the ones opened after a cut; odd seeds pipeline pushes."""
    size = 4 * 1024 * 1024
    cuts = random_cuts(
        seed,
        3,
        max_offset=size,
        # Past the TLS handshake: test_tls_cut_at_a_chosen_place cuts that.
        min_offset=2_000 if tls else 0,
        kinds=(None,) if tls else ("push", "pull"),
        hows=("fin", "rst", "stall"),
        anchors=("start",) if tls else ("start", "body"),
        max_nth=2,
    )
    await run_with_cuts(
        cuts, authorize=authorize, tls=tls, size=size, seed=seed, push_window=1 + seed % 2 * 2
    )


@pytest.mark.slow
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    direction=st.sampled_from(["up", "down"]),
    kind=st.sampled_from(["push", "pull"]),
    offset=st.integers(min_value=0, max_value=1_500_000),
    how=st.sampled_from(["fin", "rst"]),
    authorize=st.booleans(),
)
def test_hypothesis_cut_positions(
    direction: str, kind: str, offset: int, how: str, authorize: bool
) -> None:
    cut = Cut(
        "up" if direction == "up" else "down",
        offset,
        how="fin" if how == "fin" else "rst",
        kind="push" if kind == "push" else "pull",
    )
    trio.run(
        functools.partial(run_with_cuts, [cut], authorize=authorize, tls=False, size=1024 * 1024)
    )


# -- the relay itself -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cut", "kept"),
    [
        (Cut("up", 12_345, how="fin", kind="push"), 12_345),
        (Cut("up", 1_000, how="fin", kind="push", anchor="body"), 23 + 1_000),
        (Cut("up", 0, how="fin", kind="push", anchor="body"), 23),
    ],
    ids=["from-start", "after-head", "at-head-end"],
)
async def test_relay_forwards_exactly_up_to_the_offset(
    nursery: trio.Nursery, cut: Cut, kept: int
) -> None:
    """The relay's offsets are exact: the server gets the first N bytes, then the FIN."""
    got = bytearray()
    ended = trio.Event()

    async def sink(stream: trio.SocketStream) -> None:
        try:
            while data := await stream.receive_some():
                got.extend(data)
        except trio.BrokenResourceError:
            pass
        ended.set()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, sink, 0, host="127.0.0.1"))
    relay = FaultRelay(listeners[0].socket.getsockname()[1], [cut])
    port = await nursery.start(relay.serve)
    client = await trio.open_tcp_stream("127.0.0.1", port)
    data = b"POST /push HTTP/1.1\r\n\r\n" + pattern(100_000)  # a 23-byte head
    with trio.fail_after(10):
        try:
            await client.send_all(data)
        except trio.BrokenResourceError:
            pass
        await ended.wait()
    await client.aclose()
    assert bytes(got) == data[:kept]
    assert [str(fault) for fault in relay.faults] == [
        f"{cut} fired on connection 0 (push: 'POST /push HTTP/1.1') at up byte {kept}"
    ]
