"""The chat UI's model picker (settings panel) and ``widgetModel``: which models the form offers,
what a choice sends to the model, what a wrong one gets; a UI socket driven in-process.

Three models are served (``tests.extra_models``): the default fake model, a second fake model
that answers WHO differently, and one listed as unavailable.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest
from simple_websocket import ConnectionClosed

from tanglebox.model_location import check_widget_model
from tanglebox.settings import Settings, SettingsError, defaults, load_settings
from tanglebox.web import create_app
from tanglebox.web.ui_conversation import PAGE, WIDGET, new_conversation
from tanglebox.web.ui_socket import ChatSocket
from tests.conftest import write_settings
from tests.extra_models import serve_models
from tests.fake_backend import FakeBackend
from tests.reply_page import ReplyPage
from tests.unit.test_ui_conversation import ScriptedClient, talk

WHO = "who are you?"
SECOND, GONE = "second-model", "gone-model"
DEFAULT = "SmolLM2-135M-Instruct"  # the default settings' model id (model_location.model_id)


class Form(HTMLParser):
    """The settings form in a fragment: its model options, error texts and status."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.options: list[dict] = []  # {"value", "label", "selected", "disabled"}
        self.select: dict | None = None  # the <select>'s attributes, when there is one
        self.texts: dict[str, str] = {}  # text by element id (errors, status)
        self._text_of: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "select" and attrs.get("id") == "model":
            self.select = attrs
        elif tag == "option":
            self.options.append({"value": attrs["value"], "label": "",
                                 "selected": "selected" in attrs,
                                 "disabled": "disabled" in attrs})
            self._text_of = "option"
        elif attrs.get("id"):
            self._text_of = attrs["id"]
            self.texts.setdefault(attrs["id"], "")

    def handle_endtag(self, tag):
        self._text_of = None

    def handle_data(self, data):
        if self._text_of == "option":
            self.options[-1]["label"] += data
        elif self._text_of:
            self.texts[self._text_of] += data

    @property
    def chosen(self) -> str:
        [selected] = [option["value"] for option in self.options if option["selected"]]
        return selected


def settings_form(fragments: list[str]) -> Form:
    """The last #settings-form sent."""
    [*_, html] = [f for f in fragments if 'id="settings-form"' in f]
    return Form(html[html.index('<form id="settings-form"'):])


def settings_message(**values) -> dict:
    return {"action": "settings", "temperature": "0.7", "maxNewTokens": "64",
            "systemPrompt": "", **values}


def reply(client) -> str:
    return ReplyPage().apply_all(client.sent).text()


@pytest.fixture
def served(tmp_path, settings_values):
    """An app serving the default fake model, SECOND, and GONE (unavailable)."""
    settings = load_settings(write_settings(tmp_path, **settings_values))
    default, second = (FakeBackend(replies={WHO: "I am the first model."}),
                       FakeBackend(replies={WHO: "I am the second model."}))
    runtime = serve_models(settings, default, {SECOND: second}, (GONE,))
    app = create_app(settings, runtime)
    app.config["TESTING"] = True
    app.backends = default, second
    yield app
    runtime.stop()


# -- the picker ------------------------------------------------------------------------------

def test_the_picker_lists_every_served_model_with_its_state_and_the_default_chosen(served):
    client = talk(served, PAGE)
    form = settings_form(client.sent)
    assert [o["value"] for o in form.options] == [DEFAULT, SECOND, GONE]
    assert form.chosen == DEFAULT
    assert [o["label"] for o in form.options] == [f"{DEFAULT} (default)", SECOND,
                                                  f"{GONE} (unavailable)"]
    assert [o["disabled"] for o in form.options] == [False, False, True]
    page = Form(served.test_client().get("/").get_data(as_text=True))  # on the page too
    assert page.options == form.options


def test_a_chosen_model_writes_the_next_reply_and_the_choice_is_kept(served):
    default, second = served.backends
    client = talk(served, PAGE, settings_message(model=SECOND), {"userPrompt": WHO})
    applied = settings_form(client.sent)
    assert applied.texts["settings-status"] == "Applied to this conversation."
    assert applied.chosen == SECOND
    assert reply(client) == "I am the second model."
    assert not any(default.sequences) and any(second.sequences)
    assert settings_form(client.reconnect_sync).chosen == SECOND  # kept in the conversation


def test_the_page_names_the_model_chosen(served):
    client = talk(served, PAGE, settings_message(model=SECOND), settings_message(model=SECOND))
    _, applied, again = client.sent
    assert Form(applied).texts["model-chip"] == SECOND  # the header
    assert f'placeholder="Message {SECOND}"' in applied  # the composer
    assert f"Replies stream from <strong>{SECOND}</strong>" in applied  # the empty chat
    assert 'id="model-chip"' not in again  # the same model again: nothing else to update


