"""Starvation across surfaces (issue 14, class 1), against a live server: token-less chat-UI
sockets that keep sending prompts too long for the context cannot stop a REST reply that is
streaming. (The engine's rule is tested in tests/unit/test_engine_admission.py; this is the
issue's own case, every surface submitting through the one engine.)

The fake tokenizer takes ``TOKENIZE_DELAY`` per prompt, as llama.cpp's does on a long one, and
each flood prompt must be tokenized to be refused (its bytes pass the byte check).
"""

from __future__ import annotations

import threading

from tests.integration.test_concurrency import (ENDLESS, HUGE, UiClient, in_threads,
                                                raw_rest_request)

CONTEXT = 4096
TOKENIZE_DELAY = 0.05
FLOODERS = 4
FLOOD_ROUNDS = 10


def streamed_tokens(body: bytes) -> int:
    """Tokens in the complete chunks of a chunked plain-text body so far (one byte each)."""
    count = 0
    while True:
        size_line, found, rest = body.partition(b"\r\n")
        if not found or not size_line or len(rest) < int(size_line, 16) + 2:
            return count
        size = int(size_line, 16)
        count, body = count + size, rest[size + 2:]


def test_ui_sockets_flooding_too_long_prompts_cannot_stop_a_rest_stream(fake_server):
    server = fake_server.start(fake={"context_length": CONTEXT, "step_delay": 0.002,
                                     "tokenize_delay": TOKENIZE_DELAY},
                               maxNewTokens=HUGE, maxNewTokensLimit=HUGE)
    victim = raw_rest_request(server, ENDLESS)
    head, _, body = victim.recv(65536).partition(b"\r\n\r\n")  # with the first token
    assert head.startswith(b"HTTP/1.1 200")
    received = bytearray(body)

    def read_victim() -> None:
        try:
            while chunk := victim.recv(65536):
                received.extend(chunk)
        except OSError:
            pass  # closed by the test

    reader = threading.Thread(target=read_victim, daemon=True)
    reader.start()

    def flood() -> list[str | None]:
        client = UiClient(server)
        try:
            return [client.reply("x" * (2 * CONTEXT))[1] for _ in range(FLOOD_ROUNDS)]
        finally:
            client.close()

    before = streamed_tokens(bytes(received))
    errors = in_threads(*[flood] * FLOODERS)
    during = streamed_tokens(bytes(received)) - before
    victim.close()

    assert all(e and "tokens" in e for round_ in errors for e in round_), errors
    # The stream gets a token between any two prompts the engine prepares (so about one per
    # flood prompt); without that rule it got about a third of that here, and the issue's
    # server none for 21 s.
    assert during >= FLOODERS * FLOOD_ROUNDS * 3 // 4, during
