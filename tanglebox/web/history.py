"""The chat UI's history: this browser's stored conversations, by URL, in the sidebar, as files.

    GET  /c/<id>                   the chat page of a stored conversation (its current branch
                                   rendered here; its socket URL names it); 404 page otherwise
    GET  /history?q=               the sidebar's list (newest first; q searches titles and text)
    POST /c/<id>/rename  title=    the renamed row
    POST /c/<id>/delete            a "Deleted · Undo" row (the conversation is hidden at once)
    POST /c/<id>/restore           the row again (undo)
    GET  /c/<id>/export?format=    md | json | html, as a download (Content-Disposition)
    GET  /c/<id>/messages/<n>.md   one message of the current branch, its Markdown source
                                   (a reply's Copy button, app.js)
    GET  /c/<id>/messages/<n>/prompt   a reply's "Show prompt": what the model read (HTML)
    POST /import         file=     a JSON export ──► a new conversation ──► 303 /c/<new id>

Whose: ``browser_identity.browser_id()``. A conversation of another browser, a deleted one and
an unknown id are the same 404 (the store never tells them apart), so an id seen elsewhere
opens nothing. Only the page's conversations live here; the widget's stay in the widget.

Every route follows the chat UI's token rule (a sign-in when ``uiRequiresToken``); the
state-changing ones are POST only, and ``security.py`` refuses a POST from a foreign Origin
before it gets here (a SameSite=Lax cookie is not sent on one either).
"""

from __future__ import annotations

import json
import re
from urllib.parse import quote, urlencode, urlsplit
from dataclasses import dataclass
from datetime import datetime

from flask import (Blueprint, Response, abort, current_app, get_template_attribute, redirect,
                   render_template, request)

from tanglebox.client_json import RequestError, decode_json
from tanglebox.conversation_export import (export_html, export_json, export_markdown,
                                           import_json)
from tanglebox.conversation_store import (ConversationStore, ConversationSummary,
                                          StoredConversation, conversation_store)
from tanglebox.runtime import current_runtime
from tanglebox.web.browser_identity import PAGE, browser_id
from tanglebox.web.reply_info import reply_info
from tanglebox.web.signin import signed_in, ui_requires_token
from tanglebox.web.ui_conversation import CONVERSATION_ID

MAX_TITLE = 200
MAX_QUERY = 200
LIST_LIMIT = 100
# The store's ids: secrets.token_urlsafe(16); anything else is not a conversation.
EXPORTS = {"md": ("text/markdown", "md"), "json": ("application/json", "json"),
           "html": ("text/html", "html")}

blueprint = Blueprint("history", __name__)


@dataclass(frozen=True)
class HistoryItem:
    """One row of the sidebar."""

    id: str
    title: str
    updated_at: datetime
    current: bool


@blueprint.before_request
def _require_sign_in():
    """The pages' rule (``signin.py``): a session when the UI requires a token."""
    if not ui_requires_token() or signed_in():
        return None
    if request.method == "GET" and request.endpoint == "history.conversation_page":
        return redirect("/signin?" + urlencode({"next": request.path}), code=303)
    abort(401, description="Sign in at /signin first: the chat needs an API token.")


def store() -> ConversationStore:
    return conversation_store(current_app)


def history_items(current_id: str = "", query: str = "") -> list[HistoryItem]:
    """This browser's page conversations, newest first, for the sidebar."""
    summaries: list[ConversationSummary] = store().list(browser_id(PAGE), PAGE, "", query=query,
                                                        limit=LIST_LIMIT)
    return [HistoryItem(s.id, s.title or "New chat", s.updated_at, s.id == current_id)
            for s in summaries]


def find_owned(conversation_id: str) -> StoredConversation | None:
    """This browser's page conversation with that id; None for every other case alike."""
    if not CONVERSATION_ID.fullmatch(conversation_id):
        return None
    conversation = store().get(conversation_id, browser_id(PAGE))
    return conversation if conversation is not None and conversation.surface == PAGE else None


def owned_conversation(conversation_id: str) -> StoredConversation:
    """:func:`find_owned`, or 404."""
    conversation = find_owned(conversation_id)
    if conversation is None:
        abort(404, description="No such conversation here.")
    return conversation


@blueprint.get("/c/<conversation_id>")
def conversation_page(conversation_id: str):
    """The chat page, showing a stored conversation of this browser."""
    from tanglebox.web.pages import chat_page  # pages imports this module's history_items
    conversation = find_owned(conversation_id)
    if conversation is None:
        return render_template("conversation_missing.html",
                               history=history_items(), query=""), 404
    return chat_page(conversation)


@blueprint.get("/history")
def history_list():
    """The sidebar's list (an htmx fragment); ``q`` searches titles and message text."""
    query = _text_field(request.args, "q", MAX_QUERY, required=False)
    return render_template("_sidebar_list.html", history=history_items(_shown_id(), query),
                           query=query)


