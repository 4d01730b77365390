"""The common request every adapter builds, and the validation rules, written once.

REST, the original websocket, the UI socket and any later adapter parse their wire format
with these functions, so a temperature of ``NaN`` or a history with a role of ``"Bot"`` gets
the same answer everywhere: a :class:`RequestError` naming the parameter and what to change.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from tanglebox.client_json import RequestError, decode_json, shown
from tanglebox.prompting import ASSISTANT, USER, Message

HISTORY_ROLES = {"Human": USER, "AI": ASSISTANT}
HISTORY_EXAMPLE = 'an array of [role, message] pairs, e.g. [["Human","hi"],["AI","hello"]]'
TEMPERATURE_RANGE = (0.0, 2.0)
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties (OpenAI's range)
LOGIT_BIAS_RANGE = (-100, 100)
MAX_LOGIT_BIAS = 300  # tokens in one logit_bias (OpenAI's limit)
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MAX_TOP_K = 1000
# A number written as text (a query string, a form, a socket message): plain decimal only.
# int() and float() also take "1_0", "1e2", " ١٠ ", "inf" and "nan"; none of them is meant.
DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


@dataclass(frozen=True)
class SamplingOptions:
    """How tokens are chosen beyond the temperature; the defaults are every surface's."""

    top_p: float = 0.95  # nucleus: the smallest set of tokens whose probability reaches it
    top_k: int = 40
    seed: int | None = None  # None: the engine's seed sequence (the ``seed`` setting) or random
    presence_penalty: float = 0.0  # OpenAI's rule, over the tokens of this reply
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    top_logprobs: int | None = None  # None: no log probabilities; n: each token's and the n best
    grammar: str | None = None  # GBNF: the reply is constrained to it (llama.cpp backend)


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[Message, ...]  # the history, then the user's new message
    system_prompt: str  # empty: the server's default
    temperature: float
    max_new_tokens: int
    client_id: str = ""  # fairness: one client's many requests wait behind each other
    stop: tuple[str, ...] = ()  # extra stop strings, beside the template's
    sampling: SamplingOptions = SamplingOptions()
    prompt_text: str | None = None  # a raw prompt (OpenAI completions): no template, no messages
    model: str | None = None  # a served model's id (tanglebox.served_models); None: the default


@dataclass(frozen=True)
class Limits:
    temperature: float  # defaults, from settings
    max_new_tokens: int
    max_new_tokens_limit: int


def parse_user_prompt(value: Any, param: str = "userPrompt") -> str:
    if value is None:
        raise RequestError(param, "is required: send the message for the model")
    if not isinstance(value, str):
        raise RequestError(param, "must be a string")
    if not value.strip():
        raise RequestError(param, "must not be empty")
    return value


def parse_system_prompt(value: Any, param: str = "systemPrompt") -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(param, "must be a string")
    return value


def parse_temperature(value: Any, param: str = "temperature", allow_text: bool = True) -> float:
    low, high = TEMPERATURE_RANGE
    number = _number(value, param, f"a number from {low:g} to {high:g}", allow_text)
    # math.isfinite() cannot take an int too large for a float (10**400): ints are finite.
    if not (isinstance(number, int) or math.isfinite(number)) or not low <= number <= high:
        raise RequestError(param, f"must be a number from {low:g} to {high:g}, got {shown(value)}")
    return float(number)


def parse_max_new_tokens(value: Any, limit: int, param: str = "maxNewTokens",
                         allow_text: bool = True) -> int:
    expected = f"a whole number from 1 to {limit}"
    number = _number(value, param, expected, allow_text)
    if isinstance(number, float):
        if not number.is_integer():
            raise RequestError(param, f"must be {expected}, got {shown(value)}")
        number = int(number)
    if not 1 <= number <= limit:
        raise RequestError(param, f"must be {expected}, got {shown(value)}")
    return number


def parse_top_p(value: Any, param: str = "top_p") -> float:
    number = _number(value, param, "a number from 0 to 1", allow_text=False)
    if not (isinstance(number, int) or math.isfinite(number)) or not 0 <= number <= 1:
        raise RequestError(param, f"must be a number from 0 to 1, got {shown(value)}")
    return float(number)


def parse_top_k(value: Any, param: str = "top_k") -> int:
    """0 turns top-k off (every token stays a candidate)."""
    number = _number(value, param, f"a whole number from 0 to {MAX_TOP_K}", allow_text=False)
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if not isinstance(number, int) or not 0 <= number <= MAX_TOP_K:
        raise RequestError(param, f"must be a whole number from 0 to {MAX_TOP_K}, "
                                  f"got {shown(value)}")
    return number


