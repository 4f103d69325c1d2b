"""The test helper's redis-server survives a port taken between drawing it and binding it (a CI flake, stop 20)."""

from __future__ import annotations

import socket

from tests.redis_server import PortTakenError, RedisServer, free_port

import pytest


def _held_socket() -> socket.socket:
    """Bound, not listening: redis-server cannot bind the port, and a client's connect is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def test_a_first_start_on_a_taken_port_draws_another(tmp_path):
    held = _held_socket()
    drawn = iter([held.getsockname()[1], free_port()])
    server = RedisServer(tmp_path, pick_port=lambda: next(drawn))
    try:
        server.start()
        assert server.port != held.getsockname()[1]
        assert server.client().ping()
    finally:
        server.stop()
        held.close()


def test_an_explicit_port_that_is_taken_fails_with_the_reason(tmp_path):
    held = _held_socket()
    server = RedisServer(tmp_path, port=held.getsockname()[1])
    try:
        with pytest.raises(PortTakenError, match="Address already in use"):
            server.start()
    finally:
        server.stop()
        held.close()


def test_a_first_start_whose_every_draw_is_taken_fails_instead_of_returning_no_server(tmp_path):
    held = _held_socket()
    server = RedisServer(tmp_path, pick_port=lambda: held.getsockname()[1])
    try:
        with pytest.raises(PortTakenError):
            server.start()
        assert server.process is None
    finally:
        server.stop()
        held.close()