@blueprint.post("/c/<conversation_id>/rename")
def rename(conversation_id: str):
    owned_conversation(conversation_id)
    title = _text_field(request.form, "title", MAX_TITLE, required=True)
    store().rename(conversation_id, browser_id(PAGE), title)
    return _row(owned_conversation(conversation_id))


@blueprint.post("/c/<conversation_id>/delete")
def delete(conversation_id: str):
    conversation = owned_conversation(conversation_id)
    store().delete(conversation_id, browser_id(PAGE))
    return render_template("_sidebar_deleted.html", conversation=conversation)


@blueprint.post("/c/<conversation_id>/restore")
def restore(conversation_id: str):
    if not CONVERSATION_ID.fullmatch(conversation_id) or not store().restore(
            conversation_id, browser_id(PAGE)):
        abort(404, description="No such conversation here.")
    return _row(owned_conversation(conversation_id))


@blueprint.get("/c/<conversation_id>/export")
def export(conversation_id: str):
    """The conversation's current branch as a file: Markdown, JSON (OpenAI's ``messages`` and
    the stored metadata) or a printable HTML page."""
    conversation = owned_conversation(conversation_id)
    kind = request.args.get("format", "md")
    if kind not in EXPORTS:
        abort(400, description="format: must be one of md, json, html.")
    messages = store().branch(conversation_id)
    if kind == "md":
        body = export_markdown(conversation, messages)
    elif kind == "json":
        body = json.dumps(export_json(conversation, messages), ensure_ascii=False, indent=2)
    else:
        body = export_html(conversation, messages)
    mimetype, extension = EXPORTS[kind]
    response = Response(body, mimetype=mimetype)
    response.headers["Content-Disposition"] = _attachment(conversation.title, extension)
    return response


@blueprint.get("/c/<conversation_id>/messages/<int:message_id>.md")
def message_markdown(conversation_id: str, message_id: int):
    """A message's Markdown source as stored (Copy under a reply), from the current branch."""
    owned_conversation(conversation_id)
    for message in store().branch(conversation_id):
        if message.id == message_id:
            return Response(message.content, mimetype="text/markdown")
    abort(404, description="No such message here.")


@blueprint.get("/c/<conversation_id>/messages/<int:message_id>/prompt")
def message_prompt(conversation_id: str, message_id: int):
    """The inside of a reply's "Show prompt", from what was stored with it."""
    owned_conversation(conversation_id)
    for message in store().branch(conversation_id):
        if message.id == message_id and message.role == "assistant":
            reply_prompt = get_template_attribute("_turn.html", "reply_prompt")
            return str(reply_prompt(reply_info(message)))
    abort(404, description="No such reply here.")


@blueprint.post("/import")
def import_conversation():
    """A JSON export (``/c/<id>/export?format=json``, or any OpenAI ``messages`` document)
    becomes a new conversation of this browser; the browser is sent to it."""
    upload = request.files.get("file")
    if upload is None or not upload.filename:
        abort(400, description="file: choose a JSON file exported from Tanglebox.")
    try:
        document = decode_json(upload.read(), "file", "a JSON object")
    except RequestError as error:
        abort(400, description=str(error))
    if not isinstance(document, dict):
        abort(400, description="file: must hold a JSON object (a Tanglebox export).")
    try:
        conversation = import_json(
            store(), browser_id(PAGE), PAGE, "", document,
            max_new_tokens_limit=current_runtime().settings["maxNewTokensLimit"])
    except ValueError as error:
        abort(400, description=f"file: {error}")
    return redirect(f"/c/{conversation.id}", code=303)


def _row(conversation: StoredConversation) -> str:
    item = HistoryItem(conversation.id, conversation.title or "New chat",
                       conversation.updated_at, _shown_id() == conversation.id)
    return render_template("_sidebar_item.html", item=item)


def _shown_id() -> str:
    """The conversation on the page that asked (htmx sends the page's URL), to mark it."""
    path = urlsplit(request.headers.get("HX-Current-URL", "")).path
    return path[len("/c/"):] if path.startswith("/c/") else ""


def _text_field(values, name: str, limit: int, required: bool) -> str:
    """A single-line text field, stripped; 400 naming it when it is not usable."""
    value = values.get(name, "")
    value = " ".join(value.split())
    if required and not value:
        abort(400, description=f"{name}: must not be empty.")
    if len(value) > limit:
        abort(400, description=f"{name}: at most {limit} characters.")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        abort(400, description=f"{name}: is not valid text.")
    return value


def _attachment(title: str, extension: str) -> str:
    """Content-Disposition for a download named after the title: letters of any script,
    digits and dashes (RFC 6266: ``filename*`` in UTF-8, and an ASCII ``filename`` for old
    clients); never empty, never a path."""
    stem = re.sub(r"[\W_]+", "-", title).strip("-")[:60].strip("-").lower() or "conversation"
    plain = re.sub(r"[^a-z0-9]+", "-", stem).strip("-") or "conversation"
    return (f'attachment; filename="{plain}.{extension}"; '
            f"filename*=UTF-8''{quote(stem)}.{extension}")
