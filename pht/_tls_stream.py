"""TLS done by OpenSSL on the socket itself, as a :class:`trio.abc.Stream`.

:class:`trio.SSLStream` runs TLS through memory BIOs in Python, which costs
about half of the throughput a tunnel could have (measured here: ~150 MB/s
against ~250 MB/s for the same transfer, one process, both ends). PHT only
needs plain TLS over TCP, so ``pht`` lets :class:`ssl.SSLSocket` encrypt on
a non-blocking socket and waits for readiness with trio.
"""

from __future__ import annotations

import socket
import ssl

import trio

from ._trio_common import BusyTunnelError, ClosedTunnelError, ConflictDetector

__all__ = ["TLSSocketStream"]

_BROKEN = (OSError, ssl.SSLError)


class TLSSocketStream(trio.abc.Stream):
    """A TLS connection over a non-blocking :class:`ssl.SSLSocket`.

    Create it with :meth:`wrap`, then ``await do_handshake()``. One task may
    send while another receives; PHT's adapters never need more. EOF without
    ``close_notify`` counts as a normal EOF, as with ``https_compatible``.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.socket = sock
        self._closed = False
        self._send_conflict = ConflictDetector("another task is already sending on this stream")
        self._receive_conflict = ConflictDetector(
            "another task is already receiving on this stream"
        )
        # Tasks that need the socket readable while another task waits for it.
        self._read_progress = trio.lowlevel.ParkingLot()

    @classmethod
    def wrap(
        cls,
        transport: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> TLSSocketStream:
        """Take over ``transport``'s socket (``transport`` must not be used again)."""
        trio_socket = transport.socket
        raw = socket.socket(
            trio_socket.family, trio_socket.type, trio_socket.proto, fileno=trio_socket.detach()
        )
        raw.setblocking(False)
        sock = context.wrap_socket(
            raw,
            server_side=server_side,
            server_hostname=None if server_side else server_hostname,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=True,
        )
        return cls(sock)

    async def do_handshake(self) -> None:
        """Run the TLS handshake; ``trio.BrokenResourceError`` if it fails."""
        while True:
            try:
                self.socket.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.socket)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.socket)
            except _BROKEN as exc:
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc

    async def _wait_readable(self) -> None:
        try:
            await trio.lowlevel.wait_readable(self.socket)
        except trio.BusyResourceError:
            # A send that needs to read (TLS renegotiation) while the receiving
            # task already waits: that task's wake-up is this one's too.
            await self._read_progress.park()
            return
        self._read_progress.unpark_all()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            if self._closed:
                raise ClosedTunnelError("stream was closed")
            view = memoryview(data).cast("B")
            while view:
                try:
                    sent = self.socket.send(view)
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(self.socket)
                except ssl.SSLWantReadError:
                    await self._wait_readable()
                except _BROKEN as exc:
                    if self._closed:
                        raise ClosedTunnelError("stream was closed") from None
                    raise trio.BrokenResourceError(f"TLS connection broken: {exc}") from exc
                else:
                    view = view[sent:]
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise ClosedTunnelError("stream was closed")
        await trio.lowlevel.wait_writable(self.socket)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        with self._receive_conflict:
            size = 65536 if max_bytes is None else max_bytes
            if size < 1:
                raise ValueError("max_bytes must be at least 1")
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise ClosedTunnelError("stream was closed")
                try:
                    data = self.socket.recv(size)
                except ssl.SSLWantReadError:
                    await self._wait_readable()
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(self.socket)
                except _BROKEN as exc:
                    if self._closed:
                        raise ClosedTunnelError("stream was closed") from None
                    raise trio.BrokenResourceError(f"TLS connection broken: {exc}") from exc
                else:
                    if data and len(data) < size:
                        data = self._read_more(data, size)
                    # Shielded: a cancelled receive must not drop what it read.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return data

    def receive_nowait(self, max_bytes: int = 65536) -> bytes | None:
        """What has arrived, without waiting: ``None`` if nothing, ``b""`` at EOF.

        TLS records that carry no data (session tickets) are consumed and
        give ``None``. ``trio.BrokenResourceError`` if the connection broke.
        """
        if self._receive_conflict.busy:
            raise BusyTunnelError("another task is already receiving on this stream")
        if self._closed:
            raise ClosedTunnelError("stream was closed")
        try:
            return self.socket.recv(max_bytes)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except _BROKEN as exc:
            raise trio.BrokenResourceError(f"TLS connection broken: {exc}") from exc

    def _read_more(self, first: bytes, size: int) -> bytes:
        """Add whatever else is readable now, up to ``size`` bytes.

        One ``recv`` returns at most one TLS record (16 KiB); taking all that
        has arrived in one call keeps the per-call cost of the layers above
        from being paid 16 times per 256 KiB.
        """
        chunks = [first]
        total = len(first)
        while total < size:
            try:
                more = self.socket.recv(size - total)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            except _BROKEN:
                break  # reported by the next receive_some
            if not more:
                break  # EOF: the next receive_some returns b""
            chunks.append(more)
            total += len(more)
        return first if len(chunks) == 1 else b"".join(chunks)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._read_progress.unpark_all()
            if self.socket.fileno() >= 0:
                trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()
