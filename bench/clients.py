"""The benchmark's clients: one streamed reply per call over each surface, and the probes.

Every client records when its prompt went out and when each chunk of the reply came back
(``time.monotonic``), so time to first token and inter-token latency are measured the way a
user sees them: on the client's side of the socket. Connecting and configuring a socket happen
before the clock starts (``prepare``); ``send`` is what is timed.

Clients are plain threads (no gevent in the benchmark), each with its own connection.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Callable

import requests
import websocket

# A fragment that shows reply text (ui_socket's docstring): blocks that just finished, the open
# tail with some text (not the typing dots, not its deletion), lines of an open code block, or
# the whole reply again.
# The reply's info: "Reply tokens 128", the model's count (the text the UI shows, rendered
# Markdown, can tokenize to fewer tokens than the model wrote).
REPLY_TOKENS = re.compile(r"<dt>Reply tokens</dt><dd>(\d+)</dd>")
REPLY_WITH_TEXT = re.compile(
    r'<div hx-swap-oob="beforebegin:#turn-\d+-reply-open(?:-line)?">'
    r'|<span id="turn-\d+-reply-open-line"'
    r'|<div id="turn-\d+-reply-open"[^>]*hx-swap-oob="true">(?!<span class="typing")'
    r'|<article id="turn-\d+-reply"[^>]*>(?:(?!</article>).)*?'
    r'<div class="message__content markdown">'
    r'(?!</div>|<span class="typing"|<div id="turn-\d+-reply-open"[^>]*><span class="typing")',
    re.S)
REPLY_TIMEOUT = 300.0  # seconds a single reply may take before the client gives up


@dataclass
class Reply:
    """What one client saw of one reply."""

    sent_at: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""
    finished_at: float = 0.0
    tokens: int | None = None  # as the server counted them; None: count ``text``'s tokens


class OriginalSocketClient:
    """The original websocket at ``/``: ``#-set-…-#`` first, then prompt → ``#a-c-k#`` … ``#f-i-n#``."""

    name = "original socket"

    def __init__(self, ws_url: str, max_tokens: int) -> None:
        self.ws_url = ws_url.rstrip("/") + "/"
        self.max_tokens = max_tokens
        self.ws: websocket.WebSocket | None = None

    def prepare(self) -> None:
        self.ws = websocket.create_connection(self.ws_url, timeout=REPLY_TIMEOUT)
        for setting in ("#-set-temp-#0", f"#-set-max-tokens-#{self.max_tokens}"):
            self.ws.send(setting)
            answer = self.ws.recv()
            if answer != "#-set-#":
                raise RuntimeError(f"{setting} was answered {answer!r}")

    def send(self, prompt: str) -> Reply:
        reply = Reply(sent_at=time.monotonic())
        self.ws.send(prompt)
        if self.ws.recv() != "#a-c-k#":
            reply.error = "no #a-c-k#"
            return reply
        parts = []
        while True:
            message = self.ws.recv()
            now = time.monotonic()
            if message == "#f-i-n#":
                break
            if message.startswith("Error:"):
                reply.error = message
                continue
            reply.chunk_times.append(now)
            parts.append(message)
        reply.text = "".join(parts)
        reply.finished_at = time.monotonic()
        return reply

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


class RestStreamClient:
    """``POST /conversation`` with ``shouldStreamResponse``: text/plain, chunked as generated."""

    name = "REST stream"

    def __init__(self, url: str, max_tokens: int) -> None:
        self.url = url.rstrip("/") + "/conversation"
        self.max_tokens = max_tokens
        self.session = requests.Session()

    def prepare(self) -> None:
        self.session.get(self.url.rsplit("/", 1)[0] + "/health", timeout=30)  # open the connection

    def send(self, prompt: str) -> Reply:
        reply = Reply(sent_at=time.monotonic())
        body = {"userPrompt": prompt, "temperature": 0, "maxNewTokens": self.max_tokens,
                "shouldStreamResponse": True}
        with self.session.post(self.url, json=body, stream=True, timeout=REPLY_TIMEOUT,
                               headers={"Accept": "text/plain"}) as response:
            if response.status_code != 200:
                reply.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return reply
            parts = []
            for chunk in response.iter_content(chunk_size=None, decode_unicode=False):
                if chunk:
                    reply.chunk_times.append(time.monotonic())
                    parts.append(chunk)
        reply.text = b"".join(parts).decode("utf-8", errors="replace")
        reply.finished_at = time.monotonic()
        return reply

    def close(self) -> None:
        self.session.close()


