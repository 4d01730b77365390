"""Remote engines on real upstreams (issue 16, item 5): a front Tanglebox with no local model
serves a model that runs elsewhere, on every one of its surfaces.

Two upstreams, each on the real embedded model: a second Tanglebox (tokens required, so the
front's ``apiKeyEnv`` key travels for real), and llama-cpp-python's own OpenAI server (a
non-Tanglebox engine). At temperature 0 an answer through the front is exactly the answer the
upstream gives when asked directly: the front forwards, and neither adds nor loses a token.
Last, llama_cpp.server is killed (SIGKILL) in the middle of a reply: the front's stream is cut
after the text so far, and the model shows unavailable.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import closing

import openai
import pytest
import requests

from tests.integration.test_concurrency import original_socket, socket_reply
from tests.integration.test_ui_socket import ChatClient, shown_text
from tests.live_server import LiveServer, wait_until
from tests.upstreams import (LLAMA_CPP_ALIAS, UPSTREAM_MODEL, UPSTREAM_TOKEN, LlamaCppServer,
                             endpoint, front_server, llama_cpp_upstream, model_health, sdk,
                             tanglebox_upstream)

pytestmark = pytest.mark.real_model

REMOTE = "smol-remote"  # the front's name for the upstream Tanglebox's model
LLAMA = "smol-llama-cpp"  # the front's name for llama_cpp.server's model
KEY_VARIABLE = "TBX_TEST_UPSTREAM_KEY"
MAX_TOKENS = 40
# Questions whose temperature-0 answers are plain text (no Markdown), so the chat page shows
# exactly the upstream's text; the first ends at the 40-token limit, the second by itself.
CAPITAL = "What is the capital of France?"
ARITHMETIC = "What is 2 + 2?"
STORY = "Write a long story about a dragon."  # hundreds of tokens: still streaming when killed
SETTINGS = {"temperature": 0, "maxNewTokens": MAX_TOKENS}


def chat(client: openai.OpenAI, model: str, question: str, **params):
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0,
        max_tokens=MAX_TOKENS, **params)


def streamed_chat(client: openai.OpenAI, model: str, question: str) -> tuple[str, list]:
    chunks = list(chat(client, model, question, stream=True,
                       stream_options={"include_usage": True}))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def rest(server: LiveServer, question: str, accept: str, **params) -> requests.Response:
    return requests.post(server.url + "/conversation", timeout=120, headers={"Accept": accept},
                         json={"userPrompt": question, "temperature": 0,
                               "maxNewTokens": MAX_TOKENS, **params})


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with tanglebox_upstream(tmp_path_factory.mktemp("upstream"), parallelSlots=2,
                            **SETTINGS) as server:
        yield server


@pytest.fixture(scope="module")
def front(tmp_path_factory, upstream):
    remote = endpoint(REMOTE, upstream.url + "/v1", model=UPSTREAM_MODEL,
                      apiKeyEnv=KEY_VARIABLE, maxConcurrent=2)
    with front_server(tmp_path_factory.mktemp("front"), [remote],
                      env={KEY_VARIABLE: UPSTREAM_TOKEN}, **SETTINGS) as server:
        yield server
    assert "Traceback" not in server.log()
    assert UPSTREAM_TOKEN not in server.log()  # the key it used is written nowhere


@pytest.fixture(scope="module")
def direct(upstream) -> openai.OpenAI:
    return sdk(upstream.url, UPSTREAM_TOKEN)


@pytest.fixture(scope="module")
def answer(direct):
    """What the upstream answers when asked directly, at temperature 0."""
    cache: dict[str, str] = {}

    def answer_of(question: str) -> str:
        if question not in cache:
            cache[question] = chat(direct, UPSTREAM_MODEL, question).choices[0].message.content
        return cache[question]
    return answer_of


# -- through a second Tanglebox --------------------------------------------------------------

def test_the_front_serves_only_the_remote_model_and_shows_it_ready(front):
    assert [m.id for m in sdk(front.url).models.list().data] == [REMOTE]
    status = model_health(front, REMOTE)
    assert status["kind"] == "remote" and status["state"] == "ready"


def test_openai_answers_as_the_upstream_does(front, direct):
    through, upstream_reply = chat(sdk(front.url), REMOTE, ARITHMETIC), chat(
        direct, UPSTREAM_MODEL, ARITHMETIC)
    assert through.model == REMOTE
    assert through.choices[0].message.content == upstream_reply.choices[0].message.content
    assert through.choices[0].finish_reason == upstream_reply.choices[0].finish_reason
    assert through.usage.prompt_tokens == upstream_reply.usage.prompt_tokens
    assert through.usage.completion_tokens == upstream_reply.usage.completion_tokens


def test_an_openai_stream_brings_the_upstreams_answer_delta_by_delta(front, answer):
    text, chunks = streamed_chat(sdk(front.url), REMOTE, ARITHMETIC)
    assert text == answer(ARITHMETIC)
    deltas = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 3  # streamed through as it came, not one buffered piece
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


@pytest.mark.parametrize("accept, stream", [("text/plain", False), ("text/plain", True),
                                            ("application/json", False)])
def test_rest_answers_as_the_upstream_does(front, answer, accept, stream):
    reply = rest(front, CAPITAL, accept, shouldStreamResponse=stream)
    assert reply.status_code == 200, reply.text
    text = reply.json()["response"] if accept == "application/json" else reply.text
    assert text == answer(CAPITAL)


def test_rest_chooses_the_remote_model_by_name(front, answer):
    reply = rest(front, CAPITAL, "application/json", model=REMOTE)
    assert reply.status_code == 200, reply.text
    assert reply.json()["response"] == answer(CAPITAL)
    assert reply.json()["model"] == REMOTE


def test_rest_server_sent_events_end_with_done(front, answer):
    reply = rest(front, ARITHMETIC, "text/event-stream")
    events = [json.loads(line[len("data: "):]) for line in reply.text.splitlines()
              if line.startswith("data: ")]
    assert "".join(e.get("text", "") for e in events[:-1]) == answer(ARITHMETIC)
    assert events[-1]["response"] == answer(ARITHMETIC)
    assert events[-1]["finishReason"] == "stop"


def test_the_original_socket_answers_as_the_upstream_does(front, answer):
    with closing(original_socket(front)) as ws:
        for control in ("#-set-temp-#0", f"#-set-max-tokens-#{MAX_TOKENS}",
                        "#-set-streaming-#true"):
            ws.send(control)
            assert ws.recv() == "#-set-#"
        chunks = socket_reply(ws, CAPITAL)
    assert "".join(chunks) == answer(CAPITAL)
    assert len(chunks) > 1  # streamed chunk by chunk


def test_the_chat_page_shows_the_upstreams_answer(front, answer):
    with closing(ChatClient(front)) as page:
        fragments = page.ask(CAPITAL)
    assert shown_text(fragments) == answer(CAPITAL).strip()
    assert len(fragments) > 2  # the reply grew in pieces between the first and last fragment


# -- through llama-cpp-python's own server ---------------------------------------------------

@pytest.fixture(scope="module")
def llama_cpp(tmp_path_factory):
    with llama_cpp_upstream(tmp_path_factory.mktemp("llama-cpp")) as server:
        yield server


@pytest.fixture(scope="module")
def llama_front(tmp_path_factory, llama_cpp):
    with front_server(tmp_path_factory.mktemp("llama-front"),
                      [endpoint(LLAMA, llama_cpp.url + "/v1", model=LLAMA_CPP_ALIAS)],
                      **SETTINGS) as server:
        yield server
    assert "Traceback" not in server.log()


def repeated(llama_cpp: LlamaCppServer, question: str) -> str:
    """llama_cpp.server's direct answer to ``question`` asked right after the same question.

    It keeps its last prompt's KV state and evaluates only what differs from it: a prompt
    evaluated whole and one evaluated from that cache round differently, and at temperature 0
    that can change the answer (measured: "The answer to this classic math problem is 4." the
    first time, "The answer is 4." every time after). So every answer compared here is asked
    from the same state: right after the same question.
    """
    chat(sdk(llama_cpp.url), LLAMA_CPP_ALIAS, question)
    return chat(sdk(llama_cpp.url), LLAMA_CPP_ALIAS, question).choices[0].message.content


def test_llama_cpp_server_answers_openai_clients_through_the_front(llama_front, llama_cpp):
    direct = repeated(llama_cpp, CAPITAL)
    through = chat(sdk(llama_front.url), LLAMA, CAPITAL)
    assert through.model == LLAMA
    assert through.choices[0].message.content == direct
    streamed, _ = streamed_chat(sdk(llama_front.url), LLAMA, CAPITAL)
    assert streamed == direct


def test_llama_cpp_server_answers_rest_clients_through_the_front(llama_front, llama_cpp):
    direct = repeated(llama_cpp, ARITHMETIC)
    whole = rest(llama_front, ARITHMETIC, "application/json")
    assert whole.status_code == 200, whole.text
    assert whole.json()["response"] == direct
    assert rest(llama_front, ARITHMETIC, "text/plain", shouldStreamResponse=True).text == direct


def test_llama_cpp_server_killed_mid_reply_cuts_the_stream_and_shows_unavailable(llama_front,
                                                                                llama_cpp):
    # Last in this module: it kills the upstream (SIGKILL: no goodbye on the wire).
    received = b""
    with requests.post(llama_front.url + "/conversation", stream=True, timeout=120,
                       headers={"Accept": "text/plain"},
                       json={"userPrompt": STORY, "maxNewTokens": 1000,
                             "shouldStreamResponse": True}) as reply:
        chunks = reply.iter_content(chunk_size=None)
        received += next(chunks)
        os.killpg(llama_cpp.process.pid, signal.SIGKILL)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):  # no final chunk: cut
            for chunk in chunks:
                received += chunk
    assert received.decode().strip()  # the text so far came
    # A probe while ready runs every 30 s: at most that long, plus the probe, on a busy CI box.
    wait_until(lambda: model_health(llama_front, LLAMA)["state"] == "unavailable", 75,
               "the killed upstream shows unavailable")
    refused = rest(llama_front, ARITHMETIC, "application/json")
    assert refused.status_code == 503 and f"{LLAMA} is unavailable" in refused.text