def parse_seed(value: Any, param: str = "seed") -> int:
    """Any whole number: the same seed, prompt and parameters give the same reply."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(param, f"must be a whole number, got {shown(value)}")
    return value & (2 ** 64 - 1)


def parse_penalty(value: Any, param: str) -> float:
    low, high = PENALTY_RANGE
    number = _number(value, param, f"a number from {low:g} to {high:g}", allow_text=False)
    if not (isinstance(number, int) or math.isfinite(number)) or not low <= number <= high:
        raise RequestError(param, f"must be a number from {low:g} to {high:g}, got {shown(value)}")
    return float(number)


def parse_stop(value: Any, param: str = "stop") -> tuple[str, ...]:
    """A string or a list of up to ``MAX_STOP_STRINGS`` strings that end the reply."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise RequestError(param, "must be a string or an array of strings")
    if len(items) > MAX_STOP_STRINGS:
        raise RequestError(param, f"may hold at most {MAX_STOP_STRINGS} strings, got {len(items)}")
    if any(not item for item in items):
        raise RequestError(param, "must not contain an empty string")
    return tuple(items)


def parse_logit_bias(value: Any, vocabulary_size: int,
                     param: str = "logit_bias") -> tuple[tuple[int, float], ...]:
    """``{"token id": bias}``, each bias from -100 (never) to 100 (always), added to the logit."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise RequestError(param, 'must be an object of token ids and biases, e.g. {"50256": -100}')
    if len(value) > MAX_LOGIT_BIAS:
        raise RequestError(param, f"may hold at most {MAX_LOGIT_BIAS} tokens, got {len(value)}")
    biases = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()
                and int(key) < vocabulary_size):
            raise RequestError(param, f"keys must be token ids from 0 to {vocabulary_size - 1}, "
                                      f"got {shown(key)}")
        low, high = LOGIT_BIAS_RANGE
        number = _number(bias, f"{param}.{key}", f"a number from {low} to {high}",
                         allow_text=False)
        if not (isinstance(number, int) or math.isfinite(number)) or not low <= number <= high:
            raise RequestError(f"{param}.{key}", f"must be a number from {low} to {high}, "
                                                 f"got {shown(bias)}")
        biases.append((int(key), float(number)))
    return tuple(biases)


def parse_top_logprobs(value: Any, limit: int = MAX_TOP_LOGPROBS,
                       param: str = "top_logprobs") -> int:
    number = _number(value, param, f"a whole number from 0 to {limit}", allow_text=False)
    if not isinstance(number, int) or not 0 <= number <= limit:
        raise RequestError(param, f"must be a whole number from 0 to {limit}, got {shown(value)}")
    return number


def parse_bool(value: Any, param: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise RequestError(param, f"must be true or false, got {shown(value)}")


def parse_history(value: Any, param: str = "conversationHistory") -> list[Message]:
    """``[["Human", "hi"], ["AI", "hello"]]``, as a list or a JSON string of one."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = decode_json(value, param, HISTORY_EXAMPLE)
    if not isinstance(value, list):
        raise RequestError(param, "must be an array of [role, message] pairs")
    messages = []
    for index, item in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(item, list) or len(item) != 2:
            raise RequestError(where, "must be a [role, message] pair")
        role, text = item
        if not isinstance(role, str) or role not in HISTORY_ROLES:
            raise RequestError(where, f'role must be "Human" or "AI", got {json.dumps(role)}')
        if not isinstance(text, str):
            raise RequestError(where, "message must be a string")
        messages.append(Message(HISTORY_ROLES[role], text))
    return messages


def build_chat_request(params: Mapping[str, Any], limits: Limits, client_id: str = "",
                       from_json: bool = False) -> ChatRequest:
    """A ChatRequest from the original REST parameter names (also used by the UI socket).

    ``from_json``: the values come from a JSON document, where numbers must be numbers
    (``"10"`` is refused); query strings and forms have only text, so text is parsed there.
    """
    history = parse_history(params.get("conversationHistory"))
    user = Message(USER, parse_user_prompt(params.get("userPrompt")))
    temperature = params.get("temperature")
    max_new_tokens = params.get("maxNewTokens")
    return ChatRequest(
        messages=(*history, user),
        system_prompt=parse_system_prompt(params.get("systemPrompt")),
        temperature=(limits.temperature if _absent(temperature)
                     else parse_temperature(temperature, allow_text=not from_json)),
        max_new_tokens=(limits.max_new_tokens if _absent(max_new_tokens)
                        else parse_max_new_tokens(max_new_tokens, limits.max_new_tokens_limit,
                                                  allow_text=not from_json)),
        client_id=client_id,
    )


def _absent(value: Any) -> bool:
    return value is None or value == ""


def _number(value: Any, param: str, expected: str, allow_text: bool) -> int | float:
    # JSON true is an int in Python, and "10" in a JSON body is a string: both are wrong types.
    # Text is parsed only where the wire format has no numbers (queries, forms, socket text).
    if isinstance(value, bool):
        raise RequestError(param, f"must be {expected}, got {json.dumps(value)}")
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and allow_text:
        text = value.strip()
        if DECIMAL.fullmatch(text):
            try:
                return float(text) if "." in text else int(text)
            except ValueError:  # more digits than int() converts (4300)
                pass
    raise RequestError(param, f"must be {expected}, got {shown(value)}")