class UiSocketClient:
    """The chat UI's socket at ``/ws/chat``, as htmx drives it: JSON form values in, HTML out.

    The UI sends a reply's finished blocks once and its open block again, at most ~12 times a
    second (less often when many replies stream: ``ui_socket.RenderPacer``), so its chunks are
    updates, not tokens: its time to first token is real, its inter-token latency an average.
    """

    name = "UI socket"

    def __init__(self, ws_url: str, max_tokens: int) -> None:
        self.ws_url = ws_url.rstrip("/") + "/ws/chat?surface=page"
        self.max_tokens = max_tokens
        self.ws: websocket.WebSocket | None = None

    def prepare(self) -> None:
        self.ws = websocket.create_connection(self.ws_url, timeout=REPLY_TIMEOUT)
        self.ws.recv()  # the sync: conversation, composer, settings
        self._send(action="settings", temperature="0", maxNewTokens=str(self.max_tokens),
                   systemPrompt="")
        answer = self.ws.recv()
        if "Applied" not in answer:
            raise RuntimeError(f"the UI refused the settings: {answer[:200]!r}")

    def send(self, prompt: str) -> Reply:
        reply = Reply(sent_at=time.monotonic())
        self._send(userPrompt=prompt)
        shown: list[str] = []  # the fragments that showed reply text, read at the end
        while True:
            fragment = self.ws.recv()
            now = time.monotonic()
            # Only cheap string tests per fragment: the HTML is parsed once, at the end, so
            # the measuring client takes as little CPU from the server as the other clients.
            if REPLY_WITH_TEXT.match(fragment):
                reply.chunk_times.append(now)
                shown.append(fragment)
            error = _element_text(fragment, "chat-error")  # tests the id before parsing
            if error:
                reply.error = error
            if _composer_enabled(fragment):
                counted = REPLY_TOKENS.search(fragment)  # the footer of the reply that ended
                reply.tokens = int(counted.group(1)) if counted else None
                break
        reply.text = _reply_content(shown)
        reply.finished_at = time.monotonic()
        return reply

    def _send(self, **values) -> None:
        self.ws.send(json.dumps({**values, "HEADERS": {"HX-Request": "true"}}))

    def close(self) -> None:
        if self.ws is not None:
            self.ws.close()


class _Text(HTMLParser):
    """The text inside the first element ``inner(attrs)`` picks within one ``outer(attrs)``
    picks (``inner`` None: the outer element's own text)."""

    VOID = {"input", "br", "img", "hr", "meta", "link", "path", "rect", "circle", "source"}
    BLOCKS = {"p", "li", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "tr"}

    def __init__(self, outer: Callable[[dict], bool],
                 inner: Callable[[dict], bool] | None = None) -> None:
        super().__init__(convert_charrefs=True)
        self.outer, self.inner = outer, inner
        self.outer_depth = self.depth = 0
        self.done = False
        self.parts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID or self.done:
            return
        attrs = dict(attrs)
        if self.depth:
            self.depth += 1
        elif self.outer_depth and self.inner and self.inner(attrs):
            self.depth = 1
        elif not self.outer_depth and self.outer(attrs):
            self.depth = 0 if self.inner else 1
        if self.outer_depth or self.outer(attrs):
            self.outer_depth += 1

    def handle_endtag(self, tag):
        if tag in self.VOID or self.done:
            return
        self.outer_depth = max(0, self.outer_depth - 1)
        if self.depth:
            self.depth -= 1
            self.done = self.depth == 0
            if tag in self.BLOCKS:
                self.parts.append("\n")  # paragraphs were lines of the model's text

    def handle_data(self, data):
        if self.depth:
            self.parts.append(data)


def _text_of(fragment: str, outer: Callable[[dict], bool],
             inner: Callable[[dict], bool] | None = None) -> str:
    parser = _Text(outer, inner)
    parser.feed(fragment)
    return "".join(parser.parts).strip()


