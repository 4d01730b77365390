"""The API token file: who may call the API when ``isApiTokensRequired`` is on.

The format is the original Tanglebox's ``apiTokens.txt``, so an existing file keeps working::

    format-of-file=username:TOKEN
    tangles:c02936d8-4c07-40e8-b008-89200629bc5e
    ci-bot:sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

One ``name:token`` pair per line under the header line. A token may also be stored hashed, as
``name:sha256:<64 hex digits>`` (the SHA-256 of the token): then the file alone does not give
the token away. Tokens are long random strings, so an unsalted SHA-256 is enough (as GitHub
does for its tokens); a salt protects guessable secrets such as passwords, not these.

Rules, each chosen so that a mistake in the file refuses access rather than grants it:

- blank lines, ``#`` comments, the header, and a token that is literally ``TOKEN`` (the
  header's placeholder, which the original also skipped) never match anything;
- a line that is not ``name:token`` is ignored and logged by line number, never by content;
- a missing file means every token is refused;
- a file that cannot be read as UTF-8 text (a folder, no permission, another encoding) stops
  the server at start-up with one line, and while it runs answers every request that needs a
  token with 503 (:class:`TokenFileUnreadable`) and one log line for the operator: the client
  is not told its token is wrong when the server is at fault.

The server keeps an :class:`ApiTokens` and asks it on every request; it re-reads the file when
its modification time, size or inode change, so ``python -m tanglebox tokens add`` (or an
editor) takes effect without a restart. Comparison is by SHA-256 digest with
``hmac.compare_digest`` over every entry, so timing says nothing about how much of a token
matched. Tokens are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from werkzeug.exceptions import ServiceUnavailable

log = logging.getLogger(__name__)

HEADER = "format-of-file=username:TOKEN"
HASH_PREFIX = "sha256:"
PLACEHOLDER = "TOKEN"  # the header's example value; never a real token
TOKEN_PREFIX = "tbx_"  # makes leaked tokens easy to recognise for secret scanners
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
UNREADABLE_RETRY_AFTER = 60  # seconds: the operator has to fix the file


class TokenFileError(Exception):
    """A token file operation the user must fix (a bad name, a duplicate, an unknown name,
    a file that cannot be read)."""


class TokenFileUnreadable(ServiceUnavailable):
    """A request needs a token, and the token file cannot be read: 503.

    An HTTP exception, so REST and socket handshakes answer it as they are; a check made inside
    an open websocket has to catch it and say it there.
    """

    description = ("The server cannot read its API token file, so no token can be checked; "
                   "its operator must fix it (the server's log says how). Try again later.")


@dataclass(frozen=True)
class TokenEntry:
    name: str
    digest: bytes  # SHA-256 of the token
    hashed: bool  # stored in the file as a hash rather than the token itself


def hash_token(token: str) -> str:
    """The SHA-256 of ``token`` as hex: what a hashed line stores."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits), safe in a URL, a header and the file's format."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_token_file(text: str, source: str = "the token file") -> list[TokenEntry]:
    """Every valid entry in ``text``; malformed lines are logged (by number) and skipped."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("format-of-file="):
            continue
        name, colon, secret = line.partition(":")
        name, secret = name.strip(), secret.strip()
        if not colon or not name or not secret:
            log.warning("%s, line %d: not a name:token pair; ignored", source, number)
            continue
        if secret == PLACEHOLDER:
            continue
        if secret.startswith(HASH_PREFIX):
            digest = secret[len(HASH_PREFIX):]
            if not _HEX_DIGEST.fullmatch(digest):
                log.warning("%s, line %d: a sha256: entry needs 64 hex digits; ignored",
                            source, number)
                continue
            entries.append(TokenEntry(name, bytes.fromhex(digest), hashed=True))
        else:
            entries.append(TokenEntry(name, hashlib.sha256(secret.encode("utf-8")).digest(),
                                      hashed=False))
    return entries


def read_token_text(path: Path) -> str:
    """The text of the file at ``path`` ("" when it does not exist); a TokenFileError says why
    it cannot be read, by line number, never by content."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as err:
        raise TokenFileError(f"{path} cannot be read ({err.strerror}); it must be a text file "
                             "of name:token lines") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise TokenFileError(f"{path}, line {line}, is not UTF-8 text; save the file as UTF-8") \
            from None


