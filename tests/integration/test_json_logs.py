"""``logFormat: json`` on a live server (gunicorn + gevent, the fake backend): every line the
server writes is one JSON object; access lines carry the request without its query string, and
no line holds a token, a prompt or a reply."""

from __future__ import annotations

import json

import requests

from tanglebox.api_tokens import add_token
from tests.integration.test_gunicorn_hooks import send_raw
from tests.live_server import wait_until

WRONG = "tbx_wrong-token-in-the-query"
PROMPT = "echo Zanzibar"  # the fake model answers "Zanzibar"
MODEL = "SmolLM2-135M-Instruct"  # the default modelName's id (the fake backend serves it)


def log_lines(server) -> list[str]:
    return [line for line in server.log().splitlines() if line.strip()]


def test_every_line_is_one_json_object_without_a_token(fake_server, tmp_path):
    token = add_token(tmp_path / "apiTokens.txt", "alice")
    server = fake_server.start(fake={}, logFormat="json", enableWebLogOutput=True,
                               isApiTokensRequired=True, temperature=0)
    url = server.url + "/conversation"
    in_query = requests.get(url, params={"userPrompt": PROMPT, "token": token}, timeout=30)
    in_header = requests.get(url, params={"userPrompt": PROMPT}, timeout=30,
                             headers={"Authorization": f"Bearer {token}"})
    assert in_query.text == in_header.text == "Zanzibar"
    assert requests.get(url, params={"userPrompt": PROMPT, "token": WRONG},
                        timeout=30).status_code == 401
    # A request line gunicorn cannot parse goes to its error log, token and all, unscrubbed.
    assert send_raw(server.port, f"GET /conversation?token={token}\x01 HTTP/1.1\r\n"
                                 "Host: x\r\n\r\n".encode()).startswith(b"HTTP/1.1 400 ")

    def replies_logged() -> list[dict]:
        entries = [json.loads(line) for line in log_lines(server)]
        return [e for e in entries if e["logger"] == "gunicorn.access"
                and e["path"] == "/conversation"]
    wait_until(lambda: len(replies_logged()) == 3, what="three access lines")
    wait_until(lambda: any("Invalid request" in line for line in log_lines(server)),
               what="the error line of the unparsable request")
    server.stop()

    lines = log_lines(server)
    entries = [json.loads(line) for line in lines]  # each line, one object
    assert all(isinstance(e, dict) and {"time", "level", "logger", "message"} <= set(e)
               for e in entries)
    unparsable = [e["level"] for e in entries if "Invalid request" in e["message"]]
    assert unparsable == ["WARNING"]
    access = [e for e in entries if e["logger"] == "gunicorn.access"]
    assert [(e["method"], e["path"], e["status"], e["surface"], e["model"])
            for e in access if e["path"] == "/conversation"] == [
        ("GET", "/conversation", 200, "rest", MODEL),
        ("GET", "/conversation", 200, "rest", MODEL),
        ("GET", "/conversation", 401, "rest", "")]
    assert all(isinstance(e["duration_ms"], float) and e["remote_addr"] == "127.0.0.1"
               for e in access)
    text = "\n".join(lines)
    for secret in (token, WRONG, "Zanzibar"):  # the tokens, the prompt and the reply
        assert secret not in text
