"""The MGET reply reader on scripted byte streams: every framing redis-server sends (RESP2 and RESP3), cut at
every chunk size, values landing in the sink's own buffers; damaged streams raise, never hang or misread.
(The same reader against a real redis-server: tests/integration/test_redis_store.py.)"""

from __future__ import annotations

import pytest

from kvstore.resp import ProtocolError, ReplyStream, RespError, encode_command


class ScriptedSocket:
    """Delivers ``data`` at most ``chunk`` bytes per call, as a socket may; empty once it is all read."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.chunk, self.offset = data, chunk, 0

    def recv(self, size: int) -> bytes:
        taken = self.data[self.offset : self.offset + min(size, self.chunk)]
        self.offset += len(taken)
        return taken

    def recv_into(self, view: memoryview) -> int:
        taken = self.recv(view.nbytes)
        view[: len(taken)] = taken
        return len(taken)


class SplitSink:
    """Asks for each value in two buffers (a 4-byte head, the rest), or a fresh one for index ``fresh``."""

    def __init__(self, fresh: int = -1) -> None:
        self.fresh = fresh
        self.values: dict[int, bytes | None] = {}
        self.given: dict[int, list[memoryview]] = {}

    def buffers(self, index: int, length: int) -> list[memoryview] | None:
        if index == self.fresh or length < 4:
            return None
        self.given[index] = [memoryview(bytearray(4)), memoryview(bytearray(length - 4))]
        return self.given[index]

    def received(self, index: int, value: list[memoryview] | None) -> None:
        if value is not None and index in self.given:
            assert all(a is b for a, b in zip(value, self.given[index]))  # the sink's own buffers, filled
        self.values[index] = None if value is None else b"".join(bytes(v) for v in value)


VALUES = [b"x" * 70_000 + b"\r\nend", None, b"", b"ab", bytes(range(256)) * 3]


def mget_reply(null: bytes) -> bytes:
    parts = [b"*%d\r\n" % len(VALUES)]
    for value in VALUES:
        parts.append(null if value is None else b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(parts)


def test_encode_command_is_resp_multibulk():
    assert encode_command("MGET", b"k\r\n1", "") == b"*3\r\n$4\r\nMGET\r\n$4\r\nk\r\n1\r\n$0\r\n\r\n"


@pytest.mark.parametrize("null", [b"$-1\r\n", b"_\r\n"], ids=["resp2", "resp3"])
@pytest.mark.parametrize("chunk", [1, 3, 7, 4096, 1 << 20])
def test_values_land_in_the_sinks_buffers_at_any_chunking(null, chunk):
    next_reply = b"+OK\r\n"
    sock = ScriptedSocket(mget_reply(null) + next_reply, chunk)
    stream, sink = ReplyStream(sock), SplitSink(fresh=4)
    stream.read_mget_into(len(VALUES), sink, first_index=10)
    assert sink.values == {10 + i: value for i, value in enumerate(VALUES)}
    assert stream.pending + (len(sock.data) - sock.offset) == len(next_reply)  # nothing of the next reply eaten


@pytest.mark.parametrize("reply, message", [
    (b"-ERR wrong number of arguments\r\n", "ERR wrong number of arguments"),
    (b"!21\r\nSYNTAX invalid syntax\r\n", "SYNTAX invalid syntax"),
    (b"-MOVED 3999 127.0.0.1:6381\r\n", "MOVED 3999 127.0.0.1:6381"),
])
def test_error_replies_raise_with_the_servers_message(reply, message):
    with pytest.raises(RespError) as raised:
        ReplyStream(ScriptedSocket(reply, 5)).read_mget_into(2, SplitSink())
    assert str(raised.value) == message


@pytest.mark.parametrize("reply", [
    b"*2\r\n$2\r\nab\r\n",  # fewer values than the array promised: the stream ends
    b"*2\r\n$5\r\nab",  # cut inside a value
    b"*2\r\n$2\r\nabXY$2\r\ncd\r\n",  # a value not followed by CRLF
    b"*2\r\n+OK\r\n$2\r\ncd\r\n",  # not a bulk string
    b"*2\r\n$zz\r\n",  # not a length
    b"*5\r\n",  # an array of another size
])
def test_damaged_streams_raise_protocol_errors(reply):
    with pytest.raises(ProtocolError):
        ReplyStream(ScriptedSocket(reply, 3)).read_mget_into(2, SplitSink())


def test_a_sink_whose_buffers_do_not_add_up_is_refused():
    class ShortSink(SplitSink):
        def buffers(self, index, length):
            return [memoryview(bytearray(length - 1))]

    with pytest.raises(ValueError, match="buffers of 1 bytes for a 2-byte value"):
        ReplyStream(ScriptedSocket(b"*1\r\n$2\r\nab\r\n", 64)).read_mget_into(1, ShortSink())


def test_pipelined_sets_join_the_framing_and_pass_large_parts_as_they_are():
    from kvstore.resp import encode_set_commands, value_size

    payload = memoryview(bytearray(b"p" * 20_000))  # past the inline limit: sent as it is
    chunks = encode_set_commands([("k1", (b"HDR", payload)), ("k2", b"small")], ttl_s=30)
    assert chunks[1] is payload and len(chunks) == 3
    assert chunks[0] == b"*5\r\n$3\r\nSET\r\n$2\r\nk1\r\n$20003\r\nHDR"
    assert chunks[2] == b"\r\n$2\r\nEX\r\n$2\r\n30\r\n*5\r\n$3\r\nSET\r\n$2\r\nk2\r\n$5\r\nsmall\r\n$2\r\nEX\r\n$2\r\n30\r\n"
    assert b"".join(bytes(c) for c in encode_set_commands([("k", (b"a", b"b"))])) == encode_command("SET", "k", b"ab")
    assert value_size((b"HDR", payload)) == 20_003 and value_size(b"") == 0


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_status_replies_give_each_error_and_stay_in_step(chunk):
    data = b"+OK\r\n-OOM command not allowed\r\n!11\r\nMOVED 1 x:1\r\n+OK\r\n$2\r\nab\r\n"
    stream = ReplyStream(ScriptedSocket(data, chunk))
    assert stream.read_statuses(4) == [None, "OOM command not allowed", "MOVED 1 x:1", None]
    with pytest.raises(ProtocolError):
        stream.read_statuses(1)  # a bulk string is no status: the connection is out of step