def read_token_file(path: Path) -> list[TokenEntry]:
    """The entries of the file at ``path``; none when it does not exist."""
    return parse_token_file(read_token_text(path), source=str(path))


class ApiTokens:
    """The server's view of the token file, re-read whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: list[TokenEntry] = []
        self._fingerprint: tuple | None = ()  # () = never read; None = file missing
        self._unreadable = False

    def owner(self, token: str | None) -> str | None:
        """The name the token belongs to, or None if it is not a valid token.

        Raises TokenFileUnreadable when a token was given and the file cannot be read.
        """
        if not token or not token.strip():
            return None
        return self.owner_by_digest(hashlib.sha256(token.strip().encode("utf-8")).digest())

    def owner_by_digest(self, presented: bytes) -> str | None:
        """The name whose token has this SHA-256 digest (a signed-in browser's session)."""
        found = None
        # Compare against every entry, without stopping at a match, so the time taken does
        # not depend on which entry (if any) matched.
        for entry in self._current_entries():
            if hmac.compare_digest(entry.digest, presented) and found is None:
                found = entry.name
        return found

    def is_valid(self, token: str | None) -> bool:
        return self.owner(token) is not None

    def _current_entries(self) -> list[TokenEntry]:
        try:
            stat = self.path.stat()
            fingerprint = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            fingerprint = None
        except OSError as err:  # e.g. a folder on the way that may not be read
            fingerprint = ("stat failed", err.errno)
        if fingerprint != self._fingerprint:  # read, and log, once per change of the file
            self._fingerprint = fingerprint
            self._reload(exists=fingerprint is not None)
        if self._unreadable:
            raise TokenFileUnreadable(retry_after=UNREADABLE_RETRY_AFTER)
        return self._entries

    def _reload(self, exists: bool) -> None:
        self._entries, self._unreadable = [], False
        if not exists:
            log.warning("API tokens: %s does not exist, so every token is refused; "
                        "create one with: python -m tanglebox tokens add NAME", self.path)
            return
        try:
            self._entries = read_token_file(self.path)
        except TokenFileError as err:
            self._unreadable = True
            log.error("API tokens: %s. Until it is fixed, requests that need a token are "
                      "answered 503", err)
            return
        log.info("API tokens: loaded %d from %s", len(self._entries), self.path)


def add_token(path: Path, name: str, hashed: bool = False) -> str:
    """Create a token for ``name``, store it (plain or hashed) and return it."""
    if not NAME_PATTERN.fullmatch(name):
        raise TokenFileError(f"\"{name}\" is not a usable token name: use 1 to 64 letters, "
                             "digits and . _ @ + - (starting with a letter or digit)")
    if any(entry.name == name for entry in read_token_file(path)):
        raise TokenFileError(f"{path} already has a token named \"{name}\"; "
                             f"revoke it first (tokens revoke {name})")
    token = new_token()
    stored = HASH_PREFIX + hash_token(token) if hashed else token
    lines = _read_lines(path)
    if not lines:
        lines = [HEADER]
    _write_lines(path, [*lines, f"{name}:{stored}"])
    return token


def list_tokens(path: Path) -> list[TokenEntry]:
    return read_token_file(path)


def revoke_token(path: Path, name: str) -> None:
    """Remove every token line for ``name``; raises TokenFileError if there is none."""
    lines = _read_lines(path)
    kept = [line for line in lines if not _is_entry_for(line, name)]
    if len(kept) == len(lines):
        raise TokenFileError(f"{path} has no token named \"{name}\"")
    _write_lines(path, kept)


def _is_entry_for(line: str, name: str) -> bool:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or stripped.startswith("format-of-file="):
        return False
    entry_name, colon, _ = stripped.partition(":")
    return bool(colon) and entry_name.strip() == name


def _read_lines(path: Path) -> list[str]:
    return read_token_text(path).splitlines()


def _write_lines(path: Path, lines: list[str]) -> None:
    """Replace the file atomically, so the server never reads half of it."""
    if not path.parent.is_dir():
        raise TokenFileError(f"{path}: its folder {path.parent} does not exist")
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600  # a new file of secrets: readable by its owner only
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write("\n".join(lines) + "\n")
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
