"""The chat UI's socket at ``/ws/chat``, driven by a real websocket client against a live server
(gunicorn + gevent) on the fake backend: the exact fragment sequence of ``ui_socket``'s
docstring, Stop, New chat, Regenerate, settings, refusals, XSS, Origin, idle and reconnects.
A reply streams as block deltas; what the page shows is built from them as htmx's ws extension
swaps them in (tests/reply_page.py).

The fake "model" answers ``echo X`` with X and ``count N`` with "1 2 … N", one byte per token.
"""

from __future__ import annotations

import json
import re
import struct
from contextlib import closing
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pytest
import websocket
from websocket import ABNF

from tests.live_server import LiveServer, wait_until_idle
from tests.reply_page import ReplyPage

RECEIVE_DEADLINE = 15  # seconds any single message may take before the test fails
HUGE = 200_000
ENDLESS = "count 5000"  # 23,893 tokens: 4 minutes at 10 ms a step, far past any deadline here
VOID = {"input", "br", "hr", "img", "meta", "link", "area", "base", "col", "embed", "source",
        "track", "wbr", "rect", "path", "circle"}


# -- reading fragments -----------------------------------------------------------------------

@dataclass
class Node:
    tag: str
    attrs: dict[str, str | None]
    content: list["Node | str"] = field(default_factory=list)  # elements and text, in order

    @property
    def children(self) -> list["Node"]:
        return [item for item in self.content if isinstance(item, Node)]

    @property
    def id(self) -> str | None:
        return self.attrs.get("id")

    @property
    def oob(self) -> str | None:
        return self.attrs.get("hx-swap-oob")

    def walk(self):
        yield self
        for child in self.children:
            yield from child.walk()

    def find(self, selector: str) -> "Node | None":
        """``#id``, ``tag`` or ``.class``: the first match in this subtree."""
        return next((n for n in self.walk() if _matches(n, selector)), None)

    def find_all(self, selector: str) -> list["Node"]:
        return [n for n in self.walk() if _matches(n, selector)]

    def text(self) -> str:
        """The text a reader sees, without the markup's surrounding newlines."""
        return "".join(item if isinstance(item, str) else item.text()
                       for item in self.content).strip()


def _matches(node: Node, selector: str) -> bool:
    if selector.startswith("#"):
        return node.id == selector[1:]
    if selector.startswith("."):
        return selector[1:] in (node.attrs.get("class") or "").split()
    return node.tag == selector


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#fragment", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].content.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].content.append(Node(tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        while len(self.stack) > 1:
            if self.stack.pop().tag == tag:
                break

    def handle_data(self, data):
        self.stack[-1].content.append(data)


def parse(message: str) -> list[Node]:
    """The top-level elements of a fragment (what htmx's ws extension swaps, each by itself)."""
    builder = _TreeBuilder()
    builder.feed(message)
    builder.close()
    return builder.root.children


def targets(message: str) -> list[str]:
    """Where each top-level element goes: ``#id`` (outerHTML), or its hx-swap-oob value."""
    return [f"#{node.id}" if node.oob == "true" else f"{node.oob}" + (
        f" #{node.id}" if node.id else "") for node in parse(message)]


def element(message: str, element_id: str) -> Node:
    for node in parse(message):
        found = node.find(f"#{element_id}")
        if found is not None:
            return found
    raise AssertionError(f"#{element_id} not in {message[:300]!r}")


def reply_text(message: str, turn: int = 1) -> str:
    return element(message, f"turn-{turn}-reply").find(".message__content").text()


def shown_reply(messages: list[str], turn: int = 1) -> Node:
    """The reply's article as the page shows it after ``messages`` (the turn's deltas)."""
    return parse(ReplyPage(turn).apply_all(messages).html)[0]


def shown_text(messages: list[str], turn: int = 1) -> str:
    return shown_reply(messages, turn).find(".message__content").text()


def composer_is_busy(message: str) -> bool:
    textarea = element(message, "composer").find("textarea")
    return "disabled" in textarea.attrs


def assert_inert(message: str) -> None:
    """Nothing from model or user text became markup: no script, handler or htmx attribute."""
    for node in (n for top in parse(message) for n in top.walk()):
        assert node.tag not in ("script", "img", "svg", "iframe", "style") or (
            node.tag == "svg" and node.attrs.get("aria-hidden") == "true"), message
        for name in node.attrs:
            assert not name.startswith("on"), message
            assert not (name.startswith("hx-") and name not in ("hx-swap-oob", "hx-disable"))
            assert name not in ("ws-connect", "hx-get", "hx-trigger", "src", "style"), message


