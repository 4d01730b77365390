"""The chat UI's HTML, rendered from the ``_``-prefixed partials in ``templates/``.

The page (``pages.py``) and the socket (``ui_socket.py``) render the same partials, so a message
looks the same whether it came with the page or streamed in. A fragment for the socket carries
``hx-swap-oob`` on each top-level element: that attribute says where htmx's ws extension puts it.
Message text goes through :func:`render_markdown` (the only source of markup from untrusted text);
everything else is escaped by Jinja.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from flask import get_template_attribute, render_template
from markupsafe import Markup, escape

from tanglebox.markdown_blocks import BlockUpdate, MarkdownStream, OpenCode
from tanglebox.markdown_render import render_markdown
from tanglebox.runtime import Runtime
from tanglebox.web.reply_info import ContextMeter, context_meter
from tanglebox.web.ui_conversation import PAGE, WIDGET, Conversation, Turn
from tanglebox.web.ui_settings import model_options, settings_form_values, shown_model

EMPTY_TITLES = {PAGE: "What can I help with?", WIDGET: "Ask a question to start."}


@dataclass(frozen=True)
class RenderedTurn:
    turn: Turn
    prompt_html: Markup
    reply_html: Markup
    streaming: bool = False  # its reply is being written: it comes as deltas after the sync


def render_turn(turn: Turn, streaming: bool = False) -> RenderedTurn:
    return RenderedTurn(turn, render_markdown(turn.prompt),
                        Markup("") if streaming else render_markdown(turn.reply), streaming)


def ui_context(runtime: Runtime, conversation: Conversation,
               with_turns: bool = True) -> dict[str, Any]:
    """Everything the page and the partials need to render ``conversation``; without its
    turns' Markdown rendered (``rendered_turns`` empty) for a partial that shows none (the
    composer, the model chip: rendering every turn for them made each reply's cost grow with
    the conversation)."""
    model_name, device = shown_model(runtime, conversation.settings.model)
    return {
        "model_name": model_name,
        "device": device,
        "empty_title": EMPTY_TITLES[conversation.surface],
        "placeholder": ("Type your question…" if conversation.surface == WIDGET
                        else f"Message {model_name}"),
        "max_new_tokens_limit": runtime.settings["maxNewTokensLimit"],
        "rendered_turns": [render_turn(turn, conversation.busy and turn is conversation.turns[-1])
                           for turn in conversation.turns] if with_turns else [],
        "conversation_url": conversation.url,
        "busy": conversation.busy,
        "can_regenerate": bool(conversation.turns),
        "draft": "",
        "keep_draft": False,
        "error": "",
        "form": settings_form_values(conversation.settings),
        "model_options": model_options(runtime, conversation.settings.model),
        "errors": {},
        "status": "",
        "meter": conversation_meter(runtime, conversation),
        "first_sent": conversation.first_sent,  # the "not sent" divider before that turn
    }


def model_context(runtime: Runtime, model: str) -> int | None:
    """The context length of the model the next turn goes to; None when unknown (remote)."""
    engine = runtime.engine
    if model in runtime.remotes or engine is None:
        return None
    return engine.backend.context_length


def conversation_meter(runtime: Runtime, conversation: Conversation) -> ContextMeter | None:
    """The context meter after the conversation's last stored reply (None: nothing yet)."""
    last = conversation.turns[-1].info if conversation.turns else None
    model = conversation.settings.model or runtime.default_model_id
    return context_meter(last, model_context(runtime, model))


def messages_fragment(runtime: Runtime, conversation: Conversation) -> str:
    """``#messages`` (outerHTML): the whole conversation, on connect and after New chat."""
    return render_template("_messages.html", oob=True, **ui_context(runtime, conversation))


def model_chip_fragment(runtime: Runtime, conversation: Conversation) -> str:
    """``#model-chip`` (outerHTML): the conversation's model in the page's header."""
    return render_template("_model_chip.html", oob=True,
                           **ui_context(runtime, conversation, with_turns=False))


def composer_fragment(runtime: Runtime, conversation: Conversation, draft: str = "",
                      keep_draft: bool = False) -> str:
    """``#composer`` (outerHTML): enabled, or disabled with a Stop button while busy."""
    context = ui_context(runtime, conversation, with_turns=False)
    context.update(draft=draft, keep_draft=keep_draft)
    return render_template("_composer.html", oob=True, **context)


def error_fragment(message: str) -> str:
    """``#chat-error`` (outerHTML): the message, or hidden and empty for ``""``."""
    return render_template("_error.html", oob=True, error=message)


def too_long_fragment(message: str, draft: str) -> str:
    """``#chat-error`` (outerHTML) for a message that did not fit the context: why, and the
    choice (a new chat with it, or this chat without its oldest turns)."""
    return render_template("_too_long.html", oob=True, error=message, draft=draft)


def settings_fragment(runtime: Runtime, form: dict[str, str], errors: dict[str, str],
                      status: str) -> str:
    """``#settings-form`` (outerHTML): the values, and what was wrong or what was saved."""
    return render_template("_settings.html", oob=True, form=form, errors=errors, status=status,
                           max_new_tokens_limit=runtime.settings["maxNewTokensLimit"],
                           model_options=model_options(runtime, form["model"]))


