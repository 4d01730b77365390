"""Many people at once, against a live server (gunicorn + gevent worker) with real clients:
no cross-talk, a full queue refused at once on every surface, cancel that frees the slot, 200
abandoned requests that leak nothing, fairness between clients, and a web side that keeps
answering while replies stream. One test runs 8 clients on the real model.

The fake "model" answers ``echo X`` with X and ``count N`` with "1 2 … N", one byte per token,
taking ``step_delay`` seconds per decode step (a sleep that releases the GIL, as llama.cpp does).
Fairness needs clients that the server can tell apart: it keys them by address, so those
tests connect from 127.0.0.2 and 127.0.0.3 (all of 127.0.0.0/8 is loopback on Linux).
"""

from __future__ import annotations

import json
import re
import socket
import threading
from contextlib import ExitStack, closing
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
import websocket

from tests.reply_page import ReplyPage
from tests.live_server import LiveServer, wait_until, wait_until_idle

ACK, FIN, PONG = "#a-c-k#", "#f-i-n#", "#-pong-#"
RECEIVE_DEADLINE = 30  # seconds any single message may take before the test fails
HUGE = 200_000  # maxNewTokens for replies meant to outlast the test
STEP = 0.01  # seconds per fake decode step, unless a test needs another
ENDLESS = "count 5000"  # 23,893 tokens: at STEP a step, 4 minutes, far past any deadline here
ENDLESS_SECONDS = 23_893 * STEP
# Room for it: a context of HUGE tokens (the fake's default 4096 would end it sooner) and
# maxNewTokens HUGE.
ENDLESS_FAKE = {"context_length": HUGE, "step_delay": STEP}
ENDLESS_SETTINGS = {"maxNewTokens": HUGE, "maxNewTokensLimit": HUGE}
FOLLOW_UP_DEADLINE = 60.0


# -- clients ---------------------------------------------------------------------------------

def original_socket(server: LiveServer, source: str | None = None) -> websocket.WebSocket:
    """A socket on the original protocol at ``/``, optionally from another loopback address."""
    options = {}
    if source:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=RECEIVE_DEADLINE,
                                        source_address=(source, 0))
        options["socket"] = sock
    return websocket.create_connection(server.ws_url + "/", timeout=RECEIVE_DEADLINE, **options)


def socket_reply(ws: websocket.WebSocket, prompt: str) -> list[str]:
    """Send a prompt; every message after ``#a-c-k#`` up to (not including) ``#f-i-n#``."""
    ws.send(prompt)
    assert ws.recv() == ACK
    messages = []
    while (message := ws.recv()) != FIN:
        messages.append(message)
    return messages


def rest_reply(server: LiveServer, prompt: str, **params) -> str:
    with requests.post(server.url + "/conversation", timeout=RECEIVE_DEADLINE, stream=True,
                       json={"userPrompt": prompt, "shouldStreamResponse": True, **params},
                       headers={"Accept": "text/plain"}) as response:
        assert response.status_code == 200, response.text
        return b"".join(response.iter_content(chunk_size=None)).decode()


def raw_rest_request(server: LiveServer, prompt: str, source: str = "127.0.0.1",
                     **params) -> socket.socket:
    """Start a streamed REST request on a bare socket (read it, or drop it to abandon it)."""
    body = json.dumps({"userPrompt": prompt, "shouldStreamResponse": True, **params}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=RECEIVE_DEADLINE,
                                    source_address=(source, 0))
    sock.sendall(b"POST /conversation HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                 b"Content-Type: application/json\r\nAccept: text/plain\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                 % (server.port, len(body), body))
    return sock