# -- talking to the socket -------------------------------------------------------------------

BROWSER = "b" * 43  # the browser's cookie (browser_identity): its conversations are its own
OTHER_BROWSER = "o" * 43


class ChatClient:
    """A UI socket as htmx uses it: form values as JSON (with HEADERS), fragments back; a
    browser's cookie with it."""

    def __init__(self, server: LiveServer, conversation: str | None = None,
                 surface: str = "page", browser: str = BROWSER, **options) -> None:
        query = f"surface={surface}" + (f"&conversation={conversation}" if conversation else "")
        self.ws = websocket.create_connection(
            f"{server.ws_url}/ws/chat?{query}", timeout=RECEIVE_DEADLINE,
            cookie=f"tanglebox_browser={browser}; tanglebox_widget={browser}", **options)
        self.sync = self.ws.recv()

    def send(self, **values) -> None:
        values["HEADERS"] = {"HX-Request": "true", "HX-Trigger": None,
                             "HX-Current-URL": "http://127.0.0.1/"}
        self.ws.send(json.dumps(values))

    def receive(self) -> str:
        return self.ws.recv()

    def receive_until_composer_enabled(self) -> list[str]:
        """Every fragment up to the one that enables the composer again (a turn's end)."""
        messages = []
        while True:
            messages.append(self.receive())
            if 'id="composer"' in messages[-1] and not composer_is_busy(messages[-1]):
                return messages

    def ask(self, prompt: str) -> list[str]:
        self.send(userPrompt=prompt)
        return self.receive_until_composer_enabled()

    def close(self) -> None:
        self.ws.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("ui-socket"))
    server.start(fake={"step_delay": 0.01}, maxNewTokens=2000, maxNewTokensLimit=3000)
    yield server
    server.stop()


@pytest.fixture
def chat(server):
    client = ChatClient(server)
    yield client
    client.close()


def stored_id(first: str) -> str:
    """The stored conversation's id, from the first message's data-conversation-url."""
    url = parse(first)[0].attrs["data-conversation-url"]
    assert url.startswith("/c/"), url
    return url.removeprefix("/c/")


def flip_count(message: str, what: str) -> str:
    """The "2/3" of the message's alternatives ("reply" or "message")."""
    for node in (n for top in parse(message) for n in top.walk()):
        if node.tag == "form" and node.attrs.get("aria-label", "").endswith(f"this {what}"):
            return node.find(".flipper__count").text()
    raise AssertionError(f"no {what} flipper in {message[:300]!r}")


def close_frame(ws: websocket.WebSocket) -> tuple[int, str]:
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", frame.data[:2])[0], frame.data[2:].decode()


# -- connect ---------------------------------------------------------------------------------

def test_connect_sends_the_conversation_the_composer_and_the_settings(chat):
    assert targets(chat.sync) == ["#messages", "#composer", "#settings-form"]
    assert element(chat.sync, "messages").find(".turn") is None
    assert not composer_is_busy(chat.sync)
    assert "data-keep-draft" in element(chat.sync, "composer").find("textarea").attrs


def test_the_widget_gets_no_settings_form(server):
    with closing(ChatClient(server, surface="widget")) as widget:
        assert targets(widget.sync) == ["#messages", "#composer"]
        widget.send(action="settings", temperature="1", maxNewTokens="5", systemPrompt="x")
        assert "set by the server" in element(widget.receive(), "chat-error").text()


# -- a turn: the exact fragment sequence -----------------------------------------------------

