"""``/conversation`` against a live server (gunicorn + gevent worker) with real HTTP clients:
streaming as generated, disconnects that cancel, tokens, the access log, and the real model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import requests

from tests.conftest import ROOT
from tests.live_server import wait_until

STEP = {"step_delay": 0.05}  # each fake token takes 50 ms, so a test can act mid-reply


def read_sse(response) -> list[tuple[str, dict]]:
    events, fields = [], {}
    for line in response.iter_lines(decode_unicode=True):
        if line:
            key, _, value = line.partition(": ")
            fields[key] = value
        elif fields:
            events.append((fields["event"], json.loads(fields["data"])))
            fields = {}
    return events


def test_streamed_chunks_arrive_while_the_reply_is_still_being_generated(fake_server):
    server = fake_server.start(fake=STEP)
    with requests.post(server.url + "/conversation", stream=True, timeout=30,
                       json={"userPrompt": "count 20", "shouldStreamResponse": True}) as reply:
        assert reply.status_code == 200
        assert reply.headers["Transfer-Encoding"] == "chunked"
        assert reply.headers["X-Accel-Buffering"] == "no"
        chunks = reply.iter_content(chunk_size=None, decode_unicode=True)
        first = next(chunks)
        # Nothing is buffered on the way: the first token is here while the rest is still
        # being generated.
        assert server.health()["busy"] == 1
        text = first + "".join(chunks)
    assert text == " ".join(str(i) for i in range(1, 21))


def test_server_sent_events_arrive_as_generated_and_end_with_done(fake_server):
    server = fake_server.start(fake=STEP)
    with requests.get(server.url + "/conversation", stream=True, timeout=30,
                      params={"userPrompt": "count 10"},
                      headers={"Accept": "text/event-stream"}) as reply:
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        events = read_sse(reply)
    assert [name for name, _ in events][-1] == "done"
    assert "".join(data["text"] for name, data in events if name == "delta") == \
        events[-1][1]["response"] == "1 2 3 4 5 6 7 8 9 10"


def test_a_client_that_disconnects_mid_stream_frees_its_slot(fake_server):
    server = fake_server.start(fake=STEP)
    # 1,000 tokens at 50 ms each would take 50 s: only a cancel frees the slot in time.
    reply = requests.get(server.url + "/conversation", stream=True, timeout=30,
                         params={"userPrompt": "count 500", "shouldStreamResponse": "true"})
    chunks = reply.iter_content(chunk_size=None)
    next(chunks), next(chunks)
    assert server.health()["busy"] == 1
    reply.close()
    wait_until(lambda: server.health()["busy"] == 0, timeout=10, what="slot freed")
    after = requests.post(server.url + "/conversation", json={"userPrompt": "echo still here"},
                          timeout=30)
    assert after.status_code == 200 and after.text == "still here"


def test_a_client_that_disconnects_while_waiting_for_a_whole_reply_frees_its_slot(fake_server):
    server = fake_server.start(fake=STEP)
    client = socket.create_connection(("127.0.0.1", server.port))
    client.sendall(b"GET /conversation?userPrompt=count+500 HTTP/1.1\r\n"
                   b"Host: 127.0.0.1\r\n\r\n")
    wait_until(lambda: server.health()["busy"] == 1, what="generation started")
    client.close()
    wait_until(lambda: server.health()["busy"] == 0, timeout=10, what="slot freed")
    assert requests.get(server.url + "/conversation?userPrompt=echo+ok", timeout=30).text == "ok"


def test_a_chunked_body_over_the_limit_is_413(fake_server):
    server = fake_server.start(fake={}, maxRequestBytes=4096)
    body = json.dumps({"userPrompt": "x" * 10_000}).encode()
    pieces = (body[i:i + 1000] for i in range(0, len(body), 1000))  # no Content-Length
    response = requests.post(server.url + "/conversation", data=pieces, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and "maxRequestBytes" in response.text
    assert requests.get(server.url + "/conversation?userPrompt=echo+ok", timeout=30).text == "ok"


def test_a_burst_of_bad_requests_leaves_the_server_healthy(fake_server):
    server = fake_server.start(fake={}, maxRequestBytes=4096)
    session = requests.Session()
    for index in range(100):
        bad = [{"data": "[" * 3000}, {"data": "x" * 5000}, {"json": {"temperature": "hot"}},
               {"json": [1, 2]}][index % 4]
        response = session.post(server.url + "/conversation", timeout=30,
                                headers={"Content-Type": "application/json"}, **bad)
        assert response.status_code in (400, 413)
    assert server.health()["status"] == "ok"
    assert session.get(server.url + "/conversation?userPrompt=echo+fine", timeout=30).text == "fine"


def tokens_cli(*args: str, cwd) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGLEBOX_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "tanglebox", "tokens", *args,
                             "--settings", str(cwd / "settings.json")], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


def test_tokens_on_a_live_server_change_without_restart_and_never_reach_the_log(fake_server,
                                                                                tmp_path):
    server = fake_server.start(fake={}, isApiTokensRequired=True, enableWebLogOutput=True)
    url = server.url + "/conversation"
    refused = requests.get(url, params={"userPrompt": "echo hi"}, timeout=30)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")

    token = tokens_cli("add", "alice", cwd=tmp_path)  # while the server runs
    by_query = requests.get(url, params={"userPrompt": "echo hi", "token": token}, timeout=30)
    by_header = requests.post(url, json={"userPrompt": "echo hi"}, timeout=30,
                              headers={"Authorization": f"Bearer {token}"})
    assert (by_query.status_code, by_query.text) == (200, "hi")
    assert (by_header.status_code, by_header.text) == (200, "hi")

    hashed = tokens_cli("add", "bot", "--hashed", cwd=tmp_path)
    assert requests.get(url, params={"userPrompt": "echo hi", "token": hashed},
                        timeout=30).status_code == 200

    tokens_cli("revoke", "alice", cwd=tmp_path)
    again = requests.get(url, params={"userPrompt": "echo hi", "token": token}, timeout=30)
    assert again.status_code == 401 and again.content == refused.content

    wait_until(lambda: server.log().count('"GET /conversation') >= 4, what="access log lines")
    log = server.log()
    assert token not in log and hashed not in log and "token=" not in log


@pytest.mark.real_model
def test_the_real_model_answers_through_every_reply_format(fake_server):
    server = fake_server.start(fake=None, temperature=0, contextLength=1024)
    question = {"userPrompt": "What is 2 + 2?", "maxNewTokens": 32}
    plain = requests.post(server.url + "/conversation", json=question, timeout=120)
    assert plain.status_code == 200 and "4" in plain.text

    as_json = requests.post(server.url + "/conversation", json=question, timeout=120,
                            headers={"Accept": "application/json"}).json()
    assert as_json["response"] == plain.text  # temperature 0: the same reply twice
    assert as_json["usage"]["promptTokens"] > 0 and as_json["usage"]["completionTokens"] > 0
    assert "SmolLM2" in as_json["model"]

    with requests.post(server.url + "/conversation", timeout=120, stream=True,
                       json={**question, "shouldStreamResponse": True}) as streamed:
        text = "".join(streamed.iter_content(chunk_size=None, decode_unicode=True))
    assert text == plain.text  # streamed and whole replies are identical
