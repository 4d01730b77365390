"""A backend with a byte tokenizer and a scripted "model", for tests without weights.

The reply to a conversation is ``fake_reply(last user message)``: ``echo TEXT`` answers TEXT
(so a test can make the "model" say anything, an XSS payload included), ``count N`` answers
"1 2 … N", anything else answers "You said: …"; ``letters N`` is N tokens at each of which
the 26 lowercase letters are equally likely (then the end), for tests of random draws. The
model really works token by token through the engine's decode/forget interface, so slots,
batching, caching and cancel are exercised.

With ``verifies_drafts=True`` it returns logits at an item's last ``logits_count`` positions,
so the engine's lookup decoding drafts on it (``echo`` replies repeat the prompt: drafts
that hold).

With ``supports_grammar=True`` it takes a "grammar" ``root ::= CHARS``: the reply may hold only
those characters (the end of turn is always allowed); anything else is a GrammarError.
"""

from __future__ import annotations

import ctypes
import re
import time

import numpy as np

from tanglebox.backends.base import DecodeItem, GrammarError
from tanglebox.prompting import ModelChatFormat

SPECIALS = {"<|end|>": 256, "<|user|>": 257, "<|assistant|>": 258, "<|system|>": 259}
END, USER, ASSISTANT = SPECIALS["<|end|>"], SPECIALS["<|user|>"], SPECIALS["<|assistant|>"]
VOCAB = 260
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
LETTER_LOGIT = 10.0  # ``letters N``: every lowercase letter has this logit, the rest 0


class FakeConstraint:
    """The fake grammar: a set of allowed bytes; records how it was used."""

    def __init__(self, allowed: bytes) -> None:
        self.allowed = set(allowed) | {END}
        self.accepted: list[int] = []
        self.restricted = 0  # how often the whole vocabulary was masked
        self.closed = False

    def allows(self, token: int) -> bool:
        return token in self.allowed

    def restrict(self, logits: np.ndarray) -> np.ndarray:
        self.restricted += 1
        masked = np.full_like(logits, -np.inf)
        ids = [token for token in self.allowed if token < logits.shape[-1]]
        masked[ids] = logits[ids]
        return masked

    def accept(self, token: int) -> None:
        assert token in self.allowed, "accepted a token the grammar refuses"
        self.accepted.append(token)

    def close(self) -> None:
        self.closed = True


def fake_reply(user_text: str) -> str:
    if user_text.startswith("echo "):
        return user_text[5:]
    match = re.fullmatch(r"count (\d+)", user_text.strip())
    if match:
        return " ".join(str(i) for i in range(1, int(match.group(1)) + 1))
    return f"You said: {user_text}"


class FakeBackend:
    name = "fake"
    device = "cpu"

    def __init__(self, max_sequences: int = 2, context_length: int = 4096,
                 batch_tokens: int = 64, step_delay: float = 0.0,
                 model_name: str = "fake-model", replies: dict[str, str] | None = None,
                 crash_on_decode: bool = False, tokenize_delay: float = 0.0,
                 supports_grammar: bool = False, verifies_drafts: bool = False) -> None:
        self.model_name = model_name
        self.verifies_drafts = verifies_drafts
        self.supports_grammar = supports_grammar
        self.constraints: list[FakeConstraint] = []  # every grammar made, in order
        self.replies = replies or {}  # canned replies by user text, before fake_reply's rules
        self.max_sequences = max_sequences
        self.context_length = context_length
        self.batch_tokens = batch_tokens
        self.step_delay = step_delay  # seconds per decode call, so tests can act mid-reply
        self.crash_on_decode = crash_on_decode  # a real native crash, as a broken build makes
        # seconds per tokenize call, as llama.cpp's tokenizer takes on a long prompt
        self.tokenize_delay = tokenize_delay
        self.calls: list[str] = []  # "tokenize" and "decode", in the order the engine made them
        self.chat_format = ModelChatFormat(CHAT_TEMPLATE, "", "<|end|>")
        self.sequences: list[list[int]] = [[] for _ in range(max_sequences)]
        self.decode_calls: list[list[DecodeItem]] = []
        self.closed = False

    def tokenize(self, text: str) -> list[int]:
        self.calls.append("tokenize")
        if self.tokenize_delay:
            time.sleep(self.tokenize_delay)
        tokens: list[int] = []
        for part in _SPECIAL_PATTERN.split(text):
            tokens.extend([SPECIALS[part]] if part in SPECIALS else part.encode("utf-8"))
        return tokens

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def is_end_of_turn(self, token: int) -> bool:
        return token == END

    def decode(self, items: list[DecodeItem]) -> list[np.ndarray | None]:
        self.decode_calls.append(items)
        self.calls.append("decode")
        if self.crash_on_decode:
            ctypes.string_at(0)  # reads address 0: SIGSEGV, no Python exception
        if self.step_delay:
            time.sleep(self.step_delay)
        results: list[np.ndarray | None] = []
        for item in items:
            sequence = self.sequences[item.slot]
            assert len(sequence) == item.position, "decode at a position the cache does not hold"
            sequence.extend(item.tokens)
            if not item.want_logits:
                results.append(None)
            elif item.logits_count == 1:
                results.append(self._logits(sequence))
            else:
                assert self.verifies_drafts, "logits at several positions from a plain backend"
                ends = range(len(sequence) - item.logits_count + 1, len(sequence) + 1)
                results.append(np.stack([self._logits(sequence[:end]) for end in ends]))
        return results

    def forget(self, slot: int, keep: int) -> None:
        del self.sequences[slot][keep:]

    def grammar(self, gbnf: str) -> FakeConstraint:
        assert self.supports_grammar, "the engine asked a backend without grammars for one"
        if not gbnf.startswith("root ::= "):
            raise GrammarError("The fake grammar must read 'root ::= CHARS'.")
        self.constraints.append(FakeConstraint(gbnf[len("root ::= "):].encode("utf-8")))
        return self.constraints[-1]

    def close(self) -> None:
        self.closed = True

    def _logits(self, sequence: list[int]) -> np.ndarray:
        logits = np.zeros(VOCAB, dtype=np.float32)
        if ASSISTANT not in sequence or USER not in sequence[:sequence.index(ASSISTANT)]:
            logits[END] = 30.0  # a raw prompt without the turn markers: nothing to answer
            return logits
        start = len(sequence) - 1 - sequence[::-1].index(ASSISTANT)
        user_start = start - 1 - sequence[start - 1::-1].index(USER)
        user_text = bytes(t for t in sequence[user_start + 1:start] if t < 256).decode()
        generated = sequence[start + 1:]
        letters = re.fullmatch(r"letters (\d+)", user_text)
        if letters:
            if len(generated) < int(letters.group(1)):
                logits[ord("a"):ord("z") + 1] = LETTER_LOGIT
            else:
                logits[END] = 30.0
            return logits
        reply = self.replies.get(user_text) or fake_reply(user_text)
        target = list(reply.encode("utf-8")) + [END]
        next_token = target[len(generated)] if len(generated) < len(target) else END
        logits[next_token] = 30.0
        return logits
