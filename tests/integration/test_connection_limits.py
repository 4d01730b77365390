"""Bounded connections against a live server (issue 14, class 2): bodies that never finish
arriving are answered 408 and dropped, one address (or all of them) cannot hold more than its
cap of requests and sockets (503 beyond it, a socket refused before its upgrade), and
``/health`` answers throughout. The caps are small here so the floods stay small."""

from __future__ import annotations

import socket
from contextlib import ExitStack, closing

import pytest
import requests
import websocket

from tests.integration.test_concurrency import RECEIVE_DEADLINE, original_socket
from tests.live_server import wait_until

PER_CLIENT = 20
SLOW_BODIES = 30
READ_TIMEOUT = 3


def stalled_post(server) -> socket.socket:
    """A POST whose headers promise 100,000 bytes of body, of which it sends five."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=RECEIVE_DEADLINE)
    sock.sendall(b"POST /conversation HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{\"use")
    return sock


def status_then_close(sock: socket.socket) -> int:
    """The response's status code, once the server has closed the connection."""
    data = b""
    while chunk := sock.recv(65536):  # ends when the server closes; raises at the deadline
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_bodies_that_never_arrive_are_cut_off_and_health_answers_meanwhile(fake_server):
    server = fake_server.start(fake={}, maxConnectionsPerClient=PER_CLIENT,
                               requestReadTimeoutSeconds=READ_TIMEOUT)
    with ExitStack() as stack:
        stalled = [stack.enter_context(closing(stalled_post(server)))
                   for _ in range(SLOW_BODIES)]
        assert requests.get(server.url + "/health", timeout=RECEIVE_DEADLINE).status_code == 200
        statuses = [status_then_close(sock) for sock in stalled]
    assert set(statuses) <= {408, 503}, statuses
    # Past the cap, refused at once; those within it, cut off at the read deadline.
    assert statuses.count(503) >= SLOW_BODIES - PER_CLIENT, statuses
    assert 408 in statuses
    reply = requests.post(server.url + "/conversation", json={"userPrompt": "echo ok"},
                          timeout=RECEIVE_DEADLINE)
    assert reply.status_code == 200 and reply.text.startswith("ok")


def refused_status(call) -> int:
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        call()
    return refused.value.status_code


def test_sockets_past_the_cap_per_address_are_refused_before_the_upgrade(fake_server):
    server = fake_server.start(fake={}, maxConnectionsPerClient=3)
    with ExitStack() as stack:
        held = [stack.enter_context(closing(original_socket(server))) for _ in range(3)]
        for ws in held:
            ws.send("#-ping-#")
            assert ws.recv() == "#-pong-#"
        assert refused_status(lambda: original_socket(server)) == 503
        assert refused_status(lambda: websocket.create_connection(
            server.ws_url + "/ws/chat", timeout=RECEIVE_DEADLINE)) == 503
        assert requests.get(server.url + "/conversation", params={"userPrompt": "echo x"},
                            timeout=RECEIVE_DEADLINE).status_code == 503
        assert requests.get(server.url + "/health", timeout=RECEIVE_DEADLINE).status_code == 200
        # Another address is not held to this one's cap.
        with closing(original_socket(server, source="127.0.0.2")) as other:
            other.send("#-ping-#")
            assert other.recv() == "#-pong-#"
        held.pop().close()
        # The closed socket's place is free again (once the server has seen the close).
        fresh = wait_until(lambda: _connects(server), RECEIVE_DEADLINE, "a place freed")
        fresh.close()


def test_the_total_cap_holds_across_addresses(fake_server):
    server = fake_server.start(fake={}, maxConnections=4, maxConnectionsPerClient=3)
    with ExitStack() as stack:
        for source in ("127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.0.3"):
            stack.enter_context(closing(original_socket(server, source=source)))
        assert refused_status(lambda: original_socket(server, source="127.0.0.4")) == 503
        assert requests.get(server.url + "/health", timeout=RECEIVE_DEADLINE).status_code == 200


def _connects(server):
    try:
        return original_socket(server)
    except websocket.WebSocketBadStatusException:
        return None


def raw_exchange(server, request: bytes) -> int:
    with closing(socket.create_connection(("127.0.0.1", server.port),
                                          timeout=RECEIVE_DEADLINE)) as sock:
        sock.sendall(request)
        return int(sock.recv(65536).split(b" ", 2)[1])


def test_chunked_bodies_are_read_and_a_malformed_one_is_a_400(fake_server):
    server = fake_server.start(fake={})
    head = (b"POST /conversation HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    body = b'{"userPrompt": "echo hi"}'
    assert raw_exchange(server, head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)) == 200
    assert raw_exchange(server, head + b"zz\r\n" + body + b"\r\n0\r\n\r\n") == 400
