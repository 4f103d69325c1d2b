"""Redis's wire protocol (RESP2 and RESP3, which redis-py 8 speaks by default), as far as kvtier's bulk reads
need it: an MGET whose values stream from the socket straight into buffers the caller picks (a staged KV
block), never through Python ``bytes``. Pure Python.

Why not redis-py's reply parser here: it copies every value twice while holding the GIL (into the parser's
buffer, then into a ``bytes``), about 0.7 CPU-seconds per GB measured on the 2-core CPU machine, so one
process cannot read Redis faster than about 1.4 GB/s however many connections it opens. ``recv_into`` a
caller's buffer is the kernel's one copy, with the GIL released (about 0.18 CPU-seconds per GB there), so
readers on several connections scale with cores. redis-py still owns the connections (TLS, AUTH, SELECT, the
pool); this module only reads the reply of a command already sent on one.
"""

from __future__ import annotations

from typing import Protocol

_READ_AHEAD = 1 << 16  # bytes asked of the socket when a reply's framing (not a value's body) is read


class RespError(Exception):
    """Redis answered the command with an error reply (``-ERR ...``, ``-MOVED ...``)."""


class ProtocolError(ConnectionError):
    """The bytes on the connection are not the reply expected: the connection is unusable."""


class ValueSink(Protocol):
    """Where each value of a multi-key read goes; ``index`` is the key's position in the whole read."""

    def buffers(self, index: int, length: int) -> list[memoryview] | None:
        """Writable byte views, ``length`` bytes in all, to receive the value in order; None: a fresh buffer."""

    def received(self, index: int, value: list[memoryview] | None) -> None:
        """The value is in the views (those ``buffers`` gave, or one fresh buffer); None: the key is absent."""


def encode_command(*parts: str | bytes) -> bytes:
    """A command as RESP2 multi-bulk bytes."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


class ReplyStream:
    """Reads replies from ``sock`` (``recv``/``recv_into``); holds what it read ahead of the current reply."""

    def __init__(self, sock) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._start = 0  # self._buffer[self._start:] is read but not yet consumed

    def read_mget_into(self, count: int, sink: ValueSink, first_index: int = 0) -> None:
        """Consume an MGET reply of ``count`` values, each into ``sink`` as index ``first_index + i``."""
        header = self._line()
        if header[:1] == b"-":  # a simple error
            raise RespError(header[1:].decode(errors="replace"))
        if header[:1] == b"!":  # RESP3's blob error: its length, then the message
            raise RespError(self._take(_length(header) + 2)[:-2].decode(errors="replace"))
        if header != b"*%d" % count:
            raise ProtocolError(f"expected an array of {count} values, got {header[:40]!r}")
        for offset in range(count):
            self._read_value_into(first_index + offset, sink)

    def _read_value_into(self, index: int, sink: ValueSink) -> None:
        header = self._line()
        if header == b"_":  # RESP3's null
            sink.received(index, None)
            return
        if header[:1] != b"$":
            raise ProtocolError(f"expected a bulk string, got {header[:40]!r}")
        length = _length(header)
        if length < 0:  # RESP2's null bulk string
            sink.received(index, None)
            return
        views = sink.buffers(index, length) or [memoryview(bytearray(length))]
        if sum(view.nbytes for view in views) != length:
            raise ValueError(f"sink gave buffers of {sum(v.nbytes for v in views)} bytes for a {length}-byte value")
        for view in views:
            self._read_exactly_into(view.cast("B") if view.format != "B" else view)
        if self._take(2) != b"\r\n":
            raise ProtocolError("bulk string not followed by CRLF")
        sink.received(index, views)

    def _line(self) -> bytes:
        while (end := self._buffer.find(b"\r\n", self._start)) < 0:
            self._fill()
        line = bytes(self._buffer[self._start : end])
        self._start = end + 2
        return line

    def _take(self, size: int) -> bytes:
        while len(self._buffer) - self._start < size:
            self._fill()
        taken = bytes(self._buffer[self._start : self._start + size])
        self._start += size
        return taken

    def _read_exactly_into(self, view: memoryview) -> None:
        """Fill ``view``: first from what was read ahead, then straight from the socket."""
        ahead = min(len(self._buffer) - self._start, view.nbytes)
        with memoryview(self._buffer) as buffered:  # released before the buffer next grows or shrinks
            view[:ahead] = buffered[self._start : self._start + ahead]
        self._start += ahead
        filled = ahead
        while filled < view.nbytes:
            received = self._sock.recv_into(view[filled:])
            if received == 0:
                raise ProtocolError("connection closed in the middle of a value")
            filled += received

    def _fill(self) -> None:
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        chunk = self._sock.recv(_READ_AHEAD)
        if not chunk:
            raise ProtocolError("connection closed in the middle of a reply")
        self._buffer += chunk

    @property
    def pending(self) -> int:
        """Bytes read past the last consumed reply (nonzero: the connection is out of step)."""
        return len(self._buffer) - self._start


def _length(header: bytes) -> int:
    """The length in a ``$`` or ``!`` header line."""
    try:
        return int(header[1:])
    except ValueError:
        raise ProtocolError(f"bad length in {header[:40]!r}") from None
