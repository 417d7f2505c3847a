"""Base64 line framing, the only payload encoding PHT has.

Every piece of data travels as ``base64(data) + "\\n"`` in the standard
alphabet with padding. Encoding and decoding run in C: ``pybase64`` (SIMD)
when it is installed, CPython's ``binascii`` otherwise.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterator

from ._errors import RemoteProtocolError

__all__ = [
    "LineBuffer",
    "LineDecoder",
    "decode_line",
    "encode_chunk",
    "encode_line",
    "encode_lines",
]

try:  # pragma: no cover - which branch runs depends on the installation
    import pybase64 as _pybase64
except ImportError:  # pragma: no cover
    _pybase64 = None  # type: ignore[assignment]

#: Name of the base64 implementation in use, for benchmarks and bug reports.
BASE64_BACKEND = "pybase64" if _pybase64 is not None else "binascii"
"""Which base64 implementation the codec uses: ``"pybase64"`` (SIMD, the
default dependency) or ``"binascii"`` (the standard library fallback)."""


if _pybase64 is not None:
    _b64encode = _pybase64.b64encode
    _b64decode = _pybase64.b64decode
    _b64 = _b64encode

    def encode_line(data: bytes | bytearray | memoryview) -> bytes:
        """Return ``base64(data) + b"\\n"``."""
        return _b64encode(data) + b"\n"

    def _decode(line: bytes | bytearray | memoryview) -> bytes:
        result: bytes = _b64decode(line, validate=True)
        return result

else:  # pragma: no cover

    def _b64(data: bytes | bytearray | memoryview) -> bytes:
        return binascii.b2a_base64(data, newline=False)

    def encode_line(data: bytes | bytearray | memoryview) -> bytes:
        """Return ``base64(data) + b"\\n"``."""
        return binascii.b2a_base64(data, newline=True)

    def _decode(line: bytes | bytearray | memoryview) -> bytes:
        return binascii.a2b_base64(line, strict_mode=True)


def decode_line(line: bytes | bytearray | memoryview) -> bytes:
    """Decode one line's base64 text (without its newline).

    Raises :class:`RemoteProtocolError` (status 400) for anything but
    canonical, padded, standard-alphabet base64, as GOST's ``StdEncoding``.
    """
    try:
        return _decode(line)
    except (binascii.Error, ValueError) as exc:
        raise RemoteProtocolError(f"invalid base64 in line: {exc}", status_hint=400) from None


def encode_lines(data: bytes | bytearray | memoryview, max_line_data: int) -> bytes:
    """Encode ``data`` as lines of at most ``max_line_data`` raw bytes each.

    GOST's pull lines carry one read of at most 32 KiB; staying within that
    keeps every line short enough for any GOST client's line reader.
    """
    view = memoryview(data)
    if len(view) <= max_line_data:
        return encode_line(view)
    return b"".join(
        encode_line(view[start : start + max_line_data])
        for start in range(0, len(view), max_line_data)
    )


def encode_chunk(data: bytes | bytearray | memoryview, max_line_data: int) -> bytes:
    """``encode_lines(data, max_line_data)`` as one HTTP/1.1 chunk (size line, lines, CRLF)."""
    view = memoryview(data)
    if len(view) <= max_line_data:
        text = _b64(view)
        return b"%x\r\n%b\n\r\n" % (len(text) + 1, text)
    lines = [
        encode_line(view[start : start + max_line_data])
        for start in range(0, len(view), max_line_data)
    ]
    size = sum(map(len, lines))
    return b"".join([b"%x\r\n" % size, *lines, b"\r\n"])


class LineBuffer:
    """Reassembles newline-terminated lines from arbitrarily cut input.

    Bytes arrive in pieces that ignore line boundaries (HTTP chunks, TCP
    segments); :meth:`feed` takes them and :meth:`lines` yields complete
    lines without their ``\\n``. At most ``max_line`` bytes of an incomplete
    line are held: beyond that :class:`RemoteProtocolError` (413) is raised,
    so a peer that never sends a newline cannot exhaust memory.
    """

    __slots__ = ("_buffer", "_max_line", "_scan_from")

    def __init__(self, max_line: int) -> None:
        self._buffer = bytearray()
        self._max_line = max_line
        self._scan_from = 0

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held so far."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; complete lines come out of :meth:`lines`."""
        self._buffer += data

    def lines(self) -> Iterator[bytes]:
        """Yield every complete line buffered so far, oldest first."""
        buffer = self._buffer
        end = buffer.rfind(b"\n", self._scan_from)
        if end < 0:
            self._scan_from = len(buffer)
            if len(buffer) > self._max_line:
                raise RemoteProtocolError(
                    f"line longer than {self._max_line} bytes", status_hint=413
                )
            return
        # One copy out of the buffer (``bytes(buffer[:end])`` would make two).
        with memoryview(buffer) as view:
            complete = view[:end].tobytes()
        del buffer[: end + 1]
        self._scan_from = 0
        if len(buffer) > self._max_line:
            raise RemoteProtocolError(f"line longer than {self._max_line} bytes", status_hint=413)
        # A single line (the usual push body) is yielded as it is: split() would copy it.
        for line in complete.split(b"\n") if b"\n" in complete else (complete,):
            if len(line) > self._max_line:
                raise RemoteProtocolError(
                    f"line longer than {self._max_line} bytes", status_hint=413
                )
            yield line


