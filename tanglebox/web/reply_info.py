"""What the chat UI shows about a reply beside its text, from what the server stored with it
(``conversation_store.StoredMessage``), never recomputed: its speed in a small footer, where
"Copy" reads its Markdown source (fetched on click: the streamed reply is never sent twice), and "Show prompt" (the exact text the model read, its token count,
the sampling settings and timings); and the context meter near the composer (the
conversation's tokens against the model's context).

The conversation's tokens are the last reply's prompt and completion tokens: the prompt of the
next turn holds all of them, plus the next message. A model whose context is unknown (a remote
one) shows the tokens alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UPSTREAM = "upstream"  # the template of a reply a remote model wrote: it applies its own
WARN_SHARE = 0.85  # of the context used: the next turn would likely not fit


@dataclass(frozen=True)
class ReplyInfo:
    """A stored reply's provenance, as its footer and "Show prompt" show it."""

    source_url: str  # where Copy reads the reply's Markdown source (``history.py``)
    prompt_url: str  # where "Show prompt" reads its inside, when first opened
    prompt_text: str | None  # None: not stored (a reply from before migration 0002)
    prompt_by_upstream: bool  # a remote model: the messages sent, as JSON
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    tokens_per_second: float | None
    ttft_ms: float | None  # from the send to the first token (queue + prompt)
    model: str
    template: str
    settings: tuple[tuple[str, str], ...]  # the sampling settings, as (label, value)

    @property
    def speed(self) -> str:
        """The footer: "12.3 tokens/s · 210 ms to first token · 45 tokens" (what is known)."""
        parts = []
        if self.tokens_per_second:
            parts.append(f"{self.tokens_per_second:g} tokens/s")
        if self.ttft_ms is not None:
            parts.append(f"{self.ttft_ms:.0f} ms to first token")
        if self.completion_tokens is not None:
            parts.append(f"{self.completion_tokens} tokens")
        return " · ".join(parts)


SETTING_LABELS = {"temperature": "Temperature", "maxNewTokens": "Max new tokens",
                  "systemPrompt": "System prompt"}


def reply_info(message: Any) -> ReplyInfo:
    """The info of a stored assistant message (``StoredMessage``)."""
    timings = message.timings or {}
    ttft = None
    if "promptMs" in timings:
        ttft = float(timings.get("queueMs", 0.0)) + float(timings["promptMs"])
    sampling = message.sampling or {}
    settings = tuple((SETTING_LABELS.get(key, key), _shown(value))
                     for key, value in sampling.items())
    if message.seed is not None:
        settings += (("Seed", str(message.seed)),)
    return ReplyInfo(
        source_url=f"/c/{message.conversation_id}/messages/{message.id}.md",
        prompt_url=f"/c/{message.conversation_id}/messages/{message.id}/prompt",
        prompt_text=message.prompt_text,
        prompt_by_upstream=message.template == UPSTREAM,
        prompt_tokens=message.prompt_tokens, cached_tokens=message.cached_tokens,
        completion_tokens=message.completion_tokens,
        tokens_per_second=timings.get("tokensPerSecond"), ttft_ms=ttft,
        model=message.model or "", template=message.template or "", settings=settings)


def _shown(value: Any) -> str:
    if value == "":
        return "(the server's default)"
    return str(value)


@dataclass(frozen=True)
class ContextMeter:
    """The conversation's tokens against the model's context (None: unknown, remote)."""

    tokens: int
    context: int | None

    @property
    def percent(self) -> int | None:
        return None if not self.context else min(100, round(100 * self.tokens / self.context))

    @property
    def warn(self) -> bool:
        """The next turn would likely not fit."""
        return bool(self.context) and self.tokens > WARN_SHARE * self.context


def context_meter(last_reply: ReplyInfo | None, context: int | None) -> ContextMeter | None:
    """The meter after ``last_reply`` (None before any stored counts: nothing to show)."""
    if last_reply is None or last_reply.prompt_tokens is None:
        return None
    return ContextMeter(last_reply.prompt_tokens + (last_reply.completion_tokens or 0), context)


BYTES_PER_TOKEN_GUESS = 3  # a new message's tokens before the engine counts them (few texts pack more)


def fewest_to_drop(sent: list[ReplyInfo | None], context: int | None, prompt: str) -> int:
    """How many of the oldest turns sent to the model to leave out so that the next prompt
    likely fits in WARN_SHARE of ``context``, from the stored counts of ``sent`` (the turns
    still sent, oldest first): turn j's prompt and completion tokens hold turns 1..j. A guess,
    at least 1: the socket retries with one more when the engine still refuses it."""
    if not sent or not context:
        return 1
    totals = [(i.prompt_tokens or 0) + (i.completion_tokens or 0) if i else 0 for i in sent]
    needed = totals[-1] + len(prompt.encode("utf-8")) // BYTES_PER_TOKEN_GUESS
    for drop in range(1, len(sent) + 1):
        if needed - max(totals[:drop]) <= WARN_SHARE * context:
            return drop
    return len(sent)