class MidReplyClient(ScriptedClient):
    """A ScriptedClient whose ``during`` message arrives while the first reply streams."""

    def __init__(self, *messages: dict, during: dict) -> None:
        super().__init__(*messages)
        self.input_buffer = ScriptedClient(during).incoming

    def receive(self, timeout=None):
        if timeout == 0:
            return self.input_buffer.pop(0) if self.input_buffer else None
        return super().receive(timeout)


def test_a_model_chosen_while_a_reply_streams_writes_the_next_one(served):
    runtime = served.extensions["tanglebox"]
    client = MidReplyClient({"userPrompt": "count 30"}, {"userPrompt": WHO},
                            during=settings_message(model=SECOND))
    with served.test_request_context("/ws/chat"), pytest.raises(ConnectionClosed):
        ChatSocket(client, runtime, new_conversation("m" * 22, PAGE, runtime.settings),
                   "test").run()
    assert settings_form(client.sent).chosen == SECOND
    first = [m for m in client.sent if "turn-2" not in m]
    assert ReplyPage(1).apply_all(first).text() == " ".join(str(i) for i in range(1, 31))
    assert ReplyPage(2).apply_all(client.sent).text() == "I am the second model."


def test_a_chosen_model_that_goes_down_stays_chosen_and_shown_with_its_state(served):
    form = settings_form(talk(served, PAGE, settings_message(model=GONE)).sent)
    [gone] = [option for option in form.options if option["value"] == GONE]
    assert gone == {"value": GONE, "label": f"{GONE} (unavailable)", "selected": True,
                    "disabled": False}  # a disabled option would leave the form


def test_choosing_the_default_again_goes_back_to_it(served):
    client = talk(served, PAGE, settings_message(model=SECOND),
                  settings_message(model=DEFAULT), {"userPrompt": WHO})
    assert reply(client) == "I am the first model."


@pytest.mark.parametrize("model", ["no-such-model", 42, ["second-model"]])
def test_a_model_not_served_is_refused_by_the_form_and_nothing_changes(served, model):
    client = talk(served, PAGE, settings_message(model=SECOND),
                  settings_message(model=model, temperature="0"), {"userPrompt": WHO})
    refused = settings_form(client.sent)
    assert refused.select["aria-invalid"] == "true"
    assert refused.texts["model-error"] == (
        f"Must be one of the models served here: {DEFAULT}, {SECOND}, {GONE}.")
    assert refused.texts["settings-status"] == "Not applied: correct the marked field."
    assert reply(client) == "I am the second model."  # the earlier choice holds


def test_with_one_model_served_there_is_no_picker(app):
    client = talk(app, PAGE, settings_message(), {"userPrompt": "echo still fine"})
    form = settings_form(client.sent)
    assert form.select is None and form.options == []
    assert form.texts["settings-status"] == "Applied to this conversation."
    assert reply(client) == "still fine"
    assert Form(app.test_client().get("/").get_data(as_text=True)).select is None


def test_with_one_model_an_unknown_id_is_still_named_in_the_form(app):
    client = talk(app, PAGE, settings_message(model="other"))
    form = settings_form(client.sent)
    assert form.texts["model-error"] == f"Must be one of the models served here: {DEFAULT}."


# -- the widget ------------------------------------------------------------------------------

@pytest.mark.parametrize("settings_values", [{"widgetModel": SECOND}])
def test_the_widget_uses_widget_model_and_the_page_the_default(served):
    assert reply(talk(served, WIDGET, {"userPrompt": WHO})) == "I am the second model."
    assert reply(talk(served, PAGE, {"userPrompt": WHO})) == "I am the first model."


def test_a_widget_model_that_is_not_served_stops_the_start():
    values = {**defaults(), "widgetModel": "big-model"}
    with pytest.raises(SettingsError, match='"widgetModel" is "big-model", which is not a '
                                            f"model served here; use one of {DEFAULT}"):
        check_widget_model(Settings(values, Path("settings.json")))


@pytest.mark.parametrize("values", [
    {"widgetModel": ""}, {"widgetModel": DEFAULT}, {"modelId": "mine", "widgetModel": "mine"},
    # a remote endpoint's name (issue 16's remoteEndpoints) is served too
    {"widgetModel": "big-model", "remoteEndpoints": [{"name": "big-model"}]},
])
def test_a_served_widget_model_starts(values):
    check_widget_model(Settings({**defaults(), **values}, Path("settings.json")))
