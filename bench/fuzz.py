"""Fuzzing every surface with generated input (issue 14): the rule is no 5xx, no traceback, no
hang, and ``/health`` fine afterwards.

``python -m bench.fuzz --minutes N [--url URL]`` from the repository root, against a running
server (default http://127.0.0.1:8080; the fake backend serves as a model:
``python -m tests.fake_server settings.json '{}'``). Each surface gets its share of the time in
turn, round after round; the counts (cases, answers by status, problems) are printed as JSON
and belong in docs/reliability.md.

The strategies here (hypothesis) are also what the test suite runs, a few dozen cases each:
tests/unit/test_fuzz.py (REST through Flask's test client, both sockets' message handling
in-process) and tests/integration/test_input_hardening_live.py (chunked bodies and both
sockets against a live server). What is generated:

- REST: parameters of every JSON type, nested, with lone surrogates, strings nested 50,000
  deep, numbers written as ``1_0`` or ``1e2``; sent as a JSON body, a form, a query string, a
  random body, or (live) a chunked body whose framing may be broken;
- ``/ws/chat``: the chat form's JSON messages with such values, and random text and bytes;
- ``/``: control messages with random values, and random prompts;
- the OpenAI API (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``): bodies
  with its parameters holding such values, right and wrong; every error must also be in
  OpenAI's shape, which the SDKs read.

A socket message counts as answered when a probe sent after it is answered (``#-ping-#``, or an
unknown action on ``/ws/chat``), so a message the server silently drops is fine and a server
that stops answering is a hang.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlencode, urlsplit

import requests
import websocket
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

DEADLINE = 30.0  # seconds any one answer may take before it counts as a hang
TRACEBACK = "Traceback (most recent call last)"  # not the bare word: a reply may echo it
RESET = 0  # the status of a broken chunked body whose connection was reset before the answer
NASTY_TEXTS = ("\ud800", "a\udfffb", "[" * 50_000, '{"a":' * 2_000, "1_0", "1e2", "-1", "NaN",
               "Infinity", "0x10", "", " ", "\x00", "Human", "AI", "\u0661\u0660", "true",
               "9" * 5_000)
PROMPTS = ("echo hi", "hello", "echo \ud800", "\u202e\U0001f600", "count 3")
ACCEPTS = ("text/plain", "application/json", "text/event-stream", "*/*", "")
UI_PROBE = json.dumps({"action": "fuzz-probe"})
PING, PONG = "#-ping-#", "#-pong-#"
CONTROL_TOKENS = ("#-set-temp-#", "#-set-max-tokens-#", "#-set-streaming-#", "#-get-config-#",
                  "#-delete-#", "#-ping-#", "#-token-#")

# -- what is generated -----------------------------------------------------------------------

texts = st.text(st.characters(exclude_categories=()), max_size=30) | st.sampled_from(NASTY_TEXTS)
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | texts
           | st.integers(min_value=10 ** 20, max_value=10 ** 400))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(texts, inner, max_size=3), max_leaves=8)
pairs = st.lists(st.sampled_from(["Human", "AI"]) | json_values, max_size=3)
histories = st.lists(pairs, max_size=3) | json_values
values = {
    "userPrompt": st.sampled_from(PROMPTS) | texts | json_values,
    "systemPrompt": texts | json_values,
    "temperature": st.sampled_from(["0.5", "1_0", "1e2", "nan"]) | json_values,
    "maxNewTokens": st.sampled_from(["8", "1_0", "1e2", " 8 "]) | json_values,
    "conversationHistory": histories | histories.map(lambda h: json.dumps(h)) | texts,
    "shouldStreamResponse": st.sampled_from(["true", "false"]) | json_values,
    "token": texts,
}
# Mostly requests with a prompt (which get furthest into the server), some without, some with
# keys of any kind.
parameters = st.one_of(
    st.fixed_dictionaries({"userPrompt": values["userPrompt"]},
                          optional={k: v for k, v in values.items() if k != "userPrompt"}),
    st.fixed_dictionaries({}, optional=values),
    st.dictionaries(texts, json_values, max_size=3))


# The OpenAI API: bodies with its parameters, right and wrong, for each of its POST routes.
OPENAI_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | json_values,
     "content": st.sampled_from(PROMPTS) | texts | st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]) | json_values,
          "text": texts | json_values}), max_size=2) | json_values}), max_size=3) | json_values
openai_values = {
    "model": st.sampled_from(["SmolLM2-135M-Instruct", "fake-model", "gpt-4o"]) | json_values,
    "messages": messages, "prompt": st.sampled_from(PROMPTS) | texts | json_values,
    "input": st.lists(texts, max_size=3) | json_values,
    "max_tokens": st.integers(min_value=-2, max_value=20) | json_values,
    "max_completion_tokens": st.integers(min_value=-2, max_value=20) | json_values,
    "temperature": st.floats(min_value=-1, max_value=3) | json_values,
    "top_p": json_values, "top_k": json_values, "n": json_values, "seed": json_values,
    "stream": st.booleans() | json_values, "stop": json_values, "logit_bias": json_values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | json_values,
    "logprobs": st.booleans() | st.integers(-1, 7) | json_values,
    "top_logprobs": st.integers(-1, 25) | json_values,
    "presence_penalty": json_values, "frequency_penalty": json_values,
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"]) | json_values},
        optional={"json_schema": json_values}) | json_values,
    "encoding_format": st.sampled_from(["float", "base64"]) | json_values,
    "tools": json_values, "echo": json_values, "suffix": json_values, "best_of": json_values,
}
openai_bodies = st.fixed_dictionaries({}, optional=openai_values) | json_values
OPENAI_SEEDS = ({"messages": [{"role": "user", "content": "echo \ud800"}]},
                {"messages": [{"role": "user", "content": [{"type": "text", "text": ["x"]}]}]},
                {"prompt": "hi", "logprobs": True},
                {"input": ["a", ""], "encoding_format": "base64"})


@dataclass(frozen=True)
class RestCase:
    """One request to ``/conversation``: how it is sent, and what."""

    encoding: str  # "json", "form", "query", "raw" or (live only) "chunked"
    params: dict
    raw: bytes = b""  # the body for "raw"; the framing for "chunked"
    accept: str = "text/plain"


# What issue 14 found (a 500 each), always tried first in the test suite's small run.
REST_SEEDS = (RestCase("json", {"userPrompt": "echo \ud800"}),
              RestCase("json", {"userPrompt": "hi", "conversationHistory": [[["AI"], "x"]]}),
              RestCase("query", {"userPrompt": "hi", "conversationHistory": "[" * 50_000}))
UI_SEEDS = ('{"userPrompt": "\\ud800"}', "[" * 100_000)


def rest_cases(chunked: bool = False) -> st.SearchStrategy[RestCase]:
    encodings = ["json", "json", "form", "query", "raw"] + (["chunked"] * 2 if chunked else [])
    return st.builds(RestCase, st.sampled_from(encodings), parameters,
                     st.binary(max_size=60) | st.sampled_from([b"[" * 60_000, b"\xff\xfe{"]),
                     st.sampled_from(ACCEPTS))


def ui_messages() -> st.SearchStrategy[str | bytes]:
    form = st.fixed_dictionaries({}, optional={
        "action": st.sampled_from(["send", "settings", "regenerate", "stop", "new"]) | texts,
        **{key: values[key] for key in ("userPrompt", "systemPrompt", "temperature",
                                        "maxNewTokens")},
        "HEADERS": json_values})
    return (form.map(lambda f: json.dumps(f)) | json_values.map(lambda v: json.dumps(v))
            | texts.map(lambda t: t.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))
            | st.binary(max_size=40) | st.just("[" * 100_000))


def original_messages() -> st.SearchStrategy[str]:
    control = st.builds(lambda token, value: token + value, st.sampled_from(CONTROL_TOKENS),
                        texts | st.sampled_from(["0.5", "8", "1_0", "1e2", "true", "-0"]))
    prompt = st.sampled_from(PROMPTS) | texts
    return (control | prompt).map(
        lambda t: t.encode("utf-8", "surrogatepass").decode("utf-8", "replace"))


# -- encoding a REST case --------------------------------------------------------------------

def as_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def form_bytes(params: dict) -> bytes:
    # Lone surrogates go out as the bytes they would be (invalid UTF-8), as a careless client
    # would send them.
    return urlencode({as_text(k): as_text(v) for k, v in params.items()},
                     errors="surrogatepass").encode()


def json_bytes(params: dict) -> bytes:
    return json.dumps(params).encode()  # ensure_ascii: lone surrogates become \ud800 escapes


def chunked(body: bytes, framing: bytes) -> bytes:
    """``body`` in chunks; a non-empty ``framing`` breaks the framing in one of a few ways."""
    if not framing:
        return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    broken = [b"%s\r\n%s\r\n0\r\n\r\n" % (framing[:8].hex().encode() + b"zz", body),
              b"%x\r\n%s0\r\n\r\n" % (len(body), body),  # no CRLF after the data
              b"%x;%s\r\n%s\r\n0\r\n\r\n" % (len(body), framing[:8], body),  # an extension
              b"-%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)]
    return broken[framing[0] % len(broken)]


# -- the rule ----------------------------------------------------------------------------------

# hypothesis also tries string constants it finds in the code, TRACEBACK included, and the
# server may echo a bad value back: a marker that was sent is not the server's.

def rest_problem(status: int, body: str, sent: object) -> str:
    """What is wrong with the answer to ``sent`` ("" when nothing is; RESET is allowed for
    broken framing only, where send_rest returns it)."""
    if status >= 500 and status != 503:  # 503: maintenance, loading, a full queue
        return f"{status}: {body[:200]!r}"
    if TRACEBACK in body and TRACEBACK not in repr(sent):
        return f"a traceback in a {status}: {body[:200]!r}"
    return ""


def openai_problem(status: int, body: str, sent: object) -> str:
    """``rest_problem``, and every error in OpenAI's shape (``{"error": {"message", "type",
    "param", "code"}}``) so that the SDKs can raise their typed exceptions."""
    if problem := rest_problem(status, body, sent):
        return problem
    if status >= 400:
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{status} not in OpenAI's error shape: {body[:200]!r}"
        if not (isinstance(error, dict) and error.get("message") and {
                "type", "param", "code"} <= set(error)):
            return f"{status} not in OpenAI's error shape: {body[:200]!r}"
    return ""


def socket_problem(answers: list[str | bytes], sent: object) -> str:
    """What is wrong with a socket's answers to ``sent``: a traceback, or an HTTP error
    response written into the socket ("" when nothing is)."""
    for answer in answers:
        text = answer.decode("utf-8", "replace") if isinstance(answer, bytes) else answer
        if ((TRACEBACK in text and TRACEBACK not in repr(sent))
                or (text.startswith("HTTP/1.1 5") and "HTTP/1.1 5" not in repr(sent))):
            return f"the socket said: {text[:200]!r}"
    return ""


@dataclass
class Tally:
    """What a run saw: cases by surface, answers by kind, and every problem."""

    cases: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def note(self, surface: str, answer: str, problem: str) -> None:
        self.cases[surface] += 1
        self.answers[f"{surface} {answer}"] += 1
        if problem:
            self.problems.append(f"{surface}: {problem}")


# -- sending to a live server --------------------------------------------------------------------

def send_rest(url: str, case: RestCase) -> tuple[int, str]:
    """Send ``case`` to ``url``'s /conversation; (status, body). A hang raises TimeoutError."""
    headers = {"Accept": case.accept} if case.accept else {}
    target = url + "/conversation"
    if case.encoding == "chunked":
        return _send_chunked(url, json_bytes(case.params), case.raw, headers)
    try:
        if case.encoding == "query":
            answer = requests.get(target + "?" + form_bytes(case.params).decode(),
                                  headers=headers, timeout=DEADLINE)
        else:
            body, kind = {"json": (json_bytes(case.params), "application/json"),
                          "form": (form_bytes(case.params), "application/x-www-form-urlencoded"),
                          "raw": (case.raw, "application/json")}[case.encoding]
            answer = requests.post(target, data=body, headers={**headers, "Content-Type": kind},
                                   timeout=DEADLINE)
    except requests.Timeout as err:
        raise TimeoutError(str(err)) from None
    return answer.status_code, answer.text


