"""The chat UI's socket sending a message (``ui_socket.ChatSocket``'s first action), and what
it does when the message does not fit the model's context.

A message the engine refuses as too long (``prompt_too_long``, after its template and tokens)
gets a choice in ``#chat-error`` (``_too_long.html``): a new chat with the message, or this
chat without its oldest turns ("send-dropping"). Dropping leaves out the fewest oldest turns
that likely make the prompt fit (``reply_info.fewest_to_drop``, from the stored token counts),
and one more each time the engine still refuses it, until none is left; the last message not
sent is stored as the conversation's ``context_after`` (the next turns leave the same ones
out), and ``_messages.html`` marks the place: "Earlier messages are not sent to the model".

REST ``/conversation`` and the OpenAI API stay stateless: a prompt too long is a 400 with the
counts there, and the client chooses what to send.
"""

from __future__ import annotations

from typing import Any

from tanglebox.generation import ErrorCode
from tanglebox.reply_runs import ReplyRun
from tanglebox.runtime import Runtime
from tanglebox.web.reply_info import fewest_to_drop
from tanglebox.web.ui_conversation import Conversation, Turn, UiChats
from tanglebox.web.ui_fragments import (
    delete_fragment,
    error_fragment,
    messages_fragment,
    model_context,
    new_turn_fragment,
    too_long_fragment,
)


class Sending:
    """The sending half of ``ui_socket.ChatSocket`` (which provides what is declared here;
    ``ui_reply_watch.ReplyWatching``, before this class among its bases, ``_watch``)."""

    runtime: Runtime
    conversation: Conversation
    chats: UiChats

    def send(self, *fragments: str) -> None: ...

    def _read_prompt(self, user_prompt: Any) -> tuple[str | None, str]: ...

    def _start(self, history: list, prompt: str, parent_id: int | None,
               new_message: str | None, draft: str = "") -> ReplyRun | None: ...

    def _watch(self, run: ReplyRun, turn: Turn, on_fail: Any) -> None: ...

    def _composer(self, draft: str = "") -> str: ...

    def _refuse(self, message: str, draft: str = "") -> None: ...

    def send_prompt(self, user_prompt: Any, drop_oldest: bool = False) -> None:
        """Send a message; ``drop_oldest`` (the person's choice after it did not fit): without
        the fewest oldest turns that likely make it fit (``fewest_to_drop``)."""
        prompt, draft = self._read_prompt(user_prompt)
        if prompt is None:
            return
        drop = None
        if drop_oldest:
            sent = self.conversation.turns[self.conversation.first_sent:]
            if not sent:
                self._refuse("There are no earlier messages left to leave out.", draft)
                return
            model = self.conversation.settings.model or self.runtime.default_model_id
            drop = fewest_to_drop([t.info for t in sent], model_context(self.runtime, model),
                                  prompt)
        self._send(prompt, draft, drop)

    def _send(self, prompt: str, draft: str, drop: int | None) -> None:
        conversation = self.conversation
        first = not conversation.stored
        mark = conversation.settings.context_after
        run = self._start(conversation.history(drop=drop or 0), prompt, conversation.leaf_id,
                          prompt, draft)
        if run is None:
            return
        if drop is not None:  # the turns before it are marked: not sent any more
            conversation.settings.context_after = conversation.turns[
                conversation.first_sent + drop - 1].reply_message_id
            self.chats.save_settings(conversation)
        turn = conversation.add_turn(prompt)
        # A conversation's first message: #messages whole, for its data-conversation-url
        # (and after dropping turns, for the divider).
        self.send(messages_fragment(self.runtime, conversation) if first or drop is not None
                  else new_turn_fragment(turn), self._composer(), error_fragment(""))

        def failed(message: str) -> None:
            too_long = getattr(run.generation.final_emitted, "code", None) == \
                ErrorCode.PROMPT_TOO_LONG
            if drop is not None:
                conversation.settings.context_after = mark
                if too_long and conversation.first_sent + drop < len(conversation.turns):
                    self._send(prompt, draft, drop + 1)  # still too long: one more left out
                    return
                self.chats.save_settings(conversation)
                self.send(messages_fragment(self.runtime, conversation))
            self.send(delete_fragment(f"turn-{turn.id}"),
                      too_long_fragment(message, turn.prompt) if too_long and
                      conversation.turns else error_fragment(message),
                      self._composer(draft=turn.prompt))
        self._watch(run, turn, failed)

