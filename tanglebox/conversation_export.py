"""A stored conversation as a file to keep, and back: Markdown, JSON, a printable HTML page.

Each export is of the branch shown (``ConversationStore.branch``). The JSON is OpenAI's
``messages`` (the system prompt first when there is one), so other tools read it as it is,
plus a ``tanglebox`` object that keeps what OpenAI's shape has no room for: the settings, and
each message's state and provenance (model, template, sampling, seed, token counts, timings,
finish reason). :func:`import_json` reads either: plain OpenAI ``messages`` alone, or a
Tanglebox export with its metadata; what it cannot take is a ValueError naming the field.

The HTML page renders each message's Markdown with ``markdown_render`` (raw HTML off, only
http/https/mailto links, no images loaded) and carries no script: the text a model wrote
cannot act when the page is opened.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from jinja2 import Environment

from tanglebox.chat_request import parse_system_prompt, parse_temperature
from tanglebox.client_json import RequestError
from tanglebox.conversation_store import (INTERRUPTED_NOTE, MESSAGE_STATES, METADATA_FIELDS,
                                          StoredConversation, StoredMessage)
from tanglebox.markdown_render import render_markdown

if TYPE_CHECKING:
    from tanglebox.conversation_store import ConversationStore

FORMAT_VERSION = 1
SPEAKERS = {"user": "You", "assistant": "Assistant"}
DEFAULT_MAX_NEW_TOKENS_LIMIT = 4096  # the setting's default (maxNewTokensLimit)
# Each metadata field's JSON type, and its name in an import's error.
METADATA_TYPES: dict[str, tuple[type, str]] = {
    "model": (str, "a string"), "template": (str, "a string"), "sampling": (dict, "an object"),
    "seed": (int, "a whole number"), "prompt_tokens": (int, "a whole number"),
    "completion_tokens": (int, "a whole number"), "cached_tokens": (int, "a whole number"),
    "timings": (dict, "an object"), "finish_reason": (str, "a string")}

PAGE = Environment(autoescape=True).from_string("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font: 16px/1.55 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto;
       padding: 0 1rem; color: #1d1d1f; }
header { border-bottom: 1px solid #ddd; margin-bottom: 1.5rem; }
.meta { color: #666; font-size: .85rem; }
.message { margin: 0 0 1.5rem; break-inside: avoid-page; }
.speaker { font-weight: 600; margin-bottom: .25rem; }
.user .body { background: #f3f4f6; border-radius: .5rem; padding: .5rem .75rem; }
.note { color: #8a4b00; font-style: italic; }
pre { background: #f6f8fa; padding: .75rem; overflow-x: auto; white-space: pre-wrap; }
.code-label { font-size: .75rem; color: #666; }
.copy-button { display: none; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: .25rem .5rem; }
.align-center { text-align: center; } .align-right { text-align: right; }
</style>
</head>
<body>
<header>
<h1>{{ title }}</h1>
<p class="meta">Exported from Tanglebox · started {{ created }}</p>
{% if system_prompt %}<p class="meta">System prompt: {{ system_prompt }}</p>{% endif %}
</header>
{% for message in messages %}
<section class="message {{ message.role }}">
<div class="speaker">{{ message.speaker }}
{%- if message.model %} <span class="meta">· {{ message.model }}</span>{% endif %}</div>
<div class="body">{{ message.html }}</div>
{% if message.note %}<p class="note">{{ message.note }}</p>{% endif %}
</section>
{% endfor %}
</body>
</html>
""")


def export_markdown(conversation: StoredConversation, messages: list[StoredMessage]) -> str:
    lines = [f"# {_title(conversation)}", "",
             f"*Exported from Tanglebox · started {_shown_time(conversation.created_at)}*", ""]
    system_prompt = conversation.settings.get("systemPrompt") or ""
    if system_prompt:
        lines += [f"**System prompt:** {system_prompt}", ""]
    for message in messages:
        model = f" · {message.model}" if message.model else ""
        lines += [f"### {SPEAKERS[message.role]}{model}", "", message.content, ""]
        if message.note:
            lines += [f"*{message.note}*", ""]
    return "\n".join(lines)


def export_json(conversation: StoredConversation, messages: list[StoredMessage]) -> dict:
    system_prompt = conversation.settings.get("systemPrompt") or ""
    openai = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": m.role, "content": m.content} for m in messages]
    return {"id": conversation.id, "title": conversation.title,
            "created": conversation.created_at.isoformat(), "messages": openai,
            "tanglebox": {"version": FORMAT_VERSION, "settings": conversation.settings,
                          "messages": [_metadata(m) for m in messages]}}


def export_html(conversation: StoredConversation, messages: list[StoredMessage]) -> str:
    shown = [{"role": m.role, "speaker": SPEAKERS[m.role], "model": m.model, "note": m.note,
              "html": render_markdown(m.content)} for m in messages]
    return PAGE.render(title=_title(conversation), created=_shown_time(conversation.created_at),
                       system_prompt=conversation.settings.get("systemPrompt") or "",
                       messages=shown)


