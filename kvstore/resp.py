"""Redis's wire protocol (RESP2 and RESP3, which redis-py 8 speaks by default), as far as kvtier's bulk reads
and writes need it: an MGET whose values stream from the socket straight into buffers the caller picks (a
staged KV block), never through Python ``bytes``; pipelined SETs whose values go from the caller's buffers (a
gathered KV block) to the socket, never joined into one. Pure Python.

Why not redis-py's reply parser here: it copies every value twice while holding the GIL (into the parser's
buffer, then into a ``bytes``), about 0.7 CPU-seconds per GB measured on the 2-core CPU machine, so one
process cannot read Redis faster than about 1.4 GB/s however many connections it opens. ``recv_into`` a
caller's buffer is the kernel's one copy, with the GIL released (about 0.18 CPU-seconds per GB there), so
readers on several connections scale with cores. redis-py still owns the connections (TLS, AUTH, SELECT, the
pool); this module only reads the reply of a command already sent on one.

The same holds for writes: redis-py packs a pipeline's commands (with hiredis, every argument) into new bytes,
after the caller joined each value's header and payload: 1.6-1.8 client CPU-seconds per GB and 0.45-0.55 GB/s
for 512 KiB values on that machine, against 0.19-0.28 s/GB and 2.1-3.1 GB/s when the framing and a value's
small header are joined and its payload is handed to ``sendall`` as it is (``encode_set_commands``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_READ_AHEAD = 1 << 16  # bytes asked of the socket when a reply's framing (not a value's body) is read
_INLINE_LIMIT = 1 << 14  # a value's parts up to this size are joined into the framing; larger ones are sent as
# they are (a KV payload in pinned host memory)
Value = bytes | memoryview | tuple[bytes | memoryview, ...]  # one buffer, or a tuple of its parts in order


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


def value_size(value: Value) -> int:
    """Bytes of a value, one buffer or parts."""
    parts = value if isinstance(value, tuple) else (value,)
    return sum(memoryview(part).nbytes for part in parts)


def encode_set_commands(items: Sequence[tuple[str, Value]], ttl_s: int | None = None) -> list[bytes | memoryview]:
    """Pipelined ``SET key value [EX ttl_s]`` commands, as chunks to ``sendall`` in order: the framing and the
    small parts joined, each large part passed as it is (never copied). Redis sees one value per key, its parts
    one after another."""
    expiry = b"$2\r\nEX\r\n" + _bulk(b"%d" % ttl_s) if ttl_s is not None else b""
    chunks: list[bytes | memoryview] = []
    framing: list[bytes] = []
    for key, value in items:
        parts = value if isinstance(value, tuple) else (value,)
        framing += [b"*5\r\n" if expiry else b"*3\r\n", b"$3\r\nSET\r\n", _bulk(key.encode()),
                    b"$%d\r\n" % value_size(parts)]
        for part in parts:
            if memoryview(part).nbytes <= _INLINE_LIMIT:
                framing.append(bytes(part))
                continue
            if framing:
                chunks.append(b"".join(framing))
                framing = []
            chunks.append(part)
        framing += [b"\r\n", expiry]
    if framing:
        chunks.append(b"".join(framing))
    return chunks


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


class ReplyStream:
    """Reads replies from ``sock`` (``recv``/``recv_into``); holds what it read ahead of the current reply."""

    def __init__(self, sock) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._start = 0  # self._buffer[self._start:] is read but not yet consumed

    def read_mget_into(self, count: int, sink: ValueSink, first_index: int = 0) -> None:
        """Consume an MGET reply of ``count`` values, each into ``sink`` as index ``first_index + i``."""
        header = self._line()
        if (error := self._error_in(header)) is not None:
            raise RespError(error)
        if header != b"*%d" % count:
            raise ProtocolError(f"expected an array of {count} values, got {header[:40]!r}")
        for offset in range(count):
            self._read_value_into(first_index + offset, sink)

    def read_statuses(self, count: int) -> list[str | None]:
        """Consume the replies of ``count`` commands answered by a status (``+OK``): None for each success, the
        message of each error reply. The stream stays in step after errors; anything else is a ProtocolError."""
        statuses: list[str | None] = []
        for _ in range(count):
            line = self._line()
            if line[:1] == b"+":
                statuses.append(None)
            elif (error := self._error_in(line)) is not None:
                statuses.append(error)
            else:
                raise ProtocolError(f"expected a status reply, got {line[:40]!r}")
        return statuses

    def _error_in(self, header: bytes) -> str | None:
        """The message of an error reply that starts with ``header`` (consumed), None if it is not one."""
        if header[:1] == b"-":  # a simple error
            return header[1:].decode(errors="replace")
        if header[:1] == b"!":  # RESP3's blob error: its length, then the message
            return self._take(_length(header) + 2)[:-2].decode(errors="replace")
        return None

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
