"""The serving benchmark's clients read what the servers really send: the UI socket's fragments,
and the server-sent events of llama-server's ``/completion`` and of ``/v1/chat/completions``
(Tanglebox's OpenAI surface and llama-server's), here from a small stdlib server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.clients import (REPLY_TOKENS, REPLY_WITH_TEXT, LlamaServerClient,
                           OpenAIChatClient, _reply_content, chat_prompt_check)
from tanglebox.web.ui_conversation import Turn
from tanglebox.web.reply_info import ReplyInfo
from tanglebox.web.ui_fragments import (StreamedReply, new_turn_fragment, reply_fragment,
                                        reply_meta_fragment)


def test_only_fragments_that_show_reply_text_count_as_chunks(app):
    turn = Turn(id=3, prompt="Tell me a story.")
    with app.app_context():
        person = new_turn_fragment(turn)
        typing = reply_fragment(turn, "", streaming=True)
        stream = StreamedReply(turn)
        partial = stream.update("Once upon")
        more = stream.update("Once upon a time.\n\nThe\n\n")
        end = stream.end("Once upon a time.\n\nThe end.", note="")
        again = reply_fragment(turn, "Once upon a **time**.", streaming=False)
    assert not REPLY_WITH_TEXT.match(person)
    assert not REPLY_WITH_TEXT.match(typing)
    assert all(REPLY_WITH_TEXT.match(shown) for shown in (partial, more, end, again))
    assert _reply_content([partial, more, end]).split("\n") == ["Once upon a time.", "The end."]
    assert _reply_content([partial, again]) == "Once upon a time."


def test_the_ui_replys_tokens_are_the_count_its_info_shows_not_its_prompts(app):
    info = ReplyInfo(source_url="/c/x/messages/2.md", prompt_url="/c/x/messages/2/prompt",
                     prompt_text="<|im_start|>user…", prompt_by_upstream=False,
                     prompt_tokens=47, cached_tokens=12, completion_tokens=128,
                     tokens_per_second=15.5, ttft_ms=210.0, model="SmolLM2", template="chatml",
                     settings=())
    with app.app_context():
        meta = reply_meta_fragment(Turn(id=1, prompt="Tell me a story.", reply="Once",
                                        info=info))
    assert [int(n) for n in REPLY_TOKENS.findall(meta)] == [128]


def chat_chunk(delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "smollm2", "choices": [{"index": 0, "delta": delta,
                                             "finish_reason": finish_reason}]}


# An OpenAI stream as both servers send it: the role first (no text), the text, an empty
# delta, the finish reason, the usage chunk (no choices), then [DONE].
CHAT_STREAM = [chat_chunk({"role": "assistant", "content": ""}),
               chat_chunk({"content": "The capital"}), chat_chunk({"content": " of France"}),
               chat_chunk({}), chat_chunk({"content": " is Paris."}),
               chat_chunk({}, "stop"),
               {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                "model": "smollm2", "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16}},
               "[DONE]"]


class ScriptedServer:
    """Answers ``GET /v1/models``, a POST to a path in ``answers`` with that JSON, and streams
    ``events`` (as ``data:`` lines, chunked) to any other POST, keeping the bodies it was sent."""

    def __init__(self, events: list, status: int = 200, answers: dict | None = None) -> None:
        self.events, self.status, self.answers, self.bodies = events, status, answers or {}, []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, "application/json",
                           json.dumps({"object": "list", "data": [
                               {"id": "smollm2", "object": "model", "created": 1,
                                "owned_by": "tanglebox"}]}).encode())

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                scripted.bodies.append((self.path, body))
                if self.path in scripted.answers and not body.get("stream"):
                    self._send(200, "application/json",
                               json.dumps(scripted.answers[self.path]).encode())
                    return
                if scripted.status != 200:
                    self._send(scripted.status, "application/json",
                               b'{"error": {"message": "the queue is full"}}')
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for event in scripted.events:
                    data = event if isinstance(event, str) else json.dumps(event)
                    self._chunk(f"data: {data}\n\n".encode())
                self._chunk(b"")

            def _chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    started = []

    def start(events: list, status: int = 200, answers: dict | None = None) -> ScriptedServer:
        started.append(ScriptedServer(events, status, answers))
        return started[-1]

    yield start
    for server in started:
        server.close()


def chat(server: ScriptedServer, prompt: str = "What is the capital of France?"):
    client = OpenAIChatClient(server.url, 32)
    client.prepare()
    try:
        return client.send(prompt)
    finally:
        client.close()


def test_the_chat_client_sends_one_user_message_for_the_served_model_at_temperature_0(serve):
    server = serve(CHAT_STREAM)
    chat(server)
    assert server.bodies == [("/v1/chat/completions", {
        "model": "smollm2", "messages": [{"role": "user",
                                          "content": "What is the capital of France?"}],
        "max_tokens": 32, "temperature": 0, "stream": True})]


def test_the_chat_client_times_only_the_chunks_that_carry_text(serve):
    reply = chat(serve(CHAT_STREAM))
    assert reply.error == ""
    assert reply.text == "The capital of France is Paris."
    # three chunks of text: the role chunk, empty deltas and the usage chunk are not tokens,
    # so the time to first token is the time to "The capital"
    assert len(reply.chunk_times) == 3
    assert reply.sent_at <= reply.chunk_times[0] <= reply.chunk_times[-1] <= reply.finished_at


def test_the_chat_client_stops_reading_at_done(serve):
    reply = chat(serve(CHAT_STREAM + [chat_chunk({"content": " after the end"})]))
    assert reply.text == "The capital of France is Paris."


def test_an_error_in_the_stream_or_a_refusal_is_the_replys_error(serve):
    broken = chat(serve(CHAT_STREAM[:2] + [{"error": {"message": "the model crashed"}}]))
    assert "the model crashed" in broken.error
    refused = chat(serve([], status=503))
    assert refused.error.startswith("HTTP 503") and not refused.chunk_times


def test_the_completion_client_reads_content_until_the_stop_event(serve):
    server = serve([{"content": "Paris", "stop": False}, {"content": ".", "stop": False},
                    {"content": "", "stop": True, "timings": {}},
                    {"content": "never read", "stop": False}])
    client = LlamaServerClient(server.url, 16, lambda prompt: f"<user>{prompt}<assistant>")
    reply = client.send("Capital of France?")
    client.close()
    assert reply.text == "Paris." and len(reply.chunk_times) == 2
    assert server.bodies[0][0] == "/completion"
    assert server.bodies[0][1]["prompt"] == "<user>Capital of France?<assistant>"


def test_the_prompt_check_compares_llama_servers_template_and_both_prompt_token_counts(serve):
    rendered = "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"

    def usage(prompt_tokens: int) -> dict:
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "The"},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1,
                          "total_tokens": prompt_tokens + 1}}

    tanglebox = serve([], answers={"/v1/chat/completions": usage(31)})
    llama_server = serve([], answers={"/apply-template": {"prompt": rendered},
                                      "/v1/chat/completions": usage(33)})
    same = chat_prompt_check(tanglebox.url, llama_server.url, "Capital of France?",
                             lambda prompt: rendered)
    assert same == ("chat template: llama-server's /apply-template renders the prompt Tanglebox "
                    "does; prompt tokens (usage): Tanglebox 31, llama-server 33")
    assert llama_server.bodies[0] == ("/apply-template", {"messages": [
        {"role": "user", "content": "Capital of France?"}]})
    other = chat_prompt_check(tanglebox.url, llama_server.url, "Capital of France?",
                              lambda prompt: rendered.replace("user", "human"))
    assert other.startswith("chat template: the prompts differ from character 12: ")