def test_a_message_streams_as_the_documented_fragment_sequence(chat):
    messages = chat.ask("count 40")
    full = " ".join(str(i) for i in range(1, 41))

    first, *updates, last = messages
    # The conversation's first message: #messages whole, now naming the page's /c/<id>.
    assert targets(first) == ["#messages", "#composer", "#chat-error"]
    assert parse(first)[0].attrs["data-conversation-url"].startswith("/c/")
    section = parse(first)[0].find("#turn-1")
    assert section.find("#turn-1-prompt").find(".message__content").text() == "count 40"
    reply = section.find("#turn-1-reply")
    assert reply.find("#turn-1-reply-open").attrs["aria-busy"] == "true"
    assert "hx-disable" in reply.attrs
    assert composer_is_busy(first) and element(first, "composer").find(".round-button--stop")
    assert "hidden" in element(first, "chat-error").attrs

    assert updates, "the reply should arrive in several re-rendered pieces"
    seen = ""
    for count, update in enumerate(updates, start=2):
        # One paragraph: it stays the open block, rendered again whole at each update.
        assert targets(update) == ["#turn-1-reply-open"]
        assert element(update, "turn-1-reply-open").attrs["aria-busy"] == "true"
        text = shown_text(messages[:count])
        assert full.startswith(text) and len(text) > len(seen)  # the whole reply so far
        seen = text

    assert targets(last) == ["beforebegin:#turn-1-reply-open", "delete #turn-1-reply-open",
                             "#turn-1-meta", "#composer"]  # #turn-1-meta: issue 18
    assert all("aria-busy" not in node.attrs for node in shown_reply(messages).walk())
    assert shown_text(messages) == full
    regenerate = element(last, "composer").find_all("button")[-1]
    assert regenerate.attrs["value"] == "regenerate" and "disabled" not in regenerate.attrs


def test_turns_are_numbered_and_the_conversation_is_kept(chat):
    chat.ask("echo first")
    messages = chat.ask("echo second")
    assert targets(messages[0]) == ["beforeend:#messages", "#composer", "#chat-error"]
    assert shown_text(messages, turn=2) == "second"


