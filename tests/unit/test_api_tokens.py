"""The token file: the original apiTokens.txt format, hashed entries, live reload, the CLI."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys

import pytest

from tanglebox import api_tokens
from tanglebox.api_tokens import (HEADER, ApiTokens, TokenFileError, add_token, hash_token,
                                  list_tokens, revoke_token)
from tests.conftest import ROOT

ORIGINAL_FILE = "format-of-file=username:TOKEN\ntangles:c02936d8-4c07-40e8-b008-89200629bc5e"


def test_the_original_file_format_is_accepted(tmp_path):
    path = tmp_path / "apiTokens.txt"
    path.write_text(ORIGINAL_FILE)
    tokens = ApiTokens(path)
    assert tokens.owner("c02936d8-4c07-40e8-b008-89200629bc5e") == "tangles"
    assert not tokens.is_valid("c02936d8-4c07-40e8-b008-89200629bc5f")


def test_the_header_and_its_placeholder_are_never_tokens(tmp_path):
    path = tmp_path / "apiTokens.txt"
    path.write_text(ORIGINAL_FILE + "\nexample:TOKEN\n")
    tokens = ApiTokens(path)
    for guess in ("TOKEN", "username:TOKEN", "format-of-file=username", HEADER):
        assert not tokens.is_valid(guess)


@pytest.mark.parametrize("presented", [None, "", " ", "\n", "\t"])
def test_blank_is_never_valid_even_with_blank_lines_and_empty_tokens(tmp_path, presented):
    path = tmp_path / "apiTokens.txt"
    path.write_text(f"{HEADER}\n\n   \nempty:\nspaces:   \n:\nreal:s3cret\n")
    tokens = ApiTokens(path)
    assert not tokens.is_valid(presented)
    assert tokens.is_valid("s3cret")


def test_hashed_entries_match_their_token_only(tmp_path):
    path = tmp_path / "apiTokens.txt"
    path.write_text(f"{HEADER}\nbot:sha256:{hash_token('hunter2-long-token')}\n")
    tokens = ApiTokens(path)
    assert tokens.owner("hunter2-long-token") == "bot"
    assert not tokens.is_valid(hash_token("hunter2-long-token"))  # the hash is not the token
    assert not tokens.is_valid("sha256:" + hash_token("hunter2-long-token"))


def test_a_malformed_line_is_logged_by_number_never_by_content(tmp_path, caplog):
    path = tmp_path / "apiTokens.txt"
    path.write_text(f"{HEADER}\nno-colon-secret-xyz\nbad:sha256:not-hex-secret-abc\nok:fine\n")
    with caplog.at_level(logging.INFO):
        tokens = ApiTokens(path)
        assert tokens.is_valid("fine")
        assert not tokens.is_valid("no-colon-secret-xyz")
    assert "line 2" in caplog.text and "line 3" in caplog.text
    assert "secret" not in caplog.text and "fine" not in caplog.text


def test_every_entry_is_compared_in_constant_time(tmp_path, monkeypatch):
    path = tmp_path / "apiTokens.txt"
    path.write_text(f"{HEADER}\na:first\nb:second\nc:sha256:{hash_token('third')}\n")
    calls = []
    original = api_tokens.hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return original(a, b)

    monkeypatch.setattr(api_tokens.hmac, "compare_digest", counting)
    assert ApiTokens(path).owner("first") == "a"
    # all three entries, not just up to the match, and always digests of one length
    assert calls == [(32, 32)] * 3


def test_a_missing_file_refuses_everything(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert not ApiTokens(tmp_path / "apiTokens.txt").is_valid("anything")
    assert "does not exist" in caplog.text


def test_changes_apply_without_a_new_object(tmp_path):
    path = tmp_path / "apiTokens.txt"
    tokens = ApiTokens(path)
    assert not tokens.is_valid("later")
    token = add_token(path, "ci")
    assert tokens.owner(token) == "ci"
    with path.open("a") as file:  # an editor appending in place, same inode
        file.write("hand:edited-in-place\n")
    assert tokens.owner("edited-in-place") == "hand"
    revoke_token(path, "ci")
    assert not tokens.is_valid(token)
    assert tokens.is_valid("edited-in-place")


def test_add_creates_the_original_format_readable_by_its_owner_only(tmp_path):
    path = tmp_path / "apiTokens.txt"
    token = add_token(path, "alice")
    lines = path.read_text().splitlines()
    assert lines == [HEADER, f"alice:{token}"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40 and ":" not in token


def test_add_hashed_keeps_only_the_hash(tmp_path):
    path = tmp_path / "apiTokens.txt"
    token = add_token(path, "bot", hashed=True)
    assert token not in path.read_text()
    assert f"bot:sha256:{hash_token(token)}" in path.read_text()
    assert ApiTokens(path).owner(token) == "bot"
    assert [(e.name, e.hashed) for e in list_tokens(path)] == [("bot", True)]


def test_add_keeps_existing_lines_and_refuses_a_duplicate_name(tmp_path):
    path = tmp_path / "apiTokens.txt"
    path.write_text(ORIGINAL_FILE + "\n# the CI robot\n")
    add_token(path, "ci")
    assert path.read_text().startswith(ORIGINAL_FILE + "\n# the CI robot\nci:")
    with pytest.raises(TokenFileError, match="already has a token named \"tangles\""):
        add_token(path, "tangles")


@pytest.mark.parametrize("name", ["", "a:b", "has space", "#comment", "format-of-file=x", "x" * 65])
def test_add_refuses_names_the_format_cannot_hold(tmp_path, name):
    with pytest.raises(TokenFileError, match="not a usable token name"):
        add_token(tmp_path / "apiTokens.txt", name)


def test_revoke_removes_only_that_name(tmp_path):
    path = tmp_path / "apiTokens.txt"
    path.write_text(ORIGINAL_FILE + "\nother:keep-me\n")
    revoke_token(path, "tangles")
    assert path.read_text() == f"{HEADER}\nother:keep-me\n"
    with pytest.raises(TokenFileError, match="no token named \"tangles\""):
        revoke_token(path, "tangles")


# -- python -m tanglebox tokens ... -----------------------------------------------------------

def cli(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGLEBOX_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "tanglebox", "tokens", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


def test_cli_add_prints_only_the_token_and_the_server_accepts_it(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"apiTokensFile": "secrets/tokens.txt"}))
    (tmp_path / "secrets").mkdir()
    added = cli("add", "alice", "--settings", str(settings), cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert added.stdout == token + "\n"
    assert ApiTokens(tmp_path / "secrets" / "tokens.txt").owner(token) == "alice"

    hashed = cli("add", "bot", "--hashed", "--settings", str(settings), cwd=tmp_path)
    assert hashed.returncode == 0
    listed = cli("list", "--settings", str(settings), cwd=tmp_path)
    assert listed.stdout.splitlines() == ["alice\tplain", "bot\tsha256"]
    assert token not in listed.stdout and hashed.stdout.strip() not in listed.stdout

    revoked = cli("revoke", "alice", "--settings", str(settings), cwd=tmp_path)
    assert revoked.returncode == 0 and revoked.stdout == ""
    assert not ApiTokens(tmp_path / "secrets" / "tokens.txt").is_valid(token)
    assert json.loads(settings.read_text()) == {"apiTokensFile": "secrets/tokens.txt"}


def test_cli_defaults_to_settings_json_in_the_current_folder_without_creating_it(tmp_path):
    added = cli("add", "alice", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert ApiTokens(tmp_path / "apiTokens.txt").owner(added.stdout.strip()) == "alice"
    assert not (tmp_path / "settings.json").exists()


@pytest.mark.parametrize("args, message", [
    (("revoke", "nobody"), "no token named \"nobody\""),
    (("add", "a:b"), "not a usable token name"),
    (("add", "x", "--settings", "missing.json"), "missing.json: no such settings file"),
    (("frobnicate",), "invalid choice"),
    ((), "required"),
])
def test_cli_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
    assert "Traceback" not in result.stderr