def import_json(store: ConversationStore, owner: str, surface: str, site: str,
                document: Any, max_new_tokens_limit: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
                ) -> StoredConversation:
    """A new conversation of ``owner`` from an export (or any OpenAI ``messages`` list); a
    ValueError names the first field that is wrong, and then nothing is stored."""
    if not isinstance(document, dict):
        raise ValueError("the file must hold a JSON object with \"messages\"")
    messages = document.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: must be a non-empty list of {\"role\", \"content\"}")
    extra = document.get("tanglebox")
    if extra is not None and not isinstance(extra, dict):
        raise ValueError("tanglebox: must be an object")
    extra = extra or {}
    settings = _settings(extra.get("settings"), max_new_tokens_limit)
    conversation_messages = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where}: must be an object of \"role\" and \"content\"")
        role, content = message.get("role"), _content(message.get("content"), where)
        if role == "system" and index == 0:
            settings["systemPrompt"] = content
        elif role in SPEAKERS:
            conversation_messages.append((role, content))
        else:
            raise ValueError(f"{where}.role: must be \"user\" or \"assistant\" (or \"system\" "
                             f"first), got {role!r}"[:200])
    metadata = _imported_metadata(extra.get("messages"), conversation_messages)
    title = document.get("title", "")
    if not isinstance(title, str):
        raise ValueError("title: must be a string")
    conversation = store.create(owner, surface, site, settings)
    parent_id = None
    for (role, content), (state, note, fields) in zip(conversation_messages, metadata):
        parent_id = store.add_message(conversation.id, parent_id, role, content, state,
                                      **fields).id
        if note:
            store.update_reply(parent_id, content, state, note, **fields)
    if title.strip():
        store.rename(conversation.id, owner, title.strip())
    return store.get(conversation.id, owner)


def _settings(value: Any, max_new_tokens_limit: int) -> dict:
    """The settings an export kept, checked as the settings panel checks them."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("tanglebox.settings: must be an object")
    settings: dict[str, Any] = {}
    where = "tanglebox.settings."
    try:
        if "temperature" in value:
            settings["temperature"] = parse_temperature(value["temperature"], where +
                                                        "temperature", allow_text=False)
        if "systemPrompt" in value:
            settings["systemPrompt"] = parse_system_prompt(value["systemPrompt"],
                                                           where + "systemPrompt")
    except RequestError as err:
        raise ValueError(str(err)) from None
    if "maxNewTokens" in value:
        tokens = value["maxNewTokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"{where}maxNewTokens: must be a whole number of at least 1")
        settings["maxNewTokens"] = min(tokens, max_new_tokens_limit)
    if "model" in value:
        if not isinstance(value["model"], str):
            raise ValueError(f"{where}model: must be a string")
        settings["model"] = value["model"]
    return settings


def _content(value: Any, where: str) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                       and isinstance(part.get("text"), str)
                                       for part in value):
        return "".join(part["text"] for part in value)
    raise ValueError(f"{where}.content: must be text (a string, or a list of "
                     "{\"type\": \"text\", \"text\": ...} parts)")


def _imported_metadata(value: Any, messages: list[tuple[str, str]]
                       ) -> list[tuple[str, str, dict[str, Any]]]:
    """Each message's state, note and provenance from ``tanglebox.messages`` (done, none,
    nothing when absent)."""
    if value is None:
        return [("done", "", {}) for _ in messages]
    if not isinstance(value, list) or len(value) != len(messages):
        raise ValueError(f"tanglebox.messages: must be a list of {len(messages)} objects, one "
                         "per user or assistant message")
    result = []
    for index, item in enumerate(value):
        where = f"tanglebox.messages[{index}]"
        if not isinstance(item, dict):
            raise ValueError(f"{where}: must be an object")
        state, note = item.get("state", "done"), item.get("note", "")
        if state not in MESSAGE_STATES:
            raise ValueError(f"{where}.state: must be one of {', '.join(MESSAGE_STATES)}")
        if not isinstance(note, str):
            raise ValueError(f"{where}.note: must be a string")
        if state == "writing":  # nothing is writing it any more
            state, note = "interrupted", INTERRUPTED_NOTE
        fields = {}
        for key in METADATA_FIELDS:
            field_value = item.get(key)
            if field_value is None:
                continue
            kind, kind_name = METADATA_TYPES[key]
            if isinstance(field_value, bool) or not isinstance(field_value, kind):
                raise ValueError(f"{where}.{key}: must be {kind_name}")
            fields[key] = field_value
        result.append((state, note, fields))
    return result


def _metadata(message: StoredMessage) -> dict[str, Any]:
    return {"id": message.id, "parent_id": message.parent_id, "role": message.role,
            "state": message.state, "note": message.note,
            "created_at": message.created_at.isoformat(),
            **{key: getattr(message, key) for key in METADATA_FIELDS}}


def _title(conversation: StoredConversation) -> str:
    return conversation.title or "Conversation"


def _shown_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")
