"""A remote model under the production stack (gunicorn's gevent worker), against the stdlib fake
upstream: its network waits are greenlets', so the server keeps answering while a remote reply
stalls, and a client that leaves closes the upstream stream. (The live tests of every surface
against real engines are test_remote_*.py.)"""

from __future__ import annotations

import pytest
import requests

from tests.fake_upstream import FakeUpstream
from tests.live_server import wait_until

KEY = "sk-gevent-test-9"
RECEIVE_DEADLINE = 30


@pytest.fixture
def upstream(monkeypatch):
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", KEY)  # the server process inherits it
    with FakeUpstream(key=KEY) as fake:
        yield fake


def remote_health(server) -> dict:
    return next(m for m in server.health()["models"] if m["id"] == "big")


def test_a_stalled_remote_reply_blocks_nothing_and_its_client_leaving_closes_it(
        fake_server, upstream):
    server = fake_server.start(fake={}, remoteEndpoints=[
        {"name": "big", "baseUrl": upstream.base_url, "apiKeyEnv": "FAKE_UPSTREAM_KEY"}])
    wait_until(lambda: remote_health(server)["state"] == "ready", what="the remote model ready")
    upstream.mode, upstream.stall_after = "stall", 1
    body = {"model": "big", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True,
                       timeout=RECEIVE_DEADLINE) as reply:
        lines = reply.iter_lines()
        assert any(b'"content":"Hello"' in line for line in lines)  # the first piece, at once
        # the upstream sends nothing more; the server answers meanwhile, on every route
        assert remote_health(server)["busy"] == 1
        local = requests.post(server.url + "/v1/chat/completions", timeout=RECEIVE_DEADLINE,
                              json={"messages": [{"role": "user", "content": "echo still"}]})
        assert local.json()["choices"][0]["message"]["content"] == "still"
    assert upstream.client_gone.wait(RECEIVE_DEADLINE)
    wait_until(lambda: remote_health(server)["busy"] == 0, what="the remote place free")
    assert KEY not in server.log()
