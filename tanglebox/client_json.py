"""JSON from clients, decoded one way everywhere: a REST body, a ``conversationHistory`` sent
as a JSON string, a chat UI socket message.

:func:`decode_json` returns the value or raises :class:`RequestError` (a 400, or an error on
the socket) naming what was wrong, so nothing a client sends reaches the rest of the server as
something Python's ``json`` accepts but the server cannot use:

- bytes that are not UTF-8, and text that is not JSON;
- nesting deeper than ``MAX_DEPTH`` (``json`` itself would raise RecursionError at about a
  thousand levels, and every later walk over the value would be recursive too);
- a string (value or key) holding a lone UTF-16 surrogate, which JSON's ``"\\ud800"`` escape
  can spell but UTF-8 cannot: it would fail later, when the prompt is tokenized, hashed or
  sent back, as a 500 or a broken socket.

The check after parsing walks the value with a stack (never recursively), and names the item
the way the error messages of :mod:`tanglebox.chat_request` do: ``conversationHistory[1][0]``.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # a chat request is 3 levels deep; a UI socket message 2


class RequestError(ValueError):
    """Bad input from a client: ``param`` names the culprit, the message says what to change."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


SHOWN_CHARACTERS = 80  # of a bad value, where an error quotes it


def shown(value: Any) -> str:
    """A bad value as an error quotes it: its repr, cut short (a megabyte sent where a number
    belongs is not sent back whole)."""
    text = repr(value)
    if len(text) <= SHOWN_CHARACTERS:
        return text
    return f"{text[:SHOWN_CHARACTERS]}… ({len(text)} characters)"


def decode_json(data: str | bytes, param: str, example: str, of_params: bool = False) -> Any:
    """The JSON value in ``data``; RequestError naming ``param`` (or an item inside it).

    ``of_params``: ``data`` is an object of parameters (a REST body, a socket message), so its
    keys are named alone (``userPrompt``), not as ``body.userPrompt``.
    """
    try:
        value = json.loads(data)
    except json.JSONDecodeError as err:
        raise RequestError(param, f"not valid JSON ({err.msg} at line {err.lineno}, column "
                                  f"{err.colno}); send {example}") from None
    except RecursionError:
        raise RequestError(param, f"nested too deeply (at most {MAX_DEPTH} levels); "
                                  f"send {example}") from None
    except ValueError:  # not UTF-8, or an integer of more digits than Python converts
        raise RequestError(param, f"not valid JSON; send UTF-8 text with {example}") from None
    check_decoded(value, param, of_params)
    return value


def check_decoded(value: Any, param: str, of_params: bool = False) -> None:
    """RequestError for nesting deeper than MAX_DEPTH or a string that is not valid Unicode."""
    stack: list[tuple[Any, str, int]] = [(value, param, 1)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, (list, dict)):
            if depth > MAX_DEPTH:
                raise RequestError(where, f"nested too deeply (at most {MAX_DEPTH} levels)")
            if isinstance(item, list):
                stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item))
            else:
                for key, v in item.items():
                    _check_text(key, where)
                    name = key if of_params and depth == 1 else f"{where}.{key}"
                    stack.append((v, name, depth + 1))


def _check_text(text: str, where: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(where, f"holds a lone UTF-16 surrogate "
                                  f"({text[err.start]!r} at character {err.start}), which is "
                                  "not text; send valid Unicode") from None