def test_markdown_is_rendered_on_the_server(chat):
    messages = chat.ask(
        "echo ## Title\n\n```python\nprint(1)\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    reply = shown_reply(messages).find(".message__content")
    assert reply.find("h2").text() == "Title"
    assert reply.find("code").attrs["class"] == "language-python"
    assert "data-copy-code" in reply.find("button").attrs
    assert reply.find("table") is not None


# -- Stop, Regenerate, New chat --------------------------------------------------------------

def test_stop_ends_the_reply_at_once_and_keeps_what_was_written(chat, server):
    chat.send(userPrompt="count 2000")
    first = chat.receive()
    assert targets(first)[0] == "#messages"
    streaming = chat.receive()
    assert targets(streaming) == ["#turn-1-reply-open"]  # it is streaming
    chat.send(action="stop")
    messages = chat.receive_until_composer_enabled()
    last = messages[-1]
    assert targets(last) == ["beforebegin:#turn-1-reply-open", "delete #turn-1-reply-open",
                             "beforeend:#turn-1-reply .message__body", "#turn-1-meta",
                             "#composer"]  # #turn-1-meta: issue 18
    reply = shown_reply([first, streaming, *messages])
    assert reply.find(".message__note").text() == "Stopped."
    text = reply.find(".message__content").text()
    assert text and " ".join(str(i) for i in range(1, 2001)).startswith(text)
    assert len(text) < 1000
    wait_until_idle(server)
    assert shown_text(chat.ask("echo after stop"), turn=2) == "after stop"


def test_regenerate_writes_the_last_reply_again(chat):
    chat.ask("echo again")
    chat.send(action="regenerate")
    messages = chat.receive_until_composer_enabled()
    assert targets(messages[0]) == ["#turn-1-reply", "#composer", "#chat-error"]
    assert reply_text(messages[0]) == "" and composer_is_busy(messages[0])
    # The turn whole at the end: the old reply is kept as an alternative ("‹ 2/2 ›").
    assert targets(messages[-1]) == ["beforebegin:#turn-1-reply-open",
                                     "delete #turn-1-reply-open", "#turn-1", "#composer"]
    assert shown_text(messages) == "again"
    assert flip_count(messages[-1], "reply") == "2/2"


def test_regenerate_with_nothing_to_regenerate_is_refused(chat):
    chat.send(action="regenerate")
    message = chat.receive()
    assert targets(message) == ["#chat-error", "#composer"]
    assert "no reply" in element(message, "chat-error").text()


def test_new_chat_clears_the_conversation(server):
    with closing(ChatClient(server, conversation="new-chat-test-0001")) as chat:
        chat.ask("echo remember me")
        chat.send(action="new")
        message = chat.receive()
        assert targets(message) == ["#messages", "#composer", "#chat-error"]
        assert element(message, "messages").find(".turn") is None
    with closing(ChatClient(server, conversation="new-chat-test-0001")) as again:
        assert element(again.sync, "messages").find(".turn") is None


def test_new_chat_while_streaming_clears_and_the_reply_goes_on_in_its_conversation(chat,
                                                                                   server):
    chat.send(userPrompt="count 300")
    first = chat.receive()
    chat.send(action="new")
    messages = chat.receive_until_composer_enabled()
    assert targets(messages[-1]) == ["#messages", "#composer", "#chat-error"]
    assert element(messages[-1], "messages").find(".turn") is None
    assert element(messages[-1], "messages").attrs["data-conversation-url"] == "/"
    old = ChatClient(server, conversation=stored_id(first))
    with closing(old):
        if composer_is_busy(old.sync):  # still being written: watch it to its end
            old.receive_until_composer_enabled()
            old = ChatClient(server, conversation=stored_id(first))
        assert element(old.sync, "turn-1-reply").find(".message__content").text() == " ".join(
            str(i) for i in range(1, 301))


def test_a_second_message_while_streaming_is_refused_and_the_reply_goes_on(chat):
    chat.send(userPrompt="count 60")
    first = chat.receive()
    chat.send(userPrompt="echo too soon")
    messages = [first, *chat.receive_until_composer_enabled()]
    refusals = [m for m in messages if targets(m) == ["#chat-error"]]
    assert refusals and "still being written" in element(refusals[0], "chat-error").text()
    assert shown_text(messages) == " ".join(str(i) for i in range(1, 61))


# -- settings --------------------------------------------------------------------------------

def test_settings_are_validated_and_a_bad_value_changes_nothing(server):
    with closing(ChatClient(server, conversation="settings-test-0001")) as chat:
        chat.send(action="settings", temperature="0", maxNewTokens="7", systemPrompt="Be brief.")
        saved = chat.receive()
        assert targets(saved) == ["#settings-form"]
        assert element(saved, "settings-status").text() == "Applied to this conversation."

        for bad in ({"temperature": "hot"}, {"temperature": "2.5"}, {"temperature": "NaN"},
                    {"maxNewTokens": "0"}, {"maxNewTokens": "1.5"}, {"maxNewTokens": "999999"}):
            values = {"temperature": "0", "maxNewTokens": "7", "systemPrompt": "x", **bad}
            chat.send(action="settings", **values)
            refused = chat.receive()
            [name] = bad
            field_id = {"temperature": "temperature", "maxNewTokens": "max-new-tokens"}[name]
            assert element(refused, field_id).attrs.get("aria-invalid") == "true"
            assert element(refused, f"{field_id}-error").text().startswith("Must be")
            assert "Not applied" in element(refused, "settings-status").text()

        # The applied settings hold: 7 new tokens at most.
        messages = chat.ask("count 50")
        assert shown_text(messages) == "1 2 3 4"
        assert "limit of 7 new tokens" in shown_reply(messages).text()
    with closing(ChatClient(server, conversation="settings-test-0001")) as again:
        assert element(again.sync, "temperature").attrs["value"] == "0"
        assert element(again.sync, "max-new-tokens").attrs["value"] == "7"
        assert element(again.sync, "system-prompt").text() == "Be brief."


# -- refusals --------------------------------------------------------------------------------

@pytest.mark.parametrize("values, expected", [
    ({"userPrompt": ""}, "Message: Must not be empty."),
    ({"userPrompt": "   "}, "Message: Must not be empty."),
    ({"userPrompt": 42}, "Message: Must be a string."),
    ({"action": "fly"}, "Unknown action"),
])
def test_bad_input_gets_an_error_fragment(chat, values, expected):
    chat.send(**values)
    message = chat.receive()
    assert targets(message)[0] == "#chat-error" and expected in message
    assert chat.ask("echo still fine")[-1]


@pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"text"'])
def test_a_message_that_is_not_a_json_object_gets_an_error_fragment(chat, raw):
    chat.ws.send(raw)
    message = chat.receive()
    assert targets(message) == ["#chat-error"]
    assert "could not read" in element(message, "chat-error").text()


def test_refused_text_is_put_back_in_the_composer(fake_server):
    fake_server.start(fake={}, maintenanceMode=True, maintenanceMessage="Back at 5 pm.")
    with closing(ChatClient(fake_server)) as chat:
        chat.send(userPrompt="my <b>long</b> question")
        message = chat.receive()
        assert targets(message) == ["#chat-error", "#composer"]
        assert element(message, "chat-error").text() == "Back at 5 pm."
        assert element(message, "composer").find("textarea").text() == "my <b>long</b> question"
        assert not composer_is_busy(message)


def test_a_full_queue_is_refused_at_once(fake_server):
    fake_server.start(fake={"max_sequences": 1, "step_delay": 0.02}, queueSize=0)
    with closing(ChatClient(fake_server)) as busy, closing(ChatClient(fake_server)) as other:
        busy.send(userPrompt="count 2000")
        busy.receive()
        other.send(userPrompt="echo me too")
        message = other.receive()
        assert targets(message) == ["#chat-error", "#composer"]
        assert "busy" in element(message, "chat-error").text()
        busy.send(action="stop")
        busy.receive_until_composer_enabled()


def test_an_engine_error_removes_the_turn_and_gives_the_text_back(fake_server):
    fake_server.start(fake={"context_length": 64})
    with closing(ChatClient(fake_server)) as chat:
        prompt = "a question far too long for this tiny context " * 3
        chat.send(userPrompt=prompt)
        first = chat.receive()
        assert targets(first)[0] == "#messages"
        failed = chat.receive()
        assert targets(failed) == ["delete #turn-1", "#chat-error", "#composer"]
        assert "context" in element(failed, "chat-error").text()
        assert element(failed, "composer").find("textarea").text() == prompt.strip()
    with closing(ChatClient(fake_server)) as fresh:
        assert element(fresh.sync, "messages").find(".turn") is None


# -- untrusted text --------------------------------------------------------------------------

XSS = ('<script>alert(1)</script><img src=x onerror=alert(1)> '
       '<div hx-get="/health" hx-trigger="load">x</div> [a](javascript:alert(1))')


def test_model_text_never_becomes_markup_while_streaming_or_after(chat):
    messages = chat.ask("echo " + XSS)
    for message in messages:  # every update holds a payload cut at some byte
        assert_inert(message)
    assert "<script>alert(1)</script>" in shown_text(messages)  # shown as text


def test_user_text_never_becomes_markup(chat):
    messages = chat.ask(XSS)
    for message in messages:
        assert_inert(message)
    prompt = parse(messages[0])[0].find("#turn-1-prompt")
    assert "<img src=x onerror=alert(1)>" in prompt.text()


# -- the socket's life -----------------------------------------------------------------------

def test_a_foreign_origin_is_refused_before_the_upgrade(server):
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ChatClient(server, origin="https://evil.example")
    assert refused.value.status_code == 403


def test_the_own_origin_is_accepted(server):
    with closing(ChatClient(server, origin=server.url)) as chat:
        assert targets(chat.sync)[0] == "#messages"


def test_a_closed_socket_cancels_its_reply_when_unwatched_replies_are_not_finished(
        fake_server):
    # A reply that would outlast the wait by far: only the cancel frees its slot in time.
    fake_server.start(fake={"step_delay": 0.01, "context_length": HUGE}, maxNewTokens=HUGE,
                      maxNewTokensLimit=HUGE, finishRepliesWithoutWatchers=False)
    chat = ChatClient(fake_server)
    chat.send(userPrompt=ENDLESS)
    first = chat.receive()
    chat.receive()
    chat.close()
    wait_until_idle(fake_server)
    with closing(ChatClient(fake_server, conversation=stored_id(first))) as again:
        reply = element(again.sync, "turn-1-reply")
        assert reply.find(".message__note").text() == "Interrupted"
        assert re.fullmatch(r"[\d ]+", reply.find(".message__content").text())


def test_a_reconnect_carries_the_conversation_on(server):
    with closing(ChatClient(server, conversation="reconnect-test-0001")) as chat:
        chat.ask("echo kept")
    with closing(ChatClient(server, conversation="reconnect-test-0001")) as again:
        assert element(again.sync, "turn-1-reply").find(".message__content").text() == "kept"
        assert shown_text(again.ask("echo next"), turn=2) == "next"


def test_an_idle_socket_is_closed(fake_server):
    fake_server.start(fake={}, socketIdleTimeoutSeconds=1)
    with closing(ChatClient(fake_server)) as chat:
        assert close_frame(chat.ws) == (1000, "idle")
