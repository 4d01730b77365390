"""OpenAI request bodies → the common :class:`ChatRequest`, with OpenAI's names for parameters.

``/v1/chat/completions`` and ``/v1/completions`` are parsed here into the request every other
surface builds; each value goes through the same rule as elsewhere (``chat_request.py``), so a
bad one is a :class:`RequestError` naming the OpenAI parameter (``temperature``,
``messages[2].content``). The shapes are OpenAI's: ``messages`` of ``system`` / ``developer`` /
``user`` / ``assistant`` turns with text (a string or text parts), ``stop`` as a string or a
list, ``response_format`` as JSON mode or a JSON schema (turned into a grammar here, so a schema
llama.cpp's converter cannot take is a 400 before anything is queued).

Fields OpenAI defines that change what a reply is but that this server cannot honour (``n`` > 1,
a required tool call, image or audio parts, ``echo``, ``suffix``, ``best_of``) are refused with a 400 that
says so; other fields a client sends are ignored, as OpenAI-compatible servers do (``user``,
``store``, ``metadata``, vendor extensions). ``top_k`` is accepted as an extension, as
llama-server and vLLM do.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping

from tanglebox.chat_request import (ChatRequest, Limits, SamplingOptions, parse_bool,
                                    parse_logit_bias, parse_max_new_tokens, parse_penalty,
                                    parse_seed, parse_stop, parse_temperature, parse_top_k,
                                    parse_top_logprobs, parse_top_p)
from tanglebox.client_json import RequestError, shown
from tanglebox.prompting import ASSISTANT, SYSTEM, USER, Message

ROLES = {"system": SYSTEM, "developer": SYSTEM, "user": USER, "assistant": ASSISTANT}
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request
LEGACY_MAX_LOGPROBS = 5  # /v1/completions' ``logprobs`` (OpenAI's limit)
# A JSON schema becomes a grammar; these bound what a hostile schema can make of it.
MAX_SCHEMA_REPEAT = 256  # minItems, maxItems, minLength, maxLength...
MAX_PATTERN_REPEAT = 16  # a {n,m} count inside a ``pattern``
MAX_PATTERN_QUANTIFIERS = 3
MAX_SCHEMA_DEPTH = 32
MAX_GRAMMAR_CHARS = 512 * 1024
REPEAT_KEYS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties",
               "maxProperties")
PATTERN_COUNT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


@dataclass(frozen=True)
class Capabilities:
    """What the served model can do, for the checks that depend on it."""

    grammar: bool  # grammar-constrained sampling (response_format JSON)
    vocabulary_size: int  # token ids in logit_bias must be below it
    backend: str  # named in the error when a feature needs another backend
    logprobs: bool = True  # log probabilities of the tokens (not from a remote model)


@dataclass(frozen=True)
class OpenAIRequest:
    chat: ChatRequest
    model: str | None  # as the client named it; None: the default model
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the usage
    logprobs: bool


def parse_chat_completion(body: Mapping[str, Any], limits: Limits, can: Capabilities,
                          client_id: str = "") -> OpenAIRequest:
    system_prompt, messages = parse_messages(body.get("messages"))
    _refuse_tools(body)
    _refuse_modalities(body.get("modalities"))
    logprobs = _optional(body, "logprobs", parse_bool, False)
    top_logprobs = _optional(body, "top_logprobs", parse_top_logprobs, None)
    if top_logprobs is not None and not logprobs:
        raise RequestError("top_logprobs", "needs logprobs: true")
    max_tokens = body.get("max_completion_tokens")
    param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    chat = _sampled_request(body, limits, can, client_id, max_tokens, param,
                            top_logprobs=(top_logprobs or 0) if logprobs else None)
    chat = replace(chat, messages=messages, system_prompt=system_prompt,
                   sampling=replace(chat.sampling, grammar=parse_response_format(
                       body.get("response_format"), can)))
    return _openai_request(body, chat, logprobs)


def parse_completion(body: Mapping[str, Any], limits: Limits, can: Capabilities,
                     client_id: str = "") -> OpenAIRequest:
    prompt = parse_prompt(body.get("prompt"))
    best_of = body.get("best_of")
    for param, unsupported in (
            ("echo", body.get("echo") not in (None, False)),
            ("suffix", body.get("suffix") not in (None, "")),
            ("best_of", best_of is not None and (best_of != 1 or isinstance(best_of, bool)))):
        if unsupported:
            raise RequestError(param, f"is not supported by this server, got "
                                      f"{shown(body.get(param))}")
    top_logprobs = _optional(body, "logprobs",
                             lambda v, param: parse_top_logprobs(v, LEGACY_MAX_LOGPROBS, param), None)
    chat = _sampled_request(body, limits, can, client_id, body.get("max_tokens"),
                            "max_tokens", top_logprobs=top_logprobs)
    return _openai_request(body, replace(chat, prompt_text=prompt), top_logprobs is not None)


def parse_messages(value: Any) -> tuple[str, tuple[Message, ...]]:
    """The system prompt (every system and developer turn, joined) and the conversation."""
    if not isinstance(value, list) or not value:
        raise RequestError("messages", 'is required: an array of messages such as '
                                       '[{"role": "user", "content": "Hello"}]')
    system, messages = [], []
    for index, item in enumerate(value):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise RequestError(where, 'must be an object such as {"role": "user", '
                                      '"content": "Hello"}')
        role = item.get("role")
        if role in ("tool", "function") or item.get("tool_calls") or item.get("function_call"):
            raise RequestError(f"{where}.role", "tool calls are not supported by this server")
        if not isinstance(role, str) or role not in ROLES:
            raise RequestError(f"{where}.role", "must be one of system, developer, user, "
                                                f"assistant, got {shown(role)}")
        text = parse_content(item.get("content"), f"{where}.content")
        if ROLES[role] == SYSTEM:
            system.append(text)
        else:
            messages.append(Message(ROLES[role], text))
    if not messages or messages[-1].role != USER:
        raise RequestError("messages", "must end with a user message: the model answers it")
    return "\n\n".join(system), tuple(messages)


def parse_content(value: Any, param: str) -> str:
    """A string, or an array of text parts (joined by newlines); other parts are refused."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RequestError(param, "must be a string or an array of text parts")
    texts = []
    for index, part in enumerate(value):
        where = f"{param}[{index}]"
        if not isinstance(part, dict):
            raise RequestError(where, 'must be a part such as {"type": "text", "text": "Hello"}')
        if part.get("type") != "text":
            raise RequestError(f"{where}.type", "only text parts are supported: this server's "
                                                f"model reads text, got {shown(part.get('type'))}")
        if not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.text", "must be a string")
        texts.append(part["text"])
    return "\n".join(texts)