def new_turn_fragment(turn: Turn) -> str:
    """``section#turn-N`` appended to ``#messages``: the person's message and an empty reply."""
    turn_section = get_template_attribute("_turn.html", "turn_section")
    section = turn_section(turn, render_markdown(turn.prompt), Markup(""), streaming=True)
    # beforeend swaps the wrapper's children into the target, so the wrapper is a plain div.
    return f'<div hx-swap-oob="beforeend:#messages">{section}</div>'


def turn_fragment(turn: Turn, streaming: bool = False) -> str:
    """``section#turn-N`` (outerHTML): the turn rendered whole, with its controls (after a
    reply with alternatives ends; an edited message starting its reply)."""
    turn_section = get_template_attribute("_turn.html", "turn_section")
    return str(turn_section(turn, render_markdown(turn.prompt),
                            Markup("") if streaming else render_markdown(turn.reply),
                            streaming=streaming, oob=True))


def reply_meta_fragment(turn: Turn) -> str:
    """``div#turn-N-meta`` (outerHTML): Copy, the speed and "Show prompt" of a reply that
    just ended (from what was stored with it)."""
    reply_meta = get_template_attribute("_turn.html", "reply_meta")
    return str(reply_meta(turn, oob=True))


def reply_fragment(turn: Turn, text: str, streaming: bool, note: str = "") -> str:
    """``article#turn-N-reply`` (outerHTML): the reply rendered whole (a regenerated reply's
    empty start, a failed one's old text back)."""
    return _reply_article(turn, render_markdown(text), streaming, note)


def _reply_article(turn: Turn, html: Markup, streaming: bool, note: str = "",
                   open_html: Markup | None = None) -> str:
    message = get_template_attribute("_message.html", "message")
    return str(message(f"turn-{turn.id}-reply", "assistant", html, streaming=streaming,
                       note=note, oob=True, open_html=open_html or ""))


class ReplyFragments(Protocol):
    """The fragments that show one reply while it is written, and when it ends."""

    def update(self, text: str) -> str:
        """For the reply so far: what changed since the last update ("" for nothing)."""

    def end(self, text: str, note: str) -> str:
        """For the whole reply: what makes the page show it finished, with its note."""


class StreamedReply:
    """A reply sent as block deltas (``markdown_blocks``), into the open article of
    ``new_turn_fragment`` or of ``reply_fragment(turn, "", streaming=True)``:

    - ``div[hx-swap-oob="beforebegin:#turn-N-reply-open"]``: blocks that just finished, once;
    - ``div#turn-N-reply-open`` (outerHTML): the open tail, rendered again whole;
    - while the open tail is a fenced code block, its code element ends in
      ``span#turn-N-reply-open-line`` (the line being written): whole lines of code go before
      it (``div[hx-swap-oob="beforebegin:#turn-N-reply-open-line"]``), once each, and the span
      is replaced with the line as it grows;
    - at the end, the last blocks, ``#turn-N-reply-open`` deleted, the note appended: the
      article is then the same as ``reply_fragment(turn, text, streaming=False, note)``;
    - the whole article again only when earlier blocks changed (a reference definition came
      for a ``[label]`` already shown).
    """

    def __init__(self, turn: Turn) -> None:
        self.turn = turn
        self.reply_id = f"turn-{turn.id}-reply"
        self.blocks = MarkdownStream()

    def update(self, text: str) -> str:
        change = self.blocks.update(text)
        if change.replaced:
            return _reply_article(self.turn, change.finished, True, open_html=change.open)
        open_block = get_template_attribute("_message.html", "open_block")
        if change.code is not None:
            return self._finished(change) + self._code(change.code, open_block)
        return self._finished(change) + (
            "" if change.open is None else str(open_block(self.reply_id, change.open, oob=True)))

    def _code(self, code: OpenCode, open_block: Any) -> str:
        line_id = f"{self.reply_id}-open-line"
        if code.whole:
            line = Markup('<span id="{}">{}</span>').format(line_id, code.last_line)
            return str(open_block(self.reply_id, code.before + code.lines + line + code.after,
                                  oob=True))
        lines = (f'<div hx-swap-oob="beforebegin:#{line_id}">{code.lines}</div>'
                 if code.lines else "")
        return lines + ("" if code.last_line is None else
                        f'<span id="{line_id}" hx-swap-oob="true">{code.last_line}</span>')

    def end(self, text: str, note: str) -> str:
        change = self.blocks.finish(text)
        if change.replaced:
            return _reply_article(self.turn, change.finished, False, note)
        message_note = get_template_attribute("_message.html", "message_note")
        note_html = (f'<div hx-swap-oob="beforeend:#{self.reply_id} .message__body">'
                     f"{message_note(note)}</div>") if note else ""
        return self._finished(change) + delete_fragment(f"{self.reply_id}-open") + note_html

    def _finished(self, change: BlockUpdate) -> str:
        # beforebegin swaps the wrapper's children in, so the wrapper is a plain div.
        return (f'<div hx-swap-oob="beforebegin:#{self.reply_id}-open">{change.finished}</div>'
                if change.finished else "")


def delete_fragment(element_id: str) -> str:
    """Removes the element with ``element_id`` (a turn whose request failed)."""
    return f'<div id="{escape(element_id)}" hx-swap-oob="delete"></div>'
