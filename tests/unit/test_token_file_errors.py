"""A token file that cannot be read: exit 2 at start-up; 503 and one log line while serving.

The client is not told its token is wrong when the server is at fault, the operator's log says
what to fix (once, not per request), and neither ever shows a token.
"""

from __future__ import annotations

import json
import logging

import pytest

from tanglebox.api_tokens import add_token
from tests.commands import one_error_line, run_app, run_python
from tests.live_server import free_port

TOKENS_REQUIRED = {"isApiTokensRequired": True}


def not_utf8(path) -> None:
    """A third line (after the header and a token) in Latin-1, as an editor set to another
    encoding saves it."""
    path.write_bytes(path.read_bytes() + b"caf\xe9:tbx_not-utf8-secret\n")


def a_folder(path) -> None:
    path.unlink()
    path.mkdir()


def restore(path, content: bytes) -> None:
    if path.is_dir():
        path.rmdir()
    path.write_bytes(content)


def ask(client, token: str):
    return client.get("/conversation", query_string={"userPrompt": "echo hi", "token": token})


@pytest.mark.parametrize("settings_values", [TOKENS_REQUIRED])
@pytest.mark.parametrize("break_file", [not_utf8, a_folder], ids=["not-utf8", "a-folder"])
def test_a_token_file_that_breaks_while_serving_is_503_and_one_log_line(client, tmp_path, caplog,
                                                                       break_file):
    path = tmp_path / "apiTokens.txt"
    token = add_token(path, "alice")
    assert ask(client, token).status_code == 200
    content = path.read_bytes()

    break_file(path)
    with caplog.at_level(logging.INFO, logger="tanglebox.api_tokens"):
        answers = [ask(client, token), ask(client, "tbx_someone-else"),
                   client.post("/conversation", json={"userPrompt": "echo hi"},
                               headers={"Authorization": f"Bearer {token}", "Accept":
                                        "application/json"})]
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert "cannot read its API token file" in answer.text
        assert answer.headers["Retry-After"] == "60"
    assert token not in answers[0].text
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, caplog.text  # once per change of the file, not per request
    assert str(path) in errors[0].getMessage() and "503" in errors[0].getMessage()
    assert token not in caplog.text and "not-utf8-secret" not in caplog.text

    restore(path, content)
    assert ask(client, token).status_code == 200


@pytest.mark.parametrize("settings_values", [TOKENS_REQUIRED])
def test_a_request_without_a_token_is_still_401(client, tmp_path):
    path = tmp_path / "apiTokens.txt"
    add_token(path, "alice")
    not_utf8(path)
    assert client.get("/conversation?userPrompt=hi").status_code == 401


# -- at start-up, and for the tokens command ---------------------------------------------------

@pytest.mark.parametrize("break_file, problem", [
    (not_utf8, "line 3, is not UTF-8 text; save the file as UTF-8"),
    (a_folder, "cannot be read (Is a directory)"),
], ids=["not-utf8", "a-folder"])
def test_a_token_file_that_cannot_be_read_stops_the_start_with_one_line(tmp_path, break_file,
                                                                       problem):
    path = tmp_path / "apiTokens.txt"
    add_token(path, "alice")
    break_file(path)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({**TOKENS_REQUIRED, "port": free_port()}))
    line = one_error_line(run_app(tmp_path, settings))
    assert '"apiTokensFile": ' in line and str(path) in line and problem in line
    assert "secret" not in line


@pytest.mark.parametrize("args", [("list",), ("add", "bob"), ("revoke", "alice")])
def test_the_tokens_command_on_a_file_that_is_not_utf8_is_one_line(tmp_path, args):
    path = tmp_path / "apiTokens.txt"
    add_token(path, "alice")
    not_utf8(path)
    line = one_error_line(run_python(tmp_path, "-m", "tanglebox", "tokens", *args))
    assert "apiTokens.txt, line 3, is not UTF-8 text" in line