def parse_prompt(value: Any) -> str:
    """``/v1/completions``' prompt: a string, or an array of one string."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, list):
        raise RequestError("prompt", "send one prompt per request (a string, or an array of "
                                     "one string); token arrays are not supported")
    if not isinstance(value, str):
        raise RequestError("prompt", "is required: a string")
    if not value:
        raise RequestError("prompt", "must not be empty")
    return value


def parse_embedding_input(value: Any) -> list[str]:
    """``/v1/embeddings``' input: a string or an array of strings, none empty."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise RequestError("input", "is required: a string or an array of strings")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise RequestError("input", f"may hold at most {MAX_EMBEDDING_INPUTS} strings, "
                                    f"got {len(items)}")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise RequestError(f"input[{index}]", "must be a string (token arrays are not "
                                                  "supported)")
        if not item:
            raise RequestError(f"input[{index}]", "must not be empty")
    return items


def parse_encoding_format(value: Any) -> str:
    if value is None:
        return "float"
    if value not in ("float", "base64"):
        raise RequestError("encoding_format", f'must be "float" or "base64", got {shown(value)}')
    return value


def parse_model(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise RequestError("model", f"must be a model id from /v1/models, got {shown(value)}")
    return value


def parse_response_format(value: Any, can: Capabilities) -> str | None:
    """The GBNF grammar a reply must follow, or None for free text."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise RequestError("response_format", 'must be an object such as {"type": "json_object"}')
    kind = value.get("type")
    if kind == "text":
        return None
    if kind not in ("json_object", "json_schema"):
        raise RequestError("response_format.type", 'must be "text", "json_object" or '
                                                   f'"json_schema", got {shown(kind)}')
    if not can.grammar:
        raise RequestError("response_format", "JSON output needs grammar-constrained sampling, "
                                              "which the llama.cpp backend has; this server "
                                              f"runs {can.backend}")
    from llama_cpp.llama_grammar import JSON_GBNF  # the llama.cpp backend is installed
    if kind == "json_object":
        return JSON_GBNF
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise RequestError("response_format.json_schema",
                           'is required: {"name": "...", "schema": {...}}')
    schema = spec.get("schema")
    if schema is None:
        return JSON_GBNF
    return schema_grammar(schema)


def schema_grammar(schema: Any) -> str:
    """A JSON schema as a GBNF grammar (llama.cpp's converter), or a 400 saying why not."""
    param = "response_format.json_schema.schema"
    if not isinstance(schema, dict):
        raise RequestError(param, "must be a JSON schema object")
    _check_schema(schema, param, 0)
    from llama_cpp.llama_grammar import json_schema_to_gbnf
    try:
        grammar = json_schema_to_gbnf(json.dumps(schema))
    except RecursionError:
        raise RequestError(param, "is nested too deeply") from None
    except Exception as err:  # noqa: BLE001 - the converter's own complaint, passed on
        raise RequestError(param, f"cannot be turned into a grammar: {shown(str(err))}") from None
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise RequestError(param, "makes a grammar too large; use fewer or smaller "
                                  "repetition limits")
    return grammar


def _check_schema(node: Any, param: str, depth: int) -> None:
    """Refuse what would make the converter fetch (remote $ref) or blow up (huge counts)."""
    if depth > MAX_SCHEMA_DEPTH:
        raise RequestError(param, f"is nested more than {MAX_SCHEMA_DEPTH} levels deep")
    if isinstance(node, list):
        for item in node:
            _check_schema(item, param, depth + 1)
        return
    if not isinstance(node, dict):
        return
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise RequestError(param, f"$ref must point inside the schema (\"#/...\"), got "
                                  f"{shown(ref)}")
    for key in REPEAT_KEYS:
        count = node.get(key)
        if count is not None and not (isinstance(count, int) and not isinstance(count, bool)
                                      and 0 <= count <= MAX_SCHEMA_REPEAT):
            raise RequestError(param, f"{key} must be a whole number from 0 to "
                                      f"{MAX_SCHEMA_REPEAT}, got {shown(count)}")
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        counts = PATTERN_COUNT.findall(pattern)
        if len(counts) > MAX_PATTERN_QUANTIFIERS or any(
                int(n) > MAX_PATTERN_REPEAT for pair in counts for n in pair if n):
            raise RequestError(param, f"pattern may use at most {MAX_PATTERN_QUANTIFIERS} "
                                      f"{{n,m}} counts of at most {MAX_PATTERN_REPEAT}")
    for value in node.values():
        _check_schema(value, param, depth + 1)


def _sampled_request(body: Mapping[str, Any], limits: Limits, can: Capabilities,
                     client_id: str, max_tokens: Any, max_tokens_param: str,
                     top_logprobs: int | None) -> ChatRequest:
    """The parameters chat completions and completions share."""
    n = body.get("n")
    if n is not None and n != 1 or isinstance(n, bool):
        raise RequestError("n", f"only 1 is supported (one reply per request), got {shown(n)}")
    if top_logprobs is not None and not can.logprobs:
        raise RequestError("logprobs", f"log probabilities are not available from {can.backend}")
    defaults = SamplingOptions()
    sampling = SamplingOptions(
        top_p=_optional(body, "top_p", parse_top_p, defaults.top_p),
        top_k=_optional(body, "top_k", parse_top_k, defaults.top_k),
        seed=_optional(body, "seed", parse_seed, None),
        presence_penalty=_optional(body, "presence_penalty", parse_penalty, 0.0),
        frequency_penalty=_optional(body, "frequency_penalty", parse_penalty, 0.0),
        logit_bias=parse_logit_bias(body.get("logit_bias"), can.vocabulary_size),
        top_logprobs=top_logprobs)
    temperature = body.get("temperature")
    return ChatRequest(
        messages=(), system_prompt="",
        temperature=(limits.temperature if temperature is None
                     else parse_temperature(temperature, allow_text=False)),
        max_new_tokens=(limits.max_new_tokens if max_tokens is None
                        else parse_max_new_tokens(max_tokens, limits.max_new_tokens_limit,
                                                  max_tokens_param, allow_text=False)),
        client_id=client_id, stop=parse_stop(body.get("stop")), sampling=sampling)


def _openai_request(body: Mapping[str, Any], chat: ChatRequest,
                    logprobs: bool) -> OpenAIRequest:
    stream = _optional(body, "stream", parse_bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("stream_options", 'must be an object such as {"include_usage": true}')
    include_usage = _optional(options or {}, "include_usage",
                              lambda v, param: parse_bool(v, f"stream_options.{param}"), False)
    return OpenAIRequest(chat=chat, model=parse_model(body.get("model")), stream=stream,
                         include_usage=stream and include_usage, logprobs=logprobs)


def _refuse_tools(body: Mapping[str, Any]) -> None:
    """``tools`` are read as offered, never required: under ``tool_choice`` "auto" (the
    default) or "none" a reply in text is a valid answer, which is what the model gives (Open
    WebUI sends its built-in tools with every message). A call the client requires is refused."""
    choice = body.get("tool_choice")
    if choice not in (None, "none", "auto"):
        raise RequestError("tool_choice", "tool calls are not supported by this server; "
                                          'leave tool_choice out or send "auto" or "none"')
    if body.get("function_call") not in (None, "none", "auto"):
        raise RequestError("function_call", "tool calls are not supported by this server")


def _refuse_modalities(value: Any) -> None:
    if value is not None and value != ["text"]:
        raise RequestError("modalities", f'only ["text"] is supported, got {shown(value)}')


def _optional(body: Mapping[str, Any], param: str, parse: Any, default: Any) -> Any:
    value = body.get(param)
    return default if value is None else parse(value, param=param)