def send_openai(url: str, path: str, body: object) -> tuple[int, str]:
    """POST ``body`` as JSON to ``url`` + ``path``; (status, body). A hang raises TimeoutError."""
    try:
        answer = requests.post(url + path, data=json_bytes(body), timeout=DEADLINE,
                               headers={"Content-Type": "application/json"})
    except requests.Timeout as err:
        raise TimeoutError(str(err)) from None
    return answer.status_code, answer.text


def _send_chunked(url: str, body: bytes, framing: bytes, headers: dict) -> tuple[int, str]:
    parts = urlsplit(url)
    head = ("POST /conversation HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n{}\r\n").format(
        parts.netloc, "".join(f"{k}: {v}\r\n" for k, v in headers.items()))
    answer = b""
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=DEADLINE) as sock:
        try:
            sock.sendall(head.encode() + chunked(body, framing))
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            # gunicorn closes a connection whose body it could not read to the end, with
            # the rest unread: the kernel answers with a reset, which may overtake the 400.
            if not framing:
                raise
            return RESET, ""
    status_line, _, rest = answer.partition(b"\r\n")
    status = int(status_line.split()[1]) if status_line.startswith(b"HTTP/") else 0
    return status, rest.decode("utf-8", "replace")


def ws_url(url: str, path: str) -> str:
    return "ws" + url[len("http"):] + path


