"""The tokenizer's view of the model: its chat format, the tokens that end a turn, whether it
starts a text with BOS, and the bytes each token stands for. No torch here."""

from __future__ import annotations

import json
import re
from typing import Any

from tanglebox.prompting import ModelChatFormat

# Tokens that end an assistant turn in common chat formats (ChatML, Llama 3, Phi-3, Gemma),
# besides the model's own eos token ids; each counts only where the vocabulary has it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>",
                      "<end_of_turn>")


def chat_format_of(tokenizer: Any) -> ModelChatFormat:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one renders conversations
        template = template.get("default") or next(iter(template.values()), None)
    return ModelChatFormat(template or None, tokenizer.bos_token or "",
                           tokenizer.eos_token or "")


def end_of_turn_ids(model: Any, tokenizer: Any) -> set[int]:
    """The eos token id(s) of the generation config, model config and tokenizer, plus the
    common end-of-turn tokens that the vocabulary has."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return ids


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text (the model was trained so)."""
    bos = tokenizer.bos_token_id
    return (bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]
            and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos])


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character standing for each byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """The bytes each token stands for, computed once per token.

    Byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM) writes each byte as a printable character;
    SentencePiece (Llama 2, Mistral) writes a space as ``▁`` and falls back to ``<0xNN>`` byte
    tokens. Either way a token may hold part of a UTF-8 character, which ``tokenizer.decode``
    would turn into U+FFFD; the engine's incremental decoder needs the real bytes. Special
    tokens (end of turn, role markers) stand for no text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._style = _decoder_style(tokenizer)
        self._added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self._size = len(tokenizer)
        self._cache: dict[int, bytes] = {}

    def __getitem__(self, token: int) -> bytes:
        data = self._cache.get(token)
        if data is None:
            data = self._cache[token] = self._compute(token)
        return data

    def _compute(self, token: int) -> bytes:
        if not 0 <= token < self._size:
            return b""
        added = self._added.get(token)
        if added is not None:
            return b"" if added.special else added.content.encode("utf-8")
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        if self._style == "byte_level" and all(c in _BYTE_LEVEL for c in piece):
            return bytes(_BYTE_LEVEL[c] for c in piece)
        if self._style == "sentencepiece":
            match = _BYTE_PIECE.fullmatch(piece)
            return bytes([int(match.group(1), 16)]) if match else piece.replace("▁", " ").encode()
        return self._tokenizer.decode([token]).encode("utf-8")


def _decoder_style(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "other"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    parts = decoder.get("decoders") or [decoder]
    kinds = {part.get("type") for part in parts}
    if "ByteLevel" in kinds:
        return "byte_level"
    if kinds & {"ByteFallback", "Metaspace"} or any(
            part.get("type") == "Replace" and "▁" in json.dumps(part.get("pattern"))
            for part in parts):
        return "sentencepiece"
    return "other"
