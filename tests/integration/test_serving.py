"""Production serving: graceful shutdown on SIGTERM, and ``gunicorn 'tanglebox.serving:production_app()'``.

SIGTERM goes to gunicorn's master, as ``systemctl stop`` does with ``KillMode=mixed``; the
master passes it to the worker. The worker stops taking connections, the engine stops taking
new replies, running replies get ``graceful_timeout - 5`` seconds to finish, and any still
running then end with a message saying the server is shutting down. Nothing hangs: the
process exits (polled with a deadline).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import closing

import pytest
import requests
import websocket

from tests.conftest import ROOT
from tests.fake_backend import fake_reply
from tests.live_server import free_port

ACK, FIN = "#a-c-k#", "#f-i-n#"
RECEIVE_DEADLINE = 30
EXIT_DEADLINE = 40  # gunicorn's graceful timeout (30 s by default) plus a margin
CUT_SHORT = "Error: The server is shutting down; the reply was cut short."
HUGE = 200_000


def connect(url: str) -> websocket.WebSocket:
    return websocket.create_connection(url + "/", timeout=RECEIVE_DEADLINE)


def rest_stream(url: str, prompt: str, accept: str) -> requests.Response:
    response = requests.post(url + "/conversation", stream=True, timeout=RECEIVE_DEADLINE,
                             json={"userPrompt": prompt, "shouldStreamResponse": True},
                             headers={"Accept": accept})
    assert response.status_code == 200, response.text
    return response


def receive_until_fin(ws: websocket.WebSocket) -> list[str]:
    messages = []
    while (message := ws.recv()) != FIN:
        messages.append(message)
    return messages


def wait_ready(process: subprocess.Popen, url: str, log_path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"exited with {process.returncode}:\n" + (
            log_path.read_text(errors="replace"))
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)  # polling interval while the model loads
    pytest.fail(f"not ready within {timeout} s:\n" + log_path.read_text(errors="replace"))


def wait_for_exit(process: subprocess.Popen, timeout: float = EXIT_DEADLINE) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {timeout} s of SIGTERM")


def test_sigterm_lets_streaming_replies_finish_then_the_server_exits(fake_server):
    server = fake_server.start(fake={"max_sequences": 2, "step_delay": 0.01})
    expected = fake_reply("count 100")  # 291 tokens: about 3 s
    with closing(connect(server.ws_url)) as ws:
        ws.send("count 100")
        assert ws.recv() == ACK and ws.recv() == "1"
        rest = rest_stream(server.url, "count 100", "text/plain")
        chunks = rest.iter_content(chunk_size=None)
        first = next(chunks)

        server.process.send_signal(signal.SIGTERM)

        assert "1" + "".join(receive_until_fin(ws)) == expected
        assert (first + b"".join(chunks)).decode() == expected
        # The socket is still open, but the engine takes no new work: said at once.
        ws.send("echo one more")
        ack, refusal, fin = ws.recv(), ws.recv(), ws.recv()
        assert (ack, fin) == (ACK, FIN) and "shutting down" in refusal
    assert wait_for_exit(server.process) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/health", timeout=5)


def test_replies_that_outlast_the_drain_end_with_a_clear_message(fake_server, monkeypatch):
    # graceful timeout 6 s: the engine drains for 1 s, then ends what is still running.
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--graceful-timeout 6")
    server = fake_server.start(fake={"max_sequences": 2, "context_length": HUGE,
                                     "step_delay": 0.01},
                               maxNewTokens=HUGE, maxNewTokensLimit=HUGE)
    endless = "count 5000"  # 23,893 tokens: about 4 minutes
    with closing(connect(server.ws_url)) as ws:
        ws.send(endless)
        assert ws.recv() == ACK and ws.recv() == "1"
        events = rest_stream(server.url, endless, "text/event-stream").iter_lines()
        assert next(events).startswith(b"event: delta")

        server.process.send_signal(signal.SIGTERM)

        assert receive_until_fin(ws)[-1] == CUT_SHORT
        done = [json.loads(line[6:]) for line in events if line.startswith(b"data: ")][-1]
        assert done["finishReason"] == "shutdown"
    assert wait_for_exit(server.process) == 0


def test_a_plain_text_stream_cut_by_shutdown_ends_without_its_final_chunk(fake_server,
                                                                        monkeypatch):
    # Plain text cannot say "cut" in its body: the chunked stream ends without its
    # terminating zero-length chunk instead, which HTTP clients report as an incomplete body.
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--graceful-timeout 6")
    server = fake_server.start(fake={"context_length": HUGE, "step_delay": 0.01},
                               maxNewTokens=HUGE, maxNewTokensLimit=HUGE)
    endless = "count 5000"  # 23,893 tokens: about 4 minutes
    chunks = rest_stream(server.url, endless, "text/plain").iter_content(chunk_size=None)
    received = next(chunks)

    server.process.send_signal(signal.SIGTERM)

    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for chunk in chunks:
            received += chunk
    assert fake_reply(endless).startswith(received.decode())  # what came is the reply so far
    assert len(received.decode()) < len(fake_reply(endless))
    assert wait_for_exit(server.process) == 0
    assert "Traceback" not in server.log()


@pytest.mark.real_model
def test_gunicorn_serves_the_production_app_and_stops_gracefully(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"contextLength": 2048, "parallelSlots": 2}),
                        encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TANGLEBOX_", "GUNICORN_"))}
    env["TANGLEBOX_SETTINGS"] = str(settings)
    log = open(tmp_path / "gunicorn.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "-b", f"127.0.0.1:{port}",
         "--graceful-timeout", "6", "tanglebox.serving:production_app()"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(process, url, tmp_path / "gunicorn.log")
        answer = requests.post(url + "/conversation", timeout=120,
                               json={"userPrompt": "What is 2 + 2?", "temperature": 0})
        assert answer.status_code == 200 and "4" in answer.text
        with closing(connect(f"ws://127.0.0.1:{port}")) as ws:
            ws.send("#-ping-#")
            assert ws.recv() == "#-pong-#"
            ws.send("#-set-temp-#0")
            assert ws.recv() == "#-set-#"
            ws.send("Write a long story about a dragon who learns to bake bread.")
            assert ws.recv() == ACK
            ws.recv()  # the first words: the reply is streaming

            process.send_signal(signal.SIGTERM)  # drain: 6 - 5 = 1 s, far less than the story

            assert receive_until_fin(ws)[-1] == CUT_SHORT
        assert wait_for_exit(process) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
