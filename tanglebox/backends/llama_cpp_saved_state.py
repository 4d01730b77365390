"""A folder of saved KV states, so a conversation's cache outlives its slot and a restart.

The llama.cpp backend saves a slot's sequence state (``llama_state_seq_get_data``) here when the
slot is about to drop it for another conversation and when the model is unloaded; when a request
comes whose prompt starts with a saved sequence, it loads that state into its slot and only the
rest of the prompt is read. This module is the folder: bytes in, bytes out, no llama.cpp.

Layout: ``<kvCacheDirectory>/<model fingerprint>/<hash of the tokens>.kvstate``. The fingerprint
names the model file and the context settings, so two models sharing the folder never see each
other's states (a state only loads into the model and context shape it came from). A file::

    MAGIC | fingerprint (32 bytes) | token count (u32) | state size (u64) | CRC-32 (u32)
          | tokens (int32 each) | state

Files are written to a temporary name and renamed, so a reader never sees half a file; a file
that does not read back whole (cut short, another fingerprint, a bad CRC) is removed and
ignored. The folder is bounded: after each save the least recently used files (by mtime, which a
load refreshes) go until the whole folder, every model's subfolder, fits ``budget_bytes``.
All calls come from the engine's thread.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"TBKVST01"
HEADER = struct.Struct("<8s32sIQI")
SUFFIX = ".kvstate"
TOKEN = np.dtype("<i4")
STALE_TEMP_SECONDS = 3600  # a temporary file this old was left by a process that died mid-write


@dataclass
class SavedState:
    path: Path
    tokens: np.ndarray  # the sequence the state holds, position 0 on
    size: int  # bytes on disk


class SavedStates:
    """The saved states of one model (its ``fingerprint``) in ``directory``."""

    def __init__(self, directory: Path, fingerprint: bytes, budget_bytes: int) -> None:
        self.root = directory
        self.fingerprint = fingerprint
        self.budget_bytes = budget_bytes
        self.folder = directory / fingerprint.hex()[:24]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._states: dict[str, SavedState] = {}
        self._remove_stale_temporaries()
        self._refresh()

    # -- finding ----------------------------------------------------------------------------

    def longest_prefix(self, tokens: Sequence[int]) -> tuple[SavedState, int] | None:
        """The saved state sharing the longest prefix with ``tokens``, and that length."""
        self._refresh()  # another process of the same model may have saved since
        wanted = np.asarray(tokens, dtype=TOKEN)
        best: tuple[SavedState, int] | None = None
        for state in self._states.values():
            shared = _common_prefix(state.tokens, wanted)
            if shared and (best is None or shared > best[1]):
                best = (state, shared)
        return best

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether exactly ``tokens`` is saved (then it counts as used now)."""
        state = self._states.get(self._name(tokens))
        if state is None:
            return False
        return self._touch(state)

    # -- reading and writing ----------------------------------------------------------------

    def read(self, state: SavedState) -> bytearray | None:
        """The state's bytes, or None when the file is gone or does not read back whole (then
        it is removed)."""
        try:
            with open(state.path, "rb") as file:
                header = file.read(HEADER.size)
                count, size, crc = self._check_header(header)
                if os.fstat(file.fileno()).st_size != HEADER.size + count * TOKEN.itemsize + size:
                    raise ValueError("its length does not match its header")
                tokens = file.read(count * TOKEN.itemsize)
                data = bytearray(size)
                if file.readinto(data) != size:
                    raise ValueError("it was cut short while being read")
        except FileNotFoundError:  # evicted by another process meanwhile
            self._states.pop(state.path.name, None)
            return None
        except (OSError, ValueError) as err:
            self.discard(state, f"unreadable ({err})")
            return None
        if zlib.crc32(data, zlib.crc32(tokens)) != crc:
            self.discard(state, "its checksum does not match")
            return None
        self._touch(state)
        return data

    def write(self, tokens: Sequence[int], data: bytes | bytearray | memoryview) -> None:
        """Save ``data`` as the state of ``tokens``, then bound the folder."""
        size = HEADER.size + len(tokens) * TOKEN.itemsize + len(data)
        if size > self.budget_bytes:
            log.info("a KV state of %d MB is over kvCacheDiskMegabytes; not saved", size >> 20)
            return
        array = np.asarray(tokens, dtype=TOKEN)
        token_bytes = array.tobytes()
        header = HEADER.pack(MAGIC, self.fingerprint, len(array), len(data),
                             zlib.crc32(data, zlib.crc32(token_bytes)))
        name = self._name(tokens)
        path = self.folder / name
        temporary = path.with_name(f"{name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "wb") as file:
                file.write(header)
                file.write(token_bytes)
                file.write(data)
            os.replace(temporary, path)
            _mark_used(path)
        except OSError as err:
            log.warning("could not save a KV state in %s: %s", self.folder, err)
            temporary.unlink(missing_ok=True)
            return
        self._states[name] = SavedState(path, array, size)
        self._drop_prefixes_of(array)
        self._bound()

    def discard(self, state: SavedState, reason: str) -> None:
        log.warning("removing the saved KV state %s: %s", state.path.name, reason)
        self._states.pop(state.path.name, None)
        state.path.unlink(missing_ok=True)

    # -- the folder -------------------------------------------------------------------------

    def _name(self, tokens: Sequence[int]) -> str:
        digest = sha256(self.fingerprint + np.asarray(tokens, dtype=TOKEN).tobytes())
        return digest.hexdigest()[:40] + SUFFIX

    def _check_header(self, header: bytes) -> tuple[int, int, int]:
        if len(header) != HEADER.size:
            raise ValueError("shorter than its header")
        magic, fingerprint, count, size, crc = HEADER.unpack(header)
        if magic != MAGIC:
            raise ValueError("not a saved KV state")
        if fingerprint != self.fingerprint:
            raise ValueError("saved by another model or context settings")
        return count, size, crc

    def _refresh(self) -> None:
        """Know the files in this model's folder: read the header of new ones, forget gone ones."""
        try:
            names = {entry.name for entry in os.scandir(self.folder)
                     if entry.name.endswith(SUFFIX)}
        except OSError:
            names = set()
        for name in set(self._states) - names:
            del self._states[name]
        for name in names - set(self._states):
            path = self.folder / name
            try:
                with open(path, "rb") as file:
                    count, size, _ = self._check_header(file.read(HEADER.size))
                    tokens = np.frombuffer(file.read(count * TOKEN.itemsize), dtype=TOKEN)
                if len(tokens) != count:
                    raise ValueError("cut short")
                state = SavedState(path, tokens, HEADER.size + tokens.nbytes + size)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as err:
                self.discard(SavedState(path, np.empty(0, TOKEN), 0), f"unreadable ({err})")
                continue
            self._states[name] = state

    def _drop_prefixes_of(self, tokens: np.ndarray) -> None:
        """A saved state whose tokens start the new one is worth nothing beside it: loading
        the longer one and dropping its tail gives the same."""
        for state in list(self._states.values()):
            if len(state.tokens) < len(tokens) and _common_prefix(state.tokens, tokens) == len(
                    state.tokens):
                self._states.pop(state.path.name, None)
                state.path.unlink(missing_ok=True)

    def _bound(self) -> None:
        """Remove the least recently used files of the whole folder until it fits the budget."""
        files = []
        for folder in (self.root, *(p for p in self.root.iterdir() if p.is_dir())):
            for entry in os.scandir(folder):
                if entry.name.endswith(SUFFIX) and entry.is_file():
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue
                    files.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.budget_bytes:
                break
            path.unlink(missing_ok=True)
            if path.parent == self.folder:
                self._states.pop(path.name, None)
            total -= size

    def _touch(self, state: SavedState) -> bool:
        try:
            _mark_used(state.path)
        except FileNotFoundError:
            self._states.pop(state.path.name, None)
            return False
        return True

    def _remove_stale_temporaries(self) -> None:
        now = time.time()
        for path in self.folder.glob("*.tmp"):
            try:
                if now - path.stat().st_mtime > STALE_TEMP_SECONDS:
                    path.unlink()
            except FileNotFoundError:
                pass


def _mark_used(path: Path) -> None:
    # The clock's nanoseconds: the kernel's own file times tick every few milliseconds, too
    # coarse to order states saved one after another.
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