def read_rest_body(sock: socket.socket) -> str:
    """The body of a chunked HTTP/1.1 response read to its end."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    text = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        text, body = text + body[:size], body[size + 2:]
    return text.decode()


class _ElementText(HTMLParser):
    """The text inside the element with a given id, or inside the element with a given class
    within it (the reply's content, the error line of the UI)."""

    VOID = ("input", "br", "img", "hr", "meta", "path", "rect", "circle")

    def __init__(self, element_id: str, inner_class: str | None) -> None:
        super().__init__(convert_charrefs=True)
        self.element_id, self.inner_class = element_id, inner_class
        self.outer = self.inner = 0  # open-element depths inside each match
        self.found = False
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        opens = tag not in self.VOID
        if self.inner:
            self.inner += opens
        elif self.outer and self.inner_class in (attrs.get("class") or "").split():
            self.inner, self.found = 1, True
        elif not self.outer and attrs.get("id") == self.element_id:
            self.found = self.inner_class is None
            self.inner = int(self.found)
        if self.outer or attrs.get("id") == self.element_id:
            self.outer += opens

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        self.inner = max(0, self.inner - 1)
        self.outer = max(0, self.outer - 1)

    def handle_data(self, data):
        if self.inner:
            self.parts.append(data)


def element_text(fragment: str, element_id: str, inner_class: str | None = None) -> str | None:
    parser = _ElementText(element_id, inner_class)
    parser.feed(fragment)
    return "".join(parser.parts).strip() if parser.found else None


class UiClient:
    """The chat UI's socket as htmx drives it: form values as JSON, HTML fragments back."""

    def __init__(self, server: LiveServer) -> None:
        self.ws = websocket.create_connection(server.ws_url + "/ws/chat?surface=page",
                                              timeout=RECEIVE_DEADLINE)
        self.ws.recv()  # the sync: the conversation so far, the composer, the settings

    def send(self, **values) -> None:
        self.ws.send(json.dumps({**values, "HEADERS": {"HX-Request": "true"}}))

    def reply(self, prompt: str) -> tuple[str | None, str | None]:
        """(the reply's text, the error text) once the composer is enabled again."""
        self.send(userPrompt=prompt)
        page, error = None, None
        while True:
            fragment = self.ws.recv()
            turn = re.search(r'id="turn-(\d+)-reply"', fragment)
            if turn and page is None:
                page = ReplyPage(int(turn.group(1)))
            if page is not None:  # the reply's deltas, swapped in as htmx does
                page.apply(fragment)
            error = element_text(fragment, "chat-error") or error
            if _composer_enabled(fragment):
                return (page.text() if page and page.html else None), error

    def close(self) -> None:
        self.ws.close()


def _composer_enabled(fragment: str) -> bool:
    match = re.search(r'<textarea[^>]*>', fragment) if 'id="composer"' in fragment else None
    return bool(match) and "disabled" not in match.group(0)


# -- the server's side -----------------------------------------------------------------------

def worker_pid(server: LiveServer) -> int:
    """The gunicorn worker (the process that holds the engine) under the master."""
    master = server.process.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    assert len(children) == 1, f"expected one worker, found {children}"
    return int(children[0])


def process_status(pid: int) -> dict[str, int]:
    """Native threads and resident memory (kB) of a process, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return {"threads": int(fields["Threads"]), "rss_kb": int(fields["VmRSS"].split()[0])}


def within(seconds: float, call):
    """``call()``'s result, failing the test if it takes longer than ``seconds``.

    A deadline on the whole call: a socket's own timeout is no bound, since the server's
    keep-alive pings reset it.
    """
    result: list = []
    errors: list[BaseException] = []

    def run():
        try:
            result.append(call())
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"not done within {seconds} s"
    if errors:
        raise errors[0]
    return result[0]


def in_threads(*calls) -> list:
    """Run the calls at once, one thread each; their results, or the first exception raised."""
    results: list = [None] * len(calls)
    errors: list[BaseException] = []

    def run(index, call):
        try:
            results[index] = call()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(RECEIVE_DEADLINE * 4)
    assert not any(t.is_alive() for t in threads), "a client never finished"
    if errors:
        raise errors[0]
    return results


# -- many clients, each its own reply ---------------------------------------------------------

def test_eight_clients_at_once_each_get_their_own_reply(fake_server):
    server = fake_server.start(fake={"max_sequences": 4, "step_delay": 0.005})
    texts = [f"client {i} wants " + "xyz"[i % 3] * (5 + 7 * i) for i in range(8)]

    def over_socket(text):
        with closing(original_socket(server)) as ws:
            return "".join(socket_reply(ws, "echo " + text))

    def over_ui(text):
        client = UiClient(server)
        try:
            return client.reply("echo " + text)[0]
        finally:
            client.close()

    surfaces = [over_socket, lambda t: rest_reply(server, "echo " + t), over_ui]
    replies = in_threads(*[lambda i=i: surfaces[i % 3](texts[i]) for i in range(8)])
    assert replies == texts
    wait_until_idle(server)


@pytest.mark.real_model
def test_eight_clients_on_the_real_model_get_the_replies_they_get_alone(fake_server):
    server = fake_server.start(fake=None, parallelSlots=8, contextLength=1024,
                               maxNewTokens=40)
    questions = ["What is the capital of France?", "What is 2 + 2?",
                 "Name three colours.", "What is the largest planet?",
                 "Who wrote Romeo and Juliet?", "What do bees make?",
                 "How many days are in a week?", "What is the boiling point of water?"]
    params = {"temperature": 0}
    alone = [rest_reply(server, q, **params) for q in questions]

    def over_socket(question):
        with closing(original_socket(server)) as ws:
            ws.send("#-set-temp-#0")
            assert ws.recv() == "#-set-#"
            return "".join(socket_reply(ws, question))

    together = in_threads(*[
        (lambda q=q: over_socket(q)) if i % 2 else (lambda q=q: rest_reply(server, q, **params))
        for i, q in enumerate(questions)])
    assert together == alone
    assert all(alone) and len(set(alone)) == len(alone)  # eight different, non-empty replies


# -- a full queue ----------------------------------------------------------------------------

def test_a_full_queue_is_refused_at_once_on_every_surface(fake_server):
    server = fake_server.start(fake={"max_sequences": 1, **ENDLESS_FAKE}, queueSize=0,
                               **ENDLESS_SETTINGS)
    with closing(original_socket(server)) as busy, closing(original_socket(server)) as late:
        busy.send(ENDLESS)
        assert busy.recv() == ACK and busy.recv() == "1"  # it holds the only slot

        refused = requests.post(server.url + "/conversation", json={"userPrompt": "echo hi"},
                                timeout=RECEIVE_DEADLINE)
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) > 0

        late.send("echo hi")
        ack, error, fin = late.recv(), late.recv(), late.recv()
        assert (ack, fin) == (ACK, FIN) and error.startswith("Error: ")

        ui = UiClient(server)
        try:
            reply, error = ui.reply("echo hi")
        finally:
            ui.close()
        assert "busy" in error

        assert server.health()["busy"] == 1  # the running reply was never disturbed
    wait_until_idle(server)


# -- cancel ----------------------------------------------------------------------------------



def start_endless_over_socket(server: LiveServer):
    ws = original_socket(server)
    ws.send(ENDLESS)
    assert ws.recv() == ACK and ws.recv() == "1"
    return ws.close


def start_endless_over_rest(server: LiveServer):
    sock = raw_rest_request(server, ENDLESS)
    assert sock.recv(1024).startswith(b"HTTP/1.1 200")  # headers go out with the first token
    return sock.close


def start_endless_over_ui(server: LiveServer):
    client = UiClient(server)
    client.send(userPrompt=ENDLESS)
    client.ws.recv()  # the turn is on screen; the reply is being written
    return client.close


@pytest.mark.parametrize("start", [start_endless_over_socket, start_endless_over_rest,
                                   start_endless_over_ui], ids=["original", "rest", "ui"])
def test_a_client_that_leaves_frees_its_slot_for_the_next_request(fake_server, start):
    # finishRepliesWithoutWatchers false: a chat UI reply leaves with its last socket too.
    server = fake_server.start(fake={"max_sequences": 1, **ENDLESS_FAKE},
                               finishRepliesWithoutWatchers=False, **ENDLESS_SETTINGS)
    leave = start(server)
    wait_until(lambda: server.health()["busy"] == 1, what="generation started")
    leave()

    def follow_up():
        with closing(original_socket(server)) as ws:
            return "".join(socket_reply(ws, "echo next"))

    # Served while the abandoned reply would still be running, had it not been cancelled.
    assert FOLLOW_UP_DEADLINE < ENDLESS_SECONDS
    assert within(FOLLOW_UP_DEADLINE, follow_up) == "next"
    wait_until_idle(server)


def test_two_hundred_abandoned_requests_leak_no_threads_or_memory(fake_server):
    """vLLM's abort test, over the wire: 200 requests, dropped while streaming or queued."""
    # All 200 from one address, past the default per-client caps on purpose.
    server = fake_server.start(fake={"max_sequences": 4, **ENDLESS_FAKE, "step_delay": 0.002},
                               queueSize=256, queuePerClient=256, maxConnectionsPerClient=256,
                               **ENDLESS_SETTINGS)
    pid = worker_pid(server)

    def abandon_200() -> None:
        with ExitStack() as stack:
            for i in range(200):
                if i % 4 == 3:
                    ws = stack.enter_context(closing(original_socket(server)))
                    ws.send(ENDLESS)
                else:
                    stack.enter_context(closing(raw_rest_request(server, ENDLESS)))
            wait_until(lambda: (h := server.health())["busy"] + h["waiting"] == 200,
                       what="all 200 requests running or queued")
        # every connection is closed here, mid-stream or still waiting in the queue
        wait_until_idle(server)
        with closing(original_socket(server)) as ws:
            assert "".join(socket_reply(ws, "echo fresh")) == "fresh"

    abandon_200()  # warm-up: the first round grows pools and caches to their working size
    before = process_status(pid)
    abandon_200()
    abandon_200()
    after = process_status(pid)
    assert after["threads"] == before["threads"]
    assert after["rss_kb"] - before["rss_kb"] < 30_000, (before, after)


# -- fairness --------------------------------------------------------------------------------

def test_one_client_flooding_cannot_starve_another(fake_server):
    # The flood's ten requests all wait: past the default queuePerClient on purpose.
    server = fake_server.start(fake={"max_sequences": 1, "step_delay": 0.002}, queueSize=32,
                               queuePerClient=16)
    finished: list[str] = []
    lock = threading.Lock()

    def flood(i: int):
        text = read_rest_body(raw_rest_request(server, f"echo flood {i} " + "f" * 200,
                                               source="127.0.0.2"))
        with lock:
            finished.append(text.split()[1])
        return text

    def polite():
        wait_until(lambda: server.health()["waiting"] >= 9, what="the flood queued up")
        with closing(original_socket(server, source="127.0.0.3")) as ws:
            text = "".join(socket_reply(ws, "echo polite"))
        with lock:
            finished.append("polite")
        return text

    results = in_threads(*[lambda i=i: flood(i) for i in range(10)], polite)
    assert results[-1] == "polite"
    assert len(finished) == 11
    # Round-robin across clients: the polite client waits for at most the one flood request
    # ahead of it in the rotation, besides the one already running; never for the whole flood.
    assert finished.index("polite") <= 2, finished


# -- the web side never freezes --------------------------------------------------------------

def test_ping_and_health_answer_while_eight_replies_stream(fake_server):
    server = fake_server.start(fake={"max_sequences": 8, **ENDLESS_FAKE}, **ENDLESS_SETTINGS)
    with ExitStack() as stack:
        streams = [stack.enter_context(closing(original_socket(server))) for _ in range(8)]
        for ws in streams:
            ws.send(ENDLESS)
        for ws in streams:
            assert ws.recv() == ACK and ws.recv() == "1"
        idle = stack.enter_context(closing(original_socket(server)))
        idle.send("#-ping-#")
        assert idle.recv() == PONG
        response = requests.get(server.url + "/health", timeout=RECEIVE_DEADLINE)
        # answered while all 8 replies, which never end by themselves, were being generated
        assert response.status_code == 200 and response.json()["busy"] == 8
    wait_until_idle(server)