def _reply_content(fragments: list[str]) -> str:
    """The text of the reply the UI socket streamed in ``fragments``: its finished blocks, as
    they came (``div[hx-swap-oob^=beforebegin]``), or the whole reply when it came again."""
    parts: list[str] = []
    for fragment in fragments:
        if fragment.startswith("<article "):
            parts = [_text_of(fragment, lambda a: (a.get("id") or "").endswith("-reply"),
                              lambda a: "message__content" in (a.get("class") or "").split())]
        elif re.match(r'<div hx-swap-oob="beforebegin:#turn-\d+-reply-open">', fragment):
            parts.append(_text_of(fragment, lambda a: "hx-swap-oob" in a))
    return "\n".join(part for part in parts if part)


def _element_text(fragment: str, element_id: str) -> str:
    if f'id="{element_id}"' not in fragment:
        return ""
    return _text_of(fragment, lambda a: a.get("id") == element_id)


def _composer_enabled(fragment: str) -> bool:
    if 'id="composer"' not in fragment:
        return False
    start = fragment.find("<textarea")
    return start >= 0 and "disabled" not in fragment[start:fragment.find(">", start)]


class LlamaServerClient:
    """llama.cpp's ``llama-server``: ``POST /completion`` with the same rendered prompt, streamed (SSE)."""

    name = "llama-server"

    def __init__(self, url: str, max_tokens: int, render: Callable[[str], str]) -> None:
        self.url = url.rstrip("/") + "/completion"
        self.max_tokens = max_tokens
        self.render = render
        self.session = requests.Session()

    def prepare(self) -> None:
        self.session.get(self.url.rsplit("/", 1)[0] + "/health", timeout=30)

    def send(self, prompt: str) -> Reply:
        body = {"prompt": self.render(prompt), "n_predict": self.max_tokens, "temperature": 0,
                "stream": True, "cache_prompt": True}
        return post_streamed(self.session, self.url, body, lambda event: event.get("content"),
                              lambda event: bool(event.get("stop")))

    def close(self) -> None:
        self.session.close()


class OpenAIChatClient:
    """``POST /v1/chat/completions``, streamed: Tanglebox's OpenAI surface, and llama-server's.

    Both servers get the very same body (one user message, ``max_tokens``, temperature 0) and
    apply the model's chat template themselves. Only chunks that carry text count: the first
    chunk (``delta.role``, no content) is the server's answer, not a token.
    """

    name = "OpenAI chat stream"

    def __init__(self, url: str, max_tokens: int) -> None:
        self.base = url.rstrip("/") + "/v1"
        self.max_tokens = max_tokens
        self.model = ""
        self.session = requests.Session()

    def prepare(self) -> None:
        """Open the connection and ask for the served model's id, as an OpenAI client would."""
        response = self.session.get(self.base + "/models", timeout=30)
        response.raise_for_status()
        self.model = response.json()["data"][0]["id"]

    def send(self, prompt: str) -> Reply:
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": self.max_tokens, "temperature": 0, "stream": True}
        return post_streamed(self.session, self.base + "/chat/completions", body,
                              _chat_delta_text, lambda event: False)

    def close(self) -> None:
        self.session.close()


def _chat_delta_text(event: dict) -> str:
    choices = event.get("choices") or [{}]  # the usage chunk has no choices
    return (choices[0].get("delta") or {}).get("content") or ""


def post_streamed(session: requests.Session, url: str, body: dict,
                   text_of: Callable[[dict], str | None],
                   ends: Callable[[dict], bool]) -> Reply:
    """POST ``body`` and read the server-sent events (``data: {json}`` lines) until
    ``data: [DONE]``, an event that ``ends`` the reply, or the end of the response; the time of
    every event with text is a chunk of the reply."""
    reply = Reply(sent_at=time.monotonic())
    with session.post(url, json=body, stream=True, timeout=REPLY_TIMEOUT) as response:
        if response.status_code != 200:
            reply.error = f"HTTP {response.status_code}: {response.text[:200]}"
            return reply
        parts = []
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            if line[6:].strip() == b"[DONE]":
                break
            event = json.loads(line[6:])
            if "error" in event:  # an error after the 200, in the stream itself
                reply.error = json.dumps(event["error"])[:200]
                break
            text = text_of(event)
            if text:
                reply.chunk_times.append(time.monotonic())
                parts.append(text)
            if ends(event):
                break
    reply.text = "".join(parts)
    reply.finished_at = time.monotonic()
    return reply


