"""Admission: a request's way into the engine, from the byte check to a running sequence.

Two checks, two places. Before the queue, on the adapter's side: ``too_long_in_bytes``.
On the engine's thread, for a request taken from the queue: ``start_sequence`` renders the
prompt (a raw ``prompt_text`` as it is), tokenizes it, checks its length in tokens, makes its
Sampler and readies a slot (``tanglebox.slots``); it returns the running ``Sequence``, or the
event that ends the request instead.

Admission is bounded so that preparing prompts never holds up running replies: tokenizing
is work on the engine's thread (llama.cpp's tokenizer takes about a second for 1 MB), and a
few clients posting huge prompts, each refused as too long, once kept the thread tokenizing
with every reply waiting (issue 14: 21 s without a token). So the cheap check comes first, on
the adapter's side: a prompt of more than ``MAX_BYTES_PER_TOKEN`` bytes per context token
cannot fit whatever the tokenizer does, and is refused without tokenizing. What passes is at
most that many bytes, and while any reply runs the engine prepares one prompt, then steps, so
the running replies get a token between any two prompts. (Tokenizing stays on the engine's
thread: the backends' tokenizers are not documented safe beside a decode on another thread.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from tanglebox.backends.base import Backend, GrammarError
from tanglebox.chat_request import ChatRequest
from tanglebox.generation import Done, Error, ErrorCode, FinishReason, Generation
from tanglebox.lookup_decoding import LookupState
from tanglebox.prompting import Prompt, TemplateError
from tanglebox.reply_text import ReplyText
from tanglebox.sampling import Sampler
from tanglebox.slots import Slot, prepare_slot

log = logging.getLogger("tanglebox.engine")  # the engine's log, as before this module

# More prompt bytes per context token than any tokenizer packs into a token of text (the
# longest tokens of common vocabularies are runs of spaces or dashes of a few dozen bytes), so a
# prompt past ``context * MAX_BYTES_PER_TOKEN`` bytes is too long before it is tokenized.
MAX_BYTES_PER_TOKEN = 64

PREPARING_FAILED = Error(ErrorCode.INTERNAL, "The server could not prepare the prompt.")


@dataclass
class Sequence:
    """A reply running in a slot: what the engine's step reads and writes for it."""

    generation: Generation
    slot: Slot
    prompt_tokens: int
    cached_tokens: int
    to_prefill: list[int]
    reply: ReplyText
    sampler: Sampler
    admitted_at: float
    next_token: int | None = None
    completion_tokens: int = 0
    first_token_at: float | None = None
    lookup: LookupState = field(default_factory=LookupState)


def too_long_in_bytes(request: ChatRequest, default_system_prompt: str,
                      context: int) -> Error | None:
    """``prompt_too_long`` for a prompt that cannot fit ``context`` tokens by its bytes alone."""
    texts = [request.prompt_text] if request.prompt_text is not None else [
        request.system_prompt or default_system_prompt,
        *(m.content for m in request.messages)]
    size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts)
    if size <= context * MAX_BYTES_PER_TOKEN:
        return None
    return Error(ErrorCode.PROMPT_TOO_LONG,
                 f"The prompt is {size} bytes, far more than the model's context of "
                 f"{context} tokens holds (prompt and reply together). Shorten the prompt "
                 "or the conversation history.")


def start_sequence(generation: Generation, free: list[Slot], *, slots: list[Slot],
                   backend: Backend, render: Callable[[ChatRequest], Prompt],
                   seeds: Iterator[int], request_timeout: float, log_prompts: bool,
                   restore_prefix: Callable[[int, list[int], int], list[int] | None] | None
                   ) -> Sequence | Error | Done:
    """The request taken into one of the ``free`` slots, or the event that ends it unslotted.

    The slot of the returned sequence is ready (its cache holds the sequence's
    ``cached_tokens``); marking it busy is the engine's.
    """
    request = generation.request
    try:
        prompt = render(request)
        tokens = backend.tokenize(prompt.text)
    except TemplateError as err:
        return Error(ErrorCode.TEMPLATE, str(err))
    except Exception:  # noqa: BLE001 - one bad prompt must not stop the engine
        log.exception("preparing a prompt failed")
        return PREPARING_FAILED
    if generation.cancelled:  # the client left while its prompt was being prepared
        return Done(FinishReason.CANCELLED, "", 0, 0, 0, {})
    if time.monotonic() - generation.submitted_at > request_timeout:
        return Done(FinishReason.TIMEOUT, "", 0, 0, 0, {})
    context = backend.context_length
    if len(tokens) >= context:
        return Error(
            ErrorCode.PROMPT_TOO_LONG,
            f"The prompt is {len(tokens)} tokens but the model's context holds {context} "
            "(prompt and reply together). Shorten the prompt or the conversation history.")
    generation.prompt_text = prompt.text  # "Show prompt" in the chat UI
    if log_prompts:
        log.info("generation %s: %d prompt tokens:\n%s", generation.id, len(tokens),
                 prompt.text)
    try:
        sampler = Sampler.for_request(request, backend, next(seeds, None))
    except GrammarError as err:
        return Error(ErrorCode.GRAMMAR, str(err))
    except Exception:  # noqa: BLE001 - as for the prompt: this request only
        log.exception("preparing the sampler failed")
        return PREPARING_FAILED
    try:
        slot, keep = prepare_slot(slots, free, tokens, backend, restore_prefix)
    except Exception:  # noqa: BLE001
        log.exception("preparing a slot failed")
        sampler.close()
        return PREPARING_FAILED
    return Sequence(
        generation=generation, slot=slot, prompt_tokens=len(tokens), cached_tokens=keep,
        to_prefill=tokens[keep:], reply=ReplyText(prompt.stop + request.stop),
        sampler=sampler, admitted_at=time.monotonic())