def send_ui(ws: websocket.WebSocket, message: str | bytes) -> list[str]:
    """Send one message, then the probe; every message until the probe's answer."""
    if isinstance(message, bytes):
        ws.send_binary(message)
    else:
        ws.send(message)
    ws.send(UI_PROBE)
    seen = []
    while True:
        seen.append(ws.recv())
        if "fuzz-probe" in seen[-1] or "A reply is still being written" in seen[-1]:
            return seen


def send_original(ws: websocket.WebSocket, message: str) -> list[str]:
    ws.send(message)
    ws.send(PING)
    seen = []
    while (answer := ws.recv()) != PONG:
        seen.append(answer)
    return seen


def health_problem(url: str) -> str:
    try:
        answer = requests.get(url + "/health", timeout=DEADLINE)
    except requests.RequestException as err:
        return f"/health: {err}"
    return "" if answer.status_code == 200 else f"/health: {answer.status_code}"


# -- the long run ------------------------------------------------------------------------------

class TimeUp(Exception):
    """Ends a surface's turn: hypothesis runs until its time is spent."""


def run_for(seconds: float, strategy: st.SearchStrategy, check: Callable) -> None:
    """Call ``check(case)`` on generated cases for ``seconds`` (no shrinking: every case is
    counted, and a problem is recorded rather than raised)."""
    end = time.monotonic() + seconds

    @settings(max_examples=10 ** 9, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def loop(case):
        if time.monotonic() > end:
            raise TimeUp
        check(case)

    try:
        loop()
    except TimeUp:
        pass


def fuzz(url: str, minutes: float, rounds: int = 6) -> Tally:
    """Each surface in turn for its share of ``minutes``, ``rounds`` times; /health after
    each round."""
    tally = Tally()
    share = minutes * 60 / (4 * rounds)

    def rest(case: RestCase) -> None:
        try:
            status, body = send_rest(url, case)
        except (TimeoutError, OSError) as err:
            tally.note(f"rest/{case.encoding}", "hang", f"{case!r:.200}: {err}")
            return
        tally.note(f"rest/{case.encoding}", str(status), rest_problem(status, body, case))

    def openai(case: tuple[str, object]) -> None:
        path, body = case
        try:
            status, text = send_openai(url, path, body)
        except (TimeoutError, OSError) as err:
            tally.note(path, "hang", f"{body!r:.200}: {err}")
            return
        tally.note(path, str(status), openai_problem(status, text, body))

    def on_socket(surface: str, path: str, send: Callable) -> Callable:
        def check(message) -> None:
            try:
                ws = websocket.create_connection(ws_url(url, path), timeout=DEADLINE)
                try:
                    if path == "/ws/chat":
                        ws.recv()  # the sync sent on connect
                    seen = send(ws, message)
                finally:
                    ws.close()
            except (websocket.WebSocketException, OSError) as err:
                tally.note(surface, "hang or closed", f"{message!r:.200}: {err!r}")
                return
            tally.note(surface, "answered", socket_problem(seen, message))
        return check

    for _ in range(rounds):
        run_for(share, rest_cases(chunked=True), rest)
        run_for(share, st.tuples(st.sampled_from(OPENAI_PATHS), openai_bodies), openai)
        run_for(share, ui_messages(), on_socket("ws/chat", "/ws/chat", send_ui))
        run_for(share, original_messages(), on_socket("original", "/", send_original))
        if problem := health_problem(url):
            tally.problems.append(problem)
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    args = parser.parse_args(argv)
    if problem := health_problem(args.url):
        print(f"no server at {args.url} ({problem}); start one first", file=sys.stderr)
        return 2
    started = time.monotonic()
    tally = fuzz(args.url.rstrip("/"), args.minutes)
    print(json.dumps({"minutes": round((time.monotonic() - started) / 60, 1),
                      "cases": dict(tally.cases), "answers": dict(sorted(tally.answers.items())),
                      "problems": tally.problems[:50], "problem_count": len(tally.problems),
                      "health_after": health_problem(args.url) or "ok"}, indent=1))
    return 1 if tally.problems else 0


if __name__ == "__main__":
    sys.exit(main())