class LineDecoder:
    """Decodes the first line of a body as it arrives, in pieces of ``piece`` characters.

    A push's line can be megabytes long; assembling it whole before decoding
    would let every connection hold that much. Bytes go in with :meth:`feed`;
    :meth:`take_pieces` returns the data of every whole ``piece`` characters
    of base64 text received so far (``piece`` is a multiple of 4, so a piece
    decodes on its own), and :meth:`take_rest` the data of the rest once the
    newline arrived. Anything after the newline is ignored, as GOST does. At
    most ``piece`` characters plus one fed buffer are held. A line longer
    than ``max_line`` characters sets :attr:`too_long` (answer 413); feeding
    never raises, decoding raises :class:`RemoteProtocolError` (400) for
    anything but canonical base64.
    """

    __slots__ = ("_max_line", "_piece", "_taken", "_text", "complete", "too_long")

    def __init__(self, max_line: int, piece: int = 64 * 1024) -> None:
        if piece < 4 or piece % 4:
            raise ValueError("piece must be a positive multiple of 4")
        self._text = bytearray()
        self._max_line = max_line
        self._piece = piece
        self._taken = 0  # characters of the line decoded and handed out already
        #: Whether the line's newline arrived (the rest of the body is ignored).
        self.complete = False
        #: Whether the line grew past ``max_line`` (its text was dropped).
        self.too_long = False

    @property
    def pending(self) -> int:
        """Characters of the line held, not decoded yet."""
        return len(self._text)

    @property
    def length(self) -> int:
        """Characters of the line received so far (its newline excluded)."""
        return self._taken + len(self._text)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.complete:
            return
        text = self._text
        start = len(text)
        text += data
        end = text.find(b"\n", start)
        if end >= 0:
            del text[end:]
            self.complete = True
        if self._taken + len(text) > self._max_line:
            self.too_long = True
            self.complete = True  # nothing more is read into it
            text.clear()

    def take_pieces(self) -> bytes:
        """The data of the whole pieces received (``b""`` if none), before the newline."""
        text = self._text
        if self.complete or len(text) < self._piece:
            return b""
        size = len(text) - len(text) % self._piece
        with memoryview(text) as view:
            data = decode_line(view[:size])
            # A fresh buffer for the remainder (under a piece): deleting the
            # front would keep the whole allocation for as long as the line.
            self._text = bytearray(view[size:])
        self._taken += size
        return data

    def take_rest(self) -> bytes:
        """The data of what is left of the line, once it is :attr:`complete`."""
        text = self._text
        data = decode_line(text)
        self._taken += len(text)
        text.clear()
        return data
