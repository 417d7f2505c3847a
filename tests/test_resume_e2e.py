"""Resume end to end: the trio client and the trio server through the fault relay.

Many connections are cut (FIN or RST at exact byte offsets, in requests and
in answers, of pulls and of pushes), and every byte still arrives once, in
order: the sha256 of 16 MiB each way matches. Plain and phts.
"""

from __future__ import annotations

import hashlib
import os
import random
import ssl

import pytest
import trio
import trio.testing

import pht
from pht._stats import ServiceStats

from .faults import Cut, FaultRelay, How, Kind
from .support import echo, echo_through, start_server

CERTIFICATE = pht.make_self_signed_certificate()
SIZE = 16 * 1024 * 1024


def _cuts(seed: int, tls: bool, count: int = 12) -> list[Cut]:
    """``count`` cuts, each of the next connection of its kind, so that the
    reconnections get cut too: pulls in their answer (head or lines), pushes
    in their request (head or data) or in their answers.

    The connections open_pht_stream makes are cut only once established
    (resume covers an established session; a failed open is an error).
    """
    rng = random.Random(seed)
    cuts = [Cut("down", rng.randrange(50_000, 1_000_000), "fin", kind=None if tls else "pull")]
    seen: dict[str | None, int] = {cuts[0].kind: 2 if tls else 1}  # phts: spare the push
    if tls:  # TLS hides what a connection carries: cut each both ways, the first wins
        for nth in range(2, count + 1):
            for direction in ("up", "down"):
                offset = rng.choice((rng.randrange(2_000), rng.randrange(1_500_000)))
                how: How = rng.choice(("fin", "rst"))
                cuts.append(Cut(direction, offset, how, nth=nth))
        return cuts
    for _ in range(count - 1):
        kind: Kind | None = None if tls else rng.choice(("push", "pull"))
        if kind == "pull" or (kind is None and rng.random() < 0.5):
            direction, offset = "down", rng.choice((rng.randrange(400), rng.randrange(1_500_000)))
        elif rng.random() < 0.3:
            direction, offset = "down", rng.randrange(1_500)  # answers lost
        else:
            direction, offset = "up", rng.choice((rng.randrange(400), rng.randrange(1_500_000)))
        nth = seen.get(kind, 0)
        seen[kind] = nth + 1
        how = rng.choice(("fin", "rst"))
        cuts.append(Cut(direction, offset, how, kind=kind, nth=nth))  # type: ignore[arg-type]
    return cuts


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 11, 12, 13, 14])
@pytest.mark.parametrize("tls", [False, True], ids=["pht", "phts"])
async def test_many_random_cuts_lose_and_duplicate_nothing(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, seed: int, tls: bool
) -> None:
    cuts = _cuts(seed, tls)
    port = await start_server(
        nursery, echo, resume=True, grace_period=60, tls=CERTIFICATE if tls else False
    )
    relay = FaultRelay(port, cuts, fin_linger=1.0)
    relay_port = await nursery.start(relay.serve)
    context: ssl.SSLContext | bool = False
    if tls:
        context = ssl.create_default_context()
        CERTIFICATE.configure_trust(context)
    payload = os.urandom(SIZE)
    with trio.fail_after(600):  # virtual seconds (back-off); bounded all the same
        stream = await pht.open_pht_stream(
            "127.0.0.1", relay_port, tls=context, authorize=False, resume=True, push_window=4
        )
        got = await echo_through(stream, payload, piece=300_000)
        await stream.aclose()
    assert len(got) == len(payload), relay.describe()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), relay.describe()
    assert len(relay.faults) >= 6, relay.describe()


@pytest.mark.parametrize("seed", [5, 6])
async def test_a_download_with_cut_pulls_ends_with_eof(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, seed: int
) -> None:
    """Only the server sends: ack-only pushes free its window; PHT-End is the EOF."""
    payload = os.urandom(SIZE)

    async def send_and_end(stream: pht.PHTStream) -> None:
        await stream.send_all(payload)
        await stream.aclose()

    rng = random.Random(seed)
    cuts = [
        Cut("down", rng.randrange(2_000, 3_000_000), rng.choice(("fin", "rst")), "pull", nth)
        for nth in range(8)
    ]
    port = await start_server(nursery, send_and_end, resume=True, resume_window=1024 * 1024)
    relay = FaultRelay(port, cuts, fin_linger=1.0)
    relay_port = await nursery.start(relay.serve)
    got = bytearray()
    with trio.fail_after(600):
        stream = await pht.open_pht_stream("127.0.0.1", relay_port, authorize=False, resume=True)
        while data := await stream.receive_some():
            got += data
        await stream.aclose()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), relay.describe()
    assert len(relay.faults) >= 6, relay.describe()
    pushes = [c for c in relay.connections if c.kind == "push" and c.up]
    assert pushes, "no ack-only push was sent"


async def test_reconnects_give_up_after_the_grace_period(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """The server vanishes: the client retries with back-off, then says why it stopped."""
    port = await start_server(nursery, echo, resume=True, grace_period=5)
    relay = FaultRelay(port)

    async def run_relay(
        task_status: trio.TaskStatus[tuple[int, trio.CancelScope]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as inner:
            inner_port = await inner.start(relay.serve)
            task_status.started((inner_port, inner.cancel_scope))

    relay_port, relay_scope = await nursery.start(run_relay)
    stream = await pht.open_pht_stream("127.0.0.1", relay_port, authorize=False, resume=True)
    await stream.send_all(b"ping")
    with trio.fail_after(10):
        assert await stream.receive_some() == b"ping"
    started = trio.current_time()
    relay_scope.cancel()  # every connection cut, and the listener gone
    with trio.fail_after(60), pytest.raises(pht.SessionGone) as caught:
        await stream.receive_some()
    assert isinstance(caught.value, trio.BrokenResourceError)
    assert caught.value.reason is pht.GoneReason.EXPIRED
    assert caught.value.status is None  # no 410 came
    assert "could not be reached within the session's 5 s grace period" in str(caught.value)
    assert 5 <= trio.current_time() - started < 10
    await stream.aclose()


async def test_bounded_pulls_are_re_attached(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A server that ends each pull after 64 KiB (for a buffering hop): the resume
    client re-attaches after each, and nothing is lost or repeated."""
    stats = ServiceStats("bounded")
    port = await start_server(
        nursery, echo, resume=True, pull_max_bytes=64 * 1024, pull_max_ms=200, stats=stats
    )
    relay = FaultRelay(port, _cuts(21, tls=False, count=6), fin_linger=1.0)
    relay_port = await nursery.start(relay.serve)
    payload = os.urandom(4 * 1024 * 1024)
    with trio.fail_after(600):
        stream = await pht.open_pht_stream(
            "127.0.0.1", relay_port, authorize=False, resume=True, push_window=4
        )
        got = await echo_through(stream, payload, piece=100_000)
        await stream.aclose()
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), relay.describe()
    assert stats.pulls_total > 60, relay.describe()  # one pull per 64 KiB (or 200 ms)
    unused = [c for c in relay.connections if not c.up]
    assert len(unused) <= 2, relay.describe()  # no connection made only to be thrown away
