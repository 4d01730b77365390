"""The lookup benchmark's llama-server contestants: which servers it starts, how it reads
llama-server's own counts from a streamed reply, and the side-by-side rows it reports."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench import servers
from bench.lookup_llama_server import (LlamaServerContestant, Measured, first_difference,
                                       parse_specs, server_counts, side_by_side)


def test_plain_decoding_comes_first_and_sizes_become_the_types_own_flags():
    specs = parse_specs("ngram-simple, ngram-simple:3:8,ngram-cache")
    assert [s.label for s in specs] == ["none", "ngram-simple", "ngram-simple:3:8", "ngram-cache"]
    assert specs[0].flags == ("--spec-type", "none")
    assert specs[1].flags == ("--spec-type", "ngram-simple")
    assert specs[2].flags == ("--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                              "--spec-ngram-simple-size-m", "8")


@pytest.mark.parametrize("asked", ["ngram-nonsense", "ngram-mod:3:8", "ngram-simple:3"])
def test_a_spec_llama_server_would_refuse_is_refused_before_anything_starts(asked):
    with pytest.raises(ValueError):
        parse_specs(asked)


def test_every_llama_server_gets_its_spec_flags_and_its_own_log(monkeypatch, tmp_path):
    started = []

    class _Recorded:
        def __init__(self, name, command, port, log_path, env=None) -> None:
            started.append((name, command, log_path))

    monkeypatch.setattr(servers, "ServerProcess", _Recorded)
    for spec in parse_specs("ngram-simple:3:8"):
        servers.start_llama_server(Path("llama-server"), Path("model.gguf"), 8, 1024, 2,
                                   tmp_path, extra_args=spec.flags,
                                   name="llama-server-" + spec.label.replace(":", "-"))
    (plain, plain_command, plain_log), (spec, spec_command, spec_log) = started
    assert plain_command[-2:] == ["--spec-type", "none"]
    assert spec_command[-6:] == ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n",
                                 "3", "--spec-ngram-simple-size-m", "8"]
    assert "-np" in spec_command and spec_command[spec_command.index("-np") + 1] == "8"
    assert plain_log != spec_log


def test_counts_are_llama_servers_own_with_drafts_only_where_it_drafted():
    final = {"content": "", "stop": True, "tokens_predicted": 40, "tokens_evaluated": 61,
             "timings": {"cache_n": 29, "prompt_n": 32, "predicted_n": 40,
                         "predicted_per_second": 95.5, "draft_n": 36, "draft_n_accepted": 30}}
    counts = server_counts(final)
    assert (counts.prompt_tokens, counts.tokens, counts.drafted, counts.accepted) == (61, 40, 36,
                                                                                       30)
    assert counts.decode_rate == 95.5  # its decoding speed, the prompt's reading left out
    del final["timings"]["draft_n"], final["timings"]["draft_n_accepted"]
    assert (server_counts(final).drafted, server_counts(final).accepted) == (0, 0)


class _StreamingCompletion(BaseHTTPRequestHandler):
    """llama-server's streamed ``/completion``, as far as the contestant reads it: text events,
    then a final event with ``stop`` and the server's timings."""

    bodies: list[dict] = []

    def do_GET(self):  # /health
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        events = [{"content": "The dog", "stop": False}, {"content": " sat.", "stop": False},
                  {"content": "", "stop": True,
                   "timings": {"prompt_n": 20, "cache_n": 5, "predicted_n": 7, "draft_n": 6,
                               "draft_n_accepted": 4, "predicted_per_second": 70.0}}]
        for event in events:
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")

    def log_message(self, *args):
        pass


class _Server:
    """A started server, as far as the contestant needs one: its URL."""

    def __init__(self, url: str) -> None:
        self.url = url


def test_a_run_streams_the_rendered_prompts_and_counts_the_servers_tokens():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _StreamingCompletion)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        contestant = LlamaServerContestant(_Server(f"http://127.0.0.1:{httpd.server_address[1]}"),
                                           "ngram-simple", lambda text: f"<|user|>{text}<|a|>")
        measured = contestant.run(["Copy: the cat sat.", "Copy: a cat."], 32)
    finally:
        httpd.shutdown()
    assert measured.replies == ["The dog sat.", "The dog sat."]
    assert measured.prompt_tokens == [25, 25]
    assert (measured.drafted, measured.accepted) == (12, 8)
    assert measured.tokens == 14 and measured.rate > 0 and not measured.errors
    assert measured.decode_rates == [70.0, 70.0] and measured.decode_rate == 70.0
    assert sorted(b["prompt"] for b in _StreamingCompletion.bodies) == [
        "<|user|>Copy: a cat.<|a|>", "<|user|>Copy: the cat sat.<|a|>"]
    assert {(b["n_predict"], b["temperature"], b["stream"])
            for b in _StreamingCompletion.bodies} == {(32, 0, True)}


def _runs(rates: list[float], replies: list[str], drafted: int = 0,
          accepted: int = 0) -> list[Measured]:
    # Decoding alone runs at twice the rate the prompt's reading leaves overall.
    return [Measured(int(rate * 10), 10.0, replies, [10] * len(replies), drafted, accepted,
                     decode_rates=[rate * 2] * len(replies)) for rate in rates]


def test_rows_give_each_ratio_round_by_round_and_which_replies_match():
    rows = side_by_side({
        "off": _runs([50.0, 40.0, 40.0], ["a", "b"]),
        "on": _runs([75.0, 48.0, 44.0], ["a", "c"], drafted=10, accepted=8),
        "llama-server none": _runs([60.0, 30.0, 40.0], ["a", "x"]),
        "llama-server ngram-simple": _runs([90.0, 30.0, 50.0], ["a", "c"], drafted=20,
                                           accepted=5),
    }, parse_specs("ngram-simple"))
    table = {row[0]: row[1:] for row in rows}
    # tokens/s (median), ÷ its plain decoding, Tanglebox on ÷ this, same replies as its plain
    # decoding, same text as Tanglebox, drafts accepted of drafted, then decoding only:
    # tokens/s (median) and ÷ its plain decoding
    assert table["Tanglebox off"] == ["40.0", "—", "1.20 (1.10–1.50)", "—", "—", "—",
                                      "80.0", "—"]
    assert table["Tanglebox on"] == ["48.0", "1.20 (1.10–1.50)", "—", "3 of 6", "—", "24 of 30",
                                     "96.0", "1.20 (1.10–1.50)"]
    # llama-server plain is held to Tanglebox off, a spec type to Tanglebox on
    assert table["llama-server none"] == ["40.0", "—", "1.25 (1.10–1.60)", "—", "3 of 6", "—",
                                          "80.0", "—"]
    assert table["llama-server ngram-simple"] == ["50.0", "1.25 (1.00–1.50)",
                                                  "0.88 (0.83–1.60)", "3 of 6", "6 of 6",
                                                  "15 of 60", "100.0", "1.25 (1.00–1.50)"]


def test_the_first_replies_that_part_are_shown_where_they_part():
    tanglebox = _runs([1.0], ["Once upon a time", "In the year 1885, a lighthouse"])
    server = _runs([1.0], ["Once upon a time", "In the year 1910, a lighthouse"])
    assert first_difference(tanglebox, server) == ("at character 13: 'In the year 1885, a "
                                                   "lighthouse' against 'In the year 1910, a "
                                                   "lighthouse'")
    assert first_difference(tanglebox, tanglebox) == ""