def chat_prompt_check(tanglebox_url: str, llama_server_url: str, prompt: str,
                      render: Callable[[str], str]) -> str:
    """One line for the report: do both servers turn the same chat message into the same prompt?

    llama-server shows its rendering (``POST /apply-template``), compared with ``render``
    (Tanglebox's ``render_prompt`` with the model's template); and each server's ``usage``
    for one non-streamed request says how many prompt tokens it actually read.
    """
    message = {"role": "user", "content": prompt}
    theirs = requests.post(llama_server_url.rstrip("/") + "/apply-template",
                           json={"messages": [message]}, timeout=30).json()["prompt"]
    ours = render(prompt)
    if theirs == ours:
        verdict = "llama-server's /apply-template renders the prompt Tanglebox does"
    else:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                  min(len(ours), len(theirs)))
        verdict = (f"the prompts differ from character {at}: Tanglebox "
                   f"{ours[max(0, at - 20):at + 40]!r}, llama-server "
                   f"{theirs[max(0, at - 20):at + 40]!r}")
    return (f"chat template: {verdict}; prompt tokens (usage): Tanglebox "
            f"{_prompt_tokens(tanglebox_url, message)}, llama-server "
            f"{_prompt_tokens(llama_server_url, message)}")


def _prompt_tokens(url: str, message: dict) -> int | str:
    client = OpenAIChatClient(url, 1)
    with client.session:
        client.prepare()
        answer = client.session.post(client.base + "/chat/completions", timeout=REPLY_TIMEOUT,
                                     json={"model": client.model, "messages": [message],
                                           "max_tokens": 1, "temperature": 0})
    return answer.json()["usage"]["prompt_tokens"] if answer.ok else f"HTTP {answer.status_code}"


class Probe:
    """Measures how fast something answers, over and over, until stopped (a background thread)."""

    def __init__(self, answer_once: Callable[[], None], interval: float,
                 close: Callable[[], None] = lambda: None) -> None:
        self.answer_once = answer_once
        self.close = close
        self.interval = interval
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Probe":
        self._thread.start()
        return self

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join(timeout=REPLY_TIMEOUT)
        self.close()
        return self.latencies

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.answer_once()
                self.latencies.append(time.monotonic() - started)
            except Exception:  # noqa: BLE001 - counted and reported, never fatal to the run
                self.errors += 1
            self._stop.wait(self.interval)


def health_probe(url: str, interval: float) -> Probe:
    session = requests.Session()

    def answer_once() -> None:
        session.get(url.rstrip("/") + "/health", timeout=30).raise_for_status()

    return Probe(answer_once, interval, close=session.close)


def ping_probe(ws_url: str, interval: float) -> Probe:
    """``#-ping-#`` → ``#-pong-#`` on an otherwise idle original socket."""
    ws = websocket.create_connection(ws_url.rstrip("/") + "/", timeout=30)

    def answer_once() -> None:
        ws.send("#-ping-#")
        if ws.recv() != "#-pong-#":
            raise RuntimeError("no pong")

    return Probe(answer_once, interval, close=ws.close)


# The Tanglebox surfaces a benchmark can drive: a client for one reply, from the server's http
# and ws URLs and the reply's length in tokens; and each one's name in the reports.
SURFACES = {
    "original": lambda url, ws_url, max_tokens: OriginalSocketClient(ws_url, max_tokens),
    "rest": lambda url, ws_url, max_tokens: RestStreamClient(url, max_tokens),
    "ui": lambda url, ws_url, max_tokens: UiSocketClient(ws_url, max_tokens),
    "openai": lambda url, ws_url, max_tokens: OpenAIChatClient(url, max_tokens),
}
SURFACE_NAMES = {"original": "original socket", "rest": "REST stream", "ui": "UI socket",
                 "openai": "OpenAI chat stream"}
